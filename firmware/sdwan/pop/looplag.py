"""How late popd's event loop runs: a task that asks to wake every `interval_s` and records
how much later than asked it woke. A late wakeup is a stall: whatever ran on the loop
meanwhile (a burst of handshakes, a directory push, a store write) held everything else
up, the keepalives and answers the sites judge the PoP by among it. `popctl status` shows
the figures (`loop`, docs/popd.md, "Loop lag").
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INTERVAL_S = 0.02
WINDOW_S = 60.0


@dataclass
class LoopLag:
    """The lag of each wakeup over the last `window_s`, and the largest since the start."""

    interval_s: float = INTERVAL_S
    window_s: float = WINDOW_S
    clock: Callable[[], float] = time.monotonic
    max_ever_s: float = 0.0
    max_ever_at: float | None = None  # clock time of that stall's end
    samples: int = 0
    _recent: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)

    def record(self, now: float, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.samples += 1
        self._recent.append((now, lag_s))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        if lag_s > self.max_ever_s:
            self.max_ever_s, self.max_ever_at = lag_s, now

    def status(self) -> dict[str, Any]:
        """Milliseconds: the largest stall and the 99th and 50th percentile of the lag over
        the window, and the largest since popd started."""
        lags = sorted(lag for _, lag in self._recent)

        def pct(p: float) -> float | None:
            if not lags:
                return None
            return round(lags[min(len(lags) - 1, int(p * len(lags)))] * 1000, 1)

        return {
            "window_s": self.window_s,
            "interval_ms": round(self.interval_s * 1000, 1),
            "max_stall_ms": round(lags[-1] * 1000, 1) if lags else None,
            "p99_ms": pct(0.99),
            "p50_ms": pct(0.50),
            "max_stall_ever_ms": round(self.max_ever_s * 1000, 1),
            "max_stall_ever_ago_s": (
                None if self.max_ever_at is None else round(self.clock() - self.max_ever_at, 1)
            ),
            "samples": self.samples,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Wake every interval until `stop` is set, recording each wakeup's lateness."""
        while not stop.is_set():
            asked = self.clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = self.clock()
            self.record(now, now - asked)


def status_text(loop: dict[str, Any]) -> str:
    """One line for people (popctl status)."""
    if loop.get("max_stall_ms") is None:
        return "loop lag: no samples yet"
    return (
        f"loop lag over {loop['window_s']:.0f} s: max {loop['max_stall_ms']} ms,"
        f" p99 {loop['p99_ms']} ms, p50 {loop['p50_ms']} ms;"
        f" max since start {loop['max_stall_ever_ms']} ms"
    )
