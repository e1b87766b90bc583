"""The addressing setting of a WAN link: "none", "dhcp" or a static address with its gateway,
and the checks every address or prefix passes before it is put on a device or into a route.

The value type shared by the site configuration (`[[links]] addressing`), the console's
`set link` and WAN addressing (appliance/wanaddr.py), which stores and applies it. The checks
(`check_wan_address`, `check_prefix`) are the one copy used for static addresses, DHCP leases
and the prefixes of the PoP's directory (docs/security.md, "Addresses learned from the
network").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIN_PREFIX",
    "MODES",
    "Addressing",
    "IPInterface",
    "Owned",
    "check_prefix",
    "check_wan_address",
    "parse_static",
]

MODES = ("none", "static", "dhcp")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# No address's network or learned prefix may be wider than this: a /8 is 1/256 of the family's
# addresses. Wider ones are default and half-default routes (0/0, 0/1, 128/1), which would
# beat or shadow every other route of the box.
MIN_PREFIX = 8

# Ranges no WAN address or route from the network may touch, with what they are.
_SPECIAL: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what)
    for net, what in (
        ("0.0.0.0/8", "the unspecified range 0.0.0.0/8"),
        ("127.0.0.0/8", "the loopback range 127.0.0.0/8"),
        ("169.254.0.0/16", "the link-local range 169.254.0.0/16"),
        ("224.0.0.0/4", "the multicast range 224.0.0.0/4"),
        ("240.0.0.0/4", "the reserved range 240.0.0.0/4"),
        ("::/128", "the unspecified address ::"),
        ("::1/128", "the loopback address ::1"),
        ("fe80::/10", "the link-local range fe80::/10"),
        ("ff00::/8", "the multicast range ff00::/8"),
    )
)


@dataclass(frozen=True)
class Owned:
    """A subnet that belongs somewhere else: the site's LAN or a static peer's. Nothing learned
    from the network (a DHCP lease, a PoP's directory) may overlap it."""

    network: IPNetwork
    owner: str  # for people: "the LAN", "static peer site 2"
    site_id: int | None = None  # the static peer's site id; None for the LAN


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 60 else text[:57] + "..."


def check_prefix(
    net: IPNetwork, owned: Iterable[Owned] = (), *, except_site: int | None = None
) -> None:
    """A prefix from the network (the PoP's directory) or the network of a WAN address: no
    wider than /MIN_PREFIX, clear of the special ranges, and overlapping no owned subnet (but
    those of `except_site`, a static peer's own prefixes listed for it). ValueError says why."""
    if net.prefixlen < MIN_PREFIX:
        what = "a default route" if net.prefixlen == 0 else f"a /{net.prefixlen}"
        raise ValueError(
            f"{net} is {what}: shorter than /{MIN_PREFIX}, the widest prefix accepted"
        )
    for special, what in _SPECIAL:
        if special.version == net.version and net.overlaps(special):
            raise ValueError(f"{net} overlaps {what}")
    for o in owned:
        if o.site_id is not None and o.site_id == except_site:
            continue
        if o.network.version == net.version and net.overlaps(o.network):
            raise ValueError(f"{net} overlaps {o.network} of {o.owner}")


def check_wan_address(iface: IPInterface, owned: Iterable[Owned] = ()) -> None:
    """An address for a WAN device, static or from a DHCP lease: a host address (not
    unspecified, loopback, multicast, link-local or reserved; not its network's network or
    broadcast address) whose network passes `check_prefix`. ValueError says why not."""
    ip, net = iface.ip, iface.network
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local:
        raise ValueError(
            f"{ip} cannot be a WAN address (unspecified, multicast, loopback or link-local)"
        )
    if ip.version == 4 and ip.is_reserved:
        raise ValueError(f"{ip} is in the reserved range 240.0.0.0/4")
    # /31 and /32 have no network or broadcast address to avoid.
    ends = (net.network_address, net.broadcast_address) if ip.version == 4 else ()
    if net.prefixlen <= 30 and ip in ends:
        which = "network" if ip == net.network_address else "broadcast"
        raise ValueError(f"{iface} is the {which} address of {net}, not a host address")
    check_prefix(net, owned)


def parse_static(address: Any, gateway: Any) -> tuple[IPInterface, ipaddress._BaseAddress]:
    """A static address "ADDR/PREFIX" and its gateway, checked together; ValueError says why."""
    expected = "expected an address with its prefix length such as 100.64.1.2/24"
    if not isinstance(address, str) or "/" not in address:
        raise ValueError(f"{expected}, got {_show(address)}")
    try:
        iface = ipaddress.ip_interface(address.strip())
    except ValueError:
        raise ValueError(f"{expected}, got {_show(address)}") from None
    check_wan_address(iface)
    ip, net = iface.ip, iface.network
    ends = (net.network_address, net.broadcast_address) if ip.version == 4 else ()
    if not isinstance(gateway, str) or not gateway.strip():
        raise ValueError(f"expected a gateway address such as 100.64.1.1, got {_show(gateway)}")
    try:
        gw = ipaddress.ip_address(gateway.strip())
    except ValueError:
        raise ValueError(
            f"expected a gateway address such as 100.64.1.1, got {_show(gateway)}"
        ) from None
    if gw.version != ip.version:
        raise ValueError(
            f"gateway {gw} is IPv{gw.version} but the address {iface} is IPv{ip.version}"
        )
    if gw not in net:
        raise ValueError(f"gateway {gw} is not inside {net} (the address's network)")
    if gw == ip:
        raise ValueError(f"gateway {gw} is the address itself")
    if net.prefixlen <= 30 and gw in ends:
        raise ValueError(f"gateway {gw} is the network or broadcast address of {net}")
    return iface, gw


@dataclass(frozen=True)
class Addressing:
    """How a link's device gets its address. `none` leaves it to the system."""

    mode: str = "none"
    address: str | None = None  # "ADDR/PREFIX", static only
    gateway: str | None = None  # static only

    @classmethod
    def static(cls, address: Any, gateway: Any) -> Addressing:
        iface, gw = parse_static(address, gateway)
        return cls("static", str(iface), str(gw))

    @classmethod
    def from_value(cls, value: Any) -> Addressing:
        """From the config's `addressing` or a stored document: "none", "dhcp", or a table
        {mode = "static", address, gateway} (or {mode = "dhcp"}); ValueError says why not."""
        if isinstance(value, str):
            if value in ("none", "dhcp"):
                return cls(value)
            if value == "static":
                raise ValueError(
                    '"static" needs an address and a gateway: write'
                    ' { mode = "static", address = "ADDR/PREFIX", gateway = "GW" }'
                )
            raise ValueError(f'expected "none", "dhcp" or a static table, got {_show(value)}')
        if not isinstance(value, Mapping):
            raise ValueError(f'expected "none", "dhcp" or a static table, got {_show(value)}')
        unknown = sorted(set(value) - {"mode", "address", "gateway"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (expected mode, address, gateway)")
        mode = value.get("mode")
        if mode not in MODES:
            raise ValueError(f'mode: expected "none", "static" or "dhcp", got {_show(mode)}')
        if mode == "static":
            return cls.static(value.get("address"), value.get("gateway"))
        extra = [k for k in ("address", "gateway") if k in value]
        if extra:
            raise ValueError(f'{extra[0]} is only for mode "static", not {_show(mode)}')
        return cls(mode)

    def to_dict(self) -> dict[str, Any]:
        if self.mode == "static":
            return {"mode": "static", "address": self.address, "gateway": self.gateway}
        return {"mode": self.mode}

    def describe(self) -> str:
        if self.mode == "static":
            return f"static {self.address} via {self.gateway}"
        return self.mode
