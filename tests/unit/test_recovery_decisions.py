"""WAN recovery (site/recovery.py) deciding over a real fast path's prefix table: the cloud's
loss moves every recovery site onto the mesh in one batch, the hold keeps it there until the
cloud has been back long enough, a site with recovery disabled stays cut off, a site the PoP
cannot reach goes over the mesh while our cloud is up, and a start in an outage enters
recovery by itself. The mesh here is its candidates (peer id = site id, as site/mesh.py
submits them); every route is read back through the fast path's lookup."""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_paths import POP, Batches, routed

from sdwan.bindings.fastpath import FastPath
from sdwan.site.paths import Candidate, Paths, Policy, Transport
from sdwan.site.recovery import Reach, Recovery
from sdwan.site.socketctl import format_recovery


@pytest.fixture
def fp() -> Iterator[FastPath]:
    with FastPath() as fp:
        for pid in (2, 3, 4, POP):
            fp.peer_add(pid)
        yield fp


@dataclass
class World:
    """What the supervisor wires into Recovery: the cloud, the account flags, the mesh."""

    now: float = 100.0
    up: bool = True
    own: bool | None = True
    directory: list[dict[str, Any]] = field(default_factory=list)
    mesh_up: set[int] = field(default_factory=lambda: {2, 3, 4})
    ready: bool = True  # a WAN link has an address
    events: list[tuple[str, str, dict, int | None]] = field(default_factory=list)

    def site(self, site_id: int, recovery: bool = True, online: bool = True) -> dict[str, Any]:
        return {"site_id": site_id, "name": f"site-{site_id}", "offcloud": True,
                "recovery": recovery, "online": online, "subnets": [f"10.{site_id}.0.0/24"]}

    def recovery(self, paths: Paths, hold_s: float = 10.0) -> Recovery:
        return Recovery(
            paths=paths,
            cloud_up=lambda: self.up,
            cloud_enabled=lambda: True,
            own_recovery=lambda: self.own,
            directory=lambda: self.directory,
            links_ready=lambda: self.ready,
            mesh_reach=lambda s: Reach(s in self.mesh_up, None if s in self.mesh_up else "down"),
            on_event=lambda k, t, d, s: self.events.append((k, t, d, s)),
            clock=lambda: self.now,
            hold_s=hold_s,
        )

    def kinds(self) -> list[tuple[str, int | None]]:
        out = [(k, s) for k, _, _, s in self.events]
        self.events.clear()
        return out


def setup(fp: FastPath, world: World, sites: dict[int, bool]) -> Paths:
    paths = Paths(fp)
    world.directory = [world.site(s, recovery=r) for s, r in sites.items()]
    nets = {s: f"10.{s}.0.0/24" for s in sites}
    paths.submit("cloud", [Candidate(ipaddress.ip_network(n), POP, Transport.CLOUD)
                           for n in nets.values()])
    paths.submit("mesh", [Candidate(ipaddress.ip_network(n), s, Transport.MESH)
                          for s, n in nets.items() if s in world.mesh_up])
    return paths


def where(fp: FastPath, *sites: int) -> list[int | None]:
    return [routed(fp, f"10.{s}.0.1") for s in sites]


