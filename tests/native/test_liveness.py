"""Liveness under traffic (fp_liveness_scan): a peer that does not answer our data is
reported silent, anything authenticated from it clears that, and a peer owed an answer to
its data gets a keepalive, once."""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from collections.abc import Iterator

import pytest
from fphelpers import B_ADDR, LINK, Pair, ip_packet

from sdwan.bindings.fastpath import FastPathError, Verdict


def b_to_a(pair: Pair) -> bytes:
    r = pair.b.process_outbound(ip_packet("10.2.0.7", "10.1.0.5"))
    assert r.verdict == Verdict.SEND
    return r.data


def test_unanswered_data_makes_a_peer_silent_until_it_answers(pair: Pair) -> None:
    assert pair.a.liveness_scan(10, 0) == []  # nothing sent yet
    pair.a_to_b()
    time.sleep(0.02)
    assert pair.a.liveness_scan(10, 0.01) == [2]
    time.sleep(1.05)  # then again by each once-a-second pass, until it answers
    assert pair.a.liveness_scan(10, 0.01) == [2]
    assert pair.a.liveness_scan(10, 5) == []  # not silent that long
    assert pair.a.process_inbound(LINK, B_ADDR, b_to_a(pair)).verdict == Verdict.TUN
    assert pair.a.liveness_scan(10, 0) == []
    # A forged packet answers nothing.
    pair.a_to_b()
    time.sleep(0.02)
    bad = bytearray(b_to_a(pair))
    bad[-1] ^= 1
    assert pair.a.process_inbound(LINK, B_ADDR, bytes(bad)).verdict == Verdict.DROP
    assert pair.a.liveness_scan(10, 0.01) == [2]


def test_the_scan_writes_at_most_cap_ids(pair: Pair) -> None:
    pair.a_to_b()
    assert pair.a.liveness_scan(10, 0, cap=0) == []


@pytest.fixture
def rx() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    yield s
    s.close()


def test_a_peer_owed_an_answer_gets_one_keepalive(pair: Pair, rx: socket.socket) -> None:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    pair.b.link_add(LINK, tx.fileno())
    tx.close()  # the fast path keeps its own duplicate
    pair.b.set_endpoint(1, LINK, rx.getsockname())
    assert pair.b.liveness_scan(0, 10) == []
    rx.setblocking(False)
    with pytest.raises(BlockingIOError):
        rx.recv(100)  # nothing owed, nothing sent
    rx.settimeout(2)
    _, wire = pair.a_to_b()
    # From where B sends to A (an authenticated packet moves the endpoint: roaming).
    assert pair.deliver_b(wire, source=rx.getsockname()).verdict == Verdict.TUN
    assert pair.b.liveness_scan(5, 10) == []  # owed, but not for 5 s yet
    pair.b.liveness_scan(0, 10)
    keepalive = rx.recv(100)
    assert len(keepalive) == 32 and keepalive[0] == 208
    r = pair.a.process_inbound(LINK, B_ADDR, keepalive)
    assert r.verdict == Verdict.KEEPALIVE
    assert pair.a.liveness_scan(10, 0) == []  # the keepalive answered A's data
    pair.b.liveness_scan(0, 10)  # paid: no second keepalive
    rx.setblocking(False)
    with pytest.raises(BlockingIOError):
        rx.recv(100)


def test_new_keys_restart_the_clock(pair: Pair) -> None:
    pair.a_to_b()
    assert pair.a.liveness_scan(10, 0) == [2]
    pair.a.key_activate(2, 0x1001, 0x2001)  # make_pair's indices
    assert pair.a.liveness_scan(10, 0) == []


def test_idle_peers_get_keepalives_from_the_scan_once_asked(pair: Pair, rx: socket.socket) -> None:
    """fp_peer_set_keepalive: the scan keeps an idle tunnel alive on its own, once per
    interval of nothing sent (it looks for due peers once a second); a peer without it (or
    with 0) gets none."""
    pass_s = 1.05  # past the scan's keepalive pass
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    pair.b.link_add(LINK, tx.fileno())
    tx.close()
    pair.b.set_endpoint(1, LINK, rx.getsockname())
    rx.setblocking(False)
    pair.b.liveness_scan(10, 10)
    with pytest.raises(BlockingIOError):
        rx.recv(100)  # not asked: none
    pair.b.set_keepalive(1, 0.05)
    time.sleep(pass_s)
    pair.b.liveness_scan(10, 10)  # nothing sent ever: due
    keepalive = rx.recv(100)
    assert len(keepalive) == 32
    assert pair.a.process_inbound(LINK, B_ADDR, keepalive).verdict == Verdict.KEEPALIVE
    pair.b.liveness_scan(10, 10)
    with pytest.raises(BlockingIOError):
        rx.recv(100)  # sent just now: not due
    time.sleep(pass_s)
    pair.b.liveness_scan(10, 10)
    assert len(rx.recv(100)) == 32
    pair.b.set_keepalive(1, 0)
    time.sleep(pass_s)
    pair.b.liveness_scan(10, 10)
    with pytest.raises(BlockingIOError):
        rx.recv(100)
    with pytest.raises(FastPathError):
        pair.b.set_keepalive(99, 1)


