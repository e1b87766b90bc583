"""popd under load, in a lab: one popd, a few real sites (socketd behind NAT routers) and the
popd swarm (popswarm.py) playing N more sites from a public host, with the figures both the
benchmark (bench/popd) and the lab test (tests/lab/test_popd_load.py) read.

`run(lab, LoadSpec(...))` builds the lab, starts popd, the real sites, then the swarm; waits for
every fake site to register; runs the load (events, flaps, floods) for `duration_s`; and
returns a `LoadResult`: popd's own loop figures (pop/looplag.py), its CPU, registrations and
events stored per second, directory bytes sent, what the swarm saw, and every `pop.disconnected`
event of the real sites (a false "cloud down": there must be none).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdwan.lab.measure import proc_cpu_s
from sdwan.lab.netns import wait_until
from sdwan.lab.popswarm import PopSwarmSpec
from sdwan.lab.swarm import issue_site_certs
from sdwan.lab.topology import Lab, Pki, Pop, Site
from sdwan.pop import pki as sdwan_pki

SWARM_IP = "203.0.113.30"
SWARM_FIRST_PORT = 20000
FIRST_FAKE_ID = 100


@dataclass
class LoadSpec:
    fake_sites: int = 1000
    real_sites: int = 3
    duration_s: float = 60.0
    start_spread_s: float = 20.0  # the fake sites' first handshakes spread over this
    register_wait_s: float = 300.0  # for every fake site to register
    events_per_minute: float = 6.0  # per fake site
    event_batch: int = 5
    flaps_per_s: float | None = None  # over the swarm; None: one per 200 fake sites a second
    flood: bool = True  # one fake site far over its event quota, one flooding register
    flood_events_per_s: float = 200.0
    register_flood_per_s: float = 5.0
    # popd's [events] and [register] tables (docs/popd.md)
    events: dict[str, int] = field(
        default_factory=lambda: {"site_keep": 200, "site_per_minute": 600, "site_burst": 300}
    )
    register: dict[str, int] = field(
        default_factory=lambda: {
            "site_per_minute": 30,
            "site_burst": 5,
            "source_per_minute": 100_000,
            "source_burst": 5000,
        }
    )
    cert_cache: Path | None = None  # the fake sites' certificates, kept between runs


@dataclass
class LoadResult:
    fake_sites: int
    real_sites: int
    cert_issue_s: float
    certs_issued: int
    all_registered_s: float | None  # from the swarm's start
    registration_rate: float | None  # fake sites registered per second, over that time
    duration_s: float
    loop: dict[str, Any]  # popd's own figures at the end of the load
    loop_samples: list[dict[str, Any]]  # sampled during the load
    max_stall_ms: float | None  # the largest of the samples' max_stall_ms
    p99_ms: float | None  # the largest of the samples' p99
    popd_cpu_pct: float | None  # of one core, during the load
    registrations_per_s: float
    events_stored_per_s: float
    directory_bytes: int  # sent during the load (welcomes, directories, deltas)
    directory_bytes_per_s: float
    control: dict[str, Any]  # popd's counters at the end
    event_store: dict[str, Any]
    swarm: dict[str, Any]
    real_site_disconnects: list[dict[str, Any]]  # pop.disconnected at the real sites
    real_sites_up: bool
    flood_site: int | None
    register_flood_site: int | None
    flood_site_events: dict[str, int] | None = None  # popctl sites' `events` of it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fake_subnet(i: int) -> str:
    return f"172.{16 + i // 256}.{i % 256}.0/24"


def _toml_table(name: str, values: dict[str, int]) -> str:
    return f"\n[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def _swarm_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run(lab: Lab, spec: LoadSpec, log: Callable[[str], None] = print) -> LoadResult:
    if not 1 <= spec.fake_sites <= 4000:
        raise ValueError("fake_sites: 1..4000")
    lab.add_inet()
    sites: list[Site] = []
    for n in range(1, spec.real_sites + 1):
        lab.add_router(n, nat="masquerade")
        sites.append(lab.add_site(n))
    pop: Pop = lab.add_pop(1)
    if spec.cert_cache is not None:
        # The account CA is kept with the fake sites' certificates: every run after the first
        # issues none.
        ca_dir = spec.cert_cache / "ca"
        if not (ca_dir / sdwan_pki.CA_CERT_NAME).is_file():
            sdwan_pki.create_ca(ca_dir, "lab")
        lab.pki = Pki(ca_dir, ca_dir / sdwan_pki.CA_CERT_NAME, "lab")
    pki = lab.setup_pki()
    fake_ids = [FIRST_FAKE_ID + i for i in range(spec.fake_sites)]
    account: list[Site | dict[str, object]] = list(sites)
    account += [
        {"id": sid, "name": f"fake-{sid}", "subnets": [_fake_subnet(i)]}
        for i, sid in enumerate(fake_ids)
    ]
    config = lab.write_pop_config(pop, sites=account, pki=pki)
    with config.open("a") as f:
        f.write(_toml_table("events", spec.events))
        f.write(_toml_table("register", spec.register))
    certs = (spec.cert_cache / "sites") if spec.cert_cache else lab.workdir / "popswarm-certs"
    t0 = time.monotonic()
    issued = issue_site_certs(pki.dir, fake_ids, certs)
    cert_issue_s = round(time.monotonic() - t0, 2)
    log(
        f"popload: {issued} certificate(s) issued, {len(fake_ids) - issued} from the cache,"
        f" in {cert_issue_s} s"
    )
    lab.start_popd(pop)
    pops_toml = f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n'
    for site in sites:
        lab.write_site_config(site, extra_toml=pops_toml)
        lab.start_socketd(site)
    for site in sites:
        if not wait_until(
            lambda s=site: lab.socketctl(s, "status")["cloud"]["state"] == "up", 60, 0.5
        ):
            raise RuntimeError(f"real site {site.n}: cloud never up")
    log(f"popload: popd and {len(sites)} real site(s) up")

    host = lab.add_public_host("popswarm", ip=SWARM_IP)
    flood = fake_ids[0] if spec.flood and len(fake_ids) > 2 else None
    reg_flood = fake_ids[1] if spec.flood and len(fake_ids) > 2 else None
    status_path = lab.workdir / "popswarm.status.json"
    sspec = PopSwarmSpec(
        pop_id=pop.n,
        pop_endpoint=f"{pop.host.ip}:{pop.port}",
        bind_ip=SWARM_IP,
        first_port=SWARM_FIRST_PORT,
        site_ids=fake_ids,
        ca=str(pki.ca_cert),
        cert_dir=str(certs),
        start_spread_s=spec.start_spread_s,
        events_per_minute=spec.events_per_minute,
        event_batch=spec.event_batch,
        # From the end of the start spread on.
        flaps_per_s=spec.fake_sites / 200 if spec.flaps_per_s is None else spec.flaps_per_s,
        flood_site=flood,
        flood_events_per_s=spec.flood_events_per_s,
        register_flood_site=reg_flood,
        register_flood_per_s=spec.register_flood_per_s,
        ready_file=str(lab.workdir / "popswarm.ready"),
        status_file=str(status_path),
    )
    spec_path = lab.workdir / "popswarm.json"
    sspec.dump(spec_path)
    swarm = lab.spawn(
        host.ns,
        [sys.executable, "-m", "sdwan.lab.popswarm", str(spec_path)],
        "popswarm",
        env=lab.env(),
    )
    # Everyone but the register flooder, whose registrations are refused by design.
    need = spec.fake_sites - (1 if reg_flood is not None else 0)
    ok = wait_until(
        lambda: _swarm_status(status_path).get("welcomed_once", 0) >= need or not swarm.alive(),
        spec.register_wait_s,
        1.0,
    )
    st = _swarm_status(status_path)
    if not swarm.alive():
        raise RuntimeError(f"the swarm exited: {swarm.log_tail(1500)}")
    all_registered_s = st.get("first_all_registered_s") if ok else None
    log(
        f"popload: {st.get('welcomed_once')}/{spec.fake_sites} fake sites registered"
        f" ({'all' if ok else 'NOT all'}) in {all_registered_s} s"
    )

    # The load window: the events, flaps and floods of the swarm, measured.
    popd_pid = pop.popd.main_pid(2.0) if pop.popd is not None else None
    s0 = lab.popctl(pop, "status")
    cpu0, w0 = (proc_cpu_s(popd_pid) if popd_pid else None), time.monotonic()
    samples: list[dict[str, Any]] = []
    end = w0 + spec.duration_s
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        loop = lab.popctl(pop, "status")["loop"]
        samples.append(loop)
    dt = time.monotonic() - w0
    s1 = lab.popctl(pop, "status")
    cpu1 = proc_cpu_s(popd_pid) if popd_pid else None
    sw1 = _swarm_status(status_path)
    c0, c1 = s0["control"], s1["control"]
    disconnects: list[dict[str, Any]] = []
    up = True
    for site in sites:
        events = lab.socketctl(site, "events", "--limit", "1000")["events"]
        disconnects += [
            {"site": site.n, **e} for e in events if e.get("kind") == "pop.disconnected"
        ]
        up = up and lab.socketctl(site, "status")["cloud"]["state"] == "up"
    flood_events = None
    if flood is not None:
        for s in lab.popctl(pop, "sites")["sites"]:
            if s["site_id"] == flood:
                flood_events = s.get("events")
    stalls = [x["max_stall_ms"] for x in samples if x.get("max_stall_ms") is not None]
    p99s = [x["p99_ms"] for x in samples if x.get("p99_ms") is not None]
    lab.kill(swarm)
    return LoadResult(
        fake_sites=spec.fake_sites,
        real_sites=spec.real_sites,
        cert_issue_s=cert_issue_s,
        certs_issued=issued,
        all_registered_s=all_registered_s,
        registration_rate=(
            round(spec.fake_sites / all_registered_s, 1) if all_registered_s else None
        ),
        duration_s=round(dt, 1),
        loop=s1["loop"],
        loop_samples=samples,
        max_stall_ms=max(stalls) if stalls else None,
        p99_ms=max(p99s) if p99s else None,
        popd_cpu_pct=(
            round(100 * (cpu1 - cpu0) / dt, 1) if cpu0 is not None and cpu1 is not None else None
        ),
        registrations_per_s=round((c1["registrations"] - c0["registrations"]) / dt, 1),
        events_stored_per_s=round((c1["events_stored"] - c0["events_stored"]) / dt, 1),
        directory_bytes=c1["directory_bytes"] - c0["directory_bytes"],
        directory_bytes_per_s=round((c1["directory_bytes"] - c0["directory_bytes"]) / dt),
        control=c1,
        event_store=s1.get("events") or {},
        swarm=sw1,
        real_site_disconnects=disconnects,
        real_sites_up=up,
        flood_site=flood,
        register_flood_site=reg_flood,
        flood_site_events=flood_events,
    )
