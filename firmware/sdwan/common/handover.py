"""The key hand-over after every handshake, the same at both ends of a site-to-site tunnel
and of a PoP session (docs/tunnel.md, docs/cloud.md).

Each side exports the session's keys, installs them in the fast path's spare slot of its peer
under a fresh random local index (it receives with them at once), sends {"t": "key", "idx": N,
"rekey_s": R, "key_max_age_s": A} over the session and repeats it until the other side answers
{"t": "key-ack", "idx": N}. On the other side's "key" it activates the slot for transmit with
that index as the remote one. The old keys keep receiving until the next install, so nothing in
flight is lost. R and A are the end's own key timers; both ends agree on one pair
(keytimers.py).

One `KeyHandover` per fast-path peer owns its indices and the announcing; when to activate
(at once for a tunnel, only after registration on a PoP) and what an unacknowledged key means
stay with the caller.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from sdwan.bindings.fastpath import FastPath, FastPathError
from sdwan.common.dtls import DtlsSession
from sdwan.common.keytimers import FP_REKEY_BACKSTOP_S, LEGACY, KeyTimers, announced_timers

KEY_RESEND_S = 0.5
KEY_RESEND_MAX = 20
_EEXIST = 17
_DRAWS = 16


def install_keys(
    fp: FastPath, peer_id: int, keys: tuple[bytes, bytes], prefer: int | None = None
) -> int:
    """Install keys for peer_id under prefer if that index is free, else a random one."""
    cand = prefer
    for _ in range(_DRAWS):
        if cand is None:
            cand = secrets.randbits(32) or 1
        try:
            fp.key_install(peer_id, cand, keys[0], keys[1])
            return cand
        except FastPathError as e:
            if e.errno != _EEXIST:  # that index is taken: draw another
                raise
        cand = None
    raise RuntimeError(f"no free key index after {_DRAWS} draws")


def key_index(msg: dict[str, Any]) -> int | None:
    """The index of a `key` or `key-ack` message, None when it is no valid index."""
    idx = msg.get("idx")
    if isinstance(idx, bool) or not isinstance(idx, int) or not 0 < idx < 2**32:
        return None
    return idx


def parse_key(msg: dict[str, Any]) -> tuple[int, KeyTimers | None, str | None]:
    """The index of a `key` message, the timers it announced (None: none) and why they were
    refused (None: they were not). ValueError when the index is malformed: such a message is
    refused. Refused timers leave the key usable: it is activated and acknowledged on the
    timers in force (`KeyHandover.on_key`), so a peer that announces nonsense is not pushed
    into handshaking again and again."""
    idx = key_index(msg)
    if idx is None:
        raise ValueError(f"idx: expected an integer 1..{2**32 - 1}, got {msg.get('idx')!r}")
    try:
        return idx, announced_timers(msg), None
    except ValueError as e:
        return idx, None, str(e)


class KeyHandover:
    """The keys of one fast-path peer: installed, announced, activated."""

    def __init__(
        self,
        fp: FastPath,
        peer_id: int,
        *,
        send: Callable[[dict[str, Any]], object],
        on_unacknowledged: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        resend_s: float = KEY_RESEND_S,
        resend_max: int = KEY_RESEND_MAX,
        timers: KeyTimers | None = None,
    ) -> None:
        self.fp = fp
        self.peer_id = peer_id
        self._send_msg = send  # over the session the keys came from
        self._on_unacknowledged = on_unacknowledged
        self.clock = clock
        self.resend_s = resend_s
        self.resend_max = resend_max
        self.keys: tuple[bytes, bytes] | None = None
        self.local_idx: int | None = None  # our index of the current keys
        self.remote_idx: int | None = None  # the peer's, from its `key`
        self.activated: tuple[int, int] | None = None  # (local, remote) transmitting now
        self.pending_idx: int | None = None  # announced, not acknowledged yet
        self._sends = 0
        self._next_send = 0.0
        # Ours, announced with every `key`; the peer's from its `key`; what both use.
        self.timers = KeyTimers() if timers is None else timers
        self.peer_timers: KeyTimers | None = None
        # None: no `key` from the peer yet; False: it announced no timers (LEGACY assumed).
        self.peer_announced: bool | None = None
        self.agreed = self.timers

    def install(self, session: DtlsSession) -> int:
        """Export the keys of a new session and install them; announce() sends them."""
        self.keys = session.export_keys()
        self.local_idx = install_keys(self.fp, self.peer_id, self.keys)
        self.remote_idx = None
        return self.local_idx

    def move(self, peer_id: int) -> bool:
        """The same keys under another fast-path peer (added by the caller), under the same
        index when it is free there. True when the index changed and was announced again."""
        assert self.keys is not None
        self.peer_id = peer_id
        idx = install_keys(self.fp, peer_id, self.keys, prefer=self.local_idx)
        self._apply_lifetime()
        if idx == self.local_idx:
            return False
        self.local_idx = idx
        self.announce()
        return True

    def announce(self) -> None:
        """Send `key` for the installed keys, and again until the peer acknowledges it."""
        self.pending_idx = self.local_idx
        self._sends = 0
        self._send_key()

    def tick(self) -> None:
        if self.pending_idx is not None and self.clock() >= self._next_send:
            self._send_key()

    def on_key(
        self, idx: int, peer_timers: KeyTimers | None = None, refused: bool = False
    ) -> None:
        """The peer's `key`: its index and announced timers (None: it announced none, an end
        from before the agreement). `refused`: its timers were malformed; the ones in force
        stay (those of an end announcing none when nothing was agreed yet)."""
        self.remote_idx = idx
        if refused:
            if self.peer_announced is not None:
                return
            peer_timers = None
        self.peer_timers = peer_timers
        self.peer_announced = peer_timers is not None
        self.agreed = self.timers.agree(peer_timers)
        self._apply_lifetime()

    def peer_status(self) -> dict[str, Any] | None:
        """What the peer announced (`announced` false: nothing, the old fixed values are
        assumed), or None before its first `key`."""
        if self.peer_announced is None:
            return None
        shown = self.peer_timers if self.peer_timers is not None else LEGACY
        return {**shown.as_dict(), "announced": self.peer_announced}

    def _apply_lifetime(self) -> None:
        """The fast path refuses this peer's keys at the agreed age, the same at both ends;
        its own backstop asks for a rekey should the agreed one be late. A shorter limit
        applies to the newest key on, never to an older one still receiving (the fast path's
        rule)."""
        agreed = self.agreed
        self.fp.set_key_lifetime(
            self.peer_id, agreed.rekey_s + FP_REKEY_BACKSTOP_S, agreed.key_max_age_s
        )

    def on_key_ack(self, idx: object) -> None:
        if idx == self.pending_idx:
            self.pending_idx = None

    def activate(self) -> bool:
        """Transmit with the installed keys and the peer's index; True when this switched."""
        if self.local_idx is None or self.remote_idx is None:
            return False
        if self.activated == (self.local_idx, self.remote_idx):
            return False
        self.fp.key_activate(self.peer_id, self.local_idx, self.remote_idx)
        self.activated = (self.local_idx, self.remote_idx)
        return True

    def acknowledge(self, idx: int) -> None:
        self._send_msg({"t": "key-ack", "idx": idx})

    def _send_key(self) -> None:
        if self.pending_idx is None:
            return
        if self._sends >= self.resend_max:
            self.pending_idx = None
            self._on_unacknowledged()
            return
        self._sends += 1
        self._next_send = self.clock() + self.resend_s
        self._send_msg({"t": "key", "idx": self.pending_idx, **self.timers.announce()})
