"""A congested uplink must not stall Python's calls into the fast path.

The TUN thread holds the table lock (shared) while it sends a batch; a call from Python
that changes the table (an endpoint, a key, a route) takes it exclusively and waits for it.
If a send waited for room on a full socket buffer while holding it, every such call (and,
behind a waiting writer, every control send) would stall as long. Here the link socket
lives in a namespace whose veth is shaped to 10 Mbit/s with a deep queue and has a small
send buffer, so the buffer stays full; the TUN is flooded faster than that; Python keeps
calling in; the worst call must stay short, and the data path's datagrams that found no
room within its wait budget are counted as `congested` on the link.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fphelpers import ip_packet, link_keys

from sdwan.bindings.fastpath import FastPath, FastPathConfig, FastPathError
from sdwan.lab import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, tc)")

CLONE_NEWNET = 0x40000000
WORST_CALL_S = 0.1  # generous: a broken mechanism stalls for up to a second
FLOOD_S = 3.0


def _socket_in(ns: str) -> socket.socket:
    """A UDP socket of namespace ns (setns on a thread of its own: only that thread moves)."""
    out: list[socket.socket | BaseException] = []

    def make() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            with open(f"/var/run/netns/{ns}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            out.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        except BaseException as e:  # handed to the caller
            out.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@pytest.fixture
def slow_ns() -> Iterator[str]:
    """The site's namespace; its uplink leads to another one, where the peer sits."""
    ns, far = f"fpslow{os.getpid()}", f"fpfar{os.getpid()}"
    netns.ns_add(ns)
    netns.ns_add(far)
    try:
        netns.veth(ns, "up0", far, "up1")
        netns.addr_add(ns, "up0", "192.0.2.1/30")
        netns.addr_add(far, "up1", "192.0.2.2/30")
        # 10 Mbit/s with room for megabytes in the queue: what is sent waits in the qdisc,
        # charged to the sender's socket (a 4 KiB send buffer), so its buffer stays full
        # (EAGAIN) while the TUN is flooded faster than that.
        netns.run(ns, ["tc", "qdisc", "add", "dev", "up0", "root", "tbf", "rate", "10mbit",
                       "burst", "1600", "limit", "4mb"])
        yield ns
    finally:
        netns.ns_del(ns)
        netns.ns_del(far)


def test_python_calls_stay_short_while_the_uplink_is_congested(slow_ns: str) -> None:
    up = _socket_in(slow_ns)
    up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    up.bind(("192.0.2.1", 4800))
    cfg = FastPathConfig.default()
    cfg.batch = 256  # a large batch: the time the lock is held must not grow with it
    fp, far = FastPath(cfg), FastPath()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    stop = threading.Event()
    flooder: threading.Thread | None = None
    try:
        fp.tun_attach(theirs.fileno())
        fp.link_add(1, up.fileno())
        fp.peer_add(2)
        fp.route_set("10.2.0.0/24", 2)
        fp.set_endpoint(2, 1, ("192.0.2.2", 4800))
        far.peer_add(1)
        link_keys(fp, far, 1, 2, 0xA1, 0xB1)
        fp.start()

        def flood() -> None:
            # Sizes that grow from one packet to the next cannot share a UDP GSO send: each
            # is an entry of its own in the batch, as many as the batch holds.
            pkts = [ip_packet("10.1.0.5", "10.2.0.7", b"x" * (400 + 100 * i)) for i in range(8)]
            i = 0
            while not stop.is_set():
                try:
                    ours.send(pkts[i % len(pkts)])
                    i += 1
                except OSError:
                    time.sleep(0.001)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()

        def congested() -> int:
            return fp.link_counters(1).drops["congested"]

        worst = 0.0
        calls = 0
        # Datagrams of the data path (the TUN thread's batches, keepalives) dropped as
        # congested: what the count grew by between control sends, which count there too.
        data_path = 0
        last = congested()
        deadline = time.monotonic() + FLOOD_S
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            # Table changes take the lock exclusively; a control send takes it shared (and
            # queues behind a waiting writer), its own send never waits.
            fp.set_endpoint(2, 1, ("192.0.2.2", 4800))
            fp.route_set("10.3.0.0/24", 2)
            before_ctrl = congested()
            data_path += before_ctrl - last
            # No room on the link: refused at once, and counted.
            with contextlib.suppress(FastPathError):
                fp.ctrl_send(1, ("192.0.2.2", 4800), b"\x16\xfe\xfdcontrol")
            last = congested()
            worst = max(worst, time.monotonic() - t0)
            calls += 1
            time.sleep(0.005)
        data_path += congested() - last
        drops = fp.link_counters(1).drops
        assert calls > 50
        assert worst < WORST_CALL_S, f"a call into the fast path took {worst * 1000:.0f} ms"
        # The wait budget itself gave up on datagrams of the TUN's batches.
        assert data_path > 0, drops
    finally:
        stop.set()
        if flooder is not None:
            flooder.join(timeout=5)
        fp.close()
        far.close()
        for s in (ours, theirs, up):
            s.close()
