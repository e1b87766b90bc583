"""The off-cloud mesh: a direct, authenticated tunnel to every other off-cloud site of the
account, punched through NATs with the PoP's help and remembered across restarts
(docs/mesh.md).

Owns, per remote site: one fast-path peer (its site id) with one endpoint per link that found
a path, one `PeerTunnel` for its DTLS handshakes, keys and liveness (tunnel.py: the higher
site id initiates), and per local link a `MeshPath`: the punch the PoP sent (generation,
secret, the peer's candidates), the probes in flight, the endpoint found and how (cache,
window, local, static), the NAT data written to the store when the tunnel comes up, and the
reason when the path is not direct. It is the session layer's owner of those sites' sessions,
the handler of probe datagrams, and the `mesh` producer of candidates for paths.py (a
prefix pinned to the mesh goes there while its site's tunnel is up: `pin_override`).

A path's life: a `punch` from the PoP (or, at start, a NAT data entry) -> probes to the
peer's candidates (`probe_window` ports around its public port, its local and static
addresses), answering the peer's probes meanwhile -> the first answered probe fixes the
endpoint -> DTLS handshake there -> keys in the fast path -> direct. A path that stops
answering (the tunnel's liveness), a cached endpoint that does not answer within
CACHE_PATIENCE_S, and a punch that found nothing ask the PoP to punch again, with backoff.

When one side's NAT randomises its ports the PoP's next punch is a `birthday` one
(birthday.py has the numbers): the randomising (hard) side opens `birthday_sockets` extra
sockets and probes the peer from each, the other (easy) side probes `birthday_probes` random
ports of the hard side's address. The extra socket a probe got through becomes a fast-path link
of its own (an id from EXTRA_LINK_BASE up: `MeshPath.fp_link`), the tunnel runs over it, and
the others are closed. When both sides randomise, nothing can be punched: the path stays on the
cloud and says why.

Like tunnel.py it does no I/O itself; socketd calls `tick()` and gives it a Port, and the
extra sockets' I/O (birthday.LinkSockets).
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sdwan.bindings.fastpath import FastPath, FastPathError
from sdwan.common import probe
from sdwan.common.dtls import DtlsSession
from sdwan.common.revocation import Revocations
from sdwan.common.sessions import SessionOwner
from sdwan.common.store import NatEntry, StoreError
from sdwan.common.tomlcheck import IPNetwork, format_endpoint, parse_endpoint
from sdwan.site.birthday import NAT_PORTS, LinkSockets, random_ports
from sdwan.site.config import Mesh as MeshConfig
from sdwan.site.health import Target
from sdwan.site.links import LinkManager, WanLink
from sdwan.site.paths import Candidate, Network, Override, Paths, Policy, Transport
from sdwan.site.sources import add_peer
from sdwan.site.tunnel import Addr, PeerTunnel, Port, State, Timers

log = logging.getLogger("sdwan.site.mesh")

PATHS_PRODUCER = "mesh"
# Probe rounds, seconds after the punch: dense at first (both NATs open within a round trip),
# then sparser until punch_timeout_s.
ROUNDS_AT = (0.0, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.5, 8.0, 10.0, 13.0, 16.0, 20.0)
CACHE_PATIENCE_S = 3.0  # a cached endpoint that has not answered by then is punched again
REPUNCH_MIN_S = 2.0  # between two requests for the same path
REPUNCH_MAX_S = 300.0  # a pair that cannot be punched is asked for again this rarely
# Request nonces remembered per path while its punch is open, against replays: more than one
# punch's worth of a peer's requests (window and candidates times the rounds).
SEEN_KEPT = 1024
PUNCHBACKS_MAX = 64  # requests sent back toward probe sources, per punch
NAT_DATA_MAX_AGE_S = 7 * 86400  # older NAT data is not worth trying at start
# NAT data that has not changed is written again only this often (to keep its age fresh): a
# restart's hundreds of tunnels back from the store must not cost a synced write each.
NAT_DATA_REFRESH_S = 86400
HOLD_MIN_S = 5.0  # off the mesh after a path went silent under traffic...
HOLD_MAX_S = 120.0  # ...doubling up to this while it keeps happening
HOLD_MEMORY_S = 300.0  # a silence longer ago than this starts again at HOLD_MIN_S
MISSING_CHECK_S = 15.0  # how often sites of the directory without a path are looked for
MISSING_ASK_MAX = 32  # punch requests for them per check
# Probes sent per supervisor tick (50 ms) over all paths: 999 peers punched at once must not
# burst 32k datagrams into one socket; about 20k a second still starts every punch in 2 s.
PROBES_PER_TICK = 1024
HEALTH_TARGETS = 3  # peers link health probes over each link (with the PoP, plenty)
PROBE_TARGET_SCAN = 64  # peers looked at per call for those (a cursor goes round them all)
# A settled tunnel's clock runs when it has something to do, and at least this often (its
# path MTU search looks for a new endpoint then), but not more often than MIN_TURN_S.
QUIET_TURN_S = 10.0
MIN_TURN_S = 0.5
# A turn more than TURN_GRID_AFTER_S away (a silence to judge, a rekey, the quiet turn) is
# put on a TURN_GRID_S grid: hundreds of settled peers whose clocks are spread over time
# then share a few ticks a second instead of waking socketd for each (docs/mesh.md, "Scale").
TURN_GRID_S = 1.0
TURN_GRID_AFTER_S = 2.0
# A second path quiet for two keepalive intervals is asked with a probe before it is given
# up (the peer may send its keepalives more rarely); no answer within this: it is dead.
PATH_CHECK_WAIT_S = 2.0
MAX_HANDSHAKES = 64  # mesh tunnels' own handshakes under way at once
# Kicks per tick (about 320 a second): as responder, each draws a peer's handshake into a
# session layer that admits 256 at once and does a few hundred a second.
MAX_KICKS_PER_TICK = 16
# First path MTU searches of new tunnels start at about this many a second, over at most
# PMTU_SPREAD_MAX_S (a search sends about 50 probes; 999 at once would be 50k).
PMTU_SPREAD_RATE = 100.0
PMTU_SPREAD_MAX_S = 20.0
RANDOMISING = "port-randomising"  # the NAT class (links.py) the birthday approach is for
BOTH_RANDOMISE = (
    "both sides randomise their NAT ports: no direct path can be punched; traffic stays on"
    " the cloud path"
)
# The easy side of a birthday punch: it waits a little for the hard side's sockets to have
# opened their mappings, then probes at this pace: 1024 probes take 2 s, about 300 kbit/s of
# 76-byte datagrams, which neither floods a small uplink nor fills a NAT's table in a burst.
BIRTHDAY_START_S = 0.3
BIRTHDAY_PPS = 500
# The hard side probes the easy side from every socket at these times (s after the punch): one
# probe opens the mapping; the second covers a lost one and the NAT's idle timer.
BIRTHDAY_ROUNDS_AT = (0.0, 1.0)
# Fast-path link ids of birthday sockets (configured links are 1..4). The fast path holds 32
# sockets in all, so at most MAX_EXTRA_LINKS birthday paths can be up at once; and a punch under
# way holds birthday_sockets descriptors, so at most MAX_SPRAYS run at once.
EXTRA_LINK_BASE = 64
MAX_EXTRA_LINKS = 24
MAX_SPRAYS = 2


class PathState(StrEnum):
    PUNCHING = "punching"  # probing the peer's candidates
    CONNECTING = "connecting"  # an endpoint is known (found or cached): handshaking
    DIRECT = "direct"  # the tunnel is up over this path
    WAITING = "cloud only"  # nothing found yet: waiting for a punch from the PoP


@dataclass
class MeshStats:
    punches: int = 0
    punches_malformed: int = 0
    punches_ignored: int = 0  # for a link or site that takes no mesh tunnel
    punch_requests: int = 0
    probes_sent: int = 0
    probes_answered: int = 0  # requests we answered
    probes_malformed: int = 0
    probes_foreign: int = 0  # for another site, from a site or of a punch we do not know
    probes_bad_tag: int = 0
    probes_replayed: int = 0
    probes_unmatched: int = 0  # responses to no request of ours
    birthday_punches: int = 0  # birthday punches started, either side
    birthday_sockets: int = 0  # extra sockets opened for them (hard side)
    birthday_found: int = 0  # birthday punches that found a path
    paths_silent: int = 0  # direct paths of a multi-link peer found dead on their own


@dataclass(slots=True)  # hundreds of them: no __dict__ each
class MeshPath:
    """One local link's path to one peer."""

    link_id: int
    link_name: str
    state: PathState = PathState.WAITING
    reason: str | None = "waiting for the PoP to broker a punch"
    peer_link: int | None = None
    gen: int | None = None
    secret: bytes | None = None
    candidates: list[tuple[str, Addr]] = field(default_factory=list)
    window: int = 32
    peer_nat: str | None = None
    endpoint: Addr | None = None
    how: str | None = None
    punched_at: float | None = None
    rounds: int = 0
    nonces: dict[bytes, tuple[float, Addr, str]] = field(default_factory=dict)
    targets: set[Addr] = field(default_factory=set)  # where this punch's requests went
    punchbacks: int = 0
    seen: dict[bytes, None] = field(default_factory=dict)
    punch_at: float | None = None  # when the punch arrived: its probes count until it closes
    rtt_ms: float | None = None
    since: float = 0.0  # of the current state
    cache_until: float | None = None
    next_request: float = 0.0
    request_backoff: float = REPUNCH_MIN_S
    punches: int = 0
    mode: str = "window"  # of the punch: "window" or "birthday"
    role: str | None = None  # in a birthday punch: "hard" (our NAT randomises) or "easy"
    # The fast-path link the path's probes and tunnel use: the link's own socket, or the
    # socket a birthday punch found (`extra`, bound to `extra_port`).
    fp_link: int = 0
    extra: int | None = None
    extra_port: int | None = None
    spray: list[socket.socket | None] = field(default_factory=list)  # hard side: the sockets
    guesses: list[int] = field(default_factory=list)  # easy side: the ports to probe
    sprayed: int = 0  # easy side: probes sent to guesses so far
    stored: NatEntry | None = None  # the path's NAT data as last read or written
    # A direct path of a peer with several: its endpoint's received-packet count at the
    # peer's last turn, and when that count last moved (Mesh._judge_paths).
    rx_mark: int = -1
    rx_at: float = 0.0
    checked_at: float | None = None  # when a probe asked whether the quiet path still answers

    def __post_init__(self) -> None:
        self.fp_link = self.fp_link or self.link_id

    def set(self, state: PathState, reason: str | None, now: float) -> None:
        if state is not self.state:
            self.since = now
        self.state, self.reason = state, reason


