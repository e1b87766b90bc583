"""Key slots, rekey without loss, and the counter/age limits."""

from __future__ import annotations

import random
import time

import pytest
from fphelpers import Keys, Pair, ip_packet, link_keys, make_pair

from sdwan.bindings.fastpath import CtrlEvent, FastPath, FastPathConfig, FastPathError, Verdict


def _send(pair: Pair, n: int, tag: int) -> list[tuple[bytes, bytes]]:
    return [pair.a_to_b(bytes([tag]) + i.to_bytes(2, "big")) for i in range(n)]


@pytest.mark.parametrize("b_first", [True, False])
def test_rekey_across_slots_loses_nothing(pair: Pair, b_first: bool) -> None:
    before = _send(pair, 50, 1)  # sealed with key 1, delivered after the switch
    pair.deliver_b(before[0][1])
    new = Keys.random()
    pair.a.key_install(2, 0x1002, new.a_tx, new.b_tx)
    pair.b.key_install(1, 0x2002, new.b_tx, new.a_tx)
    during = _send(pair, 20, 2)  # A still on key 1
    if b_first:
        pair.b.key_activate(1, 0x2002, 0x1002)
        pair.a.key_activate(2, 0x1002, 0x2002)
    else:
        pair.a.key_activate(2, 0x1002, 0x2002)
        pair.b.key_activate(1, 0x2002, 0x1002)
    assert pair.a.key_info(2).tx_local_index == 0x1002
    after = _send(pair, 50, 3)  # key 2
    assert after[0][1][4:8] == (0x2002).to_bytes(4, "big")
    late = before[1:] + during + after
    random.Random(3).shuffle(late)
    got = [pair.deliver_b(w) for _, w in late]
    assert all(r.verdict == Verdict.TUN for r in got), [r.drop_reason for r in got]
    assert pair.b.peer_counters(1).rx_packets == 120
    info = pair.a.key_info(2)
    assert info.has_tx and info.slots_used == 2 and info.tx_remote_index == 0x2002
    assert info.tx_counter == 50

    # B -> A also works on the new key in both directions.
    r = pair.b.process_outbound(ip_packet("10.2.0.7", "10.1.0.5"))
    assert pair.a.process_inbound(1, ("192.0.2.2", 4801), r.data).verdict == Verdict.TUN


def test_third_install_evicts_the_oldest_receive_key(pair: Pair) -> None:
    old_wire = pair.a_to_b()[1]
    link_keys(pair.a, pair.b, 1, 2, 0x1002, 0x2002)
    mid_wire = pair.a_to_b()[1]
    link_keys(pair.a, pair.b, 1, 2, 0x1003, 0x2003)
    # Key 1 was evicted from B by the third install; key 2 still receives.
    assert pair.deliver_b(old_wire).drop_reason == "unknown_index"
    assert pair.deliver_b(mid_wire).verdict == Verdict.TUN
    assert pair.b.key_info(1).slots_used == 2


def test_key_clear_and_peer_del(pair: Pair) -> None:
    wire = pair.a_to_b()[1]
    pair.b.key_clear(1)
    assert pair.deliver_b(wire).drop_reason == "unknown_index"
    assert pair.b.key_info(1).slots_used == 0
    pair.a.peer_del(2)
    r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7"))
    assert r.drop_reason == "no_route"  # its routes went with it
    pair.a.peer_add(2)
    pair.a.key_install(2, 0x1001, bytes(32), bytes(32))  # its indices were freed too


def test_activate_unknown_index_fails(pair: Pair) -> None:
    with pytest.raises(FastPathError) as e:
        pair.a.key_activate(2, 0x9999, 1)
    assert e.value.errno == 2


def test_packet_limits_rekey_event_then_expiry() -> None:
    cfg = FastPathConfig(rekey_after_packets=5, reject_after_packets=10)
    pair = make_pair(cfg)
    try:
        for _ in range(5):
            pair.a_to_b()
        assert pair.a.ctrl_recv() is None
        pair.a_to_b()  # counter 5: rekey asked for, still sent
        ev = pair.a.ctrl_recv()
        assert ev is not None and (ev.event, ev.peer_id) == (ev.REKEY, 2)
        for _ in range(4):
            pair.a_to_b()
        assert pair.a.ctrl_recv() is None  # once per key
        for _ in range(3):
            r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7"))
            assert r.drop_reason == "key_expired"
        ev = pair.a.ctrl_recv()
        assert ev is not None and ev.event == ev.KEY_EXPIRED and ev.peer_id == 2
        assert pair.a.ctrl_recv() is None
        assert pair.a.peer_counters(2).drops["key_expired"] == 3
        assert pair.a.key_info(2).tx_counter == 10  # refused packets take no counter
        # A fresh key heals it, and gets its own events.
        link_keys(pair.a, pair.b, 1, 2, 0x1002, 0x2002)
        assert pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7")).verdict == Verdict.SEND
    finally:
        pair.a.close()
        pair.b.close()


def test_receiver_refuses_counters_past_the_limit() -> None:
    pair = make_pair(FastPathConfig(), FastPathConfig(reject_after_packets=100))
    try:
        pair.a.test_set_tx_counter(2, 99)
        assert pair.deliver_b(pair.a_to_b()[1]).verdict == Verdict.TUN
        assert pair.deliver_b(pair.a_to_b()[1]).drop_reason == "key_expired"
    finally:
        pair.a.close()
        pair.b.close()


