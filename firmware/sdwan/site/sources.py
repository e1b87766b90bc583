"""The allowed sources: from which prefixes each tunnel peer may send.

Owns the fast path's source table (prefix -> owning site id, `fp_source_batch`), kept apart
from the routes that `site/paths.py` owns, and the function every owner of a tunnel peer
creates its fast-path peer with (`add_peer`), so that each peer gets its owner:

| peer | owner |
|---|---|
| a static `[[peers]]` tunnel, a mesh tunnel, an Alt-WAN tunnel | that site's id |
| a PoP session (it relays every other site) | `SOURCE_ANY`: any prefix of the table |

The table holds every static peer's subnets (owner: that site) and every site of the
PoP's directory with its subnets (owner: that site id; our own entry is left out, so
nobody may speak for our LAN). It is pushed to C by differences in one batch at start (the
stored directory: it is there after a restart without the PoP) and whenever the directory
changes. A route moving between the cloud and the mesh changes nothing here, so the check
never has to be off for a switch of transport (docs/security.md, "Source addresses in the
tunnels").

Claims of one prefix by two sites are refused upstream (config.py refuses overlapping
static subnets, cloud.py a directory prefix over a static peer of another site, the PoP's
account overlaps). Should two claims meet here all the same: a static peer's claim beats
the directory's; two directory sites claiming the very same prefix leave it to nobody (its
packets are dropped as spoofed from every peer) and the conflict is logged and shown in
`socketctl status` (`sources.conflicts`). Nested prefixes of different sites are no
conflict: the longest prefix decides, as it does for the routes.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sdwan.bindings.fastpath import SOURCE_ANY, FastPath, FastPathError, Network

log = logging.getLogger(__name__)

__all__ = ["SOURCE_ANY", "Sources", "add_peer"]


def add_peer(fp: FastPath, peer_id: int, owner: int) -> None:
    """Add fast-path peer peer_id whose decrypted packets may come only from owner's
    prefixes (a site id), or from any prefix of the table (SOURCE_ANY: a PoP session).
    Raises FastPathError as peer_add does; a peer is never left without its owner."""
    fp.peer_add(peer_id)
    try:
        fp.set_source_owner(peer_id, owner)
    except FastPathError:
        fp.peer_del(peer_id)
        raise


class Sources:
    """The fast path's source table, following the static peers and the directory."""

    def __init__(
        self,
        fp: FastPath,
        site_id: int,
        static: Iterable[tuple[int, Iterable[Network]]],
        directory: Callable[[], Iterable[Mapping[str, Any]]],
    ) -> None:
        self.fp = fp
        self.site_id = site_id
        self.static = [(sid, tuple(nets)) for sid, nets in static]
        self.directory = directory
        self.installed: dict[Network, int] = {}  # what the fast path holds
        self.conflicts: dict[Network, tuple[int, ...]] = {}
        self.batches = 0
        self.errors = 0

    def wanted(self) -> tuple[dict[Network, int], dict[Network, tuple[int, ...]]]:
        """(prefix -> owner, prefix -> the sites contesting it) from the static peers and
        the directory as they are now."""
        static: dict[Network, set[int]] = {}
        for sid, nets in self.static:
            for net in nets:
                static.setdefault(net, set()).add(sid)
        listed: dict[Network, set[int]] = {}
        for entry in self.directory():
            sid = entry.get("site_id")
            if not isinstance(sid, int) or sid == self.site_id or not 0 < sid < SOURCE_ANY:
                continue
            for text in entry.get("subnets") or ():
                try:
                    net = ipaddress.ip_network(text)
                except (ValueError, TypeError):
                    continue  # cloud.py checked them; never trust a shape here either
                listed.setdefault(net, set()).add(sid)
        owners: dict[Network, int] = {}
        conflicts: dict[Network, tuple[int, ...]] = {}
        for net, sids in (*listed.items(), *static.items()):  # static last: it wins
            if len(sids) == 1:
                owners[net] = next(iter(sids))
                conflicts.pop(net, None)
            else:
                owners.pop(net, None)
                conflicts[net] = tuple(sorted(sids))
        return owners, conflicts

    def apply(self) -> None:
        """Send the differences to the fast path in one batch. A refused batch (it should
        not be: the prefixes are checked networks) is logged, and tried again next time."""
        owners, conflicts = self.wanted()
        for net, sids in conflicts.items():
            if self.conflicts.get(net) != sids:
                log.warning(
                    "sources: %s is claimed by sites %s: accepted from none of them",
                    net,
                    ", ".join(map(str, sids)),
                )
        self.conflicts = conflicts
        delete = [net for net in self.installed if net not in owners]
        set_ = [(net, o) for net, o in owners.items() if self.installed.get(net) != o]
        if not delete and not set_:
            return
        try:
            self.fp.source_batch(set_, delete)
        except (FastPathError, ValueError) as e:
            self.errors += 1
            log.error("sources: the fast path refused the allowed sources: %s", e)
            return
        self.batches += 1
        self.installed = owners

    def summary(self) -> dict[str, Any]:
        """For `socketctl status` (`sources`)."""
        return {
            "prefixes": len(self.installed),
            "sites": len(set(self.installed.values())),
            "conflicts": [
                {"prefix": str(net), "sites": list(sids)}
                for net, sids in sorted(self.conflicts.items(), key=lambda kv: str(kv[0]))
            ],
            "errors": self.errors,
        }
