"""The image side of updates (board/boardlib.py): the board's RAUC compatible, its A/B root
slots, /etc/rauc/system.conf and keyring.pem, and the firmware keys a build uses."""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import pytest
from updatekit import board_module, dev_keys

from sdwan.appliance import bootenv
from sdwan.pop import pki

boardlib = board_module("boardlib")


def _conf(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


def test_compatible_is_per_board() -> None:
    names = boardlib.board_names()
    compatibles = {boardlib.rauc_compatible(n) for n in names}
    assert len(compatibles) == len(names)
    board = boardlib.load_board("qemu-x86_64")
    assert boardlib.rauc_compatible(board) == boardlib.rauc_compatible("qemu-x86_64")
    assert boardlib.rauc_compatible(board) == "sdwan-qemu-x86_64"


@pytest.mark.parametrize("name", ["qemu-x86_64", "qemu-aarch64", "x86_64"])
def test_system_conf(name: str) -> None:
    board = boardlib.load_board(name)
    conf = _conf(boardlib.rauc_system_conf(board))
    system = conf["system"]
    assert system["compatible"] == boardlib.rauc_compatible(board)
    # grubenv is written in place by the box's own backend, never by grub-editenv
    assert system["bootloader"] == "custom" and "grubenv" not in system
    backend = conf["handlers"]["bootloader-custom-backend"]
    assert backend == "/usr/libexec/sdwan/bootenv"
    assert (boardlib.COMMON / "rootfs" / backend.lstrip("/")).stat().st_mode & 0o111
    assert str(bootenv.DEFAULT_GRUBENV) == boardlib.RAUC_GRUBENV
    assert f"/{boardlib.RAUC_DIR}/system.conf" == str(bootenv.DEFAULT_SYSTEM_CONF)
    assert system["statusfile"].startswith("/data/")
    assert system["bundle-formats"] == "verity"
    assert system["mountprefix"].startswith("/run/")  # the root is read-only
    assert conf["keyring"]["path"] == "/etc/rauc/keyring.pem"
    assert conf["keyring"]["check-purpose"] == "codesign"
    slots = [s for s in conf.sections() if s.startswith("slot.")]
    assert slots == ["slot.rootfs.0", "slot.rootfs.1"]
    assert [dict(conf[s]) for s in slots] == [
        {"device": "/dev/disk/by-partlabel/root-a", "type": "raw", "bootname": "A"},
        {"device": "/dev/disk/by-partlabel/root-b", "type": "raw", "bootname": "B"},
    ]


def test_slots_come_from_one_place() -> None:
    board = boardlib.load_board("qemu-x86_64")
    slots = boardlib.root_slots(board)
    assert [s.partition for s in slots] == ["root-a", "root-b"]
    text = boardlib.rauc_system_conf(board)
    for slot in boardlib.ROOT_SLOTS:
        assert f"by-partlabel/{slot.partition}\n" in text and f"bootname={slot.bootname}\n" in text


def test_a_layout_with_other_slot_names_is_refused() -> None:
    board = boardlib.load_board("qemu-x86_64")
    assert [p.name for p in board.partitions] == ["esp", "root-a", "root-b", "data"]
    assert boardlib.root_slots(board) == boardlib.ROOT_SLOTS
    board.partitions[2] = boardlib.Partition("root-c", "root", 48)
    with pytest.raises(boardlib.BuildError, match=r"update slots are \['root-a', 'root-b'\]"):
        boardlib.rauc_system_conf(board)


def test_missing_keys_become_development_keys(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    board = boardlib.load_board("qemu-aarch64")
    root, keys = tmp_path / "root", tmp_path / "keys"
    # Only the default folder (build/firmware-keys) is made when missing.
    monkeypatch.setattr(boardlib, "DEFAULT_FIRMWARE_KEYS", keys)
    fw = boardlib.install_rauc_files(root, board, keys)
    err = capsys.readouterr().err
    assert "made a DEVELOPMENT firmware signing CA" in err and "production" in err.lower()
    assert "trusts the DEVELOPMENT firmware CA" in err
    assert fw.development and fw.signer_key.exists()
    assert (root / "etc/rauc/keyring.pem").read_bytes() == (keys / "firmware-ca.pem").read_bytes()
    assert (root / "etc/rauc/system.conf").read_text() == boardlib.rauc_system_conf(board)
    assert not list(root.rglob("*.key"))
    # Made once: the next build uses the same keys and says nothing about making them.
    before = (keys / "firmware-ca.pem").read_bytes()
    boardlib.install_rauc_files(root, board, keys)
    assert "made a DEVELOPMENT" not in capsys.readouterr().err
    assert (keys / "firmware-ca.pem").read_bytes() == before


def test_an_image_needs_only_the_ca_certificate(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Production: the CA's key stays offline, the image build sees its certificate only."""
    offline = pki.create_firmware_ca(tmp_path / "offline")
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copyfile(offline.cert, keys / "firmware-ca.pem")
    board = boardlib.load_board("x86_64")
    fw = boardlib.install_rauc_files(tmp_path / "root", board, keys)
    assert not fw.development
    assert "DEVELOPMENT" not in capsys.readouterr().err
    assert (tmp_path / "root/etc/rauc/keyring.pem").read_bytes() == offline.cert.read_bytes()
    with pytest.raises(boardlib.BuildError, match="lacks signer.pem, signer.key"):
        boardlib.ensure_firmware_keys(keys, signer=True)


def test_keys_must_not_be_the_account_ca(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "acct")
    with pytest.raises(boardlib.BuildError, match="is an account CA directory"):
        boardlib.ensure_firmware_keys(tmp_path / "acct", signer=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(boardlib.BuildError, match="lacks firmware-ca.pem.*firmware-ca"):
        boardlib.ensure_firmware_keys(tmp_path / "empty", signer=False)


def test_firmware_keys_from_the_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIRMWARE_KEYS", raising=False)
    assert boardlib.firmware_keys_dir() == boardlib.ROOT / "build" / "firmware-keys"
    monkeypatch.setenv("FIRMWARE_KEYS", str(tmp_path / "k"))
    assert boardlib.firmware_keys_dir() == tmp_path / "k"
    assert boardlib.firmware_keys_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.setenv("FIRMWARE_KEYS", "build/other-keys")
    assert boardlib.firmware_keys_dir() == boardlib.ROOT / "build/other-keys"


def test_board_files_include_rauc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both builds (mkimage and Buildroot's post-build) get RAUC's files with the board's."""
    board = boardlib.load_board("qemu-x86_64")
    root = tmp_path / "root"
    boardlib.install_board_files(root, board, 0, firmware_keys=dev_keys(tmp_path / "keys"))
    capsys.readouterr()
    conf = _conf((root / "etc/rauc/system.conf").read_text())
    assert conf["system"]["compatible"] == "sdwan-qemu-x86_64"
    assert (root / "etc/rauc/keyring.pem").is_file()
