"""The appliance image booted in QEMU the way the hardware boots it (UEFI, GPT, squashfs
root, /data), seen from the serial console as a field engineer sees it. The x86_64 image's
first boot, provisioning, reboot and factory reset are one VM's life in
test_persistence.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sites import BOOT_S, SOCKETD_S

from sdwan.lab.vm import VM

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]


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
