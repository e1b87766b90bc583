/*
 * io.c - the devices and the threads that move packets between them.
 *
 * One thread drains the TUN (up to `batch` reads per wakeup). With a vnet
 * header (fp_tun_open) a read may be a TSO/USO superpacket, which is cut into
 * segments (offload.c) laid out so that each is sealed in place and the sealed
 * datagrams lie back to back; runs of equal-sized datagrams for one endpoint
 * leave as one UDP GSO send (UDP_SEGMENT), and every run of sends for one link
 * goes in one sendmmsg. One thread per link does recvmmsg (UDP_GRO: a buffer
 * may hold many datagrams), splits, fp_inbound_locked, and writes to the TUN,
 * TCP/UDP runs of one flow coalesced into one superpacket per writev, or
 * sendmmsg for relayed packets; after writing to the TUN a link thread also
 * sends what the kernel answered during that write (tun_drain_try), so a
 * reply does not wait for the TUN thread to wake; and after sending a lone
 * packet the TUN thread polls that link briefly for the answer (tun_spin,
 * fp_config.spin_us, "answer wait" in socketd), receiving it with the link's
 * own buffers (struct fp_link_rx). fp->lock is taken shared
 * once per batch. Nothing waits for a batch to fill: a batch is what is
 * already there.
 * Threads sleep in poll() on their fd plus an eventfd, so stop and link_del
 * wake them at once. A thread that leaves its loop on an error says why
 * (threads.c) and can be started again.
 */
#include "fp_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ send batches */

/* One UDP GSO send stays under the largest UDP payload, and under the
 * kernel's segment limit. */
#define GSO_BYTES_MAX 65000
/* Per-thread scratch: sealed packets (TUN thread) or plaintexts (link
 * threads) of one batch; a batch is sent out before the arena runs low. */
#define ARENA_LEN (256u << 10)
#define ARENA_LOW (96u << 10)
#define TXQ_CAP 512
/* Receive buffers of 64 KiB with UDP_GRO: four fill the arena once, and
 * every page of them counts in the RSS after the first bulk transfer. */
#define GRO_RX_MSGS 4
/* How long a thread may wait for room on full link socket buffers in all
 * while it holds fp->lock (shared): Python's calls that change the tables
 * take it exclusively, and control sends queue behind such a call, so a
 * congested uplink must not hold them up for longer than this. What still
 * finds no room is dropped and counted as congested (TCP sees the loss). */
#define TX_WAIT_BUDGET_NS (5u * 1000000u)

union cmsg_u16 {
    char buf[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
};

/* Datagrams to send, in order. Consecutive packets for the same link and
 * endpoint that lie back to back in memory and have the same size (the last
 * may be shorter) share one entry, sent with UDP_SEGMENT. */
struct txq {
    unsigned n;
    unsigned cap;
    struct mmsghdr *m;
    struct iovec *iov;
    struct sockaddr_storage *sa;
    struct fp_addr *to;
    struct fp_link **link;
    uint16_t *seg;                      /* size of each datagram but the last */
    uint16_t *nseg;                     /* datagrams in the entry */
    bool *closed;                       /* a shorter one came: no more may follow */
    union cmsg_u16 *cm;
    uint64_t wait_until_ns;             /* end of this lock hold's wait budget; 0: unused */
};

/* A new hold of fp->lock: its sends get the whole wait budget again. */
static void txq_new_hold(struct txq *q)
{
    q->wait_until_ns = 0;
}

/* Count n datagrams a send refused: a full buffer is congestion, anything
 * else an error of the send. */
static void count_unsent(struct fp_link *l, int err, uint64_t n)
{
    bool full = err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS;
    fp_ctr_add(&l->ctr.drops[full ? FP_DROP_CONGESTED : FP_DROP_SEND_ERROR], n);
}

static int txq_init(struct txq *q, unsigned cap)
{
    q->n = 0;
    q->cap = cap;
    q->wait_until_ns = 0;
    q->m = calloc(cap, sizeof(*q->m));
    q->iov = calloc(cap, sizeof(*q->iov));
    q->sa = calloc(cap, sizeof(*q->sa));
    q->to = calloc(cap, sizeof(*q->to));
    q->link = calloc(cap, sizeof(*q->link));
    q->seg = calloc(cap, sizeof(*q->seg));
    q->nseg = calloc(cap, sizeof(*q->nseg));
    q->closed = calloc(cap, sizeof(*q->closed));
    q->cm = calloc(cap, sizeof(*q->cm));
    return q->m && q->iov && q->sa && q->to && q->link && q->seg && q->nseg && q->closed && q->cm
               ? 0
               : -ENOMEM;
}

static void txq_free(struct txq *q)
{
    free(q->m);
    free(q->iov);
    free(q->sa);
    free(q->to);
    free(q->link);
    free(q->seg);
    free(q->nseg);
    free(q->closed);
    free(q->cm);
}

static bool txq_full(const struct txq *q)
{
    return q->n == q->cap;
}

static void txq_flush(struct fp *fp, struct txq *q);

static void txq_add(struct fp *fp, struct txq *q, const struct fp_result *res, uint8_t *buf)
{
    struct fp_link *l = fp_link_find(fp, res->link_id);
    socklen_t sl;
    if (!l) {
        fp_ctr_add(&fp->gctr.drops[FP_DROP_SEND_ERROR], 1);
        return;
    }
    if (q->n) {
        unsigned t = q->n - 1;
        struct iovec *v = &q->iov[t];
        if (q->link[t] == l && !q->closed[t] && (uint8_t *)v->iov_base + v->iov_len == buf &&
            res->out_len <= q->seg[t] && q->nseg[t] < FP_GSO_SEGS_MAX &&
            v->iov_len + res->out_len <= GSO_BYTES_MAX &&
            !atomic_load_explicit(&l->no_gso, memory_order_relaxed) &&
            fp_addr_equal(&q->to[t], &res->to)) {
            v->iov_len += res->out_len;
            q->nseg[t]++;
            q->closed[t] = res->out_len < q->seg[t];
            return;
        }
    }
    if (txq_full(q))
        txq_flush(fp, q);
    if (fp_addr_to_sockaddr(&res->to, l->family, &q->sa[q->n], &sl) < 0) {
        fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
        return;
    }
    unsigned i = q->n++;
    q->iov[i].iov_base = buf;
    q->iov[i].iov_len = res->out_len;
    q->to[i] = res->to;
    q->seg[i] = (uint16_t)(res->out_len > 0xffff ? 0xffff : res->out_len);
    q->nseg[i] = 1;
    q->closed[i] = false;
    memset(&q->m[i], 0, sizeof(q->m[i]));
    q->m[i].msg_hdr.msg_name = &q->sa[i];
    q->m[i].msg_hdr.msg_namelen = sl;
    q->m[i].msg_hdr.msg_iov = &q->iov[i];
    q->m[i].msg_hdr.msg_iovlen = 1;
    q->link[i] = l;
}

/* What a wait for room on a full link socket came to. */
enum tx_wait {
    TX_ROOM,    /* try the send again */
    TX_NO_ROOM, /* the hold's wait budget is spent: the link is congested */
    TX_STOPPED, /* the fast path is stopping: give up, it is not congestion */
};

/* First pause after ENOBUFS, doubled per try up to the maximum. */
#define TX_BACKOFF_MIN_NS 100000u
#define TX_BACKOFF_MAX_NS 1000000u

/* The fd may be non-blocking (Python's asyncio shares its file description):
 * wait briefly for room instead of dropping at once, so a burst that fills the
 * buffer for a moment is not lost, but never past the hold's wait budget
 * (TX_WAIT_BUDGET_NS): the caller holds fp->lock. err is what the send said:
 * on EAGAIN the socket buffer is full and POLLOUT says when it has room; on
 * ENOBUFS the device's queue is full, which POLLOUT does not see (the socket
 * reports writable at once), so a pause that grows with each try
 * (*backoff_ns, 0 at the first) takes its place instead of a busy loop of
 * sends and polls. A stop request ends any wait. */
static enum tx_wait wait_writable(struct fp *fp, struct txq *q, int fd, int err,
                                  uint64_t *backoff_ns)
{
    uint64_t now = fp_now_ns();
    if (q->wait_until_ns == 0)
        q->wait_until_ns = now + TX_WAIT_BUDGET_NS;
    if (now >= q->wait_until_ns)
        return TX_NO_ROOM;
    uint64_t left = q->wait_until_ns - now;
    struct pollfd p[2] = {{fp->stop_fd, POLLIN, 0}, {fd, POLLOUT, 0}};
    nfds_t np = 2;
    if (err == ENOBUFS) {
        *backoff_ns = *backoff_ns ? *backoff_ns * 2 : TX_BACKOFF_MIN_NS;
        if (*backoff_ns > TX_BACKOFF_MAX_NS)
            *backoff_ns = TX_BACKOFF_MAX_NS;
        if (left > *backoff_ns)
            left = *backoff_ns;
        np = 1; /* only a stop ends the pause */
    }
    struct timespec ts = {(time_t)(left / 1000000000u), (long)(left % 1000000000u)};
    int r = ppoll(p, np, &ts, NULL);
    if (r < 0 && errno != EINTR)
        return TX_NO_ROOM;
    if (r > 0 && (p[0].revents & POLLIN))
        return TX_STOPPED;
    if (np == 1)
        return TX_ROOM; /* paused: try again (the budget ends the tries) */
    return r > 0 && (p[1].revents & POLLOUT) ? TX_ROOM : TX_NO_ROOM;
}

/* An entry the kernel refused to segment: its datagrams one by one. */
static void send_split(struct fp_link *l, struct txq *q, unsigned i)
{
    uint8_t *b = q->iov[i].iov_base;
    size_t left = q->iov[i].iov_len;
    while (left) {
        size_t len = left < q->seg[i] ? left : q->seg[i];
        if (sendto(l->fd, b, len, MSG_DONTWAIT, (struct sockaddr *)&q->sa[i],
                   q->m[i].msg_hdr.msg_namelen) < 0) {
            count_unsent(l, errno, 1);
        } else {
            fp_ctr_add(&l->ctr.tx_packets, 1);
            fp_ctr_add(&l->ctr.tx_bytes, len);
        }
        b += len;
        left -= len;
    }
}

static void send_run(struct fp *fp, struct fp_link *l, struct txq *q, unsigned from, unsigned n)
{
    struct mmsghdr *m = q->m + from;
    unsigned done = 0;
    uint64_t backoff_ns = 0; /* the pause after ENOBUFS, grown per try */
    for (unsigned i = from; i < from + n; i++) {
        struct msghdr *h = &q->m[i].msg_hdr;
        if (q->nseg[i] > 1) {
            struct cmsghdr *c = &q->cm[i].align;
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            memcpy(CMSG_DATA(c), &q->seg[i], sizeof(uint16_t));
            h->msg_control = q->cm[i].buf;
            h->msg_controllen = sizeof(q->cm[i].buf);
        } else {
            h->msg_control = NULL;
            h->msg_controllen = 0;
        }
    }
    while (done < n) {
        int r = sendmmsg(l->fd, m + done, n - done, MSG_DONTWAIT);
        if (r > 0) {
            uint64_t bytes = 0, pkts = 0;
            for (unsigned i = done; i < done + (unsigned)r; i++) {
                bytes += m[i].msg_len;
                pkts += q->nseg[from + i];
            }
            fp_ctr_add(&l->ctr.tx_packets, pkts);
            fp_ctr_add(&l->ctr.tx_bytes, bytes);
            done += (unsigned)r;
            backoff_ns = 0; /* the queue moved */
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) {
            int err = errno;
            enum tx_wait w = wait_writable(fp, q, l->fd, err, &backoff_ns);
            if (w == TX_ROOM)
                continue;
            /* A stop request is no congestion: what it leaves unsent counts as a
             * send error. */
            for (unsigned i = done; i < n; i++) {
                if (w == TX_STOPPED)
                    fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], q->nseg[from + i]);
                else
                    count_unsent(l, err, q->nseg[from + i]);
            }
            return;
        }
        unsigned i = from + done;
        if (q->nseg[i] > 1 && (errno == EIO || errno == EINVAL || errno == EMSGSIZE)) {
            /* EIO: the device cannot checksum, so the kernel cannot segment;
             * EINVAL/EMSGSIZE: this entry is larger than the path allows. */
            if (errno == EIO)
                atomic_store_explicit(&l->no_gso, true, memory_order_relaxed);
            send_split(l, q, i);
        } else {
            /* A per-destination error (unreachable, EPERM from a firewall):
             * drop that one entry, keep the rest. */
            fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], q->nseg[i]);
        }
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
        send_run(fp, q->link[i], q, i, j - i);
        i = j;
    }
    q->n = 0;
}

