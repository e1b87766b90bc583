/*
 * fuzz_rules.c - libFuzzer target over the transport rules: a rule table built from the
 * input (fp_rules_set checks every field: the input may be any bytes), then inner packets
 * from the input (untrusted: what a LAN host sends) through fp_process_outbound, whose
 * flow parser and rule matching see them.
 *
 * Input: [n_rules:1] then per rule [flags:1][proto:1][n_src:1][n_dst:1][n_ports:1], each
 * net [family/plen:1][addr:4 or 16], each port range [lo:2][hi:2]; the rest is packets,
 * each [len:2][bytes], or, when len's top bit is set, a packet built from a header chain
 * (build_chain below). Peers 1 (the route's), 2 (off-cloud), 3 (cloud), all without keys,
 * so a packet's verdict names the peer it would be sealed for. Checks besides the
 * sanitizers:
 *   - a packet goes to one of the route's peers, or is dropped as no_route, malformed or
 *     offcloud_down, and offcloud_down only when a rule matched;
 *   - the flow cache changes nothing: every packet again, after the same table was set
 *     anew (every cached flow stale), in reverse order, has the same verdict;
 *   - a refused table leaves the one before in force (same verdicts);
 *   - a built packet (IPv6 with an extension header chain, or an IPv4 fragment) matches the
 *     same rule as the plain packet (no extension headers, unfragmented) when its ports can
 *     be known, and otherwise (a later fragment, a chain too long or cut short) a rule no
 *     later than the plain packet's: hiding a field never moves a packet past its rule.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpath.h"

#define CHECK(x) do { if (!(x)) abort(); } while (0)
#define MAX_RULES 16
#define MAX_NETS 64
#define MAX_PORTS 32
#define MAX_PKTS 32

struct input {
    const uint8_t *p;
    size_t left;
};

static int take(struct input *in, void *out, size_t n)
{
    if (in->left < n) {
        memset(out, 0, n);
        in->left = 0;
        return -1;
    }
    memcpy(out, in->p, n);
    in->p += n;
    in->left -= n;
    return 0;
}

static fp_t *make(void)
{
    fp_t *fp;
    CHECK(fp_new(NULL, &fp) == 0);
    for (uint32_t p = 1; p <= 3; p++)
        CHECK(fp_peer_add(fp, p) == 0);
    struct fp_route_op ops[3];
    memset(ops, 0, sizeof(ops));
    struct fp_route_op ops6;
    memset(&ops6, 0, sizeof(ops6));
    /* 10.0.0.0/9 with both rule peers, 10.128.0.0/9 without an off-cloud one and a peer
     * that is no secondary (Alt-WAN), ::/0 with none, fd00::/8 with both: every secondary
     * is reachable. */
    for (int i = 0; i < 3; i++) {
        ops[i].verb = FP_ROUTE_SET;
        ops[i].peer_id = 1;
        ops[i].prefix.family = i < 2 ? 4 : 6;
        ops[i].plen = i < 2 ? 9 : 0;
        ops[i].cloud_peer = i < 2 ? 3 : 0;
    }
    ops[0].prefix.addr[0] = 10;
    ops[0].offcloud_peer = 2;
    ops[1].prefix.addr[0] = 10;
    ops[1].prefix.addr[1] = 128;
    ops[1].flags = FP_ROUTE_PEER_NOT_SECONDARY;
    CHECK(fp_route_batch(fp, ops, 3, NULL) == 0);
    ops6 = ops[2];
    ops6.prefix.addr[0] = 0xfd;
    ops6.plen = 8;
    ops6.offcloud_peer = 2;
    ops6.cloud_peer = 3;
    CHECK(fp_route_batch(fp, &ops6, 1, NULL) == 0);
    return fp;
}

static struct fp_rule rules[MAX_RULES];
static struct fp_rule_net nets[MAX_NETS];
static struct fp_rule_ports ports[MAX_PORTS];

