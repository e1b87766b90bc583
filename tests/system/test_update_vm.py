"""A/B updates of a booted qemu-x86_64 box, end to end over its serial console
(docs/update.md): bundles made from the image's own slot image (sdwan.lab.testbundles) on a
second virtio disk, mounted by a test hook as a USB stick would be.

One box: a stranger's bundle, another board's and a truncated one are refused with nothing
written (root-b and grubenv read from the host after an orderly power-off); then the plug is
pulled while RAUC copies a newer image, and the box still boots slot A; an install then
reboots into B, which is marked good with the console's password and the site config of
/data kept. Another box: a version whose socketd cannot start is left by itself (init's
commit deadline reboots it until GRUB gives it up) and socketd back on A records the
rollback. The two boxes are two tests, each its own VM: under two workers they run side by
side."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import (
    BOOT_S,
    CONSOLE_S,
    FIRMWARE_S,
    NEW_PASSWORD,
    SETTLE_S,
    SHUTDOWN_S,
    SOCKETD_S,
    SiteSpec,
    command,
    hook_args,
    login,
    poll_command,
    site_config,
)

from sdwan.appliance import bootenv
from sdwan.lab import testbundles
from sdwan.lab.vm import VM, VMOptions
from sdwan.pop.pki import main as pki_main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "board"))
import boardlib  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.timeout(1500)]

BOARD = "qemu-x86_64"
SITE = 7
DISK_MIB = 512  # /data grows to ~350 MiB: a bundle's copy and its extracted image fit
INSTALL_S = 600.0  # `update` typed to RAUC's last progress line (copy, check, write)
GRACE_S = 5  # [update] commit_grace_s: no PoP here, so a healthy slot commits after it
# [update] commit_deadline_s of the rollback's box: init reboots a slot on trial this long
# after boot; the least the config takes with its grace of 0 s
DEADLINE_S = 60
WRITE_BPS = 4 << 20  # the disk's writes during the power cut's install: the copy takes ~10 s
GRUBENV = "::EFI/BOOT/grubenv"
UPDATE_CONFIG = f"\n[update]\ncommit_grace_s = {GRACE_S}\n"
ROLLBACK_CONFIG = f"\n[update]\ncommit_grace_s = 0\ncommit_deadline_s = {DEADLINE_S}\n"
ALL = ["newer", "broken", "other_keys", "other_board", "truncated"]


@pytest.fixture(scope="session")
def test_bundles(appliance_image: Callable[[str], Path],
                 tmp_path_factory: pytest.TempPathFactory) -> testbundles.TestBundles:
    appliance_image(BOARD)
    return testbundles.TestBundles(BOARD, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def bundle_disk(test_bundles: testbundles.TestBundles,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    return test_bundles.disk(ALL, tmp_path_factory.mktemp("bundle-disk") / "bundles.sqfs")


def update_vm(image: Path, disk: Path, tmp: Path, update_config: str = UPDATE_CONFIG) -> VM:
    """A box with a site config (its own CA), [update] settings, a disk big enough for an
    install, and the bundle disk mounted at every boot."""
    pki = tmp / "pki"
    with contextlib.redirect_stdout(io.StringIO()):
        assert pki_main(["init-ca", str(pki), "--account", "update-test"]) == 0
        assert pki_main(["issue", str(pki), "--site-id", str(SITE), "--out", str(pki)]) == 0
    cfg = tmp / "socketd.toml"
    cfg.write_text(site_config(SiteSpec(SITE)) + update_config)
    files = {"socketd.toml": cfg}
    for name in ("ca.pem", f"site-{SITE}.pem", f"site-{SITE}.key"):
        files[f"pki/{name}"] = pki / name
    return VM(BOARD, image, VMOptions(
        fw_cfg=files, disk_mib=DISK_MIB,
        extra_args=[*hook_args(tmp, "mount-bundles", testbundles.MOUNT_HOOK),
                    *testbundles.disk_args(disk)]))


# ------------------------------------------------------------------ the disk, from the host


def part(name: str) -> boardlib.Placed:
    layout = boardlib.disk_layout(boardlib.load_board(BOARD))
    return next(p for p in layout.partitions if p.name == name)


def read_grubenv(raw: Path) -> dict[str, str]:
    data = subprocess.run(["mtype", "-i", f"{raw}@@{part('esp').start * 512}", GRUBENV],
                          check=True, capture_output=True, timeout=30).stdout
    return bootenv.parse(data)  # exactly a valid block, end marker included


def root_b_sha256(raw: Path) -> str:
    p = part("root-b")
    return testbundles.sha256(raw, p.start * 512, p.size * 512)


def guest_disk(vm: VM, dest: Path) -> Path:
    dest.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm.dir / "disk.qcow2"), str(dest)],
                   check=True, timeout=120)
    return dest


def throttle(vm: VM, write_bps: int) -> None:
    vm.qmp("block_set_io_throttle", device="disk0", bps=0, bps_rd=0, bps_wr=write_bps,
           iops=0, iops_rd=0, iops_wr=0)


# ------------------------------------------------------------------ the console


def booted(vm: VM, slot: str, socketd: bool = True) -> None:
    number, name = {"A": (2, "root-a"), "B": (3, "root-b")}[slot]
    vm.expect(rf"initramfs: root is /dev/vda{number} \({name}\)", BOOT_S + FIRMWARE_S,
              f"the initramfs mounting slot {slot}")
    vm.expect(rf"boot: ready: site-{SITE}, /data on /dev/vda4", BOOT_S)
    want = ["login: ", "test-hook: bundles mounted: "]
    if socketd:
        want.append(r"socketd running \(pid \d+")
    vm.expect_all(want, SOCKETD_S, "the login prompt, the bundle disk and socketd")


def wait_committed(vm: VM, slot: str) -> str:
    return poll_command(vm, "show slots", re.compile(rf"(?m)^commit +{slot} is marked good"),
                        SETTLE_S, f"{slot} marked good")


def start_update(vm: VM, name: str) -> float:
    line = f"update {testbundles.BUNDLES_DIR}/{name}.raucb"
    vm.sendline(line)
    vm.expect(re.escape(line), CONSOLE_S, f"the echo of {line!r}")
    return time.monotonic()


def install(vm: VM, name: str) -> float:
    """Installs a bundle from the console and confirms the reboot; returns the seconds from
    the command to RAUC's last progress line."""
    t = start_update(vm, name)
    vm.expect(r"100% Installing done\.", INSTALL_S, f"the install of {name}")
    took = time.monotonic() - t
    vm.expect(re.escape("Reboot now into it? Type yes to confirm: "), CONSOLE_S)
    vm.sendline("yes")
    vm.expect("shutdown: /data unmounted", SHUTDOWN_S, "the orderly shutdown")
    return took


