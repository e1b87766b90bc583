"""The account file of the PoP: the sites, their subnets and settings, the network rules
(off-cloud transport) and the LAN firewall policy, as frozen dataclasses, checked with the
config engine (common/tomlcheck.py).

`load_account(path)` returns an `Account`, or raises `ConfigError` listing every problem found
in one pass, each naming the file, the field path (`sites[1].subnets[0]`, indices from 0), what
was expected and, where found, the line.
`Account.to_doc()`/`Account.from_doc()` are the form kept in SQLite (document "account") so that a
PoP whose account file went bad keeps the last good one across restarts. `Account.site_config()`
is a site's `config` message body: its settings, the network rules and the firewall, site names
resolved to subnets, so that a site applies them without a directory. Schemas: docs/popd.md.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdwan.common.revocation import (
    MAX_NOTE,
    MAX_REVOKED,
    Revocations,
    Revoked,
    normalize_serial,
)
from sdwan.common.tomlcheck import (
    MISSING,
    Checker,
    ConfigError,
    IPNetwork,
    LineIndex,
    boolean,
    check_networks,
    expects,
    format_ports,
    int_range,
    matching,
    network,
    port_spec,
    read_toml,
    show,
    site_name,
)

__all__ = [
    "Account",
    "AccountSite",
    "ConfigError",
    "Firewall",
    "FirewallRule",
    "Rule",
    "load_account",
]

# The fast-path peer id of a session is site << 8 | link; ids must stay below 2^23.
MAX_SITE_ID = 65535
# What a socket's fast path holds (fastpath.h: FP_RULES_MAX, FP_RULE_NETS_MAX and
# FP_RULE_PORTS_MAX, the last two over all rules: 64 port entries per rule fit).
MAX_RULES = 1024
# The fast path holds 65536 (FP_RULE_NETS_MAX), but a flow the flow cache has not seen yet is
# matched against every rule's networks in turn: the account keeps that walk short.
MAX_RULE_NETS = 4096
# A site's `config` (its settings, rules and firewall) travels in every welcome beside the
# directory, and a site takes no message over 1 MiB (common/messages.py): the config stays
# well under it, so that the directory of a large account fits beside it and a welcome is
# not hundreds of records that one loss costs whole.
MAX_SITE_CONFIG_BYTES = 256 * 1024
MAX_RULE_ITEMS = 64  # entries of src, dst, ports and each application-aware field

TRANSPORTS = ("offcloud", "cloud")
SECONDARIES = ("automatic", "none", "cloud")
PROTOCOLS = ("any", "tcp", "udp", "icmp")
# Fields that need application awareness: a rule with any of them is *complex*, accepted but
# not evaluated on the socket; its traffic goes to the PoP (docs/popd.md, "Network rules").
APP_FIELDS = ("applications", "categories", "services", "custom_apps", "domains")
COMPLEX_NOTE = "not evaluated on the socket: its traffic goes to the PoP"

_ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RULE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The firewall travels whole in every `config` message; each rule becomes one or two nft rules.
MAX_FIREWALL_RULES = 1000
MAX_FIREWALL_MATCHES = 256  # entries of one src, dst or ports list
FIREWALL_ACTIONS = ("allow", "deny")
FIREWALL_PROTOCOLS = ("tcp", "udp", "icmp", "any")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class AccountSite:
    id: int
    name: str
    subnets: tuple[IPNetwork, ...]
    offcloud: bool = False
    recovery: bool = False

    def settings(self) -> dict[str, Any]:
        """The site's own settings as the `config` message carries them (docs/cloud.md)."""
        return {
            "name": self.name,
            "subnets": [str(n) for n in self.subnets],
            "offcloud": self.offcloud,
            "recovery": self.recovery,
        }


