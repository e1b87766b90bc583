"""cffi build of `sdwan.bindings._tls`: the system libssl's DTLS, for socketd's and popd's
handshakes.

Owns which parts of OpenSSL's API the supervisor uses and how they are declared. The fast path
already links the system libcrypto, and Python's own ssl module (which asyncio imports) already
maps the system libssl, so binding these costs socketd almost no memory; pyOpenSSL would have
loaded a second, bundled OpenSSL of about 11 MB resident. sdwan/bindings/tls.py is the typed
wrapper.

    python native/build_tls.py [--inplace DIR]     # development build into DIR/sdwan/bindings/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODULE = "sdwan.bindings._tls"
GLUE = HERE / "tls" / "glue.h"
WARNINGS = ["-std=c11", "-Wall", "-Wextra", "-Werror"]

CDEF = """
typedef ... SSL_CTX;
typedef ... SSL;
typedef ... SSL_METHOD;
typedef ... BIO;
typedef ... BIO_METHOD;
typedef ... BIO_ADDR;
typedef ... X509;
typedef ... X509_STORE;
typedef ... X509_STORE_CTX;
typedef ... EVP_PKEY;

#define SSL_ERROR_NONE ...
#define SSL_ERROR_SSL ...
#define SSL_ERROR_WANT_READ ...
#define SSL_ERROR_WANT_WRITE ...
#define SSL_ERROR_SYSCALL ...
#define SSL_ERROR_ZERO_RETURN ...
#define SSL_VERIFY_PEER ...
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT ...
#define SSL_SESS_CACHE_OFF ...
#define DTLS1_2_VERSION ...
#define DTLS1_COOKIE_LENGTH ...
static const uint64_t SSL_OP_NO_QUERY_MTU;
static const uint64_t SSL_OP_NO_TICKET;
static const uint64_t SSL_OP_NO_COMPRESSION;
static const uint64_t SSL_OP_CIPHER_SERVER_PREFERENCE;
static const uint64_t SSL_OP_NO_RENEGOTIATION;
static const uint64_t SSL_OP_COOKIE_EXCHANGE;

const SSL_METHOD *DTLS_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *);
void SSL_CTX_free(SSL_CTX *);
long SSL_CTX_set_min_proto_version(SSL_CTX *, int);
long SSL_CTX_set_max_proto_version(SSL_CTX *, int);
uint64_t SSL_CTX_set_options(SSL_CTX *, uint64_t);
long SSL_CTX_set_session_cache_mode(SSL_CTX *, long);
int SSL_CTX_set_cipher_list(SSL_CTX *, const char *);
int SSL_CTX_use_certificate(SSL_CTX *, X509 *);
int SSL_CTX_use_PrivateKey(SSL_CTX *, EVP_PKEY *);
int SSL_CTX_check_private_key(const SSL_CTX *);
X509_STORE *SSL_CTX_get_cert_store(const SSL_CTX *);
int X509_STORE_add_cert(X509_STORE *, X509 *);
void SSL_CTX_set_verify_depth(SSL_CTX *, int);
void SSL_CTX_set_verify(SSL_CTX *, int, int (*)(int, X509_STORE_CTX *));
void SSL_CTX_set_cookie_generate_cb(SSL_CTX *, int (*)(SSL *, unsigned char *, unsigned int *));
void SSL_CTX_set_cookie_verify_cb(SSL_CTX *, int (*)(SSL *, const unsigned char *, unsigned int));

extern "Python" int _sdwan_verify_cb(int, X509_STORE_CTX *);
extern "Python" int _sdwan_cookie_generate_cb(SSL *, unsigned char *, unsigned int *);
extern "Python" int _sdwan_cookie_verify_cb(SSL *, const unsigned char *, unsigned int);

SSL *SSL_new(SSL_CTX *);
void SSL_free(SSL *);
void SSL_set_connect_state(SSL *);
void SSL_set_accept_state(SSL *);
const BIO_METHOD *BIO_s_mem(void);
BIO *BIO_new(const BIO_METHOD *);
void BIO_free_all(BIO *);
void SSL_set_bio(SSL *, BIO *, BIO *);
int BIO_write(BIO *, const void *, int);
int BIO_read(BIO *, void *, int);
size_t BIO_ctrl_pending(BIO *);
long SSL_set_mtu(SSL *, long);
size_t DTLS_get_data_mtu(const SSL *);
int SSL_do_handshake(SSL *);
int SSL_is_init_finished(const SSL *);
int SSL_get_error(const SSL *, int);
int SSL_read(SSL *, void *, int);
int SSL_write(SSL *, const void *, int);
int SSL_shutdown(SSL *);
BIO_ADDR *BIO_ADDR_new(void);
void BIO_ADDR_free(BIO_ADDR *);
int DTLSv1_listen(SSL *, BIO_ADDR *);
long DTLSv1_handle_timeout(SSL *);
int SSL_export_keying_material(SSL *, unsigned char *, size_t, const char *, size_t,
                               const unsigned char *, size_t, int);

unsigned long ERR_get_error(void);
void ERR_clear_error(void);
const char *ERR_reason_error_string(unsigned long);

X509 *X509_STORE_CTX_get_current_cert(const X509_STORE_CTX *);
int X509_STORE_CTX_get_error(const X509_STORE_CTX *);
int X509_STORE_CTX_get_error_depth(const X509_STORE_CTX *);
int X509_up_ref(X509 *);
void X509_free(X509 *);
void EVP_PKEY_free(EVP_PKEY *);
int X509_check_private_key(const X509 *, const EVP_PKEY *);
EVP_PKEY *X509_get0_pubkey(const X509 *);
int X509_verify(X509 *, EVP_PKEY *);
int X509_check_issued(X509 *, X509 *);

X509 *sdwan_x509_from_pem(const unsigned char *pem, int len);
EVP_PKEY *sdwan_pkey_from_pem(const unsigned char *pem, int len);
int sdwan_pkey_is_p256(const EVP_PKEY *key);
int sdwan_x509_san_uris(X509 *cert, char *out, int cap);
int sdwan_x509_serial(X509 *cert, unsigned char *out, int cap);
int sdwan_x509_validity(const X509 *cert, long long *not_before, long long *not_after);
SSL *sdwan_ssl_of_store(X509_STORE_CTX *store);
long long sdwan_dtls_timeout_us(SSL *ssl);
"""


def make_builder(absolute: bool = False) -> FFI:
    """absolute: for ffi.compile(), which runs the compiler from its own tmpdir."""

    def _rel(path: Path) -> str:
        return str(path) if absolute else os.path.relpath(path, os.getcwd())

    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        MODULE,
        "#include <openssl/ssl.h>\n"
        "#include <openssl/err.h>\n"
        "#include <openssl/x509v3.h>\n"
        '#include "glue.h"\n',
        sources=[_rel(HERE / "tls" / "glue.c")],
        include_dirs=[_rel(HERE / "tls")],
        libraries=["ssl", "crypto"],
        extra_compile_args=[*WARNINGS, "-O2"],
    )
    return ffi


ffibuilder = make_builder()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build sdwan.bindings._tls into a folder")
    ap.add_argument(
        "--inplace",
        metavar="DIR",
        type=Path,
        default=ROOT / "firmware",
        help="folder on sys.path that gets sdwan/bindings/_tls*.so (default: firmware/)",
    )
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    # Only here, not at import: setuptools loads this file without native/ on sys.path.
    from build_fastpath import build_into

    print(build_into(make_builder(absolute=True), "build-tls", args.inplace))
    return 0

if __name__ == "__main__":
    sys.exit(main())
