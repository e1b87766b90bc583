"""Bootstrap config: a valid file loads with its defaults; each wrong field is located and named."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sdwan.common.tomlcheck import format_endpoint, parse_endpoint
from sdwan.site.config import (
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_DATA_DIR,
    ConfigError,
    Link,
    Tunnel,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]

BASE = """\
[site]
id = 1
name = "branch-1"

[pki]
ca = "ca.pem"
cert = "site-1.pem"
key = "site-1.key"

[lan]
subnets = ["10.1.0.0/24"]

[[links]]
name = "wan1"
interface = "eth0"
port = 4800

[[links]]
name = "wan2"
interface = "eth1"
port = 4801
precedence = 2
mtu = 1400

[[peers]]
site_id = 2
endpoint = "203.0.113.2:4800"
subnets = ["10.2.0.0/24"]
"""

PEER3 = """
[[peers]]
site_id = 3
endpoint = "203.0.113.3:4800"
subnets = ["10.3.0.0/24"]
"""

LINK = """
[[links]]
name = "wan{n}"
interface = "eth{n}"
port = 4800
"""


def write_site(folder: Path, text: str = BASE, name: str = "socketd.toml") -> Path:
    for pem in ("ca.pem", "site-1.pem", "site-1.key"):
        (folder / pem).write_text("-----BEGIN PLACEHOLDER-----\n")
    path = folder / name
    path.write_text(text)
    return path


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"test bug: {old!r} not in the base config"
        return text.replace(old, new, 1)

    return edit


def add(extra: str) -> Callable[[str], str]:
    return lambda text: text + extra


def nth(old: str, new: str, n: int) -> Callable[[str], str]:
    """Replace only the n-th (0-based) occurrence."""

    def edit(text: str) -> str:
        parts = text.split(old)
        assert len(parts) > n + 1, f"test bug: fewer than {n + 1} of {old!r}"
        return old.join(parts[: n + 1]) + new + old.join(parts[n + 1 :])

    return edit


def errors_of(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = write_site(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, str(info.value)


# --------------------------------------------------------------------------- valid files


def test_valid_config_loads_with_values_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_site(tmp_path))

    assert cfg.source == tmp_path / "socketd.toml"
    assert cfg.site.id == 1 and cfg.site.name == "branch-1"
    assert cfg.paths.data_dir == DEFAULT_DATA_DIR
    assert cfg.paths.control_socket == DEFAULT_CONTROL_SOCKET
    assert cfg.pki.ca == tmp_path / "ca.pem"
    assert cfg.pki.cert == tmp_path / "site-1.pem"
    assert cfg.pki.key == tmp_path / "site-1.key"
    assert cfg.lan.subnets == (ipaddress.ip_network("10.1.0.0/24"),)
    assert cfg.lan.interface is None
    assert cfg.tunnel == Tunnel(interface="sdwan0", keepalive_s=15, rekey_s=600, mss_clamp=True)
    assert cfg.links == (
        Link(name="wan1", interface="eth0", port=4800, precedence=1, mtu=1500),
        Link(name="wan2", interface="eth1", port=4801, precedence=2, mtu=1400),
    )
    (peer,) = cfg.peers
    assert peer.site_id == 2
    assert peer.endpoint == ("203.0.113.2", 4800)
    assert peer.endpoint_str == "203.0.113.2:4800"
    assert peer.subnets == (ipaddress.ip_network("10.2.0.0/24"),)
    assert peer.link == "wan1", "a peer without `link` uses the first link"
    assert cfg.link("wan2").mtu == 1400 and cfg.peer(2) is peer


def test_site_name_defaults_to_site_id(tmp_path: Path) -> None:
    cfg = load_config(write_site(tmp_path, BASE.replace('name = "branch-1"\n', "")))
    assert cfg.site.name == "site-1"


def test_optional_tables_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for pem in ("ca.pem", "a.pem", "a.key"):
        (tmp_path / "certs" / pem).write_text("x")
    text = (
        BASE.replace('ca = "ca.pem"', 'ca = "certs/ca.pem"')
        .replace('cert = "site-1.pem"', f'cert = "{tmp_path}/certs/a.pem"')
        .replace('key = "site-1.key"', 'key = "./certs/../certs/a.key"')
        + """
[paths]
data_dir = "state"
control_socket = "run/ctl.sock"