static void read_table(struct input *in, struct fp_rule_table *t)
{
    uint8_t n = 0;
    take(in, &n, 1);
    memset(t, 0, sizeof(*t));
    memset(rules, 0, sizeof(rules));
    memset(nets, 0, sizeof(nets));
    memset(ports, 0, sizeof(ports));
    uint32_t nn = 0, np = 0;
    t->n_rules = n % (MAX_RULES + 1);
    for (uint32_t i = 0; i < t->n_rules; i++) {
        uint8_t h[5];
        take(in, h, sizeof(h));
        struct fp_rule *r = &rules[i];
        r->key = i;
        r->transport = h[0] & 1;
        r->secondary = (h[0] >> 1) & 3;                  /* 3 is invalid */
        r->proto = h[0] & 8 ? h[1] : FP_RULE_PROTO_ANY;
        if (h[0] & 0x80)
            r->proto = 257;                              /* invalid */
        uint32_t *firsts[2] = {&r->src_first, &r->dst_first};
        uint32_t *counts[2] = {&r->src_n, &r->dst_n};
        for (int side = 0; side < 2; side++) {
            uint32_t want = h[2 + side] % 4;
            *firsts[side] = nn;
            *counts[side] = 0;
            for (uint32_t k = 0; k < want && nn < MAX_NETS; k++, nn++) {
                uint8_t fb = 0;
                take(in, &fb, 1);
                struct fp_rule_net *x = &nets[nn];
                x->family = fb & 0x80 ? 6 : 4;
                if (fb & 0x40)
                    x->family = fb & 7;                  /* now and then a bad family */
                x->plen = x->family == 6 ? (uint8_t)((fb & 0x3f) * 2) : (uint8_t)(fb & 0x3f);
                take(in, x->addr, x->family == 6 ? 16 : 4);
                /* Mostly valid: host bits cleared unless the input asks otherwise. */
                if (!(fb & 0x20) && (x->family == 4 || x->family == 6)) {
                    int alen = x->family == 4 ? 4 : 16;
                    for (int b = 0; b < 16; b++) {
                        int bits = x->plen - b * 8;
                        uint8_t keep = bits >= 8 ? 0xff : bits <= 0 ? 0 : (uint8_t)(0xff << (8 - bits));
                        x->addr[b] = b < alen ? x->addr[b] & keep : 0;
                    }
                }
                (*counts[side])++;
            }
        }
        r->ports_first = np;
        uint32_t want = h[4] % 4;
        for (uint32_t k = 0; k < want && np < MAX_PORTS; k++, np++) {
            uint8_t b[4];
            take(in, b, 4);
            ports[np].lo = (uint16_t)(b[0] << 8 | b[1]);
            ports[np].hi = (uint16_t)(b[2] << 8 | b[3]);
            r->ports_n++;
        }
        if (h[4] & 0x80)
            r->ports_first = MAX_PORTS + 1;              /* outside the array */
    }
    t->rules = rules;
    t->nets = nets;
    t->n_nets = nn;
    t->ports = ports;
    t->n_ports = np;
}

struct verdict {
    int verdict;
    int reason;
    uint32_t peer;
};

static struct verdict send_one(fp_t *fp, const uint8_t *pkt, size_t len)
{
    static uint8_t out[9216 + FP_OVERHEAD + 64];
    struct fp_result r;
    CHECK(fp_process_outbound(fp, pkt, len, out, sizeof(out), &r) == 0);
    struct verdict v = {r.verdict, r.verdict == FP_V_DROP ? r.drop_reason : -1, r.peer_id};
    /* No keys anywhere: a routed packet is dropped as no_key, naming its peer (or too big
     * for nothing: no MTU is set). */
    CHECK(r.verdict == FP_V_DROP);
    if (r.drop_reason == FP_DROP_NO_KEY)
        CHECK(r.peer_id >= 1 && r.peer_id <= 3);
    else
        CHECK(r.drop_reason == FP_DROP_NO_ROUTE || r.drop_reason == FP_DROP_MALFORMED ||
              r.drop_reason == FP_DROP_OFFCLOUD_DOWN);
    return v;
}

