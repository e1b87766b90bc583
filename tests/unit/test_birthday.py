"""The birthday approach for a port-randomising NAT: its odds, the PoP's choice of mode and
roles, the hard side's extra sockets and the one that gets through becoming the tunnel's link,
the easy side's paced probes, the reason when both sides randomise, and the extra sockets' real
I/O. The mesh runs on a real fast path and store; the network is lists of sent datagrams."""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdwan.bindings.fastpath import FastPath
from sdwan.common import probe
from sdwan.common.probe import Kind, Probe
from sdwan.common.store import Store
from sdwan.common.stun import Endpoint
from sdwan.pop.broker import STALE_REQUEST_S, Broker, MeshLink
from sdwan.site.birthday import NAT_PORTS, LinkSockets, miss_chance, random_ports
from sdwan.site.config import Link
from sdwan.site.config import Mesh as MeshConfig
from sdwan.site.links import LinkError, LinkManager
from sdwan.site.mesh import (
    BIRTHDAY_PPS,
    BIRTHDAY_START_S,
    BOTH_RANDOMISE,
    EXTRA_LINK_BASE,
    Mesh,
    PathState,
)
from sdwan.site.paths import Paths
from sdwan.site.tunnel import Timers

Addr = tuple[str, int]
SECRET = bytes(range(32))
EASY_EP = ("198.51.100.12", 4800)  # the port-preserving side's endpoint
HARD_IP = "198.51.100.11"
PORTS = (47000, 47999)  # a range the machine running the tests leaves free


# --------------------------------------------------------------------------- the numbers


def test_the_default_numbers_find_a_path_98_percent_of_the_time_and_99_97_after_a_miss() -> None:
    cfg = MeshConfig()
    miss = miss_chance(cfg.birthday_sockets, cfg.birthday_probes)
    assert 1 - miss > 0.98
    assert 1 - miss**2 > 0.9996
    # Close to the usual approximation exp(-m k / n).
    assert miss == pytest.approx(math.exp(-256 * 1024 / 64512), rel=0.05)
    # 19 of 20 punches or more, 95 % of the time (binomial).
    p = 1 - miss
    assert p**20 + 20 * p**19 * miss > 0.95
    assert miss_chance(0, 1024) == 1.0 and miss_chance(256, 0) == 1.0
    assert miss_chance(64000, 1000) == 0.0


def test_random_ports_are_distinct_and_inside_the_range() -> None:
    rng = random.Random(7)
    ports = random_ports(1024, *NAT_PORTS, rng)
    assert len(set(ports)) == 1024 and all(1024 <= p <= 65535 for p in ports)
    assert sorted(random_ports(50, 10, 19, rng)) == list(range(10, 20))


# --------------------------------------------------------------------------- the PoP's choice


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def broker_with(nat1: str | None, nat2: str | None) -> tuple[Broker, list[Any], Clock]:
    sent: list[tuple[int, int, dict[str, Any]]] = []
    clock = Clock()
    b = Broker(lambda s, lid, m: sent.append((s, lid, m)) or True, clock=clock)
    b.update(
        [
            MeshLink(1, 1, 1, (HARD_IP, 31000), epoch=1.0, nat=nat1),
            MeshLink(2, 1, 1, EASY_EP, epoch=1.0, nat=nat2),
        ],
        offcloud_sites={1, 2},
    )
    return b, sent, clock


def test_a_failed_window_punch_is_followed_by_a_birthday_one_when_one_side_randomises() -> None:
    b, sent, clock = broker_with("port-randomising", "port-preserving")
    # A new path starts with the window, whatever the NATs.
    assert [m["mode"] for _, _, m in sent] == ["window", "window"]
    assert all("role" not in m for _, _, m in sent)
    gen = sent[0][2]["gen"]
    sent.clear()
    clock.t += 10
    assert b.on_request(2, 1, {"peer": 1, "gen": gen}) is None
    roles = {s: (m["mode"], m["role"]) for s, _, m in sent}
    assert roles == {1: ("birthday", "hard"), 2: ("birthday", "easy")}
    new_gen = sent[0][2]["gen"]
    # The other side gave up on the same punch: its request crossed the new one.
    sent.clear()
    clock.t += 0.5
    assert b.on_request(1, 1, {"peer": 2, "gen": gen}) is None
    b.tick()
    clock.t += 5
    b.tick()
    assert sent == [] and b.stats.requests_stale == 1
    # The birthday punch failed too: asked again, birthday again.
    clock.t += 10
    b.on_request(1, 1, {"peer": 2, "gen": new_gen})
    assert [m["mode"] for _, _, m in sent] == ["birthday", "birthday"]
    assert b.status()["paths"][0]["mode"] == "birthday" and b.status()["birthday"] == 2


