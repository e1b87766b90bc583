"""Multi-link peers: one endpoint per link, the link chosen in C per the peer's policy (one
link, or weighted per flow by rendezvous hashing), roaming within a link only, link removal;
and the batch route call."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import statistics
import struct
import time
from collections.abc import Iterator

import pytest
from fphelpers import A_ADDR, LINK, Pair, ip_packet, link_keys

from sdwan.bindings.fastpath import FastPath, FastPathConfig, FastPathError, Verdict, ffi, lib

EP = {1: ("192.0.2.11", 4801), 2: ("198.51.100.12", 4802), 3: ("2001:db8::13", 4803)}


def flow_packet(i: int, proto: int = 17) -> bytes:
    """Flow i of A's LAN to B's LAN: distinct source ports (and sources every 50000)."""
    sport, dport = 1024 + i % 50000, 443
    payload = struct.pack("!HH", sport, dport) + b"x" * 60
    pkt = bytearray(ip_packet(f"10.1.{i // 50000}.5", "10.2.0.7", payload))
    pkt[9] = proto
    return bytes(pkt)


def link_of(fp: FastPath, pkt: bytes) -> int:
    r = fp.process_outbound(pkt)
    assert r.verdict == Verdict.SEND, r
    return r.link_id


def links_of(fp: FastPath, n: int) -> list[int]:
    return [link_of(fp, flow_packet(i)) for i in range(n)]


@pytest.fixture
def site() -> Iterator[FastPath]:
    """A site whose peer 2 (B's LAN) has a transmit key and no endpoint yet."""
    with FastPath() as fp:
        fp.peer_add(2)
        fp.route_set("10.2.0.0/24", 2)
        fp.key_install(2, 7, bytes(32), bytes(32))
        fp.key_activate(2, 7, 8)
        yield fp


def test_peer_with_endpoints_on_two_links(site: FastPath) -> None:
    site.set_endpoint(2, 1, EP[1])
    site.set_endpoint(2, 2, EP[2])
    assert sorted(site.endpoints(2)) == [(1, EP[1]), (2, EP[2])]
    # Default policy: the endpoint set last, as a single endpoint was before.
    assert site.endpoint(2) == (2, EP[2])
    assert set(links_of(site, 50)) == {2}
    site.set_endpoint(2, 1, ("192.0.2.99", 5000))  # replaces link 1's, and is now the latest
    assert sorted(site.endpoints(2)) == [(1, ("192.0.2.99", 5000)), (2, EP[2])]
    assert site.endpoint(2) == (1, ("192.0.2.99", 5000))
    r = site.process_outbound(flow_packet(0))
    assert (r.link_id, r.to) == (1, ("192.0.2.99", 5000))

    # One link by policy, whichever endpoint was set last.
    site.set_policy(2, [(2, 1)])
    assert site.endpoint(2) == (2, EP[2]) and set(links_of(site, 50)) == {2}
    assert site.endpoint_info(2).policy == [(2, 1)]
    # The policy's link loses its endpoint: the default choice, rather than nothing.
    site.endpoint_del(2, 2)
    assert site.endpoints(2) == [(1, ("192.0.2.99", 5000))]
    assert set(links_of(site, 20)) == {1}
    with pytest.raises(FastPathError) as e:
        site.endpoint_del(2, 2)
    assert e.value.errno == errno.ENOTCONN
    site.set_endpoint(2, 2, EP[2])
    assert set(links_of(site, 20)) == {2}
    site.set_policy(2, [])  # back to the default
    assert site.endpoint_info(2).policy == []
    site.endpoint_del(2, 1)
    site.endpoint_del(2, 2)
    assert site.endpoint(2) is None and site.endpoints(2) == []
    r = site.process_outbound(flow_packet(0))
    assert (r.verdict, r.drop_reason) == (Verdict.DROP, "no_endpoint")


def test_per_endpoint_counters(site: FastPath) -> None:
    site.set_endpoint(2, 1, EP[1])
    site.set_endpoint(2, 2, EP[2])
    site.set_policy(2, [(1, 1), (2, 1)])
    chosen = links_of(site, 200)
    info = {e.link_id: e for e in site.endpoint_info(2).endpoints}
    assert info[1].tx_packets == chosen.count(1) and info[2].tx_packets == chosen.count(2)
    assert info[1].tx_bytes == 84 * chosen.count(1)
    assert sum(e.primary for e in info.values()) == 1
    assert site.peer_counters(2).tx_packets == 200
    # A packet refused for an expired key is not counted on its endpoint.
    site.test_set_tx_counter(2, (1 << 64) - (1 << 13))
    assert site.process_outbound(flow_packet(0)).drop_reason == "key_expired"
    assert sum(e.tx_packets for e in site.endpoint_info(2).endpoints) == 200


def test_policy_is_checked(site: FastPath) -> None:
    for bad in ([(1, 0)], [(1, 1), (1, 2)], [(i, 1) for i in range(lib.FP_PEER_ENDPOINTS + 1)]):
        with pytest.raises(FastPathError) as e:
            site.set_policy(2, bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(FastPathError) as e:
        site.set_policy(99, [(1, 1)])
    assert e.value.errno == errno.ENOENT
    for link in range(1, lib.FP_PEER_ENDPOINTS + 1):
        site.set_endpoint(2, link, EP[1])
    with pytest.raises(FastPathError) as e:
        site.set_endpoint(2, 100, EP[1])
    assert e.value.errno == errno.ENOSPC


def test_flows_stick_to_their_link(site: FastPath) -> None:
    for link in (1, 2, 3):
        site.set_endpoint(2, link, EP[link])
    site.set_policy(2, [(1, 1), (2, 1), (3, 1)])
    first = links_of(site, 600)
    assert set(first) == {1, 2, 3}
    for _ in range(3):
        assert links_of(site, 600) == first
    # Flows are the 5-tuple: TCP too, and ports count only where they exist.
    tcp = [link_of(site, flow_packet(i, proto=6)) for i in range(300)]
    assert len(set(tcp)) == 3
    frag = bytearray(flow_packet(0))
    frag[6] = 0x20  # more fragments: no ports, so all of a datagram's fragments go together
    on = {
        link_of(site, bytes(frag[:20]) + struct.pack("!HH", p, 443) + bytes(60))
        for p in range(1, 200)
    }
    assert len(on) == 1
    # The endpoint's address may change (roaming, a new NAT mapping): flows stay.
    site.set_endpoint(2, 2, ("198.51.100.99", 9))
    assert links_of(site, 600) == first


def test_weights_are_respected(site: FastPath) -> None:
    site.set_endpoint(2, 1, EP[1])
    site.set_endpoint(2, 2, EP[2])
    site.set_policy(2, [(1, 3), (2, 1)])
    assert site.endpoint(2)[0] == 1  # the heaviest link is the primary  # type: ignore[index]
    chosen = links_of(site, 2000)
    share = chosen.count(1) / len(chosen)
    assert 0.68 < share < 0.82, share  # 0.75 expected; 7 standard deviations either side
    site.set_policy(2, [(1, 1), (2, 4)])
    share = links_of(site, 2000).count(2) / 2000
    assert 0.72 < share < 0.88, share


def test_removed_link_moves_only_its_flows(site: FastPath) -> None:
    socks = []
    for link in (1, 2, 3):
        s = socket.socket(socket.AF_INET6 if link == 3 else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("::1" if link == 3 else "127.0.0.1", 0))
        site.link_add(link, s.fileno())
        socks.append(s)
        site.set_endpoint(2, link, EP[link])
    try:
        site.set_policy(2, [(1, 2), (2, 1), (3, 1)])
        before = links_of(site, 1500)
        assert set(before) == {1, 2, 3}
        site.link_del(3)
        assert sorted(site.endpoints(2)) == [(1, EP[1]), (2, EP[2])]
        after = links_of(site, 1500)
        moved = [i for i in range(1500) if before[i] != after[i]]
        assert moved and all(before[i] == 3 for i in moved)
        assert all(after[i] != 3 for i in range(1500))
        assert len(moved) == before.count(3)
        # Its flows spread over the rest by weight, not all onto one link.
        assert {after[i] for i in moved} == {1, 2}
        # An endpoint removed from one peer alone: the same.
        site.endpoint_del(2, 2)
        alone = links_of(site, 1500)
        assert set(alone) == {1}
        site.set_endpoint(2, 2, EP[2])
        assert links_of(site, 1500) == after  # and it gets exactly its flows back
        # The policy still names link 3; once it is back with an endpoint, so are its flows.
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        site.link_add(3, s.fileno())
        s.close()
        site.set_endpoint(2, 3, EP[3])
        assert links_of(site, 1500) == before
    finally:
        for s in socks:
            s.close()


def _two_link_pair() -> Pair:
    """A and B; B reaches A over links 1 and 2 (A sends to B over link 1)."""
    a, b = FastPath(), FastPath()
    a.peer_add(2)
    b.peer_add(1)
    a.route_set("10.2.0.0/24", 2)
    b.route_set("10.1.0.0/24", 1)
    a.set_endpoint(2, LINK, ("192.0.2.2", 4801))
    b.set_endpoint(1, 1, A_ADDR)
    keys = link_keys(a, b, 1, 2, 0x1001, 0x2001)
    return Pair(a, b, keys)


def test_roaming_moves_the_endpoint_within_its_link_only() -> None:
    p = _two_link_pair()
    try:
        _inner, w = p.a_to_b()
        # A new source on the same link: that link's endpoint follows (NAT rebinding).
        assert p.b.process_inbound(1, ("203.0.113.5", 6000), w).verdict == Verdict.TUN
        assert p.b.endpoints(1) == [(1, ("203.0.113.5", 6000))]
        # A link where B has no endpoint for A: delivered, counted, nothing moves or is added.
        _inner, w = p.a_to_b()
        assert p.b.process_inbound(2, ("203.0.113.77", 7000), w).verdict == Verdict.TUN
        assert p.b.endpoints(1) == [(1, ("203.0.113.5", 6000))]
        assert p.b.endpoint(1) == (1, ("203.0.113.5", 6000))
        info = p.b.endpoint_info(1)
        assert info.rx_unlisted == 1 and info.endpoints[0].rx_packets == 1
        # With endpoints on both links, a packet on link 2 moves link 2's endpoint only,
        # and the primary stays on the link the policy says.
        p.b.set_endpoint(1, 2, ("203.0.113.77", 1))
        p.b.set_policy(1, [(1, 1)])
        _inner, w = p.a_to_b()
        p.b.process_inbound(2, ("203.0.113.78", 7001), w)
        assert sorted(p.b.endpoints(1)) == [
            (1, ("203.0.113.5", 6000)),
            (2, ("203.0.113.78", 7001)),
        ]
        assert p.b.endpoint(1) == (1, ("203.0.113.5", 6000))
        # Forged and replayed packets move nothing.
        _inner, w = p.a_to_b()
        forged = w[:-1] + bytes([w[-1] ^ 1])
        assert p.b.process_inbound(1, ("203.0.113.66", 1), forged).drop_reason == "bad_tag"
        p.b.process_inbound(1, ("203.0.113.5", 6000), w)
        assert p.b.process_inbound(1, ("203.0.113.66", 1), w).drop_reason == "replay"
        assert p.b.endpoint(1) == (1, ("203.0.113.5", 6000))
        by_link = {e.link_id: e.rx_packets for e in p.b.endpoint_info(1).endpoints}
        assert by_link == {1: 2, 2: 1}
    finally:
        p.a.close()
        p.b.close()


def test_relay_chooses_links_the_same_way() -> None:
    with FastPath() as a, FastPath(FastPathConfig(relay=True)) as pop:
        a.peer_add(100)
        a.route_set("10.2.0.0/16", 100)
        a.set_endpoint(100, 1, ("203.0.113.1", 4800))
        pop.peer_add(1)
        pop.peer_add(2)
        pop.route_set("10.1.0.0/16", 1)
        pop.route_set("10.2.0.0/16", 2)
        pop.set_endpoint(1, 1, ("198.51.100.1", 4800))
        pop.set_endpoint(2, 1, EP[1])
        pop.set_endpoint(2, 2, EP[2])
        pop.set_policy(2, [(1, 1), (2, 1)])
        link_keys(a, pop, 1, 100, 11, 111)
        pop.key_install(2, 222, bytes(32), bytes(32))
        pop.key_activate(2, 222, 22)

        def relayed(i: int) -> int:
            w = a.process_outbound(flow_packet(i)).data
            r = pop.process_inbound(1, ("198.51.100.1", 4800), w)
            assert r.verdict == Verdict.SEND and r.peer_id == 2, r
            assert r.to == EP[r.link_id]
            return r.link_id

        first = [relayed(i) for i in range(300)]
        assert set(first) == {1, 2}
        assert [relayed(i) for i in range(300)] == first
        # The PoP's own choice for the same inner packets is the same one.
        pop.route_set("10.2.0.0/24", 2)
        assert [link_of(pop, flow_packet(i)) for i in range(300)] == first


# ------------------------------------------------------------------ route batch

N_PREFIXES = 1000


def _prefixes(n: int = N_PREFIXES) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """n distinct prefixes, both families, several lengths."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i in range(n):
        if i % 4 == 3:
            nets.append(ipaddress.IPv6Network((0xFD00 << 112 | i << 64, 64)))
        else:
            nets.append(ipaddress.IPv4Network((0x0A000000 | i << 8, 24 if i % 2 else 28)))
    return nets


def _peer_of(fp: FastPath, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int | None:
    src = "10.255.255.1" if net.version == 4 else "fd99::1"
    r = fp.process_outbound(ip_packet(src, str(net.network_address + 1)))
    if r.drop_reason == "no_route":
        return None
    assert r.drop_reason == "no_key", r  # peers have no keys: the drop names the peer
    return r.peer_id


def test_route_batch_switches_prefixes_and_nothing_else() -> None:
    nets = _prefixes()
    with FastPath() as fp:
        for pid in (1, 2, 3):
            fp.peer_add(pid)
        fp.route_batch([(n, 1) for n in nets])
        assert all(_peer_of(fp, n) == 1 for n in nets)
        others = [ipaddress.ip_network("172.16.0.0/12"), ipaddress.ip_network("fd50::/16")]
        fp.route_batch([(n, 3) for n in others])
        # Every other prefix to peer 2, and the first ten deleted, in one call.
        fp.route_batch([(n, 2) for n in nets[10::2]], delete=nets[:10])
        for i, n in enumerate(nets):
            assert _peer_of(fp, n) == (None if i < 10 else 2 if i % 2 == 0 else 1), n
        assert [_peer_of(fp, n) for n in others] == [3, 3]
        # A prefix both deleted and set ends up set; deleting an absent one is no error.
        fp.route_batch([(nets[0], 3)], delete=[nets[0], "192.168.77.0/24"])
        assert _peer_of(fp, nets[0]) == 3
        fp.route_batch([])


def test_route_batch_is_all_or_nothing() -> None:
    nets = _prefixes(200)
    with FastPath() as fp:
        fp.peer_add(1)
        fp.peer_add(2)
        fp.route_batch([(n, 1) for n in nets])
        with pytest.raises(FastPathError) as e:
            fp.route_batch([(n, 2) for n in nets[:150]] + [(nets[150], 9)] + [(nets[151], 2)])
        assert e.value.errno == errno.ENOENT and "op 150" in str(e.value)
        with pytest.raises(ValueError):
            fp.route_batch([(nets[0], 2), ("10.200.0.1/24", 2)])  # host bits
        assert all(_peer_of(fp, n) == 1 for n in nets)

        # The C call's own checks, each rejecting the batch at its index.
        def ops(n: int) -> object:
            o = ffi.new("struct fp_route_op[]", n)
            for i in range(n):
                o[i].verb = lib.FP_ROUTE_SET
                packed = nets[i].network_address.packed
                o[i].prefix.family = nets[i].version
                o[i].prefix.addr[0 : len(packed)] = packed
                o[i].plen = nets[i].prefixlen
                o[i].peer_id = 2
            return o

        bad = ffi.new("size_t *")
        for field, value in (("verb", 7), ("plen", 33), ("family", 5), ("host", 1)):
            o = ops(100)
            if field == "family":
                o[57].prefix.family = value  # type: ignore[index]
            elif field == "host":
                o[57].prefix.addr[3] = 1  # type: ignore[index]
                o[57].plen = 24  # type: ignore[index]
            else:
                setattr(o[57], field, value)  # type: ignore[index]
            bad[0] = 0
            assert lib.fp_route_batch(fp._h, o, 100, bad) == -errno.EINVAL, field
            assert bad[0] == 57, field
        assert all(_peer_of(fp, n) == 1 for n in nets)
        assert lib.fp_route_batch(fp._h, ops(100), 100, bad) == 0
        assert all(_peer_of(fp, n) == (2 if i < 100 else 1) for i, n in enumerate(nets))


def _time(f: object) -> float:
    t0 = time.perf_counter()
    f()  # type: ignore[operator]
    return time.perf_counter() - t0


def test_route_batch_is_one_call_not_n() -> None:
    """Switching 1000 prefixes between two peers: one batch against 1000 fp_route_set calls,
    both through cffi with the arguments built beforehand, medians of interleaved runs. The
    bound only catches a batch that does per-op work of a single call (a lock round trip
    each, say); the figures are in docs/dataplane.md."""
    nets = _prefixes()
    with FastPath() as fp:
        fp.peer_add(1)
        fp.peer_add(2)
        fp.route_batch([(n, 1) for n in nets])
        addrs = []
        for n in nets:
            a = ffi.new("struct fp_addr *")
            a.family = n.version
            a.addr[0 : len(n.network_address.packed)] = n.network_address.packed
            addrs.append((a, n.prefixlen))
        batches = {}
        for peer in (1, 2):
            o = ffi.new("struct fp_route_op[]", len(nets))
            for i, (a, plen) in enumerate(addrs):
                o[i].verb = lib.FP_ROUTE_SET
                o[i].prefix = a[0]
                o[i].plen = plen
                o[i].peer_id = peer
            batches[peer] = o
        h = fp._h
        route_set = lib.fp_route_set
        route_batch = lib.fp_route_batch

        def singles(peer: int) -> None:
            for a, plen in addrs:
                route_set(h, a, plen, peer)

        single_t, batch_t = [], []
        for _ in range(7):
            single_t.append(_time(lambda: singles(2)))
            assert _peer_of(fp, nets[-1]) == 2
            batch_t.append(_time(lambda: route_batch(h, batches[1], len(nets), ffi.NULL)))
            assert _peer_of(fp, nets[-1]) == 1
        single, batch = statistics.median(single_t), statistics.median(batch_t)
        print(f"1000 prefixes: batch {batch * 1e3:.3f} ms, singles {single * 1e3:.3f} ms")
        assert batch < single, (batch, single)
        assert batch < 0.25


def test_every_endpoint_gets_its_own_idle_keepalive(site: FastPath) -> None:
    """Traffic takes one link; the idle keepalives of the scan go over every endpoint that
    sent nothing for the interval, so the NAT mapping of each link stays open."""
    pass_s = 1.05  # past the scan's once-a-second keepalive pass
    rx = {}
    for link in (1, 2):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        site.link_add(link, tx.fileno())
        tx.close()  # the fast path keeps its own duplicate
        rx[link] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx[link].bind(("127.0.0.1", 0))
        rx[link].setblocking(False)
        site.set_endpoint(2, link, rx[link].getsockname())
    site.set_policy(2, [(1, 1)])

    def got() -> dict[int, int]:
        n = {}
        for link, s in rx.items():
            n[link] = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    assert len(s.recv(100)) == 32
                    n[link] += 1
        return n

    try:
        site.set_keepalive(2, 0.05)
        time.sleep(pass_s)
        site.liveness_scan(10, 10)
        assert got() == {1: 1, 2: 1}  # nothing sent ever: both due
        for i in range(5):
            assert link_of(site, flow_packet(i)) == 1
        time.sleep(pass_s)
        site.liveness_scan(10, 10)
        assert got() == {1: 0, 2: 1}  # link 1 carried data since the last pass
        time.sleep(pass_s)
        site.liveness_scan(10, 10)
        assert got() == {1: 1, 2: 1}
        tx_by_link = {e.link_id: e.tx_packets for e in site.endpoint_info(2).endpoints}
        assert tx_by_link == {1: 7, 2: 3}, tx_by_link  # keepalives counted on their endpoint
    finally:
        for s in rx.values():
            s.close()
