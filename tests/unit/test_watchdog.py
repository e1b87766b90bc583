"""Watchdog and start history: pets and the magic close land on a real FIFO and file, a
missing device is one clear line, a blocked loop stops the pets, and crash loops are found in a
real SQLite store, with an injected clock and with real processes killed by SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdwan.appliance.watchdog import (
    EVENT_CRASH_LOOP,
    EVENT_START,
    EVENT_UNCLEAN,
    EVENT_WATCHDOG_RESET,
    RUN_FILE,
    WDIOC_GETBOOTSTATUS,
    WDIOC_GETSUPPORT,
    WDIOC_GETTIMEOUT,
    WDIOC_SETTIMEOUT,
    Watchdog,
    end_run,
    record_start,
)
from sdwan.common.store import Store

pytestmark = pytest.mark.timeout(60)


def test_ioctl_numbers_match_linux_watchdog_h() -> None:
    # From <linux/watchdog.h> on x86_64 and arm64 (asm-generic ioctl encoding).
    assert WDIOC_GETSUPPORT == 0x80285700
    assert WDIOC_GETBOOTSTATUS == 0x80045702
    assert WDIOC_SETTIMEOUT == 0xC0045706
    assert WDIOC_GETTIMEOUT == 0x80045707


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A FIFO standing in for the device, and the test's reading end of it."""
    path = tmp_path / "watchdog"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        yield path, reader
    finally:
        os.close(reader)


def drain(fd: int) -> bytes:
    out = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            out += chunk
    return out


def test_pets_and_magic_close_reach_the_device(fifo: tuple[Path, int]) -> None:
    path, reader = fifo
    wd = Watchdog(path, timeout_s=15)
    assert wd.open()
    # Not a watchdog driver: the ioctls are refused, and that is not fatal.
    assert wd.boot_status is None and not wd.reset_by_watchdog
    assert wd.timeout_s == 15 and wd.pet_interval_s == 5
    wd.pet()
    wd.pet()
    assert drain(reader) == b"..."  # one pet at open, two more
    wd.close()
    assert drain(reader) == b"V"
    assert not wd.active
    wd.pet()  # closed: nothing happens
    assert drain(reader) == b""
    st = wd.status()
    assert st["pets"] == 3 and st["pet_failures"] == 0 and st["active"] is False


def test_crash_close_leaves_the_watchdog_armed(tmp_path: Path) -> None:
    path = tmp_path / "watchdog"
    path.write_bytes(b"")
    wd = Watchdog(path)
    assert wd.open()
    wd.close(disarm=False)
    assert path.read_bytes() == b"."  # no 'V': the timer runs on


def test_absent_device_is_one_clear_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sdwan.appliance.watchdog")
    wd = Watchdog(tmp_path / "nowatchdog")
    assert not wd.open()
    wd.pet()
    wd.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"no watchdog device at {tmp_path}/nowatchdog: running without a"
                     " hardware watchdog"]
    assert wd.status()["problem"] == f"no watchdog device at {tmp_path}/nowatchdog"


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="1..3600"):
        Watchdog("/dev/null", timeout_s=0)
    with pytest.raises(ValueError, match="start-up timeout must be 1..3600"):
        Watchdog("/dev/null", timeout_s=15, startup_timeout_s=4000)
    with pytest.raises(ValueError, match=r"start-up timeout \(10 s\) is shorter"):
        Watchdog("/dev/null", timeout_s=15, startup_timeout_s=10)


