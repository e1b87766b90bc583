"""Control-message framing (sdwan.common.messages): encode and reassembly on their own, then
over real
DTLS sessions, through PeerTunnel (the simulated sites of test_tunnel_sim), and from a real popd
serving an account of 300 sites, whose welcome and directory no longer fit one record.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

# The harnesses of the popd and tunnel tests; importing their fixtures registers them here.
# tests/unit is on sys.path under pytest's default import mode.
from test_popd import Client, PopEnv, clients, pop  # noqa: F401
from test_tunnel_sim import certs, pair  # noqa: F401

from sdwan.common.dtls import DtlsContext, DtlsSession
from sdwan.common.messages import (
    MIN_LIMIT,
    FragStats,
    Reassembler,
    dumps,
    encode,
    record_limit,
)
from sdwan.pop import pki
from sdwan.pop.popd import DELTA_IN_FLIGHT_S
from sdwan.site.tunnel import State


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def big_message(n: int = 300, text: str = "branch") -> dict[str, Any]:
    return {
        "t": "directory",
        "rev": 7,
        "directory": [
            {"site_id": i, "name": f"{text}-{i}", "subnets": [f"10.{i >> 8}.{i & 255}.0/24"],
             "links": [{"name": "wan1", "precedence": 1, "public": f"198.51.100.{i % 250}:4800"}],
             "offcloud": i % 2 == 0, "recovery": False, "online": True}
            for i in range(1, n + 1)
        ],
    }


def feed_all(r: Reassembler, records: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        msg = r.feed(rec)
        if msg is not None:
            out.append(msg)
    return out


def frag(ident: int, i: int, n: int, d: Any) -> bytes:
    return json.dumps({"t": "frag", "id": ident, "i": i, "n": n, "d": d}).encode()


# ------------------------------------------------------------------ encode


def test_a_small_message_is_one_plain_record() -> None:
    msg = {"t": "ping", "id": 3}
    records = encode(msg, 1163)
    assert records == [b'{"t":"ping","id":3}']
    r = Reassembler()
    assert r.feed(records[0]) == msg
    # A record written by an older peer (other JSON spacing) is read the same way.
    assert r.feed(json.dumps(msg).encode()) == msg
    assert r.stats.messages == 2 and r.stats.fragments == 0


def test_a_message_exactly_at_the_limit_is_not_fragmented() -> None:
    msg = {"t": "x", "pad": ""}
    base = len(dumps(msg))
    msg["pad"] = "a" * (500 - base)
    assert len(encode(msg, 500)) == 1
    msg["pad"] += "a"
    assert len(encode(msg, 500)) > 1


@pytest.mark.parametrize("limit", [MIN_LIMIT, 200, 1163, 1363])
@pytest.mark.parametrize(
    "text",
    ["branch", 'quote"s\\and\\\\back"slash', "caf\u00e9 \u2603 \U0001f600", "ctl\n\t\x00"],
    ids=["plain", "escapes", "unicode", "control"],
)
def test_fragments_fit_the_limit_and_reassemble(limit: int, text: str) -> None:
    msg = big_message(40 if limit < 500 else 300, text)
    records = encode(msg, limit)
    assert len(records) > 1
    assert all(len(rec) <= limit for rec in records)
    frags = [json.loads(rec) for rec in records]
    assert {f["t"] for f in frags} == {"frag"}
    assert [f["i"] for f in frags] == list(range(len(records)))
    assert {f["n"] for f in frags} == {len(records)} and len({f["id"] for f in frags}) == 1
    # Fragments are not padded out: all but the last are nearly full.
    assert all(len(rec) > limit * 0.8 for rec in records[:-1] if limit > 500)
    r = Reassembler()
    assert feed_all(r, records) == [msg]
    assert r.stats.reassembled == 1 and r.pending == 0 and r.buffered == 0


def test_a_quote_only_message_still_fits() -> None:
    # Every character of the slices costs two bytes once escaped: the worst case.
    msg = {"t": "q", "d": '"' * 5000}
    records = encode(msg, MIN_LIMIT)
    assert all(len(rec) <= MIN_LIMIT for rec in records)
    assert feed_all(Reassembler(), records) == [msg]


def test_each_message_gets_its_own_id() -> None:
    a, b = encode(big_message(), 500), encode(big_message(), 500)
    assert json.loads(a[0])["id"] != json.loads(b[0])["id"]


def test_a_limit_below_the_minimum_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        encode({"t": "x"}, MIN_LIMIT - 1)


# ------------------------------------------------------------------ reassembly


def test_out_of_order_and_duplicated_fragments() -> None:
    msg = big_message()
    records = encode(msg, 600)
    rng = random.Random(5)
    shuffled = records + rng.sample(records, 10)
    rng.shuffle(shuffled)
    r = Reassembler()
    out = feed_all(r, shuffled)
    assert out == [msg]
    assert r.stats.duplicates == 10
    assert r.stats.malformed == 0
    # Duplicates are not reported as faults.
    r.feed(records[0])
    assert r.dropped is None and r.stats.duplicates == 11


def test_interleaved_messages_reassemble_independently() -> None:
    m1, m2 = big_message(50, "one"), big_message(60, "two")
    r1, r2 = encode(m1, 400), encode(m2, 400)
    mixed = [x for pair_ in zip(r1, r2, strict=False) for x in pair_]
    mixed += r1[len(r2):] + r2[len(r1):]
    out = feed_all(Reassembler(), mixed)
    assert sorted(out, key=lambda m: m["directory"][0]["name"]) == [m1, m2]


def test_a_lost_fragment_expires_and_frees_its_memory() -> None:
    clock = Clock()
    r = Reassembler(clock=clock, timeout_s=5.0)
    records = encode(big_message(), 600)
    assert feed_all(r, records[:-1]) == []
    assert r.pending == 1 and r.buffered > 0
    clock.t += 4.0
    assert r.expire() == 0
    clock.t += 1.5
    # Any later record (here a plain one) sweeps stale partials first.
    assert r.feed(b'{"t":"ping","id":1}') == {"t": "ping", "id": 1}
    assert r.pending == 0 and r.buffered == 0 and r.stats.expired == 1
    # The last fragment arriving now starts a partial that can never finish, and expires too.
    assert r.feed(records[-1]) is None and r.pending == 1
    clock.t += 6
    assert r.expire() == 1
    # A resend of the whole message goes through.
    again = encode(big_message(), 600)
    assert feed_all(r, again) == [big_message()]


def test_a_trickle_keeps_a_partial_alive() -> None:
    clock = Clock()
    r = Reassembler(clock=clock, timeout_s=2.0)
    records = encode(big_message(), 600)
    out = []
    for rec in records:
        clock.t += 1.5
        if (m := r.feed(rec)) is not None:
            out.append(m)
    assert out == [big_message()]


def test_a_message_over_the_size_bound_is_dropped_before_it_is_buffered() -> None:
    r = Reassembler(max_message=10_000)
    records = encode(big_message(), 1000)
    assert len(b"".join(records)) > 10_000
    out = []
    for rec in records:
        out.append(r.feed(rec))
        assert r.buffered <= 10_000
    assert out == [None] * len(records)
    assert r.stats.oversized == 1 and r.pending == 0 and r.buffered == 0
    assert r.stats.duplicates == len(records) - 1 - r.stats.fragments  # the rest: ignored


def test_a_fragment_count_over_the_bound_is_refused() -> None:
    r = Reassembler(max_fragments=10)
    records = encode(big_message(), 300)
    assert r.feed(records[0]) is None
    assert r.stats.oversized == 1 and r.pending == 0
    assert r.dropped == f"fragment of a message in {len(records)} fragments"


def test_too_many_partials_evict_the_oldest() -> None:
    clock = Clock()
    r = Reassembler(max_partials=2, clock=clock)
    msgs = [big_message(30, f"m{k}") for k in range(3)]
    recs = [encode(m, 400) for m in msgs]
    for k in range(3):
        clock.t += 1
        r.feed(recs[k][0])
    assert r.pending == 2 and r.stats.evicted == 1
    # Message 0 lost its first fragment; 1 and 2 still complete.
    out = feed_all(r, recs[1][1:] + recs[2][1:] + recs[0][1:])
    assert out == [msgs[1], msgs[2]]


def test_the_buffered_bytes_stay_bounded() -> None:
    r = Reassembler(max_message=50_000, max_buffered=60_000, max_partials=8)
    msgs = [big_message(200, f"m{k}") for k in range(4)]
    parts = [encode(m, 1000)[:-1] for m in msgs]  # never complete
    for p in parts:
        for rec in p:
            r.feed(rec)
            assert r.buffered <= 60_000
    assert r.stats.evicted >= 1


GARBAGE = [
    b"",
    b"\xff\xfe",
    b"{not json",
    b"[1,2]",
    b'"frag"',
    b"null",
    b"[" * 100000,
    frag(1, 0, 2, 5),
    frag(1, 0, 2, ""),
    frag(1, 2, 2, "x"),
    frag(1, -1, 2, "x"),
    frag(1, 0, 1, "x"),
    frag(True, 0, 2, "x"),
    frag(-1, 0, 2, "x"),
    frag(2**32, 0, 2, "x"),
    frag(1, 0.0, 2, "x"),
    frag(1, 0, "2", "x"),
    frag(1, 0, 2, "caf\u00e9"),
    b'{"t":"frag"}',
]


@pytest.mark.parametrize("record", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_dropped_and_counted(record: bytes) -> None:
    r = Reassembler()
    assert r.feed(record) is None
    assert r.dropped is not None
    assert r.stats.malformed + r.stats.oversized == 1
    assert r.pending == 0
    # And the reassembler still works.
    assert feed_all(r, encode(big_message(), 700)) == [big_message()]


def test_bad_reassembled_text_is_dropped() -> None:
    r = Reassembler()
    assert feed_all(r, [frag(9, 0, 2, '{"t":'), frag(9, 1, 2, "nope")]) == []
    assert r.dropped == "reassembled text is not JSON"
    inner = dumps({"t": "frag", "id": 1, "i": 0, "n": 2, "d": "x"})
    assert feed_all(r, [frag(8, 0, 2, inner[:10]), frag(8, 1, 2, inner[10:])]) == []
    assert r.dropped == "reassembled text is not a message"
    assert feed_all(r, [frag(7, 0, 2, "[1,"), frag(7, 1, 2, "2]")]) == []
    assert r.stats.malformed == 3 and r.pending == 0


def test_a_fragment_count_that_changes_drops_the_partial() -> None:
    r = Reassembler()
    assert r.feed(frag(4, 0, 3, '{"t":')) is None
    assert r.feed(frag(4, 1, 2, '"x"}')) is None
    assert r.dropped is not None and r.pending == 0 and r.buffered == 0


def test_random_mutations_never_raise() -> None:
    rng = random.Random(11)
    records = encode(big_message(), 400)
    r = Reassembler(max_message=20_000, max_partials=3)
    for _ in range(3000):
        rec = bytearray(rng.choice(records))
        for _ in range(rng.randint(1, 4)):
            rec[rng.randrange(len(rec))] = rng.randrange(256)
        r.feed(bytes(rec))
        assert r.buffered <= r.max_buffered
    for _ in range(500):
        r.feed(bytes(rng.randrange(256) for _ in range(rng.randint(0, 60))))
    assert feed_all(r, encode({"t": "ping", "id": 1, "pad": "x" * 2000}, 400))[-1]["id"] == 1


def test_a_shared_stats_object_counts_every_session() -> None:
    stats = FragStats()
    a, b = Reassembler(stats=stats), Reassembler(stats=stats)
    feed_all(a, encode(big_message(), 600))
    feed_all(b, encode(big_message(), 600))
    b.feed(b"junk")
    assert stats.reassembled == 2 and stats.malformed == 1
    assert stats.to_dict()["reassembled"] == 2


# ------------------------------------------------------------------ over DTLS


def _dtls_pair(tmp_path: Path, mtu: int) -> tuple[DtlsSession, DtlsSession]:
    pki.create_ca(tmp_path / "ca", "acme")
    files = {}
    for n in (1, 2):
        pki.issue_site(tmp_path / "ca", n, tmp_path / "sites")
        files[n] = (tmp_path / "ca" / "ca.pem", tmp_path / "sites" / f"site-{n}.pem",
                    tmp_path / "sites" / f"site-{n}.key")
    client = DtlsContext(*files[2], 2).client(1, mtu=mtu)
    server_ctx = DtlsContext(*files[1], 1)
    server: DtlsSession | None = None
    to_server = client.start()
    for _ in range(20):
        to_client: list[bytes] = []
        for d in to_server:
            if server is None:
                res = server_ctx.accept(d, "198.51.100.2:4800", mtu=mtu)
                server = res.session
                to_client += res.replies
            else:
                to_client += server.receive(d)
        to_server = [x for d in to_client for x in client.receive(d)]
        if client.established and server is not None and server.established:
            break
    assert server is not None and client.established and server.established
    return client, server


@pytest.mark.parametrize("mtu", [576, 1200, 1400])
def test_over_real_dtls_sessions(tmp_path: Path, mtu: int) -> None:
    client, server = _dtls_pair(tmp_path, mtu)
    limit = record_limit(client)
    assert limit == client.conn.get_cleartext_mtu()
    assert mtu - 60 < limit <= mtu - 37
    msg = big_message()
    datagrams = [d for rec in encode(msg, limit) for d in client.send(rec)]
    assert all(len(d) <= mtu for d in datagrams)
    for d in datagrams:
        server.receive(d)
    r = Reassembler()
    assert feed_all(r, server.take_messages()) == [msg]


def test_record_limit_without_a_connection_uses_the_mtu() -> None:
    class Bare:
        mtu = 1200

    assert record_limit(Bare()) == 1200 - 37
    assert record_limit(object(), fallback_mtu=1400) == 1400 - 37


# ------------------------------------------------------------------ through PeerTunnel


def test_peer_tunnels_exchange_messages_larger_than_a_record(certs) -> None:  # noqa: F811
    net, a, b = pair(certs)
    got: list[dict[str, Any]] = []
    b.tunnels[2].on_app_message = lambda session, msg: got.append(msg)
    a.tunnels[1].keep_session = b.tunnels[2].keep_session = True  # messages, as the cloud's
    msg = big_message()
    assert a.tunnels[1].send_message(msg)
    net.pump()
    assert got == [msg]
    assert b.tunnels[2].frag_stats.reassembled == 1
    # Small messages and the key hand-over are unchanged: a rekey still works after it.
    net.run(70)
    assert a.tunnels[1].handshakes >= 2 and a.tunnels[1].state is State.UP
    assert b.tunnels[2].state is State.UP
    assert a.tunnels[1].send_message({"t": "hello"})
    net.pump()
    assert got[-1] == {"t": "hello"}


def test_a_partial_from_a_replaced_session_is_not_completed(certs) -> None:  # noqa: F811
    net, a, b = pair(certs)
    got: list[dict[str, Any]] = []
    b.tunnels[2].on_app_message = lambda session, msg: got.append(msg)
    a.tunnels[1].send_message(big_message())
    net.queue.pop()  # the last fragment is lost
    net.pump()
    assert got == [] and b.tunnels[2]._reassembler.pending == 1
    net.run(70)  # a rekey: b's new session starts with an empty reassembler
    assert a.tunnels[1].handshakes >= 2
    assert b.tunnels[2]._reassembler.pending == 0 and got == []


# ------------------------------------------------------------------ popd, 300 sites


def _account(n: int) -> str:
    out = ['[account]\nname = "big"\n']
    for i in range(1, n + 1):
        out.append(f'[[sites]]\nid = {i}\nname = "branch-{i}"\n'
                   f'subnets = ["10.{i >> 8}.{i & 255}.0/24"]\n')
    return "\n".join(out)


class FragClient(Client):
    """The popd test's site client, with the reassembly socketd does in PeerTunnel."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.reassembler = Reassembler()

    def _on_message(self, msg: dict[str, Any]) -> None:
        # Client.pump parsed the record already; turning it back into text is lossless here.
        whole = self.reassembler.feed(json.dumps(msg).encode())
        if whole is not None:
            super()._on_message(whole)

    def send(self, msg: dict[str, Any]) -> None:
        for rec in encode(msg, record_limit(self.session)):
            self.send_raw(rec)

    def send_raw(self, record: bytes) -> None:
        for d in self.session.send(record):
            self.raw(d)


