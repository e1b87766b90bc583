"""The popd swarm: N fake sites in one process, each with a real DTLS session to one popd, so
that popd can be measured with a thousand sites registering, flapping and uploading events
(bench/popd, tests/lab/test_popd_load.py).

It is the mesh swarm (swarm.py) pointed at a PoP: each fake site has its own UDP socket, its
own certificate of the account CA and `DtlsContext`, its own `SessionLayer` and one
`PeerTunnel` toward popd, as the client, with the options socketd's cloud gives a PoP session
(site/cloud.py). On top of it a `PopClient` speaks the cloud protocol (docs/cloud.md) as a
site's cloud does: `register` once the keys are handed over, the `welcome`, the directory and
its deltas (a delta on another base is a gap), a `ping` with the directory's rev once a
second, `events` uploads at the spec's rate. Keepalives to popd come from the fast paths'
own pass (pop/keepalives.py, as popd sends its own), every `keepalive_ms`.

What the swarm adds to the load: flaps (a fake site closes its session and opens a new one,
`flaps_per_s` over the swarm), an event flood from one site (`flood_site`, far over its
quota) and a register flood from another (`register_flood_site`: `register` again and again
on its session). What it measures of popd from the sites' side: `silences`, how often a fake
site heard nothing from popd for `dead_after_ms` (what a real site would call the cloud
down), and the directory's gaps.

Run in the swarm's namespace: `python -m sdwan.lab.popswarm SPEC.json`, where the spec is
`PopSwarmSpec` as JSON. It writes `ready_file` once every socket is bound, `status_file` (JSON,
`PopSwarmStats`) every 2 s and at the end, and exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdwan.bindings.fastpath import FastPathError
from sdwan.common.dtls import DtlsContext, DtlsSession
from sdwan.common.tomlcheck import format_endpoint, parse_endpoint
from sdwan.lab.swarm import FakeSite, Swarm, open_links, run_swarm
from sdwan.pop.keepalives import KeepaliveThread
from sdwan.site.tunnel import PeerTunnel, State, StaticTunnels, Timers

log = logging.getLogger("sdwan.lab.popswarm")

TICK_S = 0.05
STATUS_EVERY_S = 2.0
SILENCE_CHECK_S = 0.1
GIVE_UP_S = 30.0  # up but never welcomed for this long: popd lost the session, handshake again
REGISTER_RESEND_S = 10.0  # a register without a welcome is sent again (a big welcome is slow)
UP_TICK_S = 1.0
BUSY_TICK_S = 0.1


@dataclass
class PopSwarmSpec:
    """What the swarm plays: fake site ids, one port each on bind_ip, toward one popd."""

    pop_id: int
    pop_endpoint: str  # "ip:port" of popd
    bind_ip: str
    first_port: int
    site_ids: list[int]
    ca: str  # the account CA certificate
    cert_dir: str  # site-<id>.pem and .key per fake site (swarm.issue_site_certs)
    keepalive_ms: int = 200
    dead_after_ms: int = 600
    ping_s: float = 1.0
    start_spread_s: float = 10.0  # first handshakes spread over this long
    events_per_minute: float = 0.0  # per fake site
    event_batch: int = 10
    flaps_per_s: float = 0.0  # over the swarm, once every fake site has registered
    flood_site: int | None = None
    flood_events_per_s: float = 0.0
    register_flood_site: int | None = None
    register_flood_per_s: float = 0.0
    ready_file: str | None = None
    status_file: str | None = None

    @classmethod
    def load(cls, path: Path) -> PopSwarmSpec:
        return cls(**json.loads(path.read_text()))

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n")


@dataclass
class PopSwarmStats:
    sites: int = 0
    up: int = 0  # sessions with keys handed over
    registered: int = 0  # welcomed
    registrations_sent: int = 0
    welcomes: int = 0
    refused: int = 0  # `error` messages from popd (a refused registration)
    refused_rate: int = 0  # of them, for the registration rate
    deltas: int = 0
    full_directories: int = 0
    gaps: int = 0  # deltas on another base than the site's rev
    directory_bytes: int = 0  # welcomes, directories and deltas received (JSON)
    events_sent: int = 0
    events_acked: int = 0
    flaps: int = 0
    silences: int = 0  # a registered fake site heard nothing from popd for dead_after_ms
    pings: int = 0
    pongs: int = 0
    at: float = 0.0
    welcomed_once: int = 0  # fake sites welcomed at least once
    given_up: int = 0  # sessions closed after GIVE_UP_S without a welcome
    # From the start until every fake site (but the register flooder) was welcomed once.
    first_all_registered_s: float | None = None


class _PopOwner(StaticTunnels):
    """The session layer's owner of one fake site: its one tunnel, to the PoP."""

    def __init__(self, tunnel: PeerTunnel, pop_id: int) -> None:
        super().__init__({pop_id: tunnel})
        self.tunnel, self.pop_id = tunnel, pop_id

    def tunnel_for(self, session: DtlsSession) -> PeerTunnel | None:
        who = session.peer_identity if session.established else session.expected_identity
        return self.tunnel if who is not None and tuple(who) == ("pop", self.pop_id) else None


