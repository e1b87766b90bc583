/*
 * rules.c - the off-cloud transport rules: the table Python installs (fp_rules_set), its
 * per-rule hit counters (fp_rules_counters), and what a packet from the TUN does with it
 * (fp_rules_apply): a flow cache lookup, on a miss the table top-down, then the peer the
 * matched rule picks among the route's three (docs/dataplane.md, "Transport rules").
 *
 * The table is replaced whole under fp->lock exclusive and read under it shared, as the
 * prefix table. The flow caches hold rule indices tagged with the table's generation, so a
 * new table makes every entry stale at once, and a route change none.
 */
#include "fp_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ the table */

void fp_rules_free(struct fp_rules *r)
{
    if (!r)
        return;
    free(r->rules);
    free(r->nets);
    free(r->ports);
    free(r->hits);
    free(r);
}

static bool net_ok(const struct fp_rule_net *n)
{
    int alen = n->family == 4 ? 4 : n->family == 6 ? 16 : 0;
    if (!alen || n->plen > alen * 8)
        return false;
    /* Host bits must be zero (a caller mistake, as for routes), unused bytes too. */
    for (int i = 0; i < 16; i++) {
        int bits = n->plen - i * 8; /* prefix bits in this byte */
        uint8_t keep = bits >= 8 ? 0xff : bits <= 0 ? 0 : (uint8_t)(0xff << (8 - bits));
        if (n->addr[i] & ~keep)
            return false;
    }
    return true;
}

static bool run_ok(uint32_t first, uint32_t n, uint32_t size)
{
    return first <= size && n <= size - first;
}

static int rule_check(const struct fp_rule_table *t, const struct fp_rule *r)
{
    if (r->transport > FP_RULE_OFFCLOUD || r->secondary > FP_RULE_SEC_CLOUD ||
        r->proto > FP_RULE_PROTO_ANY)
        return -EINVAL;
    if (!run_ok(r->src_first, r->src_n, t->n_nets) || !run_ok(r->dst_first, r->dst_n, t->n_nets) ||
        !run_ok(r->ports_first, r->ports_n, t->n_ports))
        return -EINVAL;
    for (uint32_t i = 0; i < r->src_n; i++)
        if (!net_ok(&t->nets[r->src_first + i]))
            return -EINVAL;
    for (uint32_t i = 0; i < r->dst_n; i++)
        if (!net_ok(&t->nets[r->dst_first + i]))
            return -EINVAL;
    for (uint32_t i = 0; i < r->ports_n; i++) {
        const struct fp_rule_ports *p = &t->ports[r->ports_first + i];
        if (p->lo > p->hi)
            return -EINVAL;
    }
    return 0;
}

/* Everything is checked and copied before the lock: the data path waits only for the swap
 * (and the hand-over of hit counts, at most FP_RULES_MAX^2 key comparisons). */