/* ------------------------------------------------------------------ TUN writes */

struct tunq {
    uint32_t n;
    struct fp_gro_pkt *pk;
    struct iovec iov[FP_GSO_SEGS_MAX + 2];
};

static void tun_count(struct fp *fp, bool ok, uint64_t pkts, uint64_t bytes)
{
    if (!ok) {
        fp_ctr_add(&fp->gctr.drops[FP_DROP_SEND_ERROR], pkts);
        return;
    }
    fp_ctr_add(&fp->gctr.tx_packets, pkts);
    fp_ctr_add(&fp->gctr.tx_bytes, bytes);
}

/* One packet the fast path made itself (an ICMP error) into the TUN. */
static void tun_write_one(struct fp *fp, const uint8_t *pkt, size_t len)
{
    int fd = atomic_load_explicit(&fp->tun_fd, memory_order_acquire);
    uint8_t vh[FP_VNET_LEN] = {0};
    struct iovec iov[2] = {{vh, FP_VNET_LEN}, {(void *)pkt, len}};
    bool vnet = fp->tun_features & FP_TUN_F_VNET;
    ssize_t want = (ssize_t)(len + (vnet ? FP_VNET_LEN : 0));
    tun_count(fp, fd >= 0 && writev(fd, vnet ? iov : iov + 1, vnet ? 2 : 1) == want, 1, len);
}

/* Write the queued plaintexts to the TUN: with a vnet header, consecutive
 * segments of one TCP flow go as one superpacket per writev. */
static void tunq_flush(struct fp *fp, struct tunq *t)
{
    int fd = atomic_load_explicit(&fp->tun_fd, memory_order_acquire);
    bool vnet = fp->tun_features & FP_TUN_F_VNET;
    if (t->n == 0)
        return;
    if (!vnet) {
        for (uint32_t i = 0; i < t->n; i++)
            tun_count(fp, fd >= 0 && write(fd, t->pk[i].p, t->pk[i].len) == (ssize_t)t->pk[i].len,
                      1, t->pk[i].len);
        t->n = 0;
        return;
    }
    /* Only what the device said it handles, though a write is not bound by it. */
    fp_gro_build(t->pk, t->n, fp->tun_features & FP_TUN_F_TSO, fp->tun_features & FP_TUN_F_USO);
    for (uint32_t i = 0; i < t->n; i++) {
        struct fp_gro_pkt *h = &t->pk[i];
        if (!h->head)
            continue;
        uint8_t vh[FP_VNET_LEN];
        fp_vnet_write(vh, &h->vnet);
        int c = 0;
        uint64_t pkts = 1, bytes = h->len;
        size_t total = FP_VNET_LEN + h->len;
        t->iov[c++] = (struct iovec){vh, FP_VNET_LEN};
        t->iov[c++] = (struct iovec){h->p, h->len};
        for (uint32_t j = h->next; j != UINT32_MAX; j = t->pk[j].next) {
            struct fp_gro_pkt *s = &t->pk[j];
            t->iov[c++] = (struct iovec){s->p + s->hlen, s->len - s->hlen};
            total += s->len - s->hlen;
            pkts++;
            bytes += s->len;
        }
        tun_count(fp, fd >= 0 && writev(fd, t->iov, c) == (ssize_t)total, pkts, bytes);
    }
    t->n = 0;
}

