"""The key lifetime both ends of a session agree on: the rekey interval and the key-age limit
(docs/security.md, "Key lifetimes"; docs/tunnel.md, "Agreed timers").

Each end announces its own values in every `key` message of the hand-over
({"t": "key", "idx": N, "rekey_s": R, "key_max_age_s": A}); both then compute the same pair
from the two (`KeyTimers.agree`):

* the rekey interval is the smaller of the two, but never below `PROTOCOL_REKEY_MIN_S` unless
  both ends are configured below it (a lab): a peer cannot drag an end into rekeying every
  few seconds;
* the key-age limit is the smaller of the two, raised where needed to the agreed interval plus
  `HANDSHAKE_MARGIN_S`, so no key ages out before the agreed rekey has replaced it.

Announced values are read leniently (`announced_timers`): any positive number, clamped into
the range an end accepts (a value above ours is harmless: the smaller wins). An end that
announces nothing predates the agreement and keeps its old fixed timers whatever we say
(`LEGACY`, 600 s and 900 s): the interval is agreed with those, and the key-age limit is its
900 s, so neither its keys nor ours age out before its own or our rekey.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# A rekey is a handshake (up to 10 s, then retries 1 s to 8 s apart) and a hand-over (up to
# 10 s of `key` resends): the old key must keep working that long after the rekey is due.
HANDSHAKE_MARGIN_S = 60
REKEY_MIN_S = 10  # a site's own config (lab values below the protocol floor)
# The floor of an agreed interval: a peer's shorter one is raised to it (docs/security.md).
PROTOCOL_REKEY_MIN_S = 60
POP_REKEY_MIN_S = PROTOCOL_REKEY_MIN_S  # popd's config: it serves many sites
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
        """What both ends use (the same whichever end computes it): the smaller interval, not
        below the protocol floor unless both are; the smaller key-age limit, at least the
        agreed interval plus the margin. `peer` None: an end that announced none (`LEGACY`)."""
        if peer is None:
            rekey = agreed_rekey(self.rekey_s, LEGACY.rekey_s)
            # It does not follow the agreement: it rekeys (and refuses keys) on its own.
            return KeyTimers(rekey, max(LEGACY.key_max_age_s, rekey + HANDSHAKE_MARGIN_S))
        rekey = agreed_rekey(self.rekey_s, peer.rekey_s)
        age = max(min(self.key_max_age_s, peer.key_max_age_s), rekey + HANDSHAKE_MARGIN_S)
        return KeyTimers(rekey, age)

    def as_dict(self) -> dict[str, int]:
        return {"rekey_s": self.rekey_s, "key_max_age_s": self.key_max_age_s}


# What an end that announces no timers (firmware from before the agreement) uses: a 600 s
# interval, and keys refused at 900 s (the fast path's old fixed limit, popd's too).
LEGACY = KeyTimers(600, 900)


def agreed_rekey(r1: int, r2: int) -> int:
    """The agreed interval of two: the smaller, raised to the protocol floor unless both are
    below it (then the larger of the two). Symmetric, so both ends get the same."""
    return max(min(r1, r2), min(PROTOCOL_REKEY_MIN_S, max(r1, r2)))


def _seconds(msg: dict[str, Any], name: str, high: int) -> int:
    v = msg[name]
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {v!r}")
    # Above our range is harmless (the smaller wins): clamped; a fraction rounds up.
    return high if v >= high else math.ceil(v)


def announced_timers(msg: dict[str, Any]) -> KeyTimers | None:
    """The timers a peer announced in its `key` message: None when it announced none (an end
    that predates the agreement: `LEGACY`). Any positive numbers are taken, clamped into our
    range and made a pair that works (the key-age limit at least the interval plus the
    margin); one without the other, or a value that is not a positive number, raises
    ValueError."""
    has = [name in msg for name in ("rekey_s", "key_max_age_s")]
    if not any(has):
        return None
    if not all(has):
        raise ValueError("rekey_s and key_max_age_s come together")
    rekey = _seconds(msg, "rekey_s", REKEY_MAX_S)
    age = _seconds(msg, "key_max_age_s", KEY_MAX_AGE_MAX_S)
    return KeyTimers(rekey, max(age, rekey + HANDSHAKE_MARGIN_S))
