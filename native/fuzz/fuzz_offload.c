/*
 * fuzz_offload.c - libFuzzer target over the TUN offload code: the
 * virtio_net_hdr / GSO segmenter and the TCP coalescer.
 *
 * The input is a 10-byte virtio_net_hdr followed by a packet. The packet is
 * segmented as the TUN thread would (fp_test_gso_segment); whatever segments
 * come out, and the raw input cut into pieces, are then coalesced as a link
 * thread would before writing to the TUN (fp_test_gro_coalesce). Every
 * superpacket the coalescer builds must segment again into exactly the
 * packets it was built from, byte for byte.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastpath.h"

#define MAX_SEGS 64
#define CAP (1u << 20)

static uint8_t segs[CAP];
static uint8_t coal[CAP + 64 * FP_VNET_HDR_LEN];
static uint8_t again[CAP];
static uint32_t lens[MAX_SEGS];
static uint32_t out_lens[MAX_SEGS * 2];
static uint32_t again_lens[MAX_SEGS];

/* Mark the first unused input packet equal to pkt; abort if there is none. */
static void take(const uint8_t *pkts, const uint32_t *plens, uint32_t n, bool *used,
                 const uint8_t *pkt, uint32_t len)
{
    size_t off = 0;
    for (uint32_t k = 0; k < n; off += plens[k], k++) {
        if (!used[k] && plens[k] == len && memcmp(pkts + off, pkt, len) == 0) {
            used[k] = true;
            return;
        }
    }
    abort();
}

/* Every output, cut again where it is a superpacket, must give back the input
 * packets exactly, each once (groups of different flows may be written in
 * another order than their packets came in; the unit tests check the order). */
static void roundtrip(const uint8_t *pkts, const uint32_t *plens, uint32_t n)
{
    bool used[MAX_SEGS] = {false};
    int k = fp_test_gro_coalesce(pkts, plens, n, coal, sizeof(coal), out_lens, MAX_SEGS * 2);
    if (k < 0)
        abort(); /* room was given for every input packet */
    size_t off = 0;
    for (int i = 0; i < k; i++) {
        const uint8_t *o = coal + off;
        uint32_t len = out_lens[i];
        if (len < FP_VNET_HDR_LEN)
            abort();
        if (o[1] == 0) {
            take(pkts, plens, n, used, o + FP_VNET_HDR_LEN, len - FP_VNET_HDR_LEN);
        } else {
            int m = fp_test_gso_segment(o, o + FP_VNET_HDR_LEN, len - FP_VNET_HDR_LEN, again,
                                        sizeof(again), again_lens, MAX_SEGS);
            if (m < 2)
                abort();
            size_t a = 0;
            for (int j = 0; j < m; j++) {
                take(pkts, plens, n, used, again + a, again_lens[j]);
                a += again_lens[j];
            }
        }
        off += len;
    }
    for (uint32_t i = 0; i < n; i++)
        if (!used[i])
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < FP_VNET_HDR_LEN)
        return 0;
    int n = fp_test_gso_segment(data, data + FP_VNET_HDR_LEN, size - FP_VNET_HDR_LEN, segs,
                                sizeof(segs), lens, MAX_SEGS);
    if (n > 0) {
        size_t total = 0;
        for (int i = 0; i < n; i++)
            total += lens[i];
        if (total > sizeof(segs))
            abort();
        roundtrip(segs, lens, (uint32_t)n);
    }
    /* The raw bytes as a run of packets too: lengths from the header bytes. */
    const uint8_t *p = data + FP_VNET_HDR_LEN;
    size_t left = size - FP_VNET_HDR_LEN;
    uint32_t cnt = 0;
    uint32_t plens[8];
    for (int i = 0; i < 8 && left; i++) {
        uint32_t l = (uint32_t)data[i] * 8 + 20;
        if (l > left)
            l = (uint32_t)left;
        plens[cnt++] = l;
        left -= l;
    }
    if (cnt)
        roundtrip(p, plens, cnt);
    return 0;
}
