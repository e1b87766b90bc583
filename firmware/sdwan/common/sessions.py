"""The session layer shared by socketd and popd: everything between the fast path's control
queue and the tunnels that DTLS sessions belong to.

Owns: the demultiplexing of control datagrams by their first byte (DTLS records 20..63,
kicks, STUN, kinds with a registered handler such as the mesh's probes, anything else dropped
and counted), the stateless cookie check of every new
ClientHello, the admission of server handshakes (a bounded table, a few slots per source,
known sources first), the table of sessions keyed by (link, address) with their deadlines,
retransmissions and the cleanup of established sessions nobody uses any more, and the short
list of refused handshakes with their reasons.

Every session it registers knows its link (`DtlsSession.link_id`).

It does not know what a session is for. That belongs to *owners* (socketd's static tunnels,
its cloud; popd's site sessions; the mesh later), registered with `add_owner` and asked in
the order they registered: which peers may open a handshake to us, which addresses are known
(admission priority), whose tunnel a session is, and which sessions they still use. The
tunnel an owner names gets the session once established, its records, and its failure; the
fast path's REKEY / KEY_EXPIRED events and kicks go to the owner that takes them.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sdwan.bindings.fastpath import CTRL_MAX, CtrlEvent, probe_ack
from sdwan.common.dtls import (
    CONTENT_ALERT,
    CONTENT_APPLICATION_DATA,
    DEFAULT_MTU,
    DtlsContext,
    DtlsSession,
    client_hello_random,
    format_identity,
    is_client_hello,
    record_epoch,
    split_records,
)
from sdwan.common.identity import Identity
from sdwan.common.ratelog import RateLog
from sdwan.common.revocation import REVOKED_SUFFIX
from sdwan.common.stun import is_stun

log = logging.getLogger("sdwan.common.sessions")

Addr = tuple[str, int]
Key = tuple[int, Addr]

TIMED_OUT = "handshake timed out"
SUPERSEDED = "superseded by another handshake with the same address"
REJECTIONS_KEPT = 20
STALE_CHECK_S = 5.0
# How long a session replaced by a rekey still takes its records: the peer switches to the
# new session only once its own end of the handshake is done, half a round trip (or a lost
# flight's retransmission) after ours.
REPLACED_GRACE_S = 10.0

KICK_TYPE = 0xD2
_KICK = struct.Struct("!B3xII")  # type, reserved, from site, to site


def encode_kick(from_site: int, to_site: int) -> bytes:
    return _KICK.pack(KICK_TYPE, from_site, to_site)


def decode_kick(data: bytes) -> tuple[int, int] | None:
    """(from_site, to_site) of a well-formed kick, else None."""
    if len(data) != _KICK.size or data[0] != KICK_TYPE or any(data[1:4]):
        return None
    _, src, dst = _KICK.unpack(data)
    return src, dst


def ip_source(ip: str) -> str:
    """One source per IP address."""
    return ip


def source_block(ip: str) -> str:
    """One source per IPv4 address or IPv6 /64 (a single host gets a whole /64 to pick
    addresses from)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return ip


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Tunnel(Protocol):
    """What an owner hands a session to (tunnel.PeerTunnel is one)."""

    def on_established(self, session: DtlsSession, link_id: int, addr: Addr) -> None: ...

    def on_message(self, session: DtlsSession, data: bytes) -> bool | None:
        """One application-data record of an established session. False: the tunnel dropped
        it (a session it no longer takes messages of); anything else: it took it."""
        ...

    def on_failed(self, session: DtlsSession | None, reason: str) -> None:
        """A handshake of this tunnel (or, for a responder, from its peer's address) failed."""
        ...

    def on_closed(self, session: DtlsSession, reason: str) -> None:
        """An established session was closed by the peer or broke; once per session."""
        ...