/* ------------------------------------------------------------------ fragments */

/* Arena room a packet of len bytes needs to be cut and sealed (FP_V_FRAGMENT). */
static size_t frag_room(size_t len)
{
    return 3 * len + 4096;
}

/* A packet without DF too big for its peer's path (FP_V_FRAGMENT): cut into
 * fragments that fit, each sealed for the peer where it lies at `at` (room
 * bytes, not overlapping pkt) and queued. Returns the arena bytes used; the
 * last link and peer sent to in *sent (if not NULL). Caller holds fp->lock
 * shared. */
static size_t frag_queue(struct fp *fp, struct txq *q, uint32_t peer_id, const uint8_t *pkt,
                         size_t len, uint8_t *at, size_t room, uint64_t now,
                         struct fp_result *sent)
{
    struct fp_peer *peer = fp_peer_find(fp, peer_id);
    uint32_t lens[FP_FRAGS_MAX];
    size_t stride = 0;
    uint32_t mtu = peer ? atomic_load_explicit(&peer->inner_mtu, memory_order_relaxed) : 0;
    int n = mtu ? fp_ip4_fragment(pkt, len, mtu, at, room, FP_HEADER_LEN, FP_TAG_LEN, lens,
                                  FP_FRAGS_MAX, &stride)
                : -EINVAL;
    if (n <= 0) {
        if (peer)
            fp_ctr_add(&peer->ctr.drops[FP_DROP_TOO_BIG], 1);
        return 0;
    }
    for (int i = 0; i < n; i++) {
        uint8_t *s = at + (size_t)i * stride;
        struct fp_result res;
        memset(&res, 0, sizeof(res));
        if (fp_seal_for_peer(fp, peer, s + FP_HEADER_LEN, lens[i], s, stride, &res, now) == 0 &&
            res.verdict == FP_V_SEND) {
            txq_add(fp, q, &res, s);
            if (sent)
                *sent = res;
        }
    }
    return (size_t)n * stride;
}

/* ------------------------------------------------------------------ link receives */

/* A link's receive buffers; whoever holds l->rx_lock uses them: its own
 * thread, or the TUN thread waiting for an answer (tun_spin). */
struct fp_link_rx {
    unsigned n;                         /* datagrams per recvmmsg */
    uint8_t *rx;
    uint8_t *arena;
    uint8_t *cm;
    struct mmsghdr *m;
    struct iovec *iov;
    struct sockaddr_storage *src;
    struct tunq t;
    struct txq q;
};

void fp_link_rx_free(struct fp_link_rx *x)
{
    if (!x)
        return;
    txq_free(&x->q);
    free(x->t.pk);
    free(x->rx);
    free(x->arena);
    free(x->cm);
    free(x->m);
    free(x->iov);
    free(x->src);
    free(x);
}

struct fp_link_rx *fp_link_rx_new(const struct fp *fp, bool gro)
{
    struct fp_link_rx *x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    /* With GRO a datagram may hold up to 64 KiB of coalesced ones. */
    unsigned n = gro ? (fp->cfg.batch < GRO_RX_MSGS ? fp->cfg.batch : GRO_RX_MSGS)
                     : fp->cfg.batch;
    size_t rxlen = gro ? 65536 : FP_BUF_LEN;
    x->n = n;
    x->rx = malloc((size_t)n * rxlen);
    x->arena = malloc(ARENA_LEN);
    x->cm = calloc(n, CMSG_SPACE(sizeof(int)));
    x->m = calloc(n, sizeof(*x->m));
    x->iov = calloc(n, sizeof(*x->iov));
    x->src = calloc(n, sizeof(*x->src));
    x->t.pk = calloc(FP_GRO_BATCH, sizeof(struct fp_gro_pkt));
    if (txq_init(&x->q, TXQ_CAP) < 0 || !x->rx || !x->arena || !x->cm || !x->m || !x->iov ||
        !x->src || !x->t.pk) {
        fp_link_rx_free(x);
        return NULL;
    }
    for (unsigned i = 0; i < n; i++) {
        x->iov[i].iov_base = x->rx + (size_t)i * rxlen;
        x->iov[i].iov_len = rxlen;
        x->m[i].msg_hdr.msg_iov = &x->iov[i];
        x->m[i].msg_hdr.msg_iovlen = 1;
        x->m[i].msg_hdr.msg_name = &x->src[i];
    }
    return x;
}

/* One recvmmsg on the link and everything it brought: opened, written to the
 * TUN or relayed. Caller holds fp->lock shared and l->rx_lock. Returns the
 * datagrams read (0: none waiting); *wrote says whether the TUN was written,
 * *relayed (may be NULL) whether a data packet was relayed (the PoP). */
static int link_rx_locked(struct fp *fp, struct fp_link *l, bool *wrote, bool *relayed)
{
    struct fp_link_rx *x = l->rx;
    const size_t cml = CMSG_SPACE(sizeof(int));
    for (unsigned i = 0; i < x->n; i++) {
        x->m[i].msg_hdr.msg_namelen = sizeof(x->src[i]);
        x->m[i].msg_hdr.msg_flags = 0;
        x->m[i].msg_hdr.msg_control = x->cm + (size_t)i * cml;
        x->m[i].msg_hdr.msg_controllen = cml;
    }
    int r = recvmmsg(l->fd, x->m, x->n, MSG_DONTWAIT, NULL);
    *wrote = false;
    if (r <= 0)
        return 0;
    txq_new_hold(&x->q);
    uint64_t now = fp_now_ns();
    size_t used = 0;
    struct tunq *t = &x->t;
    for (int i = 0; i < r; i++) {
        struct msghdr *h = &x->m[i].msg_hdr;
        uint8_t *pkt = x->iov[i].iov_base;
        size_t len = x->m[i].msg_len;
        struct fp_addr from;
        fp_addr_from_sockaddr(&x->src[i], &from);
        if (h->msg_flags & MSG_TRUNC) {
            fp_ctr_add(&l->ctr.rx_packets, 1);
            fp_ctr_add(&l->ctr.rx_bytes, len);
            fp_ctr_add(&l->ctr.drops[FP_DROP_MALFORMED], 1);
            continue;
        }
        size_t seg = len;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
                int g;
                memcpy(&g, CMSG_DATA(c), sizeof(g));
                if (g > 0)
                    seg = (size_t)g;
            }
        }
        for (size_t off = 0; off < len || (off == 0 && len == 0); off += seg) {
            size_t sl = len - off < seg ? len - off : seg;
            if (ARENA_LEN - used < FP_BUF_LEN + 64 || t->n == FP_GRO_BATCH) {
                *wrote |= t->n > 0;
                tunq_flush(fp, t);
                txq_flush(fp, &x->q);
                used = 0;
            }
            uint8_t *o = x->arena + used;
            struct fp_result res;
            if (fp_inbound_locked(fp, l, l->id, from.family ? &from : NULL, pkt + off, sl, o,
                                  ARENA_LEN - used, &res, now) == 0) {
                if (res.verdict == FP_V_TUN) {
                    t->pk[t->n].p = o;
                    t->pk[t->n++].len = res.out_len;
                    used += res.out_len;
                } else if (res.verdict == FP_V_SEND) {
                    txq_add(fp, &x->q, &res, o);
                    used += res.out_len;
                    /* Relayed data, not a probe's ack (an IP packet is at least 20 bytes,
                     * an ack 12): it keeps the thread's cipher warm like a TUN write. */
                    if (relayed && fp->cfg.relay && res.out_len >= FP_OVERHEAD + 20)
                        *relayed = true;
                } else if (res.verdict == FP_V_FRAGMENT) {
                    /* Relayed without DF, too big for the next hop (rare). */
                    if (ARENA_LEN - used < frag_room(res.out_len)) {
                        *wrote |= t->n > 0;
                        tunq_flush(fp, t);
                        txq_flush(fp, &x->q);
                        memmove(x->arena, o, res.out_len);
                        o = x->arena;
                        used = 0;
                    }
                    used += res.out_len;
                    used += frag_queue(fp, &x->q, res.peer_id, o, res.out_len, x->arena + used,
                                       ARENA_LEN - used, now, NULL);
                }
            }
            if (len == 0)
                break;
        }
    }
    *wrote |= t->n > 0;
    tunq_flush(fp, t);
    txq_flush(fp, &x->q);
    return r;
}

