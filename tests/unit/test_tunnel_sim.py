"""The tunnel state machine under attack, in simulated time.

Several real Supervisors, with real DTLS contexts and real fast paths (driven
synchronously, no threads or devices), exchange their control datagrams over a
small simulated network and share a virtual clock, so minutes of rekeys,
retries and forged packets run in a second. The lab tests cover the same code
over real sockets and NATs; these cover the timing corners no lab test can
afford to wait for.
"""

from __future__ import annotations

import logging
import struct
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from sdwan.bindings.fastpath import CtrlEvent, FastPath, FastPathConfig
from sdwan.common.dtls import DtlsContext
from sdwan.pop import pki
from sdwan.site.config import Mesh as MeshConfig
from sdwan.site.supervisor import Supervisor
from sdwan.site.tunnel import PeerTunnel, State, Timers, encode_kick

Addr = tuple[str, int]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Net:
    """Delivers datagrams between simulated sites, in order, after each step."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sites: dict[Addr, SimSite] = {}
        self.queue: list[tuple[Addr, Addr, bytes]] = []
        self.log: list[tuple[float, Addr, Addr, bytes]] = []
        self.tap: Callable[[Addr, Addr, bytes], None] | None = None

    def deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        self.log.append((self.clock.t, src, dst, data))
        self.queue.append((src, dst, data))
        if self.tap is not None:
            self.tap(src, dst, data)

    def pump(self) -> None:
        while self.queue:
            src, dst, data = self.queue.pop(0)
            site = self.sites.get(dst)
            if site is not None:
                site._on_ctrl_event(CtrlEvent(CtrlEvent.PACKET, 1, 0, src, data))
                site.woken = True

    def client_hellos(self, src: Addr, dst: Addr, since: float) -> int:
        return sum(
            1
            for t, s, d, data in self.log
            if s == src and d == dst and t >= since and _is_client_hello(data)
        )

    def run(self, seconds: float, each: Callable[[], None] | None = None) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end:
            self.clock.t += 0.05
            for site in list(self.sites.values()):
                site.maybe_tick()
                self.pump()
            if each is not None:
                each()
            self.pump()


def _is_client_hello(data: bytes) -> bool:
    return len(data) > 13 and data[0] == 22 and data[13] == 1


class SimSite(Supervisor):
    """A Supervisor whose datagrams travel over the simulated network."""

    def __init__(
        self,
        net: Net,
        certs: Callable[[int], tuple[Path, Path, Path]],
        site_id: int,
        addr: Addr,
        peers: dict[int, Addr],
        timers: Timers,
    ) -> None:
        cfg = types.SimpleNamespace(
            site=types.SimpleNamespace(id=site_id), peers=[], links=[], mesh=MeshConfig()
        )
        super().__init__(cfg, clock=net.clock)  # type: ignore[arg-type]
        self.net, self.addr = net, addr
        self.dtls = DtlsContext(*certs(site_id), site_id, clock=net.clock)
        self.fp = FastPath(FastPathConfig.default())
        for peer_id, peer_addr in peers.items():
            self.fp.peer_add(peer_id)
            self.fp.set_endpoint(peer_id, 1, peer_addr)
            self.tunnels[peer_id] = PeerTunnel(
                my_site_id=site_id,
                peer_site_id=peer_id,
                link_id=1,
                link_name="wan1",
                endpoint=peer_addr,
                fp=self.fp,
                port=self,
                timers=timers,
                clock=net.clock,
            )
        net.sites[addr] = self
        self.woken = True

    def maybe_tick(self) -> None:
        """As socketd's ticker does: a tick when a packet arrived since the last one or a
        part's clock is due (Supervisor._next_due), never on a fixed beat. With no 1 s cap
        here, a part that forgets to report a clock shows up as something that never
        happens."""
        if self.woken or self._next_due() <= self.clock():
            self.woken = False
            self._tick()

    def send(self, link_id: int, addr: Addr, data: bytes) -> None:
        self.net.deliver(self.addr, addr, data)


A_ADDR, B_ADDR, C_ADDR = ("198.51.100.3", 4800), ("198.51.100.2", 4800), ("198.51.100.1", 4800)
EVIL = ("203.0.113.66", 5555)
# Silence is never "dead" here: the fast path's receive times are real time.
TIMERS = Timers(rekey_s=60, dead_after_s=1e9)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], tuple[Path, Path, Path]]:
    root = tmp_path_factory.mktemp("pki")
    pki.create_ca(root / "ca", "acme")

    def site(n: int) -> tuple[Path, Path, Path]:
        cert = root / "sites" / f"site-{n}.pem"
        if not cert.exists():
            pki.issue_site(root / "ca", n, root / "sites")
        return root / "ca" / "ca.pem", cert, root / "sites" / f"site-{n}.key"

    return site


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def pair(certs: Callable[[int], tuple[Path, Path, Path]]) -> tuple[Net, SimSite, SimSite]:
    net = Net(Clock())
    a = SimSite(net, certs, 2, A_ADDR, {1: B_ADDR}, TIMERS)  # initiator: the higher id
    b = SimSite(net, certs, 1, B_ADDR, {2: A_ADDR}, TIMERS)
    net.run(5)
    assert a.tunnels[1].state is State.UP and b.tunnels[2].state is State.UP
    return net, a, b


def test_periodic_rekeys_keep_both_sides_up(certs) -> None:
    net, a, b = pair(certs)
    net.run(3 * TIMERS.rekey_s + 5)
    assert a.tunnels[1].handshakes == 4
    assert a.tunnels[1].state is State.UP and b.tunnels[2].state is State.UP
    assert a.fp.key_info(1).has_tx and b.fp.key_info(2).has_tx


def test_forged_kicks_never_hold_up_the_rekey(certs) -> None:
    """An attacker kicks from its own address once a second, claiming to be the peer."""
    net, a, b = pair(certs)
    t0 = net.clock.t
    nxt = [t0]

    def attacker() -> None:
        if net.clock.t >= nxt[0]:
            nxt[0] = net.clock.t + 1.0
            net.deliver(EVIL, A_ADDR, encode_kick(1, 2))

    net.run(3 * TIMERS.rekey_s + 5, each=attacker)
    tunnel = a.tunnels[1]
    assert tunnel.handshakes >= 4, tunnel.reason
    assert net.client_hellos(A_ADDR, B_ADDR, t0) >= 3
    assert tunnel.endpoint == B_ADDR and tunnel.state is State.UP


def test_a_failing_rekey_backs_off(certs) -> None:
    """A forged alert answers every ClientHello: the rekey fails, and is retried
    with backoff instead of on every tick."""
    net, a, b = pair(certs)
    seq = [1 << 30]

    def forge_alert(src: Addr, dst: Addr, data: bytes) -> None:
        if src == A_ADDR and _is_client_hello(data):
            seq[0] += 1
            alert = bytes([21, 0xFE, 0xFD, 0, 0]) + seq[0].to_bytes(6, "big")
            net.queue.append((B_ADDR, A_ADDR, alert + struct.pack("!H", 2) + bytes([2, 40])))

    net.tap = forge_alert
    net.run(TIMERS.rekey_s)
    t1 = net.clock.t
    net.run(20)
    assert net.client_hellos(A_ADDR, B_ADDR, t1) <= 6
    tunnel = a.tunnels[1]
    assert tunnel.state is State.UP and (tunnel.reason or "").startswith("rekey failed")


def test_a_displaced_handshake_is_retried_not_orphaned(certs) -> None:
    """A kick spoofed from site 1's address, claiming to be site 2, makes site 3
    open a second handshake toward that address; the one it displaces must
    still fail and be retried, so site 1 comes up when it returns."""
    net = Net(Clock())
    a = SimSite(net, certs, 3, A_ADDR, {2: B_ADDR, 1: C_ADDR}, TIMERS)
    SimSite(net, certs, 2, B_ADDR, {3: A_ADDR}, TIMERS)
    net.run(5)  # site 1 is not there yet
    assert a.tunnels[2].state is State.UP and a.tunnels[1].state is not State.UP
    net.deliver(C_ADDR, A_ADDR, encode_kick(2, 3))
    net.pump()
    c = SimSite(net, certs, 1, C_ADDR, {3: A_ADDR}, TIMERS)
    net.run(30)
    assert a.tunnels[1].state is State.UP, a.tunnels[1].reason
    assert c.tunnels[3].state is State.UP


@pytest.mark.parametrize("kick_first", [True, False], ids=["kick-first", "handshake-first"])
def test_a_kick_crossing_the_first_handshake_does_not_supersede_it(certs, kick_first) -> None:
    """Both ends found a new path at once (a punch): the responder's kick reaches the initiator
    just before or just after it starts its own handshake to the same address. One handshake
    goes there, not two that supersede each other and take the tunnel down."""
    net = Net(Clock())
    a = SimSite(net, certs, 2, A_ADDR, {1: B_ADDR}, TIMERS)
    b = SimSite(net, certs, 1, B_ADDR, {2: A_ADDR}, TIMERS)
    events: list[str] = []
    a.tunnels[1].on_event = lambda kind, text: events.append(kind)
    if kick_first:
        net.deliver(B_ADDR, A_ADDR, encode_kick(1, 2))
        net.pump()
    else:
        a._tick()
        net.deliver(B_ADDR, A_ADDR, encode_kick(1, 2))
        net.queue.reverse()  # the kick arrives before the hello gets anywhere
        net.pump()
    net.run(3)
    assert a.tunnels[1].state is State.UP and b.tunnels[2].state is State.UP
    assert "tunnel-down" not in events, a.tunnels[1].reason
    assert a.tunnels[1].handshakes == 1


def test_sessions_are_freed_after_the_hand_over_and_rekeys_still_work(certs) -> None:
    """A tunnel's session carries only the key hand-over: once both keys are acknowledged and
    the peer's resends are over, both ends free its TLS state and drop it from the session
    table; the fast path keeps the keys, and the next rekey is a new session."""
    net, a, b = pair(certs)
    linger = TIMERS.key_resend_s * TIMERS.key_resend_max + 2.0
    first_a, first_b = a.tunnels[1].session, b.tunnels[2].session
    assert not first_a.released and not first_b.released
    net.run(linger + 3)
    assert first_a.released and first_b.released
    assert len(a.sessions) == 0 and len(b.sessions) == 0
    assert a.fp.key_info(1).has_tx and b.fp.key_info(2).has_tx
    assert a.tunnels[1].state is State.UP and b.tunnels[2].state is State.UP
    net.run(2 * TIMERS.rekey_s)
    assert a.tunnels[1].handshakes == 3 and b.tunnels[2].handshakes == 3
    assert a.tunnels[1].session is not first_a and not a.tunnels[1].handshaking
    assert a.tunnels[1].state is State.UP and b.tunnels[2].state is State.UP


def test_a_lost_key_ack_is_answered_before_the_session_is_freed(certs) -> None:
    """The responder's key-ack is lost for a while: the initiator resends its key over the
    session, which must still be there to acknowledge it (freed only after the resends)."""
    net = Net(Clock())
    a = SimSite(net, certs, 2, A_ADDR, {1: B_ADDR}, TIMERS)
    b = SimSite(net, certs, 1, B_ADDR, {2: A_ADDR}, TIMERS)
    lost = {"n": 0}
    held = {"until": net.clock.t + 8.0}

    def drop_b_records(src: Addr, dst: Addr, data: bytes) -> None:
        # After the handshake, b's application records (its key and key-acks) are lost
        # for 8 s: a keeps resending its key.
        if src == B_ADDR and data[:1] == b"\x17" and net.clock.t < held["until"]:
            net.queue.remove((src, dst, data))
            lost["n"] += 1

    net.tap = drop_b_records
    net.run(5)
    assert lost["n"] > 0 and a.tunnels[1].state is not State.UP
    net.run(10)
    assert a.tunnels[1].state is State.UP and b.tunnels[2].state is State.UP
    assert a.tunnels[1].reason is None, a.tunnels[1].reason
    assert a.tunnels[1].handshakes == 1  # no "never acknowledged" and a new handshake


@pytest.mark.parametrize(
    ("initiator_rekey", "responder_rekey"), [(120, 60), (60, 120)], ids=["responder-shorter",
                                                                         "initiator-shorter"]
)
def test_two_ends_with_different_rekey_intervals_rekey_on_the_shorter(
    certs, initiator_rekey: int, responder_rekey: int
) -> None:
    """Each end announces its interval and key-age limit in its `key`; both use the smaller,
    so the initiator rekeys on the responder's shorter interval too, and both show it."""
    net = Net(Clock())
    a = SimSite(net, certs, 2, A_ADDR, {1: B_ADDR}, Timers(rekey_s=initiator_rekey,
                                                          dead_after_s=1e9))
    b = SimSite(net, certs, 1, B_ADDR, {2: A_ADDR}, Timers(rekey_s=responder_rekey,
                                                          dead_after_s=1e9))
    net.run(5)
    ta, tb = a.tunnels[1], b.tunnels[2]
    assert ta.state is State.UP and tb.state is State.UP
    for mine, theirs, t in ((initiator_rekey, responder_rekey, ta),
                            (responder_rekey, initiator_rekey, tb)):
        st = t.status()["timers"]
        assert st["rekey_s"] == 60 and st["key_max_age_s"] == 2 * 60 + 60, st
        assert st["own"]["rekey_s"] == mine and st["peer"]["rekey_s"] == theirs, st
        assert st["peer"]["announced"] is True and st["refused"] == 0
    net.run(3 * 60 + 2)
    assert ta.handshakes == 4 and tb.handshakes == 4
    assert ta.state is State.UP and tb.state is State.UP


