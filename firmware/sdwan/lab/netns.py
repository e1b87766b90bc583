"""Small typed helpers over iproute2, sysctl and nft, run inside network namespaces.

This module owns every subprocess the lab starts: short commands (`run`, bounded by a
timeout, failing with the command, the namespace and stderr) and long-lived daemons
(`popen`, wrapped in coreutils `timeout` so that even an orphaned daemon dies on its own,
and `stop` to end them TERM-then-KILL). Namespace, veth, bridge, address, route and sysctl
helpers are thin wrappers so the topology code reads like the network it builds.

Everything here acts on namespaces by name; `ns=None` means the namespace of the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = 20.0
# A daemon outlives its owner by at most this long if the owner is SIGKILLed.
DAEMON_MAX_S = 3600

_PR_SET_PDEATHSIG = 1


class NetnsError(RuntimeError):
    """A lab command failed or timed out; the message names the command, namespace and stderr."""

    def __init__(self, argv: Sequence[str], ns: str | None, detail: str) -> None:
        where = f"in netns {ns}" if ns else "in the root namespace"
        super().__init__(f"`{' '.join(argv)}` {where}: {detail}")
        self.argv = list(argv)
        self.ns = ns
        self.detail = detail


def _wrap(ns: str | None, argv: Sequence[str]) -> list[str]:
    if ns is None:
        return list(argv)
    return ["ip", "netns", "exec", ns, *argv]


def run(
    ns: str | None,
    argv: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv in namespace ns, bounded by timeout; raise NetnsError on failure if check."""
    full = _wrap(ns, argv)
    try:
        cp = subprocess.run(
            full,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(argv, ns, f"timed out after {timeout:g} s") from e
    except FileNotFoundError as e:
        raise NetnsError(argv, ns, f"command not found: {e.filename}") from e
    if check and cp.returncode != 0:
        err = (cp.stderr or cp.stdout).strip()[-2000:]
        raise NetnsError(argv, ns, f"exit status {cp.returncode}: {err or '(no output)'}")
    return cp


def _pdeathsig() -> None:
    # Ties the wrapper's life to its owner: if the Python process is SIGKILLed the
    # wrapper gets TERM and forwards it to the daemon, so nothing keeps running.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Daemon:
    """A long-running process started by `popen`; pid is the `timeout` wrapper's."""

    name: str
    ns: str | None
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def main_pid(self, timeout: float = 2.0) -> int | None:
        """Pid of the daemon itself (the wrapper's child), or None if it is gone."""
        deadline = time.monotonic() + timeout
        while True:
            kids = children_of(self.proc.pid)
            if kids:
                return kids[0]
            if not self.alive() or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def log_tail(self, max_bytes: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-max_bytes:]
        return data.decode(errors="replace")


def popen(
    ns: str | None,
    argv: Sequence[str],
    log_path: Path | None,
    name: str | None = None,
    env: dict[str, str] | None = None,
    max_lifetime_s: int = DAEMON_MAX_S,
    cwd: Path | None = None,
) -> Daemon:
    """Start a daemon in ns with stdout+stderr to log_path; it dies after max_lifetime_s anyway."""
    full = ["timeout", "-k", "5", str(max_lifetime_s), *_wrap(ns, argv)]
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
            preexec_fn=_pdeathsig
            if threading.current_thread() is threading.main_thread()
            else None,
        )
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]
    return Daemon(name or Path(argv[0]).name, ns, list(argv), proc, log_path)


def children_of(pid: int) -> list[int]:
    """Direct children of pid, from /proc (ordered by pid)."""
    kids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm may contain spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry))
    return sorted(kids)


def stop(daemon: Daemon, grace_s: float = 3.0) -> int | None:
    """TERM the daemon (and its process group), wait up to grace_s, then KILL; return its code."""
    p = daemon.proc
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=grace_s)
    # The group also holds anything the daemon forked (iperf3 workers, shells).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=5)
    return p.returncode


def vm_rss_kb(pid: int) -> int | None:
    """VmRSS of pid in KiB, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# ----------------------------------------------------------------- namespaces


def ns_list() -> list[str]:
    cp = run(None, ["ip", "netns", "list"])
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def ns_add(name: str) -> None:
    run(None, ["ip", "netns", "add", name])
    run(name, ["ip", "link", "set", "lo", "up"])


def ns_pids(name: str) -> list[int]:
    cp = run(None, ["ip", "netns", "pids", name], check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def ns_del(name: str, kill_grace_s: float = 2.0) -> None:
    """Kill what still runs in the namespace (by pid, TERM then KILL) and delete it."""
    pids = ns_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + kill_grace_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run(None, ["ip", "netns", "del", name], check=False)


# ----------------------------------------------------------------- links and addresses


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str, mtu: int | None = None) -> None:
    """A veth pair created directly inside both namespaces (names never touch the root ns)."""
    argv = ["ip", "link", "add", name_a, "netns", ns_a]
    if mtu:
        argv += ["mtu", str(mtu)]
    argv += ["type", "veth", "peer", "name", name_b, "netns", ns_b]
    if mtu:
        argv += ["mtu", str(mtu)]
    run(None, argv)
    link_up(ns_a, name_a)
    link_up(ns_b, name_b)


def bridge(ns: str, name: str) -> None:
    run(None, ["ip", "-n", ns, "link", "add", name, "type", "bridge"])
    link_up(ns, name)


def enslave(ns: str, dev: str, master: str) -> None:
    run(None, ["ip", "-n", ns, "link", "set", dev, "master", master])


def link_up(ns: str, dev: str) -> None:
    run(None, ["ip", "-n", ns, "link", "set", dev, "up"])


def link_down(ns: str, dev: str) -> None:
    run(None, ["ip", "-n", ns, "link", "set", dev, "down"])


def link_exists(ns: str, dev: str) -> bool:
    return run(None, ["ip", "-n", ns, "link", "show", dev], check=False).returncode == 0


def link_del(ns: str, dev: str) -> None:
    run(None, ["ip", "-n", ns, "link", "del", dev], check=False)


def addr_add(ns: str, dev: str, cidr: str) -> None:
    run(None, ["ip", "-n", ns, "addr", "add", cidr, "dev", dev])


def route_add(
    ns: str,
    dest: str,
    via: str | None = None,
    dev: str | None = None,
    src: str | None = None,
    metric: int | None = None,
) -> None:
    """Add or replace a route (`replace` keeps the call idempotent); routes to one destination
    with different metrics coexist."""
    argv = ["ip", "-n", ns, "route", "replace", dest]
    if via:
        argv += ["via", via]
    if dev:
        argv += ["dev", dev]
    if src:
        argv += ["src", src]
    if metric:
        argv += ["metric", str(metric)]
    run(None, argv)


def routes(ns: str) -> str:
    return run(None, ["ip", "-n", ns, "route", "show"]).stdout


def sysctl(ns: str, key: str, value: str | int) -> None:
    run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


def ip_forward(ns: str, on: bool = True) -> None:
    sysctl(ns, "net.ipv4.ip_forward", int(on))
    sysctl(ns, "net.ipv6.conf.all.forwarding", int(on))


def rp_filter_off(ns: str) -> None:
    # The effective value is max(all, <dev>); "default" covers devices created later.
    sysctl(ns, "net.ipv4.conf.all.rp_filter", 0)
    sysctl(ns, "net.ipv4.conf.default.rp_filter", 0)


def nft(ns: str, ruleset: str) -> None:
    """Load an nft ruleset (text, `nft -f -` syntax) into ns."""
    run(ns, ["nft", "-f", "-"], input=ruleset)


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll the callable pred until it returns truthy or timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
