"""LEDs: the map's located errors, pattern choice, and each backend against what it drives: a
sysfs tree laid out like /sys/class/leds, a PCA9552 register model, and a front panel played by
the test on a real TCP socket and on a real pty."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdwan.appliance.leds import (
    BoxState,
    LedController,
    LedError,
    LedState,
    PanelBackend,
    Pattern,
    Pca9552Backend,
    SysfsBackend,
    choose_pattern,
    load_led_map,
    open_leds,
)
from sdwan.common.netdev import interface_fault
from sdwan.common.tomlcheck import ConfigError

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


def write_map(folder: Path, text: str) -> Path:
    path = folder / "leds.toml"
    path.write_text(text)
    return path


def map_errors(folder: Path, text: str) -> tuple[Path, list[str]]:
    path = write_map(folder, text)
    with pytest.raises(ConfigError) as info:
        load_led_map(path)
    return path, str(info.value).splitlines()


SYSFS_MAP = """\
[sysfs]
root = "leds"

[led.status]
backend = "sysfs"
name = "socket:green:status"

[led.cloud]
backend = "sysfs"
name = "socket:blue:cloud"

[led.wan1]
backend = "sysfs"
name = "socket:green:wan1"
"""


# --------------------------------------------------------------------------- the map


def test_map_loads_with_default_patterns(tmp_path: Path) -> None:
    m = load_led_map(write_map(tmp_path, SYSFS_MAP))
    assert m.sysfs_root == tmp_path / "leds"
    assert [(s.name, s.backend, s.led) for s in m.leds] == [
        ("status", "sysfs", "socket:green:status"),
        ("cloud", "sysfs", "socket:blue:cloud"),
        ("wan1", "sysfs", "socket:green:wan1"),
    ]
    assert m.states(Pattern.BOOTING) == {
        "status": LedState.SLOW, "cloud": LedState.OFF, "wan1": LedState.OFF
    }
    assert m.states(Pattern.ERROR) == dict.fromkeys(("status", "cloud", "wan1"), LedState.FAST)


def test_leds_named_after_links_show_their_link(tmp_path: Path) -> None:
    m = load_led_map(write_map(tmp_path, SYSFS_MAP))
    up, down = {"wan1": True}, {"wan1": False}
    assert m.states(Pattern.CLOUD_UP, up)["wan1"] is LedState.ON
    assert m.states(Pattern.CLOUD_UP, down)["wan1"] is LedState.FAST
    # Booting and error speak for every LED, links or not.
    assert m.states(Pattern.BOOTING, up)["wan1"] is LedState.OFF
    assert m.states(Pattern.ERROR, up)["wan1"] is LedState.FAST


def test_pattern_override_in_the_map(tmp_path: Path) -> None:
    text = SYSFS_MAP + '\n[patterns.cloud_up]\nstatus = "on"\nwan1 = "slow"\n'
    m = load_led_map(write_map(tmp_path, text))
    # The override replaces the default for that pattern: cloud is off, wan1 as written.
    assert m.states(Pattern.CLOUD_UP, {"wan1": True}) == {
        "status": LedState.ON, "cloud": LedState.OFF, "wan1": LedState.SLOW
    }
    assert m.states(Pattern.CLOUD_DOWN)["status"] is LedState.ON
    # "*" stands for every LED the table does not name.
    text = SYSFS_MAP + '\n[patterns.error]\nstatus = "on"\n"*" = "slow"\n'
    m = load_led_map(write_map(tmp_path, text))
    assert m.states(Pattern.ERROR) == {
        "status": LedState.ON, "cloud": LedState.SLOW, "wan1": LedState.SLOW
    }


def test_every_backend_in_one_map(tmp_path: Path) -> None:
    text = """