def test_cloud_lost_moves_every_recovery_site_at_once_and_back_after_the_hold(
    fp: FastPath,
) -> None:
    world = World()
    paths = setup(fp, world, {2: True, 3: True, 4: False})
    rec = world.recovery(paths, hold_s=10)
    batches = Batches(fp)
    rec.tick()
    assert where(fp, 2, 3, 4) == [POP, POP, POP] and not rec.active
    assert batches.take() == [] and world.kinds() == []

    world.up = False
    world.now += 0.05
    rec.tick()
    # Sites 2 and 3 move in one batch; site 4 has recovery disabled: cut off (its traffic
    # still goes to the dead PoP session), both ways, as the account asked.
    assert rec.active and paths.policy is Policy.CLOUD_LOST
    assert where(fp, 2, 3, 4) == [2, 3, POP]
    # One batch: the two moves, and site 4's route losing its cloud path for the transport
    # rules (docs/paths.md, "Off-cloud transport rules").
    assert batches.take() == [(3, 0)]
    (kind, text, data, site), = world.events
    world.events.clear()
    assert (kind, site) == ("offcloud.recovery.activated", None)
    assert data["sites"] == [2, 3] and "4" in data["unreachable"]
    assert "no PoP session is live" in text and "site 4" in text
    states = {s["site_id"]: s for s in rec.sites()}
    assert states[2]["state"] == "mesh" and states[4]["state"] == "unreachable"
    assert "disabled for site 4" in states[4]["why"]

    # The cloud comes back, then flaps: the hold starts again; traffic stays on the mesh.
    world.up = True
    world.now += 5
    rec.tick()
    world.up = False
    world.now += 0.5
    rec.tick()
    world.up = True
    world.now += 0.5
    rec.tick()
    world.now += 9.9
    rec.tick()
    assert rec.active and where(fp, 2, 3) == [2, 3] and world.kinds() == []
    # Each flap changed only the rules' cloud path (back while the cloud is up, gone while
    # it is down), never which peer a prefix takes.
    assert all(n == 3 for n, _ in batches.take())
    assert rec.next_due() == pytest.approx(world.now + 0.1)
    world.now += 0.1
    rec.tick()
    assert not rec.active and where(fp, 2, 3, 4) == [POP, POP, POP]
    assert batches.take() == [(2, 0)]  # the two moved back; site 4's cloud path was back
    assert world.kinds() == [("offcloud.recovery.stopped", None)]


def test_a_site_with_recovery_disabled_moves_nothing(fp: FastPath) -> None:
    world = World(own=False)
    paths = setup(fp, world, {2: True, 3: True})
    rec = world.recovery(paths)
    rec.tick()  # the cloud was up: its loss below would start recovery if the flag allowed
    world.up = False
    world.now += 1
    rec.tick()
    world.now += 10
    rec.tick()
    assert not rec.active and where(fp, 2, 3) == [POP, POP] and world.kinds() == []
    assert {s["state"] for s in rec.sites()} == {"unreachable"}
    assert {s["ready_why"] for s in rec.sites()} == {
        "WAN recovery is disabled for this site in the account"
    }
    # An offline peer is not moved onto the mesh either.
    world.up = True
    world.directory = [world.site(2, online=False), world.site(3)]
    rec.tick()
    assert where(fp, 2, 3) == [POP, POP]


def test_a_site_the_pop_cannot_reach_goes_over_the_mesh_while_our_cloud_is_up(
    fp: FastPath,
) -> None:
    world = World()
    paths = setup(fp, world, {2: True, 3: True, 4: False})
    rec = world.recovery(paths, hold_s=5)
    rec.tick()
    world.directory = [world.site(2, online=False), world.site(3), world.site(4, False, False)]
    world.now += 1
    rec.tick()
    assert not rec.active and where(fp, 2, 3, 4) == [2, POP, POP]
    assert world.kinds() == [("offcloud.recovery.activated", 2)]
    states = {s["site_id"]: s for s in rec.sites()}
    assert states[2]["state"] == "mesh" and states[3]["state"] == "cloud"
    # Site 4 is offline too but has recovery off: not carried, and said so.
    assert states[4]["state"] == "unreachable" and "disabled for site 4" in states[4]["why"]
    why = {r["prefix"]: r["why"] for r in paths.status()["routes"]}
    assert why["10.2.0.0/24"] == "site 2 is not reachable through the cloud (WAN recovery)"
    # Back online: it returns after the hold.
    world.directory = [world.site(2), world.site(3), world.site(4, False)]
    world.now += 1
    rec.tick()
    assert where(fp, 2) == [2]
    world.now += 5
    rec.tick()
    assert where(fp, 2) == [POP]
    assert world.kinds() == [("offcloud.recovery.stopped", 2)]


