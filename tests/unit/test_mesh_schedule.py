"""The mesh's schedule of settled tunnels (Mesh._due: busy peers every tick, settled ones when
their tunnel has something due): two real Meshes, real DTLS and real fast paths driven
synchronously in simulated time, against news that reaches a tunnel through the session layer
rather than through the mesh, and against a failing tick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_tunnel_sim import Clock, Net, SimSite, certs  # noqa: F401  (fixture)

from sdwan.common.probe import PROBE_TYPE
from sdwan.common.store import Store
from sdwan.site.config import Link
from sdwan.site.config import Mesh as MeshConfig
from sdwan.site.links import LinkManager
from sdwan.site.mesh import Mesh, PathState
from sdwan.site.paths import Paths
from sdwan.site.tunnel import State, Timers

A_ADDR, B_ADDR = ("198.51.100.3", 4800), ("198.51.100.2", 4800)
SECRET = bytes(range(32)).hex()
MESH_TIMERS = Timers(rekey_s=600, dead_after_s=1e9)
DIRECTORY = [{"site_id": 1, "subnets": [], "offcloud": True},
             {"site_id": 2, "subnets": [], "offcloud": True}]


def mesh_site(
    net: Net, site_certs: Any, site_id: int, addr: tuple[str, int], tmp: Path,
    links_cfg: tuple[Link, ...] = (Link("wan1", "lo", 4800),),
) -> SimSite:
    site = SimSite(net, site_certs, site_id, addr, {}, MESH_TIMERS)
    assert site.fp is not None
    links = LinkManager(links_cfg, send=site.send, clock=net.clock,
                        store=Store(tmp / f"db{site_id}"))
    site.mesh = Mesh(
        site_id=site_id, cfg=MeshConfig(), links=links, fp=site.fp, port=site,
        paths=Paths(site.fp), timers=MESH_TIMERS, directory=lambda: DIRECTORY,
        ask_pop=lambda link, msg: True, clock=net.clock,
    )
    site.sessions.add_owner(site.mesh)
    site.sessions.add_handler(PROBE_TYPE, site.mesh.on_probe)
    return site


def punch(me: int, peer: int, peer_addr: tuple[str, int]) -> dict[str, Any]:
    host, port = peer_addr
    return {"t": "punch", "peer": peer, "link": 1, "peer_link": 1, "gen": 7, "secret": SECRET,
            "initiator": me > peer, "window": 1,
            "candidates": [{"how": "reflexive", "addr": f"{host}:{port}"}],
            "peer_nat": "port-preserving"}


def wait_for_a_far_turn(net: Net, peer: Any) -> None:
    """Until the peer's next turn is ~10 s away: right after its turn, settled."""
    while peer.turn_at is None or peer.turn_at - net.clock.t < 9.0:
        net.run(0.05)


