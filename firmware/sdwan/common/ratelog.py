"""Rate-limited warnings: what a daemon logs about input from the network, where a flood of
bad datagrams must not become a flood of log lines."""

from __future__ import annotations

import logging
from collections.abc import Callable

LOG_BURST = 5
LOG_WINDOW_S = 10.0


class RateLog:
    """At most LOG_BURST lines per key and LOG_WINDOW_S; what was held back is counted."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float]) -> None:
        self._log = logger
        self._clock = clock
        self._windows: dict[str, list[float]] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        win = self._windows.get(key)
        if win is None or now - win[0] >= LOG_WINDOW_S:
            if win is not None and win[2] > 0:
                self._log.warning("%s: %d more like this were not logged", key, int(win[2]))
            win = self._windows[key] = [now, 0, 0]
            if len(self._windows) > 1024:
                # Keys carry no source addresses, so this only guards against a bug.
                self._windows = {key: win}
        if win[1] < LOG_BURST:
            win[1] += 1
            self._log.warning(msg, *args)
        else:
            win[2] += 1
