"""bootenv on a read-only mount, as on the box's ESP: grubenv and its copy are written through
the block device into the files' own blocks (FIBMAP), the file system itself never written.
A loop device with ext4 stands in for the ESP (this host's kernel may lack vfat; the path is
the same, and the QEMU tests run it on the real ESP): a 4 KiB block holds the 1 KiB file,
so the block's slack is written back as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdwan.appliance import bootenv

pytestmark = [pytest.mark.system, pytest.mark.timeout(120),
              pytest.mark.xdist_group("loop-devices")]

CONF = ("[system]\ncompatible=t\nbootloader=custom\n[slot.rootfs.0]\ndevice=/dev/null\n"
        "bootname=A\n[slot.rootfs.1]\ndevice=/dev/null\nbootname=B\n")
FACTORY = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "A_COMMITTED": "1", "A_LOADFAIL": "0",
           "B_OK": "0", "B_TRY": "0", "B_COMMITTED": "0", "B_LOADFAIL": "0",
           "BOOT_TRIES": "3", "SDWAN_END": "1"}


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture
def esp(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: a loop device and a mount")
    for tool in ("losetup", "mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed", pytrace=False)
    backing = tmp_path / "esp.img"
    with open(backing, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    run("mkfs.ext4", "-q", "-b", "4096", backing)
    dev = run("losetup", "--find", "--show", backing).strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        run("mount", dev, mnt)
        (mnt / "EFI").mkdir()
        block = bootenv.render(FACTORY)
        for name in ("grubenv", "grubenv2"):
            (mnt / "EFI" / name).write_bytes(block)
        run("umount", mnt)
        run("mount", "-o", "ro", dev, mnt)
        yield mnt, dev
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=30)


def fs_digest(dev: str, skip: list[tuple[int, int]]) -> str:
    """The device's bytes but for the given (offset, length) ranges."""
    data = bytearray(Path(dev).read_bytes())
    for off, n in skip:
        data[off:off + n] = bytes(n)
    return hashlib.sha256(data).hexdigest()


def test_a_read_only_mount_is_written_through_the_files_own_blocks(
    esp: tuple[Path, str], tmp_path: Path,
) -> None:
    mnt, dev = esp
    conf = tmp_path / "system.conf"
    conf.write_text(CONF)
    paths = bootenv.Paths(mnt / "EFI" / "grubenv", conf, tmp_path / "board.toml")
    raws = [bootenv._raw(p) for p in (paths.grubenv, paths.copy)]
    assert all(r.device == dev and r.block == 4096 for r in raws), raws
    files = [(r.offsets[0], bootenv.SIZE) for r in raws]
    before = fs_digest(dev, files)
    with pytest.raises(OSError):  # the mount itself refuses writes
        paths.grubenv.write_bytes(b"x")

    env = bootenv.load(paths).values
    bootenv.save(paths, bootenv.set_primary(bootenv.set_state(env, "B", False), "B", ["A", "B"]))
    # read back through the device, and through a fresh mount
    assert bootenv.load(paths).values["ORDER"] == "B A"
    assert fs_digest(dev, files) == before, "something beside the two files' bytes changed"
    run("umount", mnt)
    run("mount", "-o", "ro", dev, mnt)
    for p in (paths.grubenv, paths.copy):
        assert bootenv.parse(p.read_bytes())["ORDER"] == "B A"
    # the block's slack past the file's end came back as it was
    with open(dev, "rb") as f:
        f.seek(raws[0].offsets[0] + bootenv.SIZE)
        assert f.read(4096 - bootenv.SIZE) == bytes(4096 - bootenv.SIZE)
