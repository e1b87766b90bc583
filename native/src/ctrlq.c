/*
 * ctrlq.c - the bounded queue of control events for Python, in two lanes, and the eventfd
 * that asyncio waits on. Lane FP_LANE_KNOWN takes the fast path's own events and the
 * datagrams of known sources, lane FP_LANE_UNKNOWN those of everyone else (ctrlgate.c
 * decides which); each lane is a ring of its own, so an unknown-source flood that fills its
 * lane never takes a slot of the other. The eventfd is readable exactly while either lane
 * is not empty (written on empty -> non-empty, drained on non-empty -> empty), so a
 * level-triggered reader never spins and never misses an event. One mutex guards both.
 *
 * The known lane is unmetered, and a known source's address can be spoofed (a peer's, or
 * any port of a declared host's) or shared (a carrier NAT's): so no one source IP may hold
 * more than half of the known lane's slots, and a flood under one known source's name
 * leaves the other half to every other known source. Counted per IP in a table of their
 * own (seeded hash, open addressing); a datagram over the share is dropped as the lane
 * full would be.
 */
#include "fp_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

static uint32_t share_home(const struct fp_ctrlq *q, uint8_t family, const uint8_t ip[16])
{
    uint64_t a, b;
    memcpy(&a, ip, 8);
    memcpy(&b, ip + 8, 8);
    uint64_t h = q->seed ^ ((uint64_t)family << 56);
    h = (h ^ a) * UINT64_C(0x9e3779b97f4a7c15);
    h ^= h >> 29;
    h = (h ^ b) * UINT64_C(0xbf58476d1ce4e5b9);
    h ^= h >> 32;
    return (uint32_t)h & q->share_mask;
}

/* The share entry of the source IP of a datagram in the known lane: found, or (insert) a
 * free one taken for it; NULL when there is no source address (the fast path's own events,
 * which no share limits) or, without insert, no entry. */
static struct fp_ctrlq_share *share_entry(struct fp_ctrlq *q, const struct fp_addr *from,
                                          bool insert)
{
    if (!from || (from->family != 4 && from->family != 6))
        return NULL;
    uint8_t ip[16] = {0};
    memcpy(ip, from->addr, from->family == 4 ? 4 : 16);
    for (uint32_t i = share_home(q, from->family, ip);; i = (i + 1) & q->share_mask) {
        struct fp_ctrlq_share *e = &q->share[i];
        if (!e->family) {
            if (!insert)
                return NULL;
            e->family = from->family;
            memcpy(e->ip, ip, 16);
            e->count = 0;
            return e;
        }
        if (e->family == from->family && memcmp(e->ip, ip, 16) == 0)
            return e;
    }
}

/* One datagram of e's IP left the known lane; the entry goes with its last (linear
 * probing's deletion: the entries after it that hashed before it move back). */
static void share_release(struct fp_ctrlq *q, struct fp_ctrlq_share *e)
{
    if (!e || !e->count || --e->count)
        return;
    uint32_t mask = q->share_mask, i = (uint32_t)(e - q->share);
    q->share[i].family = 0;
    for (uint32_t j = (i + 1) & mask; q->share[j].family; j = (j + 1) & mask) {
        uint32_t k = share_home(q, q->share[j].family, q->share[j].ip);
        /* j stays where it is if its home k lies cyclically in (i, j]. */
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            q->share[i] = q->share[j];
            q->share[j].family = 0;
            i = j;
        }
    }
}

int fp_ctrlq_init(struct fp_ctrlq *q, uint32_t known_cap, uint32_t unknown_cap)
{
    memset(q, 0, sizeof(*q));
    q->efd = -1;
    /* calloc'd slots stay unresident until the ring first reaches them. */
    q->lane[FP_LANE_KNOWN].ring = calloc(known_cap, sizeof(struct fp_ctrl_msg));
    q->lane[FP_LANE_UNKNOWN].ring = calloc(unknown_cap, sizeof(struct fp_ctrl_msg));
    if (!q->lane[FP_LANE_KNOWN].ring || !q->lane[FP_LANE_UNKNOWN].ring) {
        free(q->lane[FP_LANE_KNOWN].ring);
        free(q->lane[FP_LANE_UNKNOWN].ring);
        q->lane[FP_LANE_KNOWN].ring = NULL;
        return -ENOMEM;
    }
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        int e = errno;
        free(q->lane[FP_LANE_KNOWN].ring);
        free(q->lane[FP_LANE_UNKNOWN].ring);
        q->lane[FP_LANE_KNOWN].ring = NULL;
        return -e;
    }
    if (getrandom(&q->seed, sizeof(q->seed), GRND_NONBLOCK) != sizeof(q->seed))
        q->seed = fp_now_ns() ^ (uint64_t)(uintptr_t)q;
    q->share_max = known_cap / 2 ? known_cap / 2 : 1;
    uint32_t slots = 16;
    while (slots < 2 * known_cap)
        slots <<= 1;
    q->share = calloc(slots, sizeof(*q->share));
    if (!q->share) {
        close(q->efd);
        free(q->lane[FP_LANE_KNOWN].ring);
        free(q->lane[FP_LANE_UNKNOWN].ring);
        q->lane[FP_LANE_KNOWN].ring = NULL;
        return -ENOMEM;
    }
    q->share_mask = slots - 1;
    q->lane[FP_LANE_KNOWN].cap = known_cap;
    q->lane[FP_LANE_UNKNOWN].cap = unknown_cap;
    pthread_mutex_init(&q->lock, NULL);
    return 0;
}

