"""popctl: the operator's command line over popd's control socket.

`popctl [--socket PATH] status|sites|events [--site N] [--limit N]|reload [--json]`. With --json
the result object is printed as popd sent it (field names in docs/popd.md); without it, a short
text for people. Exit status as socketctl: 0 success, 1 popd answered an error, 2 usage error,
3 popd could not be reached.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sdwan.common.control import CommandFailed, ControlError, ControlUnreachable, request
from sdwan.pop.config import DEFAULT_POP_CONTROL_SOCKET

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
    items = [f"{k}={v}" for k, v in d.items() if v]
    return " ".join(items) or "none"


def _print_status(r: dict[str, Any], out: TextIO) -> None:
    acc = r.get("account", {})
    print(f"PoP {r.get('pop_id')} ({r.get('name')}) version {r.get('version')},"
          f" up {r.get('uptime_s')} s", file=out)
    print(f"listening on {r.get('listen')}, STUN on {r.get('stun')}", file=out)
    print(f"account {acc.get('name')} from {acc.get('file')}: {acc.get('sites')} site(s),"
          f" {len(acc.get('rules') or [])} rule(s), loaded {_when(acc.get('loaded_at'))}",
          file=out)
    for rule in acc.get("rules") or []:
        if isinstance(rule, dict) and rule.get("note"):
            print(f"  rule {rule.get('name')}: {rule['note']}", file=out)
    if acc.get("error"):
        print("account file refused (previous account in force):", file=out)
        for line in str(acc["error"]).splitlines():
            print(f"  {line}", file=out)
    print(f"sites online {r.get('sites_online')}, sessions {r.get('sessions')},"
          f" handshaking {r.get('handshaking')}, directory rev {r.get('rev')}", file=out)
    link = r.get("link", {})
    print(f"udp: rx {link.get('rx_packets')} tx {link.get('tx_packets')} packets;"
          f" drops {_nonzero(link.get('drops'))}", file=out)
    control = {k: v for k, v in (r.get("control") or {}).items() if k != "dtls"}
    print(f"control: {_nonzero(control)}", file=out)
    stun = r.get("stun_server", {})
    print(f"stun: {stun.get('answers')} answered, dropped {_nonzero(stun.get('dropped'))}",
          file=out)
    for rej in r.get("rejections") or []:
        print(f"refused {_when(rej.get('at'))} {rej.get('from')}: {rej.get('reason')}", file=out)


def _print_sites(r: dict[str, Any], out: TextIO) -> None:
    print(f"{'SITE':>5}  {'NAME':<16} {'ONLINE':<6} {'SUBNETS':<24} LINKS", file=out)
    for s in r.get("sites", []):
        links = ", ".join(
            f"{x['link']}(p{x['precedence']}) {x['public']}"
            f"{' mtu ' + str(x['mtu']) if x.get('mtu') else ''}{' *' if x.get('routed') else ''}"
            for x in s.get("sessions", [])
        ) or "-"
        print(f"{s['site_id']:>5}  {s['name']:<16} {'yes' if s['online'] else 'no':<6}"
              f" {','.join(s['subnets']):<24} {links}", file=out)


def _print_events(r: dict[str, Any], out: TextIO) -> None:
    for e in r.get("events", []):
        site = f"site {e['site_id']}" if e.get("site_id") else "pop"
        print(f"{_when(e.get('ts'))}  {site:<10} {e.get('kind'):<22} {e.get('text')}", file=out)


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
        print(f"popctl: {str(e).replace('socketd', 'popd')}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as e:
        print(f"popctl: {e}", file=sys.stderr)
        return EXIT_COMMAND_FAILED
    except ControlError as e:
        print(f"popctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        json.dump(result, out, indent=2, sort_keys=True)
        print(file=out)
    if args.command == "reload" and not result.get("loaded", True):
        print(f"popctl: account file refused, the previous account stays in force:\n"
              f"{result.get('error')}", file=sys.stderr)
        return EXIT_COMMAND_FAILED
    if args.json:
        return EXIT_OK
    if args.command == "status":
        _print_status(result, out)
    elif args.command == "sites":
        _print_sites(result, out)
    elif args.command == "events":
        _print_events(result, out)
    else:
        print(f"account reloaded: changed {result.get('changed')}, removed"
              f" {result.get('removed')}, directory rev {result.get('rev')}", file=out)
        for note in result.get("notes") or []:
            print(f"  {note}", file=out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