def test_a_request_for_an_old_generation_long_after_the_punch_is_taken() -> None:
    # The site never got the newer punch (lost on its way): it asks again, and gets one.
    b, sent, clock = broker_with("port-randomising", "none")
    gen = sent[0][2]["gen"]
    b.on_request(1, 1, {"peer": 2})  # without a generation: as before, deferred
    clock.t += 2.1
    b.tick()
    sent.clear()
    clock.t += STALE_REQUEST_S + 0.1
    b.on_request(2, 1, {"peer": 1, "gen": gen})
    assert len(sent) == 2 and b.stats.requests_stale == 0


def test_a_deferred_request_is_punched_birthday_and_a_deferred_change_window() -> None:
    b, sent, clock = broker_with("port-randomising", "port-preserving")
    gen = sent[0][2]["gen"]
    sent.clear()
    clock.t += 0.5
    b.on_request(2, 1, {"peer": 1, "gen": gen})  # within min_repunch_s: deferred
    assert sent == []
    clock.t += 2
    b.tick()
    assert [m["mode"] for _, _, m in sent] == ["birthday", "birthday"]
    # A site re-registering with a new endpoint soon after: deferred too, but nobody asked.
    sent.clear()
    clock.t += 0.5
    b.update(
        [
            MeshLink(1, 1, 1, (HARD_IP, 31001), epoch=1.0, nat="port-randomising"),
            MeshLink(2, 1, 1, EASY_EP, epoch=1.0, nat="port-preserving"),
        ],
        offcloud_sites={1, 2},
    )
    clock.t += 2
    b.tick()
    assert [m["mode"] for _, _, m in sent] == ["window", "window"]


@pytest.mark.parametrize(
    ("nats", "mode"),
    [
        (("port-randomising", "port-randomising"), "window"),
        (("port-preserving", "port-changing"), "window"),
        # Not known to randomise: worth the birthday approach (a miss costs one punch).
        ((None, "port-randomising"), "birthday"),
    ],
    ids=["both-randomise", "neither", "one-unknown"],
)
def test_the_birthday_approach_is_for_exactly_one_randomising_side(
    nats: tuple[str | None, str | None], mode: str
) -> None:
    b, sent, clock = broker_with(*nats)
    gen = sent[0][2]["gen"]
    sent.clear()
    clock.t += 10
    b.on_request(2, 1, {"peer": 1, "gen": gen})
    assert [m["mode"] for _, _, m in sent] == [mode, mode]


# --------------------------------------------------------------------------- the site's side


