"""popd's own bootstrap configuration (`popd --config PATH`): its id, addresses, ports, the
account file, paths, PKI, the cloud timers it pushes to the sites and the key timers it
announces in every key hand-over, checked with the config
engine (common/tomlcheck.py). `load_pop_config(path)` returns a `PopConfig` or raises
`ConfigError` listing every problem with its field and line. Schema: docs/popd.md.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.common.keytimers import (
    HANDSHAKE_MARGIN_S,
    KEY_MAX_AGE_MAX_S,
    POP_REKEY_MIN_S,
    REKEY_MAX_S,
    KeyTimers,
    default_key_max_age,
    timers_problem,
)
from sdwan.common.tomlcheck import (
    MAX_UNIX_SOCKET_PATH,
    MISSING,
    Checker,
    ConfigError,
    LineIndex,
    check_pki_files,
    int_range,
    path_string,
    read_toml,
    resolve_path,
    show,
    site_name,
)
from sdwan.pop.eventsink import EventLimits
from sdwan.pop.renewal import MIN_DAYS as RENEWAL_MIN_DAYS
from sdwan.pop.renewal import RenewalConfig
from sdwan.site.config import Paths, Pki

__all__ = ["ConfigError", "PopConfig", "PopTimers", "load_pop_config"]

DEFAULT_POP_DATA_DIR = Path("/var/lib/popd")
DEFAULT_POP_CONTROL_SOCKET = Path("/run/popd/control.sock")
DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_PORT = 4800
DEFAULT_STUN_PORT = 3478
DEFAULT_KEEPALIVE_MS = 200
DEFAULT_DEAD_AFTER_MS = 600
# The PoP does not rekey (its sites do): its interval caps theirs through the agreement, and
# its key-age limit (by default twice the interval plus the margin, as on a site) caps theirs.
DEFAULT_POP_REKEY_S = 600


@dataclass(frozen=True)
class PopTimers:
    """The cloud timers popd pushes to every site (milliseconds, as in the config)."""

    keepalive_ms: int = DEFAULT_KEEPALIVE_MS
    dead_after_ms: int = DEFAULT_DEAD_AFTER_MS


@dataclass(frozen=True)
class RegisterLimits:
    """popd config `[register]`: registrations accepted per site and per source address (an
    IPv4 address or IPv6 /64); one over is refused with the reason and counted."""

    site_per_minute: int = 60
    site_burst: int = 10
    source_per_minute: int = 6000
    source_burst: int = 2000


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
    keys: KeyTimers = KeyTimers.for_rekey(DEFAULT_POP_REKEY_S)
    renewal: RenewalConfig = RenewalConfig()
    events: EventLimits = EventLimits()
    register: RegisterLimits = RegisterLimits()


def _host_address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f'expected an IP address such as "0.0.0.0", got {show(value)}')
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(
            f'expected an IP address such as "0.0.0.0" or "::", got {show(value)}'
        ) from None
    if addr.is_multicast:
        raise ValueError(f"expected a unicast or wildcard address, got {show(value)}")
    return str(addr)


# --------------------------------------------------------------------------- popd config


def load_pop_config(path: str | os.PathLike[str]) -> PopConfig:
    """Read and validate popd's bootstrap config; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path, what="file")
    base = source.parent
    c = Checker(source, LineIndex(text))
    c.known_keys(
        doc, (), ("pop", "paths", "pki", "cloud", "tunnel", "renewal", "events", "register")
    )

    pop: dict[str, Any] = {}
    pop_t = c.table(doc, ("pop",), required=True)
    if pop_t is not None:
        c.known_keys(pop_t, ("pop",), ("id", "name", "listen", "port", "stun_port", "account"))
        pop = {
            "id": c.value(pop_t, ("pop", "id"), int_range(1, 255)),
            "name": c.value(pop_t, ("pop", "name"), site_name, default=None),
            "listen": c.value(pop_t, ("pop", "listen"), _host_address, default=DEFAULT_LISTEN),
            "port": c.value(pop_t, ("pop", "port"), int_range(1, 65535), default=DEFAULT_PORT),
            "stun_port": c.value(
                pop_t, ("pop", "stun_port"), int_range(1, 65535), default=DEFAULT_STUN_PORT
            ),
            "account": c.value(pop_t, ("pop", "account"), path_string),
        }
        if isinstance(pop["port"], int) and pop["port"] == pop["stun_port"]:
            c.error(("pop", "stun_port"), f"expected a port other than pop.port ({pop['port']})")
            pop["stun_port"] = MISSING
        if isinstance(pop["account"], str):
            account_path = resolve_path(base, pop["account"])
            if not account_path.is_file():
                c.error(("pop", "account"), f"file not found: {account_path}")
                pop["account"] = MISSING
            else:
                pop["account"] = account_path

    paths: Paths | None = None
    paths_t = c.table(doc, ("paths",), required=False)
    if paths_t is not None:
        c.known_keys(paths_t, ("paths",), ("data_dir", "control_socket"))
        data_dir = c.value(
            paths_t, ("paths", "data_dir"), path_string, default=str(DEFAULT_POP_DATA_DIR)
        )
        sock = c.value(
            paths_t,
            ("paths", "control_socket"),
            path_string,
            default=str(DEFAULT_POP_CONTROL_SOCKET),
        )
        if isinstance(sock, str):
            sock_path = resolve_path(base, sock)
            if len(os.fsencode(sock_path)) > MAX_UNIX_SOCKET_PATH:
                c.error(
                    ("paths", "control_socket"),
                    f"expected a path of at most {MAX_UNIX_SOCKET_PATH} bytes (Unix socket limit),"
                    f" got {sock_path}",
                )
                sock = MISSING
        if isinstance(data_dir, str) and isinstance(sock, str):
            paths = Paths(resolve_path(base, data_dir), resolve_path(base, sock))

    files = check_pki_files(c, doc, base)
    pki = Pki(**files) if files is not None else None

    cloud: PopTimers | None = None
    cloud_t = c.table(doc, ("cloud",), required=False)
    if cloud_t is not None:
        c.known_keys(cloud_t, ("cloud",), ("keepalive_ms", "dead_after_ms"))
        ka = c.value(
            cloud_t, ("cloud", "keepalive_ms"), int_range(20, 60000), default=DEFAULT_KEEPALIVE_MS
        )
        dead = c.value(
            cloud_t,
            ("cloud", "dead_after_ms"),
            int_range(60, 600000),
            default=DEFAULT_DEAD_AFTER_MS,
        )
        if isinstance(ka, int) and isinstance(dead, int) and dead < 2 * ka:
            c.error(
                ("cloud", "dead_after_ms"),
                f"expected at least twice keepalive_ms ({2 * ka}), got {dead}",
            )
            dead = MISSING
        if isinstance(ka, int) and isinstance(dead, int):
            cloud = PopTimers(ka, dead)

    keys: KeyTimers | None = KeyTimers.for_rekey(DEFAULT_POP_REKEY_S)
    tunnel_t = c.table(doc, ("tunnel",), required=False)
    if tunnel_t is not None:
        c.known_keys(tunnel_t, ("tunnel",), ("rekey_s", "key_max_age_s"))
        rekey = c.value(
            tunnel_t,
            ("tunnel", "rekey_s"),
            int_range(POP_REKEY_MIN_S, REKEY_MAX_S),
            default=DEFAULT_POP_REKEY_S,
        )
        age = c.value(
            tunnel_t,
            ("tunnel", "key_max_age_s"),
            int_range(POP_REKEY_MIN_S + HANDSHAKE_MARGIN_S, KEY_MAX_AGE_MAX_S),
            default=None,
        )
        keys = None
        if isinstance(rekey, int) and age is None:
            keys = KeyTimers(rekey, default_key_max_age(rekey))
        elif isinstance(rekey, int) and isinstance(age, int):
            problem = timers_problem(rekey, age)
            if problem is not None:
                c.error(("tunnel", "key_max_age_s"), f"cannot work with rekey_s: {problem}")
            else:
                keys = KeyTimers(rekey, age)
    renewal = _check_renewal(c, doc, base)
    events = _check_events(c, doc)
    register = _check_register(c, doc)

    if c.issues:
        raise ConfigError(source, c.issues)
    assert paths is not None and pki is not None and cloud is not None and keys is not None
    assert renewal is not None
    assert not any(v is MISSING for v in pop.values())
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
        keys=keys,
        renewal=renewal,
        events=events,
        register=register,
    )