/* The rule a packet matched (its hit count moved), or -1. */
static int matched_rule(fp_t *fp, const uint8_t *pkt, size_t len)
{
    uint64_t before[MAX_RULES], after[MAX_RULES];
    int n = fp_rules_counters(fp, before, MAX_RULES, NULL);
    send_one(fp, pkt, len);
    CHECK(fp_rules_counters(fp, after, MAX_RULES, NULL) == n);
    int hit = -1;
    for (int i = 0; i < n; i++) {
        if (after[i] != before[i]) {
            CHECK(hit < 0 && after[i] == before[i] + 1);
            hit = i;
        }
    }
    return hit;
}

/* A packet from a header chain: [flags:1][n:1][src:1][dst:1][proto:1][sport:2][dport:2],
 * then n (at most 12) [kind:1][units:1], then [cut:2]. flags bit 0: IPv4 (then kind/units
 * of the first entry give the fragment offset and MF, the rest is ignored). Built twice:
 * `pkt` with the chain (cut to `cut` bytes when cut < its length), `plain` without
 * extension headers or fragmentation. *known: the chain shows the ports (no later
 * fragment, at most 8 extension headers, not cut). */
static void build_chain(struct input *in, uint8_t *pkt, size_t *len, uint8_t *plain,
                        size_t *plen, bool *known)
{
    static const uint8_t kinds[] = {0, 43, 44, 60, 51, 253};
    uint8_t h[9];
    take(in, h, sizeof(h));
    bool v4 = h[0] & 1;
    uint32_t n = h[1] % 13;
    uint8_t proto = h[4] & 0x80 ? h[4] : (uint8_t[]){6, 17, 1, 58}[h[4] & 3];
    uint8_t l4[24];
    memset(l4, 0, sizeof(l4));
    memcpy(l4, h + 5, 4);
    size_t hl = v4 ? 20 : 40, l4len = proto == 6 ? 20 : 8;
    uint8_t ip[40];
    memset(ip, 0, sizeof(ip));
    if (v4) {
        ip[0] = 0x45;
        ip[8] = 64;
        ip[9] = proto;
        ip[12] = 10, ip[13] = h[2] & 0x81, ip[15] = 5;
        ip[16] = 10, ip[17] = h[3] & 0x81, ip[19] = 7;
    } else {
        ip[0] = 0x60;
        ip[7] = 64;
        ip[8] = h[2] & 1 ? 0xfd : 0x20, ip[23] = 5;
        ip[24] = h[3] & 1 ? 0xfd : 0x20, ip[39] = 7;
    }
    /* The plain packet. */
    memcpy(plain, ip, hl);
    if (!v4)
        plain[6] = proto;
    memcpy(plain + hl, l4, l4len);
    *plen = hl + l4len;
    /* The chained one. */
    memcpy(pkt, ip, hl);
    size_t off = hl;
    *known = true;
    uint8_t *nh = v4 ? NULL : pkt + 6;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t e[2];
        take(in, e, 2);
        if (v4) {
            if (i == 0) {
                uint16_t fo = (uint16_t)((e[0] & 0x20) << 8 | (e[1] & 7));
                pkt[6] = (uint8_t)(fo >> 8), pkt[7] = (uint8_t)fo;
                if (fo & 0x1fff)
                    *known = false;
            }
            continue;
        }
        uint8_t kind = kinds[e[0] % sizeof(kinds)];
        *nh = kind;
        uint8_t *x = pkt + off;
        size_t xl;
        if (kind == 44) {
            xl = 8;
            memset(x, 0, 8);
            x[2] = e[1] & 0x80 ? 0 : (uint8_t)((e[1] & 7) << 3);
            x[3] = e[1] & 1;
            if (x[2])
                *known = false;
        } else if (kind == 51) {
            xl = ((size_t)(e[1] & 7) + 2) * 4;
            memset(x, 0, xl);
            x[1] = e[1] & 7;
        } else {
            xl = ((size_t)(e[1] & 7) + 1) * 8;
            memset(x, 0, xl);
            x[1] = e[1] & 7;
        }
        nh = x;
        off += xl;
        if (i >= 8)
            *known = false;
    }
    if (nh)
        *nh = proto;
    memcpy(pkt + off, l4, l4len);
    off += l4len;
    uint8_t c[2];
    take(in, c, 2);
    size_t cut = (size_t)(c[0] << 8 | c[1]);
    if (cut < off) {
        if (cut < hl)
            cut = hl;
        /* Cut inside the chain (or the ports): known only if the ports are still there. */
        if (cut < off - l4len + 4)
            *known = false;
        off = cut;
    }
    *len = off;
    if (v4) {
        pkt[2] = (uint8_t)(off >> 8), pkt[3] = (uint8_t)off;
        plain[2] = 0, plain[3] = (uint8_t)*plen;
    } else {
        pkt[4] = (uint8_t)((off - 40) >> 8), pkt[5] = (uint8_t)(off - 40);
        plain[5] = (uint8_t)(*plen - 40);
    }
}

