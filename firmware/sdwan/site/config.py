"""Bootstrap configuration of socketd: the TOML schema, its validation and its error messages.

`load_config(path)` reads the file given to `socketd --config PATH` and returns a frozen
`SiteConfig`, or raises `ConfigError` listing every problem found in one pass, each naming the
file, the field path (for instance `links[1].port`, array indices counted from 0), what was
expected and, where it can be found, the line. The schema is documented in docs/config.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.appliance.wanaddr import MODES as _ADDRESSING_MODES
from sdwan.appliance.wanaddr import Addressing

__all__ = [
    "Appliance",
    "Cloud",
    "ConfigError",
    "ConfigIssue",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_DATA_DIR",
    "IPNetwork",
    "Lan",
    "Link",
    "Paths",
    "Peer",
    "Pki",
    "Pop",
    "Site",
    "SiteConfig",
    "Tunnel",
    "format_endpoint",
    "load_config",
    "parse_endpoint",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CONFIG_PATH = Path("/etc/socketd.toml")
DEFAULT_DATA_DIR = Path("/var/lib/socketd")
DEFAULT_CONTROL_SOCKET = Path("/run/socketd/control.sock")

MAX_LINKS = 4
# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
IFNAMSIZ_CHARS = 15

_TUN_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_LINK_NAME_RE = re.compile(r"[a-z0-9_-]{1,15}")
# The kernel rejects "", ".", "..", and names containing "/", ":" or whitespace.
_IFNAME_RE = re.compile(r"[^/:\s]{1,15}")


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
class Lan:
    subnets: tuple[IPNetwork, ...]
    interface: str | None = None


@dataclass(frozen=True)
class Tunnel:
    interface: str = "sdwan0"
    keepalive_s: int = 15
    rekey_s: int = 600
    mss_clamp: bool = True
    # How long the fast path polls for the answer to a lone packet before it sleeps
    # (docs/dataplane.md, "Latency"); 0 turns it off.
    answer_wait_us: int = 200


@dataclass(frozen=True)
class Link:
    name: str
    interface: str
    port: int
    precedence: int = 1
    mtu: int = 1500
    # How the device gets its address (wanaddr.py); a setting stored from the console wins.
    addressing: Addressing = Addressing()


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
class Cloud:
    keepalive_ms: int = 200
    dead_after_ms: int = 600
    return_hold_s: int = 30
    ping_s: int = 1


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


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file; `field` is a path such as `links[1].port` ("" for the file)."""

    field: str
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}: {self.field}: " if self.field else f"{source}: "
        suffix = f" (line {self.line})" if self.line is not None else ""
        return f"{where}{self.message}{suffix}"


class ConfigError(Exception):
    """The config file is unusable; `str()` gives one located message per line."""

    def __init__(self, source: Path | str, issues: Iterable[ConfigIssue]) -> None:
        self.source = str(source)
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(issue.render(self.source) for issue in self.issues))


# --------------------------------------------------------------------------- endpoints


def parse_endpoint(text: str) -> tuple[str, int]:
    """Parse "IPv4:port" or "[IPv6]:port"; raise ValueError with what was expected."""
    expected = 'expected "IPv4:port" or "[IPv6]:port"'
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{expected}, got {_show(text)}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{expected}, got {_show(text)}")
        inner = host[1:-1]
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"{expected}, got {_show(text)} ({_show(inner)} is not an IPv6 address)"
            ) from None
    else:
        if ":" in host:
            # An IPv6 address without brackets is ambiguous about where the port starts.
            raise ValueError(f"{expected} (IPv6 needs brackets), got {_show(text)}")
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{expected}, got {_show(text)} ({_show(host)} is not an IPv4 address;"
                " host names are not accepted)"
            ) from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{expected} with a port 1..65535, got {_show(text)}")
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"expected a unicast address, got {_show(text)}")
    return str(addr), int(port_text)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- line lookup

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")

_Key = tuple[str, int | None, str]


