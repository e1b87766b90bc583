"""Segmentation of TUN superpackets (TSO/USO) and coalescing of received TCP segments, as pure
functions: every length, sequence number, flag, IPv4 ID and checksum is checked against values
computed here independently."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from sdwan.bindings.fastpath import FastPath, FastPathError, gro_coalesce, gso_segment

NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 4, 5
ACK, PSH, FIN, CWR = 0x10, 0x08, 0x01, 0x80

SRC4, DST4 = "10.1.0.5", "10.2.0.7"
SRC6, DST6 = "fd00:1::5", "fd00:2::7"


# ---------------------------------------------------------------- independent reference code


def csum_sum(data: bytes, start: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: str, dst: str, proto: int, length: int) -> int:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return csum_sum(
        s.packed + d.packed + struct.pack("!HH", proto, length)
        if s.version == 4
        else s.packed + d.packed + struct.pack("!IxxxB", length, proto)
    )


def l4_valid(pkt: bytes, iphl: int, src: str, dst: str, proto: int) -> bool:
    l4 = pkt[iphl:]
    return csum_sum(l4, pseudo(src, dst, proto, len(l4))) == 0xFFFF


def vnet(flags: int, gso_type: int, hdr_len: int, gso_size: int, cs: int, co: int) -> bytes:
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, cs, co)


def parse_vnet(b: bytes) -> tuple[int, int, int, int, int, int]:
    return struct.unpack("=BBHHHH", b)


def ip4(proto: int, l4: bytes, ident: int = 0x1234, total: int | None = None) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total if total is not None else 20 + len(l4),
        ident,
        0x4000,
        64,
        proto,
        0,
        ipaddress.ip_address(SRC4).packed,
        ipaddress.ip_address(DST4).packed,
    )
    c = 0xFFFF - csum_sum(hdr)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + l4


def ip6(proto: int, l4: bytes) -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(l4),
            proto,
            64,
            ipaddress.ip_address(SRC6).packed,
            ipaddress.ip_address(DST6).packed,
        )
        + l4
    )


def tcp_hdr(seq: int, flags: int, ack: int = 777, win: int = 512, opts: bytes = b"") -> bytes:
    doff = (20 + len(opts)) // 4
    return struct.pack("!HHIIBBHHH", 40000, 5201, seq, ack, doff << 4, flags, win, 0, 0) + opts


def with_partial(pkt: bytes, iphl: int, src: str, dst: str, proto: int, off: int) -> bytes:
    """What the kernel hands over with NEEDS_CSUM: the pseudo-header sum in the field."""
    p = bytearray(pkt)
    p[iphl + off : iphl + off + 2] = struct.pack("!H", pseudo(src, dst, proto, len(pkt) - iphl))
    return bytes(p)


def with_full(pkt: bytes, iphl: int, src: str, dst: str, proto: int, off: int) -> bytes:
    p = bytearray(pkt)
    p[iphl + off : iphl + off + 2] = b"\0\0"
    c = 0xFFFF - csum_sum(bytes(p[iphl:]), pseudo(src, dst, proto, len(pkt) - iphl))
    p[iphl + off : iphl + off + 2] = struct.pack("!H", c)
    return bytes(p)


def payload(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


# ---------------------------------------------------------------- segmentation


@pytest.mark.parametrize("size", [5000, 4200, 1, 1400])
def test_tso_v4(size: int) -> None:
    mss, seq, data = 1400, 0xFFFFF000, payload(size)  # the sequence number wraps
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 1, 2)  # NOP NOP timestamps
    pkt = with_partial(
        ip4(6, tcp_hdr(seq, ACK | PSH | FIN | CWR, opts=opts) + data), 20, SRC4, DST4, 6, 16
    )
    segs = gso_segment(vnet(NEEDS_CSUM, GSO_TCPV4, 52, mss, 20, 16), pkt)
    n = -(-size // mss)
    assert len(segs) == n
    got = b""
    for i, s in enumerate(segs):
        chunk = min(mss, size - i * mss)
        assert len(s) == 52 + chunk
        tot, ident = struct.unpack("!H H", s[2:6])
        assert tot == len(s) and ident == (0x1234 + i) & 0xFFFF
        assert csum_sum(s[:20]) == 0xFFFF, "IPv4 header checksum"
        assert s[8] == 64 and s[9] == 6 and struct.unpack("!H", s[6:8])[0] == 0x4000
        sq, ack = struct.unpack("!II", s[24:32])
        assert sq == (seq + i * mss) & 0xFFFFFFFF and ack == 777
        last, first = i == n - 1, i == 0
        assert s[33] == ACK | (PSH | FIN if last else 0) | (CWR if first else 0)
        assert s[40:52] == opts
        assert l4_valid(s, 20, SRC4, DST4, 6), f"TCP checksum of segment {i}"
        got += s[52:]
    assert got == data


def test_tso_v6() -> None:
    mss, data = 1000, payload(3500)
    pkt = with_partial(ip6(6, tcp_hdr(100, ACK | PSH) + data), 40, SRC6, DST6, 6, 16)
    segs = gso_segment(vnet(NEEDS_CSUM, GSO_TCPV6, 60, mss, 40, 16), pkt)
    assert [len(s) - 60 for s in segs] == [1000, 1000, 1000, 500]
    for i, s in enumerate(segs):
        assert struct.unpack("!H", s[4:6])[0] == len(s) - 40
        assert struct.unpack("!I", s[44:48])[0] == 100 + i * mss
        assert s[53] == ACK | (PSH if i == 3 else 0)
        assert l4_valid(s, 40, SRC6, DST6, 6)
    assert b"".join(s[60:] for s in segs) == data


@pytest.mark.parametrize("v6", [False, True])
def test_uso(v6: bool) -> None:
    gso, data = 64, payload(64 * 5 + 10)
    udp = struct.pack("!HHHH", 5000, 5201, 8 + len(data), 0) + data
    iphl, src, dst = (40, SRC6, DST6) if v6 else (20, SRC4, DST4)
    pkt = with_partial(ip6(17, udp) if v6 else ip4(17, udp), iphl, src, dst, 17, 6)
    segs = gso_segment(vnet(NEEDS_CSUM, GSO_UDP_L4, iphl + 8, gso, iphl, 6), pkt)
    assert [len(s) - iphl - 8 for s in segs] == [64] * 5 + [10]
    for i, s in enumerate(segs):
        assert struct.unpack("!H", s[iphl + 4 : iphl + 6])[0] == len(s) - iphl
        if not v6:
            assert struct.unpack("!HH", s[2:6]) == (len(s), 0x1234 + i)
            assert csum_sum(s[:20]) == 0xFFFF
        assert l4_valid(s, iphl, src, dst, 17)
        assert s[iphl + 8 :] == data[i * gso : (i + 1) * gso]


def test_no_gso_completes_checksum() -> None:
    pkt = with_partial(ip4(6, tcp_hdr(5, ACK) + payload(300)), 20, SRC4, DST4, 6, 16)
    (s,) = gso_segment(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16), pkt)
    assert s[:36] == pkt[:36] and s[38:] == pkt[38:]
    assert l4_valid(s, 20, SRC4, DST4, 6)
    plain = ip4(17, b"12345678abc")
    assert gso_segment(vnet(0, GSO_NONE, 0, 0, 0, 0), plain) == [plain]


@pytest.mark.parametrize(
    "hdr",
    [
        vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 6),  # csum_offset is UDP's
        vnet(NEEDS_CSUM, GSO_TCPV6, 40, 1400, 20, 16),  # packet is IPv4
        vnet(NEEDS_CSUM, GSO_TCPV4, 40, 0, 20, 16),  # gso_size 0
        vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 24, 16),  # csum_start is not the TCP header
        vnet(0, GSO_TCPV4, 40, 1400, 20, 16),  # GSO without NEEDS_CSUM
        vnet(NEEDS_CSUM, 3, 40, 1400, 20, 16),  # UFO: not supported
        vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1, 20, 16),  # too many segments
        vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 5000),  # checksum field past the end
    ],
)
def test_malformed_rejected(hdr: bytes) -> None:
    pkt = ip4(6, tcp_hdr(1, ACK) + payload(3000))
    with pytest.raises(FastPathError):
        gso_segment(hdr, pkt)


def test_truncated_tcp_header_rejected() -> None:
    pkt = ip4(6, tcp_hdr(1, ACK))[:30]
    with pytest.raises(FastPathError):
        gso_segment(vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1400, 20, 16), pkt)


# ---------------------------------------------------------------- coalescing


def segments_v4(
    seq: int, sizes: list[int], last_flags: int = ACK | PSH, sport: int = 40000, ident: int = 1
) -> list[bytes]:
    out = []
    for i, n in enumerate(sizes):
        flags = last_flags if i == len(sizes) - 1 else ACK
        t = bytearray(tcp_hdr(seq, flags))
        t[0:2] = struct.pack("!H", sport)
        out.append(with_full(ip4(6, bytes(t) + payload(n), ident=ident + i), 20, SRC4, DST4, 6, 16))
        seq += n
    return out


def check_super(
    vh: bytes, pkt: bytes, iphl: int, src: str, dst: str, gso: int, nsegs: int, gso_type: int
) -> None:
    flags, typ, hdr_len, gso_size, cs, co = parse_vnet(vh)
    assert (flags, typ, hdr_len, gso_size, cs, co) == (
        NEEDS_CSUM,
        gso_type,
        iphl + 20,
        gso,
        iphl,
        16,
    )
    if iphl == 20:
        assert struct.unpack("!H", pkt[2:4])[0] == len(pkt)
        assert csum_sum(pkt[:20]) == 0xFFFF
    else:
        assert struct.unpack("!H", pkt[4:6])[0] == len(pkt) - 40
    # NEEDS_CSUM: the field holds the pseudo-header sum; completing it gives a valid packet.
    field = struct.unpack("!H", pkt[iphl + 16 : iphl + 18])[0]
    assert field == pseudo(src, dst, 6, len(pkt) - iphl)
    done = gso_segment(vh, pkt)
    assert len(done) == nsegs


def test_coalesce_v4_stream() -> None:
    segs = segments_v4(1000, [1400, 1400, 1400, 600])
    (out,) = gro_coalesce(segs)
    vh, pkt = out
    check_super(vh, pkt, 20, SRC4, DST4, 1400, 4, GSO_TCPV4)
    assert pkt[33] == ACK | PSH
    assert struct.unpack("!I", pkt[24:28])[0] == 1000
    assert pkt[40:] == b"".join(s[40:] for s in segs)
    # Cutting the superpacket again gives back exactly the segments (IDs included).
    assert gso_segment(vh, pkt) == segs


def test_coalesce_v6_stream() -> None:
    segs = []
    seq = 5
    for i, n in enumerate([1200, 1200, 1200]):
        flags = ACK | PSH if i == 2 else ACK
        segs.append(with_full(ip6(6, tcp_hdr(seq, flags) + payload(n)), 40, SRC6, DST6, 6, 16))
        seq += n
    ((vh, pkt),) = gro_coalesce(segs)
    check_super(vh, pkt, 40, SRC6, DST6, 1200, 3, GSO_TCPV6)
    assert gso_segment(vh, pkt) == segs


def test_coalesce_keeps_flows_apart_and_in_order() -> None:
    a = segments_v4(1, [1000, 1000, 1000], sport=1111)
    b = segments_v4(9, [1000, 1000], sport=2222)
    udp = ip4(17, struct.pack("!HHHH", 1, 2, 12, 0) + b"abcd")
    out = gro_coalesce([a[0], b[0], a[1], udp, b[1], a[2]])
    assert len(out) == 3
    (va, pa), (vb, pb), (vu, pu) = out
    assert parse_vnet(vu) == (0, 0, 0, 0, 0, 0) and pu == udp
    assert gso_segment(va, pa) == a
    assert gso_segment(vb, pb) == b


def test_coalesce_stops_at_gap_short_segment_and_flags() -> None:
    s = segments_v4(100, [1000, 1000, 1000, 1000, 1000], last_flags=ACK)
    gap = segments_v4(100 + 6000, [1000], last_flags=ACK)  # 1000 bytes missing
    short = segments_v4(100, [1000, 500, 1000], last_flags=ACK)
    fin = segments_v4(100, [1000, 1000, 1000], last_flags=ACK | FIN)
    out = gro_coalesce(s + gap)
    assert [len(gso_segment(v, p)) for v, p in out] == [5, 1]
    out = gro_coalesce(short)
    assert [len(gso_segment(v, p)) for v, p in out] == [2, 1]
    assert gso_segment(*out[0]) == short[:2]
    out = gro_coalesce(fin)
    assert [len(gso_segment(v, p)) for v, p in out] == [2, 1]
    assert parse_vnet(out[1][0])[1] == GSO_NONE and out[1][1] == fin[2]


def test_bad_checksum_is_not_hidden() -> None:
    s = segments_v4(1, [1000, 1000, 1000], last_flags=ACK)
    bad = bytearray(s[1])
    bad[500] ^= 0xFF
    out = gro_coalesce([s[0], bytes(bad), s[2]])
    # The corrupted segment goes alone with its own (wrong) checksum, for the kernel to drop.
    assert all(parse_vnet(v)[0] == 0 for v, _ in out)
    assert [p for _, p in out] == [s[0], bytes(bad), s[2]]


def test_single_and_non_tcp_untouched() -> None:
    one = segments_v4(1, [800])
    junk = [b"\x45" + b"\0" * 10, b"", b"\x60" * 50]
    out = gro_coalesce(one + junk)
    assert [p for _, p in out] == one + junk
    assert all(v == bytes(10) for v, _ in out)


def test_superpacket_size_limit() -> None:
    segs = segments_v4(1, [1400] * 60, last_flags=ACK)
    out = gro_coalesce(segs)
    assert all(len(p) <= 65535 for _, p in out)
    assert sum(len(gso_segment(v, p)) for v, p in out) == 60
    assert b"".join(b"".join(s[40:] for s in gso_segment(v, p)) for v, p in out) == b"".join(
        s[40:] for s in segs
    )


def udp_dgrams(v6: bool, sizes: list[int], ident: int = 7, sport: int = 5000) -> list[bytes]:
    out = []
    iphl, src, dst = (40, SRC6, DST6) if v6 else (20, SRC4, DST4)
    for i, n in enumerate(sizes):
        udp = struct.pack("!HHHH", sport, 5201, 8 + n, 0) + payload(n)
        pkt = ip6(17, udp) if v6 else ip4(17, udp, ident=ident + i)
        out.append(with_full(pkt, iphl, src, dst, 17, 6))
    return out


@pytest.mark.parametrize("v6", [False, True])
def test_coalesce_udp(v6: bool) -> None:
    iphl, src, dst = (40, SRC6, DST6) if v6 else (20, SRC4, DST4)
    d = udp_dgrams(v6, [64] * 10 + [30])
    ((vh, pkt),) = gro_coalesce(d)
    assert parse_vnet(vh) == (NEEDS_CSUM, GSO_UDP_L4, iphl + 8, 64, iphl, 6)
    assert struct.unpack("!H", pkt[iphl + 4 : iphl + 6])[0] == len(pkt) - iphl
    field = struct.unpack("!H", pkt[iphl + 6 : iphl + 8])[0]
    assert field == pseudo(src, dst, 17, len(pkt) - iphl)
    assert gso_segment(vh, pkt) == d


def test_udp_without_checksum_or_growing_is_not_coalesced() -> None:
    d = udp_dgrams(False, [64, 64])
    nosum = [bytearray(x) for x in d]
    for x in nosum:
        x[26:28] = b"\0\0"
    out = gro_coalesce([bytes(x) for x in nosum])
    assert [p for _, p in out] == [bytes(x) for x in nosum]
    # A larger datagram cannot follow a smaller one: it starts a new superpacket.
    d = udp_dgrams(False, [64, 64, 100, 100])
    out = gro_coalesce(d)
    assert [len(gso_segment(v, p)) for v, p in out] == [2, 2]


def test_attached_fd_is_plain() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with FastPath() as fp:
        assert fp.tun_features == 0
        fp.tun_attach(b.fileno())
        assert fp.tun_features == 0
    a.close()
    b.close()


def test_tso_small_mss_many_segments() -> None:
    # A path with a tiny MSS still gets its 64 KiB superpackets cut, not dropped.
    mss, data = 88, payload(60000)
    pkt = with_partial(ip4(6, tcp_hdr(1, ACK | PSH) + data), 20, SRC4, DST4, 6, 16)
    segs = gso_segment(vnet(NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16), pkt, max_segs=2048)
    assert len(segs) == -(-60000 // mss)
    assert all(l4_valid(s, 20, SRC4, DST4, 6) for s in segs[:: len(segs) // 7])
    assert b"".join(s[40:] for s in segs) == data
