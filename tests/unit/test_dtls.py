"""DTLS sessions between sites: real OpenSSL, datagrams pumped in-process between two contexts."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from sdwan.common.dtls import (
    CIPHER_SUITES,
    AcceptResult,
    DtlsConfigError,
    DtlsContext,
    DtlsSession,
    client_hello_random,
    is_client_hello,
    pack_datagrams,
    record_epoch,
    split_records,
)
from sdwan.pop import pki

SOURCE = "192.0.2.10:4800"
HANDSHAKE_HELLO_VERIFY_REQUEST = 3


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: Path
    other_ca: Path

    def site(self, site_id: int, ca: Path | None = None) -> tuple[Path, Path, Path]:
        ca_dir = ca or self.ca
        out = self.root / f"{ca_dir.name}-sites"
        cert, key = out / f"site-{site_id}.pem", out / f"site-{site_id}.key"
        if not cert.exists():
            pki.issue_site(ca_dir, site_id, out)
        return ca_dir / "ca.pem", cert, key

    def context(self, site_id: int, ca: Path | None = None, **kw: object) -> DtlsContext:
        ca_pem, cert, key = self.site(site_id, ca)
        return DtlsContext(ca_pem, cert, key, site_id, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    pki.create_ca(root / "account", account="acme")
    pki.create_ca(root / "intruder", account="intruder")
    return Pki(root=root, ca=root / "account", other_ca=root / "intruder")


@dataclass
class Wire:
    """Carries datagrams between one client session and a server context, like a UDP path."""

    server_ctx: DtlsContext
    source: str = SOURCE
    allowed: set[int] | None = None
    mtu: int = 1200
    drop: Callable[[str, int, bytes], bool] | None = None
    server: DtlsSession | None = None
    accepts: list[AcceptResult] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=lambda: {"c2s": 0, "s2c": 0})

    def _dropped(self, direction: str, datagram: bytes) -> bool:
        index = self.sent[direction]
        self.sent[direction] += 1
        return self.drop is not None and self.drop(direction, index, datagram)

    def to_server(self, datagrams: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for datagram in datagrams:
            if self._dropped("c2s", datagram):
                continue
            if self.server is None:
                result = self.server_ctx.accept(
                    datagram, self.source, mtu=self.mtu, allowed_site_ids=self.allowed
                )
                self.accepts.append(result)
                self.server = result.session
                out += result.replies
            else:
                out += self.server.receive(datagram)
        return out

    def to_client(self, client: DtlsSession, datagrams: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for datagram in datagrams:
            if not self._dropped("s2c", datagram):
                out += client.receive(datagram)
        return out

    def pump(
        self, client: DtlsSession, c2s: list[bytes], s2c: list[bytes] | None = None
    ) -> None:
        s2c = list(s2c or [])
        for _ in range(50):
            if not c2s and not s2c:
                return
            s2c += self.to_server(c2s)
            c2s = self.to_client(client, s2c)
            s2c = []
        raise AssertionError("handshake did not settle in 50 rounds")


def connect(
    client_ctx: DtlsContext,
    server_ctx: DtlsContext,
    expected: int,
    *,
    mtu: int = 1200,
    allowed: set[int] | None = None,
    drop: Callable[[str, int, bytes], bool] | None = None,
) -> tuple[DtlsSession, Wire]:
    client = client_ctx.client(expected, mtu=mtu)
    wire = Wire(server_ctx, allowed=allowed, mtu=mtu, drop=drop)
    wire.pump(client, client.start())
    return client, wire


def test_handshake_with_cookie_exchange_and_crosswise_keys(certs: Pki) -> None:
    a, b = certs.context(1), certs.context(2)
    client, wire = connect(a, b, expected=2)

    assert client.established and client.failed is None and client.is_client
    server = wire.server
    assert server is not None and server.established and not server.is_client
    assert (client.peer_site_id, server.peer_site_id) == (2, 1)
    # The peer certificate's notAfter is kept (popd renews only one near its end).
    assert (client.peer_not_after, server.peer_not_after) == (b.cert.validity()[1],
                                                              a.cert.validity()[1])
    # First ClientHello is answered statelessly; only the one echoing the cookie makes a session.
    assert [r.session is None for r in wire.accepts] == [True, False]
    assert b.stats["cookie sent"] == 1 and b.stats["session created"] == 1

    c_tx, c_rx = client.export_keys()
    s_tx, s_rx = server.export_keys()
    assert len(c_tx) == len(c_rx) == 32
    assert c_tx == s_rx and c_rx == s_tx and c_tx != c_rx
    assert client.timeout() is None


def test_handshake_in_the_other_direction(certs: Pki) -> None:
    client, wire = connect(certs.context(2), certs.context(1), expected=1)
    assert client.established and wire.server is not None and wire.server.established
    assert wire.server.peer_site_id == 2
    assert client.export_keys()[0] == wire.server.export_keys()[1]


def test_each_handshake_exports_fresh_keys(certs: Pki) -> None:
    a, b = certs.context(1), certs.context(2)
    first, _ = connect(a, b, expected=2)
    second, _ = connect(a, b, expected=2)
    assert first.export_keys() != second.export_keys()


def test_application_data_both_ways_and_close_notify(certs: Pki) -> None:
    client, wire = connect(certs.context(1), certs.context(2), expected=2)
    server = wire.server
    assert server is not None

    for datagram in client.send(b"ping from 1"):
        assert server.receive(datagram) == []
    for datagram in server.send(b"pong from 2"):
        client.receive(datagram)
    assert server.take_messages() == [b"ping from 1"]
    assert client.take_messages() == [b"pong from 2"]
    assert server.take_messages() == []

    for datagram in client.close():
        server.receive(datagram)
    assert server.closed and server.failed is None
    assert client.close() == []


def test_wrong_ca_fails_on_both_sides_with_clear_reasons(certs: Pki) -> None:
    ours = certs.context(1)
    theirs = certs.context(2, ca=certs.other_ca)
    client, wire = connect(ours, theirs, expected=2)
    assert not client.established
    assert client.failed == "peer certificate not signed by the account CA"
    assert wire.server is not None and not wire.server.established
    assert wire.server.failed == (
        "peer sent alert: unknown ca "
        "(the peer does not trust our certificate: different account CA)"
    )
    with pytest.raises(RuntimeError):
        client.export_keys()


def test_client_from_foreign_ca_is_refused_by_server(certs: Pki) -> None:
    intruder = certs.context(3, ca=certs.other_ca)
    client, wire = connect(intruder, certs.context(2), expected=2)
    assert not client.established
    assert client.failed == "peer certificate not signed by the account CA"
    assert wire.server is not None and not wire.server.established
    assert wire.server.failed.startswith("peer sent alert: unknown ca (")


def test_wrong_site_id_is_refused_by_client_before_any_keys(certs: Pki) -> None:
    client, wire = connect(certs.context(1), certs.context(3), expected=2)
    assert client.failed == "peer presented site 3, expected site 2"
    assert not client.established and client.peer_site_id is None
    server = wire.server
    assert server is not None and not server.established
    assert server.failed is not None and server.failed.startswith("peer sent alert")


def test_server_refuses_site_not_in_its_table(certs: Pki) -> None:
    client, wire = connect(certs.context(1), certs.context(2), expected=2, allowed={5, 6})
    server = wire.server
    assert server is not None and not server.established
    assert server.failed == "peer presented site 1, which is not a configured peer"
    assert not client.established and client.failed is not None


def _rogue_cert(
    certs: Pki,
    tmp_path: Path,
    *,
    san: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """A certificate from the account CA that socket-pki would never issue."""
    ca_cert, ca_key = pki.load_ca(certs.ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-7")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("sdwan:site:7")]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = tmp_path / "rogue.pem", tmp_path / "rogue.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _raw_dtls_client(
    ca: Path, cert: Path | None, key: Path | None, max_version: int | None = None
) -> SSL.Connection:
    """A plain OpenSSL DTLS client, for certificates our own contexts refuse to load."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_options(SSL.OP_NO_QUERY_MTU)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
        # DTLS 1.0 needs SHA-1 signatures, which the default security level forbids.
        ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
    else:
        ctx.set_cipher_list(CIPHER_SUITES.encode())
    if cert is not None and key is not None:
        ctx.use_certificate_file(str(cert))
        ctx.use_privatekey_file(str(key))
    ctx.load_verify_locations(str(ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1200)
    return conn


def _drain(conn: SSL.Connection) -> list[bytes]:
    out = bytearray()
    while True:
        try:
            out += conn.bio_read(65536)
        except SSL.WantReadError:
            return [bytes(out)] if out else []


def _raw_handshake(raw: SSL.Connection, server_ctx: DtlsContext) -> DtlsSession | None:
    server: DtlsSession | None = None
    with pytest.raises(SSL.WantReadError):
        raw.do_handshake()
    to_server = _drain(raw)
    for _ in range(10):
        to_client: list[bytes] = []
        for datagram in to_server:
            if server is None:
                result = server_ctx.accept(datagram, SOURCE)
                server = result.session
                to_client += result.replies
            else:
                to_client += server.receive(datagram)
        for datagram in to_client:
            raw.bio_write(datagram)
        try:
            raw.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error:
            break
        to_server = _drain(raw)
        if not to_server:
            break
    return server


def test_certificate_without_san_is_refused(certs: Pki, tmp_path: Path) -> None:
    cert, key = _rogue_cert(certs, tmp_path)
    with pytest.raises(DtlsConfigError, match="no subjectAltName"):
        DtlsContext(certs.ca / "ca.pem", cert, key, 7)

    server = _raw_handshake(_raw_dtls_client(certs.ca / "ca.pem", cert, key), certs.context(2))
    assert server is not None and not server.established
    assert server.failed is not None and "subjectAltName" in server.failed
    assert server.peer_site_id is None


def test_peer_with_our_own_site_id_is_refused(certs: Pki) -> None:
    # A second appliance provisioned with site 2's certificate must not tunnel to site 2.
    ca_pem, cert, key = certs.site(2)
    server = _raw_handshake(_raw_dtls_client(ca_pem, cert, key), certs.context(2))
    assert server is not None and not server.established
    assert server.failed == "peer presented our own site id 2"
    with pytest.raises(ValueError, match="own site id"):
        certs.context(2).client(2)


def test_expired_peer_certificate_is_refused(certs: Pki, tmp_path: Path) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    cert, key = _rogue_cert(
        certs, tmp_path, san=True, not_before=past, not_after=past + datetime.timedelta(days=1)
    )
    server = _raw_handshake(_raw_dtls_client(certs.ca / "ca.pem", cert, key), certs.context(2))
    assert server is not None and not server.established
    assert server.failed == "peer certificate has expired"


def test_client_without_certificate_is_refused(certs: Pki) -> None:
    server = _raw_handshake(_raw_dtls_client(certs.ca / "ca.pem", None, None), certs.context(2))
    assert server is not None and not server.established
    assert server.failed == "peer did not present a certificate"


def test_dtls_1_0_client_gets_no_session(certs: Pki) -> None:
    dtls1_0 = 0xFEFF
    server_ctx = certs.context(2)
    server = _raw_handshake(
        _raw_dtls_client(certs.ca / "ca.pem", None, None, max_version=dtls1_0), server_ctx
    )
    assert server is None
    assert server_ctx.stats["handshake failed"] == 1 and server_ctx.stats["session created"] == 0


def test_spoofed_client_hello_without_cookie_leaves_no_state(certs: Pki) -> None:
    server_ctx = certs.context(2)
    hello = certs.context(1).client(2).start()
    assert len(hello) == 1 and is_client_hello(hello[0])
    for port in range(1000, 1050):
        result = server_ctx.accept(hello[0], f"198.51.100.7:{port}")
        assert result.session is None
        assert len(result.replies) == 1
        reply = result.replies[0]
        assert reply[0] == 22 and reply[13] == HANDSHAKE_HELLO_VERIFY_REQUEST
    assert server_ctx.stats["cookie sent"] == 50
    assert server_ctx.stats["session created"] == 0


def test_cookie_from_another_source_is_refused(certs: Pki) -> None:
    server_ctx = certs.context(2)
    client = certs.context(1).client(2)
    first = server_ctx.accept(client.start()[0], "192.0.2.10:4800")
    hello_with_cookie = [d for r in first.replies for d in client.receive(r)]
    assert len(hello_with_cookie) == 1 and is_client_hello(hello_with_cookie[0])

    elsewhere = server_ctx.accept(hello_with_cookie[0], "192.0.2.99:4800")
    assert elsewhere.session is None
    assert server_ctx.stats["bad cookie"] == 1
    # The honest source still gets its session with the same cookie.
    here = server_ctx.accept(hello_with_cookie[0], "192.0.2.10:4800")
    assert here.session is not None


def test_cookie_secret_rotation_keeps_one_previous_secret(certs: Pki) -> None:
    now = [1000.0]
    server_ctx = certs.context(2, clock=lambda: now[0], cookie_rotate_s=60.0)

    def hello_with_cookie() -> bytes:
        client = certs.context(1).client(2)
        replies = server_ctx.accept(client.start()[0], SOURCE).replies
        return [d for r in replies for d in client.receive(r)][0]

    echo = hello_with_cookie()
    now[0] += 61  # one rotation: the cookie was made with what is now the previous secret
    assert server_ctx.accept(echo, SOURCE).session is not None
    echo = hello_with_cookie()
    server_ctx.rotate_cookie_secret()
    server_ctx.rotate_cookie_secret()
    assert server_ctx.accept(echo, SOURCE).session is None


def _settle_with_timeouts(client: DtlsSession, wire: Wire, limit_s: float = 8.0) -> None:
    deadline = time.monotonic() + limit_s
    while not (client.established and wire.server is not None and wire.server.established):
        assert time.monotonic() < deadline, f"not recovered: {client} / {wire.server}"
        waits = [t for t in (client.timeout(), wire.server and wire.server.timeout()) if t]
        time.sleep(min([*waits, 0.2]))
        c2s = client.on_timeout()
        s2c = wire.server.on_timeout() if wire.server is not None else []
        wire.pump(client, c2s, s2c)


def test_lost_server_flight_is_recovered_by_retransmission(certs: Pki) -> None:
    # s2c #0 is the HelloVerifyRequest; #1 is the server's first flight after the cookie.
    client, wire = connect(
        certs.context(1), certs.context(2), expected=2, drop=lambda d, i, _: d == "s2c" and i == 1
    )
    assert not client.established and client.failed is None
    assert client.timeout() is not None
    _settle_with_timeouts(client, wire)
    assert wire.server is not None
    assert client.export_keys()[0] == wire.server.export_keys()[1]


def test_lost_final_server_flight_is_retransmitted_by_established_server(certs: Pki) -> None:
    dropped: list[bytes] = []

    def drop_last_flight(direction: str, _index: int, datagram: bytes) -> bool:
        # The server's last flight is ChangeCipherSpec + Finished; lose it once.
        if direction == "s2c" and datagram[0] == 20 and not dropped:
            dropped.append(datagram)
            return True
        return False

    client, wire = connect(certs.context(1), certs.context(2), expected=2, drop=drop_last_flight)
    assert dropped and wire.server is not None and wire.server.established
    assert not client.established
    _settle_with_timeouts(client, wire)
    assert client.export_keys()[0] == wire.server.export_keys()[1]


def test_handshake_deadline_fails_with_clear_reason(certs: Pki) -> None:
    now = [0.0]
    ctx = certs.context(1, clock=lambda: now[0], handshake_timeout_s=10.0)
    client = ctx.client(2)
    assert client.timeout() is None
    client.start()
    timeout = client.timeout()
    assert timeout is not None and timeout <= 10.0
    now[0] = 10.5
    assert client.timeout() == 0.0
    assert client.on_timeout() == []
    assert client.failed == "handshake timed out"
    assert client.timeout() is None


def test_garbage_never_raises_and_sessions_survive(certs: Pki) -> None:
    server_ctx = certs.context(2)
    junk = [
        b"",
        b"\x00",
        os.urandom(12),
        os.urandom(200),
        b"\x16\xfe\xfd" + bytes(10),
        b"\x16\xfe\xfd\x00\x00" + bytes(6) + b"\x00\x40" + b"\x01" + os.urandom(80),
        b"\x16\xfe\xfd\x00\x00" + bytes(6) + b"\xff\xff" + b"\x01" + bytes(12),
        b"\x17\xfe\xfd\x00\x01" + bytes(6) + b"\x00\x20" + os.urandom(32),
        b"\x15\xfe\xfd\x00\x00" + bytes(6) + b"\x00\x02" + b"\x02\x28",
    ]
    for datagram in junk:
        result = server_ctx.accept(datagram, SOURCE)
        assert result.session is None
        assert result.reason is not None or result.replies

    client, wire = connect(certs.context(1), server_ctx, expected=2)
    server = wire.server
    assert server is not None
    for datagram in junk:
        client.receive(datagram)
        server.receive(datagram)
    assert client.failed is None and server.failed is None
    for datagram in client.send(b"still alive"):
        server.receive(datagram)
    assert server.take_messages() == [b"still alive"]

    # During a handshake, epoch-0 records are unauthenticated by nature: a malformed handshake
    # message or a forged alert may abort it (the caller retries), but nothing raises.
    for datagram in junk:
        handshaking = certs.context(1).client(2)
        handshaking.start()
        handshaking.receive(datagram)
        if handshaking.failed is not None:
            assert datagram[0] in (21, 22) and record_epoch(datagram) == 0
    forged_alert = handshaking = certs.context(1).client(2)
    handshaking.start()
    handshaking.receive(junk[-1])
    assert forged_alert.failed.startswith("peer sent alert: handshake failure")


@pytest.mark.parametrize("mtu", [400, 576, 1200])
def test_datagrams_never_exceed_the_mtu(certs: Pki, mtu: int) -> None:
    sizes: list[int] = []

    def measure(_direction: str, _index: int, datagram: bytes) -> bool:
        sizes.append(len(datagram))
        return False

    client, wire = connect(certs.context(1), certs.context(2), 2, drop=measure, mtu=mtu)
    assert client.established and wire.server is not None and wire.server.established
    assert max(sizes) <= mtu
    if mtu < 1000:
        # Certificates do not fit such a datagram: the flights really were fragmented.
        assert len(sizes) > 6
    for datagram in wire.server.send(bytes(wire.server.conn.get_cleartext_mtu())):
        assert len(datagram) <= mtu
        client.receive(datagram)
    assert len(client.take_messages()[0]) == wire.server.conn.get_cleartext_mtu()


def test_records_split_and_pack() -> None:
    def rec(kind: int, epoch: int, body: bytes) -> bytes:
        return bytes([kind, 0xFE, 0xFD]) + epoch.to_bytes(2, "big") + bytes(6) + (
            len(body).to_bytes(2, "big") + body
        )

    r1, r2, r3 = rec(22, 0, b"\x01" + bytes(99)), rec(20, 0, b"\x01"), rec(23, 1, bytes(300))
    assert split_records(r1 + r2 + r3) == [r1, r2, r3]
    assert split_records(r1 + r2[:-1]) == [r1]
    assert pack_datagrams([r1, r2, r3], 200) == [r1 + r2, r3]
    assert pack_datagrams([r3], 100) == [r3]
    assert is_client_hello(r1) and not is_client_hello(r3) and not is_client_hello(r2)
    assert record_epoch(r3) == 1 and record_epoch(r1) == 0
    assert record_epoch(b"\x99" + r1[1:]) is None and record_epoch(b"short") is None


def test_context_errors_name_the_file(certs: Pki, tmp_path: Path) -> None:
    ca_pem, cert, key = certs.site(1)
    missing = tmp_path / "absent.pem"
    with pytest.raises(DtlsConfigError, match=str(missing)):
        DtlsContext(missing, cert, key, 1)
    with pytest.raises(DtlsConfigError, match=f"{cert}.*site 1, but this is site 4"):
        DtlsContext(ca_pem, cert, key, 4)
    _, _, other_key = certs.site(2)
    with pytest.raises(DtlsConfigError, match=f"{other_key} does not match"):
        DtlsContext(ca_pem, cert, other_key, 1)
    with pytest.raises(DtlsConfigError, match="not issued by the CA"):
        DtlsContext(certs.other_ca / "ca.pem", cert, key, 1)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(DtlsConfigError, match=str(garbage)):
        DtlsContext(ca_pem, garbage, key, 1)


def _serve_udp(
    ctx: DtlsContext, sock: socket.socket, stop: threading.Event, log: dict[str, object]
) -> None:
    """A minimal UDP responder for one session: answers b"from-client" with b"from-server"."""
    session: DtlsSession | None = None
    peer: tuple[str, int] | None = None
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            data, addr = b"", None
        out: list[bytes] = []
        if addr is not None:
            if session is None:
                result = ctx.accept(data, f"{addr[0]}:{addr[1]}")
                out, session, peer = result.replies, result.session, addr
            else:
                out = session.receive(data)
        elif session is not None and session.timeout() == 0.0:
            out = session.on_timeout()
        if session is not None:
            log["session"] = session
            if any(b"from-client" in m for m in session.take_messages()):
                out += session.send(b"from-server\n")
        for datagram in out:
            sock.sendto(datagram, addr or peer)  # type: ignore[arg-type]


def _wait_for(predicate: Callable[[], bool], limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_interop_with_openssl_s_client(certs: Pki) -> None:
    server_ctx = certs.context(2)
    ca_pem, cert, key = certs.site(9)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    stop = threading.Event()
    log: dict[str, object] = {}
    server = threading.Thread(target=_serve_udp, args=(server_ctx, sock, stop, log), daemon=True)
    server.start()
    proc = subprocess.Popen(
        [
            "openssl", "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
            "-cert", str(cert), "-key", str(key), "-CAfile", str(ca_pem),
            "-verify_return_error", "-cipher", CIPHER_SUITES, "-mtu", "1200",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[bytes] = []
    assert proc.stdin is not None and proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")))
    reader.start()
    try:
        proc.stdin.write(b"from-client\n")
        proc.stdin.flush()
        got_reply = _wait_for(lambda: b"from-server\n" in lines, 10)
        # EOF on stdin makes s_client send close_notify and exit.
        proc.stdin.close()
        proc.wait(timeout=10)
        session = log.get("session")
        assert isinstance(session, DtlsSession)
        closed = _wait_for(lambda: session.closed, 5)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        server.join(5)
        sock.close()
    text = b"".join(lines).decode(errors="replace")
    assert session.established and session.peer_site_id == 9, text
    assert got_reply, text
    assert closed, text
    assert "Verify return code: 0 (ok)" in text, text
    assert CIPHER_SUITES in text, text


def test_client_hello_random_tells_a_new_handshake_from_a_repeat(certs: Pki) -> None:
    """The random survives the cookie round trip; a restarted peer's hello carries
    another one, which is how a responder tells a new handshake from a repeat."""
    client = certs.context(2).client(1)
    hello1 = client.start()[0]
    verify = certs.context(1).accept(hello1, SOURCE)
    assert verify.session is None and verify.replies
    hello2 = client.receive(verify.replies[0])[0]
    assert is_client_hello(hello2) and hello2 != hello1  # now with the cookie
    assert client_hello_random(hello2) == client_hello_random(hello1)
    assert len(client_hello_random(hello1) or b"") == 32
    restarted = certs.context(2).client(1).start()[0]
    assert client_hello_random(restarted) != client_hello_random(hello1)
    assert client_hello_random(b"\x16" + bytes(40)) is None
    assert client_hello_random(b"garbage") is None
