"""What a box checks of an update bundle before it writes anything: RAUC's own verification,
run as ``rauc info`` (and ``rauc extract`` for the payload), read back as typed results.

RAUC 1.8 and a verity bundle (the only format the boxes take, docs/update.md):

* ``rauc info`` checks the CMS signature against the keyring, with the keyring's
  ``check-purpose`` (codesign: only a firmware signer), and reads the signed manifest
  (compatible, version, images, and the verity root hash and size of the payload). It does
  not read the payload, needs no root and mounts nothing;
* the payload (the squashfs with the slot image) is protected by that root hash: ``rauc
  install`` mounts it through dm-verity, so a damaged block fails the read, and ``rauc
  extract`` hashes the whole payload in user space first. ``check_payload=True`` runs the
  latter into a scratch folder, for a full check before an install is even started;
* compatibility is not checked by ``info`` (``install`` does): ``inspect`` compares the
  manifest's compatible with the box's own;
* what the signed manifest asks for is not judged by RAUC at all: a bundle of the firmware
  signer may carry install hooks or a handler (run as root by ``rauc install``, before the A/B
  fallback can help), more images, or text with control characters. ``inspect`` reads the
  manifest RAUC verified (from the bundle's CMS signature) and takes only the one root slot
  image with plain text (UnsafeManifest otherwise).

A bundle is refused with a BundleError subclass naming the reason. Nothing is run through
a shell; RAUC gets a configuration made for the check (the keyring, codesign, verity only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

RAUC = "rauc"
SQUASHFS_MAGIC = b"hsqs"
DEFAULT_TIMEOUT_S = 120.0
# The one image a bundle carries: the root slot image, written raw ([image.rootfs]).
SLOT_CLASS = "rootfs"
# What a signed manifest may hold, section by section (RAUC adds the verity keys itself).
MANIFEST_KEYS = {
    "update": {"compatible", "version", "description", "build"},
    "bundle": {"format", "verity-hash", "verity-salt", "verity-size"},
    f"image.{SLOT_CLASS}": {"filename", "sha256", "size"},
}
MAX_TEXT = 200  # characters of a manifest's compatible, version, description, build
MAX_SIGNATURE = 1 << 20
# Left free in the scratch folder by the payload check (it holds the box's data).
SCRATCH_RESERVE = 8 << 20


class BundleError(Exception):
    """A bundle is refused; the message says why, for the operator as is."""


class NotABundle(BundleError):
    """The file is missing, empty, or not a RAUC bundle at all."""


class TruncatedBundle(BundleError):
    """A bundle whose end (where the signature is) is missing or damaged."""


class BadSignature(BundleError):
    """The signature does not verify against the keyring: another CA, a signer not made for
    code signing, an expired certificate, or a damaged manifest or signature."""


class UnsupportedFormat(BundleError):
    """A bundle format the box does not take (only verity)."""


class OtherBoard(BundleError):
    """A genuine bundle, for another board (compatible)."""

    def __init__(self, message: str, compatible: str, expected: str) -> None:
        super().__init__(message)
        self.compatible = compatible
        self.expected = expected


class CorruptPayload(BundleError):
    """The payload does not hash to the root hash the signed manifest gives."""


class UnsafeManifest(BundleError):
    """A genuine bundle whose signed manifest asks for what a box never does: install hooks
    or a handler, images other than the one root slot image, or text that is not plain
    (control characters, newlines, overlong)."""


@dataclass(frozen=True)
class BundleImage:
    slot_class: str  # the slot class it is written to ("rootfs")
    filename: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    compatible: str
    version: str
    description: str | None
    build: str | None
    images: tuple[BundleImage, ...]
    signer: str | None  # the signer's subject, as RAUC names it
    payload_checked: bool

    @property
    def development(self) -> bool:
        """Signed with a development key (socket-pki marks its subject)."""
        return self.signer is not None and "DEVELOPMENT" in self.signer.split()


def check_conf(keyring: str | os.PathLike[str], compatible: str) -> str:
    """The RAUC configuration of a check: what system.conf says about bundles, no slots."""
    return (
        "[system]\n"
        f"compatible={compatible}\n"
        "bootloader=noop\n"
        "bundle-formats=verity\n"
        "\n[keyring]\n"
        f"path={os.fspath(Path(keyring).resolve())}\n"
        "check-purpose=codesign\n"
    )


def _rauc_message(stderr: str) -> str:
    """RAUC's own complaint: its last lines that are not progress messages."""
    lines = [
        line.strip() for line in stderr.splitlines()
        if line.strip() and not line.startswith(("rauc-Message", "(rauc:"))
    ]
    return " ".join(lines[-3:]) or stderr.strip()[-300:] or "no message"


