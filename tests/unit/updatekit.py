"""What the update tests share: the board scripts as modules, a small real squashfs slot
image, RAUC run directly (to sign what mkbundle would refuse to), and damage to a bundle."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]

needs_rauc = pytest.mark.skipif(
    shutil.which("rauc") is None or shutil.which("mksquashfs") is None,
    reason="needs rauc and mksquashfs (make setup installs them)",
)


def board_module(name: str) -> ModuleType:
    """board/<name>.py, loaded once (mkbundle imports boardlib by that name)."""
    if name in sys.modules:
        return sys.modules[name]
    if "boardlib" not in sys.modules and name != "boardlib":
        board_module("boardlib")
    spec = importlib.util.spec_from_file_location(name, REPO / "board" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dev_keys(keys: Path) -> Path:
    """A development firmware CA and signer in keys, as a build makes in its default folder
    (a build makes none in a folder it is given: that must exist)."""
    sys.path.insert(0, str(REPO / "firmware"))
    from sdwan.pop import pki

    pki.create_firmware_ca(keys, development=True)
    pki.issue_firmware_signer(keys)
    return keys


def make_slot_image(dest: Path, seed: str = "slot", kib: int = 96) -> Path:
    """A squashfs root of a few files, one of them incompressible (RAUC wants a payload of
    more than one block), the same bytes for the same seed."""
    tree = dest.parent / (dest.name + ".tree")
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text(f"ID=socket\nVERSION_ID={seed}\n")
    blob = b"".join(hashlib.sha256(f"{seed}/{i}".encode()).digest() for i in range(kib * 32))
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/blob").write_bytes(blob)
    subprocess.run(["mksquashfs", str(tree), str(dest), "-noappend", "-quiet", "-no-progress",
                    "-all-root", "-no-xattrs", "-mkfs-time", "0", "-all-time", "0"],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return dest


def sign_raw(content: Path, cert: Path, key: Path, out: Path) -> Path:
    """rauc bundle with any certificate and key, without the signer checks mkbundle makes."""
    conf = out.with_suffix(".conf")
    conf.write_text("[system]\ncompatible=any\nbootloader=noop\n")
    subprocess.run(["rauc", f"--conf={conf}", "bundle", f"--cert={cert}", f"--key={key}",
                    str(content), str(out)], check=True, capture_output=True)
    return out


def content_dir(where: Path, slot_image: Path, compatible: str, version: str,
                fmt: str = "verity") -> Path:
    where.mkdir(parents=True)
    shutil.copyfile(slot_image, where / "rootfs.img")
    (where / "manifest.raucm").write_text(
        f"[update]\ncompatible={compatible}\nversion={version}\n\n[bundle]\nformat={fmt}\n\n"
        "[image.rootfs]\nfilename=rootfs.img\n")
    return where


def flip_byte(src: Path, dest: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dest.write_bytes(bytes(data))
    return dest


def truncate(src: Path, dest: Path, size: int) -> Path:
    dest.write_bytes(src.read_bytes()[:size])
    return dest
