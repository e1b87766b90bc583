"""The link manager (links.py) with real link sockets on `lo`, a real fast path (its threads
receive for the links, as in socketd), a real STUN server on 127.0.0.1, a real Store and the
kernel's view of real interfaces. Its clock is virtual, so refresh and failure run at once."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdwan.bindings.fastpath import CtrlEvent, FastPath
from sdwan.common import stun
from sdwan.common.netdev import interface_fault
from sdwan.common.store import Store
from sdwan.common.stun import Endpoint, is_stun
from sdwan.site.config import Link
from sdwan.site.links import (
    STUN_REFRESH_S,
    STUN_RETRY_S,
    LinkError,
    LinkManager,
    WanLink,
)

Addr = tuple[str, int]
MISSING = "nosuchdev0"


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """A link manager whose links are open in a running fast path; STUN answers that arrive
    on a link socket reach it the way socketd routes them."""

    def __init__(self, links: list[Link], store: Store | None = None) -> None:
        self.clock = Clock()
        self.fp = FastPath()
        self.sent: list[tuple[int, Addr, bytes]] = []
        self.changes: list[tuple[str, Endpoint | None, Endpoint | None]] = []
        self.unmatched = 0
        self.links = LinkManager(links, send=self.send, clock=self.clock, store=store)
        self.links.on_public_change(self._changed)
        # A tunnel socket stands in for the TUN device: the fast path's threads need one.
        self.tun, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fp.tun_attach(theirs.fileno())
        theirs.close()
        self.links.open(self.fp)
        self.fp.start()

    def send(self, link_id: int, addr: Addr, data: bytes) -> None:
        self.sent.append((link_id, addr, data))
        self.fp.ctrl_send(link_id, addr, data)

    def _changed(self, wl: WanLink, old: Endpoint | None) -> None:
        self.changes.append((wl.name, old, wl.public))

    def _on_ctrl(self, ev: CtrlEvent) -> None:
        if not (ev.event == CtrlEvent.PACKET and is_stun(ev.data)):
            return
        if ev.addr is None or not self.links.on_stun(ev.link_id, ev.addr, ev.data):
            self.unmatched += 1

    def attach(self) -> None:
        asyncio.get_running_loop().add_reader(
            self.fp.ctrl_fd, lambda: self.fp.ctrl_drain(self._on_ctrl, 64)
        )

    def detach(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fp.ctrl_fd)

    def close(self) -> None:
        self.fp.close()
        self.tun.close()


def lo_link(name: str, precedence: int = 1, interface: str = "lo", port: int = 0) -> Link:
    # Port 0: the kernel picks a free one, found again in WanLink.bound.
    return Link(name=name, interface=interface, port=port, precedence=precedence)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig([lo_link("wan1"), lo_link("lte", precedence=3)])
    try:
        yield r
    finally:
        r.close()


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


async def until(what: str, pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- links and sockets


def test_links_get_ids_in_config_order_and_sockets_in_the_fast_path(rig: Rig) -> None:
    links = rig.links
    assert links.ids == {"wan1": 1, "lte": 2}
    assert [(wl.id, wl.name, wl.precedence, wl.main) for wl in links] == [
        (1, "wan1", 1, True),
        (2, "lte", 3, False),
    ]
    assert links.by_name("lte") is links[2] and links.get(3) is None
    for wl in links:
        assert wl.bound is not None and wl.bound[0] == "0.0.0.0" and wl.port == wl.bound[1] > 0
    # The fast path took the sockets: a datagram to a link's port is received on that link.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x16\xfe\xfdhello", ("127.0.0.1", links[2].port))
        assert select.select([rig.fp.ctrl_fd], [], [], 5.0)[0], "nothing received"
        ev = rig.fp.ctrl_recv()
        assert ev is not None and ev.link_id == 2 and ev.data == b"\x16\xfe\xfdhello"


def test_a_link_whose_device_is_missing_does_not_open() -> None:
    fp = FastPath()
    try:
        links = LinkManager([lo_link("wan9", interface=MISSING)], send=fp.ctrl_send)
        with pytest.raises(LinkError, match=f"link wan9: cannot bind to device '{MISSING}'"):
            links.open(fp)
    finally:
        fp.close()


# --------------------------------------------------------------------------- state and address


def test_state_and_address_come_from_the_kernel() -> None:
    links = LinkManager(
        [lo_link("wan1"), lo_link("wan2", interface=MISSING)], send=lambda *a: None
    )
    assert links[1].fault() is None and links[1].is_up()
    assert links[2].fault() == "no such interface" and not links[2].is_up()
    assert links.states() == {"wan1": True, "wan2": False}
    assert links.faults() == {"wan1": None, "wan2": "no such interface"}
    assert interface_fault("lo") is None
    assert links[1].local_ipv4() == "127.0.0.1"
    assert links[2].local_ipv4() is None


# --------------------------------------------------------------------------- precedence


def test_precedence_policy() -> None:
    links = LinkManager(
        [lo_link("a", 1), lo_link("b", 2), lo_link("c", 3)], send=lambda *a: None
    )
    # No live session yet: every link tries, the standby included.
    assert links.eligible_for_cloud([]) == [1, 2, 3]
    # A main link is live: the standby is dropped.
    assert links.eligible_for_cloud([1]) == [1, 2]
    assert links.eligible_for_cloud([2, 3]) == [1, 2]
    # Only the standby is live: it stays, and the main links keep trying.
    assert links.eligible_for_cloud([3]) == [1, 2, 3]
    # A site with standby links only uses them.
    standby = LinkManager([lo_link("x", 3), lo_link("y", 3)], send=lambda *a: None)
    assert standby.eligible_for_cloud([1]) == [1, 2]
    # Preference: lowest precedence, then config order.
    mixed = LinkManager(
        [lo_link("p", 2), lo_link("q", 1), lo_link("r", 3), lo_link("s", 1)],
        send=lambda *a: None,
    )
    assert sorted([1, 2, 3, 4], key=mixed.rank) == [2, 4, 1, 3]


def test_an_altwan_link_carries_no_pop_session_and_asks_no_stun() -> None:
    from dataclasses import replace

    alt = replace(lo_link("mpls", 1), altwan=True, offcloud=False)
    sent: list[tuple[int, Addr, bytes]] = []
    links = LinkManager([alt, lo_link("b", 3)], send=lambda *a: sent.append(a),
                        clock=Clock())
    assert links.altwan_link() is links[1] and links[1].altwan and not links[1].main
    # The standby is the only link that reaches a PoP: it is used, the Alt-WAN link never.
    assert links.eligible_for_cloud([]) == [2] and links.eligible_for_cloud([1]) == [2]
    links.use_stun_server(("127.0.0.1", 3478), ("127.0.0.1", 4800))
    assert {link_id for link_id, _, _ in sent} == {2}
    assert links[1].stun.server is None and links[1].stun.transactions == 0
    # What register tells the PoP of it is its own address (lo has 127.0.0.1).
    assert links.advertised()[0] == ("127.0.0.1", "altwan")


# --------------------------------------------------------------------------- STUN


def test_stun_learns_refreshes_and_forgets_the_public_endpoint(rig: Rig, tmp_path: Path) -> None:
    links = rig.links

    async def scenario() -> None:
        transport, srv = await stun.start_server(("127.0.0.1", 0))
        server = transport.get_extra_info("sockname")[:2]
        rig.attach()
        try:
            links.tick()
            assert rig.sent == []  # no server named yet: nothing is asked
            links.use_stun_server(server)
            # Asked at once, on every link, from the link's own socket.
            assert [(i, a) for i, a, _ in rig.sent] == [(1, server), (2, server)]
            await until("both answers", lambda: all(wl.public for wl in links))
            for wl in links:
                assert wl.public == Endpoint("127.0.0.1", wl.port)
                assert wl.stun.status(rig.clock()) == {
                    "server": f"127.0.0.1:{server[1]}",
                    "learned_s": 0.0,
                    "pending": False,
                    "error": None,
                    "transactions": 1,
                    "failures": 0,
                }
            assert links.publics() == tuple(f"127.0.0.1:{wl.port}" for wl in links)
            assert links.public_str(1) == f"127.0.0.1:{links[1].port}"
            # In whatever order the answers arrived.
            assert sorted(rig.changes) == sorted(
                (wl.name, None, Endpoint("127.0.0.1", wl.port)) for wl in links
            )
            assert srv.stats.answers == 2
            # NAT data recorded over a link carries its port and, by default, its endpoint.
            links.store = store = Store(tmp_path)
            try:
                entry = links[1].put_nat(7, "192.0.2.9:4800")
                assert entry is not None and entry == store.nat(7, "wan1")
                assert (entry.local_port, entry.local_public) == (
                    links[1].port,
                    f"127.0.0.1:{links[1].port}",
                )
            finally:
                links.store = None
                store.close()

            # A late duplicate of an answer matches nothing any more.
            answer = srv.handle(rig.sent[0][2], ("127.0.0.1", links[1].port))
            assert answer is not None and not links.on_stun(1, server, answer)

            # Refreshed after STUN_REFRESH_S; the same endpoint is no change.
            answered = srv.stats.answers
            rig.clock.t += STUN_REFRESH_S - 1
            links.tick()
            assert len(rig.sent) == 2
            rig.clock.t += 1
            links.tick()
            assert len(rig.sent) == 4
            await until("refresh answers", lambda: srv.stats.answers == answered + 2)
            await until("refresh taken", lambda: not any(wl.stun.tx for wl in links))
            assert [wl.stun.transactions for wl in links] == [2, 2]
            assert len(rig.changes) == 2

            # Another server that never answers: asked at once, then 7 requests over
            # 39.5 s, then the endpoint is forgotten (it may be a mapping that is gone).
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
                silent.bind(("127.0.0.1", 0))
                silent.setblocking(False)
                quiet = silent.getsockname()
                links.use_stun_server(quiet)
                assert [wl.stun.server for wl in links] == [quiet, quiet]
                for _ in range(int(39.5 / 0.5)):
                    rig.clock.t += 0.5
                    links.tick()
                assert all(wl.public is None and wl.stun.error for wl in links)
                for wl in links:
                    st = wl.stun
                    assert st.error is not None and st.error.startswith("timeout")
                    assert (st.failures, st.transactions, st.tx) == (1, 3, None)
                    assert st.status(rig.clock())["learned_s"] is None
                assert rig.changes[2:] == [
                    (wl.name, Endpoint("127.0.0.1", wl.port), None) for wl in links
                ]
                got = Counter(silent)
                await until("requests at the silent server", lambda: got() == 14)
                # The next try is STUN_RETRY_S later.
                n = len(rig.sent)
                rig.clock.t += STUN_RETRY_S - 0.5
                links.tick()
                assert len(rig.sent) == n
                rig.clock.t += 0.5
                links.tick()
                assert len(rig.sent) == n + 2
        finally:
            rig.detach()
            transport.close()

    _run(scenario)
    assert rig.unmatched == 0


class Counter:
    """How many datagrams a non-blocking socket has received so far."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.n = sock, 0

    def __call__(self) -> int:
        while True:
            try:
                self.sock.recv(2048)
            except BlockingIOError:
                return self.n
            self.n += 1


