"""The control lanes (native/src/ctrlgate.c): known sources in a lane of their own, unknown
ones through a token bucket per source IP and one for all of them, into a bounded lane."""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Iterator

import pytest

from sdwan.bindings.fastpath import (
    CTRL_KNOWN_MAX,
    LANE_KNOWN,
    LANE_UNKNOWN,
    FastPath,
    FastPathConfig,
    FastPathError,
    Verdict,
)

LINK = 1
HELLO = b"\x16\xfe\xfd" + bytes(40)
PEER = ("198.51.100.2", 4500)
PEER2 = ("198.51.100.3", 4500)


def make(**kw: int) -> FastPath:
    cfg = FastPathConfig.default()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return FastPath(cfg)


@pytest.fixture
def fp() -> Iterator[FastPath]:
    f = make(ctrl_source_pps=1, ctrl_source_burst=5, ctrl_unknown_pps=1, ctrl_unknown_burst=50)
    f.peer_add(1)
    f.set_endpoint(1, LINK, PEER)
    try:
        yield f
    finally:
        f.close()


def send(fp: FastPath, src: tuple[str, int], data: bytes = HELLO) -> str | None:
    r = fp.process_inbound(LINK, src, data)
    return None if r.verdict == Verdict.CONTROL else r.drop_reason


def drain(fp: FastPath, lane: int | None = None) -> list[tuple[str, int] | None]:
    out = []
    while (ev := fp.ctrl_recv(lane)) is not None:
        out.append(ev.addr)
    return out


def test_a_peer_endpoint_takes_the_known_lane_and_comes_first(fp: FastPath) -> None:
    assert send(fp, ("203.0.113.7", 1000)) is None
    assert send(fp, PEER) is None
    st = fp.ctrl_stats()
    assert (st.known_len, st.unknown_len) == (1, 1)
    assert drain(fp) == [PEER, ("203.0.113.7", 1000)]
    assert fp.ctrl_stats().known_addrs == 1


def test_one_unknown_source_is_limited_to_its_bucket_others_are_not(fp: FastPath) -> None:
    got = [send(fp, ("203.0.113.7", 1000 + i)) for i in range(20)]
    # The bucket is per source IP: other ports of it share it.
    assert got[:5] == [None] * 5
    assert set(got[5:]) == {"ctrl_rate_limited"}
    assert send(fp, ("203.0.113.8", 1000)) is None
    assert send(fp, PEER) is None
    st = fp.ctrl_stats()
    assert st.rate_limited_source == 15 and st.rate_limited_global == 0
    assert st.sources == 2
    assert fp.global_counters().drops["ctrl_rate_limited"] == 15


def test_spoofed_random_sources_meet_the_budget_of_all_unknown_known_ones_pass(
    fp: FastPath,
) -> None:
    got = [send(fp, (f"10.{i >> 8 & 255}.{i & 255}.1", 999)) for i in range(300)]
    assert got.count(None) == 50
    assert fp.ctrl_stats().rate_limited_global == 250
    # The known lane is never metered.
    assert all(send(fp, PEER) is None for _ in range(500))
    assert fp.ctrl_stats().known_queued == 500


def test_a_full_unknown_lane_never_takes_the_known_lanes_room() -> None:
    f = make(
        ctrl_queue_len=8, ctrl_unknown_queue_len=4, ctrl_source_pps=1000, ctrl_source_burst=1000
    )
    try:
        f.peer_add(1)
        f.set_endpoint(1, LINK, PEER)
        f.peer_add(2)
        f.set_endpoint(2, LINK, PEER2)
        got = [send(f, ("203.0.113.9", 5)) for _ in range(10)]
        assert got == [None] * 4 + ["ctrl_unknown_full"] * 6
        # Each known source IP holds at most half of the known lane.
        assert [send(f, PEER) for _ in range(4)] == [None] * 4
        assert [send(f, PEER2) for _ in range(5)] == [None] * 4 + ["queue_full"]
        st = f.ctrl_stats()
        assert (st.unknown_full, st.known_full) == (6, 1)
        assert f.global_counters().drops["ctrl_unknown_full"] == 6
        # Each lane drains on its own; the fd stays readable until both are empty.
        assert len(drain(f, LANE_UNKNOWN)) == 4
        assert len(drain(f, LANE_KNOWN)) == 8
    finally:
        f.close()


