"""Bootstrap configuration of socketd: the site's TOML schema and its checks.

`load_config(path)` reads the file given to `socketd --config PATH` and returns a frozen
`SiteConfig`, or raises `ConfigError` listing every problem found in one pass, each naming the
file, the field path (for instance `links[1].port`, array indices counted from 0), what was
expected and, where it can be found, the line (the engine is common/tomlcheck.py). The
schema is documented in docs/config.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.common.addressing import MODES as _ADDRESSING_MODES
from sdwan.common.addressing import Addressing, Owned, check_wan_address
from sdwan.common.keytimers import (
    HANDSHAKE_MARGIN_S,
    KEY_MAX_AGE_MAX_S,
    REKEY_MAX_S,
    REKEY_MIN_S,
    KeyTimers,
    timers_problem,
)
from sdwan.common.tomlcheck import (
    MAX_UNIX_SOCKET_PATH,
    MISSING,
    Checker,
    ConfigError,
    ConfigIssue,
    IPNetwork,
    LineIndex,
    boolean,
    check_networks,
    check_pki_files,
    endpoint_value,
    expects,
    fmt_loc,
    format_endpoint,
    ifname,
    int_range,
    matching,
    network,
    number_range,
    path_string,
    read_toml,
    resolve_path,
    show,
    site_name,
)

__all__ = [
    "Appliance",
    "Cloud",
    "ConfigError",
    "ConfigIssue",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_DATA_DIR",
    "DhcpStatic",
    "IPNetwork",
    "Lan",
    "LanDhcp",
    "Link",
    "Mesh",
    "Paths",
    "Peer",
    "Pki",
    "Pop",
    "Site",
    "SiteConfig",
    "Tunnel",
    "Update",
    "Wan",
    "load_config",
    "vlan_device_name",
]

DEFAULT_CONFIG_PATH = Path("/etc/socketd.toml")
DEFAULT_DATA_DIR = Path("/var/lib/socketd")
DEFAULT_CONTROL_SOCKET = Path("/run/socketd/control.sock")

# Every link, the Alt-WAN link too, has a link id (config order + 1) and a policy-routing table
# of its own (docs/links.md, "Routing tables"), both drawn from this many.
MAX_LINKS = 4
IFNAMSIZ_CHARS = 15
VLAN_MIN, VLAN_MAX = 1, 4094  # 0 and 4095 are reserved by 802.1Q

_TUN_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_LINK_NAME_RE = re.compile(r"[a-z0-9_-]{1,15}")


@dataclass(frozen=True)
class Site:
    id: int
    name: str


@dataclass(frozen=True)
class Paths:
    data_dir: Path = DEFAULT_DATA_DIR
    control_socket: Path = DEFAULT_CONTROL_SOCKET


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class DhcpStatic:
    """A `[[lan.dhcp.static]]` entry: the host with this MAC always gets this address."""

    mac: str  # lower case, colon separated
    ip: ipaddress.IPv4Address
    name: str | None = None


DEFAULT_LEASE_S = 86400


@dataclass(frozen=True)
class LanDhcp:
    """[lan.dhcp]: the DHCP server socketd runs for the LAN hosts (appliance/lanport.py)."""

    enabled: bool = True
    range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    router: ipaddress.IPv4Address | None = None  # None: the LAN address
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    lease_s: int = DEFAULT_LEASE_S
    static: tuple[DhcpStatic, ...] = ()


@dataclass(frozen=True)
class Lan:
    subnets: tuple[IPNetwork, ...]
    interface: str | None = None
    # The LAN port's own address, put on `interface` by socketd (appliance/lanport.py); None
    # leaves the device to the system, as before this field existed.
    address: ipaddress.IPv4Interface | None = None
    dhcp: LanDhcp | None = None

    @property
    def serves_dhcp(self) -> bool:
        return self.dhcp is not None and self.dhcp.enabled


@dataclass(frozen=True)
class Tunnel:
    interface: str = "sdwan0"
    keepalive_s: int = 15
    rekey_s: int = 600
    mss_clamp: bool = True
    # How long the fast path polls for the answer to a lone packet before it sleeps
    # (docs/dataplane.md, "Latency"); 0 turns it off.
    answer_wait_us: int = 200
    # The age at which the fast path refuses a key; None: twice rekey_s plus the handshake
    # margin (common/keytimers.py).
    key_max_age_s: int | None = None

    @property
    def key_timers(self) -> KeyTimers:
        """The rekey interval and key-age limit this site announces to every peer."""
        return KeyTimers.for_rekey(self.rekey_s, self.key_max_age_s)


@dataclass(frozen=True)
class Link:
    name: str
    interface: str
    port: int
    precedence: int = 1
    mtu: int = 1500
    # How the device gets its address (wanaddr.py); a setting stored from the console wins.
    addressing: Addressing = Addressing()
    # Whether this link carries off-cloud (mesh) tunnels; never on a last-resort link.
    offcloud: bool = True
    # A hub's static public IP and port (a port forward on its router), offered to peers.
    public: tuple[str, int] | None = None
    # A private, MPLS-like network between sites (docs/recovery.md, "Alt-WAN"): no NAT, no
    # PoP session, no mesh tunnel, no STUN; only Alt-WAN tunnels to the other sites' Alt-WAN
    # addresses, which the directory lists.
    altwan: bool = False
    # An 802.1Q VLAN on `interface`: socketd makes the device (`vlan_device`, by default
    # "<interface>.<vlan>") if it is missing, and everything else of the link runs on it.
    vlan: int | None = None
    vlan_device: str | None = None
    # Active/active: links of one precedence share flows in proportion to this.
    bandwidth_mbps: int = 100
    # Link health (docs/links.md, "Health"): past any of these the link is degraded.
    loss_pct: float = 3.0
    jitter_ms: int = 30
    latency_ms: int = 600

    @property
    def device(self) -> str:
        """The device the link's socket, addressing, routing table and state are bound to."""
        if self.vlan is None:
            return self.interface
        return self.vlan_device or vlan_device_name(self.interface, self.vlan)


def vlan_device_name(interface: str, vlan: int) -> str:
    """The name a VLAN device gets when the config does not give one (iproute2's habit)."""
    return f"{interface}.{vlan}"


@dataclass(frozen=True)
class Peer:
    site_id: int
    endpoint: tuple[str, int]
    subnets: tuple[IPNetwork, ...]
    link: str

    @property
    def endpoint_str(self) -> str:
        return format_endpoint(self.endpoint)


@dataclass(frozen=True)
class Pop:
    """A PoP of the account; the first [[pops]] entry is the primary."""

    id: int
    endpoint: tuple[str, int]
    stun: tuple[str, int] | None = None


@dataclass(frozen=True)
class Mesh:
    """[mesh]: the off-cloud tunnels to the account's other sites (docs/mesh.md)."""

    enabled: bool = True
    keepalive_s: int = 15
    probe_window: int = 32  # ports probed around the peer's public port
    punch_timeout_s: int = 10  # a punch that found nothing by then has failed
    # The birthday approach for a pair where one side's NAT randomises its ports
    # (docs/mesh.md, "Birthday punching"): that side opens birthday_sockets extra UDP sockets
    # on local ports drawn from birthday_ports, the other sends birthday_probes probes to
    # random ports of its public address.
    birthday_ports: tuple[int, int] = (40000, 40999)
    birthday_sockets: int = 256
    birthday_probes: int = 1024
    # A tunnel carrying traffic that the peer has not answered for this long is down.
    silent_after_ms: int = 700
    # Prefixes sent over the mesh whenever a direct tunnel to their site is up (until the
    # off-cloud rules do this).
    pin: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Cloud:
    keepalive_ms: int = 200
    dead_after_ms: int = 600
    return_hold_s: int = 30
    ping_s: int = 1
    # WAN recovery ends once the cloud has been back this long (docs/recovery.md).
    recovery_hold_s: int = 10


