"""Fixtures of the system tests that boot the appliance image in QEMU.

`appliance_image(board)` returns build/images/<board>.img, building it first when it is
missing (CI builds it with `make images` before the tests); a test is skipped only when
QEMU or the image tools are not installed. `vms` starts VMs that are always powered off
and removed, whatever the test does. `site_files` makes a site configuration with its
certificates, handed to a VM through QEMU's fw_cfg (the image copies them into /data).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdwan.lab.topology import Lab, cleanup_stale
from sdwan.lab.vm import VM, VMOptions, board_config, image_path
from sdwan.pop.pki import main as pki_main

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 900


def _need_tools(board: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("system tests run as root (apt-installed QEMU, loop-free image build)")
    binary = board_config(board)["qemu"]["binary"]
    if shutil.which(binary) is None or shutil.which("qemu-img") is None:
        pytest.skip(f"{binary} / qemu-img not installed (run `make setup`)")
    for tool in ("mksquashfs", "mcopy", "mkfs.fat", "sfdisk"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed, the image cannot be built (run `make setup`)")


@pytest.fixture(scope="session")
def appliance_image() -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(board: str) -> Path:
        _need_tools(board)
        if board in built:
            return built[board]
        img = image_path(board)
        if not img.is_file():
            proc = subprocess.run([sys.executable, str(REPO / "board" / "mkimage.py"), board],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if proc.returncode != 0:
                pytest.fail(f"building the {board} image failed:\n{proc.stderr[-3000:]}")
        built[board] = img
        return img

    return get


@pytest.fixture
def vms() -> Iterator[Callable[..., VM]]:
    started: list[VM] = []

    def make(board: str, image: Path, **options: object) -> VM:
        vm = VM(board, image, VMOptions(**options))  # type: ignore[arg-type]
        started.append(vm)
        return vm

    yield make
    for vm in started:
        vm.stop()


SITE_CONFIG = """\
# A branch site for the system tests: one WAN link on the VM's first NIC.
[site]
id = {site_id}
name = "branch-{site_id}"

[pki]
ca = "pki/ca.pem"
cert = "pki/site-{site_id}.pem"
key = "pki/site-{site_id}.key"

[lan]
subnets = ["10.{site_id}.0.0/24"]

[[links]]
name = "wan1"
interface = "eth0"
port = 4800

[appliance]
watchdog = "{watchdog}"
"""


@pytest.fixture
def site_files(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """fw_cfg files (name under /data -> host file) for a site: config and certificates."""

    def make(site_id: int = 7, watchdog: str = "/dev/watchdog") -> dict[str, Path]:
        pki = tmp_path / "pki"
        assert pki_main(["init-ca", str(pki), "--account", "system-test"]) == 0
        assert pki_main(["issue", str(pki), "--site-id", str(site_id), "--out", str(pki)]) == 0
        cfg = tmp_path / "socketd.toml"
        cfg.write_text(SITE_CONFIG.format(site_id=site_id, watchdog=watchdog))
        tomllib.loads(cfg.read_text())
        files = {"socketd.toml": cfg}
        for name in ("ca.pem", f"site-{site_id}.pem", f"site-{site_id}.key"):
            files[f"pki/{name}"] = pki / name
        return files

    return make


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A lab: its CA and certificates for the VMs' configs, and namespaces for those tests
    that wire VMs to a PoP (left over ones from a killed run are removed first)."""
    cleanup_stale()
    with Lab(tmp_path / "lab") as the_lab:
        yield the_lab
