"""site/sources.py: the allowed sources from the static peers and the directory, pushed to a
real fast path by differences in one batch, and the peers' owners."""

from __future__ import annotations

import io
import ipaddress
from typing import Any

import pytest

from sdwan.bindings.fastpath import FastPath, FastPathError
from sdwan.site.socketctl import format_status
from sdwan.site.sources import SOURCE_ANY, Sources, add_peer

ME = 1


def _net(s: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(s)


class Batches:
    """A real fast path that also records each source batch."""

    def __init__(self) -> None:
        self.fp = FastPath()
        self.calls: list[tuple[list[Any], list[Any]]] = []
        real = self.fp.source_batch

        def record(set_: Any, delete: Any = ()) -> None:
            self.calls.append((list(set_), list(delete)))
            real(set_, delete)

        self.fp.source_batch = record  # type: ignore[method-assign]


def _sources(directory: list[dict[str, Any]]) -> tuple[Sources, Batches]:
    b = Batches()
    s = Sources(
        b.fp,
        ME,
        static=[(5, [_net("10.5.0.0/24"), _net("fd05::/64")])],
        directory=lambda: directory,
    )
    return s, b


def test_static_peers_and_directory_sites_own_their_subnets() -> None:
    directory = [
        {"site_id": ME, "subnets": ["10.1.0.0/24"]},  # our own entry: nobody speaks for it
        {"site_id": 2, "subnets": ["10.2.0.0/24", "fd02::/64"], "online": False},
        {"site_id": 3, "subnets": ["10.3.0.0/24"]},
        {"site_id": 5, "subnets": ["10.5.0.0/24", "10.55.0.0/24"]},  # also a static peer
    ]
    s, b = _sources(directory)
    s.apply()
    fp = b.fp
    assert len(b.calls) == 1  # one batch
    assert fp.source_lookup("10.1.0.7") is None
    assert fp.source_lookup("10.2.0.7") == 2 and fp.source_lookup("fd02::7") == 2
    assert fp.source_lookup("10.3.0.7") == 3
    assert fp.source_lookup("10.5.0.7") == 5 and fp.source_lookup("fd05::1") == 5
    assert fp.source_lookup("10.55.0.7") == 5
    assert s.summary() == {"prefixes": 6, "sites": 3, "conflicts": [], "errors": 0}


def test_a_directory_change_sends_only_the_differences() -> None:
    directory = [{"site_id": 2, "subnets": ["10.2.0.0/24"]}, {"site_id": 3, "subnets": []}]
    s, b = _sources(directory)
    s.apply()
    directory[:] = [
        {"site_id": 2, "subnets": ["10.2.0.0/24"]},
        {"site_id": 3, "subnets": ["10.3.0.0/24"]},  # new
    ]
    s.apply()
    assert b.calls[-1] == ([(_net("10.3.0.0/24"), 3)], [])
    directory[:] = [{"site_id": 2, "subnets": ["10.3.0.0/24"]}]  # site 3 gone, 2 moved
    s.apply()
    assert sorted(map(str, b.calls[-1][1])) == ["10.2.0.0/24"]
    assert b.calls[-1][0] == [(_net("10.3.0.0/24"), 2)]
    assert b.fp.source_lookup("10.2.0.1") is None and b.fp.source_lookup("10.3.0.1") == 2
    n = len(b.calls)
    s.apply()  # nothing changed: no call
    assert len(b.calls) == n


def test_two_sites_claiming_one_prefix_leave_it_to_nobody_and_static_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = [
        {"site_id": 2, "subnets": ["10.9.0.0/24", "10.5.0.0/24"]},
        {"site_id": 3, "subnets": ["10.9.0.0/24", "10.9.0.128/25"]},
    ]
    s, b = _sources(directory)
    s.apply()
    assert b.fp.source_lookup("10.9.0.1") is None  # contested: nobody's
    assert b.fp.source_lookup("10.9.0.200") == 3  # nested, not contested: longest wins
    assert b.fp.source_lookup("10.5.0.1") == 5  # the static peer's claim beats the directory
    assert s.summary()["conflicts"] == [{"prefix": "10.9.0.0/24", "sites": [2, 3]}]
    assert "claimed by sites 2, 3" in caplog.text
    directory[1] = {"site_id": 3, "subnets": ["10.9.0.128/25"]}  # resolved
    s.apply()
    assert b.fp.source_lookup("10.9.0.1") == 2 and s.summary()["conflicts"] == []


def test_a_refused_batch_is_tried_again() -> None:
    directory: list[dict[str, Any]] = [{"site_id": 2, "subnets": ["10.2.0.0/24"]}]
    s, b = _sources(directory)
    real = b.fp.source_batch

    def refuse(*_: Any) -> None:
        raise FastPathError(22, "fp_source_batch")

    b.fp.source_batch = refuse  # type: ignore[method-assign]
    s.apply()
    assert s.summary()["errors"] == 1 and s.installed == {}
    b.fp.source_batch = real  # type: ignore[method-assign]
    s.apply()
    assert b.fp.source_lookup("10.2.0.1") == 2


def test_add_peer_gives_the_peer_its_owner() -> None:
    fp = FastPath()
    add_peer(fp, 2, owner=2)
    add_peer(fp, 0x80000001, owner=SOURCE_ANY)
    with pytest.raises(FastPathError):
        add_peer(fp, 2, owner=2)  # already there
    fp.peer_del(2)
    fp.peer_del(0x80000001)


def test_socketctl_status_shows_the_sources_and_the_spoofed_drops() -> None:
    out = io.StringIO()
    format_status(
        {
            "site_id": 1,
            "links": [{"name": "wan1", "drops": {"spoofed": 3}}, {"name": "wan2", "drops": {}}],
            "sources": {
                "prefixes": 4,
                "sites": 2,
                "conflicts": [{"prefix": "10.9.0.0/24", "sites": [2, 3]}],
                "errors": 0,
            },
        },
        out,
    )
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("sources"))
    assert line.split(None, 1)[1] == (
        "4 prefixes of 2 sites, 3 spoofed dropped, 1 contested prefixes accepted from nobody"
    )
