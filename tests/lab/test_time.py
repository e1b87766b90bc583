"""Time and certificates in the lab (docs/time.md). A site whose certificate runs out in ten
days, with a PoP: socketd warns of the expiry (an event, `socketctl status`), and once its PoP
session vouches for the clock it stores the time in its data dir as the clock's floor for the
next boot, again when it stops. A site with NTP servers, one real (chronyd serving on the PoP's
host) and one that never answers: socketd's chronyd synchronises to the real one and says so.
Every chronyd here runs with -x: the host's clock is never touched."""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from labwait import wait_for

from sdwan.appliance.clock import CLOCK_FILE
from sdwan.lab.topology import Lab
from sdwan.pop import pki


def issued_a_month_ago(ca_dir: Path, site_id: int, out: Path) -> pki.SiteFiles:
    """A site certificate with 10 days left, issued long before, as a box's would be: one
    issued in the same second as its renewal would tie with it on notBefore (whole
    seconds), and a tie goes to the configured certificate."""
    out.mkdir(parents=True)
    ca_cert, ca_key = pki.load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.build_site_certificate(ca_cert, ca_key, site_id, key.public_key(), days=10,
                                      backdate=datetime.timedelta(days=30))
    files = pki.SiteFiles(site_id=site_id, cert=out / "cert.pem", key=out / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


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
    short = issued_a_month_ago(ca.dir, site.site_id, lab.workdir / "pki" / "short-site1")
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


NTP_SERVER_CONF = """\
local stratum 8
allow all
cmdport 0
bindcmdaddress /
pidfile {pidfile}
"""


def test_chronyd_synchronises_to_the_server_that_answers_and_says_so(lab: Lab) -> None:
    chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
    lab.add_inet()
    lab.add_router(1, nat="masquerade")
    site = lab.add_site(1)
    pop = lab.add_pop(1)  # only its host: the NTP server runs there
    conf = lab.workdir / "ntp-server.conf"
    conf.write_text(NTP_SERVER_CONF.format(pidfile=lab.workdir / "ntp-server.pid"))
    lab.spawn(pop.ns, [chronyd, "-x", "-d", "-u", "root", "-f", str(conf)], name="ntp-server")
    dead = "198.51.100.250"  # routed to the Internet namespace, where nothing answers
    lab.write_site_config(site, extra_toml=f'[time]\nservers = ["{pop.host.ip}", "{dead}"]\n'
                          "set_clock = false\n")
    lab.start_socketd(site)

    def sync() -> dict:
        return lab.socketctl(site, "status")["clock"]["sync"]

    st = wait_for("the clock synchronised", lambda: (s := sync())["synced"] and s, timeout=40)
    assert st["reference"] == pop.host.ip and st["stratum"] == 9, st
    assert abs(st["offset_s"]) < 0.5 and st["why"] is None, st
    assert st["chronyd"]["state"] == "running" and st["set_clock"] is False, st
    by_addr = {s["address"]: s for s in st["sources"]}
    assert by_addr[pop.host.ip]["state"] in ("selected", "combined") and by_addr[pop.host.ip][
        "reach"] > 0, st
    assert by_addr[dead]["reach"] == 0, st
    (ev,) = lab.socketctl(site, "events", "--kind", "time.synced")["events"]
    assert f"synchronised to {pop.host.ip} (stratum 9)" in ev["text"], ev
    text = lab.socketctl(site, "status", json_out=False)
    assert f"synchronised to {pop.host.ip} (stratum 9, " in text, text
    # chronyd serves nobody: no NTP port is open on the site.
    ss = lab.exec(site.ns, ["ss", "-Hunl", "sport = :123"]).stdout
    assert ss.strip() == "", ss
    # A socketd stopped stops its chronyd.
    pid = st["chronyd"]["pid"]
    lab.stop_socketd(site)
    wait_for("chronyd gone", lambda: not Path(f"/proc/{pid}").exists(), timeout=10)


def test_a_certificate_near_its_expiry_is_renewed_through_the_pop_and_kept(lab: Lab) -> None:
    lab.add_inet()
    lab.add_router(1, nat="masquerade")
    lab.add_router(2, nat="masquerade")
    site, other = lab.add_site(1), lab.add_site(2)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=[site, other], renewal={})
    lab.start_popd(pop)
    ca = lab.setup_pki()
    short = issued_a_month_ago(ca.dir, site.site_id, lab.workdir / "pki" / "short-site1")
    pops = f'[[pops]]\nid = 1\nendpoint = "{pop.host.ip}:4800"\n'
    lab.write_site_config(site, cert=short.cert, key=short.key, extra_toml=pops)
    lab.write_site_config(other, extra_toml=pops)
    lab.start_socketd(site)
    lab.start_socketd(other)

    (ev,) = wait_for("the certificate renewed", lambda: lab.socketctl(
        site, "events", "--kind", "cert.renewed")["events"], timeout=30)
    certs = lab.socketctl(site, "status")["certificates"]
    assert certs["source"] == "renewed" and certs["renewal"]["state"] == "renewed", certs
    assert certs["cert"]["days_left"] >= 800 and certs["cert"]["state"] == "valid", certs
    assert certs["cert"]["path"].startswith(str(site.data_dir / "credentials")), certs
    key = site.data_dir / "credentials" / "current" / "key.pem"
    assert key.stat().st_mode & 0o077 == 0, oct(key.stat().st_mode)
    pop_events = [e for e in lab.popctl(pop, "events")["events"]
                  if e["kind"] == "site.cert_renewed"]
    assert [e["site_id"] for e in pop_events] == [site.site_id], pop_events
    # The renewed certificate is the one the site handshakes with: after a restart (a fresh
    # handshake with the PoP) it is still in use, the cloud comes up, and the LANs talk.
    lab.stop_socketd(site)
    lab.start_socketd(site)
    wait_for("cloud up again", lambda: lab.socketctl(site, "status")["cloud"]["state"] == "up",
             timeout=20)
    assert lab.socketctl(site, "status")["certificates"]["source"] == "renewed"
    assert lab.wait_ping(site.lan_ns, other.lan_host_ip, timeout=10)
    # A second request, the certificate now far from its expiry, is refused, with the reason.
    assert lab.socketctl(site, "renew") == {"state": "asked"}
    (failed,) = wait_for("the second renewal refused", lambda: lab.socketctl(
        site, "events", "--kind", "cert.renew_failed")["events"], timeout=15)
    assert "renewed only within 60 days of its expiry" in failed["text"], failed
    assert lab.socketctl(site, "status")["certificates"]["source"] == "renewed"
