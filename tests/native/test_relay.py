"""Relay (the PoP): decrypt from one peer, re-encrypt to another, in C."""

from __future__ import annotations

from fphelpers import ip_packet, link_keys, wire_relay

from sdwan.bindings.fastpath import FastPath, FastPathConfig, Verdict

A_EP = ("198.51.100.1", 4800)
B_EP = ("198.51.100.2", 4800)
POP_EP = ("203.0.113.1", 4800)


def test_a_pop_b_relay_and_route_back_dropped() -> None:
    with FastPath() as a, FastPath(FastPathConfig(relay=True)) as pop, FastPath() as b:
        wire_relay(a, pop, b, POP_EP, A_EP, B_EP)

        inner = ip_packet("10.1.0.5", "10.2.0.7", b"via the pop")
        w1 = a.process_outbound(inner)
        assert w1.verdict == Verdict.SEND and w1.to == POP_EP
        w2 = pop.process_inbound(1, A_EP, w1.data)
        assert (w2.verdict, w2.peer_id, w2.link_id, w2.to) == (Verdict.SEND, 2, 1, B_EP)
        assert w2.data[4:8] == (22).to_bytes(4, "big")  # B's receiver index
        got = b.process_inbound(1, POP_EP, w2.data)
        assert got.verdict == Verdict.TUN and got.data == inner and got.peer_id == 100

        # And back.
        back = ip_packet("10.2.0.7", "10.1.0.5", b"reply")
        w = pop.process_inbound(1, B_EP, b.process_outbound(back).data)
        assert a.process_inbound(1, POP_EP, w.data).data == back

        # A packet from A addressed to A's own subnet must not bounce back to A.
        loop = a.process_outbound(ip_packet("10.1.0.5", "10.1.0.9"))
        assert loop.drop_reason == "no_route"  # A itself has no such route
        a.route_set("10.1.0.0/16", 100)
        w = a.process_outbound(ip_packet("10.1.0.5", "10.1.0.9"))
        r = pop.process_inbound(1, A_EP, w.data)
        assert (r.verdict, r.drop_reason) == (Verdict.DROP, "no_route")
        assert pop.peer_counters(1).drops["no_route"] == 1
        assert pop.peer_counters(2).tx_packets == 1 and pop.peer_counters(1).tx_packets == 1

        # Without a matching peer the packet is the PoP's own: it goes to its TUN.
        w = a.process_outbound(ip_packet("10.1.0.5", "10.2.0.1")).data
        pop.route_del("10.2.0.0/24")
        assert pop.process_inbound(1, A_EP, w).verdict == Verdict.TUN


def test_relay_off_always_delivers_to_tun() -> None:
    with FastPath() as a, FastPath() as b:
        a.peer_add(2)
        b.peer_add(1)
        b.peer_add(3)
        a.route_set("0.0.0.0/0", 2)
        b.route_set("10.3.0.0/24", 3)
        a.set_endpoint(2, 1, B_EP)
        link_keys(a, b, 1, 2, 1, 2)
        w = a.process_outbound(ip_packet("10.1.0.5", "10.3.0.1")).data
        assert b.process_inbound(1, A_EP, w).verdict == Verdict.TUN


def test_check_source_drops_a_site_posing_as_another() -> None:
    cfg = FastPathConfig(relay=True, check_source=True)
    with FastPath() as a, FastPath(cfg) as pop, FastPath() as b:
        for site, net in ((a, "10.2.0.0/24"), (b, "10.1.0.0/24")):
            site.peer_add(100)
            site.route_set(net, 100)
            site.set_endpoint(100, 1, POP_EP)
        # A, compromised, also routes its own "victim" traffic to the PoP.
        a.route_set("10.3.0.0/24", 100)
        pop.peer_add(1)
        pop.peer_add(2)
        pop.peer_add(3)
        pop.route_set("10.1.0.0/24", 1)
        pop.route_set("10.2.0.0/24", 2)
        pop.route_set("10.3.0.0/24", 3)
        pop.route_set("fd00:1::/64", 1)
        pop.set_endpoint(1, 1, A_EP)
        pop.set_endpoint(2, 1, B_EP)
        link_keys(a, pop, 1, 100, 11, 111)
        link_keys(b, pop, 2, 100, 22, 222)

        ok = a.process_outbound(ip_packet("10.1.0.5", "10.2.0.7", b"mine"))
        assert pop.process_inbound(1, A_EP, ok.data).verdict == Verdict.SEND

        for src in ("10.3.0.9", "10.2.0.8", "192.0.2.1"):
            w = a.process_outbound(ip_packet(src, "10.2.0.7", b"forged"))
            r = pop.process_inbound(1, A_EP, w.data)
            assert (r.verdict, r.drop_reason) == (Verdict.DROP, "spoofed"), src
        assert pop.peer_counters(1).drops["spoofed"] == 3
        assert pop.peer_counters(2).tx_packets == 1

        # The check is by address family too: an IPv6 source inside A's prefix is fine
        # for an IPv6 packet only.
        a.route_set("fd00:2::/64", 100)
        pop.route_set("fd00:2::/64", 2)
        w6 = a.process_outbound(ip_packet("fd00:1::5", "fd00:2::7", b"v6"))
        assert pop.process_inbound(1, A_EP, w6.data).verdict == Verdict.SEND
