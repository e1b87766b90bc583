"""Revoked site certificates: the account's list, as popd checks it and as sites get it.

An entry names a site id and the serial number of one certificate of that site. Both are
needed for a match: a serial is only unique under one CA, and naming the site makes a typo
in either visible (socket-pki checks the site is the account's). Serials are kept in one form,
lowercase hex without leading zeros (what `format(cert.serial_number, "x")` gives, and what
`openssl x509 -serial` prints once its leading zeros and case are dropped), so that a serial
read from a certificate during a handshake compares as a plain string.

The list travels in every site's `config` (docs/cloud.md); a site keeps the last one it took
in a store document of its own (site/revoked.py), so a revoked certificate stays refused on
the mesh while the cloud is down.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdwan.common.identity import SITE_ID_MAX, SITE_ID_MIN

# Each entry costs about 70 bytes of every site's config; an account that needs more should
# drop the entries of certificates that have expired anyway.
MAX_REVOKED = 1000
# RFC 5280 allows 20 octets; some CAs write a few more. The handshake reads serials of up to
# this many octets (bindings/tls.py) and refuses longer ones, so the list accepts as many: a
# serial the handshake reads can always be revoked.
MAX_SERIAL_OCTETS = 64
MAX_SERIAL_HEX = 2 * MAX_SERIAL_OCTETS
MAX_NOTE = 200
_HEX_RE = re.compile(r"[0-9a-f]+")
# How every refusal of a revoked certificate ends: the session layer counts them by it.
REVOKED_SUFFIX = " is revoked"


def normalize_serial(text: object) -> str:
    """A serial as written by an operator or a tool ("0x1F", "1f:2a", "01F2A") in the one
    form compared everywhere; ValueError says what is wrong with it."""
    if not isinstance(text, str):
        raise ValueError(f"expected a serial number in hex, got {text!r}")
    raw = text.strip().lower()
    if raw.startswith("0x"):
        raw = raw[2:]
    raw = raw.replace(":", "")
    if not raw or not _HEX_RE.fullmatch(raw):
        raise ValueError(
            f"expected a serial number in hex (such as \"5f2a...\" or \"5F:2A:...\"), got {text!r}"
        )
    value = raw.lstrip("0") or "0"
    if len(value) > MAX_SERIAL_HEX:
        raise ValueError(
            f"serial number {text!r} is longer than {MAX_SERIAL_HEX} hex digits"
            f" ({MAX_SERIAL_OCTETS} octets)"
        )
    return value


def check_site_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a site id (an integer), got {value!r}")
    if not SITE_ID_MIN <= value <= SITE_ID_MAX:
        raise ValueError(f"expected a site id in {SITE_ID_MIN}..{SITE_ID_MAX}, got {value}")
    return value


@dataclass(frozen=True)
class Revoked:
    site_id: int
    serial: str  # normalize_serial's form
    note: str = ""  # why, when, who: for the operator only

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site_id, "serial": self.serial}
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Revocations:
    """The account's revoked certificates; `reason()` is what a handshake check asks."""

    entries: tuple[Revoked, ...] = ()
    _index: frozenset[tuple[int, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", frozenset((e.site_id, e.serial) for e in self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def is_revoked(self, site_id: int, serial: str | None) -> bool:
        return serial is not None and (site_id, serial) in self._index

    def reason(self, site_id: int, serial: str | None) -> str | None:
        """Why a certificate of site_id with this serial is refused, or None."""
        if not self.is_revoked(site_id, serial):
            return None
        return f"certificate of site {site_id} (serial {serial}){REVOKED_SUFFIX}"

    def of_site(self, site_id: int) -> list[str]:
        return [e.serial for e in self.entries if e.site_id == site_id]

    def digest(self) -> str:
        """A short hash of the entries (site and serial, in any order; notes left out): two
        PoPs whose accounts revoke the same certificates show the same one."""
        lines = sorted(f"{site}:{serial}\n" for site, serial in self._index)
        return hashlib.sha256("".join(lines).encode()).hexdigest()[:12]

    def to_list(self) -> list[dict[str, Any]]:
        """As the account document and a site's config carry it."""
        return [e.to_dict() for e in self.entries]

    def for_sites(self) -> list[dict[str, Any]]:
        """As a site's config carries it: no notes, they are the operator's."""
        return [{"site": e.site_id, "serial": e.serial} for e in self.entries]

    @classmethod
    def from_list(cls, items: object, what: str = "revoked") -> Revocations:
        """From a config's or a stored document's list; ValueError names the bad entry."""
        if items is None:
            return cls()
        if not isinstance(items, list):
            raise ValueError(f"{what}: expected a list, got {type(items).__name__}")
        if len(items) > MAX_REVOKED:
            raise ValueError(f"{what}: expected at most {MAX_REVOKED} entries, got {len(items)}")
        entries: list[Revoked] = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ValueError(f"{what}[{i}]: expected an object, got {item!r}")
            try:
                site_id = check_site_id(item.get("site"))
                serial = normalize_serial(item.get("serial"))
            except ValueError as e:
                raise ValueError(f"{what}[{i}]: {e}") from None
            note = item.get("note", "")
            entries.append(Revoked(site_id, serial, note if isinstance(note, str) else ""))
        return cls(tuple(entries))

    @classmethod
    def of(cls, entries: Iterable[Revoked]) -> Revocations:
        return cls(tuple(entries))


PRESENTED_EVERY_S = 60.0  # a refusal of the same site's revoked certificate is said this often


class Presented:
    """When to say that a revoked certificate was presented: at most once per site every
    PRESENTED_EVERY_S, however often it is replayed. The certificate is public, so anyone may
    present it: the text says it was presented, not that the revoked box is back (the
    handshake fails without its key anyway)."""

    def __init__(self, clock: Callable[[], float], every_s: float = PRESENTED_EVERY_S) -> None:
        self.clock = clock
        self.every_s = every_s
        self._said_at: dict[int, float] = {}

    def due(self, site_id: int, serial: str) -> str | None:
        """The event's text if one is due now, else None."""
        now = self.clock()
        last = self._said_at.get(site_id)
        if last is not None and now - last < self.every_s:
            return None
        self._said_at[site_id] = now
        return f"site {site_id}: handshake refused: a revoked certificate was presented" \
               f" (serial {serial})"
