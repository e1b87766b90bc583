"""The account file of the PoP: the sites, their subnets and settings, and the rules, as frozen
dataclasses, checked with the config engine (common/tomlcheck.py).

`load_account(path)` returns an `Account`, or raises `ConfigError` listing every problem found
in one pass, each naming the file, the field path (`sites[1].subnets[0]`, indices from 0), what
was expected and, where found, the line.
`Account.to_doc()`/`Account.from_doc()` are the form kept in SQLite (document "account") so that a
PoP whose account file went bad keeps the last good one across restarts. Schemas: docs/popd.md.
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
    int_range,
    matching,
    network,
    read_toml,
    show,
    site_name,
)

__all__ = [
    "Account",
    "AccountSite",
    "ConfigError",
    "Rule",
    "load_account",
]

# The fast-path peer id of a session is site << 8 | link; ids must stay below 2^23.
MAX_SITE_ID = 65535
MAX_RULE_BYTES = 4096

_ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RULE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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
class Account:
    name: str
    sites: tuple[AccountSite, ...]
    rules: tuple[Rule, ...] = ()
    source: str = ""

    def site(self, site_id: int) -> AccountSite | None:
        return next((s for s in self.sites if s.id == site_id), None)

    @property
    def site_ids(self) -> frozenset[int]:
        return frozenset(s.id for s in self.sites)

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sites": [{"id": s.id, **s.settings()} for s in self.sites],
            "rules": [r.to_dict() for r in self.rules],
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


def load_account(path: str | os.PathLike[str]) -> Account:
    """Read and validate an account file; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path, what="file")
    c = Checker(source, LineIndex(text))
    c.known_keys(doc, (), ("account", "sites", "rules"))
    name: Any = MISSING
    account_t = c.table(doc, ("account",), required=True)
    if account_t is not None:
        c.known_keys(account_t, ("account",), ("name",))
        name = c.value(account_t, ("account", "name"), _account_name)
    sites = _check_sites(c, doc)
    _check_site_overlaps(c, doc)
    rules = _check_rules(c, doc)
    if c.issues:
        raise ConfigError(source, c.issues)
    assert sites is not None and rules is not None and isinstance(name, str)
    return Account(name=name, sites=tuple(sites), rules=tuple(rules), source=str(source))
