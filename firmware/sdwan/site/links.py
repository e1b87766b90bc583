"""WAN links: the UDP socket of each link, bound to the link's device.

One socket per link carries everything of that link (tunnel data, DTLS, and later
STUN and probes), so the NAT mapping a peer or the PoP sees is the same for all
of it. The socket is created here and handed to the fast path, which keeps its
own duplicate of the descriptor; link health comes with a later issue.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sdwan.site.config import Link

# Large buffers absorb bursts while the fast path's thread is descheduled; the
# kernel caps them at net.core.[rw]mem_max unless we are privileged (we are).
_SOCKET_BUFFER = 4 * 1024 * 1024
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def size_buffers(sock: socket.socket) -> None:
    """Give a tunnel socket buffers big enough for bursts (see _SOCKET_BUFFER)."""
    for opt, fallback in (
        (_SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (_SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, fallback, _SOCKET_BUFFER)


class LinkError(Exception):
    """A link's socket could not be opened; the message says which link and why."""


@dataclass(frozen=True)
class LinkSocket:
    link_id: int
    link: Link
    sock: socket.socket


def open_link_socket(link_id: int, link: Link) -> LinkSocket:
    """Open the UDP socket of `link`, bound to its device and port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.interface.encode())
        except OSError as e:
            raise LinkError(
                f"link {link.name}: cannot bind to device {link.interface!r}: {e.strerror}"
            ) from e
        size_buffers(sock)
        try:
            sock.bind(("0.0.0.0", link.port))
        except OSError as e:
            raise LinkError(
                f"link {link.name}: cannot bind UDP port {link.port}: {e.strerror}"
            ) from e
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return LinkSocket(link_id, link, sock)
