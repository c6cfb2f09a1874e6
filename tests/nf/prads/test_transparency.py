"""The paper's promise for PRADS: the same asset log on one instance and on several, with
the flows spread across them, and again when the spread changes in the middle of the
capture (flows, and so their Connection objects, move between the members)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.nf.prads.driver import load, run

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["sessions", "mixed"])
async def test_three_instances_write_the_same_log_as_one(name: str) -> None:
    frames = load(FIXTURES / f"{name}.pcap")
    one, _ = await run(frames)
    three, nfs = await run(frames, instances=3)
    assert Counter(three) == Counter(one)
    # the flows really were spread: every member handled packets
    assert all(nf.counts.get("packets", 0) > 0 for nf in nfs)
    assert sum(nf.counts["packets"] for nf in nfs) == len(frames)


async def test_the_spread_changing_mid_capture_changes_nothing() -> None:
    frames = load(FIXTURES / "mixed.pcap")
    one, _ = await run(frames)
    # the spread changes every 5 packets: most connections move between members, some
    # several times, in the middle of their packets
    moved, nfs = await run(frames, instances=3, switch_every=5)
    assert Counter(moved) == Counter(one)
    moves = sum(nf.space.statistics().migrations_in for nf in nfs)
    assert moves > 50


async def test_statistics_add_up_over_instances() -> None:
    frames = load(FIXTURES / "sessions.pcap")
    one, _ = await run(frames, query="statistics")
    two, _ = await run(frames, instances=2, query="statistics")
    assert two == one


@pytest.mark.parametrize(
    "how",
    [
        # flows spread over 2 members, then a scale-out to 3 in the middle of the capture
        # (the runner's multi-member teardown takes about 5 s: one such run only)
        {"instances": 2, "scale_at": 0.5},
        {"dicts": True},  # the same NF code on plain dicts
    ],
    ids=["scale-out", "dicts"],
)
async def test_the_runner_gives_the_real_prads_log_however_it_runs(how: dict[str, Any]) -> None:
    from nf.prads import PRADS
    from nf.runner import run_capture

    frames = load(FIXTURES / "mixed.pcap")
    want = (FIXTURES / "mixed.ours.log").read_text(encoding="latin-1").splitlines()
    result = await run_capture(PRADS, {}, frames, **how)
    assert Counter(result.lines) == Counter(want)
    assert result.packets == len(frames)
