/*
 * replay.c - the receive replay window (RFC 6479 style): a ring of 64-bit
 * blocks indexed by counter, where moving the window forward only clears the
 * blocks it passes over. Check before decrypting (cheap rejection of
 * duplicates), update only after the tag verified so forged packets cannot
 * move the window.
 */
#include "fp_internal.h"

#include <string.h>

#define BLOCK_MASK (FP_REPLAY_BLOCKS - 1)

void fp_replay_init(struct fp_replay *r)
{
    memset(r, 0, sizeof(*r));
}

bool fp_replay_check(const struct fp_replay *r, uint64_t counter)
{
    if (counter > r->last)
        return true;
    if (r->last - counter >= FP_REPLAY_WINDOW)
        return false;
    return !(r->bitmap[(counter >> 6) & BLOCK_MASK] & (UINT64_C(1) << (counter & 63)));
}

bool fp_replay_update(struct fp_replay *r, uint64_t counter)
{
    uint64_t index = counter >> 6;
    uint64_t bit = UINT64_C(1) << (counter & 63);
    if (counter > r->last) {
        uint64_t cur = r->last >> 6;
        uint64_t diff = index - cur;
        if (diff > FP_REPLAY_BLOCKS)
            diff = FP_REPLAY_BLOCKS;
        for (uint64_t i = 1; i <= diff; i++)
            r->bitmap[(cur + i) & BLOCK_MASK] = 0;
        r->last = counter;
    } else if (r->last - counter >= FP_REPLAY_WINDOW) {
        return false;
    }
    uint64_t *b = &r->bitmap[index & BLOCK_MASK];
    if (*b & bit)
        return false;
    *b |= bit;
    return true;
}
