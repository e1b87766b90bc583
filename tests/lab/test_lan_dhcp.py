"""The LAN port as a LAN host sees it: two sites with the PoP, whose LAN ports and hosts start
without an address. socketd puts `[lan] address` on its port and serves DHCP; each LAN host
asks with its own DHCP client (busybox udhcpc), gets an address (a static lease by its MAC at
site 1, one of the range at site 2) and its default route, and reaches the other site's host
through the PoP. `socketctl lan` lists the leases; a DHCP server killed is started again, none
outlives its socketd (stopped or killed), and a LAN address removed is put back, with or
without DHCP."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
from typing import Any

import pytest
from labwait import wait_for

from sdwan.lab import netns
from sdwan.lab.topology import Lab, Site

STATIC_MAC = "02:00:00:00:01:02"
STATIC_IP = "10.1.0.50"


@pytest.fixture(autouse=True)
def _busybox() -> None:
    # Not a skip: a CI machine without it is a broken setup (scripts/setup.sh installs it).
    if shutil.which("busybox") is None:
        pytest.fail("busybox (udhcpd, udhcpc) is not installed", pytrace=False)


def dhcp_toml(site: Site, static: bool) -> str:
    net = ipaddress.ip_network(site.lan_subnet)
    text = (
        "[lan.dhcp]\n"
        f'range = ["{net.network_address + 100}", "{net.network_address + 199}"]\n'
        'dns = ["192.0.2.53"]\n'
        "lease_s = 600\n"
    )
    if static:
        text += (
            f'\n[[lan.dhcp.static]]\nmac = "{STATIC_MAC}"\nip = "{STATIC_IP}"\nname = "printer"\n'
        )
    return text


def lan(lab: Lab, site: Site) -> dict[str, Any]:
    return lab.socketctl(site, "lan")


def running(lab: Lab, site: Site) -> dict[str, Any]:
    return wait_for(
        f"site {site.n}'s DHCP server running",
        lambda: (st := lan(lab, site))["dhcp"]["state"] == "running" and st,
        timeout=60,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_lan_hosts_get_addresses_from_socketd_and_reach_the_other_site(lab: Lab) -> None:
    lab.add_inet()
    sites = []
    for n in (1, 2):
        lab.add_router(n)
        sites.append(lab.add_site(n, lan_dhcp=True))
    s1, s2 = sites
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=sites)
    lab.start_popd(pop)
    pops = f'[[pops]]\nid = 1\nendpoint = "{pop.endpoint}"\n'
    lab.write_site_config(s1, extra_toml=pops + dhcp_toml(s1, static=True))
    lab.write_site_config(s2, extra_toml=pops + dhcp_toml(s2, static=False))
    # Nothing addressed the LAN ports or hosts before socketd.
    for s in sites:
        for ns, dev in ((s.ns, "lan0"), (s.lan_ns, "eth0")):
            assert "inet " not in netns.run(ns, ["ip", "-4", "addr", "show", "dev", dev]).stdout
        lab.start_socketd(s)

    for s in sites:
        st = running(lab, s)
        assert st["address"] == f"{s.lan_ip}/24" and f"{s.lan_ip}/24" in st["addresses"], st
        assert st["address_error"] is None and st["dhcp"]["error"] is None, st

    # Site 1's host has a static lease by its MAC; site 2's takes one of the range.
    assert lab.lan_dhcp_client(s1, mac=STATIC_MAC) == STATIC_IP
    ip2 = lab.lan_dhcp_client(s2)
    assert ipaddress.ip_address("10.2.0.100") <= ipaddress.ip_address(ip2) <= ipaddress.ip_address(
        "10.2.0.199"
    ), ip2
    for s in sites:
        routes = netns.routes(s.lan_ns)
        assert f"default via {s.lan_ip} dev eth0" in routes, routes

    assert lab.wait_ping(s1.lan_ns, ip2, timeout=60), lab.socketctl(s1, "peers")
    assert lab.wait_ping(s2.lan_ns, STATIC_IP, timeout=30), lab.socketctl(s2, "peers")

    st1 = lan(lab, s1)
    (lease1,) = st1["dhcp"]["leases"]
    assert lease1["mac"] == STATIC_MAC and lease1["ip"] == STATIC_IP, lease1
    assert lease1["static"] is True and lease1["hostname"] == "printer", lease1
    assert 0 < lease1["expires_s"] <= 600 and not lease1["expired"], lease1
    assert st1["dhcp"]["range"] == ["10.1.0.100", "10.1.0.199"], st1
    assert st1["dhcp"]["router"] == "10.1.0.1" and st1["dhcp"]["dns"] == ["192.0.2.53"], st1
    mac2 = re.search(
        r"link/ether (\S+)", netns.run(s2.lan_ns, ["ip", "link", "show", "eth0"]).stdout
    )
    assert mac2 is not None
    (lease2,) = lan(lab, s2)["dhcp"]["leases"]
    assert (lease2["mac"], lease2["ip"], lease2["static"]) == (mac2.group(1), ip2, False), lease2

    table = lab.socketctl(s1, "lan", json_out=False)
    assert re.search(r"dhcp +running, pid \d+", table), table
    assert re.search(rf"{re.escape(STATIC_IP)} +{STATIC_MAC} +printer +static +\d+m", table), table

    # A DHCP server that dies is started again, with the leases of its range; none outlives
    # its socketd.
    pid = lan(lab, s2)["dhcp"]["pid"]
    os.kill(pid, signal.SIGKILL)
    again = wait_for(
        "a new DHCP server at site 2",
        lambda: (st := lan(lab, s2))["dhcp"]["pid"] not in (None, pid) and st,
        timeout=30,
    )
    assert again["dhcp"]["restarts"] == 1, again
    events = lab.socketctl(s2, "events", "--kind", "lan.dhcp")["events"]
    assert any("udhcpd was killed by SIGKILL" in e["text"] for e in events), events
    assert wait_for(
        "site 2's lease read back from the new server",
        lambda: [le["ip"] for le in lan(lab, s2)["dhcp"]["leases"]] == [ip2],
        timeout=10,
    )
    # A LAN address removed under a running DHCP server (which goes on as if nothing happened)
    # is put back.
    address_restored(lab, s2)

    # Neither an orderly stop nor a crash leaves a DHCP server behind.
    pid = again["dhcp"]["pid"]
    lab.stop_socketd(s2)
    assert wait_for("site 2's DHCP server gone with socketd", lambda: not alive(pid), timeout=10)
    pid = running(lab, s1)["dhcp"]["pid"]
    lab.stop_socketd(s1, signal.SIGKILL)
    assert wait_for("site 1's DHCP server gone with its killed socketd", lambda: not alive(pid),
                    timeout=10)


def address_events(lab: Lab, site: Site) -> list[str]:
    return [e["text"] for e in lab.socketctl(site, "events", "--kind", "lan.address")["events"]]


def address_restored(lab: Lab, site: Site) -> None:
    # The address is on before socketd's own start; its watch begins once the port's start
    # applied it again (its first event): a flush before that is not a removal it must notice.
    wait_for(f"site {site.n}'s LAN port started", lambda: address_events(lab, site), timeout=30)
    netns.run(site.ns, ["ip", "addr", "flush", "dev", "lan0"])
    gone = netns.run(site.ns, ["ip", "-4", "addr", "show", "dev", "lan0"]).stdout
    assert f"inet {site.lan_ip}/" not in gone, gone
    wait_for(
        f"site {site.n}'s LAN address put back",
        lambda: f"inet {site.lan_ip}/24" in netns.run(
            site.ns, ["ip", "-4", "addr", "show", "dev", "lan0"]
        ).stdout,
        timeout=10,
    )
    # The event follows the address by a moment (it is stored once the apply returned).
    wait_for(
        f"site {site.n}'s lan.address event saying it was restored",
        lambda: any("restored" in text for text in address_events(lab, site)),
        timeout=5,
    )


def test_a_lan_address_without_dhcp_is_put_back_when_removed(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1, lan_dhcp=True)
    lab.write_site_config(site)
    lab.start_socketd(site)
    wait_for(
        "site 1's LAN address",
        lambda: (st := lan(lab, site))["address_error"] is None
        and f"{site.lan_ip}/24" in st["addresses"],
        timeout=60,
    )
    assert lan(lab, site)["dhcp"] == {"enabled": False, "state": "off"}
    address_restored(lab, site)
