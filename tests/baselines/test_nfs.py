"""The three NFs on every baseline give the outputs they must: local-only exactly on one
instance (and not across several, as it says), remote-only on our kv server and on Redis
the same as S6 on three instances, with the expected outputs of tests/nf (PRADS's log of
the real prads, the IDS's alerts against Suricata's, the NAT's invariants)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import trio

from nf.capture import read_capture
from nf.ids import IDS
from nf.nat import NAT
from nf.prads import PRADS
from nf.runner import RunResult, run_capture
from tests.baselines.conftest import SECRET
from tests.nf.ids.helpers import alert_keys
from tests.nf.ids.test_suricata import ONLY_OURS, ONLY_SURICATA
from tests.nf.test_transparency import PACKETS as NAT_PACKETS
from tests.nf.test_transparency import check_nat_invariants, without_ports

NF_TESTS = Path(__file__).resolve().parents[1] / "nf"
IDS_FIXTURES = NF_TESTS / "ids" / "fixtures"
PRADS_FIXTURES = NF_TESTS / "prads" / "fixtures"

NAT_CONFIG: dict[str, Any] = {"inside": ["10.0.0.0/16"]}
IDS_CONFIG: dict[str, Any] = {"rules": str(IDS_FIXTURES / "cases.rules")}
IDS_PACKETS = read_capture(str(IDS_FIXTURES / "cases.pcap"))
PRADS_PACKETS = read_capture(str(PRADS_FIXTURES / "mixed.pcap"))
PRADS_LOG = (PRADS_FIXTURES / "mixed.ours.log").read_text(encoding="latin-1").splitlines()

RUNS: dict[str, tuple[Any, dict[str, Any], list[tuple[float, bytes]]]] = {
    "nat": (NAT, NAT_CONFIG, NAT_PACKETS),
    "ids": (IDS, IDS_CONFIG, IDS_PACKETS),
    "prads": (PRADS, {}, PRADS_PACKETS),
}


async def run_all(instances: int, **how: Any) -> dict[str, RunResult]:
    """The three NFs side by side (they use maps of their own names, so one store holds
    all three)."""
    results: dict[str, RunResult] = {}

    async def one(name: str) -> None:
        nf_cls, config, packets = RUNS[name]
        results[name] = await run_capture(
            nf_cls, config, packets, instances=instances, keep_frames=name == "nat", **how
        )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for name in RUNS:
                nursery.start_soon(one, name)
    return results


@pytest.fixture(scope="module")
def s6_one() -> dict[str, RunResult]:
    """S6 on one (embedded) member."""
    return trio.run(run_all, 1)


@pytest.fixture(scope="module")
def s6_three() -> dict[str, RunResult]:
    """S6 on three members, the three NFs at once (once for the module: each such run
    takes some 5 s to stop its members)."""
    return trio.run(run_all, 3)


def check_expected(results: dict[str, RunResult]) -> None:
    """The outputs the tests of tests/nf expect, whatever ran them."""
    nat = results["nat"]
    check_nat_invariants(nat)
    assert len(nat.lines) > 50 and "inside-reply-mismatch" not in nat.counts
    assert collections.Counter(results["prads"].lines) == collections.Counter(PRADS_LOG)
    ours = collections.Counter(alert_keys(results["ids"].lines))
    theirs = collections.Counter(
        alert_keys(x for x in (IDS_FIXTURES / "suricata-fast.log").read_text().splitlines())
    )
    assert dict(ours - theirs) == dict.fromkeys(ONLY_OURS, 1)
    assert dict(theirs - ours) == dict.fromkeys(ONLY_SURICATA, 1)


def check_same(results: dict[str, RunResult], reference: dict[str, RunResult]) -> None:
    nat, want = results["nat"], reference["nat"]
    assert nat.verdicts == want.verdicts
    assert without_ports(nat.lines) == without_ports(want.lines)  # ports may differ
    for name in ("translations", "closed-rst", "unsolicited-inbound", "pool-exhausted"):
        assert nat.counts.get(name) == want.counts.get(name), name
    assert collections.Counter(results["prads"].lines) == collections.Counter(
        reference["prads"].lines
    )
    assert results["ids"].lines == reference["ids"].lines
    assert results["ids"].counts["alerts"] == reference["ids"].counts["alerts"]


async def test_local_only_on_one_instance_gives_the_expected_outputs(
    s6_one: dict[str, RunResult],
) -> None:
    results = await run_all(1, backend="local-only")
    check_expected(results)
    check_same(results, s6_one)
    assert all(r.statistics[0].backend == "local-only" for r in results.values())


async def test_local_only_on_three_instances_is_not_a_correct_nf(
    s6_one: dict[str, RunResult],
) -> None:
    """What its docstring says: each instance sees only its share, never reconciled."""
    results = await run_all(3, backend="local-only")
    # each instance logs the assets it saw itself, and only those
    assert collections.Counter(results["prads"].lines) != collections.Counter(PRADS_LOG)
    # the NAT's table is the asking instance's own: a third of the connections
    assert 0 < len(results["nat"].lines) < len(s6_one["nat"].lines)


async def check_remote_only(backend: str, address: str, s6_three: dict[str, RunResult]) -> None:
    results = await run_all(3, backend=backend, store_address=address, secret=SECRET)
    check_expected(s6_three)
    check_expected(results)
    check_same(results, s6_three)
    store = "kv" if backend == "remote-only" else "redis"
    for result in results.values():
        stats = result.statistics
        assert [s.node for s in stats] == ["i0", "i1", "i2"]
        assert all(s.backend == f"remote-only/{store}" and s.migrations_in == 0 for s in stats)
        assert all(s.units_run > 0 for s in stats)  # the flows were spread over the three
        assert not any(s.errors for s in stats)


async def test_remote_only_on_our_store_gives_the_same_outputs_as_s6_on_three_instances(
    kv_server: str, s6_three: dict[str, RunResult]
) -> None:
    await check_remote_only("remote-only", kv_server, s6_three)


async def test_remote_only_on_redis_gives_the_same_outputs_as_s6_on_three_instances(
    redis_server: str, s6_three: dict[str, RunResult]
) -> None:
    await check_remote_only("redis", redis_server, s6_three)


def test_the_runner_command_line_runs_the_baselines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m nf prads --pcap F --backend B``: the store started by the runner when
    no ``--store`` is given (an in-process kv server, a redis-server)."""
    from baselines.redis_client import redis_server_path
    from nf.runner import run

    pcap = str(PRADS_FIXTURES / "mixed.pcap")
    backends = ["local-only", "remote-only"] + (["redis"] if redis_server_path() else [])
    for backend in backends:
        extra = ["--instances", "2"] if backend != "local-only" else []
        assert run(PRADS, ["--pcap", pcap, "--backend", backend, *extra], "nf prads") == 0
        out, err = capsys.readouterr()
        assert collections.Counter(out.splitlines()) == collections.Counter(PRADS_LOG), backend
        assert f"{len(PRADS_PACKETS)} packets" in err
    with pytest.raises(SystemExit) as refused:
        run(PRADS, ["--pcap", pcap, "--backend", "local-only", "--scale-at", "0.5"], "nf")
    assert refused.value.code == 2
    assert "nf: error: --backend local-only runs fixed instances" in capsys.readouterr().err
