"""The off-cloud transport rules in the fast path: matching (subnets, protocols, port ranges,
first match, a cloud rule stops), what a rule decides from the route's three peers (the
secondary while the off-cloud peer is 0), the flow cache and its invalidation, the hit
counters, refused tables, and the TUN thread applying them."""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
import time

import pytest

from sdwan.bindings.fastpath import FastPath, FastPathError, TransportRule, Verdict, ffi, lib

CHOSEN, MESH, POP = 10, 20, 30  # the route's peer, its off-cloud peer, its cloud peer
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
net = ipaddress.ip_network


def packet(src: str, dst: str, proto: int = UDP, sport: int = 1000, dport: int = 2000,
           frag: int = 0) -> bytes:
    """An IPv4 or IPv6 packet with a TCP/UDP header (ports) or 8 bytes of anything else;
    frag: the IPv4 flags/offset field (0x2000 MF, or an offset)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    l4 = struct.pack("!HH", sport, dport) + bytes(16 if proto == TCP else 4)
    if proto not in (TCP, UDP):
        l4 = bytes([8, 0]) + bytes(6)
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, frag, 64, proto, 0,
                          s.packed, d.packed)
    else:
        hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s.packed, d.packed)
    return hdr + l4


def sent_to(fp: FastPath, pkt: bytes) -> int | str:
    """The peer the fast path seals pkt for (its peers have no keys: dropped as no_key,
    which names the peer), or the drop reason."""
    r = fp.process_outbound(pkt)
    assert r.verdict == Verdict.DROP, r
    return r.peer_id if r.drop_reason == "no_key" else str(r.drop_reason)


@pytest.fixture
def fp() -> FastPath:
    with FastPath() as fp:
        for pid in (CHOSEN, MESH, POP):
            fp.peer_add(pid)
        # Site 2's subnets: chosen (cloud under the normal policy), with both rule peers.
        fp.route_batch([("10.2.0.0/24", CHOSEN, MESH, POP), ("fd00:2::/64", CHOSEN, MESH, POP)])
        # Site 3: no mesh tunnel up (offcloud 0), a cloud path.
        fp.route_batch([("10.3.0.0/24", CHOSEN, 0, POP)])
        # Site 4: neither.
        fp.route_batch([("10.4.0.0/24", CHOSEN, 0, 0)])
        yield fp


def rule(key: int, transport: str = "offcloud", secondary: str = "automatic",
         protocol: int | None = None, src: tuple[str, ...] = (), dst: tuple[str, ...] = (),
         ports: tuple[tuple[int, int], ...] = ()) -> TransportRule:
    return TransportRule(key, transport, secondary, protocol, tuple(net(n) for n in src),
                         tuple(net(n) for n in dst), ports)


def test_without_rules_the_routes_peer(fp: FastPath) -> None:
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7")) == CHOSEN
    assert fp.rules_counters().hits == []
    assert fp.rules_counters().evaluations == 0


def test_subnets_protocol_and_port_ranges(fp: FastPath) -> None:
    fp.rules_set([rule(1, protocol=TCP, src=("10.1.0.0/25",), dst=("10.2.0.0/28", "10.3.0.0/24"),
                       ports=((445, 445), (8000, 8100)))])
    to2 = "10.2.0.7"
    assert sent_to(fp, packet("10.1.0.5", to2, TCP, dport=445)) == MESH
    assert sent_to(fp, packet("10.1.0.5", to2, TCP, dport=8000)) == MESH
    assert sent_to(fp, packet("10.1.0.5", to2, TCP, dport=8100)) == MESH
    assert sent_to(fp, packet("10.1.0.5", to2, TCP, dport=8101)) == CHOSEN  # port
    assert sent_to(fp, packet("10.1.0.5", to2, UDP, dport=445)) == CHOSEN  # protocol
    assert sent_to(fp, packet("10.1.0.200", to2, TCP, dport=445)) == CHOSEN  # source
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.77", TCP, dport=445)) == CHOSEN  # dst /28
    assert fp.rules_counters().hits == [3]


def test_a_rule_matches_its_flows_answers_too(fp: FastPath) -> None:
    # The far site's answer to 10.2.0.7:445 from 10.1.0.5 runs from dst to src, port 445 as
    # its source port: it takes the rule's transport as well.
    fp.rules_set([rule(1, protocol=TCP, src=("10.9.0.0/24",), dst=("10.2.0.0/24",),
                       ports=((445, 445),))])
    assert sent_to(fp, packet("10.2.0.7", "10.9.0.5", TCP, sport=445, dport=50000)) in (
        "no_route",)  # no route to 10.9/24 here: the rules come after the route
    fp.route_batch([("10.9.0.0/24", CHOSEN, MESH, POP)])
    assert sent_to(fp, packet("10.2.0.7", "10.9.0.5", TCP, sport=445, dport=50000)) == MESH
    # A flow the other way round (from 10.2 to 10.9 port 445) is not the rule's.
    assert sent_to(fp, packet("10.2.0.7", "10.9.0.5", TCP, sport=50000, dport=445)) == CHOSEN


def test_first_match_wins_and_a_cloud_rule_stops(fp: FastPath) -> None:
    fp.rules_set([
        rule(1, transport="cloud", protocol=UDP, ports=((53, 53),)),
        rule(2, protocol=UDP),
        rule(3, secondary="none"),
    ])
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", UDP, dport=53)) == POP
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", UDP, dport=54)) == MESH
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", TCP, dport=53)) == MESH
    # Site 3 has no mesh path: rule 3's secondary none drops it; the cloud rule does not.
    assert sent_to(fp, packet("10.1.0.5", "10.3.0.7", TCP)) == "offcloud_down"
    assert sent_to(fp, packet("10.1.0.5", "10.3.0.7", UDP, dport=53)) == POP
    # A cloud rule without a cloud path keeps the route's own peer.
    assert sent_to(fp, packet("10.1.0.5", "10.4.0.7", UDP, dport=53)) == CHOSEN
    assert fp.rules_counters().hits == [3, 1, 2]


@pytest.mark.parametrize(
    ("secondary", "site3", "site4"),
    [("automatic", CHOSEN, CHOSEN), ("cloud", POP, "offcloud_down"),
     ("none", "offcloud_down", "offcloud_down")],
)
def test_secondary_while_the_offcloud_peer_is_none(
    fp: FastPath, secondary: str, site3: int | str, site4: int | str
) -> None:
    fp.rules_set([rule(1, secondary=secondary)])
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7")) == MESH  # its mesh path is up
    assert sent_to(fp, packet("10.1.0.5", "10.3.0.7")) == site3
    assert sent_to(fp, packet("10.1.0.5", "10.4.0.7")) == site4
    drops = 2 - [site3, site4].count(CHOSEN) - [site3, site4].count(POP)
    assert fp.global_counters().drops["offcloud_down"] == drops


def test_an_automatic_secondary_never_falls_back_onto_a_route_peer_that_is_no_secondary(
    fp: FastPath,
) -> None:
    # The route's own peer is an Alt-WAN tunnel (docs/recovery.md): an off-cloud rule whose
    # mesh path is down takes the cloud path instead, and drops without one; traffic no rule
    # matches, and a cloud rule without a cloud path, still follow the route.
    flag = lib.FP_ROUTE_PEER_NOT_SECONDARY
    fp.route_batch([("10.3.0.0/24", CHOSEN, 0, POP, flag), ("10.4.0.0/24", CHOSEN, 0, 0, flag),
                    ("10.2.0.0/24", CHOSEN, MESH, 0, flag)])
    fp.rules_set([rule(1, secondary="automatic", protocol=UDP), rule(2, "cloud", protocol=TCP)])
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7")) == MESH
    assert sent_to(fp, packet("10.1.0.5", "10.3.0.7")) == POP
    assert sent_to(fp, packet("10.1.0.5", "10.4.0.7")) == "offcloud_down"
    assert sent_to(fp, packet("10.1.0.5", "10.4.0.7", TCP)) == CHOSEN
    assert sent_to(fp, packet("10.1.0.5", "10.4.0.7", ICMP)) == CHOSEN
    # Set again without the flag, the route's peer is the secondary again.
    fp.route_batch([("10.4.0.0/24", CHOSEN, 0, 0)])
    assert sent_to(fp, packet("10.1.0.5", "10.4.0.7")) == CHOSEN
    # An unknown flag is refused, and nothing of the batch changes.
    with pytest.raises(FastPathError) as info:
        fp.route_batch([("10.4.0.0/24", CHOSEN, 0, 0, flag), ("10.3.0.0/24", CHOSEN, 0, 0, 2)])
    assert info.value.errno == errno.EINVAL
    assert sent_to(fp, packet("10.1.0.5", "10.4.0.7")) == CHOSEN


def test_a_mesh_path_that_goes_and_comes_back(fp: FastPath) -> None:
    fp.rules_set([rule(1, secondary="none")])
    pkt = packet("10.1.0.5", "10.2.0.7")
    assert sent_to(fp, pkt) == MESH
    fp.route_batch([("10.2.0.0/24", CHOSEN, 0, POP)])  # paths.py: the mesh withdrew it
    assert sent_to(fp, pkt) == "offcloud_down"  # same flow, cached: the route is read anew
    fp.route_batch([("10.2.0.0/24", CHOSEN, MESH, POP)])
    assert sent_to(fp, pkt) == MESH
    # The mesh peer deleted (fp_peer_del): routes naming it for the rules forget it, and
    # keep their own peer.
    fp.peer_del(MESH)
    assert sent_to(fp, pkt) == "offcloud_down"
    fp.rules_set([])
    assert sent_to(fp, pkt) == CHOSEN


def test_fragments_and_protocols_without_ports(fp: FastPath) -> None:
    fp.rules_set([rule(1, protocol=UDP, ports=((2000, 2000),)), rule(2, "cloud", protocol=ICMP)])
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", UDP, dport=2000)) == MESH
    # The first fragment (MF, offset 0) has its ports; a later one has none, and matches the
    # port rule as if they were in it: every fragment takes the flow's transport.
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", UDP, dport=2000, frag=0x2000)) == MESH
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", UDP, dport=2000, frag=185)) == MESH
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", UDP, dport=2001, frag=0x2000)) == CHOSEN
    # ICMP matches ICMPv6 too.
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", ICMP)) == POP
    assert sent_to(fp, packet("fd00:1::5", "fd00:2::7", ICMP6)) == POP
    assert sent_to(fp, packet("fd00:1::5", "fd00:2::7", UDP, dport=2000)) == MESH
    # A later fragment of another protocol is no UDP: its own protocol decides.
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", TCP, dport=2000, frag=185)) == CHOSEN
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", ICMP, frag=185)) == POP


HBH, ROUTING, FRAGMENT, DSTOPTS, AH, NONXT = 0, 43, 44, 60, 51, 59


def ext(nh: int, kind: int, units: int = 0) -> bytes:
    """An IPv6 extension header of `kind` naming `nh` next: options headers (units + 1) * 8
    bytes of padding options (PadN), AH (units + 2) * 4 bytes."""
    if kind == AH:
        return bytes([nh, units]) + bytes((units + 2) * 4 - 2)
    body = (units + 1) * 8 - 2
    if kind == ROUTING:
        return bytes([nh, units, 0, 0]) + bytes(body - 2)
    return bytes([nh, units, 1, body - 2]) + bytes(body - 2)


def frag6(nh: int, offset: int, more: bool, ident: int = 7) -> bytes:
    return struct.pack("!BBHI", nh, 0, offset * 8 | more, ident)


def ip6(src: str, dst: str, first: int, chain: bytes) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return struct.pack("!IHBB16s16s", 6 << 28, len(chain), first, 64, s.packed, d.packed) + chain


def l4(proto: int, sport: int = 1000, dport: int = 2000) -> bytes:
    return struct.pack("!HH", sport, dport) + bytes(16 if proto == TCP else 4)


def test_ipv6_extension_headers_are_walked_to_the_ports(fp: FastPath) -> None:
    fp.rules_set([rule(1, protocol=TCP, ports=((445, 445),), secondary="none"),
                  rule(2, "cloud", protocol=UDP, ports=((53, 53),))])
    a, b = "fd00:1::5", "fd00:2::7"
    # Hop-by-Hop then Destination Options then TCP to 445: the rule's, as without them.
    chain = ext(DSTOPTS, HBH) + ext(TCP, DSTOPTS, 1) + l4(TCP, dport=445)
    assert sent_to(fp, ip6(a, b, HBH, chain)) == MESH
    assert sent_to(fp, ip6(a, b, HBH, ext(DSTOPTS, HBH) + ext(TCP, DSTOPTS, 1)
                           + l4(TCP, dport=446))) == CHOSEN
    # Routing and AH too; UDP to 53 through them takes the cloud rule.
    chain = ext(ROUTING, HBH) + ext(AH, ROUTING, 2) + ext(UDP, AH, 4) + l4(UDP, dport=53)
    assert sent_to(fp, ip6(a, b, HBH, chain)) == POP
    # The answer (445 as source port) through a Destination Options header: the rule's too.
    fp.route_batch([("fd00:1::/64", CHOSEN, MESH, POP)])
    assert sent_to(fp, ip6(b, a, DSTOPTS, ext(TCP, DSTOPTS) + l4(TCP, 445, 50000))) == MESH
    # No Next Header after the chain: no protocol a rule names, the route's peer.
    assert sent_to(fp, ip6(a, b, HBH, ext(NONXT, HBH) + bytes(8))) == CHOSEN
    # No mesh path to the site: the rule's secondary none holds for the extended packet.
    fp.route_batch([("fd00:2::/64", CHOSEN, 0, POP)])
    assert sent_to(fp, ip6(a, b, HBH, ext(DSTOPTS, HBH) + ext(TCP, DSTOPTS)
                           + l4(TCP, dport=445))) == "offcloud_down"
    assert fp.rules_counters().hits == [3, 1]


@pytest.mark.parametrize("v6", [False, True])
def test_a_fragmented_datagram_follows_its_flow(fp: FastPath, v6: bool) -> None:
    fp.rules_set([rule(1, protocol=UDP, ports=((2000, 2000),), secondary="none"),
                  rule(2, "cloud", protocol=UDP, ports=((53, 53),))])
    a, b = ("fd00:1::5", "fd00:2::7") if v6 else ("10.1.0.5", "10.2.0.7")

    def frags(dport: int) -> list[bytes]:
        """A UDP datagram to dport in three fragments, the last one (IPv6) after a
        Hop-by-Hop header."""
        head = l4(UDP, dport=dport) + bytes(8)  # 8-byte UDP header, 16 bytes of data
        if not v6:
            return [packet(a, b, UDP, dport=dport, frag=0x2000),
                    packet(a, b, UDP, frag=0x2000 | 2)[:20] + bytes(16),
                    packet(a, b, UDP, frag=4)[:20] + bytes(8)]
        return [ip6(a, b, FRAGMENT, frag6(UDP, 0, True) + head),
                ip6(a, b, FRAGMENT, frag6(UDP, 2, True) + bytes(16)),
                ip6(a, b, HBH, ext(FRAGMENT, HBH) + frag6(UDP, 4, False) + bytes(8))]

    whole = (packet(a, b, UDP, dport=2000) if not v6 else
             ip6(a, b, UDP, l4(UDP, dport=2000)))
    assert sent_to(fp, whole) == MESH
    assert [sent_to(fp, f) for f in frags(2000)] == [MESH, MESH, MESH]
    # A datagram to another port: the first fragment has its ports and its own rule (or
    # none); the later ones cannot tell, and take the first rule that their protocol and
    # addresses match, as if their ports were its (documented in docs/dataplane.md).
    assert [sent_to(fp, f) for f in frags(53)] == [POP, MESH, MESH]
    assert [sent_to(fp, f) for f in frags(4000)] == [CHOSEN, MESH, MESH]
    # Without a mesh path, no fragment of the rule's flow slips to the route's peer or the
    # cloud.
    fp.route_batch([("10.2.0.0/24", CHOSEN, 0, POP), ("fd00:2::/64", CHOSEN, 0, POP)])
    assert [sent_to(fp, f) for f in frags(2000)] == ["offcloud_down"] * 3


def test_a_header_chain_cut_short_or_too_long_matches_safely(fp: FastPath) -> None:
    # The upper layer cannot be known: the packet takes the first rule its addresses match,
    # whatever the rule's protocol and ports; here a secondary none one, so nothing escapes.
    fp.rules_set([rule(1, protocol=TCP, ports=((445, 445),), secondary="none",
                       dst=("fd00:2::/64",)),
                  rule(2, "cloud", protocol=UDP, dst=("fd00:3::/64",))])
    fp.route_batch([("fd00:3::/64", CHOSEN, MESH, POP)])
    a, b = "fd00:1::5", "fd00:2::7"
    good = ext(DSTOPTS, HBH) + ext(TCP, DSTOPTS, 1) + l4(TCP, dport=445)
    assert sent_to(fp, ip6(a, b, HBH, good)) == MESH
    for cut in (0, 3, 8, 12, 20, 24):  # inside the first header, the second, the TCP ports
        assert sent_to(fp, ip6(a, b, HBH, good[:cut])) == MESH, cut
    # Nine Destination Options headers: one more than walked.
    long = b"".join(ext(DSTOPTS, DSTOPTS) for _ in range(8)) + ext(TCP, DSTOPTS)
    assert sent_to(fp, ip6(a, b, DSTOPTS, long + l4(TCP, dport=446))) == MESH
    # Eight are walked: port 446 is not the rule's.
    assert sent_to(fp, ip6(a, b, DSTOPTS, long[8:] + l4(TCP, dport=446))) == CHOSEN
    # A later fragment naming another extension header: the protocol is unknown too.
    assert sent_to(fp, ip6(a, b, FRAGMENT, frag6(DSTOPTS, 3, False) + bytes(16))) == MESH
    # To the other site, the cloud rule (UDP) takes them: their addresses match it.
    assert sent_to(fp, ip6(a, "fd00:3::7", HBH, good[:12])) == POP
    # An IPv4 header whose options run past the packet: no ports, the rule still matches.
    fp.rules_set([rule(1, protocol=TCP, ports=((445, 445),))])
    p4 = bytearray(packet("10.1.0.5", "10.2.0.7", TCP, dport=445))
    p4[0] = 0x4F  # 60-byte header, 40 bytes of packet
    assert sent_to(fp, bytes(p4)) == MESH


def test_flow_cache_and_its_invalidation(fp: FastPath) -> None:
    fp.rules_set([rule(1, protocol=TCP, ports=((80, 80),))])
    flow = packet("10.1.0.5", "10.2.0.7", TCP, dport=80)
    other = packet("10.1.0.5", "10.2.0.7", TCP, dport=81)
    before = fp.rules_counters()
    for _ in range(50):
        assert sent_to(fp, flow) == MESH
        assert sent_to(fp, other) == CHOSEN
    after = fp.rules_counters()
    # Two flows, two lookups in the table, however many packets; every packet counted.
    assert after.evaluations - before.evaluations == 2
    assert after.hits == [50]
    # A new table makes every cached flow stale at once.
    fp.rules_set([rule(2, protocol=TCP, ports=((81, 81),))])
    assert fp.rules_counters().generation == after.generation + 1
    assert sent_to(fp, flow) == CHOSEN and sent_to(fp, other) == MESH
    assert fp.rules_counters().evaluations - after.evaluations == 2


def test_hits_follow_the_rule_key(fp: FastPath) -> None:
    fp.rules_set([rule(7, protocol=TCP), rule(8, protocol=UDP)])
    for _ in range(3):
        sent_to(fp, packet("10.1.0.5", "10.2.0.7", TCP))
    sent_to(fp, packet("10.1.0.5", "10.2.0.7", UDP))
    assert fp.rules_counters().hits == [3, 1]
    # Reordered, one new, one gone: counts go with the keys.
    fp.rules_set([rule(9, protocol=ICMP), rule(8, protocol=UDP), rule(7, protocol=TCP)])
    assert fp.rules_counters().hits == [0, 1, 3]


@pytest.mark.parametrize(
    ("bad", "index"),
    [
        (rule(2, ports=((90, 80),)), 1),
        (TransportRule(2, "offcloud", "automatic", None, (net("10.1.0.0/24"),),
                       (net("10.1.0.0/24"),), ((1, 0),)), 1),
        (TransportRule(2, "offcloud", "automatic", 300), 1),  # no such protocol
    ],
)
def test_a_bad_table_is_refused_whole(fp: FastPath, bad: TransportRule, index: int) -> None:
    fp.rules_set([rule(1, protocol=TCP)])
    with pytest.raises(FastPathError) as e:
        fp.rules_set([rule(1, secondary="none"), bad])
    assert e.value.errno == errno.EINVAL and f"rule {index} of 2" in str(e.value)
    assert sent_to(fp, packet("10.1.0.5", "10.3.0.7", TCP)) == CHOSEN  # the old table holds
    assert len(fp.rules_counters().hits) == 1


def test_host_bits_and_ranges_outside_the_arrays_are_refused(fp: FastPath) -> None:
    """What the typed wrapper never sends, straight through cffi."""
    rules = ffi.new("struct fp_rule[]", 2)
    nets = ffi.new("struct fp_rule_net[]", 1)
    nets[0].family, nets[0].plen = 4, 24
    nets[0].addr[0:4] = bytes([10, 1, 0, 1])  # host bits
    rules[1].proto = lib.FP_RULE_PROTO_ANY
    rules[1].src_first, rules[1].src_n = 0, 1
    rules[0].proto = lib.FP_RULE_PROTO_ANY
    table = ffi.new("struct fp_rule_table *")
    table.rules, table.n_rules, table.nets, table.n_nets = rules, 2, nets, 1
    bad = ffi.new("size_t *")
    h = fp._h  # noqa: SLF001 - a raw call on purpose
    assert lib.fp_rules_set(h, table, bad) == -errno.EINVAL and bad[0] == 1
    nets[0].addr[3] = 0
    rules[1].src_first = 1  # past the end of nets
    assert lib.fp_rules_set(h, table, bad) == -errno.EINVAL and bad[0] == 1
    rules[1].src_first, rules[1].src_n = 0, 0xFFFFFFFF  # first + n overflows
    assert lib.fp_rules_set(h, table, bad) == -errno.EINVAL and bad[0] == 1
    rules[1].src_n = 1
    assert lib.fp_rules_set(h, table, bad) == 0
    table.n_rules = lib.FP_RULES_MAX + 1
    assert lib.fp_rules_set(h, table, bad) == -errno.E2BIG
    assert len(fp.rules_counters().hits) == 2


def test_route_batch_checks_the_rule_peers(fp: FastPath) -> None:
    with pytest.raises(FastPathError) as e:
        fp.route_batch([("10.5.0.0/24", CHOSEN, 99, POP)])
    assert e.value.errno == errno.ENOENT
    assert sent_to(fp, packet("10.1.0.5", "10.5.0.7")) == "no_route"
    # A plain set of a prefix (fp_route_set) forgets its rule peers.
    fp.rules_set([rule(1, secondary="none")])
    fp.route_set("10.2.0.0/24", CHOSEN)
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7")) == "offcloud_down"


def test_a_hundred_rules(fp: FastPath) -> None:
    rules = [rule(i, protocol=TCP, dst=("10.2.0.0/24",), ports=((10000 + i, 10000 + i),))
             for i in range(99)]
    fp.rules_set([*rules, rule(99, protocol=TCP, ports=((5201, 5201),))])
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", TCP, dport=5201)) == MESH
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", TCP, dport=10042)) == MESH
    assert sent_to(fp, packet("10.1.0.5", "10.2.0.7", TCP, dport=9999)) == CHOSEN
    hits = fp.rules_counters().hits
    assert hits[99] == 1 and hits[42] == 1 and sum(hits) == 2


def test_the_tun_thread_applies_the_rules_per_flow() -> None:
    """Packets written into the TUN (a socketpair) leave on the link to the peer the rules
    choose: UDP port 53 to the mesh peer's endpoint, the rest to the route's peer."""
    with FastPath() as fp:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        fp.tun_attach(theirs.fileno())
        theirs.close()
        link = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        link.bind(("127.0.0.1", 0))
        fp.link_add(1, link.fileno())
        link.close()
        sinks = {}
        for pid in (CHOSEN, MESH, POP):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            sinks[pid] = s
            fp.peer_add(pid)
            fp.set_endpoint(pid, 1, s.getsockname())
            fp.key_install(pid, pid, bytes(32), bytes(32))
            fp.key_activate(pid, pid, pid)
        fp.route_batch([("10.2.0.0/24", CHOSEN, MESH, POP)])
        fp.rules_set([rule(1, protocol=UDP, ports=((53, 53),))])
        fp.start()
        try:
            for i in range(20):
                ours.send(packet("10.1.0.5", "10.2.0.7", UDP, dport=53 if i % 2 else 80))
            got = {pid: 0 for pid in sinks}
            deadline = time.monotonic() + 5
            while sum(got.values()) < 20 and time.monotonic() < deadline:
                ready, _, _ = select.select(list(sinks.values()), [], [], 0.5)
                for s in ready:
                    s.recv(65536)
                    got[next(p for p, x in sinks.items() if x is s)] += 1
            assert got == {CHOSEN: 10, MESH: 10, POP: 0}
            c = fp.rules_counters()
            assert c.hits == [10] and c.evaluations == 2  # one lookup per flow
        finally:
            fp.stop()
            ours.close()
            for s in sinks.values():
                s.close()
