"""The A/B boot slots as board/boardlib.py describes them to both builds, without QEMU: the
disk layout (esp, root-a, root-b, data), the GRUB environment block the image ships, and
the grub.cfg that picks a slot the way RAUC's grub backend expects (docs/image.md, "Boot
slots"). tests/system/test_boot_slots.py boots it."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from sdwan.appliance import bootenv
from sdwan.appliance.raucstatus import GRUB_MAX_LOOPS, GRUB_MAX_TRIES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def boardlib() -> ModuleType:
    spec = importlib.util.spec_from_file_location("boardlib", REPO / "board" / "boardlib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["boardlib"] = module
    spec.loader.exec_module(module)
    return module


def test_every_board_has_two_root_slots_between_the_esp_and_data(boardlib: ModuleType) -> None:
    for board in boardlib.board_names():
        info = boardlib.load_board(board)
        layout = boardlib.disk_layout(info)
        assert [p.name for p in layout.partitions] == ["esp", "root-a", "root-b", "data"]
        root_type = boardlib.GPT_TYPES["root-" + info.arch]
        assert [p.type_uuid for p in layout.partitions[1:3]] == [root_type, root_type]
        ids = [p.partuuid for p in layout.partitions] + [layout.disk_uuid]
        assert len(set(ids)) == len(ids), board
        assert layout.partitions[1].partuuid == boardlib.fixed_uuid(board, "part-root-a")
        # the slots are the same size: either holds what the other held
        assert layout.partitions[1].size == layout.partitions[2].size, board
        slots = boardlib.boot_slots(info)
        assert [(s.bootname, s.partition, s.number) for s in slots] == [
            ("A", "root-a", 2), ("B", "root-b", 3)]
        assert 1 <= info.boot_tries <= 9


def _board_dir(tmp_path: Path, board: str, toml: str) -> Path:
    d = tmp_path / board
    d.mkdir(parents=True)
    (d / "board.toml").write_text(toml)
    return d


def test_a_board_without_the_slots_is_refused(boardlib: ModuleType, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = (REPO / "board/qemu-x86_64/board.toml").read_text()
    monkeypatch.setattr(boardlib, "BOARDS", tmp_path)
    one_root = re.sub(r'\[\[partition\]\]\nname = "root-b"\ntype = "root"\nsize_mib = \d+\n',
                      "", src)
    _board_dir(tmp_path, "one-root", one_root)
    with pytest.raises(boardlib.BuildError, match="root-a and root-b"):
        boardlib.load_board("one-root")
    _board_dir(tmp_path, "old-name", src.replace('name = "root-a"', 'name = "root"'))
    with pytest.raises(boardlib.BuildError, match="root-a and root-b"):
        boardlib.load_board("old-name")
    _board_dir(tmp_path, "tries", src.replace("boot_tries = 3", "boot_tries = 0"))
    with pytest.raises(boardlib.BuildError, match="boot_tries"):
        boardlib.load_board("tries")
    for i, loops in enumerate(("1", "21", '"10"')):
        _board_dir(tmp_path, f"loops{i}", src.replace("boot_loops = 10", f"boot_loops = {loops}"))
        with pytest.raises(boardlib.BuildError, match="boot_loops must be 2 to 20"):
            boardlib.load_board(f"loops{i}")


def test_the_image_ships_slot_a_committed_and_b_empty(boardlib: ModuleType,
                                                      tmp_path: Path) -> None:
    info = boardlib.load_board("qemu-x86_64")
    env = boardlib.initial_grubenv(info)
    assert len(env) == 1024
    assert env.startswith(b"# GRUB Environment Block\nORDER=A B\n")
    assert env.rstrip(b"#").endswith(b"\n") and env.endswith(b"#")
    expected = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "A_COMMITTED": "1",
                "A_LOADFAIL": "0", "A_LOOPS": "0", "B_OK": "0", "B_TRY": "0",
                "B_COMMITTED": "0", "B_LOADFAIL": "0", "B_LOOPS": "0", "BOOT_TRIES": "3",
                "BOOT_LOOPS": "10", "SDWAN_END": "1"}
    # the box's own reader takes it as a valid block; grub.cfg checks the same end marker
    assert boardlib.GRUBENV_END == bootenv.END
    # the box's own reader takes it as a valid block, in the order it writes them
    assert bootenv.parse(env) == expected
    assert list(bootenv.canonical(expected, ["A", "B"])) == list(expected)
    assert bootenv.render(expected) == env
    editenv = shutil.which("grub-editenv")
    if editenv:  # GRUB's own tool reads it
        path = tmp_path / "grubenv"
        path.write_bytes(env)
        listed = subprocess.run([editenv, str(path), "list"], capture_output=True, text=True,
                                check=True).stdout
        assert listed.splitlines() == [f"{k}={v}" for k, v in expected.items()]


def test_grubenv_refuses_what_does_not_fit(boardlib: ModuleType) -> None:
    with pytest.raises(boardlib.BuildError):
        boardlib.grubenv({"X": "y" * 1024})
    with pytest.raises(boardlib.BuildError):
        boardlib.grubenv({"X": "two\nlines"})
    with pytest.raises(bootenv.BootEnvError):
        bootenv.parse(b"#" * 1024)


def test_the_updater_counts_tries_as_grub_does(boardlib: ModuleType) -> None:
    """The updater tells a slot GRUB passes over by the same maximum GRUB counts to."""
    for board in boardlib.board_names():
        info = boardlib.load_board(board)
        assert info.boot_tries == GRUB_MAX_TRIES, board
        assert info.boot_loops == GRUB_MAX_LOOPS == boardlib.DEFAULT_BOOT_LOOPS, board
    assert bootenv.DEFAULT_MAX_LOOPS == boardlib.DEFAULT_BOOT_LOOPS


def _slot_function(cfg: str, slot: str) -> str:
    m = re.search(rf"^function slot_{slot} {{\n(.*?)^}}$", cfg, re.M | re.S)
    assert m, cfg
    return m.group(1)


def test_grub_cfg_boots_each_slot_from_its_own_partition(boardlib: ModuleType) -> None:
    for board in boardlib.board_names():
        info = boardlib.load_board(board)
        cfg = boardlib.grub_cfg(info)
        names = "A_OK A_TRY A_COMMITTED A_LOOPS B_OK B_TRY B_COMMITTED B_LOOPS"
        # a copy is valid when its end marker is read and it can be written back
        for env, var, what in (("grubenv2", "env2", ""), ("grubenv", "env1", f"ORDER {names} ")):
            probe = (f'set SDWAN_END=0\nif load_env -f "${{prefix}}/{env}" {what}SDWAN_END; then\n'
                     '\tif [ "$SDWAN_END" = 1 ]; then\n'
                     f'\t\tif save_env -f "${{prefix}}/{env}" SDWAN_END; then set {var}=1; fi\n'
                     "\tfi\nfi\n")
            assert probe in cfg, cfg
        # the copy only when grubenv is not valid, from the defaults again
        fallback = cfg[cfg.index("if [ $env1 = 0 ]; then"):]
        assert fallback.index("\tset A_OK=0;") < fallback.index(
            f'\t\tload_env -f "${{prefix}}/grubenv2" ORDER {names}\n')
        assert '\tif [ $env1 = 1 ]; then save_env -f "${prefix}/grubenv" "$@"; fi\n' in cfg
        assert '\tif [ $env2 = 1 ]; then save_env -f "${prefix}/grubenv2" "$@"; fi\n' in cfg
        assert "regexp -s 1:disk '^([^,]+),' \"$root\"\n" in cfg
        assert "set timeout=0\n" in cfg and "menuentry" not in cfg
        # a variable a valid block lacks means "not bootable"
        head = cfg[:cfg.index('load_env -f "${prefix}/grubenv" ')]
        assert "set A_OK=0; set A_TRY=0; set A_COMMITTED=0; set A_LOOPS=0\n" in head
        for slot in boardlib.boot_slots(info):
            b = slot.bootname
            body = _slot_function(cfg, b)
            dev = f"($disk,gpt{slot.number})"
            assert (f'linux "{dev}/boot/vmlinuz" {info.cmdline} rauc.slot={b} '
                    f"sdwan.root={slot.partition}; then") in body, body
            assert f'initrd "{dev}/boot/initrd.img"; then boot; fi' in body
            # a committed slot boots first thing, no try counted, no trial on its command
            # line; its boot is counted in LOOPS, saved before the kernel runs, and at the
            # board's boot_loops it is passed over
            committed, counted = body.split(f'\telif [ "${b}_OK" = 1 -a "${b}_TRY" -lt', 1)
            committed, passed_over = committed.split(
                f'\telif [ "${b}_OK" = 1 -a "${b}_COMMITTED" = 1 ]; then\n')
            assert committed.startswith(f'\tif [ "${b}_OK" = 1 -a "${b}_COMMITTED" = 1 -a'
                                        f' "${b}_LOOPS" -lt {info.boot_loops} ]; then\n')
            assert committed.index(f"save {b}_LOOPS\n") < committed.index("linux ")
            # only a slot whose firmware clears the count is counted
            marker = f'\t\tif [ -f "{dev}/{boardlib.SLOT_SETTLES}" ]; then\n'
            assert committed.index(marker) < committed.index(f"set {b}_LOOPS=1")
            assert (boardlib.COMMON / "rootfs" / boardlib.SLOT_SETTLES).is_file()
            assert f"else set {b}_LOOPS={info.boot_loops}; fi" in committed
            assert "sdwan.trial" not in committed and "_TRY=" not in committed.split("linux")[0]
            assert passed_over.strip() == (
                f'echo "grub: slot {b} ({slot.partition}) is in a reboot loop'
                f' ({info.boot_loops} boots in a row): passed over"')
            # ... and one that cannot be loaded, twice, is marked so, keeping its commit
            assert committed.count("linux ") == 2 and "COMMITTED=0" not in committed
            assert (f"set {b}_TRY={info.boot_tries}\n\t\tset {b}_LOADFAIL=1\n"
                    f"\t\tsave {b}_TRY {b}_LOADFAIL") in committed
            # any other try is counted and saved before the kernel is loaded, and is a trial
            assert counted.index(f"save {b}_TRY\n") < counted.index("linux ")
            assert f"sdwan.root={slot.partition} sdwan.trial=${b}_TRY; then" in counted
            after = counted[counted.index("linux "):]
            assert f"save {b}_TRY {b}_LOADFAIL" in after
        # every slot in ORDER, then: tries back for the good ones, saved, reboot
        assert "for SLOT in $ORDER; do\n" in cfg
        tail = cfg[cfg.index("done\n"):]
        assert 'if [ "$A_OK" = 1 ]; then set A_TRY=0; fi' in tail
        assert "set A_LOOPS=0\nset B_LOOPS=0\nsave A_TRY A_LOOPS B_TRY B_LOOPS" in tail
        assert tail.rstrip().endswith("reboot")


def test_grub_cfg_counts_tries_up_to_the_boards_maximum(boardlib: ModuleType) -> None:
    info = boardlib.load_board("qemu-x86_64")
    for tries in (1, 3, 5):
        body = _slot_function(boardlib.grub_cfg(dataclasses.replace(info, boot_tries=tries)),
                              "A")
        assert f'if [ "$A_OK" = 1 -a "$A_TRY" -lt {tries} ]; then' in body
        steps = re.findall(r'\[ "\$A_TRY" = (\d) \]; then set A_TRY=(\d)', body)
        assert steps == [(str(i), str(i + 1)) for i in range(tries - 1)], body
        last = "else set A_TRY" if tries > 1 else "set A_TRY"
        assert f"{last}={tries}" in body
    for loops in (2, 10, 20):
        body = _slot_function(boardlib.grub_cfg(dataclasses.replace(info, boot_loops=loops)),
                              "A")
        steps = re.findall(r'\[ "\$A_LOOPS" = (\d+) \]; then set A_LOOPS=(\d+)', body)
        assert steps == [(str(i), str(i + 1)) for i in range(loops - 1)], body
        assert f"else set A_LOOPS={loops}; fi" in body
        assert f'"$A_LOOPS" -lt {loops} ]' in body


def test_grub_never_stops_at_a_prompt(boardlib: ModuleType) -> None:
    """GRUB's core runs the embedded config with its rescue parser (simple commands, no
    comments): it runs grub.cfg and reboots should grub.cfg ever come back."""
    early = boardlib.GRUB_EARLY_CFG.read_text().splitlines()
    assert early[0] == "source ${prefix}/grub.cfg"
    assert early[-1] == "reboot"
    assert not any(line.lstrip().startswith("#") for line in early)
    assert boardlib.GRUB_PREFIX == "/EFI/BOOT"
    for needed in ("part_gpt", "fat", "squash4", "gzio", "linux", "normal", "configfile",
                   "loadenv", "test", "regexp", "echo", "reboot", "sleep"):
        assert needed in boardlib.GRUB_MODULES
    assert "set superusers=" in boardlib.grub_cfg(boardlib.load_board("qemu-aarch64"))


def test_the_esp_holds_grub_its_cfg_and_grubenv(boardlib: ModuleType, tmp_path: Path) -> None:
    info = boardlib.load_board("qemu-aarch64")
    loader = tmp_path / "grub.efi"
    loader.write_bytes(b"MZ grub")
    files = boardlib.esp_files(info, loader, tmp_path / "esp")
    assert sorted(files) == ["EFI/BOOT/BOOTAA64.EFI", "EFI/BOOT/grub.cfg", "EFI/BOOT/grubenv",
                             "EFI/BOOT/grubenv2"]
    assert files["EFI/BOOT/grubenv"].read_bytes() == boardlib.initial_grubenv(info)
    assert files["EFI/BOOT/grubenv2"].read_bytes() == boardlib.initial_grubenv(info)
    assert "console=ttyAMA0,115200" in files["EFI/BOOT/grub.cfg"].read_text()