[led.status]
backend = "pca9552"
bus = 3
address = 0x61
index = 15
[led.cloud]
backend = "panel"
device = "socket://127.0.0.1:9"
index = 1
baud = 9600
[led.link]
backend = "sysfs"
name = "x:y:z"
"""
    m = load_led_map(write_map(tmp_path, text))
    by_name = {s.name: s for s in m.leds}
    assert by_name["status"].unit == "pca9552 i2c-3 0x61" and by_name["status"].led == 15
    assert by_name["cloud"].unit == "panel socket://127.0.0.1:9"
    assert by_name["cloud"].baud == 9600
    assert by_name["link"].unit == "sysfs"


def test_board_maps_in_the_repository_load() -> None:
    maps = sorted(REPO.glob("board/*/leds.toml"))
    if not maps:
        pytest.skip("no board LED maps in this checkout")
    for path in maps:
        m = load_led_map(path)
        assert {s.name for s in m.leds} >= {"status"}, path


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ('[led.status]\nbackend = "gpio"\n', "led.status.backend", 'expected one of "sysfs"'),
        ('[led.status]\nbackend = "pca9552"\nindex = 1\n', "led.status.bus",
         "missing required field (expected an integer 0..1023)"),
        ('[led.status]\nbackend = "pca9552"\nbus = 0\naddress = 0x20\nindex = 1\n',
         "led.status.address", "expected a PCA9552 address 0x60..0x67 (set by its A2..A0 pins),"
         " got 0x20"),
        ('[led.status]\nbackend = "pca9552"\nbus = 0\nindex = 16\n', "led.status.index",
         "expected an integer 0..15, got 16"),
        ('[led.status]\nbackend = "panel"\nindex = 0\n', "led.status.device",
         "missing required field (expected a file path)"),
        ('[led.status]\nbackend = "sysfs"\nname = "a/b"\n', "led.status.name",
         'expected an LED class device name such as "socket:green:status"'),
        ('[led.status]\nbackend = "sysfs"\nname = "a"\nindex = 2\n', "led.status.index",
         "unknown key (expected one of: backend, name)"),
        ('[led.Status]\nbackend = "sysfs"\nname = "a"\n', "led.Status",
         "expected an LED name of 1..15 characters"),
        ('[led.status]\nbackend = "sysfs"\nname = "a"\n[led.cloud]\nbackend = "sysfs"\n'
         'name = "a"\n', "led.cloud.name", "the same LED as [led.status] (sysfs a)"),
        ('[led.status]\nbackend = "sysfs"\nname = "a"\n[patterns.cloud_up]\nfoo = "on"\n',
         "patterns.cloud_up.foo", "no [led.foo] in the map (known: status)"),
        ('[led.status]\nbackend = "sysfs"\nname = "a"\n[patterns.cloud_up]\nstatus = "blink"\n',
         "patterns.cloud_up.status", 'expected one of "off", "on", "slow", "fast", got "blink"'),
        ('[led.status]\nbackend = "sysfs"\nname = "a"\n[patterns.cloudy]\nstatus = "on"\n',
         "patterns.cloudy", 'unknown key (did you mean "cloud_up"?'),
        ('[led.a]\nbackend = "panel"\ndevice = "/dev/ttyS1"\nindex = 0\n[led.b]\n'
         'backend = "panel"\ndevice = "/dev/ttyS1"\nindex = 1\nbaud = 9600\n',
         "led.b.baud", "/dev/ttyS1 is used at 115200 baud by [led.a]"),
        ("", "led", "missing required table [led]"),
    ],
)
def test_map_errors_are_located(tmp_path: Path, text: str, field: str, expected: str) -> None:
    path, lines = map_errors(tmp_path, text)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: {field}: "), lines[0]
    assert expected in lines[0], lines[0]


def test_map_error_names_the_line(tmp_path: Path) -> None:
    text = '[led.status]\nbackend = "pca9552"\nbus = 0\nindex = 99\n'
    path, lines = map_errors(tmp_path, text)
    assert lines == [f"{path}: led.status.index: expected an integer 0..15, got 99 (line 4)"]


def test_unreadable_map_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LED map not found"):
        load_led_map(tmp_path / "missing.toml")
    path, lines = map_errors(tmp_path, "[led.status\n")
    assert "line 1, column" in lines[0] and "invalid TOML" in lines[0]


def test_bad_map_means_no_leds_not_a_failed_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_map(tmp_path, '[led.status]\nbackend = "nope"\n')
    assert open_leds(path) is None
    assert f"{path}: led.status.backend" in caplog.text
    assert "running without LEDs" in caplog.text


# --------------------------------------------------------------------------- choosing


def test_pattern_priority() -> None:
    assert choose_pattern(BoxState(cloud="up")) is Pattern.CLOUD_UP
    assert choose_pattern(BoxState(cloud="connecting")) is Pattern.CLOUD_DOWN
    assert choose_pattern(BoxState(cloud="down")) is Pattern.CLOUD_DOWN
    assert choose_pattern(BoxState(cloud="off")) is Pattern.RUNNING
    assert choose_pattern(BoxState(cloud="up", links_down=("wan2",))) is Pattern.LINK_FAULT
    assert choose_pattern(BoxState(links_down=("wan1",), recovery=True)) is Pattern.RECOVERY
    assert choose_pattern(BoxState(cloud="up", booting=True)) is Pattern.BOOTING
    assert choose_pattern(BoxState(booting=True, error=True, recovery=True)) is Pattern.ERROR


def test_interface_fault_reads_the_kernel() -> None:
    assert interface_fault("lo") is None
    assert interface_fault("nosuchdev0") == "no such interface"


# --------------------------------------------------------------------------- sysfs


def make_led(root: Path, name: str, max_brightness: int = 255,
             triggers: str = "[none] timer heartbeat", delays: bool = True) -> Path:
    """One LED laid out as the kernel does (delay_* exist once the timer trigger is on; the
    tree has them from the start, which a test of the missing case leaves out)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "brightness").write_text("0\n")
    (d / "max_brightness").write_text(f"{max_brightness}\n")
    (d / "trigger").write_text(triggers + "\n")
    if delays:
        (d / "delay_on").write_text("500\n")
        (d / "delay_off").write_text("500\n")
    return d