def test_declared_addresses_are_known_port_zero_for_every_port(fp: FastPath) -> None:
    fp.ctrl_known_set([("203.0.113.50", 3478), ("2001:db8::5", 0)])
    assert [send(fp, ("203.0.113.50", 3478)) for _ in range(30)] == [None] * 30
    assert [send(fp, ("2001:db8::5", 1 + i)) for i in range(30)] == [None] * 30
    # Another port of an exactly declared address is not.
    assert [send(fp, ("203.0.113.50", 3479)) for _ in range(6)][-1] == "ctrl_rate_limited"
    st = fp.ctrl_stats()
    assert st.known_queued == 60 and st.declared == 2 and st.known_addrs == 3
    # A new set replaces the old.
    fp.ctrl_known_set([])
    assert [send(fp, ("2001:db8::5", 7)) for _ in range(6)][-1] == "ctrl_rate_limited"
    assert fp.ctrl_stats().declared == 0


def test_known_set_refuses_bad_input(fp: FastPath) -> None:
    with pytest.raises(FastPathError) as e:
        fp.ctrl_known_set([("192.0.2.1", 1)] * (CTRL_KNOWN_MAX + 1))
    assert e.value.errno == errno.E2BIG


def test_endpoint_changes_move_an_address_between_lanes(fp: FastPath) -> None:
    new = ("203.0.113.77", 4500)
    assert [send(fp, new) for _ in range(6)][-1] == "ctrl_rate_limited"
    fp.set_endpoint(1, LINK, new)
    assert [send(fp, new) for _ in range(20)] == [None] * 20
    # The old endpoint is a stranger now.
    assert [send(fp, PEER) for _ in range(6)][-1] == "ctrl_rate_limited"


def test_the_source_table_is_bounded_and_evicts_the_idlest() -> None:
    f = make(
        ctrl_sources=16,
        ctrl_source_pps=1,
        ctrl_source_burst=2,
        ctrl_unknown_pps=100000,
        ctrl_unknown_burst=100000,
    )
    try:
        hot = ("192.0.2.1", 53)
        assert [send(f, hot) for _ in range(3)] == [None, None, "ctrl_rate_limited"]
        for i in range(1000):
            send(f, (f"10.0.{i >> 8}.{i & 255}", 1))
            send(f, hot)  # seen all along: never the idlest, so its empty bucket stays
        st = f.ctrl_stats()
        assert st.sources_cap == 16 and st.sources <= 16
        assert st.evictions >= 1000 - 16
        assert st.rate_limited_source >= 1000
    finally:
        f.close()


def test_buckets_refill_at_their_rate() -> None:
    f = make(ctrl_source_pps=1000, ctrl_source_burst=1)
    try:
        src = ("203.0.113.3", 9)
        assert [send(f, src) for _ in range(2)] == [None, "ctrl_rate_limited"]
        deadline = time.monotonic() + 5
        while send(f, src) is not None:
            assert time.monotonic() < deadline, "the bucket never refilled"
            time.sleep(0.002)
    finally:
        f.close()


@pytest.mark.parametrize(
    "field",
    [
        "ctrl_unknown_queue_len",
        "ctrl_source_pps",
        "ctrl_source_burst",
        "ctrl_unknown_pps",
        "ctrl_unknown_burst",
        "ctrl_sources",
    ],
)
def test_zero_limits_are_refused(field: str) -> None:
    with pytest.raises(FastPathError) as e:
        make(**{field: 0})
    assert e.value.errno == errno.EINVAL