def _int_fields(
    c: Checker, doc: dict[str, Any], table_name: str, bounds: dict[str, tuple[int, int]],
    defaults: dict[str, int],
) -> dict[str, Any] | None:
    table = c.table(doc, (table_name,), required=False)
    if table is None:
        return dict(defaults)
    c.known_keys(table, (table_name,), tuple(bounds))
    return {
        name: c.value(table, (table_name, name), int_range(lo, hi), default=defaults[name])
        for name, (lo, hi) in bounds.items()
    }


def _check_events(c: Checker, doc: dict[str, Any]) -> EventLimits:
    """[events]: the per-site quota and the retention of what sites upload (docs/popd.md)."""
    d = EventLimits()
    values = _int_fields(
        c, doc, "events",
        {"site_keep": (10, 1_000_000), "pop_keep": (100, 10_000_000),
         "site_per_minute": (1, 1_000_000), "site_burst": (1, 1_000_000),
         "backlog": (1000, 10_000_000)},
        {"site_keep": d.site_keep, "pop_keep": d.pop_keep, "site_per_minute": d.site_per_minute,
         "site_burst": d.site_burst, "backlog": d.backlog},
    )
    if values is None or any(v is MISSING for v in values.values()):
        return d
    return EventLimits(**values)


def _check_register(c: Checker, doc: dict[str, Any]) -> RegisterLimits:
    """[register]: registrations per site and per source (docs/popd.md)."""
    d = RegisterLimits()
    values = _int_fields(
        c, doc, "register",
        {"site_per_minute": (1, 100_000), "site_burst": (1, 10_000),
         "source_per_minute": (1, 10_000_000), "source_burst": (1, 1_000_000)},
        {"site_per_minute": d.site_per_minute, "site_burst": d.site_burst,
         "source_per_minute": d.source_per_minute, "source_burst": d.source_burst},
    )
    if values is None or any(v is MISSING for v in values.values()):
        return d
    return RegisterLimits(**values)


