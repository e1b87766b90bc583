"""Time sync's configuration and what socketd reads of chronyd (appliance/timesync.py): the
`[time]` checks naming the field, the chronyd configuration (no NTP or command port open),
and chronyc's CSV as chrony 4 prints it. chronyd itself runs in tests/lab/test_time.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_config import BASE, add, errors_of, write_site

from sdwan.appliance.timesync import chrony_config, parse_sources, parse_tracking
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
