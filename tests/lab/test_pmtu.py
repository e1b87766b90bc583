"""A path MTU of 1280 between the routers and no ICMP back (router 1's uplink is a 1280-byte
link that drops "fragmentation needed"): each tunnel and PoP session finds its path MTU by
probing and shows it, a LAN packet too big for it gets "fragmentation needed" with the
peer's figure instead of vanishing, and ping with DF and TCP between the LAN hosts work,
over a static tunnel, through the PoP and over a mesh tunnel (docs/dataplane.md, "Path
MTU")."""

from __future__ import annotations

import re
import time

from labwait import wait_for

from sdwan.lab.topology import Lab, Site

PATH_MTU = 1280
INNER_MTU = PATH_MTU - 20 - 8 - 32  # outer IPv4 + UDP + the tunnel's header and tag
FITS = INNER_MTU - 28  # ping payload of a packet of exactly the inner MTU
TOO_BIG = 1372  # a 1400-byte packet: fits the TUN (1440) but not the path


def two_sites_one_narrow(lab: Lab) -> list[Site]:
    """Sites 1 and 2 behind their own NAT routers; router 1's uplink is PATH_MTU wide and
    drops the ICMP that would say so."""
    lab.add_inet()
    sites = []
    for n in (1, 2):
        lab.add_router(n)
        sites.append(lab.add_site(n))
    lab.narrow_uplink(1, PATH_MTU)
    return sites


def ping_df(lab: Lab, ns: str, ip: str, size: int) -> tuple[bool, str, float]:
    """(answered, output, seconds) of one `ping -M do -s size`."""
    t0 = time.monotonic()
    cp = lab.exec(ns, ["ping", "-n", "-c", "1", "-W", "3", "-M", "do", "-s", str(size), ip],
                  check=False)
    return cp.returncode == 0, cp.stdout + cp.stderr, time.monotonic() - t0


def assert_too_big_is_answered(lab: Lab, a: Site, b: Site) -> None:
    """From a's LAN host to b's: the big ping is refused at once with the path's figure,
    the host learns it, and packets of that size then pass."""
    ok, out, took = ping_df(lab, a.lan_ns, b.lan_host_ip, TOO_BIG)
    assert not ok and f"mtu = {INNER_MTU}" in out, out
    assert took < 2.5, f"no fast answer ({took:.1f} s): {out}"
    # The LAN host cached the figure: now its own stack refuses the size.
    ok, out, _ = ping_df(lab, a.lan_ns, b.lan_host_ip, TOO_BIG)
    assert not ok and re.search(rf"mtu[ =]+{INNER_MTU}", out), out
    ok, out, _ = ping_df(lab, a.lan_ns, b.lan_host_ip, FITS)
    assert ok, out
    # Without DF the host fragments to the figure it learned.
    cp = lab.exec(a.lan_ns, ["ping", "-n", "-c", "1", "-W", "3", "-s", str(TOO_BIG),
                             b.lan_host_ip], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def assert_tcp_completes(lab: Lab, a: Site, b: Site) -> None:
    for client, server in ((a, b), (b, a)):
        tcp = lab.iperf3(client.lan_ns, server.lan_ns, server.lan_host_ip, duration=2)
        assert tcp.mbps and tcp.mbps > 5, (client.n, server.n, tcp.raw.get("error"))


def peer_entry(lab: Lab, site: Site, peer_id: int) -> dict:
    peers = lab.socketctl(site, "peers")["peers"]
    return next(p for p in peers if p["site_id"] == peer_id)


def test_static_tunnel_finds_1280_and_nothing_is_black_holed(lab: Lab) -> None:
    s1, s2 = two_sites_one_narrow(lab)
    for me, other in ((s1, s2), (s2, s1)):
        lab.write_site_config(me, peers=[other], tunnel={"keepalive_s": 2})
    t0 = time.monotonic()
    lab.start_socketd(s1)
    lab.start_socketd(s2)
    for me, other in ((s1, s2), (s2, s1)):
        wait_for(
            f"site {me.n}: path MTU to site {other.n} found",
            lambda m=me, o=other: (
                peer_entry(lab, m, o.n)["state"] == "up"
                and peer_entry(lab, m, o.n)["pmtu"]["state"] == "done"
                and peer_entry(lab, m, o.n)["mtu"]
            ),
        )
        st = peer_entry(lab, me, other.n)
        assert st["mtu"] == PATH_MTU and st["pmtu"]["inner_mtu"] == INNER_MTU, st["pmtu"]
    print(f"static: both sides found {PATH_MTU} {time.monotonic() - t0:.1f} s after start")
    text = lab.socketctl(s1, "peers", json_out=False)
    assert re.search(rf"\bdirect\s+{PATH_MTU}\b", text), text

    assert_too_big_is_answered(lab, s1, s2)
    assert_too_big_is_answered(lab, s2, s1)
    assert_tcp_completes(lab, s1, s2)
    drops = peer_entry(lab, s1, 2)["drops"]
    assert drops["too_big"] >= 1


def test_pop_sessions_find_their_own_mtu_and_the_relay_answers(lab: Lab) -> None:
    s1, s2 = sites = two_sites_one_narrow(lab)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=sites)
    lab.start_popd(pop)
    t0 = time.monotonic()
    for s in sites:
        lab.write_site_config(s, extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.ip}:4800"\n')
        lab.start_socketd(s)

    def session_mtu(s: Site) -> int | None:
        sessions = lab.socketctl(s, "pop")["sessions"]
        return sessions[0].get("mtu") if sessions and sessions[0]["state"] == "connected" else None

    # Site 1 sits behind the 1280 link; site 2's path to the PoP is a full 1500.
    wait_for("site 1's PoP session MTU", lambda: session_mtu(s1) == PATH_MTU)
    wait_for("site 2's PoP session MTU", lambda: session_mtu(s2) == 1500)

    def pop_side() -> dict[int, int | None]:
        return {
            site["site_id"]: site["sessions"][0].get("mtu")
            for site in lab.popctl(pop, "sites")["sites"]
            if site["sessions"]
        }

    wait_for("the PoP's figures", lambda: pop_side() == {1: PATH_MTU, 2: 1500})
    print(f"pop: all four figures {time.monotonic() - t0:.1f} s after start")
    text = lab.socketctl(s1, "pop", json_out=False)
    assert re.search(rf"connected\s+\S+\s+[\d.]+ ms\s+{PATH_MTU}\b", text), text
    wait_for("routes through the PoP", lambda: lab.ping(s1.lan_ns, s2.lan_host_ip))

    # Site 1's own fast path answers its LAN; for site 2's LAN the PoP's relay does.
    assert_too_big_is_answered(lab, s1, s2)
    assert_too_big_is_answered(lab, s2, s1)
    assert_tcp_completes(lab, s1, s2)


