"""Peer groups: a route (or a rule's off-cloud or cloud peer) names a group, and each flow
goes to one of its members by weighted rendezvous hashing; members without a key or an
endpoint are passed over, removed and reweighted members move only their share of flows;
an empty group drops as no_member; bad groups are refused."""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from fphelpers import ip_packet, link_keys

from sdwan.bindings.fastpath import (
    GROUP_MEMBERS,
    PEER_GROUP_FLAG,
    FastPath,
    FastPathConfig,
    FastPathError,
    TransportRule,
    Verdict,
)

# Three PoP sessions of one site, one per link (as site/cloud.py numbers them), and a group.
M1, M2, M3 = 0x80000101, 0x80000102, 0x80000103
MEMBERS = (M1, M2, M3)
G, G2, G3 = PEER_GROUP_FLAG | 1, PEER_GROUP_FLAG | 2, PEER_GROUP_FLAG | 3
EP = {M1: ("192.0.2.11", 4801), M2: ("198.51.100.12", 4802), M3: ("203.0.113.13", 4803)}
LINK = {M1: 1, M2: 2, M3: 3}


def flow(i: int, dst: str = "10.2.0.7", proto: int = 17) -> bytes:
    """Flow i from the LAN: its own source port (and source address every 50000)."""
    payload = struct.pack("!HH", 1024 + i % 50000, 443) + b"x" * 60
    pkt = bytearray(ip_packet(f"10.1.{i // 50000}.5", dst, payload))
    pkt[9] = proto
    return bytes(pkt)


def member_of(fp: FastPath, pkt: bytes) -> int:
    r = fp.process_outbound(pkt)
    assert r.verdict == Verdict.SEND, r
    assert r.link_id == LINK[r.peer_id] and r.to == EP[r.peer_id]
    return r.peer_id


def members_of(fp: FastPath, n: int) -> list[int]:
    return [member_of(fp, flow(i)) for i in range(n)]


def give_key(fp: FastPath, peer: int) -> None:
    fp.key_install(peer, peer & 0xFFFF, bytes(32), bytes(32))
    fp.key_activate(peer, peer & 0xFFFF, peer & 0xFFFF)


@pytest.fixture
def site() -> Iterator[FastPath]:
    """Three sessions with keys, each with an endpoint on its own link; site 2's subnet is
    routed to the group G, which has no members yet."""
    with FastPath() as fp:
        for m in MEMBERS:
            fp.peer_add(m)
            fp.set_endpoint(m, LINK[m], EP[m])
            give_key(fp, m)
        fp.set_group(G, [])
        fp.route_set("10.2.0.0/24", G)
        yield fp


def test_weights_split_the_flows(site: FastPath) -> None:
    site.set_group(G, [(M1, 3), (M2, 1)])
    chosen = members_of(site, 64)
    share = chosen.count(M1) / 64
    assert 0.65 <= share <= 0.85, share  # 75 / 25 within 10 %
    assert members_of(site, 64) == chosen  # a flow stays on its member
    many = members_of(site, 4000)
    assert 0.72 < many.count(M1) / 4000 < 0.78
    # Counted on the members themselves; the group counts what it handed each.
    by_member = {g.peer_id: g for g in site.group_members(G)}
    total = {m: 2 * chosen.count(m) + many.count(m) for m in (M1, M2)}
    assert {m: g.packets for m, g in by_member.items()} == total
    assert [(g.peer_id, g.weight, g.usable) for g in site.group_members(G)] == [
        (M1, 3, True),
        (M2, 1, True),
    ]
    assert site.peer_counters(M1).tx_packets == total[M1]
    assert site.peer_counters(M1).tx_bytes == 84 * total[M1]
    assert site.peer_counters(M2).tx_packets == total[M2]
    assert site.peer_counters(G).tx_packets == 4128
    # Equal weights: an even split, and TCP flows spread as well.
    site.set_group(G, [(M1, 1), (M2, 1), (M3, 1)])
    even = members_of(site, 3000)
    assert all(0.3 < even.count(m) / 3000 < 0.37 for m in MEMBERS)
    tcp = {member_of(site, flow(i, proto=6)) for i in range(100)}
    assert tcp == set(MEMBERS)