def test_stun_from_strangers_is_not_taken(rig: Rig) -> None:
    links = rig.links

    async def scenario() -> None:
        transport, srv = await stun.start_server(("127.0.0.1", 0))
        server = transport.get_extra_info("sockname")[:2]
        try:
            links.use_stun_server(server)
            _, _, request = rig.sent[0]
            answer = srv.handle(request, ("198.51.100.7", 4800))
            assert answer is not None
            # The right transaction id from another address, or on the other link: not ours.
            assert not links.on_stun(1, ("127.0.0.1", 9), answer)
            assert not links.on_stun(2, server, answer)
            assert not links.on_stun(7, server, answer)
            assert links[1].public is None and links[1].stun.tx is not None
            assert links.on_stun(1, server, answer)
            assert links[1].public == Endpoint("198.51.100.7", 4800)
            # A 4xx answer fails the transaction at once, and counts as taken.
            links.use_stun_server(None)
            links.use_stun_server(server)
            tx = links[1].stun.tx
            assert tx is not None
            bad = stun.binding_request(tx.transaction_id).add(0x7F01, b"what").encode()
            error = srv.handle(bad, ("198.51.100.7", 4800))
            assert error is not None and stun.parse(error).error is not None
            assert links.on_stun(1, server, error)
            assert links[1].public is None and links[1].stun.failures == 1
        finally:
            transport.close()

    _run(scenario)


