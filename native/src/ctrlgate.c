/*
 * ctrlgate.c - which lane of the control queue (ctrlq.c) a control datagram takes, so that
 * a flood from unknown sources can never starve the control traffic of known peers.
 *
 * Known sources: the endpoint of any peer (its address and port, on any link) and the
 * addresses the supervisor declares (fp_ctrl_known_set: the PoP, STUN servers, handshakes
 * in progress, punch targets; port 0 for every port of an address). Their datagrams go to
 * the known lane unmetered. The known set is one open-addressing hash, rebuilt from the
 * peers and the declared addresses when either changed (fp->ep_gen moves with every
 * endpoint change, a roam included): rare, and a lookup per datagram costs a hash.
 *
 * Every other source passes two token buckets: its source IP's own (an IPv6 source's /64's;
 * a bounded table with a random hash seed; a new IP takes a free slot near its hash or evicts the one idle
 * longest there) and one shared by all unknown sources, which bounds what a flood from
 * random spoofed addresses (a new bucket per packet) can queue. What passes goes to the
 * unknown lane, whose own bound only unknown sources compete for.
 *
 * Locking: g->lock guards everything but the lane-full counters (atomic). The caller of
 * fp_ctrl_lane_for holds fp->lock shared, so the peers can be walked; the order is
 * fp->lock, g->lock, a peer's ep_lock.
 */
#include "fp_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define PROBE_WINDOW 8 /* slots a source IP may take, from its hash on */

