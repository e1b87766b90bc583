"""board/mkbundle.py against real RAUC: a small squashfs slot image made into a signed verity
bundle with a development key, then checked with `rauc info` and `rauc extract` under the
board's own system.conf, as a box would check it before writing anything."""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from updatekit import (
    board_module,
    content_dir,
    dev_keys,
    flip_byte,
    make_slot_image,
    needs_rauc,
    sign_raw,
    truncate,
)

from sdwan.pop import pki

pytestmark = needs_rauc
boardlib = board_module("boardlib")
mkbundle = board_module("mkbundle")


@dataclass
class Built:
    dir: Path
    keys: Path
    slot: Path
    x86: Path  # the qemu-x86_64 bundle
    arm: Path  # the qemu-aarch64 bundle, same key
    conf: Path  # qemu-x86_64's system.conf with the keys' CA as its keyring


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    d = tmp_path_factory.mktemp("bundles")
    slot = make_slot_image(d / "slot.img")
    keys = dev_keys(d / "keys")
    x86 = mkbundle.build_bundle("qemu-x86_64", slot, keys, d / "out", work=d / "w1").path
    arm = mkbundle.build_bundle("qemu-aarch64", slot, keys, d / "out", work=d / "w2").path
    board = boardlib.load_board("qemu-x86_64")
    conf = d / "system.conf"
    conf.write_text(boardlib.rauc_system_conf(board, keyring=str(keys / "firmware-ca.pem")))
    return Built(d, keys, slot, x86, arm, conf)


