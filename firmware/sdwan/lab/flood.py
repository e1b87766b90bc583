"""A control-plane flood in the lab (tests/lab/test_control_flood.py, bench/flood): the
flooder (native/flood/flood.c, built on first use), the scene it floods (a PoP, a site on a
public address and one behind a NAT, a mesh tunnel between them, short rekey intervals), and
a watch that samples what the sites and the PoP say meanwhile: sessions, tunnels, the
longest silence of each, handshakes, the control lanes' counters, and the CPU of the daemons.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdwan.lab import netns
from sdwan.lab.topology import Lab, Pop, Site

ROOT = Path(__file__).resolve().parents[3]
FLOOD_SRC = ROOT / "native" / "flood" / "flood.c"
FLOOD_BIN = ROOT / "native" / "out" / "flood" / "sdwan-flood"
FLOODER_IP = "198.51.100.66"
# The benchmarking range (RFC 2544): spoofed sources that are no host of the lab.
SPOOF_NET = "198.18.0.0/15"
SINGLE_SOURCE = "198.18.0.7/32"
KEEPALIVE_S = 2
MESH_REKEY_S = 10
POP_REKEY_S = 60  # popd's floor (common/keytimers.py)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_flooder() -> Path:
    """native/flood/flood.c compiled (again when the source is newer) into native/out/."""
    if FLOOD_BIN.exists() and FLOOD_BIN.stat().st_mtime >= FLOOD_SRC.stat().st_mtime:
        return FLOOD_BIN
    FLOOD_BIN.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [
            cc,
            "-O2",
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(FLOOD_BIN),
            str(FLOOD_SRC),
        ],
        check=True,
        timeout=120,
    )
    return FLOOD_BIN


@dataclass(frozen=True)
class FloodResult:
    sent: int
    errors: int
    seconds: float
    pps: float


def flood(
    ns: str,
    targets: list[str],
    source: str,
    kind: str = "mix",
    seconds: float = 5.0,
    pps: float = 0.0,
) -> FloodResult:
    """Run the flooder in ns toward targets ("ip:port") from source (a CIDR; /32: one
    source) for seconds, as fast as it can (pps 0) or at pps; what it sent."""
    argv = [str(build_flooder()), "--from", source, "--kind", kind, "--seconds", str(seconds)]
    for t in targets:
        argv += ["--to", t]
    if pps:
        argv += ["--pps", str(pps)]
    cp = netns.run(ns, argv, timeout=seconds + 30)
    d = json.loads(cp.stdout.strip().splitlines()[-1])
    return FloodResult(int(d["sent"]), int(d["errors"]), float(d["seconds"]), float(d["pps"]))


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Scene:
    lab: Lab
    pop: Pop
    public: Site  # on a public address: the flooder reaches its WAN port
    natted: Site
    flooder_ns: str

    @property
    def targets(self) -> list[str]:
        site = f"{self.public.public_ip}:{self.public.port}"
        return [site, f"{self.pop.host.ip}:{self.pop.port}"]


def build_scene(lab: Lab) -> Scene:
    """A PoP, site 1 on a public address and site 2 behind a NAT, both registered and with a
    mesh tunnel between them (rekey every MESH_REKEY_S), keepalives every KEEPALIVE_S, the
    PoP's sessions rekeying every POP_REKEY_S; and the flooder's host on the Internet."""
    lab.add_inet()
    lab.add_router(1, nat="none")
    lab.add_router(2, nat="masquerade")
    s1, s2 = lab.add_site(1), lab.add_site(2)
    pop = lab.add_pop(1)
    lab.write_pop_config(
        pop,
        sites=[
            {
                "id": s.site_id,
                "name": f"site-{s.site_id}",
                "subnets": [s.lan_subnet],
                "offcloud": True,
            }
            for s in (s1, s2)
        ],
        tunnel={"rekey_s": POP_REKEY_S, "key_max_age_s": POP_REKEY_S + 60},
    )
    lab.start_popd(pop)
    for s, other in ((s1, s2), (s2, s1)):
        lab.write_site_config(
            s,
            tunnel={"rekey_s": MESH_REKEY_S, "keepalive_s": KEEPALIVE_S},
            extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:{pop.port}"\n\n'
            f'[mesh]\nkeepalive_s = {KEEPALIVE_S}\npin = ["{other.lan_subnet}"]\n',
        )
        lab.start_socketd(s)
    host = lab.add_public_host("flood", ip=FLOODER_IP)
    # The spoofed range routes to the flooder's host, as its ISP would announce it: answers
    # to spoofed sources (HelloVerifyRequests) go there and die.
    assert lab.inet is not None
    netns.route_add(lab.inet, SPOOF_NET, via=FLOODER_IP)
    return Scene(lab, pop, s1, s2, host.ns)


@dataclass
class Sample:
    at: float
    pop_sessions: dict[int, dict[str, Any]]  # site -> its PoP session (socketctl pop)
    mesh: dict[int, dict[str, Any]]  # site -> its mesh tunnel to the other (socketctl peers)


@dataclass
class Watch:
    """Samples the scene every interval_s in a thread of its own until stopped."""

    scene: Scene
    # Each sample is four socketctl runs (a Python process each): more often would load the
    # machine as much as the flood.
    interval_s: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        lab, sc = self.scene.lab, self.scene
        while not self._stop.is_set():
            t = time.monotonic()
            pops: dict[int, dict[str, Any]] = {}
            mesh: dict[int, dict[str, Any]] = {}
            for s, other in ((sc.public, sc.natted), (sc.natted, sc.public)):
                try:
                    ps = lab.socketctl(s, "pop")["sessions"]
                    pops[s.n] = ps[0] if ps else {}
                    peers = {p["site_id"]: p for p in lab.socketctl(s, "peers")["peers"]}
                    mesh[s.n] = peers.get(other.site_id, {})
                except Exception as e:  # a slow answer under load: noted, not fatal
                    self.errors.append(f"site {s.n}: {e}")
            self.samples.append(Sample(t, pops, mesh))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t)))

    # ---------------------------------------------------------------- figures

    def max_silence_s(self) -> dict[str, float]:
        """The longest time each session or tunnel went without a packet from its other end,
        as its status said (last_seen_s, last_rx_s), over every sample."""
        out: dict[str, float] = {}
        for smp in self.samples:
            for n, ps in smp.pop_sessions.items():
                v = ps.get("last_seen_s")
                if isinstance(v, int | float):
                    out[f"site{n}-pop"] = max(out.get(f"site{n}-pop", 0.0), float(v))
            for n, tn in smp.mesh.items():
                v = tn.get("last_rx_s")
                if isinstance(v, int | float):
                    out[f"site{n}-mesh"] = max(out.get(f"site{n}-mesh", 0.0), float(v))
        return out

    def not_up(self) -> list[str]:
        """Every sample where a PoP session was not connected or a mesh tunnel not up."""
        bad = []
        for smp in self.samples:
            for n, ps in smp.pop_sessions.items():
                if ps.get("state") != "connected":
                    bad.append(f"site {n} PoP session {ps.get('state')}: {ps.get('reason')}")
            for n, tn in smp.mesh.items():
                if tn.get("state") != "up":
                    bad.append(f"site {n} mesh tunnel {tn.get('state')}: {tn.get('reason')}")
        return bad


def handshakes(lab: Lab, site: Site, peer: int) -> tuple[int, int]:
    """(PoP session handshakes, mesh tunnel handshakes) of site."""
    ps = lab.socketctl(site, "pop")["sessions"]
    peers = {p["site_id"]: p for p in lab.socketctl(site, "peers")["peers"]}
    return int(ps[0]["handshakes"]), int(peers[peer]["handshakes"])


def lanes(lab: Lab, site: Site | None = None, pop: Pop | None = None) -> dict[str, int]:
    """The control_lanes status object of a site (socketctl) or of the PoP (popctl)."""
    if site is not None:
        return dict(lab.socketctl(site, "status")["control_lanes"])
    assert pop is not None
    return dict(lab.popctl(pop, "status")["control_lanes"])


def main_pid(d: netns.Daemon | None) -> int:
    assert d is not None
    pid = d.main_pid()
    assert pid is not None, f"{d.name} is gone"
    return pid
