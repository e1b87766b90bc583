"""WAN recovery in the lab: three sites behind NATs with a PoP and a punched mesh, long-lived
TCP flows between every pair both ways and a ping stream. The PoP is cut off (nftables on
its side) and given back, killed and restarted, and one socketd is restarted in the middle of
the outage: traffic moves onto the mesh and back, and not one connection is reset. A site
that alone loses the cloud is reached over the mesh both ways (the others see it offline in
the directory). A site with recovery disabled is cut off during recovery, both ways, and the
others say why."""

from __future__ import annotations

import signal
import time

import pytest
from labwait import wait_for

from sdwan.lab import netns
from sdwan.lab.flows import Flows
from sdwan.lab.recovery import all_on, build, cut, last_seq, relayed, restore, transports
from sdwan.lab.topology import Lab, Pop, Site

HOLD_S = 3


def kinds_since(lab: Lab, site: Site, seq: int) -> list[str]:
    return [e["kind"] for e in lab.socketctl(site, "events", "--limit", "200")["events"]
            if e["seq"] > seq]


def outage_and_back(lab: Lab, pop: Pop, sites: list[Site], flows: Flows, how: str) -> float:
    """Cut the PoP off (how: "nft" or "kill"), check the flows move onto the mesh, give it
    back, check they return; returns the slowest flow's time to resume after the cut."""
    seqs = {s.n: last_seq(lab, s) for s in sites}
    t_cut = cut(lab, pop, how)
    flows.wait("every flow echoing over the mesh",
               lambda: flows.all_echoing_since(t_cut + 1.5, 6), timeout=15)
    resumed = flows.resumed_after(t_cut)
    assert all(v is not None and v < 5 for v in resumed.values()), resumed
    assert all_on(lab, sites, "mesh")
    for s in sites:
        assert "offcloud.recovery.activated" in kinds_since(lab, s, seqs[s.n])
        rec = lab.socketctl(s, "recovery")
        assert rec["active"] and {x["state"] for x in rec["sites"]} == {"mesh"}, rec
        assert lab.socketctl(s, "status")["recovery"]["active"]
    assert flows.broken() == {}

    t_back = time.monotonic()
    restore(lab, pop, how)
    for s in sites:
        wait_for(f"site {s.n} recovery stopped",
                 lambda s=s: "offcloud.recovery.stopped" in kinds_since(lab, s, seqs[s.n]),
                 timeout=HOLD_S + 15)
    # Not before the hold: the cloud had to be back for HOLD_S first.
    assert time.monotonic() - t_back >= HOLD_S - 0.5
    # A site that registered after another was offline in its directory for a moment: that
    # one returns a hold later.
    wait_for("every route on the cloud", lambda: all_on(lab, sites, "cloud"), timeout=HOLD_S + 5)
    before = relayed(lab, pop)
    wait_for("flows through the PoP again", lambda: relayed(lab, pop) > before + 50, timeout=5)
    t = time.time()
    flows.wait("every flow echoing through the PoP", lambda: flows.all_echoing_since(t, 6), 10)
    assert flows.broken() == {}
    return max(v for v in resumed.values() if v is not None)


def test_the_cloud_lost_moves_every_flow_onto_the_mesh_and_back_without_a_reset(
    lab: Lab,
) -> None:
    pop, sites = build(lab, hold_s=HOLD_S)
    assert all_on(lab, sites, "cloud")
    flows = Flows(lab, sites)
    t0 = time.time()
    flows.wait("every flow up", lambda: flows.all_echoing_since(t0, 6), timeout=20)
    ping = lab.spawn(sites[0].lan_ns, ["ping", "-n", "-D", "-i", "0.05", sites[1].lan_host_ip],
                     name="ping-stream")

    cut_s = outage_and_back(lab, pop, sites, flows, "nft")
    kill_s = outage_and_back(lab, pop, sites, flows, "kill")
    print(f"\nflows resumed over the mesh: nft cut {cut_s:.2f} s, popd killed {kill_s:.2f} s")

    # A restart in the middle of an outage: socketd comes back from its stored configuration,
    # directory and NAT data, without the PoP, and its flows continue over the mesh.
    lab.stop_popd(pop, sig=signal.SIGKILL)
    t_mesh = time.time() + 1.5
    flows.wait("flows on the mesh", lambda: flows.all_echoing_since(t_mesh, 6), 15)
    s3 = sites[2]
    lab.stop_socketd(s3, sig=signal.SIGKILL)
    t_restart = time.time()
    lab.start_socketd(s3)
    flows.wait("site 3's flows back over the mesh",
               lambda: flows.all_echoing_since(t_restart + 0.1, 6), timeout=15)
    rec = lab.socketctl(s3, "recovery")
    assert rec["active"] and "recovery was active when socketd stopped" in rec["reason"], rec
    assert transports(lab, s3)[sites[0].lan_subnet] == "mesh"
    took = max(v for v in flows.resumed_after(t_restart).values() if v is not None)
    print(f"restart in the outage: site 3's flows resumed {took:.2f} s after the restart")
    assert took < 10
    lab.start_popd(pop)
    for s in sites:
        wait_for(f"site {s.n} back on the cloud", lambda s=s: not lab.socketctl(
            s, "recovery")["active"], timeout=HOLD_S + 20)
    t = time.time()
    flows.wait("every flow through the PoP", lambda: flows.all_echoing_since(t, 6), 10)
    assert flows.broken() == {}

    lab.kill(ping)
    replies = [float(line.split("]")[0].lstrip("["))
               for line in (ping.log_tail(1_000_000)).splitlines() if "bytes from" in line]
    gaps = sorted(b - a for a, b in zip(replies, replies[1:], strict=False))
    assert len(replies) > 100 and gaps[-1] < 10, gaps[-5:]


