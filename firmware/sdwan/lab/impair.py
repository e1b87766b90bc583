"""The lab's impairment element: loss, delay, jitter, duplication and reordering on one uplink.

The lab's kernel has no netem (and the lab loads no modules), so a WAN link's bad days are
played in userspace: `python -m sdwan.lab.impair --site-dev site --up-dev rtr --control PATH`
runs in a namespace of its own that sits in the middle of an uplink's cable (the site's
``wanN`` <-veth-> ``site`` [element] ``rtr`` <-veth-> the router), and forwards every frame
between its two devices through AF_PACKET raw sockets, applying each direction's setting.

Why a layer-2 bridge over AF_PACKET, not a TUN pair: it carries everything the cable carries
(ARP, IPv6 neighbour discovery, any protocol) without the element owning an address or a
route, so the site and the router see one Ethernet segment as before and a link with an
element is plumbed exactly like one without. ``PACKET_VNET_HDR`` on both sockets keeps the
kernel's offload metadata with each frame (a checksum still to be filled in, a TSO/GSO
super-frame): what the veth hands over is sent on as it was, so neither checksums nor
segmentation are done in Python, and no offload has to be switched off. One consequence:
a TCP super-frame counts as one packet for loss and duplication (ping, UDP and anything
that fits one frame are per packet).

Each direction (``up``: from the site toward the router, ``down``: back) has its own
setting and its own random generator, seeded from ``--seed`` (and re-seedable), so a run is
repeatable whatever the other direction carries:

* ``loss``: percent of frames dropped;
* ``delay_ms`` and ``jitter_ms``: each frame waits delay plus a value drawn from
  ``jitter_dist`` (``uniform`` in [-jitter, +jitter], as netem does, or ``normal`` with
  sigma = jitter), never less than zero; frames leave in their order of arrival (a frame
  never overtakes an earlier one, it waits for it), unless reordering is asked;
* ``duplicate``: percent of frames sent twice;
* ``reorder``: percent of frames sent at once, ahead of the delayed ones queued before them
  (needs a delay to have anything to overtake).

A frame with nothing to do in a direction with nothing queued is sent from the receive
loop at once: no timer, no copy. Settings change at run time over a unix stream socket,
one JSON object a line each way (`request`, or the `ImpairElement` handle the lab keeps):
``{"cmd": "set", "direction": "up", "loss": 5}`` replaces the direction's setting (fields
left out are zero; ``direction`` ``up``, ``down`` or ``both``; ``seed`` re-seeds),
``{"cmd": "clear"}`` sets both directions to nothing, ``{"cmd": "get"}`` returns the
settings and the counters. The control socket appears once both devices are open, so its
existence means the element forwards.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import select
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from sdwan.lab import netns
from sdwan.lab.netns import Daemon

DIRECTIONS = ("up", "down")
JITTER_DISTS = ("uniform", "normal")

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_IGNORE_OUTGOING = 23
_PACKET_OUTGOING = 4
# A GSO super-frame plus the virtio-net header.
_RX_BYTES = 65536 + 64
# At most this many frames are read from one device before the other gets its turn and the
# queues are served, so a flood one way cannot starve the other.
_BATCH = 64
# Frames waiting in one direction beyond this are dropped (counted as overflow): a delay of
# seconds at a high rate must not eat the machine's memory.
_QUEUE_MAX = 20000
_MAX_DELAY_MS = 60_000.0


class ImpairError(RuntimeError):
    """The element refused a request, or could not be reached."""


@dataclass
class Impairment:
    """One direction's setting; all zero means the frames pass untouched."""

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    jitter_dist: str = "uniform"
    duplicate: float = 0.0
    reorder: float = 0.0

    def is_zero(self) -> bool:
        return not (self.loss or self.delay_ms or self.jitter_ms or self.duplicate or self.reorder)

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> Impairment:
        """The setting a `set` request asks for; ValueError names the field that is wrong."""
        known = {f.name for f in fields(cls)}
        vals: dict[str, Any] = {}
        for k in known:
            if k not in req:
                continue
            v = req[k]
            if k == "jitter_dist":
                if v not in JITTER_DISTS:
                    raise ValueError(f"jitter_dist must be one of {', '.join(JITTER_DISTS)}")
                vals[k] = v
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{k} must be a number")
            top = 100.0 if k in ("loss", "duplicate", "reorder") else _MAX_DELAY_MS
            if not 0 <= v <= top:
                raise ValueError(f"{k} must be within 0..{top:g}")
            vals[k] = float(v)
        return cls(**vals)


@dataclass
class _Counters:
    rx: int = 0
    tx: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    overflow: int = 0
    tx_errors: int = 0


