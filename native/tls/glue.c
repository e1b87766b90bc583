/* See glue.h. */
#define _DEFAULT_SOURCE
#include "glue.h"

#include <errno.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <openssl/pem.h>
#include <openssl/x509v3.h>

static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

X509 *sdwan_x509_from_pem(const unsigned char *pem, int len)
{
    BIO *bio = BIO_new_mem_buf(pem, len);
    if (bio == NULL)
        return NULL;
    X509 *cert = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    return cert;
}

EVP_PKEY *sdwan_pkey_from_pem(const unsigned char *pem, int len)
{
    BIO *bio = BIO_new_mem_buf(pem, len);
    if (bio == NULL)
        return NULL;
    EVP_PKEY *key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    return key;
}

int sdwan_pkey_is_p256(const EVP_PKEY *key)
{
    char group[64];
    size_t len = 0;
    if (EVP_PKEY_get_base_id(key) != EVP_PKEY_EC)
        return 0;
    if (EVP_PKEY_get_group_name(key, group, sizeof group, &len) != 1)
        return 0;
    return strcmp(group, "prime256v1") == 0;
}

int sdwan_x509_san_uris(X509 *cert, char *out, int cap)
{
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    if (names == NULL)
        return -ENOENT;
    int used = 0, rc = 0;
    for (int i = 0; i < sk_GENERAL_NAME_num(names) && rc == 0; i++) {
        const GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
        if (name->type != GEN_URI)
            continue;
        const ASN1_IA5STRING *uri = name->d.uniformResourceIdentifier;
        int n = ASN1_STRING_length(uri);
        const unsigned char *data = ASN1_STRING_get0_data(uri);
        if (memchr(data, '\0', (size_t)n) != NULL || memchr(data, '\n', (size_t)n) != NULL)
            rc = -EINVAL;
        else if (n + 1 > cap - used)
            rc = -ENOSPC;
        else {
            memcpy(out + used, data, (size_t)n);
            used += n;
            out[used++] = '\n';
        }
    }
    GENERAL_NAMES_free(names);
    return rc != 0 ? rc : used;
}

int sdwan_x509_serial(X509 *cert, unsigned char *out, int cap)
{
    const ASN1_INTEGER *serial = X509_get0_serialNumber(cert);
    if (serial == NULL || ASN1_STRING_type(serial) != V_ASN1_INTEGER)
        return -EINVAL;
    int n = ASN1_STRING_length(serial);
    if (n > cap)
        return -ENOSPC;
    memcpy(out, ASN1_STRING_get0_data(serial), (size_t)n);
    return n;
}

static int asn1_time_epoch(const ASN1_TIME *t, long long *out)
{
    struct tm tm;
    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1)
        return -EINVAL;
    time_t secs = timegm(&tm);
    if (secs == (time_t)-1)
        return -EINVAL;
    *out = (long long)secs;
    return 0;
}

int sdwan_x509_validity(const X509 *cert, long long *not_before, long long *not_after)
{
    if (asn1_time_epoch(X509_get0_notBefore(cert), not_before) != 0 ||
        asn1_time_epoch(X509_get0_notAfter(cert), not_after) != 0)
        return -EINVAL;
    return 0;
}

SSL *sdwan_ssl_of_store(X509_STORE_CTX *store)
{
    return X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
}

long long sdwan_dtls_timeout_us(SSL *ssl)
{
    struct timeval tv;
    if (DTLSv1_get_timeout(ssl, &tv) != 1)
        return -1;
    return (long long)tv.tv_sec * 1000000 + tv.tv_usec;
}
