/* A thread of its own for fp_keepalive_pass: a PoP's keepalives (every 200 ms) go out
 * however busy the process's Python threads are, with no need of the GIL at all
 * (docs/popd.md, "Sessions": liveness). */
#define _POSIX_C_SOURCE 200809L
#include "fastpath.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>

struct fp_ka_thread {
    fp_t *fp;
    uint32_t every_ms;
    atomic_bool stop;
    _Atomic uint64_t passes;
    pthread_t thread;
};

static void *ka_main(void *arg)
{
    struct fp_ka_thread *t = arg;
    struct timespec ts = {.tv_sec = t->every_ms / 1000,
                          .tv_nsec = (long)(t->every_ms % 1000) * 1000000L};
    while (!atomic_load_explicit(&t->stop, memory_order_acquire)) {
        nanosleep(&ts, NULL);
        if (atomic_load_explicit(&t->stop, memory_order_acquire))
            break;
        (void)fp_keepalive_pass(t->fp);
        atomic_fetch_add_explicit(&t->passes, 1, memory_order_relaxed);
    }
    return NULL;
}

fp_ka_thread_t *fp_keepalive_thread_start(fp_t *fp, uint32_t every_ms)
{
    if (!fp || every_ms < 1 || every_ms > 60000)
        return NULL;
    struct fp_ka_thread *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->fp = fp;
    t->every_ms = every_ms;
    atomic_init(&t->stop, false);
    atomic_init(&t->passes, 0);
    if (pthread_create(&t->thread, NULL, ka_main, t) != 0) {
        free(t);
        return NULL;
    }
    return t;
}

uint64_t fp_keepalive_thread_passes(fp_ka_thread_t *t)
{
    return t ? atomic_load_explicit(&t->passes, memory_order_relaxed) : 0;
}

void fp_keepalive_thread_stop(fp_ka_thread_t *t)
{
    if (!t)
        return;
    atomic_store_explicit(&t->stop, true, memory_order_release);
    pthread_join(t->thread, NULL);
    free(t);
}
