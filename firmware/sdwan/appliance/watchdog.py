"""The hardware watchdog and socketd's start history: how the box notices a hung or a crashing
supervisor, and what it records about it.

* `Watchdog` opens /dev/watchdog armed with a long start-up timeout, reads why the last reset
  happened, and once the supervisor's loop runs switches to the short running timeout and pets
  the device from a task on that loop every timeout/3, so a hung loop (or a stopped process)
  stops the pets and the hardware resets the box. A start-up that never ends is caught by the
  start-up timeout. A driver that cannot count that far gets the longest timeout it takes. A
  clean stop writes the magic 'V' first, which disarms drivers that allow it.
* `record_start` runs once per socketd start: it reads the run file in the data directory,
  left by the previous socketd, to say how that one ended (stopped, failed to start, or gone
  without a word: a crash, a kill, a reset), records a `socketd.start` event, and detects a
  crash loop: `starts` starts within `window_s` seconds of one boot, which init's respawning
  turns a crashing socketd into. `StartRecord.error_until` then keeps the LEDs in the error
  pattern. Design and events are described in docs/watchdog.md.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.common.durable import write_json_atomic
from sdwan.common.store import Store, StoreError
from sdwan.site.config import Appliance

__all__ = [
    "FASTPATH_FILE",
    "RUN_FILE",
    "Guard",
    "StartRecord",
    "Watchdog",
    "boot_id",
    "boot_time",
    "end_run",
    "record_start",
]

log = logging.getLogger("sdwan.appliance.watchdog")

# <linux/watchdog.h>: _IOR('W', n, int) and friends.
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("W") << 8) | nr


WDIOC_GETSUPPORT = _ioc(_IOC_READ, 0, 40)  # struct watchdog_info
WDIOC_GETBOOTSTATUS = _ioc(_IOC_READ, 2, 4)
WDIOC_SETTIMEOUT = _ioc(_IOC_READ | _IOC_WRITE, 6, 4)
WDIOC_GETTIMEOUT = _ioc(_IOC_READ, 7, 4)

WDIOF_OVERHEAT = 0x0001
WDIOF_FANFAULT = 0x0002
WDIOF_EXTERN1 = 0x0004
WDIOF_EXTERN2 = 0x0008
WDIOF_POWERUNDER = 0x0010
WDIOF_CARDRESET = 0x0020
WDIOF_POWEROVER = 0x0040

_BOOT_REASONS = (
    (WDIOF_CARDRESET, "the watchdog reset the box"),
    (WDIOF_OVERHEAT, "overheat"),
    (WDIOF_FANFAULT, "fan fault"),
    (WDIOF_POWERUNDER, "power under"),
    (WDIOF_POWEROVER, "power over"),
    (WDIOF_EXTERN1, "external relay 1"),
    (WDIOF_EXTERN2, "external relay 2"),
)

PET = b"."  # any byte pets; 'V' would arm the magic close
MAGIC_CLOSE = b"V"

EVENT_WATCHDOG_RESET = "watchdog.reset"
EVENT_START = "socketd.start"
EVENT_UNCLEAN = "socketd.unclean_end"
EVENT_CRASH_LOOP = "socketd.crash_loop"


def boot_id() -> str:
    """This boot's random id from the kernel ("" where there is none)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def boot_time() -> float:
    """Seconds since boot, suspend included: unlike the wall clock, NTP never moves it."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _describe_boot_status(flags: int) -> list[str]:
    return [text for bit, text in _BOOT_REASONS if flags & bit]


class Watchdog:
    """One watchdog device. Absent or unusable: one log line, and every call does nothing.

    Armed at `open()` with `startup_timeout_s`: a supervisor that is still starting (slow
    storage, a loaded or emulated CPU) is not reset, one that hangs while starting still is.
    `end_startup()` (called by `run()`) switches to `timeout_s`, the running timeout."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout_s: int = 15,
        startup_timeout_s: int | None = None,
    ) -> None:
        startup = timeout_s if startup_timeout_s is None else startup_timeout_s
        for what, value in (("timeout", timeout_s), ("start-up timeout", startup)):
            if not 1 <= value <= 3600:
                raise ValueError(f"watchdog {what} must be 1..3600 s, got {value}")
        if startup < timeout_s:
            raise ValueError(
                f"watchdog start-up timeout ({startup} s) is shorter than its timeout"
                f" ({timeout_s} s)"
            )
        self.path = Path(path)
        self.requested_timeout_s = timeout_s
        self.requested_startup_s = startup
        self.timeout_s = startup  # the one in force: the start-up timeout until end_startup()
        self.starting = True
        self.fd: int | None = None
        self.identity: str | None = None
        self.boot_status: int | None = None
        self.pets = 0
        self.pet_failures = 0
        self.last_pet: float | None = None
        self.opened_at: float | None = None
        self.problem: str | None = None
        self.held: str | None = None  # why the pets stopped for good (hold())

    @property
    def active(self) -> bool:
        return self.fd is not None

    @property
    def reset_by_watchdog(self) -> bool:
        return self.boot_status is not None and bool(self.boot_status & WDIOF_CARDRESET)

    @property
    def pet_interval_s(self) -> float:
        return self.timeout_s / 3

    def open(self) -> bool:
        """Open and arm the device (the kernel starts it at open) with the start-up timeout;
        False if it cannot be used."""
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOENT:
                self.problem = f"no watchdog device at {self.path}"
                log.warning("%s: running without a hardware watchdog", self.problem)
            elif e.errno == errno.EBUSY:
                self.problem = f"{self.path} is held by another process"
                log.error("%s: running without petting it", self.problem)
            else:
                self.problem = f"cannot open {self.path}: {e.strerror}"
                log.error("%s: running without a hardware watchdog", self.problem)
            return False
        self.opened_at = time.monotonic()
        self.identity = self._identity()
        self.boot_status = self._ioctl_value(WDIOC_GETBOOTSTATUS, 0)
        self._set_timeout(self.requested_startup_s)
        if self.starting and self.requested_startup_s > self.requested_timeout_s:
            log.info(
                "watchdog %s%s armed for the start-up: timeout %d s, %d s once socketd runs",
                self.path,
                f" ({self.identity})" if self.identity else "",
                self.timeout_s,
                self.requested_timeout_s,
            )
        else:
            self.starting = False
            self._log_running(switched=False)
        self.pet()
        return True

    def end_startup(self) -> None:
        """The supervisor is up and its loop runs: from now on the running timeout. Held
        before that (hold()): nothing changes, since setting a timeout pets the device too."""
        if not self.starting:
            return
        self.starting = False
        if self.held is not None:
            return
        if self.fd is None:
            self.timeout_s = self.requested_timeout_s
            return
        self._set_timeout(self.requested_timeout_s)
        self._log_running(switched=True)
        self.pet()

    def _log_running(self, *, switched: bool) -> None:
        took = "" if not switched or self.opened_at is None else \
            f" ({time.monotonic() - self.opened_at:.1f} s after it was opened)"
        log.info(
            "watchdog %s%s armed: timeout %d s, petting every %.1f s%s",
            self.path,
            f" ({self.identity})" if self.identity else "",
            self.timeout_s,
            self.pet_interval_s,
            took,
        )

    def _set_timeout(self, want: int) -> None:
        """Ask the driver for `want` seconds and pet for what it took. The watchdog core refuses
        a value outside the driver's min..max with EINVAL (it says nothing about the limits):
        the closest accepted value is then searched between `want` and the timeout in force,
        which the driver took, and logged."""
        got, err = self._try_timeout(want)
        if err == errno.EINVAL:
            now = self._ioctl_value(WDIOC_GETTIMEOUT, 0)
            if now is not None and now > 0 and now != want:
                got = self._closest_timeout(want, now)
                if got is not None:
                    log.warning(
                        "watchdog %s refuses a timeout of %d s: using %d s, the %s it takes",
                        self.path, want, got, "longest" if got < want else "shortest",
                    )
        if got is None:
            got = self._ioctl_value(WDIOC_GETTIMEOUT, 0)
            if got is not None and got > 0 and err not in (None, errno.ENOTTY):
                log.warning("watchdog %s keeps its timeout of %d s (asked for %d s)",
                            self.path, got, want)
        # Not a driver (ENOTTY: a file or FIFO in tests) takes what it is asked; a driver may
        # round to what its hardware can count: pet for what it took.
        self.timeout_s = got if got is not None and got > 0 else want

    def _closest_timeout(self, want: int, accepted: int) -> int | None:
        """Binary search between `accepted` (taken) and `want` (refused) for the accepted value
        nearest `want`, then set it. Every try that is taken also pets the device."""
        good, bad = accepted, want
        while abs(bad - good) > 1:
            mid = (good + bad) // 2
            _, err = self._try_timeout(mid)
            if err is None:
                good = mid
            elif err == errno.EINVAL:
                bad = mid
            else:
                return None
        got, _ = self._try_timeout(good)
        return got

    def _try_timeout(self, seconds: int) -> tuple[int | None, int | None]:
        """(timeout the driver took, None) or (None, errno)."""
        try:
            return self._ioctl_int(WDIOC_SETTIMEOUT, seconds), None
        except OSError as e:
            return None, e.errno

    def _ioctl_value(self, request: int, value: int) -> int | None:
        try:
            return self._ioctl_int(request, value)
        except OSError:
            return None

    def _ioctl_int(self, request: int, value: int) -> int:
        """One int ioctl on the device (the driver's answer); OSError as the kernel says."""
        assert self.fd is not None
        buf = array.array("i", [value])
        try:
            fcntl.ioctl(self.fd, request, buf, True)
        except OSError as e:
            # ENOTTY: not a watchdog driver (a file in tests); EOPNOTSUPP/EINVAL: no such feature
            # or a value out of the driver's range.
            log.debug("watchdog ioctl %#x(%d): %s", request, value, e.strerror)
            raise
        return int(buf[0])

    def _identity(self) -> str | None:
        assert self.fd is not None
        buf = bytearray(40)
        try:
            fcntl.ioctl(self.fd, WDIOC_GETSUPPORT, buf, True)
        except OSError:
            return None
        return bytes(buf[8:40]).split(b"\0", 1)[0].decode("ascii", "replace") or None

    def pet(self) -> None:
        if self.fd is None or self.held is not None:
            return
        try:
            os.write(self.fd, PET)
        except OSError as e:
            self.pet_failures += 1
            if self.pet_failures == 1 or self.pet_failures % 100 == 0:
                log.error("petting %s failed (%d times): %s", self.path, self.pet_failures,
                          e.strerror)
            return
        self.pets += 1
        self.last_pet = time.monotonic()

    async def run(self, alive: Callable[[], bool] | None = None) -> None:
        """End the start-up, then pet every timeout/3 from the caller's loop. `alive` can hold
        back the pets (the supervisor's own heartbeat stopped): the hardware then resets the
        box."""
        self.end_startup()
        if self.fd is None:
            return
        while True:
            await asyncio.sleep(self.pet_interval_s)
            if self.held is not None:
                continue
            if alive is None or alive():
                self.pet()
            else:
                log.error("supervisor not healthy: no longer petting the watchdog")

    def hold(self, reason: str) -> None:
        """Stop petting for good: the hardware resets the box one timeout after the last pet.
        For what the supervisor sees and cannot mend (a fast path it could not restart); the
        reason shows in status as `held`."""
        if self.held is None:
            self.held = reason
            log.error("no longer petting watchdog %s: %s", self.path, reason)

    def close(self, *, disarm: bool = True, grace: bool = False) -> None:
        """Release the device. `disarm` writes the magic 'V' first (a clean stop); without it
        the timer runs on and resets the box unless the next socketd opens it in time. `grace`
        (a crash socketd saw) leaves the start-up timeout armed, since that next socketd has to
        start before it can pet."""
        if self.fd is not None and grace and not disarm:
            self._set_timeout(self.requested_startup_s)
            self.pet()
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if disarm:
                os.write(fd, MAGIC_CLOSE)
        except OSError as e:
            log.warning("watchdog magic close failed: %s", e.strerror)
        finally:
            os.close(fd)
        if disarm:
            log.info("watchdog %s disarmed", self.path)

    def status(self) -> dict[str, Any]:
        return {
            "device": str(self.path),
            "active": self.active,
            "identity": self.identity,
            "timeout_s": self.timeout_s if self.active else None,
            "pets": self.pets,
            "pet_failures": self.pet_failures,
            "last_pet_s": None
            if self.last_pet is None
            else round(time.monotonic() - self.last_pet, 1),
            "boot_status": _describe_boot_status(self.boot_status or 0),
            "problem": self.problem,
            "held": self.held,
        }


