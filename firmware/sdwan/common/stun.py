"""STUN (RFC 8489) for learning a link's public endpoint: codec, reflector server, client logic.

This module owns three things:

* the wire codec (`Message`, `parse`, `is_stun`): header, attributes with 4-byte padding,
  Binding request / success / error, XOR-MAPPED-ADDRESS, MAPPED-ADDRESS (read, for RFC 3489
  servers), SOFTWARE, FINGERPRINT (added to what we send, verified when present),
  ERROR-CODE and UNKNOWN-ATTRIBUTES. Parsing is strict: every length is checked and any
  malformed input raises `StunError` (a ValueError) carrying a short reason code.
* `StunServer`, an asyncio datagram protocol answering Binding requests with the source it
  saw, rate-limited per source address so it cannot be used as an amplifier;
  ``python -m sdwan.common.stun serve --listen 0.0.0.0:3478`` runs it on its own.
* `StunTransaction`, sans-I/O client logic (request bytes, response matching, the RFC 8489
  retransmission schedule) because the socket that must be mapped is a WAN link's socket
  owned by the C fast path; `query` drives it over a plain Python UDP socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, cast

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
HEADER_LEN = 20
TRANSACTION_ID_LEN = 12
DEFAULT_PORT = 3478
SERVER_SOFTWARE = "sdwan-pop"
CLIENT_SOFTWARE = "sdwan-socket"
# RFC 8489 caps SOFTWARE and reason phrases at 128 characters, i.e. at most 763 bytes.
MAX_TEXT_BYTES = 763

# Message classes (the C1/C0 bits).
REQUEST = 0
INDICATION = 1
SUCCESS = 2
ERROR = 3
BINDING = 0x001

# Attribute types.
MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C

# Comprehension-required attributes (< 0x8000) this implementation understands; any other
# one in a request earns a 420, in a response fails the transaction (RFC 8489 section 6.3).
# The authentication attributes are listed because we parse over them: the reflector does
# not authenticate Binding requests, so a client that adds them still gets its answer.
KNOWN_REQUIRED = frozenset(
    {
        MAPPED_ADDRESS,
        USERNAME,
        MESSAGE_INTEGRITY,
        ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        REALM,
        NONCE,
        MESSAGE_INTEGRITY_SHA256,
        PASSWORD_ALGORITHM,
        USERHASH,
        XOR_MAPPED_ADDRESS,
    }
)

_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02

ERROR_REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    420: "Unknown Attribute",
    438: "Stale Nonce",
    500: "Server Error",
}


class StunError(ValueError):
    """A datagram that is not a well-formed STUN message; `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Endpoint(NamedTuple):
    """An IP address (normalised text form) and a UDP port."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def message_type(method: int, cls: int) -> int:
    """The 14-bit message type: method bits M11..M0 interleaved with class bits C1 C0."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 1) << 4)
        | ((cls & 2) << 7)
    )


def split_type(msg_type: int) -> tuple[int, int]:
    """(method, class) of a message type."""
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    cls = ((msg_type >> 4) & 1) | ((msg_type >> 7) & 2)
    return method, cls


BINDING_REQUEST = message_type(BINDING, REQUEST)
BINDING_INDICATION = message_type(BINDING, INDICATION)
BINDING_SUCCESS = message_type(BINDING, SUCCESS)
BINDING_ERROR = message_type(BINDING, ERROR)


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def fingerprint(data: bytes) -> int:
    """FINGERPRINT value over data (everything before the attribute, length already final)."""
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def is_stun(datagram: bytes) -> bool:
    """Cheap demultiplexing test: top two bits zero, magic cookie, consistent length.

    Only RFC 5389/8489 messages qualify: on a link socket the cookie is what tells STUN from
    DTLS (first byte 20..63), data (208) and kicks (210) beyond the first byte.
    """
    if len(datagram) < HEADER_LEN or datagram[0] & 0xC0:
        return False
    length: int = struct.unpack_from("!H", datagram, 2)[0]
    cookie: int = struct.unpack_from("!I", datagram, 4)[0]
    return cookie == MAGIC_COOKIE and length % 4 == 0 and HEADER_LEN + length == len(datagram)


# ----------------------------------------------------------------------------- addresses


def _xor_key(transaction_id: bytes, cookie: int = MAGIC_COOKIE) -> bytes:
    return struct.pack("!I", cookie) + transaction_id


def encode_address(ep: Endpoint | tuple[str, int], xor_key: bytes | None = None) -> bytes:
    """MAPPED-ADDRESS value, or XOR-MAPPED-ADDRESS when xor_key (cookie + id) is given."""
    ip = ipaddress.ip_address(ep[0])
    port = ep[1]
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    raw = ip.packed
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key, strict=False))
    family = _FAMILY_V4 if ip.version == 4 else _FAMILY_V6
    return struct.pack("!BBH", 0, family, port) + raw


def decode_address(value: bytes, xor_key: bytes | None = None) -> Endpoint:
    """Decode a (XOR-)MAPPED-ADDRESS value; raises StunError if it is malformed."""
    if len(value) < 4:
        raise StunError("bad-address", f"address attribute of {len(value)} bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    want = {_FAMILY_V4: 8, _FAMILY_V6: 20}.get(family)
    if want is None:
        raise StunError("bad-address", f"unknown address family {family:#04x}")
    if len(value) != want:
        raise StunError("bad-address", f"family {family} address of {len(value)} bytes")
    raw = value[4:]
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key, strict=False))
    ip = ipaddress.IPv4Address(raw) if family == _FAMILY_V4 else ipaddress.IPv6Address(raw)
    return Endpoint(str(ip), port)


def _decode_text(value: bytes, what: str) -> str:
    if len(value) > MAX_TEXT_BYTES:
        raise StunError("bad-attribute", f"{what} of {len(value)} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StunError("bad-attribute", f"{what} is not UTF-8") from e


def _encode_text(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_TEXT_BYTES:
        raise ValueError(f"{what} longer than {MAX_TEXT_BYTES} bytes")
    return raw


def encode_error_code(code: int, reason: str | None = None) -> bytes:
    if not 300 <= code <= 699:
        raise ValueError(f"error code must be 300..699, got {code}")
    text = _encode_text(reason if reason is not None else ERROR_REASONS.get(code, ""), "reason")
    return struct.pack("!HBB", 0, code // 100, code % 100) + text


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("bad-attribute", f"ERROR-CODE of {len(value)} bytes")
    cls, number = value[2] & 0x07, value[3]
    if not 3 <= cls <= 6 or number > 99:
        raise StunError("bad-attribute", f"ERROR-CODE class {cls} number {number}")
    return cls * 100 + number, _decode_text(value[4:], "ERROR-CODE reason")


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) % 2:
        raise StunError("bad-attribute", f"UNKNOWN-ATTRIBUTES of odd length {len(value)}")
    return [t for (t,) in struct.iter_unpack("!H", value)]


# ----------------------------------------------------------------------------- messages


@dataclass
class Attribute:
    type: int
    value: bytes


@dataclass
class Message:
    """A STUN message. cookie != MAGIC_COOKIE only for RFC 3489 requests (see `parse`)."""

    msg_type: int
    transaction_id: bytes
    attributes: list[Attribute] = field(default_factory=list)
    cookie: int = MAGIC_COOKIE
    # Set by parse when a FINGERPRINT was present (parse has verified it by then).
    had_fingerprint: bool = False

    def __post_init__(self) -> None:
        if len(self.transaction_id) != TRANSACTION_ID_LEN:
            raise ValueError(f"transaction id must be {TRANSACTION_ID_LEN} bytes")
        if not 0 <= self.msg_type < 0x4000:
            raise ValueError(f"message type {self.msg_type:#x} does not fit 14 bits")

    @property
    def method(self) -> int:
        return split_type(self.msg_type)[0]

    @property
    def cls(self) -> int:
        return split_type(self.msg_type)[1]

    @property
    def classic(self) -> bool:
        """An RFC 3489 message: no magic cookie, so no XOR-MAPPED-ADDRESS and no FINGERPRINT."""
        return self.cookie != MAGIC_COOKIE

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of that type (RFC 8489 ignores repeats)."""
        for a in self.attributes:
            if a.type == attr_type:
                return a.value
        return None

    def add(self, attr_type: int, value: bytes) -> Message:
        if not 0 <= attr_type <= 0xFFFF or len(value) > 0xFFFF:
            raise ValueError("attribute type or length out of range")
        self.attributes.append(Attribute(attr_type, value))
        return self

    def unknown_required(self) -> list[int]:
        """Comprehension-required attribute types we do not understand, in order, no repeats."""
        seen: list[int] = []
        for a in self.attributes:
            if a.type < 0x8000 and a.type not in KNOWN_REQUIRED and a.type not in seen:
                seen.append(a.type)
        return seen

    @property
    def xor_mapped_address(self) -> Endpoint | None:
        v = self.get(XOR_MAPPED_ADDRESS)
        if v is None or self.classic:
            return None
        return decode_address(v, _xor_key(self.transaction_id, self.cookie))

    @property
    def mapped_address(self) -> Endpoint | None:
        v = self.get(MAPPED_ADDRESS)
        return None if v is None else decode_address(v)

    @property
    def software(self) -> str | None:
        v = self.get(SOFTWARE)
        return None if v is None else _decode_text(v, "SOFTWARE")

    @property
    def error(self) -> tuple[int, str] | None:
        v = self.get(ERROR_CODE)
        return None if v is None else decode_error_code(v)

    @property
    def unknown_attributes(self) -> list[int]:
        v = self.get(UNKNOWN_ATTRIBUTES)
        return [] if v is None else decode_unknown_attributes(v)

    def encode(self, with_fingerprint: bool | None = None) -> bytes:
        """Wire bytes; FINGERPRINT is appended unless disabled (never to classic messages).

        An existing FINGERPRINT attribute in `attributes` is dropped and recomputed.
        """
        if with_fingerprint is None:
            with_fingerprint = not self.classic
        body = bytearray()
        for a in self.attributes:
            if a.type == FINGERPRINT:
                continue
            body += struct.pack("!HH", a.type, len(a.value)) + a.value + b"\0" * _pad(len(a.value))
        fp_len = 8 if with_fingerprint else 0
        if len(body) + fp_len > 0xFFFF:
            raise ValueError("STUN message longer than 65535 bytes")
        head = struct.pack("!HHI", self.msg_type, len(body) + fp_len, self.cookie)
        out = head + self.transaction_id + bytes(body)
        if with_fingerprint:
            out += struct.pack("!HHI", FINGERPRINT, 4, fingerprint(out))
        return out


def parse(data: bytes, allow_classic: bool = False) -> Message:
    """Parse one datagram strictly; raise StunError (with a reason code) if it is malformed.

    allow_classic accepts RFC 3489 messages (no magic cookie: the first 4 bytes of their
    128-bit transaction id land in `cookie`); a server answers those with MAPPED-ADDRESS.
    Known attributes are decoded here so a bad value fails now, not in a later accessor.
    """
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise StunError("short", f"{len(data)} bytes is shorter than the 20-byte header")
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    if msg_type & 0xC000:
        raise StunError("not-stun", "first two bits are not zero")
    if cookie != MAGIC_COOKIE and not allow_classic:
        raise StunError("bad-cookie", f"magic cookie {cookie:#010x}")
    if length % 4:
        raise StunError("bad-length", f"message length {length} is not a multiple of 4")
    if HEADER_LEN + length != len(data):
        raise StunError(
            "bad-length",
            f"header says {length} bytes of attributes, datagram has {len(data) - HEADER_LEN}",
        )
    msg = Message(msg_type, data[8:HEADER_LEN], cookie=cookie)
    pos = HEADER_LEN
    after_integrity = False
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunError("attr-truncated", f"attribute header at offset {pos} is cut off")
        atype, alen = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + alen
        if end + _pad(alen) > len(data):
            raise StunError(
                "attr-truncated", f"attribute {atype:#06x} of {alen} bytes overruns the message"
            )
        value = data[pos + 4 : end]
        if atype == FINGERPRINT:
            if msg.classic:
                raise StunError("bad-attribute", "FINGERPRINT in a message without magic cookie")
            if alen != 4:
                raise StunError("bad-attribute", f"FINGERPRINT of {alen} bytes")
            if end != len(data):
                raise StunError("fingerprint-not-last", "attributes follow FINGERPRINT")
            (got,) = struct.unpack("!I", value)
            if got != fingerprint(data[:pos]):
                raise StunError("bad-fingerprint", "FINGERPRINT does not match the message")
            msg.had_fingerprint = True
        elif after_integrity and atype != MESSAGE_INTEGRITY_SHA256:
            # RFC 8489 14.5: after MESSAGE-INTEGRITY only -SHA256 and FINGERPRINT count.
            pass
        else:
            _check_value(atype, value, msg)
            msg.attributes.append(Attribute(atype, value))
            if atype == MESSAGE_INTEGRITY:
                after_integrity = True
        pos = end + _pad(alen)
    return msg


def _check_value(atype: int, value: bytes, msg: Message) -> None:
    if atype == XOR_MAPPED_ADDRESS:
        if msg.classic:
            raise StunError("bad-attribute", "XOR-MAPPED-ADDRESS without magic cookie")
        decode_address(value, _xor_key(msg.transaction_id))
    elif atype in (MAPPED_ADDRESS, ALTERNATE_SERVER, RESPONSE_ORIGIN, OTHER_ADDRESS):
        decode_address(value)
    elif atype == ERROR_CODE:
        decode_error_code(value)
    elif atype == UNKNOWN_ATTRIBUTES:
        decode_unknown_attributes(value)
    elif atype == SOFTWARE:
        _decode_text(value, "SOFTWARE")
    elif atype == MESSAGE_INTEGRITY and len(value) != 20:
        raise StunError("bad-attribute", f"MESSAGE-INTEGRITY of {len(value)} bytes")
    elif atype == MESSAGE_INTEGRITY_SHA256 and not (16 <= len(value) <= 32 and len(value) % 4 == 0):
        raise StunError("bad-attribute", f"MESSAGE-INTEGRITY-SHA256 of {len(value)} bytes")


def new_transaction_id() -> bytes:
    return os.urandom(TRANSACTION_ID_LEN)


def binding_request(
    transaction_id: bytes | None = None, software: str | None = CLIENT_SOFTWARE
) -> Message:
    msg = Message(BINDING_REQUEST, transaction_id or new_transaction_id())
    if software:
        msg.add(SOFTWARE, _encode_text(software, "SOFTWARE"))
    return msg


def binding_success(
    request: Message, source: Endpoint | tuple[str, int], software: str | None = SERVER_SOFTWARE
) -> Message:
    """The answer to request from source: XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS for RFC 3489."""
    msg = Message(BINDING_SUCCESS, request.transaction_id, cookie=request.cookie)
    if request.classic:
        msg.add(MAPPED_ADDRESS, encode_address(source))
    else:
        msg.add(XOR_MAPPED_ADDRESS, encode_address(source, _xor_key(request.transaction_id)))
    _add_software(msg, software)
    return msg


def _classic_text(text: str, classic: bool) -> str:
    # RFC 3489 text attributes must be a multiple of 4 bytes long (its clients reject others).
    return text + " " * _pad(len(text.encode("utf-8"))) if classic else text


def _add_software(msg: Message, software: str | None) -> None:
    if software:
        msg.add(SOFTWARE, _encode_text(_classic_text(software, msg.classic), "SOFTWARE"))


def binding_error(
    request: Message,
    code: int,
    reason: str | None = None,
    unknown: Iterable[int] = (),
    software: str | None = SERVER_SOFTWARE,
) -> Message:
    msg = Message(BINDING_ERROR, request.transaction_id, cookie=request.cookie)
    if reason is None:
        reason = ERROR_REASONS.get(code, "")
    msg.add(ERROR_CODE, encode_error_code(code, _classic_text(reason, msg.classic)))
    types = list(unknown)
    if types and request.classic and len(types) % 2:
        # RFC 3489 wants the list padded to 4 bytes by repeating an entry, not by padding.
        types.append(types[-1])
    if types:
        msg.add(UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", t) for t in types))
    _add_software(msg, software)
    return msg


# ----------------------------------------------------------------------------- server


@dataclass
class StunServerConfig:
    software: str | None = SERVER_SOFTWARE
    # Per source IP: a sustained rate and a burst. Sites behind one NAT share a source IP;
    # a site sends a handful of Binding requests per link and minute, so 50/s is far above
    # legitimate use while capping what a spoofed source can make us send to a victim.
    rate_per_s: float = 50.0
    burst: float = 50.0
    # Bounds the bucket table under a spoofed-source flood; idle (refilled) buckets go first.
    max_sources: int = 65536
    # RFC 3489 clients (no magic cookie) get MAPPED-ADDRESS; off = dropped as malformed.
    answer_classic: bool = True


@dataclass
class StunServerStats:
    received: int = 0
    requests: int = 0
    answers: int = 0
    errors_sent: int = 0
    indications: int = 0
    classic_requests: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class TokenBuckets:
    """Per-key token buckets with a bounded table (sans-I/O: the caller passes the time)."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1, max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune(now)
            if len(self._buckets) >= self.max_keys:
                # Table full of active sources: refusing a newcomer is the safe side.
                return False
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        for k in [k for k, (_, last) in self._buckets.items() if now - last >= full_after]:
            del self._buckets[k]


class StunServer(asyncio.DatagramProtocol):
    """Answers Binding requests with the source address seen; never raises on input."""

    def __init__(
        self,
        config: StunServerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or StunServerConfig()
        self.stats = StunServerStats()
        self.transport: asyncio.DatagramTransport | None = None
        self._clock = clock
        self._buckets = TokenBuckets(
            self.config.rate_per_s, self.config.burst, self.config.max_sources
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply = self.handle(data, (str(addr[0]), int(addr[1])))
        except Exception:  # a reflector on the Internet must outlive any input
            self.stats.drop("internal-error")
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (port unreachable, ...): nothing to do but count.
        self.stats.drop("icmp-error")

    def handle(self, data: bytes, source: tuple[str, int]) -> bytes | None:
        """The reply to a datagram from source, or None to stay silent (sans-I/O core)."""
        st = self.stats
        st.received += 1
        try:
            msg = parse(data, allow_classic=self.config.answer_classic)
        except StunError as e:
            st.drop(e.reason)
            return None
        method, cls = split_type(msg.msg_type)
        if cls == INDICATION:
            st.indications += 1
            return None
        if cls != REQUEST:
            st.drop("not-a-request")
            return None
        if method != BINDING:
            # RFC 8489 leaves unknown methods in requests to a 400; with no way to tell a
            # confused client from a scanner we stay silent instead (smaller reflection).
            st.drop("unknown-method")
            return None
        src = _unmap_v4(source)
        if src.port == 0:
            st.drop("bad-source")
            return None
        if not self._buckets.allow(src.ip, self._clock()):
            st.drop("rate-limited")
            return None
        st.requests += 1
        if msg.classic:
            st.classic_requests += 1
        sw = self.config.software
        unknown = msg.unknown_required()
        if CHANGE_REQUEST in unknown and _no_change_requested(msg.get(CHANGE_REQUEST)):
            # RFC 3489 / 5780 clients (e.g. Debian's `stun`) send CHANGE-REQUEST with no flag
            # set in their basic test; that asks nothing of us. With flags set it asks for an
            # alternate address we do not have, which RFC 5780 answers with a 420.
            unknown.remove(CHANGE_REQUEST)
        if unknown:
            st.errors_sent += 1
            return binding_error(msg, 420, unknown=unknown, software=sw).encode()
        st.answers += 1
        return binding_success(msg, src, software=sw).encode()


def _no_change_requested(value: bytes | None) -> bool:
    return value is not None and len(value) == 4 and value[3] & 0x06 == 0


def _unmap_v4(source: tuple[str, int]) -> Endpoint:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; they must get a family-1 answer.
    ip = ipaddress.ip_address(source[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Endpoint(str(ip), source[1])


async def start_server(
    listen: tuple[str, int], config: StunServerConfig | None = None
) -> tuple[asyncio.DatagramTransport, StunServer]:
    """Bind a StunServer on listen (host, port); port 0 picks a free one."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: StunServer(config), local_addr=listen, family=family
    )
    return transport, protocol


# ----------------------------------------------------------------------------- client


class StunTransactionFailed(Exception):
    """A Binding transaction ended without a mapped address; str() is the reason."""


class StunTransaction:
    """One Binding transaction, transport-agnostic (RFC 8489 section 6.2.1 retransmissions).

    The caller sends `request` (or what `start` returns), feeds every datagram it receives to
    `handle`, and calls `on_timeout` when `next_timeout()` says so; `on_timeout` returns the
    bytes to retransmit, or None once the transaction has failed (see `error`).
    """

    def __init__(
        self,
        server_addr: tuple[str, int] | None = None,
        *,
        rto: float = 0.5,
        rc: int = 7,
        rm: int = 16,
        software: str | None = CLIENT_SOFTWARE,
        transaction_id: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rto <= 0 or rc < 1 or rm < 1:
            raise ValueError("rto must be > 0, rc and rm >= 1")
        self.server = _unmap_v4(server_addr) if server_addr is not None else None
        self.rto, self.rc, self.rm = rto, rc, rm
        self.message = binding_request(transaction_id, software)
        self.request = self.message.encode()
        self.transaction_id = self.message.transaction_id
        self.sent = 0
        self.result: Endpoint | None = None
        self.error: str | None = None
        self.response: Message | None = None
        self._clock = clock
        self._deadline: float | None = None
        self._interval = rto

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def start(self, now: float | None = None) -> bytes:
        """Mark the first transmission and return the request bytes."""
        if self.sent:
            raise RuntimeError("transaction already started")
        self.sent = 1
        self._deadline = (self._clock() if now is None else now) + self.rto
        return self.request

    def deadline(self) -> float | None:
        """Absolute clock time of the next on_timeout, or None when there is nothing to wait."""
        return None if self.done or not self.sent else self._deadline

    def next_timeout(self, now: float | None = None) -> float | None:
        """Seconds until on_timeout is due (0 when overdue), or None when finished/not started."""
        d = self.deadline()
        if d is None:
            return None
        return max(0.0, d - (self._clock() if now is None else now))

    def on_timeout(self, now: float | None = None) -> bytes | None:
        """The request to retransmit, or None if the transaction is over (failed or done)."""
        if self.done or not self.sent or self._deadline is None:
            return None
        now = self._clock() if now is None else now
        if now < self._deadline:
            return None
        if self.sent >= self.rc:
            self.error = (
                f"timeout: no response from {self.server or 'the server'} "
                f"after {self.sent} requests"
            )
            return None
        self.sent += 1
        self._interval *= 2
        # After the last of Rc requests the client waits Rm times the initial RTO.
        wait = self.rto * self.rm if self.sent == self.rc else self._interval
        self._deadline = now + wait
        return self.request

    def handle(self, datagram: bytes, source: tuple[str, int] | None = None) -> Endpoint | None:
        """Feed a received datagram; the mapped endpoint if it completes this transaction.

        Datagrams that are not STUN, are malformed, belong to another transaction or come
        from another address than the server are ignored (None, transaction still open).
        """
        if self.done or not is_stun(datagram):
            return None
        if source is not None and self.server is not None and _unmap_v4(source) != self.server:
            return None
        try:
            msg = parse(datagram)
        except StunError:
            return None
        method, cls = split_type(msg.msg_type)
        if msg.transaction_id != self.transaction_id or method != BINDING:
            return None
        if cls not in (SUCCESS, ERROR):
            return None
        self.response = msg
        unknown = msg.unknown_required()
        if cls == ERROR:
            try:
                err = msg.error
            except StunError:
                err = None
            self.error = f"error response {err[0]} {err[1]}".rstrip() if err else "error response"
            if err and err[0] == 420:
                self.error += f" (unknown attributes {_hex_list(msg.unknown_attributes)})"
            return None
        if unknown:
            self.error = f"success response with unknown attributes {_hex_list(unknown)}"
            return None
        ep = msg.xor_mapped_address or msg.mapped_address
        if ep is None:
            self.error = "success response without (XOR-)MAPPED-ADDRESS"
            return None
        self.result = ep
        return ep


def _hex_list(types: Iterable[int]) -> str:
    return ", ".join(f"{t:#06x}" for t in types) or "none"


def query(
    sock: socket.socket,
    server_addr: tuple[str, int],
    timeout: float = 5.0,
    rto: float = 0.5,
) -> Endpoint:
    """Run one Binding transaction over a plain UDP socket; the mapped endpoint, or raise.

    Raises StunTransactionFailed (error response, bad answer, or no answer within timeout).
    The socket's own timeout is restored afterwards.
    """
    tx = StunTransaction(server_addr, rto=rto)
    old_timeout = sock.gettimeout()
    end = time.monotonic() + timeout
    try:
        sock.sendto(tx.start(), tx.server or server_addr)
        while not tx.done:
            now = time.monotonic()
            if now >= end:
                raise StunTransactionFailed(f"timeout: no answer from {tx.server} in {timeout:g} s")
            due = tx.next_timeout(now)
            wait = min(end - now, due if due is not None else end - now)
            if wait <= 0:
                again = tx.on_timeout(now)
                if again is not None:
                    sock.sendto(again, tx.server or server_addr)
                continue
            sock.settimeout(wait)
            try:
                data, src = sock.recvfrom(4096)
            except TimeoutError:
                continue
            tx.handle(data, (str(src[0]), int(src[1])))
    finally:
        sock.settimeout(old_timeout)
    if tx.result is None:
        raise StunTransactionFailed(tx.error or "no result")
    return tx.result


# ----------------------------------------------------------------------------- CLI


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'1.2.3.4:3478', '[::1]:3478', 'host' or 'host:port' -> (host, port)."""
    host, port = text, default_port
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':port' after ']' in {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p)
    if not host or not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad address {text!r}")
    return host, port


def _resolve(host: str, port: int) -> tuple[int, tuple[str, int]]:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return info[0], (str(info[4][0]), int(info[4][1]))


async def _serve(args: argparse.Namespace) -> int:
    cfg = StunServerConfig(rate_per_s=args.rate, burst=args.burst or args.rate)
    transport, server = await start_server(parse_hostport(args.listen), cfg)
    sockname = transport.get_extra_info("sockname")
    print(f"stun: listening on {Endpoint(str(sockname[0]), int(sockname[1]))}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.duration:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration)
        else:
            await stop.wait()
    finally:
        transport.close()
        print("stun: stats " + json.dumps(asdict(server.stats), sort_keys=True), flush=True)
    return 0


def _query(args: argparse.Namespace) -> int:
    family, server = _resolve(*parse_hostport(args.server))
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if args.bind:
            sock.bind(parse_hostport(args.bind, default_port=0))
        try:
            ep = query(sock, server, timeout=args.timeout)
        except StunTransactionFailed as e:
            print(f"stun: {e}", file=sys.stderr)
            return 1
        local = sock.getsockname()
    if args.json:
        print(
            json.dumps(
                {
                    "mapped": str(ep),
                    "ip": ep.ip,
                    "port": ep.port,
                    "local": str(Endpoint(str(local[0]), int(local[1]))),
                }
            )
        )
    else:
        print(ep)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sdwan.common.stun", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the STUN reflector")
    s.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", help="ADDR:PORT or [ADDR6]:PORT")
    s.add_argument("--rate", type=float, default=50.0, help="requests per second per source IP")
    s.add_argument("--burst", type=float, default=0.0, help="bucket size (default: the rate)")
    s.add_argument("--duration", type=float, default=0.0, help="exit after this many seconds")
    q = sub.add_parser("query", help="learn this host's public endpoint from a STUN server")
    q.add_argument("server", help="HOST:PORT (port defaults to 3478)")
    q.add_argument("--bind", help="local ADDR:PORT to send from")
    q.add_argument("--timeout", type=float, default=5.0, help="give up after this many seconds")
    q.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        if args.cmd == "serve":
            return asyncio.run(_serve(args))
        return _query(args)
    except (ValueError, OSError) as e:
        print(f"stun: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
