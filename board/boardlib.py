#!/usr/bin/env python3
"""The boards, in one place for both ways of building the appliance: board/mkimage.py (from
Debian packages) imports this module, and the Buildroot tree's post-build and post-image
scripts (buildroot/board/common/) run it. What a board is comes from board/<name>/board.toml
and the files beside it; what this module owns is how that becomes a root filesystem and a
disk, so that both builds give the same partition table, overlay, serial console, LED map,
kernel options and boot modules:

* reading board.toml (architecture, serial ports, command line, partitions, modules);
* the GPT layout: partition order, sizes, offsets, type GUIDs and the fixed disk and
  partition GUIDs (as an sfdisk script for mkimage, as a genimage config for Buildroot);
* the boot slots (root-a and root-b, each a squashfs with its own kernel and initramfs in
  /boot) and GRUB's side of them: grub.cfg, the initial grubenv, the built-in modules;
* the kernel configuration fragments of a board (board/common/kernel.fragment plus
  board/<name>/kernel.fragment);
* the overlay (board/common/rootfs, inittab with the board's console port), the board files
  in /etc/sdwan, the links and directories of the read-only root, /etc/os-release;
* the check that the serial console runs socket-console and nothing else;
* kernel module closures (modules.dep) and the initramfs (board/common/initramfs/init,
  busybox, the boot modules) as a reproducible cpio;
* updates: the board's RAUC compatible, its A/B root slots, /etc/rauc/system.conf and the
  keyring, and the firmware keys of a build (FIRMWARE_KEYS; board/mkbundle.py signs with
  them, docs/update.md).

Buildroot's scripts call it as (with Buildroot's host python, 3.11 or later):

    boardlib.py rootfs BOARD TARGET_DIR               post-build: overlay, board files, checks,
                                                      kernel and initramfs in /boot
    boardlib.py image BOARD TARGET_DIR BINARIES_DIR   post-image: grub.cfg, grubenv, ESP
                                                      files and genimage-<BOARD>.cfg
    boardlib.py boards                                the board names
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import gzip
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "board"
COMMON = BOARDS / "common"
MiB = 1024 * 1024
SECTOR = 512

# Fixed identities: derived from the board name, so they never change between builds.
ID_NAMESPACE = uuid.UUID("5b1c3f0e-8f7a-4d0c-9a52-0d6f2b8e4a11")
GPT_TYPES = {
    "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "data": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
    # "root" follows the Discoverable Partitions Specification, per architecture.
    "root-x86_64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "root-aarch64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}
# The UEFI removable-media path of each architecture (what the firmware loads from the ESP).
EFI_LOADERS = {"x86_64": "BOOTX64.EFI", "aarch64": "BOOTAA64.EFI"}
# The kernel image Buildroot leaves in its images folder, per architecture.
KERNEL_IMAGES = {"x86_64": "bzImage", "aarch64": "Image"}
# The first partition starts at 1 MiB; 1 MiB is left after the last one for the backup GPT.
FIRST_LBA = 2048
TAIL_SECTORS = 2048

# Each boot slot (ROOT_SLOTS, below) holds a whole system, kernel and initramfs included,
# so an update replaces them together.
SLOT_KERNEL = "boot/vmlinuz"
SLOT_INITRD = "boot/initrd.img"
# In a slot whose firmware clears GRUB's count of its committed boots once one stayed up
# (bootenv settle): GRUB counts only such a slot, so firmware older than the count, put in a
# slot by a bundle, is never given up for boots it cannot clear.
SLOT_SETTLES = "etc/sdwan/settles-boot-count"
# GRUB: the platform per architecture, the folder on the ESP it is loaded from (its prefix:
# grub.cfg and grubenv live there too) and the modules built into its image. squash4 reads
# gzip but not zstd in GRUB 2.06, hence the slots' squashfs compression.
GRUB_PLATFORMS = {"x86_64": "x86_64-efi", "aarch64": "arm64-efi"}
GRUB_PREFIX = "/EFI/BOOT"
GRUB_MODULES = ("part_gpt", "fat", "squash4", "gzio", "linux", "boot", "normal", "configfile",
                "loadenv", "test", "regexp", "echo", "sleep", "reboot")
# Run by GRUB's core before anything else (simple commands only): the slot selection, then a
# reboot should it ever come back, so no failure ends at a GRUB prompt.
GRUB_EARLY_CFG = COMMON / "grub-early.cfg"
GRUBENV_SIZE = 1024
SQUASHFS_COMP = "gzip"


def slot_squashfs_args(epoch: int) -> list[str]:
    """mksquashfs options of a slot image after its source and target: one place, so a slot
    image made again from an unpacked one (the update tests' bundles) is made as the image
    build makes it. Run with SOURCE_DATE_EPOCH unset, which mksquashfs refuses beside
    -mkfs-time and -all-time."""
    return ["-noappend", "-quiet", "-no-progress", "-comp", SQUASHFS_COMP, "-b", "256K",
            "-all-root", "-no-xattrs", "-reproducible", "-mkfs-time", str(epoch),
            "-all-time", str(epoch)]

# socketd's console scripts and firmware modules that do not belong on an appliance.
NOT_ON_APPLIANCE = {"socket-lab", "popd", "popctl", "socket-pki"}
NOT_ON_APPLIANCE_MODULES = {"lab"}
# The serial console: getty runs CONSOLE_LOGIN, which runs the console's entry point and
# nothing else (check_console).
CONSOLE_ENTRY = "socket-console"
CONSOLE_MODULE = "sdwan.appliance.console"
CONSOLE_LOGIN = "/usr/libexec/sdwan/console-login"
# Programs that would give a login or a shell on a terminal of their own.
SHELLS = {"sh", "ash", "bash", "dash", "hush", "login", "sulogin", "su"}


class BuildError(Exception):
    """The image cannot be built; the message says what is wrong and what to do."""


def fixed_uuid(board: str, what: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{board}/{what}")).upper()


def walk(root: Path) -> Iterator[Path]:
    """Every path below root, sorted, directories before their contents."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


# ---------------------------------------------------------------- board description


@dataclasses.dataclass
class Partition:
    name: str
    type: str
    size_mib: int


@dataclasses.dataclass
class BoardInfo:
    name: str
    dir: Path
    arch: str  # uname -m: x86_64 or aarch64
    console: str
    baud: int
    cmdline: str
    partitions: list[Partition]
    modules_boot: list[str]
    modules_runtime: list[str]
    modules_on_demand: list[str]
    qemu_provisioning: bool
    boot_tries: int  # boots a slot gets before GRUB falls back to the next one
    # boots in a row a committed slot may end before it stays up (a reboot loop), after
    # which GRUB passes it over while another slot can be booted
    boot_loops: int
    raw: dict


# A committed slot whose boots keep ending before it stays up is given up after this many in
# a row (board.toml [update] boot_loops); grub.cfg counts with one test per step.
DEFAULT_BOOT_LOOPS = 10
MAX_BOOT_LOOPS = 20


def board_names() -> list[str]:
    return sorted(p.parent.name for p in BOARDS.glob("*/board.toml"))


def load_board(name: str) -> BoardInfo:
    d = BOARDS / name
    path = d / "board.toml"
    if name == "common" or not path.is_file():
        raise BuildError(f"unknown board {name!r}: expected one of {', '.join(board_names())}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BuildError(f"{path}: {e}") from e

    def need(table: str, key: str) -> object:
        try:
            return raw[table][key]
        except (KeyError, TypeError):
            raise BuildError(f"{path}: [{table}] {key} is required") from None

    arch = need("board", "arch")
    if arch not in EFI_LOADERS:
        raise BuildError(f"{path}: [board] arch must be one of {sorted(EFI_LOADERS)}, "
                         f"got {arch!r}")
    parts = []
    for i, p in enumerate(raw.get("partition", [])):
        if p.get("type") not in ("esp", "root", "data") or not isinstance(
                p.get("size_mib"), int) or p["size_mib"] < 1:
            raise BuildError(f"{path}: partition #{i + 1} needs type esp|root|data and "
                             f"size_mib >= 1, got {p!r}")
        parts.append(Partition(str(p.get("name", p["type"])), p["type"], p["size_mib"]))
    slot_parts = [slot.partition for slot in ROOT_SLOTS]
    if (sorted(p.type for p in parts) != ["data", "esp", "root", "root"]
            or [p.name for p in parts if p.type == "root"] != slot_parts
            or parts[-1].type != "data"):
        raise BuildError(f"{path}: needs one esp, the root partitions "
                         f"{' and '.join(slot_parts)} in that order, and data last (the "
                         "first boot grows it to the end of the disk)")
    tries = raw.get("update", {}).get("boot_tries", 3)
    if not isinstance(tries, int) or not 1 <= tries <= 9:
        raise BuildError(f"{path}: [update] boot_tries must be 1 to 9, got {tries!r}")
    loops = raw.get("update", {}).get("boot_loops", DEFAULT_BOOT_LOOPS)
    if not isinstance(loops, int) or not 2 <= loops <= MAX_BOOT_LOOPS:
        raise BuildError(f"{path}: [update] boot_loops must be 2 to {MAX_BOOT_LOOPS},"
                         f" got {loops!r}")
    common = tomllib.loads((COMMON / "modules.toml").read_text())
    mods = raw.get("modules", {})
    return BoardInfo(
        name=name, dir=d, arch=str(arch),
        console=str(need("serial", "console")["device"]),  # type: ignore[index]
        baud=int(raw["serial"]["console"].get("baud", 115200)),
        cmdline=str(need("boot", "cmdline")),
        partitions=parts,
        modules_boot=list(common["boot"]) + list(mods.get("boot", [])),
        modules_runtime=list(common["runtime"]) + list(mods.get("runtime", [])),
        modules_on_demand=list(common.get("on_demand", [])),
        qemu_provisioning=bool(raw["board"].get("qemu_provisioning", False)),
        boot_tries=tries,
        boot_loops=loops,
        raw=raw,
    )


def kernel_fragments(board: BoardInfo) -> list[Path]:
    """The kernel options the board needs: what every board needs, then its own."""
    own = board.dir / "kernel.fragment"
    return [COMMON / "kernel.fragment"] + ([own] if own.is_file() else [])


def check_kernel_config(config: Path, fragments: list[Path]) -> None:
    """A kernel configuration has every option the board's fragments ask for (a "=m" need
    is met by "=y" too): the Debian kernel mkimage ships, and the kernel Buildroot built
    with the fragments merged, where an option whose dependencies are missing is dropped
    without a word."""
    have = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            have[k] = v
    missing = []
    lines = [line for f in fragments for line in f.read_text().splitlines()]
    for line in lines:
        if not line.startswith("CONFIG_"):
            continue
        k, v = line.split("=", 1)
        got = have.get(k)
        if got is None or (v == "y" and got != "y") or (v == "m" and got not in ("m", "y")):
            missing.append(f"{k}={v} (kernel has {got or 'not set'})")
    if missing:
        raise BuildError(f"{config.name} lacks what "
                         f"{' and '.join(str(f.relative_to(ROOT)) for f in fragments)} need: "
                         + ", ".join(missing))



# ---------------------------------------------------------------- the disk


@dataclasses.dataclass
class Placed:
    name: str
    type: str
    type_uuid: str
    partuuid: str
    start: int  # sectors
    size: int  # sectors


@dataclasses.dataclass
class DiskLayout:
    disk_uuid: str
    partitions: list[Placed]
    total_bytes: int


def disk_layout(board: BoardInfo) -> DiskLayout:
    """The GPT of the board's disk image: 1 MiB for the primary table, the partitions in
    board.toml's order, each right after the one before, then 1 MiB for the backup table."""
    start = FIRST_LBA
    placed = []
    for p in board.partitions:
        size = p.size_mib * MiB // SECTOR
        ptype = GPT_TYPES["root-" + board.arch] if p.type == "root" else GPT_TYPES[p.type]
        placed.append(Placed(p.name, p.type, ptype, fixed_uuid(board.name, f"part-{p.name}"),
                             start, size))
        start += size
    return DiskLayout(fixed_uuid(board.name, "disk"), placed, (start + TAIL_SECTORS) * SECTOR)


def sfdisk_script(layout: DiskLayout) -> str:
    lines = ["label: gpt", f"label-id: {layout.disk_uuid}", "unit: sectors",
             f"first-lba: {FIRST_LBA}", ""]
    for p in layout.partitions:
        lines.append(f'start={p.start}, size={p.size}, type={p.type_uuid}, '
                     f'uuid={p.partuuid}, name="{p.name}"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- boot slots and GRUB


@dataclasses.dataclass
class Slot:
    bootname: str  # RAUC's name for it: rauc.slot=A on the kernel command line
    partition: str  # GPT name: root-a
    number: int  # GPT partition number: GRUB's gpt<N>, the same on every disk of the board


def boot_slots(board: BoardInfo) -> list[Slot]:
    numbers = {p.name: i for i, p in enumerate(board.partitions, 1)}
    return [Slot(s.bootname, s.partition, numbers[s.partition]) for s in root_slots(board)]


def grubenv(values: dict[str, str]) -> bytes:
    """A GRUB environment block: GRUB's save_env rewrites it in place, so it is always
    GRUBENV_SIZE bytes, padded with '#'."""
    body = "# GRUB Environment Block\n" + "".join(f"{k}={v}\n" for k, v in values.items())
    data = body.encode()
    if len(data) > GRUBENV_SIZE or any("\n" in v or "\\" in v for v in values.values()):
        raise BuildError(f"cannot make a {GRUBENV_SIZE}-byte grubenv of {values!r}")
    return data + b"#" * (GRUBENV_SIZE - len(data))


def initial_grubenv(board: BoardInfo) -> bytes:
    """What a new image boots with: slot A committed (the factory's image is not on trial:
    its boots are never counted as tries), slot B empty; the board's boot tries and boot
    loops, which grub.cfg has built in, for the box's reader (a bundle never changes the
    ESP, so the box asks grubenv, not its own slot); the end marker last. The same block is
    written as grubenv and as its copy grubenv2."""
    slots = boot_slots(board)
    values = {"ORDER": " ".join(s.bootname for s in slots)}
    for s in slots:
        first = "1" if s is slots[0] else "0"
        values.update({f"{s.bootname}_OK": first, f"{s.bootname}_TRY": "0",
                       f"{s.bootname}_COMMITTED": first, f"{s.bootname}_LOADFAIL": "0",
                       f"{s.bootname}_LOOPS": "0"})
    values["BOOT_TRIES"] = str(board.boot_tries)
    values["BOOT_LOOPS"] = str(board.boot_loops)
    values[GRUBENV_END] = "1"
    return grubenv(values)


# The last variable of every grubenv block: a block whose variables end before it was torn.
GRUBENV_END = "SDWAN_END"


def grub_cfg(board: BoardInfo) -> str:
    """GRUB's slot selection (docs/update.md, "Boot selection"): ORDER and each slot's OK,
    TRY and COMMITTED come from grubenv, or from its copy grubenv2 when grubenv is not a
    valid block; on the box sdwan.appliance.bootenv writes both (RAUC's custom bootloader
    backend) and learns the booted slot from rauc.slot= on the kernel command line.

    A copy is valid when GRUB reads its last variable, SDWAN_END=1, and can write it back:
    GRUB stops reading a damaged block quietly, keeping what came before the damage, and
    refuses to write a block whose padding is damaged, so a torn block is never used, nor
    counted into. Each boot writes SDWAN_END back in place, the same bytes.

    A committed slot boots without counting a try, but each of its boots is counted in
    X_LOOPS when the slot carries SLOT_SETTLES (its firmware clears the count once a boot
    stayed up: socketd's own parts healthy for a while, or up for the commit deadline;
    sdwan.appliance.bootenv settle): a committed slot whose last boot_loops boots all ended
    before that (a crash or hang the watchdog resets, a kernel that panics) is in a reboot
    loop, and GRUB passes it over while another slot can be booted. Any other attempt costs
    the slot one try, written to every valid copy before its kernel runs, and is on the
    kernel command line
    (sdwan.trial=N: the commit deadline's cue), so a new slot that keeps failing runs out of
    tries and the next one in ORDER boots. A slot whose kernel cannot be loaded, twice, is
    out of tries at once and marked LOADFAIL (its commit stays: one bad read must not
    downgrade a box; the updater on the slot that booted instead records why). With no slot
    left, the good ones get their tries back and the box reboots: it never stops at a GRUB
    prompt (the console has no shell behind it). With neither copy valid every slot is
    tried, A first, counting nothing (rcS then writes grubenv anew)."""
    slots = boot_slots(board)
    n = board.boot_tries
    env1, env2 = '"${prefix}/grubenv"', '"${prefix}/grubenv2"'
    loops = board.boot_loops
    names = " ".join(f"{s.bootname}_OK {s.bootname}_TRY {s.bootname}_COMMITTED {s.bootname}_LOOPS"
                     for s in slots)
    end = GRUBENV_END

    def defaults() -> list[str]:
        # a variable a valid block lacks is 0: such a slot is not booted
        out = ['set ORDER=""']
        for s in slots:
            out.append(f"set {s.bootname}_OK=0; set {s.bootname}_TRY=0;"
                       f" set {s.bootname}_COMMITTED=0; set {s.bootname}_LOOPS=0")
        return out

    def probe(env: str, var: str, what: str) -> list[str]:
        return [f"set {end}=0",
                f"if load_env -f {env} {what}{end}; then",
                f'\tif [ "${end}" = 1 ]; then',
                f"\t\tif save_env -f {env} {end}; then set {var}=1; fi",
                "\tfi",
                "fi"]

    out = [
        f"# Made by board/boardlib.py from board/{board.name}/board.toml: do not edit.",
        "# A/B boot slots (docs/update.md, \"Boot selection\").",
        "set timeout=0",
        "set timeout_style=hidden",
        # nobody may edit or get a command line, should normal mode ever offer one
        "set superusers=locked",
        "",
        "set env1=0",
        "set env2=0",
        *probe(env2, "env2", ""),
        *defaults(),
        *probe(env1, "env1", f"ORDER {names} "),
        "if [ $env1 = 0 ]; then",
        *["\t" + line for line in defaults()],
        "\tif [ $env2 = 1 ]; then",
        f"\t\tload_env -f {env2} ORDER {names}",
        '\t\techo "grub: grubenv is damaged: its copy grubenv2 is used"',
        "\telse",
        '\t\techo "grub: neither grubenv nor grubenv2 can be read: every slot is tried,'
        ' counting nothing"',
        '\t\tset ORDER="' + " ".join(s.bootname for s in slots) + '"',
        *[f"\t\tset {s.bootname}_OK=1; set {s.bootname}_COMMITTED=1" for s in slots],
        "\tfi",
        "fi",
        "function save {",
        f'\tif [ $env1 = 1 ]; then save_env -f {env1} "$@"; fi',
        f'\tif [ $env2 = 1 ]; then save_env -f {env2} "$@"; fi',
        "}",
        "# The disk GRUB was loaded from ($root is its ESP, e.g. hd0,gpt1) holds the slots.",
        "regexp -s 1:disk '^([^,]+),' \"$root\"",
        "",
    ]
    def count(var: str, limit: int, indent: str = "\t\t") -> list[str]:
        # GRUB's script has no arithmetic: one test per step, the last one the limit
        steps = [f'{"if" if i == 0 else "elif"} [ "${var}" = {i} ]; then set {var}={i + 1}'
                 for i in range(limit - 1)]
        if not steps:
            return [f"{indent}set {var}={limit}"]
        return [indent + line for line in steps] + [f"{indent}else set {var}={limit}; fi"]

    for s in slots:
        b, ok, tr = s.bootname, f"${s.bootname}_OK", f"${s.bootname}_TRY"
        cm, lp = f"${s.bootname}_COMMITTED", f"${s.bootname}_LOOPS"
        dev = f'"($disk,gpt{s.number})'

        # Bound now: ruff cannot tell that load runs within this iteration only.
        def load(trial: str, dev: str = dev, b: str = b, s: Slot = s) -> list[str]:
            linux = (f"linux {dev}/{SLOT_KERNEL}\" {board.cmdline} rauc.slot={b} "
                     f"sdwan.root={s.partition}{trial}")
            attempt = [f"\t\tif {linux}; then",
                       f"\t\t\tif initrd {dev}/{SLOT_INITRD}\"; then boot; fi",
                       "\t\tfi"]
            # twice: one failed read must not give up a slot
            return [*attempt, *attempt,
                    f'\t\techo "grub: slot {b} ({s.partition}) cannot be loaded: no more tries"',
                    f"\t\tset {b}_TRY={n}",
                    f"\t\tset {b}_LOADFAIL=1",
                    f"\t\tsave {b}_TRY {b}_LOADFAIL"]

        out += [f"function slot_{b} {{",
                f'\tif [ "{ok}" = 1 -a "{cm}" = 1 -a "{lp}" -lt {loops} ]; then',
                f"\t\tif [ -f {dev}/{SLOT_SETTLES}\" ]; then",
                *count(f"{b}_LOOPS", loops, "\t\t\t"),
                f"\t\t\tsave {b}_LOOPS",
                "\t\tfi",
                f'\t\tif [ "{lp}" -lt 2 ]; then',
                f'\t\t\techo "grub: slot {b} ({s.partition}), committed"',
                "\t\telse",
                f'\t\t\techo "grub: slot {b} ({s.partition}), committed: boot {lp} of'
                f' {loops} in a row that did not stay up"',
                "\t\tfi",
                *load(""),
                f'\telif [ "{ok}" = 1 -a "{cm}" = 1 ]; then',
                # (GRUB's console wraps at 80 columns: the tests read these lines)
                f'\t\techo "grub: slot {b} ({s.partition}) is in a reboot loop ({loops} boots'
                ' in a row): passed over"',
                f'\telif [ "{ok}" = 1 -a "{tr}" -lt {n} ]; then',
                *count(f"{b}_TRY", n)]
        out += [
            f"\t\tsave {b}_TRY",
            f'\t\techo "grub: slot {b} ({s.partition}), try {tr} of {n}"',
            *load(f" sdwan.trial={tr}"),
            f'\telif [ "{ok}" = 1 ]; then',
            f'\t\techo "grub: slot {b} ({s.partition}) has no tries left"',
            "\tfi",
            "}",
        ]
    out += ["", "for SLOT in $ORDER; do"]
    out += [f'\tif [ "$SLOT" = {s.bootname} ]; then slot_{s.bootname}; fi' for s in slots]
    out += ["done", "",
            'echo "grub: no slot can be booted: the good ones get their tries back; rebooting"']
    out += [f'if [ "${s.bootname}_OK" = 1 ]; then set {s.bootname}_TRY=0; fi' for s in slots]
    out += [f"set {s.bootname}_LOOPS=0" for s in slots]
    out += ["save " + " ".join(f"{s.bootname}_TRY {s.bootname}_LOOPS" for s in slots),
            "sleep 5", "reboot", ""]
    return "\n".join(out)


def genimage_config(board: BoardInfo, image: str, contents: dict[str, str],
                    esp_dir: str) -> str:
    """genimage's description of the same disk: the ESP made from esp_dir (a folder of the
    images folder), the partitions filled from contents (partition name -> image file);
    a partition without contents (data) is left empty, as in mkimage's image."""
    layout = disk_layout(board)
    esp = next(p for p in layout.partitions if p.type == "esp")
    volid = fixed_uuid(board.name, "esp")[:8]
    out = [
        "# Made by board/boardlib.py from board/" + board.name + "/board.toml: do not edit.",
        f"image {board.name}-esp.vfat {{",
        "\tvfat {",
        f'\t\textraargs = "-i {volid} -n ESP"',
        "\t\tfile EFI {",
        f'\t\t\timage = "{esp_dir}/EFI"',
        "\t\t}",
        "\t}",
        f"\tsize = {esp.size * SECTOR}",
        "}",
        "",
        f"image {image} {{",
        "\thdimage {",
        '\t\tpartition-table-type = "gpt"',
        f'\t\tdisk-uuid = "{layout.disk_uuid}"',
        "\t}",
        f"\tsize = {layout.total_bytes}",
    ]
    for p in layout.partitions:
        src = f"{board.name}-esp.vfat" if p.type == "esp" else contents.get(p.name)
        out += [
            "",
            f"\tpartition {p.name} {{",
            f'\t\tpartition-type-uuid = "{p.type_uuid}"',
            f'\t\tpartition-uuid = "{p.partuuid}"',
            f"\t\toffset = {p.start * SECTOR}",
            f"\t\tsize = {p.size * SECTOR}",
        ]
        if src:
            out.append(f'\t\timage = "{src}"')
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the root filesystem


def install_overlay(root: Path, console: str, baud: int) -> None:
    """board/common/rootfs into root: init scripts, users, the console's login; inittab gets
    the board's console port and speed (an overlay copied as it is, as Buildroot does, is
    completed the same way: inittab.in becomes inittab)."""
    overlay = COMMON / "rootfs"
    for src in walk(overlay):
        rel = src.relative_to(overlay)
        dest = root / rel
        if src.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif rel.name == "inittab.in":
            dest.with_name("inittab").write_text(
                src.read_text().replace("@CONSOLE@", console).replace("@BAUD@", str(baud)))
            if dest.exists():
                dest.unlink()
        else:
            if dest.is_symlink():
                dest.unlink()
            shutil.copyfile(src, dest)
            dest.chmod(0o755 if os.access(src, os.X_OK) else 0o644)
    (root / "etc/shadow").chmod(0o600)


def check_led_map(path: Path) -> None:
    """The board's LED map, read the way socketd will (sdwan.appliance.ledmap owns the format)."""
    sys.path.insert(0, str(ROOT / "firmware"))
    try:
        from sdwan.appliance.ledmap import load_led_map
    except ImportError:
        return
    finally:
        sys.path.pop(0)
    try:
        load_led_map(path)
    except Exception as e:  # noqa: BLE001 - any complaint of the reader stops the build
        raise BuildError(f"LED map: {e}") from e


def os_release(board: str, version: str, commit: str) -> str:
    return ('NAME="Socket SD-WAN appliance"\nID=socket\n'
            f'VERSION_ID={version}\nBUILD_ID={commit}\nVARIANT_ID={board}\n')


def install_board_files(root: Path, board: BoardInfo, epoch: int,
                        firmware_keys: str | os.PathLike[str] | None = None) -> None:
    """What the root gets from the board folder (/etc/sdwan), RAUC's configuration and
    keyring (install_rauc_files, FIRMWARE_KEYS unless firmware_keys is given) and the fixed
    layout of the read-only root: /data, the links into /run and /data, empty mount points."""
    etc_sdwan = root / "etc/sdwan"
    etc_sdwan.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(board.dir / "board.toml", etc_sdwan / "board.toml")
    check_led_map(board.dir / "leds.toml")
    shutil.copyfile(board.dir / "leds.toml", etc_sdwan / "leds.toml")
    # The clock's floor on a board without a working RTC (rcS, docs/time.md).
    (etc_sdwan / "build-time").write_text(f"{epoch}\n")
    if board.qemu_provisioning:
        (etc_sdwan / "qemu-provisioning").write_text("fw_cfg opt/sdwan/data/* seeds /data\n")
    install_rauc_files(root, board, firmware_keys)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    for link, target in (("etc/resolv.conf", "/run/resolv.conf"),
                         ("etc/mtab", "/proc/self/mounts"),
                         # socketd's tools look for /etc/socketd.toml; it lives in /data.
                         ("etc/socketd.toml", "/data/socketd.toml")):
        replace_with_link(root / link, target)
    for d in ("dev", "proc", "sys", "run", "tmp", "data", "root", "var/lib"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("var/lib/socketd", "/data/socketd"), ("var/log", "/run/log"),
                         ("var/run", "/run"), ("var/tmp", "/tmp")):
        replace_with_link(root / link, target)


def replace_with_link(path: Path, target: str) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target)


def site_dirs(root: Path) -> list[Path]:
    """The folders python imports packages from in root (Debian's dist-packages, Buildroot's
    site-packages)."""
    return sorted(p for p in (*root.glob("usr/lib/python3*/site-packages"),
                              *root.glob("usr/lib/python3/dist-packages")) if p.is_dir())


def _runs_a_shell(command: str) -> str | None:
    """The shell or login program a command line starts, if any (`-/bin/sh`, `exec sh -l`)."""
    for word in re.split(r"[\s;&|()]+", command):
        name = Path(word.lstrip("-")).name
        if name in SHELLS:
            return word
    return None


def check_console(root: Path, console: str) -> None:
    """The console port runs socket-console and nothing else: its entry point and module are
    in the image, getty on the board's port runs CONSOLE_LOGIN, which runs the entry point
    only, and no inittab entry starts a shell or another login. A missing console must fail
    the build: the box would otherwise boot with no way in on site, or with a way around the
    console's login."""
    entry = root / "usr/bin" / CONSOLE_ENTRY
    if not entry.is_file() or not os.access(entry, os.X_OK):
        raise BuildError(
            f"the console entry point /usr/bin/{CONSOLE_ENTRY} is missing from the image: "
            f"pyproject.toml [project.scripts] must define {CONSOLE_ENTRY} and "
            "NOT_ON_APPLIANCE (board/boardlib.py) must not list it (the serial console "
            "would have no login)")
    text = entry.read_text(errors="replace")
    if f"from {CONSOLE_MODULE} import" not in text and f"{CONSOLE_MODULE}:" not in text:
        raise BuildError(f"/usr/bin/{CONSOLE_ENTRY} does not run {CONSOLE_MODULE}")
    rel = CONSOLE_MODULE.replace(".", "/") + ".py"
    sites = site_dirs(root)
    if not any((s / rel).is_file() or (s / (rel + "c")).is_file() for s in sites):
        expected = (sites[0] if sites else root / "usr/lib/python3/dist-packages") / rel
        raise BuildError(f"the console module {CONSOLE_MODULE} is missing from the image "
                         f"(expected {expected.relative_to(root)})")

    login = root / CONSOLE_LOGIN.lstrip("/")
    if not login.is_file() or not os.access(login, os.X_OK):
        raise BuildError(f"{CONSOLE_LOGIN} is missing from the image (board/common/rootfs)")
    body = [line.split("#", 1)[0].strip() for line in login.read_text().splitlines()[1:]]
    body = [line for line in body if line]
    execs = [m.group(0) for line in body for m in re.finditer(r"\bexec\s+\S+", line)]
    if execs != [f"exec /usr/bin/{CONSOLE_ENTRY}"]:
        raise BuildError(f"{CONSOLE_LOGIN} must run `exec /usr/bin/{CONSOLE_ENTRY}` and nothing "
                         f"else, found: {execs or 'no exec'}")
    for line in body:
        if shell := _runs_a_shell(line):
            raise BuildError(f"{CONSOLE_LOGIN} starts {shell!r} ({line!r}): no shell may stand "
                             "in for the console's login")

    inittab = root / "etc/inittab"
    gettys = []
    for n, line in enumerate(inittab.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":", 3)
        if len(fields) != 4:
            raise BuildError(f"/etc/inittab line {n} is not id:runlevels:action:process: {line}")
        tty, _, action, command = fields
        if action == "askfirst" or (shell := _runs_a_shell(command)):
            raise BuildError(f"/etc/inittab line {n} starts a shell on a terminal ({line!r}): "
                             "the console's login is the only way in")
        if Path(command.split()[0]).name == "getty":
            if f"-l {CONSOLE_LOGIN}" not in command:
                raise BuildError(f"/etc/inittab line {n}: getty without -l {CONSOLE_LOGIN} "
                                 f"would run another login ({line!r})")
            gettys.append(tty)
    if console not in gettys:
        raise BuildError(f"/etc/inittab runs no getty with the console's login on the board's "
                         f"console port {console}")


# ---------------------------------------------------------------- kernel modules


def mod_name(path: str) -> str:
    base = Path(path).name
    base = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base)
    return base.replace("-", "_")


def module_closure(kroot: Path, kver: str, wanted: Iterable[str]) -> list[str]:
    """Module paths (relative to lib/modules/<kver>) in load order, dependencies first.
    A wanted module built into the kernel needs nothing."""
    moddir = kroot / "lib/modules" / kver
    deps: dict[str, list[str]] = {}
    byname: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        byname[mod_name(mod)] = mod
    builtin_file = moddir / "modules.builtin"
    builtin = ({mod_name(x) for x in builtin_file.read_text().split()}
               if builtin_file.is_file() else set())
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps[mod]):  # modules.dep lists the last to load first
            visit(dep)
        order.append(mod)

    for want in wanted:
        n = want.replace("-", "_")
        if n in builtin:
            continue
        if n not in byname:
            raise BuildError(f"kernel {kver} has no module {want!r} (board/*/modules lists; "
                             "the kernel options are in the boards' kernel.fragment files)")
        visit(byname[n])
    return order


