"""What a genuine bundle (our signer, our CA, this board) may still not carry: install hooks
or a handler (run as root before the A/B fallback can help), images other than the one root
slot image, and text that would rewrite the console (control characters, newlines)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from updatekit import board_module, dev_keys, make_slot_image, needs_rauc

from sdwan.appliance import bundle

pytestmark = needs_rauc
mkbundle = board_module("mkbundle")
X86 = "sdwan-qemu-x86_64"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("policy")
    slot = make_slot_image(d / "slot.img", seed="policy")
    mkbundle.build_bundle("qemu-x86_64", slot, dev_keys(d / "keys"), d / "out", work=d / "w")
    shutil.copyfile(slot, d / "keys" / "slot.img")
    return d / "keys"


def _signed(keys: Path, where: Path, manifest: str, extra: dict[str, str] | None = None) -> Path:
    """A bundle signed with the firmware signer itself: RAUC accepts its signature."""
    content = where / "content"
    content.mkdir()
    shutil.copyfile(keys / "slot.img", content / "rootfs.img")
    for name, text in (extra or {}).items():
        (content / name).write_text(text)
        (content / name).chmod(0o755)
    (content / "manifest.raucm").write_text(manifest)
    conf = where / "sign.conf"
    conf.write_text("[system]\ncompatible=any\nbootloader=noop\n")
    out = where / "b.raucb"
    subprocess.run(["rauc", f"--conf={conf}", "bundle", f"--cert={keys / 'signer.pem'}",
                    f"--key={keys / 'signer.key'}", str(content), str(out)],
                   check=True, capture_output=True)
    return out


HEAD = f"[update]\ncompatible={X86}\nversion=1\n\n[bundle]\nformat=verity\n\n"
ROOTFS = "[image.rootfs]\nfilename=rootfs.img\n"
HOOK = {"hook.sh": "#!/bin/sh\ntouch /tmp/hooked\n"}


def test_the_plain_bundle_passes(keys: Path, tmp_path: Path) -> None:
    info = bundle.inspect(_signed(keys, tmp_path, HEAD + ROOTFS), keys / "firmware-ca.pem", X86)
    assert info.version == "1"


@pytest.mark.parametrize("manifest, extra, why", [
    (HEAD + "[hooks]\nfilename=hook.sh\nhooks=install-check\n\n" + ROOTFS, HOOK, "hooks"),
    (HEAD + "[hooks]\nfilename=hook.sh\n\n" + ROOTFS + "hooks=pre-install;post-install\n",
     HOOK, "hooks"),
    (HEAD + "[hooks]\nfilename=hook.sh\n\n" + ROOTFS + "hooks=install\n", HOOK, "hooks"),
    (HEAD + "[handler]\nfilename=hook.sh\n\n" + ROOTFS, HOOK, "handler"),
    (HEAD + ROOTFS + "\n[image.bootloader]\nfilename=boot.img\n", {"boot.img": "x" * 5000},
     "image"),
    (HEAD + "[image.appfs]\nfilename=rootfs.img\n", None, "image"),
    (HEAD, None, "image"),
])
def test_hooks_handlers_and_other_images_are_refused(keys: Path, tmp_path: Path, manifest: str,
                                                     extra: dict[str, str] | None,
                                                     why: str) -> None:
    signed = _signed(keys, tmp_path, manifest, extra)
    with pytest.raises(bundle.UnsafeManifest, match=why):
        bundle.inspect(signed, keys / "firmware-ca.pem", X86)


@pytest.mark.parametrize("field, value", [
    ("version", "1\\n\x1b[2J\x1b]0;pwned\x07"),
    ("version", "1\\nUpdate installed OK"),
    ("description", "a\\rb"),
    ("version", "1\u202etxt"),
    ("version", "9" * 300),
])
def test_text_that_would_rewrite_the_console_is_refused(keys: Path, tmp_path: Path, field: str,
                                                        value: str) -> None:
    head = f"[update]\ncompatible={X86}\n" + (
        f"version={value}\n" if field == "version" else f"version=1\n{field}={value}\n")
    signed = _signed(keys, tmp_path, head + "\n[bundle]\nformat=verity\n\n" + ROOTFS)
    with pytest.raises(bundle.UnsafeManifest, match=field) as e:
        bundle.inspect(signed, keys / "firmware-ca.pem", X86)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)


def test_a_symlink_is_checked_as_the_file_it_names(keys: Path, tmp_path: Path) -> None:
    real = _signed(keys, tmp_path, HEAD + ROOTFS)
    (tmp_path / "link.raucb").symlink_to(real)
    info = bundle.inspect(tmp_path / "link.raucb", keys / "firmware-ca.pem", X86)
    assert info.path == real.resolve()  # what an install must then use


def test_a_path_that_looks_like_an_option(keys: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = _signed(keys, tmp_path, HEAD + ROOTFS)
    shutil.copyfile(real, tmp_path / "-c.raucb")
    monkeypatch.chdir(tmp_path)
    assert bundle.inspect(Path("-c.raucb"), keys / "firmware-ca.pem", X86).version == "1"


def test_mkbundle_refuses_a_version_that_is_not_plain_before_signing(keys: Path,
                                                                    tmp_path: Path) -> None:
    """--version goes into the manifest as is: a newline would add sections of its own."""
    for bad in ("1\n[handler]\nfilename=rootfs.img", "1\x1b[31m", "1\\nOK"):
        with pytest.raises(mkbundle.BuildError, match="version .*plain"):
            mkbundle.build_bundle("qemu-x86_64", keys / "slot.img", keys, tmp_path / "o",
                                  version=bad, work=tmp_path / "w")
        assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_the_payload_check_needs_room_for_the_image_first(keys: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge bundle must not fill the scratch folder (/data on a box) before it is refused."""
    good = _signed(keys, tmp_path, HEAD + ROOTFS)
    real_run = subprocess.run
    calls: list[list[str]] = []

    def spy(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return real_run(cmd, **kw)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "run", spy)
    monkeypatch.setattr(bundle.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(  # type: ignore[attr-defined]
        10 << 20, 10 << 20, 50 << 10))
    with pytest.raises(bundle.BundleError, match=r"no room .*scratch"):
        bundle.inspect(good, keys / "firmware-ca.pem", X86, check_payload=True, scratch=tmp_path)
    assert [c[1] for c in calls] == ["info"]