@dataclass(frozen=True)
class Rule:
    """A network rule: which traffic (simple fields, and application-aware ones that make it
    complex) and the transport it takes. src/dst as written: networks and site names of the
    account, () for any."""

    name: str
    transport: str  # TRANSPORTS
    secondary: str | None = None  # SECONDARIES, offcloud rules only
    src: tuple[str, ...] = ()
    dst: tuple[str, ...] = ()
    protocol: str = "any"  # PROTOCOLS
    ports: tuple[tuple[int, int], ...] = ()  # destination ports, inclusive ranges
    app: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (APP_FIELDS name, values), as written

    @property
    def complex(self) -> bool:
        return bool(self.app)

    @property
    def note(self) -> str | None:
        """What the account check says of a complex rule, else None."""
        if not self.app:
            return None
        return f"uses {', '.join(k for k, _ in self.app)}: {COMPLEX_NOTE}"

    def to_dict(self) -> dict[str, Any]:
        """The rule as the account file has it (popctl, the stored account)."""
        out: dict[str, Any] = {"name": self.name, "transport": self.transport}
        if self.secondary is not None:
            out["secondary"] = self.secondary
        if self.src:
            out["src"] = list(self.src)
        if self.dst:
            out["dst"] = list(self.dst)
        out["protocol"] = self.protocol
        if self.ports:
            out["ports"] = [format_ports(*r) for r in self.ports]
        for key, values in self.app:
            out[key] = list(values)
        return out

    def for_site(self, subnets_of: Mapping[str, Sequence[IPNetwork]]) -> dict[str, Any]:
        """The rule as a site's `config` carries it: as written, with src/dst resolved to
        subnets (`src_subnets`, `dst_subnets`; absent = any), ports as [low, high] pairs and
        `complex` naming the application-aware fields (docs/cloud.md)."""

        def resolve(items: tuple[str, ...]) -> list[str] | None:
            if not items:
                return None
            nets: list[str] = []
            for item in items:
                found = subnets_of.get(item)
                if found is None:
                    nets.append(str(ipaddress.ip_network(item)))
                else:
                    nets.extend(str(n) for n in found)
            return list(dict.fromkeys(nets))

        return {
            "name": self.name,
            "transport": self.transport,
            "secondary": self.secondary,
            "src": list(self.src) or None,
            "dst": list(self.dst) or None,
            "src_subnets": resolve(self.src),
            "dst_subnets": resolve(self.dst),
            "protocol": self.protocol,
            "ports": [list(r) for r in self.ports],
            "complex": [k for k, _ in self.app],
        }


