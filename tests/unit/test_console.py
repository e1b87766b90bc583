"""The console's logic without a terminal or socketd: its command language (parsing, errors,
completion), the credential file and the password rules, the WAN addressing checks shared with
socketd, and the console itself over pipes (the forced password change comes before any
command; no socketd is a message, not a failure)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sdwan.appliance import console
from sdwan.appliance.console import (
    Command,
    CredentialError,
    Credentials,
    CredentialStore,
    UsageError,
    check_new_password,
    completions,
    delay_left,
    fail_delay,
    parse,
)
from sdwan.appliance.wanaddr import WanAddressing, prefix_of
from sdwan.common.addressing import Addressing, parse_static
from sdwan.common.store import Store
from sdwan.site.config import Link

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("show status", Command("show", {"topic": "status"})),
        ("  show   links  ", Command("show", {"topic": "links"})),
        ("show events", Command("show", {"topic": "events", "limit": 20})),
        ("show events 5", Command("show", {"topic": "events", "limit": 5})),
        ("show log", Command("show", {"topic": "log", "limit": 20})),
        ("show log 100", Command("show", {"topic": "log", "limit": 100})),
        ("ping 8.8.8.8", Command("ping", {"link": None, "host": "8.8.8.8", "count": 4})),
        (
            "ping -c 2 via wan1 example.net",
            Command("ping", {"link": "wan1", "host": "example.net", "count": 2}),
        ),
        (
            "ping 2001:db8::1 via wan2",
            Command("ping", {"link": "wan2", "host": "2001:db8::1", "count": 4}),
        ),
        ("traceroute via wan1 1.1.1.1", Command("traceroute", {"link": "wan1", "host": "1.1.1.1"})),
        (
            "set link wan1 static 100.64.1.20/24 100.64.1.1",
            Command(
                "set-link",
                {
                    "link": "wan1",
                    "mode": "static",
                    "address": "100.64.1.20/24",
                    "gateway": "100.64.1.1",
                },
            ),
        ),
        ("set link wan2 dhcp", Command("set-link", {"link": "wan2", "mode": "dhcp"})),
        ("factory-reset", Command("factory-reset")),
        ("reboot", Command("reboot")),
        ("help", Command("help", {"topic": None})),
        ("help ping", Command("help", {"topic": "ping"})),
        ("exit", Command("exit")),
        ("logout", Command("exit")),
    ],
)
def test_commands_parse(line: str, expected: Command) -> None:
    assert parse(line) == expected


@pytest.mark.parametrize("line", ["", "   ", "\t"])
def test_empty_lines_are_nothing(line: str) -> None:
    assert parse(line) is None


@pytest.mark.parametrize(
    ("line", "message", "usage"),
    [
        ("bogus", "unknown command 'bogus'; type help for the commands", None),
        ("sho status", "unknown command 'sho' (did you mean show?)", None),
        ("show", "show what? one of status, links, lan, pop, peers, mesh, rules, recovery,"
         " firewall, events",
         "show status"),
        ("show routes", "cannot show 'routes'", "show status"),
        ("show status now", "show status takes nothing more, got 'now'", "show status"),
        ("show events x", "the count must be a number 1..10000, got 'x'", "show status"),
        ("show events 0", "the count must be a number 1..10000, got '0'", "show status"),
        ("show events 5 6", "show events takes at most a count", "show status"),
        ("show log 1 2", "show log takes at most a count", "show status"),
        ("ping", "ping needs a host", "ping [-c N]"),
        ("ping -c", "-c needs a count", "ping [-c N]"),
        ("ping -c 101 h", "the count must be a number 1..100, got '101'", "ping [-c N]"),
        ("ping -c -1 h", "the count must be a number 1..100, got '-1'", "ping [-c N]"),
        ("ping via", "via needs a link name", "ping [-c N]"),
        ("ping via WAN1 h", "not a link name: 'WAN1'", "ping [-c N]"),
        ("ping via wan1 via wan2 h", "via given twice", "ping [-c N]"),
        ("ping -f h", "unknown option '-f'", "ping [-c N]"),
        ("ping a b", "one host only, got 'a' and 'b'", "ping [-c N]"),
        ("ping h;reboot", "not a host name or address: 'h;reboot'", "ping [-c N]"),
        ("ping $(id)", "not a host name or address", "ping [-c N]"),
        ("traceroute", "traceroute needs a host", "traceroute [via LINK]"),
        ("traceroute -c 1 h", "traceroute has no option -c", "traceroute [via LINK]"),
        ("set", "only links can be set", "set link LINK"),
        ("set route", "only links can be set", "set link LINK"),
        ("set link", "set link needs a link name and static or dhcp", "set link LINK"),
        ("set link wan1", "set link needs a link name and static or dhcp", "set link LINK"),
        ("set link wan1 pppoe", "mode must be static or dhcp, got 'pppoe'", "set link LINK"),
        ("set link wan1 dhcp now", "set link wan1 dhcp takes nothing more", "set link LINK"),
        ("set link wan1 static", "static needs ADDR/PREFIX and GATEWAY", "set link LINK"),
        (
            "set link wan1 static 10.0.0.2/24",
            "static needs ADDR/PREFIX and GATEWAY",
            "set link LINK",
        ),
        ("set link w@n static 10.0.0.2/24 10.0.0.1", "not a link name: 'w@n'", "set link LINK"),
        (
            "set link wan1 static 10.0.0.2 10.0.0.1",
            "expected an address with its prefix length such as 100.64.1.2/24",
            "set link LINK",
        ),
        (
            "set link wan1 static 10.0.0.2/24 10.0.1.1",
            "gateway 10.0.1.1 is not inside 10.0.0.0/24",
            "set link LINK",
        ),
        ("help me", "no command 'me'", "help [COMMAND]"),
        ("help ping show", "help takes at most one command", "help [COMMAND]"),
        ("exit now", "exit takes no arguments, got 'now'", "exit"),
        ("reboot -f", "reboot takes no arguments, got '-f'", "reboot"),
        ("factory-reset yes", "factory-reset takes no arguments", "factory-reset"),
        ("show\x1b[A status", "the line holds control characters", None),
    ],
)
def test_bad_input_says_why_and_how(line: str, message: str, usage: str | None) -> None:
    with pytest.raises(UsageError) as info:
        parse(line)
    assert message in info.value.message
    if usage is None:
        assert info.value.usage is None
    else:
        assert info.value.usage is not None and info.value.usage.startswith(usage)


def test_every_command_has_help() -> None:
    for name, h in console.COMMANDS.items():
        assert h.usage.startswith(name if name != "set" else "set link"), name
        assert h.text


# --------------------------------------------------------------------------- completion

LINKS = ["wan1", "wan2", "lte"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", sorted(console.COMMANDS)),
        ("s", ["set", "show"]),
        ("sh", ["show"]),
        ("show ", ["events", "firewall", "lan", "links", "log", "mesh", "peers", "pop", "recovery",
                   "rules", "slots", "status"]),
        ("show p", ["peers", "pop"]),
        ("show status ", []),
        ("help ", sorted(console.COMMANDS)),
        ("help fa", ["factory-reset"]),
        ("set ", ["link"]),
        ("set link ", ["lte", "wan1", "wan2"]),
        ("set link w", ["wan1", "wan2"]),
        ("set link wan1 ", ["dhcp", "static"]),
        ("set link wan1 s", ["static"]),
        ("set link wan1 static ", []),
        ("ping ", ["-c", "via"]),
        ("ping via ", ["lte", "wan1", "wan2"]),
        ("ping via l", ["lte"]),
        ("ping -c ", []),
        ("ping -c 3 ", ["via"]),
        ("ping via wan1 ", ["-c"]),
        ("traceroute ", ["via"]),
        ("traceroute via wan1 ", []),
        ("reboot ", []),
        ("bogus ", []),
    ],
)
def test_completion_candidates(line: str, expected: list[str]) -> None:
    assert completions(line, LINKS) == expected


def test_completion_without_socketd_offers_no_links() -> None:
    assert completions("set link ", []) == []


# --------------------------------------------------------------------------- credentials


def test_default_credential_is_admin_admin_and_must_change() -> None:
    creds = Credentials.default()
    assert creds.must_change
    assert creds.verify("admin", "admin")
    assert not creds.verify("admin", "Admin")
    assert not creds.verify("root", "admin")


def test_missing_file_gives_the_default_without_writing(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "data")
    creds = store.load()
    assert creds.must_change and creds.verify("admin", "admin")
    assert not store.path.exists()


def test_saved_credential_is_hashed_private_and_round_trips(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "data")
    creds = Credentials.default().with_password("correct horse")
    store.save(creds)
    text = store.path.read_text()
    assert "correct horse" not in text and 'admin"' in text
    doc = json.loads(text)
    assert doc["scrypt"] == {"n": 2**14, "r": 8, "p": 1}
    assert len(bytes.fromhex(doc["hash"])) == 32 and len(bytes.fromhex(doc["salt"])) == 16
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temp file
    loaded = store.load()
    assert loaded == creds
    assert not loaded.must_change
    assert loaded.verify("admin", "correct horse") and not loaded.verify("admin", "admin")


def test_same_password_gets_a_new_salt_and_hash() -> None:
    a = Credentials.make("admin", "same password")
    b = Credentials.make("admin", "same password")
    assert a.salt != b.salt and a.hash != b.hash


def test_a_failed_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CredentialStore(tmp_path)
    old = Credentials.make("admin", "first password")
    store.save(old)

    def power_cut(*_args: object) -> None:  # the rename never happens
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(console.os, "replace", power_cut)
    with pytest.raises(CredentialError, match="cannot write .*Input/output error"):
        store.save(old.with_password("second password"))
    monkeypatch.undo()
    assert store.load() == old
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "damaged"),
        ("{not json", "damaged"),
        ("[]", "not a version 1 credential document"),
        ('{"version": 2}', "not a version 1 credential document"),
        ('{"version": 1, "user": "admin"}', "missing or malformed field"),
        (
            '{"version": 1, "user": "admin", "scrypt": {"n": 3, "r": 8, "p": 1},'
            ' "salt": "00112233445566778899", "hash": "' + "00" * 32 + '", "must_change": false}',
            "scrypt parameters out of range",
        ),
        (
            '{"version": 1, "user": "admin", "scrypt": {"n": 16384, "r": 8, "p": 1},'
            ' "salt": "zz", "hash": "00", "must_change": false}',
            "missing or malformed field",
        ),
    ],
)
def test_a_damaged_file_never_reopens_the_default(tmp_path: Path, content: str, why: str) -> None:
    store = CredentialStore(tmp_path)
    store.path.write_text(content)
    with pytest.raises(CredentialError, match=why):
        store.load()


def test_unwritable_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(CredentialError, match=f"cannot write {blocker}/console-credentials.json"):
        CredentialStore(blocker).save(Credentials.default())


@pytest.mark.parametrize(
    ("new", "again", "why"),
    [
        ("longenough1", "longenough2", "the two passwords differ"),
        ("short", "short", "too short: at least 8 characters"),
        ("x" * 129, "x" * 129, "too long: at most 128 characters"),
        ("tab\there!!", "tab\there!!", "only printable characters"),
        ("ADMIN", "ADMIN", "too short"),
        ("current-pass", "current-pass", "not the current password"),
    ],
)
def test_password_rules(new: str, again: str, why: str) -> None:
    creds = Credentials.make("admin", "current-pass")
    with pytest.raises(ValueError, match=why):
        check_new_password(new, again, creds)


def test_password_may_not_be_the_user_name() -> None:
    creds = Credentials.make("engineer", "current-pass")
    with pytest.raises(ValueError, match="not the default password or the user name"):
        check_new_password("ENGINEER", "ENGINEER", creds)
    check_new_password("a good passphrase", "a good passphrase", creds)


def test_failed_logins_wait_longer_each_time_up_to_a_bound() -> None:
    delays = [fail_delay(n) for n in range(1, 10)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert fail_delay(0) == 0.0 and fail_delay(10**6) == 60.0


def test_the_delay_left_by_an_earlier_console() -> None:
    creds = replace(Credentials.make("admin", "x" * 8), failed=3, failed_at=1000.0)  # owes 4 s
    assert delay_left(creds, 1000.0) == 4.0
    assert delay_left(creds, 1003.0) == 1.0
    assert delay_left(creds, 1010.0) == 0.0
    # A clock set back (no battery-backed clock, a reboot) never owes more than the delay.
    assert delay_left(creds, 10.0) == 4.0
    assert delay_left(replace(creds, failed=0), 1000.0) == 0.0
    assert delay_left(replace(creds, failed_at=None), 1000.0) == 0.0


def test_the_failure_count_and_time_are_stored(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    creds = replace(Credentials.make("admin", "the-right-one"), failed=2, failed_at=1234.5)
    store.save(creds)
    assert store.load() == creds
    # A file written before failed_at existed still loads.
    doc = json.loads(store.path.read_text())
    del doc["failed_at"]
    store.path.write_text(json.dumps(doc))
    assert store.load() == replace(creds, failed_at=None)
    for bad in ({"failed_at": "soon"}, {"failed": -1}):
        store.path.write_text(json.dumps({**doc, **bad}))
        with pytest.raises(CredentialError, match="is damaged"):
            store.load()


# --------------------------------------------------------------------------- WAN addressing


@pytest.mark.parametrize(
    ("address", "gateway", "why"),
    [
        ("100.64.1.2", "100.64.1.1", "expected an address with its prefix length"),
        ("100.64.1.2/33", "100.64.1.1", "expected an address with its prefix length"),
        ("host/24", "100.64.1.1", "expected an address with its prefix length"),
        (None, "100.64.1.1", "expected an address with its prefix length"),
        ("0.0.0.0/0", "100.64.1.1", "cannot be a WAN address"),
        ("127.0.0.2/8", "127.0.0.1", "cannot be a WAN address"),
        ("224.0.0.5/24", "224.0.0.1", "cannot be a WAN address"),
        ("169.254.1.2/16", "169.254.1.1", "cannot be a WAN address"),
        ("240.0.0.2/24", "240.0.0.1", "reserved range"),
        ("100.64.1.0/24", "100.64.1.1", "is the network address of 100.64.1.0/24"),
        ("100.64.1.255/24", "100.64.1.1", "is the broadcast address of 100.64.1.0/24"),
        ("100.64.1.2/24", "", "expected a gateway address"),
        ("100.64.1.2/24", "gw", "expected a gateway address"),
        ("100.64.1.2/24", "100.64.2.1", "gateway 100.64.2.1 is not inside 100.64.1.0/24"),
        ("100.64.1.2/24", "2001:db8::1", "is IPv6 but the address 100.64.1.2/24 is IPv4"),
        ("2001:db8::2/64", "100.64.1.1", "is IPv4 but the address 2001:db8::2/64 is IPv6"),
        ("100.64.1.2/24", "100.64.1.2", "is the address itself"),
        ("100.64.1.2/24", "100.64.1.255", "is the network or broadcast address"),
        ("100.64.1.2/32", "100.64.1.1", "is not inside 100.64.1.2/32"),
    ],
)
def test_static_address_checks(address: object, gateway: object, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_static(address, gateway)


@pytest.mark.parametrize(
    ("address", "gateway"),
    [
        ("100.64.1.2/24", "100.64.1.1"),
        (" 192.0.2.10/31", "192.0.2.11 "),
        ("2001:db8::2/64", "2001:db8::1"),
        ("198.51.100.5/30", "198.51.100.6"),
    ],
)
def test_static_addresses_accepted(address: str, gateway: str) -> None:
    iface, gw = parse_static(address, gateway)
    assert str(iface) == address.strip() and str(gw) == gateway.strip()


def test_addressing_values() -> None:
    assert Addressing.from_value("dhcp") == Addressing("dhcp")
    assert Addressing.from_value({"mode": "none"}) == Addressing()
    static = Addressing.from_value(
        {"mode": "static", "address": "100.64.1.2/24", "gateway": "100.64.1.1"}
    )
    assert static.to_dict() == {
        "mode": "static",
        "address": "100.64.1.2/24",
        "gateway": "100.64.1.1",
    }
    assert Addressing.from_value(static.to_dict()) == static
    assert static.describe() == "static 100.64.1.2/24 via 100.64.1.1"
    for bad, why in [
        ("static", "needs an address and a gateway"),
        ("ppp", 'expected "none", "dhcp" or a static table'),
        (3, 'expected "none", "dhcp" or a static table'),
        ({"mode": "dhcp", "address": "1.2.3.4/24"}, 'only for mode "static"'),
        ({"mode": "bridge"}, "mode: expected"),
        ({"mode": "static", "adress": "x"}, "unknown key 'adress'"),
    ]:
        with pytest.raises(ValueError, match=why):
            Addressing.from_value(bad)


def test_lease_prefix_from_udhcpc() -> None:
    assert prefix_of("255.255.255.0", "24") == 24
    assert prefix_of("255.255.240.0", None) == 20
    assert prefix_of("255.255.255.0", "") == 24
    with pytest.raises(ValueError, match="without a valid subnet mask"):
        prefix_of(None, None)
    with pytest.raises(ValueError, match="without a valid subnet mask"):
        prefix_of("255.0.255.0", "x")


def test_set_link_refuses_bad_requests_before_touching_anything(tmp_path: Path) -> None:
    links = [Link("wan1", "eth0", 4800), Link("wan2", "eth1", 4801, precedence=2)]
    applied: list[object] = []
    with Store(tmp_path) as store:
        wan = WanAddressing(
            links, store, tmp_path / "control.sock", lambda *a: None, apply_worker=applied.append
        )
        set_link = wan.handlers()["set-link"]
        for req, why in [
            ({"link": "wan3", "mode": "dhcp"}, "no link 'wan3' (links: wan1, wan2)"),
            ({"mode": "dhcp"}, "link: expected a link name"),
            ({"link": "wan1", "mode": "pppoe"}, "mode: expected static or dhcp"),
            ({"link": "wan1", "mode": "static", "address": "10.0.0.2/24"}, "expected a gateway"),
            (
                {"link": "wan1", "mode": "static", "address": "10.0.0.2/24", "gateway": "10.0.1.1"},
                "not inside 10.0.0.0/24",
            ),
            ({"link": "wan1", "mode": "dhcp", "address": "10.0.0.2/24"}, "only for mode static"),
        ]:
            with pytest.raises(ValueError, match=re.escape(why)):
                asyncio.run(set_link(req))
        assert applied == []
        assert store.get_doc("wan.wan1") is None


def test_stored_setting_wins_over_the_config(tmp_path: Path) -> None:
    configured = Link("wan1", "eth0", 4800, addressing=Addressing("dhcp"))
    plain = Link("wan2", "eth1", 4801)
    with Store(tmp_path) as store:
        wan = WanAddressing([configured, plain], store, tmp_path / "c.sock", lambda *a: None)
        assert (wan.links["wan1"].addressing.mode, wan.links["wan1"].source) == ("dhcp", "config")
        assert (wan.links["wan2"].addressing.mode, wan.links["wan2"].source) == ("none", "default")
        store.put_doc(
            "wan.wan1", {"mode": "static", "address": "10.0.0.2/24", "gateway": "10.0.0.1"}
        )
        store.put_doc("wan.wan2", {"mode": "static", "address": "garbage"})  # ignored, logged
        wan = WanAddressing([configured, plain], store, tmp_path / "c.sock", lambda *a: None)
        assert wan.links["wan1"].source == "stored"
        assert wan.links["wan1"].addressing.address == "10.0.0.2/24"
        assert wan.links["wan2"].source == "default"


# --------------------------------------------------------------------------- the console on pipes


def run_console(
    tmp_path: Path, typed: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    argv = [sys.executable, "-m", "sdwan.appliance.console",
            "--socket", str(tmp_path / "none.sock")]
    argv += ["--data", str(tmp_path / "data"), "--reboot-command", "false"]
    return subprocess.run(
        argv, input=typed, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_no_command_runs_before_the_default_password_is_changed(tmp_path: Path) -> None:
    typed = "admin\nadmin\nshow status\nshow links\nreboot\nreboot\nexit\nexit\nhelp\n"
    cp = run_console(tmp_path, typed)
    assert cp.returncode == 0
    assert "must be changed before the first command" in cp.stdout
    assert cp.stdout.count("password not changed: the two passwords differ") == 1
    assert cp.stdout.count("password not changed: too short") == 2  # "reboot", "exit"
    assert "password not changed; logging out" in cp.stdout
    assert "socketd is not running" not in cp.stdout  # show status never ran
    assert "Type help for the commands" not in cp.stdout
    # Nothing changed: the default credential, still to be changed (the login attempt was
    # counted while it was checked, then the count put back).
    creds = CredentialStore(tmp_path / "data").load()
    assert creds.must_change and creds.verify("admin", "admin") and creds.failed == 0


def test_console_without_socketd_keeps_working_and_fails_clearly(tmp_path: Path) -> None:
    typed = (
        "admin\nadmin\nnew-password-1\nnew-password-1\nshow links\nhelp reboot\nreboot\nyes\nexit\n"
    )
    cp = run_console(tmp_path, typed)
    assert cp.returncode == 0, cp.stderr
    assert f"socketd is not running: cannot connect to {tmp_path / 'none.sock'}" in cp.stdout
    assert "usage: reboot" in cp.stdout
    # The reboot command ("false") failing leaves the engineer in the shell.
    assert "error: reboot command exited with status 1" in cp.stdout
    assert "Traceback" not in cp.stdout + cp.stderr
    creds = CredentialStore(tmp_path / "data").load()
    assert not creds.must_change and creds.verify("admin", "new-password-1")


def test_wrong_passwords_are_delayed_counted_and_end_the_session(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "data")
    store.save(Credentials.make("admin", "the-right-one"))
    t0 = time.monotonic()
    cp = run_console(tmp_path, "admin\nwrong\nroot\nthe-right-one\n", timeout=60)
    assert cp.stdout.count("Login incorrect") == 2
    assert time.monotonic() - t0 >= 3.0  # 1 s, then 2 s
    assert store.load().failed == 2
    cp = run_console(tmp_path, "admin\nthe-right-one\nexit\n")
    assert "2 failed login attempt(s) since the last successful login" in cp.stdout
    assert store.load().failed == 0


def _failed_now(store: CredentialStore) -> int:
    try:
        return store.load().failed
    except CredentialError:
        return -1


def _wait_failed(store: CredentialStore, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _failed_now(store) != n:
        assert time.monotonic() < deadline, f"the failure count never reached {n}"
        time.sleep(0.02)


def _console(tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    argv = [sys.executable, "-m", "sdwan.appliance.console",
            "--socket", str(tmp_path / "none.sock")]
    argv += ["--data", str(tmp_path / "data"), "--reboot-command", "false"]
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env,
    )


def test_the_delay_survives_ctrl_c_and_a_killed_console(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "data")
    store.save(replace(Credentials.make("admin", "the-right-one"), failed=1, failed_at=1.0))

    # SIGINT (Ctrl-C) while the failure is answered: ignored, the 2 s are waited in full,
    # and the console goes on asking for the login.
    with _console(tmp_path) as proc:
        assert proc.stdin is not None
        proc.stdin.write("admin\nwrong\n")
        proc.stdin.flush()
        _wait_failed(store, 2)  # stored before the check: the delay has not ended yet
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("admin\nwrong-again\n", timeout=60)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 >= 2.0 + 4.0  # failure 2, then failure 3
    assert out.count("Login incorrect") == 2 and "Traceback" not in out + err, out + err
    assert store.load().failed == 3

    # A console killed during its delay (failure 4 owes 8 s): the next one waits the rest
    # before it asks for the login, and the count goes on from 4.
    with _console(tmp_path) as proc:
        assert proc.stdin is not None
        proc.stdin.write("admin\nwrong\n")
        proc.stdin.flush()
        _wait_failed(store, 4)
        proc.kill()
        proc.communicate(timeout=30)
    owed_until = (store.load().failed_at or 0) + fail_delay(4)
    cp = run_console(tmp_path, "admin\nthe-right-one\nexit\n", timeout=60)
    assert time.time() >= owed_until
    waited = re.search(r"4 failed login\(s\) in a row: the next login in [1-8] s", cp.stdout)
    assert waited, cp.stdout
    assert "4 failed login attempt(s) since the last successful login" in cp.stdout
    # A successful login starts the count again: the next failure waits 1 s.
    assert store.load().failed == 0 and store.load().failed_at is None
    t0 = time.monotonic()
    cp = run_console(tmp_path, "admin\nwrong\n")
    assert "Login incorrect" in cp.stdout and "in a row" not in cp.stdout
    assert 1.0 <= time.monotonic() - t0 < 1.0 + 30  # not the 16 s a fifth failure would owe
    assert store.load().failed == 1


def test_a_damaged_credential_file_refuses_every_login(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "console-credentials.json").write_text("{")
    cp = run_console(tmp_path, "admin\nadmin\n")
    assert "is damaged" in cp.stdout and "login impossible" in cp.stdout
    assert "New password" not in cp.stdout


def test_getty_style_arguments_are_accepted(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    argv = [sys.executable, "-m", "sdwan.appliance.console",
            "--data", str(tmp_path / "d"), "--", "admin"]
    cp = subprocess.run(argv, input="admin\n", capture_output=True, text=True, timeout=30, env=env)
    # The user came from the command line: straight to the password.
    assert cp.stdout.startswith("Password: ")
    bad = subprocess.run(
        [sys.executable, "-m", "sdwan.appliance.console", "--reboot-command", "'unclosed"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert bad.returncode == 2 and "--reboot-command" in bad.stderr


def test_an_idle_console_logs_itself_out(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    argv = [sys.executable, "-m", "sdwan.appliance.console",
            "--socket", str(tmp_path / "none.sock")]
    argv += ["--data", str(tmp_path / "data"), "--idle-logout", "1"]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("admin\nadmin\nnew-password-1\nnew-password-1\n")
        proc.stdin.flush()  # and then nothing more, with the pipe left open
        try:
            rc = proc.wait(timeout=30)
        finally:
            proc.kill()
        out = proc.stdout.read()
    assert rc == 0
    assert "Password changed." in out and out.rstrip().endswith("idle for 1 s: logged out")
    bad = subprocess.run(argv[:-1] + ["-5"], capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 2 and "--idle-logout must be 0 (never) or more" in bad.stderr


def test_show_links_table() -> None:
    import io

    from sdwan.site.socketctl import format_links

    out = io.StringIO()
    format_links(
        {
            "links": [
                {
                    "name": "wan1",
                    "interface": "eth0",
                    "state": "up",
                    "addressing": "dhcp",
                    "address": "100.64.1.104/24",
                    "gateway": "100.64.1.1",
                    "precedence": 1,
                    "dhcp": {"state": "bound", "server": "100.64.1.1", "lease_s": 600},
                    "error": None,
                    "health": {"state": "up", "reason": None, "loss_pct": 0.0,
                               "jitter_ms": 1.5, "latency_ms": 12.0, "samples": 50},
                },
                {
                    "name": "wan2",
                    "interface": "eth1",
                    "state": "absent",
                    "addressing": "static",
                    "address": None,
                    "gateway": None,
                    "precedence": 2,
                    "dhcp": None,
                    "error": "device eth1 does not exist",
                    "health": {"state": "down", "reason": "no such interface", "samples": 0},
                },
            ],
            "steering": {
                "cloud": {"links": {"wan1": 1000}, "why": "start", "moved_s": None},
                "offcloud": {"links": {"wan1": 750, "wan2": 250}, "why": "wan2 healthy",
                             "moved_s": 12.0},
            },
        },
        out,
    )
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "LINK",
        "INTERFACE",
        "STATE",
        "HEALTH",
        "LOSS/JIT/LAT",
        "CARRIES",
        "ADDRESSING",
        "ADDRESS",
        "GATEWAY",
        "PREC",
        "DETAIL",
    ]
    assert lines[1].split()[:10] == [
        "wan1",
        "eth0",
        "up",
        "up",
        "0%/1.5ms/12ms",
        "cloud,mesh:75%",
        "dhcp",
        "100.64.1.104/24",
        "100.64.1.1",
        "1",
    ]
    assert lines[1].endswith("dhcp bound from 100.64.1.1, lease 10m00s")
    assert lines[2].split()[:9] == [
        "wan2", "eth1", "absent", "down", "-", "mesh:25%", "static", "-", "-",
    ]
    assert lines[2].endswith("error: device eth1 does not exist")
    assert "wan2: no such interface" in lines
    assert "offcloud traffic last moved 12.0s ago: wan2 healthy" in lines


def test_paths_come_from_socketds_config(tmp_path: Path) -> None:
    from sdwan.appliance.console import config_paths
    from sdwan.site.config import DEFAULT_CONTROL_SOCKET, DEFAULT_DATA_DIR

    cfg = tmp_path / "socketd.toml"
    cfg.write_text(
        '[paths]\ndata_dir = "data"\ncontrol_socket = "/run/x/control.sock"\n[site]\nid = "bad"\n'
    )
    assert config_paths(str(cfg)) == (Path("/run/x/control.sock"), tmp_path / "data")
    assert config_paths(str(tmp_path / "missing.toml")) == (
        DEFAULT_CONTROL_SOCKET,
        DEFAULT_DATA_DIR,
    )
    (tmp_path / "broken.toml").write_text("[paths\n")
    assert config_paths(str(tmp_path / "broken.toml")) == (DEFAULT_CONTROL_SOCKET, DEFAULT_DATA_DIR)

    # Started the way getty starts it (no --socket, no --data), it uses those paths.
    cfg.write_text(f'[paths]\ndata_dir = "data"\ncontrol_socket = "{tmp_path}/ctl.sock"\n')
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    cp = subprocess.run(
        [sys.executable, "-m", "sdwan.appliance.console", "--config", str(cfg)],
        input="admin\nadmin\nnew-password-1\nnew-password-1\nshow pop\n",
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert f"socketd is not running: cannot connect to {tmp_path}/ctl.sock" in cp.stdout
    assert (tmp_path / "data" / "console-credentials.json").exists()


def test_an_empty_login_line_asks_for_the_login_again(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "data")
    store.save(Credentials.make("admin", "the-right-one"))
    cp = run_console(tmp_path, "\n  \nadmin\nthe-right-one\nexit\n")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.count("login: ") == 3
    assert cp.stdout.count("Password: ") == 1
    assert "Login incorrect" not in cp.stdout and store.load().failed == 0


def test_show_log_without_a_log_ring_says_so(tmp_path: Path) -> None:
    # This host runs no busybox syslogd: logread is missing or finds no ring, and says so.
    cp = run_console(tmp_path, "admin\nadmin\nnew-password-1\nnew-password-1\nshow log 5\nexit\n")
    assert cp.returncode == 0, cp.stderr
    assert "no log ring on this system (logread: " in cp.stdout
    assert "Traceback" not in cp.stdout + cp.stderr
