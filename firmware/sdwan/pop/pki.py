"""Account PKI: the account CA, site certificates, and reading a site id back out of a certificate.

Owns the certificate profile every other part of the firmware relies on:

* the account CA: EC P-256, self-signed, ``BasicConstraints(ca=True, pathlen=0)`` so it can only
  sign site certificates, never another CA;
* a site certificate: EC P-256, subject CN ``site-<id>``, a subjectAltName URI ``sdwan:site:<id>``
  (the authoritative site id; the CN is only for humans), ``ca=False``, EKU clientAuth+serverAuth
  because every site is both DTLS client and server;
* a PoP certificate: the same profile with CN ``pop-<id>`` and the URI ``sdwan:pop:<id>``.
  A certificate names exactly one identity: a site or a PoP, never both.

Apart from the account, the firmware signing CA (``firmware-ca``) and the certificate it
issues to sign update bundles (``firmware-signer``): EC P-256, the CA ``pathlen=0``, the signer
``digitalSignature`` with extendedKeyUsage codeSigning (RAUC's ``check-purpose=codesign``). A
directory holds one kind of CA or the other, never both: a leaked account or site key must not
be able to sign firmware, nor a leaked firmware key to mint sites (docs/update.md).

Also the ``socket-pki`` command line (``init-ca``, ``issue``, ``issue-pop``, ``revoke``,
``firmware-ca`` and ``firmware-signer``).
Private keys are written 0600 and existing files are never overwritten silently. ``revoke``
adds a ``[[revoked]]`` entry (site id and certificate serial) to the account file, which popd
applies on its next reload (docs/security.md, "Revoking a site's certificate").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdwan.common.identity import (
    POP_ID_MAX,
    POP_ID_MIN,
    POP_URI_PREFIX,
    SITE_ID_MAX,
    SITE_ID_MIN,
    SITE_URI_PREFIX,
    Identity,
    identity_from_uris,
    site_id_from_uris,
)
from sdwan.common.revocation import MAX_NOTE, normalize_serial
from sdwan.pop.account import ConfigError, load_account

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
DEFAULT_ACCOUNT = "sdwan"
DEFAULT_CA_DAYS = 3650
DEFAULT_SITE_DAYS = 825
FIRMWARE_CA_CERT_NAME = "firmware-ca.pem"
FIRMWARE_CA_KEY_NAME = "firmware-ca.key"
SIGNER_CERT_NAME = "signer.pem"
SIGNER_KEY_NAME = "signer.key"
# Boxes keep the firmware CA in their keyring for as long as they are in the field.
DEFAULT_FIRMWARE_CA_DAYS = 7300
DEFAULT_SIGNER_DAYS = 1825
FIRMWARE_CA_SUFFIX = "firmware signing CA"
DEVELOPMENT_MARK = "DEVELOPMENT"
# Backdating absorbs clock skew between appliances that have just booted and synced NTP.
_BACKDATE = datetime.timedelta(minutes=5)
# Development firmware keys are made by the first build that needs them, after the commit
# whose time is the image's build time, the clock floor of a box whose RTC has lost its
# time: valid from two years back, a box at that floor still takes their bundles.
DEVELOPMENT_BACKDATE = datetime.timedelta(days=730)


class PkiError(Exception):
    """A PKI operation failed; the message is meant for the operator as is."""


@dataclass(frozen=True)
class CaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class SiteFiles:
    site_id: int
    cert: Path
    key: Path


@dataclass(frozen=True)
class PopFiles:
    pop_id: int
    cert: Path
    key: Path


def check_site_id(site_id: int) -> int:
    """Return ``site_id`` if it is a valid site id, else raise PkiError."""
    if isinstance(site_id, bool) or not isinstance(site_id, int):
        raise PkiError(f"site id must be an integer, got {site_id!r}")
    if not SITE_ID_MIN <= site_id <= SITE_ID_MAX:
        raise PkiError(f"site id must be in {SITE_ID_MIN}..{SITE_ID_MAX}, got {site_id}")
    return site_id


def check_pop_id(pop_id: int) -> int:
    """Return ``pop_id`` if it is a valid PoP id, else raise PkiError."""
    if isinstance(pop_id, bool) or not isinstance(pop_id, int):
        raise PkiError(f"PoP id must be an integer, got {pop_id!r}")
    if not POP_ID_MIN <= pop_id <= POP_ID_MAX:
        raise PkiError(f"PoP id must be in {POP_ID_MIN}..{POP_ID_MAX}, got {pop_id}")
    return pop_id


def _san_uris(cert: x509.Certificate) -> list[str] | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """("site", N) or ("pop", N): see identity.identity_from_uris."""
    return identity_from_uris(_san_uris(cert))


def site_id_from_certificate(cert: x509.Certificate) -> int:
    """The site id bound in ``cert`` by its single ``sdwan:site:<id>`` SAN URI.

    Raises ValueError with a human-readable reason when the URI is missing, duplicated or
    malformed; the CN is deliberately ignored since only the SAN is authoritative.
    """
    return site_id_from_uris(_san_uris(cert))


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: a key that already exists is never replaced behind the operator's back.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PkiError(f"validity must be a positive number of days, got {days!r}")
    return days


def _sign_leaf(
    builder: x509.CertificateBuilder,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """A leaf's key identifiers (its own and its CA's), signed by the CA."""
    return (
        builder
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, name: x509.Name, days: int,
    backdate: datetime.timedelta = _BACKDATE,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + datetime.timedelta(days=days))
        # pathlen=0: a CA signs leaves only; a leaked leaf key cannot mint more leaves.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _account_files(directory: Path) -> list[Path]:
    """What marks directory as the account's: its CA, site or PoP certificates and keys."""
    if not directory.is_dir():
        return []
    found = [directory / n for n in (CA_CERT_NAME, CA_KEY_NAME) if (directory / n).exists()]
    for pattern in ("site-*.pem", "site-*.key", "pop-*.pem", "pop-*.key"):
        found += sorted(directory.glob(pattern))
    return found


