"""The key timers both ends of a session agree on (common/keytimers.py) and the site's config
check of its own: what a peer may announce, what both then use, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import BASE, write_site

from sdwan.common.handover import parse_key
from sdwan.common.keytimers import (
    HANDSHAKE_MARGIN_S,
    LEGACY,
    PROTOCOL_REKEY_MIN_S,
    KeyTimers,
    announced_timers,
    default_key_max_age,
    timers_problem,
)
from sdwan.site.config import load_config


def test_both_ends_use_the_smaller_of_each() -> None:
    site = KeyTimers.for_rekey(1800)  # a long interval: its own limit is 3660 s
    pop = KeyTimers(600, 900)
    agreed = site.agree(pop)
    assert agreed == pop.agree(site) == KeyTimers(600, 900)
    # Mixed: the shorter interval of one end, the shorter limit of the other.
    a, b = KeyTimers(100, 500), KeyTimers(250, 400)
    assert a.agree(b) == b.agree(a) == KeyTimers(100, 400)


def test_a_peer_cannot_drag_the_interval_below_the_floor() -> None:
    # A peer announcing 10 s (a typo, or a lab end) against 600 s: 60 s, at both ends, and a
    # key-age limit raised so that the key outlives the agreed rekey.
    ours, lab = KeyTimers(600, 1260), KeyTimers(10, 70)
    assert ours.agree(lab) == lab.agree(ours) == KeyTimers(PROTOCOL_REKEY_MIN_S, 120)
    # Both ends below the floor (a lab): the larger of the two, the same at both ends.
    a, b = KeyTimers(10, 80), KeyTimers(25, 110)
    assert a.agree(b) == b.agree(a) == KeyTimers(25, 85)
    assert a.agree(a) == a


def test_a_peer_that_announces_nothing_is_taken_for_the_old_fixed_timers() -> None:
    # A new site with a long interval against an old popd (keys refused at 900 s): it rekeys
    # at 600 s. A new popd with short timers against an old site (which rekeys at 600 s
    # whatever it is told): the old site's keys are kept until 900 s.
    assert KeyTimers(600, 900) == LEGACY
    assert KeyTimers.for_rekey(1200).agree(None) == KeyTimers(600, 900)
    assert KeyTimers(300, 400).agree(None) == KeyTimers(300, 900)
    assert KeyTimers(10, 70).agree(None) == KeyTimers(60, 900)


@pytest.mark.parametrize("r1", [10, 25, 60, 600, 870, 1800, 86400])
@pytest.mark.parametrize("r2", [10, 25, 60, 600, 870, 1800, 86400, None])
def test_agreement_is_symmetric_and_the_key_outlives_the_rekey(r1: int, r2: int | None) -> None:
    for age1 in (r1 + HANDSHAKE_MARGIN_S, default_key_max_age(r1)):
        one = KeyTimers(r1, age1)
        if r2 is None:
            agreed = one.agree(None)
            # The old end rekeys at 600 s and refuses at 900 s: our limit covers its rekey,
            # our interval is within its limit.
            assert agreed.key_max_age_s >= LEGACY.rekey_s + HANDSHAKE_MARGIN_S
            assert agreed.rekey_s <= LEGACY.key_max_age_s - HANDSHAKE_MARGIN_S
            continue
        for age2 in (r2 + HANDSHAKE_MARGIN_S, default_key_max_age(r2)):
            two = KeyTimers(r2, age2)
            agreed = one.agree(two)
            assert agreed == two.agree(one)  # both ends compute the same pair
            lo, hi = min(r1, r2), max(r1, r2)
            # The smaller; the floor when only one end is below it; the larger when both are.
            floor = PROTOCOL_REKEY_MIN_S
            assert agreed.rekey_s == (lo if lo >= floor else floor if hi >= floor else hi)
            assert agreed.key_max_age_s >= agreed.rekey_s + HANDSHAKE_MARGIN_S


def test_an_impossible_pair_is_named() -> None:
    assert timers_problem(600, 660) is None
    problem = timers_problem(900, 900)
    assert problem is not None and "rekey_s at most 840" in problem
    with pytest.raises(ValueError, match="key_max_age_s at least 960"):
        KeyTimers(900, 900)


def test_announced_timers_are_read_leniently_and_bad_ones_refused() -> None:
    assert parse_key({"t": "key", "idx": 7}) == (7, None, None)  # an end from before
    assert parse_key({"t": "key", "idx": 7, "rekey_s": 10, "key_max_age_s": 70}) == (
        7, KeyTimers(10, 70), None
    )
    for announced, read in [
        ({"rekey_s": 604800, "key_max_age_s": 10**9}, KeyTimers(86400, 172860)),  # clamped
        ({"rekey_s": 600.0, "key_max_age_s": 900.5}, KeyTimers(600, 901)),
        ({"rekey_s": 600, "key_max_age_s": 200000}, KeyTimers(600, 172860)),
        ({"rekey_s": 600, "key_max_age_s": 600}, KeyTimers(600, 660)),  # made a pair that works
        ({"rekey_s": 0.5, "key_max_age_s": 1}, KeyTimers(1, 61)),  # the agreement raises it
        ({"rekey_s": float("inf"), "key_max_age_s": 900}, KeyTimers(86400, 86460)),
    ]:
        assert announced_timers({"t": "key", "idx": 7, **announced}) == read, announced
    for bad, words in [
        ({"rekey_s": 10}, "come together"),
        ({"rekey_s": "10", "key_max_age_s": 70}, "rekey_s: expected a positive number"),
        ({"rekey_s": True, "key_max_age_s": 70}, "rekey_s: expected a positive number"),
        ({"rekey_s": 0, "key_max_age_s": 70}, "rekey_s: expected a positive number"),
        ({"rekey_s": 10, "key_max_age_s": -5}, "key_max_age_s: expected a positive number"),
        ({"rekey_s": float("nan"), "key_max_age_s": 70}, "rekey_s: expected a positive"),
        ({"rekey_s": None, "key_max_age_s": 70}, "rekey_s: expected a positive number"),
    ]:
        with pytest.raises(ValueError, match=words):
            announced_timers({"t": "key", "idx": 7, **bad})
        # The key itself stays usable: the index, no timers, and why they were refused.
        idx, timers, problem = parse_key({"t": "key", "idx": 7, **bad})
        assert (idx, timers) == (7, None) and problem is not None and words in problem
    with pytest.raises(ValueError, match="idx"):
        parse_key({"t": "key", "idx": 0, "rekey_s": 10, "key_max_age_s": 70})


def test_site_config_key_timers(tmp_path: Path) -> None:
    cfg = load_config(write_site(tmp_path, BASE))
    assert cfg.tunnel.key_timers == KeyTimers(600, 1260)
    cfg = load_config(write_site(tmp_path, BASE + "\n[tunnel]\nrekey_s = 1800\n"))
    assert cfg.tunnel.key_timers == KeyTimers(1800, 3660)
    cfg = load_config(
        write_site(tmp_path, BASE + "\n[tunnel]\nrekey_s = 30\nkey_max_age_s = 90\n")
    )
    assert cfg.tunnel.key_timers == KeyTimers(30, 90)