def read(d: Path, attr: str) -> str:
    return (d / attr).read_text().strip()


def test_sysfs_on_off_and_blink(tmp_path: Path) -> None:
    root = tmp_path / "leds"
    a = make_led(root, "a", max_brightness=1)
    b = make_led(root, "b")
    backend = SysfsBackend(root)

    backend.apply(Pattern.CLOUD_UP, {"a": LedState.ON, "b": LedState.SLOW})
    assert (read(a, "trigger"), read(a, "brightness")) == ("none", "1")
    assert (read(b, "trigger"), read(b, "delay_on"), read(b, "delay_off")) == (
        "timer", "500", "500"
    )

    backend.apply(Pattern.ERROR, {"a": LedState.FAST, "b": LedState.OFF})
    assert (read(a, "trigger"), read(a, "delay_on"), read(a, "delay_off")) == (
        "timer", "125", "125"
    )
    assert (read(b, "trigger"), read(b, "brightness")) == ("none", "0")


def test_sysfs_refuses_what_the_kernel_refuses(tmp_path: Path) -> None:
    root = tmp_path / "leds"
    make_led(root, "notimer", triggers="[none] heartbeat")
    make_led(root, "nodelay", delays=False)
    make_led(root, "dark", max_brightness=0)
    backend = SysfsBackend(root)
    with pytest.raises(LedError, match=r"LED 'notimer' has no 'timer' trigger \(available: none"):
        backend.apply(Pattern.BOOTING, {"notimer": LedState.SLOW})
    with pytest.raises(LedError, match=r"cannot open .*nodelay/delay_on: No such file"):
        backend.apply(Pattern.BOOTING, {"nodelay": LedState.SLOW})
    with pytest.raises(LedError, match="the LED cannot be lit"):
        backend.apply(Pattern.RUNNING, {"dark": LedState.ON})
    with pytest.raises(LedError, match=f"no LED 'gone' under {root}"):
        backend.apply(Pattern.RUNNING, {"gone": LedState.ON})
    # Nothing was created: sysfs never makes attributes on write.
    assert not (root / "gone").exists() and not (root / "nodelay" / "delay_on").exists()


def test_sysfs_does_not_restart_a_running_blink(tmp_path: Path) -> None:
    root = tmp_path / "leds"
    a = make_led(root, "a")
    backend = SysfsBackend(root)
    backend.apply(Pattern.BOOTING, {"a": LedState.SLOW})
    (a / "trigger").write_text("marker\n")
    backend.apply(Pattern.CLOUD_DOWN, {"a": LedState.SLOW})
    assert read(a, "trigger") == "marker"
    backend.forget()  # after a failure everything is written again
    backend.apply(Pattern.CLOUD_DOWN, {"a": LedState.SLOW})
    assert read(a, "trigger") == "timer"


# --------------------------------------------------------------------------- PCA9552