def test_popd_sends_the_directory_of_300_sites(pop: PopEnv, clients: list[Client]) -> None:  # noqa: F811
    pop.account.write_text(_account(300))
    rc, out = pop.popctl("reload")
    assert rc == 0, out

    a = FragClient(pop.site_files(1), 1, pop.addr)
    clients.append(a)
    a.connect()
    welcome = a.register()
    directory = welcome["directory"]
    assert [e["site_id"] for e in directory] == list(range(2, 301))
    assert directory[-1] == {"site_id": 300, "name": "branch-300", "subnets": ["10.1.44.0/24"],
                             "links": [], "offcloud": False, "recovery": False, "online": False}
    assert welcome["config"]["name"] == "branch-1"
    assert a.reassembler.stats.reassembled >= 1
    assert len(json.dumps(welcome)) > 10 * 1400

    # A second site comes online: it gets the whole directory (in fragments too), the first
    # only the difference; asking with a stale rev brings the whole one, in fragments.
    b = FragClient(pop.site_files(2), 2, pop.addr)
    clients.append(b)
    b.connect()
    assert len(b.register()["directory"]) == 299
    push = a.wait_for("directory-delta")
    assert [e["site_id"] for e in push["changed"]] == [2] and push["changed"][0]["online"]
    # Still on the welcome's rev well after the push (docs/popd.md: not a ping in flight).
    time.sleep(DELTA_IN_FLIGHT_S)
    a.send({"t": "ping", "id": 1, "rev": welcome["rev"]})
    whole = a.wait_for("directory")
    assert len(whole["directory"]) == 299 and whole["rev"] == push["rev"]

    # Uploads larger than a record reach popd too: 20 events of ~900 bytes each. (Much larger
    # bursts outrun the default UDP receive buffer; DTLS does not resend application data.)
    events = [{"seq": i, "at": 1700000000.0 + i, "kind": "tunnel.up", "text": "t" * 900,
               "data": {"i": i}} for i in range(1, 21)]
    a.send({"t": "events", "events": events})
    assert a.wait_for("events-ack")["up_to"] == 20
    st = pop.status()["control"]
    assert st["events_stored"] == 20
    assert st["messages_reassembled"] >= 1 and st["messages_malformed"] == 0

    # A fragment flood that never completes is bounded and does not hurt the session.
    for k in range(50):
        a.send_raw(frag(1000 + k, 0, 4000, "x" * 1000))
    a.send({"t": "ping", "id": 9})
    assert a.wait_for("pong", id=9)
    st = pop.status()["control"]
    assert st["oversized"] == 0 and st["fragments_evicted"] >= 40
