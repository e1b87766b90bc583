"""The wall clock's floor (appliance/clock.py): the time socketd stores in its data dir, while
NTP vouches for it (even behind the floor) or a DTLS session does (then only between the build
time and our certificate's notAfter), and what it reports of the move rcS made at boot. The
files are real; the wall clock is a value, since this host's own clock is not ours to move
(the image test boots with an RTC that lost its time)."""

from __future__ import annotations

from pathlib import Path

from sdwan.appliance.clock import CLOCK_FILE, MAX_AHEAD_S, STORE_EVERY_S, ClockFloor

BUILD = 1_790_000_000  # 2026-09-21
CERT_END = BUILD + 800 * 86400  # our certificate's notAfter
Y2001 = 978_307_200


class Clocks:
    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 50.0

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


def make(tmp_path: Path, clocks: Clocks, build: int | None = BUILD) -> ClockFloor:
    build_file = tmp_path / "build-time"
    if build is not None:
        build_file.write_text(f"{build}\n")
    return ClockFloor(tmp_path, build_time=build_file, mark=tmp_path / "clock-floor",
                      wall=lambda: clocks.wall, clock=lambda: clocks.mono)


def test_the_time_is_stored_only_while_trusted_and_then_every_period(tmp_path: Path) -> None:
    clocks = Clocks(BUILD + 1000.0)
    cf = make(tmp_path, clocks)
    cf.tick(False, False, CERT_END)
    assert not (tmp_path / CLOCK_FILE).exists()
    cf.tick(False, True, CERT_END)
    assert (tmp_path / CLOCK_FILE).read_text() == f"{BUILD + 1000}\n"
    clocks.advance(STORE_EVERY_S - 1)
    cf.tick(False, True, CERT_END)
    assert (tmp_path / CLOCK_FILE).read_text() == f"{BUILD + 1000}\n"
    clocks.advance(1)
    cf.tick(False, True, CERT_END)
    assert (tmp_path / CLOCK_FILE).read_text() == f"{BUILD + 1000 + int(STORE_EVERY_S)}\n"
    # A new start reads it back as the floor, the later of it and the build time.
    again = make(tmp_path, clocks)
    assert again.floor() == (BUILD + 1000 + int(STORE_EVERY_S), "the last stored time")
    assert not list(tmp_path.glob("*.tmp"))


def test_a_clock_behind_its_floor_is_never_stored_and_is_reported(tmp_path: Path) -> None:
    (tmp_path / CLOCK_FILE).write_text(f"{BUILD + 5000}\n")
    clocks = Clocks(float(Y2001))
    cf = make(tmp_path, clocks)
    cf.tick(False, True, CERT_END)
    cf.store(False, CERT_END)
    assert (tmp_path / CLOCK_FILE).read_text() == f"{BUILD + 5000}\n"
    (ev,) = cf.at_start()
    assert ev.kind == "clock.behind"
    assert "2001-01-01" in ev.text and "the last stored time" in ev.text, ev.text


def test_the_move_made_at_boot_is_reported_with_what_the_rtc_said(tmp_path: Path) -> None:
    clocks = Clocks(BUILD + 30.0)
    cf = make(tmp_path, clocks)
    (tmp_path / "clock-floor").write_text(f"{Y2001 + 7} {BUILD} the build time\n")
    (ev,) = cf.at_start()
    assert ev.kind == "clock.floor"
    # Said once per boot: the note is renamed, and a restart of socketd shows it, silently.
    assert not (tmp_path / "clock-floor").exists()
    again = make(tmp_path, clocks)
    assert again.at_start() == []
    assert again.status()["moved_at_boot"] == cf.status()["moved_at_boot"]
    assert ev.text.startswith("the clock read 2001-01-01 00:00:07 UTC at boot, behind the "
                              "build time: moved to 2026-09-21"), ev.text
    st = cf.status()
    assert st["moved_at_boot"]["source"] == "the build time"
    assert st["floor_source"] == "the build time" and st["stored"] is None


def test_bad_files_are_no_floor(tmp_path: Path) -> None:
    (tmp_path / CLOCK_FILE).write_text("soon\n")
    (tmp_path / "clock-floor").write_text("garbage")
    clocks = Clocks(float(Y2001))
    cf = make(tmp_path, clocks, build=None)
    assert cf.floor() is None
    assert cf.at_start() == []
    assert cf.status()["floor"] is None


def test_ntp_brings_a_floor_made_from_a_wrong_time_back_down(tmp_path: Path) -> None:
    ahead = BUILD + 200 * 86400  # a clock once months ahead, stored while a session was up
    (tmp_path / CLOCK_FILE).write_text(f"{ahead}\n")
    clocks = Clocks(BUILD + 1000.0)
    cf = make(tmp_path, clocks)
    cf.tick(False, False, CERT_END)  # nothing vouches for the clock: nothing stored
    assert (tmp_path / CLOCK_FILE).read_text() == f"{ahead}\n"
    cf.tick(True, False, CERT_END)  # chronyd synchronised the clock: it wins
    assert (tmp_path / CLOCK_FILE).read_text() == f"{BUILD + 1000}\n"
    assert make(tmp_path, clocks).floor() == (BUILD + 1000, "the last stored time")
    # NTP is taken past what a session could vouch for (our certificate has expired).
    late = Clocks(CERT_END + 5.0)
    make(tmp_path, late).tick(True, True, CERT_END)
    assert (tmp_path / CLOCK_FILE).read_text() == f"{CERT_END + 5}\n"


def test_a_session_vouches_only_between_the_build_time_and_our_certificates_end(
    tmp_path: Path,
) -> None:
    for wall in (BUILD - 10.0, CERT_END + 10.0):
        clocks = Clocks(wall)
        cf = make(tmp_path, clocks)
        cf.tick(False, True, CERT_END)
        cf.store(False, CERT_END)
        assert not (tmp_path / CLOCK_FILE).exists(), wall
    cf = make(tmp_path, Clocks(CERT_END - 10.0))
    cf.tick(False, True, CERT_END)
    assert (tmp_path / CLOCK_FILE).read_text() == f"{CERT_END - 10}\n"


def test_a_stored_time_absurdly_far_after_the_build_time_is_ignored(tmp_path: Path) -> None:
    (tmp_path / CLOCK_FILE).write_text(f"{BUILD + MAX_AHEAD_S + 1}\n")
    cf = make(tmp_path, Clocks(BUILD + 10.0))
    assert cf.floor() == (BUILD, "the build time")