def install_module(src: Path, dest: Path) -> str:
    """Copies a module, uncompressed (insmod in busybox reads plain .ko); its file name."""
    data = src.read_bytes()
    name = src.name
    if name.endswith(".xz"):
        import lzma
        data, name = lzma.decompress(data), name[:-3]
    elif name.endswith(".gz"):
        data, name = gzip.decompress(data), name[:-3]
    elif name.endswith(".zst"):
        data = subprocess.run(["zstd", "-dcq", str(src)], capture_output=True,
                              check=True).stdout
        name = name[:-4]
    dest = dest.with_name(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return name


def kernel_version(root: Path) -> str:
    """The one kernel whose modules are in root (Buildroot installs exactly one)."""
    kvers = sorted(p.name for p in (root / "lib/modules").glob("*")
                   if (p / "modules.dep").is_file())
    if len(kvers) != 1:
        raise BuildError(f"expected the modules of one kernel in {root}/lib/modules, found "
                         f"{kvers or 'none'} (BR2_LINUX_KERNEL and CONFIG_MODULES)")
    return kvers[0]


# ---------------------------------------------------------------- archives


def write_cpio(root: Path, out: Path, epoch: int) -> None:
    """newc cpio of root: sorted, owner root, fixed times and inode numbers; /dev/console
    is added as a device node (the kernel opens it before /init runs)."""
    buf = io.BytesIO()
    ino = 1

    def entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        namez = name.encode() + b"\0"
        hdr = b"070701" + b"".join(f"{v:08X}".encode() for v in (
            ino, mode, 0, 0, 1, epoch, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0))
        buf.write(hdr + namez)
        buf.write(b"\0" * (-(110 + len(namez)) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))
        ino += 1

    names = {str(p.relative_to(root)): p for p in walk(root)}
    names.setdefault("dev", root / "dev")
    for name in sorted(names):
        p = names[name]
        st = p.lstat() if p.exists() or p.is_symlink() else None
        if st is None or stat.S_ISDIR(st.st_mode):
            entry(name, stat.S_IFDIR | 0o755)
        elif stat.S_ISLNK(st.st_mode):
            entry(name, stat.S_IFLNK | 0o777, os.readlink(p).encode())
        else:
            entry(name, stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644), p.read_bytes())
    entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    entry("TRAILER!!!", 0)
    with out.open("wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, compresslevel=9,
                                            filename="") as gz:
        gz.write(buf.getvalue())


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF file (both boards' format)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    needed = []
    for _name, stype, _fl, _addr, off, size, link, _info, _al, entsize in sections:
        if stype != 6:  # SHT_DYNAMIC
            continue
        strtab_off = sections[link][4]
        for i in range(size // (entsize or 16)):
            tag, val = struct.unpack_from("<qQ", data, off + i * 16)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab_off + val)
                needed.append(data[strtab_off + val:end].decode())
    return needed


def find_library(root: Path, name: str) -> Path:
    for d in ("usr/lib", "lib", "usr/lib64", "lib64"):
        p = root / d / name
        if p.exists():
            return p
    raise BuildError(f"{name} is not in {root}/usr/lib")


def make_initramfs(board: BoardInfo, root: Path, out: Path, epoch: int) -> None:
    """The initramfs of the board from a built root filesystem: board/common/initramfs/init,
    the root's busybox with the libraries it needs, and the board's boot modules (with their
    dependencies) of the root's kernel; /init reads their order from /etc/modules.boot."""
    work = out.with_suffix(".d")
    if work.exists():
        shutil.rmtree(work)
    for d in ("bin", "dev", "proc", "sys", "newroot", "etc"):
        (work / d).mkdir(parents=True)
    busybox = next((p for p in (root / "usr/bin/busybox", root / "bin/busybox") if p.exists()),
                   None)
    if busybox is None:
        raise BuildError(f"{root} has no busybox")
    shutil.copyfile(busybox.resolve(), work / "bin/busybox")
    (work / "bin/busybox").chmod(0o755)
    (work / "bin/sh").symlink_to("busybox")
    # a dynamically linked busybox takes its libraries and loader along
    todo, seen = list(elf_needed(busybox.resolve())), set()
    if todo:  # and the dynamic loader
        todo += [p.name for p in (*root.glob("usr/lib/ld-linux*"), *root.glob("lib/ld-linux*"))]
    while todo:
        lib = todo.pop()
        if lib in seen:
            continue
        seen.add(lib)
        src = find_library(root, lib).resolve()
        (work / "lib").mkdir(exist_ok=True)
        shutil.copyfile(src, work / "lib" / lib)
        (work / "lib" / lib).chmod(0o755)
        todo.extend(elf_needed(src))
    if seen:
        (work / "lib64").symlink_to("lib")
    shutil.copyfile(COMMON / "initramfs/init", work / "init")
    (work / "init").chmod(0o755)
    kver = kernel_version(root)
    kroot = root if (root / "lib/modules").is_dir() else root / "usr"
    boot_mods = []
    for rel in module_closure(kroot, kver, board.modules_boot):
        name = install_module(kroot / "lib/modules" / kver / rel, work / "lib/modules" / rel)
        boot_mods.append(str(Path(rel).parent / name))
    (work / "etc/modules.boot").write_text("\n".join(boot_mods) + "\n")
    write_cpio(work, out, epoch)
    shutil.rmtree(work)


# ---------------------------------------------------------------- updates (RAUC)


@dataclasses.dataclass(frozen=True)
class RootSlot:
    partition: str  # GPT name: the box finds it as /dev/disk/by-partlabel/<partition>
    bootname: str  # RAUC's bootname, the entry of GRUB's ORDER in grubenv


# The A/B root slots, in one place for the disk layout, RAUC's slots and GRUB's boot order
# (root_slots refuses a board.toml whose root partitions are named otherwise).
ROOT_SLOTS = (RootSlot("root-a", "A"), RootSlot("root-b", "B"))
# The slot class: [slot.rootfs.N] in system.conf, [image.rootfs] in a bundle's manifest.
SLOT_CLASS = "rootfs"
# RAUC 1.8 takes an image's type from its file name: ".img" is written raw to the slot.
BUNDLE_IMAGE = "rootfs.img"
RAUC_DIR = "etc/rauc"
RAUC_KEYRING = "/etc/rauc/keyring.pem"
# grubenv and its copy grubenv2 (GRUB's prefix on the ESP), written on the box only by
# the custom bootloader backend (sdwan.appliance.bootenv, which has the same path).
RAUC_GRUBENV = "/boot/efi/EFI/BOOT/grubenv"
RAUC_BOOT_BACKEND = "/usr/libexec/sdwan/bootenv"
RAUC_STATUSFILE = "/data/rauc.status"
# The root is read-only; RAUC makes its mount points under this prefix.
RAUC_MOUNT_PREFIX = "/run/rauc"
DEFAULT_FIRMWARE_KEYS = ROOT / "build" / "firmware-keys"
FIRMWARE_CA_CERT = "firmware-ca.pem"
SIGNER_CERT = "signer.pem"
SIGNER_KEY = "signer.key"


def rauc_compatible(board: BoardInfo | str) -> str:
    """The board's RAUC compatible: the image's system.conf and every bundle for the board
    carry it, and a box refuses a bundle whose compatible is not its own."""
    name = board if isinstance(board, str) else board.name
    return f"sdwan-{name}"


def root_slots(board: BoardInfo) -> tuple[RootSlot, ...]:
    """The board's A/B root slots (every board has the same two). A board.toml that already
    lists several root partitions must list exactly these, in this order."""
    roots = [p.name for p in board.partitions if p.type == "root"]
    wanted = [s.partition for s in ROOT_SLOTS]
    if len(roots) > 1 and roots != wanted:
        raise BuildError(f"{board.dir}/board.toml: the root partitions are {roots}, but the "
                         f"update slots are {wanted} (boardlib.ROOT_SLOTS)")
    return ROOT_SLOTS


def rauc_system_conf(board: BoardInfo, keyring: str = RAUC_KEYRING) -> str:
    """/etc/rauc/system.conf of the board. Only verity bundles: their payload is checked
    block by block as it is read, so a damaged download cannot be half written unnoticed.
    check-purpose=codesign: only a certificate made to sign code (socket-pki
    firmware-signer) may sign a bundle, never a site's or PoP's TLS certificate."""
    lines = [
        f"# Made by board/boardlib.py for board {board.name}: do not edit.",
        "[system]",
        f"compatible={rauc_compatible(board)}",
        "bootloader=custom",
        f"statusfile={RAUC_STATUSFILE}",
        f"mountprefix={RAUC_MOUNT_PREFIX}",
        "bundle-formats=verity",
        "",
        "[keyring]",
        f"path={keyring}",
        "check-purpose=codesign",
        "",
        "[handlers]",
        f"bootloader-custom-backend={RAUC_BOOT_BACKEND}",
    ]
    for i, slot in enumerate(root_slots(board)):
        lines += [
            "",
            f"[slot.{SLOT_CLASS}.{i}]",
            f"device=/dev/disk/by-partlabel/{slot.partition}",
            "type=raw",
            f"bootname={slot.bootname}",
        ]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class FirmwareKeys:
    dir: Path
    ca_cert: Path  # the boxes' keyring
    signer_cert: Path
    signer_key: Path
    development: bool


def firmware_keys_dir(keys: str | os.PathLike[str] | None = None) -> Path:
    """FIRMWARE_KEYS: the given folder, else the environment's, else build/firmware-keys.
    A relative FIRMWARE_KEYS is taken from the repository, as make gives it, also to
    Buildroot's scripts, which run elsewhere."""
    if keys is not None:
        return Path(keys)
    env = os.environ.get("FIRMWARE_KEYS")
    return ROOT / env if env else DEFAULT_FIRMWARE_KEYS


_DEV_BANNER = """\
########################################################################################
# {keys} did not exist: made a DEVELOPMENT firmware signing CA and signer there.
# Images built with it trust only bundles signed with it, and every bundle signed with it
# is a development bundle. Production images and bundles must use the real firmware key:
# FIRMWARE_KEYS=DIR, a folder with firmware-ca.pem (and signer.pem, signer.key to sign),
# made with socket-pki firmware-ca / firmware-signer (docs/update.md).
########################################################################################"""


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
_FIRMWARE_CA_SUFFIX = "firmware signing CA"  # socket-pki's subject of a firmware CA


def _check_firmware_ca(ca: Path) -> None:
    """firmware-ca.pem becomes the keyring of every image, and RAUC trusts every certificate
    in it to sign firmware: it must be one certificate, a firmware signing CA (socket-pki
    firmware-ca), never the account CA (renamed or appended) nor a leaf."""
    data = ca.read_bytes()
    blocks = _PEM_CERT.findall(data)
    if len(blocks) != 1:
        raise BuildError(f"{ca} holds {len(blocks)} PEM certificates, not one: the image's "
                         "keyring must be the firmware signing CA alone (RAUC trusts every "
                         "certificate in it to sign firmware)")
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:
        # No crypto library (Buildroot's host python): a self-signed firmware CA names itself
        # twice in its DER, as issuer and as subject; its signer or a site names it once or not.
        ok = base64.b64decode(blocks[0]).count(_FIRMWARE_CA_SUFFIX.encode()) >= 2
        subject = "?"
    else:
        try:
            cert = x509.load_pem_x509_certificate(data)
            ca_ext = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (ValueError, x509.ExtensionNotFound):
            ca_ext = False
            cert = None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert else []
        ok = bool(ca_ext and names and str(names[0].value).endswith(_FIRMWARE_CA_SUFFIX))
        subject = cert.subject.rfc4514_string() if cert else "unreadable"
    if not ok:
        raise BuildError(f"{ca} is not a firmware signing CA (subject {subject!r}): the image's "
                         "keyring must be the certificate socket-pki firmware-ca made, never the "
                         "account CA nor a signer or site certificate (docs/update.md)")


def _is_default_keys(directory: Path) -> bool:
    return directory.resolve() == DEFAULT_FIRMWARE_KEYS.resolve()


def _make_development_keys(keys: Path) -> bool:
    """A development CA and signer in keys, made in a folder beside it and renamed into place:
    an interrupted build leaves no half-made keys. False if another build made them first."""
    keys.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{keys.name}.", dir=keys.parent))
    try:
        _make_development_keys_in(tmp)
        try:
            os.rename(tmp, keys)
        except OSError:
            if not (keys / FIRMWARE_CA_CERT).is_file():
                raise
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_development_keys_in(keys: Path) -> None:
    sys.path.insert(0, str(ROOT / "firmware"))
    try:
        from sdwan.pop import pki
    except ImportError:
        pki = None  # type: ignore[assignment]
    finally:
        sys.path.pop(0)
    if pki is not None:
        try:
            pki.create_firmware_ca(keys, development=True)
            pki.issue_firmware_signer(keys)
        except pki.PkiError as e:
            raise BuildError(f"cannot make the development firmware key: {e}") from e
        return
    # A python without the firmware's dependencies (Buildroot's host python): the venv's.
    tool = ROOT / ".venv/bin/socket-pki"
    if not tool.exists():
        raise BuildError(f"{keys} does not exist and this python cannot make a development "
                         "firmware key: run `make bundle` (or socket-pki firmware-ca and "
                         "firmware-signer) first, or set FIRMWARE_KEYS")
    for cmd in (["firmware-ca", str(keys), "--development"], ["firmware-signer", str(keys)]):
        done = subprocess.run([str(tool), *cmd], capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"cannot make the development firmware key: {done.stderr.strip()}")


def _is_development(ca_cert: Path) -> bool:
    # socket-pki marks a development CA in its subject. Without a crypto library (Buildroot's
    # host python) the mark is read from the certificate's DER, where the subject is as is.
    data = ca_cert.read_bytes()
    try:
        from cryptography import x509
    except ImportError:
        pem = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data,
                        re.S)
        return bool(pem) and b" DEVELOPMENT " in base64.b64decode(pem.group(1))  # type: ignore[union-attr]
    cert = x509.load_pem_x509_certificate(data)
    return "DEVELOPMENT" in cert.subject.rfc4514_string().split()