@dataclass(frozen=True)
class Wan:
    """[wan]: how link health is measured and how traffic moves between links
    (docs/links.md)."""

    probe_ms: int = 200  # a probe per link (to the PoP, to mesh peers) this often
    silent_after_ms: int = 700  # no answer over a link this long: it is down
    window_s: int = 10  # loss, jitter and latency are figured over this much history
    return_hold_s: int = 10  # a better link takes traffic back once healthy this long
    ramp_s: int = 4  # flows leave a degraded link over this long


MAX_TIME_SERVERS = 8


@dataclass(frozen=True)
class Time:
    """[time]: the NTP servers chronyd keeps the clock to (docs/time.md). No servers: no time
    sync. set_clock false lets chronyd measure without touching the clock (a lab host)."""

    servers: tuple[str, ...] = ()
    set_clock: bool = True


DEFAULT_LED_MAP = Path("/etc/sdwan/leds.toml")


@dataclass(frozen=True)
class Appliance:
    """[appliance]: the hardware watchdog, the LED map and the crash-loop limits
    (docs/watchdog.md, docs/leds.md). No watchdog unless configured: a lab host killing socketd
    must not reset itself. The LED map defaults to DEFAULT_LED_MAP where that file exists."""

    watchdog: Path | None = None
    watchdog_timeout_s: int = 15
    watchdog_startup_s: int = 300
    leds: Path | None = None
    crash_loop_starts: int = 5
    crash_loop_window_s: int = 120


DEFAULT_RAUC_CONF = Path("/etc/rauc/system.conf")
DEFAULT_COMMIT_GRACE_S = 300
# init reboots a slot still not committed this long after boot (commit-deadline): the grace
# time, socketd's start and a margin must fit before it.
DEFAULT_COMMIT_DEADLINE_S = 900
COMMIT_DEADLINE_MARGIN_S = 60


@dataclass(frozen=True)
class Update:
    """[update]: A/B updates through RAUC (docs/update.md). The updater runs when RAUC's
    system.conf is there (the appliance); on a lab or dev host it is absent and nothing runs.
    A slot booted for the first time is marked good once the box is healthy: the cloud
    reached, or commit_grace_s passed with the rest healthy. One still not committed
    commit_deadline_s after boot is rebooted by init (the image's commit-deadline), so a slot
    whose socketd never starts falls back too."""

    system_conf: Path | None = None
    commit_grace_s: int = DEFAULT_COMMIT_GRACE_S
    commit_deadline_s: int = DEFAULT_COMMIT_DEADLINE_S
    reboot_command: tuple[str, ...] = ("reboot",)


@dataclass(frozen=True)
class SiteConfig:
    site: Site
    paths: Paths
    pki: Pki
    lan: Lan
    tunnel: Tunnel
    links: tuple[Link, ...]
    peers: tuple[Peer, ...]
    source: Path
    pops: tuple[Pop, ...] = ()
    cloud: Cloud = Cloud()
    appliance: Appliance = Appliance()
    mesh: Mesh = Mesh()
    wan: Wan = Wan()
    time: Time = Time()
    update: Update = Update()

    def link(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def peer(self, site_id: int) -> Peer:
        for peer in self.peers:
            if peer.site_id == site_id:
                return peer
        raise KeyError(site_id)

    def owned(self) -> tuple[Owned, ...]:
        """The LAN's and the static peers' subnets: what no WAN address, DHCP lease or prefix
        of the PoP's directory may overlap."""
        return owned_subnets(self.lan, self.peers)


def owned_subnets(lan: Lan, peers: tuple[Peer, ...] | list[Peer]) -> tuple[Owned, ...]:
    return (
        *(Owned(net, "the LAN") for net in lan.subnets),
        *(
            Owned(net, f"static peer site {p.site_id}", p.site_id)
            for p in peers
            for net in p.subnets
        ),
    )


_tun_name = matching(_TUN_NAME_RE, "an interface name of 1..15 characters [A-Za-z0-9_.-]")
_link_name = matching(_LINK_NAME_RE, "a name of 1..15 characters [a-z0-9_-]")




def _check_addressing(
    c: Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...]
) -> Addressing | object:
    """A link's optional `addressing`: "none", "dhcp" or {mode = "static", address, gateway}."""
    raw = entry.get("addressing", MISSING)
    if raw is MISSING:
        return Addressing()
    if isinstance(raw, dict):
        c.known_keys(raw, loc, ("mode", "address", "gateway"))
        mode = raw.get("mode", MISSING)
        if mode is MISSING:
            c.error((*loc, "mode"), 'missing required field (expected "none", "static" or "dhcp")')
            return MISSING
        if mode not in _ADDRESSING_MODES:
            c.error((*loc, "mode"), f'expected "none", "static" or "dhcp", got {show(mode)}')
            return MISSING
        if mode == "static":
            for key in ("address", "gateway"):
                if key not in raw:
                    c.error((*loc, key), 'missing required field (mode "static" needs it)')
            if "address" not in raw or "gateway" not in raw:
                return MISSING
            try:
                return Addressing.static(raw["address"], raw["gateway"])
            except ValueError as exc:
                about_gw = str(exc).startswith(("gateway", "expected a gateway"))
                c.error((*loc, "gateway" if about_gw else "address"), str(exc))
                return MISSING
        for key in ("address", "gateway"):
            if key in raw:
                c.error((*loc, key), f'only for mode "static", not {show(mode)}')
                return MISSING
        return Addressing(mode)
    try:
        return Addressing.from_value(raw)
    except ValueError as exc:
        c.error(loc, str(exc))
        return MISSING


# What an Alt-WAN link may not say, and why (docs/config.md): (key, whether its value is
# refused, the message).
_ALTWAN_REFUSES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "public",
        lambda _v: True,
        "an Alt-WAN link has no public endpoint: no NAT stands between the sites, and the"
        " directory tells them its address",
    ),
    (
        "offcloud",
        lambda v: v is True,
        "an Alt-WAN link carries no mesh tunnels (they run over the Internet links); it carries"
        " Alt-WAN tunnels",
    ),
    (
        "precedence",
        lambda _v: True,
        "an Alt-WAN link has no precedence: it carries no PoP session and no mesh tunnel, only"
        " Alt-WAN tunnels, which WAN recovery puts first",
    ),
)


