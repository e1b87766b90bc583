"""The LAN port: its address from the site config and the DHCP server for the LAN hosts.

Owns `[lan] address` and `[lan.dhcp]` (site/config.py) at run time: the address is put on the
LAN device through the netcfg worker (netlink, common/netcfg.py; the device is brought up and
any other IPv4 address on it removed), then busybox `udhcpd -f` serves the LAN from a
configuration written from `[lan.dhcp]`. socketd supervises it: its output goes to the log, a
server that exits is started again after a growing pause (the address put back first if it
went), it is stopped with socketd and dies with it (PR_SET_PDEATHSIG), never orphaned. The
address is watched for as long as socketd runs and put back when it goes, DHCP or not. What
cannot work (no udhcpd, a device that does not exist, a server that keeps exiting) is said in
`lan` and the events, and socketd runs on.

The leases are read back from udhcpd's lease file (`parse_leases`: its binary format, read
defensively, a damaged file gives an error in `lan`, never an exception), after asking udhcpd
to write it (SIGUSR1). The control command `lan` is served by `LanPort.handlers()`; socketctl
and the console print it with `format_lan` (docs/lan.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdwan.appliance.child import RESTART_MAX_S, RESTART_S, Child
from sdwan.appliance.wanaddr import observe
from sdwan.common.netcfg import AddrPlan, NetcfgError, apply_addressing_in_worker

if TYPE_CHECKING:
    from sdwan.site.config import Lan

__all__ = [
    "Lease",
    "LanPort",
    "parse_leases",
    "read_lease_file",
    "udhcpd_command",
    "udhcpd_config",
]

log = logging.getLogger("sdwan.appliance.lanport")

LEASES_FILE = "udhcpd.leases"  # in the data directory: the hosts keep their addresses
# udhcpd writes its lease file this often by itself (its default is two hours), besides on
# every `lan` (SIGUSR1) and when it stops.
AUTO_TIME_S = 60
LEASES_WAIT_S = 1.0  # how long `lan` waits for udhcpd to write the file it asked for
# SIGUSR1 kills a udhcpd that has not set up its handler yet: one this young is not asked.
SIGNAL_AFTER_S = 1.0
# The address is looked for this often for socketd's whole life: udhcpd does not exit when its
# device loses it, and without DHCP nothing else would notice.
WATCH_S = 3.0
# udhcpd truncates its lease file, then writes it lease by lease: it is read once its size is
# whole leases and has not changed over SETTLE_S, giving up (and reading it as it is) after
# SETTLE_TRIES.
SETTLE_S = 0.02
SETTLE_TRIES = 25

# udhcpd's lease file (busybox networking/udhcp): the time it was written (int64, big endian),
# then per lease its remaining seconds then (uint32), its address (network order), the
# client's MAC, its host name (NUL padded) and two bytes of padding.
_HEADER = struct.Struct("!q")
_RECORD = struct.Struct("!I4s6s20s2x")
MAX_LEASE_FILE = 4 << 20  # far above any range udhcpd accepts; a bigger file is damaged


@dataclass(frozen=True)
class Lease:
    mac: str
    ip: str
    hostname: str | None
    expires_s: int  # 0: expired

    def to_dict(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "ip": self.ip,
            "hostname": self.hostname,
            "expires_s": self.expires_s,
            "expired": self.expires_s <= 0,
        }


def parse_leases(
    data: bytes, now: float, network: ipaddress.IPv4Network | None = None
) -> tuple[list[Lease], str | None]:
    """The leases of udhcpd's lease file and, when it is damaged, what is wrong with it (the
    leases read before the damage are kept). A record no udhcpd of this LAN writes (outside
    `network`, a multicast MAC) is garbage: skipped and counted in the problem."""
    if not data:
        return [], None  # not written yet
    if len(data) > MAX_LEASE_FILE:
        return [], f"lease file of {len(data)} bytes: larger than any udhcpd writes"
    if len(data) < _HEADER.size:
        return [], f"lease file of {len(data)} bytes: shorter than its header"
    (written_at,) = _HEADER.unpack_from(data)
    # As dumpleases does: a file from the future (a clock set back) counts from now.
    if not 0 < written_at <= now:
        written_at = int(now)
    leases: list[Lease] = []
    problems: list[str] = []
    skipped = 0
    body = memoryview(data)[_HEADER.size :]
    whole = len(body) - len(body) % _RECORD.size
    for off in range(0, whole, _RECORD.size):
        remaining, nip, mac, name = _RECORD.unpack_from(body, off)
        if nip == b"\0\0\0\0":
            continue
        ip = ipaddress.IPv4Address(nip)
        if mac[0] & 1 or (network is not None and ip not in network):
            skipped += 1
            continue
        host = name.split(b"\0", 1)[0].decode("ascii", "replace")
        host = "".join(ch if ch.isprintable() else "?" for ch in host) or None
        leases.append(
            Lease(
                mac=":".join(f"{b:02x}" for b in mac),
                ip=str(ip),
                hostname=host,
                expires_s=max(0, int(written_at + remaining - now)),
            )
        )
    if skipped:
        where = f"outside {network} or " if network is not None else ""
        problems.append(f"{skipped} damaged record(s) skipped ({where}with a multicast MAC)")
    if whole != len(body):
        problems.append(
            f"lease file cut short: {len(body) - whole} bytes after the last whole lease"
        )
    return leases, "; ".join(problems) or None


def read_lease_file(
    path: Path, pause: float = SETTLE_S, tries: int = SETTLE_TRIES
) -> bytes:
    """The lease file once udhcpd has finished writing it (blocking: run off the loop)."""
    data = b""
    for _ in range(tries):
        try:
            before = os.stat(path)
            with open(path, "rb") as f:
                data = f.read(MAX_LEASE_FILE + 1)
        except FileNotFoundError:
            return b""
        whole = len(data) == 0 or (
            len(data) >= _HEADER.size and (len(data) - _HEADER.size) % _RECORD.size == 0
        )
        if whole and len(data) == before.st_size:
            time.sleep(pause)
            after = os.stat(path)
            if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                return data
        else:
            time.sleep(pause)
    return data  # still moving or damaged: parse_leases says what is wrong


# --------------------------------------------------------------------------- udhcpd


def _busybox_has(bb: str, applet: str) -> bool:
    try:
        out = subprocess.run(
            [bb, "--list"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return applet in out.split()


def udhcpd_command() -> tuple[list[str] | None, str | None]:
    """(argv of udhcpd, None), or (None, why there is none): udhcpd on PATH (the image's busybox
    applet), else `busybox udhcpd` where that busybox has it."""
    found = shutil.which("udhcpd")
    if found:
        return [found], None
    bb = shutil.which("busybox")
    if bb is None:
        return None, "no DHCP server: neither udhcpd nor busybox is installed"
    if not _busybox_has(bb, "udhcpd"):
        return None, f"no DHCP server: {bb} was built without udhcpd"
    return [bb, "udhcpd"], None


def udhcpd_config(lan: Lan, leases: Path, pidfile: Path) -> str:
    """udhcpd's configuration for `lan` (its address and [lan.dhcp] are set)."""
    assert lan.address is not None and lan.dhcp is not None and lan.dhcp.range is not None
    assert lan.interface is not None
    for path in (leases, pidfile):
        if any(ch.isspace() for ch in str(path)):
            # udhcpd splits its lines at white space: such a path cannot be written there.
            raise NetcfgError(f"udhcpd cannot use a path with white space in it: {path}")
    d = lan.dhcp
    first, last = d.range
    router = d.router or lan.address.ip
    lines = [
        "# Written by socketd from [lan] of its configuration at each start; changes here are"
        " lost.",
        f"interface {lan.interface}",
        f"start {first}",
        f"end {last}",
        f"max_leases {int(last) - int(first) + 1}",
        f"lease_file {leases}",
        f"pidfile {pidfile}",
        f"auto_time {AUTO_TIME_S}",
        f"option subnet {lan.address.netmask}",
        f"option router {router}",
        f"option lease {d.lease_s}",
    ]
    if d.dns:
        lines.append("option dns " + " ".join(str(ip) for ip in d.dns))
    lines += [f"static_lease {s.mac} {s.ip}" for s in d.static]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    """Atomically, and only when it changed: the runtime directory may be on flash."""
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LanPort:
    """The LAN port of one socketd (see the module docstring)."""

    def __init__(
        self,
        lan: Lan,
        data_dir: Path,
        runtime_dir: Path,
        record: Callable[[str, str, dict[str, Any]], None],
        *,
        tag: str = "socketd",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        apply_worker: Callable[[AddrPlan], None] = apply_addressing_in_worker,
        command: Callable[[], tuple[list[str] | None, str | None]] = udhcpd_command,
    ) -> None:
        self.lan = lan
        self.leases_path = Path(data_dir) / LEASES_FILE
        # The lab runs several sites' sockets in one runtime directory: the files carry the
        # control socket's name.
        self.conf_path = Path(runtime_dir) / f"{tag}-udhcpd.conf"
        self.pid_path = Path(runtime_dir) / f"{tag}-udhcpd.pid"
        self.record = record
        self.clock = clock
        self.wall = wall
        self.apply_worker = apply_worker
        self.command = command
        self.server = Child(
            "udhcpd", self._argv, lambda text, data: self.record("lan.dhcp", text, data),
            label="LAN DHCP server", before_start=self._address_for_server,
            prepare=self._prepare, on_started=self._started, clock=clock,
        )
        self.address_error: str | None = None
        self.address_applied = False
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._first_address = True  # the first application is forced, not looked for first
        self._announced = False  # "server started" is said once per run of socketd

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"lan": self._status}

    def start(self) -> None:
        """Address the port and start the DHCP server in the background; a LAN without
        `address` is left to the system, as before."""
        if self.lan.address is None:
            return
        loop = asyncio.get_running_loop()
        if self.lan.serves_dhcp:
            self.server.start()  # it puts the address on first (_address_for_server)
        else:
            self._task = loop.create_task(self._address_only())
        self._watch = loop.create_task(self._watch_address())

    async def close(self) -> None:
        self._stopping = True
        for task in (self._watch, self._task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # TERM: udhcpd writes its leases before it exits.
        await self.server.close()

    # ---------------------------------------------------------------- running

    async def _address_only(self) -> None:
        """Without a DHCP server: the address, retried after a growing pause until it is on."""
        delay = RESTART_S
        while not self._stopping and not await self._ensure_address(force=self._take_first()):
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    def _take_first(self) -> bool:
        first, self._first_address = self._first_address, False
        return first

    async def _address_for_server(self) -> str | None:
        """Before every start of udhcpd: the address on the port (put back if it went)."""
        if await self._ensure_address(force=self._take_first()):
            return None
        return "waiting for the LAN address"

    def _argv(self) -> tuple[list[str] | None, str | None]:
        argv, why = self.command()
        return ([*argv, "-f", str(self.conf_path)] if argv is not None else None), why

    def _prepare(self) -> None:
        _write(self.conf_path, udhcpd_config(self.lan, self.leases_path, self.pid_path))
        self.leases_path.parent.mkdir(parents=True, exist_ok=True)
        # udhcpd complains at every start about a lease file that is not there yet.
        self.leases_path.touch(exist_ok=True)

    def _started(self, pid: int) -> None:
        log.info("LAN DHCP server started on %s (pid %d)", self.lan.interface, pid)
        if not self._announced:
            self._announced = True
            self.record("lan.dhcp", f"LAN DHCP server started on {self.lan.interface}",
                        {"pid": pid})

    def apply_address(self) -> None:
        """Put the address on the port now, blocking (the supervisor, before socketd's own
        start, so that a socketd that cannot start is still reachable from the LAN)."""
        lan = self.lan
        if lan.address is None or lan.interface is None:
            return
        self.apply_worker(AddrPlan(lan.interface, 4, [str(lan.address)], None, 0))

    async def _watch_address(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_S)
            # Before the first application _run retries on its own.
            if self.address_applied or self.address_error is not None:
                try:
                    await self._ensure_address(force=False)
                except Exception:  # noqa: BLE001 - the watch must outlive any one failure
                    log.exception("LAN port: address check failed")

    async def _has_address(self) -> bool:
        lan = self.lan
        assert lan.address is not None and lan.interface is not None
        # Off the loop: the kernel is asked, and the watchdog is petted from the loop.
        seen = await asyncio.to_thread(observe, lan.interface)
        return str(lan.address) in seen["addresses"]

    async def _ensure_address(self, force: bool) -> bool:
        """The port has its address (put back if it went): True; else the error is kept."""
        lan = self.lan
        assert lan.address is not None and lan.interface is not None
        restoring = False
        if not force:
            if await self._has_address():
                return True
            restoring = self.address_applied and self.address_error is None
        plan = AddrPlan(lan.interface, 4, [str(lan.address)], None, 0)
        try:
            await asyncio.to_thread(self.apply_worker, plan)
        except (NetcfgError, OSError) as e:
            error = f"{lan.address} not applied to {lan.interface}: {e}"
            if error != self.address_error:
                log.error("LAN port: %s", error)
                self.record("lan.address", f"LAN port: {error}", {"error": str(e)})
            self.address_error = error
            return False
        if restoring:
            log.warning("LAN port %s: %s had gone, put back", lan.interface, lan.address)
            self.record(
                "lan.address",
                f"LAN port {lan.interface}: {lan.address} restored (it had been removed)",
                {"interface": lan.interface, "address": str(lan.address), "restored": True},
            )
        elif self.address_error is not None or not self.address_applied:
            log.info("LAN port %s: %s", lan.interface, lan.address)
            self.record(
                "lan.address",
                f"LAN port {lan.interface}: {lan.address}",
                {"interface": lan.interface, "address": str(lan.address)},
            )
        self.address_error = None
        self.address_applied = True
        return True

    # ---------------------------------------------------------------- status

    async def _fresh_leases(self) -> bytes:
        """The lease file, after asking a running udhcpd to write it."""
        proc = self.server.proc
        started_at = self.server.st.started_at
        before = _mtime(self.leases_path)
        settled = started_at is not None and self.clock() - started_at >= SIGNAL_AFTER_S
        if proc is not None and proc.returncode is None and settled:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
            deadline = self.clock() + LEASES_WAIT_S
            while _mtime(self.leases_path) == before and self.clock() < deadline:
                await asyncio.sleep(0.02)
        # Off the loop: a big file must not hold up the watchdog's pets.
        return await asyncio.to_thread(read_lease_file, self.leases_path)

    async def leases(self) -> tuple[list[dict[str, Any]], str | None]:
        try:
            data = await self._fresh_leases()
        except OSError as e:
            return [], f"lease file unreadable: {e.strerror or e}"
        network = self.lan.address.network if self.lan.address is not None else None
        found, problem = await asyncio.to_thread(parse_leases, data, self.wall(), network)
        static = {s.mac: s for s in (self.lan.dhcp.static if self.lan.dhcp else ())}
        out = []
        for lease in found:
            entry = lease.to_dict()
            fixed = static.get(lease.mac)
            entry["static"] = fixed is not None and str(fixed.ip) == lease.ip
            if entry["hostname"] is None and fixed is not None:
                entry["hostname"] = fixed.name
            out.append(entry)
        out.sort(key=lambda e: ipaddress.IPv4Address(e["ip"]))
        return out, problem

    def summary(self) -> dict[str, Any]:
        """For `status`: the port's address and the server's state, without the leases."""
        lan = self.lan
        return {
            "interface": lan.interface,
            "address": str(lan.address) if lan.address else None,
            "address_error": self.address_error,
            "dhcp": self.server.st.state if lan.serves_dhcp else "off",
        }

    async def _status(self, _req: dict[str, Any]) -> dict[str, Any]:
        lan = self.lan
        d = lan.dhcp
        # First, as it waits: what follows is then one moment's state.
        leases, problem = await self.leases() if d is not None and d.enabled else ([], None)
        seen = await asyncio.to_thread(observe, lan.interface) if lan.interface else None
        result: dict[str, Any] = {
            "interface": lan.interface,
            "state": seen["state"] if seen else None,
            "address": str(lan.address) if lan.address else None,
            "addresses": seen["addresses"] if seen else [],
            "subnets": [str(n) for n in lan.subnets],
            "address_error": self.address_error,
            "dhcp": None,
        }
        if d is None or not d.enabled:
            result["dhcp"] = {"enabled": False, "state": "off"}
            return result
        assert lan.address is not None and d.range is not None
        srv = self.server.status()
        result["dhcp"] = {
            "enabled": True,
            "state": srv["state"],
            "pid": srv["pid"],
            "up_s": srv["up_s"],
            "error": srv["error"] if srv["state"] != "running" else None,
            "retry_in_s": srv["retry_in_s"],
            "restarts": srv["restarts"],
            "range": [str(d.range[0]), str(d.range[1])],
            "router": str(d.router or lan.address.ip),
            "dns": [str(ip) for ip in d.dns],
            "lease_s": d.lease_s,
            "static": [
                {"mac": s.mac, "ip": str(s.ip), "name": s.name} for s in d.static
            ],
            "leases": leases,
            "leases_error": problem,
        }
        return result


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
