"""The Buildroot tree (buildroot/, docs/buildroot.md) without Buildroot: its scripts pass
shellcheck, every board has a defconfig and every defconfig a board, every file the
defconfigs and scripts name exists, the board files both builds share are the ones both
use (board/boardlib.py), the disk layout genimage gets is the one mkimage writes, the
firmware package asks for every runtime dependency, and python-pytun's hash file is well
formed. buildroot/check.sh does the checks that need a Buildroot checkout."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
TREE = REPO / "buildroot"
EXTERNAL_VAR = "$(BR2_EXTERNAL_SDWAN_PATH)"


@pytest.fixture(scope="module")
def boardlib() -> ModuleType:
    spec = importlib.util.spec_from_file_location("boardlib", REPO / "board" / "boardlib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["boardlib"] = module
    spec.loader.exec_module(module)
    return module


def defconfig_name(board: str) -> str:
    return board.replace("-", "_") + "_sdwan_defconfig"


def read_defconfig(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("BR2_"):
            key, _, value = line.partition("=")
            values[key] = value.strip('"')
    return values


def tree_paths(value: str) -> list[Path]:
    """The files a defconfig string names, with the tree's variable resolved."""
    return [Path(word.replace(EXTERNAL_VAR, str(TREE))).resolve() for word in value.split()]


def defconfigs() -> list[Path]:
    return sorted((TREE / "configs").glob("*_defconfig"))


def scripts() -> list[Path]:
    return sorted([TREE / "check.sh", *(TREE / "board").glob("*/*.sh")])


def test_the_tree_has_what_buildroot_requires() -> None:
    desc = (TREE / "external.desc").read_text()
    assert re.search(r"^name: SDWAN$", desc, re.M), desc
    assert "package/*/*.mk" in (TREE / "external.mk").read_text()
    config_in = (TREE / "Config.in").read_text()
    for pkg in sorted((TREE / "package").iterdir()):
        assert (pkg / f"{pkg.name}.mk").is_file(), pkg
        assert f'source "$BR2_EXTERNAL_SDWAN_PATH/package/{pkg.name}/Config.in"' in config_in


