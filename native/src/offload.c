/*
 * offload.c - segmentation and coalescing for the TUN offloads.
 *
 * With IFF_VNET_HDR the kernel hands the TUN thread "superpackets" of up to
 * 64 KiB (TSO/USO) preceded by a struct virtio_net_hdr, with the transport
 * checksum left partial. fp_gso_split cuts one into wire-sized IP packets
 * with their own lengths, IPv4 IDs, TCP sequence numbers and flags, and full
 * checksums, laid out with room for the tunnel header and tag around each so
 * they are sealed in place and leave contiguously for one UDP GSO send.
 *
 * In the other direction fp_gro_build groups decrypted packets bound for the
 * TUN: consecutive in-order TCP segments of one flow become one superpacket
 * (GSO_TCPV4/6, NEEDS_CSUM), and so do same-sized UDP datagrams of one flow
 * when the TUN takes USO (GSO_UDP_L4), each written with one writev, as the
 * kernel's own GRO would have built it; everything else is written alone.
 *
 * Both are pure functions over buffers (no fast path state), exposed to the
 * tests through fp_test_gso_segment / fp_test_gro_coalesce and fuzzed.
 * Checksums are RFC 1071 sums taken over memory in host order, so numeric
 * fields (lengths, protocol) enter them through htons.
 */
#include "fp_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ checksums */

static uint64_t sum_bytes(uint64_t s, const uint8_t *p, size_t len)
{
    /* 64-bit words with the carries counted separately: a ones' complement sum
     * over wider words folds to the same 16-bit sum (RFC 1071). */
    uint64_t a = 0, c = 0;
    while (len >= 32) {
        uint64_t v[4];
        memcpy(v, p, 32);
        c += __builtin_add_overflow(a, v[0], &a);
        c += __builtin_add_overflow(a, v[1], &a);
        c += __builtin_add_overflow(a, v[2], &a);
        c += __builtin_add_overflow(a, v[3], &a);
        p += 32;
        len -= 32;
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c += __builtin_add_overflow(a, v, &a);
        p += 8;
        len -= 8;
    }
    s += (a & 0xffffffffu) + (a >> 32) + c;
    while (len >= 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        s += v;
        p += 2;
        len -= 2;
    }
    if (len) {
        /* A trailing byte is the high half of a zero-padded big-endian word;
         * in host memory order that is what loading it with a zero after it gives. */
        uint16_t v = 0;
        memcpy(&v, p, 1);
        s += v;
    }
    return s;
}

static uint16_t fold(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

static void put16(uint8_t *p, uint16_t host_order_value)
{
    uint16_t v = htons(host_order_value);
    memcpy(p, &v, 2);
}

static uint16_t get16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return ntohs(v);
}

static uint32_t get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

static void put32(uint8_t *p, uint32_t v)
{
    v = htonl(v);
    memcpy(p, &v, 4);
}

static void ipv4_csum(uint8_t *ip, size_t ihl)
{
    ip[10] = ip[11] = 0;
    uint16_t c = (uint16_t)~fold(sum_bytes(0, ip, ihl));
    memcpy(ip + 10, &c, 2);
}

/* ------------------------------------------------------------------ vnet header */

void fp_vnet_parse(const uint8_t *b, struct fp_vnet *v)
{
    /* Legacy virtio headers are in the host's byte order. */
    v->flags = b[0];
    v->gso_type = b[1];
    memcpy(&v->hdr_len, b + 2, 2);
    memcpy(&v->gso_size, b + 4, 2);
    memcpy(&v->csum_start, b + 6, 2);
    memcpy(&v->csum_offset, b + 8, 2);
}

void fp_vnet_write(uint8_t *b, const struct fp_vnet *v)
{
    b[0] = v->flags;
    b[1] = v->gso_type;
    memcpy(b + 2, &v->hdr_len, 2);
    memcpy(b + 4, &v->gso_size, 2);
    memcpy(b + 6, &v->csum_start, 2);
    memcpy(b + 8, &v->csum_offset, 2);
}

int fp_csum_complete(const struct fp_vnet *v, uint8_t *pkt, size_t len)
{
    if (!(v->flags & FP_VNET_F_NEEDS_CSUM))
        return 0;
    size_t cs = v->csum_start, co = v->csum_offset;
    if (cs >= len || co + 2 > len - cs)
        return -EINVAL;
    /* The kernel left the pseudo-header sum in the field: sum over it too. */
    uint16_t c = (uint16_t)~fold(sum_bytes(0, pkt + cs, len - cs));
    memcpy(pkt + cs + co, &c, 2);
    return 0;
}