def _firmware_files(directory: Path) -> list[Path]:
    """What marks directory as the firmware signing key's."""
    if not directory.is_dir():
        return []
    names = (FIRMWARE_CA_CERT_NAME, FIRMWARE_CA_KEY_NAME, SIGNER_CERT_NAME, SIGNER_KEY_NAME)
    return [directory / n for n in names if (directory / n).exists()]


def _refuse_firmware_dir(directory: Path, what: str) -> None:
    found = _firmware_files(directory)
    if found:
        raise PkiError(
            f"{directory} holds the firmware signing key ({', '.join(p.name for p in found)}):"
            f" refusing to put {what} there. The account CA and the firmware signing CA must"
            " live in separate directories, so that neither key can stand in for the other"
            " (docs/update.md)"
        )


def _refuse_account_dir(directory: Path, what: str) -> None:
    found = _account_files(directory)
    if found:
        shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise PkiError(
            f"{directory} is an account CA directory ({shown}): refusing to put {what}"
            " there. The firmware signing CA and the account CA must live in separate"
            " directories, so that neither key can stand in for the other (docs/update.md)"
        )


def create_ca(
    ca_dir: str | os.PathLike[str],
    account: str = DEFAULT_ACCOUNT,
    days: int = DEFAULT_CA_DAYS,
) -> CaFiles:
    """Create the account CA in ``ca_dir`` (made if missing); refuses to replace an existing CA
    and to share a directory with the firmware signing CA."""
    _check_days(days)
    if not account or len(account) > 64:
        raise PkiError(f"account name must be 1..64 characters, got {account!r}")
    directory = Path(ca_dir)
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    _refuse_firmware_dir(directory, "the account CA")
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing:
        raise PkiError(f"refusing to overwrite an existing CA: {', '.join(existing)} already exist")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, account),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{account} account CA"),
        ]
    )
    cert = _ca_certificate(key, name, days)
    # Key first: a CA certificate without its key would block a retry of init-ca for nothing.
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return CaFiles(cert=cert_path, key=key_path)