def ensure_firmware_keys(keys: str | os.PathLike[str] | None = None, *,
                         signer: bool) -> FirmwareKeys:
    """The firmware keys of a build (FIRMWARE_KEYS, firmware_keys_dir): a missing folder gets
    a development CA and signer, said loudly. An image needs firmware-ca.pem only (the CA's
    key stays offline); a bundle (signer=True) needs signer.pem and signer.key too."""
    directory = firmware_keys_dir(keys)
    if not directory.exists():
        if not _is_default_keys(directory):
            raise BuildError(
                f"FIRMWARE_KEYS {directory} does not exist: name the folder of the firmware "
                "keys (firmware-ca.pem; signer.pem, signer.key to sign), or leave FIRMWARE_KEYS "
                f"unset for the development keys of {DEFAULT_FIRMWARE_KEYS}. development keys "
                "are made only there, never in place of a missing folder (an unmounted key "
                "medium, a typo)")
        if _make_development_keys(directory):
            print(_DEV_BANNER.format(keys=directory), file=sys.stderr, flush=True)
    if not directory.is_dir():
        raise BuildError(f"FIRMWARE_KEYS {directory} is not a directory")
    if (directory / "ca.key").exists() or (directory / "ca.pem").exists():
        raise BuildError(f"FIRMWARE_KEYS {directory} is an account CA directory (ca.pem): "
                         "firmware is signed under the firmware CA, kept apart "
                         "(socket-pki firmware-ca, docs/update.md)")
    need = [FIRMWARE_CA_CERT] + ([SIGNER_CERT, SIGNER_KEY] if signer else [])
    missing = [n for n in need if not (directory / n).is_file()]
    if missing:
        how = ("socket-pki firmware-signer CA_DIR --out " + str(directory)
               if FIRMWARE_CA_CERT not in missing else "socket-pki firmware-ca")
        if _is_default_keys(directory):
            how += (f"; if it is a half-made development key folder of an interrupted build, "
                    f"remove {directory} and build again")
        raise BuildError(f"FIRMWARE_KEYS {directory} lacks {', '.join(missing)} ({how})")
    ca = directory / FIRMWARE_CA_CERT
    _check_firmware_ca(ca)
    return FirmwareKeys(directory, ca, directory / SIGNER_CERT, directory / SIGNER_KEY,
                        _is_development(ca))


