/*
 * pmtu.c - what an inner packet too big for its peer's path gets, and the
 * per-peer TCP MSS clamp (docs/dataplane.md, "Path MTU"). Pure functions over
 * one packet; process.c decides when they apply.
 *
 *   too big, IPv4 with DF    -> ICMP type 3 code 4 with the next-hop MTU
 *   too big, IPv6            -> ICMPv6 type 2 (packet too big) with the MTU
 *   too big, IPv4 without DF -> nothing here (dropped by the caller)
 *
 * Errors are never sent about ICMP errors, later fragments, or packets whose
 * source is no single host (RFC 1812 4.3.2.7, RFC 4443 2.4). The error's
 * source address is the original destination, which routes back through the
 * tunnel, so reverse-path filters on the way to the LAN host accept it.
 */
#include "fp_internal.h"

#include <errno.h>
#include <string.h>

#define ICMP4_QUOTE_MAX (576 - 28)  /* RFC 1812: the whole error within 576 bytes */
#define ICMP6_QUOTE_MAX (1280 - 48) /* RFC 4443: within the IPv6 minimum MTU */

static uint64_t sum16(uint64_t s, const uint8_t *p, size_t len)
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

static uint16_t fold(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* Whether an ICMP error may be sent about this IPv4 packet. */
static bool icmp4_due(const uint8_t *ip, size_t len, size_t ihl)
{
    if ((ip[6] & 0x1f) | ip[7])
        return false;                   /* a later fragment */
    uint8_t s0 = ip[12], d0 = ip[16];
    if (s0 == 0 || s0 == 127 || s0 >= 224 || d0 >= 224)
        return false;                   /* no single host, or multicast/broadcast */
    if (ip[9] == 1 && len > ihl) {
        uint8_t t = ip[ihl];
        if (t == 3 || t == 4 || t == 5 || t == 11 || t == 12)
            return false;               /* an ICMP error itself */
    }
    return true;
}

static int icmp4_too_big(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    if (ihl < 20 || ihl > len)
        return -1;
    if (!(ip[6] & 0x40) || !icmp4_due(ip, len, ihl))
        return 0;
    if (cap < 28 + ihl + 8 && cap < 28 + len)
        return 0;
    size_t q = len;
    if (q > ICMP4_QUOTE_MAX)
        q = ICMP4_QUOTE_MAX;
    if (q > cap - 28)
        q = cap - 28;
    uint8_t *h = out, *m = out + 20;
    memset(out, 0, 28);
    h[0] = 0x45;
    h[1] = 0xc0;                        /* internetwork control, as routers send it */
    put16(h + 2, (uint16_t)(28 + q));
    h[8] = 64;
    h[9] = 1;
    memcpy(h + 12, ip + 16, 4);
    memcpy(h + 16, ip + 12, 4);
    put16(h + 10, (uint16_t)~fold(sum16(0, h, 20)));
    m[0] = 3;
    m[1] = 4;
    put16(m + 6, (uint16_t)(mtu > 0xffff ? 0xffff : mtu));
    memcpy(m + 8, ip, q);
    put16(m + 2, (uint16_t)~fold(sum16(0, m, 8 + q)));
    return (int)(28 + q);
}

static int icmp6_too_big(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap)
{
    if (len < 40)
        return -1;
    static const uint8_t zero[16];
    if (memcmp(ip + 8, zero, 16) == 0 || ip[8] == 0xff || ip[24] == 0xff)
        return 0;                       /* unspecified or multicast source; multicast group */
    if (ip[6] == 58 && len > 40 && ip[40] < 128)
        return 0;                       /* an ICMPv6 error itself */
    if (cap < 48 + 48)
        return 0;
    size_t q = len;
    if (q > ICMP6_QUOTE_MAX)
        q = ICMP6_QUOTE_MAX;
    if (q > cap - 48)
        q = cap - 48;
    uint8_t *h = out, *m = out + 40;
    memset(out, 0, 48);
    h[0] = 0x60;
    put16(h + 4, (uint16_t)(8 + q));
    h[6] = 58;
    h[7] = 64;
    memcpy(h + 8, ip + 24, 16);
    memcpy(h + 24, ip + 8, 16);
    m[0] = 2;
    m[4] = (uint8_t)(mtu >> 24);
    m[5] = (uint8_t)(mtu >> 16);
    m[6] = (uint8_t)(mtu >> 8);
    m[7] = (uint8_t)mtu;
    memcpy(m + 8, ip, q);
    uint64_t s = sum16(0, h + 8, 32);   /* pseudo-header: addresses, length, next header */
    s += 8 + q;
    s += 58;
    put16(m + 2, (uint16_t)~fold(sum16(s, m, 8 + q)));
    return (int)(48 + q);
}

int fp_icmp_too_big(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap)
{
    if (len < 1)
        return -1;
    if (ip[0] >> 4 == 4 && len >= 20)
        return icmp4_too_big(ip, len, mtu, out, cap);
    if (ip[0] >> 4 == 6)
        return icmp6_too_big(ip, len, mtu, out, cap);
    return -1;
}

bool fp_ip_df(const uint8_t *ip, size_t len)
{
    return len >= 20 && ip[0] >> 4 == 4 && (ip[6] & 0x40);
}

bool fp_tcp_syn(const uint8_t *ip, size_t len)
{
    size_t l3;
    if (len >= 20 && ip[0] >> 4 == 4) {
        l3 = (size_t)(ip[0] & 0x0f) * 4;
        if (ip[9] != 6 || ((ip[6] & 0x1f) | ip[7]))
            return false;
    } else if (len >= 40 && ip[0] >> 4 == 6) {
        if (ip[6] != 6)
            return false;
        l3 = 40;
    } else {
        return false;
    }
    return l3 >= 20 && len >= l3 + 20 && (ip[l3 + 13] & 0x02);
}

bool fp_mss_clamp(uint8_t *ip, size_t len, uint32_t inner_mtu)
{
    size_t l3, overhead;
    if (len >= 20 && ip[0] >> 4 == 4) {
        l3 = (size_t)(ip[0] & 0x0f) * 4;
        if (l3 < 20 || ip[9] != 6 || ((ip[6] & 0x1f) | ip[7]))
            return false;
        overhead = 40;
    } else if (len >= 40 && ip[0] >> 4 == 6) {
        if (ip[6] != 6)
            return false;               /* extension headers are not walked */
        l3 = 40;
        overhead = 60;
    } else {
        return false;
    }
    if (len < l3 + 20 || inner_mtu <= overhead)
        return false;
    uint8_t *tcp = ip + l3;
    size_t thl = (size_t)(tcp[12] >> 4) * 4;
    if (!(tcp[13] & 0x02) || thl < 20 || l3 + thl > len)
        return false;
    uint32_t max = inner_mtu - (uint32_t)overhead;
    if (max > 0xffff)
        return false;
    for (size_t i = 20; i < thl;) {
        uint8_t kind = tcp[i];
        if (kind == 0)
            break;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= thl)
            break;
        size_t olen = tcp[i + 1];
        if (olen < 2 || i + olen > thl)
            break;
        if (kind == 2 && olen == 4) {
            uint16_t old = get16(tcp + i + 2);
            if (old <= max)
                return false;
            uint16_t new = (uint16_t)max;
            put16(tcp + i + 2, new);
            /* RFC 1624: HC' = ~(~HC + ~m + m'). A field at an odd offset
             * straddles two words: it counts byte-swapped. */
            if ((i + 2) & 1) {
                old = (uint16_t)(old << 8 | old >> 8);
                new = (uint16_t)(new << 8 | new >> 8);
            }
            uint16_t hc = get16(tcp + 16);
            uint64_t s = (uint16_t)~hc;
            s += (uint16_t)~old;
            s += new;
            put16(tcp + 16, (uint16_t)~fold(s));
            return true;
        }
        i += olen;
    }
    return false;
}

