"""What the kernel says of a network device, in this network namespace: whether it can carry
traffic (and why not), and its IPv4 address. Read with ioctls, so nothing here needs netlink
or a worker. Used by the link manager (site/links.py) for each WAN link's state and address.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

__all__ = ["iface_ipv4", "interface_fault"]

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
