"""Revocation under adverse conditions: a site's list across a bad config and a restart, a
secondary PoP's stale list, static tunnels of a revoked peer, a handshake verified before a
reload, serials with a high first octet or too long, notes with any Unicode, and the account
rewrite's owner, mode, symlink and lock."""

from __future__ import annotations

import fcntl
import io
import os
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_account import ACCOUNT, write
from test_cloud_sim import SITES, MiniPop, Net, SimSocket, pop_files, site_config
from test_dtls import connect
from test_tunnel_sim import certs, pair  # noqa: F401  (fixture)

from sdwan.common.dtls import DtlsContext
from sdwan.common.revocation import MAX_SERIAL_HEX, Revocations
from sdwan.common.sessions import SessionLayer, SessionOwner, _Entry
from sdwan.common.store import Store
from sdwan.pop import pki
from sdwan.pop.account import load_account
from sdwan.pop.popctl import _print_sites, _print_status
from sdwan.site.revoked import DOC_REVOKED, SiteRevocations
from sdwan.site.tunnel import State

LIST = [{"site": 2, "serial": "1f"}]


# --------------------------------------------------------------------------- a site's list


def test_the_last_good_list_is_stored_apart_and_survives_a_bad_config_and_a_restart(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "data")
    first = SiteRevocations()
    first.load_stored(store, None)
    first.load({"revoked": LIST})
    assert store.get_doc(DOC_REVOKED).value == {"revoked": LIST}
    # A malformed list (what a buggy PoP might send, and the cloud stores with its config).
    bad = {"revoked": [{"site": "two", "serial": "1f"}]}
    first.load(bad)
    assert first.current.is_revoked(2, "1f") and first.error is not None
    assert store.get_doc(DOC_REVOKED).value == {"revoked": LIST}
    store.close()

    # A restart while the cloud is down: the stored config holds the bad list.
    store = Store(tmp_path / "data")
    again = SiteRevocations()
    again.load_stored(store, bad)
    assert again.current.is_revoked(2, "1f")
    assert again.reason(2, "1f") is not None
    store.close()


def test_a_config_without_the_key_changes_nothing(tmp_path: Path) -> None:
    site = SiteRevocations()
    changes: list[int] = []
    site.watch(lambda r: changes.append(len(r)))
    site.load({"revoked": LIST})
    site.load({"rules": [], "firewall": {}})  # a PoP older than revocation
    assert site.current.is_revoked(2, "1f") and changes == [1]