class SessionOwner(Protocol):
    """What the session layer asks of whoever sessions are for.

    The defaults are those of an owner that only opens client sessions (a socket's cloud);
    an owner subclasses this to inherit them."""

    def tunnel_for(self, session: DtlsSession) -> Tunnel | None:
        """The tunnel a session belongs to: one that opened it, else the one for the peer it
        authenticated (an established server session); None when it is not this owner's."""
        ...

    def sessions_in_use(self) -> Iterable[DtlsSession]:
        """Established sessions still in use; the others are dropped after a while."""
        ...

    def allowed_ids(self) -> Container[int]:
        """Site ids whose certificates may open a handshake to us (we are the server)."""
        return ()

    def is_known_source(self, link_id: int, addr: Addr) -> bool:
        """Whether handshakes from addr come first when the table is full."""
        return False

    def tunnel_at(self, link_id: int, addr: Addr) -> Tunnel | None:
        """The tunnel whose peer lives at addr: told why a handshake from there was refused."""
        return None

    def on_kick(self, link_id: int, addr: Addr, from_site: int) -> bool:
        """A kick from from_site; False when this owner has no tunnel for it."""
        return False

    def on_key_event(self, peer_id: int, expired: bool) -> bool:
        """The fast path wants new keys for peer_id (expired: it stopped transmitting);
        False when the peer is not this owner's."""
        return False

    def on_probe_ack(self, peer_id: int, link_id: int, probe_id: int, received: int) -> bool:
        """Peer peer_id acked MTU probe probe_id on link_id (received: the datagram's length
        there); False when the peer is not this owner's (docs/dataplane.md, "Path MTU")."""
        return False

    def peers(self, listed: Container[int]) -> list[dict[str, Any]]:
        """This owner's peers as `socketctl peers` entries, leaving out the site ids an owner
        registered before it has listed already (its transport is preferred)."""
        return []


@dataclass(frozen=True)
class Policy:
    """How a daemon's table is bounded and what it reports.

    socketd (every legitimate peer is a configured endpoint) lets known sources past the
    per-source limit and evicts only for them; popd (every site is a stranger until it
    authenticates, several sites may share a NAT) limits everyone per source, lets any
    newcomer evict the oldest stranger, and lists every refusal."""

    max_handshaking: int = 256
    max_per_source: int = 4
    source_of: Callable[[str], str] = ip_source
    known_skip_per_source: bool = True
    strangers_evict: bool = False
    list_strangers: bool = False
    # A handshake replaced by a newer one from the same address is a refusal to report (the
    # site's tunnel learns why) or, where peers restart unanswered handshakes on their own
    # (popd), a quiet drop that must not push real refusals out of the list.
    report_superseded: bool = True
    mtu: int = DEFAULT_MTU  # of server sessions
    handshake_deadline_s: float = 10.0
    stale_after_s: float = 60.0  # an established session no owner uses any more
    replaced_grace_s: float = REPLACED_GRACE_S


@dataclass
class Stats:
    dtls_no_session: int = 0
    rejected: int = 0  # handshakes refused or failed (and, listing strangers, bad hellos)
    refused_admission: int = 0
    evicted: int = 0
    unknown_peer: int = 0  # of the rejections: a certificate of a site nobody accepts
    revoked: int = 0  # of the rejections: a certificate the account revoked
    malformed_hellos: int = 0
    kicks_bad: int = 0
    stun_unmatched: int = 0
    probe_acks_unmatched: int = 0  # MTU probe acks of a peer no owner probes
    unknown: int = 0  # no address, empty, or of no known kind
    oversized: int = 0
    # Records of an established session that arrived while a rekey's handshake held its
    # address, or within the grace after the new session replaced it, that its keys
    # authenticated and its owner's tunnel took (one that returned False is not counted).
    rekey_records: int = 0
    rejections: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=REJECTIONS_KEPT)
    )


@dataclass(eq=False)
class _Entry:
    session: DtlsSession
    link_id: int
    addr: Addr
    created: float
    hello_random: bytes | None = None  # of the ClientHello a server session answers
    reported: bool = False  # established or failed already handed on
    closed_reported: bool = False
    source: str = ""  # policy.source_of(addr), kept: parsing it per admission is not free
    # Whether a server handshake came from a known source when it was admitted, kept: asking
    # the owners again for every pending entry whenever the table is full costs a scan of
    # every peer per entry (socketd's mesh has hundreds), which starved the handshakes.
    known: bool = False

    @property
    def key(self) -> Key:
        return (self.link_id, self.addr)

    @property
    def is_server_handshake(self) -> bool:
        return not self.session.is_client and not self.session.established


