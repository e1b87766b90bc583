"""Who a certificate names: ("site", N) or ("pop", N), read from its subjectAltName URIs.

Owns the naming rule every part of the firmware relies on: a certificate names exactly one
identity through a single ``sdwan:site:<id>`` or ``sdwan:pop:<id>`` URI (the CN is only for
humans). Kept free of any crypto library, so the supervisor reads identities through the same
OpenSSL that does its handshakes (tls.py) and socket-pki through ``cryptography`` (pki.py).
"""

from __future__ import annotations

import re

SITE_URI_PREFIX = "sdwan:site:"
POP_URI_PREFIX = "sdwan:pop:"
SITE_ID_MIN = 1
SITE_ID_MAX = 65535
POP_ID_MIN = 1
POP_ID_MAX = 255
_SITE_URI_RE = re.compile(r"sdwan:site:([0-9]+)")
_POP_URI_RE = re.compile(r"sdwan:pop:([0-9]+)")

# What a certificate names: ("site", N) or ("pop", N).
Identity = tuple[str, int]


def _with_prefix(uris: list[str], prefix: str) -> list[str]:
    return [u for u in uris if u.lower().startswith(prefix)]


def site_id_from_uris(uris: list[str] | None) -> int:
    """The site id named by the single ``sdwan:site:<id>`` URI among ``uris`` (a certificate's
    subjectAltName URIs; None when it has no subjectAltName). ValueError says what is wrong."""
    if uris is None:
        raise ValueError("certificate has no subjectAltName, so it names no site id")
    sites = _with_prefix(uris, SITE_URI_PREFIX)
    if not sites:
        raise ValueError(f"certificate has no '{SITE_URI_PREFIX}<id>' URI in its subjectAltName")
    if len(sites) > 1:
        raise ValueError(f"certificate names several site ids: {', '.join(sites)}")
    match = _SITE_URI_RE.fullmatch(sites[0])
    malformed = f"malformed site URI {sites[0]!r}: expected '{SITE_URI_PREFIX}<1..65535>'"
    if match is None or len(match.group(1)) > 5:
        raise ValueError(malformed)
    site_id = int(match.group(1))
    if not SITE_ID_MIN <= site_id <= SITE_ID_MAX or match.group(1) != str(site_id):
        raise ValueError(malformed)
    return site_id


def identity_from_uris(uris: list[str] | None) -> Identity:
    """("site", N) or ("pop", N) from a certificate's subjectAltName URIs (None: no SAN).

    A certificate naming several identities (two sites, or a site and a PoP) is refused: a
    site key must never be able to pose as a PoP, nor the other way round.
    """
    if uris is None:
        raise ValueError("certificate has no subjectAltName, so it names no identity")
    sites = _with_prefix(uris, SITE_URI_PREFIX)
    pops = _with_prefix(uris, POP_URI_PREFIX)
    if sites and pops:
        raise ValueError(f"certificate names both a site and a PoP: {', '.join(sites + pops)}")
    if sites:
        return ("site", site_id_from_uris(uris))
    if not pops:
        raise ValueError(
            f"certificate has no '{SITE_URI_PREFIX}<id>' or '{POP_URI_PREFIX}<id>' URI"
            " in its subjectAltName"
        )
    if len(pops) > 1:
        raise ValueError(f"certificate names several PoP ids: {', '.join(pops)}")
    match = _POP_URI_RE.fullmatch(pops[0])
    if (
        match is None
        or len(match.group(1)) > 3
        or match.group(1) != str(int(match.group(1)))
        or not POP_ID_MIN <= int(match.group(1)) <= POP_ID_MAX
    ):
        expected = f"'{POP_URI_PREFIX}<{POP_ID_MIN}..{POP_ID_MAX}>'"
        raise ValueError(f"malformed PoP URI {pops[0]!r}: expected {expected}")
    return ("pop", int(match.group(1)))
