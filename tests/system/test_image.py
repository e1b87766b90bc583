"""The appliance image booted in QEMU the way the hardware boots it (UEFI, GPT, squashfs
root, /data), seen from the serial console as a field engineer sees it. The x86_64 image's
first boot, provisioning, reboot and factory reset are one VM's life in
test_persistence.py. The aarch64 image, slow under TCG on a small host, runs with its
watchdog armed and must stay up for several of its periods: a slow start never makes the box
reset itself."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import BOOT_S, SETTLE_S, SOCKETD_S, command, login, poll_command

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
    vm.expect(r"initramfs: root is /dev/vda2 \(root-a\)", BOOT_S, "the initramfs finding slot A")
    vm.expect(r"boot: ready: site-8, /data on /dev/vda4", BOOT_S)
    # socketd running proves the cross-compiled cffi modules load on the emulated CPU.
    vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S,
                  "socketd and the console's login prompt")
    # The slow start-up under TCG is covered by the start-up timeout; once socketd runs, the
    # running timeout (15 s) is in force and the box must stay up through several periods.
    login(vm, "admin", first=True)
    poll_command(vm, "show log 300", re.compile(r"watchdog /dev/watchdog.* armed: timeout 15 s"),
                 SETTLE_S, "the watchdog armed with its running timeout")
    booted = vm.output().count("initramfs: root is")
    # Nothing to wait for but time: four watchdog periods in which no reset may happen.
    time.sleep(4 * 15 + 5)
    out = command(vm, "show status")
    assert vm.output().count("initramfs: root is") == booted, vm.tail()
    assert re.search(r"site\s+8 ", out), out
