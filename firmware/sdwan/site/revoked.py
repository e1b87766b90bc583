"""The account's revoked site certificates on a socket: taken from the cloud config, asked by
every DTLS handshake (dtls.py's revocation check), and announced to whoever ends live tunnels
(the mesh, Alt-WAN, the static peers).

The list in force is kept in a store document of its own (DOC_REVOKED), written only when a
config's list was taken and loaded at start, so it holds across a restart while the cloud is
down. Nothing a PoP sends takes entries off it by mistake:

* a config whose list is malformed does not replace the list in force (a PoP bug must not
  re-admit a revoked certificate), nor does it reach the stored copy;
* a config without a `revoked` key (a PoP older than revocation) changes nothing;
* only the config of the active PoP (the one the routes follow) replaces the list; a
  secondary's may only add to it, since a PoP whose account file lags behind would otherwise
  re-admit a certificate the others refuse.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sdwan.common.revocation import Presented, Revocations
from sdwan.common.store import Store, StoreError

log = logging.getLogger("sdwan.site.revoked")


EventSink = Callable[[str, str, dict[str, Any]], None]

DOC_REVOKED = "revoked"  # the store's document: {"revoked": [{"site", "serial"}...]}


class SiteRevocations:
    def __init__(
        self, on_event: EventSink | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.current = Revocations()
        self.error: str | None = None  # why the last config's list was not taken
        self.on_event = on_event or (lambda kind, text, data: None)
        self.clock = clock
        self._watchers: list[Callable[[Revocations], None]] = []
        self._presented = Presented(clock)
        self.store: Store | None = None

    def load_stored(self, store: Store | None, config: Mapping[str, Any] | None) -> None:
        """At start: the list last taken (its own store document), else the one of the
        stored config (written by a firmware that kept no document of its own). From then
        on every list taken is written to the document."""
        self.store = store
        if store is not None:
            try:
                doc = store.get_doc(DOC_REVOKED)
                if doc is not None:
                    self._take(Revocations.from_list(doc.value.get("revoked")), save=False)
                    return
            except (StoreError, ValueError) as e:
                # Only this module writes it, each time a list was checked: damage, not a PoP.
                self.error = f"stored revocation list unreadable: {e}"
                log.error("%s", self.error)
                self.on_event("revocation.refused", self.error, {"error": str(e)})
        self.load(config)

    def watch(self, callback: Callable[[Revocations], None]) -> None:
        """callback(list) whenever the list in force changes."""
        self._watchers.append(callback)

    def load(self, config: Mapping[str, Any] | None, authoritative: bool = True) -> None:
        """Take the `revoked` list of a cloud config (None: no config yet, nothing changes;
        no `revoked` key: a PoP that knows nothing of it, nothing changes). authoritative:
        the active PoP's config, which replaces the list; another's only adds to it."""
        if config is None or "revoked" not in config:
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
        if not authoritative:
            have = {(e.site_id, e.serial) for e in self.current.entries}
            added = [e for e in new.entries if (e.site_id, e.serial) not in have]
            if not added:
                return
            new = Revocations.of((*self.current.entries, *added))
        self._take(new, save=True)

    def _take(self, new: Revocations, *, save: bool) -> None:
        if new.entries == self.current.entries:
            return
        self.current = new
        log.info("revocation list: %d certificate(s) revoked", len(new))
        if save and self.store is not None:
            try:
                self.store.put_doc(DOC_REVOKED, {"revoked": new.for_sites()})
            except (StoreError, ValueError) as e:
                log.warning("revocation list not stored: %s", e)
        for callback in self._watchers:
            callback(new)

    def reason(self, site_id: int, serial: str) -> str | None:
        """The handshake check: why a peer's site certificate is refused, or None."""
        reason = self.current.reason(site_id, serial)
        if reason is None:
            return None
        text = self._presented.due(site_id, serial)
        if text is not None:
            log.warning("%s", text)
            self.on_event("tunnel.handshake.revoked", text, {"peer": site_id, "serial": serial})
        return reason

    def status(self) -> dict[str, Any]:
        return {"count": len(self.current), "error": self.error}
