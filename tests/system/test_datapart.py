"""First boot on a disk bigger than the image: the /data partition fills the disk, grown when
the image has one, created when it has none, then formatted (board/common/rootfs/etc/init.d/rcS).
Seen from the console and, after power-off, from the GPT the guest wrote."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import BOOT_S, hook_args

from sdwan.lab.vm import VM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "board"))
import boardlib  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

BOARD = "qemu-x86_64"
MIB = 1024 * 1024
LAYOUT = boardlib.load_board(BOARD).partitions
DATA_NUMBER = [p.name for p in LAYOUT].index("data") + 1
# what the partitions before data take (the ESP and both root slots)
BEFORE_DATA_MIB = sum(p.size_mib for p in LAYOUT if p.name != "data")
# What the guest reports once /data is mounted: its filesystem, its size, the partition's.
REPORT = """\
echo "fs $(awk '$2 == "/data" { print $1, $3 }' /proc/mounts)"
echo "df-kib $(df -k /data | awk 'NR == 2 { print $2 }')"
echo "part-sectors $(cat /sys/class/block/vda4/size)"
"""


def disk_copy(image: Path, dest: Path, size_mib: int, delete_data: bool = False) -> Path:
    """A sparse raw copy of the image, the data partition deleted if asked, then the file
    grown the way a bigger disk is (flash.sh writes the image at its start)."""
    subprocess.run(["cp", "--sparse=always", str(image), str(dest)], check=True, timeout=60)
    if delete_data:
        number = partitions(dest)["data"][0]
        subprocess.run(["sfdisk", "-q", "--delete", str(dest), str(number)], check=True,
                       capture_output=True, timeout=30)
        assert "data" not in partitions(dest)
    assert dest.stat().st_size < size_mib * MIB
    with dest.open("r+b") as f:
        f.truncate(size_mib * MIB)
    return dest


def partitions(raw: Path) -> dict[str, tuple[int, int, int]]:
    """GPT name -> (number, start, size in sectors), from sfdisk's dump."""
    out = subprocess.run(["sfdisk", "-d", str(raw)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    found = {}
    for m in re.finditer(r"^\S*?(\d+) : start=\s*(\d+), size=\s*(\d+),.*name=\"([^\"]+)\"",
                         out, re.M):
        found[m.group(4)] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return found


def guest_disk(vm: VM, dest: Path) -> Path:
    """The VM's disk as the guest left it (its copy-on-write overlay flattened to raw)."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm.dir / "disk.qcow2"), str(dest)],
                   check=True, timeout=120)
    return dest


def boot_and_report(vm: VM, steps: list[str]) -> dict[str, str]:
    vm.start()
    for step in steps:
        vm.expect(step, BOOT_S, f"the first boot saying {step!r}")
    vm.expect("formatting /data", BOOT_S, "the first-boot format of /data")
    vm.expect(r"boot: ready: socket, /data on /dev/vda4", BOOT_S)
    vm.expect("test-hook: done", BOOT_S, "the test hook reporting /data")
    report = dict(re.findall(r"^test-hook: (fs|df-kib|part-sectors) (.*?)\r?$",
                             vm.output(), re.M))
    assert set(report) == {"fs", "df-kib", "part-sectors"}, vm.tail()
    assert "ERROR" not in vm.output(), vm.tail()
    return report


def check_disk(raw: Path, size_mib: int, part_sectors: int) -> None:
    """The GPT the guest wrote: the data partition ends at the disk's end, and sfdisk finds
    the backup GPT there (it warns when the backup is anywhere else)."""
    proc = subprocess.run(["sfdisk", "-d", str(raw)], capture_output=True, text=True,
                          timeout=30, check=True)
    assert "backup GPT" not in proc.stderr and "mismatch" not in proc.stderr, proc.stderr
    last_lba = int(re.search(r"^last-lba: (\d+)$", proc.stdout, re.M).group(1))
    assert last_lba == size_mib * MIB // 512 - 34, proc.stdout
    number, start, size = partitions(raw)["data"]
    assert number == DATA_NUMBER and size == part_sectors, proc.stdout
    # starts aligned to 1 MiB; ends at the last usable sector, or (a partition sfdisk
    # creates) at the last 1 MiB boundary before it
    assert start % 2048 == 0 and 0 <= last_lba - (start + size - 1) < 2048, proc.stdout
    assert "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4" in proc.stdout, proc.stdout


def check_report(report: dict[str, str], size_mib: int) -> int:
    assert report["fs"] == "/dev/vda4 ext4", report
    part = int(report["part-sectors"])
    # the disk less the ESP, the root slots, the 1 MiB before them and the backup GPT
    expected_mib = size_mib - 1 - BEFORE_DATA_MIB
    assert expected_mib - 1 <= part / 2048 <= expected_mib, report
    # ext4's own overhead (journal, inode tables) is a few percent at this size
    df_mib = int(report["df-kib"]) / 1024
    assert 0.85 * expected_mib <= df_mib <= expected_mib, report
    return part


def test_first_boot_grows_data_to_the_end_of_a_bigger_disk(
    appliance_image: Callable[[str], Path], vms: Callable[..., VM], tmp_path: Path,
) -> None:
    size_mib = BEFORE_DATA_MIB + 1 + 110
    disk = disk_copy(appliance_image(BOARD), tmp_path / "disk.img", size_mib)
    assert partitions(disk)["data"][2] == 16 * 2048  # the image's small data partition
    vm = vms(BOARD, disk, extra_args=hook_args(tmp_path, "report", REPORT))
    report = boot_and_report(vm, [
        r"boot: /data: growing /dev/vda4 from 16 MiB to the end of /dev/vda",
        "boot: /data: moving the backup GPT of /dev/vda to the end of the disk",
        r"boot: /data: /dev/vda4 is now \d+ MiB",
    ])
    part = check_report(report, size_mib)
    vm.poweroff()
    check_disk(guest_disk(vm, tmp_path / "after.img"), size_mib, part)


def test_first_boot_creates_a_missing_data_partition(
    appliance_image: Callable[[str], Path], vms: Callable[..., VM], tmp_path: Path,
) -> None:
    # room for a data partition of about 150 MiB after the image's partitions
    size_mib = BEFORE_DATA_MIB + 1 + 150
    disk = disk_copy(appliance_image(BOARD), tmp_path / "disk.img", size_mib,
                     delete_data=True)
    vm = vms(BOARD, disk, extra_args=hook_args(tmp_path, "report", REPORT))
    report = boot_and_report(vm, [
        r"boot: /data: no partition named 'data' on /dev/vda: creating one in the \d+ MiB",
        r"boot: /data: created /dev/vda4 \(\d+ MiB\)",
    ])
    assert "/data is in RAM" not in vm.output(), vm.tail()
    part = check_report(report, size_mib)
    vm.poweroff()
    check_disk(guest_disk(vm, tmp_path / "after.img"), size_mib, part)
