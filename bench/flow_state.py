"""What per-flow state costs to make, find and end: ``python -m bench.flow_state [--quick]``.

Short flows make create and remove the hot path of an NF (a NAT entry, a PRADS connection,
an IDS flow context live for a handful of packets).  This benchmark times, per operation,
on one process:

* on an embedded space (one node: it owns every key, so creates and removes take the core's
  fast path);
* on two nodes of one process over loopback, for keys this node owns (the fast path) and
  for keys the other node owns (a round trip to the key owner each);

a ``SingleWriter`` ``create`` of a new key (``async with m.create(k)``), a ``get`` that hits
(the object is here), a ``get`` that misses (``ObjectNotFound``, asked of the key owner),
and a ``remove``; beside the same on a plain dict.  Best of ``--repeats`` runs (the machine
is shared: the best is the least disturbed).  Writes ``results/flow_state.json`` and
``results/flow_state.png``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import trio
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import store
from bench._common import RESULTS_DIR, write_json
from ring.hashring import HashRing, key_token
from store.api import Space
from store.cli.common import OneLineParser
from store.shell.node import open_node

SECRET = b"bench-flow-state"


class Entry(store.SingleWriter):
    def __init__(self) -> None:
        self.packets = 0


async def timed(ops: int, body: Callable[[int], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    for i in range(ops):
        await body(i)
    return (time.perf_counter() - start) / ops * 1e6


async def measure_space(space: Space, keys: list[Any], absent: list[Any]) -> dict[str, float]:
    """``keys`` are made, found and removed; ``absent`` (owned where ``keys`` are) never
    exist: the get misses."""
    flows = space.map("flows", Entry)
    n = len(keys)

    async def create(i: int) -> None:
        async with flows.create(keys[i]):
            pass

    async def hit(i: int) -> None:
        async with flows.get(keys[i]):
            pass

    async def miss(i: int) -> None:
        try:
            async with flows.get(absent[i]):
                pass
        except store.ObjectNotFound:
            pass

    async def remove(i: int) -> None:
        await flows.remove(keys[i])

    return {
        "create": await timed(n, create),
        "get hit": await timed(n, hit),
        "get miss": await timed(n, miss),
        "remove": await timed(n, remove),
    }


async def measure_dict(ops: int) -> dict[str, float]:
    table: dict[Any, Entry] = {}

    async def create(i: int) -> None:
        if i not in table:
            table[i] = Entry()

    async def hit(i: int) -> None:
        table[i].packets += 0

    async def miss(i: int) -> None:
        table.get(("absent", i))

    async def remove(i: int) -> None:
        table.pop(i, None)

    return {
        "create": await timed(ops, create),
        "get hit": await timed(ops, hit),
        "get miss": await timed(ops, miss),
        "remove": await timed(ops, remove),
    }


def split_keys(
    ring: HashRing, me: str, ops: int, rep: int, tag: str = "key"
) -> tuple[list[Any], list[Any]]:
    mine: list[Any] = []
    theirs: list[Any] = []
    i = 0
    while len(mine) < ops or len(theirs) < ops:
        key = (tag, rep, i)
        (mine if ring.owner(key_token("flows", key)) == me else theirs).append(key)
        i += 1
    return mine[:ops], theirs[:ops]


async def run(ops: int, repeats: int) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {}

    def keep(name: str, figures: dict[str, float]) -> None:
        row = best.setdefault(name, dict(figures))
        for op, value in figures.items():
            row[op] = min(row[op], value)

    with Progress(transient=True) as progress:
        task = progress.add_task("measuring", total=repeats)
        for rep in range(repeats):
            keep("plain dict", await measure_dict(ops))
            async with store.open_space() as space:
                made = [("key", rep, i) for i in range(ops)]
                never = [("absent", rep, i) for i in range(ops)]
                keep("embedded space", await measure_space(space, made, never))
            async with AsyncExitStack() as stack:
                nodes = [
                    await stack.enter_async_context(
                        open_node(listen="127.0.0.1:0", secret=SECRET, request_timeout=30.0)
                    )
                    for _ in range(2)
                ]
                ring = HashRing([n.name for n in nodes])
                for node in nodes:
                    node.set_ring(ring)
                spaces = [Space(n) for n in nodes]
                for space in spaces:
                    space.map("flows", Entry)
                mine, theirs = split_keys(ring, spaces[0].name, ops, rep)
                gone_here, gone_there = split_keys(ring, spaces[0].name, ops, rep, "absent")
                keep("two nodes, keys owned here", await measure_space(spaces[0], mine, gone_here))
                keep(
                    "two nodes, keys owned there",
                    await measure_space(spaces[0], theirs, gone_there),
                )
            progress.advance(task)
    return best


def plot(best: dict[str, dict[str, float]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(next(iter(best.values())))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(best)
    for i, (name, row) in enumerate(best.items()):
        ax.bar([x + i * width for x in range(len(ops))], [row[o] for o in ops], width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(ops))], ops)
    ax.set_yscale("log")
    ax.set_ylabel("µs per operation (log)")
    ax.set_title("per-flow state: cost of each operation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = OneLineParser(prog="python -m bench.flow_state", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer operations and repeats")
    parser.add_argument("--ops", type=int, default=None, help="operations per measure")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    ops = args.ops or (2_000 if args.quick else 20_000)
    repeats = args.repeats or (2 if args.quick else 5)
    best = trio.run(run, ops, repeats)
    table = Table(title=f"µs per operation, best of {repeats} runs of {ops:,}")
    table.add_column("where")
    ops_names = list(next(iter(best.values())))
    for op in ops_names:
        table.add_column(op, justify="right")
    for name, row in best.items():
        table.add_row(name, *(f"{row[o]:.2f}" for o in ops_names))
    Console().print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    write_json(RESULTS_DIR / "flow_state.json", {"ops": ops, "repeats": repeats, "best": best})
    plot(best, RESULTS_DIR / "flow_state.png")
    print("wrote results/flow_state.json and results/flow_state.png")


if __name__ == "__main__":
    main()
