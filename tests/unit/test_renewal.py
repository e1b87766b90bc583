"""Certificate renewal's two ends without the network (pop/renewal.py, site/renewal.py): what
popd signs (the session's site id, only a P-256 key the requester proves it holds, at most
once per interval), what a site accepts back, how it keeps the pair and which pair it starts
with. Real keys, requests and certificates throughout; tests/lab/test_time.py runs it over
DTLS between a real socketd and popd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sdwan.bindings import tls
from sdwan.common.identity import site_id_from_uris
from sdwan.pop import pki
from sdwan.pop.renewal import RenewalConfig, RenewalRefused, Renewer
from sdwan.site.renewal import (
    CREDENTIALS_DIR,
    Pair,
    Renewal,
    choose_identity,
    make_request,
    store_pair,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    pki.create_ca(d, "acct")
    return d


def renewer(ca: Path, clock: Clock, **kw: Any) -> Renewer:
    cfg = RenewalConfig(ca_key=ca / pki.CA_KEY_NAME, **kw)
    return Renewer(cfg, ca / pki.CA_CERT_NAME, clock=clock)


def load_ca(ca: Path) -> tls.Certificate:
    return tls.Certificate.from_pem((ca / pki.CA_CERT_NAME).read_bytes())


def test_the_certificate_names_the_sessions_site_whatever_the_request_says(ca: Path) -> None:
    r = renewer(ca, Clock())
    key_pem, csr_pem = make_request(9)  # a request naming site 9, from site 4's session
    pem = r.renew(4, csr_pem.decode())
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert site_id_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier)) == 4
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert cert.public_key() == key.public_key()
    assert r.status()["signed"] == 1


@pytest.mark.parametrize(("csr", "why"), [
    (None, "malformed request"),
    ("x" * 5000, "malformed request"),
    ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "not a PEM certificate signing request"),
])
def test_malformed_requests_are_refused(ca: Path, csr: object, why: str) -> None:
    r = renewer(ca, Clock())
    with pytest.raises(RenewalRefused, match=why):
        r.renew(4, csr)
    assert r.status()["refused"] == 1


def test_a_key_other_than_p256_is_refused(ca: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-4")])).sign(key, hashes.SHA256())
    with pytest.raises(RenewalRefused, match="not an EC P-256 key"):
        renewer(ca, Clock()).renew(4, csr.public_bytes(serialization.Encoding.PEM).decode())


def test_a_request_whose_signature_does_not_verify_is_refused(ca: Path) -> None:
    _, csr_pem = make_request(4)
    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(RenewalRefused, match="signature does not verify"):
        renewer(ca, Clock()).renew(4, tampered.public_bytes(serialization.Encoding.PEM).decode())


def test_one_renewal_per_interval_per_site(ca: Path) -> None:
    clock = Clock()
    r = renewer(ca, clock, min_interval_s=3600)
    r.renew(4, make_request(4)[1].decode())
    with pytest.raises(RenewalRefused, match="at most one renewal per 3600 s"):
        r.renew(4, make_request(4)[1].decode())
    r.renew(5, make_request(5)[1].decode())  # another site is not held back
    clock.t += 3600
    r.renew(4, make_request(4)[1].decode())


def test_without_the_ca_key_or_with_the_wrong_one_nothing_is_signed(
    ca: Path, tmp_path: Path,
) -> None:
    off = Renewer(RenewalConfig(), ca / pki.CA_CERT_NAME)
    with pytest.raises(RenewalRefused, match=r"does not sign renewals \(\[renewal\] ca_key"):
        off.renew(4, make_request(4)[1].decode())
    other = tmp_path / "other"
    pki.create_ca(other, "other")
    wrong = Renewer(RenewalConfig(ca_key=other / pki.CA_KEY_NAME), ca / pki.CA_CERT_NAME)
    assert not wrong.enabled and "is not the key of the account CA" in (wrong.error or "")
    with pytest.raises(RenewalRefused, match="cannot sign renewals"):
        wrong.renew(4, make_request(4)[1].decode())


def site_renewal(ca: Path, data_dir: Path, site_id: int = 4) -> tuple[Renewal, list, list]:
    sent: list[dict] = []
    events: list[tuple[str, str]] = []
    r = Renewal(site_id, data_dir, load_ca(ca), lambda m: sent.append(m) is None,
                lambda _pair: None, lambda k, t, _d: events.append((k, t)))
    return r, sent, events


def test_a_site_keeps_the_answer_as_one_pair_and_starts_with_it(ca: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    r, sent, events = site_renewal(ca, data)
    assert r.request() is None and sent[0]["t"] == "renew"
    cert = renewer(ca, Clock()).renew(4, sent[0]["csr"])
    r.on_renewed_msg({"t": "renewed", "cert": cert.decode()})
    assert [k for k, _ in events] == ["cert.renewed"], events
    cur = data / CREDENTIALS_DIR / "current"
    assert cur.is_symlink() and (cur / "cert.pem").read_bytes() == cert
    assert (cur / "key.pem").stat().st_mode & 0o777 == 0o600
    # At the next start the renewed pair is chosen over the configured one (it ends later).
    short = pki.issue_site(ca, 4, tmp_path / "short", days=10)
    configured = Pair(short.cert, short.key, "configured")
    assert choose_identity(configured, load_ca(ca), 4, data).source == "renewed"
    # An operator's newer certificate in [pki] wins over it.
    newer = pki.issue_site(ca, 4, tmp_path / "newer", days=900)
    assert choose_identity(Pair(newer.cert, newer.key, "configured"), load_ca(ca), 4,
                           data).source == "configured"
    # A second renewal is a new generation; only two are kept.
    for _ in range(2):
        r.request()
        r.on_renewed_msg({"t": "renewed", "cert": renewer(ca, Clock()).renew(
            4, sent[-1]["csr"]).decode()})
    gens = sorted(p.name for p in (data / CREDENTIALS_DIR).glob("gen-*"))
    assert gens == ["gen-2", "gen-3"], gens
    assert (data / CREDENTIALS_DIR / "current").readlink() == Path("gen-3")


def test_a_site_refuses_an_answer_it_cannot_use(ca: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    r, sent, events = site_renewal(ca, data)
    r.request()
    # A certificate for another site (a PoP bug, or an attacker's answer) is not used.
    wrong = renewer(ca, Clock()).renew(5, sent[0]["csr"])
    r.on_renewed_msg({"t": "renewed", "cert": wrong.decode()})
    assert events[-1][0] == "cert.renew_failed" and "does not name site 4" in events[-1][1]
    assert not (data / CREDENTIALS_DIR).exists()
    # Nor one for a key it does not hold, nor one from another CA.
    r._next_try = 0.0  # noqa: SLF001 - ask again at once rather than an hour later
    r.request()
    other_key = renewer(ca, Clock()).renew(4, make_request(4)[1].decode())
    r.on_renewed_msg({"t": "renewed", "cert": other_key.decode()})
    assert "the key does not match the certificate" in events[-1][1]
    r.request()
    foreign = tmp_path / "foreign"
    pki.create_ca(foreign, "x")
    r.on_renewed_msg({"t": "renewed", "cert": renewer(foreign, Clock()).renew(
        4, sent[-1]["csr"]).decode()})
    assert "not issued by the account CA" in events[-1][1]
    # A refusal is said with the PoP's reason; an answer to nothing asked is ignored.
    r.request()
    r.on_refused_msg({"t": "renew-refused", "reason": "not today"})
    assert events[-1] == ("cert.renew_failed",
                          "the PoP refused to renew the certificate: not today")
    n = len(events)
    r.on_refused_msg({"t": "renew-refused", "reason": "again"})
    assert len(events) == n


def test_a_broken_renewed_pair_falls_back_to_the_configured_one(ca: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = pki.issue_site(ca, 4, tmp_path / "good", days=10)
    other = pki.issue_site(ca, 4, tmp_path / "other", days=800)
    # A pair whose key is not its certificate's (a disk that lost a write, say).
    store_pair(data, other.cert.read_bytes(), good.key.read_bytes())
    configured = Pair(good.cert, good.key, "configured")
    assert choose_identity(configured, load_ca(ca), 4, data) == configured
    assert choose_identity(configured, load_ca(ca), 4, tmp_path / "empty") == configured


def test_popd_config_checks_renewal(tmp_path: Path, ca: Path) -> None:
    from sdwan.pop.config import ConfigError, load_pop_config

    pop = pki.issue_pop(ca, 1, tmp_path / "pop")
    (tmp_path / "account.toml").write_text('[account]\nname = "a"\n')
    base = (f'[pop]\nid = 1\naccount = "{tmp_path / "account.toml"}"\n'
            f'[pki]\nca = "{ca / pki.CA_CERT_NAME}"\ncert = "{pop.cert}"\nkey = "{pop.key}"\n')
    path = tmp_path / "pop.toml"
    path.write_text(base + f'[renewal]\nca_key = "{ca / pki.CA_KEY_NAME}"\ndays = 400\n')
    cfg = load_pop_config(path)
    assert cfg.renewal == RenewalConfig(ca_key=ca / pki.CA_KEY_NAME, days=400)
    path.write_text(base + '[renewal]\nca_key = "nope.key"\ndays = 0\nevery = 1\n')
    with pytest.raises(ConfigError) as info:
        load_pop_config(path)
    text = str(info.value)
    assert "renewal.ca_key: file not found" in text and "renewal.days: expected an integer" \
        in text and "renewal.every: unknown key" in text, text