def _check_links(c: Checker, doc: Mapping[str, Any]) -> list[Link] | None:
    raw = doc.get("links", MISSING)
    if raw is MISSING:
        c.error(("links",), f"missing required [[links]] (expected 1..{MAX_LINKS} entries)")
        return None
    if not isinstance(raw, list):
        c.error(("links",), f"expected an array of tables [[links]], got {show(raw)}")
        return None
    if not raw:
        c.error(("links",), f"expected 1..{MAX_LINKS} [[links]] entries, got none")
    for i in range(MAX_LINKS, len(raw)):
        c.error(
            ("links", i),
            f"at most {MAX_LINKS} [[links]] entries, the Alt-WAN link included (each link has"
            f" a routing table of its own), got {len(raw)}",
        )
    links: list[Link] = []
    ok = True
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("links", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        c.known_keys(
            entry,
            loc,
            (
                "name", "interface", "port", "precedence", "mtu", "addressing", "offcloud",
                "public", "altwan", "bandwidth_mbps", "loss_pct", "jitter_ms", "latency_ms",
                "vlan", "vlan_device",
            ),
        )
        altwan = c.value(entry, (*loc, "altwan"), boolean, default=False)
        precedence = c.value(entry, (*loc, "precedence"), int_range(1, 3), default=1)
        last_resort = precedence == 3
        offcloud = c.value(
            entry, (*loc, "offcloud"), boolean, default=not last_resort and altwan is not True
        )
        if offcloud is True and last_resort and "offcloud" in entry:
            c.error(
                (*loc, "offcloud"),
                "a last-resort link (precedence 3) never carries off-cloud tunnels",
            )
            offcloud = MISSING
        if altwan is True:
            for key, bad, why in _ALTWAN_REFUSES:
                if key in entry and bad(entry[key]):
                    c.error((*loc, key), why)
                    altwan = MISSING
        values = {
            "name": c.value(entry, (*loc, "name"), _link_name),
            "interface": c.value(entry, (*loc, "interface"), ifname),
            "port": c.value(entry, (*loc, "port"), int_range(1, 65535)),
            "precedence": precedence,
            "mtu": c.value(entry, (*loc, "mtu"), int_range(576, 9000), default=1500),
            "addressing": _check_addressing(c, entry, (*loc, "addressing")),
            "offcloud": offcloud,
            "public": c.value(entry, (*loc, "public"), endpoint_value, default=None),
            "altwan": altwan,
            "bandwidth_mbps": c.value(
                entry, (*loc, "bandwidth_mbps"), int_range(1, 1_000_000), default=100
            ),
            "loss_pct": c.value(entry, (*loc, "loss_pct"), number_range(0.1, 100), default=3.0),
            "jitter_ms": c.value(entry, (*loc, "jitter_ms"), int_range(1, 10_000), default=30),
            "latency_ms": c.value(
                entry, (*loc, "latency_ms"), int_range(1, 60_000), default=600
            ),
            **_check_vlan(c, entry, loc),
        }
        if any(v is MISSING for v in values.values()):
            ok = False
            continue
        links.append(Link(**values))

    altwan_at = [i for i, e in enumerate(raw) if isinstance(e, dict) and e.get("altwan") is True]
    for i in altwan_at[1:]:
        c.error(("links", i, "altwan"), f"one Alt-WAN link per site (also links[{altwan_at[0]}])")
        ok = False
    if altwan_at and len(altwan_at) == len(raw):
        c.error(
            ("links",),
            "every link is Alt-WAN: at least one link must reach the Internet (the PoPs, the mesh)",
        )
        ok = False

    seen_names: dict[str, int] = {}
    seen_ports: dict[tuple[str, int], int] = {}
    ok &= _check_vlan_devices(c, raw)
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            continue
        name, iface, port = entry.get("name"), _device_of(entry), entry.get("port")
        if isinstance(name, str):
            if name in seen_names:
                c.error(
                    ("links", i, "name"),
                    f"duplicate link name {show(name)} (also links[{seen_names[name]}])",
                )
                ok = False
            seen_names.setdefault(name, i)
        if isinstance(iface, str) and isinstance(port, int) and not isinstance(port, bool):
            if (iface, port) in seen_ports:
                c.error(
                    ("links", i, "port"),
                    f"duplicate port {port} on {_on_device(entry)}"
                    f" (also links[{seen_ports[(iface, port)]}])",
                )
                ok = False
            seen_ports.setdefault((iface, port), i)
    ok &= _check_shared_devices(c, raw)
    return links if ok else None


def _check_shared_devices(c: Checker, raw: list[Any]) -> bool:
    """Links on one device (several ports on it) may only leave its addressing to the system:
    each link's addressing replaces the device's addresses and its default routes, so two
    would undo each other."""
    by_device: dict[str, list[int]] = {}
    for i, entry in enumerate(raw):
        dev = _device_of(entry) if isinstance(entry, dict) else None
        if dev is not None:
            by_device.setdefault(dev, []).append(i)
    ok = True
    for dev, idx in by_device.items():
        if len(idx) < 2:
            continue
        for i in idx:
            mode = _addressing_mode(raw[i].get("addressing"))
            if mode not in (None, "none"):
                others = ", ".join(f"links[{j}]" for j in idx if j != i)
                c.error(
                    ("links", i, "addressing"),
                    f"{show(dev)} is also the device of {others}: links sharing a device"
                    ' leave its addressing to the system ("none"), or one set of addresses'
                    " would replace the other's",
                )
                ok = False
    return ok


def _addressing_mode(raw: Any) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, dict):
        mode = raw.get("mode")
        return mode if isinstance(mode, str) else "?"
    return raw if isinstance(raw, str) else "?"


def _check_vlan(
    c: Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...]
) -> dict[str, Any]:
    """A link's optional `vlan` and `vlan_device`: the VLAN id and the device's name, which
    must fit Linux's IFNAMSIZ."""
    vlan = c.value(entry, (*loc, "vlan"), int_range(VLAN_MIN, VLAN_MAX), default=None)
    device = c.value(entry, (*loc, "vlan_device"), ifname, default=None)
    if device is not None and device is not MISSING and "vlan" not in entry:
        c.error((*loc, "vlan_device"), "only with vlan (the name of the link's VLAN device)")
        device = MISSING
    iface = entry.get("interface")
    if isinstance(vlan, int) and device is None and isinstance(iface, str):
        name = vlan_device_name(iface, vlan)
        if len(os.fsencode(name)) > IFNAMSIZ_CHARS:
            c.error(
                (*loc, "vlan"),
                f"the VLAN device's name {show(name)} is {len(os.fsencode(name))} characters,"
                f" longer than Linux allows ({IFNAMSIZ_CHARS}): name it with vlan_device",
            )
            vlan = MISSING
    return {"vlan": vlan, "vlan_device": device}


def _device_of(entry: Mapping[str, Any]) -> str | None:
    """The device a raw [[links]] entry is bound to, or None where its fields are wrong (they
    were reported by the field checks)."""
    iface, vlan, device = entry.get("interface"), entry.get("vlan"), entry.get("vlan_device")
    if not isinstance(iface, str):
        return None
    if vlan is None:
        return iface
    if not isinstance(vlan, int) or isinstance(vlan, bool):
        return None
    return device if isinstance(device, str) else vlan_device_name(iface, vlan)


def _on_device(entry: Mapping[str, Any]) -> str:
    if entry.get("vlan") is None:
        return f"interface {show(entry.get('interface'))}"
    return f"VLAN {entry.get('vlan')} on {show(entry.get('interface'))}"


def _check_vlan_devices(c: Checker, raw: list[Any]) -> bool:
    """One VLAN link per interface and VLAN id, and a VLAN device's name that is no other
    link's device: socketd would make (and remove) a device another link relies on."""
    ok = True
    seen_vlans: dict[tuple[str, int], int] = {}
    plain: dict[str, int] = {}
    for i, entry in enumerate(raw):
        if isinstance(entry, dict) and entry.get("vlan") is None:
            iface = entry.get("interface")
            if isinstance(iface, str):
                plain.setdefault(iface, i)
    seen_devices: dict[str, int] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or entry.get("vlan") is None:
            continue
        iface, vlan, device = entry.get("interface"), entry.get("vlan"), _device_of(entry)
        if not isinstance(iface, str) or device is None or not isinstance(vlan, int):
            continue
        if (iface, vlan) in seen_vlans:
            c.error(
                ("links", i, "vlan"),
                f"VLAN {vlan} on {show(iface)} is already a link"
                f" (links[{seen_vlans[(iface, vlan)]}])",
            )
            ok = False
            continue
        seen_vlans[(iface, vlan)] = i
        where = "vlan_device" if "vlan_device" in entry else "vlan"
        other = seen_devices.get(device, plain.get(device))
        if other is not None or device == iface:
            whose = f"links[{other}]'s device" if other is not None else "its own interface"
            c.error(("links", i, where), f"the VLAN device {show(device)} is {whose}")
            ok = False
            continue
        seen_devices[device] = i
    return ok


