"""The vocabulary of the status LEDs (patterns, LED states, the default patterns) and the
board's LED map file (`/etc/sdwan/leds.toml`: which LED is driven by which backend, and the
patterns a board overrides), checked with the config engine (common/tomlcheck.py). leds.py
drives the LEDs from a map; docs/leds.md describes the format.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.common.tomlcheck import (
    MISSING,
    Checker,
    ConfigError,
    ConfigIssue,
    LineIndex,
    expects,
    fmt_loc,
    int_range,
    matching,
    path_string,
    read_toml,
    resolve_path,
    show,
)

__all__ = [
    "BACKENDS",
    "PCA9552_ADDRESSES",
    "BLINK_MS",
    "DEFAULT_PATTERNS",
    "LedMap",
    "LedSpec",
    "LedState",
    "Pattern",
    "load_led_map",
]


class Pattern(enum.StrEnum):
    """What the box shows. With the default patterns, on LEDs named "status", "cloud", "link"
    and LEDs named after WAN links ("wan1": on while that link is up, fast while it is down):

    * off: every LED off (socketd stopped cleanly).
    * booting: socketd is starting: from its start until it is set up and has reached the
      cloud (or given up waiting for it): status blinks slowly.
    * running: up, and no cloud is configured (PoP-less mesh): status on.
    * cloud_up: up and registered with a PoP: status and cloud on.
    * cloud_down: up, PoPs configured but none reached: status on, cloud off.
    * recovery: WAN recovery is carrying the traffic: status on, cloud and link blink slowly.
    * link_fault: at least one configured WAN link is down (missing, administratively down or
      without carrier): status on, link blinks fast.
    * error: socketd is in a crash loop (see docs/watchdog.md): every LED blinks fast.
    """

    OFF = "off"
    BOOTING = "booting"
    RUNNING = "running"
    CLOUD_UP = "cloud_up"
    CLOUD_DOWN = "cloud_down"
    RECOVERY = "recovery"
    LINK_FAULT = "link_fault"
    ERROR = "error"


class LedState(enum.StrEnum):
    """One LED's state. Two blink rates only: the PCA9552 has two blink generators."""

    OFF = "off"
    ON = "on"
    SLOW = "slow"  # 1 Hz, half on
    FAST = "fast"  # 4 Hz, half on


# (on_ms, off_ms) of the blinking states.
BLINK_MS: dict[LedState, tuple[int, int]] = {
    LedState.SLOW: (500, 500),
    LedState.FAST: (125, 125),
}

_OFF, _ON, _SLOW, _FAST = LedState.OFF, LedState.ON, LedState.SLOW, LedState.FAST
DEFAULT_PATTERNS: dict[Pattern, dict[str, LedState]] = {
    Pattern.OFF: {"status": _OFF, "cloud": _OFF, "link": _OFF},
    Pattern.BOOTING: {"status": _SLOW, "cloud": _OFF, "link": _OFF},
    Pattern.RUNNING: {"status": _ON, "cloud": _OFF, "link": _OFF},
    Pattern.CLOUD_UP: {"status": _ON, "cloud": _ON, "link": _OFF},
    Pattern.CLOUD_DOWN: {"status": _ON, "cloud": _OFF, "link": _OFF},
    Pattern.RECOVERY: {"status": _ON, "cloud": _SLOW, "link": _SLOW},
    Pattern.LINK_FAULT: {"status": _ON, "cloud": _OFF, "link": _FAST},
    # "*": every LED the pattern does not name, whatever it is called.
    Pattern.ERROR: {"*": _FAST},
}


# --------------------------------------------------------------------------- the LED map


BACKENDS = ("sysfs", "pca9552", "panel")
PCA9552_LEDS = 16
PCA9552_ADDRESSES = range(0x60, 0x68)  # 1100 A2 A1 A0
PANEL_LEDS = 64
DEFAULT_SYSFS_ROOT = Path("/sys/class/leds")

# Patterns in which an LED named after a WAN link shows that link (on: up, fast: down).
FOLLOW_LINKS = frozenset(
    {Pattern.RUNNING, Pattern.CLOUD_UP, Pattern.CLOUD_DOWN, Pattern.RECOVERY, Pattern.LINK_FAULT}
)


