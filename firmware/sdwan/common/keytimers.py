"""The key lifetime both ends of a session agree on: the rekey interval and the key-age limit
(docs/security.md, "Key lifetimes"; docs/tunnel.md, "Agreed timers").

Each end announces its own values in every `key` message of the hand-over
({"t": "key", "idx": N, "rekey_s": R, "key_max_age_s": A}); both then use the smaller rekey
interval and the smaller key-age limit. Every end checks its own values at start
(`check_timers`: the key must outlive its rekey by `HANDSHAKE_MARGIN_S`), and refuses a peer's
that break the same rule, so the agreed pair always satisfies it too: min(A1, A2) >=
min(R1, R2) + margin whenever A1 >= R1 + margin and A2 >= R2 + margin. An end's fast path
refuses a key at its own limit, which is never below the agreed one, so no key ages out
before the agreed rekey has replaced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A rekey is a handshake (up to 10 s, then retries 1 s to 8 s apart) and a hand-over (up to
# 10 s of `key` resends): the old key must keep working that long after the rekey is due.
HANDSHAKE_MARGIN_S = 60
REKEY_MIN_S = 10
REKEY_MAX_S = 86400
KEY_MAX_AGE_MAX_S = 2 * REKEY_MAX_S + HANDSHAKE_MARGIN_S
# The fast path asks for a rekey this long after the interval: Python rekeys on time, this is
# the backstop should its timer be late.
FP_REKEY_BACKSTOP_S = 30


def default_key_max_age(rekey_s: int) -> int:
    """The key-age limit when none is configured: twice the interval plus the margin, so a
    rekey that fails once is retried long before the key ages out."""
    return 2 * rekey_s + HANDSHAKE_MARGIN_S


def timers_problem(rekey_s: int, key_max_age_s: int) -> str | None:
    """Why this pair cannot work, or None."""
    if key_max_age_s < rekey_s + HANDSHAKE_MARGIN_S:
        return (
            f"a key must last its rekey interval plus {HANDSHAKE_MARGIN_S} s for the handshake:"
            f" key_max_age_s {key_max_age_s} is below rekey_s {rekey_s} +"
            f" {HANDSHAKE_MARGIN_S} (rekey_s at most {key_max_age_s - HANDSHAKE_MARGIN_S},"
            f" or key_max_age_s at least {rekey_s + HANDSHAKE_MARGIN_S})"
        )
    return None


@dataclass(frozen=True, slots=True)
class KeyTimers:
    """One end's (or the agreed) rekey interval and key-age limit, in seconds."""

    rekey_s: int = 600
    key_max_age_s: int = 900

    def __post_init__(self) -> None:
        problem = timers_problem(self.rekey_s, self.key_max_age_s)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def for_rekey(cls, rekey_s: int, key_max_age_s: int | None = None) -> KeyTimers:
        age = default_key_max_age(rekey_s) if key_max_age_s is None else key_max_age_s
        return cls(rekey_s, age)

    def announce(self) -> dict[str, int]:
        """The fields this end adds to its `key` messages."""
        return {"rekey_s": self.rekey_s, "key_max_age_s": self.key_max_age_s}

    def agree(self, peer: KeyTimers | None) -> KeyTimers:
        """What both ends use: the smaller of each (ours alone when the peer announced none)."""
        if peer is None:
            return self
        return KeyTimers(
            min(self.rekey_s, peer.rekey_s), min(self.key_max_age_s, peer.key_max_age_s)
        )

    def as_dict(self) -> dict[str, int]:
        return {"rekey_s": self.rekey_s, "key_max_age_s": self.key_max_age_s}


def _seconds(msg: dict[str, Any], name: str, low: int, high: int) -> int:
    v = msg[name]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ValueError(f"{name}: expected an integer {low}..{high}, got {v!r}")
    return v


def announced_timers(msg: dict[str, Any]) -> KeyTimers | None:
    """The timers a peer announced in its `key` message: None when it announced none (an end
    that predates the agreement: ours stay in force). A message with one of the two, a value
    out of range or a pair that cannot work raises ValueError (the message is refused)."""
    has = [name in msg for name in ("rekey_s", "key_max_age_s")]
    if not any(has):
        return None
    if not all(has):
        raise ValueError("rekey_s and key_max_age_s come together")
    rekey = _seconds(msg, "rekey_s", REKEY_MIN_S, REKEY_MAX_S)
    age = _seconds(msg, "key_max_age_s", REKEY_MIN_S + HANDSHAKE_MARGIN_S, KEY_MAX_AGE_MAX_S)
    return KeyTimers(rekey, age)  # ValueError when the pair cannot work