class Sender(Protocol):
    """Where a direction's frames go: the packet socket on the far device (a list in tests)."""

    def send(self, data: bytes, /) -> int: ...


@dataclass
class Direction:
    """One direction's shaping: its setting, random generator, queue and counters. Frames go
    in with `take`, and out through `tx` at once or when `release_due` finds them due."""

    name: str
    tx: Sender
    rng: random.Random
    imp: Impairment = field(default_factory=Impairment)
    # (release time, frame); release times never decrease, so a deque is the timer queue.
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    last_release: float = 0.0
    counters: _Counters = field(default_factory=_Counters)

    def send(self, frame: bytes) -> None:
        try:
            self.tx.send(frame)
            self.counters.tx += 1
        except OSError:
            # The other side's device is down (a pulled cable) or its queue is full: the
            # frame is lost, as on a wire.
            self.counters.tx_errors += 1

    def take(self, frame: bytes, now: float) -> None:
        """A frame arrived at `now` (monotonic seconds): drop, send, or queue it."""
        c = self.counters
        c.rx += 1
        imp = self.imp
        if imp.is_zero() and not self.queue:
            self.send(frame)
            return
        rng = self.rng
        if imp.loss and rng.random() * 100.0 < imp.loss:
            c.lost += 1
            return
        copies = 1
        if imp.duplicate and rng.random() * 100.0 < imp.duplicate:
            copies = 2
            c.duplicated += 1
        for _ in range(copies):
            if imp.reorder and self.queue and rng.random() * 100.0 < imp.reorder:
                c.reordered += 1
                self.send(frame)
                continue
            wait_ms = imp.delay_ms
            if imp.jitter_ms:
                if imp.jitter_dist == "normal":
                    wait_ms += rng.gauss(0.0, imp.jitter_ms)
                else:
                    wait_ms += rng.uniform(-imp.jitter_ms, imp.jitter_ms)
            release = max(now + max(wait_ms, 0.0) / 1000.0, self.last_release)
            self.last_release = release
            if release <= now and not self.queue:
                self.send(frame)
            elif len(self.queue) >= _QUEUE_MAX:
                c.overflow += 1
            else:
                self.queue.append((release, frame))

    def release_due(self, now: float) -> float | None:
        """Send every queued frame that is due; seconds until the next one, or None."""
        q = self.queue
        while q and q[0][0] <= now:
            self.send(q.popleft()[1])
        return q[0][0] - now if q else None