@dataclass(frozen=True)
class FirewallRule:
    """One rule of the LAN firewall as written: `src`/`dst` hold subnets (normalised) and site
    names, None for any; `ports` holds ports and "LOW-HIGH" ranges, None for any."""

    name: str
    action: str
    src: tuple[str, ...] | None = None
    dst: tuple[str, ...] | None = None
    protocol: str = "any"
    ports: tuple[int | str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "src": None if self.src is None else list(self.src),
            "dst": None if self.dst is None else list(self.dst),
            "protocol": self.protocol,
            "ports": None if self.ports is None else list(self.ports),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FirewallRule:
        def opt(key: str) -> tuple[Any, ...] | None:
            v = d.get(key)
            return None if v is None else tuple(v)

        return cls(
            name=str(d["name"]),
            action=str(d["action"]),
            src=opt("src"),
            dst=opt("dst"),
            protocol=str(d.get("protocol", "any")),
            ports=opt("ports"),
        )


@dataclass(frozen=True)
class Firewall:
    """The account's LAN firewall policy: rules evaluated top-down, then the default."""

    default: str = "allow"
    rules: tuple[FirewallRule, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        return {"default": self.default, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Firewall:
        if doc is None:
            return cls()
        return cls(
            default=str(doc.get("default", "allow")),
            rules=tuple(FirewallRule.from_dict(r) for r in doc.get("rules", [])),
        )


@dataclass(frozen=True)
class Account:
    name: str
    sites: tuple[AccountSite, ...]
    rules: tuple[Rule, ...] = ()
    source: str = ""
    firewall: Firewall = Firewall()
    # Revoked site certificates ([[revoked]]): popd refuses them and every site gets the list.
    revoked: Revocations = Revocations()

    def site(self, site_id: int) -> AccountSite | None:
        return next((s for s in self.sites if s.id == site_id), None)

    @property
    def site_ids(self) -> frozenset[int]:
        return frozenset(s.id for s in self.sites)

    def site_config(self, site: AccountSite) -> dict[str, Any]:
        """The `config` a site is sent (docs/cloud.md): its settings, the network rules (in
        order, site names resolved to subnets) and the firewall."""
        return {
            **site.settings(),
            "rules": self.site_rules,
            "firewall": self.firewall_config(),
            "revoked": self.revoked.for_sites(),
        }

    @functools.cached_property
    def site_rules(self) -> list[dict[str, Any]]:
        """The network rules as every site's config carries them (the same for all: resolved
        once per account, not per site and push)."""
        subnets_of = self.subnets_by_name()
        return [r.for_site(subnets_of) for r in self.rules]

    def subnets_by_name(self) -> dict[str, tuple[IPNetwork, ...]]:
        return {s.name: s.subnets for s in self.sites}

    def notes(self) -> list[str]:
        """What the account check says per rule beyond errors: the complex rules."""
        return [f"rules {r.name}: {r.note}" for r in self.rules if r.note]

    def firewall_config(self) -> dict[str, Any]:
        """The firewall as sites apply it: every site name replaced by that site's subnets."""
        by_name = {s.name: [str(n) for n in s.subnets] for s in self.sites}

        def resolve(items: tuple[str, ...] | None) -> list[str] | None:
            if items is None:
                return None
            out: list[str] = []
            for item in items:
                for net in by_name.get(item, [item]):
                    if net not in out:
                        out.append(net)
            return out

        return {
            "default": self.firewall.default,
            "rules": [
                {**r.to_dict(), "src": resolve(r.src), "dst": resolve(r.dst)}
                for r in self.firewall.rules
            ],
        }

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sites": [{"id": s.id, **s.settings()} for s in self.sites],
            "rules": [r.to_dict() for r in self.rules],
            "firewall": self.firewall.to_doc(),
            "revoked": self.revoked.to_list(),
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Account:
        """The inverse of to_doc (for what this module itself stored: trusted input). Rules
        stored before they had a schema (name and free keys) are not kept."""
        return cls(
            name=str(doc["name"]),
            source=str(doc.get("source", "")),
            sites=tuple(
                AccountSite(
                    id=int(s["id"]),
                    name=str(s["name"]),
                    subnets=tuple(ipaddress.ip_network(n) for n in s["subnets"]),
                    offcloud=bool(s["offcloud"]),
                    recovery=bool(s["recovery"]),
                )
                for s in doc["sites"]
            ),
            rules=tuple(
                _rule_from_dict(r) for r in doc.get("rules", []) if r.get("transport") in TRANSPORTS
            ),
            # An account stored before the firewall existed has none: allow everything.
            firewall=Firewall.from_doc(doc.get("firewall")),
            revoked=Revocations.from_list(doc.get("revoked")),
        )


def _rule_from_dict(r: Mapping[str, Any]) -> Rule:
    return Rule(
        name=str(r["name"]),
        transport=str(r["transport"]),
        secondary=r.get("secondary"),
        src=tuple(r.get("src", ())),
        dst=tuple(r.get("dst", ())),
        protocol=str(r.get("protocol", "any")),
        ports=tuple(port_spec(p) for p in r.get("ports", ())),
        app=tuple((k, tuple(r[k])) for k in APP_FIELDS if k in r),
    )


# --------------------------------------------------------------------------- helpers


_account_name = matching(_ACCOUNT_NAME_RE, "a name of 1..64 characters [A-Za-z0-9_.-]")
_rule_name = matching(_RULE_NAME_RE, "a name of 1..64 characters [A-Za-z0-9_.-]")
def _one_of(choices: Sequence[str]) -> Any:
    what = " or ".join(f'"{c}"' for c in choices)

    @expects(what)
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected {what}, got {show(value)}")
        return value

    return check


_transport = _one_of(TRANSPORTS)
_secondary = _one_of(SECONDARIES)
_protocol = _one_of(PROTOCOLS)


# --------------------------------------------------------------------------- account


def _check_sites(c: Checker, doc: Mapping[str, Any]) -> list[AccountSite] | None:
    raw = doc.get("sites", MISSING)
    if raw is MISSING:
        c.error(("sites",), "missing required [[sites]] (expected at least 1 entry)")
        return None
    if not isinstance(raw, list) or not raw:
        c.error(("sites",), f"expected an array of tables [[sites]], got {show(raw)}")
        return None
    sites: list[AccountSite] = []
    ok = True
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("sites", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, ("id", "name", "subnets", "offcloud", "recovery"))
        site_id = c.value(entry, (*loc, "id"), int_range(1, MAX_SITE_ID))
        if site_id is not MISSING:
            if site_id in seen_ids:
                c.error(
                    (*loc, "id"), f"duplicate site id {site_id} (also sites[{seen_ids[site_id]}])"
                )
                site_id = MISSING
            else:
                seen_ids[site_id] = i
        name = c.value(entry, (*loc, "name"), site_name, default=None)
        if isinstance(name, str):
            if name in seen_names:
                c.error(
                    (*loc, "name"),
                    f"duplicate site name {show(name)} (also sites[{seen_names[name]}])",
                )
                name = MISSING
            else:
                seen_names[name] = i
        subnets = check_networks(c, entry, (*loc, "subnets"))
        offcloud = c.value(entry, (*loc, "offcloud"), boolean, default=False)
        recovery = c.value(entry, (*loc, "recovery"), boolean, default=False)
        if MISSING in (site_id, name, offcloud, recovery) or subnets is None:
            ok = False
            continue
        sites.append(
            AccountSite(
                id=site_id,
                name=name if name is not None else f"site-{site_id}",
                subnets=subnets,
                offcloud=offcloud,
                recovery=recovery,
            )
        )
    return sites if ok else None


def _check_site_overlaps(c: Checker, doc: Mapping[str, Any]) -> None:
    """A destination prefix must lead to one site: the PoP routes by it."""
    owned: list[tuple[IPNetwork, tuple[str | int, ...]]] = []
    raw = doc.get("sites")
    if not isinstance(raw, list):
        return
    for i, entry in enumerate(raw):
        subnets = entry.get("subnets") if isinstance(entry, dict) else None
        if not isinstance(subnets, list):
            continue
        for j, item in enumerate(subnets):
            try:
                owned.append((network(item), ("sites", i, "subnets", j)))
            except ValueError:
                continue
    owned.sort(key=lambda it: (it[0].version, it[0].network_address, it[0].prefixlen))
    widest: tuple[IPNetwork, tuple[str | int, ...]] | None = None
    for net, loc in owned:
        if widest is not None and widest[0].version != net.version:
            widest = None
        if widest is not None and net.network_address <= widest[0].broadcast_address:
            other = f"sites[{widest[1][1]}]"
            c.error(loc, f"subnet {net} overlaps {widest[0]} of {other}")
        if widest is None or net.broadcast_address > widest[0].broadcast_address:
            widest = (net, loc)


def _items(
    c: Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...], what: str
) -> list[tuple[int, Any]] | None:
    """The array at loc: (index, item) pairs, or None (absent, or an error recorded)."""
    key = loc[-1]
    assert isinstance(key, str)
    raw = entry.get(key, MISSING)
    if raw is MISSING:
        return None
    if not isinstance(raw, list) or not raw or len(raw) > MAX_RULE_ITEMS:
        c.error(
            loc,
            f"expected an array of 1..{MAX_RULE_ITEMS} {what} (leave it out for any),"
            f" got {show(raw) if not isinstance(raw, list) or not raw else f'{len(raw)} entries'}",
        )
        return None
    return list(enumerate(raw))


def _check_endpoints(
    c: Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...], site_names: Sequence[str]
) -> tuple[str, ...] | None:
    """src/dst: networks and site names of the account, as written (() = any)."""
    items = _items(c, entry, loc, "networks or site names")
    if items is None:
        return None if loc[-1] in entry else ()
    return _subnets_or_sites(c, [item for _, item in items], loc, site_names)


def _check_rule(
    c: Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...], site_names: Sequence[str]
) -> Rule | None:
    c.known_keys(
        entry,
        loc,
        ("name", "transport", "secondary", "src", "dst", "protocol", "ports", *APP_FIELDS),
    )
    name = c.value(entry, (*loc, "name"), _rule_name)
    transport = c.value(entry, (*loc, "transport"), _transport)
    secondary = c.value(entry, (*loc, "secondary"), _secondary, default=None)
    if transport == "cloud" and secondary is not None:
        c.error((*loc, "secondary"), 'only a rule with transport = "offcloud" has a secondary')
        secondary = MISSING
    elif transport == "offcloud" and secondary is None:
        secondary = "automatic"
    protocol = c.value(entry, (*loc, "protocol"), _protocol, default="any")
    src = _check_endpoints(c, entry, (*loc, "src"), site_names)
    dst = _check_endpoints(c, entry, (*loc, "dst"), site_names)
    ports: list[tuple[int, int]] | None = []
    port_items = _items(c, entry, (*loc, "ports"), "ports or ranges")
    if port_items is None and "ports" in entry:
        ports = None
    for i, item in port_items or []:
        try:
            ports.append(port_spec(item))  # type: ignore[union-attr]
        except ValueError as e:
            c.error((*loc, "ports", i), str(e))
            ports = None
            break
    if ports and protocol not in ("tcp", "udp", MISSING):
        # As the firewall's: ports are TCP's and UDP's, and a rule says which.
        has = f"got protocol {show(protocol)}" if "protocol" in entry else "the rule has none"
        c.error((*loc, "ports"), f'ports need protocol "tcp" or "udp", {has}')
        ports = None
    app: list[tuple[str, tuple[str, ...]]] = []
    app_ok = True
    for key in APP_FIELDS:
        items = _items(c, entry, (*loc, key), "names")
        if items is None:
            app_ok &= key not in entry
            continue
        values: list[str] = []
        for i, v in items:
            if isinstance(v, str) and 1 <= len(v) <= 256 and v.isprintable():
                values.append(v)
            else:
                c.error((*loc, key, i), f"expected a name of 1..256 characters, got {show(v)}")
                app_ok = False
        app.append((key, tuple(values)))
    if MISSING in (name, transport, secondary, protocol) or None in (src, dst, ports):
        return None
    if not app_ok:
        return None
    return Rule(
        name=name,
        transport=transport,
        secondary=secondary,
        src=src,  # type: ignore[arg-type]
        dst=dst,  # type: ignore[arg-type]
        protocol=protocol,
        ports=tuple(ports),  # type: ignore[arg-type]
        app=tuple(app),
    )


