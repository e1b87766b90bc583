"""Text from the network reaches the operator's terminal without escape sequences or other
control characters (common/visible.py), through socketctl's tables, popctl's lines and the
console's `show`, while `--json` stays exact.

A real control socket (the ControlServer of common/control.py, on its own loop) answers the
way a socketd or popd would if a hostile site or PoP had named a link, an event or a site with
control characters; socketctl and popctl run their own main(), the console runs as its own
process on pipes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdwan.appliance.console import Credentials, CredentialStore
from sdwan.common.control import ControlServer, Handler
from sdwan.common.visible import VisibleWriter, visible, visible_lines
from sdwan.pop import popctl
from sdwan.site import socketctl

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"

CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home
EVENT_TEXT = f"tunnel to site 3 down{CLEAR}all is well"
# A window title, a bell, a carriage return and a newline that would forge a line, a CSI in its
# one-byte C1 form, a right-to-left override.
LINK = "wan\x1b]0;owned\x07\r\nfake\x9b2J\u202e"
LINK_SHOWN = "wan\\x1b]0;owned\\x07\\x0d\\x0afake\\x9b2J\\u202e"
NOW = 1_700_000_000.0


def site_answers() -> dict[str, dict[str, Any]]:
    link = {
        "name": LINK, "interface": "eth0", "port": 4800, "precedence": 1, "mtu": 1500,
        "rx_packets": 1, "tx_packets": 2, "rx_bytes": 3, "tx_bytes": 4,
        "drops": {f"odd{CLEAR}": 1},
        "state": "up", "addressing": "dhcp", "source": "stored",
        "address": "100.64.1.7/24", "addresses": ["100.64.1.7/24"], "gateway": "100.64.1.1",
        "static": None, "error": None,
        "dhcp": {"state": "bound", "server": f"100.64.1.1{CLEAR}", "lease_s": 600},
    }
    return {
        "events": {"events": [
            {"seq": 1, "ts": NOW, "kind": "tunnel.down", "text": EVENT_TEXT, "site_id": None,
             "data": {}},
        ]},
        "links": {"links": [link]},
        "status": {
            "site_id": 1, "name": f"branch{CLEAR}", "version": "0.1.0\x1b[31m",
            "uptime_s": 5.0, "tunnel_interface": "sdwan0", "peers_up": 0, "peers_total": 1,
            "links": [link], "drops": {},
        },
        "peers": {"peers": [
            {"site_id": 3, "state": "down", "endpoint": "203.0.113.3:4800", "link": LINK,
             "transport": "direct", "reason": f"peer said {CLEAR}"},
        ]},
        "pop": {
            "state": "up", "active_pop": 1, "config_rev": 1, "directory_rev": 2, "sites": 1,
            "messages": {"refused_prefixes": 0},
            "sessions": [{"pop_id": 1, "role": "primary", "active": True,
                          "endpoint": "203.0.113.10:4800", "link": LINK, "state": "down",
                          "reason": f"refused: {CLEAR}"}],
        },
        "mesh": {"enabled": True, "peers": 1, "peers_up": 0, "paths": [
            {"site_id": 3, "name": f"evil{CLEAR}", "link": LINK, "state": "punching",
             "reason": f"why{CLEAR}"},
        ]},
        "routes": {"policy": "normal", "routes": [], "unused": []},
    }


def pop_answers() -> dict[str, dict[str, Any]]:
    return {
        "events": {"events": [
            {"ts": NOW, "site_id": 5, "kind": f"site{CLEAR}", "text": EVENT_TEXT},
        ]},
        "sites": {"sites": [
            {"site_id": 5, "name": f"evil{CLEAR}", "online": True, "subnets": ["10.5.0.0/24"],
             "sessions": [{"link": LINK, "precedence": 1, "public": "198.51.100.5:4800"}]},
        ]},
        "status": {
            "pop_id": 1, "name": "pop-1", "version": f"0.1{CLEAR}", "uptime_s": 3,
            "listen": "0.0.0.0:4800", "stun": "0.0.0.0:3478",
            "account": {"name": "acme", "file": "account.toml", "sites": 1, "rules": []},
            "rejections": [{"at": NOW, "from": "203.0.113.9:4800", "reason": EVENT_TEXT}],
        },
    }


class Server:
    """A ControlServer on its own event loop answering each command with a fixed result."""

    def __init__(self, path: Path, answers: dict[str, dict[str, Any]]) -> None:
        def handler(result: dict[str, Any]) -> Handler:
            async def answer(_args: dict[str, Any]) -> dict[str, Any]:
                return result

            return answer

        async def refuse(_args: dict[str, Any]) -> dict[str, Any]:
            raise ValueError(f"no link {LINK}")

        handlers = {name: handler(result) for name, result in answers.items()}
        handlers["set-link"] = refuse
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ControlServer(path, handlers)

    def __enter__(self) -> Server:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
    folder = Path(tempfile.mkdtemp(prefix="vis-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def assert_clean(text: str) -> None:
    """Nothing but printable characters and line ends."""
    bad = sorted({repr(c) for c in text if not c.isprintable() and c != "\n"})
    assert not bad, f"control characters reached the terminal: {bad}\n{text}"


def test_visible_escapes_what_is_not_printable_and_keeps_the_rest() -> None:
    assert visible(EVENT_TEXT) == "tunnel to site 3 down\\x1b[2J\\x1b[Hall is well"
    assert visible(LINK) == LINK_SHOWN
    assert visible("naïve 東京 C:\\path ok") == "naïve 東京 C:\\path ok"
    assert visible("tab\there\x7f\x00") == "tab\\x09here\\x7f\\x00"
    assert visible("\U000e0041") == "\\U000e0041"  # an invisible tag character
    assert visible(7) == "7"
    assert visible_lines(f"a{CLEAR}\nb\n") == "a\\x1b[2J\\x1b[H\nb\n"
    out = io.StringIO()
    VisibleWriter(out).write(f"x{CLEAR}\n")
    assert out.getvalue() == "x\\x1b[2J\\x1b[H\n"


@pytest.mark.parametrize("topic", ["events", "links", "status", "peers", "pop", "mesh"])
def test_every_socketctl_table_shows_network_text_escaped(topic: str) -> None:
    out = io.StringIO()
    socketctl.FORMATTERS[topic](site_answers()[topic], out)
    text = out.getvalue()
    assert_clean(text)
    if topic == "events":
        assert "tunnel to site 3 down\\x1b[2J\\x1b[Hall is well" in text
    else:
        assert LINK_SHOWN in text, text
    # No forged line: the link name's newline did not start a line of its own.
    assert not any(line.startswith("fake") for line in text.splitlines()), text


def test_socketctl_tables_escape_and_json_stays_exact(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = short_dir / "control.sock"
    with Server(sock, site_answers()):
        for topic in ("events", "links", "status"):
            assert socketctl.main(["--socket", str(sock), topic]) == 0
            text = capsys.readouterr().out
            assert_clean(text)
            assert "\\x1b[2J" in text, text
            assert socketctl.main(["--socket", str(sock), topic, "--json"]) == 0
            assert json.loads(capsys.readouterr().out) == site_answers()[topic]
        assert socketctl.main(["--socket", str(sock), "set-link", "wan1", "dhcp"]) == 1
        err = capsys.readouterr().err
        assert_clean(err)
        assert f"no link {LINK_SHOWN}" in err, err


def test_popctl_lines_escape_and_json_stays_exact(short_dir: Path) -> None:
    sock = short_dir / "pop.sock"
    with Server(sock, pop_answers()):
        for topic in ("events", "sites", "status"):
            out = io.StringIO()
            assert popctl.main(["--socket", str(sock), topic], out=out) == 0
            text = out.getvalue()
            assert_clean(text)
            assert "\\x1b[2J" in text, text
            if topic == "sites":
                assert LINK_SHOWN in text and "evil\\x1b[2J" in text, text
            if topic == "events":
                assert "tunnel to site 3 down\\x1b[2J\\x1b[Hall is well" in text, text
            out = io.StringIO()
            assert popctl.main(["--socket", str(sock), topic, "--json"], out=out) == 0
            assert json.loads(out.getvalue()) == pop_answers()[topic]


def test_the_console_shows_network_text_escaped(short_dir: Path, tmp_path: Path) -> None:
    sock = short_dir / "control.sock"
    data = tmp_path / "data"
    CredentialStore(data).save(Credentials.make("admin", "field-eng-2026"))
    typed = "admin\nfield-eng-2026\nshow events\nshow links\nshow status\nshow pop\n"
    typed += "set link wan1 dhcp\nexit\n"
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    argv = [sys.executable, "-m", "sdwan.appliance.console", "--socket", str(sock),
            "--data", str(data), "--reboot-command", "false"]
    with Server(sock, site_answers()):
        cp = subprocess.run(
            argv, input=typed, capture_output=True, text=True, timeout=60, env=env
        )
    assert cp.returncode == 0, cp.stderr
    assert_clean(cp.stdout)
    assert "tunnel to site 3 down\\x1b[2J\\x1b[Hall is well" in cp.stdout, cp.stdout
    assert LINK_SHOWN in cp.stdout, cp.stdout
    assert f"error: set-link: no link {LINK_SHOWN}" in cp.stdout, cp.stdout
    assert not any(line.startswith("fake") for line in cp.stdout.splitlines()), cp.stdout
