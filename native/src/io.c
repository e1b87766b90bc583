/*
 * io.c - the devices and the threads that move packets between them.
 *
 * One thread drains the TUN (up to `batch` packets per wakeup), seals them in
 * place (TUN packets are read after FP_HEADER_LEN bytes of headroom) and sends
 * each run of packets for the same link with one sendmmsg. One thread per
 * link does recvmmsg(batch) -> fp_inbound_locked -> write to the TUN, or
 * sendmmsg for relayed packets. fp->lock is taken shared once per batch.
 * Threads sleep in poll() on their fd plus an eventfd, so stop and link_del
 * wake them at once.
 */
#include "fp_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* ------------------------------------------------------------------ send batches */

struct txq {
    unsigned n;
    struct mmsghdr *m;
    struct iovec *iov;
    struct sockaddr_storage *sa;
    struct fp_link **link;
};

static int txq_init(struct txq *q, unsigned cap)
{
    q->n = 0;
    q->m = calloc(cap, sizeof(*q->m));
    q->iov = calloc(cap, sizeof(*q->iov));
    q->sa = calloc(cap, sizeof(*q->sa));
    q->link = calloc(cap, sizeof(*q->link));
    return q->m && q->iov && q->sa && q->link ? 0 : -ENOMEM;
}

static void txq_free(struct txq *q)
{
    free(q->m);
    free(q->iov);
    free(q->sa);
    free(q->link);
}

static void txq_add(struct fp *fp, struct txq *q, const struct fp_result *res, uint8_t *buf)
{
    struct fp_link *l = fp_link_find(fp, res->link_id);
    socklen_t sl;
    if (!l) {
        fp_ctr_add(&fp->gctr.drops[FP_DROP_SEND_ERROR], 1);
        return;
    }
    if (fp_addr_to_sockaddr(&res->to, l->family, &q->sa[q->n], &sl) < 0) {
        fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
        return;
    }
    unsigned i = q->n++;
    q->iov[i].iov_base = buf;
    q->iov[i].iov_len = res->out_len;
    memset(&q->m[i], 0, sizeof(q->m[i]));
    q->m[i].msg_hdr.msg_name = &q->sa[i];
    q->m[i].msg_hdr.msg_namelen = sl;
    q->m[i].msg_hdr.msg_iov = &q->iov[i];
    q->m[i].msg_hdr.msg_iovlen = 1;
    q->link[i] = l;
}

/* The fd may be non-blocking (Python's asyncio shares its file description):
 * wait briefly for room instead of dropping, so TCP sees backpressure. */
static bool wait_writable(struct fp *fp, int fd)
{
    struct pollfd p[2] = {{fd, POLLOUT, 0}, {fp->stop_fd, POLLIN, 0}};
    int r = poll(p, 2, 10);
    return r > 0 && (p[0].revents & POLLOUT) && !(p[1].revents & POLLIN);
}

static void send_run(struct fp *fp, struct fp_link *l, struct mmsghdr *m, unsigned n)
{
    unsigned done = 0;
    int waits = 0;
    while (done < n) {
        int r = sendmmsg(l->fd, m + done, n - done, MSG_DONTWAIT);
        if (r > 0) {
            uint64_t bytes = 0;
            for (unsigned i = done; i < done + (unsigned)r; i++)
                bytes += m[i].msg_len;
            fp_ctr_add(&l->ctr.tx_packets, (uint64_t)r);
            fp_ctr_add(&l->ctr.tx_bytes, bytes);
            done += (unsigned)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == ENOBUFS)) {
            if (waits++ < 100 && wait_writable(fp, l->fd))
                continue;
            fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], n - done);
            return;
        }
        /* A per-destination error (unreachable, EPERM from a firewall):
         * drop that one datagram, keep the rest. */
        fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
        done++;
    }
}

static void txq_flush(struct fp *fp, struct txq *q)
{
    unsigned i = 0;
    while (i < q->n) {
        unsigned j = i + 1;
        while (j < q->n && q->link[j] == q->link[i])
            j++;
        send_run(fp, q->link[i], q->m + i, j - i);
        i = j;
    }
    q->n = 0;
}

static void tun_deliver(struct fp *fp, const uint8_t *buf, size_t len)
{
    int fd = atomic_load_explicit(&fp->tun_fd, memory_order_acquire);
    if (fd < 0 || write(fd, buf, len) != (ssize_t)len) {
        fp_ctr_add(&fp->gctr.drops[FP_DROP_SEND_ERROR], 1);
        return;
    }
    fp_ctr_add(&fp->gctr.tx_packets, 1);
    fp_ctr_add(&fp->gctr.tx_bytes, len);
}