def _check_renewal(c: Checker, doc: dict[str, Any], base: Path) -> RenewalConfig | None:
    """[renewal]: the account CA key popd signs sites' renewals with (docs/popd.md)."""
    table = c.table(doc, ("renewal",), required=False)
    if table is None:
        return RenewalConfig()
    c.known_keys(table, ("renewal",), ("ca_key", "days", "min_interval_s"))
    key = c.value(table, ("renewal", "ca_key"), path_string, default=None)
    days = c.value(table, ("renewal", "days"), int_range(1, 3650), default=RenewalConfig.days)
    if isinstance(days, int) and days < RENEWAL_MIN_DAYS:
        # A certificate for 30 days or less is within a site's renewal window at once: the
        # site would ask again as soon as it may.
        c.error(("renewal", "days"), f"expected more than {RENEWAL_MIN_DAYS - 1} days (a site "
                f"asks for renewal 30 days before expiry), got {days}")
        days = MISSING
    interval = c.value(table, ("renewal", "min_interval_s"), int_range(0, 30 * 86400),
                       default=RenewalConfig.min_interval_s)
    key_path = None
    if isinstance(key, str):
        key_path = resolve_path(base, key)
        if not key_path.is_file():
            c.error(("renewal", "ca_key"), f"file not found: {key_path}")
            key = MISSING
        elif not os.access(key_path, os.R_OK):
            c.error(("renewal", "ca_key"), f"file not readable: {key_path}")
            key = MISSING
    if MISSING in (key, days, interval):
        return None
    return RenewalConfig(ca_key=key_path, days=days, min_interval_s=interval)
