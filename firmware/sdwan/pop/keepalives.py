"""popd's keepalives, sent whatever its event loop (or any Python thread) is doing.

A site declares the PoP dead after `cloud.dead_after_ms` (600 ms) without an authenticated
packet from it; popd sends a keepalive on every session it has sent nothing on for
`cloud.keepalive_ms` (200 ms). Were those sent from the loop, a stall of the loop over about
0.4 s (a burst of handshakes, a directory push to a thousand sites) would make every idle site
declare the cloud down, and its sessions' return would push the directory again.

So they are sent by the fast path itself: each live session's peer has the keepalive interval
set (`fp_peer_set_keepalive`), and a C thread of the fast path (`fp_keepalive_thread_start`)
calls `fp_keepalive_pass` a few times per interval: one pass over every peer, with no GIL to
wait for, so neither the loop nor the other Python threads can hold it up.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdwan.bindings.fastpath import FastPath

PASSES_PER_INTERVAL = 4


class KeepaliveThread:
    """The passes over the peers of one or more fast paths (the popd swarm, lab/popswarm.py,
    runs one fast path per 32 fake sites) every keepalive_s / PASSES_PER_INTERVAL."""

    def __init__(self, fp: FastPath | Sequence[FastPath], keepalive_s: float) -> None:
        self.fps = [fp] if isinstance(fp, FastPath) else list(fp)
        self.every_s = keepalive_s / PASSES_PER_INTERVAL
        self._running = False

    @property
    def passes(self) -> int:
        return sum(fp.keepalive_thread_passes for fp in self.fps)

    def start(self) -> None:
        for fp in self.fps:
            fp.keepalive_thread_start(self.every_s)
        self._running = True

    def stop(self) -> None:
        """Stop and join the threads: a fast path may be closed only after this."""
        if self._running:
            for fp in self.fps:
                fp.keepalive_thread_stop()
            self._running = False