class _LineIndex:
    """Where keys and table headers sit in the file, found by a plain line scan.

    TOML allows constructs this does not follow (dotted keys, multi-line strings with `=`); a miss
    only costs the `(line N)` hint, never correctness.
    """

    def __init__(self, text: str) -> None:
        self.keys: dict[_Key, int] = {}
        self.headers: dict[tuple[str, int | None], int] = {}
        counts: dict[str, int] = {}
        table, index = "", None
        for lineno, line in enumerate(text.splitlines(), start=1):
            header = _HEADER_RE.match(line)
            if header:
                table = header.group(2).replace('"', "").replace("'", "").strip()
                if header.group(1) == "[[":
                    index = counts.get(table, 0)
                    counts[table] = index + 1
                else:
                    index = None
                self.headers.setdefault((table, index), lineno)
                continue
            key = _KEY_RE.match(line)
            if key:
                self.keys.setdefault((table, index, key.group(1).strip("\"'")), lineno)

    def find(self, loc: tuple[str | int, ...]) -> int | None:
        """Line of the deepest part of `loc` (table, [index], key, ...) that can be found."""
        if not loc or not isinstance(loc[0], str):
            return None
        table = loc[0]
        index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
        rest = loc[2:] if index is not None else loc[1:]
        key = next((p for p in rest if isinstance(p, str)), None)
        if key is not None:
            line = self.keys.get((table, index, key))
            if line is not None:
                return line
        line = self.headers.get((table, index))
        if line is not None:
            return line
        # Inline tables (`site = { id = 1 }`) and top-level keys.
        return self.keys.get(("", None, table))


# --------------------------------------------------------------------------- validation


_MISSING = object()


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML, short enough for one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array" if value else "an empty array"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fmt_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class _Checker:
    def __init__(self, source: Path, lines: _LineIndex) -> None:
        self.source = source
        self.lines = lines
        self.issues: list[ConfigIssue] = []

    def error(self, loc: tuple[str | int, ...], message: str) -> None:
        self.issues.append(ConfigIssue(_fmt_loc(loc), message, self.lines.find(loc)))

    # ---- tables

    def table(
        self, parent: Mapping[str, Any], loc: tuple[str | int, ...], *, required: bool
    ) -> dict[str, Any] | None:
        name = loc[-1]
        assert isinstance(name, str)
        value = parent.get(name, _MISSING)
        if value is _MISSING:
            if required:
                self.error(loc, f"missing required table [{_fmt_loc(loc)}]")
                return None
            return {}
        if not isinstance(value, dict):
            self.error(loc, f"expected a table [{_fmt_loc(loc)}], got {_show(value)}")
            return None
        return value

    def known_keys(
        self, table: Mapping[str, Any], loc: tuple[str | int, ...], allowed: Iterable[str]
    ) -> None:
        allowed = sorted(allowed)
        for key in table:
            if key in allowed:
                continue
            import difflib  # only when a key is wrong: the supervisor stays small

            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            self.error((*loc, key), f"unknown key ({hint}expected one of: {', '.join(allowed)})")

    # ---- scalars

    def value(
        self,
        table: Mapping[str, Any],
        loc: tuple[str | int, ...],
        check: Callable[[Any], Any],
        *,
        default: Any = _MISSING,
    ) -> Any:
        """`table[loc[-1]]` checked, else the default, else _MISSING (and an error recorded)."""
        key = loc[-1]
        assert isinstance(key, str)
        raw = table.get(key, _MISSING)
        if raw is _MISSING:
            if default is _MISSING:
                what = _EXPECTED.get(check)
                self.error(
                    loc,
                    f"missing required field (expected {what})"
                    if what
                    else "missing required field",
                )
            return default
        try:
            return check(raw)
        except ValueError as exc:
            self.error(loc, str(exc))
            return _MISSING


# What each check expects, for "missing required field (expected ...)".
_EXPECTED: dict[Callable[[Any], Any], str] = {}


def _expects(what: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    def register(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _EXPECTED[check] = what
        return check

    return register


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    @_expects(f"an integer {lo}..{hi}")
    def check(value: Any) -> int:
        # bool is an int subclass in Python; `port = true` must not become port 1.
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"expected an integer {lo}..{hi}, got {_show(value)}")
        return value

    return check


@_expects("true or false")
def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _matching(regex: re.Pattern[str], what: str) -> Callable[[Any], str]:
    @_expects(what)
    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"expected {what}, got {_show(value)}")
        return value

    return check


