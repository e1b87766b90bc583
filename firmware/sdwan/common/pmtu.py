"""Path MTU discovery over a tunnel, by probing (packetization-layer PMTUD, RFC 8899 style), for
one fast-path peer: a site-to-site tunnel, a mesh tunnel, a socket's PoP session or a PoP's
session with a site (docs/dataplane.md, "Path MTU").

The fast path sends the probes (`FastPath.probe`: a data packet padded to exactly the size
tried, DF set, the padding inside the AEAD) and its peer's fast path answers each with a small
authenticated ack, which comes back as a PROBE_ACK control event (`on_ack`). Nothing here
trusts ICMP: a size counts as carried only when its ack arrives.

Per link the peer has an endpoint on (a mesh peer may have several), a `PathProbe` searches:

* a fresh path starts at BASE_PMTU (assumed meanwhile: the figure data is limited to), a
  path whose address changed and the periodic search (every RAISE_S) start from the figure
  they had, which stays in force until the search ends;
* a round probes the floor (until it is confirmed) and up to SIZES_PER_ROUND sizes spread
  over (largest acked, smallest refused), the path's ceiling (the link's MTU) first of all,
  each sent twice; a round ends when every size is answered or after a few round-trip times;
* the largest acked size rises, the smallest unanswered one above it lowers the ceiling,
  and the search ends when they meet: three rounds find a figure to the byte in 1280..1500;
* a round with no answer at all is sent again; after ROUNDS_SILENT of them the floor has
  failed: a search from a figure falls back to BASE_PMTU, one from BASE_PMTU to MIN_PMTU if
  the peer has answered probes before, and a peer that never answered any (older firmware)
  gets no limit (the TUN MTU, as before) and is asked again after NO_ANSWER_RETRY_S.

The peer's MTU in the fast path is the smallest of its paths' figures (`FastPath.set_mtu`):
larger inner packets get ICMP "fragmentation needed" / "packet too big", and TCP SYNs a lower
MSS. Like the tunnels it does no I/O of its own beyond the fast path's calls; its owner calls
`tick()` while the tunnel has keys.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sdwan.bindings.fastpath import PMTU_MIN, FastPath, FastPathError

log = logging.getLogger("sdwan.common.pmtu")

Addr = tuple[str, int]

BASE_PMTU = 1280  # RFC 8899's BASE_PLPMTU for IPv6, and what any sane path carries
MIN_PMTU = PMTU_MIN  # the fast path's floor (576)
RAISE_S = 600.0  # RFC 8899's PMTU_RAISE_TIMER: search for more this often
NO_ANSWER_RETRY_S = 60.0
SIZES_PER_ROUND = 8
COPIES = 2  # each size is probed twice per round, against a lone loss
ROUNDS_SILENT = 3  # rounds without any answer before the floor counts as failed
ROUND_FIRST_S = 1.0  # before a round-trip time is known
ROUND_MIN_S = 0.2
ROUND_MAX_S = 3.0
IDLE_POLL_S = 1.0  # no search under way, no endpoint changed: a tick looks again this often
UDP_HDR = 8
FP_OVERHEAD = 32


class PmtuState(StrEnum):
    SEARCHING = "searching"
    DONE = "done"
    NO_ANSWER = "no answer"


@dataclass(slots=True)  # one per path of every peer: no __dict__ each
class PathProbe:
    """The search on one link's path to the peer."""

    link_id: int
    addr: Addr
    max_size: int
    mtu: int | None  # the figure in force for this path (None: no limit)
    state: PmtuState = PmtuState.SEARCHING
    floor: int = BASE_PMTU
    confirmed: int | None = None
    ceiling: int = 0
    sizes: list[int] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    pending: dict[int, tuple[int, float, int]] = field(default_factory=dict)  # id -> size...
    round_at: float = 0.0
    copies_sent: int = 0
    silent_rounds: int = 0
    next_search: float = 0.0
    srtt: float | None = None
    answered_ever: bool = False
    searches: int = 0
    found_at: float | None = None
    reason: str | None = None

    def ip_header(self) -> int:
        return 40 if ":" in self.addr[0] else 20

    def wire_overhead(self) -> int:
        """Outer IP + UDP + the data packet's header and tag: a size minus this is the
        largest inner packet it carries."""
        return self.ip_header() + UDP_HDR + FP_OVERHEAD


