"""The LAN firewall as a user of real boxes sees it: the account's policy, delivered by popd,
filters the traffic between LAN hosts (nftables in the sites' namespaces) in normal operation,
while the PoP is dead (traffic on a static tunnel, or on the mesh in WAN recovery), and after
socketd restarts without the PoP from its stored config; a policy nft refuses leaves the rules
in force and says why."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

import pytest
from labwait import wait_for

from sdwan.lab import netns
from sdwan.lab.topology import Lab, Pop, Site

DENIED_PORT = 2323
ALLOWED_PORT = 8080
DENY_RULE = "no-telnet"
TABLE = ("inet", "sdwan_lanfw")
RECOVERY_HOLD_S = 2

SITES = """
[account]
name = "lab"

[[sites]]
id = 1
name = "site-1"
subnets = ["10.1.0.0/24"]
offcloud = {mesh}
recovery = {mesh}

[[sites]]
id = 2
name = "site-2"
subnets = ["10.2.0.0/24"]
offcloud = {mesh}
recovery = {mesh}
"""

FIREWALL = f"""
[firewall]
default = "deny"

[[firewall.rules]]
name = "{DENY_RULE}"
action = "deny"
src = ["site-1"]
dst = ["site-2"]
protocol = "tcp"
ports = [{DENIED_PORT}]

[[firewall.rules]]
name = "between-sites"
action = "allow"
src = ["site-1", "site-2"]
dst = ["site-1", "site-2"]
"""

ONE_SITE = """
[account]
name = "lab"

[[sites]]
id = 1
subnets = ["10.1.0.0/24"]

[firewall]
default = "allow"
"""

# A TCP server on the LAN host: accepts on every port it is given, answers "hi", closes.
SERVER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.create_server(("0.0.0.0", int(port)))
    sel.register(s, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.sendall(b"hi")
        conn.close()
"""

# One connection attempt from a LAN host: prints connected, timeout or refused.
CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print("connected" if s.recv(2) == b"hi" else "no answer")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(f"refused: {e}")
"""


@dataclass
class Pair:
    pop: Pop
    s1: Site
    s2: Site


def connect(lab: Lab, src: Site, dst: Site, port: int, timeout_s: float = 1.5) -> str:
    argv = [sys.executable, "-c", CONNECT, dst.lan_host_ip, str(port), str(timeout_s)]
    return lab.exec(src.lan_ns, argv, timeout=timeout_s + 10).stdout.strip()


def rule_packets(lab: Lab, site: Site, name: str) -> int:
    fw = lab.socketctl(site, "firewall")
    rule = next(r for r in fw["rules"] if r["name"] == name)
    return rule["packets"] or 0


def table_in_kernel(site: Site) -> str | None:
    cp = netns.run(site.ns, ["nft", "list", "table", *TABLE], check=False)
    return cp.stdout if cp.returncode == 0 else None


def check_filtered(lab: Lab, src: Site, dst: Site, counted_at: Site) -> None:
    """From src's LAN host to dst's: the denied port gets no connection, ping and another
    port do, and the deny rule's counter at counted_at (the first box on the way) grows."""
    before = rule_packets(lab, counted_at, DENY_RULE)
    assert lab.wait_ping(src.lan_ns, dst.lan_host_ip, timeout=15)
    assert connect(lab, src, dst, ALLOWED_PORT) == "connected"
    assert connect(lab, src, dst, DENIED_PORT) == "timeout"
    wait_for(
        f"site {counted_at.n}: {DENY_RULE} counted the denied SYNs",
        lambda: rule_packets(lab, counted_at, DENY_RULE) > before,
        timeout=5,
    )


