#!/bin/sh
# Build the libFuzzer target over fp_process_inbound with Debian's clang
# (ASan + UBSan) and run it for a bounded time: native/fuzz/run.sh [SECONDS]
# (default 60). Exits non-zero if the fuzzer finds a crash; the reproducer is
# left in native/out/fuzz/.
set -eu
secs=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
native=$(dirname "$here")
out="$native/out/fuzz"
mkdir -p "$out/corpus" "$out/seeds"

clang -std=c11 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Werror \
    -I"$native/include" -I"$native/src" \
    "$native"/src/*.c "$here/fuzz_inbound.c" -lcrypto -lpthread -o "$out/fuzz_inbound"

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
}
for name, data in seeds.items():
    (d / name).write_bytes(data)
PY

cd "$out"
./fuzz_inbound -max_total_time="$secs" -max_len=9400 -print_final_stats=1 corpus seeds
