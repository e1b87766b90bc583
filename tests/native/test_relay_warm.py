"""A PoP (relay, no TUN) carries data only by relaying it: its link threads warm their cipher
for warm_for_ms after they relayed a packet (docs/dataplane.md, "Latency")."""

from __future__ import annotations

import socket
import time

from fphelpers import ip_packet, wire_relay

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
        wire_relay(a, pop, b, pop_ep, a_ep, b_ep)
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
