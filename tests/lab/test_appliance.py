"""socketd's LEDs and watchdog as a user of the box sees them: the front panel (played by the
test on a pty) gets the patterns for boot, a running box and a link fault, a sysfs LED follows;
the watchdog (a FIFO the test reads) is petted from the loop, not while socketd is stopped, and
disarmed only by a clean stop; socketd killed in a row is reported as a crash loop, in the
events, in status and on the LEDs."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labwait import wait_for

from sdwan.lab.topology import Lab, Site

pytestmark = pytest.mark.timeout(120)


class PtyPanel:
    """The front-panel controller on the master side of a pty: records lines, answers OK."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()  # the slave stays open: no EIO between runs
        self.device = os.ttyname(self.slave)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._play, daemon=True)
        self._thread.start()

    def _play(self) -> None:
        buf = b""
        os.set_blocking(self.master, False)
        while not self._stop.is_set():
            try:
                chunk = os.read(self.master, 4096)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:
                return
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                with self._cond:
                    self.lines.append(raw.decode(errors="replace").strip())
                    self._cond.notify_all()
                with contextlib.suppress(OSError):
                    os.write(self.master, b"OK\n")

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_for(self, line: str, after: int = 0, timeout: float = 15.0, then: int = 2) -> int:
        """Index of the first `line` from `after` on, once the `then` lines after it came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if line in self.lines[after:]:
                    at = self.lines.index(line, after)
                    if len(self.lines) > at + then:
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"panel never got {line!r}; got {self.lines[after:]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)


class FifoWatchdog:
    """A FIFO in place of /dev/watchdog, read by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def read(self) -> bytes:
        out = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 4096):
                out += chunk
        return out

    def pets(self, n: int, timeout: float) -> bytes:
        """What arrives until n pets came (a bounded wait: fails after timeout)."""
        got = bytearray()

        def enough() -> bool:
            got.extend(self.read())
            return got.count(b".") >= n

        wait_for(f"{n} watchdog pets", enough, timeout)
        return bytes(got)

    def pet_intervals(self, n: int, timeout: float) -> list[float]:
        """Seconds between n + 1 consecutive pets, timed as they arrive (looked for every
        10 ms; a bounded wait: fails after timeout)."""
        self.read()  # pets from before: their times are unknown
        times: list[float] = []
        deadline = time.monotonic() + timeout
        while len(times) < n + 1:
            assert time.monotonic() < deadline, f"{len(times)} watchdog pets in {timeout} s"
            got = self.read().count(b".")
            times.extend([time.monotonic()] * got)
            time.sleep(0.01)
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def panel() -> Iterator[PtyPanel]:
    p = PtyPanel()
    try:
        yield p
    finally:
        p.close()


