"""`socket-lab demo`: sites behind NAT routers and a PoP; traffic through the PoP, the direct
tunnel, the off-cloud mesh punched through the NATs, a cloud outage carried by WAN recovery
over the mesh (long-lived TCP connections kept across it) and the PoP's return.

Owns the demo's steps and the topology they share with `bench/cloud` (`build_pop_lab`):
two sites behind masquerading routers, each registered with one PoP (`popd`) that relays
their traffic, plus a static `[[peers]]` tunnel between the two sites for a second,
"direct-only" prefix per site, so both transports run side by side on the same daemons.
The demo adds a third site behind a port-shifting NAT that reaches the other two over mesh
tunnels the PoP helps punch (their LAN prefixes are pinned to the mesh on both ends).

The demo is a list of steps run in order on a shared `DemoContext`, each printing what it
does and raising `DemoFailed` when its check fails; later issues insert steps (a link pulled)
without reshaping the rest. The exit status is 0
only if every step's check passed; the lab is torn down whatever happens, including Ctrl-C
and SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sdwan.common import control
from sdwan.lab import netns
from sdwan.lab.flows import Flows
from sdwan.lab.measure import PingStream
from sdwan.lab.netns import NetnsError
from sdwan.lab.topology import Lab, PeerSpec, Pop, Site


class DemoFailed(Exception):
    """A step could not do its job; the message says what and why."""


@dataclass
class DemoOptions:
    tunnel_timeout_s: float = 60.0
    iperf_seconds: float = 3.0
    workdir: Path | None = None
    nat: str = "masquerade"


@dataclass
class DemoContext:
    lab: Lab
    opts: DemoOptions
    sites: list[Site] = field(default_factory=list)
    pop: Pop | None = None
    traffic_ok: bool = False
    results: dict[str, Any] = field(default_factory=dict)
    flows: Flows | None = None  # the long-lived TCP connections across the outage


def say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ the PoP topology


def direct_subnet(site: Site) -> str:
    """Site n's direct-only prefix, 10.(100+n).0.0/24: routed over the static tunnel only.

    The PoP's account knows only 10.n.0.0/24, and socketd never routes a static peer's
    prefix through the cloud, so the two prefixes pin the two transports apart."""
    return f"10.{100 + site.n}.0.0/24"


def direct_host_ip(site: Site) -> str:
    return f"10.{100 + site.n}.0.2"


def pops_toml(*pops: Pop) -> str:
    return "\n".join(f'[[pops]]\nid = {p.n}\nendpoint = "{p.endpoint}"\n' for p in pops)


RECOVERY_HOLD_S = 3  # the demo's [cloud] recovery_hold_s: traffic returns 3 s after the PoP
LINK_HOLD_S = 3  # site 1's [wan] return_hold_s: back on wan1 3 s after it is healthy again


def build_pop_lab(
    lab: Lab,
    nat: str = "masquerade",
    static_peers: bool = True,
    mesh_site: bool = False,
    recovery: bool = False,
    second_link: bool = False,
) -> tuple[Pop, list[Site]]:
    """Two sites behind `nat` routers and PoP 1, all configured (nothing started).

    With static_peers, each site also lists the other as a `[[peers]]` entry for its
    direct-only prefix, which both the site and its LAN host carry as a second address.
    With mesh_site, a third site behind a port-shifting NAT meshes with both: every site
    pins the LAN prefixes it reaches over the mesh (docs/mesh.md). With recovery, every site
    has WAN recovery on in the account: with the cloud lost, all their traffic goes over the
    mesh (docs/recovery.md). With second_link, site 1 has a second Internet uplink, wan2,
    through another ISP, at precedence 2 (docs/links.md)."""
    lab.add_inet()
    sites: list[Site] = []
    for n in (1, 2):
        lab.add_router(n, nat=nat)
        sites.append(lab.add_site(n))
    if mesh_site:
        lab.add_router(3, nat="shift")
        sites.append(lab.add_site(3))
    if second_link:
        lab.add_wan_link(sites[0])
    pop = lab.add_pop(1)
    if static_peers:
        for s in sites:
            prefix = direct_subnet(s).rsplit(".", 2)[0]
            netns.addr_add(s.ns, s.lan_dev, f"{prefix}.0.1/24")
            netns.addr_add(s.lan_ns, "eth0", f"{direct_host_ip(s)}/24")
    lab.write_pop_config(
        pop,
        sites=[
            {"id": s.n, "name": f"site-{s.n}", "subnets": [s.lan_subnet], "offcloud": mesh_site,
             "recovery": recovery}
            for s in sites
        ],
    )
    s1, s2 = sites[:2]
    for s in sites:
        extra = pops_toml(pop)
        if recovery:
            extra += f"\n[cloud]\nrecovery_hold_s = {RECOVERY_HOLD_S}\n"
        if second_link and s is sites[0]:
            extra += f"\n[wan]\nreturn_hold_s = {LINK_HOLD_S}\n"
        if s.n == 3:
            extra += f'\n[mesh]\npin = ["{s1.lan_subnet}", "{s2.lan_subnet}"]\n'
            lab.write_site_config(s, extra_toml=extra)
            continue
        if mesh_site:
            extra += f'\n[mesh]\npin = ["{sites[2].lan_subnet}"]\n'
        other = s2 if s is s1 else s1
        peers = [PeerSpec(other.n, other.endpoint, [direct_subnet(other)])] if static_peers else []
        lan = [s.lan_subnet, direct_subnet(s)] if static_peers else [s.lan_subnet]
        lab.write_site_config(s, peers=peers, lan_subnets=lan, extra_toml=extra)
    return pop, sites


def ctl(site: Site, cmd: str, timeout: float = 2.0, **args: Any) -> dict[str, Any]:
    """One control request straight to site's socket (no socketctl process: fast to poll)."""
    return control.request(site.control_socket, cmd, timeout=timeout, **args)


