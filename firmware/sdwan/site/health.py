"""Link health: each WAN link's loss, jitter and latency, measured all the time from probes, and
the link's state (up, degraded, down) with the reason and the figures that decided it.

What is probed: the parts that have a peer over a link name it (`add_targets`): the cloud its
PoP session on each link, the mesh its direct tunnels. A probe is the fast path's
authenticated probe (`fp_peer_probe`), which the far fast path answers by itself, so neither
the PoP's nor a peer's Python loop is timed. Each link sends one probe per target every
`[wan] probe_ms` (200 ms), at most `MAX_TARGETS` targets a round.

What is figured over the last `[wan] window_s` (docs/links.md, "Health"):

* loss: the share of probes to a target unanswered after `probe_timeout`, counted only when
  the target answered probes sent just before and just after (over any link): a target
  quiet everywhere (the PoP or a peer restarting) is not this link's loss;
* latency: the median round trip to a target;
* jitter: the RFC 3550 interarrival jitter of the round trips to a target (the same 1/16
  running estimate of how much consecutive transit times differ);

each the best target's: what every path over the link shares is the link's doing, what one
target alone shows is that target's path.

A link is down when its device cannot carry traffic (the kernel says why: no carrier,
administratively down, no such interface; the supervisor wakes the ticker on every netlink
link event, so that is seen at once), when it has no address, or when it is silent: nothing
answered over it for `[wan] silent_after_ms` while a target it probes (the same PoP, the same
site) still answers over another link. Silence on every link at once is the cloud or the peers
going away, not the links: no link is taken down for it (WAN recovery handles that). A link is
degraded past any of its thresholds (`[[links]] loss_pct`, `jitter_ms`, `latency_ms`) once the
window holds enough probes to tell, and healthy again when every figure is back under them.

Every change of state is an event (`link.down`, `link.up`, `link.degraded`, `link.recovered`)
with the figures that decided, and bumps `generation`: `site/steering.py` turns the states
into the links traffic uses.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sdwan.bindings.fastpath import PMTU_MIN, FastPath, FastPathError
from sdwan.common.sessions import SessionOwner
from sdwan.site.config import Wan
from sdwan.site.links import LinkManager, WanLink

log = logging.getLogger("sdwan.site.health")

# Probes are as small as the fast path sends them: 576 bytes on the wire.
PROBE_SIZE = PMTU_MIN
MAX_TARGETS = 4  # probed per link each round: the PoP and a few mesh peers are plenty
WITNESS_EVERY = 5
# A probe unanswered this long is lost. Longer than any latency a link may still be "up"
# with (its threshold, twice over), so a slow link is degraded for latency, not for loss.
MIN_PROBE_TIMEOUT_S = 2.0
# A target's loss counts once the window holds this many of its probes.
MIN_SAMPLES = 20
MIN_TARGET_SAMPLES = 5  # a target's latency and jitter count once it has this many answers
# A link healthy again needs every figure under its threshold and loss under this share of it
# (hysteresis: a link near the threshold does not flap between degraded and healthy).
RECOVER_LOSS_SHARE = 0.5
# A target never answered over a link is not counted as silence there before this: the
# first handshake of its session takes a moment.
FIRST_ANSWER_GRACE_S = 3.0
LONG_AGO_S = 1e6
# A lost probe counts as loss when its remote answered probes sent this many probe intervals
# before and after it (over any link): sporadic loss, or a link silent while the remote
# answers over another. Two or more in a row unanswered everywhere are the remote's outage
# (a restart), not this link's loss.
LOSS_BRACKET_PROBES = 1.5
HEALTH_PROBE_BIT = 0x80000000
# For this long after start a link's changes are not events (DHCP leases and first handshakes
# come at their own pace), and a link that comes up counts as healthy long enough at once:
# the first verdicts are not moves to announce or holds to wait out.
BOOT_GRACE_S = 10.0
# Jitter and latency are healthy again under this share of their thresholds.
RECOVER_SHARE = 0.8
JITTER_GAIN = 1 / 16  # RFC 3550, 6.4.1


class LinkHealthState(StrEnum):
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True)
class Target:
    """A peer to probe over a link: its fast-path peer id, the fast-path link the probe
    leaves on, and who answers (the same remote over two links is how silence on one of them
    is told apart from the remote going away): ("pop", id) or ("site", id)."""

    peer_id: int
    fp_link: int
    remote: Hashable
    # Its losses count: false while its session is not up (a PoP session re-handshaking
    # after a PoP restart loses probes that say nothing of the link; its silence still does).
    judged: bool = True
    # A witness (a mesh peer): probed every WITNESS_EVERY rounds while another target (the
    # PoP) answers over the link, every round when none does (the cloud down).
    witness: bool = False


TargetSource = Callable[[WanLink], Iterable[Target]]


@dataclass
class _Sample:
    sent_at: float
    remote: Hashable
    rtt: float | None  # seconds; None: lost


@dataclass
class _Remote:
    """What one link knows of one remote."""

    first_expected: float
    last_answer: float | None = None
    answering_since: float | None = None  # the first answer after a silence
    jitter: float = 0.0  # seconds, the RFC 3550 estimate
    last_rtt: float | None = None


@dataclass
class Figures:
    loss_pct: float | None = None
    jitter_ms: float | None = None
    latency_ms: float | None = None
    samples: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss_pct": None if self.loss_pct is None else round(self.loss_pct, 1),
            "jitter_ms": None if self.jitter_ms is None else round(self.jitter_ms, 1),
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
            "samples": self.samples,
        }


@dataclass
class LinkHealth:
    """One link's probes, figures and state."""

    link: WanLink
    started: float
    state: LinkHealthState = LinkHealthState.UP
    reason: str | None = None
    since: float = 0.0
    healthy_since: float | None = None  # up and not degraded, continuously, since then
    working_since: float | None = None  # not down, continuously, since then
    figures: Figures = field(default_factory=Figures)
    degraded_by: list[str] = field(default_factory=list)
    next_probe: float = 0.0
    pending: dict[int, tuple[float, Hashable, bool]] = field(default_factory=dict)
    samples: deque[_Sample] = field(default_factory=deque)
    remotes: dict[Hashable, _Remote] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    turn: int = 0  # rotates the targets probed when there are more than MAX_TARGETS
    round: int = 0
    probes_sent: int = 0
    probes_unsent: int = 0  # the fast path could not send (no key yet, no endpoint)
    probes_answered: int = 0
    unannounced: bool = False  # changed during the boot grace, not yet an event
    answered: bool = False  # something answered over it since the start
    proven: bool = False  # it has been up with answers over it since the start

    def last_answer(self) -> float | None:
        times = [r.last_answer for r in self.remotes.values() if r.last_answer is not None]
        return max(times) if times else None

    def status(self, now: float) -> dict[str, Any]:
        lk = self.link.link
        return {
            "state": str(self.state),
            "reason": self.reason,
            "since_s": round(now - self.since, 1),
            **self.figures.as_dict(),
            "degraded_by": list(self.degraded_by),
            "thresholds": {
                "loss_pct": lk.loss_pct, "jitter_ms": lk.jitter_ms, "latency_ms": lk.latency_ms,
            },
            "targets": len(self.targets),
            "probes": {
                "sent": self.probes_sent,
                "answered": self.probes_answered,
                "unsent": self.probes_unsent,
            },
        }


