"""WAN addressing: how each link's device gets its address (left alone, static, or DHCP).

Owns the `addressing` of every [[links]] entry: validating a setting (`parse_static`,
`Addressing.from_value`), persisting what the console or socketctl set (a document per link,
`wan.<link>`, in socketd's store, which wins over the config file's `addressing`), applying it
live (static: the netcfg worker replaces the device's addresses and the link's default route;
DHCP: a supervised `udhcpc -f` whose script hands each lease back to socketd over the control
socket, applied through the same worker), and reporting it (`links`). The control commands
`links`, `set-link` and `dhcp-lease` are served by `WanAddressing.handlers()`.

A lease is checked like a static address (`check_wan_address`, common/addressing.py: no
loopback, multicast or reserved address, no network wider than /8, none overlapping the LAN's
or a static peer's subnets) before anything is applied. A refused lease is never put on the
device; it is recorded as a `link.dhcp_refused` event naming the server and the reason, shown in
`links`, and udhcpc is started again after a growing pause to look for another lease.

`socketd-udhcpc-script EVENT` (or `python -m sdwan.appliance.wanaddr lease EVENT`) is the udhcpc
script's side (docs/console.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import shlex
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdwan.common.addressing import Addressing, Owned, check_wan_address
from sdwan.common.netcfg import (
    AddrPlan,
    NetcfgError,
    Teardown,
    apply_addressing_in_worker,
    link_rule_priorities,
    link_table,
    teardown_in_worker,
)

if TYPE_CHECKING:
    from sdwan.common.store import Store
    from sdwan.site.config import Link

__all__ = [
    "WanAddressing",
    "die_with_parent",
    "doc_name",
    "observe",
    "route_metric",
]

log = logging.getLogger("sdwan.appliance.wanaddr")

DOC_PREFIX = "wan."
# Each link's default route gets its own metric so the links' routes sit side by side.
METRIC_BASE = 100
UDHCPC_RESTART_S = 5.0
UDHCPC_STOP_S = 3.0
WORKER_TIMEOUT_S = 30.0
LEASE_REQUEST_TIMEOUT_S = 40.0  # the script waits while socketd applies the lease
SCRIPT_NAME = "udhcpc-script"
ENTRY_POINT = "socketd-udhcpc-script"
ENV_SOCKET = "SDWAN_CONTROL_SOCKET"
ENV_LINK = "SDWAN_LINK"
ENV_GENERATION = "SDWAN_DHCP_GENERATION"
_LEASE_EVENTS = ("deconfig", "bound", "renew", "leasefail", "nak")
# After a refused lease udhcpc is started again to look for another one: first after
# REFUSED_RETRY_S, doubling with each refusal in a row, at most REFUSED_RETRY_MAX_S.
REFUSED_RETRY_S = 2.0
REFUSED_RETRY_MAX_S = 300.0
# The same refusal (server, lease and reason) is recorded as an event at most this often.
REFUSED_EVENT_REPEAT_S = 3600.0
# A link whose addressing is left to the system gets its routing table from what is on its
# device: looked at this often (two ioctls and /proc/net/route, no worker), the table and
# rules changed (by a worker) only when the address or gateway did, a failure retried after
# LEFT_ALONE_RETRY_S.
LEFT_ALONE_POLL_S = 5.0
LEFT_ALONE_RETRY_S = 60.0

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
_PR_SET_PDEATHSIG = 1

def doc_name(link: str) -> str:
    return DOC_PREFIX + link


def route_metric(index: int) -> int:
    """Metric of the default route of the link at `index` (config order, from 0)."""
    return METRIC_BASE + index


# --------------------------------------------------------------------------- observation


def _ioctl_addr(sock: socket.socket, request: int, ifname: str) -> str | None:
    req = struct.pack("16s16x", ifname.encode()[:15])
    try:
        res = fcntl.ioctl(sock.fileno(), request, req)
    except OSError as e:
        if e.errno in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENXIO):
            return None
        raise
    return socket.inet_ntoa(res[20:24])


def _ipv4(ifname: str) -> str | None:
    """The primary IPv4 address of ifname as ADDR/PREFIX (ioctl: socketd stays free of
    pyroute2, see netcfg.py)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        addr = _ioctl_addr(s, _SIOCGIFADDR, ifname)
        mask = _ioctl_addr(s, _SIOCGIFNETMASK, ifname) if addr else None
    if addr is None:
        return None
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen if mask else 32
    return f"{addr}/{prefix}"


