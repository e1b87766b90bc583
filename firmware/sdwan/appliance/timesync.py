"""Time sync: chronyd toward `[time] servers`, kept running by socketd (appliance/child.py),
its state read with chronyc over a Unix socket, and what it means said as events and status:
synchronised to which server, how far off, and why not (docs/time.md).

chronyd is configured to answer no NTP client and to take no command over UDP: the box is
not a time server on the Internet. With `set_clock = false` it measures without touching the
clock (a lab, or a host whose clock is someone else's)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.appliance.child import Child
from sdwan.site.config import Time

log = logging.getLogger(__name__)

POLL_FAST_S = 2.0  # chronyc's view, read this often until the first synchronisation
POLL_S = 16.0  # and this often after
CHRONYC_TIMEOUT_S = 5.0
VOUCH_OFFSET_S = 10.0  # a synchronised clock this close to its server may be stored
DRIFT_FILE = "chrony.drift"  # in the data dir: the clock's frequency error, kept across boots
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL

# chronyc's source states (`sources -c`, second field)
_SOURCE_STATES = {
    "*": "selected", "+": "combined", "-": "not combined", "?": "unreachable",
    "x": "falseticker", "~": "too variable",
}


def _find(program: str) -> str | None:
    return shutil.which(program) or next(
        (f"{d}/{program}" for d in _SBIN if os.access(f"{d}/{program}", os.X_OK)), None)


def chrony_dir(wanted: Path) -> Path:
    """wanted, or a short stand-in for it under the temporary directory when the command
    socket's path would not fit a Unix socket address (a deep lab or test directory;
    /run/socketd on the box always fits)."""
    if len(os.fsencode(wanted / "chronyd.sock")) <= MAX_SOCKET_PATH:
        return wanted
    digest = hashlib.sha256(os.fsencode(wanted)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sdwan-chrony-{digest}"


def chrony_config(cfg: Time, sock_dir: Path, data_dir: Path) -> str:
    lines = [
        "# written by socketd from [time] at every start of chronyd (docs/time.md)",
        *(f"server {s} iburst" for s in cfg.servers),
        "port 0",  # no NTP server: the box answers no client
        "cmdport 0",  # no command port over UDP: chronyc uses the socket below
        f"bindcmdaddress {sock_dir / 'chronyd.sock'}",
        f"pidfile {sock_dir / 'chronyd.pid'}",
        f"driftfile {data_dir / DRIFT_FILE}",
        # A box started from its clock's floor is far off: stepped at once, then only slewed.
        "makestep 1 3",
    ]
    if cfg.set_clock:
        lines.append("rtcsync")  # the kernel copies the synchronised time to the RTC
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Tracking:
    synced: bool
    reference: str | None
    stratum: int | None
    offset_s: float | None  # how far the clock is from the reference now (+: ahead)


def parse_tracking(text: str) -> Tracking:
    """`chronyc -c -n tracking`: one CSV line; ValueError if it is not that."""
    f = text.strip().split(",")
    if len(f) < 14:
        raise ValueError(f"unexpected chronyc tracking output: {text.strip()[:200]!r}")
    stratum = int(f[2])
    synced = f[13] != "Not synchronised" and stratum > 0
    # chronyc's "System time" is how far the clock is behind (positive: slow): negated.
    return Tracking(synced, f[1] or None if synced else None, stratum if synced else None,
                    -float(f[4]) if synced else None)


def parse_sources(text: str) -> list[dict[str, Any]]:
    """`chronyc -c -n sources`: a CSV line per server."""
    out = []
    for line in text.splitlines():
        f = line.strip().split(",")
        if len(f) < 10 or f[0] != "^":
            continue
        out.append({
            "address": f[2],
            "state": _SOURCE_STATES.get(f[1], f[1]),
            "stratum": int(f[3]),
            "reach": int(f[5], 8),  # the last 8 polls as bits, chronyc prints it in octal
        })
    return out


class TimeSync:
    """chronyd for one socketd (see the module docstring)."""

    def __init__(
        self, cfg: Time, data_dir: Path, runtime_dir: Path,
        record: Callable[[str, str, dict[str, Any]], None], *, tag: str = "socketd",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        # chronyd wants its socket's directory closed to others; the lab runs several
        # socketds in one runtime directory, so the name carries the control socket's.
        self.sock_dir = chrony_dir(Path(runtime_dir) / f"{tag}-chrony")
        self.conf_path = self.sock_dir / "chrony.conf"
        self.record = record
        self.child = Child("chronyd", self._argv, self._child_event, label="time sync",
                           prepare=self._prepare,
                           clock=clock)
        self.tracking: Tracking | None = None
        self.sources: list[dict[str, Any]] = []
        self.read_error: str | None = None
        self._was_synced = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.cfg.servers:
            return
        self.child.start()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.child.close()
        if self.sock_dir.name.startswith("sdwan-chrony-"):
            shutil.rmtree(self.sock_dir, ignore_errors=True)  # a stand-in, nobody else's

    def _argv(self) -> tuple[list[str] | None, str | None]:
        chronyd = _find("chronyd")
        if chronyd is None:
            return None, "chronyd is not installed"
        # -d: in the foreground, its log on stderr (kept by Child); -u root: the image has
        # no _chrony user, and chronyd keeps no privileges it does not need anyway.
        argv = [chronyd, "-d", "-u", "root", "-f", str(self.conf_path)]
        return ([*argv, "-x"] if not self.cfg.set_clock else argv), None

    def _prepare(self) -> None:
        self.sock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.sock_dir, 0o700)
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(chrony_config(self.cfg, self.sock_dir, self.data_dir))
        os.replace(tmp, self.conf_path)

    def _child_event(self, text: str, data: dict[str, Any]) -> None:
        self.record("time.error", text, data)

    async def _chronyc(self, *args: str) -> str:
        chronyc = _find("chronyc")
        if chronyc is None:
            raise OSError("chronyc is not installed")
        proc = await asyncio.create_subprocess_exec(
            chronyc, "-h", str(self.sock_dir / "chronyd.sock"), "-c", "-n", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), CHRONYC_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise OSError(f"chronyc {args[0]} did not answer in {CHRONYC_TIMEOUT_S:g} s") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise OSError(f"chronyc {args[0]}: {text.strip()[:200] or proc.returncode}")
        return text

    @property
    def clock_synced(self) -> bool:
        """chronyd sets this clock and says it is synchronised, close to its server: the
        clock may be stored even behind its floor (appliance/clock.py)."""
        t = self.tracking
        return bool(self.cfg.set_clock and self.child.running and t is not None and t.synced
                    and t.offset_s is not None and abs(t.offset_s) < VOUCH_OFFSET_S)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S if self._was_synced else POLL_FAST_S)
            await self.poll_once()

    async def poll_once(self) -> None:
        """Read chronyd's state and say what changed. Nothing read (chronyd not running, or
        chronyc failing) is not synchronised: the last reading is not kept as if current."""
        if not self.child.running:
            self.read_error = None
            self.tracking, self.sources = None, []
            self._transition(None)
            return
        try:
            tracking = parse_tracking(await self._chronyc("tracking"))
            sources = parse_sources(await self._chronyc("sources"))
        except (OSError, ValueError) as e:
            self.read_error = str(e)
            self.tracking, self.sources = None, []
            self._transition(None)
            return
        self.read_error = None
        self.tracking, self.sources = tracking, sources
        self._transition(tracking)

    def _transition(self, t: Tracking | None) -> None:
        if t is None:
            t = Tracking(False, None, None, None)
        if t.synced and not self._was_synced:
            text = (f"clock synchronised to {t.reference} (stratum {t.stratum}), "
                    f"{t.offset_s:+.6f} s off")
            log.info("%s", text)
            self.record("time.synced", text, {"reference": t.reference, "stratum": t.stratum,
                                              "offset_s": t.offset_s})
        elif not t.synced and self._was_synced:
            why = self.why_not()
            log.warning("clock no longer synchronised: %s", why)
            self.record("time.unsynced", f"clock no longer synchronised: {why}", {"why": why})
        self._was_synced = t.synced

    def why_not(self) -> str | None:
        """Why the clock is not synchronised, in words; None when it is."""
        if not self.cfg.servers:
            return "no [time] servers configured"
        if not self.child.running:
            err = self.child.st.error
            return f"chronyd is not running{': ' + err if err else ''}"
        if self.tracking is not None and self.tracking.synced:
            return None
        if self.read_error is not None:
            return self.read_error
        if not self.sources:
            return "chronyd has no server yet (a name not resolved?)"
        if all(s["reach"] == 0 for s in self.sources):
            return f"no server has answered ({len(self.sources)} asked)"
        return "waiting for enough answers to trust a server"

    def status(self) -> dict[str, Any]:
        t = self.tracking
        return {
            "servers": list(self.cfg.servers),
            "set_clock": self.cfg.set_clock,
            "synced": bool(t and t.synced),
            "reference": t.reference if t else None,
            "stratum": t.stratum if t else None,
            "offset_s": t.offset_s if t else None,
            "why": self.why_not(),
            "sources": self.sources,
            "chronyd": self.child.status(),
        }