@dataclass(eq=False)
class PopClient:
    """The cloud protocol of one fake site over its FakeSite's tunnel."""

    swarm: PopSwarm
    site_id: int
    local: str
    site: FakeSite | None = None
    registered: bool = False
    rev: int | None = None
    next_seq: int = 1
    next_ping_at: float = 0.0
    next_event_at: float = 0.0
    next_register_at: float = 0.0
    silent: bool = False
    welcomed_once: bool = False
    unwelcomed_since: float | None = None
    pings: dict[int, float] = field(default_factory=dict)

    @property
    def tunnel(self) -> PeerTunnel:
        assert self.site is not None
        return self.site.tunnel

    def link(self) -> dict[str, Any]:
        return {
            "name": "wan1",
            "precedence": 1,
            "local": self.local,
            "id": 1,
            "public_stun": None,
            "offcloud": False,
            "static": None,
            "nat": None,
        }

    def register(self, now: float) -> None:
        if self.unwelcomed_since is None:
            self.unwelcomed_since = now
        self.next_register_at = now + REGISTER_RESEND_S
        msg = {
            "t": "register",
            "site_id": self.site_id,
            "version": "popswarm",
            "link": self.link(),
            "links": [self.link()],
        }
        if self.tunnel.send_message(msg):
            self.swarm.stats.registrations_sent += 1

    def on_keys_active(self, _session: DtlsSession) -> None:
        self.registered = False
        self.silent = False
        assert self.site is not None
        # As socketd's PoP sessions: keepalives whenever nothing else went out for
        # keepalive_ms, here from the swarm's keepalive thread (check_liveness is off, so the
        # tunnel sets none itself).
        with contextlib.suppress(FastPathError):
            self.site.fp.set_keepalive(self.site.link_id, self.swarm.pspec.keepalive_ms / 1000)
        self.register(time.monotonic())

    def on_message(self, _session: DtlsSession, msg: dict[str, Any]) -> None:
        st = self.swarm.stats
        kind = msg.get("t")
        if kind in ("welcome", "directory", "directory-delta"):
            st.directory_bytes += len(json.dumps(msg))
        if kind == "welcome":
            st.welcomes += 1
            self.rev = msg.get("rev")
            self.unwelcomed_since = None
            if not self.registered:
                self.registered = True
                if not self.welcomed_once:
                    self.welcomed_once = True
                    self.swarm.stats.welcomed_once += 1
                now = time.monotonic()
                self.next_ping_at = now + random.uniform(0, self.swarm.pspec.ping_s)
                self.next_event_at = now + random.uniform(0, self._event_every() or 1.0)
        elif kind == "directory":
            st.full_directories += 1
            self.rev = msg.get("rev")
        elif kind == "directory-delta":
            st.deltas += 1
            if msg.get("rev") == self.rev:
                return
            if msg.get("base") != self.rev:
                st.gaps += 1  # the next ping brings the whole directory
                return
            self.rev = msg.get("rev")
        elif kind == "pong":
            if self.pings.pop(msg.get("id"), None) is not None:  # type: ignore[arg-type]
                st.pongs += 1
        elif kind == "events-ack":
            up_to = msg.get("up_to")
            if isinstance(up_to, int):
                self.swarm.acked(self, up_to)
        elif kind == "error":
            st.refused += 1
            if "rate limit" in str(msg.get("reason")):
                st.refused_rate += 1
            self.registered = False

    def _event_every(self) -> float | None:
        spec = self.swarm.pspec
        if self.site_id == spec.flood_site and spec.flood_events_per_s > 0:
            return spec.event_batch / spec.flood_events_per_s
        if spec.events_per_minute > 0:
            return spec.event_batch * 60 / spec.events_per_minute
        return None

    def tick(self, now: float) -> None:
        """The protocol's clock: pings, uploads, registers resent or flooded."""
        spec = self.swarm.pspec
        if self.tunnel.state is not State.UP:
            return
        if not self.registered:
            if self.unwelcomed_since is not None and now - self.unwelcomed_since > GIVE_UP_S:
                # As socketd would find the PoP silent: popd dropped this session (the swarm
                # was too slow to keep it alive) and reads nothing of it any more.
                self.unwelcomed_since = None
                self.tunnel.end("never welcomed")
                self.swarm.stats.given_up += 1
                return
            if now >= self.next_register_at:
                self.register(now)
            return
        flood = self.site_id == spec.register_flood_site and spec.register_flood_per_s > 0
        if flood and now >= self.next_register_at:
            self.register(now)
            self.next_register_at = now + 1 / spec.register_flood_per_s
        if now >= self.next_ping_at:
            self.next_ping_at = now + spec.ping_s
            pid = self.swarm.next_ping_id()
            self.pings[pid] = now
            while len(self.pings) > 8:
                del self.pings[min(self.pings)]
            if self.tunnel.send_message({"t": "ping", "id": pid, "rev": self.rev}):
                self.swarm.stats.pings += 1
        every = self._event_every()
        if every is not None and now >= self.next_event_at:
            self.next_event_at = now + every
            at = time.time()
            events = []
            for _ in range(spec.event_batch):
                events.append(
                    {
                        "seq": self.next_seq,
                        "at": at,
                        "kind": "swarm.event",
                        "text": f"fake site {self.site_id} event {self.next_seq}",
                        "data": {"n": self.next_seq},
                    }
                )
                self.next_seq += 1
            msg = {"t": "events", "events": events, "instance": f"popswarm-{self.site_id}"}
            if self.tunnel.send_message(msg):
                self.swarm.stats.events_sent += len(events)