def install_rauc_files(root: Path, board: BoardInfo,
                       keys: str | os.PathLike[str] | None = None) -> FirmwareKeys:
    """/etc/rauc/system.conf of the board and /etc/rauc/keyring.pem, the firmware CA of
    FIRMWARE_KEYS: the bundles this image will accept."""
    fw = ensure_firmware_keys(keys, signer=False)
    etc = root / RAUC_DIR
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "system.conf").write_text(rauc_system_conf(board))
    shutil.copyfile(fw.ca_cert, root / RAUC_KEYRING.lstrip("/"))
    for f in ("system.conf", Path(RAUC_KEYRING).name):
        (etc / f).chmod(0o644)
    if fw.development:
        print(f"boardlib: {board.name}: the image trusts the DEVELOPMENT firmware CA of "
              f"{fw.dir}: it accepts development bundles only", file=sys.stderr, flush=True)
    return fw


# ---------------------------------------------------------------- the Buildroot build


def source_epoch() -> int:
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return 0


def source_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def firmware_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


# What Buildroot's packages install besides the programs the appliance runs, as
# board/common/packages.toml drops it from Debian's: the system bus's init script and files
# (socketd runs a bus of its own for RAUC; rcS starts no init.d scripts anyway).
BUILDROOT_DROP = (
    "etc/init.d/S30dbus-daemon", "usr/share/dbus-1", "etc/dbus-1",
    "usr/libexec/dbus-daemon-launch-helper", "usr/bin/dbus-run-session", "usr/bin/dbus-launch",
)


