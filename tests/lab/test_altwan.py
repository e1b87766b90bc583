"""Alt-WAN in the lab: three sites behind NATs with a PoP and a punched mesh, each with a
second link on a private bridge (the lab's MPLS network) and an Alt-WAN tunnel to each other
site over it, long-lived TCP flows between every pair both ways and a ping stream. Through the
PoP while it lives; popd killed: every site's traffic takes Alt-WAN, not the mesh; a socketd
restarted then comes back on Alt-WAN from its stored directory; the Alt-WAN carrier fails
too: the mesh carries it; the carrier back: Alt-WAN again; popd back: the cloud
after the hold. Not one connection is reset."""

from __future__ import annotations

import signal
import time

import pytest
from labwait import wait_for

from sdwan.lab.flows import Flows
from sdwan.lab.recovery import all_on, build, relayed, transports, tunnel_packets
from sdwan.lab.topology import Lab, Site

HOLD_S = 3


def grown(lab: Lab, sites: list[Site], transport: str, before: dict[int, dict[int, int]]
          ) -> dict[tuple[int, int], int]:
    """Per (site, peer), how many packets that tunnel carried since `before`."""
    out = {}
    for s in sites:
        now = tunnel_packets(lab, s, transport)
        for peer, n in now.items():
            out[(s.n, peer)] = n - before[s.n].get(peer, 0)
    return out


def test_alt_wan_first_when_the_cloud_is_lost_the_mesh_where_it_cannot_reach(lab: Lab) -> None:
    pop, sites = build(lab, hold_s=HOLD_S, altwan=True)
    assert all_on(lab, sites, "cloud")
    flows = Flows(lab, sites)
    t0 = time.time()
    flows.wait("every flow up", lambda: flows.all_echoing_since(t0, 6), timeout=20)
    ping = lab.spawn(sites[0].lan_ns, ["ping", "-n", "-D", "-i", "0.05", sites[1].lan_host_ip],
                     name="ping-stream")
    status = lab.socketctl(sites[0], "status")
    assert status["altwan"] == {"enabled": True, "link": "mpls", "peers": 2, "peers_up": 2}

    # The cloud is lost: Alt-WAN carries every pair, the mesh nothing.
    lab.stop_popd(pop, sig=signal.SIGKILL)
    t_cut = time.time()
    flows.wait("every flow echoing over Alt-WAN",
               lambda: flows.all_echoing_since(t_cut + 1.5, 6), timeout=15)
    took = {"cloud lost": max(v for v in flows.resumed_after(t_cut).values() if v is not None)}
    assert all_on(lab, sites, "alt-wan"), {s.n: transports(lab, s) for s in sites}
    alt0 = {s.n: tunnel_packets(lab, s, "alt-wan") for s in sites}
    mesh0 = {s.n: tunnel_packets(lab, s, "mesh") for s in sites}
    time.sleep(2)
    alt, mesh = grown(lab, sites, "alt-wan", alt0), grown(lab, sites, "mesh", mesh0)
    # Flows echo 20 lines a second each way: hundreds of packets; the mesh sees link health's
    # probes (a few a second each way, with their acks) and keepalives, no flow.
    assert all(n > 200 for n in alt.values()), alt
    assert all(n < 150 for n in mesh.values()), mesh
    for s in sites:
        rec = lab.socketctl(s, "recovery")
        assert rec["active"], rec
        assert {x["state"] for x in rec["sites"]} == {"alt-wan"}, rec["sites"]
        assert {x["ready_via"] for x in rec["sites"]} == {"alt-wan"}

    # A restart in the outage: socketd builds its Alt-WAN tunnels from the stored directory,
    # without the PoP, and its flows go on over them.
    s3 = sites[2]
    lab.stop_socketd(s3, sig=signal.SIGKILL)
    t_restart = time.time()
    lab.start_socketd(s3)
    flows.wait("site 3's flows back", lambda: flows.all_echoing_since(t_restart + 0.1, 6), 15)
    took["restart"] = max(v for v in flows.resumed_after(t_restart).values() if v is not None)
    # The others hold their tunnels to site 3 off for a moment after its silence.
    wait_for("every route on Alt-WAN after the restart", lambda: all_on(lab, sites, "alt-wan"),
             timeout=20)
    assert lab.socketctl(s3, "status")["altwan"]["peers_up"] == 2

    # The Alt-WAN carrier fails as well: each site notices under traffic, the mesh takes over.
    lab.cut_altwan()
    t_alt = time.time()
    wait_for("every route on the mesh", lambda: all_on(lab, sites, "mesh"), timeout=10)
    flows.wait("every flow echoing over the mesh",
               lambda: flows.all_echoing_since(t_alt + 2, 6), timeout=15)
    took["Alt-WAN cut"] = max(v for v in flows.resumed_after(t_alt).values() if v is not None)
    assert lab.ping(sites[1].lan_ns, sites[2].lan_host_ip, count=2)
    rec = lab.socketctl(sites[0], "recovery")
    assert {x["state"] for x in rec["sites"]} == {"mesh"}, rec["sites"]

    # The carrier is back: its tunnels come back, and traffic with them once their hold (after
    # the silence) is over.
    lab.restore_altwan()
    t_restored = time.monotonic()
    wait_for("every route on Alt-WAN again", lambda: all_on(lab, sites, "alt-wan"), timeout=30)
    took["Alt-WAN back (routes)"] = time.monotonic() - t_restored
    t = time.time()
    flows.wait("every flow echoing over Alt-WAN", lambda: flows.all_echoing_since(t, 6), 10)

    # popd back: the cloud once it has been back for the hold.
    t_back = time.monotonic()
    lab.start_popd(pop)
    wait_for("every route on the cloud", lambda: all_on(lab, sites, "cloud"), timeout=HOLD_S + 20)
    assert time.monotonic() - t_back >= HOLD_S - 0.5
    before = relayed(lab, pop)
    wait_for("flows through the PoP again", lambda: relayed(lab, pop) > before + 50, timeout=5)
    t = time.time()
    flows.wait("every flow echoing through the PoP", lambda: flows.all_echoing_since(t, 6), 10)
    assert flows.broken() == {}
    print("\n" + ", ".join(f"{k}: {v:.2f} s" for k, v in took.items()))

    lab.kill(ping)
    replies = [float(line.split("]")[0].lstrip("["))
               for line in (ping.log_tail(1_000_000)).splitlines() if "bytes from" in line]
    gaps = sorted(b - a for a, b in zip(replies, replies[1:], strict=False))
    assert len(replies) > 100 and gaps[-1] < 10, gaps[-5:]
    events = lab.socketctl(sites[0], "events", "--limit", "200")["events"]
    kinds = [e["kind"] for e in events]
    assert "altwan.connect" in kinds and "altwan.disconnect" in kinds


if __name__ == "__main__":
    pytest.main([__file__, "-v", "-s"])
