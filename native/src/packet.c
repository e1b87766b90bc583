/*
 * packet.c - the wire codec (data packet header, nonce) and address helpers.
 *
 *   0      1..3      4..7             8..15            16..      last 16
 *   type   reserved  receiver index   counter (BE)     ciphertext  GCM tag
 *   0xD0   zero      (BE)
 *
 * AAD is the 16-byte header; nonce is 4 zero bytes || counter (BE).
 */
#include "fp_internal.h"

#include <netinet/in.h>
#include <string.h>

static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

static inline uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

void fp_hdr_write(uint8_t *h, uint32_t index, uint64_t counter)
{
    h[0] = FP_TYPE_DATA;
    h[1] = h[2] = h[3] = 0;
    put_be32(h + 4, index);
    put_be64(h + 8, counter);
}

int fp_hdr_parse(const uint8_t *p, size_t len, uint32_t *index, uint64_t *counter)
{
    if (len < FP_OVERHEAD || len > (size_t)FP_MAX_INNER + FP_OVERHEAD)
        return -1;
    if (p[0] != FP_TYPE_DATA || p[1] || p[2] || p[3])
        return -1;
    *index = get_be32(p + 4);
    *counter = (uint64_t)get_be32(p + 8) << 32 | get_be32(p + 12);
    return 0;
}

void fp_nonce(uint8_t iv[12], uint64_t counter)
{
    memset(iv, 0, 4);
    put_be64(iv + 4, counter);
}

/* Destination of an IP packet into addr (16 bytes, IPv4 zero-padded);
 * returns 4 or 6, or -1 if this is not a plausible IP packet. */
/* The source (dst = false) or destination address of an IP packet. */
static int ip_addr(const uint8_t *ip, size_t len, uint8_t addr[16], bool dst)
{
    if (len < 1)
        return -1;
    switch (ip[0] >> 4) {
    case 4:
        if (len < 20 || (ip[0] & 0x0f) < 5)
            return -1;
        memcpy(addr, ip + (dst ? 16 : 12), 4);
        memset(addr + 4, 0, 12);
        return 4;
    case 6:
        if (len < 40)
            return -1;
        memcpy(addr, ip + (dst ? 24 : 8), 16);
        return 6;
    default:
        return -1;
    }
}

int fp_ip_dst(const uint8_t *ip, size_t len, uint8_t addr[16])
{
    return ip_addr(ip, len, addr, true);
}

int fp_ip_src(const uint8_t *ip, size_t len, uint8_t addr[16])
{
    return ip_addr(ip, len, addr, false);
}

bool fp_addr_valid(const struct fp_addr *a)
{
    return a && (a->family == 4 || a->family == 6);
}

void fp_addr_normalize(struct fp_addr *a)
{
    if (a->family == 4)
        memset(a->addr + 4, 0, 12);
}

bool fp_addr_equal(const struct fp_addr *a, const struct fp_addr *b)
{
    return a->family == b->family && a->port == b->port &&
           memcmp(a->addr, b->addr, a->family == 4 ? 4 : 16) == 0;
}

int fp_addr_to_sockaddr(const struct fp_addr *a, int sock_family,
                        struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    if (a->family == 4 && sock_family == AF_INET) {
        struct sockaddr_in *s = (struct sockaddr_in *)ss;
        s->sin_family = AF_INET;
        s->sin_port = htons(a->port);
        memcpy(&s->sin_addr, a->addr, 4);
        *len = sizeof(*s);
        return 0;
    }
    if (sock_family == AF_INET6 && (a->family == 4 || a->family == 6)) {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)ss;
        s->sin6_family = AF_INET6;
        s->sin6_port = htons(a->port);
        if (a->family == 4) {
            /* A dual-stack socket reaches IPv4 through mapped addresses. */
            s->sin6_addr.s6_addr[10] = 0xff;
            s->sin6_addr.s6_addr[11] = 0xff;
            memcpy(&s->sin6_addr.s6_addr[12], a->addr, 4);
        } else {
            memcpy(&s->sin6_addr, a->addr, 16);
        }
        *len = sizeof(*s);
        return 0;
    }
    return -1;
}

void fp_addr_from_sockaddr(const struct sockaddr_storage *ss, struct fp_addr *a)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    memset(a, 0, sizeof(*a));
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)ss;
        a->family = 4;
        a->port = ntohs(s->sin_port);
        memcpy(a->addr, &s->sin_addr, 4);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)ss;
        a->port = ntohs(s->sin6_port);
        if (memcmp(&s->sin6_addr, mapped, 12) == 0) {
            a->family = 4;
            memcpy(a->addr, &s->sin6_addr.s6_addr[12], 4);
        } else {
            a->family = 6;
            memcpy(a->addr, &s->sin6_addr, 16);
        }
    }
}

/* ------------------------------------------------------------------ flows */

/* Murmur3's 64-bit finaliser: every input bit reaches every output bit. */
uint64_t fp_mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    x ^= x >> 33;
    return x;
}

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Ports only where they exist in every packet of the flow: TCP and UDP, not
 * in fragments (a later fragment has none, and all fragments of a datagram
 * must take one link or they arrive out of order). IPv6 extension headers are
 * not walked: such packets hash by addresses and next header, which keeps a
 * flow together just the same. Not symmetric: each side picks its own link. */
