"""The WAN links lab that `tests/lab/test_wan_links.py`, `bench/links` and the demo share: site 1
with several Internet uplinks (each through its own ISP's NAT router, `Lab.add_wan_link`), site 2
with one, a PoP, and what tells which uplink site 1's traffic takes (docs/links.md)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sdwan.lab.topology import Lab, Pop, Site


def build(
    lab: Lab,
    links: Sequence[dict[str, Any]] = ({"precedence": 1}, {"precedence": 2}),
    impair: bool = False,
    wan: dict[str, Any] | None = None,
    offcloud: bool = False,
    up_timeout_s: float = 30,
) -> tuple[Pop, Site, Site]:
    """Site 1 with one uplink per entry of `links` (its `[[links]]` fields: precedence,
    bandwidth_mbps...; link 1 with an impairment element when `impair`), site 2 with one, a
    PoP; `[wan]` from `wan`; both started with every PoP session of site 1 up."""
    lab.add_inet()
    lab.add_router(1, nat="masquerade")
    lab.add_router(2, nat="masquerade")
    s1 = lab.add_site(1, impair=impair)
    for _ in links[1:]:
        lab.add_wan_link(s1)
    s2 = lab.add_site(2)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=[
        {"id": s.n, "name": f"site-{s.n}", "subnets": [s.lan_subnet], "offcloud": offcloud}
        for s in (s1, s2)
    ])
    lab.start_popd(pop)
    pops = f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n'
    wan_toml = "".join(f"{k} = {v}\n" for k, v in (wan or {}).items())
    extra = pops + (f"\n[wan]\n{wan_toml}" if wan_toml else "")
    lab.write_site_config(s1, extra_toml=extra, links=[dict(spec) for spec in links])
    lab.write_site_config(s2, extra_toml=pops)
    lab.start_socketd(s1)
    lab.start_socketd(s2)
    deadline = time.monotonic() + up_timeout_s
    want = sum(1 for spec in links if spec.get("precedence", 1) <= 2)
    while not (sessions_up(lab, s1) >= want and sessions_up(lab, s2) >= 1
               and lab.ping(s1.lan_ns, s2.lan_host_ip)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"site 1's PoP sessions not up in {up_timeout_s} s: "
                               f"{lab.socketctl(s1, 'pop')}")
        time.sleep(0.2)
    return pop, s1, s2


def sessions_up(lab: Lab, site: Site) -> int:
    return int(lab.socketctl(site, "status")["cloud"]["sessions_up"])


def tx_packets(lab: Lab, site: Site) -> dict[str, int]:
    """Per link name, the packets the fast path has sent over it."""
    return {ln["name"]: ln["tx_packets"] for ln in lab.socketctl(site, "status")["links"]}


def tx_rates(lab: Lab, site: Site, seconds: float) -> dict[str, float]:
    """Per link name, packets sent per second over the next `seconds`."""
    a = tx_packets(lab, site)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = tx_packets(lab, site)
    dt = time.monotonic() - t0
    return {name: (b[name] - a.get(name, 0)) / dt for name in b}


def health(lab: Lab, site: Site) -> dict[str, dict[str, Any]]:
    """Per link name, its health as `socketctl links` shows it."""
    return {ln["name"]: ln.get("health") or {} for ln in lab.socketctl(site, "links")["links"]}


def carries(lab: Lab, site: Site, kind: str = "cloud") -> dict[str, int]:
    """The links `kind` traffic ("cloud", "offcloud") uses now, with their weights."""
    st = lab.socketctl(site, "links").get("steering") or {}
    return dict((st.get(kind) or {}).get("links") or {})


def moves(lab: Lab, site: Site, kind: str = "cloud", since_seq: int = 0) -> list[str]:
    """The texts of `link.moved` events of `kind` traffic after event `since_seq`."""
    return [e["text"] for e in lab.socketctl(site, "events", "--limit", "500")["events"]
            if e["kind"] == "link.moved" and e["seq"] > since_seq
            and e["text"].startswith(f"{kind} traffic")]


def last_seq(lab: Lab, site: Site) -> int:
    return int(lab.socketctl(site, "events", "--limit", "1")["last_seq"])
