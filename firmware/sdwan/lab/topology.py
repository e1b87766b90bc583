"""The lab: a small Internet of network namespaces, built and always torn down by `Lab`.

Lab owns the namespaces it creates (names carry a random tag and the owner's pid, e.g.
``swa3f-4242-inet``, so parallel or leftover labs never collide), the daemons it spawns
(socketd, iperf3 servers, ...), their logs, and the files under its workdir. Leaving the
``with Lab(...)`` block - normally, by exception or by Ctrl-C - stops every daemon (TERM,
then KILL) and deletes every namespace. `cleanup_stale()` removes namespaces left by a run
that was killed outright (its owner pid is gone).

Addressing (docs/lab.md has the picture):

* ``inet``: bridge ``br0`` with 198.51.100.1/24 and 203.0.113.1/24, routing between them.
  Router n's public address is 198.51.100.(10+n); 203.0.113.10 is kept for the PoP.
* router n <-> site n: 100.64.n.0/24, router .1 (``site<n>``), site .2 (``wan1``).
* site n LAN: 10.n.0.0/24, site .1 (``lan0``), LAN host .2 (``eth0``). A site added with
  ``lan_dhcp=True`` leaves both unaddressed: socketd puts `[lan] address` on ``lan0`` and
  serves DHCP, and `Lab.lan_dhcp_client` gets the LAN host its address from it.
* NAT on routers with nftables: ``masquerade`` (port preserving), ``random`` (masquerade
  fully-random), ``shift`` (UDP toward non-PoP addresses leaves with a port offset),
  ``none`` (no router: the site's WAN sits on the inet bridge with the public address).
  A router given ``upstream=m`` sits behind router m (double NAT / CGNAT on 100.65.n.0/24).
* ``altwan``: a private network between sites, the lab's MPLS (`add_altwan_link`): bridge
  ``br0`` in a namespace of its own, site n's second link ``alt1`` at 10.200.0.n/24. No NAT,
  no router, no way to the Internet; `cut_altwan` drops everything it would carry.
* More Internet uplinks (`add_wan_link`): site n's uplink k (2..4), device ``wan<k>``, at
  100.(64+k).n.2/24 behind its own NAT router ``rtr<n>-<k>`` (a second ISP) whose public
  address is 198.18.k.(10+n) on the inet bridge (198.18.0.1/15 there), or behind an existing
  router. Its default route has metric 10*(k-1), so link 1 stays the site's default.
* An impairment element (`sdwan.lab.impair`) can sit in the middle of any uplink's cable, in
  a namespace ``imp<n>-<k>`` of its own: loss, delay, jitter, duplication, reordering.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdwan.lab import netns
from sdwan.lab.impair import ImpairElement, prepare_namespace
from sdwan.lab.netns import Daemon, NetnsError

LAB_PREFIX = "sw"
_NS_RE = re.compile(rf"^{LAB_PREFIX}([0-9a-f]{{3}})-(\d+)-([A-Za-z0-9_.-]+)$")

INET_BRIDGE = "br0"
INET_BRIDGE_MAC = "02:00:5e:00:00:01"
PUBLIC_NET = ipaddress.ip_network("198.51.100.0/24")
POP_NET = ipaddress.ip_network("203.0.113.0/24")
POP_IP = "203.0.113.10"
ALTWAN_NET = ipaddress.ip_network("10.200.0.0/24")
ALTWAN_BRIDGE = "br0"
ALTWAN_DEV = "alt1"
ALTWAN_CUT = "altwan_cut"
SOCKETD_PORT = 4800
# The public range of the lab's other ISPs (uplinks 2..4): RFC 2544's benchmarking block, a
# /15 so that uplink k of site n is 198.18.k.(10+n) without colliding with router n.
ISP_NET = ipaddress.ip_network("198.18.0.0/15")
MAX_UPLINKS = 4
_SUN_PATH_MAX = 100
NAT_MODES = ("masquerade", "random", "shift", "none")

# Where `python -m sdwan.*` finds the package when the distribution is not installed.
_FIRMWARE_DIR = Path(__file__).resolve().parents[2]


# The lab runs the daemons and CLIs as modules of the venv's interpreter, not through the
# console scripts, so a lab works from a checkout whose scripts are not on PATH.
_MODULES = {
    "socketd": "sdwan.site.socketd",
    "socketctl": "sdwan.site.socketctl",
    "popd": "sdwan.pop.popd",
    "popctl": "sdwan.pop.popctl",
}


def public_ip(n: int) -> str:
    return str(PUBLIC_NET.network_address + 10 + n)


def _check_n(n: int) -> None:
    if not 1 <= n <= 200:
        raise ValueError(f"lab index must be 1..200, got {n}")


@dataclass
class PublicHost:
    """A namespace with one address on the inet bridge (the PoP later)."""

    role: str
    ns: str
    ip: str
    dev: str = "eth0"


@dataclass
class Pop:
    """A PoP (popd) on a public host: PoP n at 203.0.113.(9+n), its files under workdir/popN."""

    n: int
    host: PublicHost
    dir: Path
    port: int = SOCKETD_PORT
    stun_port: int = 3478
    popd: Daemon | None = None
    config: Path | None = None
    account: Path | None = None
    sock: Path | None = None

    @property
    def ns(self) -> str:
        return self.host.ns

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def control_socket(self) -> Path:
        return self.sock or self.dir / "control.sock"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"


@dataclass
class Router:
    """A site's NAT router. ns is None for nat='none' (the site is on the bridge itself)."""

    n: int
    nat: str
    ns: str | None
    public_ip: str
    wan_dev: str = "up0"
    upstream: Router | None = None
    shift_offset: int = 3
    shift_ports: tuple[int, ...] = (SOCKETD_PORT,)
    extra_rules: list[str] = field(default_factory=list)


@dataclass
class WanUplink:
    """One Internet uplink of a site: device `dev` in the site namespace, its address and
    gateway, the router behind it (`router_ns`/`router_dev`: the router's device toward the
    site, or the inet bridge port when the router has nat='none'), the public address the
    Internet sees, its default route's metric, and the impairment element in its cable."""

    index: int
    name: str
    dev: str
    ip: str
    prefixlen: int
    gateway: str
    router: Router
    router_ns: str
    router_dev: str
    public_ip: str
    metric: int = 0
    # Whether the router also routes the site's LAN back through this uplink.
    lan_route: bool = True
    element: ImpairElement | None = None

    @property
    def far_end(self) -> tuple[str, str]:
        """(namespace, device) at the other end of the site's cable: where carrier is cut."""
        if self.element is not None:
            return self.element.ns, self.element.site_dev
        return self.router_ns, self.router_dev


@dataclass
class Site:
    """A socketd namespace with its WAN and LAN, and the LAN host behind it.

    wan_dev, wan_ip, wan_gw, router and public_ip describe link 1; `uplinks` lists every
    Internet uplink, link 1 first (add_wan_link adds the others)."""

    n: int
    ns: str
    lan_ns: str
    router: Router
    wan_dev: str
    wan_ip: str
    wan_gw: str
    lan_dev: str
    lan_subnet: str
    lan_ip: str
    lan_host_ip: str
    public_ip: str
    dir: Path
    link_name: str = "wan1"
    port: int = SOCKETD_PORT
    # The LAN port and host are left unaddressed: socketd addresses the port ([lan] address)
    # and the host asks its DHCP server (Lab.lan_dhcp_client); lan_host_ip is then the lease.
    lan_dhcp: bool = False
    # Its Alt-WAN link, once add_altwan_link gave it one.
    altwan_dev: str | None = None
    altwan_ip: str | None = None
    socketd: Daemon | None = None
    config: Path | None = None
    sock: Path | None = None
    uplinks: list[WanUplink] = field(default_factory=list)

    @property
    def site_id(self) -> int:
        return self.n

    def uplink(self, dev: str) -> WanUplink:
        """The uplink whose device (or link name) is dev."""
        for u in self.uplinks:
            if dev in (u.dev, u.name):
                return u
        raise KeyError(f"site {self.n} has no uplink {dev!r}: {[u.dev for u in self.uplinks]}")

    @property
    def control_socket(self) -> Path:
        return self.sock or self.dir / "control.sock"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def endpoint(self) -> str:
        """Where other sites reach this socketd with a port-preserving (or no) NAT."""
        return f"{self.public_ip}:{self.port}"


