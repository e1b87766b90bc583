/*
 * groups.c - peer groups (docs/dataplane.md, "Peer groups"): an id that routes name in
 * place of a peer, whose packets go per flow to one of its member peers, chosen as a
 * peer's link is (the flow hash and weighted rendezvous hashing of table.c).
 *
 * A group is an entry of the peers' table (so routes, the rules' peers and
 * fp_route_batch's checks take it as they take a peer) that holds no keys nor endpoints
 * and points at its members. Members are plain peers; they change only under fp->lock
 * exclusive (fp_group_set, fp_peer_del of a member), and packets read them under it
 * shared, as they read routes.
 */
#include "fp_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Not the links' constant (table.c): a flow's member and that member's link are then chosen
 * independently, so a member's flows still spread over all of its links. */
#define MEMBER_SALT UINT64_C(0xE7037ED1A0B428DB)

static void group_derive(struct fp_group *g)
{
    /* Equal among the weighted members; standbys (weight 0) are chosen among themselves,
     * equally, only when no weighted member is usable. */
    uint32_t first = 0;
    g->equal_weights = true;
    for (uint32_t i = 0; i < g->n; i++) {
        struct fp_gmember *m = &g->m[i];
        m->salt = fp_mix64(m->peer->id ^ MEMBER_SALT);
        m->inv_weight = m->weight ? 1.0 / (double)m->weight : 1.0;
        if (!m->weight)
            continue;
        if (!first)
            first = m->weight;
        g->equal_weights &= m->weight == first;
    }
}

/* What sealing needs; a member without it would only drop the flow (no_key, no_endpoint)
 * while another could carry it. An expired key still counts: a rekey is under way. */
static inline bool usable(const struct fp_peer *p)
{
    return p->tx_slot >= 0 && atomic_load_explicit(&p->has_endpoint, memory_order_relaxed);
}

/* Rendezvous hashing over the usable members only: a flow's scores do not depend on the
 * others, so passing over a member moves exactly its flows, each to its next best. */
struct fp_peer *fp_group_resolve(struct fp_peer *gp, const uint8_t *ip, size_t len)
{
    struct fp_group *g = gp->group;
    int cand[FP_GROUP_MEMBERS], n = 0;
    bool standby = false;
    for (uint32_t i = 0; i < g->n; i++)
        if (g->m[i].weight && usable(g->m[i].peer))
            cand[n++] = (int)i;
    if (n == 0) {
        /* No weighted member can carry it: the standbys, equally. */
        standby = true;
        for (uint32_t i = 0; i < g->n; i++)
            if (usable(g->m[i].peer))
                cand[n++] = (int)i;
    }
    if (n == 0)
        return NULL;
    int best = cand[0];
    if (n > 1) {
        uint64_t flow = fp_flow_hash(ip, len);
        uint64_t top = 0;
        double low = 0;
        for (int k = 0; k < n; k++) {
            const struct fp_gmember *m = &g->m[cand[k]];
            if (g->equal_weights || standby) {
                uint64_t h = fp_mix64(flow ^ m->salt);
                if (k == 0 || h > top) {
                    top = h;
                    best = cand[k];
                }
            } else {
                double score = fp_hrw_score(flow, m->salt, m->inv_weight);
                if (k == 0 || score < low) {
                    low = score;
                    best = cand[k];
                }
            }
        }
    }
    fp_ctr_add(&g->m[best].packets, 1);
    return g->m[best].peer;
}

bool fp_group_has(const struct fp_peer *gp, const struct fp_peer *p)
{
    for (uint32_t i = 0; gp->group && i < gp->group->n; i++)
        if (gp->group->m[i].peer == p)
            return true;
    return false;
}

/* The remaining members keep their order, weights and counts, so their flows stay. */
void fp_groups_drop_peer(struct fp *fp, struct fp_peer *p)
{
    for (struct fp_group *g = fp->groups; g; g = g->next) {
        uint32_t k = 0;
        for (uint32_t i = 0; i < g->n; i++) {
            if (g->m[i].peer == p)
                continue;
            if (k != i) {
                g->m[k].peer = g->m[i].peer;
                g->m[k].weight = g->m[i].weight;
                atomic_store_explicit(
                    &g->m[k].packets,
                    atomic_load_explicit(&g->m[i].packets, memory_order_relaxed),
                    memory_order_relaxed);
            }
            k++;
        }
        if (k != g->n) {
            memset(&g->m[k], 0, sizeof(g->m[k]));
            g->n = k;
            group_derive(g);
        }
    }
}

