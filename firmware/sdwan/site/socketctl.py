"""socketctl: the operator's command line over socketd's control socket.

`socketctl [--socket PATH] status|peers|pop|routes|rules|recovery|mesh|firewall|events|links|lan
|slots [--json]`, `socketctl set-link LINK static ADDR/PREFIX GATEWAY | set-link LINK dhcp`,
`socketctl renew` (a new certificate through the PoP), `socketctl update BUNDLE [--reboot]`
(an A/B update, its progress followed) and `socketctl reboot`. With --json the
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

from sdwan.common.certlife import describe as describe_cert
from sdwan.common.control import CommandFailed, ControlError, ControlUnreachable, request
from sdwan.common.ctrllanes import describe_lanes
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


def _thread_name(t: Mapping[str, Any]) -> str:
    return "TUN thread" if t.get("thread") == "tun" else f"link {_text(t.get('link'))} thread"


def _fastpath_line(fp: Mapping[str, Any]) -> str:
    """`fastpath 3 of 3 threads running, 1 died and was restarted (last: link wan1 thread:
    poll failed: ...)`, or why it failed."""
    threads = [t for t in fp.get("threads") or [] if isinstance(t, Mapping)]
    running = sum(1 for t in threads if t.get("state") == "running")
    text = f"{running} of {len(threads)} threads running"
    if fp.get("failed"):
        return f"FAILED: {_text(fp['failed'])} ({text})"
    deaths = fp.get("deaths")
    if isinstance(deaths, int) and deaths:
        text += f", {deaths} died, {_num(fp.get('restarts'))} restarted"
        last = fp.get("last_death")
        if isinstance(last, Mapping):
            text += f" (last: {_thread_name(last)}: {_text(last.get('reason'))})"
    return text


def _slot_name(slot: Mapping[str, Any]) -> str:
    return f"{_text(slot.get('bootname'))} ({_text(slot.get('name'))})"


def _slots_line(u: Mapping[str, Any]) -> str:
    """`A booted good 1.0.0, B inactive good 2.0.1 (primary); reboot to start 2.0.1`."""
    if not u.get("enabled"):
        return "no A/B updates" + (f" ({_text(u['error'])})" if u.get("error") else "")
    parts = []
    for slot in u.get("slots") or []:
        if isinstance(slot, Mapping):
            primary = " (primary)" if slot.get("primary") else ""
            parts.append(f"{_text(slot.get('bootname'))} {_text(slot.get('state'))}"
                         f" {_text(slot.get('boot_status'))} {_text(slot.get('version'))}"
                         f"{primary}")
    text = ", ".join(parts) or "unknown"
    if u.get("error"):
        text += f"; {_text(u['error'])}"
    text += _update_notes(u)
    return text


def _update_notes(u: Mapping[str, Any]) -> str:
    text = ""
    commit = u.get("commit")
    if isinstance(commit, Mapping) and commit.get("state") == "pending":
        text += f"; pending commit: waiting for {_text(commit.get('waiting_for'))}"
    install = u.get("install")
    if isinstance(install, Mapping) and install.get("state") in ("checking", "installing"):
        text += f"; installing {_text(install.get('version'))} ({_num(install.get('percent'))}%)"
    waiting = u.get("reboot_needed")
    if isinstance(waiting, Mapping):
        text += (f"; {_text(waiting.get('version'))} installed into"
                 f" {_text(waiting.get('slot'))}: reboot to start it")
    return text


@_visible_out
def format_slots(result: Mapping[str, Any], out: TextIO) -> None:
    if not result.get("enabled"):
        out.write(f"{_slots_line(result)}\n")
        return
    rows = []
    for slot in result.get("slots") or []:
        if not isinstance(slot, Mapping):
            continue
        rows.append([
            _text(slot.get("name")), _text(slot.get("bootname")), _text(slot.get("state")),
            _text(slot.get("boot_status")), "yes" if slot.get("primary") else _DASH,
            _text(slot.get("version")), _text(slot.get("installed_at")),
            _text(slot.get("device")),
        ])
    if rows:
        _table(["SLOT", "BOOT", "STATE", "STATUS", "PRIMARY", "VERSION", "INSTALLED", "DEVICE"],
               rows, out)
    else:
        out.write("no slots known\n")
    for key in ("error", "read_error"):
        if result.get(key):
            out.write(f"error    {_text(result[key])}\n")
    commit = result.get("commit")
    if isinstance(commit, Mapping):
        state = commit.get("state")
        if state == "pending":
            text = (f"pending: {_text(commit.get('slot'))} is marked good once healthy,"
                    f" waiting for {_text(commit.get('waiting_for'))}")
            deadline = commit.get("deadline_s")
            if isinstance(deadline, int) and not isinstance(deadline, bool):
                text += f"; else rebooted {deadline} s after boot (the commit deadline)"
        elif state == "committed":
            text = f"{_text(commit.get('slot'))} is marked good"
        else:
            text = f"unknown: {_text(commit.get('waiting_for'))}"
        out.write(f"commit   {text}\n")
    waiting = result.get("reboot_needed")
    if isinstance(waiting, Mapping):
        out.write(f"reboot   needed: {_text(waiting.get('version'))} is installed into"
                  f" {_text(waiting.get('slot'))} and starts at the next reboot\n")
    install = result.get("install")
    if isinstance(install, Mapping) and install.get("state") not in (None, "idle"):
        text = f"{_text(install.get('state'))} {_text(install.get('bundle'))}"
        if install.get("version"):
            text += f" (version {_text(install['version'])})"
        if install.get("state") in ("checking", "installing"):
            text += f", {_num(install.get('percent'))}% {_text(install.get('message'))}"
        if install.get("error"):
            text += f": {_text(install['error'])}"
        out.write(f"install  {text}\n")
    rollback = result.get("rollback")
    if isinstance(rollback, Mapping):
        out.write(f"rollback {_text(rollback.get('slot'))} (version"
                  f" {_text(rollback.get('version'))}) was abandoned:"
                  f" {_text(rollback.get('why'))}\n")


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
    if isinstance(result.get("control_lanes"), Mapping):
        fields.append(("control lanes", visible(describe_lanes(dict(result["control_lanes"])))))
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
                fields.append((name, describe_cert(certs[key])))
    clock = result.get("clock")
    if isinstance(clock, Mapping):
        fields.append(("clock", _clock_line(clock)))
    fastpath = result.get("fastpath")
    if isinstance(fastpath, Mapping):
        fields.append(("fastpath", _fastpath_line(fastpath)))
    slots = result.get("slots")
    if isinstance(slots, Mapping) and slots.get("enabled"):
        fields.append(("slots", _slots_line(slots)))
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


def _rekey(timers: object) -> str:
    """The agreed rekey interval and key-age limit, "600s/1260s"; "(peer: none)": the peer
    announced none (older firmware), the old fixed ones are assumed."""
    if not isinstance(timers, Mapping):
        return _DASH
    peer = timers.get("peer")
    none = " (peer: none)" if isinstance(peer, Mapping) and peer.get("announced") is False else ""
    return f"{_num(timers.get('rekey_s'))}s/{_num(timers.get('key_max_age_s'))}s{none}"


def _clock_line(clock: Mapping[str, Any]) -> str:
    text = _text(clock.get("now"))
    moved = clock.get("moved_at_boot")
    if isinstance(moved, Mapping):
        text += (f" (was {_text(moved.get('was'))} at boot, moved forward to"
                 f" {_text(moved.get('source'))})")
    sync = clock.get("sync")
    if isinstance(sync, Mapping):
        if sync.get("synced"):
            offset = sync.get("offset_s")
            off = f", {offset:+.3f} s off" if isinstance(offset, int | float) else ""
            text += (f", synchronised to {_text(sync.get('reference'))}"
                     f" (stratum {_num(sync.get('stratum'))}{off})")
        elif sync.get("servers"):
            text += f", not synchronised: {_text(sync.get('why'))}"
        else:
            text += ", no time sync ([time] servers)"
    return text


@_visible_out
def format_peers(result: Mapping[str, Any], out: TextIO) -> None:
    peers = result.get("peers") or []
    if not peers:
        out.write("no peers configured\n")
        return
    rows = []
    for peer in peers:
        if not isinstance(peer, Mapping):
            continue
        if peer.get("transport") == "cloud":
            state = _text(peer.get("state"))
            rows.append(
                [
                    _text(peer.get("site_id")),
                    state,
                    _text(peer.get("endpoint")),
                    _text(peer.get("link")),
                    "cloud",
                    _num(peer.get("mtu")),
                    _DASH,
                    _DASH,
                    _DASH,
                    _DASH,
                    _DASH,
                    _DASH,
                    _DASH,
                    _reason(peer.get("reason")) if state != "up" else "",
                ]
            )
            continue
        state = _text(peer.get("state"))
        # An up tunnel may still carry the reason of its last transition; it is noise then.
        reason = _reason(peer.get("reason")) if state != "up" else ""
        rows.append(
            [
                _text(peer.get("site_id")),
                state,
                _text(peer.get("endpoint")),
                _text(peer.get("link")),
                _text(peer.get("transport") or "direct"),
                _num(peer.get("mtu")),
                _text(peer.get("role")),
                _rekey(peer.get("timers")),
                _ago(peer.get("last_handshake_s")),
                _ago(peer.get("last_rx_s")),
                _num(peer.get("rx_packets")),
                _num(peer.get("tx_packets")),
                _drop_total(peer.get("drops")),
                reason,
            ]
        )
    headers = ["SITE", "STATE", "ENDPOINT", "LINK", "VIA", "MTU", "ROLE", "REKEY", "HANDSHAKE",
               "LAST RX"]
    _table([*headers, "RX PKTS", "TX PKTS", "DROPS", "REASON"], rows, out)


@_visible_out
def format_pop(result: Mapping[str, Any], out: TextIO) -> None:
    state = _text(result.get("state"))
    if state == "off":
        out.write("no PoPs configured\n")
        return
    active = _text(result.get("active_pop"))
    role = "secondary" if result.get("on_secondary") else "primary"
    out.write(f"cloud    {state}, active PoP {active} ({role})\n")
    if result.get("stale"):
        out.write("config   stale: the stored copy, no PoP has answered since the start\n")
    out.write(
        f"config   rev {_text(result.get('config_rev'))}, directory rev "
        f"{_text(result.get('directory_rev'))}, {_num(result.get('sites'))} other sites\n"
    )
    messages = result.get("messages")
    count = messages.get("refused_prefixes") if isinstance(messages, Mapping) else None
    if count:
        out.write(f"refused  {_num(count)} prefixes of the directory, never routed:\n")
        for r in result.get("refused_prefixes") or []:
            if isinstance(r, Mapping):
                out.write(
                    f"  site {_text(r.get('site_id'))} {_text(r.get('prefix'))}:"
                    f" {_text(r.get('reason'))}\n"
                )
    out.write("\n")
    rows = []
    for s in result.get("sessions") or []:
        if not isinstance(s, Mapping):
            continue
        rtt = s.get("rtt_ms")
        rows.append(
            [
                _text(s.get("pop_id")),
                _text(s.get("role")) + ("*" if s.get("active") else ""),
                _text(s.get("endpoint")),
                _text(s.get("link")),
                _text(s.get("state")),
                _text(s.get("public")),
                f"{rtt:g} ms" if isinstance(rtt, int | float) else _DASH,
                _num(s.get("mtu")),
                _rekey(s.get("timers")),
                _ago(s.get("last_seen_s")),
                _reason(s.get("reason")) if s.get("state") != "connected" else "",
            ]
        )
    headers = ["POP", "ROLE", "ENDPOINT", "LINK", "STATE", "PUBLIC", "RTT", "MTU", "REKEY",
               "LAST SEEN"]
    _table([*headers, "REASON"], rows, out)


@_visible_out
def format_events(result: Mapping[str, Any], out: TextIO) -> None:
    events = result.get("events") or []
    if not events:
        out.write("no events\n")
        return
    for ev in events:
        if not isinstance(ev, Mapping):
            continue
        ts = ev.get("ts")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
            if isinstance(ts, int | float)
            else _DASH
        )
        out.write(f"{when}  {_text(ev.get('kind')):<16}  {_text(ev.get('text'))}\n")


def _prec(link: Mapping[str, Any]) -> str:
    """A link's precedence, or what it is instead (an Alt-WAN link has none)."""
    return "alt-wan" if link.get("altwan") else _num(link.get("precedence"))


