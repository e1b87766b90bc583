"""A PoP (relay, no TUN) carries data only by relaying it: its link threads warm their cipher
for warm_for_ms after they relayed a packet (docs/dataplane.md, "Latency")."""

from __future__ import annotations

import socket
import time

from fphelpers import ip_packet, link_keys

from sdwan.bindings.fastpath import FastPath, FastPathConfig


def _cpu(seconds: float) -> float:
    c0 = time.process_time()
    time.sleep(seconds)
    return time.process_time() - c0


def test_relay_threads_warm_after_relaying() -> None:
    a_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pop_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a_sock, b_sock, pop_sock):
        s.bind(("127.0.0.1", 0))
    b_sock.settimeout(2.0)
    a_ep, b_ep, pop_ep = (s.getsockname() for s in (a_sock, b_sock, pop_sock))
    cfg = FastPathConfig(relay=True, warm_ms=1, warm_for_ms=5000)
    with FastPath() as a, FastPath(cfg) as pop, FastPath() as b:
        for site, net in ((a, "10.2.0.0/24"), (b, "10.1.0.0/24")):
            site.peer_add(100)
            site.route_set(net, 100)
            site.set_endpoint(100, 1, pop_ep)
        pop.peer_add(1)
        pop.peer_add(2)
        pop.route_set("10.1.0.0/24", 1)
        pop.route_set("10.2.0.0/24", 2)
        pop.set_endpoint(1, 1, a_ep)
        pop.set_endpoint(2, 1, b_ep)
        link_keys(a, pop, 1, 100, 11, 111)
        link_keys(b, pop, 2, 100, 22, 222)
        pop.link_add(1, pop_sock.fileno())
        pop_sock.close()
        pop.start()
        time.sleep(0.3)
        idle = _cpu(1.0)
        inner = ip_packet("10.1.0.5", "10.2.0.7", b"voice")
        a_sock.sendto(a.process_outbound(inner).data, pop_ep)
        relayed = b_sock.recv(2048)
        assert b.process_inbound(1, pop_ep, relayed).data == inner  # relayed in C
        after_relay = _cpu(1.0)
        # With warm_ms=1 a warming thread wakes 1000 times a second: clearly more CPU.
        assert after_relay > 2 * idle + 0.002, (idle, after_relay)
    for s in (a_sock, b_sock):
        s.close()
