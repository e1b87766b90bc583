"""Punch probes: round trip, the tag binds every field and the secret, malformed input."""

from __future__ import annotations

import pytest

from sdwan.common import probe
from sdwan.common.probe import Kind, Probe

SECRET = bytes(range(32))
REQ = Probe(Kind.REQUEST, 2, 1, 77, b"nonce-01")


def test_round_trip_and_padding() -> None:
    data = probe.encode(REQ, SECRET)
    assert len(data) == probe.MIN_LEN == 48 and data[0] == probe.PROBE_TYPE
    assert probe.peek(data) == REQ and probe.verify(data, SECRET)
    padded = probe.encode(REQ, SECRET, size=1200)
    assert len(padded) == 1200 and probe.peek(padded) == REQ and probe.verify(padded, SECRET)
    resp = Probe(Kind.RESPONSE, 1, 2, 77, b"nonce-02", b"nonce-01")
    assert probe.peek(probe.encode(resp, SECRET)) == resp


def test_every_byte_is_covered_by_the_tag() -> None:
    data = probe.encode(REQ, SECRET)
    assert not probe.verify(data, bytes(32))
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        assert not (probe.peek(bytes(bad)) == REQ and probe.verify(bytes(bad), SECRET)), i


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes([probe.PROBE_TYPE]) * 47,  # short
        b"\x00" + probe.encode(REQ, SECRET)[1:],  # another type
        probe.encode(REQ, SECRET)[:1] + b"\x03" + probe.encode(REQ, SECRET)[2:],  # kind
        probe.encode(REQ, SECRET)[:2] + b"\x00\x01" + probe.encode(REQ, SECRET)[4:],  # reserved
        # A request with an echo, and padding that is not zeros.
        probe.encode(REQ, SECRET)[:24] + b"x" * 8 + probe.encode(REQ, SECRET)[32:],
        probe.encode(REQ, SECRET, size=60)[:40] + b"\x01" + probe.encode(REQ, SECRET, 60)[41:],
    ],
)
def test_malformed_probes_are_refused(data: bytes) -> None:
    assert probe.peek(data) is None
