"""The PoP's two TOML files: the account (sites, their subnets and settings, rules) and popd's
own bootstrap config, as frozen dataclasses with located errors like config.py's.

`load_account(path)` returns an `Account`; `load_pop_config(path)` a `PopConfig`. Both raise
`ConfigError` listing every problem found in one pass, each naming the file, the field path
(`sites[1].subnets[0]`, indices from 0), what was expected and, where found, the line.
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
from pathlib import Path
from typing import Any

from sdwan.site.config import (
    _MISSING,
    MAX_UNIX_SOCKET_PATH,
    ConfigError,
    IPNetwork,
    Paths,
    Pki,
    _boolean,
    _check_networks,
    _check_pki_files,
    _Checker,
    _int_range,
    _LineIndex,
    _matching,
    _network,
    _path_string,
    _resolve,
    _show,
    _site_name,
    read_toml,
)

__all__ = [
    "Account",
    "AccountSite",
    "ConfigError",
    "PopConfig",
    "Rule",
    "load_account",
    "load_pop_config",
]

DEFAULT_POP_DATA_DIR = Path("/var/lib/popd")
DEFAULT_POP_CONTROL_SOCKET = Path("/run/popd/control.sock")
DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_PORT = 4800
DEFAULT_STUN_PORT = 3478
DEFAULT_KEEPALIVE_MS = 200
DEFAULT_DEAD_AFTER_MS = 600
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


@dataclass(frozen=True)
class PopTimers:
    """The cloud timers popd pushes to every site (milliseconds, as in the config)."""

    keepalive_ms: int = DEFAULT_KEEPALIVE_MS
    dead_after_ms: int = DEFAULT_DEAD_AFTER_MS


@dataclass(frozen=True)
class PopConfig:
    id: int
    name: str
    listen: str
    port: int
    stun_port: int
    account: Path
    paths: Paths
    pki: Pki
    cloud: PopTimers
    source: Path


# --------------------------------------------------------------------------- helpers


_account_name = _matching(_ACCOUNT_NAME_RE, "a name of 1..64 characters [A-Za-z0-9_.-]")
_rule_name = _matching(_RULE_NAME_RE, "a name of 1..64 characters [A-Za-z0-9_.-]")


def _host_address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f'expected an IP address such as "0.0.0.0", got {_show(value)}')
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            f'expected an IP address such as "0.0.0.0" or "::", got {_show(value)}'
        ) from None
    if addr.is_multicast:
        raise ValueError(f"expected a unicast or wildcard address, got {_show(value)}")
    return str(addr)


# --------------------------------------------------------------------------- account


def _check_sites(c: _Checker, doc: Mapping[str, Any]) -> list[AccountSite] | None:
    raw = doc.get("sites", _MISSING)
    if raw is _MISSING:
        c.error(("sites",), "missing required [[sites]] (expected at least 1 entry)")
        return None
    if not isinstance(raw, list) or not raw:
        c.error(("sites",), f"expected an array of tables [[sites]], got {_show(raw)}")
        return None
    sites: list[AccountSite] = []
    ok = True
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("sites", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {_show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, ("id", "name", "subnets", "offcloud", "recovery"))
        site_id = c.value(entry, (*loc, "id"), _int_range(1, MAX_SITE_ID))
        if site_id is not _MISSING:
            if site_id in seen_ids:
                c.error(
                    (*loc, "id"), f"duplicate site id {site_id} (also sites[{seen_ids[site_id]}])"
                )
                site_id = _MISSING
            else:
                seen_ids[site_id] = i
        name = c.value(entry, (*loc, "name"), _site_name, default=None)
        if isinstance(name, str):
            if name in seen_names:
                c.error(
                    (*loc, "name"),
                    f"duplicate site name {_show(name)} (also sites[{seen_names[name]}])",
                )
                name = _MISSING
            else:
                seen_names[name] = i
        subnets = _check_networks(c, entry, (*loc, "subnets"))
        offcloud = c.value(entry, (*loc, "offcloud"), _boolean, default=False)
        recovery = c.value(entry, (*loc, "recovery"), _boolean, default=False)
        if _MISSING in (site_id, name, offcloud, recovery) or subnets is None:
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


def _check_site_overlaps(c: _Checker, doc: Mapping[str, Any]) -> None:
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
                owned.append((_network(item), ("sites", i, "subnets", j)))
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


def _check_rules(c: _Checker, doc: Mapping[str, Any]) -> list[Rule] | None:
    raw = doc.get("rules", [])
    if not isinstance(raw, list):
        c.error(("rules",), f"expected an array of tables [[rules]], got {_show(raw)}")
        return None
    rules: list[Rule] = []
    ok = True
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("rules", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {_show(entry)}")
            ok = False
            continue
        name = c.value(entry, (*loc, "name"), _rule_name)
        if isinstance(name, str):
            if name in seen:
                c.error(
                    (*loc, "name"), f"duplicate rule name {_show(name)} (also rules[{seen[name]}])"
                )
                name = _MISSING
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
        if name is _MISSING:
            ok = False
            continue
        rules.append(Rule(name=name, body=body))
    return rules if ok else None


def load_account(path: str | os.PathLike[str]) -> Account:
    """Read and validate an account file; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path, what="file")
    c = _Checker(source, _LineIndex(text))
    c.known_keys(doc, (), ("account", "sites", "rules"))
    name: Any = _MISSING
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