/* ------------------------------------------------------------------ threads */

static void *link_thread(void *arg)
{
    struct fp_link *l = arg;
    struct fp *fp = l->fp;
    unsigned n = fp->cfg.batch;
    uint8_t *rx = malloc((size_t)n * FP_BUF_LEN);
    uint8_t *out = malloc((size_t)n * FP_BUF_LEN);
    struct mmsghdr *m = calloc(n, sizeof(*m));
    struct iovec *iov = calloc(n, sizeof(*iov));
    struct sockaddr_storage *src = calloc(n, sizeof(*src));
    struct txq q;
    if (txq_init(&q, n) < 0 || !rx || !out || !m || !iov || !src)
        goto done;
    for (unsigned i = 0; i < n; i++) {
        iov[i].iov_base = rx + (size_t)i * FP_BUF_LEN;
        iov[i].iov_len = FP_BUF_LEN;
        m[i].msg_hdr.msg_iov = &iov[i];
        m[i].msg_hdr.msg_iovlen = 1;
        m[i].msg_hdr.msg_name = &src[i];
    }
    for (;;) {
        struct pollfd p[3] = {{l->fd, POLLIN, 0}, {l->wake_fd, POLLIN, 0},
                              {fp->stop_fd, POLLIN, 0}};
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[1].revents || p[2].revents)
            break;
        for (unsigned i = 0; i < n; i++) {
            m[i].msg_hdr.msg_namelen = sizeof(src[i]);
            m[i].msg_hdr.msg_flags = 0;
        }
        int r = recvmmsg(l->fd, m, n, MSG_DONTWAIT, NULL);
        if (r <= 0)
            continue;
        uint64_t now = fp_now_ns();
        pthread_rwlock_rdlock(&fp->lock);
        for (int i = 0; i < r; i++) {
            uint8_t *pkt = rx + (size_t)i * FP_BUF_LEN;
            uint8_t *o = out + (size_t)i * FP_BUF_LEN;
            struct fp_addr from;
            struct fp_result res;
            fp_addr_from_sockaddr(&src[i], &from);
            if (m[i].msg_hdr.msg_flags & MSG_TRUNC) {
                fp_ctr_add(&l->ctr.rx_packets, 1);
                fp_ctr_add(&l->ctr.rx_bytes, m[i].msg_len);
                fp_ctr_add(&l->ctr.drops[FP_DROP_MALFORMED], 1);
                continue;
            }
            if (fp_inbound_locked(fp, l, l->id, from.family ? &from : NULL, pkt, m[i].msg_len, o,
                                  FP_BUF_LEN, &res, now) < 0)
                continue;
            if (res.verdict == FP_V_TUN)
                tun_deliver(fp, o, res.out_len);
            else if (res.verdict == FP_V_SEND)
                txq_add(fp, &q, &res, o);
        }
        txq_flush(fp, &q);
        pthread_rwlock_unlock(&fp->lock);
    }
done:
    txq_free(&q);
    free(rx);
    free(out);
    free(m);
    free(iov);
    free(src);
    return NULL;
}

static void *tun_thread(void *arg)
{
    struct fp *fp = arg;
    unsigned n = fp->cfg.batch;
    int fd = atomic_load(&fp->tun_fd);
    uint8_t *buf = malloc((size_t)n * FP_BUF_LEN);
    size_t *lens = calloc(n, sizeof(*lens));
    struct txq q;
    if (txq_init(&q, n) < 0 || !buf || !lens)
        goto done;
    for (;;) {
        struct pollfd p[2] = {{fd, POLLIN, 0}, {fp->stop_fd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[1].revents)
            break;
        unsigned cnt = 0;
        while (cnt < n) {
            /* One byte more than the largest packet, so oversize shows. */
            ssize_t r = read(fd, buf + (size_t)cnt * FP_BUF_LEN + FP_HEADER_LEN, FP_MAX_INNER + 1);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            lens[cnt++] = (size_t)r;
        }
        if (cnt == 0) {
            /* The device went away (or the socketpair's other end closed). */
            if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL))
                break;
            continue;
        }
        uint64_t now = fp_now_ns();
        pthread_rwlock_rdlock(&fp->lock);
        for (unsigned i = 0; i < cnt; i++) {
            uint8_t *b = buf + (size_t)i * FP_BUF_LEN;
            struct fp_result res;
            if (fp_outbound_locked(fp, b + FP_HEADER_LEN, lens[i], b, FP_BUF_LEN, &res, now) == 0 &&
                res.verdict == FP_V_SEND)
                txq_add(fp, &q, &res, b);
        }
        txq_flush(fp, &q);
        pthread_rwlock_unlock(&fp->lock);
    }
