"""The key timers both ends of a session agree on (common/keytimers.py) and the site's config
check of its own: what a peer may announce, what both then use, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import BASE, write_site

from sdwan.common.handover import parse_key
from sdwan.common.keytimers import (
    HANDSHAKE_MARGIN_S,
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
    a, b = KeyTimers(10, 500), KeyTimers(25, 90)
    assert a.agree(b) == b.agree(a) == KeyTimers(10, 90)
    # An end that announced nothing: ours stay in force.
    assert a.agree(None) == a


@pytest.mark.parametrize("r1", [10, 25, 600, 870, 1800, 86400])
@pytest.mark.parametrize("r2", [10, 25, 600, 870, 1800, 86400])
def test_the_agreed_key_outlives_the_agreed_rekey_plus_the_margin(r1: int, r2: int) -> None:
    # Whatever valid pairs the two ends hold, neither end's key ages out before the agreed
    # rekey has had its margin: the failure of a site above ~870 s against a 900 s PoP.
    for age1 in (r1 + HANDSHAKE_MARGIN_S, default_key_max_age(r1)):
        for age2 in (r2 + HANDSHAKE_MARGIN_S, 900 if r2 <= 840 else default_key_max_age(r2)):
            one, two = KeyTimers(r1, age1), KeyTimers(r2, age2)
            agreed = one.agree(two)
            assert agreed.rekey_s == min(r1, r2)
            for own in (one, two):  # each end's fast path refuses keys at its own limit
                assert own.key_max_age_s >= agreed.key_max_age_s
                assert own.key_max_age_s >= agreed.rekey_s + HANDSHAKE_MARGIN_S


def test_an_impossible_pair_is_named() -> None:
    assert timers_problem(600, 660) is None
    problem = timers_problem(900, 900)
    assert problem is not None and "rekey_s at most 840" in problem
    with pytest.raises(ValueError, match="key_max_age_s at least 960"):
        KeyTimers(900, 900)


def test_announced_timers_are_parsed_and_bad_ones_refused() -> None:
    assert parse_key({"t": "key", "idx": 7}) == (7, None)  # an end from before the agreement
    assert parse_key({"t": "key", "idx": 7, "rekey_s": 10, "key_max_age_s": 70}) == (
        7, KeyTimers(10, 70)
    )
    for bad, words in [
        ({"rekey_s": 10}, "come together"),
        ({"rekey_s": "10", "key_max_age_s": 70}, "rekey_s: expected an integer 10..86400"),
        ({"rekey_s": True, "key_max_age_s": 70}, "rekey_s: expected an integer"),
        ({"rekey_s": 5, "key_max_age_s": 70}, "rekey_s: expected an integer 10..86400"),
        ({"rekey_s": 10, "key_max_age_s": 10**9}, "key_max_age_s: expected an integer"),
        ({"rekey_s": 600, "key_max_age_s": 600}, "rekey_s at most 540"),
    ]:
        with pytest.raises(ValueError, match=words):
            announced_timers({"t": "key", "idx": 7, **bad})
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
