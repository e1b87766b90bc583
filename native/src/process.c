/*
 * process.c - what happens to one packet, in either direction. The threads
 * and the synchronous fp_process_* calls run exactly this code; the *_locked
 * variants expect fp->lock held shared so a thread can take it once per batch.
 */
#include "fp_internal.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static int drop(struct fp_result *res, int reason, struct fp_ctr *a, struct fp_ctr *b)
{
    res->verdict = FP_V_DROP;
    res->drop_reason = reason;
    if (a)
        fp_ctr_add(&a->drops[reason], 1);
    if (b)
        fp_ctr_add(&b->drops[reason], 1);
    return 0;
}

static void event_once(struct fp *fp, atomic_int *flag, uint32_t event, uint32_t peer_id)
{
    if (atomic_load_explicit(flag, memory_order_relaxed))
        return;
    if (atomic_exchange(flag, 1) == 0 &&
        fp_ctrlq_push(&fp->cq, FP_LANE_KNOWN, event, 0, peer_id, NULL, NULL, 0) < 0)
        atomic_store(flag, 0); /* queue full: try again on a later packet */
}

static inline uint64_t secs_ns(uint32_t s)
{
    return (uint64_t)s * 1000000000u;
}

/* A key-age limit of a key: the one agreed with its peer (fp_peer_set_key_lifetime), or
 * the fast path's own where none was set. */
static inline uint64_t key_limit_ns(const _Atomic uint32_t *agreed, uint32_t own)
{
    uint32_t s = atomic_load_explicit(agreed, memory_order_relaxed);
    return secs_ns(s ? s : own);
}

/* A packet counted on endpoint slot (of link_id) was not sent after all. The
 * slot may have been given to another link meanwhile: then it is left alone. */
static void uncount(struct fp_peer *peer, int slot, uint32_t link_id, size_t len)
{
    pthread_mutex_lock(&peer->ep_lock);
    struct fp_peer_ep *e = &peer->ep[slot];
    if (e->used && e->link_id == link_id && e->tx_packets && e->tx_bytes >= len) {
        e->tx_packets--;
        e->tx_bytes -= len;
    }
    pthread_mutex_unlock(&peer->ep_lock);
}

/* An IP packet, as opposed to a keepalive (empty) or a path-MTU probe or ack:
 * only those expect an answer under liveness (a probe may be lost on
 * purpose: that is what it is for). */
static inline bool is_data(const uint8_t *in, size_t len)
{
    return len && in[0] >> 4 != FP_PROBE >> 4;
}

/* A liveness clock started: fp_liveness_scan must walk again, and a supervisor that
 * scans rarely while none runs is woken (once until its next scan). */
static void clock_started(struct fp *fp)
{
    atomic_fetch_add_explicit(&fp->live_gen, 1, memory_order_release);
    /* Against fp_liveness_scan's re-arm then fp_liveness_busy's load: without a full fence
     * each side could miss the other's store, and the wake would be lost. */
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load_explicit(&fp->live_wake_sent, memory_order_relaxed) &&
        !atomic_exchange_explicit(&fp->live_wake_sent, true, memory_order_relaxed)) {
        uint64_t one = 1;
        ssize_t r = write(fp->live_wake_fd, &one, sizeof(one));
        (void)r; /* EAGAIN only with the counter near overflow: the reader drains it */
    }
}

/* Liveness under traffic: anything sent pays what the peer was owed; the
 * first data packet since the peer last answered starts its clock. Loads
 * first, so a busy flow does not write the shared line on every packet. */
static void note_sent(struct fp *fp, struct fp_peer *peer, size_t len, uint64_t now)
{
    if (atomic_load_explicit(&peer->owed_ns, memory_order_relaxed))
        atomic_store_explicit(&peer->owed_ns, 0, memory_order_relaxed);
    if (len && !atomic_load_explicit(&peer->unanswered_ns, memory_order_relaxed)) {
        uint64_t none = 0;
        if (atomic_compare_exchange_strong_explicit(&peer->unanswered_ns, &none, now,
                                                    memory_order_relaxed, memory_order_relaxed))
            clock_started(fp);
    }
}