def _link_detail(link: Mapping[str, Any]) -> str:
    if link.get("error"):
        return f"error: {_text(link['error'])}"
    dhcp = link.get("dhcp")
    if isinstance(dhcp, Mapping):
        text = f"dhcp {_text(dhcp.get('state'))}"
        if dhcp.get("server"):
            text += f" from {_text(dhcp['server'])}"
        if dhcp.get("lease_s") is not None:
            text += f", lease {_duration(dhcp.get('lease_s'))}"
        return text
    return ""


def _health(link: Mapping[str, Any]) -> str:
    h = link.get("health")
    if not isinstance(h, Mapping):
        return ""
    return _text(h.get("state"))


def _figures(link: Mapping[str, Any]) -> str:
    h = link.get("health")
    if not isinstance(h, Mapping) or not h.get("samples"):
        return _DASH
    parts = []
    for key, unit in (("loss_pct", "%"), ("jitter_ms", "ms"), ("latency_ms", "ms")):
        v = h.get(key)
        if isinstance(v, int | float):
            parts.append(f"{v:g}{unit}")
        else:
            parts.append("-")
    return "/".join(parts)


def _uses(link: Mapping[str, Any], steering: Any) -> str:
    """Which traffic the link carries now, with its share when links share it."""
    if not isinstance(steering, Mapping):
        return ""
    out = []
    for kind, label in (("cloud", "cloud"), ("offcloud", "mesh")):
        entry = steering.get(kind)
        weights = entry.get("links") if isinstance(entry, Mapping) else None
        if not isinstance(weights, Mapping):
            continue
        w = weights.get(link.get("name"))
        if isinstance(w, int) and w > 0:
            total = sum(v for v in weights.values() if isinstance(v, int)) or 1
            out.append(label if w == total else f"{label}:{100 * w // total}%")
    return ",".join(out) or _DASH


