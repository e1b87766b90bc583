"""Thin typed wrapper over ``sdwan.bindings._tls``: the system libssl's DTLS through cffi.

Owns object lifetimes (every OpenSSL pointer is freed by the garbage collector through
``ffi.gc``), the translation of OpenSSL's return codes and error queue into exceptions, and the
routing of OpenSSL's callbacks (certificate verification, DTLS cookies) to the Python
connection they belong to. Policy (which versions, ciphers, identities) lives in dtls.py.

Every call that can fail clears the thread's error queue first: SSL_get_error() reads that
queue, and a stale entry from an earlier failure would turn a WANT_READ into an error.
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Callable
from typing import Any

from sdwan.bindings._tls import ffi, lib
from sdwan.common.revocation import MAX_SERIAL_OCTETS

ERROR_WANT_READ = lib.SSL_ERROR_WANT_READ
DTLS1_2_VERSION = lib.DTLS1_2_VERSION
VERIFY_PEER = lib.SSL_VERIFY_PEER
VERIFY_FAIL_IF_NO_PEER_CERT = lib.SSL_VERIFY_FAIL_IF_NO_PEER_CERT
OP_NO_QUERY_MTU = lib.SSL_OP_NO_QUERY_MTU
OP_NO_TICKET = lib.SSL_OP_NO_TICKET
OP_NO_COMPRESSION = lib.SSL_OP_NO_COMPRESSION
OP_CIPHER_SERVER_PREFERENCE = lib.SSL_OP_CIPHER_SERVER_PREFERENCE
OP_NO_RENEGOTIATION = lib.SSL_OP_NO_RENEGOTIATION
OP_COOKIE_EXCHANGE = lib.SSL_OP_COOKIE_EXCHANGE
SESS_CACHE_OFF = lib.SSL_SESS_CACHE_OFF
MAX_COOKIE = lib.DTLS1_COOKIE_LENGTH
_SAN_BUFFER = 4096
# RFC 5280 allows 20 octets; some CAs write a few more, none of them this many. The
# revocation list accepts serials of the same size (common/revocation.py).
_SERIAL_BUFFER = MAX_SERIAL_OCTETS


class TlsError(Exception):
    """An OpenSSL failure; ``reasons`` are OpenSSL's reason strings, oldest first."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class WantRead(TlsError):
    """The operation needs another datagram from the peer before it can go on."""

    def __init__(self) -> None:
        super().__init__(["want read"])


class ZeroReturn(TlsError):
    """The peer closed the session with close_notify."""

    def __init__(self) -> None:
        super().__init__(["close notify"])


def _error_queue() -> list[str]:
    reasons: list[str] = []
    while code := lib.ERR_get_error():
        text = lib.ERR_reason_error_string(code)
        reasons.append(ffi.string(text).decode() if text != ffi.NULL else f"error {code:#x}")
    return reasons


def _fail(what: str) -> TlsError:
    return TlsError(_error_queue() or [what])


