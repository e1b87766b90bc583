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
  manifest's compatible with the box's own.

A bundle is refused with a BundleError subclass naming the reason. Nothing is run through
a shell; RAUC gets a configuration made for the check (the keyring, codesign, verity only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

RAUC = "rauc"
SQUASHFS_MAGIC = b"hsqs"
DEFAULT_TIMEOUT_S = 120.0


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
        return BundleError(f"{path}: cannot check the payload: RAUC needs an exclusive lease on"
                           f" the file (run as root or as the file's owner): {msg}")
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
    path = Path(bundle_path)
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
        got = str(manifest.get("compatible"))
        if got != compatible:
            raise OtherBoard(
                f"{path}: a bundle for {got!r}, not for this box ({compatible!r}): refused",
                got, compatible)
        if check_payload:
            done = _run([rauc, "extract", f"--conf={conf}", str(path), str(Path(tmp) / "x")],
                        timeout)
            shutil.rmtree(Path(tmp) / "x", ignore_errors=True)
            if done.returncode != 0:
                raise _refusal(path, done.stderr)
    return BundleInfo(
        path=path,
        compatible=got,
        version=str(manifest.get("version")),
        description=manifest.get("description"),
        build=manifest.get("build"),
        images=_images(manifest),
        signer=signer.group(1) if signer else None,
        payload_checked=check_payload,
    )
