"""Watching the fast path's threads (docs/watchdog.md, "A data-path thread that dies").

The C fast path moves packets in threads of its own. One that leaves its loop on an error
says why (fp_threads_status); without this watch the supervisor would go on petting the
hardware watchdog of a box that forwards nothing. Every tick `FastPathWatch.tick()` reads
the fast path's death counter (one atomic load); when it moved, it records a
`fastpath.thread_died` event per dead thread with its reason and starts the dead threads
again in the same instance, where the peers, keys and routes still are
(`fastpath.thread_restarted`). A restart that fails (the thread's device is gone), or
threads that keep dying (more than `max_deaths` deaths within `window_s`), make the fast
path *failed*: one `fastpath.failed` event says why, and the supervisor stops petting the
watchdog so that the box resets. The LEDs show `error` while it has failed and for
`error_hold_s` after a death.
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

EventSink = Callable[[str, str, dict], None]


@dataclass
class FastPathWatch:
    fp: FastPath
    on_event: EventSink
    link_name: Callable[[int], str] = str  # link id -> its name, for the texts
    clock: Callable[[], float] = time.monotonic
    max_deaths: int = 3  # more deaths than this within window_s: not restarted again
    window_s: float = 60.0
    error_hold_s: float = 60.0  # the LEDs show error this long after a death
    # Told why once the fast path has failed: the supervisor stops the watchdog's pets. It
    # returns what follows, for the event ("no longer petting the watchdog, ...").
    on_failed: Callable[[str], str] | None = None
    failed: str | None = None  # why the fast path is beyond a restart; the pets stop
    restarts: int = 0
    last_death: dict[str, Any] | None = None
    _seen: int = 0  # the fast path's death counter when last looked at
    _deaths: deque[float] = field(default_factory=deque)  # clock of recent deaths
    _last_death_at: float | None = None

    def tick(self) -> None:
        """Cheap when nothing died: one call into C."""
        if self.failed is not None:
            return
        count = self.fp.thread_deaths()
        if count == self._seen:
            return
        new, self._seen = count - self._seen, count
        now = self.clock()
        self._last_death_at = now
        self._deaths.extend([now] * new)
        while self._deaths and now - self._deaths[0] > self.window_s:
            self._deaths.popleft()
        dead = [t for t in self.fp.threads() if t.state is ThreadState.DIED]
        for t in dead:
            self._died(t)
        if len(self._deaths) > self.max_deaths:
            what = self._name(dead[0]) if dead else "a thread"
            self._fail(
                f"fast path threads died {len(self._deaths)} times in {self.window_s:g} s"
                f" (last: the {what}, {self._reason(dead)}): not restarted again",
                dead,
            )
            return
        if not dead:
            return  # a link deleted since it died: nothing left to restart
        try:
            n = self.fp.threads_restart()
        except FastPathError as e:
            still = [t for t in self.fp.threads() if t.state is ThreadState.DIED]
            who = ", ".join(f"the {self._name(t)}" for t in still) or "a thread"
            err = e.errno or 0
            code = errno.errorcode.get(err, str(err))
            self._fail(f"fast path could not be restarted ({who}: {os.strerror(err)} ({code}))",
                       still)
            return
        self.restarts += n
        names = ", ".join(f"the {self._name(t)}" for t in dead)
        text = f"fast path restarted {names} after it died ({self._reason(dead)})"
        log.warning("%s", text)
        self.on_event(EVENT_RESTARTED, text,
                      {"threads": [self._thread_data(t) for t in dead], "restarts": n})

    @property
    def fault(self) -> bool:
        """The LEDs' error: failed, or a thread died within error_hold_s."""
        return self.failed is not None or (
            self._last_death_at is not None
            and self.clock() - self._last_death_at < self.error_hold_s
        )

    def status(self) -> dict[str, Any]:
        threads = self.fp.threads()
        return {
            "threads": [self._thread_data(t) for t in threads],
            "deaths": self._seen,
            "deaths_in_window": len(self._deaths),
            "window_s": self.window_s,
            "restarts": self.restarts,
            "last_death": self.last_death,
            "failed": self.failed,
        }

    # ------------------------------------------------------------------ internals

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
        log.error("%s", text)
        self.last_death = {**self._thread_data(t), "at": time.time()}
        self.on_event(EVENT_DIED, text, self._thread_data(t))

    def _fail(self, why: str, dead: list[ThreadStatus]) -> None:
        self.failed = why
        then = self.on_failed(why) if self.on_failed is not None else None
        text = f"{why}; {then}" if then else why
        log.error("%s", text)
        self.on_event(EVENT_FAILED, text, {"threads": [self._thread_data(t) for t in dead]})