/* ------------------------------------------------------------------ threads */

static void tun_drain_try(struct fp *fp, unsigned max);

static void *link_thread(void *arg)
{
    struct fp_link *l = arg;
    struct fp *fp = l->fp;
    char name[16];
    snprintf(name, sizeof(name), "fp-link%u", l->id % 100000u);
    pthread_setname_np(pthread_self(), name);
    /* Without it (out of memory) the thread works, just colder. */
    struct fp_warm *warm = fp->cfg.warm_ms ? fp_warm_new() : NULL;
    uint64_t last_data_ns = 0; /* when this thread last wrote to the TUN or relayed data */
    /* Why the loop ended, for fp_threads_status: never silently (0: on request). */
    uint32_t where = FP_WHERE_NONE;
    int err = 0;
    for (;;) {
        struct pollfd p[3] = {{l->fd, POLLIN, 0}, {l->wake_fd, POLLIN, 0},
                              {fp->stop_fd, POLLIN, 0}};
        int ready = poll(p, 3, fp_warm_timeout(fp, warm, last_data_ns));
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            where = FP_WHERE_POLL;
            err = errno;
            break;
        }
        if (ready == 0) {
            fp_warm_run(warm);
            continue;
        }
        /* A stop first: fp_stop with an injection still pending is no death. */
        if (p[2].revents)
            break;
        if (p[1].revents) {
            /* A wake-up means "stop" only with deleting set (link_del); else it is an
             * injection, or one left over from a thread before us: read it either way. */
            uint64_t v;
            if (read(l->wake_fd, &v, sizeof(v)) < 0)
                v = 0;
            if (atomic_load(&l->deleting))
                break;
            if ((err = fp_thr_injected(&l->thr)) != 0) {
                where = FP_WHERE_INJECTED;
                break;
            }
            if (!p[0].revents)
                continue;
        }
        /* Our own duplicate is never closed while we run: it cannot, but if it were, poll
         * would return at once forever. */
        if (p[0].revents & POLLNVAL) {
            where = FP_WHERE_HANGUP;
            err = EBADF;
            break;
        }
        bool wrote = false, relayed = false;
        pthread_rwlock_rdlock(&fp->lock);
        pthread_mutex_lock(&l->rx_lock);
        link_rx_locked(fp, l, &wrote, &relayed);
        pthread_mutex_unlock(&l->rx_lock);
        pthread_rwlock_unlock(&fp->lock);
        if (wrote || relayed)
            last_data_ns = fp_now_ns();
        if (wrote)
            tun_drain_try(fp, fp->cfg.batch);
    }
    fp_warm_free(warm);
    if (where != FP_WHERE_NONE)
        fp_thr_died(fp, &l->thr, where, err);
    else
        fp_thr_stopped(&l->thr);
    return NULL;
}

/* The TUN reader's buffers; whoever holds fp->tun_rd_lock uses them. */
struct fp_tun_rx {
    uint8_t *rbuf;
    uint8_t *arena;
    uint32_t *lens;
    struct txq q;
    bool lone;                          /* the last drain that read anything read one packet */
    uint64_t last_read_ns;              /* when a drain last read anything */
    bool sent;                          /* this drain sealed a packet to send; then: */
    uint32_t sent_link;                 /* the link the last one leaves on */
    uint32_t sent_peer;                 /* and the peer it is for */
    struct fp_flowcache *fc;            /* the transport rules' flow cache of this reader */
};

static void note_sent(struct fp_tun_rx *x, const struct fp_result *res)
{
    x->sent = true;
    x->sent_link = res->link_id;
    x->sent_peer = res->peer_id;
}

/* Seal one plaintext packet into the arena and queue it; one too big for its
 * peer's path is answered with the ICMP error it is due, into the TUN. */
static void seal_queue(struct fp *fp, struct fp_tun_rx *x, const uint8_t *ip, size_t len,
                       uint8_t *o, size_t cap, size_t *used, uint64_t now)
{
    struct fp_result res;
    if (fp_outbound_locked(fp, ip, len, o, cap, &res, now, x->fc) != 0)
        return;
    if (res.verdict == FP_V_SEND) {
        txq_add(fp, &x->q, &res, o);
        note_sent(x, &res);
        *used += res.out_len;
    } else if (res.verdict == FP_V_TUN) {
        tun_write_one(fp, o, res.out_len);
    } else if (res.verdict == FP_V_FRAGMENT && cap < res.out_len + frag_room(res.out_len)) {
        struct fp_peer *p = fp_peer_find(fp, res.peer_id);
        if (p)
            fp_ctr_add(&p->ctr.drops[FP_DROP_TOO_BIG], 1);
    } else if (res.verdict == FP_V_FRAGMENT) {
        /* The packet now lies at o; its fragments follow it. */
        struct fp_result last;
        memset(&last, 0, sizeof(last));
        size_t n = frag_queue(fp, &x->q, res.peer_id, o, res.out_len, o + res.out_len,
                              cap - res.out_len, now, &last);
        if (last.verdict == FP_V_SEND)
            note_sent(x, &last);
        *used += res.out_len + n;
    }
}

static void tun_rx_free(struct fp_tun_rx *x)
{
    if (!x)
        return;
    txq_free(&x->q);
    free(x->rbuf);
    free(x->arena);
    free(x->lens);
    free(x->fc);
    free(x);
}

static struct fp_tun_rx *tun_rx_new(void)
{
    struct fp_tun_rx *x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    /* The packet lands FP_HEADER_LEN into rbuf, its vnet header just before. */
    x->rbuf = malloc(FP_HEADER_LEN + FP_SUPER_MAX + 64);
    x->arena = malloc(ARENA_LEN);
    x->lens = calloc(FP_GSO_SPLIT_MAX, sizeof(*x->lens));
    x->fc = calloc(1, sizeof(*x->fc)); /* untouched (no RSS) until there are rules */
    x->lone = true;
    if (txq_init(&x->q, TXQ_CAP) < 0 || !x->rbuf || !x->arena || !x->lens || !x->fc) {
        tun_rx_free(x);
        return NULL;
    }
    return x;
}

/* Read up to max packets (or superpackets) from the TUN, seal them and send
 * them; the caller holds fp->tun_rd_lock and not fp->lock. Returns how many
 * reads returned something. When the previous drain found a lone packet
 * (light traffic: a ping, a request), the first packet leaves before the next
 * read, so it does not wait for that read to find the queue empty; under
 * load drains find many packets and keep batching them. */
