"""The LAN firewall: the account's [firewall] schema (located errors), the policy a site is
sent (site names resolved), the site's check of it, and the nft script it becomes, which
nft itself accepts (check mode: nothing is applied)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from sdwan.pop.account import Account, ConfigError, Firewall, FirewallRule, load_account
from sdwan.site.firewall import Policy, PolicyError, Rule, ruleset, run_script
from sdwan.site.socketctl import format_firewall, format_status

SITES = """\
[account]
name = "acme"

[[sites]]
id = 1
name = "branch-1"
subnets = ["10.1.0.0/24", "fd00:1::/64"]

[[sites]]
id = 2
subnets = ["10.2.0.0/24"]
"""

FIREWALL = """
[firewall]
default = "deny"

[[firewall.rules]]
name = "no-ssh"
action = "deny"
src = ["site-2", "10.9.0.0/16"]
dst = ["branch-1"]
protocol = "tcp"
ports = [22, "8000-8080"]

[[firewall.rules]]
name = "ping"
action = "allow"
protocol = "icmp"

[[firewall.rules]]
name = "to-hq"
action = "allow"
dst = ["branch-1", "site-2"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "account.toml"
    p.write_text(text)
    return p


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_account(path)
    return [line.split(": ", 1)[1] for line in str(exc.value).splitlines()]


# --------------------------------------------------------------------------- the account


def test_firewall_loads_round_trips_and_is_sent_resolved(tmp_path: Path) -> None:
    acc = load_account(write(tmp_path, SITES + FIREWALL))
    assert acc.firewall == Firewall(
        default="deny",
        rules=(
            FirewallRule(
                "no-ssh", "deny", ("site-2", "10.9.0.0/16"), ("branch-1",), "tcp", (22, "8000-8080")
            ),
            FirewallRule("ping", "allow", protocol="icmp"),
            FirewallRule("to-hq", "allow", dst=("branch-1", "site-2")),
        ),
    )
    assert Account.from_doc(acc.to_doc()) == acc
    config = acc.site_config(acc.sites[1])
    assert config["name"] == "site-2" and config["subnets"] == ["10.2.0.0/24"]
    # Site names become their subnets at the PoP: a site applies it without a directory.
    assert config["firewall"] == {
        "default": "deny",
        "rules": [
            {
                "name": "no-ssh",
                "action": "deny",
                "src": ["10.2.0.0/24", "10.9.0.0/16"],
                "dst": ["10.1.0.0/24", "fd00:1::/64"],
                "protocol": "tcp",
                "ports": [22, "8000-8080"],
            },
            {
                "name": "ping",
                "action": "allow",
                "src": None,
                "dst": None,
                "protocol": "icmp",
                "ports": None,
            },
            {
                "name": "to-hq",
                "action": "allow",
                "src": None,
                "dst": ["10.1.0.0/24", "fd00:1::/64", "10.2.0.0/24"],
                "protocol": "any",
                "ports": None,
            },
        ],
    }
    # What the site checks is what the PoP sends.
    assert Policy.from_wire(config["firewall"]).to_wire() == config["firewall"]


def test_without_a_firewall_table_everything_is_allowed(tmp_path: Path) -> None:
    acc = load_account(write(tmp_path, SITES))
    assert acc.firewall == Firewall() and acc.firewall_config() == {"default": "allow", "rules": []}
    # An account stored before the firewall existed.
    doc = acc.to_doc()
    del doc["firewall"]
    assert Account.from_doc(doc) == acc


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            'name = "r"\naction = "drop"',
            'firewall.rules[0].action: expected "allow" or "deny", got "drop" (line 18)',
        ),
        (
            'action = "deny"',
            "firewall.rules[0].name: missing required field (expected a name of"
            " 1..64 characters [A-Za-z0-9_.-]) (line 16)",
        ),
        (
            'name = "r"\naction = "deny"\ncolour = "red"',
            "firewall.rules[0].colour: unknown key (expected one of: action, dst, name, ports,"
            " protocol, src) (line 19)",
        ),
        (
            'name = "r"\naction = "deny"\nsrc = ["brnach-1"]',
            'firewall.rules[0].src[0]: unknown site name "brnach-1" (expected a subnet such as'
            ' "10.1.0.0/24" or the name of a site: branch-1, site-2) (line 19)',
        ),
        (
            'name = "r"\naction = "deny"\ndst = ["10.1.0.1/24"]',
            "firewall.rules[0].dst[0]: expected a network with the host bits zero, got"
            ' "10.1.0.1/24" (did you mean "10.1.0.0/24"?) (line 19)',
        ),
        (
            'name = "r"\naction = "deny"\ndst = ["10.1.0.0/33"]',
            'firewall.rules[0].dst[0]: expected a network such as "10.1.0.0/24" or "fd00:1::/64",'
            ' got "10.1.0.0/33" (line 19)',
        ),
        (
            'name = "r"\naction = "deny"\nsrc = []',
            "firewall.rules[0].src: expected an array of 1..256 subnets or site names (leave src"
            " out for any), got an empty array (line 19)",
        ),
        (
            'name = "r"\naction = "deny"\nprotocol = "sctp"',
            'firewall.rules[0].protocol: expected "tcp" or "udp" or "icmp" or "any", got "sctp"'
            " (line 19)",
        ),
        (
            'name = "r"\naction = "deny"\nports = [22]',
            'firewall.rules[0].ports: ports need protocol "tcp" or "udp", the rule has none'
            " (line 19)",
        ),
        (
            'name = "r"\naction = "deny"\nprotocol = "icmp"\nports = [22]',
            'firewall.rules[0].ports: ports need protocol "tcp" or "udp", got protocol "icmp"'
            " (line 20)",
        ),
        (
            'name = "r"\naction = "deny"\nprotocol = "tcp"\nports = ["90-80"]',
            'firewall.rules[0].ports[0]: empty range "90-80": 90 is above 80 (line 20)',
        ),
        (
            'name = "r"\naction = "deny"\nprotocol = "udp"\nports = [0]',
            "firewall.rules[0].ports[0]: expected a port 1..65535, got 0 (line 20)",
        ),
        (
            'name = "r"\naction = "deny"\nprotocol = "udp"\nports = ["http"]',
            'firewall.rules[0].ports[0]: expected a port 1..65535 or a range "LOW-HIGH", got'
            ' "http" (line 20)',
        ),
        (
            'name = "r"\naction = "deny"\nprotocol = "udp"\nports = ["1-70000"]',
            'firewall.rules[0].ports[0]: expected a range of ports 1..65535, got "1-70000"'
            " (line 20)",
        ),
    ],
)
def test_a_wrong_rule_is_located(tmp_path: Path, rule: str, expected: str) -> None:
    text = SITES + '\n[firewall]\ndefault = "allow"\n\n[[firewall.rules]]\n' + rule + "\n"
    assert errors_of(write(tmp_path, text)) == [expected]


