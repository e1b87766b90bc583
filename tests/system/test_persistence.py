"""What /data keeps, seen from the console of one x86_64 box over four boots: a blank /data
is formatted on the first power-on (no configuration: socketd waits, the console forces a
new password); after a power cut, a configuration offered through fw_cfg is provisioned and
socketd runs; a WAN setting changed on the console, the new console password and the events
survive a reboot from the console; `factory-reset` wipes them, and the default credential
and the config's own addressing come back. One VM for all of it: every boot after the first
starts from what the one before left on the disk. The second boot's RTC has lost its time: the
clock is moved forward to the image's build time and socketd says so. The programs of on-box
updates work on the box (docs/update.md): at the first boot a test hook runs rauc, dbus-daemon
and bootenv and mounts a signed verity bundle (loop and dm-verity); at the second,
socketd's update bus and `rauc service` answer `show slots` with the A/B slots, A booted."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
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
    site_fw_cfg,
)

from sdwan.lab.topology import Lab
from sdwan.lab.vm import VM

pytestmark = [pytest.mark.system, pytest.mark.timeout(1500)]

SITE = 5
STATIC = "192.0.2.10/24"
GATEWAY = "192.0.2.1"
# The state, then link health's columns (health, figures, what it carries), then addressing.
NONE_LINK = re.compile(r"(?m)^wan1\s+eth0\s+\S+\s+(?:\S+\s+)*?none\b")
STATIC_LINK = re.compile(rf"(?m)^wan1\s+eth0\s+\S+\s+(?:\S+\s+)*?static\s+{re.escape(STATIC)}"
                         rf"\s+{re.escape(GATEWAY)}\b")
REPO = Path(__file__).resolve().parents[2]
BUNDLE_FW_CFG = "opt/sdwan/update-probe.raucb"
# Run by init at boot 1 (test hook): what the updater runs, by hand. The bundle is signed by
# the firmware keys the image trusts (mkbundle and mkimage take the same ones) and is mounted
# the way an install reads it: RAUC checks its signature, then maps its payload through a loop
# device and dm-verity. Boot 1 has the host's time; boot 2's clock starts at the build time,
# when a development signer made after the last commit is not valid yet.
UPDATE_TOOLS = r"""
rauc --version
dbus-daemon --version | head -n 1
/usr/libexec/sdwan/bootenv list
grep -E '^(loop|dm_mod|dm_verity) ' /proc/modules | cut -d' ' -f1 | sort | tr '\n' ' '; echo
cat /sys/firmware/qemu_fw_cfg/by_name/@BUNDLE@/raw > /run/probe.raucb
rauc mount /run/probe.raucb 2>&1 && ls /run/rauc/bundle && umount /run/rauc/bundle
echo "rauc mount: $?"
""".replace("@BUNDLE@", BUNDLE_FW_CFG)


def signed_bundle(workdir: Path) -> Path:
    """A small verity bundle for the board, signed as `make bundle` signs one."""
    tree = workdir / "slot"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=socket\nVERSION_ID=probe\n")
    # incompressible, so the payload is several verity blocks
    (tree / "blob").write_bytes(b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(4096)))
    slot = workdir / "slot.img"
    subprocess.run(["mksquashfs", str(tree), str(slot), "-noappend", "-quiet", "-no-progress",
                    "-all-root"], check=True, capture_output=True)
    out = workdir / "bundle"
    proc = subprocess.run([sys.executable, str(REPO / "board/mkbundle.py"), "qemu-x86_64",
                           "--rootfs", str(slot), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "qemu-x86_64.raucb"


def booted(vm: VM) -> None:
    vm.expect(rf"boot: ready: site-{SITE}, /data on /dev/vda4", BOOT_S)
    vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S,
                  "socketd's control socket and the login prompt")


def test_blank_data_first_boot_then_settings_survive_reboot_and_factory_reset_wipes_them(
    appliance_image: Callable[[str], Path], vms: Callable[..., VM], lab: Lab,
    tmp_path: Path,
) -> None:
    board = "qemu-x86_64"
    # The front panel's serial port is there as on the hardware; nothing plays the panel.
    vm = vms(board, appliance_image(board), panel=True,
             extra_args=[*hook_args(tmp_path, "update-tools", UPDATE_TOOLS),
                         "-fw_cfg", f"name={BUNDLE_FW_CFG},file={signed_bundle(tmp_path)}"])

    # Boot 1, the first power-on: a blank /data is formatted; without a configuration
    # socketd waits and says so, and the console still works.
    vm.start()
    vm.expect("formatting /data", BOOT_S, "the first-boot format of /data")
    vm.expect(r"boot: ready: socket, /data on /dev/vda4", BOOT_S)
    # The hook's output is on the console too: it is awaited before the login.
    tools = vm.expect_all(["no configuration at /data/socketd.toml: socketd is not running",
                           "login: ", r"(?s)test-hook: running.*?test-hook: done"],
                          SOCKETD_S)[2]
    out = tools.group(0).replace("\r", "")
    for want in (r"test-hook: rauc 1\.8\b", r"test-hook: D-Bus Message Bus Daemon 1\.",
                 r"test-hook: ORDER=A B\n", r"test-hook: A_TRY=0\n", r"test-hook: A_COMMITTED=1\n",
                 r"test-hook: dm_mod dm_verity loop \n",
                 r"Configured dm-verity device", r"test-hook: manifest\.raucm\n",
                 r"test-hook: rootfs\.img\n", r"test-hook: rauc mount: 0\n"):
        assert re.search(want, out), f"{want} missing from the test hook's output:\n{out}"
    # The default credential forces a new password (the change is an event, kept below).
    login(vm, "admin", first=True)
    out = command(vm, "show status")
    assert "socketd is not running" in out, out
    out = command(vm, "show events")
    assert "no configuration" in out or "socketd is not running" in out, out

    # Boot 2: pull the plug, then power on with a configuration offered through fw_cfg
    # (the board's watchdog on, as the appliance's configuration has it): /data and the
    # new console password survive, socketd starts and the hostname is the site's.
    vm.poweroff()
    vm.opts.fw_cfg = site_fw_cfg(lab, SiteSpec(SITE, watchdog=True), tmp_path)
    # ... and an RTC that lost its time: the clock is moved forward to the build time.
    vm.opts.extra_args = ["-rtc", "base=2001-01-01T00:00:00"]
    vm.start()
    vm.expect(r"boot: clock: 2001-01-01 \S+ is behind the build time; set to", BOOT_S,
              "the clock moved to its floor")
    # Up to the comma after the device: the line may still be arriving when it is matched.
    boot = vm.expect(r"boot: ready: ([^,\s]+), /data on ([^,\s]+),", BOOT_S).groups()
    assert boot == (f"site-{SITE}", "/dev/vda4"), boot
    assert "formatting /data" not in vm.output(), "a formatted /data was formatted again"
    vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S,
                  "socketd's control socket and the login prompt")
    login(vm, NEW_PASSWORD)
    out = command(vm, "show status")
    assert re.search(rf"site\s+{SITE} \(branch-{SITE}\)", out), out
    assert "wan1" in out and "eth0" in out, out
    assert re.search(r"clock\s+\S+ \S+ UTC \(was 2001-01-01 .* moved forward to the build "
                     r"time\), no time sync", out), out
    assert re.search(r"cert\s+(valid|expiring|not yet valid), until ", out), out
    assert "sdwan0" in out, out
    # The log ring in RAM holds socketd's log and the kernel's, as the console shows them.
    out = command(vm, "show log 200")
    assert re.search(r"socketd: .*sdwan\.site\.socketd", out), out
    assert "kernel:" in out, out
    # A WAN setting changed on the console, from the config's (none) to a static address.
    out = command(vm, "show links")
    assert NONE_LINK.search(out), out
    out = command(vm, f"set link wan1 static {STATIC} {GATEWAY}")
    assert "error" not in out.lower(), out
    poll_command(vm, "show links", STATIC_LINK, SETTLE_S, "the static address before the reboot")
    # socketd started its update bus and `rauc service` (the image has system.conf): they
    # answer with the disk's slots, A booted (rauc.slot=A from GRUB) and B beside it, not a
    # traceback or a timeout.
    out = poll_command(vm, "show slots", re.compile(r"(?m)^rootfs\.0 +A +booted\b"), SETTLE_S,
                       "RAUC's answer through socketd's update bus")
    assert re.search(r"(?m)^rootfs\.1 +B +\S+ .*/dev/disk/by-partlabel/root-b", out), out
    assert "Traceback" not in out and "did not finish" not in out, out
    out = command(vm, "show log 300")
    assert "Traceback" not in out, out

    # Boot 3: a reboot from the console goes through init's shutdown and UEFI again.
    vm.sendline("reboot")
    vm.expect("Type yes to confirm: ", CONSOLE_S)
    vm.sendline("yes")
    vm.expect("shutdown: /data unmounted", SHUTDOWN_S, "the orderly shutdown")
    vm.expect("grub: slot ", FIRMWARE_S, "the firmware starting GRUB again")
    booted(vm)
    # The changed password is the one in force: it was persisted.
    login(vm, NEW_PASSWORD)
    out = command(vm, "show status")
    assert re.search(rf"site\s+{SITE} \(branch-{SITE}\)", out), out
    # socketd applies the stored setting in the background after its start.
    poll_command(vm, "show links", STATIC_LINK, SETTLE_S, "the static address after the reboot")
    # The events of the boots before are still there: the password change of the first
    # boot, the setting and the reboot of the second.
    out = command(vm, "show events 200")
    for kind in ("console.password_changed", "link.addressing", "console.reboot",
                 "clock.floor"):
        assert kind in out, f"{kind} missing from the events after the reboot:\n{out}"
    # The reboot was orderly: socketd was stopped (which disarms the watchdog), not reset.
    assert "previous run: stopped" in out and "watchdog.reset" not in out, out

    # Boot 4: factory-reset erases /data and reboots; fw_cfg provisions the config again.
    vm.sendline("factory-reset")
    vm.expect(r"Type factory-reset \(or yes\) to confirm: ", CONSOLE_S)
    vm.sendline("factory-reset")
    vm.expect("grub: slot ", SHUTDOWN_S + FIRMWARE_S, "the reboot after the factory reset")
    booted(vm)
    # Only the default credential works again, with its forced change.
    login(vm, "admin", first=True, new_password="another-pass-7")
    out = command(vm, "show links")
    assert NONE_LINK.search(out), out
    assert STATIC.split("/")[0] not in out, out
    # The old events are gone: of the password changes, only this boot's is listed.
    out = command(vm, "show events 200")
    assert "link.addressing" not in out, out
    assert "console.reboot" not in out, out
    assert "console.password_changed" in out, out  # only the new one
    assert out.count("console.password_changed") == 1, out
