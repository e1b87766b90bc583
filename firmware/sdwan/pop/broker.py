"""The PoP's punch broker: which pairs of site links should hold a direct tunnel, and the
`punch` messages that start each one (docs/mesh.md, "Punching").

Owns: the pairing of the account's off-cloud sites (every pair of sites with off-cloud on;
each site's enabled links in precedence order, matched first with first, second with
second), the candidates each side is told about (the public endpoint the PoP sees the
link's session come from, the link's own address when both sites share a public IP, an
operator's static endpoint), and per path a generation and a fresh 32-byte secret that
authenticate its probes. A path is punched again when its candidates change (a NAT rebound,
a site re-registered) or a site asks (its cached or punched endpoint stopped answering), at
most once per `min_repunch_s`.

How a punch is made (its `mode`): a new or changed path is punched with the port `window`
around the public ports. A site asks again when that found nothing; when exactly one side's
NAT randomises its ports (the class it registered, "port-randomising"), the next punches use
the `birthday` approach instead, telling that side it is the `hard` one (it opens many
sockets) and the other the `easy` one (it probes random ports of the hard side's address).
When both sides randomise, no punch can work; the sites say so in their status and wait.

It sends through a callable given by popd and holds no sessions itself.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sdwan.common.probe import SECRET_LEN
from sdwan.common.tomlcheck import format_endpoint

log = logging.getLogger("sdwan.pop.broker")

Addr = tuple[str, int]
DEFAULT_WINDOW = 32
MIN_REPUNCH_S = 2.0
# A request names the generation it gave up on; one naming an older generation than the one
# punched this recently crossed that punch (both sides ask when a punch fails) and is dropped,
# so that the second side's request does not restart the punch the first one's started.
STALE_REQUEST_S = 10.0
RANDOMISING = "port-randomising"  # the NAT class that draws a new port per destination


@dataclass(frozen=True)
class MeshLink:
    """One registered link of a site, as the broker needs it."""

    site_id: int
    link_id: int
    precedence: int
    public: Addr  # where the PoP sees this link's session come from
    epoch: float  # when the session registered: a new session is punched again
    offcloud: bool = True
    local: Addr | None = None
    static: Addr | None = None
    nat: str | None = None

    @property
    def enabled(self) -> bool:
        # Precedence 3 (last resort) never carries off-cloud traffic (SPEC 3.1).
        return self.offcloud and self.precedence < 3


PathKey = tuple[int, int, int, int]  # (higher site, its link, lower site, its link)


@dataclass
class _Path:
    gen: int
    secret: bytes
    signature: tuple[Any, ...]
    sent_at: float
    punches: int = 1
    pending: bool = False  # a request came in within min_repunch_s: punch when allowed
    asked: bool = False  # a site's request is among the deferred ones (see _punch)
    requests: int = 0
    mode: str = "window"
    hard: int | None = None  # in a birthday punch, the site id of the randomising side


@dataclass
class BrokerStats:
    punches: int = 0  # punch generations started
    messages: int = 0  # punch messages sent
    requests: int = 0
    requests_bad: int = 0  # for no known path of the asking site
    requests_deferred: int = 0
    requests_stale: int = 0  # naming a generation an answered request already replaced
    birthday: int = 0  # punches in birthday mode
    by_path: dict[str, int] = field(default_factory=dict)


def _candidates(me: MeshLink, other: MeshLink) -> list[dict[str, str]]:
    """What other is told to probe to reach me."""
    out = [{"how": "reflexive", "addr": format_endpoint(me.public)}]
    if me.local is not None and me.public[0] == other.public[0]:
        # Behind one public IP the NAT rarely hairpins; the link addresses may reach each other.
        out.append({"how": "local", "addr": format_endpoint(me.local)})
    if me.static is not None:
        out.append({"how": "static", "addr": format_endpoint(me.static)})
    return out


class Broker:
    def __init__(
        self,
        send: Callable[[int, int, dict[str, Any]], bool],
        clock: Callable[[], float] = time.monotonic,
        window: int = DEFAULT_WINDOW,
        min_repunch_s: float = MIN_REPUNCH_S,
    ) -> None:
        self.send = send  # (site id, link id, message) over that link's session
        self.clock = clock
        self.window = window
        self.min_repunch_s = min_repunch_s
        self.stats = BrokerStats()
        self.paths: dict[PathKey, _Path] = {}
        self._links: dict[PathKey, tuple[MeshLink, MeshLink]] = {}
        self._by_site: dict[int, list[MeshLink]] = {}  # as of the last update
        self._site_paths: dict[int, set[PathKey]] = {}  # the paths each site is in
        self._pending: set[PathKey] = set()  # deferred punches (see tick)
        # Generations are never reused within a run; a random start keeps a restarted PoP's
        # from meeting the ones sites still hold (their secrets differ anyway).
        self._gen = secrets.randbelow(1 << 30) + 1

    # ---------------------------------------------------------------- inputs

    def update(self, links: Iterable[MeshLink], offcloud_sites: Iterable[int]) -> None:
        """The registered links of every site now; punch what is new or changed. Only the
        pairs of sites whose links changed are looked at: with a thousand sites, one site's
        registration costs one pass over the others, not over every pair."""
        sites = set(offcloud_sites)
        by_site: dict[int, list[MeshLink]] = {}
        for ln in links:
            if ln.site_id in sites and ln.enabled:
                by_site.setdefault(ln.site_id, []).append(ln)
        for ls in by_site.values():
            ls.sort(key=lambda x: (x.precedence, x.link_id))
        changed = {
            sid for sid in by_site.keys() | self._by_site.keys()
            if by_site.get(sid) != self._by_site.get(sid)
        }
        if not changed:
            return
        self._by_site = by_site
        old: dict[PathKey, _Path] = {}
        for sid in changed:
            for key in self._site_paths.pop(sid, set()):
                path = self.paths.pop(key, None)
                if path is not None:
                    old[key] = path
                self._links.pop(key, None)
                other = key[2] if key[0] == sid else key[0]
                self._site_paths.get(other, set()).discard(key)
        now = self.clock()
        done: set[tuple[int, int]] = set()
        for sid in changed:
            for other in by_site if sid in by_site else ():
                if other == sid or (min(sid, other), max(sid, other)) in done:
                    continue
                done.add((min(sid, other), max(sid, other)))
                a, b = max(sid, other), min(sid, other)
                for la, lb in zip(by_site[a], by_site[b], strict=False):
                    key = (a, la.link_id, b, lb.link_id)
                    self._links[key] = (la, lb)
                    self._site_paths.setdefault(a, set()).add(key)
                    self._site_paths.setdefault(b, set()).add(key)
                    # The links themselves: their endpoints, epochs and classes make the
                    # candidates, so equal links mean an equal punch.
                    sig = (la, lb)
                    prev = old.get(key)
                    if prev is not None and prev.signature == sig:
                        self.paths[key] = prev
                    elif prev is not None and now - prev.sent_at < self.min_repunch_s:
                        # A site re-registering in a loop must not make every pair punch
                        # again each time: once per min_repunch_s, the latest candidates.
                        prev.signature = sig
                        self.paths[key] = prev
                        self._defer(key, prev)
                    else:
                        self._punch(key, sig, now, prev)

    def on_request(self, site_id: int, link_id: int, msg: dict[str, Any]) -> str | None:
        """A site asks for its path to msg["peer"] over link_id to be punched again; returns
        why the request was refused, or None."""
        peer = msg.get("peer")
        key = self._key(site_id, link_id, peer)
        if key is None:
            self.stats.requests_bad += 1
            return f"no path between site {site_id} link {link_id} and site {peer!r}"
        self.stats.requests += 1
        path = self.paths[key]
        path.requests += 1
        now = self.clock()
        gen = msg.get("gen")
        if (
            isinstance(gen, int)
            and not isinstance(gen, bool)
            and gen != path.gen
            and now - path.sent_at < STALE_REQUEST_S
        ):
            self.stats.requests_stale += 1
            return None
        if now - path.sent_at < self.min_repunch_s:
            self._defer(key, path, asked=True)
            self.stats.requests_deferred += 1
            return None
        self._punch(key, path.signature, now, path, asked=True)
        return None

    def tick(self) -> None:
        """Punch the deferred paths whose time has come (only those are looked at: the
        supervisor calls this every 50 ms, with half a million paths in a big account)."""
        if not self._pending:
            return
        now = self.clock()
        for key in list(self._pending):
            path = self.paths.get(key)
            if path is None or key not in self._links:
                self._pending.discard(key)
            elif now - path.sent_at >= self.min_repunch_s:
                self._pending.discard(key)
                self._punch(key, path.signature, now, path, asked=path.asked)

    def _defer(self, key: PathKey, path: _Path, asked: bool = False) -> None:
        path.pending = True
        path.asked = path.asked or asked
        self._pending.add(key)

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "punches": self.stats.punches,
            "messages": self.stats.messages,
            "requests": self.stats.requests,
            "requests_bad": self.stats.requests_bad,
            "requests_stale": self.stats.requests_stale,
            "birthday": self.stats.birthday,
            "paths": [
                {
                    "sites": [a, b],
                    "links": [la, lb],
                    "gen": p.gen,
                    "mode": p.mode,
                    "punches": p.punches,
                    "requests": p.requests,
                    "last_punch_s": round(now - p.sent_at, 1),
                }
                for (a, la, b, lb), p in sorted(self.paths.items())
            ],
        }

    # ---------------------------------------------------------------- internals

    def _key(self, site_id: int, link_id: int, peer: Any) -> PathKey | None:
        if isinstance(peer, bool) or not isinstance(peer, int):
            return None
        for key in self._site_paths.get(site_id, ()):
            a, la, b, lb = key
            if (a, la, b) == (site_id, link_id, peer) or (b, lb, a) == (site_id, link_id, peer):
                return key
        return None

    def _punch(
        self, key: PathKey, sig: tuple[Any, ...], now: float, old: _Path | None,
        asked: bool = False,
    ) -> None:
        """Punch the path anew; asked: a site asked, so the last punch found nothing."""
        la, lb = self._links[key]
        self._gen = self._gen % 0xFFFFFFFF + 1
        path = _Path(self._gen, secrets.token_bytes(SECRET_LEN), sig, now)
        if old is not None:
            path.punches, path.requests = old.punches + 1, old.requests
        randomising = [ln.site_id for ln in (la, lb) if ln.nat == RANDOMISING]
        if asked and len(randomising) == 1:
            # The window cannot find a port the NAT draws at random: open many and guess.
            path.mode, path.hard = "birthday", randomising[0]
            self.stats.birthday += 1
        self.paths[key] = path
        self._pending.discard(key)
        self.stats.punches += 1
        log.debug(
            "punch gen %d (%s): site %d link %d <-> site %d link %d",
            path.gen, path.mode, la.site_id, la.link_id, lb.site_id, lb.link_id,
        )
        # The higher site id initiates (SPEC 3.3); key[0] is always the higher one.
        for me, other, initiator in ((la, lb, True), (lb, la, False)):
            msg = {
                "t": "punch",
                "peer": other.site_id,
                "link": me.link_id,
                "peer_link": other.link_id,
                "gen": path.gen,
                "secret": path.secret.hex(),
                "initiator": initiator,
                "window": self.window,
                "candidates": _candidates(other, me),
                "peer_nat": other.nat,
                "mode": path.mode,
            }
            if path.hard is not None:
                msg["role"] = "hard" if me.site_id == path.hard else "easy"
            if self.send(me.site_id, me.link_id, msg):
                self.stats.messages += 1