def _load_key_pair(
    cert_path: Path, key_path: Path, what: str, hint: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{cert_path} not found ({hint})") from None
    except (OSError, ValueError) as e:
        raise PkiError(f"cannot read {what} certificate {cert_path}: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"{key_path} not found: the {what} key is needed to issue") from None
    except (OSError, ValueError, TypeError) as e:
        raise PkiError(f"cannot read {what} key {key_path}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{what} key {key_path} is not an EC key")
    if key.public_key() != cert.public_key():
        raise PkiError(f"{what} key {key_path} does not match {what} certificate {cert_path}")
    return cert, key


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def is_firmware_ca(cert: x509.Certificate) -> bool:
    """Whether cert is a firmware signing CA of socket-pki (by its subject)."""
    return _common_name(cert).endswith(FIRMWARE_CA_SUFFIX)


def is_development_ca(cert: x509.Certificate) -> bool:
    """Whether cert is a development firmware CA, which no production box may trust."""
    return is_firmware_ca(cert) and DEVELOPMENT_MARK in _common_name(cert).split()


def load_ca(
    ca_dir: str | os.PathLike[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key from ``ca_dir`` with errors naming the offending file."""
    directory = Path(ca_dir)
    if not directory.is_dir():
        raise PkiError(f"CA directory {directory} does not exist (create it with init-ca)")
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    if not cert_path.exists() and (directory / FIRMWARE_CA_CERT_NAME).exists():
        raise PkiError(
            f"{directory} holds the firmware signing CA, not an account CA: site and PoP"
            " certificates come from the account CA (init-ca), in a directory of its own"
        )
    cert, key = _load_key_pair(cert_path, key_path, "CA", "create the CA with init-ca")
    if is_firmware_ca(cert):
        raise PkiError(
            f"{cert_path} is a firmware signing CA ({_common_name(cert)!r}), not an account CA:"
            " it signs firmware only"
        )
    return cert, key


# ---------------------------------------------------------------- firmware signing


@dataclass(frozen=True)
class FirmwareCaFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class SignerFiles:
    cert: Path
    key: Path


def create_firmware_ca(
    ca_dir: str | os.PathLike[str],
    name: str = DEFAULT_ACCOUNT,
    days: int = DEFAULT_FIRMWARE_CA_DAYS,
    development: bool = False,
) -> FirmwareCaFiles:
    """Create the firmware signing CA in ``ca_dir``: ``firmware-ca.pem`` (the boxes' keyring)
    and ``firmware-ca.key``. Refuses to replace one, and to share a directory with the
    account CA or its sites. ``development`` marks the subject so that every bundle signed
    under it says so."""
    _check_days(days)
    if not name or len(name) > 64:
        raise PkiError(f"name must be 1..64 characters, got {name!r}")
    directory = Path(ca_dir)
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    _refuse_account_dir(directory, "the firmware signing CA")
    cert_path, key_path = directory / FIRMWARE_CA_CERT_NAME, directory / FIRMWARE_CA_KEY_NAME
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing:
        raise PkiError(
            f"refusing to overwrite an existing firmware CA: {', '.join(existing)} already"
            " exist (every box trusts it: a new one means a new keyring on every box)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    label = f"{name} {DEVELOPMENT_MARK} {FIRMWARE_CA_SUFFIX}" if development else (
        f"{name} {FIRMWARE_CA_SUFFIX}")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, label),
        ]
    )
    cert = _ca_certificate(key, subject, days,
                           DEVELOPMENT_BACKDATE if development else _BACKDATE)
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return FirmwareCaFiles(cert=cert_path, key=key_path)


def load_firmware_ca(
    ca_dir: str | os.PathLike[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The firmware CA's certificate and key from ``ca_dir``; refuses an account CA."""
    directory = Path(ca_dir)
    if not directory.is_dir():
        raise PkiError(
            f"firmware CA directory {directory} does not exist (create it with firmware-ca)"
        )
    cert_path = directory / FIRMWARE_CA_CERT_NAME
    if not cert_path.exists() and (directory / CA_CERT_NAME).exists():
        raise PkiError(
            f"{directory} is an account CA directory, not a firmware CA directory: firmware"
            " is signed under its own CA (firmware-ca), in a directory of its own"
        )
    cert, key = _load_key_pair(
        cert_path, directory / FIRMWARE_CA_KEY_NAME, "firmware CA",
        "create the firmware CA with firmware-ca",
    )
    if not is_firmware_ca(cert):
        raise PkiError(
            f"{cert_path} is not a firmware signing CA of socket-pki (its subject is"
            f" {cert.subject.rfc4514_string()!r})"
        )
    return cert, key


def build_signer_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    days: int = DEFAULT_SIGNER_DAYS,
) -> x509.Certificate:
    """A bundle signing certificate: not a CA, digitalSignature, extendedKeyUsage codeSigning
    only (so it can neither be a DTLS peer nor pass a TLS purpose check). Under a
    development CA it is backdated as that CA is (DEVELOPMENT_BACKDATE)."""
    _check_days(days)
    now = datetime.datetime.now(datetime.UTC)
    if ca_cert.not_valid_after_utc <= now:
        raise PkiError(
            f"the firmware CA {_common_name(ca_cert)!r} expired on"
            f" {ca_cert.not_valid_after_utc:%Y-%m-%d}: no signer can be issued from it, and"
            " boxes refuse bundles signed under it (a new CA needs a new keyring on every box)"
        )
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    label = _common_name(ca_cert).removesuffix(FIRMWARE_CA_SUFFIX) + "firmware signer"
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(org[0].value))] if org else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([*names, x509.NameAttribute(NameOID.COMMON_NAME, label)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - (DEVELOPMENT_BACKDATE if is_development_ca(ca_cert)
                                 else _BACKDATE))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    )
    return _sign_leaf(builder, public_key, ca_cert, ca_key)


def issue_firmware_signer(
    ca_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    days: int = DEFAULT_SIGNER_DAYS,
    force: bool = False,
) -> SignerFiles:
    """Issue ``signer.pem`` and ``signer.key`` from the firmware CA into ``out_dir`` (default:
    the CA dir), never into an account CA directory."""
    _check_days(days)
    ca_cert, ca_key = load_firmware_ca(ca_dir)
    directory = Path(out_dir) if out_dir is not None else Path(ca_dir)
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    _refuse_account_dir(directory, "a firmware signing key")
    cert_path, key_path = directory / SIGNER_CERT_NAME, directory / SIGNER_KEY_NAME
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise PkiError(
            f"refusing to overwrite {', '.join(map(str, existing))} (use --force to reissue)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_signer_certificate(ca_cert, ca_key, key.public_key(), days)
    for p in existing:
        p.unlink()
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return SignerFiles(cert=cert_path, key=key_path)


# ---------------------------------------------------------------- site and PoP certificates


def build_site_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    site_id: int,
    public_key: ec.EllipticCurvePublicKey,
    days: int = DEFAULT_SITE_DAYS,
    backdate: datetime.timedelta = _BACKDATE,
) -> x509.Certificate:
    """Sign a site certificate for ``public_key`` (the profile described in the module doc),
    valid from ``backdate`` before now."""
    check_site_id(site_id)
    return _build_leaf(
        ca_cert, ca_key, f"site-{site_id}", f"{SITE_URI_PREFIX}{site_id}", public_key, days,
        backdate,
    )


def build_pop_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    pop_id: int,
    public_key: ec.EllipticCurvePublicKey,
    days: int = DEFAULT_SITE_DAYS,
) -> x509.Certificate:
    """Sign a PoP certificate: the site profile with CN ``pop-<id>``, URI ``sdwan:pop:<id>``."""
    check_pop_id(pop_id)
    return _build_leaf(
        ca_cert, ca_key, f"pop-{pop_id}", f"{POP_URI_PREFIX}{pop_id}", public_key, days
    )


def _build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    uri: str,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    backdate: datetime.timedelta = _BACKDATE,
) -> x509.Certificate:
    _check_days(days)
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
            critical=False,
        )
    )
    return _sign_leaf(builder, public_key, ca_cert, ca_key)


