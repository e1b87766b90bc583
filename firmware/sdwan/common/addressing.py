"""The addressing setting of a WAN link: "none", "dhcp" or a static address with its gateway.

The value type shared by the site configuration (`[[links]] addressing`), the console's
`set link` and WAN addressing (appliance/wanaddr.py), which stores and applies it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MODES", "Addressing", "IPInterface", "parse_static"]

MODES = ("none", "static", "dhcp")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 60 else text[:57] + "..."


def parse_static(address: Any, gateway: Any) -> tuple[IPInterface, ipaddress._BaseAddress]:
    """A static address "ADDR/PREFIX" and its gateway, checked together; ValueError says why."""
    expected = "expected an address with its prefix length such as 100.64.1.2/24"
    if not isinstance(address, str) or "/" not in address:
        raise ValueError(f"{expected}, got {_show(address)}")
    try:
        iface = ipaddress.ip_interface(address.strip())
    except ValueError:
        raise ValueError(f"{expected}, got {_show(address)}") from None
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