int fp_rules_set(fp_t *fp, const struct fp_rule_table *t, size_t *bad)
{
    if (bad)
        *bad = 0;
    if (!t || (t->n_rules && !t->rules) || (t->n_nets && !t->nets) || (t->n_ports && !t->ports))
        return -EINVAL;
    if (t->n_rules > FP_RULES_MAX || t->n_nets > FP_RULE_NETS_MAX ||
        t->n_ports > FP_RULE_PORTS_MAX)
        return -E2BIG;
    for (uint32_t i = 0; i < t->n_rules; i++) {
        int rc = rule_check(t, &t->rules[i]);
        if (rc < 0) {
            if (bad)
                *bad = i;
            return rc;
        }
    }
    struct fp_rules *nr = NULL;
    if (t->n_rules) {
        nr = calloc(1, sizeof(*nr));
        if (!nr)
            return -ENOMEM;
        nr->n = t->n_rules;
        nr->rules = calloc(t->n_rules, sizeof(*nr->rules));
        nr->hits = calloc(t->n_rules, sizeof(*nr->hits));
        nr->nets = calloc(t->n_nets ? t->n_nets : 1, sizeof(*nr->nets));
        nr->ports = calloc(t->n_ports ? t->n_ports : 1, sizeof(*nr->ports));
        if (!nr->rules || !nr->hits || !nr->nets || !nr->ports) {
            fp_rules_free(nr);
            return -ENOMEM;
        }
        if (t->n_nets)
            memcpy(nr->nets, t->nets, t->n_nets * sizeof(*nr->nets));
        if (t->n_ports)
            memcpy(nr->ports, t->ports, t->n_ports * sizeof(*nr->ports));
        for (uint32_t i = 0; i < t->n_rules; i++) {
            const struct fp_rule *r = &t->rules[i];
            struct fp_rule_c *c = &nr->rules[i];
            c->key = r->key;
            c->transport = (uint8_t)r->transport;
            c->secondary = (uint8_t)r->secondary;
            c->proto = (uint16_t)r->proto;
            c->src_first = r->src_first;
            c->src_n = r->src_n;
            c->dst_first = r->dst_first;
            c->dst_n = r->dst_n;
            c->ports_first = r->ports_first;
            c->ports_n = r->ports_n;
        }
    }
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_rules *old = fp->rules;
    if (nr) {
        nr->gen = ++fp->rules_gen;
        /* Hits follow the key; each old rule gives its count to one new rule. */
        bool *taken = old ? calloc(old->n, sizeof(bool)) : NULL;
        for (uint32_t i = 0; old && taken && i < nr->n; i++) {
            for (uint32_t j = 0; j < old->n; j++) {
                if (!taken[j] && old->rules[j].key == nr->rules[i].key) {
                    taken[j] = true;
                    atomic_store_explicit(
                        &nr->hits[i], atomic_load_explicit(&old->hits[j], memory_order_relaxed),
                        memory_order_relaxed);
                    break;
                }
            }
        }
        free(taken);
    } else {
        ++fp->rules_gen;
    }
    fp->rules = nr;
    pthread_rwlock_unlock(&fp->lock);
    fp_rules_free(old);
    return 0;
}

int fp_rules_counters(fp_t *fp, uint64_t *hits, size_t cap, struct fp_rules_info *info)
{
    if (cap && !hits)
        return -EINVAL;
    pthread_rwlock_rdlock(&fp->lock);
    const struct fp_rules *r = fp->rules;
    uint32_t n = r ? r->n : 0;
    for (uint32_t i = 0; i < n && i < cap; i++)
        hits[i] = atomic_load_explicit(&r->hits[i], memory_order_relaxed);
    if (info) {
        memset(info, 0, sizeof(*info));
        info->generation = fp->rules_gen;
        info->n_rules = n;
        info->evaluations = atomic_load_explicit(&fp->rule_evals, memory_order_relaxed);
    }
    pthread_rwlock_unlock(&fp->lock);
    return (int)n;
}

/* ------------------------------------------------------------------ matching */

static bool in_net(const struct fp_rule_net *n, int family, const uint8_t *addr)
{
    if (n->family != family)
        return false;
    int full = n->plen / 8, rest = n->plen % 8;
    if (memcmp(n->addr, addr, (size_t)full) != 0)
        return false;
    return rest == 0 || ((addr[full] ^ n->addr[full]) & (uint8_t)(0xff << (8 - rest))) == 0;
}

static bool in_nets(const struct fp_rules *t, uint32_t first, uint32_t n, int family,
                    const uint8_t *addr)
{
    if (n == 0)
        return true;
    for (uint32_t i = 0; i < n; i++)
        if (in_net(&t->nets[first + i], family, addr))
            return true;
    return false;
}

static bool in_ports(const struct fp_rules *t, const struct fp_rule_c *r, uint16_t port)
{
    for (uint32_t i = 0; i < r->ports_n; i++) {
        const struct fp_rule_ports *p = &t->ports[r->ports_first + i];
        if (p->lo <= port && port <= p->hi)
            return true;
    }
    return false;
}

/* A field the packet does not show (fp_flow_parse: FP_FLOW_*_UNKNOWN) is taken as
 * matching, so hiding it (a later fragment, an IPv6 header chain too long or cut short)
 * never moves a packet past a rule that could be its own: it takes the first rule its
 * known fields match. */