def _packet_socket(dev: str) -> tuple[socket.socket, bool]:
    """A raw socket on dev with virtio-net headers; True if it sees no frames it sent."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
    quiet = True
    try:
        s.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        quiet = False
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    s.bind((dev, _ETH_P_ALL))
    s.setblocking(False)
    return s, quiet


def _seeded(seed: int, direction: str) -> random.Random:
    return random.Random(f"{seed}/{direction}")


class Element:
    """The forwarding loop between two devices, and its control socket."""

    def __init__(self, site_dev: str, up_dev: str, control: Path, seed: int = 1) -> None:
        self.control_path = control
        site_sock, q1 = _packet_socket(site_dev)
        up_sock, q2 = _packet_socket(up_dev)
        self._filter_outgoing = not (q1 and q2)
        # Up: read on the site's side, sent on the router's; down the other way.
        self._rx = {"up": site_sock, "down": up_sock}
        self.dirs = {
            "up": Direction("up", up_sock, _seeded(seed, "up")),
            "down": Direction("down", site_sock, _seeded(seed, "down")),
        }
        self._by_fd = {self._rx[n].fileno(): d for n, d in self.dirs.items()}
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(control))
        os.chmod(control, 0o600)
        self.listener.listen(8)
        self.listener.setblocking(False)

    # ------------------------------------------------------------- frames

    def _release_due(self, now: float) -> float | None:
        waits = [w for d in self.dirs.values() if (w := d.release_due(now)) is not None]
        return min(waits) if waits else None

    def _drain(self, d: Direction) -> None:
        rx = self._rx[d.name]
        now = time.monotonic()
        for _ in range(_BATCH):
            try:
                if self._filter_outgoing:
                    frame, addr = rx.recvfrom(_RX_BYTES)
                    if addr[2] == _PACKET_OUTGOING:
                        continue
                else:
                    frame = rx.recv(_RX_BYTES)
            except BlockingIOError:
                return
            except OSError:
                # ENETDOWN once when the device goes down; the socket works again once up.
                return
            d.take(frame, now)

    # ------------------------------------------------------------- control

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request (also what the tests of this module call directly)."""
        cmd = req.get("cmd")
        if cmd == "set":
            direction = req.get("direction", "up")
            if direction not in (*DIRECTIONS, "both"):
                raise ValueError("direction must be up, down or both")
            imp = Impairment.from_request(req)
            seed = req.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError("seed must be an integer")
            for name in DIRECTIONS if direction == "both" else (direction,):
                d = self.dirs[name]
                d.imp = Impairment(**asdict(imp))
                if seed is not None:
                    d.rng = _seeded(seed, name)
        elif cmd == "clear":
            for d in self.dirs.values():
                d.imp = Impairment()
        elif cmd != "get":
            raise ValueError(f"unknown cmd {cmd!r}: set, clear or get")
        return {
            "ok": True,
            "settings": {n: asdict(d.imp) for n, d in self.dirs.items()},
            "stats": {
                n: {**asdict(d.counters), "queued": len(d.queue)} for n, d in self.dirs.items()
            },
        }

    def _serve_control(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                line = conn.makefile("rb").readline(65536)
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object")
                    resp = self.handle(req)
                except ValueError as e:
                    resp = {"ok": False, "error": str(e)}
                conn.sendall(json.dumps(resp).encode() + b"\n")
            except OSError:
                pass

    # ------------------------------------------------------------- loop

    def run(self) -> None:
        ep = select.epoll()
        for fd in self._by_fd:
            ep.register(fd, select.EPOLLIN)
        ep.register(self.listener.fileno(), select.EPOLLIN)
        lfd = self.listener.fileno()
        timeout: float | None = None
        try:
            while True:
                events = ep.poll(-1 if timeout is None else timeout)
                for fd, _ in events:
                    if fd == lfd:
                        self._serve_control()
                    else:
                        self._drain(self._by_fd[fd])
                timeout = self._release_due(time.monotonic())
        finally:
            ep.close()

    def close(self) -> None:
        for rx in self._rx.values():
            rx.close()
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()


# ----------------------------------------------------------------- the lab's side


def request(control: Path, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the element listening on control; its answer, or ImpairError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(control))
            s.sendall(json.dumps(req).encode() + b"\n")
            line = s.makefile("rb").readline(1 << 20)
    except OSError as e:
        raise ImpairError(f"impairment element at {control}: {e}") from e
    try:
        resp = json.loads(line)
    except json.JSONDecodeError as e:
        raise ImpairError(f"impairment element at {control}: no answer ({line!r})") from e
    if not resp.get("ok"):
        raise ImpairError(f"impairment element at {control}: {resp.get('error')}")
    return resp


@dataclass
class ImpairElement:
    """The lab's handle on one running element: its namespace, control socket and process."""

    ns: str
    control: Path
    daemon: Daemon | None = None
    # Not "up": iproute2 reads it as a keyword where a device name may stand.
    site_dev: str = "site"
    up_dev: str = "rtr"

    def set(
        self,
        direction: str = "up",
        loss: float = 0.0,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        jitter_dist: str = "uniform",
        duplicate: float = 0.0,
        reorder: float = 0.0,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Replace the setting of `direction` (up, down or both); returns settings and stats."""
        req: dict[str, Any] = {
            "cmd": "set",
            "direction": direction,
            "loss": loss,
            "delay_ms": delay_ms,
            "jitter_ms": jitter_ms,
            "jitter_dist": jitter_dist,
            "duplicate": duplicate,
            "reorder": reorder,
        }
        if seed is not None:
            req["seed"] = seed
        return request(self.control, req)

    def clear(self) -> dict[str, Any]:
        return request(self.control, {"cmd": "clear"})

    def stats(self) -> dict[str, Any]:
        return request(self.control, {"cmd": "get"})["stats"]

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.alive()


def prepare_namespace(ns: str) -> None:
    """The element's namespace holds two addressless devices: no IPv6 either, so its kernel
    adds nothing of its own (router solicitations, DAD) to the segment it sits in."""
    netns.sysctl(ns, "net.ipv6.conf.all.disable_ipv6", 1)
    netns.sysctl(ns, "net.ipv6.conf.default.disable_ipv6", 1)


# ----------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdwan.lab.impair", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--site-dev", required=True, help="device toward the site (frames go up)")
    ap.add_argument("--up-dev", required=True, help="device toward the router (frames go down)")
    ap.add_argument("--control", required=True, type=Path, help="unix socket for settings")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    def _term(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    el = Element(args.site_dev, args.up_dev, args.control, args.seed)
    print(
        f"impair: {args.site_dev} <-> {args.up_dev}, control {args.control}, seed {args.seed}",
        flush=True,
    )
    try:
        el.run()
    except KeyboardInterrupt:
        pass
    finally:
        el.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
