"""A tour of the key layer's ring: how keys spread, and what a join and a leave move.

Run ``python -m bench.ring_demo`` (``make demo``).  Until a live cluster exists this is the
project's main job: it shows the property S6's scaling rests on.  With consistent hashing a
scale-out moves only about ``1/(n+1)`` of the keys, all of them to the new node, and a
scale-in moves only the leaver's keys, whereas the original S6's ``hash mod N`` moved almost
all of them.  Each event is one new ring with an epoch one higher.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from rich.console import Console
from rich.table import Table

from bench._common import flow_keys
from ring.hashring import HashRing, key_token

KEYS = 100_000
MAP_NAME = "conns"


def owners(ring: HashRing, tokens: list[int]) -> list[str]:
    """The owner of every token, in order, so two rings can be compared key by key."""
    owner = ring.owner
    return [owner(t) for t in tokens]


def spread_table(stages: list[tuple[str, HashRing, list[str]]]) -> Table:
    """Keys per node at each epoch: count, share, and multiple of that epoch's mean share."""
    nodes = sorted(set().union(*(ring.nodes for _, ring, _ in stages)))
    table = Table(title=f"Keys per node ({KEYS:,} keys; share; multiple of the mean)")
    table.add_column("node")
    for label, _, _ in stages:
        table.add_column(label, justify="right")
    counts = [Counter(assigned) for _, _, assigned in stages]
    for node in nodes:
        row = [node]
        for (_, ring, assigned), count in zip(stages, counts, strict=True):
            if node in ring:
                n = count[node]
                share = n / len(assigned)
                row.append(f"{n:,}  {share:5.1%}  {share * len(ring):.2f}x")
            else:
                row.append("[dim]-[/]")
        table.add_row(*row)
    return table


def moves_table(
    title: str, before: list[str], after: list[str]
) -> tuple[Table, Counter[tuple[str, str]]]:
    """Every (from, to) pair that some key moved along, with its count."""
    moves = Counter((b, a) for b, a in zip(before, after, strict=True) if b != a)
    table = Table(title=title)
    table.add_column("from")
    table.add_column("to")
    table.add_column("keys", justify="right")
    for (src, dst), count in sorted(moves.items()):
        table.add_row(src, dst, f"{count:,}")
    return table, moves


def main() -> int:
    console = Console()
    started = time.perf_counter()
    tokens = [key_token(MAP_NAME, k) for k in flow_keys(KEYS, seed=0)]

    ring = HashRing(["node-a", "node-b", "node-c"])
    joined = ring.with_node("node-d")  # scale-out: one node joins
    left = joined.without_node("node-b")  # scale-in: one of the first nodes leaves
    first, after_join, after_leave = (owners(r, tokens) for r in (ring, joined, left))

    console.print(
        f"[bold]S6 key layer[/]: {KEYS:,} connection keys of map {MAP_NAME!r} on a ring of "
        f"{len(ring)} nodes ({ring.vnodes} virtual nodes each), then node-d joins and "
        "node-b leaves; each event is one new ring, one epoch higher."
    )
    console.print(
        spread_table(
            [
                (f"epoch {ring.epoch}", ring, first),
                (f"epoch {joined.epoch}: +node-d", joined, after_join),
                (f"epoch {left.epoch}: -node-b", left, after_leave),
            ]
        )
    )

    table, moves = moves_table(
        f"Epoch {ring.epoch} → {joined.epoch}: node-d joins", first, after_join
    )
    moved = sum(moves.values())
    join_ok = all(dst == "node-d" for _, dst in moves)
    console.print(table)
    console.print(
        f"moved {moved:,} keys = {moved / KEYS:.1%} (ideal 1/{len(joined)} = "
        f"{1 / len(joined):.1%}); all to node-d: {verdict(join_ok)}. "
        f"hash mod N would have moved ~{1 - 1 / len(joined):.0%}."
    )

    table, moves = moves_table(
        f"Epoch {joined.epoch} → {left.epoch}: node-b leaves", after_join, after_leave
    )
    moved = sum(moves.values())
    held = Counter(after_join)["node-b"]
    leave_ok = moved == held and all(src == "node-b" for src, _ in moves)
    console.print(table)
    console.print(
        f"moved {moved:,} keys = {moved / KEYS:.1%}; exactly node-b's {held:,} and nothing "
        f"between the nodes that stayed: {verdict(leave_ok)}."
    )
    console.print(f"[dim]done in {time.perf_counter() - started:.1f} s[/]")
    return 0 if join_ok and leave_ok else 1


def verdict(ok: bool) -> str:
    """A failed check is a bug in the ring, and the demo says so rather than hiding it."""
    return "[green]yes[/]" if ok else "[red]NO (ring bug)[/]"


if __name__ == "__main__":
    sys.exit(main())
