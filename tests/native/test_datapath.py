"""One packet at a time: round trips, keepalives, counters, and every drop reason on rx."""

from __future__ import annotations

import random
import struct

import pytest
from fphelpers import A_ADDR, B_ADDR, LINK, Pair, ip_packet

from sdwan.bindings.fastpath import MAX_INNER, OVERHEAD, REPLAY_WINDOW, FastPathError, Verdict


def test_round_trip_ipv4_and_counters(pair: Pair) -> None:
    inner, wire = pair.a_to_b(b"hello")
    r = pair.a.process_outbound(inner)
    assert (r.peer_id, r.link_id, r.to) == (2, LINK, B_ADDR)
    got = pair.deliver_b(wire)
    assert got.verdict == Verdict.TUN
    assert got.peer_id == 1
    assert got.data == inner
    ca, cb = pair.a.peer_counters(2), pair.b.peer_counters(1)
    assert ca.tx_packets == 2 and ca.tx_bytes == 2 * len(inner) and ca.last_tx_ns > 0
    assert cb.rx_packets == 1 and cb.rx_bytes == len(inner) and cb.last_rx_ns > 0
    assert not any(cb.drops.values())
    assert pair.a.global_counters().rx_packets == 2


def test_round_trip_ipv6_and_largest_packet(pair: Pair) -> None:
    pair.a.route_set("fd00:2::/48", 2)
    for size in (0, 1, 1400, MAX_INNER - 40):
        inner = ip_packet("fd00:1::1", "fd00:2::5", bytes(random.randbytes(size)))
        r = pair.a.process_outbound(inner)
        assert r.verdict == Verdict.SEND
        assert len(r.data) == len(inner) + OVERHEAD
        assert pair.deliver_b(r.data).data == inner


def test_keepalive_verdict(pair: Pair) -> None:
    # A keepalive is an empty plaintext; the wrapper builds one through send_keepalive in
    # thread tests, here the wire format is made with the other side's key directly.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = struct.pack("!B3xIQ", 208, 0x2001, 5)
    wire = header + AESGCM(pair.keys.a_tx).encrypt(bytes(4) + struct.pack("!Q", 5), b"", header)
    r = pair.deliver_b(wire)
    assert r.verdict == Verdict.KEEPALIVE and r.peer_id == 1 and r.data == b""
    assert pair.b.peer_counters(1).rx_packets == 1


def test_outbound_drops(pair: Pair) -> None:
    r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.9.9.9"))
    assert (r.verdict, r.drop_reason) == (Verdict.DROP, "no_route")
    r = pair.a.process_outbound(b"\x00" * 40)
    assert r.drop_reason == "malformed"
    r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.2.0.1", bytes(MAX_INNER)))
    assert r.drop_reason == "malformed"
    g = pair.a.global_counters()
    assert g.drops["no_route"] == 1 and g.drops["malformed"] == 2
    pair.a.peer_add(3)
    pair.a.route_set("10.3.0.0/16", 3)
    assert pair.a.process_outbound(ip_packet("10.1.0.5", "10.3.0.1")).drop_reason == "no_key"
    pair.a.key_install(3, 77, bytes(32), bytes(32))
    pair.a.key_activate(3, 77, 78)
    r = pair.a.process_outbound(ip_packet("10.1.0.5", "10.3.0.1"))
    assert r.drop_reason == "no_endpoint"
    assert pair.a.peer_counters(3).drops["no_key"] == 1


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        (-1, "bad_tag"),  # last byte of the tag
        (-16, "bad_tag"),  # first byte of the tag
        (20, "bad_tag"),  # ciphertext
        (15, "bad_tag"),  # counter: authenticated as AAD and the nonce
        (8, "bad_tag"),
        (2, "malformed"),  # reserved bytes must be zero
        (7, "unknown_index"),
    ],
)
def test_tampered_packets_are_dropped(pair: Pair, where: int, reason: str) -> None:
    _inner, wire = pair.a_to_b()
    r = pair.deliver_b(_flip(wire, where % len(wire)))
    assert (r.verdict, r.drop_reason) == (Verdict.DROP, reason)
    assert pair.b.global_counters().drops[reason] == 1  # no link 1 on B: counted globally
    if reason == "bad_tag":
        assert pair.b.peer_counters(1).drops["bad_tag"] == 1
    assert pair.b.peer_counters(1).rx_packets == 0
    # The forgery moved nothing: the genuine packet is still accepted.
    assert pair.deliver_b(wire).verdict == Verdict.TUN


def test_malformed_sizes(pair: Pair) -> None:
    _inner, wire = pair.a_to_b(b"")
    for bad in (b"", b"\xd0", wire[:31], b"\xd0" + bytes(30)):
        assert pair.deliver_b(bad).drop_reason == "malformed", bad
    oversized = b"\xd0" + bytes(MAX_INNER + OVERHEAD)
    assert pair.deliver_b(oversized).drop_reason == "malformed"
    assert pair.b.global_counters().drops["malformed"] == 5