void fp_ctrlq_free(struct fp_ctrlq *q)
{
    if (!q->lane[FP_LANE_KNOWN].ring)
        return;
    close(q->efd);
    for (int i = 0; i < FP_LANES; i++) {
        free(q->lane[i].ring);
        q->lane[i].ring = NULL;
    }
    free(q->share);
    q->share = NULL;
    pthread_mutex_destroy(&q->lock);
}

int fp_ctrlq_push(struct fp_ctrlq *q, int lane, uint32_t event, uint32_t link_id,
                  uint32_t peer_id, const struct fp_addr *from, const uint8_t *data, size_t len)
{
    if (len > sizeof(q->lane[0].ring[0].data))
        return -EMSGSIZE;
    struct fp_ctrl_lane *l = &q->lane[lane];
    pthread_mutex_lock(&q->lock);
    struct fp_ctrlq_share *e = NULL;
    if (l->count == l->cap ||
        (lane == FP_LANE_KNOWN && (e = share_entry(q, from, true)) && e->count >= q->share_max)) {
        pthread_mutex_unlock(&q->lock);
        return -ENOBUFS;
    }
    if (e)
        e->count++;
    struct fp_ctrl_msg *m = &l->ring[(l->head + l->count) % l->cap];
    m->event = event;
    m->link_id = link_id;
    m->peer_id = peer_id;
    if (from)
        m->from = *from;
    else
        memset(&m->from, 0, sizeof(m->from));
    m->len = (uint32_t)len;
    if (len)
        memcpy(m->data, data, len);
    l->count++;
    l->queued++;
    if (q->total++ == 0) {
        uint64_t one = 1;
        /* Cannot fail: the counter is 0 here, far from overflow. */
        ssize_t r = write(q->efd, &one, sizeof(one));
        (void)r;
    }
    pthread_mutex_unlock(&q->lock);
    return 0;
}

int fp_ctrl_fd(fp_t *fp)
{
    return fp->cq.efd;
}

/* The head of lane into out; the caller holds q->lock and the lane is not empty. */
static void take(struct fp_ctrlq *q, struct fp_ctrl_lane *l, struct fp_ctrl_msg *out)
{
    struct fp_ctrl_msg *m = &l->ring[l->head];
    /* Copy only what is used: messages are mostly small. */
    memcpy(out, m, offsetof(struct fp_ctrl_msg, data) + m->len);
    if (l == &q->lane[FP_LANE_KNOWN])
        share_release(q, share_entry(q, &m->from, false));
    l->head = (l->head + 1) % l->cap;
    l->count--;
    if (--q->total == 0) {
        uint64_t v;
        ssize_t r = read(q->efd, &v, sizeof(v));
        (void)r;
    }
}

int fp_ctrl_recv(fp_t *fp, struct fp_ctrl_msg *out)
{
    struct fp_ctrlq *q = &fp->cq;
    if (!out)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    for (int i = 0; i < FP_LANES; i++) {
        if (q->lane[i].count) {
            take(q, &q->lane[i], out);
            pthread_mutex_unlock(&q->lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return -EAGAIN;
}

int fp_ctrl_recv_lane(fp_t *fp, uint32_t lane, struct fp_ctrl_msg *out)
{
    struct fp_ctrlq *q = &fp->cq;
    if (!out || lane >= FP_LANES)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    struct fp_ctrl_lane *l = &q->lane[lane];
    if (l->count == 0) {
        pthread_mutex_unlock(&q->lock);
        return -EAGAIN;
    }
    take(q, l, out);
    pthread_mutex_unlock(&q->lock);
    return 0;
}
