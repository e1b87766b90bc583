"""Update bundles for the QEMU update tests and bench/boot, made from the image build's slot
image (build/images/<board>.rootfs.img) the way a release makes one: the squashfs unpacked
(as root: owners and modes kept), changed, packed again with the image build's own
mksquashfs options (boardlib.slot_squashfs_args), then signed by board/mkbundle.py with the
firmware keys the image trusts.

* newer: /etc/os-release says VERSION_ID=<version>; the bundle's version is that too;
* broken: the same, but socketd cannot start (/usr/bin/socketd prints a line and exits 1),
  everything else (busybox, init, the console, RAUC) intact;
* other_keys: the shipped slot image signed by another development firmware CA;
* other_board: the shipped slot image as a bundle for another board (its compatible);
* truncated: the newer bundle cut short.

A box gets them on a second virtio disk: a squashfs of the bundles (disk_args), which
MOUNT_HOOK (a test-hook script) mounts on BUNDLES_DIR. fw_cfg is no way for them: the guest
reads an fw_cfg file through sysfs one page at a time and skips to each page's offset byte by
byte, so 4 MiB took 117 s under TCG and 8 MiB 514 s.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdwan.lab.vm import IMAGES, REPO

sys.path.insert(0, str(REPO / "board"))
import boardlib  # noqa: E402 - board/boardlib.py: the slot image's build options

BUNDLES_DIR = "/run/bundles"  # where MOUNT_HOOK mounts the bundle disk in the guest
DISK_SERIAL = "bundles"
# A test-hook script: the bundle disk, found by its serial, mounted read-only where the
# console's `update` can name its files (as a USB stick mounted on the box).
MOUNT_HOOK = f"""\
for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = {DISK_SERIAL} ] && dev=/dev/${{d##*/}}
done
mkdir -p {BUNDLES_DIR}
mount -t squashfs -o ro "$dev" {BUNDLES_DIR} &&
    echo "bundles mounted: $(ls {BUNDLES_DIR} | tr '\\n' ' ')"
"""
BROKEN_SOCKETD = """\
#!/bin/sh
# A test build whose socketd cannot start: its slot must never be committed.
echo "socketd: this test build cannot start"
exit 1
"""


class BundleBuildError(Exception):
    pass


def slot_image(board: str) -> Path:
    return IMAGES / f"{board}.rootfs.img"


def _run(cmd: list[str], timeout: float = 600, **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise BundleBuildError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


def unpack(rootfs: Path, dest: Path) -> Path:
    if os.geteuid() != 0:
        raise BundleBuildError("unpacking a slot image keeps its owners only as root")
    shutil.rmtree(dest, ignore_errors=True)
    _run(["unsquashfs", "-no-progress", "-d", str(dest), str(rootfs)])
    return dest


def pack(root: Path, out: Path, epoch: int | None = None) -> Path:
    epoch = boardlib.source_epoch() if epoch is None else epoch
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    _run(["mksquashfs", str(root), str(out), *boardlib.slot_squashfs_args(epoch)], env=env)
    return out


def set_version(root: Path, version: str) -> None:
    rel = root / "etc/os-release"
    lines = [f"VERSION_ID={version}" if ln.startswith("VERSION_ID=") else ln
             for ln in rel.read_text().splitlines()]
    if f"VERSION_ID={version}" not in lines:
        raise BundleBuildError(f"{rel} has no VERSION_ID")
    rel.write_text("\n".join(lines) + "\n")


def break_socketd(root: Path) -> None:
    socketd = root / "usr/bin/socketd"
    if not socketd.is_file():
        raise BundleBuildError(f"no socketd at {socketd} in the slot image")
    socketd.unlink()
    socketd.write_text(BROKEN_SOCKETD)
    socketd.chmod(0o755)


def make_bundle(board: str, rootfs: Path, version: str, out_dir: Path,
                keys: Path | None = None) -> Path:
    """board/mkbundle.py, which checks the bundle as a box does before it says it is made."""
    cmd = [sys.executable, str(REPO / "board/mkbundle.py"), board, "--rootfs", str(rootfs),
           "--version", version, "--out", str(out_dir)]
    if keys is not None:
        cmd += ["--keys", str(keys)]
    _run(cmd)
    return out_dir / f"{board}.raucb"


def other_firmware_keys(dest: Path) -> Path:
    """A development firmware CA and signer of their own: what another checkout signs with."""
    from sdwan.pop.pki import main as pki_main

    ca = dest / "ca"
    if not (dest / "keys/signer.key").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        keys = dest / "keys"
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                rc = pki_main(["firmware-ca", str(ca), "--name", "stranger", "--development"])
                rc = rc or pki_main(["firmware-signer", str(ca), "--out", str(keys)])
            finally:
                sys.stdout = stdout
        if rc:
            raise BundleBuildError("socket-pki could not make the other firmware keys")
        shutil.copyfile(ca / "firmware-ca.pem", keys / "firmware-ca.pem")
    return dest / "keys"


def test_version(base: str | None = None) -> str:
    """A version above the image's, marked as a test build of this commit."""
    major, minor, patch = (base or boardlib.firmware_version()).split(".")[:3]
    return f"{major}.{minor}.{int(patch) + 1}-test+{boardlib.source_commit()}"


@dataclass
class TestBundles:
    """Builds each bundle on first use and keeps it (a few seconds each) for the session."""

    board: str
    workdir: Path
    version: str = field(default_factory=test_version)
    other_board: str = "qemu-aarch64"
    times: dict[str, float] = field(default_factory=dict)
    _made: dict[str, Path] = field(default_factory=dict)

    __test__ = False  # not a pytest class despite its name

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _slot(self, name: str, broken: bool) -> Path:
        rootfs = slot_image(self.board)
        if not rootfs.is_file():
            raise BundleBuildError(f"no slot image {rootfs}: run `make image BOARD={self.board}`")
        root = unpack(rootfs, self.workdir / f"{name}-root")
        set_version(root, self.version)
        if broken:
            break_socketd(root)
        out = pack(root, self.workdir / f"{name}.rootfs.img")
        shutil.rmtree(root)
        return out

    def _bundle(self, name: str, rootfs: Path, board: str | None = None,
                keys: Path | None = None, version: str | None = None) -> Path:
        out = self.workdir / name
        made = make_bundle(board or self.board, rootfs, version or self.version, out, keys)
        final = self.workdir / f"{name}.raucb"
        os.replace(made, final)
        shutil.rmtree(out)
        return final

    def get(self, name: str) -> Path:
        if name in self._made:
            return self._made[name]
        t = time.monotonic()
        if name == "newer":
            path = self._bundle(name, self._slot(name, broken=False))
        elif name == "broken":
            path = self._bundle(name, self._slot(name, broken=True),
                                version=self.version.replace("-test", "-broken"))
        elif name == "other_keys":
            path = self._bundle(name, slot_image(self.board),
                                keys=other_firmware_keys(self.workdir / "other-keys"))
        elif name == "other_board":
            path = self._bundle(name, slot_image(self.board), board=self.other_board)
        elif name == "truncated":
            good = self.get("newer")
            path = self.workdir / "truncated.raucb"
            with good.open("rb") as src, path.open("wb") as dst:
                dst.write(src.read(good.stat().st_size // 2))
        else:
            raise KeyError(name)
        self.times[name] = round(time.monotonic() - t, 1)
        self._made[name] = path
        return path

    def disk(self, names: list[str], out: Path) -> Path:
        """A squashfs holding the named bundles as <name>.raucb, for a second virtio disk.
        Uncompressed: the bundles are squashfs already."""
        tree = out.with_suffix(".d")
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        for name in names:
            os.link(self.get(name), tree / f"{name}.raucb")
        out.unlink(missing_ok=True)
        _run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress",
              "-noI", "-noD", "-noF", "-noX", "-all-root"])
        shutil.rmtree(tree)
        return out


def disk_args(disk: Path) -> list[str]:
    """QEMU arguments attaching the bundle disk read-only, after the boot disk (which stays
    vda: the slots' partitions and /data are found there)."""
    return ["-drive", f"if=none,id={DISK_SERIAL},format=raw,readonly=on,file={disk}",
            "-device", f"virtio-blk-pci,drive={DISK_SERIAL},serial={DISK_SERIAL}"]


def sha256(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = size if size is not None else -1
        while left:
            chunk = f.read(1 << 20 if left < 0 else min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk) if left > 0 else 0
    return h.hexdigest()