def lose_the_responders_first_key(net: Net, tunnel: Any) -> dict[str, int]:
    """Drop the responder's (B's) first application record while its tunnel announces new
    keys: its `key`. Returns the count of records dropped (1 once it happened)."""
    dropped = {"n": 0}

    def tap(src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        if (src == B_ADDR and data[:1] == b"\x17" and tunnel._keys.pending_idx is not None
                and dropped["n"] == 0):
            net.queue.remove((src, dst, data))
            dropped["n"] += 1

    net.tap = tap
    return dropped


def mesh_pair(
    site_certs: Any, tmp: Path, links_cfg: tuple[Link, ...] = (Link("wan1", "lo", 4800),)
) -> tuple[Net, SimSite, SimSite]:
    net = Net(Clock())
    a = mesh_site(net, site_certs, 2, A_ADDR, tmp, links_cfg)  # the initiator
    b = mesh_site(net, site_certs, 1, B_ADDR, tmp, links_cfg)
    a.mesh.on_punch(punch(2, 1, B_ADDR))
    b.mesh.on_punch(punch(1, 2, A_ADDR))
    net.run(5)
    ta, tb = a.mesh.remotes[1].tunnel, b.mesh.remotes[2].tunnel
    assert ta is not None and tb is not None
    assert ta.state is State.UP and tb.state is State.UP, (ta.reason, tb.reason)
    assert a.mesh.remotes[1].paths[1].state is PathState.DIRECT
    return net, a, b


def test_mesh_pair_comes_up_and_settles(certs, tmp_path: Path) -> None:  # noqa: F811
    net, a, b = mesh_pair(certs, tmp_path)
    net.run(20)
    ta, tb = a.mesh.remotes[1].tunnel, b.mesh.remotes[2].tunnel
    assert ta.session.released and tb.session.released
    assert 1 not in a.mesh._busy and 2 not in b.mesh._busy


def test_a_responder_resends_a_lost_key_promptly_after_a_rekey(certs, tmp_path: Path) -> None:  # noqa: F811
    """The initiator rekeys while the responder's tunnel is settled (its next turn ~10 s away);
    the responder's first `key` is lost. The handshake's news reaches the tunnel from the
    session layer, which wakes its peer: the resend goes out 0.5 s later, not at the turn."""
    net, a, b = mesh_pair(certs, tmp_path)
    net.run(20)  # both settled, sessions freed
    peer_b = b.mesh.remotes[2]
    # Right after the responder's turn: its next one is ~10 s away.
    wait_for_a_far_turn(net, peer_b)
    tb = b.mesh.remotes[2].tunnel
    dropped = lose_the_responders_first_key(net, tb)
    a.mesh.on_key_event(1, expired=False)  # the fast path asks for a rekey: a new handshake
    t0 = net.clock.t
    while tb._keys.pending_idx is None or tb.session is None or not dropped["n"]:
        net.run(0.05)
        assert net.clock.t - t0 < 5
    t_key = net.clock.t
    while tb._keys.pending_idx is not None:
        net.run(0.05)
        assert net.clock.t - t_key < 30
    waited = net.clock.t - t_key
    # The resend timer says 0.5 s.
    assert waited <= 1.5, f"responder's key resent only after {waited:.1f} s"


def test_an_exception_in_one_peers_tick_does_not_lose_the_others_turns(tmp_path: Path) -> None:
    """Three peers whose punches failed wait for their next punch request (not busy: their
    turns are in the heap). One request raises (a PoP session in a bad state, say): every
    peer of that tick still gets its next turn, and all of them ask again."""
    from sdwan.bindings.fastpath import FastPath

    class Port:
        def send(self, *a: Any) -> None:
            pass

        def client_session(self, *a: Any) -> Any:
            raise AssertionError

        def forget_session(self, *a: Any) -> None:
            pass

    clock = Clock()
    fp = FastPath()
    links = LinkManager((Link("wan1", "lo", 4800),), send=lambda *a: None, clock=clock,
                        store=Store(tmp_path / "db"))
    asked: list[int] = []
    boom = {"armed": False}

    def ask_pop(link: int, msg: dict[str, Any]) -> bool:
        if boom["armed"]:
            boom["armed"] = False
            raise RuntimeError("send() needs an established, open session")
        asked.append(msg["peer"])
        return True

    directory = [{"site_id": s, "subnets": [], "offcloud": True} for s in (1, 3, 4, 5)]
    mesh = Mesh(site_id=1, cfg=MeshConfig(), links=links, fp=fp, port=Port(),
                paths=Paths(fp), timers=MESH_TIMERS, directory=lambda: directory,
                ask_pop=ask_pop, clock=clock)
    for peer in (3, 4, 5):
        mesh.on_punch(punch(1, peer, ("198.51.100.9", 4000 + peer)) | {"initiator": False})
    for _ in range(int(13 / 0.05)):  # the punches fail after punch_timeout_s (10 s)
        clock.t += 0.05
        mesh.tick()
    assert all(p.paths[1].state is PathState.WAITING for p in mesh.remotes.values())
    for _ in range(int(5 / 0.05)):
        clock.t += 0.05
        mesh.tick()
    assert sorted(set(asked)) == [3, 4, 5], asked
    asked.clear()
    boom["armed"] = True
    for _ in range(int(3 / 0.05)):  # the failure is logged, per peer
        clock.t += 0.05
        mesh.tick()
    assert not boom["armed"]  # it did raise
    for _ in range(int(400 / 0.05)):  # minutes: the backoff is 4 s, then 8 s, ...
        clock.t += 0.05
        mesh.tick()
    assert set(asked) >= {3, 4, 5}, f"only these peers asked again: {sorted(set(asked))}"


def test_an_initiator_restarting_from_nat_data_is_not_held_up_by_one_lost_key(
    certs, tmp_path: Path  # noqa: F811
) -> None:
    """socketd of the initiator restarts and reconnects from its NAT data (no PoP). The
    responder's tunnel is settled; its `key` for the new handshake is lost once. The
    initiator is up as soon as the responder resends it (0.5 s), not at the responder's
    next turn (up to 10 s, a restart's whole budget)."""
    net, a, b = mesh_pair(certs, tmp_path)
    net.run(20)
    peer_b = b.mesh.remotes[2]
    wait_for_a_far_turn(net, peer_b)
    tb = peer_b.tunnel
    # The restart: a new socketd at the same address, its NAT data in the store.
    (tmp_path / "restarted").mkdir()
    a2 = mesh_site(net, certs, 2, A_ADDR, tmp_path / "restarted")
    a2.mesh.links[1].put_nat(1, B_ADDR, local_public="198.51.100.3:4800")
    dropped = lose_the_responders_first_key(net, tb)
    assert a2.mesh.load_cache() == 1
    t0 = net.clock.t
    while a2.mesh.remotes[1].tunnel is None or a2.mesh.remotes[1].tunnel.state is not State.UP:
        net.run(0.05)
        assert net.clock.t - t0 < 60
    assert dropped["n"] == 1
    took = net.clock.t - t0
    assert took <= 2.0, f"the restarted initiator's tunnel came up after {took:.1f} s"
