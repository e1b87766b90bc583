/*
 * table.c - peers, key slots and the global key index, the prefix table and
 * the link list, plus the public calls that change them.
 *
 * Lookups run per packet with fp->lock held shared; changes take it
 * exclusively. The key index maps a receiver index straight to its key (the
 * index names the key, not the peer), so demux is one hash probe. The prefix
 * table is a hash table keyed by (prefix length, masked prefix) per address
 * family, probed once per prefix length present, longest first: the cost of
 * a lookup grows with the number of distinct lengths, not of prefixes. The
 * same tables (fp_rt_*) hold the allowed sources of sources.c, apart from the
 * routes.
 */
#include "fp_internal.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RT_INITIAL_BUCKETS 256

static inline uint32_t hash32(uint32_t x)
{
    return (uint32_t)(((uint64_t)x * UINT64_C(0x9E3779B97F4A7C15)) >> 32);
}

/* ------------------------------------------------------------------ lookups */

struct fp_peer *fp_peer_find(struct fp *fp, uint32_t id)
{
    struct fp_peer *p = fp->peers[hash32(id) % FP_PEER_BUCKETS];
    while (p && p->id != id)
        p = p->next;
    return p;
}

struct fp_peer *fp_peer_find_plain(struct fp *fp, uint32_t id, int *rc)
{
    struct fp_peer *p = fp_peer_find(fp, id);
    *rc = !p ? -ENOENT : p->group ? -EINVAL : 0;
    return *rc ? NULL : p;
}

struct fp_key *fp_index_find(struct fp *fp, uint32_t index)
{
    struct fp_key *k = fp->index[hash32(index) % FP_INDEX_BUCKETS];
    while (k && k->local_index != index)
        k = k->index_next;
    return k;
}

struct fp_link *fp_link_find(struct fp *fp, uint32_t id)
{
    for (int i = 0; i < fp->nlinks; i++)
        if (fp->links[i]->id == id)
            return fp->links[i];
    return NULL;
}

static void index_insert(struct fp *fp, struct fp_key *k)
{
    struct fp_key **b = &fp->index[hash32(k->local_index) % FP_INDEX_BUCKETS];
    k->index_next = *b;
    *b = k;
}

static void index_remove(struct fp *fp, struct fp_key *k)
{
    struct fp_key **pp = &fp->index[hash32(k->local_index) % FP_INDEX_BUCKETS];
    while (*pp && *pp != k)
        pp = &(*pp)->index_next;
    if (*pp)
        *pp = k->index_next;
}

/* ------------------------------------------------------------------ routes */

static void mask_prefix(uint8_t out[16], const uint8_t *addr, int alen, int plen)
{
    memset(out, 0, 16);
    int full = plen / 8;
    memcpy(out, addr, (size_t)full);
    if (plen % 8 && full < alen)
        out[full] = (uint8_t)(addr[full] & (0xff << (8 - plen % 8)));
}

static inline uint32_t rt_hash(const uint8_t a[16], uint8_t plen)
{
    uint64_t x, y;
    memcpy(&x, a, 8);
    memcpy(&y, a + 8, 8);
    uint64_t h = (x ^ (y * UINT64_C(0x9E3779B97F4A7C15)) ^ plen) * UINT64_C(0xC2B2AE3D27D4EB4F);
    return (uint32_t)(h >> 32);
}

static struct fp_rtable *rt_for(struct fp *fp, int family)
{
    return family == 4 ? &fp->rt4 : family == 6 ? &fp->rt6 : NULL;
}

int fp_rt_init(struct fp_rtable *t, int alen)
{
    memset(t, 0, sizeof(*t));
    t->alen = alen;
    t->nbuckets = RT_INITIAL_BUCKETS;
    t->buckets = calloc(t->nbuckets, sizeof(*t->buckets));
    return t->buckets ? 0 : -ENOMEM;
}

void fp_rt_free(struct fp_rtable *t)
{
    for (uint32_t i = 0; t->buckets && i < t->nbuckets; i++) {
        struct fp_route *r = t->buckets[i];
        while (r) {
            struct fp_route *n = r->next;
            free(r);
            r = n;
        }
    }
    free(t->buckets);
    t->buckets = NULL;
}

