"""Allowed sources on the sites, in the lab: three sites with a PoP and a punched mesh, real
socketd and popd, DTLS and the fast path. Traffic flows through the PoP and, with popd killed,
over the mesh (WAN recovery) without one packet dropped as `spoofed`: the check stays on
across the switch of transport. Then a LAN host of site 2 sends with an address of site 3's
subnet; site 2 forwards it to site 1 over the mesh (a site does not filter its own LAN's
sources), and site 1 drops it as `spoofed` on its peer for site 2 while genuine traffic keeps
flowing (docs/security.md, "Source addresses in the tunnels")."""

from __future__ import annotations

import signal
import time

from labwait import wait_for

from sdwan.lab import netns
from sdwan.lab.recovery import all_on, build
from sdwan.lab.topology import Lab, Site


def spoofed_on_links(lab: Lab, site: Site) -> int:
    """`socketctl status`: packets dropped as spoofed, over every link."""
    return sum(link["drops"].get("spoofed", 0) for link in lab.socketctl(site, "status")["links"])


def spoofed_from(lab: Lab, site: Site, peer: int) -> int:
    """`socketctl peers`: the spoofed drops on the peer for site `peer` (its mesh tunnel)."""
    for p in lab.socketctl(site, "peers")["peers"]:
        if p["site_id"] == peer and p.get("drops") is not None:
            return int(p["drops"].get("spoofed", 0))
    raise AssertionError(f"no tunnel to site {peer} listed by site {site.n}")


def all_pings(lab: Lab, sites: list[Site]) -> None:
    for a in sites:
        for b in sites:
            if a is not b:
                assert lab.wait_ping(a.lan_ns, b.lan_host_ip, timeout=5), (a.n, b.n)


def test_sources_are_checked_on_every_transport_and_a_forged_source_is_dropped(
    lab: Lab,
) -> None:
    pop, sites = build(lab, hold_s=3)
    s1, s2, s3 = sites
    assert all_on(lab, sites, "cloud")
    for s in sites:
        st = lab.socketctl(s, "status")["sources"]
        assert st["prefixes"] == 2 and st["conflicts"] == [], (s.n, st)
    all_pings(lab, sites)  # through the PoP

    lab.stop_popd(pop, sig=signal.SIGKILL)
    wait_for("every route on the mesh", lambda: all_on(lab, sites, "mesh"), timeout=10)
    all_pings(lab, sites)  # over the mesh, each site's peer checked against its site
    for s in sites:
        assert spoofed_on_links(lab, s) == 0, s.n

    # Site 2's LAN host takes an address of site 3's LAN and pings site 1's host from it.
    forged = "10.3.0.99"
    netns.addr_add(s2.lan_ns, "eth0", f"{forged}/32")
    stream = lab.spawn(s1.lan_ns, ["ping", "-n", "-D", "-i", "0.05", s2.lan_host_ip],
                       name="genuine")
    t0 = time.time()
    assert not lab.ping(s2.lan_ns, s1.lan_host_ip, count=5, wait_s=1, source=forged)
    wait_for("the forged pings counted at site 1",
             lambda: spoofed_from(lab, s1, 2) >= 5, timeout=5)
    assert spoofed_on_links(lab, s1) == spoofed_from(lab, s1, 2)
    assert spoofed_on_links(lab, s3) == 0  # the forgery never got as far as site 3
    # The genuine address of the same host still gets through, both ways.
    assert lab.ping(s2.lan_ns, s1.lan_host_ip, count=2, wait_s=1, source=s2.lan_host_ip)
    lab.kill(stream)
    replies = [float(line.split("]")[0].lstrip("["))
               for line in stream.log_tail(1_000_000).splitlines() if "bytes from" in line]
    took = time.time() - t0
    assert len(replies) > took / 0.05 * 0.8, (len(replies), took)  # no gap while forging
