"""The socket's off-cloud transport rules: the account's network rules as the PoP's `config`
carries them, compiled for the fast path and shown.

Owns, per docs/popd.md ("Network rules") and docs/dataplane.md ("Transport rules"): reading
the `rules` of the cloud config (site names already resolved to subnets by the PoP; a config
whose rules cannot be read leaves the rules in force as they were, and says why), compiling
them into the fast path's rule table (a complex rule, one with application-aware fields,
becomes a rule that sends what its simple fields match through the PoP) and installing it
in one call, and the `rules` status: each rule in order, its hits, and which transport its
traffic takes now, read from the routes paths.py chose (each with its off-cloud and cloud
peer). Which peer a packet takes is decided in the fast path, per flow; nothing here runs
per packet.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdwan.bindings.fastpath import FastPath, FastPathError, Network, TransportRule
from sdwan.site.paths import Choice, Paths, Transport

log = logging.getLogger("sdwan.site.rules")

PROTOCOLS: dict[str, int | None] = {"any": None, "tcp": 6, "udp": 17, "icmp": 1}
TRANSPORTS = ("offcloud", "cloud")
SECONDARIES = ("automatic", "none", "cloud")
COMPLEX_NOTE = "not evaluated on the socket: its traffic goes to the PoP"
# Destinations listed per rule in `rules` (all are counted): a rule for any destination in a
# large account would otherwise list every site, once per rule.
MAX_LISTED_DESTINATIONS = 256
_RULE_FIELDS = frozenset({"name", "transport", "secondary", "src", "dst", "src_subnets",
                          "dst_subnets", "protocol", "ports", "complex"})


@dataclass(frozen=True)
class SiteRule:
    """One rule as the socket holds it: what the config said, and what the fast path got."""

    name: str
    transport: str
    secondary: str | None
    protocol: str
    src: tuple[str, ...] | None  # as the account wrote them; None: any
    dst: tuple[str, ...] | None
    src_subnets: tuple[Network, ...]  # () with src None: any
    dst_subnets: tuple[Network, ...]
    ports: tuple[tuple[int, int], ...]
    complex: tuple[str, ...]  # the application-aware fields it uses

    @property
    def fp_rule(self) -> TransportRule:
        """A complex rule matches on its simple fields and sends that traffic to the PoP."""
        key = int.from_bytes(
            hashlib.blake2b(json.dumps(self.key_fields(), sort_keys=True).encode(),
                            digest_size=8).digest(),
            "big",
        )
        return TransportRule(
            key=key,
            transport="cloud" if self.complex else self.transport,
            secondary=self.secondary or "automatic",
            protocol=PROTOCOLS[self.protocol],
            src=self.src_subnets,
            dst=self.dst_subnets,
            ports=self.ports,
        )

    def key_fields(self) -> dict[str, Any]:
        """What names the rule across config changes: its hits stay with it while this
        does not change."""
        return {
            "name": self.name,
            "transport": self.transport,
            "secondary": self.secondary,
            "protocol": self.protocol,
            "src": [str(n) for n in self.src_subnets] if self.src is not None else None,
            "dst": [str(n) for n in self.dst_subnets] if self.dst is not None else None,
            "ports": [list(p) for p in self.ports],
            "complex": list(self.complex),
        }


def _strings(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of strings")
    return tuple(value)


def _subnets(value: Any, what: str) -> tuple[Network, ...] | None:
    items = _strings(value, what)
    if items is None:
        return None
    if not items:
        raise ValueError(f"{what} is empty (null is any)")
    return tuple(ipaddress.ip_network(v, strict=True) for v in items)


def _choice(value: Any, choices: Iterable[str], what: str) -> str:
    if value not in tuple(choices):
        raise ValueError(f"{what} {value!r} is not one of {', '.join(choices)}")
    return str(value)


def compile_rule(raw: Any) -> SiteRule:
    """One entry of the config's `rules` (docs/cloud.md); ValueError says what is wrong."""
    if not isinstance(raw, Mapping):
        raise ValueError("not an object")
    unknown = sorted(set(raw) - _RULE_FIELDS)
    if unknown:
        # A match ignored would match more than the account meant.
        raise ValueError(f"unknown field(s) {', '.join(map(str, unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("no name")
    transport = _choice(raw.get("transport"), TRANSPORTS, "transport")
    secondary = raw.get("secondary")
    if transport == "offcloud":
        secondary = _choice(secondary or "automatic", SECONDARIES, "secondary")
    elif secondary is not None:
        raise ValueError("a cloud rule with a secondary")
    protocol = _choice(raw.get("protocol", "any"), PROTOCOLS, "protocol")
    ports_raw = raw.get("ports") or []
    if not isinstance(ports_raw, list):
        raise ValueError("ports is not a list")
    ports = []
    for p in ports_raw:
        if (
            not isinstance(p, list)
            or len(p) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in p)
            or not 1 <= p[0] <= p[1] <= 65535
        ):
            raise ValueError(f"port range {p!r} is not [low, high] within 1..65535")
        ports.append((p[0], p[1]))
    if ports and protocol == "icmp":
        raise ValueError("ports with protocol icmp")
    src_subnets = _subnets(raw.get("src_subnets"), "src_subnets")
    dst_subnets = _subnets(raw.get("dst_subnets"), "dst_subnets")
    complex_fields = _strings(raw.get("complex") or [], "complex") or ()
    return SiteRule(
        name=name,
        transport=transport,
        secondary=secondary,
        protocol=protocol,
        src=_strings(raw.get("src"), "src") if src_subnets is not None else None,
        dst=_strings(raw.get("dst"), "dst") if dst_subnets is not None else None,
        src_subnets=src_subnets or (),
        dst_subnets=dst_subnets or (),
        ports=tuple(ports),
        complex=complex_fields,
    )


