"""Routes as a user of a real socketd sees them: a static peer and the cloud's directory
both name a site, the static peer carries it; a site only the directory knows goes through
the PoP. `socketctl routes`, the kernel routes into the tunnel device and LAN traffic agree."""

from __future__ import annotations

from labwait import wait_for

from sdwan.lab import netns
from sdwan.lab.topology import Lab

# The cloud's peer group: its members are the PoP sessions (cloud.CLOUD_GROUP).
POP_PEER_1 = 0x20000000 | 1


def test_static_peer_beats_the_cloud_and_the_rest_goes_through_the_pop(lab: Lab) -> None:
    lab.add_inet()
    sites = []
    for n in (1, 2, 3):
        lab.add_router(n, nat="masquerade")
        sites.append(lab.add_site(n))
    s1, s2, s3 = sites
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=sites)
    lab.start_popd(pop)
    pops = f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n'
    lab.write_site_config(s1, peers=[s2], extra_toml=pops)
    lab.write_site_config(s2, peers=[s1], extra_toml=pops)
    lab.write_site_config(s3, extra_toml=pops)
    for s in sites:
        lab.start_socketd(s)

    def routes() -> dict:
        return lab.socketctl(s1, "routes")

    wait_for(
        "site 1 routes site 3 through the cloud",
        lambda: any(r["prefix"] == s3.lan_subnet for r in routes()["routes"]),
    )
    got = routes()
    assert got["policy"] == "normal"
    by = {r["prefix"]: r for r in got["routes"]}
    assert set(by) == {s2.lan_subnet, s3.lan_subnet}, got
    assert (by[s2.lan_subnet]["transport"], by[s2.lan_subnet]["peer_id"]) == ("direct", 2)
    assert (by[s3.lan_subnet]["transport"], by[s3.lan_subnet]["peer_id"]) == (
        "cloud",
        POP_PEER_1,
    )
    assert all(r["installed"] for r in got["routes"])
    assert {
        "prefix": s2.lan_subnet,
        "peer_id": POP_PEER_1,
        "transport": "cloud",
        "producer": "cloud",
        "reason": f"overlaps {s2.lan_subnet} of a direct peer",
    } in got["unused"]

    # The kernel sends both sites into the tunnel device (cloud routes off the loop).
    def kernel_routes() -> str:
        return netns.routes(s1.ns)

    wait_for(
        "kernel route to site 3", lambda: f"{s3.lan_subnet} dev sdwan0" in kernel_routes()
    )
    assert f"{s2.lan_subnet} dev sdwan0" in kernel_routes()

    # Traffic follows: to site 2 over the direct tunnel, to site 3 through the PoP.
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=15)
    assert lab.wait_ping(s1.lan_ns, s3.lan_host_ip, timeout=15)
    peers = {p["site_id"]: p for p in lab.socketctl(s1, "peers")["peers"]}
    assert peers[2]["transport"] == "direct" and peers[2]["tx_packets"] > 0
    assert peers[3]["transport"] == "cloud"