def test_a_removed_member_moves_only_its_flows(site: FastPath) -> None:
    site.set_group(G, [(M1, 2), (M2, 1), (M3, 1)])
    before = members_of(site, 2000)
    assert set(before) == set(MEMBERS)
    # Taken out of the group by its owner.
    site.set_group(G, [(M1, 2), (M2, 1)])
    after = members_of(site, 2000)
    moved = [i for i in range(2000) if before[i] != after[i]]
    assert len(moved) == before.count(M3)
    assert {after[i] for i in moved} == {M1, M2}  # spread by weight, not onto one
    # Back in: exactly its flows return.
    site.set_group(G, [(M1, 2), (M2, 1), (M3, 1)])
    assert members_of(site, 2000) == before
    # The peer deleted: it leaves every group, with the same effect.
    site.set_group(G2, [(M3, 1), (M2, 1)])
    site.peer_del(M3)
    assert [g.peer_id for g in site.group_members(G)] == [M1, M2]
    assert [g.peer_id for g in site.group_members(G2)] == [M2]
    assert members_of(site, 2000) == after
    # Added again, it is a new peer: in no group until its owner says so.
    site.peer_add(M3)
    assert [g.peer_id for g in site.group_members(G)] == [M1, M2]


def test_a_new_weight_moves_only_its_share(site: FastPath) -> None:
    n = 4000
    site.set_group(G, [(M1, 1), (M2, 1), (M3, 1)])
    before = members_of(site, n)
    # M1 from a third to a half: only flows onto M1 move, about a sixth of them.
    site.set_group(G, [(M1, 2), (M2, 1), (M3, 1)])
    after = members_of(site, n)
    moved = [i for i in range(n) if before[i] != after[i]]
    assert all(after[i] == M1 for i in moved)
    assert 0.14 < len(moved) / n < 0.19, len(moved) / n
    assert {before[i] for i in moved} == {M2, M3}
    # Lowered again (a degraded link drained gradually): exactly those flows leave it.
    site.set_group(G, [(M1, 1), (M2, 1), (M3, 1)])
    assert members_of(site, n) == before
    site.set_group(G, [(M1, 1), (M2, 4), (M3, 4)])
    drained = members_of(site, n)
    left = [i for i in range(n) if before[i] != drained[i]]
    assert all(before[i] == M1 for i in left) and all(drained[i] != M1 for i in left)
    assert 0.08 < drained.count(M1) / n < 0.14, drained.count(M1) / n  # 1/9 expected


def test_a_member_without_key_or_endpoint_is_passed_over(site: FastPath) -> None:
    site.set_group(G, [(M1, 1), (M2, 1), (M3, 1)])
    before = members_of(site, 1500)
    # M1's session died: its keys are gone. Its flows go to their next-best member.
    site.key_clear(M1)
    assert [g.usable for g in site.group_members(G)] == [False, True, True]
    without = members_of(site, 1500)
    assert M1 not in without
    assert all(without[i] == before[i] for i in range(1500) if before[i] != M1)
    # M2 loses its endpoint (its link went away): the same, M3 carries everything now.
    site.endpoint_del(M2, LINK[M2])
    assert set(members_of(site, 200)) == {M3}
    # Both back: every flow returns to where it was.
    give_key(site, M1)
    site.set_endpoint(M2, LINK[M2], EP[M2])
    assert [g.usable for g in site.group_members(G)] == [True, True, True]
    assert members_of(site, 1500) == before
    # A member's link removed with fp_link_del passes it over as well.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    site.link_add(LINK[M3], s.fileno())
    s.close()
    site.link_del(LINK[M3])
    assert M3 not in members_of(site, 300)


