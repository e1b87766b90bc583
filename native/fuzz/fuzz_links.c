/*
 * fuzz_links.c - libFuzzer target over the calls that change a peer's links
 * and the prefix table: fp_peer_set_endpoint / fp_peer_del_endpoint /
 * fp_peer_set_policy / fp_route_batch / fp_group_set / fp_group_del,
 * interleaved with packets both ways.
 *
 * The input is a sequence of commands, each [op:1][args...] (short inputs end
 * the sequence). A fresh instance (relay on) with peers 1 and 2 per input; id 3
 * is the peer group the input may make of them. Besides the sanitizers it
 * checks the promises of fastpath.h:
 *   - a packet is only ever sent to an endpoint the peer has, on its link, and
 *     to a peer, never to the group (dropped as no_member when it has none);
 *   - a group holds what the last accepted fp_group_set gave it;
 *   - the same packet twice, with nothing changed between, takes the same link;
 *   - an inbound packet never adds, removes or moves a link of a peer;
 *   - a rejected fp_route_batch changes no lookup of any prefix it named,
 *     and reports an index inside the batch.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpath.h"

static const uint8_t K_IN[FP_KEY_LEN] = {1, 2, 3, 4, 5, 6, 7, 8, 9};  /* peer 1 -> us */
static const uint8_t K_OUT[FP_KEY_LEN] = {9, 8, 7, 6, 5, 4, 3, 2, 1}; /* us -> peer 1 */
static const uint8_t K_P2[FP_KEY_LEN] = {42};

#define CHECK(x) do { if (!(x)) abort(); } while (0)
#define MAX_OPS 64

struct input {
    const uint8_t *p;
    size_t left;
};

static int take(struct input *in, void *out, size_t n)
{
    if (in->left < n)
        return -1;
    memcpy(out, in->p, n);
    in->p += n;
    in->left -= n;
    return 0;
}

static fp_t *make(void)
{
    struct fp_config cfg;
    fp_t *fp;
    fp_config_default(&cfg);
    cfg.relay = 1;
    cfg.ctrl_queue_len = 8;
    CHECK(fp_new(&cfg, &fp) == 0);
    CHECK(fp_peer_add(fp, 1) == 0 && fp_peer_add(fp, 2) == 0);
    CHECK(fp_key_install(fp, 1, 20, K_OUT, K_IN) == 0);
    CHECK(fp_key_activate(fp, 1, 20, 10) == 0);
    CHECK(fp_key_install(fp, 2, 30, K_P2, K_P2) == 0);
    CHECK(fp_key_activate(fp, 2, 30, 40) == 0);
    return fp;
}

static void read_addr(struct input *in, struct fp_addr *a)
{
    uint8_t b[3] = {0};
    memset(a, 0, sizeof(*a));
    take(in, b, 3);
    a->family = b[0] & 1 ? 6 : 4;
    a->port = (uint16_t)(b[1] << 8 | b[2]);
    take(in, a->addr, a->family == 4 ? 4 : 16);
}

/* An inner IPv4/IPv6 packet whose addresses, protocol and ports come from the
 * input; its destination is inside one of the routed prefixes often enough. */
static size_t read_packet(struct input *in, uint8_t *pkt, size_t cap)
{
    uint8_t b[12] = {0};
    take(in, b, sizeof(b));
    size_t len = 40 + (b[0] & 63);
    if (len > cap)
        len = cap;
    memset(pkt, 0, len);
    if (b[1] & 1) {
        pkt[0] = 0x60;
        pkt[4] = 0;
        pkt[5] = (uint8_t)(len - 40);
        pkt[6] = b[2];
        pkt[8] = 0xfd;
        memcpy(pkt + 9, b + 3, 4);
        pkt[24] = 0xfd;
        memcpy(pkt + 25, b + 7, 4);
    } else {
        pkt[0] = 0x45;
        pkt[3] = (uint8_t)len;
        pkt[6] = b[2] & 0x3f;   /* sometimes a fragment */
        pkt[9] = b[3];
        pkt[12] = 10;
        memcpy(pkt + 13, b + 4, 3);
        pkt[16] = 10;
        memcpy(pkt + 17, b + 7, 3);
    }
    memcpy(pkt + (pkt[0] == 0x45 ? 20 : 40), b + 10, 2);
    return len;
}

static void links_of(fp_t *fp, uint32_t peer, struct fp_peer_links *l)
{
    CHECK(fp_peer_endpoints(fp, peer, l) == 0);
    CHECK(l->n_endpoints <= FP_PEER_ENDPOINTS && l->n_policy <= FP_PEER_ENDPOINTS);
}