def buildroot_rootfs(board: BoardInfo, target: Path) -> None:
    """Buildroot's post-build: the target folder becomes the appliance's root, as mkimage
    makes it from Debian packages (the same overlay, board files, module list and checks)."""
    for name in NOT_ON_APPLIANCE:
        p = target / "usr/bin" / name
        if p.exists() or p.is_symlink():
            p.unlink()
    for pattern in BUILDROOT_DROP:
        for p in sorted(target.glob(pattern), reverse=True):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    for site in site_dirs(target):
        for mod in NOT_ON_APPLIANCE_MODULES:
            if (site / "sdwan" / mod).is_dir():
                shutil.rmtree(site / "sdwan" / mod)
    build_dir = os.environ.get("BUILD_DIR")  # Buildroot's, exported to its scripts
    if build_dir:
        configs = [p for p in Path(build_dir).glob("linux-*/.config")
                   if not p.parent.name.startswith("linux-headers")]
        if len(configs) != 1:
            raise BuildError(f"expected one kernel build in {build_dir}, found "
                             f"{[str(p.parent) for p in configs] or 'none'}")
        check_kernel_config(configs[0], kernel_fragments(board))
    install_overlay(target, board.console, board.baud)
    install_board_files(target, board, source_epoch())
    replace_file(target / "etc/os-release",
                 os_release(board.name, firmware_version(), source_commit()))
    kver = kernel_version(target)
    kroot = target if (target / "lib/modules").is_dir() else target / "usr"
    runtime = module_closure(kroot, kver, board.modules_runtime)
    (kroot / "lib/modules" / kver / "modules.runtime").write_text("\n".join(runtime) + "\n")
    check_console(target, board.console)
    # Buildroot makes rootfs.squashfs after this script: the kernel it installed in its
    # images folder goes into the slot now.
    binaries = Path(os.environ.get("BINARIES_DIR", ""))
    kernel = binaries / KERNEL_IMAGES[board.arch]
    if not os.environ.get("BINARIES_DIR") or not kernel.is_file():
        raise BuildError(f"the kernel {kernel.name} is not in BINARIES_DIR "
                         f"({binaries or 'unset'}): BR2_LINUX_KERNEL must build it")
    install_slot_boot(board, target, kernel, source_epoch())


