"""A PoP (popd) and sites behind NAT routers: registration over DTLS, the peer
directory, site-to-site traffic relayed through the PoP, the PoP's death and
return, primary and secondary PoPs, and a restart while the PoP is unreachable.
What a user sees: traffic between LAN hosts, socketctl/popctl output, events."""

from __future__ import annotations

import signal
import time

import pytest
from labwait import wait_for

from sdwan.lab.topology import Lab, Pop, Site


def pops_toml(*pops: Pop) -> str:
    return "\n".join(f'[[pops]]\nid = {p.n}\nendpoint = "{p.host.ip}:4800"\n' for p in pops)


def build(
    lab: Lab, sites: int = 3, pops: int = 1, hold_s: float = 30
) -> tuple[list[Pop], list[Site]]:
    lab.add_inet()
    the_sites = []
    for n in range(1, sites + 1):
        lab.add_router(n, nat="masquerade")
        the_sites.append(lab.add_site(n))
    the_pops = [lab.add_pop(n) for n in range(1, pops + 1)]
    for pop in the_pops:
        lab.write_pop_config(pop, sites=the_sites)
        lab.start_popd(pop)
    for site in the_sites:
        lab.write_site_config(
            site, extra_toml=pops_toml(*the_pops) + f"\n[cloud]\nreturn_hold_s = {hold_s}\n"
        )
        lab.start_socketd(site)
    return the_pops, the_sites


def cloud(lab: Lab, site: Site) -> dict:
    return lab.socketctl(site, "status")["cloud"]


def test_sites_register_and_talk_through_the_pop(lab: Lab) -> None:
    (pop,), sites = build(lab)
    for site in sites:
        wait_for(f"site {site.n} cloud up", lambda s=site: cloud(lab, s)["state"] == "up")
    # Every site learns the other two, with their subnets.
    for site in sites:

        def learned(s: Site = site) -> bool:
            peers = lab.socketctl(s, "peers")["peers"]
            return {p["site_id"]: p["subnets"] for p in peers} == {
                o.n: [o.lan_subnet] for o in sites if o is not s
            }

        wait_for(f"site {site.n} directory", learned)
    for a in sites:
        for b in sites:
            if a is not b:
                assert lab.wait_ping(a.lan_ns, b.lan_host_ip, timeout=10), (a.n, b.n)
    tcp = lab.iperf3(sites[0].lan_ns, sites[2].lan_ns, sites[2].lan_host_ip, duration=2)
    assert tcp.mbps and tcp.mbps > 10
    online = lab.popctl(pop, "sites")
    assert online, "popctl sites answered nothing"
    pop_view = lab.socketctl(sites[0], "pop")
    assert pop_view["sessions"] and pop_view["sessions"][0]["state"] == "connected"
    assert pop_view["sessions"][0]["rtt_ms"] is not None


def test_pop_death_is_noticed_and_sites_reregister_when_it_returns(lab: Lab) -> None:
    (pop,), sites = build(lab, sites=2)
    for site in sites:
        wait_for(f"site {site.n} cloud up", lambda s=site: cloud(lab, s)["state"] == "up")
    assert lab.wait_ping(sites[0].lan_ns, sites[1].lan_host_ip, timeout=10)

    lab.stop_popd(pop, sig=signal.SIGKILL)
    t0 = time.monotonic()
    for site in sites:
        wait_for(f"site {site.n} cloud down", lambda s=site: cloud(lab, s)["state"] != "up", 2)
    # A generous bound on a mechanism whose real figure is bench/cloud's.
    assert time.monotonic() - t0 < 2
    kinds = [e["kind"] for e in lab.socketctl(sites[0], "events")["events"]]
    assert "pop.disconnected" in kinds

    lab.start_popd(pop)
    for site in sites:
        wait_for(f"site {site.n} cloud back", lambda s=site: cloud(lab, s)["state"] == "up")
    assert lab.wait_ping(sites[0].lan_ns, sites[1].lan_host_ip, timeout=10)
    for site in sites:
        assert site.socketd is not None and site.socketd.alive()

    # The sites upload their events; the PoP shows them per site.
    def uploaded() -> bool:
        events = lab.popctl(pop, "events", "--site", "1")["events"]
        return "pop.disconnected" in [e["kind"] for e in events]

    wait_for("site 1's events at the PoP", uploaded, timeout=15)