def test_every_firewall_problem_is_reported_in_one_pass(tmp_path: Path) -> None:
    text = (
        SITES
        + """
[firewall]
default = "block"
policy = "x"

[[firewall.rules]]
name = "a"
action = "allow"

[[firewall.rules]]
name = "a"
action = "deny"
dst = [5]
"""
    )
    assert errors_of(write(tmp_path, text)) == [
        "firewall.policy: unknown key (expected one of: default, rules) (line 15)",
        'firewall.default: expected "allow" or "deny", got "block" (line 14)',
        'firewall.rules[1].name: duplicate rule name "a" (also firewall.rules[0]) (line 22)',
        "firewall.rules[1].dst[0]: expected a subnet or a site name, got 5 (line 24)",
    ]


# --------------------------------------------------------------------------- the site's check


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"default": "block", "rules": []}, 'default: expected "allow" or "deny"'),
        (
            {"default": "deny", "rules": [{"name": "a", "action": "deny", "src": ["branch-1"]}]},
            'rules[0].src[0]: expected a subnet, got "branch-1"',
        ),
        ({"rules": [{"name": "a", "action": "deny", "via": "mesh"}]}, "rules[0].via: unknown"),
        ({"rules": [{"name": "a b", "action": "deny"}]}, "rules[0].name: expected a name"),
        (
            {"rules": [{"name": "a", "action": "deny", "ports": [22]}]},
            'rules[0].ports: ports need protocol "tcp" or "udp"',
        ),
        (
            {"rules": [{"name": "a", "action": "deny", "protocol": "tcp", "ports": ["9-1"]}]},
            'rules[0].ports[0]: empty range "9-1"',
        ),
        (
            {"rules": [{"name": "a", "action": "deny"}, {"name": "a", "action": "allow"}]},
            "rules[1].name: duplicate 'a'",
        ),
        ([], "expected an object"),
    ],
)
def test_the_site_refuses_a_policy_it_cannot_apply_exactly(doc: object, expected: str) -> None:
    with pytest.raises(PolicyError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_wire(doc)


def test_a_config_without_a_firewall_allows_everything() -> None:
    assert Policy.from_wire(None) == Policy("allow", ())


# --------------------------------------------------------------------------- the nft script


def policy_of(tmp_path: Path) -> Policy:
    acc = load_account(write(tmp_path, SITES + FIREWALL))
    return Policy.from_wire(acc.firewall_config())


def test_the_script_replaces_the_table_whole_rules_top_down(tmp_path: Path) -> None:
    script = ruleset(policy_of(tmp_path))
    assert (
        script
        == """\
table inet sdwan_lanfw {}
delete table inet sdwan_lanfw
table inet sdwan_lanfw {
\tchain forward {
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept
\t\tct state invalid counter drop comment "(invalid)"
\t\tip saddr { 10.2.0.0/24, 10.9.0.0/16 } ip daddr { 10.1.0.0/24 } tcp dport { 22, 8000-8080 } \
counter drop comment "no-ssh"
\t\tmeta l4proto { icmp, ipv6-icmp } counter accept comment "ping"
\t\tip daddr { 10.1.0.0/24, 10.2.0.0/24 } counter accept comment "to-hq"
\t\tip6 daddr { fd00:1::/64 } counter accept comment "to-hq"
\t\tcounter drop comment "(default)"
\t}
}
"""
    )


def test_a_rule_per_family_and_none_where_src_and_dst_never_meet() -> None:
    import ipaddress

    v4, v6 = ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_network("fd00::/64")
    script = ruleset(
        Policy(
            "allow",
            (
                Rule("v6-icmp", "deny", src=(v4, v6), protocol="icmp"),
                Rule("never", "deny", src=(v4,), dst=(v6,)),
                Rule("dns", "deny", protocol="udp", ports=((53, 53),)),
                Rule("all-tcp", "allow", protocol="tcp"),
            ),
        )
    )
    body = [line.strip() for line in script.splitlines()[6:-2]]
    assert body == [
        'ct state invalid counter drop comment "(invalid)"',
        'ip saddr { 10.1.0.0/24 } meta l4proto icmp counter drop comment "v6-icmp"',
        'ip6 saddr { fd00::/64 } meta l4proto ipv6-icmp counter drop comment "v6-icmp"',
        'udp dport { 53 } counter drop comment "dns"',
        'meta l4proto tcp counter accept comment "all-tcp"',
        'counter accept comment "(default)"',
    ]
    assert "policy accept;" in script


needs_nft = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="nft's check mode needs root and nft",
)


