"""The sources the fast path's control gate treats as known (docs/dataplane.md, "Control
queue"): their control datagrams take a lane of their own that a flood from strangers
cannot fill, unmetered. The endpoints of the fast path's peers are known there without us;
this declares the rest: addresses we are talking to before they are a peer (a handshake in
progress, the PoPs, the STUN servers, static peers' configured endpoints) and the hosts a
mesh punch expects probes from (every port: port 0).

Each provider is a callable returning addresses; the set is sent to C only when it changed,
and is bounded by the fast path's limit (the rest is left to the unknown lane, logged)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sdwan.bindings.fastpath import CTRL_KNOWN_MAX, Addr, FastPath, FastPathError

log = logging.getLogger("sdwan.ctrlknown")

Provider = Callable[[], Iterable[Addr]]


@dataclass
class KnownSources:
    fp: FastPath
    providers: list[Provider] = field(default_factory=list)
    _last: frozenset[Addr] | None = None
    _sent: frozenset[Addr] = frozenset()  # of _last, what the fast path took (all valid)
    updates: int = 0  # sets sent to the fast path

    def add(self, provider: Provider) -> None:
        self.providers.append(provider)

    def refresh(self) -> bool:
        """Gather the providers' addresses; send them when they changed. True if sent."""
        known: set[Addr] = set()
        for p in self.providers:
            try:
                known.update(a for a in p() if a is not None)
            except Exception:
                log.exception("a provider of known control sources failed")
        now = frozenset(known)
        if now == self._last:
            return False
        # One address the fast path cannot take would refuse the whole set (and leave the
        # last one in place for good): it alone is left out. Only what was not sent before is
        # checked: the refresh must stay cheap.
        bad = {a for a in now - self._sent if not _valid(a)}
        if bad:
            log.warning("not a known control source (ignored): %s", sorted(map(repr, bad))[:5])
        addrs = sorted(now - bad)
        if len(addrs) > CTRL_KNOWN_MAX:
            log.warning(
                "%d known control sources, the fast path takes %d: the rest are rate-limited",
                len(addrs),
                CTRL_KNOWN_MAX,
            )
            addrs = addrs[:CTRL_KNOWN_MAX]
        try:
            self.fp.ctrl_known_set(addrs)
        except (FastPathError, ValueError) as e:
            log.error("known control sources not declared: %s", e)
            return False
        self._last = now
        self._sent = now - bad
        self.updates += 1
        return True


def _valid(a: object) -> bool:
    """An (IP literal, port 0..65535) pair, as fp_ctrl_known_set takes it."""
    if not isinstance(a, tuple) or len(a) != 2:
        return False
    host, port = a
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return 0 <= port <= 65535