def _starts_like_a_bundle(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == SQUASHFS_MAGIC
    except OSError:
        return False


def _refusal(path: Path, stderr: str) -> BundleError:
    msg = _rauc_message(stderr)
    low = msg.lower()
    if "exclusive" in low and "access" in low:
        if "eagain" in low or "temporarily unavailable" in low:
            why = ("the file is open elsewhere (a download still writing it?): close it, or"
                   " check a copy")
        elif "invalid argument" in low or "einval" in low:
            why = ("its file system does not support leases (NFS, FUSE, overlay, ...): copy it"
                   " to a local file system such as /data")
        else:
            why = "run as root or as the file's owner"
        return BundleError(f"{path}: cannot check the payload: RAUC needs an exclusive lease on"
                           f" the file: {why}: {msg}")
    if "not allowed" in low and "format" in low:
        return UnsupportedFormat(f"{path}: a bundle format this box does not take: {msg}")
    if "payload is corrupted" in low or "verification of data area failed" in low:
        return CorruptPayload(f"{path}: the payload does not match its signed hash: {msg}")
    if "signature" in low and ("verif" in low or "verify error" in low) and (
            "exceeds bundle size" not in low):
        return BadSignature(f"{path}: the signature does not verify against the keyring"
                            f" (another CA, a signer not made for firmware, or damage): {msg}")
    if "invalid bundle format" in low or "seek" in low or "exceeds bundle size" in low:
        if _starts_like_a_bundle(path):
            return TruncatedBundle(f"{path}: truncated or damaged at its end (no signature"
                                   f" where one should be): {msg}")
        return NotABundle(f"{path}: not a RAUC bundle: {msg}")
    return BundleError(f"{path}: refused by rauc: {msg}")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LC_ALL="C")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except FileNotFoundError:
        raise BundleError(f"{cmd[0]} is not installed: cannot check bundles") from None
    except subprocess.TimeoutExpired:
        raise BundleError(f"{cmd[0]} {cmd[1]} took longer than {timeout:.0f} s") from None


def _der(data: bytes, pos: int, tag: int) -> tuple[int, int]:
    """The content (start, end) of the DER element of ``tag`` at pos."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError(f"expected tag {tag:#x} at {pos}")
    n, pos = data[pos + 1], pos + 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4:
            raise ValueError("unsupported length")
        n, pos = int.from_bytes(data[pos:pos + k], "big"), pos + k
    if pos + n > len(data):
        raise ValueError("element past the end")
    return pos, pos + n


def signed_manifest(path: Path) -> str:
    """The manifest inside the bundle's CMS signature (its encapsulated content), as RAUC
    verified it: a bundle ends with the DER signature and its size (8 bytes, big endian)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(size - 8)
            (sig,) = struct.unpack(">Q", f.read(8))
            if not 0 < sig <= min(MAX_SIGNATURE, size - 8):
                raise ValueError("no signature size")
            f.seek(size - 8 - sig)
            cms = f.read(sig)
        # ContentInfo { OID, [0] SignedData { version, digests, EncapContentInfo {
        #   OID, [0] OCTET STRING manifest } ... } }
        start, _ = _der(cms, 0, 0x30)
        _, end = _der(cms, start, 0x06)
        start, _ = _der(cms, end, 0xA0)
        start, _ = _der(cms, start, 0x30)
        _, end = _der(cms, start, 0x02)
        _, end = _der(cms, end, 0x31)
        start, _ = _der(cms, end, 0x30)
        _, end = _der(cms, start, 0x06)
        start, _ = _der(cms, end, 0xA0)
        start, end = _der(cms, start, 0x04)
        return cms[start:end].decode("utf-8")
    except (OSError, ValueError, struct.error) as e:
        raise UnsafeManifest(f"{path}: cannot read the signed manifest: {e}") from None


def plain_text(text: str) -> bool:
    return len(text) <= MAX_TEXT and not any(
        unicodedata.category(c)[0] in "CZ" and c != " " for c in text)


