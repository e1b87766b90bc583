"""Revoking one site's certificate at the PoP: `socket-pki revoke` writes the account, popd
reloads it, ends the live sessions of that certificate with an event, refuses its handshakes
with the reason (log, event, counter, rejection list), leaves the other sites alone and takes a
replacement certificate of the same site at once.

popd runs as a real process on 127.0.0.1 and the sites are real DTLS clients with a real fast
path (the harness of test_popd.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from test_popd import Client, PopEnv, _env, clients, new_client, pop  # noqa: F401

from sdwan.pop import pki


def socket_pki(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdwan.pop.pki", *args],
        capture_output=True, text=True, timeout=30, env=_env(),
    )


def events(env: PopEnv, kind: str) -> list[dict[str, Any]]:
    rc, out = env.popctl("events", "--limit", "200")
    assert rc == 0, out
    return [e for e in out["events"] if e["kind"] == kind]


def test_revoking_a_connected_site_ends_its_sessions_and_refuses_it(
    pop: PopEnv, clients: list[Client]  # noqa: F811
) -> None:
    a = new_client(pop, clients, 1)
    a.connect()
    a.register()
    b = new_client(pop, clients, 2)
    b.connect()
    b.register()
    stolen_cert = pop.site_files(1)[1]
    serial = pki.serial_of(pki._read_certificate(stolen_cert))
    # The operator finds the serial of each session's certificate in `popctl sites`.
    rc, sites = pop.popctl("sites")
    by_id = {s["site_id"]: s for s in sites["sites"]}
    assert [x["serial"] for x in by_id[1]["sessions"]] == [serial]
    rc, text = pop.popctl("sites", json_out=False)
    assert rc == 0 and f"serial {serial}" in text
    empty_hash = pop.status()["account"]["revoked_hash"]

    cp = socket_pki("revoke", str(pop.account), "--site-id", "1", "--cert", str(stolen_cert),
                    "--reason", "box stolen")
    assert cp.returncode == 0, cp.stderr
    assert f"revoked certificate serial {serial} of site 1" in cp.stdout
    assert "popctl reload" in cp.stdout
    assert "every PoP" in cp.stdout
    # Nothing changes before popd reloads: the site is still served.
    a.send({"t": "ping", "id": 7})
    a.wait_for("pong", id=7)

    rc, out = pop.popctl("reload")
    assert rc == 0, out
    assert out["revoked_sessions"] == [{"site_id": 1, "link": "wan1", "serial": serial}]
    # The site learns why, and its session is closed.
    err = a.wait_for("error")
    assert err["reason"] == f"certificate of site 1 (serial {serial}) is revoked"
    a.pump(lambda: a.session.closed)
    ended = events(pop, "popd.session.revoked")
    assert len(ended) == 1 and ended[0]["site_id"] == 1
    assert "session ended" in ended[0]["text"] and serial in ended[0]["text"]
    rc, sites = pop.popctl("sites")
    by_id = {s["site_id"]: s for s in sites["sites"]}
    assert by_id[1]["online"] is False and by_id[1]["revoked"] == [serial]
    assert by_id[2]["online"] is True

    # The other site is unaffected: its session stays, and it gets the list with its config.
    cfg = b.wait_for("config")
    assert cfg["config"]["revoked"] == [{"site": 1, "serial": serial}]
    b.send({"t": "ping", "id": 8})
    b.wait_for("pong", id=8)

    # The stolen certificate cannot come back: the handshake itself is refused, with the
    # reason in popd's log, an event, a counter and the rejection list.
    for _ in range(2):
        again = new_client(pop, clients, 1)
        for d in again.session.start():
            again.raw(d)
        again.pump(lambda again=again: again.session.failed is not None, timeout=10)
        assert not again.session.established
    st = pop.status()
    assert st["control"]["revoked_refused"] >= 2
    assert st["control"]["sessions_revoked"] == 1
    assert st["account"]["revoked"] == 1
    # The hash PoPs compare: changed by the entry, the same for the same list anywhere.
    assert st["account"]["revoked_hash"] != empty_hash
    assert st["account"]["revoked_hash"] == pki.load_account(pop.account).revoked.digest()
    assert any(r["reason"] == f"certificate of site 1 (serial {serial}) is revoked"
               for r in st["rejections"])
    refused = events(pop, "popd.handshake.revoked")
    # One event per site and minute, however often the thief retries.
    assert len(refused) == 1 and refused[0]["site_id"] == 1, refused
    assert "is revoked" in pop.log_text()

    # A replacement certificate for the same site id registers at once, no reload needed.
    fresh = pki.issue_site(pop.ca_dir, 1, pop.root / f"{pop.ca_dir.name}-out", force=True)
    assert pki.serial_of(pki._read_certificate(fresh.cert)) != serial
    c = new_client(pop, clients, 1)
    c.connect()
    welcome = c.register()
    assert welcome["config"]["revoked"] == [{"site": 1, "serial": serial}]
    rc, sites = pop.popctl("sites")
    assert next(s for s in sites["sites"] if s["site_id"] == 1)["online"] is True

    # Revoking it again changes nothing and says so.
    cp = socket_pki("revoke", str(pop.account), "--site-id", "1", "--serial", serial.upper())
    assert cp.returncode == 0, cp.stderr
    assert "already revoked" in cp.stdout


def test_a_revocation_survives_a_popd_restart(
    pop: PopEnv, clients: list[Client]  # noqa: F811
) -> None:
    from test_popd import start_popd, stop_popd

    cert = pop.site_files(2)[1]
    assert socket_pki("revoke", str(pop.account), "--site-id", "2", "--cert",
                      str(cert)).returncode == 0
    stop_popd(pop)
    start_popd(pop)
    b = new_client(pop, clients, 2)
    for d in b.session.start():
        b.raw(d)
    b.pump(lambda: b.session.failed is not None, timeout=10)
    assert not b.session.established
    assert pop.status()["control"]["revoked_refused"] == 1
    # Site 1 is served as before.
    a = new_client(pop, clients, 1)
    a.connect()
    assert a.register()["config"]["revoked"][0]["site"] == 2


def test_cli_errors_name_what_is_wrong(pop: PopEnv, tmp_path: Path) -> None:  # noqa: F811
    cert1 = pop.site_files(1)[1]
    before = pop.account.read_text()

    def fails(*args: str) -> str:
        cp = socket_pki("revoke", *args)
        assert cp.returncode != 0, cp.stdout
        return cp.stderr

    assert "is the certificate of site 1, not of site 2" in fails(
        str(pop.account), "--site-id", "2", "--cert", str(cert1))
    assert "site 3 is not in the account" in fails(
        str(pop.account), "--site-id", "3", "--serial", "1f")
    assert "expected a serial number in hex" in fails(
        str(pop.account), "--site-id", "1", "--serial", "xyz")
    assert "not found" in fails(
        str(pop.account), "--site-id", "1", "--cert", str(tmp_path / "nope.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    assert "is not a PEM or DER certificate" in fails(
        str(pop.account), "--site-id", "1", "--cert", str(bad))
    assert "one of the arguments --cert --serial is required" in fails(
        str(pop.account), "--site-id", "1")
    assert "not allowed with argument" in fails(
        str(pop.account), "--site-id", "1", "--serial", "1f", "--cert", str(cert1))
    pop_cert = pop.root / "pop" / "pop-1.pem"
    assert "is the certificate of pop 1, not of site 1" in fails(
        str(pop.account), "--site-id", "1", "--cert", str(pop_cert))
    broken = tmp_path / "broken.toml"
    broken.write_text(before.replace("id = 2", 'id = "two"'))
    err = fails(str(broken), "--site-id", "1", "--serial", "1f")
    assert "the account file has errors, nothing changed" in err and "sites[1].id" in err
    assert broken.read_text() == before.replace("id = 2", 'id = "two"')
    # A file the new entry cannot be appended to is left as it was.
    inline = tmp_path / "inline.toml"
    inline.write_text('revoked = []\n' + before)
    err = fails(str(inline), "--site-id", "1", "--serial", "1f")
    assert "would not load, nothing changed" in err
    assert inline.read_text() == 'revoked = []\n' + before
    assert pop.account.read_text() == before
    assert not list(pop.account.parent.glob(".account.toml.*"))
