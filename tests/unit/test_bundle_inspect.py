"""sdwan.appliance.bundle.inspect, the box's check of an update bundle, against real bundles:
each way a bundle can be wrong gets its own error, and a good one its typed description."""

from __future__ import annotations

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

from sdwan.appliance import bundle
from sdwan.pop import pki

pytestmark = needs_rauc
mkbundle = board_module("mkbundle")
X86 = "sdwan-qemu-x86_64"


@dataclass
class Made:
    dir: Path
    keyring: Path
    slot: Path
    good: Path
    arm: Path


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    d = tmp_path_factory.mktemp("inspect")
    slot = make_slot_image(d / "slot.img", seed="inspect")
    keys = dev_keys(d / "keys")
    good = mkbundle.build_bundle("qemu-x86_64", slot, keys, d / "out", version="2.0+test",
                                 work=d / "w1").path
    arm = mkbundle.build_bundle("qemu-aarch64", slot, keys, d / "out", work=d / "w2").path
    return Made(d, keys / "firmware-ca.pem", slot, good, arm)


def test_a_good_bundle(made: Made) -> None:
    info = bundle.inspect(made.good, made.keyring, X86)
    assert info.compatible == X86 and info.version == "2.0+test"
    assert info.description and "qemu-x86_64" in info.description
    assert info.build and info.build.isdigit()
    assert info.images == (bundle.BundleImage("rootfs", "rootfs.img", info.images[0].sha256,
                                              made.slot.stat().st_size),)
    assert len(info.images[0].sha256) == 64
    assert info.signer and "firmware signer" in info.signer and info.development
    assert not info.payload_checked


def test_a_good_bundle_with_its_payload(made: Made, tmp_path: Path) -> None:
    info = bundle.inspect(made.good, made.keyring, X86, check_payload=True, scratch=tmp_path)
    assert info.payload_checked
    assert list(tmp_path.iterdir()) == []  # the scratch copy is gone


def test_another_board(made: Made) -> None:
    with pytest.raises(bundle.OtherBoard, match="a bundle for 'sdwan-qemu-aarch64'") as e:
        bundle.inspect(made.arm, made.keyring, X86)
    assert (e.value.compatible, e.value.expected) == ("sdwan-qemu-aarch64", X86)


def test_another_ca(made: Made, tmp_path: Path) -> None:
    pki.create_firmware_ca(tmp_path / "other")
    signer = pki.issue_firmware_signer(tmp_path / "other")
    content = content_dir(tmp_path / "c", made.slot, X86, "9")
    other = sign_raw(content, signer.cert, signer.key, tmp_path / "o.raucb")
    with pytest.raises(bundle.BadSignature, match="unable to get local issuer certificate"):
        bundle.inspect(other, made.keyring, X86)
    # ... and the other way round: that CA does not accept ours.
    with pytest.raises(bundle.BadSignature):
        bundle.inspect(made.good, tmp_path / "other" / "firmware-ca.pem", X86)


def test_the_account_ca_as_keyring_or_signer(made: Made, tmp_path: Path) -> None:
    acct = pki.create_ca(tmp_path / "acct")
    with pytest.raises(bundle.BadSignature):
        bundle.inspect(made.good, acct.cert, X86)
    content = content_dir(tmp_path / "c", made.slot, X86, "9")
    signed = sign_raw(content, acct.cert, acct.key, tmp_path / "a.raucb")
    with pytest.raises(bundle.BadSignature):
        bundle.inspect(signed, made.keyring, X86)
    with pytest.raises(bundle.BadSignature, match="unsuitable certificate purpose"):
        bundle.inspect(signed, acct.cert, X86)  # even against its own CA: not a code signer


@pytest.mark.parametrize("cut", [1, 100, 5000, 40000])
def test_truncated(made: Made, tmp_path: Path, cut: int) -> None:
    bad = truncate(made.good, tmp_path / "t.raucb", made.good.stat().st_size - cut)
    with pytest.raises(bundle.TruncatedBundle, match="truncated"):
        bundle.inspect(bad, made.keyring, X86)