def rauc(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rauc", *map(str, args)], capture_output=True, text=True,
                          env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def info(conf: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    return rauc(f"--conf={conf}", "info", bundle)


def test_good_bundle_is_accepted_with_its_compatible_and_version(built: Built) -> None:
    done = info(built.conf, built.x86)
    assert done.returncode == 0, done.stderr
    assert re.search(r"Compatible:\s+'sdwan-qemu-x86_64'", done.stdout)
    version = mkbundle.bundle_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+\+[0-9a-f]{12}|\d+\.\d+\.\d+\+unknown", version)
    assert re.search(rf"Version:\s+'{re.escape(version)}'", done.stdout)
    assert re.search(r"Bundle Format:\s+verity", done.stdout)
    assert "rootfs.img" in done.stdout and "DEVELOPMENT firmware signer" in done.stderr
    # The payload too, every block of it (rauc extract checks it against the signed hash).
    out = built.dir / "extracted"
    done = rauc(f"--conf={built.conf}", "extract", built.x86, out)
    assert done.returncode == 0, done.stderr
    assert (out / "rootfs.img").read_bytes() == built.slot.read_bytes()
    assert "compatible=sdwan-qemu-x86_64" in (out / "manifest.raucm").read_text()


def test_sha256_file_and_progress(built: Built) -> None:
    line = (built.dir / "out" / "qemu-x86_64.raucb.sha256").read_text()
    assert line.endswith("  qemu-x86_64.raucb\n") and len(line.split()[0]) == 64


def test_another_firmware_ca_is_refused(built: Built, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.create_firmware_ca(other)
    pki.issue_firmware_signer(other)
    content = content_dir(tmp_path / "c", built.slot, "sdwan-qemu-x86_64", "9.9.9")
    bundle = sign_raw(content, other / "signer.pem", other / "signer.key", tmp_path / "b.raucb")
    done = info(built.conf, bundle)
    assert done.returncode != 0
    assert "signature verification failed" in done.stderr
    assert "unable to get local issuer certificate" in done.stderr


def test_account_keys_cannot_sign_firmware(built: Built, tmp_path: Path) -> None:
    """Neither the account CA's own key nor a site's key: another chain, another purpose."""
    pki.create_ca(tmp_path / "acct")
    pki.issue_site(tmp_path / "acct", 5)
    content = content_dir(tmp_path / "c", built.slot, "sdwan-qemu-x86_64", "9.9.9")
    for name in ("ca", "site-5"):
        acct = tmp_path / "acct"
        bundle = sign_raw(content, acct / f"{name}.pem", acct / f"{name}.key",
                          tmp_path / f"{name}.raucb")
        done = info(built.conf, bundle)
        assert done.returncode != 0, name
        assert "signature verification failed" in done.stderr, name


def test_a_tls_certificate_of_the_firmware_ca_cannot_sign(built: Built, tmp_path: Path) -> None:
    """check-purpose=codesign: even under the right CA, only a code signing certificate."""
    ca_cert, ca_key = pki.load_firmware_ca(built.keys)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.build_site_certificate(ca_cert, ca_key, 9, key.public_key())
    (tmp_path / "tls.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    content = content_dir(tmp_path / "c", built.slot, "sdwan-qemu-x86_64", "9.9.9")
    bundle = sign_raw(content, tmp_path / "tls.pem", tmp_path / "tls.key", tmp_path / "b.raucb")
    done = info(built.conf, bundle)
    assert done.returncode != 0 and "unsuitable certificate purpose" in done.stderr


@pytest.mark.parametrize("keep", [1, 4096, 0.5, -1])
def test_truncated_bundles_are_refused(built: Built, tmp_path: Path, keep: float) -> None:
    size = built.x86.stat().st_size
    n = int(size * keep) if isinstance(keep, float) else (size + keep if keep < 0 else keep)
    bad = truncate(built.x86, tmp_path / "t.raucb", n)
    done = info(built.conf, bad)
    assert done.returncode != 0
    assert "Invalid bundle format" in done.stderr


def test_a_flipped_payload_byte_is_refused_before_writing(built: Built, tmp_path: Path) -> None:
    """The manifest and signature are intact, so `rauc info` (which reads only those) passes;
    the payload is checked against the signed verity root hash: `rauc extract` hashes every
    block first, and an install reads it through dm-verity."""
    bad = flip_byte(built.x86, tmp_path / "f.raucb", built.slot.stat().st_size // 2)
    assert info(built.conf, bad).returncode == 0
    done = rauc(f"--conf={built.conf}", "extract", bad, tmp_path / "x")
    assert done.returncode != 0 and "payload is corrupted" in done.stderr
    assert not (tmp_path / "x" / "rootfs.img").exists()


def test_a_flipped_signature_byte_is_refused(built: Built, tmp_path: Path) -> None:
    bad = flip_byte(built.x86, tmp_path / "s.raucb", built.x86.stat().st_size - 200)
    done = info(built.conf, bad)
    assert done.returncode != 0 and "signature" in done.stderr.lower()


def test_another_boards_bundle_says_so(built: Built) -> None:
    """Genuine, so its signature passes; its compatible is the other board's, which the box
    compares with its own before writing (rauc install does, and bundle.inspect)."""
    done = info(built.conf, built.arm)
    assert done.returncode == 0, done.stderr
    assert re.search(r"Compatible:\s+'sdwan-qemu-aarch64'", done.stdout)
    assert "compatible=sdwan-qemu-x86_64" in built.conf.read_text()


def test_plain_bundles_are_not_taken(built: Built, tmp_path: Path) -> None:
    content = content_dir(tmp_path / "c", built.slot, "sdwan-qemu-x86_64", "1", fmt="plain")
    bundle = sign_raw(content, built.keys / "signer.pem", built.keys / "signer.key",
                      tmp_path / "p.raucb")
    done = info(built.conf, bundle)
    assert done.returncode != 0 and "'plain' not allowed" in done.stderr


def _payload(bundle: Path) -> bytes:
    data = bundle.read_bytes()
    assert data[:4] == b"hsqs"
    (used,) = struct.unpack_from("<Q", data, 40)  # the squashfs superblock's bytes_used
    return data[:used]


def test_payload_is_reproducible(built: Built, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one = mkbundle.build_bundle("qemu-x86_64", built.slot, built.keys, tmp_path / "1",
                                version="1.0", work=tmp_path / "w1")
    two = mkbundle.build_bundle("qemu-x86_64", built.slot, built.keys, tmp_path / "2",
                                version="1.0", work=tmp_path / "w2")
    assert _payload(one.path) == _payload(two.path)
    # RAUC draws a new verity salt for every bundle and ECDSA signatures are randomised.
    assert one.sha256 != two.sha256


def test_missing_keys_are_made_loudly(built: Built, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the default folder (build/firmware-keys) is made when missing.
    monkeypatch.setattr(boardlib, "DEFAULT_FIRMWARE_KEYS", tmp_path / "dev")
    monkeypatch.delenv("FIRMWARE_KEYS", raising=False)
    made = mkbundle.build_bundle("x86_64", built.slot, None, tmp_path / "o",
                                 work=tmp_path / "w")
    out = capsys.readouterr()
    assert "made a DEVELOPMENT firmware signing CA and signer" in out.err
    assert "Production images and bundles must use the real firmware key" in out.err
    assert "DEVELOPMENT bundle" in out.out and made.development
    assert re.search(r"x86_64\.raucb \d+\.\d MiB \(\d+ bytes\)", out.out)
    assert (tmp_path / "dev" / "signer.key").stat().st_mode & 0o777 == 0o600


def test_production_keys_say_nothing_of_development(built: Built, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pki.create_firmware_ca(tmp_path / "k")
    pki.issue_firmware_signer(tmp_path / "k")
    made = mkbundle.build_bundle("x86_64", built.slot, tmp_path / "k", tmp_path / "o",
                                 work=tmp_path / "w")
    assert not made.development and "DEVELOPMENT" not in capsys.readouterr().out


def test_missing_slot_image_says_to_build_the_image(tmp_path: Path) -> None:
    with pytest.raises(boardlib.BuildError, match=r"make image BOARD=qemu-aarch64"):
        mkbundle.build_bundle("qemu-aarch64", tmp_path / "none.img", tmp_path / "k")
    assert mkbundle.main(["qemu-aarch64", "--rootfs", str(tmp_path / "none.img"),
                          "--keys", str(tmp_path / "k")]) == 1
    (tmp_path / "text.img").write_text("not squashfs")
    with pytest.raises(boardlib.BuildError, match="not a squashfs slot image"):
        mkbundle.build_bundle("qemu-aarch64", tmp_path / "text.img", tmp_path / "k")
    assert mkbundle.default_rootfs("x86_64").name == "x86_64.rootfs.img"


def test_account_ca_as_keys_is_refused(built: Built, tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "acct")
    with pytest.raises(boardlib.BuildError, match="account CA directory"):
        mkbundle.build_bundle("x86_64", built.slot, tmp_path / "acct", tmp_path / "o")