def test_a_start_in_an_outage_enters_recovery_after_the_boot_wait(fp: FastPath) -> None:
    # The wait runs from the moment a link has an address (a DHCP lease may take a while).
    world = World(up=False, ready=False)
    paths = setup(fp, world, {2: True})
    rec = world.recovery(paths)
    rec.tick()
    world.now += 5
    rec.tick()
    assert not rec.active
    world.ready = True
    rec.tick()
    assert not rec.active and rec.next_due() == pytest.approx(world.now + rec.boot_wait_s)
    world.now += rec.boot_wait_s
    rec.tick()
    assert rec.active and where(fp, 2) == [2]
    (_, text, _, _), = world.events
    assert "no PoP answered in the 3 s since a link had an address" in text
    # A normal start (the PoP answers within the wait) never enters recovery.
    world2 = World(up=False)
    paths2 = setup(fp, world2, {3: True})
    rec2 = world2.recovery(paths2)
    world2.now += 0.3
    world2.up = True
    rec2.tick()
    world2.now += 5
    rec2.tick()
    assert not rec2.active and world2.events == []


def test_socketctl_recovery_says_where_each_site_goes_and_why(fp: FastPath) -> None:
    import io

    world = World(up=False, mesh_up={2})
    paths = setup(fp, world, {2: True, 3: True, 4: False})
    rec = world.recovery(paths)
    rec.tick()
    world.now += rec.boot_wait_s
    rec.tick()
    out = io.StringIO()
    format_recovery({**rec.summary(), "sites": rec.sites()}, out)
    text = out.getvalue()
    assert text.startswith("recovery ACTIVE")
    lines = {ln.split()[0]: ln for ln in text.splitlines()[3:]}
    assert "mesh" in lines["2"] and "no mesh tunnel: down" in lines["3"]
    assert "disabled for site 4" in lines["4"]


def test_a_restart_in_the_middle_of_recovery_starts_in_it_at_once(fp: FastPath) -> None:
    world = World(up=False)
    paths = setup(fp, world, {2: True})
    kept: list[bool] = []
    first = world.recovery(paths)
    first.remember = kept.append
    first.tick()
    world.now += first.boot_wait_s
    first.tick()
    assert first.active and kept == [True]
    # socketd restarts (a new process reads the stored state), still without a PoP.
    again = setup(fp, world, {2: True})
    second = world.recovery(again)
    second.was_active, second.remember = kept[-1], kept.append
    assert second.next_due() == second.started
    second.tick()
    assert second.active and "recovery was active when socketd stopped" in second.reason
    assert where(fp, 2) == [2]
    world.up = True
    second.tick()
    world.now += second.hold_s
    second.tick()
    assert not second.active and kept[-1] is False


def test_a_held_mesh_tunnel_carries_recovery_traffic_only(fp: FastPath) -> None:
    # mesh.py holds a site's tunnel off the traffic for a while after its path went silent:
    # the cloud is the better choice then, but when the cloud cannot reach the site the held
    # tunnel is all there is (a peer restarted in the middle of an outage).
    paths = Paths(fp)
    paths.submit("cloud", [Candidate(ipaddress.ip_network("10.2.0.0/24"), POP, Transport.CLOUD)])
    paths.submit("mesh", [Candidate(ipaddress.ip_network("10.2.0.0/24"), 2, Transport.MESH,
                                    held=True)])
    assert where(fp, 2) == [POP]
    (unused,) = [u for u in paths.status()["unused"] if u["transport"] == "mesh"]
    assert "held off" in unused["reason"]
    paths.set_policy(Policy.CLOUD_LOST)
    assert where(fp, 2) == [2]
    paths.set_policy(Policy.CLOUD_LOST, no_recovery=[2])
    assert where(fp, 2) == [POP]
    paths.set_policy(Policy.NORMAL, lost_peers=[2], no_recovery=[])
    assert where(fp, 2) == [2]
    paths.set_policy(Policy.NORMAL, lost_peers=[])
    assert where(fp, 2) == [POP]


