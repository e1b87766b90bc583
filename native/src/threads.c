/*
 * threads.c - the data-path threads' health: why one ended, and starting it again.
 *
 * A thread that leaves its loop on an error (a failed poll, its device gone, no memory for
 * its buffers) used to end without a word while the supervisor went on petting the
 * watchdog of a box that forwarded nothing. Now it records why (fp_thr_died) and stays
 * DIED until fp_threads_restart starts it again in the same instance: the peers, keys,
 * routes and counters live in struct fp, not in the thread, and a thread's only state of
 * its own is its buffers (the TUN reader's are freed on the way out, a link's belong to
 * the link), so a new thread carries on where the old one stopped.
 */
#include "fp_internal.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

void fp_thr_died(struct fp *fp, struct fp_thr *t, uint32_t where, int err)
{
    atomic_store(&t->err, err);
    atomic_store(&t->where, where);
    atomic_store(&t->died_ns, fp_now_ns());
    atomic_fetch_add(&t->deaths, 1);
    /* Last: whoever sees DIED sees why. */
    atomic_store(&t->state, FP_THREAD_DIED);
    atomic_fetch_add(&fp->thread_deaths, 1);
}

void fp_thr_stopped(struct fp_thr *t)
{
    atomic_store(&t->state, FP_THREAD_STOPPED);
}

int fp_thr_starting(struct fp_thr *t)
{
    /* A fault injected for a thread that died meanwhile must not kill its successor. */
    atomic_store(&t->inject, 0);
    return atomic_exchange(&t->state, FP_THREAD_RUNNING);
}

int fp_thr_injected(struct fp_thr *t)
{
    return atomic_exchange(&t->inject, 0);
}

int fp_thr_start_err(struct fp_thr *t)
{
    return atomic_exchange(&t->start_err, 0);
}

static void thr_status(const struct fp_thr *t, struct fp_thread_status *o)
{
    o->state = atomic_load(&t->state);
    o->err = atomic_load(&t->err);
    o->where = atomic_load(&t->where);
    o->died_ns = atomic_load(&t->died_ns);
    o->deaths = atomic_load(&t->deaths);
    o->restarts = atomic_load(&t->restarts);
}

int fp_threads_status(fp_t *fp, struct fp_thread_status *out, size_t cap)
{
    if (!out && cap)
        return -EINVAL;
    size_t n = 0;
    /* api_lock: the links cannot come or go meanwhile. */
    pthread_mutex_lock(&fp->api_lock);
    if (atomic_load(&fp->tun_fd) >= 0) {
        if (n < cap) {
            memset(&out[n], 0, sizeof(out[n]));
            out[n].kind = FP_THREAD_TUN;
            thr_status(&fp->tun_thr, &out[n]);
        }
        n++;
    }
    for (int i = 0; i < fp->nlinks; i++, n++) {
        if (n >= cap)
            continue;
        memset(&out[n], 0, sizeof(out[n]));
        out[n].kind = FP_THREAD_LINK;
        out[n].link_id = fp->links[i]->id;
        thr_status(&fp->links[i]->thr, &out[n]);
    }
    pthread_mutex_unlock(&fp->api_lock);
    return (int)n;
}

uint64_t fp_threads_deaths(fp_t *fp)
{
    return atomic_load(&fp->thread_deaths);
}

/* Would a thread on this fd die again at once? A TUN device that was deleted reports
 * POLLERR for good, a closed socketpair POLLHUP; a UDP socket's POLLERR is a passing ICMP
 * error, so for a link only a fd that is not open counts. */
static bool fd_gone(int fd, bool tun)
{
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 0) < 0)
        return false;
    if (p.revents & POLLNVAL)
        return true;
    return tun && (p.revents & (POLLERR | POLLHUP));
}

int fp_threads_restart(fp_t *fp)
{
    int n = 0, first = 0;
    pthread_mutex_lock(&fp->api_lock);
    if (!fp->running) {
        pthread_mutex_unlock(&fp->api_lock);
        return -ESRCH;
    }
    int tfd = atomic_load(&fp->tun_fd);
    if (tfd >= 0 && atomic_load(&fp->tun_thr.state) == FP_THREAD_DIED) {
        if (fp->tun_thread_running) {
            pthread_join(fp->tun_thread, NULL);
            fp->tun_thread_running = false;
        }
        int rc = fd_gone(tfd, true) ? -ENODEV : fp_io_start_tun(fp);
        if (rc == 0) {
            atomic_fetch_add(&fp->tun_thr.restarts, 1);
            n++;
        } else if (!first) {
            first = rc;
        }
    }
    for (int i = 0; i < fp->nlinks; i++) {
        struct fp_link *l = fp->links[i];
        if (atomic_load(&l->thr.state) != FP_THREAD_DIED)
            continue;
        if (l->thread_running) {
            pthread_join(l->thread, NULL);
            l->thread_running = false;
        }
        int rc = fd_gone(l->fd, false) ? -ENODEV : fp_io_start_link(fp, l);
        if (rc == 0) {
            atomic_fetch_add(&l->thr.restarts, 1);
            n++;
        } else if (!first) {
            first = rc;
        }
    }
    pthread_mutex_unlock(&fp->api_lock);
    return first ? first : n;
}

int fp_test_thread_fail(fp_t *fp, uint32_t kind, uint32_t link_id, int err)
{
    if (err < 1 || err > 4095 || (kind != FP_THREAD_TUN && kind != FP_THREAD_LINK))
        return -EINVAL;
    int rc = -ENOENT;
    uint64_t one = 1;
    pthread_mutex_lock(&fp->api_lock);
    if (kind == FP_THREAD_TUN) {
        if (fp->tun_thread_running && atomic_load(&fp->tun_thr.state) == FP_THREAD_RUNNING) {
            atomic_store(&fp->tun_thr.inject, err);
            rc = write(fp->tun_wake_fd, &one, sizeof(one)) == sizeof(one) ? 0 : -errno;
        }
    } else {
        struct fp_link *l = NULL;
        for (int i = 0; i < fp->nlinks; i++)
            if (fp->links[i]->id == link_id)
                l = fp->links[i];
        if (l && l->thread_running && atomic_load(&l->thr.state) == FP_THREAD_RUNNING) {
            atomic_store(&l->thr.inject, err);
            rc = write(l->wake_fd, &one, sizeof(one)) == sizeof(one) ? 0 : -errno;
        }
    }
    pthread_mutex_unlock(&fp->api_lock);
    return rc;
}

int fp_test_thread_start_fail(fp_t *fp, uint32_t kind, uint32_t link_id, int err)
{
    if (err < 1 || err > 4095 || (kind != FP_THREAD_TUN && kind != FP_THREAD_LINK))
        return -EINVAL;
    int rc = -ENOENT;
    pthread_mutex_lock(&fp->api_lock);
    if (kind == FP_THREAD_TUN) {
        if (atomic_load(&fp->tun_fd) >= 0) {
            atomic_store(&fp->tun_thr.start_err, err);
            rc = 0;
        }
    } else {
        for (int i = 0; i < fp->nlinks; i++) {
            if (fp->links[i]->id == link_id) {
                atomic_store(&fp->links[i]->thr.start_err, err);
                rc = 0;
            }
        }
    }
    pthread_mutex_unlock(&fp->api_lock);
    return rc;
}