Event = Callable[[str, str, dict[str, Any]], None]


class Health(SessionOwner):
    """The health of every WAN link but an Alt-WAN one (its tunnels watch themselves); a
    session-layer owner only for the acks of its probes."""

    def __init__(
        self,
        links: LinkManager,
        cfg: Wan,
        fp: FastPath | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Event | None = None,
    ) -> None:
        self.links = links
        self.cfg = cfg
        self.fp = fp
        self.clock = clock
        self.on_event = on_event or (lambda _k, _t, _d: None)
        now = clock()
        self.by_link: dict[int, LinkHealth] = {
            # At start every link counts as having been healthy long enough to carry traffic.
            wl.id: LinkHealth(wl, started=now, since=now, healthy_since=now - LONG_AGO_S,
                              working_since=now - LONG_AGO_S)
            for wl in links
            if not wl.altwan
        }
        self._sources: list[TargetSource] = []
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._by_probe: dict[int, int] = {}  # probe id -> link id
        # Per remote, the send times of the probes it answered, over any link, oldest first:
        # a probe is lost only if its remote answered probes sent shortly before and after it
        # (a remote quiet everywhere, the PoP down or restarting, says nothing of the link,
        # not even at the edges of its outage).
        self._answered_sent: dict[Hashable, deque[float]] = {}
        self.started = now
        # Bumped at every change of a link's state: steering recomputes then.
        self.generation = 0

    # ---------------------------------------------------------------- inputs

    def add_targets(self, source: TargetSource) -> None:
        """`source(link)` names the peers to probe over that link, each tick."""
        self._sources.append(source)

    def on_probe_ack(self, peer_id: int, link_id: int, probe_id: int, received: int) -> bool:
        lid = self._by_probe.pop(probe_id, None)
        if lid is None:
            return False
        h = self.by_link.get(lid)
        if h is None:
            return True
        sent = h.pending.pop(probe_id, None)
        if sent is None:
            return True
        now = self.clock()
        sent_at, remote, _judged = sent
        rtt = max(0.0, now - sent_at)
        times = self._answered_sent.setdefault(remote, deque())
        if times and times[-1] > sent_at:
            bisect.insort(times, sent_at)
        else:
            times.append(sent_at)
        h.probes_answered += 1
        h.answered = True
        r = h.remotes.get(remote)
        if r is None:
            r = h.remotes[remote] = _Remote(first_expected=sent_at)
        if r.last_answer is None or now - r.last_answer > self.cfg.silent_after_ms / 1000:
            r.answering_since = now
        r.last_answer = now
        # A probe sent while the link was down (held in a queue until the carrier came back)
        # proves the link works again, but its round trip is not the link's latency.
        if h.working_since is None or sent_at < h.working_since:
            return True
        h.samples.append(_Sample(sent_at, remote, rtt))
        if r.last_rtt is not None:
            r.jitter += (abs(rtt - r.last_rtt) - r.jitter) * JITTER_GAIN
        r.last_rtt = rtt
        return True

    # ---------------------------------------------------------------- periodic work

    @property
    def probe_s(self) -> float:
        return self.cfg.probe_ms / 1000

    def probe_timeout(self, h: LinkHealth) -> float:
        return max(MIN_PROBE_TIMEOUT_S, 2 * h.link.link.latency_ms / 1000)

    def tick(self) -> None:
        now = self.clock()
        for h in self.by_link.values():
            try:
                self._probe(h, now)
            except Exception:  # one link's trouble must not stop the others' health
                log.exception("link %s: probing failed", h.link.name)
            self._expire(h, now)
        for h in self.by_link.values():
            self._judge(h, now)
            if h.unannounced and now - self.started >= BOOT_GRACE_S:
                # What boot left it in, if it is not the "up" every link starts as.
                h.unannounced = False
                if h.state is not LinkHealthState.UP:
                    self._announce(h, LinkHealthState.UP)

    def next_due(self) -> float:
        due = math.inf
        for h in self.by_link.values():
            # A link with nothing to probe looks again at the next tick, whenever that is:
            # no 200 ms wake-ups on a box with neither PoP nor mesh.
            if h.targets:
                due = min(due, h.next_probe)
            if h.pending:
                due = min(due, min(p[0] for p in h.pending.values()) + self.probe_timeout(h))
        return due

    def _probe(self, h: LinkHealth, now: float) -> None:
        if now < h.next_probe or self.fp is None:
            return
        h.next_probe = now + self.probe_s
        targets: list[Target] = []
        for source in self._sources:
            targets.extend(source(h.link))
        h.targets = targets
        for t in targets:
            if t.remote not in h.remotes:
                h.remotes[t.remote] = _Remote(first_expected=now)
        h.round += 1
        if h.round % WITNESS_EVERY and self._main_answers(h, now):
            targets = [t for t in targets if not t.witness]
        if len(targets) > MAX_TARGETS:
            start = h.turn % len(targets)
            h.turn += MAX_TARGETS
            targets = (targets[start:] + targets[:start])[:MAX_TARGETS]
        for t in targets:
            # The top bit set: path MTU probes (common/pmtu.py) keep it clear.
            self._next_id = (self._next_id + 1) & 0x7FFFFFFF
            probe_id = HEALTH_PROBE_BIT | self._next_id
            try:
                self.fp.probe(t.peer_id, t.fp_link, PROBE_SIZE, probe_id)
            except FastPathError:
                # No key or no endpoint on that link yet: nothing goes out, nothing comes
                # back, which is what the silence check should see.
                h.probes_unsent += 1
                continue
            h.probes_sent += 1
            h.pending[probe_id] = (now, t.remote, t.judged)
            self._by_probe[probe_id] = h.link.id

    def _main_answers(self, h: LinkHealth, now: float) -> bool:
        """A target that is no witness (the PoP) answered over the link just now."""
        alive_s = 0.6 * self.cfg.silent_after_ms / 1000
        mains = {t.remote for t in h.targets if not t.witness}
        return any(
            (r := h.remotes.get(m)) is not None and r.last_answer is not None
            and now - r.last_answer <= alive_s
            for m in mains
        )

    def _expire(self, h: LinkHealth, now: float) -> None:
        timeout = self.probe_timeout(h)
        for pid, (sent_at, remote, judged) in list(h.pending.items()):
            if now - sent_at >= timeout:
                del h.pending[pid]
                self._by_probe.pop(pid, None)
                # Lost only if the remote answered something sent later, over any link: a
                # remote gone quiet everywhere (the PoP down) says nothing of this link.
                # And only while the link works: what was lost while it was down is part of
                # that outage, not of how the link does now.
                working = h.working_since is not None and sent_at >= h.working_since
                if judged and working and self._bracketed(remote, sent_at):
                    h.samples.append(_Sample(sent_at, remote, None))
        horizon = now - self.cfg.window_s
        while h.samples and h.samples[0].sent_at < horizon:
            h.samples.popleft()
        keep_from = now - timeout - LOSS_BRACKET_PROBES * self.probe_s
        for remote, times in list(self._answered_sent.items()):
            while times and times[0] < keep_from:
                times.popleft()
            if not times:
                del self._answered_sent[remote]
        for remote in [r for r, st in h.remotes.items()
                       if (st.last_answer or st.first_expected) < horizon
                       and not any(t.remote == r for t in h.targets)]:
            del h.remotes[remote]

    def _bracketed(self, remote: Hashable, t: float) -> bool:
        """The remote answered probes sent shortly before and after t (LOSS_BRACKET_PROBES)."""
        times = self._answered_sent.get(remote)
        if not times:
            return False
        span = LOSS_BRACKET_PROBES * self.probe_s
        i = bisect.bisect_left(times, t)
        before = i > 0 and t - times[i - 1] <= span
        j = bisect.bisect_right(times, t)
        after = j < len(times) and times[j] - t <= span
        return before and after

    def figures(self, h: LinkHealth) -> Figures:
        """Per target, then the best target's: what every path over the link shares is the
        link's own doing; a figure only one target shows is that target's path (its uplink,
        its NAT), not this link's."""
        samples = list(h.samples)
        if not samples:
            return Figures()
        by_remote: dict[Hashable, list[float | None]] = {}
        for s in samples:
            by_remote.setdefault(s.remote, []).append(s.rtt)
        loss: float | None = None
        latency: float | None = None
        jitter: float | None = None
        for remote, got in by_remote.items():
            if len(got) >= MIN_SAMPLES:
                pct = 100.0 * sum(1 for x in got if x is None) / len(got)
                loss = pct if loss is None else min(loss, pct)
            rtts = [x for x in got if x is not None]
            if len(rtts) < MIN_TARGET_SAMPLES:
                continue
            med = statistics.median(rtts) * 1000
            latency = med if latency is None else min(latency, med)
            r = h.remotes.get(remote)
            if r is not None:
                jitter = r.jitter * 1000 if jitter is None else min(jitter, r.jitter * 1000)
        return Figures(loss_pct=loss, jitter_ms=jitter, latency_ms=latency, samples=len(samples))

    def _silence(self, h: LinkHealth, now: float) -> str | None:
        """Why the link counts as silent, or None: nothing at all answered over it for
        silent_after_ms while a remote it probes answered over another link all that time
        (and still does). Only the
        current targets count: a remote no longer probed over it (a closed session) is not
        missed there."""
        if not h.targets:
            return None
        silent_s = self.cfg.silent_after_ms / 1000
        alive_s = 0.6 * silent_s  # an answer this recent elsewhere: that remote is there
        current = {t.remote for t in h.targets}
        heard = [r.last_answer for k, r in h.remotes.items()
                 if k in current and r.last_answer is not None]
        if heard:
            quiet_since = max(heard)
        else:
            # Never answered: its sessions' first handshakes take a moment.
            quiet_since = max(
                min(h.remotes[k].first_expected for k in current if k in h.remotes), h.started
            ) + FIRST_ANSWER_GRACE_S
        if now - quiet_since < silent_s:
            return None
        for remote in current:
            for other in self.by_link.values():
                if other is h:
                    continue
                o = other.remotes.get(remote)
                # Answering there now, and for as long as this link has been quiet: sessions
                # coming back one after the other (a PoP restarting) are not silence.
                if (
                    o is not None and o.last_answer is not None
                    and now - o.last_answer <= alive_s
                    and o.answering_since is not None and now - o.answering_since >= silent_s
                ):
                    ms = (now - (max(heard) if heard else quiet_since - FIRST_ANSWER_GRACE_S))
                    return (f"silent: no answer over it for {ms * 1000:.0f} ms"
                            f" ({_remote_text(remote)} answers over {other.link.name})")
        return None

    def _judge(self, h: LinkHealth, now: float) -> None:
        h.figures = fig = self.figures(h)
        wl = h.link
        fault = wl.fault()
        if fault is None and wl.local_ipv4() is None:
            fault = "no address"
        if fault is None:
            silent = self._silence(h, now)
            if silent is None and h.targets and h.state is LinkHealthState.DOWN \
                    and h.reason is not None and h.reason.startswith("silent") \
                    and not _answered_since(h, h.since):
                silent = h.reason  # down for silence: up again once something answers
            fault = silent
        if fault is not None:
            self._set(h, LinkHealthState.DOWN, fault, [], now)
            return
        lk = wl.link
        bad: list[str] = []
        recovering = h.state is LinkHealthState.DEGRADED
        if fig.loss_pct is not None:
            limit = lk.loss_pct * (RECOVER_LOSS_SHARE if recovering else 1.0)
            if fig.loss_pct > lk.loss_pct:
                bad.append(f"loss {fig.loss_pct:.1f} % > {lk.loss_pct:g} %")
            elif fig.loss_pct > limit:
                bad.append(f"loss {fig.loss_pct:.1f} %, not yet under {limit:g} %")
        share = RECOVER_SHARE if recovering else 1.0
        for name, value, limit, unit in (
            ("jitter", fig.jitter_ms, lk.jitter_ms, "ms"),
            ("latency", fig.latency_ms, lk.latency_ms, "ms"),
        ):
            if value is None or value <= limit * share:
                continue
            if value > limit:
                bad.append(f"{name} {value:.0f} {unit} > {limit} {unit}")
            else:
                bad.append(f"{name} {value:.0f} {unit}, not yet under {limit * share:g} {unit}")
        if bad:
            self._set(h, LinkHealthState.DEGRADED, "degraded: " + ", ".join(bad), bad, now)
        else:
            self._set(h, LinkHealthState.UP, None, [], now)
            h.proven = h.proven or h.answered

    def _set(
        self, h: LinkHealth, state: LinkHealthState, reason: str | None, bad: list[str],
        now: float,
    ) -> None:
        h.degraded_by = bad
        if state is h.state:
            h.reason = reason  # the figures in it move; the state does not
            return
        old = h.state
        h.state, h.reason, h.since = state, reason, now
        # Quiet, and qualified at once, only for a link not yet seen working since the start
        # (no answer over it yet): a link that worked and then failed is news, boot or not.
        booting = now - self.started < BOOT_GRACE_S and not h.proven
        up_since = now - LONG_AGO_S if booting else now
        h.healthy_since = up_since if state is LinkHealthState.UP else None
        if state is LinkHealthState.DOWN:
            h.working_since = None
            # What it measured before going down says nothing of it once it is back.
            h.samples.clear()
            for r in h.remotes.values():
                r.last_rtt, r.jitter = None, 0.0
        elif old is LinkHealthState.DOWN:
            h.working_since = up_since
        self.generation += 1
        if booting:
            h.unannounced = True  # said once the boot grace ends, if it still holds
            return
        h.unannounced = False
        self._announce(h, old)

    def _announce(self, h: LinkHealth, old: LinkHealthState) -> None:
        state, reason = h.state, h.reason
        name = h.link.name
        data = {"link": name, "from": str(old), "to": str(state), "reason": reason,
                **h.figures.as_dict()}
        if state is LinkHealthState.DOWN:
            kind, text = "link.down", f"link {name} down: {reason}"
        elif state is LinkHealthState.DEGRADED:
            kind, text = "link.degraded", f"link {name} {reason}"
        elif old is LinkHealthState.DEGRADED:
            kind, text = "link.recovered", f"link {name} healthy again ({_figures_text(h)})"
        else:
            kind, text = "link.up", f"link {name} up"
        log.info("%s", text)
        self.on_event(kind, text, data)

    # ---------------------------------------------------------------- reading

    def state(self, link_id: int) -> LinkHealthState:
        h = self.by_link.get(link_id)
        return h.state if h is not None else LinkHealthState.DOWN

    def get(self, link_id: int) -> LinkHealth | None:
        return self.by_link.get(link_id)

    def status(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {h.link.name: h.status(now) for h in self.by_link.values()}

    # The session layer asks every owner these; the probes' acks are all this owner takes.
    def tunnel_for(self, session: Any) -> None:
        return None

    def sessions_in_use(self) -> list[Any]:
        return []


def _answered_since(h: LinkHealth, t: float) -> bool:
    return any(r.last_answer is not None and r.last_answer > t for r in h.remotes.values())


def _remote_text(remote: Hashable) -> str:
    if isinstance(remote, tuple) and len(remote) == 2:
        kind, rid = remote
        return f"PoP {rid}" if kind == "pop" else f"site {rid}"
    return str(remote)


def _figures_text(h: LinkHealth) -> str:
    f = h.figures
    parts = []
    if f.loss_pct is not None:
        parts.append(f"loss {f.loss_pct:.1f} %")
    if f.jitter_ms is not None:
        parts.append(f"jitter {f.jitter_ms:.0f} ms")
    if f.latency_ms is not None:
        parts.append(f"latency {f.latency_ms:.0f} ms")
    return ", ".join(parts) or "no figures yet"
