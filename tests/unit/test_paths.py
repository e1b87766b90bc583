"""paths.py against a real fast path (no threads): every route is read back through the fast
path's own lookup, as the TUN thread would route a packet."""

from __future__ import annotations

import io
import ipaddress
import struct
import time
from collections.abc import Iterator, Sequence

import pytest

from sdwan.bindings.fastpath import FastPath, Network, TransportRule, Verdict
from sdwan.site.paths import Candidate, Paths, Policy, Transport
from sdwan.site.socketctl import format_routes

POP = 0x80000101  # a PoP session's fast-path id (cloud.pop_peer_id(1, 1))
POP2 = 0x80000102
MESH_OF = {2: 0x4002, 3: 0x4003}  # a test producer's mesh tunnel ids per site


def packet(dst: str) -> bytes:
    d = ipaddress.ip_address(dst)
    if d.version == 4:
        src = ipaddress.IPv4Address("10.1.0.9").packed
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, src, d.packed) + bytes(8)
    src = ipaddress.IPv6Address("fd00:1::9").packed
    return struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, src, d.packed) + bytes(8)


def routed(fp: FastPath, dst: str) -> int | None:
    """The peer the fast path sends a packet to dst to (None: no route)."""
    r = fp.process_outbound(packet(dst))
    if r.verdict == Verdict.DROP and r.drop_reason == "no_route":
        return None
    assert r.drop_reason == "no_key", r  # routed to a peer without keys: its id is known
    return r.peer_id