def _check_rules(
    c: Checker, doc: Mapping[str, Any], sites: Sequence[AccountSite] | None
) -> list[Rule] | None:
    raw = doc.get("rules", [])
    if not isinstance(raw, list):
        c.error(("rules",), f"expected an array of tables [[rules]], got {show(raw)}")
        return None
    if len(raw) > MAX_RULES:
        c.error(("rules",), f"expected at most {MAX_RULES} rules (what a socket holds),"
                f" got {len(raw)}")
        return None
    # Names resolve against the sites; when a site entry has errors of its own, against what
    # its entry says, so that its errors are not repeated for every rule naming it.
    if sites is not None:
        site_names = [s.name for s in sites]
    else:
        raw_sites = doc.get("sites")
        site_names = [
            s["name"] if isinstance(s.get("name"), str) else f"site-{s.get('id')}"
            for s in (raw_sites if isinstance(raw_sites, list) else [])
            if isinstance(s, dict)
        ]
    rules: list[Rule] = []
    ok = True
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("rules", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        rule = _check_rule(c, entry, loc, site_names)
        if rule is None:
            ok = False
            continue
        if rule.name in seen:
            c.error(
                (*loc, "name"),
                f"duplicate rule name {show(rule.name)} (also rules[{seen[rule.name]}])",
            )
            ok = False
            continue
        seen[rule.name] = i
        rules.append(rule)
    if ok and sites is not None:
        subnets_of = {s.name: s.subnets for s in sites}
        total = sum(
            len(r.for_site(subnets_of)[k] or ()) for r in rules for k in ("src_subnets",
                                                                          "dst_subnets")
        )
        if total > MAX_RULE_NETS:
            c.error(("rules",), f"expected at most {MAX_RULE_NETS} networks over all rules once"
                    f" site names are resolved (what a socket holds), got {total}")
            ok = False
    return rules if ok else None


# --------------------------------------------------------------------------- firewall

_FIREWALL_RULE_KEYS = ("name", "action", "src", "dst", "protocol", "ports")


_fw_action = _one_of(FIREWALL_ACTIONS)
_fw_protocol = _one_of(FIREWALL_PROTOCOLS)


def _looks_like_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return "/" in text
    return True


def _check_fw_matches(
    c: Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...], site_names: list[str]
) -> tuple[str, ...] | None | Any:
    """src or dst: absent for any, else subnets and site names (MISSING after errors)."""
    key = loc[-1]
    assert isinstance(key, str)
    raw = entry.get(key, MISSING)
    if raw is MISSING:
        return None
    if not isinstance(raw, list) or not raw or len(raw) > MAX_FIREWALL_MATCHES:
        c.error(
            loc,
            f"expected an array of 1..{MAX_FIREWALL_MATCHES} subnets or site names (leave"
            f" {key} out for any), got {show(raw)}",
        )
        return MISSING
    out = _subnets_or_sites(c, raw, loc, site_names)
    return MISSING if out is None else out


