/* The few things the DTLS binding (sdwan.bindings._tls) needs that OpenSSL offers only as
 * macros over unions or as callbacks, in plain functions cffi can declare.
 * Everything else is OpenSSL's own API, declared in native/build_tls.py. */
#ifndef SDWAN_TLS_GLUE_H
#define SDWAN_TLS_GLUE_H

#include <openssl/ssl.h>
#include <openssl/x509.h>

/* PEM from memory. A key that asks for a passphrase fails instead of prompting on
 * the console (OpenSSL's default with a NULL callback). NULL on any error. */
X509 *sdwan_x509_from_pem(const unsigned char *pem, int len);
EVP_PKEY *sdwan_pkey_from_pem(const unsigned char *pem, int len);

/* 1 if key is an EC key on P-256, else 0. */
int sdwan_pkey_is_p256(const EVP_PKEY *key);

/* The URIs of the certificate's subjectAltName, each followed by '\n', into out.
 * Returns the length written, -ENOENT without a subjectAltName, -ENOSPC if out is
 * too small, -EINVAL for a URI holding a NUL or newline (never a valid name). */
int sdwan_x509_san_uris(X509 *cert, char *out, int cap);

/* The certificate's serial number, big-endian without sign, into out: the length
 * written, -ENOSPC if out is too small, -EINVAL for a negative or missing serial
 * (never one of the account CA's; revocation lists name serials). */
int sdwan_x509_serial(X509 *cert, unsigned char *out, int cap);
/* The certificate's notBefore and notAfter as seconds since the epoch (UTC).
 * 0, or -EINVAL if either field cannot be read. */
int sdwan_x509_validity(const X509 *cert, long long *not_before, long long *not_after);

/* The SSL connection a verify callback's store context belongs to. */
SSL *sdwan_ssl_of_store(X509_STORE_CTX *store);

/* DTLSv1_get_timeout as microseconds: -1 if no timer runs. */
long long sdwan_dtls_timeout_us(SSL *ssl);

#endif