def test_start_up_timeout_until_the_loop_runs_then_the_running_one(
    fifo: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    path, reader = fifo
    caplog.set_level(logging.INFO, "sdwan.appliance.watchdog")

    async def scenario() -> tuple[int, float, int, float, int]:
        wd = Watchdog(path, timeout_s=3, startup_timeout_s=300)
        assert wd.open()
        armed = (wd.timeout_s, wd.pet_interval_s, wd.status()["timeout_s"])
        assert armed == (300, 100.0, 300) and wd.starting
        # A slow start-up: nobody pets, and the long timeout is what allows it.
        time.sleep(0.5)
        assert drain(reader) == b"."  # the pet at open only
        task = asyncio.create_task(wd.run())
        await asyncio.sleep(2.3)  # the switch pets once, then every second
        running = (wd.timeout_s, wd.pet_interval_s, len(drain(reader)))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        wd.close()
        return (*running, int(wd.starting), float(wd.status()["pets"]))

    timeout, interval, pets, starting, total = asyncio.run(scenario())
    assert (timeout, interval, starting) == (3, 1.0, 0)
    assert pets >= 3 and total >= 4
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (f"watchdog {path} armed for the start-up: timeout 300 s, 3 s once"
                        " socketd runs")
    assert lines[1].startswith(f"watchdog {path} armed: timeout 3 s, petting every 1.0 s (")


def test_without_a_longer_start_up_it_is_armed_as_before(fifo: tuple[Path, int]) -> None:
    path, reader = fifo
    wd = Watchdog(path, timeout_s=15)
    assert wd.open()
    assert not wd.starting and wd.timeout_s == 15
    wd.end_startup()  # nothing to switch
    assert wd.timeout_s == 15 and drain(reader) == b"."
    wd.close()


class DriverModel(Watchdog):
    """The int ioctls answered the way the kernel's watchdog core (drivers/watchdog/
    watchdog_dev.c) answers them for a driver with these limits: WDIOC_SETTIMEOUT outside
    min..max is EINVAL and changes nothing, a driver may round what it takes, GETTIMEOUT says
    what is in force, and without WDIOF_SETTIMEOUT the core says EOPNOTSUPP. No watchdog
    driver can be loaded on this machine; the real i6300esb and softdog are the system
    tests'. The device itself is a real file (the pets land in it)."""

    def __init__(self, path: Path, *, min_s: int = 1, max_s: int = 65535, default_s: int = 30,
                 step_s: int = 1, settable: bool = True, **kw: int) -> None:
        super().__init__(path, **kw)
        self.limits = (min_s, max_s, step_s, settable)
        self.in_force = default_s
        self.set_calls: list[int] = []

    def _ioctl_int(self, request: int, value: int) -> int:
        min_s, max_s, step_s, settable = self.limits
        if request == WDIOC_SETTIMEOUT:
            self.set_calls.append(value)
            if not settable:
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            if not min_s <= value <= max_s:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            self.in_force = -(-value // step_s) * step_s
            return self.in_force
        if request == WDIOC_GETTIMEOUT:
            return self.in_force
        if request == WDIOC_GETBOOTSTATUS:
            return 0
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))


def test_a_driver_that_takes_the_start_up_timeout(tmp_path: Path) -> None:
    (tmp_path / "wd").write_bytes(b"")
    # i6300esb: 1..2046 s
    wd = DriverModel(tmp_path / "wd", max_s=2046, timeout_s=15, startup_timeout_s=300)
    assert wd.open() and wd.timeout_s == 300 and wd.in_force == 300
    wd.end_startup()
    assert wd.timeout_s == 15 and wd.in_force == 15 and wd.set_calls == [300, 15]
    assert (tmp_path / "wd").read_bytes() == b".."  # at open, at the switch
    wd.close()


def test_a_driver_that_caps_the_timeout_gets_its_longest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sdwan.appliance.watchdog")
    (tmp_path / "wd").write_bytes(b"")
    wd = DriverModel(tmp_path / "wd", max_s=127, timeout_s=15, startup_timeout_s=300)
    assert wd.open()
    assert wd.timeout_s == 127 and wd.in_force == 127
    assert len(wd.set_calls) < 12  # a binary search, not a walk
    assert (f"watchdog {tmp_path}/wd refuses a timeout of 300 s: using 127 s, the longest it"
            " takes") in caplog.messages
    wd.end_startup()
    assert wd.timeout_s == 15 and wd.in_force == 15
    wd.close()


def test_a_rounding_driver_is_petted_for_what_it_took(tmp_path: Path) -> None:
    (tmp_path / "wd").write_bytes(b"")
    # Counts in 4 s steps up to 60 s: 300 is refused, 15 becomes 16.
    wd = DriverModel(tmp_path / "wd", max_s=60, step_s=4, timeout_s=15, startup_timeout_s=300)
    assert wd.open() and wd.timeout_s == 60
    wd.end_startup()
    assert wd.timeout_s == 16 and wd.pet_interval_s == pytest.approx(16 / 3)
    wd.close()


