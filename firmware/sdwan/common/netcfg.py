"""Kernel network configuration of a site: tunnel device MTU and state, routes
to the peers' subnets through it, TCP MSS clamping, the addresses and
default route of a WAN device (an `AddrPlan`, decided by wanaddr.py) with the
link's own policy-routing table and rules, and the 802.1Q VLAN devices of
VLAN links (made at start, removed at stop if socketd made them).

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

# Each WAN link has a policy-routing table of its own (docs/links.md, "Routing tables"), so that
# what is sent from a link's address leaves by that link whatever the main table's default
# routes say. Link n (config order + 1, 1..4) has table LINK_TABLE_BASE + n and two rules for
# each of its addresses:
#   LINK_MAIN_RULE_PRIORITY_BASE + n: from ADDR lookup main suppress_prefixlength 0
#   LINK_RULE_PRIORITY_BASE + n:      from ADDR lookup <link table>
# The first keeps what the main table routes more narrowly than by a default route (the LAN,
# the tunnel's prefixes, connected networks) where it is; only what would take a default route
# is pinned to the link.
LINK_TABLE_BASE = 100
LINK_MAIN_RULE_PRIORITY_BASE = 900
LINK_RULE_PRIORITY_BASE = 1000
MAIN_TABLE = 254
# Every route and rule socketd puts there carries this protocol number (`proto 115` in ip's
# output): it changes and removes only its own, never an operator's in the same table or at
# the same priority, also after a crash left them behind.
RT_PROTO_SDWAN = 115
# The ifalias of a VLAN device socketd made: only those are removed when it stops.
VLAN_ALIAS = "sdwan: made by socketd"
_RT_SCOPE_LINK = 253
_EOPNOTSUPP = 95


def link_table(link_id: int) -> int:
    return LINK_TABLE_BASE + link_id


def link_rule_priorities(link_id: int) -> tuple[int, int]:
    """(main table with its default routes suppressed, the link's table), in lookup order."""
    return LINK_MAIN_RULE_PRIORITY_BASE + link_id, LINK_RULE_PRIORITY_BASE + link_id


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
    # The link's own table and rules follow `addresses` and `gateway` too (0: none).
    link_id: int = 0
    # Addressing left to the system: the device's addresses and main routes are not touched,
    # only the link's table and rules follow what was found on it.
    keep_device: bool = False


@dataclass
class VlanPlan:
    """An 802.1Q device `device` for VLAN `vlan` on `parent`: made (and marked as socketd's)
    when missing, brought up; one that exists must be that VLAN on that parent."""

    device: str
    parent: str
    vlan: int


@dataclass
class Teardown:
    """What socketd installed and removes when it stops: the tables and rules of `link_ids`,
    and those of the VLAN devices `vlans` it made."""

    link_ids: list[int] = field(default_factory=list)
    vlans: list[str] = field(default_factory=list)


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
        if not plan.keep_device:
            await _apply_device(ipr, index, family, wanted, plan)
        if plan.link_id:
            await _sync_link_table(ipr, index, family, sorted(wanted), plan)


async def _apply_device(
    ipr: Any, index: int, family: int, wanted: set[Any], plan: AddrPlan
) -> None:
    import ipaddress

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


async def _sync_link_table(
    ipr: Any, index: int, family: int, addresses: list[Any], plan: AddrPlan
) -> None:
    """Make the link's table and rules what its addresses and gateway call for: each address's
    network and the default route via the gateway in the table, the two rules per address
    (see LINK_TABLE_BASE); socketd's own routes and rules there that are no longer called for
    go. No address: nothing of the link's is left."""
    import ipaddress

    table = link_table(plan.link_id)
    where = f"table {table} of {plan.interface}"
    routes: dict[tuple[str | None, int], dict[str, Any]] = {}
    for a in addresses:
        net = a.network
        routes[(str(net.network_address), net.prefixlen)] = {
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "scope": _RT_SCOPE_LINK,
            "prefsrc": str(a.ip),
        }
    if plan.gateway and addresses:
        # After the networks: the kernel resolves the gateway in this table.
        routes[(None, 0)] = {"dst": "default", "gateway": plan.gateway}
    for key, spec in routes.items():
        try:
            await ipr.route(
                "replace", family=family, oif=index, table=table, proto=RT_PROTO_SDWAN, **spec
            )
        except Exception as e:
            what = "default via " + str(plan.gateway) if key[0] is None else f"{key[0]}/{key[1]}"
            raise NetcfgError(f"cannot route {what} in {where}: {e}") from e
    async for r in await ipr.route("dump", family=family, table=table):
        if r["proto"] != RT_PROTO_SDWAN or r.get("RTA_TABLE", r["table"]) != table:
            continue
        dst = r.get("RTA_DST")
        key = (str(ipaddress.ip_address(dst)) if dst else None, r["dst_len"])
        if key not in routes:
            await _del_route(ipr, family, table, r)

    main_prio, table_prio = link_rule_priorities(plan.link_id)
    bits = 32 if plan.family == 4 else 128
    rules = {(main_prio, str(a.ip), MAIN_TABLE) for a in addresses} | {
        (table_prio, str(a.ip), table) for a in addresses
    }
    present = set()
    async for r in await ipr.rule("dump", family=family):
        key = (r.get("FRA_PRIORITY"), r.get("FRA_SRC"), r.get("FRA_TABLE", r["table"]))
        if r.get("FRA_PROTOCOL") != RT_PROTO_SDWAN or key[0] not in (main_prio, table_prio):
            continue
        if key in rules:
            present.add(key)
        else:
            await _del_rule(ipr, family, r)
    for prio, src, _table in sorted(rules - present):
        extra = {"table": MAIN_TABLE, "suppress_prefixlen": 0} if prio == main_prio else {
            "table": table
        }
        try:
            await ipr.rule(
                "add",
                family=family,
                priority=prio,
                src=src,
                src_len=bits,
                protocol=RT_PROTO_SDWAN,
                **extra,
            )
        except Exception as e:
            raise NetcfgError(f"cannot add the rule from {src} (priority {prio}): {e}") from e


async def _del_route(ipr: Any, family: int, table: int, r: Any) -> None:
    # Gone already (its device or address went) is as good as removed.
    with contextlib.suppress(Exception):
        await ipr.route(
            "del",
            family=family,
            table=table,
            dst=r.get("RTA_DST") or "default",
            dst_len=r["dst_len"],
            proto=RT_PROTO_SDWAN,
            # As dumped: a delete with the default (global) scope misses an on-link route.
            scope=r["scope"],
        )


async def _del_rule(ipr: Any, family: int, r: Any) -> None:
    src = r.get("FRA_SRC")
    with contextlib.suppress(Exception):
        await ipr.rule(
            "del",
            family=family,
            priority=r.get("FRA_PRIORITY"),
            table=r.get("FRA_TABLE", r["table"]),
            protocol=RT_PROTO_SDWAN,
            **({"src": src, "src_len": r["src_len"]} if src else {}),
        )


async def _teardown(plan: Teardown) -> None:
    import socket

    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            ours = {p for n in plan.link_ids for p in link_rule_priorities(n)}
            async for r in await ipr.rule("dump", family=family):
                if r.get("FRA_PROTOCOL") == RT_PROTO_SDWAN and r.get("FRA_PRIORITY") in ours:
                    await _del_rule(ipr, family, r)
            for n in plan.link_ids:
                table = link_table(n)
                async for r in await ipr.route("dump", family=family, table=table):
                    if r["proto"] == RT_PROTO_SDWAN and r.get("RTA_TABLE", r["table"]) == table:
                        await _del_route(ipr, family, table, r)
        for name in plan.vlans:
            found = await ipr.link_lookup(ifname=name)
            if not found:
                continue
            (msg,) = await ipr.link("get", index=found[0])
            if msg.get("IFLA_IFALIAS") == VLAN_ALIAS:
                try:
                    await ipr.link("del", index=found[0])
                except Exception as e:
                    raise NetcfgError(f"cannot remove VLAN device {name}: {e}") from e


async def _ensure_vlans(vlans: list[VlanPlan]) -> None:
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    async with AsyncIPRoute() as ipr:
        for v in vlans:
            what = f"VLAN {v.vlan} on {v.parent} ({v.device})"
            found = await ipr.link_lookup(ifname=v.parent)
            if not found:
                raise NetcfgError(f"{what}: device {v.parent} does not exist")
            parent = found[0]
            try:
                # A VLAN device has carrier only while its parent is up.
                await ipr.link("set", index=parent, state="up")
            except Exception as e:
                raise NetcfgError(f"{what}: cannot set {v.parent} up: {e}") from e
            existing = await ipr.link_lookup(ifname=v.device)
            if existing:
                (msg,) = await ipr.link("get", index=existing[0])
                kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
                vid = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VLAN_ID")
                if kind != "vlan" or vid != v.vlan or msg.get("IFLA_LINK") != parent:
                    raise NetcfgError(
                        f"{what}: a device {v.device} exists and is not that VLAN"
                        f" (kind {kind or 'unknown'}, VLAN {vid})"
                    )
                index = existing[0]
            else:
                try:
                    await ipr.link("add", ifname=v.device, kind="vlan", link=parent, vlan_id=v.vlan)
                except NetlinkError as e:
                    if e.code == _EOPNOTSUPP:
                        raise NetcfgError(
                            f"{what}: this kernel has no 802.1Q VLAN support"
                            " (CONFIG_VLAN_8021Q, module 8021q)"
                        ) from e
                    raise NetcfgError(f"{what}: cannot make the device: {e}") from e
                (index,) = await ipr.link_lookup(ifname=v.device)
                try:
                    await ipr.link("set", index=index, ifalias=VLAN_ALIAS)
                except Exception as e:
                    with contextlib.suppress(Exception):
                        await ipr.link("del", index=index)
                    raise NetcfgError(f"{what}: cannot mark the device as socketd's: {e}") from e
            try:
                await ipr.link("set", index=index, state="up")
            except Exception as e:
                raise NetcfgError(f"{what}: cannot set {v.device} up: {e}") from e


def apply_addressing(plan: AddrPlan) -> None:
    if plan.family not in (4, 6):
        raise NetcfgError(f"address family must be 4 or 6, got {plan.family}")
    import asyncio  # the worker's alone (see apply)

    asyncio.run(_apply_addressing(plan))


def apply_addressing_in_worker(plan: AddrPlan, timeout: float = WORKER_TIMEOUT_S) -> None:
    """Apply a WAN device's addressing in a child process, like `apply_in_worker`."""
    Worker().run({"addressing": asdict(plan)}, timeout)


def ensure_vlans_in_worker(vlans: list[VlanPlan], timeout: float = WORKER_TIMEOUT_S) -> None:
    """Make the VLAN devices of the VLAN links (those missing) and bring them up."""
    Worker().run({"vlans": [asdict(v) for v in vlans]}, timeout)


def teardown_in_worker(plan: Teardown, timeout: float = WORKER_TIMEOUT_S) -> None:
    """Remove the links' tables and rules and the VLAN devices socketd made."""
    Worker().run({"teardown": asdict(plan)}, timeout)


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
    import asyncio

    # Before the plan is read: a Worker is started ahead of its plan so that this import
    # runs while its parent is still loading.
    import pyroute2  # noqa: F401

    try:
        doc = json.load(sys.stdin)
        if isinstance(doc, dict) and "addressing" in doc:
            apply_addressing(AddrPlan(**doc["addressing"]))
        elif isinstance(doc, dict) and "vlans" in doc:
            asyncio.run(_ensure_vlans([VlanPlan(**v) for v in doc["vlans"]]))
        elif isinstance(doc, dict) and "teardown" in doc:
            asyncio.run(_teardown(Teardown(**doc["teardown"])))
        else:
            apply(Plan(**doc))
    except (NetcfgError, TypeError, ValueError) as e:
        print(f"netcfg: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
