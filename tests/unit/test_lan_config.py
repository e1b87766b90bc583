"""The LAN port's fields of the site config (`[lan] address`, `[lan.dhcp]`): a valid LAN loads
with its defaults, a config without them loads as before, and every wrong field is located."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from sdwan.site.config import DEFAULT_LEASE_S, ConfigError, DhcpStatic, load_config

BASE = """\
[site]
id = 1

[pki]
ca = "ca.pem"
cert = "site-1.pem"
key = "site-1.key"

[lan]
subnets = ["10.1.0.0/24"]
interface = "lan0"
address = "10.1.0.1/24"

[lan.dhcp]
range = ["10.1.0.100", "10.1.0.199"]
dns = ["192.0.2.53"]

[[lan.dhcp.static]]
mac = "02:00:00:00:01:02"
ip = "10.1.0.50"
name = "printer"

[[lan.dhcp.static]]
mac = "02-00-00-00-01-03"
ip = "10.1.0.51"

[[links]]
name = "wan1"
interface = "eth0"
port = 4800
"""

# The config of a LAN whose port the system addresses (the lab's until now).
PLAIN = BASE.split("address =")[0] + "\n[[links]]" + BASE.split("[[links]]")[1]


def write(folder: Path, text: str) -> Path:
    for pem in ("ca.pem", "site-1.pem", "site-1.key"):
        (folder / pem).write_text("-----BEGIN PLACEHOLDER-----\n")
    path = folder / "socketd.toml"
    path.write_text(text)
    return path


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"test bug: {old!r} not in the base config"
        return text.replace(old, new, 1)

    return edit


def test_the_lan_port_and_its_dhcp_server_load(tmp_path: Path) -> None:
    lan = load_config(write(tmp_path, BASE)).lan
    assert lan.interface == "lan0"
    assert lan.address == ipaddress.IPv4Interface("10.1.0.1/24")
    assert lan.serves_dhcp and lan.dhcp is not None
    ip = ipaddress.IPv4Address
    assert lan.dhcp.range == (ip("10.1.0.100"), ip("10.1.0.199"))
    assert lan.dhcp.router is None  # the LAN address, when served
    assert lan.dhcp.dns == (ip("192.0.2.53"),)
    assert lan.dhcp.lease_s == DEFAULT_LEASE_S
    assert lan.dhcp.static == (
        DhcpStatic("02:00:00:00:01:02", ip("10.1.0.50"), "printer"),
        DhcpStatic("02:00:00:00:01:03", ip("10.1.0.51"), None),
    )


def test_a_lan_without_the_new_fields_loads_as_before(tmp_path: Path) -> None:
    lan = load_config(write(tmp_path, PLAIN)).lan
    assert lan.interface == "lan0" and lan.address is None and lan.dhcp is None
    assert not lan.serves_dhcp


def test_dhcp_may_be_turned_off_without_a_range(tmp_path: Path) -> None:
    text = PLAIN.replace("[[links]]", '[lan.dhcp]\nenabled = false\n\n[[links]]', 1)
    lan = load_config(write(tmp_path, text)).lan
    assert lan.dhcp is not None and not lan.serves_dhcp


def wide(text: str, last: str) -> str:
    """text with a /16 LAN whose range runs from 10.1.0.100 to last."""
    for old, new in (('"10.1.0.0/24"', '"10.1.0.0/16"'), ('"10.1.0.1/24"', '"10.1.0.1/16"'),
                     ('"10.1.0.100", "10.1.0.199"', f'"10.1.0.100", "{last}"')):
        text = sub(old, new)(text)
    return text


def test_a_range_of_4096_addresses_loads(tmp_path: Path) -> None:
    text = wide(BASE, "10.1.16.99")
    lan = load_config(write(tmp_path, text)).lan
    assert lan.dhcp is not None and lan.dhcp.range is not None
    assert int(lan.dhcp.range[1]) - int(lan.dhcp.range[0]) + 1 == 4096


def test_an_address_without_dhcp_and_a_router_of_its_own(tmp_path: Path) -> None:
    text = sub('dns = ["192.0.2.53"]', 'router = "10.1.0.254"\nlease_s = 3600')(BASE)
    lan = load_config(write(tmp_path, text)).lan
    assert lan.dhcp is not None
    assert lan.dhcp.router == ipaddress.IPv4Address("10.1.0.254") and lan.dhcp.lease_s == 3600


NO_ADDRESS = sub('address = "10.1.0.1/24"\n', "")
NO_IFACE = sub('interface = "lan0"\n', "")

# (edit of BASE, the field named, what the message says)
CASES = [
    # the address
    (sub('"10.1.0.1/24"', '"10.1.0.1"'), "lan.address", "with its prefix length"),
    (sub('"10.1.0.1/24"', '"10.1.0.300/24"'), "lan.address", "IPv4 address with its prefix"),
    (sub('"10.1.0.1/24"', "17"), "lan.address", "got 17"),
    (sub('"10.1.0.1/24"', '"fd00:1::1/64"'), "lan.address", "IPv4 address"),
    (sub('"10.1.0.1/24"', '"10.1.0.0/24"'), "lan.address", "network address of 10.1.0.0/24"),
    (sub('"10.1.0.1/24"', '"10.1.0.255/24"'), "lan.address", "broadcast address of 10.1.0.0/24"),
    (sub('"10.1.0.1/24"', '"10.1.0.1/31"'), "lan.address", "prefix length 8..30"),
    (sub('"10.1.0.1/24"', '"127.0.0.1/24"'), "lan.address", "127.0.0.1 is a loopback address"),
    (sub('"10.1.0.1/24"', '"10.2.0.1/24"'), "lan.address", "is not inside lan.subnets"),
    (sub('"10.1.0.1/24"', '"10.1.0.1/16"'), "lan.address", "its network 10.1.0.0/16 must lie"),
    (NO_IFACE, "lan.address", "needs lan.interface"),
    (sub('interface = "lan0"', 'interface = "eth0"'), "lan.interface", "links[0]'s device"),
    (sub('interface = "lan0"', 'interface = "sdwan0"'), "lan.interface", "the tunnel device"),
    # DHCP without its port
    (NO_ADDRESS, "lan.dhcp", "a DHCP server needs lan.address and lan.interface"),
    (
        lambda t: sub("[lan.dhcp]\n", "[lan.dhcp]\nenabled = true\n")(NO_ADDRESS(t)),
        "lan.dhcp.enabled",
        "needs lan.address",
    ),
    (sub("[lan.dhcp]\n", "[lan.dhcp]\nenabled = 1\n"), "lan.dhcp.enabled", "true or false"),
    (sub("[lan.dhcp]\n", "[lan.dhcp]\nrnage = 1\n"), "lan.dhcp.rnage", 'did you mean "range"'),
    # the range
    (sub('range = ["10.1.0.100", "10.1.0.199"]\n', ""), "lan.dhcp.range", "missing required"),
    (sub('"10.1.0.100", "10.1.0.199"', '"10.1.0.100"'), "lan.dhcp.range", "two IPv4"),
    (sub('range = ["10.1.0.100", "10.1.0.199"]', 'range = "10.1.0.100-199"'),
     "lan.dhcp.range", "two IPv4"),
    (sub('"10.1.0.100", "10.1.0.199"', '"10.1.0.100", "10.1.1.5"'), "lan.dhcp.range[1]",
     "10.1.1.5 is not in the LAN's network 10.1.0.0/24"),
    (sub('"10.1.0.100", "10.1.0.199"', '"10.1.0.100", "10.1.0.255"'), "lan.dhcp.range[1]",
     "broadcast address"),
    (sub('"10.1.0.100", "10.1.0.199"', '"10.1.0.0", "10.1.0.9"'), "lan.dhcp.range[0]",
     "network address"),
    (sub('"10.1.0.100", "10.1.0.199"', '"10.1.0.x", "10.1.0.199"'), "lan.dhcp.range[0]",
     "expected an IPv4 address"),
    (sub('"10.1.0.100", "10.1.0.199"', '"10.1.0.199", "10.1.0.100"'), "lan.dhcp.range",
     "reversed: the first address 10.1.0.199 is above the last 10.1.0.100"),
    (sub('"10.1.0.100", "10.1.0.199"', '"10.1.0.1", "10.1.0.9"'), "lan.dhcp.range",
     "holds the LAN port's own address 10.1.0.1"),
    (lambda t: wide(t, "10.1.16.100"), "lan.dhcp.range", "holds 4097 addresses: at most 4096"),
    (sub('interface = "lan0"', 'interface = "lan#0"'), "lan.interface", "'#'"),
    # router, DNS, lease
    (sub("[lan.dhcp]\n", '[lan.dhcp]\nrouter = "10.9.0.1"\n'), "lan.dhcp.router",
     "10.9.0.1 is not in the LAN's network"),
    (sub("[lan.dhcp]\n", '[lan.dhcp]\nrouter = "10.1.0.150"\n'), "lan.dhcp.router",
     "inside the range"),
    (sub("[lan.dhcp]\n", '[lan.dhcp]\nrouter = "10.1.0.255"\n'), "lan.dhcp.router",
     "broadcast address"),
    (sub('dns = ["192.0.2.53"]', 'dns = ["192.0.2.x"]'), "lan.dhcp.dns[0]", "IPv4 address"),
    (sub('dns = ["192.0.2.53"]', 'dns = ["224.0.0.1"]'), "lan.dhcp.dns[0]", "multicast"),
    (sub('dns = ["192.0.2.53"]', 'dns = ["10.1.0.1"]'), "lan.dhcp.dns[0]",
     "the LAN port's own address"),
    (sub('dns = ["192.0.2.53"]', 'dns = ["10.1.0.0"]'), "lan.dhcp.dns[0]", "network address"),
    (sub('dns = ["192.0.2.53"]', 'dns = ["10.1.0.255"]'), "lan.dhcp.dns[0]", "broadcast address"),
    (sub('dns = ["192.0.2.53"]', 'dns = "192.0.2.53"'), "lan.dhcp.dns", "an array of at most"),
    (sub("[lan.dhcp]\n", "[lan.dhcp]\nlease_s = 10\n"), "lan.dhcp.lease_s", "60..2592000"),
    # static leases
    (sub('mac = "02:00:00:00:01:02"', 'mac = "02:00:00:00:01"'), "lan.dhcp.static[0].mac",
     "expected a MAC address"),
    (sub('mac = "02:00:00:00:01:02"', 'mac = "02:00-00:00:01:02"'), "lan.dhcp.static[0].mac",
     "expected a MAC address"),
    (sub('mac = "02:00:00:00:01:02"', 'mac = "01:00:5e:00:00:01"'), "lan.dhcp.static[0].mac",
     "multicast"),
    (sub('mac = "02-00-00-00-01-03"', 'mac = "02:00:00:00:01:02"'), "lan.dhcp.static[1].mac",
     "duplicate MAC 02:00:00:00:01:02 (also lan.dhcp.static[0])"),
    (sub('ip = "10.1.0.51"', 'ip = "10.1.0.50"'), "lan.dhcp.static[1].ip",
     "duplicate address 10.1.0.50 (also lan.dhcp.static[0])"),
    (sub('ip = "10.1.0.51"', 'ip = "10.3.0.51"'), "lan.dhcp.static[1].ip",
     "10.3.0.51 is not in the LAN's network 10.1.0.0/24"),
    (sub('ip = "10.1.0.51"', 'ip = "10.1.0.1"'), "lan.dhcp.static[1].ip",
     "the LAN port's own address"),
    (sub('ip = "10.1.0.51"', 'ip = "10.1.0.255"'), "lan.dhcp.static[1].ip", "broadcast"),
    (sub('ip = "10.1.0.51"\n', ""), "lan.dhcp.static[1].ip", "missing required field"),
    (sub('name = "printer"', 'name = "the printer"'), "lan.dhcp.static[0].name", "host name"),
    (sub('name = "printer"', 'colour = "red"'), "lan.dhcp.static[0].colour", "unknown key"),
    (
        lambda t: t.split("[[lan.dhcp.static]]")[0]
        + "static = 3\n\n[[links]]"
        + t.split("[[links]]")[1],
        "lan.dhcp.static",
        "array of tables",
    ),
]


@pytest.mark.parametrize(("edit", "field", "expected"), CASES)
def test_wrong_lan_field_is_located(
    tmp_path: Path, edit: Callable[[str], str], field: str, expected: str
) -> None:
    text = edit(BASE)
    path = write(tmp_path, text)
    with pytest.raises(Exception) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 1, f"expected one error, got:\n{info.value}"
    (line,) = lines
    assert line.startswith(f"{path}: {field}: "), line
    assert expected in line, line
    # Each error names its line in the file.
    assert line.endswith(")") and "(line " in line, line


def test_the_line_is_the_fields(tmp_path: Path) -> None:
    text = sub('ip = "10.1.0.51"', 'ip = "10.1.0.50"')(BASE)
    path = write(tmp_path, text)
    with pytest.raises(Exception) as info:
        load_config(path)
    line_no = text.splitlines().index('ip = "10.1.0.50"', text.splitlines().index(
        'mac = "02-00-00-00-01-03"')) + 1
    assert str(info.value).endswith(f"(line {line_no})"), str(info.value)


def test_the_lan_port_is_checked_against_each_links_device(tmp_path: Path) -> None:
    # A tagged WAN on eth0 and the untagged LAN on eth0: one port, two roles, a normal box.
    text = BASE.replace('interface = "lan0"', 'interface = "eth0"').replace(
        'interface = "eth0"\nport = 4800', 'interface = "eth0"\nvlan = 10\nport = 4800'
    )
    assert load_config(write(tmp_path, text)).lan.interface == "eth0"
    # The LAN on the WAN's VLAN device itself is refused, located.
    text = BASE.replace('interface = "lan0"', 'interface = "eth0.10"').replace(
        'interface = "eth0"\nport = 4800', 'interface = "eth0"\nvlan = 10\nport = 4800'
    )
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert "lan.interface: the LAN port cannot be links[0]'s device" in str(e.value)


def test_links_sharing_a_device_leave_its_addressing_to_the_system(tmp_path: Path) -> None:
    two = PLAIN + '\n[[links]]\nname = "wan2"\ninterface = "eth0"\nport = 4801\n'
    assert len(load_config(write(tmp_path, two)).links) == 2
    static = two.replace(
        'port = 4801\n',
        'port = 4801\naddressing = { mode = "static", address = "192.0.2.7/24",'
        ' gateway = "192.0.2.1" }\n',
    )
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, static))
    assert 'links[1].addressing: "eth0" is also the device of links[0]' in str(e.value)