/* ------------------------------------------------------------------ segmentation */

int fp_gso_split(const struct fp_vnet *v, const uint8_t *pkt, size_t len, uint8_t *out,
                 size_t cap, size_t headroom, size_t tailroom, uint32_t *lens, uint32_t max_segs,
                 size_t *stride_out)
{
    int type = v->gso_type & ~FP_VNET_GSO_ECN;
    bool tcp;
    int version;
    if (len < 20 || len > FP_SUPER_MAX || !(v->flags & FP_VNET_F_NEEDS_CSUM) || !v->gso_size)
        return -EINVAL;
    version = pkt[0] >> 4;
    switch (type) {
    case FP_VNET_GSO_TCPV4:
        tcp = true;
        if (version != 4)
            return -EINVAL;
        break;
    case FP_VNET_GSO_TCPV6:
        tcp = true;
        if (version != 6)
            return -EINVAL;
        break;
    case FP_VNET_GSO_UDP_L4:
        tcp = false;
        if (version != 4 && version != 6)
            return -EINVAL;
        break;
    default:
        return -EPROTONOSUPPORT;
    }
    size_t cs = v->csum_start;
    uint8_t proto = tcp ? 6 : 17;
    if (version == 4) {
        size_t ihl = (size_t)(pkt[0] & 0x0f) * 4;
        if (ihl < 20 || cs != ihl || pkt[9] != proto)
            return -EINVAL;
        /* A fragment cannot be a GSO packet. */
        if (get16(pkt + 6) & 0x3fff)
            return -EINVAL;
    } else {
        if (len < 40 || cs < 40 || (cs == 40 && pkt[6] != proto))
            return -EINVAL;
    }
    size_t hlen;
    if (tcp) {
        if (v->csum_offset != 16 || cs + 20 > len)
            return -EINVAL;
        size_t thl = (size_t)(pkt[cs + 12] >> 4) * 4;
        if (thl < 20 || cs + thl > len)
            return -EINVAL;
        hlen = cs + thl;
    } else {
        if (v->csum_offset != 6 || cs + 8 > len)
            return -EINVAL;
        hlen = cs + 8;
    }
    size_t payload = len - hlen;
    size_t gso = v->gso_size;
    size_t nseg = payload ? (payload + gso - 1) / gso : 1;
    size_t stride = headroom + hlen + gso + tailroom;
    if (nseg > max_segs)
        return -EMSGSIZE;
    /* The last segment may be shorter; size the check by what is written. */
    if (cap < (nseg - 1) * stride + headroom + hlen + (payload - (nseg - 1) * gso) + tailroom)
        return -ENOSPC;
    if (hlen - cs + gso > 65535 || hlen + gso > 65535)
        return -EINVAL;

    uint16_t id = version == 4 ? get16(pkt + 4) : 0;
    uint32_t seq = tcp ? get32(pkt + cs + 4) : 0;
    uint8_t tflags = tcp ? pkt[cs + 13] : 0;
    /* Addresses and protocol of the pseudo-header are the same for every segment. */
    uint64_t ps = version == 4 ? sum_bytes(0, pkt + 12, 8) : sum_bytes(0, pkt + 8, 32);
    ps += htons(proto);
    for (size_t i = 0; i < nseg; i++) {
        uint8_t *s = out + i * stride + headroom;
        size_t off = i * gso;
        size_t chunk = payload - off < gso ? payload - off : gso;
        bool last = i + 1 == nseg;
        memcpy(s, pkt, hlen);
        memcpy(s + hlen, pkt + hlen + off, chunk);
        size_t l4 = hlen - cs + chunk;
        if (version == 4) {
            put16(s + 2, (uint16_t)(hlen + chunk));
            put16(s + 4, (uint16_t)(id + i));
            ipv4_csum(s, cs);
        } else {
            put16(s + 4, (uint16_t)(hlen - 40 + chunk));
        }
        if (tcp) {
            put32(s + cs + 4, seq + (uint32_t)off);
            uint8_t f = tflags;
            if (!last)
                f &= (uint8_t)~0x09; /* FIN and PSH belong to the last segment */
            if (i)
                f &= (uint8_t)~0x80; /* CWR only on the first, as the kernel does */
            s[cs + 13] = f;
        } else {
            put16(s + cs + 4, (uint16_t)l4);
        }
        uint8_t *csum = s + cs + v->csum_offset;
        csum[0] = csum[1] = 0;
        uint64_t sum = ps + htons((uint16_t)l4);
        uint16_t c = (uint16_t)~fold(sum_bytes(sum, s + cs, l4));
        if (!tcp && c == 0)
            c = 0xffff; /* zero means "no checksum" in UDP */
        memcpy(csum, &c, 2);
        lens[i] = (uint32_t)(hlen + chunk);
    }
    *stride_out = stride;
    return (int)nseg;
}

