"""Each WAN link has a policy-routing table of its own (docs/links.md, "Routing tables"): a real
socketd with two WAN links into its router, and a VLAN link.

What is checked is what the kernel does with a packet: one sent from a link's address leaves
by that link whatever the main table's default routes say, while the LAN stays reachable from
it; the tables and rules follow the links' addressing (also one left to the system) and go
when socketd stops, and what the operator put beside them stays.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
from labwait import wait_for

from sdwan.appliance.wanaddr import route_metric
from sdwan.common.netcfg import RT_PROTO_SDWAN, link_rule_priorities, link_table
from sdwan.lab import netns
from sdwan.lab.topology import Lab, Site

# The second WAN link: a second veth from the site into its router, on a network of its own.
WAN2_DEV = "wan2"
WAN2_ROUTER_DEV = "site1b"
WAN2_GW = "100.64.11.1"
WAN2_IP = "100.64.11.2"
OUTSIDE = "198.51.100.1"  # the Internet's bridge, beyond the router

# Put there by the operator: socketd must leave them alone.
OPERATOR_RULE = "from 192.0.2.7 lookup 102"
OPERATOR_ROUTE = "192.0.2.0/24"


def site_with_two_wans(lab: Lab) -> Site:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    assert site.router.ns is not None
    netns.veth(site.router.ns, WAN2_ROUTER_DEV, site.ns, WAN2_DEV)
    netns.addr_add(site.router.ns, WAN2_ROUTER_DEV, f"{WAN2_GW}/24")
    return site


def static(address: str, gateway: str) -> dict[str, object]:
    return {"mode": "static", "address": address, "gateway": gateway}


def wan2_link(**more: object) -> str:
    values: dict[str, object] = {"name": "wan2", "interface": WAN2_DEV, "port": 4801, **more}
    lines = ["[[links]]"]
    for k, v in values.items():
        if isinstance(v, dict):
            inner = ", ".join(f'{ik} = "{iv}"' for ik, iv in v.items())
            lines.append(f"{k} = {{ {inner} }}")
        else:
            lines.append(f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


def ip(site: Site, *args: str) -> str:
    return netns.run(site.ns, ["ip", *args]).stdout.strip()


def rules(site: Site) -> str:
    return ip(site, "-4", "rule", "show")


def table(site: Site, link_id: int) -> str:
    cp = netns.run(
        site.ns, ["ip", "-4", "route", "show", "table", str(link_table(link_id))], check=False
    )
    return cp.stdout.strip()  # a table never filled does not exist: no routes


def route_get(site: Site, dst: str, src: str | None = None) -> str:
    return ip(site, "route", "get", dst, *(["from", src] if src else []))


def rx_packets(ns: str, dev: str) -> int:
    out = netns.run(ns, ["cat", f"/sys/class/net/{dev}/statistics/rx_packets"]).stdout
    return int(out)


def link_rules(link_id: int, address: str) -> list[str]:
    """The two rules of a link for one of its addresses, as `ip rule` shows them."""
    main, own = link_rule_priorities(link_id)
    return [
        f"{main}:\tfrom {address} lookup main suppress_prefixlength 0 proto {RT_PROTO_SDWAN}",
        f"{own}:\tfrom {address} lookup {link_table(link_id)} proto {RT_PROTO_SDWAN}",
    ]


def stop(lab: Lab, site: Site) -> None:
    """Stop socketd and let it finish: its last act is a netcfg worker removing what it
    installed, which a loaded machine may take more than the lab's usual grace for."""
    assert site.socketd is not None
    assert lab.kill(site.socketd, grace_s=30) == 0, site.socketd.log_tail()
    site.socketd = None


def links_of(lab: Lab, site: Site) -> dict[str, dict[str, Any]]:
    return {ln["name"]: ln for ln in lab.socketctl(site, "links")["links"]}