/* Anything authenticated answers; a data packet is owed an answer. */
static void note_received(struct fp *fp, struct fp_peer *peer, size_t plen, uint64_t now)
{
    if (atomic_load_explicit(&peer->unanswered_ns, memory_order_relaxed))
        atomic_store_explicit(&peer->unanswered_ns, 0, memory_order_relaxed);
    if (plen && !atomic_load_explicit(&peer->owed_ns, memory_order_relaxed)) {
        uint64_t none = 0;
        if (atomic_compare_exchange_strong_explicit(&peer->owed_ns, &none, now,
                                                    memory_order_relaxed, memory_order_relaxed))
            clock_started(fp);
    }
}

/* The key, counter and AEAD part of sealing, for an endpoint already in res
 * (link_id, to); slot is the endpoint slot the packet was counted on, or -1. */
static int seal_with_key(struct fp *fp, struct fp_peer *peer, int slot, const uint8_t *in,
                         size_t len, uint8_t *out, struct fp_result *res, uint64_t now)
{
    const struct fp_config *cfg = &fp->cfg;
    struct fp_key *k = peer->slot[peer->tx_slot];
    uint64_t age = now > k->created_ns ? now - k->created_ns : 0;
    /* Load first so that an expired key does not keep advancing its counter. */
    uint64_t ctr = atomic_load_explicit(&k->tx_counter, memory_order_relaxed);
    bool expired = age >= key_limit_ns(&k->reject_after_s, cfg->reject_after_seconds) ||
                   ctr >= cfg->reject_after_packets;
    if (!expired) {
        ctr = atomic_fetch_add_explicit(&k->tx_counter, 1, memory_order_relaxed);
        expired = ctr >= cfg->reject_after_packets;
    }
    if (expired) {
        if (slot >= 0)
            uncount(peer, slot, res->link_id, len);
        event_once(fp, &k->expired_sent, FP_EV_KEY_EXPIRED, peer->id);
        return drop(res, FP_DROP_KEY_EXPIRED, &peer->ctr, NULL);
    }
    if (ctr >= cfg->rekey_after_packets ||
        age >= key_limit_ns(&k->rekey_after_s, cfg->rekey_after_seconds))
        event_once(fp, &k->rekey_sent, FP_EV_REKEY, peer->id);

    uint8_t iv[12];
    fp_hdr_write(out, k->remote_index, ctr);
    fp_nonce(iv, ctr);
    pthread_mutex_lock(&k->tx_lock);
    int rc = fp_aead_seal(k->tx_ctx, iv, out, FP_HEADER_LEN, in, len, out + FP_HEADER_LEN,
                          out + FP_HEADER_LEN + len);
    pthread_mutex_unlock(&k->tx_lock);
    if (rc < 0) {
        if (slot >= 0)
            uncount(peer, slot, res->link_id, len);
        return -EIO;
    }
    fp_ctr_add(&peer->ctr.tx_packets, 1);
    fp_ctr_add(&peer->ctr.tx_bytes, len);
    fp_ctr_set(&peer->ctr.last_tx_ns, now);
    res->verdict = FP_V_SEND;
    res->out_len = (uint32_t)(len + FP_OVERHEAD);
    return 0;
}

/* Seal `in` (len bytes; may be exactly out + FP_HEADER_LEN) for peer into
 * out, choosing its transmit key, counter and endpoint (by the peer's link
 * policy, per flow of the inner packet `in`). */
int fp_seal_for_peer(struct fp *fp, struct fp_peer *peer, const uint8_t *in, size_t len,
                     uint8_t *out, size_t cap, struct fp_result *res, uint64_t now)
{
    res->peer_id = peer->id;
    if (cap < len + FP_OVERHEAD)
        return -ENOSPC;
    if (peer->tx_slot < 0)
        return drop(res, FP_DROP_NO_KEY, &peer->ctr, NULL);

    /* Counted on the endpoint here, under the lock every packet takes anyway,
     * and taken back in the rare case that the packet is refused below. */
    pthread_mutex_lock(&peer->ep_lock);
    int slot = peer->ncand && len ? fp_peer_choose(peer, in, len) : peer->primary;
    if (slot >= 0) {
        struct fp_peer_ep *e = &peer->ep[slot];
        res->link_id = e->link_id;
        res->to = e->addr;
        e->tx_packets++;
        e->tx_bytes += len;
    }
    pthread_mutex_unlock(&peer->ep_lock);
    if (slot < 0)
        return drop(res, FP_DROP_NO_ENDPOINT, &peer->ctr, NULL);
    int rc = seal_with_key(fp, peer, slot, in, len, out, res, now);
    if (rc == 0 && res->verdict == FP_V_SEND)
        note_sent(fp, peer, is_data(in, len) ? len : 0, now);
    return rc;
}