int fp_test_icmp_too_big(const uint8_t *ip, size_t len, uint32_t inner_mtu, uint8_t *out,
                         size_t cap)
{
    if ((!ip && len) || !out)
        return -EINVAL;
    int n = fp_icmp_too_big(ip, len, inner_mtu, out, cap);
    return n < 0 ? -EINVAL : n;
}

int fp_test_mss_clamp(uint8_t *ip, size_t len, uint32_t inner_mtu)
{
    if (!ip && len)
        return -EINVAL;
    return fp_mss_clamp(ip, len, inner_mtu) ? 1 : 0;
}

/* The options of an IPv4 header that every fragment repeats (the copy flag,
 * RFC 791), padded to 4 bytes, into opts; returns their length. */
static size_t copied_options(const uint8_t *ip, size_t ihl, uint8_t *opts)
{
    size_t n = 0;
    for (size_t i = 20; i < ihl;) {
        uint8_t type = ip[i];
        if (type == 0)
            break;
        if (type == 1) {
            i++;
            continue;
        }
        if (i + 1 >= ihl || ip[i + 1] < 2 || i + ip[i + 1] > ihl)
            break;
        size_t olen = ip[i + 1];
        if (type & 0x80) {
            memcpy(opts + n, ip + i, olen);
            n += olen;
        }
        i += olen;
    }
    while (n % 4)
        opts[n++] = 0;
    return n;
}

