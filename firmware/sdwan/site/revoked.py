"""The account's revoked site certificates on a socket: taken from the cloud config (the stored
one until a PoP answers, so the list applies while the cloud is down), asked by every DTLS
handshake (dtls.py's revocation check), and announced to whoever ends live tunnels (the mesh).

A config whose list is malformed does not replace the list in force: a PoP bug must not
re-admit a revoked certificate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sdwan.common.revocation import Revocations

log = logging.getLogger("sdwan.site.revoked")

# A revoked peer retries its handshake as often as it likes: one event per site in this long,
# the counter and the rejection list say how often.
EVENT_EVERY_S = 60.0

EventSink = Callable[[str, str, dict[str, Any]], None]


class SiteRevocations:
    def __init__(
        self, on_event: EventSink | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.current = Revocations()
        self.error: str | None = None  # why the last config's list was not taken
        self.on_event = on_event or (lambda kind, text, data: None)
        self.clock = clock
        self._watchers: list[Callable[[Revocations], None]] = []
        self._event_at: dict[int, float] = {}

    def watch(self, callback: Callable[[Revocations], None]) -> None:
        """callback(list) whenever the list in force changes."""
        self._watchers.append(callback)

    def load(self, config: Mapping[str, Any] | None) -> None:
        """Take the `revoked` list of a cloud config (None: no config yet, nothing changes)."""
        if config is None:
            return
        try:
            new = Revocations.from_list(config.get("revoked"))
        except ValueError as e:
            self.error = str(e)
            text = f"revocation list of the cloud config not taken, the previous stays: {e}"
            log.warning("%s", text)
            self.on_event("revocation.refused", text, {"error": str(e)})
            return
        self.error = None
        if new.entries == self.current.entries:
            return
        self.current = new
        log.info("revocation list: %d certificate(s) revoked", len(new))
        for callback in self._watchers:
            callback(new)

    def reason(self, site_id: int, serial: str) -> str | None:
        """The handshake check: why a peer's site certificate is refused, or None."""
        reason = self.current.reason(site_id, serial)
        if reason is None:
            return None
        now = self.clock()
        last = self._event_at.get(site_id)
        if last is None or now - last >= EVENT_EVERY_S:
            self._event_at[site_id] = now
            text = f"site {site_id}: handshake refused: {reason}"
            log.warning("%s", text)
            self.on_event("tunnel.handshake.revoked", text, {"peer": site_id, "serial": serial})
        return reason

    def status(self) -> dict[str, Any]:
        return {"count": len(self.current), "error": self.error}
