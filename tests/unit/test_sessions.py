"""The session layer (sdwan.common.sessions) that socketd and popd share.

Two kinds of set-up, both with real DTLS:

* whole daemons: a socketd Supervisor (as test_cloud_sim drives it) and popd's real `Pop`
  with their fast paths on 127.0.0.1, pumped by hand under a virtual clock, so the site's
  layer and the PoP's handshake, register and rekey through real UDP;
* one layer on its own, fed ClientHellos from real DTLS clients at simulated addresses, for
  admission, superseded handshakes, deadlines and routing between owners, where one host
  must appear to be many.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cloud_sim import (
    STEP,
    Net,
    Node,
    SimSocket,
    pop_files,
    site_config,
    site_files,
    udp,
)

from sdwan.bindings.fastpath import CtrlEvent, FastPath, FastPathConfig
from sdwan.common.dtls import (
    CONTENT_CHANGE_CIPHER_SPEC,
    DtlsContext,
    DtlsSession,
    is_client_hello,
    split_records,
)
from sdwan.common.sessions import (
    STALE_CHECK_S,
    SUPERSEDED,
    TIMED_OUT,
    Policy,
    SessionLayer,
    SessionOwner,
    decode_kick,
    encode_kick,
)
from sdwan.common.store import Store
from sdwan.pop.account import load_account
from sdwan.pop.config import load_pop_config
from sdwan.pop.eventsink import EventSink
from sdwan.pop.popd import POP_POLICY, Pop
from sdwan.site.cloud import pop_peer_id
from sdwan.site.config import Cloud as CloudCfg
from sdwan.site.supervisor import SITE_POLICY
from sdwan.site.tunnel import PeerTunnel, State, Timers

Addr = tuple[str, int]

ACCOUNT = """
[account]
name = "acme"
{sites}
[[rules]]
name = "all"
transport = "cloud"
"""


# --------------------------------------------------------------------------- whole daemons


class PopNode(Node):
    """popd's own Pop, its fast path on 127.0.0.1 pumped by the net instead of its threads."""

    def __init__(self, net: Net, ca: Path, root: Path, sites: tuple[int, ...]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "account.toml").write_text(
            ACCOUNT.format(
                sites="".join(
                    f'[[sites]]\nid = {n}\nname = "site-{n}"\nsubnets = ["10.{n}.0.0/24"]\n'
                    for n in sites
                )
            )
        )
        ca_pem, cert, key = pop_files(ca, 1)
        (root / "pop.toml").write_text(f"""
[pop]
id = 1
listen = "127.0.0.1"
port = 4800
stun_port = 3478
account = "account.toml"

[paths]
data_dir = "data"
control_socket = "popd.sock"

[pki]
ca = "{ca_pem}"
cert = "{cert}"
key = "{key}"

[cloud]
keepalive_ms = 20
dead_after_ms = 60000
""")
        cfg = load_pop_config(root / "pop.toml")
        self.pop = pop = Pop(cfg, clock=net.clock)
        pop.store = Store(root / "popd.db")
        # The event writer's thread, as open() starts it (no loop: its acks are not awaited).
        pop.sink = EventSink(pop.store.path, cfg.events)
        pop.sink.start()
        pop.account = load_account(cfg.account)
        pop.dtls = pop.sessions.dtls = DtlsContext(ca_pem, cert, key, ("pop", 1), clock=net.clock)
        fp_cfg = FastPathConfig.default()
        fp_cfg.relay = True
        self.fp = pop.fp = FastPath(fp_cfg)
        sock = udp()
        self.socks = {1: sock}
        self.fp.link_add(1, sock.fileno())
        self.pop_id = 1
        self.addr: Addr = sock.getsockname()
        self.alive = True
        pop._recompute()
        net.nodes.append(self)

    def on_ctrl(self, ev: CtrlEvent) -> None:
        self.pop._on_ctrl_event(ev)

    def tick(self) -> None:
        self.pop._tick()

    def close(self) -> None:
        self.pop.close()
        self.socks[1].close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The account's PKI: site_files and pop_files issue from it on demand."""
    from sdwan.pop import pki

    root = tmp_path_factory.mktemp("pki")
    pki.create_ca(root / "ca", "acme")
    return root


@pytest.fixture
def closing() -> list[Callable[[], None]]:
    done: list[Callable[[], None]] = []
    yield done
    for close in reversed(done):
        close()


def site(net: Net, ca: Path, root: Path, pop: PopNode, site_id: int, closing: list) -> SimSocket:
    cfg = site_config(ca, root, [pop], links=1, site_id=site_id)  # type: ignore[list-item]
    # popd keeps time in real nanoseconds, the site on the net's clock: a generous limit
    # keeps a slow machine from looking like a dead PoP.
    cfg = dataclasses.replace(cfg, cloud=CloudCfg(dead_after_ms=5000))
    s = SimSocket(net, cfg)
    closing.append(s.shutdown)
    return s


