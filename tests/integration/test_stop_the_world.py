"""The stop-the-world baseline (``--backend stop-the-world``, OpenNF-style) under live
traffic: a controller, two PRADS instances, the sender and the sink as real processes on
loopback (``bench.live``), a scale-out to three instances and a scale-in back to two.

The sender turns its stop-the-world mode on by itself, from the instances' ``backend``
label.  At each event it holds all traffic back while the moved flows' objects move in
bulk, then releases it: nothing may be lost and, unlike S6's re-steer, nothing reordered;
the pause is paid in latency.  Every wait is on a process's output line under a deadline
(``bench.live.Proc``); the test checks that the events landed inside the traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from baselines.stop_the_world import decode_records, encode_records
from bench.live import LiveConfig, run_live


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work: Path = tmp_path_factory.mktemp("stw")
    return run_live(
        LiveConfig(
            nf="prads",
            instances=2,
            backend="stop-the-world",
            rate=1500.0,
            flows=700,
            out_after=0.5,
            in_after=1.0,
            workdir=str(work),
        )
    )


def _pauses(live: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in live["sender"]["events"] if e["kind"] == "paused"]


def test_nothing_lost_nothing_reordered(live: dict[str, Any]) -> None:
    sender, total = live["sender"], live["sink"]["total"]
    assert sender["sent"] > 5000
    assert total["sent"] == total["received"] == sender["sent"]
    assert total["lost"] == total["holes"] == total["duplicates"] == 0
    assert total["reordered"] == 0


def test_both_events_paused_and_moved_objects_in_bulk(live: dict[str, Any]) -> None:
    pauses = _pauses(live)
    assert [p["why"] for p in pauses] == ["membership", "leaving"]  # scale-out, scale-in
    start, end = live["started_t"], live["sender"]["ended_t"]
    for p in pauses:
        assert start < p["t_start"] < p["t"] < end, p  # inside the traffic
        assert p["flows_moved"] > 0 and p["moves"] > 0 and p["timed_out"] == 0, p
        assert p["held_datagrams"] > 0, p  # traffic did wait
    instances = live["instances"]
    joiner, leaver = instances["instance-2"], live["leaver"]
    # The new instance took flows' objects at the scale-out (acquired, not fetched packet
    # by packet), and the leaver handed its flows on before it left by its SIGTERM.
    assert joiner["counts"]["flows-moved-in"] > 0
    assert joiner["objects_acquired"] >= joiner["counts"]["flows-moved-in"]
    assert leaver["counts"]["flows-moved-out"] > 0 and leaver["leaving"] == "SIGTERM"
    assert leaver["frames"] == live["sender"]["per_instance"][live["events"][2]["instance"]]
    assert all(r.get("acquire_failed", 0) == 0 for r in instances.values())


def test_the_pause_shows_in_latency(live: dict[str, Any]) -> None:
    intervals = [i for i in live["intervals"] if i["received"]]
    before = [i for i in intervals if i["t"] < live["events"][0]["t"]]
    typical = sorted(i["latency_us"]["p50"] for i in before)[len(before) // 2]
    for p in _pauses(live):
        # Intervals are stamped at their start and 100 ms long: those that saw the pause.
        during = [i for i in intervals if p["t_start"] - 0.1 <= i["t"] <= p["t"] + 0.1]
        worst = max(i["latency_us"]["max"] for i in during)
        # The first frame held waited from about the pause's start to its end (less the
        # few ms between the start and the sender's next burst), and the pause is much
        # longer than a frame's typical trip before the events.
        assert worst >= 1000 * p["pause_ms"] - 5000, (p, worst)
        assert worst > 5 * typical, (p, worst, typical)


def test_prads_assets_equal_the_offline_run(live: dict[str, Any]) -> None:
    assert "query_error" not in live
    assert live["output_matches_offline"] is True, live["output"]
    assert live["output"]["live_lines"] > 100


def test_handoff_payloads_round_trip_and_split() -> None:
    entries = [
        (i, (i, 2, 6, 1000 + i, 80), [("prads.connections", (i, 2, 6, 1000 + i, 80))])
        for i in range(300)
    ]
    payloads = encode_records(entries, 1000)
    assert len(payloads) > 1 and all(len(p) <= 1000 for p in payloads)
    assert [e for p in payloads for e in decode_records(p)] == entries
    with pytest.raises(ValueError):
        decode_records(b"\x9f\x01\xff")  # cbor, but not flows' records
    with pytest.raises(ValueError):
        decode_records(b"\xff\x00")
