"""socketctl: the operator's command line over socketd's control socket.

`socketctl [--socket PATH] status|peers|pop|routes|rules|recovery|mesh|firewall|events|links|lan
[--json]`, `socketctl set-link LINK static ADDR/PREFIX GATEWAY | set-link LINK dhcp`, and
`socketctl renew` (a new certificate through the PoP). With --json the
result object is printed as socketd sent it (the field names are a stable interface, see
docs/socketctl.md); without it, a table for people, in which text from the network (names,
versions, event texts, reasons) shows control characters as escapes (common/visible.py; the
console prints the same tables). Exit status: 0 success, 1 socketd answered an error, 2 usage
error, 3 socketd could not be reached.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from sdwan.common.control import CommandFailed, ControlError, ControlUnreachable, request
from sdwan.common.visible import VisibleWriter, visible
from sdwan.site.config import DEFAULT_CONTROL_SOCKET

EXIT_OK = 0
EXIT_COMMAND_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_DASH = "-"


# --------------------------------------------------------------------------- formatting


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _DASH
    # Plain digits: the table stays easy to cut, awk and grep.
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bytes(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _DASH
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return _DASH  # unreachable; keeps type checkers content


def _duration(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return _DASH
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def _ago(seconds: Any) -> str:
    text = _duration(seconds)
    return text if text == _DASH else f"{text} ago"


def _text(value: Any) -> str:
    """A field for a table cell: control characters shown as escapes, never sent raw."""
    if value is None or value == "":
        return _DASH
    if isinstance(value, list):
        return ",".join(_text(v) for v in value) or _DASH
    return visible(value)


def _reason(value: Any) -> str:
    """A reason column: empty when there is none."""
    return visible(value) if value else ""


def _drops(drops: Any) -> str:
    """Non-zero drop counters as `reason=n`, the only ones an operator needs to see."""
    if not isinstance(drops, Mapping):
        return _DASH
    items = [f"{visible(k)}={_num(v)}" for k, v in sorted(drops.items()) if v]
    return " ".join(items) if items else "none"


def _drop_total(drops: Any) -> str:
    if not isinstance(drops, Mapping):
        return _DASH
    return _num(sum(v for v in drops.values() if isinstance(v, int) and not isinstance(v, bool)))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in (headers, *rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _visible_out(
    fmt: Callable[[Mapping[str, Any], TextIO], None],
) -> Callable[[Mapping[str, Any], TextIO], None]:
    """Every formatter writes through a VisibleWriter: a field not passed through _text still
    reaches the terminal with its control characters escaped (only line ends pass)."""

    @functools.wraps(fmt)
    def wrapper(result: Mapping[str, Any], out: TextIO) -> None:
        fmt(result, out if isinstance(out, VisibleWriter) else VisibleWriter(out))

    return wrapper


# --------------------------------------------------------------------------- commands


def _sources_line(sources: Mapping[str, Any], links: Any) -> str:
    """The allowed sources, and the packets dropped as spoofed over every link."""
    spoofed = 0
    for link in links if isinstance(links, list) else ():
        drops = link.get("drops") if isinstance(link, Mapping) else None
        n = drops.get("spoofed") if isinstance(drops, Mapping) else None
        if isinstance(n, int) and not isinstance(n, bool):
            spoofed += n
    text = (
        f"{_num(sources.get('prefixes'))} prefixes of {_num(sources.get('sites'))} sites,"
        f" {_num(spoofed)} spoofed dropped"
    )
    conflicts = sources.get("conflicts")
    if isinstance(conflicts, list) and conflicts:
        text += f", {_num(len(conflicts))} contested prefixes accepted from nobody"
    return text


@_visible_out
def format_status(result: Mapping[str, Any], out: TextIO) -> None:
    site = f"{_text(result.get('site_id'))} ({_text(result.get('name'))})"
    fields = [
        ("site", site),
        ("version", _text(result.get("version"))),
        ("uptime", _duration(result.get("uptime_s"))),
        ("tunnel", _text(result.get("tunnel_interface"))),
        ("peers", f"{_num(result.get('peers_up'))} up of {_num(result.get('peers_total'))}"),
        ("drops", _drops(result.get("drops"))),
    ]
    if isinstance(result.get("control"), Mapping):
        fields.append(("control", _drops(result["control"])))
    cloud = result.get("cloud")
    if isinstance(cloud, Mapping):
        text = _text(cloud.get("state"))
        if cloud.get("active_pop") is not None:
            text += f", PoP {_text(cloud.get('active_pop'))}"
            if cloud.get("on_secondary"):
                text += " (secondary)"
        if cloud.get("stale"):
            text += ", stale configuration (no PoP has answered since the start)"
        fields.append(("cloud", text))
    altwan = result.get("altwan")
    if isinstance(altwan, Mapping) and altwan.get("enabled"):
        fields.append(("alt-wan", f"{_num(altwan.get('peers_up'))} up of"
                                  f" {_num(altwan.get('peers'))} over {_text(altwan.get('link'))}"))
    recovery = result.get("recovery")
    if isinstance(recovery, Mapping):
        fields.append(("recovery", _recovery_line(recovery)))
    firewall = result.get("firewall")
    if isinstance(firewall, Mapping):
        fields.append(("firewall", _firewall_summary(firewall)))
    sources = result.get("sources")
    if isinstance(sources, Mapping):
        fields.append(("sources", _sources_line(sources, result.get("links"))))
    lan = result.get("lan")
    if isinstance(lan, Mapping) and lan.get("address"):
        fields.append(("lan", _lan_line(lan)))
    certs = result.get("certificates")
    if isinstance(certs, Mapping):
        for key, name in (("cert", "cert"), ("ca", "ca cert")):
            if isinstance(certs.get(key), Mapping):
                fields.append((name, _cert_line(certs[key])))
    clock = result.get("clock")
    if isinstance(clock, Mapping):
        fields.append(("clock", _clock_line(clock)))
    for name, value in fields:
        out.write(f"{name:<9}{value}\n" if len(name) < 9 else f"{name} {value}\n")

    links = result.get("links") or []
    out.write("\n")
    if not links:
        out.write("no links\n")
    else:
        rows = [
            [
                _text(link.get("name")),
                _text(link.get("interface")),
                _num(link.get("port")),
                _prec(link),
                _num(link.get("mtu")),
                _num(link.get("rx_packets")),
                _num(link.get("tx_packets")),
                _bytes(link.get("rx_bytes")),
                _bytes(link.get("tx_bytes")),
                _drops(link.get("drops")),
            ]
            for link in links
            if isinstance(link, Mapping)
        ]
        headers = ["LINK", "INTERFACE", "PORT", "PREC", "MTU", "RX PKTS", "TX PKTS"]
        _table([*headers, "RX BYTES", "TX BYTES", "DROPS"], rows, out)

    rejections = result.get("rejections") or []
    if rejections:
        out.write("\nrecent handshake rejections:\n")
        for item in rejections[-5:]:
            if not isinstance(item, Mapping):
                continue
            at = item.get("at")
            when = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
                if isinstance(at, int | float)
                else _DASH
            )
            src = item.get("from")
            if isinstance(src, list) and len(src) == 2:
                host, port = src
                src = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
            out.write(f"  {when}  {_text(src)}  {_text(item.get('reason'))}\n")

