"""What RAUC says, read defensively (docs/update.md): `rauc status --detailed
--output-format=json` as typed slots, the progress lines of `rauc install`, the GRUB
environment block RAUC's grub backend keeps its boot selection in, and the few fields of
/etc/rauc/system.conf the updater needs.

GRUB's environment block itself is read by sdwan.appliance.bootenv.

Every string taken from RAUC passes through `visible()`: a bundle's version and RAUC's error
messages reach events, `socketctl` and the console, and a bundle is not trusted for what it
says before it is installed. A field of the wrong type is dropped (None), never fatal; only
output that is not RAUC's status at all raises ValueError."""

from __future__ import annotations

import configparser
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdwan.common.visible import visible

__all__ = [
    "GRUB_MAX_LOOPS",
    "GRUB_MAX_TRIES",
    "BootSelection",
    "Progress",
    "Slot",
    "SystemConf",
    "SystemStatus",
    "install_error",
    "parse_progress",
    "parse_status",
    "read_system_conf",
]

# The boot scripts skip a slot once its TRY reaches this (docs/update.md).
GRUB_MAX_TRIES = 3
# ... and a committed slot once this many boots in a row ended before it stayed up.
GRUB_MAX_LOOPS = 10
ROOTFS_CLASS = "rootfs"
_PROGRESS_RE = re.compile(r"^\s*(\d{1,3})%\s+(.*)$")
_LAST_ERROR = "LastError:"


def _text(value: Any, limit: int = 300) -> str | None:
    """A string of RAUC's as it may be shown: stripped, control characters escaped."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return visible(value[:limit]) if value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Slot:
    name: str  # RAUC's slot name, rootfs.0
    slot_class: str | None  # rootfs
    bootname: str | None  # A, B: what GRUB and the kernel command line call it
    device: str | None
    state: str | None  # booted, active, inactive
    boot_status: str | None  # good, bad (the bootloader's view); None: unknown
    primary: bool  # the bootloader starts this one next
    version: str | None  # of the bundle installed into it (RAUC's slot status)
    compatible: str | None
    installed_at: str | None  # RAUC's timestamp, ISO 8601 UTC
    install_count: int | None
    activated_at: str | None
    status: str | None  # how the last write into it ended ("ok")

    @property
    def booted(self) -> bool:
        return self.state == "booted"

    @property
    def good(self) -> bool:
        return self.boot_status == "good"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "class": self.slot_class, "bootname": self.bootname,
            "device": self.device, "state": self.state, "booted": self.booted,
            "boot_status": self.boot_status, "good": self.good, "primary": self.primary,
            "version": self.version, "compatible": self.compatible,
            "installed_at": self.installed_at, "install_count": self.install_count,
            "activated_at": self.activated_at, "status": self.status,
        }


@dataclass(frozen=True)
class SystemStatus:
    compatible: str | None
    booted: str | None  # the booted slot's bootname
    primary: str | None  # the primary slot's name
    slots: tuple[Slot, ...]

    def slot(self, name: str) -> Slot | None:
        return next((s for s in self.slots if s.name == name), None)

    def by_bootname(self, bootname: str) -> Slot | None:
        return next((s for s in self.slots if s.bootname == bootname), None)

    @property
    def booted_slot(self) -> Slot | None:
        found = next((s for s in self.slots if s.booted), None)
        return found or (self.by_bootname(self.booted) if self.booted else None)

    def others(self) -> list[Slot]:
        """The root filesystem slots an install may write: every one but the booted."""
        return [s for s in self.slots
                if not s.booted and (s.slot_class or ROOTFS_CLASS) == ROOTFS_CLASS]


def _slot(name: str, raw: dict[str, Any], primary: str | None) -> Slot:
    status = _dict(raw.get("slot_status"))
    bundle = _dict(status.get("bundle"))
    installed = _dict(status.get("installed"))
    activated = _dict(status.get("activated"))
    return Slot(
        name=visible(name),
        slot_class=_text(raw.get("class")),
        bootname=_text(raw.get("bootname")),
        device=_text(raw.get("device"), 4096),
        state=_text(raw.get("state")),
        boot_status=_text(raw.get("boot_status")),
        primary=primary is not None and name == primary,
        version=_text(bundle.get("version")),
        compatible=_text(bundle.get("compatible")),
        installed_at=_text(installed.get("timestamp")),
        install_count=_int(installed.get("count")),
        activated_at=_text(activated.get("timestamp")),
        status=_text(status.get("status")),
    )


def parse_status(text: str) -> SystemStatus:
    """`rauc status --detailed --output-format=json`; ValueError if it is not that."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"rauc status printed no JSON: {visible(text.strip()[:200])!s}"
                         f" ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("slots"), list):
        raise ValueError("rauc status: no list of slots in its JSON")
    primary = doc.get("boot_primary") if isinstance(doc.get("boot_primary"), str) else None
    slots: list[Slot] = []
    # RAUC lists each slot as a one-key object: {"rootfs.0": {...}}.
    for entry in doc["slots"]:
        if not isinstance(entry, dict):
            continue
        for name, raw in entry.items():
            if isinstance(name, str) and isinstance(raw, dict):
                slots.append(_slot(name, raw, primary))
    slots.sort(key=lambda s: s.name)
    return SystemStatus(
        compatible=_text(doc.get("compatible")),
        booted=_text(doc.get("booted")),
        primary=_text(primary),
        slots=tuple(slots),
    )


