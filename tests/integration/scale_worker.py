"""A member that updates objects continuously, for the scaling integration test.

``python -m tests.integration.scale_worker --controller ADDR --id I --members M``

Reads commands on stdin, one per line, and answers on stdout:

* (start) joins, waits for ``--members`` members, creates its share of the objects, prints
  ``ready NAME``;
* ``go``: updates objects continuously (SingleWriter objects shared by every worker, so they
  migrate; MultiWriter objects through blocking calls, untethered calls and merged replicas)
  until ``stop``;
* ``stop``: flushes and prints one JSON line: how many updates it issued per object, and
  every failure it saw;
* ``leave``: leaves the space gracefully (a scale-in of this member), writes its
  SingleWriter grant trace to ``--trace`` (if given), prints ``left`` and exits.

The trace is written only after leaving because the objects this member evacuates at its
scale-in are part of it (a release here, a grant at the receiver).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter
from functools import partial
from typing import Any

import trio

import store
from store.cli.common import read_secret
from tests.integration.grant_chain import Entry, write_trace
from tests.integration.objects import Cell, Hits, Tally
from tests.integration.worker import dump


async def lines(stream: trio.abc.ReceiveStream) -> Any:
    buffer = b""
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode().strip()


async def say(text: str) -> None:
    """Print one line on stdout without stopping this member's event loop.

    A report can be larger than a pipe's buffer (64 KiB on Linux: one entry per object
    updated), and the test reads its workers' reports one after another.  A plain
    ``print`` blocks the whole process until the test reads it, so this member would stop
    answering the others: a member still flushing would never get the answer to its flush
    barrier, never report, and the test (reading that member first) would wait forever.
    A worker thread blocks on the pipe instead, while the node keeps serving."""
    await trio.to_thread.run_sync(partial(print, text, flush=True))


async def run(args: argparse.Namespace) -> None:
    secret = read_secret(args.secret_file, "scale_worker")
    rng = random.Random(args.id)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    commands = lines(stdin)
    trace: list[Entry] = []
    async with store.open_space(controller=args.controller, secret=secret) as space:
        if args.trace is not None:
            space.node.core.objects.trace = trace  # before this member can hold any object
        with trio.fail_after(30):
            while len(space.node.members()) < args.members:
                await trio.sleep(0.01)
        cells = space.map("cells", Cell)
        tallies = space.map("tallies", Tally)
        hits = space.map("hits", Hits)
        issued: Counter[str] = Counter()
        failures: list[str] = []
        for i in range(args.id, args.sw, args.workers):
            async with cells.create(i):
                pass
        for i in range(args.id, args.mw, args.workers):
            async with tallies.create(i):
                pass
            async with hits.create(i):
                pass
        await say(f"ready {space.name}")
        assert await commands.__anext__() == "go"
        stop = trio.Event()

        async def updates() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                choice = rng.random()
                try:
                    with trio.fail_after(10):
                        if choice < 0.7:
                            key = rng.randrange(args.sw)
                            async with cells.get(key) as ref:
                                await ref.apply(1)
                            issued[f"cells/{key}"] += 1
                        elif choice < 0.8:
                            key = rng.randrange(args.mw)
                            async with tallies.get(key) as ref:
                                await ref.read()  # a blocking call
                                await ref.add(space.name, 1)  # untethered, shipped
                            issued[f"tallies/{key}"] += 1
                        else:
                            key = rng.randrange(args.mw)
                            async with hits.get(key) as ref:
                                await ref.hit(2)  # untethered into the merged replica
                            issued[f"hits/{key}"] += 2
                except Exception as exc:  # every failure is reported, none hidden
                    failures.append(f"{type(exc).__name__}: {exc}")
                    if isinstance(exc, trio.TooSlowError):
                        dump(space, f"update {choice:.2f}", -1)
                if n % 20 == 0:
                    await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(updates)
            assert await commands.__anext__() == "stop"
            stop.set()
        try:
            with trio.fail_after(30):
                await space.flush()
        except trio.TooSlowError:
            dump(space, "flush", -1)
            raise
        await say(json.dumps({"name": space.name, "issued": issued, "failures": failures}))
        assert await commands.__anext__() == "leave"
    if args.trace is not None:
        write_trace(args.trace, trace)
    await say("left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--controller", required=True)
    parser.add_argument("--secret-file")
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--sw", type=int, default=9_800)
    parser.add_argument("--mw", type=int, default=100)
    parser.add_argument("--trace", help="file for this member's SingleWriter grant trace")
    trio.run(run, parser.parse_args())


if __name__ == "__main__":
    main()
