"""The wall clock's floor. A board without a working RTC (or with a flat RTC battery) starts
in 1970 or 2000, where every certificate is "not yet valid" and no handshake succeeds. The
image's rcS moves the clock forward, never back, before anything else runs: to the image's
build time, then to the last time socketd stored in /data. socketd stores the time only while
it is trusted (a PoP session is up, so both ends' certificates were valid at it: a clock set
far ahead by hand is never made the floor) and says at start when rcS moved the clock
(docs/time.md)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CLOCK_FILE = "clock"  # in socketd's data dir: seconds since the epoch and a newline
BUILD_TIME = Path("/etc/sdwan/build-time")  # written by the image build (SOURCE_DATE_EPOCH)
# rcS writes "<clock before> <clock after> <source words>" here when it moved the clock.
FLOOR_MARK = Path("/run/socketd/clock-floor")
STORE_EVERY_S = 600.0  # the stored time lags by at most this; /data is flash, spare it
BEHIND_SLACK_S = 60  # a clock this little behind the floor is not worth an event


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read_epoch(path: Path) -> int | None:
    """The seconds since the epoch a file holds, None if it is missing or not a number."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and len(text) <= 12 else None


@dataclass(frozen=True)
class ClockEvent:
    kind: str
    text: str
    data: dict[str, Any]


class ClockFloor:
    """Keeps the stored time in data_dir/CLOCK_FILE and reports what rcS did with it."""

    def __init__(
        self, data_dir: Path, build_time: Path = BUILD_TIME, mark: Path = FLOOR_MARK,
        wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = data_dir / CLOCK_FILE
        self.build_time = _read_epoch(build_time)
        self.mark = mark
        self._wall = wall
        self._clock = clock
        self.stored = _read_epoch(self.path)
        self.moved: dict[str, Any] | None = None  # what rcS did at this boot
        self._next_store = 0.0

    def floor(self) -> tuple[int, str] | None:
        """The time the clock must not be behind, and where it comes from."""
        options = [(t, src) for t, src in ((self.build_time, "the build time"),
                                          (self.stored, "the last stored time")) if t]
        return max(options) if options else None

    def at_start(self) -> list[ClockEvent]:
        """What to record as socketd starts: the clock moved by rcS, or a clock still behind
        its floor (rcS did not run: not the image, or a failed step)."""
        events = []
        with contextlib.suppress(OSError, UnicodeDecodeError):
            parts = self.mark.read_text(encoding="ascii").split(maxsplit=2)
            if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                was, now, source = int(parts[0]), int(parts[1]), parts[2].strip()
                self.moved = {"was": _iso(was), "set_to": _iso(now), "source": source}
                events.append(ClockEvent(
                    "clock.floor", f"the clock read {_iso(was)} at boot, behind {source}: "
                    f"moved to {_iso(now)} (no working RTC, or it lost its time)", self.moved))
        floor = self.floor()
        now = self._wall()
        if floor is not None and now < floor[0] - BEHIND_SLACK_S:
            events.append(ClockEvent(
                "clock.behind", f"the clock reads {_iso(now)}, behind {floor[1]} "
                f"({_iso(floor[0])}): it is wrong, certificates may be refused",
                {"now": _iso(now), "floor": _iso(floor[0]), "source": floor[1]}))
        return events

    def tick(self, trusted: bool) -> None:
        """Store the time every STORE_EVERY_S while it is trusted."""
        if trusted and self._clock() >= self._next_store:
            self.store()

    def store(self) -> None:
        """Write the time now (atomically: a power cut leaves the old or the new one). Never
        a time behind the floor: that clock is the wrong one."""
        now = int(self._wall())
        floor = self.floor()
        if floor is not None and now < floor[0]:
            return
        self._next_store = self._clock() + STORE_EVERY_S
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{now}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("the time was not stored in %s: %s", self.path, e)
            return
        self.stored = now

    def status(self) -> dict[str, Any]:
        floor = self.floor()
        return {
            "now": _iso(self._wall()),
            "floor": _iso(floor[0]) if floor else None,
            "floor_source": floor[1] if floor else None,
            "stored": _iso(self.stored) if self.stored else None,
            "moved_at_boot": self.moved,
        }
