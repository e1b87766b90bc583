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
from updatekit import dev_keys

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
        assert cfg.get("BR2_TARGET_ROOTFS_SQUASHFS") == "y", where  # the slot image
        # GRUB 2.06's squash4 (mkimage's) reads gzip; Buildroot's GRUB loads the kernel too
        assert cfg.get("BR2_TARGET_ROOTFS_SQUASHFS4_GZIP") == "y", where
        assert boardlib.SQUASHFS_COMP == "gzip"
        # the same GRUB as mkimage's: modules, embedded config
        assert cfg.get("BR2_TARGET_GRUB2_BUILTIN_MODULES_EFI", "").split() == \
            list(boardlib.GRUB_MODULES), where
        assert tree_paths(cfg.get("BR2_TARGET_GRUB2_BUILTIN_CONFIG_EFI", "")) == \
            [boardlib.GRUB_EARLY_CFG], where


def test_the_defconfigs_build_what_on_box_updates_run() -> None:
    """RAUC with its D-Bus service and JSON output (the updater reads `rauc status
    --output-format=json`) and the bus daemon on the target, none of GRUB's tools: what
    board/common/packages.toml ships from Debian for the same programs."""
    packages = tomllib.loads((REPO / "board/common/packages.toml").read_text())
    for deb in ("rauc", "dbus-daemon", "libdbus-1-3"):
        assert deb in packages["rootfs"], f"packages.toml no longer ships {deb}: update this test"
    # grubenv is written by sdwan's bootenv: none of GRUB's tools goes onto the box
    assert "grub-common" not in packages["rootfs"]
    for program in ("usr/bin/rauc", "usr/bin/dbus-daemon"):
        assert program in packages["keep_bin"], program
    for path in defconfigs():
        cfg = read_defconfig(path)
        for sym in ("BR2_PACKAGE_RAUC", "BR2_PACKAGE_RAUC_DBUS", "BR2_PACKAGE_RAUC_JSON",
                    "BR2_PACKAGE_DBUS"):
            assert cfg.get(sym) == "y", f"{path.name}: {sym}"
        assert "BR2_TARGET_GRUB2_INSTALL_TOOLS" not in cfg, path.name
        # bundles come from files on the box: no download or streaming code
        for sym in ("BR2_PACKAGE_RAUC_NETWORK", "BR2_PACKAGE_RAUC_STREAMING"):
            assert sym not in cfg, f"{path.name}: {sym}"


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
                 "module_closure(", "boardlib.install_slot_boot(", "boardlib.esp_files(",
                 "boardlib.boot_slots(", "boardlib.GRUB_MODULES", "boardlib.GRUB_EARLY_CFG"):
        assert used in mkimage, f"mkimage.py does not use {used}"
    lib = (REPO / "board" / "boardlib.py").read_text()
    for fn in ("buildroot_rootfs", "buildroot_image"):
        body = lib.split(f"def {fn}(", 1)[1].split("\ndef ", 1)[0]
        for used in {"buildroot_rootfs": ("install_overlay(", "install_board_files(",
                                          "module_closure(", "check_console(",
                                          "install_slot_boot("),
                     "buildroot_image": ("esp_files(", "genimage_config(",
                                         "boot_slots(")}[fn]:
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
        cfg = boardlib.genimage_config(info, f"{board}.img", {"root-a": "rootfs.squashfs"},
                                       f"{board}-esp")
        assert f'disk-uuid = "{layout.disk_uuid}"' in cfg
        assert f"label-id: {layout.disk_uuid}" in sfdisk
        assert f"\tsize = {layout.total_bytes}\n" in cfg
        parts = re.findall(r"partition ([\w-]+) \{\n\t\tpartition-type-uuid = \"([\w-]+)\"\n"
                           r"\t\tpartition-uuid = \"([\w-]+)\"\n\t\toffset = (\d+)\n"
                           r"\t\tsize = (\d+)\n", cfg)
        rows = re.findall(r'start=(\d+), size=(\d+), type=([\w-]+), uuid=([\w-]+), '
                          r'name="([\w-]+)"', sfdisk)
        assert len(parts) == len(rows) == len(info.partitions) == 4, board
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


