"""socketd's watch over the fast path's threads (site/fpwatch.py) against a real fast path
whose threads are made to die (fp_test_thread_fail) or whose device hangs up: the events and
their reasons, restarts, the death budget per window on a driven clock, the LEDs' fault, and
the watchdog held when the fast path is beyond a restart."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdwan.appliance.watchdog import Watchdog
from sdwan.bindings.fastpath import FastPath, ThreadKind, ThreadState
from sdwan.site.fpwatch import (
    EVENT_DIED,
    EVENT_FAILED,
    EVENT_RESTART_FAILED,
    EVENT_RESTARTED,
    FastPathWatch,
)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Events:
    seen: list[tuple[str, str, dict]] = field(default_factory=list)

    def __call__(self, kind: str, text: str, data: dict) -> None:
        self.seen.append((kind, text, data))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.seen]


@dataclass
class Rig:
    fp: FastPath
    tun: socket.socket
    watch: FastPathWatch
    events: Events
    clock: Clock
    failed: list[str]


@pytest.fixture
def rig() -> Iterator[Rig]:
    fp = FastPath()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fp.tun_attach(theirs.fileno())
    theirs.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fp.link_add(7, udp.fileno())
    udp.close()
    fp.start()
    events, clock, failed = Events(), Clock(), []

    def on_failed(why: str) -> str:
        failed.append(why)
        return "no longer petting the watchdog, so the box resets"

    watch = FastPathWatch(fp, on_event=events, link_name={7: "wan1"}.get, clock=clock,
                          on_failed=on_failed)
    try:
        yield Rig(fp, ours, watch, events, clock, failed)
    finally:
        fp.close()
        ours.close()


def _die(rig: Rig, kind: ThreadKind, err: int = errno.EIO) -> None:
    before = rig.fp.thread_deaths()
    rig.fp.test_thread_fail(kind, 7 if kind is ThreadKind.LINK else 0, err)
    deadline = time.monotonic() + 5
    while rig.fp.thread_deaths() == before:
        assert time.monotonic() < deadline, "the thread never died"
        time.sleep(0.005)


def test_nothing_died_nothing_said(rig: Rig) -> None:
    for _ in range(3):
        rig.watch.tick()
    assert rig.events.seen == [] and not rig.watch.fault
    st = rig.watch.status()
    assert [(t["thread"], t["link"], t["state"]) for t in st["threads"]] == [
        ("tun", None, "running"), ("link", "wan1", "running")]
    assert (st["deaths"], st["restarts"], st["failed"]) == (0, 0, None)


def test_a_death_is_recorded_with_its_reason_and_the_thread_restarted(rig: Rig) -> None:
    _die(rig, ThreadKind.LINK, errno.EINVAL)
    rig.watch.tick()
    assert rig.events.kinds() == [EVENT_DIED, EVENT_RESTARTED]
    _, text, data = rig.events.seen[0]
    assert text == "fast path link wan1 thread died: fault injected: Invalid argument (EINVAL)"
    assert (data["thread"], data["link"], data["state"]) == ("link", "wan1", "died")
    assert rig.events.seen[1][1] == (
        "fast path restarted the link wan1 thread after it died"
        " (fault injected: Invalid argument (EINVAL))"
    )
    threads = {t.kind: t for t in rig.fp.threads()}
    assert threads[ThreadKind.LINK].state is ThreadState.RUNNING
    assert threads[ThreadKind.LINK].restarts == 1
    st = rig.watch.status()
    assert (st["deaths"], st["restarts"], st["failed"]) == (1, 1, None)
    assert st["last_death"]["reason"] == "fault injected: Invalid argument (EINVAL)"
    # The LEDs show the fault for a while after the death, then no more.
    assert rig.watch.fault
    rig.clock.now += rig.watch.error_hold_s + 1
    assert not rig.watch.fault
    rig.watch.tick()
    assert len(rig.events.seen) == 2  # nothing new died: nothing new said


def test_threads_that_keep_dying_fail_the_fast_path(rig: Rig) -> None:
    for i in range(3):
        _die(rig, ThreadKind.TUN if i % 2 else ThreadKind.LINK)
        rig.watch.tick()
        rig.clock.now += 10
    assert rig.watch.failed is None and rig.watch.restarts == 3
    # The budget is per window: a fourth death long after the first is restarted.
    rig.clock.now += 60
    _die(rig, ThreadKind.TUN)
    rig.watch.tick()
    assert rig.watch.failed is None and rig.watch.restarts == 4
    for _ in range(3):
        rig.clock.now += 1
        _die(rig, ThreadKind.TUN)
        rig.watch.tick()
    assert rig.watch.failed is not None
    assert rig.watch.failed.startswith("fast path threads died 4 times in 60 s (last: the TUN")
    assert rig.failed == [rig.watch.failed]
    kind, text, _ = rig.events.seen[-1]
    assert kind == EVENT_FAILED
    assert text.endswith("not restarted again; no longer petting the watchdog, so the box resets")
    tun = next(t for t in rig.fp.threads() if t.kind is ThreadKind.TUN)
    assert tun.state is ThreadState.DIED  # left dead: the box resets instead
    assert rig.watch.fault
    rig.clock.now += 3600
    assert rig.watch.fault  # failed holds


def test_a_device_gone_cannot_be_restarted(rig: Rig) -> None:
    rig.tun.close()
    deadline = time.monotonic() + 5
    while rig.fp.thread_deaths() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    rig.watch.tick()
    assert rig.events.kinds() == [EVENT_DIED, EVENT_FAILED]
    assert rig.events.seen[0][1] == (
        "fast path TUN thread died: its device went away: Broken pipe (EPIPE)")
    assert rig.watch.failed == (
        "fast path could not be restarted (the TUN thread: No such device (ENODEV))")
    assert rig.watch.status()["failed"] == rig.watch.failed
    rig.tun = socket.socket()  # for the fixture's close


def test_a_held_watchdog_is_petted_no_more(tmp_path: Path) -> None:
    path = tmp_path / "wd"
    path.write_bytes(b"")
    wd = Watchdog(path, timeout_s=3)
    assert wd.open()
    try:

        async def run() -> None:
            task = asyncio.create_task(wd.run())  # pets every second
            deadline = time.monotonic() + 10
            while wd.pets < 2:
                assert time.monotonic() < deadline, "the loop never petted"
                await asyncio.sleep(0.05)
            wd.hold("the fast path failed: test")
            pets = wd.pets
            await asyncio.sleep(2.5 * wd.pet_interval_s)  # room for two pets, had it gone on
            assert wd.pets == pets
            task.cancel()

        asyncio.run(run())
        assert wd.status()["held"] == "the fast path failed: test"
    finally:
        wd.close()


def test_an_event_sink_that_fails_does_not_keep_a_thread_dead(rig: Rig) -> None:
    calls = []

    def flaky(kind: str, text: str, data: dict) -> None:
        calls.append(kind)
        if len(calls) == 1:
            raise RuntimeError("store is gone")
        rig.events(kind, text, data)

    rig.watch.on_event = flaky
    _die(rig, ThreadKind.LINK)
    rig.watch.tick()
    # The death's event was lost, the restart was not.
    assert calls == [EVENT_DIED, EVENT_RESTARTED]
    link = next(t for t in rig.fp.threads() if t.kind is ThreadKind.LINK)
    assert (link.state, link.restarts) == (ThreadState.RUNNING, 1)
    assert rig.watch.restarts == 1 and rig.watch.failed is None


def test_a_thread_left_dead_by_a_tick_that_raised_is_restarted_by_the_next(rig: Rig) -> None:
    real = rig.fp.threads_restart
    broken = [True]

    def restart() -> int:
        if broken.pop() if broken else False:
            raise RuntimeError("a bug between the look and the restart")
        return real()

    rig.fp.threads_restart = restart  # type: ignore[method-assign]
    _die(rig, ThreadKind.TUN)
    with pytest.raises(RuntimeError):
        rig.watch.tick()
    # The death counter has not moved since: the thread is still looked at, and restarted.
    rig.watch.tick()
    tun = next(t for t in rig.fp.threads() if t.kind is ThreadKind.TUN)
    assert tun.state is ThreadState.RUNNING
    assert rig.events.kinds() == [EVENT_DIED, EVENT_RESTARTED]


def test_a_restart_refused_for_now_is_tried_again(rig: Rig) -> None:
    _die(rig, ThreadKind.LINK)
    # pthread_create refuses the new thread once (EAGAIN), for real in the fast path.
    rig.fp.test_thread_start_fail(ThreadKind.LINK, 7, errno.EAGAIN)
    rig.watch.tick()
    assert rig.watch.failed is None and rig.failed == []
    assert rig.events.kinds() == [EVENT_DIED, EVENT_RESTART_FAILED]
    assert rig.events.seen[1][1] == (
        "fast path could not restart the link wan1 thread: Resource temporarily unavailable"
        " (EAGAIN): trying again")
    link = next(t for t in rig.fp.threads() if t.kind is ThreadKind.LINK)
    assert link.state is ThreadState.DIED
    rig.clock.now += 1
    rig.watch.tick()  # the death counter did not move: the thread is still dead, retried
    link = next(t for t in rig.fp.threads() if t.kind is ThreadKind.LINK)
    assert (link.state, link.restarts) == (ThreadState.RUNNING, 1)
    assert rig.events.kinds() == [EVENT_DIED, EVENT_RESTART_FAILED, EVENT_RESTARTED]
    st = rig.watch.status()
    assert (st["deaths"], st["deaths_in_window"], st["restarts"], st["restart_failures"]) == (
        1, 2, 1, 1)
    # Pruned when read: a window later nothing is in it, without a tick.
    rig.clock.now += 61
    assert rig.watch.status()["deaths_in_window"] == 0


def test_restarts_refused_again_and_again_fail_the_fast_path(rig: Rig) -> None:
    _die(rig, ThreadKind.TUN)
    for i in range(3):
        rig.fp.test_thread_start_fail(ThreadKind.TUN, 0, errno.ENOMEM)
        rig.watch.tick()
        rig.clock.now += 1
        assert (rig.watch.failed is None) == (i < 2), i
    assert rig.watch.failed is not None
    assert rig.watch.failed.startswith(
        "fast path threads died or could not be restarted 4 times in 60 s (last: the TUN thread:"
        " Cannot allocate memory (ENOMEM))")
    assert rig.events.kinds()[-1] == EVENT_FAILED
    # Deaths after the failure still count in status.
    _die(rig, ThreadKind.LINK)
    rig.watch.tick()
    st = rig.watch.status()
    assert (st["deaths"], st["restarts"]) == (2, 0)
    assert st["outcome"] == "no longer petting the watchdog, so the box resets"


def test_a_hold_before_the_loop_runs_gets_no_pet_from_the_end_of_the_start_up(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wd"
    path.write_bytes(b"")
    wd = Watchdog(path, timeout_s=3, startup_timeout_s=30)
    assert wd.open()
    try:
        pets = wd.pets
        wd.hold("the fast path failed: test")
        wd.end_startup()
        assert wd.pets == pets
        assert wd.timeout_s == 30  # setting the running timeout would have petted it too
        wd.pet()
        assert wd.pets == pets
    finally:
        wd.close()
