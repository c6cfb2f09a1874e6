"""The MultiWriter classes our tests and NFs use obey the merge laws (store.check_merge)."""

from __future__ import annotations

from hypothesis import strategies as st

from store import check_merge
from store.merge_check import calls
from tests.fixtures.objects import Tally


def test_counter_merge_is_commutative_associative_and_loses_nothing() -> None:
    check_merge(Tally, calls("bump", st.integers(-5, 50)), max_examples=100)
