"""Alt-WAN: direct tunnels over a private, MPLS-like network between sites (docs/recovery.md,
"Alt-WAN").

Owns, per remote site that the directory lists with an Alt-WAN endpoint while this site has an
Alt-WAN link (`[[links]] altwan = true`): one fast-path peer (`altwan_peer_id`: ALTWAN_PEER_FLAG
| site id) with its one endpoint on that link, one `PeerTunnel` for its handshakes, keys, rekeys
and liveness (tunnel.py: the higher site id initiates, the other kicks), the hold off the traffic
after its path went silent under traffic, the *Alt-WAN Connect / Disconnect* events, and the
`alt-wan` producer of candidates for paths.py: that site's subnets while its tunnel is up. It is
the session layer's owner of the sessions on the Alt-WAN link.

Nothing here needs the PoP: the network has no NAT, so there is nothing to punch, and the
endpoints come from the directory, which the store keeps. A box that starts while the cloud is
lost builds its Alt-WAN tunnels from the stored directory at once. Which transport carries a
site's traffic is paths.py's choice (WAN recovery puts Alt-WAN first, docs/paths.md).

Like the mesh it does no I/O itself: socketd calls `tick()` when `next_due()` says, and gives it
a Port to send through.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any

from sdwan.bindings.fastpath import FastPath, FastPathError
from sdwan.common.dtls import DtlsSession
from sdwan.common.revocation import Revocations
from sdwan.common.sessions import SessionOwner
from sdwan.common.tomlcheck import format_endpoint, parse_endpoint
from sdwan.site.links import LinkManager, WanLink
from sdwan.site.paths import Candidate, Paths, Transport
from sdwan.site.sources import add_peer
from sdwan.site.tunnel import Addr, PeerTunnel, Port, State, Timers

log = logging.getLogger("sdwan.site.altwan")

PATHS_PRODUCER = "alt-wan"
# Fast-path peer ids: a mesh tunnel's is its site id (< 2^16), a PoP session's has the top bit
# (cloud.POP_PEER_FLAG); an Alt-WAN tunnel's has the bit below it (docs/dataplane.md).
ALTWAN_PEER_FLAG = 0x40000000
# As for the mesh (mesh.py): off the traffic for a while after its path went silent under
# traffic, doubling while silences keep coming, forgotten after a quiet while.
HOLD_MIN_S = 5.0
HOLD_MAX_S = 120.0
HOLD_MEMORY_S = 300.0
# Handshakes started and kicks sent per tick: a restart brings every tunnel back at once, and
# each draws a handshake into a session layer that admits a few hundred at a time.
MAX_HANDSHAKES = 64
MAX_KICKS_PER_TICK = 16

EVENT_CONNECT = "altwan.connect"
EVENT_DISCONNECT = "altwan.disconnect"


def altwan_peer_id(site_id: int) -> int:
    """The fast-path peer id of the Alt-WAN tunnel to site_id."""
    return ALTWAN_PEER_FLAG | site_id


def _endpoint(entry: dict[str, Any]) -> Addr | None:
    """The first usable Alt-WAN endpoint a directory entry lists: an IPv4 unicast address
    (the link's socket is IPv4) and a port."""
    raw = entry.get("altwan")
    if not isinstance(raw, list):
        return None
    for text in raw:
        if not isinstance(text, str):
            continue
        try:
            host, port = parse_endpoint(text)
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.version == 4 and port and not (
            ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local
        ):
            return host, port
    return None


@dataclass(slots=True)
class AltWanPeer:
    site_id: int
    endpoint: Addr
    tunnel: PeerTunnel
    up: bool = False  # what the last event said
    due: float = 0.0  # when its tunnel next needs a tick (0: at the next one)
    # After its path went silent under traffic it carries recovery traffic only after the mesh
    # until hold_until, even if its tunnel comes straight back (a lossy carrier must not flip
    # traffic every second).
    hold_until: float = 0.0
    hold_s: float = 0.0
    last_silence: float = -1e9


class AltWan(SessionOwner):
    def __init__(
        self,
        *,
        site_id: int,
        links: LinkManager,
        fp: FastPath,
        port: Port,
        paths: Paths,
        timers: Timers,
        directory: Callable[[], list[dict[str, Any]]],
        directory_known: Callable[[], bool] = lambda: False,
        static_ids: Container[int] = (),
        on_event: Callable[[str, str, dict[str, Any], int | None], None] | None = None,
        silent_after_ms: int = 700,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.site_id = site_id
        self.links = links
        self.link: WanLink | None = links.altwan_link()
        self.fp = fp
        self.port = port
        self.paths = paths
        self.timers = timers
        self.directory = directory
        self.directory_known = directory_known  # an empty directory() is a real one
        self.static_ids = static_ids  # a static peer's site keeps its static tunnel
        self.on_event = on_event or (lambda kind, text, data, site_id: None)
        self.silent_after_ms = silent_after_ms
        self.clock = clock
        self.remotes: dict[int, AltWanPeer] = {}
        self._by_addr: dict[Addr, AltWanPeer] = {}
        self._dirty = True  # candidates to submit again
        self._synced: list[dict[str, Any]] | None = None  # the directory list last followed

    @property
    def enabled(self) -> bool:
        """This site has an Alt-WAN link."""
        return self.link is not None

    # ---------------------------------------------------------------- the directory

    def on_directory(self) -> None:
        """The PoP's directory changed (or, at start, the stored one is there): one tunnel per
        site with an Alt-WAN endpoint, moved when the endpoint moves."""
        link = self.link
        entries = self.directory()
        self._synced = entries
        self._dirty = True
        if link is None or (not entries and not self.directory_known()):
            return
        by_id = {e["site_id"]: e for e in entries}
        for site_id in [s for s in self.remotes if s not in by_id]:
            self.remove(site_id, "no longer in the account's directory")
        for site_id, entry in by_id.items():
            if site_id == self.site_id or site_id in self.static_ids:
                continue
            ep = _endpoint(entry)
            peer = self.remotes.get(site_id)
            if ep is None:
                # An offline site whose endpoint the PoP does not know (a PoP restarted since
                # it last registered) keeps the tunnel it has: its address has not changed.
                if peer is not None and entry.get("online") is not False:
                    self.remove(site_id, "the directory lists no Alt-WAN endpoint for it")
                continue
            if peer is None:
                self._add(site_id, link, ep)
            elif peer.endpoint != ep:
                log.info("alt-wan: site %d moved to %s", site_id, format_endpoint(ep))
                self._by_addr.pop(peer.endpoint, None)
                peer.endpoint = ep
                self._by_addr[ep] = peer
                peer.tunnel.retarget(link.id, link.name, ep)
                peer.due = 0.0

    def _add(self, site_id: int, link: WanLink, ep: Addr) -> None:
        pid = altwan_peer_id(site_id)
        try:
            # Its packets may come only from that site's prefixes (site/sources.py).
            add_peer(self.fp, pid, owner=site_id)
        except FastPathError as e:
            log.error("alt-wan: fast-path peer for site %d not added: %s", site_id, e)
            return
        try:
            self.fp.set_endpoint(pid, link.id, ep)
        except FastPathError as e:
            log.error("alt-wan: endpoint of site %d not set: %s", site_id, e)
            with contextlib.suppress(FastPathError):
                self.fp.peer_del(pid)
            return
        tunnel = PeerTunnel(
            my_site_id=self.site_id,
            peer_site_id=site_id,
            link_id=link.id,
            link_name=link.name,
            endpoint=ep,
            fp=self.fp,
            port=self.port,
            timers=self.timers,
            clock=self.clock,
            on_event=lambda kind, text, s=site_id: self._on_tunnel_event(s, kind),
            fp_peer_id=pid,
            expected=site_id,
            link_mtu=self.links.mtu,
        )
        peer = self.remotes[site_id] = AltWanPeer(site_id, ep, tunnel)
        self._by_addr[ep] = peer
        log.info("alt-wan: site %d at %s over %s", site_id, format_endpoint(ep), link.name)

    def remove(self, site_id: int, reason: str) -> None:
        """Tear down one peer: its DTLS session and fast-path peer (its keys and routes)."""
        peer = self.remotes.pop(site_id, None)
        if peer is None:
            return
        log.info("alt-wan: site %d removed: %s", site_id, reason)
        if self._by_addr.get(peer.endpoint) is peer:
            del self._by_addr[peer.endpoint]
        tunnel = peer.tunnel
        session = tunnel.session
        if session is not None:
            for d in session.close():
                self.port.send(tunnel.link_id, tunnel.endpoint, d)
        if tunnel.handshaking is not None:
            self.port.forget_session(tunnel.handshaking)
        pid = altwan_peer_id(site_id)
        try:
            self.fp.peer_del(pid)
        except FastPathError as e:
            log.warning("alt-wan: fast-path peer of site %d not removed: %s", site_id, e)
        self.paths.forget_peer(pid)
        if peer.up:
            peer.up = False
            self._event(EVENT_DISCONNECT, site_id,
                        f"Alt-WAN Disconnect: site {site_id}: {reason}", {"reason": reason})
        # At once: no candidate may name the fast-path peer that is gone.
        self._dirty = False
        self.paths.submit(PATHS_PRODUCER, self._candidates())

    def end_revoked(self, revoked: Revocations) -> list[int]:
        """The account revoked certificates: tear down at once the tunnels whose peer
        authenticated with one of them. A later directory may add the site back; its
        handshakes are then refused by the revocation check, and say so."""
        ended: list[int] = []
        for site_id, peer in list(self.remotes.items()):
            session = peer.tunnel.session
            serial = session.peer_serial if session is not None else None
            reason = revoked.reason(site_id, serial)
            if reason is None:
                continue
            self.remove(site_id, reason)
            self._event("altwan.revoked", site_id,
                        f"site {site_id}: Alt-WAN tunnel ended: {reason}", {"serial": serial})
            ended.append(site_id)
        return ended

    # ---------------------------------------------------------------- tunnels

    def _on_tunnel_event(self, site_id: int, kind: str) -> None:
        peer = self.remotes.get(site_id)
        if peer is None:
            return
        if kind in ("tunnel-up", "tunnel-down"):
            self._dirty = True
        peer.due = 0.0
        up = peer.tunnel.state is State.UP
        if up == peer.up:
            return
        peer.up = up
        if up:
            self._event(EVENT_CONNECT, peer.site_id,
                        f"Alt-WAN Connect: site {peer.site_id} at "
                        f"{format_endpoint(peer.endpoint)} over {peer.tunnel.link_name}",
                        {"endpoint": format_endpoint(peer.endpoint)})
        else:
            reason = peer.tunnel.reason
            self._event(EVENT_DISCONNECT, peer.site_id,
                        f"Alt-WAN Disconnect: site {peer.site_id}: {reason}", {"reason": reason})

    def _event(self, kind: str, site_id: int, text: str, data: dict[str, Any]) -> None:
        log.info("%s", text)
        try:
            self.on_event(kind, text, {"peer": site_id, **data}, site_id)
        except Exception:
            log.exception("alt-wan event not recorded")

    def on_silent(self, peer_ids: Sequence[int]) -> None:
        """The fast path saw these peers stop answering our traffic: an Alt-WAN tunnel among
        them is down at once (its traffic moves to the mesh or the cloud) and held off for a
        while after it comes back."""
        now = self.clock()
        for pid in peer_ids:
            if pid & ~0xFFFF != ALTWAN_PEER_FLAG:
                continue
            peer = self.remotes.get(pid & 0xFFFF)
            if peer is None or peer.tunnel.state is not State.UP:
                continue
            recent = now - peer.last_silence < HOLD_MEMORY_S
            peer.hold_s = min(peer.hold_s * 2, HOLD_MAX_S) if recent else HOLD_MIN_S
            peer.hold_until, peer.last_silence = now + peer.hold_s, now
            log.info("alt-wan: site %d stopped answering traffic (%d ms); held off %.0f s",
                     peer.site_id, self.silent_after_ms, peer.hold_s)
            peer.tunnel.declare_down(f"no answer to traffic for {self.silent_after_ms} ms")
            peer.due = 0.0

    # ---------------------------------------------------------------- periodic work

    def tick(self) -> None:
        if self._synced is not self.directory():
            self.on_directory()
        now = self.clock()
        handshakes = sum(1 for p in self.remotes.values() if p.tunnel.handshaking is not None)
        kicks = 0
        for peer in list(self.remotes.values()):
            if peer.hold_until and now >= peer.hold_until:
                peer.hold_until = 0.0
                self._dirty = True  # its prefixes may take Alt-WAN first again
            if peer.due > now:
                continue
            tunnel = peer.tunnel
            if tunnel.wants_handshake:
                if handshakes >= MAX_HANDSHAKES:
                    continue
                handshakes += 1
            elif tunnel.wants_kick:
                if kicks >= MAX_KICKS_PER_TICK:
                    continue
                kicks += 1
            try:
                tunnel.tick()
            except Exception:
                log.exception("alt-wan tunnel %d tick failed", peer.site_id)
            peer.due = tunnel.next_due()
        if self._dirty:
            self._dirty = False
            self.paths.submit(PATHS_PRODUCER, self._candidates())

    def next_due(self) -> float:
        """The first tunnel's next clock, a hold's end, or now when candidates are due. A
        walk over the peers: an Alt-WAN network has tens of sites, not thousands."""
        if self._dirty or self._synced is not self.directory():
            return self.clock()
        due = math.inf
        for peer in self.remotes.values():
            due = min(due, peer.due, peer.hold_until or math.inf)
        return due

    def _candidates(self) -> list[Candidate]:
        subnets = {e["site_id"]: e.get("subnets") or [] for e in self.directory()}
        now = self.clock()
        out = []
        for peer in self.remotes.values():
            if peer.tunnel.state is not State.UP:
                continue
            held = now < peer.hold_until
            for net in subnets.get(peer.site_id, []):
                with contextlib.suppress(ValueError, TypeError):  # cloud.py counted a bad entry
                    out.append(Candidate(ipaddress.ip_network(net), altwan_peer_id(peer.site_id),
                                         Transport.ALT_WAN, held=held, site=peer.site_id))
        return out

    # ---------------------------------------------------------------- session owner

    def _peer_of(self, pid: int) -> AltWanPeer | None:
        if pid & ~0xFFFF != ALTWAN_PEER_FLAG:
            return None
        return self.remotes.get(pid & 0xFFFF)

    def _ours(self, link_id: int) -> bool:
        return self.link is not None and link_id == self.link.id

    def allowed_ids(self) -> Container[int]:
        return self.remotes.keys()

    def is_known_source(self, link_id: int, addr: Addr) -> bool:
        return self._ours(link_id) and addr in self._by_addr

    def tunnel_for(self, session: DtlsSession) -> PeerTunnel | None:
        # Only sessions on the Alt-WAN link: the mesh's tunnel to the same site authenticates
        # the same identity over the Internet links.
        if session.link_id is None or not self._ours(session.link_id):
            return None
        who = session.peer_identity if session.established else session.expected_identity
        if who is None or who[0] != "site":
            return None
        peer = self.remotes.get(who[1])
        if peer is None:
            return None
        peer.due = 0.0  # news for its tunnel follows (a handshake done, a key, a failure)
        return peer.tunnel

    def tunnel_at(self, link_id: int, addr: Addr) -> PeerTunnel | None:
        peer = self._by_addr.get(addr) if self._ours(link_id) else None
        if peer is None:
            return None
        peer.due = 0.0
        return peer.tunnel

    def sessions_in_use(self) -> list[DtlsSession]:
        return [p.tunnel.session for p in self.remotes.values() if p.tunnel.session is not None]

    def on_kick(self, link_id: int, addr: Addr, from_site: int) -> bool:
        peer = self.remotes.get(from_site)
        # Kicks are not authenticated: only one from the peer's own address on our link.
        if peer is None or not self._ours(link_id) or peer.endpoint != addr:
            return False
        peer.tunnel.on_kick(link_id, addr)
        peer.due = 0.0
        return True

    def on_key_event(self, peer_id: int, expired: bool) -> bool:
        peer = self._peer_of(peer_id)
        if peer is None:
            return False
        peer.tunnel.on_rekey_needed()
        peer.due = 0.0
        return True

    def on_probe_ack(self, peer_id: int, link_id: int, probe_id: int, received: int) -> bool:
        peer = self._peer_of(peer_id)
        return peer is not None and peer.tunnel.pmtu.on_ack(link_id, probe_id, received)

    # ---------------------------------------------------------------- status

    def reach(self, site_id: int) -> tuple[bool, str | None]:
        """Whether the Alt-WAN tunnel to site_id carries traffic now and, if not, why: for
        WAN recovery's per-site status."""
        if self.link is None:
            return False, "this site has no Alt-WAN link"
        peer = self.remotes.get(site_id)
        if peer is None:
            return False, "the directory lists no Alt-WAN endpoint for it"
        tunnel = peer.tunnel
        if tunnel.state is State.UP:
            return True, None
        return False, tunnel.reason or str(tunnel.state)

    def peers(self, listed: Container[int]) -> list[dict[str, Any]]:
        """Every Alt-WAN tunnel, up or not, whatever else lists its site: it is a tunnel of its
        own beside the site's mesh tunnel (the supervisor lets the cloud's entry of the site
        stand)."""
        now = self.clock()
        out = []
        for site_id in sorted(self.remotes):
            peer = self.remotes[site_id]
            st = peer.tunnel.status()
            st["site_id"] = site_id
            st["peer_id"] = altwan_peer_id(site_id)
            st["transport"] = "alt-wan"
            st["held_s"] = round(peer.hold_until - now, 1) if now < peer.hold_until else None
            out.append(st)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "link": self.link.name if self.link is not None else None,
            "peers": len(self.remotes),
            "peers_up": sum(1 for p in self.remotes.values() if p.tunnel.state is State.UP),
        }

    def close(self) -> None:
        for peer in self.remotes.values():
            session = peer.tunnel.session
            if session is not None:
                for d in session.close():
                    self.port.send(peer.tunnel.link_id, peer.tunnel.endpoint, d)
