"""The local control socket of socketd: server, wire protocol and client functions.

Protocol (documented in docs/socketctl.md): a Unix stream socket carrying newline-delimited
JSON. A request is an object {"cmd": NAME, ...arguments}; each request gets exactly one reply
line, {"ok": true, "result": {...}} or {"ok": false, "error": "message"}, in order, and a
connection may carry any number of requests. Only root and the user socketd runs as may talk
to it: the socket file is mode 0600 and the peer's SO_PEERCRED uid is checked as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_LINE",
    "ControlError",
    "ControlServer",
    "ControlUnreachable",
    "CommandFailed",
    "Handler",
    "request",
    "request_async",
]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# One request line, without its newline.
MAX_LINE = 64 * 1024
# Replies grow with the number of peers; this only stops a client from buffering without end.
MAX_REPLY = 16 * 1024 * 1024
MAX_CONNECTIONS = 32
_READ_CHUNK = 16 * 1024
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """A control request did not produce a result."""


class ControlUnreachable(ControlError):
    """socketd could not be reached, or did not answer in time."""


class CommandFailed(ControlError):
    """socketd answered {"ok": false, "error": ...}; the message is that error."""


def _encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _error_reply(message: str) -> bytes:
    return _encode({"ok": False, "error": message})


# --------------------------------------------------------------------------- server


class ControlServer:
    """Serves `handlers` (command name -> async function of the request arguments) on `path`."""

    def __init__(self, path: str | os.PathLike[str], handlers: Mapping[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers: dict[str, Handler] = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._allowed_uids = {0, os.geteuid()}

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.path))
            # Between bind() and listen() nobody can connect, so tightening the mode here
            # leaves no window in which the socket is open to others.
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=MAX_LINE
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                self._unlink_own()
            raise
        log.info("control socket listening on %s", self.path)

    @property
    def serving(self) -> bool:
        """Listening for clients now."""
        return self._server is not None and self._server.is_serving()

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            self._unlink_own()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(os.fspath(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # left behind by a process that died
            return
        except OSError as exc:
            raise ControlError(f"cannot check {self.path}: {exc.strerror}") from exc
        finally:
            probe.close()
        raise ControlError(f"{self.path} is in use: is another socketd running?")

    def _unlink_own(self) -> None:
        # A newer instance may have replaced the file since; only remove the one we created.
        st = os.lstat(self.path)
        if (st.st_dev, st.st_ino) == self._inode:
            os.unlink(self.path)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Server shutdown: let the task end normally so close() is not disturbed.
            pass
        except Exception:
            log.exception("control connection failed")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _peer_uid(self, writer: asyncio.StreamWriter) -> int | None:
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError:
            return None
        return int(_PEERCRED.unpack(raw)[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = self._peer_uid(writer)
        if uid not in self._allowed_uids:
            log.warning("control connection from uid %s refused", uid)
            writer.write(_error_reply("permission denied"))
            await writer.drain()
            return
        if len(self._clients) > MAX_CONNECTIONS:
            writer.write(_error_reply("too many control connections"))
            await writer.drain()
            return

        buffer = bytearray()
        discarding = False  # inside a line that was already refused as too long
        while True:
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                return
            buffer += chunk
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > MAX_LINE:
                        if not discarding:
                            writer.write(_error_reply(f"request longer than {MAX_LINE} bytes"))
                            discarding = True
                        buffer.clear()
                    break
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                if discarding:
                    discarding = False  # this newline ends the refused line
                    continue
                if len(line) > MAX_LINE:
                    writer.write(_error_reply(f"request longer than {MAX_LINE} bytes"))
                    continue
                if line.strip():
                    writer.write(await self._dispatch(line))
            await writer.drain()

    async def _dispatch(self, line: bytes) -> bytes:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error_reply(f"malformed request: {exc}")
        if not isinstance(req, dict):
            return _error_reply('malformed request: expected a JSON object {"cmd": ...}')
        cmd = req.pop("cmd", None)
        if not isinstance(cmd, str):
            return _error_reply('malformed request: missing "cmd" (a string)')
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _error_reply(f"unknown command {json.dumps(cmd)} (known: {known})")
        try:
            result = await handler(req)
        except Exception as exc:
            log.exception("control command %s failed", cmd)
            return _error_reply(f"{cmd}: {exc}" if str(exc) else f"{cmd}: {type(exc).__name__}")
        if not isinstance(result, dict):
            log.error("control command %s returned %r, not a dict", cmd, type(result))
            return _error_reply(f"{cmd}: internal error: result is not an object")
        try:
            return _encode({"ok": True, "result": result})
        except (TypeError, ValueError) as exc:
            log.error("control command %s returned a result JSON cannot carry: %s", cmd, exc)
            return _error_reply(f"{cmd}: internal error: {exc}")


# --------------------------------------------------------------------------- clients


def _unreachable(path: Path, exc: OSError) -> ControlUnreachable:
    if isinstance(exc, PermissionError):
        return ControlUnreachable(
            f"cannot connect to {path}: permission denied (run as root or as socketd's user)"
        )
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
        return ControlUnreachable(f"cannot connect to {path}: is socketd running?")
    return ControlUnreachable(f"cannot connect to {path}: {exc.strerror or exc}")


def _parse_reply(path: Path, line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"malformed reply from {path}: {exc}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f"malformed reply from {path}: not an ok/error object")
    if not reply["ok"]:
        raise CommandFailed(str(reply.get("error") or "unspecified error"))
    result = reply.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"malformed reply from {path}: result is not an object")
    return result


def _timed_out(path: Path, timeout: float) -> ControlUnreachable:
    return ControlUnreachable(f"no reply from socketd on {path} within {timeout:g} s")


async def request_async(
    path: str | os.PathLike[str], cmd: str, *, timeout: float = 5.0, **args: Any
) -> dict[str, Any]:
    """Send one command and return its result; raise ControlError (or a subclass) otherwise."""
    path = Path(path)
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(
                    os.fspath(path), limit=MAX_REPLY
                )
            except OSError as exc:
                raise _unreachable(path, exc) from None
            try:
                writer.write(_encode({"cmd": cmd, **args}))
                await writer.drain()
                line = await reader.readline()
            except ValueError:
                raise ControlError(f"reply from {path} is too long") from None
            except OSError as exc:
                raise ControlUnreachable(f"connection to {path} failed: {exc}") from None
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        raise _timed_out(path, timeout) from None
    if not line.endswith(b"\n"):
        raise ControlUnreachable(f"socketd closed {path} without replying")
    return _parse_reply(path, line)


def request(
    path: str | os.PathLike[str], cmd: str, *, timeout: float = 5.0, **args: Any
) -> dict[str, Any]:
    """Blocking `request_async`, for command-line tools; never call it from an event loop."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except TimeoutError:
            raise _timed_out(path, timeout) from None
        except OSError as exc:
            raise _unreachable(path, exc) from None
        buffer = bytearray()
        try:
            sock.sendall(_encode({"cmd": cmd, **args}))
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(_READ_CHUNK)
                if not chunk:
                    raise ControlUnreachable(f"socketd closed {path} without replying")
                buffer += chunk
                if len(buffer) > MAX_REPLY:
                    raise ControlError(f"reply from {path} is too long")
        except TimeoutError:
            raise _timed_out(path, timeout) from None
        except OSError as exc:
            raise ControlUnreachable(f"connection to {path} failed: {exc}") from None
    return _parse_reply(path, bytes(buffer[: buffer.index(b"\n")]))
