"""How long our certificates stay valid: their dates as status shows them, and the warnings
before they run out. socketd and popd watch their own certificate and the account CA with it,
so an operator hears of an expiry a month ahead instead of finding a box that no longer
handshakes (docs/security.md "Certificate lifecycle")."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sdwan.bindings import tls

WARN_DAYS = 30  # an expiry this close is warned of
REPEAT_S = 86400.0  # a warning still true is given again this often, not at every check
CHECK_S = 60.0  # how often the dates are compared with the clock


class CertState(StrEnum):
    VALID = "valid"
    EXPIRING = "expiring"  # within WARN_DAYS of its notAfter
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"  # the clock is before its notBefore: usually a wrong clock


def _iso(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class CertDates:
    """One certificate's validity, read once (a certificate never changes in place)."""

    name: str  # "cert", "ca": its key in status
    what: str  # "certificate", "CA certificate": how events name it
    path: Path
    not_before: int  # seconds since the epoch, UTC
    not_after: int

    @classmethod
    def of(cls, name: str, what: str, path: Path, cert: tls.Certificate) -> CertDates:
        nb, na = cert.validity()
        return cls(name, what, path, nb, na)

    def state(self, now: float, warn_days: int = WARN_DAYS) -> CertState:
        if now < self.not_before:
            return CertState.NOT_YET_VALID
        if now >= self.not_after:
            return CertState.EXPIRED
        if now >= self.not_after - warn_days * 86400:
            return CertState.EXPIRING
        return CertState.VALID

    def status(self, now: float, warn_days: int = WARN_DAYS) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "days_left": int((self.not_after - now) // 86400),
            "state": str(self.state(now, warn_days)),
        }


@dataclass(frozen=True)
class CertWarning:
    """An event to record: kind, text, data."""

    kind: str
    text: str
    data: dict[str, Any]


class CertWatch:
    """Compares certificates' dates with the wall clock every CHECK_S. A state other than valid
    is warned of when it begins and again every REPEAT_S while it lasts; the return to valid
    (a renewed certificate, a clock put right) is said once."""

    def __init__(
        self, certs: list[CertDates], warn_days: int = WARN_DAYS,
        wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.certs = certs
        self.warn_days = warn_days
        self._wall = wall
        self._clock = clock
        self._said: dict[str, tuple[CertState, float]] = {}  # name -> (state, when said)
        self._next = 0.0

    def next_due(self) -> float:
        return self._next

    def check(self) -> list[CertWarning]:
        """The warnings due now (none before next_due)."""
        mono = self._clock()
        if mono < self._next:
            return []
        self._next = mono + CHECK_S
        now = self._wall()
        out = []
        for c in self.certs:
            state = c.state(now, self.warn_days)
            last = self._said.get(c.name)
            if last is not None and last[0] is state and (
                state is CertState.VALID or mono - last[1] < REPEAT_S
            ):
                continue
            if last is None and state is CertState.VALID:
                self._said[c.name] = (state, mono)
                continue
            self._said[c.name] = (state, mono)
            out.append(self._warning(c, state, now))
        return out

    def _warning(self, c: CertDates, state: CertState, now: float) -> CertWarning:
        data = {"cert": c.name, **c.status(now, self.warn_days)}
        days = int((c.not_after - now) // 86400)
        if state is CertState.EXPIRING:
            left = f"in {days} day{'s' if days != 1 else ''}" if days >= 1 else "within a day"
            return CertWarning("cert.expiring", f"{c.what} {c.path} expires {left}, on "
                               f"{_iso(c.not_after)}: renew it before then", data)
        if state is CertState.EXPIRED:
            return CertWarning("cert.expired", f"{c.what} {c.path} expired on "
                               f"{_iso(c.not_after)}: no peer accepts it any more", data)
        if state is CertState.NOT_YET_VALID:
            return CertWarning("cert.not_yet_valid", f"{c.what} {c.path} is valid only from "
                               f"{_iso(c.not_before)} but the clock says {_iso(int(now))}: "
                               "the clock is wrong (no time sync?)", data)
        return CertWarning("cert.valid", f"{c.what} {c.path} is valid again, until "
                           f"{_iso(c.not_after)}", data)

    def status(self) -> dict[str, Any]:
        now = self._wall()
        return {c.name: c.status(now, self.warn_days) for c in self.certs}


def watch_identity(
    ca_path: Path, ca: tls.Certificate, cert_path: Path, cert: tls.Certificate,
    wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic,
) -> CertWatch:
    """The watch of a DTLS identity: its certificate and the CA that signed it."""
    return CertWatch([CertDates.of("cert", "certificate", cert_path, cert),
                      CertDates.of("ca", "CA certificate", ca_path, ca)], wall=wall, clock=clock)


def describe(cert: Mapping[str, Any]) -> str:
    """One line of a certificate's status (CertDates.status), as socketctl and popctl show
    it: its state and date, the days left or why it is not valid yet."""
    state = str(cert.get("state"))
    text = f"{state}, until {cert.get('not_after')}"
    if state in ("valid", "expiring"):
        text += f" ({cert.get('days_left')} days left)"
    elif state == "not yet valid":
        text += f", valid from {cert.get('not_before')}: is the clock wrong?"
    return text