@needs_nft
def test_nft_accepts_the_script(tmp_path: Path) -> None:
    run_script(ruleset(policy_of(tmp_path)), check_only=True)
    run_script(ruleset(Policy()), check_only=True)
    many = tuple(
        Rule(f"r{i}", "deny" if i % 2 else "allow", protocol="tcp", ports=((i + 1, i + 100),))
        for i in range(200)
    )
    run_script(ruleset(Policy("deny", many)), check_only=True)


# --------------------------------------------------------------------------- socketctl


def test_socketctl_lists_the_rules_with_their_counters() -> None:
    result = {
        "state": "applied",
        "rev": 7,
        "applied": True,
        "default": "deny",
        "rule_count": 1,
        "error": None,
        "in_kernel": True,
        "counters_error": None,
        "rules": [
            {
                "name": "no-ssh",
                "action": "deny",
                "src": ["10.2.0.0/24"],
                "dst": None,
                "protocol": "tcp",
                "ports": [22, "8000-8080"],
                "packets": 3,
                "bytes": 180,
            }
        ],
        "default_counter": {"packets": 2, "bytes": 168},
        "invalid_counter": {"packets": 0, "bytes": 0},
        "table": "inet sdwan_lanfw",
    }
    out = io.StringIO()
    format_firewall(result, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "firewall applied, 1 rule(s), default deny, rev 7"
    assert lines[2].split() == [
        "#",
        "RULE",
        "ACTION",
        "SOURCE",
        "DESTINATION",
        "PROTOCOL",
        "PACKETS",
        "BYTES",
    ]
    assert lines[3].split() == [
        "1",
        "no-ssh",
        "deny",
        "10.2.0.0/24",
        "any",
        "tcp",
        "22,8000-8080",
        "3",
        "180",
        "B",
    ]
    assert lines[4].split()[:3] == ["-", "(default)", "deny"]
    failed = {
        **result,
        "state": "failed",
        "error": "nft: Error: Operation not permitted",
        "in_kernel": False,
    }
    out = io.StringIO()
    format_firewall(failed, out)
    assert out.getvalue().splitlines()[:2] == [
        "firewall failed, 1 rule(s), default deny, rev 7: nft: Error: Operation not permitted",
        "kernel   table inet sdwan_lanfw is missing",
    ]
    out = io.StringIO()
    format_status({"site_id": 1, "firewall": {**result, "rules": 1}}, out)
    assert "firewall applied, 1 rule(s), default deny, rev 7" in out.getvalue()
