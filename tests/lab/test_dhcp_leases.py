"""DHCP leases are checked like static addresses: a real DHCP server (busybox udhcpd in the
router's namespace, on the link's segment) hands a real socketd's WAN link one bad lease after
another, then a good one.

What is checked is what the operator sees and what the box does: each bad lease is refused with
a `link.dhcp_refused` event naming the server and the reason, `socketctl links` shows the
refusal, and nothing of it reaches the device (no address, no route on the link); the good
lease is applied, its prefix route at the link's metric next to its default route.
"""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest
from labwait import wait_for

from sdwan.appliance.wanaddr import route_metric
from sdwan.common.netcfg import RT_PROTO_SDWAN, link_table
from sdwan.lab import netns
from sdwan.lab.netns import Daemon
from sdwan.lab.topology import Lab, Site

SERVER = "100.64.1.1"  # the router's address on the link: udhcpd's server id

# (first address of the pool, subnet mask, what the refusal says)
BAD_LEASES = [
    ("200.1.1.5", "128.0.0.0", "128.0.0.0/1 is a /1: shorter than /8"),
    ("127.0.0.5", "255.0.0.0", "127.0.0.5 cannot be a WAN address"),
    ("224.0.0.5", "255.255.255.0", "224.0.0.5 cannot be a WAN address"),
    ("10.1.0.77", "255.255.0.0", "10.1.0.0/16 overlaps 10.1.0.0/24 of the LAN"),
]
GOOD_LEASE = ("100.64.1.100", "255.255.255.0")


@pytest.fixture(autouse=True)
def _busybox() -> None:
    # Not a skip: a CI machine without it is a broken setup (scripts/setup.sh installs it).
    if shutil.which("busybox") is None:
        pytest.fail("busybox (udhcpd, udhcpc) is not installed", pytrace=False)


def udhcpd(lab: Lab, site: Site, n: int, start: str, mask: str) -> Daemon:
    """A DHCP server on site's WAN segment handing out `start` with `mask`, router SERVER."""
    router = site.router
    assert router.ns is not None
    conf = lab.workdir / f"udhcpd-{n}.conf"
    leases = lab.workdir / f"udhcpd-{n}.leases"
    leases.touch()
    conf.write_text(
        f"start {start}\nend {start}\ninterface site{site.n}\nlease_file {leases}\n"
        f"pidfile {lab.workdir}/udhcpd-{n}.pid\n"
        f"option subnet {mask}\noption router {SERVER}\noption lease 600\n"
    )
    return lab.spawn(
        router.ns, ["busybox", "udhcpd", "-f", str(conf)], f"udhcpd-{n}", max_lifetime_s=300
    )


def wan_link(lab: Lab, site: Site) -> dict[str, Any]:
    return lab.socketctl(site, "links")["links"][0]


def routes_on_wan(site: Site) -> str:
    return netns.run(site.ns, ["ip", "-4", "route", "show", "dev", site.wan_dev]).stdout.strip()


def addresses_on_wan(site: Site) -> list[str]:
    out = netns.run(site.ns, ["ip", "-4", "-o", "addr", "show", "dev", site.wan_dev]).stdout
    return re.findall(r"inet (\S+)", out)


def refusals(lab: Lab, site: Site) -> list[dict[str, Any]]:
    return lab.socketctl(site, "events", "--kind", "link.dhcp_refused")["events"]