class PopSwarm(Swarm):
    """The mesh swarm's fast paths, fake sites and control events, toward a popd."""

    def __init__(self, spec: PopSwarmSpec) -> None:  # type: ignore[override]
        self.pspec = spec
        self.stats = PopSwarmStats(sites=len(spec.site_ids))
        self.clients: list[PopClient] = []
        self._acked: dict[int, int] = {}
        self._ping_id = 0
        self._keepalives: KeepaliveThread | None = None
        self._started = time.monotonic()
        super().__init__(spec)  # type: ignore[arg-type]  # Swarm's spec is unused here

    def next_ping_id(self) -> int:
        self._ping_id += 1
        return self._ping_id

    def acked(self, client: PopClient, up_to: int) -> None:
        before = self._acked.get(client.site_id, 0)
        if up_to > before:
            self._acked[client.site_id] = up_to
            self.stats.events_acked += up_to - before

    def open(self) -> None:
        spec = self.pspec
        target = parse_endpoint(spec.pop_endpoint)
        timers = Timers(
            keepalive_s=spec.keepalive_ms / 1000,
            rekey_s=600.0,
            dead_after_s=spec.dead_after_ms / 1000,
        )
        ca, certs = Path(spec.ca), Path(spec.cert_dir)
        self.fps, links = open_links(
            spec.bind_ip, spec.first_port, len(spec.site_ids), big_buffers=True
        )
        for i, sid in enumerate(spec.site_ids):
            fpi, link_id = links[i]
            client = PopClient(self, sid, format_endpoint((spec.bind_ip, spec.first_port + i)))
            dtls = DtlsContext(ca, certs / f"site-{sid}.pem", certs / f"site-{sid}.key", sid)
            site = FakeSite(
                site_id=sid,
                link_id=link_id,
                fp=self.fps[fpi],
                target_id=spec.pop_id,
                target=target,
                dtls=dtls,
                timers=timers,
                # What socketd's cloud gives a PoP session (site/cloud.py).
                tunnel_opts={
                    "expected": ("pop", spec.pop_id),
                    "initiator": True,
                    "kicks": False,
                    "check_liveness": False,
                    "keep_session": True,
                    "on_app_message": client.on_message,
                    "on_keys_active": client.on_keys_active,
                },
                owner=lambda tunnel: _PopOwner(tunnel, spec.pop_id),
            )
            # The first handshakes spread, as sites come up one by one, not in one burst.
            site.next_tick = self._started + random.uniform(0, spec.start_spread_s)
            client.site = site
            self.sites.append(site)
            self.clients.append(client)
            self.by_link[(fpi, link_id)] = site
        for fp in self.fps:
            fp.start()
        self._keepalives = KeepaliveThread(self.fps, spec.keepalive_ms / 1000)
        self._keepalives.start()

    def _check_silence(self, now_ns: int) -> None:
        dead_ns = self.pspec.dead_after_ms * 1_000_000
        for c in self.clients:
            if not c.registered or c.site is None:
                c.silent = False
                continue
            try:
                last = c.site.fp.peer_counters(c.site.link_id).last_rx_ns
            except FastPathError:
                continue
            silent = last != 0 and now_ns - last > dead_ns
            if silent and not c.silent:
                self.stats.silences += 1
            c.silent = silent

    def _flap(self) -> None:
        spec = self.pspec
        candidates = [
            c
            for c in self.clients
            if c.registered and c.site_id not in (spec.flood_site, spec.register_flood_site)
        ]
        if not candidates:
            return
        c = random.choice(candidates)
        c.registered = False
        c.tunnel.end("flap")
        self.stats.flaps += 1

    def _write_status(self) -> None:
        st = self.stats
        st.at = time.time()
        st.up = sum(1 for s in self.sites if s.up)
        st.registered = sum(1 for c in self.clients if c.registered)
        need = len(self.clients) - (1 if self.pspec.register_flood_site is not None else 0)
        if st.first_all_registered_s is None and st.welcomed_once >= need:
            st.first_all_registered_s = round(time.monotonic() - self._started, 2)
        if self.pspec.status_file:
            tmp = Path(self.pspec.status_file + ".tmp")
            tmp.write_text(json.dumps(asdict(st)) + "\n")
            tmp.replace(self.pspec.status_file)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for fpi, fp in enumerate(self.fps):
            loop.add_reader(fp.ctrl_fd, self._readable, fpi)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        spec = self.pspec
        if spec.ready_file:
            Path(spec.ready_file).write_text(f"{len(self.sites)}\n")
        log.info(
            "popswarm: %d fake sites on %s:%d.., %d fast paths, toward PoP %d at %s",
            len(self.sites),
            spec.bind_ip,
            spec.first_port,
            len(self.fps),
            spec.pop_id,
            spec.pop_endpoint,
        )
        next_status = next_silence = 0.0
        next_flap = 0.0
        # Flaps start once every fake site (but the register flooder) has been welcomed: the
        # start is measured on its own, the flaps are the steady load's.
        need = len(self.clients) - (1 if spec.register_flood_site is not None else 0)
        flapping = False
        while not self._stop.is_set():
            now = time.monotonic()
            for site, client in zip(self.sites, self.clients, strict=True):
                if now >= site.next_tick:
                    try:
                        site.tick(now)
                    except Exception:
                        log.exception("fake site %d tick failed", site.site_id)
                    busy = not site.up or site.sessions.handshaking > 0 or not client.registered
                    site.next_tick = now + (BUSY_TICK_S if busy else UP_TICK_S)
                try:
                    client.tick(now)
                except Exception:
                    log.exception("fake site %d protocol tick failed", client.site_id)
            if not flapping and spec.flaps_per_s > 0 and now >= next_status:
                flapping = self.stats.welcomed_once >= need
            if flapping and now >= next_flap:
                next_flap = now + random.expovariate(spec.flaps_per_s)
                self._flap()
            if now >= next_silence:
                next_silence = now + SILENCE_CHECK_S
                self._check_silence(time.monotonic_ns())
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                self._write_status()
                log.info("popswarm: %s", json.dumps(asdict(self.stats)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), TICK_S)
        self._write_status()
        for fp in self.fps:
            loop.remove_reader(fp.ctrl_fd)

    def close(self) -> None:
        if self._keepalives is not None:
            self._keepalives.stop()
            self._keepalives = None
        super().close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_swarm(
        "sdwan.lab.popswarm", __doc__ or "", lambda path: PopSwarm(PopSwarmSpec.load(path)), argv
    )

if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