_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(value: str) -> str:
    """A key file value as RAUC (GLib) reads it: \\s \\n \\t \\r \\\\ are escapes."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), value)


def parse_manifest(path: Path, signed: str) -> dict[str, dict[str, str]]:
    """The signed manifest's sections and values; refuses what RAUC would do for a bundle
    beyond writing the root slot image, and text that is not plain."""
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for line in signed.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            if section in ("hooks", "handler"):
                raise UnsafeManifest(f"{path}: the manifest has [{section}]: bundles for this box"
                                     " carry no hooks and no handler (docs/update.md)")
            if section not in MANIFEST_KEYS:
                raise UnsafeManifest(f"{path}: the manifest has [{ascii(section)}]: the only"
                                     f" image is [image.{SLOT_CLASS}]")
            sections[section] = {}
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key not in MANIFEST_KEYS.get(section, ()):
            what = "hooks" if key == "hooks" else f"key {ascii(key)}"
            raise UnsafeManifest(f"{path}: the manifest's [{section}] has {what}: bundles for"
                                 " this box carry no hooks and nothing but the root slot image")
        value = _unescape(value.strip())
        if not plain_text(value):
            raise UnsafeManifest(f"{path}: the manifest's {key} is not plain text (control"
                                 f" characters or over {MAX_TEXT} characters):"
                                 f" {ascii(value[:60])}")
        sections[section][key] = value
    image = sections.get(f"image.{SLOT_CLASS}")
    if image is None:
        raise UnsafeManifest(f"{path}: the bundle has no [image.{SLOT_CLASS}]: it must have"
                             " exactly the root slot image")
    if not image.get("filename", "").endswith(".img"):
        raise UnsafeManifest(f"{path}: the {SLOT_CLASS} image must be a raw .img:"
                             f" {ascii(image.get('filename'))}")
    return sections


def _images(manifest: dict) -> tuple[BundleImage, ...]:
    out = []
    for entry in manifest.get("images") or []:
        for slot_class, image in entry.items():
            out.append(BundleImage(slot_class, str(image.get("filename")),
                                   str(image.get("checksum")), int(image.get("size") or 0)))
    return tuple(out)


def inspect(
    bundle_path: str | os.PathLike[str],
    keyring: str | os.PathLike[str],
    compatible: str,
    *,
    check_payload: bool = False,
    scratch: str | os.PathLike[str] | None = None,
    rauc: str = RAUC,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> BundleInfo:
    """Verify a bundle as the box with ``keyring`` and ``compatible`` would, and describe it.

    The signature (against keyring, for code signing only), the format (verity) and the
    compatible always; with check_payload, every block of the payload too (RAUC extracts it
    into a temporary folder of ``scratch``, which needs the space of the slot image). Raises
    a BundleError subclass naming why a bundle is refused.
    """
    # The file a symlink names is the one checked (and to install): an absolute path also
    # keeps a name starting with "-" from reading as an option of rauc.
    path = Path(bundle_path).resolve()
    if not path.is_file():
        raise NotABundle(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise NotABundle(f"{path}: empty file")
    if not Path(keyring).is_file():
        raise BundleError(f"keyring {keyring} not found: cannot check bundles")
    with tempfile.TemporaryDirectory(prefix="bundle-check-", dir=scratch) as tmp:
        conf = Path(tmp) / "check.conf"
        conf.write_text(check_conf(keyring, compatible))
        done = _run([rauc, "info", f"--conf={conf}", "--output-format=json", str(path)],
                    timeout)
        if done.returncode != 0:
            raise _refusal(path, done.stderr)
        try:
            manifest = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise BundleError(f"{path}: rauc info gave no JSON: {done.stdout[:200]!r}") from None
        signer = re.search(r"Verified \w+ signature by '([^']*)'", done.stderr)
        # Text from the signed manifest itself: rauc's JSON under LC_ALL=C is not lossless.
        sections = parse_manifest(path, signed_manifest(path))
        update = sections.get("update", {})
        if manifest.get("hooks") or [i.slot_class for i in _images(manifest)] != [SLOT_CLASS]:
            raise UnsafeManifest(f"{path}: rauc reads hooks {manifest.get('hooks')} or images"
                                 f" other than one {SLOT_CLASS!r}: {_images(manifest)}")
        # Read after rauc verified the file: both must describe the same image.
        image = sections.get(f"image.{SLOT_CLASS}", {})
        if (image.get("sha256"), image.get("size")) != (
                _images(manifest)[0].sha256, str(_images(manifest)[0].size)):
            raise BundleError(f"{path}: the bundle changed while being checked: its manifest"
                              " is not the one rauc verified")
        got = update.get("compatible", "")
        if got != compatible:
            raise OtherBoard(
                f"{path}: a bundle for {got!r}, not for this box ({compatible!r}): refused",
                got, compatible)
        if check_payload:
            try:
                need = int(sections[f"image.{SLOT_CLASS}"].get("size", "0")) + SCRATCH_RESERVE
            except ValueError:
                raise UnsafeManifest(f"{path}: the image size is not a number") from None
            free = shutil.disk_usage(tmp).free
            if free < need:
                raise BundleError(
                    f"{path}: no room to check the payload in the scratch folder {tmp}: the"
                    f" image needs {need >> 20} MiB with a reserve, {free >> 20} MiB are free")
            done = _run([rauc, "extract", f"--conf={conf}", str(path), str(Path(tmp) / "x")],
                        timeout)
            shutil.rmtree(Path(tmp) / "x", ignore_errors=True)
            if done.returncode != 0:
                raise _refusal(path, done.stderr)
    return BundleInfo(
        path=path,
        compatible=got,
        version=update.get("version", ""),
        description=update.get("description"),
        build=update.get("build"),
        images=_images(manifest),
        signer=signer.group(1) if signer else None,
        payload_checked=check_payload,
    )