def _subnets_or_sites(
    c: Checker, raw: Sequence[Any], loc: tuple[str | int, ...], site_names: Sequence[str]
) -> tuple[str, ...] | None:
    """The entries of a src or dst list (rules and firewall alike): subnets, normalised, and
    site names of the account, as written; None when one is wrong (each error recorded)."""
    out: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            c.error((*loc, i), f"expected a subnet or a site name, got {show(item)}")
        elif item in site_names:
            out.append(item)
        elif _looks_like_network(item):
            try:
                out.append(str(network(item)))
            except ValueError as exc:
                c.error((*loc, i), str(exc))
        else:
            known = ", ".join(site_names[:10]) + (", ..." if len(site_names) > 10 else "")
            c.error(
                (*loc, i),
                f'unknown site name {show(item)} (expected a subnet such as "10.1.0.0/24"'
                f" or the name of a site: {known})",
            )
    return tuple(out) if len(out) == len(raw) else None


def _check_fw_ports(
    c: Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...], protocol: Any
) -> tuple[int | str, ...] | None | Any:
    raw = entry.get("ports", MISSING)
    if raw is MISSING:
        return None
    if protocol is MISSING:
        return MISSING  # the protocol's own error says enough
    if protocol not in ("tcp", "udp"):
        has = f"got protocol {show(protocol)}" if "protocol" in entry else "the rule has none"
        c.error(loc, f'ports need protocol "tcp" or "udp", {has}')
        return MISSING
    if not isinstance(raw, list) or not raw or len(raw) > MAX_FIREWALL_MATCHES:
        c.error(
            loc,
            f'expected an array of 1..{MAX_FIREWALL_MATCHES} ports or ranges "LOW-HIGH" (leave'
            f" ports out for any), got {show(raw)}",
        )
        return MISSING
    out: list[int | str] = []
    ok = True
    for i, item in enumerate(raw):
        try:
            out.append(format_ports(*port_spec(item)))
        except ValueError as exc:
            c.error((*loc, i), str(exc))
            ok = False
    return tuple(out) if ok else MISSING


