"""Which WAN links carry traffic, and how much of it each: from the links' health
(site/health.py), their precedence and their bandwidth, one set of weights for the cloud's traffic
and one for the off-cloud (mesh) traffic. The cloud and the mesh read them (`weights`) and
`generation` tells them when to read again; nothing else decides which link traffic takes.

The rules (docs/links.md, "Steering"):

* Links rank healthy before degraded before down, then by precedence. The links of the best
  rank carry the traffic, sharing it per flow in proportion to their `bandwidth_mbps` (links of
  one precedence are active/active; precedence 2 is the passive link of precedence 1).
* Precedence 3 is the last resort: it carries cloud traffic only while no precedence 1 or 2
  link works (up, even degraded), and never off-cloud traffic. Neither does a link with
  `offcloud = false`, nor an Alt-WAN link (its tunnels are steered by WAN recovery).
* Moving away is immediate from a link that is down, gradual from one that is degraded: a
  fifth of its share moves at once, the rest in `RAMP_STEPS` steps over `[wan] ramp_s`.
* Moving back waits: a link not carrying traffic gains it only once it has been healthy (or,
  to displace a last-resort link, working) for `[wan] return_hold_s`, so a link that flaps
  every 2 s takes traffic back once, after it stops. With nothing else working, any link that
  works is used at once.

Each change of the links in use is an event (`link.moved`) saying from where to where and why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sdwan.site.config import Wan
from sdwan.site.health import Health, LinkHealthState
from sdwan.site.links import LinkManager, WanLink

log = logging.getLogger("sdwan.site.steering")

RAMP_STEPS = 4
WEIGHT_SCALE = 1000  # the fast path's weights are integers; shares are kept to 0.1 %

HEALTHY, DEGRADED, DOWN = 0, 1, 2


class Kind(StrEnum):
    CLOUD = "cloud"
    OFFCLOUD = "offcloud"


Weights = dict[int, int]  # link id -> weight


@dataclass
class _Ramp:
    source: Weights
    target: Weights
    started: float


@dataclass
class _Choice:
    current: Weights  # the links in use (the ramp's target while one runs)
    ramp: _Ramp | None = None
    moved_at: float | None = None
    why: str = "start"


Event = Callable[[str, str, dict[str, Any]], None]


class Steering:
    """The links in use per kind of traffic (see the module docstring)."""

    def __init__(
        self,
        links: LinkManager,
        health: Health,
        cfg: Wan,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Event | None = None,
    ) -> None:
        self.links = links
        self.health = health
        self.cfg = cfg
        self.clock = clock
        self.on_event = on_event or (lambda _k, _t, _d: None)
        self._choices: dict[Kind, _Choice] = {k: _Choice({}) for k in Kind}
        self._out: dict[Kind, tuple[tuple[int, int], ...]] = {k: () for k in Kind}
        # Bumped whenever any kind's weights change; `generations[kind]` only with its own.
        self.generation = 0
        self.generations: dict[Kind, int] = {k: 0 for k in Kind}
        self.tick()

    # ---------------------------------------------------------------- reading

    def weights(self, kind: Kind) -> tuple[tuple[int, int], ...]:
        """(link id, weight > 0) of the links `kind` traffic uses now, heaviest first; empty
        when no link may carry it."""
        return self._out[kind]

    def preferred(self, kind: Kind) -> list[int]:
        """The links in use, heaviest first."""
        return [lid for lid, _ in self._out[kind]]

    def status(self) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {}
        for kind, ch in self._choices.items():
            out[str(kind)] = {
                "links": {self.links[lid].name: w for lid, w in self._out[kind]},
                "ramping": ch.ramp is not None,
                "why": ch.why,
                "moved_s": None if ch.moved_at is None else round(now - ch.moved_at, 1),
            }
        return out

    # ---------------------------------------------------------------- deciding

    def _eligible(self, kind: Kind) -> list[WanLink]:
        return [
            wl for wl in self.links
            if not wl.altwan and (kind is Kind.CLOUD or (wl.link.offcloud and wl.main))
        ]

    def _tier(self, wl: WanLink) -> int:
        st = self.health.state(wl.id)
        return {LinkHealthState.UP: HEALTHY, LinkHealthState.DEGRADED: DEGRADED}.get(st, DOWN)

    def _gaining_tier(self, wl: WanLink, now: float) -> int:
        """A link not in use counts as healthy only once healthy for the hold, and as working
        only once working for it."""
        h = self.health.get(wl.id)
        if h is None:
            return DOWN
        hold = self.cfg.return_hold_s
        if h.healthy_since is not None and now - h.healthy_since >= hold:
            return HEALTHY
        if h.working_since is not None and now - h.working_since >= hold:
            return DEGRADED
        return DOWN

    def _desired(self, kind: Kind, ch: _Choice, now: float) -> Weights:
        eligible = self._eligible(kind)
        in_use = set(ch.current)
        # Nothing in use works: any link that works now is better at once.
        stuck = not any(self._tier(wl) < DOWN for wl in eligible if wl.id in in_use)
        tiers: dict[int, int] = {}
        for wl in eligible:
            if wl.id in in_use or stuck:
                tiers[wl.id] = self._tier(wl)
            else:
                tiers[wl.id] = self._gaining_tier(wl, now)
        mains_work = any(tiers[wl.id] < DOWN for wl in eligible if wl.precedence <= 2)
        cands = [wl for wl in eligible if wl.precedence <= 2 or not mains_work]
        if not cands:
            return {}
        best = min((tiers[wl.id], wl.precedence) for wl in cands)
        if best[0] == DOWN:
            # Nothing works: keep what is in use (nothing to gain from moving), or name the
            # best-ranked link so traffic flows the moment it comes back.
            kept = {lid: w for lid, w in ch.current.items() if lid in tiers}
            if kept:
                return kept
            first = min(cands, key=lambda wl: (wl.precedence, wl.id))
            return {first.id: first.link.bandwidth_mbps}
        return {
            wl.id: wl.link.bandwidth_mbps for wl in cands
            if (tiers[wl.id], wl.precedence) == best
        }

    def tick(self) -> None:
        now = self.clock()
        for kind, ch in self._choices.items():
            self._decide(kind, ch, now)
            out = self._output(ch, now)
            if out != self._out[kind]:
                self._out[kind] = out
                self.generation += 1
                self.generations[kind] += 1

    def _decide(self, kind: Kind, ch: _Choice, now: float) -> None:
        if ch.ramp is not None and all(
            self._tier(self.links[lid]) == DOWN for lid in ch.ramp.source
        ):
            ch.ramp = None  # what it left is dead now: the rest moves at once
        desired = self._desired(kind, ch, now)
        if desired == ch.current:
            return
        old = ch.current
        left = [lid for lid in old if lid not in desired]
        new_tiers = [self._tier(self.links[lid]) for lid in desired]
        why = self._why(old, desired)
        # Gradual when what loses traffic is degraded, not dead (whatever keeps its share).
        gradual = (
            bool(left) and self.cfg.ramp_s > 0 and ch.ramp is None
            and all(self._tier(self.links[lid]) == DEGRADED for lid in left)
            and max(new_tiers, default=DOWN) == HEALTHY
        )
        if gradual:
            ch.ramp = _Ramp(dict(old), dict(desired), now)
        elif ch.ramp is not None:
            ch.ramp = None
        ch.current = dict(desired)
        if not old:
            return  # the first choice (at start): no move
        ch.moved_at = now
        ch.why = why
        if old and set(old) != set(desired):
            names = lambda ws: ", ".join(self.links[lid].name for lid in ws) or "none"  # noqa: E731
            how = "gradually" if gradual else "at once"
            text = f"{kind} traffic moves from {names(old)} to {names(desired)} {how}: {why}"
            log.info("%s", text)
            self.on_event("link.moved", text, {
                "traffic": str(kind),
                "from": [self.links[lid].name for lid in old],
                "to": [self.links[lid].name for lid in desired],
                "gradual": gradual,
                "reason": why,
            })

    def _why(self, old: Weights, new: Weights) -> str:
        reasons = []
        for lid in old:
            if lid in new:
                continue
            h = self.health.get(lid)
            name = self.links[lid].name
            if h is not None and h.state is not LinkHealthState.UP:
                reasons.append(f"{name} {h.reason or h.state}")
            elif h is not None:
                reasons.append(f"{name} gives way to a better link")
        for lid in new:
            if lid not in old:
                name = self.links[lid].name
                h = self.health.get(lid)
                if h is not None and h.state is LinkHealthState.UP and old:
                    reasons.append(f"{name} healthy for {self.cfg.return_hold_s} s")
        return "; ".join(reasons) or "weights changed"

    def _output(self, ch: _Choice, now: float) -> tuple[tuple[int, int], ...]:
        target = _shares(ch.current)
        if ch.ramp is not None:
            step_s = self.cfg.ramp_s / RAMP_STEPS
            step = int((now - ch.ramp.started) / step_s)
            if step >= RAMP_STEPS:
                ch.ramp = None
            else:
                # A fifth of the traffic moves at once, the rest in RAMP_STEPS steps.
                f = (step + 1) / (RAMP_STEPS + 1)
                source = _shares(ch.ramp.source)
                blended: dict[int, float] = {}
                for lid, s in source.items():
                    blended[lid] = blended.get(lid, 0.0) + s * (1 - f)
                for lid, s in target.items():
                    blended[lid] = blended.get(lid, 0.0) + s * f
                target = blended
        ws = [(lid, round(s * WEIGHT_SCALE)) for lid, s in target.items()]
        ws = [(lid, w) for lid, w in ws if w > 0]
        ws.sort(key=lambda x: (-x[1], self.links.rank(x[0])))
        return tuple(ws)

    def next_due(self) -> float:
        """The next ramp step, and when a link waiting out its hold may take traffic back."""
        now = self.clock()
        due = math.inf
        for ch in self._choices.values():
            if ch.ramp is not None:
                step_s = self.cfg.ramp_s / RAMP_STEPS
                nxt = int((now - ch.ramp.started) / step_s) + 1
                due = min(due, ch.ramp.started + nxt * step_s)
        hold = self.cfg.return_hold_s
        for h in self.health.by_link.values():
            for since in (h.healthy_since, h.working_since):
                if since is not None and since + hold > now:
                    due = min(due, since + hold)
        return due


def _shares(ws: Weights) -> dict[int, float]:
    total = sum(ws.values())
    return {lid: w / total for lid, w in ws.items()} if total else {}
