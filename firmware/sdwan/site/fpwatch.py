"""Watching the fast path's threads (docs/watchdog.md, "A data-path thread that dies").

The C fast path moves packets in threads of its own. One that leaves its loop on an error
says why (fp_threads_status); without this watch the supervisor would go on petting the
hardware watchdog of a box that forwards nothing. Every tick `FastPathWatch.tick()` reads
the fast path's death counter (one atomic load) and, when it moved or a thread is still
dead from an earlier tick, the threads' states: each death not reported yet is a
`fastpath.thread_died` event with its reason, and every thread that is DIED is started again
in the same instance, where the peers, keys and routes still are
(`fastpath.thread_restarted`). What the tick decides follows from the threads' state, not
from what it managed to say: an event sink that fails does not keep a dead thread dead.

A restart refused with ENODEV (the thread's device is gone, a new thread would die at once)
is final. Any other refusal (EAGAIN or ENOMEM from pthread_create) is retried on the next
tick and counts as a death. More than `max_deaths` deaths and failed restarts within
`window_s` are final too. Final makes the fast path *failed*: one `fastpath.failed` event
says why, and the supervisor decides what follows (`on_failed`). The LEDs show `error`
while it has failed and for `error_hold_s` after a death.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdwan.bindings.fastpath import FastPath, FastPathError, ThreadKind, ThreadState, ThreadStatus

log = logging.getLogger("sdwan.site.fpwatch")

EVENT_DIED = "fastpath.thread_died"
EVENT_RESTARTED = "fastpath.thread_restarted"
EVENT_FAILED = "fastpath.failed"
EVENT_RESTART_FAILED = "fastpath.restart_failed"

EventSink = Callable[[str, str, dict], None]


@dataclass
class FastPathWatch:
    fp: FastPath
    on_event: EventSink
    link_name: Callable[[int], str] = str  # link id -> its name, for the texts
    clock: Callable[[], float] = time.monotonic
    # More deaths and failed restarts than this within window_s: not restarted again.
    max_deaths: int = 3
    window_s: float = 60.0
    error_hold_s: float = 60.0  # the LEDs show error this long after a death
    # Told why once the fast path has failed: the supervisor holds the watchdog, exits or
    # stays up. It returns what follows, for the event ("no longer petting the watchdog, ...").
    on_failed: Callable[[str], str] | None = None
    failed: str | None = None  # why the fast path is beyond a restart
    outcome: str | None = None  # what followed the failure (on_failed's answer)
    restarts: int = 0  # threads started again
    restart_failures: int = 0  # restarts refused with an error that is retried
    last_death: dict[str, Any] | None = None
    _seen: int = 0  # the fast path's death counter when last looked at
    _deaths: deque[float] = field(default_factory=deque)  # clock of recent deaths/failures
    _last_death_at: float | None = None
    _reported: dict[tuple[int, int | None], int] = field(default_factory=dict)  # deaths told
    _pending: bool = False  # a thread was left dead (a restart failed, or the tick raised)

    def tick(self) -> None:
        """Cheap when nothing died: one call into C."""
        count = self.fp.thread_deaths()
        now = self.clock()
        if count != self._seen:
            # Counted even once failed: status tells the deaths that followed.
            new, self._seen = max(0, count - self._seen), count
            self._last_death_at = now
            self._deaths.extend([now] * new)
        elif not self._pending:
            return
        if self.failed is not None:
            return
        # Until this tick has restarted every dead thread, the next one looks again.
        self._pending = True
        self._prune(now)
        dead = [t for t in self.fp.threads() if t.state is ThreadState.DIED]
        for t in dead:
            if t.deaths > self._reported.get(self._key(t), 0):
                self._reported[self._key(t)] = t.deaths
                self._safely(self._died, t)
        if not dead:
            self._pending = False
            return  # a link deleted since it died: nothing left to restart
        if len(self._deaths) > self.max_deaths:
            self._fail(
                f"fast path threads died {len(self._deaths)} times in {self.window_s:g} s"
                f" (last: the {self._name(dead[0])}, {self._reason(dead)}): not restarted again",
                dead,
            )
            return
        before = {self._key(t): t.restarts for t in dead}
        try:
            self.fp.threads_restart()
            error: FastPathError | None = None
        except FastPathError as e:
            error = e
        after = self.fp.threads()
        started = [t for t in after if t.restarts > before.get(self._key(t), t.restarts)]
        self.restarts += len(started)
        still = [t for t in after if t.state is ThreadState.DIED]
        if started:
            names = ", ".join(f"the {self._name(t)}" for t in started)
            text = f"fast path restarted {names} after it died ({self._reason(dead)})"
            self._safely(log.warning, "%s", text)
            self._safely(self.on_event, EVENT_RESTARTED, text,
                         {"threads": [self._thread_data(t) for t in started],
                          "restarts": len(started)})
        if error is None and not still:
            self._pending = False
            return
        err = (error.errno if error is not None else 0) or 0
        who = ", ".join(f"the {self._name(t)}" for t in still) or "a thread"
        what = f"{who}: {os.strerror(err)} ({errno.errorcode.get(err, str(err))})" if err \
            else who
        if err == errno.ENODEV:
            self._fail(f"fast path could not be restarted ({what})", still)
            return
        # Transient (EAGAIN, ENOMEM: no thread now): next tick again, within the budget.
        self.restart_failures += 1
        self._deaths.append(now)
        self._last_death_at = now
        if len(self._deaths) > self.max_deaths:
            self._fail(
                f"fast path threads died or could not be restarted {len(self._deaths)} times"
                f" in {self.window_s:g} s (last: {what}): not restarted again",
                still,
            )
            return
        text = f"fast path could not restart {what}: trying again"
        self._safely(log.error, "%s", text)
        self._safely(self.on_event, EVENT_RESTART_FAILED, text,
                     {"threads": [self._thread_data(t) for t in still], "errno": err})

    @property
    def fault(self) -> bool:
        """The LEDs' error: failed, or a thread died within error_hold_s."""
        return self.failed is not None or (
            self._last_death_at is not None
            and self.clock() - self._last_death_at < self.error_hold_s
        )

    def status(self) -> dict[str, Any]:
        threads = self.fp.threads()
        self._prune(self.clock())
        return {
            "threads": [self._thread_data(t) for t in threads],
            "deaths": self._seen,
            "deaths_in_window": len(self._deaths),
            "window_s": self.window_s,
            "restarts": self.restarts,
            "restart_failures": self.restart_failures,
            "last_death": self.last_death,
            "failed": self.failed,
            "outcome": self.outcome,
        }

    # ------------------------------------------------------------------ internals

    def _prune(self, now: float) -> None:
        while self._deaths and now - self._deaths[0] > self.window_s:
            self._deaths.popleft()

    @staticmethod
    def _key(t: ThreadStatus) -> tuple[int, int | None]:
        return (int(t.kind), t.link_id)

    @staticmethod
    def _safely(call: Callable[..., Any], *args: Any) -> None:
        """An event or a log line that fails must not keep a thread dead."""
        try:
            call(*args)
        except Exception:
            log.exception("fast path watch: reporting failed")

    def _name(self, t: ThreadStatus) -> str:
        if t.kind is ThreadKind.TUN:
            return "TUN thread"
        assert t.link_id is not None
        return f"link {self.link_name(t.link_id)} thread"

    @staticmethod
    def _reason(dead: list[ThreadStatus]) -> str:
        return "; ".join(t.reason for t in dead) or "it was gone before it could be looked at"

    def _thread_data(self, t: ThreadStatus) -> dict[str, Any]:
        return {
            "thread": "tun" if t.kind is ThreadKind.TUN else "link",
            "link": self.link_name(t.link_id) if t.link_id is not None else None,
            "state": t.state.name.lower(),
            "reason": t.reason or None,
            "deaths": t.deaths,
            "restarts": t.restarts,
        }

    def _died(self, t: ThreadStatus) -> None:
        text = f"fast path {self._name(t)} died: {t.reason}"
        self.last_death = {**self._thread_data(t), "at": time.time()}
        self._safely(log.error, "%s", text)
        self.on_event(EVENT_DIED, text, self._thread_data(t))

    def _fail(self, why: str, dead: list[ThreadStatus]) -> None:
        self.failed = why
        self._pending = False
        then = None
        if self.on_failed is not None:
            try:
                then = self.on_failed(why)
            except Exception:
                log.exception("fast path watch: acting on the failure failed")
        self.outcome = then
        text = f"{why}; {then}" if then else why
        self._safely(log.error, "%s", text)
        self._safely(self.on_event, EVENT_FAILED, text,
                     {"threads": [self._thread_data(t) for t in dead]})
