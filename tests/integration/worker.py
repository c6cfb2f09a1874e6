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
from tests.integration.objects import Cell, Tally

NOT_FOUND = "NOT_FOUND"


async def one_op(cells: Any, kind: str, key: int, arg: int) -> Any:
    """One SingleWriter operation as the linearizability model names it."""
    if kind == "create":
        async with cells.create(key) as ref:
            if ref.created:
                try:
                    await ref.set(arg)
                except store.ObjectRemoved:
                    pass  # another instance removed it right after we created it
            return ref.created
    if kind == "remove":
        return await cells.remove(key)
    try:
        async with cells.get(key) as ref:
            return await (ref.apply(arg) if kind == "apply" else ref.read())
    except store.ObjectNotFound:
        return NOT_FOUND


def dump(space: Any, kind: str, key: int) -> None:
    """What a stuck operation was waiting for, for the test's failure message."""
    objects, keys = space.node.core.objects, space.node.core.keys
    print(f"{space.name}: {kind}({key}) stuck", file=sys.stderr)
    for req_id, pending in objects._pending.items():
        print(f"  pending {req_id}: {pending.kind} {pending.k}", file=sys.stderr)
    for k, rec in keys.items():
        print(f"  record {k}: {rec.to_wire()} queue={rec.queue}", file=sys.stderr)
    print(
        f"  untethered_since_flush={objects.untethered_since_flush} members="
        f"{sorted(space.node.members())} "
        f"queued={ {k: len(v) for k, v in space.node._queued.items()} }"
        f" peers={sorted(space.node._peers)}",
        file=sys.stderr,
    )
    for k, held in objects.objects.items():
        print(
            f"  held {k}: v{held.version} refs={held.refs} release={held.release}", file=sys.stderr
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    from store.cli.common import read_secret

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
            arg = rng.randrange(100) if kind == "create" else rng.randrange(1, 10)
            t0 = time.monotonic()
            try:
                with trio.fail_after(20):
                    result = await one_op(cells, kind, key, arg)
            except trio.TooSlowError:
                dump(space, kind, key)
                raise
            logged: int | None = arg if kind in ("create", "apply") else None
            t1 = time.monotonic()
            history.append(
                {
                    "process": me,
                    "name": kind,
                    "arg": logged,
                    "result": result,
                    "key": key,
                    "invoke": t0,
                    "response": t1,
                }
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