def test_a_site_and_popd_handshake_register_and_rekey_through_one_layer(
    ca: Path, tmp_path: Path, closing: list
) -> None:
    net = Net()
    pop = PopNode(net, ca, tmp_path / "pop", (1, 2))
    closing.append(pop.close)
    s = site(net, ca, tmp_path / "s1", pop, 1, closing)
    net.run(2)
    assert s.cloud is not None
    assert [r["state"] for r in s.cloud.pop_status()["sessions"]] == ["connected"]
    (ss,) = pop.pop.by_peer.values()
    assert ss.registered and ss.activated is not None and ss.peer_id == 1 << 8 | 1
    # One established session in each table; no refusals on either side.
    assert len(s.sessions) == 1 and len(pop.pop.sessions) == 1
    assert s.sessions.stats.rejected == 0 and pop.pop.sessions.stats.rejected == 0
    assert pop.pop.sessions.handshaking == 0

    # The fast path asks the site for a rekey: the cloud owner takes the event, and popd
    # moves the registered session to the new keys under the same peer.
    first = ss.dtls
    s._on_ctrl_event(CtrlEvent(CtrlEvent.REKEY, 1, pop_peer_id(1, 1), None))
    net.run(1)
    assert ss.dtls is not first and ss.activated is not None
    assert pop.pop.by_peer == {1 << 8 | 1: ss}
    assert [r["state"] for r in s.cloud.pop_status()["sessions"]] == ["connected"]
    assert s.cloud.pop_status()["sessions"][0]["handshakes"] == 2
    # The replaced session went from both tables with nobody told of a refusal.
    assert len(s.sessions) == 1 and len(pop.pop.sessions) == 1
    assert pop.pop.sessions.stats.rejected == 0 and not pop.pop.sessions.stats.rejections


def _one_round(net: Net) -> None:
    """Deliver what has arrived so far, once: answers wait for the next round, so messages
    sent each round interleave with a handshake's flights."""
    for node in list(net.nodes):
        for link_id, sock in node.socks.items():
            while True:
                try:
                    data, src = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                node.fp.process_inbound(link_id, src, data)
        while (ev := node.fp.ctrl_recv()) is not None:
            node.on_ctrl(ev)


def test_messages_between_a_site_and_popd_survive_a_rekey(
    ca: Path, tmp_path: Path, closing: list
) -> None:
    """socketd's cloud and popd send each other a message every round while the site
    rekeys, both ticking between rounds: the new handshake holds the address on both ends
    for a while, popd's end is done first and the site's second; every message still
    arrives, and counts. (Messages of a kind the other end does not know are counted as
    unknown: that is what is counted.) One more message over popd's old session, held back
    while both ends tick for a second after the switch, arrives within the grace and counts
    too (the cloud keeps the replaced session's tunnel that long)."""
    net = Net()
    pop = PopNode(net, ca, tmp_path / "pop", (1, 2))
    closing.append(pop.close)
    s = site(net, ca, tmp_path / "s1", pop, 1, closing)
    net.run(2)
    assert s.cloud is not None
    (ps,) = s.cloud.sessions.values()
    (ss,) = pop.pop.by_peer.values()
    first = ss.dtls
    up0, down0 = pop.pop.stats.messages_unknown, s.cloud.stats.unknown
    late: list[bytes] = []
    rounds = 40
    for i in range(rounds):
        if i == 5:
            s._on_ctrl_event(CtrlEvent(CtrlEvent.REKEY, 1, pop_peer_id(1, 1), None))
        if i == 6:
            assert ss.dtls is first
            late = first.send(b'{"t":"x-late"}')  # sent now, arrives last
        assert ps.tunnel.send_message({"t": "x-up", "i": i})
        assert pop.pop._send_msg(ss, {"t": "x-down", "i": i})
        net.clock.t += STEP
        for node in net.nodes:
            node.tick()
        _one_round(net)
    for _ in range(5):
        _one_round(net)
    assert ss.dtls is not first and ps.tunnel.handshakes == 2  # the rekey happened, mid-way
    assert pop.pop.stats.messages_unknown - up0 == rounds
    assert s.cloud.stats.unknown - down0 == rounds
    # Both ends tick on for a second (the cloud's tick forgets sessions it no longer
    # uses), then the late record arrives over the replaced session.
    net.run(1)
    records = s.sessions.stats.rekey_records
    for d in late:
        pop.socks[1].sendto(d, ss.addr)
    _one_round(net)
    assert s.cloud.stats.unknown - down0 == rounds + 1
    assert s.sessions.stats.rekey_records == records + 1
    assert pop.pop.stats.messages_malformed == 0 and s.cloud.stats.malformed == 0


