"""One peer tunnel: its DTLS handshakes, the hand-over of the exported keys to
the fast path, rekeying, keepalives, kicks, and the up/down state with the
reason a person needs when it is down.

Roles: the site with the higher id initiates (is the DTLS client). The other
side, while it has no working tunnel, sends small *kick* datagrams to the
initiator: they open its own NAT mapping toward the initiator and tell an
initiator that still holds old keys (because the responder restarted) to
handshake again. Kicks are not authenticated; the worst a forged one can do is
trigger one handshake per `kick_response_min_s`, which must then authenticate.

Key hand-over (after every handshake, initial or rekey): each side installs the
new keys in the fast path's spare slot under a fresh local index (it receives
with them at once), sends {"t": "key", "idx": N} over the DTLS session, and
repeats it until the peer answers {"t": "key-ack", "idx": N}. On receiving
"key", a side activates the slot for transmit with N as the peer's index. The
old key keeps receiving until the next install, so no packet is lost. The
mechanics are handover.py's, shared with popd; when to activate is the tunnel's.
Each `key` also carries its sender's rekey interval and key-age limit: both ends
use the smaller of each (keytimers.py), so the initiator rekeys on the agreed
interval and neither end's keys age out before it.

The tunnel does no I/O itself: the session layer (sessions.py) hands it its DTLS
sessions, their records and failures, and kicks; the supervisor gives it a clock
(`tick`) and a `Port` to send through.

The same machine carries a socket's sessions to a PoP (cloud.py): always the
initiator, no kicks, a PoP identity expected in the handshake, and liveness
judged by its owner; control messages other than the key hand-over go to the
owner's `on_app_message`.

Control messages of any size go through messages.py: one record when they fit, fragments when
they do not (a PoP's directory), reassembled here per session before anything else looks at them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from sdwan.bindings.fastpath import FastPath, FastPathError
from sdwan.common.dtls import DtlsSession
from sdwan.common.handover import KeyHandover, key_index, parse_key
from sdwan.common.keytimers import KeyTimers
from sdwan.common.messages import FragStats, Reassembler, encode, record_limit
from sdwan.common.pmtu import PathMtu
from sdwan.common.sessions import REPLACED_GRACE_S, SessionOwner, encode_kick
from sdwan.common.tomlcheck import format_endpoint

log = logging.getLogger("sdwan.site.tunnel")

Addr = tuple[str, int]


class State(StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Timers:
    keepalive_s: float = 15.0
    rekey_s: float = 600.0
    dead_after_s: float = 45.0
    retry_min_s: float = 1.0
    retry_max_s: float = 8.0
    kick_interval_s: float = 1.0
    kick_response_min_s: float = 3.0
    key_resend_s: float = 0.5
    key_resend_max: int = 20
    # The key-age limit this end announces (None: keytimers.default_key_max_age(rekey_s));
    # its fast path refuses keys at this age.
    key_max_age_s: int | None = None

    def key_timers(self) -> KeyTimers:
        """This end's own rekey interval and key-age limit, as announced in its `key`."""
        return KeyTimers.for_rekey(int(self.rekey_s), self.key_max_age_s)


class Port(Protocol):
    """What a tunnel needs from the supervisor."""

    def send(self, link_id: int, addr: Addr, data: bytes) -> None: ...

    def client_session(
        self, link_id: int, addr: Addr, expected_site_id: int | tuple[str, int]
    ) -> DtlsSession:
        """A new DTLS client session, registered so that replies from addr reach it."""
        ...

    def forget_session(self, session: DtlsSession) -> None:
        """Drop a client handshake its tunnel gave up on, or a session it released, without
        reporting it as refused."""
        ...


