"""Token buckets for what popd rations per site and per source: uploaded events
(pop/eventsink.py) and registrations (docs/popd.md, "Registration rate").

A bucket holds up to `burst` tokens and gains `per_minute` a minute; `take(n)` grants what is
there. Buckets are made on first use and forgotten once full again (a site that stays within
its rate costs nothing to remember).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    per_minute: int
    burst: int
    tokens: float
    at: float

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.per_minute / 60)
        self.at = now

    def take(self, n: int, now: float) -> int:
        """How many of n are granted (taken from the bucket)."""
        self.refill(now)
        granted = min(n, int(self.tokens))
        self.tokens -= granted
        return granted


@dataclass
class Buckets:
    """One bucket per key (a site id, a source address)."""

    per_minute: int
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[Hashable, TokenBucket] = field(default_factory=dict)
    _swept_at: float = 0.0

    def take(self, key: Hashable, n: int = 1) -> int:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            b = TokenBucket(self.per_minute, self.burst, float(self.burst), now)
            self._buckets[key] = b
        granted = b.take(n, now)
        if now - self._swept_at > 60:
            self._sweep(now)
        return granted

    def allow(self, key: Hashable) -> bool:
        return self.take(key, 1) == 1

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        for key, b in list(self._buckets.items()):
            b.refill(now)
            if b.tokens >= b.burst:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
