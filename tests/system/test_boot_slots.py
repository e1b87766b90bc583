"""A/B boot slots on qemu-x86_64: GRUB picks the slot from grubenv as RAUC's grub backend
expects (board/boardlib.py grub_cfg, docs/image.md "Boot slots"). Three boots: a new image
comes up on slot A and GRUB counts the try; with the slot image in root-b and ORDER="B A"
it comes up on B; with root-b empty, ORDER="B A" and slot A out of tries, it gives B up,
skips A, gives the good slots their tries back, reboots by itself and comes up on A, never
stopping at a GRUB prompt. grubenv is read from and written to copies of the disk with
mtools and grub-editenv, as RAUC will change it from the running system."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import BOOT_S, hook_args

from sdwan.appliance.raucstatus import parse_grubenv
from sdwan.lab.vm import VM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "board"))
import boardlib  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

BOARD = "qemu-x86_64"
GRUBENV = "::EFI/BOOT/grubenv"
# What the guest shows of its boot: the command line GRUB gave, the partition links rcS made
# and the ESP's mount.
REPORT = """\
echo "cmdline $(cat /proc/cmdline)"
for l in /dev/disk/by-partlabel/*; do echo "partlabel $(basename "$l") $(readlink "$l")"; done
echo "esp $(awk '$2 == "/boot/efi" { print $1, $3 }' /proc/mounts)"
"""


def part(name: str) -> boardlib.Placed:
    layout = boardlib.disk_layout(boardlib.load_board(BOARD))
    return next(p for p in layout.partitions if p.name == name)


def esp_target(raw: Path) -> str:
    return f"{raw}@@{part('esp').start * 512}"


def read_grubenv(raw: Path) -> dict[str, str]:
    data = subprocess.run(["mtype", "-i", esp_target(raw), GRUBENV], check=True,
                          capture_output=True, timeout=30).stdout
    assert len(data) == boardlib.GRUBENV_SIZE, len(data)
    return parse_grubenv(data)


def edit_grubenv(raw: Path, tmp: Path, **values: str) -> None:
    """grub-editenv on a copy of the ESP's grubenv, written back in place (RAUC's way)."""
    env = tmp / "grubenv"
    env.unlink(missing_ok=True)
    subprocess.run(["mcopy", "-n", "-i", esp_target(raw), GRUBENV, str(env)], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["grub-editenv", str(env), "set",
                    *[f"{k}={v}" for k, v in values.items()]], check=True, timeout=30)
    subprocess.run(["mcopy", "-o", "-i", esp_target(raw), str(env), GRUBENV], check=True,
                   capture_output=True, timeout=30)
    assert {k: read_grubenv(raw)[k] for k in values} == values


def guest_disk(vm: VM, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm.dir / "disk.qcow2"), str(dest)],
                   check=True, timeout=120)
    return dest


def boot(vms: Callable[..., VM], image: Path, tmp: Path, slot: str) -> tuple[VM, str]:
    """Boots image until the test hook reports; the slot the initramfs mounted must be
    `slot`. Returns the VM (powered off) and the hook's report."""
    vm = vms(BOARD, image, extra_args=hook_args(tmp, f"report-{image.stem}", REPORT))
    vm.start()
    partition = {"A": "root-a", "B": "root-b"}[slot]
    number = next(s.number for s in boardlib.boot_slots(boardlib.load_board(BOARD))
                  if s.bootname == slot)
    vm.expect(rf"initramfs: root is /dev/vda{number} \({partition}\)", BOOT_S,
              f"the initramfs mounting slot {slot}")
    vm.expect("test-hook: done", BOOT_S, "the test hook's report")
    out = vm.output()
    vm.poweroff()
    assert "grub>" not in out and "Minimal BASH-like" not in out, out[-3000:]
    cmdline = re.search(r"^test-hook: cmdline (.*?)\r?$", out, re.M)
    assert cmdline, out[-3000:]
    assert f" rauc.slot={slot} sdwan.root={partition}" in cmdline.group(1), cmdline.group(1)
    return vm, out


def test_grub_boots_the_slot_grubenv_names_and_falls_back(
    appliance_image: Callable[[str], Path], vms: Callable[..., VM], tmp_path: Path,
) -> None:
    for tool in ("mtype", "grub-editenv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (run `make setup`)")
    image = appliance_image(BOARD)
    info = boardlib.load_board(BOARD)
    tries = info.boot_tries
    slot_image = image.with_name(f"{BOARD}.rootfs.img")
    assert slot_image.is_file(), "mkimage writes the slot image beside the disk image"

    # (a) a new image: slot A, one try counted; B empty and not good
    vm, out = boot(vms, image, tmp_path, "A")
    assert re.search(r"^test-hook: esp /dev/vda1 vfat\r?$", out, re.M), out[-3000:]
    links = dict(re.findall(r"^test-hook: partlabel (\S+) \.\./\.\./(\S+?)\r?$", out, re.M))
    assert links == {"esp": "vda1", "root-a": "vda2", "root-b": "vda3", "data": "vda4"}, links
    env = read_grubenv(guest_disk(vm, tmp_path / "a.raw"))
    assert env == {"ORDER": "A B", "A_OK": "1", "A_TRY": "1", "B_OK": "0", "B_TRY": "0"}, env

    # (b) the slot image in root-b, B first and good: slot B
    b_disk = tmp_path / "b.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(b_disk)], check=True, timeout=60)
    with b_disk.open("r+b") as f, slot_image.open("rb") as s:
        f.seek(part("root-b").start * 512)
        shutil.copyfileobj(s, f)
    edit_grubenv(b_disk, tmp_path, ORDER="B A", B_OK="1", B_TRY="0")
    vm, out = boot(vms, b_disk, tmp_path, "B")
    env = read_grubenv(guest_disk(vm, tmp_path / "b.raw"))
    assert (env["B_TRY"], env["A_TRY"]) == ("1", "0"), env

    # (c, d) root-b empty but B first and good, A out of tries: B cannot be loaded, A is
    # skipped, both get their tries back, GRUB reboots, and A comes up
    c_disk = tmp_path / "c.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(c_disk)], check=True, timeout=60)
    edit_grubenv(c_disk, tmp_path, ORDER="B A", B_OK="1", B_TRY="0", A_TRY=str(tries))
    vm, out = boot(vms, c_disk, tmp_path, "A")
    grub = [m.strip() for m in re.findall(r"grub: [^\r\n]*", out)]
    assert grub == [
        f"grub: slot B (root-b), try 1 of {tries}",
        "grub: slot B (root-b) cannot be loaded: no more tries",
        "grub: slot A (root-a) has no tries left",
        "grub: no slot can be booted: the good ones get their tries back; rebooting",
        f"grub: slot B (root-b), try 1 of {tries}",
        "grub: slot B (root-b) cannot be loaded: no more tries",
        f"grub: slot A (root-a), try 1 of {tries}",
    ], grub
    env = read_grubenv(guest_disk(vm, tmp_path / "c.raw"))
    assert env == {"ORDER": "B A", "A_OK": "1", "A_TRY": "1", "B_OK": "1",
                   "B_TRY": str(tries)}, env