def test_a_standby_member_carries_only_while_no_weighted_one_can(site: FastPath) -> None:
    """Weight 0: a standby (the passive link's session), chosen only when every weighted
    member is unusable, equally among the standbys."""
    site.set_group(G, [(M1, 1), (M2, 0), (M3, 0)])
    assert set(members_of(site, 300)) == {M1}
    site.key_clear(M1)
    spread = members_of(site, 600)
    assert set(spread) == {M2, M3}
    assert 200 < spread.count(M2) < 400
    give_key(site, M1)
    assert set(members_of(site, 300)) == {M1}
    # Only standbys: they share equally.
    site.set_group(G, [(M2, 0), (M3, 0)])
    assert set(members_of(site, 300)) == {M2, M3}


def test_an_empty_group_drops_and_counts(site: FastPath) -> None:
    r = site.process_outbound(flow(0))
    assert (r.verdict, r.drop_reason, r.peer_id) == (Verdict.DROP, "no_member", G)
    assert site.global_counters().drops["no_member"] == 1
    assert site.peer_counters(G).drops["no_member"] == 1
    # Members, none of them usable: the same.
    site.set_group(G, [(M1, 1), (M2, 1)])
    site.key_clear(M1)
    site.key_clear(M2)
    assert site.process_outbound(flow(1)).drop_reason == "no_member"
    assert site.peer_counters(G).drops["no_member"] == 2
    assert [g.packets for g in site.group_members(G)] == [0, 0]
    assert all(site.peer_counters(m).drops["no_key"] == 0 for m in MEMBERS)


def test_route_batch_and_rules_name_groups(site: FastPath) -> None:
    site.peer_add(20)  # the mesh tunnel to site 2, no key: its drops name it
    site.set_group(G, [(M1, 1), (M2, 1)])
    site.set_group(G2, [(M3, 1)])
    site.route_batch(
        [("10.2.0.0/24", 20, 0, G), ("10.3.0.0/24", G2, 20, G), ("fd00:3::/64", G, 0, 0)]
    )
    # The route's own peer a group, IPv6 too.
    r6 = site.process_outbound(_v6_flow(0))
    assert r6.verdict == Verdict.SEND and r6.peer_id in (M1, M2)
    assert site.process_outbound(flow(0, dst="10.3.0.7")).peer_id == M3
    # Rules: a cloud rule takes the cloud peer, the group, resolved per flow.
    site.rules_set([TransportRule(1, "cloud", protocol=17)])
    to_cloud = {member_of(site, flow(i)) for i in range(100)}
    assert to_cloud == {M1, M2}
    # An off-cloud rule whose off-cloud peer is a group; and whose secondary is the cloud.
    site.rules_set([TransportRule(1, "offcloud", secondary="cloud", protocol=17)])
    site.route_batch([("10.2.0.0/24", 20, G2, G), ("10.3.0.0/24", 20, 0, G)])
    assert {member_of(site, flow(i)) for i in range(50)} == {M3}
    assert {member_of(site, flow(i, dst="10.3.0.7")) for i in range(100)} == {M1, M2}
    # An unknown group, like an unknown peer, rejects the whole batch.
    with pytest.raises(FastPathError) as e:
        site.route_batch([("10.4.0.0/24", 20, 0, PEER_GROUP_FLAG | 7)])
    assert e.value.errno == errno.ENOENT
    # Deleting a group takes the routes whose peer it is (as peer_del does); a route that
    # names it for the rules only keeps its own peer and loses it there.
    site.route_batch([("10.5.0.0/24", G2, 0, 0)])
    site.rules_set([TransportRule(1, "offcloud", secondary="none", protocol=17)])
    site.group_del(G2)
    assert site.process_outbound(flow(0, dst="10.5.0.7")).drop_reason == "no_route"
    assert site.process_outbound(flow(0)).drop_reason == "offcloud_down"  # 10.2: none now
    site.rules_set([TransportRule(1, "cloud", protocol=17)])
    assert member_of(site, flow(0)) in (M1, M2)
    site.group_del(G)
    r = site.process_outbound(flow(0))  # no cloud peer any more: the route's own peer
    assert (r.drop_reason, r.peer_id) == ("no_key", 20)
    assert site.process_outbound(_v6_flow(0)).drop_reason == "no_route"