static int has_link(const struct fp_peer_links *l, uint32_t link, const struct fp_addr *to)
{
    for (uint32_t i = 0; i < l->n_endpoints; i++)
        if (l->ep[i].link_id == link &&
            (!to || (to->family == l->ep[i].addr.family && to->port == l->ep[i].addr.port &&
                     memcmp(to->addr, l->ep[i].addr.addr, 16) == 0)))
            return 1;
    return 0;
}

/* Who a prefix's first address routes to, as the data path sees it: a peer
 * id, 0 for none. */
static uint32_t lookup(fp_t *fp, const struct fp_addr *a)
{
    uint8_t pkt[40], out[40 + FP_OVERHEAD];
    struct fp_result res;
    memset(pkt, 0, sizeof(pkt));
    if (a->family == 4) {
        pkt[0] = 0x45;
        pkt[3] = 20;
        memcpy(pkt + 16, a->addr, 4);
    } else {
        pkt[0] = 0x60;
        memcpy(pkt + 24, a->addr, 16);
    }
    CHECK(fp_process_outbound(fp, pkt, a->family == 4 ? 20 : 40, out, sizeof(out), &res) == 0);
    if (res.verdict == FP_V_DROP && res.drop_reason == FP_DROP_NO_ROUTE)
        return 0;
    return res.peer_id;
}

static void route_batch(fp_t *fp, struct input *in)
{
    static struct fp_route_op ops[MAX_OPS];
    uint32_t before[MAX_OPS];
    uint8_t n = 0;
    take(in, &n, 1);
    n %= MAX_OPS;
    for (size_t i = 0; i < n; i++) {
        uint8_t b[3] = {0};
        take(in, b, 3);
        memset(&ops[i], 0, sizeof(ops[i]));
        ops[i].verb = b[0] & 0x80 ? b[0] : b[0] & 1;  /* now and then a bad verb */
        ops[i].plen = b[1];
        ops[i].peer_id = b[2] % 4;                  /* 0 does not exist, 3 is the group */
        read_addr(in, &ops[i].prefix);
        if (b[0] & 0x40)
            ops[i].prefix.family = b[2];            /* and a bad family */
    }
    for (size_t i = 0; i < n; i++)
        before[i] = ops[i].prefix.family == 4 || ops[i].prefix.family == 6
                        ? lookup(fp, &ops[i].prefix) : 0;
    size_t bad = SIZE_MAX;
    int rc = fp_route_batch(fp, ops, n, &bad);
    CHECK(rc == 0 || rc == -EINVAL || rc == -ENOENT);
    if (rc == 0)
        return;
    CHECK(bad < n);
    for (size_t i = 0; i < n; i++)
        if (ops[i].prefix.family == 4 || ops[i].prefix.family == 6)
            CHECK(lookup(fp, &ops[i].prefix) == before[i]);
}

/* Group 3 of the input's members (ids 0..3: 0 is no peer, 3 the group itself), or
 * deleted. */
static void group(fp_t *fp, struct input *in, int del)
{
    struct fp_group_member got[FP_GROUP_MEMBERS];
    if (del) {
        int rc = fp_group_del(fp, 3);
        CHECK(rc == 0 || rc == -ENOENT);
        CHECK(fp_group_members(fp, 3, got, FP_GROUP_MEMBERS) == -ENOENT);
        return;
    }
    struct fp_peer_weight m[FP_GROUP_MEMBERS + 2];
    uint8_t n = 0;
    take(in, &n, 1);
    n %= FP_GROUP_MEMBERS + 2;
    memset(m, 0, sizeof(m));
    for (size_t i = 0; i < n; i++) {
        uint8_t b[2] = {0};
        take(in, b, 2);
        m[i].peer_id = b[0] % 4;
        m[i].weight = b[1];
    }
    int before = fp_group_members(fp, 3, got, FP_GROUP_MEMBERS);
    int rc = fp_group_set(fp, 3, m, n);
    CHECK(rc == 0 || rc == -EINVAL || rc == -ENOENT);
    int after = fp_group_members(fp, 3, got, FP_GROUP_MEMBERS);
    if (rc < 0) {
        CHECK(after == before);
        return;
    }
    CHECK(after == n);
    for (size_t i = 0; i < n; i++)
        CHECK(got[i].peer_id == m[i].peer_id && got[i].weight == m[i].weight);
}