def refused(vm: VM, name: str, reason: str) -> None:
    out = command(vm, f"update {testbundles.BUNDLES_DIR}/{name}.raucb", timeout=INSTALL_S)
    assert re.search(rf"error: .*bundle refused: .*{reason}", out), out
    assert "Reboot now" not in out and "% Installing" not in out, out


# ------------------------------------------------------------------ the tests


def test_refusals_power_cut_then_install_commits_the_new_slot(
    test_bundles: testbundles.TestBundles, bundle_disk: Path,
    appliance_image: Callable[[str], Path], tmp_path: Path,
) -> None:
    image = appliance_image(BOARD)
    shipped = {"root-b": root_b_sha256(image), "grubenv": read_grubenv(image)}
    vm = update_vm(image, bundle_disk, tmp_path)
    try:
        refusals_cut_install(vm, test_bundles, shipped, tmp_path)
    finally:
        vm.stop()


def refusals_cut_install(vm: VM, test_bundles: testbundles.TestBundles,
                         shipped: dict, tmp_path: Path) -> None:
    # -no-reboot: the orderly reboot after the refusals ends QEMU before the firmware runs.
    vm.opts.extra_args += ["-no-reboot"]

    # Boot 1: the shipped image, A committed once healthy (no PoP: after the grace time).
    vm.start()
    booted(vm, "A")
    login(vm, "admin", first=True)
    wait_committed(vm, "rootfs.0")
    refused(vm, "other_keys", "the signature does not verify against the keyring")
    refused(vm, "other_board", "a bundle for 'sdwan-qemu-aarch64', not for this box")
    refused(vm, "truncated", "truncated or damaged at its end")
    out = command(vm, "show events 50")
    assert out.count("update.failed") == 3 and "update.installed" not in out, out
    vm.sendline("reboot")
    vm.expect("Type yes to confirm: ", CONSOLE_S)
    vm.sendline("yes")
    vm.expect("shutdown: /data unmounted", SHUTDOWN_S, "the orderly shutdown")
    assert vm.proc is not None
    vm.proc.wait(timeout=FIRMWARE_S)
    vm.poweroff()
    disk = guest_disk(vm, tmp_path / "refused.raw")
    assert root_b_sha256(disk) == shipped["root-b"], "a refused bundle wrote into root-b"
    # A factory slot is committed, so neither GRUB nor socketd's commit changed grubenv.
    assert read_grubenv(disk) == shipped["grubenv"]

    # Boot 2: the plug pulled while RAUC copies the newer image into B.
    vm.opts.extra_args.remove("-no-reboot")
    vm.start()
    booted(vm, "A")
    login(vm, NEW_PASSWORD)
    wait_committed(vm, "rootfs.0")
    # The disk written at flash speed rather than the host's, so the cut falls in the copy
    # (a second at the host's speed) whatever the console's polling lags.
    throttle(vm, WRITE_BPS)
    start_update(vm, "newer")
    vm.expect(r"Copying image to rootfs\.1", INSTALL_S, "RAUC copying the image into B")
    time.sleep(2)
    assert "Copying image to rootfs.1 done" not in vm.output(), vm.tail()
    vm.kill()
    # What RAUC wrote into B before the cut was in the guest's page cache and QEMU's (a disk's
    # volatile cache): gone. grubenv is synced by each of its writes.
    env = read_grubenv(guest_disk(vm, tmp_path / "cut.raw"))
    assert env["ORDER"].startswith("A") and (env["B_OK"], env["B_COMMITTED"]) == ("0", "0"), env

    # Boot 3: back on A, which still works: RAUC sees A booted.
    vm.start()
    booted(vm, "A")
    assert "grub: slot B" not in vm.output(), vm.tail()
    login(vm, NEW_PASSWORD)
    out = wait_committed(vm, "rootfs.0")
    assert re.search(r"(?m)^rootfs\.0 +A +booted +good\b", out), out

    # ... and the install works: boot 4 is slot B, marked good, /data as it was.
    install(vm, "newer")
    booted(vm, "B")
    login(vm, NEW_PASSWORD)
    out = wait_committed(vm, "rootfs.1")
    version = re.escape(test_bundles.version)
    assert re.search(rf"(?m)^rootfs\.1 +B +booted +good +\S+ +{version} ", out), out
    out = command(vm, "show status")
    assert re.search(rf"site\s+{SITE} \(branch-{SITE}\)", out), out
    out = command(vm, "show events 100")
    for kind in ("update.installed", "console.reboot", "update.committed",
                 "socketd.unclean_end", "console.password_changed"):
        assert kind in out, f"{kind} missing:\n{out}"