int fp_seal_to(struct fp *fp, struct fp_peer *peer, uint32_t link_id, const struct fp_addr *to,
               const uint8_t *in, size_t len, uint8_t *out, size_t cap, struct fp_result *res,
               uint64_t now)
{
    res->peer_id = peer->id;
    if (cap < len + FP_OVERHEAD)
        return -ENOSPC;
    if (peer->tx_slot < 0)
        return drop(res, FP_DROP_NO_KEY, &peer->ctr, NULL);
    res->link_id = link_id;
    res->to = *to;
    return seal_with_key(fp, peer, -1, in, len, out, res, now);
}

/* ------------------------------------------------------------------ path MTU */

static inline uint32_t inner_mtu(const struct fp_peer *p)
{
    return atomic_load_explicit(&p->inner_mtu, memory_order_relaxed);
}

/* The ICMP error for a packet too big for `mtu`, built apart from the packet
 * (which may lie where the error goes); returns its length or 0. */
static size_t too_big_icmp(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t icmp[1280],
                           size_t cap)
{
    int n = fp_icmp_too_big(ip, len, mtu, icmp, cap < 1280 ? cap : 1280);
    return n > 0 ? (size_t)n : 0;
}

/* IPv4 without DF, too big: the caller cuts it (verdict FP_V_FRAGMENT, the
 * packet in out). */
static int fragment(struct fp_peer *peer, const uint8_t *ip, size_t len, uint8_t *out,
                    size_t cap, struct fp_result *res)
{
    if (cap < len)
        return -ENOSPC;
    if (out != ip)
        memmove(out, ip, len);
    res->peer_id = peer->id;
    res->verdict = FP_V_FRAGMENT;
    res->out_len = (uint32_t)len;
    return 0;
}

/* An inner packet from the TUN too big for peer: cut into fragments when it
 * may be; else counted on the peer, and the ICMP error it is due is the
 * verdict (FP_V_TUN, in out), or it is dropped. */
static int too_big_out(struct fp_peer *peer, const uint8_t *ip, size_t len, uint32_t mtu,
                       uint8_t *out, size_t cap, struct fp_result *res)
{
    uint8_t icmp[1280];
    if (len >= 20 && ip[0] >> 4 == 4 && !fp_ip_df(ip, len))
        return fragment(peer, ip, len, out, cap, res);
    res->peer_id = peer->id;
    size_t n = too_big_icmp(ip, len, mtu, icmp, cap);
    if (n == 0)
        return drop(res, FP_DROP_TOO_BIG, &peer->ctr, NULL);
    fp_ctr_add(&peer->ctr.drops[FP_DROP_TOO_BIG], 1);
    memcpy(out, icmp, n);
    res->verdict = FP_V_TUN;
    res->out_len = (uint32_t)n;
    return 0;
}

/* A relayed packet (plaintext in out) too big for `to`: counted on `to`; the
 * ICMP error goes back to the peer that sent it, sealed. */
static int too_big_relay(struct fp *fp, struct fp_peer *from, struct fp_peer *to,
                         uint8_t *out, size_t plen, uint32_t mtu, size_t cap,
                         struct fp_result *res, uint64_t now)
{
    uint8_t icmp[1280];
    if (plen >= 20 && out[0] >> 4 == 4 && !fp_ip_df(out, plen))
        return fragment(to, out, plen, out, cap, res);
    size_t n = too_big_icmp(out, plen, mtu, icmp, cap - FP_OVERHEAD);
    if (n == 0) {
        res->peer_id = to->id;
        return drop(res, FP_DROP_TOO_BIG, &to->ctr, NULL);
    }
    fp_ctr_add(&to->ctr.drops[FP_DROP_TOO_BIG], 1);
    return fp_seal_for_peer(fp, from, icmp, n, out, cap, res, now);
}

static uint32_t min_mtu(uint32_t a, uint32_t b)
{
    return a == 0 ? b : (b == 0 || a < b ? a : b);
}

