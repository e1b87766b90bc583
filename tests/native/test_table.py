"""Prefix table: longest-prefix match for IPv4 and IPv6 with hundreds of peers, checked
against a straightforward reference."""

from __future__ import annotations

import ipaddress
import random

from fphelpers import ip_packet

from sdwan.bindings.fastpath import FastPath, Verdict


def _peer_of(fp: FastPath, dst: str) -> int | None:
    src = "10.255.255.1" if ":" not in dst else "fd00::1"
    r = fp.process_outbound(ip_packet(src, dst))
    if r.verdict == Verdict.DROP and r.drop_reason == "no_route":
        return None
    assert r.drop_reason == "no_key", r  # routed to a peer without keys: its id is known
    return r.peer_id


def test_longest_prefix_match_against_reference() -> None:
    rnd = random.Random(11)
    routes: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}
    with FastPath() as fp:
        for pid in range(1, 401):
            fp.peer_add(pid)
            for _ in range(3):
                if rnd.random() < 0.7:
                    plen = rnd.choice([8, 12, 16, 20, 24, 28, 32])
                    addr = 0x0A000000 | rnd.getrandbits(24)
                    net = ipaddress.IPv4Network((addr, plen), strict=False)
                else:
                    plen = rnd.choice([16, 32, 48, 56, 64, 127, 128])
                    raw = (0xFD << 120) | rnd.getrandbits(120)
                    net = ipaddress.IPv6Network((raw, plen), strict=False)
                routes[net] = pid
                fp.route_set(net, pid)
        fp.peer_add(999)
        fp.route_set("0.0.0.0/0", 999)
        routes[ipaddress.ip_network("0.0.0.0/0")] = 999

        def reference(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
            best = None
            for net, pid in routes.items():
                if (
                    addr.version == net.version
                    and addr in net
                    and (best is None or net.prefixlen > best[0])
                ):
                    best = (net.prefixlen, pid)
            return best[1] if best else None

        probes = []
        for net in list(routes)[:300]:
            probes.append(net.network_address)
            probes.append(net.broadcast_address)
            probes.append(net.network_address + (net.num_addresses // 2))
        probes += [ipaddress.ip_address(rnd.getrandbits(32)) for _ in range(200)]
        probes += [ipaddress.IPv6Address((0xFD << 120) | rnd.getrandbits(120)) for _ in range(100)]
        for addr in probes:
            assert _peer_of(fp, str(addr)) == reference(addr), addr

        # Deleting the more specific route falls back to the shorter one.
        fp.route_set("172.31.0.0/16", 5)
        fp.route_set("172.31.1.0/24", 6)
        assert _peer_of(fp, "172.31.1.9") == 6
        fp.route_del("172.31.1.0/24")
        assert _peer_of(fp, "172.31.1.9") == 5
        fp.route_set("172.31.0.0/16", 7)  # replace
        assert _peer_of(fp, "172.31.1.9") == 7
        fp.peer_del(7)
        assert _peer_of(fp, "172.31.1.9") == 999
        fp.route_del("0.0.0.0/0")
        assert _peer_of(fp, "172.31.1.9") is None
