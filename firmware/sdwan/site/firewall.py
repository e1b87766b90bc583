"""The LAN firewall of a site: owns the nftables table `inet sdwan_lanfw` (docs/firewall.md).

The account's policy arrives in the cloud's `config` (its `firewall`, site names already
resolved to subnets by the PoP). `Policy.from_wire` checks it, `ruleset` turns it into one nft
script that replaces the whole table in one transaction, and `Firewall` applies it when it
changed: at start-up from the stored config, before traffic flows, and later off the
supervisor's loop. It keeps what is in force and why a policy is not, and reads the rules'
counters back (`nft -j`) when asked. Nothing else touches the table; socketd leaves it in place
when it stops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdwan.common.tomlcheck import IPNetwork, fmt_loc, format_ports, port_spec, show

log = logging.getLogger("sdwan.site.firewall")

TABLE = "sdwan_lanfw"
NFT_TIMEOUT_S = 10.0
MAX_RULES = 1000
MAX_MATCHES = 256  # entries of one src, dst or ports list
MAX_ERROR_CHARS = 2000
DEFAULT_COMMENT = "(default)"  # rule names cannot hold parentheses
INVALID_COMMENT = "(invalid)"
ACTIONS = ("allow", "deny")
PROTOCOLS = ("tcp", "udp", "icmp", "any")
_RULE_KEYS = frozenset(("name", "action", "src", "dst", "protocol", "ports"))
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

EventSink = Callable[[str, str, dict[str, Any]], None]


class PolicyError(ValueError):
    """A policy that cannot be applied: the message names the field (`rules[0].src[1]: ...`)."""


class NftError(Exception):
    """nft refused or could not run; the message is nft's own."""


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Rule:
    """One rule: None in src, dst or ports means any."""

    name: str
    action: str
    src: tuple[IPNetwork, ...] | None = None
    dst: tuple[IPNetwork, ...] | None = None
    protocol: str = "any"
    ports: tuple[tuple[int, int], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire form (docs/cloud.md), also what `socketctl firewall` lists."""
        return {
            "name": self.name,
            "action": self.action,
            "src": None if self.src is None else [str(n) for n in self.src],
            "dst": None if self.dst is None else [str(n) for n in self.dst],
            "protocol": self.protocol,
            "ports": None if self.ports is None else [format_ports(*p) for p in self.ports],
        }


@dataclass(frozen=True)
class Policy:
    default: str = "allow"
    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_wire(cls, doc: Any) -> Policy:
        """The `firewall` of a cloud config, checked; None (a config without one) is an
        account without a firewall: allow everything. Raises PolicyError naming the field.
        Unknown fields are refused: a rule that ignored a match would match more than meant."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise PolicyError(f"expected an object, got {show(doc)}")
        unknown = set(doc) - {"default", "rules"}
        if unknown:
            raise PolicyError(f"{sorted(unknown)[0]}: unknown field")
        default = doc.get("default", "allow")
        if default not in ACTIONS:
            raise PolicyError(f'default: expected "allow" or "deny", got {show(default)}')
        raw = doc.get("rules", [])
        if not isinstance(raw, list) or len(raw) > MAX_RULES:
            raise PolicyError(f"rules: expected an array of at most {MAX_RULES} rules")
        rules: list[Rule] = []
        names: set[str] = set()
        for i, entry in enumerate(raw):
            rule = _rule_from_wire(entry, ("rules", i))
            if rule.name in names:
                raise PolicyError(f"{fmt_loc(('rules', i, 'name'))}: duplicate {rule.name!r}")
            names.add(rule.name)
            rules.append(rule)
        return cls(default=default, rules=tuple(rules))

    def to_wire(self) -> dict[str, Any]:
        return {"default": self.default, "rules": [r.to_dict() for r in self.rules]}


def _fail(loc: tuple[str | int, ...], message: str) -> PolicyError:
    return PolicyError(f"{fmt_loc(loc)}: {message}")


def _rule_from_wire(entry: Any, loc: tuple[str | int, ...]) -> Rule:
    if not isinstance(entry, dict):
        raise _fail(loc, f"expected an object, got {show(entry)}")
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise _fail((*loc, sorted(unknown)[0]), "unknown field")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _fail((*loc, "name"), f"expected a name of [A-Za-z0-9_.-]{{1,64}}, got {show(name)}")
    action = entry.get("action")
    if action not in ACTIONS:
        raise _fail((*loc, "action"), f'expected "allow" or "deny", got {show(action)}')
    protocol = entry.get("protocol", "any")
    if protocol not in PROTOCOLS:
        raise _fail((*loc, "protocol"), f"expected one of {', '.join(PROTOCOLS)}")
    ports = entry.get("ports")
    port_ranges: tuple[tuple[int, int], ...] | None = None
    if ports is not None:
        if protocol not in ("tcp", "udp"):
            raise _fail((*loc, "ports"), 'ports need protocol "tcp" or "udp"')
        if not isinstance(ports, list) or not 1 <= len(ports) <= MAX_MATCHES:
            raise _fail((*loc, "ports"), f"expected an array of 1..{MAX_MATCHES} ports or null")
        ranges = []
        for j, p in enumerate(ports):
            try:
                ranges.append(port_spec(p))
            except ValueError as e:
                raise _fail((*loc, "ports", j), str(e)) from None
        port_ranges = tuple(ranges)
    return Rule(
        name=name,
        action=action,
        src=_networks(entry.get("src"), (*loc, "src")),
        dst=_networks(entry.get("dst"), (*loc, "dst")),
        protocol=protocol,
        ports=port_ranges,
    )


def _networks(value: Any, loc: tuple[str | int, ...]) -> tuple[IPNetwork, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MATCHES:
        raise _fail(loc, f"expected an array of 1..{MAX_MATCHES} subnets or null")
    nets = []
    for j, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError
            nets.append(ipaddress.ip_network(item, strict=True))
        except ValueError:
            raise _fail((*loc, j), f"expected a subnet, got {show(item)}") from None
    return tuple(nets)


# --------------------------------------------------------------------------- nft


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _matches(rule: Rule) -> list[str]:
    """The match part of each nft rule a policy rule becomes: one without addresses, else
    one per address family that src and dst both allow (none when they never meet)."""
    variants: list[tuple[int | None, list[str] | None, list[str] | None]] = []
    if rule.src is None and rule.dst is None:
        variants.append((None, None, None))
    else:
        for family in (4, 6):
            src = None if rule.src is None else [str(n) for n in rule.src if n.version == family]
            dst = None if rule.dst is None else [str(n) for n in rule.dst if n.version == family]
            if src != [] and dst != []:
                variants.append((family, src, dst))
    out = []
    for family, src, dst in variants:
        parts = []
        kw = "ip6" if family == 6 else "ip"
        if src is not None:
            parts.append(f"{kw} saddr {_set(src)}")
        if dst is not None:
            parts.append(f"{kw} daddr {_set(dst)}")
        if rule.protocol in ("tcp", "udp"):
            if rule.ports is None:
                parts.append(f"meta l4proto {rule.protocol}")
            else:
                ports = [str(format_ports(*p)) for p in rule.ports]
                parts.append(f"{rule.protocol} dport {_set(ports)}")
        elif rule.protocol == "icmp":
            parts.append(
                {4: "meta l4proto icmp", 6: "meta l4proto ipv6-icmp"}.get(
                    family,  # type: ignore[arg-type]
                    "meta l4proto { icmp, ipv6-icmp }",
                )
            )
        out.append(" ".join(parts))
    return out


def _verdict(action: str) -> str:
    return "accept" if action == "allow" else "drop"


def ruleset(policy: Policy) -> str:
    """One nft script that replaces the table whole: created empty if missing (so that the
    delete cannot fail), deleted, written again; nft runs a file as one transaction, so the
    kernel has either the old table or the new one, never none."""
    lines = [
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "\tchain forward {",
        f"\t\ttype filter hook forward priority filter; policy {_verdict(policy.default)};",
        "\t\tct state established,related accept",
        f'\t\tct state invalid counter drop comment "{INVALID_COMMENT}"',
    ]
    for rule in policy.rules:
        for match in _matches(rule):
            head = f"{match} " if match else ""
            lines.append(f'\t\t{head}counter {_verdict(rule.action)} comment "{rule.name}"')
    lines += [
        f'\t\tcounter {_verdict(policy.default)} comment "{DEFAULT_COMMENT}"',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _nft(argv: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["nft", *argv],
            input=script,
            text=True,
            capture_output=True,
            timeout=NFT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise NftError(f"nft did not finish within {NFT_TIMEOUT_S:g} s") from None
    except OSError as e:
        raise NftError(f"cannot run nft: {e.strerror or e}") from None


def _message(proc: subprocess.CompletedProcess[str]) -> str:
    text = (proc.stderr or proc.stdout).strip() or f"nft exited with status {proc.returncode}"
    return text[:MAX_ERROR_CHARS]


def run_script(script: str, check_only: bool = False) -> None:
    """Run an nft script as one transaction (`nft -c` checks it without applying)."""
    proc = _nft(["-c", "-f", "-"] if check_only else ["-f", "-"], script)
    if proc.returncode != 0:
        raise NftError(_message(proc))


def read_counters() -> dict[str, tuple[int, int]] | None:
    """(packets, bytes) per rule comment of the table in the kernel, None when it is not
    there. A rule that became two nft rules (IPv4 and IPv6) is their sum."""
    proc = _nft(["-j", "list", "table", "inet", TABLE])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NftError(_message(proc))
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise NftError(f"nft -j printed no JSON: {e}") from None
    out: dict[str, tuple[int, int]] = {}
    for item in doc.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or not isinstance(rule.get("comment"), str):
            continue
        for expr in rule.get("expr", []):
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict):
                packets, octets = out.get(rule["comment"], (0, 0))
                out[rule["comment"]] = (
                    packets + int(counter.get("packets", 0)),
                    octets + int(counter.get("bytes", 0)),
                )
    return out


# --------------------------------------------------------------------------- the owner


class Firewall:
    """What the site's firewall is told (`offer`) and what is in force. At start-up `start`
    applies the stored policy at once (the supervisor's loop serves nothing yet); later
    offers are applied by a task that runs nft in a thread, the newest policy last."""

    def __init__(self, on_event: EventSink, wall_clock: Callable[[], float] = time.time) -> None:
        self.on_event = on_event
        self.wall_clock = wall_clock
        self.wanted: Policy | None = None  # the last good policy received
        self.rev: Any = None  # the config revision it came with
        self.in_force: Policy | None = None  # the last one nft applied
        self.applied_at: float | None = None
        self.error: str | None = None  # why `wanted` is not in force (or a policy refused)
        self.applies = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- inputs

    def _take(self, doc: Any, rev: Any) -> bool:
        """Record an offered policy; True when it needs applying."""
        try:
            policy = Policy.from_wire(doc)
        except PolicyError as e:
            why = f"policy from the PoP refused (rev {rev}): {e}"
            if why != self.error:
                log.error("LAN firewall %s; the rules in force stay", why)
                self.on_event("firewall.failed", f"LAN firewall {why}", {"rev": rev})
            self.error = why
            return False
        self.rev = rev
        if policy == self.wanted and (self.error is None or self._busy):
            return False  # in force already, or being applied
        self.wanted = policy
        return True

    def start(self, doc: Any, rev: Any) -> None:
        """At start-up, before traffic flows: apply the stored policy now. After a reboot the
        kernel has no table: if the stored policy cannot be applied (refused, or nft failed),
        a fallback with its default alone (deny when even that is unreadable) goes in, so the
        box never forwards unfiltered what the account meant to filter."""
        if self._take(doc, rev):
            assert self.wanted is not None
            self._run(self.wanted)
        if self.in_force is None and self.error is not None:
            default = doc.get("default") if isinstance(doc, dict) else None
            fallback = Policy(default=default if default in ("allow", "deny") else "deny")
            try:
                run_script(ruleset(fallback))
            except NftError as e:
                log.error("LAN firewall fallback not applied either: %s", e)
                self.on_event("firewall.failed",
                              f"LAN firewall fallback (default {fallback.default}) not applied"
                              f" either: {e}", {"rev": rev, "error": str(e)})
                return
            self.in_force = fallback
            log.warning("LAN firewall: the stored policy is not in force; its default alone "
                        "(%s, no rules) is, until a policy is applied", fallback.default)
            self.on_event("firewall.fallback",
                          f"LAN firewall: the stored policy could not be applied; its default "
                          f"alone ({fallback.default}, no rules) is in force until one is",
                          {"rev": rev, "default": fallback.default})

    def offer(self, doc: Any, rev: Any) -> None:
        """A config from the PoP: its firewall is applied if it differs from what is in force
        (or failed before), off the loop."""
        if not self._take(doc, rev):
            return
        if not self._busy:
            self._task = asyncio.get_running_loop().create_task(self._apply_latest())

    @property
    def _busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _apply_latest(self) -> None:
        # One nft at a time; an offer that arrives meanwhile is applied next.
        while self.wanted is not None and (self.wanted != self.in_force or self.error):
            policy = self.wanted
            try:
                await asyncio.to_thread(run_script, ruleset(policy))
            except NftError as e:
                self._failed(e)
                if policy == self.wanted:
                    return  # a new offer of it tries again
            else:
                self._applied(policy)

    def _run(self, policy: Policy) -> None:
        try:
            run_script(ruleset(policy))
        except NftError as e:
            self._failed(e)
        else:
            self._applied(policy)

    def _failed(self, e: NftError) -> None:
        self.failures += 1
        self.error = f"nft: {e}"
        log.error("LAN firewall not applied (rev %s), the rules in force stay: %s", self.rev, e)
        self.on_event(
            "firewall.failed",
            f"LAN firewall of rev {self.rev} not applied, the rules in force stay: {e}",
            {"rev": self.rev, "error": str(e)},
        )

    def _applied(self, policy: Policy) -> None:
        self.applies += 1
        self.in_force = policy
        self.applied_at = self.wall_clock()
        if policy == self.wanted:
            self.error = None
        rules = f"{len(policy.rules)} rule(s), default {policy.default}"
        log.info("LAN firewall applied: %s (rev %s)", rules, self.rev)
        self.on_event(
            "firewall.applied",
            f"LAN firewall applied: {rules} (rev {self.rev})",
            {"rev": self.rev, "rules": len(policy.rules), "default": policy.default},
        )

    async def close(self) -> None:
        """Let an apply under way finish (the table stays in the kernel: docs/firewall.md)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # ---------------------------------------------------------------- status

    @property
    def state(self) -> str:
        if self.wanted is None and self.error is None:
            return "none"
        if self._busy:
            return "applying"
        if self.error is not None:
            return "failed"
        return "applied"

    @property
    def applied(self) -> bool:
        return self.wanted is not None and self.wanted == self.in_force and not self._busy

    def summary(self) -> dict[str, Any]:
        policy = self.wanted
        return {
            "state": self.state,
            "rev": self.rev,
            "applied": self.applied,
            "default": policy.default if policy is not None else None,
            "rule_count": len(policy.rules) if policy is not None else 0,
            "error": self.error,
        }

    async def status(self) -> dict[str, Any]:
        """The rules in order with their counters, read from the kernel now."""
        in_kernel: bool | None
        try:
            counters = await asyncio.to_thread(read_counters)
            in_kernel = counters is not None
            read_error = None
        except NftError as e:
            counters, in_kernel, read_error = None, None, str(e)
        counters = counters or {}

        def count(comment: str) -> dict[str, int | None]:
            packets, octets = counters.get(comment, (None, None))
            return {"packets": packets, "bytes": octets}

        policy = self.wanted
        rules = []
        for rule in policy.rules if policy is not None else ():
            rules.append({**rule.to_dict(), **count(rule.name)})
        return {
            **self.summary(),
            "rules": rules,
            "applied_at": self.applied_at,
            "in_kernel": in_kernel,
            "counters_error": read_error,
            "default_counter": count(DEFAULT_COMMENT),
            "invalid_counter": count(INVALID_COMMENT),
            "table": f"inet {TABLE}",
        }