/* A probe or a probe's ack (plaintext in out), authenticated from peer. A
 * probe is answered on the link and to the address it came from, so the ack
 * takes the path that was probed; an ack goes to Python. */
static int probe_in(struct fp *fp, struct fp_peer *peer, uint32_t link_id,
                    const struct fp_addr *from, uint8_t *out, size_t plen, size_t wire_len,
                    size_t cap, struct fp_result *res, uint64_t now)
{
    if (plen < FP_PROBE_HDR_LEN || out[1] || out[2] || out[3])
        return drop(res, FP_DROP_MALFORMED, &peer->ctr, NULL);
    if (out[0] == FP_PROBE) {
        uint8_t ack[FP_PROBE_ACK_LEN] = {FP_PROBE_ACK, 0, 0, 0};
        memcpy(ack + 4, out + 4, 4);
        ack[8] = (uint8_t)(wire_len >> 24);
        ack[9] = (uint8_t)(wire_len >> 16);
        ack[10] = (uint8_t)(wire_len >> 8);
        ack[11] = (uint8_t)wire_len;
        if (from)
            return fp_seal_to(fp, peer, link_id, from, ack, sizeof(ack), out, cap, res, now);
        return fp_seal_for_peer(fp, peer, ack, sizeof(ack), out, cap, res, now);
    }
    if (out[0] == FP_PROBE_ACK && plen == FP_PROBE_ACK_LEN) {
        if (fp_ctrlq_push(&fp->cq, FP_LANE_KNOWN, FP_EV_PROBE_ACK, link_id, peer->id, from,
                          out + 4, 8) < 0) {
            fp_ctrl_lane_full(fp, FP_LANE_KNOWN);
            return drop(res, FP_DROP_QUEUE_FULL, &peer->ctr, NULL);
        }
        res->verdict = FP_V_CONTROL;
        return 0;
    }
    return drop(res, FP_DROP_MALFORMED, &peer->ctr, NULL);
}

int fp_outbound_locked(struct fp *fp, const uint8_t *ip, size_t len, uint8_t *out, size_t cap,
                       struct fp_result *res, uint64_t now, struct fp_flowcache *fc)
{
    uint8_t dst[16];
    memset(res, 0, sizeof(*res));
    fp_ctr_add(&fp->gctr.rx_packets, 1);
    fp_ctr_add(&fp->gctr.rx_bytes, len);
    int family = len <= FP_MAX_INNER ? fp_ip_dst(ip, len, dst) : -1;
    if (family < 0)
        return drop(res, FP_DROP_MALFORMED, &fp->gctr, NULL);
    const struct fp_route *rt = fp_route_find(fp, family, dst);
    if (!rt)
        return drop(res, FP_DROP_NO_ROUTE, &fp->gctr, NULL);
    struct fp_peer *peer = fp->rules ? fp_rules_apply(fp, fc, rt, ip, len) : rt->peer;
    if (!peer)
        return drop(res, FP_DROP_OFFCLOUD_DOWN, &fp->gctr, NULL);
    if (peer->group) {
        /* Before anything that is the member's own: its path MTU, link, key, counters. */
        struct fp_peer *member = fp_group_resolve(peer, ip, len);
        if (!member) {
            res->peer_id = peer->id;
            return drop(res, FP_DROP_NO_MEMBER, &fp->gctr, &peer->ctr);
        }
        peer = member;
    }
    uint32_t mtu = inner_mtu(peer);
    if (mtu && len > mtu)
        return too_big_out(peer, ip, len, mtu, out, cap, res);
    if (mtu && fp_tcp_syn(ip, len) && cap >= len + FP_OVERHEAD) {
        /* Rare (a SYN): clamped on a copy where it is sealed in place. */
        uint8_t *copy = out + FP_HEADER_LEN;
        memmove(copy, ip, len);
        fp_mss_clamp(copy, len, mtu);
        return fp_seal_for_peer(fp, peer, copy, len, out, cap, res, now);
    }
    return fp_seal_for_peer(fp, peer, ip, len, out, cap, res, now);
}

