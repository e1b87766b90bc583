"""popd's keepalives, sent whatever its event loop is doing.

A site declares the PoP dead after `cloud.dead_after_ms` (600 ms) without an authenticated
packet from it; popd sends a keepalive on every session it has sent nothing on for
`cloud.keepalive_ms` (200 ms). Were those sent from the loop, a stall of the loop over about
0.4 s (a burst of handshakes, a directory push to a thousand sites) would make every idle site
declare the cloud down, and its sessions' return would push the directory again.

So they are sent by the fast path itself: each live session's peer has the keepalive interval
set (`fp_peer_set_keepalive`), and this thread calls `fp_keepalive_pass` a few times per
interval: one pass in C over every peer, without the GIL. The thread needs the GIL only for
the call itself, which Python hands over every few milliseconds however busy the loop is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from sdwan.bindings.fastpath import FastPath, FastPathError

log = logging.getLogger("sdwan.pop.keepalives")

PASSES_PER_INTERVAL = 4


class KeepaliveThread:
    """Passes over the peers of one or more fast paths (the popd swarm, lab/popswarm.py, runs
    one per 32 fake sites) every keepalive_s / PASSES_PER_INTERVAL."""

    def __init__(self, fp: FastPath | Sequence[FastPath], keepalive_s: float) -> None:
        self.fps = [fp] if isinstance(fp, FastPath) else list(fp)
        self.every_s = keepalive_s / PASSES_PER_INTERVAL
        self.passes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="popd-keepalives", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait: the fast path may be closed only after this."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for fp in self.fps:
                try:
                    fp.keepalive_pass()
                except FastPathError as e:
                    self.errors += 1
                    if self.errors <= 5:
                        log.warning("keepalive pass failed: %s", e)
            self.passes += 1