@dataclass(frozen=True)
class LedSpec:
    """One LED of the board: its name (a role such as "status", or a WAN link's name), its
    backend, and where it is: sysfs `led` = the LED class device; pca9552 `bus`, `address`,
    `led` = the output 0..15; panel `device` (a pyserial port), `baud`, `led` = its index."""

    name: str
    backend: str
    led: str | int
    device: str | None = None
    bus: int | None = None
    address: int | None = None
    baud: int = 115200
    timeout_ms: int = 1000

    @property
    def unit(self) -> str:
        """Which piece of hardware: LEDs with the same unit share one backend (and thread)."""
        if self.backend == "pca9552":
            return f"pca9552 i2c-{self.bus} {self.address:#04x}"
        if self.backend == "panel":
            return f"panel {self.device}"
        return "sysfs"


@dataclass(frozen=True)
class LedMap:
    source: Path
    leds: tuple[LedSpec, ...]
    patterns: Mapping[Pattern, Mapping[str, LedState]]
    sysfs_root: Path = DEFAULT_SYSFS_ROOT

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.leds]

    def states(
        self, pattern: Pattern, links: Mapping[str, bool] | None = None
    ) -> dict[str, LedState]:
        """LED name -> state for `pattern`. An LED the pattern names takes that state; an LED
        named after a WAN link (`links`: link name -> up) shows its link in the patterns of a
        running box and the pattern's "link" state otherwise; any other LED takes the
        pattern's "*" state, else it is off."""
        wanted = self.patterns.get(pattern, {})
        links = links or {}
        other = wanted.get("*", LedState.OFF)
        out: dict[str, LedState] = {}
        for name in self.names:
            if name in wanted:
                out[name] = wanted[name]
            elif name in links and pattern in FOLLOW_LINKS:
                out[name] = LedState.ON if links[name] else LedState.FAST
            elif name in links:
                out[name] = wanted.get("link", other)
            else:
                out[name] = other
        return out


_LED_NAME_RE = re.compile(r"[a-z0-9_-]{1,15}")
# LED class names are "devicename:color:function"; the kernel refuses "/" in them.
_SYSFS_LED_RE = re.compile(r"[^/\s]{1,64}")

_sysfs_led = matching(
    _SYSFS_LED_RE, 'an LED class device name such as "socket:green:status" (no "/" or spaces)'
)


def _one_of(choices: Iterable[str]) -> Callable[[Any], str]:
    names = tuple(choices)
    listed = ", ".join(f'"{n}"' for n in names)

    @expects(f"one of {listed}")
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"expected one of {listed}, got {show(value)}")
        return value

    return check


_backend = _one_of(BACKENDS)
_led_state = _one_of(s.value for s in LedState)

_KEYS = {
    "sysfs": ("backend", "name"),
    "pca9552": ("backend", "bus", "address", "index"),
    "panel": ("backend", "device", "index", "baud", "timeout_ms"),
}


class _MapChecker(Checker):
    """Finds the lines of `[led.status]`-style headers, which the site config does not use."""

    def error(self, loc: tuple[str | int, ...], message: str) -> None:
        line = None
        if len(loc) >= 2 and loc[0] in ("led", "patterns") and isinstance(loc[1], str):
            line = self.lines.find((f"{loc[0]}.{loc[1]}", *loc[2:]))
        if line is None:
            line = self.lines.find(loc)
        self.issues.append(ConfigIssue(fmt_loc(loc), message, line))


def _check_led(c: Checker, name: str, entry: Mapping[str, Any]) -> LedSpec | None:
    loc: tuple[str | int, ...] = ("led", name)
    backend = c.value(entry, (*loc, "backend"), _backend)
    if backend is MISSING:
        c.known_keys(entry, loc, sorted({k for keys in _KEYS.values() for k in keys}))
        return None
    c.known_keys(entry, loc, _KEYS[backend])
    if backend == "sysfs":
        led = c.value(entry, (*loc, "name"), _sysfs_led)
        if led in (".", ".."):
            c.error((*loc, "name"), f"expected an LED class device name, got {show(led)}")
            return None
        return None if led is MISSING else LedSpec(name, backend, led)
    if backend == "pca9552":
        bus = c.value(entry, (*loc, "bus"), int_range(0, 1023))
        address = c.value(entry, (*loc, "address"), int_range(0, 0x7F), default=0x60)
        if address is not MISSING and address not in PCA9552_ADDRESSES:
            c.error(
                (*loc, "address"),
                f"expected a PCA9552 address 0x60..0x67 (set by its A2..A0 pins),"
                f" got {address:#04x}",
            )
            address = MISSING
        index = c.value(entry, (*loc, "index"), int_range(0, PCA9552_LEDS - 1))
        if MISSING in (bus, address, index):
            return None
        return LedSpec(name, backend, index, bus=bus, address=address)
    device = c.value(entry, (*loc, "device"), path_string)
    index = c.value(entry, (*loc, "index"), int_range(0, PANEL_LEDS - 1))
    baud = c.value(entry, (*loc, "baud"), int_range(1200, 4_000_000), default=115200)
    timeout = c.value(entry, (*loc, "timeout_ms"), int_range(50, 10_000), default=1000)
    if MISSING in (device, index, baud, timeout):
        return None
    return LedSpec(name, backend, index, device=device, baud=baud, timeout_ms=timeout)


