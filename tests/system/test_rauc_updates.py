"""A/B updates with the real RAUC, without QEMU (appliance/updater.py, docs/update.md).

Each test gets two loop devices as the slots A and B, GRUB's environment block and its copy,
a system.conf like the box's (RAUC's custom bootloader backend, sdwan.appliance.bootenv,
working on that block; a keyring taking only code-signing certificates), a firmware CA
and signer made with socket-pki's functions, and bundles made with `rauc bundle` from a
small squashfs; the updater under test starts its own private bus and `rauc service` (told
that A is booted: a test host's kernel command line has no rauc.slot=).

The box takes only `verity` bundles, which RAUC mounts through device-mapper. On a host
kernel without it (no /dev/mapper/control) the bundles installed here are `plain`, which
RAUC checks and writes the same way past the mount: the test system.conf allows that format
and the updater checks bundles against that system.conf (`check_with_system_conf`) instead
of the box's check (`inspect_bundle`, appliance/bundle.py), which refuses them. The refusals
of a stranger's bundle and of a plain one go through the box's own check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sdwan.appliance import bootenv
from sdwan.appliance import updater as updater_module
from sdwan.appliance.raucstatus import Progress
from sdwan.appliance.updater import (
    EVENT_COMMITTED,
    EVENT_INSTALLED,
    EVENT_ROLLED_BACK,
    Health,
    InstallFailed,
    InstallRefused,
    Precheck,
    Updater,
    check_with_system_conf,
    inspect_bundle,
)
from sdwan.lab.bootlab import backend_conf, make_boot_env
from sdwan.pop import pki
from sdwan.site.config import Update

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(180),
    # Loop devices are the machine's: these tests take turns with the other users of them.
    pytest.mark.xdist_group("loop-devices"),
]

_TOOLS = ("rauc", "dbus-daemon", "mksquashfs", "openssl", "losetup")
COMPATIBLE = "sdwan-test"
SLOT_BYTES = 4 * 1024 * 1024
BUNDLE_FORMAT = "verity" if os.path.exists("/dev/mapper/control") else "plain"
# What the box checks before writing, where this host can install what it takes.
HOST_CHECK: Precheck = inspect_bundle if BUNDLE_FORMAT == "verity" else check_with_system_conf
HEALTHY = Health(fastpath=None, control=None, cloud_up=True, cloud_configured=True)


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("RAUC writes block devices: these tests need root and loop devices")
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        # Skipping would hide a broken setup: scripts/setup.sh installs these.
        pytest.fail(f"tools not installed: {', '.join(missing)}", pytrace=False)


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def make_keys(d: Path) -> tuple[Path, Path, Path]:
    """A firmware CA and a signer it issued: (keyring, signer cert, signer key)."""
    ca = pki.create_firmware_ca(d, development=True)
    signer = pki.issue_firmware_signer(d)
    return Path(ca.cert), Path(signer.cert), Path(signer.key)


def make_bundle(d: Path, keys: tuple[Path, Path, Path], version: str, tag: str,
                fmt: str = BUNDLE_FORMAT, blob: int = 256 * 1024) -> tuple[Path, bytes]:
    """A signed bundle with one raw image for the rootfs class; (bundle, the image)."""
    root = d / f"root-{tag}"
    root.mkdir(parents=True)
    (root / "version").write_text(version + "\n")
    (root / "blob").write_bytes(os.urandom(blob))  # RAUC wants more than 4 KiB
    content = d / f"content-{tag}"
    content.mkdir()
    run("mksquashfs", root, content / "rootfs.img", "-noappend", "-quiet", "-no-progress")
    # rauc bundle rewrites the manifest it is given: each bundle gets a fresh one.
    (content / "manifest.raucm").write_text(
        f"[update]\ncompatible={COMPATIBLE}\nversion={version}\n\n"
        f"[bundle]\nformat={fmt}\n\n[image.rootfs]\nfilename=rootfs.img\n")
    # Signed without a keyring of its own: the box's keyring is what judges it.
    conf = d / f"sign-{tag}.conf"
    conf.write_text(f"[system]\ncompatible={COMPATIBLE}\nbootloader=noop\n")
    bundle = d / f"update-{tag}.raucb"
    _, cert, key = keys
    run("rauc", f"--conf={conf}", "bundle", f"--cert={cert}", f"--key={key}", content, bundle)
    return bundle, (content / "rootfs.img").read_bytes()


@dataclass
class Box:
    root: Path
    runtime: Path
    data: Path
    conf: Path
    boot: bootenv.Paths
    slots: dict[str, str]  # bootname -> loop device
    ca: tuple[Path, Path, Path]
    other_ca: tuple[Path, Path, Path]
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    health: Health = HEALTHY

    @property
    def grubenv(self) -> Path:
        return self.boot.grubenv

    def env(self) -> dict[str, str]:
        """GRUB's variables; both copies must agree."""
        env = bootenv.parse(self.boot.grubenv.read_bytes())
        assert bootenv.parse(self.boot.copy.read_bytes()) == env
        return env

    def set_env(self, **values: str) -> None:
        """As GRUB or an earlier boot left them."""
        bootenv.save(self.boot, {**self.env(), **values})

    def slot_bytes(self, bootname: str, n: int) -> bytes:
        with open(self.slots[bootname], "rb") as f:
            return f.read(n)

    def updater(self, grace_s: int = 300, precheck: Precheck | None = None) -> Updater:
        return Updater(
            Update(system_conf=self.conf, commit_grace_s=grace_s, reboot_command=("true",)),
            self.data, self.runtime, lambda k, t, d: self.events.append((k, t, d)),
            lambda: self.health, boot_slot="A", precheck=precheck or HOST_CHECK,
            boot_env=self.boot)

    def kinds(self, kind: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [e for e in self.events if e[0] == kind]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    # The bus socket's path must fit a Unix socket address: a short directory of its own.
    runtime = Path(tempfile.mkdtemp(prefix="upd-", dir="/tmp"))
    loops: list[str] = []
    try:
        slots: dict[str, str] = {}
        for name in ("A", "B"):
            backing = tmp_path / f"slot-{name}.img"
            with open(backing, "wb") as f:
                f.truncate(SLOT_BYTES)
            dev = run("losetup", "--find", "--show", backing).strip()
            loops.append(dev)
            slots[name] = dev
        ca = make_keys(tmp_path / "firmware")
        other = make_keys(tmp_path / "firmware-other")
        (tmp_path / "mnt").mkdir()
        (tmp_path / "rauc").mkdir()
        conf = tmp_path / "system.conf"
        # A committed, B written once and given up (as after a rollback): bootable again only
        # once an install makes it primary.
        backend, boot = make_boot_env(tmp_path, conf, {
            "ORDER": "A B", "A_OK": "1", "A_TRY": "0", "A_COMMITTED": "1",
            "B_OK": "0", "B_TRY": "0", "B_COMMITTED": "0"})
        conf.write_text(
            f"[system]\ncompatible={COMPATIBLE}\nbootloader=custom\n"
            f"mountprefix={tmp_path / 'mnt'}\ndata-directory={tmp_path / 'rauc'}\n\n"
            f"bundle-formats={BUNDLE_FORMAT}\n\n"
            f"[keyring]\npath={ca[0]}\ncheck-purpose=codesign\n\n"
            + backend_conf(backend) + "\n"
            f"[slot.rootfs.0]\ndevice={slots['A']}\ntype=raw\nbootname=A\n\n"
            f"[slot.rootfs.1]\ndevice={slots['B']}\ntype=raw\nbootname=B\n")
        yield Box(tmp_path, runtime, tmp_path / "data", conf, boot, slots, ca, other)
    finally:
        for dev in loops:
            with contextlib.suppress(subprocess.CalledProcessError):
                run("losetup", "--detach", dev)
        shutil.rmtree(runtime, ignore_errors=True)


async def started(box: Box, grace_s: int = 300, precheck: Precheck | None = None) -> Updater:
    up = box.updater(grace_s, precheck)
    up.start()
    await up.ready()
    assert up.ready_error is None, up.status()
    return up


async def install_then_start_again(box: Box, bundle: Path,
                                   between: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """An install, then (after `between`, what GRUB or a reboot did meanwhile) a socketd
    started again: its updater's status."""
    up = await started(box)
    try:
        await up.install(str(bundle))
    finally:
        await up.close()
    between()
    up = await started(box)
    try:
        return up.status()
    finally:
        await up.close()


async def wait_for(cond: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.1)


def test_install_writes_the_inactive_slot_and_makes_it_primary(box: Box) -> None:
    bundle, image = make_bundle(box.root, box.ca, "2.0.1", "new")
    seen: list[Progress] = []

    async def main() -> dict[str, Any]:
        up = await started(box)
        try:
            slots = await up.slots()
            assert [(s.name, s.bootname, s.state, s.primary) for s in slots] == [
                ("rootfs.0", "A", "booted", True), ("rootfs.1", "B", "inactive", False)]
            assert slots[1].device == box.slots["B"]
            result = await up.install(str(bundle), seen.append, origin="test")
            return {"result": result, "status": up.status()}
        finally:
            await up.close()

    out = asyncio.run(main())
    assert out["result"]["state"] == "installed", out
    assert out["result"]["slot"] == "rootfs.1"
    assert box.slot_bytes("B", len(image)) == image
    assert box.slot_bytes("A", 4096) == bytes(4096), "the booted slot was written"
    env = box.env()
    assert env["ORDER"].split()[0] == "B", env
    assert env["B_TRY"] == "0" and env["B_OK"] == "1", env
    percents = [p.percent for p in seen]
    assert percents and percents == sorted(percents) and percents[-1] == 100, seen
    assert any("rootfs.1" in p.message for p in seen), seen
    (event,) = box.kinds(EVENT_INSTALLED)
    assert event[2]["version"] == "2.0.1" and event[2]["slot"] == "rootfs.1", event
    status = out["status"]
    assert status["primary"] == "rootfs.1" and status["booted"] == "rootfs.0"
    assert status["reboot_needed"] == {"slot": "rootfs.1", "version": "2.0.1"}, status
    b = next(s for s in status["slots"] if s["name"] == "rootfs.1")
    assert b["version"] == "2.0.1" and b["installed_at"], b


@pytest.mark.parametrize("kind", ["another CA", "plain format"])
def test_the_box_refuses_a_bundle_before_anything_is_written(box: Box, kind: str) -> None:
    if kind == "another CA":
        bundle, _ = make_bundle(box.root, box.other_ca, "6.6.6", "foreign", fmt="verity")
        why = "the signature does not verify against the keyring"
    else:
        bundle, _ = make_bundle(box.root, box.ca, "6.6.7", "plain", fmt="plain")
        why = "a bundle format this box does not take"
    before_env = box.grubenv.read_bytes()

    async def main() -> None:
        up = await started(box, precheck=inspect_bundle)  # the box's own check
        try:
            with pytest.raises(InstallRefused, match=f"bundle refused: .*{why}"):
                await up.install(str(bundle), lambda p: pytest.fail(f"progress {p}"))
            assert up.install_state.state == "failed"
        finally:
            await up.close()

    asyncio.run(main())
    assert box.slot_bytes("B", SLOT_BYTES) == bytes(SLOT_BYTES)
    assert box.grubenv.read_bytes() == before_env
    assert not box.kinds(EVENT_INSTALLED)
    (failed,) = box.kinds("update.failed")
    assert failed[2]["stage"] == "check", failed


def test_an_install_that_fails_says_raucs_reason_and_keeps_booting_the_old_slot(
    box: Box,
) -> None:
    bundle, _ = make_bundle(box.root, box.ca, "5.0.0", "too-big", blob=SLOT_BYTES + 1024 * 1024)

    async def main() -> None:
        up = await started(box)
        try:
            with pytest.raises(InstallFailed) as e:
                await up.install(str(bundle))
            assert up.install_state.state == "failed"
            assert str(e.value) == up.install_state.error and str(e.value), e.value
        finally:
            await up.close()

    asyncio.run(main())
    (failed,) = box.kinds("update.failed")
    assert failed[2]["stage"] == "install" and failed[2]["error"], failed
    assert not box.kinds(EVENT_INSTALLED)
    assert box.env()["ORDER"].split()[0] == "A", box.env()


def test_no_second_install_while_one_runs(box: Box) -> None:
    bundle, image = make_bundle(box.root, box.ca, "2.0.2", "twice")

    async def main() -> None:
        up = await started(box)
        try:
            first = asyncio.create_task(up.install(str(bundle)))
            await wait_for(lambda: up.install_state.state in ("checking", "installing"))
            with pytest.raises(InstallRefused, match="already being installed"):
                await up.install(str(bundle))
            assert (await first)["state"] == "installed"
        finally:
            await up.close()

    asyncio.run(main())
    assert box.slot_bytes("B", len(image)) == image


def test_a_pending_slot_is_marked_good_only_once_healthy(box: Box) -> None:
    # Booted into A for the first time: GRUB counted a try, nobody marked it good yet.
    box.set_env(A_TRY="1", A_COMMITTED="0")
    bundle, _ = make_bundle(box.root, box.ca, "2.0.3", "pending")
    box.health = Health(fastpath="TUN thread died", control=None, cloud_up=True,
                        cloud_configured=True)

    async def main() -> None:
        up = await started(box)
        try:
            await wait_for(lambda: up.commit.get("state") == "pending")
            assert "fast path (TUN thread died)" in up.commit["waiting_for"], up.commit
            await asyncio.sleep(2.5)
            assert box.env()["A_TRY"] == "1", "marked good while unhealthy"
            # The slot to fall back to must not be overwritten before this one is good.
            with pytest.raises(InstallRefused, match="not committed yet"):
                await up.install(str(bundle))
            assert box.slot_bytes("B", 4096) == bytes(4096)
            box.health = HEALTHY
            await wait_for(lambda: up.commit.get("state") == "committed")
        finally:
            await up.close()

    asyncio.run(main())
    env = box.env()
    assert (env["A_TRY"], env["A_OK"], env["A_COMMITTED"]) == ("0", "1", "1"), env
    (event,) = box.kinds(EVENT_COMMITTED)
    assert event[2]["slot"] == "rootfs.0" and "cloud is reached" in event[1], event


def test_without_the_cloud_a_slot_is_committed_after_the_grace_time(box: Box) -> None:
    box.set_env(A_TRY="2", A_COMMITTED="0")
    box.health = Health(fastpath=None, control=None, cloud_up=False, cloud_configured=True)

    async def main() -> None:
        up = await started(box, grace_s=2)
        try:
            await wait_for(lambda: up.commit.get("state") == "pending")
            assert "the cloud (a PoP session up) or" in up.commit["waiting_for"], up.commit
            await wait_for(lambda: up.commit.get("state") == "committed", timeout=15)
        finally:
            await up.close()

    asyncio.run(main())
    assert (box.env()["A_TRY"], box.env()["A_COMMITTED"]) == ("0", "1")
    (event,) = box.kinds(EVENT_COMMITTED)
    assert "no PoP session within 2 s" in event[1], event


def test_a_fall_back_is_recorded_once_and_the_abandoned_slot_marked_bad(box: Box) -> None:
    bundle, _ = make_bundle(box.root, box.ca, "3.0.0", "broken")

    async def install() -> None:
        up = await started(box)
        try:
            await up.install(str(bundle))
        finally:
            await up.close()

    asyncio.run(install())
    assert box.env()["ORDER"].split()[0] == "B"
    # B was booted three times and never marked good; GRUB then started A again.
    fallen_back = {"ORDER": "B A", "B_OK": "1", "B_TRY": "3", "B_COMMITTED": "0",
                   "A_OK": "1", "A_TRY": "0", "A_COMMITTED": "1"}
    box.set_env(**fallen_back)
    # init's commit deadline rebooted it each time (its socketd never committed it)
    deadline = box.data / "commit-deadline.json"
    deadline.write_text('{"slot": "B", "deadline_s": 45, "uptime_s": 46, "reboots": 3,'
                        ' "at": 1}\n')

    async def start_once() -> dict[str, Any]:
        up = await started(box)
        try:
            return up.status()
        finally:
            await up.close()

    status = asyncio.run(start_once())
    (event,) = box.kinds(EVENT_ROLLED_BACK)
    assert event[2]["slot"] == "rootfs.1" and event[2]["version"] == "3.0.0", event
    assert "boot tries were used up (3 tried)" in event[2]["why"], event
    assert "the commit deadline rebooted it 3 times, each 45 s after boot" in event[2]["why"]
    assert not deadline.exists(), "the next trial counts from 0"
    env = box.env()
    assert env["B_OK"] == "0" and env["ORDER"].split()[0] == "A", env
    assert status["rollback"]["slot"] == "rootfs.1", status
    b = next(s for s in status["slots"] if s["name"] == "rootfs.1")
    assert b["boot_status"] == "bad" and not b["primary"], b

    # socketd started again, even with GRUB's variables as they were: no second event.
    box.set_env(**fallen_back)
    status = asyncio.run(start_once())
    assert len(box.kinds(EVENT_ROLLED_BACK)) == 1, box.events
    assert box.env()["B_OK"] == "0"
    assert status["rollback"]["slot"] == "rootfs.1"


def test_a_committed_slot_grub_could_not_load_is_recorded_as_such(box: Box) -> None:
    bundle, _ = make_bundle(box.root, box.ca, "3.0.5", "damaged")
    # B ran and was committed; later GRUB could not read its kernel, twice, and started A
    status = asyncio.run(install_then_start_again(box, bundle, lambda: box.set_env(
        ORDER="B A", B_OK="1", B_COMMITTED="1", B_TRY="3", B_LOADFAIL="1")))
    (event,) = box.kinds(EVENT_ROLLED_BACK)
    assert "GRUB could not load its kernel or initramfs" in event[2]["why"], event
    env = box.env()
    assert (env["ORDER"], env["B_OK"], env["B_COMMITTED"], env["B_LOADFAIL"]) == (
        "A B", "0", "0", "0"), env
    assert status["boot_selection"]["order"] == ["A", "B"], status


def test_a_committed_slot_in_a_reboot_loop_is_recorded_as_such(box: Box) -> None:
    bundle, _ = make_bundle(box.root, box.ca, "3.0.7", "looping")
    # B ran and was committed; then its last 10 boots all ended before it stayed up (socketd
    # never healthy, or reset by the watchdog), and GRUB started A
    status = asyncio.run(install_then_start_again(box, bundle, lambda: box.set_env(
        ORDER="B A", B_OK="1", B_COMMITTED="1", B_TRY="0", B_LOOPS="10")))
    (event,) = box.kinds(EVENT_ROLLED_BACK)
    assert "it was committed, but its last 10 boots in a row ended before it stayed up" \
        in event[2]["why"], event
    env = box.env()
    assert (env["ORDER"], env["B_OK"], env["B_LOOPS"]) == ("A B", "0", "0"), env
    assert status["boot_selection"]["boot_loops"] == 10, status


def test_a_committed_slot_s_boot_count_is_cleared_once_healthy(
    box: Box, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GRUB counted this boot of the committed slot A: socketd clears the count once its own
    parts have been healthy for SETTLE_S in a row (the cloud out of reach), never before;
    a reboot asked for clears it too."""
    monkeypatch.setattr(updater_module, "SETTLE_S", 1.5)
    box.set_env(A_LOOPS="3")
    box.health = Health(fastpath="TUN thread died", control=None, cloud_up=True,
                        cloud_configured=True)

    async def main() -> None:
        up = await started(box)
        try:
            await wait_for(lambda: up.commit.get("state") == "committed")
            await asyncio.sleep(2.5)
            assert box.env()["A_LOOPS"] == "3", "cleared while unhealthy"
            box.health = Health(fastpath=None, control=None, cloud_up=False,
                                cloud_configured=True)
            start = asyncio.get_running_loop().time()
            await wait_for(lambda: box.env()["A_LOOPS"] == "0")
            assert asyncio.get_running_loop().time() - start >= 1.5
            await wait_for(lambda: up.status()["boot_selection"]["loops"].get("A") == 0)
            box.set_env(A_LOOPS="1")
            await up.reboot(origin="test")
            assert box.env()["A_LOOPS"] == "0", "a reboot asked for counted as a failed boot"
        finally:
            await up.close()

    asyncio.run(main())
    assert not box.kinds(EVENT_COMMITTED) and not box.kinds(EVENT_ROLLED_BACK), box.events


def test_an_install_waiting_for_its_reboot_is_no_rollback(box: Box) -> None:
    bundle, _ = make_bundle(box.root, box.ca, "3.1.0", "waiting")
    # socketd restarted before anyone rebooted
    status = asyncio.run(install_then_start_again(box, bundle))
    assert not box.kinds(EVENT_ROLLED_BACK), box.events
    assert box.env()["ORDER"].split()[0] == "B"
    assert status["reboot_needed"]["slot"] == "rootfs.1", status


def test_socketctl_update_follows_the_install_and_says_why_it_refuses(
    box: Box, capsys: pytest.CaptureFixture[str],
) -> None:
    """socketctl against the updater's own control commands, over a real control socket."""
    from sdwan.common.control import ControlServer
    from sdwan.site import socketctl

    good, image = make_bundle(box.root, box.ca, "4.0.0", "ctl")
    foreign, _ = make_bundle(box.root, box.other_ca, "6.6.6", "ctl-foreign")
    sock = box.runtime / "control.sock"

    async def main() -> tuple[int, str, str, int, str, int, str]:
        up = await started(box)
        server = ControlServer(sock, up.handlers())
        await server.start()
        try:
            capsys.readouterr()
            refused = await asyncio.to_thread(socketctl.main, ["--socket", str(sock), "update",
                                                               str(foreign)])
            err_refused = capsys.readouterr().err
            rc = await asyncio.to_thread(socketctl.main, ["--socket", str(sock), "update",
                                                          str(good)])
            out = capsys.readouterr()
            slots_rc = await asyncio.to_thread(socketctl.main, ["--socket", str(sock),
                                                                "slots"])
            slots_out = capsys.readouterr().out
            return refused, err_refused, out.out, rc, out.err, slots_rc, slots_out
        finally:
            await server.close()
            await up.close()

    refused, err_refused, out, rc, err, slots_rc, slots_out = asyncio.run(main())
    assert refused == socketctl.EXIT_COMMAND_FAILED
    assert "update: bundle refused: " in err_refused, err_refused
    assert "signature" in err_refused, err_refused
    assert rc == socketctl.EXIT_OK, (out, err)
    lines = out.splitlines()
    assert lines[0] == f"installing {good} (version 4.0.0) into rootfs.1", lines
    assert " 100% Installing done." in lines, lines
    assert lines[-1] == ("installed 4.0.0 into rootfs.1: it starts at the next reboot"
                         " (socketctl reboot)"), lines
    assert box.slot_bytes("B", len(image)) == image
    assert slots_rc == socketctl.EXIT_OK
    assert "reboot   needed: 4.0.0 is installed into rootfs.1" in slots_out, slots_out


def test_the_console_installs_from_a_file_on_the_box_and_asks_before_rebooting(
    box: Box,
) -> None:
    from sdwan.common.control import ControlServer

    bundle, image = make_bundle(box.root, box.ca, "4.1.0", "console")
    sock = box.runtime / "control.sock"
    typed = (f"admin\nadmin\nnew-password-1\nnew-password-1\nupdate {bundle}\nno\n"
             "show slots\nexit\n")

    async def main() -> tuple[int, str]:
        up = await started(box)
        server = ControlServer(sock, up.handlers())
        await server.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sdwan.appliance.console", "--socket", str(sock),
                "--data", str(box.root / "console-data"), "--reboot-command", "false",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(typed.encode()), 60)
            return proc.returncode or 0, out.decode()
        finally:
            await server.close()
            await up.close()

    rc, out = asyncio.run(main())
    assert rc == 0, out
    assert f"installing {bundle} (version 4.1.0) into rootfs.1" in out, out
    assert " 100% Installing done." in out, out
    assert "installed 4.1.0 into rootfs.1: it starts at the next reboot" in out, out
    assert "not rebooting: reboot starts it later" in out, out
    assert "rebooting ..." not in out, out
    assert "reboot   needed: 4.1.0 is installed into rootfs.1" in out, out
    assert box.slot_bytes("B", len(image)) == image