@_visible_out
def format_links(result: Mapping[str, Any], out: TextIO) -> None:
    links = result.get("links") or []
    if not links:
        out.write("no links\n")
        return
    steering = result.get("steering")
    rows = [
        [
            _text(link.get("name")),
            _text(link.get("interface")),
            _text(link.get("state")),
            _health(link),
            _figures(link),
            _uses(link, steering),
            _text(link.get("addressing")),
            _text(link.get("address")),
            _text(link.get("gateway")),
            _prec(link),
            _link_detail(link),
        ]
        for link in links
        if isinstance(link, Mapping)
    ]
    headers = ["LINK", "INTERFACE", "STATE", "HEALTH", "LOSS/JIT/LAT", "CARRIES", "ADDRESSING",
               "ADDRESS", "GATEWAY", "PREC", "DETAIL"]
    _table(headers, rows, out)
    why = [
        (link.get("name"), link["health"].get("reason"))
        for link in links
        if isinstance(link, Mapping) and isinstance(link.get("health"), Mapping)
        and link["health"].get("reason")
    ]
    for name, reason in why:
        out.write(f"{_text(name)}: {_text(reason)}\n")
    if isinstance(steering, Mapping):
        for kind in ("cloud", "offcloud"):
            entry = steering.get(kind)
            if isinstance(entry, Mapping) and entry.get("moved_s") is not None:
                out.write(f"{kind} traffic last moved {_duration(entry.get('moved_s'))} ago:"
                          f" {_text(entry.get('why'))}\n")