class Certificate:
    """An X.509 certificate (owned reference)."""

    def __init__(self, ptr: Any) -> None:
        self._ptr = ffi.gc(ptr, lib.X509_free)

    @classmethod
    def from_pem(cls, pem: bytes) -> Certificate:
        lib.ERR_clear_error()
        ptr = lib.sdwan_x509_from_pem(pem, len(pem))
        if ptr == ffi.NULL:
            raise ValueError(f"not a PEM certificate ({'; '.join(_error_queue()) or 'no data'})")
        return cls(ptr)

    @classmethod
    def borrowed(cls, ptr: Any) -> Certificate:
        """Take a reference of our own to a certificate OpenSSL lends to a callback."""
        lib.X509_up_ref(ptr)
        return cls(ptr)

    def san_uris(self) -> list[str] | None:
        """The URIs of the subjectAltName, or None if the certificate has none."""
        out = ffi.new("char[]", _SAN_BUFFER)
        n = lib.sdwan_x509_san_uris(self._ptr, out, _SAN_BUFFER)
        if n == -errno.ENOENT:
            return None
        if n < 0:
            raise ValueError("subjectAltName holds a malformed or oversized URI")
        return ffi.unpack(out, n).decode("ascii", "replace").splitlines()

    def serial_hex(self) -> str:
        """The serial number in lowercase hex without leading zeros (revocation.py's form)."""
        out = ffi.new("unsigned char[]", _SERIAL_BUFFER)
        n = lib.sdwan_x509_serial(self._ptr, out, _SERIAL_BUFFER)
        if n < 0:
            raise ValueError("certificate has a negative, missing or oversized serial number")
        return format(int.from_bytes(ffi.unpack(out, n), "big"), "x")
    def validity(self) -> tuple[int, int]:
        """(notBefore, notAfter) in seconds since the epoch, UTC."""
        nb, na = ffi.new("long long *"), ffi.new("long long *")
        if lib.sdwan_x509_validity(self._ptr, nb, na) != 0:
            raise ValueError("certificate validity dates cannot be read")
        return int(nb[0]), int(na[0])

    def is_issued_by(self, ca: Certificate) -> bool:
        """True if ``ca``'s name and key match this certificate's issuer and signature."""
        lib.ERR_clear_error()
        ok = lib.X509_check_issued(ca._ptr, self._ptr) == 0 and (
            lib.X509_verify(self._ptr, lib.X509_get0_pubkey(ca._ptr)) == 1
        )
        lib.ERR_clear_error()
        return ok


class PrivateKey:
    """A private key (owned reference), loaded only from unencrypted PEM."""

    def __init__(self, ptr: Any) -> None:
        self._ptr = ffi.gc(ptr, lib.EVP_PKEY_free)

    @classmethod
    def from_pem(cls, pem: bytes) -> PrivateKey:
        lib.ERR_clear_error()
        ptr = lib.sdwan_pkey_from_pem(pem, len(pem))
        if ptr == ffi.NULL:
            raise ValueError(
                f"not an unencrypted PEM key ({'; '.join(_error_queue()) or 'no data'})"
            )
        return cls(ptr)

    def is_p256(self) -> bool:
        return bool(lib.sdwan_pkey_is_p256(self._ptr))

    def matches(self, cert: Certificate) -> bool:
        lib.ERR_clear_error()
        ok = lib.X509_check_private_key(cert._ptr, self._ptr) == 1
        lib.ERR_clear_error()
        return ok


VerifyCallback = Callable[["Connection", Certificate, int, int, bool], bool]
CookieMaker = Callable[["Connection"], bytes]
CookieChecker = Callable[["Connection", bytes], bool]


class Context:
    """An SSL_CTX for DTLS; the callbacks are plain Python callables."""

    def __init__(self) -> None:
        lib.ERR_clear_error()
        ptr = lib.SSL_CTX_new(lib.DTLS_method())
        if ptr == ffi.NULL:
            raise _fail("SSL_CTX_new failed")
        self._ptr = ffi.gc(ptr, lib.SSL_CTX_free)
        self.verify_callback: VerifyCallback | None = None
        self.cookie_maker: CookieMaker | None = None
        self.cookie_checker: CookieChecker | None = None

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            raise _fail(what)

    def set_version(self, version: int) -> None:
        """Allow exactly one protocol version."""
        lib.ERR_clear_error()
        self._check(lib.SSL_CTX_set_min_proto_version(self._ptr, version) == 1, "min version")
        self._check(lib.SSL_CTX_set_max_proto_version(self._ptr, version) == 1, "max version")

    def set_options(self, options: int) -> None:
        lib.SSL_CTX_set_options(self._ptr, options)

    def disable_session_cache(self) -> None:
        lib.SSL_CTX_set_session_cache_mode(self._ptr, SESS_CACHE_OFF)

    def set_cipher_list(self, ciphers: str) -> None:
        lib.ERR_clear_error()
        self._check(lib.SSL_CTX_set_cipher_list(self._ptr, ciphers.encode()) == 1, "cipher list")

    def use_identity(self, cert: Certificate, key: PrivateKey) -> None:
        lib.ERR_clear_error()
        self._check(lib.SSL_CTX_use_certificate(self._ptr, cert._ptr) == 1, "certificate")
        self._check(lib.SSL_CTX_use_PrivateKey(self._ptr, key._ptr) == 1, "private key")
        self._check(lib.SSL_CTX_check_private_key(self._ptr) == 1, "key does not match")

    def trust(self, ca: Certificate) -> None:
        """Add ``ca`` to this context's own store (never the system's)."""
        lib.ERR_clear_error()
        store = lib.SSL_CTX_get_cert_store(self._ptr)
        self._check(lib.X509_STORE_add_cert(store, ca._ptr) == 1, "CA certificate")

    def set_verify(self, mode: int, depth: int, callback: VerifyCallback) -> None:
        self.verify_callback = callback
        lib.SSL_CTX_set_verify_depth(self._ptr, depth)
        lib.SSL_CTX_set_verify(self._ptr, mode, lib._sdwan_verify_cb)

    def set_cookie_callbacks(self, maker: CookieMaker, checker: CookieChecker) -> None:
        self.cookie_maker, self.cookie_checker = maker, checker
        lib.SSL_CTX_set_cookie_generate_cb(self._ptr, lib._sdwan_cookie_generate_cb)
        lib.SSL_CTX_set_cookie_verify_cb(self._ptr, lib._sdwan_cookie_verify_cb)