def replace_file(path: Path, text: str) -> None:
    if path.is_symlink():  # Buildroot's /etc/os-release links to /usr/lib/os-release
        path.unlink()
    path.write_text(text)


def install_slot_boot(board: BoardInfo, root: Path, kernel: Path, epoch: int) -> None:
    """The slot's own kernel and initramfs, in its root filesystem where GRUB loads them
    from: an update that replaces the slot replaces them with its modules. arm64's gzipped
    kernel is stored as the plain Image GRUB 2.06 loads on EFI."""
    boot = root / "boot"
    boot.mkdir(exist_ok=True)
    data = kernel.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    (root / SLOT_KERNEL).write_bytes(data)
    (root / SLOT_KERNEL).chmod(0o644)
    make_initramfs(board, root, root / SLOT_INITRD, epoch)
    (root / SLOT_INITRD).chmod(0o644)
    (boot / "efi").mkdir(exist_ok=True)  # the ESP, for bootenv (rcS mounts it)


def esp_files(board: BoardInfo, loader: Path, into: Path) -> dict[str, Path]:
    """The ESP's files, written into the folder into: GRUB at the removable-media path,
    grub.cfg and grubenv beside it (GRUB's prefix). ESP path -> file."""
    d = into / GRUB_PREFIX.strip("/")
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(loader, d / EFI_LOADERS[board.arch])
    (d / "grub.cfg").write_text(grub_cfg(board))
    (d / "grubenv").write_bytes(initial_grubenv(board))
    (d / "grubenv2").write_bytes(initial_grubenv(board))
    return {f"{GRUB_PREFIX.strip('/')}/{p.name}": p for p in sorted(d.iterdir())}