static unsigned tun_drain(struct fp *fp, struct fp_tun_rx *x, unsigned max)
{
    int fd = atomic_load_explicit(&fp->tun_fd, memory_order_acquire);
    bool vnet = fp->tun_features & FP_TUN_F_VNET;
    uint8_t *ip = x->rbuf + FP_HEADER_LEN;
    uint8_t *arena = x->arena;
    uint32_t *lens = x->lens;
    struct txq *q = &x->q;
    unsigned cnt = 0;
    size_t used = 0;
    bool locked = false;
    x->sent = false;
    while (cnt < max) {
        ssize_t r;
        if (cnt == 1 && x->lone && q->n) {
            txq_flush(fp, q);
            used = 0;
        }
        /* One byte more than the largest packet, so oversize shows. */
        if (vnet)
            r = read(fd, ip - FP_VNET_LEN, FP_VNET_LEN + FP_SUPER_MAX + 1);
        else
            r = read(fd, ip, FP_MAX_INNER + 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        cnt++;
        if (!locked) {
            pthread_rwlock_rdlock(&fp->lock);
            locked = true;
            txq_new_hold(q);
        }
        uint64_t now = fp_now_ns();
        if (ARENA_LEN - used < ARENA_LOW) {
            txq_flush(fp, q);
            used = 0;
        }
        if (!vnet) {
            seal_queue(fp, x, ip, (size_t)r, arena + used, ARENA_LEN - used, &used, now);
            continue;
        }
        struct fp_vnet v;
        size_t len = (size_t)r - FP_VNET_LEN;
        if ((size_t)r < FP_VNET_LEN) {
            fp_ctr_add(&fp->gctr.rx_packets, 1);
            fp_ctr_add(&fp->gctr.drops[FP_DROP_MALFORMED], 1);
            continue;
        }
        fp_vnet_parse(ip - FP_VNET_LEN, &v);
        if ((v.gso_type & ~FP_VNET_GSO_ECN) == FP_VNET_GSO_NONE) {
            if (fp_csum_complete(&v, ip, len) < 0) {
                fp_ctr_add(&fp->gctr.rx_packets, 1);
                fp_ctr_add(&fp->gctr.drops[FP_DROP_MALFORMED], 1);
                continue;
            }
            seal_queue(fp, x, ip, len, arena + used, ARENA_LEN - used, &used, now);
            continue;
        }
        size_t stride;
        int ns = fp_gso_split(&v, ip, len, arena + used, ARENA_LEN - used, FP_HEADER_LEN,
                              FP_TAG_LEN, lens, FP_GSO_SPLIT_MAX, &stride);
        if (ns == -ENOSPC && used) {
            txq_flush(fp, q);
            used = 0;
            ns = fp_gso_split(&v, ip, len, arena, ARENA_LEN, FP_HEADER_LEN, FP_TAG_LEN, lens,
                              FP_GSO_SPLIT_MAX, &stride);
        }
        if (ns < 0) {
            fp_ctr_add(&fp->gctr.rx_packets, 1);
            fp_ctr_add(&fp->gctr.drops[FP_DROP_MALFORMED], 1);
            continue;
        }
        /* Sealed in place: segment i is at base + i * stride, header first,
         * so full segments end exactly where the next begins. */
        uint8_t *base = arena + used;
        bool answered = false;
        for (int i = 0; i < ns; i++) {
            uint8_t *s = base + (size_t)i * stride;
            struct fp_result res;
            if (fp_outbound_locked(fp, s + FP_HEADER_LEN, lens[i], s, stride, &res, now,
                                   x->fc) != 0)
                continue;
            if (res.verdict == FP_V_SEND) {
                txq_add(fp, q, &res, s);
                note_sent(x, &res);
            } else if (res.verdict == FP_V_TUN && !answered) {
                /* Segments too big for the path: one error for the superpacket. */
                tun_write_one(fp, s, res.out_len);
                answered = true;
            } else if (res.verdict == FP_V_FRAGMENT) {
                /* A superpacket without DF from this box itself: no room to cut it here. */
                struct fp_peer *p = fp_peer_find(fp, res.peer_id);
                if (p)
                    fp_ctr_add(&p->ctr.drops[FP_DROP_TOO_BIG], 1);
            }
        }
        used += (size_t)(ns - 1) * stride + lens[ns - 1] + FP_OVERHEAD;
    }
    if (locked) {
        txq_flush(fp, q);
        pthread_rwlock_unlock(&fp->lock);
    }
    if (cnt) {
        x->lone = cnt == 1;
        x->last_read_ns = fp_now_ns();
    }
    return cnt;
}

/* A link thread that just wrote to the TUN: the kernel handles such a write
 * in the writer's context, so an answer (an echo reply, a TCP ACK, a UDP
 * response from a local service) is usually queued on the TUN already. Send
 * it now rather than after a wake-up of the TUN thread, unless that thread is
 * reading anyway. Caller holds no lock. */
static void tun_drain_try(struct fp *fp, unsigned max)
{
    if (pthread_mutex_trylock(&fp->tun_rd_lock) != 0)
        return;
    if (fp->tun_rx)
        tun_drain(fp, fp->tun_rx, max);
    pthread_mutex_unlock(&fp->tun_rd_lock);
}

/* When the TUN thread waits for an answer (fp_config.spin_us).
 * Why: on a virtual machine, waking a sleeping thread costs tens of
 * microseconds (the idle vCPU halted; the wake-up is an interrupt through the
 * hypervisor). A request-response exchange (a ping, a DNS query, a TCP
 * handshake, the ACK of a small write) pays that three times per round trip:
 * the TUN thread for the request, the far side's link thread, and our link
 * thread for the answer. The TUN thread is awake anyway after sending; if it
 * polls the link it sent on for a little while, the answer is opened and
 * written to the TUN without the third wake-up. It only does so after a lone
 * packet that ended an idle spell (bulk traffic never spins), and it backs off
 * when the answers stop coming (one-way flows). */
#define SPIN_IDLE_NS 1000000u           /* the quiet time that makes a packet "lone" */
#define SPIN_MISSES_MAX 4               /* consecutive waits in vain before backing off */
#define SPIN_BACKOFF 32                 /* then one chance in this many */

struct spin_state {
    unsigned misses;
    unsigned skipped;
};

/* Whether to wait after a lone packet, given how the previous waits went. */
static bool spin_chance(struct spin_state *st)
{
    if (st->misses < SPIN_MISSES_MAX)
        return true;
    return ++st->skipped % SPIN_BACKOFF == 0;
}

/* Poll link `link_id` (and the TUN, and stop) without sleeping for up to
 * spin_us, taking whatever arrives on the link as its thread would, until
 * `peer_id` has sent something (taken here or by the link's own thread, woken
 * by the kernel on another core). Returns true if it did. Caller holds no lock. */
static bool tun_spin(struct fp *fp, uint32_t link_id, uint32_t peer_id, int tun_fd)
{
    uint64_t t0 = fp_now_ns();
    uint64_t end = t0 + (uint64_t)fp->cfg.spin_us * 1000u;
    bool hit = false;
    int lfd = -1;
    uint64_t rx0 = 0;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_link *l = fp_link_find(fp, link_id);
    struct fp_peer *peer = fp_peer_find(fp, peer_id);
    if (l && peer) {
        lfd = l->fd;
        rx0 = atomic_load_explicit(&peer->ctr.rx_packets, memory_order_relaxed);
    }
    pthread_rwlock_unlock(&fp->lock);
    if (lfd < 0)
        return false;
    fp_ctr_add(&fp->spins, 1);
    for (;;) {
        /* Only a hint: the fd is used below only if the link is still there. */
        struct pollfd p[3] = {{lfd, POLLIN, 0}, {tun_fd, POLLIN, 0}, {fp->stop_fd, POLLIN, 0}};
        int r = poll(p, 3, 0);
        if (r < 0 && errno != EINTR)
            break;
        bool wrote = false;
        pthread_rwlock_rdlock(&fp->lock);
        l = fp_link_find(fp, link_id);
        /* Busy: the link's own thread is taking it. */
        if (l && r > 0 && (p[0].revents & POLLIN) && pthread_mutex_trylock(&l->rx_lock) == 0) {
            link_rx_locked(fp, l, &wrote, NULL);
            pthread_mutex_unlock(&l->rx_lock);
        }
        peer = fp_peer_find(fp, peer_id);
        hit = peer && atomic_load_explicit(&peer->ctr.rx_packets, memory_order_relaxed) != rx0;
        pthread_rwlock_unlock(&fp->lock);
        if (wrote)
            tun_drain_try(fp, fp->cfg.batch);
        if (hit || !l || !peer)
            break;
        /* New work, or stop: go back and do it. */
        if (r > 0 && (p[1].revents || p[2].revents))
            break;
        if (fp_now_ns() >= end)
            break;
        /* Whatever else is runnable here (the far end of a lab, say) goes first. */
        sched_yield();
    }
    fp_ctr_add(&fp->spin_ns, fp_now_ns() - t0);
    if (hit)
        fp_ctr_add(&fp->spin_hits, 1);
    return hit;
}

static void *tun_thread(void *arg)
{
    struct fp *fp = arg;
    unsigned n = fp->cfg.batch;
    int fd = atomic_load(&fp->tun_fd);
    pthread_setname_np(pthread_self(), "fp-tun");
    struct fp_tun_rx *x = tun_rx_new();
    if (!x) {
        fp_thr_died(fp, &fp->tun_thr, FP_WHERE_ALLOC, ENOMEM);
        return NULL;
    }
    /* Why the loop ended, for fp_threads_status: never silently (0: on request). */
    uint32_t where = FP_WHERE_NONE;
    int err = 0;
    struct fp_warm *warm = fp->cfg.warm_ms ? fp_warm_new() : NULL;
    struct spin_state spin = {0, 0};
    uint64_t last_data_ns = 0; /* when this thread last read a packet from the TUN */
    pthread_mutex_lock(&fp->tun_rd_lock);
    fp->tun_rx = x;
    pthread_mutex_unlock(&fp->tun_rd_lock);
    for (;;) {
        struct pollfd p[3] = {{fd, POLLIN, 0}, {fp->stop_fd, POLLIN, 0},
                              {fp->tun_wake_fd, POLLIN, 0}};
        int ready = poll(p, 3, fp_warm_timeout(fp, warm, last_data_ns));
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            where = FP_WHERE_POLL;
            err = errno;
            break;
        }
        if (ready == 0) {
            fp_warm_run(warm);
            continue;
        }
        if (p[1].revents)
            break;
        if (p[2].revents) {
            /* Read the wake-up, or the thread started again would find it. Nothing to do
             * if it fails: the next poll would wake us again and read it then. */
            uint64_t v;
            if (read(fp->tun_wake_fd, &v, sizeof(v)) < 0)
                v = 0;
            if ((err = fp_thr_injected(&fp->tun_thr)) != 0) {
                where = FP_WHERE_INJECTED;
                break;
            }
            if (!(p[0].revents & POLLIN))
                continue;
        }
        pthread_mutex_lock(&fp->tun_rd_lock);
        /* Quiet since any drain: a link thread's (tun_drain_try) counts too. */
        bool quiet = fp_now_ns() - x->last_read_ns >= SPIN_IDLE_NS;
        unsigned cnt = tun_drain(fp, x, n);
        if (cnt)
            last_data_ns = fp_now_ns();
        bool lone_sent = cnt == 1 && x->sent && quiet;
        uint32_t sent_link = x->sent_link, sent_peer = x->sent_peer;
        pthread_mutex_unlock(&fp->tun_rd_lock);
        /* The device went away (or the socketpair's other end closed). A
         * link thread may have taken the packets that woke us: then POLLIN
         * alone was set, and we just poll again. */
        if (cnt == 0 && (p[0].revents & (POLLHUP | POLLERR | POLLNVAL))) {
            where = FP_WHERE_HANGUP;
            err = (p[0].revents & POLLNVAL) ? EBADF : (p[0].revents & POLLERR) ? ENODEV : EPIPE;
            break;
        }
        if (fp->cfg.spin_us && lone_sent && spin_chance(&spin)) {
            if (tun_spin(fp, sent_link, sent_peer, fd))
                spin.misses = 0;
            else
                spin.misses++;
        }
    }
    pthread_mutex_lock(&fp->tun_rd_lock);
    fp->tun_rx = NULL;
    pthread_mutex_unlock(&fp->tun_rd_lock);
    tun_rx_free(x);
    fp_warm_free(warm);
    if (where != FP_WHERE_NONE)
        fp_thr_died(fp, &fp->tun_thr, where, err);
    else
        fp_thr_stopped(&fp->tun_thr);
    return NULL;
}