/* ------------------------------------------------------------------ coalescing */

struct l4_info {
    int version;
    uint8_t proto;     /* 6 or 17 */
    size_t iphl;       /* IP header length; the L4 header starts here */
    size_t hlen;       /* IP + L4 headers */
    size_t payload;
    uint32_t seq;      /* TCP */
    uint8_t flags;     /* TCP */
};

/* A TCP or UDP packet that may take part in coalescing: IPv4 without
 * fragmentation or IPv6 without extension headers, consistent lengths. */
static bool l4_parse(const uint8_t *p, size_t len, struct l4_info *t)
{
    if (len < 28)
        return false;
    t->version = p[0] >> 4;
    if (t->version == 4) {
        t->iphl = (size_t)(p[0] & 0x0f) * 4;
        t->proto = p[9];
        if (t->iphl < 20 || get16(p + 2) != len || (get16(p + 6) & 0x3fff))
            return false;
    } else if (t->version == 6) {
        t->iphl = 40;
        t->proto = p[6];
        if (len < 48 || get16(p + 4) + 40u != len)
            return false;
    } else {
        return false;
    }
    if (t->proto == 17) {
        if (t->iphl + 8 > len || get16(p + t->iphl + 4) != len - t->iphl)
            return false;
        t->hlen = t->iphl + 8;
        t->seq = 0;
        t->flags = 0;
    } else if (t->proto == 6) {
        if (t->iphl + 20 > len)
            return false;
        size_t thl = (size_t)(p[t->iphl + 12] >> 4) * 4;
        if (thl < 20 || t->iphl + thl > len)
            return false;
        t->hlen = t->iphl + thl;
        t->seq = get32(p + t->iphl + 4);
        t->flags = p[t->iphl + 13];
    } else {
        return false;
    }
    t->payload = len - t->hlen;
    return true;
}

/* Checksums are checked because a coalesced packet is handed over as
 * NEEDS_CSUM, and the kernel would then never notice a packet corrupted before
 * it was sealed; a damaged IPv4 header would even be repaired by rewriting it. */
static bool sums_valid(const uint8_t *p, size_t len, const struct l4_info *t)
{
    if (t->version == 4 && fold(sum_bytes(0, p, t->iphl)) != 0xffff)
        return false;
    /* UDP over IPv4 may go without a checksum; coalescing would invent one. */
    if (t->proto == 17 && p[t->iphl + 6] == 0 && p[t->iphl + 7] == 0)
        return false;
    uint64_t s = t->version == 4 ? sum_bytes(0, p + 12, 8) : sum_bytes(0, p + 8, 32);
    s += htons(t->proto);
    s += htons((uint16_t)(len - t->iphl));
    return fold(sum_bytes(s, p + t->iphl, len - t->iphl)) == 0xffff;
}

static bool same_flow(const uint8_t *a, const struct l4_info *ta, const uint8_t *b,
                      const struct l4_info *tb)
{
    if (ta->version != tb->version || ta->proto != tb->proto)
        return false;
    bool addrs = ta->version == 4 ? memcmp(a + 12, b + 12, 8) == 0 : memcmp(a + 8, b + 8, 32) == 0;
    return addrs && memcmp(a + ta->iphl, b + tb->iphl, 4) == 0;
}

struct gro_open {
    uint32_t head;
    uint32_t tail;
    struct l4_info t;    /* of the head */
    uint32_t next_seq;
    size_t total;        /* payload bytes so far */
    uint32_t count;
};

#define GRO_OPEN_MAX 8

