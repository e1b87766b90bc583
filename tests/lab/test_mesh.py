"""The off-cloud mesh in the lab: two sites behind the NAT types of TESTING.md get a direct
tunnel punched with the PoP's help, carry LAN-to-LAN traffic over it (a pinned prefix), say
how it was found in `socketctl mesh`, and come back from their NAT data after a restart."""

from __future__ import annotations

import sys
import time

import pytest
from labwait import wait_for

from sdwan.lab.topology import Lab, Pop, Site


def build(
    lab: Lab,
    nats: tuple[str, str] = ("masquerade", "masquerade"),
    same_router: bool = False,
    offcloud: tuple[bool, bool] = (True, True),
    mesh_toml: str = "",
    links: tuple[dict | None, dict | None] = (None, None),
) -> tuple[Pop, list[Site]]:
    lab.add_inet()
    sites = []
    for n, nat in zip((1, 2), nats, strict=True):
        if same_router and n == 2:
            sites.append(lab.add_site(2, router=1))
            continue
        lab.add_router(n, nat=nat)
        sites.append(lab.add_site(n))
    pop = lab.add_pop(1)
    lab.write_pop_config(
        pop,
        sites=[
            {"id": s.site_id, "name": f"site-{s.site_id}", "subnets": [s.lan_subnet],
             "offcloud": oc}
            for s, oc in zip(sites, offcloud, strict=True)
        ],
    )
    lab.start_popd(pop)
    for s, link in zip(sites, links, strict=True):
        others = [o.lan_subnet for o in sites if o is not s]
        lab.write_site_config(
            s,
            link=link,
            extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n\n'
            f"[mesh]\npin = {others!r}\n{mesh_toml}".replace("'", '"'),
        )
        lab.start_socketd(s)
    return pop, sites


def mesh(lab: Lab, site: Site) -> list[dict]:
    return lab.socketctl(site, "mesh")["paths"]


def direct(lab: Lab, site: Site, peer: int) -> dict | None:
    return next(
        (p for p in mesh(lab, site) if p["site_id"] == peer and p["state"] == "direct"), None
    )


def routed_over_mesh(lab: Lab, site: Site, prefix: str) -> bool:
    routes = lab.socketctl(site, "routes")["routes"]
    return any(r["prefix"] == prefix and r["transport"] == "mesh" for r in routes)


def assert_mesh_carries_traffic(lab: Lab, a: Site, b: Site) -> None:
    wait_for("mesh route", lambda: routed_over_mesh(lab, a, b.lan_subnet))
    # The path MTU found by probing: the lab's paths carry 1500.
    wait_for("path MTU", lambda: (direct(lab, a, b.n) or {}).get("mtu") == 1500)
    assert lab.wait_ping(a.lan_ns, b.lan_host_ip, timeout=10)
    assert lab.wait_ping(b.lan_ns, a.lan_host_ip, timeout=10)
    tcp = lab.iperf3(a.lan_ns, b.lan_ns, b.lan_host_ip, duration=1)
    assert tcp.mbps and tcp.mbps > 5
    # Over the direct tunnel, not the PoP: the site's mesh peer counted the packets.
    peers = {p["site_id"]: p for p in lab.socketctl(a, "peers")["peers"]}
    assert peers[b.site_id]["transport"] == "mesh"
    assert peers[b.site_id]["rx_packets"] > 100


@pytest.mark.parametrize(
    "nats, how",
    [
        (("masquerade", "masquerade"), "window"),
        (("none", "masquerade"), "window"),
        (("shift", "masquerade"), "window"),
    ],
    ids=["masquerade+masquerade", "none+masquerade", "shift+masquerade"],
)
def test_punched_tunnel_carries_lan_traffic(lab: Lab, nats: tuple[str, str], how: str) -> None:
    _, (s1, s2) = build(lab, nats)
    for a, b in ((s1, s2), (s2, s1)):
        found = wait_for(f"site {a.n} direct to {b.n}", lambda a=a, b=b: direct(lab, a, b.n))
        assert found["how"] == how, found
        assert found["endpoint"]
    assert_mesh_carries_traffic(lab, s1, s2)
    events = lab.socketctl(s1, "events", "--kind", "offcloud.transport.connect")["events"]
    assert events and "site 2" in events[0]["text"]


def test_sites_behind_one_public_ip_connect_over_local_addresses(lab: Lab) -> None:
    _, (s1, s2) = build(lab, same_router=True)
    found = wait_for("site 1 direct to 2", lambda: direct(lab, s1, 2))
    assert found["how"] == "local", found
    assert_mesh_carries_traffic(lab, s1, s2)


def test_restart_reconnects_from_nat_data_without_the_pop(lab: Lab) -> None:
    pop, (s1, s2) = build(lab)
    wait_for("site 1 direct to 2", lambda: direct(lab, s1, 2))
    wait_for("site 2 direct to 1", lambda: direct(lab, s2, 1))
    lab.stop_popd(pop)
    for s in (s1, s2):
        lab.stop_socketd(s)
        lab.start_socketd(s)
    # Both restarted with the PoP gone: only the NAT data can bring the tunnel back.
    found = wait_for("site 1 direct from the cache", lambda: direct(lab, s1, 2), timeout=20)
    assert found["how"] == "cache", found
    assert_mesh_carries_traffic(lab, s1, s2)


