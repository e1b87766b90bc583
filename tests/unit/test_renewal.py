"""Certificate renewal's two ends without the network (pop/renewal.py, site/renewal.py): what
popd signs (the session's site id, only a P-256 key the requester proves it holds, at most
once per interval), what a site accepts back, how it keeps the pair and which pair it starts
with. Real keys, requests and certificates throughout; tests/lab/test_time.py runs it over
DTLS between a real socketd and popd."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
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

NEAR = int(time.time()) + 10 * 86400  # a session certificate within popd's window


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
    pem = r.renew(4, NEAR, csr_pem.decode())
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
        r.renew(4, NEAR, csr)
    assert r.status()["refused"] == 1


def test_a_key_other_than_p256_is_refused(ca: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-4")])).sign(key, hashes.SHA256())
    with pytest.raises(RenewalRefused, match="not an EC P-256 key"):
        renewer(ca, Clock()).renew(4, NEAR, csr.public_bytes(serialization.Encoding.PEM).decode())


def test_a_request_whose_signature_does_not_verify_is_refused(ca: Path) -> None:
    _, csr_pem = make_request(4)
    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(RenewalRefused, match="signature does not verify"):
        renewer(ca, Clock()).renew(
            4, NEAR, tampered.public_bytes(serialization.Encoding.PEM).decode())


def test_one_renewal_per_interval_per_site(ca: Path) -> None:
    clock = Clock()
    r = renewer(ca, clock, min_interval_s=3600)
    r.renew(4, NEAR, make_request(4)[1].decode())
    with pytest.raises(RenewalRefused, match="at most one renewal per 3600 s"):
        r.renew(4, NEAR, make_request(4)[1].decode())
    r.renew(5, NEAR, make_request(5)[1].decode())  # another site is not held back
    clock.t += 3600
    r.renew(4, NEAR, make_request(4)[1].decode())


def test_without_the_ca_key_or_with_the_wrong_one_nothing_is_signed(
    ca: Path, tmp_path: Path,
) -> None:
    off = Renewer(RenewalConfig(), ca / pki.CA_CERT_NAME)
    with pytest.raises(RenewalRefused, match=r"does not sign renewals \(\[renewal\] ca_key"):
        off.renew(4, NEAR, make_request(4)[1].decode())
    other = tmp_path / "other"
    pki.create_ca(other, "other")
    wrong = Renewer(RenewalConfig(ca_key=other / pki.CA_KEY_NAME), ca / pki.CA_CERT_NAME)
    assert not wrong.enabled and "is not the key of the account CA" in (wrong.error or "")
    with pytest.raises(RenewalRefused, match="cannot sign renewals"):
        wrong.renew(4, NEAR, make_request(4)[1].decode())


def site_renewal(ca: Path, data_dir: Path, site_id: int = 4, **kw: Any,
                 ) -> tuple[Renewal, list, list]:
    sent: list[dict] = []
    events: list[tuple[str, str]] = []
    r = Renewal(site_id, data_dir, load_ca(ca), lambda m: sent.append(m) is None,
                lambda _pair: None, lambda k, t, _d: events.append((k, t)), **kw)
    return r, sent, events


def issued_before(ca: Path, site_id: int, out: Path, days_ago: float, days: int = 800) -> None:
    """A site certificate (cert.pem, key.pem in out) whose notBefore is days_ago back."""
    ca_cert, ca_key = pki.load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.build_site_certificate(ca_cert, ca_key, site_id, key.public_key(), days,
                                      backdate=datetime.timedelta(days=days_ago))
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def test_a_site_keeps_the_answer_as_one_pair_and_starts_with_it(ca: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    r, sent, events = site_renewal(ca, data)
    assert r.request() is None and sent[0]["t"] == "renew"
    cert = renewer(ca, Clock()).renew(4, NEAR, sent[0]["csr"])
    r.on_renewed_msg({"t": "renewed", "cert": cert.decode()})
    assert [k for k, _ in events] == ["cert.renewed"], events
    cur = data / CREDENTIALS_DIR / "current"
    assert cur.is_symlink() and (cur / "cert.pem").read_bytes() == cert
    assert (cur / "key.pem").stat().st_mode & 0o777 == 0o600
    # At the next start the renewed pair is chosen over the configured one, issued before it
    # (here a day before, as a box's own would be older still).
    old = tmp_path / "old"
    old.mkdir()
    issued_before(ca, 4, old, days_ago=1)
    configured = Pair(old / "cert.pem", old / "key.pem", "configured")
    assert choose_identity(configured, load_ca(ca), 4, data).source == "renewed"
    # An operator's fresh re-key in [pki] wins over it, though it expires sooner.
    newer = pki.issue_site(ca, 4, tmp_path / "newer", days=90)
    assert choose_identity(Pair(newer.cert, newer.key, "configured"), load_ca(ca), 4,
                           data).source == "configured"
    # A second renewal is a new generation; only two are kept.
    for days in (900, 901):
        r.request()
        r.on_renewed_msg({"t": "renewed", "cert": renewer(ca, Clock(), days=days).renew(
            4, NEAR, sent[-1]["csr"]).decode()})
    gens = sorted(p.name for p in (data / CREDENTIALS_DIR).glob("gen-*"))
    assert gens == ["gen-2", "gen-3"], gens
    assert (data / CREDENTIALS_DIR / "current").readlink() == Path("gen-3")


def test_a_site_refuses_an_answer_it_cannot_use(ca: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    r, sent, events = site_renewal(ca, data)
    r.request()
    # A certificate for another site (a PoP bug, or an attacker's answer) is not used.
    wrong = renewer(ca, Clock()).renew(5, NEAR, sent[0]["csr"])
    r.on_renewed_msg({"t": "renewed", "cert": wrong.decode()})
    assert events[-1][0] == "cert.renew_failed" and "does not name site 4" in events[-1][1]
    assert not (data / CREDENTIALS_DIR).exists()
    # Nor one for a key it does not hold, nor one from another CA.
    r._next_try = 0.0  # noqa: SLF001 - ask again at once rather than an hour later
    r.request()
    other_key = renewer(ca, Clock()).renew(4, NEAR, make_request(4)[1].decode())
    r.on_renewed_msg({"t": "renewed", "cert": other_key.decode()})
    assert "the key does not match the certificate" in events[-1][1]
    r.request()
    foreign = tmp_path / "foreign"
    pki.create_ca(foreign, "x")
    r.on_renewed_msg({"t": "renewed", "cert": renewer(foreign, Clock()).renew(
        4, NEAR, sent[-1]["csr"]).decode()})
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
    path.write_text(base + f'[renewal]\nca_key = "{ca / pki.CA_KEY_NAME}"\ndays = 30\n')
    with pytest.raises(ConfigError) as info:
        load_pop_config(path)
    assert "renewal.days: expected more than 30 days" in str(info.value), str(info.value)


def test_popd_renews_only_a_certificate_within_60_days_of_its_expiry(ca: Path) -> None:
    r = renewer(ca, Clock(), min_interval_s=0)
    now = time.time()
    csr = make_request(4)[1].decode()
    with pytest.raises(RenewalRefused, match="renewed only within 60 days of its expiry"):
        r.renew(4, int(now + 61 * 86400), csr)
    with pytest.raises(RenewalRefused, match="dates are not known"):
        r.renew(4, None, csr)
    assert r.status()["refused"] == 2 and r.status()["signed"] == 0
    pem = r.renew(4, int(now + 59 * 86400), csr)
    # Valid from a day back: a site whose clock lags still takes it.
    cert = x509.load_pem_x509_certificate(pem)
    assert abs(cert.not_valid_before_utc.timestamp() - (now - 86400)) < 60


def test_a_site_whose_clock_lags_takes_its_renewal(ca: Path, tmp_path: Path) -> None:
    for lag_days, taken in ((1.5, True), (3.5, False)):
        data = tmp_path / f"lag{lag_days}"
        data.mkdir()
        r, sent, events = site_renewal(ca, data, wall=lambda d=lag_days: time.time() - d * 86400)
        r.request()
        r.on_renewed_msg({"t": "renewed", "cert": renewer(ca, Clock()).renew(
            4, NEAR, sent[-1]["csr"]).decode()})
        if taken:
            assert [k for k, _ in events] == ["cert.renewed"], events
        else:
            assert events[-1][0] == "cert.renew_failed" and "more than 2 days from now" \
                in events[-1][1], events


def test_after_a_renewal_the_site_waits_until_the_new_certificate_nears_its_expiry(
    ca: Path, tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mono, wall = Clock(), Clock()
    wall.t = time.time()
    r, sent, _events = site_renewal(ca, data, clock=mono, wall=wall)
    r.tick(int(wall.t + 10 * 86400), cloud_up=True)
    assert len(sent) == 1
    # A renewal for 40 days: within the window again after 10 days, not before.
    cert = renewer(ca, Clock(), days=40).renew(4, NEAR, sent[-1]["csr"])
    r.on_renewed_msg({"t": "renewed", "cert": cert.decode()})
    assert r.state == "renewed"
    new = int(x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp())
    for _ in range(3):
        mono.t += 3 * 3600
        wall.t += 3 * 3600
        r.tick(new, cloud_up=True)
    assert len(sent) == 1, "asked again right after a renewal"
    mono.t += 10 * 86400
    wall.t += 10 * 86400
    r.tick(new, cloud_up=True)
    assert len(sent) == 2


def test_a_renewal_that_would_not_extend_the_expiry_is_not_used(ca: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mono = Clock()
    r, sent, events = site_renewal(ca, data, clock=mono)
    # The certificate in use ends later than what the PoP signs (a CA ending first, or a PoP
    # signing for too few days): the answer is not installed, and not asked for hourly.
    current = int(time.time() + 40 * 86400)
    r.request()
    r.tick(current, cloud_up=True)
    r.on_renewed_msg({"t": "renewed", "cert": renewer(ca, Clock(), days=31).renew(
        4, NEAR, sent[-1]["csr"]).decode()})
    assert events[-1][0] == "cert.renew_failed" and "no later than the one in use" \
        in events[-1][1], events
    assert not (data / CREDENTIALS_DIR).exists()
    mono.t += 2 * 3600
    r.tick(int(time.time() + 20 * 86400), cloud_up=True)
    assert len(sent) == 1