class Batches:
    """Counts the fast path's route_batch calls and their operations, then calls through."""

    def __init__(self, fp: FastPath) -> None:
        self.calls: list[tuple[int, int]] = []
        real = fp.route_batch

        def counted(set_: Sequence[tuple[Network | str, int]], delete: Sequence[Network | str]):
            self.calls.append((len(set_), len(delete)))
            real(set_, delete)

        fp.route_batch = counted  # type: ignore[method-assign]

    def take(self) -> list[tuple[int, int]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def fp() -> Iterator[FastPath]:
    with FastPath() as fp:
        for pid in (2, 3, 4, POP, POP2, *MESH_OF.values()):
            fp.peer_add(pid)
        yield fp


def cloud(*nets: str, peer: int = POP) -> list[Candidate]:
    return [Candidate(ipaddress.ip_network(n), peer, Transport.CLOUD) for n in nets]


def mesh(site: int, *nets: str) -> list[Candidate]:
    return [Candidate(ipaddress.ip_network(n), MESH_OF[site], Transport.MESH) for n in nets]


def test_producers_combine_and_kernel_routes_follow(fp: FastPath) -> None:
    tun: list[list[str]] = []
    paths = Paths(fp, local=["10.1.0.0/24"], on_tun_routes=tun.append)
    paths.submit("static", [Candidate(ipaddress.ip_network("10.2.0.0/24"), 2, Transport.DIRECT)])
    assert routed(fp, "10.2.0.5") == 2 and routed(fp, "10.3.0.5") is None
    assert tun == [["10.2.0.0/24"]]
    paths.submit("cloud", cloud("10.3.0.0/24", "10.33.0.0/16", "fd00:3::/64"))
    assert routed(fp, "10.3.0.5") == POP
    assert routed(fp, "10.33.200.1") == POP
    assert routed(fp, "fd00:3::1") == POP
    assert routed(fp, "10.2.0.5") == 2
    assert tun[-1] == ["10.2.0.0/24", "10.3.0.0/24", "10.33.0.0/16", "fd00:3::/64"]
    # The same set again changes nothing and tells the supervisor nothing.
    n = len(tun)
    paths.submit("cloud", cloud("10.3.0.0/24", "10.33.0.0/16", "fd00:3::/64"))
    assert len(tun) == n
    st = paths.status()
    assert st["policy"] == "normal"
    by = {r["prefix"]: r for r in st["routes"]}
    assert by["10.2.0.0/24"]["transport"] == "direct" and by["10.2.0.0/24"]["installed"]
    assert by["10.3.0.0/24"] == {
        "prefix": "10.3.0.0/24",
        "peer_id": POP,
        "transport": "cloud",
        "producer": "cloud",
        "why": "only usable candidate",
        "installed": True,
        "offcloud_peer": None,
        "cloud_peer": POP,
    }


def test_only_differences_reach_the_fast_path_in_one_batch(fp: FastPath) -> None:
    batches = Batches(fp)
    paths = Paths(fp)
    paths.submit("cloud", cloud("10.3.0.0/24", "10.4.0.0/24", "10.5.0.0/24"))
    assert batches.take() == [(3, 0)]
    paths.submit("cloud", cloud("10.3.0.0/24", "10.4.0.0/24", "10.5.0.0/24"))
    assert batches.take() == []  # nothing changed: no call at all
    # One site left, one came, one moved to the other session: one call, two sets and a delete.
    paths.submit(
        "cloud", [*cloud("10.3.0.0/24", "10.6.0.0/24"), *cloud("10.4.0.0/24", peer=POP2)]
    )
    assert batches.take() == [(2, 1)]
    assert routed(fp, "10.5.0.1") is None
    assert routed(fp, "10.6.0.1") == POP
    assert routed(fp, "10.4.0.1") == POP2
    assert routed(fp, "10.3.0.1") == POP


def test_direct_and_local_prefixes_are_never_routed_through_the_cloud(fp: FastPath) -> None:
    tun: list[list[str]] = []
    paths = Paths(fp, local=["10.1.0.0/24", "fd00:1::/64"], on_tun_routes=tun.append)
    paths.submit(
        "static",
        [
            Candidate(ipaddress.ip_network("10.2.0.0/24"), 2, Transport.DIRECT),
            Candidate(ipaddress.ip_network("10.22.0.0/16"), 2, Transport.DIRECT),
        ],
    )
    paths.submit(
        "cloud",
        cloud(
            "10.2.0.0/24",  # the static peer's own subnet
            "10.2.0.128/25",  # inside it
            "10.22.5.0/24",  # inside the other
            "10.0.0.0/8",  # around both (and around our LAN)
            "10.1.0.0/25",  # inside our LAN
            "fd00::/16",  # around our IPv6 LAN
            "10.3.0.0/24",  # a plain remote site
        ),
    )
    assert routed(fp, "10.2.0.200") == 2
    assert routed(fp, "10.22.5.1") == 2
    assert routed(fp, "10.9.9.9") is None  # 10.0.0.0/8 was not installed
    assert routed(fp, "10.1.0.1") is None
    assert routed(fp, "fd00:9::1") is None
    assert routed(fp, "10.3.0.1") == POP
    assert tun[-1] == ["10.2.0.0/24", "10.22.0.0/16", "10.3.0.0/24"]
    reasons = {u["prefix"]: u["reason"] for u in paths.status()["unused"]}
    assert reasons["10.2.0.128/25"] == "overlaps 10.2.0.0/24 of a direct peer"
    assert reasons["10.1.0.0/25"] == "overlaps the local prefix 10.1.0.0/24"
    assert reasons["fd00::/16"] == "overlaps the local prefix fd00:1::/64"
    assert "10.0.0.0/8" in reasons
    # A candidate of any transport for a local prefix never wins, not even a direct one.
    paths.submit("static", [Candidate(ipaddress.ip_network("10.1.0.0/24"), 2, Transport.DIRECT)])
    assert routed(fp, "10.1.0.1") is None
    # With the static peer's subnets gone, the cloud's candidates for them are usable.
    paths.withdraw("static")
    assert routed(fp, "10.2.0.200") == POP
    assert routed(fp, "10.22.5.1") == POP
    assert routed(fp, "10.9.9.9") is None  # still around our LAN


def test_a_withdrawn_producer_leaves_nothing_behind(fp: FastPath) -> None:
    tun: list[list[str]] = []
    paths = Paths(fp, on_tun_routes=tun.append)
    paths.submit("cloud", cloud("10.3.0.0/24", "10.4.0.0/24"))
    paths.submit("mesh", mesh(3, "10.3.0.0/24"))
    assert routed(fp, "10.3.0.1") == POP  # normal: the cloud before the mesh
    paths.withdraw("cloud")
    assert routed(fp, "10.3.0.1") == MESH_OF[3]  # the mesh's candidate is left
    assert routed(fp, "10.4.0.1") is None
    paths.submit("mesh", [])
    assert routed(fp, "10.3.0.1") is None
    assert tun[-1] == [] and paths.status()["routes"] == []


def test_policy_switch_normal_cloud_lost_normal(fp: FastPath) -> None:
    batches = Batches(fp)
    paths = Paths(fp)
    paths.submit("static", [Candidate(ipaddress.ip_network("10.2.0.0/24"), 2, Transport.DIRECT)])
    paths.submit("cloud", cloud("10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24", "10.5.0.0/24"))
    paths.submit("mesh", [*mesh(2, "10.2.0.0/24"), *mesh(3, "10.3.0.0/24", "10.4.0.0/24")])
    batches.take()
    assert [routed(fp, f"10.{i}.0.1") for i in (2, 3, 4, 5)] == [2, POP, POP, POP]

    paths.set_policy(Policy.CLOUD_LOST)
    # The mesh takes over where it has a tunnel; static stays; the cloud keeps the rest.
    assert [routed(fp, f"10.{i}.0.1") for i in (2, 3, 4, 5)] == [2, MESH_OF[3], MESH_OF[3], POP]
    # One batch: two prefixes move to the mesh, and the one left on the cloud loses its cloud
    # path for the transport rules (the cloud is what is lost).
    assert batches.take() == [(3, 0)]
    why = {r["prefix"]: r["why"] for r in paths.status()["routes"]}
    assert why["10.3.0.0/24"] == "mesh ranks before cloud under policy cloud_lost"
    assert why["10.2.0.0/24"] == "only usable candidate"  # the others overlap a direct peer
    paths.set_policy(Policy.CLOUD_LOST)
    assert batches.take() == []

    paths.set_policy(Policy.NORMAL)
    assert [routed(fp, f"10.{i}.0.1") for i in (2, 3, 4, 5)] == [2, POP, POP, POP]
    assert batches.take() == [(3, 0)]


ALT_OF = {2: 0x40000002, 3: 0x40000003}  # Alt-WAN tunnels' ids (site/altwan.py)


def altwan(site: int, *nets: str, held: bool = False) -> list[Candidate]:
    return [Candidate(ipaddress.ip_network(n), ALT_OF[site], Transport.ALT_WAN, held=held,
                      site=MESH_OF[site]) for n in nets]


def test_alt_wan_first_then_the_mesh_when_the_cloud_is_lost(fp: FastPath) -> None:
    # The recovery sets are keyed by site; an Alt-WAN candidate says its site (here the test
    # mesh's id for it), so a site's Alt-WAN and mesh candidates move together.
    for pid in ALT_OF.values():
        fp.peer_add(pid)
    paths = Paths(fp)
    paths.submit("cloud", cloud("10.2.0.0/24", "10.3.0.0/24"))
    paths.submit("mesh", [*mesh(2, "10.2.0.0/24"), *mesh(3, "10.3.0.0/24")])
    paths.submit("alt-wan", [*altwan(2, "10.2.0.0/24"), *altwan(3, "10.3.0.0/24")])

    def where() -> list[int | None]:
        return [routed(fp, "10.2.0.1"), routed(fp, "10.3.0.1")]

    def why(prefix: str) -> str:
        return {r["prefix"]: r["why"] for r in paths.status()["routes"]}[prefix]

    assert where() == [POP, POP]  # the cloud while it is there
    assert why("10.2.0.0/24") == "cloud ranks before alt-wan under policy normal"
    paths.set_policy(Policy.CLOUD_LOST)
    assert where() == [ALT_OF[2], ALT_OF[3]]
    assert why("10.2.0.0/24") == "alt-wan ranks before mesh under policy cloud_lost"
    # Alt-WAN cannot reach site 3 (its tunnel went down): the mesh carries it.
    paths.submit("alt-wan", altwan(2, "10.2.0.0/24"))
    assert where() == [ALT_OF[2], MESH_OF[3]]
    # A held Alt-WAN tunnel (its path went silent a moment ago) comes after the mesh, and
    # before the cloud when nothing else is left.
    paths.submit("alt-wan", [*altwan(2, "10.2.0.0/24", held=True),
                             *altwan(3, "10.3.0.0/24", held=True)])
    assert where() == [MESH_OF[2], MESH_OF[3]]
    assert why("10.2.0.0/24") == "its Alt-WAN tunnel is held off after its path went silent"
    paths.submit("mesh", mesh(2, "10.2.0.0/24"))
    assert where() == [MESH_OF[2], ALT_OF[3]]
    paths.submit("alt-wan", [*altwan(2, "10.2.0.0/24"), *altwan(3, "10.3.0.0/24")])
    paths.submit("mesh", [*mesh(2, "10.2.0.0/24"), *mesh(3, "10.3.0.0/24")])
    # A site with recovery disabled is moved onto neither.
    paths.set_policy(Policy.CLOUD_LOST, no_recovery=[MESH_OF[3]])
    assert where() == [ALT_OF[2], POP]
    assert why("10.3.0.0/24") == f"site {MESH_OF[3]} has WAN recovery disabled"
    # Our cloud is up but the PoP cannot reach site 2: Alt-WAN first there too, then the mesh.
    paths.set_policy(Policy.NORMAL, lost_peers=[MESH_OF[2]], no_recovery=[])
    assert where() == [ALT_OF[2], POP]
    assert why("10.2.0.0/24") == (
        f"site {MESH_OF[2]} is not reachable through the cloud (WAN recovery)")
    paths.submit("alt-wan", altwan(3, "10.3.0.0/24"))
    assert where() == [MESH_OF[2], POP]
    # A held one is not used while the cloud carries its site.
    paths.submit("alt-wan", altwan(3, "10.3.0.0/24", held=True))
    paths.withdraw("cloud")
    assert routed(fp, "10.3.0.1") == MESH_OF[3]
    paths.withdraw("mesh")
    assert routed(fp, "10.3.0.1") is None
    (unused,) = paths.status()["unused"]
    assert unused["transport"] == "alt-wan" and "held off" in unused["reason"]


def test_the_rank_follows_the_policies_table() -> None:
    # With no per-site set in play, the sort key orders the transports as RANKS says.
    from sdwan.site.paths import RANKS

    cands = {t: Candidate(ipaddress.ip_network("10.9.0.0/24"), 9, t) for t in Transport}
    for policy, order in RANKS.items():
        recovering = policy is Policy.CLOUD_LOST
        assert tuple(sorted(Transport, key=lambda t: Paths._rank(cands[t], recovering))) == order


def test_without_a_mesh_producer_cloud_lost_changes_nothing(fp: FastPath) -> None:
    batches = Batches(fp)
    paths = Paths(fp)
    paths.submit("cloud", cloud("10.3.0.0/24"))
    batches.take()
    paths.set_policy(Policy.CLOUD_LOST)
    assert routed(fp, "10.3.0.1") == POP
    assert batches.take() == [(1, 0)]  # the same peer; the rules' cloud path gone


def test_preference_and_the_override_hook(fp: FastPath) -> None:
    paths = Paths(fp)
    paths.submit(
        "mesh",
        [
            Candidate(ipaddress.ip_network("10.3.0.0/24"), MESH_OF[3], Transport.MESH, 5),
            Candidate(ipaddress.ip_network("10.3.0.0/24"), MESH_OF[2], Transport.MESH, 1),
        ],
    )
    paths.submit("cloud", cloud("10.3.0.0/24"))
    assert routed(fp, "10.3.0.1") == POP
    paths.set_policy(Policy.CLOUD_LOST)
    assert routed(fp, "10.3.0.1") == MESH_OF[2]  # the lower preference
    assert paths.status()["routes"][0]["why"] == "preference 1 beats 5"

    def off_cloud(
        prefix: Network, usable: Sequence[Candidate], policy: Policy
    ) -> Candidate | None:
        # A rule that keeps 10.3.0.0/24 on the cloud whatever the policy says.
        return next((c for c in usable if c.transport is Transport.CLOUD), None)

    paths.set_override(off_cloud)
    assert routed(fp, "10.3.0.1") == POP
    assert paths.status()["routes"][0]["why"] == "per-rule override"
    paths.set_override(None)
    assert routed(fp, "10.3.0.1") == MESH_OF[2]


def rules_to(fp: FastPath, dst: str) -> int | str:
    """Where a packet to dst goes under the transport rules installed by the test: the peer
    (no keys: dropped as no_key, naming it), or the drop reason."""
    r = fp.process_outbound(packet(dst))
    assert r.verdict == Verdict.DROP, r
    return r.peer_id if r.drop_reason == "no_key" else str(r.drop_reason)


def test_each_route_carries_the_rules_offcloud_and_cloud_peers(fp: FastPath) -> None:
    """The off-cloud path of a prefix is its mesh tunnel while the mesh submits it (or the
    direct peer), its cloud path the cloud's candidate; set in the same batch as the route."""
    batches = Batches(fp)
    paths = Paths(fp, local=["10.1.0.0/24"])
    paths.submit("static", [Candidate(ipaddress.ip_network("10.2.0.0/24"), 2, Transport.DIRECT)])
    paths.submit("cloud", cloud("10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24"))
    paths.submit("mesh", mesh(3, "10.3.0.0/24"))
    batches.take()
    # Every packet matches: off-cloud, nothing else allowed while there is no off-cloud path.
    fp.rules_set([TransportRule(1, "offcloud", "none")])
    assert rules_to(fp, "10.2.0.1") == 2  # the static tunnel is off the cloud
    assert rules_to(fp, "10.3.0.1") == MESH_OF[3]  # routed via the cloud, ruled via the mesh
    assert rules_to(fp, "10.4.0.1") == "offcloud_down"
    by = {r["prefix"]: r for r in paths.status()["routes"]}
    assert (by["10.3.0.0/24"]["peer_id"], by["10.3.0.0/24"]["offcloud_peer"],
            by["10.3.0.0/24"]["cloud_peer"]) == (POP, MESH_OF[3], POP)
    assert (by["10.2.0.0/24"]["offcloud_peer"], by["10.2.0.0/24"]["cloud_peer"]) == (2, None)

    # The mesh tunnel goes down (the mesh withdraws its candidates): one batch.
    paths.withdraw("mesh")
    assert batches.take() == [(1, 0)]
    assert rules_to(fp, "10.3.0.1") == "offcloud_down"
    fp.rules_set([TransportRule(1, "offcloud", "cloud")])
    assert rules_to(fp, "10.3.0.1") == POP and rules_to(fp, "10.4.0.1") == POP
    fp.rules_set([TransportRule(1, "offcloud", "automatic")])
    assert rules_to(fp, "10.3.0.1") == POP

    # Cloud lost: no cloud path for the rules; a cloud rule follows the policy's pick.
    paths.submit("mesh", mesh(3, "10.3.0.0/24"))
    paths.set_policy(Policy.CLOUD_LOST)
    fp.rules_set([TransportRule(1, "offcloud", "cloud", 17, ports=((9, 9),)),
                  TransportRule(2, "cloud")])
    assert rules_to(fp, "10.3.0.1") == MESH_OF[3] and rules_to(fp, "10.4.0.1") == POP
    assert paths.status()["routes"][1]["cloud_peer"] is None
    # A site the cloud cannot reach (recovery's lost_peers) has no cloud path either.
    paths.set_policy(Policy.NORMAL, lost_peers=[MESH_OF[3]])
    by = {r["prefix"]: r for r in paths.status()["routes"]}
    assert by["10.3.0.0/24"]["cloud_peer"] is None and by["10.4.0.0/24"]["cloud_peer"] == POP


def test_a_deleted_mesh_peer_is_set_again_for_the_rules(fp: FastPath) -> None:
    paths = Paths(fp)
    paths.submit("cloud", cloud("10.3.0.0/24"))
    paths.submit("mesh", mesh(3, "10.3.0.0/24"))
    fp.rules_set([TransportRule(1, "offcloud", "none")])
    assert rules_to(fp, "10.3.0.1") == MESH_OF[3]
    fp.peer_del(MESH_OF[3])  # the route keeps its peer, without its off-cloud path
    fp.peer_add(MESH_OF[3])
    assert rules_to(fp, "10.3.0.1") == "offcloud_down"
    paths.forget_peer(MESH_OF[3])
    paths.apply()
    assert rules_to(fp, "10.3.0.1") == MESH_OF[3]


def test_a_bad_route_does_not_hold_back_the_others(fp: FastPath) -> None:
    paths = Paths(fp)
    # Peer 99 does not exist in the fast path: its route fails, the others are installed.
    paths.submit("cloud", [*cloud("10.3.0.0/24", "10.4.0.0/24"), *cloud("10.9.0.0/24", peer=99)])
    assert routed(fp, "10.3.0.1") == POP and routed(fp, "10.4.0.1") == POP
    assert routed(fp, "10.9.0.1") is None
    st = {r["prefix"]: r["installed"] for r in paths.status()["routes"]}
    assert st == {"10.3.0.0/24": True, "10.4.0.0/24": True, "10.9.0.0/24": False}
    # Retried at the next apply; once the peer exists, it is there.
    fp.peer_add(99)
    paths.apply()
    assert routed(fp, "10.9.0.1") == 99


def test_a_deleted_peer_gets_its_routes_back_when_still_chosen(fp: FastPath) -> None:
    paths = Paths(fp)
    paths.submit("cloud", cloud("10.3.0.0/24"))
    fp.peer_del(POP)  # drops the peer's routes in the fast path
    fp.peer_add(POP)
    paths.forget_peer(POP)
    paths.submit("cloud", cloud("10.3.0.0/24"))
    assert routed(fp, "10.3.0.1") == POP
    # A withdrawal of routes the fast path already dropped is not an error.
    fp.peer_del(POP)
    paths.withdraw("cloud")
    assert paths.status()["routes"] == []


def test_a_thousand_prefixes_switch_in_one_batch(fp: FastPath) -> None:
    nets = [f"10.{i // 250}.{i % 250}.0/24" for i in range(1000)]
    tun: list[list[str]] = []
    paths = Paths(fp, on_tun_routes=tun.append)
    paths.submit("cloud", cloud(*nets))
    paths.submit("mesh", [Candidate(ipaddress.ip_network(n), MESH_OF[3], "mesh") for n in nets])
    batches = Batches(fp)
    kernel_updates = len(tun)

    t0 = time.perf_counter()
    paths.set_policy(Policy.CLOUD_LOST)
    lost_s = time.perf_counter() - t0
    assert batches.take() == [(1000, 0)]
    assert all(routed(fp, f"10.{i // 250}.{i % 250}.7") == MESH_OF[3] for i in range(0, 1000, 37))

    t0 = time.perf_counter()
    paths.set_policy(Policy.NORMAL)
    back_s = time.perf_counter() - t0
    assert batches.take() == [(1000, 0)]
    assert all(routed(fp, f"10.{i // 250}.{i % 250}.7") == POP for i in range(0, 1000, 37))
    # The same prefixes stay on the TUN device: the kernel is not touched by a switch.
    assert len(tun) == kernel_updates
    print(f"\n1000-prefix switch: cloud_lost {lost_s * 1e3:.1f} ms, normal {back_s * 1e3:.1f} ms")
    assert lost_s < 2.0 and back_s < 2.0  # generous: catches a per-route re-choice, not speed


def test_socketctl_routes_shows_each_prefix_and_why(fp: FastPath) -> None:
    paths = Paths(fp, local=["10.1.0.0/24"])
    paths.submit("static", [Candidate(ipaddress.ip_network("10.2.0.0/24"), 2, Transport.DIRECT)])
    paths.submit("cloud", cloud("10.2.0.0/24", "10.3.0.0/24"))
    out = io.StringIO()
    format_routes(paths.status(), out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "policy   normal"
    assert lines[2].split() == ["PREFIX", "PEER", "VIA", "FROM", "WHY"]
    assert lines[3].split()[:4] == ["10.2.0.0/24", "2", "direct", "static"]
    assert lines[4].split()[:4] == ["10.3.0.0/24", "0x80000101", "cloud", "cloud"]
    assert lines[-1] == "  10.2.0.0/24 via cloud (cloud): overlaps 10.2.0.0/24 of a direct peer"
