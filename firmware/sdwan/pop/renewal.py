"""Certificate renewal at the PoP: a site sends a certificate signing request over its
authenticated session and gets back a certificate of the account CA, so a box is renewed
without a site visit (docs/time.md, "Renewal").

What popd signs is decided here, not by the request: the certificate names the session's
own site id (whatever the request's subject says), carries socket-pki's site profile and
validity, and takes from the request only its public key, which must be P-256 and whose
signature on the request proves the site holds the private key. A site is renewed at most
once per `[renewal] min_interval_s`; popd signs only with `[renewal] ca_key` configured.

Renewal extends an identity, so it is given only to a certificate near its end: the one the
session was made with must expire within WINDOW_DAYS (a site asks at 30 days before). A key
that was stolen cannot be kept alive by asking early and often; an operator who wants a
fresh key sooner issues one with socket-pki, and a stolen key is answered by revoking it
(docs/time.md, "Renewal"). The new certificate is valid from BACKDATE before now, so a site
whose clock lags a little still takes it (a peer judges it by its own clock)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sdwan.pop import pki

MAX_CSR_BYTES = 4096  # a P-256 request is about 500 bytes of PEM
WINDOW_DAYS = 60  # renewed only when the session's certificate expires within this
BACKDATE = datetime.timedelta(days=1)  # a renewed certificate's notBefore, before now
MIN_DAYS = 31  # [renewal] days: more than the 30 days before expiry at which a site asks


@dataclass(frozen=True)
class RenewalConfig:
    """[renewal] of popd's configuration (docs/popd.md)."""

    ca_key: Path | None = None  # the account CA's key: without it popd signs nothing
    days: int = pki.DEFAULT_SITE_DAYS
    min_interval_s: int = 3600


class RenewalRefused(Exception):
    """Why a request was not signed, in words for the site's event and popd's log."""


class Renewer:
    def __init__(self, cfg: RenewalConfig, ca_cert_path: Path,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.wall = wall
        self._last: dict[int, float] = {}  # site id -> when it was last renewed
        self.signed = 0
        self.refused = 0
        self._ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        self.error: str | None = None
        if cfg.ca_key is not None:
            try:
                self._ca = _load_ca(ca_cert_path, cfg.ca_key)
            except (OSError, ValueError) as e:
                self.error = str(e)

    @property
    def enabled(self) -> bool:
        return self._ca is not None

    def renew(self, site_id: int, session_not_after: int | None, csr_pem: object) -> bytes:
        """A certificate (PEM) for site_id with the request's key, asked over a session made
        with a certificate valid until session_not_after; RenewalRefused says why not."""
        try:
            return self._renew(site_id, session_not_after, csr_pem)
        except RenewalRefused:
            self.refused += 1
            raise

    def _renew(self, site_id: int, session_not_after: int | None, csr_pem: object) -> bytes:
        if self._ca is None:
            raise RenewalRefused(
                "this PoP does not sign renewals ([renewal] ca_key is not configured)"
                if self.error is None else f"this PoP cannot sign renewals: {self.error}")
        if session_not_after is None:
            raise RenewalRefused("the session's certificate dates are not known")
        left = session_not_after - self.wall()
        if left > WINDOW_DAYS * 86400:
            until = time.strftime("%Y-%m-%d", time.gmtime(session_not_after))
            raise RenewalRefused(
                f"the certificate is valid until {until}, {int(left // 86400)} days from now: "
                f"renewed only within {WINDOW_DAYS} days of its expiry (a fresh key sooner "
                "is issued with socket-pki)")
        if not isinstance(csr_pem, str) or len(csr_pem) > MAX_CSR_BYTES:
            raise RenewalRefused("malformed request: expected a PEM certificate signing request")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise RenewalRefused("malformed request: not a PEM certificate signing "
                                 "request") from None
        if not csr.is_signature_valid:
            raise RenewalRefused("the request's signature does not verify: the key is not "
                                 "the requester's")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise RenewalRefused("the request's key is not an EC P-256 key")
        now = self.clock()
        last = self._last.get(site_id)
        if last is not None and now - last < self.cfg.min_interval_s:
            raise RenewalRefused(f"renewed {now - last:.0f} s ago: at most one renewal per "
                                 f"{self.cfg.min_interval_s} s")
        ca_cert, ca_key = self._ca
        cert = pki.build_site_certificate(ca_cert, ca_key, site_id, key, self.cfg.days,
                                          backdate=BACKDATE)
        self._last[site_id] = now
        self.signed += 1
        return cert.public_bytes(serialization.Encoding.PEM)

    def status(self) -> dict[str, object]:
        return {"enabled": self.enabled, "error": self.error, "signed": self.signed,
                "refused": self.refused, "days": self.cfg.days, "window_days": WINDOW_DAYS,
                "min_interval_s": self.cfg.min_interval_s}


def _load_ca(
    cert_path: Path, key_path: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key_path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC key")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} is not the key of the account CA {cert_path}")
    return cert, key