@dataclass(slots=True)
class MeshPeer:
    site_id: int
    paths: dict[int, MeshPath] = field(default_factory=dict)  # by local link id
    tunnel: PeerTunnel | None = None
    up: bool = False  # what the last Off-Cloud Transport event said
    next_tick: float = 0.0  # of its tunnel, while up
    turn_at: float | None = None  # its next turn while settled (Mesh._due)
    # After its path went silent under traffic, the peer carries no traffic until hold_until
    # even if its tunnel comes straight back: a lossy path must not flip traffic between the
    # cloud and the mesh every second. hold_s doubles while silences keep coming.
    hold_until: float = 0.0
    hold_s: float = 0.0
    last_silence: float = -1e9


def window_ports(port: int, window: int) -> list[int]:
    """window ports around port, nearest first (port, +1, -1, +2, ...), inside 1..65535."""
    out: list[int] = []
    step = 0
    while len(out) < window and step <= 65535:
        for p in (port + step, port - step) if step else (port,):
            if 1 <= p <= 65535 and len(out) < window:
                out.append(p)
        step += 1
    return out


def _how_for(path: MeshPath, addr: Addr) -> str:
    """How a path to addr was found: the kind of the candidate it is, else the port window."""
    for how, cand in path.candidates:
        if cand == addr and how in ("local", "static"):
            return how
    return "window"


def pin_override(pins: Sequence[IPNetwork]) -> Override | None:
    """Paths' override that sends a prefix inside a pinned network over the mesh whenever a
    mesh candidate for it is usable; None without pins."""
    if not pins:
        return None
    nets = tuple(ipaddress.ip_network(p) for p in pins)

    def override(prefix: Network, usable: Sequence[Candidate], _policy: Policy) -> Candidate | None:
        if not any(prefix.version == n.version and prefix.subnet_of(n) for n in nets):  # type: ignore[arg-type]
            return None
        return next((c for c in usable if c.transport is Transport.MESH), None)

    return override