def test_static_tunnels_and_the_cloud_are_two_owners_of_one_layer(
    ca: Path, tmp_path: Path, closing: list
) -> None:
    """Sites 1 and 2 have a configured tunnel to each other and a PoP session each: every
    session, kick and rekey request reaches the owner it belongs to."""
    net = Net()
    pop = PopNode(net, ca, tmp_path / "pop", (1, 2))
    closing.append(pop.close)
    a = site(net, ca, tmp_path / "s1", pop, 1, closing)
    b = site(net, ca, tmp_path / "s2", pop, 2, closing)
    timers = Timers(dead_after_s=1e9)
    for me, other, peer in ((a, b, 2), (b, a, 1)):
        me.fp.peer_add(peer)
        me.fp.set_endpoint(peer, 1, other.addr("wan1"))
        me.tunnels[peer] = PeerTunnel(
            my_site_id=me.cfg.site.id, peer_site_id=peer, link_id=1, link_name="wan1",
            endpoint=other.addr("wan1"), fp=me.fp, port=me, timers=timers, clock=net.clock,
        )
    net.run(3)
    assert b.tunnels[1].state is State.UP and a.tunnels[2].state is State.UP
    assert a.cloud is not None and b.cloud is not None
    for s in (a, b):
        assert [r["state"] for r in s.cloud.pop_status()["sessions"]] == ["connected"]
    # b initiated the tunnel; a took it as a server session for its static tunnel.
    tunnel_session = a.tunnels[2].session
    cloud_session = a.cloud.sessions[pop_peer_id(1, 1)].tunnel.session
    assert tunnel_session is not None and not tunnel_session.is_client
    assert cloud_session is not None and cloud_session.is_client
    assert len(a.sessions) == 2
    assert a.sessions.stats.rejected == 0 and a.sessions.stats.kicks_bad == 0

    # A rekey request for peer 2 goes to the static tunnel (b is its initiator, so it is b's
    # fast path that asks), one for the PoP session to the cloud.
    hs = b.tunnels[1].handshakes
    b._on_ctrl_event(CtrlEvent(CtrlEvent.REKEY, 1, 1, None))
    assert b.tunnels[1].handshaking is not None
    assert b.cloud.sessions[pop_peer_id(1, 1)].tunnel.handshaking is None
    b._on_ctrl_event(CtrlEvent(CtrlEvent.REKEY, 1, pop_peer_id(1, 1), None))
    assert b.cloud.sessions[pop_peer_id(1, 1)].tunnel.handshaking is not None
    net.run(1)
    assert b.tunnels[1].handshakes == hs + 1 and b.tunnels[1].state is State.UP
    # A kick is the static tunnels' (a kick to another site, or from a site without a
    # tunnel, is counted as bad).
    a._on_ctrl_event(CtrlEvent(CtrlEvent.PACKET, 1, 0, b.addr("wan1"), encode_kick(2, 1)))
    a._on_ctrl_event(CtrlEvent(CtrlEvent.PACKET, 1, 0, b.addr("wan1"), encode_kick(2, 3)))
    a._on_ctrl_event(CtrlEvent(CtrlEvent.PACKET, 1, 0, b.addr("wan1"), encode_kick(7, 1)))
    assert a.sessions.stats.kicks_bad == 2
    # The PoP saw neither site's tunnel: its only owner got only its own sessions.
    assert {s.site_id for s in pop.pop.by_peer.values()} == {1, 2}
    assert pop.pop.sessions.stats.rejected == 0


# --------------------------------------------------------------------------- one layer


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclasses.dataclass(eq=False)
class Recorder:
    """A tunnel that writes down what the layer hands it."""

    established: list[DtlsSession] = dataclasses.field(default_factory=list)
    messages: list[bytes] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    closed: list[str] = dataclasses.field(default_factory=list)

    def on_established(self, session: DtlsSession, link_id: int, addr: Addr) -> None:
        self.established.append(session)

    def on_message(self, session: DtlsSession, data: bytes) -> None:
        self.messages.append(data)

    def on_failed(self, session: DtlsSession | None, reason: str) -> None:
        self.failures.append(reason)

    def on_closed(self, session: DtlsSession, reason: str) -> None:
        self.closed.append(reason)


class Owner(SessionOwner):
    """Sites it accepts as a server, those it has a tunnel for (by default the same),
    addresses it knows, one Recorder per site."""

    def __init__(
        self, accepts: set[int], known: set[Addr] | None = None, claims: set[int] | None = None
    ) -> None:
        self.accepts = accepts
        self.claims = set(accepts) if claims is None else claims
        self.known = known or set()
        self.tunnels: dict[int, Recorder] = {}
        self.opened: dict[DtlsSession, Recorder] = {}
        self.in_use: list[DtlsSession] = []
        self.rekeys: list[int] = []

    def tunnel(self, site_id: int) -> Recorder:
        return self.tunnels.setdefault(site_id, Recorder())

    def allowed_ids(self) -> set[int]:
        return self.accepts

    def is_known_source(self, link_id: int, addr: Addr) -> bool:
        return addr in self.known

    def tunnel_for(self, session: DtlsSession) -> Recorder | None:
        if session in self.opened:
            return self.opened[session]
        site_id = session.peer_site_id
        if session.established and site_id in self.claims:
            return self.tunnel(site_id)
        return None

    def tunnel_at(self, link_id: int, addr: Addr) -> Recorder | None:
        return self.tunnel(0) if addr in self.known else None

    def sessions_in_use(self) -> list[DtlsSession]:
        return self.in_use

    def on_key_event(self, peer_id: int, expired: bool) -> bool:
        if peer_id not in self.accepts:
            return False
        self.rekeys.append(peer_id)
        return True


