"""RAUC's service on a bus of its own (docs/update.md, "Installing an update").

`rauc install`, `rauc status` and `rauc status mark-good` are clients of `rauc service` over
D-Bus. The box runs no system bus, and the updater needs none: socketd starts a private
`dbus-daemon` (session type, a Unix socket in a directory only root can enter, a policy that
lets only root connect) and `rauc service` on it, both kept running by appliance/child.py
(restarted with back-off, why they stopped in status). Clients find the bus through
DBUS_STARTER_BUS_TYPE=session and DBUS_SESSION_BUS_ADDRESS, set for them by `run()`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from sdwan.appliance.child import Child

log = logging.getLogger(__name__)

# sun_path holds 108 bytes with the NUL, but dbus-daemon refuses a socket path over 99 bytes
# (its portable limit): "Socket name too long".
MAX_SOCKET_PATH = 99
BUS_SOCKET = "bus"
BUS_CONFIG = "bus.conf"
CLIENT_TIMEOUT_S = 30.0  # a status or a mark; an install has no limit of its own
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def find_program(name: str) -> str | None:
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def runtime_dir(wanted: Path) -> Path:
    """wanted, or a short stand-in for it under the temporary directory when the bus socket's
    path would not fit a Unix socket address (a deep lab or test directory; /run/socketd on
    the box always fits)."""
    if len(os.fsencode(wanted / BUS_SOCKET)) <= MAX_SOCKET_PATH:
        return wanted
    digest = hashlib.sha256(os.fsencode(wanted)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sdwan-update-{digest}"


def bus_config(socket_path: Path) -> str:
    # The session type keeps the daemon from looking for the system's services and policy;
    # the socket's directory (0700) and the policy both keep everyone but root out.
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={escape(str(socket_path))}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <deny user="*"/>
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


async def read_line(stream: asyncio.StreamReader) -> bytes:
    """The next line (b"" at the end); one longer than the reader's limit (64 KiB) is left
    out, with a note in its place, rather than ending the reading with a ValueError."""
    try:
        return await stream.readline()
    except ValueError:
        # readline dropped what it had buffered of the line; its rest comes as a line.
        return b"[a line longer than 64 KiB, left out]\n"


@dataclass(frozen=True)
class RaucSetup:
    """Where things are; every path can be moved for tests."""

    system_conf: Path
    runtime_dir: Path  # root's only: the bus socket and its configuration
    rauc: str = "rauc"
    dbus_daemon: str = "dbus-daemon"
    # Only where the kernel command line carries no rauc.slot= (a test host): the slot
    # RAUC takes as booted.
    boot_slot: str | None = None


@dataclass(frozen=True)
class Run:
    status: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class RaucBus:
    """The private bus and `rauc service` on it, and the clients run against them."""

    def __init__(self, setup: RaucSetup, record: Callable[[str, dict[str, Any]], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.setup = setup
        sock = setup.runtime_dir / BUS_SOCKET
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise ValueError(f"the update bus socket {sock} is longer than the"
                             f" {MAX_SOCKET_PATH} bytes dbus-daemon takes: give a shorter"
                             " runtime directory")
        self.socket = sock
        self.address = f"unix:path={sock}"
        self.bus = Child("dbus-daemon", self._bus_argv, record, label="update bus",
                         prepare=self._prepare_bus, clock=clock)
        self.service = Child("rauc", self._service_argv, record, label="rauc service",
                             before_start=self._bus_up, env=self.env, clock=clock)

    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_STARTER_BUS_TYPE": "session",
                "DBUS_SESSION_BUS_ADDRESS": self.address}

    def start(self) -> None:
        self.bus.start()
        self.service.start()

    async def close(self) -> None:
        await self.service.close()
        await self.bus.close()
        with contextlib.suppress(OSError):
            self.socket.unlink()
        if self.setup.runtime_dir.name.startswith("sdwan-update-") and self._own_dir():
            shutil.rmtree(self.setup.runtime_dir, ignore_errors=True)  # a stand-in: ours

    def _own_dir(self) -> bool:
        """The runtime directory is a directory (not a symlink) of this user's own: a
        stand-in under the temporary directory has a name anyone can guess and take first."""
        try:
            st = os.lstat(self.setup.runtime_dir)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()

    # ---------------------------------------------------------------- the two programs

    def _bus_argv(self) -> tuple[list[str] | None, str | None]:
        daemon = find_program(self.setup.dbus_daemon)
        if daemon is None:
            return None, f"{self.setup.dbus_daemon} is not installed"
        return [daemon, f"--config-file={self.setup.runtime_dir / BUS_CONFIG}", "--nofork",
                "--print-address"], None

    def _prepare_bus(self) -> None:
        d = self.setup.runtime_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._own_dir():
            raise PermissionError(f"{d} is not a directory of socketd's own user: not putting"
                                  " the update bus there")
        os.chmod(d, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a daemon that died: it would refuse to bind
        tmp = d / f".{BUS_CONFIG}.tmp"
        tmp.write_text(bus_config(self.socket))
        os.replace(tmp, d / BUS_CONFIG)

    def _service_argv(self) -> tuple[list[str] | None, str | None]:
        rauc = find_program(self.setup.rauc)
        if rauc is None:
            return None, f"{self.setup.rauc} is not installed"
        argv = [rauc, "service", f"--conf={self.setup.system_conf}"]
        if self.setup.boot_slot is not None:
            argv.append(f"--override-boot-slot={self.setup.boot_slot}")
        return argv, None

    async def _bus_up(self) -> str | None:
        if not self.bus.running:
            return "waiting for the update bus"
        if not self.socket.exists():
            return "waiting for the update bus's socket"
        return None

    # ---------------------------------------------------------------- clients

    async def run(self, *args: str, timeout: float | None = CLIENT_TIMEOUT_S,
                  on_line: Callable[[str], None] | None = None) -> Run:
        """A rauc client command against the service; its output lines (stdout and stderr
        together, as RAUC interleaves them). OSError when it cannot run or time runs out."""
        rauc = find_program(self.setup.rauc)
        if rauc is None:
            raise OSError(f"{self.setup.rauc} is not installed")
        proc = await asyncio.create_subprocess_exec(
            rauc, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self.env())
        lines: list[str] = []

        async def read() -> int:
            assert proc.stdout is not None
            while raw := await read_line(proc.stdout):
                line = raw.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            return await proc.wait()

        try:
            status = await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise OSError(f"rauc {' '.join(args[:2])} did not finish in {timeout:g} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        return Run(status, lines)

    async def wait_ready(self, timeout: float) -> str | None:
        """Until `rauc status` answers over the bus; None then, else the last reason."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        why: str | None = "not asked yet"
        while loop.time() < end:
            for child in (self.bus, self.service):
                if child.st.state == "failed":  # not there at all: never started again
                    return f"{child.label}: {child.st.error}"
            if self.service.running:
                try:
                    run = await self.run("status", "--output-format=json", timeout=10.0)
                except OSError as e:
                    why = str(e)
                else:
                    if run.status == 0:
                        return None
                    why = run.lines[-1] if run.lines else f"status {run.status}"
            else:
                why = self.service.st.error or self.bus.st.error or "rauc service not running"
            await asyncio.sleep(0.2)
        return why
