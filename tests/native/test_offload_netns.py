"""The offloads end to end on real devices: two network namespaces joined by a veth, a TUN
and a FastPath in each (tunsite.py), and real TCP and UDP through them. The TUN hands the
sender superpackets (TSO/USO) that the fast path cuts, seals and sends with UDP GSO; the
receiver gets them coalesced (UDP GRO), splits, opens and writes TCP superpackets back.
Needs root (namespaces, /dev/net/tun)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdwan.bindings.fastpath import TUN_F_TSO, TUN_F_VNET

HERE = Path(__file__).resolve().parent
FIRMWARE = HERE.parents[1] / "firmware"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2",
)


def run(*args: str, timeout: float = 10, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FIRMWARE), e.get("PYTHONPATH")]))
    return e


@dataclass
class Lab:
    a: str
    b: str
    sites: list[subprocess.Popen[str]]
    features: list[int]

    def py(self, ns: str, code: str, timeout: float = 60) -> str:
        r = run("ip", "netns", "exec", ns, sys.executable, "-c", code, timeout=timeout)
        return r.stdout


@pytest.fixture
def lab() -> Iterator[Lab]:
    tag = f"fpo{os.getpid()}"
    a, b = f"{tag}a", f"{tag}b"
    sites: list[subprocess.Popen[str]] = []
    try:
        run("ip", "netns", "add", a)
        run("ip", "netns", "add", b)
        run("ip", "link", "add", "vA", "netns", a, "type", "veth", "peer", "name", "vB", "netns", b)
        for ns, dev, addr in ((a, "vA", "10.99.0.1/24"), (b, "vB", "10.99.0.2/24")):
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", dev, "up")
        features = []
        for ns, sid, local, peer in (
            (a, "1", "10.99.0.1", "10.99.0.2"),
            (b, "2", "10.99.0.2", "10.99.0.1"),
        ):
            p = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    str(HERE / "tunsite.py"),
                    sid,
                    local,
                    peer,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env(),
            )
            sites.append(p)
            assert p.stdout is not None
            line = p.stdout.readline().split()
            assert line and line[0] == "ready", f"site {sid} did not start"
            features.append(int(line[1]))
        for ns, me, other in ((a, 1, 2), (b, 2, 1)):
            run("ip", "-n", ns, "addr", "add", f"10.{me}.0.1/24", "dev", "fp0")
            run("ip", "-n", ns, "addr", "add", f"fd00:{me}::1/64", "dev", "fp0", "nodad")
            run("ip", "-n", ns, "link", "set", "fp0", "mtu", "1440", "up")
            run("ip", "-n", ns, "route", "add", f"10.{other}.0.0/24", "dev", "fp0")
            run("ip", "-n", ns, "-6", "route", "add", f"fd00:{other}::/64", "dev", "fp0")
        yield Lab(a, b, sites, features)
    finally:
        for p in sites:
            if p.poll() is None:
                try:
                    p.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
        for ns in (a, b):
            run("ip", "netns", "del", ns, check=False)


SERVER = """
import hashlib, socket
s = socket.socket(socket.{fam}, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{addr}", 5201)); s.listen(1)
print("listening", flush=True)
s.settimeout(30)
c, _ = s.accept(); c.settimeout(30)
h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""


def tcp_stream(lab: Lab, fam: str, addr: str, size: int, tmp: Path) -> None:
    data = os.urandom(size)
    src = tmp / "stream.bin"
    src.write_bytes(data)
    srv = subprocess.Popen(
        ["ip", "netns", "exec", lab.b, sys.executable, "-c", SERVER.format(fam=fam, addr=addr)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "listening"
        code = textwrap.dedent(f"""
            import socket
            c = socket.create_connection(("{addr}", 5201), timeout=30)
            c.sendall(open("{src}", "rb").read())
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
        """)
        lab.py(lab.a, code, timeout=60)
        out, _ = srv.communicate(timeout=60)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    n, digest = out.split()
    assert int(n) == size
    assert digest == hashlib.sha256(data).hexdigest()


def test_tun_offloads_are_on(lab: Lab) -> None:
    for f in lab.features:
        assert f & TUN_F_VNET and f & TUN_F_TSO


def test_tcp_stream_v4_intact(lab: Lab, tmp_path: Path) -> None:
    tcp_stream(lab, "AF_INET", "10.2.0.1", 50 << 20, tmp_path)


def test_tcp_stream_v6_intact(lab: Lab, tmp_path: Path) -> None:
    tcp_stream(lab, "AF_INET6", "fd00:2::1", 10 << 20, tmp_path)


UDP_RECV = """
import hashlib, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("10.2.0.1", 9000)); s.settimeout(2)
print("bound", flush=True)
good = bad = 0
try:
    while True:
        d = s.recv(65536)
        if hashlib.sha256(d[32:]).digest() == d[:32]:
            good += 1
        else:
            bad += 1
except TimeoutError:
    pass
print(good, bad, flush=True)
"""

UDP_SEND = """
import hashlib, socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("10.2.0.1", 9000))
def dgram(i, n):
    body = struct.pack("!I", i) + bytes((i + k) & 255 for k in range(n - 36))
    return hashlib.sha256(body).digest() + body
for i in range(1500):
    s.send(dgram(i, 64 + (i * 37) % 1300))
    if i % 100 == 0:
        time.sleep(0.01)
# UDP GSO from the application: the TUN hands these over as USO superpackets.
s.setsockopt(socket.SOL_UDP, 103, 400)  # UDP_SEGMENT
for i in range(100):
    s.send(b"".join(dgram(10000 + i * 10 + k, 400) for k in range(10)))
    time.sleep(0.001)
"""


def test_udp_burst(lab: Lab) -> None:
    rcv = subprocess.Popen(
        ["ip", "netns", "exec", lab.b, sys.executable, "-c", UDP_RECV],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rcv.stdout is not None
        assert rcv.stdout.readline().strip() == "bound"
        lab.py(lab.a, UDP_SEND)
        out, _ = rcv.communicate(timeout=30)
    finally:
        if rcv.poll() is None:
            rcv.kill()
            rcv.communicate()
    good, bad = map(int, out.split())
    assert bad == 0
    # Datagrams may be lost under a burst (that is UDP), but not many on an idle veth.
    assert good >= 0.95 * 2500, good
