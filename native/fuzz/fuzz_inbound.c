/*
 * fuzz_inbound.c - libFuzzer target over fp_process_inbound.
 *
 * A fresh receiver (relay on, so the re-encrypt path is reachable too) with
 * two peers and installed keys per input. The first input byte picks a mode:
 *   0: the rest is one raw datagram (header parser, demux, control queue,
 *      unknown index, tag check, replay pre-check);
 *   1: a sequence of authenticated packets: each chunk is
 *      [len:1][counter:2][plaintext:len], sealed here with the peer's key so
 *      it passes the tag and reaches the replay window, the inner IP parser,
 *      routing and relay.
 * Both modes exercise the endpoint update and counters; with path MTUs set,
 * authenticated plaintexts also reach the MSS clamp and the probe/ack parser. Peers have endpoints
 * on several links (peer 2 with a weighted policy, so relayed packets take the
 * per-flow choice); bits 1-2 of the first byte pick the link the input
 * arrives on: one where peer 1 has an endpoint (roaming within it), or one
 * where it has none (delivered, moves nothing). Bits 3-4 pick peer 1's source owner
 * (unchecked, its site, any, another site): what it delivers must be allowed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpath.h"

static const uint8_t K_IN[FP_KEY_LEN] = {1, 2, 3, 4, 5, 6, 7, 8, 9};  /* peer 1 -> us */
static const uint8_t K_OUT[FP_KEY_LEN] = {9, 8, 7, 6, 5, 4, 3, 2, 1}; /* us -> peer 1 */
static const uint8_t K_P2[FP_KEY_LEN] = {42};

#define CHECK(x) do { if ((x) != 0) abort(); } while (0)

static struct fp_addr v4(uint8_t a, uint8_t b, uint8_t c, uint8_t d, uint16_t port)
{
    struct fp_addr x;
    memset(&x, 0, sizeof(x));
    x.family = 4;
    x.port = port;
    x.addr[0] = a; x.addr[1] = b; x.addr[2] = c; x.addr[3] = d;
    return x;
}

/* 2001:db8::/64 host x in its last byte, y in the /64's own last byte. */
static struct fp_addr v6_xy(uint8_t x, uint8_t y, uint16_t port)
{
    struct fp_addr a;
    memset(&a, 0, sizeof(a));
    a.family = 6;
    a.port = port;
    a.addr[0] = 0x20; a.addr[1] = 0x01; a.addr[2] = 0x0d; a.addr[3] = 0xb8;
    a.addr[7] = y;
    a.addr[15] = x;
    return a;
}

static struct fp_addr v6_from(uint8_t x, uint16_t port)
{
    return v6_xy(x, 0, port);
}

static fp_t *make_receiver(void)
{
    struct fp_config cfg;
    fp_t *fp;
    fp_config_default(&cfg);
    cfg.relay = 1;
    cfg.ctrl_queue_len = 8;
    CHECK(fp_new(&cfg, &fp));
    CHECK(fp_peer_add(fp, 1));
    CHECK(fp_peer_add(fp, 2));
    CHECK(fp_key_install(fp, 1, 20, K_OUT, K_IN));
    CHECK(fp_key_activate(fp, 1, 20, 10));
    CHECK(fp_key_install(fp, 2, 30, K_P2, K_P2));
    CHECK(fp_key_activate(fp, 2, 30, 40));
    struct fp_addr e1 = v4(192, 0, 2, 1, 4800), e2 = v4(192, 0, 2, 2, 4800);
    struct fp_addr e1b = v4(198, 51, 100, 1, 4800), e2b = v4(198, 51, 100, 2, 4800);
    CHECK(fp_peer_set_endpoint(fp, 1, 1, &e1));
    CHECK(fp_peer_set_endpoint(fp, 1, 2, &e1b));
    CHECK(fp_peer_set_endpoint(fp, 2, 1, &e2));
    CHECK(fp_peer_set_endpoint(fp, 2, 2, &e2b));
    CHECK(fp_peer_set_endpoint(fp, 2, 3, &e2b));
    struct fp_link_weight w[3] = {{1, 2}, {2, 1}, {3, 1}};
    CHECK(fp_peer_set_policy(fp, 2, w, 3));
    struct fp_addr n1 = v4(10, 1, 0, 0, 0), n2 = v4(10, 2, 0, 0, 0), n3 = v4(10, 2, 128, 0, 0);
    CHECK(fp_route_set(fp, &n1, 16, 1));
    CHECK(fp_route_set(fp, &n2, 16, 2));
    CHECK(fp_route_set(fp, &n3, 17, 1));
    struct fp_addr n6;
    memset(&n6, 0, sizeof(n6));
    n6.family = 6;
    n6.addr[0] = 0xfd;
    CHECK(fp_route_set(fp, &n6, 8, 2));
    /* Allowed sources: peer 1's owner is picked per input (source_owner below). */
    struct fp_source_op src[3];
    memset(src, 0, sizeof(src));
    src[0].prefix = v4(10, 1, 0, 0, 0);
    src[0].plen = 16;
    src[0].owner = 1;
    src[1].prefix = v4(10, 2, 0, 0, 0);
    src[1].plen = 16;
    src[1].owner = 2;
    src[2].prefix = n6;
    src[2].plen = 8;
    src[2].owner = 2;
    CHECK(fp_source_batch(fp, src, 3, NULL));
    /* Path MTUs: the clamp of relayed and delivered SYNs, probes and their acks. */
    CHECK(fp_peer_set_mtu(fp, 1, 1280));
    CHECK(fp_peer_set_mtu(fp, 2, 576));
    /* Known control sources besides the peers: a host on every port, an IPv6 endpoint. */
    struct fp_addr known[2] = {v4(203, 0, 113, 5, 0), v6_from(7, 4800)};
    CHECK(fp_ctrl_known_set(fp, known, 2));
    return fp;
}