int fp_ip4_fragment(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap,
                    size_t headroom, size_t tailroom, uint32_t *lens, uint32_t max,
                    size_t *stride_out)
{
    if (len < 20 || ip[0] >> 4 != 4)
        return -EINVAL;
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    size_t total = get16(ip + 2);
    if (ihl < 20 || ihl > len || total < ihl || total > len)
        return -EINVAL;
    if (ip[6] & 0x40)
        return -EINVAL;                 /* DF: not ours to cut */
    uint8_t opts[40];
    size_t later_ihl = 20 + copied_options(ip, ihl, opts);
    if (mtu < later_ihl + 8 || mtu < ihl + 8)
        return -EINVAL;
    size_t first = (mtu - ihl) & ~(size_t)7, rest = (mtu - later_ihl) & ~(size_t)7;
    size_t payload = total - ihl;
    size_t n = payload <= first ? 1 : 1 + (payload - first + rest - 1) / rest;
    size_t stride = headroom + mtu + tailroom;
    if (n > max || n * stride > cap)
        return -ENOSPC;
    uint16_t frag = get16(ip + 6);
    size_t base_off = (size_t)(frag & 0x1fff) * 8;
    bool last_mf = frag & 0x2000;
    /* A fragment whose pieces would start past the largest offset the 13-bit field holds
     * (a malformed or hostile packet: a real datagram ends by 65535) cannot be cut. */
    if (base_off + payload > 0xffff)
        return -EINVAL;
    const uint8_t *data = ip + ihl;
    size_t done = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t *f = out + i * stride + headroom;
        size_t hl = i == 0 ? ihl : later_ihl;
        size_t chunk = i == 0 ? first : rest;
        if (chunk > payload - done)
            chunk = payload - done;
        if (i == 0) {
            memcpy(f, ip, ihl);
        } else {
            memcpy(f, ip, 20);
            memcpy(f + 20, opts, later_ihl - 20);
            f[0] = (uint8_t)(0x40 | later_ihl / 4);
        }
        memcpy(f + hl, data + done, chunk);
        bool mf = i + 1 < n || last_mf;
        size_t off = (base_off + done) / 8;
        put16(f + 2, (uint16_t)(hl + chunk));
        put16(f + 6, (uint16_t)((mf ? 0x2000 : 0) | (off & 0x1fff)));
        f[10] = f[11] = 0;
        put16(f + 10, (uint16_t)~fold(sum16(0, f, hl)));
        lens[i] = (uint32_t)(hl + chunk);
        done += chunk;
    }
    *stride_out = stride;
    return (int)n;
}

int fp_test_ip4_fragment(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap,
                         uint32_t *lens, uint32_t max)
{
    size_t stride;
    if ((!ip && len) || !out || !lens)
        return -EINVAL;
    int n = fp_ip4_fragment(ip, len, mtu, out, cap, 0, 0, lens, max, &stride);
    if (n <= 0)
        return n;
    /* Back to back, as the other test hooks return packets. */
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        memmove(out + at, out + (size_t)i * stride, lens[i]);
        at += lens[i];
    }
    return n;
}