@_visible_out
def format_routes(result: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"policy   {_text(result.get('policy'))}\n\n")
    rows = []
    for r in result.get("routes") or []:
        if not isinstance(r, Mapping):
            continue
        peer = r.get("peer_id")
        rows.append(
            [
                _text(r.get("prefix")),
                # A PoP session's, an Alt-WAN tunnel's or a peer group's id (0x8..., 0x4...,
                # 0x2...) reads in hex.
                f"{peer:#x}" if isinstance(peer, int) and peer >= 1 << 29 else _text(peer),
                _text(r.get("transport")),
                _text(r.get("producer")),
                ("" if r.get("installed") else "NOT INSTALLED: ") + _text(r.get("why")),
            ]
        )
    if rows:
        _table(["PREFIX", "PEER", "VIA", "FROM", "WHY"], rows, out)
    else:
        out.write("no routes\n")
    unused = [u for u in result.get("unused") or [] if isinstance(u, Mapping)]
    if unused:
        out.write("\nnot used:\n")
        for u in unused:
            out.write(
                f"  {_text(u.get('prefix'))} via {_text(u.get('transport'))}"
                f" ({_text(u.get('producer'))}): {_text(u.get('reason'))}\n"
            )


def _rule_match(r: Mapping[str, Any]) -> str:
    proto = _text(r.get("protocol"))
    ports = ",".join(
        str(p[0]) if p[0] == p[1] else f"{p[0]}-{p[1]}"
        for p in r.get("ports") or []
        if isinstance(p, list) and len(p) == 2
    )
    return f"{proto} {ports}" if ports else proto