def test_without_a_document_the_stored_config_list_is_taken(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    site = SiteRevocations()
    site.load_stored(store, {"revoked": LIST})
    assert site.current.is_revoked(2, "1f")
    assert store.get_doc(DOC_REVOKED).value == {"revoked": LIST}
    store.close()


def test_a_secondary_pops_config_adds_but_never_shrinks_the_list() -> None:
    site = SiteRevocations()
    site.load({"revoked": LIST})
    # A secondary PoP whose account file lags behind: it knows no revocation.
    site.load({"revoked": []}, authoritative=False)
    assert site.current.is_revoked(2, "1f")
    # One that knows another revocation adds it.
    site.load({"revoked": [{"site": 3, "serial": "aa"}]}, authoritative=False)
    assert site.current.is_revoked(2, "1f") and site.current.is_revoked(3, "aa")
    # The active PoP's config replaces the list (a revocation undone there is undone).
    site.load({"revoked": [{"site": 3, "serial": "aa"}]})
    assert not site.current.is_revoked(2, "1f") and len(site.current) == 1


# --------------------------------------------------------------------------- static tunnels


def test_static_tunnels_of_a_revoked_peer_are_ended_at_once(certs) -> None:  # noqa: F811
    net, a, b = pair(certs)  # a is site 2, b site 1, a static tunnel between them
    serial = pki.serial_of(pki._read_certificate(certs(2)[1]))
    assert b.tunnels[2].session.peer_serial == serial
    recorded: list[tuple[str, str, dict[str, Any]]] = []
    b._record_event = lambda kind, text, data, site_id=None: recorded.append((kind, text, data))
    revoked = SiteRevocations(clock=net.clock)
    assert b.dtls is not None
    b.dtls.revocation = revoked.reason
    revoked.watch(b._end_revoked_static)
    revoked.load({"revoked": [{"site": 2, "serial": serial}]})

    tunnel = b.tunnels[2]
    assert tunnel.state is State.DOWN and "is revoked" in (tunnel.reason or "")
    assert not b.fp.key_info(2).has_tx  # the old keys are gone, not left until reject_after
    assert recorded and recorded[0][0] == "tunnel.revoked"
    assert recorded[0][2] == {"peer": 2, "serial": serial}
    # Site 2 keeps rekeying: refused each time, the tunnel stays down.
    before = b.sessions.stats.revoked
    net.run(2 * 60 + 5)
    assert b.sessions.stats.revoked > before
    assert b.tunnels[2].state is not State.UP


# --------------------------------------------------------------------------- a reload mid-handshake


class _Gone(SessionOwner):
    """An owner from which the peer disappeared during its handshake (a reload)."""

    def tunnel_for(self, session):  # type: ignore[no-untyped-def]
        return None

    def sessions_in_use(self):  # type: ignore[no-untyped-def]
        return []

    def tunnel_at(self, link_id, addr):  # type: ignore[no-untyped-def]
        return None


def test_a_handshake_verified_before_a_revocation_is_refused_as_revoked(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.create_ca(ca)
    one, two = pki.issue_site(ca, 1, tmp_path / "s"), pki.issue_site(ca, 2, tmp_path / "s")
    server = DtlsContext(ca / "ca.pem", one.cert, one.key, 1)
    client = DtlsContext(ca / "ca.pem", two.cert, two.key, 2)
    _, wire = connect(client, server, 1)
    session = wire.server
    assert session is not None and session.established
    # The list changes after the certificate was checked, before the session is handed on.
    events: list[str] = []
    revoked = SiteRevocations(on_event=lambda kind, text, data: events.append(kind))
    revoked.load({"revoked": [{"site": 2, "serial": session.peer_serial}]})
    server.revocation = revoked.reason
    layer = SessionLayer(send=lambda link, addr, data: None, dtls=server)
    layer.add_owner(_Gone())
    layer._after_input(_Entry(session, 1, ("192.0.2.1", 4800), 0.0))
    assert layer.stats.revoked == 1 and layer.stats.unknown_peer == 0
    assert layer.stats.rejections[-1]["reason"].endswith(" is revoked")
    assert events == ["tunnel.handshake.revoked"]


# --------------------------------------------------------------------------- serials


def test_a_serial_whose_first_octet_is_high_matches_at_the_handshake_and_in_revoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca"
    pki.create_ca(ca)
    one = pki.issue_site(ca, 1, tmp_path / "s")
    # 19 octets, the first 0x80..: DER writes a leading zero octet, the handshake must not.
    high = (0x80 << 144) | 0x1234
    monkeypatch.setattr(pki.x509, "random_serial_number", lambda: high)
    two = pki.issue_site(ca, 2, tmp_path / "s")
    monkeypatch.undo()
    serial = pki.serial_of(pki._read_certificate(two.cert))
    assert serial == format(high, "x") and serial.startswith("80")

    account = write(tmp_path, ACCOUNT)
    r = pki.revoke_site(account, 2, cert=two.cert)
    assert r.serial == serial and load_account(account).revoked.is_revoked(2, serial)

    server = DtlsContext(ca / "ca.pem", one.cert, one.key, 1)
    server.revocation = load_account(account).revoked.reason
    client = DtlsContext(ca / "ca.pem", two.cert, two.key, 2)
    _, wire = connect(client, server, 1)
    assert wire.server is not None and not wire.server.established
    assert wire.server.failed == f"certificate of site 2 (serial {serial}) is revoked"


def test_serials_as_long_as_the_handshake_reads_them_are_accepted(tmp_path: Path) -> None:
    account = write(tmp_path, ACCOUNT)
    longest = "f" * MAX_SERIAL_HEX  # 64 octets: what the handshake reads
    r = pki.revoke_site(account, 2, serial=longest)
    assert load_account(account).revoked.is_revoked(2, r.serial)
    with pytest.raises(pki.PkiError, match="longer than"):
        pki.revoke_site(account, 2, serial="f" * (MAX_SERIAL_HEX + 1))


def test_a_negative_serial_is_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca"
    pki.create_ca(ca)
    two = pki.issue_site(ca, 2, tmp_path / "s")
    real = pki._read_certificate

    class Negative:
        def __init__(self, cert: Any) -> None:
            self._cert = cert
            self.serial_number = -5

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cert, name)

    monkeypatch.setattr(pki, "_read_certificate", lambda path: Negative(real(path)))
    account = write(tmp_path, ACCOUNT)
    rc = pki.main(["revoke", str(account), "--site-id", "2", "--cert", str(two.cert)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "serial number is negative" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the account file


def test_a_reason_with_emoji_and_quotes_is_written_as_valid_toml(tmp_path: Path) -> None:
    account = write(tmp_path, ACCOUNT)
    reason = 'stolen \U0001F6A8 from "branch" \\ 7'
    pki.revoke_site(account, 2, serial="ab", reason=reason)
    doc = tomllib.loads(account.read_text(encoding="utf-8"))
    assert doc["revoked"][0]["note"].endswith(": " + reason)
    assert load_account(account).revoked.entries[0].note.endswith(reason)
    assert pki.toml_string("a\tb\x01") == '"a\\tb\\u0001"'


def test_the_rewrite_keeps_owner_group_mode_and_a_symlink(tmp_path: Path) -> None:
    real = write(tmp_path, ACCOUNT)
    os.chmod(real, 0o640)
    if os.getuid() == 0:
        os.chown(real, 1234, 5678)
    link = tmp_path / "account-link.toml"
    link.symlink_to(real)
    pki.revoke_site(link, 2, serial="ab")
    assert link.is_symlink() and link.resolve() == real.resolve()
    st = real.stat()
    assert oct(st.st_mode & 0o7777) == oct(0o640)
    if os.getuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert load_account(real).revoked.is_revoked(2, "ab")


def test_concurrent_revokes_both_land(tmp_path: Path) -> None:
    """Two revokes at once: the second waits for the first's lock and adds to its file."""
    account = write(tmp_path, ACCOUNT)
    fd = os.open(account, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # someone else is rewriting it
    done: list[str] = []
    t = threading.Thread(
        target=lambda: done.append(pki.revoke_site(account, 2, serial="ab").serial)
    )
    t.start()
    time.sleep(0.3)
    assert not done  # waiting for the lock
    os.close(fd)  # released
    t.join(10)
    assert done == ["ab"]
    pki.revoke_site(account, 2, serial="cd")
    revoked = load_account(account).revoked
    assert revoked.is_revoked(2, "ab") and revoked.is_revoked(2, "cd")


# --------------------------------------------------------------------------- what popctl shows


def test_popctl_shows_the_lists_hash_and_each_sessions_serial() -> None:
    a = Revocations.from_list([{"site": 2, "serial": "1f"}, {"site": 3, "serial": "aa"}])
    b = Revocations.from_list(
        [{"site": 3, "serial": "aa"}, {"site": 2, "serial": "1f", "note": "x"}]
    )
    assert a.digest() == b.digest() and a.digest() != Revocations().digest()
    out = io.StringIO()
    _print_status({"account": {"revoked": 2, "revoked_hash": a.digest()}}, out)
    assert f"revoked certificates: 2 (hash {a.digest()}" in out.getvalue()
    out = io.StringIO()
    _print_sites({"sites": [{"site_id": 2, "name": "b", "online": True, "subnets": [],
                             "sessions": [{"link": "wan1", "precedence": 1, "public": "x:1",
                                           "serial": "1f"}]}]}, out)
    assert "serial 1f" in out.getvalue()


# --------------------------------------------------------------------------- which PoP's config


def test_only_the_active_pops_config_takes_entries_off(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The supervisor's wiring: cloud configs of the active PoP and of a secondary."""
    root = tmp_path_factory.mktemp("pki-cloud")
    pki.create_ca(root / "ca", "acme")
    net = Net()
    primary = MiniPop(net, 1, pop_files(root, 1), SITES)
    secondary = MiniPop(net, 2, pop_files(root, 2), SITES)
    s = SimSocket(net, site_config(root, tmp_path, [primary, secondary]))
    assert s.cloud is not None
    s._revocations_follow(s.cloud)
    active = SimpleNamespace(pop_index=s.cloud.active, pop=SimpleNamespace(id=1))
    other = SimpleNamespace(pop_index=s.cloud.active + 1, pop=SimpleNamespace(id=2))

    s.cloud.on_config(active, {"rev": 1, "config": {"revoked": LIST}})
    assert s.revoked.current.is_revoked(2, "1f")
    s.cloud.on_config(other, {"rev": 7, "config": {"revoked": []}})  # a lagging PoP
    assert s.revoked.current.is_revoked(2, "1f")
    s.cloud.on_config(other, {"rev": 8, "config": {"revoked": [{"site": 3, "serial": "aa"}]}})
    assert s.revoked.current.is_revoked(3, "aa") and s.revoked.current.is_revoked(2, "1f")
    s.cloud.on_config(active, {"rev": 2, "config": {"rules": []}})  # no key: no change
    assert len(s.revoked.current) == 2
    s.cloud.on_config(active, {"rev": 3, "config": {"revoked": []}})
    assert len(s.revoked.current) == 0
    s.shutdown()
