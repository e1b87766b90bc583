"""STUN codec, reflector and client logic: RFC 5769 vectors, strict parsing, a fuzz loop,
the RFC 8489 retransmission schedule, rate limiting, and server + client over loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdwan.common import stun
from sdwan.common.stun import (
    BINDING_ERROR,
    BINDING_INDICATION,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    Endpoint,
    Message,
    StunError,
    StunServer,
    StunServerConfig,
    StunTransaction,
    StunTransactionFailed,
)

# RFC 5769 section 2: every sample uses this transaction id and password.
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 2.1: a Binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
# MESSAGE-INTEGRITY and FINGERPRINT.
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010"
    "5354554e207465737420636c69656e74"
    "00240004"
    "6e0001ff"
    "80290008"
    "932ff9b151263b36"
    "00060009"
    "6576746a3a68367659202020"
    "00080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004"
    "e57a3bcf"
)
# RFC 5769 2.2: Binding success, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
SAMPLE_V4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b"
    "7465737420766563746f7220"
    "00200008"
    "0001a147e112a643"
    "00080014"
    "2b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004"
    "c07d4c96"
)
# RFC 5769 2.3: Binding success, XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853.
SAMPLE_V6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b"
    "7465737420766563746f7220"
    "00200014"
    "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014"
    "a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004"
    "c8fb0b4c"
)
VECTORS = [SAMPLE_REQUEST, SAMPLE_V4_RESPONSE, SAMPLE_V6_RESPONSE]


def integrity_ok(data: bytes, key: bytes) -> bool:
    """RFC 8489 14.5 check of MESSAGE-INTEGRITY (the module parses over it, tests verify it)."""
    pos = 20
    while pos < len(data):
        atype, alen = struct.unpack_from("!HH", data, pos)
        if atype == stun.MESSAGE_INTEGRITY:
            # The length field covers the message up to and including MESSAGE-INTEGRITY.
            head = data[:2] + struct.pack("!H", pos + 24 - 20) + data[4:20]
            mac = hmac.new(key, head + data[20:pos], hashlib.sha1).digest()
            return mac == data[pos + 4 : pos + 24]
        pos += 4 + alen + (-alen % 4)
    return False


# ----------------------------------------------------------------------------- RFC 5769


def test_vectors_are_what_the_rfc_prints() -> None:
    # Proves the transcription: the HMAC keyed with the RFC's password must match.
    for v in VECTORS:
        assert integrity_ok(v, PASSWORD)
    assert len(SAMPLE_REQUEST) == 20 + 0x58


def test_sample_request() -> None:
    msg = stun.parse(SAMPLE_REQUEST)
    assert msg.msg_type == BINDING_REQUEST
    assert (msg.method, msg.cls) == (stun.BINDING, stun.REQUEST)
    assert msg.transaction_id == TID
    assert msg.had_fingerprint
    assert msg.software == "STUN test client"
    assert msg.get(stun.USERNAME) == b"evtj:h6vY"
    assert len(msg.get(stun.MESSAGE_INTEGRITY) or b"") == 20
    # PRIORITY (ICE) is comprehension-required and not ours; ICE-CONTROLLED is optional.
    assert msg.unknown_required() == [0x0024]
    assert stun.is_stun(SAMPLE_REQUEST)


def test_sample_ipv4_response() -> None:
    msg = stun.parse(SAMPLE_V4_RESPONSE)
    assert msg.msg_type == BINDING_SUCCESS
    assert msg.had_fingerprint
    assert msg.software == "test vector"  # the 12th byte, a space, is padding
    assert msg.xor_mapped_address == Endpoint("192.0.2.1", 32853)
    assert msg.unknown_required() == []
    # Our encoder produces the RFC's attribute bytes for the same mapping.
    ours = stun.binding_success(msg, ("192.0.2.1", 32853), software=None).encode()
    assert ours[20:32] == bytes.fromhex("002000080001a147e112a643")


def test_sample_ipv6_response() -> None:
    msg = stun.parse(SAMPLE_V6_RESPONSE)
    assert msg.had_fingerprint
    assert msg.xor_mapped_address == Endpoint("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    ours = stun.binding_success(
        msg, ("2001:db8:1234:5678:11:2233:4455:6677", 32853), software=None
    ).encode()
    assert ours[20:44] == SAMPLE_V6_RESPONSE[36:60]


def test_vector_fingerprints_are_recomputed() -> None:
    for v in VECTORS:
        assert struct.unpack("!I", v[-4:])[0] == stun.fingerprint(v[:-8])


@pytest.mark.parametrize("vector", VECTORS)
def test_vector_with_a_flipped_bit_fails_the_fingerprint(vector: bytes) -> None:
    for pos in (8, 25, len(vector) - 12, len(vector) - 1):
        bad = bytearray(vector)
        bad[pos] ^= 0x10
        with pytest.raises(StunError) as e:
            stun.parse(bytes(bad))
        assert e.value.reason == "bad-fingerprint"


def test_transaction_accepts_the_sample_responses() -> None:
    for vector, want in (
        (SAMPLE_V4_RESPONSE, Endpoint("192.0.2.1", 32853)),
        (SAMPLE_V6_RESPONSE, Endpoint("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ):
        tx = StunTransaction(("198.51.100.1", 3478), transaction_id=TID)
        tx.start(now=0)
        assert tx.handle(vector, ("198.51.100.1", 3478)) == want
        assert tx.done and tx.result == want and tx.error is None
        assert tx.next_timeout() is None


def test_server_answers_the_sample_request_with_420() -> None:
    srv = StunServer()
    reply = srv.handle(SAMPLE_REQUEST, ("192.0.2.1", 32853))
    assert reply is not None
    msg = stun.parse(reply)
    assert msg.msg_type == BINDING_ERROR and msg.transaction_id == TID
    assert msg.error == (420, "Unknown Attribute")
    assert msg.unknown_attributes == [0x0024]
    assert msg.had_fingerprint and msg.software == "sdwan-pop"
    assert srv.stats.errors_sent == 1 and srv.stats.answers == 0


# ----------------------------------------------------------------------------- codec


def test_message_type_bits() -> None:
    assert (BINDING_REQUEST, BINDING_INDICATION, BINDING_SUCCESS, BINDING_ERROR) == (
        0x0001,
        0x0011,
        0x0101,
        0x0111,
    )
    for method in range(0x1000):
        for cls in range(4):
            t = stun.message_type(method, cls)
            assert t < 0x4000
            assert stun.split_type(t) == (method, cls)


@pytest.mark.parametrize(
    "ep",
    [
        Endpoint("203.0.113.7", 4800),
        Endpoint("0.0.0.0", 0),
        Endpoint("255.255.255.255", 65535),
        Endpoint("2001:db8::1", 50000),
        Endpoint("::", 1),
    ],
)
def test_round_trip_success(ep: Endpoint) -> None:
    req = stun.parse(stun.binding_request().encode())
    assert req.had_fingerprint and req.software == stun.CLIENT_SOFTWARE
    wire = stun.binding_success(req, ep).encode()
    assert stun.is_stun(wire)
    msg = stun.parse(wire)
    assert msg.transaction_id == req.transaction_id
    assert msg.xor_mapped_address == ep
    assert msg.mapped_address is None
    assert msg.software == "sdwan-pop"


def test_round_trip_error_and_attributes_padding() -> None:
    req = stun.binding_request(software=None)
    wire = stun.binding_error(req, 420, unknown=[0x7F01, 0x0024, 0x0003]).encode()
    assert len(wire) % 4 == 0
    msg = stun.parse(wire)
    assert msg.error == (420, "Unknown Attribute")
    assert msg.unknown_attributes == [0x7F01, 0x0024, 0x0003]
    odd = Message(BINDING_REQUEST, TID).add(stun.SOFTWARE, b"abcde").add(0x8055, b"x")
    back = stun.parse(odd.encode())
    assert [a.value for a in back.attributes] == [b"abcde", b"x"]


def test_ipv4_mapped_source_gets_an_ipv4_answer() -> None:
    srv = StunServer()
    req = stun.binding_request().encode()
    reply = srv.handle(req, ("::ffff:198.51.100.11", 4800))
    assert reply is not None
    assert stun.parse(reply).xor_mapped_address == Endpoint("198.51.100.11", 4800)


def test_message_integrity_ends_the_attributes() -> None:
    msg = Message(BINDING_SUCCESS, TID)
    msg.add(stun.MESSAGE_INTEGRITY, bytes(20))
    msg.add(
        stun.XOR_MAPPED_ADDRESS, stun.encode_address(("192.0.2.1", 1), b"\x21\x12\xa4\x42" + TID)
    )
    parsed = stun.parse(msg.encode())
    # Attributes after MESSAGE-INTEGRITY (but FINGERPRINT) are ignored, RFC 8489 14.5.
    assert parsed.xor_mapped_address is None
    assert [a.type for a in parsed.attributes] == [stun.MESSAGE_INTEGRITY]


def _framed(body: bytes, msg_type: int = BINDING_SUCCESS, cookie: int = stun.MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI", msg_type, len(body), cookie) + TID + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (bytes(19), "short"),
        (b"\x40" + bytes(19), "not-stun"),
        (b"\xd0" + bytes(30), "not-stun"),  # a data packet
        (b"\x16\xfe\xfd" + bytes(30), "bad-cookie"),  # DTLS: top bits zero, no cookie
        (_framed(b"", cookie=0x12345678), "bad-cookie"),
        (struct.pack("!HHI", 1, 2, stun.MAGIC_COOKIE) + TID + b"ab", "bad-length"),
        (struct.pack("!HHI", 1, 8, stun.MAGIC_COOKIE) + TID + bytes(4), "bad-length"),
        (_framed(b"") + bytes(4), "bad-length"),
        (_framed(b"\x80\x22\x00\x08abcd"), "attr-truncated"),
        (_framed(b"\x80\x22\x00\x05abcd"), "attr-truncated"),
        (_framed(b"\x00\x20\x00\x04\x00\x03\x00\x00"), "bad-address"),
        (_framed(b"\x00\x20\x00\x08\x00\x02\x00\x00\x00\x00\x00\x00"), "bad-address"),
        (_framed(b"\x00\x01\x00\x14\x00\x01" + bytes(18)), "bad-address"),
        (_framed(b"\x00\x01\x00\x02\x00\x01\x00\x00"), "bad-address"),
        (_framed(b"\x00\x09\x00\x04\x00\x00\x02\x00"), "bad-attribute"),
        (_framed(b"\x00\x09\x00\x04\x00\x00\x04\x64"), "bad-attribute"),
        (_framed(b"\x00\x09\x00\x02\x00\x00\x00\x00"), "bad-attribute"),
        (_framed(b"\x80\x22\x00\x02\xff\xfe\x00\x00"), "bad-attribute"),
        (_framed(b"\x00\x0a\x00\x03\x00\x01\x00\x00"), "bad-attribute"),
        (_framed(b"\x00\x08\x00\x04\x00\x00\x00\x00"), "bad-attribute"),
        (_framed(b"\x80\x28\x00\x08" + bytes(8)), "bad-attribute"),
        (_framed(b"\x80\x28\x00\x04" + bytes(4) + b"\x80\x22\x00\x00"), "fingerprint-not-last"),
        (_framed(b"\x80\x28\x00\x04" + bytes(4)), "bad-fingerprint"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(StunError) as e:
        stun.parse(data)
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError)


def test_classic_messages_only_when_allowed() -> None:
    classic_id = bytes(range(16))
    data = struct.pack("!HH", BINDING_REQUEST, 8) + classic_id + b"\x00\x03\x00\x04" + bytes(4)
    assert not stun.is_stun(data)
    with pytest.raises(StunError):
        stun.parse(data)
    msg = stun.parse(data, allow_classic=True)
    assert msg.classic and msg.cookie == 0x00010203 and msg.transaction_id == classic_id[4:]
    reply = StunServer().handle(data, ("198.51.100.11", 1234))
    assert reply is not None
    # The answer echoes the whole 128-bit id, carries MAPPED-ADDRESS and no FINGERPRINT.
    assert reply[4:20] == classic_id
    back = stun.parse(reply, allow_classic=True)
    assert back.mapped_address == Endpoint("198.51.100.11", 1234)
    assert back.get(stun.XOR_MAPPED_ADDRESS) is None and not back.had_fingerprint
    assert all(len(a.value) % 4 == 0 for a in back.attributes)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (stun.binding_request(bytes(range(12))).encode(), True),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), True),
        (b"\x16\xfe\xfd" + bytes(40), False),  # DTLS record
        (b"\xd0" + bytes(40), False),  # data packet
        (b"\xd2" + bytes(11), False),  # kick
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12), False),  # length beyond the end
        (b"\x00\x01\x00\x02\x21\x12\xa4\x42" + bytes(14), False),  # length not a multiple of 4
        (b"\x00\x01\x00\x00\x21\x12\xa4\x43" + bytes(12), False),  # wrong cookie
        (b"", False),
    ],
)
def test_is_stun(data: bytes, expected: bool) -> None:
    assert stun.is_stun(data) is expected


# ----------------------------------------------------------------------------- fuzz


def _mutations(rng: random.Random) -> Iterator[bytes]:
    good = [*VECTORS, stun.binding_request().encode()]
    good.append(stun.binding_success(stun.parse(good[-1]), ("2001:db8::7", 9)).encode())
    good.append(stun.binding_error(stun.parse(good[-2]), 420, unknown=[0x0024]).encode())
    for _ in range(6000):
        base = rng.choice(good)
        kind = rng.randrange(6)
        if kind == 0:
            yield os.urandom(rng.randrange(0, 80))
        elif kind == 1:
            yield base[: rng.randrange(len(base) + 1)]
        elif kind == 2:
            b = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield bytes(b)
        elif kind == 3:
            # Keep the header valid and the length consistent so the attribute walk runs.
            body = os.urandom(rng.randrange(0, 16) * 4)
            yield _framed(body, msg_type=rng.choice([1, 0x101, 0x111, 0x11]))
        elif kind == 4:
            # Well-framed attributes of known types with random values, then a valid
            # FINGERPRINT, so the value decoders themselves get exercised.
            m = Message(rng.choice([BINDING_REQUEST, BINDING_SUCCESS, BINDING_ERROR]), TID)
            for _ in range(rng.randrange(1, 5)):
                t = rng.choice(
                    [0x0001, 0x0003, 0x0009, 0x000A, 0x0020, 0x8022, 0x0008, 0x001C, 0x802C]
                )
                m.add(t, os.urandom(rng.choice([0, 1, 2, 3, 4, 8, 20, 21, 24, 800])))
            yield m.encode()
        else:
            b = bytearray(base)
            pos = rng.randrange(20, len(b) - 3) if len(b) > 24 else 20
            if pos + 4 <= len(b):
                b[pos + 2 : pos + 4] = struct.pack("!H", rng.randrange(0, 0x10000))
            yield bytes(b)


def test_fuzz_only_stun_errors() -> None:
    rng = random.Random(8489)
    srv = StunServer(StunServerConfig(rate_per_s=1e9, burst=1e9))
    parsed = 0
    for data in _mutations(rng):
        try:
            msg = stun.parse(data, allow_classic=rng.random() < 0.5)
        except StunError as e:
            assert e.reason
            msg = None
        if msg is not None:
            parsed += 1
            # Accessors may raise only StunError too (parse already validated known values).
            for getter in ("xor_mapped_address", "mapped_address", "software", "error"):
                getattr(msg, getter)
            assert isinstance(msg.unknown_attributes, list)
            msg.encode()
        stun.is_stun(data)
        reply = srv.handle(data, ("198.51.100.9", 7))
        if reply is not None:
            stun.parse(reply, allow_classic=True)
        tx = StunTransaction(("198.51.100.1", 3478), transaction_id=data[8:20].ljust(12, b"\0"))
        tx.start(now=0)
        tx.handle(data, ("198.51.100.1", 3478))
    assert parsed > 100
    assert srv.stats.received == 6000
    assert "internal-error" not in srv.stats.dropped


# ----------------------------------------------------------------------------- client logic


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_retransmission_schedule_rfc8489() -> None:
    clock = Clock()
    tx = StunTransaction(("203.0.113.10", 3478), clock=clock)
    first = tx.start()
    assert first == tx.request and stun.parse(first).msg_type == BINDING_REQUEST
    sends = [0.0]
    while True:
        due = tx.next_timeout()
        if due is None:
            break
        # Nothing happens before the deadline.
        assert tx.on_timeout(clock.t + due / 2) is None or due == 0
        clock.t += due
        out = tx.on_timeout()
        if out is not None:
            assert out == first  # same transaction id on every retransmission
            sends.append(clock.t - 100.0)
    # RFC 8489 6.2.1: RTO 500 ms, Rc = 7, Rm = 16 -> fails 39.5 s after the first send.
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert clock.t - 100.0 == pytest.approx(39.5)
    assert tx.done and tx.result is None
    assert tx.error is not None and "timeout" in tx.error and "7 requests" in tx.error


def test_retransmission_schedule_is_configurable() -> None:
    clock = Clock()
    tx = StunTransaction(None, rto=0.1, rc=3, rm=4, clock=clock)
    tx.start()
    times = []
    while (due := tx.next_timeout()) is not None:
        clock.t += due
        if tx.on_timeout() is not None:
            times.append(round(clock.t - 100.0, 6))
    assert times == [0.1, 0.3]
    assert round(clock.t - 100.0, 6) == 0.7


def test_transaction_ignores_what_is_not_its_answer() -> None:
    server = ("203.0.113.10", 3478)
    tx = StunTransaction(server)
    tx.start(now=0)
    req = stun.parse(tx.request)
    other = stun.binding_request()
    answer = stun.binding_success(req, ("198.51.100.11", 4800)).encode()
    assert tx.handle(b"\xd0" + bytes(40), server) is None
    assert tx.handle(stun.binding_success(other, ("1.2.3.4", 5)).encode(), server) is None
    assert tx.handle(answer, ("203.0.113.11", 3478)) is None  # not from the server
    assert tx.handle(answer[:-1] + bytes([answer[-1] ^ 1]), server) is None  # bad FINGERPRINT
    assert tx.handle(tx.request, server) is None  # a request, not a response
    assert not tx.done
    assert tx.handle(answer, ("::ffff:203.0.113.10", 3478)) == Endpoint("198.51.100.11", 4800)
    assert tx.handle(answer, server) is None  # already done


def test_transaction_accepts_mapped_address_from_old_servers() -> None:
    tx = StunTransaction()
    tx.start(now=0)
    msg = Message(BINDING_SUCCESS, tx.transaction_id)
    msg.add(stun.MAPPED_ADDRESS, stun.encode_address(("198.51.100.12", 61000)))
    assert tx.handle(msg.encode(with_fingerprint=False)) == Endpoint("198.51.100.12", 61000)


def test_transaction_failures_have_reasons() -> None:
    tx = StunTransaction()
    tx.start(now=0)
    req = stun.parse(tx.request)
    assert tx.handle(stun.binding_error(req, 420, unknown=[0x7777]).encode()) is None
    assert (
        tx.done and tx.error == "error response 420 Unknown Attribute (unknown attributes 0x7777)"
    )
    assert tx.on_timeout(now=1000) is None and tx.next_timeout() is None

    tx = StunTransaction()
    tx.start(now=0)
    assert tx.handle(Message(BINDING_SUCCESS, tx.transaction_id).encode()) is None
    assert tx.error == "success response without (XOR-)MAPPED-ADDRESS"

    tx = StunTransaction()
    tx.start(now=0)
    msg = stun.binding_success(stun.parse(tx.request), ("1.2.3.4", 5)).add(0x7ABC, b"")
    assert tx.handle(msg.encode()) is None
    assert tx.error == "success response with unknown attributes 0x7abc"


# ----------------------------------------------------------------------------- server logic


def test_rate_limit_per_source() -> None:
    clock = Clock()
    srv = StunServer(StunServerConfig(rate_per_s=50, burst=50), clock=clock)
    req = stun.binding_request().encode()
    answered = sum(srv.handle(req, ("198.51.100.11", 4800)) is not None for _ in range(200))
    assert answered == 50
    assert srv.stats.dropped["rate-limited"] == 150
    # Another source has its own bucket; another port of the same address does not.
    assert srv.handle(req, ("198.51.100.12", 4800)) is not None
    assert srv.handle(req, ("198.51.100.11", 4801)) is None
    clock.t += 0.5
    answered = sum(srv.handle(req, ("198.51.100.11", 4800)) is not None for _ in range(100))
    assert answered == 25
    clock.t += 10
    answered = sum(srv.handle(req, ("198.51.100.11", 4800)) is not None for _ in range(100))
    assert answered == 50
    assert srv.stats.answers == 50 + 1 + 25 + 50


def test_rate_limit_table_is_bounded() -> None:
    buckets = stun.TokenBuckets(rate=10, burst=5, max_keys=100)
    for i in range(100):
        assert buckets.allow(f"k{i}", now=0)
    # Full of fresh buckets: a newcomer is refused instead of growing the table.
    assert not buckets.allow("new", now=0.01)
    assert len(buckets) == 100
    # Once the old buckets have refilled they are forgotten and there is room again.
    assert buckets.allow("new", now=10)
    assert len(buckets) == 1


def test_server_drops_and_counts() -> None:
    srv = StunServer()
    req = stun.binding_request()
    resp = stun.binding_success(req, ("1.2.3.4", 5)).encode()
    ind = Message(BINDING_INDICATION, stun.new_transaction_id()).encode()
    other_method = Message(stun.message_type(0x003, stun.REQUEST), TID).encode()
    junk = (b"junk", bytes(40), resp, ind, other_method, b"\x00\x01\x00\x00" + bytes(15))
    for data in junk:
        assert srv.handle(data, ("198.51.100.11", 4800)) is None
    assert srv.handle(req.encode(), ("198.51.100.11", 0)) is None
    assert srv.stats.dropped == {
        "short": 2,
        "bad-length": 1,
        "not-a-request": 1,
        "unknown-method": 1,
        "bad-source": 1,
    }
    assert srv.stats.indications == 1
    assert srv.stats.requests == 0 and srv.stats.answers == 0
    assert srv.stats.received == 7


def test_change_request_without_flags_is_answered_with_flags_is_420() -> None:
    srv = StunServer()
    req = stun.binding_request(software=None).add(stun.CHANGE_REQUEST, bytes(4))
    reply = stun.parse(srv.handle(req.encode(), ("198.51.100.11", 4800)) or b"")
    assert reply.xor_mapped_address == Endpoint("198.51.100.11", 4800)
    req = stun.binding_request(software=None).add(stun.CHANGE_REQUEST, b"\0\0\0\x06")
    reply = stun.parse(srv.handle(req.encode(), ("198.51.100.11", 4800)) or b"")
    assert reply.error == (420, "Unknown Attribute")
    assert reply.unknown_attributes == [stun.CHANGE_REQUEST]


# ----------------------------------------------------------------------------- over loopback


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_server_and_query_over_loopback(family: int) -> None:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def scenario() -> None:
        transport, srv = await stun.start_server((host, 0))
        addr = transport.get_extra_info("sockname")[:2]
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((host, 0))
                ep = await asyncio.to_thread(stun.query, s, addr, 5.0)
                assert ep == Endpoint(host, s.getsockname()[1])
                # Garbage does not hurt the server; it still answers afterwards.
                for junk in (b"", b"\x00", os.urandom(100), SAMPLE_V4_RESPONSE, bytes(2000)):
                    s.sendto(junk, addr)
                ep2 = await asyncio.to_thread(stun.query, s, addr, 5.0)
                assert ep2 == ep
                # An unknown comprehension-required attribute: a 420 naming it.
                msg = stun.binding_request().add(0x7F01, b"what")
                s.sendto(msg.encode(), addr)
                s.settimeout(5)
                data, _ = await asyncio.to_thread(s.recvfrom, 4096)
                reply = stun.parse(data)
                assert reply.msg_type == BINDING_ERROR
                assert reply.error == (420, "Unknown Attribute")
                assert reply.unknown_attributes == [0x7F01]
            assert srv.stats.answers == 2 and srv.stats.errors_sent == 1
            assert sum(srv.stats.dropped.values()) == 5
        finally:
            transport.close()

    _run(scenario)


def test_query_timeout_and_error_response() -> None:
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                with pytest.raises(StunTransactionFailed, match="timeout"):
                    await asyncio.to_thread(stun.query, s, silent.getsockname(), 0.8, 0.1)
                # The retransmissions reached the silent server: 0, 0.1, 0.3, 0.7 s.
                silent.settimeout(0.1)
                got = 0
                try:
                    while True:
                        silent.recvfrom(100)
                        got += 1
                except TimeoutError:
                    pass
                assert got == 4

    _run(scenario)


def test_rate_limit_over_loopback() -> None:
    async def scenario() -> None:
        transport, srv = await stun.start_server(
            ("127.0.0.1", 0), StunServerConfig(rate_per_s=10, burst=10)
        )
        addr = transport.get_extra_info("sockname")[:2]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                for _ in range(100):
                    s.sendto(stun.binding_request().encode(), addr)
                await asyncio.sleep(0.3)
                s.setblocking(False)
                answers = 0
                while True:
                    try:
                        s.recvfrom(4096)
                        answers += 1
                    except BlockingIOError:
                        break
            # 10 from the bucket plus at most a few refilled while the burst was sent.
            assert 10 <= answers <= 14
            assert srv.stats.dropped["rate-limited"] == 100 - answers
        finally:
            transport.close()

    _run(scenario)


def test_cli_serve_and_query(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = (
        str(Path(stun.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    srv = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdwan.common.stun",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert line.startswith("stun: listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        cp = subprocess.run(
            [
                sys.executable,
                "-m",
                "sdwan.common.stun",
                "query",
                f"127.0.0.1:{port}",
                "--json",
                "--bind",
                "127.0.0.1:0",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
        )
        assert cp.returncode == 0, cp.stderr
        out = json.loads(cp.stdout)
        assert out["ip"] == "127.0.0.1" and out["local"] == out["mapped"]
        srv.terminate()
        rest = srv.communicate(timeout=10)[0]
        stats = json.loads(rest.split("stun: stats ", 1)[1])
        assert stats["answers"] == 1 and srv.returncode == 0
        bad = subprocess.run(
            [sys.executable, "-m", "sdwan.common.stun", "query", "127.0.0.1:99999"],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
        )
        assert bad.returncode == 2 and "bad address" in bad.stderr
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1.2.3.4:5", ("1.2.3.4", 5)),
        ("1.2.3.4", ("1.2.3.4", 3478)),
        ("[::1]:99", ("::1", 99)),
        ("[::1]", ("::1", 3478)),
        ("::1", ("::1", 3478)),
        ("stun.example:3479", ("stun.example", 3479)),
    ],
)
def test_parse_hostport(text: str, want: tuple[str, int]) -> None:
    assert stun.parse_hostport(text) == want


@pytest.mark.parametrize("text", ["[::1", "[::1]x", ":5", "a:70000", "a:b"])
def test_parse_hostport_errors(text: str) -> None:
    with pytest.raises(ValueError):
        stun.parse_hostport(text)