done:
    txq_free(&q);
    free(buf);
    free(lens);
    return NULL;
}

int fp_io_start_link(struct fp *fp, struct fp_link *l)
{
    l->fp = fp;
    int rc = pthread_create(&l->thread, NULL, link_thread, l);
    if (rc)
        return -rc;
    l->thread_running = true;
    return 0;
}

int fp_io_start_tun(struct fp *fp)
{
    int rc = pthread_create(&fp->tun_thread, NULL, tun_thread, fp);
    if (rc)
        return -rc;
    fp->tun_thread_running = true;
    return 0;
}

/* Caller holds api_lock and not fp->lock (threads may be waiting for it). */
void fp_io_stop_all(struct fp *fp)
{
    uint64_t v = 1;
    if (write(fp->stop_fd, &v, sizeof(v)) < 0)
        return;
    if (fp->tun_thread_running) {
        pthread_join(fp->tun_thread, NULL);
        fp->tun_thread_running = false;
    }
    for (int i = 0; i < fp->nlinks; i++) {
        struct fp_link *l = fp->links[i];
        if (l->thread_running) {
            pthread_join(l->thread, NULL);
            l->thread_running = false;
        }
    }
    if (read(fp->stop_fd, &v, sizeof(v)) < 0)
        return;
}

void fp_link_destroy(struct fp_link *l)
{
    close(l->fd);
    close(l->wake_fd);
    free(l);
}

/* ------------------------------------------------------------------ public calls */

int fp_start(fp_t *fp)
{
    int rc = 0;
    pthread_mutex_lock(&fp->api_lock);
    if (fp->running) {
        rc = -EALREADY;
        goto out;
    }
    fp->running = true;
    if (atomic_load(&fp->tun_fd) >= 0)
        rc = fp_io_start_tun(fp);
    for (int i = 0; rc == 0 && i < fp->nlinks; i++)
        rc = fp_io_start_link(fp, fp->links[i]);
    if (rc) {
        fp_io_stop_all(fp);
        fp->running = false;
    }
out:
    pthread_mutex_unlock(&fp->api_lock);
    return rc;
}

int fp_stop(fp_t *fp)
{
    pthread_mutex_lock(&fp->api_lock);
    if (fp->running) {
        fp_io_stop_all(fp);
        fp->running = false;
    }
    pthread_mutex_unlock(&fp->api_lock);
    return 0;
}

static int tun_set(struct fp *fp, int fd)
{
    int rc = 0;
    pthread_mutex_lock(&fp->api_lock);
    if (atomic_load(&fp->tun_fd) >= 0) {
        rc = -EEXIST;
    } else {
        atomic_store_explicit(&fp->tun_fd, fd, memory_order_release);
        if (fp->running && (rc = fp_io_start_tun(fp)) < 0)
            atomic_store(&fp->tun_fd, -1);
    }
    pthread_mutex_unlock(&fp->api_lock);
    if (rc < 0)
        close(fd);
    return rc;
}

int fp_tun_open(fp_t *fp, const char *name)
{
    if (!name || !*name || strlen(name) >= IFNAMSIZ)
        return -EINVAL;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    memcpy(ifr.ifr_name, name, strlen(name));
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return tun_set(fp, fd);
}

int fp_tun_attach(fp_t *fp, int fd)
{
    int mine = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (mine < 0)
        return -errno;
    /* The TUN thread drains until EAGAIN; this flag is on the shared file
     * description, which is why the header says the fd is the fast path's. */
    int fl = fcntl(mine, F_GETFL);
    if (fl < 0 || fcntl(mine, F_SETFL, fl | O_NONBLOCK) < 0) {
        int e = errno;
        close(mine);
        return -e;
    }
    return tun_set(fp, mine);
}

