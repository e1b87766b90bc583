"""The mesh swarm: N fake sites in one process, each a real mesh peer of one socketd, so that
a single socketd can be measured holding hundreds of mesh tunnels (bench/mesh, "swarm").

Each fake site is as real as the mesh asks of a peer: its own UDP socket (its own endpoint),
its own certificate of the account CA and `DtlsContext`, its own `SessionLayer` (cookies,
admission, the handshake table) and one `PeerTunnel` toward the socketd under test, so the
DTLS handshakes, the key hand-over into a fast path, the kicks and the authenticated
keepalives are the production code's. What is shared is only the process: fast paths carry
the fake sites' links (FP_MAX_LINKS, native/src/fp_internal.h, is 32 per instance, so there
is one `FastPath` per 32 fake sites), each fake site is its own fast-path peer (the id of its
link) in its fast path, and the control events of a fast path go to the fake site that owns
the event's link.

Nothing here talks to a PoP: socketd learns the fake sites from its store (NAT data and the
cloud directory, written by the bench before socketd starts), and the fake sites know
socketd's endpoint from the spec.

Run in the swarm's namespace: `python -m sdwan.lab.swarm SPEC.json`, where the spec is
`SwarmSpec` as JSON. It writes `ready_file` once every socket is bound and the fast paths run,
logs a line when the number of tunnels up changes, and exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sdwan.bindings.fastpath import CtrlEvent, FastPath, FastPathConfig, probe_ack
from sdwan.common.dtls import DtlsContext, DtlsSession
from sdwan.common.netdev import size_buffers
from sdwan.common.sessions import Policy, SessionLayer, SessionOwner
from sdwan.common.tomlcheck import parse_endpoint
from sdwan.pop import pki
from sdwan.site.tunnel import Addr, PeerTunnel, State, StaticTunnels, Timers

log = logging.getLogger("sdwan.lab.swarm")

LINKS_PER_FASTPATH = 32  # FP_MAX_LINKS in native/src/fp_internal.h
TICK_S = 0.05  # the loop's pace, as socketd's
# A fake site's clock: DTLS retransmissions, kicks, retries and key resends are 0.5 s apart
# or more, so 0.1 s is early enough while it handshakes; an up tunnel needs its clock only
# for keepalives, liveness and rekeys (seconds apart), as in socketd's mesh. Ticking hundreds
# of fake sites every 50 ms would make the swarm, not socketd, the busy process.
BUSY_TICK_S = 0.1
UP_TICK_S = 1.0
ACK_AFTER_S = 0.1  # as socketd's
SILENT_NEVER_S = 3600.0  # the fake sites judge their tunnel by its own dead_after
STATUS_EVERY_S = 2.0
MAX_EVENTS_PER_WAKEUP = 256
# One fake site has one peer: a handful of handshakes at most, never a queue of strangers.
FAKE_POLICY = Policy(max_handshaking=8, max_per_source=4)


@dataclass
class SwarmSpec:
    """What the swarm plays: fake site ids, one port each on bind_ip, toward one socketd."""

    target_site_id: int
    target_endpoint: str  # "ip:port" of socketd's link
    bind_ip: str
    first_port: int
    site_ids: list[int]
    ca: str  # the account CA certificate
    cert_dir: str  # site-<id>.pem and site-<id>.key per fake site (issue_site_certs)
    keepalive_s: float = 15.0
    rekey_s: float = 600.0
    ready_file: str | None = None

    @classmethod
    def load(cls, path: Path) -> SwarmSpec:
        return cls(**json.loads(path.read_text()))

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n")

    def port_of(self, index: int) -> int:
        return self.first_port + index


def issue_site_certs(ca_dir: Path, site_ids: Iterable[int], out_dir: Path) -> int:
    """site-<id>.pem and .key for every id, signed by the CA in ca_dir; how many were issued.
    The CA is loaded once (pki.issue_site reloads it per certificate): a thousand EC
    certificates in seconds. A folder that already holds the certificate and key of an id,
    issued by the same CA (its fingerprint in `ca.sha256`), keeps them: a bench's work folder
    serves as the cache of every run after the first."""
    ca_cert, ca_key = pki.load_ca(ca_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / "ca.sha256"
    fingerprint = ca_cert.fingerprint(hashes.SHA256()).hex()
    same_ca = stamp.exists() and stamp.read_text().strip() == fingerprint
    stamp.unlink(missing_ok=True)
    issued = 0
    for sid in site_ids:
        key_path, cert_path = out_dir / f"site-{sid}.key", out_dir / f"site-{sid}.pem"
        if same_ca and key_path.exists() and cert_path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = pki.build_site_certificate(ca_cert, ca_key, sid, key.public_key())
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued += 1
    stamp.write_text(fingerprint + "\n")
    return issued


def open_links(
    bind_ip: str, first_port: int, count: int, big_buffers: bool = False
) -> tuple[list[FastPath], list[tuple[int, int]]]:
    """One UDP socket per fake site on bind_ip, ports first_port.., LINKS_PER_FASTPATH of them
    to a fast path (not started): the fast paths, and per fake site (fast path index, link
    id). The link id is the fake site's index plus one. big_buffers: socket buffers sized as
    socketd's links are (a PoP's welcome to a thousand-site account is some 190 datagrams in
    one burst, more than a default buffer holds)."""
    # No warm-up wakeups: they are there to keep a busy link's cipher hot, and hundreds of
    # idle link threads waking every few ms would load the machine under measure.
    cfg = FastPathConfig.default()
    cfg.warm_ms = 0
    cfg.spin_us = 0
    fps: list[FastPath] = []
    links: list[tuple[int, int]] = []
    for i in range(count):
        if i % LINKS_PER_FASTPATH == 0:
            fps.append(FastPath(cfg))
        fp = fps[-1]
        link_id = i + 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if big_buffers:
                size_buffers(sock)
            sock.bind((bind_ip, first_port + i))
            sock.setblocking(False)
            fp.link_add(link_id, sock.fileno())  # the fast path keeps its own copy
        finally:
            sock.close()
        links.append((len(fps) - 1, link_id))
    return fps, links


class FakeSite:
    """One fake site: its session layer and its tunnel to socketd; the tunnel's Port."""

    def __init__(
        self,
        *,
        site_id: int,
        link_id: int,
        fp: FastPath,
        target_id: int,
        target: Addr,
        dtls: DtlsContext,
        timers: Timers,
        pmtu_delay_s: float = 0.0,
        tunnel_opts: dict[str, Any] | None = None,
        owner: Callable[[PeerTunnel], SessionOwner] | None = None,
    ) -> None:
        """target_id is the peer's site id, or the PoP's id for a fake site of the popd
        swarm (popswarm.py), which passes the PeerTunnel options of a PoP session in
        tunnel_opts and the session layer's owner for it in owner."""
        self.site_id = site_id
        self.link_id = link_id
        self.fp = fp
        self.sessions = SessionLayer(
            send=self.send, policy=FAKE_POLICY, my_site_id=site_id, dtls=dtls
        )
        # The fake site's peer in its fast path is its link id: socketd's site id would be
        # the same peer for every fake site sharing that fast path.
        fp.peer_add(link_id)
        fp.set_endpoint(link_id, link_id, target)
        self.tunnel = PeerTunnel(
            my_site_id=site_id,
            peer_site_id=target_id,
            link_id=link_id,
            link_name=f"swarm{link_id}",
            endpoint=target,
            fp=fp,
            port=self,
            timers=timers,
            fp_peer_id=link_id,
            pmtu_delay_s=pmtu_delay_s,
            **(tunnel_opts or {}),
        )
        self.sessions.add_owner(
            owner(self.tunnel) if owner is not None else StaticTunnels({target_id: self.tunnel})
        )
        self.next_tick = 0.0

    @property
    def up(self) -> bool:
        return self.tunnel.state is State.UP

    # Port
    def send(self, link_id: int, addr: Addr, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a full socket buffer: DTLS retransmits
            self.fp.ctrl_send(link_id, addr, data)

    def client_session(
        self, link_id: int, addr: Addr, expected_site_id: int | tuple[str, int]
    ) -> DtlsSession:
        return self.sessions.client_session(link_id, addr, expected_site_id)  # type: ignore[arg-type]

    def forget_session(self, session: DtlsSession) -> None:
        self.sessions.forget_session(session)

    def tick(self, now: float) -> None:
        self.sessions.tick()
        self.tunnel.tick()
        busy = not self.up or self.sessions.handshaking > 0
        self.next_tick = now + (BUSY_TICK_S if busy else UP_TICK_S)


class Swarm:
    def __init__(self, spec: SwarmSpec) -> None:
        self.spec = spec
        self.fps: list[FastPath] = []
        self.sites: list[FakeSite] = []
        self.by_link: dict[tuple[int, int], FakeSite] = {}  # (fast path index, link id)
        self._stop = asyncio.Event()

    def open(self) -> None:
        spec = self.spec
        target = parse_endpoint(spec.target_endpoint)
        timers = Timers(
            keepalive_s=spec.keepalive_s, rekey_s=spec.rekey_s, dead_after_s=2 * spec.keepalive_s
        )
        ca = Path(spec.ca)
        certs = Path(spec.cert_dir)
        self.fps, links = open_links(spec.bind_ip, spec.first_port, len(spec.site_ids))
        for i, sid in enumerate(spec.site_ids):
            fpi, link_id = links[i]
            fp = self.fps[fpi]
            dtls = DtlsContext(ca, certs / f"site-{sid}.pem", certs / f"site-{sid}.key", sid)
            site = FakeSite(
                site_id=sid,
                link_id=link_id,
                fp=fp,
                target_id=spec.target_site_id,
                target=target,
                dtls=dtls,
                timers=timers,
                # Spread as socketd's mesh spreads its own (docs/mesh.md, "Scale"): hundreds
                # of searches in one burst toward socketd lose probes, fail, and all ask again
                # a minute later, in the middle of the window the bench measures.
                pmtu_delay_s=random.uniform(0.0, min(20.0, len(spec.site_ids) / 100)),
            )
            self.sites.append(site)
            self.by_link[(fpi, link_id)] = site
        for fp in self.fps:
            fp.start()

    def _on_event(self, fpi: int, ev: CtrlEvent) -> None:
        if ev.event in (CtrlEvent.REKEY, CtrlEvent.KEY_EXPIRED):
            site = self.by_link.get((fpi, ev.peer_id))  # the peer id is the link id
            if site is not None:
                site.tunnel.on_rekey_needed()
            return
        if ev.event == CtrlEvent.PROBE_ACK:
            # socketd's answer to a path MTU probe: to the fake site's own tunnel, by the
            # fast-path peer id (its link id), which its StaticTunnels does not key by. Lost,
            # every fake site's search fails and all of them search again each minute.
            site = self.by_link.get((fpi, ev.peer_id))
            ack = probe_ack(ev.data)
            if site is not None and ack is not None:
                site.tunnel.pmtu.on_ack(ev.link_id, *ack)
            return
        site = self.by_link.get((fpi, ev.link_id))
        if site is not None:
            site.sessions.on_ctrl_event(ev)

    def _readable(self, fpi: int) -> None:
        self.fps[fpi].ctrl_drain(lambda ev: self._on_event(fpi, ev), MAX_EVENTS_PER_WAKEUP)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for fpi, fp in enumerate(self.fps):
            loop.add_reader(fp.ctrl_fd, self._readable, fpi)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        if self.spec.ready_file:
            Path(self.spec.ready_file).write_text(f"{len(self.sites)}\n")
        log.info("swarm: %d fake sites on %s:%d.., %d fast paths, toward site %d at %s",
                 len(self.sites), self.spec.bind_ip, self.spec.first_port, len(self.fps),
                 self.spec.target_site_id, self.spec.target_endpoint)
        last_up = -1
        next_status = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            for fp in self.fps:
                # Keepalives on idle tunnels, as a site's socketd sends them (tunnel.md).
                fp.liveness_scan(ACK_AFTER_S, SILENT_NEVER_S)
            for site in self.sites:
                if now >= site.next_tick:
                    try:
                        site.tick(now)
                    except Exception:
                        log.exception("fake site %d tick failed", site.site_id)
                        site.next_tick = now + UP_TICK_S
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                up = sum(1 for s in self.sites if s.up)
                if up != last_up:
                    log.info("swarm: %d/%d tunnels up", up, len(self.sites))
                    last_up = up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), TICK_S)
        for fp in self.fps:
            loop.remove_reader(fp.ctrl_fd)

    def close(self) -> None:
        for fp in self.fps:
            fp.close()


def run_swarm(
    prog: str, doc: str, load: Callable[[Path], Any], argv: Sequence[str] | None
) -> int:
    """The command line of a swarm (this one, popswarm): its spec as JSON, logging, and the
    swarm that `load` builds from it run until SIGTERM or SIGINT."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.splitlines()[0])
    p.add_argument("spec", type=Path, help="the swarm's spec as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # Handshake failures of single fake sites would drown the swarm's own lines.
    logging.getLogger("sdwan.site.tunnel").setLevel(logging.WARNING)
    logging.getLogger("sdwan.common.sessions").setLevel(logging.ERROR)
    swarm = load(args.spec)
    try:
        swarm.open()
        asyncio.run(swarm.run())
    finally:
        swarm.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_swarm(
        "sdwan.lab.swarm", __doc__ or "", lambda path: Swarm(SwarmSpec.load(path)), argv
    )

if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