def compile_rules(raw: Any) -> list[SiteRule]:
    """The config's whole `rules` list (absent: none); ValueError names the bad entry."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("rules is not a list")
    out = []
    for i, entry in enumerate(raw):
        try:
            out.append(compile_rule(entry))
        except (ValueError, TypeError) as e:
            name = entry.get("name") if isinstance(entry, Mapping) else None
            raise ValueError(f"rule {i}{f' ({name})' if name else ''}: {e}") from None
    return out


def _overlaps(net: Network, among: Sequence[Network]) -> bool:
    return any(net.version == n.version and net.overlaps(n) for n in among)


class Rules:
    """The transport rules of one socket: installed in the fast path from the cloud config,
    shown with their hits and the transport each takes now."""

    def __init__(
        self,
        fp: FastPath,
        paths: Paths,
        local: Iterable[Network | str] = (),
        directory: Callable[[], Sequence[Mapping[str, Any]]] = list,
    ) -> None:
        self.fp = fp
        self.paths = paths
        self.local = tuple(ipaddress.ip_network(n) for n in local)
        self.directory = directory
        self.rules: list[SiteRule] = []
        self.error: str | None = None  # why the last config's rules were not taken
        self.installs = 0

    def load(self, config: Mapping[str, Any] | None) -> None:
        """Take the rules of a cloud config (None: none yet). A config whose rules cannot be
        read or installed leaves those in force as they were."""
        raw = (config or {}).get("rules")
        try:
            rules = compile_rules(raw)
        except ValueError as e:
            self._refuse(f"rules of the cloud config not taken: {e}")
            return
        if rules == self.rules and self.error is None and self.installs:
            return
        try:
            self.fp.rules_set([r.fp_rule for r in rules])
        except (FastPathError, ValueError) as e:
            self._refuse(f"rules not installed in the fast path: {e}")
            return
        self.rules, self.error = rules, None
        self.installs += 1
        n_complex = sum(1 for r in rules if r.complex)
        log.info("transport rules: %d installed, %d of them complex", len(rules), n_complex)
        for r in rules:
            if r.complex:
                log.info("rule %s uses %s: %s", r.name, ", ".join(r.complex), COMPLEX_NOTE)

    def _refuse(self, why: str) -> None:
        if why != self.error:
            log.warning("%s (the rules in force stay)", why)
        self.error = why

    # ---------------------------------------------------------------- status

    def _is_local(self, nets: Sequence[Network]) -> bool:
        """Whether this site's LAN is among nets (() = any)."""
        return not nets or any(_overlaps(n, nets) for n in self.local)

    def _destinations(self, rule: SiteRule, routes: Mapping[Network, Choice]) -> list[Network]:
        """The routed prefixes the rule can match traffic to: its dst when this site may be
        its source, its src when this site may be its destination (the answers)."""
        out: list[Network] = []
        if self._is_local(rule.src_subnets):
            out += [p for p in routes if not rule.dst_subnets or _overlaps(p, rule.dst_subnets)]
        if rule.dst_subnets and self._is_local(rule.dst_subnets):
            out += [p for p in routes if not rule.src_subnets or _overlaps(p, rule.src_subnets)]
        return sorted(set(out), key=lambda n: (n.version, int(n.network_address), n.prefixlen))

    @staticmethod
    def transport_for(rule: SiteRule, choice: Choice) -> str:
        """What the fast path does with the rule's traffic to a prefix routed by choice:
        `offcloud`, `dropped`, or the transport of the route it follows (docs/socketctl.md)."""
        pick = str(choice.candidate.transport)
        if rule.complex or rule.transport == "cloud":
            return str(Transport.CLOUD) if choice.cloud_peer else pick
        if choice.offcloud_peer:
            return "offcloud"
        if rule.secondary == "automatic" and choice.candidate.transport is not Transport.ALT_WAN:
            return pick
        if rule.secondary == "automatic" and choice.cloud_peer:
            # Alt-WAN is never an off-cloud rule's secondary: the cloud path, else dropped.
            return str(Transport.CLOUD)
        if rule.secondary == "cloud" and choice.cloud_peer:
            return str(Transport.CLOUD)
        return "dropped"

    def status(self) -> dict[str, Any]:
        try:
            counters = self.fp.rules_counters()
            hits, evaluations = counters.hits, counters.evaluations
        except FastPathError:
            hits, evaluations = [], 0
        routes = self.paths.chosen()
        sites: dict[Network, Mapping[str, Any]] = {}
        for entry in self.directory():
            for n in entry.get("subnets") or []:
                try:
                    sites[ipaddress.ip_network(n)] = entry
                except ValueError:
                    continue
        rows = []
        for i, rule in enumerate(self.rules):
            dests = []
            for prefix in self._destinations(rule, routes):
                site = sites.get(prefix, {})
                dests.append({
                    "prefix": str(prefix),
                    "site_id": site.get("site_id"),
                    "site": site.get("name"),
                    "transport": self.transport_for(rule, routes[prefix]),
                })
            by_transport: dict[str, int] = {}
            for d in dests:
                by_transport[d["transport"]] = by_transport.get(d["transport"], 0) + 1
            used = sorted(by_transport)
            rows.append({
                "index": i,
                "name": rule.name,
                "transport": rule.transport,
                "secondary": rule.secondary,
                "protocol": rule.protocol,
                "src": list(rule.src) if rule.src is not None else None,
                "dst": list(rule.dst) if rule.dst is not None else None,
                "src_subnets": [str(n) for n in rule.src_subnets] or None,
                "dst_subnets": [str(n) for n in rule.dst_subnets] or None,
                "ports": [list(p) for p in rule.ports],
                "complex": list(rule.complex),
                "evaluated": not rule.complex,
                "note": f"uses {', '.join(rule.complex)}: {COMPLEX_NOTE}" if rule.complex
                else None,
                "hits": hits[i] if i < len(hits) else 0,
                "now": used[0] if len(used) == 1 else ("mixed" if used else None),
                "by_transport": by_transport,
                "destinations": dests[:MAX_LISTED_DESTINATIONS],
                "destinations_total": len(dests),
            })
        return {
            "rules": rows,
            "error": self.error,
            "evaluations": evaluations,
            "drops": self.fp.global_counters().drops.get("offcloud_down", 0),
        }
