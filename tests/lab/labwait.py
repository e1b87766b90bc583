"""Waiting, bounded, for what a user would see in the lab (shared by the lab tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

TIMEOUT_S = 30


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
