"""The cloud side of a socket: its DTLS sessions to the PoPs and what they bring.

Owns, per docs/cloud.md: one session to a PoP over every eligible link (always the DTLS
client, keys handed over exactly as for a site-to-site tunnel, by `PeerTunnel`), the
registration and the `welcome` / `config` / `directory` messages, keepalives and dead
detection on the supervisor's clock, ping/pong round-trip times, the choice of the primary or
a secondary PoP (with the hold time before returning), the cloud's route candidates (every
other site's subnets to the PoP session on the best live link, submitted to paths.py, which
decides and installs the routes), the check of every prefix of the directory before anything
uses it (`_valid_directory`: no prefix wider than /8, none in the special ranges, none
overlapping the LAN's or a static peer's subnets, common/addressing.py; a refused prefix is
dropped from its entry, counted and logged once), the persistence of the configuration and
directory in the store (and starting from them, marked stale, when no PoP answers), the
upload of the socket's events, and which STUN server the links are mapped against (the
active PoP's; the links themselves, their precedence and their public endpoints are the link
manager's, links.py).

Like tunnel.py it does no I/O of its own: the supervisor calls `tick()`, and the session
layer (sessions.py), with which the cloud is registered as an owner, hands its PoP sessions'
records and failures to their tunnels; datagrams leave through the supervisor's `Port`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sdwan.bindings.fastpath import PEER_GROUP_FLAG, FastPath, FastPathError
from sdwan.common.addressing import Owned, check_prefix
from sdwan.common.dtls import DtlsSession
from sdwan.common.sessions import SessionOwner
from sdwan.common.store import Store, StoreError
from sdwan.common.stun import DEFAULT_PORT as STUN_DEFAULT_PORT
from sdwan.common.tomlcheck import IPNetwork, format_endpoint
from sdwan.site.config import Link, Pop
from sdwan.site.health import Target
from sdwan.site.links import LinkManager, WanLink
from sdwan.site.paths import Candidate, Paths, Transport
from sdwan.site.sources import SOURCE_ANY, add_peer
from sdwan.site.tunnel import Addr, PeerTunnel, Port, State, Timers

log = logging.getLogger("sdwan.site.cloud")

POP_PEER_FLAG = 0x80000000
DOC_CONFIG = "cloud.config"
DOC_DIRECTORY = "cloud.directory"
# A PoP that refuses our registration is asked again this much later, not in a loop.
REFUSED_RETRY_S = 30.0
# The first handshakes after a start get this long before the secondary is tried.
BOOT_GRACE_S = 3.0
# DTLS doubles its retransmission timer up to the handshake deadline; a PoP that comes
# back must not wait for that, so an unanswered handshake is started afresh this often.
HANDSHAKE_RESTART_S = 1.5  # first patience; doubles per restart up to the cap
HANDSHAKE_RESTART_MAX_S = 8.0  # a slow or lossy link must still get a handshake through
EVENT_ACK_TIMEOUT_S = 5.0
EVENTS_PER_UPLOAD = 50
# What fits one DTLS record at the default DTLS MTU, with room to spare.
# Uploads are fragmented across DTLS records (messages.py); keeping a batch
# this small keeps a burst of datagrams well inside the receivers' buffers.
MAX_MESSAGE = 16 * 1024
# A welcome lost in transit (DTLS does not retransmit application data) is
# asked for again by repeating register until one arrives.
REGISTER_RESEND_S = 1.0
# The one peer group the cloud's routes name (its members: the PoP sessions steering uses).
CLOUD_GROUP = PEER_GROUP_FLAG | 1
FIRST_RX_GRACE_S = 2.0  # beyond dead_after, for the PoP's first packet after the hand-over
STEER_REFRESH_S = 10.0  # `steer` is sent again this often (a lost one is not acked)
STEER_REPEAT_S = 0.5  # and after a change, again this long and three times as long later
PINGS_KEPT = 8
PATHS_PRODUCER = "cloud"  # the name this module's candidates go by in paths.py
# Refused prefixes of the directory are logged once each: this many (site, prefix) pairs are
# remembered; past that a hostile PoP's churn is still counted, logged no more.
REFUSED_REMEMBERED = 4096
REFUSED_SHOWN = 16  # the latest first refusals in `socketctl pop`


def pop_peer_id(pop_id: int, link_id: int) -> int:
    """The fast-path peer id of the session to PoP pop_id over link link_id."""
    return POP_PEER_FLAG | (pop_id << 8) | link_id


class LinkState(StrEnum):
    CONNECTED = "connected"
    CONNECTING = "connecting"
    DOWN = "down"


@dataclass(frozen=True)
class CloudTimers:
    keepalive_s: float = 0.2
    dead_after_s: float = 0.6
    return_hold_s: float = 30.0
    ping_s: float = 1.0
    rekey_s: float = 600.0
    key_max_age_s: int | None = None  # None: keytimers.default_key_max_age(rekey_s)


@dataclass
class CloudStats:
    malformed: int = 0
    unknown: int = 0
    refused: int = 0
    bad_directory_entries: int = 0
    directory_gaps: int = 0  # deltas on another base than ours (the next ping repairs it)
    refused_prefixes: int = 0  # prefixes of the directory refused (each counted once)


@dataclass
class _Ping:
    next_at: float = 0.0
    next_id: int = 1
    sent: dict[int, float] = field(default_factory=dict)


def _age_s(ns: int) -> float:
    """Seconds since a fast-path timestamp (CLOCK_MONOTONIC, like time.monotonic_ns)."""
    return max(0.0, (time.monotonic_ns() - ns) / 1e9) if ns else 0.0


class PopSession:
    """The session to one PoP over one link."""

    def __init__(self, cloud: Cloud, pop: Pop, pop_index: int, link_id: int, link: Link) -> None:
        self.cloud = cloud
        self.pop = pop
        self.pop_index = pop_index
        self.link_id = link_id
        self.link = link
        self.peer_id = pop_peer_id(pop.id, link_id)
        self.welcomed = False
        self.reason: str | None = "waiting for the first handshake"
        self.rtt_ms: float | None = None
        self.last_rx_at: float | None = None
        self.last_tx_at = 0.0
        self._rx_mark = 0
        self._first_rx_pending = False
        self._tx_mark = 0
        self._ping = _Ping()
        self._was_connected = False
        self._hs: tuple[DtlsSession, float] | None = None
        self._hs_patience = HANDSHAKE_RESTART_S
        # The links' public endpoints and NAT classes as last sent (links.advertised()).
        self.registered_public: tuple[tuple[str | None, str | None], ...] | None = None
        self._next_register = 0.0
        # A PoP relays every other site: any prefix of the allowed sources, none outside.
        add_peer(cloud.fp, self.peer_id, owner=SOURCE_ANY)
        cloud.fp.set_endpoint(self.peer_id, link_id, pop.endpoint)
        self.tunnel = PeerTunnel(
            my_site_id=cloud.site_id,
            peer_site_id=pop.id,
            link_id=link_id,
            link_name=link.name,
            endpoint=pop.endpoint,
            fp=cloud.fp,
            port=_SessionPort(self),
            timers=cloud.tunnel_timers,
            clock=cloud.clock,
            on_event=self._on_tunnel_event,
            fp_peer_id=self.peer_id,
            expected=("pop", pop.id),
            initiator=True,
            kicks=False,
            check_liveness=False,
            on_app_message=self._on_message,
            keep_session=True,
            on_keys_active=self._on_keys_active,
            link_mtu=cloud.links.mtu,
        )

    # ---------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        return self.tunnel.state is State.UP and self.welcomed

    @property
    def state(self) -> LinkState:
        if self.connected:
            return LinkState.CONNECTED
        if self.tunnel.state is State.DOWN:
            return LinkState.DOWN
        return LinkState.CONNECTING

    def close(self) -> None:
        session = self.tunnel.session
        if session is not None and session.established:
            for d in session.close():
                self.cloud.port.send(self.link_id, self.tunnel.endpoint, d)
        with contextlib.suppress(FastPathError):
            self.cloud.fp.peer_del(self.peer_id)
        self.cloud.paths.forget_peer(self.peer_id)  # peer_del took its routes with it
        if self._was_connected:
            self.cloud.event(
                "pop.disconnected",
                f"PoP {self.pop.id} session over {self.link.name} closed",
                {"pop_id": self.pop.id, "link": self.link.name, "reason": "closed"},
            )

    # ---------------------------------------------------------------- inputs

    def tick(self, now: float) -> None:
        self.tunnel.tick()
        self._restart_stuck_handshake(now)
        if self.tunnel.state is not State.UP:
            return
        if not self.welcomed and self.registered_public is not None and now >= self._next_register:
            self.register()
        c = self.cloud.fp.peer_counters(self.peer_id)
        # When it happened, not when this tick saw it: the ticker comes when a keepalive or
        # the dead line is due (next_due), so a tick's time can be well after the packet.
        # (Never back: a message already counted as heard from the PoP may be newer.)
        if c.last_rx_ns != self._rx_mark:
            self._rx_mark = c.last_rx_ns
            self._first_rx_pending = False
            at = now - _age_s(c.last_rx_ns)
            self.last_rx_at = at if self.last_rx_at is None else max(self.last_rx_at, at)
        if c.last_tx_ns != self._tx_mark:
            self._tx_mark = c.last_tx_ns
            self.last_tx_at = max(self.last_tx_at, now - _age_s(c.last_tx_ns))
        timers = self.cloud.timers
        silent = now - (self.last_rx_at if self.last_rx_at is not None else now)
        # The PoP's first packet after the key hand-over is a round trip away, which may be
        # longer than dead_after on a slow link: that wait has its own, longer bound.
        dead_after = timers.dead_after_s + (FIRST_RX_GRACE_S if self._first_rx_pending else 0)
        if silent > dead_after:
            self._lost(f"no packets from the PoP for {silent * 1000:.0f} ms")
            return
        if now - self.last_tx_at >= timers.keepalive_s:
            try:
                self.cloud.fp.send_keepalive(self.peer_id)
            except FastPathError as e:
                log.debug("PoP %d over %s: keepalive not sent: %s", self.pop.id, self.link.name, e)
            self.last_tx_at = now
        if self.welcomed and now >= self._ping.next_at:
            self._ping.next_at = now + timers.ping_s
            pid = self._ping.next_id
            self._ping.next_id += 1
            self._ping.sent[pid] = now
            while len(self._ping.sent) > PINGS_KEPT:
                del self._ping.sent[min(self._ping.sent)]
            ping: dict[str, Any] = {"t": "ping", "id": pid}
            if self.cloud.is_active(self):
                # The PoP sends the whole directory again when ours is not the one it sent.
                ping["rev"] = self.cloud.directory_rev
            self.tunnel.send_message(ping)

    def next_due(self, now: float) -> float:
        """When tick() next has something to do: a handshake given up, the next attempt, a
        keepalive, the PoP's silence turning into a loss, a ping, a register resent, the
        tunnel's rekey."""
        tunnel = self.tunnel
        if tunnel.state is not State.UP:
            hs = tunnel.handshaking
            if hs is None:
                return tunnel.next_due()
            if self._hs is None or self._hs[0] is not hs:
                return now  # the next tick starts timing it
            return self._hs[1] + self._hs_patience
        if not tunnel.settled:
            return now
        timers = self.cloud.timers
        due = min(tunnel.next_due(), self.last_tx_at + timers.keepalive_s)
        if self.last_rx_at is not None:
            grace = FIRST_RX_GRACE_S if self._first_rx_pending else 0.0
            due = min(due, self.last_rx_at + timers.dead_after_s + grace)
        if self.welcomed:
            due = min(due, self._ping.next_at)
        elif self.registered_public is not None:
            due = min(due, self._next_register)
        return due

    def _restart_stuck_handshake(self, now: float) -> None:
        hs = self.tunnel.handshaking
        if hs is None:
            self._hs = None
            return
        if self._hs is None or self._hs[0] is not hs:
            self._hs = (hs, now)
            return
        if now - self._hs[1] >= self._hs_patience and not hs.established:
            self._hs = None
            self._hs_patience = min(self._hs_patience * 2, HANDSHAKE_RESTART_MAX_S)
            self.tunnel.port.forget_session(hs)
            self.tunnel.on_failed(hs, "no answer from the PoP")

    def _lost(self, reason: str, retry_after_s: float = 0.0) -> None:
        self.welcomed = False
        self.tunnel.declare_down(reason, retry_after_s)
        self.reason = reason
        self.cloud.session_lost(self, reason)
        self._was_connected = False

    def _on_tunnel_event(self, kind: str, text: str) -> None:
        if kind != "tunnel-up":
            self.reason = self.tunnel.reason

    def _on_keys_active(self, session: DtlsSession) -> None:
        now = self.cloud.clock()
        self._hs_patience = HANDSHAKE_RESTART_S
        self.last_rx_at = now
        self._rx_mark = self.cloud.fp.peer_counters(self.peer_id).last_rx_ns
        self._first_rx_pending = True
        self.reason = "registering"
        # Keepalives whenever nothing else went out for keepalive_s, from the fast path's own
        # thread (the supervisor starts it): however long this loop stalls, the PoP keeps
        # hearing from us. tick() still sends one when it sees none went out.
        try:
            self.cloud.fp.set_keepalive(self.peer_id, self.cloud.timers.keepalive_s)
        except FastPathError as e:
            log.debug("PoP %d over %s: keepalive interval not set: %s", self.pop.id,
                      self.link.name, e)
        self.register()

    def register(self) -> None:
        self._next_register = self.cloud.clock() + REGISTER_RESEND_S
        self.registered_public = self.cloud.links.advertised()
        self.tunnel.send_message(self.cloud.register_message(self.link_id, self.link))

    def _on_message(self, session: DtlsSession, msg: dict[str, Any]) -> None:
        cloud = self.cloud
        now = cloud.clock()
        # A DTLS record is authenticated as much as a data packet is.
        self.last_rx_at = now
        kind = msg.get("t")
        try:
            if kind == "welcome":
                cloud.on_welcome(self, msg)
                if not self.welcomed:
                    self.welcomed = True
                    self.reason = None
                    self._was_connected = True
                    self._ping.next_at = now
                    cloud.session_connected(self)
            elif kind == "config":
                cloud.on_config(self, msg)
            elif kind == "directory":
                cloud.on_directory(self, msg)
            elif kind == "directory-delta":
                cloud.on_directory_delta(self, msg)
            elif kind == "pong":
                sent = self._ping.sent.pop(int(msg["id"]), None)
                if sent is not None:
                    self.rtt_ms = round((now - sent) * 1000, 1)
            elif kind == "events-ack":
                cloud.on_events_ack(int(msg["up_to"]))
            elif kind == "error":
                reason = str(msg.get("reason") or "no reason given")[:200]
                cloud.stats.refused += 1
                self._lost(f"PoP refused the registration: {reason}", REFUSED_RETRY_S)
            elif isinstance(kind, str) and kind in cloud.handlers:
                cloud.handlers[kind](self, msg)
            elif isinstance(kind, str):
                cloud.stats.unknown += 1  # a newer PoP: ignored, as the contract says
            else:
                raise ValueError("no message kind")
        except (ValueError, KeyError, TypeError) as e:
            cloud.stats.malformed += 1
            log.warning(
                "PoP %d over %s: malformed %r message dropped: %s",
                self.pop.id,
                self.link.name,
                kind,
                e,
            )

    # ---------------------------------------------------------------- status

    def status(self, now: float) -> dict[str, Any]:
        return {
            "pop_id": self.pop.id,
            "endpoint": format_endpoint(self.pop.endpoint),
            "link": self.link.name,
            "state": str(self.state),
            "rtt_ms": self.rtt_ms if self.connected else None,
            "last_seen_s": None if self.last_rx_at is None else round(now - self.last_rx_at, 1),
            "reason": None if self.connected else (self.reason or self.tunnel.reason),
            "handshakes": self.tunnel.handshakes,
            "mtu": self.tunnel.pmtu.mtu if self.connected else None,
            # The rekey interval and key-age limit agreed with the PoP in the key hand-over.
            "timers": self.tunnel.timers_status(),
            # Packets from the PoP dropped by reason: `spoofed`, a source outside every
            # site's prefixes (docs/security.md, "Source addresses").
            "drops": self._drops(),
        }

    def _drops(self) -> dict[str, int] | None:
        try:
            return self.cloud.fp.peer_counters(self.peer_id).drops
        except FastPathError:
            return None


