"""Waiting, bounded, for what a user would see in the lab, and the small UDP server that tells
which source address and port a datagram arrived from (shared by the lab tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

TIMEOUT_S = 30

# `python -c UDP_SOURCE_SERVER PORT`: prints the first datagram's source as "ip port" and exits.
UDP_SOURCE_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(20)
data, addr = s.recvfrom(2048)
print(addr[0], addr[1], flush=True)
"""


def wait_for(what: str, probe: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """Poll probe until it returns something true; fail the test saying what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout} s (last: {last!r})")