# ---------------------------------------------------------------- the post-build and
# post-image steps on a target folder laid out as Buildroot leaves it (merged /usr,
# site-packages, console scripts as the installer writes them, a dynamic busybox)

HOST_LIBS = (Path("/lib/x86_64-linux-gnu"), Path("/usr/lib/x86_64-linux-gnu"),
             Path("/lib64"), Path("/usr/lib64"))


def _host_library(name: str) -> Path:
    for d in HOST_LIBS:
        if (d / name).exists():
            return (d / name).resolve()
    raise FileNotFoundError(name)


def _fake_module_tree(root: Path, kver: str, names: list[str]) -> None:
    moddir = root / "usr/lib/modules" / kver
    lines = []
    for name in names:
        rel = f"kernel/drivers/{name}.ko"
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(b"\x7fELF module " + name.encode())
        # ext4 needs jbd2, as in a real modules.dep
        lines.append(f"{rel}: kernel/fs/jbd2.ko" if name == "ext4" else f"{rel}:")
    (moddir / "kernel/fs").mkdir(parents=True, exist_ok=True)
    (moddir / "kernel/fs/jbd2.ko").write_bytes(b"\x7fELF module jbd2")
    lines.append("kernel/fs/jbd2.ko:")
    (moddir / "modules.dep").write_text("\n".join(lines) + "\n")
    (moddir / "modules.builtin").write_text("")


