"""The WAN links of a site: one `WanLink` per configured link, all held by the `LinkManager`.

A link here is everything the site knows about one `[[links]]` entry, in one place, so that the
cloud, the LEDs and later the mesh and link health read links from here and not from each
other (docs/links.md):

* its id (the fast path's link number: config order plus one) and its configuration;
* its UDP socket, bound to the link's device and handed to the fast path. One socket carries
  everything of that link (tunnel data, DTLS, STUN, later probes), so the NAT mapping a peer
  or the PoP sees is the same for all of it;
* its state: whether its device can carry traffic, and why not (read from the kernel);
* its local IPv4 address (read from the kernel; wanaddr.py may change it at any time);
* its public endpoint, learned with STUN Binding transactions sent from that very socket to
  the STUN server the cloud names (the active PoP's), refreshed periodically (docs/stun.md),
  with a callback whenever it changes; and its mapping toward a second destination (the
  PoP's main port), which tells a NAT that draws a new port per destination (its class);
* the precedence policy (which links carry PoP sessions, which link is preferred); an Alt-WAN
  link (a private network between sites, docs/recovery.md) carries none and asks no STUN;
* its NAT data in the store (the punched path to each peer over this link).

Besides opening the sockets and asking the kernel about devices it does no I/O of its own: the
supervisor calls `tick()` and hands it the STUN datagrams of each link; requests leave through
the supervisor's `send` (the fast path's control send on the link's socket).
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sdwan.bindings.fastpath import FastPath
from sdwan.common.netdev import iface_ipv4, interface_fault, size_buffers
from sdwan.common.store import NatEntry, Store
from sdwan.common.stun import Endpoint, StunTransaction
from sdwan.common.tomlcheck import format_endpoint
from sdwan.site.config import Link

log = logging.getLogger("sdwan.site.links")

Addr = tuple[str, int]

# Precedence 1 and 2 are main links: they always carry PoP sessions. A precedence 3 link is a
# standby, used only while no main link reaches the PoP (docs/cloud.md).
MAIN_PRECEDENCE_MAX = 2

# A NAT forgets an idle UDP mapping after 30 s at the earliest, but the PoP sessions keep the
# link socket's mappings busy; a minute catches a router restart or a new public address soon
# enough while costing a handful of datagrams per link per minute.
STUN_REFRESH_S = 60.0
# After a transaction that got no answer (39.5 s of RFC 8489 retransmissions) or an error
# response, the next one starts this much later.
STUN_RETRY_S = 5.0


class LinkError(Exception):
    """A link's socket could not be opened; the message says which link and why."""


@dataclass(frozen=True)
class LinkSocket:
    link_id: int
    link: Link
    sock: socket.socket


def open_link_socket(link_id: int, link: Link, port: int | None = None) -> LinkSocket:
    """Open the UDP socket of `link`, bound to its device and port (or to `port`: the mesh's
    extra sockets of a birthday punch, on the same device)."""
    port = link.port if port is None else port
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.device.encode())
        except OSError as e:
            raise LinkError(
                f"link {link.name}: cannot bind to device {link.device!r}: {e.strerror}"
            ) from e
        size_buffers(sock)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as e:
            raise LinkError(f"link {link.name}: cannot bind UDP port {port}: {e.strerror}") from e
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return LinkSocket(link_id, link, sock)


# --------------------------------------------------------------------------- one link


@dataclass
class LinkStun:
    """What STUN taught us about one link's socket, and the transaction under way."""

    link_id: int
    server: Addr | None = None
    tx: StunTransaction | None = None
    public: Endpoint | None = None
    learned_at: float | None = None
    error: str | None = None
    next_at: float = 0.0
    transactions: int = 0
    failures: int = 0

    def status(self, now: float) -> dict[str, Any]:
        return {
            "server": format_endpoint(self.server) if self.server is not None else None,
            "learned_s": None if self.learned_at is None else round(now - self.learned_at, 1),
            "pending": self.tx is not None,
            "error": self.error,
            "transactions": self.transactions,
            "failures": self.failures,
        }