def test_mesh_tunnel_finds_1280_and_nothing_is_black_holed(lab: Lab) -> None:
    s1, s2 = sites = two_sites_one_narrow(lab)
    pop = lab.add_pop(1)
    lab.write_pop_config(
        pop,
        sites=[{"id": s.site_id, "name": f"site-{s.site_id}", "subnets": [s.lan_subnet],
                "offcloud": True} for s in sites],
    )
    lab.start_popd(pop)
    for s in sites:
        other = s2 if s is s1 else s1
        lab.write_site_config(
            s,
            extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.ip}:4800"\n\n'
            f'[mesh]\npin = ["{other.lan_subnet}"]\n',
        )
        lab.start_socketd(s)

    def mesh_mtu(s: Site, peer: int) -> int | None:
        paths = lab.socketctl(s, "mesh")["paths"]
        return next((p["mtu"] for p in paths if p["site_id"] == peer and p["state"] == "direct"
                     and p["tunnel"] == "up"), None)

    def over_mesh(s: Site, prefix: str) -> bool:
        routes = lab.socketctl(s, "routes")["routes"]
        return any(r["prefix"] == prefix and r["transport"] == "mesh" for r in routes)

    for a, b in ((s1, s2), (s2, s1)):
        wait_for(f"site {a.n}: mesh path MTU to {b.n}", lambda a=a, b=b: (
            mesh_mtu(a, b.n) == PATH_MTU
            and peer_entry(lab, a, b.n)["pmtu"]["state"] == "done"))
        wait_for(f"site {a.n}: routed over the mesh", lambda a=a, b=b: over_mesh(a, b.lan_subnet))
    text = lab.socketctl(s1, "mesh", json_out=False)
    assert re.search(rf"\bdirect\b.*\s{PATH_MTU}\s", text), text

    assert_too_big_is_answered(lab, s1, s2)
    assert_too_big_is_answered(lab, s2, s1)
    assert_tcp_completes(lab, s1, s2)
    # Over the mesh tunnel, not the PoP.
    assert peer_entry(lab, s1, 2)["transport"] == "mesh"
