"""The impairment element's shaping, without devices: what leaves a direction, and when."""

from __future__ import annotations

import random

from sdwan.lab.impair import Direction, Impairment


class Wire:
    """Records what a direction sends, with the time it left."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sent: list[tuple[float, bytes]] = []

    def send(self, data: bytes, /) -> int:
        self.sent.append((self.now, data))
        return len(data)


def run(imp: Impairment, frames: int = 2000, gap_s: float = 0.001, seed: int = 1) -> Wire:
    """Frames 0..n-1 arrive gap_s apart, seen on a 0.1 ms tick that also serves the queue."""
    wire = Wire()
    d = Direction("up", wire, random.Random(seed), imp)
    t, i = 0.0, 0
    while i < frames or d.queue:
        wire.now = t
        if i < frames and t >= i * gap_s:
            d.take(i.to_bytes(4, "big"), t)
            i += 1
        d.release_due(t)
        t = round(t + 0.0001, 7)
    return wire


def order(wire: Wire) -> list[int]:
    return [int.from_bytes(f, "big") for _, f in wire.sent]


def test_nothing_set_passes_everything_at_once() -> None:
    wire = run(Impairment(), frames=100)
    assert order(wire) == list(range(100))
    assert all(abs(t - i * 0.001) < 0.00011 for i, (t, _) in enumerate(wire.sent))


def test_loss_is_about_the_setting_and_repeats_with_the_seed() -> None:
    wire = run(Impairment(loss=5))
    assert 60 <= 2000 - len(wire.sent) <= 140
    assert order(run(Impairment(loss=5))) == order(wire)
    assert order(run(Impairment(loss=5), seed=2)) != order(wire)


def test_delay_and_jitter_keep_the_order() -> None:
    wire = run(Impairment(delay_ms=50, jitter_ms=20))
    assert order(wire) == list(range(2000))
    waits = [t - i * 0.001 for i, (t, _) in enumerate(wire.sent)]
    assert min(waits) >= 0.030 - 1e-6 and max(waits) <= 0.0701
    assert 0.045 <= sum(waits) / len(waits) <= 0.065
    fixed = run(Impairment(delay_ms=50), frames=100)
    assert all(abs(t - i * 0.001 - 0.05) < 0.00021 for i, (t, _) in enumerate(fixed.sent))


def test_duplication_and_reordering() -> None:
    dup = order(run(Impairment(duplicate=10)))
    assert 120 <= len(dup) - 2000 <= 280
    assert sorted(set(dup)) == list(range(2000)) and dup == sorted(dup)
    reordered = order(run(Impairment(delay_ms=10, reorder=10)))
    assert sorted(reordered) == list(range(2000)) and reordered != list(range(2000))
    # With a delay but no reordering asked, nothing overtakes.
    assert order(run(Impairment(delay_ms=10))) == list(range(2000))