def _v6_flow(i: int) -> bytes:
    payload = struct.pack("!HH", 1024 + i, 443) + b"x" * 60
    return ip_packet("fd00:1::5", "fd00:3::7", payload)


def test_bad_groups_are_refused(site: FastPath) -> None:
    site.set_group(G, [(M1, 1), (M2, 2)])
    many = [(0x1000 + i, 1) for i in range(GROUP_MEMBERS + 1)]
    for i in range(GROUP_MEMBERS + 1):
        site.peer_add(0x1000 + i)
    site.set_group(G2, many[:GROUP_MEMBERS])  # eight is the limit, not less
    site.set_group(G3, [])
    for members, err in (
        ([(M1, 1), (0x4242, 1)], errno.ENOENT),  # no such peer
        ([(M1, 1), (M1, 2)], errno.EINVAL),  # twice
        ([(M1, 1), (G3, 1)], errno.EINVAL),  # a group
        ([(M1, 1), (G, 1)], errno.EINVAL),  # itself
        (many, errno.EINVAL),  # nine
    ):
        with pytest.raises(FastPathError) as e:
            site.set_group(G, members)
        assert e.value.errno == err, members
    # Nothing changed.
    assert [(g.peer_id, g.weight) for g in site.group_members(G)] == [(M1, 1), (M2, 2)]
    # Group ids and peer ids are one space; a group is no peer for the peer calls.
    with pytest.raises(FastPathError) as e:
        site.set_group(M1, [(M2, 1)])
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FastPathError) as e:
        site.peer_add(G)
    assert e.value.errno == errno.EEXIST
    for call in (
        lambda: site.peer_del(G),
        lambda: site.set_endpoint(G, 1, EP[M1]),
        lambda: site.endpoint_info(G),
        lambda: site.set_policy(G, [(1, 1)]),
        lambda: site.set_mtu(G, 1280),
        lambda: site.key_install(G, 99, bytes(32), bytes(32)),
        lambda: site.key_info(G),
        lambda: site.send_keepalive(G),
        lambda: site.set_keepalive(G, 1),
        lambda: site.set_source_owner(G, 2),
        lambda: site.group_del(M1),
        lambda: site.group_members(M1),
    ):
        with pytest.raises(FastPathError) as e:
            call()
        assert e.value.errno == errno.EINVAL
    unknown = PEER_GROUP_FLAG | 9
    for call in (lambda: site.group_del(unknown), lambda: site.group_members(unknown)):
        with pytest.raises(FastPathError) as e:
            call()
        assert e.value.errno == errno.ENOENT
    assert site.peer_counters(G).tx_packets == 0


def test_a_members_flows_still_spread_over_its_links(site: FastPath) -> None:
    """The group's choice and a member's own link choice are independent: the flows the
    group gives a two-link member are shared between its links by its policy."""
    site.set_group(G, [(M1, 1), (M2, 1)])
    site.set_endpoint(M1, 4, ("192.0.2.44", 4804))
    site.set_policy(M1, [(LINK[M1], 1), (4, 1)])
    links = []
    for i in range(2000):
        r = site.process_outbound(flow(i))
        if r.peer_id == M1:
            links.append(r.link_id)
    assert 0.4 < links.count(4) / len(links) < 0.6, links.count(4) / len(links)