def test_many_sites_make_one_small_event_and_only_moves_are_news(fp: FastPath) -> None:
    import json

    world = World(mesh_up={2, 3})
    paths = setup(fp, world, {2: True, 3: True})
    rec = world.recovery(paths)
    rec.tick()
    # A PoP restarted: most of a big account is offline in its first directory. Only the
    # sites whose traffic moves (a mesh tunnel up) are news, in one event.
    world.directory = [world.site(s, online=s not in range(3, 1000)) for s in range(2, 1000)]
    world.now += 1
    rec.tick()
    (kind, text, data, site), = world.events
    world.events.clear()
    assert kind == "offcloud.recovery.activated" and site == 3 and data["sites"] == [3]
    assert len(rec.summary()["lost_sites"]) == 997
    # Back online: one Stopped event after the hold, for the one that had moved... and for
    # all of them in one event, whatever their number.
    world.directory = [world.site(s) for s in range(2, 1000)]
    world.now += 1
    rec.tick()
    world.now += rec.hold_s
    rec.tick()
    (kind, text, data, site), = world.events
    world.events.clear()
    assert kind == "offcloud.recovery.stopped" and data["count"] == 997
    assert len(json.dumps(data)) < 4096 and "and 947 more" in text
    # The whole site loses the cloud with 1000 sites unreachable: the event stays small.
    world.up = False
    world.now += 1
    rec.tick()
    (kind, text, data, site), = world.events
    assert kind == "offcloud.recovery.activated" and data["unreachable_count"] == 996
    assert len(json.dumps(data)) < 16384 and len(text) < 4096


def test_a_lost_site_whose_recovery_is_turned_off_leaves_quietly(fp: FastPath) -> None:
    world = World()
    paths = setup(fp, world, {2: True})
    rec = world.recovery(paths)
    rec.tick()
    world.directory = [world.site(2, online=False)]
    world.now += 1
    rec.tick()
    assert where(fp, 2) == [2] and world.kinds() == [("offcloud.recovery.activated", 2)]
    world.directory = [world.site(2, recovery=False, online=False)]
    world.now += 1
    rec.tick()
    assert where(fp, 2) == [POP] and rec.summary()["lost_sites"] == []
    assert world.kinds() == []  # not "the PoP reaches it again": it does not


ALT = 0x40000000  # Alt-WAN tunnels' fast-path ids are ALT | site id (site/altwan.py)


