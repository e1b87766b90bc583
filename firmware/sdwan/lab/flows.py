"""Long-lived TCP flows between LAN hosts, watched for interruptions and resets: what WAN
recovery's tests, bench and demo check across a switch of transport (docs/recovery.md).

One process per LAN host (`python -m sdwan.lab.flows --port P --to HOST:P ... --status F`)
serves echo connections on P and opens one connection to each `--to`, over which it sends a
numbered line every `--interval` seconds and reads the echo. It never reconnects: a flow that
breaks (a reset, an end of stream, a wrong echo) stays broken and says why. Every
`--interval` it writes its status atomically (write, rename) to F as JSON: per flow the lines
echoed, the wall-clock time of the last echo, the longest gap between echoes and the recent
gaps over half a second, and the error if any; for the server, the connections served and
the ones that ended with an error. `Flows` starts those processes in a lab and reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GAP_REPORT_S = 0.5  # gaps between echoes longer than this are listed


@dataclass
class _Flow:
    to: str
    state: str = "connecting"
    error: str | None = None
    echoed: int = 0
    last_echo: float | None = None  # wall clock
    max_gap_s: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (ended at, length)

    def to_dict(self) -> dict[str, Any]:
        return {
            "to": self.to, "state": self.state, "error": self.error, "echoed": self.echoed,
            "last_echo": self.last_echo, "max_gap_s": round(self.max_gap_s, 3),
            "gaps": [[round(a, 3), round(g, 3)] for a, g in self.gaps[-20:]],
        }


@dataclass
class _Server:
    served: int = 0
    open: int = 0
    errors: list[str] = field(default_factory=list)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # A line goes out when it is written, also while earlier ones wait for their ACK: after a
    # switch of transport the new path carries a flow's next line at once, and the gap is
    # the network's, not Nagle's or the retransmission timer's.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _serve_one(server: _Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    server.served += 1
    server.open += 1
    _nodelay(writer)
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except OSError as e:
        server.errors.append(f"{type(e).__name__}: {e}")
    finally:
        server.open -= 1
        writer.close()


async def _run_flow(flow: _Flow, interval: float) -> None:
    host, port = flow.to.rsplit(":", 1)
    deadline = time.monotonic() + 30
    while True:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 30)
            break
        except ConnectionRefusedError:
            # The other host's process may not listen yet: the flow has not begun.
            if time.monotonic() > deadline:
                flow.state, flow.error = "failed", "connect: refused for 30 s"
                return
            await asyncio.sleep(0.1)
        except (OSError, TimeoutError) as e:
            flow.state, flow.error = "failed", f"connect: {type(e).__name__}: {e}"
            return
    _nodelay(writer)
    flow.state = "up"
    flow.last_echo = time.time()

    async def send() -> None:
        seq = 0
        while True:
            writer.write(f"{seq}\n".encode())
            seq += 1
            await writer.drain()
            await asyncio.sleep(interval)

    sender = asyncio.create_task(send())
    expected = 0
    try:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the connection was closed by the other end")
            if int(line) != expected:
                raise ValueError(f"echo {int(line)} where {expected} was expected")
            expected += 1
            now = time.time()
            gap = now - (flow.last_echo or now)
            flow.max_gap_s = max(flow.max_gap_s, gap)
            if gap > GAP_REPORT_S:
                flow.gaps.append((now, gap))
            flow.last_echo = now
            flow.echoed += 1
    except (OSError, ValueError, ConnectionError) as e:
        flow.state, flow.error = "broken", f"{type(e).__name__}: {e}"
    finally:
        sender.cancel()
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    server = _Server()
    srv = await asyncio.start_server(
        lambda r, w: _serve_one(server, r, w), host="0.0.0.0", port=args.port
    )
    flows = [_Flow(to) for to in args.to]
    tasks = [asyncio.create_task(_run_flow(f, args.interval)) for f in flows]
    status = Path(args.status)
    tmp = status.with_suffix(".tmp")
    async with srv:
        while True:
            doc = {
                "at": time.time(),
                "flows": [f.to_dict() for f in flows],
                "server": {"served": server.served, "open": server.open,
                           "errors": server.errors[-20:]},
            }
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, status)
            await asyncio.sleep(args.interval)
    for t in tasks:
        t.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdwan.lab.flows", description=__doc__)
    p.add_argument("--port", type=int, required=True, help="serve echo connections here")
    p.add_argument("--to", action="append", default=[], metavar="HOST:PORT",
                   help="open a long-lived flow to HOST:PORT (repeatable)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between lines")
    p.add_argument("--status", required=True, metavar="FILE", help="JSON status, rewritten")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))
    return 0


# --------------------------------------------------------------------------- the lab side


class Flows:
    """Flows between every pair of LAN hosts, both directions: one process per host."""

    PORT = 7070

    def __init__(self, lab: Any, sites: Sequence[Any], interval: float = 0.05) -> None:
        self.lab = lab
        self.files: dict[int, Path] = {}
        self.daemons = {}
        for s in sites:
            f = lab.workdir / f"flows-{s.n}.json"
            f.unlink(missing_ok=True)
            self.files[s.n] = f
            argv = [sys.executable, "-m", "sdwan.lab.flows", "--port", str(self.PORT),
                    "--interval", str(interval), "--status", str(f)]
            for o in sites:
                if o is not s:
                    argv += ["--to", f"{o.lan_host_ip}:{self.PORT}"]
            self.daemons[s.n] = lab.spawn(s.lan_ns, argv, name=f"flows-{s.n}", env=lab.env())
        # Each host names its destinations by address; map them back to site numbers.
        self._site_of = {s.lan_host_ip: s.n for s in sites}

    def status(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Per (from site, to site): the flow's last status (empty until written)."""
        out: dict[tuple[int, int], dict[str, Any]] = {}
        for n, f in self.files.items():
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            for flow in doc["flows"]:
                out[(n, self._site_of[flow["to"].rsplit(":", 1)[0]])] = flow
        return out

    def servers(self) -> dict[int, dict[str, Any]]:
        out = {}
        for n, f in self.files.items():
            with contextlib.suppress(OSError, ValueError):
                out[n] = json.loads(f.read_text())["server"]
        return out

    def broken(self) -> dict[tuple[int, int], str]:
        """Flows that broke (a reset, an end, a bad echo), and server-side errors."""
        out = {k: f"{v['state']}: {v['error']}" for k, v in self.status().items()
               if v["state"] not in ("up", "connecting")}
        for n, srv in self.servers().items():
            for err in srv["errors"]:
                out[(n, 0)] = f"server: {err}"
        return out

    def all_echoing_since(self, t: float, pairs: int) -> bool:
        """Every one of `pairs` flows has had an echo after wall-clock time t."""
        st = self.status()
        return len(st) == pairs and all(
            v["state"] == "up" and (v["last_echo"] or 0) > t for v in st.values()
        )

    def resumed_after(self, t: float) -> dict[tuple[int, int], float | None]:
        """Per flow, seconds from t to its first echo after t (None: none yet): the end of
        the gap that spans t, or t's next echo when no gap spans it."""
        out: dict[tuple[int, int], float | None] = {}
        for k, v in self.status().items():
            ends = [a for a, g in v["gaps"] if a > t and a - g <= t + GAP_REPORT_S]
            if ends:
                out[k] = ends[0] - t
            elif (v["last_echo"] or 0) > t:
                out[k] = 0.0  # no gap over GAP_REPORT_S around t
            else:
                out[k] = None
        return out

    def wait(self, what: str, pred: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"flows: {what} within {timeout:g} s; {self.status()}")
            time.sleep(0.05)

    def stop(self) -> None:
        for d in self.daemons.values():
            self.lab.kill(d)


if __name__ == "__main__":
    sys.exit(main())
