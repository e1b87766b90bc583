"""popd's event store, off the event loop: what sites upload and popd's own events, written by
one thread with its own SQLite connection, so no fsync ever runs on the loop that answers the
sites (docs/popd.md, "Events").

* One transaction per uploaded batch (the events, that site's retention and its upload mark
  together, `Store.add_events`), and one per run of popd's own events queued together.
* Order is kept: one thread takes the jobs in the order they were queued.
* The loop is told when a batch is stored (`on_done`, called on the loop): only then does
  popd acknowledge it, so an acknowledged event is on disk.
* Per-site quota (a token bucket per site, pop/ratelimit.py, kept by popd): a site's events
  over its rate are dropped and counted against that site alone; the retention of each
  site keeps its own newest `site_keep`, and popd's own `pop_keep`, so no site evicts
  another's or the PoP's events.
* `close()` writes everything queued before it returns; a write that fails is logged,
  counted and reported to its caller (an upload is then not acknowledged: the site sends it
  again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.common.store import Store, StoreError, UploadedEvent, UploadResult

log = logging.getLogger("sdwan.pop.eventsink")

OWN_BATCH = 512  # popd's own events written in one transaction at most
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class EventLimits:
    """popd config `[events]` (docs/popd.md)."""

    site_keep: int = 1000  # the newest events kept per site
    pop_keep: int = 10_000  # the newest of popd's own events kept
    site_per_minute: int = 600  # a site's sustained upload rate; beyond it, dropped
    site_burst: int = 1000  # what a site may upload at once (a backlog after an outage)
    backlog: int = 50_000  # events queued for the writer; beyond, uploads wait (not acked)


@dataclass
class SinkStats:
    queued: int = 0  # events waiting for the writer
    transactions: int = 0
    events_written: int = 0
    events_evicted: int = 0  # by retention (each origin its own)
    write_errors: int = 0
    last_error: str | None = None
    max_write_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "transactions": self.transactions,
            "written": self.events_written,
            "evicted": self.events_evicted,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
            "max_write_ms": round(self.max_write_ms, 1),
        }


@dataclass
class _Own:
    event: UploadedEvent


@dataclass
class _Upload:
    site_id: int
    events: list[UploadedEvent]
    doc: tuple[str, dict[str, Any]]
    on_done: Callable[[UploadResult | None, str | None], None]
    epoch: int = 0


@dataclass
class _Barrier:
    on_done: Callable[[], None]


_STOP = object()


class EventSink:
    """The writer thread and its queue; every method but the callbacks is for the loop."""

    def __init__(self, path: Path, limits: EventLimits) -> None:
        self.path = path
        self.limits = limits
        self.stats = SinkStats()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # stats shared with the thread
        self._opened = threading.Event()
        self._open_error: str | None = None
        # Per site, the epoch of its last batch that failed (writer thread only): its batches
        # of that epoch queued behind it fail too, unwritten (see upload).
        self._failed: dict[int, int] = {}

    # ------------------------------------------------------------------ loop side

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the thread and open its connection; StoreError if it cannot."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="popd-events", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            self._thread.join()
            raise StoreError(self._open_error)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def backlog_full(self) -> bool:
        return self.stats.queued >= self.limits.backlog

    def add_own(
        self, kind: str, text: str, site_id: int | None, data: dict[str, Any] | None
    ) -> None:
        """One of popd's own events; written with the others queued beside it."""
        with self._lock:
            self.stats.queued += 1
        self._q.put(_Own(UploadedEvent(kind, text, site_id, data)))

    def upload(
        self,
        site_id: int,
        events: list[UploadedEvent],
        doc: tuple[str, dict[str, Any]],
        on_done: Callable[[UploadResult | None, str | None], None],
        epoch: int = 0,
    ) -> None:
        """A site's batch, with its upload mark; on_done(result, error) runs on the loop once
        it is stored (error None) or failed (result None).

        `epoch` is the caller's count of the site's failed batches when it queued this one.
        Once a batch fails, the site's later batches of the same epoch (queued before the
        caller heard of the failure, their marks counted past the failed events) fail too
        without being written: otherwise one of them would store its mark past events never
        stored, and its acknowledgement would make the site forget them."""
        with self._lock:
            self.stats.queued += len(events)
        self._q.put(_Upload(site_id, events, doc, on_done, epoch))

    def barrier(self, on_done: Callable[[], None]) -> None:
        """on_done runs on the loop once everything queued before it is written (or failed):
        a read after it sees every event popd stored until now."""
        self._q.put(_Barrier(on_done))

    def close(self) -> None:
        """Write everything queued, then close the connection."""
        if self._thread is None:
            return
        self._q.put(_STOP)
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.error(
                "event writer still busy after %.0f s: %d event(s) not written",
                STOP_TIMEOUT_S,
                self.stats.queued,
            )
        self._thread = None

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        try:
            store = Store(self.path, max_events=self.limits.pop_keep)
        except (StoreError, OSError) as e:
            self._open_error = f"event writer: {e}"
            self._opened.set()
            return
        self._opened.set()
        try:
            pending: list[Any] = []
            while True:
                job = pending.pop(0) if pending else self._q.get()
                if job is _STOP:
                    break
                if isinstance(job, _Own):
                    own = [job.event]
                    # Every own event queued right behind it goes in the same transaction.
                    while len(own) < OWN_BATCH:
                        try:
                            nxt = self._q.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(nxt, _Own):
                            own.append(nxt.event)
                        else:
                            pending.append(nxt)
                            break
                    self._write(store, own, None, None)
                elif isinstance(job, _Barrier):
                    self._call(job.on_done)
                elif self._failed.get(job.site_id) == job.epoch:
                    with self._lock:
                        self.stats.queued -= len(job.events)
                    self._call(job.on_done, None, "an earlier batch of the site was not stored")
                else:
                    result, error = self._write(store, job.events, job.site_id, job.doc)
                    if result is None:
                        self._failed[job.site_id] = job.epoch
                    self._call(job.on_done, result, error)
        finally:
            store.close()

    def _write(
        self,
        store: Store,
        events: list[UploadedEvent],
        origin: int | None,
        doc: tuple[str, dict[str, Any]] | None,
    ) -> tuple[UploadResult | None, str | None]:
        t0 = time.monotonic()
        result: UploadResult | None = None
        error: str | None = None
        try:
            keep = None if origin is None else self.limits.site_keep
            result = store.add_events(events, origin, keep=keep, doc=doc)
        except (StoreError, ValueError) as e:
            error = str(e)
        ms = (time.monotonic() - t0) * 1000
        with self._lock:
            self.stats.queued -= len(events)
            self.stats.max_write_ms = max(self.stats.max_write_ms, ms)
            if result is not None:
                self.stats.transactions += 1
                self.stats.events_written += result.stored
                self.stats.events_evicted += result.evicted
            else:
                self.stats.write_errors += 1
                self.stats.last_error = error
        if error is not None:
            what = "popd's own events" if origin is None else f"site {origin}'s events"
            log.error("%d of %s not stored: %s", len(events), what, error)
        return result, error

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # The loop closed meanwhile: popd is stopping, the site sends the batch again.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)
