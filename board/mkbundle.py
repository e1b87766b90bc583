#!/usr/bin/env python3
"""Builds the signed update bundle of one board: build/images/<board>.raucb, a RAUC bundle
(verity format) holding the board's root slot image, signed with the firmware signer of
FIRMWARE_KEYS (docs/update.md).

    mkbundle.py BOARD [--rootfs PATH] [--keys DIR] [--out DIR]

The manifest's compatible is the board's (boardlib.rauc_compatible, the image's system.conf
says the same), its version the firmware version and source commit. A missing FIRMWARE_KEYS
folder gets a development CA and signer (boardlib.ensure_firmware_keys), said loudly. The
bundle is then checked the way a box checks it (sdwan.appliance.bundle.inspect: signature
against the firmware CA, codesign purpose, verity format, compatible, every payload block).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import boardlib  # noqa: E402 - board/boardlib.py: the boards, their slots and RAUC settings
from boardlib import ROOT, BuildError, MiB  # noqa: E402

sys.path.insert(0, str(ROOT / "firmware"))
from sdwan.appliance import bundle as box  # noqa: E402 - the box's own check

WORK = ROOT / "build" / "work"
IMAGES = ROOT / "build" / "images"

_t0 = time.monotonic()


def step(msg: str) -> None:
    print(f"mkbundle [{time.monotonic() - _t0:6.1f}s] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Bundle:
    path: Path
    compatible: str
    version: str
    size: int
    sha256: str
    development: bool
    build_s: float
    verify_s: float


def default_rootfs(board: str) -> Path:
    return IMAGES / f"{board}.rootfs.img"


def bundle_version(commit: str | None = None) -> str:
    return f"{boardlib.firmware_version()}+{commit or boardlib.source_commit()}"


def manifest(board: boardlib.BoardInfo, version: str, epoch: int) -> str:
    return (
        "[update]\n"
        f"compatible={boardlib.rauc_compatible(board)}\n"
        f"version={version}\n"
        f"description=Socket SD-WAN appliance firmware for {board.name}\n"
        f"build={epoch}\n"
        "\n[bundle]\n"
        "format=verity\n"
        f"\n[image.{boardlib.SLOT_CLASS}]\n"
        f"filename={boardlib.BUNDLE_IMAGE}\n"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _place(src: Path, dest: Path) -> None:
    """The slot image into the bundle's content folder: a hard link where it can be."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def build_bundle(board_name: str, rootfs: Path | None = None, keys: Path | None = None,
                 out_dir: Path = IMAGES, version: str | None = None,
                 work: Path | None = None) -> Bundle:
    board = boardlib.load_board(board_name)
    rootfs = rootfs or default_rootfs(board.name)
    if not rootfs.is_file():
        raise BuildError(f"no slot image {rootfs}: build it first with "
                         f"`make image BOARD={board.name}` (or give --rootfs PATH)")
    with rootfs.open("rb") as f:
        if f.read(4) != box.SQUASHFS_MAGIC:
            raise BuildError(f"{rootfs} is not a squashfs slot image")
    if shutil.which("rauc") is None:
        raise BuildError("rauc is not installed (make setup installs it)")
    version = version or bundle_version()
    if not box.plain_text(version) or "\\" in version:
        raise BuildError(f"the version must be plain text (no control characters, newlines or"
                         f" backslashes, at most {box.MAX_TEXT} characters): {version!r}")
    fw = boardlib.ensure_firmware_keys(keys, signer=True)
    epoch = boardlib.source_epoch()
    compatible = boardlib.rauc_compatible(board)
    step(f"board {board.name}: compatible {compatible}, version {version}, "
         f"slot image {rootfs} ({rootfs.stat().st_size / MiB:.1f} MiB), "
         f"SOURCE_DATE_EPOCH={epoch}")
    step(f"signing with {fw.signer_cert}" + (" (a DEVELOPMENT key)" if fw.development else ""))

    if work is None:
        # A folder of this run's own: two builds at once (two boards, or the tests beside
        # `make bundle`) must not empty each other's.
        WORK.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{board.name}-bundle-", dir=WORK))
        try:
            return _build(board, rootfs, fw, out_dir, version, epoch, compatible, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if work.exists():
        shutil.rmtree(work)
    return _build(board, rootfs, fw, out_dir, version, epoch, compatible, work)


def _build(board: boardlib.BoardInfo, rootfs: Path, fw: boardlib.FirmwareKeys, out_dir: Path,
           version: str, epoch: int, compatible: str, work: Path) -> Bundle:
    content = work / "content"
    content.mkdir(parents=True)
    _place(rootfs, content / boardlib.BUNDLE_IMAGE)
    (content / "manifest.raucm").write_text(manifest(board, version, epoch))
    # The box's own system.conf, with the keyring of this build: RAUC checks the signature it
    # makes against the same rules (codesign, verity) a box applies.
    conf = work / "system.conf"
    conf.write_text(boardlib.rauc_system_conf(board, keyring=str(fw.ca_cert.resolve())))
    made = work / f"{board.name}.raucb"
    step("rauc bundle (verity)")
    t = time.monotonic()
    # mksquashfs takes its times from SOURCE_DATE_EPOCH: the payload is the same for the
    # same slot image; RAUC's random verity salt and the signature are not.
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C")
    done = subprocess.run(
        ["rauc", f"--conf={conf}", "bundle", f"--cert={fw.signer_cert}",
         f"--key={fw.signer_key}", f"--signing-keyring={fw.ca_cert}",
         "--mksquashfs-args=-all-root -no-xattrs", str(content), str(made)],
        capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise BuildError(f"rauc bundle failed: {done.stderr.strip() or done.stdout.strip()}")
    build_s = time.monotonic() - t

    step("checking it as a box does (signature, format, compatible, payload)")
    t = time.monotonic()
    try:
        info = box.inspect(made, fw.ca_cert, compatible, check_payload=True, scratch=work)
    except box.BundleError as e:
        raise BuildError(f"the bundle just made does not pass a box's check: {e}") from e
    verify_s = time.monotonic() - t
    if info.version != version:
        raise BuildError(f"the bundle says version {info.version!r}, expected {version!r}")

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{board.name}.raucb"
    os.replace(made, out)
    digest = _sha256(out)
    (out_dir / f"{board.name}.raucb.sha256").write_text(f"{digest}  {out.name}\n")
    shutil.rmtree(work)
    size = out.stat().st_size
    step(f"{out} {size / MiB:.1f} MiB ({size} bytes) sha256 {digest[:16]}…, signed by "
         f"{info.signer}; build {build_s:.1f} s, check {verify_s:.1f} s")
    if fw.development:
        step(f"NOTE: a DEVELOPMENT bundle (keys {fw.dir}): only images built with the same "
             "development key accept it")
    return Bundle(out, compatible, version, size, digest, fw.development, build_s, verify_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build the signed update bundle of one board")
    ap.add_argument("board", help="a folder of board/ with a board.toml, e.g. qemu-x86_64")
    ap.add_argument("--rootfs", type=Path, default=None,
                    help="the slot image (default build/images/<board>.rootfs.img)")
    # An empty --keys (make's FIRMWARE_KEYS= ) is no folder: the default, as for images.
    ap.add_argument("--keys", type=lambda s: Path(s) if s else None, default=None,
                    help="the firmware keys: firmware-ca.pem, signer.pem, signer.key "
                         "(default $FIRMWARE_KEYS, else build/firmware-keys; made as "
                         "development keys when missing)")
    ap.add_argument("--out", type=Path, default=IMAGES,
                    help="where <board>.raucb and its .sha256 go (default build/images)")
    ap.add_argument("--version", default=None,
                    help="the manifest's version (default: firmware version + commit)")
    args = ap.parse_args(argv)
    try:
        build_bundle(args.board, args.rootfs, args.keys, args.out, args.version)
    except BuildError as e:
        print(f"mkbundle: {args.board}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