static bool same(struct verdict a, struct verdict b)
{
    return a.verdict == b.verdict && a.reason == b.reason && a.peer == b.peer;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    fp_t *fp = make();
    struct fp_rule_table t;
    read_table(&in, &t);
    size_t bad = SIZE_MAX;
    int rc = fp_rules_set(fp, &t, &bad);
    CHECK(rc == 0 || rc == -EINVAL);
    if (rc < 0)
        CHECK(bad < t.n_rules);
    bool have_rules = rc == 0 && t.n_rules > 0;

    static uint8_t pkts[MAX_PKTS][9300];
    size_t lens[MAX_PKTS];
    struct verdict first[MAX_PKTS];
    int n = 0;
    while (n < MAX_PKTS && in.left >= 2) {
        uint8_t l[2];
        take(&in, l, 2);
        if (l[0] & 0x80) {
            static uint8_t plain[64];
            size_t plen;
            bool known;
            build_chain(&in, pkts[n], &lens[n], plain, &plen, &known);
            first[n] = send_one(fp, pkts[n], lens[n]);
            if (have_rules) {
                int rp = matched_rule(fp, plain, plen), rc2 = matched_rule(fp, pkts[n], lens[n]);
                if (known)
                    CHECK(rc2 == rp);
                else if (rp >= 0)
                    CHECK(rc2 >= 0 && rc2 <= rp);
            }
            n++;
            continue;
        }
        size_t len = (size_t)(l[0] << 8 | l[1]) % 9300;
        if (len > in.left)
            len = in.left;
        take(&in, pkts[n], len);
        lens[n] = len;
        first[n] = send_one(fp, pkts[n], len);
        if (first[n].reason == FP_DROP_OFFCLOUD_DOWN)
            CHECK(have_rules);
        n++;
    }
    /* The same table again: nothing cached is valid; the verdicts must not change. */
    if (rc == 0) {
        CHECK(fp_rules_set(fp, &t, NULL) == 0);
        for (int i = n - 1; i >= 0; i--)
            CHECK(same(send_one(fp, pkts[i], lens[i]), first[i]));
    }
    /* A table refused: the one in force stays (every rule made invalid). */
    if (t.n_rules) {
        rules[0].transport = 7;
        CHECK(fp_rules_set(fp, &t, &bad) == -EINVAL && bad == 0);
        for (int i = 0; i < n; i++)
            CHECK(same(send_one(fp, pkts[i], lens[i]), first[i]));
    }
    uint64_t hits[MAX_RULES];
    struct fp_rules_info info;
    int k = fp_rules_counters(fp, hits, MAX_RULES, &info);
    CHECK(k == (rc == 0 ? (int)t.n_rules : 0) && info.n_rules == (uint32_t)k);
    fp_free(fp);
    return 0;
}
