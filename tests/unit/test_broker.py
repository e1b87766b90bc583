"""The PoP's punch broker: pairs, initiators, candidates, generations and re-punch limits."""

from __future__ import annotations

from typing import Any

from sdwan.pop.broker import Broker, MeshLink


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def link(site: int, lid: int = 1, prec: int = 1, pub: str = "", **kw: Any) -> MeshLink:
    ip = pub or f"198.51.100.{10 + site}"
    return MeshLink(site, lid, prec, (ip, 4800 + lid), epoch=1.0, local=(f"100.64.{site}.2", 4800),
                    **kw)


def make() -> tuple[Broker, list[tuple[int, int, dict[str, Any]]], Clock]:
    sent: list[tuple[int, int, dict[str, Any]]] = []
    clock = Clock()

    def send(site: int, lid: int, msg: dict[str, Any]) -> bool:
        sent.append((site, lid, msg))
        return True

    return Broker(send, clock=clock, min_repunch_s=2.0), sent, clock


def test_every_pair_of_offcloud_sites_is_punched_once_higher_id_initiating() -> None:
    b, sent, _ = make()
    b.update([link(1), link(2), link(3)], offcloud_sites={1, 2, 3})
    pairs = {(s, m["peer"]) for s, _, m in sent}
    assert pairs == {(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)}
    for site, lid, m in sent:
        assert m["t"] == "punch" and m["link"] == lid == 1 and m["peer_link"] == 1
        assert m["initiator"] is (site > m["peer"])
        assert len(bytes.fromhex(m["secret"])) == 32
        # Different public IPs: no local candidates are leaked.
        assert [c["how"] for c in m["candidates"]] == ["reflexive"]
    # Both sides of a pair share the generation and secret; pairs do not.
    by_pair: dict[frozenset[int], set[tuple[int, str]]] = {}
    for site, _, m in sent:
        by_pair.setdefault(frozenset((site, m["peer"])), set()).add((m["gen"], m["secret"]))
    assert all(len(v) == 1 for v in by_pair.values())
    assert len({next(iter(v)) for v in by_pair.values()}) == 3
    sent.clear()
    b.update([link(1), link(2), link(3)], offcloud_sites={1, 2, 3})
    assert sent == []  # nothing changed: nothing sent


def test_offcloud_off_last_resort_links_and_unpaired_links() -> None:
    b, sent, _ = make()
    links = [link(1), link(1, 2, prec=2), link(2), link(2, 2, prec=3), link(3, offcloud=False)]
    b.update(links, offcloud_sites={1, 2, 3})
    # Site 3's only link is off; site 2's second is last resort: one path, link 1 to link 1.
    assert {(s, lid, m["peer"], m["peer_link"]) for s, lid, m in sent} == {
        (1, 1, 2, 1), (2, 1, 1, 1)
    }
    sent.clear()
    b.update(links, offcloud_sites={1})
    assert sent == [] and b.paths == {}


def test_same_public_ip_adds_local_candidates_and_a_static_endpoint_is_offered() -> None:
    b, sent, _ = make()
    b.update(
        [link(1, pub="198.51.100.50"), link(2, pub="198.51.100.50", static=("203.0.113.9", 5000))],
        offcloud_sites={1, 2},
    )
    to1 = next(m for s, _, m in sent if s == 1)
    assert [(c["how"], c["addr"]) for c in to1["candidates"]] == [
        ("reflexive", "198.51.100.50:4801"), ("local", "100.64.2.2:4800"),
        ("static", "203.0.113.9:5000"),
    ]


def test_a_changed_endpoint_or_a_request_punches_again_rate_limited() -> None:
    b, sent, clock = make()
    b.update([link(1), link(2)], offcloud_sites={1, 2})
    gen = sent[0][2]["gen"]
    sent.clear()
    # A change right after a punch waits for min_repunch_s (a re-registering loop must not
    # re-punch every pair each time), then goes out with the latest candidates.
    b.update([link(1), link(2, pub="198.51.100.98")], offcloud_sites={1, 2})
    b.update([link(1), link(2, pub="198.51.100.99")], offcloud_sites={1, 2})
    assert sent == []
    clock.t += 2.1
    b.tick()
    assert len(sent) == 2 and sent[0][2]["gen"] != gen
    assert "198.51.100.99:4801" in str(sent[0][2]["candidates"] + sent[1][2]["candidates"])
    sent.clear()
    assert b.on_request(1, 1, {"peer": 2}) is None
    assert sent == []  # within min_repunch_s: deferred
    clock.t += 2.1
    b.tick()
    assert len(sent) == 2
    sent.clear()
    b.tick()
    assert sent == []
    assert b.on_request(1, 1, {"peer": 7}) is not None
    assert b.on_request(1, 9, {"peer": 2}) is not None
    assert b.on_request(1, 1, {"peer": True}) is not None
    assert b.stats.requests_bad == 3


def test_sites_registering_one_by_one_punch_only_their_own_pairs() -> None:
    # Each registration looks at the new site's pairs only, never at every pair again.
    b, sent, clock = make()
    links: list[MeshLink] = []
    for site in range(1, 301):
        links.append(link(site, pub=f"198.51.{site // 250}.{site % 250}"))
        before = len(sent)
        b.update(links, offcloud_sites=range(1, 301))
        assert len(sent) - before == 2 * (site - 1)
    assert len(b.paths) == 300 * 299 // 2
    sent.clear()
    clock.t += 2.1
    links[150] = link(151, pub="203.0.113.200")  # one site's NAT rebinds
    b.update(links, offcloud_sites=range(1, 301))
    assert len(sent) == 2 * 299 and all(151 in (s, m["peer"]) for s, _, m in sent)