static bool can_append(const uint8_t *h, const struct gro_open *g, const uint8_t *p,
                       const struct l4_info *t)
{
    const struct l4_info *ht = &g->t;
    if (t->hlen != ht->hlen || t->iphl != ht->iphl)
        return false;
    if (t->payload > ht->payload || g->count >= FP_GSO_SEGS_MAX)
        return false;
    /* The superpacket's IP length fields must hold it. */
    if (ht->hlen + g->total + t->payload > 65535)
        return false;
    if (ht->version == 4) {
        /* TOS, DF and TTL; options must be identical too. IDs must count up,
         * as cutting the superpacket again (forwarding) would make them. */
        if ((uint16_t)(get16(h + 4) + g->count) != get16(p + 4))
            return false;
        if (h[1] != p[1] || (h[6] & 0x40) != (p[6] & 0x40) || h[8] != p[8] ||
            memcmp(h + 20, p + 20, ht->iphl - 20) != 0)
            return false;
    } else {
        if (memcmp(h, p, 4) != 0 || h[7] != p[7])
            return false;
    }
    if (ht->proto == 17)
        return true;
    const uint8_t *ha = h + ht->iphl, *pa = p + t->iphl;
    /* Ack, header length, window, urgent pointer and options must match. */
    return t->seq == g->next_seq && memcmp(ha + 8, pa + 8, 5) == 0 &&
           memcmp(ha + 14, pa + 14, 2) == 0 &&
           memcmp(ha + 18, pa + 18, ht->hlen - ht->iphl - 18) == 0;
}

static void gro_finish(struct fp_gro_pkt *pk, struct gro_open *g)
{
    struct fp_gro_pkt *hp = &pk[g->head];
    memset(&hp->vnet, 0, sizeof(hp->vnet));
    if (g->count < 2)
        return;
    uint8_t *h = hp->p;
    const struct l4_info *t = &g->t;
    bool tcp = t->proto == 6;
    uint32_t l4 = (uint32_t)(t->hlen - t->iphl + g->total);
    if (t->version == 4) {
        put16(h + 2, (uint16_t)(t->hlen + g->total));
        ipv4_csum(h, t->iphl);
    } else {
        put16(h + 4, (uint16_t)(t->hlen - 40 + g->total));
    }
    if (tcp && (pk[g->tail].p[t->iphl + 13] & 0x08))
        h[t->iphl + 13] |= 0x08;
    if (!tcp)
        put16(h + t->iphl + 4, (uint16_t)l4);
    /* NEEDS_CSUM: the field holds the (uncomplemented) pseudo-header sum. */
    uint64_t s = t->version == 4 ? sum_bytes(0, h + 12, 8) : sum_bytes(0, h + 8, 32);
    s += htons(t->proto);
    s += htons((uint16_t)l4);
    uint16_t c = fold(s);
    memcpy(h + t->iphl + (tcp ? 16 : 6), &c, 2);
    hp->vnet.flags = FP_VNET_F_NEEDS_CSUM;
    hp->vnet.gso_type = !tcp ? FP_VNET_GSO_UDP_L4
                             : t->version == 4 ? FP_VNET_GSO_TCPV4 : FP_VNET_GSO_TCPV6;
    hp->vnet.hdr_len = (uint16_t)t->hlen;
    hp->vnet.gso_size = (uint16_t)t->payload;
    hp->vnet.csum_start = (uint16_t)t->iphl;
    hp->vnet.csum_offset = tcp ? 16 : 6;
}

void fp_gro_build(struct fp_gro_pkt *pk, uint32_t n, bool tcp, bool udp)
{
    struct gro_open open[GRO_OPEN_MAX];
    int nopen = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct fp_gro_pkt *c = &pk[i];
        struct l4_info t;
        c->next = UINT32_MAX;
        c->head = true;
        c->hlen = 0;
        memset(&c->vnet, 0, sizeof(c->vnet));
        if (!l4_parse(c->p, c->len, &t)) {
            /* Perhaps a fragment of some open flow: let nothing overtake it. */
            while (nopen)
                gro_finish(pk, &open[--nopen]);
            continue;
        }
        /* TCP: only data segments with ACK (and PSH, which ends a superpacket). */
        bool eligible = t.payload > 0 &&
                        (t.proto == 6 ? tcp && (t.flags == 0x10 || t.flags == 0x18) : udp) &&
                        sums_valid(c->p, c->len, &t);
        bool ends = t.proto == 6 && (t.flags & 0x08);
        int j;
        for (j = 0; j < nopen; j++)
            if (same_flow(pk[open[j].head].p, &open[j].t, c->p, &t))
                break;
        if (j < nopen) {
            struct gro_open *g = &open[j];
            if (eligible && can_append(pk[g->head].p, g, c->p, &t)) {
                c->head = false;
                c->hlen = (uint16_t)t.hlen;
                pk[g->tail].next = i;
                g->tail = i;
                g->count++;
                g->total += t.payload;
                g->next_seq = t.seq + (uint32_t)t.payload;
                if (t.payload < g->t.payload || ends) {
                    gro_finish(pk, g);
                    open[j] = open[--nopen];
                }
                continue;
            }
            /* Whatever comes next in this flow must not overtake this packet. */
            gro_finish(pk, g);
            open[j] = open[--nopen];
        }
        if (!eligible || ends)
            continue;
        if (nopen == GRO_OPEN_MAX) {
            gro_finish(pk, &open[0]);
            open[0] = open[--nopen];
        }
        struct gro_open *g = &open[nopen++];
        g->head = g->tail = i;
        g->t = t;
        g->next_seq = t.seq + (uint32_t)t.payload;
        g->total = t.payload;
        g->count = 1;
        c->hlen = (uint16_t)t.hlen;
    }
    for (int j = 0; j < nopen; j++)
        gro_finish(pk, &open[j]);
}

