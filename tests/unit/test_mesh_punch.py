"""The mesh's punching, driven directly: what it sends for a punch, what it makes of probes
(right, forged, replayed, foreign, unmatched), and that a malformed punch is refused. Real fast
path and store; the network is a list of sent datagrams."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sdwan.bindings.fastpath import FastPath
from sdwan.common import probe
from sdwan.common.probe import Kind, Probe
from sdwan.common.store import Store
from sdwan.site.config import Link
from sdwan.site.config import Mesh as MeshConfig
from sdwan.site.links import LinkManager
from sdwan.site.mesh import Mesh, PathState, window_ports
from sdwan.site.paths import Paths
from sdwan.site.tunnel import Timers

SECRET = bytes(range(32))
PEER_EP = ("198.51.100.12", 4800)


class Net:
    def __init__(self) -> None:
        self.sent: list[tuple[int, tuple[str, int], bytes]] = []
        self.t = 1000.0
        self.directory = list(DIRECTORY)

    def clock(self) -> float:
        return self.t

    def send(self, link_id: int, addr: tuple[str, int], data: bytes) -> None:
        self.sent.append((link_id, addr, data))

    def client_session(self, *a: Any) -> Any:
        raise AssertionError("no handshake expected in these tests")

    def forget_session(self, session: Any) -> None:
        pass


@pytest.fixture
def net() -> Net:
    return Net()


DIRECTORY = [{"site_id": 2, "subnets": ["10.2.0.0/24"], "offcloud": True}]


@pytest.fixture
def mesh(net: Net, tmp_path: Path) -> Mesh:
    fp = FastPath()
    links = LinkManager(
        (Link("wan1", "lo", 4800), Link("lte", "lo", 4801, precedence=3, offcloud=False)),
        send=net.send,
        clock=net.clock,
        store=Store(tmp_path / "db"),
    )
    return Mesh(
        site_id=1,
        cfg=MeshConfig(),
        links=links,
        fp=fp,
        port=net,
        paths=Paths(fp),
        timers=Timers(),
        directory=lambda: net.directory,
        ask_pop=lambda link, msg: True,
        clock=net.clock,
    )


def punch(**over: Any) -> dict[str, Any]:
    msg = {
        "t": "punch", "peer": 2, "link": 1, "peer_link": 1, "gen": 7, "secret": SECRET.hex(),
        "initiator": False, "window": 32,
        "candidates": [{"how": "reflexive", "addr": "198.51.100.12:4800"}],
        "peer_nat": "port-preserving",
    }
    return {**msg, **over}


def req(gen: int = 7, nonce: bytes = b"n" * 8, to: int = 1, secret: bytes = SECRET) -> bytes:
    return probe.encode(Probe(Kind.REQUEST, 2, to, gen, nonce), secret)


def test_window_ports_are_nearest_first_and_inside_the_port_range() -> None:
    assert window_ports(4800, 5) == [4800, 4801, 4799, 4802, 4798]
    assert window_ports(1, 4) == [1, 2, 3, 4]
    assert window_ports(65535, 3) == [65535, 65534, 65533]


def test_a_punch_probes_the_window_and_the_first_answer_fixes_the_endpoint(
    mesh: Mesh, net: Net
) -> None:
    mesh.on_punch(punch())
    mesh.tick()
    probes = [(a, probe.peek(d)) for _, a, d in net.sent if d[0] == probe.PROBE_TYPE]
    assert len(probes) == 32
    assert {a[1] for a, _ in probes} == set(window_ports(4800, 32))
    assert all(p is not None and p.kind is Kind.REQUEST and p.gen == 7 for _, p in probes)
    path = mesh.remotes[2].paths[1]
    assert path.state is PathState.PUNCHING
    # The peer's NAT shifted its port: the answer comes from 4803, which becomes the endpoint.
    target, sent = next((a, p) for a, p in probes if a[1] == 4803)
    answer = probe.encode(Probe(Kind.RESPONSE, 2, 1, 7, os.urandom(8), sent.nonce), SECRET)
    mesh.on_probe(1, target, answer)
    assert path.state is PathState.CONNECTING and path.endpoint == target
    assert path.how == "window" and path.rtt_ms is not None
    assert mesh.fp.endpoint(2) == (1, target)
    # The same answer again is not taken twice.
    mesh.on_probe(1, target, answer)
    assert mesh.stats.probes_unmatched == 1


def test_requests_are_answered_once_and_forgeries_are_counted(mesh: Mesh, net: Net) -> None:
    mesh.on_punch(punch())
    net.sent.clear()
    src = ("198.51.100.12", 4803)
    mesh.on_probe(1, src, req())
    answers = [probe.peek(d) for _, a, d in net.sent if a == src]
    assert any(p and p.kind is Kind.RESPONSE and p.echo == b"n" * 8 for p in answers)
    assert mesh.stats.probes_answered == 1
    net.sent.clear()
    mesh.on_probe(1, ("192.0.2.66", 9999), req())  # the same request, replayed elsewhere
    assert mesh.stats.probes_replayed == 1 and net.sent == []
    mesh.on_probe(1, src, req(nonce=b"x" * 8, secret=bytes(32)))
    mesh.on_probe(1, src, req(gen=8, nonce=b"y" * 8))
    mesh.on_probe(1, src, req(to=3, nonce=b"z" * 8))
    mesh.on_probe(2, src, req(nonce=b"w" * 8))  # the last-resort link takes no mesh
    mesh.on_probe(1, src, b"\xd3short")
    st = mesh.stats
    assert (st.probes_bad_tag, st.probes_foreign, st.probes_malformed) == (1, 3, 1)
    assert net.sent == [] and mesh.remotes[2].paths[1].endpoint is None


@pytest.mark.parametrize(
    "bad",
    [
        {"peer": 0}, {"peer": True}, {"link": 300}, {"gen": -1}, {"secret": "abcd"},
        {"secret": "zz" * 32}, {"window": 0}, {"candidates": []},
        {"candidates": [{"how": "teleport", "addr": "1.2.3.4:5"}]},
        {"candidates": [{"how": "reflexive", "addr": "nowhere"}]},
    ],
)
def test_a_malformed_punch_is_refused(mesh: Mesh, bad: dict[str, Any]) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        mesh.on_punch(punch(**bad))
    assert mesh.remotes == {}


@pytest.mark.parametrize(
    "over", [{"link": 2}, {"link": 9}, {"peer": 1}, {"initiator": True}],
    ids=["last-resort-link", "unknown-link", "ourselves", "wrong-initiator"],
)
def test_a_punch_the_site_cannot_take_is_ignored(mesh: Mesh, over: dict[str, Any]) -> None:
    mesh.on_punch(punch(**over))
    assert mesh.remotes == {} and mesh.stats.punches_ignored == 1


def test_a_punch_that_finds_nothing_asks_the_pop_again(mesh: Mesh, net: Net) -> None:
    asked: list[dict[str, Any]] = []
    mesh.ask_pop = lambda link, msg: asked.append(msg) or True
    mesh.on_punch(punch())
    for _ in range(40):
        net.t += 0.5
        mesh.tick()
    path = mesh.remotes[2].paths[1]
    assert path.state is PathState.WAITING and "unanswered" in (path.reason or "")
    # Naming the generation given up on: the PoP drops a request that crossed a newer punch.
    assert asked and asked[0] == {"t": "punch-request", "peer": 2, "gen": 7}


def test_a_site_that_leaves_the_mesh_loses_its_tunnel_and_nat_data(mesh: Mesh, net: Net) -> None:
    mesh.on_punch(punch())
    mesh.tick()
    target, sent = next(
        (a, probe.peek(d)) for _, a, d in net.sent if d[0] == probe.PROBE_TYPE
    )
    assert sent is not None
    mesh.on_probe(1, target, probe.encode(Probe(Kind.RESPONSE, 2, 1, 7, b"r" * 8, sent.nonce),
                                          SECRET))
    assert mesh.remotes[2].tunnel is not None
    mesh.links[1].put_nat(2, target, local_public="198.51.100.11:4800")
    net.directory = [{"site_id": 2, "subnets": ["10.2.0.0/24"], "offcloud": False}]
    mesh.on_directory()
    assert mesh.remotes == {} and mesh.links[1].nat_all() == []
    with pytest.raises(Exception, match="No such file|ENOENT|not found|No such"):
        mesh.fp.peer_counters(2)


def test_a_static_or_local_candidate_that_answers_says_so(mesh: Mesh, net: Net) -> None:
    hub = ("203.0.113.9", 5000)
    mesh.on_punch(punch(candidates=[{"how": "reflexive", "addr": "198.51.100.12:4800"},
                                    {"how": "static", "addr": "203.0.113.9:5000"}]))
    mesh.tick()
    sent = next(probe.peek(d) for _, a, d in net.sent if a == hub)
    assert sent is not None
    mesh.on_probe(1, hub, probe.encode(Probe(Kind.RESPONSE, 2, 1, 7, b"r" * 8, sent.nonce),
                                       SECRET))
    path = mesh.remotes[2].paths[1]
    assert (path.endpoint, path.how) == (hub, "static")


def test_a_closed_punch_answers_no_probes(mesh: Mesh, net: Net) -> None:
    mesh.on_punch(punch())
    mesh.tick()
    net.t += 2 * 10 + 10  # well past the punch (punch_timeout_s 10)
    net.sent.clear()
    mesh.on_probe(1, ("192.0.2.66", 9999), req())
    assert net.sent == [] and mesh.stats.probes_answered == 0
    assert mesh.stats.probes_foreign == 1


def test_only_a_kick_from_the_peers_endpoint_starts_a_handshake(mesh: Mesh, net: Net) -> None:
    mesh.on_punch(punch())
    mesh.tick()
    target, sent = next((a, probe.peek(d)) for _, a, d in net.sent if d[0] == probe.PROBE_TYPE)
    assert sent is not None
    mesh.on_probe(1, target, probe.encode(Probe(Kind.RESPONSE, 2, 1, 7, b"r" * 8, sent.nonce),
                                          SECRET))
    # We are the responder (site 1 < 2): a kick from a victim's address is refused outright.
    assert mesh.on_kick(1, ("192.0.2.66", 4800), 2) is False
    assert mesh.on_kick(1, target, 2) is True


def test_a_pair_that_cannot_be_punched_is_asked_for_less_and_less(mesh: Mesh, net: Net) -> None:
    asked: list[float] = []
    mesh.ask_pop = lambda link, msg: asked.append(net.t) or True
    for _ in range(5):
        mesh.on_punch(punch(gen=len(asked) + 10))
        before = len(asked)
        while len(asked) == before:
            net.t += 0.5
            mesh.tick()
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] > 2 * gaps[0], gaps
