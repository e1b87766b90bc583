"""The revocation list: serial forms, the account's [[revoked]] tables (located errors), the
list a site takes from its config, and the DTLS handshake check with real certificates."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_account import ACCOUNT, errors_of, write
from test_altwan_tunnels import INET, MPLS, entry, two_sites
from test_dtls import connect
from test_mesh_multilink import ipv4
from test_mesh_schedule import punch
from test_tunnel_sim import certs  # noqa: F401  (fixture)

from sdwan.bindings.fastpath import FastPathError, Verdict
from sdwan.common.dtls import DtlsContext, DtlsSession
from sdwan.common.revocation import MAX_REVOKED, Revocations, normalize_serial
from sdwan.pop import pki
from sdwan.pop.account import Account, load_account
from sdwan.site.altwan import altwan_peer_id
from sdwan.site.paths import Policy, Transport
from sdwan.site.revoked import SiteRevocations
from sdwan.site.tunnel import State

REVOKED = """
[[revoked]]
site = 2
serial = "5F:2A:00:01"
note = "box stolen"
"""


@pytest.mark.parametrize(
    "text, expected",
    [("5f2a", "5f2a"), ("0x5F2A", "5f2a"), ("00:5f:2a", "5f2a"), (" 05F2A ", "5f2a"),
     ("0", "0"), ("00", "0")],
)
def test_serial_forms_compare_as_one(text: str, expected: str) -> None:
    assert normalize_serial(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [("", "expected a serial number in hex"), ("xyz", "expected a serial number in hex"),
     ("5f-2a", "expected a serial number in hex"), (42, "expected a serial number in hex"),
     ("1" * 129, "longer than 128 hex digits")],
)
def test_bad_serials_say_what_is_wrong(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_serial(text)


def test_account_revoked_tables_load_and_go_to_every_site(tmp_path: Path) -> None:
    account = load_account(write(tmp_path, ACCOUNT + REVOKED))
    assert account.revoked.is_revoked(2, "5f2a0001")
    assert not account.revoked.is_revoked(1, "5f2a0001")  # the serial is site 2's
    assert account.revoked.reason(2, "5f2a0001") == (
        "certificate of site 2 (serial 5f2a0001) is revoked")
    for site in account.sites:
        # Every site checks every peer: each gets the whole list, without the notes.
        assert account.site_config(site)["revoked"] == [{"site": 2, "serial": "5f2a0001"}]
    # The stored form keeps the notes and reads back the same.
    again = Account.from_doc(account.to_doc())
    assert again.revoked == account.revoked and again.revoked.entries[0].note == "box stolen"


@pytest.mark.parametrize(
    "entry, expected",
    [
        ('site = 2\nserial = "zz"',
         'revoked[0].serial: expected a serial number in hex (such as "5f2a..." or'),
        ('serial = "1f"', "revoked[0].site: missing required field (expected an integer"),
        ('site = 0\nserial = "1f"', "revoked[0].site: expected an integer 1..65535, got 0"),
        ('site = 2', "revoked[0].serial: missing required field"),
        ('site = 2\nserial = "1f"\nwhy = "x"',
         "revoked[0].why: unknown key (expected one of: note, serial, site)"),
        ('site = 2\nserial = "1f"\nnote = 5',
         "revoked[0].note: expected a note of at most 200 printable characters, got 5"),
    ],
)
def test_each_wrong_revoked_field_is_located(tmp_path: Path, entry: str, expected: str) -> None:
    errors = errors_of(write(tmp_path, ACCOUNT + f"\n[[revoked]]\n{entry}\n"))
    assert any(expected in e for e in errors), errors
    assert all("account.toml" in e for e in errors if "revoked" in e), errors


def test_a_serial_revoked_twice_and_a_list_too_long(tmp_path: Path) -> None:
    twice = ACCOUNT + REVOKED + '\n[[revoked]]\nsite = 2\nserial = "5f2a0001"\n'
    errors = errors_of(write(tmp_path, twice))
    assert any("revoked[1].serial: serial 5f2a0001 of site 2 is revoked twice (also"
               " revoked[0])" in e for e in errors), errors
    many = ACCOUNT + "".join(
        f'\n[[revoked]]\nsite = 2\nserial = "{i:x}"\n' for i in range(MAX_REVOKED + 1))
    errors = errors_of(write(tmp_path, many))
    assert any(f"revoked: expected an array of at most {MAX_REVOKED} tables" in e
               for e in errors), errors
    errors = errors_of(write(tmp_path, "revoked = 3\n" + ACCOUNT))
    assert any("revoked: expected an array of at most" in e for e in errors), errors


def test_a_site_keeps_its_list_when_a_config_brings_a_bad_one() -> None:
    seen: list[tuple[str, str]] = []
    site = SiteRevocations(on_event=lambda kind, text, data: seen.append((kind, text)))
    changes: list[int] = []
    site.watch(lambda r: changes.append(len(r)))
    site.load({"revoked": [{"site": 2, "serial": "1F"}]})
    assert site.current.is_revoked(2, "1f") and changes == [1]
    site.load({"revoked": [{"site": 2, "serial": "1f"}]})
    assert changes == [1]  # the same list: nobody is told again
    site.load({"revoked": [{"site": "two", "serial": "1f"}]})
    assert site.current.is_revoked(2, "1f")
    assert site.status()["error"] == "revoked[0]: expected a site id (an integer), got 'two'"
    assert seen[-1][0] == "revocation.refused"
    site.load({"revoked": []})
    assert not site.current.is_revoked(2, "1f") and changes == [1, 0]
    assert site.status() == {"count": 0, "error": None}
    with pytest.raises(ValueError, match="expected at most"):
        Revocations.from_list([{"site": 1, "serial": "1"}] * (MAX_REVOKED + 1))


def handshake(
    client_ctx: DtlsContext, server_ctx: DtlsContext, expected: int
) -> tuple[DtlsSession, DtlsSession]:
    client, wire = connect(client_ctx, server_ctx, expected)
    assert wire.server is not None
    return client, wire.server


def test_handshakes_refuse_a_revoked_certificate_and_take_its_replacement(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca"
    pki.create_ca(ca)
    one = pki.issue_site(ca, 1, tmp_path / "one")
    two = pki.issue_site(ca, 2, tmp_path / "two")
    serial = pki.serial_of(pki._read_certificate(two.cert))
    server = DtlsContext(ca / "ca.pem", one.cert, one.key, 1)
    events: list[str] = []
    site = SiteRevocations(on_event=lambda kind, text, data: events.append(kind))
    server.revocation = site.reason
    client = DtlsContext(ca / "ca.pem", two.cert, two.key, 2)

    c, s = handshake(client, server, 1)
    assert c.established and s.established and s.peer_serial == serial

    site.load({"revoked": [{"site": 2, "serial": serial}]})
    c, s = handshake(client, server, 1)
    assert not s.established
    assert s.failed == f"certificate of site 2 (serial {serial}) is revoked"
    assert events == ["tunnel.handshake.revoked"]
    # As the client too: a revoked server is refused.
    client.revocation = site.reason
    c, s = handshake(server, client, 2)
    assert not c.established and c.failed is not None and "is revoked" in c.failed

    fresh = pki.issue_site(ca, 2, tmp_path / "two", force=True)
    client = DtlsContext(ca / "ca.pem", fresh.cert, fresh.key, 2)
    c, s = handshake(client, server, 1)
    assert c.established and s.established and s.peer_serial != serial


def test_a_revoked_peer_loses_its_mesh_and_alt_wan_tunnels_at_once(
    certs, tmp_path: Path  # noqa: F811
) -> None:
    """Two real supervisors (real DTLS, real fast paths, simulated time) with a mesh tunnel
    and an Alt-WAN tunnel: site 1 takes a list revoking site 2's certificate."""
    net, a, b = two_sites(certs, tmp_path)  # a is site 2, b site 1
    a.directory, b.directory = [entry(1)], [entry(2)]
    a.altwan.on_directory()
    b.altwan.on_directory()
    a.mesh.on_punch(punch(2, 1, INET[1]))
    b.mesh.on_punch(punch(1, 2, INET[2]))
    net.run(5)
    assert b.mesh.remotes[2].tunnel.state is State.UP
    assert b.alt_tunnel(2).state is State.UP
    serial = pki.serial_of(pki._read_certificate(certs(2)[1]))
    assert b.mesh.remotes[2].tunnel.session.peer_serial == serial

    seen: list[str] = []
    revoked = SiteRevocations(on_event=lambda kind, text, data: seen.append(kind),
                              clock=net.clock)
    assert b.dtls is not None
    b.dtls.revocation = revoked.reason
    revoked.watch(b.mesh.end_revoked)
    revoked.watch(b.altwan.end_revoked)
    revoked.load({"revoked": [{"site": 2, "serial": serial}]})
    # Gone at once: the tunnels, their fast-path peers (keys and endpoints) and the routes.
    assert 2 not in b.mesh.remotes and 2 not in b.altwan.remotes
    assert b.fp is not None
    for pid in (2, altwan_peer_id(2)):
        with pytest.raises(FastPathError):
            b.fp.endpoint(pid)
    assert b.candidates(Transport.MESH) == {} and b.candidates(Transport.ALT_WAN) == {}
    assert ("altwan.revoked", 2) in b.events

    # Site 2 keeps trying (it initiates both tunnels): every handshake is refused, with why.
    before = b.sessions.stats.revoked
    b.altwan.on_directory()  # the directory still lists it: Alt-WAN adds it back
    net.run(20)
    assert b.sessions.stats.revoked > before
    assert any(r["reason"] == f"certificate of site 2 (serial {serial}) is revoked"
               for r in b.sessions.stats.rejections)
    assert seen.count("tunnel.handshake.revoked") == 1  # one event a minute, not one a try
    assert b.alt_tunnel(2).state is not State.UP
    # The stolen box still holds its old keys, and sends with them: site 1 drops it all.
    assert a.fp is not None
    a.paths.set_policy(Policy.CLOUD_LOST)
    r = a.fp.process_outbound(ipv4("10.2.0.5", "10.1.0.7"))
    assert (r.verdict, r.peer_id, r.to) == (Verdict.SEND, altwan_peer_id(1), MPLS[1])
    assert b.fp.process_inbound(2, MPLS[2], r.data).verdict is Verdict.DROP
    # Taken off the list (a revocation undone), the same certificate is accepted again.
    revoked.load({"revoked": []})
    net.run(30)
    assert b.alt_tunnel(2).state is State.UP
