"""Framing of control messages over DTLS: one JSON object per application-data record, and
fragments for the objects that do not fit one record.

Owns the wire form of a control message and nothing above it: socketd's tunnels, its PoP
sessions and popd all send through ``encode`` and receive through a ``Reassembler`` per DTLS
session, and see only whole ``dict`` messages.

A message whose compact JSON fits the record limit goes out unchanged, so small messages stay
readable and old peers keep understanding them. A larger one is cut into fragments, each a
record of its own::

    {"t": "frag", "id": N, "i": k, "n": total, "d": "<slice k of the message's JSON text>"}

The slices are of the JSON text (ASCII only: non-ASCII is escaped), joined in ``i`` order and
parsed once complete. Fragments may arrive in any order and more than once; DTLS does not
retransmit application data, so a lost fragment loses its message, exactly as a lost record
does, and the partial is dropped after a timeout. Every bound (message size, fragment count,
partials in progress, bytes buffered) is enforced before anything is stored, and malformed input
is counted and dropped: ``Reassembler.feed`` never raises.
"""

from __future__ import annotations

import collections
import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FRAG = "frag"
MAX_ID = 2**32 - 1
MIN_LIMIT = 128  # below this a fragment's own header leaves too little room for data
DEFAULT_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_FRAGMENTS = 4096
DEFAULT_MAX_PARTIALS = 4
DEFAULT_TIMEOUT_S = 10.0
COMPLETED_KEPT = 64

# AES-256-GCM under DTLS 1.2: 13-byte record header, 8-byte explicit nonce, 16-byte tag.
DTLS_RECORD_OVERHEAD = 13 + 8 + 16

# A random start keeps a restarted sender from reusing the ids its peer may still hold.
_ids = itertools.count(secrets.randbits(31))


def _next_id() -> int:
    return next(_ids) & MAX_ID


# One encoder for every message: json.dumps with options builds a new one per call, which
# is most of the cost of a thousand small fragments.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def dumps(msg: dict[str, Any]) -> str:
    """The JSON text of a message as it goes on the wire (compact, ASCII only)."""
    return _ENCODER.encode(msg)


def record_limit(session: Any, fallback_mtu: int = 1200) -> int:
    """How many bytes of one application-data record ``session`` (a DtlsSession) can carry.

    OpenSSL knows this exactly once the cipher is set; before that, or for anything that is not
    a DtlsSession, it is derived from the session's (or the fallback) ciphertext MTU.
    """
    conn = getattr(session, "conn", None)
    try:
        limit = int(conn.get_cleartext_mtu())  # type: ignore[union-attr]
    except Exception:  # no connection yet, or an OpenSSL without it: derive it
        limit = 0
    if limit <= 0:
        limit = int(getattr(session, "mtu", fallback_mtu)) - DTLS_RECORD_OVERHEAD
    return max(limit, MIN_LIMIT)


def encode(msg: dict[str, Any], limit: int, *, msg_id: int | None = None) -> list[bytes]:
    """The records that carry ``msg``: the message itself when its JSON fits ``limit`` bytes,
    else fragments of at most ``limit`` bytes each. ``msg_id`` is for tests; the default is a
    per-process counter, so every sender's ids are distinct without coordination."""
    return encode_text(dumps(msg), limit, msg_id=msg_id)


