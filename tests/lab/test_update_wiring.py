"""socketd's updater in a real socketd (docs/update.md): with `[update] system_conf` naming a
RAUC configuration (two loop devices as slots, a grubenv in which the booted slot A was
tried once and is not committed, RAUC's custom bootloader backend working on it), socketd
starts the private bus and `rauc service`, and marks A good once its own parts are healthy:
no PoP is configured, so after the grace time with the fast path forwarding and the control
socket up. `socketctl slots` and `status` show it; a stop leaves neither dbus-daemon nor
rauc behind. Without a system.conf, `slots` and `update` say there are no updates.

A lab host's kernel command line has no rauc.slot=: socketd runs in a mount namespace of its
own in which /proc/cmdline says rauc.slot=A, as the box's does."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from labwait import wait_for

from sdwan.appliance import bootenv
from sdwan.lab import netns
from sdwan.lab.bootlab import backend_conf, make_boot_env
from sdwan.lab.topology import Lab, Site
from sdwan.pop import pki

pytestmark = [pytest.mark.timeout(120), pytest.mark.xdist_group("loop-devices")]

# Run by the test in socketd's own mount namespace: the box's kernel command line, then
# socketd itself.
_WITH_CMDLINE = (
    "import os, subprocess, sys\n"
    "subprocess.run(['mount', '--bind', sys.argv[1], '/proc/cmdline'], check=True)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'sdwan.site.socketd', '--config',"
    " sys.argv[2]])\n"
)


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture
def slots(tmp_path: Path) -> Iterator[dict[str, str]]:
    for tool in ("rauc", "dbus-daemon", "losetup", "unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed (scripts/setup.sh installs it)", pytrace=False)
    devices: dict[str, str] = {}
    try:
        for name in ("A", "B"):
            backing = tmp_path / f"slot-{name}.img"
            with open(backing, "wb") as f:
                f.truncate(1024 * 1024)
            devices[name] = run("losetup", "--find", "--show", backing).strip()
        yield devices
    finally:
        for dev in devices.values():
            with contextlib.suppress(subprocess.CalledProcessError):
                run("losetup", "--detach", dev)


def rauc_files(d: Path, slots: dict[str, str]) -> tuple[Path, bootenv.Paths]:
    """system.conf and the grubenv its backend works on: A booted once, not committed."""
    conf = d / "system.conf"
    backend, boot = make_boot_env(d, conf, {
        "ORDER": "A B", "A_OK": "1", "A_TRY": "1", "A_COMMITTED": "0",
        "B_OK": "1", "B_TRY": "0", "B_COMMITTED": "0"})
    ca = pki.create_firmware_ca(d / "firmware", development=True)
    (d / "mnt").mkdir()
    conf.write_text(
        f"[system]\ncompatible=sdwan-test\nbootloader=custom\n"
        f"statusfile={d / 'rauc.status'}\nmountprefix={d / 'mnt'}\n\n"
        f"[keyring]\npath={ca.cert}\ncheck-purpose=codesign\n\n"
        + backend_conf(backend) + "\n"
        f"[slot.rootfs.0]\ndevice={slots['A']}\ntype=raw\nbootname=A\n\n"
        f"[slot.rootfs.1]\ndevice={slots['B']}\ntype=raw\nbootname=B\n")
    return conf, boot


def start_as_booted_from(lab: Lab, site: Site, bootname: str,
                         boot: bootenv.Paths | None = None) -> None:
    cmdline = site.dir / "cmdline"
    cmdline.write_text(f"console=ttyS0 rauc.slot={bootname} panic=5\n")
    with contextlib.suppress(FileNotFoundError):
        site.control_socket.unlink()
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
            _WITH_CMDLINE, str(cmdline), str(site.config)]
    env = lab.env()
    if boot is not None:  # where the updater reads GRUB's variables, as the backend does
        env.update(SDWAN_GRUBENV=str(boot.grubenv), SDWAN_BOARD=str(boot.board))
    site.socketd = d = lab.spawn(site.ns, argv, f"socketd-site{site.n}", env=env)
    ok = netns.wait_until(lambda: site.control_socket.exists() or not d.alive(), timeout=20)
    assert ok and d.alive(), d.log_tail()


def test_socketd_commits_its_slot_once_healthy(lab: Lab, slots: dict[str, str]) -> None:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    conf, boot = rauc_files(site.dir, slots)
    lab.write_site_config(site, extra_toml=(
        f'[update]\nsystem_conf = "{conf}"\ncommit_grace_s = 2\nreboot_command = "true"\n'))
    start_as_booted_from(lab, site, "A", boot)

    seen: list[dict] = []

    def committed() -> dict | None:
        st = lab.socketctl(site, "slots")
        seen[:] = [st]
        return st if st.get("commit", {}).get("state") == "committed" else None

    # A generous bound: on a loaded machine socketd, the bus and rauc service start slowly.
    try:
        st = wait_for("slot A committed", committed, timeout=90)
    except pytest.fail.Exception:
        pytest.fail(f"slot A not committed within 90 s; the last slots seen: {seen}")
    assert st["enabled"] and st["booted"] == "rootfs.0", st
    assert st["service"]["rauc"]["state"] == "running", st
    env = bootenv.load(boot).values
    assert (env["A_TRY"], env["A_OK"], env["A_COMMITTED"]) == ("0", "1", "1"), env
    (event,) = lab.socketctl(site, "events", "--kind", "update.committed")["events"]
    assert "no cloud configured within 2 s" in event["text"], event
    status = lab.socketctl(site, "status")
    assert status["slots"]["enabled"] and status["slots"]["commit"]["state"] == "committed"
    text = lab.socketctl(site, "status", json_out=False)
    assert any(line.startswith("slots    A booted good") for line in text.splitlines()), text
    pids = [st["service"]["bus"]["pid"], st["service"]["rauc"]["pid"]]
    lab.stop_socketd(site)
    for pid in pids:
        wait_for(f"process {pid} gone", lambda p=pid: not os.path.exists(f"/proc/{p}"),
                 timeout=10)


def test_without_rauc_there_are_no_updates(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    lab.write_site_config(site, extra_toml="[update]\nsystem_conf = false\n")
    lab.start_socketd(site)
    st = lab.socketctl(site, "slots")
    assert st == {"enabled": False,
                  "error": "no A/B updates on this box: RAUC's system.conf is absent"}, st
    bundle = site.dir / "x.raucb"
    bundle.write_bytes(b"hsqs")
    argv = [sys.executable, "-m", "sdwan.site.socketctl", "--socket", str(site.control_socket),
            "update", str(bundle)]
    done = subprocess.run(["ip", "netns", "exec", site.ns, *argv], capture_output=True,
                          text=True, timeout=30, env=lab.env())
    assert done.returncode == 1, done
    assert "no A/B updates on this box" in done.stderr, done.stderr
    assert lab.socketctl(site, "status")["slots"] == {"enabled": False}