@dataclass(frozen=True)
class Progress:
    percent: int
    message: str


def parse_progress(line: str) -> Progress | None:
    """One line of `rauc install`'s output: ` 40% Verifying signature done.`; None for the
    others (its first `installing`, `LastError: ...`, the closing sentence)."""
    m = _PROGRESS_RE.match(line)
    if m is None:
        return None
    percent = int(m.group(1))
    if percent > 100:
        return None
    return Progress(percent, _text(m.group(2)) or "")


def install_error(lines: list[str]) -> str | None:
    """Why `rauc install` failed, in RAUC's words: its `LastError:` line, else the last line
    it printed."""
    for line in reversed(lines):
        stripped = line.strip()
        if stripped.startswith(_LAST_ERROR):
            return _text(stripped[len(_LAST_ERROR):])
    for line in reversed(lines):
        if line.strip():
            return _text(line)
    return None


# --------------------------------------------------------------------------- GRUB's choice


@dataclass(frozen=True)
class BootSelection:
    """What the boot loader was told: the order slots are tried in and each one's state
    (sdwan.appliance.bootenv owns the variables)."""

    order: tuple[str, ...]  # bootnames, first tried first
    ok: dict[str, bool]
    tries: dict[str, int]
    committed: dict[str, bool]
    limit: int = GRUB_MAX_TRIES  # the board's boot_tries
    load_failed: tuple[str, ...] = ()  # slots GRUB could not load
    # committed slots' boots in a row that did not stay up, and the board's boot_loops
    loops: dict[str, int] = field(default_factory=dict)
    loop_limit: int = GRUB_MAX_LOOPS

    @classmethod
    def from_env(cls, env: dict[str, str], limit: int = GRUB_MAX_TRIES,
                 loop_limit: int = GRUB_MAX_LOOPS) -> BootSelection:
        order = tuple(w for w in env.get("ORDER", "").split() if w)
        ok: dict[str, bool] = {}
        tries: dict[str, int] = {}
        committed: dict[str, bool] = {}
        loops: dict[str, int] = {}
        for name in order:
            if f"{name}_OK" in env:
                ok[name] = env[f"{name}_OK"].strip() == "1"
            raw = env.get(f"{name}_TRY", "").strip()
            if raw.isdigit():
                tries[name] = int(raw)
            committed[name] = env.get(f"{name}_COMMITTED", "").strip() == "1"
            raw = env.get(f"{name}_LOOPS", "").strip()
            if raw.isdigit():
                loops[name] = int(raw)
        failed = tuple(n for n in order if env.get(f"{n}_LOADFAIL", "").strip() == "1")
        return cls(order, ok, tries, committed, limit, failed, loops, loop_limit)

    @property
    def first(self) -> str | None:
        return self.order[0] if self.order else None

    def looping(self, bootname: str) -> bool:
        """Committed, but its last loop_limit boots all ended before it stayed up."""
        return bool(self.committed.get(bootname)) and \
            self.loops.get(bootname, 0) >= self.loop_limit

    def abandoned(self, bootname: str) -> bool:
        """GRUB passes over this slot now: marked bad, not loadable, not committed and out
        of tries, or committed and in a reboot loop."""
        if self.ok.get(bootname) is False or bootname in self.load_failed:
            return True
        if self.committed.get(bootname):
            return self.looping(bootname)
        return self.tries.get(bootname, 0) >= self.limit


# --------------------------------------------------------------------------- system.conf


@dataclass(frozen=True)
class SystemConf:
    compatible: str | None
    bootloader: str | None
    keyring: Path | None
    devices: dict[str, str]  # slot name -> device


def read_system_conf(path: Path) -> SystemConf:
    """The fields of RAUC's system.conf the updater reads itself (RAUC reads all of it);
    OSError or ValueError when it cannot be read."""
    parser = configparser.ConfigParser(interpolation=None, strict=False,
                                       comment_prefixes=("#", ";"))
    try:
        parser.read_string(path.read_text(), source=str(path))
    except configparser.Error as e:
        raise ValueError(f"{path}: {e}") from None
    system = parser["system"] if parser.has_section("system") else {}
    keyring = parser["keyring"] if parser.has_section("keyring") else {}
    devices = {
        section.removeprefix("slot."): parser[section].get("device", "")
        for section in parser.sections()
        if section.startswith("slot.") and parser[section].get("device")
    }
    ring = keyring.get("path")
    return SystemConf(
        compatible=system.get("compatible"),
        bootloader=system.get("bootloader"),
        keyring=(path.parent / ring) if ring and not ring.startswith("/") else
        (Path(ring) if ring else None),
        devices=devices,
    )