def test_a_driver_with_a_floor_gets_its_shortest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sdwan.appliance.watchdog")
    (tmp_path / "wd").write_bytes(b"")
    wd = DriverModel(tmp_path / "wd", min_s=20, default_s=60, timeout_s=15, startup_timeout_s=300)
    assert wd.open() and wd.timeout_s == 300
    wd.end_startup()
    assert wd.timeout_s == 20 and wd.in_force == 20
    assert (f"watchdog {tmp_path}/wd refuses a timeout of 15 s: using 20 s, the shortest it"
            " takes") in caplog.messages
    wd.close()


def test_a_driver_with_a_fixed_timeout_is_petted_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sdwan.appliance.watchdog")
    (tmp_path / "wd").write_bytes(b"")
    wd = DriverModel(tmp_path / "wd", settable=False, default_s=40, timeout_s=15,
                     startup_timeout_s=300)
    assert wd.open() and wd.timeout_s == 40
    assert (f"watchdog {tmp_path}/wd keeps its timeout of 40 s (asked for 300 s)"
            in caplog.messages)
    wd.end_startup()
    assert wd.timeout_s == 40 and wd.pet_interval_s == pytest.approx(40 / 3)
    wd.close()


def test_a_crash_leaves_the_start_up_timeout_for_the_next_socketd(tmp_path: Path) -> None:
    (tmp_path / "wd").write_bytes(b"")
    wd = DriverModel(tmp_path / "wd", max_s=2046, timeout_s=15, startup_timeout_s=300)
    assert wd.open()
    wd.end_startup()
    wd.close(disarm=False, grace=True)
    assert wd.in_force == 300 and wd.set_calls == [300, 15, 300]
    assert (tmp_path / "wd").read_bytes() == b"..."  # petted, never 'V'


def test_pets_come_from_the_loop_and_stop_when_it_hangs(fifo: tuple[Path, int]) -> None:
    path, reader = fifo

    async def scenario() -> tuple[int, int, int]:
        wd = Watchdog(path, timeout_s=1)  # pets every 1/3 s
        assert wd.open()
        task = asyncio.create_task(wd.run())
        await asyncio.sleep(1.2)
        running = len(drain(reader))
        time.sleep(1.2)  # the loop hangs: nobody pets
        hung = len(drain(reader))
        await asyncio.sleep(0.8)  # the loop runs again and so do the pets
        after = len(drain(reader))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        wd.close()
        return running, hung, after

    running, hung, after = asyncio.run(scenario())
    assert running >= 3  # the pet at open and at least two from the task
    assert hung <= 1  # at most one that was due as the hang began
    assert after >= 2


