"""Alt-WAN tunnels (site/altwan.py) between two real Supervisors with real DTLS and real fast
paths, in simulated time, beside a mesh tunnel between the same two sites: the Alt-WAN tunnel
comes up from the directory alone (no PoP, no punch), each tunnel keeps to its own link and
fast-path peer, a silence takes the tunnel off the traffic and holds it, and the directory
moves or removes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_mesh_multilink import ipv4
from test_mesh_schedule import punch
from test_tunnel_sim import Clock, Net, SimSite, certs  # noqa: F401  (fixture)

from sdwan.bindings.fastpath import CtrlEvent, FastPathError, Verdict
from sdwan.common.probe import PROBE_TYPE
from sdwan.common.store import Store
from sdwan.site.altwan import HOLD_MIN_S, AltWan, altwan_peer_id
from sdwan.site.config import Link
from sdwan.site.config import Mesh as MeshConfig
from sdwan.site.links import LinkManager
from sdwan.site.mesh import Mesh
from sdwan.site.paths import Paths, Policy, Transport
from sdwan.site.tunnel import State, Timers

Addr = tuple[str, int]
TIMERS = Timers(rekey_s=600, dead_after_s=1e9)  # silence is real time here: never dead
LINKS = (Link("wan1", "lo", 4800), Link("mpls", "lo", 4800, offcloud=False, altwan=True))
INET = {1: ("198.51.100.2", 4800), 2: ("198.51.100.3", 4800)}
MPLS = {1: ("10.200.0.1", 4800), 2: ("10.200.0.2", 4800)}


def entry(site_id: int, **kw: Any) -> dict[str, Any]:
    return {"site_id": site_id, "subnets": [f"10.{site_id}.0.0/24"], "offcloud": True,
            "online": True, "altwan": [f"{MPLS[site_id][0]}:{MPLS[site_id][1]}"], **kw}


class LinkNet(Net):
    """The simulated network with two links per site: a datagram reaches its site on the
    link its destination address belongs to."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.where: dict[Addr, tuple[SimSite, int]] = {}
        self.cut: set[int] = set()  # links whose datagrams are lost

    def pump(self) -> None:
        while self.queue:
            src, dst, data = self.queue.pop(0)
            hit = self.where.get(dst)
            if hit is None or hit[1] in self.cut:
                continue
            site, link = hit
            site._on_ctrl_event(CtrlEvent(CtrlEvent.PACKET, link, 0, src, data))
            site.woken = True


class TwoLinkSite(SimSite):
    def __init__(self, net: LinkNet, site_certs: Any, site_id: int, tmp: Path) -> None:
        super().__init__(net, site_certs, site_id, INET[site_id], {}, TIMERS)
        self.addrs = {1: INET[site_id], 2: MPLS[site_id]}
        net.where.update({a: (self, link) for link, a in self.addrs.items()})
        self.directory: list[dict[str, Any]] = []
        assert self.fp is not None
        self.paths = Paths(self.fp)
        links = LinkManager(LINKS, send=self.send, clock=net.clock,
                            store=Store(tmp / f"db{site_id}"))
        self.mesh = Mesh(
            site_id=site_id, cfg=MeshConfig(), links=links, fp=self.fp, port=self,
            paths=self.paths, timers=TIMERS, directory=lambda: self.directory,
            ask_pop=lambda link, msg: True, clock=net.clock,
        )
        self.sessions.add_owner(self.mesh)
        self.sessions.add_handler(PROBE_TYPE, self.mesh.on_probe)
        self.altwan = AltWan(
            site_id=site_id, links=links, fp=self.fp, port=self, paths=self.paths,
            timers=TIMERS, directory=lambda: self.directory, directory_known=lambda: True,
            on_event=lambda kind, text, data, site: self.events.append((kind, site)),
            clock=net.clock,
        )
        self.events: list[tuple[str, int | None]] = []
        self.sessions.add_owner(self.altwan)

    def send(self, link_id: int, addr: Addr, data: bytes) -> None:
        self.net.deliver(self.addrs[link_id], addr, data)

    def alt_tunnel(self, peer: int) -> Any:
        return self.altwan.remotes[peer].tunnel

    def candidates(self, transport: Transport) -> dict[str, tuple[int, int | None, bool]]:
        return {str(c.prefix): (c.peer_id, c.site, c.held)
                for c in self.paths._sets.get(str(transport), ())}