# --------------------------------------------------------------------------- popd config


def load_pop_config(path: str | os.PathLike[str]) -> PopConfig:
    """Read and validate popd's bootstrap config; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path, what="file")
    base = source.parent
    c = _Checker(source, _LineIndex(text))
    c.known_keys(doc, (), ("pop", "paths", "pki", "cloud"))

    pop: dict[str, Any] = {}
    pop_t = c.table(doc, ("pop",), required=True)
    if pop_t is not None:
        c.known_keys(pop_t, ("pop",), ("id", "name", "listen", "port", "stun_port", "account"))
        pop = {
            "id": c.value(pop_t, ("pop", "id"), _int_range(1, 255)),
            "name": c.value(pop_t, ("pop", "name"), _site_name, default=None),
            "listen": c.value(pop_t, ("pop", "listen"), _host_address, default=DEFAULT_LISTEN),
            "port": c.value(pop_t, ("pop", "port"), _int_range(1, 65535), default=DEFAULT_PORT),
            "stun_port": c.value(
                pop_t, ("pop", "stun_port"), _int_range(1, 65535), default=DEFAULT_STUN_PORT
            ),
            "account": c.value(pop_t, ("pop", "account"), _path_string),
        }
        if isinstance(pop["port"], int) and pop["port"] == pop["stun_port"]:
            c.error(("pop", "stun_port"), f"expected a port other than pop.port ({pop['port']})")
            pop["stun_port"] = _MISSING
        if isinstance(pop["account"], str):
            account_path = _resolve(base, pop["account"])
            if not account_path.is_file():
                c.error(("pop", "account"), f"file not found: {account_path}")
                pop["account"] = _MISSING
            else:
                pop["account"] = account_path

    paths: Paths | None = None
    paths_t = c.table(doc, ("paths",), required=False)
    if paths_t is not None:
        c.known_keys(paths_t, ("paths",), ("data_dir", "control_socket"))
        data_dir = c.value(
            paths_t, ("paths", "data_dir"), _path_string, default=str(DEFAULT_POP_DATA_DIR)
        )
        sock = c.value(
            paths_t,
            ("paths", "control_socket"),
            _path_string,
            default=str(DEFAULT_POP_CONTROL_SOCKET),
        )
        if isinstance(sock, str):
            sock_path = _resolve(base, sock)
            if len(os.fsencode(sock_path)) > MAX_UNIX_SOCKET_PATH:
                c.error(
                    ("paths", "control_socket"),
                    f"expected a path of at most {MAX_UNIX_SOCKET_PATH} bytes (Unix socket limit),"
                    f" got {sock_path}",
                )
                sock = _MISSING
        if isinstance(data_dir, str) and isinstance(sock, str):
            paths = Paths(_resolve(base, data_dir), _resolve(base, sock))

    files = _check_pki_files(c, doc, base)
    pki = Pki(**files) if files is not None else None

    cloud: PopTimers | None = None
    cloud_t = c.table(doc, ("cloud",), required=False)
    if cloud_t is not None:
        c.known_keys(cloud_t, ("cloud",), ("keepalive_ms", "dead_after_ms"))
        ka = c.value(
            cloud_t, ("cloud", "keepalive_ms"), _int_range(20, 60000), default=DEFAULT_KEEPALIVE_MS
        )
        dead = c.value(
            cloud_t,
            ("cloud", "dead_after_ms"),
            _int_range(60, 600000),
            default=DEFAULT_DEAD_AFTER_MS,
        )
        if isinstance(ka, int) and isinstance(dead, int) and dead < 2 * ka:
            c.error(
                ("cloud", "dead_after_ms"),
                f"expected at least twice keepalive_ms ({2 * ka}), got {dead}",
            )
            dead = _MISSING
        if isinstance(ka, int) and isinstance(dead, int):
            cloud = PopTimers(ka, dead)

    if c.issues:
        raise ConfigError(source, c.issues)
    assert paths is not None and pki is not None and cloud is not None
    assert not any(v is _MISSING for v in pop.values())
    return PopConfig(
        id=pop["id"],
        name=pop["name"] or f"pop-{pop['id']}",
        listen=pop["listen"],
        port=pop["port"],
        stun_port=pop["stun_port"],
        account=pop["account"],
        paths=paths,
        pki=pki,
        cloud=cloud,
        source=source,
    )