def test_counter_near_2_64_never_wraps(pair: Pair) -> None:
    limit = FastPathConfig().reject_after_packets
    pair.a.test_set_tx_counter(2, limit - 1)
    assert pair.a_to_b()[1]
    for _ in range(3):
        r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7"))
        assert r.drop_reason == "key_expired"
    assert pair.a.key_info(2).tx_counter == limit


def test_age_limits() -> None:
    cfg = FastPathConfig(rekey_after_seconds=0, reject_after_seconds=3600)
    pair = make_pair(cfg)
    try:
        pair.a_to_b()
        ev = pair.a.ctrl_recv()
        assert ev is not None and ev.event == ev.REKEY
    finally:
        pair.a.close()
        pair.b.close()
    cfg = FastPathConfig(reject_after_seconds=0)
    pair = make_pair(cfg)
    try:
        r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7"))
        assert r.drop_reason == "key_expired"
        assert pair.a.ctrl_recv().event == 3  # type: ignore[union-attr]
    finally:
        pair.a.close()
        pair.b.close()


def test_config_defaults_match_c() -> None:
    assert FastPathConfig.default() == FastPathConfig()
    for bad in (FastPathConfig(batch=0), FastPathConfig(reject_after_packets=(1 << 64) - 1)):
        with pytest.raises(FastPathError) as e:
            FastPath(bad)
        assert e.value.errno == 22


def _poll(what: str, until, bound_s: float = 30.0):
    """until() polled every 50 ms until it returns something true; a generous bound, so a
    loaded machine slows the test down rather than failing it."""
    deadline = time.monotonic() + bound_s
    while True:
        got = until()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {bound_s} s"
        time.sleep(0.05)


def test_per_peer_key_lifetime_replaces_the_config_limits() -> None:
    # Shorter than the config's (600 s / 900 s): a rekey asked for at 1 s, the key refused at
    # 2 s, sealing and opening alike.
    pair = make_pair(FastPathConfig())
    try:
        pair.a.set_key_lifetime(2, 1, 2)
        pair.b.set_key_lifetime(1, 1, 2)
        wires = [pair.a_to_b()[1] for _ in range(400)]  # sealed while young
        assert pair.a.ctrl_recv() is None  # young key: nothing asked
        events: list[int] = []

        def a_refuses() -> object:
            r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7"))
            while (ev := pair.a.ctrl_recv()) is not None:
                events.append(ev.event)
            return r.drop_reason == "key_expired"

        _poll("A refuses its aged key", a_refuses)
        assert events[:2] == [CtrlEvent.REKEY, CtrlEvent.KEY_EXPIRED], events
        # The receiver refuses the same key at the same agreed age (one fresh wire a poll:
        # a delivered one would be a replay).
        fresh = iter(wires)
        _poll("B refuses the aged key",
              lambda: pair.deliver_b(next(fresh)).drop_reason == "key_expired")
        # 0, 0: back to the config's limits (600 s / 900 s): the key works again.
        pair.a.set_key_lifetime(2, 0, 0)
        assert pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7")).verdict == Verdict.SEND
        for bad, errno in (((2, 100, 50), 22), ((99, 10, 70), 2)):
            with pytest.raises(FastPathError) as e:
                pair.a.set_key_lifetime(*bad)
            assert e.value.errno == errno
    finally:
        pair.a.close()
        pair.b.close()
    # Longer than the config's: an end that agreed to keep an older peer's keys longer than
    # its own limit (docs/security.md, "Key lifetimes both ends agree on").
    pair = make_pair(FastPathConfig(reject_after_seconds=0))
    try:
        r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7"))
        assert r.drop_reason == "key_expired"
        pair.a.set_key_lifetime(2, 600, 900)
        assert pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7")).verdict == Verdict.SEND
    finally:
        pair.a.close()
        pair.b.close()


def test_a_shorter_lifetime_spares_the_older_key_still_receiving() -> None:
    """A rekey installs a new key, then the peer's `key` brings a shorter agreed limit: it
    applies to the new key, not to the old one still receiving what was sent before the
    switch (which would otherwise be refused at once)."""
    pair = make_pair(FastPathConfig())
    try:
        old_wires = [pair.a_to_b()[1] for _ in range(10)]  # the old key, in flight
        link_keys(pair.a, pair.b, 1, 2, 0x1002, 0x2002)  # the rekey: a newer key
        new_wires = [pair.a_to_b()[1] for _ in range(400)]
        pair.b.set_key_lifetime(1, 1, 1)  # the shrink: the newest key only
        fresh = iter(new_wires)
        _poll("B refuses the newer key at 1 s",
              lambda: pair.deliver_b(next(fresh)).drop_reason == "key_expired")
        got = [pair.deliver_b(w) for w in old_wires]
        assert all(r.verdict == Verdict.TUN for r in got), [r.drop_reason for r in got]
        # A longer limit applies to both.
        pair.b.set_key_lifetime(1, 0, 0)
        assert pair.deliver_b(next(fresh)).verdict == Verdict.TUN
    finally:
        pair.a.close()
        pair.b.close()
