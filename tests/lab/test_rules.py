"""Off-cloud transport rules in the lab: two off-cloud sites behind NATs and a PoP, the mesh
punched. A rule for one TCP port sends that traffic over the mesh while the rest goes through
the PoP, seen on the wire (the mesh peer's counters at the site, the PoP's counters of the
site's tunnel); a complex rule is reported and its traffic goes to the PoP. With the mesh
path cut, the rule's secondary decides: none drops (and counts), cloud and automatic send it
through the PoP. The account's rules change by rewriting the file and `popctl reload`."""

from __future__ import annotations

import sys

from labwait import wait_for

from sdwan.lab.topology import Lab, Pop, Site

DIRECT_PORT = 5201  # the off-cloud rule's port
OTHER_PORT = 5202  # no rule: through the PoP
APP_PORT = 5203  # a complex rule's: through the PoP
MB = 1 << 20


def account(secondary: str) -> str:
    return f"""
[account]
name = "lab"

[[sites]]
id = 1
name = "site-1"
subnets = ["10.1.0.0/24"]
offcloud = true

[[sites]]
id = 2
name = "site-2"
subnets = ["10.2.0.0/24"]
offcloud = true

[[rules]]
name = "backup-app"
transport = "offcloud"
protocol = "tcp"
ports = [{APP_PORT}]
applications = ["backup"]

[[rules]]
name = "direct-{DIRECT_PORT}"
transport = "offcloud"
secondary = "{secondary}"
dst = ["site-2", "site-1"]
protocol = "tcp"
ports = [{DIRECT_PORT}]
"""


