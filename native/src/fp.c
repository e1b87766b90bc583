/*
 * fp.c - lifecycle of a fast path instance: defaults, creation, teardown.
 */
#include "fp_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

void fp_config_default(struct fp_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    /* WireGuard's limits: rekey long before the nonce space is at risk. */
    cfg->rekey_after_packets = UINT64_C(1) << 60;
    cfg->reject_after_packets = FP_REJECT_PACKETS_MAX;
    cfg->rekey_after_seconds = 600;
    cfg->reject_after_seconds = 900;
    cfg->ctrl_queue_len = 1024;
    cfg->ctrl_unknown_queue_len = 256;
    cfg->ctrl_source_pps = 20;
    cfg->ctrl_source_burst = 40;
    cfg->ctrl_unknown_pps = 1000;
    cfg->ctrl_unknown_burst = 2000;
    cfg->ctrl_sources = 4096;
    cfg->batch = 32;
    cfg->relay = 0;
    cfg->check_source = 0;
    cfg->warm_ms = 5;
    cfg->warm_for_ms = 10000;
    cfg->spin_us = 200;
}

int fp_new(const struct fp_config *cfg, fp_t **out)
{
    struct fp_config c;
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (cfg)
        c = *cfg;
    else
        fp_config_default(&c);
    if (c.batch < 1 || c.batch > FP_BATCH_MAX || c.ctrl_queue_len < 1 ||
        c.ctrl_queue_len > 65536 || c.reject_after_packets > FP_REJECT_PACKETS_MAX ||
        c.warm_ms > 60000 || c.warm_for_ms > 3600000 || c.spin_us > 10000 ||
        c.ctrl_unknown_queue_len < 1 || c.ctrl_unknown_queue_len > 65536 ||
        c.ctrl_source_pps < 1 || c.ctrl_source_pps > 1000000 || c.ctrl_source_burst < 1 ||
        c.ctrl_source_burst > 1000000 || c.ctrl_unknown_pps < 1 ||
        c.ctrl_unknown_pps > 1000000 || c.ctrl_unknown_burst < 1 ||
        c.ctrl_unknown_burst > 1000000 || c.ctrl_sources < 1 || c.ctrl_sources > 1048576)
        return -EINVAL;
    c.relay = c.relay ? 1 : 0;

    struct fp *fp = calloc(1, sizeof(*fp));
    if (!fp)
        return -ENOMEM;
    fp->cfg = c;
    atomic_init(&fp->tun_fd, -1);
    fp->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fp->stop_fd < 0) {
        int e = errno;
        free(fp);
        return -e;
    }
    fp->live_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fp->live_wake_fd < 0) {
        int e = errno;
        close(fp->stop_fd);
        free(fp);
        return -e;
    }
    fp->tun_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fp->tun_wake_fd < 0) {
        int e = errno;
        close(fp->live_wake_fd);
        close(fp->stop_fd);
        free(fp);
        return -e;
    }
    int rc = fp_ctrlq_init(&fp->cq, c.ctrl_queue_len, c.ctrl_unknown_queue_len);
    if (rc == 0 && (rc = fp_ctrlgate_init(&fp->gate, &c)) < 0)
        fp_ctrlq_free(&fp->cq);
    if (rc == 0 && (rc = fp_tables_init(fp)) < 0) {
        fp_ctrlgate_free(&fp->gate);
        fp_ctrlq_free(&fp->cq);
    }
    if (rc < 0) {
        close(fp->tun_wake_fd);
        close(fp->live_wake_fd);
        close(fp->stop_fd);
        free(fp);
        return rc;
    }
    pthread_mutex_init(&fp->api_lock, NULL);
    pthread_mutex_init(&fp->tun_rd_lock, NULL);
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&fp->lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    *out = fp;
    return 0;
}

void fp_free(fp_t *fp)
{
    if (!fp)
        return;
    fp_stop(fp);
    int tun = atomic_load(&fp->tun_fd);
    if (tun >= 0)
        close(tun);
    for (int i = 0; i < fp->nlinks; i++)
        fp_link_destroy(fp->links[i]);
    fp_tables_free(fp);
    fp_ctrlgate_free(&fp->gate);
    fp_ctrlq_free(&fp->cq);
    close(fp->tun_wake_fd);
    close(fp->live_wake_fd);
    close(fp->stop_fd);
    pthread_rwlock_destroy(&fp->lock);
    pthread_mutex_destroy(&fp->api_lock);
    pthread_mutex_destroy(&fp->tun_rd_lock);
    free(fp);
}