def _check_leds(c: Checker, doc: Mapping[str, Any]) -> list[LedSpec]:
    table = c.table(doc, ("led",), required=True)
    if table is None:
        return []
    if not table:
        c.error(("led",), "expected at least one [led.<name>] table")
        return []
    specs: list[LedSpec] = []
    seen: dict[tuple[str, str | int], str] = {}
    for name, entry in table.items():
        loc: tuple[str | int, ...] = ("led", name)
        if not _LED_NAME_RE.fullmatch(name):
            c.error(loc, f"expected an LED name of 1..15 characters [a-z0-9_-], got {show(name)}")
            continue
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table [led.{name}], got {show(entry)}")
            continue
        spec = _check_led(c, name, entry)
        if spec is None:
            continue
        where = (spec.unit, spec.led)
        if where in seen:
            key = "name" if spec.backend == "sysfs" else "index"
            c.error((*loc, key), f"the same LED as [led.{seen[where]}] ({spec.unit} {spec.led})")
            continue
        seen[where] = name
        specs.append(spec)
    # One serial port cannot be opened at two speeds.
    bauds: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.backend != "panel" or spec.device is None:
            continue
        first = bauds.setdefault(spec.device, (spec.baud, spec.name))
        if first[0] != spec.baud:
            c.error(
                ("led", spec.name, "baud"),
                f"{spec.device} is used at {first[0]} baud by [led.{first[1]}]",
            )
    return specs


def _check_patterns(
    c: Checker, doc: Mapping[str, Any], names: set[str] | None
) -> dict[Pattern, dict[str, LedState]]:
    patterns = {p: dict(states) for p, states in DEFAULT_PATTERNS.items()}
    t = c.table(doc, ("patterns",), required=False)
    if t is None:
        return patterns
    c.known_keys(t, ("patterns",), [p.value for p in Pattern])
    for key, states in t.items():
        if key not in {p.value for p in Pattern}:
            continue
        loc: tuple[str | int, ...] = ("patterns", key)
        if not isinstance(states, dict):
            c.error(loc, f"expected a table of <LED name> = <state>, got {show(states)}")
            continue
        chosen: dict[str, LedState] = {}
        for led in states:
            if names is not None and led not in names and led != "*":
                known = f" (known: {', '.join(sorted(names))})" if names else ""
                c.error((*loc, led), f"no [led.{led}] in the map{known}")
                continue
            value = c.value(states, (*loc, led), _led_state)
            if value is not MISSING:
                chosen[led] = LedState(value)
        patterns[Pattern(key)] = chosen
    return patterns


def load_led_map(path: str | os.PathLike[str]) -> LedMap:
    """Read and check a board's LED map; ConfigError lists every problem with its line."""
    source, text, doc = read_toml(path, "LED map")
    c = _MapChecker(source, LineIndex(text))
    c.known_keys(doc, (), ("led", "patterns", "sysfs"))
    root = DEFAULT_SYSFS_ROOT
    t = c.table(doc, ("sysfs",), required=False)
    if t:
        c.known_keys(t, ("sysfs",), ("root",))
        value = c.value(t, ("sysfs", "root"), path_string, default=str(DEFAULT_SYSFS_ROOT))
        if value is not MISSING:
            root = resolve_path(source.parent, value)
    specs = _check_leds(c, doc)
    raw = doc.get("led")
    # From the raw tables, so that a pattern is not blamed for an LED whose table is wrong.
    names = set(raw) if isinstance(raw, dict) and raw else None
    patterns = _check_patterns(c, doc, names)
    if c.issues:
        raise ConfigError(source, c.issues)
    return LedMap(source=source, leds=tuple(specs), patterns=patterns, sysfs_root=root)