def test_the_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (scripts/setup.sh installs it)"
    for script in scripts():
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
    proc = subprocess.run([shellcheck, *map(str, scripts())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_each_board_has_a_defconfig_and_each_defconfig_a_board(boardlib: ModuleType) -> None:
    boards = boardlib.board_names()
    assert boards, "no board/*/board.toml"
    assert sorted(p.name for p in defconfigs()) == sorted(defconfig_name(b) for b in boards)
    for board in boards:
        info = boardlib.load_board(board)
        cfg = read_defconfig(TREE / "configs" / defconfig_name(board))
        where = defconfig_name(board)
        assert cfg.get("BR2_ROOTFS_POST_SCRIPT_ARGS") == board, where
        assert cfg.get(f"BR2_{info.arch}") == "y", f"{where}: board.toml says {info.arch}"
        grub = {"x86_64": "BR2_TARGET_GRUB2_X86_64_EFI", "aarch64": "BR2_TARGET_GRUB2_ARM64_EFI"}
        assert cfg.get(grub[info.arch]) == "y", f"{where}: GRUB for {info.arch} EFI"
        assert cfg.get("BR2_PACKAGE_SOCKET_FIRMWARE") == "y", where
        assert cfg.get("BR2_TARGET_ROOTFS_SQUASHFS") == "y", where  # the root partition


def test_every_file_the_defconfigs_name_exists() -> None:
    for path in defconfigs():
        cfg = read_defconfig(path)
        for key, value in cfg.items():
            if EXTERNAL_VAR in value:
                for file in tree_paths(value):
                    assert file.exists(), f"{path.name}: {key} names {file}, which is missing"


def test_every_file_the_scripts_name_exists(boardlib: ModuleType) -> None:
    commands = {"rootfs", "image", "boards"}
    for script in scripts():
        text = script.read_text()
        for rel in re.findall(r'\$repo/([\w./-]+)', text):
            assert (REPO / rel).exists(), f"{script.name} runs {rel}, which is missing"
        for cmd in re.findall(r"boardlib\.py\" (\w+)", text):
            assert cmd in commands, f"{script.name}: boardlib.py has no command {cmd}"
    post = {read_defconfig(p)["BR2_ROOTFS_POST_BUILD_SCRIPT"] for p in defconfigs()}
    post |= {read_defconfig(p)["BR2_ROOTFS_POST_IMAGE_SCRIPT"] for p in defconfigs()}
    assert {str(p.relative_to(TREE.resolve())) for v in post for p in tree_paths(v)} == {
        "board/common/post-build.sh", "board/common/post-image.sh"}


def test_both_builds_take_the_board_files_from_one_place(boardlib: ModuleType) -> None:
    """The overlay, kernel fragments and busybox applets the defconfigs give Buildroot are
    board/'s files, the ones board/mkimage.py uses; the layout, overlay, board files (LED map,
    serial console) and initramfs come from board/boardlib.py in both builds."""
    mkimage = (REPO / "board" / "mkimage.py").read_text()
    for used in ("boardlib.disk_layout", "boardlib.kernel_fragments",
                 "boardlib.install_board_files", "install_overlay(", "check_console(",
                 "module_closure(", "write_cpio("):
        assert used in mkimage, f"mkimage.py does not use {used}"
    lib = (REPO / "board" / "boardlib.py").read_text()
    for fn in ("buildroot_rootfs", "buildroot_image"):
        body = lib.split(f"def {fn}(", 1)[1].split("\ndef ", 1)[0]
        for used in {"buildroot_rootfs": ("install_overlay(", "install_board_files(",
                                          "module_closure(", "check_console("),
                     "buildroot_image": ("make_initramfs(", "genimage_config(",
                                         "grub_cfg(")}[fn]:
            assert used in body, f"boardlib.{fn} does not use {used}"
    common = REPO / "board" / "common"
    for board in boardlib.board_names():
        info = boardlib.load_board(board)
        cfg = read_defconfig(TREE / "configs" / defconfig_name(board))
        assert tree_paths(cfg["BR2_ROOTFS_OVERLAY"]) == [common / "rootfs"]
        assert tree_paths(cfg["BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES"]) == \
            boardlib.kernel_fragments(info)
        assert tree_paths(cfg["BR2_PACKAGE_BUSYBOX_CONFIG_FRAGMENT_FILES"]) == \
            [common / "busybox.fragment"]
        for name in ("board.toml", "leds.toml", "kernel.fragment"):
            assert (info.dir / name).is_file(), f"board/{board}/{name} is missing"


def test_genimage_gets_the_partition_table_mkimage_writes(boardlib: ModuleType) -> None:
    for board in boardlib.board_names():
        info = boardlib.load_board(board)
        layout = boardlib.disk_layout(info)
        sfdisk = boardlib.sfdisk_script(layout)
        cfg = boardlib.genimage_config(info, f"{board}.img", {"root": "rootfs.squashfs"},
                                       f"{board}-esp")
        assert f'disk-uuid = "{layout.disk_uuid}"' in cfg
        assert f"label-id: {layout.disk_uuid}" in sfdisk
        assert f"\tsize = {layout.total_bytes}\n" in cfg
        parts = re.findall(r"partition (\w+) \{\n\t\tpartition-type-uuid = \"([\w-]+)\"\n"
                           r"\t\tpartition-uuid = \"([\w-]+)\"\n\t\toffset = (\d+)\n"
                           r"\t\tsize = (\d+)\n", cfg)
        rows = re.findall(r'start=(\d+), size=(\d+), type=([\w-]+), uuid=([\w-]+), '
                          r'name="(\w+)"', sfdisk)
        assert len(parts) == len(rows) == len(info.partitions) == 3, board
        for (name, ptype, puuid, offset, size), (start, count, t, u, n) in zip(
                parts, rows, strict=True):
            assert (name, ptype, puuid) == (n, t, u), board
            assert (int(offset), int(size)) == (int(start) * 512, int(count) * 512), board
        # the partitions follow each other from 1 MiB, sizes from board.toml
        assert int(rows[0][0]) * 512 == 1024 * 1024
        assert [int(r[1]) * 512 // 2**20 for r in rows] == [p.size_mib for p in info.partitions]


def test_the_firmware_package_asks_for_every_runtime_dependency() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    mk = (TREE / "package/socket-firmware/socket-firmware.mk").read_text()
    version = re.search(r"^SOCKET_FIRMWARE_VERSION = (\S+)$", mk, re.M)
    assert version and version.group(1) == pyproject["project"]["version"]
    config = (TREE / "package/socket-firmware/Config.in").read_text()
    selects = set(re.findall(r"^\s*select (BR2_\w+)", config, re.M))
    # Buildroot's package of each PyPI distribution pyproject.toml depends on
    names = {"pyserial": "serial"}
    for req in pyproject["project"]["dependencies"]:
        dist = re.split(r"[=<>!~;\[ ]", req, maxsplit=1)[0].lower()
        pkg = names.get(dist, dist).removeprefix("python-").replace("-", "_").upper()
        assert f"BR2_PACKAGE_PYTHON_{pkg}" in selects, f"{req}: not selected"
    # what board/common/packages.toml ships beside Python and busybox
    for program in ("NFTABLES", "CHRONY", "E2FSPROGS", "UTIL_LINUX_BINARIES",
                    "UTIL_LINUX_PARTX", "OPENSSL", "PYTHON3_SSL", "PYTHON3_SQLITE"):
        assert f"BR2_PACKAGE_{program}" in selects, program
    packages = tomllib.loads((REPO / "board/common/packages.toml").read_text())["rootfs"]
    for deb in ("nftables", "chrony", "e2fsprogs", "fdisk", "util-linux", "libssl3"):
        assert deb in packages, f"packages.toml no longer ships {deb}: update this test"


def test_python_pytun_hash_file_is_well_formed() -> None:
    pkg = TREE / "package/python-pytun"
    mk = (pkg / "python-pytun.mk").read_text()
    version = re.search(r"^PYTHON_PYTUN_VERSION = (\S+)$", mk, re.M)
    assert version
    pins = (REPO / "board/common/constraints.txt").read_text()
    assert f"python-pytun=={version.group(1)}\n" in pins, "constraints.txt pins another version"
    lengths = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
    hashed = {}
    for n, line in enumerate((pkg / "python-pytun.hash").read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("  ")
        assert len(fields) == 3, f"line {n}: TYPE  HASH  FILE, two spaces apart: {line!r}"
        kind, digest, name = fields
        assert kind in lengths, f"line {n}: unknown hash type {kind}"
        assert re.fullmatch(f"[0-9a-f]{{{lengths[kind]}}}", digest), f"line {n}: {digest}"
        hashed.setdefault(name, set()).add(kind)
    assert "sha256" in hashed.get(f"python-pytun-{version.group(1)}.tar.gz", set())
    assert "sha256" in hashed.get("LICENSE", set())
    assert re.search(r"^PYTHON_PYTUN_LICENSE_FILES = LICENSE$", mk, re.M)
