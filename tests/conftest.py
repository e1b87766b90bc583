"""Test order for parallel runs (`make test` runs pytest with two workers, `--dist
loadgroup`): the QEMU system tests take minutes each, so they are handed out first, longest
first, and the short tests fill the other worker around them. Order does not change what a
test checks; each one still sets up and tears down everything it uses."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent

# The slowest files first (minutes each under TCG); anything not listed follows in its group.
_LONG_FIRST = (
    "system/test_update_vm.py",
    "system/test_persistence.py",
    "system/test_watchdog_vm.py",
    "system/test_two_sites.py",
    "system/test_image.py",
    "system/test_panel_vm.py",
    "lab/test_bench.py",
    "system/test_bench_boot.py",
    "system/test_datapart.py",
)
_GROUPS = ("system", "lab", "native", "unit")


def _rank(item: pytest.Item) -> tuple[int, int]:
    rel = Path(str(item.fspath)).resolve().relative_to(HERE).as_posix()
    first = _LONG_FIRST.index(rel) if rel in _LONG_FIRST else len(_LONG_FIRST)
    group = rel.split("/", 1)[0]
    return first, _GROUPS.index(group) if group in _GROUPS else len(_GROUPS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a file, the file's own order
