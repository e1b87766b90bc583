"""Account PKI: the account CA, site certificates, and reading a site id back out of a certificate.

Owns the certificate profile every other part of the firmware relies on:

* the account CA: EC P-256, self-signed, ``BasicConstraints(ca=True, pathlen=0)`` so it can only
  sign site certificates, never another CA;
* a site certificate: EC P-256, subject CN ``site-<id>``, a subjectAltName URI ``sdwan:site:<id>``
  (the authoritative site id; the CN is only for humans), ``ca=False``, EKU clientAuth+serverAuth
  because every site is both DTLS client and server;
* a PoP certificate: the same profile with CN ``pop-<id>`` and the URI ``sdwan:pop:<id>``.
  A certificate names exactly one identity: a site or a PoP, never both.

Also the ``socket-pki`` command line (``init-ca``, ``issue`` and ``issue-pop``). Private keys are
written 0600 and existing files are never overwritten silently.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Sequence
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

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
DEFAULT_ACCOUNT = "sdwan"
DEFAULT_CA_DAYS = 3650
DEFAULT_SITE_DAYS = 825
# Backdating absorbs clock skew between appliances that have just booted and synced NTP.
_BACKDATE = datetime.timedelta(minutes=5)


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


def create_ca(
    ca_dir: str | os.PathLike[str],
    account: str = DEFAULT_ACCOUNT,
    days: int = DEFAULT_CA_DAYS,
) -> CaFiles:
    """Create the account CA in ``ca_dir`` (made if missing); refuses to replace an existing CA."""
    _check_days(days)
    if not account or len(account) > 64:
        raise PkiError(f"account name must be 1..64 characters, got {account!r}")
    directory = Path(ca_dir)
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
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
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # pathlen=0: the account CA signs sites only; a leaked site key cannot mint sites.
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a CA certificate without its key would block a retry of init-ca for nothing.
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return CaFiles(cert=cert_path, key=key_path)


def load_ca(
    ca_dir: str | os.PathLike[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key from ``ca_dir`` with errors naming the offending file."""
    directory = Path(ca_dir)
    if not directory.is_dir():
        raise PkiError(f"CA directory {directory} does not exist (create it with init-ca)")
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{cert_path} not found (create the CA with init-ca)") from None
    except (OSError, ValueError) as e:
        raise PkiError(f"cannot read CA certificate {cert_path}: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"{key_path} not found: the CA key is needed to issue") from None
    except (OSError, ValueError, TypeError) as e:
        raise PkiError(f"cannot read CA key {key_path}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"CA key {key_path} is not an EC key")
    if key.public_key() != cert.public_key():
        raise PkiError(f"CA key {key_path} does not match CA certificate {cert_path}")
    return cert, key


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
    return (
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


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
        description="Create the account CA and issue site and PoP certificates.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init-ca":
            ca = create_ca(args.dir, account=args.account, days=args.days)
            print(f"created account CA {ca.cert} (key {ca.key}, mode 0600)")
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