@_visible_out
def format_rules(result: Mapping[str, Any], out: TextIO) -> None:
    rows = []
    notes = []
    for r in result.get("rules") or []:
        if not isinstance(r, Mapping):
            continue
        transport = _text(r.get("transport"))
        if r.get("secondary"):
            transport += f" (else {r['secondary']})"
        if r.get("complex"):
            notes.append(f"  {_text(r.get('name'))}: {_text(r.get('note'))}")
        rows.append(
            [
                _text(r.get("index")),
                _text(r.get("name")) + (" *" if r.get("complex") else ""),
                transport,
                _rule_match(r),
                _text(r.get("src")) if r.get("src") else "any",
                _text(r.get("dst")) if r.get("dst") else "any",
                _num(r.get("hits")),
                _text(r.get("now")),
            ]
        )
    if rows:
        _table(["#", "NAME", "TRANSPORT", "MATCH", "FROM", "TO", "HITS", "NOW"], rows, out)
    else:
        out.write("no rules\n")
    if notes:
        out.write("\n* complex:\n" + "\n".join(notes) + "\n")
    if result.get("error"):
        out.write(f"\nnot taken: {result['error']}\n")
    drops = result.get("drops")
    if isinstance(drops, int) and drops:
        out.write(f"\ndropped while the off-cloud path was down: {drops}\n")


@_visible_out
def format_mesh(result: Mapping[str, Any], out: TextIO) -> None:
    if not result.get("enabled"):
        out.write("mesh off ([mesh] enabled = false)\n")
        return
    out.write(
        f"peers    {_num(result.get('peers'))} ({_num(result.get('peers_up'))} direct)\n\n"
    )
    rows = []
    for p in result.get("paths") or []:
        if not isinstance(p, Mapping):
            continue
        state = _text(p.get("state"))
        rtt = p.get("rtt_ms")
        rows.append(
            [
                _text(p.get("site_id")),
                _text(p.get("name")),
                _text(p.get("link")),
                state,
                _text(p.get("endpoint")),
                _text(p.get("how")),
                f"{_text(p.get('nat'))}/{_text(p.get('peer_nat'))}",
                f"{rtt} ms" if isinstance(rtt, (int, float)) else _DASH,
                _num(p.get("mtu")),
                _ago(p.get("last_rx_s")),
                "" if state == "direct" else _reason(p.get("reason")),
            ]
        )
    if rows:
        headers = ["SITE", "NAME", "LINK", "STATE", "ENDPOINT", "HOW", "NAT (OURS/PEER)", "RTT"]
        _table([*headers, "MTU", "LAST RX", "REASON"], rows, out)
    else:
        out.write("no mesh peers yet (the PoP brokers them)\n")


def _recovery_line(r: Mapping[str, Any]) -> str:
    if not r.get("enabled"):
        return "disabled for this site in the account (or no PoP configured)"
    if r.get("active"):
        text = f"ACTIVE for {_duration(r.get('since_s'))}: {_text(r.get('reason'))}"
        if r.get("returning_in_s") is not None:
            text += f"; back to the cloud in {_duration(r.get('returning_in_s'))}"
        return text
    lost = r.get("lost_sites") or []
    if lost:
        return "ready; sites the PoP cannot reach go over Alt-WAN or the mesh: " + ", ".join(
            _text(s) for s in lost
        )
    return "ready (not active)"


@_visible_out
def format_recovery(result: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"recovery {_recovery_line(result)}\n")
    out.write(f"hold     {_duration(result.get('hold_s'))}\n\n")
    rows = []
    for s in result.get("sites") or []:
        if not isinstance(s, Mapping):
            continue
        ready = s.get("ready_why")
        rows.append(
            [
                _text(s.get("site_id")),
                _text(s.get("name")),
                _text(s.get("state")),
                # Over what recovery would carry it now: alt-wan, mesh, or no.
                _text(s.get("ready_via") or "yes") if s.get("ready") else "no",
                "" if ready is None else _text(ready),
            ]
        )
    if rows:
        _table(["SITE", "NAME", "TRAFFIC", "READY", "WHY NOT"], rows, out)
    else:
        out.write("no other sites known (the PoP's directory lists them)\n")


def _firewall_summary(fw: Mapping[str, Any]) -> str:
    state = _text(fw.get("state"))
    if state == "none":
        return "no policy received yet (the kernel's forwarding is left as it is)"
    text = (
        f"{state}, {_num(fw.get('rule_count'))} rule(s), default {_text(fw.get('default'))},"
        f" rev {_text(fw.get('rev'))}"
    )
    if fw.get("error"):
        text += f": {fw['error']}"
    return text


def _match(values: Any) -> str:
    return "any" if values is None else _text(values)


