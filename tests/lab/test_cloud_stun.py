"""A socket learns the public endpoint of its link socket through the PoP's STUN port.

What a user sees: `socketctl pop` shows per link the endpoint STUN taught (`public`), and it is
what it should be: behind a port-preserving NAT the very source popd sees for the site's
session (`popctl sites`), and the same when the socket asks coturn instead; behind a
port-randomising NAT the router's conntrack mapping of the link socket's flow toward the STUN
port (which may differ from the session's: that is what such NATs do).
"""

from __future__ import annotations

import shutil

import pytest
from labwait import wait_for

from sdwan.lab import netns
from sdwan.lab.netns import Daemon
from sdwan.lab.topology import Lab, Pop, Site

COTURN_PORT = 3479
DAEMON_MAX_S = 120


def build(lab: Lab, nat: str) -> tuple[Pop, Site]:
    lab.add_inet()
    lab.add_router(1, nat=nat)
    site = lab.add_site(1)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=[site])
    lab.start_popd(pop)
    return pop, site


def start_site(lab: Lab, site: Site, pop: Pop, stun: str | None = None) -> None:
    # Without `stun` the socket asks the PoP's address on the standard port, where popd
    # (write_pop_config's stun_port, 3478) answers.
    cert, key = site.dir / "site.pem", site.dir / "site.key"
    if not cert.exists():
        issued = lab.issue(site)
        cert.write_bytes(issued[0].read_bytes())
        key.touch(mode=0o600)
        key.write_bytes(issued[1].read_bytes())
    extra = f'[[pops]]\nid = {pop.n}\nendpoint = "{pop.endpoint}"\n'
    if stun is not None:
        extra += f'stun = "{stun}"\n'
    lab.write_site_config(site, cert=cert, key=key, extra_toml=extra)
    lab.start_socketd(site)


def learned(lab: Lab, site: Site) -> str | None:
    """The `public` of the site's first link in `socketctl pop`, once the cloud is up."""
    view = lab.socketctl(site, "pop")
    if view.get("state") != "up":
        return None
    rows = [r for r in view["sessions"] if r["link"] == site.link_name]
    return rows[0]["public"] if rows else None


def popd_source(lab: Lab, pop: Pop, site: Site) -> str | None:
    """The source address popd sees for the site's session (its NAT mapping toward :4800)."""
    for entry in lab.popctl(pop, "sites")["sites"]:
        if entry["site_id"] == site.site_id and entry["sessions"]:
            return str(entry["sessions"][0]["public"])
    return None


def nat_mapping(lab: Lab, site: Site, dst: str, dport: int) -> str:
    """"ip:port" of router 1's mapping for site.wan_ip:site.port -> dst:dport."""
    ip, port = lab.nat_mapping(site, site.port, dst, dport)
    return f"{ip}:{port}"


def start_coturn(lab: Lab, pop: Pop) -> Daemon:
    if shutil.which("turnserver") is None:
        # A skip would hide a CI machine set up without it: scripts/setup.sh installs it.
        pytest.fail("`turnserver` not installed (Debian package coturn)", pytrace=False)
    d = lab.workdir / "coturn"
    d.mkdir(exist_ok=True)
    argv = [
        "turnserver",
        "-n",
        "--stun-only",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--listening-ip",
        pop.ip,
        "--listening-port",
        str(COTURN_PORT),
        # Binding needs no credentials; these keep coturn's state inside the lab.
        "--db",
        str(d / "turndb"),
        "--pidfile",
        str(d / "turnserver.pid"),
        "--log-file",
        "stdout",
        "--simple-log",
    ]
    daemon = lab.spawn(pop.ns, argv, "coturn", max_lifetime_s=DAEMON_MAX_S)

    def listening() -> bool:
        out = netns.run(pop.ns, ["ss", "-Hlun", f"sport = :{COTURN_PORT}"], check=False).stdout
        return f":{COTURN_PORT} " in out + " "

    netns.wait_until(lambda: listening() or not daemon.alive(), timeout=10, interval=0.05)
    assert daemon.alive() and listening(), f"coturn not listening: {daemon.log_tail()}"
    return daemon


def test_port_preserving_nat_popd_and_coturn_agree_with_the_session_source(lab: Lab) -> None:
    pop, site = build(lab, "masquerade")
    coturn = start_coturn(lab, pop)
    start_site(lab, site, pop)

    public = wait_for("public endpoint through popd's STUN", lambda: learned(lab, site))
    assert public == wait_for("popd sees the session", lambda: popd_source(lab, pop, site))
    assert public == f"{site.public_ip}:{site.port}"
    assert public == nat_mapping(lab, site, pop.ip, pop.stun_port)
    row = lab.socketctl(site, "pop")["sessions"][0]
    assert row["stun"]["server"] == f"{pop.ip}:{pop.stun_port}" and row["stun"]["error"] is None
    pop_status = lab.popctl(pop, "status")
    assert pop_status["stun_server"]["answers"] >= 1
    # Learning the endpoint re-registers with it (`public_stun`): the PoP accepts that.
    assert pop_status["control"]["registrations_refused"] == 0
    assert pop_status["control"]["messages_malformed"] == 0

    # The same link socket (same local port) pointed at coturn learns the same endpoint.
    lab.stop_socketd(site)
    start_site(lab, site, pop, stun=f"{pop.ip}:{COTURN_PORT}")
    from_coturn = wait_for("public endpoint through coturn", lambda: learned(lab, site))
    assert from_coturn == public
    assert from_coturn == nat_mapping(lab, site, pop.ip, COTURN_PORT)
    row = lab.socketctl(site, "pop")["sessions"][0]
    assert row["stun"]["server"] == f"{pop.ip}:{COTURN_PORT}"
    assert coturn.alive(), coturn.log_tail()


def test_port_randomising_nat_learns_the_mapping_toward_the_stun_port(lab: Lab) -> None:
    pop, site = build(lab, "random")
    start_site(lab, site, pop)

    public = wait_for("public endpoint through popd's STUN", lambda: learned(lab, site))
    session_src = wait_for("popd sees the session", lambda: popd_source(lab, pop, site))
    assert public == nat_mapping(lab, site, pop.ip, pop.stun_port)
    assert session_src == nat_mapping(lab, site, pop.ip, pop.port)
    # Same public address; the port is whatever the router drew for each destination, so
    # the two may differ (and usually do): only the address is common to both.
    print(f"random NAT: STUN mapping {public}, session source {session_src}")
    assert public.rsplit(":", 1)[0] == session_src.rsplit(":", 1)[0] == site.public_ip
    status = lab.socketctl(site, "status")
    assert status["control"]["stun_unmatched"] == 0
