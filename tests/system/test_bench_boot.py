"""Smoke run of bench/boot inside `make test`: one boot of the x86_64 image that `make
images` has built for the system tests, timed to its end, with its JSON complete and sane.
Never an assertion on the figures themselves (bench/README.md, "Smoke runs")."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.timeout(720)]

REPO = Path(__file__).resolve().parents[2]
BOARD = "qemu-x86_64"


def test_boot_smoke(appliance_image: Callable[[str], Path], tmp_path: Path) -> None:
    img = appliance_image(BOARD)
    out = tmp_path / "boot.json"
    cp = subprocess.run(
        [sys.executable, str(REPO / "bench" / "boot"), "--runs", "1", "--boards", BOARD,
         "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert cp.returncode == 0, f"bench/boot exited with {cp.returncode}\n{cp.stderr[-3000:]}"
    res = json.loads(out.read_text())
    assert res["accel"] == "tcg" and res["memory_mib"] is None
    r = res[BOARD]
    assert set(r) == {"login_s", "socketd_s", "socketd_rss_mb", "image_mb", "memory_mib",
                      "runs"}, r
    assert r["memory_mib"] == tomllib.loads(
        (REPO / "board" / BOARD / "board.toml").read_text())["qemu"]["memory_mib"], r
    assert len(r["runs"]) == 1
    # Within bench/boot's own bound on each console line it waits for.
    assert 0 < r["login_s"] < 600 and 0 < r["socketd_s"] < 600, r
    assert r["socketd_rss_mb"] > 0, r
    assert r["image_mb"] == round(img.stat().st_size / 2**20, 1), r
    assert BOARD in cp.stdout, cp.stdout