def build(lab: Lab, static_peers: bool = True, mesh: bool = False) -> Pair:
    """A PoP and two sites under the account's firewall, a TCP server on site 2's LAN host.
    With static_peers the sites also reach each other over a static direct tunnel, so their
    LANs talk while the PoP is dead (and the PoP's own routes defer to it); mesh makes both
    sites off-cloud and recovery sites of the account."""
    lab.add_inet()
    sites = []
    for n in (1, 2):
        lab.add_router(n, nat="masquerade")
        sites.append(lab.add_site(n))
    s1, s2 = sites
    pop = lab.add_pop(1)
    flag = "true" if mesh else "false"
    lab.write_pop_config(pop, account_toml=SITES.format(mesh=flag) + FIREWALL)
    lab.start_popd(pop)
    pops = f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n'
    if mesh:
        pops += f"\n[cloud]\nrecovery_hold_s = {RECOVERY_HOLD_S}\n"
    for a, b in ((s1, s2), (s2, s1)):
        peers = [b] if static_peers else []
        lab.write_site_config(a, peers=peers, tunnel={"keepalive_s": 2}, extra_toml=pops)
    for s in sites:
        lab.start_socketd(s)
    server = [sys.executable, "-c", SERVER, str(DENIED_PORT), str(ALLOWED_PORT)]
    lab.spawn(s2.lan_ns, server, "tcp-server")
    return Pair(pop, s1, s2)


def mesh_up(lab: Lab, site: Site, peer: Site) -> bool:
    paths = lab.socketctl(site, "mesh")["paths"]
    return any(p["site_id"] == peer.n and p["tunnel"] == "up" for p in paths)


def transport(lab: Lab, site: Site, to: Site) -> str | None:
    routes = lab.socketctl(site, "routes")["routes"]
    return next((r["transport"] for r in routes if r["prefix"] == to.lan_subnet), None)


def firewall(lab: Lab, site: Site) -> dict:
    return lab.socketctl(site, "status")["firewall"]


@pytest.mark.parametrize("off_cloud", ["static", "recovery"])
def test_a_deny_rule_holds_normally_during_an_outage_and_after_a_restart_without_the_pop(
    lab: Lab, off_cloud: str
) -> None:
    """off_cloud: what carries the traffic while the PoP is dead, a static tunnel between
    the two sites, or their mesh tunnel in WAN recovery (normally the PoP relays it)."""
    recovery = off_cloud == "recovery"
    pair = build(lab, static_peers=not recovery, mesh=recovery)
    s1, s2 = pair.s1, pair.s2
    if recovery:
        for a, b in ((s1, s2), (s2, s1)):
            wait_for(f"mesh {a.n}->{b.n}", lambda a=a, b=b: mesh_up(lab, a, b))
        # Once the PoP has seen both sites online (until then each is "lost" to the other's
        # cloud and goes over the mesh, for the hold time).
        wait_for(
            "site 1 sends site 2's traffic through the PoP",
            lambda: transport(lab, s1, s2) == "cloud",
            timeout=RECOVERY_HOLD_S + 10,
        )
    for s in (s1, s2):
        wait_for(
            f"site {s.n} applies the account's firewall",
            lambda s=s: (
                firewall(lab, s)["state"] == "applied" and firewall(lab, s)["rule_count"] == 2
            ),
        )
    fw = lab.socketctl(s1, "firewall")
    assert fw["in_kernel"] is True and fw["default"] == "deny" and fw["error"] is None
    assert [(r["name"], r["action"], r["src"], r["dst"]) for r in fw["rules"]] == [
        (DENY_RULE, "deny", [s1.lan_subnet], [s2.lan_subnet]),
        ("between-sites", "allow", [s1.lan_subnet, s2.lan_subnet], [s1.lan_subnet, s2.lan_subnet]),
    ]
    rev = fw["rev"]

    # Normal operation: the PoP delivered the policy and is up.
    check_filtered(lab, s1, s2, counted_at=s1)
    # Applied once, however many welcomes carried the same policy (popd answers every
    # register, and a site registers again when it learns its public endpoint).
    kinds = [e["kind"] for e in lab.socketctl(s1, "events")["events"]]
    assert kinds.count("firewall.applied") == 1, kinds

    # The cloud outage: the ruleset stays and keeps filtering.
    lab.stop_popd(pair.pop, sig=signal.SIGKILL)
    wait_for(
        "site 1 sees the cloud down",
        lambda: lab.socketctl(s1, "status")["cloud"]["state"] != "up",
        timeout=5,
    )
    if recovery:
        wait_for("site 1 in WAN recovery", lambda: transport(lab, s1, s2) == "mesh", timeout=10)
    assert firewall(lab, s1)["state"] == "applied"
    check_filtered(lab, s1, s2, counted_at=s1)

    # A clean stop leaves the ruleset in place (the LAN is neither opened nor closed by it).
    lab.stop_socketd(s1)
    assert table_in_kernel(s1) is not None
    # Deleted here, so that only socketd's start can put it back: from the stored config,
    # with the PoP still dead, before the control socket opens (before traffic flows).
    netns.run(s1.ns, ["nft", "delete", "table", *TABLE])
    lab.start_socketd(s1)
    listed = table_in_kernel(s1)
    assert listed is not None and f'comment "{DENY_RULE}"' in listed
    status = lab.socketctl(s1, "status")
    assert status["cloud"]["stale"] is True and status["cloud"]["state"] != "up"
    assert status["firewall"]["state"] == "applied" and status["firewall"]["rev"] == rev
    if recovery:  # it starts in recovery: the mesh tunnel comes back from the NAT data
        wait_for("site 1 back on the mesh", lambda: transport(lab, s1, s2) == "mesh", 15)
    check_filtered(lab, s1, s2, counted_at=s1)