/* Peer 1's source owner for this input: 0 (unchecked), site 1, FP_SOURCE_ANY or site 2. */
static uint32_t source_owner;

/* A plaintext delivered from peer 1 while it has an owner: its source is allowed. */
static void check_source(fp_t *fp, const struct fp_result *res, const uint8_t *ip)
{
    if (!source_owner || res->peer_id != 1 || res->verdict != FP_V_TUN || res->out_len < 20)
        return;
    struct fp_addr a;
    memset(&a, 0, sizeof(a));
    if (ip[0] >> 4 == 4) {
        a.family = 4;
        memcpy(a.addr, ip + 12, 4);
    } else {
        if (res->out_len < 40)
            abort();
        a.family = 6;
        memcpy(a.addr, ip + 8, 16);
    }
    uint32_t owner;
    if (fp_source_lookup(fp, &a, &owner) != 0 ||
        (source_owner != FP_SOURCE_ANY && owner != source_owner))
        abort();
}

static void deliver(fp_t *fp, uint32_t link, const uint8_t *pkt, size_t len)
{
    static uint8_t out[FP_MAX_INNER + 2 * FP_OVERHEAD];
    struct fp_result res;
    struct fp_ctrl_msg msg;
    /* Sources of every kind for the control gate: peers' endpoints and strangers over IPv4,
     * IPv6 addresses in and out of one /64, a host declared on every port. */
    struct fp_addr from;
    switch (len % 4) {
    case 0:
    case 1:
        from = v4(198, 51, 100, (uint8_t)len, 4800);
        break;
    case 2:
        from = v6_xy((uint8_t)len, (uint8_t)(len >> 4), 4800);
        break;
    default:
        from = v4(203, 0, 113, 5, (uint16_t)len);
        break;
    }
    int rc = fp_process_inbound(fp, link, &from, pkt, len, out, sizeof(out), &res);
    if (rc == 0 &&
        (res.verdict == FP_V_SEND || res.verdict == FP_V_TUN || res.verdict == FP_V_FRAGMENT) &&
        res.out_len > sizeof(out))
        abort();
    /* Relayed to peer 2: over one of its links, never link 0. */
    if (rc == 0 && res.verdict == FP_V_SEND && (res.link_id < 1 || res.link_id > 3))
        abort();
    if (rc == 0)
        check_source(fp, &res, out);
    struct fp_ctrl_stats st;
    fp_ctrl_stats(fp, &st);
    if (st.known_len > st.known_cap || st.unknown_len > st.unknown_cap ||
        st.sources > st.sources_cap)
        abort();
    while (fp_ctrl_recv_lane(fp, (uint32_t)len & 1, &msg) == 0)
        ;
    while (fp_ctrl_recv(fp, &msg) == 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t pkt[FP_MAX_INNER + FP_OVERHEAD];
    if (size < 1)
        return 0;
    fp_t *fp = make_receiver();
    uint32_t link = 1 + (uint32_t)(data[0] >> 1) % 3;
    static const uint32_t owners[4] = {0, 1, FP_SOURCE_ANY, 2};
    source_owner = owners[(data[0] >> 3) & 3];
    CHECK(fp_peer_set_source_owner(fp, 1, source_owner));
    if ((data[0] & 1) == 0) {
        deliver(fp, link, data + 1, size - 1);
    } else {
        size_t i = 1;
        while (i + 3 <= size) {
            size_t len = data[i];
            uint64_t ctr = (uint64_t)data[i + 1] << 8 | data[i + 2];
            i += 3;
            if (len > size - i)
                len = size - i;
            uint8_t iv[12] = {0};
            pkt[0] = FP_TYPE_DATA;
            pkt[1] = pkt[2] = pkt[3] = 0;
            pkt[4] = 0; pkt[5] = 0; pkt[6] = 0; pkt[7] = 20; /* our index for peer 1 */
            memset(pkt + 8, 0, 6);
            pkt[14] = iv[10] = (uint8_t)(ctr >> 8);
            pkt[15] = iv[11] = (uint8_t)ctr;
            CHECK(fp_test_aead(1, K_IN, iv, pkt, FP_HEADER_LEN, data + i, len,
                               pkt + FP_HEADER_LEN, pkt + FP_HEADER_LEN + len));
            deliver(fp, link, pkt, len + FP_OVERHEAD);
            i += len;
        }
    }
    fp_free(fp);
    return 0;
}