def roll_back(vm: VM, results: dict[str, str]) -> None:
    vm.start()
    booted(vm, "A")
    login(vm, "admin", first=True)
    wait_committed(vm, "rootfs.0")
    install(vm, "broken")
    tries = boardlib.load_board(BOARD).boot_tries
    for n in range(1, tries + 1):
        vm.expect(rf"grub: slot B \(root-b\), try {n} of {tries}", FIRMWARE_S + SHUTDOWN_S,
                  f"GRUB starting the broken slot, try {n}")
        booted(vm, "B", socketd=False)
        vm.expect("socketd: this test build cannot start", SOCKETD_S)
        vm.expect(r"commit-deadline: slot B not committed", DEADLINE_S + SOCKETD_S,
                  "init's commit deadline")
    # Its tries used up, GRUB starts A, and socketd there notices.
    booted(vm, "A")
    login(vm, NEW_PASSWORD)
    results["slots"] = poll_command(vm, "show slots", re.compile(r"(?m)^rollback +rootfs\.1 "),
                                    SETTLE_S, "the rollback in the slots view")
    results["events"] = command(vm, "show events 100")


def test_a_version_whose_socketd_cannot_start_is_rolled_back(
    appliance_image: Callable[[str], Path], bundle_disk: Path, tmp_path: Path,
) -> None:
    vm = update_vm(appliance_image(BOARD), bundle_disk, tmp_path, ROLLBACK_CONFIG)
    results: dict[str, str] = {}
    try:
        roll_back(vm, results)
    finally:
        vm.stop()
    slots = results["slots"]
    assert re.search(r"(?m)^rootfs\.0 +A +booted +good\b", slots), slots
    assert re.search(r"(?m)^rollback +rootfs\.1 \(version .*-broken\+", slots), slots
    # why: GRUB's tries used up, each boot ended by init's deadline, socketd never reporting
    assert re.search(r"boot tries were used up \(3 tried\)", slots), slots
    assert re.search(r"commit deadline rebooted it 3 times, each 60 s after boot", slots), slots
    assert "update.rolled_back" in results["events"], results["events"]