def test_a_bundle_still_open_elsewhere_says_so(keys: Path, tmp_path: Path) -> None:
    """RAUC leases the file for the payload check: a download still writing it is named as
    such, not as a lack of root or ownership (this runs as the file's owner)."""
    good = _signed(keys, tmp_path, HEAD + ROOTFS)
    with good.open("r+b"), pytest.raises(bundle.BundleError, match="open elsewhere") as e:
        bundle.inspect(good, keys / "firmware-ca.pem", X86, check_payload=True, scratch=tmp_path)
    assert "run as root" not in str(e.value)


@pytest.mark.parametrize("rauc_says, told", [
    ("could not ensure exclusive bundle access (F_SETLEASE): Invalid argument",
     "does not support leases"),
    ("could not ensure exclusive bundle access (F_SETLEASE): EACCES: missing capability"
     " CAP_LEASE?", "run as root or as the file's owner"),
])
def test_lease_refusals_name_their_cause(tmp_path: Path, rauc_says: str, told: str) -> None:
    msg = str(bundle._refusal(tmp_path / "b.raucb", "cannot check bundle payload without"
                              f" exclusive access: {rauc_says}\n"))
    assert told in msg


def test_a_bundle_replaced_between_rauc_and_the_manifest_read_is_refused(
        keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest is read from the file after rauc verified it: the two must agree."""
    first = _signed(keys, tmp_path, HEAD + ROOTFS)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(keys / "slot.img", tmp_path / "slot2.img")
    with (tmp_path / "slot2.img").open("ab") as f:
        f.write(b"\0" * 4096)
    (keys / "slot.img").rename(tmp_path / "slot.keep")
    shutil.copyfile(tmp_path / "slot2.img", keys / "slot.img")
    try:
        second = _signed(keys, other, HEAD + ROOTFS)
    finally:
        (tmp_path / "slot.keep").replace(keys / "slot.img")
    swapped = bundle.signed_manifest(second)
    monkeypatch.setattr(bundle, "signed_manifest", lambda p: swapped)
    with pytest.raises(bundle.BundleError, match="changed while"):
        bundle.inspect(first, keys / "firmware-ca.pem", X86)