@_visible_out
def format_firewall(result: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"firewall {_firewall_summary(result)}\n")
    if result.get("state") == "none":
        return
    if result.get("in_kernel") is False:
        out.write(f"kernel   table {_text(result.get('table'))} is missing\n")
    if result.get("counters_error"):
        out.write(f"counters not read: {result['counters_error']}\n")
    out.write("\n")
    rows = []
    for i, r in enumerate(result.get("rules") or [], start=1):
        if not isinstance(r, Mapping):
            continue
        proto = _text(r.get("protocol"))
        if r.get("ports") is not None:
            proto += f" {_text(r.get('ports'))}"
        rows.append(
            [
                str(i),
                _text(r.get("name")),
                _text(r.get("action")),
                _match(r.get("src")),
                _match(r.get("dst")),
                proto,
                _num(r.get("packets")),
                _bytes(r.get("bytes")),
            ]
        )
    for label, key in (("default", "default_counter"), ("invalid", "invalid_counter")):
        counter = result.get(key) if isinstance(result.get(key), Mapping) else {}
        action = _text(result.get("default")) if label == "default" else "deny"
        rows.append(
            [
                _DASH,
                f"({label})",
                action,
                "any",
                "any",
                "any" if label == "default" else "invalid state",
                _num(counter.get("packets")),
                _bytes(counter.get("bytes")),
            ]
        )
    headers = ["#", "RULE", "ACTION", "SOURCE", "DESTINATION", "PROTOCOL", "PACKETS", "BYTES"]
    _table(headers, rows, out)


def _lan_line(lan: Mapping[str, Any]) -> str:
    """The LAN port in one line: its address, device, and its DHCP server's state."""
    text = f"{_text(lan.get('address'))} on {_text(lan.get('interface'))}"
    if lan.get("address_error"):
        return f"{text}, error: {_text(lan['address_error'])}"
    dhcp = lan.get("dhcp")
    state = dhcp.get("state") if isinstance(dhcp, Mapping) else dhcp
    return f"{text}, DHCP {_text(state)}"


def _expires(lease: Mapping[str, Any]) -> str:
    if lease.get("expired"):
        return "expired"
    return _duration(lease.get("expires_s"))


@_visible_out
def format_lan(result: Mapping[str, Any], out: TextIO) -> None:
    address = result.get("address")
    port = f"{_text(result.get('interface'))} ({_text(result.get('state'))})"
    if address:
        out.write(f"address  {_text(address)} on {port}\n")
        if result.get("address_error"):
            out.write(f"error    {_text(result['address_error'])}\n")
    else:
        seen = _text(result.get("addresses"))
        out.write(f"address  not set by socketd ([lan] address); on {port}: {seen}\n")
    out.write(f"subnets  {_text(result.get('subnets'))}\n")
    dhcp = result.get("dhcp")
    if not isinstance(dhcp, Mapping) or not dhcp.get("enabled"):
        out.write("dhcp     off\n")
        return
    state = _text(dhcp.get("state"))
    if dhcp.get("pid") is not None:
        state += f", pid {_num(dhcp.get('pid'))}, up {_duration(dhcp.get('up_s'))}"
    if dhcp.get("restarts"):
        state += f", {_num(dhcp.get('restarts'))} restarts"
    out.write(f"dhcp     {state}\n")
    if dhcp.get("error"):
        retry = dhcp.get("retry_in_s")
        again = f" (again in {_duration(retry)})" if retry is not None else ""
        out.write(f"why      {_text(dhcp['error'])}{again}\n")
    rng = dhcp.get("range")
    if isinstance(rng, list) and len(rng) == 2:
        out.write(f"range    {_text(rng[0])} - {_text(rng[1])}\n")
    out.write(
        f"router   {_text(dhcp.get('router'))}, dns {_text(dhcp.get('dns'))},"
        f" lease {_duration(dhcp.get('lease_s'))}\n"
    )
    if dhcp.get("leases_error"):
        out.write(f"leases   {_text(dhcp['leases_error'])}\n")
    out.write("\n")
    leases = [le for le in dhcp.get("leases") or [] if isinstance(le, Mapping)]
    held = {le.get("mac") for le in leases}
    rows = [
        [
            _text(le.get("ip")),
            _text(le.get("mac")),
            _text(le.get("hostname")),
            "static" if le.get("static") else "dynamic",
            _expires(le),
        ]
        for le in leases
    ]
    # Static leases no host holds yet are listed too: the field engineer looks for them.
    for s in dhcp.get("static") or []:
        if isinstance(s, Mapping) and s.get("mac") not in held:
            rows.append(
                [_text(s.get("ip")), _text(s.get("mac")), _text(s.get("name")), "static", _DASH]
            )
    if not rows:
        out.write("no leases\n")
        return
    _table(["IP", "MAC", "HOSTNAME", "KIND", "EXPIRES IN"], rows, out)


