"""The PoP's account file and popd's config: valid files load; each wrong field is located."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from sdwan.pop.account import Account, ConfigError, load_account
from sdwan.pop.config import DEFAULT_DEAD_AFTER_MS, DEFAULT_KEEPALIVE_MS, load_pop_config

REPO = Path(__file__).resolve().parents[2]

ACCOUNT = """\
[account]
name = "acme"

[[sites]]
id = 1
name = "branch-1"
subnets = ["10.1.0.0/24"]
offcloud = true
recovery = true

[[sites]]
id = 2
subnets = ["10.2.0.0/24", "fd00:2::/64"]

[[rules]]
name = "backups"
transport = "offcloud"
secondary = "none"
src = ["branch-1"]
dst = ["site-2", "10.9.0.0/16"]
protocol = "tcp"
ports = [445, "8000-8100"]

[[rules]]
name = "video"
transport = "offcloud"
applications = ["zoom", "teams"]
domains = ["*.example.com"]

[[rules]]
name = "rest"
transport = "cloud"
"""

POP = """\
[pop]
id = 1
account = "account.toml"

[pki]
ca = "ca.pem"
cert = "pop-1.pem"
key = "pop-1.key"
"""


def write(tmp_path: Path, text: str, name: str = "account.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(path: Path, loader=load_account) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as exc:
        loader(path)
    return str(exc.value).splitlines()


def test_valid_account_loads_with_defaults(tmp_path: Path) -> None:
    acc = load_account(write(tmp_path, ACCOUNT))
    assert acc.name == "acme"
    assert [s.id for s in acc.sites] == [1, 2]
    one, two = acc.sites
    assert one.offcloud and one.recovery and one.name == "branch-1"
    assert two.name == "site-2" and not two.offcloud and not two.recovery
    assert two.subnets == (ipaddress.ip_network("10.2.0.0/24"), ipaddress.ip_network("fd00:2::/64"))
    backups, video, rest = acc.rules
    assert backups.to_dict() == {
        "name": "backups", "transport": "offcloud", "secondary": "none", "src": ["branch-1"],
        "dst": ["site-2", "10.9.0.0/16"], "protocol": "tcp", "ports": [445, "8000-8100"],
    }
    assert backups.ports == ((445, 445), (8000, 8100)) and not backups.complex
    # An off-cloud rule's secondary defaults to automatic; a cloud rule has none.
    assert (video.secondary, rest.secondary, rest.protocol) == ("automatic", None, "any")
    assert video.complex and video.app == (("applications", ("zoom", "teams")),
                                           ("domains", ("*.example.com",)))
    assert acc.notes() == ["rules video: uses applications, domains: not evaluated on the"
                           " socket: its traffic goes to the PoP"]
    assert acc.site_ids == {1, 2} and acc.site(3) is None
    # What SQLite keeps gives the same account back.
    assert Account.from_doc(acc.to_doc()) == acc


def test_site_config_resolves_site_names(tmp_path: Path) -> None:
    acc = load_account(write(tmp_path, ACCOUNT))
    site = acc.site(2)
    assert site is not None
    cfg = acc.site_config(site)
    assert cfg["name"] == "site-2" and cfg["firewall"] == {"default": "allow", "rules": []}
    backups, video, rest = cfg["rules"]
    assert backups == {
        "name": "backups", "transport": "offcloud", "secondary": "none",
        "src": ["branch-1"], "dst": ["site-2", "10.9.0.0/16"],
        "src_subnets": ["10.1.0.0/24"], "dst_subnets": ["10.2.0.0/24", "fd00:2::/64",
                                                        "10.9.0.0/16"],
        "protocol": "tcp", "ports": [[445, 445], [8000, 8100]], "complex": [],
    }
    assert video["complex"] == ["applications", "domains"] and video["dst_subnets"] is None
    assert rest["transport"] == "cloud" and rest["ports"] == []


def test_rules_stored_before_the_schema_are_not_kept() -> None:
    doc = {"name": "acme", "sites": [{"id": 1, "name": "a", "subnets": ["10.1.0.0/24"],
                                      "offcloud": False, "recovery": False}],
           "rules": [{"name": "old", "action": "allow"},
                     {"name": "new", "transport": "cloud", "protocol": "any"}]}
    assert [r.name for r in Account.from_doc(doc).rules] == ["new"]


def test_example_files_load() -> None:
    acc = load_account(REPO / "examples" / "account.toml")
    assert len(acc.sites) == 3 and acc.rules and acc.firewall.rules


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('name = "acme"', "name = 5", 'account.name: expected a name of 1..64 characters'),
        ('name = "acme"', 'name = "a b"', "account.name: expected a name of 1..64"),
        ("id = 1\n", "id = 0\n", "sites[0].id: expected an integer 1..65535, got 0 (line 5)"),
        ("id = 1\n", 'id = "1"\n', 'sites[0].id: expected an integer 1..65535, got "1"'),
        ("id = 2\n", "id = 1\n", "sites[1].id: duplicate site id 1 (also sites[0])"),
        ('name = "branch-1"', "name = 7", "sites[0].name: expected a printable string"),
        ('subnets = ["10.1.0.0/24"]', 'subnets = ["10.1.0.1/24"]',
         'sites[0].subnets[0]: expected a network with the host bits zero, got "10.1.0.1/24"'),
        ('subnets = ["10.1.0.0/24"]', "subnets = []",
         "sites[0].subnets: expected an array of at least 1 network"),
        ('subnets = ["10.1.0.0/24"]', 'subnets = ["10.2.0.0/16"]',
         "sites[1].subnets[0]: subnet 10.2.0.0/24 overlaps 10.2.0.0/16 of sites[0]"),
        ("offcloud = true", 'offcloud = "yes"', 'sites[0].offcloud: expected true or false'),
        ("recovery = true", "recovery = 1", "sites[0].recovery: expected true or false, got 1"),
        ("recovery = true", "recovery = true\ncolour = 1",
         "sites[0].colour: unknown key (expected one of: id, name, offcloud, recovery, subnets)"),
        ('name = "backups"', "name = 3", "rules[0].name: expected a name of 1..64 characters"),
        ('name = "video"', 'name = "backups"', 'rules[1].name: duplicate rule name "backups"'
         " (also rules[0])"),
        ('name = "rest"\ntransport = "cloud"', 'name = "rest"',
         'rules[2].transport: missing required field (expected "offcloud" or "cloud")'),
        ('transport = "cloud"', 'transport = "mpls"',
         'rules[2].transport: expected "offcloud" or "cloud", got "mpls" (line 32)'),
        ('transport = "cloud"', 'transport = "cloud"\nsecondary = "none"',
         'rules[2].secondary: only a rule with transport = "offcloud" has a secondary'),
        ('secondary = "none"', 'secondary = "alt-wan"',
         'rules[0].secondary: expected "automatic" or "none" or "cloud", got "alt-wan"'),
        ('src = ["branch-1"]', 'src = ["branch-9"]',
         'rules[0].src[0]: unknown site name "branch-9" (expected a subnet such as'
         ' "10.1.0.0/24" or the name of a site: branch-1, site-2) (line 19)'),
        ('src = ["branch-1"]', 'src = ["10.1.0.1/24"]',
         'rules[0].src[0]: expected a network with the host bits zero, got "10.1.0.1/24"'),
        ('src = ["branch-1"]', "src = []",
         "rules[0].src: expected an array of 1..64 networks or site names (leave it out for"
         " any), got an empty array"),
        ('dst = ["site-2", "10.9.0.0/16"]', 'dst = "site-2"',
         'rules[0].dst: expected an array of 1..64 networks or site names'),
        ('protocol = "tcp"', 'protocol = "sctp"',
         'rules[0].protocol: expected "any" or "tcp" or "udp" or "icmp", got "sctp"'),
        ('ports = [445, "8000-8100"]', 'ports = [445, "8100-8000"]',
         'rules[0].ports[1]: empty range "8100-8000": 8100 is above 8000'),
        ('ports = [445, "8000-8100"]', "ports = [0]",
         "rules[0].ports[0]: expected a port 1..65535, got 0"),
        ('ports = [445, "8000-8100"]', 'ports = ["http"]',
         'rules[0].ports[0]: expected a port 1..65535 or a range "LOW-HIGH", got "http"'),
        ('protocol = "tcp"', 'protocol = "icmp"',
         'rules[0].ports: ports need protocol "tcp" or "udp", got protocol "icmp"'),
        ('protocol = "tcp"', "",
         'rules[0].ports: ports need protocol "tcp" or "udp", the rule has none'),
        ('domains = ["*.example.com"]', "domains = [7]",
         "rules[1].domains[0]: expected a name of 1..256 characters, got 7"),
        ('domains = ["*.example.com"]', 'fqdn = ["x"]',
         "rules[1].fqdn: unknown key (expected one of: applications, categories, custom_apps,"
         " domains, dst, name, ports, protocol, secondary, services, src, transport)"),
        ("[account]", "[acount]", 'acount: unknown key (did you mean "account"?'),
    ],
)
def test_each_wrong_field_is_located(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in ACCOUNT
    path = write(tmp_path, ACCOUNT.replace(old, new, 1))
    lines = errors_of(path)
    assert any(line.startswith(f"{path}: ") and expected in line for line in lines), lines


def test_missing_parts(tmp_path: Path) -> None:
    lines = errors_of(write(tmp_path, "[account]\n"))
    assert any("account.name: missing required field" in x for x in lines), lines
    assert any("sites: missing required [[sites]]" in x for x in lines), lines
    lines = errors_of(write(tmp_path, '[account]\nname = "a"\n[[sites]]\nname = "x"\n'))
    assert any("sites[0].id: missing required field (expected an integer" in x for x in lines)
    assert any("sites[0].subnets: missing required field" in x for x in lines)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    assert "file not found" in errors_of(tmp_path / "nope.toml")[0]
    lines = errors_of(write(tmp_path, "[account\nname = 1\n"))
    assert "line 1, column" in lines[0] and "invalid TOML" in lines[0]


def test_pop_config_defaults_and_paths(tmp_path: Path) -> None:
    write(tmp_path, ACCOUNT)
    for name in ("ca.pem", "pop-1.pem", "pop-1.key"):
        (tmp_path / name).write_text("x")
    cfg = load_pop_config(write(tmp_path, POP, "pop.toml"))
    assert (cfg.id, cfg.name, cfg.listen, cfg.port, cfg.stun_port) == (
        1, "pop-1", "0.0.0.0", 4800, 3478
    )
    assert cfg.account == tmp_path / "account.toml"
    assert cfg.pki.cert == tmp_path / "pop-1.pem"
    assert (cfg.cloud.keepalive_ms, cfg.cloud.dead_after_ms) == (
        DEFAULT_KEEPALIVE_MS, DEFAULT_DEAD_AFTER_MS
    )
    # The key timers popd announces: 600 s, and twice that plus the margin, as on a site.
    assert (cfg.keys.rekey_s, cfg.keys.key_max_age_s) == (600, 1260)


def test_pop_key_max_age_follows_rekey_s(tmp_path: Path) -> None:
    # `[tunnel] rekey_s` alone: the key-age limit follows it (it used to stay at 900 s and
    # the file was refused naming key_max_age_s, which was not in it).
    write(tmp_path, ACCOUNT)
    for name in ("ca.pem", "pop-1.pem", "pop-1.key"):
        (tmp_path / name).write_text("x")
    path = write(tmp_path, POP + "\n[tunnel]\nrekey_s = 1200\n", "pop.toml")
    cfg = load_pop_config(path)
    assert (cfg.keys.rekey_s, cfg.keys.key_max_age_s) == (1200, 2460)
    path = write(tmp_path, POP + "\n[tunnel]\nrekey_s = 60\nkey_max_age_s = 120\n", "pop.toml")
    assert load_pop_config(path).keys.as_dict() == {"rekey_s": 60, "key_max_age_s": 120}


@pytest.mark.parametrize(
    ("extra_or_change", "expected"),
    [
        (("id = 1", "id = 0"), "pop.id: expected an integer 1..255, got 0"),
        (("id = 1", 'id = 1\nlisten = "nowhere"'), 'pop.listen: expected an IP address'),
        (("id = 1", "id = 1\nport = 70000"), "pop.port: expected an integer 1..65535"),
        (("id = 1", "id = 1\nstun_port = 4800"), "pop.stun_port: expected a port other than"),
        (('account = "account.toml"', 'account = "gone.toml"'), "pop.account: file not found"),
        (('cert = "pop-1.pem"', 'cert = "pop-9.pem"'), "pki.cert: file not found"),
        (("", "[cloud]\nkeepalive_ms = 5"), "cloud.keepalive_ms: expected an integer 20..60000"),
        (("", "[cloud]\nkeepalive_ms = 200\ndead_after_ms = 300"),
         "cloud.dead_after_ms: expected at least twice keepalive_ms (400), got 300"),
        (("", "[tunnel]\nrekey_s = 600\nkey_max_age_s = 600"),
         "tunnel.key_max_age_s: cannot work with rekey_s: a key must last its rekey interval"
         " plus 60 s for the handshake: key_max_age_s 600 is below rekey_s 600 + 60"),
        (("", "[tunnel]\nrekey_s = 10"), "tunnel.rekey_s: expected an integer 60..86400, got 10"),
        (("", "[tunnel]\nkey_max_age_s = 100"),
         "tunnel.key_max_age_s: expected an integer 120..172860, got 100"),
        (("", "[tunnel]\nrekey_after = 5"), "tunnel.rekey_after: unknown key"),
        (("", "[paths]\ncontrol_socket = \"" + "x" * 120 + "\""),
         "paths.control_socket: expected a path of at most 107 bytes"),
    ],
)
def test_pop_config_wrong_fields(
    tmp_path: Path, extra_or_change: tuple[str, str], expected: str
) -> None:
    write(tmp_path, ACCOUNT)
    for name in ("ca.pem", "pop-1.pem", "pop-1.key"):
        (tmp_path / name).write_text("x")
    old, new = extra_or_change
    text = POP.replace(old, new, 1) if old else POP + "\n" + new + "\n"
    path = write(tmp_path, text, "pop.toml")
    lines = errors_of(path, load_pop_config)
    assert any(line.startswith(f"{path}: ") and expected in line for line in lines), lines


def test_popd_exits_2_with_located_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "[pop]\nid = 300\n", "pop.toml")
    cp = subprocess.run(
        [sys.executable, "-m", "sdwan.pop.popd", "--config", str(path)],
        capture_output=True, text=True, timeout=30,
        env={"PYTHONPATH": str(REPO / "firmware"), "PATH": "/usr/bin:/bin"},
    )
    assert cp.returncode == 2
    assert f"popd: {path}: pop.id: expected an integer 1..255, got 300" in cp.stderr
    assert f"popd: {path}: pki: missing required table [pki]" in cp.stderr


def test_an_account_whose_config_a_site_could_not_receive_is_refused(tmp_path: Path) -> None:
    # 120 firewall rules of 200 + 200 subnets each: within every per-rule limit, but the
    # config every site is sent would be over a megabyte, and sites would refuse the welcome.
    subnets = [f"172.{16 + i // 250}.{i % 250}.0/24" for i in range(200)]
    rules = "".join(
        f'[[firewall.rules]]\nname = "r{i}"\naction = "deny"\nsrc = {subnets!r}\n'
        f"dst = {subnets!r}\n\n".replace("'", '"')
        for i in range(120)
    )
    path = tmp_path / "account.toml"
    path.write_text(ACCOUNT + "\n[firewall]\ndefault = \"allow\"\n\n" + rules)
    with pytest.raises(ConfigError) as e:
        load_account(path)
    text = str(e.value)
    assert "firewall: expected the configuration sent to each site to be at most" in text
    assert "sites[0] (branch-1)" in text


def test_rules_resolve_to_at_most_4096_networks(tmp_path: Path) -> None:
    subnets = [f"172.{16 + i // 250}.{i % 250}.0/24" for i in range(64)]
    rules = "".join(
        f'[[rules]]\nname = "r{i}"\ntransport = "offcloud"\ndst = {subnets!r}\n\n'.replace(
            "'", '"')
        for i in range(65)
    )
    path = tmp_path / "account.toml"
    path.write_text(ACCOUNT.split("[[rules]]")[0] + rules)
    with pytest.raises(ConfigError) as e:
        load_account(path)
    assert "expected at most 4096 networks over all rules" in str(e.value)
