"""popctl: the operator's command line over popd's control socket.

`popctl [--socket PATH] status|sites|events [--site N] [--limit N]|reload [--json]`. With --json
the result object is printed as popd sent it (field names in docs/popd.md); without it, a short
text for people, in which text from the sites (names, link names, versions, event texts,
reasons) shows control characters as escapes (common/visible.py). Exit status as socketctl:
0 success, 1 popd answered an error, 2 usage error, 3 popd could not be reached.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sdwan.common.certlife import describe as describe_cert
from sdwan.common.control import CommandFailed, ControlError, ControlUnreachable, request
from sdwan.common.ctrllanes import describe_lanes
from sdwan.common.visible import VisibleWriter, visible, visible_lines
from sdwan.pop.config import DEFAULT_POP_CONTROL_SOCKET
from sdwan.pop.looplag import status_text as looplag_text

EXIT_OK = 0
EXIT_COMMAND_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _nonzero(d: Any) -> str:
    if not isinstance(d, dict):
        return "-"
    items = [f"{_v(k)}={_v(v)}" for k, v in d.items() if v]
    return " ".join(items) or "none"


def _v(value: Any) -> str:
    """A value in a line for people: control characters shown as escapes, never sent raw."""
    return visible(value)


def _print_status(r: dict[str, Any], out: TextIO) -> None:
    acc = r.get("account", {})
    print(f"PoP {_v(r.get('pop_id'))} ({_v(r.get('name'))}) version {_v(r.get('version'))},"
          f" up {_v(r.get('uptime_s'))} s", file=out)
    print(f"listening on {_v(r.get('listen'))}, STUN on {_v(r.get('stun'))}", file=out)
    print(f"account {_v(acc.get('name'))} from {_v(acc.get('file'))}:"
          f" {_v(acc.get('sites'))} site(s), {len(acc.get('rules') or [])} rule(s),"
          f" loaded {_when(acc.get('loaded_at'))}", file=out)
    print(f"revoked certificates: {_v(acc.get('revoked'))}"
          f" (hash {_v(acc.get('revoked_hash'))}; the same on every PoP)", file=out)
    for rule in acc.get("rules") or []:
        if isinstance(rule, dict) and rule.get("note"):
            print(f"  rule {_v(rule.get('name'))}: {_v(rule['note'])}", file=out)
    if acc.get("error"):
        print("account file refused (previous account in force):", file=out)
        for line in str(acc["error"]).splitlines():
            print(f"  {_v(line)}", file=out)
    print(f"sites online {_v(r.get('sites_online'))}, sessions {_v(r.get('sessions'))},"
          f" handshaking {_v(r.get('handshaking'))}, directory rev {_v(r.get('rev'))}", file=out)
    loop = r.get("loop")
    if isinstance(loop, dict):
        print(looplag_text(loop), file=out)
    events = r.get("events")
    if isinstance(events, dict):
        print(f"event store: {_nonzero(events)}", file=out)
    link = r.get("link", {})
    print(f"udp: rx {_v(link.get('rx_packets'))} tx {_v(link.get('tx_packets'))} packets;"
          f" drops {_nonzero(link.get('drops'))}", file=out)
    control = {k: v for k, v in (r.get("control") or {}).items() if k != "dtls"}
    print(f"control: {_nonzero(control)}", file=out)
    print(f"control lanes: {_v(describe_lanes(r.get('control_lanes')))}", file=out)
    certs = r.get("certificates")
    if isinstance(certs, dict):
        for key, name in (("cert", "cert"), ("ca", "ca cert")):
            c = certs.get(key)
            if isinstance(c, dict):
                print(f"{name}: {describe_cert(c)}", file=out)
    stun = r.get("stun_server", {})
    print(f"stun: {_v(stun.get('answers'))} answered, dropped {_nonzero(stun.get('dropped'))}",
          file=out)
    for rej in r.get("rejections") or []:
        print(f"refused {_when(rej.get('at'))} {_v(rej.get('from'))}: {_v(rej.get('reason'))}",
              file=out)


def _rekey(timers: object) -> str:
    """The session's agreed rekey interval and key-age limit; "(announced none)": the site
    sent no timers (older firmware), the old fixed ones are assumed."""
    if not isinstance(timers, dict):
        return ""
    site = timers.get("site")
    none = " (announced none)" if isinstance(site, dict) and site.get("announced") is False else ""
    return f" rekey {_v(timers.get('rekey_s'))}s/{_v(timers.get('key_max_age_s'))}s{none}"


def _print_sites(r: dict[str, Any], out: TextIO) -> None:
    print(f"{'SITE':>5}  {'NAME':<16} {'ONLINE':<6} {'SUBNETS':<24} LINKS", file=out)
    for s in r.get("sites", []):
        links = ", ".join(
            f"{_v(x['link'])}(p{_v(x['precedence'])}) {_v(x['public'])}"
            f"{' mtu ' + _v(x['mtu']) if x.get('mtu') else ''}"
            f"{_rekey(x.get('timers'))}{' *' if x.get('routed') else ''}"
            f"{' serial ' + _v(x['serial']) if x.get('serial') else ''}"
            for x in s.get("sessions", [])
        ) or "-"
        subnets = ",".join(_v(n) for n in s["subnets"])
        print(f"{_v(s['site_id']):>5}  {_v(s['name']):<16} {'yes' if s['online'] else 'no':<6}"
              f" {subnets:<24} {links}", file=out)


def _print_events(r: dict[str, Any], out: TextIO) -> None:
    for e in r.get("events", []):
        site = f"site {_v(e['site_id'])}" if e.get("site_id") else "pop"
        print(f"{_when(e.get('ts'))}  {site:<10} {_v(e.get('kind')):<22} {_v(e.get('text'))}",
              file=out)


# What each command prints for people (the JSON goes out as it came).
PRINTERS = {"status": _print_status, "sites": _print_sites, "events": _print_events}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    p = argparse.ArgumentParser(prog="popctl", description="Query and control popd.")
    p.add_argument("--socket", default=str(DEFAULT_POP_CONTROL_SOCKET), help="control socket")
    p.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="the PoP, its account and counters")
    sub.add_parser("sites", parents=[common], help="the account's sites and their sessions")
    ev = sub.add_parser("events", parents=[common], help="events, newest first")
    ev.add_argument("--site", type=int, default=None, help="only events of site N")
    ev.add_argument("--limit", type=int, default=100)
    sub.add_parser("reload", parents=[common], help="load the account file again")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    req: dict[str, Any] = {}
    if args.command == "events":
        if args.site is not None:
            req["site"] = args.site
        req["limit"] = args.limit
    try:
        result = request(args.socket, args.command, timeout=args.timeout, **req)
    except ControlUnreachable as e:
        print(f"popctl: {visible(str(e).replace('socketd', 'popd'))}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as e:
        print(f"popctl: {visible(e)}", file=sys.stderr)
        return EXIT_COMMAND_FAILED
    except ControlError as e:
        print(f"popctl: {visible(e)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        json.dump(result, out, indent=2, sort_keys=True)
        print(file=out)
    if args.command == "reload" and not result.get("loaded", True):
        print(f"popctl: account file refused, the previous account stays in force:\n"
              f"{visible_lines(str(result.get('error')))}", file=sys.stderr)
        return EXIT_COMMAND_FAILED
    if args.json:
        return EXIT_OK
    # Whatever a printer forgot to pass through _v still reaches the terminal escaped.
    text = VisibleWriter(out)
    if args.command in PRINTERS:
        PRINTERS[args.command](result, text)
    else:
        print(f"account reloaded: changed {_v(result.get('changed'))}, removed"
              f" {_v(result.get('removed'))}, directory rev {_v(result.get('rev'))}", file=text)
        for note in result.get("notes") or []:
            print(f"  {_v(note)}", file=text)
        for ended in result.get("revoked_sessions") or []:
            if isinstance(ended, dict):
                print(f"  ended site {_v(ended.get('site_id'))} link {_v(ended.get('link'))}:"
                      f" certificate serial {_v(ended.get('serial'))} revoked", file=text)
    text.flush()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
