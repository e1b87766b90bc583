"""The image's commit deadline (board/common/rootfs/usr/libexec/sdwan/commit-deadline), run
with /bin/sh on the real bootenv over a grubenv in a folder: a slot on trial is rebooted at
the deadline of socketd.toml, with its count written for the rollback event; a committed
slot, a slot committed in time and an unreadable grubenv are never rebooted; a slot where
bootenv cannot run at all is."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sdwan.lab.bootlab import make_boot_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "board/common/rootfs/usr/libexec/sdwan/commit-deadline"
ON_TRIAL = {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "A_COMMITTED": "1",
            "B_OK": "1", "B_TRY": "1", "B_COMMITTED": "0"}


class Box:
    def __init__(self, d: Path, values: dict[str, str], uptime: int = 1000,
                 config: str = "[update]\ncommit_deadline_s = 45\n") -> None:
        self.d = d
        conf = d / "system.conf"
        conf.write_text("[system]\ncompatible=t\nbootloader=custom\n"
                        "[slot.rootfs.0]\ndevice=/dev/null\nbootname=A\n"
                        "[slot.rootfs.1]\ndevice=/dev/null\nbootname=B\n")
        self.backend, self.paths = make_boot_env(d, conf, values)
        (d / "cmdline").write_text("console=ttyS0 rauc.slot=B sdwan.root=root-b\n")
        self.set_uptime(uptime)
        (d / "socketd.toml").write_text(config)
        self.reboots = d / "reboots"
        reboot = d / "reboot"
        reboot.write_text(f'#!/bin/sh\necho "reboot $*" >> {self.reboots}\n')
        reboot.chmod(0o755)
        self.state = d / "data" / "commit-deadline.json"
        self.console = d / "console"
        self.env = {**os.environ, "SDWAN_CONFIG": str(d / "socketd.toml"),
                    "SDWAN_DEADLINE_STATE": str(self.state), "SDWAN_BOOTENV": str(self.backend),
                    "SDWAN_CMDLINE": str(d / "cmdline"), "SDWAN_UPTIME": str(d / "uptime"),
                    "SDWAN_REBOOT": str(reboot), "SDWAN_DEADLINE_POLL_S": "0.2",
                    "SDWAN_FORCE_AFTER_S": "0", "SDWAN_RAUC_CONF": str(conf),
                    "SDWAN_CONSOLE": str(self.console)}

    def set_uptime(self, s: int) -> None:
        (self.d / "uptime").write_text(f"{s}.25 12.00\n")

    def run(self, timeout: float = 30) -> str:
        subprocess.run(["/bin/sh", str(SCRIPT)], env=self.env, timeout=timeout, check=True)
        return self.console.read_text() if self.console.exists() else ""

    def rebooted(self) -> list[str]:
        return self.reboots.read_text().splitlines() if self.reboots.exists() else []


def test_a_slot_on_trial_is_rebooted_at_the_deadline_and_counted(tmp_path: Path) -> None:
    box = Box(tmp_path, ON_TRIAL)
    said = box.run()
    assert "slot B is not committed yet: it is rebooted 45 s after boot" in said, said
    assert "slot B not committed 45 s after boot (deadline 1 in a row): rebooting" in said
    # a clean reboot, then a forced one should the clean one never come
    assert box.rebooted() == ["reboot ", "reboot -f"]
    doc = json.loads(box.state.read_text())
    assert {k: doc[k] for k in ("slot", "deadline_s", "uptime_s", "reboots")} == {
        "slot": "B", "deadline_s": 45, "uptime_s": 1000, "reboots": 1}
    assert abs(doc["at"] - time.time()) < 60
    box.run()
    assert json.loads(box.state.read_text())["reboots"] == 2


def test_a_committed_slot_is_left_alone(tmp_path: Path) -> None:
    box = Box(tmp_path, {**ON_TRIAL, "B_COMMITTED": "1"})
    assert box.run() == ""
    assert box.rebooted() == [] and not box.state.exists()


def test_a_slot_committed_before_the_deadline_is_not_rebooted(tmp_path: Path) -> None:
    box = Box(tmp_path, ON_TRIAL, uptime=10)
    proc = subprocess.Popen(["/bin/sh", str(SCRIPT)], env=box.env)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, "it did not wait for the deadline"
        subprocess.run([str(box.backend), "set-state", "B", "good"], check=True, timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert "slot B committed: no reboot" in box.console.read_text()
    assert box.rebooted() == []


def test_no_deadline_when_grubenv_cannot_be_read(tmp_path: Path) -> None:
    box = Box(tmp_path, ON_TRIAL)
    for p in (box.paths.grubenv, box.paths.copy):
        p.write_bytes(b"")
    said = box.run()
    assert "cannot tell whether slot B is committed (unknown: no valid grubenv" in said, said
    assert box.rebooted() == []


def test_a_slot_where_bootenv_cannot_run_is_rebooted(tmp_path: Path) -> None:
    box = Box(tmp_path, ON_TRIAL)
    broken = tmp_path / "broken-bootenv"
    broken.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\nexit 1\n")
    broken.chmod(0o755)
    box.env["SDWAN_BOOTENV"] = str(broken)
    said = box.run()
    assert "bootenv does not run in slot B (Traceback" in said, said
    assert box.rebooted()[0] == "reboot "


@pytest.mark.parametrize("config", ["", "[update]\ncommit_deadline_s = 5\n",
                                    "[update]\ncommit_deadline_s = \"soon\"\n",
                                    "[other]\ncommit_deadline_s = 45\n"])
def test_the_default_deadline_unless_configured(tmp_path: Path, config: str) -> None:
    box = Box(tmp_path, ON_TRIAL, uptime=900, config=config)
    said = box.run()
    assert "rebooted 900 s after boot" in said, said
    assert json.loads(box.state.read_text())["deadline_s"] == 900


def test_nothing_without_rauc_or_a_slot(tmp_path: Path) -> None:
    box = Box(tmp_path, ON_TRIAL)
    (tmp_path / "cmdline").write_text("console=ttyS0\n")
    assert box.run() == "" and box.rebooted() == []
    box.env["SDWAN_RAUC_CONF"] = str(tmp_path / "absent.conf")
    (tmp_path / "cmdline").write_text("rauc.slot=B\n")
    assert box.run() == "" and box.rebooted() == []
