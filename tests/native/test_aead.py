"""AES-256-GCM known answers, through the fast path's own AEAD code and its packets."""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fphelpers import Pair, ip_packet

from sdwan.bindings.fastpath import HEADER_LEN, TAG_LEN, TYPE_DATA, aead_test

h = bytes.fromhex
K15 = h("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
P15 = h(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
C15 = h(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad"
)
IV15 = h("cafebabefacedbaddecaf888")

# The GCM specification's 256-bit-key test cases 13-16 (96-bit IVs):
# (key, iv, aad, plaintext, ciphertext, tag)
VECTORS = [
    (bytes(32), bytes(12), b"", b"", b"", h("530f8afbc74536b9a963b4f1c4cb738b")),
    (
        bytes(32),
        bytes(12),
        b"",
        bytes(16),
        h("cea7403d4d606b6e074ec5d3baf39d18"),
        h("d0d1c8a799996bf0265b98b5d48ab919"),
    ),
    (K15, IV15, b"", P15, C15, h("b094dac5d93471bdec1a502270e3cc6c")),
    (
        K15,
        IV15,
        h("feedfacedeadbeeffeedfacedeadbeefabaddad2"),
        P15[:60],
        C15[:60],
        h("76fc6ece0f4e1768cddf8853bb2d551b"),
    ),
]


def test_gcm_spec_vectors_encrypt_and_decrypt() -> None:
    for key, iv, aad, pt, ct, tag in VECTORS:
        assert aead_test(True, key, iv, aad, pt) == (ct, tag)
        assert aead_test(False, key, iv, aad, ct, tag) == (pt, tag)


def test_gcm_spec_vectors_reject_bad_tag_and_aad() -> None:
    for key, iv, aad, _pt, ct, tag in VECTORS:
        bad = bytes([tag[0] ^ 1]) + tag[1:]
        assert aead_test(False, key, iv, aad, ct, bad) is None
        assert aead_test(False, key, iv, aad + b"!", ct, tag) is None


def test_packet_layout_matches_independent_gcm(pair: Pair) -> None:
    """Header, nonce (4 zero bytes || counter) and AAD (the header) as documented."""
    counter = 0x0102030405060708
    pair.a.test_set_tx_counter(2, counter)
    inner = ip_packet("10.1.0.5", "10.2.0.9", b"known answer")
    r = pair.a.process_outbound(inner)
    assert r.verdict.name == "SEND"
    wire = r.data
    assert len(wire) == len(inner) + HEADER_LEN + TAG_LEN
    header = struct.pack("!B3xIQ", TYPE_DATA, 0x2001, counter)
    assert wire[:HEADER_LEN] == header
    nonce = bytes(4) + struct.pack("!Q", counter)
    expected = AESGCM(pair.keys.a_tx).encrypt(nonce, inner, header)
    assert wire[HEADER_LEN:] == expected
    assert pair.a.key_info(2).tx_counter == counter + 1


def test_packet_from_independent_gcm_is_accepted(pair: Pair) -> None:
    inner = ip_packet("10.1.0.5", "10.2.0.7", b"made elsewhere")
    header = struct.pack("!B3xIQ", TYPE_DATA, 0x2001, 77)
    wire = header + AESGCM(pair.keys.a_tx).encrypt(bytes(4) + struct.pack("!Q", 77), inner, header)
    r = pair.deliver_b(wire)
    assert r.verdict.name == "TUN"
    assert r.data == inner