# --------------------------------------------------------------------------- start history


RUN_FILE = "socketd.run"
# Consecutive runs whose fast path failed (docs/watchdog.md, "A fault that comes back"): kept
# next to the run file, across resets and boots.
FASTPATH_FILE = "fastpath.failures"
# After this many such runs in a row the next one no longer resets the box or restarts
# socketd for its fast path: it stays up, to be reached and looked at.
FASTPATH_FAIL_RUNS = 3
# A run whose fast path works this long starts the count over.
FASTPATH_HEALTHY_S = 600.0


@dataclass(frozen=True)
class StartRecord:
    """What `record_start` found: how the previous run ended and whether starts loop."""

    previous: str  # "first start", "stopped", "start failed: ...", "crashed", "unclean boot"
    starts_in_window: int
    crash_loop: bool
    error_until: float | None  # boot time until which the LEDs show the error pattern
    message: str | None = None  # the crash-loop text, when there is one

    def in_error(self, now: float) -> bool:
        return self.error_until is not None and now < self.error_until


def _read_run_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        # Cannot happen with the atomic write short of a damaged disk; treat it as unclean.
        return {"state": "running", "unreadable": str(e)}
    return data if isinstance(data, dict) else {"state": "running"}


def _previous_end(prev: dict[str, Any] | None, this_boot: str) -> tuple[str, str | None]:
    """(short word for the start event, text of an unclean-end event or None)."""
    if prev is None:
        return "first start", None
    if prev.get("state") == "ended":
        how = str(prev.get("how") or "stopped")
        return how, None
    pid = prev.get("pid")
    who = f"socketd (pid {pid})" if pid else "socketd"
    if prev.get("boot_id") and prev.get("boot_id") != this_boot:
        return "unclean boot", (
            f"the previous boot ended while {who} was running (power cut, reset or watchdog)"
        )
    return "crashed", f"{who} ended without stopping cleanly (crash, kill or out of memory)"


