"""The image's commit deadline (board/common/rootfs/usr/libexec/sdwan/commit-deadline), run
with /bin/sh on the real bootenv over a grubenv in a folder: a slot GRUB booted on trial
(sdwan.trial= on its command line) is rebooted at the deadline socketd published (else that
of socketd.toml), with its count written for the rollback event, also when bootenv cannot
read grubenv or cannot run at all; a committed slot and a slot committed in time are never
rebooted. A committed slot's count of boots in a row that did not stay up (GRUB's X_LOOPS) is
cleared once the box has been up for the deadline, or at once on a box without a
configuration."""

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
        self.set_cmdline(trial=1)
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
                    "SDWAN_DEADLINE_SETTING": str(d / "data" / "commit-deadline-s"),
                    "SDWAN_CMDLINE": str(d / "cmdline"), "SDWAN_UPTIME": str(d / "uptime"),
                    "SDWAN_REBOOT": str(reboot), "SDWAN_DEADLINE_POLL_S": "0.2",
                    "SDWAN_FORCE_AFTER_S": "0", "SDWAN_RAUC_CONF": str(conf),
                    "SDWAN_CONSOLE": str(self.console)}

    def set_cmdline(self, trial: int | None) -> None:
        words = "console=ttyS0 rauc.slot=B sdwan.root=root-b"
        (self.d / "cmdline").write_text(words + (f" sdwan.trial={trial}" if trial else "") + "\n")

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
    assert ("slot B is on trial (boot 1): it is rebooted 45 s after boot unless socketd marks"
            " it good before") in said, said
    assert "slot B not committed 45 s after boot (deadline 1 in a row): rebooting" in said
    # a clean reboot, then a forced one should the clean one never come
    assert box.rebooted() == ["reboot ", "reboot -f"]
    doc = json.loads(box.state.read_text())
    assert {k: doc[k] for k in ("slot", "deadline_s", "uptime_s", "trial", "reboots")} == {
        "slot": "B", "deadline_s": 45, "uptime_s": 1000, "trial": 1, "reboots": 1}
    assert abs(doc["at"] - time.time()) < 60
    box.set_cmdline(trial=2)
    box.run()
    assert json.loads(box.state.read_text())["reboots"] == 2
    # a new trial of the slot counts from 1 again, whatever an old file says
    box.set_cmdline(trial=1)
    box.run()
    assert json.loads(box.state.read_text())["reboots"] == 1


def test_a_committed_slot_is_left_alone(tmp_path: Path) -> None:
    box = Box(tmp_path, {**ON_TRIAL, "B_COMMITTED": "1"})
    assert box.run() == ""
    # GRUB booted it committed (no sdwan.trial=): never rebooted, even without bootenv
    box.set_cmdline(trial=None)
    box.env["SDWAN_BOOTENV"] = "/nonexistent"
    said = box.run()
    assert said.startswith("commit-deadline: the boot count of slot B was not cleared:"), said
    assert box.rebooted() == [] and not box.state.exists()


def test_a_committed_slot_that_stayed_up_has_its_boot_count_cleared(tmp_path: Path) -> None:
    committed = {**ON_TRIAL, "B_TRY": "0", "B_COMMITTED": "1", "B_LOOPS": "3"}
    box = Box(tmp_path, committed, uptime=44)
    box.set_cmdline(trial=None)
    proc = subprocess.Popen(["/bin/sh", str(SCRIPT)], env=box.env)
    try:
        time.sleep(0.5)
        # up 44 s of a 45 s deadline: not yet
        assert proc.poll() is None, "it cleared the count before the deadline"
        assert box.paths.grubenv.read_bytes().count(b"B_LOOPS=3\n") == 1
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert "bootenv: slot B stayed up after 2 boots in a row that did not" in \
        box.console.read_text()
    assert b"B_LOOPS=0\n" in box.paths.grubenv.read_bytes()
    assert box.rebooted() == []
    # a box without a configuration: no socketd, no watchdog armed; only a kernel that
    # panics is left to loop: cleared once up 60 s, not the deadline
    box.paths.grubenv.write_bytes(box.paths.grubenv.read_bytes().replace(b"B_LOOPS=0",
                                                                         b"B_LOOPS=1"))
    (tmp_path / "socketd.toml").unlink()
    box.set_uptime(58)
    start = time.monotonic()
    assert box.run() == box.console.read_text()  # nothing more said for the usual count
    assert 1.5 < time.monotonic() - start < 15
    assert b"B_LOOPS=0\n" in box.paths.grubenv.read_bytes()


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


def test_a_trial_slot_that_cannot_read_grubenv_is_rebooted(tmp_path: Path) -> None:
    """GRUB counted the boot: rebooting is what moves it on, whatever the slot can read."""
    box = Box(tmp_path, ON_TRIAL)
    for p in (box.paths.grubenv, box.paths.copy):
        p.write_bytes(b"")
    said = box.run()
    assert ("slot B is on trial (boot 1) and bootenv cannot tell more (unknown: no valid"
            " grubenv") in said, said
    assert box.rebooted()[0] == "reboot "


def test_a_slot_where_bootenv_cannot_run_is_rebooted(tmp_path: Path) -> None:
    box = Box(tmp_path, ON_TRIAL)
    broken = tmp_path / "broken-bootenv"
    broken.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\nexit 1\n")
    broken.chmod(0o755)
    box.env["SDWAN_BOOTENV"] = str(broken)
    said = box.run()
    assert "bootenv cannot tell more (Traceback" in said, said
    assert box.rebooted()[0] == "reboot "


@pytest.mark.parametrize("config", ["", "[update]\ncommit_deadline_s = 5\n",
                                    "[update]\ncommit_deadline_s = \"soon\"\n",
                                    "[update]\ncommit_deadline_s = 1_200\n",
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


def test_socketds_own_reading_of_the_deadline_comes_first(tmp_path: Path) -> None:
    """socketd writes commit_deadline_s as it read it (TOML the script's awk cannot follow,
    such as `1_200`); the script takes that before socketd.toml."""
    box = Box(tmp_path, ON_TRIAL, uptime=1300, config="[update]\ncommit_deadline_s = 1_200\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "commit-deadline-s").write_text("1200\n")
    assert "rebooted 1200 s after boot" in box.run()
    (tmp_path / "data" / "commit-deadline-s").write_text("junk\n")
    assert "rebooted 900 s after boot" in box.run()
