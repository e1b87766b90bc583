"""popd's parts that keep its loop free under load (docs/popd.md, "Load"): the directory's
changes coalesced into deltas, the token buckets of the event quota and the registration
rate, the event writer thread (real SQLite files), the loop-lag figures and the config."""

from __future__ import annotations

import asyncio
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sdwan.common.messages import Reassembler
from sdwan.common.store import Store, UploadedEvent
from sdwan.pop import pki
from sdwan.pop import popd as popd_mod
from sdwan.pop.account import load_account
from sdwan.pop.config import ConfigError, load_pop_config
from sdwan.pop.eventsink import EventLimits, EventSink
from sdwan.pop.looplag import LoopLag
from sdwan.pop.popd import DIRECTORY_PUSH_S, Pop
from sdwan.pop.ratelimit import Buckets

SITES = 5


def _config(tmp_path: Path, extra: str = "") -> Path:
    ca = tmp_path / "ca"
    if not ca.exists():
        pki.create_ca(ca, account="acme")
        pki.issue_pop(ca, 1, tmp_path / "pop")
    account = tmp_path / "account.toml"
    account.write_text(
        '[account]\nname = "acme"\n'
        + "".join(
            f'[[sites]]\nid = {i}\nsubnets = ["10.{i}.0.0/24"]\n' for i in range(1, SITES + 1)
        )
    )
    config = tmp_path / "pop.toml"
    config.write_text(
        textwrap.dedent("""
        [pop]
        id = 1
        account = "account.toml"
        [paths]
        data_dir = "data"
        control_socket = "popd.sock"
        [pki]
        ca = "ca/ca.pem"
        cert = "pop/pop-1.pem"
        key = "pop/pop-1.key"
    """)
        + extra
    )
    return config


# ------------------------------------------------------------------ the directory


@dataclass(eq=False)
class FakeSession:
    """What the directory reads of a site's session."""

    site_id: int
    port: int
    registered: bool = True
    precedence: int = 1
    link_index: int = 1
    link_name: str = "wan1"
    dir_rev: int | None = None
    dir_sent: Any = field(default_factory=list)
    dtls: Any = None  # records are sized for the fallback MTU

    @property
    def addr(self) -> tuple[str, int]:
        return ("198.51.100.1", self.port)

    @property
    def peer_id(self) -> int:
        return self.site_id << 8 | self.link_index


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        cfg = load_pop_config(_config(tmp_path))
        self.now = 0.0
        self.pop = Pop(cfg, clock=lambda: self.now)
        self.pop.account = load_account(cfg.account)
        self.sent: list[tuple[FakeSession, dict[str, Any]]] = []
        self.pop._send_records = self._send  # type: ignore[method-assign]
        self.sessions: dict[int, FakeSession] = {}

    def _send(self, s: Any, kind: str, records: list[bytes]) -> bool:
        """What a site would read: the records reassembled into the message."""
        reassembler = Reassembler()
        msgs = [m for m in (reassembler.feed(r) for r in records) if m is not None]
        assert len(msgs) == 1 and msgs[0]["t"] == kind
        self.sent.append((s, msgs[0]))
        return True

    def up(self, site_id: int) -> FakeSession:
        s = FakeSession(site_id, 40000 + site_id, dir_rev=self.pop.rev)
        self.sessions[site_id] = s
        self.pop._peer_put(s)  # type: ignore[arg-type]
        self.pop._update_entry(site_id)
        return s

    def down(self, site_id: int) -> None:
        self.pop._peer_pop(self.sessions.pop(site_id))  # type: ignore[arg-type]
        self.pop._update_entry(site_id)

    def settle(self) -> None:
        """Everything so far pushed, nothing recorded."""
        self.pop._broker_dirty = False
        self.now += DIRECTORY_PUSH_S
        self.pop._push_directory(self.now)
        self.sent.clear()

    def push(self, after: float) -> list[tuple[FakeSession, dict[str, Any]]]:
        self.now += after
        self.pop._broker_dirty = False
        self.pop._push_directory(self.now)
        out, self.sent = self.sent, []
        return out


