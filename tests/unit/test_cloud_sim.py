"""The socket's cloud side in simulated time, against a minimal in-test PoP.

Real Supervisors, real DTLS contexts and real fast paths (no threads, no TUN): every
datagram really travels over UDP on 127.0.0.1 and is run through the receiver's fast path
synchronously (`process_inbound`), while a virtual clock drives the timers, so keepalives,
dead detection, failover and the return hold time run in well under a second each.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdwan.bindings.fastpath import CtrlEvent, FastPath, FastPathConfig, Verdict
from sdwan.common.dtls import DtlsContext, DtlsSession, is_client_hello
from sdwan.common.store import Store
from sdwan.pop import pki
from sdwan.site.cloud import DOC_CONFIG, DOC_DIRECTORY, pop_peer_id
from sdwan.site.config import Cloud as CloudCfg
from sdwan.site.config import Lan, Link, Paths, Peer, Pki, Pop, Site, SiteConfig, Tunnel
from sdwan.site.socketctl import format_pop
from sdwan.site.supervisor import Supervisor

Addr = tuple[str, int]
STEP = 0.05


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


class Node:
    """Anything with link sockets whose fast path the net pumps by hand."""

    fp: FastPath
    socks: dict[int, socket.socket]
    alive: bool = True

    def on_ctrl(self, ev: CtrlEvent) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError


class Net:
    def __init__(self) -> None:
        self.clock = Clock()
        self.nodes: list[Node] = []
        # (receiver address, sender address) pairs whose datagrams are lost
        self.blocked: set[tuple[Addr, Addr]] = set()

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for node in list(self.nodes):
                for link_id, sock in node.socks.items():
                    while True:
                        try:
                            data, src = sock.recvfrom(65536)
                        except BlockingIOError:
                            break
                        moved = True
                        if not node.alive or (sock.getsockname(), src) in self.blocked:
                            continue
                        node.fp.process_inbound(link_id, src, data)
                while node.alive and (ev := node.fp.ctrl_recv()) is not None:
                    moved = True
                    node.on_ctrl(ev)
            if not moved:
                return

    def run(self, seconds: float) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end - 1e-9:
            self.clock.t += STEP
            for node in list(self.nodes):
                if node.alive:
                    node.tick()
                self.pump()


# --------------------------------------------------------------------------- the PoP


@dataclass
class _PopPeer:
    peer_id: int
    session: DtlsSession | None = None
    local_idx: int | None = None
    keyed: bool = False
    site: int | None = None
    installed_for: DtlsSession | None = None  # the session its keys were exported from


@dataclass
class MiniPop(Node):
    """Just enough PoP: cookies, key hand-over as responder, register/welcome, ping/pong,
    events/events-ack, keepalives. Not popd; popd has tests of its own."""

    net: Net
    pop_id: int
    files: tuple[Path, Path, Path]
    sites: dict[int, list[str]]
    port: int = 0
    peers: dict[Addr, _PopPeer] = field(default_factory=dict)
    registers: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    pings: int = 0
    refuse: set[int] = field(default_factory=set)
    rev: int = 1
    next_peer: int = 1
    rules: list[dict] = field(default_factory=list)  # the config's network rules

    def __post_init__(self) -> None:
        self.dtls = DtlsContext(*self.files, ("pop", self.pop_id), clock=self.net.clock)
        self.fp = FastPath(FastPathConfig.default())
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.setblocking(False)
        self.socks = {1: s}
        self.fp.link_add(1, s.fileno())
        self.addr: Addr = s.getsockname()
        self.alive = True
        self.net.nodes.append(self)

    def stop(self) -> None:
        self.alive = False
        self.net.pump()
        self.net.nodes.remove(self)
        self.socks[1].close()
        self.fp.close()

    def send(self, addr: Addr, data: bytes) -> None:
        self.fp.ctrl_send(1, addr, data)

    def directory(self, for_site: int) -> list[dict]:
        return [
            {"site_id": sid, "name": f"site-{sid}", "subnets": nets, "links": [],
             "offcloud": True, "recovery": True, "online": True}
            for sid, nets in self.sites.items() if sid != for_site
        ]

    def config(self, site: int) -> dict:
        return {"name": f"site-{site}", "subnets": self.sites[site], "offcloud": True,
                "recovery": True, "rules": self.rules}

    def push_config(self) -> None:
        self.rev += 1
        for p in self.peers.values():
            if p.keyed and p.site is not None:
                self.msg(p, {"t": "config", "rev": self.rev, "config": self.config(p.site)})

    def push_directory(self) -> None:
        self.rev += 1
        for p in self.peers.values():
            if p.keyed and p.site is not None:
                d = self.directory(p.site)
                self.msg(p, {"t": "directory", "rev": self.rev, "directory": d})

    def msg(self, p: _PopPeer, obj: dict) -> None:
        assert p.session is not None
        for d in p.session.send(json.dumps(obj).encode()):
            addr = next(a for a, q in self.peers.items() if q is p)
            self.send(addr, d)

    def on_ctrl(self, ev: CtrlEvent) -> None:
        addr, data = ev.addr, ev.data
        assert addr is not None
        p = self.peers.get(addr)
        if is_client_hello(data) and (p is None or p.session is None or p.session.established):
            res = self.dtls.accept(data, f"{addr[0]}:{addr[1]}", allowed_site_ids=self.sites)
            for r in res.replies:
                self.send(addr, r)
            if res.session is None:
                return
            if p is None:
                p = self.peers[addr] = _PopPeer(peer_id=self.next_peer)
                self.next_peer += 1
                self.fp.peer_add(p.peer_id)
            p.session = res.session
            p.keyed = False
        elif p is not None and p.session is not None:
            for r in p.session.receive(data):
                self.send(addr, r)
        else:
            return
        self._after(addr, p)

    def _after(self, addr: Addr, p: _PopPeer) -> None:
        s = p.session
        assert s is not None
        if not s.established:
            return
        if p.local_idx is None or p.installed_for is not s:
            p.installed_for = s
            tx, rx = s.export_keys()
            p.local_idx = secrets.randbits(31) + 1
            self.fp.key_install(p.peer_id, p.local_idx, tx, rx)
            self.fp.set_endpoint(p.peer_id, 1, addr)
            self.msg(p, {"t": "key", "idx": p.local_idx})
        for raw in s.take_messages():
            m = json.loads(raw)
            if m["t"] == "key":
                self.fp.key_activate(p.peer_id, p.local_idx, m["idx"])
                p.keyed = True
                self.msg(p, {"t": "key-ack", "idx": m["idx"]})
            elif m["t"] == "register":
                self.registers.append(m)
                if m["site_id"] not in self.sites or m["site_id"] in self.refuse:
                    self.msg(p, {"t": "error", "reason": "unknown site"})
                    continue
                p.site = m["site_id"]
                self.msg(p, {"t": "welcome", "rev": self.rev, "pop_id": self.pop_id,
                             "config": self.config(p.site),
                             "directory": self.directory(p.site)})
            elif m["t"] == "ping":
                self.pings += 1
                self.msg(p, {"t": "pong", "id": m["id"]})
            elif m["t"] == "events":
                self.events.extend(m["events"])
                self.msg(p, {"t": "events-ack", "up_to": m["events"][-1]["seq"]})

    def tick(self) -> None:
        for addr, p in self.peers.items():
            s = p.session
            if s is not None and not s.established:
                due = s.timeout()
                if due is not None and due <= 0:
                    for d in s.on_timeout():
                        self.send(addr, d)
            if p.keyed:
                self.fp.send_keepalive(p.peer_id)


# --------------------------------------------------------------------------- the socket


class SimSocket(Supervisor, Node):
    """socketd with its links on 127.0.0.1 and no TUN or kernel routes."""

    def __init__(self, net: Net, cfg: SiteConfig) -> None:
        super().__init__(cfg, clock=net.clock)
        self.net = net
        self.dtls = DtlsContext(cfg.pki.ca, cfg.pki.cert, cfg.pki.key, cfg.site.id,
                                clock=net.clock)
        self.fp = FastPath(FastPathConfig.default())
        self.socks = {}
        for link in cfg.links:
            s = udp()
            self.socks[self.link_ids[link.name]] = s
            self.fp.link_add(self.link_ids[link.name], s.fileno())
        self.store = Store(cfg.paths.data_dir)
        self.cloud = self._make_cloud(self.fp)
        self.rules = self._make_rules(self.fp, self.cloud)
        self.alive = True
        self.woken = True
        net.nodes.append(self)

    def addr(self, link: str) -> Addr:
        return self.socks[self.link_ids[link]].getsockname()

    def on_ctrl(self, ev: CtrlEvent) -> None:
        self._on_ctrl_event(ev)
        self.woken = True

    def tick(self) -> None:
        # As socketd's ticker does: when a packet arrived or a part's clock is due
        # (Supervisor._next_due), never on a fixed beat; a forgotten clock never fires here.
        if self.woken or self._next_due() <= self.clock():
            self.woken = False
            self._tick()

    def shutdown(self) -> None:
        self.net.nodes.remove(self)
        self.close()
        for s in self.socks.values():
            s.close()

    def routed_peer(self, dst: str) -> int:
        """The fast-path peer an IPv4 packet to dst leaves through (0 when dropped unrouted)."""
        pkt = bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]) + ipaddress.IPv4Address(
            "10.1.0.1"
        ).packed + ipaddress.IPv4Address(dst).packed
        assert self.fp is not None
        res = self.fp.process_outbound(pkt)
        return res.peer_id if res.verdict in (Verdict.SEND, Verdict.DROP) else 0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.create_ca(root / "ca", "acme")
    return root


def site_files(ca: Path, n: int) -> tuple[Path, Path, Path]:
    cert = ca / "out" / f"site-{n}.pem"
    if not cert.exists():
        pki.issue_site(ca / "ca", n, ca / "out")
    return ca / "ca" / "ca.pem", cert, ca / "out" / f"site-{n}.key"


def pop_files(ca: Path, n: int) -> tuple[Path, Path, Path]:
    cert = ca / "out" / f"pop-{n}.pem"
    if not cert.exists():
        pki.issue_pop(ca / "ca", n, ca / "out")
    return ca / "ca" / "ca.pem", cert, ca / "out" / f"pop-{n}.key"


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


SITES = {1: ["10.1.0.0/24"], 2: ["10.2.0.0/24"], 3: ["10.3.0.0/24", "10.33.0.0/16"]}


def site_config(
    ca: Path, data: Path, pops: list[MiniPop], *, links: int = 2, peers: tuple[Peer, ...] = (),
    hold_s: int = 5, site_id: int = 1,
) -> SiteConfig:
    files = site_files(ca, site_id)
    return SiteConfig(
        site=Site(site_id, f"site-{site_id}"),
        paths=Paths(data_dir=data, control_socket=data / "ctl.sock"),
        pki=Pki(*files),
        lan=Lan(subnets=(ipaddress.ip_network(f"10.{site_id}.0.0/24"),)),
        tunnel=Tunnel(),
        links=tuple(
            Link(name=f"wan{i + 1}", interface="lo", port=4800 + i, precedence=1 + i)
            for i in range(links)
        ),
        peers=peers,
        source=data / "socketd.toml",
        pops=tuple(Pop(id=p.pop_id, endpoint=p.addr) for p in pops),
        cloud=CloudCfg(return_hold_s=hold_s),
    )


def kinds(sock: SimSocket) -> list[str]:
    assert sock.store is not None
    return [e.kind for e in sock.store.events(limit=1000)]


# --------------------------------------------------------------------------- tests


def test_registers_over_every_link_and_routes_the_directory(ca: Path, tmp_path: Path) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), SITES)
    s = SimSocket(net, site_config(ca, tmp_path, [pop]))
    net.run(2)
    assert s.cloud is not None
    st = s.cloud.pop_status()
    assert [r["state"] for r in st["sessions"]] == ["connected", "connected"], st
    assert st["state"] == "up" and not st["stale"]
    assert all(r["rtt_ms"] is not None and r["rtt_ms"] < 100 for r in st["sessions"])
    regs = {r["link"]["name"]: r for r in pop.registers}
    assert set(regs) == {"wan1", "wan2"}
    assert regs["wan2"]["site_id"] == 1 and regs["wan2"]["link"]["precedence"] == 2
    assert [ln["name"] for ln in regs["wan1"]["links"]] == ["wan1", "wan2"]
    # Every other site's subnets leave through the PoP session on the best link.
    best = pop_peer_id(1, 1)
    assert s.routed_peer("10.2.0.9") == best
    assert s.routed_peer("10.33.4.4") == best
    peers = {p["site_id"]: p for p in net.nodes[1].cloud.directory_peers(())}  # type: ignore[attr-defined]
    assert peers[2]["transport"] == "cloud" and peers[3]["subnets"] == SITES[3]
    assert 1 not in peers
    assert s.store is not None
    assert s.store.get_doc(DOC_DIRECTORY) is not None and s.store.get_doc(DOC_CONFIG) is not None
    assert kinds(s).count("pop.connected") == 2 and "config.updated" in kinds(s)
    assert pop.pings >= 2
    # The events reached the PoP and were acknowledged.
    net.run(1)
    assert {e["kind"] for e in pop.events} >= {"pop.connected", "config.updated"}
    assert s.store.uploaded_seq() == s.store.last_seq()


def test_directory_push_changes_routes_and_static_peers_stay_direct(
    ca: Path, tmp_path: Path
) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), dict(SITES))
    static = Peer(site_id=2, endpoint=("127.0.0.1", 9), subnets=(
        ipaddress.ip_network("10.2.0.0/24"),), link="wan1")
    s = SimSocket(net, site_config(ca, tmp_path, [pop], peers=(static,)))
    s.fp.peer_add(2)  # type: ignore[union-attr]
    s.fp.route_set("10.2.0.0/24", 2)  # type: ignore[union-attr]
    net.run(2)
    assert s.routed_peer("10.2.0.1") == 2
    assert s.routed_peer("10.3.0.1") == pop_peer_id(1, 1)
    pop.sites[4] = ["10.4.0.0/24"]
    pop.push_directory()
    net.run(0.2)
    assert s.routed_peer("10.4.0.1") == pop_peer_id(1, 1)
    ids = [p["site_id"] for p in s.cloud.directory_peers(exclude=[2])]  # type: ignore[union-attr]
    assert ids == [3, 4]


def test_directory_deltas_apply_on_their_base_and_a_gap_waits_for_the_whole(
    ca: Path, tmp_path: Path
) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), dict(SITES))
    s = SimSocket(net, site_config(ca, tmp_path, [pop], links=1))
    net.run(2)
    cloud = s.cloud
    assert cloud is not None
    base = cloud.directory_rev
    p = next(iter(pop.peers.values()))
    entry = {"site_id": 4, "name": "site-4", "subnets": ["10.4.0.0/24"], "links": [],
             "offcloud": True, "recovery": True, "online": True}
    pop.msg(p, {"t": "directory-delta", "base": base, "rev": base + 1, "changed": [entry],
                "removed": [3]})
    net.run(0.2)
    assert [e["site_id"] for e in cloud.directory] == [2, 4] and cloud.directory_rev == base + 1
    assert s.routed_peer("10.4.0.1") == pop_peer_id(1, 1)
    assert not s.routed_peer("10.3.0.1")  # no route: no peer
    # A delta on another base (one was lost) is not applied: the directory stays whole.
    pop.msg(p, {"t": "directory-delta", "base": base + 5, "rev": base + 6, "changed": [],
                "removed": [2]})
    net.run(0.2)
    assert [e["site_id"] for e in cloud.directory] == [2, 4]
    assert cloud.summary()["messages"]["directory_gaps"] == 1


def test_keepalives_to_the_pop_go_out_while_the_loop_does_nothing(
    ca: Path, tmp_path: Path
) -> None:
    """The PoP sessions' keepalives come from the fast path's own thread: with no tick of
    socketd's loop at all (a stall taking in a thousand-site directory), the PoP still
    hears from the site every keepalive interval, so it never drops the site."""
    import time

    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), SITES)
    s = SimSocket(net, site_config(ca, tmp_path, [pop]))
    net.run(2)
    assert s.cloud is not None and s.cloud.state == "up"
    peer = pop_peer_id(1, 1)
    before = s.fp.peer_counters(peer).tx_packets
    time.sleep(1.0)  # the loop stalls: nothing in Python runs
    sent = s.fp.peer_counters(peer).tx_packets - before
    assert sent >= 3, sent  # every 200 ms (dead_after is 600 ms)


def test_a_dead_pop_is_detected_on_the_virtual_clock(ca: Path, tmp_path: Path) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), SITES)
    s = SimSocket(net, site_config(ca, tmp_path, [pop]))
    net.run(2)
    assert s.cloud is not None and s.cloud.state == "up"
    pop.alive = False
    net.run(0.5)
    assert s.cloud.state == "up"  # 500 ms of silence is not death yet
    net.run(0.25)
    st = s.cloud.pop_status()
    assert st["state"] != "up", st
    assert all(r["state"] != "connected" for r in st["sessions"])
    assert kinds(s).count("pop.disconnected") == 2
    down = [e for e in s.store.events(kind="pop.disconnected")]  # type: ignore[union-attr]
    assert "no packets from the PoP" in down[0].text


def test_a_restarted_pop_gets_registrations_again(ca: Path, tmp_path: Path) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), SITES)
    s = SimSocket(net, site_config(ca, tmp_path, [pop], links=1))
    net.run(2)
    port = pop.addr[1]
    pop.stop()
    net.run(2)
    assert s.cloud is not None and s.cloud.state != "up"
    pop2 = MiniPop(net, 1, pop_files(ca, 1), SITES, port=port)
    net.run(4)
    assert s.cloud.state == "up", s.cloud.pop_status()
    assert len(pop2.registers) == 1


def test_secondary_only_when_every_primary_session_is_dead_and_back_after_hold(
    ca: Path, tmp_path: Path
) -> None:
    net = Net()
    primary = MiniPop(net, 1, pop_files(ca, 1), SITES)
    secondary = MiniPop(net, 2, pop_files(ca, 2), SITES)
    s = SimSocket(net, site_config(ca, tmp_path, [primary, secondary], hold_s=5))
    net.run(2)
    assert s.cloud is not None and s.cloud.active == 0
    assert not secondary.registers  # no sessions to the secondary while the primary is fine
    # wan1 loses the primary: wan2 still reaches it, so no switch; routes move to wan2.
    net.blocked |= {(primary.addr, s.addr("wan1")), (s.addr("wan1"), primary.addr)}
    net.run(1.5)
    assert s.cloud.active == 0
    assert s.routed_peer("10.2.0.1") == pop_peer_id(1, 2)
    # Now the primary is gone entirely.
    primary.alive = False
    net.run(1.5)
    assert s.cloud.active == 1, s.cloud.pop_status()
    assert s.routed_peer("10.2.0.1") == pop_peer_id(2, 1)
    assert "pop.switched" in kinds(s)
    # The primary returns: sockets stay on the secondary for the hold time.
    primary.alive = True
    net.blocked.clear()
    net.run(3)
    assert s.cloud.active == 1
    assert any(r["state"] == "connected" and r["role"] == "primary"
               for r in s.cloud.pop_status()["sessions"])
    net.run(4)
    assert s.cloud.active == 0
    assert s.routed_peer("10.2.0.1") == pop_peer_id(1, 1)
    assert not any(ps.pop.id == 2 for ps in s.cloud.sessions.values())
    assert kinds(s).count("pop.switched") == 2


def test_restart_without_a_pop_uses_the_stored_copy(ca: Path, tmp_path: Path) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), SITES)
    cfg = site_config(ca, tmp_path, [pop])
    s = SimSocket(net, cfg)
    net.run(2)
    s.shutdown()
    pop.alive = False
    s2 = SimSocket(net, cfg)
    net.run(1)
    assert s2.cloud is not None
    summary = s2.cloud.summary()
    assert summary["stale"] and summary["sites"] == 2 and summary["state"] != "up"
    assert {p["site_id"] for p in s2.cloud.directory_peers(())} == {2, 3}
    assert s2.routed_peer("10.3.0.7") == pop_peer_id(1, 1)
    pop.alive = True
    net.run(3)
    assert not s2.cloud.summary()["stale"]


UDP53 = {"name": "dns", "transport": "offcloud", "secondary": "none", "src": None,
         "dst": ["site-3"], "src_subnets": None, "dst_subnets": ["10.3.0.0/24"],
         "protocol": "udp", "ports": [[53, 53]], "complex": []}


def test_the_configs_rules_are_installed_and_survive_a_restart_without_the_pop(
    ca: Path, tmp_path: Path
) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), SITES)
    pop.rules = [UDP53, {**UDP53, "name": "video", "transport": "cloud", "secondary": None,
                         "dst_subnets": None, "dst": None, "ports": [],
                         "complex": ["applications"]}]
    cfg = site_config(ca, tmp_path, [pop])
    s = SimSocket(net, cfg)
    net.run(2)
    assert s.rules is not None and s.fp is not None
    assert [r.name for r in s.rules.rules] == ["dns", "video"]
    assert len(s.fp.rules_counters().hits) == 2
    st = s.rules.status()
    dns, video = st["rules"]
    # No mesh here: site 3's UDP 53 has no off-cloud path, and its secondary drops it.
    assert dns["now"] == "dropped" and [d["prefix"] for d in dns["destinations"]] == [
        "10.3.0.0/24"]
    assert video["evaluated"] is False and video["now"] == "cloud"
    assert "its traffic goes to the PoP" in video["note"]

    # A config whose rules cannot be read: the rules in force stay, and status says why.
    pop.rules = [{**UDP53, "ports": [[53]]}]
    pop.push_config()
    net.run(1)
    assert [r.name for r in s.rules.rules] == ["dns", "video"]
    assert "rule 0 (dns): port range [53]" in (s.rules.status()["error"] or "")

    # Restarted with the PoP gone: the stored config's rules are in force at once.
    pop.rules = [UDP53]
    pop.push_config()
    net.run(1)
    assert s.rules.status()["error"] is None and len(s.rules.rules) == 1
    s.shutdown()
    pop.alive = False
    s2 = SimSocket(net, cfg)
    assert s2.rules is not None and s2.fp is not None
    assert [r.name for r in s2.rules.rules] == ["dns"]
    assert len(s2.fp.rules_counters().hits) == 1


def test_refused_registration_and_garbage_messages(ca: Path, tmp_path: Path) -> None:
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), {2: ["10.2.0.0/24"], 9: ["10.9.0.0/24"]})
    pop.refuse.add(9)
    s = SimSocket(net, site_config(ca, tmp_path, [pop], links=1, site_id=9))
    net.run(1)
    st = s.cloud.pop_status()  # type: ignore[union-attr]
    row = st["sessions"][0]
    assert row["state"] == "down" and "refused the registration: unknown site" in row["reason"]
    assert st["messages"]["refused"] >= 1
    pop.refuse.clear()
    net.run(31)
    assert s.cloud.state == "up"  # type: ignore[union-attr]
    p = next(iter(pop.peers.values()))
    pop.msg(p, {"t": "config"})
    pop.msg(p, {"t": "directory", "rev": 9, "directory": [{"site_id": "x"}, {"site_id": 2,
                                                          "subnets": ["10.2.0.0/24"]}]})
    pop.msg(p, {"t": "from-the-future"})
    net.run(0.2)
    m = s.cloud.summary()["messages"]  # type: ignore[union-attr]
    assert m["malformed"] == 1 and m["unknown"] == 1 and m["bad_directory_entries"] == 1
    assert s.cloud.state == "up"  # type: ignore[union-attr]


def test_directory_prefixes_that_would_take_routes_are_refused_counted_and_logged_once(
    ca: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = {
        1: ["10.1.0.0/24"],
        2: ["10.2.0.0/24"],  # a static peer too: its own subnet is no hijack
        4: ["0.0.0.0/0"],
        5: ["128.0.0.0/1", "10.5.0.0/24"],
        6: ["10.1.0.0/16"],  # over our LAN
        7: ["10.2.0.128/25", "10.7.0.0/24"],  # inside the static peer's subnet
        8: ["127.0.0.0/8", "2000::/3"],
    }
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), hostile)
    static = Peer(site_id=2, endpoint=("127.0.0.1", 9), subnets=(
        ipaddress.ip_network("10.2.0.0/24"),), link="wan1")
    s = SimSocket(net, site_config(ca, tmp_path, [pop], links=1, peers=(static,)))
    s.fp.peer_add(2)  # type: ignore[union-attr]
    logging.disable(logging.NOTSET)
    with caplog.at_level(logging.WARNING, logger="sdwan.site.cloud"):
        net.run(2)
        pop.push_directory()  # the same directory again, as a PoP does
        net.run(0.5)
    cloud = s.cloud
    assert cloud is not None and cloud.state == "up"
    via_pop = pop_peer_id(1, 1)

    # What the operator sees: the count, and each refusal with its reason.
    assert cloud.summary()["messages"]["refused_prefixes"] == 6
    assert cloud.summary()["messages"]["bad_directory_entries"] == 0
    refused = {(r["site_id"], r["prefix"]): r["reason"]
               for r in cloud.pop_status()["refused_prefixes"]}
    assert refused == {
        (4, "0.0.0.0/0"): "0.0.0.0/0 is a default route: shorter than /8, the widest prefix"
        " accepted",
        (5, "128.0.0.0/1"): "128.0.0.0/1 is a /1: shorter than /8, the widest prefix accepted",
        (6, "10.1.0.0/16"): "10.1.0.0/16 overlaps 10.1.0.0/24 of the LAN",
        (7, "10.2.0.128/25"): "10.2.0.128/25 overlaps 10.2.0.0/24 of static peer site 2",
        (8, "127.0.0.0/8"): "127.0.0.0/8 overlaps the loopback range 127.0.0.0/8",
        (8, "2000::/3"): "2000::/3 is a /3: shorter than /8, the widest prefix accepted",
    }
    out = io.StringIO()
    format_pop(cloud.pop_status(), out)
    assert "refused  6 prefixes of the directory, never routed:" in out.getvalue()
    assert "  site 5 128.0.0.0/1: 128.0.0.0/1 is a /1: shorter than /8" in out.getvalue()
    # Logged once each, though the directory came twice.
    logged = [r.getMessage() for r in caplog.records if "never routed" in r.getMessage()]
    assert len(logged) == 6, logged
    assert "prefix 128.0.0.0/1 of site 5 refused" in " ".join(logged)

    # Never installed: no default or half-default route, the LAN and the static peer keep
    # their own; the good prefixes of the same entries are routed through the PoP.
    assert s.routed_peer("200.1.1.1") == 0
    assert s.routed_peer("8.8.8.8") == 0
    assert s.routed_peer("10.1.0.9") == 0  # our LAN: never into the tunnel
    assert s.routed_peer("10.2.0.200") == 2
    assert s.routed_peer("10.5.0.9") == via_pop and s.routed_peer("10.7.0.9") == via_pop
    assert s.paths is not None
    seen = {r["prefix"] for r in s.paths.status()["routes"]} | {
        u["prefix"] for u in s.paths.status()["unused"]
    }
    assert seen.isdisjoint(p for _, p in refused), seen
    # Nor shown as a site's subnets, nor stored.
    peers = {p["site_id"]: p for p in cloud.directory_peers(())}
    assert peers[4]["subnets"] == [] and peers[5]["subnets"] == ["10.5.0.0/24"]
    assert peers[2]["subnets"] == ["10.2.0.0/24"]
    assert s.store is not None
    stored = s.store.get_doc(DOC_DIRECTORY)
    assert stored is not None
    assert {n for e in stored.value["directory"] for n in e["subnets"]} == {
        "10.2.0.0/24", "10.5.0.0/24", "10.7.0.0/24"
    }


def test_no_pops_means_no_cloud(ca: Path, tmp_path: Path) -> None:
    net = Net()
    s = SimSocket(net, site_config(ca, tmp_path, []))
    net.run(0.5)
    assert s.cloud is not None and s.cloud.state == "off" and not s.cloud.sessions


def test_an_offline_sites_last_altwan_endpoints_are_kept(ca: Path, tmp_path: Path) -> None:
    # A PoP that restarted (or a secondary) does not know an offline site's Alt-WAN
    # endpoints: the last ones known stay in the directory and its stored copy.
    net = Net()
    pop = MiniPop(net, 1, pop_files(ca, 1), {1: ["10.1.0.0/24"], 3: ["10.3.0.0/24"]})
    s = SimSocket(net, site_config(ca, tmp_path, [pop], links=1))
    net.run(2)
    cloud = s.cloud
    assert cloud is not None and cloud.state == "up"
    entry = {"site_id": 3, "name": "site-3", "subnets": ["10.3.0.0/24"], "offcloud": True,
             "recovery": True, "online": True, "altwan": ["10.200.0.3:4800"]}
    cloud._set_directory("r1", [entry])
    cloud._set_directory("r2", [{**entry, "online": False, "altwan": []}])
    assert cloud.directory[0]["altwan"] == ["10.200.0.3:4800"]
    assert s.store is not None
    from sdwan.site.cloud import DOC_DIRECTORY

    stored = s.store.get_doc(DOC_DIRECTORY)
    assert stored is not None and stored.value["directory"][0]["altwan"] == ["10.200.0.3:4800"]
    # Online without one: the PoP knows it has none now (its link was taken out).
    cloud._set_directory("r3", [{**entry, "altwan": []}])
    assert not cloud.directory[0].get("altwan")