def encode_text(text: str, limit: int, *, msg_id: int | None = None) -> list[bytes]:
    """encode() of a message already serialised with dumps() (or put together from parts so
    serialised: a PoP sends one directory to a thousand sites and serialises it once)."""
    if limit < MIN_LIMIT:
        raise ValueError(f"record limit {limit} is below the minimum of {MIN_LIMIT} bytes")
    if len(text) <= limit:
        return [text.encode("ascii")]
    ident = _next_id() if msg_id is None else msg_id
    if not 0 <= ident <= MAX_ID:
        raise ValueError(f"fragment id {ident} is outside 0..{MAX_ID}")
    # Sized for the widest i and n this text can need, so every fragment fits whatever its k.
    widest = len(str(len(text)))
    header = len(dumps({"t": FRAG, "id": ident, "i": 0, "n": 0, "d": ""})) + 2 * (widest - 1)
    room = limit - header
    slices: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + room)
        while True:
            chunk = text[start:end]
            size = len(chunk) + chunk.count('"') + chunk.count("\\")
            if size <= room:
                break
            # Shrunk by the chunk's own share of escaped characters: right, or nearly, at the
            # first try, and always shorter than before.
            span = end - start
            end = start + max(1, min(span - 1, span * room // size))
        slices.append(chunk)
        start = end
    total = len(slices)
    out = [
        dumps({"t": FRAG, "id": ident, "i": k, "n": total, "d": d}).encode("ascii")
        for k, d in enumerate(slices)
    ]
    assert all(len(r) <= limit for r in out), "fragment over the record limit"
    return out


@dataclass
class FragStats:
    """Counters of one or many reassemblers (a tunnel or a PoP shares one across sessions)."""

    messages: int = 0  # whole messages handed up, plain or reassembled
    fragments: int = 0  # well-formed fragments accepted
    reassembled: int = 0  # messages that came in fragments
    duplicates: int = 0  # fragments seen before (or of a message already complete)
    malformed: int = 0  # records that are no JSON object, or bad fragments
    oversized: int = 0  # partials dropped for exceeding the size or fragment bounds
    evicted: int = 0  # partials dropped to make room for newer ones
    expired: int = 0  # partials dropped because their fragments stopped coming

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Partial:
    n: int
    started: float
    last: float
    parts: dict[int, str] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Turns the records of one DTLS session back into whole messages.

    ``feed`` returns the complete message a record finishes (or is), else None; after a None,
    ``dropped`` says why the record was discarded as malformed or over the bounds, or is None
    when it was a fragment kept for later or a duplicate. Memory stays within ``max_buffered``
    bytes of fragment text whatever the peer sends.
    """

    def __init__(
        self,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
        max_partials: int = DEFAULT_MAX_PARTIALS,
        max_buffered: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        stats: FragStats | None = None,
    ) -> None:
        if max_message < 1 or max_fragments < 2 or max_partials < 1 or timeout_s <= 0:
            raise ValueError("reassembly bounds must be positive (and allow 2 fragments)")
        self.max_message = max_message
        self.max_fragments = max_fragments
        self.max_partials = max_partials
        self.max_buffered = max_message * 2 if max_buffered is None else max_buffered
        self.timeout_s = timeout_s
        self.clock = clock
        self.stats = stats if stats is not None else FragStats()
        self.dropped: str | None = None
        self._partials: dict[int, _Partial] = {}
        self._buffered = 0
        self._completed: collections.deque[int] = collections.deque(maxlen=COMPLETED_KEPT)

    @property
    def pending(self) -> int:
        """Messages partly received."""
        return len(self._partials)

    @property
    def buffered(self) -> int:
        """Bytes of fragment text held."""
        return self._buffered

    def feed(self, record: bytes) -> dict[str, Any] | None:
        self.dropped = None
        self.expire()
        try:
            msg = json.loads(record)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return self._drop("malformed", "not JSON")
        if not isinstance(msg, dict):
            return self._drop("malformed", "not a JSON object")
        if msg.get("t") != FRAG:
            self.stats.messages += 1
            return msg
        return self._fragment(msg)

    def expire(self) -> int:
        """Drop the partials whose last fragment is older than the timeout; how many went."""
        if not self._partials:
            return 0
        now = self.clock()
        stale = [k for k, p in self._partials.items() if now - p.last > self.timeout_s]
        for k in stale:
            self._discard(k)
        self.stats.expired += len(stale)
        return len(stale)

    def clear(self) -> None:
        for k in list(self._partials):
            self._discard(k)

    # ------------------------------------------------------------------ internals

    def _drop(self, counter: str, reason: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        # A duplicate is what UDP does, not a fault of the sender: counted, never reported.
        if counter != "duplicates":
            self.dropped = reason

    def _discard(self, ident: int) -> None:
        p = self._partials.pop(ident)
        self._buffered -= p.size

    def _fragment(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        ident, k, n, d = msg.get("id"), msg.get("i"), msg.get("n"), msg.get("d")
        if not (
            _is_int(ident) and 0 <= ident <= MAX_ID
            and _is_int(n) and n >= 2
            and _is_int(k) and 0 <= k < n
            and isinstance(d, str) and d and d.isascii()
        ):
            return self._drop("malformed", "malformed fragment")
        if n > self.max_fragments:
            return self._drop("oversized", f"fragment of a message in {n} fragments")
        if ident in self._completed:
            return self._drop("duplicates", "fragment of a message already complete")
        now = self.clock()
        p = self._partials.get(ident)
        if p is not None and p.n != n:
            # Two messages under one id: neither can be trusted to reassemble.
            self._discard(ident)
            return self._drop("malformed", "fragment count differs from earlier fragments")
        if p is not None and k in p.parts:
            p.last = now
            return self._drop("duplicates", "duplicate fragment")
        size = len(d)
        if (p.size if p is not None else 0) + size > self.max_message:
            if p is not None:
                self._discard(ident)
            self._completed.append(ident)  # its remaining fragments are dropped at once
            return self._drop("oversized", f"message over {self.max_message} bytes")
        if p is None:
            while len(self._partials) >= self.max_partials:
                self._evict_oldest()
            p = self._partials[ident] = _Partial(n=n, started=now, last=now)
        while self._buffered + size > self.max_buffered and len(self._partials) > 1:
            self._evict_oldest(keep=ident)
        if self._buffered + size > self.max_buffered:
            self._discard(ident)
            return self._drop("oversized", "too many fragment bytes buffered")
        p.parts[k] = d
        p.size += size
        p.last = now
        self._buffered += size
        self.stats.fragments += 1
        if len(p.parts) < p.n:
            return None
        self._discard(ident)
        self._completed.append(ident)
        text = "".join(p.parts[i] for i in range(p.n))
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            return self._drop("malformed", "reassembled text is not JSON")
        if not isinstance(whole, dict) or whole.get("t") == FRAG:
            return self._drop("malformed", "reassembled text is not a message")
        self.stats.reassembled += 1
        self.stats.messages += 1
        return whole

    def _evict_oldest(self, keep: int | None = None) -> None:
        candidates = [k for k in self._partials if k != keep]
        if not candidates:
            return
        oldest = min(candidates, key=lambda k: self._partials[k].started)
        self._discard(oldest)
        self.stats.evicted += 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
