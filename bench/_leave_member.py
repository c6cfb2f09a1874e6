"""The leaving member of ``bench.leave``: a process of its own that joins, creates objects,
and leaves when told to.

``python -m bench._leave_member --controller ADDR --objects N [--secret-file F] [--drain-rate R]``

It joins the space through the controller (``store.open_space(controller=...)``), creates
``N`` SingleWriter objects (one small int field, set to ``i`` for the key
``key_of(name, i)``) under keys of its own making (a member
holds the objects it creates), waits until every create has finished, and prints one JSON
line ``{"ready": ..., "name": ..., "created": ..., "create_s": ...}``.  On any line on its
stdin it leaves: it ends its ``open_space`` block, which is a graceful scale-in (the
controller's event hands its key records and its objects over to the other members), and
prints one JSON line with ``leave_s``, the seconds from the start of the leave to the end
of the block, and ``leave_cpu_s``, the CPU seconds this process used meanwhile, then exits.
``--drain-rate`` is ``open_space``'s ``drain_rate`` (key records and objects handed on per
second; the store's default when not given).  If stdin closes instead, it leaves all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import trio

import store
from store.cli.common import read_secret
from store.core.scheduler import SchedulerFull


class Counter(store.SingleWriter):
    """One small int field: the state of a flow at its smallest."""

    def __init__(self) -> None:
        self.n = 0

    def set(self, n: int) -> None:
        self.n = n

    def value(self) -> int:
        return self.n


def key_of(member: str, i: int) -> str:
    """The key of the member's ``i``-th object (its value is ``i``)."""
    return f"{member}/{i}"


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> None:
    secret = read_secret(args.secret_file, "bench._leave_member")
    created = 0
    failed: list[str] = []
    figures: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if args.drain_rate is not None:
        options["drain_rate"] = args.drain_rate
    async with store.open_space(controller=args.controller, secret=secret, **options) as space:
        counters = space.map("counters", Counter)
        name = space.name

        async def make(key: str, i: int) -> None:
            nonlocal created
            try:
                async with counters.create(key) as ref:
                    await ref.set(i)
                created += 1
            except Exception as exc:  # counted and shown, never hidden
                if len(failed) < 10:
                    failed.append(f"{type(exc).__name__}: {exc}"[:200])

        start = time.perf_counter()
        for i in range(args.objects):
            key = key_of(name, i)
            try:
                space.submit_nowait(key, make, key, i)
            except SchedulerFull:
                await space.submit(key, make, key, i)  # wait for room
            if i % 1000 == 999:
                await trio.sleep(0)  # let the node's own tasks run
        scheduler = space.node.micro.scheduler
        while scheduler.in_flight:
            await trio.sleep(0.005)
        await space.flush()
        create_s = time.perf_counter() - start
        stats = space.statistics()
        say(
            {
                "ready": True,
                "name": name,
                "created": created,
                "failed": len(failed),
                "failures": failed,
                "create_s": create_s,
                "objects_single": stats.objects_single,
            }
        )
        stdin = trio.lowlevel.FdStream(os.dup(0))
        await stdin.receive_some()  # a line, or EOF: either way, leave
        leaving = time.perf_counter()
        cpu = time.process_time()
    left = time.perf_counter()
    cpu = time.process_time() - cpu
    try:
        stats = space.statistics()
        figures = {
            "objects_single_after": stats.objects_single,
            "objects_evacuated": stats.objects_evacuated,
            "records_handed_on": stats.records_handed_on,
        }
    except Exception as exc:  # the node is closed: its figures may be gone
        figures = {"statistics_error": f"{type(exc).__name__}: {exc}"[:200]}
    say({"left": True, "leave_s": left - leaving, "leave_cpu_s": cpu, **figures})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--controller", required=True, metavar="HOST:PORT")
    parser.add_argument("--objects", type=int, required=True, metavar="N")
    parser.add_argument("--secret-file", metavar="F")
    parser.add_argument("--drain-rate", type=int, metavar="R", help="open_space's drain_rate")
    args = parser.parse_args()
    # The objects' class must be named by its module, not ``__main__``: the node that
    # receives them imports it (``bench._leave_member:Counter``) to take them over.
    from bench import _leave_member

    trio.run(_leave_member.run, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
