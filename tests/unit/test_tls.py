"""The libssl binding's edges that the DTLS tests do not reach: bad PEM, keys behind a
passphrase, certificates without or with odd subjectAltNames, object lifetimes."""

from __future__ import annotations

import datetime
import gc

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sdwan.bindings import tls


def _cert(key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName] | None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_garbage_pem_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a PEM certificate"):
        tls.Certificate.from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="not an unencrypted PEM key"):
        tls.PrivateKey.from_pem(b"")


def test_encrypted_key_is_refused_without_asking_for_a_passphrase() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="not an unencrypted PEM key"):
        tls.PrivateKey.from_pem(pem)


def test_key_checks() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())

    def load(k: ec.EllipticCurvePrivateKey) -> tls.PrivateKey:
        return tls.PrivateKey.from_pem(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    cert = tls.Certificate.from_pem(_cert(p256, None))
    assert load(p256).is_p256() and not load(p384).is_p256()
    assert load(p256).matches(cert) and not load(p384).matches(cert)
    assert cert.is_issued_by(cert)  # self-signed
    other = tls.Certificate.from_pem(_cert(ec.generate_private_key(ec.SECP256R1()), None))
    assert not cert.is_issued_by(other)


def test_san_uris() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert tls.Certificate.from_pem(_cert(key, None)).san_uris() is None
    sans: list[x509.GeneralName] = [
        x509.DNSName("a.example"),
        x509.UniformResourceIdentifier("sdwan:site:7"),
        x509.UniformResourceIdentifier("https://example.org/x"),
    ]
    uris = tls.Certificate.from_pem(_cert(key, sans)).san_uris()
    assert uris == ["sdwan:site:7", "https://example.org/x"]
    huge = [x509.UniformResourceIdentifier(f"sdwan:x:{'a' * 200}{i}") for i in range(40)]
    with pytest.raises(ValueError, match="malformed or oversized"):
        tls.Certificate.from_pem(_cert(key, huge)).san_uris()


def test_empty_connection_has_nothing_to_send_and_is_freed() -> None:
    ctx = tls.Context()
    conn = tls.Connection(ctx)
    with pytest.raises(tls.WantRead):
        conn.bio_read(100)
    assert conn.get_timeout() is None
    key = tls._key(conn._ptr)
    assert tls._connections.get(key) is conn
    del conn
    gc.collect()
    assert key not in tls._connections
