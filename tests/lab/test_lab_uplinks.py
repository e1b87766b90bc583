"""The lab's pieces for WAN link tests: several Internet uplinks per site, a pulled cable, a
silent upstream, and the impairment element. Bounds are generous: these catch a broken
mechanism, they do not measure one (docs/lab.md has the figures)."""

from __future__ import annotations

import sys

import pytest
from labwait import UDP_SOURCE_SERVER

from sdwan.lab import netns
from sdwan.lab.impair import Impairment
from sdwan.lab.topology import POP_IP, Lab, Site
from sdwan.site.config import load_config

_UDP_SERVER = UDP_SOURCE_SERVER

# Sends from one device (SO_BINDTODEVICE, as socketd's link sockets) until the server has one.
_UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[3].encode())
for _ in range(40):
    s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.1)
"""


def public_source_via(lab: Lab, site: Site, dev: str, dst_ns: str, dport: int) -> str:
    """The source address the PoP host sees for UDP the site sends out of dev."""
    srv = lab.spawn(
        dst_ns, [sys.executable, "-c", _UDP_SERVER, str(dport)], f"udp-{dev}", max_lifetime_s=30
    )
    assert netns.wait_until(
        lambda: f":{dport} " in netns.run(dst_ns, ["ss", "-Hlun"]).stdout, timeout=5
    ), srv.log_tail()
    lab.exec(site.ns, [sys.executable, "-c", _UDP_CLIENT, POP_IP, str(dport), dev], timeout=20)
    assert netns.wait_until(lambda: not srv.alive(), timeout=5), "no datagram arrived"
    return srv.log_tail().split()[0]


def carrier(lab: Lab, site: Site, dev: str) -> bool:
    out = lab.exec(site.ns, ["ip", "link", "show", "dev", dev]).stdout
    return "NO-CARRIER" not in out and "LOWER_UP" in out


def reaches(lab: Lab, site: Site, dev: str) -> bool:
    """The PoP answers a ping out of dev (tried for up to 3 s: an ARP may be under way)."""
    return netns.wait_until(
        lambda: lab.ping(site.ns, POP_IP, wait_s=0.5, source=dev), timeout=3, interval=0.05
    )


def cut_off(lab: Lab, site: Site, dev: str) -> bool:
    return not lab.ping(site.ns, POP_IP, wait_s=0.5, source=dev)


def test_a_second_uplink_through_its_own_isp(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1)
    s = lab.add_site(1)
    pop = lab.add_public_host("pop")
    u2 = lab.add_wan_link(s)
    assert (u2.dev, u2.ip, u2.gateway, u2.public_ip) == (
        "wan2", "100.66.1.2", "100.66.1.1", "198.18.2.11"
    )
    assert [u.dev for u in s.uplinks] == ["wan1", "wan2"] and s.uplink("wan1").ip == s.wan_ip
    for dev in ("wan1", "wan2"):
        assert reaches(lab, s, dev), dev
    assert public_source_via(lab, s, "wan1", pop.ns, 5001) == s.public_ip
    assert public_source_via(lab, s, "wan2", pop.ns, 5002) == u2.public_ip
    # Link 1 stays the default: the site's own traffic and the LAN host's go as before.
    assert "dev wan1" in lab.exec(s.ns, ["ip", "route", "get", POP_IP]).stdout
    assert lab.ping(s.lan_ns, POP_IP)
    # A third uplink through the first ISP's router, and a fourth straight on the Internet.
    u3 = lab.add_wan_link(s, router=1)
    u4 = lab.add_wan_link(s, name="dsl", nat="none")
    assert u3.public_ip == s.public_ip and u4.ip == u4.public_ip == "198.18.4.11"
    for dev in ("wan3", "dsl"):
        assert reaches(lab, s, dev), dev
    assert lab.ping(s.lan_ns, POP_IP)
    with pytest.raises(ValueError):
        lab.add_wan_link(s)
    # One [[links]] entry per uplink, precedence by order, valid for socketd.
    cert, key = lab.issue(s)
    cfg = load_config(lab.write_site_config(s, cert=cert, key=key))
    assert [(ln.name, ln.interface, ln.precedence) for ln in cfg.links] == [
        ("wan1", "wan1", 1), ("wan2", "wan2", 2), ("wan3", "wan3", 3), ("dsl", "dsl", 3)
    ]
    cfg = load_config(lab.write_site_config(s, cert=cert, key=key, links=[{}, {"precedence": 1}]))
    assert [(ln.name, ln.precedence) for ln in cfg.links] == [("wan1", 1), ("wan2", 1)]


def test_carrier_and_admin_state(lab: Lab) -> None:
    lab.add_inet()
    s = lab.add_site(1)
    lab.add_public_host("pop")
    lab.add_wan_link(s)
    lab.add_wan_link(s, impair=True)
    for dev in ("wan2", "wan3"):
        lab.link_carrier(s, dev, up=False)
        assert netns.wait_until(lambda d=dev: not carrier(lab, s, d), timeout=3)
        assert cut_off(lab, s, dev)
        assert reaches(lab, s, "wan1")
        lab.link_carrier(s, dev, up=True)
        assert netns.wait_until(lambda d=dev: carrier(lab, s, d), timeout=3)
        assert reaches(lab, s, dev), dev
    # The cable of link 1: the site's default route survives a pulled cable.
    lab.link_carrier(s, "wan1", up=False)
    assert cut_off(lab, s, "wan1") and reaches(lab, s, "wan2")
    lab.link_carrier(s, "wan1", up=True)
    assert netns.wait_until(lambda: lab.ping(s.lan_ns, POP_IP, wait_s=0.5), timeout=5)
    # Administratively down and up again: the default route comes back with the device.
    lab.link_admin(s, "wan2", up=False)
    assert cut_off(lab, s, "wan2")
    lab.link_admin(s, "wan2", up=True)
    assert reaches(lab, s, "wan2")
    assert "metric 10" in netns.routes(s.ns)


def test_a_silent_upstream(lab: Lab) -> None:
    lab.add_inet()
    s = lab.add_site(1)
    lab.add_public_host("pop")
    lab.add_wan_link(s)
    lab.add_wan_link(s, nat="none")
    for dev in ("wan2", "wan3", "wan1"):
        lab.silence_uplink(s, dev, on=True)
        assert cut_off(lab, s, dev), dev
        assert carrier(lab, s, dev)
        assert reaches(lab, s, "wan2" if dev == "wan1" else "wan1")
        lab.silence_uplink(s, dev, on=False)
        assert reaches(lab, s, dev), dev


def test_no_impairment_adds_under_a_millisecond(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1)
    s = lab.add_site(1)
    pop = lab.add_public_host("pop")
    u2 = lab.add_wan_link(s, impair=True)
    assert u2.element is not None and u2.element.alive()
    # Link 1 without an element against link 2 with one: the same hops otherwise.
    base = lab.ping_series(s.ns, POP_IP, count=200, interval=0.005, source="wan1")
    through = lab.ping_series(s.ns, POP_IP, count=200, interval=0.005, source="wan2")
    assert base.loss_percent == 0 and through.loss_percent < 2
    assert base.median_ms is not None and through.median_ms is not None
    assert through.median_ms - base.median_ms < 1.0, (base.median_ms, through.median_ms)
    # A few thousand packets a second, both ways, with little loss.
    udp = lab.iperf3(
        s.ns, pop.ns, POP_IP, duration=2, udp=True, length=64, bandwidth="3M",
        extra=["--bind-dev", "wan2"],
    )
    assert udp.udp_pps and udp.udp_pps > 3000, udp.udp_pps
    assert udp.lost_percent is not None and udp.lost_percent < 5, udp.lost_percent
    tcp = lab.iperf3(s.ns, pop.ns, POP_IP, duration=1, extra=["--bind-dev", "wan2"])
    assert tcp.mbps and tcp.mbps > 50, tcp.mbps
    stats = u2.element.stats()
    assert stats["up"]["rx"] > 5000 and stats["up"]["lost"] == 0


def test_loss_delay_and_jitter(lab: Lab) -> None:
    lab.add_inet()
    s = lab.add_site(1, impair=True)
    lab.add_public_host("pop")
    el = s.uplink("wan1").element
    assert el is not None

    lab.impair(s, "wan1", loss=5, seed=7)
    lossy = lab.ping_series(s.ns, POP_IP, count=400, interval=0.005, wait_s=1)
    assert 1 <= lossy.loss_percent <= 12, lossy.loss_percent
    assert 1 <= el.stats()["up"]["lost"] <= 60

    lab.impair(s, "wan1", delay_ms=100)
    slow = lab.ping_series(s.ns, POP_IP, count=50, interval=0.01)
    assert slow.loss_percent == 0 and slow.median_ms is not None
    assert 80 <= slow.median_ms <= 120, slow.median_ms
    assert slow.stdev_ms is not None and slow.stdev_ms < 5, slow.stdev_ms

    lab.impair(s, "wan1", delay_ms=60, jitter_ms=50)
    jittery = lab.ping_series(s.ns, POP_IP, count=100, interval=0.01)
    assert jittery.loss_percent == 0 and jittery.stdev_ms is not None
    assert jittery.stdev_ms > 10, jittery.stdev_ms
    assert jittery.median_ms is not None and 40 <= jittery.median_ms <= 130

    # Each way: the round trip sees the delay twice.
    lab.impair(s, "wan1", direction="both", delay_ms=50)
    both = lab.ping_series(s.ns, POP_IP, count=20, interval=0.01)
    assert both.median_ms is not None and 80 <= both.median_ms <= 120, both.median_ms

    lab.clear_impairment(s, "wan1")
    clear = lab.ping_series(s.ns, POP_IP, count=50, interval=0.005)
    assert clear.loss_percent == 0 and clear.median_ms is not None and clear.median_ms < 2
    # The LAN host behind the impaired link 1 still has its way out.
    assert lab.ping(s.lan_ns, POP_IP)


def test_duplication_and_reordering(lab: Lab) -> None:
    lab.add_inet()
    s = lab.add_site(1)
    lab.add_public_host("pop")
    u2 = lab.add_wan_link(s, impair=True)
    assert u2.element is not None
    lab.impair(s, "wan2", duplicate=50)
    dup = lab.ping_series(s.ns, POP_IP, count=40, interval=0.01, source="wan2")
    assert dup.received == 40 and 5 <= dup.duplicates <= 35, dup.duplicates
    lab.impair(s, "wan2", delay_ms=30, reorder=30)
    lab.ping_series(s.ns, POP_IP, count=60, interval=0.002, source="wan2")
    assert u2.element.stats()["up"]["reordered"] > 0
    with pytest.raises(ValueError):
        lab.impair(s, "wan1", loss=1)  # link 1 has no element


def test_an_element_attached_later(lab: Lab) -> None:
    lab.add_inet()
    s = lab.add_site(1)
    lab.add_public_host("pop")
    lab.add_wan_link(s)
    el = lab.attach_impairment(s, "wan2")
    assert s.uplink("wan2").element is el and el.alive()
    assert reaches(lab, s, "wan2") and lab.ping(s.lan_ns, POP_IP)
    lab.impair(s, "wan2", loss=100)
    assert cut_off(lab, s, "wan2")
    lab.clear_impairment(s, "wan2")
    assert reaches(lab, s, "wan2")


def test_settings_are_checked() -> None:
    assert Impairment.from_request({"loss": 5, "cmd": "set"}) == Impairment(loss=5.0)
    assert Impairment().is_zero() and not Impairment(jitter_ms=1).is_zero()
    for bad in ({"loss": 101}, {"delay_ms": -1}, {"jitter_dist": "pareto"}, {"loss": "5"},
                {"reorder": True}, {"jitter_ms": float("nan")}):
        with pytest.raises(ValueError):
            Impairment.from_request(bad)


def test_cleanup_stops_the_elements(lab: Lab) -> None:
    inner = Lab()
    with inner:
        inner.add_inet()
        s = inner.add_site(1, impair=True)
        u2 = inner.add_wan_link(s, impair=True)
        elements = [s.uplink("wan1").element, u2.element]
        assert all(el is not None and el.alive() for el in elements)
        names = list(inner.namespaces)
    assert all(el is not None and not el.alive() and not el.control.exists() for el in elements)
    assert not set(names) & set(netns.ns_list())


def test_socketd_uses_both_uplinks_and_sees_the_impairment(lab: Lab) -> None:
    from sdwan.lab.demo import pops_toml

    lab.add_inet()
    s = lab.add_site(1)
    u2 = lab.add_wan_link(s, impair=True)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=[s])
    lab.write_site_config(s, extra_toml=pops_toml(pop))
    lab.start_popd(pop)
    lab.start_socketd(s)

    def sessions() -> dict[str, str]:
        site = next(iter(lab.popctl(pop, "sites")["sites"]), {})
        return {x["link"]: x["public"] for x in site.get("sessions", []) if x.get("up")}

    # One PoP session per uplink, each through its own ISP's NAT.
    assert netns.wait_until(lambda: len(sessions()) == 2, timeout=15), sessions()
    assert sessions() == {
        "wan1": f"{s.public_ip}:{s.port}", "wan2": f"{u2.public_ip}:{s.port}"
    }
    lab.impair(s, "wan2", delay_ms=80)

    def latency(link: str) -> float:
        links = {x["name"]: x for x in lab.socketctl(s, "links")["links"]}
        return float((links[link].get("health") or {}).get("latency_ms") or 0.0)

    # socketd's own probes over the PoP session see the delay on wan2 only.
    assert netns.wait_until(lambda: latency("wan2") > 50, timeout=10), latency("wan2")
    assert latency("wan1") < 20