def test_changes_within_the_interval_go_out_as_one_delta_per_session(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    for sid in range(1, SITES + 1):
        h.pop._update_entry(sid)
    a, b = h.up(1), h.up(2)
    h.settle()
    rev = h.pop.rev
    h.up(3)
    h.up(4)  # two sites come online in one burst
    pushed = h.push(DIRECTORY_PUSH_S)
    by = {s.site_id: m for s, m in pushed}
    assert sorted(by) == [1, 2, 3, 4] and len(pushed) == 4  # one message per session
    for s in (a, b):
        assert by[s.site_id]["t"] == "directory-delta"
        assert by[s.site_id]["base"] == rev and by[s.site_id]["rev"] == h.pop.rev == rev + 1
        assert [e["site_id"] for e in by[s.site_id]["changed"]] == [3, 4]
        assert all(e["online"] for e in by[s.site_id]["changed"])
    # A site is never sent its own entry.
    assert [e["site_id"] for e in by[3]["changed"]] == [4]
    assert [e["site_id"] for e in by[4]["changed"]] == [3]
    # The next change waits for the interval, then goes out with whatever came meanwhile.
    h.down(4)
    assert h.push(DIRECTORY_PUSH_S / 4) == []
    h.down(3)
    pushed = h.push(DIRECTORY_PUSH_S)
    assert sorted(s.site_id for s, _ in pushed) == [1, 2]
    for _, m in pushed:
        assert [(e["site_id"], e["online"]) for e in m["changed"]] == [(3, False), (4, False)]


def test_a_push_goes_out_in_slices_one_delta_per_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no time to spare per slice, each call sends to one session: the push spreads
    over turns of the loop, every session still gets its delta once, a session welcomed
    meanwhile (sent that rev already) gets none, and what changes meanwhile waits for the
    next push."""
    monkeypatch.setattr(popd_mod, "PUSH_SLICE_S", 0.0)
    h = Harness(tmp_path)
    for sid in range(1, SITES + 1):
        h.pop._update_entry(sid)
    for sid in (1, 2, 3, 4):
        h.up(sid)
    h.settle()
    while h.pop._round is not None:  # settle's push, slice by slice
        h.push(0)
    rev = h.pop.rev
    h.down(4)
    first = h.push(DIRECTORY_PUSH_S)
    assert [s.site_id for s, _ in first] == [1]  # one session in this slice
    assert h.pop.rev == rev + 1 and h.pop._round is not None
    h.sessions[3].dir_rev = h.pop.rev  # welcomed since the push began
    h.down(2)  # a change meanwhile: the next push's
    rest = []
    while h.pop._round is not None:
        rest += h.push(0)
    assert [s.site_id for s, _ in rest] == []  # 2 went away, 3 is current
    pushed = h.push(DIRECTORY_PUSH_S * 10)  # the next push, past its share of the loop
    while h.pop._round is not None:
        pushed += h.push(0)
    assert [(s.site_id, m["base"], m["rev"]) for s, m in pushed] == [
        (1, rev + 1, rev + 2), (3, rev + 1, rev + 2)]
    assert all([e["site_id"] for e in m["changed"]] == [2] for _, m in pushed)


def test_a_flap_within_the_interval_pushes_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    for sid in range(1, SITES + 1):
        h.pop._update_entry(sid)
    h.up(1)
    h.up(2)
    h.settle()
    rev = h.pop.rev
    h.down(2)
    h.up(2)  # back over the same address before the push
    assert h.push(DIRECTORY_PUSH_S) == []
    assert h.pop.rev == rev


def test_a_ping_that_crossed_a_push_is_no_gap_but_a_stale_one_is(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    for sid in range(1, SITES + 1):
        h.pop._update_entry(sid)
    a = h.up(1)
    a.dir_sent.append((a.dir_rev, h.now))
    h.settle()
    old = a.dir_rev
    h.up(3)
    h.push(DIRECTORY_PUSH_S)
    assert a.dir_rev != old
    # Sent before the delta arrived: no whole directory.
    assert h.pop._in_flight(a, old, h.now + 0.1)  # type: ignore[arg-type]
    # Still on the old rev well after: the delta was lost.
    assert not h.pop._in_flight(a, old, h.now + 5)  # type: ignore[arg-type]
    assert not h.pop._in_flight(a, 12345, h.now)  # type: ignore[arg-type]


# ------------------------------------------------------------------ quotas and rates


def test_buckets_grant_the_burst_then_the_rate_per_key() -> None:
    now = [0.0]
    b = Buckets(per_minute=60, burst=5, clock=lambda: now[0])
    assert b.take("a", 8) == 5  # the burst, no more
    assert b.take("b", 3) == 3  # another key has its own bucket
    assert not b.allow("a")
    now[0] += 2.0  # one a second
    assert b.take("a", 8) == 2
    now[0] += 120.0  # full again, and forgotten at the next sweep
    assert b.allow("c")
    assert len(b) == 1


# ------------------------------------------------------------------ the writer thread


def _run_sink(tmp_path: Path, limits: EventLimits, body: Any) -> Store:
    db = tmp_path / "popd.db"
    Store(db).close()

    async def main() -> None:
        sink = EventSink(db, limits)
        sink.start(asyncio.get_running_loop())
        try:
            await body(sink)
        finally:
            sink.close()

    asyncio.run(main())
    return Store(db)


def test_writer_stores_batches_in_order_with_per_site_retention(tmp_path: Path) -> None:
    results: list[tuple[int, Any, Any]] = []

    async def body(sink: EventSink) -> None:
        sink.add_own("popd.account.loaded", "account acme", None, None)
        for batch in range(3):
            events = [UploadedEvent("x", f"site 7 #{batch}.{i}", 7) for i in range(10)]
            sink.upload(
                7,
                events,
                ("site.7.events", {"up_to": batch}),
                lambda r, e, n=batch: results.append((n, r, e)),
            )
        sink.upload(
            8,
            [UploadedEvent("x", "site 8", 8)],
            ("site.8.events", {"up_to": 1}),
            lambda r, e: results.append((8, r, e)),
        )
        done = asyncio.get_running_loop().create_future()
        sink.barrier(lambda: done.set_result(True))
        await asyncio.wait_for(done, 10)
        assert sink.stats.queued == 0 and sink.stats.transactions == 5

    store = _run_sink(tmp_path, EventLimits(site_keep=15), body)
    assert [n for n, _, _ in results] == [0, 1, 2, 8]  # told in order, on the loop
    assert all(r is not None and e is None for _, r, e in results)
    assert store.count_events(7) == 15 and store.count_events(8) == 1
    assert store.count_events(own=True) == 1  # site 7's flood evicted only its own
    assert store.get_doc("site.7.events").value == {"up_to": 2}
    store.close()


def test_writer_writes_everything_queued_before_it_closes(tmp_path: Path) -> None:
    async def body(sink: EventSink) -> None:
        for i in range(2000):
            sink.add_own("popd.test", f"own {i}", None, None)

    store = _run_sink(tmp_path, EventLimits(), body)
    assert store.count_events(own=True) == 2000
    assert [e.text for e in store.events(limit=1)] == ["own 1999"]
    store.close()


def test_writer_reports_a_failed_batch(tmp_path: Path) -> None:
    results: list[tuple[Any, Any]] = []

    async def body(sink: EventSink) -> None:
        done = asyncio.get_running_loop().create_future()

        def told(r: Any, e: Any) -> None:
            results.append((r, e))
            done.set_result(True)

        sink.upload(7, [UploadedEvent("x", "y", 7)], ("bad name!", {}), told)
        await asyncio.wait_for(done, 10)
        assert sink.stats.write_errors == 1 and sink.stats.last_error

    store = _run_sink(tmp_path, EventLimits(), body)
    assert results[0][0] is None and "document name" in results[0][1]
    assert store.count_events(7) == 0  # nothing of the batch was written
    store.close()


def test_writer_fails_a_sites_batches_queued_behind_its_failed_one(tmp_path: Path) -> None:
    """A batch queued behind one that failed, before popd heard of the failure, carries a
    mark past the failed events: stored and acknowledged, it would make the site forget
    them. It fails unwritten; a batch of the next epoch (queued after) is written."""
    results: list[tuple[int, Any, Any]] = []

    async def body(sink: EventSink) -> None:
        done = asyncio.get_running_loop().create_future()

        def told(n: int, r: Any, e: Any) -> None:
            results.append((n, r, e))
            if len(results) == 4:
                done.set_result(True)

        sink.upload(7, [UploadedEvent("x", "a", 7)], ("bad name!", {}), lambda r, e: told(0, r, e))
        sink.upload(7, [UploadedEvent("x", "b", 7)], ("site.7.events", {"up_to": 2}),
                    lambda r, e: told(1, r, e))
        sink.upload(8, [UploadedEvent("x", "c", 8)], ("site.8.events", {"up_to": 1}),
                    lambda r, e: told(2, r, e))
        sink.upload(7, [UploadedEvent("x", "d", 7)], ("site.7.events", {"up_to": 1}),
                    lambda r, e: told(3, r, e), epoch=1)
        await asyncio.wait_for(done, 10)
        assert sink.stats.queued == 0

    store = _run_sink(tmp_path, EventLimits(), body)
    assert [(n, r is None) for n, r, _ in results] == [(0, True), (1, True), (2, False),
                                                       (3, False)]
    assert "earlier batch" in results[1][2]
    assert [e.text for e in store.events(site_id=7)] == ["d"]
    assert store.get_doc("site.7.events").value == {"up_to": 1}
    store.close()


# ------------------------------------------------------------------ loop lag


def test_loop_lag_keeps_the_window_and_the_largest_ever() -> None:
    now = [0.0]
    lag = LoopLag(window_s=5, clock=lambda: now[0])
    for i in range(100):
        now[0] = i * 0.1
        lag.record(now[0], 0.5 if i == 5 else 0.001)
    st = lag.status()
    assert st["max_stall_ms"] == 1.0 and st["max_stall_ever_ms"] == 500.0  # 0.5 s, 9.4 s ago
    assert st["p99_ms"] == 1.0 and st["samples"] == 100 and st["max_stall_ever_ago_s"] == 9.4

    async def run() -> LoopLag:
        real = LoopLag(interval_s=0.01)
        stop = asyncio.Event()
        task = asyncio.create_task(real.run(stop))
        await asyncio.sleep(0.05)
        import time

        time.sleep(0.2)  # the loop is held up
        await asyncio.sleep(0.05)
        stop.set()
        await task
        return real

    real = asyncio.run(run())
    assert real.status()["max_stall_ever_ms"] >= 150


# ------------------------------------------------------------------ config


def test_events_and_register_tables_are_checked(tmp_path: Path) -> None:
    cfg = load_pop_config(_config(tmp_path))
    assert cfg.events == EventLimits() and cfg.register.site_burst == 10
    cfg = load_pop_config(
        _config(tmp_path, "[events]\nsite_keep = 50\n[register]\nsite_burst = 3\n")
    )
    assert cfg.events.site_keep == 50 and cfg.register.site_burst == 3
    with pytest.raises(ConfigError) as e:
        load_pop_config(_config(tmp_path, "[events]\nsite_keep = 5\nbogus = 1\n"))
    text = str(e.value)
    assert "events.site_keep" in text and "events.bogus" in text or "bogus" in text
