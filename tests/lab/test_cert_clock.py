"""A site whose certificate runs out in ten days, with a PoP: socketd warns of the expiry (an
event, `socketctl status`), and once its PoP session vouches for the clock it stores the time
in its data dir as the clock's floor for the next boot, again when it stops
(docs/time.md)."""

from __future__ import annotations

import time

from labwait import wait_for

from sdwan.appliance.clock import CLOCK_FILE
from sdwan.lab.topology import Lab
from sdwan.pop import pki


def test_a_certificate_near_its_expiry_is_warned_of_and_the_trusted_time_is_stored(
    lab: Lab,
) -> None:
    lab.add_inet()
    lab.add_router(1, nat="masquerade")
    site = lab.add_site(1)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=[site])
    lab.start_popd(pop)
    ca = lab.setup_pki()
    short = pki.issue_site(ca.dir, site.site_id, lab.workdir / "pki" / "short-site1", days=10)
    lab.write_site_config(site, cert=short.cert, key=short.key,
                          extra_toml=f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n')
    lab.start_socketd(site)

    events = wait_for("the expiry warned of", lambda: lab.socketctl(
        site, "events", "--kind", "cert.expiring")["events"], timeout=15)
    assert str(short.cert) in events[0]["text"], events[0]
    assert events[0]["data"]["days_left"] in (9, 10), events[0]
    st = lab.socketctl(site, "status")
    assert st["certificates"]["cert"]["state"] == "expiring", st["certificates"]
    assert st["certificates"]["ca"]["state"] == "valid", st["certificates"]
    text = lab.socketctl(site, "status", json_out=False)
    assert "cert     expiring, until " in text and "days left" in text, text

    wait_for("cloud up", lambda: lab.socketctl(site, "status")["cloud"]["state"] == "up")
    stored = site.data_dir / CLOCK_FILE
    wait_for("the time stored", stored.exists, timeout=10)
    assert abs(int(stored.read_text()) - time.time()) < 30
    assert lab.socketctl(site, "status")["clock"]["stored"] is not None
    # Stopping stores it again: the floor is as late as it can be.
    first = int(stored.read_text())
    time.sleep(1.1)
    lab.stop_socketd(site)
    assert int(stored.read_text()) > first