def test_a_second_mapping_tells_a_port_randomising_nat(rig: Rig) -> None:
    links = rig.links

    async def scenario() -> None:
        transport, srv = await stun.start_server(("127.0.0.1", 0))
        server = transport.get_extra_info("sockname")[:2]
        check = ("127.0.0.1", 9)  # stands for the PoP's main port; the test answers for it
        try:
            links.use_stun_server(server, check)
            # Both asked at once, from every link's socket.
            assert sorted((i, a) for i, a, _ in rig.sent) == [
                (1, check), (1, server), (2, check), (2, server)
            ]
            wl = links[1]
            to_server = next(d for i, a, d in rig.sent if (i, a) == (1, server))
            to_check = next(d for i, a, d in rig.sent if (i, a) == (1, check))
            # Toward the STUN server the NAT keeps the port; the second answer decides.
            assert links.on_stun(1, server, srv.handle(to_server, ("198.51.100.7", wl.port)))
            assert wl.nat_class == "port-preserving" and wl.stun_check.tx is not None
            before = links.advertised()
            # Another port toward the other destination: a new mapping per destination.
            assert links.on_stun(1, check, srv.handle(to_check, ("198.51.100.7", 52011)))
            assert wl.stun_check.public == Endpoint("198.51.100.7", 52011)
            assert wl.nat_class == "port-randomising"
            assert links.advertised() != before
            assert links.advertised()[0] == (f"198.51.100.7:{wl.port}", "port-randomising")
            # The same server twice is one transaction, not two.
            rig.sent.clear()
            links.use_stun_server(None)
            links.use_stun_server(server, server)
            assert [a for _, a, _ in rig.sent] == [server, server]
            assert links.stun_check is None and wl.stun_check.public is None
        finally:
            transport.close()

    _run(scenario)


