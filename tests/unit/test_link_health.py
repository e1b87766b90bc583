"""Link health and steering (site/health.py, site/steering.py) on a simulated clock: probes
answered, lost, delayed and jittered per link, the states and figures that follow, and which
links the cloud's and the mesh's traffic use (at once off a dead link, gradually off a degraded
one, back only after the hold, precedence 3 as the last resort, active/active by bandwidth).

The probes' far end is simulated here (the lab tests run the real fast path at both ends)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from sdwan.site.config import Link, Wan
from sdwan.site.health import BOOT_GRACE_S, Health, LinkHealthState, Target
from sdwan.site.links import LinkManager
from sdwan.site.steering import Kind, Steering

STEP = 0.05


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Far:
    """How the far end answers probes over each link: a delay (s) per probe, None = lost."""

    answer: dict[int, Callable[[int], float | None]] = field(default_factory=dict)
    queue: list[tuple[float, int, int]] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)  # link -> probes

    def probe(self, peer_id: int, link_id: int, size: int, probe_id: int) -> None:
        n = self.sent.get(link_id, 0)
        self.sent[link_id] = n + 1
        delay = self.answer.get(link_id, lambda _n: 0.02)(n)
        if delay is not None:
            heapq.heappush(self.queue, (self.now + delay, probe_id, link_id))

    now: float = 0.0


class Rig:
    def __init__(self, links: list[Link], wan: Wan | None = None, at_start: bool = False) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, str]] = []
        self.lm = LinkManager(links, send=lambda *_: None, clock=self.clock)
        self.far = Far()
        self.wan = wan or Wan()
        self.health = Health(self.lm, self.wan, self.far, clock=self.clock,  # type: ignore[arg-type]
                             on_event=lambda k, t, _d: self.events.append((k, t)))
        self.health.add_targets(lambda wl: [Target(0x100 + wl.id, wl.id, ("pop", 1))])
        self.steering = Steering(self.lm, self.health, self.wan, clock=self.clock,
                                 on_event=lambda k, t, _d: self.events.append((k, t)))
        if not at_start:
            self.run(BOOT_GRACE_S)  # past the start, whose changes are no events

    def run(self, seconds: float) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end:
            self.clock.t += STEP
            self.far.now = self.clock.t
            while self.far.queue and self.far.queue[0][0] <= self.clock.t:
                _, pid, link = heapq.heappop(self.far.queue)
                self.health.on_probe_ack(0x100 + link, link, pid, 576)
            self.health.tick()
            self.steering.tick()

    def state(self, link_id: int) -> LinkHealthState:
        return self.health.state(link_id)

    def cloud(self) -> dict[int, int]:
        return dict(self.steering.weights(Kind.CLOUD))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


def lo(name: str, precedence: int = 1, **kw: object) -> Link:
    return Link(name=name, interface="lo", port=0, precedence=precedence, **kw)  # type: ignore[arg-type]


def two_links(**kw: object) -> Rig:
    return Rig([lo("wan1", 1, **kw), lo("wan2", 2)])


def test_healthy_links_are_up_with_figures_and_traffic_on_precedence_1() -> None:
    r = two_links()
    r.run(12)
    assert r.state(1) is LinkHealthState.UP and r.state(2) is LinkHealthState.UP
    st = r.health.status()["wan1"]
    assert st["loss_pct"] == 0 and 15 <= st["latency_ms"] <= 60 and st["samples"] >= 40
    assert r.cloud() == {1: 1000}
    assert r.steering.weights(Kind.OFFCLOUD) == ((1, 1000),)
    assert not [k for k in r.kinds() if k.startswith("link.")]


def test_a_silent_link_goes_down_within_a_second_and_traffic_moves_at_once() -> None:
    r = two_links()
    r.run(5)
    r.far.answer[1] = lambda _n: None
    t0 = r.clock.t
    while r.state(1) is not LinkHealthState.DOWN:
        r.run(STEP)
        assert r.clock.t - t0 < 1.0, "the silent link was not taken down within a second"
    assert "silent: no answer over it" in (r.health.get(1).reason or "")
    assert "PoP 1 answers over wan2" in (r.health.get(1).reason or "")
    assert r.cloud() == {2: 1000}
    assert "link.down" in r.kinds() and "link.moved" in r.kinds()


def test_silence_on_every_link_is_not_a_link_fault() -> None:
    r = two_links()
    r.run(5)
    r.far.answer[1] = r.far.answer[2] = lambda _n: None
    r.run(5)
    assert r.state(1) is LinkHealthState.UP and r.state(2) is LinkHealthState.UP
    assert r.cloud() == {1: 1000}
    assert "link.down" not in r.kinds()


@pytest.mark.parametrize(
    "answer, figure",
    [
        (lambda n: None if n % 10 == 0 else 0.02, "loss"),
        (lambda n: 0.7, "latency"),
        (lambda n: 0.01 if n % 2 else 0.09, "jitter"),
    ],
    ids=["loss-10pct", "latency-700ms", "jitter-80ms"],
)
def test_a_degraded_link_is_named_with_its_figure_and_flows_leave_gradually(
    answer: Callable[[int], float | None], figure: str
) -> None:
    r = two_links()
    r.run(5)
    r.far.answer[1] = answer
    t0 = r.clock.t
    while r.state(1) is not LinkHealthState.DEGRADED:
        r.run(STEP)
        assert r.clock.t - t0 < 15, f"not degraded for {figure}"
    # A step in delay is jitter for a moment before the median shows it as latency.
    while figure not in (r.health.get(1).reason or ""):
        r.run(STEP)
        assert r.clock.t - t0 < 15, f"degraded, but not for {figure}: {r.health.get(1).reason}"
    # Gradually: part of the traffic is still on wan1 right after, none a few seconds later.
    moved = [t for k, t in r.events if k == "link.moved"]
    # A jump in delay beyond silent_after_ms is silence until the first late answer: that
    # link is left at once, not gradually.
    assert moved and ("gradually" in moved[0] or figure == "latency")
    r.run(r.wan.ramp_s + 0.2)
    assert r.cloud() == {2: 1000}


def test_traffic_returns_only_after_the_hold_and_a_flapping_link_moves_it_once_each_way() -> None:
    r = two_links()
    r.run(5)
    down = lambda _n: None  # noqa: E731
    up = lambda _n: 0.02  # noqa: E731
    # Flapping: 2 s silent, 2 s answering, for 30 s.
    for _ in range(8):
        r.far.answer[1] = down
        r.run(2)
        r.far.answer[1] = up
        r.run(2)
    moves = [t for k, t in r.events if k == "link.moved" and t.startswith("cloud")]
    assert len(moves) == 1, moves  # away once, not back while it flaps
    assert r.cloud() == {2: 1000}
    r.run(r.wan.return_hold_s + 1)
    assert r.cloud() == {1: 1000}
    moves = [t for k, t in r.events if k == "link.moved" and t.startswith("cloud")]
    assert len(moves) == 2 and "healthy for" in moves[1]


def test_precedence_3_only_when_1_and_2_are_down_and_never_offcloud() -> None:
    r = Rig([lo("wan1", 1), lo("wan2", 2), lo("lte", 3, offcloud=False)])
    r.run(5)
    assert r.cloud() == {1: 1000}
    r.far.answer[1] = r.far.answer[2] = lambda _n: None
    r.run(2)
    # Silent on 1 and 2 while the PoP answers over the last resort: it carries the cloud.
    assert r.state(1) is LinkHealthState.DOWN and r.state(2) is LinkHealthState.DOWN
    assert r.cloud() == {3: 1000}
    assert all(lid != 3 for lid, _ in r.steering.weights(Kind.OFFCLOUD))
    # wan2 back: it takes the cloud's traffic once it has worked for the hold.
    r.far.answer[2] = lambda _n: 0.02
    r.run(2)
    assert r.cloud() == {3: 1000}
    r.run(r.wan.return_hold_s)
    assert r.cloud() == {2: 1000}


def test_active_active_shares_by_bandwidth_and_a_dead_link_leaves_the_set() -> None:
    r = Rig([lo("fiber", 1, bandwidth_mbps=300), lo("dsl", 1, bandwidth_mbps=100)])
    r.run(5)
    assert r.cloud() == {1: 750, 2: 250}
    r.far.answer[2] = lambda _n: None
    r.run(1.5)
    assert r.cloud() == {1: 1000}
    r.far.answer[2] = lambda _n: 0.02
    r.run(r.wan.return_hold_s + 1)
    assert r.cloud() == {1: 750, 2: 250}


def test_one_quiet_peer_does_not_take_a_link_down_while_the_pop_answers_over_it() -> None:
    r = two_links()
    # Site 7 answers over wan2 only (its side of wan1's path is broken); the PoP over both.
    r.health.add_targets(lambda wl: [Target(0x700 + wl.id, wl.id, ("site", 7))])
    answered: dict[int, str] = {}

    def probe(peer_id: int, link_id: int, size: int, probe_id: int) -> None:
        answered[probe_id] = "site" if peer_id >= 0x700 else "pop"
        if peer_id >= 0x700 and link_id == 1:
            return
        heapq.heappush(r.far.queue, (r.far.now + 0.02, probe_id, link_id))

    r.far.probe = probe  # type: ignore[method-assign]
    r.run(5)
    assert r.state(1) is LinkHealthState.UP, r.health.get(1).reason
    assert r.cloud() == {1: 1000}


def test_a_pop_outage_leaves_no_link_degraded_for_loss_afterwards() -> None:
    r = two_links()
    r.far.answer[1] = r.far.answer[2] = lambda _n: None
    r.run(20)
    r.far.answer[1] = r.far.answer[2] = lambda _n: 0.02
    r.run(4)
    assert r.state(1) is LinkHealthState.UP and r.state(2) is LinkHealthState.UP, (
        r.health.get(1).reason, r.health.get(2).reason)
    assert "link.degraded" not in r.kinds()


def test_active_active_leaves_a_degraded_link_gradually_beside_a_healthy_one() -> None:
    r = Rig([lo("fiber", 1, bandwidth_mbps=100), lo("dsl", 1, bandwidth_mbps=100)])
    r.run(3)
    assert r.cloud() == {1: 500, 2: 500}
    r.far.answer[2] = lambda n: 0.01 if n % 2 else 0.09  # jitter
    t0 = r.clock.t
    while r.state(2) is not LinkHealthState.DEGRADED:
        r.run(STEP)
        assert r.clock.t - t0 < 15
    r.run(STEP * 2)
    mid = r.cloud()
    assert 0 < mid.get(2, 0) < 500, mid  # part of dsl's share still there
    r.run(r.wan.ramp_s + 0.5)
    assert r.cloud() == {1: 1000}
    moved = [t for k, t in r.events if k == "link.moved" and t.startswith("cloud")]
    assert moved and "gradually" in moved[-1]


def test_links_changing_at_start_are_no_events_and_wait_no_hold() -> None:
    r = Rig([lo("wan1", 1), lo("wan2", 2)], at_start=True)
    r.far.answer[1] = lambda _n: None  # wan1's session is slow to come up at boot
    r.run(5)
    assert r.state(1) is LinkHealthState.DOWN
    r.far.answer[1] = lambda _n: 0.02
    r.run(2)
    # Up again within the boot grace: back on wan1 at once, no hold, and no link event
    # (traffic's moves are steering's, and said).
    assert r.state(1) is LinkHealthState.UP
    assert r.cloud() == {1: 1000}
    assert not [k for k in r.kinds() if k.startswith("link.") and k != "link.moved"], r.events

def test_sessions_coming_back_one_after_the_other_are_no_silence() -> None:
    """A PoP restart: wan2's session answers half a second before wan1's does again."""
    r = two_links()
    r.far.answer[1] = r.far.answer[2] = lambda _n: None
    r.run(5)
    r.far.answer[2] = lambda _n: 0.02
    r.run(0.5)
    r.far.answer[1] = lambda _n: 0.02
    r.run(3)
    assert r.state(1) is LinkHealthState.UP, r.health.get(1).reason
    assert r.cloud() == {1: 1000}
    assert "link.down" not in r.kinds() and "link.moved" not in r.kinds()


def test_a_target_restarting_is_no_loss_on_any_link() -> None:
    """The far end gone for 0.6 s (a socketd restart) every few seconds: silence everywhere,
    not loss on each link."""
    r = two_links()
    for _ in range(6):
        r.far.answer[1] = r.far.answer[2] = lambda _n: None
        r.run(0.6)
        r.far.answer[1] = r.far.answer[2] = lambda _n: 0.02
        r.run(2)
    assert r.state(1) is LinkHealthState.UP and r.state(2) is LinkHealthState.UP
    assert r.health.status()["wan1"]["loss_pct"] == 0