class Hub:
    """One SessionLayer (as site 1, or as a PoP) and DTLS clients at simulated addresses:
    every datagram the layer sends is delivered to the client at its address."""

    def __init__(self, certs: Callable[[int], tuple[Path, Path, Path]], policy: Policy,
                 me: int = 1) -> None:
        self.clock = Clock()
        self.certs = certs
        self.layer = SessionLayer(send=self._send, clock=self.clock, policy=policy, my_site_id=me)
        self.layer.dtls = DtlsContext(*certs(me), me, clock=self.clock)
        self.clients: dict[Addr, DtlsSession] = {}
        self.to: dict[Addr, list[bytes]] = {}
        self.last_hello: dict[Addr, bytes] = {}

    def _send(self, link_id: int, addr: Addr, data: bytes) -> None:
        self.to.setdefault(addr, []).append(data)

    def packet(self, addr: Addr, data: bytes) -> None:
        self.layer.on_ctrl_event(CtrlEvent(CtrlEvent.PACKET, 1, 0, addr, data))

    def hello(self, addr: Addr, site_id: int) -> DtlsSession:
        """A client at addr that got past the cookie check: a server handshake in progress."""
        client = DtlsContext(*self.certs(site_id), site_id, clock=self.clock).client(1)
        self.clients[addr] = client
        for d in client.start():
            self.packet(addr, d)
        for reply in self.to.pop(addr, []):  # the HelloVerifyRequest
            for d in client.receive(reply):
                self.last_hello[addr] = d
                self.packet(addr, d)  # the hello with its cookie
        return client

    def finish(self, addr: Addr, rounds: int = 6) -> None:
        """Run the handshake at addr to its end."""
        client = self.clients[addr]
        for _ in range(rounds):
            replies = self.to.pop(addr, [])
            if not replies:
                return
            for reply in replies:
                for d in client.receive(reply):
                    self.packet(addr, d)


@pytest.fixture(scope="module")
def certs(ca: Path) -> Callable[[int], tuple[Path, Path, Path]]:
    return lambda n: site_files(ca, n)


def small(policy: Policy, **kw: object) -> Policy:
    return dataclasses.replace(policy, **kw)  # type: ignore[arg-type]


def test_a_host_gets_a_few_slots_unless_it_is_a_known_peer(certs) -> None:
    hub = Hub(certs, small(SITE_POLICY, max_per_source=2))
    owner = Owner({2}, known={("198.51.100.9", 9)})
    hub.layer.add_owner(owner)
    for port in (1, 2, 3):
        hub.hello(("198.51.100.9", port), 2)
    assert hub.layer.handshaking == 2 and hub.layer.stats.refused_admission == 1
    hub.hello(("198.51.100.8", 1), 2)  # another host
    hub.hello(("198.51.100.9", 9), 2)  # the configured peer's endpoint on the same host
    assert hub.layer.handshaking == 4 and hub.layer.stats.refused_admission == 1
    # The admitted handshakes still complete.
    hub.finish(("198.51.100.9", 9))
    assert len(owner.tunnel(2).established) == 1


def test_popd_counts_an_ipv6_slash_64_as_one_host_and_known_ones_too(certs) -> None:
    hub = Hub(certs, small(POP_POLICY, max_per_source=2))
    owner = Owner({2}, known={("2001:db8::2", 7)})
    hub.layer.add_owner(owner)
    hub.hello(("2001:db8::1", 1), 2)
    hub.hello(("2001:db8::ffff", 2), 2)
    hub.hello(("2001:db8::2", 7), 2)  # known, but a PoP limits every host
    assert hub.layer.handshaking == 2 and hub.layer.stats.refused_admission == 1
    hub.hello(("2001:db8:1::1", 1), 2)  # another /64
    assert hub.layer.handshaking == 3


def test_a_full_table_evicts_the_oldest_stranger_for_a_known_source(certs) -> None:
    hub = Hub(certs, small(SITE_POLICY, max_handshaking=4))
    known = ("203.0.113.2", 4800)
    owner = Owner({2}, known={known})
    hub.layer.add_owner(owner)
    strangers = [(f"198.51.100.{i}", 5000 + i) for i in range(4)]
    for i, addr in enumerate(strangers):
        hub.clock.t = 1000 + i
        hub.hello(addr, 3 + i)
    hub.hello(("198.51.100.99", 1), 2)  # a stranger finds the table full
    assert hub.layer.stats.refused_admission == 1 and hub.layer.stats.evicted == 0
    hub.hello(known, 2)
    assert hub.layer.stats.evicted == 1 and hub.layer.handshaking == 4
    # The oldest stranger's handshake is gone: its next flight finds no session.
    hub.finish(strangers[0])
    assert hub.layer.stats.dtls_no_session >= 1
    hub.finish(known)
    assert len(owner.tunnel(2).established) == 1
    # Evicted strangers are counted, not listed, and nobody is told.
    assert not hub.layer.stats.rejections and not owner.tunnel(0).failures