def cloud_state(site: Site) -> str:
    try:
        return str(ctl(site, "status")["cloud"]["state"])
    except (control.ControlError, OSError, KeyError, TypeError):
        return "unreachable"


def peer_of(site: Site, site_id: int, transport: str) -> dict[str, Any] | None:
    try:
        peers = ctl(site, "peers").get("peers", [])
    except (control.ControlError, OSError):
        return None
    return next(
        (p for p in peers if p.get("site_id") == site_id and p.get("transport") == transport),
        None,
    )


def mesh_path(site: Site, site_id: int) -> dict[str, Any] | None:
    """site's mesh path to site_id as `socketctl mesh` shows it, None while it has none."""
    try:
        paths = ctl(site, "mesh").get("paths", [])
    except (control.ControlError, OSError):
        return None
    return next((x for x in paths if x.get("site_id") == site_id), None)


def events_since(site: Site, after_seq: int, kind: str | None = None) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"limit": 200}
    if kind:
        args["kind"] = kind
    evs = ctl(site, "events", **args).get("events", [])
    return [e for e in evs if int(e.get("seq", 0)) > after_seq]


def last_seq(site: Site) -> int:
    return int(ctl(site, "events", limit=1).get("last_seq") or 0)


def kill_popd(lab: Lab, pop: Pop) -> float:
    """SIGKILL popd (a crash, not a shutdown); returns the wall-clock time of the kill."""
    d = pop.popd
    if d is None:
        raise DemoFailed("popd is not running")
    pid = d.main_pid(timeout=1.0)
    if pid is None:
        raise DemoFailed(f"popd has no process to kill: {d.log_tail(500)}")
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    lab.kill(d, grace_s=2)
    pop.popd = None
    return t_kill


