/*
 * aead.c - AES-256-GCM through OpenSSL EVP, and the key objects that own the
 * contexts. A context is created once per key and direction with the key
 * schedule done at install; per packet only the nonce is set.
 */
#include "fp_internal.h"

#include <stdlib.h>
#include <errno.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

EVP_CIPHER_CTX *fp_aead_new(const uint8_t *key, int encrypt)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx)
        return NULL;
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL, encrypt) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

int fp_aead_seal(EVP_CIPHER_CTX *ctx, const uint8_t *iv, const uint8_t *aad, size_t aad_len,
                 const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag)
{
    int n = 0;
    int fin = 0;
    if (len > INT32_MAX || aad_len > INT32_MAX)
        return -1;
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1)
        return -1;
    if (aad_len && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1)
        return -1;
    n = 0;
    if (len && EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1)
        return -1;
    if (EVP_CipherFinal_ex(ctx, out + n, &fin) != 1)
        return -1;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, FP_TAG_LEN, tag) != 1)
        return -1;
    return 0;
}

int fp_aead_open(EVP_CIPHER_CTX *ctx, const uint8_t *iv, const uint8_t *aad, size_t aad_len,
                 const uint8_t *in, size_t len, const uint8_t *tag, uint8_t *out)
{
    int n = 0;
    int fin = 0;
    /* SET_TAG takes a non-const pointer; a copy keeps the input untouched. */
    uint8_t t[FP_TAG_LEN];
    if (len > INT32_MAX || aad_len > INT32_MAX)
        return -1;
    memcpy(t, tag, FP_TAG_LEN);
    if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1)
        return -1;
    if (aad_len && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1)
        return -1;
    n = 0;
    if (len && EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1)
        return -1;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, FP_TAG_LEN, t) != 1)
        return -1;
    if (EVP_CipherFinal_ex(ctx, out + n, &fin) != 1)
        return -1;
    return 0;
}

/* Why: on a virtual machine whose core was idle for a few milliseconds, the first
 * seal costs 10-20 us instead of 0.3 us (the EVP path's code and page-table
 * entries are gone from the core), and a sparse flow such as a ping or a voice
 * call pays that on every packet. A dummy seal+open every few ms of idleness
 * keeps them warm for about 1 us a time. */
struct fp_warm {
    EVP_CIPHER_CTX *seal;
    EVP_CIPHER_CTX *open;
    uint64_t ctr;                 /* nonce: never repeats under this key */
    uint8_t buf[128];
    uint8_t out[128];
    uint8_t tag[FP_TAG_LEN];
};

struct fp_warm *fp_warm_new(void)
{
    uint8_t key[32];
    struct fp_warm *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    if (RAND_bytes(key, sizeof(key)) == 1) {
        w->seal = fp_aead_new(key, 1);
        w->open = fp_aead_new(key, 0);
    }
    OPENSSL_cleanse(key, sizeof(key));
    if (!w->seal || !w->open) {
        fp_warm_free(w);
        return NULL;
    }
    return w;
}

void fp_warm_run(struct fp_warm *w)
{
    uint8_t iv[12];
    if (!w)
        return;
    fp_nonce(iv, w->ctr++);
    if (fp_aead_seal(w->seal, iv, w->buf, FP_HEADER_LEN, w->buf + FP_HEADER_LEN, 64, w->out,
                     w->tag) == 0)
        (void)fp_aead_open(w->open, iv, w->buf, FP_HEADER_LEN, w->out, 64, w->tag,
                           w->buf + FP_HEADER_LEN);
}

void fp_warm_free(struct fp_warm *w)
{
    if (!w)
        return;
    EVP_CIPHER_CTX_free(w->seal);
    EVP_CIPHER_CTX_free(w->open);
    free(w);
}

int fp_warm_timeout(const struct fp *fp, const struct fp_warm *w, uint64_t last_data_ns)
{
    if (!w || !fp->cfg.warm_ms)
        return -1;
    /* Keepalives alone do not count: with hundreds of mesh peers they arrive all the time,
     * and an idle box would then warm forever for no flow at all. */
    if (fp->cfg.warm_for_ms &&
        fp_now_ns() - last_data_ns > (uint64_t)fp->cfg.warm_for_ms * 1000000u)
        return -1;
    return (int)fp->cfg.warm_ms;
}

struct fp_key *fp_key_new(const uint8_t *tx_key, const uint8_t *rx_key, uint64_t now)
{
    struct fp_key *k = calloc(1, sizeof(*k));
    if (!k)
        return NULL;
    k->tx_ctx = fp_aead_new(tx_key, 1);
    k->rx_ctx = fp_aead_new(rx_key, 0);
    if (!k->tx_ctx || !k->rx_ctx) {
        EVP_CIPHER_CTX_free(k->tx_ctx);
        EVP_CIPHER_CTX_free(k->rx_ctx);
        free(k);
        return NULL;
    }
    pthread_mutex_init(&k->tx_lock, NULL);
    pthread_mutex_init(&k->rx_lock, NULL);
    atomic_init(&k->tx_counter, 0);
    atomic_init(&k->rekey_sent, 0);
    atomic_init(&k->expired_sent, 0);
    k->created_ns = now;
    fp_replay_init(&k->replay);
    return k;
}

void fp_key_free(struct fp_key *k)
{
    if (!k)
        return;
    EVP_CIPHER_CTX_free(k->tx_ctx);
    EVP_CIPHER_CTX_free(k->rx_ctx);
    pthread_mutex_destroy(&k->tx_lock);
    pthread_mutex_destroy(&k->rx_lock);
    /* Key material lives inside the EVP contexts, which OpenSSL cleanses. */
    free(k);
}

int fp_test_aead(int encrypt, const uint8_t *key, const uint8_t *iv, const uint8_t *aad,
                 size_t aad_len, const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag)
{
    EVP_CIPHER_CTX *ctx = fp_aead_new(key, encrypt ? 1 : 0);
    int rc;
    if (!ctx)
        return -ENOMEM;
    if (encrypt)
        rc = fp_aead_seal(ctx, iv, aad, aad_len, in, len, out, tag);
    else
        rc = fp_aead_open(ctx, iv, aad, aad_len, in, len, tag, out);
    EVP_CIPHER_CTX_free(ctx);
    return rc == 0 ? 0 : -EBADMSG;
}
