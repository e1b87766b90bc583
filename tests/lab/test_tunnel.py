"""Two sites behind NAT routers, each running socketd with the other as a static
peer: what a user of the boxes sees (traffic between LAN hosts, socketctl
output, refused handshakes with their reason, recovery after a crash, and
forged or replayed packets dropped and counted)."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labwait import wait_for

from sdwan.lab.topology import Lab, Site

UP_TIMEOUT_S = 30


def build(lab: Lab, nat: str = "masquerade") -> tuple[Site, Site]:
    lab.add_inet()
    lab.add_router(1, nat=nat)
    lab.add_router(2, nat=nat)
    return lab.add_site(1), lab.add_site(2)


def start_pair(lab: Lab, s1: Site, s2: Site, **tunnel: object) -> None:
    tunnel = {"keepalive_s": 2, **tunnel}
    lab.write_site_config(s1, peers=[s2], tunnel=tunnel)
    lab.write_site_config(s2, peers=[s1], tunnel=tunnel)
    lab.start_socketd(s1)
    lab.start_socketd(s2)


def peer_status(lab: Lab, site: Site, peer_id: int) -> dict:
    peers = lab.socketctl(site, "peers")["peers"]
    return next(p for p in peers if p["site_id"] == peer_id)


def wait_state(lab: Lab, site: Site, peer_id: int, state: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = peer_status(lab, site, peer_id)
        if st["state"] == state:
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"site {site.n}: peer {peer_id} not {state} after {timeout} s: {st}")
        time.sleep(0.3)


def wait_reason(lab: Lab, site: Site, peer_id: int, words: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = peer_status(lab, site, peer_id)
        if st["state"] != "up" and words in (st["reason"] or ""):
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"site {site.n}: no reason containing {words!r} in {timeout} s: {st}")
        time.sleep(0.3)


def test_lan_hosts_talk_through_the_tunnel(lab: Lab) -> None:
    s1, s2 = build(lab)
    start_pair(lab, s1, s2)
    wait_state(lab, s1, 2, "up", UP_TIMEOUT_S)
    wait_state(lab, s2, 1, "up", UP_TIMEOUT_S)
    assert lab.ping(s1.lan_ns, s2.lan_host_ip, count=3)
    assert lab.ping(s2.lan_ns, s1.lan_host_ip, count=3)
    # Every echo request left alone after an idle second: site 1's TUN thread waited for
    # its answer ([tunnel] answer_wait_us, on by default).
    assert lab.socketctl(s1, "status")["answer_waits"]["waits"] >= 3

    tcp = lab.iperf3(s1.lan_ns, s2.lan_ns, s2.lan_host_ip, duration=2)
    assert tcp.mbps and tcp.mbps > 10, tcp.raw.get("error")
    udp = lab.iperf3(
        s2.lan_ns, s1.lan_ns, s1.lan_host_ip, duration=2, udp=True, length=1200, bandwidth="20M"
    )
    assert udp.udp_pps and udp.udp_pps > 100
    assert (udp.lost_percent or 0) < 20

    st1 = peer_status(lab, s1, 2)
    assert st1["role"] == "responder" and st1["rx_packets"] > 100
    assert st1["subnets"] == [s2.lan_subnet]
    st2 = peer_status(lab, s2, 1)
    assert st2["role"] == "initiator" and st2["drops"]["bad_tag"] == 0
    assert st2["handshakes"] == 1, "the tunnel re-handshook without a reason"
    status = lab.socketctl(s1, "status")
    assert status["site_id"] == 1 and status["peers_up"] == 1
    text = lab.socketctl(s1, "peers", json_out=False)
    assert "up" in text


def _tick_rate(lab: Lab, site: Site, seconds: float) -> float:
    t0, n0 = time.monotonic(), lab.socketctl(site, "status")["ticks"]
    time.sleep(seconds)  # a rate is counted over a period: the sleep is the measurement
    t1, n1 = time.monotonic(), lab.socketctl(site, "status")["ticks"]
    return (n1 - n0) / (t1 - t0)


def _at_rest_within(lab: Lab, site: Site, seconds: float) -> None:
    """The supervisor comes to rest (under 5 ticks/s over a second) in a second that starts
    at most `seconds` from now: it may settle sooner, not later."""
    start = time.monotonic()
    rates: list[float] = []
    while not rates or time.monotonic() - start <= seconds:
        rates.append(_tick_rate(lab, site, 1))
        if rates[-1] < 5:
            return
    pytest.fail(f"site {site.site_id} not at rest within {seconds} s: {rates} ticks/s")


def test_the_supervisor_ticks_often_only_while_a_clock_runs(lab: Lab) -> None:
    """At rest (tunnel up, no traffic, no PoP) socketd wakes about once a second; traffic
    starts the fast path's liveness clocks, which wake it at once and keep it ticking every
    50 ms, so a path that stops answering is still noticed within a second."""
    s1, s2 = build(lab)
    start_pair(lab, s1, s2, keepalive_s=1)  # a dead peer is down after 3 s
    wait_state(lab, s1, 2, "up", UP_TIMEOUT_S)
    wait_state(lab, s2, 1, "up", UP_TIMEOUT_S)
    # The handshake's last messages and acknowledgements are through within 2 s; then it
    # comes to rest.
    _at_rest_within(lab, s1, 2)
    idle = _tick_rate(lab, s1, 4)
    # Each status request wakes it once too; 20 a second is what a fixed 50 ms clock does.
    assert idle < 5, f"{idle:.1f} ticks/s at rest"
    ping = subprocess.Popen(
        ["ip", "netns", "exec", s2.lan_ns, "ping", "-q", "-i", "0.05", "-c", "100",
         s1.lan_host_ip],
        stdout=subprocess.DEVNULL,
    )
    try:
        rx = peer_status(lab, s1, 2)["rx_packets"]
        wait_for("pings arriving at site 1",
                 lambda: peer_status(lab, s1, 2)["rx_packets"] >= rx + 5, timeout=10)
        busy = _tick_rate(lab, s1, 2)
    finally:
        ping.kill()
        ping.wait()
    assert busy > 10, f"{busy:.1f} ticks/s under traffic"

    # The responder dies under traffic: once the initiator's tunnel is down, neither its
    # handshakes into the void (each waits out its deadline) nor the liveness clocks of
    # packets nobody will answer keep socketd ticking.
    lab.stop_socketd(s1, signal.SIGKILL)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", s2.lan_ns, "ping", "-q", "-i", "0.05", "-c", "400",
         s1.lan_host_ip],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while peer_status(lab, s2, 1)["state"] == "up":
            assert time.monotonic() < deadline, "site 2 never noticed its peer dead"
            time.sleep(0.3)
        # The handshake it starts at once into the void and the clocks of packets already
        # sent run out within a second; then it comes to rest.
        _at_rest_within(lab, s2, 1)
        dead = _tick_rate(lab, s2, 4)
    finally:
        ping.kill()
        ping.wait()
    assert dead < 5, f"{dead:.1f} ticks/s with the peer down"


def test_large_packets_are_not_black_holed(lab: Lab) -> None:
    """The tunnel MTU follows the link, and TCP's MSS is clamped to it."""
    s1, s2 = build(lab)
    start_pair(lab, s1, s2)
    wait_state(lab, s2, 1, "up", UP_TIMEOUT_S)
    # Full-size pings don't fit through the tunnel: the site answers with
    # "fragmentation needed" instead of dropping them silently.
    cp = lab.exec(
        s1.lan_ns,
        ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1472", s2.lan_host_ip],
        check=False,
    )
    assert cp.returncode != 0
    assert "mtu" in (cp.stdout + cp.stderr).lower()
    assert lab.ping(s1.lan_ns, s2.lan_host_ip)
    tcp = lab.iperf3(s1.lan_ns, s2.lan_ns, s2.lan_host_ip, duration=2)
    assert tcp.mbps and tcp.mbps > 10