# SSL* address -> its Connection, for the callbacks; weak so a dropped connection is freed.
_connections: weakref.WeakValueDictionary[int, Connection] = weakref.WeakValueDictionary()


def _key(ssl: Any) -> int:
    return int(ffi.cast("uintptr_t", ssl))


class Connection:
    """One DTLS connection over two memory BIOs: datagrams in with bio_write, out with bio_read."""

    def __init__(self, context: Context) -> None:
        lib.ERR_clear_error()
        ptr = lib.SSL_new(context._ptr)
        if ptr == ffi.NULL:
            raise _fail("SSL_new failed")
        self._ptr = ffi.gc(ptr, lib.SSL_free)
        self.context = context
        self.app_data: Any = None
        into, out = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
        if into == ffi.NULL or out == ffi.NULL:
            for bio in (into, out):
                if bio != ffi.NULL:
                    lib.BIO_free_all(bio)
            raise _fail("BIO_new failed")
        # SSL_set_bio hands both BIOs to the connection; SSL_free frees them.
        lib.SSL_set_bio(self._ptr, into, out)
        self._into, self._out = into, out
        _connections[_key(ptr)] = self

    def free(self) -> None:
        """SSL_free now rather than when the garbage collector gets to it; the connection
        must not be used afterwards."""
        ptr, self._ptr = self._ptr, ffi.NULL
        self._into = self._out = ffi.NULL  # the connection owned them
        if ptr != ffi.NULL:
            _connections.pop(_key(ptr), None)
            ffi.release(ptr)

    def _raise(self, rc: int) -> TlsError:
        err = lib.SSL_get_error(self._ptr, rc)
        if err == lib.SSL_ERROR_WANT_READ:
            return WantRead()
        if err == lib.SSL_ERROR_ZERO_RETURN:
            return ZeroReturn()
        return _fail(f"SSL error {err}")

    def set_connect_state(self) -> None:
        lib.SSL_set_connect_state(self._ptr)

    def set_accept_state(self) -> None:
        lib.SSL_set_accept_state(self._ptr)

    def set_ciphertext_mtu(self, mtu: int) -> None:
        lib.SSL_set_mtu(self._ptr, mtu)

    def get_cleartext_mtu(self) -> int:
        """The largest application record once the cipher is set (0 before)."""
        return int(lib.DTLS_get_data_mtu(self._ptr))

    def bio_write(self, data: bytes) -> None:
        lib.ERR_clear_error()
        if lib.BIO_write(self._into, data, len(data)) != len(data):
            raise _fail("BIO_write failed")

    def bio_read(self, size: int) -> bytes:
        """What OpenSSL has queued to send, up to ``size`` bytes; WantRead when nothing."""
        pending = min(size, int(lib.BIO_ctrl_pending(self._out)))
        if pending <= 0:
            raise WantRead()
        buf = ffi.new("unsigned char[]", pending)
        n = lib.BIO_read(self._out, buf, pending)
        if n <= 0:
            raise WantRead()
        return ffi.buffer(buf, n)[:]

    def listen(self) -> bool:
        """DTLSv1_listen: True once a ClientHello carried a valid cookie (the handshake can go
        on); False if a HelloVerifyRequest was queued or the datagram was dropped."""
        lib.ERR_clear_error()
        addr = lib.BIO_ADDR_new()
        if addr == ffi.NULL:
            raise _fail("BIO_ADDR_new failed")
        try:
            rc = lib.DTLSv1_listen(self._ptr, addr)
        finally:
            lib.BIO_ADDR_free(addr)
        if rc > 0:
            return True
        if rc == 0:
            return False
        raise self._raise(rc)

    def do_handshake(self) -> None:
        lib.ERR_clear_error()
        rc = lib.SSL_do_handshake(self._ptr)
        if rc != 1:
            raise self._raise(rc)

    def recv(self, size: int) -> bytes:
        lib.ERR_clear_error()
        buf = ffi.new("unsigned char[]", size)
        n = lib.SSL_read(self._ptr, buf, size)
        if n <= 0:
            raise self._raise(n)
        return ffi.buffer(buf, n)[:]

    def send(self, data: bytes) -> None:
        lib.ERR_clear_error()
        n = lib.SSL_write(self._ptr, data, len(data))
        if n <= 0:
            raise self._raise(n)

    def shutdown(self) -> None:
        lib.ERR_clear_error()
        rc = lib.SSL_shutdown(self._ptr)
        if rc < 0:
            raise self._raise(rc)

    def get_timeout(self) -> float | None:
        """Seconds until the retransmission timer fires, or None if none runs."""
        us = lib.sdwan_dtls_timeout_us(self._ptr)
        return None if us < 0 else us / 1e6

    def handle_timeout(self) -> None:
        lib.ERR_clear_error()
        if lib.DTLSv1_handle_timeout(self._ptr) < 0:
            raise _fail("retransmission failed")

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        lib.ERR_clear_error()
        out = ffi.new("unsigned char[]", length)
        if (
            lib.SSL_export_keying_material(
                self._ptr, out, length, label, len(label), ffi.NULL, 0, 0
            )
            != 1
        ):
            raise _fail("keying material export failed")
        return ffi.buffer(out, length)[:]