def test_a_site_with_recovery_disabled_is_cut_off_both_ways_and_the_others_say_why(
    lab: Lab,
) -> None:
    pop, (s1, s2, s3) = build(lab, recovery=(True, True, False), hold_s=HOLD_S)
    for a, b in ((s1, s3), (s3, s1), (s1, s2)):
        assert lab.wait_ping(a.lan_ns, b.lan_host_ip, timeout=10), (a.n, b.n)

    # Only site 2 loses the cloud (its router drops the PoP): site 2 is in recovery, and site
    # 1, whose cloud is fine, sees site 2 offline in the directory and sends to it over the
    # mesh too, so both ways of 1 <-> 2 work; site 3 has recovery off: cut off from site 2.
    lab.router_nft(2, f"table inet nopop {{\n chain forward_pop {{\n"
                      f"  type filter hook forward priority -5;\n"
                      f"  ip daddr {pop.ip} drop\n  ip saddr {pop.ip} drop\n }}\n}}\n")
    wait_for("site 2 in recovery", lambda: lab.socketctl(s2, "recovery")["active"], timeout=5)
    wait_for("site 1 sees site 2 lost",
             lambda: lab.socketctl(s1, "recovery")["lost_sites"] == [2], timeout=10)
    assert not lab.socketctl(s1, "recovery")["active"]
    assert transports(lab, s1)[s2.lan_subnet] == "mesh"
    assert transports(lab, s1)[s3.lan_subnet] == "cloud"
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=5)
    assert lab.wait_ping(s2.lan_ns, s1.lan_host_ip, timeout=5)
    assert not lab.ping(s3.lan_ns, s2.lan_host_ip, count=2, wait_s=1)
    netns.run(lab.routers[2].ns, ["nft", "delete", "table", "inet", "nopop"])
    wait_for("site 2 back on the cloud, both ends",
             lambda: not lab.socketctl(s2, "recovery")["active"]
             and lab.socketctl(s1, "recovery")["lost_sites"] == [], timeout=HOLD_S + 20)
    assert transports(lab, s1)[s2.lan_subnet] == "cloud"
    assert lab.wait_ping(s3.lan_ns, s2.lan_host_ip, timeout=10)
    lab.stop_popd(pop, sig=signal.SIGKILL)
    wait_for("site 1 in recovery", lambda: lab.socketctl(s1, "recovery")["active"], timeout=5)
    wait_for("site 1 to 2 over the mesh", lambda: lab.ping(s1.lan_ns, s2.lan_host_ip), 5)
    assert not lab.ping(s1.lan_ns, s3.lan_host_ip, count=3, wait_s=1)
    assert not lab.ping(s3.lan_ns, s1.lan_host_ip, count=3, wait_s=1)
    # Both ways: neither end sends the other's traffic over their mesh tunnel.
    assert transports(lab, s1)[s3.lan_subnet] == "cloud"
    assert transports(lab, s3)[s1.lan_subnet] == "cloud"
    why = {x["site_id"]: x for x in lab.socketctl(s1, "recovery")["sites"]}
    assert why[3]["state"] == "unreachable"
    assert "disabled for site 3" in why[3]["why"]
    own = lab.socketctl(s3, "recovery")
    assert not own["active"] and not own["enabled"]
    lab.start_popd(pop)
    wait_for("site 3 through the PoP again",
             lambda: lab.ping(s1.lan_ns, s3.lan_host_ip, wait_s=1), timeout=15)


if __name__ == "__main__":
    pytest.main([__file__, "-v", "-s"])