[tunnel]
interface = "tun.site_1"
keepalive_s = 5
rekey_s = 120
mss_clamp = false
"""
    ).replace(
        'subnets = ["10.1.0.0/24"]', 'subnets = ["10.1.0.0/24", "fd00:1::/64"]\ninterface = "lan0"'
    )
    cfg = load_config(write_site(tmp_path, text))
    assert cfg.pki.ca == tmp_path / "certs/ca.pem"
    assert cfg.pki.cert == tmp_path / "certs/a.pem"
    assert cfg.pki.key == tmp_path / "certs/a.key"
    assert cfg.paths.data_dir == tmp_path / "state"
    assert cfg.paths.control_socket == tmp_path / "run/ctl.sock"
    assert cfg.tunnel == Tunnel(interface="tun.site_1", keepalive_s=5, rekey_s=120, mss_clamp=False)
    assert cfg.lan.interface == "lan0"
    assert cfg.lan.subnets[1] == ipaddress.ip_network("fd00:1::/64")


def test_ipv6_endpoint_in_brackets_and_explicit_link(tmp_path: Path) -> None:
    text = BASE.replace('"203.0.113.2:4800"', '"[2001:DB8::2]:4900"\nlink = "wan2"')
    (peer,) = load_config(write_site(tmp_path, text)).peers
    assert peer.endpoint == ("2001:db8::2", 4900)
    assert peer.endpoint_str == "[2001:db8::2]:4900"
    assert peer.link == "wan2"


def test_no_peers_is_valid(tmp_path: Path) -> None:
    text = BASE[: BASE.index("[[peers]]")]
    assert load_config(write_site(tmp_path, text)).peers == ()


def test_shipped_example_is_valid(tmp_path: Path) -> None:
    """As the README runs it: certificates issued into pki/ beside the example."""
    from sdwan.pop import pki

    example = tmp_path / "site1.toml"
    example.write_text((REPO / "examples" / "site1.toml").read_text())
    pki.create_ca(tmp_path / "pki", "example")
    pki.issue_site(tmp_path / "pki", 1, tmp_path / "pki")
    cfg = load_config(example)
    assert cfg.site.id == 1
    assert [link.name for link in cfg.links] == ["wan1", "lte"]
    assert [peer.site_id for peer in cfg.peers] == [2, 3]


def test_endpoint_parse_and_format_round_trip() -> None:
    for text in ("192.0.2.1:1", "[fd00::1]:65535"):
        assert format_endpoint(parse_endpoint(text)) == text


# --------------------------------------------------------------------------- one wrong field

INT_PORT = "expected an integer 1..65535"
CASES = [
    # [site]
    pytest.param(
        sub("id = 1", 'id = "one"'), "site.id", f'{INT_PORT}, got "one"', id="site-id-type"
    ),
    pytest.param(sub("id = 1", "id = 0"), "site.id", f"{INT_PORT}, got 0", id="site-id-zero"),
    pytest.param(
        sub("id = 1", "id = 65536"), "site.id", f"{INT_PORT}, got 65536", id="site-id-big"
    ),
    pytest.param(sub("id = 1", "id = true"), "site.id", f"{INT_PORT}, got true", id="site-id-bool"),
    pytest.param(sub("id = 1", "id = 1.5"), "site.id", f"{INT_PORT}, got 1.5", id="site-id-float"),
    pytest.param(
        sub("id = 1\n", ""),
        "site.id",
        "missing required field (expected an integer 1..65535)",
        id="site-id-missing",
    ),
    pytest.param(
        sub('name = "branch-1"', 'name = ""'),
        "site.name",
        "expected a printable string",
        id="site-name-empty",
    ),
    pytest.param(
        sub('[site]\nid = 1\nname = "branch-1"\n', ""),
        "site",
        "missing required table [site]",
        id="site-table-missing",
    ),
    pytest.param(
        sub('name = "branch-1"', 'nmae = "branch-1"'),
        "site.nmae",
        'unknown key (did you mean "name"?',
        id="site-unknown-key",
    ),
    pytest.param(
        add('\n[tunel]\ninterface = "x"\n'),
        "tunel",
        'unknown key (did you mean "tunnel"?',
        id="unknown-table",
    ),
    # [paths]
    pytest.param(
        add("\n[paths]\ndata_dir = 5\n"), "paths.data_dir", "expected a file path", id="paths-type"
    ),
    pytest.param(
        add(f'\n[paths]\ncontrol_socket = "/{"x" * 120}"\n'),
        "paths.control_socket",
        "expected a path of at most 107 bytes",
        id="paths-socket-too-long",
    ),
    # [pki]
    pytest.param(
        sub('cert = "site-1.pem"', 'cert = "nope.pem"'),
        "pki.cert",
        "file not found: {dir}/nope.pem",
        id="pki-cert-not-found",
    ),
    pytest.param(
        sub('key = "site-1.key"\n', ""),
        "pki.key",
        "missing required field (expected a file path)",
        id="pki-key-missing",
    ),
    pytest.param(
        sub('ca = "ca.pem"', "ca = 1"),
        "pki.ca",
        "expected a file path (non-empty string), got 1",
        id="pki-ca-type",
    ),
    pytest.param(
        sub('ca = "ca.pem"', 'ca = "."'),
        "pki.ca",
        "expected a PEM file, got a directory",
        id="pki-ca-dir",
    ),
    # [lan]
    pytest.param(
        sub('"10.1.0.0/24"', '"10.1.0.1/24"'),
        "lan.subnets[0]",
        'expected a network with the host bits zero, got "10.1.0.1/24"'
        ' (did you mean "10.1.0.0/24"?)',
        id="lan-host-bits",
    ),
    pytest.param(
        sub('["10.1.0.0/24"]', '["10.1.0.0/24", "10.1.300.0/24"]'),
        "lan.subnets[1]",
        'expected a network such as "10.1.0.0/24"',
        id="lan-bad-network",
    ),
    pytest.param(
        sub('["10.1.0.0/24"]', "[]"),
        "lan.subnets",
        "expected an array of at least 1 network",
        id="lan-subnets-empty",
    ),
    pytest.param(
        sub('["10.1.0.0/24"]', '"10.1.0.0/24"'),
        "lan.subnets",
        'expected an array of at least 1 network, got "10.1.0.0/24"',
        id="lan-subnets-string",
    ),
    pytest.param(
        sub('["10.1.0.0/24"]', '["10.1.0.0/24", "10.1.0.128/25"]'),
        "lan.subnets[1]",
        "subnet 10.1.0.128/25 overlaps 10.1.0.0/24 of lan",
        id="lan-overlap-itself",
    ),
    # [tunnel]
    pytest.param(
        add('\n[tunnel]\ninterface = "sdwan-tunnel-0001"\n'),
        "tunnel.interface",
        'expected an interface name of 1..15 characters [A-Za-z0-9_.-], got "sdwan-tunnel-0001"',
        id="tunnel-name-long",
    ),
    pytest.param(
        add("\n[tunnel]\nkeepalive_s = 0\n"),
        "tunnel.keepalive_s",
        "expected an integer 1..3600, got 0",
        id="tunnel-keepalive-range",
    ),
    pytest.param(
        add("\n[tunnel]\nrekey_s = 5\n"),
        "tunnel.rekey_s",
        "expected an integer 10..86400, got 5",
        id="tunnel-rekey-range",
    ),
    pytest.param(
        add("\n[tunnel]\nrekey_s = 900\nkey_max_age_s = 900\n"),
        "tunnel.key_max_age_s",
        "cannot work with rekey_s: a key must last its rekey interval plus 60 s for the"
        " handshake: key_max_age_s 900 is below rekey_s 900 + 60 (rekey_s at most 840, or"
        " key_max_age_s at least 960)",
        id="tunnel-rekey-above-key-age",
    ),
    pytest.param(
        add("\n[tunnel]\nkey_max_age_s = 30\n"),
        "tunnel.key_max_age_s",
        "expected an integer 70..172860, got 30",
        id="tunnel-key-age-range",
    ),
    pytest.param(
        add("\n[tunnel]\nanswer_wait_us = 20000\n"),
        "tunnel.answer_wait_us",
        "expected an integer 0..10000, got 20000",
        id="tunnel-answer-wait-range",
    ),
    pytest.param(
        add('\n[tunnel]\nmss_clamp = "yes"\n'),
        "tunnel.mss_clamp",
        'expected true or false, got "yes"',
        id="tunnel-mss-type",
    ),
    # [[links]]
    pytest.param(
        sub("port = 4801", 'port = "abc"'),
        "links[1].port",
        f'{INT_PORT}, got "abc"',
        id="link-port-type",
    ),
    pytest.param(
        sub("port = 4800", "port = 0"), "links[0].port", f"{INT_PORT}, got 0", id="link-port-0"
    ),
    pytest.param(
        sub("precedence = 2", "precedence = 4"),
        "links[1].precedence",
        "expected an integer 1..3, got 4",
        id="link-precedence",
    ),
    pytest.param(
        sub("mtu = 1400", "mtu = 500"),
        "links[1].mtu",
        "expected an integer 576..9000, got 500",
        id="link-mtu",
    ),
    pytest.param(
        sub('name = "wan1"', 'name = "WAN1"'),
        "links[0].name",
        'expected a name of 1..15 characters [a-z0-9_-], got "WAN1"',
        id="link-name-case",
    ),
    pytest.param(
        sub('interface = "eth0"', 'interface = "eth/0"'),
        "links[0].interface",
        "expected a network interface name",
        id="link-interface-slash",
    ),
    pytest.param(
        sub('interface = "eth0"\n', ""),
        "links[0].interface",
        "missing required field (expected a network interface name of 1..15 characters)",
        id="link-interface-missing",
    ),
    pytest.param(
        sub('name = "wan2"', 'name = "wan1"'),
        "links[1].name",
        'duplicate link name "wan1" (also links[0])',
        id="link-duplicate-name",
    ),
    pytest.param(
        sub('interface = "eth1"\nport = 4801', 'interface = "eth0"\nport = 4800'),
        "links[1].port",
        'duplicate port 4800 on interface "eth0" (also links[0])',
        id="link-duplicate-port",
    ),
    pytest.param(
        sub("precedence = 2", "precedence = 2\nprio = 1"),
        "links[1].prio",
        "unknown key (expected one of: addressing, altwan,",
        id="link-unknown-key",
    ),
    pytest.param(
        add("".join(LINK.format(n=n) for n in range(3, 6))),
        "links[4]",
        "at most 4 [[links]] entries, the Alt-WAN link included (each link has a routing table"
        " of its own), got 5",
        id="links-too-many",
    ),
    pytest.param(
        lambda text: text[: text.index("[[links]]")] + text[text.index("[[peers]]") :],
        "links",
        "missing required [[links]] (expected 1..4 entries)",
        id="links-missing",
    ),
    pytest.param(
        add('\n[tunnel]\ninterface = "eth1"\n'),
        "links[1].interface",
        'expected a WAN device, got the tunnel interface "eth1"',
        id="link-is-tunnel",
    ),
    # [[peers]]
    pytest.param(
        sub("site_id = 2", "site_id = 1"),
        "peers[0].site_id",
        "expected the id of another site, got our own site id 1",
        id="peer-own-id",
    ),
    pytest.param(
        add(PEER3.replace("site_id = 3", "site_id = 2")),
        "peers[1].site_id",
        "duplicate peer site_id 2 (also peers[0])",
        id="peer-duplicate-id",
    ),
    pytest.param(
        sub("site_id = 2", "site_id = -2"),
        "peers[0].site_id",
        f"{INT_PORT}, got -2",
        id="peer-id-negative",
    ),
    pytest.param(
        sub('"203.0.113.2:4800"', '"gw.example.com:4800"'),
        "peers[0].endpoint",
        'expected "IPv4:port" or "[IPv6]:port", got "gw.example.com:4800"',
        id="peer-endpoint-name",
    ),
    pytest.param(
        sub('"203.0.113.2:4800"', '"2001:db8::2:4800"'),
        "peers[0].endpoint",
        "(IPv6 needs brackets)",
        id="peer-endpoint-ipv6-no-brackets",
    ),
    pytest.param(
        sub('"203.0.113.2:4800"', '"[203.0.113.2]:4800"'),
        "peers[0].endpoint",
        '"203.0.113.2" is not an IPv6 address',
        id="peer-endpoint-ipv4-in-brackets",
    ),
    pytest.param(
        sub('"203.0.113.2:4800"', '"[2001:db8::2:4800"'),
        "peers[0].endpoint",
        'expected "IPv4:port" or "[IPv6]:port"',
        id="peer-endpoint-unclosed-bracket",
    ),
    pytest.param(
        sub('"203.0.113.2:4800"', '"203.0.113.2:70000"'),
        "peers[0].endpoint",
        'with a port 1..65535, got "203.0.113.2:70000"',
        id="peer-endpoint-port",
    ),
    pytest.param(
        sub('"203.0.113.2:4800"', '"203.0.113.2"'),
        "peers[0].endpoint",
        'expected "IPv4:port" or "[IPv6]:port"',
        id="peer-endpoint-no-port",
    ),
    pytest.param(
        sub('"203.0.113.2:4800"', '"0.0.0.0:4800"'),
        "peers[0].endpoint",
        "expected a unicast address",
        id="peer-endpoint-unspecified",
    ),
    pytest.param(
        sub('endpoint = "203.0.113.2:4800"\n', ""),
        "peers[0].endpoint",
        'missing required field (expected "IPv4:port" or "[IPv6]:port")',
        id="peer-endpoint-missing",
    ),
    pytest.param(
        sub('subnets = ["10.2.0.0/24"]', 'subnets = ["10.2.0.0/24"]\nlink = "wan9"'),
        "peers[0].link",
        'expected the name of a [[links]] entry (wan1, wan2), got "wan9"',
        id="peer-link-unknown",
    ),
    pytest.param(
        sub('subnets = ["10.2.0.0/24"]', 'subnets = ["10.1.0.0/16"]'),
        "peers[0].subnets[0]",
        "subnet 10.1.0.0/16 overlaps 10.1.0.0/24 of lan",
        id="peer-overlaps-lan",
    ),
    pytest.param(
        sub('subnets = ["10.2.0.0/24"]', 'subnets = ["10.1.0.64/26"]'),
        "peers[0].subnets[0]",
        "subnet 10.1.0.64/26 overlaps 10.1.0.0/24 of lan",
        id="peer-inside-lan",
    ),
    pytest.param(
        add(PEER3.replace("10.3.0.0/24", "10.2.0.0/23")),
        "peers[0].subnets[0]",
        "subnet 10.2.0.0/24 overlaps 10.2.0.0/23 of peers[1]",
        id="peers-overlap",
    ),
    pytest.param(
        sub('subnets = ["10.2.0.0/24"]', "subnets = []"),
        "peers[0].subnets",
        "expected an array of at least 1 network",
        id="peer-subnets-empty",
    ),
    pytest.param(
        sub("[[peers]]", "[peers]"),
        "peers",
        "expected an array of tables [[peers]], got a table",
        id="peers-not-array",
    ),
    pytest.param(
        sub("site_id = 2", "site_id = 2\nsite = 2"),
        "peers[0].site",
        'unknown key (did you mean "site_id"?',
        id="peer-unknown-key",
    ),
    pytest.param(
        add("\n[update]\nsystem_conf = false\ncommit_grace_s = 300\ncommit_deadline_s = 310\n"),
        "update.commit_deadline_s",
        "310 s leaves no time to commit: a new slot is rebooted that long after boot unless"
        " committed, which takes at least commit_grace_s (300 s) without a PoP; set it to 360"
        " or more (default 900)",
        id="update-deadline-before-grace",
    ),
    pytest.param(
        add("\n[update]\nsystem_conf = false\ncommit_deadline_s = 10\n"),
        "update.commit_deadline_s",
        "30",
        id="update-deadline-too-short",
    ),
]


@pytest.mark.parametrize(("edit", "field", "expected"), CASES)
def test_wrong_field_is_named(
    tmp_path: Path, edit: Callable[[str], str], field: str, expected: str
) -> None:
    path, message = errors_of(tmp_path, edit(BASE))
    expected = expected.format(dir=tmp_path)
    lines = message.splitlines()
    assert len(lines) == 1, f"expected one error, got:\n{message}"
    (line,) = lines
    assert line.startswith(f"{path}: {field}: "), line
    assert expected in line, line


def test_example_from_the_brief_verbatim_with_line(tmp_path: Path) -> None:
    path, message = errors_of(tmp_path, sub("port = 4801", 'port = "abc"')(BASE))
    line_no = BASE.splitlines().index("port = 4801") + 1
    assert message == (
        f'{path}: links[1].port: expected an integer 1..65535, got "abc" (line {line_no})'
    )


def test_lines_point_at_the_field(tmp_path: Path) -> None:
    text = BASE.replace("id = 1", "id = 0").replace("mtu = 1400", "mtu = 100000")
    text = text.replace('"203.0.113.2:4800"', '"203.0.113.2"')
    _, message = errors_of(tmp_path, text)
    lines = text.splitlines()

    def line_of(prefix: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))

    assert f"site.id: expected an integer 1..65535, got 0 (line {line_of('id =')})" in message
    assert f"links[1].mtu: expected an integer 576..9000, got 100000 (line {line_of('mtu =')})" in (
        message
    )
    assert f"(line {line_of('endpoint =')})" in message


def test_all_errors_reported_in_one_pass(tmp_path: Path) -> None:
    text = (
        BASE.replace("id = 1", 'id = "x"')
        .replace('cert = "site-1.pem"', 'cert = "missing.pem"')
        .replace("port = 4801", "port = 99999")
        .replace('"203.0.113.2:4800"', '"203.0.113.2:x"')
        .replace('["10.2.0.0/24"]', '["10.1.0.0/24"]')
        + "\n[tunnel]\nrekey_s = 1\nbogus = 2\n"
    )
    path, message = errors_of(tmp_path, text)
    fields = [line.split(": ")[1] for line in message.splitlines()]
    assert fields == [
        "site.id",
        "pki.cert",
        "tunnel.bogus",
        "tunnel.rekey_s",
        "links[1].port",
        "peers[0].endpoint",
        "peers[0].subnets[0]",
    ]
    assert all(line.startswith(f"{path}: ") for line in message.splitlines())


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    text = BASE.replace("port = 4801", "port = 48 01")
    path, message = errors_of(tmp_path, text)
    line_no = text.splitlines().index("port = 48 01") + 1
    assert message.startswith(f"{path}: line {line_no}, column ")
    assert "invalid TOML" in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert str(info.value) == f"{tmp_path}/absent.toml: config file not found"


def test_relative_config_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_site(tmp_path, BASE.replace("id = 1", "id = 0"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("socketd.toml")
    assert str(info.value).startswith(f"{tmp_path}/socketd.toml: site.id: ")


def test_not_a_table_at_top_level(tmp_path: Path) -> None:
    text = "site = 3\n" + BASE[BASE.index("[pki]") :]
    path, message = errors_of(tmp_path, text)
    assert message == f"{path}: site: expected a table [site], got 3 (line 1)"


def test_many_peers_without_overlap_load(tmp_path: Path) -> None:
    peers = "".join(
        f'\n[[peers]]\nsite_id = {n}\nendpoint = "198.51.100.{n % 250 + 1}:4800"\n'
        f'subnets = ["10.{n // 256}.{n % 256}.0/24", "fd00:{n:x}::/64"]\n'
        for n in range(2, 502)
    )
    text = BASE[: BASE.index("[[peers]]")].replace("10.1.0.0/24", "172.16.0.0/24") + peers
    cfg = load_config(write_site(tmp_path, text))
    assert len(cfg.peers) == 500


# --------------------------------------------------------------------------- socketd exit status


def test_socketd_rejects_bad_config_with_status_2(tmp_path: Path) -> None:
    path = write_site(tmp_path, sub("port = 4801", 'port = "abc"')(BASE))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "firmware"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sdwan.site.socketd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert f'socketd: {path}: links[1].port: expected an integer 1..65535, got "abc"' in proc.stderr


# --------------------------------------------------------------------------- [appliance]


def test_appliance_defaults_without_the_table(tmp_path: Path) -> None:
    cfg = load_config(write_site(tmp_path))
    # No watchdog unless asked for: a lab host that kills socketd must not reset itself.
    assert cfg.appliance.watchdog is None
    assert cfg.appliance.watchdog_timeout_s == 15
    assert cfg.appliance.watchdog_startup_s == 300
    assert (cfg.appliance.crash_loop_starts, cfg.appliance.crash_loop_window_s) == (5, 120)


def test_appliance_start_up_timeout(tmp_path: Path) -> None:
    text = BASE + "\n[appliance]\nwatchdog_timeout_s = 20\nwatchdog_startup_s = 90\n"
    cfg = load_config(write_site(tmp_path, text))
    assert (cfg.appliance.watchdog_timeout_s, cfg.appliance.watchdog_startup_s) == (20, 90)
    # Unset, it is never shorter than a long running timeout.
    cfg = load_config(write_site(tmp_path, BASE + "\n[appliance]\nwatchdog_timeout_s = 500\n"))
    assert cfg.appliance.watchdog_startup_s == 500


def test_appliance_table_loads(tmp_path: Path) -> None:
    (tmp_path / "leds.toml").write_text('[led.status]\nbackend = "sysfs"\nname = "x"\n')
    text = BASE + (
        '\n[appliance]\nwatchdog = "/dev/watchdog"\nwatchdog_timeout_s = 30\n'
        'leds = "leds.toml"\ncrash_loop_starts = 3\ncrash_loop_window_s = 60\n'
    )
    cfg = load_config(write_site(tmp_path, text))
    assert cfg.appliance.watchdog == Path("/dev/watchdog")
    assert cfg.appliance.watchdog_timeout_s == 30
    assert cfg.appliance.leds == tmp_path / "leds.toml"
    assert (cfg.appliance.crash_loop_starts, cfg.appliance.crash_loop_window_s) == (3, 60)


def test_appliance_false_turns_things_off(tmp_path: Path) -> None:
    text = BASE + "\n[appliance]\nwatchdog = false\nleds = false\n"
    cfg = load_config(write_site(tmp_path, text))
    assert cfg.appliance.watchdog is None and cfg.appliance.leds is None


@pytest.mark.parametrize(
    ("extra", "field", "expected"),
    [
        ("watchdog = true", "appliance.watchdog", "expected the path of a watchdog device or"),
        ("watchdog = 3", "appliance.watchdog", "got 3"),
        ("watchdog_timeout_s = 1", "appliance.watchdog_timeout_s", "expected an integer 2..600"),
        ("watchdog_startup_s = 5", "appliance.watchdog_startup_s", "expected an integer 10..3600"),
        ("watchdog_startup_s = 12", "appliance.watchdog_startup_s",
         "must not be shorter than watchdog_timeout_s (15), got 12"),
        ('leds = "nowhere.toml"', "appliance.leds", "LED map not found: {dir}/nowhere.toml"),
        ("crash_loop_starts = 1", "appliance.crash_loop_starts", "expected an integer 2..100"),
        ("crash_loop_window = 5", "appliance.crash_loop_window", 'did you mean "crash_loop_'),
    ],
)
def test_appliance_errors_are_located(
    tmp_path: Path, extra: str, field: str, expected: str
) -> None:
    text = BASE + f"\n[appliance]\n{extra}\n"
    path, message = errors_of(tmp_path, text)
    line_no = text.splitlines().index(extra) + 1
    assert message.startswith(f"{path}: {field}: "), message
    assert expected.format(dir=tmp_path) in message
    assert message.endswith(f"(line {line_no})"), message


# --------------------------------------------------------------------------- [[links]] addressing


def test_link_addressing_forms(tmp_path: Path) -> None:
    from sdwan.common.addressing import Addressing

    text = sub('port = 4800\n', 'port = 4800\naddressing = "dhcp"\n')(BASE)
    text = sub(
        "mtu = 1400",
        'mtu = 1400\naddressing = { mode = "static", address = "100.64.2.2/24",'
        ' gateway = "100.64.2.1" }',
    )(text)
    cfg = load_config(write_site(tmp_path, text))
    assert cfg.link("wan1").addressing == Addressing("dhcp")
    assert cfg.link("wan2").addressing == Addressing("static", "100.64.2.2/24", "100.64.2.1")
    plain = load_config(write_site(tmp_path, BASE))
    assert plain.link("wan1").addressing == Addressing()  # left to the system


@pytest.mark.parametrize(
    ("value", "field", "expected"),
    [
        ('"ppp"', "links[0].addressing", 'expected "none", "dhcp" or a static table, got "ppp"'),
        ('"static"', "links[0].addressing", '"static" needs an address and a gateway'),
        ("1", "links[0].addressing", 'expected "none", "dhcp" or a static table'),
        ('{ address = "1.2.3.4/24" }', "links[0].addressing.mode", "missing required field"),
        ('{ mode = "pppoe" }', "links[0].addressing.mode", 'got "pppoe"'),
        ('{ mode = "static", gateway = "1.2.3.1" }', "links[0].addressing.address", "missing"),
        (
            '{ mode = "static", address = "1.2.3.4", gateway = "1.2.3.1" }',
            "links[0].addressing.address",
            "expected an address with its prefix length",
        ),
        (
            '{ mode = "static", address = "1.2.3.4/24", gateway = "1.2.4.1" }',
            "links[0].addressing.gateway",
            "gateway 1.2.4.1 is not inside 1.2.3.0/24",
        ),
        (
            '{ mode = "static", address = "20.0.0.5/7", gateway = "20.0.0.1" }',
            "links[0].addressing.address",
            "20.0.0.0/7 is a /7: shorter than /8, the widest prefix accepted",
        ),
        (
            '{ mode = "static", address = "10.1.0.5/16", gateway = "10.1.0.1" }',
            "links[0].addressing.address",
            "10.1.0.0/16 overlaps 10.1.0.0/24 of the LAN",
        ),
        (
            '{ mode = "static", address = "10.2.0.5/24", gateway = "10.2.0.1" }',
            "links[0].addressing.address",
            "10.2.0.0/24 overlaps 10.2.0.0/24 of static peer site 2",
        ),
        (
            '{ mode = "dhcp", gateway = "1.2.4.1" }',
            "links[0].addressing.gateway",
            'only for mode "static", not "dhcp"',
        ),
        (
            '{ mode = "dhcp", gatway = "1.2.4.1" }',
            "links[0].addressing.gatway",
            'unknown key (did you mean "gateway"?',
        ),
    ],
)
def test_link_addressing_errors_are_located(
    tmp_path: Path, value: str, field: str, expected: str
) -> None:
    text = sub("port = 4800\n", f"port = 4800\naddressing = {value}\n")(BASE)
    path, message = errors_of(tmp_path, text)
    (line,) = message.splitlines()
    assert line.startswith(f"{path}: {field}: "), line
    assert expected in line, line
    assert line.endswith(f"(line {text.splitlines().index(f'addressing = {value}') + 1})"), line


# --------------------------------------------------------------------------- [mesh] birthday


def test_mesh_birthday_defaults_and_values(tmp_path: Path) -> None:
    cfg = load_config(write_site(tmp_path))
    assert (cfg.mesh.birthday_ports, cfg.mesh.birthday_sockets, cfg.mesh.birthday_probes) == (
        (40000, 40999), 256, 1024
    )
    text = BASE + (
        '\n[mesh]\nbirthday_ports = "50000 - 50127"\nbirthday_sockets = 128\n'
        "birthday_probes = 2048\n"
    )
    cfg = load_config(write_site(tmp_path, text))
    assert (cfg.mesh.birthday_ports, cfg.mesh.birthday_sockets, cfg.mesh.birthday_probes) == (
        (50000, 50127), 128, 2048
    )
    # A link on a port of the default range is fine: that port is simply skipped.
    cfg = load_config(write_site(tmp_path, BASE.replace("port = 4801", "port = 40001")))
    assert cfg.mesh.birthday_ports == (40000, 40999)


RANGE = 'expected a port range "LO-HI" within 1024..65535'


@pytest.mark.parametrize(
    ("mesh", "field", "expected"),
    [
        ('birthday_ports = 40000', "mesh.birthday_ports", f"{RANGE}, got 40000"),
        ('birthday_ports = "40000"', "mesh.birthday_ports", f'{RANGE}, got "40000"'),
        ('birthday_ports = "41000-40000"', "mesh.birthday_ports", RANGE),
        ('birthday_ports = "80-1080"', "mesh.birthday_ports", RANGE),
        ('birthday_ports = "40000-70000"', "mesh.birthday_ports", RANGE),
        (
            'birthday_ports = "4000-5000"',
            "mesh.birthday_ports",
            "expected a range without the links' ports, got 4000-5000, which holds"
            " links[0].port 4800",
        ),
        (
            'birthday_ports = "40000-40099"',
            "mesh.birthday_sockets",
            "expected at most the 100 ports of birthday_ports 40000-40099, got 256",
        ),
        ("birthday_sockets = 0", "mesh.birthday_sockets", "expected an integer 1..512, got 0"),
        ("birthday_probes = 5000", "mesh.birthday_probes", "expected an integer 1..4096"),
        ("birthday_socket = 9", "mesh.birthday_socket", 'did you mean "birthday_sockets"?'),
    ],
)
def test_mesh_birthday_errors_are_located(
    tmp_path: Path, mesh: str, field: str, expected: str
) -> None:
    path, message = errors_of(tmp_path, BASE + f"\n[mesh]\n{mesh}\n")
    lines = message.splitlines()
    assert len(lines) == 1, message
    assert lines[0].startswith(f"{path}: {field}: ") and expected in lines[0], lines[0]
    assert "(line " in lines[0]


ALTWAN = """
[[links]]
name = "mpls"
interface = "eth9"
port = 4800
altwan = true
"""


def test_an_altwan_link_is_neither_off_cloud_nor_public(tmp_path: Path) -> None:
    cfg = load_config(write_site(tmp_path, BASE + ALTWAN))
    mpls = cfg.links[2]
    assert mpls.altwan and not mpls.offcloud and mpls.public is None
    assert not any(link.altwan for link in cfg.links[:2])
    # Saying what is true anyway is no mistake.
    cfg = load_config(write_site(tmp_path, BASE + ALTWAN + "offcloud = false\n"))
    assert cfg.links[2].altwan and not cfg.links[2].offcloud


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ('public = "198.51.100.9:4800"', "links[2].public", "an Alt-WAN link has no public"),
        ("offcloud = true", "links[2].offcloud", "an Alt-WAN link carries no mesh tunnels"),
        ("precedence = 1", "links[2].precedence", "an Alt-WAN link has no precedence"),
    ],
)
def test_altwan_link_errors_are_located(
    tmp_path: Path, line: str, field: str, expected: str
) -> None:
    path, message = errors_of(tmp_path, BASE + ALTWAN + line + "\n")
    lines = message.splitlines()
    assert len(lines) == 1, message
    assert lines[0].startswith(f"{path}: {field}: ") and expected in lines[0], lines[0]
    assert lines[0].endswith(f"(line {(BASE + ALTWAN).count(chr(10)) + 1})"), lines[0]


def test_one_altwan_link_and_one_to_the_internet(tmp_path: Path) -> None:
    second = ALTWAN.replace('"mpls"', '"mpls2"').replace("eth9", "eth8")
    path, message = errors_of(tmp_path, BASE + ALTWAN + second)
    assert message.splitlines() == [
        f"{path}: links[3].altwan: one Alt-WAN link per site (also links[2])"
        f" (line {(BASE + ALTWAN + second).count(chr(10))})"
    ]
    only = BASE.split("[[links]]")[0] + ALTWAN
    path, message = errors_of(tmp_path, only)
    assert message.splitlines() == [
        f"{path}: links: every link is Alt-WAN: at least one link must reach the Internet"
        " (the PoPs, the mesh)"
    ]


# --------------------------------------------------------------------------- [[links]] VLANs


def test_vlan_links_run_on_their_vlan_device(tmp_path: Path) -> None:
    text = sub("port = 4801\n", "port = 4801\nvlan = 10\n")(BASE)
    text += LINK.format(n=1).replace("wan1", "wan3") + "vlan = 20\nvlan_device = \"isp3\"\n"
    cfg = load_config(write_site(tmp_path, text))
    assert cfg.link("wan1").device == "eth0" and cfg.link("wan1").vlan is None
    wan2 = cfg.link("wan2")
    assert (wan2.interface, wan2.vlan, wan2.vlan_device, wan2.device) == (
        "eth1", 10, None, "eth1.10"
    )
    wan3 = cfg.link("wan3")
    assert (wan3.interface, wan3.vlan, wan3.device) == ("eth1", 20, "isp3")


def test_four_links_with_an_altwan_link_load(tmp_path: Path) -> None:
    altwan = LINK.format(n=4).replace("port = 4800", "altwan = true\nport = 4800")
    text = BASE + LINK.format(n=3) + altwan
    cfg = load_config(write_site(tmp_path, text))
    assert [link.name for link in cfg.links] == ["wan1", "wan2", "wan3", "wan4"]
    assert cfg.link("wan4").altwan


VLAN_CASES = [
    pytest.param(
        "vlan = 0", "links[1].vlan", "expected an integer 1..4094, got 0", id="vlan-zero"
    ),
    pytest.param(
        "vlan = 4095", "links[1].vlan", "expected an integer 1..4094, got 4095", id="vlan-4095"
    ),
    pytest.param(
        'vlan = "10"', "links[1].vlan", 'expected an integer 1..4094, got "10"', id="vlan-string"
    ),
    pytest.param(
        'vlan_device = "isp2"',
        "links[1].vlan_device",
        "only with vlan (the name of the link's VLAN device)",
        id="vlan-device-without-vlan",
    ),
    pytest.param(
        'vlan = 10\nvlan_device = "a-very-long-vlan0"',
        "links[1].vlan_device",
        "expected a network interface name of 1..15 characters",
        id="vlan-device-long",
    ),
    pytest.param(
        'vlan = 10\nvlan_device = "eth0"',
        "links[1].vlan_device",
        "the VLAN device \"eth0\" is links[0]'s device",
        id="vlan-device-is-another-link",
    ),
    pytest.param(
        'vlan = 10\nvlan_device = "eth1"',
        "links[1].vlan_device",
        "the VLAN device \"eth1\" is its own interface",
        id="vlan-device-is-its-interface",
    ),
    pytest.param(
        'vlan = 10\nvlan_device = "sdwan0"',
        "links[1].vlan_device",
        'expected a WAN device, got the tunnel interface "sdwan0"',
        id="vlan-device-is-the-tunnel",
    ),
]


@pytest.mark.parametrize(("extra", "field", "expected"), VLAN_CASES)
def test_vlan_errors_are_located(tmp_path: Path, extra: str, field: str, expected: str) -> None:
    text = sub("port = 4801\n", f"port = 4801\n{extra}\n")(BASE)
    path, message = errors_of(tmp_path, text)
    (line,) = message.splitlines()
    key = field.rsplit(".", 1)[1]
    line_no = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(f"{key} ="))
    assert line.startswith(f"{path}: {field}: {expected}"), line
    assert line.endswith(f"(line {line_no})"), line


def test_a_vlan_device_name_longer_than_ifnamsiz_is_refused(tmp_path: Path) -> None:
    text = sub('interface = "eth1"', 'interface = "enp0s31f6u1"')(BASE)
    text = sub("port = 4801\n", "port = 4801\nvlan = 1234\n")(text)
    path, message = errors_of(tmp_path, text)
    assert message == (
        f'{path}: links[1].vlan: the VLAN device\'s name "enp0s31f6u1.1234" is 16 characters,'
        f" longer than Linux allows (15): name it with vlan_device"
        f" (line {text.splitlines().index('vlan = 1234') + 1})"
    ), message
    # 15 characters fit.
    load_config(write_site(tmp_path, text.replace("vlan = 1234", "vlan = 123")))


def test_two_links_on_one_vlan_are_refused(tmp_path: Path) -> None:
    text = sub("port = 4801\n", "port = 4801\nvlan = 10\n")(BASE)
    text += LINK.format(n=1).replace("wan1", "wan3").replace("4800", "4802") + "vlan = 10\n"
    path, message = errors_of(tmp_path, text)
    (line,) = message.splitlines()
    assert line.startswith(
        f'{path}: links[2].vlan: VLAN 10 on "eth1" is already a link (links[1])'
    ), line


def test_ports_are_unique_per_device_so_two_vlans_may_share_one(tmp_path: Path) -> None:
    text = sub("port = 4801\n", "port = 4800\nvlan = 10\n")(BASE)
    text += LINK.format(n=1).replace("wan1", "wan3") + "vlan = 20\n"
    cfg = load_config(write_site(tmp_path, text))
    assert [(ln.device, ln.port) for ln in cfg.links] == [
        ("eth0", 4800), ("eth1.10", 4800), ("eth1.20", 4800)
    ]
    again = text + LINK.format(n=1).replace("wan1", "wan4")
    again += 'vlan = 40\nvlan_device = "eth1.20"\n'
    path, message = errors_of(tmp_path, again)
    assert f'{path}: links[3].vlan_device: the VLAN device "eth1.20" is links[2]\'s device' in (
        message
    ), message
