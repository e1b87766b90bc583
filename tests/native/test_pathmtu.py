"""Path MTU in the fast path: the per-peer MTU, the ICMP errors a packet too big for it gets
(into the TUN, or from a relay back to the sender), the per-peer MSS clamp, and the padded,
authenticated probes and their acks."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest
from fphelpers import LINK, Pair, link_keys, wire_relay

from sdwan.bindings.fastpath import (
    CtrlEvent,
    FastPath,
    FastPathConfig,
    FastPathError,
    Verdict,
    icmp_too_big,
    ip4_fragment,
    mss_clamp,
    probe_ack,
)

PMTU = 1280
INNER = PMTU - 28 - 32  # IPv4 underlay


def csum(data: bytes, start: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip4(src: str, dst: str, proto: int, l4: bytes, df: bool = True, frag: int = 0) -> bytes:
    flags = (0x4000 if df else 0) | frag
    h = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(l4), 7, flags, 64, proto, 0,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    )
    h = h[:10] + struct.pack("!H", 0xFFFF - csum(h)) + h[12:]
    return h + l4


def ip6(src: str, dst: str, nh: int, l4: bytes) -> bytes:
    return struct.pack(
        "!IHBB16s16s", 6 << 28, len(l4), nh, 64,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    ) + l4


def udp(n: int) -> bytes:
    return struct.pack("!HHHH", 1000, 2000, 8 + n, 0) + b"u" * n


def tcp_syn(mss: int, options: bytes | None = None, flags: int = 0x02) -> bytes:
    opts = options if options is not None else struct.pack("!BBH", 2, 4, mss) + b"\x01\x01\x04\x02"
    thl = 20 + len(opts)
    return struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, (thl // 4) << 4, flags, 64240, 0, 0) + opts


def with_tcp_csum(pkt: bytes) -> bytes:
    """The packet with its TCP checksum filled in (IPv4 or IPv6)."""
    v6 = pkt[0] >> 4 == 6
    l3 = 40 if v6 else 20
    seg = bytearray(pkt[l3:])
    seg[16:18] = b"\0\0"
    if v6:
        pseudo = pkt[8:40] + struct.pack("!IxxxB", len(seg), 6)
    else:
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    c = 0xFFFF - csum(bytes(seg), csum(pseudo))
    seg[16:18] = struct.pack("!H", c)
    return pkt[:l3] + bytes(seg)


def tcp_csum_ok(pkt: bytes) -> bool:
    v6 = pkt[0] >> 4 == 6
    l3 = 40 if v6 else 20
    seg = pkt[l3:]
    pseudo = (
        pkt[8:40] + struct.pack("!IxxxB", len(seg), 6)
        if v6
        else pkt[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    )
    return csum(seg, csum(pseudo)) == 0xFFFF


def mss_of(pkt: bytes) -> int:
    l3 = 40 if pkt[0] >> 4 == 6 else 20
    i = l3 + 20
    while pkt[i] == 1:
        i += 1
    assert pkt[i] == 2
    return int(struct.unpack_from("!H", pkt, i + 2)[0])


def test_set_mtu_gives_the_inner_mtu_and_checks_its_range(pair: Pair) -> None:
    a = pair.a
    assert (a.endpoint_info(2).mtu, a.endpoint_info(2).inner_mtu) == (0, 0)
    a.set_mtu(2, PMTU)
    info = a.endpoint_info(2)
    assert (info.mtu, info.inner_mtu) == (PMTU, INNER)
    # An IPv6 endpoint makes the outer header 20 bytes larger.
    a.set_endpoint(2, 2, ("2001:db8::2", 4800))
    assert a.endpoint_info(2).inner_mtu == PMTU - 48 - 32
    a.endpoint_del(2, 2)
    assert a.endpoint_info(2).inner_mtu == INNER
    for bad in (1, 575, 65536):
        with pytest.raises(FastPathError) as e:
            a.set_mtu(2, bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(FastPathError) as e:
        a.set_mtu(99, PMTU)
    assert e.value.errno == errno.ENOENT
    a.set_mtu(2, 0)
    assert a.endpoint_info(2).inner_mtu == 0


def test_ipv4_with_df_too_big_gets_frag_needed_into_the_tun(pair: Pair) -> None:
    a = pair.a
    a.set_mtu(2, PMTU)
    fits = ip4("10.1.0.5", "10.2.0.7", 17, udp(INNER - 28))
    assert a.process_outbound(fits).verdict == Verdict.SEND
    big = ip4("10.1.0.5", "10.2.0.7", 17, udp(1400 - 28))
    r = a.process_outbound(big)
    assert r.verdict == Verdict.TUN and r.peer_id == 2
    icmp = r.data
    # An IPv4 header from the original destination to its source, checksummed.
    assert icmp[0] == 0x45 and icmp[9] == 1 and csum(icmp[:20]) == 0xFFFF
    assert icmp[12:16] == big[16:20] and icmp[16:20] == big[12:16]
    assert struct.unpack_from("!H", icmp, 2)[0] == len(icmp) <= 576
    # Type 3 code 4, next-hop MTU, the original's header and start quoted.
    body = icmp[20:]
    assert (body[0], body[1]) == (3, 4) and csum(body) == 0xFFFF
    assert struct.unpack_from("!H", body, 6)[0] == INNER
    assert body[8:] == big[: len(body) - 8]
    assert a.peer_counters(2).drops["too_big"] == 1
    assert a.peer_counters(2).tx_packets == 1  # only the packet that fit


def test_ipv4_without_df_too_big_is_left_to_fragment(pair: Pair) -> None:
    a = pair.a
    a.set_mtu(2, PMTU)
    pkt = ip4("10.1.0.5", "10.2.0.7", 17, udp(1400), df=False)
    r = a.process_outbound(pkt)
    assert (r.verdict, r.peer_id, r.data) == (Verdict.FRAGMENT, 2, pkt)
    assert a.peer_counters(2).drops["too_big"] == 0


def reassemble(frags: list[bytes]) -> tuple[bytes, bytes]:
    """(first header, payload) of fragments, checking offsets, MF and checksums."""
    payload = b""
    for i, f in enumerate(frags):
        ihl = (f[0] & 15) * 4
        assert csum(f[:ihl]) == 0xFFFF
        assert struct.unpack_from("!H", f, 2)[0] == len(f)
        flags = struct.unpack_from("!H", f, 6)[0]
        assert (flags & 0x1FFF) * 8 == len(payload)
        assert bool(flags & 0x2000) == (i + 1 < len(frags))
        assert not flags & 0x4000
        payload += f[ihl:]
    return frags[0][: (frags[0][0] & 15) * 4], payload


@pytest.mark.parametrize("mtu", [576, INNER, 1400])
def test_fragments_fit_and_reassemble(mtu: int) -> None:
    pkt = ip4("10.1.0.5", "10.2.0.7", 17, udp(3000), df=False)
    frags = ip4_fragment(pkt, mtu)
    assert len(frags) > 1 and all(len(f) <= mtu for f in frags)
    assert all((len(f) - 20) % 8 == 0 for f in frags[:-1])
    first, payload = reassemble(frags)
    assert payload == pkt[20:] and first[12:20] == pkt[12:20]


def test_fragments_repeat_only_copied_options() -> None:
    # Router alert (copied, 0x94) and a timestamp-like option (not copied, 0x44).
    opts = bytes([0x94, 4, 0, 0, 0x44, 4, 5, 0])
    l4 = udp(2000)
    h = struct.pack("!BBHHHBBH4s4s", 0x47, 0, 28 + len(l4), 9, 0, 64, 17, 0,
                    bytes([10, 1, 0, 5]), bytes([10, 2, 0, 7])) + opts
    h = h[:10] + struct.pack("!H", 0xFFFF - csum(h)) + h[12:]
    frags = ip4_fragment(h + l4, 1000)
    assert frags[0][20:28] == opts
    assert all((f[0] & 15) * 4 == 24 and f[20:24] == opts[:4] for f in frags[1:])
    assert reassemble(frags)[1] == l4


def test_a_fragment_is_cut_again_keeping_its_offset_and_mf() -> None:
    pkt = bytearray(ip4("10.1.0.5", "10.2.0.7", 17, udp(2000), df=False))
    struct.pack_into("!H", pkt, 6, 0x2000 | 100)  # MF, offset 800
    pkt[10:12] = b"\0\0"
    pkt[10:12] = struct.pack("!H", 0xFFFF - csum(bytes(pkt[:20])))
    frags = ip4_fragment(bytes(pkt), 1000)
    offs = [struct.unpack_from("!H", f, 6)[0] for f in frags]
    assert offs[0] & 0x1FFF == 100 and all(o & 0x2000 for o in offs)


def test_a_fragment_near_the_largest_offset_is_not_cut_past_it() -> None:
    # Found by fuzz_pmtu: pieces of a fragment at offset 65520 would wrap the 13-bit field.
    pkt = bytearray(ip4("10.1.0.5", "10.2.0.7", 17, udp(2000), df=False))
    struct.pack_into("!H", pkt, 6, 0x2000 | 0x1FFE)
    pkt[10:12] = b"\0\0"
    pkt[10:12] = struct.pack("!H", 0xFFFF - csum(bytes(pkt[:20])))
    with pytest.raises(FastPathError) as e:
        ip4_fragment(bytes(pkt), 1000)
    assert e.value.errno == errno.EINVAL


def test_no_fragments_of_df_or_garbage() -> None:
    for bad, mtu in ((ip4("10.1.0.5", "10.2.0.7", 17, udp(2000)), 1000),
                     (ip4("10.1.0.5", "10.2.0.7", 17, udp(2000), df=False), 20),
                     (b"\x45" + bytes(10), 1000)):
        with pytest.raises(FastPathError) as e:
            ip4_fragment(bad, mtu)
        assert e.value.errno == errno.EINVAL


def test_no_error_about_errors_fragments_or_non_hosts() -> None:
    err = bytes([3, 1, 0, 0, 0, 0, 0, 0]) + b"q" * 1400
    assert icmp_too_big(ip4("10.1.0.5", "10.2.0.7", 1, err), INNER) is None
    echo = bytes([8, 0, 0, 0, 0, 0, 0, 0]) + b"q" * 1400
    assert icmp_too_big(ip4("10.1.0.5", "10.2.0.7", 1, echo), INNER) is not None
    later = ip4("10.1.0.5", "10.2.0.7", 17, udp(1400), frag=100)
    assert icmp_too_big(later, INNER) is None
    for src, dst in (("0.0.0.0", "10.2.0.7"), ("224.0.0.1", "10.2.0.7"),
                     ("10.1.0.5", "255.255.255.255")):
        assert icmp_too_big(ip4(src, dst, 17, udp(1400)), INNER) is None
    err6 = bytes([1, 0, 0, 0, 0, 0, 0, 0]) + b"q" * 1400
    assert icmp_too_big(ip6("fd01::5", "fd02::7", 58, err6), INNER) is None
    assert icmp_too_big(ip6("ff02::1", "fd02::7", 17, udp(1400)), INNER) is None
    with pytest.raises(FastPathError):
        icmp_too_big(b"\x50" + bytes(40), INNER)


def test_ipv6_too_big_gets_packet_too_big(pair: Pair) -> None:
    a = pair.a
    a.route_set("fd02::/64", 2)
    a.set_mtu(2, 1500)
    inner = 1500 - 60
    big = ip6("fd01::5", "fd02::7", 17, udp(1460))
    r = a.process_outbound(big)
    assert r.verdict == Verdict.TUN
    p = r.data
    assert p[0] >> 4 == 6 and p[6] == 58 and len(p) <= 1280
    assert p[8:24] == big[24:40] and p[24:40] == big[8:24]
    plen = struct.unpack_from("!H", p, 4)[0]
    assert plen == len(p) - 40
    body = p[40:]
    assert (body[0], body[1]) == (2, 0)
    assert struct.unpack_from("!I", body, 4)[0] == inner
    pseudo = p[8:40] + struct.pack("!IxxxB", plen, 58)
    assert csum(body, csum(pseudo)) == 0xFFFF
    assert body[8:] == big[: len(body) - 8]
    assert a.process_outbound(ip6("fd01::5", "fd02::7", 17, udp(inner - 48))).verdict == (
        Verdict.SEND
    )


def test_syn_mss_is_clamped_both_ways(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.set_mtu(2, PMTU)
    syn = with_tcp_csum(ip4("10.1.0.5", "10.2.0.7", 6, tcp_syn(1460)))
    w = a.process_outbound(syn)
    assert w.verdict == Verdict.SEND
    got = b.process_inbound(LINK, ("192.0.2.1", 4800), w.data)
    assert got.verdict == Verdict.TUN
    assert mss_of(got.data) == INNER - 40 and tcp_csum_ok(got.data)
    # Smaller than the clamp: untouched; no SYN: untouched.
    small = with_tcp_csum(ip4("10.1.0.5", "10.2.0.7", 6, tcp_syn(1000)))
    got = b.process_inbound(LINK, ("192.0.2.1", 4800), a.process_outbound(small).data)
    assert got.data == small
    ack = with_tcp_csum(ip4("10.1.0.5", "10.2.0.7", 6, tcp_syn(1460, flags=0x10)))
    got = b.process_inbound(LINK, ("192.0.2.1", 4800), a.process_outbound(ack).data)
    assert got.data == ack
    # Arriving from a peer with an MTU: the SYN-ACK our host answers must fit it too.
    b.set_mtu(1, 1400)
    synack = with_tcp_csum(ip4("10.1.0.5", "10.2.0.7", 6, tcp_syn(1460, flags=0x12)))
    a.set_mtu(2, 0)
    got = b.process_inbound(LINK, ("192.0.2.1", 4800), a.process_outbound(synack).data)
    assert mss_of(got.data) == 1400 - 60 - 40 and tcp_csum_ok(got.data)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("nops", [0, 1, 3])
def test_mss_clamp_keeps_the_checksum_at_any_option_offset(v6: bool, nops: int) -> None:
    opts = b"\x01" * nops + struct.pack("!BBH", 2, 4, 8960)
    opts += b"\x00" * (-len(opts) % 4)
    seg = tcp_syn(0, options=opts)
    pkt = ip6("fd01::5", "fd02::7", 6, seg) if v6 else ip4("10.1.0.5", "10.2.0.7", 6, seg)
    pkt = with_tcp_csum(pkt)
    out = mss_clamp(pkt, 1400)
    assert out is not None and tcp_csum_ok(out)
    assert mss_of(out) == 1400 - (60 if v6 else 40)
    assert mss_clamp(out, 1400) is None  # already fits
    # Malformed options end the walk, nothing is written.
    bad = with_tcp_csum(ip4("10.1.0.5", "10.2.0.7", 6, tcp_syn(0, options=b"\x05\x09\x00\x00")))
    assert mss_clamp(bad, 1400) is None


def test_probe_is_answered_with_an_authenticated_ack() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    with FastPath() as a, FastPath() as b:
        a.peer_add(2)
        b.peer_add(1)
        a.link_add(LINK, tx.fileno())
        with pytest.raises(FastPathError) as e:
            a.probe(2, LINK, 1400, 1)
        assert e.value.errno == errno.ENOTCONN
        a.set_endpoint(2, LINK, rx.getsockname())
        with pytest.raises(FastPathError) as e:
            a.probe(2, LINK, 1400, 1)
        assert e.value.errno == errno.ENOKEY
        link_keys(a, b, 1, 2, 0x11, 0x22)
        for bad in (100, 70000):
            with pytest.raises(FastPathError) as e:
                a.probe(2, LINK, bad, 1)
            assert e.value.errno == errno.EINVAL

        a.probe(2, LINK, 1400, 0xDEADBEEF)
        data, src = rx.recvfrom(65536)
        assert len(data) == 1400 - 28 and data[0] == 0xD0  # a data packet, padded
        r = b.process_inbound(LINK, src, data)
        # Answered to where the probe came from, on its link; small.
        assert (r.verdict, r.peer_id, r.link_id, r.to) == (Verdict.SEND, 1, LINK, src)
        assert len(r.data) == 32 + 12
        assert b.peer_counters(1).rx_packets == 1
        got = a.process_inbound(LINK, rx.getsockname(), r.data)
        assert got.verdict == Verdict.CONTROL
        ev = a.ctrl_recv()
        assert ev is not None and ev.event == CtrlEvent.PROBE_ACK
        assert (ev.peer_id, ev.link_id) == (2, LINK)
        assert probe_ack(ev.data) == (0xDEADBEEF, 1400 - 28)

        # Replayed or tampered probes get nothing.
        assert b.process_inbound(LINK, src, data).drop_reason == "replay"
        a.probe(2, LINK, 1400, 2)
        bad = bytearray(rx.recvfrom(65536)[0])
        bad[-1] ^= 1
        assert b.process_inbound(LINK, src, bytes(bad)).drop_reason == "bad_tag"
    rx.close()
    tx.close()


def test_relay_answers_too_big_to_the_sender_and_clamps() -> None:
    pop_ep, a_ep, b_ep = ("203.0.113.1", 4800), ("198.51.100.1", 4800), ("198.51.100.2", 4800)
    with FastPath() as a, FastPath(FastPathConfig(relay=True)) as pop, FastPath() as b:
        wire_relay(a, pop, b, pop_ep, a_ep, b_ep)
        # Site 1's path to the PoP is small; site 2's is not.
        pop.set_mtu(1, PMTU)

        big = ip4("10.2.0.7", "10.1.0.5", 17, udp(1400 - 28))
        w = pop.process_inbound(1, b_ep, b.process_outbound(big).data)
        assert (w.verdict, w.peer_id, w.to) == (Verdict.SEND, 2, b_ep)
        back = b.process_inbound(1, pop_ep, w.data)
        assert back.verdict == Verdict.TUN
        icmp = back.data
        assert (icmp[20], icmp[21]) == (3, 4)
        assert struct.unpack_from("!H", icmp, 26)[0] == INNER
        assert icmp[16:20] == big[12:16]  # to the sender's host
        assert pop.peer_counters(1).drops["too_big"] == 1

        # A SYN through the relay is clamped to the smaller of the two paths.
        syn = with_tcp_csum(ip4("10.2.0.7", "10.1.0.5", 6, tcp_syn(1460)))
        w = pop.process_inbound(1, b_ep, b.process_outbound(syn).data)
        got = a.process_inbound(1, pop_ep, w.data)
        assert mss_of(got.data) == INNER - 40 and tcp_csum_ok(got.data)

        # Without DF it is cut for the smaller path instead.
        nodf = ip4("10.2.0.7", "10.1.0.5", 17, udp(1400 - 28), df=False)
        w = pop.process_inbound(1, b_ep, b.process_outbound(nodf).data)
        assert (w.verdict, w.peer_id, w.data) == (Verdict.FRAGMENT, 1, nodf)

        # One that fits is relayed as before.
        fits = ip4("10.2.0.7", "10.1.0.5", 17, udp(INNER - 28))
        w = pop.process_inbound(1, b_ep, b.process_outbound(fits).data)
        assert a.process_inbound(1, pop_ep, w.data).data == fits