class Mesh(SessionOwner):
    def __init__(
        self,
        *,
        site_id: int,
        cfg: MeshConfig,
        links: LinkManager,
        fp: FastPath,
        port: Port,
        paths: Paths,
        timers: Timers,
        directory: Callable[[], list[dict[str, Any]]],
        ask_pop: Callable[[int, dict[str, Any]], bool],
        static_ids: Container[int] = (),
        account_offcloud: Callable[[], bool | None] = lambda: None,
        directory_known: Callable[[], bool] = lambda: False,
        on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sockets: LinkSockets | None = None,
        rng: random.Random | None = None,
        link_weights: Callable[[], tuple[int, Sequence[tuple[int, int]]]] | None = None,
    ) -> None:
        self.site_id = site_id
        self.cfg = cfg
        self.links = links
        self.fp = fp
        self.port = port
        self.paths = paths
        self.timers = timers
        self.directory = directory
        self.ask_pop = ask_pop
        self.static_ids = static_ids
        self.account_offcloud = account_offcloud  # this site's flag in the account, if known
        self.directory_known = directory_known  # an empty directory() is a real one
        self.on_event = on_event or (lambda kind, text, data: None)
        self.clock = clock
        self.sockets = sockets  # None: no birthday punch as the hard side
        self.rng = rng or random.Random()
        self.stats = MeshStats()
        self.remotes: dict[int, MeshPeer] = {}
        # (generation, (link id, weight)...) of the links off-cloud traffic uses
        # (site/steering.py); None: the best-ranked direct path carries it.
        self.link_weights = link_weights
        # Whether link health finds a link down (site/health.py); None: the device's state.
        self.link_down: Callable[[int], bool] | None = None
        self._weights_gen: int | None = None
        # Link health's witnesses are taken in turn from these (probe_targets).
        self._probe_order: list[int] = []
        self._probe_cursor = 0
        self._dirty = True  # candidates to submit again
        self._budget = PROBES_PER_TICK
        self._rr = 0
        # The tick's schedule (see _due): peers whose clock runs every tick, and the others'
        # next turn, (when, site id), an entry counting only while it is the peer's turn_at.
        self._busy: set[int] = set()
        self._turns: list[tuple[float, int]] = []
        self._in_handshake: set[int] = set()  # peers whose tunnel's own handshake is under way
        self._handshakes = 0  # mesh tunnels' own handshakes under way, this tick
        self._kicks = 0  # kicks sent this tick
        # Directory sites without a path, asked for (next time, backoff); see _ask_for_missing.
        self._missing: dict[int, tuple[float, float]] = {}
        self._next_missing_check = clock() + MISSING_CHECK_S

    @property
    def enabled(self) -> bool:
        """[mesh] enabled, and the account does not say off-cloud is off for this site."""
        return self.cfg.enabled and self.account_offcloud() is not False

    def usable_link(self, link_id: Any) -> WanLink | None:
        """The link if it carries mesh tunnels."""
        if isinstance(link_id, bool) or not isinstance(link_id, int):
            return None
        wl = self.links.get(link_id)
        if wl is None or not wl.link.offcloud or wl.precedence >= 3:
            return None
        return wl

    # ---------------------------------------------------------------- start from NAT data

    def load_cache(self) -> int:
        """Reconnect from the stored NAT data at once, without the PoP; returns how many
        paths were loaded."""
        if not self.enabled:
            return 0
        now = self.clock()
        loaded = 0
        # Only sites the last directory we had still lists as off-cloud (a removed or revoked
        # site gets no tunnel back from old NAT data), and only recent entries.
        meshing = self._meshing_sites()
        for wl in self.links:
            if self.usable_link(wl.id) is None:
                continue
            try:
                entries = wl.nat_all()
            except (StoreError, OSError) as e:
                log.warning("NAT data of %s unreadable: %s", wl.name, e)
                continue
            for entry in entries:
                if entry.peer_id == self.site_id or entry.peer_id in self.static_ids:
                    continue
                stale = time.time() - entry.at > NAT_DATA_MAX_AGE_S
                if stale or (meshing is not None and entry.peer_id not in meshing):
                    with contextlib.suppress(StoreError, OSError):
                        wl.forget_nat(entry.peer_id)
                    continue
                try:
                    addr = parse_endpoint(entry.peer_public)
                except ValueError:
                    continue
                peer = self._peer(entry.peer_id)
                path = self._path(peer, wl)
                if entry.local_port != wl.port:
                    # A birthday path: its NAT mapping belongs to that socket's port.
                    self._reopen(path, wl, entry.local_port)
                path.endpoint, path.how, path.stored = addr, "cache", entry
                path.cache_until = now + CACHE_PATIENCE_S
                path.set(PathState.CONNECTING, f"reconnecting from NAT data to {entry.peer_public}",
                         now)
                self._use_endpoint(peer, path)
                loaded += 1
        if loaded:
            log.info("mesh: %d path(s) from NAT data", loaded)
        return loaded

    # ---------------------------------------------------------------- punches from the PoP

    def on_punch(self, msg: dict[str, Any], from_active_pop: bool = True) -> None:
        """A `punch` from the PoP; raises ValueError (or KeyError, TypeError) when malformed.
        Only the active PoP's count: another PoP's would restart every punch."""
        peer_id, link_id, gen = msg["peer"], msg["link"], msg["gen"]
        for name, v, hi in (("peer", peer_id, 65535), ("link", link_id, 255),
                            ("gen", gen, 0xFFFFFFFF)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise ValueError(f"{name}: expected an integer 1..{hi}, got {v!r}")
        secret = bytes.fromhex(msg["secret"])
        if len(secret) != probe.SECRET_LEN:
            raise ValueError(f"secret: expected {probe.SECRET_LEN} bytes")
        window = msg.get("window", self.cfg.probe_window)
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 256:
            raise ValueError(f"window: expected an integer 1..256, got {window!r}")
        raw = msg["candidates"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= 8:
            raise ValueError("candidates: expected a list of 1..8")
        candidates = []
        for c in raw:
            how, addr = c["how"], parse_endpoint(c["addr"])
            if how not in ("reflexive", "local", "static"):
                raise ValueError(f"candidate kind {how!r}")
            candidates.append((how, addr))
        peer_nat = msg.get("peer_nat")
        mode = msg.get("mode", "window")
        if mode not in ("window", "birthday"):
            raise ValueError(f"mode {mode!r}")
        role = msg.get("role") if mode == "birthday" else None
        if mode == "birthday" and role not in ("hard", "easy"):
            raise ValueError(f"role {role!r} of a birthday punch")
        self.stats.punches += 1
        wl = self.usable_link(link_id)
        if (
            not from_active_pop
            or not self.enabled
            or wl is None
            or peer_id == self.site_id
            or peer_id in self.static_ids
            or not isinstance(msg.get("initiator"), bool)
            or msg["initiator"] != (self.site_id > peer_id)
        ):
            self.stats.punches_ignored += 1
            log.info("mesh: punch for site %s over link %s ignored", peer_id, link_id)
            return
        now = self.clock()
        peer = self._peer(peer_id)
        path = self._path(peer, wl)
        path.peer_link = msg.get("peer_link") if isinstance(msg.get("peer_link"), int) else None
        path.gen, path.secret, path.window = gen, secret, min(window, self.cfg.probe_window)
        path.candidates = candidates
        path.peer_nat = peer_nat if isinstance(peer_nat, str) else None
        path.nonces.clear()
        path.targets.clear()
        path.seen.clear()
        path.punchbacks = 0
        path.punches += 1
        path.punch_at = now
        # The backoff of our requests is not reset here: a pair that cannot be punched must
        # not be punched again every few seconds forever. Going direct resets it.
        if path.state is PathState.DIRECT:
            # A working tunnel stays; the new secret only lets us answer the peer's probes
            # (it may have restarted and lost its path).
            return
        self._stop_birthday(path)
        self._release_extra(path)  # of an earlier punch: this one finds its own
        path.mode, path.role = mode, role
        # punched_at is set when the first round goes out (pacing may delay it).
        path.punched_at, path.rounds, path.cache_until = None, 0, None
        if mode == "birthday":
            self._start_birthday(peer, path, wl, now)
            return
        path.set(PathState.PUNCHING, f"probing {len(candidates)} candidate(s) of site {peer_id}",
                 now)

    def _punch_open(self, path: MeshPath) -> bool:
        """Whether the path's punch still takes probes: from its arrival until twice the
        punch timeout after its first round (the peer's rounds run as long as ours)."""
        if path.punch_at is None:
            return False
        start = path.punched_at if path.punched_at is not None else path.punch_at
        open_ = self.clock() - start <= 2 * self.cfg.punch_timeout_s + ROUNDS_AT[-1] / 4
        if not open_ and (path.seen or path.nonces):
            path.seen.clear()
            path.nonces.clear()
            path.targets.clear()
        return open_

    # ---------------------------------------------------------------- probes

    def on_probe(self, link_id: int, addr: Addr, data: bytes) -> None:
        p = probe.peek(data)
        if p is None:
            self.stats.probes_malformed += 1
            return
        peer = self.remotes.get(p.from_site)
        path = self._path_on(peer, link_id) if peer is not None else None
        if p.to_site != self.site_id or path is None or path.gen != p.gen or not path.secret:
            self.stats.probes_foreign += 1
            return
        if not self._punch_open(path):
            # A punch is answered while it runs, not forever: its probes replayed later must
            # neither draw answers nor steer anything.
            self.stats.probes_foreign += 1
            return
        if not probe.verify(data, path.secret):
            self.stats.probes_bad_tag += 1
            return
        assert peer is not None
        self._wake(peer)
        if p.kind is probe.Kind.REQUEST:
            if p.nonce in path.seen:
                self.stats.probes_replayed += 1
                return
            path.seen[p.nonce] = None
            while len(path.seen) > SEEN_KEPT:
                del path.seen[next(iter(path.seen))]
            reply = probe.Probe(probe.Kind.RESPONSE, self.site_id, peer.site_id, p.gen,
                                os.urandom(8), p.nonce)
            self.port.send(link_id, addr, probe.encode(reply, path.secret))
            self.stats.probes_answered += 1
            if (
                path.state is PathState.PUNCHING
                and addr not in path.targets
                and path.punchbacks < PUNCHBACKS_MAX
            ):
                # Punch back at once toward where the peer's probe came from.
                path.punchbacks += 1
                how = "birthday" if path.mode == "birthday" else _how_for(path, addr)
                self._send_request(peer, path, addr, how, link_id)
            return
        sent = path.nonces.pop(p.echo, None)
        if sent is None:
            self.stats.probes_unmatched += 1
            return
        if path.state is not PathState.PUNCHING:
            return  # a later answer of the same punch: the first one won
        now = self.clock()
        path.rtt_ms = round((now - sent[0]) * 1000, 1)
        # Where it came from is what the peer's NAT uses toward us: the endpoint.
        if path.mode == "birthday":
            how = "birthday"
            self.stats.birthday_found += 1
        else:
            how = sent[2] if sent[1] == addr else _how_for(path, addr)
        self._stop_birthday(path)
        if link_id != path.fp_link:
            # Found on the link's own socket after all: a birthday socket is not needed.
            self._release_extra(path)
            path.fp_link = link_id
        path.endpoint, path.how = addr, how
        path.set(PathState.CONNECTING, f"found {format_endpoint(addr)} ({how}); handshaking", now)
        log.info("mesh: site %d over %s: path found at %s (%s, %.1f ms)", peer.site_id,
                 path.link_name, format_endpoint(addr), how, path.rtt_ms)
        self._use_endpoint(peer, path)

    def _send_request(
        self,
        peer: MeshPeer,
        path: MeshPath,
        addr: Addr,
        how: str,
        link_id: int | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """A probe request to addr from the fast-path link link_id (default: the path's),
        or from an extra socket."""
        assert path.secret is not None and path.gen is not None
        nonce = os.urandom(8)
        path.nonces[nonce] = (self.clock(), addr, how)
        path.targets.add(addr)
        req = probe.Probe(probe.Kind.REQUEST, self.site_id, peer.site_id, path.gen, nonce)
        data = probe.encode(req, path.secret)
        if sock is not None:
            assert self.sockets is not None
            self.sockets.send(sock, addr, data)
        else:
            self.port.send(path.fp_link if link_id is None else link_id, addr, data)
        self.stats.probes_sent += 1

    @staticmethod
    def _round_size(path: MeshPath) -> int:
        return sum(path.window if how == "reflexive" else 1 for how, _ in path.candidates)

    def _probe_round(self, peer: MeshPeer, path: MeshPath) -> None:
        # Nonces of earlier rounds stay valid (a slow answer still counts) up to a bound.
        if len(path.nonces) > 4 * (path.window + 8):
            for k in list(path.nonces)[: len(path.nonces) // 2]:
                del path.nonces[k]
        for how, (ip, port) in path.candidates:
            if how == "reflexive":
                for p in window_ports(port, path.window):
                    self._send_request(peer, path, (ip, p), "window")
            else:
                self._send_request(peer, path, (ip, port), how)

    # ---------------------------------------------------------------- birthday punches

    def _start_birthday(self, peer: MeshPeer, path: MeshPath, wl: WanLink, now: float) -> None:
        reflexive = [a for how, a in path.candidates if how == "reflexive"]
        if not reflexive:
            path.set(PathState.WAITING, "birthday punch without the peer's public endpoint", now)
            path.next_request = now + path.request_backoff
            return
        self.stats.birthday_punches += 1
        # No pacing holds a birthday punch back (the easy side's probes are paced as they
        # go): its clock starts now.
        path.punched_at = now
        if path.role == "easy":
            lo, hi = NAT_PORTS
            path.guesses = random_ports(self.cfg.birthday_probes, lo, hi, self.rng)
            path.sprayed = 0
            path.set(PathState.PUNCHING, f"birthday punch: probing {len(path.guesses)} random"
                     f" ports of site {peer.site_id}'s address {reflexive[0][0]}", now)
            return
        why = self._no_room_for_birthday()
        socks: list[socket.socket] = []
        if why is None:
            assert self.sockets is not None
            lo, hi = self.cfg.birthday_ports
            ports = random_ports(hi - lo + 1, lo, hi, self.rng)
            socks, why = self.sockets.open_many(wl.link, ports, self.cfg.birthday_sockets)
            if why is not None:
                log.warning("mesh: birthday punch to site %d: %d of %d sockets opened: %s",
                            peer.site_id, len(socks), self.cfg.birthday_sockets, why)
        if not socks:
            path.set(PathState.WAITING, f"birthday punch impossible now: {why}; asking the PoP"
                     " again later", now)
            path.next_request = now + path.request_backoff
            return
        self.stats.birthday_sockets += len(socks)
        path.spray = list(socks)
        assert self.sockets is not None and path.gen is not None
        # Read on the event loop until one wins, not by the fast path (birthday.py says why).
        for i, sock in enumerate(socks):
            self.sockets.watch(
                sock,
                lambda addr, data, i=i, s=peer.site_id, ln=path.link_id, g=path.gen: (
                    self._on_spray(s, ln, g, i, addr, data)
                ),
            )
        lo, hi = self.cfg.birthday_ports
        path.set(PathState.PUNCHING, f"birthday punch: {len(socks)} sockets (ports {lo}-{hi})"
                 f" probing site {peer.site_id} at {format_endpoint(reflexive[0])}", now)

    def _birthday_round(self, peer: MeshPeer, path: MeshPath, elapsed: float) -> None:
        reflexive = [a for how, a in path.candidates if how == "reflexive"]
        if path.role == "hard":
            # From the extra sockets, not the link's: outside the tick's probe budget.
            while path.rounds < len(BIRTHDAY_ROUNDS_AT) and elapsed >= (
                BIRTHDAY_ROUNDS_AT[path.rounds]
            ):
                path.rounds += 1
                for sock in path.spray:
                    for addr in reflexive:
                        if sock is not None:
                            self._send_request(peer, path, addr, "birthday", sock=sock)
            return
        if elapsed < BIRTHDAY_START_S or not reflexive:
            return
        due = min(len(path.guesses), int((elapsed - BIRTHDAY_START_S) * BIRTHDAY_PPS) + 1)
        # Through the link's own socket: within the tick's probe budget, like window rounds.
        due = min(due, path.sprayed + max(self._budget, 0))
        self._budget -= due - path.sprayed
        ip = reflexive[0][0]
        while path.sprayed < due:
            self._send_request(peer, path, (ip, path.guesses[path.sprayed]), "birthday")
            path.sprayed += 1

    def _on_spray(
        self, peer_id: int, link_id: int, gen: int, index: int, addr: Addr, data: bytes
    ) -> None:
        """A datagram on extra socket `index` of a birthday punch (the hard side)."""
        peer = self.remotes.get(peer_id)
        path = peer.paths.get(link_id) if peer is not None else None
        if peer is None or path is None or path.gen != gen or index >= len(path.spray):
            return
        if path.spray[index] is None or not path.secret:
            return
        p = probe.peek(data)
        if p is None:
            self.stats.probes_malformed += 1
            return
        if p.from_site != peer_id or p.to_site != self.site_id or p.gen != gen:
            self.stats.probes_foreign += 1
            return
        if not probe.verify(data, path.secret):
            self.stats.probes_bad_tag += 1
            return
        if p.kind is probe.Kind.REQUEST and p.nonce in path.seen:
            self.stats.probes_replayed += 1
            return
        if p.kind is probe.Kind.RESPONSE and p.echo not in path.nonces:
            self.stats.probes_unmatched += 1
            return
        # An authentic probe came in through both NATs on this socket: it is the path. From
        # now on the fast path reads it, and the probe is handled as if it had come there.
        fp_link = self._adopt(peer, path, index)
        if fp_link is None:
            return
        self.on_probe(fp_link, addr, data)
        if p.kind is probe.Kind.REQUEST and path.state is PathState.PUNCHING:
            # Answered; now ask back over it (our requests to addr so far went out of sockets
            # its NAT dropped them from, so no punch-back follows on its own).
            self._send_request(peer, path, addr, "birthday", fp_link)

    def _adopt(self, peer: MeshPeer, path: MeshPath, index: int) -> int | None:
        """Make extra socket `index` a fast-path link of the path and close the others; the
        link id, or None when the fast path refused it."""
        sock = path.spray[index]
        fp_link = self._free_extra_id()
        if sock is None or fp_link is None or self.sockets is None:
            return None
        self.sockets.release(sock)
        port = sock.getsockname()[1]
        try:
            with sock:  # the fast path keeps its own duplicate of the descriptor
                self.fp.link_add(fp_link, sock.fileno())
        except FastPathError as e:
            log.error("mesh: birthday socket for site %d not added: %s", peer.site_id, e)
            path.spray[index] = None
            return None
        path.spray[index] = None
        self._stop_birthday(path)
        path.extra, path.extra_port, path.fp_link = fp_link, port, fp_link
        log.info("mesh: site %d over %s: birthday socket on port %d got through (link %d)",
                 peer.site_id, path.link_name, port, fp_link)
        return fp_link

    def _stop_birthday(self, path: MeshPath) -> None:
        """Close the extra sockets of a punch under way (the one found was adopted)."""
        for sock in path.spray:
            if sock is not None and self.sockets is not None:
                self.sockets.close(sock)
        path.spray = []
        path.guesses = []

    def _release_extra(self, path: MeshPath) -> None:
        """Give back the birthday socket a path ran on: the path uses its link's own again."""
        if path.extra is not None:
            try:
                self.fp.link_del(path.extra)
            except FastPathError as e:
                log.warning("mesh: birthday link %d not removed: %s", path.extra, e)
        path.extra = path.extra_port = None
        path.fp_link = path.link_id

    def _reopen(self, path: MeshPath, wl: WanLink, port: int) -> bool:
        """Open a cached birthday path's socket again on its port, as the path's link."""
        fp_link = self._free_extra_id()
        if self.sockets is None or fp_link is None:
            return False
        try:
            sock = self.sockets.open(wl.link, port)
        except OSError as e:
            log.warning("mesh: cached birthday socket not reopened: %s", e)
            return False
        try:
            with sock:
                self.fp.link_add(fp_link, sock.fileno())
        except FastPathError as e:
            log.warning("mesh: cached birthday socket on port %d not added: %s", port, e)
            return False
        path.extra, path.extra_port, path.fp_link = fp_link, port, fp_link
        return True

    def _link_mtu(self, fp_link: int) -> int:
        """A fast-path link's MTU, the ceiling of its path MTU: a birthday socket's is that of
        the configured link it was opened on."""
        if fp_link >= EXTRA_LINK_BASE:
            for path in self._all_paths():
                if path.extra == fp_link:
                    return self.links.mtu(path.link_id)
        return self.links.mtu(fp_link)

    def _all_paths(self) -> list[MeshPath]:
        return [p for peer in self.remotes.values() for p in peer.paths.values()]

    def _free_extra_id(self) -> int | None:
        used = {p.extra for p in self._all_paths()}
        return next(
            (i for i in range(EXTRA_LINK_BASE, EXTRA_LINK_BASE + MAX_EXTRA_LINKS) if i not in used),
            None,
        )

    def _no_room_for_birthday(self) -> str | None:
        """Why the hard side of a birthday punch cannot start now, or None."""
        if self.sockets is None:
            return "no extra sockets here"
        paths = self._all_paths()
        if sum(1 for p in paths if p.spray) >= MAX_SPRAYS:
            return f"{MAX_SPRAYS} birthday punches are under way"
        if sum(1 for p in paths if p.extra is not None) >= MAX_EXTRA_LINKS:
            return f"{MAX_EXTRA_LINKS} birthday paths hold every socket the fast path has room for"
        return None

    # ---------------------------------------------------------------- tunnels

    def _peer(self, site_id: int) -> MeshPeer:
        peer = self.remotes.get(site_id)
        if peer is None:
            peer = self.remotes[site_id] = MeshPeer(site_id)
        self._wake(peer)
        return peer

    def _path_on(self, peer: MeshPeer, link_id: int) -> MeshPath | None:
        """The path a datagram on fast-path link link_id belongs to: the link's, or the one
        whose birthday socket that link is."""
        path = peer.paths.get(link_id)
        if path is not None:
            return path
        return next((p for p in peer.paths.values() if p.fp_link == link_id), None)

    def _path(self, peer: MeshPeer, wl: WanLink) -> MeshPath:
        path = peer.paths.get(wl.id)
        if path is None:
            path = peer.paths[wl.id] = MeshPath(wl.id, wl.name, since=self.clock())
        return path

    def _use_endpoint(self, peer: MeshPeer, path: MeshPath) -> None:
        """Handshake (or kick, as responder) toward the path's endpoint."""
        assert path.endpoint is not None
        if peer.tunnel is None:
            try:
                add_peer(self.fp, peer.site_id, owner=peer.site_id)
            except FastPathError as e:
                log.error("mesh: fast-path peer %d not added: %s", peer.site_id, e)
                return
            self.fp.set_endpoint(peer.site_id, path.fp_link, path.endpoint)
            peer.tunnel = PeerTunnel(
                my_site_id=self.site_id,
                peer_site_id=peer.site_id,
                link_id=path.fp_link,
                link_name=path.link_name,
                endpoint=path.endpoint,
                fp=self.fp,
                port=self.port,
                timers=self.timers,
                clock=self.clock,
                on_event=lambda kind, text, p=peer: self._on_tunnel_event(p, kind),
                link_mtu=self._link_mtu,
                # Hundreds of tunnels up at once (a restart from NAT data) spread their first
                # path MTU searches over a few seconds; a handful start theirs at once.
                pmtu_delay_s=self.rng.uniform(0.0, min(PMTU_SPREAD_MAX_S,
                                                       len(self.remotes) / PMTU_SPREAD_RATE)),
            )
        elif peer.tunnel.state is State.UP:
            # Another link's path to a peer already up: one more endpoint, same keys.
            self.fp.set_endpoint(peer.site_id, path.fp_link, path.endpoint)
            self._path_direct(peer, path)
        else:
            peer.tunnel.retarget(path.fp_link, path.link_name, path.endpoint)

    def _on_tunnel_event(self, peer: MeshPeer, kind: str) -> None:
        tunnel = peer.tunnel
        assert tunnel is not None
        now = self.clock()
        if kind == "tunnel-up":
            for path in peer.paths.values():
                if path.endpoint is not None and path.state is not PathState.PUNCHING and (
                    path.fp_link == tunnel.link_id or path.state is PathState.CONNECTING
                ):
                    self._path_direct(peer, path)
            self._dirty = True
        elif kind == "tunnel-down":
            for path in peer.paths.values():
                if path.state is PathState.DIRECT:
                    self._forget_endpoint(peer, path)
                if path.state in (PathState.DIRECT, PathState.CONNECTING):
                    path.set(PathState.WAITING, f"{tunnel.reason or 'the peer stopped answering'}"
                             "; asking the PoP to punch again", now)
                    path.next_request = now
            self._dirty = True
        self._wake(peer)
        self._report(peer)

    def _forget_endpoint(self, peer: MeshPeer, path: MeshPath) -> None:
        """The fast path keeps only endpoints of live paths: each gets keepalives of its own
        once keys are there, and a stale one must not draw the peer's traffic. The tunnel's
        own stays: it holds where the peer last roamed to, which its retry handshake uses."""
        if peer.tunnel is not None and path.fp_link == peer.tunnel.link_id:
            return
        with contextlib.suppress(FastPathError):
            self.fp.endpoint_del(peer.site_id, path.fp_link)

    def _path_direct(self, peer: MeshPeer, path: MeshPath) -> None:
        assert path.endpoint is not None
        now = self.clock()
        if peer.tunnel is not None and peer.tunnel.endpoint != path.endpoint and (
            peer.tunnel.link_id == path.fp_link
        ):
            # The handshake completed elsewhere on this link (the peer's NAT moved it).
            path.endpoint = peer.tunnel.endpoint
        path.set(PathState.DIRECT, None, now)
        path.rx_mark, path.rx_at, path.checked_at = -1, now, None
        path.cache_until = None
        path.request_backoff = REPUNCH_MIN_S
        self._missing.pop(peer.site_id, None)
        self._steer(peer)
        self._store_nat(peer, path)

    def _store_nat(self, peer: MeshPeer, path: MeshPath) -> None:
        """Write the direct path's NAT data, unless the store already holds just that (a
        path back from its NAT data) and it is recent."""
        wl = self.links.get(path.link_id)
        if wl is None or path.endpoint is None:
            return
        try:
            # Our public endpoint as STUN last saw it; while STUN has not answered (the
            # PoP unreachable after a restart) the one stored before still stands.
            old = path.stored
            mine = wl.public_str()
            if mine is None:
                if old is None:
                    old = wl.nat(peer.site_id)
                mine = old.local_public if old is not None else None
            if mine is None:
                return
            port = path.extra_port or wl.port
            if (
                old is not None
                and old.local_port == port
                and parse_endpoint(old.peer_public) == path.endpoint
                and parse_endpoint(old.local_public) == parse_endpoint(mine)
                and time.time() - old.at < NAT_DATA_REFRESH_S
            ):
                return
            # A path back from its NAT data keeps how it was first found.
            how = old.how if path.how == "cache" and old is not None else path.how or "window"
            path.stored = wl.put_nat(peer.site_id, path.endpoint, local_public=mine, how=how,
                                     local_port=path.extra_port)
        except (StoreError, ValueError, OSError) as e:
            log.warning("mesh: NAT data for site %d not stored: %s", peer.site_id, e)

    def _steer(self, peer: MeshPeer) -> None:
        """Traffic to the peer over the links off-cloud traffic uses now (link health's
        steering: weighted per flow when several share it), on the peer's direct paths there;
        when none of its direct paths is on such a link, its best-ranked direct path on a link
        that works. A last-punched backup path never carries it just because its endpoint was
        set last."""
        direct = [p for p in peer.paths.values() if p.state is PathState.DIRECT]
        if not direct:
            return
        weights = dict(self.link_weights()[1]) if self.link_weights is not None else {}
        chosen = [(p.fp_link, weights[p.link_id]) for p in direct if p.link_id in weights]
        if not chosen:
            down = self.link_down or (lambda lid: not self.links[lid].is_up())
            working = [p for p in direct if not down(p.link_id)] or direct
            # Ranked by the configured link; a birthday path's traffic goes on its own socket.
            best = min(working, key=lambda p: self.links.rank(p.link_id))
            chosen = [(best.fp_link, 1)]
        try:
            self.fp.set_policy(peer.site_id, chosen)
        except FastPathError as e:
            log.warning("mesh: link policy of site %d not set: %s", peer.site_id, e)

    def probe_targets(self, wl: WanLink) -> list[Target]:
        """A few peers with an up tunnel and a direct path over this link, for link health to
        probe as witnesses (site/health.py): with the PoP gone they still tell a link's health.
        Taken in turn from all the peers, so that no peer answers every site's probes."""
        if not wl.link.offcloud or not wl.main or not self.remotes:
            return []  # no mesh path runs over it: nothing to look for
        if len(self._probe_order) != len(self.remotes):
            self._probe_order = list(self.remotes)
        out: list[Target] = []
        n = len(self._probe_order)
        # A bounded look per call: the cursor goes on from there next time.
        for _ in range(min(n, PROBE_TARGET_SCAN)):
            self._probe_cursor = (self._probe_cursor + 1) % n
            peer = self.remotes.get(self._probe_order[self._probe_cursor])
            if peer is None:
                self._probe_order = list(self.remotes)
                break
            path = peer.paths.get(wl.id)
            if (
                path is not None and path.state is PathState.DIRECT
                and peer.tunnel is not None and peer.tunnel.state is State.UP
            ):
                out.append(Target(peer.site_id, path.fp_link, ("site", peer.site_id),
                                  witness=True))
                if len(out) >= HEALTH_TARGETS:
                    break
        return out

    def _resteer(self) -> None:
        """Every peer with a direct path again, once the links in use changed."""
        if self.link_weights is None:
            return
        gen = self.link_weights()[0]
        if gen == self._weights_gen:
            return
        self._weights_gen = gen
        for peer in self.remotes.values():
            self._steer(peer)

    def _report(self, peer: MeshPeer) -> None:
        up = peer.tunnel is not None and peer.tunnel.state is State.UP
        if up == peer.up:
            return
        peer.up = up
        direct = [p for p in peer.paths.values() if p.state is PathState.DIRECT]
        if up:
            where = ", ".join(
                f"{p.link_name} {format_endpoint(p.endpoint)} ({p.how})"
                for p in direct if p.endpoint
            )
            text = f"Off-Cloud Transport Connect: site {peer.site_id} over {where}"
            self.on_event("offcloud.transport.connect", text,
                          {"peer": peer.site_id, "links": [p.link_name for p in direct]})
        else:
            reason = peer.tunnel.reason if peer.tunnel is not None else None
            text = f"Off-Cloud Transport Disconnect: site {peer.site_id}: {reason}"
            self.on_event("offcloud.transport.disconnect", text,
                          {"peer": peer.site_id, "reason": reason})

    # ---------------------------------------------------------------- periodic work

    def tick(self) -> None:
        if not self.remotes and not self._dirty:
            return
        if not self.enabled:
            for site_id in list(self.remotes):
                self.remove(site_id, "off-cloud is off for this site")
        self._resteer()
        now = self.clock()
        self._budget = PROBES_PER_TICK
        due = self._due(now)
        # Counted over every peer, not only this tick's: a down tunnel's handshake waits
        # for its end without a turn of its own.
        self._handshakes = len(self._in_handshake)
        self._kicks = 0
        for peer in due:
            try:
                self._tick_peer(peer, now)
            except Exception:
                # One peer's failure must not cost the others (or itself) their next turn.
                log.exception("mesh: site %d tick failed", peer.site_id)
            finally:
                self._schedule(peer, now)
        if now >= self._next_missing_check:
            self._next_missing_check = now + MISSING_CHECK_S
            self._ask_for_missing(now)
        if self._dirty:
            self._dirty = False
            self.paths.submit(PATHS_PRODUCER, self._candidates())

    def next_due(self) -> float:
        """When tick() next has something to do: now while a peer is busy, else the first
        settled peer's turn or the next look for missing sites."""
        if not self.remotes and not self._dirty:
            return math.inf
        if self._dirty or self._busy or not self.enabled:
            return self.clock()
        due = self._next_missing_check
        if self._turns:
            due = min(due, self._turns[0][0])
        return due

    def _due(self, now: float) -> list[MeshPeer]:
        """The peers whose clock runs this tick: the busy ones (punching, connecting, a tunnel
        with something to do now, or just told something) every tick, and the others when
        their turn comes: a settled tunnel's next rekey, silence to judge, session to free or
        path MTU search, a down one's next handshake or kick, the end of a hold off the mesh,
        and every QUIET_TURN_S at least. A mesh of hundreds of idle
        tunnels costs a few of them per tick, not a walk over all (docs/mesh.md, "Scale");
        their keepalives go out from the fast path."""
        turn: list[int] = []
        while self._turns and self._turns[0][0] <= now:
            at, site_id = heapq.heappop(self._turns)
            peer = self.remotes.get(site_id)
            if peer is not None and peer.turn_at == at:
                peer.turn_at = None
                turn.append(site_id)
        busy = sorted(self._busy)
        # A different first busy peer every tick, so that pacing starves no punch.
        self._rr = (self._rr + 1) % max(len(busy), 1)
        ids = dict.fromkeys(busy[self._rr:] + busy[: self._rr] + turn)
        return [self.remotes[i] for i in ids if i in self.remotes]

    def _schedule(self, peer: MeshPeer, now: float) -> None:
        """After its tick: every tick while busy, else its next turn."""
        if peer.tunnel is not None and peer.tunnel.handshaking is not None:
            self._in_handshake.add(peer.site_id)
        else:
            self._in_handshake.discard(peer.site_id)
        if self._needs_every_tick(peer):
            self._busy.add(peer.site_id)
            peer.turn_at = None
            return
        self._busy.discard(peer.site_id)
        at = now + QUIET_TURN_S
        if peer.tunnel is not None:
            at = min(at, peer.tunnel.next_due())
        if peer.hold_until:
            at = min(at, peer.hold_until)  # its prefixes may take the mesh again
        direct = 0
        for path in peer.paths.values():
            if path.state is PathState.WAITING:
                at = min(at, path.next_request)  # its next request to the PoP
            elif path.state is PathState.DIRECT:
                direct += 1
        if direct > 1:  # when a path's silence would have lasted two keepalive intervals
            limit = 2 * self.timers.keepalive_s
            for p in peer.paths.values():
                if p.state is PathState.DIRECT:
                    at = min(at, p.rx_at + limit if p.checked_at is None
                             else p.checked_at + PATH_CHECK_WAIT_S)
        at = max(at, now + MIN_TURN_S)
        if at - now > TURN_GRID_AFTER_S:
            at = math.ceil(at / TURN_GRID_S) * TURN_GRID_S
        peer.turn_at = at
        heapq.heappush(self._turns, (at, peer.site_id))

    def _judge_paths(self, peer: MeshPeer, now: float) -> None:
        """Each direct path of a peer that has several, judged on its own: the peer's fast
        path sends keepalives over every link (docs/tunnel.md, "Keepalives"), so a path over
        which nothing arrived for two keepalive intervals while another path still answers
        is dead. The tunnel's own liveness judges the peer as a whole."""
        direct = [p for p in peer.paths.values() if p.state is PathState.DIRECT]
        if len(direct) < 2:
            return
        try:
            eps = {e.link_id: e for e in self.fp.endpoint_info(peer.site_id).endpoints}
        except FastPathError:
            return
        for path in direct:
            ep = eps.get(path.fp_link)
            if ep is None:
                continue
            path.endpoint = ep.addr  # where the peer last roamed to on that link
            if ep.rx_packets != path.rx_mark:
                path.rx_mark, path.rx_at, path.checked_at = ep.rx_packets, now, None
        limit = 2 * self.timers.keepalive_s
        alive = [p for p in direct if now - p.rx_at < limit]
        if not alive:
            return  # nothing from the peer at all: the tunnel's liveness says so
        tunnel = peer.tunnel
        for path in direct:
            if path in alive:
                continue
            if path.checked_at is None and tunnel is not None and tunnel.pmtu.ask(path.fp_link):
                # The peer's keepalives may come more rarely than ours (its own
                # keepalive_s): ask the path itself before giving up on it.
                path.checked_at = now
                continue
            if path.checked_at is not None and now - path.checked_at < PATH_CHECK_WAIT_S:
                continue
            self._path_silent(peer, path, alive[0], now - path.rx_at, now)

    def _path_silent(
        self, peer: MeshPeer, path: MeshPath, other: MeshPath, silent_s: float, now: float
    ) -> None:
        log.info("mesh: nothing from site %d over %s for %.0f s; punching that path again",
                 peer.site_id, path.link_name, silent_s)
        with contextlib.suppress(FastPathError):
            self.fp.endpoint_del(peer.site_id, path.fp_link)
        tunnel = peer.tunnel
        if tunnel is not None and tunnel.link_id == path.fp_link and other.endpoint is not None:
            # Its next rekey goes over a path that answers.
            tunnel.retarget(other.fp_link, other.link_name, other.endpoint)
        path.set(PathState.WAITING, f"nothing from the peer over {path.link_name} for "
                 f"{silent_s:.0f} s while {other.link_name} answers; asking the PoP to punch "
                 "again", now)
        path.next_request = now
        self.stats.paths_silent += 1
        self._steer(peer)
        self._wake(peer)

    def _needs_every_tick(self, peer: MeshPeer) -> bool:
        """Punching, connecting, or a tunnel with something to do now (a handshake, keys
        being handed over). A tunnel that is down and waits for its next handshake or kick
        (an offline site of the directory, say) takes a turn then instead."""
        tunnel = peer.tunnel
        if tunnel is not None and not tunnel.settled:
            due = tunnel.next_due()
            if due <= self.clock():
                return True
        return any(p.state in (PathState.PUNCHING, PathState.CONNECTING)
                   for p in peer.paths.values())

    def _wake(self, peer: MeshPeer) -> None:
        """Run the peer's clock from the next tick on, its tunnel's included (something
        happened to it)."""
        self._busy.add(peer.site_id)
        peer.next_tick = 0.0

    def _tick_peer(self, peer: MeshPeer, now: float) -> None:
        for path in peer.paths.values():
            if path.state is not PathState.DIRECT:
                self._tick_path(peer, path, now)
        if peer.hold_until and now >= peer.hold_until:
            peer.hold_until = 0.0
            self._dirty = True  # its prefixes may take the mesh again
        tunnel = peer.tunnel
        if tunnel is not None and tunnel.state is State.UP:
            self._judge_paths(peer, now)
        # A settled tunnel of a busy peer (another link punching) still ticks only now and then.
        if tunnel is None or (tunnel.settled and now < peer.next_tick):
            return
        if tunnel.wants_handshake:
            # Paced: hundreds of tunnels back from NAT data at once would otherwise send all
            # their handshakes in one tick, time out against a busy peer and start over.
            if self._handshakes >= MAX_HANDSHAKES:
                return
            self._handshakes += 1
        elif tunnel.wants_kick:
            # The same as responder: each kick draws a handshake into our session layer,
            # whose table of server handshakes is bounded.
            if self._kicks >= MAX_KICKS_PER_TICK:
                return
            self._kicks += 1
        if tunnel.settled:
            peer.next_tick = now + MIN_TURN_S
        try:
            tunnel.tick()
        except Exception:
            log.exception("mesh tunnel %d tick failed", peer.site_id)

    def _tick_path(self, peer: MeshPeer, path: MeshPath, now: float) -> None:
        if path.state is PathState.PUNCHING:
            # The clock of a punch starts with its first round, however long pacing held it.
            elapsed = now - path.punched_at if path.punched_at is not None else 0.0
            if elapsed >= self.cfg.punch_timeout_s:
                self._punch_failed(path, now)
                return
            if path.mode == "birthday":
                self._birthday_round(peer, path, elapsed)
                return
            if path.rounds >= len(ROUNDS_AT) or elapsed < ROUNDS_AT[path.rounds]:
                return
            need = self._round_size(path)
            if need > self._budget and self._budget < PROBES_PER_TICK:
                return  # paced: this round goes out on a later tick
            self._budget -= need
            if path.rounds == 0:
                path.punched_at = now  # a punch delayed by pacing gets its whole time
            while path.rounds < len(ROUNDS_AT) and now - path.punched_at >= ROUNDS_AT[path.rounds]:
                path.rounds += 1
            self._probe_round(peer, path)
        elif path.state is PathState.CONNECTING:
            if path.cache_until is not None and now >= path.cache_until:
                # The cached endpoint does not answer: the NAT forgot it; punch again.
                path.cache_until = None
                path.set(PathState.WAITING, f"cached endpoint {format_endpoint(path.endpoint)}"
                         " did not answer; asking the PoP to punch again", now)
                path.next_request = now
            elif path.punched_at is not None and now - path.punched_at > 2 * (
                self.cfg.punch_timeout_s
            ):
                path.set(PathState.WAITING, "handshake over the punched path failed: "
                         f"{peer.tunnel.reason if peer.tunnel else 'no tunnel'}", now)
                path.next_request = now + path.request_backoff
            if path.state is PathState.WAITING:
                self._forget_endpoint(peer, path)
        if path.state is PathState.WAITING and now >= path.next_request and (
            path.gen is not None or path.how == "cache" or path.endpoint is not None
        ):
            self._request_punch(peer, path, now)

    def _punch_failed(self, path: MeshPath, now: float) -> None:
        self._stop_birthday(path)
        wl = self.links.get(path.link_id)
        if path.mode == "window" and path.peer_nat == RANDOMISING and (
            wl is not None and wl.nat_class == RANDOMISING
        ):
            # Neither side can know a port of the other's: nothing to ask the PoP for. It
            # punches again by itself when either side's NAT (or endpoint) changes.
            path.set(PathState.WAITING, BOTH_RANDOMISE, now)
            path.next_request = math.inf
            return
        what = "birthday probes found no open port" if path.mode == "birthday" else (
            "probes unanswered"
        )
        path.set(PathState.WAITING, f"{what} for {self.cfg.punch_timeout_s} s; asking the PoP"
                 " to punch again", now)
        path.next_request = now + path.request_backoff

    def _ask_for_missing(self, now: float) -> None:
        """A punch lost in transit (a DTLS record, never retransmitted) must not leave a pair
        without a tunnel: an off-cloud site of the directory that we hold no path to, or only
        waiting ones, is asked for over our best link, with the backoff of a path."""
        meshing = self._meshing_sites()
        if not meshing or not self.enabled:
            return
        links = sorted((wl for wl in self.links if self.usable_link(wl.id)), key=lambda w: (
            w.precedence, w.id))
        if not links:
            return
        asked = 0
        for site_id in sorted(meshing):
            if site_id == self.site_id or site_id in self.static_ids or asked >= MISSING_ASK_MAX:
                continue
            peer = self.remotes.get(site_id)
            if peer is not None and any(p.state is not PathState.WAITING or p.gen is not None
                                        for p in peer.paths.values()):
                continue  # punched or being punched: its paths ask for themselves
            retry = self._missing.get(site_id)
            if retry is not None and now < retry[0]:
                continue
            backoff = retry[1] if retry is not None else MISSING_CHECK_S
            self._missing[site_id] = (now + backoff, min(backoff * 2, REPUNCH_MAX_S))
            for wl in links:
                if self.ask_pop(wl.id, {"t": "punch-request", "peer": site_id}):
                    self.stats.punch_requests += 1
                    asked += 1
                    break

    def _request_punch(self, peer: MeshPeer, path: MeshPath, now: float) -> None:
        path.next_request = now + path.request_backoff
        path.request_backoff = min(path.request_backoff * 2, REPUNCH_MAX_S)
        msg: dict[str, Any] = {"t": "punch-request", "peer": peer.site_id}
        if path.gen is not None:
            # The generation given up on: the PoP drops the second side's request of a pair
            # that both gave up on it, rather than restart the punch the first one's started.
            msg["gen"] = path.gen
        if self.ask_pop(path.link_id, msg):
            self.stats.punch_requests += 1

    def _candidates(self) -> list[Candidate]:
        out = []
        subnets = {e["site_id"]: e.get("subnets", []) for e in self.directory()}
        now = self.clock()
        for peer in self.remotes.values():
            if peer.tunnel is None or peer.tunnel.state is not State.UP:
                continue
            # Held peers too: paths.py uses them only for WAN recovery, where the cloud is
            # no alternative.
            held = now < peer.hold_until
            for net in subnets.get(peer.site_id, []):
                try:
                    out.append(Candidate(ipaddress.ip_network(net), peer.site_id, Transport.MESH,
                                         held=held))
                except ValueError:
                    continue  # cloud.py counted the bad entry
        return out

    def _meshing_sites(self) -> set[int] | None:
        """The off-cloud sites of the directory; None while no directory is known."""
        entries = self.directory()
        if not entries and not self.directory_known():
            return None
        return {e["site_id"] for e in entries if e.get("offcloud")}

    def on_directory(self) -> None:
        """The PoP's directory changed: a site that left the account or turned off-cloud off
        loses its mesh tunnel, and every site's subnets are submitted again."""
        self._dirty = True
        meshing = self._meshing_sites()
        if meshing is None:
            return
        for site_id in [s for s in self.remotes if s not in meshing]:
            self.remove(site_id, "no longer an off-cloud site of the account")

    def remove(self, site_id: int, reason: str) -> None:
        """Tear down everything of one peer: its DTLS session, fast-path peer (and with it
        its keys, endpoints and routes) and NAT data."""
        peer = self.remotes.pop(site_id, None)
        self._missing.pop(site_id, None)
        self._busy.discard(site_id)
        self._in_handshake.discard(site_id)
        if peer is None:
            return
        log.info("mesh: site %d removed: %s", site_id, reason)
        tunnel = peer.tunnel
        if tunnel is not None:
            session = tunnel.session
            if session is not None and session.established:
                for d in session.close():
                    self.port.send(tunnel.link_id, tunnel.endpoint, d)
            if tunnel.handshaking is not None:
                self.port.forget_session(tunnel.handshaking)
            try:
                self.fp.peer_del(site_id)
            except FastPathError as e:
                log.warning("mesh: fast-path peer %d not removed: %s", site_id, e)
            self.paths.forget_peer(site_id)
        for path in peer.paths.values():
            # Its birthday sockets too, once the tunnel's DTLS close went out over them.
            self._stop_birthday(path)
            self._release_extra(path)
            wl = self.links.get(path.link_id)
            if wl is not None:
                try:
                    wl.forget_nat(site_id)
                except (StoreError, OSError) as e:
                    log.warning("mesh: NAT data of site %d not forgotten: %s", site_id, e)
        if peer.up:
            peer.up = False
            self.on_event("offcloud.transport.disconnect",
                          f"Off-Cloud Transport Disconnect: site {site_id}: {reason}",
                          {"peer": site_id, "reason": reason})
        # At once: no candidate may name the fast-path peer that is gone.
        self.paths.submit(PATHS_PRODUCER, self._candidates())

    def end_revoked(self, revoked: Revocations) -> list[int]:
        """The account revoked certificates: tear down at once every tunnel whose peer
        authenticated with one of them (its keys leave the fast path, its NAT data is
        forgotten); the peer's next handshake is refused by the revocation check."""
        ended: list[int] = []
        for site_id, peer in list(self.remotes.items()):
            session = peer.tunnel.session if peer.tunnel is not None else None
            serial = session.peer_serial if session is not None else None
            reason = revoked.reason(site_id, serial)
            if reason is None:
                continue
            self.remove(site_id, reason)
            self.on_event("mesh.peer.revoked", f"site {site_id}: mesh tunnel ended: {reason}",
                          {"peer": site_id, "serial": serial})
            ended.append(site_id)
        return ended

    def on_silent(self, peer_ids: Sequence[int]) -> None:
        """The fast path saw these peers stop answering our traffic: their paths are dead
        (the traffic falls back to the cloud, the PoP is asked to punch again)."""
        for pid in peer_ids:
            peer = self.remotes.get(pid)
            if peer is None or peer.tunnel is None or peer.tunnel.state is not State.UP:
                continue
            ms = self.cfg.silent_after_ms
            now = self.clock()
            recent = now - peer.last_silence < HOLD_MEMORY_S
            peer.hold_s = min(peer.hold_s * 2, HOLD_MAX_S) if recent else HOLD_MIN_S
            peer.hold_until, peer.last_silence = now + peer.hold_s, now
            log.info("mesh: site %d stopped answering traffic (%d ms); held off the mesh %.0f s",
                     pid, ms, peer.hold_s)
            peer.tunnel.declare_down(f"no answer to traffic for {ms} ms")
            self._wake(peer)

    # ---------------------------------------------------------------- session owner

    def allowed_ids(self) -> Container[int]:
        return self.remotes.keys() if self.enabled else ()

    def is_known_source(self, link_id: int, addr: Addr) -> bool:
        return self.tunnel_at(link_id, addr) is not None

    def known_sources(self) -> list[Addr]:
        """The hosts of every path's candidates and found endpoint, every port (port 0): a
        punch's probes and the tunnel's first records come from there, from ports a NAT may
        choose, before the fast path has the peer's endpoint."""
        out: list[Addr] = []
        for peer in self.remotes.values():
            for path in peer.paths.values():
                out.extend((ip, 0) for _how, (ip, _port) in path.candidates)
                if path.endpoint is not None:
                    out.append((path.endpoint[0], 0))
        return out

    def tunnel_for(self, session: DtlsSession) -> PeerTunnel | None:
        link_id = session.link_id
        if link_id is not None and link_id < EXTRA_LINK_BASE and self.usable_link(link_id) is None:
            return None  # not a mesh link's (an Alt-WAN tunnel to the same site, say)
        who = session.peer_identity if session.established else session.expected_identity
        if who is None or who[0] != "site":
            return None
        peer = self.remotes.get(who[1])
        if peer is None or peer.tunnel is None:
            return None
        # The session layer asks this before it hands the tunnel news (a handshake done or
        # failed, a key, a key-ack): its clock must run again soon (key resends, release).
        self._wake(peer)
        return peer.tunnel

    def tunnel_at(self, link_id: int, addr: Addr) -> PeerTunnel | None:
        for peer in self.remotes.values():
            path = self._path_on(peer, link_id)
            if peer.tunnel is not None and path is not None and path.endpoint == addr:
                return peer.tunnel
        return None

    def sessions_in_use(self) -> list[DtlsSession]:
        return [p.tunnel.session for p in self.remotes.values() if p.tunnel and p.tunnel.session]

    def on_kick(self, link_id: int, addr: Addr, from_site: int) -> bool:
        peer = self.remotes.get(from_site)
        if peer is None or peer.tunnel is None:
            return False
        # A kick is not authenticated: only one from where the peer is known to be may start a
        # handshake, so a spoofed kick cannot aim our handshakes at a third party. A peer whose
        # NAT moved gets its path back through the PoP instead.
        path = self._path_on(peer, link_id)
        if path is None or path.endpoint != addr or path.fp_link != link_id:
            return False
        peer.tunnel.on_kick(link_id, addr)
        self._wake(peer)
        return True

    def on_key_event(self, peer_id: int, expired: bool) -> bool:
        peer = self.remotes.get(peer_id)
        if peer is None or peer.tunnel is None:
            return False
        peer.tunnel.on_rekey_needed()
        self._wake(peer)
        return True

    def on_probe_ack(self, peer_id: int, link_id: int, probe_id: int, received: int) -> bool:
        peer = self.remotes.get(peer_id)
        if peer is None or peer.tunnel is None:
            return False
        return peer.tunnel.pmtu.on_ack(link_id, probe_id, received)

    def peers_status(self) -> list[dict[str, Any]]:
        """`socketctl mesh`: per peer and link."""
        now = self.clock()
        names = {e["site_id"]: e.get("name") for e in self.directory()}
        out = []
        for site_id in sorted(self.remotes):
            peer = self.remotes[site_id]
            tunnel = peer.tunnel
            counters = self.fp.peer_counters(site_id) if tunnel is not None else None
            last_rx = None
            if counters is not None and counters.last_rx_ns:
                last_rx = round((time.monotonic_ns() - counters.last_rx_ns) / 1e9, 1)
            for link_id in sorted(peer.paths):
                path = peer.paths[link_id]
                wl = self.links.get(link_id)
                out.append({
                    "site_id": site_id,
                    "name": names.get(site_id),
                    "link": path.link_name,
                    "peer_link": path.peer_link,
                    "state": str(path.state),
                    "reason": path.reason,
                    "endpoint": format_endpoint(path.endpoint) if path.endpoint else None,
                    "how": path.how,
                    "nat": wl.nat_class if wl is not None else None,
                    "local_port": path.extra_port or (wl.port if wl is not None else None),
                    "peer_nat": path.peer_nat,
                    "rtt_ms": path.rtt_ms,
                    "last_rx_s": last_rx,
                    "role": "initiator" if self.site_id > site_id else "responder",
                    "tunnel": str(tunnel.state) if tunnel is not None else None,
                    # This path's MTU as probed (docs/mesh.md, "Path MTU").
                    "mtu": tunnel.pmtu.path_mtu(path.fp_link) if tunnel is not None else None,
                    "punches": path.punches,
                    "since_s": round(now - path.since, 1),
                })
        return out

    def reach(self, site_id: int) -> tuple[bool, str | None]:
        """Whether the tunnel to site_id carries traffic now (its subnets are mesh
        candidates) and, if not, why: for WAN recovery's per-site status."""
        if not self.enabled:
            return False, "the mesh is disabled on this site"
        peer = self.remotes.get(site_id)
        if peer is None:
            return False, "no path to it is known yet"
        tunnel = peer.tunnel
        if tunnel is not None and tunnel.state is State.UP:
            return True, None  # a hold after a silence does not apply to recovery
        reasons = [f"{p.link_name}: {p.reason}" for p in peer.paths.values() if p.reason]
        return False, "; ".join(reasons) or "its tunnel is down"

    def summary(self) -> dict[str, Any]:
        st = self.stats
        paths = [p for peer in self.remotes.values() for p in peer.paths.values()]
        return {
            "enabled": self.enabled,
            "peers": len(self.remotes),
            "peers_up": sum(1 for p in self.remotes.values() if p.up),
            "paths_direct": sum(1 for p in paths if p.state is PathState.DIRECT),
            "stats": dict(st.__dict__),
        }

    def peers(self, listed: Container[int]) -> list[dict[str, Any]]:
        out = []
        # Only tunnels that are up: otherwise the cloud's entry for the site says more.
        for site_id, peer in self.remotes.items():
            if site_id in listed or peer.tunnel is None or peer.tunnel.state is not State.UP:
                continue
            st = peer.tunnel.status()
            st["transport"] = "mesh"
            out.append(st)
        return out

    def close(self) -> None:
        for path in self._all_paths():
            self._stop_birthday(path)
        for peer in self.remotes.values():
            session = peer.tunnel.session if peer.tunnel is not None else None
            if session is not None and session.established and peer.tunnel is not None:
                for d in session.close():
                    self.port.send(peer.tunnel.link_id, peer.tunnel.endpoint, d)