def test_on_a_pop_any_newcomer_evicts_the_oldest_stranger_but_never_a_known_host(certs) -> None:
    hub = Hub(certs, small(POP_POLICY, max_handshaking=4, max_per_source=4))
    owner = Owner({2, 3, 4, 5, 6}, known={("198.51.100.0", 4800)})
    hub.layer.add_owner(owner)
    addrs = [("198.51.100.0", 20000), ("198.51.100.1", 20001), ("198.51.100.2", 20002),
             ("198.51.100.3", 20003)]
    # The first comes from a host where a site lives (a known IP on a PoP: any port).
    owner.known.add(addrs[0])
    for i, addr in enumerate(addrs):
        hub.clock.t = 1000 + i
        hub.hello(addr, 2 + i)
    hub.hello(("203.0.113.7", 4800), 6)
    assert hub.layer.stats.evicted == 1 and hub.layer.handshaking == 4
    hub.finish(addrs[0])  # the known host's handshake survived
    hub.finish(("203.0.113.7", 4800))
    assert len(owner.tunnel(2).established) == 1 and len(owner.tunnel(6).established) == 1
    hub.finish(addrs[1])  # the oldest stranger's did not
    assert not owner.tunnel(3).established


def test_a_new_hello_supersedes_the_handshake_in_progress_and_says_so(certs) -> None:
    hub = Hub(certs, SITE_POLICY)
    peer = ("198.51.100.2", 4800)
    owner = Owner({2}, known={peer})
    hub.layer.add_owner(owner)
    first = hub.hello(peer, 2)
    hub.to.pop(peer, None)  # its ServerHello flight is lost
    # A retransmission of the same hello is not a new handshake: it goes to the one it began.
    hub.packet(peer, hub.last_hello[peer])
    assert hub.layer.handshaking == 1 and not hub.layer.stats.rejections
    hub.hello(peer, 2)  # the peer restarted: a hello with another random
    assert hub.layer.handshaking == 1
    assert [r["reason"] for r in hub.layer.stats.rejections] == [SUPERSEDED]
    assert owner.tunnel(0).failures == [f"handshake from 198.51.100.2:4800 refused: {SUPERSEDED}"]
    hub.finish(peer)
    (session,) = owner.tunnel(2).established
    assert session.established and not first.established


@pytest.mark.parametrize("policy", [SITE_POLICY, POP_POLICY], ids=["site", "pop"])
@pytest.mark.parametrize("how", ["failed rekey", "replayed hello"])
def test_a_handshake_that_fails_gives_the_established_session_its_address_back(
    certs, policy: Policy, how: str
) -> None:
    """A new handshake from a peer's address (a rekey whose flights are lost, or a late or
    replayed copy of its hello with a valid cookie) takes over the address while it runs;
    when it fails, the established session's records must reach it again, not be dropped
    as dtls_no_session until the next successful rekey."""
    hub = Hub(certs, policy)
    peer = ("198.51.100.2", 4800)
    owner = Owner({2}, known={peer})
    hub.layer.add_owner(owner)
    first = hub.hello(peer, 2)
    hub.finish(peer)
    assert first.established
    if how == "failed rekey":
        hub.hello(peer, 2)
    else:
        hub.packet(peer, hub.last_hello[peer])
    assert hub.layer.handshaking == 1
    hub.to.pop(peer, None)  # nothing of the new handshake arrives
    hub.clock.t += policy.handshake_deadline_s + 0.1
    hub.layer.tick()
    assert hub.layer.handshaking == 0
    before = hub.layer.stats.dtls_no_session
    for d in first.send(b'{"t":"ping","id":1}'):
        hub.packet(peer, d)
    assert hub.layer.stats.dtls_no_session == before
    assert owner.tunnel(2).messages[-1] == b'{"t":"ping","id":1}'


def test_on_a_pop_a_restarted_handshake_is_dropped_quietly(certs) -> None:
    """Sites restart unanswered handshakes every few seconds: on a PoP that is not a refusal
    to list (it would push the real ones out of the short list)."""
    hub = Hub(certs, POP_POLICY)
    peer = ("198.51.100.2", 4800)
    hub.layer.add_owner(Owner({2}))
    hub.hello(peer, 2)
    hub.to.pop(peer, None)
    hub.hello(peer, 2)
    assert hub.layer.handshaking == 1
    assert not hub.layer.stats.rejections and hub.layer.stats.rejected == 0
    hub.finish(peer)
    assert hub.clients[peer].established