def build(lab: Lab) -> tuple[Pop, Site, Site]:
    lab.add_inet()
    sites = []
    for n in (1, 2):
        lab.add_router(n, nat="masquerade")
        sites.append(lab.add_site(n))
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, account_toml=account("none"))
    lab.start_popd(pop)
    for s in sites:
        lab.write_site_config(s, extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n')
        lab.start_socketd(s)
    return pop, sites[0], sites[1]


def rules(lab: Lab, site: Site) -> dict[str, dict]:
    return {r["name"]: r for r in lab.socketctl(site, "rules")["rules"]}


def mesh_tx(lab: Lab, site: Site, peer: Site) -> int:
    """Inner bytes site sealed for its mesh tunnel to peer (0 while it has none up)."""
    for p in lab.socketctl(site, "peers")["peers"]:
        if p["site_id"] == peer.site_id and p["transport"] == "mesh":
            return int(p["tx_bytes"])
    return 0


def pop_rx(lab: Lab, pop: Pop, site: Site) -> int:
    """Inner bytes the PoP received from site over its links (the relay's side)."""
    sites = lab.popctl(pop, "sites")["sites"]
    s = next(x for x in sites if x["site_id"] == site.site_id)
    return sum(int(link["rx_bytes"]) for link in s["sessions"])


def push(lab: Lab, a: Site, b: Site, port: int) -> None:
    r = lab.iperf3(a.lan_ns, b.lan_ns, b.lan_host_ip, duration=1, port=port)
    assert r.mbps and r.mbps > 5, r


def carried(lab: Lab, pop: Pop, a: Site, b: Site, port: int) -> tuple[int, int]:
    """(bytes over the mesh, bytes through the PoP) of one iperf3 run a -> b to port."""
    mesh0, pop0 = mesh_tx(lab, a, b), pop_rx(lab, pop, a)
    push(lab, a, b, port)
    return mesh_tx(lab, a, b) - mesh0, pop_rx(lab, pop, a) - pop0


def connect_attempts(lab: Lab, site: Site, ip: str, port: int, seconds: float) -> None:
    """TCP connections tried from site's LAN host for a while (each may fail)."""
    script = (
        "import socket, time\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        socket.create_connection(({ip!r}, {port}), timeout=0.5).close()\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
    )
    lab.exec(site.lan_ns, [sys.executable, "-c", script], timeout=seconds + 10, check=False)


def test_offcloud_rule_secondaries_and_a_complex_rule(lab: Lab) -> None:
    pop, s1, s2 = build(lab)

    def mesh_up(a: Site, b: Site) -> bool:
        return any(p["site_id"] == b.site_id and p["state"] == "direct"
                   for p in lab.socketctl(a, "mesh")["paths"])

    wait_for("mesh 1 -> 2", lambda: mesh_up(s1, s2))
    wait_for("mesh 2 -> 1", lambda: mesh_up(s2, s1))
    name = f"direct-{DIRECT_PORT}"
    wait_for("rule over the mesh", lambda: rules(lab, s1)[name]["now"] == "offcloud")
    wait_for("rule over the mesh at site 2", lambda: rules(lab, s2)[name]["now"] == "offcloud")
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=10)  # no rule: the PoP

    # The rule's port: over the mesh, both ways (the answers match at site 2), and not
    # through the PoP; the rest through the PoP.
    mesh_b, pop_b = carried(lab, pop, s1, s2, DIRECT_PORT)
    assert mesh_b > MB and pop_b < 64 * 1024, (mesh_b, pop_b)
    assert pop_rx(lab, pop, s2) < 256 * 1024  # site 2's answers (ACKs) took the mesh too
    mesh_b, pop_b = carried(lab, pop, s1, s2, OTHER_PORT)
    assert pop_b > MB and mesh_b < 64 * 1024, (mesh_b, pop_b)

    # The complex rule: reported by the account check and the socket, and its traffic goes
    # through the PoP although it says off-cloud and the mesh is up.
    status = lab.popctl(pop, "status")["account"]["rules"]
    assert status[0]["complex"] is True and "goes to the PoP" in status[0]["note"]
    app = rules(lab, s1)["backup-app"]
    assert app["evaluated"] is False and app["complex"] == ["applications"]
    assert "not evaluated on the socket: its traffic goes to the PoP" in app["note"]
    assert app["now"] == "cloud"
    mesh_b, pop_b = carried(lab, pop, s1, s2, APP_PORT)
    assert pop_b > MB and mesh_b < 64 * 1024, (mesh_b, pop_b)
    hits = rules(lab, s1)
    assert hits["backup-app"]["hits"] > 100 and hits[name]["hits"] > 100, hits
    text = lab.socketctl(s1, "rules", json_out=False)
    assert "backup-app *" in text and "not evaluated on the socket" in text

    # Cut the mesh path only (the PoP stays reachable); traffic on the rule's port notices
    # it within about [mesh] silent_after_ms. Secondary none: dropped, and counted.
    for n, other in ((1, s2.public_ip), (2, s1.public_ip)):
        lab.router_nft(
            n,
            f"table inet cut {{\n chain f {{\n type filter hook forward priority -10\n"
            f" ip saddr {other} drop\n ip daddr {other} drop\n }}\n}}\n",
        )
    connect_attempts(lab, s1, s2.lan_host_ip, DIRECT_PORT, 3)
    wait_for("rule's traffic dropped", lambda: rules(lab, s1)[name]["now"] == "dropped",
             timeout=15)
    dropped0 = lab.socketctl(s1, "rules")["drops"]
    connect_attempts(lab, s1, s2.lan_host_ip, DIRECT_PORT, 1.5)
    after = lab.socketctl(s1, "rules")["drops"]
    assert after > dropped0, (dropped0, after)
    assert lab.socketctl(s1, "status")["drops"]["offcloud_down"] == after
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=5)  # the rest still flows

    # Secondary cloud, then automatic (the policy's choice: the cloud, which is up): the
    # rule's traffic goes through the PoP while the mesh stays cut.
    for secondary in ("cloud", "automatic"):
        assert pop.account is not None
        pop.account.write_text(account(secondary))
        assert lab.popctl(pop, "reload")["loaded"]
        wait_for(f"secondary {secondary}",
                 lambda sec=secondary: rules(lab, s1)[name]["secondary"] == sec)
        assert rules(lab, s1)[name]["now"] == "cloud"
        mesh_b, pop_b = carried(lab, pop, s1, s2, DIRECT_PORT)
        assert pop_b > MB and mesh_b == 0, (secondary, mesh_b, pop_b)
