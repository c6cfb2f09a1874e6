"""What a microthread costs when its state is local, against the alternatives.

Run ``python -m bench.microthreads [--quick] [--out results/microthreads.json]``.

The design bet of §4.3 (and of ``store.core.scheduler``) is that the common packet, whose
state is local, pays almost nothing for being *able* to wait for remote state.  This bench
runs the same per-packet work (look a flow's counter up through a store-like awaitable that
returns at once, bump it) five ways, over seeded 5-tuple flow keys:

* ``direct``: a plain function doing the same work with a plain lookup call: the floor;
* ``hand-stepped``: the NF's ``async def`` stepped with ``coro.send(None)``, no scheduler:
  what any coroutine costs, scheduler or not;
* ``submit_nowait``: the same coroutine through :meth:`Scheduler.submit_nowait`: the hot
  path of the node (bound check, flow check, marker, Unit record);
* ``trio task``: one ``nursery.start_soon`` per packet, the design we rejected;
* ``park+resume`` (for scale, not a local path): each unit parks on a Wait, which is then
  resolved and resumed by ``run_ready``, 256 units at a time: the scheduler's share of a
  remote access, without the network (a loopback round trip costs ~150 µs).

Each variant is timed over all keys, several times, the variants taking turns; the table
shows the best and the median µs per unit, and the ratio to ``direct`` and the overhead over
it, both from the best.  The goal we judge against: ``submit_nowait`` adds at most ~1 µs per
unit over ``direct``.  It is judged on the best of the repeats, as ``timeit`` advises:
these 2-vCPU machines are shared and noisy (runs vary 25-45%, and twice that while another
process is busy), and slower repeats measure the other process, not this code.
"""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from bench._common import RESULTS_DIR, FlowKey, flow_keys, write_json
from store.cli.common import OneLineParser
from store.core.scheduler import Scheduler, Wait

GOAL_OVERHEAD_US = 1.0
#: Units parked at once in the park+resume variant: one batch of remote requests.  (All
#: 100,000 at once would mostly measure the cyclic GC walking 100,000 live frames.)
PARK_BATCH = 256


class LocalGet:
    """A store operation whose state is local: ``__await__`` returns without yielding."""

    __slots__ = ("key", "table")

    def __init__(self, table: dict[FlowKey, int], key: FlowKey) -> None:
        self.table = table
        self.key = key

    def __await__(self) -> Generator[Any, Any, int]:
        return self.table.get(self.key, 0)
        yield  # unreachable: makes this a generator, as a store operation's __await__ is


class RemoteGet:
    """A store operation whose state is remote: it waits on a Wait the bench resolves."""

    __slots__ = ("pending", "table")

    def __init__(self, table: dict[FlowKey, int], pending: list[Wait[int]]) -> None:
        self.table = table
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, int]:
        wait: Wait[int] = Wait()
        self.pending.append(wait)
        return (yield from wait.__await__())


def make_workloads(
    table: dict[FlowKey, int], pending: list[Wait[int]]
) -> tuple[Callable[[FlowKey], int], Callable[[FlowKey], Any], Callable[[FlowKey], Any]]:
    """The same per-packet work as a plain function, a local NF coroutine, a remote one."""

    def lookup(key: FlowKey) -> int:
        return table.get(key, 0)

    def direct(key: FlowKey) -> int:
        count = lookup(key) + 1
        table[key] = count
        return count

    async def nf_local(key: FlowKey) -> int:
        count = await LocalGet(table, key) + 1
        table[key] = count
        return count

    async def nf_remote(key: FlowKey) -> int:
        count = await RemoteGet(table, pending) + 1
        table[key] = count
        return count

    return direct, nf_local, nf_remote