class Pca9552Model:
    """The PCA9552's register file as the datasheet gives it (power-on values; INPUT0/1 read
    only; no register above LS3), behind the two smbus2 calls the backend uses. `present`
    False answers like a bus with nothing at the address."""

    POWER_ON = {0x00: 0x00, 0x01: 0x00, 0x02: 0xFF, 0x03: 0x80, 0x04: 0xFF, 0x05: 0x80,
                0x06: 0x55, 0x07: 0x55, 0x08: 0x55, 0x09: 0x55}

    def __init__(self, address: int = 0x60) -> None:
        self.address = address
        self.regs = dict(self.POWER_ON)
        self.writes: list[tuple[int, int]] = []
        self.present = True
        self.closed = False

    def _check(self, addr: int, reg: int) -> None:
        if not self.present or addr != self.address:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        if reg not in self.regs:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        self._check(i2c_addr, register)
        return self.regs[register]

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._check(i2c_addr, register)
        assert 0 <= value <= 255
        self.writes.append((register, value))
        if register >= 0x02:  # INPUT0/1 ignore writes
            self.regs[register] = value

    def close(self) -> None:
        self.closed = True

    def led(self, n: int) -> int:
        return (self.regs[0x06 + n // 4] >> (2 * (n % 4))) & 0b11

    def reset(self) -> None:
        self.regs = dict(self.POWER_ON)


def test_pca9552_blink_rates_and_selectors() -> None:
    chip = Pca9552Model(0x61)
    backend = Pca9552Backend(chip, 0x61)
    backend.apply(Pattern.CLOUD_UP, {0: LedState.ON, 5: LedState.SLOW, 10: LedState.FAST,
                                     15: LedState.OFF})
    # 1 Hz and 4 Hz at half duty: period (PSC + 1) / 44 s, duty PWM / 256.
    assert chip.regs[0x02] == 43 and chip.regs[0x03] == 128
    assert chip.regs[0x04] == 10 and chip.regs[0x05] == 128
    assert (chip.led(0), chip.led(5), chip.led(10), chip.led(15)) == (0b00, 0b10, 0b11, 0b01)
    # Outputs outside the map keep their power-on selector (high impedance).
    assert all(chip.led(n) == 0b01 for n in (1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14))
    assert (0x00, 0) not in chip.writes and (0x01, 0) not in chip.writes

    chip.writes.clear()
    backend.apply(Pattern.CLOUD_DOWN, {0: LedState.OFF, 5: LedState.SLOW})
    # Rates are set once; only LS0 changed (LED 5's LS1 already says rate 0).
    assert chip.writes == [(0x06, 0x55)]


def test_pca9552_other_outputs_survive(tmp_path: Path) -> None:
    chip = Pca9552Model()
    chip.regs[0x06] = 0b00_00_00_01  # outputs 1..3 driven low by someone else (GPIO use)
    Pca9552Backend(chip).apply(Pattern.ERROR, {0: LedState.FAST})
    assert chip.regs[0x06] == 0b00_00_00_11


def test_pca9552_bus_errors_name_the_chip() -> None:
    chip = Pca9552Model()
    chip.present = False
    with pytest.raises(LedError, match="PCA9552 at the bus address 0x60: writing PSC0 failed"):
        Pca9552Backend(chip).apply(Pattern.BOOTING, {0: LedState.SLOW})
    with pytest.raises(ValueError, match="0x60..0x67"):
        Pca9552Backend(chip, 0x70)


def test_pca9552_missing_bus_device_is_a_clear_error() -> None:
    bus = 1000
    assert not Path(f"/dev/i2c-{bus}").exists()
    with pytest.raises(LedError, match=f"cannot open I2C bus /dev/i2c-{bus}: No such file"):
        Pca9552Backend(bus).apply(Pattern.BOOTING, {0: LedState.SLOW})


def pca_map(folder: Path) -> Path:
    return write_map(folder, """
[led.status]
backend = "pca9552"
bus = 0
index = 0
[led.cloud]
backend = "pca9552"
bus = 0
index = 1
""")


def test_controller_reapplies_after_chip_reset(tmp_path: Path) -> None:
    chip = Pca9552Model()
    backend = Pca9552Backend(chip)
    backend.check_every_s = 0.1
    m = load_led_map(pca_map(tmp_path))
    ctl = LedController(m, {"pca9552 i2c-0 0x60": backend})
    try:
        ctl.show(Pattern.CLOUD_UP)
        assert ctl.settle(5)
        assert (chip.led(0), chip.led(1)) == (0b00, 0b00)
        chip.reset()  # a power glitch: every LED off, rates lost
        deadline = time.monotonic() + 5
        while chip.led(0) != 0b00 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (chip.led(0), chip.led(1), chip.regs[0x02]) == (0b00, 0b00, 43)
    finally:
        ctl.close()


def test_controller_counts_failures_and_recovers(tmp_path: Path) -> None:
    chip = Pca9552Model()
    chip.present = False
    m = load_led_map(pca_map(tmp_path))
    ctl = LedController(m, {"pca9552 i2c-0 0x60": Pca9552Backend(chip)})
    try:
        ctl.show(Pattern.BOOTING)
        assert not ctl.settle(0.3)
        st = ctl.status()["backends"]["pca9552 i2c-0 0x60"]
        assert st["ok"] is False and st["failures"] >= 1 and "writing PSC0" in st["last_error"]
        chip.present = True  # the chip answers again: the retry (after 1 s) applies
        assert ctl.settle(5)
        assert chip.led(0) == 0b10
        assert ctl.status()["backends"]["pca9552 i2c-0 0x60"]["ok"] is True
    finally:
        ctl.close()


# --------------------------------------------------------------------------- the front panel


class PanelPlayer:
    """The front-panel controller, played on a TCP socket: answers OK (or ERR for LEDs in
    `refuse`), records every line, and can restart (drop the connection, greet anew)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.lines: list[str] = []
        self.refuse: set[str] = set()
        self.silent = False
        self.connections = 0
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._conn = conn
            with contextlib.suppress(OSError):
                conn.sendall(b"HELLO TP-1 1.0\n")
                self._talk(conn)
            conn.close()
            self._conn = None

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode().strip()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
                if self.silent:
                    continue
                words = line.split()
                if words[:1] == ["LED"] and words[1] in self.refuse:
                    conn.sendall(b"ERR no such LED\n")
                else:
                    conn.sendall(b"OK\n")

    def hello(self, firmware: str) -> None:
        """The panel rebooted behind a line that stayed open: it greets and forgot its LEDs."""
        assert self._conn is not None
        self._conn.sendall(f"HELLO TP-1 {firmware}\n".encode())

    def restart(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def wait_for(self, line: str, timeout: float = 5.0, after: int = 0) -> int:
        """Index of the first `line` at or after position `after`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if self.lines[i] == line:
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"panel never got {line!r}; got {self.lines}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self.restart()
        self._thread.join(5)
        self.server.close()


@pytest.fixture
def panel() -> Iterator[PanelPlayer]:
    player = PanelPlayer()
    try:
        yield player
    finally:
        player.close()


def panel_map(folder: Path, url: str, timeout_ms: int = 1000) -> Path:
    leds = "".join(
        f'[led.{name}]\nbackend = "panel"\ndevice = "{url}"\nindex = {i}\n'
        f"timeout_ms = {timeout_ms}\n"
        for i, name in enumerate(("status", "cloud", "wan1"))
    )
    return write_map(folder, leds)


def test_panel_receives_boot_and_cloud_patterns(tmp_path: Path, panel: PanelPlayer) -> None:
    ctl = LedController(load_led_map(panel_map(tmp_path, panel.url)))
    try:
        ctl.show(Pattern.BOOTING)
        assert ctl.settle(5)
        start = panel.wait_for("PATTERN booting")
        assert panel.lines[start : start + 4] == [
            "PATTERN booting", "LED 0 blink 500 500", "LED 1 off", "LED 2 off"
        ]
        ctl.show(Pattern.CLOUD_UP, {"wan1": True})
        assert ctl.settle(5)
        start = panel.wait_for("PATTERN cloud_up")
        assert panel.lines[start : start + 4] == ["PATTERN cloud_up", "LED 0 on", "LED 1 on",
                                                  "LED 2 on"]
        ctl.show(Pattern.LINK_FAULT, {"wan1": False})
        assert ctl.settle(5)
        start = panel.wait_for("PATTERN link_fault")
        assert panel.lines[start + 3] == "LED 2 blink 125 125"
        info = ctl.status()["backends"][f"panel {panel.url}"]
        assert info["ok"] is True and info["failures"] == 0 and info["opens"] == 1
    finally:
        ctl.close()


def test_panel_restart_gets_the_pattern_again(tmp_path: Path, panel: PanelPlayer) -> None:
    backend = PanelBackend(panel.url)
    backend.check_every_s = 0.2
    m = load_led_map(panel_map(tmp_path, panel.url))
    ctl = LedController(m, {f"panel {panel.url}": backend})
    try:
        ctl.show(Pattern.CLOUD_UP)
        assert ctl.settle(5)
        first = panel.wait_for("PATTERN cloud_up")
        # A reboot behind an open line: the HELLO comes in before the answer to the next
        # PING, and the pattern is sent again.
        panel.hello("1.1")
        second = panel.wait_for("PATTERN cloud_up", timeout=10, after=first + 1)
        assert "PATTERN cloud_up" not in panel.lines[first + 1 : second - 1]
        info = ctl.status()["backends"][f"panel {panel.url}"]
        # (The greeting at connect may be gone: opening a port drops what came before.)
        assert (info["model"], info["firmware"]) == ("TP-1", "1.1") and info["hellos"] >= 1
        assert info["failures"] == 0
        # A lost connection: the next PING fails, the port is opened again, and the pattern
        # is sent again.
        panel.restart()
        panel.wait_for("PATTERN cloud_up", timeout=10, after=second + 1)
        assert panel.connections == 2
        assert ctl.status()["backends"][f"panel {panel.url}"]["failures"] >= 1
    finally:
        ctl.close()


def test_panel_refusal_is_counted(tmp_path: Path, panel: PanelPlayer) -> None:
    panel.refuse.add("1")
    backend = PanelBackend(panel.url)
    with pytest.raises(LedError, match=r"panel refused 'LED 1 on': no such LED"):
        backend.apply(Pattern.CLOUD_UP, {0: LedState.ON, 1: LedState.ON})
    backend.close()


def test_silent_panel_never_blocks_show(tmp_path: Path, panel: PanelPlayer) -> None:
    panel.silent = True
    ctl = LedController(load_led_map(panel_map(tmp_path, panel.url, timeout_ms=300)))
    try:
        t0 = time.monotonic()
        for pattern in (Pattern.BOOTING, Pattern.CLOUD_DOWN, Pattern.CLOUD_UP):
            ctl.show(pattern)
        assert time.monotonic() - t0 < 0.1  # the caller's loop never waits for the panel
        assert not ctl.settle(1.0)
        info = ctl.status()["backends"][f"panel {panel.url}"]
        assert info["failures"] >= 1
        assert "no answer to 'PATTERN" in info["last_error"]
        assert "within 0.3 s" in info["last_error"]
    finally:
        ctl.close()


def test_panel_port_that_does_not_open(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again below: nothing listens there
    backend = PanelBackend(f"socket://127.0.0.1:{port}", timeout_ms=200)
    with pytest.raises(LedError, match=f"cannot open the panel port socket://127.0.0.1:{port}"):
        backend.apply(Pattern.BOOTING, {0: LedState.SLOW})
    with pytest.raises(LedError, match="cannot open the panel port /nonexistent/tty"):
        PanelBackend("/nonexistent/tty").apply(Pattern.BOOTING, {0: LedState.SLOW})


def test_panel_on_a_pty(tmp_path: Path) -> None:
    """A real serial line discipline: the panel side is the pty's master."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    received: list[str] = []

    def play() -> None:
        buf = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(received) < 3:
            try:
                buf += os.read(master, 1024)
            except OSError:
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                received.append(line.decode().strip())
                os.write(master, b"OK\r\n")

    player = threading.Thread(target=play, daemon=True)
    player.start()
    backend = PanelBackend(name)
    try:
        backend.apply(Pattern.ERROR, {0: LedState.FAST, 3: LedState.OFF})
    finally:
        backend.close()
        player.join(5)
        os.close(slave)
        os.close(master)
    assert received == ["PATTERN error", "LED 0 blink 125 125", "LED 3 off"]


def test_one_broken_backend_does_not_stop_another(tmp_path: Path) -> None:
    root = tmp_path / "leds"
    status = make_led(root, "s")
    text = (
        '[sysfs]\nroot = "leds"\n[led.status]\nbackend = "sysfs"\nname = "s"\n'
        '[led.cloud]\nbackend = "pca9552"\nbus = 1000\nindex = 0\n'
    )
    ctl = LedController(load_led_map(write_map(tmp_path, text)))
    try:
        ctl.show(Pattern.CLOUD_UP)
        assert not ctl.settle(0.5)
        assert read(status, "brightness") == "255"
        st = ctl.status()
        assert st["pattern"] == "cloud_up"
        assert st["backends"]["sysfs"]["ok"] is True
        assert st["backends"]["pca9552 i2c-1000 0x60"]["ok"] is False
        assert "/dev/i2c-1000" in st["backends"]["pca9552 i2c-1000 0x60"]["last_error"]
    finally:
        ctl.close()
