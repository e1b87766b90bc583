"""What the kernel says of a network device, in this network namespace: whether it can carry
traffic (and why not), and its IPv4 address, read with ioctls so that nothing here needs
netlink or a worker; a netlink socket that becomes readable when any device or address
changes (`link_events`), so that a pulled cable is seen at once; and the buffers of a tunnel's
UDP socket. Used by the link manager (site/links.py), socketd and popd.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

__all__ = ["drain", "iface_ipv4", "interface_fault", "link_events", "size_buffers"]

_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10

# Large buffers absorb bursts while the fast path's thread is descheduled; the
# kernel caps them at net.core.[rw]mem_max unless we are privileged (we are).
_SOCKET_BUFFER = 4 * 1024 * 1024
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

_SIOCGIFADDR = 0x8915
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_RUNNING = 0x40


def interface_fault(name: str) -> str | None:
    """Why interface `name` (in this network namespace) cannot carry traffic, or None if it can."""
    request = struct.pack("16sH22x", os.fsencode(name)[:15], 0)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            reply = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request)
    except OSError as e:
        if e.errno == errno.ENODEV:
            return "no such interface"
        return f"cannot read its flags: {e.strerror}"
    flags = struct.unpack_from("H", reply, 16)[0]
    if not flags & _IFF_UP:
        return "administratively down"
    if not flags & _IFF_RUNNING:
        return "no carrier"
    return None


def iface_ipv4(ifname: str) -> str | None:
    """The IPv4 address of a device, or None when it has none (or does not exist)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            request = struct.pack("256s", ifname.encode()[:15])
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


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


def link_events() -> socket.socket:
    """A non-blocking rtnetlink socket subscribed to device and IPv4 address changes. What
    arrives is only a wake-up: the state is read again with `interface_fault` and
    `iface_ipv4`, so nothing of the messages needs parsing (an overflowed socket, ENOBUFS,
    is a wake-up too)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                         socket.NETLINK_ROUTE)
    try:
        sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR))
    except OSError:
        sock.close()
        raise
    return sock


def drain(sock: socket.socket) -> int:
    """Read everything queued on a non-blocking socket; the number of reads that returned
    data or an error (ENOBUFS: messages were lost, which only means "look again")."""
    n = 0
    while n < 1024:
        try:
            sock.recv(65536)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                break
        n += 1
    return n