@dataclass
class PeerSpec:
    """A static peer for write_site_config when it is not simply another lab Site."""

    site_id: int
    endpoint: str
    subnets: list[str]
    link: str | None = None


@dataclass
class Pki:
    dir: Path
    ca_cert: Path
    account: str


@dataclass
class PingSeries:
    """What one `ping` run saw: how many were sent, each answer's RTT, duplicate answers."""

    sent: int
    rtts_ms: list[float]
    duplicates: int = 0

    @property
    def received(self) -> int:
        return len(self.rtts_ms)

    @property
    def loss_percent(self) -> float:
        return 100.0 * (self.sent - self.received) / self.sent if self.sent else 100.0

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.rtts_ms) if self.rtts_ms else None

    @property
    def stdev_ms(self) -> float | None:
        return statistics.stdev(self.rtts_ms) if len(self.rtts_ms) > 1 else None


@dataclass
class IperfResult:
    """The numbers of one iperf3 run (receiver side), plus the raw JSON."""

    mbps: float | None
    udp_pps: float | None
    lost_percent: float | None
    seconds: float | None
    raw: dict[str, Any]

    @classmethod
    def parse(cls, data: dict[str, Any], udp_len: int | None) -> IperfResult:
        end = data.get("end", {})
        recv = end.get("sum_received") or end.get("sum") or {}
        bps = recv.get("bits_per_second")
        secs = recv.get("seconds")
        pps = None
        if udp_len and "sum_received" in end and recv.get("bytes") is not None and secs:
            pps = recv["bytes"] / udp_len / secs
        elif udp_len and secs and end.get("sum", {}).get("packets") is not None:
            # Older iperf3: only the sender's sum, with the receiver's loss folded in.
            s = end["sum"]
            pps = (s["packets"] - s.get("lost_packets", 0)) / secs
        lost = recv.get("lost_percent")
        if lost is None:
            lost = end.get("sum", {}).get("lost_percent")
        return cls(
            mbps=bps / 1e6 if bps is not None else None,
            udp_pps=pps,
            lost_percent=lost,
            seconds=secs,
            raw=data,
        )


def _ns_owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(include_live: bool = False) -> list[str]:
    """Delete lab namespaces whose owning process is gone; return their names.

    Namespaces of labs still running (in this or another process) are left alone unless
    include_live is set, so parallel test runs do not break each other.
    """
    removed = []
    for name in netns.ns_list():
        m = _NS_RE.match(name)
        if not m:
            continue
        owner = int(m.group(2))
        if not include_live and (owner == os.getpid() or _ns_owner_alive(owner)):
            continue
        netns.ns_del(name)
        removed.append(name)
    return removed


def lab_namespaces() -> list[str]:
    """Every namespace on this machine that carries the lab prefix."""
    return [n for n in netns.ns_list() if _NS_RE.match(n)]


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: a link's `addressing`
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _lab_time(extra_toml: str) -> str:
    """extra_toml with `set_clock = false` in its [time] table: a lab's chronyd measures and
    never sets the host's clock (the default, true, would)."""
    table = tomllib.loads(extra_toml).get("time")
    if not isinstance(table, dict):
        return extra_toml
    if table.get("set_clock", False) is not False:
        raise ValueError("a lab site must not set the host's clock: [time] set_clock = true")
    if "set_clock" in table:
        return extra_toml
    out, n = re.subn(r"(?m)^[ \t]*\[time\][ \t]*(#.*)?$", r"\g<0>\nset_clock = false",
                     extra_toml, count=1)
    if n != 1:
        raise ValueError("a lab site's [time] must be a [time] table, to add set_clock = false")
    return out