uint64_t fp_flow_hash(const uint8_t *ip, size_t len)
{
    uint64_t h = 0, ports = 0;
    uint8_t proto;
    if (len >= 20 && ip[0] >> 4 == 4) {
        size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
        proto = ip[9];
        bool frag = ((ip[6] & 0x3f) | ip[7]) != 0;
        if (!frag && (proto == 6 || proto == 17) && ihl >= 20 && len >= ihl + 4)
            ports = load32(ip + ihl);
        h = fp_mix64(load64(ip + 12));
    } else if (len >= 40 && ip[0] >> 4 == 6) {
        proto = ip[6];
        if ((proto == 6 || proto == 17) && len >= 44)
            ports = load32(ip + 40);
        h = fp_mix64(load64(ip + 8) ^ fp_mix64(load64(ip + 16) ^ UINT64_C(0x9E3779B97F4A7C15)));
        h = fp_mix64(h ^ load64(ip + 24));
        h = fp_mix64(h ^ load64(ip + 32));
    } else {
        return 0;
    }
    return fp_mix64(h ^ ((uint64_t)proto << 32 | ports));
}

static inline uint16_t load_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* An IPv6 extension header the rules walk past: its length from its first two bytes, or 0
 * if `nh` is not one (an upper-layer protocol, ESP, No Next Header, or unknown). The
 * Fragment header (44) is handled by the caller. */
static size_t ext_len(uint8_t nh, const uint8_t *p)
{
    switch (nh) {
    case 0:   /* Hop-by-Hop Options */
    case 43:  /* Routing */
    case 60:  /* Destination Options */
    case 135: /* Mobility */
    case 139: /* HIP */
    case 140: /* Shim6 */
    case 253: /* experimentation and testing (RFC 3692) */
    case 254:
        return ((size_t)p[1] + 1) * 8;
    case 51:  /* AH: its length in 4-byte words, minus 2 */
        return ((size_t)p[1] + 2) * 4;
    default:
        return 0;
    }
}

static bool is_ext(uint8_t nh)
{
    static const uint8_t z[2];
    return nh == 44 || ext_len(nh, z) != 0;
}

/* The transport rules' view of a packet: addresses, the upper-layer protocol and, for TCP
 * and UDP, the ports (docs/dataplane.md, "Transport rules").
 *
 * IPv6 extension headers are walked (at most FP_FLOW_MAX_EXT, never past the packet) to the
 * upper-layer header. A first fragment (offset 0, IPv4 or IPv6) has its ports when they are
 * in it. What the packet does not show is flagged instead of guessed: FP_FLOW_PORTS_UNKNOWN
 * for a later fragment, or a TCP/UDP header cut short; FP_FLOW_PROTO_UNKNOWN (ports too)
 * for an IPv6 header chain cut short or longer than the bound, or a later IPv6 fragment
 * whose fragment header names another extension header. rules.c takes an unknown field as
 * matching, so no packet slips past a rule by hiding it. -1 only for what is no IPv4/IPv6
 * packet at all (which fp_ip_dst refused before). */
int fp_flow_parse(const uint8_t *ip, size_t len, struct fp_flow *f)
{
    memset(f, 0, sizeof(*f));
    size_t l4;
    if (len >= 20 && ip[0] >> 4 == 4) {
        size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
        if (ihl < 20)
            return -1;
        f->family = 4;
        f->proto = ip[9];
        memcpy(f->src, ip + 12, 4);
        memcpy(f->dst, ip + 16, 4);
        if (((ip[6] & 0x1f) | ip[7]) != 0) {
            /* A later fragment: the protocol, never ports. */
            if (f->proto == 6 || f->proto == 17)
                f->unknown = FP_FLOW_PORTS_UNKNOWN;
            return 0;
        }
        l4 = ihl; /* unfragmented, or the first fragment (MF, offset 0) */
    } else if (len >= 40 && ip[0] >> 4 == 6) {
        f->family = 6;
        memcpy(f->src, ip + 8, 16);
        memcpy(f->dst, ip + 24, 16);
        uint8_t nh = ip[6];
        size_t off = 40;
        int n = 0;
        while (is_ext(nh)) {
            if (n++ == FP_FLOW_MAX_EXT || len < off + 8) {
                /* Too long a chain, or cut short (every extension header is at least 8
                 * bytes): the upper layer is not known. */
                f->proto = nh;
                f->unknown = FP_FLOW_PROTO_UNKNOWN | FP_FLOW_PORTS_UNKNOWN;
                return 0;
            }
            const uint8_t *h = ip + off;
            if (nh == 44) {
                if (((h[2] << 8 | h[3]) & 0xfff8) != 0) {
                    /* A later fragment: its header names the fragmentable part's first
                     * header, the upper layer unless another extension header. */
                    f->proto = h[0];
                    if (is_ext(h[0]))
                        f->unknown = FP_FLOW_PROTO_UNKNOWN | FP_FLOW_PORTS_UNKNOWN;
                    else if (h[0] == 6 || h[0] == 17)
                        f->unknown = FP_FLOW_PORTS_UNKNOWN;
                    return 0;
                }
                off += 8;
            } else {
                off += ext_len(nh, h);
            }
            nh = h[0];
        }
        f->proto = nh;
        l4 = off;
        if (l4 > len) {
            /* The last extension header runs past the packet: cut short. */
            f->unknown = FP_FLOW_PROTO_UNKNOWN | FP_FLOW_PORTS_UNKNOWN;
            return 0;
        }
    } else {
        return -1;
    }
    if (f->proto == 6 || f->proto == 17) {
        if (l4 <= len && len - l4 >= 4) { /* IPv4 options may run past the end */
            f->has_ports = 1;
            f->sport = load_be16(ip + l4);
            f->dport = load_be16(ip + l4 + 2);
        } else {
            f->unknown = FP_FLOW_PORTS_UNKNOWN;
        }
    }
    return 0;
}