def wait_all(
    sites: Sequence[Site], pred: Callable[[Site], bool], timeout: float, interval: float = 0.01
) -> dict[int, float]:
    """Poll pred for every site until each has held once; wall-clock time each first held."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(sites) and time.monotonic() < deadline:
        for s in sites:
            if s.n not in seen and pred(s):
                seen[s.n] = time.time()
        time.sleep(interval)
    return seen


# ------------------------------------------------------------------ steps


def _sites(ctx: DemoContext) -> tuple[Site, Site]:
    """The two sites with the static tunnel between them."""
    s1, s2 = ctx.sites[:2]
    return s1, s2


def _mesh_site(ctx: DemoContext) -> Site | None:
    return ctx.sites[2] if len(ctx.sites) > 2 else None


def _pop(ctx: DemoContext) -> Pop:
    if ctx.pop is None:
        raise DemoFailed("no PoP in this lab")
    return ctx.pop


def step_topology(ctx: DemoContext) -> None:
    pop, sites = build_pop_lab(ctx.lab, nat=ctx.opts.nat, mesh_site=True, recovery=True,
                               second_link=True)
    ctx.pop, ctx.sites = pop, sites
    for line in ctx.lab.describe():
        say(f"    {line}")
    for s in sites[:2]:
        say(f"    site {s.n}: direct-only prefix {direct_subnet(s)} (LAN host {direct_host_ip(s)})")
    say("    site 3: reaches sites 1 and 2 over the mesh (their LAN prefixes pinned to it)")
    say(f"    PoP {pop.n} (popd) at {pop.endpoint}, STUN {pop.ip}:{pop.stun_port}")


def step_configs(ctx: DemoContext) -> None:
    pop = _pop(ctx)
    say(f"    account CA {ctx.lab.setup_pki().ca_cert}")
    say(f"    PoP config {pop.config}, account {pop.account} (sites 1-3, off-cloud on)")
    s1, s2 = _sites(ctx)
    for site, other in ((s1, s2), (s2, s1)):
        say(
            f"    site {site.n}: config {site.config}: PoP {pop.endpoint}; static peer "
            f"{other.n} at {other.endpoint} for {direct_subnet(other)}"
        )
    s3 = _mesh_site(ctx)
    if s3 is not None:
        say(f"    site 3: config {s3.config}: PoP {pop.endpoint}; [mesh] pin = lan1, lan2")


def step_start(ctx: DemoContext) -> None:
    pop = _pop(ctx)
    d = ctx.lab.start_popd(pop)
    say(f"    popd pid {d.main_pid()} up, log {d.log_path}")
    for site in ctx.sites:
        d = ctx.lab.start_socketd(site)
        say(f"    site {site.n}: socketd pid {d.main_pid()} up, log {d.log_path}")


def _check_alive(ctx: DemoContext) -> None:
    for site in ctx.sites:
        if site.socketd and not site.socketd.alive():
            raise DemoFailed(f"socketd of site {site.n} exited:\n{site.socketd.log_tail()}")
    if ctx.pop and ctx.pop.popd and not ctx.pop.popd.alive():
        raise DemoFailed(f"popd exited:\n{ctx.pop.popd.log_tail()}")


def step_register(ctx: DemoContext) -> None:
    s1, s2 = _sites(ctx)
    t0 = time.monotonic()
    deadline = t0 + ctx.opts.tunnel_timeout_s

    def registered(site: Site, other: Site) -> bool:
        # `peers` lists a site with a static tunnel once, as "direct", so the directory's
        # size in `status` is what says the PoP told us about the other site.
        try:
            cloud = ctl(site, "status")["cloud"]
        except (control.ControlError, OSError, KeyError):
            return False
        want = len(ctx.sites) - 1
        return cloud.get("state") == "up" and int(cloud.get("sites") or 0) >= want

    done: set[int] = set()
    while len(done) < len(ctx.sites):
        _check_alive(ctx)
        for site in ctx.sites:
            others = ", ".join(str(o.n) for o in ctx.sites if o is not site)
            if site.n not in done and registered(site, s2 if site is s1 else s1):
                done.add(site.n)
                say(
                    f"    site {site.n}: registered with PoP {_pop(ctx).n} after "
                    f"{time.monotonic() - t0:.1f} s; directory lists sites {others}"
                )
        if time.monotonic() > deadline:
            states = ", ".join(f"site {s.n} cloud {cloud_state(s)}" for s in ctx.sites)
            raise DemoFailed(
                f"sites not registered within {ctx.opts.tunnel_timeout_s:g} s ({states})"
            )
        time.sleep(0.1)
    pops = ctx.lab.popctl(_pop(ctx), "sites", json_out=False)
    say("    --- popctl sites")
    for line in pops.rstrip("\n").splitlines():
        say(f"    {line}")


def step_relay_traffic(ctx: DemoContext) -> None:
    s1, s2 = _sites(ctx)
    lab = ctx.lab
    if not lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=10):
        raise DemoFailed(f"ping {s1.lan_host_ip} -> {s2.lan_host_ip} through the PoP: no answer")
    rtt = lab.ping_rtt_ms(s1.lan_ns, s2.lan_host_ip, count=10, interval=0.05)
    if rtt is None:
        raise DemoFailed(f"ping {s1.lan_host_ip} -> {s2.lan_host_ip} got no answer")
    r = lab.iperf3(s1.lan_ns, s2.lan_ns, s2.lan_host_ip, duration=ctx.opts.iperf_seconds)
    if not r.mbps:
        raise DemoFailed("iperf3 through the PoP moved no data")
    ctx.results.update(relay_rtt_ms=rtt, relay_tcp_mbps=r.mbps)
    ctx.traffic_ok = True
    say(f"    ping lan1 {s1.lan_host_ip} -> lan2 {s2.lan_host_ip} via the PoP: avg {rtt:.3f} ms")
    say(f"    iperf3 TCP via the PoP, {ctx.opts.iperf_seconds:g} s: {r.mbps:.0f} Mbit/s")


def step_direct(ctx: DemoContext) -> None:
    s1, s2 = _sites(ctx)
    t0 = time.monotonic()
    for site, other in ((s1, s2), (s2, s1)):
        while True:
            p = peer_of(site, other.n, "direct")
            if p is not None and p.get("state") == "up":
                break
            if time.monotonic() - t0 > ctx.opts.tunnel_timeout_s:
                raise DemoFailed(f"site {site.n}: direct tunnel to site {other.n} not up ({p})")
            _check_alive(ctx)
            time.sleep(0.1)
        say(f"    site {site.n}: direct tunnel to site {other.n} up ({p.get('endpoint')})")
    src, dst = direct_host_ip(s1), direct_host_ip(s2)
    cp = netns.run(
        s1.lan_ns,
        ["ping", "-n", "-q", "-c", "10", "-i", "0.05", "-W", "1", "-I", src, dst],
        timeout=30,
        check=False,
    )
    if cp.returncode != 0:
        raise DemoFailed(f"ping {src} -> {dst} over the direct tunnel: no answer")
    ctx.results["direct_ping"] = cp.stdout.strip().splitlines()[-1]
    say(f"    ping {src} -> {dst} over the direct tunnel: {ctx.results['direct_ping']}")


def step_mesh(ctx: DemoContext) -> None:
    s3 = _mesh_site(ctx)
    if s3 is None:
        raise DemoFailed("no mesh site in this lab")
    t0 = time.monotonic()
    for other in _sites(ctx):
        while True:
            p = mesh_path(s3, other.n)
            if p is not None and p.get("state") == "direct":
                break
            if time.monotonic() - t0 > ctx.opts.tunnel_timeout_s:
                raise DemoFailed(f"site 3: no mesh tunnel to site {other.n} ({p})")
            _check_alive(ctx)
            time.sleep(0.1)
        say(
            f"    site 3: mesh tunnel to site {other.n} punched through both NATs: endpoint "
            f"{p.get('endpoint')}, found by {p.get('how')} "
            f"({time.monotonic() - t0:.1f} s after the start of this step)"
        )
        if not ctx.lab.wait_ping(s3.lan_ns, other.lan_host_ip, timeout=10):
            raise DemoFailed(f"ping lan3 -> lan{other.n} over the mesh: no answer")
        rtt = ctx.lab.ping_rtt_ms(s3.lan_ns, other.lan_host_ip, count=10, interval=0.05)
        say(f"    ping lan3 {s3.lan_host_ip} -> lan{other.n} {other.lan_host_ip} over the mesh: "
            f"avg {rtt:.3f} ms" if rtt is not None else "    (no RTT)")
    _show(ctx, ("mesh",), sites=[s3])


def _show(ctx: DemoContext, cmds: Sequence[str], sites: Sequence[Site] | None = None) -> None:
    for site in ctx.sites if sites is None else sites:
        for cmd in cmds:
            say(f"    --- site {site.n}: socketctl {cmd}")
            try:
                out = ctx.lab.socketctl(site, *cmd.split(), json_out=False)
            except NetnsError as e:
                out = f"(failed: {e})\n"
            for line in out.rstrip("\n").splitlines():
                say(f"    {line}")


def step_status(ctx: DemoContext) -> None:
    _show(ctx, ("status", "pop", "peers", "routes"))


def _offcloud_pair_up(ctx: DemoContext) -> None:
    """Sites 1 and 2 have a static direct tunnel between them, so the mesh leaves the pair
    alone: that tunnel is what WAN recovery moves lan1 <-> lan2 onto."""
    s1, s2 = _sites(ctx)
    t0 = time.monotonic()
    while (p := peer_of(s1, s2.n, "direct")) is None or p.get("state") != "up":
        if time.monotonic() - t0 > ctx.opts.tunnel_timeout_s:
            raise DemoFailed(f"the static tunnel between sites 1 and 2 is not up ({p})")
        time.sleep(0.1)
    say("    sites 1 and 2: their static direct tunnel is their way off-cloud (the cloud "
        "carries lan1 <-> lan2 until it is lost); site 3 meshes with both")


def step_outage(ctx: DemoContext) -> None:
    pop = _pop(ctx)
    _offcloud_pair_up(ctx)
    flows = Flows(ctx.lab, ctx.sites)
    ctx.flows = flows
    t_up = time.time()
    try:
        flows.wait("every flow up", lambda: flows.all_echoing_since(t_up, 6), timeout=20)
    except TimeoutError as e:
        raise DemoFailed(str(e)) from e
    say("    6 long-lived TCP connections, every pair of LAN hosts both ways, a line every "
        "50 ms each")
    ctx.results["seq_before_outage"] = {s.n: last_seq(s) for s in ctx.sites}
    t_kill = kill_popd(ctx.lab, pop)
    say("    popd killed (SIGKILL)")
    seen = wait_all(ctx.sites, lambda s: cloud_state(s) != "up", timeout=5)
    missing = [s.n for s in ctx.sites if s.n not in seen]
    if missing:
        raise DemoFailed(f"site(s) {missing} still report the cloud up 5 s after the PoP died")
    for s in ctx.sites:
        evs = events_since(s, ctx.results["seq_before_outage"][s.n], "pop.disconnected")
        # The event's own timestamp is when socketd decided; the poll adds its own delay.
        took = min(e["ts"] for e in evs) - t_kill if evs else seen[s.n] - t_kill
        how = "event timestamp" if evs else "status poll"
        say(f"    site {s.n}: cloud {cloud_state(s)} after {took:.3f} s ({how})")
    try:
        flows.wait("every flow over the mesh", lambda: flows.all_echoing_since(t_kill + 1.5, 6),
                   timeout=15)
    except TimeoutError as e:
        raise DemoFailed(f"WAN recovery did not move the flows onto the mesh: {e}") from e
    resumed = flows.resumed_after(t_kill)
    slowest = max(v for v in resumed.values() if v is not None)
    ctx.results["cloud_loss_to_mesh_s"] = round(slowest, 3)
    for s in ctx.sites:
        evs = events_since(s, ctx.results["seq_before_outage"][s.n], "offcloud.recovery.activated")
        if not evs:
            raise DemoFailed(f"site {s.n}: no Off-Cloud Recovery Activated event")
        say(f"    site {s.n}: {evs[0]['text']}")
    say(f"    every TCP connection continued over the mesh, the slowest {slowest:.2f} s after "
        "the kill (detection included); none reset")
    _show(ctx, ("recovery", "routes"), sites=ctx.sites[:1])
    s1, s2 = _sites(ctx)
    src, dst = direct_host_ip(s1), direct_host_ip(s2)
    cp = netns.run(
        s1.lan_ns,
        ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", src, dst],
        timeout=15,
        check=False,
    )
    if cp.returncode != 0:
        raise DemoFailed("the static direct tunnel stopped carrying traffic during the outage")
    say(f"    {src} -> {dst} over the static direct tunnel: still answers")
    s3 = _mesh_site(ctx)
    if s3 is not None:
        _reboot_in_outage(ctx, s3)


def _reboot_in_outage(ctx: DemoContext, s3: Site) -> None:
    """Site 3's socketd killed and started again with the PoP still down, as a box rebooted
    in the middle of an outage: its mesh tunnels come back from the NAT data in its store,
    in recovery from its stored state, and its TCP connections continue."""
    ctx.lab.stop_socketd(s3, signal.SIGKILL)
    t_wall = time.time()
    t0 = time.monotonic()
    ctx.lab.start_socketd(s3)
    started = time.monotonic() - t0
    hows = []
    for other in _sites(ctx):
        while (p := mesh_path(s3, other.n)) is None or p.get("state") != "direct":
            if time.monotonic() - t0 > ctx.opts.tunnel_timeout_s:
                raise DemoFailed(f"site 3 restarted in the outage: no mesh tunnel to site "
                                 f"{other.n} from its NAT data ({p})")
            time.sleep(0.01)
        hows.append(f"site {other.n} by {p.get('how')}")
    took = time.monotonic() - t0
    say(f"    site 3: socketd killed and started again, PoP still down: both mesh tunnels "
        f"direct {took:.2f} s after the spawn (control socket at {started:.2f} s; "
        f"{', '.join(hows)})")
    flows = ctx.flows
    assert flows is not None
    try:
        flows.wait("site 3's flows back", lambda: flows.all_echoing_since(t_wall + 0.1, 6),
                   timeout=15)
    except TimeoutError as e:
        raise DemoFailed(f"site 3's TCP connections did not come back: {e}") from e
    back = max(v for v in flows.resumed_after(t_wall).values() if v is not None)
    ctx.results["reboot_in_outage_s"] = round(back, 3)
    rec = ctl(s3, "recovery")
    say(f"    site 3: recovery {'active' if rec.get('active') else 'NOT active'} "
        f"({rec.get('reason')}); its TCP connections continue over the mesh "
        f"{back:.2f} s after the spawn, none reset")


def step_pop_returns(ctx: DemoContext) -> None:
    pop = _pop(ctx)
    s1, s2 = _sites(ctx)
    t0 = time.time()
    ctx.lab.start_popd(pop)
    say(f"    popd restarted (control socket after {time.time() - t0:.2f} s)")
    seen = wait_all(ctx.sites, lambda s: cloud_state(s) == "up", timeout=30, interval=0.05)
    missing = [s.n for s in ctx.sites if s.n not in seen]
    if missing:
        raise DemoFailed(f"site(s) {missing} did not re-register within 30 s")
    for s in ctx.sites:
        say(f"    site {s.n}: re-registered {seen[s.n] - t0:.2f} s after the restart")
    stopped = wait_all(ctx.sites, lambda s: not ctl(s, "recovery").get("active"),
                       timeout=RECOVERY_HOLD_S + 20, interval=0.05)
    if len(stopped) < len(ctx.sites):
        raise DemoFailed("WAN recovery did not stop after the PoP's return")
    say(f"    recovery stopped on every site {max(stopped.values()) - t0:.2f} s after the "
        f"restart (recovery_hold_s = {RECOVERY_HOLD_S}): traffic back through the PoP")
    flows = ctx.flows
    if flows is not None:
        t = time.time()
        try:
            flows.wait("flows through the PoP", lambda: flows.all_echoing_since(t, 6), 10)
        except TimeoutError as e:
            raise DemoFailed(f"the TCP connections stalled after the return: {e}") from e
        broken = flows.broken()
        if broken:
            raise DemoFailed(f"TCP connections broke: {broken}")
        worst = max(v["max_gap_s"] for v in flows.status().values())
        say(f"    all 6 TCP connections alive through the whole outage and both switches, "
            f"none reset (longest pause {worst:.2f} s)")
        flows.stop()
        ctx.flows = None
    r = ctx.lab.iperf3(
        s1.lan_ns, s2.lan_ns, s2.lan_host_ip, duration=min(ctx.opts.iperf_seconds, 2)
    )
    if not r.mbps:
        raise DemoFailed("iperf3 through the returned PoP moved no data")
    say(f"    iperf3 TCP via the PoP: {r.mbps:.0f} Mbit/s")


def _carries(site: Site) -> dict[str, int]:
    steering = ctl(site, "links").get("steering") or {}
    return dict((steering.get("cloud") or {}).get("links") or {})


def step_link_pulled(ctx: DemoContext) -> None:
    s1, s2 = _sites(ctx)
    lab = ctx.lab
    if len(s1.uplinks) < 2:
        raise DemoFailed("site 1 has no second link")
    flows = Flows(lab, [s1, s2])
    t_up = time.time()
    ping = PingStream(s1.lan_ns, s2.lan_host_ip)
    try:
        flows.wait("flows between lan1 and lan2", lambda: flows.all_echoing_since(t_up, 2), 15)
        if _carries(s1) != {"wan1": 1000}:
            raise DemoFailed(f"site 1's traffic is not on wan1 before the cut: {_carries(s1)}")
        seq = last_seq(s1)
        t0 = time.time()
        lab.link_carrier(s1, "wan1", up=False)
        deadline = time.monotonic() + 10
        while (resumed := ping.resumed_after(t0)) is None:
            if time.monotonic() > deadline:
                raise DemoFailed("no ping reply over wan2 within 10 s of pulling wan1's cable")
            time.sleep(0.02)
        if _carries(s1) != {"wan2": 1000}:
            raise DemoFailed(f"site 1's traffic did not move to wan2: {_carries(s1)}")
        ctx.results["link_pulled_move_s"] = resumed
        say(f"    wan1's cable pulled: lan1 -> lan2 answered again over wan2 after "
            f"{resumed * 1000:.0f} ms")
        _show(ctx, ("links",), [s1])
        t1 = time.time()
        lab.link_carrier(s1, "wan1", up=True)
        deadline = time.monotonic() + LINK_HOLD_S + 30
        while _carries(s1) != {"wan1": 1000}:
            if time.monotonic() > deadline:
                raise DemoFailed("site 1's traffic did not return to wan1 after the hold")
            time.sleep(0.1)
        say(f"    cable back: traffic on wan1 again {time.time() - t1:.1f} s later "
            f"(healthy for [wan] return_hold_s = {LINK_HOLD_S} s first)")
        moved = [e["text"] for e in events_since(s1, seq, "link.moved")
                 if e["text"].startswith("cloud")]
        for text in moved:
            say(f"    event: {text}")
        t = time.time()
        flows.wait("flows after the return", lambda: flows.all_echoing_since(t, 2), 10)
        broken = flows.broken()
        if broken:
            raise DemoFailed(f"TCP connections broke when the link was pulled: {broken}")
        say("    both TCP connections between lan1 and lan2 alive through both moves")
    except TimeoutError as e:
        raise DemoFailed(str(e)) from e
    finally:
        ping.stop()
        flows.stop()


def step_revoke(ctx: DemoContext) -> None:
    s1, s2 = _sites(ctx)
    s3 = _mesh_site(ctx)
    pop = _pop(ctx)
    lab = ctx.lab
    if s3 is None or pop.account is None:
        raise DemoFailed("no third site to revoke")
    stolen = lab.workdir / "pki" / "ca-site3" / "site-3.pem"
    seqs = {s.n: last_seq(s) for s in (s1, s2)}
    argv = [sys.executable, "-m", "sdwan.pop.pki", "revoke", str(pop.account), "--site-id", "3",
            "--cert", str(stolen), "--reason", "box stolen from branch 3 (demo)"]
    say(f"    socket-pki revoke {pop.account.name} --site-id 3 --cert {stolen.name}")
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=lab.env())
    if cp.returncode != 0:
        raise DemoFailed(f"socket-pki revoke failed: {cp.stderr.strip()}")
    out = lab.popctl(pop, "reload")
    ended = sorted({e["site_id"] for e in out.get("revoked_sessions") or []})
    say(f"    popctl reload: sessions of site {ended} ended at once")
    if not wait_all([s3], lambda s: cloud_state(s) != "up", 15):
        raise DemoFailed("site 3 still on the cloud after its certificate was revoked")
    for s in (s1, s2):
        deadline = time.monotonic() + 20
        while not (evs := events_since(s, seqs[s.n], "mesh.peer.revoked")):
            if time.monotonic() > deadline:
                raise DemoFailed(f"site {s.n} did not end its mesh tunnel to site 3")
            time.sleep(0.2)
        say(f"    site {s.n}: {evs[0]['text']}")
    if not lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=10):
        raise DemoFailed("lan1 -> lan2 broke when site 3 was revoked")
    say("    lan1 -> lan2 unaffected; site 3 is refused at every handshake from now on")


def step_events(ctx: DemoContext) -> None:
    before = ctx.results.get("seq_before_outage", {})
    for s in ctx.sites:
        kinds = [e["kind"] for e in events_since(s, before.get(s.n, 0))]
        for want in ("pop.disconnected", "offcloud.recovery.activated", "pop.connected",
                     "offcloud.recovery.stopped"):
            if want not in kinds:
                raise DemoFailed(f"site {s.n}: no {want} event after the outage ({kinds})")
    _show(ctx, ("events --limit 8",))


Step = tuple[str, Callable[[DemoContext], None]]

STEPS: list[Step] = [
    ("build the topology (3 sites behind NAT routers, a PoP)", step_topology),
    ("the account CA, certificates and configs", step_configs),
    ("start popd and socketd in every site", step_start),
    ("wait for every site to register with the PoP", step_register),
    ("ping and iperf3 lan1 -> lan2 through the PoP", step_relay_traffic),
    ("the direct tunnel between the sites (static peers)", step_direct),
    ("the mesh: site 3's tunnels punched through the NATs with the PoP's help", step_mesh),
    ("socketctl status, pop, peers and routes (who carries each prefix, and why)", step_status),
    ("cloud outage: kill popd; WAN recovery moves every flow onto the mesh", step_outage),
    ("the PoP comes back; traffic returns through it after the hold", step_pop_returns),
    ("a link pulled: site 1's wan1 cable out, traffic on wan2 at once, back after the hold",
     step_link_pulled),
    ("a stolen box: site 3's certificate revoked, cut off the PoP and the mesh at once",
     step_revoke),
    ("socketctl events: the outage and the recovery", step_events),
]


def run_demo(opts: DemoOptions, steps: Sequence[Step] = STEPS) -> int:
    """Run the steps in a fresh lab; 0 if every step's check passed, 1 otherwise."""
    failed: str | None = None
    t_start = time.monotonic()
    with Lab(opts.workdir) as lab:
        ctx = DemoContext(lab, opts)
        say(f"lab {lab.tag} in {lab.workdir}")
        for i, (title, fn) in enumerate(steps, 1):
            say(f"[{i}/{len(steps)}] {title}")
            t0 = time.monotonic()
            try:
                fn(ctx)
            except (DemoFailed, NetnsError, control.ControlError, OSError, ImportError) as e:
                # The daemon log tails below already hold the details of the error.
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                failed = f"step {i} ({title}) failed: {first}"
                say(f"    FAILED: {first}")
                daemons = [(f"socketd site {s.n}", s.socketd) for s in ctx.sites]
                if ctx.pop is not None:
                    daemons.append((f"popd {ctx.pop.n}", ctx.pop.popd))
                for name, d in daemons:
                    if d is not None:
                        say(f"    --- {name} log (tail):")
                        say(d.log_tail(1500))
                break
            say(f"    ok ({time.monotonic() - t0:.1f} s)")
        say("cleaning up")
    if failed or not ctx.traffic_ok:
        say(f"DEMO FAILED: {failed or 'no traffic through the PoP'}")
        return 1
    say(
        f"DEMO OK in {time.monotonic() - t_start:.0f} s: lan1 -> lan2 through the PoP "
        f"(ping {ctx.results['relay_rtt_ms']:.3f} ms, TCP {ctx.results['relay_tcp_mbps']:.0f} "
        "Mbit/s), direct tunnel up, mesh tunnels punched, cloud outage noticed, "
        + (f"every flow on the mesh {ctx.results['cloud_loss_to_mesh_s']:.2f} s after the "
           "PoP died, " if "cloud_loss_to_mesh_s" in ctx.results else "")
        + (f"a reboot in it back on the mesh in {ctx.results['reboot_in_outage_s']:.2f} s, "
           if "reboot_in_outage_s" in ctx.results else "")
        + "cloud recovered"
        + (f", a pulled cable moved to the second link in "
           f"{ctx.results['link_pulled_move_s'] * 1000:.0f} ms"
           if "link_pulled_move_s" in ctx.results else "")
    )
    return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="socket-lab", description="The namespace lab.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="two sites and a PoP: traffic through the PoP, a cloud outage, recovery"
    )
    d.add_argument(
        "--tunnel-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for registration and the tunnel (default 60)",
    )
    d.add_argument(
        "--iperf-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="length of the iperf3 run (default 3)",
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
