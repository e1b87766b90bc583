"""The one set of checks for addresses and prefixes that come from the network or the
operator (common/addressing.py): static WAN addresses, DHCP leases and the PoP directory's
prefixes all go through them. The lab test with a real DHCP server is
tests/lab/test_dhcp_leases.py."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from pathlib import Path

import pytest

from sdwan.appliance.wanaddr import WanAddressing
from sdwan.common.addressing import Owned, check_prefix, check_wan_address
from sdwan.common.store import Store
from sdwan.site.config import Link

OWNED = (
    Owned(ipaddress.ip_network("10.1.0.0/24"), "the LAN"),
    Owned(ipaddress.ip_network("10.2.0.0/24"), "static peer site 2", 2),
)


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("0.0.0.0/0", "0.0.0.0/0 is a default route: shorter than /8"),
        ("0.0.0.0/1", "0.0.0.0/1 is a /1: shorter than /8"),
        ("128.0.0.0/1", "128.0.0.0/1 is a /1: shorter than /8"),
        ("20.0.0.0/7", "20.0.0.0/7 is a /7: shorter than /8"),
        ("::/0", "::/0 is a default route"),
        ("2000::/3", "2000::/3 is a /3: shorter than /8"),
        ("127.0.0.0/8", "overlaps the loopback range 127.0.0.0/8"),
        ("127.1.0.0/16", "overlaps the loopback range 127.0.0.0/8"),
        ("224.0.0.0/24", "overlaps the multicast range 224.0.0.0/4"),
        ("169.254.0.0/16", "overlaps the link-local range 169.254.0.0/16"),
        ("240.1.0.0/16", "overlaps the reserved range 240.0.0.0/4"),
        ("0.1.0.0/16", "overlaps the unspecified range 0.0.0.0/8"),
        ("ff02::/16", "overlaps the multicast range ff00::/8"),
        ("::1/128", "overlaps the loopback address ::1"),
        ("10.0.0.0/8", "10.0.0.0/8 overlaps 10.1.0.0/24 of the LAN"),
        ("10.1.0.128/25", "10.1.0.128/25 overlaps 10.1.0.0/24 of the LAN"),
        ("10.2.0.0/16", "10.2.0.0/16 overlaps 10.2.0.0/24 of static peer site 2"),
    ],
)
def test_prefixes_refused(prefix: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_prefix(ipaddress.ip_network(prefix), OWNED)


@pytest.mark.parametrize("prefix", ["10.3.0.0/24", "11.0.0.0/8", "100.64.0.0/10", "fd00:3::/64"])
def test_prefixes_accepted(prefix: str) -> None:
    check_prefix(ipaddress.ip_network(prefix), OWNED)


def test_a_static_peer_may_be_listed_with_its_own_prefixes() -> None:
    # The directory lists a site that is also a static peer with its own subnet: not a hijack.
    check_prefix(ipaddress.ip_network("10.2.0.0/24"), OWNED, except_site=2)
    with pytest.raises(ValueError, match="of static peer site 2"):
        check_prefix(ipaddress.ip_network("10.2.0.0/24"), OWNED, except_site=3)
    with pytest.raises(ValueError, match="of the LAN"):
        check_prefix(ipaddress.ip_network("10.1.0.0/24"), OWNED, except_site=2)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("200.1.1.5/1", "128.0.0.0/1 is a /1: shorter than /8"),
        ("127.0.0.5/8", "127.0.0.5 cannot be a WAN address"),
        ("224.0.0.5/24", "224.0.0.5 cannot be a WAN address"),
        ("169.254.3.4/16", "169.254.3.4 cannot be a WAN address"),
        ("0.0.0.0/0", "0.0.0.0 cannot be a WAN address"),
        ("240.0.0.2/24", "reserved range"),
        ("100.64.1.0/24", "is the network address of 100.64.1.0/24"),
        ("10.1.0.77/16", "10.1.0.0/16 overlaps 10.1.0.0/24 of the LAN"),
        ("10.2.0.77/24", "10.2.0.0/24 overlaps 10.2.0.0/24 of static peer site 2"),
    ],
)
def test_wan_addresses_refused(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_wan_address(ipaddress.ip_interface(address), OWNED)


def test_set_link_refuses_a_static_address_over_the_lan_or_a_peer(tmp_path: Path) -> None:
    applied: list[object] = []
    with Store(tmp_path) as store:
        wan = WanAddressing(
            [Link("wan1", "eth0", 4800)],
            store,
            tmp_path / "control.sock",
            lambda *a: None,
            apply_worker=applied.append,
            owned=OWNED,
        )
        set_link = wan.handlers()["set-link"]
        for address, gateway, why in [
            ("10.1.0.5/16", "10.1.0.1", "10.1.0.0/16 overlaps 10.1.0.0/24 of the LAN"),
            ("10.2.0.5/24", "10.2.0.1", "overlaps 10.2.0.0/24 of static peer site 2"),
            ("20.0.0.5/7", "20.0.0.1", "20.0.0.0/7 is a /7"),
        ]:
            req = {"link": "wan1", "mode": "static", "address": address, "gateway": gateway}
            with pytest.raises(ValueError, match=re.escape(why)):
                asyncio.run(set_link(req))
        assert applied == []
        assert store.get_doc("wan.wan1") is None

        # A stored setting that overlaps (the LAN grew since) is not applied at the next start.
        stored = {"mode": "static", "address": "10.1.0.5/16", "gateway": "10.1.0.1"}
        store.put_doc("wan.wan1", stored)
        wan = WanAddressing(
            [Link("wan1", "eth0", 4800)], store, tmp_path / "c.sock", lambda *a: None, owned=OWNED
        )
        assert (wan.links["wan1"].addressing.mode, wan.links["wan1"].source) == ("none", "default")