class _SessionPort:
    """The supervisor's Port, remembering which PoP session each DTLS session belongs to."""

    def __init__(self, owner: PopSession) -> None:
        self.owner = owner

    def send(self, link_id: int, addr: Addr, data: bytes) -> None:
        self.owner.cloud.port.send(link_id, addr, data)

    def client_session(
        self, link_id: int, addr: Addr, expected_site_id: int | tuple[str, int]
    ) -> DtlsSession:
        session = self.owner.cloud.port.client_session(link_id, addr, expected_site_id)
        self.owner.cloud.by_session[session] = self.owner
        return session

    def forget_session(self, session: DtlsSession) -> None:
        self.owner.cloud.by_session.pop(session, None)
        self.owner.cloud.port.forget_session(session)


def _parse_networks(value: Any) -> list[IPNetwork]:
    if not isinstance(value, list):
        raise ValueError("subnets is not a list")
    return [ipaddress.ip_network(v, strict=True) for v in value if isinstance(v, str)]


class Cloud(SessionOwner):
    """All PoP sessions of one socket, the cloud's route candidates and the cloud documents; an
    owner of the session layer for the client sessions it opens (it accepts none as a server)."""

    def __init__(
        self,
        *,
        site_id: int,
        version: str,
        links: LinkManager,
        pops: Sequence[Pop],
        timers: CloudTimers,
        fp: FastPath,
        paths: Paths,
        port: Port,
        store: Store | None,
        clock: Callable[[], float] = time.monotonic,
        owned: Sequence[Owned] = (),
    ) -> None:
        self.site_id = site_id
        # The LAN's and the static peers' subnets: no prefix of the directory may overlap them.
        self.owned = tuple(owned)
        self._refused: dict[tuple[int, str], str] = {}
        self._refused_recent: deque[dict[str, Any]] = deque(maxlen=REFUSED_SHOWN)
        self.version = version
        self.links = links
        self.pops = list(pops)
        self.timers = timers
        self.tunnel_timers = Timers(
            keepalive_s=timers.keepalive_s,
            rekey_s=timers.rekey_s,
            key_max_age_s=timers.key_max_age_s,
            dead_after_s=timers.dead_after_s,
            retry_min_s=0.5,
            retry_max_s=2.0,
        )
        self.fp = fp
        self.paths = paths
        self.port = port
        self.store = store
        self.clock = clock
        self.stats = CloudStats()
        self.sessions: dict[int, PopSession] = {}
        self.by_session: dict[DtlsSession, PopSession] = {}
        self.active = 0  # index into pops of the PoP the routes point at
        self.started = clock()
        self._primary_down_since: float | None = self.started
        self._primary_stable_since: float | None = None
        self._active_live_seen = False
        self._switched_at = self.started
        self.config: dict[str, Any] | None = None
        self.config_rev: int | None = None
        # Whether self.config came from the PoP the routes follow (a secondary's may lag
        # behind an account change: the revocation list only grows from it, site/revoked.py).
        self.config_from_active = False
        self.directory: list[dict[str, Any]] = []
        self.directory_rev: int | None = None
        self.stale = False
        # What was last submitted to paths: the route target and the directory it came from.
        self._submitted: tuple[int | None, list[dict[str, Any]]] | None = None
        self._upload: tuple[int, float] | None = None  # (last seq sent, when)
        # Messages of other parts (the mesh's `punch`), by kind: a handler raises ValueError,
        # KeyError or TypeError for a malformed one, counted here.
        self.handlers: dict[str, Callable[[PopSession, dict[str, Any]], None]] = {}
        self._directory_watchers: list[Callable[[], None]] = []
        self._config_watchers: list[Callable[[], None]] = []
        # (generation, (link id, weight)...) of the links cloud traffic uses (link health's
        # steering, site/steering.py); None: the best-ranked live session carries it.
        self.link_weights: Callable[[], tuple[int, Sequence[tuple[int, int]]]] | None = None
        # Whether link health finds a link down (site/health.py); None: only sessions tell.
        self.link_down: Callable[[int], bool] | None = None
        self._steer_sent: tuple[Any, ...] | None = None
        self._steer_repeats: list[float] = []
        self._group_key: tuple[tuple[int, int, int], ...] | None = None
        self._steer_at = 0.0
        self._load_stored()

    def handle(self, kind: str, handler: Callable[[PopSession, dict[str, Any]], None]) -> None:
        """PoP messages of this kind go to handler (the PoP session, the message)."""
        self.handlers[kind] = handler

    def watch_directory(self, callback: Callable[[], None]) -> None:
        """callback() after every directory change (self.directory holds the new one)."""
        self._directory_watchers.append(callback)

    def watch_config(self, callback: Callable[[], None]) -> None:
        """callback() after every configuration a PoP sends, changed or not (self.config and
        self.config_rev hold it): a part that failed to apply it may try again. The stored
        configuration loaded at start is not announced: read self.config then."""
        self._config_watchers.append(callback)

    def send_to_pop(self, link_id: int, msg: dict[str, Any]) -> bool:
        """Send msg over the active PoP's session on link_id (else any PoP's there that is
        connected); False when there is none."""
        live = [ps for ps in self.sessions.values() if ps.link_id == link_id and ps.connected]
        live.sort(key=lambda ps: ps.pop_index != self.active)
        return any(ps.tunnel.send_message(msg) for ps in live[:1])

    def send_to_any_pop(self, msg: dict[str, Any]) -> bool:
        """Send msg over a connected session of the active PoP (else of any PoP); False when
        none is connected."""
        live = [ps for ps in self.sessions.values() if ps.connected]
        live.sort(key=lambda ps: ps.pop_index != self.active)
        return any(ps.tunnel.send_message(msg) for ps in live[:1])

    def is_active(self, ps: PopSession) -> bool:
        return ps.pop_index == self.active

    @property
    def enabled(self) -> bool:
        return bool(self.pops)

    # ---------------------------------------------------------------- events and store

    def event(self, kind: str, text: str, data: dict[str, Any] | None = None) -> None:
        log.info("%s", text)
        if self.store is None:
            return
        try:
            self.store.add_event(kind, text, data=data)
        except (StoreError, ValueError) as e:
            log.warning("event %s not stored: %s", kind, e)

    def _load_stored(self) -> None:
        if self.store is None or not self.enabled:
            return
        try:
            cfg = self.store.get_doc(DOC_CONFIG)
            dirdoc = self.store.get_doc(DOC_DIRECTORY)
        except StoreError as e:
            log.warning("stored cloud configuration unreadable: %s", e)
            return
        if cfg is not None and isinstance(cfg.value.get("config"), dict):
            self.config = cfg.value["config"]
            self.config_rev = cfg.value.get("rev")
            self.stale = True
        if dirdoc is not None and isinstance(dirdoc.value.get("directory"), list):
            self.directory = self._valid_directory(dirdoc.value["directory"])
            self.directory_rev = dirdoc.value.get("rev")
            self.stale = True
        if self.stale:
            log.info(
                "starting from the stored cloud configuration (rev %s, %d sites)",
                self.config_rev,
                len(self.directory),
            )

    def _put(self, name: str, value: dict[str, Any]) -> None:
        if self.store is None:
            return
        try:
            self.store.put_doc(name, value)
        except (StoreError, ValueError) as e:
            log.warning("cloud document %s not stored: %s", name, e)

    # ---------------------------------------------------------------- messages

    def register_message(self, link_id: int, link: Link) -> dict[str, Any]:
        return {
            "t": "register",
            "site_id": self.site_id,
            "version": self.version,
            "link": self._link_info(link_id),
            "links": [self._link_info(wl.id) for wl in self.links],
        }

    def _link_info(self, link_id: int) -> dict[str, Any]:
        wl = self.links[link_id]
        ip = wl.local_ipv4() or "0.0.0.0"
        return {
            "name": wl.name,
            "precedence": wl.precedence,
            "local": f"{ip}:{wl.link.port}",
            "id": link_id,
            "public_stun": wl.public_str(),
            "offcloud": wl.link.offcloud,
            "static": format_endpoint(wl.link.public) if wl.link.public else None,
            "nat": wl.nat_class,
            # The PoP lists an Alt-WAN link's `local` in the directory (docs/recovery.md): the
            # other sites' Alt-WAN tunnels reach us there. No session ever runs over it, so
            # it travels in `links` only.
            "altwan": wl.altwan,
        }

    def on_welcome(self, ps: PopSession, msg: dict[str, Any]) -> None:
        config, directory = msg["config"], msg["directory"]
        if not isinstance(config, dict) or not isinstance(directory, list):
            raise ValueError("welcome without a config object and a directory list")
        self._set_config(msg.get("rev"), config, ps.pop.id, self.is_active(ps))
        if self.is_active(ps) or self.directory_rev is None:
            self._set_directory(msg.get("rev"), directory)
        self.stale = False

    def on_config(self, ps: PopSession, msg: dict[str, Any]) -> None:
        if not isinstance(msg["config"], dict):
            raise ValueError("config is not an object")
        self._set_config(msg.get("rev"), msg["config"], ps.pop.id, self.is_active(ps))

    def on_directory(self, ps: PopSession, msg: dict[str, Any]) -> None:
        if not isinstance(msg["directory"], list):
            raise ValueError("directory is not a list")
        # The directory of the PoP the routes follow; revs of two PoPs are not comparable.
        if self.is_active(ps) or self.directory_rev is None:
            self._set_directory(msg.get("rev"), msg["directory"])

    def on_directory_delta(self, ps: PopSession, msg: dict[str, Any]) -> None:
        changed, removed, rev = msg["changed"], msg["removed"], msg["rev"]
        if not isinstance(changed, list) or not isinstance(removed, list):
            raise ValueError("directory-delta without changed and removed lists")
        if not self.is_active(ps) or rev == self.directory_rev:
            return  # another PoP's, or the same delta over a second link
        if msg["base"] != self.directory_rev:
            self.stats.directory_gaps += 1
            return
        gone = set(removed)
        entries = {e["site_id"]: e for e in self.directory if e["site_id"] not in gone}
        for entry in self._valid_directory(changed):
            entries[entry["site_id"]] = entry
        self._set_directory(rev, [entries[k] for k in sorted(entries)])

    def _set_config(self, rev: Any, config: dict[str, Any], pop_id: int, active: bool) -> None:
        changed = config != self.config
        self.config, self.config_rev = config, rev
        self.config_from_active = active
        self._put(DOC_CONFIG, {"rev": rev, "pop_id": pop_id, "config": config})
        if changed:
            self.event(
                "config.updated",
                f"configuration updated from PoP {pop_id} (rev {rev})",
                {"rev": rev, "pop_id": pop_id},
            )
        for watcher in self._config_watchers:
            watcher()

    def _valid_directory(self, entries: list[Any]) -> list[dict[str, Any]]:
        """The entries fit to use: a malformed entry is dropped whole (counted), and each
        prefix is checked like an address learned from the network (`check_prefix`): a refused
        one is taken out of its entry, so neither the cloud's nor the mesh's routes, nor
        `peers`, nor the stored copy ever hold it."""
        good = []
        for entry in entries:
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                sid = entry["site_id"]
                if not isinstance(sid, int) or isinstance(sid, bool) or not 1 <= sid <= 65535:
                    raise ValueError(f"bad site_id {sid!r}")
                nets = _parse_networks(entry.get("subnets"))
            except (ValueError, KeyError, TypeError) as e:
                self.stats.bad_directory_entries += 1
                log.warning("directory entry dropped: %s", e)
                continue
            if sid == self.site_id:
                continue
            kept = []
            for net in nets:
                try:
                    # A static peer listed with its own subnets is that peer, not a hijack.
                    check_prefix(net, self.owned, except_site=sid)
                except ValueError as e:
                    self._refuse_prefix(sid, net, str(e))
                    continue
                kept.append(str(net))
            if len(kept) != len(entry["subnets"]):
                entry = {**entry, "subnets": kept}
            good.append(entry)
        return good

    def _refuse_prefix(self, site_id: int, net: IPNetwork, reason: str) -> None:
        """Count and log a refused prefix of the directory, once per site and prefix (a PoP
        sends its directory again and again)."""
        key = (site_id, str(net))
        if key in self._refused:
            return
        self.stats.refused_prefixes += 1
        if len(self._refused) >= REFUSED_REMEMBERED:
            return
        self._refused[key] = reason
        self._refused_recent.append({"site_id": site_id, "prefix": str(net), "reason": reason})
        log.warning(
            "directory: prefix %s of site %d refused, never routed: %s", net, site_id, reason
        )

    def _set_directory(self, rev: Any, directory: list[Any]) -> None:
        entries = sorted(self._valid_directory(directory), key=lambda e: e["site_id"])
        # A PoP that restarted, or a secondary, may not know an offline site's Alt-WAN
        # endpoints; the last ones known are kept (and stored), since Alt-WAN is what reaches
        # such a site without the cloud.
        last = {e["site_id"]: e.get("altwan") for e in self.directory if e.get("altwan")}
        for i, e in enumerate(entries):
            if e.get("online") is False and not e.get("altwan") and last.get(e["site_id"]):
                entries[i] = {**e, "altwan": last[e["site_id"]]}
        changed = entries != self.directory
        if changed:
            log.info("directory rev %s: %d other sites", rev, len(entries))
        self.directory, self.directory_rev = entries, rev
        self._put(DOC_DIRECTORY, {"rev": rev, "directory": entries})
        self._update_routes()
        if changed:
            for watcher in self._directory_watchers:
                watcher()

    def on_events_ack(self, up_to: int) -> None:
        if self.store is not None:
            try:
                self.store.mark_uploaded(up_to)
            except (StoreError, ValueError) as e:
                log.warning("events-ack %d not recorded: %s", up_to, e)
        self._upload = None

    # ---------------------------------------------------------------- session news

    def session_connected(self, ps: PopSession) -> None:
        self.event(
            "pop.connected",
            f"PoP {ps.pop.id} connected over {ps.link.name}",
            {"pop_id": ps.pop.id, "link": ps.link.name},
        )
        self._update_routes()

    def session_lost(self, ps: PopSession, reason: str) -> None:
        if ps._was_connected:
            self.event(
                "pop.disconnected",
                f"PoP {ps.pop.id} lost over {ps.link.name}: {reason}",
                {"pop_id": ps.pop.id, "link": ps.link.name, "reason": reason},
            )
        if ps.pop_index == 0:
            self._primary_stable_since = None
        self._update_routes()

    # ---------------------------------------------------------------- session owner

    def tunnel_for(self, session: DtlsSession) -> PeerTunnel | None:
        ps = self.by_session.get(session)
        if ps is None or self.sessions.get(ps.peer_id) is not ps:
            return None
        return ps.tunnel

    def sessions_in_use(self) -> list[DtlsSession]:
        return [ps.tunnel.session for ps in self.sessions.values() if ps.tunnel.session]

    def on_key_event(self, peer_id: int, expired: bool) -> bool:
        ps = self.sessions.get(peer_id)
        if ps is None:
            return False
        ps.tunnel.on_rekey_needed()
        return True

    def on_probe_ack(self, peer_id: int, link_id: int, probe_id: int, received: int) -> bool:
        ps = self.sessions.get(peer_id)
        return ps is not None and ps.tunnel.pmtu.on_ack(link_id, probe_id, received)

    # ---------------------------------------------------------------- periodic work

    def _live(self, pop_index: int) -> list[PopSession]:
        return [ps for ps in self.sessions.values() if ps.pop_index == pop_index and ps.connected]

    def _wanted(self) -> set[tuple[int, int]]:
        """(pop index, link id) of every session that should exist: the precedence policy
        (`eligible_for_cloud`) given the live sessions on links link health does not find
        down (so a standby link's session starts the moment a cable is pulled), and every
        link steering still sends cloud traffic over (a standby link keeps its session until
        traffic has left it, after the return hold)."""
        wanted: set[tuple[int, int]] = set()
        steered = [lid for lid, _ in self.link_weights()[1]] if self.link_weights else []
        for index in {0, self.active}:
            live = [ps.link_id for ps in self._live(index) if not self._link_down(ps.link_id)]
            wanted.update((index, i) for i in self.links.eligible_for_cloud(live))
            wanted.update((index, i) for i in steered if self.links.get(i) is not None)
        return wanted

    def _link_down(self, link_id: int) -> bool:
        return self.link_down is not None and self.link_down(link_id)

    def tick(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        self._choose_pop(now)
        wanted = self._wanted()
        for peer_id, ps in list(self.sessions.items()):
            if (ps.pop_index, ps.link_id) not in wanted:
                del self.sessions[peer_id]
                ps.close()
        for index, link_id in sorted(wanted):
            pid = pop_peer_id(self.pops[index].id, link_id)
            if pid not in self.sessions:
                self.sessions[pid] = PopSession(
                    self, self.pops[index], index, link_id, self.links[link_id].link
                )
        for ps in list(self.sessions.values()):
            try:
                ps.tick(now)
            except Exception:
                log.exception("PoP session %x tick failed", ps.peer_id)
        for session, ps in list(self.by_session.items()):
            # A session a rekey replaced stays while its grace lasts: the PoP may still send
            # over it, and its messages count (docs/tunnel.md, "Messages during a rekey").
            if self.sessions.get(ps.peer_id) is not ps or (
                session is not ps.tunnel.session
                and (session.established or session.failed)
                and not ps.tunnel.holds_replaced(session)
            ):
                del self.by_session[session]
        self._update_routes()
        self._send_steer(now)
        self._upload_events(now)
        self.links.use_stun_server(self.stun_server(), self.pops[self.active].endpoint)
        # Once per tick, however many links changed (each register carries them all), and
        # also for a session that was still registering when an endpoint changed.
        self._reregister()

    def next_due(self) -> float:
        """When tick() next has something to do (socketd ticks no sooner unless something
        arrives): the sessions' clocks, an event upload unanswered, a PoP switch's hold."""
        if not self.enabled:
            return math.inf
        now = self.clock()
        due = self._choice_due(now)
        for ps in self.sessions.values():
            due = min(due, ps.next_due(now))
        if self._upload is not None:
            due = min(due, self._upload[1] + EVENT_ACK_TIMEOUT_S)
        if self._steer_repeats:
            due = min(due, self._steer_repeats[0])
        return due

    def _choice_due(self, now: float) -> float:
        """When _choose_pop's clocks come due (a switch to the secondary, on to the next, or
        back to the primary); a session going live or dead arrives by its own clocks."""
        if len(self.pops) < 2:
            return math.inf
        primary_live = bool(self._live(0))
        if self.active == 0:
            if primary_live:
                return math.inf
            if self._primary_down_since is None:
                return now
            grace = BOOT_GRACE_S if self._primary_down_since == self.started else 0.0
            return self._primary_down_since + grace
        if primary_live:
            if not self._live(self.active) or self._primary_stable_since is None:
                return now
            return self._primary_stable_since + self.timers.return_hold_s
        if self._live(self.active):
            return math.inf
        nxt = self.active + 1 if self.active + 1 < len(self.pops) else 1
        if nxt == self.active:
            return math.inf  # nowhere else to go: a PoP answering again arrives by itself
        return now if self._active_live_seen else self._switched_at + BOOT_GRACE_S

    def _choose_pop(self, now: float) -> None:
        primary_live = bool(self._live(0))
        if primary_live:
            self._primary_down_since = None
            if self._primary_stable_since is None:
                self._primary_stable_since = now
        elif self._primary_down_since is None:
            self._primary_down_since = now
        if self.active == 0:
            if primary_live or len(self.pops) < 2:
                return
            assert self._primary_down_since is not None
            grace = BOOT_GRACE_S if self._primary_down_since == self.started else 0.0
            if now - self._primary_down_since >= grace:
                self._switch(1, "every session to the primary PoP is down")
            return
        active_live = bool(self._live(self.active))
        if primary_live and (
            not active_live
            or now - (self._primary_stable_since or now) >= self.timers.return_hold_s
        ):
            self._switch(0, "the primary PoP is back")
            return
        if active_live:
            self._active_live_seen = True
        elif self._active_live_seen or now - self._switched_at >= BOOT_GRACE_S:
            nxt = self.active + 1 if self.active + 1 < len(self.pops) else 1
            if nxt != self.active:
                self._switch(nxt, f"PoP {self.pops[self.active].id} is down too")
            else:
                self._switched_at = now

    def _switch(self, index: int, why: str) -> None:
        old, new = self.pops[self.active], self.pops[index]
        self.active = index
        self._switched_at = self.clock()
        self._active_live_seen = False
        role = "primary" if index == 0 else "secondary"
        self.event(
            "pop.switched",
            f"switched from PoP {old.id} to the {role} PoP {new.id}: {why}",
            {"from": old.id, "to": new.id, "reason": why},
        )

    def _weights(self) -> dict[int, int]:
        return dict(self.link_weights()[1]) if self.link_weights is not None else {}

    def _best(self, cands: list[PopSession]) -> PopSession | None:
        """The session on the heaviest link steering uses, then the best-ranked."""
        w = self._weights()
        return min(
            cands, key=lambda ps: (-w.get(ps.link_id, 0), self.links.rank(ps.link_id)),
            default=None,
        )

    def _members(self) -> list[tuple[PopSession, int]]:
        """The PoP sessions cloud traffic goes to, with their shares: the live sessions (to
        the active PoP, else the primary) on the links steering uses, by weight; else the
        best-ranked live one; with nothing live, where traffic will flow first."""
        w = self._weights()
        live = self._live(self.active) or self._live(0)
        if live:
            weighted = [(ps, w[ps.link_id]) for ps in live if w.get(ps.link_id, 0) > 0]
            if weighted:
                return sorted(weighted, key=lambda m: (-m[1], self.links.rank(m[0].link_id)))
            # A session still counted live on a link health finds down is the last choice.
            best = self._best([ps for ps in live if not self._link_down(ps.link_id)] or live)
        else:
            best = self._best([ps for ps in self.sessions.values()
                               if ps.pop_index == self.active])
        return [(best, 1)] if best is not None else []

    def _route_target(self) -> int | None:
        """The fast-path peer the cloud's routes name: the cloud's peer group (its members
        follow link health's steering, `_sync_group`), or without steering the one session."""
        if self.link_weights is not None:
            return CLOUD_GROUP
        members = self._members()
        return members[0][0].peer_id if members else None

    def _sync_group(self) -> None:
        """The cloud group's members, set again whenever they or their shares change (a
        re-created session's peer is a new member, though its id is the old one)."""
        if self.link_weights is None:
            return
        members = self._members()
        key = tuple((ps.peer_id, id(ps), w) for ps, w in members)
        if key == self._group_key:
            return
        try:
            self.fp.set_group(CLOUD_GROUP, [(ps.peer_id, w) for ps, w in members])
        except FastPathError as e:
            log.warning("cloud group not set: %s", e)
            return
        self._group_key = key

    def _update_routes(self) -> None:
        if not self.enabled:
            return
        self._sync_group()
        target = self._route_target()
        # The directory list is replaced, never changed in place, whenever a new one arrives.
        last = self._submitted
        if last is not None and last[0] == target and last[1] is self.directory:
            return
        candidates: list[Candidate] = []
        if target is not None:
            for entry in self.directory:
                for net in _parse_networks(entry.get("subnets")):
                    candidates.append(Candidate(net, target, Transport.CLOUD))
        self._submitted = (target, self.directory)
        # paths.py keeps them off our LAN and off static peers' subnets.
        self.paths.submit(PATHS_PRODUCER, candidates)

    def _send_steer(self, now: float) -> None:
        """Tell the PoP which of our links to send to us over (`steer`, docs/cloud.md): when
        the links in use or the live sessions change, again STEER_REPEAT_S later twice (it is
        not acknowledged: a lost one must not leave the PoP on a link we left for long), and
        every STEER_REFRESH_S."""
        if self.link_weights is None:
            return
        w = self._weights()
        live = [ps for ps in self.sessions.values() if ps.connected]
        key = (tuple(sorted(w.items())), frozenset(ps.peer_id for ps in live))
        if key != self._steer_sent:
            self._steer_repeats = [now + STEER_REPEAT_S, now + 3 * STEER_REPEAT_S]
        elif self._steer_repeats and now >= self._steer_repeats[0]:
            self._steer_repeats.pop(0)
        elif now - self._steer_at < STEER_REFRESH_S:
            return
        self._steer_sent, self._steer_at = key, now
        msg = {"t": "steer", "links": {self.links[lid].name: wt for lid, wt in w.items()}}
        for ps in live:
            ps.tunnel.send_message(msg)

    def probe_targets(self, wl: WanLink) -> list[Target]:
        """The PoP sessions over this link, for link health to probe (site/health.py): every
        one, live or not (a session that cannot answer is what silence on a link looks
        like)."""
        return [
            Target(ps.peer_id, wl.id, ("pop", ps.pop.id), judged=ps.connected)
            for ps in self.sessions.values() if ps.link_id == wl.id
        ]

    def _upload_events(self, now: float) -> None:
        if self.store is None:
            return
        if self._upload is not None and now - self._upload[1] < EVENT_ACK_TIMEOUT_S:
            return
        live = self._live(self.active) or self._live(0)
        if not live:
            return
        try:
            batch = self.store.pending_upload(EVENTS_PER_UPLOAD)
        except StoreError as e:
            log.warning("events not read for upload: %s", e)
            return
        if not batch:
            return
        items: list[dict[str, Any]] = []
        size = len('{"t": "events", "events": []}')
        for ev in batch:
            item = {"seq": ev.seq, "at": ev.ts, "kind": ev.kind, "text": ev.text, "data": ev.data}
            encoded = len(json.dumps(item)) + 2
            if encoded > MAX_MESSAGE - 40:
                item = {**item, "text": ev.text[:200], "data": {"truncated": True}}
                encoded = len(json.dumps(item)) + 2
            if items and size + encoded > MAX_MESSAGE:
                break
            items.append(item)
            size += encoded
        ps = self._best(live)
        assert ps is not None
        # The store's instance id tells the PoP when this site's sequence restarted
        # (a new or reset database), so it does not drop the events as duplicates.
        msg = {"t": "events", "events": items, "instance": self.store.instance_id}
        if ps.tunnel.send_message(msg):
            self._upload = (items[-1]["seq"], now)

    # ---------------------------------------------------------------- STUN

    def stun_server(self) -> Addr:
        """The STUN server links are mapped against: the active PoP's `stun`, else its
        address with the standard port."""
        pop = self.pops[self.active]
        return pop.stun if pop.stun is not None else (pop.endpoint[0], STUN_DEFAULT_PORT)

    def _reregister(self) -> None:
        """Send `register` again on every registered PoP session that has not told the PoP the
        links' current public endpoints and NAT classes."""
        current = self.links.advertised()
        for ps in self.sessions.values():
            if ps.welcomed and ps.registered_public != current:
                ps.register()

    # ---------------------------------------------------------------- status

    @property
    def state(self) -> str:
        if not self.enabled:
            return "off"
        if self._live(self.active) or self._live(0):
            return "up"
        if any(ps.state is LinkState.CONNECTING for ps in self.sessions.values()):
            return "connecting"
        return "down"

    def summary(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "active_pop": self.pops[self.active].id if self.enabled else None,
            "primary_pop": self.pops[0].id if self.enabled else None,
            "on_secondary": self.active != 0,
            "stale": self.stale,
            "config_rev": self.config_rev,
            "directory_rev": self.directory_rev,
            "sites": len(self.directory),
            "sessions_up": sum(1 for ps in self.sessions.values() if ps.connected),
            "messages": {
                "malformed": self.stats.malformed,
                "unknown": self.stats.unknown,
                "refused": self.stats.refused,
                "bad_directory_entries": self.stats.bad_directory_entries,
                "directory_gaps": self.stats.directory_gaps,
                "refused_prefixes": self.stats.refused_prefixes,
            },
        }

    def pop_status(self) -> dict[str, Any]:
        now = self.clock()
        rows = []
        for index, pop in enumerate(self.pops):
            if index not in (0, self.active):
                continue
            for wl in self.links:
                if wl.altwan:
                    continue  # never a PoP session (socketctl peers shows its tunnels)
                ps = self.sessions.get(pop_peer_id(pop.id, wl.id))
                if ps is not None:
                    row = ps.status(now)
                else:
                    row = {
                        "pop_id": pop.id,
                        "endpoint": format_endpoint(pop.endpoint),
                        "link": wl.name,
                        "state": str(LinkState.DOWN),
                        "rtt_ms": None,
                        "last_seen_s": None,
                        "reason": "standby: precedence 3 is used only when no other link"
                        " reaches the PoP",
                        "handshakes": 0,
                    }
                row["role"] = "primary" if index == 0 else "secondary"
                row["active"] = index == self.active
                row["public"] = wl.public_str()
                row["stun"] = wl.stun.status(now)
                rows.append(row)
        return {
            **self.summary(),
            "sessions": rows,
            "refused_prefixes": list(reversed(self._refused_recent)),
        }

    def peers(self, listed: Container[int]) -> list[dict[str, Any]]:
        return self.directory_peers(exclude=listed)

    def directory_peers(self, exclude: Iterable[int]) -> list[dict[str, Any]]:
        """The directory's sites as `peers` entries (transport "cloud")."""
        skip = set(exclude)
        members = self._members()
        via = members[0][0] if members else None  # the heaviest share of the traffic
        link = via.link.name if via is not None else None
        up = self.state == "up"
        out = []
        for entry in self.directory:
            if entry["site_id"] in skip:
                continue
            online = bool(entry.get("online", True))
            out.append(
                {
                    "site_id": entry["site_id"],
                    "name": entry.get("name"),
                    "transport": "cloud",
                    "state": "up" if up and online else "down",
                    "reason": None
                    if up and online
                    else ("site is offline" if up else f"cloud is {self.state}"),
                    "endpoint": format_endpoint(self.pops[self.active].endpoint),
                    "link": link,
                    "subnets": [str(n) for n in _parse_networks(entry.get("subnets"))],
                    "online": online,
                    "stale": self.stale,
                    "role": None,
                    "handshakes": None,
                    "last_handshake_s": None,
                    "last_rx_s": None,
                    # The path MTU of the PoP session the traffic takes (its first hop).
                    "mtu": via.tunnel.pmtu.mtu if via is not None and via.connected else None,
                }
            )
        return out

    def close(self) -> None:
        for ps in list(self.sessions.values()):
            ps.close()
        self.sessions.clear()
