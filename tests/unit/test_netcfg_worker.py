"""The netcfg worker process (common/netcfg.py): a real child process with pyroute2, started
ahead of its plan as socketd starts it, and the errors its parent sees."""

from __future__ import annotations

import pytest

from sdwan.common.netcfg import NetcfgError, Plan, Worker, apply_in_worker


def test_a_worker_started_ahead_applies_its_plan_and_says_what_failed() -> None:
    w = Worker()
    proc = w.proc
    assert proc is not None and proc.poll() is None  # waiting for its plan
    with pytest.raises(NetcfgError, match="tunnel device sdwan-none0 does not exist"):
        w.apply(Plan(tun="sdwan-none0", mtu=1400))
    assert proc.poll() is not None
    # Used once: a second plan gets a fresh worker, with the same error.
    with pytest.raises(NetcfgError, match="sdwan-none0"):
        w.apply(Plan(tun="sdwan-none0", mtu=1400))
    with pytest.raises(NetcfgError, match="sdwan-none0"):
        apply_in_worker(Plan(tun="sdwan-none0", mtu=1400))


def test_a_worker_never_used_is_ended() -> None:
    w = Worker()
    proc = w.proc
    assert proc is not None
    w.close()
    assert proc.poll() is not None and w.proc is None
    w.close()  # twice is harmless
