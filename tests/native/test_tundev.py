"""socketd's TUN device: made with python-pytun, its offloads set by the fast path on attach
(site/tundev.py, fp_tun_attach). Real TUN devices (root, as the rest of this directory)."""

from __future__ import annotations

import os

import pytest

from sdwan.bindings.fastpath import FastPath
from sdwan.site.tundev import TunError, attach_tun


def _name(tag: str) -> str:
    return f"fpd{tag}{os.getpid() % 10000}"


def test_a_pytun_device_gets_the_offloads_fp_tun_open_gets() -> None:
    made, opened = FastPath(), FastPath()
    try:
        attach_tun(made, _name("a"))
        opened.tun_open(_name("b"))
        assert opened.tun_features != 0, "this kernel gives vnet headers to fp_tun_open"
        assert made.tun_features == opened.tun_features
        # The vnet header size was set on the device by the fast path, not left at pytun's.
        assert os.path.exists(f"/sys/class/net/{_name('a')}")
    finally:
        made.close()
        opened.close()
    # socketd closed its own descriptor at once: the fast path's duplicate kept it alive.
    assert not os.path.exists(f"/sys/class/net/{_name('a')}")


def test_a_bad_device_name_is_a_located_error() -> None:
    fp = FastPath()
    try:
        with pytest.raises(TunError, match="a/b"):
            attach_tun(fp, "a/b")
        assert fp.tun_features == 0
    finally:
        fp.close()


def test_a_socketpair_still_attaches_with_plain_packets() -> None:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    fp = FastPath()
    try:
        fp.tun_attach(b.fileno())
        assert fp.tun_features == 0
    finally:
        fp.close()
        a.close()
        b.close()