class PeerTunnel:
    # A mesh holds hundreds: no __dict__ each (39 attributes, past what instances can share).
    __slots__ = (
        "my_site_id", "peer_site_id", "peer_id", "expected", "kicks", "check_liveness",
        "on_app_message", "on_keys_active", "keep_session", "link_id", "link_name",
        "configured_endpoint", "endpoint", "fp", "port", "timers", "clock", "on_event",
        "initiator", "state", "reason", "handshakes", "last_handshake_at", "session",
        "_handshaking", "_handshake_to", "_kick_handshaking", "_kick_to", "_next_attempt",
        "_retry", "_next_kick", "_last_kick_handshake", "_keys", "_up_since_rx_ns",
        "_silent_at", "_release_at", "pmtu", "frag_stats", "_reassembler", "_replaced",
        "timers_refused",
    )

    def __init__(
        self,
        *,
        my_site_id: int,
        peer_site_id: int,
        link_id: int,
        link_name: str,
        endpoint: Addr,
        fp: FastPath,
        port: Port,
        timers: Timers,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, str], None] | None = None,
        fp_peer_id: int | None = None,
        expected: int | tuple[str, int] | None = None,
        initiator: bool | None = None,
        kicks: bool = True,
        check_liveness: bool = True,
        on_app_message: Callable[[DtlsSession, dict[str, Any]], None] | None = None,
        on_keys_active: Callable[[DtlsSession], None] | None = None,
        link_mtu: Callable[[int], int] | None = None,
        keep_session: bool = False,
        pmtu_delay_s: float = 0.0,
    ) -> None:
        self.my_site_id = my_site_id
        self.peer_site_id = peer_site_id
        # The fast path's id of this tunnel; a site's id unless the owner picks another.
        self.peer_id = peer_site_id if fp_peer_id is None else fp_peer_id
        self.expected: int | tuple[str, int] = peer_site_id if expected is None else expected
        self.kicks = kicks
        self.check_liveness = check_liveness
        self.on_app_message = on_app_message
        self.on_keys_active = on_keys_active
        # The session carries messages beyond the key hand-over (the cloud's): its TLS state
        # stays until the next rekey. Otherwise it is freed once the hand-over is done.
        self.keep_session = keep_session
        self.link_id = link_id
        self.link_name = link_name
        self.configured_endpoint = endpoint
        self.endpoint = endpoint
        self.fp = fp
        self.port = port
        self.timers = timers
        self.clock = clock
        self.on_event = on_event or (lambda kind, text: None)
        self.initiator = my_site_id > peer_site_id if initiator is None else initiator
        self.state = State.CONNECTING
        self.reason: str | None = "waiting for the first handshake"
        self.handshakes = 0
        self.last_handshake_at: float | None = None
        self.session: DtlsSession | None = None  # the session keys were last taken from
        self._handshaking: DtlsSession | None = None  # our client session in progress
        self._handshake_to: tuple[int, Addr] | None = None  # its (link, address)
        self._kick_handshaking: DtlsSession | None = None  # one toward a kick's source
        self._kick_to: tuple[int, Addr] | None = None
        self._next_attempt = 0.0
        self._retry = timers.retry_min_s
        self._next_kick = 0.0
        self._last_kick_handshake = -1e9
        self._keys = KeyHandover(
            fp,
            self.peer_id,
            send=self._send_current,
            on_unacknowledged=lambda: self.on_failed(None, "peer never acknowledged the new keys"),
            clock=clock,
            resend_s=timers.key_resend_s,
            resend_max=timers.key_resend_max,
            timers=timers.key_timers(),
        )
        self.timers_refused = 0  # `key` messages refused, or whose timers were
        self._up_since_rx_ns = 0
        self._silent_at = 0.0  # when the peer, quiet since, will have been silent too long
        # When self.session's OpenSSL state is freed (see _maybe_release); None: not planned.
        self._release_at: float | None = None
        # The path MTU of each link the peer is reached over, found by probing while up.
        self.pmtu = PathMtu(fp, self.peer_id, link_mtu, clock, name=f"tunnel {self.peer_id}",
                            start_after_s=pmtu_delay_s)
        # Only self.session's messages count, so one reassembler, renewed with the session.
        self.frag_stats = FragStats()
        self._reassembler = self._new_reassembler()
        # A kept session a rekey just replaced, its reassembler, and until when its messages
        # still count (docs/tunnel.md, "Messages during a rekey").
        self._replaced: tuple[DtlsSession, Reassembler, float] | None = None

    # ---------------------------------------------------------------- inputs

    def tick(self) -> None:
        now = self.clock()
        self._keys.tick()
        self._reassembler.expire()
        if self._replaced is not None and now >= self._replaced[2]:
            self._replaced = None
        if self.state is State.UP and self.check_liveness:
            self._check_alive(now)
        if self.state is State.UP:
            self.pmtu.tick()
            self._maybe_release(now)
        if self.state is not State.UP:
            if self.initiator:
                if self._handshaking is None and now >= self._next_attempt:
                    self._regular_handshake()
            elif self.kicks and now >= self._next_kick:
                self._next_kick = now + self.timers.kick_interval_s
                self.port.send(
                    # To the peer's site id: the peer checks it against its own.
                    self.link_id, self.endpoint, encode_kick(self.my_site_id, self.peer_site_id)
                )
        elif (
            self.initiator
            and self._handshaking is None
            and now >= self._next_attempt
            and self.last_handshake_at is not None
            and now - self.last_handshake_at >= self.rekey_s
        ):
            log.info("peer %d: periodic rekey", self.peer_id)
            self._regular_handshake()

    def on_kick(self, link_id: int, addr: Addr) -> None:
        """The peer asks for a handshake (it has no working keys)."""
        if not self.initiator:
            return
        now = self.clock()
        if (
            self._kick_handshaking is not None
            or now - self._last_kick_handshake < self.timers.kick_response_min_s
        ):
            return
        # Kicks sent just before our last handshake completed are still in
        # flight; a peer that really lost its keys keeps kicking past this.
        if (
            self.last_handshake_at is not None
            and now - self.last_handshake_at < self.timers.kick_response_min_s
        ):
            return
        if self._handshaking is not None and self._handshake_to == (link_id, addr):
            # Already handshaking right there (both ends found a new path at once): a
            # second handshake to that address would only supersede the first.
            return
        self._last_kick_handshake = now
        # The kick is not authenticated: its handshake has a slot of its own so
        # that it can never hold up the regular retry or rekey, and neither the
        # tunnel's link nor the data path's endpoint moves until it succeeds.
        self._kick_handshaking = self._start_handshake(addr, link_id)
        self._kick_to = (link_id, addr)

    def on_rekey_needed(self) -> None:
        if self.initiator and self._handshaking is None:
            log.info("peer %d: fast path asks for a rekey", self.peer_id)
            self._regular_handshake()

    def on_established(self, session: DtlsSession, link_id: int, addr: Addr) -> None:
        if session is self._handshaking:
            self._handshaking = None
        if session is self._kick_handshaking:
            self._kick_handshaking = None
        self._keys.install(session)
        # Only now, with the keys installed, does this session replace the old.
        if session is not self.session:
            # The peer may still send over the old one until its end of the handshake is
            # done: a kept session's messages (the cloud's) still count for a while.
            self._replaced = None
            if self.keep_session and self.session is not None and not self.session.released:
                self._replaced = (self.session, self._reassembler,
                                  self.clock() + REPLACED_GRACE_S)
            self._reassembler = self._new_reassembler()
        self.session = session
        self._release_at = None
        self.link_id = link_id
        self.endpoint = addr
        self.fp.set_endpoint(self.peer_id, link_id, addr)
        self.handshakes += 1
        self.last_handshake_at = self.clock()
        self._retry = self.timers.retry_min_s
        # The hand-over finishes this handshake: no new one while the keys are still being
        # announced (a lost `key` is resent; an unacknowledged one fails the tunnel).
        self._next_attempt = self.last_handshake_at + self._hand_over_s()
        self._keys.announce()

    def on_failed(self, session: DtlsSession | None, reason: str) -> None:
        if session is not None and session is self._kick_handshaking:
            self._kick_handshaking = None
            return  # an unauthenticated kick led nowhere: no backoff, no state change
        if session is not None and session is self._handshaking:
            self._handshaking = None
        now = self.clock()
        self._next_attempt = now + self._retry
        self._retry = min(self._retry * 2, self.timers.retry_max_s)
        if self.state is State.UP:
            # The old keys still work; say why the rekey failed and retry.
            self.reason = f"rekey failed: {reason}"
        else:
            self._set_state(State.DOWN, f"handshake failed: {reason}")

    def on_closed(self, session: DtlsSession, reason: str) -> None:
        """The peer closed (or broke) a session: its keys stay in the fast path and keep
        working as long as the peer answers; liveness, not this, judges the tunnel."""
        log.debug("peer %d: DTLS session ended: %s", self.peer_id, reason)

    def on_message(self, session: DtlsSession, data: bytes) -> bool | None:
        """One application-data record of a session (False: dropped, of a session replaced
        for good or of the replaced one's key hand-over)."""
        if session is not self.session:
            return self._on_replaced_message(session, data)
        msg = self._reassembler.feed(data)
        if msg is None:
            reason = self._reassembler.dropped
            if reason is None:
                return  # a fragment, kept until its message is complete
            if self.on_app_message is not None:
                # The owner counts malformed messages; an empty one is malformed to it.
                self.on_app_message(session, {})
            else:
                log.warning("peer %d: control record dropped: %s", self.peer_id, reason)
            return
        if msg.get("t") not in ("key", "key-ack"):
            if self.on_app_message is not None:
                # The owner parses, validates and counts everything else.
                self.on_app_message(session, msg)
            return
        if msg["t"] == "key-ack":
            idx = key_index(msg)
            if idx is None:
                log.warning("peer %d: malformed control message dropped", self.peer_id)
                return
            self._keys.on_key_ack(idx)
            return
        try:
            idx, peer_timers, problem = parse_key(msg)
        except ValueError as e:
            # No index to activate or acknowledge: dropped; the peer resends or fails its
            # hand-over and says so there.
            self.timers_refused += 1
            log.warning("peer %d: key message refused: %s", self.peer_id, e)
            if self.state is State.UP:
                self.reason = f"peer's key refused: {e}"
            else:
                self._set_state(State.DOWN, f"peer's key refused: {e}")
            return
        if problem is not None:
            # The key is used, on the timers in force: refusing it would only make the peer
            # handshake again and again with the same timers.
            self.timers_refused += 1
            log.warning("peer %d: key timers refused, keeping %s: %s", self.peer_id,
                        self._keys.agreed.as_dict(), problem)
        # Activate the key of the session this message came over, nothing else.
        self._keys.on_key(idx, peer_timers, refused=problem is not None)
        if self._keys.activate():
            self._up_since_rx_ns = time.monotonic_ns()
            self._set_state(State.UP, None)
            self._keys.acknowledge(idx)
            if self.on_keys_active is not None:
                self.on_keys_active(session)
            return
        if self.reason is not None and self.reason.startswith("peer's key refused"):
            self.reason = None  # a key accepted since: that refusal is over
        self._keys.acknowledge(idx)

    def _on_replaced_message(self, session: DtlsSession, data: bytes) -> bool:
        """A record of the kept session a rekey just replaced: its messages still go to the
        owner, but not its key hand-over, which is over. Any other session's are dropped.
        Whether the record was taken (a fragment kept counts, a malformed message too: the
        owner counts that)."""
        replaced = self._replaced
        if (replaced is None or replaced[0] is not session or self.clock() >= replaced[2]
                or self.on_app_message is None):
            return False
        msg = replaced[1].feed(data)
        if msg is None:
            if replaced[1].dropped is not None:
                self.on_app_message(session, {})  # the owner counts it as malformed
            return True
        if msg.get("t") in ("key", "key-ack"):
            return False
        self.on_app_message(session, msg)
        return True

    def holds_replaced(self, session: DtlsSession) -> bool:
        """Whether session is the one a rekey replaced and its messages still count."""
        replaced = self._replaced
        return replaced is not None and replaced[0] is session and self.clock() < replaced[2]

    @property
    def rekey_s(self) -> int:
        """The rekey interval both ends agreed on (ours until the peer's `key` told us its)."""
        return self._keys.agreed.rekey_s

    @property
    def agreed_timers(self) -> KeyTimers:
        return self._keys.agreed

    def timers_status(self) -> dict[str, Any]:
        """The agreed rekey interval and key-age limit, and what each end announced."""
        keys = self._keys
        return {
            **keys.agreed.as_dict(),
            "own": keys.timers.as_dict(),
            # None until the peer's `key`; "announced": false, it sent none (old firmware):
            # the old fixed values shown are the ones assumed.
            "peer": keys.peer_status(),
            "refused": self.timers_refused,
        }

    @property
    def settled(self) -> bool:
        """Up, no handshake under way and the keys handed over: until next_due() its tick
        has nothing to do."""
        return (
            self.state is State.UP
            and self._handshaking is None
            and self._kick_handshaking is None
            and self._keys.pending_idx is None
        )

    def next_due(self) -> float:
        """When the tunnel's tick next has something to do. Settled: free its session, rekey,
        judge a silence, search its path MTU. Down: its next handshake or kick, nothing while
        one is under way. Anything else (a rekey under way, keys being handed over): now. An
        owner of hundreds of tunnels ticks each when it is due instead of all of them all the
        time."""
        if not self.settled:
            if self.state is not State.UP and self._keys.pending_idx is None:
                if self._handshaking is not None:
                    # Nothing until the session layer hands over the handshake's end (its
                    # retransmits and deadline are the session layer's clocks). A kick's
                    # handshake does not count: a forged kick must not hold our own retry.
                    return math.inf
                if self.initiator:
                    return self._next_attempt
                return self._next_kick if self.kicks else math.inf
            return self.clock()
        due = self.pmtu.next_due()
        session = self.session
        if not self.keep_session and session is not None and not session.released:
            if self._release_at is not None:
                due = min(due, self._release_at)
            elif self._handed_over():
                due = 0.0  # the next tick plans the release
        if self.initiator and self.last_handshake_at is not None:
            due = min(due, max(self._next_attempt, self.last_handshake_at + self.rekey_s))
        if self.check_liveness:
            due = min(due, self._silent_at)
        return due

    @property
    def wants_handshake(self) -> bool:
        """Whether the next tick starts a handshake (the initiator of a tunnel that is down,
        none under way, its retry due): an owner of hundreds paces them by holding its tick."""
        return (
            self.initiator
            and self.state is not State.UP
            and self._handshaking is None
            and self.clock() >= self._next_attempt
        )

    @property
    def wants_kick(self) -> bool:
        """Whether the next tick kicks the peer (the responder of a tunnel that is down): each
        kick draws a handshake from the peer, so an owner of hundreds paces them too."""
        return (
            not self.initiator
            and self.kicks
            and self.state is not State.UP
            and self.clock() >= self._next_kick
        )

    @property
    def handshaking(self) -> DtlsSession | None:
        """Our client handshake in progress, if any."""
        return self._handshaking

    def send_message(self, msg: dict[str, Any]) -> bool:
        """Send one control message over the current session; False when there is none."""
        session = self.session
        if (session is None or not session.established or session.failed or session.closed
                or session.released):
            return False
        self._send_control(session, msg)
        return True

    def retarget(self, link_id: int, link_name: str, addr: Addr) -> None:
        """The peer is at addr on link_id from now on (the mesh punched a new path): the next
        handshake (or kick) goes there at once; one in progress elsewhere is abandoned."""
        self.link_id, self.link_name = link_id, link_name
        self.configured_endpoint = self.endpoint = addr
        self.fp.set_endpoint(self.peer_id, link_id, addr)
        if self._handshaking is not None:
            self.port.forget_session(self._handshaking)
            self._handshaking = None
        self._next_attempt = self._next_kick = self.clock()
        self._retry = self.timers.retry_min_s

    def declare_down(self, reason: str, retry_after_s: float = 0.0) -> None:
        """The owner judged the tunnel dead: handshake again after retry_after_s (initiator)."""
        self._set_state(State.DOWN, reason)
        self._next_attempt = self.clock() + retry_after_s

    def end(self, reason: str) -> None:
        """Tear the tunnel down now (its peer's certificate was revoked): the session is
        closed, a handshake under way abandoned and the keys leave the fast path, so the old
        keys stop working at once instead of at reject_after. The tunnel stays configured:
        the next handshake is the revocation check's to refuse, and a replacement
        certificate brings it back."""
        session = self.session
        if session is not None and session.established and not session.released:
            for d in session.close():
                self.port.send(self.link_id, self.endpoint, d)
        for pending in (self._handshaking, self._kick_handshaking):
            if pending is not None:
                self.port.forget_session(pending)
        self._handshaking = self._kick_handshaking = None
        try:
            self.fp.key_clear(self.peer_id)
        except FastPathError as e:
            log.warning("peer %d: keys not cleared: %s", self.peer_id, e)
        self._keys.pending_idx = None
        self._keys.activated = None
        self._keys.keys = None
        self._keys.local_idx = self._keys.remote_idx = None
        self.session = None
        self._release_at = None
        self._reassembler = self._new_reassembler()
        self._set_state(State.DOWN, reason)
        self._next_attempt = self.clock() + self._retry

    # ---------------------------------------------------------------- status

    def status(self) -> dict:
        counters = self.fp.peer_counters(self.peer_id)
        now_ns = time.monotonic_ns()
        now = self.clock()
        return {
            "site_id": self.peer_id,
            "state": str(self.state),
            "reason": self.reason,
            "endpoint": format_endpoint(self.endpoint),
            "link": self.link_name,
            "role": "initiator" if self.initiator else "responder",
            "handshakes": self.handshakes,
            "last_handshake_s": None
            if self.last_handshake_at is None
            else round(now - self.last_handshake_at, 1),
            "last_rx_s": None
            if not counters.last_rx_ns
            else round((now_ns - counters.last_rx_ns) / 1e9, 1),
            "rx_packets": counters.rx_packets,
            "tx_packets": counters.tx_packets,
            "rx_bytes": counters.rx_bytes,
            "tx_bytes": counters.tx_bytes,
            "drops": counters.drops,
            # The path MTU found by probing (None: not yet, or no limit known).
            "mtu": self.pmtu.mtu,
            "pmtu": self.pmtu.status(),
            # Agreed with the peer in the key hand-over (docs/tunnel.md, "Agreed timers").
            "timers": self.timers_status(),
        }

    # ---------------------------------------------------------------- internals

    def _authenticated_endpoint(self) -> Addr:
        """Where the fast path last heard the peer: it follows authenticated
        roaming (NAT rebinding), which Python would not see otherwise."""
        ep = self.fp.endpoint(self.peer_id)
        if ep is not None:
            self.link_id, self.endpoint = ep
        return self.endpoint

    def _regular_handshake(self) -> None:
        """Start the retry or rekey handshake toward the endpoint. A kick's handshake under
        way to that very address becomes it: a second one there would supersede it (one
        handshake per address is kept), failing both."""
        addr = self._authenticated_endpoint()
        target = (self.link_id, addr)
        if self._kick_handshaking is not None and self._kick_to == target:
            self._handshaking, self._kick_handshaking = self._kick_handshaking, None
        else:
            self._handshaking = self._start_handshake(addr)
        self._handshake_to = target

    def _start_handshake(self, addr: Addr, link_id: int | None = None) -> DtlsSession:
        link_id = self.link_id if link_id is None else link_id
        session = self.port.client_session(link_id, addr, self.expected)
        for datagram in session.start():
            self.port.send(link_id, addr, datagram)
        if self.state is not State.UP:
            self._set_state(State.CONNECTING, f"handshaking with {format_endpoint(addr)}")
        return session

    def _send_current(self, msg: dict[str, Any]) -> None:
        if self.session is not None and not self.session.released:
            self._send_control(self.session, msg)

    def _handed_over(self) -> bool:
        """Our key acknowledged, the peer's in use for transmit: the hand-over is done."""
        keys = self._keys
        return (
            keys.pending_idx is None
            and keys.activated is not None
            and keys.activated[0] == keys.local_idx
        )

    def _hand_over_s(self) -> float:
        """How long either end keeps announcing its key."""
        return self.timers.key_resend_s * self.timers.key_resend_max

    def _maybe_release(self, now: float) -> None:
        """Free the TLS state of a session that carries nothing but the key hand-over once
        the hand-over is done both ways (docs/tunnel.md, "Sessions after the hand-over"): a
        mesh holds hundreds of them until their next rekey, which is a new session anyway.
        It waits out the peer's resends of its `key` first, so a lost key-ack is still
        answered."""
        session = self.session
        if self.keep_session or session is None or session.released:
            return
        if not self._handed_over():
            self._release_at = None
            return
        if self._release_at is None:
            self._release_at = now + self._hand_over_s() + 2.0
        elif now >= self._release_at:
            self.port.forget_session(session)
            session.release()

    def _send_control(self, session: DtlsSession, msg: dict) -> None:
        for record in encode(msg, record_limit(session)):
            for datagram in session.send(record):
                self.port.send(self.link_id, self.endpoint, datagram)

    def _new_reassembler(self) -> Reassembler:
        return Reassembler(clock=self.clock, stats=self.frag_stats)

    def _check_alive(self, now: float) -> None:
        last_rx_ns, _ = self.fp.peer_times(self.peer_id)
        now_ns = time.monotonic_ns()
        last_rx = max(last_rx_ns, self._up_since_rx_ns)
        silent = (now_ns - last_rx) / 1e9
        self._silent_at = now + self.timers.dead_after_s - silent + 0.01
        if silent > self.timers.dead_after_s:
            self._set_state(State.DOWN, f"no packets from the peer for {silent:.0f} s")
            self._next_attempt = now
        # The keepalives themselves: the fast path's liveness scan (see _set_state).

    def _set_state(self, state: State, reason: str | None) -> None:
        changed = state is not self.state
        self.state = state
        self.reason = reason
        if changed and self.check_liveness:
            # While up, the fast path keeps the idle tunnel alive on its own: one pass in C
            # over every peer, not a call per peer (docs/tunnel.md, "Keepalives").
            try:
                self.fp.set_keepalive(
                    self.peer_id, self.timers.keepalive_s if state is State.UP else 0
                )
            except FastPathError as e:
                log.warning("peer %d: keepalives not set: %s", self.peer_id, e)
        if changed:
            expected = self.expected
            kind, who = expected if isinstance(expected, tuple) else ("site", expected)
            # A tunnel whose fast-path id is not its peer's (a PoP session, an Alt-WAN tunnel).
            also = f" (peer {self.peer_id:#x})" if self.peer_id != who else ""
            text = f"tunnel to {kind} {who}{also} {state}" + (f": {reason}" if reason else "")
            log.info("%s", text)
            self.on_event(f"tunnel-{state}", text)


