"""socketd, the appliance supervisor: wires the parts together and owns nothing
else. Config (config.py) -> fast path (fastpath.py) with the TUN device and one
socket per link (links.py) -> kernel routes and MSS clamp (netcfg.py) -> one
PeerTunnel per peer (tunnel.py) fed by the DTLS sessions (dtls.py) that this
module demultiplexes from the fast path's control queue -> the PoP sessions,
cloud routes and STUN answers (cloud.py) -> events and cloud documents in the store (store.py) ->
status over the control socket (control.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sdwan import __version__
from sdwan.appliance.leds import (
    BOOT_GRACE_S,
    BoxState,
    LedController,
    Pattern,
    choose_pattern,
    link_states,
    open_leds,
)
from sdwan.appliance.wanaddr import WanAddressing
from sdwan.appliance.watchdog import Guard
from sdwan.bindings.fastpath import CtrlEvent, FastPath, FastPathConfig
from sdwan.common.control import ControlServer
from sdwan.common.daemon import StartupError, run_service
from sdwan.common.dtls import DtlsContext, DtlsSession, client_hello_random, is_client_hello
from sdwan.common.netcfg import NetcfgError, Plan, apply_in_worker, tunnel_mtu
from sdwan.common.store import Store, StoreError
from sdwan.common.stun import is_stun
from sdwan.site.cloud import Cloud, CloudTimers
from sdwan.site.config import SiteConfig, load_config
from sdwan.site.links import LinkError, open_link_socket
from sdwan.site.tunnel import KICK_TYPE, Addr, PeerTunnel, Timers, decode_kick

log = logging.getLogger("sdwan.site.socketd")

TICK_S = 0.05
HANDSHAKE_DEADLINE_S = 10.0
MAX_HANDSHAKING = 256  # server sessions in progress; each needed a valid cookie
MAX_HANDSHAKING_PER_IP = 4  # so that one host cannot fill the table by itself
MAX_EVENTS_PER_WAKEUP = 256  # a control flood must not starve timers and socketctl
REJECTIONS_KEPT = 20
STALE_SESSION_S = 60.0  # an established session no tunnel uses any more
LED_PERIOD_S = 0.5  # how often the LEDs follow the box's state


@dataclass
class _Session:
    session: DtlsSession
    link_id: int
    addr: Addr
    created: float
    expected_peer: int | tuple[str, int] | None = None  # client sessions know whom they called
    reported: bool = False  # established/failed already handed on
    hello_random: bytes | None = None  # of the ClientHello a server session answers

    @property
    def is_server_handshake(self) -> bool:
        return not self.session.is_client and not self.session.established


@dataclass
class _Stats:
    dtls_no_session: int = 0
    dtls_rejected: int = 0
    kicks_bad: int = 0
    control_unknown: int = 0
    stun_unmatched: int = 0
    rejections: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=REJECTIONS_KEPT)
    )


class Supervisor:
    def __init__(self, cfg: SiteConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock  # the tests' simulations drive their own
        self.started = clock()
        self.stats = _Stats()
        self.sessions: dict[tuple[int, Addr], _Session] = {}
        self.tunnels: dict[int, PeerTunnel] = {}
        self.link_ids = {link.name: i + 1 for i, link in enumerate(cfg.links)}
        self.fp: FastPath | None = None
        self.dtls: DtlsContext | None = None
        self.control: ControlServer | None = None
        self.store: Store | None = None
        self.cloud: Cloud | None = None
        self._net_plan: Plan | None = None
        self._net_task: asyncio.Task[None] | None = None
        self._net_dirty = False
        self._stop = asyncio.Event()
        self._ticked = asyncio.Event()  # the loop has run a tick: the start-up is over
        self.wan: WanAddressing | None = None
        self.leds: LedController | None = None
        self.guard: Guard | None = None  # made by run(): the simulations have no appliance
        self._cloud_was_up = False  # the LEDs show booting until the cloud is first up

    # ---------------------------------------------------------------- setup

    def _open(self) -> None:
        cfg = self.cfg
        try:
            self.dtls = DtlsContext(cfg.pki.ca, cfg.pki.cert, cfg.pki.key, cfg.site.id)
        except (OSError, ValueError) as e:
            raise StartupError(str(e)) from e
        fp_cfg = FastPathConfig.default()
        # Python rekeys on time; the fast path's own limits are the backstop.
        fp_cfg.rekey_after_seconds = int(cfg.tunnel.rekey_s) + 30
        fp_cfg.reject_after_seconds = int(cfg.tunnel.rekey_s) * 2 + 60
        fp_cfg.spin_us = cfg.tunnel.answer_wait_us
        self.fp = fp = FastPath(fp_cfg)
        try:
            fp.tun_open(cfg.tunnel.interface)
        except OSError as e:
            raise StartupError(f"cannot open tunnel device {cfg.tunnel.interface}: {e}") from e
        for link in cfg.links:
            link_id = self.link_ids[link.name]
            try:
                ls = open_link_socket(link_id, link)
            except LinkError as e:
                raise StartupError(str(e)) from e
            with ls.sock:
                fp.link_add(link_id, ls.sock.fileno())
        timers = Timers(
            keepalive_s=cfg.tunnel.keepalive_s,
            rekey_s=cfg.tunnel.rekey_s,
            dead_after_s=3 * cfg.tunnel.keepalive_s,
        )
        routes: list[str] = []
        for peer in cfg.peers:
            link_name = peer.link
            link_id = self.link_ids[link_name]
            fp.peer_add(peer.site_id)
            fp.set_endpoint(peer.site_id, link_id, peer.endpoint)
            for net in peer.subnets:
                fp.route_set(net, peer.site_id)
                routes.append(str(net))
            self.tunnels[peer.site_id] = PeerTunnel(
                my_site_id=cfg.site.id,
                peer_site_id=peer.site_id,
                link_id=link_id,
                link_name=link_name,
                endpoint=peer.endpoint,
                fp=fp,
                port=self,
                timers=timers,
                clock=self.clock,
                on_event=self._tunnel_event(peer.site_id),
            )
        try:
            self.store = Store(cfg.paths.data_dir)
        except (StoreError, OSError) as e:
            # Tunnels work without a store; only history and the cloud copy are lost.
            log.error("store unusable, running without one: %s", e)
        self.cloud = self._make_cloud(fp)
        plan = Plan(
            tun=cfg.tunnel.interface,
            mtu=tunnel_mtu([ln.mtu for ln in cfg.links]),
            routes=routes,
            mss_clamp=cfg.tunnel.mss_clamp,
        )
        try:
            apply_in_worker(plan)
        except NetcfgError as e:
            raise StartupError(f"network configuration failed: {e}") from e
        self._net_plan = plan
        fp.start()

    def _make_cloud(self, fp: FastPath) -> Cloud:
        cfg = self.cfg
        protected = [*cfg.lan.subnets, *(n for p in cfg.peers for n in p.subnets)]
        return Cloud(
            site_id=cfg.site.id,
            version=__version__,
            links=[(self.link_ids[ln.name], ln) for ln in cfg.links],
            pops=cfg.pops,
            timers=CloudTimers(
                keepalive_s=cfg.cloud.keepalive_ms / 1000,
                dead_after_s=cfg.cloud.dead_after_ms / 1000,
                return_hold_s=float(cfg.cloud.return_hold_s),
                ping_s=float(cfg.cloud.ping_s),
                rekey_s=float(cfg.tunnel.rekey_s),
            ),
            fp=fp,
            port=self,
            store=self.store,
            clock=self.clock,
            protected=protected,
            on_subnets=self._on_cloud_subnets,
        )

    def _tunnel_event(self, site_id: int) -> Callable[[str, str], None]:
        def record(kind: str, text: str) -> None:
            if self.store is None:
                return
            try:
                self.store.add_event(kind.replace("-", "."), text, site_id=site_id)
            except (StoreError, ValueError) as e:
                log.warning("event not stored: %s", e)

        return record

    def _on_cloud_subnets(self, subnets: list[str]) -> None:
        """Kernel routes for the directory's subnets, applied off the loop."""
        if self._net_plan is None:
            return
        static = [str(n) for p in self.cfg.peers for n in p.subnets]
        self._net_plan.routes = sorted(set(static) | set(subnets))
        self._net_dirty = True
        if self._net_task is None or self._net_task.done():
            self._net_task = asyncio.get_running_loop().create_task(self._apply_net())

    async def _apply_net(self) -> None:
        # The worker replaces routes idempotently; routes of sites that left stay on
        # the tunnel device, where the fast path drops their packets as no_route.
        while self._net_dirty and self._net_plan is not None:
            self._net_dirty = False
            plan = Plan(**{**self._net_plan.__dict__, "routes": list(self._net_plan.routes)})
            try:
                await asyncio.to_thread(apply_in_worker, plan)
            except NetcfgError as e:
                log.error("cloud routes not installed: %s", e)

    # ---------------------------------------------------------------- Port for tunnels

    def send(self, link_id: int, addr: Addr, data: bytes) -> None:
        assert self.fp is not None
        try:
            self.fp.ctrl_send(link_id, addr, data)
        except OSError as e:
            log.debug("send to %s:%d failed: %s", addr[0], addr[1], e)

    def client_session(
        self, link_id: int, addr: Addr, expected_site_id: int | tuple[str, int]
    ) -> DtlsSession:
        assert self.dtls is not None
        session = self.dtls.client(expected_site_id)
        self._register(
            _Session(session, link_id, addr, self.clock(), expected_peer=expected_site_id)
        )
        return session

    def forget_session(self, session: DtlsSession) -> None:
        """Drop a client handshake its owner gave up on, without reporting it as refused."""
        for key, entry in list(self.sessions.items()):
            if entry.session is session:
                del self.sessions[key]

    def _register(self, entry: _Session) -> None:
        """Put entry in the table; a handshake it displaces is failed, not orphaned."""
        old = self.sessions.get((entry.link_id, entry.addr))
        if old is not None and not old.reported and not old.session.established:
            old.reported = True
            self._reject(old, "superseded by another handshake with the same address")
        self.sessions[(entry.link_id, entry.addr)] = entry

    def _known_source(self, addr: Addr) -> bool:
        return any(addr in (t.endpoint, t.configured_endpoint) for t in self.tunnels.values())

    def _admit(self, addr: Addr) -> bool:
        """Room for one more server handshake from addr (its cookie was valid)?

        A cookie only proves the sender receives at its address, so one host
        could otherwise hold every slot from many ports. Configured peers are
        always admitted, evicting the oldest handshake of an unknown source."""
        pending = [e for e in self.sessions.values() if e.is_server_handshake]
        known = self._known_source(addr)
        if not known and sum(1 for e in pending if e.addr[0] == addr[0]) >= MAX_HANDSHAKING_PER_IP:
            return False
        if len(pending) < MAX_HANDSHAKING:
            return True
        victims = [e for e in pending if not self._known_source(e.addr)]
        if not known or not victims:
            return False
        victim = min(victims, key=lambda e: e.created)
        victim.reported = True
        self.sessions.pop((victim.link_id, victim.addr), None)
        self.stats.dtls_rejected += 1
        return True

    # ---------------------------------------------------------------- control packets

    def _on_ctrl_readable(self) -> None:
        assert self.fp is not None
        self.fp.ctrl_drain(self._on_ctrl_event, MAX_EVENTS_PER_WAKEUP)

    def _on_ctrl_event(self, ev: CtrlEvent) -> None:
        if ev.event == CtrlEvent.REKEY or ev.event == CtrlEvent.KEY_EXPIRED:
            tunnel = self.tunnels.get(ev.peer_id)
            if tunnel is None and self.cloud is not None:
                tunnel = self.cloud.tunnel_for_peer(ev.peer_id)
            if tunnel is not None:
                tunnel.on_rekey_needed()
            return
        data, addr, link_id = ev.data, ev.addr, ev.link_id
        if not data:
            self.stats.control_unknown += 1
        elif data[0] == KICK_TYPE:
            self._on_kick(link_id, addr, data)
        elif 20 <= data[0] <= 63:
            self._on_dtls(link_id, addr, data)
        elif is_stun(data):
            self._on_stun(link_id, addr, data)
        else:
            self.stats.control_unknown += 1

    def _on_stun(self, link_id: int, addr: Addr | None, data: bytes) -> None:
        # Answers to the cloud's Binding requests; anything else (requests from strangers,
        # late retransmitted answers) is counted and dropped: a link socket reflects nothing.
        if addr is None or self.cloud is None or not self.cloud.on_stun(link_id, addr, data):
            self.stats.stun_unmatched += 1

    def _on_kick(self, link_id: int, addr: Addr, data: bytes) -> None:
        kick = decode_kick(data)
        tunnel = self.tunnels.get(kick[0]) if kick else None
        if kick is None or tunnel is None or kick[1] != self.cfg.site.id:
            self.stats.kicks_bad += 1
            return
        tunnel.on_kick(link_id, addr)

    def _on_dtls(self, link_id: int, addr: Addr, data: bytes) -> None:
        assert self.dtls is not None
        key = (link_id, addr)
        entry = self.sessions.get(key)
        hello = client_hello_random(data) if is_client_hello(data) else None
        repeat = entry is not None and entry.is_server_handshake and hello == entry.hello_random
        if is_client_hello(data) and not repeat:
            # A new handshake from this address (first, rekey, or after the
            # peer restarted; a stale one in progress is superseded):
            # stateless cookie check first.
            result = self.dtls.accept(
                data, f"{addr[0]}:{addr[1]}", allowed_site_ids=self.tunnels.keys()
            )
            for reply in result.replies:
                self.send(link_id, addr, reply)
            if result.session is not None:
                if not self._admit(addr):
                    self.stats.dtls_rejected += 1
                    return
                self._register(
                    _Session(result.session, link_id, addr, self.clock(), hello_random=hello)
                )
                self._after_input(self.sessions[key])
            return
        if entry is None:
            self.stats.dtls_no_session += 1
            return
        for reply in entry.session.receive(data):
            self.send(link_id, addr, reply)
        self._after_input(entry)

    def _after_input(self, entry: _Session) -> None:
        """Hand a session's news (established, failed, messages) to its tunnel."""
        session = entry.session
        if not entry.reported and session.failed:
            entry.reported = True
            self._reject(entry, session.failed)
            return
        if not entry.reported and session.established:
            entry.reported = True
            peer = session.peer_site_id
            tunnel = self._tunnel_of(session)
            if tunnel is None:
                self._reject(entry, f"site {peer} is not a configured peer")
                for d in session.close():
                    self.send(entry.link_id, entry.addr, d)
                return
            tunnel.on_established(session, entry.link_id, entry.addr)
        if entry.reported and session.established:
            tunnel = self._tunnel_of(session)
            for msg in session.take_messages():
                if tunnel is not None:
                    tunnel.on_message(session, msg)

    def _tunnel_of(self, session: DtlsSession) -> PeerTunnel | None:
        """The tunnel a session belongs to: a PoP session we opened, else the site's tunnel."""
        if self.cloud is not None:
            tunnel = self.cloud.tunnel_for_session(session)
            if tunnel is not None:
                return tunnel
        peer = session.peer_site_id
        return self.tunnels.get(peer) if isinstance(peer, int) else None

    def _reject(self, entry: _Session, reason: str) -> None:
        addr = f"{entry.addr[0]}:{entry.addr[1]}"
        self.stats.dtls_rejected += 1
        # Strangers that never finish their handshake are counted, not listed:
        # they would push the refusals that matter out of the short list.
        if entry.expected_peer or self._known_source(entry.addr) or reason != "handshake timed out":
            self.stats.rejections.append({"at": time.time(), "from": addr, "reason": reason})
            log.warning("handshake with %s failed: %s", addr, reason)
        self.sessions.pop((entry.link_id, entry.addr), None)
        # Tell the tunnel this concerns: the one we called, else the one whose
        # endpoint it came from (a responder learns why its peer was refused).
        tunnel = (
            self.tunnels.get(entry.expected_peer) if isinstance(entry.expected_peer, int) else None
        )
        if tunnel is None and self.cloud is not None:
            tunnel = self.cloud.tunnel_for_session(entry.session)
        if tunnel is None and not isinstance(entry.expected_peer, tuple):
            tunnel = next(
                (
                    t
                    for t in self.tunnels.values()
                    if entry.addr in (t.endpoint, t.configured_endpoint)
                ),
                None,
            )
        if tunnel is not None:
            tunnel.on_failed(
                entry.session,
                reason if entry.expected_peer else f"handshake from {addr} refused: {reason}",
            )

    # ---------------------------------------------------------------- periodic work

    def _tick(self) -> None:
        now = self.clock()
        current = {id(t.session) for t in self.tunnels.values()}
        if self.cloud is not None:
            current |= self.cloud.current_sessions()
        for key, entry in list(self.sessions.items()):
            session = entry.session
            if session.established:
                # Replaced by a rekey or left behind by a roaming peer.
                if id(session) not in current and now - entry.created > STALE_SESSION_S:
                    del self.sessions[key]
                continue
            if now - entry.created > HANDSHAKE_DEADLINE_S and not session.failed:
                entry.reported = True
                self._reject(entry, "handshake timed out")
                continue
            due = session.timeout()
            if due is not None and due <= 0:
                for d in session.on_timeout():
                    self.send(entry.link_id, entry.addr, d)
                self._after_input(entry)
            if key in self.sessions and entry.reported and not session.established:
                self.sessions.pop(key, None)
        for tunnel in self.tunnels.values():
            try:
                tunnel.tick()
            except Exception:
                log.exception("tunnel %d tick failed", tunnel.peer_id)
        if self.cloud is not None:
            try:
                self.cloud.tick()
            except Exception:
                log.exception("cloud tick failed")

    async def _ticker(self) -> None:
        while not self._stop.is_set():
            self._tick()
            self._ticked.set()
            await asyncio.sleep(TICK_S)

    # ---------------------------------------------------------------- control socket

    async def _status(self, _req: dict) -> dict:
        assert self.fp is not None
        links = []
        for link in self.cfg.links:
            c = self.fp.link_counters(self.link_ids[link.name])
            links.append(
                {
                    "name": link.name,
                    "interface": link.interface,
                    "port": link.port,
                    "precedence": link.precedence,
                    "mtu": link.mtu,
                    "rx_packets": c.rx_packets,
                    "tx_packets": c.tx_packets,
                    "rx_bytes": c.rx_bytes,
                    "tx_bytes": c.tx_bytes,
                    "drops": c.drops,
                }
            )
        g = self.fp.global_counters()
        spin = self.fp.spin_stats()
        return {
            "site_id": self.cfg.site.id,
            "name": self.cfg.site.name,
            "version": __version__,
            "uptime_s": round(self.clock() - self.started, 1),
            "tunnel_interface": self.cfg.tunnel.interface,
            "peers_up": sum(1 for t in self.tunnels.values() if t.state == "up"),
            "peers_total": len(self.tunnels),
            "links": links,
            "drops": g.drops,
            # The TUN thread's waits for answers (docs/dataplane.md, "Latency").
            "answer_waits": {
                "waits": spin.spins,
                "answered": spin.hits,
                "cpu_ms": round(spin.spin_ns / 1e6, 1),
            },
            "control": {
                "dtls_no_session": self.stats.dtls_no_session,
                "dtls_rejected": self.stats.dtls_rejected,
                "kicks_bad": self.stats.kicks_bad,
                "unknown": self.stats.control_unknown,
                "stun_unmatched": self.stats.stun_unmatched,
            },
            "rejections": list(self.stats.rejections),
            "cloud": self.cloud.summary() if self.cloud is not None else {"state": "off"},
            "appliance": self._appliance_status(),
        }

    async def _peers(self, _req: dict) -> dict:
        peers = []
        for peer in self.cfg.peers:
            st = self.tunnels[peer.site_id].status()
            st["subnets"] = [str(n) for n in peer.subnets]
            st["transport"] = "direct"
            peers.append(st)
        if self.cloud is not None:
            peers.extend(self.cloud.directory_peers(exclude=self.tunnels))
        return {"peers": peers}

    async def _pop(self, _req: dict) -> dict:
        if self.cloud is None:
            return {"state": "off", "sessions": []}
        return self.cloud.pop_status()

    async def _events(self, req: dict) -> dict:
        limit = req.get("limit", 50)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
            raise ValueError("limit must be an integer 1..10000")
        kind = req.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise ValueError("kind must be a string")
        if self.store is None:
            raise ValueError("no event store (see the log for why)")
        events = self.store.events(limit=limit, kind=kind)
        return {
            "events": [e.to_dict() for e in events],
            "last_seq": self.store.last_seq(),
            "uploaded_seq": self.store.uploaded_seq(),
        }

    # ---------------------------------------------------------------- WAN addressing

    def _wan_handlers(self) -> dict:
        """`links`, `set-link` and `dhcp-lease` (wanaddr.py owns them)."""
        self.wan = WanAddressing(
            self.cfg.links, self.store, self.cfg.paths.control_socket, self._record_event
        )
        return self.wan.handlers()

    def _start_wan(self) -> None:
        # Stored settings are applied in the background once the control socket is up, so
        # the console can look at (and fix) a link whose setting fails.
        assert self.wan is not None
        self.wan.start()

    def _record_event(self, kind: str, text: str, data: dict) -> None:
        if self.store is None:
            return
        try:
            self.store.add_event(kind, text, data=data)
        except (StoreError, ValueError) as e:
            log.warning("event not stored: %s", e)

    # ---------------------------------------------------------------- LEDs and watchdog

    def _start_appliance(self) -> None:
        """Before anything else, so that a socketd that fails to start is counted (leds.py,
        watchdog.py)."""
        self.leds = open_leds(self.cfg.appliance.leds)
        self.guard = Guard(self.cfg.appliance, self.cfg.paths.data_dir, __version__)
        self.guard.start()
        if self.leds is not None:
            self.leds.show(Pattern.ERROR if self.guard.in_error() else Pattern.BOOTING)

    async def _appliance(self, ticker: asyncio.Task[None]) -> None:
        assert self.guard is not None
        # The watchdog keeps its start-up timeout until the loop has ticked once (or the
        # ticker died: then the running timeout, unpetted, resets the box soon).
        ticked = asyncio.create_task(self._ticked.wait())
        try:
            await asyncio.wait({ticked, ticker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticked.cancel()
        # A supervisor whose ticker died is not healthy: the pets stop, the box resets.
        pets = asyncio.create_task(self.guard.run(alive=lambda: not ticker.done()))
        try:
            while True:
                if self.leds is not None:
                    self._show_leds(self.leds)
                await asyncio.sleep(LED_PERIOD_S)
        finally:
            pets.cancel()

    def _show_leds(self, leds: LedController) -> None:
        links = link_states((ln.name, ln.interface) for ln in self.cfg.links)
        cloud = self.cloud.state if self.cloud is not None else "off"
        self._cloud_was_up |= cloud == "up"
        # Until the cloud is first reached (or the grace runs out) the box is booting, however
        # its sessions and links come and go meanwhile: no link_fault/cloud_down flicker.
        first_connect = cloud != "off" and not self._cloud_was_up
        state = BoxState(
            cloud=cloud,
            links_down=tuple(name for name, up in links.items() if not up),
            error=self.guard is not None and self.guard.in_error(),
            booting=first_connect and self.clock() - self.started < BOOT_GRACE_S,
        )
        leds.show(choose_pattern(state), links)

    def _appliance_status(self) -> dict:
        guard = self.guard.status() if self.guard is not None else {}
        return {**guard, "leds": self.leds.status() if self.leds is not None else None}

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._start_appliance()
        try:
            self._open()
        except StartupError as e:
            assert self.guard is not None
            self.guard.end(f"start failed: {e}")
            raise
        assert self.fp is not None
        loop.add_reader(self.fp.ctrl_fd, self._on_ctrl_readable)
        self.control = ControlServer(
            self.cfg.paths.control_socket,
            {
                "status": self._status,
                "peers": self._peers,
                "pop": self._pop,
                "events": self._events,
                **self._wan_handlers(),
            },
        )
        await self.control.start()
        self._start_wan()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info(
            "socketd %s up: site %d, %d link(s), %d peer(s)",
            __version__,
            self.cfg.site.id,
            len(self.cfg.links),
            len(self.tunnels),
        )
        ticker = asyncio.create_task(self._ticker())
        appliance = asyncio.create_task(self._appliance(ticker))
        try:
            await self._stop.wait()
        finally:
            appliance.cancel()
            ticker.cancel()
            if self._stop.is_set() and self.guard is not None:
                self.guard.end("stopped")
            log.info("socketd stopping")
            await self.control.close()
            if self.wan is not None:
                await self.wan.close()
            loop.remove_reader(self.fp.ctrl_fd)
            self.close()

    def close(self) -> None:
        # The watchdog first: a slow LED below must not outlast init's grace period with
        # the watchdog still armed.
        if self.guard is not None:
            self.guard.close()
        if self.leds is not None:
            if self.guard is not None and self.guard.ended == "stopped":
                self.leds.show(Pattern.OFF)
                self.leds.settle(0.5)
            self.leds.close(timeout=1.0)
            self.leds = None
        if self.cloud is not None:
            with contextlib.suppress(Exception):
                self.cloud.close()
            self.cloud = None
        if self.fp is not None:
            self.fp.close()
            self.fp = None
        if self.store is not None:
            self.store.close()
            self.store = None


def main(argv: list[str] | None = None) -> int:
    return run_service("socketd", "SD-WAN appliance supervisor", load_config, Supervisor, argv)


if __name__ == "__main__":
    sys.exit(main())