class PathMtu:
    """The path MTU of one fast-path peer, over each link it has an endpoint on."""

    def __init__(
        self,
        fp: FastPath,
        peer_id: int,
        link_mtu: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
        start_after_s: float = 0.0,
    ) -> None:
        self.fp = fp
        self.peer_id = peer_id
        self.link_mtu = link_mtu or (lambda _link: 1500)
        self.clock = clock
        self.name = name or f"peer {peer_id:#x}"
        self.paths: dict[int, PathProbe] = {}
        self.applied: int | None = None  # what the fast path holds (None: 0, no limit)
        self._next_id = int.from_bytes(os.urandom(4), "big")
        # The first search waits until then (BASE_PMTU in force meanwhile): an owner bringing
        # up hundreds of tunnels at once spreads their searches (about 50 probes each).
        self._first_search_at = clock() + start_after_s
        self._next_poll = 0.0
        # While no search runs: the fast path's endpoint generation when the endpoints were
        # last read, and when the next periodic search is due (see tick).
        self._idle_gen: int | None = None
        self._idle_until = 0.0
        self.probes_sent = 0
        self.acks = 0

    # ---------------------------------------------------------------- inputs

    def tick(self) -> None:
        """Follow the peer's endpoints (a new or changed one starts a search), run the
        searches, and give the fast path the smallest figure. Cheap while idle: popd calls
        it for every session on every tick."""
        now = self.clock()
        gen = self.fp.endpoints_gen()
        if now < self._next_poll and gen == self._idle_gen:
            return
        if gen == self._idle_gen and now < self._idle_until:
            # Nothing searching, no endpoint of any peer changed, no search due: reading this
            # peer's endpoints would only find them as they were (hundreds of peers a second).
            self._next_poll = min(now + IDLE_POLL_S, self._idle_until)
            return
        try:
            endpoints = self.fp.endpoint_info(self.peer_id).endpoints
        except FastPathError:
            return
        seen = set()
        for ep in endpoints:
            seen.add(ep.link_id)
            path = self.paths.get(ep.link_id)
            if path is None:
                path = self.paths[ep.link_id] = PathProbe(
                    ep.link_id, ep.addr, self._max_size(ep.link_id), mtu=BASE_PMTU
                )
                if now < self._first_search_at:
                    # Limited to BASE_PMTU at once; searched for more in its turn.
                    path.state, path.next_search = PmtuState.DONE, self._first_search_at
                    path.reason = "first search waits its turn"
                else:
                    self._start(path, BASE_PMTU, now, "new path")
            elif path.addr != ep.addr:
                path.addr = ep.addr
                path.max_size = self._max_size(ep.link_id)
                self._start(path, path.mtu or BASE_PMTU, now, "path changed")
        for link_id in set(self.paths) - seen:
            del self.paths[link_id]
        for path in self.paths.values():
            self._tick_path(path, now)
        self._apply()
        if all(p.state is not PmtuState.SEARCHING for p in self.paths.values()):
            due = min((p.next_search for p in self.paths.values()), default=now + IDLE_POLL_S)
            self._next_poll = min(now + IDLE_POLL_S, due)
            self._idle_gen, self._idle_until = gen, due
        else:
            self._next_poll = 0.0
            self._idle_gen = None

    def next_due(self) -> float:
        """When tick() next has something to do: a round of a search, or the next periodic
        search. A new endpoint is only seen by a tick, so an owner that ticks by this still
        ticks now and then (the mesh: every few seconds)."""
        return self._idle_until if self._idle_gen is not None else self._next_poll

    def ask(self, link_id: int) -> bool:
        """One probe of BASE_PMTU over link_id's path, whatever its search is doing: the
        peer's fast path answers it, and the answer is counted on that endpoint like any
        packet of the peer, so an owner learns whether the path still carries packets. False
        when it could not be sent."""
        path = self.paths.get(link_id)
        if path is None:
            return False
        # The top bit clear: link health's probes (site/health.py) have it set.
        probe_id = self._next_id = (self._next_id + 1) & 0x7FFFFFFF
        try:
            self.fp.probe(self.peer_id, link_id, BASE_PMTU, probe_id)
        except FastPathError as e:
            log.debug("%s link %d: probe not sent: %s", self.name, link_id, e)
            return False
        self.probes_sent += 1
        path.pending[probe_id] = (BASE_PMTU, self.clock(), BASE_PMTU - path.ip_header() - UDP_HDR)
        return True

    def on_ack(self, link_id: int, probe_id: int, received: int) -> bool:
        """An ack of one of our probes (the fast path authenticated it); False if unknown."""
        path = self.paths.get(link_id)
        sent = path.pending.pop(probe_id, None) if path is not None else None
        if path is None or sent is None:
            return False
        size, sent_at, expected = sent
        if received != expected:
            return False  # not what we sent: ignore it
        now = self.clock()
        self.acks += 1
        path.answered_ever = True
        sample = max(now - sent_at, 0.0)
        path.srtt = sample if path.srtt is None else 0.875 * path.srtt + 0.125 * sample
        if path.state is PmtuState.SEARCHING and size in path.sizes:
            path.acked.add(size)
            path.confirmed = max(path.confirmed or 0, size)
            if path.acked >= set(path.sizes):
                self._end_round(path, now)
                self._apply()
        return True

    # ---------------------------------------------------------------- status

    @property
    def mtu(self) -> int | None:
        """The peer's path MTU in force (the smallest of its paths'), None for no limit."""
        figures = [p.mtu for p in self.paths.values() if p.mtu is not None]
        return min(figures) if figures else None

    def path_mtu(self, link_id: int) -> int | None:
        path = self.paths.get(link_id)
        return path.mtu if path is not None else None

    def state(self) -> str | None:
        """One word for the peer: searching while any path searches."""
        states = {p.state for p in self.paths.values()}
        for s in (PmtuState.SEARCHING, PmtuState.NO_ANSWER, PmtuState.DONE):
            if s in states:
                return str(s)
        return None

    def status(self) -> dict[str, Any]:
        now = self.clock()
        mtu = self.mtu
        return {
            "mtu": mtu,
            "inner_mtu": None if mtu is None else mtu - self._overhead(),
            "state": self.state(),
            "paths": [
                {
                    "link_id": p.link_id,
                    "mtu": p.mtu,
                    "state": str(p.state),
                    "max": p.max_size,
                    "searches": p.searches,
                    "found_s": None if p.found_at is None else round(now - p.found_at, 1),
                    "rtt_ms": None if p.srtt is None else round(p.srtt * 1000, 2),
                    "reason": p.reason,
                }
                for p in self.paths.values()
            ],
            "probes_sent": self.probes_sent,
            "acks": self.acks,
        }

    # ---------------------------------------------------------------- internals

    def _max_size(self, link_id: int) -> int:
        try:
            return max(int(self.link_mtu(link_id)), MIN_PMTU)
        except (KeyError, ValueError, TypeError):
            return 1500

    def _overhead(self) -> int:
        return max((p.wire_overhead() for p in self.paths.values()), default=20 + 8 + 32)

    def _start(self, path: PathProbe, floor: int, now: float, why: str) -> None:
        path.state = PmtuState.SEARCHING
        path.floor = max(MIN_PMTU, min(floor, path.max_size))
        path.confirmed = None
        path.ceiling = path.max_size
        path.silent_rounds = 0
        path.searches += 1
        path.reason = why
        log.debug("%s link %d: path MTU search (%s) from %d up to %d", self.name, path.link_id,
                  why, path.floor, path.ceiling)
        self._new_round(path, now)

    def _round_s(self, path: PathProbe) -> float:
        if path.srtt is None:
            return ROUND_FIRST_S
        return min(max(3 * path.srtt + 0.05, ROUND_MIN_S), ROUND_MAX_S)

    def _pick_sizes(self, path: PathProbe) -> list[int]:
        sizes: set[int] = set()
        lo = path.confirmed
        if lo is None:
            sizes.add(path.floor)
            lo = path.floor
        span = path.ceiling - lo
        k = min(SIZES_PER_ROUND, span)
        for i in range(1, k + 1):
            sizes.add(lo + math.ceil(span * i / k))
        return sorted(sizes, reverse=True)

    def _new_round(self, path: PathProbe, now: float, repeat: bool = False) -> None:
        if not repeat:
            path.sizes = self._pick_sizes(path)
        path.acked = set()
        path.pending.clear()
        path.round_at = now
        path.copies_sent = 0
        self._send_copy(path, now)

    def _send_copy(self, path: PathProbe, now: float) -> None:
        path.copies_sent += 1
        for size in list(path.sizes):
            if size in path.acked:
                continue
            # The top bit clear: link health's probes (site/health.py) have it set.
            probe_id = self._next_id = (self._next_id + 1) & 0x7FFFFFFF
            try:
                self.fp.probe(self.peer_id, path.link_id, size, probe_id)
            except FastPathError as e:
                if e.errno == errno.EMSGSIZE:
                    # Larger than our own interface: refused at once.
                    path.ceiling = min(path.ceiling, size - 1)
                    path.sizes.remove(size)
                    continue
                log.debug("%s link %d: probe of %d not sent: %s", self.name, path.link_id,
                          size, e)
                continue
            self.probes_sent += 1
            # The ack names the length of the UDP payload that arrived.
            path.pending[probe_id] = (size, now, size - path.ip_header() - UDP_HDR)

    def _tick_path(self, path: PathProbe, now: float) -> None:
        if path.state is not PmtuState.SEARCHING:
            if now >= path.next_search:
                why = ("new path" if path.searches == 0
                       else "periodic" if path.state is PmtuState.DONE else "asking again")
                self._start(path, path.mtu or BASE_PMTU, now, why)
            return
        round_s = self._round_s(path)
        if path.copies_sent < COPIES and now - path.round_at >= round_s * path.copies_sent / COPIES:
            self._send_copy(path, now)
        if now - path.round_at >= round_s:
            self._end_round(path, now)

    def _end_round(self, path: PathProbe, now: float) -> None:
        path.pending.clear()
        if path.confirmed is None:
            # Not even the floor answered (yet): the path, or the peer, may be silent.
            path.silent_rounds += 1
            if path.silent_rounds < ROUNDS_SILENT:
                self._new_round(path, now, repeat=True)
                return
            self._floor_failed(path, now)
            return
        path.silent_rounds = 0
        refused = [s for s in path.sizes if s > path.confirmed and s not in path.acked]
        if refused:
            path.ceiling = min(path.ceiling, min(refused) - 1)
        path.ceiling = max(path.ceiling, path.confirmed)
        if path.ceiling <= path.confirmed:
            self._found(path, path.confirmed, now)
            return
        self._new_round(path, now)

    def _found(self, path: PathProbe, size: int, now: float) -> None:
        if size != path.mtu:
            log.info("%s link %d: path MTU %d (was %s)", self.name, path.link_id, size,
                     path.mtu if path.mtu is not None else "unlimited")
        path.mtu = size
        path.state = PmtuState.DONE
        path.found_at = now
        path.next_search = now + RAISE_S
        path.reason = None

    def _floor_failed(self, path: PathProbe, now: float) -> None:
        if path.floor > BASE_PMTU:
            log.info("%s link %d: %d no longer carried; searching from %d", self.name,
                     path.link_id, path.floor, BASE_PMTU)
            path.mtu = BASE_PMTU
            self._start(path, BASE_PMTU, now, f"{path.floor} no longer carried")
            return
        if path.answered_ever and path.floor > MIN_PMTU:
            log.warning("%s link %d: not even %d carried; searching from %d", self.name,
                        path.link_id, path.floor, MIN_PMTU)
            path.mtu = MIN_PMTU
            self._start(path, MIN_PMTU, now, f"{path.floor} not carried")
            return
        path.state = PmtuState.NO_ANSWER
        path.next_search = now + NO_ANSWER_RETRY_S
        if not path.answered_ever:
            # Older firmware drops probes: no limit but the TUN's, as before.
            path.mtu = None
            path.reason = "the peer does not answer MTU probes"
        else:
            path.reason = f"probes of {path.floor} unanswered"

    def _apply(self) -> None:
        mtu = self.mtu
        if mtu == self.applied:
            return
        try:
            self.fp.set_mtu(self.peer_id, mtu or 0)
        except FastPathError as e:
            log.debug("%s: MTU %s not set: %s", self.name, mtu, e)
            return
        self.applied = mtu

