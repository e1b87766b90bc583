/*
 * fuzz_pmtu.c - libFuzzer target over the path MTU code: the ICMP error for a
 * packet too big, the TCP MSS clamp, the IPv4 fragmenter, and a packet through
 * fp_process_outbound toward a peer with a path MTU.
 *
 * Input: [mtu:2][packet...]. The MTU (576..65535 by folding) is the peer's
 * path MTU; the packet is an arbitrary IPv4/IPv6 (or garbage) packet. Checked
 * besides memory safety:
 *   - an ICMP error is at most 576 (IPv4) or 1280 (IPv6) bytes, with valid
 *     header and ICMP checksums, addressed back to the packet's source;
 *   - the MSS clamp keeps a valid TCP checksum valid and never raises the MSS;
 *   - fragments are at most the MTU, have valid header checksums, contiguous
 *     offsets and MF on all but the last, and their payloads add up to the
 *     packet's;
 *   - the outbound verdict agrees: SEND only for packets that fit, TUN (an
 *     ICMP error) or FRAGMENT (the packet itself) or DROP for the others.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpath.h"

#define CHECK(x) do { if (!(x)) abort(); } while (0)

static const uint8_t K[FP_KEY_LEN] = {7};

/* The Internet checksum again, written apart from pmtu.c's on purpose: the fuzzer checks the
 * fast path's checksums with an oracle that does not share its code. */
static uint32_t sum16(uint32_t s, const uint8_t *p, size_t len)
{
    while (len > 1) {
        s += (uint32_t)p[0] << 8 | p[1];
        p += 2;
        len -= 2;
    }
    if (len)
        s += (uint32_t)p[0] << 8;
    return s;
}

static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* TCP checksum of an IPv4/IPv6 packet without extension headers verifies. */
static int tcp_ok(const uint8_t *ip, size_t len)
{
    size_t l3;
    uint32_t s;
    if (ip[0] >> 4 == 4) {
        l3 = (size_t)(ip[0] & 15) * 4;
        if (l3 < 20 || len < l3 + 20 || ip[9] != 6)
            return -1;
        s = sum16(0, ip + 12, 8) + 6 + (uint32_t)(len - l3);
    } else {
        l3 = 40;
        if (len < 60 || ip[6] != 6)
            return -1;
        s = sum16(0, ip + 8, 32) + 6 + (uint32_t)(len - l3);
    }
    return fold(sum16(s, ip + l3, len - l3)) == 0xffff;
}

static void check_icmp(const uint8_t *ip, size_t len, const uint8_t *e, int n)
{
    if (n <= 0)
        return;
    if (e[0] >> 4 == 4) {
        CHECK(n <= 576 && n >= 28 && get16(e + 2) == n);
        CHECK(fold(sum16(0, e, 20)) == 0xffff);
        CHECK(fold(sum16(0, e + 20, (size_t)n - 20)) == 0xffff);
        CHECK(e[20] == 3 && e[21] == 4 && memcmp(e + 16, ip + 12, 4) == 0);
    } else {
        CHECK(e[0] >> 4 == 6 && n <= 1280 && n >= 48 && get16(e + 4) == n - 40);
        uint32_t s = sum16(0, e + 8, 32) + 58 + (uint32_t)(n - 40);
        CHECK(fold(sum16(s, e + 40, (size_t)n - 40)) == 0xffff);
        CHECK(e[40] == 2 && memcmp(e + 24, ip + 8, 16) == 0);
    }
    CHECK((size_t)n - (e[0] >> 4 == 4 ? 28u : 48u) <= len);
}

static void check_frags(const uint8_t *ip, size_t len, uint32_t mtu)
{
    static uint8_t out[1 << 17];
    uint32_t lens[64];
    int n = fp_test_ip4_fragment(ip, len, mtu, out, sizeof(out), lens, 64);
    if (n <= 0)
        return;
    size_t ihl = (size_t)(ip[0] & 15) * 4, total = get16(ip + 2);
    size_t at = 0, payload = 0;
    uint16_t frag0 = get16(ip + 6);
    for (int i = 0; i < n; i++) {
        const uint8_t *f = out + at;
        size_t hl = (size_t)(f[0] & 15) * 4;
        CHECK(lens[i] <= mtu && hl >= 20 && hl <= lens[i] && get16(f + 2) == lens[i]);
        CHECK(fold(sum16(0, f, hl)) == 0xffff);
        uint16_t fl = get16(f + 6);
        CHECK((size_t)(fl & 0x1fff) * 8 == (size_t)(frag0 & 0x1fff) * 8 + payload);
        CHECK(i + 1 == n ? (fl & 0x2000) == (frag0 & 0x2000) : (fl & 0x2000) != 0);
        CHECK(memcmp(f + hl, ip + ihl + payload, lens[i] - hl) == 0);
        payload += lens[i] - hl;
        at += lens[i];
    }
    CHECK(payload == total - ihl);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[FP_MAX_INNER + 64], icmp[1280], out[FP_MAX_INNER + 128];
    if (size < 3)
        return 0;
    uint32_t mtu = 576 + get16(data) % (65536 - 576);
    const uint8_t *ip = data + 2;
    size_t len = size - 2;
    if (len > FP_MAX_INNER)
        len = FP_MAX_INNER;
    uint32_t inner = mtu - 60;

    check_icmp(ip, len, icmp, fp_test_icmp_too_big(ip, len, inner, icmp, sizeof(icmp)));

    memcpy(buf, ip, len);
    int before = tcp_ok(buf, len);
    if (fp_test_mss_clamp(buf, len, inner) == 1) {
        CHECK(before >= 0);
        if (before == 1)
            CHECK(tcp_ok(buf, len) == 1);
        CHECK(memcmp(buf, ip, len) != 0);
    }
    check_frags(ip, len, inner);

    /* The same packet through a fast path toward a peer with that path MTU. */
    static fp_t *fp;
    if (!fp) {
        struct fp_config cfg;
        fp_config_default(&cfg);
        CHECK(fp_new(&cfg, &fp) == 0);
        CHECK(fp_peer_add(fp, 2) == 0);
        CHECK(fp_key_install(fp, 2, 5, K, K) == 0);
        CHECK(fp_key_activate(fp, 2, 5, 6) == 0);
        struct fp_addr ep;
        memset(&ep, 0, sizeof(ep));
        ep.family = 4;
        ep.port = 4800;
        ep.addr[0] = 192;
        CHECK(fp_peer_set_endpoint(fp, 2, 1, &ep) == 0);
        struct fp_addr any4, any6;
        memset(&any4, 0, sizeof(any4));
        memset(&any6, 0, sizeof(any6));
        any4.family = 4;
        any6.family = 6;
        CHECK(fp_route_set(fp, &any4, 0, 2) == 0);
        CHECK(fp_route_set(fp, &any6, 0, 2) == 0);
    }
    CHECK(fp_peer_set_mtu(fp, 2, mtu) == 0);
    struct fp_result res;
    CHECK(fp_process_outbound(fp, ip, len, out, sizeof(out), &res) == 0);
    switch (res.verdict) {
    case FP_V_SEND:
        CHECK(res.out_len == len + FP_OVERHEAD && len <= inner);
        break;
    case FP_V_TUN:
        CHECK(len > inner);
        check_icmp(ip, len, out, (int)res.out_len);
        break;
    case FP_V_FRAGMENT:
        CHECK(len > inner && res.out_len == len && memcmp(out, ip, len) == 0);
        break;
    default:
        CHECK(res.verdict == FP_V_DROP);
    }
    return 0;
}