/* An entry made by fp_peer_new and never linked in: no keys, no group yet. */
static void discard(struct fp_peer *p)
{
    if (p) {
        pthread_mutex_destroy(&p->ep_lock);
        free(p);
    }
}

/* Checked and allocated before the lock, as a route batch is: the data path waits only for
 * the change itself. */
int fp_group_set(fp_t *fp, uint32_t group_id, const struct fp_peer_weight *m, size_t n)
{
    if (n > FP_GROUP_MEMBERS || (n && !m))
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < i; j++)
            if (m[j].peer_id == m[i].peer_id)
                return -EINVAL;
    }
    struct fp_peer *fresh = fp_peer_new(group_id);
    struct fp_group *fg = calloc(1, sizeof(*fg));
    if (!fresh || !fg) {
        discard(fresh);
        free(fg);
        return -ENOMEM;
    }
    int rc = 0;
    struct fp_peer *members[FP_GROUP_MEMBERS];
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *gp = fp_peer_find(fp, group_id);
    if (gp && !gp->group)
        rc = -EEXIST;
    for (size_t i = 0; i < n && rc == 0; i++) {
        members[i] = fp_peer_find(fp, m[i].peer_id);
        if (!members[i])
            rc = -ENOENT;
        else if (members[i]->group)
            rc = -EINVAL; /* no nesting: one choice per packet, and no cycles to guard */
    }
    if (rc == 0) {
        if (!gp) {
            gp = fresh;
            gp->group = fg;
            fg->next = fp->groups;
            fp->groups = fg;
            fp_peer_insert(fp, gp);
            fresh = NULL;
            fg = NULL;
        }
        struct fp_group *g = gp->group;
        /* A member that stays keeps its count, as a rule that stays keeps its hits. */
        uint64_t carried[FP_GROUP_MEMBERS] = {0};
        for (size_t i = 0; i < n; i++)
            for (uint32_t j = 0; j < g->n; j++)
                if (g->m[j].peer == members[i])
                    carried[i] = atomic_load_explicit(&g->m[j].packets, memory_order_relaxed);
        memset(g->m, 0, sizeof(g->m));
        for (size_t i = 0; i < n; i++) {
            g->m[i].peer = members[i];
            g->m[i].weight = m[i].weight;
            atomic_store_explicit(&g->m[i].packets, carried[i], memory_order_relaxed);
        }
        g->n = (uint32_t)n;
        group_derive(g);
    }
    pthread_rwlock_unlock(&fp->lock);
    discard(fresh);
    free(fg);
    return rc;
}

int fp_group_del(fp_t *fp, uint32_t group_id)
{
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *gp = fp_peer_find(fp, group_id);
    int rc = !gp ? -ENOENT : !gp->group ? -EINVAL : 0;
    if (rc == 0) {
        struct fp_group **pp = &fp->groups;
        while (*pp && *pp != gp->group)
            pp = &(*pp)->next;
        if (*pp)
            *pp = gp->group->next;
        fp_peer_remove(fp, gp);
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_group_members(fp_t *fp, uint32_t group_id, struct fp_group_member *out, size_t cap)
{
    if (cap && !out)
        return -EINVAL;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *gp = fp_peer_find(fp, group_id);
    int rc = !gp ? -ENOENT : !gp->group ? -EINVAL : 0;
    if (rc == 0) {
        const struct fp_group *g = gp->group;
        for (uint32_t i = 0; i < g->n && i < cap; i++) {
            memset(&out[i], 0, sizeof(out[i]));
            out[i].peer_id = g->m[i].peer->id;
            out[i].weight = g->m[i].weight;
            out[i].usable = usable(g->m[i].peer);
            out[i].packets = atomic_load_explicit(&g->m[i].packets, memory_order_relaxed);
        }
        rc = (int)g->n;
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}