def test_replay_and_window(pair: Pair) -> None:
    wires = [pair.a_to_b()[1] for _ in range(REPLAY_WINDOW + 10)]
    first = wires[0]
    assert pair.deliver_b(first).verdict == Verdict.TUN
    assert pair.deliver_b(first).drop_reason == "replay"
    # Jump ahead to the newest: the first REPLAY_WINDOW - ... counters fall out of the window.
    assert pair.deliver_b(wires[-1]).verdict == Verdict.TUN
    newest = len(wires) - 1
    left = newest - REPLAY_WINDOW  # just left of the window
    assert pair.deliver_b(wires[left]).drop_reason == "replay"
    assert pair.deliver_b(wires[left + 1]).verdict == Verdict.TUN  # oldest still inside
    assert pair.deliver_b(wires[left + 1]).drop_reason == "replay"
    c = pair.b.peer_counters(1)
    assert c.drops["replay"] == 3 and c.rx_packets == 3


def test_in_window_reordering_is_accepted(pair: Pair) -> None:
    sent = [pair.a_to_b(i.to_bytes(2, "big")) for i in range(100)]
    order = list(range(100))
    random.Random(7).shuffle(order)
    got = [pair.deliver_b(sent[i][1]) for i in order]
    assert all(r.verdict == Verdict.TUN for r in got)
    assert sorted(r.data for r in got) == sorted(inner for inner, _ in sent)
    assert all(pair.deliver_b(w).drop_reason == "replay" for _, w in sent)


def test_control_packets_go_to_the_queue(pair: Pair) -> None:
    dtls = b"\x16\xfe\xfd" + bytes(40)
    r = pair.b.process_inbound(LINK, ("198.51.100.9", 5555), dtls)
    assert r.verdict == Verdict.CONTROL
    ev = pair.b.ctrl_recv()
    assert ev is not None
    assert (ev.event, ev.link_id, ev.addr, ev.data) == (1, LINK, ("198.51.100.9", 5555), dtls)
    assert pair.b.ctrl_recv() is None
    r = pair.b.process_inbound(LINK, ("2001:db8::9", 7), b"\x01" * 20)
    assert pair.b.ctrl_recv().addr == ("2001:db8::9", 7)  # type: ignore[union-attr]


def test_roaming_updates_endpoint_only_when_authenticated(pair: Pair) -> None:
    assert pair.b.endpoint(1) == (LINK, A_ADDR)
    gen = pair.b.endpoints_gen()
    _inner, wire = pair.a_to_b()
    forged = _flip(wire, len(wire) - 1)
    pair.b.process_inbound(LINK, ("203.0.113.50", 1), forged)
    assert pair.b.endpoint(1) == (LINK, A_ADDR)
    assert pair.b.endpoints_gen() == gen
    pair.b.process_inbound(LINK, ("203.0.113.50", 61000), wire)
    assert pair.b.endpoint(1) == (LINK, ("203.0.113.50", 61000))
    # Whoever follows endpoints by the generation sees the move.
    assert pair.b.endpoints_gen() != gen
    gen = pair.b.endpoints_gen()
    # A replay of an old packet from elsewhere must not move it either.
    pair.b.process_inbound(LINK, ("203.0.113.66", 9), wire)
    assert pair.b.endpoint(1) == (LINK, ("203.0.113.50", 61000))
    assert pair.b.endpoints_gen() == gen
    # Nor does an authenticated packet on another link: roaming stays within a link
    # (tests/native/test_multilink.py).
    _inner, wire = pair.a_to_b()
    assert pair.b.process_inbound(2, ("203.0.113.70", 9), wire).verdict == Verdict.TUN
    assert pair.b.endpoint(1) == (LINK, ("203.0.113.50", 61000))
    assert pair.b.endpoints_gen() == gen
    pair.b.endpoint_del(1, LINK)
    assert pair.b.endpoints_gen() != gen
    gen = pair.b.endpoints_gen()
    pair.b.set_endpoint(1, LINK, A_ADDR)
    assert pair.b.endpoints_gen() != gen


def test_errors_raise_with_errno() -> None:
    from sdwan.bindings.fastpath import FastPath

    with FastPath() as fp:
        with pytest.raises(FastPathError) as e:
            fp.key_install(9, 1, bytes(32), bytes(32))
        assert e.value.errno == 2 and "fp_key_install" in str(e.value)
        fp.peer_add(9)
        with pytest.raises(FastPathError) as e:
            fp.peer_add(9)
        assert e.value.errno == 17
        fp.key_install(9, 1, bytes(32), bytes(32))
        with pytest.raises(FastPathError) as e:
            fp.key_install(9, 1, bytes(32), bytes(32))
        assert e.value.errno == 17  # EEXIST: index in use
        with pytest.raises(ValueError):
            fp.route_set("10.0.0.1/8", 9)  # host bits set
        with pytest.raises(FastPathError):
            fp.ctrl_send(5, ("127.0.0.1", 9), b"x")  # no such link
        assert fp.endpoint(9) is None
        with pytest.raises(FastPathError) as e:
            fp.send_keepalive(9)
        assert e.value.errno == 126  # ENOKEY
    with pytest.raises(FastPathError):
        fp.peer_add(1)  # closed
