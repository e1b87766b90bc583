"""socket-pki's firmware signing CA and bundle signer, and their separation from the account CA."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdwan.pop import pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_firmware_ca_and_signer_profile(tmp_path: Path) -> None:
    ca = pki.create_firmware_ca(tmp_path / "fw", name="acme", days=40)
    assert (ca.cert.name, ca.key.name) == ("firmware-ca.pem", "firmware-ca.key")
    assert _mode(ca.key) == 0o600 and _mode(ca.cert) == 0o644
    assert _mode(tmp_path / "fw") == 0o700
    ca_cert = _load(ca.cert)
    assert isinstance(ca_cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert pki.is_firmware_ca(ca_cert) and not pki.is_development_ca(ca_cert)

    signer = pki.issue_firmware_signer(tmp_path / "fw", days=1000)
    assert (signer.cert.name, signer.key.name) == ("signer.pem", "signer.key")
    assert _mode(signer.key) == 0o600
    cert = _load(signer.cert)
    cert.verify_directly_issued_by(ca_cert)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    # No SAN: a signer names no site or PoP, so no handshake can take it for one.
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # Capped at the CA's own end.
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_development_ca_is_marked(tmp_path: Path) -> None:
    ca = pki.create_firmware_ca(tmp_path, development=True)
    assert pki.is_development_ca(_load(ca.cert))
    signer = pki.issue_firmware_signer(tmp_path)
    cn = _load(signer.cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert "DEVELOPMENT" in str(cn)


def test_firmware_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    pki.create_firmware_ca(tmp_path)
    before = (tmp_path / "firmware-ca.key").read_bytes()
    with pytest.raises(pki.PkiError, match="refusing to overwrite an existing firmware CA"):
        pki.create_firmware_ca(tmp_path)
    assert (tmp_path / "firmware-ca.key").read_bytes() == before


def test_signer_needs_force_to_reissue(tmp_path: Path) -> None:
    pki.create_firmware_ca(tmp_path)
    first = pki.issue_firmware_signer(tmp_path)
    old = first.key.read_bytes()
    with pytest.raises(pki.PkiError, match="--force"):
        pki.issue_firmware_signer(tmp_path)
    assert first.key.read_bytes() == old
    again = pki.issue_firmware_signer(tmp_path, force=True)
    assert again.key.read_bytes() != old and _mode(again.key) == 0o600


def test_signer_into_another_directory(tmp_path: Path) -> None:
    pki.create_firmware_ca(tmp_path / "offline")
    signer = pki.issue_firmware_signer(tmp_path / "offline", tmp_path / "build-host")
    assert signer.cert == tmp_path / "build-host" / "signer.pem"
    assert not (tmp_path / "offline" / "signer.key").exists()


def test_firmware_ca_refuses_an_account_directory(tmp_path: Path) -> None:
    pki.create_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="is an account CA directory"):
        pki.create_firmware_ca(tmp_path)
    assert not (tmp_path / "firmware-ca.key").exists()


def test_firmware_ca_refuses_a_directory_of_site_keys(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "ca")
    pki.issue_site(tmp_path / "ca", 3, tmp_path / "site3")
    with pytest.raises(pki.PkiError, match="account CA directory.*site-3"):
        pki.create_firmware_ca(tmp_path / "site3")


def test_account_ca_refuses_a_firmware_directory(tmp_path: Path) -> None:
    pki.create_firmware_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="holds the firmware signing key"):
        pki.create_ca(tmp_path)
    assert not (tmp_path / "ca.key").exists()


def test_no_site_from_the_firmware_ca_and_no_signer_from_the_account_ca(tmp_path: Path) -> None:
    pki.create_firmware_ca(tmp_path / "fw")
    pki.create_ca(tmp_path / "acct")
    with pytest.raises(pki.PkiError, match="holds the firmware signing CA, not an account CA"):
        pki.issue_site(tmp_path / "fw", 1)
    with pytest.raises(pki.PkiError, match="is an account CA directory, not a firmware CA"):
        pki.issue_firmware_signer(tmp_path / "acct")
    # Nor the keys of one into the other's directory.
    with pytest.raises(pki.PkiError, match="refusing to put a firmware signing key there"):
        pki.issue_firmware_signer(tmp_path / "fw", tmp_path / "acct")
    with pytest.raises(pki.PkiError, match="refusing to put the key of site-1 there"):
        pki.issue_site(tmp_path / "acct", 1, tmp_path / "fw")
    with pytest.raises(pki.PkiError, match="refusing to put the key of pop-1 there"):
        pki.issue_pop(tmp_path / "acct", 1, tmp_path / "fw")


def test_a_firmware_ca_renamed_to_ca_pem_is_still_refused(tmp_path: Path) -> None:
    """The check is on the certificate too, not only on the file names."""
    fw = pki.create_firmware_ca(tmp_path / "fw")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ca.pem").write_bytes(fw.cert.read_bytes())
    (tmp_path / "x" / "ca.key").write_bytes(fw.key.read_bytes())
    with pytest.raises(pki.PkiError, match="is a firmware signing CA"):
        pki.issue_site(tmp_path / "x", 1)
    acct = pki.create_ca(tmp_path / "acct")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "firmware-ca.pem").write_bytes(acct.cert.read_bytes())
    (tmp_path / "y" / "firmware-ca.key").write_bytes(acct.key.read_bytes())
    with pytest.raises(pki.PkiError, match="is not a firmware signing CA"):
        pki.issue_firmware_signer(tmp_path / "y")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fw, acct = str(tmp_path / "fw"), str(tmp_path / "acct")
    assert pki.main(["firmware-ca", fw, "--name", "acme", "--development"]) == 0
    assert "DEVELOPMENT firmware CA" in capsys.readouterr().out
    assert pki.main(["firmware-signer", fw]) == 0
    assert "issued firmware signer" in capsys.readouterr().out
    assert pki.main(["firmware-signer", fw]) == 1
    assert "--force" in capsys.readouterr().err
    assert pki.main(["firmware-signer", fw, "--force"]) == 0
    capsys.readouterr()
    assert pki.main(["init-ca", fw]) == 1
    assert "holds the firmware signing key" in capsys.readouterr().err
    assert pki.main(["init-ca", acct]) == 0
    capsys.readouterr()
    assert pki.main(["firmware-ca", acct]) == 1
    assert "is an account CA directory" in capsys.readouterr().err
    assert pki.main(["firmware-signer", acct]) == 1
    assert "not a firmware CA directory" in capsys.readouterr().err
    assert pki.main(["firmware-signer", str(tmp_path / "none")]) == 1
    assert "create it with firmware-ca" in capsys.readouterr().err


def test_development_keys_are_valid_from_long_before_a_build_that_made_them(
    tmp_path: Path,
) -> None:
    """A box whose clock sits at the image's build time (an older commit's time) takes the
    bundles of development keys made after it; production keys are not backdated."""
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    dev, prod = tmp_path / "dev", tmp_path / "prod"
    for d, development in ((dev, True), (prod, False)):
        pki.create_firmware_ca(d, development=development)
        pki.issue_firmware_signer(d)
    for name in ("firmware-ca.pem", "signer.pem"):
        assert _load(dev / name).not_valid_before_utc <= now - datetime.timedelta(days=700)
        assert _load(prod / name).not_valid_before_utc >= now - datetime.timedelta(hours=1)
