/*
 * ctrlq.c - the bounded queue of control events for Python, and the eventfd
 * that asyncio waits on. The eventfd is readable exactly while the queue is
 * not empty (written on empty -> non-empty, drained on non-empty -> empty),
 * so a level-triggered reader never spins and never misses an event.
 */
#include "fp_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int fp_ctrlq_init(struct fp_ctrlq *q, uint32_t cap)
{
    memset(q, 0, sizeof(*q));
    q->efd = -1;
    /* calloc'd slots stay unresident until the ring first reaches them. */
    q->ring = calloc(cap, sizeof(*q->ring));
    if (!q->ring)
        return -ENOMEM;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        int e = errno;
        free(q->ring);
        q->ring = NULL;
        return -e;
    }
    q->cap = cap;
    pthread_mutex_init(&q->lock, NULL);
    return 0;
}

void fp_ctrlq_free(struct fp_ctrlq *q)
{
    if (!q->ring)
        return;
    close(q->efd);
    free(q->ring);
    q->ring = NULL;
    pthread_mutex_destroy(&q->lock);
}

int fp_ctrlq_push(struct fp_ctrlq *q, uint32_t event, uint32_t link_id, uint32_t peer_id,
                  const struct fp_addr *from, const uint8_t *data, size_t len)
{
    if (len > sizeof(q->ring[0].data))
        return -EMSGSIZE;
    pthread_mutex_lock(&q->lock);
    if (q->count == q->cap) {
        pthread_mutex_unlock(&q->lock);
        return -ENOBUFS;
    }
    struct fp_ctrl_msg *m = &q->ring[(q->head + q->count) % q->cap];
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
    if (q->count++ == 0) {
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

int fp_ctrl_recv(fp_t *fp, struct fp_ctrl_msg *out)
{
    struct fp_ctrlq *q = &fp->cq;
    if (!out)
        return -EINVAL;
    pthread_mutex_lock(&q->lock);
    if (q->count == 0) {
        pthread_mutex_unlock(&q->lock);
        return -EAGAIN;
    }
    struct fp_ctrl_msg *m = &q->ring[q->head];
    /* Copy only what is used: messages are mostly small. */
    memcpy(out, m, offsetof(struct fp_ctrl_msg, data) + m->len);
    q->head = (q->head + 1) % q->cap;
    if (--q->count == 0) {
        uint64_t v;
        ssize_t r = read(q->efd, &v, sizeof(v));
        (void)r;
    }
    pthread_mutex_unlock(&q->lock);
    return 0;
}