static void outbound(fp_t *fp, struct input *in)
{
    static uint8_t pkt[128], out[128 + FP_OVERHEAD];
    struct fp_result r1, r2;
    struct fp_peer_links l;
    size_t len = read_packet(in, pkt, sizeof(pkt));
    CHECK(fp_process_outbound(fp, pkt, len, out, sizeof(out), &r1) == 0);
    CHECK(fp_process_outbound(fp, pkt, len, out, sizeof(out), &r2) == 0);
    CHECK(r1.verdict == r2.verdict);
    if (r1.verdict == FP_V_DROP && r1.drop_reason == FP_DROP_NO_MEMBER)
        CHECK(r1.peer_id == 3);
    if (r1.verdict != FP_V_SEND)
        return;
    CHECK(r1.link_id == r2.link_id && r1.peer_id == r2.peer_id);
    CHECK(r1.peer_id == 1 || r1.peer_id == 2);
    links_of(fp, r1.peer_id, &l);
    CHECK(has_link(&l, r1.link_id, &r1.to));
}

/* An authenticated packet from peer 1 on a link and source from the input. */
static void inbound(fp_t *fp, struct input *in, uint16_t *ctr)
{
    static uint8_t plain[128], pkt[128 + FP_OVERHEAD], out[128 + 2 * FP_OVERHEAD];
    uint8_t link = 0;
    take(in, &link, 1);
    struct fp_addr from;
    read_addr(in, &from);
    size_t len = read_packet(in, plain, sizeof(plain));
    uint8_t iv[12] = {0};
    uint16_t c = ++*ctr;
    memset(pkt, 0, FP_HEADER_LEN);
    pkt[0] = FP_TYPE_DATA;
    pkt[7] = 20;
    pkt[14] = iv[10] = (uint8_t)(c >> 8);
    pkt[15] = iv[11] = (uint8_t)c;
    CHECK(fp_test_aead(1, K_IN, iv, pkt, FP_HEADER_LEN, plain, len, pkt + FP_HEADER_LEN,
                       pkt + FP_HEADER_LEN + len) == 0);
    struct fp_peer_links b1, b2, a1, a2;
    links_of(fp, 1, &b1);
    links_of(fp, 2, &b2);
    struct fp_result res;
    CHECK(fp_process_inbound(fp, link % 4, &from, pkt, len + FP_OVERHEAD, out, sizeof(out),
                             &res) == 0);
    struct fp_ctrl_msg msg;
    while (fp_ctrl_recv(fp, &msg) == 0)
        ;
    links_of(fp, 1, &a1);
    links_of(fp, 2, &a2);
    CHECK(a1.n_endpoints == b1.n_endpoints && a2.n_endpoints == b2.n_endpoints);
    for (uint32_t i = 0; i < b1.n_endpoints; i++)
        CHECK(has_link(&a1, b1.ep[i].link_id, NULL));
    for (uint32_t i = 0; i < b2.n_endpoints; i++)
        CHECK(has_link(&a2, b2.ep[i].link_id, &b2.ep[i].addr));
    if (res.verdict == FP_V_SEND) {
        CHECK(res.peer_id == 2);
        CHECK(has_link(&a2, res.link_id, &res.to));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    fp_t *fp = make();
    uint16_t ctr = 0;
    uint8_t op;
    while (take(&in, &op, 1) == 0) {
        uint32_t peer = 1 + (op >> 7), link = (op >> 3) & 15;
        switch (op & 7) {
        case 0: {
            struct fp_addr a;
            read_addr(&in, &a);
            int rc = fp_peer_set_endpoint(fp, peer, link, &a);
            CHECK(rc == 0 || rc == -ENOSPC);
            break;
        }
        case 1: {
            int rc = fp_peer_del_endpoint(fp, peer, link);
            CHECK(rc == 0 || rc == -ENOTCONN);
            break;
        }
        case 2: {
            struct fp_link_weight w[FP_PEER_ENDPOINTS + 2];
            uint8_t n = 0;
            take(&in, &n, 1);
            n %= FP_PEER_ENDPOINTS + 2;
            memset(w, 0, sizeof(w));
            for (size_t i = 0; i < n; i++) {
                uint8_t b[2] = {0};
                take(&in, b, 2);
                w[i].link_id = b[0] & 15;
                w[i].weight = b[1];
            }
            int rc = fp_peer_set_policy(fp, peer, w, n);
            CHECK(rc == 0 || rc == -EINVAL);
            break;
        }
        case 3:
            route_batch(fp, &in);
            break;
        case 4:
            outbound(fp, &in);
            break;
        case 5:
            group(fp, &in, (op >> 3) & 1);
            break;
        default:
            inbound(fp, &in, &ctr);
            break;
        }
    }
    fp_free(fp);
    return 0;
}