def test_certificate_from_another_ca_gets_no_tunnel(lab: Lab) -> None:
    s1, s2 = build(lab)
    other = lab.new_ca("other", account="someone-else")
    cert, key = lab.issue(s2, other)
    lab.write_site_config(s1, peers=[s2], tunnel={"keepalive_s": 2})
    lab.write_site_config(s2, peers=[s1], tunnel={"keepalive_s": 2}, pki=other, cert=cert, key=key)
    lab.start_socketd(s1)
    lab.start_socketd(s2)
    # Site 2 initiates; site 1 refuses its certificate, and both say why.
    st1 = wait_reason(lab, s1, 2, "refused", UP_TIMEOUT_S)
    assert "account CA" in st1["reason"], st1
    st2 = wait_reason(lab, s2, 1, "handshake failed", UP_TIMEOUT_S)
    assert "account CA" in st2["reason"], st2
    assert not lab.ping(s1.lan_ns, s2.lan_host_ip)
    rejections = lab.socketctl(s1, "status")["rejections"]
    assert rejections and s2.public_ip in rejections[-1]["from"]


def test_wrong_site_id_gets_no_tunnel(lab: Lab) -> None:
    """Site 1 expects site 2 at that endpoint, but the box there is site 3."""
    s1, s2 = build(lab)
    impostor = lab.issue(3)
    lab.write_site_config(s1, peers=[s2], tunnel={"keepalive_s": 2})
    s2_as_3 = lab.write_site_config(
        s2, peers=[s1], tunnel={"keepalive_s": 2}, cert=impostor[0], key=impostor[1], name="site-3"
    )
    text = s2_as_3.read_text().replace("id = 2", "id = 3", 1)
    s2_as_3.write_text(text)
    lab.start_socketd(s1)
    lab.start_socketd(s2)
    st1 = wait_reason(lab, s1, 2, "site 3", UP_TIMEOUT_S)
    assert "not a configured peer" in st1["reason"], st1
    assert not lab.ping(s1.lan_ns, s2.lan_host_ip)


