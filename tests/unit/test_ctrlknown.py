"""The known control sources declared to the fast path (common/ctrlknown.py) and the control
lanes' status line (common/ctrllanes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sdwan.bindings.fastpath import FastPath, FastPathConfig, Verdict
from sdwan.common.ctrlknown import KnownSources
from sdwan.common.ctrllanes import describe_lanes

HELLO = b"\x16\xfe\xfd" + bytes(40)


@pytest.fixture
def fp() -> Iterator[FastPath]:
    cfg = FastPathConfig.default()
    cfg.ctrl_source_burst = 1
    f = FastPath(cfg)
    try:
        yield f
    finally:
        f.close()


def passes(fp: FastPath, src: tuple[str, int], n: int) -> int:
    return sum(fp.process_inbound(1, src, HELLO).verdict == Verdict.CONTROL for _ in range(n))


def test_declared_once_per_change_and_known_from_then_on(fp: FastPath) -> None:
    addrs: list[tuple[str, int]] = [("203.0.113.10", 4800)]
    known = KnownSources(fp)
    known.add(lambda: addrs)
    known.add(lambda: [None, ("192.0.2.7", 0)])  # type: ignore[list-item]
    assert known.refresh() is True
    assert known.refresh() is False and known.updates == 1
    assert fp.ctrl_stats().declared == 2
    assert passes(fp, ("203.0.113.10", 4800), 10) == 10
    assert passes(fp, ("192.0.2.7", 1234), 10) == 10
    addrs.clear()
    assert known.refresh() is True
    assert passes(fp, ("203.0.113.10", 4800), 10) == 1  # its bucket's burst only


def test_a_failing_provider_costs_only_its_own_addresses(fp: FastPath) -> None:
    known = KnownSources(fp)

    def broken() -> list[tuple[str, int]]:
        raise RuntimeError("boom")

    known.add(broken)
    known.add(lambda: [("203.0.113.10", 4800)])
    assert known.refresh() is True
    assert fp.ctrl_stats().declared == 1


def test_a_bad_address_costs_only_itself(fp: FastPath) -> None:
    known = KnownSources(fp)
    known.add(lambda: [("203.0.113.10", 4800), ("pop.example", 4800), ("192.0.2.1", 70000)])
    known.add(lambda: [(1, 2), "x", ("192.0.2.7", 0)])  # type: ignore[list-item]
    assert known.refresh() is True
    assert fp.ctrl_stats().declared == 2
    assert passes(fp, ("192.0.2.7", 1234), 10) == 10


def test_lanes_line() -> None:
    line = describe_lanes(
        {
            "known_len": 0,
            "known_cap": 1024,
            "unknown_len": 3,
            "unknown_cap": 256,
            "known_queued": 5,
            "unknown_queued": 9,
            "known_full": 0,
            "unknown_full": 2,
            "rate_limited": 7,
            "rate_limited_source": 4,
            "rate_limited_global": 3,
            "sources": 2,
            "sources_cap": 4096,
            "evictions": 0,
            "known_addrs": 4,
        }
    )
    assert "known 0/1024" in line and "unknown 3/256" in line
    assert "rate-limited 7 (per source 4, all unknown 3)" in line
    assert describe_lanes(None) == "-"