@_visible_out
def format_set_link(result: Mapping[str, Any], out: TextIO) -> None:
    """set-link answers with the link's new `links` entry."""
    format_links({"links": [result]}, out)


FORMATTERS: dict[str, Callable[[Mapping[str, Any], TextIO], None]] = {
    "status": format_status,
    "peers": format_peers,
    "pop": format_pop,
    "routes": format_routes,
    "rules": format_rules,
    "mesh": format_mesh,
    "recovery": format_recovery,
    "firewall": format_firewall,
    "events": format_events,
    "links": format_links,
    "lan": format_lan,
    "slots": format_slots,
}


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socketctl", description="Query a running socketd over its control socket."
    )
    parser.add_argument(
        "--socket",
        default=str(DEFAULT_CONTROL_SOCKET),
        metavar="PATH",
        help=f"control socket of socketd (default {DEFAULT_CONTROL_SOCKET})",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="seconds to wait (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    helps = {
        "status": "site, uptime, links and their counters",
        "peers": "the other sites: direct tunnels (state, endpoint, traffic) and cloud sites",
        "pop": "sessions to the PoPs per link: state, RTT, last seen, reason when down",
        "routes": "which peer and transport carries each prefix, and why",
        "rules": "the off-cloud transport rules: what each matches, its hits, its transport now",
        "mesh": "direct tunnels to the other sites: per peer and link, how found, why not",
        "recovery": "WAN recovery: active or not and why, per site where its traffic goes",
        "firewall": "the LAN firewall: rules in order with their counters, default, state",
        "events": "stored events, newest first",
        "links": "WAN links: device state, addressing (none, static, dhcp), address, gateway",
        "lan": "the LAN port: its address, the DHCP server (state, range) and its leases",
        "slots": "the A/B slots: versions, booted, good, primary, a commit pending and why",
    }
    for name in FORMATTERS:
        sub = commands.add_parser(name, help=helps[name], description=helps[name])
        # Accepted after the command as well; SUPPRESS keeps an earlier --json from being reset.
        sub.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
        )
        if name == "events":
            sub.add_argument("--limit", type=int, default=50, help="at most N events (50)")
            sub.add_argument("--kind", default=None, help="only events of this kind")
    set_help = "set a link's addressing (saved in the data directory, applied at once)"
    sub = commands.add_parser(
        "set-link",
        help=set_help,
        description=set_help,
        usage="socketctl set-link LINK static ADDR/PREFIX GATEWAY | set-link LINK dhcp",
    )
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    sub.add_argument("link", help="link name, e.g. wan1")
    sub.add_argument("mode", choices=("static", "dhcp"))
    sub.add_argument("values", nargs="*", metavar="ADDR/PREFIX GATEWAY")
    renew_help = "ask the PoP for a new certificate now (it is asked by itself 30 days ahead)"
    sub = commands.add_parser("renew", help=renew_help, description=renew_help)
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    update_help = ("install an A/B update bundle into the slot not running (its progress"
                   " shown); it starts at the next reboot, which only --reboot brings")
    sub = commands.add_parser("update", help=update_help, description=update_help)
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    sub.add_argument("bundle", help="the bundle file (.raucb) on this box")
    sub.add_argument("--reboot", action="store_true",
                     help="reboot into the new slot once it is installed")
    reboot_help = "reboot the box now (into the primary slot: a new one after an update)"
    sub = commands.add_parser("reboot", help=reboot_help, description=reboot_help)
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    return parser


UPDATE_POLL_S = 0.5
# socketd answers an update at once after its checks (rauc info reads the whole bundle).
UPDATE_CHECK_TIMEOUT_S = 300.0