class StaticTunnels(SessionOwner):
    """The configured peers' tunnels, by site id, as an owner of the session layer: those
    sites may handshake with us, their endpoints come first, and kicks and the fast path's
    rekey requests are theirs by site id."""

    def __init__(
        self, tunnels: dict[int, PeerTunnel], subnets: Mapping[int, list[str]] | None = None
    ) -> None:
        self.tunnels = tunnels
        self.subnets = subnets or {}  # per site id, for the status

    def allowed_ids(self) -> Container[int]:
        return self.tunnels.keys()

    def is_known_source(self, link_id: int, addr: Addr) -> bool:
        return self.tunnel_at(link_id, addr) is not None

    def tunnel_for(self, session: DtlsSession) -> PeerTunnel | None:
        # The site it authenticated once established, before that the one we called.
        who = session.peer_identity if session.established else session.expected_identity
        if who is None or who[0] != "site":
            return None
        return self.tunnels.get(who[1])

    def tunnel_at(self, link_id: int, addr: Addr) -> PeerTunnel | None:
        return next(
            (t for t in self.tunnels.values() if addr in (t.endpoint, t.configured_endpoint)),
            None,
        )

    def sessions_in_use(self) -> list[DtlsSession]:
        return [t.session for t in self.tunnels.values() if t.session is not None]

    def on_kick(self, link_id: int, addr: Addr, from_site: int) -> bool:
        tunnel = self.tunnels.get(from_site)
        if tunnel is None:
            return False
        tunnel.on_kick(link_id, addr)
        return True

    def on_key_event(self, peer_id: int, expired: bool) -> bool:
        tunnel = self.tunnels.get(peer_id)
        if tunnel is None:
            return False
        tunnel.on_rekey_needed()
        return True

    def on_probe_ack(self, peer_id: int, link_id: int, probe_id: int, received: int) -> bool:
        tunnel = self.tunnels.get(peer_id)
        return tunnel is not None and tunnel.pmtu.on_ack(link_id, probe_id, received)

    def peers(self, listed: Container[int]) -> list[dict[str, Any]]:
        out = []
        for site_id, tunnel in self.tunnels.items():
            if site_id in listed:
                continue
            st = tunnel.status()
            st["subnets"] = list(self.subnets.get(site_id, []))
            st["transport"] = "direct"
            out.append(st)
        return out