def test_a_handshake_past_its_deadline_is_refused_and_listed_only_when_it_matters(certs) -> None:
    hub = Hub(certs, SITE_POLICY)
    peer, stranger = ("198.51.100.2", 4800), ("203.0.113.66", 5555)
    owner = Owner({2, 3}, known={peer})
    hub.layer.add_owner(owner)
    hub.hello(peer, 2)
    hub.hello(stranger, 3)
    hub.clock.t += SITE_POLICY.handshake_deadline_s + 0.1
    hub.layer.tick()
    assert hub.layer.handshaking == 0 and hub.layer.stats.rejected == 2
    # The stranger's is counted only: it would push the refusals that matter off the list.
    assert [(r["from"], r["reason"]) for r in hub.layer.stats.rejections] == [
        ("198.51.100.2:4800", TIMED_OUT)
    ]
    assert owner.tunnel(0).failures == [f"handshake from 198.51.100.2:4800 refused: {TIMED_OUT}"]

    pop = Hub(certs, POP_POLICY)
    pop.layer.add_owner(Owner({3}))
    pop.hello(stranger, 3)
    pop.clock.t += POP_POLICY.handshake_deadline_s + 0.1
    pop.layer.tick()
    assert [r["reason"] for r in pop.layer.stats.rejections] == [TIMED_OUT]


def test_one_session_per_owner_and_the_unclaimed_one_refused(certs) -> None:
    """Owner a accepts site 2 as a server; owner b called site 3. Site 4 has a certificate of
    the account, but nobody accepts it."""
    hub = Hub(certs, SITE_POLICY)
    a, b = Owner({2}), Owner(set())
    hub.layer.add_owner(a)
    hub.layer.add_owner(b)
    hub.hello(("198.51.100.2", 4800), 2)
    hub.finish(("198.51.100.2", 4800))
    assert len(a.tunnel(2).established) == 1 and not b.tunnels

    # Our own client session toward site 3, which b opened: a server context plays site 3.
    three = ("198.51.100.3", 4800)
    session = hub.layer.client_session(1, three, 3)
    b.opened[session] = b.tunnel(3)
    server_ctx = DtlsContext(*certs(3), 3, clock=hub.clock)
    server: DtlsSession | None = None
    flight = session.start()
    for _ in range(8):
        replies: list[bytes] = []
        for d in flight:
            if server is None:
                res = server_ctx.accept(d, "x", allowed_site_ids={1})
                server = res.session
                replies += res.replies
            else:
                replies += server.receive(d)
        for r in replies:
            hub.packet(three, r)
        flight = hub.to.pop(three, [])
        if not flight:
            break
    assert b.tunnel(3).established == [session] and not a.tunnels.get(3)
    assert server is not None and server.established
    for d in server.send(b"hello"):
        hub.packet(three, d)
    assert b.tunnel(3).messages == [b"hello"] and not a.tunnel(2).messages
    # Rekey requests go to whichever owner takes the peer id.
    hub.layer.on_ctrl_event(CtrlEvent(CtrlEvent.REKEY, 1, 2, None))
    assert a.rekeys == [2] and b.rekeys == []

    # Site 4 completes the handshake (a accepts it as a server) but no tunnel claims it.
    a.accepts.add(4)
    hub.hello(("198.51.100.4", 4800), 4)
    hub.finish(("198.51.100.4", 4800))
    assert hub.layer.stats.rejections[-1]["reason"] == "site 4 is not a configured peer"
    assert len(hub.layer) == 2  # sites 2 and 3


def test_a_forgotten_handshake_is_neither_answered_nor_refused(certs) -> None:
    hub = Hub(certs, SITE_POLICY)
    owner = Owner(set())
    hub.layer.add_owner(owner)
    addr = ("198.51.100.3", 4800)
    session = hub.layer.client_session(1, addr, 3)
    owner.opened[session] = owner.tunnel(3)
    hello = session.start()
    hub.layer.forget_session(session)
    assert len(hub.layer) == 0
    # The answer to it finds no session; the layer reports nothing to anyone.
    server_ctx = DtlsContext(*certs(3), 3, clock=hub.clock)
    res = server_ctx.accept(hello[0], "x")
    for r in res.replies:
        hub.packet(addr, r)
    assert hub.layer.stats.dtls_no_session == len(res.replies) >= 1
    hub.clock.t += 60
    hub.layer.tick()
    assert hub.layer.stats.rejected == 0 and not owner.tunnel(3).failures


def test_stale_established_sessions_go_once_no_owner_uses_them(certs) -> None:
    hub = Hub(certs, SITE_POLICY)
    owner = Owner({2})
    hub.layer.add_owner(owner)
    peer = ("198.51.100.2", 4800)
    hub.hello(peer, 2)
    hub.finish(peer)
    (session,) = owner.tunnel(2).established
    owner.in_use.append(session)
    hub.clock.t += SITE_POLICY.stale_after_s + 1
    hub.layer.tick()
    assert len(hub.layer) == 1
    owner.in_use.clear()
    hub.layer.tick()
    assert len(hub.layer) == 1  # looked for every few seconds, not every tick
    hub.clock.t += STALE_CHECK_S
    hub.layer.tick()
    assert len(hub.layer) == 0