def _toml_table(name: str, values: dict[str, object], array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([head, *(f"{k} = {_toml(v)}" for k, v in values.items())]) + "\n"


class Lab:
    """Builds TESTING.md's topology in namespaces; a context manager that always cleans up.

    lab = Lab(workdir); lab.add_inet(); lab.add_router(1); site = lab.add_site(1); ...
    Use it from the main thread (daemons are tied to it with PR_SET_PDEATHSIG).
    """

    def __init__(self, workdir: Path | str | None = None, log: Callable[[str], None] | None = None):
        self.tag = secrets.token_hex(2)[:3]
        self.pid = os.getpid()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sdwan-lab-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = log
        self.namespaces: list[str] = []
        self.daemons: list[Daemon] = []
        self.inet: str | None = None
        self.altwan: str | None = None  # the Alt-WAN bridge's namespace
        self.routers: dict[int, Router] = {}
        self.sites: dict[int, Site] = {}
        self.public_hosts: dict[str, PublicHost] = {}
        self.pops: dict[int, Pop] = {}
        self.pki: Pki | None = None
        self._isp_net = False
        self._closed = False
        self._sockdir: Path | None = None
        atexit.register(self.cleanup)

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log(self, msg: str) -> None:
        if self._log:
            self._log(msg)

    def cleanup(self) -> None:
        """Stop every daemon, delete every namespace, remove an owned workdir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.cleanup)
        # A second Ctrl-C must not leave half a lab behind.
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for d in reversed(self.daemons):
                with contextlib.suppress(Exception):
                    netns.stop(d)
            for ns in reversed(self.namespaces):
                with contextlib.suppress(Exception):
                    netns.ns_del(ns)
            self.namespaces.clear()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self._sockdir is not None:
                shutil.rmtree(self._sockdir, ignore_errors=True)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # ------------------------------------------------------------- namespaces

    def ns_name(self, role: str) -> str:
        return f"{LAB_PREFIX}{self.tag}-{self.pid}-{role}"

    def new_ns(self, role: str, forward: bool = False) -> str:
        """Create (and track) a namespace for role; forward turns on IP forwarding."""
        if self._closed:
            raise RuntimeError("lab already cleaned up")
        name = self.ns_name(role)
        netns.ns_add(name)
        self.namespaces.append(name)
        netns.rp_filter_off(name)
        if forward:
            netns.ip_forward(name, True)
        return name

    def add_inet(self) -> str:
        """The Internet: a bridge routing between the public ranges."""
        if self.inet:
            return self.inet
        ns = self.new_ns("inet", forward=True)
        netns.bridge(ns, INET_BRIDGE)
        # A bridge takes the lowest MAC of its ports unless given one: a port added later
        # (another ISP's router, a PoP) would change the gateway's MAC under the neighbour
        # caches of everything on it, and their packets would be dropped until they re-ARP.
        netns.run(None, ["ip", "-n", ns, "link", "set", INET_BRIDGE, "address", INET_BRIDGE_MAC])
        netns.addr_add(ns, INET_BRIDGE, f"{PUBLIC_NET.network_address + 1}/24")
        netns.addr_add(ns, INET_BRIDGE, f"{POP_NET.network_address + 1}/24")
        # The Internet routes no private space: LAN-to-LAN traffic that is not in the
        # tunnel must die here instead of silently bypassing it.
        netns.nft(ns, _INET_RULESET)
        self.inet = ns
        return ns

    def _plug_inet(self, ns: str, dev: str, bridge_port: str, cidr: str) -> None:
        inet = self.add_inet()
        netns.veth(inet, bridge_port, ns, dev)
        netns.enslave(inet, bridge_port, INET_BRIDGE)
        netns.addr_add(ns, dev, cidr)
        net = ipaddress.ip_interface(cidr).network
        netns.route_add(ns, "default", via=str(net.network_address + 1))

    def add_altwan_link(self, site: Site) -> str:
        """Give site a second link, ``alt1`` at 10.200.0.n/24, on the Alt-WAN: a bridge shared
        by every site given one, with no NAT and no route anywhere else (the lab's MPLS
        network; docs/recovery.md, "Alt-WAN"). Returns the site's Alt-WAN address."""
        if site.altwan_ip is not None:
            return site.altwan_ip
        if self.altwan is None:
            self.altwan = self.new_ns("altwan")
            netns.bridge(self.altwan, ALTWAN_BRIDGE)
        ip = str(ALTWAN_NET.network_address + site.n)
        port = f"a{site.n}"
        netns.veth(self.altwan, port, site.ns, ALTWAN_DEV)
        netns.enslave(self.altwan, port, ALTWAN_BRIDGE)
        netns.addr_add(site.ns, ALTWAN_DEV, f"{ip}/{ALTWAN_NET.prefixlen}")
        site.altwan_dev, site.altwan_ip = ALTWAN_DEV, ip
        return ip

    def cut_altwan(self) -> None:
        """The Alt-WAN carrier fails: its bridge forwards nothing (the links stay up)."""
        if self.altwan is None:
            raise ValueError("no Alt-WAN in this lab (add_altwan_link first)")
        netns.nft(self.altwan, f"""
table bridge {ALTWAN_CUT} {{
    chain forward {{
        type filter hook forward priority -10; policy drop;
    }}
}}
""")

    def restore_altwan(self) -> None:
        """Undo cut_altwan."""
        if self.altwan is not None:
            netns.run(self.altwan, ["nft", "delete", "table", "bridge", ALTWAN_CUT])

    def add_public_host(self, role: str, ip: str = POP_IP) -> PublicHost:
        """A host with a public address on the inet bridge (the PoP's place)."""
        ns = self.new_ns(role)
        self._plug_inet(ns, "eth0", f"h{len(self.public_hosts)}{role}"[:15], f"{ip}/24")
        host = PublicHost(role, ns, ip)
        self.public_hosts[role] = host
        return host

    # ------------------------------------------------------------- routers

    def add_router(
        self,
        n: int,
        nat: str = "masquerade",
        upstream: int | None = None,
        shift_offset: int = 3,
        shift_ports: Sequence[int] = (SOCKETD_PORT,),
    ) -> Router:
        """Router n with public address 198.51.100.(10+n), or behind router `upstream`."""
        _check_n(n)
        if nat not in NAT_MODES:
            raise ValueError(f"nat must be one of {', '.join(NAT_MODES)}, got {nat!r}")
        if n in self.routers:
            raise ValueError(f"router {n} already exists")
        if nat == "none":
            if upstream is not None:
                raise ValueError("nat='none' puts the site on the Internet: no upstream")
            r = Router(n, nat, None, public_ip(n))
            self.routers[n] = r
            return r
        ns = self.new_ns(f"rtr{n}", forward=True)
        if upstream is None:
            pub = public_ip(n)
            self._plug_inet(ns, "up0", f"r{n}", f"{pub}/24")
            up = None
        else:
            up = self.routers[upstream]
            if up.ns is None:
                raise ValueError(f"router {upstream} has nat='none' and cannot be upstream")
            # CGNAT: this router's WAN is a private address on the upstream router.
            netns.veth(up.ns, f"cgn{n}", ns, "up0")
            netns.addr_add(up.ns, f"cgn{n}", f"100.65.{n}.1/24")
            netns.addr_add(ns, "up0", f"100.65.{n}.2/24")
            netns.route_add(ns, "default", via=f"100.65.{n}.1")
            pub = up.public_ip
        r = Router(
            n, nat, ns, pub, upstream=up, shift_offset=shift_offset, shift_ports=tuple(shift_ports)
        )
        netns.nft(ns, self.nat_ruleset(r))
        self.routers[n] = r
        return r

    def nat_ruleset(self, r: Router) -> str:
        """The nft ruleset of router r: NAT on its WAN, unsolicited inbound dropped silently."""
        wan = r.wan_dev
        pre: list[str] = []
        if r.nat == "masquerade":
            nat = f'oifname "{wan}" masquerade'
        elif r.nat == "random":
            nat = f'oifname "{wan}" masquerade fully-random'
        elif r.nat == "shift":
            # Predictable symmetric NAT: the PoP sees the source port, peers see port+offset.
            for p in r.shift_ports:
                pre.append(
                    f'oifname "{wan}" ip daddr != {POP_NET} udp sport {p} '
                    f"snat ip to {self._wan_addr(r)}:{p + r.shift_offset}"
                )
            nat = f'oifname "{wan}" masquerade'
        else:
            raise ValueError(f"no NAT ruleset for {r.nat!r}")
        post = "\n        ".join([*pre, nat])
        extra = "\n        ".join(r.extra_rules)
        # Dropping (not rejecting) unsolicited packets is what home routers do, and it keeps
        # ICMP errors from reaching a peer that is punching toward us.
        return f"""
table ip lab_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {post}
    }}
}}
table inet lab_filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" meta l4proto {{ icmp, ipv6-icmp }} accept
        iifname "{wan}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {extra}
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
}}
"""

    def narrow_uplink(self, n: int, mtu: int = 1280, drop_icmp: bool = True) -> None:
        """Router n forwards at most `mtu` bytes per packet between the Internet and its sites
        (a PPPoE or tunnelled uplink), both ways; call it after add_site. With drop_icmp the
        "fragmentation needed" / "packet too big" errors that would tell a sender are dropped
        in the router, so a larger packet just vanishes (docs/lab.md, "Path MTU")."""
        r = self.routers[n]
        if r.ns is None:
            raise ValueError(f"router {n} has no namespace (nat='none')")
        # A veth takes up to 4 bytes more than its MTU on receive (room for a VLAN tag), so
        # the limit is enforced where the router forwards: out of its WAN device, and out of
        # its devices toward the sites behind it.
        devs = [r.wan_dev] + [f"site{s.n}" for s in self.sites.values() if s.router is r]
        for dev in devs:
            netns.run(r.ns, ["ip", "link", "set", dev, "mtu", str(mtu)])
        if drop_icmp:
            netns.nft(r.ns, _NO_PTB_RULESET)

    def _wan_addr(self, r: Router) -> str:
        return r.public_ip if r.upstream is None else f"100.65.{r.n}.2"

    def renat_router(self, n: int, offset: int) -> None:
        """Emulate router n restarting with its NAT table lost and new mappings: from now on
        UDP from the sites' port leaves with that port + offset toward every destination (the
        PoP too), and the connection tracking table is flushed."""
        r = self.routers[n]
        if r.ns is None:
            raise ValueError(f"router {n} has no namespace (nat='none')")
        wan, pub = r.wan_dev, self._wan_addr(r)
        netns.nft(
            r.ns,
            f"""
delete table ip lab_nat
table ip lab_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" udp sport {SOCKETD_PORT} snat ip to {pub}:{SOCKETD_PORT + offset}
        oifname "{wan}" masquerade
    }}
}}
""",
        )
        netns.run(r.ns, ["conntrack", "-F"], check=False)

    def router_nft(self, n: int, ruleset: str) -> None:
        """Load more nft rules into router n (failure injection, later NAT types)."""
        r = self.routers[n]
        if r.ns is None:
            raise ValueError(f"router {n} has no namespace (nat='none')")
        netns.nft(r.ns, ruleset)

    # ------------------------------------------------------------- sites

    def add_site(
        self,
        n: int,
        router: int | None = None,
        lan_subnet: str | None = None,
        impair: bool = False,
        lan_dhcp: bool = False,
    ) -> Site:
        """Site n (socketd's namespace) behind router `router` (default n), plus its LAN host;
        impair puts an impairment element in link 1's cable (`impair`, `sdwan.lab.impair`);
        with lan_dhcp neither the LAN port nor the host gets an address here (see Site)."""
        _check_n(n)
        if n in self.sites:
            raise ValueError(f"site {n} already exists")
        rn = n if router is None else router
        if rn not in self.routers:
            self.add_router(rn)
        r = self.routers[rn]
        lan = ipaddress.ip_network(lan_subnet or f"10.{n}.0.0/24")
        if not isinstance(lan, ipaddress.IPv4Network) or lan.num_addresses < 4:
            raise ValueError(f"lan_subnet must be an IPv4 network of /30 or larger, got {lan}")
        ns = self.new_ns(f"site{n}", forward=True)
        wan_dev = "wan1"
        if r.ns is None:
            up = WanUplink(
                1, wan_dev, wan_dev, r.public_ip, PUBLIC_NET.prefixlen,
                str(PUBLIC_NET.network_address + 1), r, self.add_inet(), f"s{n}", r.public_ip,
            )
        else:
            # The router NATs the LAN host's Internet traffic like the site's own
            # (lan_route: it routes the LAN back through this uplink).
            up = WanUplink(
                1, wan_dev, wan_dev, f"100.64.{n}.2", 24, f"100.64.{n}.1", r, r.ns,
                f"site{n}", r.public_ip,
            )
        self._connect_uplink(n, ns, str(lan), up, impair)
        wan_ip, wan_gw = up.ip, up.gateway
        if r.ns is None:
            # No router to carry the LAN out: the site NATs its own LAN toward the Internet.
            netns.nft(ns, _breakout_ruleset(wan_dev, str(lan)))
        lan_ns = self.new_ns(f"lan{n}")
        lan_ip, host_ip = str(lan.network_address + 1), str(lan.network_address + 2)
        netns.veth(ns, "lan0", lan_ns, "eth0")
        if not lan_dhcp:
            netns.addr_add(ns, "lan0", f"{lan_ip}/{lan.prefixlen}")
            netns.addr_add(lan_ns, "eth0", f"{host_ip}/{lan.prefixlen}")
            netns.route_add(lan_ns, "default", via=lan_ip)
        d = self.workdir / f"site{n}"
        d.mkdir(parents=True, exist_ok=True)
        site = Site(
            n=n,
            ns=ns,
            lan_ns=lan_ns,
            router=r,
            wan_dev=wan_dev,
            wan_ip=wan_ip,
            wan_gw=wan_gw,
            lan_dev="lan0",
            lan_subnet=str(lan),
            lan_ip=lan_ip,
            lan_host_ip=host_ip,
            public_ip=r.public_ip,
            dir=d,
            uplinks=[up],
            lan_dhcp=lan_dhcp,
        )
        if len(str(site.control_socket)) > _SUN_PATH_MAX:
            site.sock = self.short_dir() / f"site{n}.sock"
        self.sites[n] = site
        return site

    # ------------------------------------------------------------- uplinks

    def _connect_uplink(
        self, n: int, site_ns: str, lan: str, up: WanUplink, impair: bool
    ) -> None:
        """Cable uplink `up` between the site and its router (through an impairment element
        if impair), with the addresses and routes of both ends."""
        up.element = self._cable(n, up.index, site_ns, up.dev, up.router_ns, up.router_dev, impair)
        if up.router.ns is None:
            netns.enslave(up.router_ns, up.router_dev, INET_BRIDGE)
        else:
            netns.addr_add(up.router_ns, up.router_dev, f"{up.gateway}/{up.prefixlen}")
        netns.addr_add(site_ns, up.dev, f"{up.ip}/{up.prefixlen}")
        netns.route_add(site_ns, "default", via=up.gateway, dev=up.dev, metric=up.metric)
        if up.router.ns is not None and up.lan_route:
            netns.route_add(up.router_ns, lan, via=up.ip)

    def _cable(
        self, n: int, k: int, site_ns: str, site_dev: str, far_ns: str, far_dev: str, impair: bool
    ) -> ImpairElement | None:
        """A veth from site_dev to far_dev, or two with an impairment element between them."""
        if not impair:
            netns.veth(far_ns, far_dev, site_ns, site_dev)
            return None
        role = f"imp{n}-{k}"
        ens = self.ns_name(role)
        if ens not in self.namespaces:
            ens = self.new_ns(role)
            prepare_namespace(ens)
        el = ImpairElement(ens, self.short_dir() / f"{role}.sock")
        netns.veth(ens, el.site_dev, site_ns, site_dev)
        netns.veth(ens, el.up_dev, far_ns, far_dev)
        with contextlib.suppress(FileNotFoundError):
            el.control.unlink()
        argv = [sys.executable, "-m", "sdwan.lab.impair", "--site-dev", el.site_dev]
        argv += ["--up-dev", el.up_dev, "--control", str(el.control), "--seed", str(10 * n + k)]
        el.daemon = d = self.spawn(ens, argv, f"impair-site{n}-{k}", env=self.env())
        ok = netns.wait_until(lambda: el.control.exists() or not d.alive(), timeout=15)
        if not d.alive() or not ok:
            raise NetnsError(argv, ens, f"impairment element did not start: {d.log_tail()}")
        return el

    def _isp_inet(self) -> str:
        """The inet namespace, with the other ISPs' range on its bridge."""
        inet = self.add_inet()
        if not self._isp_net:
            netns.addr_add(inet, INET_BRIDGE, f"{ISP_NET.network_address + 1}/{ISP_NET.prefixlen}")
            self._isp_net = True
        return inet

    def add_wan_link(
        self,
        site: Site,
        name: str | None = None,
        router: int | None = None,
        nat: str = "masquerade",
        impair: bool = False,
    ) -> WanUplink:
        """Give site another Internet uplink k (2..4): device `name` (default ``wan<k>``) at
        100.(64+k).n.2/24, its default route at metric 10*(k-1) (link 1 stays the default).

        router=None: through a NAT router of its own, ``rtr<n>-<k>`` (a second ISP: `nat` as
        in add_router; public address 198.18.k.(10+n)), which also routes the site's LAN back;
        nat='none' puts the device itself on the inet bridge with that public address.
        router=m: through lab router m (same ISP, same public address), which keeps routing
        the LAN through the uplink it had. impair puts an impairment element in the cable."""
        k = len(site.uplinks) + 1
        if k > MAX_UPLINKS:
            raise ValueError(f"site {site.n} already has {MAX_UPLINKS} uplinks")
        dev = name or f"wan{k}"
        if any(dev in (u.dev, u.name) for u in site.uplinks) or dev == site.altwan_dev:
            raise ValueError(f"site {site.n} already has a link {dev!r}")
        n = site.n
        metric = 10 * (k - 1)
        ip, gw = f"100.{64 + k}.{n}.2", f"100.{64 + k}.{n}.1"
        if router is not None:
            r = self.routers.get(router)
            if r is None or r.ns is None:
                raise ValueError(
                    f"router {router} does not exist or has nat='none' (add_wan_link(nat='none')"
                    " puts an uplink straight on the Internet)"
                )
            lan_route = all(u.router is not r for u in site.uplinks)
            up = WanUplink(
                k, dev, dev, ip, 24, gw, r, r.ns, f"site{n}w{k}", r.public_ip, metric, lan_route
            )
        else:
            if nat not in NAT_MODES:
                raise ValueError(f"nat must be one of {', '.join(NAT_MODES)}, got {nat!r}")
            pub = str(ISP_NET.network_address + 256 * k + 10 + n)
            inet = self._isp_inet()
            if nat == "none":
                r = Router(n, nat, None, pub)
                up = WanUplink(
                    k, dev, dev, pub, ISP_NET.prefixlen, str(ISP_NET.network_address + 1), r,
                    inet, f"s{n}u{k}", pub, metric,
                )
            else:
                rns = self.new_ns(f"rtr{n}-{k}", forward=True)
                self._plug_inet(rns, "up0", f"r{n}u{k}", f"{pub}/{ISP_NET.prefixlen}")
                r = Router(n, nat, rns, pub)
                netns.nft(rns, self.nat_ruleset(r))
                up = WanUplink(k, dev, dev, ip, 24, gw, r, rns, f"site{n}", pub, metric)
        self._connect_uplink(n, site.ns, site.lan_subnet, up, impair)
        site.uplinks.append(up)
        return up

    def link_carrier(self, site: Site, dev: str, up: bool) -> None:
        """Pull (up=False) or plug back site's uplink cable: the far end (the router's device,
        or the impairment element's) goes down, so the site's device loses its carrier
        (NO-CARRIER) but stays up with its address and routes, as with a real cable."""
        u = site.uplink(dev)
        ns, far = u.far_end
        if not up:
            netns.link_down(ns, far)
            return
        netns.link_up(ns, far)
        if u.element is None and u.router.ns is not None and u.lan_route:
            # The router's device went down with the cable, and its gatewayed routes with it.
            netns.route_add(u.router_ns, site.lan_subnet, via=u.ip)

    def link_admin(self, site: Site, dev: str, up: bool) -> None:
        """`ip link set dev DEV down/up` in the site namespace; up puts back the uplink's
        default route, which the kernel dropped with the device."""
        u = site.uplink(dev)
        if not up:
            netns.link_down(site.ns, u.dev)
            return
        netns.link_up(site.ns, u.dev)
        netns.route_add(site.ns, "default", via=u.gateway, dev=u.dev, metric=u.metric)

    def silence_uplink(self, site: Site, dev: str, on: bool) -> None:
        """A silent upstream failure (on=True): the uplink's router drops every IP packet from
        and to the site over that uplink, while carrier and ARP stay up; on=False ends it."""
        u = site.uplink(dev)
        table = "lab_silence_" + re.sub(r"[^A-Za-z0-9_]", "_", u.router_dev)
        if u.router.ns is None:
            # No router: the inet bridge's port toward the site drops instead.
            family = "bridge"
            rules = f"""
    chain forward {{
        type filter hook forward priority -10; policy accept;
        ether type {{ ip, ip6 }} iifname "{u.router_dev}" drop
        ether type {{ ip, ip6 }} oifname "{u.router_dev}" drop
    }}
    chain input {{
        type filter hook input priority -10; policy accept;
        ether type {{ ip, ip6 }} iifname "{u.router_dev}" drop
    }}
    chain output {{
        type filter hook output priority -10; policy accept;
        ether type {{ ip, ip6 }} oifname "{u.router_dev}" drop
    }}"""
        else:
            family = "inet"
            # Before connection tracking, so a silenced uplink leaves no NAT state behind.
            rules = f"""
    chain prerouting {{
        type filter hook prerouting priority -400; policy accept;
        iifname "{u.router_dev}" drop
    }}
    chain postrouting {{
        type filter hook postrouting priority 400; policy accept;
        oifname "{u.router_dev}" drop
    }}"""
        if on:
            netns.nft(u.router_ns, f"table {family} {table} {{{rules}\n}}\n")
        else:
            netns.run(u.router_ns, ["nft", "delete", "table", family, table], check=False)

    def attach_impairment(self, site: Site, dev: str) -> ImpairElement:
        """Put an impairment element into an uplink plugged without one (re-cabled, with its
        addresses and routes again; before socketd starts, which would see its device go)."""
        u = site.uplink(dev)
        if u.element is None:
            netns.link_del(site.ns, u.dev)
            self._connect_uplink(site.n, site.ns, site.lan_subnet, u, impair=True)
        assert u.element is not None
        return u.element

    def impair(self, site: Site, dev: str, direction: str = "up", **setting: Any) -> dict[str, Any]:
        """Set the impairment of site's uplink dev (ImpairElement.set: loss, delay_ms,
        jitter_ms, jitter_dist, duplicate, reorder, seed); `direction` up is from the site
        toward the Internet, so a round trip sees the setting once; both applies it each way.
        The uplink needs an element (`impair=True` when it was made, or attach_impairment)."""
        el = site.uplink(dev).element
        if el is None:
            raise ValueError(f"site {site.n} uplink {dev} has no impairment element")
        return el.set(direction=direction, **setting)

    def clear_impairment(self, site: Site, dev: str) -> None:
        el = site.uplink(dev).element
        if el is not None:
            el.clear()

    def short_dir(self) -> Path:
        # Unix socket paths are limited to 107 bytes; deep pytest tmp paths exceed that.
        if self._sockdir is None:
            self._sockdir = Path(tempfile.mkdtemp(prefix="swl-"))
        return self._sockdir

    # ------------------------------------------------------------- processes

    def env(self) -> dict[str, str]:
        """Environment for lab commands: the firmware package importable as `sdwan`."""
        env = dict(os.environ)
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(_FIRMWARE_DIR) + (os.pathsep + pp if pp else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        # The daemons load compiled modules, as on the box (its image ships them): a host
        # that asks for no bytecode files would have every start compile socketd's modules
        # again, a tenth of a second that the start-up figures would count.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def exec(
        self,
        ns: str | None,
        argv: Sequence[str],
        timeout: float = netns.DEFAULT_TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return netns.run(ns, argv, timeout=timeout, check=check)

    def spawn(
        self,
        ns: str | None,
        argv: Sequence[str],
        name: str,
        env: dict[str, str] | None = None,
        max_lifetime_s: int = netns.DAEMON_MAX_S,
    ) -> Daemon:
        """Start a daemon tracked by the lab (stopped at cleanup), logging to workdir/logs/."""
        if self._closed:
            raise RuntimeError("lab already cleaned up")
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        d = netns.popen(
            ns, argv, logs / f"{name}.log", name=name, env=env, max_lifetime_s=max_lifetime_s
        )
        self.daemons.append(d)
        return d

    def kill(self, d: Daemon, grace_s: float = 3.0) -> int | None:
        rc = netns.stop(d, grace_s)
        if d in self.daemons:
            self.daemons.remove(d)
        return rc

    # ------------------------------------------------------------- traffic

    def ping(
        self, from_ns: str, ip: str, count: int = 1, wait_s: float = 1.0, source: str | None = None
    ) -> bool:
        """True when ip answers; source picks the sending address (`ping -I`) on a host with
        several, since which tunnel carries the answer may depend on it."""
        via = ["-I", source] if source else []
        cp = netns.run(
            from_ns,
            ["ping", "-n", "-q", "-c", str(count), "-W", f"{wait_s:g}", *via, ip],
            timeout=count * wait_s + 10,
            check=False,
        )
        return cp.returncode == 0

    def ping_rtt_ms(
        self, from_ns: str, ip: str, count: int = 20, interval: float = 0.05
    ) -> float | None:
        """Average RTT in ms of `count` pings, or None if none came back."""
        cp = netns.run(
            from_ns,
            ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}", "-W", "1", ip],
            timeout=count * (interval + 1) + 10,
            check=False,
        )
        m = re.search(r"= [\d.]+/([\d.]+)/", cp.stdout)
        return float(m.group(1)) if m else None

    def ping_series(
        self,
        from_ns: str,
        ip: str,
        count: int = 100,
        interval: float = 0.01,
        source: str | None = None,
        wait_s: float = 2.0,
    ) -> PingSeries:
        """`count` pings `interval` s apart (below 0.2 s needs root), each answer's RTT kept, so
        loss, median and spread can be read (an impaired uplink's figures); source as for
        ping (`-I`: a device picks the uplink)."""
        via = ["-I", source] if source else []
        argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", f"{wait_s:g}"]
        cp = netns.run(
            from_ns, [*argv, *via, ip], timeout=count * interval + wait_s + 15, check=False
        )
        rtts: list[float] = []
        dups = 0
        for line in cp.stdout.splitlines():
            m = re.search(r"icmp_seq=\d+ .*time=([\d.]+) ms", line)
            if m is None:
                continue
            if "DUP!" in line:
                dups += 1
            else:
                rtts.append(float(m.group(1)))
        m = re.search(r"(\d+) packets transmitted", cp.stdout)
        return PingSeries(int(m.group(1)) if m else count, rtts, dups)

    def wait_ping(
        self,
        from_ns: str,
        ip: str,
        timeout: float,
        progress: Callable[[float], None] | None = None,
        source: str | None = None,
    ) -> bool:
        """Ping once a second until it answers or timeout; progress(elapsed) between tries."""
        t0 = time.monotonic()
        while True:
            if self.ping(from_ns, ip, count=1, wait_s=1, source=source):
                return True
            elapsed = time.monotonic() - t0
            if elapsed >= timeout:
                return False
            if progress:
                progress(elapsed)
            time.sleep(0.2)

    def iperf3(
        self,
        client_ns: str,
        server_ns: str,
        server_ip: str,
        duration: float = 5,
        parallel: int = 1,
        udp: bool = False,
        length: int | None = None,
        bandwidth: str | None = None,
        port: int = 5201,
        extra: Sequence[str] = (),
    ) -> IperfResult:
        """One iperf3 run client_ns -> server_ip (served in server_ns); receiver-side numbers."""
        name = f"iperf3-s-{port}-{len(self.daemons)}"
        srv = self.spawn(
            server_ns,
            ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port)],
            name,
            max_lifetime_s=int(duration) + 60,
        )
        try:
            listening = netns.wait_until(
                lambda: (
                    f":{port} "
                    in netns.run(server_ns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
                    + " "
                ),
                timeout=5,
                interval=0.05,
            )
            if not listening:
                raise NetnsError(
                    ["iperf3", "-s"], server_ns, f"server did not listen: {srv.log_tail()}"
                )
            argv = ["iperf3", "-c", server_ip, "-p", str(port), "-t", f"{duration:g}", "-J"]
            if parallel > 1:
                argv += ["-P", str(parallel)]
            if udp:
                argv += ["-u", "-b", bandwidth or "1G"]
            elif bandwidth:
                argv += ["-b", bandwidth]
            if length:
                argv += ["-l", str(length)]
            argv += list(extra)
            cp = netns.run(client_ns, argv, timeout=duration + 30, check=False)
            try:
                data = json.loads(cp.stdout)
            except json.JSONDecodeError as e:
                raise NetnsError(
                    argv, client_ns, f"no JSON from iperf3: {cp.stderr.strip()}"
                ) from e
            if "error" in data:
                raise NetnsError(argv, client_ns, f"iperf3: {data['error']}")
            return IperfResult.parse(data, length if udp else None)
        finally:
            self.kill(srv, grace_s=2)

    def lan_dhcp_client(
        self, site: Site, mac: str | None = None, timeout: float = 30.0
    ) -> str:
        """The LAN host of a lan_dhcp site asks socketd's DHCP server for its address
        (`dhcp_client`); it is then site.lan_host_ip."""
        if not site.lan_dhcp:
            raise ValueError(f"site {site.n} was added without lan_dhcp: its host has an address")
        site.lan_host_ip = dhcp_client(site.lan_ns, "eth0", self.workdir, mac, timeout)
        return site.lan_host_ip

    # ------------------------------------------------------------- socketd

    def setup_pki(self, account: str = "lab") -> Pki:
        """The lab's account CA under workdir/pki/ca (created on first use)."""
        if self.pki is None:
            self.pki = self.new_ca("ca", account)
        return self.pki

    def new_ca(self, name: str, account: str = "lab") -> Pki:
        """Another CA under workdir/pki/<name> (sdwan.pop.pki.create_ca), e.g. a foreign account."""
        from sdwan.pop import pki as sdwan_pki

        d = self.workdir / "pki" / name
        ret = sdwan_pki.create_ca(d, account)
        return Pki(d, _find_ca_cert(ret, d), account)

    def issue(self, site: Site | int, pki: Pki | None = None) -> tuple[Path, Path]:
        """Certificate and key for site from pki (default the lab CA): (cert, key) paths."""
        from sdwan.pop import pki as sdwan_pki

        sid = site if isinstance(site, int) else site.site_id
        pki = pki or self.setup_pki()
        out = self.workdir / "pki" / f"{pki.dir.name}-site{sid}"
        ret = sdwan_pki.issue_site(pki.dir, sid, out)
        if hasattr(ret, "cert") and hasattr(ret, "key"):
            return Path(ret.cert), Path(ret.key)
        cert, key = ret
        return Path(cert), Path(key)

    def write_site_config(
        self,
        site: Site,
        peers: Sequence[Site | PeerSpec] = (),
        pki: Pki | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        tunnel: dict[str, object] | None = None,
        lan_subnets: Sequence[str] | None = None,
        name: str | None = None,
        extra_toml: str = "",
        link: dict[str, object] | None = None,
        site_id: int | None = None,
        altwan: bool = False,
        links: Sequence[dict[str, object]] | None = None,
    ) -> Path:
        """Write socketd's TOML for site (own control socket and data dir) and return its path.

        site_id replaces the site's own id (its lab index) where a bench needs another one,
        e.g. above every site id it plays itself (the mesh's higher id initiates). altwan adds
        the site's Alt-WAN link (add_altwan_link) as a further `[[links]]` entry, "mpls".

        Every Internet uplink gets a `[[links]]` entry (name, interface, port, mtu), link k at
        precedence min(k, 3). `link` is merged over link 1's entry; `links`, one dict per
        uplink in order, over each one's, and a shorter list writes only that many uplinks."""
        pki = pki or self.setup_pki()
        sid = site.site_id if site_id is None else site_id
        if cert is None or key is None:
            cert, key = self.issue(sid, pki)
        lan_port = f"{site.lan_ip}/{ipaddress.ip_network(site.lan_subnet).prefixlen}"
        parts = [
            _toml_table("site", {"id": sid, "name": name or f"site-{sid}"}),
            _toml_table(
                "paths", {"data_dir": site.data_dir, "control_socket": site.control_socket}
            ),
            _toml_table("pki", {"ca": pki.ca_cert, "cert": cert, "key": key}),
            _toml_table(
                "lan",
                {
                    "subnets": list(lan_subnets or [site.lan_subnet]),
                    # A site without a LAN device (the benchmark's) leaves it out.
                    **({"interface": site.lan_dev} if site.lan_dev else {}),
                    # The port left unaddressed by add_site: socketd addresses it.
                    **({"address": lan_port} if site.lan_dhcp else {}),
                },
            ),
            _toml_table("tunnel", {"interface": "sdwan0", **(tunnel or {})}),
        ]
        uplinks = site.uplinks or [None]
        count = len(uplinks) if links is None else len(links)
        for i, u in enumerate(uplinks[:count]):
            entry: dict[str, object] = {
                "name": site.link_name if u is None or u.index == 1 else u.name,
                "interface": site.wan_dev if u is None else u.dev,
                "port": site.port,
                "precedence": 1 if u is None else min(u.index, 3),
                "mtu": 1500,
            }
            if i == 0:
                entry.update(link or {})
            if links is not None:
                entry.update(links[i])
            parts.append(_toml_table("links", entry, array=True))
        if altwan:
            if site.altwan_dev is None:
                raise ValueError(f"site {site.n} has no Alt-WAN link (add_altwan_link first)")
            parts.append(_toml_table(
                "links",
                {"name": "mpls", "interface": site.altwan_dev, "port": site.port,
                 "altwan": True},
                array=True,
            ))
        for p in peers:
            spec = p if isinstance(p, PeerSpec) else PeerSpec(p.site_id, p.endpoint, [p.lan_subnet])
            vals: dict[str, object] = {
                "site_id": spec.site_id,
                "endpoint": spec.endpoint,
                "subnets": spec.subnets,
            }
            if spec.link:
                vals["link"] = spec.link
            parts.append(_toml_table("peers", vals, array=True))
        if extra_toml:
            parts.append(_lab_time(extra_toml))
        site.data_dir.mkdir(parents=True, exist_ok=True)
        path = site.dir / "socketd.toml"
        path.write_text("\n".join(parts))
        site.config = path
        return path

    def start_socketd(
        self, site: Site, config: Path | None = None, wait_socket_s: float = 15.0
    ) -> Daemon:
        """Spawn `python -m sdwan.site.socketd --config X` in the site namespace.

        Waits (bounded) for the control socket to appear; raises with the log tail if the
        daemon exits or never opens it.
        """
        config = config or site.config
        if config is None:
            raise ValueError(f"site {site.n}: write_site_config first")
        site.socketd = self._start_service(
            site.ns, "socketd", config, f"socketd-site{site.n}", site.control_socket, wait_socket_s
        )
        return site.socketd

    def stop_socketd(self, site: Site, sig: int = signal.SIGTERM) -> None:
        """Stop site's socketd; sig=SIGKILL emulates a crash."""
        self._stop_service(site.socketd, sig)
        site.socketd = None

    def nat_mapping(self, site: Site, sport: int, dst: str, dport: int) -> tuple[str, int]:
        """The public (address, port) the site's router gave the UDP flow
        site.wan_ip:sport -> dst:dport, read from its conntrack table."""
        assert site.router.ns is not None
        argv = ["conntrack", "-L", "-p", "udp", "--orig-src", site.wan_ip]
        argv += ["--orig-port-src", str(sport), "--orig-dst", dst, "--orig-port-dst", str(dport)]
        out = netns.run(site.router.ns, argv, check=False).stdout
        # Reply direction: src=dst dst=PUBLIC sport=dport dport=MAPPED.
        m = re.search(rf"src={re.escape(dst)} dst=(\S+) sport={dport} dport=(\d+)", out)
        if m is None:
            raise AssertionError(
                f"no conntrack entry for {site.wan_ip}:{sport} -> {dst}:{dport}: {out!r}"
            )
        return m.group(1), int(m.group(2))

    def socketctl(self, site: Site, *args: str, json_out: bool = True, timeout: float = 10) -> Any:
        """Run socketctl against site's control socket; parsed JSON (or text if not json_out)."""
        return self._ctl(site.ns, "socketctl", site.control_socket, args, json_out, timeout)

    # ------------------------------------------------------------- services

    def _start_service(
        self, ns: str, prog: str, config: Path, name: str, control: Path, wait_s: float
    ) -> Daemon:
        """`python -m <prog's module> --config X` in ns, up once its control socket exists."""
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
        d = self.spawn(
            ns,
            [sys.executable, "-m", _MODULES[prog], "--config", str(config)],
            name,
            env=self.env(),
        )
        ok = netns.wait_until(lambda: control.exists() or not d.alive(), timeout=wait_s)
        if not d.alive():
            raise NetnsError(d.argv, ns, f"{prog} exited with {d.proc.returncode}: {d.log_tail()}")
        if not ok:
            raise NetnsError(d.argv, ns, f"no control socket after {wait_s:g} s: {d.log_tail()}")
        return d

    def _stop_service(self, d: Daemon | None, sig: int) -> None:
        if d is None:
            return
        if sig == signal.SIGKILL:
            pid = d.main_pid(timeout=0.5)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.kill(d)

    def _ctl(
        self,
        ns: str,
        prog: str,
        control: Path,
        args: Sequence[str],
        json_out: bool,
        timeout: float,
    ) -> Any:
        """Run `python -m <prog's module> --socket S ARGS [--json]` in ns."""
        argv = [sys.executable, "-m", _MODULES[prog], "--socket", str(control), *args]
        if json_out:
            argv.append("--json")
        try:
            cp = subprocess.run(
                ["ip", "netns", "exec", ns, *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env(),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise NetnsError(argv, ns, f"timed out after {timeout:g} s") from e
        if not json_out:
            if cp.returncode != 0:
                raise NetnsError(
                    argv, ns, f"exit status {cp.returncode}: {(cp.stderr or cp.stdout).strip()}"
                )
            return cp.stdout
        try:
            return json.loads(cp.stdout)
        except json.JSONDecodeError as e:
            raise NetnsError(
                argv,
                ns,
                f"exit status {cp.returncode}, not JSON: {(cp.stderr or cp.stdout).strip()[-500:]}",
            ) from e

    # ------------------------------------------------------------- popd

    def add_pop(self, n: int = 1, ip: str | None = None) -> Pop:
        """PoP n on a public host of its own (203.0.113.10 for PoP 1, .11 for PoP 2, ...)."""
        _check_n(n)
        if n in self.pops:
            raise ValueError(f"PoP {n} already exists")
        addr = ip or str(POP_NET.network_address + 9 + n)
        host = self.add_public_host(f"pop{n}", addr)
        d = self.workdir / f"pop{n}"
        d.mkdir(parents=True, exist_ok=True)
        pop = Pop(n=n, host=host, dir=d)
        if len(str(pop.control_socket)) > _SUN_PATH_MAX:
            pop.sock = self.short_dir() / f"pop{n}.sock"
        self.pops[n] = pop
        return pop

    def write_pop_config(
        self,
        pop: Pop,
        sites: Sequence[Site | dict[str, object]] = (),
        pki: Pki | None = None,
        account_name: str = "lab",
        cloud: dict[str, object] | None = None,
        account_toml: str | None = None,
        tunnel: dict[str, object] | None = None,
        renewal: dict[str, object] | None = None,
    ) -> Path:
        """Write popd's TOML and its account file for `sites` (lab Sites, or dicts with the
        account fields id, name, subnets, offcloud, recovery); returns the config path.
        `tunnel` is popd's [tunnel] table (its key timers), `renewal` its [renewal] table (its
        ca_key: the lab CA's key by default)."""
        from sdwan.pop import pki as sdwan_pki

        pki = pki or self.setup_pki()
        out = self.workdir / "pki" / f"{pki.dir.name}-pop{pop.n}"
        cert, key = out / f"pop-{pop.n}.pem", out / f"pop-{pop.n}.key"
        if not cert.exists():
            sdwan_pki.issue_pop(pki.dir, pop.n, out)
        if account_toml is None:
            parts = [_toml_table("account", {"name": account_name})]
            for s in sites:
                vals: dict[str, object] = (
                    {"id": s.site_id, "name": f"site-{s.site_id}", "subnets": [s.lan_subnet]}
                    if isinstance(s, Site)
                    else dict(s)
                )
                parts.append(_toml_table("sites", vals, array=True))
            account_toml = "\n".join(parts)
        pop.account = pop.dir / "account.toml"
        pop.account.write_text(account_toml)
        pop.data_dir.mkdir(parents=True, exist_ok=True)
        parts = [
            _toml_table(
                "pop",
                {
                    "id": pop.n,
                    "name": f"pop-{pop.n}",
                    "listen": "0.0.0.0",
                    "port": pop.port,
                    "stun_port": pop.stun_port,
                    "account": pop.account,
                },
            ),
            _toml_table("paths", {"data_dir": pop.data_dir, "control_socket": pop.control_socket}),
            _toml_table("pki", {"ca": pki.ca_cert, "cert": cert, "key": key}),
        ]
        if cloud:
            parts.append(_toml_table("cloud", cloud))
        if tunnel:
            parts.append(_toml_table("tunnel", tunnel))
        if renewal is not None:
            parts.append(_toml_table("renewal", {"ca_key": pki.dir / sdwan_pki.CA_KEY_NAME,
                                                 **renewal}))
        path = pop.dir / "pop.toml"
        path.write_text("\n".join(parts))
        pop.config = path
        return path

    def start_popd(
        self, pop: Pop, config: Path | None = None, wait_socket_s: float = 15.0
    ) -> Daemon:
        """Spawn `python -m sdwan.pop.popd --config X` in the PoP's namespace; waits (bounded) for
        its control socket and raises with the log tail if it exits or never opens it."""
        config = config or pop.config
        if config is None:
            raise ValueError(f"PoP {pop.n}: write_pop_config first")
        pop.popd = self._start_service(
            pop.ns, "popd", config, f"popd-pop{pop.n}", pop.control_socket, wait_socket_s
        )
        return pop.popd

    def stop_popd(self, pop: Pop, sig: int = signal.SIGTERM) -> None:
        """Stop the PoP's popd; sig=SIGKILL emulates a crash."""
        self._stop_service(pop.popd, sig)
        pop.popd = None

    def popctl(self, pop: Pop, *args: str, json_out: bool = True, timeout: float = 10) -> Any:
        """Run popctl against the PoP's control socket; parsed JSON (or text if not json_out)."""
        return self._ctl(pop.ns, "popctl", pop.control_socket, args, json_out, timeout)

    # ------------------------------------------------------------- helpers

    def describe(self) -> Iterator[str]:
        """Human lines describing the topology (for logs and the demo)."""
        if self.inet:
            yield f"inet {self.inet}: {INET_BRIDGE} {PUBLIC_NET} + {POP_NET}"
        if self.altwan:
            yield f"altwan {self.altwan}: {ALTWAN_BRIDGE} {ALTWAN_NET} (no NAT, no Internet)"
        for r in self.routers.values():
            where = r.ns or "(no router: site on the bridge)"
            up = f", behind router {r.upstream.n}" if r.upstream else ""
            yield f"router {r.n} {where}: nat={r.nat}, public {r.public_ip}{up}"
        for s in self.sites.values():
            alt = f", alt-wan {s.altwan_dev} {s.altwan_ip}" if s.altwan_ip else ""
            yield (
                f"site {s.n} {s.ns}: wan {s.wan_dev} {s.wan_ip} (public {s.public_ip}){alt}, "
                f"lan {s.lan_subnet}; host {s.lan_ns} {s.lan_host_ip}"
            )
            for u in s.uplinks:
                if u.index == 1 and u.element is None:
                    continue
                via = f"router {u.router_ns}" if u.router.ns else "the inet bridge"
                imp = f", impairment element {u.element.ns}" if u.element else ""
                yield (
                    f"  uplink {u.index} {u.dev} {u.ip}/{u.prefixlen} via {u.gateway} "
                    f"(metric {u.metric}) through {via}, public {u.public_ip}{imp}"
                )
        for h in self.public_hosts.values():
            yield f"public host {h.role} {h.ns}: {h.ip}"


def dhcp_client(
    ns: str, dev: str, workdir: Path, mac: str | None = None, timeout: float = 30.0
) -> str:
    """A LAN host in ns asks for its address on dev with busybox udhcpc, as a host's own DHCP
    client would, puts the lease and its default route on dev and returns the address. mac
    first gives dev that MAC (a static lease's)."""
    if mac is not None:
        netns.run(ns, ["ip", "link", "set", dev, "address", mac])
    script = workdir / "udhcpc-lan-host.sh"
    if not script.exists():
        script.write_text(_UDHCPC_HOST_SCRIPT)
        script.chmod(0o755)
    # -n: give up (exit 1) without a lease; -q: exit once bound. A try is 3 s.
    tries = max(1, int(timeout // 3))
    netns.run(
        ns,
        ["busybox", "udhcpc", "-f", "-q", "-n", "-i", dev, "-s", str(script),
         "-t", str(tries), "-T", "3", "-A", "1"],
        timeout=timeout + 10,
    )
    out = netns.run(ns, ["ip", "-4", "-o", "addr", "show", "dev", dev]).stdout
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    if m is None:
        raise NetnsError(["udhcpc"], ns, f"no address on {dev} after the lease: {out}")
    return m.group(1)


# What udhcpc runs on a lab LAN host: the lease and its default route on the device, as a
# host's DHCP client does (udhcpc's environment: interface, ip, mask, router).
_UDHCPC_HOST_SCRIPT = """#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"""


_INET_RULESET = """
table inet lab_inet {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ip daddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 } drop
        ip saddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 } drop
    }
}
"""


# An ICMP black hole for path MTU discovery: the router neither sends nor forwards the errors
# that would tell a sender its packet was too big.
_NO_PTB_RULESET = """
table inet lab_no_ptb {
    chain output {
        type filter hook output priority filter; policy accept;
        icmp type destination-unreachable icmp code frag-needed drop
        icmpv6 type packet-too-big drop
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        icmp type destination-unreachable icmp code frag-needed drop
        icmpv6 type packet-too-big drop
    }
}
"""


def _breakout_ruleset(wan_dev: str, lan: str) -> str:
    return f"""
table ip lab_breakout {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan_dev}" ip saddr {lan} masquerade
    }}
}}
"""


def _find_ca_cert(ret: object, ca_dir: Path) -> Path:
    """The CA certificate path from create_ca's return value, or a conventional name."""
    cands: list[object] = list(ret) if isinstance(ret, tuple | list) else [ret]
    if hasattr(ret, "cert"):
        cands.insert(0, ret.cert)
    for c in cands:
        if isinstance(c, str | Path) and Path(c).is_file() and Path(c).suffix in (".pem", ".crt"):
            return Path(c)
    for nm in ("ca.pem", "ca.crt", "ca-cert.pem"):
        if (ca_dir / nm).is_file():
            return ca_dir / nm
    raise FileNotFoundError(f"create_ca({ca_dir}) left no CA certificate (ca.pem) there")


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None
