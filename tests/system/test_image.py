"""The appliance image booted in QEMU the way the hardware boots it (UEFI, GPT, squashfs
root, /data), seen from the serial console as a field engineer sees it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import (
    BOOT_S,
    CONSOLE_S,
    FIRMWARE_S,
    NEW_PASSWORD,
    SHUTDOWN_S,
    SOCKETD_S,
    command,
    login,
)

from sdwan.lab.vm import VM

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]


def test_x86_64_first_boot_config_persistence_and_reboot(
    appliance_image: Callable[[str], Path], vms: Callable[..., VM],
    site_files: Callable[..., dict[str, Path]],
) -> None:
    vm = vms("qemu-x86_64", appliance_image("qemu-x86_64"), panel=True)

    # First power-on: a blank /data is formatted; without a configuration socketd waits and
    # says so, and the console still works.
    vm.start()
    vm.expect("formatting /data", BOOT_S, "the first-boot format of /data")
    vm.expect(r"boot: ready: socket, /data on /dev/vda3", BOOT_S)
    vm.expect_all(["no configuration at /data/socketd.toml: socketd is not running",
                   "login: "], SOCKETD_S)
    login(vm, "admin", first=True)
    out = command(vm, "show status")
    assert "socketd is not running" in out, out
    out = command(vm, "show events")
    assert "no configuration" in out or "socketd is not running" in out, out

    # Pull the plug, then power on with a configuration offered through fw_cfg: /data and
    # the new console password survive, socketd starts and the hostname is the site's.
    vm.poweroff()
    vm.opts.fw_cfg = site_files(site_id=7)
    vm.start()
    boot = vm.expect(r"boot: ready: (\S+), /data on (\S+)", BOOT_S).groups()
    assert boot == ("site-7,", "/dev/vda3") or boot[0].startswith("site-7"), boot
    assert "formatting /data" not in vm.output(), "a formatted /data was formatted again"
    vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S,
                  "socketd's control socket and the login prompt")
    login(vm, NEW_PASSWORD)
    out = command(vm, "show status")
    assert re.search(r"site\s+7 \(branch-7\)", out), out
    assert "wan1" in out and "eth0" in out, out
    assert "sdwan0" in out, out
    # The log ring in RAM holds socketd's log and the kernel's, as the console shows them.
    out = command(vm, "show log 200")
    assert re.search(r"socketd: .*sdwan\.site\.socketd", out), out
    assert "kernel:" in out, out

    # A reboot from the console goes through init's shutdown and UEFI again.
    vm.sendline("reboot")
    vm.expect("Type yes to confirm: ", CONSOLE_S)
    vm.sendline("yes")
    vm.expect("shutdown: /data unmounted", SHUTDOWN_S, "the orderly shutdown")
    vm.expect("EFI stub", FIRMWARE_S, "the firmware starting the kernel again")
    vm.expect(r"boot: ready: site-7", BOOT_S)
    vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S)
    login(vm, NEW_PASSWORD)
    out = command(vm, "show status")
    assert re.search(r"site\s+7 \(branch-7\)", out), out


def test_aarch64_boots_to_the_console_login_and_runs_socketd(
    appliance_image: Callable[[str], Path], vms: Callable[..., VM],
    site_files: Callable[..., dict[str, Path]],
) -> None:
    # QEMU's virt machine has no watchdog: /dev/watchdog is the kernel's softdog there.
    vm = vms("qemu-aarch64", appliance_image("qemu-aarch64"),
             fw_cfg=site_files(site_id=8, watchdog="/dev/watchdog"))
    vm.start()
    vm.expect("initramfs: root is /dev/vda2", BOOT_S, "the initramfs finding the root")
    vm.expect(r"boot: ready: site-8, /data on /dev/vda3", BOOT_S)
    # socketd running proves the cross-compiled cffi modules load on the emulated CPU.
    vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S,
                  "socketd and the console's login prompt")