_tun_name = _matching(_TUN_NAME_RE, "an interface name of 1..15 characters [A-Za-z0-9_.-]")
_link_name = _matching(_LINK_NAME_RE, "a name of 1..15 characters [a-z0-9_-]")


@_expects("a network interface name of 1..15 characters")
def _ifname(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not _IFNAME_RE.fullmatch(value)
        or value in (".", "..")
        or not value.isprintable()
    ):
        raise ValueError(
            "expected a network interface name of 1..15 characters without '/', ':' or spaces,"
            f" got {_show(value)}"
        )
    return value


@_expects("a printable string of 1..64 characters")
def _site_name(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable():
        raise ValueError(f"expected a printable string of 1..64 characters, got {_show(value)}")
    return value


@_expects("a file path")
def _path_string(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"expected a file path (non-empty string), got {_show(value)}")
    return value


def _network(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f'expected a network such as "10.1.0.0/24", got {_show(value)}')
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f'expected a network such as "10.1.0.0/24" or "fd00:1::/64", got {_show(value)}'
        ) from None
    raise ValueError(
        f'expected a network with the host bits zero, got {_show(value)} (did you mean "{loose}"?)'
    )


@_expects('"IPv4:port" or "[IPv6]:port"')
def _endpoint(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError(f'expected "IPv4:port" or "[IPv6]:port", got {_show(value)}')
    return parse_endpoint(value)


# --------------------------------------------------------------------------- sections


def _check_networks(
    c: _Checker, table: Mapping[str, Any], loc: tuple[str | int, ...]
) -> tuple[IPNetwork, ...] | None:
    raw = table.get("subnets", _MISSING)
    if raw is _MISSING:
        c.error(loc, "missing required field (expected an array of at least 1 network)")
        return None
    if not isinstance(raw, list) or not raw:
        c.error(loc, f"expected an array of at least 1 network, got {_show(raw)}")
        return None
    nets: list[IPNetwork] = []
    ok = True
    for i, item in enumerate(raw):
        try:
            nets.append(_network(item))
        except ValueError as exc:
            c.error((*loc, i), str(exc))
            ok = False
    return tuple(nets) if ok else None


def _check_pki_files(c: _Checker, doc: Mapping[str, Any], base: Path) -> dict[str, Path] | None:
    """The required [pki] table (ca, cert, key): readable files, or None after errors.
    Shared by the site's and the PoP's configuration."""
    pki_t = c.table(doc, ("pki",), required=True)
    if pki_t is None:
        return None
    c.known_keys(pki_t, ("pki",), ("ca", "cert", "key"))
    files: dict[str, Path] = {}
    for key in ("ca", "cert", "key"):
        text = c.value(pki_t, ("pki", key), _path_string)
        if text is _MISSING:
            continue
        path = _resolve(base, text)
        if not path.exists():
            c.error(("pki", key), f"file not found: {path}")
        elif not path.is_file():
            c.error(("pki", key), f"expected a PEM file, got a directory or device: {path}")
        elif not os.access(path, os.R_OK):
            c.error(("pki", key), f"file not readable: {path}")
        else:
            files[key] = path
    return files if len(files) == 3 else None


def _resolve(base: Path, text: str) -> Path:
    path = Path(text)
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _check_addressing(
    c: _Checker, entry: Mapping[str, Any], loc: tuple[str | int, ...]
) -> Addressing | object:
    """A link's optional `addressing`: "none", "dhcp" or {mode = "static", address, gateway}."""
    raw = entry.get("addressing", _MISSING)
    if raw is _MISSING:
        return Addressing()
    if isinstance(raw, dict):
        c.known_keys(raw, loc, ("mode", "address", "gateway"))
        mode = raw.get("mode", _MISSING)
        if mode is _MISSING:
            c.error((*loc, "mode"), 'missing required field (expected "none", "static" or "dhcp")')
            return _MISSING
        if mode not in _ADDRESSING_MODES:
            c.error((*loc, "mode"), f'expected "none", "static" or "dhcp", got {_show(mode)}')
            return _MISSING
        if mode == "static":
            for key in ("address", "gateway"):
                if key not in raw:
                    c.error((*loc, key), 'missing required field (mode "static" needs it)')
            if "address" not in raw or "gateway" not in raw:
                return _MISSING
            try:
                return Addressing.static(raw["address"], raw["gateway"])
            except ValueError as exc:
                about_gw = str(exc).startswith(("gateway", "expected a gateway"))
                c.error((*loc, "gateway" if about_gw else "address"), str(exc))
                return _MISSING
        for key in ("address", "gateway"):
            if key in raw:
                c.error((*loc, key), f'only for mode "static", not {_show(mode)}')
                return _MISSING
        return Addressing(mode)
    try:
        return Addressing.from_value(raw)
    except ValueError as exc:
        c.error(loc, str(exc))
        return _MISSING


def _check_links(c: _Checker, doc: Mapping[str, Any]) -> list[Link] | None:
    raw = doc.get("links", _MISSING)
    if raw is _MISSING:
        c.error(("links",), f"missing required [[links]] (expected 1..{MAX_LINKS} entries)")
        return None
    if not isinstance(raw, list):
        c.error(("links",), f"expected an array of tables [[links]], got {_show(raw)}")
        return None
    if not 1 <= len(raw) <= MAX_LINKS:
        c.error(("links",), f"expected 1..{MAX_LINKS} [[links]] entries, got {len(raw)}")
    links: list[Link] = []
    ok = True
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("links", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {_show(entry)}")
            ok = False
            continue
        c.known_keys(
            entry, loc, ("name", "interface", "port", "precedence", "mtu", "addressing")
        )
        values = {
            "name": c.value(entry, (*loc, "name"), _link_name),
            "interface": c.value(entry, (*loc, "interface"), _ifname),
            "port": c.value(entry, (*loc, "port"), _int_range(1, 65535)),
            "precedence": c.value(entry, (*loc, "precedence"), _int_range(1, 3), default=1),
            "mtu": c.value(entry, (*loc, "mtu"), _int_range(576, 9000), default=1500),
            "addressing": _check_addressing(c, entry, (*loc, "addressing")),
        }
        if any(v is _MISSING for v in values.values()):
            ok = False
            continue
        links.append(Link(**values))

    seen_names: dict[str, int] = {}
    seen_ports: dict[tuple[str, int], int] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            continue
        name, iface, port = entry.get("name"), entry.get("interface"), entry.get("port")
        if isinstance(name, str):
            if name in seen_names:
                c.error(
                    ("links", i, "name"),
                    f"duplicate link name {_show(name)} (also links[{seen_names[name]}])",
                )
                ok = False
            seen_names.setdefault(name, i)
        if isinstance(iface, str) and isinstance(port, int) and not isinstance(port, bool):
            if (iface, port) in seen_ports:
                c.error(
                    ("links", i, "port"),
                    f"duplicate port {port} on interface {_show(iface)}"
                    f" (also links[{seen_ports[(iface, port)]}])",
                )
                ok = False
            seen_ports.setdefault((iface, port), i)
    return links if ok else None


def _check_peers(
    c: _Checker, doc: Mapping[str, Any], site_id: Any, links: list[Link] | None
) -> list[Peer] | None:
    raw = doc.get("peers", [])
    if not isinstance(raw, list):
        c.error(("peers",), f"expected an array of tables [[peers]], got {_show(raw)}")
        return None
    link_names = [link.name for link in links] if links is not None else None
    peers: list[Peer] = []
    ok = True
    seen_ids: dict[int, int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("peers", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {_show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, ("site_id", "endpoint", "subnets", "link"))
        peer_id = c.value(entry, (*loc, "site_id"), _int_range(1, 65535))
        if peer_id is not _MISSING:
            if peer_id == site_id:
                c.error(
                    (*loc, "site_id"),
                    f"expected the id of another site, got our own site id {peer_id}",
                )
                peer_id = _MISSING
            elif peer_id in seen_ids:
                c.error(
                    (*loc, "site_id"),
                    f"duplicate peer site_id {peer_id} (also peers[{seen_ids[peer_id]}])",
                )
                peer_id = _MISSING
            else:
                seen_ids[peer_id] = i
        endpoint = c.value(entry, (*loc, "endpoint"), _endpoint)
        subnets = _check_networks(c, entry, (*loc, "subnets"))
        link_name = c.value(entry, (*loc, "link"), _link_name, default=None)
        if link_name is None:
            # Without valid links there is no default; that error is reported for [[links]].
            link_name = link_names[0] if link_names else _MISSING
        elif link_name is not _MISSING and link_names is not None and link_name not in link_names:
            c.error(
                (*loc, "link"),
                f"expected the name of a [[links]] entry ({', '.join(link_names)}),"
                f" got {_show(link_name)}",
            )
            link_name = _MISSING
        if _MISSING in (peer_id, endpoint, link_name) or subnets is None:
            ok = False
            continue
        peers.append(Peer(site_id=peer_id, endpoint=endpoint, subnets=subnets, link=link_name))
    return peers if ok else None


MAX_POP_ID = 65535


def _check_pops(c: _Checker, doc: Mapping[str, Any]) -> list[Pop] | None:
    raw = doc.get("pops", [])
    if not isinstance(raw, list):
        c.error(("pops",), f"expected an array of tables [[pops]], got {_show(raw)}")
        return None
    pops: list[Pop] = []
    ok = True
    seen_ids: dict[int, int] = {}
    seen_eps: dict[tuple[str, int], int] = {}
    for i, entry in enumerate(raw):
        loc: tuple[str | int, ...] = ("pops", i)
        if not isinstance(entry, dict):
            c.error(loc, f"expected a table, got {_show(entry)}")
            ok = False
            continue
        c.known_keys(entry, loc, ("id", "endpoint", "stun"))
        pop_id = c.value(entry, (*loc, "id"), _int_range(1, MAX_POP_ID))
        if pop_id is not _MISSING:
            if pop_id in seen_ids:
                c.error((*loc, "id"), f"duplicate PoP id {pop_id} (also pops[{seen_ids[pop_id]}])")
                pop_id = _MISSING
            else:
                seen_ids[pop_id] = i
        endpoint = c.value(entry, (*loc, "endpoint"), _endpoint)
        if endpoint is not _MISSING:
            if endpoint in seen_eps:
                c.error(
                    (*loc, "endpoint"),
                    f"duplicate PoP endpoint {_show(format_endpoint(endpoint))}"
                    f" (also pops[{seen_eps[endpoint]}])",
                )
                endpoint = _MISSING
            else:
                seen_eps[endpoint] = i
        stun = c.value(entry, (*loc, "stun"), _endpoint, default=None)
        if _MISSING in (pop_id, endpoint, stun):
            ok = False
            continue
        pops.append(Pop(id=pop_id, endpoint=endpoint, stun=stun))
    return pops if ok else None


def _check_cloud(c: _Checker, doc: Mapping[str, Any]) -> Cloud | None:
    table = c.table(doc, ("cloud",), required=False)
    if table is None:
        return None
    c.known_keys(table, ("cloud",), ("keepalive_ms", "dead_after_ms", "return_hold_s", "ping_s"))
    keepalive = c.value(table, ("cloud", "keepalive_ms"), _int_range(50, 5000), default=200)
    dead_default = 3 * keepalive if keepalive is not _MISSING else 600
    # At least two keepalive intervals: one lost keepalive must never kill a session.
    dead_lo = 2 * keepalive if keepalive is not _MISSING else 100
    dead = c.value(
        table, ("cloud", "dead_after_ms"), _int_range(dead_lo, 60000), default=dead_default
    )
    hold = c.value(table, ("cloud", "return_hold_s"), _int_range(0, 3600), default=30)
    ping = c.value(table, ("cloud", "ping_s"), _int_range(1, 60), default=1)
    if _MISSING in (keepalive, dead, hold, ping):
        return None
    return Cloud(keepalive_ms=keepalive, dead_after_ms=dead, return_hold_s=hold, ping_s=ping)


def _check_appliance(c: _Checker, doc: Mapping[str, Any], base: Path) -> Appliance | None:
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
        raw = table.get(key, _MISSING)
        if raw is _MISSING:
            paths[key] = DEFAULT_LED_MAP if key == "leds" and DEFAULT_LED_MAP.is_file() else None
        elif raw is False:
            paths[key] = None
        elif isinstance(raw, str) and raw and "\0" not in raw:
            path = _resolve(base, raw)
            if key == "leds" and not path.is_file():
                c.error((*loc, key), f"LED map not found: {path}")
            paths[key] = path
        else:
            c.error((*loc, key), f"expected the path of {what} or false, got {_show(raw)}")
    timeout = c.value(table, (*loc, "watchdog_timeout_s"), _int_range(2, 600), default=15)
    # Long enough for a socketd starting on a slow or loaded CPU (docs/watchdog.md); a
    # start-up that hangs is still reset after it.
    startup_default = max(300, timeout) if timeout is not _MISSING else 300
    startup = c.value(
        table, (*loc, "watchdog_startup_s"), _int_range(10, 3600), default=startup_default
    )
    if _MISSING not in (timeout, startup) and startup < timeout:
        c.error(
            (*loc, "watchdog_startup_s"),
            f"must not be shorter than watchdog_timeout_s ({timeout}), got {startup}",
        )
        startup = _MISSING
    starts = c.value(table, (*loc, "crash_loop_starts"), _int_range(2, 100), default=5)
    window = c.value(table, (*loc, "crash_loop_window_s"), _int_range(10, 86400), default=120)
    if len(paths) < 2 or _MISSING in (timeout, startup, starts, window):
        return None
    return Appliance(
        watchdog=paths["watchdog"],
        watchdog_timeout_s=timeout,
        watchdog_startup_s=startup,
        leds=paths["leds"],
        crash_loop_starts=starts,
        crash_loop_window_s=window,
    )


def _check_overlaps(c: _Checker, doc: Mapping[str, Any]) -> None:
    """Every destination prefix must lead to exactly one place: the LAN or one peer."""
    owned: list[tuple[IPNetwork, tuple[str | int, ...]]] = []

    def collect(table: Any, loc: tuple[str | int, ...]) -> None:
        subnets = table.get("subnets") if isinstance(table, dict) else None
        if not isinstance(subnets, list):
            return
        for i, item in enumerate(subnets):
            # A bad network was already reported by the field check.
            with contextlib.suppress(ValueError):
                owned.append((_network(item), (*loc, "subnets", i)))

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
            c.error(here[1], f"subnet {here[0]} overlaps {there[0]} of {_fmt_loc(there[1][:-2])}")
        if widest is None or net.broadcast_address > widest[0].broadcast_address:
            widest = (net, loc)


def _validate(doc: dict[str, Any], source: Path, c: _Checker) -> SiteConfig | None:
    base = source.parent
    c.known_keys(
        doc,
        (),
        ("site", "paths", "pki", "lan", "tunnel", "links", "peers", "pops", "cloud", "appliance"),
    )

    site_t = c.table(doc, ("site",), required=True)
    site_id: Any = _MISSING
    site: Site | None = None
    if site_t is not None:
        c.known_keys(site_t, ("site",), ("id", "name"))
        site_id = c.value(site_t, ("site", "id"), _int_range(1, 65535))
        name = c.value(site_t, ("site", "name"), _site_name, default=None)
        if site_id is not _MISSING and name is not _MISSING:
            site = Site(id=site_id, name=name if name is not None else f"site-{site_id}")

    paths: Paths | None = None
    paths_t = c.table(doc, ("paths",), required=False)
    if paths_t is not None:
        c.known_keys(paths_t, ("paths",), ("data_dir", "control_socket"))
        data_dir = c.value(
            paths_t, ("paths", "data_dir"), _path_string, default=str(DEFAULT_DATA_DIR)
        )
        sock = c.value(
            paths_t,
            ("paths", "control_socket"),
            _path_string,
            default=str(DEFAULT_CONTROL_SOCKET),
        )
        if sock is not _MISSING:
            sock_path = _resolve(base, sock)
            if len(os.fsencode(sock_path)) > MAX_UNIX_SOCKET_PATH:
                c.error(
                    ("paths", "control_socket"),
                    f"expected a path of at most {MAX_UNIX_SOCKET_PATH} bytes (Unix socket limit),"
                    f" got {sock_path}",
                )
                sock = _MISSING
        if data_dir is not _MISSING and sock is not _MISSING:
            paths = Paths(data_dir=_resolve(base, data_dir), control_socket=_resolve(base, sock))

    files = _check_pki_files(c, doc, base)
    pki = Pki(**files) if files is not None else None

    lan: Lan | None = None
    lan_t = c.table(doc, ("lan",), required=True)
    if lan_t is not None:
        c.known_keys(lan_t, ("lan",), ("subnets", "interface"))
        subnets = _check_networks(c, lan_t, ("lan", "subnets"))
        iface = c.value(lan_t, ("lan", "interface"), _ifname, default=None)
        if subnets is not None and iface is not _MISSING:
            lan = Lan(subnets=subnets, interface=iface)

    tunnel: Tunnel | None = None
    tunnel_t = c.table(doc, ("tunnel",), required=False)
    if tunnel_t is not None:
        c.known_keys(
            tunnel_t,
            ("tunnel",),
            ("interface", "keepalive_s", "rekey_s", "mss_clamp", "answer_wait_us"),
        )
        t_values = {
            "interface": c.value(tunnel_t, ("tunnel", "interface"), _tun_name, default="sdwan0"),
            "keepalive_s": c.value(
                tunnel_t, ("tunnel", "keepalive_s"), _int_range(1, 3600), default=15
            ),
            "rekey_s": c.value(tunnel_t, ("tunnel", "rekey_s"), _int_range(10, 86400), default=600),
            "mss_clamp": c.value(tunnel_t, ("tunnel", "mss_clamp"), _boolean, default=True),
            "answer_wait_us": c.value(
                tunnel_t, ("tunnel", "answer_wait_us"), _int_range(0, 10000), default=200
            ),
        }
        if not any(v is _MISSING for v in t_values.values()):
            tunnel = Tunnel(**t_values)

    links = _check_links(c, doc)
    if links is not None and tunnel is not None:
        for i, link in enumerate(links):
            if link.interface == tunnel.interface:
                c.error(
                    ("links", i, "interface"),
                    f"expected a WAN device, got the tunnel interface {_show(link.interface)}",
                )
    peers = _check_peers(c, doc, site_id, links)
    pops = _check_pops(c, doc)
    cloud = _check_cloud(c, doc)
    appliance = _check_appliance(c, doc, base)
    _check_overlaps(c, doc)

    if c.issues:
        return None
    assert site and paths and pki and lan and tunnel and links is not None and peers is not None
    assert pops is not None and cloud is not None and appliance is not None
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
    )


_TOML_POS_RE = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)$")
_TOML_EOF_RE = re.compile(r"^(.*?)\s*\(at end of document\)$")


def read_toml(
    path: str | os.PathLike[str], what: str = "config file"
) -> tuple[Path, str, dict[str, Any]]:
    """Read a TOML file: (absolute path, text, document), or ConfigError saying where
    and why it cannot be read or parsed. `what` names the file in the messages."""
    source = Path(os.path.abspath(os.fspath(path)))

    def fail(message: str) -> ConfigError:
        return ConfigError(source, [ConfigIssue("", message)])

    try:
        text = source.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise fail(f"{what} not found") from None
    except IsADirectoryError:
        raise fail("expected a TOML file, got a directory") from None
    except PermissionError:
        raise fail(f"permission denied reading the {what}") from None
    except UnicodeDecodeError as exc:
        raise fail(f"expected UTF-8 text, got an invalid byte at offset {exc.start}") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror}") from None

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        pos = _TOML_POS_RE.match(msg)
        if pos:
            what_, line, col = pos.group(1), pos.group(2), pos.group(3)
            issue = f"line {line}, column {col}: invalid TOML: {what_}"
        else:
            eof = _TOML_EOF_RE.match(msg)
            issue = f"end of file: invalid TOML: {eof.group(1) if eof else msg}"
        raise fail(issue) from None
    return source, text, doc


def load_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate a bootstrap config; raise ConfigError listing every problem."""
    source, text, doc = read_toml(path)
    checker = _Checker(source, _LineIndex(text))
    config = _validate(doc, source, checker)
    if config is None:
        raise ConfigError(source, checker.issues)
    return config