def test_alt_wan_carries_recovery_first_and_the_mesh_where_it_cannot(fp: FastPath) -> None:
    # Sites 2 and 3 have an Alt-WAN tunnel besides their mesh tunnel, site 4 only Alt-WAN
    # (it is not an off-cloud site), site 5 has recovery disabled.
    for s in (2, 3, 4, 5):
        fp.peer_add(ALT | s)
    fp.peer_add(5)
    world = World(mesh_up={2, 3, 5})
    altwan_up = {2, 3, 4, 5}
    paths = setup(fp, world, {2: True, 3: True, 4: True, 5: False})
    world.directory[2]["offcloud"] = False
    for e in world.directory:
        e["altwan"] = [f"10.200.0.{e['site_id']}:4800"]

    def submit_altwan() -> None:
        paths.submit("alt-wan", [Candidate(ipaddress.ip_network(f"10.{s}.0.0/24"), ALT | s,
                                           Transport.ALT_WAN, site=s) for s in altwan_up])

    submit_altwan()
    rec = Recovery(
        paths=paths, cloud_up=lambda: world.up, cloud_enabled=lambda: True,
        own_recovery=lambda: world.own, directory=lambda: world.directory,
        links_ready=lambda: True, clock=lambda: world.now, hold_s=10,
        mesh_reach=lambda s: Reach(s in world.mesh_up, None if s in world.mesh_up else "down"),
        altwan_reach=lambda s: Reach(s in altwan_up, None if s in altwan_up else "silent"),
        on_event=lambda k, t, d, s: world.events.append((k, t, d, s)),
    )
    rec.tick()
    assert where(fp, 2, 3, 4, 5) == [POP] * 4

    world.up = False
    world.now += 0.05
    rec.tick()
    assert where(fp, 2, 3, 4, 5) == [ALT | 2, ALT | 3, ALT | 4, POP]
    (kind, text, data, _), = world.events
    world.events.clear()
    assert "traffic to sites 2, 3, 4 goes over Alt-WAN" in text, text
    assert data["altwan_sites"] == [2, 3, 4] and "5" in data["unreachable"]
    states = {s["site_id"]: s for s in rec.sites()}
    assert [states[s]["state"] for s in (2, 3, 4, 5)] == ["alt-wan"] * 3 + ["unreachable"]
    assert states[2]["ready_via"] == "alt-wan" and states[5]["ready_via"] is None

    # Alt-WAN goes down for site 3 and site 4: site 3 goes over the mesh, site 4 has no way.
    altwan_up -= {3, 4}
    submit_altwan()
    rec.tick()
    assert where(fp, 2, 3, 4) == [ALT | 2, 3, POP]
    states = {s["site_id"]: s for s in rec.sites()}
    assert (states[3]["state"], states[3]["ready_via"]) == ("mesh", "mesh")
    assert states[4]["state"] == "unreachable"
    assert states[4]["why"] == "site 4 is not an off-cloud site; no Alt-WAN tunnel: silent"
    out = io.StringIO()
    format_recovery({**rec.summary(), "sites": rec.sites()}, out)
    lines = {ln.split()[0]: ln.split() for ln in out.getvalue().splitlines()[3:]}
    assert lines["2"][2:4] == ["alt-wan", "alt-wan"] and lines["3"][2:4] == ["mesh", "mesh"]
    assert lines["4"][2:4] == ["unreachable", "no"]

    # Back: the cloud after the hold, whatever Alt-WAN does.
    altwan_up |= {3, 4}
    submit_altwan()
    world.up = True
    rec.tick()
    assert where(fp, 3, 4) == [ALT | 3, ALT | 4]
    world.now += 10
    rec.tick()
    assert where(fp, 2, 3, 4, 5) == [POP] * 4

    # Our cloud is up but the PoP cannot reach site 4 (offline in its directory, which keeps
    # its Alt-WAN endpoint): site 4 goes over Alt-WAN from here.
    world.events.clear()
    # A new directory (cloud.py replaces the list whenever one arrives).
    world.directory = [dict(e) for e in world.directory]
    world.directory[2]["online"] = False
    world.now += 1
    rec.tick()
    assert where(fp, 4) == [ALT | 4] and rec.summary()["lost_sites"] == [4]
    (kind, text, data, site), = world.events
    assert site == 4 and "goes over Alt-WAN" in text and data["altwan_sites"] == [4]


def test_the_rules_cloud_path_follows_the_cloud_not_the_hold(fp: FastPath) -> None:
    # An off-cloud rule with secondary "cloud" takes the route's cloud path when its mesh
    # path is down: gone while the cloud is down, back as soon as it is up, even while
    # recovery still holds the routes on the mesh.
    world = World()
    paths = setup(fp, world, {2: True})
    rec = world.recovery(paths)

    def cloud_path() -> int | None:
        return paths.status()["routes"][0]["cloud_peer"]

    rec.tick()
    assert cloud_path() == POP
    world.up = False
    world.now += 1
    rec.tick()
    assert rec.active and cloud_path() is None
    world.up = True
    world.now += 1
    rec.tick()
    assert rec.active and where(fp, 2) == [2] and cloud_path() == POP


def test_no_internet_link_with_an_address_still_enters_recovery_in_the_end(
    fp: FastPath,
) -> None:
    # The uplink's modem died with the box: no lease, ever, while the Alt-WAN link works.
    from sdwan.site.recovery import BOOT_MAX_WAIT_S

    world = World(up=False, ready=False)
    paths = setup(fp, world, {2: True})
    rec = world.recovery(paths)
    rec.tick()
    assert rec.next_due() == pytest.approx(rec.started + BOOT_MAX_WAIT_S)
    world.now = rec.started + BOOT_MAX_WAIT_S
    rec.tick()
    assert rec.active and "no Internet link had an address" in rec.reason
