"""Allowed sources per peer (fp_source_batch, fp_peer_set_source_owner): a table of its own,
apart from the routes, checked on every decrypted data packet of a peer with an owner."""

from __future__ import annotations

import errno

import pytest
from fphelpers import A_ADDR, LINK, ip_packet, make_pair

from sdwan.bindings.fastpath import (
    SOURCE_ANY,
    SOURCE_UNCHECKED,
    FastPathError,
    Verdict,
    ffi,
    lib,
)

SITE_A = 1  # site 1 owns 10.1.0.0/24 (fphelpers' A) and fd01::/64


def _send(pair, src: str, dst: str = "10.2.0.7"):
    """A packet from A's fast path with source src, as B receives it from its peer 1."""
    pair.a.route_set("::/0" if ":" in dst else "0.0.0.0/0", 2)
    w = pair.a.process_outbound(ip_packet(src, dst))
    assert w.verdict == Verdict.SEND, w
    return pair.b.process_inbound(LINK, A_ADDR, w.data)


def _pair():
    p = make_pair()
    p.b.source_batch([("10.1.0.0/24", SITE_A), ("fd01::/64", SITE_A), ("10.3.0.0/24", 3)])
    return p


def test_unchecked_by_default_and_with_zero() -> None:
    p = _pair()
    assert _send(p, "10.3.0.9").verdict == Verdict.TUN  # no owner: not checked
    p.b.set_source_owner(1, SITE_A)
    assert _send(p, "10.3.0.9").drop_reason == "spoofed"
    p.b.set_source_owner(1, SOURCE_UNCHECKED)
    assert _send(p, "10.3.0.9").verdict == Verdict.TUN
    assert _send(p, "192.0.2.9").verdict == Verdict.TUN


def test_owner_match_mismatch_and_not_found() -> None:
    p = _pair()
    p.b.set_source_owner(1, SITE_A)
    assert _send(p, "10.1.0.5").verdict == Verdict.TUN
    assert _send(p, "fd01::5", "fd02::7").verdict == Verdict.TUN
    for src in ("10.3.0.9", "10.2.0.8", "192.0.2.1", "fd03::1"):  # another's, ours, nobody's
        r = _send(p, src, "fd02::7" if ":" in src else "10.2.0.7")
        assert (r.verdict, r.drop_reason) == (Verdict.DROP, "spoofed"), src
    assert p.b.peer_counters(1).drops["spoofed"] == 4
    # Counted on the link too (socketctl status); synchronously there is no link, so the
    # global counters stand in for it.
    assert p.b.global_counters().drops["spoofed"] == 4
    assert p.b.peer_counters(1).rx_packets == 6  # authenticated, then refused


def test_longest_prefix_wins() -> None:
    p = _pair()
    p.b.set_source_owner(1, SITE_A)
    p.b.source_batch([("10.1.0.128/25", 3)])
    assert _send(p, "10.1.0.5").verdict == Verdict.TUN
    assert _send(p, "10.1.0.200").drop_reason == "spoofed"
    assert p.b.source_lookup("10.1.0.200") == 3 and p.b.source_lookup("10.1.0.5") == SITE_A
    assert p.b.source_lookup("10.9.0.1") is None


def test_any_accepts_every_prefix_of_the_table_and_nothing_else() -> None:
    p = _pair()
    p.b.set_source_owner(1, SOURCE_ANY)  # as a PoP session relaying every site
    for src in ("10.1.0.5", "10.3.0.9"):
        assert _send(p, src).verdict == Verdict.TUN, src
    for src in ("10.2.0.8", "192.0.2.1"):  # our own LAN, and nobody's
        assert _send(p, src).drop_reason == "spoofed", src


def test_the_routes_do_not_change_what_is_accepted() -> None:
    p = _pair()
    p.b.set_source_owner(1, SITE_A)
    p.b.peer_add(100)
    p.b.route_set("10.1.0.0/24", 100)  # site 1's prefix now routed via another peer
    assert _send(p, "10.1.0.5").verdict == Verdict.TUN
    p.b.route_del("10.1.0.0/24")
    assert _send(p, "10.1.0.5").verdict == Verdict.TUN


def test_a_batch_replaces_all_or_nothing() -> None:
    p = _pair()
    p.b.set_source_owner(1, SITE_A)
    # Site 1 moves from 10.1.0.0/24 to 10.5.0.0/24 in one batch.
    p.b.source_batch([("10.5.0.0/24", SITE_A)], delete=["10.1.0.0/24"])
    assert _send(p, "10.1.0.5").drop_reason == "spoofed"
    assert _send(p, "10.5.0.5").verdict == Verdict.TUN
    # A bad op rejects the whole batch in C: nothing changes (the wrapper refuses these
    # before C sees them, so the ops are built by hand).
    ops = ffi.new("struct fp_source_op[]", 3)
    for op, (net, plen, owner) in zip(
        ops, ((10, 24, SITE_A), (11, 24, SITE_A), (12, 33, SITE_A)), strict=True
    ):
        op.verb, op.prefix.family, op.plen, op.owner = lib.FP_SOURCE_SET, 4, plen, owner
        op.prefix.addr[0:4] = bytes([10, net, 0, 0])
    ops[0].prefix.addr[0:4] = bytes([10, 6, 0, 0])
    bad = ffi.new("size_t *")
    assert lib.fp_source_batch(p.b._h, ops, 3, bad) == -errno.EINVAL and bad[0] == 2
    ops[2].plen, ops[2].owner = 24, 0
    assert lib.fp_source_batch(p.b._h, ops, 3, bad) == -errno.EINVAL and bad[0] == 2
    ops[2].owner, ops[1].verb = SITE_A, 7
    assert lib.fp_source_batch(p.b._h, ops, 3, bad) == -errno.EINVAL and bad[0] == 1
    assert p.b.source_lookup("10.6.0.1") is None and p.b.source_lookup("10.11.0.1") is None
    with pytest.raises(ValueError):
        p.b.source_batch([("10.6.0.1/24", SITE_A)])  # host bits
    for owner in (0, SOURCE_ANY):
        with pytest.raises(ValueError):
            p.b.source_batch([("10.6.0.0/24", owner)])
    # Deleting what is not there is no error; a set replaces the owner.
    p.b.source_batch([("10.5.0.0/24", 3)], delete=["10.99.0.0/16"])
    assert _send(p, "10.5.0.5").drop_reason == "spoofed"


def test_a_peer_deleted_and_added_again_is_unchecked_and_the_table_stays() -> None:
    p = _pair()
    p.b.set_source_owner(1, SITE_A)
    p.b.peer_del(1)
    assert p.b.source_lookup("10.1.0.5") == SITE_A
    with pytest.raises(FastPathError) as e:
        p.b.set_source_owner(1, SITE_A)
    assert e.value.errno == errno.ENOENT
    p.b.peer_add(1)
    p.b.set_endpoint(1, LINK, A_ADDR)
    p.b.key_install(1, 0x2001, p.keys.b_tx, p.keys.a_tx)
    assert _send(p, "10.3.0.9").verdict == Verdict.TUN  # a new peer starts unchecked
