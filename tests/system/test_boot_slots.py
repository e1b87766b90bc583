"""A/B boot slots on qemu-x86_64: GRUB picks the slot from grubenv or its copy grubenv2
(board/boardlib.py grub_cfg, sdwan.appliance.bootenv, docs/update.md "Boot selection"). Five
boots: a new image comes up on slot A, committed, counting no try (its boot is counted in
A_LOOPS instead); with the slot image in
root-b and ORDER="B A" it comes up on B and counts the try; with root-b empty, ORDER="B A"
and slot A not committed and out of tries, it gives B up, skips A, gives the good slots their
tries back, reboots by itself and comes up on A, never stopping at a GRUB prompt; with
grubenv torn it reads the copy, a committed B that cannot be loaded is marked so, and
rcS writes grubenv again; with a committed A at the end of its boots in a row that did not
stay up (a reboot loop), A is passed over and the committed B comes up, its count cleared by
init's commit deadline 60 s after boot (no configuration). grubenv is read from
and written to copies of the disk with mtools."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import BOOT_S, hook_args

from sdwan.appliance import bootenv
from sdwan.lab.vm import VM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "board"))
import boardlib  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

BOARD = "qemu-x86_64"
GRUBENV = "::EFI/BOOT/grubenv"
GRUBENV2 = "::EFI/BOOT/grubenv2"
# What the guest shows of its boot: the command line GRUB gave, the partition links rcS made,
# the ESP's mount and the booted slot's count of boots as GRUB left it.
REPORT = """\
echo "cmdline $(cat /proc/cmdline)"
for l in /dev/disk/by-partlabel/*; do echo "partlabel $(basename "$l") $(readlink "$l")"; done
echo "esp $(awk '$2 == "/boot/efi" { print $1, $3, substr($4, 1, 3) }' /proc/mounts)"
slot=$(tr ' ' '\\n' < /proc/cmdline | sed -n 's/^rauc[.]slot=//p')
echo "loops $(/usr/libexec/sdwan/bootenv list | grep "^${slot}_LOOPS=")"
"""
# ... and then waits (up to 150 s) for the commit deadline to clear that count: a box without
# a configuration, up 60 s.
SETTLED = REPORT + """\
n=0
while [ $n -lt 150 ] && ! /usr/libexec/sdwan/bootenv list | grep -qx "${slot}_LOOPS=0"; do
    sleep 1; n=$((n + 1))
done
up=$(cut -d. -f1 /proc/uptime)
echo "settled $(/usr/libexec/sdwan/bootenv list | grep "^${slot}_LOOPS=") up $up"
"""


def part(name: str) -> boardlib.Placed:
    layout = boardlib.disk_layout(boardlib.load_board(BOARD))
    return next(p for p in layout.partitions if p.name == name)


def esp_target(raw: Path) -> str:
    return f"{raw}@@{part('esp').start * 512}"


def read_grubenv(raw: Path) -> dict[str, str]:
    """The variables; GRUB writes both copies alike."""
    first, second = (subprocess.run(["mtype", "-i", esp_target(raw), name], check=True,
                                    capture_output=True, timeout=30).stdout
                     for name in (GRUBENV, GRUBENV2))
    assert bootenv.parse(first) == bootenv.parse(second)  # each exactly a valid block
    return bootenv.parse(first)


def edit_grubenv(raw: Path, tmp: Path, **values: str) -> None:
    """The box's variables changed in both copies, as its backend changes them."""
    env = {**read_grubenv(raw), **values}
    block = tmp / "grubenv"
    block.write_bytes(bootenv.render(env))
    for name in (GRUBENV, GRUBENV2):
        subprocess.run(["mcopy", "-o", "-i", esp_target(raw), str(block), name], check=True,
                       capture_output=True, timeout=30)
    assert read_grubenv(raw) == env


def grub_lines(out: str) -> list[str]:
    return [m.strip() for m in re.findall(r"grub: [^\r\n]*", out)]


def guest_disk(vm: VM, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm.dir / "disk.qcow2"), str(dest)],
                   check=True, timeout=120)
    return dest


def boot(vms: Callable[..., VM], image: Path, tmp: Path, slot: str,
         report: str = REPORT) -> tuple[VM, str]:
    """Boots image until the test hook reports; the slot the initramfs mounted must be
    `slot`. Returns the VM (powered off) and the hook's report."""
    vm = vms(BOARD, image, extra_args=hook_args(tmp, f"report-{image.stem}", report))
    vm.start()
    partition = {"A": "root-a", "B": "root-b"}[slot]
    number = next(s.number for s in boardlib.boot_slots(boardlib.load_board(BOARD))
                  if s.bootname == slot)
    vm.expect(rf"initramfs: root is /dev/vda{number} \({partition}\)", BOOT_S,
              f"the initramfs mounting slot {slot}")
    vm.expect("test-hook: done", BOOT_S + (150 if report is SETTLED else 0),
              "the test hook's report")
    out = vm.output()
    vm.poweroff()
    assert "grub>" not in out and "Minimal BASH-like" not in out, out[-3000:]
    cmdline = re.search(r"test-hook: cmdline (.*?)\r?$", out, re.M)
    assert cmdline, out[-3000:]
    assert f" rauc.slot={slot} sdwan.root={partition}" in cmdline.group(1), cmdline.group(1)
    return vm, out


def test_grub_boots_the_slot_grubenv_names_and_falls_back(
    appliance_image: Callable[[str], Path], vms: Callable[..., VM], tmp_path: Path,
) -> None:
    for tool in ("mtype", "mcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (run `make setup`)")
    image = appliance_image(BOARD)
    info = boardlib.load_board(BOARD)
    tries = info.boot_tries
    slot_image = image.with_name(f"{BOARD}.rootfs.img")
    assert slot_image.is_file(), "mkimage writes the slot image beside the disk image"

    # (a) a new image: slot A, committed at the factory, so no try is counted; B empty. Its
    # boot is counted in A_LOOPS (the commit deadline clears that 60 s after boot: (e))
    vm, out = boot(vms, image, tmp_path, "A")
    assert "test-hook: loops A_LOOPS=1" in out, out[-3000:]
    # read-only: only bootenv writes it, into grubenv's own sectors
    # (getty's login prompt may come in front of a line)
    assert re.search(r"test-hook: esp /dev/vda1 vfat ro,\r?$", out, re.M), out[-3000:]
    links = dict(re.findall(r"test-hook: partlabel (\S+) \.\./\.\./(\S+?)\r?$", out, re.M))
    assert links == {"esp": "vda1", "root-a": "vda2", "root-b": "vda3", "data": "vda4"}, links
    assert grub_lines(out) == ["grub: slot A (root-a), committed"], out[-3000:]
    assert "bootenv:" not in out, "rcS repaired a new image's grubenv"
    env = read_grubenv(guest_disk(vm, tmp_path / "a.raw"))
    factory = bootenv.parse(boardlib.initial_grubenv(info))
    assert env["A_LOOPS"] in ("0", "1") and {**env, "A_LOOPS": "0"} == factory, env

    # (b) the slot image in root-b, B first and good but not committed: slot B, one try
    b_disk = tmp_path / "b.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(b_disk)], check=True, timeout=60)
    with b_disk.open("r+b") as f, slot_image.open("rb") as s:
        f.seek(part("root-b").start * 512)
        shutil.copyfileobj(s, f)
    edit_grubenv(b_disk, tmp_path, ORDER="B A", B_OK="1", B_TRY="0")
    vm, out = boot(vms, b_disk, tmp_path, "B")
    assert grub_lines(out) == [f"grub: slot B (root-b), try 1 of {tries}"], out[-3000:]
    env = read_grubenv(guest_disk(vm, tmp_path / "b.raw"))
    assert (env["B_TRY"], env["B_COMMITTED"], env["A_TRY"]) == ("1", "0", "0"), env
    assert " sdwan.trial=1" in out, "a boot on trial says so to the commit deadline"

    # (c) root-b empty but B first and good, A not committed and out of tries: B cannot be
    # loaded, A is skipped, both get their tries back, GRUB reboots, and A comes up
    c_disk = tmp_path / "c.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(c_disk)], check=True, timeout=60)
    edit_grubenv(c_disk, tmp_path, ORDER="B A", B_OK="1", B_TRY="0", A_TRY=str(tries),
                 A_COMMITTED="0")
    vm, out = boot(vms, c_disk, tmp_path, "A")
    assert grub_lines(out) == [
        f"grub: slot B (root-b), try 1 of {tries}",
        "grub: slot B (root-b) cannot be loaded: no more tries",
        "grub: slot A (root-a) has no tries left",
        "grub: no slot can be booted: the good ones get their tries back; rebooting",
        f"grub: slot B (root-b), try 1 of {tries}",
        "grub: slot B (root-b) cannot be loaded: no more tries",
        f"grub: slot A (root-a), try 1 of {tries}",
    ], out[-3000:]
    env = read_grubenv(guest_disk(vm, tmp_path / "c.raw"))
    assert env == {**factory, "ORDER": "B A", "A_TRY": "1", "A_COMMITTED": "0",
                   "B_OK": "1", "B_TRY": str(tries), "B_LOADFAIL": "1"}, env

    # (d) grubenv torn (zeros), its copy whole: B committed first but root-b empty. GRUB
    # reads the copy; B cannot be loaded and is marked so (in the copy, the only valid
    # block), keeping its commit; A, committed, boots uncounted; rcS writes grubenv again
    # from the copy, through the read-only ESP's device.
    d_disk = tmp_path / "d.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(d_disk)], check=True, timeout=60)
    edit_grubenv(d_disk, tmp_path, ORDER="B A", B_OK="1", B_COMMITTED="1")
    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(boardlib.GRUBENV_SIZE))
    subprocess.run(["mcopy", "-o", "-i", esp_target(d_disk), str(zeros), GRUBENV], check=True,
                   capture_output=True, timeout=30)
    vm, out = boot(vms, d_disk, tmp_path, "A")
    assert grub_lines(out) == [
        "grub: grubenv is damaged: its copy grubenv2 is used",
        "grub: slot B (root-b), committed",
        "grub: slot B (root-b) cannot be loaded: no more tries",
        "grub: slot A (root-a), committed",
    ], out[-3000:]
    assert re.search(r"bootenv: \S*grubenv rewritten from \S*grubenv2", out), out[-3000:]
    env = read_grubenv(guest_disk(vm, tmp_path / "d.raw"))
    # B's boot was not counted: an empty slot carries no firmware that clears the count
    assert "test-hook: loops A_LOOPS=1" in out, out[-3000:]
    assert {**env, "A_LOOPS": "0"} == {**factory, "ORDER": "B A", "B_OK": "1",
                                       "B_COMMITTED": "1", "B_TRY": str(tries),
                                       "B_LOADFAIL": "1"}, env

    # (e) the slot image in root-b, both committed; A first, but its last boot_loops boots
    # ended before it stayed up: GRUB passes it over and B comes up, its own count shown;
    # the commit deadline clears B's count once up 60 s (no configuration) and says so
    loops = info.boot_loops
    edit_grubenv(b_disk, tmp_path, ORDER="A B", A_LOOPS=str(loops), B_OK="1",
                 B_COMMITTED="1", B_LOOPS="4")
    vm, out = boot(vms, b_disk, tmp_path, "B", SETTLED)
    assert "test-hook: loops B_LOOPS=5" in out, out[-3000:]
    settled = re.search(r"test-hook: settled B_LOOPS=0 up (\d+)", out)
    assert settled and int(settled.group(1)) >= 60, out[-3000:]
    assert grub_lines(out) == [
        f"grub: slot A (root-a) is in a reboot loop ({loops} boots in a row): passed over",
        f"grub: slot B (root-b), committed: boot 5 of {loops} in a row that did not stay up",
    ], out[-3000:]
    assert "sdwan.trial" not in out
    assert "bootenv: slot B stayed up after 4 boots in a row that did not" in out, out[-3000:]
    env = read_grubenv(guest_disk(vm, tmp_path / "e.raw"))
    assert env == {**factory, "ORDER": "A B", "A_LOOPS": str(loops), "B_OK": "1",
                   "B_COMMITTED": "1"}, env
