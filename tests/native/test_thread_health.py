"""A data-path thread that dies says why (fp_threads_status), and fp_threads_restart starts it
again in the same instance, which then forwards with the keys and routes it had. Two fast
paths with socketpairs as their TUN devices and real UDP sockets on 127.0.0.1 as links."""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fphelpers import ip_packet, link_keys
from test_threads import Site, _site

from sdwan.bindings.fastpath import FastPath, FastPathError, ThreadKind, ThreadState

TIMEOUT = 5.0


@pytest.fixture
def sites() -> Iterator[tuple[Site, Site]]:
    a, b = _site(), _site()
    a.fp.peer_add(2)
    b.fp.peer_add(1)
    a.fp.route_set("10.2.0.0/24", 2)
    b.fp.route_set("10.1.0.0/24", 1)
    a.fp.set_endpoint(2, 1, b.addr)
    b.fp.set_endpoint(1, 1, a.addr)
    link_keys(a.fp, b.fp, 1, 2, 0xA1, 0xB1)
    a.fp.start()
    b.fp.start()
    try:
        yield a, b
    finally:
        for s in (a, b):
            s.fp.close()
            s.tun.close()


def _wait(what: str, probe: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError(f"{what}: not within {timeout} s")


def _recv(sock: socket.socket, timeout: float = TIMEOUT) -> bytes | None:
    r, _, _ = select.select([sock], [], [], timeout)
    return sock.recv(65536) if r else None


def _thread(fp: FastPath, kind: ThreadKind) -> Any:
    (t,) = [t for t in fp.threads() if t.kind is kind]
    return t


def test_threads_are_listed_running_and_a_stop_is_no_death(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    threads = a.fp.threads()
    assert [(t.kind, t.link_id, t.state) for t in threads] == [
        (ThreadKind.TUN, None, ThreadState.RUNNING),
        (ThreadKind.LINK, 1, ThreadState.RUNNING),
    ]
    a.fp.stop()
    assert {t.state for t in a.fp.threads()} == {ThreadState.STOPPED}
    assert a.fp.thread_deaths() == 0
    assert all(t.deaths == 0 and t.err == 0 for t in a.fp.threads())
    with pytest.raises(FastPathError) as e:
        a.fp.threads_restart()
    assert e.value.errno == errno.ESRCH


@pytest.mark.parametrize("kind", [ThreadKind.LINK, ThreadKind.TUN])
def test_a_dead_thread_is_reported_and_forwards_again_after_restart(
    sites: tuple[Site, Site], kind: ThreadKind
) -> None:
    a, b = sites
    first = ip_packet("10.1.0.5", "10.2.0.7", b"before")
    a.tun.send(first)
    assert _recv(b.tun) == first
    # b's link thread receives from a; a's TUN thread reads what a's LAN sends.
    victim = b if kind is ThreadKind.LINK else a
    victim.fp.test_thread_fail(kind, 1 if kind is ThreadKind.LINK else 0, errno.EIO)
    _wait("the death counted", lambda: victim.fp.thread_deaths() == 1)
    t = _thread(victim.fp, kind)
    assert (t.state, t.err, t.deaths, t.restarts) == (ThreadState.DIED, errno.EIO, 1, 0)
    assert t.reason == "fault injected: Input/output error (EIO)"
    assert t.died_ns > 0
    other = [x for x in victim.fp.threads() if x.kind is not kind]
    assert [x.state for x in other] == [ThreadState.RUNNING]

    # Nothing forwards through the dead thread: the packet waits in its socket.
    lost = ip_packet("10.1.0.5", "10.2.0.7", b"while dead")
    a.tun.send(lost)
    assert _recv(b.tun, timeout=0.5) is None

    assert victim.fp.threads_restart() == 1
    t = _thread(victim.fp, kind)
    assert (t.state, t.deaths, t.restarts) == (ThreadState.RUNNING, 1, 1)
    # The waiting packet goes through with the keys and route the instance kept, then more.
    assert _recv(b.tun) == lost
    for i in range(20):
        p = ip_packet("10.1.0.5", "10.2.0.7", bytes([i]) * 100)
        a.tun.send(p)
        assert _recv(b.tun) == p
    assert victim.fp.threads_restart() == 0  # nothing dead: nothing to do
    assert victim.fp.thread_deaths() == 1


def test_a_device_that_hung_up_is_a_death_restart_cannot_mend() -> None:
    fp = FastPath()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        fp.tun_attach(theirs.fileno())
        theirs.close()
        fp.start()
        ours.close()  # the other end of the "device" hangs up, for good
        _wait("the TUN thread's death", lambda: fp.thread_deaths() == 1)
        t = _thread(fp, ThreadKind.TUN)
        assert (t.state, t.err) == (ThreadState.DIED, errno.EPIPE)
        assert t.reason == "its device went away: Broken pipe (EPIPE)"
        with pytest.raises(FastPathError) as e:
            fp.threads_restart()
        assert e.value.errno == errno.ENODEV
        t = _thread(fp, ThreadKind.TUN)
        assert (t.state, t.restarts, fp.thread_deaths()) == (ThreadState.DIED, 0, 1)
    finally:
        fp.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and ip to create and delete a TUN device",
)
def test_a_deleted_tun_device_is_a_death_restart_cannot_mend() -> None:
    name = f"fpgone{os.getpid() % 10000}"
    fp = FastPath()
    try:
        fp.tun_open(name)
        fp.start()
        subprocess.run(["ip", "link", "del", name], check=True)
        _wait("the TUN thread's death", lambda: fp.thread_deaths() == 1)
        t = _thread(fp, ThreadKind.TUN)
        assert (t.state, t.err) == (ThreadState.DIED, errno.ENODEV)
        assert t.reason == "its device went away: No such device (ENODEV)"
        with pytest.raises(FastPathError) as e:
            fp.threads_restart()
        assert e.value.errno == errno.ENODEV
    finally:
        fp.close()


def test_link_del_and_stop_after_a_death(sites: tuple[Site, Site]) -> None:
    _, b = sites
    b.fp.test_thread_fail(ThreadKind.LINK, 1, errno.ENOMEM)
    _wait("the death counted", lambda: b.fp.thread_deaths() == 1)
    b.fp.link_del(1)  # joins the dead thread
    assert [t.kind for t in b.fp.threads()] == [ThreadKind.TUN]
    assert b.fp.thread_deaths() == 1
    b.fp.stop()
    assert _thread(b.fp, ThreadKind.TUN).state is ThreadState.STOPPED


def test_fault_injection_refuses_what_is_not_running(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    for kind, link, err, want in [
        (ThreadKind.LINK, 9, errno.EIO, errno.ENOENT),
        (ThreadKind.TUN, 0, 0, errno.EINVAL),
        (ThreadKind.TUN, 0, 5000, errno.EINVAL),
    ]:
        with pytest.raises(FastPathError) as e:
            a.fp.test_thread_fail(kind, link, err)
        assert e.value.errno == want
    a.fp.stop()
    with pytest.raises(FastPathError) as e:
        a.fp.test_thread_fail(ThreadKind.TUN, 0, errno.EIO)
    assert e.value.errno == errno.ENOENT


def test_a_restart_refused_for_now_leaves_the_thread_dead_for_the_next_try(
    sites: tuple[Site, Site]
) -> None:
    """pthread_create refusing a thread (EAGAIN) is no final answer: the thread stays DIED and
    the next fp_threads_restart starts it."""
    a, b = sites
    b.fp.test_thread_fail(ThreadKind.LINK, 1, errno.EIO)
    _wait("the death counted", lambda: b.fp.thread_deaths() == 1)
    b.fp.test_thread_start_fail(ThreadKind.LINK, 1, errno.EAGAIN)
    with pytest.raises(FastPathError) as e:
        b.fp.threads_restart()
    assert e.value.errno == errno.EAGAIN
    t = _thread(b.fp, ThreadKind.LINK)
    assert (t.state, t.restarts) == (ThreadState.DIED, 0)  # left dead, for the next try
    assert b.fp.threads_restart() == 1
    t = _thread(b.fp, ThreadKind.LINK)
    assert (t.state, t.restarts) == (ThreadState.RUNNING, 1)
    # The new thread forwards: a packet from a's LAN reaches b's.
    pkt = ip_packet("10.1.0.5", "10.2.0.7", b"after the restart")
    a.tun.send(pkt)
    assert _recv(b.tun) == pkt
    time.sleep(0.2)
    assert _thread(b.fp, ThreadKind.LINK).state is ThreadState.RUNNING


def test_a_stop_with_an_injection_pending_is_no_death(sites: tuple[Site, Site]) -> None:
    _, b = sites
    for _ in range(20):
        before = b.fp.thread_deaths()
        b.fp.test_thread_fail(ThreadKind.LINK, 1, errno.EIO)
        b.fp.stop()  # may come before the thread has read its wake-up
        b.fp.start()  # starts every thread afresh, a dead one too
        assert _thread(b.fp, ThreadKind.LINK).state is ThreadState.RUNNING
        # A death here means the thread read the injection before the stop: try again.
        if b.fp.thread_deaths() == before:
            break
    else:
        pytest.fail("a stop with an injection pending counted as a death, 20 times in a row")
    time.sleep(0.2)
    # The wake-up the stopped thread left unread does not stop its successor either.
    assert b.fp.thread_deaths() == before
    assert _thread(b.fp, ThreadKind.LINK).state is ThreadState.RUNNING