def _ipv6(ifname: str) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            f = line.split()
            if len(f) >= 6 and f[5] == ifname and f[3] == "00":  # scope global
                out.append(f"{ipaddress.IPv6Address(int(f[0], 16))}/{int(f[2], 16)}")
    return out


def _gateway(ifname: str) -> str | None:
    best: tuple[int, str] | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[0] == ifname and f[1] == "00000000" and f[7] == "00000000":
                gw = socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
                if gw != "0.0.0.0" and (best is None or int(f[6]) < best[0]):
                    best = (int(f[6]), gw)
    if best is None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/net/ipv6_route").read_text().splitlines():
                f = line.split()
                if len(f) >= 10 and f[9] == ifname and f[0] == "0" * 32 and f[1] == "00":
                    gw6 = ipaddress.IPv6Address(int(f[4], 16))
                    if not gw6.is_unspecified and (best is None or int(f[5], 16) < best[0]):
                        best = (int(f[5], 16), str(gw6))
    return best[1] if best else None


def _operstate(ifname: str) -> str:
    try:
        return Path(f"/sys/class/net/{ifname}/operstate").read_text().strip() or "unknown"
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "unknown"


def observe(ifname: str) -> dict[str, Any]:
    """What the kernel has on ifname now: state, addresses, default gateway."""
    try:
        v4 = _ipv4(ifname)
    except OSError:
        v4 = None
    addresses = ([v4] if v4 else []) + _ipv6(ifname)
    return {
        "state": _operstate(ifname),
        "addresses": addresses,
        "address": addresses[0] if addresses else None,
        "gateway": _gateway(ifname),
    }


# --------------------------------------------------------------------------- udhcpc


def udhcpc_command() -> list[str] | None:
    """udhcpc on PATH (the image's busybox applet), else `busybox udhcpc`, else None."""
    found = shutil.which("udhcpc")
    if found:
        return [found]
    bb = shutil.which("busybox")
    return [bb, "udhcpc"] if bb else None


def script_path(runtime_dir: Path) -> Path:
    """What udhcpc runs on each lease event: the installed `socketd-udhcpc-script`, else a
    script written into runtime_dir (unless that is mounted noexec, where it could not run)."""
    for candidate in (Path(sys.executable).parent / ENTRY_POINT, shutil.which(ENTRY_POINT)):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    runtime_dir.mkdir(parents=True, exist_ok=True)
    if os.statvfs(runtime_dir).f_flag & os.ST_NOEXEC:
        raise NetcfgError(
            f"{ENTRY_POINT} is not installed and {runtime_dir} is mounted noexec:"
            " udhcpc would have no script to run"
        )
    return write_script(runtime_dir)


def write_script(directory: Path) -> Path:
    """The script udhcpc runs on each lease event: it hands the event to socketd."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SCRIPT_NAME
    body = (
        "#!/bin/sh\n"
        "# Written by socketd: hands udhcpc's lease events to socketd (sdwan.appliance.wanaddr).\n"
        f'exec {shlex.quote(sys.executable)} -m sdwan.appliance.wanaddr lease "$1"\n'
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)
    return path


def _resolve_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Resolved here, in socketd: a dlopen/dlsym between fork and exec of a process with threads
# (asyncio's to_thread) may hang on a lock another thread held at the fork.
_prctl = _resolve_prctl()
_forking_pid = os.getpid()


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


# Who forks, known in the child: it cannot ask once its parent may already be gone.
os.register_at_fork(before=_before_fork)


def die_with_parent() -> None:
    """preexec_fn of socketd's children: they get SIGTERM when socketd dies, however it dies."""
    # A udhcpc outliving a killed socketd would keep rewriting the device's address; a udhcpd
    # would keep leasing from a configuration nobody answers for.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # A parent that died before the prctl sends no signal any more: the child goes itself.
    if os.getppid() != _forking_pid:
        os._exit(1)