class Net:
    """The link sockets' side of the network: what the mesh sent through the fast path."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, Addr, bytes]] = []
        self.t = 1000.0

    def clock(self) -> float:
        return self.t

    def send(self, link_id: int, addr: Addr, data: bytes) -> None:
        self.sent.append((link_id, addr, data))
    # Nothing else: site 1 is the responder, it never starts a handshake.


class FakeSockets(LinkSockets):
    """Real UDP sockets on 127.0.0.1 (the fast path takes one over); what is sent from them is
    recorded, and the test hands them datagrams through the callbacks they were watched with."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[Addr, bytes], None]] = {}  # by local port
        self.sent: list[tuple[int, Addr, bytes]] = []
        self.closed: list[int] = []

    def open(self, link: Link, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            sock.close()
            raise LinkError(f"link {link.name}: cannot bind UDP port {port}: {e.strerror}") from e
        return sock

    def watch(self, sock: socket.socket, on_datagram: Callable[[Addr, bytes], None]) -> None:
        self.readers[sock.getsockname()[1]] = on_datagram

    def send(self, sock: socket.socket, addr: Addr, data: bytes) -> None:
        self.sent.append((sock.getsockname()[1], addr, data))

    def release(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self.readers.pop(sock.getsockname()[1], None)

    def close(self, sock: socket.socket) -> None:
        self.closed.append(sock.getsockname()[1])
        self.release(sock)
        sock.close()


CFG = MeshConfig(birthday_ports=PORTS, birthday_sockets=16, birthday_probes=200)


def make_mesh(net: Net, store: Store, sockets: LinkSockets | None) -> Mesh:
    fp = FastPath()
    links = LinkManager(
        (Link("wan1", "lo", 4800),), send=net.send, clock=net.clock, store=store
    )
    return Mesh(
        site_id=1,
        cfg=CFG,
        links=links,
        fp=fp,
        port=net,
        paths=Paths(fp),
        timers=Timers(),
        directory=lambda: [{"site_id": 2, "subnets": ["10.2.0.0/24"], "offcloud": True}],
        ask_pop=lambda link, msg: True,
        clock=net.clock,
        sockets=sockets,
        rng=random.Random(1),
    )


@pytest.fixture
def net() -> Net:
    return Net()


@pytest.fixture
def socks() -> FakeSockets:
    return FakeSockets()


@pytest.fixture
def mesh(net: Net, socks: FakeSockets, tmp_path: Path) -> Mesh:
    return make_mesh(net, Store(tmp_path / "db"), socks)


def punch(**over: Any) -> dict[str, Any]:
    msg = {
        "t": "punch", "peer": 2, "link": 1, "peer_link": 1, "gen": 7, "secret": SECRET.hex(),
        "initiator": False, "window": 32,
        "candidates": [{"how": "reflexive", "addr": f"{EASY_EP[0]}:{EASY_EP[1]}"}],
        "peer_nat": "port-preserving",
    }
    return {**msg, **over}


def from_peer(kind: Kind, nonce: bytes, echo: bytes = bytes(8), secret: bytes = SECRET) -> bytes:
    return probe.encode(Probe(kind, 2, 1, 7, nonce, echo), secret)


def run(mesh: Mesh, net: Net, seconds: float, step: float = 0.05) -> None:
    for _ in range(round(seconds / step)):
        net.t += step
        mesh.tick()


def test_the_hard_side_opens_sockets_and_the_tunnel_runs_on_the_one_a_probe_came_in_on(
    mesh: Mesh, net: Net, socks: FakeSockets
) -> None:
    mesh.on_punch(punch(mode="birthday", role="hard"))
    path = mesh.remotes[2].paths[1]
    assert path.state is PathState.PUNCHING and "birthday punch: 16 sockets" in (path.reason or "")
    ports = sorted(socks.readers)
    assert len(ports) == 16 and all(PORTS[0] <= p <= PORTS[1] for p in ports)
    # One request from every socket to the easy side's endpoint, again 1 s later; none from
    # the link's own socket.
    mesh.tick()
    assert sorted(p for p, _, _ in socks.sent) == ports
    assert {a for _, a, _ in socks.sent} == {EASY_EP}
    run(mesh, net, 1.05)
    assert len(socks.sent) == 32 and net.sent == []
    assert mesh.stats.birthday_sockets == 16

    # A forgery on a socket changes nothing.
    socks.readers[ports[2]](EASY_EP, from_peer(Kind.REQUEST, b"f" * 8, secret=bytes(32)))
    assert path.extra is None and mesh.stats.probes_bad_tag == 1

    # The easy side's request got through on one socket: that socket is the path now.
    won = ports[5]
    socks.readers[won](EASY_EP, from_peer(Kind.REQUEST, b"e" * 8))
    assert (path.extra, path.fp_link, path.extra_port) == (EXTRA_LINK_BASE, EXTRA_LINK_BASE, won)
    assert socks.readers == {} and sorted(socks.closed) == [p for p in ports if p != won]
    # Answered, and asked back, over the new fast-path link.
    sent = [(lid, a, probe.peek(d)) for lid, a, d in net.sent]
    assert [(lid, a, p.kind) for lid, a, p in sent if p] == [
        (EXTRA_LINK_BASE, EASY_EP, Kind.RESPONSE), (EXTRA_LINK_BASE, EASY_EP, Kind.REQUEST)
    ]
    ours = sent[1][2]
    assert ours is not None
    # The easy side's answer arrives there too (the fast path reads that socket now).
    mesh.on_probe(EXTRA_LINK_BASE, EASY_EP, from_peer(Kind.RESPONSE, b"r" * 8, ours.nonce))
    assert path.state is PathState.CONNECTING and (path.how, path.endpoint) == ("birthday", EASY_EP)
    assert mesh.fp.endpoint(2) == (EXTRA_LINK_BASE, EASY_EP)
    assert mesh.remotes[2].tunnel is not None and mesh.remotes[2].tunnel.link_id == EXTRA_LINK_BASE
    row = mesh.peers_status()[0]
    assert (row["how"], row["local_port"]) == ("birthday", won)
    assert mesh.stats.birthday_found == 1

    # A new punch before the tunnel came up starts over on the link's socket.
    mesh.on_punch(punch(gen=8))
    assert (path.extra, path.fp_link) == (None, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        mesh.fp.link_add(EXTRA_LINK_BASE, again.fileno())  # the fast path let go of the id


def test_a_peer_removed_gives_back_its_birthday_sockets(
    mesh: Mesh, net: Net, socks: FakeSockets
) -> None:
    mesh.on_punch(punch(mode="birthday", role="hard"))
    ports = sorted(socks.readers)
    socks.readers[ports[0]](EASY_EP, from_peer(Kind.REQUEST, b"e" * 8))
    assert mesh.remotes[2].paths[1].extra == EXTRA_LINK_BASE
    mesh.remove(2, "no longer an off-cloud site of the account")
    assert socks.readers == {} and sorted(socks.closed) == ports[1:]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        mesh.fp.link_add(EXTRA_LINK_BASE, again.fileno())  # the fast path let go of it


def test_a_response_on_a_socket_also_wins_it(mesh: Mesh, net: Net, socks: FakeSockets) -> None:
    # An easy side without NAT answers the hard side's own requests straight away.
    mesh.on_punch(punch(mode="birthday", role="hard"))
    mesh.tick()
    port, _, data = socks.sent[3]
    sent = probe.peek(data)
    assert sent is not None
    socks.readers[port](EASY_EP, from_peer(Kind.RESPONSE, b"r" * 8, sent.nonce))
    path = mesh.remotes[2].paths[1]
    assert path.state is PathState.CONNECTING and path.fp_link == EXTRA_LINK_BASE
    assert path.how == "birthday" and path.extra_port == port


def test_the_easy_side_probes_random_ports_of_the_hard_side_at_its_pace(
    mesh: Mesh, net: Net
) -> None:
    mesh.on_punch(punch(
        mode="birthday", role="easy", peer_nat="port-randomising",
        candidates=[{"how": "reflexive", "addr": f"{HARD_IP}:31000"}],
    ))
    path = mesh.remotes[2].paths[1]
    assert "probing 200 random ports" in (path.reason or "")
    run(mesh, net, BIRTHDAY_START_S - 0.05)
    assert net.sent == []  # the hard side's mappings open first
    run(mesh, net, 0.2)
    # 0.15 s into the probing at 500 a second: about 75.
    assert abs(len(net.sent) - 0.15 * BIRTHDAY_PPS) <= 2
    run(mesh, net, 1.0)
    assert len(net.sent) == 200
    ports = [a[1] for _, a, _ in net.sent]
    assert len(set(ports)) == 200 and all(1024 <= p <= 65535 for p in ports)
    assert {(lid, a[0]) for lid, a, _ in net.sent} == {(1, HARD_IP)}
    # Port 117's probe hit a mapping: its answer fixes the endpoint.
    lid, hit, data = net.sent[117]
    sent = probe.peek(data)
    assert sent is not None
    mesh.on_probe(1, hit, from_peer(Kind.RESPONSE, b"r" * 8, sent.nonce))
    assert path.state is PathState.CONNECTING and (path.how, path.endpoint) == ("birthday", hit)
    assert path.fp_link == 1 and mesh.peers_status()[0]["local_port"] == 4800


def test_both_sides_randomising_stay_on_the_cloud_and_say_why(mesh: Mesh, net: Net) -> None:
    asked: list[dict[str, Any]] = []
    mesh.ask_pop = lambda link, msg: asked.append(msg) or True
    wl = mesh.links[1]
    # Two STUN answers from one socket, two ports: the NAT maps every destination anew.
    wl.stun.public = Endpoint(HARD_IP, 31000)
    wl.stun_check.public = Endpoint(HARD_IP, 52000)
    assert wl.nat_class == "port-randomising"
    mesh.on_punch(punch(peer_nat="port-randomising"))
    run(mesh, net, CFG.punch_timeout_s + 1, step=0.5)
    path = mesh.remotes[2].paths[1]
    assert path.state is PathState.WAITING and path.reason == BOTH_RANDOMISE
    run(mesh, net, 120, step=5)
    assert asked == []  # nothing the PoP can do; it punches again when a NAT changes
    row = mesh.peers_status()[0]
    assert (row["state"], row["nat"], row["peer_nat"]) == (
        "cloud only", "port-randomising", "port-randomising"
    )


def test_a_hard_side_without_extra_sockets_says_why_and_asks_again(
    net: Net, tmp_path: Path
) -> None:
    mesh = make_mesh(net, Store(tmp_path / "db"), None)
    asked: list[dict[str, Any]] = []
    mesh.ask_pop = lambda link, msg: asked.append(msg) or True
    mesh.on_punch(punch(mode="birthday", role="hard"))
    path = mesh.remotes[2].paths[1]
    assert path.state is PathState.WAITING and "no extra sockets" in (path.reason or "")
    run(mesh, net, 3, step=0.5)
    assert asked == [{"t": "punch-request", "peer": 2, "gen": 7}]


def test_a_malformed_birthday_punch_is_refused(mesh: Mesh) -> None:
    for bad in ({"mode": "lottery"}, {"mode": "birthday"}, {"mode": "birthday", "role": "x"}):
        with pytest.raises(ValueError):
            mesh.on_punch(punch(**bad))
    assert mesh.remotes == {}


def test_a_cached_birthday_path_reopens_its_socket(
    net: Net, socks: FakeSockets, tmp_path: Path
) -> None:
    store = Store(tmp_path / "db")
    first = make_mesh(net, store, socks)
    port = 47321
    first.links[1].put_nat(2, EASY_EP, local_public=f"{HARD_IP}:31000", how="birthday",
                           local_port=port)
    mesh = make_mesh(net, store, socks)
    assert mesh.load_cache() == 1
    path = mesh.remotes[2].paths[1]
    assert (path.how, path.fp_link, path.extra_port) == ("cache", EXTRA_LINK_BASE, port)
    assert mesh.fp.endpoint(2) == (EXTRA_LINK_BASE, EASY_EP)


# --------------------------------------------------------------------------- the real sockets


def test_link_sockets_skip_ports_in_use_and_read_on_the_loop() -> None:
    async def scenario() -> None:
        ls = LinkSockets()
        link = Link("wan1", "lo", 4800)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.1", 0))
            peer.setblocking(False)
            taken = ls.open(link, PORTS[0])
            socks, why = ls.open_many(link, [PORTS[0], PORTS[0] + 1, PORTS[0] + 2], 2)
            assert why is None and [s.getsockname()[1] for s in socks] == [
                PORTS[0] + 1, PORTS[0] + 2
            ]
            few, why = ls.open_many(link, [PORTS[0]], 1)
            assert few == [] and why is not None and "cannot bind UDP port" in why
            got: list[tuple[Addr, bytes]] = []
            ls.watch(socks[0], lambda addr, data: got.append((addr, data)))
            peer.sendto(b"hello", ("127.0.0.1", PORTS[0] + 1))
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert got == [(peer.getsockname(), b"hello")]
            ls.send(socks[1], peer.getsockname(), b"back")
            await asyncio.sleep(0.05)
            assert peer.recvfrom(64) == (b"back", ("127.0.0.1", PORTS[0] + 2))
            # Released: the loop no longer reads it (the fast path would).
            ls.release(socks[0])
            peer.sendto(b"again", ("127.0.0.1", PORTS[0] + 1))
            await asyncio.sleep(0.05)
            assert len(got) == 1 and socks[0].recv(64) == b"again"
            for s in (*socks, taken):
                ls.close(s)
            assert all(s.fileno() < 0 for s in socks)

    asyncio.run(scenario())


def test_the_numbers_hold_for_random_mappings() -> None:
    # A simulation of the NAT's side: 256 mappings drawn from the full range, 1024 probes to
    # distinct random ports; the hit rate over many punches matches the formula.
    rng = random.Random(int.from_bytes(os.urandom(4)))
    lo, hi = NAT_PORTS
    punches, found = 2000, 0
    for _ in range(punches):
        mappings = set(rng.sample(range(lo, hi + 1), 256))
        found += any(p in mappings for p in random_ports(1024, lo, hi, rng))
    assert abs(found / punches - (1 - miss_chance(256, 1024))) < 0.015