def test_flipped_payload_byte(made: Made, tmp_path: Path) -> None:
    bad = flip_byte(made.good, tmp_path / "f.raucb", 20000)
    # The signed manifest is intact: only the payload check sees it.
    assert bundle.inspect(bad, made.keyring, X86).version == "2.0+test"
    with pytest.raises(bundle.CorruptPayload, match="does not match its signed hash"):
        bundle.inspect(bad, made.keyring, X86, check_payload=True, scratch=tmp_path)


def test_flipped_hash_tree_byte(made: Made, tmp_path: Path) -> None:
    data = made.good.read_bytes()
    (used,) = struct.unpack_from("<Q", data, 40)
    tree = -(-used // 4096) * 4096  # the hash tree follows the payload, block aligned
    bad = flip_byte(made.good, tmp_path / "h.raucb", tree + 10)
    with pytest.raises(bundle.CorruptPayload):
        bundle.inspect(bad, made.keyring, X86, check_payload=True, scratch=tmp_path)


def test_flipped_signature_byte(made: Made, tmp_path: Path) -> None:
    bad = flip_byte(made.good, tmp_path / "s.raucb", made.good.stat().st_size - 150)
    with pytest.raises(bundle.BadSignature):
        bundle.inspect(bad, made.keyring, X86)


def test_plain_format(made: Made, tmp_path: Path) -> None:
    content = content_dir(tmp_path / "c", made.slot, X86, "9", fmt="plain")
    keys = made.keyring.parent
    plain = sign_raw(content, keys / "signer.pem", keys / "signer.key", tmp_path / "p.raucb")
    with pytest.raises(bundle.UnsupportedFormat, match="'plain' not allowed"):
        bundle.inspect(plain, made.keyring, X86)


def test_not_bundles(made: Made, tmp_path: Path) -> None:
    with pytest.raises(bundle.NotABundle, match="no such file"):
        bundle.inspect(tmp_path / "none.raucb", made.keyring, X86)
    (tmp_path / "empty.raucb").write_bytes(b"")
    with pytest.raises(bundle.NotABundle, match="empty"):
        bundle.inspect(tmp_path / "empty.raucb", made.keyring, X86)
    (tmp_path / "text.raucb").write_text("hello\n")
    with pytest.raises(bundle.NotABundle, match="not a RAUC bundle"):
        bundle.inspect(tmp_path / "text.raucb", made.keyring, X86)
    (tmp_path / "noise.raucb").write_bytes(bytes(range(256)) * 400)
    with pytest.raises(bundle.NotABundle, match="not a RAUC bundle"):
        bundle.inspect(tmp_path / "noise.raucb", made.keyring, X86)
    # A squashfs is the start of a bundle, but with no signature at its end.
    with pytest.raises(bundle.TruncatedBundle):
        bundle.inspect(made.slot, made.keyring, X86)


def test_missing_keyring_or_rauc(made: Made, tmp_path: Path) -> None:
    with pytest.raises(bundle.BundleError, match="keyring .* not found"):
        bundle.inspect(made.good, tmp_path / "none.pem", X86)
    with pytest.raises(bundle.BundleError, match="is not installed"):
        bundle.inspect(made.good, made.keyring, X86, rauc=str(tmp_path / "rauc"))


def test_no_shell(made: Made, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = subprocess.run

    def spy(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, kw.get("shell", False)))
        return real(cmd, **kw)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "run", spy)
    bundle.inspect(made.good, made.keyring, X86, check_payload=True)
    assert [c[0][:2] for c in calls] == [["rauc", "info"], ["rauc", "extract"]]
    assert not any(shell for _, shell in calls)


def test_payload_check_without_a_lease_says_why(tmp_path: Path) -> None:
    """Not root and not the file's owner: RAUC cannot lease the file to hash it."""
    stderr = ("rauc-Message: 10:00:00.000: Verifying bundle payload... \n"
              "Failed to extract bundle: cannot check bundle payload without exclusive access:"
              " could not ensure exclusive bundle access (F_SETLEASE): EACCES: missing"
              " capability CAP_LEASE?\n")
    error = bundle._refusal(tmp_path / "b.raucb", stderr)
    assert type(error) is bundle.BundleError
    assert "run as root or as the file's owner" in str(error) and "F_SETLEASE" in str(error)