def test_what_is_not_a_session_is_counted_by_kind(certs) -> None:
    hub = Hub(certs, SITE_POLICY)
    seen: list[bytes] = []
    hub.layer.on_stun = lambda link, addr, data: bool(seen.append(data))  # matches nothing
    addr = ("203.0.113.66", 5555)
    stun = bytes([0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42]) + bytes(12)
    for data in (b"", b"\x99garbage", encode_kick(2, 1), stun, bytes([23, 0xFE, 0xFD]) + bytes(20),
                 b"\x16" + bytes(5000)):
        hub.packet(addr, data)
    st = hub.layer.stats
    assert (st.unknown, st.kicks_bad, st.stun_unmatched, st.dtls_no_session, st.oversized) == (
        2, 1, 1, 1, 1
    )
    assert seen == [stun]


def test_a_kick_names_the_peer_site_even_under_another_fast_path_id() -> None:
    """An owner may give a tunnel a fast-path id of its own (fp_peer_id, as the mesh swarm
    does for its fake sites): the kick must still be addressed to the peer's site id, which
    is what the peer's session layer checks."""
    sent: list[bytes] = []

    class Port:
        def send(self, link_id: int, addr: tuple[str, int], data: bytes) -> None:
            sent.append(data)

    fp = FastPath(FastPathConfig.default())
    try:
        fp.peer_add(77)
        tunnel = PeerTunnel(
            my_site_id=1, peer_site_id=5, link_id=1, link_name="wan1",
            endpoint=("192.0.2.5", 4800), fp=fp, port=Port(), timers=Timers(), fp_peer_id=77,
        )  # type: ignore[arg-type]
        assert not tunnel.initiator
        tunnel.tick()
        assert [decode_kick(d) for d in sent] == [(1, 5)]
    finally:
        fp.close()


# --------------------------------------------------------------------------- rekey, real UDP


class UdpEnd:
    """One session layer on a real UDP socket on loopback. What the layer sends may be lost
    (drop) or held back to arrive later (hold): either decides per datagram."""

    def __init__(self, certs: Callable[[int], tuple[Path, Path, Path]], me: int,
                 owner: Owner) -> None:
        self.sock = udp()
        self.sock.setblocking(False)
        self.addr: Addr = self.sock.getsockname()
        self.drop: Callable[[bytes], bool] = lambda data: False
        self.dropped: list[bytes] = []
        self.sent: list[bytes] = []
        self.layer = SessionLayer(send=self._send, policy=SITE_POLICY, my_site_id=me)
        self.layer.dtls = DtlsContext(*certs(me), me)
        self.layer.add_owner(owner)

    def _send(self, link_id: int, addr: Addr, data: bytes) -> None:
        self.sent.append(data)
        if self.drop(data):
            self.dropped.append(data)
            return
        self.sock.sendto(data, addr)

    def pump(self) -> int:
        """Hand the layer what has arrived so far (one round: replies wait for the next), then
        run its clocks (a handshake flight's retransmission)."""
        n = 0
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            self.layer.on_ctrl_event(CtrlEvent(CtrlEvent.PACKET, 1, 0, addr[:2], data))
            n += 1
        self.layer.tick()
        return n


def _final_server_flight(data: bytes) -> bool:
    """The datagram with a server's ChangeCipherSpec: its last flight (with its Finished)."""
    return any(r[0] == CONTENT_CHANGE_CIPHER_SPEC for r in split_records(data))


@dataclasses.dataclass
class RekeyRun:
    """What a stream of numbered messages through a rekey did."""

    client: UdpEnd
    server: UdpEnd
    sent_up: list[bytes]
    sent_down: list[bytes]
    got_up: list[bytes]  # at the server
    got_down: list[bytes]  # at the client
    rekey: DtlsSession


