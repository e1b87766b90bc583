"""Kernel network configuration of a site: tunnel device MTU and state, routes
to the peers' subnets through it, TCP MSS clamping, and the addresses and
default route of a WAN device (an `AddrPlan`, decided by wanaddr.py).

It runs as a short-lived worker (`python -m sdwan.common.netcfg`, a JSON plan on
stdin) rather than inside socketd: pyroute2 costs about 24 MB of resident memory
once imported, and the supervisor has to stay small for the whole life of the
box. The worker applies the plan idempotently (routes are replaced, the nft
table is recreated), so it can run again after any change.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

# Outer IPv4 header + UDP header + the data packet's own header and tag
# (docs/dataplane.md): the tunnel device must be this much smaller than the link.
IPV4_UDP_OVERHEAD = 20 + 8
TUNNEL_OVERHEAD = 32
NFT_TABLE = "sdwan_mss"
TUN_QUEUE_LEN = 1000
# The worker's Python start and pyroute2 import take seconds on the box and were seen over
# 30 s under emulation on a loaded host; a bound that assumed a fast CPU made socketd's
# start fail in a loop there. A hung worker is still given up on, well within socketd's
# start-up watchdog timeout (docs/watchdog.md).
WORKER_TIMEOUT_S = 120.0


class NetcfgError(Exception):
    """The kernel refused part of the plan; the message says which part."""


@dataclass
class Plan:
    tun: str
    mtu: int
    routes: list[str] = field(default_factory=list)
    mss_clamp: bool = True


@dataclass
class AddrPlan:
    """The addresses of one family on a WAN device and its default route through it.

    Global addresses of that family not in `addresses` are removed (an empty list
    clears the device, as a DHCP deconfig does); every default route of the family
    through the device is replaced by one via `gateway` with `metric`, so each link
    keeps its own default route next to the other links'. Each address's prefix route
    (the kernel's on-link route to its network) gets the same metric, never the kernel's
    0: two links on one subnet keep their order, and a link's subnet never outranks the
    other links' routes by metric."""

    interface: str
    family: int  # 4 or 6
    addresses: list[str] = field(default_factory=list)  # "ADDR/PREFIX"
    gateway: str | None = None
    metric: int = 0


def tunnel_mtu(link_mtus: list[int]) -> int:
    """The largest inner packet that fits every link without fragmentation."""
    return min(link_mtus) - IPV4_UDP_OVERHEAD - TUNNEL_OVERHEAD


def mss_ruleset(tun: str) -> str:
    """An nft table that clamps the MSS of TCP SYNs leaving through the tunnel
    to what the tunnel's MTU allows, so large segments are never black-holed."""
    return (
        f"table inet {NFT_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority mangle; policy accept;\n"
        f'    oifname "{tun}" tcp flags syn tcp option maxseg size set rt mtu\n'
        "  }\n"
        "  chain output {\n"
        "    type route hook output priority mangle; policy accept;\n"
        f'    oifname "{tun}" tcp flags syn tcp option maxseg size set rt mtu\n'
        "  }\n"
        "}\n"
    )


def _nft(script: str) -> None:
    proc = subprocess.run(
        ["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=10
    )
    if proc.returncode != 0:
        raise NetcfgError(f"nft refused the MSS clamp rules: {proc.stderr.strip()}")


def _apply_mss(plan: Plan) -> None:
    # Delete-then-add keeps the table exactly as planned; a missing table is fine.
    subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, timeout=10)
    if plan.mss_clamp:
        _nft(mss_ruleset(plan.tun))


async def _apply_links(plan: Plan) -> None:
    from pyroute2 import AsyncIPRoute  # only the worker pays for pyroute2

    async with AsyncIPRoute() as ipr:
        found = await ipr.link_lookup(ifname=plan.tun)
        if not found:
            raise NetcfgError(f"tunnel device {plan.tun} does not exist")
        index = found[0]
        try:
            # A longer queue than the TUN default of 500 absorbs bursts of small
            # packets while the fast path's thread is descheduled.
            await ipr.link("set", index=index, mtu=plan.mtu, txqlen=TUN_QUEUE_LEN, state="up")
        except Exception as e:
            raise NetcfgError(f"cannot set {plan.tun} mtu {plan.mtu} up: {e}") from e
        for dst in plan.routes:
            try:
                await ipr.route("replace", dst=dst, oif=index)
            except Exception as e:
                raise NetcfgError(f"cannot route {dst} via {plan.tun}: {e}") from e


def _ipv6_on_tunnel(plan: Plan) -> None:
    # Without IPv6 subnets the kernel would still send router solicitations and
    # MLD reports into the tunnel, which the fast path can only drop as no_route.
    wanted = any(":" in r for r in plan.routes)
    path = f"/proc/sys/net/ipv6/conf/{plan.tun}/disable_ipv6"
    try:
        with open(path, "w") as f:
            f.write("0" if wanted else "1")
    except FileNotFoundError:
        pass  # a kernel without IPv6


async def _apply_addressing(plan: AddrPlan) -> None:
    import ipaddress
    import socket

    from pyroute2 import AsyncIPRoute

    family = socket.AF_INET if plan.family == 4 else socket.AF_INET6
    wanted = {ipaddress.ip_interface(a) for a in plan.addresses}
    async with AsyncIPRoute() as ipr:
        found = await ipr.link_lookup(ifname=plan.interface)
        if not found:
            raise NetcfgError(f"device {plan.interface} does not exist")
        index = found[0]
        try:
            await ipr.link("set", index=index, state="up")
        except Exception as e:
            raise NetcfgError(f"cannot set {plan.interface} up: {e}") from e
        present: dict[Any, int | None] = {}  # address -> metric of its prefix route
        async for a in await ipr.addr("dump", index=index, family=family):
            if a["scope"] != 0:  # link-local addresses belong to the kernel
                continue
            iface = ipaddress.ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            present[iface] = a.get("IFA_RT_PRIORITY")
        for old in set(present) - wanted:
            try:
                await ipr.addr(
                    "del", index=index, address=str(old.ip), prefixlen=old.network.prefixlen
                )
            except Exception as e:
                raise NetcfgError(f"cannot remove {old} from {plan.interface}: {e}") from e
        for new in wanted:
            if new in present and (present[new] or 0) == plan.metric:
                continue
            # The address's metric is its prefix route's (IFA_RT_PRIORITY); "replace" changes
            # it on an address already there.
            try:
                await ipr.addr(
                    "replace" if new in present else "add",
                    index=index,
                    address=str(new.ip),
                    prefixlen=new.network.prefixlen,
                    IFA_RT_PRIORITY=plan.metric,
                )
            except Exception as e:
                raise NetcfgError(f"cannot add {new} to {plan.interface}: {e}") from e
        # Removing an address may already have taken its routes with it.
        defaults = [
            r
            async for r in await ipr.route("dump", family=family, oif=index)
            if r["dst_len"] == 0 and r["table"] == 254
        ]
        for r in defaults:
            with contextlib.suppress(Exception):
                await ipr.route(
                    "del",
                    dst="default",
                    family=family,
                    oif=index,
                    priority=r.get("RTA_PRIORITY") or 0,
                    gateway=r.get("RTA_GATEWAY"),
                )
        if plan.gateway:
            try:
                await ipr.route(
                    "replace",
                    dst="default",
                    family=family,
                    gateway=plan.gateway,
                    oif=index,
                    priority=plan.metric,
                )
            except Exception as e:
                raise NetcfgError(
                    f"cannot route default via {plan.gateway} dev {plan.interface}: {e}"
                ) from e


def apply_addressing(plan: AddrPlan) -> None:
    if plan.family not in (4, 6):
        raise NetcfgError(f"address family must be 4 or 6, got {plan.family}")
    import asyncio  # the worker's alone (see apply)

    asyncio.run(_apply_addressing(plan))


def apply_addressing_in_worker(plan: AddrPlan, timeout: float = WORKER_TIMEOUT_S) -> None:
    """Apply a WAN device's addressing in a child process, like `apply_in_worker`."""
    Worker().run({"addressing": asdict(plan)}, timeout)


def apply(plan: Plan) -> None:
    import asyncio  # the worker's alone: socketd imports this module first thing

    _ipv6_on_tunnel(plan)
    asyncio.run(_apply_links(plan))
    _apply_mss(plan)


def apply_in_worker(plan: Plan, timeout: float = WORKER_TIMEOUT_S) -> None:
    """Apply `plan` in a child process (see the module docstring for why)."""
    Worker().run(asdict(plan), timeout)


class Worker:
    """One worker process. Started ahead of its plan, it imports pyroute2 while its parent
    is still loading (socketd starts one first thing, so that the two load side by side),
    then waits for one plan on stdin. apply() hands it over; close() ends a worker never
    used."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", "sdwan.common.netcfg"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def apply(self, plan: Plan, timeout: float = WORKER_TIMEOUT_S) -> None:
        """Apply plan in this worker; a second call starts a fresh one."""
        self.run(asdict(plan), timeout)

    def run(self, doc: dict, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            Worker().run(doc, timeout)
            return
        try:
            _, err = proc.communicate(json.dumps(doc), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise NetcfgError(f"netcfg worker did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            raise NetcfgError(err.strip() or f"netcfg worker exited {proc.returncode}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.communicate()


def main() -> int:
    # Before the plan is read: a Worker is started ahead of its plan so that this import
    # runs while its parent is still loading.
    import pyroute2  # noqa: F401

    try:
        doc = json.load(sys.stdin)
        if isinstance(doc, dict) and "addressing" in doc:
            apply_addressing(AddrPlan(**doc["addressing"]))
        else:
            apply(Plan(**doc))
    except (NetcfgError, TypeError, ValueError) as e:
        print(f"netcfg: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
