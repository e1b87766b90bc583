"""The WAN recovery lab that `tests/lab/test_recovery.py`, `tests/lab/test_altwan.py` and
`bench/recovery` share: sites behind masquerading NATs, all off-cloud with their mesh punched
(and, when asked, an Alt-WAN link each with its tunnels up), one PoP, and the ways to take the
cloud away and give it back (docs/recovery.md)."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from typing import Any

from sdwan.lab import netns
from sdwan.lab.topology import Lab, Pop, Site

# nftables on the PoP's side dropping everything: the PoP is alive but unreachable.
CUT_TABLE = "recovery_cut"
CUT_POP = f"""
table inet {CUT_TABLE} {{
    chain input {{ type filter hook input priority -10; policy drop; }}
    chain output {{ type filter hook output priority -10; policy drop; }}
}}
"""


def build(
    lab: Lab, recovery: Sequence[bool] = (True, True, True), hold_s: float = 3,
    mesh_timeout_s: float = 45, altwan: bool = False,
) -> tuple[Pop, list[Site]]:
    """One site per entry of `recovery` (its account flag), a PoP, everything started and
    every pair's mesh tunnel up and every route on the cloud; `[cloud] recovery_hold_s = hold_s`
    on every site. With altwan, every site also has an Alt-WAN link and every pair's Alt-WAN
    tunnel is up."""
    lab.add_inet()
    sites = []
    for n in range(1, len(recovery) + 1):
        lab.add_router(n, nat="masquerade")
        sites.append(lab.add_site(n))
        if altwan:
            lab.add_altwan_link(sites[-1])
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=[
        {"id": s.n, "name": f"site-{s.n}", "subnets": [s.lan_subnet], "offcloud": True,
         "recovery": r}
        for s, r in zip(sites, recovery, strict=True)
    ])
    lab.start_popd(pop)
    for s in sites:
        lab.write_site_config(
            s,
            extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n\n'
            f"[cloud]\nrecovery_hold_s = {hold_s:g}\n",
            altwan=altwan,
        )
        lab.start_socketd(s)
    deadline = time.monotonic() + mesh_timeout_s
    for a in sites:
        for b in sites:
            while a is not b and not (mesh_up(lab, a, b.n)
                                      and (not altwan or altwan_up(lab, a, b.n))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no mesh (or Alt-WAN) tunnel {a.n} -> {b.n} in "
                                       f"{mesh_timeout_s} s")
                time.sleep(0.1)
    # The steady state: a site that registered after another was offline in that one's
    # directory for a moment, and its routes return to the cloud a hold after it appeared.
    deadline = time.monotonic() + hold_s + 15
    while not all_on(lab, sites, "cloud"):
        if time.monotonic() > deadline:
            raise TimeoutError("not every route on the cloud after start: "
                               f"{ {s.n: transports(lab, s) for s in sites} }")
        time.sleep(0.1)
    return pop, sites


def mesh_up(lab: Lab, site: Site, peer: int) -> bool:
    return any(p["site_id"] == peer and p["tunnel"] == "up"
               for p in lab.socketctl(site, "mesh")["paths"])


def altwan_up(lab: Lab, site: Site, peer: int) -> bool:
    return any(p["site_id"] == peer and p["transport"] == "alt-wan" and p["state"] == "up"
               for p in lab.socketctl(site, "peers")["peers"])


def tunnel_packets(lab: Lab, site: Site, transport: str) -> dict[int, int]:
    """Per remote site, the packets its tunnel of that transport ("alt-wan", "mesh") has sent
    and received (socketctl peers)."""
    return {p["site_id"]: p["rx_packets"] + p["tx_packets"]
            for p in lab.socketctl(site, "peers")["peers"] if p["transport"] == transport}


def transports(lab: Lab, site: Site) -> dict[str, str]:
    """Per routed prefix, the transport carrying it now."""
    return {r["prefix"]: r["transport"] for r in lab.socketctl(site, "routes")["routes"]}


def all_on(lab: Lab, sites: Sequence[Site], transport: str) -> bool:
    """Every site routes every other site's LAN over `transport`."""
    return all(transports(lab, a).get(b.lan_subnet) == transport
               for a in sites for b in sites if a is not b)


def cut(lab: Lab, pop: Pop, how: str) -> float:
    """Take the cloud away: "nft" (the PoP unreachable) or "kill" (popd SIGKILLed); returns
    the wall-clock time it happened."""
    t = time.time()
    if how == "nft":
        netns.nft(pop.ns, CUT_POP)
    elif how == "kill":
        lab.stop_popd(pop, sig=signal.SIGKILL)
    else:
        raise ValueError(f"how must be nft or kill, got {how!r}")
    return t


def restore(lab: Lab, pop: Pop, how: str) -> float:
    """Give the cloud back after cut(how); returns the wall-clock time it happened."""
    t = time.time()
    if how == "nft":
        netns.run(pop.ns, ["nft", "delete", "table", "inet", CUT_TABLE])
    else:
        lab.start_popd(pop)
    return t


def events(lab: Lab, site: Site, kind: str, after_seq: int) -> list[dict[str, Any]]:
    evs = lab.socketctl(site, "events", "--limit", "200", "--kind", kind)["events"]
    return [e for e in evs if e["seq"] > after_seq]


def last_seq(lab: Lab, site: Site) -> int:
    return int(lab.socketctl(site, "events", "--limit", "1")["last_seq"])


def relayed(lab: Lab, pop: Pop) -> int:
    """Packets the PoP has received from every site session (its relay's input)."""
    return sum(s["rx_packets"] for site in lab.popctl(pop, "sites")["sites"]
               for s in site["sessions"])
