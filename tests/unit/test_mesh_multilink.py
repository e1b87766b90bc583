"""A multi-link peer's paths judged one by one (Mesh._judge_paths): two real Meshes up over
link 1 in simulated time, a second direct path added on link 2, and the peer's packets fed
to the fast path by link, as its keepalives over each link would arrive."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from test_mesh_schedule import mesh_pair
from test_tunnel_sim import SimSite, certs  # noqa: F401  (fixture)

from sdwan.bindings.fastpath import Verdict
from sdwan.site.config import Link
from sdwan.site.mesh import MeshPath, PathState

TWO_LINKS = (Link("wan1", "lo", 4800), Link("wan2", "lo", 4801))
B_ON_LINK2 = ("203.0.113.40", 4801)


def ipv4(src: str, dst: str) -> bytes:
    """A minimal IPv4 packet (the fast path reads the addresses)."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 84, 0, 0, 64, 17, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + b"x" * 64


def test_a_second_path_that_goes_silent_is_punched_again_alone(certs, tmp_path: Path) -> None:  # noqa: F811
    net, a, b = mesh_pair(certs, tmp_path, TWO_LINKS)
    assert a.fp is not None and b.fp is not None
    peer = a.mesh.remotes[1]
    # A second direct path, as a punch over link 2 leaves it.
    path2 = peer.paths[2] = MeshPath(2, "wan2", endpoint=B_ON_LINK2, how="window")
    a.fp.set_endpoint(1, 2, B_ON_LINK2)
    a.mesh._path_direct(peer, path2)
    b.fp.route_set("10.2.0.0/24", 2)  # so that B can seal packets for A

    def from_b(link: int) -> None:
        r = b.fp.process_outbound(ipv4("10.1.0.5", "10.2.0.7"))
        assert r.verdict == Verdict.SEND, r
        src = B_ON_LINK2 if link == 2 else ("198.51.100.2", 4800)
        assert a.fp.process_inbound(link, src, r.data).verdict == Verdict.TUN

    keepalive_s = a.mesh.timers.keepalive_s
    # Both links hear from the peer every few seconds: both paths stay direct.
    for _ in range(8):
        from_b(1)
        from_b(2)
        net.run(5)
    assert path2.state is PathState.DIRECT and peer.paths[1].state is PathState.DIRECT
    assert a.mesh.stats.paths_silent == 0

    # Link 2 goes quiet while link 1 still answers.
    t_quiet = net.clock.t
    while path2.state is PathState.DIRECT:
        from_b(1)
        net.run(1)
        assert net.clock.t - t_quiet < 2 * keepalive_s + 12, "the silent path was not noticed"
    assert net.clock.t - t_quiet >= 2 * keepalive_s - 1, "judged dead too soon"
    assert "nothing from the peer over wan2" in (path2.reason or ""), path2.reason
    assert a.mesh.stats.paths_silent == 1
    # Its endpoint is gone from the fast path; the other path and the tunnel stay.
    assert [e.link_id for e in a.fp.endpoint_info(1).endpoints] == [1]
    assert peer.paths[1].state is PathState.DIRECT
    assert peer.tunnel is not None and peer.tunnel.state.name == "UP"