static inline uint64_t mix(uint64_t h)
{
    /* murmur3's finaliser */
    h ^= h >> 33;
    h *= UINT64_C(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h *= UINT64_C(0xc4ceb9fe1a85ec53);
    h ^= h >> 33;
    return h;
}

static uint64_t hash_ip(uint64_t seed, uint8_t family, const uint8_t ip[16], uint16_t port)
{
    uint64_t a, b;
    memcpy(&a, ip, 8);
    memcpy(&b, ip + 8, 8);
    uint64_t h = mix(seed ^ a ^ ((uint64_t)family << 56) ^ ((uint64_t)port << 32));
    return mix(h ^ b);
}

static uint32_t pow2_at_least(uint64_t n)
{
    uint32_t c = 16;
    while (c < n && c < (UINT32_C(1) << 30))
        c <<= 1;
    return c;
}

int fp_ctrlgate_init(struct fp_ctrlgate *g, const struct fp_config *cfg)
{
    memset(g, 0, sizeof(*g));
    uint32_t cap = pow2_at_least(cfg->ctrl_sources);
    g->src = calloc(cap, sizeof(*g->src));
    if (!g->src)
        return -ENOMEM;
    g->src_mask = cap - 1;
    if (getrandom(&g->seed, sizeof(g->seed), GRND_NONBLOCK) != sizeof(g->seed)) {
        /* No entropy yet (early boot): the monotonic clock alone is about the uptime, which
         * a remote attacker can guess; the wall clock, the pid and where the heap and stack
         * were mapped add what it cannot. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        g->seed = mix(fp_now_ns() ^ mix((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30)) ^
                      mix((uint64_t)(uintptr_t)g->src ^ ((uint64_t)getpid() << 40)) ^
                      (uint64_t)(uintptr_t)&ts);
    }
    g->stale = true;
    g->all.milli = (uint64_t)cfg->ctrl_unknown_burst * 1000;
    g->all.at_ns = fp_now_ns();
    pthread_mutex_init(&g->lock, NULL);
    return 0;
}

void fp_ctrlgate_free(struct fp_ctrlgate *g)
{
    if (!g->src)
        return;
    free(g->src);
    free(g->known);
    free(g->declared);
    g->src = NULL;
    pthread_mutex_destroy(&g->lock);
}

/* ------------------------------------------------------------------ the known set */

static bool known_has(const struct fp_ctrlgate *g, const struct fp_addr *a)
{
    if (!g->known)
        return false;
    for (uint32_t i = (uint32_t)hash_ip(g->seed, a->family, a->addr, a->port) & g->known_mask;;
         i = (i + 1) & g->known_mask) {
        const struct fp_addr *k = &g->known[i];
        if (!k->family)
            return false;
        if (fp_addr_equal(k, a))
            return true;
    }
}

static void known_put(struct fp_addr *t, uint32_t mask, uint64_t seed, const struct fp_addr *a,
                      uint32_t *n)
{
    for (uint32_t i = (uint32_t)hash_ip(seed, a->family, a->addr, a->port) & mask;;
         i = (i + 1) & mask) {
        if (!t[i].family) {
            t[i] = *a;
            (*n)++;
            return;
        }
        if (fp_addr_equal(&t[i], a))
            return;
    }
}

/* Under g->lock and fp->lock (shared). On no memory the old set stays, tried again later. */
static void known_rebuild(struct fp *fp, struct fp_ctrlgate *g)
{
    uint64_t gen = atomic_load_explicit(&fp->ep_gen, memory_order_relaxed);
    uint64_t n = g->ndeclared;
    for (int b = 0; b < FP_PEER_BUCKETS; b++)
        for (struct fp_peer *p = fp->peers[b]; p; p = p->next)
            n += FP_PEER_ENDPOINTS;
    uint32_t cap = pow2_at_least(2 * n + 1);
    struct fp_addr *t = calloc(cap, sizeof(*t));
    if (!t)
        return;
    uint32_t count = 0;
    bool wild = false;
    for (uint32_t i = 0; i < g->ndeclared; i++) {
        known_put(t, cap - 1, g->seed, &g->declared[i], &count);
        wild |= g->declared[i].port == 0;
    }
    for (int b = 0; b < FP_PEER_BUCKETS; b++) {
        for (struct fp_peer *p = fp->peers[b]; p; p = p->next) {
            pthread_mutex_lock(&p->ep_lock);
            for (int s = 0; s < FP_PEER_ENDPOINTS; s++) {
                if (p->ep[s].used && p->ep[s].addr.family) {
                    struct fp_addr a = p->ep[s].addr;
                    fp_addr_normalize(&a);
                    known_put(t, cap - 1, g->seed, &a, &count);
                }
            }
            pthread_mutex_unlock(&p->ep_lock);
        }
    }
    free(g->known);
    g->known = t;
    g->known_mask = cap - 1;
    g->nknown = count;
    g->has_wildcard = wild;
    g->ep_gen = gen;
    g->stale = false;
}

int fp_ctrl_known_set(fp_t *fp, const struct fp_addr *addrs, size_t n)
{
    if (n > FP_CTRL_KNOWN_MAX)
        return -E2BIG;
    if (n && !addrs)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (addrs[i].family != 4 && addrs[i].family != 6)
            return -EINVAL;
    struct fp_addr *copy = NULL;
    if (n) {
        copy = malloc(n * sizeof(*copy));
        if (!copy)
            return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
            copy[i] = addrs[i];
            fp_addr_normalize(&copy[i]);
        }
    }
    struct fp_ctrlgate *g = &fp->gate;
    pthread_mutex_lock(&g->lock);
    struct fp_addr *old = g->declared;
    g->declared = copy;
    g->ndeclared = (uint32_t)n;
    g->stale = true;
    pthread_mutex_unlock(&g->lock);
    free(old);
    return 0;
}

/* ------------------------------------------------------------------ buckets */

/* Refill b at pps up to burst, then take one datagram if there is one. */
static bool bucket_take(struct fp_bucket *b, uint32_t pps, uint32_t burst, uint64_t now)
{
    uint64_t cap = (uint64_t)burst * 1000;
    if (now > b->at_ns) {
        uint64_t dt = now - b->at_ns;
        if (dt > UINT64_C(3600000000000))
            dt = UINT64_C(3600000000000); /* an hour fills any bucket; no overflow below */
        uint64_t add = dt * pps / 1000000;
        /* Only whole thousandths move the clock: slow rates still refill. */
        if (add) {
            b->milli = b->milli + add > cap ? cap : b->milli + add;
            b->at_ns = now;
        }
    }
    if (b->milli < 1000)
        return false;
    b->milli -= 1000;
    return true;
}

/* The bucket of from's IP (from normalized: an IPv4 address's unused bytes zero, so they
 * cannot vary its hash): found, or a free slot near its hash, or the slot idle longest
 * there (evicted). A new bucket starts full. */
static struct fp_bucket *source_bucket(struct fp *fp, struct fp_ctrlgate *g,
                                       const struct fp_addr *from, uint64_t now)
{
    uint32_t i0 = (uint32_t)hash_ip(g->seed, from->family, from->addr, 0) & g->src_mask;
    size_t n = from->family == 4 ? 4 : 16;
    struct fp_srcb *slot = NULL;
    for (uint32_t k = 0; k < PROBE_WINDOW; k++) {
        struct fp_srcb *s = &g->src[(i0 + k) & g->src_mask];
        if (s->family == from->family && memcmp(s->ip, from->addr, n) == 0) {
            s->seen_ns = now;
            return &s->b;
        }
        if (!s->family) {
            if (!slot || slot->family)
                slot = s;
        } else if (!slot || (slot->family && s->seen_ns < slot->seen_ns)) {
            slot = s;
        }
    }
    if (slot->family)
        g->evictions++;
    else
        g->nsrc++;
    memset(slot, 0, sizeof(*slot));
    slot->family = from->family;
    memcpy(slot->ip, from->addr, n);
    slot->seen_ns = now;
    slot->b.milli = (uint64_t)fp->cfg.ctrl_source_burst * 1000;
    slot->b.at_ns = now;
    return &slot->b;
}

int fp_ctrl_lane_for(struct fp *fp, const struct fp_addr *from, uint64_t now)
{
    if (!from)
        return FP_LANE_KNOWN;
    struct fp_ctrlgate *g = &fp->gate;
    const struct fp_config *c = &fp->cfg;
    struct fp_addr a = *from;
    fp_addr_normalize(&a);
    pthread_mutex_lock(&g->lock);
    if (g->stale || g->ep_gen != atomic_load_explicit(&fp->ep_gen, memory_order_relaxed))
        known_rebuild(fp, g);
    bool known = known_has(g, &a);
    if (!known && g->has_wildcard) {
        a.port = 0;
        known = known_has(g, &a);
    }
    int lane = FP_LANE_UNKNOWN;
    /* An IPv6 source is keyed by its /64: one host holds a whole /64 (SLAAC, privacy
     * addresses), so a bucket per address would let it pass as thousands of sources. */
    if (!known && a.family == 6)
        memset(a.addr + 8, 0, 8);
    if (known) {
        lane = FP_LANE_KNOWN;
    } else if (!bucket_take(source_bucket(fp, g, &a, now), c->ctrl_source_pps,
                            c->ctrl_source_burst, now)) {
        g->limited_source++;
        lane = -1;
    } else if (!bucket_take(&g->all, c->ctrl_unknown_pps, c->ctrl_unknown_burst, now)) {
        g->limited_global++;
        lane = -1;
    }
    pthread_mutex_unlock(&g->lock);
    return lane;
}

void fp_ctrl_lane_full(struct fp *fp, int lane)
{
    fp_ctr_add(lane == FP_LANE_KNOWN ? &fp->gate.known_full : &fp->gate.unknown_full, 1);
}

void fp_ctrl_stats(fp_t *fp, struct fp_ctrl_stats *out)
{
    memset(out, 0, sizeof(*out));
    struct fp_ctrlq *q = &fp->cq;
    pthread_mutex_lock(&q->lock);
    out->known_len = q->lane[FP_LANE_KNOWN].count;
    out->known_cap = q->lane[FP_LANE_KNOWN].cap;
    out->known_queued = q->lane[FP_LANE_KNOWN].queued;
    out->unknown_len = q->lane[FP_LANE_UNKNOWN].count;
    out->unknown_cap = q->lane[FP_LANE_UNKNOWN].cap;
    out->unknown_queued = q->lane[FP_LANE_UNKNOWN].queued;
    pthread_mutex_unlock(&q->lock);
    struct fp_ctrlgate *g = &fp->gate;
    out->known_full = atomic_load_explicit(&g->known_full, memory_order_relaxed);
    out->unknown_full = atomic_load_explicit(&g->unknown_full, memory_order_relaxed);
    pthread_mutex_lock(&g->lock);
    out->rate_limited_source = g->limited_source;
    out->rate_limited_global = g->limited_global;
    out->sources = g->nsrc;
    out->sources_cap = g->src_mask + 1;
    out->evictions = g->evictions;
    out->declared = g->ndeclared;
    out->known_addrs = g->nknown;
    pthread_mutex_unlock(&g->lock);
}