def _timed_round_robin(
    runs: dict[str, Callable[[], None]], units: int, repeats: int
) -> dict[str, list[float]]:
    """µs per unit of each ``run()`` (each handles ``units`` units), once per repeat.

    The variants take turns within each repeat rather than running back to back, so that a
    burst of load from another process on these shared machines hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter_ns()
            run()
            samples[name].append((time.perf_counter_ns() - start) / units / 1000)
    return samples


def measure(units: int, repeats: int) -> dict[str, list[float]]:
    """Run every variant; returns µs-per-unit samples per variant."""
    keys = flow_keys(units, seed=0)
    table: dict[FlowKey, int] = {}
    pending: list[Wait[int]] = []
    direct, nf_local, nf_remote = make_workloads(table, pending)
    scheduler = Scheduler(limit=units + 1)

    def run_direct() -> None:
        for key in keys:
            direct(key)

    def run_hand_stepped() -> None:
        for key in keys:
            coro = nf_local(key)
            try:
                coro.send(None)
            except StopIteration:
                pass

    def run_submit_nowait() -> None:
        submit = scheduler.submit_nowait
        for key in keys:
            submit(key, nf_local, key)

    def run_park_resume() -> None:
        # In batches, as the node sees replies: PARK_BATCH units park, their replies
        # arrive together, one run_ready resumes them all.
        submit = scheduler.submit_nowait
        for first in range(0, len(keys), PARK_BATCH):
            for key in keys[first : first + PARK_BATCH]:
                submit(key, nf_remote, key)
            for wait in pending:
                wait.resolve(1)
            pending.clear()
            scheduler.run_ready()

    def run_trio_tasks() -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                start = nursery.start_soon
                for key in keys:
                    start(nf_local, key)

        trio.run(main)

    runs = {
        "direct": run_direct,
        "hand-stepped": run_hand_stepped,
        "submit_nowait": run_submit_nowait,
        "trio task": run_trio_tasks,
        "park+resume": run_park_resume,
    }
    results = _timed_round_robin(runs, units, repeats)
    stats = scheduler.statistics()
    assert stats.failed == 0 and stats.in_flight == 0, stats
    assert stats.completed_inline == units * repeats, stats  # the local runs never parked
    return results


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer units and repeats")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "microthreads.json")
    args = parser.parse_args(argv)
    units, repeats = (20_000, 5) if args.quick else (100_000, 11)

    console = Console()
    console.print(f"[bold]microthreads[/]: {units:,} units x {repeats} repeats per variant")
    samples = measure(units, repeats)
    best = {name: min(values) for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    base = best["direct"]

    table = Table(title="Per-unit cost, state local (park+resume: remote, network excluded)")
    columns = ("variant", "best µs/unit", "median µs/unit", "x direct", "over direct µs")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    rows: dict[str, dict[str, float]] = {}
    for name in samples:
        rows[name] = {
            "best_us": round(best[name], 4),
            "median_us": round(median[name], 4),
            "ratio_to_direct": round(best[name] / base, 2),
            "overhead_over_direct_us": round(best[name] - base, 4),
        }
        table.add_row(
            name,
            f"{best[name]:.3f}",
            f"{median[name]:.3f}",
            f"{best[name] / base:.1f}",
            f"{best[name] - base:+.3f}",
        )
    console.print(table)

    overhead = rows["submit_nowait"]["overhead_over_direct_us"]
    scheduler_share = best["submit_nowait"] - best["hand-stepped"]
    met = overhead <= GOAL_OVERHEAD_US
    speedup = best["trio task"] / best["submit_nowait"]
    console.print(
        f"submit_nowait adds {overhead:.3f} µs over a direct call "
        f"({scheduler_share:.3f} µs of it is the scheduler, the rest the coroutine); "
        f"goal <= {GOAL_OVERHEAD_US} µs: [{'green' if met else 'red'}]"
        f"{'met' if met else 'missed'}[/]; {speedup:.0f}x cheaper than a trio task per unit."
    )
    spread = median["submit_nowait"] / best["submit_nowait"]
    if spread > 1.3:
        console.print(
            f"[yellow]noisy run[/]: medians are {spread:.1f}x the best; another process was "
            "busy.  Judge by the best column (what the code costs when it has the CPU)."
        )
    write_json(
        args.out,
        {
            "bench": "microthreads",
            "units": units,
            "repeats": repeats,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "results": rows,
            "samples_us": {name: [round(v, 4) for v in vs] for name, vs in samples.items()},
            "scheduler_over_hand_stepped_us": round(scheduler_share, 4),
            "goal_judged_on": "best of repeats",
            "goal_overhead_us": GOAL_OVERHEAD_US,
            "goal_met": met,
        },
    )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
