"""Status LEDs: the patterns, the board's LED map, and the three LED backends.

A *pattern* is what the box says with its LEDs as a whole (`Pattern`); the board's *LED map*
(`load_led_map`, a TOML file such as board/qemu-x86_64/leds.toml) says where each LED of the
board ("status", "cloud", "wan1", ...) is and, optionally, what each pattern shows on it.
Three backends drive physical LEDs:

* `SysfsBackend`: the Linux LED class, /sys/class/leds/<name>/{brightness,trigger,delay_on,...};
* `Pca9552Backend`: an NXP PCA9552 16-LED I2C controller through smbus2;
* `PanelBackend`: a front-panel controller on a serial port (pyserial) speaking a line protocol.

`LedController.show(pattern)` never blocks its caller (the asyncio loop): each backend runs in
a thread of its own that applies the newest pattern, retries with a backoff when the hardware
fails, and counts failures; a broken backend never stops the others or socketd.
`choose_pattern` turns the box's state into the pattern to show. The map format, the PCA9552
register use and the panel protocol are documented in docs/leds.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sdwan.appliance.ledmap import (
    BLINK_MS,
    DEFAULT_PATTERNS,
    PCA9552_ADDRESSES,
    LedMap,
    LedSpec,
    LedState,
    Pattern,
    load_led_map,
)
from sdwan.common.tomlcheck import ConfigError

# The WAN links' state is the link manager's (links.py), which socketd hands to `show`;
# re-exported for the callers that learnt it here.

__all__ = [
    "BLINK_MS",
    "BOOT_GRACE_S",
    "DEFAULT_PATTERNS",
    "BoxState",
    "LedBackend",
    "LedController",
    "LedError",
    "LedMap",
    "LedSpec",
    "LedState",
    "PanelBackend",
    "Pattern",
    "Pca9552Backend",
    "SysfsBackend",
    "choose_pattern",
    "load_led_map",
    "open_leds",
]

log = logging.getLogger("sdwan.appliance.leds")

_OFF, _ON, _SLOW, _FAST = LedState.OFF, LedState.ON, LedState.SLOW, LedState.FAST


class LedError(Exception):
    """A backend could not set its LEDs; the message says which LED or bus and why."""


# --------------------------------------------------------------------------- choosing a pattern


@dataclass(frozen=True)
class BoxState:
    """The inputs of `choose_pattern`."""

    cloud: str = "off"  # Cloud.state: "off" (no PoP configured), "connecting", "up", "down"
    links_down: tuple[str, ...] = ()
    links_total: int = 0
    recovery: bool = False
    error: bool = False
    booting: bool = False


def choose_pattern(state: BoxState) -> Pattern:
    """The one pattern to show, most urgent first: error, booting, recovery, link fault, cloud."""
    if state.error:
        return Pattern.ERROR
    if state.booting:
        return Pattern.BOOTING
    if state.recovery:
        return Pattern.RECOVERY
    if state.links_down:
        return Pattern.LINK_FAULT
    if state.cloud == "up":
        return Pattern.CLOUD_UP
    if state.cloud == "off":
        return Pattern.RUNNING
    return Pattern.CLOUD_DOWN


# How long "booting" waits for the first cloud connection before showing the cloud as down.
BOOT_GRACE_S = 30.0


# --------------------------------------------------------------------------- backends


class LedBackend:
    """A driver for one kind of LED hardware. Methods run in the backend's own thread and may
    block for a bounded time (the panel's reply timeout); they raise LedError on failure."""

    kind: str = "?"
    # How often `check` runs while nothing changes (None: never).
    check_every_s: float | None = None

    def apply(self, pattern: Pattern, states: Mapping[Any, LedState]) -> None:
        """Set every LED in `states` (keyed by the backend's LED name) for `pattern`."""
        raise NotImplementedError

    def check(self) -> bool:
        """Is the hardware still as last applied? False asks for the pattern again (the
        backend forgets first whatever it assumed about the hardware)."""
        return True

    def forget(self) -> None:
        """After a failure: assume nothing about the hardware's state any more."""

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release the hardware; the LEDs keep their state."""


def _write_attr(path: Path, value: str) -> None:
    """Write one sysfs attribute as the kernel expects: one write() of the whole value, into a
    file that must already exist (sysfs never creates attributes on write)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as e:
        raise LedError(f"cannot open {path}: {e.strerror}") from None
    try:
        data = value.encode()
        if os.write(fd, data) != len(data):
            raise LedError(f"short write to {path}")
    except OSError as e:
        raise LedError(f"writing {value!r} to {path} failed: {e.strerror}") from None
    finally:
        os.close(fd)


def _read_attr(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise LedError(f"cannot read {path}: {e.strerror}") from None


class SysfsBackend(LedBackend):
    """LEDs of the Linux LED class: brightness for on/off, the "timer" trigger for blinking.

    Writes that the kernel would refuse are errors here already, so a test tree laid out like
    /sys/class/leds behaves as the kernel does: a brightness above max_brightness, a trigger the
    LED does not list, an attribute that does not exist (delay_on before the timer trigger)."""

    kind = "sysfs"

    def __init__(self, root: str | os.PathLike[str] = "/sys/class/leds") -> None:
        self.root = Path(root)
        self._max: dict[str, int] = {}
        self._triggers: dict[str, list[str]] = {}
        self._last: dict[str, LedState] = {}

    def _dir(self, led: str) -> Path:
        d = self.root / led
        if not d.is_dir():
            raise LedError(f"no LED {led!r} under {self.root}")
        return d

    def _max_brightness(self, led: str, d: Path) -> int:
        if led not in self._max:
            text = _read_attr(d / "max_brightness")
            try:
                value = int(text)
            except ValueError:
                raise LedError(f"{d / 'max_brightness'}: not a number: {text!r}") from None
            if value < 1:
                raise LedError(f"{d / 'max_brightness'}: {value}: the LED cannot be lit")
            self._max[led] = value
        return self._max[led]

    def _set_trigger(self, led: str, d: Path, trigger: str) -> None:
        if led not in self._triggers:
            # "[none] timer heartbeat": the active one in brackets. Read once: after a write
            # the list only changes which entry is bracketed.
            self._triggers[led] = [t.strip("[]") for t in _read_attr(d / "trigger").split()]
        # The kernel accepts "none" always and any listed trigger, and refuses the rest.
        if trigger != "none" and trigger not in self._triggers[led]:
            available = " ".join(self._triggers[led]) or "none"
            raise LedError(
                f"LED {led!r} has no {trigger!r} trigger (available: {available});"
                " is ledtrig-timer in the kernel?"
            )
        _write_attr(d / "trigger", trigger)

    def _set_brightness(self, led: str, d: Path, value: int) -> None:
        top = self._max_brightness(led, d)
        if not 0 <= value <= top:
            raise LedError(f"brightness {value} out of range 0..{top} for LED {led!r}")
        _write_attr(d / "brightness", str(value))

    def apply(self, pattern: Pattern, states: Mapping[Any, LedState]) -> None:
        problems = []
        for led, state in states.items():
            if self._last.get(led) == state:
                continue  # rewriting the timer trigger would restart the blink visibly
            try:
                self._set_one(str(led), state)
            except LedError as e:
                self._last.pop(led, None)
                problems.append(str(e))
            else:
                self._last[led] = state
        if problems:
            raise LedError("; ".join(problems))

    def _set_one(self, led: str, state: LedState) -> None:
        d = self._dir(led)
        if state in BLINK_MS:
            on_ms, off_ms = BLINK_MS[state]
            self._set_trigger(led, d, "timer")
            # delay_on/delay_off exist only once the timer trigger is active.
            _write_attr(d / "delay_on", str(on_ms))
            _write_attr(d / "delay_off", str(off_ms))
        else:
            self._set_trigger(led, d, "none")
            self._set_brightness(led, d, self._max_brightness(led, d) if state is _ON else 0)

    def forget(self) -> None:
        self._last.clear()

    def info(self) -> dict[str, Any]:
        return {"root": str(self.root)}


class SMBusLike(Protocol):
    """The part of smbus2.SMBus this module uses (tests pass a register model)."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...

    def close(self) -> None: ...


class Pca9552Backend(LedBackend):
    """An NXP PCA9552: 16 open-drain LED outputs, two programmable blink generators.

    Registers (datasheet section 7): INPUT0/1 (0x00/0x01, read-only pin states), PSC0 (0x02) and
    PWM0 (0x03) = blink rate 0, PSC1 (0x04) and PWM1 (0x05) = blink rate 1, LS0..LS3 (0x06..0x09)
    = LED selectors, 2 bits per LED (LED n in LS(n // 4), bits 2*(n % 4)+1..2*(n % 4)):
    00 output low (LED on), 01 high impedance (LED off, the power-on default), 10 blinks at
    rate 0, 11 blinks at rate 1. Period = (PSC + 1) / 44 s, duty cycle = PWM / 256 (the share
    of the period the LED is on). Rate 0 is the slow blink (1 Hz), rate 1 the fast one (4 Hz).
    Outputs not in the map keep their selector bits (read-modify-write), as they may be GPIOs.
    """

    kind = "pca9552"
    check_every_s = 30.0  # a chip that lost power comes back with every LED off

    INPUT0, INPUT1, PSC0, PWM0, PSC1, PWM1, LS0 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
    SEL = {_ON: 0b00, _OFF: 0b01, _SLOW: 0b10, _FAST: 0b11}

    def __init__(self, bus: int | SMBusLike, address: int = 0x60) -> None:
        if address not in PCA9552_ADDRESSES:
            raise ValueError(f"PCA9552 address must be 0x60..0x67, got {address:#04x}")
        self.address = address
        self._bus_number = bus if isinstance(bus, int) else None
        self._bus: SMBusLike | None = None if isinstance(bus, int) else bus
        self._rates_set = False
        self._expected: dict[int, int] = {}  # LS register -> value last written

    @staticmethod
    def psc_for(period_ms: int) -> int:
        return max(0, min(255, round(period_ms * 44 / 1000) - 1))

    @staticmethod
    def pwm_for(on_ms: int, off_ms: int) -> int:
        return max(0, min(255, round(256 * on_ms / (on_ms + off_ms))))

    def _open(self) -> SMBusLike:
        if self._bus is None:
            import smbus2  # only boards with the chip pay for the import

            try:
                self._bus = smbus2.SMBus(self._bus_number)
            except OSError as e:
                raise LedError(
                    f"cannot open I2C bus /dev/i2c-{self._bus_number}: {e.strerror}"
                ) from None
        return self._bus

    def _where(self) -> str:
        bus = f"/dev/i2c-{self._bus_number}" if self._bus_number is not None else "the bus"
        return f"{bus} address {self.address:#04x}"

    def _failed(self, what: str, e: OSError) -> LedError:
        # A NAK (no chip at the address) comes back as ENXIO or EREMOTEIO.
        return LedError(f"PCA9552 at {self._where()}: {what} failed: {e.strerror or e}")

    def _read(self, reg: int, name: str) -> int:
        try:
            return int(self._open().read_byte_data(self.address, reg))
        except OSError as e:
            raise self._failed(f"reading {name}", e) from None

    def _write(self, reg: int, value: int, name: str) -> None:
        try:
            self._open().write_byte_data(self.address, reg, value)
        except OSError as e:
            raise self._failed(f"writing {name}", e) from None

    def apply(self, pattern: Pattern, states: Mapping[Any, LedState]) -> None:
        if not self._rates_set:
            for n, state in ((0, _SLOW), (1, _FAST)):
                on_ms, off_ms = BLINK_MS[state]
                self._write(self.PSC0 + 2 * n, self.psc_for(on_ms + off_ms), f"PSC{n}")
                self._write(self.PWM0 + 2 * n, self.pwm_for(on_ms, off_ms), f"PWM{n}")
            self._rates_set = True
        by_reg: dict[int, dict[int, LedState]] = {}
        for led, state in states.items():
            n = int(led)
            by_reg.setdefault(self.LS0 + n // 4, {})[n % 4] = state
        for reg, leds in sorted(by_reg.items()):
            name = f"LS{reg - self.LS0}"
            current = self._read(reg, name)
            value = current
            for slot, state in leds.items():
                value = (value & ~(0b11 << 2 * slot)) | (self.SEL[state] << 2 * slot)
            if value != current:
                self._write(reg, value, name)
            self._expected[reg] = value

    def check(self) -> bool:
        for reg, value in self._expected.items():
            if self._read(reg, f"LS{reg - self.LS0}") != value:
                log.warning("PCA9552 at %s lost its LED state (reset?)", self._where())
                self._rates_set = False
                return False
        return True

    def forget(self) -> None:
        self._rates_set = False
        self._expected.clear()
        if self._bus_number is not None and self._bus is not None:
            with contextlib.suppress(OSError):
                self._bus.close()
            self._bus = None

    def info(self) -> dict[str, Any]:
        return {"bus": self._bus_number, "address": f"{self.address:#04x}"}

    def close(self) -> None:
        if self._bus is not None and self._bus_number is not None:
            with contextlib.suppress(OSError):
                self._bus.close()
        self._bus = None


MAX_PANEL_LINE = 128


class PanelBackend(LedBackend):
    """A front-panel controller on a serial port, 115200 8N1, speaking lines of ASCII.

    Host to panel: `PING`, `PATTERN <pattern>`, `LED <index> on|off|blink <on_ms> <off_ms>`.
    Panel to host: `OK` or `ERR <reason>` answers each command, in order, within the timeout;
    `HELLO <model> <fw>` whenever the panel (re)starts, at which the host sends the pattern
    again. `port` is anything pyserial's serial_for_url opens: a device such as /dev/ttyS1, a
    pty, or socket://host:port. A timeout, an ERR or a lost port closes the port; the next try
    reopens it.
    """

    kind = "panel"
    check_every_s = 5.0

    def __init__(self, port: str, baudrate: int = 115200, timeout_ms: int = 1000) -> None:
        self.port = port
        self.baudrate = baudrate
        self.timeout_s = timeout_ms / 1000
        self._serial: Any = None
        self.model: str | None = None
        self.firmware: str | None = None
        self.opens = 0
        self.hellos = 0
        self._restarted = False

    def _open(self) -> Any:
        if self._serial is None:
            import serial  # only boards with a panel pay for the import

            try:
                self._serial = serial.serial_for_url(
                    self.port,
                    baudrate=self.baudrate,
                    bytesize=serial.EIGHTBITS,
                    parity=serial.PARITY_NONE,
                    stopbits=serial.STOPBITS_ONE,
                    timeout=self.timeout_s,
                    write_timeout=self.timeout_s,
                )
            except (serial.SerialException, OSError, ValueError) as e:
                raise LedError(f"cannot open the panel port {self.port}: {e}") from None
            self.opens += 1
        return self._serial

    def _drop(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            with contextlib.suppress(Exception):
                port.close()

    def _read_line(self, port: Any, deadline: float) -> str | None:
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            port.timeout = left
            chunk = port.read_until(b"\n", MAX_PANEL_LINE - len(buf))
            if not chunk:
                return None
            buf += chunk
            if len(buf) >= MAX_PANEL_LINE and not buf.endswith(b"\n"):
                raise LedError(f"panel sent a line longer than {MAX_PANEL_LINE} bytes")
        return buf.decode("ascii", "replace").strip()

    def _command(self, line: str) -> None:
        import serial

        port = self._open()
        try:
            port.write(line.encode("ascii") + b"\n")
            port.flush()
            deadline = time.monotonic() + self.timeout_s
            while True:
                reply = self._read_line(port, deadline)
                if reply is None:
                    raise LedError(f"panel on {self.port}: no answer to {line!r} within"
                                   f" {self.timeout_s:g} s")
                if reply.startswith("HELLO"):
                    self._hello(reply)
                    continue
                if reply == "OK":
                    return
                if reply.startswith("ERR"):
                    raise LedError(f"panel refused {line!r}: {reply[3:].strip() or 'no reason'}")
                raise LedError(f"panel on {self.port}: unexpected answer {reply!r} to {line!r}")
        except (serial.SerialException, OSError) as e:
            self._drop()
            raise LedError(f"panel on {self.port}: {e}") from None
        except LedError:
            self._drop()
            raise

    def _hello(self, line: str) -> None:
        parts = line.split()
        self.model = parts[1] if len(parts) > 1 else None
        self.firmware = parts[2] if len(parts) > 2 else None
        self.hellos += 1
        self._restarted = True
        log.info("front panel on %s: %s", self.port, line)

    def apply(self, pattern: Pattern, states: Mapping[Any, LedState]) -> None:
        self._command(f"PATTERN {pattern.value}")
        # A HELLO before the answer to PATTERN (the greeting of a port just opened) came
        # before anything of this pattern; only a later one means the panel lost some of it.
        self._restarted = False
        for led, state in states.items():
            if state in BLINK_MS:
                on_ms, off_ms = BLINK_MS[state]
                self._command(f"LED {led} blink {on_ms} {off_ms}")
            else:
                self._command(f"LED {led} {state.value}")

    def check(self) -> bool:
        self._command("PING")
        # A HELLO on the way means the panel restarted and forgot its LEDs.
        restarted, self._restarted = self._restarted, False
        return not restarted

    def forget(self) -> None:
        self._drop()

    def info(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "connected": self._serial is not None,
            "model": self.model,
            "firmware": self.firmware,
            "opens": self.opens,
            "hellos": self.hellos,
        }

    def close(self) -> None:
        self._drop()


# --------------------------------------------------------------------------- the controller


RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


@dataclass
class _Counters:
    applied: int = 0
    failures: int = 0
    last_error: str | None = None
    ok: bool | None = None  # None until the first try


@dataclass
class _Worker:
    """The thread that drives one backend."""

    backend: LedBackend
    counters: _Counters = field(default_factory=_Counters)
    want: tuple[Pattern, dict[Any, LedState]] | None = None
    generation: int = 0  # of `want`
    done: int = 0  # the generation last applied successfully
    thread: threading.Thread | None = None
    retry_at: float = 0.0  # monotonic time before which a failed backend is left alone
    retry_in: float = RETRY_FIRST_S


class LedController:
    """Shows patterns on every LED of a map. `show` returns at once; one thread per piece of
    hardware (`LedSpec.unit`) does the I/O. Tests pass ready backends keyed by unit."""

    def __init__(
        self, led_map: LedMap, backends: Mapping[str, LedBackend] | None = None
    ) -> None:
        self.map = led_map
        self.pattern: Pattern | None = None
        self._links: dict[str, bool] = {}
        self._cond = threading.Condition()
        self._closed = False
        made = dict(backends) if backends is not None else self._make_backends(led_map)
        used = {spec.unit for spec in led_map.leds}
        missing = used - made.keys()
        if missing:
            raise ValueError(f"no backend for {', '.join(sorted(missing))}")
        self._workers = {unit: _Worker(made[unit]) for unit in sorted(used)}
        for unit, worker in self._workers.items():
            worker.thread = threading.Thread(
                target=self._run, args=(worker,), name=f"led {unit}", daemon=True
            )
            worker.thread.start()

    @staticmethod
    def _make_backends(m: LedMap) -> dict[str, LedBackend]:
        out: dict[str, LedBackend] = {}
        for spec in m.leds:
            if spec.unit in out:
                continue
            if spec.backend == "pca9552":
                assert spec.bus is not None and spec.address is not None
                out[spec.unit] = Pca9552Backend(spec.bus, spec.address)
            elif spec.backend == "panel":
                assert spec.device is not None
                out[spec.unit] = PanelBackend(spec.device, spec.baud, spec.timeout_ms)
            else:
                out[spec.unit] = SysfsBackend(m.sysfs_root)
        return out

    def backend_states(
        self, pattern: Pattern, links: Mapping[str, bool] | None = None
    ) -> dict[str, dict[Any, LedState]]:
        """unit -> (the backend's LED name -> state) for `pattern`."""
        by_name = self.map.states(pattern, links)
        out: dict[str, dict[Any, LedState]] = {unit: {} for unit in self._workers}
        for spec in self.map.leds:
            out[spec.unit][spec.led] = by_name[spec.name]
        return out

    def show(self, pattern: Pattern, links: Mapping[str, bool] | None = None) -> None:
        """Ask every backend for `pattern` (`links`: WAN link name -> up, for LEDs named after
        links). Showing what is already shown costs nothing."""
        links = dict(links or {})
        with self._cond:
            if self._closed or (pattern == self.pattern and links == self._links):
                return
            if self.pattern is not None and pattern != self.pattern:
                log.info("LEDs: %s -> %s", self.pattern, pattern)
            self.pattern, self._links = pattern, links
            for unit, states in self.backend_states(pattern, links).items():
                worker = self._workers[unit]
                if worker.want is not None and worker.want == (pattern, states):
                    continue
                worker.want = (pattern, states)
                worker.generation += 1
                # Something new to show is worth one try at once, backoff or not.
                worker.retry_at = 0.0
            self._cond.notify_all()

    def settle(self, timeout: float) -> bool:
        """Wait until every backend has applied the current pattern; False on timeout (a
        backend keeps failing). For tests and for the last pattern at shutdown."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(w.done == w.generation for w in self._workers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self, w: _Worker) -> None:
        next_check = None if w.backend.check_every_s is None else time.monotonic()
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    pending = w.want is not None and w.done != w.generation and now >= w.retry_at
                    checking = (
                        next_check is not None
                        and now >= next_check
                        and 0 < w.done == w.generation
                    )
                    if pending or checking:
                        break
                    waits = [t for t in (next_check,) if t is not None and w.done > 0]
                    if w.want is not None and w.done != w.generation:
                        waits.append(w.retry_at)
                    self._cond.wait(max(0.01, min(waits) - now) if waits else None)
                want, generation = w.want, w.generation
            assert want is not None
            try:
                if pending:
                    w.backend.apply(*want)
                else:
                    assert next_check is not None
                    next_check = time.monotonic() + (w.backend.check_every_s or 0)
                    if w.backend.check():
                        continue
                    w.backend.apply(*want)
            except Exception as e:  # a driver bug must not kill the thread either
                w.backend.forget()
                with self._cond:
                    w.counters.failures += 1
                    if w.counters.ok is not False or w.counters.last_error != str(e):
                        log.warning("LEDs (%s): %s; retrying in %.0f s", w.backend.kind, e,
                                    w.retry_in)
                    w.counters.ok = False
                    w.counters.last_error = str(e)
                    if w.done == generation:
                        w.done = generation - 1  # apply again once it works
                    w.retry_at = time.monotonic() + w.retry_in
                    w.retry_in = min(RETRY_MAX_S, w.retry_in * 2)
                continue
            with self._cond:
                if w.counters.ok is False:
                    log.info("LEDs (%s) work again", w.backend.kind)
                w.counters.ok = True
                w.counters.applied += 1
                w.done = generation
                self._cond.notify_all()
                w.retry_in = RETRY_FIRST_S
                w.retry_at = 0.0
            if w.backend.check_every_s is not None:
                next_check = time.monotonic() + w.backend.check_every_s

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "pattern": str(self.pattern) if self.pattern is not None else None,
                "map": str(self.map.source),
                "backends": {
                    unit: {
                        "ok": w.counters.ok,
                        "applied": w.counters.applied,
                        "failures": w.counters.failures,
                        "last_error": w.counters.last_error,
                        **w.backend.info(),
                    }
                    for unit, w in self._workers.items()
                },
            }

    def close(self, timeout: float = 2.0) -> None:
        """Stop the threads (waiting up to `timeout` for a command in flight) and release the
        hardware; the LEDs keep what they show."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for w in self._workers.values():
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
            if w.thread is None or not w.thread.is_alive():
                with contextlib.suppress(Exception):
                    w.backend.close()


def open_leds(path: Path | None) -> LedController | None:
    """The controller for the LED map at `path`, or None (no map configured, or a map with
    errors: logged line by line, since LEDs must never keep socketd from running)."""
    if path is None:
        return None
    try:
        led_map = load_led_map(path)
    except ConfigError as e:
        for line in str(e).splitlines():
            log.error("LED map: %s", line)
        log.error("running without LEDs")
        return None
    return LedController(led_map)
