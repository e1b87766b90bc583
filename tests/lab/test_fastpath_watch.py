"""A data-path thread of a real socketd dies: the event says why, status and the LEDs show it,
socketd restarts the thread and the LAN hosts talk again; a fast path that cannot be restarted
(its TUN device deleted) stops the watchdog's pets, so the box would reset. The watchdog is a
FIFO the test reads, the LED a fake sysfs LED; the thread is made to die through socketd's
fault command (SDWAN_FAULT_INJECTION=1 in its environment only), or for real."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from labwait import wait_for
from test_appliance import FifoWatchdog

from sdwan.appliance.watchdog import (
    FASTPATH_FAIL_RUNS,
    FASTPATH_FILE,
    RUN_FILE,
    fastpath_failed_runs,
)
from sdwan.common.control import CommandFailed, request
from sdwan.common.store import Store
from sdwan.lab.topology import Lab, Site

pytestmark = pytest.mark.timeout(150)


def _appliance_toml(site: Site) -> tuple[str, Path]:
    leds_root = site.dir / "leds"
    led = leds_root / "lab:red:status"
    led.mkdir(parents=True)
    for attr, value in (("brightness", "0"), ("max_brightness", "1"),
                        ("trigger", "[none] timer"), ("delay_on", "0"), ("delay_off", "0")):
        (led / attr).write_text(value + "\n")
    led_map = site.dir / "leds.toml"
    led_map.write_text(f'[sysfs]\nroot = "{leds_root}"\n'
                       '[led.status]\nbackend = "sysfs"\nname = "lab:red:status"\n')
    wd = site.dir / "watchdog"
    return (f'[appliance]\nwatchdog = "{wd}"\nwatchdog_timeout_s = 2\nleds = "{led_map}"\n', wd)


def _events(lab: Lab, site: Site, kind: str) -> list[dict]:
    return lab.socketctl(site, "events", "--kind", kind)["events"]


def _pattern(lab: Lab, site: Site) -> str | None:
    return lab.socketctl(site, "status")["appliance"]["leds"]["pattern"]


def test_a_dead_thread_is_reported_and_restarted_and_traffic_flows_again(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab.add_inet()
    lab.add_router(1)
    lab.add_router(2)
    s1, s2 = lab.add_site(1), lab.add_site(2)
    toml, wd_path = _appliance_toml(s1)
    tunnel = {"keepalive_s": 2}
    lab.write_site_config(s1, peers=[s2], tunnel=tunnel, extra_toml=toml)
    lab.write_site_config(s2, peers=[s1], tunnel=tunnel)
    wd = FifoWatchdog(wd_path)
    try:
        lab.start_socketd(s2)
        # Site 1 only takes the fault command: the lab hands its environment to the daemons.
        monkeypatch.setenv("SDWAN_FAULT_INJECTION", "1")
        lab.start_socketd(s1)
        wait_for("the LAN hosts talk", lambda: lab.ping(s1.lan_ns, s2.lan_host_ip, count=1))
        fastpath = lab.socketctl(s1, "status")["fastpath"]
        assert {t["state"] for t in fastpath["threads"]} == {"running"}
        assert [(t["thread"], t["link"]) for t in fastpath["threads"]] == [
            ("tun", None), ("link", s1.link_name)]
        assert (fastpath["deaths"], fastpath["failed"]) == (0, None)

        # Site 1's link thread, which takes the answers from site 2, dies.
        reply = request(s1.control_socket, "fault", thread=s1.link_name, errno=5)
        assert reply == {"thread": s1.link_name, "errno": 5}
        (died,) = wait_for("the death's event", lambda: _events(lab, s1, "fastpath.thread_died"))
        assert died["text"] == (
            f"fast path link {s1.link_name} thread died: fault injected:"
            " Input/output error (EIO)")
        (restarted,) = wait_for("the restart's event",
                                lambda: _events(lab, s1, "fastpath.thread_restarted"))
        assert restarted["text"].startswith(f"fast path restarted the link {s1.link_name} thread")
        assert lab.ping(s1.lan_ns, s2.lan_host_ip, count=3)
        assert lab.ping(s2.lan_ns, s1.lan_host_ip, count=3)

        # Then the TUN thread, which reads what the LAN sends.
        request(s1.control_socket, "fault", thread="tun", errno=22)
        wait_for("the TUN thread's restart",
                 lambda: len(_events(lab, s1, "fastpath.thread_restarted")) == 2)
        assert lab.ping(s1.lan_ns, s2.lan_host_ip, count=3)

        status = lab.socketctl(s1, "status")
        fastpath = status["fastpath"]
        assert {t["state"] for t in fastpath["threads"]} == {"running"}
        assert (fastpath["deaths"], fastpath["restarts"], fastpath["failed"]) == (2, 2, None)
        assert fastpath["last_death"]["thread"] == "tun"
        assert fastpath["last_death"]["reason"] == "fault injected: Invalid argument (EINVAL)"
        # The LEDs say something went wrong (for a minute after a death).
        assert status["appliance"]["leds"]["pattern"] == "error"
        text = lab.socketctl(s1, "status", json_out=False)
        assert ("fastpath 2 of 2 threads running, 2 died, 2 restarted (last: TUN thread:"
                " fault injected: Invalid argument (EINVAL))") in text
        # A restarted fast path is a healthy one: the watchdog is still petted.
        assert status["appliance"]["watchdog"]["held"] is None
        wd.read()
        wait_for("a pet after the restarts", lambda: b"." in wd.read(), timeout=10)
        # A site without fault injection has no such command.
        with pytest.raises(CommandFailed, match="unknown command"):
            request(s2.control_socket, "fault", thread="tun")
    finally:
        wd.close()


def test_a_fast_path_that_cannot_restart_stops_the_watchdog(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    toml, wd_path = _appliance_toml(site)
    lab.write_site_config(site, extra_toml=toml)
    wd = FifoWatchdog(wd_path)
    try:
        lab.start_socketd(site)
        wait_for("the running timeout, petted",
                 lambda: (lab.socketctl(site, "status")["appliance"]["watchdog"]["pets"] >= 3))
        # The TUN device deleted under the running fast path: its thread dies for real, and
        # a new one would find no device either.
        lab.exec(site.ns, ["ip", "link", "del", "sdwan0"])
        (failed,) = wait_for("the failure's event", lambda: _events(lab, site, "fastpath.failed"))
        (died,) = _events(lab, site, "fastpath.thread_died")
        assert died["text"] == (
            "fast path TUN thread died: its device went away: No such device (ENODEV)")
        assert failed["text"] == (
            "fast path could not be restarted (the TUN thread: No such device (ENODEV));"
            " no longer petting the watchdog, so the box resets")
        status = lab.socketctl(site, "status")
        assert status["fastpath"]["failed"].startswith("fast path could not be restarted")
        watchdog = status["appliance"]["watchdog"]
        assert watchdog["held"].startswith("the fast path failed: fast path could not be")
        wait_for("the LEDs' error pattern", lambda: _pattern(lab, site) == "error", timeout=10)
        text = lab.socketctl(site, "status", json_out=False)
        assert "fastpath FAILED: fast path could not be restarted" in text
        # No more pets: over more than three pet intervals (2 s / 3) nothing reaches the
        # device and the counter stands still, while socketd's loop runs and answers.
        pets = watchdog["pets"]
        wd.read()  # what came before the hold
        ticks = status["ticks"]
        watch_until = time.monotonic() + 2.5
        while time.monotonic() < watch_until:
            assert wd.read() == b"", "the watchdog was petted after the fast path failed"
            now = lab.socketctl(site, "status")
            assert now["appliance"]["watchdog"]["pets"] == pets
            time.sleep(0.2)
        assert now["ticks"] > ticks, "socketd's loop stopped: that is not what is tested"
    finally:
        wd.close()


def _stored_events(site: Site, kind: str) -> list:
    with Store(site.data_dir) as store:
        return store.events(kind=kind)


def test_without_a_watchdog_a_failed_fast_path_ends_socketd_for_init_to_restart(
    lab: Lab,
) -> None:
    """No watchdog configured: nothing would reset the box, so socketd exits with status 1
    (init starts it again, with a new TUN device). After FASTPATH_FAIL_RUNS such runs in a
    row the next one stays up instead, to be reached, with the fast path's failure shown."""
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    lab.write_site_config(site)
    daemon = lab.start_socketd(site)
    wait_for("socketd's loop", lambda: lab.socketctl(site, "status")["ticks"] > 0)
    lab.exec(site.ns, ["ip", "link", "del", "sdwan0"])
    wait_for("socketd's exit", lambda: not daemon.alive(), timeout=20)
    assert daemon.proc.returncode == 1, daemon.log_tail()
    assert "socketd: fast path failed: fast path could not be restarted" in daemon.log_tail()
    site.socketd = None
    (failed,) = _stored_events(site, "fastpath.failed")
    assert failed.text == (
        "fast path could not be restarted (the TUN thread: No such device (ENODEV));"
        " no watchdog to reset the box: socketd exits so that init starts it again")
    run = json.loads((site.data_dir / RUN_FILE).read_text())
    assert run["state"] == "ended" and run["how"].startswith("fast path failed: ")
    assert fastpath_failed_runs(site.data_dir) == 1

    # The runs before failed the same way: this one stays up and says why.
    (site.data_dir / FASTPATH_FILE).write_text(json.dumps({"runs": FASTPATH_FAIL_RUNS}))
    daemon = lab.start_socketd(site)
    assert lab.socketctl(site, "status")["appliance"]["previous_run"].startswith(
        "fast path failed: ")
    lab.exec(site.ns, ["ip", "link", "del", "sdwan0"])
    wait_for("the second failure",
             lambda: len(_events(lab, site, "fastpath.failed")) == 2)
    status = lab.socketctl(site, "status")
    assert status["fastpath"]["outcome"].startswith(
        f"it failed in the {FASTPATH_FAIL_RUNS} runs before this one too: the fast path keeps"
        " failing, so the box is not reset again and stays up")
    assert status["appliance"]["fastpath_failed_runs"] == FASTPATH_FAIL_RUNS + 1
    time.sleep(1.5)
    assert daemon.alive()
    lab.socketctl(site, "status")  # still answers
