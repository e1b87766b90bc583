/*
 * sources.c - the allowed sources: which site's prefixes a peer may send from.
 *
 * A table of its own (prefix -> owner, a site id), kept apart from the routes so that
 * moving a prefix's route between peers (the cloud path, the mesh, a transport rule)
 * never changes what arrives accepted. It uses the prefix tables of table.c (one hash per
 * family keyed by length and masked prefix, longest first) and fp->lock: lookups run per
 * packet under the shared lock, fp_source_batch takes it exclusively once.
 */
#include "fp_internal.h"

#include <errno.h>
#include <stdlib.h>

static struct fp_rtable *src_for(struct fp *fp, int family)
{
    return family == 4 ? &fp->src4 : &fp->src6;
}

bool fp_source_allowed(struct fp *fp, uint32_t owner, int family, const uint8_t *ip,
                       size_t len)
{
    uint8_t src[16];
    if (fp_ip_src(ip, len, src) != family)
        return false;
    const struct fp_route *r = fp_rt_match(src_for(fp, family), src);
    return r && (owner == FP_SOURCE_ANY || r->owner == owner);
}

static int op_check(const struct fp_source_op *o, uint8_t m[16])
{
    if (o->verb == FP_SOURCE_SET) {
        if (o->owner == 0 || o->owner == FP_SOURCE_ANY)
            return -EINVAL;
    } else if (o->verb != FP_SOURCE_DEL) {
        return -EINVAL;
    }
    return fp_rt_check(&o->prefix, o->plen, o->verb == FP_SOURCE_SET, m);
}

/* As fp_route_batch: everything that can fail (the checks, a node per set) happens before
 * the lock is taken, so the table changes all at once or not at all. */
int fp_source_batch(fp_t *fp, const struct fp_source_op *ops, size_t n, size_t *bad)
{
    if (n == 0)
        return 0;
    if (!ops || n > SIZE_MAX / sizeof(void *))
        return -EINVAL;
    uint8_t m[16];
    size_t i;
    int rc = 0;
    for (i = 0; i < n; i++) {
        if ((rc = op_check(&ops[i], m)) < 0)
            goto fail;
    }
    struct fp_route **nodes = calloc(n, sizeof(*nodes));
    if (!nodes) {
        rc = -ENOMEM;
        i = 0;
        goto fail;
    }
    for (i = 0; i < n; i++) {
        if (ops[i].verb == FP_SOURCE_SET && !(nodes[i] = calloc(1, sizeof(**nodes)))) {
            for (size_t j = 0; j < n; j++)
                free(nodes[j]);
            free(nodes);
            rc = -ENOMEM;
            goto fail;
        }
    }
    pthread_rwlock_wrlock(&fp->lock);
    for (i = 0; i < n; i++) {
        const struct fp_source_op *o = &ops[i];
        struct fp_rtable *t = src_for(fp, o->prefix.family);
        fp_rt_check(&o->prefix, o->plen, false, m);
        if (o->verb == FP_SOURCE_DEL) {
            /* Unlinked nodes are freed after unlocking. */
            nodes[i] = fp_rt_unlink(t, m, o->plen);
        } else {
            struct fp_route *r = fp_rt_get(t, m, o->plen, nodes[i]);
            if (r == nodes[i])
                nodes[i] = NULL;
            r->owner = o->owner;
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    for (i = 0; i < n; i++)
        free(nodes[i]);
    free(nodes);
    return 0;

fail:
    if (bad)
        *bad = i;
    return rc;
}

int fp_source_lookup(fp_t *fp, const struct fp_addr *addr, uint32_t *owner)
{
    if (!fp_addr_valid(addr) || !owner)
        return -EINVAL;
    pthread_rwlock_rdlock(&fp->lock);
    const struct fp_route *r = fp_rt_match(src_for(fp, addr->family), addr->addr);
    if (r)
        *owner = r->owner;
    pthread_rwlock_unlock(&fp->lock);
    return r ? 0 : -ENOENT;
}

int fp_peer_set_source_owner(fp_t *fp, uint32_t peer_id, uint32_t owner)
{
    int rc;
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p)
        p->source_owner = owner;
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}
