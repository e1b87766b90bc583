"""Development firmware keys are made only where a build expects them (the default folder),
all at once, and recognised as development keys by any python."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from updatekit import board_module

from sdwan.pop import pki

boardlib = board_module("boardlib")


@pytest.fixture()
def default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("FIRMWARE_KEYS", raising=False)
    monkeypatch.setattr(boardlib, "DEFAULT_FIRMWARE_KEYS", tmp_path / "build" / "firmware-keys")
    return tmp_path / "build" / "firmware-keys"


def test_a_named_folder_that_is_missing_is_not_made_a_development_key(
        default: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FIRMWARE_KEYS=/media/usb/fw with the stick not mounted must stop, not sign a
    production build with a fresh development key."""
    for how in ("argument", "environment"):
        missing = tmp_path / how / "fw"
        if how == "environment":
            monkeypatch.setenv("FIRMWARE_KEYS", str(missing))
        with pytest.raises(boardlib.BuildError, match=r"does not exist.*development keys"):
            boardlib.ensure_firmware_keys(missing if how == "argument" else None, signer=True)
        assert not missing.exists()


def test_the_default_folder_gets_development_keys(default: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fw = boardlib.ensure_firmware_keys(None, signer=True)
    assert fw.development and fw.dir == default
    assert "made a DEVELOPMENT firmware signing CA" in capsys.readouterr().err
    assert sorted(p.name for p in default.iterdir()) == [
        "firmware-ca.key", "firmware-ca.pem", "signer.key", "signer.pem"]
    assert [p.name for p in default.parent.iterdir()] == ["firmware-keys"]
    assert default.stat().st_mode & 0o777 == 0o700
    for key in ("firmware-ca.key", "signer.key"):
        assert (default / key).stat().st_mode & 0o777 == 0o600
    # As make passes it: a relative --keys naming the default folder.
    again = boardlib.ensure_firmware_keys(default, signer=True)
    assert again.ca_cert.read_bytes() == fw.ca_cert.read_bytes()


def test_a_crash_while_making_them_leaves_no_half_made_folder(
        default: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pki, "issue_firmware_signer", boom)
    with pytest.raises(KeyboardInterrupt):
        boardlib.ensure_firmware_keys(None, signer=True)
    assert not default.exists()
    assert list(default.parent.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(boardlib, "DEFAULT_FIRMWARE_KEYS", default)
    monkeypatch.delenv("FIRMWARE_KEYS", raising=False)
    assert boardlib.ensure_firmware_keys(None, signer=True).signer_key.exists()


def test_a_half_made_default_folder_says_how_to_recover(default: Path) -> None:
    pki.create_firmware_ca(default, development=True)  # as an interrupted older build left it
    with pytest.raises(boardlib.BuildError, match=r"lacks signer.pem.*remove .*firmware-keys"):
        boardlib.ensure_firmware_keys(None, signer=True)


def test_development_is_told_without_a_crypto_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buildroot's host python has no cryptography: the image must still say DEVELOPMENT."""
    dev = pki.create_firmware_ca(tmp_path / "dev", development=True)
    prod = pki.create_firmware_ca(tmp_path / "prod")
    monkeypatch.setitem(sys.modules, "cryptography", None)
    assert boardlib._is_development(dev.cert)
    assert not boardlib._is_development(prod.cert)


@pytest.mark.parametrize("crypto", [True, False])
def test_the_keyring_of_an_image_is_the_firmware_ca_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crypto: bool) -> None:
    """An account CA renamed firmware-ca.pem, or appended to it, would let the account CA's
    holder mint a code signer that every box of the image trusts."""
    acct = pki.create_ca(tmp_path / "acct")
    fw = pki.create_firmware_ca(tmp_path / "fw")
    site = pki.issue_site(tmp_path / "acct", 7)
    if not crypto:
        monkeypatch.setitem(sys.modules, "cryptography", None)
    cases = {
        "renamed": acct.cert.read_bytes(),
        "appended": fw.cert.read_bytes() + acct.cert.read_bytes(),
        "site": site.cert.read_bytes(),
    }
    for name, pem in cases.items():
        keys = tmp_path / name
        keys.mkdir()
        (keys / "firmware-ca.pem").write_bytes(pem)
        with pytest.raises(boardlib.BuildError,
                           match=r"firmware-ca.pem.*(one|firmware signing CA)"):
            boardlib.ensure_firmware_keys(keys, signer=False)
        with pytest.raises(boardlib.BuildError):
            boardlib.install_rauc_files(tmp_path / "root", boardlib.load_board("x86_64"), keys)
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "firmware-ca.pem").write_bytes(fw.cert.read_bytes())
    assert not boardlib.ensure_firmware_keys(tmp_path / "ok", signer=False).development


def test_an_empty_firmware_keys_is_the_default_for_bundles_as_for_images(
        default: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bundle FIRMWARE_KEYS=` passes --keys "": not the current folder."""
    mkbundle = board_module("mkbundle")
    seen: list[object] = []
    monkeypatch.setattr(mkbundle, "build_bundle", lambda board, rootfs, keys, *a: seen.append(keys))
    monkeypatch.setenv("FIRMWARE_KEYS", "")
    assert mkbundle.main(["qemu-x86_64", "--keys", ""]) == 0
    assert boardlib.firmware_keys_dir(seen[0]) == default  # type: ignore[arg-type]
    assert boardlib.firmware_keys_dir() == default