def test_secondary_pop_carries_traffic_while_the_primary_is_down(lab: Lab) -> None:
    (primary, secondary), sites = build(lab, sites=2, pops=2, hold_s=3)
    for site in sites:
        wait_for(
            f"site {site.n} on primary",
            lambda s=site: cloud(lab, s)["state"] == "up" and cloud(lab, s)["active_pop"] == 1,
        )
    assert lab.wait_ping(sites[0].lan_ns, sites[1].lan_host_ip, timeout=10)

    lab.stop_popd(primary, sig=signal.SIGKILL)
    for site in sites:
        wait_for(
            f"site {site.n} on secondary",
            lambda s=site: cloud(lab, s)["state"] == "up" and cloud(lab, s)["active_pop"] == 2,
        )
    assert lab.wait_ping(sites[0].lan_ns, sites[1].lan_host_ip, timeout=10)

    lab.start_popd(primary)
    for site in sites:
        wait_for(
            f"site {site.n} back on primary",
            lambda s=site: cloud(lab, s)["active_pop"] == 1,
            timeout=20,
        )
    assert lab.wait_ping(sites[0].lan_ns, sites[1].lan_host_ip, timeout=10)
    kinds = [e["kind"] for e in lab.socketctl(sites[0], "events")["events"]]
    assert kinds.count("pop.switched") >= 2


def test_site_restarted_while_the_pop_is_unreachable_keeps_its_last_configuration(lab: Lab) -> None:
    (pop,), sites = build(lab, sites=2)
    site = sites[0]
    wait_for("cloud up", lambda: cloud(lab, site)["state"] == "up")
    wait_for("directory", lambda: len(lab.socketctl(site, "peers")["peers"]) == 1)

    lab.stop_popd(pop, sig=signal.SIGKILL)
    lab.stop_socketd(site)
    lab.start_socketd(site)
    status = cloud(lab, site)
    assert status["state"] != "up" and status["stale"] is True
    peers = lab.socketctl(site, "peers")["peers"]
    assert [(p["site_id"], p["subnets"]) for p in peers] == [(2, [sites[1].lan_subnet])]

    lab.start_popd(pop)
    wait_for("cloud up again", lambda: cloud(lab, site)["state"] == "up")
    assert cloud(lab, site)["stale"] is False


@pytest.mark.timeout(360)
def test_a_site_and_its_pop_with_different_rekey_intervals_agree_before_the_pop_refuses(
    lab: Lab,
) -> None:
    """popd announces 60 s and refuses keys at 120 s (the shortest its config takes), the
    sites rekey every 150 s: without an agreement a site would rekey 30 s after popd stopped
    taking its key. Every PoP session rekeys on the agreed 60 s, both ends show it, and
    traffic through the PoP crosses the 120 s mark and the rekeys without a gap or a cloud
    disconnect."""
    lab.add_inet()
    sites = []
    for n in (1, 2):
        lab.add_router(n, nat="masquerade")
        sites.append(lab.add_site(n))
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=sites, tunnel={"rekey_s": 60, "key_max_age_s": 120})
    lab.start_popd(pop)
    for site in sites:
        lab.write_site_config(site, extra_toml=pops_toml(pop), tunnel={"rekey_s": 150})
        lab.start_socketd(site)
    for site in sites:
        wait_for(f"site {site.n} cloud up", lambda s=site: cloud(lab, s)["state"] == "up")
    assert lab.wait_ping(sites[0].lan_ns, sites[1].lan_host_ip, timeout=10)

    def session(site: Site) -> dict:
        return lab.socketctl(site, "pop")["sessions"][0]

    for site in sites:
        timers = session(site)["timers"]
        assert timers["rekey_s"] == 60 and timers["key_max_age_s"] == 120, timers
        assert timers["own"] == {"rekey_s": 150, "key_max_age_s": 360}, timers
        assert timers["peer"] == {"rekey_s": 60, "key_max_age_s": 120, "announced": True}
    popd_view = {s["site_id"]: s["sessions"][0] for s in lab.popctl(pop, "sites")["sites"]}
    for site in sites:
        assert popd_view[site.n]["timers"] == {
            "rekey_s": 60, "key_max_age_s": 120,
            "site": {"rekey_s": 150, "key_max_age_s": 360, "announced": True},
        }, popd_view[site.n]
    assert "rekey 60s/120s" in lab.popctl(pop, "sites", json_out=False)
    assert "60s/120s" in lab.socketctl(sites[0], "pop", json_out=False)
    first = session(sites[0])["handshakes"]
    # 135 s of pings every 50 ms through the PoP: past popd's 120 s limit, two rekeys of
    # each site's PoP session.
    cp = lab.exec(
        sites[0].lan_ns,
        ["ping", "-n", "-q", "-c", "2700", "-i", "0.05", "-W", "1", sites[1].lan_host_ip],
        timeout=200,
        check=False,
    )
    assert " 0% packet loss" in cp.stdout, cp.stdout
    after = session(sites[0])
    assert after["handshakes"] - first >= 2, after
    assert after["state"] == "connected" and after["drops"]["key_expired"] == 0, after
    kinds = [e["kind"] for e in lab.socketctl(sites[0], "events")["events"]]
    assert not any("disconnect" in k for k in kinds), kinds
