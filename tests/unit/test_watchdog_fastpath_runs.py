"""Runs that end with the fast path failed are counted across boots in the data directory
(appliance/watchdog.py, Guard.fastpath_failed): the first ones may reset the box (the
watchdog held), after FASTPATH_FAIL_RUNS in a row the next stays up, and a run whose fast path
works for a while starts the count over. Real data directories and a file as the watchdog."""

from __future__ import annotations

import json
from pathlib import Path

from sdwan.appliance.watchdog import (
    FASTPATH_FAIL_RUNS,
    FASTPATH_FILE,
    Guard,
    fastpath_failed_runs,
)
from sdwan.site.config import Appliance


def _guard(tmp_path: Path) -> Guard:
    wd = tmp_path / "wd"
    wd.touch()
    g = Guard(Appliance(watchdog=wd, watchdog_timeout_s=3, watchdog_startup_s=3),
              tmp_path / "data")
    g.start()
    return g


def _run_that_fails(tmp_path: Path) -> tuple[bool, bool]:
    """One socketd run whose fast path fails: (may reset or restart for it, watchdog held)."""
    g = _guard(tmp_path)
    try:
        again = g.fastpath_failed("fast path could not be restarted (the TUN thread: ENODEV)")
        held = again and g.hold("the fast path failed")
        return again, held
    finally:
        g.close()  # a reset: no end() recorded


def test_a_fault_that_comes_back_every_run_stops_resetting_the_box(tmp_path: Path) -> None:
    assert FASTPATH_FAIL_RUNS == 3
    outcomes = [_run_that_fails(tmp_path) for _ in range(5)]
    assert outcomes == [(True, True)] * 3 + [(False, False)] * 2
    data = tmp_path / "data"
    assert fastpath_failed_runs(data) == 5
    saved = json.loads((data / FASTPATH_FILE).read_text())
    assert saved["why"].startswith("fast path could not be restarted")
    g = _guard(tmp_path)
    try:
        assert g.status()["fastpath_failed_runs"] == 5
        assert g.watchdog is not None and g.watchdog.held is None
    finally:
        g.close()


def test_a_run_that_stays_healthy_starts_the_count_over(tmp_path: Path) -> None:
    for _ in range(2):
        _run_that_fails(tmp_path)
    g = _guard(tmp_path)
    try:
        assert g.fastpath_failed_before == 2
        g.fastpath_healthy()
        assert g.fastpath_failed_before == 0
    finally:
        g.close()
    assert not (tmp_path / "data" / FASTPATH_FILE).exists()
    # The next fault may reset the box again, three times.
    assert [_run_that_fails(tmp_path)[1] for _ in range(4)] == [True, True, True, False]


def test_a_run_whose_fast_path_failed_is_not_healthy(tmp_path: Path) -> None:
    _run_that_fails(tmp_path)
    g = _guard(tmp_path)
    try:
        g.fastpath_failed("again")
        g.fastpath_healthy()  # too late: this run failed too
    finally:
        g.close()
    assert fastpath_failed_runs(tmp_path / "data") == 2


def test_an_unreadable_count_is_none(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / FASTPATH_FILE).write_text("{not json")
    assert fastpath_failed_runs(data) == 0
    (data / FASTPATH_FILE).write_text('{"runs": true}')
    assert fastpath_failed_runs(data) == 0
