"""Revoking one site's certificate in the lab: two sites with a direct mesh tunnel, popd and
socketd as real processes in namespaces. `socket-pki revoke` and `popctl reload` cut the
revoked site off the PoP at once (its session ended, told why, its handshakes refused), its
mesh peer tears down their tunnel with an event and refuses the stolen certificate from then
on, also after a restart while the cloud is down (even with a malformed list in the stored
config), the other site stays on the cloud, and a
replacement certificate for the same site id brings the site back, PoP and mesh."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from labwait import wait_for
from test_mesh import build, direct

from sdwan.common.store import Store
from sdwan.lab.topology import Lab, Site
from sdwan.pop import pki
from sdwan.site.cloud import DOC_CONFIG


def events(lab: Lab, site: Site, kind: str) -> list[dict[str, Any]]:
    return lab.socketctl(site, "events", "--kind", kind)["events"]


def test_a_revoked_site_is_cut_off_from_the_pop_and_its_mesh_peer(lab: Lab) -> None:
    pop, (s1, s2) = build(lab)
    for a, b in ((s1, s2), (s2, s1)):
        wait_for(f"site {a.n} direct to {b.n}", lambda a=a, b=b: direct(lab, a, b.n))
    assert pop.account is not None
    stolen = lab.workdir / "pki" / "ca-site2" / "site-2.pem"
    serial = pki.serial_of(pki._read_certificate(stolen))
    reason = f"certificate of site 2 (serial {serial}) is revoked"

    cp = subprocess.run(
        [sys.executable, "-m", "sdwan.pop.pki", "revoke", str(pop.account), "--site-id", "2",
         "--cert", str(stolen), "--reason", "stolen from the branch"],
        capture_output=True, text=True, timeout=30, env=lab.env(),
    )
    assert cp.returncode == 0, cp.stderr
    out = lab.popctl(pop, "reload")
    assert out["revoked_sessions"] and {e["site_id"] for e in out["revoked_sessions"]} == {2}

    # The revoked site is told why and loses the cloud.
    def refused_by_pop() -> list[dict[str, Any]]:
        rows = lab.socketctl(s2, "pop")["sessions"]
        return [r for r in rows if reason in (r.get("reason") or "")]

    wait_for("site 2 told why the PoP ended its session", refused_by_pop)
    wait_for("site 2 refused by popd at its next handshake",
             lambda: lab.popctl(pop, "status")["control"]["revoked_refused"] >= 1, timeout=30)
    assert lab.socketctl(s2, "status")["cloud"]["state"] != "up"
    # Its mesh peer got the list with its config and ended their tunnel, with an event.
    wait_for("site 1 has the revocation list",
             lambda: lab.socketctl(s1, "status")["revoked"]["count"] == 1)
    ended = wait_for("site 1's event", lambda: events(lab, s1, "mesh.peer.revoked"))
    assert reason in ended[0]["text"]
    assert direct(lab, s1, 2) is None
    # Site 1 itself is unaffected: still on the cloud.
    assert lab.socketctl(s1, "status")["cloud"]["state"] == "up"

    # The cloud goes down and site 1 restarts: the list it stored with its config holds. The
    # stolen box restarts too and comes back from its NAT data, straight to site 1 (the
    # initiator is the higher site id): site 1 refuses it, and says why.
    # Before that outage a PoP sent site 1 a config whose list is malformed (a PoP bug): the
    # list in force stays, and so does its stored copy, while the stored config has the bad
    # list; the restart must not start with nothing revoked.
    lab.stop_popd(pop)
    lab.stop_socketd(s1)
    with Store(s1.data_dir) as store:
        doc = store.get_doc(DOC_CONFIG)
        assert doc is not None
        doc.value["config"]["revoked"] = [{"site": "two", "serial": serial}]
        store.put_doc(DOC_CONFIG, doc.value)
    lab.start_socketd(s1)
    assert lab.socketctl(s1, "status")["revoked"]["count"] == 1
    lab.stop_socketd(s2)
    lab.start_socketd(s2)

    def refused_by_peer() -> bool:
        st = lab.socketctl(s1, "status")
        return st["control"]["revoked_refused"] >= 1 and any(
            r["reason"] == reason for r in st["rejections"])

    wait_for("site 1 refuses the revoked certificate", refused_by_peer, timeout=40)
    assert events(lab, s1, "tunnel.handshake.revoked")
    assert lab.socketctl(s1, "status")["cloud"]["state"] != "up"
    assert direct(lab, s1, 2) is None and direct(lab, s2, 1) is None
    lab.start_popd(pop)

    # A replacement certificate for site 2 works at once: the PoP takes it, the mesh too.
    lab.stop_socketd(s2)
    pki.issue_site(lab.workdir / "pki" / "ca", 2, stolen.parent, force=True)
    assert pki.serial_of(pki._read_certificate(stolen)) != serial
    lab.start_socketd(s2)
    wait_for("site 2 back on the cloud",
             lambda: lab.socketctl(s2, "status")["cloud"]["state"] == "up", timeout=30)
    for a, b in ((s1, s2), (s2, s1)):
        wait_for(f"site {a.n} direct to {b.n} again", lambda a=a, b=b: direct(lab, a, b.n),
                 timeout=60)
    assert lab.wait_ping(s1.lan_ns, s2.lan_host_ip, timeout=10)