@pytest.mark.parametrize("victim", [1, 2], ids=["responder-crashes", "initiator-crashes"])
def test_restarted_socketd_reestablishes_the_tunnel(lab: Lab, victim: int) -> None:
    s1, s2 = build(lab)
    start_pair(lab, s1, s2)
    wait_state(lab, s2, 1, "up", UP_TIMEOUT_S)
    assert lab.ping(s1.lan_ns, s2.lan_host_ip, count=2)
    site = s1 if victim == 1 else s2
    lab.stop_socketd(site, sig=signal.SIGKILL)
    lab.start_socketd(site)
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=UP_TIMEOUT_S)
    assert lab.wait_ping(s2.lan_ns, s1.lan_host_ip, timeout=10)
    other = s2 if victim == 1 else s1
    assert peer_status(lab, other, site.site_id)["handshakes"] >= 2


def _udp_payloads_from_pcap(path: Path) -> list[bytes]:
    """UDP payloads of an Ethernet/IPv4 pcap file (what tcpdump -w writes)."""
    data = path.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        out.append(frame[14 + ihl + 8 :])
    return out


INJECT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in sys.argv[3:]:
    s.sendto(bytes.fromhex(h), (sys.argv[1], int(sys.argv[2])))
"""


def test_forged_and_replayed_packets_are_dropped_and_counted(lab: Lab) -> None:
    s1, s2 = build(lab)
    start_pair(lab, s1, s2)
    wait_state(lab, s2, 1, "up", UP_TIMEOUT_S)

    # Capture real data packets arriving at site 2 while its peer sends traffic.
    pcap = lab.workdir / "capture.pcap"
    dump = lab.spawn(
        s2.ns,
        [
            "tcpdump",
            "-U",
            "-n",
            "-i",
            s2.wan_dev,
            "-c",
            "20",
            "-w",
            str(pcap),
            f"dst host {s2.wan_ip} and udp dst port {s2.port} and udp[8] = 0xd0",
        ],
        "tcpdump",
    )
    wait_for("tcpdump listening", lambda: "listening on" in dump.log_tail(), timeout=10)
    lab.ping(s1.lan_ns, s2.lan_host_ip, count=20, wait_s=1)
    deadline = time.monotonic() + 10
    while dump.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    lab.kill(dump)
    captured = [p for p in _udp_payloads_from_pcap(pcap) if p and p[0] == 0xD0]
    assert len(captured) >= 5, "no data packets captured"

    before = peer_status(lab, s2, 1)["drops"]
    link_before = lab.socketctl(s2, "status")["links"][0]["drops"]
    replayed = captured[:5]
    # A fresh counter, so the packet gets past the replay check to the tag check.
    tampered = bytearray(captured[0])
    counter = struct.unpack_from("!Q", tampered, 8)[0]
    struct.pack_into("!Q", tampered, 8, counter + 1_000_000)
    unknown = bytearray(captured[0])
    unknown[4:8] = b"\x01\x02\x03\x04"
    truncated = captured[0][:20]
    packets = [*replayed, bytes(tampered), bytes(unknown), truncated]
    # Injected from the router's namespace: neither site, straight at site 2's socket.
    lab.exec(
        s2.router.ns,
        [sys.executable, "-c", INJECT, s2.wan_ip, str(s2.port), *(p.hex() for p in packets)],
    )

    def counted() -> bool:
        after = peer_status(lab, s2, 1)["drops"]
        link_after = lab.socketctl(s2, "status")["links"][0]["drops"]
        return (after["replay"] - before["replay"] >= 5
                and after["bad_tag"] - before["bad_tag"] >= 1
                and link_after["unknown_index"] - link_before["unknown_index"] >= 1
                and link_after["malformed"] - link_before["malformed"] >= 1)

    wait_for("the injected packets counted", counted, timeout=10)
    after = peer_status(lab, s2, 1)["drops"]
    link_after = lab.socketctl(s2, "status")["links"][0]["drops"]
    assert after["replay"] - before["replay"] >= 5
    assert after["bad_tag"] - before["bad_tag"] >= 1
    assert link_after["unknown_index"] - link_before["unknown_index"] >= 1
    assert link_after["malformed"] - link_before["malformed"] >= 1
    # The tunnel itself is unharmed.
    assert lab.ping(s1.lan_ns, s2.lan_host_ip, count=2)
    assert peer_status(lab, s2, 1)["state"] == "up"


def test_periodic_rekey_loses_nothing(lab: Lab) -> None:
    s1, s2 = build(lab)
    start_pair(lab, s1, s2, rekey_s=10)
    wait_state(lab, s2, 1, "up", UP_TIMEOUT_S)
    # 25 s of pings every 50 ms span at least two rekeys.
    cp = lab.exec(
        s1.lan_ns,
        ["ping", "-n", "-q", "-c", "500", "-i", "0.05", "-W", "1", s2.lan_host_ip],
        timeout=60,
        check=False,
    )
    assert " 0% packet loss" in cp.stdout, cp.stdout
    assert peer_status(lab, s2, 1)["handshakes"] >= 3
    assert peer_status(lab, s1, 2)["state"] == "up"


def test_ends_with_different_rekey_intervals_agree_before_the_other_end_refuses_its_key(
    lab: Lab,
) -> None:
    """Site 2 initiates (the higher id) with a 100 s interval; site 1 refuses keys at 70 s
    (10 s / 70 s, lab values below the 60 s floor). Without an agreement site 2 would rekey
    at 100 s, 30 s after site 1 stopped taking its key. Agreed: 60 s (the floor: only one
    end is below it) and keys kept 120 s at both ends, so traffic crosses the 70 s mark and
    the rekey without a loss."""
    s1, s2 = build(lab)
    lab.write_site_config(
        s1, peers=[s2], tunnel={"keepalive_s": 2, "rekey_s": 10, "key_max_age_s": 70}
    )
    lab.write_site_config(s2, peers=[s1], tunnel={"keepalive_s": 2, "rekey_s": 100})
    lab.start_socketd(s1)
    lab.start_socketd(s2)
    wait_state(lab, s1, 2, "up", UP_TIMEOUT_S)
    wait_state(lab, s2, 1, "up", UP_TIMEOUT_S)
    for site, peer, own, theirs in ((s1, 2, (10, 70), (100, 260)), (s2, 1, (100, 260), (10, 70))):
        timers = wait_for(
            f"site {site.n} agreed timers",
            lambda site=site, peer=peer: (t := peer_status(lab, site, peer)["timers"])["peer"]
            is not None and t,
        )
        assert timers["rekey_s"] == 60 and timers["key_max_age_s"] == 120, timers
        assert (timers["own"]["rekey_s"], timers["own"]["key_max_age_s"]) == own, timers
        assert (timers["peer"]["rekey_s"], timers["peer"]["key_max_age_s"]) == theirs, timers
        assert timers["peer"]["announced"] is True, timers
        text = lab.socketctl(site, "peers", json_out=False)
        assert "REKEY" in text and "60s/120s" in text, text
    first = peer_status(lab, s2, 1)["handshakes"]
    # 90 s of pings every 50 ms: past site 1's own 70 s limit, across the agreed rekey.
    cp = lab.exec(
        s1.lan_ns,
        ["ping", "-n", "-q", "-c", "1800", "-i", "0.05", "-W", "1", s2.lan_host_ip],
        timeout=150,
        check=False,
    )
    assert " 0% packet loss" in cp.stdout, cp.stdout
    st1, st2 = peer_status(lab, s1, 2), peer_status(lab, s2, 1)
    assert st2["handshakes"] - first >= 1, st2
    assert st1["state"] == "up" and st2["state"] == "up", (st1, st2)
    assert st1["drops"]["key_expired"] == 0 and st2["drops"]["key_expired"] == 0
    assert st1["timers"]["refused"] == 0 and st2["timers"]["refused"] == 0


def test_dead_peer_is_reported_down_with_the_reason(lab: Lab) -> None:
    s1, s2 = build(lab)
    start_pair(lab, s1, s2)
    wait_state(lab, s1, 2, "up", UP_TIMEOUT_S)
    lab.stop_socketd(s2, sig=signal.SIGKILL)
    # keepalive_s = 2: silence for 3 keepalives is declared dead.
    st = wait_reason(lab, s1, 2, "no packets from the peer", 15)
    assert st["state"] == "down"