def test_site_with_offcloud_disabled_gets_no_mesh_tunnel(lab: Lab) -> None:
    _, (s1, s2) = build(lab, offcloud=(True, False))
    wait_for("cloud up", lambda: lab.socketctl(s1, "status")["cloud"]["state"] == "up")
    wait_for("cloud up", lambda: lab.socketctl(s2, "status")["cloud"]["state"] == "up")
    # The cloud carries the traffic; nobody was told to punch.
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=10)
    assert mesh(lab, s1) == [] and mesh(lab, s2) == []


def test_router_restarts_with_new_mappings_and_the_pair_punches_again(lab: Lab) -> None:
    _, (s1, s2) = build(lab)
    wait_for("site 1 direct to 2", lambda: direct(lab, s1, 2))
    wait_for("site 2 direct to 1", lambda: direct(lab, s2, 1))
    for s in (s1, s2):
        lab.stop_socketd(s)
    # Both routers come back with new port mappings: neither cached endpoint answers.
    lab.renat_router(1, 5)
    lab.renat_router(2, 7)
    for s in (s1, s2):
        lab.start_socketd(s)
    found = wait_for("site 1 direct again", lambda: direct(lab, s1, 2), timeout=30)
    assert found["how"] == "window" and found["endpoint"].endswith(":4807"), found
    assert_mesh_carries_traffic(lab, s1, s2)


def test_forged_probes_change_nothing_and_are_counted(lab: Lab) -> None:
    pop, (s1, s2) = build(lab, ("none", "masquerade"))
    before = wait_for("site 1 direct to 2", lambda: direct(lab, s1, 2))
    gen = lab.popctl(pop, "status")["mesh"]["paths"][0]["gen"]
    # From a stranger on the Internet, to site 1's public socket: a probe of the right pair and
    # generation with a made-up tag, one for another site, and one for no known punch.
    stranger = lab.add_public_host("stranger", ip="203.0.113.66")
    def forge(to: int, g: int) -> bytes:
        ids = (2).to_bytes(4) + to.to_bytes(4) + g.to_bytes(4)
        return bytes([0xD3, 1, 0, 0]) + ids + b"n" * 8 + bytes(8) + b"t" * 16

    forged = [forge(1, gen), forge(9, gen), forge(1, gen ^ 1), b"\xd3 garbage"]
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for d in {forged!r}:\n"
        f"    s.sendto(d, ({s1.wan_ip!r}, 4800))\n"
    )
    lab.exec(stranger.ns, [sys.executable, "-c", script])
    wait_for(
        "forged probes counted",
        lambda: (st := lab.socketctl(s1, "mesh")["stats"])["probes_bad_tag"] >= 1
        and st["probes_foreign"] >= 2 and st["probes_malformed"] >= 1 and st,
    )
    after = direct(lab, s1, 2)
    assert after and after["endpoint"] == before["endpoint"]
    assert_mesh_carries_traffic(lab, s1, s2)


def test_last_resort_link_gets_no_mesh_tunnel(lab: Lab) -> None:
    _, (s1, s2) = build(lab, links=({"precedence": 3}, None))
    wait_for("cloud up", lambda: lab.socketctl(s1, "status")["cloud"]["state"] == "up")
    wait_for("cloud up", lambda: lab.socketctl(s2, "status")["cloud"]["state"] == "up")
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=10)
    assert mesh(lab, s1) == [] and mesh(lab, s2) == []


def test_a_path_that_dies_under_traffic_is_noticed_and_traffic_takes_the_cloud(lab: Lab) -> None:
    _, (s1, s2) = build(lab)
    wait_for("site 1 direct to 2", lambda: direct(lab, s1, 2))
    wait_for("site 2 direct to 1", lambda: direct(lab, s2, 1))
    wait_for("mesh route", lambda: routed_over_mesh(lab, s1, s2.lan_subnet))
    # Traffic over the mesh, then the direct path between the routers is cut (the PoP is not).
    pinger = lab.spawn(s1.lan_ns, ["ping", "-n", "-i", "0.05", s2.lan_host_ip], name="pinger")
    time.sleep(1)
    cut = time.time()
    for n, other in ((1, s2.public_ip), (2, s1.public_ip)):
        lab.router_nft(
            n,
            f"table inet cut {{\n chain f {{\n type filter hook forward priority -10\n"
            f" ip saddr {other} drop\n ip daddr {other} drop\n }}\n}}\n",
        )
    down = wait_for(
        "site 1 notices", lambda: (lab.socketctl(s1, "events", "--kind",
                                                 "offcloud.transport.disconnect")["events"]),
        timeout=10,
    )
    took = down[0]["ts"] - cut
    assert took < 3, took  # the mechanism: about silent_after_ms (0.7 s) under traffic
    assert "no answer to traffic" in down[0]["text"]
    wait_for("route back to the cloud",
             lambda: not routed_over_mesh(lab, s1, s2.lan_subnet), timeout=5)
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=5)  # through the PoP
    lab.kill(pinger)
