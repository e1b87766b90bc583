"""The site's TUN device: created with python-pytun and handed to the fast path.

socketd makes the device itself (`IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`) so that its name,
flags and errors are the supervisor's business; the fast path takes a duplicate of the
descriptor (`fp_tun_attach`) and sets what only it knows how to use: the size of the vnet
header it parses and the checksum/TSO/USO offloads it implements (native/src/io.c,
`tun_offloads`). pytun has no call for those two ioctls, which is why they stay in C.
"""

from __future__ import annotations

import errno
import logging

import pytun

from sdwan.bindings.fastpath import FastPath

log = logging.getLogger("sdwan.site.tundev")

__all__ = ["TunError", "attach_tun"]


class TunError(Exception):
    """The TUN device cannot be created; the message says which and why."""


def attach_tun(fp: FastPath, name: str) -> None:
    """Create (or take over) TUN device `name` and give it to the fast path."""
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI
    try:
        dev = pytun.TunTapDevice(name=name, flags=flags | pytun.IFF_VNET_HDR)
    except pytun.Error as e:
        # An existing persistent device made without vnet headers refuses them: take it
        # as it is, with plain packets (the fast path reads what the device carries).
        if _errno_of(e) != errno.EINVAL:
            raise TunError(f"cannot open tunnel device {name}: {_describe(e)}") from e
        log.warning("%s: no vnet headers (an existing device?): packets one by one", name)
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e2:
            raise TunError(f"cannot open tunnel device {name}: {_describe(e2)}") from e2
    try:
        fp.tun_attach(dev.fileno())
    except OSError as e:
        raise TunError(f"tunnel device {name}: the fast path refused it: {e}") from e
    finally:
        # The fast path holds its own duplicate; the device lives as long as that.
        dev.close()


def _errno_of(e: pytun.Error) -> int | None:
    code = e.args[0] if e.args else None
    return code if isinstance(code, int) else None


def _describe(e: pytun.Error) -> str:
    if len(e.args) >= 2:
        return str(e.args[1])
    return str(e)
