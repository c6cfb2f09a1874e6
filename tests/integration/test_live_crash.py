"""A crash under live traffic: two PRADS instances, a third joins, then one of the first
two is killed with SIGKILL (``bench.live --scale-in-by kill``), real processes on
loopback.

What an operator relies on: the frames lost are at most those sent to the dead instance
(none sent to a survivor is lost, none is duplicated or reordered); the sender steers the
dead instance's flows away and, once the controller has declared it dead, stops waiting
for its answers (not after ``--move-timeout``); the cluster still answers the NF's query;
and the survivors still leave gracefully at the end."""

from __future__ import annotations

from pathlib import Path

from bench.live import LiveConfig, run_live


def test_a_killed_instance_loses_only_its_own_frames_and_the_rest_goes_on(
    tmp_path: Path,
) -> None:
    result = run_live(
        LiveConfig(
            nf="prads",
            instances=2,
            rate=1500.0,
            flows=700,
            out_after=0.5,
            in_after=1.0,
            scale_in_by="kill",
            workdir=str(tmp_path),
        )
    )
    killed, total = result["killed"], result["sink"]["total"]
    assert killed["frames_sent_to_it"] > 0
    assert total["received"] + total["lost"] == total["sent"] == result["sender"]["sent"]
    assert total["lost"] <= killed["frames_sent_to_it"], (total, killed)
    assert total["duplicates"] == 0 and total["reordered"] == 0
    pauses = [e for e in result["sender"]["events"] if e["kind"] == "paused"]
    crash = pauses[-1]
    # Its markers were given up when it left the ring (the controller's 2 s failure
    # timeout), not after the sender's 10 s --move-timeout.
    assert crash["old_gone"] >= 1 and crash["timed_out"] == 0, crash
    assert crash["pause_ms"] < 9_000, crash
    assert "query_error" not in result
    survivors = result["instances"]
    assert len(survivors) == 2
    assert all(e["leaving"] for e in survivors.values()), survivors
