"""socket-pki: the account CA, site certificates, and site ids read back from certificates."""

from __future__ import annotations

import datetime
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdwan.pop import pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_profile(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path / "ca", account="acme", days=30)
    assert ca.cert == tmp_path / "ca" / "ca.pem" and ca.key == tmp_path / "ca" / "ca.key"
    assert _mode(ca.key) == 0o600
    cert = _load(ca.cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    cert.verify_directly_issued_by(cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, minutes=10)


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    pki.create_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(pki.PkiError, match="refusing to overwrite an existing CA"):
        pki.create_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before


def test_issue_site_profile(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path / "ca")
    site = pki.issue_site(tmp_path / "ca", 42, tmp_path / "out")
    assert site.cert == tmp_path / "out" / "site-42.pem"
    assert site.key == tmp_path / "out" / "site-42.key"
    assert _mode(site.key) == 0o600
    cert = _load(site.cert)
    cert.verify_directly_issued_by(_load(ca.cert))
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-42"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["sdwan:site:42"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert pki.site_id_from_certificate(cert) == 42


def test_issue_defaults_to_ca_dir_and_refuses_existing(tmp_path: Path) -> None:
    pki.create_ca(tmp_path)
    site = pki.issue_site(tmp_path, 7)
    assert site.cert == tmp_path / "site-7.pem"
    with pytest.raises(pki.PkiError, match="--force"):
        pki.issue_site(tmp_path, 7)
    old = site.cert.read_bytes()
    again = pki.issue_site(tmp_path, 7, force=True)
    assert again.cert.read_bytes() != old and _mode(again.key) == 0o600


@pytest.mark.parametrize("bad", [0, 65536, -1, True, "3"])
def test_issue_rejects_bad_site_ids(tmp_path: Path, bad: object) -> None:
    pki.create_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="site id"):
        pki.issue_site(tmp_path, bad)  # type: ignore[arg-type]


def test_issue_without_ca_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match=f"{tmp_path / 'nope'} does not exist"):
        pki.issue_site(tmp_path / "nope", 1)
    (tmp_path / "half").mkdir()
    with pytest.raises(pki.PkiError, match="ca.pem not found"):
        pki.issue_site(tmp_path / "half", 1)


def _cert_with_san(san: x509.SubjectAlternativeName | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-5")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256())


def _uris(*values: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(v) for v in values])


@pytest.mark.parametrize(
    ("san", "message"),
    [
        (None, "no subjectAltName"),
        (x509.SubjectAlternativeName([x509.DNSName("site-5.example")]), "no 'sdwan:site:<id>'"),
        (_uris("https://example.com/site/5"), "no 'sdwan:site:<id>'"),
        (_uris("sdwan:site:"), "malformed site URI"),
        (_uris("sdwan:site:abc"), "malformed site URI"),
        (_uris("sdwan:site:0"), "malformed site URI"),
        (_uris("sdwan:site:65536"), "malformed site URI"),
        (_uris("sdwan:site:007"), "malformed site URI"),
        (_uris("sdwan:site:5/x"), "malformed site URI"),
        (_uris("sdwan:site:5", "sdwan:site:6"), "several site ids"),
    ],
)
def test_site_id_from_certificate_errors(
    san: x509.SubjectAlternativeName | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pki.site_id_from_certificate(_cert_with_san(san))


def test_site_id_ignores_the_common_name() -> None:
    cert = _cert_with_san(_uris("https://example.com", "sdwan:site:65535"))
    assert pki.site_id_from_certificate(cert) == 65535


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdwan.pop.pki", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(Path(pki.__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"},
    )


def test_cli_round_trip_and_errors(tmp_path: Path) -> None:
    ok = _cli("init-ca", str(tmp_path / "ca"), "--account", "acme", "--days", "100")
    assert ok.returncode == 0, ok.stderr
    assert "created account CA" in ok.stdout

    again = _cli("init-ca", str(tmp_path / "ca"))
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr

    issued = _cli("issue", str(tmp_path / "ca"), "--site-id", "3", "--out", str(tmp_path / "s"))
    assert issued.returncode == 0, issued.stderr
    assert pki.site_id_from_certificate(_load(tmp_path / "s" / "site-3.pem")) == 3

    exists = _cli("issue", str(tmp_path / "ca"), "--site-id", "3", "--out", str(tmp_path / "s"))
    assert exists.returncode != 0 and "refusing to overwrite" in exists.stderr

    bad_id = _cli("issue", str(tmp_path / "ca"), "--site-id", "70000")
    assert bad_id.returncode != 0 and "1..65535" in bad_id.stderr

    not_int = _cli("issue", str(tmp_path / "ca"), "--site-id", "two")
    assert not_int.returncode != 0 and "must be an integer" in not_int.stderr

    no_dir = _cli("issue", str(tmp_path / "missing"), "--site-id", "4")
    assert no_dir.returncode != 0 and "does not exist" in no_dir.stderr

    bad_days = _cli("init-ca", str(tmp_path / "ca2"), "--days", "0")
    assert bad_days.returncode != 0 and "days" in bad_days.stderr