int fp_inbound_locked(struct fp *fp, struct fp_link *link, uint32_t link_id,
                      const struct fp_addr *from, const uint8_t *pkt, size_t len, uint8_t *out,
                      size_t cap, struct fp_result *res, uint64_t now)
{
    const struct fp_config *cfg = &fp->cfg;
    /* Drops before a peer is known are counted on the link (or globally
     * when there is no such link, as in synchronous use). */
    struct fp_ctr *lc = link ? &link->ctr : &fp->gctr;
    memset(res, 0, sizeof(*res));
    res->link_id = link_id;
    if (link) {
        fp_ctr_add(&link->ctr.rx_packets, 1);
        fp_ctr_add(&link->ctr.rx_bytes, len);
    }
    if (len == 0)
        return drop(res, FP_DROP_MALFORMED, lc, NULL);
    if (pkt[0] != FP_TYPE_DATA) {
        if (len > FP_CTRL_MAX)
            return drop(res, FP_DROP_MALFORMED, lc, NULL);
        /* Known sources and unknown ones in lanes of their own; unknown ones pay their
         * source's and everyone's token bucket first (ctrlgate.c). */
        int lane = fp_ctrl_lane_for(fp, from, now);
        if (lane < 0)
            return drop(res, FP_DROP_CTRL_RATE_LIMITED, lc, NULL);
        if (fp_ctrlq_push(&fp->cq, lane, FP_EV_PACKET, link_id, 0, from, pkt, len) < 0) {
            fp_ctrl_lane_full(fp, lane);
            return drop(res, lane == FP_LANE_KNOWN ? FP_DROP_QUEUE_FULL
                                                   : FP_DROP_CTRL_UNKNOWN_FULL,
                        lc, NULL);
        }
        res->verdict = FP_V_CONTROL;
        return 0;
    }
    uint32_t index;
    uint64_t ctr;
    if (fp_hdr_parse(pkt, len, &index, &ctr) < 0)
        return drop(res, FP_DROP_MALFORMED, lc, NULL);
    struct fp_key *k = fp_index_find(fp, index);
    if (!k)
        return drop(res, FP_DROP_UNKNOWN_INDEX, lc, NULL);
    struct fp_peer *peer = k->peer;
    res->peer_id = peer->id;
    size_t plen = len - FP_OVERHEAD;
    if (cap < plen + (cfg->relay ? FP_OVERHEAD : 0))
        return -ENOSPC;
    /* A key installed after `now` was read (by another thread) has age 0. */
    uint64_t age = now > k->created_ns ? now - k->created_ns : 0;
    if (age >= key_limit_ns(&k->reject_after_s, cfg->reject_after_seconds) ||
        ctr >= cfg->reject_after_packets)
        return drop(res, FP_DROP_KEY_EXPIRED, lc, &peer->ctr);

    uint8_t iv[12];
    fp_nonce(iv, ctr);
    pthread_mutex_lock(&k->rx_lock);
    if (!fp_replay_check(&k->replay, ctr)) {
        pthread_mutex_unlock(&k->rx_lock);
        return drop(res, FP_DROP_REPLAY, lc, &peer->ctr);
    }
    if (fp_aead_open(k->rx_ctx, iv, pkt, FP_HEADER_LEN, pkt + FP_HEADER_LEN, plen,
                     pkt + FP_HEADER_LEN + plen, out) < 0) {
        pthread_mutex_unlock(&k->rx_lock);
        return drop(res, FP_DROP_BAD_TAG, lc, &peer->ctr);
    }
    bool fresh = fp_replay_update(&k->replay, ctr);
    pthread_mutex_unlock(&k->rx_lock);
    if (!fresh)
        return drop(res, FP_DROP_REPLAY, lc, &peer->ctr);

    fp_ctr_add(&peer->ctr.rx_packets, 1);
    fp_ctr_add(&peer->ctr.rx_bytes, plen);
    fp_ctr_set(&peer->ctr.last_rx_ns, now);
    note_received(fp, peer, is_data(out, plen) ? plen : 0, now);
    /* Roaming: an authenticated packet proves where the peer is now on this
     * link (a NAT rebinding). Which links the peer is reached over is
     * Python's choice, so a packet never adds a link or moves the peer to
     * another: on a link without an endpoint it is only counted. */
    pthread_mutex_lock(&peer->ep_lock);
    int slot = fp_peer_ep_slot(peer, link_id);
    if (slot >= 0) {
        struct fp_peer_ep *e = &peer->ep[slot];
        if (from && !fp_addr_equal(&e->addr, from)) {
            e->addr = *from;
            fp_addr_normalize(&e->addr);
            fp_ep_changed(fp);
        }
        e->rx_packets++;
        e->rx_bytes += plen;
    } else {
        peer->rx_unlisted++;
    }
    pthread_mutex_unlock(&peer->ep_lock);
    if (plen == 0) {
        res->verdict = FP_V_KEEPALIVE;
        return 0;
    }
    if (out[0] >> 4 == FP_PROBE >> 4)
        return probe_in(fp, peer, link_id, from, out, plen, len, cap, res, now);
    uint8_t dst[16];
    int family = fp_ip_dst(out, plen, dst);
    if (family < 0)
        return drop(res, FP_DROP_MALFORMED, &peer->ctr, NULL);
    if (cfg->check_source) {
        /* Like a reverse-path filter: a peer may only speak for its own
         * prefixes, so one site cannot pose as another through the relay. */
        uint8_t src[16];
        int sfam = fp_ip_src(out, plen, src);
        struct fp_peer *back = sfam == family ? fp_route_lookup(fp, sfam, src) : NULL;
        /* Routed back to a group: each member speaks for the group's prefixes. */
        if (!back || (back != peer && !fp_group_has(back, peer)))
            return drop(res, FP_DROP_SPOOFED, &peer->ctr, NULL);
    }
    /* The allowed sources (sources.c): a table apart from the routes, so a site's
     * prefixes stay accepted from its peer whichever transport routes them now. Counted
     * on the link too, which socketctl status shows. */
    if (peer->source_owner && !fp_source_allowed(fp, peer->source_owner, family, out, plen))
        return drop(res, FP_DROP_SPOOFED, lc, &peer->ctr);
    if (cfg->relay) {
        struct fp_peer *to = fp_route_lookup(fp, family, dst);
        if (to && to->group) {
            struct fp_peer *member = fp_group_resolve(to, out, plen);
            if (!member) {
                res->peer_id = to->id;
                return drop(res, FP_DROP_NO_MEMBER, &to->ctr, NULL);
            }
            to = member;
        }
        if (to == peer)
            return drop(res, FP_DROP_NO_ROUTE, &peer->ctr, NULL);
        if (to) {
            uint32_t mtu = inner_mtu(to);
            if (mtu && plen > mtu)
                return too_big_relay(fp, peer, to, out, plen, mtu, cap, res, now);
            /* Rare path (the PoP): make room for the header in place. */
            memmove(out + FP_HEADER_LEN, out, plen);
            mtu = min_mtu(mtu, inner_mtu(peer));
            if (mtu)
                fp_mss_clamp(out + FP_HEADER_LEN, plen, mtu);
            return fp_seal_for_peer(fp, to, out + FP_HEADER_LEN, plen, out, cap, res, now);
        }
    }
    /* What our LAN host sends back must fit the path to this peer too. */
    uint32_t mtu = inner_mtu(peer);
    if (mtu)
        fp_mss_clamp(out, plen, mtu);
    res->verdict = FP_V_TUN;
    res->out_len = (uint32_t)plen;
    return 0;
}

int fp_process_outbound(fp_t *fp, const uint8_t *ip, size_t len,
                        uint8_t *out, size_t cap, struct fp_result *res)
{
    if (!res || (!ip && len) || !out)
        return -EINVAL;
    pthread_rwlock_rdlock(&fp->lock);
    pthread_mutex_lock(&fp->sync_fc_lock);
    int rc = fp_outbound_locked(fp, ip, len, out, cap, res, fp_now_ns(), fp->sync_fc);
    pthread_mutex_unlock(&fp->sync_fc_lock);
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}

int fp_process_inbound(fp_t *fp, uint32_t link_id, const struct fp_addr *from,
                       const uint8_t *pkt, size_t len,
                       uint8_t *out, size_t cap, struct fp_result *res)
{
    if (!res || (!pkt && len) || !out || (from && !fp_addr_valid(from)))
        return -EINVAL;
    pthread_rwlock_rdlock(&fp->lock);
    int rc = fp_inbound_locked(fp, fp_link_find(fp, link_id), link_id, from, pkt, len, out, cap,
                               res, fp_now_ns());
    pthread_rwlock_unlock(&fp->lock);
    return rc;
}
