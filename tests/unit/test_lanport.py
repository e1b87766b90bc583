"""The LAN port without a LAN: udhcpd's lease file read back (and survived when damaged), its
configuration written from [lan.dhcp], and the server's supervision when it cannot run."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from sdwan.appliance import lanport
from sdwan.appliance.lanport import LanPort, parse_leases, udhcpd_config
from sdwan.common.netcfg import AddrPlan, NetcfgError
from sdwan.site.config import DhcpStatic, Lan, LanDhcp
from sdwan.site.socketctl import format_lan

NOW = 1_800_000_000.0
IP = ipaddress.IPv4Address


def record(remaining: int, ip: str, mac: bytes, name: bytes = b"") -> bytes:
    return struct.pack("!I4s6s20s2x", remaining, IP(ip).packed, mac, name)


def lease_file(*records: bytes, written_at: float = NOW - 10) -> bytes:
    return struct.pack("!q", int(written_at)) + b"".join(records)


def test_leases_are_read_as_dumpleases_reads_them() -> None:
    data = lease_file(
        record(3600, "10.1.0.100", bytes.fromhex("020000000102"), b"laptop"),
        record(5, "10.1.0.101", bytes.fromhex("020000000103")),
        record(100, "0.0.0.0", bytes(6)),  # an empty slot
    )
    leases, problem = parse_leases(data, NOW)
    assert problem is None
    assert [le.to_dict() for le in leases] == [
        {"mac": "02:00:00:00:01:02", "ip": "10.1.0.100", "hostname": "laptop",
         "expires_s": 3590, "expired": False},
        {"mac": "02:00:00:00:01:03", "ip": "10.1.0.101", "hostname": None,
         "expires_s": 0, "expired": True},
    ]


@pytest.mark.parametrize(
    ("data", "count", "problem"),
    [
        (b"", 0, None),
        (b"\x00\x01", 0, "shorter than its header"),
        (lease_file(record(60, "10.1.0.100", b"\x02" * 6))[:-7], 0, "cut short"),
        # An all-0xff record is garbage (a broadcast address, a multicast MAC), not a lease.
        (lease_file(record(60, "10.1.0.100", b"\x02" * 6), b"\xff" * 40), 1, "1 damaged"),
        (lease_file(record(60, "10.1.0.100", b"\x02" * 6), b"\xff" * 40), 1, "cut short"),
        (b"\xff" * (lanport.MAX_LEASE_FILE + 1), 0, "larger than any udhcpd writes"),
    ],
)
def test_a_damaged_lease_file_is_reported_not_raised(
    data: bytes, count: int, problem: str | None
) -> None:
    leases, why = parse_leases(data, NOW)
    assert len(leases) == count
    assert (why is None) if problem is None else (problem in (why or "")), why


def test_a_lease_file_from_the_future_counts_from_now_and_names_are_made_printable() -> None:
    data = lease_file(
        record(60, "10.1.0.100", b"\x02" * 6, b"bad\x1b[2Jname\xff"), written_at=NOW + 9999
    )
    (lease,), _ = parse_leases(data, NOW)
    assert lease.expires_s == 60
    assert lease.hostname is not None and lease.hostname.isprintable(), lease


def lan(**dhcp: Any) -> Lan:
    return Lan(
        subnets=(ipaddress.ip_network("10.1.0.0/24"),),
        interface="lan0",
        address=ipaddress.IPv4Interface("10.1.0.1/24"),
        dhcp=LanDhcp(range=(IP("10.1.0.100"), IP("10.1.0.199")), **dhcp),
    )


def test_udhcpd_config_from_the_lan() -> None:
    text = udhcpd_config(
        lan(dns=(IP("192.0.2.53"), IP("192.0.2.54")), lease_s=3600,
            static=(DhcpStatic("02:00:00:00:01:02", IP("10.1.0.50"), "printer"),)),
        Path("/data/socketd/udhcpd.leases"),
        Path("/run/socketd/control-udhcpd.pid"),
    )
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines == [
        "interface lan0",
        "start 10.1.0.100",
        "end 10.1.0.199",
        "max_leases 100",
        "lease_file /data/socketd/udhcpd.leases",
        "pidfile /run/socketd/control-udhcpd.pid",
        f"auto_time {lanport.AUTO_TIME_S}",
        "option subnet 255.255.255.0",
        "option router 10.1.0.1",
        "option lease 3600",
        "option dns 192.0.2.53 192.0.2.54",
        "static_lease 02:00:00:00:01:02 10.1.0.50",
    ]


def test_a_path_udhcpd_cannot_take_is_refused() -> None:
    with pytest.raises(NetcfgError, match="white space"):
        udhcpd_config(lan(), Path("/data/my leases"), Path("/run/x.pid"))


def port(tmp_path: Path, events: list, **kwargs: Any) -> LanPort:
    applied: list[AddrPlan] = kwargs.pop("applied", [])
    return LanPort(
        kwargs.pop("lan", lan()),
        tmp_path / "data",
        tmp_path / "run",
        lambda kind, text, data: events.append((kind, text)),
        apply_worker=kwargs.pop("apply_worker", applied.append),
        **kwargs,
    )


async def settle(p: LanPort, state: str) -> dict:
    for _ in range(200):
        status = await p.handlers()["lan"]({})
        if status["dhcp"]["state"] == state:
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"never {state}: {status}")


def test_no_dhcp_server_is_said_and_socketd_goes_on(tmp_path: Path) -> None:
    events: list = []
    applied: list[AddrPlan] = []

    async def main() -> dict:
        p = port(tmp_path, events, applied=applied,
                 command=lambda: (None, "no DHCP server: neither udhcpd nor busybox is installed"))
        p.start()
        status = await settle(p, "failed")
        await p.close()
        return status

    status = asyncio.run(main())
    assert applied == [AddrPlan("lan0", 4, ["10.1.0.1/24"], None, 0)]
    assert status["address"] == "10.1.0.1/24" and status["address_error"] is None
    assert "neither udhcpd nor busybox" in status["dhcp"]["error"]
    assert status["dhcp"]["leases"] == [] and status["dhcp"]["pid"] is None
    assert ("lan.dhcp", "LAN DHCP server not started: no DHCP server: neither udhcpd nor"
            " busybox is installed") in events
    text = _formatted(status)
    assert "dhcp     failed" in text and "why      no DHCP server" in text, text
    assert "10.1.0.50" not in text and "no leases" in text


def test_a_server_that_exits_is_restarted_and_says_why(tmp_path: Path) -> None:
    events: list = []
    fake = [sys.executable, "-c", "import sys; print('udhcpd: is interface lan0 up?');"
            " sys.exit(1)", "udhcpd"]

    async def main() -> dict:
        p = port(tmp_path, events, command=lambda: (fake, None))
        p.start()
        status = await settle(p, "restarting")
        await p.close()
        return status

    status = asyncio.run(main())
    assert status["dhcp"]["error"] == "udhcpd exited with status 1: udhcpd: is interface lan0 up?"
    assert status["dhcp"]["retry_in_s"] is not None
    # The configuration it was given is udhcpd's, from [lan.dhcp].
    conf = (tmp_path / "run" / "socketd-udhcpd.conf").read_text()
    assert "interface lan0" in conf and "start 10.1.0.100" in conf


def test_an_address_that_cannot_be_applied_is_retried_and_the_server_waits(
    tmp_path: Path,
) -> None:
    events: list = []

    def fail(_plan: AddrPlan) -> None:
        raise NetcfgError("device lan0 does not exist")

    async def main() -> dict:
        p = port(tmp_path, events, apply_worker=fail, command=lambda: (["true"], None))
        p.start()
        status = await settle(p, "waiting")
        await p.close()
        return status

    status = asyncio.run(main())
    assert status["address_error"] == "10.1.0.1/24 not applied to lan0: device lan0 does not exist"
    assert status["dhcp"]["error"] == "waiting for the LAN address"
    assert "error    10.1.0.1/24 not applied" in _formatted(status)


def test_a_lan_without_an_address_is_left_alone(tmp_path: Path) -> None:
    events: list = []
    applied: list[AddrPlan] = []
    plain = Lan(subnets=(ipaddress.ip_network("10.1.0.0/24"),), interface="lan0")

    async def main() -> dict:
        p = port(tmp_path, events, lan=plain, applied=applied)
        p.start()
        status = await p.handlers()["lan"]({})
        await p.close()
        return status

    status = asyncio.run(main())
    assert applied == [] and events == []
    assert status["address"] is None and status["dhcp"] == {"enabled": False, "state": "off"}
    assert "not set by socketd" in _formatted(status)


def _formatted(status: dict) -> str:
    import io

    out = io.StringIO()
    format_lan(status, out)
    return out.getvalue()


def test_a_host_name_from_the_network_reaches_the_terminal_escaped() -> None:
    status = {
        "interface": "lan0", "state": "up", "address": "10.1.0.1/24",
        "addresses": ["10.1.0.1/24"], "subnets": ["10.1.0.0/24"], "address_error": None,
        "dhcp": {
            "enabled": True, "state": "running", "pid": 7, "up_s": 3.0, "error": None,
            "retry_in_s": None, "restarts": 0, "range": ["10.1.0.100", "10.1.0.199"],
            "router": "10.1.0.1", "dns": [], "lease_s": 600, "static": [],
            "leases": [{"mac": "02:00:00:00:01:02", "ip": "10.1.0.100",
                        "hostname": "evil\x1b[2J\nfake 10.1.0.9", "expires_s": 30,
                        "expired": False, "static": False}],
            "leases_error": None,
        },
    }
    text = _formatted(status)
    assert "\x1b" not in text and "\\x1b[2J" in text, text
    assert not any(line.startswith("fake") for line in text.splitlines()), text
    assert "10.1.0.100" in text and "dynamic" in text and "30.0s" in text, text


def test_records_outside_the_lan_or_with_a_multicast_mac_are_skipped_and_counted() -> None:
    data = lease_file(
        record(60, "10.1.0.100", b"\x02" * 6),
        record(60, "10.9.0.100", b"\x02" * 6),  # not this LAN's
        record(60, "10.1.0.101", b"\x01\x00\x5e\x00\x00\x01"),  # a multicast MAC
    )
    leases, why = parse_leases(data, NOW, ipaddress.ip_network("10.1.0.0/24"))
    assert [le.ip for le in leases] == ["10.1.0.100"]
    assert why is not None and "2 damaged record(s) skipped" in why, why


def test_a_lease_file_being_written_is_read_once_whole(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "udhcpd.leases"
    whole = lease_file(record(60, "10.1.0.100", b"\x02" * 6), record(60, "10.1.0.101", b"\x02" * 6))
    path.write_bytes(whole[:30])  # truncated, then the first lease half written
    finish = threading.Timer(0.1, path.write_bytes, (whole,))
    finish.start()
    try:
        data = lanport.read_lease_file(path, pause=0.02, tries=50)
    finally:
        finish.join()
    assert data == whole


def test_a_removed_address_is_put_back_while_socketd_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list = []
    applied: list[AddrPlan] = []
    on_port: list[str] = []

    def apply(plan: AddrPlan) -> None:
        applied.append(plan)
        on_port[:] = plan.addresses

    monkeypatch.setattr(lanport, "observe", lambda _dev: {"addresses": list(on_port),
                                                          "state": "up"})
    monkeypatch.setattr(lanport, "WATCH_S", 0.02)
    plain = Lan(subnets=(ipaddress.ip_network("10.1.0.0/24"),), interface="lan0",
                address=ipaddress.IPv4Interface("10.1.0.1/24"))

    async def main() -> None:
        p = port(tmp_path, events, lan=plain, apply_worker=apply)
        p.start()
        for _ in range(100):
            if on_port:
                break
            await asyncio.sleep(0.01)
        on_port.clear()  # `ip addr flush dev lan0`
        for _ in range(100):
            if on_port:
                break
            await asyncio.sleep(0.01)
        await p.close()

    asyncio.run(main())
    assert len(applied) == 2 and on_port == ["10.1.0.1/24"]
    assert ("lan.address", "LAN port lan0: 10.1.0.1/24 restored (it had been removed)") in events


def test_a_server_that_cannot_be_executed_is_said_in_the_events(tmp_path: Path) -> None:
    events: list = []

    async def main() -> dict:
        p = port(tmp_path, events, command=lambda: ([str(tmp_path / "no-udhcpd")], None))
        p.start()
        status = await settle(p, "restarting")
        await p.close()
        return status

    status = asyncio.run(main())
    assert "cannot start" in status["dhcp"]["error"]
    assert any(kind == "lan.dhcp" and "cannot start" in text for kind, text in events), events