def two_sites(site_certs: Any, tmp: Path) -> tuple[LinkNet, TwoLinkSite, TwoLinkSite]:
    net = LinkNet(Clock())
    a = TwoLinkSite(net, site_certs, 2, tmp)  # the initiator: the higher id
    b = TwoLinkSite(net, site_certs, 1, tmp)
    return net, a, b


def test_alt_wan_comes_up_from_the_directory_beside_the_mesh(certs, tmp_path: Path) -> None:  # noqa: F811
    net, a, b = two_sites(certs, tmp_path)
    # The directory alone, no PoP: a stored one after a restart in an outage looks the same.
    a.directory, b.directory = [entry(1)], [entry(2)]
    a.altwan.on_directory()
    b.altwan.on_directory()
    net.run(3)
    ta, tb = a.alt_tunnel(1), b.alt_tunnel(2)
    assert ta.state is State.UP and tb.state is State.UP, (ta.reason, tb.reason)
    assert ta.initiator and not tb.initiator
    assert a.events == [("altwan.connect", 1)] and b.events == [("altwan.connect", 2)]
    # The mesh comes up too, over the Internet link; each tunnel keeps its own link and peer.
    a.mesh.on_punch(punch(2, 1, INET[1]))
    b.mesh.on_punch(punch(1, 2, INET[2]))
    net.run(5)
    assert a.mesh.remotes[1].tunnel.state is State.UP
    assert b.mesh.remotes[2].tunnel.state is State.UP
    assert a.fp is not None and b.fp is not None
    assert a.fp.endpoint(altwan_peer_id(1)) == (2, MPLS[1])
    assert a.fp.endpoint(1) == (1, INET[1])
    assert b.fp.endpoint(altwan_peer_id(2)) == (2, MPLS[2])
    assert a.candidates(Transport.ALT_WAN) == {"10.1.0.0/24": (altwan_peer_id(1), 1, False)}
    assert a.candidates(Transport.MESH) == {"10.1.0.0/24": (1, 1, False)}
    # With the cloud lost, a LAN packet to site 1 leaves sealed for the Alt-WAN peer, over the
    # Alt-WAN link, and B opens it as coming from site 2.
    a.paths.set_policy(Policy.CLOUD_LOST)
    r = a.fp.process_outbound(ipv4("10.2.0.5", "10.1.0.7"))
    assert (r.verdict, r.peer_id, r.link_id, r.to) == (Verdict.SEND, altwan_peer_id(1), 2, MPLS[1])
    # B accepts it only from site 2's prefixes: the Alt-WAN peer's allowed sources are its
    # site's (site/sources.py; the supervisor fills the table from the directory).
    b.fp.source_batch([("10.2.0.0/24", 2), ("10.3.0.0/24", 3)])
    got = b.fp.process_inbound(2, MPLS[2], r.data)
    assert (got.verdict, got.peer_id) == (Verdict.TUN, altwan_peer_id(2))
    r = a.fp.process_outbound(ipv4("10.3.0.5", "10.1.0.7"))  # another site's source
    got = b.fp.process_inbound(2, MPLS[2], r.data)
    assert (got.verdict, got.drop_reason) == (Verdict.DROP, "spoofed")
    # `socketctl peers`: the Alt-WAN tunnel by its site, transport alt-wan.
    rows = a.altwan.peers(set())
    assert [(r["site_id"], r["transport"], r["peer_id"], r["link"]) for r in rows] == [
        (1, "alt-wan", altwan_peer_id(1), "mpls")
    ]
    assert a.altwan.summary() == {"enabled": True, "link": "mpls", "peers": 1, "peers_up": 1}
    # Rekeys keep each where it is.
    net.run(650)
    assert a.alt_tunnel(1).handshakes >= 2 and a.alt_tunnel(1).state is State.UP
    assert a.fp.endpoint(altwan_peer_id(1)) == (2, MPLS[1])
    assert a.fp.endpoint(1) == (1, INET[1])