static bool proto_matches(uint16_t want, const struct fp_flow *f)
{
    return want == FP_RULE_PROTO_ANY || (f->unknown & FP_FLOW_PROTO_UNKNOWN) ||
           want == f->proto || (want == 1 && f->proto == 58);
}

/* The rule, one direction: from `a` to `b` (port bp). */
static bool matches_dir(const struct fp_rules *t, const struct fp_rule_c *r, const struct fp_flow *f,
                        const uint8_t *a, const uint8_t *b, uint16_t bp)
{
    if (r->ports_n && !(f->unknown & FP_FLOW_PORTS_UNKNOWN) &&
        (!f->has_ports || !in_ports(t, r, bp)))
        return false;
    return in_nets(t, r->src_first, r->src_n, f->family, a) &&
           in_nets(t, r->dst_first, r->dst_n, f->family, b);
}

static int32_t evaluate(const struct fp_rules *t, const struct fp_flow *f)
{
    for (uint32_t i = 0; i < t->n; i++) {
        const struct fp_rule_c *r = &t->rules[i];
        if (!proto_matches(r->proto, f))
            continue;
        if (matches_dir(t, r, f, f->src, f->dst, f->dport) ||
            matches_dir(t, r, f, f->dst, f->src, f->sport))
            return (int32_t)i;
    }
    return -1;
}

/* Every field of the key reaches the slot; an IPv4 flow costs one mix, an IPv6 one two. A
 * collision costs only a lookup in the table (the full key is compared). */
static uint32_t flow_slot(const struct fp_flow *f)
{
    uint64_t s0, d0;
    memcpy(&s0, f->src, 8);
    memcpy(&d0, f->dst, 8);
    uint64_t h = s0 ^ (d0 * UINT64_C(0x9E3779B97F4A7C15)) ^
                 ((uint64_t)f->unknown << 48 | (uint64_t)f->proto << 40 |
                  (uint64_t)f->has_ports << 32 |
                  (uint64_t)f->sport << 16 | f->dport) * UINT64_C(0xC2B2AE3D27D4EB4F);
    if (f->family == 6) {
        uint64_t s1, d1;
        memcpy(&s1, f->src + 8, 8);
        memcpy(&d1, f->dst + 8, 8);
        h = fp_mix64(h) ^ s1 ^ (d1 * UINT64_C(0x9E3779B97F4A7C15));
    }
    return (uint32_t)(fp_mix64(h) & (FP_FLOWCACHE_SLOTS - 1));
}

static int32_t lookup(struct fp *fp, const struct fp_rules *t, struct fp_flowcache *fc,
                      const struct fp_flow *f)
{
    struct fp_flowcache_slot *s = NULL;
    if (fc) {
        s = &fc->slot[flow_slot(f)];
        if (s->gen == t->gen && memcmp(&s->key, f, sizeof(*f)) == 0)
            return s->rule;
    }
    fp_ctr_add(&fp->rule_evals, 1);
    int32_t rule = evaluate(t, f);
    if (s) {
        s->gen = t->gen;
        s->key = *f;
        s->rule = rule;
    }
    return rule;
}

struct fp_peer *fp_rules_apply(struct fp *fp, struct fp_flowcache *fc, const struct fp_route *rt,
                               const uint8_t *ip, size_t len)
{
    const struct fp_rules *t = fp->rules;
    struct fp_flow f;
    if (!t || fp_flow_parse(ip, len, &f) < 0)
        return rt->peer;
    int32_t i = lookup(fp, t, fc, &f);
    if (i < 0)
        return rt->peer;
    fp_ctr_add(&t->hits[i], 1);
    const struct fp_rule_c *r = &t->rules[i];
    if (r->transport == FP_RULE_CLOUD)
        return rt->cloud ? rt->cloud : rt->peer;
    if (rt->offcloud)
        return rt->offcloud;
    switch (r->secondary) {
    case FP_RULE_SEC_AUTOMATIC:
        /* Never onto a transport that is no secondary (Alt-WAN): the cloud, or nothing. */
        return (rt->flags & FP_ROUTE_PEER_NOT_SECONDARY) ? rt->cloud : rt->peer;
    case FP_RULE_SEC_CLOUD:
        return rt->cloud;
    default:
        return NULL;
    }
}