/* ------------------------------------------------------------------ test hooks */

int fp_test_gso_segment(const uint8_t *vnet, const uint8_t *pkt, size_t len, uint8_t *out,
                        size_t cap, uint32_t *seg_lens, uint32_t max_segs)
{
    struct fp_vnet v;
    if (!vnet || !pkt || !out || !seg_lens)
        return -EINVAL;
    fp_vnet_parse(vnet, &v);
    if ((v.gso_type & ~FP_VNET_GSO_ECN) == FP_VNET_GSO_NONE) {
        if (max_segs < 1 || cap < len)
            return -ENOSPC;
        memcpy(out, pkt, len);
        int rc = fp_csum_complete(&v, out, len);
        if (rc < 0)
            return rc;
        seg_lens[0] = (uint32_t)len;
        return 1;
    }
    size_t stride;
    int n = fp_gso_split(&v, pkt, len, out, cap, 0, 0, seg_lens, max_segs, &stride);
    if (n <= 0)
        return n;
    /* Pack the segments (the last stride may hold a short one) back to back. */
    size_t w = 0;
    for (int i = 0; i < n; i++) {
        memmove(out + w, out + (size_t)i * stride, seg_lens[i]);
        w += seg_lens[i];
    }
    return n;
}

int fp_test_gro_coalesce(const uint8_t *pkts, const uint32_t *lens, uint32_t n, uint8_t *out,
                         size_t cap, uint32_t *out_lens, uint32_t max_out)
{
    if ((!pkts && n) || (!lens && n) || !out || !out_lens || n > 4096)
        return -EINVAL;
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += lens[i];
    /* Coalescing rewrites head headers: work on a copy. */
    uint8_t *work = malloc(total ? total : 1);
    struct fp_gro_pkt *pk = calloc(n ? n : 1, sizeof(*pk));
    int rc = 0;
    if (!work || !pk) {
        rc = -ENOMEM;
        goto out;
    }
    if (total)
        memcpy(work, pkts, total);
    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        pk[i].p = work + off;
        pk[i].len = lens[i];
        off += lens[i];
    }
    /* Runs of FP_GRO_BATCH, as the link threads see them. */
    uint32_t outs = 0;
    size_t w = 0;
    for (uint32_t base = 0; base < n; base += FP_GRO_BATCH) {
        uint32_t m = n - base < FP_GRO_BATCH ? n - base : FP_GRO_BATCH;
        struct fp_gro_pkt *q = pk + base;
        fp_gro_build(q, m, true, true);
        for (uint32_t i = 0; i < m; i++) {
            if (!q[i].head)
                continue;
            size_t need = FP_VNET_LEN + q[i].len;
            for (uint32_t j = q[i].next; j != UINT32_MAX; j = q[j].next)
                need += q[j].len - q[j].hlen;
            if (outs == max_out || cap - w < need) {
                rc = -ENOSPC;
                goto out;
            }
            fp_vnet_write(out + w, &q[i].vnet);
            memcpy(out + w + FP_VNET_LEN, q[i].p, q[i].len);
            size_t o = w + FP_VNET_LEN + q[i].len;
            for (uint32_t j = q[i].next; j != UINT32_MAX; j = q[j].next) {
                memcpy(out + o, q[j].p + q[j].hlen, q[j].len - q[j].hlen);
                o += q[j].len - q[j].hlen;
            }
            out_lens[outs++] = (uint32_t)need;
            w += need;
        }
    }
    rc = (int)outs;
out:
    free(work);
    free(pk);
    return rc;
}
