"""STUN through a real NAT: our reflector, coturn and Debian's `stun` client agree on the
public endpoint, and it is the one the router's conntrack table holds for the flow.

Topology: site 1 behind router 1 (nftables masquerade, port preserving or fully random),
and a public host at the PoP's address running `python -m sdwan.common.stun serve` and coturn.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest

from sdwan.lab import netns
from sdwan.lab.netns import Daemon
from sdwan.lab.topology import POP_IP, Lab, Site

OUR_PORT = 3478  # Debian's `stun` client only talks to 3478
COTURN_PORT = 3479
DAEMON_MAX_S = 90


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        # A skip would hide a CI machine set up without it: scripts/setup.sh installs it.
        pytest.fail(f"`{tool}` not installed (Debian package {package})", pytrace=False)


def _build(lab: Lab, nat: str) -> tuple[Site, str]:
    lab.add_router(1, nat=nat)
    site = lab.add_site(1)
    pop = lab.add_public_host("pop")
    return site, pop.ns


def _wait_udp_listen(ns: str, port: int, d: Daemon) -> None:
    def listening() -> bool:
        out = netns.run(ns, ["ss", "-Hlun", f"sport = :{port}"], check=False).stdout
        return f":{port} " in out + " "

    if not netns.wait_until(lambda: listening() or not d.alive(), timeout=10, interval=0.05):
        raise AssertionError(f"{d.name} did not listen on {port}: {d.log_tail()}")
    assert d.alive(), f"{d.name} exited: {d.log_tail()}"


def _start_ours(lab: Lab, ns: str) -> Daemon:
    d = lab.spawn(
        ns,
        [sys.executable, "-m", "sdwan.common.stun", "serve", "--listen", f"{POP_IP}:{OUR_PORT}"],
        "stun-serve",
        env=lab.env(),
        max_lifetime_s=DAEMON_MAX_S,
    )
    _wait_udp_listen(ns, OUR_PORT, d)
    return d


def _start_coturn(lab: Lab, ns: str) -> Daemon:
    _require("turnserver", "coturn")
    d = lab.workdir / "coturn"
    d.mkdir(exist_ok=True)
    argv = [
        "turnserver",
        "-n",  # no configuration file: everything is on this line
        "--stun-only",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--listening-ip",
        POP_IP,
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
    daemon = lab.spawn(ns, argv, "coturn", max_lifetime_s=DAEMON_MAX_S)
    _wait_udp_listen(ns, COTURN_PORT, daemon)
    return daemon


def _our_query(lab: Lab, site: Site, port: int, local_port: int) -> tuple[str, int]:
    """`python -m sdwan.common.stun query` from site's WAN address:local_port to the PoP:port."""
    argv = [
        "ip",
        "netns",
        "exec",
        site.ns,
        sys.executable,
        "-m",
        "sdwan.common.stun",
        "query",
        f"{POP_IP}:{port}",
        "--bind",
        f"{site.wan_ip}:{local_port}",
        "--timeout",
        "10",
        "--json",
    ]
    cp = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env=lab.env(), stdin=subprocess.DEVNULL
    )
    assert cp.returncode == 0, f"query to port {port} failed: {cp.stderr.strip()}"
    out = json.loads(cp.stdout)
    return out["ip"], out["port"]


def _stats(lab: Lab, d: Daemon) -> dict[str, Any]:
    lab.kill(d)
    m = re.search(r"stun: stats (\{.*\})", d.log_tail(8000))
    assert m, f"no stats line in the server log: {d.log_tail()}"
    return json.loads(m.group(1))


@pytest.mark.parametrize("nat", ["masquerade", "random"])
def test_reflexive_endpoint_is_the_nat_mapping(lab: Lab, nat: str) -> None:
    site, pop_ns = _build(lab, nat)
    ours = _start_ours(lab, pop_ns)
    coturn = _start_coturn(lab, pop_ns)

    mapped = _our_query(lab, site, OUR_PORT, 4800)
    nat_map = lab.nat_mapping(site, 4800, POP_IP, OUR_PORT)
    assert mapped == nat_map
    assert mapped[0] == site.public_ip
    if nat == "masquerade":
        assert mapped[1] == 4800  # port preserving

    # The same local port asked of coturn: its answer is the NAT mapping of that flow too,
    # and behind a port-preserving NAT the very endpoint our reflector reported.
    from_coturn = _our_query(lab, site, COTURN_PORT, 4800)
    assert from_coturn == lab.nat_mapping(site, 4800, POP_IP, COTURN_PORT)
    assert from_coturn[0] == site.public_ip
    if nat == "masquerade":
        assert from_coturn == mapped
    # Behind the fully random NAT the two destinations may get different ports: that is
    # why the mesh must ask from the very socket it uses, and why such NATs defeat punching.

    stats = _stats(lab, ours)
    assert stats["answers"] == 1 and stats["requests"] == 1
    assert coturn.alive(), coturn.log_tail()


def test_standard_stun_client_against_our_server(lab: Lab) -> None:
    _require("stun", "stun-client")
    site, pop_ns = _build(lab, "masquerade")
    ours = _start_ours(lab, pop_ns)
    # Debian's `stun` (RFC 3489 era: no magic cookie, CHANGE-REQUEST in every request)
    # binds -p PORT and PORT+1; its first test is a plain Binding request from PORT.
    cp = netns.run(
        site.ns, ["timeout", "20", "stun", POP_IP, "-v", "-p", "4900"], timeout=30, check=False
    )
    out = cp.stdout + cp.stderr
    m = re.search(r"MappedAddress = (\S+):(\d+)", out)
    assert m, f"`stun` got no mapped address:\n{out[-2000:]}"
    assert (m.group(1), int(m.group(2))) == lab.nat_mapping(site, 4900, POP_IP, OUR_PORT)
    assert m.group(1) == site.public_ip
    stats = _stats(lab, ours)
    assert stats["classic_requests"] >= 1 and stats["answers"] >= 1
    assert "internal-error" not in stats["dropped"]


def test_garbage_on_the_stun_port_is_counted_not_fatal(lab: Lab) -> None:
    site, pop_ns = _build(lab, "masquerade")
    ours = _start_ours(lab, pop_ns)
    script = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for n in (0, 1, 19, 20, 100, 1400, 4000):\n"
        f"    s.sendto(os.urandom(n), ({POP_IP!r}, {OUR_PORT}))\n"
        f"s.sendto(b'\\x00\\x01\\x00\\x00\\x21\\x12\\xa4\\x42' + bytes(16), "
        f"({POP_IP!r}, {OUR_PORT}))\n"
    )
    netns.run(site.ns, [sys.executable, "-c", script], timeout=20)
    # Still answering afterwards.
    assert _our_query(lab, site, OUR_PORT, 4801) == (site.public_ip, 4801)
    stats = _stats(lab, ours)
    assert stats["answers"] == 1
    assert sum(stats["dropped"].values()) >= 7
    assert "internal-error" not in stats["dropped"]