/* An eventfd's pending wake-up, read away before a thread is started on it. */
static void wake_drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) == sizeof(v))
        ;
}

int fp_io_start_link(struct fp *fp, struct fp_link *l)
{
    l->fp = fp;
    wake_drain(l->wake_fd);
    int was = fp_thr_starting(&l->thr);
    int rc = fp_thr_start_err(&l->thr);
    if (rc == 0)
        rc = pthread_create(&l->thread, NULL, link_thread, l);
    if (rc) {
        atomic_store(&(l->thr).state, was); /* one that died stays so */
        return -rc;
    }
    l->thread_running = true;
    return 0;
}

int fp_io_start_tun(struct fp *fp)
{
    wake_drain(fp->tun_wake_fd);
    int was = fp_thr_starting(&fp->tun_thr);
    int rc = fp_thr_start_err(&fp->tun_thr);
    if (rc == 0)
        rc = pthread_create(&fp->tun_thread, NULL, tun_thread, fp);
    if (rc) {
        atomic_store(&(fp->tun_thr).state, was); /* one that died stays so */
        return -rc;
    }
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
    fp_link_rx_free(l->rx);
    pthread_mutex_destroy(&l->rx_lock);
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

/* Not in every libc's copy of linux/if_tun.h yet (Linux 6.2). */
#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#define TUN_F_USO6 0x40
#endif

static int tun_set(struct fp *fp, int fd, int features)
{
    int rc = 0;
    pthread_mutex_lock(&fp->api_lock);
    if (atomic_load(&fp->tun_fd) >= 0) {
        rc = -EEXIST;
    } else {
        fp->tun_features = features;
        atomic_store_explicit(&fp->tun_fd, fd, memory_order_release);
        if (fp->running && (rc = fp_io_start_tun(fp)) < 0)
            atomic_store(&fp->tun_fd, -1);
    }
    pthread_mutex_unlock(&fp->api_lock);
    if (rc < 0)
        close(fd);
    return rc;
}

/* The offloads of a TUN fd created with IFF_VNET_HDR, by us or by the
 * supervisor (python-pytun): the header size we parse, and the most
 * checksum/TSO/USO offload the kernel grants. 0 for a fd without vnet headers
 * (a plain TUN device, a socketpair in tests); -errno if the device has vnet
 * headers we cannot size, since its packets would then be misread. */
static int tun_offloads(int fd)
{
    struct ifreq got;
    memset(&got, 0, sizeof(got));
    if (ioctl(fd, TUNGETIFF, &got) < 0 || !(got.ifr_flags & IFF_VNET_HDR))
        return 0;
    int hs = FP_VNET_LEN;
    if (ioctl(fd, TUNSETVNETHDRSZ, &hs) < 0)
        return -errno;
    int features = FP_TUN_F_VNET;
    /* Ask for the most the kernel gives; without any of it the vnet header
     * stays (all zero) and packets come one by one. */
    if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6) ==
        0)
        features |= FP_TUN_F_TSO | FP_TUN_F_USO;
    else if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) == 0)
        features |= FP_TUN_F_TSO;
    return features;
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
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
    memcpy(ifr.ifr_name, name, strlen(name));
    int features = 0;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0 || (features = tun_offloads(fd)) <= 0) {
        /* A kernel (or an existing device) without vnet headers: plain packets. */
        close(fd);
        features = 0;
        fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            return -errno;
        ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
        if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
            int e = errno;
            close(fd);
            return -e;
        }
    }
    return tun_set(fp, fd, features);
}

