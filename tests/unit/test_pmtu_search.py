"""The path MTU search (common/pmtu.py) against a simulated path: what it finds, how fast (in
rounds of the simulated clock), and what it does when the path changes, shrinks, loses probes
or belongs to a peer that never answers."""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field

import pytest

from sdwan.bindings.fastpath import EndpointInfo, FastPathError, PeerLinks
from sdwan.common.pmtu import BASE_PMTU, MIN_PMTU, RAISE_S, PathMtu, PmtuState

PEER = 7
LINK = 1
RTT = 0.02


@dataclass
class SimPath:
    """A fast path whose peer sits behind a path of `mtu`, answering after RTT."""

    mtu: int = 1500
    local_mtu: int = 1500
    answers: bool = True
    loss: float = 0.0
    addr: tuple[str, int] = ("198.51.100.2", 4800)
    now: float = 0.0
    sent: list[int] = field(default_factory=list)
    in_flight: list[tuple[float, int, int]] = field(default_factory=list)
    set_to: list[int] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def endpoints_gen(self) -> int:
        return hash(self.addr)  # changes with the endpoint, as the fast path's does

    def endpoint_info(self, peer_id: int) -> PeerLinks:
        ep = EndpointInfo(LINK, self.addr, True, 0, 0, 0, 0)
        return PeerLinks(endpoints=[ep], policy=[], rx_unlisted=0)

    def probe(self, peer_id: int, link_id: int, size: int, probe_id: int) -> None:
        if size > self.local_mtu:
            raise FastPathError(errno.EMSGSIZE, "fp_peer_probe")
        self.sent.append(size)
        if self.answers and size <= self.mtu and self.rng.random() >= self.loss:
            self.in_flight.append((self.now + RTT, probe_id, size - 28))

    def set_mtu(self, peer_id: int, mtu: int) -> None:
        self.set_to.append(mtu)


def run(sim: SimPath, pm: PathMtu, seconds: float, step: float = 0.01) -> None:
    end = sim.now + seconds
    while sim.now < end:
        sim.now = round(sim.now + step, 6)
        due = [f for f in sim.in_flight if f[0] <= sim.now]
        sim.in_flight = [f for f in sim.in_flight if f[0] > sim.now]
        for _, pid, got in due:
            pm.on_ack(LINK, pid, got)
        pm.tick()


def make(sim: SimPath) -> PathMtu:
    return PathMtu(sim, PEER, lambda _l: sim.local_mtu, clock=lambda: sim.now)  # type: ignore[arg-type]


@pytest.mark.parametrize("path_mtu", [1500, 1492, 1400, 1281, 1280])
def test_finds_the_path_mtu_to_the_byte(path_mtu: int) -> None:
    sim = SimPath(mtu=path_mtu)
    pm = make(sim)
    pm.tick()
    assert pm.mtu == BASE_PMTU  # assumed while searching
    run(sim, pm, 3.0)
    assert pm.mtu == path_mtu and pm.state() == "done"
    assert sim.set_to[-1] == path_mtu
    assert pm.status()["inner_mtu"] == path_mtu - 60
    # A clean 1500 path is found at once; the others within three rounds of probes.
    assert len(sim.sent) <= 3 * 2 * 9


def test_a_1500_path_is_found_in_one_round_trip() -> None:
    sim = SimPath(mtu=1500)
    pm = make(sim)
    pm.tick()
    run(sim, pm, RTT + 0.01)
    assert pm.mtu == 1500


def test_the_local_interface_caps_the_search() -> None:
    sim = SimPath(mtu=9000, local_mtu=1500)
    pm = PathMtu(sim, PEER, lambda _l: 9000, clock=lambda: sim.now)  # type: ignore[arg-type]
    run(sim, pm, 5.0)
    assert pm.mtu == 1500


def test_lost_probes_do_not_lower_the_figure_much() -> None:
    sim = SimPath(mtu=1400, loss=0.2)
    pm = make(sim)
    run(sim, pm, 10.0)
    assert pm.mtu is not None and 1380 <= pm.mtu <= 1400


