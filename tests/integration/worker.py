"""An embedded instance for the integration tests: ``python -m tests.integration.worker``.

It joins the space through the controller, waits until ``--instances`` members are in the
ring, runs a seeded random workload of SingleWriter operations on a small set of keys (so
that objects migrate between instances, get removed and re-created), plus MultiWriter
updates, and prints one JSON document on stdout: its history (with times from the
machine-wide monotonic clock, comparable across processes) and its statistics.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import trio

import store
from store import MultiWriter, SingleWriter, stale, untethered


class Cell(SingleWriter):
    def __init__(self) -> None:
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value

    def apply(self, delta: int) -> int:
        self.value += delta
        return self.value

    def read(self) -> int:
        return self.value

    @stale(max_age=0.2)
    def peek(self) -> int:
        return self.value


class Tally(MultiWriter):
    def __init__(self) -> None:
        self.total = 0
        self.by: dict[str, list[int]] = {}

    @untethered
    def add(self, who: str, n: int) -> None:
        self.total += n
        self.by.setdefault(who, []).append(n)

    def read(self) -> int:
        return self.total


NOT_FOUND = "NOT_FOUND"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    from store.cli_common import read_secret

    secret = read_secret(args.secret_file, "worker")
    history: list[dict[str, Any]] = []
    async with store.open_space(controller=args.controller, secret=secret) as space:
        with trio.fail_after(30):
            while len(space.node.members()) < args.instances:
                await trio.sleep(0.01)
        cells = space.map("cells", Cell)
        tallies = space.map("tallies", Tally)
        me = space.name
        adds = 0
        for _ in range(args.ops):
            key = rng.randrange(args.keys)
            kind = rng.choices(["create", "get", "apply", "remove", "tally"], [3, 3, 6, 1, 2])[0]
            if kind == "tally":
                async with tallies.create("t") as ref:
                    await ref.add(me, 1)
                adds += 1
                continue
            arg: Any = None
            t0 = time.monotonic()
            if kind == "create":
                arg = rng.randrange(100)
                async with cells.create(key) as ref:
                    if ref.created:
                        await ref.set(arg)
                    result: Any = ref.created
            elif kind == "remove":
                result = await cells.remove(key)
            else:
                if kind == "apply":
                    arg = rng.randrange(1, 10)
                try:
                    async with cells.get(key) as ref:
                        result = await (ref.apply(arg) if kind == "apply" else ref.read())
                except store.ObjectNotFound:
                    result = NOT_FOUND
            t1 = time.monotonic()
            history.append(
                {"process": me, "name": kind, "arg": arg, "result": result, "key": key,
                 "invoke": t0, "response": t1}
            )
            if rng.random() < 0.1:
                await trio.sleep(0)
        await space.flush()
        # Repeated local access: the same object ten times must send nothing.
        async with cells.create("mine-" + me) as ref:
            await ref.apply(1)
        before = space.statistics().messages_sent
        for _ in range(10):
            async with cells.get("mine-" + me) as ref:
                await ref.apply(1)
        local_messages = space.statistics().messages_sent - before
        stats = space.statistics()
        # Wait for every worker to finish before leaving: a member that leaves takes its
        # share of the key records with it unless it is scaled in.
        done = space.map("done", Tally)
        async with done.create("workers") as ref:
            await ref.add(me, 1)
        await space.flush()
        with trio.fail_after(60):
            while True:
                async with done.get("workers") as ref:
                    if await ref.read() >= args.workers:
                        break
                await trio.sleep(0.02)
        async with tallies.get("t") as ref:
            tally_total = await ref.read()
        return {
            "name": me,
            "history": history,
            "adds": adds,
            "local_messages": local_messages,
            "tally_total": tally_total,
            "statistics": {k: v for k, v in vars(stats).items() if isinstance(v, int)},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--controller", required=True)
    parser.add_argument("--secret-file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--instances", type=int, default=3, help="members to wait for")
    parser.add_argument("--workers", type=int, default=3, help="workers to wait for at the end")
    args = parser.parse_args()
    out = trio.run(run, args)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
