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
from sdwan.site.fpwatch import EVENT_DIED, EVENT_FAILED, EVENT_RESTARTED, FastPathWatch


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