def _check_firewall(
    c: Checker, doc: Mapping[str, Any], sites: list[AccountSite] | None
) -> Firewall | None:
    """[firewall] and its [[firewall.rules]]; site names must be the account's."""
    table = c.table(doc, ("firewall",), required=False)
    if table is None:
        return None
    c.known_keys(table, ("firewall",), ("default", "rules"))
    default = c.value(table, ("firewall", "default"), _fw_action, default="allow")
    raw = table.get("rules", [])
    if not isinstance(raw, list) or len(raw) > MAX_FIREWALL_RULES:
        c.error(
            ("firewall", "rules"),
            f"expected an array of at most {MAX_FIREWALL_RULES} tables [[firewall.rules]],"
            f" got {show(raw)}",
        )
        return None
    if sites is not None:
        names = [s.name for s in sites]
    else:  # the sites have errors of their own: take the names that can be read
        entries = doc.get("sites") if isinstance(doc.get("sites"), list) else []
        names = [
            e["name"] if isinstance(e.get("name"), str) else f"site-{e.get('id')}"
            for e in entries
            if isinstance(e, dict)
        ]
    rules: list[FirewallRule] = []
    ok = default is not MISSING
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("firewall", "rules", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, _FIREWALL_RULE_KEYS)
        name = c.value(entry, (*loc, "name"), _rule_name)
        if isinstance(name, str):
            if name in seen:
                c.error(
                    (*loc, "name"),
                    f"duplicate rule name {show(name)} (also firewall.rules[{seen[name]}])",
                )
                name = MISSING
            else:
                seen[name] = i
        action = c.value(entry, (*loc, "action"), _fw_action)
        src = _check_fw_matches(c, entry, (*loc, "src"), names)
        dst = _check_fw_matches(c, entry, (*loc, "dst"), names)
        protocol = c.value(entry, (*loc, "protocol"), _fw_protocol, default="any")
        ports = _check_fw_ports(c, entry, (*loc, "ports"), protocol)
        if MISSING in (name, action, src, dst, protocol, ports) or set(entry) - set(
            _FIREWALL_RULE_KEYS
        ):
            ok = False
            continue
        rules.append(FirewallRule(name, action, src, dst, protocol, ports))
    return Firewall(default=default, rules=tuple(rules)) if ok else None


# --------------------------------------------------------------------------- revoked

_REVOKED_KEYS = ("site", "serial", "note")