def prefix_of(subnet: Any, mask: Any) -> int:
    """Prefix length from udhcpc's `mask` (bits) or `subnet` (dotted)."""
    if isinstance(mask, str) and mask.isdigit() and 0 <= int(mask) <= 32:
        return int(mask)
    if isinstance(subnet, str) and subnet:
        try:
            return ipaddress.IPv4Network(f"0.0.0.0/{subnet}").prefixlen
        except ValueError:
            pass
    raise ValueError(f"lease without a valid subnet mask (subnet={subnet!r}, mask={mask!r})")


@dataclass
class _Dhcp:
    generation: int
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    state: str = "starting"  # requesting, bound, stopped, failed
    lease: dict[str, Any] | None = None
    bound_at: float | None = None
    restarts: int = 0
    stopping: bool = False
    refusals: int = 0  # leases refused in a row
    retry_in: float | None = None  # udhcpc was stopped after a refusal: start it after this


@dataclass
class _LinkState:
    link: Link
    index: int
    addressing: Addressing
    source: str  # stored, config, default
    error: str | None = None
    applied_at: float | None = None
    dhcp: _Dhcp | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refused: dict[str, Any] | None = None  # the last refused lease, until one is accepted
    refused_event_at: float | None = None
    # Addressing left to the system: the (address, gateway) its table was last made from,
    # and when a failure to make it may be retried.
    table_from: tuple[str | None, str | None] | None = None
    table_retry_at: float = 0.0

    @property
    def link_id(self) -> int:
        """The link's id, as the link manager's and the fast path's: config order plus one."""
        return self.index + 1

    def plan(self, family: int, addresses: list[str], gateway: str | None) -> AddrPlan:
        return AddrPlan(
            self.link.device,
            family,
            addresses,
            gateway,
            route_metric(self.index),
            link_id=self.link_id,
        )