class WanLink:
    """One WAN link of the site (see the module docstring for what it holds)."""

    def __init__(self, link_id: int, link: Link, manager: LinkManager) -> None:
        self.id = link_id
        self.link = link
        self.stun = LinkStun(link_id)
        # The same socket's mapping toward a second destination: a NAT that maps every
        # destination anew (endpoint-dependent mapping) shows a different port there.
        self.stun_check = LinkStun(link_id)
        # Where the socket is bound once opened: the configured port, or the one the kernel
        # chose for port 0.
        self.bound: Addr | None = None
        self._manager = manager

    def __repr__(self) -> str:
        return f"WanLink({self.id}, {self.name!r}, {self.interface!r})"

    @property
    def name(self) -> str:
        return self.link.name

    @property
    def interface(self) -> str:
        """The device the link runs on: a VLAN link's VLAN device."""
        return self.link.device

    @property
    def precedence(self) -> int:
        return self.link.precedence

    @property
    def main(self) -> bool:
        """A main link (precedence 1 or 2), as opposed to a standby (3); never an Alt-WAN
        link."""
        return self.link.precedence <= MAIN_PRECEDENCE_MAX and not self.link.altwan

    @property
    def altwan(self) -> bool:
        """An Alt-WAN link: only Alt-WAN tunnels run over it (no PoP session, no STUN)."""
        return self.link.altwan

    @property
    def port(self) -> int:
        return self.bound[1] if self.bound is not None else self.link.port

    # ---------------------------------------------------------------- state

    def fault(self) -> str | None:
        """Why the link's device cannot carry traffic now, or None if it can."""
        return interface_fault(self.link.device)

    def is_up(self) -> bool:
        return self.fault() is None

    def local_ipv4(self) -> str | None:
        """The device's IPv4 address now (static, DHCP or none: it may change at any time)."""
        return iface_ipv4(self.link.device)

    # ---------------------------------------------------------------- public endpoint

    @property
    def public(self) -> Endpoint | None:
        """The endpoint STUN last reported for this link's socket; None while unknown."""
        return self.stun.public

    def public_str(self) -> str | None:
        return str(self.stun.public) if self.stun.public is not None else None

    @property
    def nat_class(self) -> str | None:
        """What STUN tells of this link's NAT (docs/mesh.md, "NAT classes"): "none" (the
        socket's own address is public), "port-randomising" (its mapping toward a second
        destination differs: the NAT draws a new port per destination), "port-preserving"
        (the public port is the socket's), "port-changing" (it is not, but the same toward
        every destination checked); None while unknown."""
        pub = self.stun.public
        if pub is None:
            return None
        if pub.ip == self.local_ipv4():
            return "none"
        other = self.stun_check.public
        if other is not None and other != pub:
            return "port-randomising"
        return "port-preserving" if pub.port == self.port else "port-changing"

    # ---------------------------------------------------------------- NAT data

    def nat(self, peer_id: int) -> NatEntry | None:
        """The punched path to `peer_id` over this link, as stored (None without a store)."""
        store = self._manager.store
        return store.nat(peer_id, self.name) if store is not None else None

    def nat_all(self) -> list[NatEntry]:
        """Every stored punched path over this link."""
        store = self._manager.store
        if store is None:
            return []
        return [e for e in store.nat_all() if e.link == self.name]

    def put_nat(
        self,
        peer_id: int,
        peer_public: str | Addr,
        local_public: str | Addr | None = None,
        at: float | None = None,
        how: str = "window",
        local_port: int | None = None,
    ) -> NatEntry | None:
        """Record the punched path to `peer_id` over this link; `local_public` defaults to the
        link's public endpoint, `local_port` to the link's port (a birthday path runs on a
        socket of its own). None without a store (NAT data only speeds up reconnecting)."""
        store = self._manager.store
        if store is None:
            return None
        mine: str | Addr | None = local_public
        if mine is None and self.stun.public is not None:
            mine = (self.stun.public.ip, self.stun.public.port)
        if mine is None:
            raise ValueError(f"link {self.name}: no public endpoint known to record")
        return store.put_nat(
            peer_id, self.name, local_port or self.port, mine, peer_public, at=at, how=how
        )

    def forget_nat(self, peer_id: int) -> int:
        store = self._manager.store
        return store.forget_nat(peer_id, self.name) if store is not None else 0


# --------------------------------------------------------------------------- all links

PublicChange = Callable[[WanLink, Endpoint | None], None]


