"""Control socket and socketctl: a real server on a temporary Unix socket, real clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdwan.common.control import (
    MAX_LINE,
    CommandFailed,
    ControlError,
    ControlServer,
    ControlUnreachable,
    Handler,
    request,
    request_async,
)

REPO = Path(__file__).resolve().parents[2]

STATUS = {
    "site_id": 1,
    "name": "branch-1",
    "version": "0.1.0",
    "uptime_s": 3723.4,
    "tunnel_interface": "sdwan0",
    "peers_up": 1,
    "peers_total": 2,
    "links": [
        {
            "name": "wan1",
            "interface": "eth0",
            "port": 4800,
            "precedence": 1,
            "mtu": 1500,
            "rx_packets": 1234567,
            "tx_packets": 7,
            "rx_bytes": 3 * 1024 * 1024,
            "tx_bytes": 512,
            "drops": {"malformed": 2, "unknown_index": 0},
        }
    ],
    "drops": {"no_route": 4, "bad_tag": 0},
}

PEERS = {
    "peers": [
        {
            "site_id": 2,
            "state": "up",
            "reason": "handshake complete",
            "endpoint": "203.0.113.2:4800",
            "link": "wan1",
            "subnets": ["10.2.0.0/24"],
            "role": "responder",
            "handshakes": 3,
            "last_handshake_s": 1.2,
            "last_rx_s": 0.3,
            "rx_packets": 10,
            "tx_packets": 11,
            "rx_bytes": 1000,
            "tx_bytes": 1100,
            "drops": {"bad_tag": 1, "replay": 2},
        },
        {
            "site_id": 3,
            "state": "down",
            "reason": "certificate is for site 4, expected site 3",
            "endpoint": "[2001:db8::3]:4800",
            "link": "wan1",
            "subnets": ["10.3.0.0/24"],
            "role": "initiator",
            "handshakes": 0,
            "last_handshake_s": None,
            "last_rx_s": None,
            "rx_packets": 0,
            "tx_packets": 0,
            "rx_bytes": 0,
            "tx_bytes": 0,
            "drops": {"bad_tag": 0},
        },
    ]
}


class Daemon:
    """The handlers a socketd would register, with enough state to see they really ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_status = False

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("status", args))
        if self.fail_status:
            raise RuntimeError("fast path is not running")
        return STATUS

    async def peers(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("peers", args))
        return PEERS

    async def echo(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"args": args}

    async def boom(self, args: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("disk on fire")

    async def slow(self, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(float(args.get("seconds", 2)))
        return {"slept": True}

    async def unserialisable(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"value": {1, 2}}

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self.status,
            "peers": self.peers,
            "echo": self.echo,
            "boom": self.boom,
            "slow": self.slow,
            "unserialisable": self.unserialisable,
        }


class ServerThread:
    """A ControlServer on its own event loop, so blocking clients and subprocesses can use it."""

    def __init__(self, path: Path, daemon: Daemon) -> None:
        self.path = path
        self.daemon = daemon
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ControlServer(path, daemon.handlers())

    def __enter__(self) -> ServerThread:
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
    folder = Path(tempfile.mkdtemp(prefix="ctl-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def daemon() -> Daemon:
    return Daemon()


@pytest.fixture
def server(short_dir: Path, daemon: Daemon) -> Iterator[ServerThread]:
    with ServerThread(short_dir / "run" / "control.sock", daemon) as srv:
        yield srv


def raw_exchange(path: Path, payload: bytes, replies: int, timeout: float = 5.0) -> list[Any]:
    """Send bytes as they are and read `replies` reply lines from the same connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(payload)
        data = b""
        while data.count(b"\n") < replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def socketctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "firmware"), env.get("PYTHONPATH")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "sdwan.site.socketctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# --------------------------------------------------------------------------- server and client


def test_status_round_trip_with_blocking_client(server: ServerThread, daemon: Daemon) -> None:
    assert request(server.path, "status") == STATUS
    assert request(server.path, "peers") == PEERS
    assert [name for name, _ in daemon.calls] == ["status", "peers"]


def test_arguments_reach_the_handler(server: ServerThread) -> None:
    assert request(server.path, "echo", peer=2, verbose=True) == {
        "args": {"peer": 2, "verbose": True}
    }


def test_async_client_against_server_in_same_loop(short_dir: Path) -> None:
    daemon = Daemon()

    async def scenario() -> None:
        async with ControlServer(short_dir / "c.sock", daemon.handlers()) as srv:
            results = await asyncio.gather(
                *(request_async(srv.path, "echo", n=n) for n in range(20))
            )
            assert [r["args"]["n"] for r in results] == list(range(20))
            with pytest.raises(CommandFailed, match="disk on fire"):
                await request_async(srv.path, "boom")
            with pytest.raises(ControlUnreachable, match="no reply from socketd on .* within"):
                await request_async(srv.path, "slow", timeout=0.2, seconds=5)
            assert await request_async(srv.path, "status") == STATUS
        assert not (short_dir / "c.sock").exists(), "close() removes the socket file"

    asyncio.run(scenario())


def test_several_requests_per_connection_in_order(server: ServerThread) -> None:
    lines = b"".join(json.dumps({"cmd": "echo", "i": i}).encode() + b"\n" for i in range(5))
    replies = raw_exchange(server.path, lines, 5)
    assert replies == [{"ok": True, "result": {"args": {"i": i}}} for i in range(5)]


def test_unknown_command_lists_known_ones(server: ServerThread) -> None:
    with pytest.raises(CommandFailed) as info:
        request(server.path, "reboot")
    assert str(info.value) == (
        'unknown command "reboot" (known: boom, echo, peers, slow, status, unserialisable)'
    )


def test_malformed_requests_get_errors_and_connection_stays_usable(server: ServerThread) -> None:
    payload = (
        b"{not json\n"
        b"[1, 2]\n"
        b'{"no_cmd": 1}\n'
        b'{"cmd": 5}\n'
        b"\xff\xfe\n"
        b"\n"  # blank lines are ignored, not answered
        b'{"cmd": "status"}\n'
    )
    replies = raw_exchange(server.path, payload, 6)
    assert len(replies) == 6
    for reply in replies[:5]:
        assert reply["ok"] is False and reply["error"].startswith("malformed request: ")
    assert "expected a JSON object" in replies[1]["error"]
    assert 'missing "cmd"' in replies[2]["error"]
    assert replies[5] == {"ok": True, "result": STATUS}


def test_overlong_line_is_refused_once_and_connection_recovers(server: ServerThread) -> None:
    big = b'{"cmd": "echo", "pad": "' + b"x" * (MAX_LINE + 10_000) + b'"}\n'
    replies = raw_exchange(server.path, big + b'{"cmd": "echo", "after": 1}\n', 2)
    assert replies == [
        {"ok": False, "error": f"request longer than {MAX_LINE} bytes"},
        {"ok": True, "result": {"args": {"after": 1}}},
    ]


def test_line_just_under_the_limit_is_accepted(server: ServerThread) -> None:
    head, tail = b'{"cmd": "echo", "pad": "', b'"}'
    line = head + b"y" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(line) == MAX_LINE
    (reply,) = raw_exchange(server.path, line + b"\n", 1)
    assert reply["ok"] is True and len(reply["result"]["args"]["pad"]) > 60_000


def test_handler_exception_is_reported_and_server_keeps_running(server: ServerThread) -> None:
    with pytest.raises(CommandFailed) as info:
        request(server.path, "boom")
    assert str(info.value) == "boom: disk on fire"
    with pytest.raises(CommandFailed, match="unserialisable: internal error"):
        request(server.path, "unserialisable")
    assert request(server.path, "status") == STATUS


def test_client_hanging_up_mid_request_does_not_hurt(server: ServerThread) -> None:
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.fspath(server.path))
            sock.sendall(b'{"cmd": "slow", "seconds": 0.1}\n{"cmd": "sta')
    assert request(server.path, "status") == STATUS


def test_blocking_client_times_out(server: ServerThread) -> None:
    with pytest.raises(ControlUnreachable) as info:
        request(server.path, "slow", timeout=0.3, seconds=3)
    assert str(info.value) == f"no reply from socketd on {server.path} within 0.3 s"


def test_socket_file_mode_parent_dir_and_cleanup(short_dir: Path, daemon: Daemon) -> None:
    path = short_dir / "a" / "b" / "control.sock"
    with ServerThread(path, daemon):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not path.exists()


def test_stale_socket_is_replaced(short_dir: Path, daemon: Daemon) -> None:
    path = short_dir / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))
    dead.close()  # the file stays behind, as after a crash
    with ServerThread(path, daemon):
        assert request(path, "status") == STATUS


def test_live_socket_and_foreign_file_are_not_taken_over(
    server: ServerThread, short_dir: Path
) -> None:
    second = ControlServer(server.path, {})
    with pytest.raises(ControlError, match="is in use: is another socketd running"):
        asyncio.run(second.start())
    assert request(server.path, "status") == STATUS

    regular = short_dir / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        asyncio.run(ControlServer(regular, {}).start())
    assert regular.read_text() == "keep me"


NOBODY = 65534


def python_for_nobody() -> str | None:
    """An interpreter the unprivileged user can run (a venv under /root is out of its reach)."""
    for candidate in (sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3"):
        if not candidate:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-I", "-c", "pass"],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                capture_output=True,
                timeout=30,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_other_users_are_refused(server: ServerThread, short_dir: Path) -> None:
    python = python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter the unprivileged user may run")
    # Open the file mode and the folders up so that only the SO_PEERCRED check stands in the way.
    for folder in (short_dir, server.path.parent):
        folder.chmod(0o755)
    server.path.chmod(0o666)
    # The refusal is sent as soon as the connection is accepted; the request that follows may
    # meet a closed socket, which is the point.
    client = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print(s.recv(4096).decode(), end="")
try:
    s.sendall(b'{"cmd": "status"}\\n')
    print("closed" if s.recv(4096) == b"" else "open")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
"""
    proc = subprocess.run(
        [python, "-I", "-c", client, os.fspath(server.path)],
        capture_output=True,
        text=True,
        timeout=30,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
    )
    assert proc.returncode == 0, proc.stderr
    reply, state = proc.stdout.splitlines()
    assert json.loads(reply) == {"ok": False, "error": "permission denied"}
    assert state == "closed"
    assert server.daemon.calls == []


def test_not_running(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    with pytest.raises(ControlUnreachable) as info:
        request(path, "status")
    assert str(info.value) == f"cannot connect to {path}: is socketd running?"


# --------------------------------------------------------------------------- socketctl


def test_socketctl_status_json(server: ServerThread) -> None:
    proc = socketctl("--socket", os.fspath(server.path), "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == STATUS
    assert proc.stderr == ""


def test_socketctl_json_flag_before_command(server: ServerThread) -> None:
    proc = socketctl("--json", "--socket", os.fspath(server.path), "peers")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == PEERS


def test_socketctl_status_human(server: ServerThread) -> None:
    proc = socketctl("--socket", os.fspath(server.path), "status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "site     1 (branch-1)" in out
    assert "uptime   1h02m03s" in out
    assert "peers    1 up of 2" in out
    assert "drops    no_route=4" in out
    header, row = (line.split() for line in out.splitlines()[-2:])
    assert header[:5] == ["LINK", "INTERFACE", "PORT", "PREC", "MTU"]
    assert row[:7] == ["wan1", "eth0", "4800", "1", "1500", "1234567", "7"]
    assert "3.0 MiB" in out and "malformed=2" in out and "unknown_index" not in out


def test_socketctl_peers_human(server: ServerThread) -> None:
    proc = socketctl("--socket", os.fspath(server.path), "peers")
    assert proc.returncode == 0, proc.stderr
    header, up, down = proc.stdout.splitlines()
    for column in ("SITE", "STATE", "ENDPOINT", "LINK", "LAST RX", "RX PKTS", "REASON"):
        assert column in header
    assert up.split()[:4] == ["2", "up", "203.0.113.2:4800", "wan1"]
    assert "0.3s ago" in up and "handshake complete" not in up
    assert down.split()[:4] == ["3", "down", "[2001:db8::3]:4800", "wan1"]
    assert down.endswith("certificate is for site 4, expected site 3")


def test_socketctl_peers_empty(short_dir: Path) -> None:
    async def no_peers(args: dict[str, Any]) -> dict[str, Any]:
        return {"peers": []}

    daemon = Daemon()
    srv = ServerThread(short_dir / "c.sock", daemon)
    srv.server.handlers["peers"] = no_peers
    with srv:
        proc = socketctl("--socket", os.fspath(srv.path), "peers")
    assert (proc.returncode, proc.stdout) == (0, "no peers configured\n")


def test_socketctl_error_from_socketd_exits_1(server: ServerThread, daemon: Daemon) -> None:
    daemon.fail_status = True
    proc = socketctl("--socket", os.fspath(server.path), "status")
    assert proc.returncode == 1
    assert proc.stderr == "socketctl: status: status: fast path is not running\n"
    assert proc.stdout == ""


def test_socketctl_not_running_exits_3(short_dir: Path) -> None:
    path = short_dir / "control.sock"
    proc = socketctl("--socket", os.fspath(path), "status")
    assert proc.returncode == 3
    assert proc.stderr == f"socketctl: cannot connect to {path}: is socketd running?\n"


def test_socketctl_default_socket_is_documented_path() -> None:
    proc = socketctl("--help")
    assert proc.returncode == 0
    assert "/run/socketd/control.sock" in proc.stdout


@pytest.mark.parametrize(
    "args", [(), ("frobnicate",), ("status", "--bogus"), ("--timeout", "x", "status")]
)
def test_socketctl_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    proc = socketctl(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: socketctl")
