"""The cross-process grant chain checker must reject what it exists to catch: otherwise the
scaling integration test's "never two writable references" would pass vacuously."""

from __future__ import annotations

from pathlib import Path

from tests.integration.grant_chain import Entry, check_grant_chain, read_trace, write_trace

# One key moving a -> b -> c, then evacuated c -> a; each process traces only its own part.
GOOD_A: list[Entry] = [
    ("grant", "cells", 7, 1, "a"),
    ("release", "cells", 7, 1, "a"),
    ("grant", "cells", 7, 4, "a"),
]
GOOD_B: list[Entry] = [("grant", "cells", 7, 2, "b"), ("release", "cells", 7, 2, "b")]
GOOD_C: list[Entry] = [("grant", "cells", 7, 3, "c"), ("release", "cells", 7, 3, "c")]


def test_a_chain_split_over_processes_passes_in_any_process_order() -> None:
    assert check_grant_chain([GOOD_C, GOOD_A, GOOD_B], gapless=True) == []


def test_two_holders_at_once_are_reported() -> None:
    # b is granted v2 while a never released v1: two writable references.
    a: list[Entry] = [("grant", "cells", 7, 1, "a")]
    b: list[Entry] = [("grant", "cells", 7, 2, "b")]
    [problem] = check_grant_chain([a, b])
    assert "grant of v2 at b while v1 at a holds" in problem


def test_the_same_version_granted_twice_is_reported() -> None:
    a: list[Entry] = [("grant", "cells", 7, 1, "a"), ("release", "cells", 7, 1, "a")]
    b: list[Entry] = [("grant", "cells", 7, 1, "b"), ("release", "cells", 7, 1, "b")]
    [problem] = check_grant_chain([a, b])
    assert "while v1 at a holds" in problem


def test_a_release_by_a_node_that_does_not_hold_is_reported() -> None:
    a: list[Entry] = [("grant", "cells", 7, 1, "a")]
    b: list[Entry] = [("release", "cells", 7, 1, "b")]
    [problem] = check_grant_chain([a, b])
    assert "release of v1 at b, chain is at (1, 'a')" in problem


def test_a_local_order_against_the_versions_is_reported() -> None:
    a: list[Entry] = [("release", "cells", 7, 1, "a"), ("grant", "cells", 7, 1, "a")]
    [problem] = check_grant_chain([a])
    assert "local order disagrees" in problem


def test_a_missing_trace_is_a_gap() -> None:
    assert check_grant_chain([GOOD_A, GOOD_C]) == []  # the order alone cannot tell
    [problem] = check_grant_chain([GOOD_A, GOOD_C], gapless=True)
    assert "grant of v3 at c, expected v2" in problem


def test_keys_are_checked_separately_and_survive_the_file_format(tmp_path: Path) -> None:
    other: list[Entry] = [("grant", "tallies", 7, 1, "b"), ("grant", "cells", 8, 1, "b")]
    path = tmp_path / "trace.jsonl"
    write_trace(path, GOOD_A + other)
    assert read_trace(path) == GOOD_A + other
    assert check_grant_chain([read_trace(path), GOOD_B, GOOD_C], gapless=True) == []
