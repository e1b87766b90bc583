"""A multi-link peer's paths judged one by one (Mesh._judge_paths): two real Meshes up over
link 1 in simulated time, a second direct path added on link 2, and the peer's packets fed
to the fast path by link, as its keepalives over each link would arrive."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any

from test_mesh_schedule import mesh_pair
from test_tunnel_sim import SimSite, certs  # noqa: F401  (fixture)

from sdwan.bindings.fastpath import Verdict
from sdwan.site.config import Link
from sdwan.site.mesh import MeshPath, PathState

TWO_LINKS = (Link("wan1", "lo", 4800), Link("wan2", "lo", 4801))


def ipv4(src: str, dst: str) -> bytes:
    """A minimal IPv4 packet (the fast path reads the addresses)."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 84, 0, 0, 64, 17, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + b"x" * 64


class SecondPath:
    """A direct path of A to B over A's link 2, as a punch over link 2 leaves it. A's link 2
    is a real UDP socket; B's end of that path is `far`, a socket the test reads: what A
    sends there (keepalives, probes) reaches B only if the test hands it over."""

    def __init__(self, net: Any, a: SimSite, b: SimSite) -> None:
        assert a.fp is not None and b.fp is not None
        self.net, self.a, self.b = net, a, b
        own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        own.bind(("127.0.0.1", 0))
        a.fp.link_add(2, own.fileno())
        self.a_addr = own.getsockname()
        own.close()  # the fast path keeps its own copy
        self.far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.far.bind(("127.0.0.1", 0))
        self.far.setblocking(False)
        self.peer = a.mesh.remotes[1]
        self.path = self.peer.paths[2] = MeshPath(2, "wan2", endpoint=self.far.getsockname(),
                                                  how="window")
        a.fp.set_endpoint(1, 2, self.far.getsockname())
        a.mesh._path_direct(self.peer, self.path)
        b.fp.route_set("10.2.0.0/24", 2)  # so that B can seal packets for A
        # B's LAN among A's allowed sources, as socketd's Sources would have it from the
        # directory (the mesh gives its peer B's site as owner).
        a.fp.source_batch([("10.1.0.0/24", 1)])

    def from_b(self, link: int) -> None:
        """A data packet of B's arriving at A over link (as its keepalives would)."""
        r = self.b.fp.process_outbound(ipv4("10.1.0.5", "10.2.0.7"))
        assert r.verdict == Verdict.SEND, r
        src = self.far.getsockname() if link == 2 else ("198.51.100.2", 4800)
        assert self.a.fp.process_inbound(link, src, r.data).verdict == Verdict.TUN

    def answer_probes(self) -> int:
        """B's fast path answers what A sent over link 2 (its probes); the answers go back."""
        n = 0
        while True:
            try:
                data = self.far.recv(2048)
            except BlockingIOError:
                return n
            r = self.b.fp.process_inbound(1, self.a_addr, data)
            if r.verdict == Verdict.SEND:  # a probe's ack, sealed for A
                self.a.fp.process_inbound(2, self.far.getsockname(), r.data)
                n += 1

    def close(self) -> None:
        self.far.close()


def test_a_second_path_that_goes_silent_is_punched_again_alone(certs, tmp_path: Path) -> None:  # noqa: F811
    net, a, b = mesh_pair(certs, tmp_path, TWO_LINKS)
    two = SecondPath(net, a, b)
    peer, path2 = two.peer, two.path
    keepalive_s = a.mesh.timers.keepalive_s
    try:
        # Both links hear from the peer every few seconds: both paths stay direct.
        for _ in range(8):
            two.from_b(1)
            two.from_b(2)
            net.run(5)
        assert path2.state is PathState.DIRECT and peer.paths[1].state is PathState.DIRECT
        assert a.mesh.stats.paths_silent == 0

        # Link 2 goes quiet while link 1 still answers, and its probe is lost too.
        t_quiet = net.clock.t
        while path2.state is PathState.DIRECT:
            two.from_b(1)
            net.run(1)
            assert net.clock.t - t_quiet < 2 * keepalive_s + 14, "the silent path was not noticed"
        assert net.clock.t - t_quiet >= 2 * keepalive_s - 1, "judged dead too soon"
        assert path2.checked_at is not None, "given up without asking the path first"
        assert "nothing from the peer over wan2" in (path2.reason or ""), path2.reason
        assert a.mesh.stats.paths_silent == 1
        # Its endpoint is gone from the fast path; the other path and the tunnel stay.
        assert [e.link_id for e in a.fp.endpoint_info(1).endpoints] == [1]
        assert peer.paths[1].state is PathState.DIRECT
        assert peer.tunnel is not None and peer.tunnel.state.name == "UP"
    finally:
        two.close()


def test_a_quiet_second_path_that_answers_its_probe_is_kept(certs, tmp_path: Path) -> None:  # noqa: F811
    """A peer whose keepalives come more rarely than ours (its own keepalive_s) leaves its
    second path quiet for longer than two of our intervals: the path's answer to a probe
    keeps it."""
    net, a, b = mesh_pair(certs, tmp_path, TWO_LINKS)
    two = SecondPath(net, a, b)
    keepalive_s = a.mesh.timers.keepalive_s
    try:
        answered = 0
        t0 = net.clock.t
        while net.clock.t - t0 < 4 * keepalive_s:
            two.from_b(1)
            net.run(0.5)
            answered += two.answer_probes()
        assert two.path.state is PathState.DIRECT, two.path.reason
        assert answered >= 1, "the quiet path was never asked"
        assert a.mesh.stats.paths_silent == 0
    finally:
        two.close()