def test_unhealthy_supervisor_stops_petting(fifo: tuple[Path, int]) -> None:
    path, reader = fifo

    async def scenario() -> int:
        wd = Watchdog(path, timeout_s=1)
        assert wd.open()
        drain(reader)
        task = asyncio.create_task(wd.run(alive=lambda: False))
        await asyncio.sleep(1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        wd.close(disarm=False)
        return len(drain(reader))

    assert asyncio.run(scenario()) == 0


# --------------------------------------------------------------------------- start history


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data") as s:
        yield s


def kinds(store: Store) -> list[str]:
    return [e.kind for e in reversed(store.events(limit=1000))]


def start(store: Store, data: Path, now: float, boot: str = "boot-a", **kw: object):
    return record_start(store, data, now=now, this_boot=boot, pid=int(now) + 100,
                        version="1.0", **kw)  # type: ignore[arg-type]


def test_first_start_then_clean_stop(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "data"
    rec = start(store, data, 10.0)
    assert rec.previous == "first start" and not rec.crash_loop and rec.error_until is None
    end_run(data)
    rec = start(store, data, 20.0)
    assert rec.previous == "stopped"
    assert kinds(store) == [EVENT_START, EVENT_START]
    assert store.events(limit=1)[0].text == "socketd 1.0 started (previous run: stopped)"


def test_crash_is_told_apart_from_a_failed_start(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "data"
    start(store, data, 10.0)
    rec = start(store, data, 20.0)  # no end_run: the first one crashed
    assert rec.previous == "crashed"
    unclean = store.events(limit=1, kind=EVENT_UNCLEAN)[0]
    assert unclean.text == (
        "socketd (pid 110) ended without stopping cleanly (crash, kill or out of memory)"
    )
    end_run(data, "start failed: cannot open tunnel device sdwan0")
    rec = start(store, data, 30.0)
    assert rec.previous == "start failed: cannot open tunnel device sdwan0"
    assert len(store.events(kind=EVENT_UNCLEAN)) == 1


def test_crash_loop_is_found_once_and_ends(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for t in (0.0, 10.0, 20.0, 30.0):
        assert not start(store, data, t).crash_loop
    rec = start(store, data, 40.0)
    assert rec.crash_loop and rec.starts_in_window == 5
    assert rec.in_error(41.0) and rec.in_error(159.0) and not rec.in_error(160.0)
    (loop,) = store.events(kind=EVENT_CRASH_LOOP)
    assert loop.text == (
        "socketd started 5 times in 2 min (the runs before ended: 4 crashed);"
        " LEDs show the error pattern"
    )
    assert loop.data is not None and loop.data["starts"] == 5
    # Still looping: no second event for the same loop.
    assert start(store, data, 50.0).crash_loop
    assert len(store.events(kind=EVENT_CRASH_LOOP)) == 1
    # Starts spread out further than the window are no loop.
    end_run(data)
    assert not start(store, data, 400.0).crash_loop


def test_loop_counts_only_this_boot(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for t in (0.0, 1.0, 2.0, 3.0):
        start(store, data, t, boot="boot-a")
    # A new boot: boot times restart near zero but the old starts are not this boot's.
    rec = start(store, data, 4.0, boot="boot-b")
    assert not rec.crash_loop and rec.starts_in_window == 1
    assert rec.previous == "unclean boot"
    text = store.events(limit=1, kind=EVENT_UNCLEAN)[0].text
    assert text == ("the previous boot ended while socketd (pid 103) was running"
                    " (power cut, reset or watchdog)")


def test_watchdog_reset_is_recorded_once_per_boot(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "data"
    start(store, data, 5.0, boot="boot-a")
    rec = start(store, data, 3.0, boot="boot-b", watchdog_reset=True)
    assert rec.previous == "unclean boot"
    (ev,) = store.events(kind=EVENT_WATCHDOG_RESET)
    assert ev.text == (
        "rebooted by the watchdog: the supervisor stopped petting it (socketd pid 105 was running)"
    )
    # The boot status says so for the whole boot; a socketd restart does not repeat it.
    start(store, data, 9.0, boot="boot-b", watchdog_reset=True)
    assert len(store.events(kind=EVENT_WATCHDOG_RESET)) == 1


def test_without_a_store_the_run_file_still_works(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rec = record_start(None, data, now=1.0, this_boot="b", pid=7)
    assert rec.previous == "first start"
    assert (data / RUN_FILE).is_file()
    assert record_start(None, data, now=2.0, this_boot="b", pid=8).previous == "crashed"


CRASHER = """
import os, signal, sys
from pathlib import Path
from sdwan.common.store import Store
from sdwan.appliance.watchdog import record_start
data = Path(sys.argv[1])
with Store(data) as store:
    rec = record_start(store, data, starts=4, window_s=60)
print("loop" if rec.crash_loop else "ok", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_real_processes_killed_in_a_row_make_a_crash_loop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    results = []
    for _ in range(5):
        proc = subprocess.run(
            [sys.executable, "-c", CRASHER, str(data)], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        results.append(proc.stdout.strip())
    assert results == ["ok", "ok", "ok", "loop", "loop"]
    with Store(data) as store:
        (loop,) = store.events(kind=EVENT_CRASH_LOOP)
        assert loop.text.startswith("socketd started 4 times in 1 min (the runs before ended:"
                                    " 3 crashed)")
        assert len(store.events(kind=EVENT_UNCLEAN)) == 4