def _silent(exc_type: Any, exc: Any, tb: Any) -> None:
    # A callback that raises must refuse (return 0), not print a traceback to the console;
    # dtls.py's callbacks catch and record their own errors before it comes to this.
    return None


@ffi.def_extern(onerror=_silent)
def _sdwan_verify_cb(ok: int, store: Any) -> int:
    conn = _connections.get(_key(lib.sdwan_ssl_of_store(store)))
    if conn is None or conn.context.verify_callback is None:
        return 0
    cert_ptr = lib.X509_STORE_CTX_get_current_cert(store)
    if cert_ptr == ffi.NULL:
        return 0
    errno = lib.X509_STORE_CTX_get_error(store)
    depth = lib.X509_STORE_CTX_get_error_depth(store)
    cert = Certificate.borrowed(cert_ptr)
    return int(bool(conn.context.verify_callback(conn, cert, errno, depth, bool(ok))))


@ffi.def_extern(onerror=_silent)
def _sdwan_cookie_generate_cb(ssl: Any, cookie: Any, cookie_len: Any) -> int:
    conn = _connections.get(_key(ssl))
    if conn is None or conn.context.cookie_maker is None:
        return 0
    data = conn.context.cookie_maker(conn)
    if not 0 < len(data) <= MAX_COOKIE:
        return 0
    ffi.memmove(cookie, data, len(data))
    cookie_len[0] = len(data)
    return 1


@ffi.def_extern(onerror=_silent)
def _sdwan_cookie_verify_cb(ssl: Any, cookie: Any, cookie_len: int) -> int:
    conn = _connections.get(_key(ssl))
    if conn is None or conn.context.cookie_checker is None:
        return 0
    return int(bool(conn.context.cookie_checker(conn, ffi.buffer(cookie, cookie_len)[:])))