class _AllowedIds:
    """The owners' allowed ids, asked when a certificate arrives (a reload in between
    counts)."""

    def __init__(self, owners: list[SessionOwner]) -> None:
        self._owners = owners

    def __contains__(self, site_id: object) -> bool:
        return any(site_id in o.allowed_ids() for o in self._owners)


class SessionLayer:
    """One daemon's DTLS sessions, from the control queue to the owners' tunnels."""

    def __init__(
        self,
        *,
        send: Callable[[int, Addr, bytes], None],
        clock: Callable[[], float] = time.monotonic,
        policy: Policy | None = None,
        my_site_id: int | None = None,
        on_stun: Callable[[int, Addr, bytes], bool] | None = None,
        dtls: DtlsContext | None = None,
    ) -> None:
        self.send = send
        self.clock = clock
        self.policy = policy or Policy()
        self.my_site_id = my_site_id  # None: no kick is for us
        self.on_stun = on_stun
        self.dtls = dtls  # may come later: daemons open their keys after construction
        self.stats = Stats()
        self.owners: list[SessionOwner] = []
        self._allowed = _AllowedIds(self.owners)
        self._table: dict[Key, _Entry] = {}
        self._generation = 0
        self._keys: dict[DtlsSession, Key] = {}
        # An established session whose address a handshake in progress took over (a rekey, or
        # a stray or replayed hello with a valid cookie): it gets the address back when that
        # handshake fails, so one bad handshake cannot cut it off until the next rekey.
        self._displaced: dict[Key, _Entry] = {}
        # A session a rekey replaced, and until when its late records are still taken.
        self._replaced: dict[Key, tuple[_Entry, float]] = {}
        self._ratelog = RateLog(log, clock)
        self._handlers: dict[int, Callable[[int, Addr, bytes], None]] = {}
        self._next_stale_check = 0.0

    # ---------------------------------------------------------------- owners

    def add_handler(self, type_byte: int, handler: Callable[[int, Addr, bytes], None]) -> None:
        """Datagrams whose first byte is type_byte go to handler(link_id, addr, data): a new
        kind of control datagram plugs in here. The kinds the layer sorts itself are taken."""
        if type_byte == KICK_TYPE or 0 <= type_byte <= 63 or type_byte in self._handlers:
            raise ValueError(f"datagram type {type_byte:#x} is taken")
        self._handlers[type_byte] = handler

    def add_owner(self, owner: SessionOwner, before: SessionOwner | None = None) -> None:
        """Register an owner, last or just before another (owners are asked in order)."""
        if before is not None and before in self.owners:
            self.owners.insert(self.owners.index(before), owner)
        else:
            self.owners.append(owner)

    def remove_owner(self, owner: SessionOwner) -> None:
        if owner in self.owners:
            self.owners.remove(owner)

    # ---------------------------------------------------------------- sessions

    def client_session(self, link_id: int, addr: Addr, expected: int | Identity) -> DtlsSession:
        """A new DTLS client session, registered so that replies from addr reach it."""
        assert self.dtls is not None
        session = self.dtls.client(expected)
        self._register(_Entry(session, link_id, addr, self.clock()))
        return session

    def forget_session(self, session: DtlsSession) -> None:
        """Drop a session its owner gave up on or closed, without reporting it as refused."""
        key = self._keys.pop(session, None)
        if key is None:
            return
        displaced = self._displaced.get(key)
        if displaced is not None and displaced.session is session:
            del self._displaced[key]
        replaced = self._replaced.get(key)
        if replaced is not None and replaced[0].session is session:
            del self._replaced[key]
        entry = self._table.get(key)
        if entry is not None and entry.session is session:
            self._drop(entry)

    @property
    def handshaking(self) -> int:
        return sum(1 for e in self._table.values() if not e.session.established)

    @property
    def generation(self) -> int:
        """Changes whenever the table does (a session or handshake added or removed)."""
        return self._generation

    def addresses(self) -> list[Addr]:
        """The addresses of every session and handshake in the table: known sources."""
        return [addr for _link, addr in self._table]

    def __len__(self) -> int:
        return len(self._table)

    # ---------------------------------------------------------------- control events

    def on_ctrl_event(self, ev: CtrlEvent) -> None:
        if ev.event == CtrlEvent.REKEY or ev.event == CtrlEvent.KEY_EXPIRED:
            expired = ev.event == CtrlEvent.KEY_EXPIRED
            for owner in self.owners:
                if owner.on_key_event(ev.peer_id, expired):
                    return
            return
        if ev.event == CtrlEvent.PROBE_ACK:
            ack = probe_ack(ev.data)
            if ack is not None:
                for owner in self.owners:
                    if owner.on_probe_ack(ev.peer_id, ev.link_id, *ack):
                        return
            self.stats.probe_acks_unmatched += 1
            return
        data, addr, link_id = ev.data, ev.addr, ev.link_id
        if addr is None or not data:
            self.stats.unknown += 1
        elif len(data) >= CTRL_MAX:
            # At the fast path's limit for control datagrams: none of ours is that large.
            self.stats.oversized += 1
            self._ratelog.warning(
                "oversized", "oversized datagram from %s dropped", format_addr(addr)
            )
        elif data[0] == KICK_TYPE:
            self._on_kick(link_id, addr, data)
        elif data[0] in self._handlers:
            # A datagram kind of its own (the mesh's probes): its handler counts what it drops.
            self._handlers[data[0]](link_id, addr, data)
        elif 20 <= data[0] <= 63:
            self._on_dtls(link_id, addr, data)
        elif is_stun(data):
            # Answers to our Binding requests, or requests where a STUN server listens.
            if self.on_stun is None or not self.on_stun(link_id, addr, data):
                self.stats.stun_unmatched += 1
        else:
            self.stats.unknown += 1
            self._ratelog.warning(
                "garbage",
                "garbage datagram (%d bytes) from %s dropped",
                len(data),
                format_addr(addr),
            )

    def _on_kick(self, link_id: int, addr: Addr, data: bytes) -> None:
        kick = decode_kick(data)
        if kick is not None and self.my_site_id is not None and kick[1] == self.my_site_id:
            for owner in self.owners:
                if owner.on_kick(link_id, addr, kick[0]):
                    return
        self.stats.kicks_bad += 1

    def _on_dtls(self, link_id: int, addr: Addr, data: bytes) -> None:
        entry = self._table.get((link_id, addr))
        if is_client_hello(data):
            hello = client_hello_random(data)
            # A retransmitted hello (or a later fragment of one) belongs to the handshake it
            # started. Another random is a new handshake from this address (first, rekey, or
            # the peer restarted): it replaces the one in progress only once it has passed
            # the cookie check, so a forged hello cannot abort a handshake.
            ongoing = (
                entry is not None
                and entry.is_server_handshake
                and (hello is None or hello == entry.hello_random)
            )
            if not ongoing:
                self._on_new_hello(link_id, addr, data, hello)
                return
        if entry is None:
            self.stats.dtls_no_session += 1
            return
        olders = self._older_sessions(entry)
        if not olders:
            self._feed(entry, data)
            return
        for record in split_records(data):
            self._route_record(entry, olders, record)

    def _older_sessions(self, entry: _Entry) -> list[_Entry]:
        """The established sessions that share entry's address during or just after a rekey,
        newest first: the one a handshake in progress displaced, and the one a finished
        rekey replaced while its grace lasts (a second handshake within it keeps it)."""
        olders = []
        if not entry.session.established:
            displaced = self._displaced.get(entry.key)
            if displaced is not None:
                olders.append(displaced)
        replaced = self._replaced.get(entry.key)
        if replaced is not None:
            if self.clock() >= replaced[1] or replaced[0].session.released:
                self._end_grace(entry.key)
            else:
                olders.append(replaced[0])
        return olders

    def _end_grace(self, key: Key) -> None:
        """The session a rekey replaced takes no more records: its OpenSSL state goes."""
        replaced = self._replaced.pop(key, None)
        if replaced is not None and self._keys.get(replaced[0].session) == key:
            del self._keys[replaced[0].session]

    def _route_record(self, entry: _Entry, olders: list[_Entry], record: bytes) -> None:
        """One record from an address several sessions share during a rekey, matched by
        epoch.

        A new handshake's records are epoch 0 (hellos, certificates, key exchange, its
        ChangeCipherSpec) or handshake records of epoch 1 (its Finished); the established
        sessions' are application data and alerts of epoch 1 (renegotiation is off, so one
        never moves past 1). Handshake records always go to the newest session, entry, even
        once it is established: a DTLS server resends its last flight (ChangeCipherSpec and
        Finished) only when the client's Finished comes again, so a rekey whose last server
        flight was lost completes only if the retransmitted Finished reaches it; an older
        session's handshake is long over and needs none of them.

        Only application data and alerts of epoch >= 1 are ambiguous: the new session may
        send some as soon as its own end is done. Those go to the session that most likely
        owns them first (the established one while the handshake runs, the new one once it
        is established, then the older ones); when one does not take the record (its keys
        do not authenticate it, and DTLS drops it silently), the next gets it."""
        epoch = record_epoch(record)
        if not epoch or record[0] not in (CONTENT_APPLICATION_DATA, CONTENT_ALERT):
            self._feed(entry, record)
            return
        order = [entry, *olders] if entry.session.established else [*olders, entry]
        for candidate in order:
            if self._feed(candidate, record, late=candidate is not entry):
                return

    def _feed(self, entry: _Entry, data: bytes, *, late: bool = False) -> bool:
        """Feed a datagram to entry's session; whether the session took it (a record it
        authenticated, or progress of its handshake). late: entry is a session a rekey's
        handshake displaced or replaced, whose messages the owner takes are counted."""
        session = entry.session
        before = (session.records_in, session.closed, session.established, session.failed)
        for reply in session.receive(data):
            self.send(entry.link_id, entry.addr, reply)
        self._after_input(entry, late=late)
        after = (session.records_in, session.closed, session.established, session.failed)
        return after != before

    def _on_new_hello(self, link_id: int, addr: Addr, data: bytes, hello: bytes | None) -> None:
        assert self.dtls is not None
        result = self.dtls.accept(
            data, format_addr(addr), mtu=self.policy.mtu, allowed_site_ids=self._allowed
        )
        for reply in result.replies:
            self.send(link_id, addr, reply)
        if result.session is None:
            if result.reason not in (None, "cookie sent"):
                self._refused_hello(addr, result.reason or "refused")
            return
        known = self._known(link_id, addr)
        if not self._admit(link_id, addr, known):
            self.stats.refused_admission += 1
            return
        entry = _Entry(result.session, link_id, addr, self.clock(), hello_random=hello,
                       known=known)
        self._register(entry)
        self._after_input(entry)

    # ---------------------------------------------------------------- admission

    def _known(self, link_id: int, addr: Addr) -> bool:
        return any(o.is_known_source(link_id, addr) for o in self.owners)

    def _admit(self, link_id: int, addr: Addr, known: bool) -> bool:
        """Room for one more server handshake from addr (its cookie was valid)?

        A cookie only proves the sender receives at its address, so one host could otherwise
        hold every slot from many ports; and a table that simply refused newcomers when full
        could be held by a few hosts re-sending hellos. So a source gets a few slots, and a
        full table evicts its oldest handshake from a stranger (policy says for whom)."""
        p = self.policy
        pending = [
            e for e in self._table.values() if e.is_server_handshake and e.key != (link_id, addr)
        ]
        if not (known and p.known_skip_per_source):
            source = p.source_of(addr[0])
            if sum(1 for e in pending if e.source == source) >= p.max_per_source:
                return False
        if len(pending) < p.max_handshaking:
            return True
        if not known and not p.strangers_evict:
            return False
        victims = [e for e in pending if not e.known]
        if not victims:
            return False
        victim = min(victims, key=lambda e: e.created)
        victim.reported = True  # a stranger's: no tunnel to tell
        self._drop(victim)
        self.stats.evicted += 1
        return True

    # ---------------------------------------------------------------- the table

    def _register(self, entry: _Entry) -> None:
        """Put entry in the table; a handshake it displaces is failed, not orphaned."""
        entry.source = self.policy.source_of(entry.addr[0])
        entry.session.link_id = entry.link_id
        old = self._table.get(entry.key)
        if old is not None and not old.reported and not old.session.established:
            old.reported = True
            # The session the old handshake displaced stays displaced by the new one.
            displaced = self._displaced.pop(entry.key, None)
            if self.policy.report_superseded:
                self._reject(old, SUPERSEDED)
            else:
                self._drop(old)
            if displaced is not None:
                self._displaced[entry.key] = displaced
        elif old is not None and old.session.established and not old.session.closed:
            # A rekey again within the grace of the last one (or a replayed hello with a
            # valid cookie) keeps that grace: the replaced session still takes its records.
            self._displaced[entry.key] = old
        elif old is not None:
            self._keys.pop(old.session, None)
        self._table[entry.key] = entry
        self._keys[entry.session] = entry.key
        self._generation += 1

    def _drop(self, entry: _Entry) -> None:
        if self._table.get(entry.key) is entry:
            del self._table[entry.key]
            self._generation += 1
            if entry.session.established:
                # The session that replaced it goes: so does the grace. (A handshake that
                # fails leaves it be.)
                self._end_grace(entry.key)
            displaced = self._displaced.pop(entry.key, None)
            if displaced is not None and not entry.session.established:
                self._table[entry.key] = displaced  # the handshake failed: records go back
            elif displaced is not None:
                self._keys.pop(displaced.session, None)
        if self._keys.get(entry.session) == entry.key:
            del self._keys[entry.session]

    def _tunnel_for(self, session: DtlsSession) -> Tunnel | None:
        for owner in self.owners:
            tunnel = owner.tunnel_for(session)
            if tunnel is not None:
                return tunnel
        return None

    def _after_input(self, entry: _Entry, *, late: bool = False) -> None:
        """Hand a session's news (established, failed, messages, closed) to its tunnel.
        late: entry is a session a rekey displaced or replaced; what its tunnel takes of
        its messages is counted in rekey_records."""
        session = entry.session
        if not entry.reported and session.failed:
            entry.reported = True
            self._reject(entry, session.failed)
            return
        if not entry.reported and session.established:
            entry.reported = True
            tunnel = self._tunnel_for(session)
            if tunnel is None:
                who = session.peer_identity
                name = format_identity(who) if who is not None else "an unnamed peer"
                # Verified before a revocation arrived (a reload during the handshake): it
                # is refused as revoked, with the check's event and counter, not as unknown.
                check = session.context.revocation
                revoked = (
                    check(session.peer_site_id, session.peer_serial)
                    if check is not None
                    and session.peer_site_id is not None
                    and session.peer_serial is not None
                    else None
                )
                self._reject(entry, revoked or f"{name} is not a configured peer")
                for d in session.close():
                    self.send(entry.link_id, entry.addr, d)
                return
            displaced = self._displaced.pop(entry.key, None)
            if displaced is not None:
                # Replaced by the session that displaced it; its late records still reach it
                # for a while (the peer may not have switched yet). One replaced at a time:
                # a session replaced before it is done.
                self._end_grace(entry.key)
                self._replaced[entry.key] = (displaced, self.clock() + self.policy.replaced_grace_s)
            tunnel.on_established(session, entry.link_id, entry.addr)
        if not (entry.reported and session.established):
            return
        tunnel = self._tunnel_for(session)
        if session.failed is None:
            for msg in session.take_messages():
                if tunnel is not None and tunnel.on_message(session, msg) is not False and late:
                    self.stats.rekey_records += 1
        if (session.failed or session.closed) and not entry.closed_reported:
            entry.closed_reported = True
            if tunnel is not None:
                tunnel.on_closed(session, session.failed or "closed by the peer")

    # ---------------------------------------------------------------- refusals

    def _refused_hello(self, addr: Addr, reason: str) -> None:
        """A ClientHello the cookie listener or the first handshake step refused."""
        if reason.startswith(("not a ClientHello", "malformed ClientHello")):
            self.stats.malformed_hellos += 1
        if self.policy.list_strangers:
            self._note(addr, reason, client=False, listed=True)

    def _note(self, addr: Addr, reason: str, *, client: bool, listed: bool) -> None:
        self.stats.rejected += 1
        if "not a configured peer" in reason:
            self.stats.unknown_peer += 1
        elif reason.endswith(REVOKED_SUFFIX):
            self.stats.revoked += 1
        if not listed:
            return
        ep = format_addr(addr)
        self.stats.rejections.append({"at": time.time(), "from": ep, "reason": reason})
        if client:
            self._ratelog.warning("handshake", "handshake with %s failed: %s", ep, reason)
        else:
            self._ratelog.warning("handshake", "handshake from %s refused: %s", ep, reason)

    def _reject(self, entry: _Entry, reason: str) -> None:
        session = entry.session
        client = session.is_client
        # Strangers that never finish their handshake are counted, not listed (unless the
        # policy lists strangers): they would push the refusals that matter out of the list.
        listed = (
            self.policy.list_strangers
            or client
            or reason != TIMED_OUT
            or self._known(entry.link_id, entry.addr)
        )
        self._note(entry.addr, reason, client=client, listed=listed)
        self._drop(entry)
        # Tell the tunnel this concerns: the one that called, else the one whose endpoint it
        # came from (a responder learns why its peer was refused).
        tunnel = self._tunnel_for(session)
        if tunnel is None and not client:
            for owner in self.owners:
                tunnel = owner.tunnel_at(entry.link_id, entry.addr)
                if tunnel is not None:
                    break
        if tunnel is not None:
            tunnel.on_failed(
                session,
                reason if client else f"handshake from {format_addr(entry.addr)} refused: {reason}",
            )

    # ---------------------------------------------------------------- periodic work

    def next_due(self) -> float:
        """When tick() next has something to do: a handshake's retransmission or deadline,
        a finished one to drop, the next look for stale sessions."""
        now = self.clock()
        due = self._next_stale_check
        for entry in self._table.values():
            session = entry.session
            if session.established:
                continue
            if entry.reported:
                return now  # dropped at the next tick
            if session.failed:
                continue  # reported with the input that failed it; no clock of its own
            due = min(due, entry.created + self.policy.handshake_deadline_s)
            left = session.timeout()
            if left is not None:
                due = min(due, now + left)
        return due

    def tick(self) -> None:
        now = self.clock()
        in_use: set[DtlsSession] | None = None
        # Stale sessions are looked for every few seconds, not every tick: asking the owners
        # for the sessions they use walks every tunnel (hundreds in a mesh, or on a PoP).
        stale_check = now >= self._next_stale_check
        if stale_check:
            self._next_stale_check = now + STALE_CHECK_S
            # Replaced sessions whose grace ran out with no record since (they go at their
            # next record otherwise): their OpenSSL state is freed with them.
            for key, (_, until) in list(self._replaced.items()):
                if now >= until:
                    self._end_grace(key)
        for key, entry in list(self._table.items()):
            if self._table.get(key) is not entry:
                continue  # gone with an earlier entry's news
            session = entry.session
            if session.established:
                # Replaced by a rekey or left behind by a roaming peer.
                if stale_check and now - entry.created > self.policy.stale_after_s:
                    if in_use is None:
                        in_use = {s for o in self.owners for s in o.sessions_in_use()}
                    if session not in in_use:
                        self._drop(entry)
                continue
            if now - entry.created > self.policy.handshake_deadline_s and not session.failed:
                entry.reported = True
                self._reject(entry, TIMED_OUT)
                continue
            due = session.timeout()
            if due is not None and due <= 0:
                for d in session.on_timeout():
                    self.send(entry.link_id, entry.addr, d)
                self._after_input(entry)
            if entry.reported and not session.established:
                self._drop(entry)