def test_a_peer_that_never_answers_gets_no_limit() -> None:
    sim = SimPath(answers=False)
    pm = make(sim)
    run(sim, pm, 10.0)
    assert pm.mtu is None and pm.state() == str(PmtuState.NO_ANSWER)
    assert sim.set_to[-1] == 0
    assert "does not answer" in (pm.status()["paths"][0]["reason"] or "")


def test_a_path_change_searches_from_the_figure_it_had() -> None:
    sim = SimPath(mtu=1500)
    pm = make(sim)
    run(sim, pm, 2.0)
    assert pm.mtu == 1500
    # Same size on the new path: confirmed, never lowered meanwhile.
    sim.addr = ("198.51.100.9", 4800)
    applied = len(sim.set_to)
    run(sim, pm, 2.0)
    assert pm.paths[LINK].searches == 2 and pm.mtu == 1500
    assert len(sim.set_to) == applied  # never lowered meanwhile
    # A smaller new path: 1500 is not carried any more, so down to BASE and up to 1300.
    sim.addr, sim.mtu = ("198.51.100.10", 4800), 1300
    run(sim, pm, 10.0)
    assert pm.mtu == 1300


def test_periodic_search_finds_a_larger_mtu() -> None:
    sim = SimPath(mtu=1280)
    pm = make(sim)
    run(sim, pm, 3.0)
    assert pm.mtu == 1280
    sim.mtu = 1500
    run(sim, pm, RAISE_S - 5)
    assert pm.mtu == 1280
    run(sim, pm, 10.0)
    assert pm.mtu == 1500


def test_below_base_when_the_peer_answered_before() -> None:
    sim = SimPath(mtu=1500)
    pm = make(sim)
    run(sim, pm, 2.0)
    sim.addr, sim.mtu = ("198.51.100.11", 4800), 1000
    run(sim, pm, 30.0)
    assert pm.mtu == 1000 and MIN_PMTU <= 1000


class _Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_spread_first_search_still_limits_data_to_the_base_pmtu_at_once() -> None:
    """start_after_s delays the first search, not the 1280 limit (docs/dataplane.md)."""
    from sdwan.bindings.fastpath import FastPath

    fp = FastPath()
    fp.peer_add(7)
    fp.set_endpoint(7, 1, ("198.51.100.7", 4800))
    clock = _Clock()
    delayed = PathMtu(fp, 7, lambda _l: 1500, clock, start_after_s=10.0)
    for _ in range(19):  # the tunnel is up, ticked every 0.5 s while the search waits
        clock.t += 0.5
        delayed.tick()
        assert fp.endpoint_info(7).mtu == BASE_PMTU, f"no limit at +{clock.t - 1000:.1f} s"
        assert delayed.paths[1].searches == 0
    clock.t += 1.0
    delayed.tick()
    assert delayed.paths[1].searches == 1 and delayed.paths[1].reason == "new path"


def test_a_new_endpoint_is_searched_at_the_next_tick_even_while_idle() -> None:
    """The fast path's endpoint generation tells an idle search of a new or moved endpoint at
    its next tick, without waiting for its poll interval."""
    from sdwan.bindings.fastpath import FastPath

    fp = FastPath()
    fp.peer_add(7)
    fp.set_endpoint(7, 1, ("198.51.100.7", 4800))
    clock = _Clock()
    pm = PathMtu(fp, 7, lambda _l: 1500, clock)
    pm.tick()
    for path in pm.paths.values():  # as if the search on link 1 were done
        path.state = PmtuState.DONE
        path.next_search = clock.t + 600
    clock.t += 1.0
    pm.tick()
    assert pm.next_due() > clock.t + 500  # idle: nothing to do for a while
    fp.set_endpoint(7, 2, ("203.0.113.7", 4800))  # a second link's path, just found
    clock.t += 0.05  # well within the poll interval
    pm.tick()
    assert 2 in pm.paths and pm.paths[2].state is PmtuState.SEARCHING
