"""The wall clock's floor. A board without a working RTC (or with a flat RTC battery) starts
in 1970 or 2000, where every certificate is "not yet valid" and no handshake succeeds. The
image's rcS moves the clock forward, never back, before anything else runs: to the image's
build time, then to the last time socketd stored in /data, unless that is absurdly far
(MAX_AHEAD_S) after the build time. socketd stores the time only while something vouches for
it (docs/time.md):

- chronyd says the clock is synchronised (and sets it): stored even if behind the floor, so a
  floor made from a wrong time comes back down. NTP is the better authority, though it is
  not authenticated;
- else a DTLS session is up (both ends' certificates were valid at our clock): stored only
  between the build time and our own certificate's notAfter, since the certificates' windows
  are years long and a clock months ahead would pass them.

It says at start when rcS moved the clock; rcS's note is then renamed, so a restart of
socketd within the same boot does not say it again (status still shows it)."""

from __future__ import annotations

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
REPORTED_SUFFIX = ".reported"  # the note, once socketd has said what it holds
MAX_AHEAD_S = 20 * 365 * 86400  # a stored time further after the build time is ignored (rcS)
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
        if (self.stored is not None and self.build_time is not None
                and self.stored > self.build_time + MAX_AHEAD_S):
            log.warning("the stored time %s is absurdly far after the build time: ignored",
                        _iso(self.stored))
            self.stored = None
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
        reported = self.mark.with_name(self.mark.name + REPORTED_SUFFIX)
        new = self._read_mark(self.mark)
        if new is not None:
            self.moved = new
            events.append(ClockEvent(
                "clock.floor", f"the clock read {new['was']} at boot, behind {new['source']}: "
                f"moved to {new['set_to']} (no working RTC, or it lost its time)", new))
            try:
                os.replace(self.mark, reported)  # said once per boot, not at every restart
            except OSError as e:
                log.warning("%s not renamed: %s", self.mark, e)
        else:
            self.moved = self._read_mark(reported)
        floor = self.floor()
        now = self._wall()
        if floor is not None and now < floor[0] - BEHIND_SLACK_S:
            events.append(ClockEvent(
                "clock.behind", f"the clock reads {_iso(now)}, behind {floor[1]} "
                f"({_iso(floor[0])}): it is wrong, certificates may be refused",
                {"now": _iso(now), "floor": _iso(floor[0]), "source": floor[1]}))
        return events

    @staticmethod
    def _read_mark(path: Path) -> dict[str, Any] | None:
        """rcS's note of the move: "<clock before> <clock after> <source words>"."""
        try:
            parts = path.read_text(encoding="ascii").split(maxsplit=2)
        except (OSError, UnicodeDecodeError):
            return None
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            return None
        return {"was": _iso(int(parts[0])), "set_to": _iso(int(parts[1])),
                "source": parts[2].strip()}

    def tick(self, ntp_synced: bool, session_up: bool, cert_not_after: int | None) -> None:
        """Store the time every STORE_EVERY_S while something vouches for it (store())."""
        if (ntp_synced or session_up) and self._clock() >= self._next_store:
            self.store(ntp_synced, cert_not_after)

    def store(self, ntp_synced: bool, cert_not_after: int | None) -> None:
        """Write the time now (atomically: a power cut leaves the old or the new one). With
        NTP synchronised, whatever it is; else (a DTLS session vouches for it) only from the
        build time up to our own certificate's notAfter (or the build time plus MAX_AHEAD_S)."""
        now = int(self._wall())
        if not ntp_synced:
            if self.build_time is not None and now < self.build_time:
                return  # that clock is the wrong one
            limit = cert_not_after if cert_not_after is not None else (
                self.build_time + MAX_AHEAD_S if self.build_time is not None else None)
            if limit is not None and now > limit:
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
