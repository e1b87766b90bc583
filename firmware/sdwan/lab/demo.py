"""`socket-lab demo`: two sites behind NAT routers, a tunnel between them, real traffic.

The demo is a list of steps run in order on a shared `DemoContext`, each printing what it
does; later issues insert steps (the PoP, a cloud outage) without reshaping the rest. The
exit status is 0 only if traffic flowed through the tunnel (ping and iperf3 from lan1 to
lan2); the lab is torn down whatever happens, including Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sdwan.lab.netns import NetnsError
from sdwan.lab.topology import Lab, Site


class DemoFailed(Exception):
    """A step could not do its job; the message says what and why."""


@dataclass
class DemoOptions:
    tunnel_timeout_s: float = 60.0
    iperf_seconds: float = 5.0
    workdir: Path | None = None
    nat: str = "masquerade"


@dataclass
class DemoContext:
    lab: Lab
    opts: DemoOptions
    sites: list[Site] = field(default_factory=list)
    traffic_ok: bool = False
    results: dict[str, Any] = field(default_factory=dict)


def say(msg: str) -> None:
    print(msg, flush=True)


def _unwrap(reply: Any) -> Any:
    # socketctl --json prints the result; accept the whole {"ok", "result"} envelope too.
    if isinstance(reply, dict) and "ok" in reply:
        if not reply["ok"]:
            raise DemoFailed(f"socketd answered an error: {reply.get('error')}")
        return reply.get("result")
    return reply


def peer_states(lab: Lab, site: Site) -> str:
    """One line: the state of each of site's peers, from `socketctl peers --json`."""
    try:
        result = _unwrap(lab.socketctl(site, "peers", timeout=5))
    except (NetnsError, DemoFailed) as e:
        return f"peers unavailable ({str(e).splitlines()[0][-120:]})"
    peers = result.get("peers", []) if isinstance(result, dict) else result
    if not isinstance(peers, list) or not peers:
        return "no peers"
    parts = []
    for p in peers:
        if not isinstance(p, dict):
            continue
        reason = f" ({p['reason']})" if p.get("reason") else ""
        parts.append(f"peer {p.get('site_id', '?')} {p.get('state', '?')}{reason}")
    return ", ".join(parts)


# ------------------------------------------------------------------ steps


def step_topology(ctx: DemoContext) -> None:
    lab = ctx.lab
    lab.add_inet()
    for n in (1, 2):
        lab.add_router(n, nat=ctx.opts.nat)
        ctx.sites.append(lab.add_site(n))
    for line in lab.describe():
        say(f"    {line}")


def step_pki(ctx: DemoContext) -> None:
    pki = ctx.lab.setup_pki("demo")
    say(f"    account CA {pki.ca_cert}")
    s1, s2 = ctx.sites
    for site, peer in ((s1, s2), (s2, s1)):
        cfg = ctx.lab.write_site_config(site, peers=[peer], pki=pki)
        say(f"    site {site.n}: config {cfg}, peer {peer.n} at {peer.endpoint}")


def step_socketd(ctx: DemoContext) -> None:
    for site in ctx.sites:
        d = ctx.lab.start_socketd(site)
        say(f"    site {site.n}: socketd pid {d.main_pid()} up, log {d.log_path}")


def step_wait_tunnel(ctx: DemoContext) -> None:
    s1, s2 = ctx.sites
    lab = ctx.lab
    last = [0.0]

    def progress(elapsed: float) -> None:
        for site in ctx.sites:
            if site.socketd and not site.socketd.alive():
                raise DemoFailed(f"socketd of site {site.n} exited:\n{site.socketd.log_tail()}")
        if elapsed - last[0] >= 3:
            last[0] = elapsed
            states = "; ".join(f"site {s.n}: {peer_states(lab, s)}" for s in ctx.sites)
            say(f"    ... {elapsed:4.0f} s  {states}")

    t0 = time.monotonic()
    if not lab.wait_ping(s1.lan_ns, s2.lan_host_ip, ctx.opts.tunnel_timeout_s, progress):
        states = "; ".join(f"site {s.n}: {peer_states(lab, s)}" for s in ctx.sites)
        raise DemoFailed(f"no path lan1 -> lan2 within {ctx.opts.tunnel_timeout_s:g} s ({states})")
    say(f"    tunnel up after {time.monotonic() - t0:.1f} s")


