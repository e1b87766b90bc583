"""The birthday approach of the mesh (docs/mesh.md, "Birthday punching"): its numbers, and the
extra UDP sockets the side behind a port-randomising NAT opens.

A NAT that draws a random public port for every new destination cannot be punched with the port
window: nobody can know the port it will use toward the peer. So the randomising (*hard*) side
opens `sockets` extra sockets and sends one probe from each toward the other (*easy*) side's
public endpoint: that opens `sockets` mappings in its NAT, at ports nobody knows. The easy side
sends `probes` probes to distinct random ports of the hard side's public address: each one that
hits one of those mappings gets through (the hard NAT takes it for the answer to that socket's
probe), and the easy side's own NAT lets the answer back in (the easy side sent to that very
address and port). With m mappings among the n ports the NAT draws from and k probes, the
chance that none hits is C(n - m, k) / C(n, k), about exp(-m k / n): 256 sockets and 1024
probes over Linux's 64512 ports (1024-65535) find a port 98.3 % of the time, and a second
punch after a miss brings that to 99.97 %.

Mesh (mesh.py) drives all of it; this module holds the arithmetic and `LinkSockets`, the I/O of
the extra sockets. Those are read here, on socketd's event loop, not by the fast path: the fast
path holds at most 32 sockets, each with a thread of its own, while a punch needs hundreds of
sockets for a few seconds that each receive at most a probe or two. Only the socket a probe got
through is handed to the fast path, as a link of its own, and the tunnel runs over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
from collections.abc import Callable, Sequence

from sdwan.site.config import Link
from sdwan.site.links import LinkError, open_link_socket

log = logging.getLogger("sdwan.site.birthday")

Addr = tuple[str, int]

# Where NATs draw public ports from: Linux's NAT (nftables/iptables masquerade, the lab's
# "random" router) uses 1024-65535 for a source port of 1024 or above; most home routers and
# carrier NATs stay within it as well.
NAT_PORTS = (1024, 65535)
READ_BURST = 64  # datagrams taken from one extra socket per wake-up


def miss_chance(sockets: int, probes: int, space: int = NAT_PORTS[1] - NAT_PORTS[0] + 1) -> float:
    """The chance that `probes` distinct random ports of `space` miss all `sockets` mappings
    (hypergeometric: C(space - sockets, probes) / C(space, probes))."""
    if sockets <= 0 or probes <= 0:
        return 1.0
    if sockets + probes > space:
        return 0.0
    # In logarithms: the binomials of 64512 are far beyond a float.
    return math.exp(
        math.lgamma(space - sockets + 1) - math.lgamma(space - sockets - probes + 1)
        - math.lgamma(space + 1) + math.lgamma(space - probes + 1)
    )


def random_ports(count: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """count distinct ports of lo..hi in random order (all of them when count is larger)."""
    return rng.sample(range(lo, hi + 1), min(count, hi - lo + 1))


class LinkSockets:
    """Extra UDP sockets on a link's device, read on the running asyncio loop.

    `open` binds one like the link's own socket (same device, so it leaves through the same
    NAT), `watch` hands every datagram it receives to a callback, `release` stops reading it
    (before the fast path takes it over), `close` releases and closes it."""

    def open(self, link: Link, port: int) -> socket.socket:
        """A socket bound to `port` on the link's device; raises LinkError."""
        return open_link_socket(0, link, port).sock

    def open_many(
        self, link: Link, ports: Sequence[int], count: int
    ) -> tuple[list[socket.socket], str | None]:
        """Up to count sockets on the first ports of `ports` that can be bound (a port in use
        is skipped); the sockets and, when fewer were opened, why the last one failed."""
        out: list[socket.socket] = []
        why: str | None = None
        for port in ports:
            if len(out) == count:
                break
            try:
                out.append(self.open(link, port))
            except LinkError as e:
                why = str(e)
                if "cannot bind" not in why:
                    break  # the device is gone: no other port will do better
            except OSError as e:  # out of file descriptors, say
                why = f"link {link.name}: cannot open a UDP socket: {e.strerror}"
                break
        return out, (why if len(out) < count else None)

    def watch(self, sock: socket.socket, on_datagram: Callable[[Addr, bytes], None]) -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read, sock, on_datagram)

    def _read(self, sock: socket.socket, on_datagram: Callable[[Addr, bytes], None]) -> None:
        for _ in range(READ_BURST):
            if sock.fileno() < 0:
                return  # the callback closed it (the punch took another socket)
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("extra socket %s: %s", sock.getsockname(), e)
                return
            try:
                on_datagram(addr[:2], data)
            except Exception:
                log.exception("extra socket datagram handler failed")

    def send(self, sock: socket.socket, addr: Addr, data: bytes) -> None:
        try:
            sock.sendto(data, addr)
        except OSError as e:
            log.debug("send to %s:%d failed: %s", addr[0], addr[1], e)

    def release(self, sock: socket.socket) -> None:
        if sock.fileno() < 0:
            return
        # Without a running loop (shutting down) nothing reads it anyway.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().remove_reader(sock.fileno())

    def close(self, sock: socket.socket) -> None:
        self.release(sock)
        sock.close()
