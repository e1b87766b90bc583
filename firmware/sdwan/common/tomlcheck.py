"""The TOML config engine: reading a file, located errors, and the checks every schema uses.

A schema module (site/config.py, pop/account.py, pop/config.py, appliance/ledmap.py) reads its
file with `read_toml`, walks the document with a `Checker` built on a `LineIndex` of the text,
records every problem with `Checker.error` (one pass finds them all) and raises `ConfigError`
at the end. Each issue names the file, the field path (`links[1].port`, indices from 0), what
was expected and, where it can be found, the line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_UNIX_SOCKET_PATH",
    "MISSING",
    "Checker",
    "ConfigError",
    "ConfigIssue",
    "IPNetwork",
    "LineIndex",
    "boolean",
    "check_networks",
    "check_pki_files",
    "endpoint_value",
    "expects",
    "fmt_loc",
    "format_endpoint",
    "format_ports",
    "ifname",
    "int_range",
    "matching",
    "network",
    "parse_endpoint",
    "path_string",
    "port_spec",
    "read_toml",
    "resolve_path",
    "show",
    "site_name",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
# The kernel rejects "", ".", "..", and names containing "/", ":" or whitespace.
_IFNAME_RE = re.compile(r"[^/:\s]{1,15}")


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
        raise ValueError(f"{expected}, got {show(text)}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{expected}, got {show(text)}")
        inner = host[1:-1]
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"{expected}, got {show(text)} ({show(inner)} is not an IPv6 address)"
            ) from None
    else:
        if ":" in host:
            # An IPv6 address without brackets is ambiguous about where the port starts.
            raise ValueError(f"{expected} (IPv6 needs brackets), got {show(text)}")
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{expected}, got {show(text)} ({show(host)} is not an IPv4 address;"
                " host names are not accepted)"
            ) from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{expected} with a port 1..65535, got {show(text)}")
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"expected a unicast address, got {show(text)}")
    return str(addr), int(port_text)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- line lookup

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")

_Key = tuple[str, int | None, str]


class LineIndex:
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
        """Line of the deepest part of `loc` (table, [index], key, ...) that can be found; a
        table may be dotted (`[[firewall.rules]]` for `firewall.rules[0].name`)."""
        if not loc or not isinstance(loc[0], str):
            return None
        for depth in range(len(loc), 1, -1):
            head = loc[:depth]
            if not all(isinstance(p, str) for p in head):
                continue
            dotted = ".".join(str(p) for p in head)
            index = loc[depth] if depth < len(loc) and isinstance(loc[depth], int) else None
            if (dotted, index) not in self.headers:
                continue
            rest = loc[depth + 1 :] if index is not None else loc[depth:]
            key = next((p for p in rest if isinstance(p, str)), None)
            line = self.keys.get((dotted, index, key)) if key is not None else None
            return line if line is not None else self.headers[(dotted, index)]
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


MISSING = object()


def show(value: Any) -> str:
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


def fmt_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class Checker:
    def __init__(self, source: Path, lines: LineIndex) -> None:
        self.source = source
        self.lines = lines
        self.issues: list[ConfigIssue] = []

    def error(self, loc: tuple[str | int, ...], message: str) -> None:
        self.issues.append(ConfigIssue(fmt_loc(loc), message, self.lines.find(loc)))

    # ---- tables

    def table(
        self, parent: Mapping[str, Any], loc: tuple[str | int, ...], *, required: bool
    ) -> dict[str, Any] | None:
        name = loc[-1]
        assert isinstance(name, str)
        value = parent.get(name, MISSING)
        if value is MISSING:
            if required:
                self.error(loc, f"missing required table [{fmt_loc(loc)}]")
                return None
            return {}
        if not isinstance(value, dict):
            self.error(loc, f"expected a table [{fmt_loc(loc)}], got {show(value)}")
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
        default: Any = MISSING,
    ) -> Any:
        """`table[loc[-1]]` checked, else the default, else MISSING (and an error recorded)."""
        key = loc[-1]
        assert isinstance(key, str)
        raw = table.get(key, MISSING)
        if raw is MISSING:
            if default is MISSING:
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
            return MISSING


# What each check expects, for "missing required field (expected ...)".
_EXPECTED: dict[Callable[[Any], Any], str] = {}


def expects(what: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    def register(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _EXPECTED[check] = what
        return check

    return register


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    @expects(f"an integer {lo}..{hi}")
    def check(value: Any) -> int:
        # bool is an int subclass in Python; `port = true` must not become port 1.
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"expected an integer {lo}..{hi}, got {show(value)}")
        return value

    return check


def number_range(lo: float, hi: float) -> Callable[[Any], float]:
    """A number (integer or decimal) within lo..hi, as a float."""

    @expects(f"a number {lo:g}..{hi:g}")
    def check(value: Any) -> float:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not lo <= value <= hi
        ):
            raise ValueError(f"expected a number {lo:g}..{hi:g}, got {show(value)}")
        return float(value)

    return check


@expects("true or false")
def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def matching(regex: re.Pattern[str], what: str) -> Callable[[Any], str]:
    @expects(what)
    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"expected {what}, got {show(value)}")
        return value

    return check


@expects("a network interface name of 1..15 characters")
def ifname(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not _IFNAME_RE.fullmatch(value)
        or value in (".", "..")
        or not value.isprintable()
    ):
        raise ValueError(
            "expected a network interface name of 1..15 characters without '/', ':' or spaces,"
            f" got {show(value)}"
        )
    return value


@expects("a printable string of 1..64 characters")
def site_name(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable():
        raise ValueError(f"expected a printable string of 1..64 characters, got {show(value)}")
    return value


@expects("a file path")
def path_string(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"expected a file path (non-empty string), got {show(value)}")
    return value


def network(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f'expected a network such as "10.1.0.0/24", got {show(value)}')
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f'expected a network such as "10.1.0.0/24" or "fd00:1::/64", got {show(value)}'
        ) from None
    raise ValueError(
        f'expected a network with the host bits zero, got {show(value)} (did you mean "{loose}"?)'
    )


_PORT_RANGE_RE = re.compile(r"(\d{1,5})-(\d{1,5})")


@expects('a port 1..65535 or a range "LOW-HIGH"')
def port_spec(value: Any) -> tuple[int, int]:
    """A port (an integer) or a range of ports ("8000-8080", both ends included) as (low, high)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= 65535:
            return value, value
        raise ValueError(f"expected a port 1..65535, got {value}")
    m = _PORT_RANGE_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f'expected a port 1..65535 or a range "LOW-HIGH", got {show(value)}')
    low, high = int(m.group(1)), int(m.group(2))
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise ValueError(f"expected a range of ports 1..65535, got {show(value)}")
    if low > high:
        raise ValueError(f"empty range {show(value)}: {low} is above {high}")
    return low, high


