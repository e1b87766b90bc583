"""Certificate renewal from the site (docs/time.md, "Renewal"). When the certificate is within
RENEW_DAYS of its expiry (or on `socketctl renew`), socketd makes a new key and sends a
certificate signing request to the PoP over a live session; the certificate that comes back
is checked (the account CA's, naming this site, for the new key, not expired, expiring later
than the one in use) and kept with its key in the data dir, as one pair that a power cut
cannot tear. From then on, and at every later start, it is the site's identity in place of
`[pki] cert`/`key`, as long as it was issued later than those (an operator's fresh
certificate in [pki] wins).

A notBefore up to FUTURE_SLACK_S ahead of our clock is accepted: our certificate is judged by
the peers' clocks, not ours, and a box whose clock lags must still take its renewal."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sdwan.bindings import tls
from sdwan.common.durable import fsync_dir
from sdwan.common.identity import SITE_URI_PREFIX, identity_from_uris

log = logging.getLogger(__name__)

CREDENTIALS_DIR = "credentials"  # in the data dir: current -> gen-<n>/ with cert.pem, key.pem
CURRENT = "current"
RENEW_DAYS = 30  # renewal starts this close to the certificate's expiry (the warning's too)
ANSWER_TIMEOUT_S = 30.0  # a request the PoP has not answered by then is asked again later
RETRY_S = 3600.0  # after a refusal or no answer; a PoP limits renewals to about this anyway
KEPT_GENERATIONS = 2  # the pair in use and the one before
FUTURE_SLACK_S = 2 * 86400  # a notBefore this far ahead of our clock is still taken
NOT_LATER_RETRY_S = 86400.0  # after a renewal that would not have extended the expiry
# A PoP's renewed certificate is valid from a day before it was signed (pop/renewal.py), one
# from socket-pki from 5 minutes before: added back to compare when each was issued.
RENEWED_BACKDATE_S = 86400
CONFIGURED_BACKDATE_S = 300


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    source: str  # "configured" ([pki]) or "renewed" (the data dir)


def _check_pair(cert_pem: bytes, key_pem: bytes, ca: tls.Certificate, site_id: int,
                now: float) -> tuple[tls.Certificate, int]:
    """The certificate and its notAfter if the pair is one this site can use; ValueError
    says why not."""
    cert = tls.Certificate.from_pem(cert_pem)
    key = tls.PrivateKey.from_pem(key_pem)
    if not key.is_p256() or not key.matches(cert):
        raise ValueError("the key does not match the certificate")
    if not cert.is_issued_by(ca):
        raise ValueError("the certificate is not issued by the account CA")
    if identity_from_uris(cert.san_uris()) != ("site", site_id):
        raise ValueError(f"the certificate does not name site {site_id}")
    not_before, not_after = cert.validity()
    if now >= not_after:
        raise ValueError("the certificate has expired")
    if not_before > now + FUTURE_SLACK_S:
        raise ValueError("the certificate is valid only from "
                         f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(not_before))} UTC, "
                         "more than 2 days from now")
    return cert, not_after


def choose_identity(configured: Pair, ca: tls.Certificate, site_id: int, data_dir: Path,
                    now: float | None = None) -> Pair:
    """The renewed pair in the data dir if it is sound and was issued later (a later
    notBefore, each issuer's backdating added back) than the configured one,
    else the configured pair: an operator's fresh certificate in [pki] wins even when it
    expires sooner (a re-key with fewer days)."""
    now = time.time() if now is None else now
    gen = Path(data_dir) / CREDENTIALS_DIR / CURRENT
    renewed = Pair(gen / "cert.pem", gen / "key.pem", "renewed")
    try:
        cert, _ = _check_pair(renewed.cert.read_bytes(), renewed.key.read_bytes(), ca,
                              site_id, now)
    except FileNotFoundError:
        return configured
    except (OSError, ValueError) as e:
        log.warning("renewed certificate in %s not used: %s", gen, e)
        return configured
    try:
        configured_from = tls.Certificate.from_pem(configured.cert.read_bytes()).validity()[0]
    except (OSError, ValueError):
        return renewed  # DtlsContext says what is wrong with the configured one, if used
    issued = cert.validity()[0] + RENEWED_BACKDATE_S
    return renewed if issued > configured_from + CONFIGURED_BACKDATE_S else configured


def make_request(site_id: int) -> tuple[bytes, bytes]:
    """A new P-256 key (PEM) and a signing request for it naming the site."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"site-{site_id}")]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"{SITE_URI_PREFIX}{site_id}")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def store_pair(data_dir: Path, cert_pem: bytes, key_pem: bytes) -> Pair:
    """Write the pair as a new generation and point `current` at it: each step is a rename,
    so a power cut leaves the old pair or the new one in use, never a mix."""
    base = Path(data_dir) / CREDENTIALS_DIR
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    gens = sorted((int(p.name[4:]) for p in base.glob("gen-*") if p.name[4:].isdigit()),
                  reverse=True)
    n = (gens[0] + 1) if gens else 1
    tmp = base / f"gen-{n}.tmp"
    if tmp.exists():
        for f in tmp.iterdir():
            f.unlink()
    tmp.mkdir(mode=0o700, exist_ok=True)
    for name, data, mode in (("key.pem", key_pem, 0o600), ("cert.pem", cert_pem, 0o644)):
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(tmp)
    os.replace(tmp, base / f"gen-{n}")
    link_tmp = base / f"{CURRENT}.tmp"
    with contextlib.suppress(FileNotFoundError):
        link_tmp.unlink()
    os.symlink(f"gen-{n}", link_tmp)
    os.replace(link_tmp, base / CURRENT)
    fsync_dir(base)
    for old in gens[KEPT_GENERATIONS - 1:]:
        with contextlib.suppress(OSError):
            for f in (base / f"gen-{old}").iterdir():
                f.unlink()
            (base / f"gen-{old}").rmdir()
    cur = base / CURRENT
    return Pair(cur / "cert.pem", cur / "key.pem", "renewed")


class Renewal:
    """The renewal of one site's certificate (see the module docstring). `send(msg)` puts a
    message on a live PoP session (False: none); `on_renewed(pair)` makes the new pair the
    site's identity; `record(kind, text, data)` keeps an event."""

    def __init__(
        self, site_id: int, data_dir: Path, ca: tls.Certificate,
        send: Callable[[dict[str, Any]], bool], on_renewed: Callable[[Pair], None],
        record: Callable[[str, str, dict[str, Any]], None], *,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
    ) -> None:
        self.site_id = site_id
        self.data_dir = Path(data_dir)
        self.ca = ca
        self.send = send
        self.on_renewed = on_renewed
        self.record = record
        self.clock = clock
        self.wall = wall
        self._pending: tuple[bytes, float] | None = None  # the new key, when it was asked
        self._next_try = 0.0
        self._current_until: int | None = None  # the notAfter of the certificate in use
        self.state = "idle"  # idle, asked, renewed, refused, failed
        self.last_error: str | None = None
        self.renewals = 0

    def tick(self, not_after: int, cloud_up: bool) -> None:
        """Ask when the certificate is within RENEW_DAYS of its expiry and a PoP is there."""
        now = self.clock()
        self._current_until = not_after
        if self._pending is not None and now - self._pending[1] > ANSWER_TIMEOUT_S:
            self._fail("failed", f"no answer from the PoP in {ANSWER_TIMEOUT_S:g} s")
        if (self._pending is None and cloud_up and now >= self._next_try
                and not_after - self.wall() <= RENEW_DAYS * 86400):
            self.request()

    def request(self) -> str | None:
        """Ask now; an error (no PoP session) in words, else None."""
        if self._pending is not None:
            return None  # already asked
        key_pem, csr_pem = make_request(self.site_id)
        if not self.send({"t": "renew", "csr": csr_pem.decode("ascii")}):
            self._next_try = self.clock() + 60.0
            return "no PoP session is up to ask"
        self._pending = (key_pem, self.clock())
        self.state = "asked"
        log.info("certificate renewal asked of the PoP")
        return None

    def on_renewed_msg(self, msg: dict[str, Any]) -> None:
        pending = self._pending
        if pending is None:
            return  # an answer to nothing we asked (a duplicate): ignored
        self._pending = None
        cert_pem = msg.get("cert")
        try:
            if not isinstance(cert_pem, str):
                raise ValueError("the answer holds no certificate")
            _, not_after = _check_pair(cert_pem.encode("ascii"), pending[0], self.ca,
                                       self.site_id, self.wall())
            current = self._current_until
            if current is not None and not_after <= current:
                # The CA ends first, or the PoP signs too short: asking again gets the same.
                until = time.strftime("%Y-%m-%d", time.gmtime(not_after))
                self._fail("failed", f"the PoP's certificate was not used: it expires on "
                           f"{until}, no later than the one in use (is the CA expiring?)",
                           retry_s=NOT_LATER_RETRY_S)
                return
            pair = store_pair(self.data_dir, cert_pem.encode("ascii"), pending[0])
        except (OSError, ValueError, UnicodeEncodeError) as e:
            self._fail("failed", f"the PoP's certificate was not used: {e}")
            return
        self.state, self.last_error = "renewed", None
        self.renewals += 1
        self._current_until = not_after
        # Not again before the new certificate is itself within RENEW_DAYS of its expiry.
        self._next_try = self.clock() + max(
            RETRY_S, not_after - RENEW_DAYS * 86400 - self.wall())
        try:
            self.on_renewed(pair)
        except (OSError, ValueError) as e:
            self._fail("failed", f"the renewed certificate could not be loaded: {e}")
            return
        until = time.strftime("%Y-%m-%d", time.gmtime(not_after))
        text = f"certificate renewed: valid until {until}"
        log.info("%s", text)
        self.record("cert.renewed", text, {"path": str(pair.cert), "not_after": not_after})

    def on_refused_msg(self, msg: dict[str, Any]) -> None:
        if self._pending is None:
            return
        self._pending = None
        reason = str(msg.get("reason") or "no reason given")[:200]
        self._fail("refused", f"the PoP refused to renew the certificate: {reason}")

    def _fail(self, state: str, why: str, retry_s: float = RETRY_S) -> None:
        self._pending = None
        self.state, self.last_error = state, why
        self._next_try = self.clock() + retry_s
        log.warning("%s", why)
        self.record("cert.renew_failed", why, {"state": state})

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.last_error, "renewals": self.renewals,
                "renew_days": RENEW_DAYS}