@pytest.fixture()
def target(tmp_path: Path, boardlib: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Buildroot-like target folder of the qemu-x86_64 board, and the images folder with
    the kernel Buildroot built (BINARIES_DIR, as Buildroot exports it to its scripts)."""
    binaries = tmp_path / "images"
    binaries.mkdir()
    (binaries / "bzImage").write_bytes(b"MZ kernel")
    monkeypatch.setenv("BINARIES_DIR", str(binaries))
    # The post-build installs RAUC's keyring: development keys of the test's own.
    monkeypatch.setenv("FIRMWARE_KEYS", str(dev_keys(tmp_path / "firmware-keys")))
    busybox = shutil.which("busybox")
    if busybox is None or Path(busybox).resolve().read_bytes()[18] != 0x3E:  # EM_X86_64
        pytest.skip("needs the host's busybox on x86_64 (scripts/setup.sh installs it)")
    root = tmp_path / "target"
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc"):
        (root / d).mkdir(parents=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link if link != 'lib64' else 'lib'}")
    (root / "etc/inittab").write_text("::sysinit:/etc/init.d/rcS\nconsole::respawn:-/bin/sh\n")
    (root / "usr/lib/os-release").write_text("NAME=Buildroot\n")
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    shutil.copyfile(Path(busybox).resolve(), root / "usr/bin/busybox")
    (root / "usr/bin/busybox").chmod(0o755)
    todo = list(boardlib.elf_needed(root / "usr/bin/busybox")) + ["ld-linux-x86-64.so.2"]
    while todo:
        lib = todo.pop()
        if not (root / "usr/lib" / lib).exists():
            shutil.copyfile(_host_library(lib), root / "usr/lib" / lib)
            todo += boardlib.elf_needed(root / "usr/lib" / lib)
    for name, module in (("socket-console", "sdwan.appliance.console"),
                         ("socketd", "sdwan.site.socketd"), ("popd", "sdwan.pop.popd"),
                         ("socket-lab", "sdwan.lab.demo")):
        script = root / "usr/bin" / name
        script.write_text(f"#!/usr/bin/python3\nimport re\nimport sys\nfrom {module} import "
                          "main\nif __name__ == '__main__':\n    sys.exit(main())\n")
        script.chmod(0o755)
    site = root / "usr/lib/python3.14/site-packages/sdwan"
    for rel in ("appliance/console.pyc", "site/socketd.pyc", "lab/demo.pyc"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(b"")
    # what the dbus package installs beside the programs the box runs
    for rel in ("usr/bin/dbus-daemon", "usr/bin/rauc",
                "etc/init.d/S30dbus-daemon", "usr/share/dbus-1/system.conf",
                "usr/share/dbus-1/system-services/de.pengutronix.rauc.service"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    info = boardlib.load_board("qemu-x86_64")
    _fake_module_tree(root, "6.12.0", info.modules_boot + info.modules_runtime + ["softdog"])
    return root


def test_post_build_makes_the_appliance_root(
    boardlib: ModuleType, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BUILD_DIR", raising=False)
    assert boardlib.main(["rootfs", "qemu-x86_64", str(target)]) == 0
    info = boardlib.load_board("qemu-x86_64")
    inittab = (target / "etc/inittab").read_text()
    assert ("ttyS0::respawn:/sbin/getty -n -l /usr/libexec/sdwan/console-login 115200 ttyS0"
            in inittab)
    assert "/bin/sh" not in inittab and not (target / "etc/inittab.in").exists()
    assert (target / "etc/sdwan/board.toml").read_text() == (info.dir / "board.toml").read_text()
    assert (target / "etc/sdwan/leds.toml").read_text() == (info.dir / "leds.toml").read_text()
    assert (target / "etc/sdwan/qemu-provisioning").is_file()
    assert (target / "etc/sdwan/build-time").read_text().strip().isdigit()
    assert "VARIANT_ID=qemu-x86_64" in (target / "etc/os-release").read_text()
    assert (target / "usr/lib/os-release").read_text() == "NAME=Buildroot\n"
    assert str((target / "etc/socketd.toml").readlink()) == "/data/socketd.toml"
    assert not (target / "usr/bin/popd").exists() and not (target / "usr/bin/socket-lab").exists()
    assert (target / "usr/bin/socketd").exists()
    assert not (target / "usr/lib/python3.14/site-packages/sdwan/lab").exists()
    runtime = (target / "usr/lib/modules/6.12.0/modules.runtime").read_text().split()
    assert runtime.index("kernel/fs/jbd2.ko") < runtime.index("kernel/drivers/ext4.ko")
    assert "kernel/drivers/i6300esb.ko" in runtime  # the board's own runtime module
    assert "kernel/drivers/softdog.ko" not in runtime  # loaded on demand only
    # the slot's kernel and initramfs, in the root the squashfs is made of
    assert (target / "boot/vmlinuz").read_bytes() == b"MZ kernel"
    initrd = _cpio_names(target / "boot/initrd.img")
    assert initrd["init"] == (REPO / "board/common/initramfs/init").read_bytes()
    assert (target / "boot/efi").is_dir()
    for kept in ("usr/bin/dbus-daemon", "usr/bin/rauc", "usr/libexec/sdwan/bootenv",
                 "usr/libexec/sdwan/commit-deadline"):
        assert (target / kept).is_file(), kept
    for gone in ("etc/init.d/S30dbus-daemon", "usr/share/dbus-1"):
        assert not (target / gone).exists(), gone
    assert all(f"kernel/drivers/{m}.ko" in runtime for m in ("loop", "dm_mod", "dm_verity"))
    assert "compatible=sdwan-qemu-x86_64" in (target / "etc/rauc/system.conf").read_text()
    assert (target / "etc/rauc/keyring.pem").read_bytes() == (
        target.parent / "firmware-keys/firmware-ca.pem").read_bytes()


def test_post_build_needs_the_kernel(
    boardlib: ModuleType, target: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BUILD_DIR", raising=False)
    monkeypatch.delenv("BINARIES_DIR")
    assert boardlib.main(["rootfs", "qemu-x86_64", str(target)]) == 1
    assert "the kernel bzImage is not in BINARIES_DIR" in capsys.readouterr().err


def test_post_build_refuses_a_root_without_the_console(
    boardlib: ModuleType, target: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BUILD_DIR", raising=False)
    (target / "usr/bin/socket-console").unlink()
    assert boardlib.main(["rootfs", "qemu-x86_64", str(target)]) == 1
    assert "/usr/bin/socket-console is missing" in capsys.readouterr().err


def test_post_build_checks_the_built_kernel_against_the_fragments(
    boardlib: ModuleType, target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Buildroot drops a fragment's option whose dependencies are missing without a word:
    the kernel it built is checked the way mkimage checks Debian's."""
    build = tmp_path / "build"
    (build / "linux-headers-6.12.0").mkdir(parents=True)
    (build / "linux-headers-6.12.0/.config").write_text("")
    (build / "linux-6.12.0").mkdir()
    info = boardlib.load_board("qemu-x86_64")
    wanted = [line for f in boardlib.kernel_fragments(info)
              for line in f.read_text().splitlines() if line.startswith("CONFIG_")]
    monkeypatch.setenv("BUILD_DIR", str(build))
    (build / "linux-6.12.0/.config").write_text("\n".join(wanted).replace("=m", "=y") + "\n")
    assert boardlib.main(["rootfs", "qemu-x86_64", str(target)]) == 0
    (build / "linux-6.12.0/.config").write_text(
        "\n".join(w for w in wanted if "I6300ESB" not in w) + "\n")
    assert boardlib.main(["rootfs", "qemu-x86_64", str(target)]) == 1
    err = capsys.readouterr().err
    assert "CONFIG_I6300ESB_WDT=m (kernel has not set)" in err
    assert "board/qemu-x86_64/kernel.fragment" in err


def _cpio_names(path: Path) -> dict[str, bytes]:
    import gzip

    data, names, pos = gzip.decompress(path.read_bytes()), {}, 0
    while True:
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) // 4 * 4
        if name == "TRAILER!!!":
            return names
        names[name] = data[pos:pos + size]
        pos = (pos + size + 3) // 4 * 4