int fp_tun_features(fp_t *fp)
{
    pthread_mutex_lock(&fp->api_lock);
    int f = atomic_load(&fp->tun_fd) >= 0 ? fp->tun_features : 0;
    pthread_mutex_unlock(&fp->api_lock);
    return f;
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
    int features = tun_offloads(mine);
    if (features < 0) {
        close(mine);
        return features;
    }
    return tun_set(fp, mine, features);
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
    atomic_init(&l->no_gso, false);
    pthread_mutex_init(&l->rx_lock, NULL);
    l->fd = fcntl(udp_fd, F_DUPFD_CLOEXEC, 0);
    l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->fd < 0 || l->wake_fd < 0) {
        int e = errno;
        if (l->fd >= 0)
            close(l->fd);
        if (l->wake_fd >= 0)
            close(l->wake_fd);
        pthread_mutex_destroy(&l->rx_lock);
        free(l);
        return -e;
    }
    /* DF on everything we send, whatever the kernel learned from ICMP: the
     * path MTU is found by our own probes (docs/dataplane.md, "Path MTU"), and
     * a probe fragmented locally would prove nothing. Best effort. */
    int probe = IP_PMTUDISC_PROBE;
    (void)setsockopt(l->fd, IPPROTO_IP, IP_MTU_DISCOVER, &probe, sizeof(probe));
    if (l->family == AF_INET6) {
        int probe6 = IPV6_PMTUDISC_PROBE;
        (void)setsockopt(l->fd, IPPROTO_IPV6, IPV6_MTU_DISCOVER, &probe6, sizeof(probe6));
    }
    /* Coalesced receive: the kernel hands over runs of datagrams of one size
     * from one sender as one, and the link thread splits them. */
    int one = 1;
    l->gro = setsockopt(l->fd, SOL_UDP, UDP_GRO, &one, sizeof(one)) == 0;
    l->rx = fp_link_rx_new(fp, l->gro);
    if (!l->rx) {
        fp_link_destroy(l);
        return -ENOMEM;
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
    /* Its flows move to the peers' other links with the next packet. */
    if (l)
        fp_peers_drop_link(fp, link_id);
    pthread_rwlock_unlock(&fp->lock);
    /* Out of the table, so no other thread can reach it; now stop its own. */
    if (l && l->thread_running) {
        uint64_t one = 1;
        atomic_store(&l->deleting, true);
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
            count_unsent(l, errno, 1);
        } else {
            rc = (int)r;
            fp_ctr_add(&l->ctr.tx_packets, 1);
            fp_ctr_add(&l->ctr.tx_bytes, (uint64_t)r);
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

/* Send a sealed keepalive where res says (link_id, to); under fp->lock (read). */
static int send_keepalive(fp_t *fp, const uint8_t *pkt, const struct fp_result *res)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    int rc;
    if (res->verdict == FP_V_DROP) {
        static const int err[FP_DROP__COUNT] = {
            [FP_DROP_NO_KEY] = -ENOKEY, [FP_DROP_NO_ENDPOINT] = -ENOTCONN,
            [FP_DROP_KEY_EXPIRED] = -EKEYEXPIRED};
        return err[res->drop_reason] ? err[res->drop_reason] : -EIO;
    }
    struct fp_link *l = fp_link_find(fp, res->link_id);
    if (!l) {
        fp_ctr_add(&fp->gctr.drops[FP_DROP_SEND_ERROR], 1);
        return -ENODEV;
    }
    if (fp_addr_to_sockaddr(&res->to, l->family, &ss, &sl) < 0) {
        fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
        return -EAFNOSUPPORT;
    }
    if (sendto(l->fd, pkt, res->out_len, MSG_DONTWAIT, (struct sockaddr *)&ss, sl) < 0) {
        rc = -errno;
        count_unsent(l, errno, 1);
        return rc;
    }
    fp_ctr_add(&l->ctr.tx_packets, 1);
    fp_ctr_add(&l->ctr.tx_bytes, res->out_len);
    return 0;
}

/* An authenticated empty packet to p's primary endpoint; under fp->lock (read). */
static int keepalive_locked(fp_t *fp, struct fp_peer *p)
{
    uint8_t pkt[FP_OVERHEAD];
    struct fp_result res;
    memset(&res, 0, sizeof(res));
    int rc = fp_seal_for_peer(fp, p, pkt + FP_HEADER_LEN, 0, pkt, sizeof(pkt), &res, fp_now_ns());
    if (rc < 0)
        return rc;
    return send_keepalive(fp, pkt, &res);
}

/* One keepalive over one endpoint (link and address), whatever the peer's link policy. */
static int keepalive_to_locked(fp_t *fp, struct fp_peer *p, uint32_t link_id,
                               const struct fp_addr *to)
{
    uint8_t pkt[FP_OVERHEAD];
    struct fp_result res;
    memset(&res, 0, sizeof(res));
    int rc = fp_seal_to(fp, p, link_id, to, pkt + FP_HEADER_LEN, 0, pkt, sizeof(pkt), &res,
                        fp_now_ns());
    if (rc < 0)
        return rc;
    return send_keepalive(fp, pkt, &res);
}

/* The idle keepalives of one peer: every endpoint over which nothing went out for `every`
 * gets one of its own (within the pass's second), so each link's NAT mapping of a multi-link
 * peer stays open, not only the one its traffic takes. An endpoint that never sent is due
 * at once. */
static void idle_keepalives_locked(fp_t *fp, struct fp_peer *p, uint64_t every, uint64_t now)
{
    struct {
        uint32_t link_id;
        struct fp_addr to;
    } due[FP_PEER_ENDPOINTS];
    int n = 0;
    pthread_mutex_lock(&p->ep_lock);
    for (int i = 0; i < FP_PEER_ENDPOINTS; i++) {
        struct fp_peer_ep *e = &p->ep[i];
        if (!e->used)
            continue;
        bool never = e->tx_packets == 0 && e->ka_idle_ns == 0;
        if (!never && (e->tx_packets != e->ka_mark || e->ka_idle_ns == 0)) {
            e->ka_mark = e->tx_packets; /* sent over since the last look: idle from now */
            e->ka_idle_ns = now;
            continue;
        }
        if (!never && now - e->ka_idle_ns < every)
            continue;
        due[n].link_id = e->link_id;
        due[n].to = e->addr;
        n++;
        e->ka_idle_ns = now;
    }
    pthread_mutex_unlock(&p->ep_lock);
    for (int i = 0; i < n; i++) {
        if (keepalive_to_locked(fp, p, due[i].link_id, &due[i].to) < 0) {
            /* Not sent (a full socket buffer, no key yet): due again at the next pass, not
             * a whole interval later, or two failures in a row would be a peer's dead_after
             * of silence. */
            pthread_mutex_lock(&p->ep_lock);
            int s = fp_peer_ep_slot(p, due[i].link_id);
            if (s >= 0 && p->ep[s].ka_idle_ns == now)
                p->ep[s].ka_idle_ns = now - every;
            pthread_mutex_unlock(&p->ep_lock);
            continue;
        }
        /* Counted on its endpoint like the primary's keepalives (no inner bytes), if the
         * endpoint is still the one it went to. */
        pthread_mutex_lock(&p->ep_lock);
        int s = fp_peer_ep_slot(p, due[i].link_id);
        if (s >= 0) {
            p->ep[s].tx_packets++;
            p->ep[s].ka_mark = p->ep[s].tx_packets;
        }
        pthread_mutex_unlock(&p->ep_lock);
    }
}

int fp_send_keepalive(fp_t *fp, uint32_t peer_id)
{
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p)
        rc = keepalive_locked(fp, p);
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

/* How often fp_liveness_scan looks for idle peers due a keepalive. */
#define KEEPALIVE_PASS_NS (1000 * 1000000ull)

int fp_liveness_wake_fd(fp_t *fp)
{
    return fp->live_wake_fd;
}

int fp_liveness_busy(fp_t *fp)
{
    return atomic_load_explicit(&fp->scan_pending, memory_order_relaxed) ||
           atomic_load_explicit(&fp->live_gen, memory_order_acquire) !=
               atomic_load_explicit(&fp->scan_gen, memory_order_relaxed);
}

int fp_peer_set_keepalive(fp_t *fp, uint32_t peer_id, uint32_t interval_ms)
{
    if (interval_ms > 3600000)
        return -EINVAL;
    int rc;
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p)
        atomic_store_explicit(&p->keepalive_ns, (uint64_t)interval_ms * 1000000u,
                              memory_order_relaxed);
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_keepalive_pass(fp_t *fp)
{
    uint64_t now = fp_now_ns();
    int n = 0;
    pthread_rwlock_rdlock(&fp->lock);
    for (int i = 0; i < FP_PEER_BUCKETS; i++) {
        for (struct fp_peer *p = fp->peers[i]; p; p = p->next) {
            uint64_t every = atomic_load_explicit(&p->keepalive_ns, memory_order_relaxed);
            if (every && p->tx_slot >= 0) {
                idle_keepalives_locked(fp, p, every, now);
                n++;
            }
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    return n;
}

/* A key's limit (0: the config's) as set by fp_peer_set_key_lifetime: the newest key takes
 * the new value; an older one (still receiving what was sent before the switch) only a
 * longer one, so a limit that shrinks mid-session never cuts off a key already in use. */
static void key_limit_set(_Atomic uint32_t *limit, uint32_t value, uint32_t own, bool newest)
{
    uint32_t cur = atomic_load_explicit(limit, memory_order_relaxed);
    if (newest || (value ? value : own) >= (cur ? cur : own))
        atomic_store_explicit(limit, value, memory_order_relaxed);
}

int fp_peer_set_key_lifetime(fp_t *fp, uint32_t peer_id, uint32_t rekey_after_seconds,
                             uint32_t reject_after_seconds)
{
    if (rekey_after_seconds && reject_after_seconds && rekey_after_seconds > reject_after_seconds)
        return -EINVAL;
    int rc;
    /* Exclusive: the slots and their keys stay put meanwhile (fp_key_install). */
    pthread_rwlock_wrlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    if (p) {
        atomic_store_explicit(&p->rekey_after_s, rekey_after_seconds, memory_order_relaxed);
        atomic_store_explicit(&p->reject_after_s, reject_after_seconds, memory_order_relaxed);
        int newest = -1;
        for (int s = 0; s < 2; s++)
            if (p->slot[s] && (newest < 0 || p->slot[s]->created_ns > p->slot[newest]->created_ns))
                newest = s;
        for (int s = 0; s < 2; s++) {
            struct fp_key *k = p->slot[s];
            if (!k)
                continue;
            key_limit_set(&k->rekey_after_s, rekey_after_seconds, fp->cfg.rekey_after_seconds,
                          s == newest);
            key_limit_set(&k->reject_after_s, reject_after_seconds,
                          fp->cfg.reject_after_seconds, s == newest);
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_liveness_scan(fp_t *fp, uint64_t ack_after_ns, uint64_t silent_after_ns, uint32_t *ids,
                     size_t cap)
{
    if (cap && !ids)
        return -EINVAL;
    size_t n = 0;
    uint64_t now = fp_now_ns();
    /* A walk over a thousand peers' cache lines costs a third of a millisecond, every tick:
     * skip it while no liveness clock can be running (none was at the last walk and none
     * started since) and no idle keepalive pass is due. */
    uint64_t gen = atomic_load_explicit(&fp->live_gen, memory_order_acquire);
    bool keepalives = now >= atomic_load_explicit(&fp->scan_keepalive_ns, memory_order_relaxed);
    if (!keepalives && !atomic_load_explicit(&fp->scan_pending, memory_order_relaxed) &&
        gen == atomic_load_explicit(&fp->scan_gen, memory_order_relaxed))
        return 0;
    if (keepalives)
        atomic_store_explicit(&fp->scan_keepalive_ns, now + KEEPALIVE_PASS_NS,
                              memory_order_relaxed);
    bool pending = false;
    pthread_rwlock_rdlock(&fp->lock);
    for (int i = 0; i < FP_PEER_BUCKETS; i++) {
        for (struct fp_peer *p = fp->peers[i]; p; p = p->next) {
            uint64_t owed = atomic_load_explicit(&p->owed_ns, memory_order_relaxed);
            /* A peer without keys or endpoint cannot be answered; it stays owed. (owed may
             * be later than `now`, set by a link thread since: not due yet.) */
            if (owed && owed <= now && now - owed >= ack_after_ns && p->tx_slot >= 0 &&
                p->primary >= 0)
                (void)keepalive_locked(fp, p);
            uint64_t every = atomic_load_explicit(&p->keepalive_ns, memory_order_relaxed);
            if (keepalives && every && p->tx_slot >= 0)
                idle_keepalives_locked(fp, p, every, now);
            uint64_t since = atomic_load_explicit(&p->unanswered_ns, memory_order_relaxed);
            bool silent = since && now > since && now - since >= silent_after_ns;
            if (silent && n < cap)
                ids[n++] = p->id;
            /* Walk again at the next scan while a clock can still come due: owed and
             * answerable (the keepalive may have failed), or unanswered and not silent yet. A
             * silent peer is reported again by the once-a-second pass; one owed without keys
             * or endpoint waits for them (fp_key_activate, fp_peer_set_endpoint bump
             * live_gen). */
            if ((atomic_load_explicit(&p->owed_ns, memory_order_relaxed) && p->tx_slot >= 0 &&
                 p->primary >= 0) ||
                (since && !silent))
                pending = true;
        }
    }
    pthread_rwlock_unlock(&fp->lock);
    atomic_store_explicit(&fp->scan_gen, gen, memory_order_relaxed);
    atomic_store_explicit(&fp->scan_pending, pending, memory_order_relaxed);
    /* None running: the next clock to start wakes the supervisor (fp_liveness_wake_fd).
     * While some run it scans often anyway, and the data threads write nothing. */
    if (!pending) {
        atomic_store_explicit(&fp->live_wake_sent, false, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst); /* see clock_started */
    }
    return (int)n;
}

int fp_peer_probe(fp_t *fp, uint32_t peer_id, uint32_t link_id, uint32_t size, uint32_t probe_id)
{
    if (size < FP_PMTU_MIN || size > 65535)
        return -EINVAL;
    uint8_t *pkt = malloc(FP_BUF_LEN);
    if (!pkt)
        return -ENOMEM;
    struct fp_result res;
    struct sockaddr_storage ss;
    socklen_t sl;
    struct fp_addr to;
    int rc;
    memset(&res, 0, sizeof(res));
    pthread_rwlock_rdlock(&fp->lock);
    struct fp_peer *p = fp_peer_find_plain(fp, peer_id, &rc);
    struct fp_link *l = fp_link_find(fp, link_id);
    if (!p)
        goto out;
    pthread_mutex_lock(&p->ep_lock);
    int slot = fp_peer_ep_slot(p, link_id);
    if (slot >= 0)
        to = p->ep[slot].addr;
    pthread_mutex_unlock(&p->ep_lock);
    if (slot < 0) {
        rc = -ENOTCONN;
        goto out;
    }
    if (!l) {
        rc = -ENODEV;
        goto out;
    }
    /* `size` is the IP packet on the wire: outer IP and UDP headers, ours. */
    size_t outer = (to.family == 4 ? 20u : 40u) + 8u + FP_OVERHEAD;
    if (size < outer + FP_PROBE_HDR_LEN || size - outer > FP_MAX_INNER) {
        rc = -EINVAL;
        goto out;
    }
    size_t plen = size - outer;
    uint8_t *plain = pkt + FP_HEADER_LEN;
    memset(plain, 0, plen);
    plain[0] = FP_PROBE;
    plain[4] = (uint8_t)(probe_id >> 24);
    plain[5] = (uint8_t)(probe_id >> 16);
    plain[6] = (uint8_t)(probe_id >> 8);
    plain[7] = (uint8_t)probe_id;
    rc = fp_seal_to(fp, p, link_id, &to, plain, plen, pkt, FP_BUF_LEN, &res, fp_now_ns());
    if (rc < 0)
        goto out;
    if (res.verdict == FP_V_DROP) {
        rc = res.drop_reason == FP_DROP_NO_KEY ? -ENOKEY
             : res.drop_reason == FP_DROP_KEY_EXPIRED ? -EKEYEXPIRED : -EIO;
        goto out;
    }
    if (fp_addr_to_sockaddr(&to, l->family, &ss, &sl) < 0) {
        rc = -EAFNOSUPPORT;
    } else if (sendto(l->fd, pkt, res.out_len, MSG_DONTWAIT, (struct sockaddr *)&ss, sl) < 0) {
        /* EMSGSIZE: larger than our own interface allows; not a send error. */
        rc = -errno;
        if (rc != -EMSGSIZE)
            fp_ctr_add(&l->ctr.drops[FP_DROP_SEND_ERROR], 1);
    } else {
        rc = 0;
        fp_ctr_add(&l->ctr.tx_packets, 1);
        fp_ctr_add(&l->ctr.tx_bytes, res.out_len);
    }
out:
    pthread_rwlock_unlock(&fp->lock);
    free(pkt);
    return rc;
}