def format_ports(low: int, high: int) -> int | str:
    """The inverse of port_spec: 22, or "8000-8080"."""
    return low if low == high else f"{low}-{high}"


@expects('"IPv4:port" or "[IPv6]:port"')
def endpoint_value(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError(f'expected "IPv4:port" or "[IPv6]:port", got {show(value)}')
    return parse_endpoint(value)


# --------------------------------------------------------------------------- sections


def check_networks(
    c: Checker, table: Mapping[str, Any], loc: tuple[str | int, ...]
) -> tuple[IPNetwork, ...] | None:
    """The array of networks at loc (its last part names the field, e.g. "subnets")."""
    key = loc[-1]
    assert isinstance(key, str)
    raw = table.get(key, MISSING)
    if raw is MISSING:
        c.error(loc, "missing required field (expected an array of at least 1 network)")
        return None
    if not isinstance(raw, list) or not raw:
        c.error(loc, f"expected an array of at least 1 network, got {show(raw)}")
        return None
    nets: list[IPNetwork] = []
    ok = True
    for i, item in enumerate(raw):
        try:
            nets.append(network(item))
        except ValueError as exc:
            c.error((*loc, i), str(exc))
            ok = False
    return tuple(nets) if ok else None


def check_pki_files(c: Checker, doc: Mapping[str, Any], base: Path) -> dict[str, Path] | None:
    """The required [pki] table (ca, cert, key): readable files, or None after errors.
    Shared by the site's and the PoP's configuration."""
    pki_t = c.table(doc, ("pki",), required=True)
    if pki_t is None:
        return None
    c.known_keys(pki_t, ("pki",), ("ca", "cert", "key"))
    files: dict[str, Path] = {}
    for key in ("ca", "cert", "key"):
        text = c.value(pki_t, ("pki", key), path_string)
        if text is MISSING:
            continue
        path = resolve_path(base, text)
        if not path.exists():
            c.error(("pki", key), f"file not found: {path}")
        elif not path.is_file():
            c.error(("pki", key), f"expected a PEM file, got a directory or device: {path}")
        elif not os.access(path, os.R_OK):
            c.error(("pki", key), f"file not readable: {path}")
        else:
            files[key] = path
    return files if len(files) == 3 else None


def resolve_path(base: Path, text: str) -> Path:
    path = Path(text)
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


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


