"""Reboot persistence seen from the console: a WAN setting changed on the console, the new
console password and the events survive a reboot; `factory-reset` wipes them, and the
default credential and the config's own addressing come back."""

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
    SETTLE_S,
    SHUTDOWN_S,
    SOCKETD_S,
    SiteSpec,
    command,
    login,
    poll_command,
    site_fw_cfg,
    vm_options,
)

from sdwan.lab.topology import Lab
from sdwan.lab.vm import VM

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

STATIC = "192.0.2.10/24"
GATEWAY = "192.0.2.1"


def booted(vm: VM, site_id: int) -> None:
    vm.expect(rf"boot: ready: site-{site_id}, /data on /dev/vda3", BOOT_S)
    vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S,
                  "socketd's control socket and the login prompt")


def test_setting_password_and_events_survive_reboot_and_factory_reset_wipes_them(
    appliance_image: Callable[[str], Path], lab: Lab, tmp_path: Path,
) -> None:
    board = "qemu-x86_64"
    spec = SiteSpec(5, watchdog=False)
    vm = VM(board, appliance_image(board),
            vm_options(fw_cfg=site_fw_cfg(lab, spec, tmp_path)))
    try:
        vm.start()
        booted(vm, 5)
        login(vm, "admin", first=True)
        out = command(vm, "show links")
        assert re.search(r"(?m)^wan1\s+eth0\s+\S+\s+none\b", out), out
        out = command(vm, f"set link wan1 static {STATIC} {GATEWAY}")
        assert "error" not in out.lower(), out
        out = poll_command(vm, "show links",
                           re.compile(rf"(?m)^wan1\s+eth0\s+\S+\s+static\s+{re.escape(STATIC)}"
                                      rf"\s+{re.escape(GATEWAY)}\b"),
                           SETTLE_S, "the static address before the reboot")

        vm.sendline("reboot")
        vm.expect("Type yes to confirm: ", CONSOLE_S)
        vm.sendline("yes")
        vm.expect("shutdown: /data unmounted", SHUTDOWN_S, "the orderly shutdown")
        vm.expect("EFI stub", FIRMWARE_S, "the firmware starting the kernel again")
        booted(vm, 5)
        # The changed password is the one in force: it was persisted.
        login(vm, NEW_PASSWORD)
        # socketd applies the stored setting in the background after its start.
        poll_command(vm, "show links",
                     re.compile(rf"(?m)^wan1\s+eth0\s+\S+\s+static\s+{re.escape(STATIC)}"
                                rf"\s+{re.escape(GATEWAY)}\b"),
                     SETTLE_S, "the static address after the reboot")
        out = command(vm, "show events 200")
        for kind in ("console.password_changed", "link.addressing", "console.reboot"):
            assert kind in out, f"{kind} missing from the events after the reboot:\n{out}"

        vm.sendline("factory-reset")
        vm.expect(r"Type factory-reset \(or yes\) to confirm: ", CONSOLE_S)
        vm.sendline("factory-reset")
        vm.expect("EFI stub", SHUTDOWN_S + FIRMWARE_S, "the reboot after the factory reset")
        booted(vm, 5)
        # Only the default credential works again, with its forced change.
        login(vm, "admin", first=True, new_password="another-pass-7")
        out = command(vm, "show links")
        assert re.search(r"(?m)^wan1\s+eth0\s+\S+\s+none\b", out), out
        assert STATIC.split("/")[0] not in out, out
        out = command(vm, "show events 200")
        assert "link.addressing" not in out, out
        assert "console.password_changed" in out, out  # only the new one
        assert out.count("console.password_changed") == 1, out
    finally:
        vm.stop()