def test_concurrent_datagrams_declarations_and_endpoint_moves(fp: FastPath) -> None:
    """The gate's lock against the peers' and the queue's (the sanitizer build runs this)."""
    stop = threading.Event()

    def flood(base: int) -> None:
        i = 0
        while not stop.is_set():
            send(fp, (f"10.{base}.{i >> 8 & 255}.{i & 255}", 1))
            send(fp, PEER)
            i += 1

    def declare() -> None:
        i = 0
        while not stop.is_set():
            fp.ctrl_known_set([(f"192.0.2.{i & 255}", 0)])
            fp.set_endpoint(1, LINK, ("198.51.100.2", 4500 + (i & 7)))
            i += 1

    def reader() -> None:
        while not stop.is_set():
            fp.ctrl_recv()
            fp.ctrl_stats()

    threads = [threading.Thread(target=flood, args=(b,)) for b in (1, 2)]
    threads += [threading.Thread(target=declare), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    st = fp.ctrl_stats()
    assert st.known_queued > 0 and st.rate_limited > 0


def test_an_ipv6_source_is_limited_per_64_not_per_address(fp: FastPath) -> None:
    # One host picks any address of its /64: they all share one bucket.
    got = [send(fp, (f"2001:db8:1:2::{i + 1:x}", 4500)) for i in range(20)]
    assert got[:5] == [None] * 5
    assert set(got[5:]) == {"ctrl_rate_limited"}
    assert fp.ctrl_stats().sources == 1
    # Another /64 has a bucket of its own.
    assert send(fp, ("2001:db8:1:3::1", 4500)) is None


def test_one_known_source_ip_holds_at_most_half_of_the_known_lane() -> None:
    # A flood under a known source's name (spoofed, or a carrier NAT's address a peer
    # shares) leaves the other known sources their room.
    f = make(ctrl_queue_len=8)
    try:
        f.peer_add(1)
        f.set_endpoint(1, LINK, PEER)
        f.peer_add(2)
        f.set_endpoint(2, LINK, PEER2)
        f.ctrl_known_set([("192.0.2.50", 0)])
        flood = [send(f, ("192.0.2.50", 1000 + i)) for i in range(20)]
        assert flood == [None] * 4 + ["queue_full"] * 16
        assert [send(f, PEER) for _ in range(2)] == [None] * 2
        assert [send(f, PEER2) for _ in range(2)] == [None] * 2
        assert f.ctrl_stats().known_full == 16
        # Taken from the lane, the flooding IP's share is free again.
        assert len(drain(f, LANE_KNOWN)) == 8
        assert [send(f, ("192.0.2.50", 7)) for _ in range(5)] == [None] * 4 + ["queue_full"]
        assert send(f, PEER) is None
    finally:
        f.close()


def test_the_known_lanes_shares_follow_every_source_ip_exactly() -> None:
    # Many known IPs in and out of a small known lane, taken out in random order of lanes:
    # each IP is held to its share exactly (no two IPs ever share a count), whatever
    # entries came and went in the table before.
    rnd = random.Random(7)
    f = make(ctrl_queue_len=16)
    try:
        f.ctrl_known_set([(f"192.0.2.{i}", 0) for i in range(1, 41)])
        queued: list[str] = []
        for _ in range(3000):
            if rnd.random() < 0.55:
                ip = f"192.0.2.{rnd.randint(1, 40)}"
                got = send(f, (ip, 9))
                mine = queued.count(ip)
                want = None if len(queued) < 16 and mine < 8 else "queue_full"
                assert got == want, (ip, mine, len(queued))
                if got is None:
                    queued.append(ip)
            elif queued:
                ev = f.ctrl_recv(LANE_KNOWN)
                assert ev is not None and ev.addr is not None
                assert ev.addr[0] == queued.pop(0)
    finally:
        f.close()