def _check_peers(
    c: Checker, doc: Mapping[str, Any], site_id: Any, links: list[Link] | None
) -> list[Peer] | None:
    raw = doc.get("peers", [])
    if not isinstance(raw, list):
        c.error(("peers",), f"expected an array of tables [[peers]], got {show(raw)}")
        return None
    link_names = [link.name for link in links] if links is not None else None
    peers: list[Peer] = []
    ok = True
    seen_ids: dict[int, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("peers", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, ("site_id", "endpoint", "subnets", "link"))
        peer_id = c.value(entry, (*loc, "site_id"), int_range(1, 65535))
        if peer_id is not MISSING:
            if peer_id == site_id:
                c.error(
                    (*loc, "site_id"),
                    f"expected the id of another site, got our own site id {peer_id}",
                )
                peer_id = MISSING
            elif peer_id in seen_ids:
                c.error(
                    (*loc, "site_id"),
                    f"duplicate peer site_id {peer_id} (also peers[{seen_ids[peer_id]}])",
                )
                peer_id = MISSING
            else:
                seen_ids[peer_id] = i
        endpoint = c.value(entry, (*loc, "endpoint"), endpoint_value)
        subnets = check_networks(c, entry, (*loc, "subnets"))
        link_name = c.value(entry, (*loc, "link"), _link_name, default=None)
        if link_name is None:
            # Without valid links there is no default; that error is reported for [[links]].
            link_name = link_names[0] if link_names else MISSING
        elif link_name is not MISSING and link_names is not None and link_name not in link_names:
            c.error(
                (*loc, "link"),
                f"expected the name of a [[links]] entry ({', '.join(link_names)}),"
                f" got {show(link_name)}",
            )
            link_name = MISSING
        if MISSING in (peer_id, endpoint, link_name) or subnets is None:
            ok = False
            continue
        peers.append(Peer(site_id=peer_id, endpoint=endpoint, subnets=subnets, link=link_name))
    return peers if ok else None


MAX_POP_ID = 65535


def _check_pops(c: Checker, doc: Mapping[str, Any]) -> list[Pop] | None:
    raw = doc.get("pops", [])
    if not isinstance(raw, list):
        c.error(("pops",), f"expected an array of tables [[pops]], got {show(raw)}")
        return None
    pops: list[Pop] = []
    ok = True
    seen_ids: dict[int, int] = {}
    seen_eps: dict[tuple[str, int], int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("pops", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, ("id", "endpoint", "stun"))
        pop_id = c.value(entry, (*loc, "id"), int_range(1, MAX_POP_ID))
        if pop_id is not MISSING:
            if pop_id in seen_ids:
                c.error((*loc, "id"), f"duplicate PoP id {pop_id} (also pops[{seen_ids[pop_id]}])")
                pop_id = MISSING
            else:
                seen_ids[pop_id] = i
        endpoint = c.value(entry, (*loc, "endpoint"), endpoint_value)
        if endpoint is not MISSING:
            if endpoint in seen_eps:
                c.error(
                    (*loc, "endpoint"),
                    f"duplicate PoP endpoint {show(format_endpoint(endpoint))}"
                    f" (also pops[{seen_eps[endpoint]}])",
                )
                endpoint = MISSING
            else:
                seen_eps[endpoint] = i
        stun = c.value(entry, (*loc, "stun"), endpoint_value, default=None)
        if MISSING in (pop_id, endpoint, stun):
            ok = False
            continue
        pops.append(Pop(id=pop_id, endpoint=endpoint, stun=stun))
    return pops if ok else None


def _check_cloud(c: Checker, doc: Mapping[str, Any]) -> Cloud | None:
    table = c.table(doc, ("cloud",), required=False)
    if table is None:
        return None
    c.known_keys(
        table,
        ("cloud",),
        ("keepalive_ms", "dead_after_ms", "return_hold_s", "ping_s", "recovery_hold_s"),
    )
    keepalive = c.value(table, ("cloud", "keepalive_ms"), int_range(50, 5000), default=200)
    dead_default = 3 * keepalive if keepalive is not MISSING else 600
    # At least two keepalive intervals: one lost keepalive must never kill a session.
    dead_lo = 2 * keepalive if keepalive is not MISSING else 100
    dead = c.value(
        table, ("cloud", "dead_after_ms"), int_range(dead_lo, 60000), default=dead_default
    )
    hold = c.value(table, ("cloud", "return_hold_s"), int_range(0, 3600), default=30)
    ping = c.value(table, ("cloud", "ping_s"), int_range(1, 60), default=1)
    recovery_hold = c.value(table, ("cloud", "recovery_hold_s"), int_range(0, 3600), default=10)
    if MISSING in (keepalive, dead, hold, ping, recovery_hold):
        return None
    return Cloud(
        keepalive_ms=keepalive,
        dead_after_ms=dead,
        return_hold_s=hold,
        ping_s=ping,
        recovery_hold_s=recovery_hold,
    )


def _check_wan(c: Checker, doc: Mapping[str, Any]) -> Wan | None:
    table = c.table(doc, ("wan",), required=False)
    if table is None:
        return Wan()
    c.known_keys(
        table, ("wan",), ("probe_ms", "silent_after_ms", "window_s", "return_hold_s", "ramp_s")
    )
    probe = c.value(table, ("wan", "probe_ms"), int_range(50, 5000), default=200)
    # At least three probe intervals: one or two lost probes must never take a link down.
    silent_lo = 3 * probe if probe is not MISSING else 150
    silent = c.value(
        table, ("wan", "silent_after_ms"), int_range(silent_lo, 60000),
        default=max(700, 3 * probe + 100) if probe is not MISSING else 700,
    )
    window = c.value(table, ("wan", "window_s"), int_range(2, 600), default=10)
    hold = c.value(table, ("wan", "return_hold_s"), int_range(0, 3600), default=10)
    ramp = c.value(table, ("wan", "ramp_s"), int_range(0, 60), default=4)
    if MISSING in (probe, silent, window, hold, ramp):
        return None
    return Wan(probe_ms=probe, silent_after_ms=silent, window_s=window, return_hold_s=hold,
               ramp_s=ramp)


# A host name (RFC 1123 labels) or an IPv4/IPv6 literal; never starting with "-", so a name
# is never taken for an option by chronyd.
_NTP_SERVER_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|[0-9A-Fa-f:.]{2,45}"
)


@expects(f"a list of at most {MAX_TIME_SERVERS} NTP server names or addresses")
def _ntp_servers(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_TIME_SERVERS:
        raise ValueError(f"expected a list of at most {MAX_TIME_SERVERS} NTP server names or "
                         f"addresses, got {show(value)}")
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or not _NTP_SERVER_RE.fullmatch(v):
            raise ValueError(f"expected an NTP server's host name or address, got {show(v)}")
        if ":" in v or v.replace(".", "").isdigit():
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{show(v)} is not an IP address") from None
        if v in out:
            raise ValueError(f"{show(v)} is listed twice")
        out.append(v)
    return tuple(out)


def _check_time(c: Checker, doc: Mapping[str, Any]) -> Time | None:
    table = c.table(doc, ("time",), required=False)
    if table is None:
        return Time()
    c.known_keys(table, ("time",), ("servers", "set_clock"))
    servers = c.value(table, ("time", "servers"), _ntp_servers, default=())
    set_clock = c.value(table, ("time", "set_clock"), boolean, default=True)
    if MISSING in (servers, set_clock):
        return None
    return Time(servers=servers, set_clock=set_clock)


@expects("a command line (a string, split like a shell would, never run through one)")
def _command_line(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise ValueError(f"expected a command line as a string, got {show(value)}")
    try:
        argv = tuple(shlex.split(value))
    except ValueError as e:
        raise ValueError(f"cannot split {show(value)}: {e}") from None
    if not argv:
        raise ValueError("expected a command, got an empty string")
    return argv


def _check_update(c: Checker, doc: Mapping[str, Any], base: Path) -> Update | None:
    table = c.table(doc, ("update",), required=False)
    default_conf = DEFAULT_RAUC_CONF if DEFAULT_RAUC_CONF.is_file() else None
    if table is None:
        return Update(system_conf=default_conf)
    loc: tuple[str, ...] = ("update",)
    c.known_keys(table, loc, ("system_conf", "commit_grace_s", "commit_deadline_s",
                              "reboot_command"))
    conf: Path | None | object = default_conf
    raw = table.get("system_conf", MISSING)
    if raw is False:
        conf = None
    elif raw is not MISSING:
        if isinstance(raw, str) and raw and "\0" not in raw:
            conf = resolve_path(base, raw)
            if not conf.is_file():  # type: ignore[union-attr]
                c.error((*loc, "system_conf"), f"RAUC's system.conf not found: {conf}")
                conf = MISSING
        else:
            c.error((*loc, "system_conf"),
                    f"expected the path of RAUC's system.conf or false, got {show(raw)}")
            conf = MISSING
    grace = c.value(table, (*loc, "commit_grace_s"), int_range(0, 86400),
                    default=DEFAULT_COMMIT_GRACE_S)
    deadline = c.value(table, (*loc, "commit_deadline_s"), int_range(30, 86400),
                       default=DEFAULT_COMMIT_DEADLINE_S)
    if (MISSING not in (grace, deadline)
            and deadline < grace + COMMIT_DEADLINE_MARGIN_S):  # type: ignore[operator]
        c.error((*loc, "commit_deadline_s"),
                f"{deadline} s leaves no time to commit: a new slot is rebooted that long after"
                f" boot unless committed, which takes at least commit_grace_s ({grace} s)"
                f" without a PoP; set it to {grace + COMMIT_DEADLINE_MARGIN_S} or more"
                f" (default {DEFAULT_COMMIT_DEADLINE_S})")
        deadline = MISSING
    reboot = c.value(table, (*loc, "reboot_command"), _command_line, default=("reboot",))
    if MISSING in (conf, grace, deadline, reboot):
        return None
    return Update(system_conf=conf, commit_grace_s=grace,  # type: ignore[arg-type]
                  commit_deadline_s=deadline, reboot_command=reboot)  # type: ignore[arg-type]


_PORT_RANGE_RE = re.compile(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*")
BIRTHDAY_PORT_MIN = 1024  # below are the well-known ports; NATs rarely draw from there either


@expects(f'a port range "LO-HI" within {BIRTHDAY_PORT_MIN}..65535')
def port_range(value: Any) -> tuple[int, int]:
    m = _PORT_RANGE_RE.fullmatch(value) if isinstance(value, str) else None
    lo, hi = (int(m[1]), int(m[2])) if m else (0, 0)
    if m is None or not BIRTHDAY_PORT_MIN <= lo <= hi <= 65535:
        raise ValueError(
            f'expected a port range "LO-HI" within {BIRTHDAY_PORT_MIN}..65535, got {show(value)}'
        )
    return lo, hi


def _check_mesh(c: Checker, doc: Mapping[str, Any], links: list[Link] | None) -> Mesh | None:
    table = c.table(doc, ("mesh",), required=False)
    if table is None:
        return None
    loc = ("mesh",)
    c.known_keys(
        table,
        loc,
        ("enabled", "keepalive_s", "probe_window", "punch_timeout_s", "silent_after_ms", "pin",
         "birthday_ports", "birthday_sockets", "birthday_probes"),
    )
    enabled = c.value(table, (*loc, "enabled"), boolean, default=True)
    keepalive = c.value(table, (*loc, "keepalive_s"), int_range(1, 300), default=15)
    window = c.value(table, (*loc, "probe_window"), int_range(1, 256), default=32)
    timeout = c.value(table, (*loc, "punch_timeout_s"), int_range(2, 120), default=10)
    ports = c.value(table, (*loc, "birthday_ports"), port_range, default=Mesh.birthday_ports)
    # Every socket is a file descriptor of socketd's, and two punches may run at once.
    sockets = c.value(table, (*loc, "birthday_sockets"), int_range(1, 512), default=256)
    probes = c.value(table, (*loc, "birthday_probes"), int_range(1, 4096), default=1024)
    silent = c.value(table, (*loc, "silent_after_ms"), int_range(200, 60000), default=700)
    if ports is not MISSING and "birthday_ports" in table:
        # (The default range simply skips a link's port: its bind fails.)
        lo, hi = ports
        for i, link in enumerate(links or ()):
            if lo <= link.port <= hi:
                c.error(
                    (*loc, "birthday_ports"),
                    f"expected a range without the links' ports, got {lo}-{hi}, which holds"
                    f" links[{i}].port {link.port}",
                )
                ports = MISSING
                break
    if ports is not MISSING and sockets is not MISSING and sockets > ports[1] - ports[0] + 1:
        c.error(
            (*loc, "birthday_sockets"),
            f"expected at most the {ports[1] - ports[0] + 1} ports of birthday_ports"
            f" {ports[0]}-{ports[1]}, got {sockets}",
        )
        sockets = MISSING
    pin: tuple[IPNetwork, ...] | None = ()
    if "pin" in table:
        pin = check_networks(c, table, (*loc, "pin"))
    if MISSING in (enabled, keepalive, window, timeout, silent, ports, sockets, probes) or (
        pin is None
    ):
        return None
    return Mesh(
        enabled=enabled,
        keepalive_s=keepalive,
        probe_window=window,
        punch_timeout_s=timeout,
        silent_after_ms=silent,
        pin=tuple(pin),
        birthday_ports=ports,
        birthday_sockets=sockets,
        birthday_probes=probes,
    )


def _check_appliance(c: Checker, doc: Mapping[str, Any], base: Path) -> Appliance | None:
    table = c.table(doc, ("appliance",), required=False)
    if table is None:
        return None
    loc: tuple[str, ...] = ("appliance",)
    c.known_keys(
        table,
        loc,
        (
            "watchdog",
            "watchdog_timeout_s",
            "watchdog_startup_s",
            "leds",
            "crash_loop_starts",
            "crash_loop_window_s",
        ),
    )
    paths: dict[str, Path | None] = {}
    for key, what in (("watchdog", "a watchdog device"), ("leds", "an LED map")):
        raw = table.get(key, MISSING)
        if raw is MISSING:
            paths[key] = DEFAULT_LED_MAP if key == "leds" and DEFAULT_LED_MAP.is_file() else None
        elif raw is False:
            paths[key] = None
        elif isinstance(raw, str) and raw and "\0" not in raw:
            path = resolve_path(base, raw)
            if key == "leds" and not path.is_file():
                c.error((*loc, key), f"LED map not found: {path}")
            paths[key] = path
        else:
            c.error((*loc, key), f"expected the path of {what} or false, got {show(raw)}")
    timeout = c.value(table, (*loc, "watchdog_timeout_s"), int_range(2, 600), default=15)
    # Long enough for a socketd starting on a slow or loaded CPU (docs/watchdog.md); a
    # start-up that hangs is still reset after it.
    startup_default = max(300, timeout) if timeout is not MISSING else 300
    startup = c.value(
        table, (*loc, "watchdog_startup_s"), int_range(10, 3600), default=startup_default
    )
    if MISSING not in (timeout, startup) and startup < timeout:
        c.error(
            (*loc, "watchdog_startup_s"),
            f"must not be shorter than watchdog_timeout_s ({timeout}), got {startup}",
        )
        startup = MISSING
    starts = c.value(table, (*loc, "crash_loop_starts"), int_range(2, 100), default=5)
    window = c.value(table, (*loc, "crash_loop_window_s"), int_range(10, 86400), default=120)
    if len(paths) < 2 or MISSING in (timeout, startup, starts, window):
        return None
    return Appliance(
        watchdog=paths["watchdog"],
        watchdog_timeout_s=timeout,
        watchdog_startup_s=startup,
        leds=paths["leds"],
        crash_loop_starts=starts,
        crash_loop_window_s=window,
    )


# --------------------------------------------------------------------------- [lan]

_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
LAN_PREFIX_MIN, LAN_PREFIX_MAX = 8, 30  # /31 and /32 leave no room for a LAN host
LEASE_S_MIN, LEASE_S_MAX = 60, 30 * 86400
MAX_DNS = 8
# udhcpd allocates its lease table for the whole range, and `lan` reads every lease back:
# a /16 range would cost megabytes and stall the reads.
MAX_DHCP_RANGE = 4096


@expects('a MAC address such as "02:00:00:00:01:02"')
def mac_address(value: Any) -> str:
    """A host's MAC address, lower case and colon separated ("-" is accepted too)."""
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value):
        raise ValueError(f'expected a MAC address such as "02:00:00:00:01:02", got {show(value)}')
    mac = value.lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise ValueError(
            f"expected a host's (unicast) MAC address, got {show(value)}: the lowest bit of its"
            " first byte makes it a multicast address"
        )
    if mac == "00:00:00:00:00:00":
        raise ValueError(f"expected a host's MAC address, got {show(value)}")
    return mac


@expects('an IPv4 address such as "10.1.0.1"')
def ipv4_address(value: Any) -> ipaddress.IPv4Address:
    try:
        if not isinstance(value, str):
            raise ValueError
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(
            f'expected an IPv4 address such as "10.1.0.1", got {show(value)}'
        ) from None


@expects("a host name of 1..63 letters, digits and dashes")
def host_name(value: Any) -> str:
    if not isinstance(value, str) or not _HOSTNAME_RE.fullmatch(value):
        raise ValueError(
            f"expected a host name of 1..63 letters, digits and dashes, got {show(value)}"
        )
    return value


def _special(ip: ipaddress.IPv4Address) -> str | None:
    """What makes ip unusable on a LAN, or None."""
    for flag, what in (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_reserved, "a reserved address"),
    ):
        if flag:
            return what
    return None


@expects('an IPv4 address with its prefix length, such as "10.1.0.1/24"')
def lan_address(value: Any) -> ipaddress.IPv4Interface:
    expected = 'expected an IPv4 address with its prefix length, such as "10.1.0.1/24"'
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{expected}, got {show(value)}")
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(f"{expected}, got {show(value)}") from None
    net = iface.network
    if not LAN_PREFIX_MIN <= net.prefixlen <= LAN_PREFIX_MAX:
        raise ValueError(
            f"expected a prefix length {LAN_PREFIX_MIN}..{LAN_PREFIX_MAX} (a network with room"
            f" for the LAN's hosts), got {show(value)}"
        )
    special = _special(iface.ip)
    if special:
        raise ValueError(f"{iface.ip} is {special}: it cannot be the LAN port's address")
    if iface.ip == net.network_address:
        raise ValueError(f"{iface.ip} is the network address of {net}, not a host's")
    if iface.ip == net.broadcast_address:
        raise ValueError(f"{iface.ip} is the broadcast address of {net}, not a host's")
    return iface


def _on_lan(
    c: Checker,
    loc: tuple[str | int, ...],
    ip: ipaddress.IPv4Address,
    address: ipaddress.IPv4Interface,
) -> bool:
    """Whether ip can be a LAN host's address in the network of `address` (else an error)."""
    net = address.network
    if ip not in net:
        c.error(loc, f"{ip} is not in the LAN's network {net} (lan.address {address})")
    elif ip == net.network_address:
        c.error(loc, f"{ip} is the network address of {net}, not a host's")
    elif ip == net.broadcast_address:
        c.error(loc, f"{ip} is the broadcast address of {net}, not a host's")
    else:
        return True
    return False


def _check_dhcp_range(
    c: Checker,
    raw: Mapping[str, Any],
    loc: tuple[str | int, ...],
    address: ipaddress.IPv4Interface | None,
    required: bool,
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None | object:
    value = raw.get("range", MISSING)
    rloc = (*loc, "range")
    if value is MISSING:
        if required:
            c.error(rloc, 'missing required field (expected ["FIRST", "LAST"], the addresses'
                          " the server leases)")
            return MISSING
        return None
    if not isinstance(value, list) or len(value) != 2:
        c.error(
            rloc, f'expected an array of two IPv4 addresses ["FIRST", "LAST"], got {show(value)}'
        )
        return MISSING
    ends: list[ipaddress.IPv4Address] = []
    for i, item in enumerate(value):
        try:
            ip = ipv4_address(item)
        except ValueError as exc:
            c.error((*rloc, i), str(exc))
            continue
        if address is None or _on_lan(c, (*rloc, i), ip, address):
            ends.append(ip)
    if len(ends) != 2:
        return MISSING
    first, last = ends
    if first > last:
        c.error(rloc, f"reversed: the first address {first} is above the last {last}")
        return MISSING
    if int(last) - int(first) + 1 > MAX_DHCP_RANGE:
        c.error(rloc, f"{first}..{last} holds {int(last) - int(first) + 1} addresses: at most"
                      f" {MAX_DHCP_RANGE}")
        return MISSING
    if address is not None and first <= address.ip <= last:
        c.error(rloc, f"{first}..{last} holds the LAN port's own address {address.ip}"
                      " (lan.address)")
        return MISSING
    return first, last


def _check_dhcp_static(
    c: Checker,
    raw: Mapping[str, Any],
    loc: tuple[str | int, ...],
    address: ipaddress.IPv4Interface | None,
    router: ipaddress.IPv4Address | None,
) -> tuple[DhcpStatic, ...] | object:
    value = raw.get("static", [])
    sloc = (*loc, "static")
    if not isinstance(value, list):
        c.error(sloc, f"expected an array of tables [[lan.dhcp.static]], got {show(value)}")
        return MISSING
    out: list[DhcpStatic] = []
    ok = True
    macs: dict[str, int] = {}
    ips: dict[ipaddress.IPv4Address, int] = {}
    for i, entry in enumerate(value):
        eloc = (*sloc, i)
        if not isinstance(entry, dict):
            c.error(eloc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        c.known_keys(entry, eloc, ("mac", "ip", "name"))
        mac = c.value(entry, (*eloc, "mac"), mac_address)
        ip = c.value(entry, (*eloc, "ip"), ipv4_address)
        name = c.value(entry, (*eloc, "name"), host_name, default=None)
        if mac is not MISSING:
            if mac in macs:
                c.error((*eloc, "mac"), f"duplicate MAC {mac} (also lan.dhcp.static[{macs[mac]}])")
                mac = MISSING
            else:
                macs[mac] = i
        if ip is not MISSING:
            if ip in ips:
                c.error((*eloc, "ip"), f"duplicate address {ip} (also lan.dhcp.static[{ips[ip]}])")
                ip = MISSING
            elif address is not None and not _on_lan(c, (*eloc, "ip"), ip, address):
                ip = MISSING
            elif address is not None and ip == address.ip:
                c.error((*eloc, "ip"), f"{ip} is the LAN port's own address (lan.address)")
                ip = MISSING
            elif ip == router:
                c.error((*eloc, "ip"), f"{ip} is the router's address (lan.dhcp.router)")
                ip = MISSING
            else:
                ips[ip] = i
        if MISSING in (mac, ip, name):
            ok = False
            continue
        out.append(DhcpStatic(mac=mac, ip=ip, name=name))
    return tuple(out) if ok else MISSING


def _check_lan_dhcp(
    c: Checker, lan_t: Mapping[str, Any], address: Any
) -> LanDhcp | None | object:
    """[lan.dhcp]; `address` is lan.address (None when not given, MISSING when wrong)."""
    raw = lan_t.get("dhcp", MISSING)
    if raw is MISSING:
        return None
    loc: tuple[str | int, ...] = ("lan", "dhcp")
    if not isinstance(raw, dict):
        c.error(loc, f"expected a table [lan.dhcp], got {show(raw)}")
        return MISSING
    c.known_keys(raw, loc, ("enabled", "range", "router", "dns", "lease_s", "static"))
    enabled = c.value(raw, (*loc, "enabled"), boolean, default=True)
    lan_ip = address if isinstance(address, ipaddress.IPv4Interface) else None
    ok = True
    if enabled is True and address is None:
        c.error(
            (*loc, "enabled") if "enabled" in raw else loc,
            "a DHCP server needs lan.address and lan.interface: the LAN port's address, in"
            " whose network the range lies, and its device",
        )
        ok = False
    rng = _check_dhcp_range(c, raw, loc, lan_ip, required=enabled is True)
    router = c.value(raw, (*loc, "router"), ipv4_address, default=None)
    if router not in (None, MISSING) and lan_ip is not None:
        if not _on_lan(c, (*loc, "router"), router, lan_ip):
            router = MISSING
        elif isinstance(rng, tuple) and rng[0] <= router <= rng[1]:
            c.error(
                (*loc, "router"),
                f"{router} is inside the range {rng[0]}..{rng[1]}: it could be leased to a host",
            )
            router = MISSING
    dns: list[ipaddress.IPv4Address] = []
    raw_dns = raw.get("dns", [])
    if not isinstance(raw_dns, list) or len(raw_dns) > MAX_DNS:
        c.error((*loc, "dns"), f"expected an array of at most {MAX_DNS} IPv4 addresses,"
                               f" got {show(raw_dns)}")
        ok = False
    else:
        for i, item in enumerate(raw_dns):
            try:
                ip = ipv4_address(item)
            except ValueError as exc:
                c.error((*loc, "dns", i), str(exc))
                ok = False
                continue
            special = _special(ip)  # 255.255.255.255 is reserved too
            if special:
                c.error((*loc, "dns", i), f"{ip} is {special}: not a DNS server's")
                ok = False
                continue
            if lan_ip is not None:
                # udhcpd would hand out an address nothing answers DNS on.
                taken = {
                    lan_ip.ip: "the LAN port's own address (lan.address)",
                    lan_ip.network.network_address: f"the network address of {lan_ip.network}",
                    lan_ip.network.broadcast_address: f"the broadcast address of {lan_ip.network}",
                }
                if ip in taken:
                    c.error((*loc, "dns", i), f"{ip} is {taken[ip]}: not a DNS server's")
                    ok = False
                    continue
            dns.append(ip)
    lease_s = c.value(
        raw, (*loc, "lease_s"), int_range(LEASE_S_MIN, LEASE_S_MAX), default=DEFAULT_LEASE_S
    )
    static = _check_dhcp_static(
        c, raw, loc, lan_ip, router if isinstance(router, ipaddress.IPv4Address) else None
    )
    if not ok or MISSING in (enabled, rng, router, lease_s, static):
        return MISSING
    return LanDhcp(
        enabled=enabled,
        range=rng,  # type: ignore[arg-type]
        router=router,
        dns=tuple(dns),
        lease_s=lease_s,
        static=static,  # type: ignore[arg-type]
    )


def _check_lan(
    c: Checker, doc: Mapping[str, Any], links: list[Link] | None, tunnel: Tunnel | None
) -> Lan | None:
    loc: tuple[str | int, ...] = ("lan",)
    table = c.table(doc, loc, required=True)
    if table is None:
        return None
    c.known_keys(table, loc, ("subnets", "interface", "address", "dhcp"))
    subnets = check_networks(c, table, (*loc, "subnets"))
    iface = c.value(table, (*loc, "interface"), ifname, default=None)
    if isinstance(iface, str) and "#" in iface:
        # udhcpd's configuration takes '#' as the start of a comment.
        c.error((*loc, "interface"), f"{show(iface)}: '#' cannot be written to the DHCP server's"
                                     " configuration")
        iface = MISSING
    address = c.value(table, (*loc, "address"), lan_address, default=None)
    if isinstance(address, ipaddress.IPv4Interface):
        if "interface" not in table:
            c.error((*loc, "address"), "needs lan.interface: the LAN device to put it on")
            address = MISSING
        elif subnets is not None and not any(
            n.version == 4 and address.network.subnet_of(n) for n in subnets  # type: ignore[arg-type]
        ):
            # Routes and the PoP's directory know the LAN by its subnets: a port whose network
            # reached beyond them would answer for addresses nobody routes to it.
            c.error(
                (*loc, "address"),
                f"{address} is not inside lan.subnets ({', '.join(map(str, subnets))}):"
                f" its network {address.network} must lie in one of them",
            )
            address = MISSING
    if isinstance(address, ipaddress.IPv4Interface) and isinstance(iface, str):
        # The port would lose its role (or the link its address) to the other one.
        # The device each link is bound to (its VLAN device for a VLAN link): an untagged
        # LAN on the parent of a tagged WAN is a normal setup, one device for both is not.
        for i, link in enumerate(links or ()):
            if link.device == iface:
                c.error((*loc, "interface"), f"the LAN port cannot be links[{i}]'s device"
                                             f" {show(iface)}")
                iface = MISSING
                break
        if tunnel is not None and tunnel.interface == iface:
            c.error((*loc, "interface"), f"the LAN port cannot be the tunnel device {show(iface)}")
            iface = MISSING
    dhcp = _check_lan_dhcp(c, table, address)
    if subnets is None or MISSING in (iface, address, dhcp):
        return None
    return Lan(subnets=subnets, interface=iface, address=address, dhcp=dhcp)  # type: ignore[arg-type]



def _check_overlaps(c: Checker, doc: Mapping[str, Any]) -> None:
    """Every destination prefix must lead to exactly one place: the LAN or one peer."""
    owned: list[tuple[IPNetwork, tuple[str | int, ...]]] = []

    def collect(table: Any, loc: tuple[str | int, ...]) -> None:
        subnets = table.get("subnets") if isinstance(table, dict) else None
        if not isinstance(subnets, list):
            return
        for i, item in enumerate(subnets):
            # A bad network was already reported by the field check.
            with contextlib.suppress(ValueError):
                owned.append((network(item), (*loc, "subnets", i)))

    collect(doc.get("lan"), ("lan",))
    peers = doc.get("peers")
    if isinstance(peers, list):
        for i, peer in enumerate(peers):
            collect(peer, ("peers", i))

    # Sorted by (version, first address, widest first), an overlap is always with the network
    # reaching furthest so far: O(n log n) for hundreds of peers.
    owned.sort(key=lambda item: (item[0].version, item[0].network_address, item[0].prefixlen))
    widest: tuple[IPNetwork, tuple[str | int, ...]] | None = None
    for net, loc in owned:
        if widest is not None and widest[0].version != net.version:
            widest = None
        if widest is not None and net.network_address <= widest[0].broadcast_address:
            here, there = (net, loc), widest
            if loc[0] == "lan" and widest[1][0] == "peers":
                # The peer is the one to fix more often than not; report it there.
                here, there = there, here
            c.error(here[1], f"subnet {here[0]} overlaps {there[0]} of {fmt_loc(there[1][:-2])}")
        if widest is None or net.broadcast_address > widest[0].broadcast_address:
            widest = (net, loc)


def _check_static_addresses(c: Checker, links: list[Link], owned: tuple[Owned, ...]) -> None:
    """A static WAN address's network must not overlap the LAN or a static peer's subnets (the
    same check a DHCP lease gets, appliance/wanaddr.py)."""
    for i, link in enumerate(links):
        a = link.addressing
        if a.mode != "static" or a.address is None:
            continue
        try:
            check_wan_address(ipaddress.ip_interface(a.address), owned)
        except ValueError as exc:
            c.error(("links", i, "addressing", "address"), str(exc))


def _validate(doc: dict[str, Any], source: Path, c: Checker) -> SiteConfig | None:
    base = source.parent
    c.known_keys(
        doc,
        (),
        (
            "site", "paths", "pki", "lan", "tunnel", "links", "peers", "pops", "cloud",
            "appliance", "mesh", "wan", "time", "update",
        ),
    )

    site_t = c.table(doc, ("site",), required=True)
    site_id: Any = MISSING
    site: Site | None = None
    if site_t is not None:
        c.known_keys(site_t, ("site",), ("id", "name"))
        site_id = c.value(site_t, ("site", "id"), int_range(1, 65535))
        name = c.value(site_t, ("site", "name"), site_name, default=None)
        if site_id is not MISSING and name is not MISSING:
            site = Site(id=site_id, name=name if name is not None else f"site-{site_id}")

    paths: Paths | None = None
    paths_t = c.table(doc, ("paths",), required=False)
    if paths_t is not None:
        c.known_keys(paths_t, ("paths",), ("data_dir", "control_socket"))
        data_dir = c.value(
            paths_t, ("paths", "data_dir"), path_string, default=str(DEFAULT_DATA_DIR)
        )
        sock = c.value(
            paths_t,
            ("paths", "control_socket"),
            path_string,
            default=str(DEFAULT_CONTROL_SOCKET),
        )
        if sock is not MISSING:
            sock_path = resolve_path(base, sock)
            if len(os.fsencode(sock_path)) > MAX_UNIX_SOCKET_PATH:
                c.error(
                    ("paths", "control_socket"),
                    f"expected a path of at most {MAX_UNIX_SOCKET_PATH} bytes (Unix socket limit),"
                    f" got {sock_path}",
                )
                sock = MISSING
        if data_dir is not MISSING and sock is not MISSING:
            paths = Paths(
                data_dir=resolve_path(base, data_dir), control_socket=resolve_path(base, sock)
            )

    files = check_pki_files(c, doc, base)
    pki = Pki(**files) if files is not None else None

    tunnel: Tunnel | None = None
    tunnel_t = c.table(doc, ("tunnel",), required=False)
    if tunnel_t is not None:
        c.known_keys(
            tunnel_t,
            ("tunnel",),
            ("interface", "keepalive_s", "rekey_s", "key_max_age_s", "mss_clamp",
             "answer_wait_us"),
        )
        t_values = {
            "interface": c.value(tunnel_t, ("tunnel", "interface"), _tun_name, default="sdwan0"),
            "keepalive_s": c.value(
                tunnel_t, ("tunnel", "keepalive_s"), int_range(1, 3600), default=15
            ),
            "rekey_s": c.value(
                tunnel_t, ("tunnel", "rekey_s"), int_range(REKEY_MIN_S, REKEY_MAX_S), default=600
            ),
            "key_max_age_s": c.value(
                tunnel_t,
                ("tunnel", "key_max_age_s"),
                int_range(REKEY_MIN_S + HANDSHAKE_MARGIN_S, KEY_MAX_AGE_MAX_S),
                default=None,
            ),
            "mss_clamp": c.value(tunnel_t, ("tunnel", "mss_clamp"), boolean, default=True),
            "answer_wait_us": c.value(
                tunnel_t, ("tunnel", "answer_wait_us"), int_range(0, 10000), default=200
            ),
        }
        rekey, age = t_values["rekey_s"], t_values["key_max_age_s"]
        if isinstance(rekey, int) and isinstance(age, int):
            problem = timers_problem(rekey, age)
            if problem is not None:
                # Only a limit set by hand can be too short (the default follows rekey_s); the
                # message says how to mend either.
                c.error(("tunnel", "key_max_age_s"), f"cannot work with rekey_s: {problem}")
                t_values["key_max_age_s"] = MISSING
        if not any(v is MISSING for v in t_values.values()):
            tunnel = Tunnel(**t_values)

    links = _check_links(c, doc)
    if links is not None and tunnel is not None:
        for i, link in enumerate(links):
            if tunnel.interface in (link.interface, link.device):
                where = (
                    "interface" if link.interface == tunnel.interface
                    else "vlan_device" if link.vlan_device else "vlan"
                )
                c.error(
                    ("links", i, where),
                    f"expected a WAN device, got the tunnel interface {show(tunnel.interface)}",
                )
    lan = _check_lan(c, doc, links, tunnel)
    peers = _check_peers(c, doc, site_id, links)
    pops = _check_pops(c, doc)
    cloud = _check_cloud(c, doc)
    appliance = _check_appliance(c, doc, base)
    mesh = _check_mesh(c, doc, links)
    wan = _check_wan(c, doc)
    time_cfg = _check_time(c, doc)
    update = _check_update(c, doc, base)
    _check_overlaps(c, doc)
    if links is not None and lan is not None and peers is not None:
        _check_static_addresses(c, links, owned_subnets(lan, peers))

    if c.issues:
        return None
    assert site and paths and pki and lan and tunnel and links is not None and peers is not None
    assert pops is not None and cloud is not None and appliance is not None and mesh is not None
    assert wan is not None and time_cfg is not None and update is not None
    return SiteConfig(
        site=site,
        paths=paths,
        pki=pki,
        lan=lan,
        tunnel=tunnel,
        links=tuple(links),
        peers=tuple(peers),
        source=source,
        pops=tuple(pops),
        cloud=cloud,
        appliance=appliance,
        mesh=mesh,
        wan=wan,
        time=time_cfg,
        update=update,
    )


def load_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate a bootstrap config; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path)
    checker = Checker(source, LineIndex(text))
    config = _validate(doc, source, checker)
    if config is None:
        raise ConfigError(source, checker.issues)
    return config