def follow_update(
    sock: str, bundle: str, reboot: bool, out: TextIO | None, *, origin: str = "socketctl",
    timeout: float = 5.0, poll_s: float = UPDATE_POLL_S,
) -> dict[str, Any]:
    """Ask socketd to install `bundle` and print its progress lines as they come; the last
    state. CommandFailed carries a refusal (nothing written); ControlError as `request`."""
    path = os.path.abspath(bundle)
    begun = request(sock, "update", timeout=max(timeout, UPDATE_CHECK_TIMEOUT_S), bundle=path,
                    reboot=reboot, origin=origin)
    version = begun.get("version")
    if out is not None:
        out.write(f"installing {visible(path)}"
                  f"{' (version ' + visible(version) + ')' if version else ''}"
                  f" into {_text(begun.get('slot'))}\n")
        out.flush()
    seen = int(begun.get("seq") or 0)
    while True:
        st = request(sock, "update-status", timeout=timeout, since=seen)
        if st.get("started_at") != begun.get("started_at"):
            # Not this install any more: socketd started again meanwhile (which stopped it),
            # and what it says now is idle, or another install.
            return {**begun, "state": "failed", "progress": [],
                    "error": "socketd was restarted during the install, which stopped it"
                             " (the slot being written is not booted): start the update again"}
        for line in st.get("progress") or []:
            if isinstance(line, Mapping) and isinstance(line.get("seq"), int):
                seen = max(seen, line["seq"])
                if out is not None:
                    out.write(f"{_num(line.get('percent')):>4}%"
                              f" {_text(line.get('message'))}\n")
        if out is not None:
            out.flush()
        if st.get("state") not in ("checking", "installing"):
            return st
        time.sleep(poll_s)


EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


def _update(args: argparse.Namespace) -> int:
    try:
        st = follow_update(args.socket, args.bundle, args.reboot,
                           None if args.json else VisibleWriter(sys.stdout),
                           timeout=args.timeout)
    except KeyboardInterrupt:
        # Only the following stops: socketd checks and installs on by itself.
        print("\nsocketctl: update: interrupted; the install goes on in socketd (socketctl"
              " slots tells how it ends)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
    if st.get("state") != "installed":
        print(f"socketctl: update: {visible(st.get('error') or st.get('state'))}",
              file=sys.stderr)
        return EXIT_COMMAND_FAILED
    if st.get("error"):  # installed, but the reboot asked for failed
        print(f"socketctl: update: {visible(st['error'])}; it starts at the next reboot",
              file=sys.stderr)
        return EXIT_COMMAND_FAILED
    if not args.json:
        reboot = ("rebooting into it" if st.get("reboot")
                  else "it starts at the next reboot (socketctl reboot)")
        print(f"installed {_text(st.get('version'))} into {_text(st.get('slot'))}: {reboot}")
    return EXIT_OK


def format_reboot(result: Mapping[str, Any], out: TextIO) -> None:
    out.write("rebooting\n")


def format_renew(result: Mapping[str, Any], out: TextIO) -> None:
    out.write("renewal asked of the PoP: `socketctl events --kind cert.renewed` tells when the "
              "new certificate is in use\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    timeout = args.timeout
    try:
        extra: dict[str, Any] = {}
        if args.command == "events":
            extra["limit"] = args.limit
            if args.kind is not None:
                extra["kind"] = args.kind
        if args.command == "set-link":
            wanted = 2 if args.mode == "static" else 0
            if len(args.values) != wanted:
                parser.error(
                    "set-link LINK static needs ADDR/PREFIX and GATEWAY"
                    if wanted
                    else "set-link LINK dhcp takes nothing more"
                )
            extra = {"link": args.link, "mode": args.mode, "origin": "socketctl"}
            if wanted:
                extra["address"], extra["gateway"] = args.values
            # Applying runs a configuration worker (and stops a DHCP client) first.
            timeout = max(timeout, 40.0)
        if args.command == "update":
            return _update(args)
        if args.command == "reboot":
            extra = {"origin": "socketctl"}
        result = request(args.socket, args.command, timeout=timeout, **extra)
    except ControlUnreachable as exc:
        print(f"socketctl: {visible(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as exc:
        print(f"socketctl: {args.command}: {visible(exc)}", file=sys.stderr)
        return EXIT_COMMAND_FAILED
    except ControlError as exc:
        print(f"socketctl: {visible(exc)}", file=sys.stderr)
        return EXIT_COMMAND_FAILED
    try:
        if args.json:
            json.dump(result, sys.stdout, indent=2, sort_keys=False)
            sys.stdout.write("\n")
        else:
            {"renew": format_renew, "reboot": format_reboot}.get(args.command) or FORMATTERS.get(
                args.command, format_set_link)(result, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # `socketctl peers | head` is normal use, not an error worth a traceback; pointing
        # stdout at /dev/null stops the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