def _rewrite_keys(site: SimSite, peer: int, rewrite: Callable[[dict], dict]) -> None:
    """What `site` sends in its `key` messages to `peer`, rewritten (another firmware)."""
    keys = site.tunnels[peer]._keys
    send = keys._send_msg
    keys._send_msg = lambda msg: send(rewrite(msg) if msg.get("t") == "key" else msg)


def test_a_peer_that_announces_no_timers_is_taken_for_the_old_fixed_ones(certs) -> None:
    """An end from before the agreement sends bare `key`s: it is taken to rekey at 600 s and
    refuse keys at 900 s, so an initiator with a 1200 s interval rekeys at 600 s, and the
    status says the peer announced none."""
    net = Net(Clock())
    a = SimSite(net, certs, 2, A_ADDR, {1: B_ADDR}, Timers(rekey_s=1200, dead_after_s=1e9))
    b = SimSite(net, certs, 1, B_ADDR, {2: A_ADDR}, Timers(rekey_s=1200, dead_after_s=1e9))
    _rewrite_keys(b, 2, lambda m: {"t": "key", "idx": m["idx"]})
    net.run(5)
    ta = a.tunnels[1]
    assert ta.state is State.UP
    st = ta.status()["timers"]
    assert (st["rekey_s"], st["key_max_age_s"]) == (600, 900), st
    assert st["peer"] == {"rekey_s": 600, "key_max_age_s": 900, "announced": False}, st
    net.run(2 * 600 + 2)
    assert ta.handshakes == 3 and ta.state is State.UP


