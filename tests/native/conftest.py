"""Fixtures of the native tests (helpers live in fphelpers.py).

The tests import sdwan.bindings.fastpath (and so the built module
sdwan.bindings._fastpath) directly: a
missing build is an import error, i.e. a failure, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fphelpers import Pair, make_pair


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = make_pair()
    try:
        yield p
    finally:
        p.a.close()
        p.b.close()
