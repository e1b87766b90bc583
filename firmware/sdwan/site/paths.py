"""Which peer and which transport carries each prefix: the one owner of the socket's routes.

Owns, per docs/paths.md: the candidates every producer submits (static peers, the cloud
directory, the mesh, Alt-WAN), the local prefixes that never go into a tunnel, the policy
that picks one candidate per prefix, the fast path's prefix table (changed nowhere else, only
by differences, in one batch call) with, per prefix, the two peers the off-cloud transport
rules may send to instead (the usable off-cloud path and the cloud path), and the set of
prefixes the kernel must route into the TUN device, handed to the supervisor whenever it
changes (the supervisor applies it off the loop).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sdwan.bindings.fastpath import ROUTE_PEER_NOT_SECONDARY, FastPath, FastPathError, Network

log = logging.getLogger("sdwan.site.paths")


class Transport(StrEnum):
    DIRECT = "direct"  # a statically configured peer
    CLOUD = "cloud"  # through the PoP session the cloud picked
    MESH = "mesh"  # a punched site-to-site tunnel
    ALT_WAN = "alt-wan"  # a private (MPLS-like) link


class Policy(StrEnum):
    NORMAL = "normal"
    CLOUD_LOST = "cloud_lost"


# Transports in the order a policy prefers them. Under NORMAL the cloud carries what no
# static peer does (the spec's default); with the cloud lost, Alt-WAN first, then the mesh
# (WAN recovery), and the cloud's candidates only if nothing else reaches a prefix. The
# per-site recovery sets move a site's Alt-WAN and mesh candidates across the cloud's
# (Paths._rank); otherwise these orders hold.
RANKS: dict[Policy, tuple[Transport, ...]] = {
    Policy.NORMAL: (Transport.DIRECT, Transport.CLOUD, Transport.ALT_WAN, Transport.MESH),
    Policy.CLOUD_LOST: (Transport.DIRECT, Transport.ALT_WAN, Transport.MESH, Transport.CLOUD),
}


@dataclass(frozen=True)
class Candidate:
    """One way to reach a prefix. A lower preference wins among candidates of one transport."""

    prefix: Network
    peer_id: int  # fast-path peer id
    transport: Transport
    preference: int = 0
    # A mesh or Alt-WAN tunnel whose path went silent under traffic a short while ago (its
    # owner's hold): not trusted with traffic the cloud can carry, but better than nothing
    # while the cloud cannot reach its site (WAN recovery); a held Alt-WAN tunnel ranks after
    # the mesh then.
    held: bool = False
    # The remote site the candidate leads to, which WAN recovery's per-site sets are keyed
    # by; None means the peer id (a mesh tunnel's peer id is its site id). Alt-WAN
    # tunnels have peer ids of their own (site/altwan.py) and say their site here.
    site: int | None = None

    def __post_init__(self) -> None:
        # Strict: a prefix with host bits set is the producer's mistake, as for the fast path.
        object.__setattr__(self, "prefix", ipaddress.ip_network(self.prefix))
        object.__setattr__(self, "transport", Transport(self.transport))
        if self.site is None:
            object.__setattr__(self, "site", self.peer_id)


Entry = tuple[int, int, int, int]  # a route as the fast path holds it: Choice.entry


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    producer: str
    why: str
    # For the transport rules (docs/paths.md, "Off-cloud transport rules"), 0 = none: the
    # prefix's usable off-cloud path (its mesh tunnel, or the direct peer chosen) and its
    # cloud path (none under cloud_lost).
    offcloud_peer: int = 0
    cloud_peer: int = 0

    @property
    def entry(self) -> Entry:
        """What the fast path's route holds: (peer, offcloud_peer, cloud_peer, flags). An
        Alt-WAN tunnel is never an off-cloud rule's secondary: with its peer chosen, a rule's
        `automatic` secondary takes the cloud path instead (docs/paths.md)."""
        flags = ROUTE_PEER_NOT_SECONDARY if self.candidate.transport is Transport.ALT_WAN else 0
        return (self.candidate.peer_id, self.offcloud_peer, self.cloud_peer, flags)


@dataclass(frozen=True)
class Unused:
    candidate: Candidate
    producer: str
    reason: str


# Per-rule overrides (off-cloud transport rules) plug in here: given a prefix, its usable
# candidates in the policy's order and the policy, return the one to use, or None to keep the
# policy's pick. Local and direct prefixes are protected before the hook sees anything.
Override = Callable[[Network, Sequence[Candidate], Policy], Candidate | None]


def _overlapping(net: Network, among: Iterable[Network]) -> Network | None:
    return next((p for p in among if p.version == net.version and net.overlaps(p)), None)


@dataclass
class _Failure:
    op: str
    error: str


class Paths:
    """The candidates, the policy and what the fast path has installed."""

    def __init__(
        self,
        fp: FastPath,
        local: Iterable[Network | str] = (),
        on_tun_routes: Callable[[list[str]], None] | None = None,
        policy: Policy = Policy.NORMAL,
    ) -> None:
        self.fp = fp
        self.local = tuple(ipaddress.ip_network(p) for p in local)
        self.on_tun_routes = on_tun_routes
        self.policy = Policy(policy)
        # WAN recovery per remote site (site/recovery.py), by site id (Candidate.site): sites
        # the cloud cannot reach (their Alt-WAN and mesh candidates rank before the cloud
        # under either policy), and sites with recovery disabled (never moved onto Alt-WAN or
        # the mesh by recovery: under cloud_lost those candidates rank after the cloud's).
        self.lost_peers: frozenset[int] = frozenset()
        self.no_recovery: frozenset[int] = frozenset()
        self.override: Override | None = None
        self._override_why = "per-rule override"
        self.batches = 0  # batch calls made, for status
        self._sets: dict[str, tuple[Candidate, ...]] = {}  # by producer, in submission order
        # What the fast path has, as far as we know: Choice.entry.
        self._installed: dict[Network, Entry] = {}
        self._chosen: dict[Network, Choice] = {}
        self._unused: list[Unused] = []
        self._tun: tuple[str, ...] = ()
        self._failures: dict[Network, _Failure] = {}
        self._dirty = False

    # ---------------------------------------------------------------- inputs

    def submit(self, producer: str, candidates: Iterable[Candidate]) -> None:
        """Replace producer's whole set of candidates (an empty one withdraws it) and apply."""
        new = tuple(dict.fromkeys(candidates))
        if self._sets.get(producer, ()) != new:
            if new:
                self._sets[producer] = new
            else:
                self._sets.pop(producer, None)
            self._dirty = True
        self.apply()

    def withdraw(self, producer: str) -> None:
        self.submit(producer, ())

    def set_policy(
        self,
        policy: Policy,
        lost_peers: Iterable[int] | None = None,
        no_recovery: Iterable[int] | None = None,
    ) -> None:
        """Switch the policy and, where given, the per-site recovery sets, in one batch."""
        policy = Policy(policy)
        if policy is not self.policy:
            log.info("route policy %s -> %s", self.policy, policy)
            self.policy = policy
            self._dirty = True
        for name, given in (("lost_peers", lost_peers), ("no_recovery", no_recovery)):
            if given is not None and frozenset(given) != getattr(self, name):
                setattr(self, name, frozenset(given))
                self._dirty = True
        self.apply()

    def set_override(self, override: Override | None, why: str = "per-rule override") -> None:
        """Install the override hook; why is what `routes` says of a prefix it decided."""
        self.override = override
        self._override_why = why
        self._dirty = True
        self.apply()

    def forget_peer(self, peer_id: int) -> None:
        """The fast path dropped peer_id and with it its routes (fp_peer_del): what it still
        has is no longer what we installed, so whatever is chosen for it is set again."""
        # Routes naming it for the rules only keep their peer, without it (table.c).
        gone = [p for p, entry in self._installed.items() if peer_id in entry[:3]]
        for p in gone:
            del self._installed[p]
        if gone:
            self._dirty = True

    # ---------------------------------------------------------------- the choice

    def _recovering(self, site: int | None) -> bool:
        """Whether WAN recovery moves that site's prefixes off the cloud now."""
        if site in self.no_recovery:
            return False
        return self.policy is Policy.CLOUD_LOST or site in self.lost_peers

    @staticmethod
    def _rank(c: Candidate, recovering: bool) -> tuple[int, int]:
        """The sort key of a candidate: direct first; then, for a site WAN recovery moves off
        the cloud, Alt-WAN, the mesh and a held Alt-WAN tunnel before the cloud, else the
        cloud before them. With every site following the policy this is RANKS' order."""
        t = c.transport
        if t is Transport.DIRECT:
            return (0, 0)
        if t is Transport.CLOUD:
            return (2, 0)
        sub = 1 if t is Transport.MESH else 2 if c.held else 0
        return (1 if recovering else 3, sub)

    def _moved(self, c: Candidate) -> bool:
        """Whether a site's recovery set (not the policy) put c where it ranks."""
        return c.transport in (Transport.ALT_WAN, Transport.MESH) and (
            self._recovering(c.site) != (self.policy is Policy.CLOUD_LOST)
        )

    def _choose(self) -> tuple[dict[Network, Choice], list[Unused]]:
        # Sorted, so that the reason given for an unused candidate does not vary between runs.
        direct = sorted(
            {
                c.prefix
                for cands in self._sets.values()
                for c in cands
                if c.transport is Transport.DIRECT
            },
            key=_order,
        )
        by_prefix: dict[Network, list[tuple[str, Candidate]]] = {}
        for producer, cands in self._sets.items():
            for c in cands:
                by_prefix.setdefault(c.prefix, []).append((producer, c))
        chosen: dict[Network, Choice] = {}
        unused: list[Unused] = []
        for prefix, entries in by_prefix.items():
            usable: list[tuple[str, Candidate]] = []
            local = _overlapping(prefix, self.local)
            static = None if local is not None else _overlapping(prefix, direct)
            for producer, c in entries:
                if local is not None:
                    unused.append(Unused(c, producer, f"overlaps the local prefix {local}"))
                elif c.transport is not Transport.DIRECT and static is not None:
                    unused.append(Unused(c, producer, f"overlaps {static} of a direct peer"))
                elif c.held and not self._recovering(c.site):
                    unused.append(Unused(c, producer, "held off after its path went silent "
                                         "(used only while the cloud cannot reach the site)"))
                else:
                    usable.append((producer, c))
            if not usable:
                continue
            usable.sort(key=lambda e: (
                self._rank(e[1], self._recovering(e[1].site)), e[1].preference, e[0],
                e[1].peer_id,
            ))
            producer, pick = usable[0]
            why = self._why(usable)
            if self.override is not None:
                wanted = self.override(prefix, [c for _, c in usable], self.policy)
                match = next((e for e in usable if e[1] == wanted), None)
                if wanted is not None and match is None:
                    log.error("route override for %s chose an unusable candidate", prefix)
                elif match is not None and match[1] != pick:
                    producer, pick = match
                    why = self._override_why
            chosen[prefix] = Choice(pick, producer, why, *self._rule_peers(usable, pick))
            for p, c in usable:
                if c is not pick:
                    unused.append(Unused(c, p, f"{pick.transport} via {producer} chosen"))
        return chosen, unused

    def _rule_peers(self, usable: list[tuple[str, Candidate]], pick: Candidate) -> tuple[int, int]:
        """The transport rules' two peers for a prefix, from its usable candidates (best
        first): its off-cloud path is its best mesh candidate (the mesh submits one only
        while the tunnel is up; a held one is usable only while recovery wants it), or the
        direct peer when one is chosen (a static tunnel is off the cloud already), never an
        Alt-WAN tunnel; its cloud path is its best cloud candidate, except where the cloud is
        what is missing: under cloud_lost, and for a site the cloud cannot reach (lost_peers,
        known by its Alt-WAN or mesh candidates' site)."""
        mesh = [c.peer_id for _, c in usable if c.transport is Transport.MESH]
        offcloud = mesh[0] if mesh else 0
        if not offcloud and pick.transport is Transport.DIRECT:
            offcloud = pick.peer_id
        sites = {c.site for _, c in usable if c.transport in (Transport.MESH, Transport.ALT_WAN)}
        cloud = 0
        if self.policy is not Policy.CLOUD_LOST and not self.lost_peers.intersection(sites):
            cloud = next((c.peer_id for _, c in usable if c.transport is Transport.CLOUD), 0)
        return offcloud, cloud

    def _why(self, usable: list[tuple[str, Candidate]]) -> str:
        if len(usable) == 1:
            return "only usable candidate"
        best, second = usable[0][1], usable[1][1]
        if best.transport is not second.transport:
            if self._moved(best):
                return f"site {best.site} is not reachable through the cloud (WAN recovery)"
            if self._moved(second):
                return f"site {second.site} has WAN recovery disabled"
            if second.held and second.transport is Transport.ALT_WAN:
                return "its Alt-WAN tunnel is held off after its path went silent"
            return f"{best.transport} ranks before {second.transport} under policy {self.policy}"
        if best.preference != second.preference:
            return f"preference {best.preference} beats {second.preference}"
        return "equal candidates: first producer, lowest peer id"

    # ---------------------------------------------------------------- the fast path

    @property
    def dirty(self) -> bool:
        """Whether the next apply() has something to choose or retry."""
        return self._dirty

    def apply(self) -> None:
        """Choose, then change only what differs in the fast path, in one batch call."""
        if not self._dirty:
            return
        self._dirty = False
        self._chosen, self._unused = self._choose()
        want = {p: ch.entry for p, ch in self._chosen.items()}
        sets = [(p, entry) for p, entry in want.items() if self._installed.get(p) != entry]
        dels = [p for p in self._installed if p not in want]
        if sets or dels:
            self._push(sets, dels)
        tun = tuple(sorted(str(p) for p in want))
        if tun != self._tun:
            self._tun = tun
            if self.on_tun_routes is not None:
                self.on_tun_routes(list(tun))

    def _push(self, sets: list[tuple[Network, Entry]], dels: list[Network]) -> None:
        self.batches += 1
        try:
            self.fp.route_batch([(p, *entry) for p, entry in sets], dels)
        except FastPathError as e:
            # One bad route (a peer that is gone) must not hold back all the others: find it
            # one route at a time, and try it again at the next apply.
            log.debug("route batch (%d set, %d del) failed: %s", len(sets), len(dels), e)
            self._push_each(sets, dels)
            return
        for p, entry in sets:
            self._installed[p] = entry
            self._failures.pop(p, None)
        for p in dels:
            del self._installed[p]
            self._failures.pop(p, None)

    def _push_each(
        self, sets: list[tuple[Network, Entry]], dels: list[Network]) -> None:
        for p, entry in sets:
            self.batches += 1
            try:
                self.fp.route_batch([(p, *entry)], [])
            except FastPathError as e:
                pid, off, cloud, _flags = entry
                self._failed(p, f"set to peer {pid:#x} (offcloud {off:#x}, cloud {cloud:#x})", e)
            else:
                self._installed[p] = entry
                self._failures.pop(p, None)
        for p in dels:
            self.batches += 1
            try:
                self.fp.route_batch([], [p])
            except FastPathError as e:
                if e.errno != errno.ENOENT:  # already gone is what we wanted
                    self._failed(p, "delete", e)
                    continue
            del self._installed[p]
            self._failures.pop(p, None)

    def _failed(self, prefix: Network, op: str, e: FastPathError) -> None:
        self._dirty = True
        failure = _Failure(op, str(e))
        if self._failures.get(prefix) != failure:  # once, not at every retry
            log.warning("route %s (%s) not applied: %s", prefix, op, e)
        self._failures[prefix] = failure

    # ---------------------------------------------------------------- read-back

    @property
    def tun_routes(self) -> list[str]:
        """The prefixes the kernel must route into the TUN device."""
        return list(self._tun)

    def chosen(self) -> dict[Network, Choice]:
        return dict(self._chosen)

    def status(self) -> dict[str, Any]:
        def row(c: Candidate, producer: str) -> dict[str, Any]:
            return {
                "prefix": str(c.prefix),
                "peer_id": c.peer_id,
                "transport": str(c.transport),
                "producer": producer,
            }

        return {
            "policy": str(self.policy),
            "lost_sites": sorted(self.lost_peers),
            "no_recovery_sites": sorted(self.no_recovery),
            "routes": [
                {
                    **row(ch.candidate, ch.producer),
                    "why": ch.why,
                    "installed": self._installed.get(p) == ch.entry,
                    "offcloud_peer": ch.offcloud_peer or None,
                    "cloud_peer": ch.cloud_peer or None,
                }
                for p, ch in sorted(self._chosen.items(), key=lambda i: _order(i[0]))
            ],
            "unused": [
                {**row(u.candidate, u.producer), "reason": u.reason}
                for u in sorted(self._unused, key=lambda u: _order(u.candidate.prefix))
            ],
            "batches": self.batches,
        }


def _order(net: Network) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)