def test_two_static_links_each_have_their_table_and_rules_until_socketd_stops(lab: Lab) -> None:
    site = site_with_two_wans(lab)
    # The operator's rule at one of socketd's priorities and route in one of its tables.
    ip(site, "rule", "add", "priority", str(link_rule_priorities(2)[1]), *OPERATOR_RULE.split())
    ip(site, "route", "add", OPERATOR_ROUTE, "dev", site.wan_dev, "table", str(link_table(2)))
    lab.write_site_config(
        site,
        link={"addressing": static(f"{site.wan_ip}/24", site.wan_gw)},
        extra_toml=wan2_link(precedence=2, addressing=static(f"{WAN2_IP}/24", WAN2_GW)),
    )
    lab.start_socketd(site)

    wait_for(
        "both links' rules",
        lambda: all(
            r in rules(site) for r in [*link_rules(1, site.wan_ip), *link_rules(2, WAN2_IP)]
        ),
    )
    wait_for("wan1's default route in its table", lambda: "default via" in table(site, 1))
    wait_for("wan2's default route in its table", lambda: "default via" in table(site, 2))
    t1, t2 = table(site, 1), table(site, 2)
    assert f"default via {site.wan_gw} dev {site.wan_dev} proto {RT_PROTO_SDWAN}" in t1, t1
    assert f"100.64.1.0/24 dev {site.wan_dev} proto {RT_PROTO_SDWAN} scope link src" in t1, t1
    assert f"default via {WAN2_GW} dev {WAN2_DEV} proto {RT_PROTO_SDWAN}" in t2, t2
    assert f"100.64.11.0/24 dev {WAN2_DEV} proto {RT_PROTO_SDWAN} scope link src" in t2, t2
    # The main table keeps each link's default route at its metric.
    main = ip(site, "-4", "route", "show", "table", "main")
    for gw, dev, index in ((site.wan_gw, site.wan_dev, 0), (WAN2_GW, WAN2_DEV, 1)):
        assert re.search(rf"default via {gw} dev {dev} .*metric {route_metric(index)}", main), main

    # From wan2's address out by wan2, although wan1's default route is the better one.
    got = route_get(site, "8.8.8.8", WAN2_IP)
    assert f"via {WAN2_GW} dev {WAN2_DEV}" in got and f"table {link_table(2)}" in got, got
    got = route_get(site, "8.8.8.8", site.wan_ip)
    assert f"via {site.wan_gw} dev {site.wan_dev}" in got, got
    assert f"dev {site.wan_dev}" in route_get(site, "8.8.8.8"), "the main table's best is wan1"
    # The LAN is still reached from a link's address (the main table's narrower routes win).
    got = route_get(site, site.lan_host_ip, WAN2_IP)
    assert f"dev {site.lan_dev}" in got, got
    # A real packet: sent from wan2's address, the router receives it on wan2's segment.
    before = rx_packets(site.router.ns or "", WAN2_ROUTER_DEV)
    assert lab.ping(site.ns, OUTSIDE, count=3, source=WAN2_IP), "no answer by wan2"
    assert rx_packets(site.router.ns or "", WAN2_ROUTER_DEV) >= before + 3

    sockets = netns.run(site.ns, ["ss", "-uan"]).stdout
    assert re.search(rf"0\.0\.0\.0%{WAN2_DEV}:4801\b", sockets), sockets
    shown = links_of(lab, site)
    for name, link_id in (("wan1", 1), ("wan2", 2)):
        assert shown[name]["table"] == link_table(link_id), shown[name]
        assert shown[name]["rule_priorities"] == list(link_rule_priorities(link_id))
        assert shown[name]["error"] is None, shown[name]

    # A new static address moves the rules and the table with it.
    lab.socketctl(site, "set-link", "wan2", "static", "100.64.11.3/24", WAN2_GW)
    wait_for("wan2's rules for its new address", lambda: all(
        r in rules(site) for r in link_rules(2, "100.64.11.3")
    ))
    assert WAN2_IP + " " not in rules(site), rules(site)
    assert "src 100.64.11.3" in table(site, 2), table(site, 2)

    stop(lab, site)
    left = rules(site)
    assert f"proto {RT_PROTO_SDWAN}" not in left, left
    assert OPERATOR_RULE in left, "the operator's rule was removed"
    assert table(site, 1) == "", table(site, 1)
    assert table(site, 2) == f"{OPERATOR_ROUTE} dev {site.wan_dev} scope link", table(site, 2)
    # The addresses stay: a stopped socketd leaves the box reachable where it was.
    assert f"inet {site.wan_ip}/24" in ip(site, "-4", "addr", "show", "dev", site.wan_dev)