def test_a_policy_nft_refuses_leaves_the_rules_in_force_and_says_why(lab: Lab) -> None:
    """Another process owns a table of that name (nftables' owner flag): the kernel refuses
    socketd's transaction. socketd runs on, shows nft's message, records an event; once the
    table is free, the next policy from the PoP is applied."""
    lab.add_inet()
    lab.add_router(1, nat="masquerade")
    site = lab.add_site(1)
    holder = lab.spawn(
        site.ns,
        ["sh", "-c", "(echo 'add table inet sdwan_lanfw { flags owner; }'; sleep 120) | nft -i"],
        "table-owner",
    )
    wait_for("the owned table", lambda: "flags owner" in (table_in_kernel(site) or ""), 10)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, account_toml=ONE_SITE)
    lab.start_popd(pop)
    lab.write_site_config(site, extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n')
    lab.start_socketd(site)

    fw = wait_for(
        "the refusal shown", lambda: (f := firewall(lab, site))["state"] == "failed" and f
    )
    assert "Operation not permitted" in fw["error"] and fw["applied"] is False
    assert "flags owner" in (table_in_kernel(site) or "")  # what was in force stays
    events = lab.socketctl(site, "events", "--kind", "firewall.failed")["events"]
    assert events and "Operation not permitted" in events[0]["text"]
    assert site.socketd is not None and site.socketd.alive()

    lab.kill(holder)  # the owner's table goes with it
    wait_for("the owned table gone", lambda: table_in_kernel(site) is None, 10)
    assert pop.account is not None
    pop.account.write_text(pop.account.read_text().replace('"allow"', '"deny"'))
    lab.popctl(pop, "reload")
    wait_for("the next policy applied", lambda: firewall(lab, site)["state"] == "applied")
    assert firewall(lab, site)["default"] == "deny" and firewall(lab, site)["error"] is None
    assert "policy drop" in (table_in_kernel(site) or "")


def test_a_stored_policy_that_cannot_be_applied_leaves_its_default_in_force(lab: Lab) -> None:
    # After a reboot the kernel has no table: a stored policy the site refuses (a field this
    # firmware does not know, as from a newer PoP) must not leave forwarding unfiltered.
    ns = lab.new_ns("fwfallback")
    script = (
        "from sdwan.site.firewall import Firewall\n"
        "events = []\n"
        "fw = Firewall(lambda kind, text, data: events.append(kind))\n"
        "fw.start({'default': 'deny', 'rules': [], 'newer_field': 1}, 7)\n"
        "print(fw.state, fw.in_force.default, ','.join(events))\n"
    )
    cp = lab.exec(ns, [sys.executable, "-c", script], check=True)
    assert cp.stdout.split() == ["failed", "deny", "firewall.failed,firewall.fallback"], cp
    table = lab.exec(ns, ["nft", "list", "table", *TABLE]).stdout
    assert "policy drop" in table and "established,related accept" in table, table
