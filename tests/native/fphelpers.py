"""Helpers of the native tests: fast path instances wired as peers, IP packets.

The tests import sdwan.bindings.fastpath (and so the built module
sdwan.bindings._fastpath) directly: a
missing build is an import error, i.e. a failure, never a skip.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass

from sdwan.bindings.fastpath import FastPath, FastPathConfig, Result

Addr = tuple[str, int]

LINK = 1
A_ADDR = ("192.0.2.1", 4800)
B_ADDR = ("192.0.2.2", 4801)
A_NET = "10.1.0.0/24"
B_NET = "10.2.0.0/24"


def ip_packet(src: str, dst: str, payload: bytes = b"x" * 64) -> bytes:
    """A minimal IPv4 or IPv6 (UDP-looking) packet; the fast path reads only addresses."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        hdr = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, s.packed, d.packed
        )
    else:
        hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, s.packed, d.packed)
    return hdr + payload


@dataclass
class Keys:
    a_tx: bytes
    b_tx: bytes

    @classmethod
    def random(cls) -> Keys:
        return cls(os.urandom(32), os.urandom(32))


def link_keys(
    a: FastPath,
    b: FastPath,
    a_peer: int,
    b_peer: int,
    a_idx: int,
    b_idx: int,
    keys: Keys | None = None,
    activate: bool = True,
) -> Keys:
    """Install one key pair on both sides (A's peer b_peer is B and vice versa)."""
    k = keys or Keys.random()
    a.key_install(b_peer, a_idx, k.a_tx, k.b_tx)
    b.key_install(a_peer, b_idx, k.b_tx, k.a_tx)
    if activate:
        a.key_activate(b_peer, a_idx, b_idx)
        b.key_activate(a_peer, b_idx, a_idx)
    return k


@dataclass
class Pair:
    a: FastPath  # site 1; its peer 2 is B
    b: FastPath  # site 2; its peer 1 is A
    keys: Keys

    def a_to_b(self, payload: bytes = b"x" * 64) -> tuple[bytes, bytes]:
        """(inner packet, wire packet) from A's LAN to B's LAN."""
        inner = ip_packet("10.1.0.5", "10.2.0.7", payload)
        r = self.a.process_outbound(inner)
        assert r.verdict.name == "SEND", r
        return inner, r.data

    def deliver_b(self, wire: bytes, source: tuple[str, int] = A_ADDR) -> Result:
        return self.b.process_inbound(LINK, source, wire)


def wire_relay(
    a: FastPath, pop: FastPath, b: FastPath, pop_ep: Addr, a_ep: Addr, b_ep: Addr
) -> None:
    """Sites a (10.1.0.0/24, the PoP's peer 1) and b (10.2.0.0/24, peer 2) that know only the
    PoP (their peer 100) and send every site subnet to it; keys on both legs."""
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
    link_keys(a, pop, 1, 100, 11, 111)  # a's peer 100 is the PoP; the PoP's peer 1 is a
    link_keys(b, pop, 2, 100, 22, 222)


def make_pair(cfg: FastPathConfig | None = None, cfg_b: FastPathConfig | None = None) -> Pair:
    """A and B wired to each other with one active key; cfg_b defaults to cfg."""
    a, b = FastPath(cfg), FastPath(cfg_b or cfg)
    a.peer_add(2)
    b.peer_add(1)
    a.route_set(B_NET, 2)
    b.route_set(A_NET, 1)
    a.set_endpoint(2, LINK, B_ADDR)
    b.set_endpoint(1, LINK, A_ADDR)
    keys = link_keys(a, b, 1, 2, 0x1001, 0x2001)
    return Pair(a, b, keys)