# --------------------------------------------------------------------------- NAT data


NAT_LINKS = [lo_link("wan1", port=4800), lo_link("wan2", port=4801)]


def test_nat_data_round_trip_per_link(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        links = LinkManager(NAT_LINKS, send=lambda *a: None, store=store)
        wan1, wan2 = links[1], links[2]
        with pytest.raises(ValueError, match="no public endpoint"):
            wan1.put_nat(2, "203.0.113.2:4800")
        a = wan1.put_nat(2, "203.0.113.2:4800", local_public="198.51.100.7:40123", at=1000.5)
        assert a is not None and (a.peer_id, a.link, a.local_public) == (
            2, "wan1", "198.51.100.7:40123",
        )
        b = wan2.put_nat(2, ("192.0.2.9", 4801), local_public=("198.51.100.8", 4800))
        assert b is not None and b.peer_public == "192.0.2.9:4801"
        assert wan1.nat(2) == a and wan2.nat(2) == b and wan1.nat(3) is None
        assert wan1.nat_all() == [a] and wan2.nat_all() == [b]
        assert wan1.forget_nat(2) == 1 and wan1.nat(2) is None and wan2.nat(2) == b
    finally:
        store.close()
    # It persists: a new store on the same directory still has wan2's entry.
    again = Store(tmp_path)
    try:
        links = LinkManager(NAT_LINKS, send=lambda *a: None, store=again)
        assert links[2].nat(2) == b and links[1].nat_all() == []
    finally:
        again.close()
    # Without a store there is nothing to read and nothing is recorded.
    bare = LinkManager(NAT_LINKS, send=lambda *a: None)
    assert bare[1].nat(2) is None and bare[1].nat_all() == [] and bare[1].forget_nat(2) == 0
    assert bare[1].put_nat(2, "203.0.113.2:4800", local_public="198.51.100.7:1") is None
