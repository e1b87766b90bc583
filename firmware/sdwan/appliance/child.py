"""A helper program socketd keeps running for as long as it runs (the LAN's udhcpd, chronyd):
started once what it needs is there, with its output kept, started again after an exit with a
delay that doubles while it keeps failing, stopped with TERM then KILL, and its exits said once
per streak rather than at every restart. It dies with socketd (PR_SET_PDEATHSIG), so a
SIGKILLed socketd leaves no orphan behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sdwan.appliance.wanaddr import die_with_parent

log = logging.getLogger(__name__)

RESTART_S = 1.0  # the first restart's delay; doubled per quick exit, up to RESTART_MAX_S
RESTART_MAX_S = 60.0
STABLE_S = 30.0  # a run this long ends a streak of failures
STOP_S = 3.0  # TERM, then KILL after this long
OUTPUT_KEPT = 8  # its last lines, kept to say why it exited


async def _read_line(stream: asyncio.StreamReader) -> bytes:
    """The next line of its output (b"" at the end): one longer than the reader's limit
    is left out instead of ending the watch of the program with a ValueError."""
    try:
        return await stream.readline()
    except ValueError:
        return b"[a line longer than 64 KiB, left out]\n"


@dataclass
class ChildState:
    state: str = "off"  # off, waiting (before_start said why), running, restarting, failed,
    # stopped
    pid: int | None = None
    started_at: float | None = None
    restarts: int = 0
    failures: int = 0  # exits in a row, each after less than STABLE_S
    error: str | None = None
    retry_at: float | None = None  # when it is started again (waiting, restarting)
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_KEPT))


class Child:
    """One program, kept running. `argv` is asked for at every start (None and a reason:
    it cannot run, said once, never retried); `before_start` is awaited first (a reason: not
    yet, asked again after the delay); `prepare` runs just before each start (its config
    file); `on_started(pid)` after it; `env()` its whole environment (None: socketd's);
    `record(text, data)` says what an operator must hear,
    the program named by `label`."""

    def __init__(
        self, name: str, argv: Callable[[], tuple[list[str] | None, str | None]],
        record: Callable[[str, dict[str, Any]], None], *,
        label: str | None = None,
        before_start: Callable[[], Awaitable[str | None]] | None = None,
        prepare: Callable[[], None] | None = None,
        on_started: Callable[[int], None] | None = None,
        env: Callable[[], dict[str, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.label = label or name
        self.argv = argv
        self.record = record
        self.before_start = before_start
        self.prepare = prepare
        self.on_started = on_started
        self.env = env
        self.clock = clock
        self.st = ChildState()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        proc = self._proc
        if self.st.state != "off":
            self.st.state = "stopped"
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _said(self, error: str) -> str:
        """An error as an event says it: after the label, unless that is just the name."""
        return error if self.label == self.name else f"{self.label}: {error}"

    @property
    def running(self) -> bool:
        return self.st.state == "running"

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        """The running process (to signal it), None between runs."""
        return self._proc

    async def _run(self) -> None:
        st = self.st
        delay = RESTART_S
        while not self._stopping:
            if self.before_start is not None:
                why = await self.before_start()
                if why is not None:
                    st.state, st.error, st.retry_at = "waiting", why, self.clock() + delay
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RESTART_MAX_S)
                    continue
            # Off the loop: finding the program may run another (busybox's applet list).
            argv, why = await asyncio.to_thread(self.argv)
            if argv is None:
                # Nothing will change that while socketd runs: said once, not retried.
                st.state, st.error = "failed", why
                log.error("%s not started: %s", self.label, why)
                self.record(f"{self.label} not started: {why}", {"error": why})
                return
            ran = await self._serve(argv)
            if self._stopping:
                return
            if ran >= STABLE_S:
                delay, st.failures = RESTART_S, 0
            st.failures += 1
            st.state, st.retry_at = "restarting", self.clock() + delay
            log.warning("%s: %s; starting it again in %g s", self.label, st.error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)
            st.restarts += 1

    async def _serve(self, argv: list[str]) -> float:
        """Run it until it exits; how long it ran (0 when it did not start)."""
        st = self.st
        try:
            if self.prepare is not None:
                self.prepare()
            self._proc = proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent,
                env=self.env() if self.env is not None else None,
            )
        except OSError as e:
            st.error = f"cannot start {argv[0]}: {e.strerror or e}"
            if st.failures == 0:
                # The first of a streak, as for exits: the rest only in the log and status.
                self.record(self._said(st.error), {"error": st.error})
            return 0.0
        started = st.started_at = self.clock()
        st.state, st.error, st.pid, st.retry_at = "running", None, proc.pid, None
        st.output.clear()
        log.info("%s started (pid %d)", self.label, proc.pid)
        if self.on_started is not None:
            self.on_started(proc.pid)
        assert proc.stdout is not None
        while raw := await _read_line(proc.stdout):
            line = raw.decode(errors="replace").rstrip()
            st.output.append(line)
            log.info("%s: %s", self.name, line)
        rc = await proc.wait()
        self._proc, st.started_at, st.pid = None, None, None
        ran = self.clock() - started
        error = f"{self.name} exited with status {rc}"
        if rc < 0:
            with contextlib.suppress(ValueError):
                error = f"{self.name} was killed by {signal.Signals(-rc).name}"
        last = st.output[-1] if st.output else ""
        st.error = error + (f": {last}" if last else "")
        if not self._stopping and (st.failures == 0 or ran >= STABLE_S):
            # The first exit of a streak; the next ones only in the log and status.
            self.record(self._said(st.error), {"status": rc})
        return ran

    def status(self) -> dict[str, Any]:
        st = self.st
        return {
            "state": st.state,
            "pid": st.pid,
            "up_s": round(self.clock() - st.started_at, 1) if st.started_at else None,
            "restarts": st.restarts,
            "error": st.error,
            "retry_in_s": (round(max(0.0, st.retry_at - self.clock()), 1)
                           if st.retry_at is not None and st.state != "running" else None),
            "output": list(st.output),
        }