def test_the_scan_skips_its_walk_while_nothing_can_be_due(pair: Pair) -> None:
    """With no liveness clock running and no keepalive pass due, a scan returns at once;
    a data packet sent since starts a clock, and the next scan walks and sees it."""
    pair.a.liveness_scan(10, 0)  # a full pass: nothing running
    pair.a_to_b()  # unanswered from now on
    time.sleep(0.02)
    assert pair.a.liveness_scan(10, 5) == []  # walked: a clock runs, not silent yet
    assert pair.a.liveness_busy()  # still running: the next scan walks again...
    assert pair.a.liveness_scan(10, 0.01) == [2]  # ...and sees it silent


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_clock_starting_after_a_quiet_scan_wakes_the_supervisor_once(pair: Pair) -> None:
    """socketd ticks rarely while no liveness clock runs: the first data packet after a scan
    that found none running makes the wake fd readable (once, until a scan finds none
    running again), and busy says to scan every tick meanwhile."""
    fp = pair.a
    fd = fp.liveness_wake_fd
    fp.liveness_scan(10, 5)
    assert not fp.liveness_busy()
    assert not _readable(fd)
    pair.a_to_b()  # starts the unanswered clock
    assert fp.liveness_busy()
    assert _readable(fd)
    assert os.read(fd, 8) == (1).to_bytes(8, sys.byteorder)
    # Answered, then unanswered again before any scan: no second wake.
    assert fp.process_inbound(LINK, B_ADDR, b_to_a(pair)).verdict == Verdict.TUN
    pair.a_to_b()
    assert not _readable(fd)
    # A scan that still finds a clock running does not re-arm it...
    fp.liveness_scan(10, 5)
    assert fp.liveness_busy()
    pair.a_to_b()
    assert not _readable(fd)
    # ...one that finds none does (new keys stop the clocks): the next start wakes again.
    fp.key_activate(2, 0x1001, 0x2001)  # make_pair's indices
    fp.liveness_scan(10, 5)
    assert not fp.liveness_busy()
    assert not _readable(fd)
    pair.a_to_b()
    assert _readable(fd)


def test_a_peer_that_stopped_answering_does_not_keep_the_scan_busy(pair: Pair) -> None:
    """A silent peer is reported (again by every keepalive pass) but no longer counts as a
    running clock: a dead peer must not keep socketd ticking every 50 ms. Clearing its keys
    stops its clocks."""
    fp = pair.a
    pair.a_to_b()
    assert fp.liveness_busy()
    time.sleep(0.02)
    assert fp.liveness_scan(10, 0.01) == [2]
    assert not fp.liveness_busy()
    # A clock running when the keys go: stopped with them.
    assert fp.process_inbound(LINK, B_ADDR, b_to_a(pair)).verdict == Verdict.TUN
    pair.a_to_b()
    fp.liveness_scan(10, 10)
    assert fp.liveness_busy()
    fp.key_clear(2)
    fp.liveness_scan(10, 10)
    assert not fp.liveness_busy()


def test_the_keepalive_thread_keeps_idle_peers_alive_at_its_own_pace(
    pair: Pair, rx: socket.socket
) -> None:
    """fp_keepalive_thread_start (popd's keepalives): the pass runs every few ms from a C
    thread, not once a second, and each idle interval gets its keepalive; stop joins it."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    pair.b.link_add(LINK, tx.fileno())
    tx.close()
    pair.b.set_endpoint(1, LINK, rx.getsockname())
    pair.b.set_keepalive(1, 0.05)
    pair.b.keepalive_thread_start(0.01)
    try:
        got = []
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            try:
                got.append(rx.recv(100))
            except TimeoutError:
                break
            except BlockingIOError:
                time.sleep(0.005)
    finally:
        pair.b.keepalive_thread_stop()
    assert pair.b.keepalive_thread_passes == 0  # stopped
    # Every 50 ms (plus a pass): several in 0.6 s, where the once-a-second scan sends one.
    assert len(got) >= 5, len(got)
    assert all(pair.a.process_inbound(LINK, B_ADDR, k).verdict == Verdict.KEEPALIVE for k in got)


def test_a_keepalive_not_sent_is_tried_again_at_the_next_pass(
    pair: Pair, rx: socket.socket
) -> None:
    """A keepalive the pass could not send (here: an endpoint the link cannot reach, as a
    full socket buffer would refuse it) is due again at the next pass, not a whole interval
    later: two failures in a row must not make a peer's dead_after of silence."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    pair.b.link_add(LINK, tx.fileno())
    tx.close()
    pair.b.set_endpoint(1, LINK, ("::1", rx.getsockname()[1]))  # not on an IPv4 link
    pair.b.set_keepalive(1, 2.0)
    pair.b.keepalive_thread_start(0.01)
    try:
        time.sleep(0.1)  # every pass fails
        pair.b.set_endpoint(1, LINK, rx.getsockname())
        t0 = time.monotonic()
        rx.settimeout(3.0)
        rx.recv(100)
        took = time.monotonic() - t0
    finally:
        pair.b.keepalive_thread_stop()
    assert took < 1.0, took  # at a next pass, where the interval is two seconds