int fp_link_add(fp_t *fp, uint32_t link_id, int udp_fd)
{
    int type = 0;
    socklen_t tl = sizeof(type);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockopt(udp_fd, SOL_SOCKET, SO_TYPE, &type, &tl) < 0 ||
        getsockname(udp_fd, (struct sockaddr *)&ss, &sl) < 0)
        return -errno;
    if (type != SOCK_DGRAM)
        return -EINVAL;
    if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)
        return -EAFNOSUPPORT;
    struct fp_link *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->fp = fp;
    l->id = link_id;
    l->family = ss.ss_family;
    l->fd = fcntl(udp_fd, F_DUPFD_CLOEXEC, 0);
    l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->fd < 0 || l->wake_fd < 0) {
        int e = errno;
        if (l->fd >= 0)
            close(l->fd);
        if (l->wake_fd >= 0)
            close(l->wake_fd);
        free(l);
        return -e;
    }
    int rc = 0;
    pthread_mutex_lock(&fp->api_lock);
    pthread_rwlock_wrlock(&fp->lock);
    if (fp_link_find(fp, link_id))
        rc = -EEXIST;
    else if (fp->nlinks == FP_MAX_LINKS)
        rc = -ENOSPC;
    else
        fp->links[fp->nlinks++] = l;
    pthread_rwlock_unlock(&fp->lock);
    if (rc == 0 && fp->running && (rc = fp_io_start_link(fp, l)) < 0) {
        pthread_rwlock_wrlock(&fp->lock);
        fp->nlinks--;
        pthread_rwlock_unlock(&fp->lock);
    }
    pthread_mutex_unlock(&fp->api_lock);
    if (rc < 0)
        fp_link_destroy(l);
    return rc;
}

int fp_link_del(fp_t *fp, uint32_t link_id)
{
    struct fp_link *l = NULL;
    pthread_mutex_lock(&fp->api_lock);
    pthread_rwlock_wrlock(&fp->lock);
    for (int i = 0; i < fp->nlinks; i++) {
        if (fp->links[i]->id == link_id) {
            l = fp->links[i];
            fp->links[i] = fp->links[--fp->nlinks];
            break;
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    /* Out of the table, so no other thread can reach it; now stop its own. */
    if (l && l->thread_running) {
        uint64_t one = 1;
        if (write(l->wake_fd, &one, sizeof(one)) == sizeof(one))
            pthread_join(l->thread, NULL);
        l->thread_running = false;
    }
    pthread_mutex_unlock(&fp->api_lock);
    if (!l)
        return -ENOENT;
    fp_link_destroy(l);
    return 0;
}

int fp_ctrl_send(fp_t *fp, uint32_t link_id, const struct fp_addr *to,
                 const uint8_t *buf, size_t len)
{
    /* A control packet that looked like data would be misread by the peer. */
    if (!fp_addr_valid(to) || !buf || len == 0 || len > 65507 || buf[0] == FP_TYPE_DATA)
        return -EINVAL;
    struct sockaddr_storage ss;
    socklen_t sl;
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_link *l = fp_link_find(fp, link_id);
    if (!l) {
        rc = -ENODEV;
    } else if (fp_addr_to_sockaddr(to, l->family, &ss, &sl) < 0) {
        rc = -EAFNOSUPPORT;
    } else {
        ssize_t r = sendto(l->fd, buf, len, MSG_DONTWAIT, (struct sockaddr *)&ss, sl);
        if (r < 0) {
            rc = -errno;
            fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
        } else {
            rc = (int)r;
            fp_ctr_add(&l->ctr.tx_packets, 1);
            fp_ctr_add(&l->ctr.tx_bytes, (uint64_t)r);
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_send_keepalive(fp_t *fp, uint32_t peer_id)
{
    uint8_t pkt[FP_OVERHEAD];
    struct fp_result res;
    struct sockaddr_storage ss;
    socklen_t sl;
    int rc;
    memset(&res, 0, sizeof(res));
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find(fp, peer_id);
    if (!p) {
        rc = -ENOENT;
        goto out;
    }
    rc = fp_seal_for_peer(fp, p, pkt + FP_HEADER_LEN, 0, pkt, sizeof(pkt), &res, fp_now_ns());
    if (rc < 0)
        goto out;
    if (res.verdict == FP_V_DROP) {
        static const int err[FP_DROP__COUNT] = {
            [FP_DROP_NO_KEY] = -ENOKEY, [FP_DROP_NO_ENDPOINT] = -ENOTCONN,
            [FP_DROP_KEY_EXPIRED] = -EKEYEXPIRED};
        rc = err[res.drop_reason] ? err[res.drop_reason] : -EIO;
        goto out;
    }
    struct fp_link *l = fp_link_find(fp, res.link_id);
    if (!l) {
        rc = -ENODEV;
        fp_ctr_add(&fp->gctr.drops[FP_DROP_SEND_ERROR], 1);
    } else if (fp_addr_to_sockaddr(&res.to, l->family, &ss, &sl) < 0) {
        rc = -EAFNOSUPPORT;
        fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
    } else if (sendto(l->fd, pkt, res.out_len, MSG_DONTWAIT, (struct sockaddr *)&ss, sl) < 0) {
        rc = -errno;
        fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
    } else {
        fp_ctr_add(&l->ctr.tx_packets, 1);
        fp_ctr_add(&l->ctr.tx_bytes, res.out_len);
    }
out:
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}
