"""The lab itself, without socketd: topology, NAT behaviours, cleanup and stale cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from labwait import UDP_SOURCE_SERVER

from sdwan.lab import netns
from sdwan.lab.topology import POP_IP, Lab, cleanup_stale, lab_namespaces

_UDP_SERVER = UDP_SOURCE_SERVER

# Sends from a fixed source port until told to stop (the server may start listening late).
_UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
for _ in range(40):
    s.sendto(b"probe", (sys.argv[1], int(sys.argv[3])))
    time.sleep(0.1)
"""


def udp_source_seen(
    lab: Lab, src_ns: str, dst_ns: str, dst_ip: str, sport: int, dport: int = 3478
) -> tuple[str, int]:
    """Send UDP from src_ns:sport to dst_ip:dport; the (ip, port) the receiver saw."""
    srv = lab.spawn(
        dst_ns,
        [sys.executable, "-c", _UDP_SERVER, str(dport)],
        f"udp-srv-{dport}-{len(lab.daemons)}",
        max_lifetime_s=30,
    )
    assert netns.wait_until(
        lambda: f":{dport} " in netns.run(dst_ns, ["ss", "-Hlun"]).stdout, timeout=5
    ), srv.log_tail()
    lab.exec(
        src_ns, [sys.executable, "-c", _UDP_CLIENT, dst_ip, str(sport), str(dport)], timeout=20
    )
    assert netns.wait_until(lambda: not srv.alive(), timeout=5), "no datagram arrived"
    ip, port = srv.log_tail().split()
    return ip, int(port)


def two_sites(lab: Lab, nat1: str = "masquerade", nat2: str = "masquerade") -> None:
    lab.add_inet()
    lab.add_router(1, nat=nat1)
    lab.add_router(2, nat=nat2)
    lab.add_site(1)
    lab.add_site(2)


def test_lan_hosts_reach_the_internet_through_their_nat(lab: Lab) -> None:
    two_sites(lab)
    pop = lab.add_public_host("pop")
    assert pop.ip == POP_IP
    for s in lab.sites.values():
        assert lab.ping(s.lan_ns, pop.ip), f"lan{s.n} cannot reach {pop.ip}"
        assert lab.ping(s.lan_ns, s.lan_ip)
        assert lab.ping(s.ns, pop.ip)
        # The PoP sees the router's public address, not the private one.
        assert udp_source_seen(lab, s.lan_ns, pop.ns, pop.ip, 5555)[0] == s.public_ip
    assert lab.sites[1].public_ip == "198.51.100.11"
    assert lab.sites[2].public_ip == "198.51.100.12"


def test_masquerade_preserves_the_socketd_port(lab: Lab) -> None:
    two_sites(lab)
    pop = lab.add_public_host("pop")
    s1 = lab.sites[1]
    assert udp_source_seen(lab, s1.ns, pop.ns, pop.ip, s1.port) == (s1.public_ip, s1.port)


def test_random_nat_changes_the_port(lab: Lab) -> None:
    two_sites(lab, nat1="random")
    pop = lab.add_public_host("pop")
    s1 = lab.sites[1]
    ip, port = udp_source_seen(lab, s1.ns, pop.ns, pop.ip, s1.port)
    assert ip == s1.public_ip
    assert port != s1.port  # fully-random picks one of ~28000 ports


def test_shift_nat_offsets_the_port_toward_peers_only(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1, nat="shift", shift_offset=3)
    lab.add_router(2, nat="none")
    s1, s2 = lab.add_site(1), lab.add_site(2)
    pop = lab.add_public_host("pop")
    assert udp_source_seen(lab, s1.ns, pop.ns, pop.ip, 4800) == (s1.public_ip, 4800)
    assert udp_source_seen(lab, s1.ns, s2.ns, s2.wan_ip, 4800, dport=3479) == (
        s1.public_ip,
        4803,
    )