def test_a_silence_takes_alt_wan_off_the_traffic_and_holds_it(certs, tmp_path: Path) -> None:  # noqa: F811
    net, a, b = two_sites(certs, tmp_path)
    a.directory, b.directory = [entry(1)], [entry(2)]
    a.altwan.on_directory()
    b.altwan.on_directory()
    net.run(3)
    pid = altwan_peer_id(1)
    # The fast path saw the peer stop answering traffic (a carrier's hiccup).
    a.altwan.on_silent([1, pid])  # a mesh peer's id in the same list is not Alt-WAN's
    assert a.alt_tunnel(1).state is State.DOWN
    assert a.events[-1] == ("altwan.disconnect", 1)
    assert not a.altwan.reach(1)[0]
    a.altwan.tick()
    assert a.candidates(Transport.ALT_WAN) == {}
    # Back at once (the handshake is retried right away), but within the hold: it carries
    # recovery traffic only after the mesh until the hold ends (paths.py's held candidates),
    # then it is first again.
    t0 = net.clock.t
    while a.alt_tunnel(1).state is not State.UP:
        net.run(0.1)
        assert net.clock.t - t0 < HOLD_MIN_S - 0.5, a.alt_tunnel(1).reason
    assert a.candidates(Transport.ALT_WAN) == {"10.1.0.0/24": (pid, 1, True)}
    net.run(HOLD_MIN_S)
    assert a.candidates(Transport.ALT_WAN) == {"10.1.0.0/24": (pid, 1, False)}


def test_the_directory_moves_and_removes_alt_wan_tunnels(certs, tmp_path: Path) -> None:  # noqa: F811
    net, a, b = two_sites(certs, tmp_path)
    a.directory, b.directory = [entry(1)], [entry(2)]
    a.altwan.on_directory()
    b.altwan.on_directory()
    net.run(3)
    pid = altwan_peer_id(1)
    # A PoP that restarted does not know an offline site's Alt-WAN endpoint: kept.
    a.directory = [entry(1, online=False, altwan=None)]
    net.run(1)
    assert a.alt_tunnel(1).state is State.UP
    # Site 1's Alt-WAN address changes: the tunnel follows it.
    MPLS_NEW = ("10.200.0.11", 4800)
    net.where[MPLS_NEW] = net.where.pop(MPLS[1])
    b.addrs[2] = MPLS_NEW
    a.directory = [entry(1, altwan=[f"{MPLS_NEW[0]}:{MPLS_NEW[1]}"])]
    b.altwan.remotes[2].tunnel.declare_down("moved")  # its side starts over too
    net.run(5)
    assert a.alt_tunnel(1).state is State.UP and a.alt_tunnel(1).endpoint == MPLS_NEW
    # Online without an endpoint (its Alt-WAN link left its configuration): removed.
    a.directory = [entry(1, altwan=[])]
    net.run(0.2)
    assert 1 not in a.altwan.remotes and a.candidates(Transport.ALT_WAN) == {}
    assert a.fp is not None
    try:
        a.fp.peer_counters(pid)
        raise AssertionError("the fast-path peer is still there")
    except FastPathError:
        pass
    # Unusable endpoints are not tried: IPv6 (the link socket is IPv4), loopback.
    a.directory = [entry(1, altwan=["[fd00::1]:4800", "127.0.0.1:4800", "not an endpoint"])]
    net.run(0.2)
    assert 1 not in a.altwan.remotes
    assert a.altwan.reach(1) == (False, "the directory lists no Alt-WAN endpoint for it")