def make_sysfs_led(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for attr, value in (("brightness", "0"), ("max_brightness", "1"),
                        ("trigger", "[none] timer"), ("delay_on", "0"), ("delay_off", "0")):
        (d / attr).write_text(value + "\n")
    return d


def site_with_appliance(lab: Lab, panel: PtyPanel, starts: int = 5) -> tuple[Site, Path, Path]:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    leds_root = site.dir / "leds"
    link_led = make_sysfs_led(leds_root, "lab:red:link")
    led_map = site.dir / "leds.toml"
    led_map.write_text(
        f'[sysfs]\nroot = "{leds_root}"\n'
        f'[led.status]\nbackend = "panel"\ndevice = "{panel.device}"\nindex = 0\n'
        f'[led.{site.link_name}]\nbackend = "panel"\ndevice = "{panel.device}"\nindex = 2\n'
        '[led.link]\nbackend = "sysfs"\nname = "lab:red:link"\n'
    )
    wd_path = site.dir / "watchdog"
    lab.write_site_config(
        site,
        extra_toml=(
            f'[appliance]\nwatchdog = "{wd_path}"\nwatchdog_timeout_s = 2\n'
            f'leds = "{led_map}"\ncrash_loop_starts = {starts}\ncrash_loop_window_s = 120\n'
        ),
    )
    return site, wd_path, link_led


def test_panel_patterns_link_fault_and_watchdog(lab: Lab, panel: PtyPanel) -> None:
    site, wd_path, link_led = site_with_appliance(lab, panel)
    wd = FifoWatchdog(wd_path)
    try:
        lab.start_socketd(site)
        # Boot, then running (no PoP configured) with the link up.
        first = panel.wait_for("PATTERN booting")
        assert panel.lines[first + 1] == "LED 0 blink 500 500"
        at = panel.wait_for("PATTERN running", after=first)
        assert panel.lines[at + 1 : at + 3] == ["LED 0 on", "LED 2 on"]

        lab.exec(site.ns, ["ip", "link", "set", site.wan_dev, "down"])
        at = panel.wait_for("PATTERN link_fault", after=at)
        assert panel.lines[at + 1 : at + 3] == ["LED 0 on", "LED 2 blink 125 125"]
        deadline = time.monotonic() + 5
        while (link_led / "trigger").read_text().strip() != "timer":
            assert time.monotonic() < deadline, "sysfs link LED never blinked"
            time.sleep(0.1)
        assert (link_led / "delay_on").read_text() == "125"
        lab.exec(site.ns, ["ip", "link", "set", site.wan_dev, "up"])
        panel.wait_for("PATTERN running", after=at)

        status = lab.socketctl(site, "status")["appliance"]
        assert status["watchdog"]["active"] is True and status["watchdog"]["timeout_s"] == 2
        assert status["previous_run"] == "first start" and status["crash_loop"] is False
        leds = status["leds"]["backends"]
        assert leds[f"panel {panel.device}"]["ok"] is True and leds["sysfs"]["ok"] is True

        # Pets every 2/3 s from the loop: no gap between two comes near the 2 s timeout
        # (a loop petting every 2.4 s would let the watchdog fire); none while socketd is
        # stopped, again after.
        gaps = wd.pet_intervals(3, timeout=10)
        assert max(gaps) < 1.5, f"seconds between watchdog pets: {gaps}"
        assert site.socketd is not None
        pid = site.socketd.main_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            # Fixed sleeps, on purpose: a pet that was under way lands within the first, and
            # the second is the period in which nothing may come (the watchdog's timeout).
            time.sleep(0.3)
            wd.read()
            time.sleep(2.0)
            assert wd.read() == b""
        finally:
            os.kill(pid, signal.SIGCONT)
        wd.pets(1, timeout=5)

        # A clean stop disarms the watchdog and turns the LEDs off.
        at = panel.mark()
        lab.stop_socketd(site)
        assert wd.read().endswith(b"V")
        panel.wait_for("PATTERN off", after=at, timeout=5, then=0)
    finally:
        wd.close()


def test_killed_in_a_row_is_a_crash_loop(lab: Lab, panel: PtyPanel) -> None:
    site, wd_path, _ = site_with_appliance(lab, panel, starts=3)
    wd = FifoWatchdog(wd_path)
    try:
        for _ in range(2):
            lab.start_socketd(site)
            lab.stop_socketd(site, sig=signal.SIGKILL)
            assert b"V" not in wd.read()  # a crash leaves the watchdog armed
        at = panel.mark()
        lab.start_socketd(site)
        at = panel.wait_for("PATTERN error", after=at)
        assert panel.lines[at + 1 : at + 3] == ["LED 0 blink 125 125", "LED 2 blink 125 125"]
        (loop,) = lab.socketctl(site, "events", "--kind", "socketd.crash_loop")["events"]
        assert loop["text"] == (
            "socketd started 3 times in 2 min (the runs before ended: 2 crashed);"
            " LEDs show the error pattern"
        )
        unclean = lab.socketctl(site, "events", "--kind", "socketd.unclean_end")["events"]
        assert len(unclean) == 2
        status = lab.socketctl(site, "status")["appliance"]
        assert status["crash_loop"] is True and status["previous_run"] == "crashed"
        # The error pattern holds: a running box does not hide the loop. (A fixed sleep on
        # purpose: the period in which the pattern must not change.)
        time.sleep(1.5)
        assert "PATTERN running" not in panel.lines[at:]
    finally:
        wd.close()
