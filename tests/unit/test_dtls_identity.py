"""DTLS peer identities: sites and PoPs (sdwan:site:N / sdwan:pop:N), in-process handshakes."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from sdwan.common.dtls import DtlsConfigError, DtlsContext, DtlsSession, as_identity
from sdwan.pop import pki

SOURCE = "192.0.2.10:4800"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.create_ca(root / "ca", account="acme")
    for n in (1, 2, 3):
        pki.issue_site(root / "ca", n, root / "out")
    for n in (1, 2):
        pki.issue_pop(root / "ca", n, root / "out")
    return root


def site_ctx(root: Path, n: int) -> DtlsContext:
    out = root / "out"
    return DtlsContext(root / "ca/ca.pem", out / f"site-{n}.pem", out / f"site-{n}.key", n)


def pop_ctx(root: Path, n: int) -> DtlsContext:
    return DtlsContext(
        root / "ca/ca.pem", root / f"out/pop-{n}.pem", root / f"out/pop-{n}.key", ("pop", n)
    )


def handshake(
    client: DtlsSession, server_ctx: DtlsContext, allowed: set[int] | None = None
) -> DtlsSession | None:
    server: DtlsSession | None = None
    c2s = client.start()
    for _ in range(50):
        s2c: list[bytes] = []
        for d in c2s:
            if server is None:
                res = server_ctx.accept(d, SOURCE, allowed_site_ids=allowed)
                server = res.session
                s2c += res.replies
            else:
                s2c += server.receive(d)
        c2s = [out for d in s2c for out in client.receive(d)]
        if not c2s:
            break
    return server


def test_pop_certificate_profile(ca: Path) -> None:
    cert = x509.load_pem_x509_certificate((ca / "out/pop-2.pem").read_bytes())
    assert pki.identity_from_certificate(cert) == ("pop", 2)
    assert cert.subject.rfc4514_string() == "CN=pop-2"
    with pytest.raises(ValueError, match="sdwan:site:"):
        pki.site_id_from_certificate(cert)
    site = x509.load_pem_x509_certificate((ca / "out/site-3.pem").read_bytes())
    assert pki.identity_from_certificate(site) == ("site", 3)
    assert (ca / "out/pop-2.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.issue_pop(ca / "ca", 2, ca / "out")
    with pytest.raises(pki.PkiError, match="PoP id must be in"):
        pki.issue_pop(ca / "ca", 0, ca / "out")


def test_issue_pop_command(ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pki.main(["issue-pop", str(ca / "ca"), "--pop-id", "7", "--out", str(tmp_path)]) == 0
    assert "issued PoP 7" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((tmp_path / "pop-7.pem").read_bytes())
    assert pki.identity_from_certificate(cert) == ("pop", 7)


def test_identity_argument_forms() -> None:
    assert as_identity(5) == ("site", 5)
    assert as_identity(("pop", 1)) == ("pop", 1)
    for bad in (True, ("pop",), ("router", 1), ("pop", "1"), "1"):
        with pytest.raises(ValueError):
            as_identity(bad)  # type: ignore[arg-type]


def test_pop_context_checks_its_certificate(ca: Path) -> None:
    ctx = pop_ctx(ca, 1)
    assert ctx.identity == ("pop", 1) and ctx.my_site_id is None
    with pytest.raises(DtlsConfigError, match="is for pop 1, but this is pop 2"):
        DtlsContext(ca / "ca/ca.pem", ca / "out/pop-1.pem", ca / "out/pop-1.key", ("pop", 2))
    with pytest.raises(DtlsConfigError, match="is for pop 1, but this is site 1"):
        DtlsContext(ca / "ca/ca.pem", ca / "out/pop-1.pem", ca / "out/pop-1.key", 1)
    with pytest.raises(DtlsConfigError, match="is for site 1, but this is pop 1"):
        DtlsContext(ca / "ca/ca.pem", ca / "out/site-1.pem", ca / "out/site-1.key", ("pop", 1))


def test_site_to_pop_session(ca: Path) -> None:
    client = site_ctx(ca, 1).client(("pop", 1))
    server = handshake(client, pop_ctx(ca, 1), allowed={1, 2})
    assert client.established and server is not None and server.established
    assert client.peer_identity == ("pop", 1) and client.peer_site_id is None
    assert server.peer_identity == ("site", 1) and server.peer_site_id == 1
    assert client.export_keys() == server.export_keys()[::-1]


def test_site_expecting_pop_refuses_a_site_or_the_wrong_pop(ca: Path) -> None:
    client = site_ctx(ca, 1).client(("pop", 1))
    handshake(client, site_ctx(ca, 2))
    assert not client.established
    assert client.failed == "peer presented site 2, expected pop 1"

    client = site_ctx(ca, 1).client(("pop", 1))
    handshake(client, pop_ctx(ca, 2))
    assert client.failed == "peer presented pop 2, expected pop 1"

    # And a site expecting a site refuses a PoP.
    client = site_ctx(ca, 1).client(2)
    handshake(client, pop_ctx(ca, 1))
    assert client.failed == "peer presented pop 1, expected site 2"


def test_pop_refuses_sites_outside_its_account_and_other_pops(ca: Path) -> None:
    client = site_ctx(ca, 3).client(("pop", 1))
    server = handshake(client, pop_ctx(ca, 1), allowed={1, 2})
    assert not client.established and (server is None or not server.established)

    # A PoP certificate as a client is refused, with or without an allowed list.
    for allowed in ({1, 2}, None):
        client = pop_ctx(ca, 2).client(("pop", 1))
        server = handshake(client, pop_ctx(ca, 1), allowed=allowed)
        assert server is not None and not server.established
        assert server.failed == "peer presented pop 2, but only sites may connect"


def test_cannot_call_ourselves(ca: Path) -> None:
    with pytest.raises(ValueError, match="own pop id 1"):
        pop_ctx(ca, 1).client(("pop", 1))