def test_public_site_and_double_nat(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(3, nat="none")
    lab.add_router(5)
    lab.add_router(4, upstream=5)
    s3, s4 = lab.add_site(3), lab.add_site(4)
    pop = lab.add_public_host("pop")
    assert s3.wan_ip == s3.public_ip == "198.51.100.13"
    assert s4.public_ip == "198.51.100.15"
    for s in (s3, s4):
        assert lab.ping(s.lan_ns, pop.ip)
        assert udp_source_seen(lab, s.ns, pop.ns, pop.ip, 4800)[0] == s.public_ip


def test_no_lan_to_lan_path_outside_a_tunnel(lab: Lab) -> None:
    two_sites(lab)
    # Without socketd the other LAN must be unreachable, or tunnel tests would prove nothing.
    assert not lab.ping(lab.sites[1].lan_ns, lab.sites[2].lan_host_ip)
    assert not lab.ping(lab.sites[1].ns, lab.sites[2].wan_ip)


def test_iperf3_helper(lab: Lab) -> None:
    two_sites(lab)
    pop = lab.add_public_host("pop")
    tcp = lab.iperf3(lab.sites[1].lan_ns, pop.ns, pop.ip, duration=1)
    assert tcp.mbps and tcp.mbps > 10
    udp = lab.iperf3(
        lab.sites[2].lan_ns, pop.ns, pop.ip, duration=1, udp=True, length=64, bandwidth="10M"
    )
    assert udp.udp_pps and udp.udp_pps > 100
    assert lab.ping_rtt_ms(lab.sites[1].lan_ns, pop.ip, count=5) is not None


def _lab_ns_of(tag: str, pid: int) -> list[str]:
    return [n for n in lab_namespaces() if n.startswith(f"sw{tag}-{pid}-")]


def test_cleanup_leaves_nothing_behind(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces, veth, nftables)")
    lab = Lab()
    workdir = lab.workdir
    with lab:
        two_sites(lab)
        sleeper = lab.spawn(lab.sites[1].ns, ["sleep", "300"], "sleeper")
        pid = sleeper.main_pid()
        assert pid and Path(f"/proc/{pid}").exists()
        assert len(_lab_ns_of(lab.tag, lab.pid)) == 7
    assert _lab_ns_of(lab.tag, lab.pid) == []
    assert not sleeper.alive()
    assert not Path(f"/proc/{pid}").exists()
    assert not workdir.exists()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_cleanup_on_exception(tmp_path: Path, exc: type[BaseException]) -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces, veth, nftables)")
    lab = Lab(tmp_path / "lab")
    with pytest.raises(exc), lab:
        two_sites(lab)
        lab.spawn(lab.sites[2].ns, ["sleep", "300"], "sleeper")
        raise exc()
    assert _lab_ns_of(lab.tag, lab.pid) == []
    assert all(not d.alive() for d in lab.daemons)


def test_cleanup_stale_removes_only_dead_labs(lab: Lab, tmp_path: Path) -> None:
    lab.add_inet()
    script = (
        "import os, sys\n"
        "from sdwan.lab.topology import Lab\n"
        "lab = Lab(sys.argv[1])\n"
        "lab.add_inet(); lab.add_router(1); lab.add_site(1)\n"
        "lab.spawn(lab.sites[1].ns, ['sleep', '300'], 'sleeper')\n"
        "print(lab.tag, os.getpid(), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    cp = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "dead")],
        env=lab.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    tag, pid = cp.stdout.split()
    left = _lab_ns_of(tag, int(pid))
    assert len(left) == 4, left
    # The killed lab's daemon outlives its owner only until PR_SET_PDEATHSIG hits it.
    removed = cleanup_stale()
    assert set(left) <= set(removed)
    assert _lab_ns_of(tag, int(pid)) == []
    # Our own (live) lab is untouched.
    assert lab.inet in lab_namespaces()
    assert lab.ping(lab.inet, "198.51.100.1")


def test_demo_runs_end_to_end(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The README's first command: two sites and a PoP, traffic through the PoP, the direct
    # tunnel, the mesh, a cloud outage that every site notices and a reboot in it, the
    # PoP's return, the events.
    from sdwan.lab.demo import STEPS, DemoOptions, run_demo

    rc = run_demo(DemoOptions(tunnel_timeout_s=45, iperf_seconds=1, workdir=tmp_path / "demo"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "DEMO OK" in out
    assert out.count("    ok (") == len(STEPS), out
    assert "via the PoP" in out
    assert "direct tunnel to site 2 up" in out
    assert "site 3: mesh tunnel to site 1 punched" in out and "socketctl mesh" in out
    # WAN recovery: every long-lived TCP connection continues over the mesh, none reset.
    assert "Off-Cloud Recovery Activated" in out and "socketctl recovery" in out
    assert "every TCP connection continued over the mesh" in out
    # A reboot in the outage: the mesh comes back from NAT data, without the PoP.
    assert "killed and started again, PoP still down: both mesh tunnels direct" in out
    assert "site 1 by cache, site 2 by cache" in out, out
    assert "site 3: recovery active" in out and "continue over the mesh" in out
    assert "recovery stopped on every site" in out
    assert "all 6 TCP connections alive through the whole outage" in out
    for n in (1, 2):
        assert f"site {n}: cloud " in out and f"site {n}: re-registered" in out
    assert "socketctl peers" in out and "socketctl pop" in out
    assert "pop.disconnected" in out and "pop.connected" in out