static void rt_rebuild_plens(struct fp_rtable *t)
{
    t->nplens = 0;
    for (int l = t->alen * 8; l >= 0; l--)
        if (t->plen_count[l])
            t->plens[t->nplens++] = (uint8_t)l;
}

static void rt_grow(struct fp_rtable *t)
{
    uint32_t n = t->nbuckets * 2;
    struct fp_route **b = calloc(n, sizeof(*b));
    if (!b)
        return; /* longer chains, still correct */
    for (uint32_t i = 0; i < t->nbuckets; i++) {
        struct fp_route *r = t->buckets[i];
        while (r) {
            struct fp_route *next = r->next;
            struct fp_route **head = &b[rt_hash(r->addr, r->plen) & (n - 1)];
            r->next = *head;
            *head = r;
            r = next;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = n;
}

static struct fp_route **rt_find(struct fp_rtable *t, const uint8_t m[16], uint8_t plen)
{
    struct fp_route **pp = &t->buckets[rt_hash(m, plen) & (t->nbuckets - 1)];
    while (*pp && ((*pp)->plen != plen || memcmp((*pp)->addr, m, 16) != 0))
        pp = &(*pp)->next;
    return pp;
}

const struct fp_route *fp_route_find(struct fp *fp, int family, const uint8_t *addr)
{
    return fp_rt_match(rt_for(fp, family), addr);
}

const struct fp_route *fp_rt_match(const struct fp_rtable *t, const uint8_t *addr)
{
    uint8_t m[16];
    for (int i = 0; i < t->nplens; i++) {
        uint8_t plen = t->plens[i];
        mask_prefix(m, addr, t->alen, plen);
        struct fp_route *r = t->buckets[rt_hash(m, plen) & (t->nbuckets - 1)];
        for (; r; r = r->next)
            if (r->plen == plen && memcmp(r->addr, m, 16) == 0)
                return r;
    }
    return NULL;
}

struct fp_peer *fp_route_lookup(struct fp *fp, int family, const uint8_t *addr)
{
    const struct fp_route *r = fp_route_find(fp, family, addr);
    return r ? r->peer : NULL;
}

static void rt_remove_peer(struct fp_rtable *t, struct fp_peer *p)
{
    for (uint32_t i = 0; i < t->nbuckets; i++) {
        struct fp_route **pp = &t->buckets[i];
        while (*pp) {
            struct fp_route *r = *pp;
            if (r->peer == p) {
                *pp = r->next;
                t->plen_count[r->plen]--;
                t->count--;
                free(r);
            } else {
                /* A route that only names it for the rules keeps its own peer. */
                if (r->offcloud == p)
                    r->offcloud = NULL;
                if (r->cloud == p)
                    r->cloud = NULL;
                pp = &r->next;
            }
        }
    }
    rt_rebuild_plens(t);
}

/* Checks a prefix as fp_route_set/del take it; masked into m. A set must
 * not have host bits (a caller mistake, not something to silently fix); a
 * delete masks them. */
int fp_rt_check(const struct fp_addr *prefix, uint8_t plen, bool set, uint8_t m[16])
{
    if (!fp_addr_valid(prefix))
        return -EINVAL;
    int alen = prefix->family == 4 ? 4 : 16;
    if (plen > alen * 8)
        return -EINVAL;
    mask_prefix(m, prefix->addr, alen, plen);
    if (set && memcmp(m, prefix->addr, (size_t)alen) != 0)
        return -EINVAL;
    return 0;
}

/* Caller holds fp->lock exclusive; fresh is a zeroed node, used or freed. A set replaces
 * the route: its peer and the rules' two (NULL: none). */
struct fp_route *fp_rt_get(struct fp_rtable *t, const uint8_t m[16], uint8_t plen,
                           struct fp_route *fresh)
{
    struct fp_route **pp = rt_find(t, m, plen);
    if (*pp)
        return *pp;
    fresh->plen = plen;
    memcpy(fresh->addr, m, 16);
    *pp = fresh;
    t->count++;
    if (t->plen_count[plen]++ == 0)
        rt_rebuild_plens(t);
    if (t->count > t->nbuckets)
        rt_grow(t);
    return fresh;
}

static void rt_set_locked(struct fp *fp, int family, const uint8_t m[16], uint8_t plen,
                          struct fp_peer *p, struct fp_peer *offcloud, struct fp_peer *cloud,
                          uint32_t flags, struct fp_route *fresh)
{
    struct fp_route *r = fp_rt_get(rt_for(fp, family), m, plen, fresh);
    if (r != fresh)
        free(fresh);
    r->peer = p;
    r->offcloud = offcloud;
    r->cloud = cloud;
    r->flags = flags;
}

/* Caller holds fp->lock exclusive; returns the unlinked node for the caller
 * to free after unlocking, or NULL. */
static struct fp_route *rt_del_locked(struct fp *fp, int family, const uint8_t m[16],
                                      uint8_t plen)
{
    return fp_rt_unlink(rt_for(fp, family), m, plen);
}

struct fp_route *fp_rt_unlink(struct fp_rtable *t, const uint8_t m[16], uint8_t plen)
{
    struct fp_route **pp = rt_find(t, m, plen);
    struct fp_route *r = *pp;
    if (r) {
        *pp = r->next;
        t->count--;
        if (--t->plen_count[plen] == 0)
            rt_rebuild_plens(t);
    }
    return r;
}

int fp_route_set(fp_t *fp, const struct fp_addr *prefix, uint8_t plen, uint32_t peer_id)
{
    uint8_t m[16];
    int rc = fp_rt_check(prefix, plen, true, m);
    if (rc < 0)
        return rc;
    struct fp_route *fresh = calloc(1, sizeof(*fresh));
    if (!fresh)
        return -ENOMEM;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find(fp, peer_id);
    if (p)
        rt_set_locked(fp, prefix->family, m, plen, p, NULL, NULL, 0, fresh);
    pthread_rwlock_unlock(&fp->lock);
    if (!p) {
        free(fresh);
        return -ENOENT;
    }
    return 0;
}

int fp_route_del(fp_t *fp, const struct fp_addr *prefix, uint8_t plen)
{
    uint8_t m[16];
    int rc = fp_rt_check(prefix, plen, false, m);
    if (rc < 0)
        return rc;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_route *r = rt_del_locked(fp, prefix->family, m, plen);
    pthread_rwlock_unlock(&fp->lock);
    free(r);
    return r ? 0 : -ENOENT;
}

/* Everything that can fail is done before the table changes: the checks, and
 * a node for every set (allocated outside the lock, so the data path waits
 * only for the table changes themselves). */
int fp_route_batch(fp_t *fp, const struct fp_route_op *ops, size_t n, size_t *bad)
{
    if (n == 0)
        return 0;
    if (!ops || n > SIZE_MAX / sizeof(void *))
        return -EINVAL;
    int rc = 0;
    size_t i;
    uint8_t m[16];
    for (i = 0; i < n; i++) {
        if ((ops[i].verb != FP_ROUTE_SET && ops[i].verb != FP_ROUTE_DEL) ||
            (ops[i].flags & ~(uint32_t)FP_ROUTE_PEER_NOT_SECONDARY))
            rc = -EINVAL;
        else
            rc = fp_rt_check(&ops[i].prefix, ops[i].plen, ops[i].verb == FP_ROUTE_SET, m);
        if (rc < 0)
            goto fail;
    }
    struct fp_route **fresh = calloc(n, sizeof(*fresh));
    if (!fresh) {
        rc = -ENOMEM;
        i = 0;
        goto fail;
    }
    for (i = 0; i < n; i++) {
        if (ops[i].verb == FP_ROUTE_SET && !(fresh[i] = calloc(1, sizeof(**fresh)))) {
            rc = -ENOMEM;
            goto free_nodes;
        }
    }
    pthread_rwlock_wrlock(&fp->lock);
    for (i = 0; i < n; i++) {
        const struct fp_route_op *o = &ops[i];
        if (o->verb == FP_ROUTE_SET &&
            (!fp_peer_find(fp, o->peer_id) ||
             (o->offcloud_peer && !fp_peer_find(fp, o->offcloud_peer)) ||
             (o->cloud_peer && !fp_peer_find(fp, o->cloud_peer)))) {
            pthread_rwlock_unlock(&fp->lock);
            rc = -ENOENT;
            goto free_nodes;
        }
    }
    for (i = 0; i < n; i++) {
        const struct fp_route_op *o = &ops[i];
        fp_rt_check(&o->prefix, o->plen, false, m);
        if (o->verb == FP_ROUTE_DEL) {
            /* Unlinked nodes are kept in fresh[i] and freed after unlocking. */
            fresh[i] = rt_del_locked(fp, o->prefix.family, m, o->plen);
        } else {
            rt_set_locked(fp, o->prefix.family, m, o->plen, fp_peer_find(fp, o->peer_id),
                          o->offcloud_peer ? fp_peer_find(fp, o->offcloud_peer) : NULL,
                          o->cloud_peer ? fp_peer_find(fp, o->cloud_peer) : NULL, o->flags,
                          fresh[i]);
            fresh[i] = NULL;
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    for (size_t j = 0; j < n; j++)
        free(fresh[j]);
    free(fresh);
    return 0;

free_nodes:
    for (size_t j = 0; j < n; j++)
        free(fresh[j]);
    free(fresh);
fail:
    if (bad)
        *bad = i;
    return rc;
}

/* ------------------------------------------------------------------ peers */

int fp_tables_init(struct fp *fp)
{
    /* calloc'd: its pages cost nothing until the first rules meet synchronous packets. */
    fp->sync_fc = calloc(1, sizeof(*fp->sync_fc));
    if (!fp->sync_fc || fp_rt_init(&fp->rt4, 4) || fp_rt_init(&fp->rt6, 16) ||
        fp_rt_init(&fp->src4, 4) || fp_rt_init(&fp->src6, 16)) {
        fp_rt_free(&fp->rt4);
        fp_rt_free(&fp->rt6);
        fp_rt_free(&fp->src4);
        fp_rt_free(&fp->src6);
        free(fp->sync_fc);
        fp->sync_fc = NULL;
        return -ENOMEM;
    }
    pthread_mutex_init(&fp->sync_fc_lock, NULL);
    return 0;
}

static void peer_free(struct fp *fp, struct fp_peer *p)
{
    for (int s = 0; s < 2; s++) {
        if (p->slot[s]) {
            index_remove(fp, p->slot[s]);
            fp_key_free(p->slot[s]);
        }
    }
    pthread_mutex_destroy(&p->ep_lock);
    free(p->group);
    free(p);
}

void fp_tables_free(struct fp *fp)
{
    fp_rt_free(&fp->rt4);
    fp_rt_free(&fp->rt6);
    fp_rt_free(&fp->src4);
    fp_rt_free(&fp->src6);
    fp_rules_free(fp->rules);
    fp->rules = NULL;
    free(fp->sync_fc);
    fp->sync_fc = NULL;
    pthread_mutex_destroy(&fp->sync_fc_lock);
    for (int i = 0; i < FP_PEER_BUCKETS; i++) {
        struct fp_peer *p = fp->peers[i];
        while (p) {
            struct fp_peer *n = p->next;
            peer_free(fp, p);
            p = n;
        }
        fp->peers[i] = NULL;
    }
    fp->groups = NULL; /* freed with their entries */
}

struct fp_peer *fp_peer_new(uint32_t id)
{
    struct fp_peer *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->id = id;
    p->tx_slot = -1;
    p->primary = -1;
    pthread_mutex_init(&p->ep_lock, NULL);
    return p;
}

void fp_peer_insert(struct fp *fp, struct fp_peer *p)
{
    struct fp_peer **b = &fp->peers[hash32(p->id) % FP_PEER_BUCKETS];
    p->next = *b;
    *b = p;
}

void fp_peer_remove(struct fp *fp, struct fp_peer *p)
{
    struct fp_peer **pp = &fp->peers[hash32(p->id) % FP_PEER_BUCKETS];
    while (*pp && *pp != p)
        pp = &(*pp)->next;
    if (*pp)
        *pp = p->next;
    rt_remove_peer(&fp->rt4, p);
    rt_remove_peer(&fp->rt6, p);
    peer_free(fp, p);
}

int fp_peer_add(fp_t *fp, uint32_t peer_id)
{
    struct fp_peer *p = fp_peer_new(peer_id);
    if (!p)
        return -ENOMEM;
    pthread_rwlock_wrlock(&fp->lock);
    if (fp_peer_find(fp, peer_id)) {
        pthread_rwlock_unlock(&fp->lock);
        peer_free(fp, p);
        return -EEXIST;
    }
    fp_peer_insert(fp, p);
    pthread_rwlock_unlock(&fp->lock);
    return 0;
}

int fp_peer_del(fp_t *fp, uint32_t peer_id)
{
    int rc;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        fp_groups_drop_peer(fp, p);
        fp_peer_remove(fp, p);
        fp_ep_changed(fp);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

/* ------------------------------------------------------------------ links of a peer */

int fp_peer_ep_slot(const struct fp_peer *p, uint32_t link_id)
{
    for (int s = 0; s < FP_PEER_ENDPOINTS; s++)
        if (p->ep[s].used && p->ep[s].link_id == link_id)
            return s;
    return -1;
}

void fp_peer_choice_update(struct fp_peer *p)
{
    int dflt = -1;
    for (int s = 0; s < FP_PEER_ENDPOINTS; s++)
        if (p->ep[s].used && (dflt < 0 || p->ep[s].seq > p->ep[dflt].seq))
            dflt = s;
    int primary = -1, n = 0;
    uint32_t best = 0, w0 = 0;
    bool equal = true;
    for (uint32_t i = 0; i < p->npol; i++) {
        int s = fp_peer_ep_slot(p, p->pol[i].link_id);
        if (s < 0)
            continue;
        uint32_t w = p->pol[i].weight;
        if (w > best) {
            best = w;
            primary = s;
        }
        if (n == 0)
            w0 = w;
        equal &= w == w0;
        p->cand[n].slot = s;
        p->cand[n].salt = fp_mix64(p->pol[i].link_id ^ UINT64_C(0xA0761D6478BD642F));
        p->cand[n].inv_weight = 1.0 / (double)w;
        n++;
    }
    /* A policy none of whose links has an endpoint: better some link than
     * none. Python removes an endpoint to keep traffic off a link. */
    p->primary = primary >= 0 ? primary : dflt;
    p->ncand = n >= 2 ? n : 0;
    p->equal_weights = equal;
    /* The inner MTU allows for the larger outer header if any endpoint needs it. */
    uint32_t ip_hdr = 20;
    for (int s = 0; s < FP_PEER_ENDPOINTS; s++)
        if (p->ep[s].used && p->ep[s].addr.family == 6)
            ip_hdr = 40;
    uint32_t inner = p->mtu ? p->mtu - ip_hdr - 8 - FP_OVERHEAD : 0;
    atomic_store_explicit(&p->inner_mtu, inner, memory_order_relaxed);
    atomic_store_explicit(&p->has_endpoint, p->primary >= 0, memory_order_relaxed);
}

double fp_hrw_score(uint64_t flow, uint64_t salt, double inv_weight)
{
    uint64_t h = fp_mix64(flow ^ salt);
    double u = ((double)(h >> 11) + 0.5) * 0x1p-53;
    return -log(u) * inv_weight;
}

/* Weighted rendezvous hashing: each link scores -ln(u) / weight with u
 * uniform in (0, 1) from hash(flow, link), and the lowest score wins. That is
 * the first arrival among exponential clocks of rate `weight`, so link i wins
 * weight_i / sum of weights of the flows; and a flow's scores do not depend
 * on the other links, so adding or removing one link moves only the flows
 * that go to it or came from it. */
int fp_peer_choose(const struct fp_peer *p, const uint8_t *ip, size_t len)
{
    if (p->ncand == 0 || len == 0)
        return p->primary;
    uint64_t flow = fp_flow_hash(ip, len);
    int best = -1;
    if (p->equal_weights) {
        uint64_t top = 0;
        for (int i = 0; i < p->ncand; i++) {
            uint64_t h = fp_mix64(flow ^ p->cand[i].salt);
            if (best < 0 || h > top) {
                top = h;
                best = p->cand[i].slot;
            }
        }
        return best;
    }
    double low = 0;
    for (int i = 0; i < p->ncand; i++) {
        double score = fp_hrw_score(flow, p->cand[i].salt, p->cand[i].inv_weight);
        if (best < 0 || score < low) {
            low = score;
            best = p->cand[i].slot;
        }
    }
    return best;
}

void fp_peers_drop_link(struct fp *fp, uint32_t link_id)
{
    for (int i = 0; i < FP_PEER_BUCKETS; i++) {
        for (struct fp_peer *p = fp->peers[i]; p; p = p->next) {
            pthread_mutex_lock(&p->ep_lock);
            int s = fp_peer_ep_slot(p, link_id);
            if (s >= 0) {
                memset(&p->ep[s], 0, sizeof(p->ep[s]));
                fp_peer_choice_update(p);
                fp_ep_changed(fp);
            }
            pthread_mutex_unlock(&p->ep_lock);
        }
    }
}

int fp_peer_set_endpoint(fp_t *fp, uint32_t peer_id, uint32_t link_id, const struct fp_addr *ep)
{
    if (!fp_addr_valid(ep))
        return -EINVAL;
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (!p)
        goto out;
    pthread_mutex_lock(&p->ep_lock);
    int s = fp_peer_ep_slot(p, link_id);
    for (int i = 0; s < 0 && i < FP_PEER_ENDPOINTS; i++) {
        if (!p->ep[i].used) {
            s = i;
            memset(&p->ep[s], 0, sizeof(p->ep[s]));
            p->ep[s].used = true;
            p->ep[s].link_id = link_id;
        }
    }
    if (s < 0) {
        rc = -ENOSPC;
    } else {
        p->ep[s].addr = *ep;
        fp_addr_normalize(&p->ep[s].addr);
        p->ep[s].seq = ++p->ep_seq;
        fp_peer_choice_update(p);
        fp_ep_changed(fp);
        /* A clock owed while it had no endpoint can come due now: scan again. */
        atomic_fetch_add_explicit(&fp->live_gen, 1, memory_order_release);
    }
    pthread_mutex_unlock(&p->ep_lock);
out:
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_peer_del_endpoint(fp_t *fp, uint32_t peer_id, uint32_t link_id)
{
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        pthread_mutex_lock(&p->ep_lock);
        int s = fp_peer_ep_slot(p, link_id);
        if (s >= 0) {
            memset(&p->ep[s], 0, sizeof(p->ep[s]));
            fp_peer_choice_update(p);
            fp_ep_changed(fp);
            rc = 0;
        } else {
            rc = -ENOTCONN;
        }
        pthread_mutex_unlock(&p->ep_lock);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_peer_get_endpoint(fp_t *fp, uint32_t peer_id, uint32_t *link_id, struct fp_addr *ep)
{
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        pthread_mutex_lock(&p->ep_lock);
        if (p->primary >= 0) {
            if (link_id)
                *link_id = p->ep[p->primary].link_id;
            if (ep)
                *ep = p->ep[p->primary].addr;
            rc = 0;
        } else {
            rc = -ENOTCONN;
        }
        pthread_mutex_unlock(&p->ep_lock);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_peer_endpoints(fp_t *fp, uint32_t peer_id, struct fp_peer_links *out)
{
    if (!out)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        pthread_mutex_lock(&p->ep_lock);
        for (int s = 0; s < FP_PEER_ENDPOINTS; s++) {
            const struct fp_peer_ep *e = &p->ep[s];
            if (!e->used)
                continue;
            struct fp_endpoint *o = &out->ep[out->n_endpoints++];
            o->link_id = e->link_id;
            o->addr = e->addr;
            o->primary = s == p->primary;
            o->rx_packets = e->rx_packets;
            o->rx_bytes = e->rx_bytes;
            o->tx_packets = e->tx_packets;
            o->tx_bytes = e->tx_bytes;
        }
        out->n_policy = p->npol;
        memcpy(out->policy, p->pol, sizeof(out->policy));
        out->rx_unlisted = p->rx_unlisted;
        out->mtu = p->mtu;
        out->inner_mtu = atomic_load_explicit(&p->inner_mtu, memory_order_relaxed);
        pthread_mutex_unlock(&p->ep_lock);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

uint64_t fp_endpoints_gen(fp_t *fp)
{
    return atomic_load_explicit(&fp->ep_gen, memory_order_relaxed);
}

int fp_peer_set_policy(fp_t *fp, uint32_t peer_id, const struct fp_link_weight *w, size_t n)
{
    if (n > FP_PEER_ENDPOINTS || (n && !w))
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (w[i].weight == 0)
            return -EINVAL;
        for (size_t j = 0; j < i; j++)
            if (w[j].link_id == w[i].link_id)
                return -EINVAL;
    }
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        pthread_mutex_lock(&p->ep_lock);
        memset(p->pol, 0, sizeof(p->pol));
        if (n)
            memcpy(p->pol, w, n * sizeof(*w));
        p->npol = (uint32_t)n;
        fp_peer_choice_update(p);
        pthread_mutex_unlock(&p->ep_lock);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_peer_set_mtu(fp_t *fp, uint32_t peer_id, uint32_t mtu)
{
    if (mtu != 0 && (mtu < FP_PMTU_MIN || mtu > 65535))
        return -EINVAL;
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        pthread_mutex_lock(&p->ep_lock);
        p->mtu = mtu;
        fp_peer_choice_update(p);
        pthread_mutex_unlock(&p->ep_lock);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

/* ------------------------------------------------------------------ keys */

int fp_key_install(fp_t *fp, uint32_t peer_id, uint32_t local_index,
                   const uint8_t *tx_key, const uint8_t *rx_key)
{
    if (!tx_key || !rx_key)
        return -EINVAL;
    /* Key schedule outside the exclusive lock: the data path keeps going. */
    struct fp_key *k = fp_key_new(tx_key, rx_key, fp_now_ns());
    if (!k)
        return -ENOMEM;
    k->local_index = local_index;
    int rc;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p && fp_index_find(fp, local_index)) {
        rc = -EEXIST;
    } else if (p) {
        int s;
        if (p->tx_slot >= 0)
            s = 1 - p->tx_slot;
        else if (!p->slot[0])
            s = 0;
        else if (!p->slot[1])
            s = 1;
        else /* two keys, none active: replace the older */
            s = p->slot[0]->created_ns <= p->slot[1]->created_ns ? 0 : 1;
        struct fp_key *old = p->slot[s];
        if (old) {
            index_remove(fp, old);
            fp_key_free(old);
        }
        k->peer = p;
        atomic_store_explicit(&k->rekey_after_s,
                              atomic_load_explicit(&p->rekey_after_s, memory_order_relaxed),
                              memory_order_relaxed);
        atomic_store_explicit(&k->reject_after_s,
                              atomic_load_explicit(&p->reject_after_s, memory_order_relaxed),
                              memory_order_relaxed);
        p->slot[s] = k;
        index_insert(fp, k);
        k = NULL;
    }
    pthread_rwlock_unlock(&fp->lock);
    fp_key_free(k);
    return rc;
}

int fp_key_activate(fp_t *fp, uint32_t peer_id, uint32_t local_index, uint32_t remote_index)
{
    int rc;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p)
        rc = -ENOENT; /* until the key is found */
    for (int s = 0; p && s < 2; s++) {
        if (p->slot[s] && p->slot[s]->local_index == local_index) {
            p->slot[s]->remote_index = remote_index;
            p->tx_slot = s;
            /* New keys, a new path perhaps: silence before them says nothing now. */
            atomic_store_explicit(&p->unanswered_ns, 0, memory_order_relaxed);
            /* A clock owed while it had no keys can come due now: scan again. */
            atomic_fetch_add_explicit(&fp->live_gen, 1, memory_order_release);
            rc = 0;
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_key_clear(fp_t *fp, uint32_t peer_id)
{
    int rc;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    for (int s = 0; p && s < 2; s++) {
        if (p->slot[s]) {
            index_remove(fp, p->slot[s]);
            fp_key_free(p->slot[s]);
            p->slot[s] = NULL;
        }
    }
    if (p) {
        p->tx_slot = -1;
        /* No keys, nothing to answer or be answered: its liveness clocks stop. */
        atomic_store_explicit(&p->unanswered_ns, 0, memory_order_relaxed);
        atomic_store_explicit(&p->owed_ns, 0, memory_order_relaxed);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_key_info(fp_t *fp, uint32_t peer_id, struct fp_key_info *out)
{
    if (!out)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        out->slots_used = (p->slot[0] != NULL) + (p->slot[1] != NULL);
        if (p->tx_slot >= 0) {
            struct fp_key *k = p->slot[p->tx_slot];
            out->has_tx = 1;
            out->tx_local_index = k->local_index;
            out->tx_remote_index = k->remote_index;
            out->tx_counter = atomic_load_explicit(&k->tx_counter, memory_order_relaxed);
            out->tx_age_s = (uint32_t)((fp_now_ns() - k->created_ns) / 1000000000u);
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_test_set_tx_counter(fp_t *fp, uint32_t peer_id, uint64_t counter)
{
    int rc;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p && p->tx_slot < 0)
        rc = -ENOENT;
    if (p && p->tx_slot >= 0) {
        atomic_store(&p->slot[p->tx_slot]->tx_counter, counter);
        rc = 0;
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

/* ------------------------------------------------------------------ counters */

void fp_ctr_snapshot(const struct fp_ctr *c, struct fp_counters *out)
{
    out->rx_packets = atomic_load_explicit(&c->rx_packets, memory_order_relaxed);
    out->rx_bytes = atomic_load_explicit(&c->rx_bytes, memory_order_relaxed);
    out->tx_packets = atomic_load_explicit(&c->tx_packets, memory_order_relaxed);
    out->tx_bytes = atomic_load_explicit(&c->tx_bytes, memory_order_relaxed);
    for (int i = 0; i < FP_DROP__COUNT; i++)
        out->drops[i] = atomic_load_explicit(&c->drops[i], memory_order_relaxed);
    out->last_rx_ns = atomic_load_explicit(&c->last_rx_ns, memory_order_relaxed);
    out->last_tx_ns = atomic_load_explicit(&c->last_tx_ns, memory_order_relaxed);
}

int fp_peer_counters(fp_t *fp, uint32_t peer_id, struct fp_counters *out)
{
    if (!out)
        return -EINVAL;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find(fp, peer_id);
    if (p)
        fp_ctr_snapshot(&p->ctr, out);
    /* A group seals nothing itself: what it handed on is counted per member. */
    for (uint32_t i = 0; p && p->group && i < p->group->n; i++)
        out->tx_packets +=
            atomic_load_explicit(&p->group->m[i].packets, memory_order_relaxed);
    pthread_rwlock_unlock(&fp->lock);
    return p ? 0 : -ENOENT;
}

int fp_link_counters(fp_t *fp, uint32_t link_id, struct fp_counters *out)
{
    if (!out)
        return -EINVAL;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_link *l = fp_link_find(fp, link_id);
    if (l)
        fp_ctr_snapshot(&l->ctr, out);
    pthread_rwlock_unlock(&fp->lock);
    return l ? 0 : -ENOENT;
}

void fp_global_counters(fp_t *fp, struct fp_counters *out)
{
    fp_ctr_snapshot(&fp->gctr, out);
}

void fp_spin_stats(fp_t *fp, struct fp_spin_stats *out)
{
    out->spins = atomic_load_explicit(&fp->spins, memory_order_relaxed);
    out->hits = atomic_load_explicit(&fp->spin_hits, memory_order_relaxed);
    out->spin_ns = atomic_load_explicit(&fp->spin_ns, memory_order_relaxed);
}