def _fmt_window(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


def record_start(
    store: Store | None,
    data_dir: Path,
    *,
    starts: int = 5,
    window_s: float = 120.0,
    watchdog_reset: bool = False,
    now: float | None = None,
    this_boot: str | None = None,
    pid: int | None = None,
    version: str = "",
) -> StartRecord:
    """Note this start: run file, events, crash-loop check. `now` (boot time), `this_boot` and
    `pid` are injectable for tests. Never raises for a broken store: it is logged."""
    now = boot_time() if now is None else now
    this_boot = boot_id() if this_boot is None else this_boot
    pid = os.getpid() if pid is None else pid
    run_file = data_dir / RUN_FILE
    prev = _read_run_file(run_file)
    previous, unclean = _previous_end(prev, this_boot)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json_atomic(
            run_file,
            {"state": "running", "pid": pid, "boot_id": this_boot, "boot_s": now,
             "at": time.time(), "version": version},
        )
    except OSError as e:
        log.error("cannot write %s: %s (unclean ends will not be told apart)", run_file, e)

    def event(kind: str, text: str, data: dict[str, Any]) -> None:
        if store is None:
            return
        try:
            store.add_event(kind, text, data=data)
        except (StoreError, ValueError) as e:
            log.error("event %s not stored: %s", kind, e)

    if watchdog_reset and not _seen_this_boot(store, EVENT_WATCHDOG_RESET, this_boot):
        was = ""
        if prev and prev.get("state") == "running" and prev.get("pid"):
            was = f" (socketd pid {prev['pid']} was running)"
        event(
            EVENT_WATCHDOG_RESET,
            f"rebooted by the watchdog: the supervisor stopped petting it{was}",
            {"boot_id": this_boot},
        )
        log.error("this boot follows a watchdog reset")
    elif unclean:
        log.warning("previous run: %s", unclean)
        event(EVENT_UNCLEAN, unclean, {"previous": previous, "boot_id": this_boot})

    history = _recent_starts(store, this_boot, now, window_s, limit=max(0, starts - 1) + 16)
    in_window = [h for h in history if now - float(h.get("boot_s", -1e18)) <= window_s]
    count = len(in_window) + 1
    crash_loop = count >= starts
    was_looping = bool(history and history[0].get("crash_loop"))
    message = None
    if crash_loop:
        ends = [str(h.get("previous", "?")) for h in in_window[: starts - 1]]
        ends = [previous, *ends][: starts - 1]
        summary: dict[str, int] = {}
        for e in ends:
            summary[e] = summary.get(e, 0) + 1
        how = ", ".join(f"{n} {word}" for word, n in summary.items())
        message = (
            f"socketd started {count} times in {_fmt_window(window_s)}"
            f" (the runs before ended: {how}); LEDs show the error pattern"
        )
        log.error("crash loop: %s", message)
        if not was_looping:
            event(EVENT_CRASH_LOOP, message, {"starts": count, "window_s": window_s,
                                              "ends": ends, "boot_id": this_boot})
    event(
        EVENT_START,
        f"socketd{' ' + version if version else ''} started (previous run: {previous})",
        {"boot_id": this_boot, "boot_s": now, "pid": pid, "previous": previous,
         "crash_loop": crash_loop},
    )
    return StartRecord(
        previous=previous,
        starts_in_window=count,
        crash_loop=crash_loop,
        # Held for one window: a supervisor that stays up that long is out of the loop.
        error_until=now + window_s if crash_loop else None,
        message=message,
    )


def _recent_starts(
    store: Store | None, this_boot: str, now: float, window_s: float, limit: int
) -> list[dict[str, Any]]:
    """Data of this boot's earlier start events, newest first."""
    if store is None:
        return []
    try:
        events = store.events(limit=limit, kind=EVENT_START)
    except StoreError as e:
        log.error("start history unreadable: %s", e)
        return []
    out = []
    for ev in events:
        data = ev.data or {}
        if data.get("boot_id") != this_boot:
            break  # older boots: boot times are not comparable
        out.append(data)
    return out


def _seen_this_boot(store: Store | None, kind: str, this_boot: str) -> bool:
    if store is None:
        return False
    with contextlib.suppress(StoreError):
        for ev in store.events(limit=1, kind=kind):
            return (ev.data or {}).get("boot_id") == this_boot
    return False


def end_run(data_dir: Path, how: str = "stopped") -> None:
    """Tell the next start that this run ended under control (`how`: "stopped" or
    "start failed: <why>")."""
    run_file = data_dir / RUN_FILE
    try:
        prev = _read_run_file(run_file) or {}
        write_json_atomic(
            run_file, {**prev, "state": "ended", "how": how[:300], "ended_at": time.time()}
        )
    except OSError as e:
        log.error("cannot write %s: %s", run_file, e)


def fastpath_failed_runs(data_dir: Path) -> int:
    """How many runs in a row ended with the fast path failed (0: none, or the last run that
    stayed up cleared it)."""
    try:
        data = json.loads((data_dir / FASTPATH_FILE).read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        log.error("cannot read %s: %s", data_dir / FASTPATH_FILE, e)
        return 0
    runs = data.get("runs") if isinstance(data, dict) else None
    return runs if isinstance(runs, int) and not isinstance(runs, bool) and runs > 0 else 0


def _write_fastpath_runs(data_dir: Path, runs: int, why: str | None) -> None:
    path = data_dir / FASTPATH_FILE
    try:
        if runs == 0:
            path.unlink(missing_ok=True)
        else:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_json_atomic(path, {"runs": runs, "why": (why or "")[:300], "at": time.time()})
    except OSError as e:
        log.error("cannot write %s: %s", path, e)


class Guard:
    """What socketd runs of this module: the watchdog and the start history for one run.

    `start()` first (it arms the watchdog with the start-up timeout and opens the store on its
    own for a moment, so a socketd that fails to start is counted too), `run()` as a task on
    the loop once the supervisor is up (the running timeout from then on), `end(how)` on a
    controlled end, `close()` last: it disarms the watchdog only after `end`, so that a crash
    leaves it armed for the next socketd (with the start-up timeout, so that it can start) or,
    failing that, for a reset."""

    def __init__(self, appliance: Appliance, data_dir: Path, version: str = "") -> None:
        self.appliance = appliance
        self.data_dir = data_dir
        self.version = version
        self.watchdog = (
            Watchdog(appliance.watchdog, appliance.watchdog_timeout_s,
                     appliance.watchdog_startup_s)
            if appliance.watchdog is not None
            else None
        )
        self.record: StartRecord | None = None
        self.ended: str | None = None
        # Runs in a row, before this one, whose fast path failed (read by start()); and
        # whether this run's failed too (fastpath_failed()).
        self.fastpath_failed_before = 0
        self.fastpath_failed_now = False
        self.fastpath_fail_runs = FASTPATH_FAIL_RUNS

    def start(self) -> StartRecord:
        if self.watchdog is not None:
            self.watchdog.open()
        self.fastpath_failed_before = fastpath_failed_runs(self.data_dir)
        store: Store | None = None
        try:
            store = Store(self.data_dir)
        except (StoreError, OSError) as e:
            log.error("start history without a store: %s", e)
        try:
            self.record = record_start(
                store,
                self.data_dir,
                starts=self.appliance.crash_loop_starts,
                window_s=self.appliance.crash_loop_window_s,
                watchdog_reset=self.watchdog is not None and self.watchdog.reset_by_watchdog,
                version=self.version,
            )
        finally:
            if store is not None:
                store.close()
        return self.record

    def in_error(self) -> bool:
        return self.record is not None and self.record.in_error(boot_time())

    async def run(self, alive: Callable[[], bool] | None = None) -> None:
        """The start-up is over: the running timeout, and pets from the caller's loop."""
        if self.watchdog is not None:
            await self.watchdog.run(alive)

    def hold(self, reason: str) -> bool:
        """Stop the watchdog's pets for good (Watchdog.hold); False when there is no watchdog
        to reset the box."""
        if self.watchdog is None or not self.watchdog.active:
            return False
        self.watchdog.hold(reason)
        return True

    def fastpath_failed(self, why: str) -> bool:
        """This run's fast path failed: recorded in the data directory (before anything resets
        the box). True while the box may still be reset or socketd restarted for it; False
        once the runs before this one failed `fastpath_fail_runs` (3) times in a row: a fault
        that comes back after every start, which another reset would not mend."""
        if not self.fastpath_failed_now:
            self.fastpath_failed_now = True
            _write_fastpath_runs(self.data_dir, self.fastpath_failed_before + 1, why)
        return self.fastpath_failed_before < self.fastpath_fail_runs

    def fastpath_healthy(self) -> None:
        """This run's fast path stayed up long enough: the count of failed runs starts over."""
        if self.fastpath_failed_before and not self.fastpath_failed_now:
            log.info("the fast path ran well after %d runs that ended with it failed:"
                     " the count starts over", self.fastpath_failed_before)
            _write_fastpath_runs(self.data_dir, 0, None)
            self.fastpath_failed_before = 0

    def end(self, how: str = "stopped") -> None:
        if self.ended is None:
            self.ended = how
            end_run(self.data_dir, how)

    def close(self) -> None:
        if self.watchdog is not None:
            crashed = self.ended is None
            self.watchdog.close(disarm=not crashed, grace=crashed)

    def status(self) -> dict[str, Any]:
        rec = self.record
        return {
            "watchdog": self.watchdog.status() if self.watchdog is not None else None,
            "previous_run": rec.previous if rec is not None else None,
            "starts_in_window": rec.starts_in_window if rec is not None else None,
            "crash_loop": self.in_error(),
            "fastpath_failed_runs": self.fastpath_failed_before + int(self.fastpath_failed_now),
        }
