"""The account file of the PoP: the sites, their subnets and settings, the rules and the LAN
firewall policy, as frozen dataclasses, checked with the config engine (common/tomlcheck.py).

`load_account(path)` returns an `Account`, or raises `ConfigError` listing every problem found
in one pass, each naming the file, the field path (`sites[1].subnets[0]`, indices from 0), what
was expected and, where found, the line.
`Account.to_doc()`/`Account.from_doc()` are the form kept in SQLite (document "account") so that a
PoP whose account file went bad keeps the last good one across restarts. `Account.site_config()`
is a site's `config` message body: its settings and the firewall with site names resolved to
subnets, so that a site applies it without a directory. Schemas: docs/popd.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdwan.common.tomlcheck import (
    MISSING,
    Checker,
    ConfigError,
    IPNetwork,
    LineIndex,
    boolean,
    check_networks,
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
MAX_RULE_BYTES = 4096

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
    """A network rule, kept and shown as written; evaluating rules comes with a later release."""

    name: str
    body: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.body}


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

    def site(self, site_id: int) -> AccountSite | None:
        return next((s for s in self.sites if s.id == site_id), None)

    @property
    def site_ids(self) -> frozenset[int]:
        return frozenset(s.id for s in self.sites)

    def site_config(self, site: AccountSite) -> dict[str, Any]:
        """The `config` a site is sent (docs/cloud.md): its settings, and the firewall."""
        return {**site.settings(), "firewall": self.firewall_config()}

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
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Account:
        """The inverse of to_doc (for what this module itself stored: trusted input)."""
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
                Rule(name=str(r["name"]), body={k: v for k, v in r.items() if k != "name"})
                for r in doc.get("rules", [])
            ),
            # An account stored before the firewall existed has none: allow everything.
            firewall=Firewall.from_doc(doc.get("firewall")),
        )


# --------------------------------------------------------------------------- helpers


_account_name = matching(_ACCOUNT_NAME_RE, "a name of 1..64 characters [A-Za-z0-9_.-]")
_rule_name = matching(_RULE_NAME_RE, "a name of 1..64 characters [A-Za-z0-9_.-]")


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


def _check_rules(c: Checker, doc: Mapping[str, Any]) -> list[Rule] | None:
    raw = doc.get("rules", [])
    if not isinstance(raw, list):
        c.error(("rules",), f"expected an array of tables [[rules]], got {show(raw)}")
        return None
    rules: list[Rule] = []
    ok = True
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("rules", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {show(entry)}")
            ok = False
            continue
        name = c.value(entry, (*loc, "name"), _rule_name)
        if isinstance(name, str):
            if name in seen:
                c.error(
                    (*loc, "name"), f"duplicate rule name {show(name)} (also rules[{seen[name]}])"
                )
                name = MISSING
            else:
                seen[name] = i
        body = {k: v for k, v in entry.items() if k != "name"}
        try:
            # Rules travel as JSON (store, popctl); TOML dates and times do not.
            size = len(json.dumps(body))
        except (TypeError, ValueError):
            c.error(loc, "expected strings, numbers, booleans, arrays and tables only (no dates)")
            ok = False
            continue
        if size > MAX_RULE_BYTES:
            c.error(loc, f"expected a rule of at most {MAX_RULE_BYTES} bytes as JSON, got {size}")
            ok = False
            continue
        if name is MISSING:
            ok = False
            continue
        rules.append(Rule(name=name, body=body))
    return rules if ok else None


# --------------------------------------------------------------------------- firewall

_FIREWALL_RULE_KEYS = ("name", "action", "src", "dst", "protocol", "ports")


def _one_of(values: tuple[str, ...]) -> Any:
    what = " or ".join(f'"{v}"' for v in values)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in values:
            raise ValueError(f"expected {what}, got {show(value)}")
        return value

    return check


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
    out: list[str] = []
    ok = True
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            c.error((*loc, i), f"expected a subnet or a site name, got {show(item)}")
            ok = False
        elif item in site_names:
            out.append(item)
        elif _looks_like_network(item):
            try:
                out.append(str(network(item)))
            except ValueError as exc:
                c.error((*loc, i), str(exc))
                ok = False
        else:
            known = ", ".join(site_names[:10]) + (", ..." if len(site_names) > 10 else "")
            c.error(
                (*loc, i),
                f'unknown site name {show(item)} (expected a subnet such as "10.1.0.0/24"'
                f" or the name of a site: {known})",
            )
            ok = False
    return tuple(out) if ok else MISSING


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


def load_account(path: str | os.PathLike[str]) -> Account:
    """Read and validate an account file; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path, what="file")
    c = Checker(source, LineIndex(text))
    c.known_keys(doc, (), ("account", "sites", "rules", "firewall"))
    name: Any = MISSING
    account_t = c.table(doc, ("account",), required=True)
    if account_t is not None:
        c.known_keys(account_t, ("account",), ("name",))
        name = c.value(account_t, ("account", "name"), _account_name)
    sites = _check_sites(c, doc)
    _check_site_overlaps(c, doc)
    rules = _check_rules(c, doc)
    firewall = _check_firewall(c, doc, sites)
    if c.issues:
        raise ConfigError(source, c.issues)
    assert sites is not None and rules is not None and firewall is not None
    assert isinstance(name, str)
    return Account(
        name=name, sites=tuple(sites), rules=tuple(rules), source=str(source), firewall=firewall
    )