def _stream_through_rekey(
    certs: Callable[[int], tuple[Path, Path, Path]],
    *,
    lose_final_flight: bool = False,
    hold_late: bool = False,
    replay_hello: bool = False,
) -> RekeyRun:
    """Both ends send a numbered control message each round over their current session while
    the initiator (client) runs a rekey from the same address, at a pace (20 ms a round)
    that lets a lost flight's retransmission (1 s) happen mid-stream.

    lose_final_flight: the server's ChangeCipherSpec+Finished of the rekey is lost once.
    hold_late: the first message each way over the old session after the rekey started is
    held back and arrives only once both ends are on the new session (reordered, late).
    replay_hello: before the held messages arrive, the rekey's ClientHello with its valid
    cookie comes again (a replayed or duplicated hello starts a handshake at the server)."""
    client_owner, server_owner = Owner(set()), Owner({2})
    client, server = UdpEnd(certs, 2, client_owner), UdpEnd(certs, 1, server_owner)
    to_server, to_client = client_owner.tunnel(1), server_owner.tunnel(2)

    def open_session() -> DtlsSession:
        s = client.layer.client_session(1, server.addr, 1)
        client_owner.opened[s] = to_server
        for d in s.start():
            client.sock.sendto(d, server.addr)
        return s

    def round_trip() -> None:
        server.pump()
        client.pump()

    open_session()
    for _ in range(20):
        round_trip()
    assert len(to_server.established) == 1 and len(to_client.established) == 1
    old_up, old_down = to_server.established[0], to_client.established[0]
    sent_up: list[bytes] = []
    sent_down: list[bytes] = []
    held: list[tuple[socket.socket, bytes, Addr]] = []
    rekey: DtlsSession | None = None
    hellos_before = 0
    done_at: int | None = None
    deadline = time.monotonic() + 15
    i = 0
    while done_at is None or i < done_at + 10:
        assert time.monotonic() < deadline, "the rekey never completed"
        if i == 10:
            if lose_final_flight:
                server.drop = lambda d: not server.dropped and _final_server_flight(d)
            hellos_before = len(client.sent)
            rekey = open_session()
        up = f'{{"t":"ping","id":{i}}}'.encode()
        down = f'{{"t":"pong","id":{i}}}'.encode()
        for sender, session, msg, to, log in (
            (client.sock, to_server.established[-1], up, server.addr, sent_up),
            (server.sock, to_client.established[-1], down, client.addr, sent_down),
        ):
            old = session is old_up or session is old_down
            hold = hold_late and i >= 10 and old and not any(h[0] is sender for h in held)
            for d in session.send(msg):
                if hold:
                    held.append((sender, d, to))
                else:
                    sender.sendto(d, to)
            log.append(msg)
        round_trip()
        if done_at is None and rekey is not None and rekey.established and len(
            to_client.established
        ) == 2:
            done_at = i
            if replay_hello:
                (hello,) = [d for d in client.sent[hellos_before:] if is_client_hello(d)]
                client.sock.sendto(hello, server.addr)
                round_trip()
            for sender, d, to in held:
                sender.sendto(d, to)
        i += 1
        time.sleep(0.02)
    for _ in range(5):
        round_trip()
    assert rekey is not None
    if hold_late:
        assert len(held) == 2
    return RekeyRun(client, server, sent_up, sent_down, to_client.messages, to_server.messages,
                    rekey)


def test_a_rekey_loses_no_control_message_of_the_established_session(certs) -> None:
    """The new handshake takes over the address on both ends while it runs, and the
    responder finishes first: records of the established session (application data, epoch
    1) must still reach it and its tunnel, not be fed to the handshake (epoch 0 handshake
    records) or to the new session and lost; every message arrives, in order."""
    run = _stream_through_rekey(certs)
    try:
        # The rekey did happen, in the middle of the stream, on both ends.
        assert run.rekey.established
        assert run.got_up == run.sent_up
        assert run.got_down == run.sent_down
        assert run.client.layer.stats.rejected == 0 and run.server.layer.stats.rejected == 0
        # Some of them did arrive while the other session held the address, and were taken.
        assert run.client.layer.stats.rekey_records + run.server.layer.stats.rekey_records > 0
    finally:
        run.client.sock.close()
        run.server.sock.close()


def test_a_rekey_whose_last_server_flight_is_lost_completes(certs) -> None:
    """The server's ChangeCipherSpec+Finished of the rekey is lost once. The server is done
    and has switched; the client resends its Finished (an epoch-1 handshake record) when its
    timer runs out, and only that makes a DTLS server resend its last flight: it must reach
    the new session, not be thrown away as a late copy. The rekey completes, and no message
    of either session is lost (the server's over the new keys wait in the client's
    handshake until it is done)."""
    run = _stream_through_rekey(certs, lose_final_flight=True)
    try:
        assert len(run.server.dropped) == 1
        assert run.rekey.established and run.rekey.failed is None
        assert run.got_up == run.sent_up
        assert run.got_down == run.sent_down
        assert run.client.layer.stats.rejected == 0 and run.server.layer.stats.rejected == 0
        # The client went on over the old session until its end was done: the server took
        # those from the session its rekey had replaced.
        assert run.server.layer.stats.rekey_records > 0
    finally:
        run.client.sock.close()
        run.server.sock.close()


@pytest.mark.parametrize("replay_hello", [False, True], ids=["late", "late-after-replayed-hello"])
def test_late_records_of_the_replaced_session_arrive_reordered(certs, replay_hello) -> None:
    """A message each way over the old session is held back until both ends have switched
    to the new one: it arrives after later messages, within the replaced session's grace,
    and still counts, once each. A replayed ClientHello with a valid cookie first (it starts
    a handshake that displaces the new session) does not end that grace."""
    run = _stream_through_rekey(certs, hold_late=True, replay_hello=replay_hello)
    try:
        assert run.rekey.established
        assert sorted(run.got_up) == sorted(run.sent_up) and run.got_up != run.sent_up
        assert sorted(run.got_down) == sorted(run.sent_down) and run.got_down != run.sent_down
        assert run.client.layer.stats.rekey_records >= 1
        assert run.server.layer.stats.rekey_records >= 1
    finally:
        run.client.sock.close()
        run.server.sock.close()