class LinkManager:
    """The WAN links of a site, by id (1..N in config order)."""

    def __init__(
        self,
        links: Sequence[Link],
        *,
        send: Callable[[int, Addr, bytes], None],
        clock: Callable[[], float] = time.monotonic,
        store: Store | None = None,
    ) -> None:
        self._links: dict[int, WanLink] = {
            i + 1: WanLink(i + 1, link, self) for i, link in enumerate(links)
        }
        self.send = send
        self.clock = clock
        self.store = store
        self.stun_server: Addr | None = None
        self.stun_check: Addr | None = None  # the second destination (see use_stun_server)
        self._on_public: list[PublicChange] = []

    def __iter__(self) -> Iterator[WanLink]:
        return iter(self._links.values())

    def __len__(self) -> int:
        return len(self._links)

    def __getitem__(self, link_id: int) -> WanLink:
        return self._links[link_id]

    def get(self, link_id: int) -> WanLink | None:
        return self._links.get(link_id)

    def mtu(self, link_id: int) -> int:
        """The link's configured MTU: the largest path MTU probed over it (1500 for an
        unknown link)."""
        wl = self.get(link_id)
        return wl.link.mtu if wl is not None else 1500

    def by_name(self, name: str) -> WanLink:
        for wl in self._links.values():
            if wl.name == name:
                return wl
        raise KeyError(name)

    @property
    def ids(self) -> dict[str, int]:
        """Link name -> link id."""
        return {wl.name: wl.id for wl in self._links.values()}

    def open(self, fp: FastPath) -> None:
        """Open every link's socket and hand it to the fast path (which keeps its own
        duplicate of the descriptor). Raises LinkError naming the link that failed."""
        for wl in self._links.values():
            ls = open_link_socket(wl.id, wl.link)
            with ls.sock:
                fp.link_add(wl.id, ls.sock.fileno())
                wl.bound = ls.sock.getsockname()[:2]

    # ---------------------------------------------------------------- state

    def states(self) -> dict[str, bool]:
        """Link name -> its device can carry traffic now."""
        return {wl.name: wl.is_up() for wl in self._links.values()}

    def faults(self) -> dict[str, str | None]:
        """Link name -> why its device cannot carry traffic now (None: it can)."""
        return {wl.name: wl.fault() for wl in self._links.values()}

    # ---------------------------------------------------------------- precedence policy

    def eligible_for_cloud(self, live: Iterable[int]) -> list[int]:
        """Ids of the links that should carry a session to a PoP, given the ids of the links
        whose session to that PoP is live: every main link always; a standby link only while
        no main link is live, or when the site has no main link at all."""
        live_ids = set(live)
        mains = [wl.id for wl in self._links.values() if wl.main]
        live_main = any(i in live_ids for i in mains)
        return [
            wl.id for wl in self._links.values()
            if not wl.altwan and (wl.main or not live_main or not mains)
        ]

    def altwan_link(self) -> WanLink | None:
        """The site's Alt-WAN link, if it has one (the configuration allows one)."""
        return next((wl for wl in self._links.values() if wl.altwan), None)

    def rank(self, link_id: int) -> tuple[int, int]:
        """Sort key of links by preference: lowest precedence first, then config order."""
        return (self._links[link_id].precedence, link_id)

    # ---------------------------------------------------------------- STUN

    def on_public_change(self, callback: PublicChange) -> None:
        """Call `callback(link, old)` whenever a link's public endpoint is learned, changes
        or is forgotten (link.public is the new value)."""
        self._on_public.append(callback)

    def publics(self) -> tuple[str | None, ...]:
        """Every link's public endpoint as text (None: unknown), in link order."""
        return tuple(wl.public_str() for wl in self._links.values())

    def advertised(self) -> tuple[tuple[str | None, str | None], ...]:
        """What a `register` tells the PoP of every link that may change: its public endpoint
        and NAT class as STUN teaches them, and an Alt-WAN link's own address (the other
        sites reach it there), in link order (a change is registered again)."""
        return tuple(
            (wl.local_ipv4(), "altwan") if wl.altwan else (wl.public_str(), wl.nat_class)
            for wl in self._links.values()
        )

    def public_str(self, link_id: int) -> str | None:
        wl = self._links.get(link_id)
        return wl.public_str() if wl is not None else None

    def use_stun_server(self, server: Addr | None, check: Addr | None = None) -> None:
        """Map every link against `server` from now on (None: stop), and against `check` too
        (the active PoP's main endpoint, which answers STUN as well): a NAT that draws a new
        port per destination shows two different mappings, which is how the mesh knows it
        needs the birthday approach. A new server is asked at once: the mapping toward it is
        what the mesh will be told about (with a randomising NAT it differs per destination)."""
        if check == server:
            check = None
        if server == self.stun_server and check == self.stun_check:
            return
        now = self.clock()
        if server != self.stun_server:
            self.stun_server = server
            for wl in self._stun_links():
                st = wl.stun
                st.server, st.tx, st.next_at = server, None, now
        if check != self.stun_check:
            self.stun_check = check
            for wl in self._stun_links():
                st = wl.stun_check
                st.server, st.tx, st.next_at, st.public = check, None, now, None
        self.tick()

    def tick(self) -> None:
        """Start due transactions and retransmit or fail the ones under way."""
        now = self.clock()
        for wl in self._stun_links():
            if self.stun_server is not None:
                self._tick_stun(wl, wl.stun, self.stun_server, now)
            if self.stun_check is not None:
                self._tick_stun(wl, wl.stun_check, self.stun_check, now)

    def next_due(self) -> float:
        """When tick() next has something to do: a transaction to start or retransmit."""
        now = self.clock()
        due = math.inf
        for wl in self._stun_links():
            for st, server in ((wl.stun, self.stun_server), (wl.stun_check, self.stun_check)):
                if server is None:
                    continue
                if st.tx is None:
                    due = min(due, st.next_at)
                    continue
                left = st.tx.next_timeout(now)
                if left is not None:
                    due = min(due, now + left)
        return due

    def _stun_links(self) -> Iterator[WanLink]:
        """The links STUN maps: every link but an Alt-WAN one (no NAT, and no way to the
        PoP's STUN server)."""
        return (wl for wl in self._links.values() if not wl.altwan)

    def _tick_stun(self, wl: WanLink, st: LinkStun, server: Addr, now: float) -> None:
        if st.tx is None:
            if now >= st.next_at:
                st.tx = StunTransaction(server, clock=self.clock)
                st.transactions += 1
                self.send(wl.id, server, st.tx.start(now))
            return
        due = st.tx.next_timeout(now)
        if due is None or due > 0:
            return
        again = st.tx.on_timeout(now)
        if again is not None:
            self.send(wl.id, server, again)
        elif st.tx.error is not None:
            self._stun_failed(wl, st, now)

    def on_stun(self, link_id: int, addr: Addr, data: bytes) -> bool:
        """A STUN datagram that arrived on link_id; True if it answered one of our
        transactions."""
        wl = self._links.get(link_id)
        if wl is None:
            return False
        now = self.clock()
        for st in (wl.stun, wl.stun_check):
            if st.tx is None:
                continue
            ep = st.tx.handle(data, addr)
            if ep is None:
                if st.tx.error is None:
                    continue
                self._stun_failed(wl, st, now)
                return True
            st.tx, st.error = None, None
            st.learned_at = now
            st.next_at = now + STUN_REFRESH_S
            if ep != st.public:
                old = st.public
                st.public = ep
                if st is wl.stun:
                    log.info(
                        "link %s: public endpoint %s (STUN via %s, was %s)",
                        wl.name,
                        ep,
                        format_endpoint(addr),
                        old or "unknown",
                    )
                    self._public_changed(wl, old)
                else:
                    log.info("link %s: mapping toward %s is %s (NAT class %s)", wl.name,
                             format_endpoint(addr), ep, wl.nat_class)
            return True
        return False

    def _stun_failed(self, wl: WanLink, st: LinkStun, now: float) -> None:
        assert st.tx is not None
        reason = st.tx.error or "failed"
        # A link that stays cut off fails every 45 s: only the first failure in a row warns.
        log.log(
            logging.WARNING if st.error is None and st is wl.stun else logging.DEBUG,
            "link %s: STUN via %s failed: %s",
            wl.name,
            format_endpoint(st.server) if st.server else "?",
            reason,
        )
        st.tx, st.error = None, reason
        st.failures += 1
        st.next_at = now + STUN_RETRY_S
        if st.public is not None:
            # Without an answer the old mapping may be gone (router restart, new address);
            # an unknown endpoint is better than a wrong one.
            old = st.public
            st.public = None
            st.learned_at = None
            if st is wl.stun:
                self._public_changed(wl, old)

    def _public_changed(self, wl: WanLink, old: Endpoint | None) -> None:
        for callback in self._on_public:
            try:
                callback(wl, old)
            except Exception:  # a listener's bug must not stop STUN on the other links
                log.exception("link %s: public endpoint listener failed", wl.name)