def test_malformed_timers_keep_the_key_and_the_timers_in_force(certs) -> None:
    """A `key` whose timers are not numbers is counted and logged, but its key is used and
    acknowledged on the timers in force: no hand-over failure, no handshake loop."""
    net = Net(Clock())
    a = SimSite(net, certs, 2, A_ADDR, {1: B_ADDR}, Timers(rekey_s=300, dead_after_s=1e9))
    b = SimSite(net, certs, 1, B_ADDR, {2: A_ADDR}, Timers(rekey_s=300, dead_after_s=1e9))
    net.run(5)
    ta, tb = a.tunnels[1], b.tunnels[2]
    assert ta.status()["timers"]["rekey_s"] == 300
    _rewrite_keys(b, 2, lambda m: {**m, "rekey_s": "soon"})
    net.run(300 + 30)  # one rekey: its `key` carries the malformed timers
    assert ta.state is State.UP and tb.state is State.UP
    assert ta.handshakes == 2, ta.handshakes  # not one per hand-over timeout
    st = ta.status()["timers"]
    assert st["refused"] >= 1 and st["rekey_s"] == 300, st  # the agreement in force stays
    assert st["peer"]["announced"] is True, st
    assert ta.reason is None and tb.reason is None


def test_a_refusal_shown_while_up_is_cleared_by_the_next_accepted_key(certs) -> None:
    net, a, b = pair(certs)
    ta = a.tunnels[1]
    ta.reason = "peer's key refused: idx: expected an integer"
    net.run(60 + 5)  # the next rekey's `key` is accepted
    assert ta.state is State.UP and ta.reason is None
