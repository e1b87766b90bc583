"""A flood cannot starve the control plane (docs/security.md, "Control-plane floods"): a third
host floods a site's WAN port and the PoP's port as fast as it can, with spoofed random
sources and then from one source, ClientHellos and garbage, while the mesh tunnel rekeys
every 10 s and the PoP sessions every 60 s. No PoP session or mesh tunnel goes down, no
cloud-down event, keepalives keep arriving, and the drops are counted in status."""

from __future__ import annotations

import pytest
from labwait import wait_for

from sdwan.lab.flood import (
    KEEPALIVE_S,
    POP_REKEY_S,
    SINGLE_SOURCE,
    SPOOF_NET,
    Watch,
    build_flooder,
    build_scene,
    flood,
    handshakes,
    lanes,
)
from sdwan.lab.topology import Lab

# Kinds of event that would mean the flood took the cloud or the mesh down.
DOWN_EVENTS = {
    "pop.disconnected",
    "offcloud.transport.disconnect",
    "offcloud.recovery.activated",
}


@pytest.mark.timeout(300)
def test_a_flood_from_unknown_sources_starves_no_session_or_tunnel(lab: Lab) -> None:
    build_flooder()
    sc = build_scene(lab)
    s1, s2, pop = sc.public, sc.natted, sc.pop
    for s in (s1, s2):
        wait_for(
            f"site {s.n} cloud up",
            lambda s=s: lab.socketctl(s, "status")["cloud"]["state"] == "up",
        )
    for a, b in ((s1, s2), (s2, s1)):
        wait_for(
            f"site {a.n} mesh tunnel to {b.n} up",
            lambda a=a, b=b: any(
                p["site_id"] == b.site_id and p.get("transport") == "mesh" and p["state"] == "up"
                for p in lab.socketctl(a, "peers")["peers"]
            ),
            timeout=60,
        )
    before = {s.n: handshakes(lab, s, (s2 if s is s1 else s1).site_id) for s in (s1, s2)}
    events_before = {s.n: len(lab.socketctl(s, "events")["events"]) for s in (s1, s2)}
    lanes_before = (lanes(lab, site=s1), lanes(lab, pop=pop))

    watch = Watch(sc).start()
    try:
        # Long enough for the PoP sessions' rekey and several of the mesh's 10 s ones. A
        # rekey is due rekey_s after the last handshake ended, so the period is a little
        # over POP_REKEY_S: a flood of exactly POP_REKEY_S could end just before it.
        half = 0.6 * POP_REKEY_S
        spoofed = flood(sc.flooder_ns, sc.targets, SPOOF_NET, "mix", seconds=half)
        single = flood(sc.flooder_ns, sc.targets, SINGLE_SOURCE, "mix", seconds=half)
    finally:
        watch.stop()
    print(f"flood: spoofed {spoofed.pps:.0f} pps, single source {single.pps:.0f} pps")
    assert spoofed.sent > 0 and single.sent > 0

    # Nothing went down, in any sample taken during the flood.
    assert watch.samples, watch.errors
    assert not watch.not_up(), watch.not_up()[:5]
    # Keepalives kept arriving: no session or tunnel was silent for its dead interval.
    silence = watch.max_silence_s()
    assert set(silence) >= {"site1-pop", "site2-pop", "site1-mesh", "site2-mesh"}, silence
    assert max(silence.values()) < 2 * KEEPALIVE_S + 1, silence
    # The tunnels rekeyed meanwhile: the mesh several times, the PoP sessions at least once.
    for s in (s1, s2):
        pop_hs, mesh_hs = handshakes(lab, s, (s2 if s is s1 else s1).site_id)
        assert mesh_hs >= before[s.n][1] + 2, (s.n, before[s.n], mesh_hs)
        assert pop_hs >= before[s.n][0] + 1, (s.n, before[s.n], pop_hs)
        new = lab.socketctl(s, "events")["events"][events_before[s.n] :]
        assert not DOWN_EVENTS & {e["kind"] for e in new}, new
    # The drops were counted where the other drops are shown.
    site_lanes, pop_lanes = lanes(lab, site=s1), lanes(lab, pop=pop)
    for name, now, then in (
        ("site", site_lanes, lanes_before[0]),
        ("pop", pop_lanes, lanes_before[1]),
    ):
        assert now["rate_limited_global"] > then["rate_limited_global"], (name, now)
        assert now["rate_limited_source"] > then["rate_limited_source"], (name, now)
        assert now["known_full"] == then["known_full"], (name, now)
    link_drops = lab.socketctl(s1, "status")["links"][0]["drops"]
    assert link_drops["ctrl_rate_limited"] > 0, link_drops
    assert lab.popctl(pop, "status")["link"]["drops"]["ctrl_rate_limited"] > 0
    text = lab.socketctl(s1, "status", json_out=False)
    assert "control lanes" in text and "rate-limited" in text, text
