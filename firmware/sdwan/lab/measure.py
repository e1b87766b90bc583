"""What the benchmarks measure with: a ping stream whose replies' times are read as they come
(how long traffic paused around a fault), and the median and p95 of a figure over repeats.
Shared by bench/recovery and bench/links; `proc_cpu_s` by bench/mesh and bench/popd."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

PING_PAUSE_S = 0.1  # a gap between replies of a 10 ms ping this long is an outage
NO_PAUSE_AFTER_S = 1.0  # replies on this long after a fault with no such gap: none came
_PING_TS = re.compile(r"^\[(\d+\.\d+)\].*bytes from")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of pid (all its threads) in seconds, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """Median and p95 (linear interpolation between order statistics, as numpy's default)."""
    if not values:
        return {"median": None, "p95": None}
    v = sorted(values)
    pos = 0.95 * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    p95 = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return {"median": round(statistics.median(v), 4), "p95": round(p95, 4)}


class PingStream:
    """ping -D every 10 ms from a LAN host, its replies' wall-clock times read as they come."""

    def __init__(self, ns: str, dst: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "ping", "-D", "-n", "-i", "0.01", "-W", "1", dst],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        self.replies: list[float] = []
        self._buf = ""

    def _read(self) -> None:
        try:
            chunk = self.proc.stdout.read()  # type: ignore[union-attr]
        except (BlockingIOError, TypeError):
            return
        if not chunk:
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            m = _PING_TS.match(line)
            if m:
                self.replies.append(float(m.group(1)))

    def first_reply_after(self, t: float) -> float | None:
        self._read()
        return next((r for r in self.replies if r > t), None)

    def resumed_after(self, t: float) -> float | None:
        """Seconds from t to the first reply after the pause that spans t (replies still in
        flight at t do not count); when replies went on after t with no pause at all (a move
        faster than PING_PAUSE_S), from t to the first reply after it, once replies have run
        on for NO_PAUSE_AFTER_S; None while neither is known."""
        self._read()
        prev = None
        first = None
        for r in self.replies:
            if r > t:
                if prev is not None and r - prev > PING_PAUSE_S:
                    return r - t
                if first is None:
                    first = r
                elif r - t > NO_PAUSE_AFTER_S:
                    return first - t
            prev = r
        return None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