class WanAddressing:
    """The addressing of every link of one socketd (see the module docstring)."""

    def __init__(
        self,
        links: Sequence[Link],
        store: Store | None,
        control_socket: Path,
        record: Callable[[str, str, dict[str, Any]], None],
        clock: Callable[[], float] = time.monotonic,
        apply_worker: Callable[[AddrPlan], None] = apply_addressing_in_worker,
        owned: Sequence[Owned] = (),
        teardown_worker: Callable[[Teardown], None] = teardown_in_worker,
    ) -> None:
        self.store = store
        # The LAN's and static peers' subnets: no address of ours may overlap them.
        self.owned = tuple(owned)
        self.control_socket = Path(control_socket)
        self.record = record
        self.clock = clock
        self.apply_worker = apply_worker
        self.teardown_worker = teardown_worker
        self._watch_task: asyncio.Task[None] | None = None
        self.links: dict[str, _LinkState] = {}
        self._generation = 0
        self._script: Path | None = None
        self._start_task: asyncio.Task[None] | None = None
        for i, link in enumerate(links):
            addressing, source = self._initial(link)
            self.links[link.name] = _LinkState(link, i, addressing, source)

    def _initial(self, link: Link) -> tuple[Addressing, str]:
        if self.store is not None:
            try:
                doc = self.store.get_doc(doc_name(link.name))
            except Exception as e:  # a store error must not stop the links
                log.error("link %s: stored addressing unreadable: %s", link.name, e)
                doc = None
            if doc is not None:
                try:
                    return self._checked(Addressing.from_value(doc.value)), "stored"
                except ValueError as e:
                    log.error("link %s: stored addressing ignored: %s", link.name, e)
        configured = getattr(link, "addressing", None)
        if isinstance(configured, Addressing) and configured.mode != "none":
            return configured, "config"
        return Addressing(), "default"

    def _checked(self, a: Addressing) -> Addressing:
        """a, once its static address is clear of the LAN and the static peers' subnets."""
        if a.mode == "static" and a.address is not None:
            check_wan_address(ipaddress.ip_interface(a.address), self.owned)
        return a

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"links": self._links, "set-link": self._set_link, "dhcp-lease": self._on_lease}

    def start(self) -> None:
        """Apply every link's addressing (stored, else configured) in the background, then
        follow the links whose addressing is left to the system."""
        loop = asyncio.get_running_loop()
        self._start_task = loop.create_task(self.apply_all())
        self._watch_task = loop.create_task(self._watch_left_alone())

    async def _watch_left_alone(self) -> None:
        assert self._start_task is not None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._start_task)
        while True:
            await asyncio.sleep(LEFT_ALONE_POLL_S)
            for st in self.links.values():
                if st.addressing.mode == "none":
                    async with st.lock:
                        await self._follow_left_alone(st)

    async def _follow_left_alone(self, st: _LinkState) -> None:
        """The link's table and rules from the IPv4 address and gateway on its device (the
        link sockets are IPv4), when they changed since the last time."""
        try:
            v4 = _ipv4(st.link.device)
        except OSError:
            v4 = None
        gw = _gateway(st.link.device)
        if gw is not None and ":" in gw:
            gw = None
        seen = (v4, gw if v4 else None)
        if seen == st.table_from and (st.error is None or self.clock() < st.table_retry_at):
            return
        plan = st.plan(4, [v4] if v4 else [], seen[1])
        plan.keep_device = True
        st.table_from = seen
        try:
            await asyncio.to_thread(self.apply_worker, plan)
        except (NetcfgError, OSError) as e:
            st.error = f"routing table {link_table(st.link_id)}: {e}"
            st.table_retry_at = self.clock() + LEFT_ALONE_RETRY_S
            log.error("link %s: %s", st.link.name, st.error)
            return
        st.error = None
        log.info(
            "link %s: table %d from the device's %s", st.link.name, link_table(st.link_id),
            f"{v4} via {seen[1]}" if seen[1] else (v4 or "lack of an address"),
        )

    async def apply_all(self) -> None:
        """Failures are reported in `links` and the log, never fatal: the box must stay
        reachable on its console."""
        for st in self.links.values():
            if st.addressing.mode == "none":
                async with st.lock:
                    await self._follow_left_alone(st)
                continue
            try:
                async with st.lock:
                    await self._apply(st)
                log.info(
                    "link %s: %s applied (%s)", st.link.name, st.addressing.describe(), st.source
                )
            except (NetcfgError, OSError) as e:
                st.error = str(e)
                log.error("link %s: %s not applied: %s", st.link.name, st.addressing.describe(), e)

    async def close(self) -> None:
        """Stop the DHCP clients and, once started, remove what socketd put in the kernel for
        the links: their tables and rules, and the VLAN devices it made (never an address:
        a stopped socketd leaves the box reachable where it was)."""
        for task in (self._watch_task, self._start_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for st in self.links.values():
            await self._stop_dhcp(st)
        if self._start_task is None:
            return
        teardown = Teardown(
            link_ids=[st.link_id for st in self.links.values()],
            vlans=[st.link.device for st in self.links.values() if st.link.vlan is not None],
        )
        try:
            await asyncio.to_thread(self.teardown_worker, teardown)
        except (NetcfgError, OSError) as e:
            log.error("links' tables and VLAN devices not all removed: %s", e)

    # ---------------------------------------------------------------- applying

    async def _apply(self, st: _LinkState) -> None:
        a = st.addressing
        if a.mode != "dhcp":
            await self._stop_dhcp(st)
        if a.mode == "static":
            assert a.address is not None and a.gateway is not None
            iface = ipaddress.ip_interface(a.address)
            plan = st.plan(iface.version, [a.address], a.gateway)
            await asyncio.to_thread(self.apply_worker, plan)
        elif a.mode == "dhcp":
            await self._stop_dhcp(st)
            await self._start_dhcp(st)
        st.error = None
        st.applied_at = self.clock()
        st.table_from = None

    async def _start_dhcp(self, st: _LinkState) -> None:
        argv = udhcpc_command()
        if argv is None:
            raise NetcfgError("no DHCP client: neither udhcpc nor busybox is installed")
        if self._script is None:
            try:
                self._script = script_path(self.control_socket.parent)
            except OSError as e:
                raise NetcfgError(f"cannot write the udhcpc script: {e}") from e
        self._generation += 1
        d = _Dhcp(self._generation)
        st.dhcp = d
        argv = [
            *argv,
            "-f",
            "-i",
            st.link.device,
            "-s",
            str(self._script),
            "-t",
            "4",
            "-T",
            "2",
            "-A",
            "5",
        ]
        env = {
            **os.environ,
            ENV_SOCKET: str(self.control_socket),
            ENV_LINK: st.link.name,
            ENV_GENERATION: str(d.generation),
        }
        await self._spawn(st, d, argv, env)
        d.task = asyncio.get_running_loop().create_task(self._supervise(st, d, argv, env))

    async def _spawn(self, st: _LinkState, d: _Dhcp, argv: list[str], env: dict[str, str]) -> None:
        try:
            d.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                preexec_fn=die_with_parent,
            )
        except OSError as e:
            d.state = "failed"
            raise NetcfgError(f"cannot start {argv[0]}: {e.strerror or e}") from e
        d.state = "requesting"
        log.info(
            "link %s: udhcpc started on %s (pid %d)", st.link.name, st.link.device, d.proc.pid
        )

    async def _supervise(
        self, st: _LinkState, d: _Dhcp, argv: list[str], env: dict[str, str]
    ) -> None:
        """Log udhcpc's output and restart it if it dies while DHCP is still wanted."""
        while not d.stopping:
            proc = d.proc
            if proc is not None and proc.stdout is not None:
                async for raw in proc.stdout:
                    log.info("udhcpc %s: %s", st.link.name, raw.decode(errors="replace").rstrip())
                rc = await proc.wait()
                if d.stopping:
                    return
                if d.retry_in is None:
                    log.warning(
                        "link %s: udhcpc exited with %s; restarting in %g s",
                        st.link.name,
                        rc,
                        UDHCPC_RESTART_S,
                    )
                    st.error = f"udhcpc exited with status {rc}"
            delay, d.retry_in = d.retry_in, None
            if delay is not None:
                log.info("link %s: asking for another lease in %g s", st.link.name, delay)
            await asyncio.sleep(UDHCPC_RESTART_S if delay is None else delay)
            if d.stopping:
                return
            d.restarts += 1
            try:
                await self._spawn(st, d, argv, env)
            except NetcfgError as e:
                st.error = str(e)
                log.error("link %s: %s", st.link.name, e)

    async def _stop_dhcp(self, st: _LinkState) -> None:
        d, st.dhcp = st.dhcp, None
        if d is None:
            return
        d.stopping = True
        d.state = "stopped"
        proc = d.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), UDHCPC_STOP_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if d.task is not None:
            d.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await d.task

    # ---------------------------------------------------------------- control commands

    def _link_state(self, name: Any) -> _LinkState:
        if not isinstance(name, str) or not name:
            raise ValueError("link: expected a link name")
        st = self.links.get(name)
        if st is None:
            known = ", ".join(self.links) or "none"
            raise ValueError(f"no link {name!r} (links: {known})")
        return st

    def status_of(self, st: _LinkState) -> dict[str, Any]:
        seen = observe(st.link.device)
        a = st.addressing
        entry: dict[str, Any] = {
            "name": st.link.name,
            "interface": st.link.device,
            # A VLAN link's device is its VLAN on this one.
            "vlan": (
                {"id": st.link.vlan, "on": st.link.interface} if st.link.vlan is not None else None
            ),
            "port": st.link.port,
            "precedence": st.link.precedence,
            "altwan": st.link.altwan,  # an Alt-WAN link: its precedence means nothing
            "state": seen["state"],
            "addressing": a.mode,
            "source": st.source,
            "address": seen["address"],
            "addresses": seen["addresses"],
            "gateway": seen["gateway"],
            "static": (
                {"address": a.address, "gateway": a.gateway} if a.mode == "static" else None
            ),
            "dhcp": None,
            "table": link_table(st.link_id),
            "rule_priorities": list(link_rule_priorities(st.link_id)),
            "error": st.error,
        }
        d = st.dhcp
        if a.mode == "dhcp" and d is not None:
            lease = d.lease or {}
            entry["dhcp"] = {
                "state": d.state,
                "address": lease.get("address"),
                "gateway": lease.get("gateway"),
                "server": lease.get("server"),
                "lease_s": lease.get("lease_s"),
                "bound_s": (
                    round(self.clock() - d.bound_at, 1) if d.bound_at is not None else None
                ),
                "restarts": d.restarts,
                "refused": dict(st.refused) if st.refused is not None else None,
            }
        return entry

    async def _links(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"links": [self.status_of(st) for st in self.links.values()]}

    async def _set_link(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self._link_state(req.get("link"))
        mode = req.get("mode")
        if mode == "static":
            new = self._checked(Addressing.static(req.get("address"), req.get("gateway")))
        elif mode == "dhcp":
            extra = [k for k in ("address", "gateway") if req.get(k) is not None]
            if extra:
                raise ValueError(f"{extra[0]} is only for mode static")
            new = Addressing("dhcp")
        else:
            raise ValueError(f"mode: expected static or dhcp, got {mode!r}")
        if self.store is None:
            raise ValueError("no store: the setting could not be saved (see the log for why)")
        origin = req.get("origin")
        origin = origin if isinstance(origin, str) and origin.isprintable() else "control socket"
        async with st.lock:
            old, old_source = st.addressing, st.source
            st.addressing, st.source = new, "stored"
            try:
                await self._apply(st)
            except (NetcfgError, OSError) as e:
                st.addressing, st.source = old, old_source
                st.error = f"{new.describe()} not applied: {e}"
                raise ValueError(f"link {st.link.name}: {new.describe()} not applied: {e}") from e
            try:
                self.store.put_doc(doc_name(st.link.name), new.to_dict())
            except Exception as e:
                st.error = f"applied but not saved: {e}"
                raise ValueError(
                    f"link {st.link.name}: {new.describe()} applied but not saved: {e}"
                ) from e
        self.record(
            "link.addressing",
            f"link {st.link.name} ({st.link.device}): {new.describe()}, set by {origin}",
            {"link": st.link.name, **new.to_dict(), "origin": origin},
        )
        return self.status_of(st)

    async def _on_lease(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self._link_state(req.get("link"))
        event = req.get("event")
        if event not in _LEASE_EVENTS:
            raise ValueError(f"event: expected one of {', '.join(_LEASE_EVENTS)}, got {event!r}")
        d = st.dhcp
        if st.addressing.mode != "dhcp" or d is None or req.get("generation") != d.generation:
            # A late event of a udhcpc that was replaced or stopped: never let it act.
            return {"ignored": True}
        async with st.lock:
            if st.dhcp is not d or d.stopping:
                return {"ignored": True}
            if event == "deconfig":
                plan = st.plan(4, [], None)
                await asyncio.to_thread(self.apply_worker, plan)
                if d.state == "bound":
                    self.record(
                        "link.dhcp",
                        f"link {st.link.name}: DHCP lease lost",
                        {"link": st.link.name, "event": event},
                    )
                d.state, d.lease, d.bound_at = "requesting", None, None
                return {"applied": True}
            if event in ("leasefail", "nak"):
                if d.state != "requesting":
                    d.state = "requesting"
                st.error = (
                    "no DHCP lease yet (no answer from a server)"
                    if event == "leasefail"
                    else "the DHCP server refused the lease (NAK)"
                )
                return {"applied": False}
            server = _server_of(req.get("serverid"))
            try:
                iface = self._lease_address(req)
            except ValueError as e:
                return await self._refuse(st, d, req, server, str(e))
            gateway = None
            for r in str(req.get("router") or "").split():
                with contextlib.suppress(ValueError):
                    if ipaddress.IPv4Address(r) in iface.network:
                        gateway = r
                        break
            plan = st.plan(4, [str(iface)], gateway)
            try:
                await asyncio.to_thread(self.apply_worker, plan)
            except NetcfgError as e:
                st.error = f"DHCP lease {iface} not applied: {e}"
                raise
            changed = d.lease is None or d.lease.get("address") != str(iface)
            lease_s = req.get("lease")
            d.lease = {
                "address": str(iface),
                "gateway": gateway,
                "server": server,
                "lease_s": int(lease_s) if str(lease_s or "").isdigit() else None,
            }
            d.state = "bound"
            d.refusals = 0
            st.refused = None
            if changed or d.bound_at is None:
                d.bound_at = self.clock()
            st.error = None
            if changed:
                via = f" via {gateway}" if gateway else " (no gateway offered)"
                self.record(
                    "link.dhcp",
                    f"link {st.link.name} ({st.link.device}): DHCP lease {iface}{via}",
                    {"link": st.link.name, "event": event, **d.lease},
                )
            return {"applied": True}


    def _lease_address(self, req: dict[str, Any]) -> ipaddress.IPv4Interface:
        """The leased address with its prefix, checked like a static one; ValueError why not."""
        raw = req.get("ip")
        try:
            ip = ipaddress.IPv4Address(str(raw))
        except ValueError:
            raise ValueError(f"{_show(raw)} is not an IPv4 address") from None
        iface = ipaddress.IPv4Interface(f"{ip}/{prefix_of(req.get('subnet'), req.get('mask'))}")
        check_wan_address(iface, self.owned)
        return iface

    async def _refuse(
        self, st: _LinkState, d: _Dhcp, req: dict[str, Any], server: str | None, reason: str
    ) -> dict[str, Any]:
        """Refuse a lease: nothing of it reaches the device; say so once (event, `links`), and
        ask for another lease after a pause."""
        lease = _lease_text(req)
        if d.state == "bound":
            # The server's new answer replaces the lease applied before: that one goes too.
            plan = st.plan(4, [], None)
            await asyncio.to_thread(self.apply_worker, plan)
        d.state, d.lease, d.bound_at = "refused", None, None
        d.refusals += 1
        who = f"server {server}" if server else "a server that gave no server id"
        st.error = f"DHCP lease {lease} from {who} refused: {reason}"
        refusal = {"address": lease, "server": server, "reason": reason}
        now = self.clock()
        repeat = (
            st.refused == refusal
            and st.refused_event_at is not None
            and now - st.refused_event_at < REFUSED_EVENT_REPEAT_S
        )
        st.refused = refusal
        delay = min(REFUSED_RETRY_S * 2 ** (d.refusals - 1), REFUSED_RETRY_MAX_S)
        log.warning("link %s: %s; asking again in %g s", st.link.name, st.error, delay)
        if not repeat:
            st.refused_event_at = now
            self.record(
                "link.dhcp_refused",
                f"link {st.link.name} ({st.link.device}): {st.error}",
                {"link": st.link.name, **refusal},
            )
        # udhcpc would keep the lease until its renewal: stop it (once its script has our
        # answer) and start it again after the pause, to look for another lease.
        d.retry_in = delay
        proc = d.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        return {"applied": False, "refused": reason}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _server_of(value: Any) -> str | None:
    """The lease's server id (DHCP option 54) as an address, or what it was, shortened."""
    if value is None or value == "":
        return None
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        return _show(value)


def _lease_text(req: dict[str, Any]) -> str:
    """The lease as "ADDR/PREFIX" for people, whatever the server sent."""
    ip = req.get("ip")
    try:
        return f"{ipaddress.IPv4Address(str(ip))}/{prefix_of(req.get('subnet'), req.get('mask'))}"
    except ValueError:
        return _show(ip)


# --------------------------------------------------------------------------- udhcpc script


def lease_main(argv: Iterable[str]) -> int:
    """The udhcpc script: `python -m sdwan.appliance.wanaddr lease EVENT`, with udhcpc's
    environment."""
    from sdwan.common.control import ControlError, request

    args = list(argv)
    if len(args) != 2 or args[0] != "lease":
        print(
            "usage: python -m sdwan.appliance.wanaddr lease EVENT (run by udhcpc)",
            file=sys.stderr,
        )
        return 2
    event = args[1]
    env = os.environ
    sock, link, gen = env.get(ENV_SOCKET), env.get(ENV_LINK), env.get(ENV_GENERATION)
    if not sock or not link or not (gen or "").isdigit():
        print(
            f"wanaddr: {ENV_SOCKET}, {ENV_LINK} and {ENV_GENERATION} must be set by socketd",
            file=sys.stderr,
        )
        return 2
    if event not in _LEASE_EVENTS:
        return 0  # udhcpc has other events (e.g. "renew" variants on newer versions); not ours
    fields = {k: env.get(k) for k in ("ip", "subnet", "mask", "router", "serverid", "lease")}
    try:
        result = request(
            sock,
            "dhcp-lease",
            timeout=LEASE_REQUEST_TIMEOUT_S,
            link=link,
            generation=int(str(gen)),
            event=event,
            **fields,
        )
    except ControlError as e:
        print(f"wanaddr: {event} for link {link}: {e}", file=sys.stderr)
        return 1
    if result.get("ignored"):
        print(f"wanaddr: {event} for link {link} ignored (DHCP no longer wanted)", file=sys.stderr)
    return 0


def script_main() -> int:
    """`socketd-udhcpc-script EVENT`, the installed form of the script."""
    return lease_main(["lease", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(lease_main(sys.argv[1:]))