def test_post_image_makes_the_esp_files_and_the_genimage_config(
    boardlib: ModuleType, target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BUILD_DIR", raising=False)
    assert boardlib.main(["rootfs", "qemu-x86_64", str(target)]) == 0
    binaries = tmp_path / "images"
    (binaries / "efi-part/EFI/BOOT").mkdir(parents=True)
    (binaries / "efi-part/EFI/BOOT/bootx64.efi").write_bytes(b"MZ grub")
    (binaries / "rootfs.squashfs").write_bytes(b"hsqs slot")
    assert boardlib.main(["image", "qemu-x86_64", str(target), str(binaries)]) == 0
    esp = binaries / "qemu-x86_64-esp/EFI/BOOT"
    assert sorted(p.name for p in esp.iterdir()) == ["BOOTX64.EFI", "grub.cfg", "grubenv",
                                                     "grubenv2"]
    info = boardlib.load_board("qemu-x86_64")
    assert (esp / "grub.cfg").read_text() == boardlib.grub_cfg(info)
    assert (esp / "grubenv").read_bytes() == boardlib.initial_grubenv(info)
    assert (binaries / "qemu-x86_64.rootfs.img").read_bytes() == b"hsqs slot"
    cfg = (binaries / "genimage-qemu-x86_64.cfg").read_text()
    assert 'image = "qemu-x86_64-esp/EFI"' in cfg
    # slot A is filled, slot B left empty
    assert re.search(r'partition root-a \{[^}]*image = "rootfs.squashfs"', cfg)
    assert re.search(r"partition root-b \{[^}]*\}", cfg)
    assert not re.search(r"partition root-b \{[^}]*image =", cfg)
    initrd = _cpio_names(target / "boot/initrd.img")
    # the dynamic busybox brings its libraries and loader (lib64 for x86_64's PT_INTERP)
    assert {"bin/busybox", "bin/sh", "lib/libc.so.6", "lib/ld-linux-x86-64.so.2", "lib64",
            "dev/console"} <= set(initrd)
    boot = initrd["etc/modules.boot"].decode().split()
    assert boot == [f"kernel/drivers/{m}.ko" for m in info.modules_boot]
    assert all(f"lib/modules/{m}" in initrd for m in boot)
