"""Punch probes: the small authenticated datagrams two sites send each other to open their NATs
and find the endpoint a direct tunnel can run on (docs/mesh.md, "Probes").

A probe is sent from a link's own UDP socket, so the NAT mapping it opens is the one the
tunnel's DTLS and data packets use afterwards. Its tag is HMAC-SHA256 (truncated to 16 bytes)
under the per-pair secret the PoP handed both sides with the punch, over everything before
the tag: a third party can neither forge a probe nor steer a punch, and a probe of one pair
or one punch (its generation) is worthless for another.

Layout (network order), 48 bytes plus optional zero padding before the tag:

    0   type 0xD3            1  kind (1 request, 2 response)   2..3 reserved, zero
    4   from site (u32)      8  to site (u32)                  12   generation (u32)
    16  nonce (8 bytes)      24 echo: the request's nonce in a response, zero in a request
    32  padding (zeros)      -16 tag
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

PROBE_TYPE = 0xD3
TAG_LEN = 16
SECRET_LEN = 32
_HEAD = struct.Struct("!BBHIII8s8s")
MIN_LEN = _HEAD.size + TAG_LEN  # 48


class Kind(IntEnum):
    REQUEST = 1
    RESPONSE = 2


@dataclass(frozen=True)
class Probe:
    kind: Kind
    from_site: int
    to_site: int
    gen: int
    nonce: bytes
    echo: bytes = bytes(8)


def _tag(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, "sha256").digest()[:TAG_LEN]


def encode(probe: Probe, secret: bytes, size: int = MIN_LEN) -> bytes:
    """The probe's datagram, zero-padded to size bytes (at least MIN_LEN)."""
    if len(probe.nonce) != 8 or len(probe.echo) != 8:
        raise ValueError("nonce and echo are 8 bytes")
    body = _HEAD.pack(
        PROBE_TYPE, probe.kind, 0, probe.from_site, probe.to_site, probe.gen,
        probe.nonce, probe.echo,
    )
    body += bytes(max(0, size - MIN_LEN))
    return body + _tag(secret, body)


def peek(data: bytes) -> Probe | None:
    """The probe's fields, not yet authenticated; None when it is not a well-formed probe."""
    if len(data) < MIN_LEN or data[0] != PROBE_TYPE:
        return None
    _, kind, reserved, src, dst, gen, nonce, echo = _HEAD.unpack_from(data)
    if reserved or kind not in (Kind.REQUEST, Kind.RESPONSE):
        return None
    if any(data[_HEAD.size : len(data) - TAG_LEN]):
        return None  # padding is zeros: nothing can hide in it
    if kind == Kind.REQUEST and any(echo):
        return None
    return Probe(Kind(kind), src, dst, gen, nonce, echo)


def verify(data: bytes, secret: bytes) -> bool:
    """Whether the datagram's tag is right under secret (constant time)."""
    if len(data) < MIN_LEN:
        return False
    return hmac.compare_digest(data[-TAG_LEN:], _tag(secret, data[:-TAG_LEN]))
