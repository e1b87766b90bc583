#!/bin/sh
# Build the libFuzzer targets with Debian's clang (ASan + UBSan) and run them
# for a bounded time: native/fuzz/run.sh [SECONDS] (default 60, in total: half
# for fuzz_inbound over fp_process_inbound, an eighth each for fuzz_offload over
# the GSO segmenter and the TCP coalescer, fuzz_links over endpoints, link
# policies and fp_route_batch, fuzz_pmtu over the ICMP too-big answers, the
# MSS clamp and the IPv4 fragmenter, and fuzz_rules over the transport rules'
# table, flow parser and flow cache). Exits non-zero if a fuzzer finds a crash;
# the reproducer is left in native/out/fuzz/.
set -eu
secs=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
native=$(dirname "$here")
out="$native/out/fuzz"
mkdir -p "$out/corpus" "$out/seeds" "$out/corpus-offload" "$out/seeds-offload" \
    "$out/corpus-links" "$out/seeds-links" "$out/corpus-pmtu" "$out/seeds-pmtu" \
    "$out/corpus-rules" "$out/seeds-rules"

clang -std=c11 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Werror \
    -I"$native/include" -I"$native/src" \
    "$native"/src/*.c "$here/fuzz_inbound.c" -lcrypto -lpthread -lm -o "$out/fuzz_inbound"
clang -std=c11 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Werror \
    -I"$native/include" -I"$native/src" \
    "$native"/src/*.c "$here/fuzz_offload.c" -lcrypto -lpthread -lm -o "$out/fuzz_offload"
clang -std=c11 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Werror \
    -I"$native/include" -I"$native/src" \
    "$native"/src/*.c "$here/fuzz_links.c" -lcrypto -lpthread -lm -o "$out/fuzz_links"
clang -std=c11 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Werror \
    -I"$native/include" -I"$native/src" \
    "$native"/src/*.c "$here/fuzz_pmtu.c" -lcrypto -lpthread -lm -o "$out/fuzz_pmtu"
clang -std=c11 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Werror \
    -I"$native/include" -I"$native/src" \
    "$native"/src/*.c "$here/fuzz_rules.c" -lcrypto -lpthread -lm -o "$out/fuzz_rules"

# Seeds: mode byte, then either a raw datagram (0) or [len][counter:2][plaintext] chunks (1).
python3 - "$out/seeds" <<'PY'
import struct, sys, pathlib
d = pathlib.Path(sys.argv[1])
ip4 = bytes.fromhex("45000020000000004011000c0a010005" "0a020007") + b"payload!" * 1
ip4_back = ip4[:16] + bytes([10, 1, 0, 9])
ip4_p1 = ip4[:16] + bytes([10, 2, 200, 1])
ip6 = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, bytes(16), b"\xfd" + bytes(15)) + b"x" * 8
hdr = bytes([0xD0, 0, 0, 0]) + struct.pack("!IQ", 20, 7)
seeds = {
    "raw_data": b"\x00" + hdr + bytes(32),
    "raw_unknown": b"\x00" + bytes([0xD0, 0, 0, 0]) + struct.pack("!IQ", 99, 1) + bytes(40),
    "raw_dtls": b"\x00" + bytes([22, 0xFE, 0xFD]) + bytes(30),
    "raw_stun": b"\x00" + bytes([0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42]) + bytes(12),
    "auth_relay": b"\x01" + bytes([len(ip4), 0, 1]) + ip4,
    "auth_back": b"\x01" + bytes([len(ip4_back), 0, 2]) + ip4_back,
    "auth_seq": b"\x01" + b"".join(bytes([len(p), 0, c]) + p
                                   for c, p in ((5, ip4), (3, ip6), (5, ip4), (4, b""), (1, ip4_p1))),
    "auth_keepalive": b"\x01" + bytes([0, 0, 9]),
    # An MTU probe (answered) and a probe's ack (queued), both authenticated.
    "auth_probe": b"\x01" + bytes([40, 0, 11, 0x10, 0, 0, 0, 0, 0, 0, 7]) + bytes(32),
    "auth_probe_ack": b"\x01" + bytes([12, 0, 12, 0x11, 0, 0, 0, 0, 0, 0, 7, 0, 0, 5, 0x3C]),
}
for name, data in seeds.items():
    (d / name).write_bytes(data)
PY

# Offload seeds: virtio_net_hdr + TSO/USO superpackets, and runs of TCP segments.
python3 - "$out/seeds-offload" <<'PY'
import struct, sys, pathlib
d = pathlib.Path(sys.argv[1])
def fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s
def csum(b, s=0):
    b += b"\0" * (len(b) % 2)
    return fold(s + sum(struct.unpack(f"!{len(b)//2}H", b)))
S4, D4 = bytes([10, 1, 0, 5]), bytes([10, 2, 0, 7])
S6, D6 = b"\xfd" + bytes(14) + b"\x05", b"\xfd" + bytes(14) + b"\x07"
def ip4(proto, l4, ident=1):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000, 64, proto, 0, S4, D4)
    return h[:10] + struct.pack("!H", 0xFFFF - csum(h)) + h[12:] + l4
def ip6(proto, l4):
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, S6, D6) + l4
def ps(v6, proto, n):
    return csum(S6 + D6 + struct.pack("!IxxxB", n, proto)) if v6 else csum(S4 + D4 + struct.pack("!HH", proto, n))
def tcp(seq, flags, data):
    return struct.pack("!HHIIBBHHH", 1, 2, seq, 9, 5 << 4, flags, 500, 0, 0) + data
def partial(pkt, iphl, proto, off, v6):
    p = bytearray(pkt); p[iphl + off:iphl + off + 2] = struct.pack("!H", ps(v6, proto, len(pkt) - iphl)); return bytes(p)
def full(pkt, iphl, proto, off, v6):
    p = bytearray(pkt); c = 0xFFFF - csum(bytes(p[iphl:]), ps(v6, proto, len(pkt) - iphl))
    p[iphl + off:iphl + off + 2] = struct.pack("!H", c); return bytes(p)
def vnet(flags, typ, hl, gso, cs, co):
    return struct.pack("=BBHHHH", flags, typ, hl, gso, cs, co)
data = bytes(range(256)) * 12
seeds = {
    "tso4": vnet(1, 1, 40, 500, 20, 16) + partial(ip4(6, tcp(7, 0x18, data[:1700])), 20, 6, 16, False),
    "tso6": vnet(1, 4, 60, 400, 40, 16) + partial(ip6(6, tcp(7, 0x19, data[:1300])), 40, 6, 16, True),
    "uso4": vnet(1, 5, 28, 64, 20, 6) + partial(ip4(17, struct.pack("!HHHH", 1, 2, 8 + 300, 0) + data[:300]), 20, 17, 6, False),
    "csum": vnet(1, 0, 0, 0, 20, 16) + partial(ip4(6, tcp(1, 0x10, data[:100])), 20, 6, 16, False),
}
# A run of full-checksum segments; the header bytes double as chunk lengths ((b*8)+20).
segs = [full(ip4(6, tcp(100 + 60 * i, 0x10, data[:60]), ident=1 + i), 20, 6, 16, False) for i in range(4)]
seeds["run"] = bytes([(len(s) - 20) // 8 for s in segs]) + bytes(6) + b"".join(segs)
for name, b in seeds.items():
    (d / name).write_bytes(b)
PY

# Links seeds: command sequences (fuzz_links.c): endpoints on three links, a
# weighted policy, routes by batch, then packets out and in.
python3 - "$out/seeds-links" <<'PY'
import struct, sys, pathlib
d = pathlib.Path(sys.argv[1])
def ep(peer, link, a, port):
    return bytes([0x80 * (peer - 1) | link << 3 | 0, 0]) + struct.pack("!H", port) + bytes(a)
def policy(peer, pairs):
    return bytes([0x80 * (peer - 1) | 2, len(pairs)]) + b"".join(bytes(p) for p in pairs)
def route(verb, plen, peer, a):
    return bytes([verb, plen, peer, 0]) + struct.pack("!H", 0) + bytes(a)
def batch(ops):
    return bytes([3, len(ops)]) + b"".join(ops)
def out(b):
    return bytes([4]) + bytes(b)
def group(pairs):
    return bytes([5, len(pairs)]) + b"".join(bytes(p) for p in pairs)
def inb(link, src, b):
    return bytes([6, link, 0]) + struct.pack("!H", 5000) + bytes(src) + bytes(b)
pkt = [20, 0, 0, 17, 1, 0, 5, 2, 0, 7, 4, 1]
setup = (ep(2, 1, [192, 0, 2, 2], 4800) + ep(2, 2, [198, 51, 100, 2], 4800)
         + ep(2, 3, [203, 0, 113, 2], 4800) + ep(1, 1, [192, 0, 2, 1], 4800)
         + policy(2, [(1, 2), (2, 1), (3, 1)])
         + batch([route(0, 16, 2, [10, 2, 0, 0]), route(0, 16, 1, [10, 1, 0, 0])]))
seeds = {
    "multi": setup + out(pkt) + out(pkt[:10] + [9, 9]) + inb(1, [203, 0, 113, 9], pkt),
    "unlisted": setup + inb(3, [203, 0, 113, 9], pkt) + out(pkt),
    "badbatch": setup + batch([route(1, 16, 2, [10, 2, 0, 0]), route(0, 40, 2, [10, 3, 0, 0])]) + out(pkt),
    "dellink": setup + bytes([0x80 | 1 << 3 | 1]) + out(pkt) + policy(2, [(1, 0)]),
    # Peer group 3 of peers 1 and 2, routed to, emptied and deleted.
    "group": setup + group([(1, 1), (2, 3)]) + batch([route(0, 16, 3, [10, 2, 0, 0])])
             + out(pkt) + inb(1, [192, 0, 2, 1], pkt) + group([]) + out(pkt)
             + bytes([5 | 1 << 3]) + out(pkt),
}
for name, data in seeds.items():
    (d / name).write_bytes(data)
PY

# Path MTU seeds: [mtu:2] + a packet: a TCP SYN with MSS 1460, a UDP packet with
# DF and one without (with options), an ICMP echo, an IPv6 UDP packet.
python3 - "$out/seeds-pmtu" <<'PY'
import struct, sys, pathlib
d = pathlib.Path(sys.argv[1])
S4, D4 = bytes([10, 1, 0, 5]), bytes([10, 2, 0, 7])
def fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s
def csum(b, s=0):
    b += b"\0" * (len(b) % 2)
    return fold(s + sum(struct.unpack(f"!{len(b)//2}H", b)))
def ip4(proto, l4, flags=0x4000, opts=b""):
    hl = 20 + len(opts)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | hl // 4, 0, hl + len(l4), 1, flags, 64, proto, 0, S4, D4) + opts
    return h[:10] + struct.pack("!H", 0xFFFF - csum(h)) + h[12:] + l4
def tcp_syn(mss):
    seg = bytearray(struct.pack("!HHIIBBHHH", 1, 80, 1, 0, 6 << 4, 2, 500, 0, 0) + struct.pack("!BBH", 2, 4, mss))
    c = 0xFFFF - csum(bytes(seg), csum(S4 + D4 + struct.pack("!BBH", 0, 6, len(seg))))
    seg[16:18] = struct.pack("!H", c)
    return bytes(seg)
udp = struct.pack("!HHHH", 1, 2, 8 + 1400, 0) + bytes(1400)
ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, b"\xfd" + bytes(15), b"\xfd" + bytes(14) + b"\x07") + udp
seeds = {
    "syn": struct.pack("!H", 1280 - 576) + ip4(6, tcp_syn(1460)),
    "df": struct.pack("!H", 1280 - 576) + ip4(17, udp),
    "nodf": struct.pack("!H", 1000 - 576) + ip4(17, udp, 0, bytes([0x94, 4, 0, 0])),
    "echo": struct.pack("!H", 0) + ip4(1, bytes([8, 0, 0, 0, 0, 0, 0, 0]) + bytes(1000)),
    "ip6": struct.pack("!H", 1300 - 576) + ip6,
}
for name, b in seeds.items():
    (d / name).write_bytes(b)
PY

# Rules seeds (fuzz_rules.c): a table, then packets [len:2][bytes]: TCP to a
# ported rule, UDP, a fragment, ICMP, IPv6, garbage.
python3 - "$out/seeds-rules" <<'PY'
import struct, sys, pathlib
d = pathlib.Path(sys.argv[1])
def ip4(proto, l4, src=(10, 1, 0, 5), dst=(10, 2, 0, 7), frag=0):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, frag, 64, proto, 0,
                       bytes(src), bytes(dst)) + l4
def ip6(proto, l4):
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, b"\xfd" + bytes(15),
                       b"\xfd\x02" + bytes(14)) + l4
def pkts(*ps):
    return b"".join(struct.pack("!H", len(p)) + p for p in ps)
def rule(flags, proto, srcs, dsts, ports):
    out = bytes([flags, proto, len(srcs), len(dsts), len(ports)])
    for fam_plen, addr in srcs + dsts:
        out += bytes([fam_plen]) + bytes(addr)
    for lo, hi in ports:
        out += struct.pack("!HH", lo, hi)
    return out
l4 = struct.pack("!HH", 1000, 445) + bytes(16)
traffic = pkts(ip4(6, l4), ip4(17, l4), ip4(17, l4, frag=0x2000), ip4(1, bytes(8)),
               ip4(6, l4, dst=(10, 200, 0, 7)), ip6(17, l4), ip6(0, l4), b"\x45\x00")
seeds = {
    # tcp 445 offcloud secondary none, dst 10.2.0.0/16; then any cloud
    "two": bytes([2]) + rule(0x0B, 6, [], [(16, (10, 2, 0, 0))], [(445, 445)])
           + rule(0x00, 0, [], [], []) + traffic,
    # secondary cloud for udp from 10.1.0.0/24; icmp offcloud automatic; an IPv6 /16
    "three": bytes([3]) + rule(0x05 | 0x08, 17, [(24, (10, 1, 0, 0))], [], [])
             + rule(0x09, 1, [], [], [])
             + rule(0x01, 0, [], [(0x80 | 8, b"\xfd\x02" + bytes(14))], [(1, 65535)]) + traffic,
    "none": bytes([0]) + traffic,
    # Built packets (fuzz_rules.c, build_chain): IPv6 TCP to 445 after Hop-by-Hop and
    # Destination Options, a first and a later fragment, nine headers, one cut short;
    # an IPv4 first and later fragment.
    "chains": bytes([2]) + rule(0x0B, 6, [], [], [(445, 445)]) + rule(0x01, 17, [], [], [(53, 53)])
              + b"".join(b"\x80\x00" + bytes([f, len(e) // 2, 1, 1, p, 0x03, 0xE8, 0x01, 0xBD]) + e + c
                         for f, p, e, c in (
                             (0, 0, bytes([0, 0, 3, 1]), b"\xff\xff"),
                             (0, 1, bytes([2, 0x80]), b"\xff\xff"),
                             (0, 1, bytes([2, 0x03]), b"\xff\xff"),
                             (0, 0, bytes([3, 0]) * 9, b"\xff\xff"),
                             (0, 0, bytes([0, 0, 3, 1]), b"\x00\x34"),
                             (1, 1, bytes([0x20, 0]), b"\xff\xff"),
                             (1, 1, bytes([0x20, 3]), b"\xff\xff"))),
}
for name, b in seeds.items():
    (d / name).write_bytes(b)
PY

cd "$out"
in_secs=$(( secs / 2 > 0 ? secs / 2 : 1 ))
off_secs=$(( secs / 8 > 0 ? secs / 8 : 1 ))
links_secs=$(( secs / 8 > 0 ? secs / 8 : 1 ))
rules_secs=$(( secs / 8 > 0 ? secs / 8 : 1 ))
pmtu_secs=$(( secs - in_secs - off_secs - links_secs - rules_secs > 0 ? secs - in_secs - off_secs - links_secs - rules_secs : 1 ))
./fuzz_inbound -max_total_time="$in_secs" -max_len=9400 -print_final_stats=1 corpus seeds
./fuzz_offload -max_total_time="$off_secs" -max_len=70000 -print_final_stats=1 \
    corpus-offload seeds-offload
./fuzz_links -max_total_time="$links_secs" -max_len=4096 -print_final_stats=1 \
    corpus-links seeds-links
./fuzz_pmtu -max_total_time="$pmtu_secs" -max_len=9300 -print_final_stats=1 \
    corpus-pmtu seeds-pmtu
./fuzz_rules -max_total_time="$rules_secs" -max_len=4096 -print_final_stats=1 \
    corpus-rules seeds-rules