def test_a_link_left_to_the_system_gets_its_table_from_its_device(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)  # the lab puts the address and default route on wan1 itself
    lab.write_site_config(site)
    lab.start_socketd(site)
    wait_for("wan1's rules", lambda: all(r in rules(site) for r in link_rules(1, site.wan_ip)))
    wait_for("wan1's table", lambda: f"default via {site.wan_gw}" in table(site, 1))

    # The system changes the address (as an operator or another tool would): the table follows.
    ip(site, "addr", "del", f"{site.wan_ip}/24", "dev", site.wan_dev)
    ip(site, "addr", "add", "100.64.1.7/24", "dev", site.wan_dev)
    ip(site, "route", "replace", "default", "via", site.wan_gw, "dev", site.wan_dev)
    wait_for(
        "wan1's rules for its new address",
        lambda: all(r in rules(site) for r in link_rules(1, "100.64.1.7")),
        timeout=20,
    )
    wait_for("wan1's table again", lambda: "src 100.64.1.7" in table(site, 1), timeout=20)
    assert f"from {site.wan_ip} " not in rules(site), rules(site)
    got = route_get(site, "8.8.8.8", "100.64.1.7")
    assert f"dev {site.wan_dev} table {link_table(1)}" in got, got

    stop(lab, site)
    assert f"proto {RT_PROTO_SDWAN}" not in rules(site), rules(site)
    assert table(site, 1) == ""
    # Nothing of the system's own addressing was touched.
    assert "inet 100.64.1.7/24" in ip(site, "-4", "addr", "show", "dev", site.wan_dev)
    assert f"default via {site.wan_gw}" in ip(site, "-4", "route", "show", "table", "main")


# --------------------------------------------------------------------------- VLAN links


def vlans_supported(lab: Lab) -> bool:
    """Whether this kernel makes 802.1Q devices (CONFIG_VLAN_8021Q); tried in a scratch
    namespace of the lab."""
    ns = lab.new_ns("vlanprobe")
    netns.veth(ns, "p0", ns, "p1")
    cp = subprocess.run(
        ["ip", "-n", ns, "link", "add", "link", "p0", "name", "p0.5", "type", "vlan", "id", "5"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return cp.returncode == 0


def test_a_vlan_link_runs_on_the_vlan_device_socketd_made(lab: Lab) -> None:
    if not vlans_supported(lab):
        pytest.skip("this kernel has no 802.1Q VLAN support (CONFIG_VLAN_8021Q)")
    site = site_with_two_wans(lab)
    assert site.router.ns is not None
    # The router's end of VLAN 10 on wan2's segment.
    netns.run(site.router.ns, ["ip", "link", "add", "link", WAN2_ROUTER_DEV, "name", "v10",
                               "type", "vlan", "id", "10"])
    netns.link_up(site.router.ns, "v10")
    netns.addr_add(site.router.ns, "v10", "100.64.21.1/24")
    lab.write_site_config(
        site,
        extra_toml=wan2_link(
            precedence=2, vlan=10, addressing=static("100.64.21.2/24", "100.64.21.1")
        ),
    )
    lab.start_socketd(site)
    device = f"{WAN2_DEV}.10"
    wait_for(
        "the VLAN device's address",
        lambda: "inet 100.64.21.2/24" in ip(site, "-4", "addr", "show", "dev", device),
    )
    assert "vlan protocol 802.1Q id 10" in ip(site, "-d", "link", "show", device)
    shown = wait_for("wan2 up", lambda: (ln := links_of(lab, site)["wan2"])["state"] == "up" and ln)
    assert shown["interface"] == device and shown["vlan"] == {"id": 10, "on": WAN2_DEV}, shown
    # The link's socket is bound to the VLAN device, and its table routes by it.
    sockets = netns.run(site.ns, ["ss", "-uan"]).stdout
    assert re.search(rf"0\.0\.0\.0%{re.escape(device)}:4801", sockets), sockets
    wait_for("wan2's table", lambda: f"default via 100.64.21.1 dev {device}" in table(site, 2))
    assert lab.ping(site.ns, "100.64.21.1", count=2, source="100.64.21.2")

    stop(lab, site)
    assert not netns.link_exists(site.ns, device), "socketd made the VLAN device: it goes"


def test_without_802_1q_in_the_kernel_a_vlan_link_stops_the_start_saying_why(lab: Lab) -> None:
    if vlans_supported(lab):
        pytest.skip("this kernel makes VLAN devices (the test above runs)")
    site = site_with_two_wans(lab)
    lab.write_site_config(site, extra_toml=wan2_link(precedence=2, vlan=10))
    with pytest.raises(netns.NetnsError, match="no 802.1Q VLAN support"):
        lab.start_socketd(site)


def test_a_device_with_the_vlan_links_name_that_is_not_that_vlan_stops_the_start(
    lab: Lab,
) -> None:
    site = site_with_two_wans(lab)
    # Someone else's device under the name socketd would give VLAN 10 on wan2.
    netns.veth(site.ns, f"{WAN2_DEV}.10", site.ns, "other0")
    lab.write_site_config(site, extra_toml=wan2_link(precedence=2, vlan=10))
    with pytest.raises(
        netns.NetnsError, match=r"a device wan2\.10 exists and is not that VLAN \(kind veth"
    ):
        lab.start_socketd(site)
    assert netns.link_exists(site.ns, f"{WAN2_DEV}.10"), "not socketd's: it stays"