def step_ping(ctx: DemoContext) -> None:
    s1, s2 = ctx.sites
    rtt = ctx.lab.ping_rtt_ms(s1.lan_ns, s2.lan_host_ip, count=10, interval=0.1)
    if rtt is None:
        raise DemoFailed(f"ping {s1.lan_host_ip} -> {s2.lan_host_ip} got no answer")
    ctx.results["rtt_ms"] = rtt
    say(f"    ping lan1 {s1.lan_host_ip} -> lan2 {s2.lan_host_ip}: avg {rtt:.3f} ms")


def step_iperf(ctx: DemoContext) -> None:
    s1, s2 = ctx.sites
    r = ctx.lab.iperf3(s1.lan_ns, s2.lan_ns, s2.lan_host_ip, duration=ctx.opts.iperf_seconds)
    if not r.mbps:
        raise DemoFailed("iperf3 moved no data")
    ctx.results["tcp_mbps"] = r.mbps
    ctx.traffic_ok = True
    say(f"    iperf3 TCP lan1 -> lan2, {ctx.opts.iperf_seconds:g} s: {r.mbps:.0f} Mbit/s")


def step_status(ctx: DemoContext) -> None:
    for site in ctx.sites:
        for cmd in ("status", "peers"):
            say(f"    --- site {site.n}: socketctl {cmd}")
            try:
                out = ctx.lab.socketctl(site, cmd, json_out=False)
            except NetnsError as e:
                out = f"(failed: {e})\n"
            for line in out.rstrip("\n").splitlines():
                say(f"    {line}")


Step = tuple[str, Callable[[DemoContext], None]]

STEPS: list[Step] = [
    ("build the topology (2 sites behind NAT routers)", step_topology),
    ("create the account CA, site certificates and configs", step_pki),
    ("start socketd in both sites", step_socketd),
    ("wait for the tunnel", step_wait_tunnel),
    ("ping through the tunnel", step_ping),
    ("iperf3 through the tunnel", step_iperf),
    ("socketctl status and peers", step_status),
]


def run_demo(opts: DemoOptions, steps: Sequence[Step] = STEPS) -> int:
    """Run the steps in a fresh lab; 0 if traffic flowed, 1 otherwise."""
    failed: str | None = None
    with Lab(opts.workdir) as lab:
        ctx = DemoContext(lab, opts)
        say(f"lab {lab.tag} in {lab.workdir}")
        for i, (title, fn) in enumerate(steps, 1):
            say(f"[{i}/{len(steps)}] {title}")
            t0 = time.monotonic()
            try:
                fn(ctx)
            except (DemoFailed, NetnsError, OSError, ImportError) as e:
                # The daemon log tails below already hold the details of the error.
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                failed = f"step {i} ({title}) failed: {first}"
                say(f"    FAILED: {first}")
                for site in ctx.sites:
                    if site.socketd:
                        say(f"    --- socketd site {site.n} log (tail):")
                        say(site.socketd.log_tail(1500))
                break
            say(f"    ok ({time.monotonic() - t0:.1f} s)")
        say("cleaning up")
    if failed or not ctx.traffic_ok:
        say(f"DEMO FAILED: {failed or 'no traffic through the tunnel'}")
        return 1
    say(
        f"DEMO OK: lan1 -> lan2 through the tunnel, ping {ctx.results['rtt_ms']:.3f} ms, "
        f"TCP {ctx.results['tcp_mbps']:.0f} Mbit/s"
    )
    return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="socket-lab", description="The namespace lab.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="two sites, a tunnel, ping and iperf3 through it")
    d.add_argument(
        "--tunnel-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for the tunnel (default 60)",
    )
    d.add_argument(
        "--iperf-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="length of the iperf3 run (default 5)",
    )
    d.add_argument(
        "--nat",
        choices=("masquerade", "none"),
        default="masquerade",
        help="NAT of both routers (default masquerade)",
    )
    d.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep configs, certificates and logs here (default: a temporary "
        "folder removed at the end)",
    )
    c = sub.add_parser("cleanup", help="remove namespaces left by killed lab runs")
    c.add_argument(
        "--all",
        action="store_true",
        help="also those of labs still running (careful with parallel runs)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("socket-lab: must run as root (network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM (CI timeouts, kill) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.command == "cleanup":
            from sdwan.lab.topology import cleanup_stale

            removed = cleanup_stale(include_live=args.all)
            print(
                f"removed {len(removed)} namespace(s)"
                + (": " + " ".join(removed) if removed else "")
            )
            return 0
        opts = DemoOptions(args.tunnel_timeout, args.iperf_seconds, args.workdir, args.nat)
        return run_demo(opts)
    except KeyboardInterrupt:
        print("interrupted; lab cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
