"""A re-steer keeps each flow's frames in order on the S6 backend: real processes on
loopback (``bench.live``: a controller, two PRADS instances, the sender, the sink), a
scale-out to three instances and a scale-in back to two while traffic flows.

The window for disorder is made wide on purpose: the leaver is stopped (SIGSTOP) for a
while before its SIGTERM, so that its socket holds hundreds of frames of its flows when it
asks the sender to steer them away, and the other instances get those flows' next frames
while it still works through them.  With the sender's ``--keep-order`` the moved flows'
frames wait until the leaver has processed what it got of them, so the sink, which sees
each instance's receipts in the order they were processed (the leaver sends its receipts
before it acknowledges the marker), must count no frame out of order; without it, the same
run reorders frames (which says the window is wide, not luck).

Every wait is on a process's output line under a deadline (``bench.live.Proc``); the stall
is the experiment's schedule, and the test checks what it did rather than trusting it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.live import LiveConfig, run_live


def _run(work: Path, keep_order: bool) -> dict[str, Any]:
    return run_live(
        LiveConfig(
            nf="prads",
            instances=2,
            # (the leaver's backlog grows with the rate; the stall must stay well under
            # the controller's failure timeout, 2 s, or the leaver is declared dead)
            rate=4000.0,
            flows=1400,
            out_after=0.5,
            in_after=1.0,
            keep_order=keep_order,
            stall_leaver=0.8,
            workdir=str(work),
        )
    )


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("order"), keep_order=True)


def _pauses(live: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in live["sender"]["events"] if e["kind"] == "paused"]


def test_no_frame_of_a_moved_flow_is_processed_out_of_order(kept: dict[str, Any]) -> None:
    sender, total = kept["sender"], kept["sink"]["total"]
    assert sender["sent"] > 5000
    assert total["sent"] == total["received"] == sender["sent"]
    assert total["lost"] == total["holes"] == total["duplicates"] == 0
    assert total["reordered"] == 0
    assert kept["output_matches_offline"] is True, kept["output"]


def test_each_re_steer_paused_only_its_moved_flows(kept: dict[str, Any]) -> None:
    pauses = _pauses(kept)
    assert [p["why"] for p in pauses] == ["membership", "leaving"]  # scale-out, scale-in
    start, end = kept["started_t"], kept["sender"]["ended_t"]
    for p in pauses:
        assert p["mode"] == "moved-flows"
        assert start < p["t_start"] <= p["t"] < end, p  # inside the traffic
        assert p["flows_moved"] > 0 and p["moves"] > 0 and p["timed_out"] == 0, p
    # The leaver had a backlog when it asked to leave: its moved flows' frames waited for it
    # to work through that backlog (counted in the sink's latency), the others did not.
    into = pauses[1]
    assert into["held_frames"] > 0, into
    assert into["held_frames"] < kept["sender"]["sent"] // 10, into
    leaver = kept["leaver"]
    assert leaver["leaving"] == "SIGTERM" and leaver["counts"]["markers"] >= 1
    # The leaver's END came after its markers were answered: every frame sent to it
    # (before its flows moved) arrived and was processed there.
    assert leaver["frames"] == kept["sender"]["per_instance"][kept["events"][2]["instance"]]
    assert leaver["parked"] == 0
    # The joiner lost no flows, so it got no marker; no instance counted a bad datagram.
    assert "markers" not in kept["instances"]["instance-2"]["counts"]
    assert all(not r["bad_datagrams"] for r in kept["instances"].values())


def test_without_keeping_order_the_same_run_reorders(tmp_path: Path) -> None:
    loose = _run(tmp_path, keep_order=False)
    total = loose["sink"]["total"]
    assert total["received"] == loose["sender"]["sent"] > 5000
    assert not _pauses(loose)
    assert total["reordered"] > 0