def _issue(
    ca_dir: str | os.PathLike[str],
    name: str,
    build: Callable[
        [x509.Certificate, ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey], x509.Certificate
    ],
    out_dir: str | os.PathLike[str] | None,
    force: bool,
) -> tuple[Path, Path]:
    """Write ``<name>.pem`` and ``<name>.key`` into ``out_dir`` (default: the CA dir)."""
    ca_cert, ca_key = load_ca(ca_dir)
    directory = Path(out_dir) if out_dir is not None else Path(ca_dir)
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    _refuse_firmware_dir(directory, f"the key of {name}")
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise PkiError(
            f"refusing to overwrite {', '.join(map(str, existing))} (use --force to reissue)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    cert = build(ca_cert, ca_key, key.public_key())
    for p in existing:
        p.unlink()
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue_site(
    ca_dir: str | os.PathLike[str],
    site_id: int,
    out_dir: str | os.PathLike[str] | None = None,
    days: int = DEFAULT_SITE_DAYS,
    force: bool = False,
) -> SiteFiles:
    """Issue ``site-<id>.pem`` and ``site-<id>.key`` into ``out_dir`` (default: the CA dir)."""
    check_site_id(site_id)
    _check_days(days)
    cert, key = _issue(
        ca_dir,
        f"site-{site_id}",
        lambda ca_cert, ca_key, pub: build_site_certificate(ca_cert, ca_key, site_id, pub, days),
        out_dir,
        force,
    )
    return SiteFiles(site_id=site_id, cert=cert, key=key)


def issue_pop(
    ca_dir: str | os.PathLike[str],
    pop_id: int,
    out_dir: str | os.PathLike[str] | None = None,
    days: int = DEFAULT_SITE_DAYS,
    force: bool = False,
) -> PopFiles:
    """Issue ``pop-<id>.pem`` and ``pop-<id>.key`` into ``out_dir`` (default: the CA dir)."""
    check_pop_id(pop_id)
    _check_days(days)
    cert, key = _issue(
        ca_dir,
        f"pop-{pop_id}",
        lambda ca_cert, ca_key, pub: build_pop_certificate(ca_cert, ca_key, pop_id, pub, days),
        out_dir,
        force,
    )
    return PopFiles(pop_id=pop_id, cert=cert, key=key)


@dataclass(frozen=True)
class Revocation:
    site_id: int
    serial: str
    account: Path
    added: bool  # False: the account already revoked it


def serial_of(cert: x509.Certificate) -> str:
    """The serial in the form the account and the handshakes compare (revocation.py);
    ValueError for one the handshake refuses anyway (negative, or too long to read)."""
    number = cert.serial_number
    if number < 0:
        raise ValueError(f"its serial number is negative ({number:#x}), which no handshake accepts")
    return normalize_serial(format(number, "x"))


def toml_string(text: str) -> str:
    """text as a TOML basic string: quotes, backslashes and control characters escaped, the
    rest (any Unicode, emoji included) written as UTF-8, which TOML takes as it is."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_TOML_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
    "\r": "\\r",
}


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"certificate {path} not found") from None
    except OSError as e:
        raise PkiError(f"cannot read certificate {path}: {e.strerror or e}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            raise PkiError(f"{path} is not a PEM or DER certificate") from None


def revoke_site(
    account_path: str | os.PathLike[str],
    site_id: int,
    *,
    cert: str | os.PathLike[str] | None = None,
    serial: str | None = None,
    reason: str = "",
    now: datetime.datetime | None = None,
) -> Revocation:
    """Add a [[revoked]] entry for one certificate of site_id to the account file.

    The certificate is named by its file or its serial (exactly one of the two). The account
    must load before and after (the file is replaced atomically, so popd never reads half of
    it), the site must be the account's (a typo would revoke nothing) and a certificate file
    must name that site.
    """
    check_site_id(site_id)
    if (cert is None) == (serial is None):
        raise PkiError("name the certificate to revoke: either its file (--cert) or --serial")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in reason):
        raise PkiError("reason is not valid text (it holds a lone surrogate)")
    if len(reason) > MAX_NOTE - 40 or not reason.isprintable():
        raise PkiError(f"reason must be at most {MAX_NOTE - 40} printable characters")
    if cert is not None:
        cert_path = Path(cert)
        certificate = _read_certificate(cert_path)
        try:
            named = identity_from_certificate(certificate)
        except ValueError as e:
            raise PkiError(f"{cert_path}: {e}") from None
        if named != ("site", site_id):
            raise PkiError(
                f"{cert_path} is the certificate of {named[0]} {named[1]}, not of site {site_id}"
            )
        try:
            serial = serial_of(certificate)
        except ValueError as e:
            raise PkiError(f"{cert_path}: {e}") from None
    else:
        assert serial is not None
        try:
            serial = normalize_serial(serial)
        except ValueError as e:
            raise PkiError(str(e)) from None
    path = Path(account_path)
    # Through a symlink to the file it names: the link stays a link.
    target = Path(os.path.realpath(path))
    with _locked(target) as fd:
        try:
            account = load_account(target)
        except ConfigError as e:
            raise PkiError(f"the account file has errors, nothing changed:\n{e}") from None
        site = account.site(site_id)
        if site is None:
            known = ", ".join(f"{s.id} ({s.name})" for s in account.sites[:20])
            raise PkiError(f"site {site_id} is not in the account {path} (its sites: {known})")
        if account.revoked.is_revoked(site_id, serial):
            return Revocation(site_id, serial, path, added=False)
        when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        note = f"revoked {when}" + (f": {reason}" if reason else "")
        text = target.read_text(encoding="utf-8")
        # Appended, not rewritten: the operator's comments and layout stay as they were.
        entry = (
            f"\n[[revoked]]\nsite = {site_id}\nserial = \"{serial}\"\nnote = {toml_string(note)}\n"
        )
        new_text = text + ("" if text.endswith("\n") or not text else "\n") + entry
        _replace_checked(target, os.fstat(fd), new_text, load_account, ConfigError)
    return Revocation(site_id, serial, path, added=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """An exclusive fcntl lock on the account file for a read-modify-write: a second
    `revoke` waits, then reads what the first wrote (the file it locked may have been
    replaced meanwhile: it locks the new one then)."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PkiError(f"account file {path} not found") from None
        except OSError as e:
            raise PkiError(f"cannot open the account file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)


def _replace_checked(
    path: Path,
    st: os.stat_result,
    text: str,
    load: Callable[[Path], object],
    error: type[Exception],
) -> None:
    """Write text over path (a regular file, not a link) atomically (same directory, fsync,
    rename) once it loads, with the owner, group and mode of the file it replaces (st)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    raise PkiError(
                        f"cannot give the new {path} its owner and group"
                        f" ({st.st_uid}:{st.st_gid}); run as root or as its owner, nothing"
                        " changed"
                    ) from None
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.fsync(f.fileno())
        try:
            load(tmp)
        except error as e:
            raise PkiError(
                f"the account with the new entry would not load, nothing changed (edit"
                f" {path} by hand):\n{e}"
            ) from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _pop_id_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"PoP id must be an integer, got {text!r}") from None
    if not POP_ID_MIN <= value <= POP_ID_MAX:
        raise argparse.ArgumentTypeError(
            f"PoP id must be in {POP_ID_MIN}..{POP_ID_MAX}, got {value}"
        )
    return value


def _site_id_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"site id must be an integer, got {text!r}") from None
    if not SITE_ID_MIN <= value <= SITE_ID_MAX:
        raise argparse.ArgumentTypeError(
            f"site id must be in {SITE_ID_MIN}..{SITE_ID_MAX}, got {value}"
        )
    return value


def _days_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"days must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"days must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socket-pki",
        description="Create the account CA and issue site and PoP certificates; create the"
        " firmware signing CA and its bundle signer.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init-ca", help="create DIR/ca.pem and DIR/ca.key")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--account", default=DEFAULT_ACCOUNT, help="account name (CA subject)")
    init.add_argument("--days", type=_days_arg, default=DEFAULT_CA_DAYS)
    issue = sub.add_parser("issue", help="issue OUTDIR/site-N.pem and site-N.key")
    issue.add_argument("dir", metavar="DIR", help="the CA directory")
    issue.add_argument("--site-id", type=_site_id_arg, required=True)
    issue.add_argument("--out", metavar="OUTDIR", default=None, help="default: DIR")
    issue.add_argument("--days", type=_days_arg, default=DEFAULT_SITE_DAYS)
    issue.add_argument("--force", action="store_true", help="replace an existing certificate")
    pop = sub.add_parser("issue-pop", help="issue OUTDIR/pop-N.pem and pop-N.key")
    pop.add_argument("dir", metavar="DIR", help="the CA directory")
    pop.add_argument("--pop-id", type=_pop_id_arg, required=True)
    pop.add_argument("--out", metavar="OUTDIR", default=None, help="default: DIR")
    pop.add_argument("--days", type=_days_arg, default=DEFAULT_SITE_DAYS)
    pop.add_argument("--force", action="store_true", help="replace an existing certificate")
    revoke = sub.add_parser(
        "revoke",
        help="revoke one certificate of a site in the account file (popd applies it on reload)",
    )
    revoke.add_argument("account", metavar="ACCOUNT", help="popd's account file")
    revoke.add_argument("--site-id", type=_site_id_arg, required=True)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--cert", metavar="FILE",
        help="the certificate to revoke (PEM or DER): run revoke before `issue --force`"
        " overwrites it with the replacement",
    )
    which.add_argument(
        "--serial", metavar="HEX",
        help="its serial number in hex (as `popctl sites` shows it for each session)",
    )
    revoke.add_argument("--reason", default="", help="kept in the entry's note")
    fwca = sub.add_parser(
        "firmware-ca",
        help="create DIR/firmware-ca.pem and firmware-ca.key, the firmware signing CA (a"
        " directory apart from the account CA)",
    )
    fwca.add_argument("dir", metavar="DIR")
    fwca.add_argument("--name", default=DEFAULT_ACCOUNT, help="organisation (CA subject)")
    fwca.add_argument("--days", type=_days_arg, default=DEFAULT_FIRMWARE_CA_DAYS)
    fwca.add_argument(
        "--development", action="store_true",
        help="mark it a development CA (what `make bundle` makes when FIRMWARE_KEYS is missing)",
    )
    signer = sub.add_parser(
        "firmware-signer",
        help="issue OUTDIR/signer.pem and signer.key from the firmware CA, to sign bundles",
    )
    signer.add_argument("dir", metavar="DIR", help="the firmware CA directory")
    signer.add_argument("--out", metavar="OUTDIR", default=None, help="default: DIR")
    signer.add_argument("--days", type=_days_arg, default=DEFAULT_SIGNER_DAYS)
    signer.add_argument("--force", action="store_true", help="replace an existing signer")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init-ca":
            ca = create_ca(args.dir, account=args.account, days=args.days)
            print(f"created account CA {ca.cert} (key {ca.key}, mode 0600)")
        elif args.command == "revoke":
            r = revoke_site(
                args.account, args.site_id, cert=args.cert, serial=args.serial, reason=args.reason
            )
            if not r.added:
                print(f"certificate serial {r.serial} of site {r.site_id} is already revoked in"
                      f" {r.account}; nothing changed")
            else:
                print(f"revoked certificate serial {r.serial} of site {r.site_id} in {r.account};"
                      " popd refuses it and ends its sessions once it reloads the account"
                      " (popctl reload, or SIGHUP)")
                print("every PoP of the account must refuse it too: revoke it in each PoP's"
                      " account file (the same file everywhere) and reload each popd; compare"
                      " the revoked count and hash in `popctl status` of every PoP")
        elif args.command == "firmware-ca":
            fw = create_firmware_ca(
                args.dir, name=args.name, days=args.days, development=args.development
            )
            kind = "DEVELOPMENT firmware CA" if args.development else "firmware signing CA"
            print(f"created {kind} {fw.cert} (key {fw.key}, mode 0600); the boxes' keyring is"
                  f" {fw.cert}. Keep the key offline, apart from the account CA")
        elif args.command == "firmware-signer":
            sf = issue_firmware_signer(args.dir, args.out, days=args.days, force=args.force)
            end = x509.load_pem_x509_certificate(sf.cert.read_bytes()).not_valid_after_utc
            ca_end = load_firmware_ca(args.dir)[0].not_valid_after_utc
            print(f"issued firmware signer {sf.cert} (key {sf.key}, mode 0600), valid until"
                  f" {end:%Y-%m-%d}" + (" (the firmware CA's end)" if end == ca_end else "")
                  + ": boxes refuse bundles signed with it after that, re-issue it before")
        elif args.command == "issue-pop":
            pop = issue_pop(args.dir, args.pop_id, args.out, days=args.days, force=args.force)
            print(f"issued PoP {pop.pop_id}: {pop.cert} (key {pop.key}, mode 0600)")
        else:
            site = issue_site(args.dir, args.site_id, args.out, days=args.days, force=args.force)
            print(f"issued site {site.site_id}: {site.cert} (key {site.key}, mode 0600)")
    except PkiError as e:
        print(f"socket-pki: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"socket-pki: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
