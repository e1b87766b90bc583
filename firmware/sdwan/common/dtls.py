"""Sans-I/O DTLS 1.2 sessions between sites and PoPs, over OpenSSL memory BIOs (tls.py).

Owns the handshake policy of the tunnel: DTLS 1.2 only, ECDHE-ECDSA with AES-256-GCM, mutual
certificate authentication against the account CA alone, the peer's identity taken from its
certificate's ``sdwan:site:<id>`` or ``sdwan:pop:<id>`` URI and checked inside the handshake, a
stateless cookie exchange on the server side, and the RFC 5705 export of the data-plane keys.

Identities are ("site", N) or ("pop", N); a plain int anywhere an identity is taken means a site,
which is what every site-to-site caller passes. A server (``accept``) only ever accepts sites:
PoPs are DTLS servers, never clients.

There are no sockets here: the caller feeds received datagrams in and sends the datagrams it gets
back, and drives retransmission with ``timeout()``/``on_timeout()``. This keeps the module usable
from socketd's event loop (control packets come up from the fast path's queue) and testable
in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path

from sdwan.bindings import tls
from sdwan.common.identity import Identity, identity_from_uris

DTLS_HEADER_LEN = 13
CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
HANDSHAKE_CLIENT_HELLO = 1
# ClientHellos may carry version 1.0 in the record layer for compatibility (RFC 6347 4.1).
_DTLS_RECORD_VERSIONS = {b"\xfe\xff", b"\xfe\xfd"}

CIPHER_SUITES = "ECDHE-ECDSA-AES256-GCM-SHA384"
EXPORTER_LABEL = b"EXPORTER-sdwan-dataplane"
EXPORTER_LENGTH = 64
KEY_LENGTH = 32
DEFAULT_MTU = 1200
MIN_MTU = 256
HANDSHAKE_TIMEOUT_S = 10.0
COOKIE_ROTATE_S = 300.0
_READ_CHUNK = 65536

# X509_V_ERR_* codes that all mean the chain does not lead to the account CA.
_NOT_OUR_CA = {2, 7, 18, 19, 20, 21, 30, 31, 32}
_X509_REASONS = {
    9: "peer certificate is not yet valid (check the clocks)",
    10: "peer certificate has expired",
    24: "peer certificate chain uses a certificate that is not a CA",
    25: "peer certificate chain is too long (the account CA signs sites directly)",
    26: "peer certificate is not allowed for this use (extended key usage)",
}
_ALERT_RE = re.compile(r"\balert (.+)$")
_ERROR_REASONS = {
    "no shared cipher": f"no cipher suite in common with the peer (need {CIPHER_SUITES})",
    "no suitable signature algorithm": "no signature algorithm in common with the peer",
    "peer did not return a certificate": "peer did not present a certificate",
    "unsupported protocol": "peer does not speak DTLS 1.2",
    "wrong version number": "peer does not speak DTLS 1.2",
    "read timeout expired": "handshake timed out",
}


class DtlsConfigError(ValueError):
    """The certificate, key or CA files cannot be used; the message names the file."""


def as_identity(who: int | Identity) -> Identity:
    """("site", N) for a bare int, the identity itself for ("site"|"pop", N); else ValueError."""
    if isinstance(who, int) and not isinstance(who, bool):
        return ("site", who)
    if (
        isinstance(who, tuple)
        and len(who) == 2
        and who[0] in ("site", "pop")
        and isinstance(who[1], int)
        and not isinstance(who[1], bool)
    ):
        return (who[0], who[1])
    raise ValueError(f"expected a site id or ('site'|'pop', id), got {who!r}")


def format_identity(who: Identity) -> str:
    return f"{who[0]} {who[1]}"


def record_epoch(datagram: bytes) -> int | None:
    """Epoch of the first DTLS record in ``datagram``, or None if it is no DTLS record."""
    if len(datagram) < DTLS_HEADER_LEN or datagram[1:3] not in _DTLS_RECORD_VERSIONS:
        return None
    if not CONTENT_CHANGE_CIPHER_SPEC <= datagram[0] <= CONTENT_APPLICATION_DATA:
        return None
    return int.from_bytes(datagram[3:5], "big")


def is_client_hello(datagram: bytes) -> bool:
    """True if ``datagram`` starts with an epoch-0 handshake record carrying a ClientHello."""
    return (
        len(datagram) > DTLS_HEADER_LEN
        and datagram[0] == CONTENT_HANDSHAKE
        and record_epoch(datagram) == 0
        and datagram[DTLS_HEADER_LEN] == HANDSHAKE_CLIENT_HELLO
    )


def client_hello_random(datagram: bytes) -> bytes | None:
    """The 32-byte random of a ClientHello datagram (first fragment), else None.

    DTLS 1.2 keeps the random across retransmissions and the cookie round trip,
    so a hello with another random from the same address is a new handshake
    (the peer restarted), not a repeat of the one in progress."""
    start = DTLS_HEADER_LEN + 12 + 2  # record header, handshake header, client_version
    if not is_client_hello(datagram) or len(datagram) < start + 32:
        return None
    if datagram[DTLS_HEADER_LEN + 6 : DTLS_HEADER_LEN + 9] != b"\x00\x00\x00":
        return None  # a later fragment: the random is in the first one
    return bytes(datagram[start : start + 32])


def split_records(data: bytes) -> list[bytes]:
    """Split a byte string of back-to-back DTLS records; a truncated tail is dropped."""
    records: list[bytes] = []
    pos = 0
    while pos + DTLS_HEADER_LEN <= len(data):
        end = pos + DTLS_HEADER_LEN + int.from_bytes(data[pos + 11 : pos + 13], "big")
        if end > len(data):
            break
        records.append(bytes(data[pos:end]))
        pos = end
    return records


def pack_datagrams(records: list[bytes], mtu: int) -> list[bytes]:
    """Pack whole records into as few datagrams of at most ``mtu`` bytes as order allows."""
    datagrams: list[bytes] = []
    current = bytearray()
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(bytes(current))
            current = bytearray()
        current += record
    if current:
        datagrams.append(bytes(current))
    return datagrams


# What an alert most likely means between two sites of this firmware.
_ALERT_MEANING = {
    "unknown ca": "the peer does not trust our certificate: different account CA",
    "bad certificate": "the peer refused our certificate",
    "certificate expired": "the peer says our certificate has expired",
    "handshake failure": "no common DTLS parameters",
}


def _alert_reason(openssl_reason: str) -> str | None:
    # OpenSSL versions spell it "sslv3 alert x", "tlsv1 alert x" or "tls alert x".
    match = _ALERT_RE.search(openssl_reason)
    if match is None:
        return None
    alert = match.group(1)
    if alert == "internal error":
        # OpenSSL sends internal_error when a verify callback refuses a certificate that is
        # otherwise valid, which is how a site rejects a wrong site id.
        return "peer sent alert: internal error (what a site sends when it refuses our site id)"
    meaning = _ALERT_MEANING.get(alert)
    return f"peer sent alert: {alert}" + (f" ({meaning})" if meaning else "")


def _ssl_error_reasons(error: tls.TlsError) -> list[str]:
    return error.reasons or [type(error).__name__]


def _x509_reason(errno: int) -> str:
    if errno in _NOT_OUR_CA:
        return "peer certificate not signed by the account CA"
    return _X509_REASONS.get(errno, f"peer certificate rejected (X509 verify error {errno})")


def _load_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DtlsConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


@dataclass
class AcceptResult:
    """What ``DtlsContext.accept`` made of one datagram.

    ``session`` is set only for a ClientHello with a valid cookie; ``replies`` are datagrams to
    send back to the source (a HelloVerifyRequest, or the server's first flight).
    """

    session: DtlsSession | None
    replies: list[bytes]
    reason: str | None = None


@dataclass
class _CookieSecrets:
    current: bytes
    previous: bytes | None
    rotated_at: float


class DtlsContext:
    """Our identity (a site or a PoP) and trust anchor; the factory for client and server sessions.

    ``identity`` is a site id (int) or ("pop", N); the certificate must name exactly that.
    ``my_site_id`` is the site id, or None for a PoP.
    """

    def __init__(
        self,
        ca_path: str | os.PathLike[str],
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        identity: int | Identity,
        *,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        cookie_rotate_s: float = COOKIE_ROTATE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity: Identity = as_identity(identity)
        self.my_site_id: int | None = self.identity[1] if self.identity[0] == "site" else None
        self.handshake_timeout_s = handshake_timeout_s
        self.cookie_rotate_s = cookie_rotate_s
        self._clock = clock
        # Why ClientHellos went nowhere; socketd exposes these as counters.
        self.stats: Counter[str] = Counter()
        # (site id, certificate serial) -> why that certificate is refused, or None: the
        # account's revocation list (revocation.py), asked for every site certificate a
        # handshake presents, client or server, so that popd, the mesh, Alt-WAN and static
        # tunnels all refuse a revoked one. Set by the daemon; None: nothing is revoked.
        self.revocation: Callable[[int, str], str | None] | None = None

        self.ca_path, self.cert_path, self.key_path = Path(ca_path), Path(cert_path), Path(key_path)
        self.ca_cert, self.cert, self.key = self._load_identity()
        self._client_ctx = self._make_context(server=False)
        self._server_ctx = self._make_context(server=True)
        self._cookies = _CookieSecrets(os.urandom(32), None, clock())

    def use_identity(self, cert_path: str | os.PathLike[str],
                     key_path: str | os.PathLike[str]) -> None:
        """Present another certificate and key (a renewal) in every handshake from now on,
        checked as at start; the rest of the context (counters, cookie secrets, the
        revocation check) stays. Sessions made before keep theirs. DtlsConfigError, with
        nothing changed, when the pair cannot be used."""
        old = self.cert_path, self.key_path
        self.cert_path, self.key_path = Path(cert_path), Path(key_path)
        try:
            ca_cert, cert, key = self._load_identity()
        except DtlsConfigError:
            self.cert_path, self.key_path = old
            raise
        self.ca_cert, self.cert, self.key = ca_cert, cert, key
        self._client_ctx = self._make_context(server=False)
        self._server_ctx = self._make_context(server=True)

    def _load_identity(self) -> tuple[tls.Certificate, tls.Certificate, tls.PrivateKey]:
        try:
            ca_cert = tls.Certificate.from_pem(_load_pem(self.ca_path, "CA certificate"))
        except ValueError as e:
            raise DtlsConfigError(
                f"CA certificate {self.ca_path} is not a PEM certificate: {e}"
            ) from None
        try:
            cert = tls.Certificate.from_pem(_load_pem(self.cert_path, "certificate"))
        except ValueError as e:
            raise DtlsConfigError(
                f"certificate {self.cert_path} is not a PEM certificate: {e}"
            ) from None
        try:
            key = tls.PrivateKey.from_pem(_load_pem(self.key_path, "private key"))
        except ValueError as e:
            raise DtlsConfigError(f"private key {self.key_path} is {e}") from None
        if not key.is_p256():
            raise DtlsConfigError(f"private key {self.key_path} is not an EC P-256 key")
        if not key.matches(cert):
            raise DtlsConfigError(
                f"private key {self.key_path} does not match certificate {self.cert_path}"
            )
        try:
            cert_identity = identity_from_uris(cert.san_uris())
        except ValueError as e:
            raise DtlsConfigError(f"certificate {self.cert_path}: {e}") from None
        if cert_identity != self.identity:
            raise DtlsConfigError(
                f"certificate {self.cert_path} is for {format_identity(cert_identity)}, "
                f"but this is {format_identity(self.identity)}"
            )
        if not cert.is_issued_by(ca_cert):
            raise DtlsConfigError(
                f"certificate {self.cert_path} is not issued by the CA in {self.ca_path}"
            )
        return ca_cert, cert, key

    def _make_context(self, *, server: bool) -> tls.Context:
        ctx = tls.Context()
        ctx.set_version(tls.DTLS1_2_VERSION)
        # Every handshake is a full one with both certificates checked: no tickets, no resumption,
        # and rekeying is a fresh handshake rather than a renegotiation.
        ctx.set_options(
            tls.OP_NO_QUERY_MTU
            | tls.OP_NO_TICKET
            | tls.OP_NO_COMPRESSION
            | tls.OP_CIPHER_SERVER_PREFERENCE
            | tls.OP_NO_RENEGOTIATION
        )
        ctx.disable_session_cache()
        ctx.set_cipher_list(CIPHER_SUITES)
        ctx.use_identity(self.cert, self.key)
        # Only the account CA: never the system trust store.
        ctx.trust(self.ca_cert)
        mode = tls.VERIFY_PEER | (tls.VERIFY_FAIL_IF_NO_PEER_CERT if server else 0)
        ctx.set_verify(mode, 1, _verify_callback)
        if server:
            ctx.set_options(tls.OP_COOKIE_EXCHANGE)
            ctx.set_cookie_callbacks(self._cookie_generate, self._cookie_verify)
        return ctx

    # -- cookies ---------------------------------------------------------------------------

    def rotate_cookie_secret(self) -> None:
        """Start a new cookie secret; cookies made with the one before stay valid until the next."""
        self._cookies = _CookieSecrets(os.urandom(32), self._cookies.current, self._clock())

    def _maybe_rotate(self) -> None:
        if self._clock() - self._cookies.rotated_at >= self.cookie_rotate_s:
            self.rotate_cookie_secret()

    def make_cookie(self, source: str, secret: bytes | None = None) -> bytes:
        """The cookie a ClientHello from ``source`` ("ip:port") has to echo."""
        key = self._cookies.current if secret is None else secret
        return hmac.new(key, source.encode(), hashlib.sha256).digest()

    def _cookie_valid(self, source: str, cookie: bytes) -> bool:
        secrets = [self._cookies.current]
        if self._cookies.previous is not None:
            secrets.append(self._cookies.previous)
        return any(hmac.compare_digest(cookie, self.make_cookie(source, s)) for s in secrets)

    def _cookie_generate(self, conn: tls.Connection) -> bytes:
        return self.make_cookie(_session_of(conn).source or "")

    def _cookie_verify(self, conn: tls.Connection, cookie: bytes) -> bool:
        ok = self._cookie_valid(_session_of(conn).source or "", cookie)
        if not ok:
            self.stats["bad cookie"] += 1
        return ok

    # -- sessions --------------------------------------------------------------------------

    def client(self, expected: int | Identity, mtu: int = DEFAULT_MTU) -> DtlsSession:
        """A session that initiates the handshake to ``expected`` (a site id or ("pop", N));
        call start(). The handshake fails unless the peer's certificate names exactly it."""
        want = as_identity(expected)
        if want == self.identity:
            raise ValueError(f"cannot open a session to our own {want[0]} id {want[1]}")
        conn = tls.Connection(self._client_ctx)
        conn.set_connect_state()
        return DtlsSession(
            self,
            conn,
            is_client=True,
            mtu=mtu,
            expected_site_id=want[1] if want[0] == "site" else None,
            expected_identity=want,
        )

    def accept(
        self,
        datagram: bytes,
        source: str,
        *,
        mtu: int = DEFAULT_MTU,
        allowed_site_ids: Container[int] | None = None,
    ) -> AcceptResult:
        """Handle one datagram that belongs to no session yet.

        A ClientHello without a valid cookie for ``source`` gets a HelloVerifyRequest and leaves
        nothing behind, so a spoofed flood costs one HMAC per packet. ``allowed_site_ids``, when
        given, makes the handshake itself refuse a certificate naming any other site.
        """
        if not is_client_hello(datagram):
            return self._refuse("not a ClientHello")
        self._maybe_rotate()
        try:
            conn = tls.Connection(self._server_ctx)
            conn.set_accept_state()
            session = DtlsSession(
                self,
                conn,
                is_client=False,
                mtu=mtu,
                source=source,
                allowed_site_ids=allowed_site_ids,
            )
            conn.bio_write(datagram)
            try:
                accepted = conn.listen()
            except tls.WantRead:
                accepted = False
            if not accepted:
                replies = session._flush()
                if not replies:
                    return self._refuse("malformed ClientHello: dropped by the cookie listener")
                self.stats["cookie sent"] += 1
                return AcceptResult(None, replies, "cookie sent")
            # The listener consumed the ClientHello into the connection; answering it is the
            # first handshake step of the new session.
            session._begin()
            replies = session._advance()
        except tls.TlsError as e:
            return self._refuse(f"malformed ClientHello: {_ssl_error_reasons(e)[0]}")
        except Exception as e:  # hostile input must never take socketd down
            return self._refuse(f"ClientHello rejected: {type(e).__name__}: {e}")
        if session.failed is not None:
            self.stats["handshake failed"] += 1
            return AcceptResult(None, replies, session.failed)
        self.stats["session created"] += 1
        return AcceptResult(session, replies)

    def _refuse(self, reason: str) -> AcceptResult:
        self.stats[reason.split(":")[0]] += 1
        return AcceptResult(None, [], reason)


def _session_of(conn: tls.Connection) -> DtlsSession:
    session = conn.app_data
    if not isinstance(session, DtlsSession):
        raise RuntimeError("DTLS connection without its session")
    return session


def _verify_callback(
    conn: tls.Connection, cert: tls.Certificate, errno: int, depth: int, ok: bool
) -> bool:
    try:
        return _session_of(conn)._verify(cert, errno, depth, ok)
    except Exception as e:  # an exception here would be re-raised mid-handshake
        with contextlib.suppress(RuntimeError):
            _session_of(conn)._set_verify_failure(f"certificate check failed: {e}")
        return False


# eq=False: sessions are keys in socketd's tables and compare by identity.
@dataclass(eq=False, repr=False, slots=True)  # one per tunnel: no __dict__ each
class DtlsSession:
    """One DTLS association with one peer, as initiator (client) or responder (server)."""

    context: DtlsContext
    conn: tls.Connection
    is_client: bool
    mtu: int = DEFAULT_MTU
    expected_site_id: int | None = None
    source: str | None = None
    allowed_site_ids: Container[int] | None = None
    expected_identity: Identity | None = None
    # The link the session runs on, set by the session layer that registers it: an owner with
    # tunnels to one peer over different links (the mesh, Alt-WAN) tells its own apart.
    link_id: int | None = field(default=None, init=False)
    established: bool = field(default=False, init=False)
    failed: str | None = field(default=None, init=False)
    closed: bool = field(default=False, init=False)
    # The OpenSSL connection was freed (release()): the session sends and receives nothing.
    released: bool = field(default=False, init=False)
    # The peer's verified identity; peer_site_id is its id when the peer is a site.
    peer_identity: Identity | None = field(default=None, init=False)
    peer_site_id: int | None = field(default=None, init=False)
    # The serial of the peer's certificate (revocation.py's form): kept after release() so a
    # revocation that arrives later still finds the sessions of the revoked certificate.
    peer_serial: str | None = field(default=None, init=False)
    # The peer certificate's notAfter (seconds since the epoch), read as it was verified.
    peer_not_after: int | None = field(default=None, init=False)
    _verify_failure: str | None = field(default=None, init=False)
    _started: bool = field(default=False, init=False)
    _close_sent: bool = field(default=False, init=False)
    _deadline: float | None = field(default=None, init=False)
    _messages: list[bytes] = field(default_factory=list, init=False)
    # Application-data records read so far: tells the session layer whether a record it
    # offered was this session's (DTLS drops one it cannot authenticate without a word).
    records_in: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.expected_identity is None and self.expected_site_id is not None:
            self.expected_identity = ("site", self.expected_site_id)
        if not MIN_MTU <= self.mtu <= 65507:
            raise ValueError(f"DTLS MTU must be in {MIN_MTU}..65507, got {self.mtu}")
        self.conn.app_data = self
        self.conn.set_ciphertext_mtu(self.mtu)

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        state = (
            f"failed={self.failed!r}"
            if self.failed
            else "closed"
            if self.closed
            else "established"
            if self.established
            else "handshaking"
        )
        peer = format_identity(self.peer_identity) if self.peer_identity else None
        return f"<DtlsSession {role} peer={peer} {state}>"

    # -- handshake -------------------------------------------------------------------------

    def start(self) -> list[bytes]:
        """The client's first flight (a ClientHello without cookie)."""
        if not self.is_client:
            raise RuntimeError("start() is for client sessions; servers come from accept()")
        if self._started:
            return []
        self._begin()
        return self._advance()

    def _begin(self) -> None:
        self._started = True
        self._deadline = self.context._clock() + self.context.handshake_timeout_s

    def receive(self, datagram: bytes) -> list[bytes]:
        """Feed one received datagram; returns datagrams to send back. Never raises on input."""
        if self.failed is not None or self.released or not self._started or not datagram:
            return []
        try:
            self.conn.bio_write(datagram)
        except tls.TlsError:
            return []
        return self._advance()

    def timeout(self) -> float | None:
        """Seconds until on_timeout() should be called, or None if nothing is pending."""
        if self.failed is not None or self.closed or self.released or not self._started:
            return None
        try:
            retransmit = self.conn.get_timeout()
        except tls.TlsError:
            retransmit = None
        if self.established or self._deadline is None:
            return retransmit
        remaining = max(0.0, self._deadline - self.context._clock())
        return remaining if retransmit is None else min(retransmit, remaining)

    def on_timeout(self) -> list[bytes]:
        """Retransmit the last flight if its timer ran out; fail past the handshake deadline."""
        if self.failed is not None or self.closed or self.released or not self._started:
            return []
        if (
            not self.established
            and self._deadline is not None
            and self.context._clock() >= self._deadline
        ):
            self.failed = "handshake timed out"
            return []
        try:
            self.conn.handle_timeout()
        except tls.TlsError as e:
            self._fail(e)
        return self._flush()

    def _advance(self) -> list[bytes]:
        if not self.established:
            try:
                self.conn.do_handshake()
            except tls.WantRead:
                return self._flush()
            except tls.TlsError as e:
                self._fail(e)
                return self._flush()
            if not self._handshake_done():
                return self._flush()
        self._read_application_data()
        return self._flush()

    def _handshake_done(self) -> bool:
        # The verify callback sets peer_identity only for an acceptable certificate; without it
        # the session must not be usable even if OpenSSL thought the handshake was fine.
        if self.peer_identity is None:
            self.failed = self._verify_failure or "peer presented no usable certificate"
            return False
        self.established = True
        self._deadline = None
        return True

    def _read_application_data(self) -> None:
        while not self.closed and self.failed is None:
            try:
                data = self.conn.recv(_READ_CHUNK)
            except tls.WantRead:
                return
            except tls.ZeroReturn:
                self.closed = True
                return
            except tls.TlsError as e:
                self._fail(e)
                return
            if data:
                self.records_in += 1
                self._messages.append(data)

    def _fail(self, error: tls.TlsError) -> None:
        if self.failed is not None:
            return
        reasons = _ssl_error_reasons(error)
        for reason in reasons:
            alert = _alert_reason(reason)
            if alert is not None:
                self.failed = alert
                return
        if self._verify_failure is not None:
            self.failed = self._verify_failure
            return
        for reason in reasons:
            for needle, text in _ERROR_REASONS.items():
                if needle in reason:
                    self.failed = text
                    return
        self.failed = f"DTLS error: {reasons[0]}"

    def _set_verify_failure(self, reason: str) -> None:
        if self._verify_failure is None:
            self._verify_failure = reason

    def _verify(self, cert: tls.Certificate, errno: int, depth: int, ok: bool) -> bool:
        if not ok:
            self._set_verify_failure(_x509_reason(errno))
            return False
        if depth != 0:
            return True
        try:
            identity = identity_from_uris(cert.san_uris())
        except ValueError as e:
            self._set_verify_failure(f"peer certificate refused: {e}")
            return False
        try:
            serial = cert.serial_hex()
        except ValueError as e:
            self._set_verify_failure(f"peer certificate refused: {e}")
            return False
        # Before the other checks: a revoked certificate is refused as such even where its
        # site is no longer a configured peer (the mesh forgot it when it was revoked).
        check = self.context.revocation
        if identity[0] == "site" and check is not None:
            reason = check(identity[1], serial)
            if reason is not None:
                self._set_verify_failure(reason)
                return False
        reason = self._refusal(identity)
        if reason is not None:
            self._set_verify_failure(reason)
            return False
        self.peer_serial = serial
        try:
            self.peer_not_after = cert.validity()[1]
        except ValueError:
            self.peer_not_after = None
        self.peer_identity = identity
        self.peer_site_id = identity[1] if identity[0] == "site" else None
        return True

    def _refusal(self, identity: Identity) -> str | None:
        kind, num = identity
        want = self.expected_identity
        if want is not None and identity != want:
            return f"peer presented {format_identity(identity)}, expected {format_identity(want)}"
        if identity == self.context.identity:
            return f"peer presented our own {kind} id {num}"
        if not self.is_client and kind != "site":
            # Only sites are DTLS clients; a PoP certificate has no business calling us.
            return f"peer presented {format_identity(identity)}, but only sites may connect"
        allowed = self.allowed_site_ids
        if allowed is not None and (kind != "site" or num not in allowed):
            return f"peer presented site {num}, which is not a configured peer"
        return None

    # -- after the handshake ---------------------------------------------------------------

    def export_keys(self) -> tuple[bytes, bytes]:
        """(tx_key, rx_key) for the fast path, from the RFC 5705 exporter of this session."""
        if not self.established or self.failed is not None or self.released:
            raise RuntimeError("keys are only available from an established session")
        material = self.conn.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH)
        first, second = material[:KEY_LENGTH], material[KEY_LENGTH:]
        return (first, second) if self.is_client else (second, first)

    def send(self, app_data: bytes) -> list[bytes]:
        """Encrypt ``app_data`` as one record; returns the datagram(s) to send."""
        if not self.established or self.failed is not None or self._close_sent or self.released:
            raise RuntimeError("send() needs an established, open session")
        limit = self.conn.get_cleartext_mtu()
        if len(app_data) > limit:
            raise ValueError(f"{len(app_data)} bytes do not fit one record (at most {limit})")
        try:
            self.conn.send(app_data)
        except tls.TlsError as e:
            self._fail(e)
        return self._flush()

    def take_messages(self) -> list[bytes]:
        """Application data received since the last call, in order."""
        messages, self._messages = self._messages, []
        return messages

    def close(self) -> list[bytes]:
        """Send close_notify (once); returns the datagram(s) carrying it."""
        if not self.established or self._close_sent or self.failed is not None or self.released:
            return []
        self._close_sent = True
        try:
            self.conn.shutdown()
        except tls.TlsError:
            return []
        return self._flush()

    def release(self) -> None:
        """Free the OpenSSL connection of a session that has done its work: its keys are in
        the fast path and acknowledged, and nothing else travels over it (a mesh or static
        tunnel until its next rekey, which is a new session). The connection is most of what
        a session costs (about 70 KB with its buffers and the peer's certificate), times the
        hundreds of tunnels of a mesh. Afterwards the session still says who the peer was,
        and sends and receives nothing."""
        if self.released:
            return
        self.released = True
        self._messages = []
        self.conn.app_data = None  # the connection pointed back at us
        self.conn.free()

    def _flush(self) -> list[bytes]:
        pending = bytearray()
        while True:
            try:
                chunk = self.conn.bio_read(_READ_CHUNK)
            except tls.WantRead:
                break
            if not chunk:
                break
            pending += chunk
        return pack_datagrams(split_records(bytes(pending)), self.mtu)
