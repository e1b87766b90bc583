"""popd, the reference PoP: wires the parts together, as supervisor.py does for a site.

PoP config and account (account.py) -> one UDP socket on the listen port handed to a fast path
with relay on (fastpath.py; no TUN: the PoP only relays) -> DTLS sessions from sites
(dtls.py, cookies, only sites of the account) demultiplexed from the fast path's control queue
by the session layer (sessions.py, shared with socketd; the Pop is its one owner) -> per (site,
link) a `SiteSession`: key hand-over as the responder (handover.py, the same `key` / `key-ack`
messages as tunnel.md), `register` -> `welcome`, keepalives, liveness -> the relay
routes (each site's subnets to its best live session) and the peer directory pushed on every
change -> events uploaded by sites and the PoP's own, in SQLite (store.py) -> a STUN server
(stun.py) on its own port -> status over a control socket (control.py, `popctl`).

The protocol is docs/cloud.md; how popd applies it (ids, timers, limits) is docs/popd.md.
Control messages are framed by messages.py: the welcome and directory of an account with
hundreds of sites go out in fragments, and what sites send is reassembled per session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdwan import __version__
from sdwan.bindings.fastpath import (
    GROUP_MEMBERS,
    PEER_GROUP_FLAG,
    CtrlEvent,
    FastPath,
    FastPathConfig,
    FastPathError,
)
from sdwan.common.certlife import CertWatch, watch_identity
from sdwan.common.control import ControlServer
from sdwan.common.ctrlknown import KnownSources
from sdwan.common.daemon import StartupError, run_service
from sdwan.common.dtls import DtlsContext, DtlsSession
from sdwan.common.handover import KeyHandover, parse_key
from sdwan.common.keytimers import FP_REKEY_BACKSTOP_S
from sdwan.common.messages import FragStats, Reassembler, dumps, encode, encode_text, record_limit
from sdwan.common.netdev import size_buffers
from sdwan.common.pmtu import PathMtu
from sdwan.common.ratelog import RateLog
from sdwan.common.revocation import Presented
from sdwan.common.sessions import (
    REPLACED_GRACE_S,
    Policy,
    SessionLayer,
    SessionOwner,
    source_block,
)
from sdwan.common.store import Store, StoreError, UploadedEvent, UploadResult
from sdwan.common.stun import StunServer
from sdwan.common.tomlcheck import format_endpoint, parse_endpoint
from sdwan.pop.account import Account, ConfigError, load_account
from sdwan.pop.broker import Broker, MeshLink
from sdwan.pop.config import PopConfig, load_pop_config
from sdwan.pop.eventsink import EventSink
from sdwan.pop.keepalives import KeepaliveThread
from sdwan.pop.looplag import LoopLag
from sdwan.pop.ratelimit import Buckets
from sdwan.pop.renewal import RenewalRefused, Renewer

log = logging.getLogger("sdwan.pop.popd")

Addr = tuple[str, int]

LINK_ID = 1  # the PoP has one UDP socket, so one fast-path link
TICK_S = 0.05
DB_NAME = "popd.db"
# What the PoP's records may fill; larger messages go in fragments. Below what a 1280-byte path
# carries (IPv6's minimum MTU, a PPPoE or tunnelled uplink): no ICMP is needed to get through.
DTLS_MTU = 1200
# The largest path MTU probed toward a site (docs/dataplane.md, "Path MTU").
PMTU_MAX = 1500
REGISTER_DEADLINE_S = 10.0  # an established session that never registers is dropped
FULL_DIRECTORY_MIN_S = 5.0  # between two whole directories resent to one session
# Directory changes are pushed at most this often: the changes of a burst of registrations,
# flaps and drops go out as one delta per session (docs/popd.md, "The directory").
DIRECTORY_PUSH_S = 0.2
PUSH_SHARE_FACTOR = 4  # the next push no sooner than this many times the last one's time
# A push's sessions are taken in slices of this much work per turn of the ticker: a push to a
# thousand sessions (~0.3 s, more on a busy machine) never holds the loop in one piece.
PUSH_SLICE_S = 0.02
DELTA_IN_FLIGHT_S = 1.5  # a ping sent before a push arrived: a second plus a round trip
DIRECTORY_KINDS = frozenset({"welcome", "directory", "directory-delta"})
MAX_EVENTS_PER_WAKEUP = 256
# Of the unknown sources' control lane, per wake-up: after the known lane, a bounded share.
MAX_UNKNOWN_PER_WAKEUP = 64
CTRL_BATCH = 16
CTRL_BUDGET_S = 0.02  # of control work per turn of the loop
# Whole directories resent after a gap, PoP-wide (each is the size of a welcome: ~180 KB and
# 11 ms of serialising at 1000 sites): past the budget a stale ping gets its pong only, and
# the site's next ping asks again.
FULL_DIRECTORY_PER_MINUTE = 1200
FULL_DIRECTORY_BURST = 40
# A site's largest message is an events upload (MAX_UPLOADED_EVENTS events); reassembly of
# anything larger is abandoned before it is buffered.
MAX_MESSAGE = 256 * 1024
MAX_PARTIALS = 2  # messages a site may have partly sent at once
FRAG_TIMEOUT_S = 5.0
MAX_LINKS = 16
MAX_UPLOADED_EVENTS = 200
# Fast-path peer ids: S << 8 | L for a registered session (below 2^24); a session that has
# not registered yet lives under an id from this range, which S << 8 | L never reaches.
TEMP_PEER_BASE = 0x40000000
# Every site is a stranger until it authenticates, and several may share one NAT: a source
# (an IPv4 address or IPv6 /64) gets a few slots, any newcomer may evict the oldest handshake
# from an address without a session, and every refusal is listed.
POP_POLICY = Policy(
    max_handshaking=512,
    max_per_source=16,
    source_of=source_block,
    known_skip_per_source=False,
    strangers_evict=True,
    list_strangers=True,
    report_superseded=False,
    mtu=DTLS_MTU,
)


def _ep(addr: Addr) -> str:
    return format_endpoint(addr)


@dataclass(eq=False)
class SiteSession:
    """One DTLS session of one site over one of its links, and its fast-path peer."""

    site_id: int
    addr: Addr
    dtls: DtlsSession
    peer_id: int
    created: float
    last_auth_ns: int
    handover: KeyHandover = field(init=False, repr=False)  # made right after the session
    registered: bool = False
    link_index: int | None = None
    link: dict[str, Any] = field(default_factory=dict)
    links: list[dict[str, Any]] = field(default_factory=list)
    version: str = ""
    registered_at: float | None = None
    first_registered_at: float | None = None  # the punch broker's epoch of this session
    dir_rev: int | None = None  # the directory rev this session was last sent (full or delta)
    # When each rev was sent to it (the last few): a ping naming the rev before one sent
    # moments ago crossed that delta in flight, and is no sign of a lost push.
    dir_sent: collections.deque[tuple[int, float]] = field(
        default_factory=lambda: collections.deque(maxlen=8)
    )
    full_directory_at: float | None = None  # when a whole directory was last resent
    reassembler: Reassembler | None = None  # of the current `dtls`; made on first use
    pmtu: PathMtu | None = None  # probing the path to the site, once transmitting

    @property
    def activated(self) -> tuple[int, int] | None:
        """(local, remote) indices active for transmit."""
        return self.handover.activated

    @property
    def precedence(self) -> int:
        return int(self.link.get("precedence", 3))

    @property
    def link_name(self) -> str:
        return str(self.link.get("name", ""))


@dataclass
class _Stats:
    # What arrives outside a session (garbage, refused handshakes...) is the session layer's.
    oversized: int = 0  # messages past MAX_MESSAGE
    messages_malformed: int = 0
    messages_unknown: int = 0
    keys_refused: int = 0  # `key` messages whose index or timers were refused
    registrations: int = 0  # accepted
    registrations_refused: int = 0
    sessions_revoked: int = 0  # live sessions ended because the account revoked their cert
    sessions_opened: int = 0
    sessions_closed: int = 0
    events_stored: int = 0
    events_duplicate: int = 0
    events_malformed: int = 0
    events_over_quota: int = 0  # dropped: their site uploaded past its rate (each site counted)
    events_deferred: int = 0  # not taken while the writer's backlog was full (sent again)
    events_store_errors: int = 0  # batches the store failed to write (not acknowledged)
    registrations_rate_limited: int = 0  # refused for the rate (registrations_refused too)
    directory_pushes: int = 0  # coalesced pushes (one rev each)
    directory_deltas_sent: int = 0
    directory_full_sent: int = 0  # whole directories: welcomes and resends after a gap
    directory_full_deferred: int = 0  # resends past the PoP-wide budget (the next ping asks)
    directory_bytes: int = 0  # of the directory part of what went to sites (JSON)
    fragments: FragStats = field(default_factory=FragStats)


class RegisterError(ValueError):
    """A register message that cannot be accepted; the message is the `error` reason."""


def _check_link(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RegisterError(f"{what}: expected an object")
    name, prec, local = value.get("name"), value.get("precedence"), value.get("local", "")
    if not isinstance(name, str) or not 1 <= len(name) <= 15:
        raise RegisterError(f"{what}.name: expected a string of 1..15 characters")
    if isinstance(prec, bool) or not isinstance(prec, int) or not 1 <= prec <= 3:
        raise RegisterError(f"{what}.precedence: expected an integer 1..3")
    if not isinstance(local, str) or len(local) > 64:
        raise RegisterError(f'{what}.local: expected an "ip:port" string')
    link_id = value.get("id")
    if link_id is not None and (
        isinstance(link_id, bool) or not isinstance(link_id, int) or not 1 <= link_id <= 255
    ):
        raise RegisterError(f"{what}.id: expected an integer 1..255")
    public_stun = value.get("public_stun")
    if public_stun is not None and (not isinstance(public_stun, str) or len(public_stun) > 64):
        raise RegisterError(f'{what}.public_stun: expected an "ip:port" string or null')
    # Off-cloud per link (docs/mesh.md); a site that says nothing meshes over links 1 and 2.
    offcloud = value.get("offcloud", prec < 3)
    if not isinstance(offcloud, bool):
        raise RegisterError(f"{what}.offcloud: expected true or false")
    static = value.get("static")
    if static is not None and (not isinstance(static, str) or _endpoint_or_none(static) is None):
        raise RegisterError(f'{what}.static: expected an "ip:port" string or null')
    nat = value.get("nat")
    if nat is not None and (not isinstance(nat, str) or len(nat) > 32):
        raise RegisterError(f"{what}.nat: expected a string of at most 32 characters or null")
    # An Alt-WAN link (docs/recovery.md): never a session's, its `local` goes in the directory.
    altwan = value.get("altwan", False)
    if not isinstance(altwan, bool):
        raise RegisterError(f"{what}.altwan: expected true or false")
    return {
        "name": name,
        "precedence": prec,
        "local": local,
        "id": link_id,
        "public_stun": public_stun,
        "offcloud": offcloud,
        "static": static,
        "nat": nat,
        "altwan": altwan,
    }


def _endpoint_or_none(text: Any) -> Addr | None:
    """An endpoint a peer may be told to probe: never loopback, multicast, link-local or
    unspecified (a site must not aim other sites' probes at such addresses)."""
    if not isinstance(text, str):
        return None
    try:
        host, port = parse_endpoint(text)
    except ValueError:
        return None
    ip = ipaddress.ip_address(host)
    if ip.is_loopback or ip.is_multicast or ip.is_link_local or ip.is_unspecified or not port:
        return None
    return host, port


def _altwan_endpoints(links: list[dict[str, Any]]) -> list[str]:
    """The Alt-WAN endpoints of a site's registered links: each Alt-WAN link's `local`, when it
    is an IPv4 endpoint another site may be told to send to (a link without an address yet
    says 0.0.0.0)."""
    out = []
    for link in links:
        ep = _endpoint_or_none(link["local"]) if link["altwan"] else None
        if ep is not None and ":" not in ep[0]:
            out.append(_ep(ep))
    return out


@dataclass
class _PushRound:
    """A directory push under way (Pop._push_directory): its delta and the sessions left."""

    rev: int
    changed: dict[int, dict[str, Any]]
    removed: list[int]
    body: str  # the delta's JSON after its opening brace, as most sessions get it
    pending: collections.deque[int]  # peer ids still to send to
    shared: dict[tuple[int | None, int], list[bytes]] = field(default_factory=dict)
    took: float = 0.0  # work so far, s


class Pop(SessionOwner):
    """The PoP, and the one owner of its session layer: every established session is a site's
    (`tunnel_for` answers with the Pop itself, which takes the sessions as their tunnel)."""

    def __init__(self, cfg: PopConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.started = clock()
        self.stats = _Stats()
        self.ratelog = RateLog(log, clock)
        self.account: Account | None = None
        self.account_loaded_at: float | None = None
        self.account_error: str | None = None
        self.sessions = SessionLayer(
            send=lambda _link, addr, data: self.send(addr, data),
            clock=clock,
            policy=POP_POLICY,
            on_stun=self._on_stun,
        )
        self.sessions.add_owner(self)
        self.by_addr: dict[Addr, SiteSession] = {}
        self.by_peer: dict[int, SiteSession] = {}
        self.by_dtls: dict[DtlsSession, SiteSession] = {}
        # A site's session a rekey just replaced: its site session, its reassembler, and until
        # when its messages still count (the site sends over it until its end of the
        # handshake is done).
        self._replaced: dict[DtlsSession, tuple[SiteSession, Reassembler, float]] = {}
        self._session_ips: collections.Counter[str] = collections.Counter()  # of by_addr
        self.routes: dict[str, int] = {}
        # Per site, the weight of each of its links as its own link health last told us
        # (`steer`): the relay sends to it over the live session on its heaviest link.
        self.steer: dict[int, dict[str, int]] = {}
        # Per site, its peer group's members as last set (the relay routes to the group).
        self._groups: dict[int, list[tuple[int, int]]] = {}
        self.rev = int(time.time() * 1000)  # grows across restarts too
        # The directory entry of every site of the account, always current, and as last
        # pushed; the sites changed since the last push, pushed at most every
        # DIRECTORY_PUSH_S as one delta per session.
        self._entries: dict[int, dict[str, Any]] = {}
        self._entry_json: dict[int, str] = {}  # each entry serialised (welcomes join them)
        self._pushed: dict[int, dict[str, Any]] = {}
        self._dir_dirty: set[int] = set()
        self._push_at = 0.0
        self._round: _PushRound | None = None  # the push under way, slice by slice
        self._broker_dirty = False
        # Every site's sessions by peer id, as by_peer holds them: a site's change costs its
        # own sessions, not a walk over every session of the PoP.
        self.by_site: dict[int, dict[int, SiteSession]] = {}
        self.loop_lag = LoopLag()
        self.sink: EventSink | None = None
        self.keepalives: KeepaliveThread | None = None
        # Per site: its upload mark (instance, seq) as queued to the store and as stored.
        self._marks: dict[int, tuple[str | None, int]] = {}
        self._marks_stored: dict[int, tuple[str | None, int]] = {}
        # Per site: how many of its batches failed to be stored (EventSink.upload's epoch).
        self._upload_epoch: dict[int, int] = {}
        self._event_quota = Buckets(cfg.events.site_per_minute, cfg.events.site_burst, clock)
        # Per site: events stored and dropped over its quota (popctl sites).
        self.site_events: dict[int, dict[str, int]] = {}
        self._register_site = Buckets(cfg.register.site_per_minute, cfg.register.site_burst,
                                      clock)
        self._full_budget = Buckets(FULL_DIRECTORY_PER_MINUTE, FULL_DIRECTORY_BURST, clock)
        self._register_source = Buckets(cfg.register.source_per_minute,
                                        cfg.register.source_burst, clock)
        # Per site, the Alt-WAN endpoints its last register listed ("ip:port"): kept while
        # the site is offline, since the other sites reach it there without the cloud.
        self.altwan: dict[int, list[str]] = {}
        self._next_temp = 0
        self._revoked_presented = Presented(clock)  # when a refusal is said again
        self.fp: FastPath | None = None
        self.known: KnownSources | None = None  # declared to the fast path's control gate
        self._known_gen = -1
        self.dtls: DtlsContext | None = None
        self.store: Store | None = None
        self.control: ControlServer | None = None
        self.stun = StunServer(clock=clock)
        self.stun_main = StunServer(clock=clock)  # Binding requests on the main port
        self.broker = Broker(self._send_to_link, clock=clock)
        self.renewer = Renewer(cfg.renewal, cfg.pki.ca, clock=clock)
        self.certs: CertWatch | None = None  # popd's own certificate and the CA: made by open
        if self.renewer.error is not None:
            log.error("certificate renewal off: %s", self.renewer.error)
        self._stun_transport: asyncio.DatagramTransport | None = None
        self._stop = asyncio.Event()

    # ---------------------------------------------------------------- setup

    def open(self) -> None:
        cfg = self.cfg
        try:
            self.store = Store(cfg.paths.data_dir / DB_NAME, max_events=cfg.events.pop_keep)
            self.sink = EventSink(self.store.path, cfg.events)
            self.sink.start()
        except (StoreError, OSError) as e:
            raise StartupError(f"cannot open the store: {e}") from e
        self._load_account_at_start()
        try:
            self.dtls = DtlsContext(cfg.pki.ca, cfg.pki.cert, cfg.pki.key, ("pop", cfg.id))
            # Every handshake asks the account in force, so a reload applies to the next one.
            self.dtls.revocation = self._refuse_revoked
            self.sessions.dtls = self.dtls
            self.certs = watch_identity(cfg.pki.ca, self.dtls.ca_cert, cfg.pki.cert,
                                        self.dtls.cert)
        except (OSError, ValueError) as e:
            raise StartupError(str(e)) from e
        fp_cfg = FastPathConfig.default()
        fp_cfg.relay = True
        # A site may only send through the relay from its own prefixes (dataplane.md).
        fp_cfg.check_source = True
        # The sites rekey, on an interval never above ours (the agreement in the key
        # hand-over, common/keytimers.py): a key of ours never ages out before it is replaced.
        fp_cfg.rekey_after_seconds = cfg.keys.rekey_s + FP_REKEY_BACKSTOP_S
        fp_cfg.reject_after_seconds = cfg.keys.key_max_age_s
        self.fp = fp = FastPath(fp_cfg)
        # Known control sources besides the sites' endpoints (peers of the fast path): the
        # handshakes under way, and every port of a host where a site lives (sites behind
        # one NAT address, the load generator), as admission ranks them first too.
        self.known = KnownSources(fp)
        self.known.add(self.sessions.addresses)
        self.known.add(lambda: [(ip, 0) for ip in self._session_ips])
        family = socket.AF_INET6 if ":" in cfg.listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Bursts from hundreds of sites (a reload's directory pushes, event
            # uploads in fragments) must not overflow the default buffer.
            size_buffers(sock)
            sock.bind((cfg.listen, cfg.port))
            fp.link_add(LINK_ID, sock.fileno())
        except OSError as e:
            raise StartupError(f"cannot listen on {cfg.listen} port {cfg.port}: {e}") from e
        finally:
            sock.close()  # the fast path keeps its own duplicate
        fp.start()
        self.keepalives = KeepaliveThread(fp, cfg.cloud.keepalive_ms / 1000)
        self.keepalives.start()

    def _load_account_at_start(self) -> None:
        assert self.store is not None
        try:
            account = load_account(self.cfg.account)
        except ConfigError as e:
            doc = self.store.get_doc("account")
            if doc is None:
                raise StartupError(
                    "the account file has errors and no earlier account is stored:\n" + str(e)
                ) from e
            for line in str(e).splitlines():
                log.error("%s", line)
            self.account = Account.from_doc(doc.value)
            self.account_error = str(e)
            self._event("popd.account.refused", f"account file refused, kept the stored one: {e}")
            log.warning("account file refused; running with the last good account from the store")
        else:
            self.account = account
            self.store.put_doc("account", account.to_doc())
            self._log_notes(account)
            self._event(
                "popd.account.loaded",
                f"account {account.name}: {len(account.sites)} site(s),"
                f" {len(account.rules)} rule(s), {_firewall_text(account)}",
            )
        self.account_loaded_at = time.time()

    def close(self) -> None:
        self.known = None
        if self.keepalives is not None:
            self.keepalives.stop()
            self.keepalives = None
        if self.fp is not None:
            self.fp.close()
            self.fp = None
        if self.sink is not None:
            self.sink.close()  # writes everything queued first
            self.sink = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _event(self, kind: str, text: str, site_id: int | None = None, **data: Any) -> None:
        """One of popd's own events, written by the event writer (never on the loop)."""
        if self.sink is not None:
            self.sink.add_own(kind, text, site_id, data or None)

    # ---------------------------------------------------------------- sending

    def send(self, addr: Addr, data: bytes) -> None:
        assert self.fp is not None
        try:
            self.fp.ctrl_send(LINK_ID, addr, data)
        except (OSError, ValueError) as e:
            log.debug("send to %s failed: %s", _ep(addr), e)

    def _send_msg(self, s: SiteSession, msg: dict[str, Any]) -> bool:
        try:
            records = encode(msg, record_limit(s.dtls, DTLS_MTU))
        except ValueError as e:
            log.error("site %d: %s message not sent: %s", s.site_id, msg.get("t"), e)
            return False
        return self._send_records(s, str(msg.get("t")), records)

    def _send_text(self, s: SiteSession, kind: str, text: str) -> bool:
        """A message serialised already (dumps, or put together from serialised parts)."""
        try:
            records = encode_text(text, record_limit(s.dtls, DTLS_MTU))
        except ValueError as e:
            log.error("site %d: %s message not sent: %s", s.site_id, kind, e)
            return False
        return self._send_records(s, kind, records)

    def _send_records(self, s: SiteSession, kind: str, records: list[bytes]) -> bool:
        try:
            datagrams = [d for r in records for d in s.dtls.send(r)]
        except (RuntimeError, ValueError) as e:
            log.error("site %d: %s message not sent: %s", s.site_id, kind, e)
            return False
        if kind in DIRECTORY_KINDS:
            self.stats.directory_bytes += sum(len(r) for r in records)
        for d in datagrams:
            self.send(s.addr, d)
        return True

    def _reassembler(self, s: SiteSession) -> Reassembler:
        if s.reassembler is None:
            s.reassembler = Reassembler(
                max_message=MAX_MESSAGE,
                max_partials=MAX_PARTIALS,
                timeout_s=FRAG_TIMEOUT_S,
                clock=self.clock,
                stats=self.stats.fragments,
            )
        return s.reassembler

    # ---------------------------------------------------------------- control packets

    def _on_ctrl_readable(self) -> None:
        """Control events in small batches until CTRL_BUDGET_S of work: what is left waits
        for the next turn of the loop (the fd is level-triggered), after its timers, so no
        burst (a hundred handshakes, pings that each want a whole directory) holds the loop
        for long. Past what popd can do, the fast path's lanes fill and drop (counted in
        `link.drops.queue_full` for known sources, `ctrl_unknown_full` and
        `ctrl_rate_limited` for the others): DTLS retransmits, a site pings again."""
        assert self.fp is not None
        batches = MAX_EVENTS_PER_WAKEUP // CTRL_BATCH
        unknown_per_batch = max(1, MAX_UNKNOWN_PER_WAKEUP // batches)
        deadline = time.perf_counter() + CTRL_BUDGET_S
        for _ in range(batches):
            self.fp.ctrl_drain(self._on_ctrl_event, CTRL_BATCH, unknown_per_batch)
            if time.perf_counter() >= deadline or self.fp is None:
                break
        # A handshake begun or ended: its address is (no longer) a known source, at once.
        if self.known is not None and self.sessions.generation != self._known_gen:
            self._known_gen = self.sessions.generation
            self.known.refresh()

    def _on_ctrl_event(self, ev: CtrlEvent) -> None:
        self.sessions.on_ctrl_event(ev)

    def _on_stun(self, _link_id: int, addr: Addr, data: bytes) -> bool:
        reply = self.stun_main.handle(data, addr)  # it counts what it drops
        if reply is not None:
            self.send(addr, reply)
        return True

    # ---------------------------------------------------------------- session owner

    def allowed_ids(self) -> frozenset[int]:
        return self.account.site_ids if self.account is not None else frozenset()

    def is_known_source(self, link_id: int, addr: Addr) -> bool:
        # A host where a site already lives: its new handshakes come before strangers'.
        return addr[0] in self._session_ips

    def tunnel_for(self, session: DtlsSession) -> Pop | None:
        if session in self.by_dtls:
            return self
        site_id = session.peer_site_id
        if session.established and site_id is not None and self.account is not None:
            if self.account.revoked.is_revoked(site_id, session.peer_serial):
                return None  # verified before a reload revoked it: refused all the same
            return self if self.account.site(site_id) is not None else None
        return None

    def _refuse_revoked(self, site_id: int, serial: str) -> str | None:
        """The handshake check (dtls.py): why a site certificate is refused, or None. The
        session layer lists and counts the refusal; an event tells the operator, once a
        while per site."""
        if self.account is None:
            return None
        reason = self.account.revoked.reason(site_id, serial)
        if reason is None:
            return None
        text = self._revoked_presented.due(site_id, serial)
        if text is not None:
            log.warning("%s", text)
            self._event("popd.handshake.revoked", text, site_id, serial=serial)
        return reason

    def _end_revoked(self) -> list[dict[str, Any]]:
        """End at once every session whose certificate the account now revokes: the site
        is told why, its DTLS session closed, its relay routes and directory entry follow."""
        assert self.account is not None
        ended: list[dict[str, Any]] = []
        for s in {*self.by_peer.values(), *self.by_addr.values()}:
            if self.by_addr.get(s.addr) is not s and self.by_peer.get(s.peer_id) is not s:
                continue
            reason = self.account.revoked.reason(s.site_id, s.dtls.peer_serial)
            if reason is None:
                continue
            if s.registered:
                self._send_msg(s, {"t": "error", "reason": reason})
            for d in s.dtls.close():
                self.send(s.addr, d)
            self.stats.sessions_revoked += 1
            link = s.link_name or _ep(s.addr)
            text = f"site {s.site_id} link {link}: session ended: {reason}"
            log.warning("%s", text)
            self._event("popd.session.revoked", text, s.site_id, link=s.link_name,
                        serial=s.dtls.peer_serial)
            ended.append({"site_id": s.site_id, "link": s.link_name, "serial": s.dtls.peer_serial})
            self._drop(s, reason)
        return ended

    def sessions_in_use(self) -> list[DtlsSession]:
        return [s.dtls for s in self.by_addr.values()]

    def on_probe_ack(self, peer_id: int, link_id: int, probe_id: int, received: int) -> bool:
        s = self.by_peer.get(peer_id)
        return s is not None and s.pmtu is not None and s.pmtu.on_ack(link_id, probe_id, received)

    def on_key_event(self, peer_id: int, expired: bool) -> bool:
        # The socket (the DTLS client) rekeys; the PoP cannot start a handshake.
        s = self.by_peer.get(peer_id)
        if s is not None and expired:
            self.ratelog.warning(
                "key-expired", "site %d: transmit key expired, waiting for its rekey", s.site_id
            )
        return True

    def on_failed(self, session: DtlsSession | None, reason: str) -> None:
        """Nothing to do: a refused handshake is the session layer's to count and list."""

    def on_closed(self, session: DtlsSession, reason: str) -> None:
        s = self.by_dtls.get(session)
        if s is not None and self.by_addr.get(s.addr) is s:
            failed = session.failed
            self._drop(s, f"DTLS error: {failed}" if failed else "the site closed the session")

    def on_message(self, session: DtlsSession, data: bytes) -> bool | None:
        """One record of a site's session; False when it is dropped unread."""
        s = self.by_dtls.get(session)
        if s is None:
            return self._on_replaced_record(session, data)
        if self.by_addr.get(s.addr) is not s:
            return False
        s.last_auth_ns = time.monotonic_ns()
        try:
            self._on_record(s, data)
        except Exception:
            log.exception("site %d: message dropped", s.site_id)
            self.stats.messages_malformed += 1

    def _on_replaced_record(self, session: DtlsSession, data: bytes) -> bool:
        """A record of a session a rekey just replaced: its messages still count, but not its
        key hand-over, which is over. Whether it was taken (a fragment kept, a malformed
        message counted as such, a message handled)."""
        replaced = self._replaced.get(session)
        if replaced is None:
            return False
        s, reassembler, until = replaced
        if self.clock() >= until or self.by_addr.get(s.addr) is not s:
            del self._replaced[session]
            return False
        s.last_auth_ns = time.monotonic_ns()
        msg = reassembler.feed(data)
        if msg is None:
            if reassembler.dropped is not None:
                self.stats.messages_malformed += 1
            return True
        if msg.get("t") in ("key", "key-ack"):
            return False
        try:
            self._on_message(s, msg)
        except Exception:
            log.exception("site %d: message dropped", s.site_id)
            self.stats.messages_malformed += 1
        return True

    # ---------------------------------------------------------------- sessions

    def _peer_put(self, s: SiteSession) -> None:
        self.by_peer[s.peer_id] = s
        self.by_site.setdefault(s.site_id, {})[s.peer_id] = s

    def _peer_pop(self, s: SiteSession) -> None:
        if self.by_peer.get(s.peer_id) is s:
            del self.by_peer[s.peer_id]
        mine = self.by_site.get(s.site_id)
        if mine is not None and mine.get(s.peer_id) is s:
            del mine[s.peer_id]
            if not mine:
                del self.by_site[s.site_id]

    def _new_temp_id(self) -> int:
        while True:
            self._next_temp = (self._next_temp + 1) % 0x3FFFFFFF
            pid = TEMP_PEER_BASE + self._next_temp
            if pid not in self.by_peer:
                return pid

    def on_established(self, session: DtlsSession, link_id: int, addr: Addr) -> None:
        """A site's session (tunnel_for checked the site is in the account)."""
        assert self.fp is not None
        site_id = session.peer_site_id
        assert site_id is not None
        old = self.by_addr.get(addr)
        if old is not None and old.site_id == site_id and old.registered:
            # A rekey: the new keys go to the spare slot of the same peer; the old ones keep
            # receiving until the site switches.
            if self.by_dtls.get(old.dtls) is old:
                del self.by_dtls[old.dtls]
                self._replaced[old.dtls] = (old, self._reassembler(old),
                                            self.clock() + REPLACED_GRACE_S)
            old.dtls = session
            self.by_dtls[session] = old
            old.reassembler = None  # fragments never span two sessions
            old.handover.install(session)
            old.last_auth_ns = time.monotonic_ns()
            old.handover.announce()
            log.info("site %d link %s: rekeyed", site_id, old.link_name)
            return
        if old is not None:
            self._drop(old, "replaced by a new session from the same address")
        peer_id = self._new_temp_id()
        self.fp.peer_add(peer_id)
        self.fp.set_endpoint(peer_id, LINK_ID, addr)
        s = SiteSession(
            site_id=site_id,
            addr=addr,
            dtls=session,
            peer_id=peer_id,
            created=self.clock(),
            last_auth_ns=time.monotonic_ns(),
        )
        s.handover = KeyHandover(
            self.fp,
            peer_id,
            send=lambda msg: self._send_msg(s, msg),
            on_unacknowledged=lambda: self._drop(s, "the site never acknowledged the keys"),
            clock=self.clock,
            timers=self.cfg.keys,
        )
        s.handover.install(session)
        self.by_addr[addr] = s
        self._session_ips[addr[0]] += 1
        self._peer_put(s)
        self.by_dtls[session] = s
        self.stats.sessions_opened += 1
        log.info("site %d: DTLS session from %s established", site_id, _ep(addr))
        s.handover.announce()

    def _activate(self, s: SiteSession, recompute: bool = True) -> None:
        """Transmit with the current keys once the site's index is known and the session has
        its final fast-path peer (so no nonce is ever used under two peers with one key)."""
        if not s.registered:
            return
        first = s.activated is None
        if s.handover.activate() and first:
            assert self.fp is not None
            # Keepalives from the fast path's own pass (pop/keepalives.py), not the loop.
            try:
                self.fp.set_keepalive(s.peer_id, self.cfg.cloud.keepalive_ms / 1000)
            except FastPathError as e:
                log.warning("site %d: keepalives not set: %s", s.site_id, e)
            if recompute:
                self._recompute(site_id=s.site_id)

    def _on_record(self, s: SiteSession, raw: bytes) -> None:
        reassembler = self._reassembler(s)
        oversized = self.stats.fragments.oversized
        msg = reassembler.feed(raw)
        if msg is not None:
            self._on_message(s, msg)
        elif self.stats.fragments.oversized != oversized:
            self.stats.oversized += 1
            self.ratelog.warning(
                "msg-oversized",
                "site %d: oversized message dropped: %s",
                s.site_id,
                reassembler.dropped,
            )
        elif reassembler.dropped is not None:
            self.stats.messages_malformed += 1
            self.ratelog.warning(
                "msg-malformed",
                "site %d: malformed message dropped: %s",
                s.site_id,
                reassembler.dropped,
            )

    def _on_message(self, s: SiteSession, msg: dict[str, Any]) -> None:
        if not isinstance(msg.get("t"), str):
            self.stats.messages_malformed += 1
            self.ratelog.warning("msg-malformed", "site %d: malformed message dropped", s.site_id)
            return
        kind = msg["t"]
        if kind == "key":
            try:
                idx, timers, problem = parse_key(msg)
            except ValueError as e:
                # No index: nothing to activate or acknowledge.
                self.stats.messages_malformed += 1
                self.stats.keys_refused += 1
                self.ratelog.warning(
                    "key-refused", "site %d: key message refused: %s", s.site_id, e
                )
                return
            if problem is not None:
                # The key is used on the timers in force (refusing it would only make the
                # site handshake again and again); the timers are counted and logged.
                self.stats.keys_refused += 1
                self.ratelog.warning(
                    "key-refused", "site %d: key timers refused, keeping %s: %s",
                    s.site_id, s.handover.agreed.as_dict(), problem,
                )
            s.handover.on_key(idx, timers, refused=problem is not None)
            self._activate(s)
            s.handover.acknowledge(idx)
        elif kind == "key-ack":
            s.handover.on_key_ack(msg.get("idx"))
        elif kind == "register":
            self._on_register(s, msg)
        elif kind == "ping":
            self._send_msg(s, {"t": "pong", "id": msg.get("id")})
            # A site whose directory is not the one we last sent it (a push lost in transit,
            # a delta it could not apply) gets the whole directory again.
            if s.registered and "rev" in msg and msg["rev"] != s.dir_rev:
                now = self.clock()
                if not self._in_flight(s, msg["rev"], now):
                    self._send_directory(s, now)
        elif kind == "punch-request":
            if not s.registered or s.link_index is None:
                self.stats.messages_malformed += 1
                return
            why = self.broker.on_request(s.site_id, s.link_index, msg)
            if why is not None:
                self.ratelog.warning("punch-request", "site %d: punch request refused: %s",
                                     s.site_id, why)
        elif kind == "events":
            if s.registered:
                self._on_events(s, msg)
            else:
                self.stats.messages_malformed += 1
        elif kind == "steer":
            self._on_steer(s, msg)
        elif kind == "renew":
            self._on_renew(s, msg)
        else:
            self.stats.messages_unknown += 1

    def _on_renew(self, s: SiteSession, msg: dict[str, Any]) -> None:
        """A certificate signing request from a registered site (pop/renewal.py): answered
        with the certificate, or with why not."""
        if not s.registered:
            self.stats.messages_malformed += 1
            return
        try:
            cert = self.renewer.renew(s.site_id, s.dtls.peer_not_after, msg.get("csr"))
        except RenewalRefused as e:
            self.ratelog.warning("renew", "site %d: renewal refused: %s", s.site_id, e)
            self._event("site.renew_refused", f"site {s.site_id}: certificate renewal refused: "
                        f"{e}", s.site_id, reason=str(e))
            self._send_msg(s, {"t": "renew-refused", "reason": str(e)})
            return
        log.info("site %d: certificate renewed", s.site_id)
        self._event("site.cert_renewed", f"site {s.site_id}: certificate renewed for "
                    f"{self.renewer.cfg.days} days", s.site_id, days=self.renewer.cfg.days)
        self._send_msg(s, {"t": "renewed", "cert": cert.decode("ascii")})

    def _on_steer(self, s: SiteSession, msg: dict[str, Any]) -> None:
        """The site's links in use, by weight (docs/cloud.md, "steer"): traffic to the site
        goes over its session on the heaviest one, not over a link its health moved away
        from (a degraded link, or one whose session the PoP has not yet found dead)."""
        links = msg.get("links")
        if (
            not s.registered
            or not isinstance(links, dict)
            or len(links) > MAX_LINKS
            or not all(
                isinstance(k, str) and len(k) <= 15 and isinstance(v, int)
                and not isinstance(v, bool) and 0 <= v <= 1_000_000
                for k, v in links.items()
            )
        ):
            self.stats.messages_malformed += 1
            self.ratelog.warning("steer", "site %d: malformed steer dropped", s.site_id)
            return
        if self.steer.get(s.site_id) != links:
            self.steer[s.site_id] = dict(links)
            self._relay_routes(s.site_id)

    def _relay_routes(self, site_id: int) -> None:
        """The relay's way to one site again (its steering changed): only its group's
        members, nothing of the directory, which a site's steering never changes."""
        try:
            gid = self._sync_site_group(site_id)
        except FastPathError as e:
            log.warning("site %d: relay group not set: %s", site_id, e)
            return
        site = self.account.site(site_id) if self.account is not None else None
        if gid is not None and site is not None and any(
            self.routes.get(str(n)) != gid for n in site.subnets
        ):
            self._recompute(site_id=site_id)  # its first live session: its routes too

    def _on_register(self, s: SiteSession, msg: dict[str, Any]) -> None:
        assert self.fp is not None and self.account is not None
        try:
            site_id = msg.get("site_id")
            if site_id != s.site_id:
                raise RegisterError(
                    f"site_id {site_id!r} is not the site of the certificate ({s.site_id})"
                )
            if self.account.site(s.site_id) is None:
                raise RegisterError(f"site {s.site_id} is not in the account")
            version = msg.get("version", "")
            if not isinstance(version, str) or len(version) > 64:
                raise RegisterError("version: expected a string of at most 64 characters")
            link = _check_link(msg.get("link"), "link")
            raw_links = msg.get("links")
            if not isinstance(raw_links, list) or not 1 <= len(raw_links) <= MAX_LINKS:
                raise RegisterError(f"links: expected an array of 1..{MAX_LINKS} links")
            links = [_check_link(x, f"links[{i}]") for i, x in enumerate(raw_links)]
            names = [x["name"] for x in links]
            if len(set(names)) != len(names):
                raise RegisterError("links: duplicate link names")
            if link["name"] not in names:
                raise RegisterError(f"link {link['name']!r} is not among links")
            # L: the socket's own link number when it sends one, else its place in links.
            link_index = link["id"] or names.index(link["name"]) + 1
            ids = [x["id"] or i + 1 for i, x in enumerate(links)]
            if len(set(ids)) != len(ids) or link_index != ids[names.index(link["name"])]:
                raise RegisterError("links: link ids must be unique and agree with link")
            final = s.site_id << 8 | link_index
            if s.registered and s.peer_id != final:
                raise RegisterError("the link of a session cannot change; open a new session")
            self._register_allowed(s)
        except RegisterError as e:
            self.stats.registrations_refused += 1
            self.ratelog.warning(
                "register", "site %d from %s: registration refused: %s", s.site_id, _ep(s.addr), e
            )
            self._send_msg(s, {"t": "error", "reason": str(e)})
            for d in s.dtls.close():
                self.send(s.addr, d)
            self._drop(s, f"registration refused: {e}")
            return
        if s.peer_id != final:
            self._rehome(s, final)
        self.stats.registrations += 1
        first = not s.registered
        s.registered = True
        s.registered_at = self.clock()
        if first:
            s.first_registered_at = s.registered_at
        s.link, s.links, s.link_index, s.version = link, links, link_index, version
        altwan = _altwan_endpoints(links)
        # An endpoint another site of the account already lists is refused: it would aim
        # every site's Alt-WAN handshakes for this one at that one.
        taken = {ep: sid for sid, eps in self.altwan.items() if sid != s.site_id for ep in eps}
        for ep in [ep for ep in altwan if ep in taken]:
            log.warning("site %d: Alt-WAN endpoint %s refused: site %d lists it", s.site_id, ep,
                        taken[ep])
            altwan.remove(ep)
        if altwan:
            self.altwan[s.site_id] = altwan
        elif not any(link["altwan"] for link in links):
            self.altwan.pop(s.site_id, None)
        # else: its Alt-WAN link has no address right now (0.0.0.0): the last endpoint stays,
        # so the other sites keep their tunnels to it through a DHCP renewal or a flap.
        self._activate(s, recompute=False)
        if first:
            text = f"site {s.site_id} registered over {link['name']} from {_ep(s.addr)}"
            log.info("%s", text)
            self._event("popd.session.up", text, s.site_id, link=link["name"], public=_ep(s.addr))
        self._recompute(force_push_to=s, site_id=s.site_id)

    def _register_allowed(self, s: SiteSession) -> None:
        """The registration rate, per site and per source address (docs/popd.md,
        "Registration rate"): a flapping or replaying site cannot keep the PoP busy with
        welcomes and directory changes."""
        lim = self.cfg.register
        if not self._register_site.allow(s.site_id):
            self.stats.registrations_rate_limited += 1
            raise RegisterError(
                f"registration rate limit: site {s.site_id} registered more than"
                f" {lim.site_burst} times at once or {lim.site_per_minute} a minute;"
                " try again later"
            )
        if not self._register_source.allow(source_block(s.addr[0])):
            self.stats.registrations_rate_limited += 1
            raise RegisterError(
                f"registration rate limit: more than {lim.source_burst} registrations at once"
                f" or {lim.source_per_minute} a minute from {s.addr[0]}; try again later"
            )

    def _rehome(self, s: SiteSession, final: int) -> None:
        """Move an unregistered session from its temporary peer to S << 8 | L, keeping its key
        index so the site notices nothing. Transmit was never activated under the temporary
        peer, so the fresh transmit counter reuses no nonce."""
        assert self.fp is not None
        other = self.by_peer.get(final)
        if other is not None and other is not s:
            self._drop(other, "replaced by a new session over the same link")
        self._peer_pop(s)
        self.fp.peer_del(s.peer_id)
        self.fp.peer_add(final)
        self.fp.set_endpoint(final, LINK_ID, s.addr)
        s.peer_id = final
        self._peer_put(s)
        s.handover.move(final)  # announced again if its index was taken there

    def _drop(self, s: SiteSession, reason: str) -> None:
        if self.by_addr.get(s.addr) is s:
            del self.by_addr[s.addr]
            self._session_ips[s.addr[0]] -= 1
            if not self._session_ips[s.addr[0]]:
                del self._session_ips[s.addr[0]]
        if self.by_dtls.get(s.dtls) is s:
            del self.by_dtls[s.dtls]
        # Its records from now on are for no session (counted), not for a stale one.
        self.sessions.forget_session(s.dtls)
        if self.by_peer.get(s.peer_id) is s:
            self._peer_pop(s)
            # peer_del below takes it out of its site's group: set that group again.
            self._groups.pop(s.site_id, None)
            self.routes = {n: p for n, p in self.routes.items() if p != s.peer_id}
            if self.fp is not None:
                with contextlib.suppress(FastPathError):
                    self.fp.peer_del(s.peer_id)
        self.stats.sessions_closed += 1
        if s.registered:
            text = f"site {s.site_id} link {s.link_name} down: {reason}"
            log.info("%s", text)
            self._event("popd.session.down", text, s.site_id, link=s.link_name, reason=reason)
            self._recompute(site_id=s.site_id)
        else:
            log.info("site %d session from %s closed: %s", s.site_id, _ep(s.addr), reason)

    # ---------------------------------------------------------------- routes and directory

    def _live_sessions(self, site_id: int) -> list[SiteSession]:
        """The site's registered sessions by precedence and link order (the directory's
        order, which no `steer` changes)."""
        return sorted(
            (s for s in self.by_site.get(site_id, {}).values() if s.registered),
            key=lambda s: (s.precedence, s.link_index or 0),
        )

    def _site_members(self, site_id: int) -> list[tuple[int, int]]:
        """The members of the site's peer group, the relay's way to it: its live sessions,
        weighted as its `steer` says (per flow over the links it uses, active/active), else
        the best by precedence with the others as standbys. Every member may send from the
        site's prefixes (the relay's source check), a standby carries only while no weighted
        member can."""
        live = [s for s in self._live_sessions(site_id) if s.activated]
        weights = self.steer.get(site_id, {})
        if any(weights.get(s.link_name, 0) > 0 for s in live):
            ranked = sorted(live, key=lambda s: -weights.get(s.link_name, 0))
            out = [(s.peer_id, weights.get(s.link_name, 0)) for s in ranked]
        else:
            out = [(s.peer_id, 1 if i == 0 else 0) for i, s in enumerate(live)]
        return out[:GROUP_MEMBERS]

    def _sync_site_group(self, site_id: int) -> int | None:
        """Set the site's group to its members; its id, or None while it has none."""
        assert self.fp is not None
        members = self._site_members(site_id)
        if not members:
            return None
        gid = PEER_GROUP_FLAG | site_id
        if self._groups.get(site_id) != members:
            self.fp.set_group(gid, members)
            self._groups[site_id] = members
        return gid

    def _recompute(
        self, force_push_to: SiteSession | None = None, site_id: int | None = None
    ) -> None:
        """Relay routes and directory entries after a session or account change: of one site
        (`site_id`, a session of it came, went or changed), else of every site (start,
        reload). The directory's change is pushed by the next `_push_directory`, with every
        other change until then; a registering site gets its welcome at once."""
        assert self.fp is not None and self.account is not None
        if site_id is None:
            self._all_routes()
            current = self.account.site_ids
            for sid in [k for k in self._entries if k not in current]:
                del self._entries[sid]
                self._entry_json.pop(sid, None)
                self._dir_dirty.add(sid)
            for site in self.account.sites:
                self._update_entry(site.id)
        else:
            self._site_routes(site_id)
            self._update_entry(site_id)
        self._broker_dirty = True
        if force_push_to is not None and force_push_to.registered:
            self._welcome(force_push_to)

    def _all_routes(self) -> None:
        assert self.fp is not None and self.account is not None
        want: dict[str, int] = {}
        for site in self.account.sites:
            try:
                gid = self._sync_site_group(site.id)
            except FastPathError as e:
                log.warning("site %d: relay group not set: %s", site.id, e)
                continue
            if gid is not None:
                for net in site.subnets:
                    want[str(net)] = gid
        for net in [n for n in self.routes if n not in want]:
            with contextlib.suppress(FastPathError):
                self.fp.route_del(net)
            del self.routes[net]
        for net, peer in want.items():
            if self.routes.get(net) != peer:
                self.fp.route_set(net, peer)
                self.routes[net] = peer

    def _site_routes(self, site_id: int) -> None:
        """The relay routes of one site: its subnets to its group while it has members."""
        assert self.fp is not None and self.account is not None
        site = self.account.site(site_id)
        if site is None:
            return
        try:
            gid = self._sync_site_group(site_id)
        except FastPathError as e:
            log.warning("site %d: relay group not set: %s", site_id, e)
            return
        for net in (str(n) for n in site.subnets):
            if gid is None:
                if net in self.routes:
                    with contextlib.suppress(FastPathError):
                        self.fp.route_del(net)
                    del self.routes[net]
            elif self.routes.get(net) != gid:
                self.fp.route_set(net, gid)
                self.routes[net] = gid

    def _update_entry(self, site_id: int) -> None:
        assert self.account is not None
        site = self.account.site(site_id)
        if site is None:
            if self._entries.pop(site_id, None) is not None:
                self._entry_json.pop(site_id, None)
                self._dir_dirty.add(site_id)
            return
        entry = self._entry(site)
        if self._entries.get(site_id) != entry:
            self._entries[site_id] = entry
            self._entry_json[site_id] = dumps(entry)
            self._dir_dirty.add(site_id)

    def _push_directory(self, now: float) -> None:
        """The directory's changes since the last push, as one `directory-delta` per session
        that sees a difference (docs/cloud.md): at most every DIRECTORY_PUSH_S, and
        O(changes x sessions), never the whole directory per change. A push's sessions are
        sent to in slices of PUSH_SLICE_S per call (the ticker's turn); the changes made
        meanwhile wait for the next push."""
        if self._broker_dirty:
            # After the welcomes: a site learns its peers' subnets before it is told to punch.
            self._broker_dirty = False
            self.broker.update(self._mesh_links(), self._offcloud_sites())
        if self._round is None:
            if not self._dir_dirty or now < self._push_at:
                return
            self._push_at = now + DIRECTORY_PUSH_S
            dirty, self._dir_dirty = self._dir_dirty, set()
            changed = {sid: self._entries[sid] for sid in sorted(dirty)
                       if sid in self._entries and self._pushed.get(sid) != self._entries[sid]}
            removed = [sid for sid in sorted(dirty)
                       if sid not in self._entries and sid in self._pushed]
            if not changed and not removed:
                return  # what changed changed back (a flap within the interval)
            for sid, e in changed.items():
                self._pushed[sid] = e
            for sid in removed:
                del self._pushed[sid]
            self.rev += 1
            self.stats.directory_pushes += 1
            self._round = _PushRound(
                rev=self.rev, changed=changed, removed=removed,
                body=dumps({"rev": self.rev, "changed": list(changed.values()),
                            "removed": removed})[1:],
                pending=collections.deque(self.by_peer),
            )
        r = self._round
        started = time.perf_counter()
        deadline = started + PUSH_SLICE_S
        while r.pending:  # at least one session per call, whatever the slice
            s = self.by_peer.get(r.pending.popleft())
            # Gone, not registered yet (its welcome will be current), or sent this rev or a
            # later one already (a welcome, a whole directory since the push began).
            if s is not None and s.registered and (s.dir_rev is None or s.dir_rev < r.rev):
                self._push_to(s, r, now)
            if time.perf_counter() >= deadline:
                break
        r.took += time.perf_counter() - started
        if not r.pending:
            self._round = None
            # A push that took long waits longer for the next: pushes take a bounded share
            # of the loop however many sessions there are.
            self._push_at = max(self._push_at, now + PUSH_SHARE_FACTOR * r.took)

    def _push_to(self, s: SiteSession, r: _PushRound, now: float) -> None:
        """One session's delta of the push under way."""
        if s.site_id in r.changed or s.site_id in r.removed:
            mine = [e for sid, e in r.changed.items() if sid != s.site_id]
            gone = [sid for sid in r.removed if sid != s.site_id]
            if not mine and not gone:
                return  # nothing it sees changed: its view at s.dir_rev is current
            msg = {"t": "directory-delta", "base": s.dir_rev, "rev": r.rev,
                   "changed": mine, "removed": gone}
            sent = self._send_msg(s, msg)
        else:
            # The delta as most sessions get it (their own site did not change), serialised
            # once per base rev and record size: a session's cost is then its encryption.
            try:
                limit = record_limit(s.dtls, DTLS_MTU)
                key = (s.dir_rev, limit)
                if key not in r.shared:
                    head = dumps({"t": "directory-delta", "base": s.dir_rev})[:-1]
                    r.shared[key] = encode_text(f"{head},{r.body}", limit)
            except ValueError as e:
                log.error("site %d: directory-delta not sent: %s", s.site_id, e)
                return
            sent = self._send_records(s, "directory-delta", r.shared[key])
        s.dir_sent.append((r.rev, now))
        if sent:
            self.stats.directory_deltas_sent += 1
        s.dir_rev = r.rev

    def _mesh_links(self) -> list[MeshLink]:
        out = []
        for s in self.by_peer.values():
            if not s.registered or s.link_index is None or not s.activated:
                continue
            out.append(
                MeshLink(
                    site_id=s.site_id,
                    link_id=s.link_index,
                    precedence=s.precedence,
                    public=s.addr,
                    epoch=s.first_registered_at or 0.0,
                    offcloud=bool(s.link.get("offcloud", s.precedence < 3)),
                    local=_endpoint_or_none(s.link.get("local")),
                    static=_endpoint_or_none(s.link.get("static")),
                    nat=s.link.get("nat"),
                )
            )
        return out

    def _offcloud_sites(self) -> set[int]:
        assert self.account is not None
        return {site.id for site in self.account.sites if site.offcloud}

    def _send_to_link(self, site_id: int, link_id: int, msg: dict[str, Any]) -> bool:
        s = self.by_peer.get(site_id << 8 | link_id)
        return s is not None and s.registered and self._send_msg(s, msg)

    def _entry(self, site: Any) -> dict[str, Any]:
        links = [
            {"name": s.link_name, "precedence": s.precedence, "public": _ep(s.addr)}
            for s in self._live_sessions(site.id)
        ]
        entry = {
            "site_id": site.id,
            **site.settings(),
            "links": links,
            "online": bool(links),
        }
        if self.altwan.get(site.id):
            entry["altwan"] = list(self.altwan[site.id])
        return entry

    def _directory_text(self, site_id: int) -> str:
        """_directory_for as JSON, joined from the entries serialised when they changed."""
        assert self.account is not None
        js = self._entry_json
        return "[" + ",".join(
            js[site.id] for site in self.account.sites if site.id != site_id and site.id in js
        ) + "]"

    def _directory_for(self, site_id: int) -> list[dict[str, Any]]:
        """The whole directory as it is now (changes not pushed yet included), in the
        account's order, without the site's own entry."""
        assert self.account is not None
        return [self._entries[site.id] for site in self.account.sites
                if site.id != site_id and site.id in self._entries]

    @staticmethod
    def _in_flight(s: SiteSession, rev: Any, now: float) -> bool:
        """Whether a ping's rev is one this session was sent, followed by a push less than
        DELTA_IN_FLIGHT_S ago: the ping crossed that push, which the site has by now."""
        sent = list(s.dir_sent)
        for (r, _), (_, at_next) in zip(sent, sent[1:], strict=False):
            if r == rev:
                return now - at_next < DELTA_IN_FLIGHT_S
        return False

    def _send_directory(self, s: SiteSession, now: float) -> None:
        # At most every FULL_DIRECTORY_MIN_S per session: a site (or one posing as stale in
        # every ping) must not make the PoP send its whole directory every second. A ping
        # that crossed a push in flight does not come here (_in_flight).
        if s.full_directory_at is not None and now - s.full_directory_at < FULL_DIRECTORY_MIN_S:
            return
        if not self._full_budget.allow("pop"):
            self.stats.directory_full_deferred += 1
            return
        s.full_directory_at = now
        head = dumps({"t": "directory", "rev": self.rev})[:-1]
        text = f'{head},"directory":{self._directory_text(s.site_id)}}}'
        if self._send_text(s, "directory", text):
            s.dir_rev = self.rev
            s.dir_sent.append((self.rev, now))
            self.stats.directory_full_sent += 1

    def _welcome(self, s: SiteSession) -> None:
        assert self.account is not None
        site = self.account.site(s.site_id)
        if site is None:
            return
        head = dumps({"t": "welcome", "rev": self.rev, "pop_id": self.cfg.id,
                      "config": self.account.site_config(site)})[:-1]
        self._send_text(s, "welcome", f'{head},"directory":{self._directory_text(s.site_id)}}}')
        s.dir_rev = self.rev
        s.dir_sent.append((self.rev, self.clock()))
        self.stats.directory_full_sent += 1

    # ---------------------------------------------------------------- events

    def _mark(self, site_id: int) -> tuple[str | None, int]:
        """The site's upload mark (instance, highest seq) as queued to the store; read from
        the store the first time (document site.<id>.events)."""
        mark = self._marks.get(site_id)
        if mark is None:
            assert self.store is not None
            try:
                doc = self.store.get_doc(f"site.{site_id}.events")
            except StoreError as e:
                log.error("site %d: upload mark not read: %s", site_id, e)
                doc = None
            instance = doc.value.get("instance") if doc is not None else None
            up_to = int(doc.value.get("up_to", 0)) if doc is not None else 0
            mark = (instance if isinstance(instance, str) else None, up_to)
            self._marks[site_id] = self._marks_stored[site_id] = mark
        return mark

    def _on_events(self, s: SiteSession, msg: dict[str, Any]) -> None:
        """An upload (docs/popd.md, "Events"): checked and deduplicated here, stored by the
        event writer in one transaction with the site's new mark, acknowledged once stored.
        Past the site's quota, its events are dropped (acknowledged, counted against it)."""
        assert self.sink is not None
        events = msg.get("events")
        if not isinstance(events, list) or len(events) > MAX_UPLOADED_EVENTS:
            self.stats.messages_malformed += 1
            return
        if self.sink.backlog_full:
            # The writer is behind: not taken, not acknowledged; the site sends it again.
            self.stats.events_deferred += len(events)
            return
        mine = self.site_events.setdefault(s.site_id, {"stored": 0, "over_quota": 0})
        instance = msg.get("instance")
        known, mark = self._mark(s.site_id)
        if isinstance(instance, str) and known is not None and known != instance:
            mark = 0  # the site's store was reset: its sequence numbers start again
        new_instance = instance if isinstance(instance, str) else known
        up_to = 0
        batch: list[UploadedEvent] = []
        for ev in sorted(
            (e for e in events if isinstance(e, dict)),
            key=lambda e: e.get("seq") if isinstance(e.get("seq"), int) else 0,
        ):
            seq = ev.get("seq")
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                self.stats.events_malformed += 1
                continue
            up_to = max(up_to, seq)
            if seq <= mark:
                self.stats.events_duplicate += 1
                continue
            mark = seq
            kind, text, at, data = ev.get("kind"), ev.get("text"), ev.get("at"), ev.get("data")
            # popd.* kinds are the PoP's own: a site must not be able to forge them.
            if (not isinstance(kind, str) or not isinstance(text, str)
                    or kind.startswith("popd.")):
                self.stats.events_malformed += 1
                continue
            if not isinstance(at, int | float) or isinstance(at, bool):
                at = None
            batch.append(UploadedEvent(
                kind, text, s.site_id,
                {"site_seq": seq, "at": at, "data": data if isinstance(data, dict) else None},
            ))
        granted = self._event_quota.take(s.site_id, len(batch)) if batch else 0
        if granted < len(batch):
            over = len(batch) - granted
            self.stats.events_over_quota += over
            mine["over_quota"] += over
            self.ratelog.warning("events-quota", "site %d: %d event(s) over its quota dropped",
                                 s.site_id, over)
            batch = batch[:granted]
        if not up_to:
            return
        new_mark = (new_instance, max(mark, up_to))
        self._marks[s.site_id] = new_mark
        doc: dict[str, Any] = {"up_to": new_mark[1]}
        if new_instance is not None:
            doc["instance"] = new_instance

        epoch = self._upload_epoch.get(s.site_id, 0)

        def stored(result: UploadResult | None, error: str | None) -> None:
            if result is None:
                self.stats.events_store_errors += 1
                self._marks[s.site_id] = self._marks_stored.get(s.site_id, (None, 0))
                # The batches queued behind this one fail too (EventSink.upload); those
                # queued from now on count from the stored mark.
                self._upload_epoch[s.site_id] = max(self._upload_epoch.get(s.site_id, 0),
                                                    epoch + 1)
                return  # not acknowledged: the site sends the batch again
            self._marks_stored[s.site_id] = new_mark
            self.stats.events_stored += result.stored
            self.stats.events_malformed += result.malformed
            mine["stored"] += result.stored
            if self.by_addr.get(s.addr) is s:
                self._send_msg(s, {"t": "events-ack", "up_to": up_to})

        self.sink.upload(s.site_id, batch, (f"site.{s.site_id}.events", doc), stored, epoch)

    # ---------------------------------------------------------------- periodic work

    def _check_certs(self) -> None:
        """Warn of popd's own certificate or the CA nearing its expiry (common/certlife.py)."""
        if self.certs is None:
            return
        for w in self.certs.check():
            log.warning("%s", w.text)
            self._event(w.kind, w.text, None, **w.data)

    def _tick(self) -> None:
        assert self.fp is not None
        try:
            self._check_certs()
        except Exception:
            log.exception("certificate check failed")
        now = self.clock()
        self.sessions.tick()
        if self.known is not None:
            self.known.refresh()  # cheap when nothing changed
        self.broker.tick()
        for dtls, (_, _, until) in list(self._replaced.items()):
            if now >= until:
                del self._replaced[dtls]
        now_ns = time.monotonic_ns()
        dead_ns = self.cfg.cloud.dead_after_ms * 1_000_000
        for s in list(self.by_addr.values()):
            if self.by_addr.get(s.addr) is not s:
                continue
            s.handover.tick()
            if self.by_addr.get(s.addr) is not s:
                continue
            if not s.registered and now - s.created > REGISTER_DEADLINE_S:
                self._drop(s, "no registration")
                continue
            try:
                # Its times alone (every session, every tick: peer_counters would build the
                # whole Counters, ~6 ms a tick at 1000 sessions against ~1.5 ms).
                last_rx_ns, _ = self.fp.peer_times(s.peer_id)
            except FastPathError:
                continue
            last = max(last_rx_ns, s.last_auth_ns)
            # Judged once registered: before that, the site's next packet is a round trip
            # away, longer than dead_after on a slow link (REGISTER_DEADLINE_S covers it).
            if s.registered and now_ns - last > dead_ns:
                self._drop(s, f"no packets for {(now_ns - last) / 1e6:.0f} ms")
                continue
            if s.activated:
                # The relay answers packets too big for this site's path with ICMP.
                if s.pmtu is None or s.pmtu.peer_id != s.peer_id:
                    s.pmtu = PathMtu(self.fp, s.peer_id, lambda _l: PMTU_MAX, self.clock,
                                     name=f"site {s.site_id} session {s.peer_id:#x}")
                s.pmtu.tick()

    async def _ticker(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                log.exception("tick failed")
            try:
                self._push_directory(self.clock())
            except Exception:
                log.exception("directory push failed")
            await asyncio.sleep(TICK_S)

    # ---------------------------------------------------------------- account reload

    def reload(self) -> dict[str, Any]:
        """Load the account file again; a bad one is refused and the current one stays."""
        assert self.store is not None
        try:
            new = load_account(self.cfg.account)
        except ConfigError as e:
            self.account_error = str(e)
            for line in str(e).splitlines():
                log.error("%s", line)
            log.warning("account file refused; the previous account stays in force")
            self._event("popd.account.refused", f"account file refused, previous kept: {e}")
            return {"ok": False, "error": str(e)}
        old = self.account
        self.account = new
        self.account_error = None
        self.account_loaded_at = time.time()
        self.store.put_doc("account", new.to_doc())
        changed: list[int] = []
        for s in list(self.by_peer.values()) + list(self.by_addr.values()):
            site = new.site(s.site_id)
            if site is None and (self.by_addr.get(s.addr) is s or self.by_peer.get(s.peer_id) is s):
                if s.registered:
                    self._send_msg(s, {"t": "error", "reason": "site removed from the account"})
                for d in s.dtls.close():
                    self.send(s.addr, d)
                self._drop(s, "site removed from the account")
        ended = self._end_revoked()
        for site in new.sites:
            before = old.site(site.id) if old is not None else None
            # A site's config is its settings, the account's network rules and its firewall
            # (docs/cloud.md), site names resolved: another site's subnets changing changes it.
            config = new.site_config(site)
            if before is None or old is None or old.site_config(before) != config:
                changed.append(site.id)
                for s in self._live_sessions(site.id):
                    self._send_msg(s, {"t": "config", "rev": self.rev + 1, "config": config})
        removed = sorted((old.site_ids if old else frozenset()) - new.site_ids)
        for site_id in [k for k in self.altwan if k not in new.site_ids]:
            del self.altwan[site_id]
        text = (
            f"account {new.name} reloaded: {len(new.sites)} site(s), {len(new.rules)} rule(s),"
            f" {_firewall_text(new)};"
            f" changed {changed or 'none'}, removed {removed or 'none'}"
        )
        log.info("%s", text)
        self._log_notes(new)
        self._event("popd.account.loaded", text, changed=changed, removed=removed)
        self._recompute()
        return {
            "ok": True,
            "changed": changed,
            "removed": removed,
            "revoked_sessions": ended,
            "rev": self.rev,
            "notes": new.notes(),
        }

    @staticmethod
    def _log_notes(account: Account) -> None:
        """The account check's word on rules that load but are not what they seem: the
        complex ones (docs/popd.md, "Network rules")."""
        for note in account.notes():
            log.warning("%s", note)

    # ---------------------------------------------------------------- control socket

    async def _status(self, _req: dict[str, Any]) -> dict[str, Any]:
        assert self.fp is not None and self.account is not None
        c = self.fp.link_counters(LINK_ID)
        st = self.stats
        ls = self.sessions.stats
        online = {s.site_id for s in self.by_peer.values() if s.registered}
        return {
            "pop_id": self.cfg.id,
            "name": self.cfg.name,
            "version": __version__,
            "uptime_s": round(self.clock() - self.started, 1),
            "listen": _ep((self.cfg.listen, self.cfg.port)),
            "stun": _ep((self.cfg.listen, self.cfg.stun_port)),
            "account": {
                "name": self.account.name,
                "file": str(self.cfg.account),
                "sites": len(self.account.sites),
                "rules": [
                    {**r.to_dict(), "complex": r.complex, "note": r.note}
                    for r in self.account.rules
                ],
                "firewall": {
                    "default": self.account.firewall.default,
                    "rules": len(self.account.firewall.rules),
                },
                # Every PoP of the account must hold the same list (docs/security.md):
                # compare these across PoPs.
                "revoked": len(self.account.revoked),
                "revoked_hash": self.account.revoked.digest(),
                "loaded_at": self.account_loaded_at,
                "error": self.account_error,
            },
            "rev": self.rev,
            # What popd announces in every key hand-over; each session's agreed values are
            # in `sites`.
            "key_timers": self.cfg.keys.as_dict(),
            "renewal": self.renewer.status(),
            "certificates": self.certs.status() if self.certs is not None else None,
            "sites_online": len(online),
            "sessions": sum(1 for s in self.by_peer.values() if s.registered),
            "handshaking": self.sessions.handshaking,
            "link": {
                "rx_packets": c.rx_packets,
                "tx_packets": c.tx_packets,
                "rx_bytes": c.rx_bytes,
                "tx_bytes": c.tx_bytes,
                "drops": c.drops,
            },
            "drops": self.fp.global_counters().drops,
            # The control queue's lanes: known sources apart, unknown ones rate-limited.
            "control_lanes": self.fp.ctrl_stats().to_json(),
            "control": {
                # Kicks are for sites; a malformed ClientHello is garbage too.
                "garbage": ls.unknown + ls.kicks_bad + ls.malformed_hellos,
                "oversized": ls.oversized + st.oversized,
                "dtls_no_session": ls.dtls_no_session,
                "dtls_rejected": ls.rejected,
                "handshakes_refused_admission": ls.refused_admission,
                "unknown_site": ls.unknown_peer,
                "revoked_refused": ls.revoked,
                "sessions_revoked": st.sessions_revoked,
                "messages_malformed": st.messages_malformed,
                "messages_unknown": st.messages_unknown,
                "keys_refused": st.keys_refused,
                "registrations": st.registrations,
                "registrations_refused": st.registrations_refused,
                "sessions_opened": st.sessions_opened,
                "sessions_closed": st.sessions_closed,
                "events_stored": st.events_stored,
                "events_duplicate": st.events_duplicate,
                "events_malformed": st.events_malformed,
                "events_over_quota": st.events_over_quota,
                "events_deferred": st.events_deferred,
                "events_store_errors": st.events_store_errors,
                "registrations_rate_limited": st.registrations_rate_limited,
                "directory_pushes": st.directory_pushes,
                "directory_deltas_sent": st.directory_deltas_sent,
                "directory_full_sent": st.directory_full_sent,
                "directory_full_deferred": st.directory_full_deferred,
                "directory_bytes": st.directory_bytes,
                # Malformed and oversized records are in the two counters above already.
                "messages_received": st.fragments.messages,
                "messages_reassembled": st.fragments.reassembled,
                "fragments_received": st.fragments.fragments,
                "fragments_duplicate": st.fragments.duplicates,
                "fragments_evicted": st.fragments.evicted,
                "fragments_expired": st.fragments.expired,
                "dtls": dict(self.dtls.stats) if self.dtls else {},
            },
            # How late the loop ran (pop/looplag.py): its largest stall is what a site's
            # answers waited at worst.
            "loop": self.loop_lag.status(),
            "events": self.sink.stats.as_dict() if self.sink is not None else None,
            "keepalive_passes": self.keepalives.passes if self.keepalives is not None else 0,
            "stun_server": _stun_stats(self.stun),
            "stun_main_port": _stun_stats(self.stun_main),
            "mesh": self.broker.status(),
            "rejections": list(ls.rejections),
        }

    async def _sites(self, _req: dict[str, Any]) -> dict[str, Any]:
        assert self.fp is not None and self.account is not None
        now_ns = time.monotonic_ns()
        out = []
        for site in self.account.sites:
            sessions = []
            for s in self._live_sessions(site.id):
                try:
                    c = self.fp.peer_counters(s.peer_id)
                except FastPathError:
                    continue
                sessions.append(
                    {
                        "link": s.link_name,
                        "link_index": s.link_index,
                        "precedence": s.precedence,
                        "peer_id": s.peer_id,
                        "public": _ep(s.addr),
                        "local": s.link.get("local"),
                        "version": s.version,
                        # What `socket-pki revoke --serial` takes to revoke this certificate.
                        "serial": s.dtls.peer_serial,
                        "up": s.activated is not None,
                        # Traffic to the site goes over it (a weighted member of its group).
                        "routed": any(p == s.peer_id and w > 0
                                      for p, w in self._groups.get(s.site_id, [])),
                        "last_rx_s": round((now_ns - max(c.last_rx_ns, s.last_auth_ns)) / 1e9, 2),
                        "rx_packets": c.rx_packets,
                        "tx_packets": c.tx_packets,
                        "rx_bytes": c.rx_bytes,
                        "tx_bytes": c.tx_bytes,
                        "drops": c.drops,
                        "mtu": s.pmtu.mtu if s.pmtu is not None else None,
                        # Agreed in the key hand-over (docs/tunnel.md, "Agreed timers").
                        "timers": {
                            **s.handover.agreed.as_dict(),
                            # What the site announced ("announced": false: none,
                            # old firmware, the old fixed values assumed), or None.
                            "site": s.handover.peer_status(),
                        },
                    }
                )
            out.append(
                {
                    "site_id": site.id,
                    **site.settings(),
                    "online": bool(sessions),
                    "altwan": list(self.altwan.get(site.id, [])),
                    "revoked": self.account.revoked.of_site(site.id),
                    "events": dict(self.site_events.get(site.id, {"stored": 0, "over_quota": 0})),
                    "sessions": sessions,
                }
            )
        return {"sites": out, "rev": self.rev}

    async def _events(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        site = req.get("site")
        limit = req.get("limit", 100)
        if site is not None and (isinstance(site, bool) or not isinstance(site, int)):
            raise ValueError("site must be an integer")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
            raise ValueError("limit must be an integer 1..10000")
        await self._events_written()
        events = self.store.events(limit=limit, site_id=site)
        return {"events": [_event_dict(e) for e in events]}

    async def _events_written(self) -> None:
        """Wait until the writer has written everything queued so far (a read after it shows
        every event popd stored until now)."""
        if self.sink is None:
            return
        done = asyncio.get_running_loop().create_future()
        self.sink.barrier(lambda: done.done() or done.set_result(None))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, 10)

    async def _reload(self, _req: dict[str, Any]) -> dict[str, Any]:
        # A refused file is an answer, not a failure of the command: {"loaded": false, "error"}.
        result = self.reload()
        result["loaded"] = result.pop("ok")
        return result

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.open()
        assert self.fp is not None and self.sink is not None
        self.sink.bind_loop(loop)
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self.stun, local_addr=(self.cfg.listen, self.cfg.stun_port)
            )
        except OSError as e:
            raise StartupError(
                f"cannot listen for STUN on {self.cfg.listen} port {self.cfg.stun_port}: {e}"
            ) from e
        self._stun_transport = transport  # type: ignore[assignment]
        loop.add_reader(self.fp.ctrl_fd, self._on_ctrl_readable)
        self.control = ControlServer(
            self.cfg.paths.control_socket,
            {
                "status": self._status,
                "sites": self._sites,
                "events": self._events,
                "reload": self._reload,
            },
        )
        await self.control.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        assert self.account is not None
        self._recompute()
        log.info(
            "popd %s up: PoP %d on %s, STUN on port %d, account %s with %d site(s)",
            __version__,
            self.cfg.id,
            _ep((self.cfg.listen, self.cfg.port)),
            self.cfg.stun_port,
            self.account.name,
            len(self.account.sites),
        )
        ticker = asyncio.create_task(self._ticker())
        lag = asyncio.create_task(self.loop_lag.run(self._stop))
        try:
            await self._stop.wait()
        finally:
            ticker.cancel()
            lag.cancel()
            log.info("popd stopping")
            for s in list(self.by_addr.values()):
                for d in s.dtls.close():
                    self.send(s.addr, d)
            await self.control.close()
            loop.remove_reader(self.fp.ctrl_fd)
            transport.close()
            self.close()


def _firewall_text(account: Account) -> str:
    fw = account.firewall
    return f"firewall of {len(fw.rules)} rule(s), default {fw.default}"


def _stun_stats(server: StunServer) -> dict[str, Any]:
    st = server.stats
    return {
        "received": st.received,
        "requests": st.requests,
        "answers": st.answers,
        "errors_sent": st.errors_sent,
        "dropped": dict(st.dropped),
    }


def _event_dict(e: Any) -> dict[str, Any]:
    d = e.to_dict()
    d["source"] = "pop" if e.kind.startswith("popd.") else "site"
    return d


def main(argv: list[str] | None = None) -> int:
    return run_service("popd", "SD-WAN reference PoP", load_pop_config, Pop, argv)


if __name__ == "__main__":
    sys.exit(main())