@expects("a serial number in hex")
def _serial(value: Any) -> str:
    return normalize_serial(value)


@expects(f"a note of at most {MAX_NOTE} printable characters")
def _note(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_NOTE or not value.isprintable():
        raise ValueError(
            f"expected a note of at most {MAX_NOTE} printable characters, got {show(value)}"
        )
    return value


def _check_revoked(c: Checker, doc: Mapping[str, Any]) -> Revocations | None:
    """[[revoked]]: site certificates refused by serial. A site id need not be in the
    account (a site removed and added back later keeps its certificates refused)."""
    raw = doc.get("revoked", [])
    if not isinstance(raw, list) or len(raw) > MAX_REVOKED:
        c.error(
            ("revoked",),
            f"expected an array of at most {MAX_REVOKED} tables [[revoked]] (each with site and"
            f" serial), got {show(raw) if not isinstance(raw, list) else f'{len(raw)} entries'}",
        )
        return None
    entries: list[Revoked] = []
    seen: dict[tuple[int, str], int] = {}
    ok = True
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("revoked", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table with site and serial, got {show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, _REVOKED_KEYS)
        site_id = c.value(entry, (*loc, "site"), int_range(1, MAX_SITE_ID))
        serial = c.value(entry, (*loc, "serial"), _serial)
        note = c.value(entry, (*loc, "note"), _note, default="")
        if MISSING in (site_id, serial, note) or set(entry) - set(_REVOKED_KEYS):
            ok = False
            continue
        key = (site_id, serial)
        if key in seen:
            c.error((*loc, "serial"), f"serial {serial} of site {site_id} is revoked twice"
                    f" (also revoked[{seen[key]}])")
            ok = False
            continue
        seen[key] = i
        entries.append(Revoked(site_id, serial, note))
    return Revocations(tuple(entries)) if ok else None


def load_account(path: str | os.PathLike[str]) -> Account:
    """Read and validate an account file; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path, what="file")
    c = Checker(source, LineIndex(text))
    c.known_keys(doc, (), ("account", "sites", "rules", "firewall", "revoked"))
    name: Any = MISSING
    account_t = c.table(doc, ("account",), required=True)
    if account_t is not None:
        c.known_keys(account_t, ("account",), ("name",))
        name = c.value(account_t, ("account", "name"), _account_name)
    sites = _check_sites(c, doc)
    _check_site_overlaps(c, doc)
    rules = _check_rules(c, doc, sites)
    firewall = _check_firewall(c, doc, sites)
    revoked = _check_revoked(c, doc)
    if c.issues:
        raise ConfigError(source, c.issues)
    assert sites is not None and rules is not None and firewall is not None
    assert revoked is not None
    assert isinstance(name, str)
    account = Account(
        name=name,
        sites=tuple(sites),
        rules=tuple(rules),
        source=str(source),
        firewall=firewall,
        revoked=revoked,
    )
    _check_config_size(c, account)
    if c.issues:
        raise ConfigError(source, c.issues)
    return account


def _check_config_size(c: Checker, account: Account) -> None:
    """Every site must be able to receive its config: refuse an account whose rules and
    firewall, site names resolved, would not fit in a site's `config`."""
    rules = len(json.dumps(account.site_rules))
    firewall = len(json.dumps(account.firewall_config()))
    revoked = len(json.dumps(account.revoked.for_sites()))
    for i, site in enumerate(account.sites):
        # The rules and the firewall are the same for every site: measured once.
        size = len(json.dumps(site.settings())) + rules + firewall + revoked + 48
        if size > MAX_SITE_CONFIG_BYTES:
            # Blame the biggest of the three parts, and say how to shrink that one.
            parts = {
                "rules": (rules, "fewer subnets per rule, or site names in place of long"
                          " subnet lists"),
                "firewall": (firewall, "fewer subnets per rule, or site names in place of"
                             " long subnet lists"),
                "revoked": (revoked, "drop the [[revoked]] entries of certificates that have"
                            " expired anyway"),
            }
            where = max(parts, key=lambda k: parts[k][0])
            c.error((where,), f"expected the configuration sent to each site to be at most "
                    f"{MAX_SITE_CONFIG_BYTES} bytes as JSON, got {size} for sites[{i}] "
                    f"({site.name}): the rules take {rules} bytes, the firewall {firewall},"
                    f" the revocation list {revoked} ({parts[where][1]})")
            return