def test_the_relay_resolves_a_group() -> None:
    """At a relay (the PoP), a route to a group seals each flow for one member, and with
    check_source every member may send from the group's prefixes."""
    with FastPath() as a, FastPath(FastPathConfig(relay=True, check_source=True)) as pop:
        a.peer_add(100)
        a.route_set("10.2.0.0/16", 100)
        a.set_endpoint(100, 1, ("203.0.113.1", 4800))
        pop.peer_add(1)
        pop.route_set("10.1.0.0/16", 1)
        pop.set_endpoint(1, 1, ("198.51.100.1", 4800))
        link_keys(a, pop, 1, 100, 11, 111)
        for m in (2, 3):
            pop.peer_add(m)
            pop.set_endpoint(m, 1, ("198.51.100.2", 4800 + m))
        pop.set_group(G, [(2, 1), (3, 1)])
        pop.route_set("10.2.0.0/16", G)
        b2, b3 = FastPath(), FastPath()
        try:
            for m, b in ((2, b2), (3, b3)):
                b.peer_add(100)
                b.route_set("10.1.0.0/16", 100)
                b.set_endpoint(100, 1, ("203.0.113.1", 4800))
                link_keys(b, pop, m, 100, 20 + m, 200 + m)
            seen = set()
            for i in range(100):
                w = a.process_outbound(flow(i, dst="10.2.0.7")).data
                r = pop.process_inbound(1, ("198.51.100.1", 4800), w)
                assert r.verdict == Verdict.SEND and r.peer_id in (2, 3), r
                seen.add(r.peer_id)
            assert seen == {2, 3}
            # Either member sends from the group's prefixes; a source elsewhere is spoofed.
            for m, b in ((2, b2), (3, b3)):
                w = b.process_outbound(ip_packet("10.2.0.7", "10.1.0.5")).data
                r = pop.process_inbound(1, ("198.51.100.2", 4800 + m), w)
                assert r.verdict == Verdict.SEND and r.peer_id == 1, r
                w = b.process_outbound(ip_packet("10.9.0.7", "10.1.0.5")).data
                r = pop.process_inbound(1, ("198.51.100.2", 4800 + m), w)
                assert r.drop_reason == "spoofed", r
            # No usable member: dropped as no_member on the group.
            pop.key_clear(2)
            pop.key_clear(3)
            w = a.process_outbound(flow(0, dst="10.2.0.7")).data
            r = pop.process_inbound(1, ("198.51.100.1", 4800), w)
            assert r.drop_reason == "no_member" and r.peer_id == G
            assert pop.peer_counters(G).drops["no_member"] == 1
        finally:
            b2.close()
            b3.close()


def test_the_tun_thread_sends_each_flow_to_its_member() -> None:
    """Packets written into the TUN (a socketpair) leave on the members' links, each flow to
    the member the synchronous call names, 3:1."""
    with FastPath() as fp:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        fp.tun_attach(theirs.fileno())
        theirs.close()
        sinks: dict[int, socket.socket] = {}
        for m in (M1, M2):
            link = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            link.bind(("127.0.0.1", 0))
            fp.link_add(LINK[m], link.fileno())
            link.close()
            sinks[m] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sinks[m].bind(("127.0.0.1", 0))
            fp.peer_add(m)
            fp.set_endpoint(m, LINK[m], sinks[m].getsockname())
            give_key(fp, m)
        fp.set_group(G, [(M1, 3), (M2, 1)])
        fp.route_set("10.2.0.0/24", G)
        expected = [fp.process_outbound(flow(i)).peer_id for i in range(64)]
        fp.start()
        try:
            for i in range(64):
                ours.send(flow(i))
            got = {m: 0 for m in sinks}
            deadline = time.monotonic() + 5
            while sum(got.values()) < 64 and time.monotonic() < deadline:
                ready, _, _ = select.select(list(sinks.values()), [], [], 0.5)
                for s in ready:
                    s.recv(65536)
                    got[next(m for m, x in sinks.items() if x is s)] += 1
            assert got == {m: expected.count(m) for m in sinks}
            assert 0.65 <= got[M1] / 64 <= 0.85, got
            assert [g.packets for g in fp.group_members(G)] == [2 * got[M1], 2 * got[M2]]
        finally:
            fp.stop()
            ours.close()
            for s in sinks.values():
                s.close()
