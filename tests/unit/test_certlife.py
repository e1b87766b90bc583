"""Certificate dates and the warnings before they run out (common/certlife.py), on real
certificates from socket-pki read through the firmware's own OpenSSL binding. Only the wall
clock is moved, to look at a certificate from the days before its expiry."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cryptography import x509

from sdwan.bindings import tls
from sdwan.common.certlife import (
    CHECK_S,
    REPEAT_S,
    CertDates,
    CertState,
    CertWatch,
    watch_identity,
)
from sdwan.pop import pki

DAY = 86400


class Clocks:
    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


def load(path: Path) -> tls.Certificate:
    return tls.Certificate.from_pem(path.read_bytes())


@pytest.fixture(scope="module")
def site_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tls.Certificate]:
    d = tmp_path_factory.mktemp("pki")
    pki.create_ca(d, "acct")
    files = pki.issue_site(d, 7, d / "site", days=40)
    return files.cert, load(files.cert)


def test_the_dates_are_the_certificates_own(site_cert: tuple[Path, tls.Certificate]) -> None:
    path, cert = site_cert
    nb, na = cert.validity()
    ref = x509.load_pem_x509_certificate(path.read_bytes())
    assert nb == int(ref.not_valid_before_utc.timestamp())
    assert na == int(ref.not_valid_after_utc.timestamp())
    assert na - nb == pytest.approx(40 * DAY, abs=2 * DAY)  # socket-pki backdates a little


def test_states_across_the_life_of_a_certificate(
    site_cert: tuple[Path, tls.Certificate],
) -> None:
    path, cert = site_cert
    c = CertDates.of("cert", "certificate", path, cert)
    assert c.state(c.not_before - 1) is CertState.NOT_YET_VALID
    assert c.state(c.not_before) is CertState.VALID
    assert c.state(c.not_after - 31 * DAY) is CertState.VALID
    assert c.state(c.not_after - 29 * DAY) is CertState.EXPIRING
    assert c.state(c.not_after) is CertState.EXPIRED
    st = c.status(c.not_after - 12.5 * DAY)
    assert st["days_left"] == 12 and st["state"] == "expiring"
    when = datetime.datetime.fromtimestamp(c.not_after, datetime.UTC)
    assert st["not_after"] == when.strftime("%Y-%m-%d %H:%M UTC")


def test_an_expiry_is_warned_a_month_ahead_once_a_day_then_as_expired(
    site_cert: tuple[Path, tls.Certificate],
) -> None:
    path, cert = site_cert
    c = CertDates.of("cert", "certificate", path, cert)
    clocks = Clocks(c.not_after - 35 * DAY)
    w = CertWatch([c], wall=lambda: clocks.wall, clock=lambda: clocks.mono)
    assert w.check() == []  # valid: nothing to say
    kinds: list[str] = []
    for _ in range(int(35.5 * DAY / CHECK_S)):  # to half a day past the expiry
        clocks.advance(CHECK_S)
        kinds += [x.kind for x in w.check()]
    # Warned when 30 days were left and once a day after; expired, said at once.
    expiring = kinds.count("cert.expiring")
    assert 29 <= expiring <= 31, kinds
    assert kinds.index("cert.expired") == expiring and kinds.count("cert.expired") == 1, kinds
    assert w.status()["cert"]["state"] == "expired"


def test_the_first_warning_names_the_file_and_the_days_left(
    site_cert: tuple[Path, tls.Certificate],
) -> None:
    path, cert = site_cert
    c = CertDates.of("cert", "certificate", path, cert)
    clocks = Clocks(c.not_after - 12.5 * DAY)
    w = CertWatch([c], wall=lambda: clocks.wall, clock=lambda: clocks.mono)
    (warning,) = w.check()
    assert warning.kind == "cert.expiring"
    assert str(path) in warning.text and "in 12 days" in warning.text, warning.text
    assert warning.data["days_left"] == 12 and warning.data["cert"] == "cert"
    clocks.advance(REPEAT_S - CHECK_S)
    assert w.check() == []  # not again within the day
    clocks.advance(CHECK_S)
    assert [x.kind for x in w.check()] == ["cert.expiring"]


def test_a_clock_behind_the_certificate_is_called_wrong_and_its_correction_is_said(
    site_cert: tuple[Path, tls.Certificate],
) -> None:
    path, cert = site_cert
    c = CertDates.of("cert", "certificate", path, cert)
    clocks = Clocks(978307200.0)  # 2001-01-01: an RTC that lost its time
    w = CertWatch([c], wall=lambda: clocks.wall, clock=lambda: clocks.mono)
    (warning,) = w.check()
    assert warning.kind == "cert.not_yet_valid"
    assert "2001-01-01" in warning.text and "the clock is wrong" in warning.text
    clocks.wall = c.not_before + DAY  # put right (a time sync)
    clocks.advance(CHECK_S)
    assert [x.kind for x in w.check()] == ["cert.valid"]
    clocks.advance(CHECK_S)
    assert w.check() == []


def test_the_ca_is_watched_beside_the_certificate(tmp_path: Path) -> None:
    # A CA that runs out first: the site's certificate is cut to it, both are warned of.
    pki.create_ca(tmp_path, "acct", days=20)
    files = pki.issue_site(tmp_path, 3, tmp_path / "site")
    ca_path = tmp_path / pki.CA_CERT_NAME
    clocks = Clocks(time.time() + 2 * DAY)
    w = watch_identity(ca_path, load(ca_path), files.cert, load(files.cert),
                       wall=lambda: clocks.wall, clock=lambda: clocks.mono)
    kinds = sorted(x.kind + ":" + x.data["cert"] for x in w.check())
    assert kinds == ["cert.expiring:ca", "cert.expiring:cert"], kinds
    st = w.status()
    assert set(st) == {"cert", "ca"} and st["ca"]["days_left"] in (17, 18)
