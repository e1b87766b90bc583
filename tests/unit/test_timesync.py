"""Time sync's configuration and what socketd reads of chronyd (appliance/timesync.py): the
`[time]` checks naming the field, the chronyd configuration (no NTP or command port open),
chronyc's CSV as chrony 4 prints it, and what status says as chronyd runs, stops or is not
there (a real chronyd that measures only; tests/lab/test_time.py has one synchronise)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from test_config import BASE, add, errors_of, write_site

from sdwan.appliance import timesync
from sdwan.appliance.timesync import TimeSync, chrony_config, parse_sources, parse_tracking
from sdwan.site.config import Time, load_config

TRACKING_SYNCED = ("0A4D0001,10.77.0.1,9,1796233535.508259962,-0.000003439,0.000003645,"
                   "0.000003645,-0.241,-0.000,766.387,0.000017578,0.000925254,0.0,Normal\n")
TRACKING_NONE = ("00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,"
                 "0.000,1.000000000,1.000000000,0.0,Not synchronised\n")
SOURCES = ("^,*,10.77.0.1,8,6,7,1,0.000001962,0.000005607,0.000009143\n"
           "^,?,198.51.100.250,0,6,0,-,0.000000000,0.000000000,0.000000000\n")


def test_time_defaults_and_values(tmp_path: Path) -> None:
    assert load_config(write_site(tmp_path)).time == Time()
    cfg = load_config(write_site(tmp_path, BASE + '\n[time]\nservers = ["ntp.example.net", '
                                 '"192.0.2.1", "2001:db8::1"]\nset_clock = false\n'))
    assert cfg.time == Time(("ntp.example.net", "192.0.2.1", "2001:db8::1"), set_clock=False)


@pytest.mark.parametrize(("edit", "field", "expected"), [
    (add('\n[time]\nservers = "ntp.example.net"\n'), "time.servers",
     "expected a list of at most 8 NTP server names or addresses"),
    (add('\n[time]\nservers = ["-x"]\n'), "time.servers",
     'expected an NTP server\'s host name or address, got "-x"'),
    (add('\n[time]\nservers = ["ntp example"]\n'), "time.servers",
     "expected an NTP server's host name or address"),
    (add('\n[time]\nservers = ["300.1.1.1"]\n'), "time.servers", "is not an IP address"),
    (add('\n[time]\nservers = ["a.net", "a.net"]\n'), "time.servers", "is listed twice"),
    (add("\n[time]\nservers = [" + ", ".join(f'"s{i}.net"' for i in range(9)) + "]\n"),
     "time.servers", "at most 8"),
    (add('\n[time]\nset_clock = "yes"\n'), "time.set_clock", "expected true or false"),
    (add('\n[time]\nserver = ["a.net"]\n'), "time.server", 'did you mean "servers"'),
], ids=["not-a-list", "option-like", "space", "bad-ip", "twice", "too-many", "set-clock",
        "typo"])
def test_wrong_time_field_is_named(
    tmp_path: Path, edit: Callable[[str], str], field: str, expected: str,
) -> None:
    path, message = errors_of(tmp_path, edit(BASE))
    (line,) = message.splitlines()
    assert line.startswith(f"{path}: {field}: "), line
    assert expected in line, line


def test_chronyd_opens_no_port_and_sets_the_rtc_only_when_it_sets_the_clock(
    tmp_path: Path,
) -> None:
    conf = chrony_config(Time(("a.net", "192.0.2.1")), tmp_path / "s", tmp_path / "d")
    lines = conf.splitlines()
    assert "server a.net iburst" in lines and "server 192.0.2.1 iburst" in lines
    assert "port 0" in lines and "cmdport 0" in lines and "rtcsync" in lines
    assert f"bindcmdaddress {tmp_path / 's' / 'chronyd.sock'}" in lines
    assert f"driftfile {tmp_path / 'd' / 'chrony.drift'}" in lines
    assert "rtcsync" not in chrony_config(Time(("a.net",), set_clock=False), tmp_path, tmp_path)


def test_chronyc_tracking_and_sources_are_read() -> None:
    t = parse_tracking(TRACKING_SYNCED)
    assert t.synced and t.reference == "10.77.0.1" and t.stratum == 9
    assert t.offset_s == pytest.approx(0.000003439)
    n = parse_tracking(TRACKING_NONE)
    assert not n.synced and n.reference is None and n.offset_s is None
    with pytest.raises(ValueError, match="unexpected chronyc tracking output"):
        parse_tracking("506 Cannot talk to daemon\n")
    assert parse_sources(SOURCES) == [
        {"address": "10.77.0.1", "state": "selected", "stratum": 8, "reach": 7},
        {"address": "198.51.100.250", "state": "unreachable", "stratum": 0, "reach": 0},
    ]


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, kind: str, text: str, _data: dict) -> None:
        self.items.append((kind, text))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.items]


async def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


def test_without_chronyd_installed_why_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(timesync, "_SBIN", ())
    events = Events()

    async def main() -> None:
        ts = TimeSync(Time(("192.0.2.1",), set_clock=False), tmp_path, tmp_path, events)
        ts.start()
        await _wait(lambda: ts.child.st.state == "failed")
        await ts.poll_once()
        st = ts.status()
        assert st["synced"] is False and not ts.clock_synced
        assert st["why"] == "chronyd is not running: chronyd is not installed", st
        assert events.kinds() == ["time.error"], events.items
        await ts.close()

    asyncio.run(main())


def test_a_chronyd_that_stops_is_no_longer_synchronised_and_said_so(tmp_path: Path) -> None:
    """A real chronyd (measuring only, -x) toward a server that never answers: not
    synchronised, and why. Once it was synchronised, chronyd stopping clears the reading
    (status says synced false, `time.unsynced` is recorded) and a later synchronisation is
    said again."""
    if timesync._find("chronyd") is None or timesync._find("chronyc") is None:  # noqa: SLF001
        pytest.skip("chrony is not installed")
    events = Events()

    async def main() -> None:
        ts = TimeSync(Time(("192.0.2.1",), set_clock=False), tmp_path / "data",
                      tmp_path / "run", events, tag="t")
        (tmp_path / "data").mkdir()
        ts.start()
        await _wait(lambda: ts.child.running)

        async def read() -> bool:
            await ts.poll_once()
            return ts.read_error is None and bool(ts.sources)

        for _ in range(100):
            if await read():
                break
            await asyncio.sleep(0.1)
        st = ts.status()
        assert st["synced"] is False and st["sources"][0]["address"] == "192.0.2.1", st
        assert st["why"] in ("no server has answered (1 asked)",
                             "waiting for enough answers to trust a server"), st
        # As chronyd would say once synchronised (no server answers here, so it is told).
        ts._transition(parse_tracking(TRACKING_SYNCED))  # noqa: SLF001
        ts.tracking = parse_tracking(TRACKING_SYNCED)
        assert ts.status()["synced"] is True and events.kinds() == ["time.synced"]
        await ts.child.close()  # chronyd gone
        await ts.poll_once()
        st = ts.status()
        assert st["synced"] is False and st["reference"] is None, st
        assert st["why"].startswith("chronyd is not running"), st
        assert events.kinds() == ["time.synced", "time.unsynced"], events.items
        ts._transition(parse_tracking(TRACKING_SYNCED))  # noqa: SLF001
        assert events.kinds() == ["time.synced", "time.unsynced", "time.synced"]
        await ts.close()

    asyncio.run(main())


def test_chronyc_failing_clears_the_reading(tmp_path: Path) -> None:
    """chronyd running but not answering chronyc (here: a program that only sleeps in its
    place): the last reading is not kept as current."""
    events = Events()

    async def main() -> None:
        ts = TimeSync(Time(("192.0.2.1",), set_clock=True), tmp_path, tmp_path / "run",
                      events, tag="t")
        ts.child.argv = lambda: (["/bin/sleep", "60"], None)
        ts.child.start()
        await _wait(lambda: ts.child.running)
        ts.tracking = parse_tracking(TRACKING_SYNCED)
        ts._transition(ts.tracking)  # noqa: SLF001
        assert ts.clock_synced
        await ts.poll_once()  # chronyc finds no chronyd socket
        st = ts.status()
        assert st["synced"] is False and not ts.clock_synced and ts.read_error, st
        assert st["why"] == ts.read_error
        assert events.kinds() == ["time.synced", "time.unsynced"], events.items
        await ts.close()

    asyncio.run(main())


def test_a_lab_site_config_never_sets_the_host_clock() -> None:
    from sdwan.lab.topology import _lab_time

    assert load_time(_lab_time('[time]\nservers = ["10.0.0.1"]\n')) == {
        "servers": ["10.0.0.1"], "set_clock": False}
    kept = '[time]\nservers = ["10.0.0.1"]\nset_clock = false\n'
    assert _lab_time(kept) == kept
    assert _lab_time('[[pops]]\nid = 1\n') == '[[pops]]\nid = 1\n'
    with pytest.raises(ValueError, match="must not set the host's clock"):
        _lab_time('[time]\nservers = ["10.0.0.1"]\nset_clock = true\n')


def load_time(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)["time"]


def test_a_command_socket_too_long_for_an_address_gets_a_short_directory(tmp_path: Path) -> None:
    from sdwan.appliance.timesync import MAX_SOCKET_PATH, chrony_dir

    short = tmp_path / "run" / "control-chrony"
    assert chrony_dir(short) == short
    deep = tmp_path.joinpath(*["a-long-directory-name"] * 6, "control-chrony")
    got = chrony_dir(deep)
    assert got != deep and len(str(got / "chronyd.sock")) <= MAX_SOCKET_PATH
    assert chrony_dir(deep) == got  # the same one every time
