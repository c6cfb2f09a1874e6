"""The remote-only baseline live: PRADS on two instance processes with ``--backend
remote-only``, its state on a kv server process that ``bench.live`` starts, the sender and
the sink as processes on loopback, no scaling.  Nothing is lost, and the asset log the
cluster answers through the controller's relay equals the offline run's on the same
traffic (remote-only keeps one copy of every object at the store, so it is a correct NF
across instances, unlike local-only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.live import LiveConfig, run_live


@pytest.fixture(scope="module")
def remote_only(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work: Path = tmp_path_factory.mktemp("live-remote-only")
    return run_live(
        LiveConfig(
            nf="prads",
            instances=2,
            rate=1000.0,
            flows=300,
            backend="remote-only",
            scaling=False,
            workdir=str(work),
        )
    )


def test_the_store_was_started_and_used(remote_only: dict[str, Any]) -> None:
    assert remote_only["store"], "bench.live started no kv server"
    assert "store" in remote_only["cpu_share_of_core"]
    assert remote_only["cpu_share_of_core"]["store"] > 0
    per_instance = remote_only["sender"]["per_instance"]
    assert len(per_instance) == 2 and all(n > 0 for n in per_instance.values())


def test_nothing_is_lost(remote_only: dict[str, Any]) -> None:
    sender, total = remote_only["sender"], remote_only["sink"]["total"]
    assert sender["sent"] > 3000
    assert total["received"] == sender["sent"]
    assert total["lost"] == 0 and total["duplicates"] == 0 and total["reordered"] == 0


def test_prads_assets_equal_the_offline_run(remote_only: dict[str, Any]) -> None:
    assert "query_error" not in remote_only
    assert remote_only["output_matches_offline"] is True, remote_only["output"]
    assert remote_only["output"]["live_lines"] > 50
