"""Fixtures for lab tests: a function-scoped `Lab` that always cleans up, a time bound per
test, and the `lab` marker on everything in this folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdwan.lab.topology import Lab, cleanup_stale

LAB_TEST_TIMEOUT_S = 180
_TOOLS = ("ip", "nft", "ping", "iperf3", "ss", "timeout")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(LAB_TEST_TIMEOUT_S))


def _missing_tools() -> list[str]:
    return [t for t in _TOOLS if shutil.which(t) is None]


@pytest.fixture(scope="session", autouse=True)
def _stale_labs() -> None:
    # Namespaces of a lab whose owner was killed; labs of live processes are kept.
    if os.geteuid() == 0 and not _missing_tools():
        cleanup_stale()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces, veth, nftables)")
    missing = _missing_tools()
    if missing:
        # Skipping here would hide a broken CI setup: .ci/run installs these.
        pytest.fail(f"lab tools not installed: {', '.join(missing)}", pytrace=False)
    with Lab(tmp_path / "lab") as the_lab:
        yield the_lab