def test_bad_leases_are_refused_and_a_good_one_is_applied_at_the_links_metric(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    # (A lease over a static peer's subnet is refused the same way: tests/unit/test_addressing.py.)
    lab.write_site_config(site)
    lab.start_socketd(site)

    server = udhcpd(lab, site, 0, *BAD_LEASES[0][:2])
    link = lab.socketctl(site, "set-link", "wan1", "dhcp")
    assert link["addressing"] == "dhcp", link

    for n, (start, mask, why) in enumerate(BAD_LEASES):
        if n:
            lab.kill(server)
            server = udhcpd(lab, site, n, start, mask)
        # socketd asks for another lease by itself after each refusal (2 s, 4 s, 8 s...).
        events = wait_for(
            f"lease {start} refused",
            lambda start=start: [e for e in refusals(lab, site) if start in e["text"]],
            timeout=60,
        )
        assert len(events) == 1, events
        ev = events[0]
        assert f"from server {SERVER} refused: {why}" in ev["text"], ev
        assert ev["data"]["server"] == SERVER and why in ev["data"]["reason"], ev
        assert ev["data"]["link"] == "wan1", ev

        shown = wan_link(lab, site)
        assert shown["dhcp"]["refused"]["server"] == SERVER, shown
        assert why in shown["dhcp"]["refused"]["reason"], shown
        assert why in (shown["error"] or ""), shown
        # Nothing of the lease is on the device: no address, no route of any kind.
        assert addresses_on_wan(site) == [], addresses_on_wan(site)
        assert routes_on_wan(site) == "", routes_on_wan(site)

    # The operator's table says why the link has no address.
    table = lab.socketctl(site, "links", json_out=False)
    assert re.search(
        # (HEALTH, LOSS/JIT/LAT and CARRIES, link health's columns, sit between STATE and
        # ADDRESSING.)
        rf"wan1\s+wan1\s+up\s+\S+\s+\S+\s+\S+\s+dhcp\s+-\s+-\s+1\s+error:"
        rf" DHCP lease 10\.1\.0\.77/16 from server"
        rf" {re.escape(SERVER)} refused: 10\.1\.0\.0/16 overlaps 10\.1\.0\.0/24 of the LAN",
        table,
    ), table

    lab.kill(server)
    server = udhcpd(lab, site, len(BAD_LEASES), *GOOD_LEASE)
    wait_for(
        "the good lease on wan1",
        lambda: addresses_on_wan(site) == ["100.64.1.100/24"],
        timeout=90,
    )
    metric = route_metric(0)
    routes = wait_for(
        "the lease's default route",
        lambda: "default via" in (text := routes_on_wan(site)) and text,
    )
    # The prefix route has the link's metric, as its default route does, not the kernel's 0.
    assert re.search(
        rf"100\.64\.1\.0/24 proto kernel scope link src 100\.64\.1\.100 metric {metric}\b",
        routes,
    ), routes
    assert re.search(rf"default via {re.escape(SERVER)} (proto \w+ )?metric {metric}\b", routes), (
        routes
    )
    # No route into the LAN's or anybody else's space came with the earlier leases.
    assert routes.count("\n") == 1, routes
    shown = wait_for(
        "socketd reports the lease bound",
        lambda: (link := wan_link(lab, site))["dhcp"]["state"] == "bound" and link,
    )
    assert shown["dhcp"]["refused"] is None and shown["error"] is None, shown
    assert shown["dhcp"]["address"] == "100.64.1.100/24", shown
    assert lab.ping(site.ns, "198.51.100.1")
    accepted = lab.socketctl(site, "events", "--kind", "link.dhcp")["events"]
    assert any("DHCP lease 100.64.1.100/24 via 100.64.1.1" in e["text"] for e in accepted)
    # Every refusal was recorded once, not at each of udhcpc's retries.
    assert len(refusals(lab, site)) == len(BAD_LEASES), refusals(lab, site)
    # The lease also made the link's own routing table and its rule (docs/links.md).
    own = netns.run(site.ns, ["ip", "-4", "route", "show", "table", str(link_table(1))]).stdout
    assert f"default via {SERVER} dev {site.wan_dev} proto {RT_PROTO_SDWAN}" in own, own
    rules = netns.run(site.ns, ["ip", "-4", "rule", "show"]).stdout
    assert f"from 100.64.1.100 lookup {link_table(1)} proto {RT_PROTO_SDWAN}" in rules, rules
