"""The appliance supervisor (socketd.py is its entry point): wires the parts together and
owns nothing else. Config (config.py) -> fast path (fastpath.py) with the TUN device (tundev.py) and
the WAN links (links.py: sockets, state, STUN) -> kernel routes and MSS clamp (netcfg.py)
-> the session layer (sessions.py) draining the fast path's control queue, with four owners
of sessions registered: one PeerTunnel per configured peer (tunnel.py), the off-cloud mesh
(mesh.py, also the handler of probe datagrams and of the PoP's punches), the Alt-WAN tunnels
(altwan.py) and the PoP sessions (cloud.py) -> the routes of every prefix, static, mesh,
Alt-WAN and cloud (paths.py) and the off-cloud transport rules of the cloud's config
(rules.py) -> the LAN firewall from the cloud's config (firewall.py) -> events and cloud
documents in the store (store.py) -> status over the control socket (control.py); where RAUC
is, A/B updates (appliance/updater.py), given a view of the parts' health.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from sdwan import __version__
from sdwan.appliance.clock import ClockFloor
from sdwan.appliance.lanport import LanPort
from sdwan.appliance.leds import (
    BOOT_GRACE_S,
    BoxState,
    LedController,
    Pattern,
    choose_pattern,
    open_leds,
)
from sdwan.appliance.raucbus import runtime_dir as update_runtime_dir
from sdwan.appliance.timesync import TimeSync
from sdwan.appliance.updater import Health as UpdateHealth
from sdwan.appliance.updater import Updater
from sdwan.appliance.wanaddr import WanAddressing
from sdwan.appliance.watchdog import FASTPATH_HEALTHY_S, Guard
from sdwan.bindings import tls
from sdwan.bindings.fastpath import (
    CtrlEvent,
    FastPath,
    FastPathConfig,
    FastPathError,
    ThreadKind,
    ThreadState,
)
from sdwan.common import heap
from sdwan.common.certlife import CertWatch, watch_identity
from sdwan.common.control import ControlServer, Handler
from sdwan.common.ctrlknown import KnownSources
from sdwan.common.daemon import ServiceFailed, StartupError
from sdwan.common.dtls import DtlsContext, DtlsSession
from sdwan.common.keytimers import FP_REKEY_BACKSTOP_S
from sdwan.common.netcfg import (
    NetcfgError,
    Plan,
    VlanPlan,
    Worker,
    apply_in_worker,
    ensure_vlans_in_worker,
    tunnel_mtu,
)
from sdwan.common.netdev import drain, link_events
from sdwan.common.probe import PROBE_TYPE
from sdwan.common.revocation import Revocations
from sdwan.common.sessions import Policy, SessionLayer
from sdwan.common.store import Store, StoreError
from sdwan.site.altwan import AltWan
from sdwan.site.birthday import LinkSockets
from sdwan.site.cloud import Cloud, CloudTimers
from sdwan.site.config import SiteConfig
from sdwan.site.firewall import Firewall
from sdwan.site.fpwatch import FastPathWatch
from sdwan.site.health import Health, LinkHealthState
from sdwan.site.links import LinkError, LinkManager
from sdwan.site.mesh import Mesh, pin_override
from sdwan.site.paths import Candidate, Paths, Transport
from sdwan.site.recovery import STORED_MAX_AGE_S, Reach, Recovery
from sdwan.site.renewal import Pair, Renewal, choose_identity
from sdwan.site.revoked import SiteRevocations
from sdwan.site.rules import Rules
from sdwan.site.sources import Sources, add_peer
from sdwan.site.steering import Kind, Steering
from sdwan.site.tundev import TunError, attach_tun
from sdwan.site.tunnel import Addr, PeerTunnel, State, StaticTunnels, Timers

log = logging.getLogger("sdwan.site.socketd")

# The ticker runs every TICK_S while anything has a sub-second clock running (a handshake,
# a PoP session's keepalives, a punch, traffic whose liveness is watched), and otherwise
# when the earliest of its parts' next_due() comes, at most IDLE_TICK_S apart: an idle box
# with hundreds of settled tunnels wakes a few times a second, not twenty. Anything that
# arrives (a control packet, a command, a liveness clock starting) wakes it at once.
TICK_S = 0.05
IDLE_TICK_S = 1.0
MAX_EVENTS_PER_WAKEUP = 256  # a control flood must not starve timers and socketctl
# Of the unknown sources' lane, per wake-up: after the known lane, a bounded share.
MAX_UNKNOWN_PER_WAKEUP = 32
LED_PERIOD_S = 0.5  # how often the LEDs follow the box's state
# A peer's data unanswered by us for this long gets a keepalive: the peer's liveness under
# traffic (docs/mesh.md) counts on an answer well within its silent_after_ms.
ACK_AFTER_S = 0.1
# Passes of the fast path's keepalive thread per PoP keepalive interval.
KEEPALIVE_PASSES = 4
HEAP_TRIM_S = 30.0  # how often freed memory goes back to the system (common/heap.py)
# Set to 1 in socketd's environment, the control socket takes `fault` (docs/watchdog.md):
# the tests make a fast-path thread die in a real socketd. Off on the box.
FAULT_INJECTION_ENV = "SDWAN_FAULT_INJECTION"
DOC_RECOVERY = "recovery"  # the store's document: whether WAN recovery was active
STATIC_OFFCLOUD = "static-offcloud"  # paths.py producer: directory subnets over static tunnels
# Every legitimate peer of a socket is at a configured endpoint: those skip the per-IP limit
# and may evict a stranger's handshake; a stranger's that times out is counted, not listed.
SITE_POLICY = Policy(
    max_handshaking=256,  # server sessions in progress; each needed a valid cookie
    max_per_source=4,  # so that one host cannot fill the table by itself
    known_skip_per_source=True,
    strangers_evict=False,
    list_strangers=False,
)


class Supervisor:
    def __init__(
        self,
        cfg: SiteConfig,
        clock: Callable[[], float] = time.monotonic,
        netcfg_worker: Worker | None = None,
    ) -> None:
        self.cfg = cfg
        # Started by socketd.py before this module loaded; it applies the first plan.
        self._first_worker = netcfg_worker
        self.clock = clock  # the tests' simulations drive their own
        self.started = clock()
        self.sessions = SessionLayer(
            send=self.send,
            clock=clock,
            policy=SITE_POLICY,
            my_site_id=cfg.site.id,
            on_stun=self._on_stun,
        )
        self.tunnels: dict[int, PeerTunnel] = {}
        self.sessions.add_owner(
            StaticTunnels(
                self.tunnels, {p.site_id: [str(n) for n in p.subnets] for p in cfg.peers}
            )
        )
        self.links = LinkManager(cfg.links, send=self.send, clock=clock)
        self.link_ids = self.links.ids
        self.fp: FastPath | None = None
        self.fpwatch: FastPathWatch | None = None
        self.known: KnownSources | None = None  # declared to the fast path's control gate
        self._known_gen = -1
        self.control: ControlServer | None = None
        self.store: Store | None = None
        self.cloud: Cloud | None = None
        self.mesh: Mesh | None = None
        self.revoked = SiteRevocations(on_event=self._record_event, clock=self.clock)
        self.altwan: AltWan | None = None
        self.recovery: Recovery | None = None
        self.health: Health | None = None
        self.steering: Steering | None = None
        self._netlink: socket.socket | None = None
        self.paths: Paths | None = None
        self.rules: Rules | None = None
        self.sources: Sources | None = None
        self.firewall = Firewall(on_event=self._record_event)
        self._net_plan: Plan | None = None
        self._net_task: asyncio.Task[None] | None = None
        self._net_dirty = False
        self._stop = asyncio.Event()
        # Why socketd ends on its own (a failed fast path with no watchdog to reset the box):
        # it exits with status 1 and init starts it again.
        self._fatal: str | None = None
        self._ticked = asyncio.Event()  # the loop has run a tick: the start-up is over
        self._wake = asyncio.Event()  # something arrived: tick now, not at the next due time
        self.ticks = 0
        self._next_trim = clock() + HEAP_TRIM_S
        self.wan: WanAddressing | None = None
        self.lan: LanPort | None = None
        self.leds: LedController | None = None
        self.guard: Guard | None = None  # made by run(): the simulations have no appliance
        self._cloud_was_up = False  # the LEDs show booting until the cloud is first up
        # The directory list (kept: its identity says whether it changed) and the static
        # tunnels up when the static-offcloud candidates were last submitted.
        self._static_offcloud_key: tuple[list, frozenset[int]] | None = None
        self.certs: CertWatch | None = None  # made by _open with the DTLS identity
        self.identity: Pair | None = None  # the certificate and key in use, and whence
        self.renewal: Renewal | None = None  # made by _open when there is a PoP to ask
        self.clock_floor: ClockFloor | None = None  # made by _open: the box's, not a simulation's
        self.timesync: TimeSync | None = None
        self.updater: Updater | None = None  # made by run() where RAUC is (docs/update.md)

    @property
    def dtls(self) -> DtlsContext | None:
        return self.sessions.dtls

    @dtls.setter
    def dtls(self, context: DtlsContext | None) -> None:
        self.sessions.dtls = context

    # ---------------------------------------------------------------- setup

    def _open(self) -> None:
        cfg = self.cfg
        try:
            self.identity = self._choose_identity()
            self.dtls = DtlsContext(cfg.pki.ca, self.identity.cert, self.identity.key,
                                    cfg.site.id)
            self.certs = watch_identity(cfg.pki.ca, self.dtls.ca_cert, self.identity.cert,
                                        self.dtls.cert)
        except (OSError, ValueError) as e:
            raise StartupError(str(e)) from e
        fp_cfg = FastPathConfig.default()
        # Python rekeys on time (on the interval agreed with each peer, never above ours); the
        # fast path's own limits are the backstop. Its key-age limit is the one this end
        # announces, never below an agreed one (common/keytimers.py).
        fp_cfg.rekey_after_seconds = cfg.tunnel.rekey_s + FP_REKEY_BACKSTOP_S
        fp_cfg.reject_after_seconds = cfg.tunnel.key_timers.key_max_age_s
        fp_cfg.spin_us = cfg.tunnel.answer_wait_us
        self.fp = fp = FastPath(fp_cfg)
        try:
            attach_tun(fp, cfg.tunnel.interface)
        except TunError as e:
            raise StartupError(str(e)) from e
        self._make_vlans()
        try:
            self.links.open(fp)
        except LinkError as e:
            raise StartupError(str(e)) from e
        timers = Timers(
            keepalive_s=cfg.tunnel.keepalive_s,
            rekey_s=cfg.tunnel.rekey_s,
            key_max_age_s=cfg.tunnel.key_max_age_s,
            dead_after_s=3 * cfg.tunnel.keepalive_s,
        )
        for peer in cfg.peers:
            link_name = peer.link
            link_id = self.link_ids[link_name]
            add_peer(fp, peer.site_id, owner=peer.site_id)
            fp.set_endpoint(peer.site_id, link_id, peer.endpoint)
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
                link_mtu=self.links.mtu,
            )
        try:
            self.store = Store(cfg.paths.data_dir)
        except (StoreError, OSError) as e:
            # Tunnels work without a store; only history and the cloud copy are lost.
            log.error("store unusable, running without one: %s", e)
        self.links.store = self.store
        self.clock_floor = ClockFloor(cfg.paths.data_dir)
        sock = cfg.paths.control_socket
        self.timesync = TimeSync(cfg.time, cfg.paths.data_dir, sock.parent, self._record_event,
                                 tag=sock.stem)
        for ev in self.clock_floor.at_start():
            log.warning("%s", ev.text)
            self._record_event(ev.kind, ev.text, ev.data)
        self.cloud = self._make_cloud(fp)
        self.renewal = self._make_renewal(self.cloud)
        self.sources = self._make_sources(fp, self.cloud)
        self.mesh = self._make_mesh(fp, self.cloud)
        self.altwan = self._make_altwan(fp, self.cloud)
        self._start_revocations(self.cloud, self.mesh, self.altwan)
        self.recovery = self._make_recovery(self.cloud, self.mesh, self.altwan)
        self.health, self.steering = self._make_health(fp, self.cloud, self.mesh)
        self.rules = self._make_rules(fp, self.cloud)
        # Before the fast path starts: the stored policy is in force before traffic flows.
        self._start_firewall(self.cloud)
        assert self.paths is not None
        plan = Plan(
            tun=cfg.tunnel.interface,
            mtu=tunnel_mtu([ln.mtu for ln in cfg.links]),
            routes=self.paths.tun_routes,
            mss_clamp=cfg.tunnel.mss_clamp,
        )
        try:
            if self._first_worker is not None:
                self._first_worker.apply(plan)
            else:
                apply_in_worker(plan)
        except NetcfgError as e:
            raise StartupError(f"network configuration failed: {e}") from e
        self._net_plan = plan
        self.known = self._make_known(fp)
        fp.start()
        names = {lid: name for name, lid in self.link_ids.items()}
        self.fpwatch = FastPathWatch(
            fp,
            on_event=self._record_event,
            link_name=lambda lid: names.get(lid, str(lid)),
            clock=self.clock,
            on_failed=self._fastpath_failed,
        )

    def _make_known(self, fp: FastPath) -> KnownSources:
        """Who, besides the fast path's peers, is a known source of control datagrams: the
        sessions and handshakes under way, the PoPs, the STUN servers, the static peers'
        configured endpoints and the hosts of the mesh's punch candidates."""
        known = KnownSources(fp)
        known.add(self.sessions.addresses)
        known.add(lambda: (self.links.stun_server, self.links.stun_check))
        known.add(lambda: [t.configured_endpoint for t in self.tunnels.values()])
        if self.cloud is not None:
            cloud = self.cloud
            known.add(lambda: [p.endpoint for p in cloud.pops])
        if self.mesh is not None:
            known.add(self.mesh.known_sources)
        known.refresh()
        self._known_gen = self.sessions.generation
        return known

    def _make_vlans(self) -> None:
        """The VLAN links' devices, before their sockets are bound to them. A VLAN that cannot
        be made stops the start like a link whose device is missing, with the reason."""
        vlans = [
            VlanPlan(device=ln.device, parent=ln.interface, vlan=ln.vlan)
            for ln in self.cfg.links
            if ln.vlan is not None
        ]
        if not vlans:
            return
        try:
            ensure_vlans_in_worker(vlans)
        except NetcfgError as e:
            raise StartupError(f"VLAN links: {e}") from e

    def _make_paths(self, fp: FastPath) -> Paths:
        """The route owner, with the static peers submitted (they are in the fast path)."""
        cfg = self.cfg
        paths = Paths(fp, local=cfg.lan.subnets, on_tun_routes=self._on_tun_routes)
        paths.submit(
            "static",
            [Candidate(n, p.site_id, Transport.DIRECT) for p in cfg.peers for n in p.subnets],
        )
        return paths

    def _make_cloud(self, fp: FastPath) -> Cloud:
        cfg = self.cfg
        if self.paths is None:
            self.paths = self._make_paths(fp)
        cloud = Cloud(
            site_id=cfg.site.id,
            version=__version__,
            links=self.links,
            pops=cfg.pops,
            timers=CloudTimers(
                keepalive_s=cfg.cloud.keepalive_ms / 1000,
                dead_after_s=cfg.cloud.dead_after_ms / 1000,
                return_hold_s=float(cfg.cloud.return_hold_s),
                ping_s=float(cfg.cloud.ping_s),
                rekey_s=float(cfg.tunnel.rekey_s),
                key_max_age_s=cfg.tunnel.key_max_age_s,
            ),
            fp=fp,
            paths=self.paths,
            port=self,
            store=self.store,
            clock=self.clock,
            owned=cfg.owned(),
        )
        self.sessions.add_owner(cloud)
        # The PoP sessions' keepalives from a C thread of the fast path (cloud.py,
        # PopSession._on_keys_active sets each session's interval), as popd sends its own:
        # a stall of this loop (a thousand-site directory to take in) must not leave the PoP
        # without a packet for its dead_after and make it drop this site.
        try:
            fp.keepalive_thread_start(cloud.timers.keepalive_s / KEEPALIVE_PASSES)
        except FastPathError as e:
            log.warning("keepalive thread not started (keepalives from the loop only): %s", e)
        return cloud

    def _make_sources(self, fp: FastPath, cloud: Cloud) -> Sources:
        """The allowed sources follow the static peers and the directory (the stored one
        until a PoP answers), in force before the fast path starts."""
        sources = Sources(
            fp,
            self.cfg.site.id,
            static=[(p.site_id, p.subnets) for p in self.cfg.peers],
            directory=lambda: cloud.directory,
        )
        cloud.watch_directory(sources.apply)
        sources.apply()
        return sources

    def _make_mesh(self, fp: FastPath, cloud: Cloud) -> Mesh:
        cfg = self.cfg
        assert self.paths is not None
        keepalive = float(cfg.mesh.keepalive_s)
        mesh = Mesh(
            site_id=cfg.site.id,
            cfg=cfg.mesh,
            links=self.links,
            fp=fp,
            port=self,
            paths=self.paths,
            # Idle, a dead path is noticed within two keepalive intervals (docs/mesh.md).
            timers=Timers(
                keepalive_s=keepalive, rekey_s=cfg.tunnel.rekey_s, dead_after_s=2 * keepalive,
                key_max_age_s=cfg.tunnel.key_max_age_s,
            ),
            directory=lambda: cloud.directory,
            ask_pop=cloud.send_to_pop,
            static_ids=self.tunnels.keys(),
            account_offcloud=lambda: (cloud.config or {}).get("offcloud"),
            directory_known=lambda: cloud.directory_rev is not None,
            on_event=self._record_event,
            clock=self.clock,
            sockets=LinkSockets(),
        )
        # Before the cloud: `socketctl peers` lists a site's mesh tunnel while it is up.
        self.sessions.add_owner(mesh, before=cloud)
        self.sessions.add_handler(PROBE_TYPE, mesh.on_probe)

        def on_punch(ps: object, msg: dict) -> None:
            mesh.on_punch(msg, from_active_pop=cloud.is_active(ps))  # type: ignore[arg-type]

        cloud.handle("punch", on_punch)
        cloud.watch_directory(mesh.on_directory)
        self.paths.set_override(pin_override(cfg.mesh.pin), why="pinned to the mesh ([mesh] pin)")
        mesh.load_cache()
        return mesh

    def _start_revocations(self, cloud: Cloud, mesh: Mesh, altwan: AltWan) -> None:
        """The account's revoked certificates follow the cloud config (the stored one now, so
        they hold while the cloud is down): every handshake asks them, and the mesh and
        Alt-WAN end the tunnels of a certificate revoked while they run."""
        assert self.dtls is not None
        self.dtls.revocation = self.revoked.reason
        self.revoked.watch(mesh.end_revoked)
        self.revoked.watch(altwan.end_revoked)
        self.revoked.watch(self._end_revoked_static)
        self._revocations_follow(cloud)

    def _revocations_follow(self, cloud: Cloud) -> None:
        """The list last taken, from its own store document (a config stored since may hold
        a malformed list, or none at all), then each config's: the active PoP's replaces
        it, another PoP's only adds to it."""
        self.revoked.load_stored(self.store, cloud.config)
        cloud.watch_config(
            lambda: self.revoked.load(cloud.config, authoritative=cloud.config_from_active)
        )

    def _end_revoked_static(self, revoked: Revocations) -> list[int]:
        """The static peers ([[peers]]) follow the account's list too: a tunnel whose peer
        authenticated with a revoked certificate is torn down at once (its keys leave the
        fast path), not left to work until its keys expire after a refused rekey."""
        ended: list[int] = []
        for site_id, tunnel in self.tunnels.items():
            session = tunnel.session
            serial = session.peer_serial if session is not None else None
            reason = revoked.reason(site_id, serial)
            if reason is None:
                continue
            tunnel.end(reason)
            text = f"site {site_id}: static tunnel ended: {reason}"
            log.warning("%s", text)
            self._record_event("tunnel.revoked", text, {"peer": site_id, "serial": serial},
                               site_id=site_id)
            ended.append(site_id)
        return ended

    def _make_altwan(self, fp: FastPath, cloud: Cloud) -> AltWan:
        cfg = self.cfg
        assert self.paths is not None
        keepalive = float(cfg.tunnel.keepalive_s)
        altwan = AltWan(
            site_id=cfg.site.id,
            links=self.links,
            fp=fp,
            port=self,
            paths=self.paths,
            # No NAT to keep open: keepalives only tell a dead path, idle within two of them,
            # under traffic within [mesh] silent_after_ms (the fast path's one threshold).
            timers=Timers(
                keepalive_s=keepalive, rekey_s=cfg.tunnel.rekey_s, dead_after_s=2 * keepalive,
                key_max_age_s=cfg.tunnel.key_max_age_s,
            ),
            directory=lambda: cloud.directory,
            directory_known=lambda: cloud.directory_rev is not None,
            static_ids=self.tunnels.keys(),
            on_event=self._record_event,
            silent_after_ms=cfg.mesh.silent_after_ms,
            clock=self.clock,
        )
        # After the mesh, before the cloud: `socketctl peers` lists the Alt-WAN tunnels
        # beside the mesh's (see _peers).
        self.sessions.add_owner(altwan, before=cloud)
        cloud.watch_directory(altwan.on_directory)
        # From the stored directory, without the PoP: the tunnels start with the first tick.
        altwan.on_directory()
        return altwan

    def _make_health(self, fp: FastPath, cloud: Cloud, mesh: Mesh) -> tuple[Health, Steering]:
        """Link health probes over the PoP sessions and the mesh's tunnels; steering tells
        the cloud and the mesh which links to use (docs/links.md)."""
        health = Health(self.links, self.cfg.wan, fp, clock=self.clock,
                        on_event=self._record_event)
        health.add_targets(cloud.probe_targets)
        health.add_targets(mesh.probe_targets)
        self.sessions.add_owner(health)
        steering = Steering(self.links, health, self.cfg.wan, clock=self.clock,
                            on_event=self._record_event)
        cloud.link_weights = lambda: (steering.generations[Kind.CLOUD],
                                      steering.weights(Kind.CLOUD))
        mesh.link_weights = lambda: (steering.generations[Kind.OFFCLOUD],
                                     steering.weights(Kind.OFFCLOUD))

        def link_down(link_id: int) -> bool:
            return health.state(link_id) is LinkHealthState.DOWN

        cloud.link_down = mesh.link_down = link_down
        return health, steering

    def _make_rules(self, fp: FastPath, cloud: Cloud) -> Rules:
        """The transport rules follow the cloud config (the stored one until a PoP answers)."""
        assert self.paths is not None
        rules = Rules(fp, self.paths, local=self.cfg.lan.subnets, directory=lambda: cloud.directory)
        cloud.watch_config(lambda: rules.load(cloud.config))
        rules.load(cloud.config)
        return rules

    def _start_firewall(self, cloud: Cloud) -> None:
        """The firewall part of the cloud's config goes to the firewall (firewall.py): the
        stored one now, each one a PoP sends from then on."""
        firewall = self.firewall

        def part() -> object:
            return (cloud.config or {}).get("firewall")

        if cloud.config is not None:
            firewall.start(part(), cloud.config_rev)
        cloud.watch_config(lambda: firewall.offer(part(), cloud.config_rev))

    def _make_recovery(self, cloud: Cloud, mesh: Mesh, altwan: AltWan) -> Recovery:
        assert self.paths is not None

        def reach(site_id: int) -> Reach:
            tunnel = self.tunnels.get(site_id)
            if tunnel is not None:  # a static peer: its own tunnel is the way off-cloud
                up = tunnel.state is State.UP
                return Reach(up, None if up else "its static tunnel is down")
            return Reach(*mesh.reach(site_id))

        def event(kind: str, text: str, data: dict, site_id: int | None) -> None:
            self._record_event(kind, text, data, site_id)

        store = self.store

        def remember(active: bool) -> None:
            if store is not None:
                store.put_doc(DOC_RECOVERY, {"active": active, "at": time.time()})

        was_active = False
        if store is not None:
            try:
                stored = store.get_doc(DOC_RECOVERY)
                at = stored.value.get("at") if stored is not None else None
                was_active = (
                    stored is not None and stored.value.get("active") is True
                    and isinstance(at, int | float)
                    and abs(time.time() - at) < STORED_MAX_AGE_S
                )
            except StoreError as e:
                log.warning("stored recovery state unreadable: %s", e)
        recovery = Recovery(
            paths=self.paths,
            cloud_up=lambda: cloud.state == "up",
            cloud_enabled=lambda: cloud.enabled,
            own_recovery=lambda: (cloud.config or {}).get("recovery"),
            directory=lambda: cloud.directory,
            links_ready=lambda: any(wl.local_ipv4() for wl in self.links if not wl.altwan),
            mesh_reach=reach,
            altwan_reach=lambda site_id: Reach(*altwan.reach(site_id)),
            on_event=event,
            clock=self.clock,
            hold_s=float(self.cfg.cloud.recovery_hold_s),
            was_active=was_active,
            remember=remember,
        )
        # Decided at once from the stored configuration: a box that starts in an outage
        # is on the mesh as soon as its tunnels come back (docs/recovery.md).
        recovery.tick()
        return recovery

    def _tunnel_event(self, site_id: int) -> Callable[[str, str], None]:
        def record(kind: str, text: str) -> None:
            if self.store is None:
                return
            try:
                self.store.add_event(kind.replace("-", "."), text, site_id=site_id)
            except (StoreError, ValueError) as e:
                log.warning("event not stored: %s", e)

        return record

    def _on_tun_routes(self, prefixes: list[str]) -> None:
        """Kernel routes into the TUN device for every routed prefix (paths.py), applied off
        the loop."""
        if self._net_plan is None:
            return  # _open applies the first plan itself
        self._net_plan.routes = prefixes
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
                log.error("kernel routes not installed: %s", e)

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
        return self.sessions.client_session(link_id, addr, expected_site_id)

    def forget_session(self, session: DtlsSession) -> None:
        self.sessions.forget_session(session)

    # ---------------------------------------------------------------- control packets

    def _on_ctrl_readable(self) -> None:
        assert self.fp is not None
        self.fp.ctrl_drain(self._on_ctrl_event, MAX_EVENTS_PER_WAKEUP, MAX_UNKNOWN_PER_WAKEUP)
        # A handshake begun or ended: its address is (no longer) a known source, at once.
        if self.known is not None and self.sessions.generation != self._known_gen:
            self._known_gen = self.sessions.generation
            self.known.refresh()
        self._wake.set()

    def _on_liveness_wake(self) -> None:
        assert self.fp is not None
        with contextlib.suppress(BlockingIOError):
            os.read(self.fp.liveness_wake_fd, 8)
        self._wake.set()

    def _watch_links(self, loop: asyncio.AbstractEventLoop) -> None:
        """A carrier lost, a device set down, an address gone: the kernel's netlink message
        wakes the ticker, so link health sees it now rather than at its next probe."""
        try:
            self._netlink = link_events()
        except OSError as e:
            log.warning("no netlink link events (links are polled at each tick): %s", e)
            return
        sock = self._netlink

        def readable() -> None:
            if drain(sock):
                self._wake.set()

        loop.add_reader(sock.fileno(), readable)

    def _on_ctrl_event(self, ev: CtrlEvent) -> None:
        self.sessions.on_ctrl_event(ev)

    def _on_stun(self, link_id: int, addr: Addr, data: bytes) -> bool:
        # Answers to the links' Binding requests; anything else (requests from strangers,
        # late retransmitted answers) is counted and dropped: a link socket reflects nothing.
        return self.links.on_stun(link_id, addr, data)

    # ---------------------------------------------------------------- periodic work

    def _tick(self) -> None:
        # First: a data-path thread that died is restarted before anything counts on it.
        if self.fpwatch is not None:
            try:
                self.fpwatch.tick()
            except Exception:
                log.exception("fast path watch failed")
        self.sessions.tick()
        if self.known is not None:
            self.known.refresh()  # cheap when nothing changed
        for tunnel in self.tunnels.values():
            try:
                tunnel.tick()
            except Exception:
                log.exception("tunnel %d tick failed", tunnel.peer_id)
        try:
            self.links.tick()
        except Exception:
            log.exception("links tick failed")
        # Before the cloud and the mesh: they steer by what link health decided this tick.
        if self.health is not None:
            try:
                self.health.tick()
            except Exception:
                log.exception("link health tick failed")
        if self.steering is not None:
            try:
                self.steering.tick()
            except Exception:
                log.exception("steering tick failed")
        if self.cloud is not None:
            try:
                self.cloud.tick()
            except Exception:
                log.exception("cloud tick failed")
        if self.mesh is not None:
            try:
                self.mesh.tick()
            except Exception:
                log.exception("mesh tick failed")
        if self.altwan is not None:
            try:
                self.altwan.tick()
            except Exception:
                log.exception("alt-wan tick failed")
        self._static_offcloud()
        if self.recovery is not None:
            try:
                self.recovery.tick()
            except Exception:
                log.exception("recovery tick failed")
        if self.fp is not None:
            self._liveness(self.fp)
        if self.paths is not None:
            self.paths.apply()  # retries a route the fast path refused; cheap when none
        try:
            self._time_and_certs()
        except Exception:
            log.exception("time and certificate check failed")
        now = self.clock()
        if now >= self._next_trim:
            self._next_trim = now + HEAP_TRIM_S
            heap.trim()

    def _choose_identity(self) -> Pair:
        """[pki] cert and key, or the renewed pair in the data dir if it was issued later."""
        cfg = self.cfg
        configured = Pair(cfg.pki.cert, cfg.pki.key, "configured")
        try:
            ca = tls.Certificate.from_pem(cfg.pki.ca.read_bytes())
        except (OSError, ValueError):
            return configured  # DtlsContext names the fault
        pair = choose_identity(configured, ca, cfg.site.id, cfg.paths.data_dir)
        if pair.source == "renewed":
            log.info("identity: the renewed certificate %s", pair.cert.resolve())
        return pair

    def _renewed(self, pair: Pair) -> None:
        """The renewed pair is the site's identity from now on: new handshakes (rekeys
        included) present it; sessions up now keep going until their next rekey."""
        ctx = self.dtls
        assert ctx is not None
        ctx.use_identity(pair.cert, pair.key)  # the revocation check and counters stay
        self.identity = pair
        self.certs = watch_identity(self.cfg.pki.ca, ctx.ca_cert, pair.cert, ctx.cert)

    def _make_renewal(self, cloud: Cloud | None) -> Renewal | None:
        if cloud is None or not cloud.enabled:
            return None
        assert self.dtls is not None
        renewal = Renewal(self.cfg.site.id, self.cfg.paths.data_dir, self.dtls.ca_cert,
                          cloud.send_to_any_pop, self._renewed, self._record_event,
                          clock=self.clock)
        cloud.handle("renewed", lambda _ps, msg: renewal.on_renewed_msg(msg))
        cloud.handle("renew-refused", lambda _ps, msg: renewal.on_refused_msg(msg))
        return renewal

    async def _renew(self, _req: dict) -> dict:
        if self.renewal is None:
            raise ValueError("no PoP is configured to renew the certificate through")
        error = self.renewal.request()
        if error is not None:
            raise ValueError(error)
        return {"state": self.renewal.state}

    def _clock_trusted(self) -> bool:
        """A DTLS session is up: both ends' certificates were valid at our clock, so it is
        near enough right to become the clock's floor, within the bounds appliance/clock.py
        sets (the build time, our certificate's notAfter)."""
        return (self.cloud is not None and self.cloud.state == "up") or any(
            t.state is State.UP for t in self.tunnels.values())

    def _own_not_after(self) -> int | None:
        return self.certs.certs[0].not_after if self.certs is not None else None

    def _ntp_synced(self) -> bool:
        return self.timesync is not None and self.timesync.clock_synced

    def _time_and_certs(self) -> None:
        if self.clock_floor is not None:
            self.clock_floor.tick(self._ntp_synced(), self._clock_trusted(),
                                  self._own_not_after())
        if self.certs is not None:
            for w in self.certs.check():
                log.warning("%s", w.text)
                self._record_event(w.kind, w.text, w.data)
            if self.renewal is not None:
                self.renewal.tick(self.certs.certs[0].not_after,
                                  self.cloud is not None and self.cloud.state == "up")

    def _static_offcloud(self) -> None:
        """A static peer is a direct tunnel to its site, so the mesh leaves that site alone:
        while the tunnel is up, that site's directory subnets are offered over it as `mesh`
        candidates too (the cloud ranks before them until it is lost: docs/recovery.md)."""
        if self.paths is None or self.cloud is None or not self.tunnels:
            return
        up = frozenset(sid for sid, t in self.tunnels.items() if t.state is State.UP)
        key = (self.cloud.directory, up)
        last = self._static_offcloud_key
        if last is not None and last[0] is key[0] and last[1] == up:
            return
        self._static_offcloud_key = key
        candidates = []
        for entry in self.cloud.directory:
            if entry.get("site_id") in up and entry.get("offcloud"):
                for net in entry.get("subnets", []):
                    with contextlib.suppress(ValueError):  # cloud.py counted a bad entry
                        candidates.append(Candidate(net, entry["site_id"], Transport.MESH))
        self.paths.submit(STATIC_OFFCLOUD, candidates)

    def _liveness(self, fp: FastPath) -> None:
        """Liveness under traffic (docs/mesh.md): the fast path answers one-way traffic with
        keepalives, and names the peers that have stopped answering ours."""
        try:
            silent = fp.liveness_scan(ACK_AFTER_S, self.cfg.mesh.silent_after_ms / 1000)
        except FastPathError as e:
            log.warning("liveness scan failed: %s", e)
            return
        if silent and self.mesh is not None:
            self.mesh.on_silent(silent)
        if silent and self.altwan is not None:
            self.altwan.on_silent(silent)

    def _next_due(self) -> float:
        """The earliest time (self.clock) a part's clock needs a tick; now when one runs a
        sub-second clock."""
        now = self.clock()
        due = min(now + IDLE_TICK_S, self._next_trim, self.sessions.next_due(),
                  self.links.next_due())
        for tunnel in self.tunnels.values():
            due = min(due, tunnel.next_due())
        if self.cloud is not None:
            due = min(due, self.cloud.next_due())
        if self.mesh is not None:
            due = min(due, self.mesh.next_due())
        if self.altwan is not None:
            due = min(due, self.altwan.next_due())
        if self.recovery is not None:
            due = min(due, self.recovery.next_due())
        if self.health is not None and self.steering is not None:
            due = min(due, self.health.next_due(), self.steering.next_due())
        if self.paths is not None and self.paths.dirty:
            due = now
        if self.fp is not None and self.fp.liveness_busy():
            due = now
        return due

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            started = loop.time()
            self._wake.clear()  # what arrives during the tick wakes the next one
            self._tick()
            self.ticks += 1
            self._ticked.set()
            try:
                delay = self._next_due() - self.clock()
            except Exception:
                log.exception("next tick time unknown")
                delay = TICK_S
            if delay > TICK_S:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(delay, IDLE_TICK_S))
            # Never more often than every TICK_S: a flood of control packets is handled in
            # batches (MAX_EVENTS_PER_WAKEUP) between ticks, not a tick per packet.
            await asyncio.sleep(max(0.0, started + TICK_S - loop.time()))

    # ---------------------------------------------------------------- control socket

    async def _status(self, _req: dict) -> dict:
        assert self.fp is not None
        links = []
        health = self.health.status() if self.health is not None else {}
        for link in self.cfg.links:
            c = self.fp.link_counters(self.link_ids[link.name])
            links.append(
                {
                    "name": link.name,
                    "interface": link.device,
                    "port": link.port,
                    "precedence": link.precedence,
                    "altwan": link.altwan,
                    "mtu": link.mtu,
                    "rx_packets": c.rx_packets,
                    "tx_packets": c.tx_packets,
                    "rx_bytes": c.rx_bytes,
                    "tx_bytes": c.tx_bytes,
                    "drops": c.drops,
                    # Link health (docs/links.md): state, why, loss/jitter/latency.
                    "health": health.get(link.name),
                    "bandwidth_mbps": link.bandwidth_mbps,
                }
            )
        g = self.fp.global_counters()
        spin = self.fp.spin_stats()
        st = self.sessions.stats
        return {
            "site_id": self.cfg.site.id,
            "name": self.cfg.site.name,
            "version": __version__,
            "uptime_s": round(self.clock() - self.started, 1),
            # How often the supervisor woke: about once a second at rest, every TICK_S while
            # a handshake, a punch or traffic's liveness runs a clock.
            "ticks": self.ticks,
            "tunnel_interface": self.cfg.tunnel.interface,
            "peers_up": sum(1 for t in self.tunnels.values() if t.state == "up"),
            "peers_total": len(self.tunnels),
            "links": links,
            "drops": g.drops,
            # The control queue's lanes: known sources apart, unknown ones rate-limited.
            "control_lanes": self.fp.ctrl_stats().to_json(),
            # The TUN thread's waits for answers (docs/dataplane.md, "Latency").
            "answer_waits": {
                "waits": spin.spins,
                "answered": spin.hits,
                "cpu_ms": round(spin.spin_ns / 1e6, 1),
            },
            "control": {
                "dtls_no_session": st.dtls_no_session,
                # Refused by admission or evicted when full counts as rejected here.
                "dtls_rejected": st.rejected + st.refused_admission + st.evicted,
                "kicks_bad": st.kicks_bad,
                "unknown": st.unknown + st.oversized,
                "stun_unmatched": st.stun_unmatched,
                "probe_acks_unmatched": st.probe_acks_unmatched,
                "revoked_refused": st.revoked,
            },
            "rejections": list(st.rejections),
            "revoked": self.revoked.status(),
            "cloud": self.cloud.summary() if self.cloud is not None else {"state": "off"},
            "mesh": self.mesh.summary() if self.mesh is not None else {"enabled": False},
            "altwan": self.altwan.summary() if self.altwan is not None else {"enabled": False},
            # Which links cloud and off-cloud traffic use, with their weights, and why.
            "steering": self.steering.status() if self.steering is not None else None,
            "recovery": (
                self.recovery.summary() if self.recovery is not None else {"enabled": False}
            ),
            "firewall": self.firewall.summary(),
            "lan": self.lan.summary() if self.lan is not None else None,
            "sources": self.sources.summary() if self.sources is not None else None,
            # The data-path threads: running or dead and why, restarts (docs/watchdog.md).
            "fastpath": self.fpwatch.status() if self.fpwatch is not None else None,
            "appliance": self._appliance_status(),
            "certificates": None if self.certs is None or self.identity is None else {
                **self.certs.status(), "source": self.identity.source,
                "renewal": self.renewal.status() if self.renewal is not None else None},
            "clock": None if self.clock_floor is None or self.timesync is None else {
                **self.clock_floor.status(), "sync": self.timesync.status()},
            # A/B slots, the commit of a new one, an install under way (docs/update.md).
            "slots": self.updater.summary() if self.updater is not None else {
                "enabled": False},
        }

    async def _peers(self, _req: dict) -> dict:
        # Each owner of sessions lists its peers, in the order they were registered; a site
        # one of them lists is left out by the next, except for its Alt-WAN tunnel, which
        # stands beside whatever carries the site (its mesh tunnel or the cloud).
        peers: list[dict] = []
        for owner in self.sessions.owners:
            peers.extend(owner.peers({p["site_id"] for p in peers
                                      if p.get("transport") != "alt-wan"}))
        return {"peers": peers}

    async def _pop(self, _req: dict) -> dict:
        if self.cloud is None:
            return {"state": "off", "sessions": []}
        return self.cloud.pop_status()

    async def _mesh(self, _req: dict) -> dict:
        if self.mesh is None:
            return {"enabled": False, "paths": []}
        return {**self.mesh.summary(), "paths": self.mesh.peers_status()}

    async def _recovery(self, _req: dict) -> dict:
        if self.recovery is None:
            return {"enabled": False, "active": False, "sites": []}
        return {**self.recovery.summary(), "sites": self.recovery.sites()}

    async def _firewall(self, _req: dict) -> dict:
        return await self.firewall.status()

    async def _routes(self, _req: dict) -> dict:
        assert self.paths is not None
        return self.paths.status()

    async def _rules(self, _req: dict) -> dict:
        assert self.rules is not None
        return self.rules.status()

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

    def _waking(self, handler: Handler) -> Handler:
        """A command may change what the ticker has to do (a link set, a lease): the next
        tick comes at once."""

        async def run(req: dict) -> dict:
            try:
                return await handler(req)
            finally:
                self._wake.set()

        return run

    def _wan_handlers(self) -> dict:
        """`links`, `set-link` and `dhcp-lease` (wanaddr.py owns them)."""
        self.wan = WanAddressing(
            self.cfg.links,
            self.store,
            self.cfg.paths.control_socket,
            self._record_event,
            owned=self.cfg.owned(),
        )
        handlers = self.wan.handlers()
        addressing = handlers["links"]

        async def links(req: dict) -> dict:
            # Addressing from wanaddr.py, health and the links in use from here.
            result = await addressing(req)
            health = self.health.status() if self.health is not None else {}
            for entry in result.get("links", []):
                entry["health"] = health.get(entry.get("name"))
            result["steering"] = self.steering.status() if self.steering is not None else None
            return result

        return {**handlers, "links": links}

    def _lan_port(self) -> LanPort:
        if self.lan is None:
            sock = self.cfg.paths.control_socket
            self.lan = LanPort(
                self.cfg.lan, self.cfg.paths.data_dir, sock.parent, self._record_event,
                tag=sock.stem,
            )
        return self.lan

    def _lan_handlers(self) -> dict:
        """`lan` (lanport.py owns it)."""
        return self._lan_port().handlers()

    async def _lan_address_first(self) -> None:
        """`[lan] address` on the port before socketd's own start: a box whose socketd cannot
        start (a WAN device missing, no TUN) is still reachable from the LAN at its address.
        The DHCP server waits for lan.start(); a failure here is only said, never fatal."""
        try:
            port = self._lan_port()
            if port.lan.address is None:
                return
            await asyncio.to_thread(port.apply_address)
        except Exception as e:  # noqa: BLE001 - the start goes on whatever this does
            log.error("LAN address not applied before the start: %s", e)

    def _start_wan(self) -> None:
        # Stored settings are applied in the background once the control socket is up, so
        # the console can look at (and fix) a link whose setting fails.
        assert self.wan is not None
        self.wan.start()

    def _record_event(
        self, kind: str, text: str, data: dict, site_id: int | None = None
    ) -> None:
        if self.store is None:
            return
        try:
            self.store.add_event(kind, text, site_id=site_id, data=data)
        except (StoreError, ValueError) as e:
            log.warning("event not stored: %s", e)

    # ---------------------------------------------------------------- A/B updates

    def _update_handlers(self) -> dict:
        """`slots`, `update`, `update-status` and `reboot` (appliance/updater.py owns them),
        where RAUC's system.conf is; elsewhere they say why there are no updates."""
        conf = self.cfg.update.system_conf
        if conf is not None:
            sock = self.cfg.paths.control_socket
            try:
                self.updater = Updater(
                    self.cfg.update, self.cfg.paths.data_dir,
                    update_runtime_dir(sock.parent / f"{sock.stem}-update"),
                    self._record_event, self._update_health)
            except ValueError as e:
                log.error("updates unavailable: %s", e)
            else:
                return self.updater.handlers()
        why = ("no A/B updates on this box: RAUC's system.conf is absent"
               if conf is None else f"updates unavailable with {conf} (see the log)")

        async def slots(_req: dict) -> dict:
            return {"enabled": False, "error": why}

        async def refuse(_req: dict) -> dict:
            raise ValueError(why)

        return {"slots": slots, "update": refuse, "update-status": refuse, "reboot": refuse}

    def _update_health(self) -> UpdateHealth:
        """What a slot booted for the first time must show before it is marked good: the
        loop ticking, the fast path forwarding (every thread running), the control socket
        listening; the cloud reached, or the updater's grace time."""
        fastpath: str | None = None
        if not self._ticked.is_set():
            fastpath = "the supervisor has not ticked yet"
        elif self.fp is None or self.fpwatch is None:
            fastpath = "not started"
        elif self.fpwatch.failed is not None:
            fastpath = f"failed: {self.fpwatch.failed}"
        else:
            down = [t for t in self.fp.threads() if t.state is not ThreadState.RUNNING]
            if down:
                fastpath = f"{len(down)} thread(s) not running"
        control = None if self.control is not None and self.control.serving else "not listening"
        cloud = self.cloud
        configured = cloud is not None and cloud.enabled
        return UpdateHealth(fastpath=fastpath, control=control,
                            cloud_up=configured and cloud is not None and cloud.state == "up",
                            cloud_configured=configured)

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
                # A run whose fast path works for a while: runs that ended with it failed
                # are counted from nought again.
                if (self.fpwatch is not None and self.fpwatch.failed is None
                        and self.clock() - self.started >= FASTPATH_HEALTHY_S):
                    self.guard.fastpath_healthy()
                await asyncio.sleep(LED_PERIOD_S)
        finally:
            pets.cancel()

    def _link_states(self) -> dict[str, bool]:
        """Link name -> it carries traffic: link health's verdict (a silent link is down too),
        the device's state for a link health does not watch (Alt-WAN)."""
        states = self.links.states()
        if self.health is not None:
            for h in self.health.by_link.values():
                states[h.link.name] = h.state is not LinkHealthState.DOWN
        return states

    def _show_leds(self, leds: LedController) -> None:
        links = self._link_states()
        cloud = self.cloud.state if self.cloud is not None else "off"
        self._cloud_was_up |= cloud == "up"
        # Until the cloud is first reached (or the grace runs out) the box is booting, however
        # its sessions and links come and go meanwhile: no link_fault/cloud_down flicker.
        first_connect = cloud != "off" and not self._cloud_was_up
        state = BoxState(
            cloud=cloud,
            links_down=tuple(name for name, up in links.items() if not up),
            error=(self.guard is not None and self.guard.in_error())
            or (self.fpwatch is not None and self.fpwatch.fault),
            booting=first_connect and self.clock() - self.started < BOOT_GRACE_S,
            recovery=self.recovery is not None and self.recovery.active,
        )
        leds.show(choose_pattern(state), links)

    def _fastpath_failed(self, why: str) -> str:
        """The fast path is beyond a restart. Rather than stay up forwarding nothing, the box
        resets (its watchdog is no longer petted) or, with no armed watchdog, socketd exits
        for init to start it again with a new fast path. Not when the runs before failed the
        same way (Guard.fastpath_failed): then socketd stays up, to be reached. Returns what
        follows, for the event."""
        guard = self.guard
        if guard is not None and not guard.fastpath_failed(why):
            return (
                f"it failed in the {guard.fastpath_failed_before} runs before this one too:"
                " the fast path keeps failing, so the box is not reset again and stays up"
                " (petting the watchdog) so that it can be reached"
            )
        if guard is not None and guard.hold(f"the fast path failed: {why}"):
            return "no longer petting the watchdog, so the box resets"
        self._fatal = f"fast path failed: {why}"
        self._stop.set()
        return "no watchdog to reset the box: socketd exits so that init starts it again"

    async def _fault(self, req: dict) -> dict:
        """Fault injection for the tests (FAULT_INJECTION_ENV): a fast-path thread dies as if
        its poll had failed. `thread` is "tun" or a link's name, `errno` the error."""
        assert self.fp is not None
        thread = req.get("thread")
        err = req.get("errno", errno.EIO)
        if not isinstance(err, int) or isinstance(err, bool):
            raise ValueError("errno must be an integer")
        if thread == "tun":
            self.fp.test_thread_fail(ThreadKind.TUN, 0, err)
        elif isinstance(thread, str) and thread in self.link_ids:
            self.fp.test_thread_fail(ThreadKind.LINK, self.link_ids[thread], err)
        else:
            raise ValueError(f"thread must be 'tun' or a link's name, not {thread!r}")
        log.warning("fault injected: the fast path's %s thread dies with errno %d", thread, err)
        return {"thread": thread, "errno": err}

    def _appliance_status(self) -> dict:
        guard = self.guard.status() if self.guard is not None else {}
        return {**guard, "leds": self.leds.status() if self.leds is not None else None}

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._start_appliance()
        # Kept when the start fails: the address stays on, for the LAN to reach the box.
        await self._lan_address_first()
        try:
            self._open()
        except StartupError as e:
            assert self.guard is not None
            self.guard.end(f"start failed: {e}")
            raise
        assert self.fp is not None
        loop.add_reader(self.fp.ctrl_fd, self._on_ctrl_readable)
        loop.add_reader(self.fp.liveness_wake_fd, self._on_liveness_wake)
        self._watch_links(loop)
        handlers = {
            "status": self._status,
            "peers": self._peers,
            "pop": self._pop,
            "routes": self._routes,
            "rules": self._rules,
            "mesh": self._mesh,
            "recovery": self._recovery,
            "firewall": self._firewall,
            "events": self._events,
            "renew": self._renew,
            **self._wan_handlers(),
            **self._lan_handlers(),
            **self._update_handlers(),
        }
        if os.environ.get(FAULT_INJECTION_ENV) == "1":
            log.warning("fault injection is on (%s=1): not for a box in service",
                        FAULT_INJECTION_ENV)
            handlers["fault"] = self._fault
        self.control = ControlServer(
            self.cfg.paths.control_socket,
            {name: self._waking(h) for name, h in handlers.items()},
        )
        await self.control.start()
        self._start_wan()
        # Like the WAN links: in the background, with the console already able to look.
        assert self.lan is not None
        self.lan.start()
        assert self.timesync is not None
        self.timesync.start()
        if self.updater is not None:
            self.updater.start()
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
                self.guard.end(self._fatal or "stopped")
            if self.clock_floor is not None and (self._ntp_synced() or self._clock_trusted()):
                self.clock_floor.store(self._ntp_synced(), self._own_not_after())
            log.info("socketd stopping")
            await self.control.close()
            if self.wan is not None:
                await self.wan.close()
            if self.lan is not None:
                await self.lan.close()
            if self.timesync is not None:
                await self.timesync.close()
            if self.updater is not None:
                await self.updater.close()
            # The ruleset stays in the kernel: a stopped socketd leaves the LAN neither open
            # nor closed (docs/firewall.md); the next start replaces it.
            await self.firewall.close()
            loop.remove_reader(self.fp.ctrl_fd)
            loop.remove_reader(self.fp.liveness_wake_fd)
            if self._netlink is not None:
                loop.remove_reader(self._netlink.fileno())
                self._netlink.close()
                self._netlink = None
            self.close()
        if self._fatal is not None:
            raise ServiceFailed(self._fatal)

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
        if self.mesh is not None:
            self.sessions.remove_owner(self.mesh)
            with contextlib.suppress(Exception):
                self.mesh.close()
            self.mesh = None
        if self.altwan is not None:
            self.sessions.remove_owner(self.altwan)
            with contextlib.suppress(Exception):
                self.altwan.close()
            self.altwan = None
        if self.cloud is not None:
            self.sessions.remove_owner(self.cloud)
            with contextlib.suppress(Exception):
                self.cloud.close()
            self.cloud = None
        self.known = None
        if self.fp is not None:
            self.fp.close()
            self.fp = None
        if self.store is not None:
            self.links.store = None
            self.store.close()
            self.store = None