def buildroot_image(board: BoardInfo, target: Path, binaries: Path) -> Path:
    """Buildroot's post-image, up to genimage: the ESP's files (Buildroot's GRUB, built with
    GRUB_MODULES and board/common/grub-early.cfg, as the removable-media loader, grub.cfg
    and grubenv), the slot image <board>.rootfs.img (the squashfs post-build filled, kernel
    and initramfs in its /boot) and genimage-<board>.cfg; returns that config."""
    esp = binaries / f"{board.name}-esp"
    if esp.exists():
        shutil.rmtree(esp)
    grub = binaries / "efi-part/EFI/BOOT" / EFI_LOADERS[board.arch].lower()
    if not grub.is_file():
        raise BuildError(f"{grub} is missing: the defconfig must build GRUB for EFI "
                         "(BR2_TARGET_GRUB2 and its x86_64-efi or arm64-efi platform)")
    esp_files(board, grub, esp)
    sqfs = binaries / "rootfs.squashfs"
    if sqfs.is_file():
        shutil.copyfile(sqfs, binaries / f"{board.name}.rootfs.img")
    first = boot_slots(board)[0]
    cfg = binaries / f"genimage-{board.name}.cfg"
    cfg.write_text(genimage_config(board, f"{board.name}.img",
                                   {first.partition: "rootfs.squashfs"}, esp.name))
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the boards, for the Buildroot tree's scripts")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("boards", help="print the board names")
    p = sub.add_parser("rootfs", help="post-build: make TARGET_DIR the appliance's root")
    p.add_argument("board")
    p.add_argument("target", type=Path)
    p = sub.add_parser("image", help="post-image: ESP files, slot image, genimage config")
    p.add_argument("board")
    p.add_argument("target", type=Path)
    p.add_argument("binaries", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "boards":
            print("\n".join(board_names()))
        elif args.cmd == "rootfs":
            buildroot_rootfs(load_board(args.board), args.target)
        else:
            print(buildroot_image(load_board(args.board), args.target, args.binaries))
    except BuildError as e:
        print(f"boardlib: {getattr(args, 'board', '')}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
