"""A member process of the fault-injection suite: it works on the space and writes down
what it did, so that the test can tell what must have survived a kill.

``python -m tests.integration.fault_member --controller ADDR --secret-file F --id I --log FILE``

Prints ``member NAME`` once admitted, then takes commands on stdin, one a line, and answers
each with one JSON line on stdout:

* ``setup``: create this member's objects (its own single-writer cells, its half of the
  shared cells, of the multi-writer tallies and of the mergeable hits), then wait until
  the other member's half exists too;
* ``seed N``: (the seeder, a member that leaves at once) create the multi-writer objects
  ``rt/*`` and ``rh/*``, which its leave hands to the keys' next owners: store.node
  processes among them, so that killing a node loses objects too;
* ``where``: which node holds each multi-writer object (a locate, which moves nothing);
* ``go SEED``: start the load; ``stop``: stop it, wait for every operation under way, flush
  (the answer has the flush's result and the node's error counters);
* ``held``: the value of each object this member holds;
* ``read NAMES``: what an access to each of those objects finds (a value, or an error);
* ``forget KEYS``: keys known lost, not to be touched again.

The load is single-writer updates (of cells of its own, held here, and of shared cells,
which migrate between the members), blocking multi-writer calls (``Tally.add``),
untethered multi-writer calls shipped to the holder (``Tally.push``) and untethered calls
into a merged replica (``Hits.hit``), with a flush every 100 ms.

The client-side model is the log (``--log``): one JSON array a line, written with one
``os.write`` (no buffer a SIGKILL could lose) right after the operation returned, before
anything else can run, so that the log of a killed member is exact up to its death:

* ``["sw", key, value]``: ``Cell.apply(1)`` returned ``value``;
* ``["b", op, map, key, n]`` before a blocking ``Tally.add(n)``, then ``["B", op, total]``
  when it returned or ``["X", op, error]`` when it failed;
* ``["u", seq, map, key, n]``: an untethered update of ``n`` was made (``seq`` counts them);
* ``["F", flush, seq]`` when a flush starts (it covers the updates numbered up to ``seq``),
  ``["f", flush, seq, result]`` when it ends (``seq``: the count then);
* ``["g" | "r", map, key, version]``: this member was granted / released a single-writer
  object (the object layer's trace, streamed);
* ``["E", what, key, error]``: an operation failed; ``["H", what, key, seconds]``: it did
  not return within its bound (a hang, which the test fails); ``["L", key]``: found lost.

Each step of an operation (taking a reference, a call, a flush) is bounded by
``request_timeout`` plus a margin; the store promises an answer or an exception within
``request_timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any, TypeVar

import trio

import store
from store.cli.common import read_secret
from tests.integration.fault_objects import Cell, Hits, Tally

T = TypeVar("T")

#: Beyond ``request_timeout``, what a step may take before it counts as a hang.
MARGIN = 1.5
#: Seconds between the load's flushes.
FLUSH_EVERY = 0.1
#: Load tasks per member, and the pause after each operation.
TASKS = 3
PAUSE = 0.002


class Hang(Exception):
    """A step of an operation did not return within its bound."""


class Log:
    """The member's model: JSON lines appended with one ``os.write`` each."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, *entry: Any) -> None:
        os.write(self.fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())


class Trace(list[Any]):
    """The object layer's grant trace, written to the log as it grows."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def append(self, entry: Any) -> None:
        event, map_name, key, version, _node = entry
        self.log("g" if event == "grant" else "r", map_name, key, version)


def universe(sizes: dict[str, int]) -> dict[str, list[str]]:
    """Every key of the suite, by map."""
    cells = [f"o{m}/{i}" for m in (0, 1) for i in range(sizes["own"])]
    cells += [f"s/{i}" for i in range(sizes["shared"])]
    tallies = [f"t/{i}" for i in range(sizes["mw"])] + [f"rt/{i}" for i in range(sizes["remote"])]
    hits = [f"h/{i}" for i in range(sizes["mw"])] + [f"rh/{i}" for i in range(sizes["remote"])]
    return {"cells": cells, "tallies": tallies, "hits": hits}


class Worker:
    def __init__(self, space: store.Space, args: argparse.Namespace) -> None:
        self.space = space
        self.me = args.id
        self.log = Log(args.log)
        self.bound = args.request_timeout + MARGIN
        self.sizes = {
            "own": args.own,
            "shared": args.shared,
            "mw": args.mw,
            "remote": args.remote,
        }
        self.keys = universe(self.sizes)
        self.cells = space.map("cells", Cell)
        self.tallies = space.map("tallies", Tally)
        self.hits = space.map("hits", Hits)
        self.lost: set[str] = set()
        self.seq = 0  # untethered updates made
        self.ops = 0  # blocking calls made
        self.flushes = 0
        self.done = 0  # operations finished (returned or failed)
        self.stop = trio.Event()
        self.running = trio.Event()

    # -- bounded steps ---------------------------------------------------------------------

    async def step(self, what: str, key: str, awaitable: Awaitable[T]) -> T:
        """Await one store operation under its bound; a hang is logged and raised."""
        started = time.monotonic()
        with trio.move_on_after(self.bound) as scope:
            return await awaitable
        assert scope.cancelled_caught
        self.log("H", what, key, round(time.monotonic() - started, 3))
        raise Hang(f"{what} {key} took over {self.bound} s")

    async def ref(self, map_: store.Map[Any], key: str, create: bool = False) -> Any:
        """Enter ``map_.get(key)`` (or create) under the bound: the access and its exit."""
        access = map_.create(key) if create else map_.get(key)
        ref = await self.step("get", key, access.__aenter__())
        return access, ref

    # -- setup -----------------------------------------------------------------------------

    async def setup(self) -> dict[str, Any]:
        mine = [f"o{self.me}/{i}" for i in range(self.sizes["own"])]
        mine += [f"s/{i}" for i in range(self.sizes["shared"]) if i % 2 == self.me]
        multi = [f"t/{i}" for i in range(self.sizes["mw"]) if i % 2 == self.me]
        await self._create_all(self.cells, mine)
        await self._create_all(self.tallies, multi)
        await self._create_all(self.hits, [k.replace("t/", "h/") for k in multi])
        # The other member's half: wait until each exists (a locate moves nothing).
        others = [k for k in self.keys["cells"] if k.startswith("s/")]
        others += [k for k in self.keys["tallies"] + self.keys["hits"] if k[1] == "/"]
        with trio.fail_after(60):
            for key in others:
                map_ = self._map_of(key)
                while True:
                    try:
                        async with map_.get(key, readonly=map_ is self.cells):
                            break
                    except store.ObjectNotFound:
                        await trio.sleep(0.02)
        return {"setup": len(mine) + 2 * len(multi)}

    async def seed(self, count: int) -> dict[str, Any]:
        keys = [f"rt/{i}" for i in range(count)]
        await self._create_all(self.tallies, keys)
        await self._create_all(self.hits, [k.replace("rt/", "rh/") for k in keys])
        return {"seeded": 2 * count}

    async def _create_all(self, map_: store.Map[Any], keys: list[str]) -> None:
        async def some(part: list[str]) -> None:
            for key in part:
                with trio.fail_after(30):
                    async with map_.create(key):
                        pass

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(some, keys[i::8])

    def _map_of(self, key: str) -> store.Map[Any]:
        if key.startswith(("t/", "rt/")):
            return self.tallies
        if key.startswith(("h/", "rh/")):
            return self.hits
        return self.cells

    async def where(self) -> dict[str, Any]:
        """The holder of every multi-writer object (the test knows who holds the cells)."""
        out: dict[str, Any] = {}
        for key in self.keys["tallies"] + self.keys["hits"]:
            map_ = self._map_of(key)
            try:
                with trio.fail_after(self.bound):
                    async with map_.get(key) as ref:
                        out[f"{map_.name}:{key}"] = ref._owner
            except Exception as exc:
                out[f"{map_.name}:{key}"] = f"!{type(exc).__name__}"
        return out

    # -- the load --------------------------------------------------------------------------

    async def load(self, seed: int) -> None:
        async with trio.open_nursery() as nursery:
            for t in range(TASKS):
                nursery.start_soon(self._task, random.Random(seed * 100 + t))
            nursery.start_soon(self._flusher)

    async def _flusher(self) -> None:
        while not self.stop.is_set():
            with trio.move_on_after(FLUSH_EVERY):
                await self.stop.wait()
            if not self.stop.is_set():
                await self.flush()

    async def flush(self) -> str:
        """A flush (waiting ``request_timeout`` for each destination at most), logged."""
        self.flushes += 1
        n = self.flushes
        self.log("F", n, self.seq)
        try:
            await self.step("flush", "", self.space.flush(self.bound - MARGIN))
            result = "ok"
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"[:300]
        self.log("f", n, self.seq, result)
        return result

    def _pick(self, rng: random.Random, keys: list[str]) -> str | None:
        for _ in range(8):
            key = rng.choice(keys)
            if key not in self.lost:
                return key
        return None

    async def _task(self, rng: random.Random) -> None:
        own = [f"o{self.me}/{i}" for i in range(self.sizes["own"])]
        shared = [f"s/{i}" for i in range(self.sizes["shared"])]
        tallies, hits = self.keys["tallies"], self.keys["hits"]
        while not self.stop.is_set():
            choice = rng.random()
            if choice < 0.3:
                what, key = "own", self._pick(rng, own)
            elif choice < 0.5:
                what, key = "shared", self._pick(rng, shared)
            elif choice < 0.7:
                what, key = "add", self._pick(rng, tallies)
            elif choice < 0.85:
                what, key = "push", self._pick(rng, tallies)
            else:
                what, key = "hit", self._pick(rng, hits)
            if key is not None:
                try:
                    await self._op(what, key, rng.randrange(1, 4))
                except (Hang, store.StoreError) as exc:
                    self.log("E", what, key, f"{type(exc).__name__}: {exc}"[:300])
                    if isinstance(exc, store.ObjectNotFound):  # ObjectLost is one too
                        self.lost.add(key)
                        self.log("L", key)
                self.done += 1
            await trio.sleep(PAUSE)

    async def _op(self, what: str, key: str, n: int) -> None:
        log = self.log
        if what in ("own", "shared"):
            access, ref = await self.ref(self.cells, key)
            try:
                log("sw", key, await ref.apply(1))  # local: returns at once
            finally:
                await access.__aexit__(None, None, None)
        elif what == "add":
            access, ref = await self.ref(self.tallies, key)
            self.ops += 1
            op = f"{self.me}.{self.ops}"
            log("b", op, "tallies", key, n)
            try:
                total = await self.step("add", key, ref.add(n))
            except BaseException as exc:
                log("X", op, f"{type(exc).__name__}: {exc}"[:200])
                raise
            log("B", op, total)
            await access.__aexit__(None, None, None)
        elif what == "push":
            access, ref = await self.ref(self.tallies, key)
            await self.step("read", key, ref.read())  # finds a lost object out
            await ref.push(n)
            self.seq += 1
            log("u", self.seq, "tallies", key, n)
            await access.__aexit__(None, None, None)
        else:
            access, ref = await self.ref(self.hits, key)
            await self.step("value", key, ref.value())
            await ref.hit(n)
            self.seq += 1
            log("u", self.seq, "hits", key, n)
            await access.__aexit__(None, None, None)

    # -- the end ---------------------------------------------------------------------------

    def held(self) -> dict[str, Any]:
        """The value of every object of the suite held here."""
        out: dict[str, Any] = {}
        for map_name, keys in self.keys.items():
            map_ = self.cells if map_name == "cells" else self._map_of(keys[0])
            for key in keys:
                held = map_._held((map_name, key))
                if held is not None and not held.removed:
                    obj = held.obj
                    if map_name == "cells":
                        out[f"{map_name}:{key}"] = obj.value
                    else:
                        out[f"{map_name}:{key}"] = obj.read() if map_name == "tallies" else obj.n
        return out

    async def read(self, names: list[str]) -> dict[str, Any]:
        """What an access to each object finds: ``["got", value, holder]`` or ``["error",
        name]`` (a single-writer cell is located, not moved: ``["got", None, holder]``).
        Sixteen at a time, each under the bound."""
        out: dict[str, Any] = {}

        async def one(name: str) -> None:
            map_name, key = name.split(":", 1)
            map_ = self.cells if map_name == "cells" else self._map_of(key)
            try:
                with trio.fail_after(self.bound):
                    if map_name == "cells":
                        async with map_.get(key, readonly=True) as ref:
                            out[name] = ["got", None, ref._owner]
                        return
                    async with map_.get(key) as ref:
                        value = await (ref.read() if map_name == "tallies" else ref.value())
                        out[name] = ["got", value, ref._owner]
            except trio.TooSlowError:
                out[name] = ["error", "hang"]
            except Exception as exc:
                out[name] = ["error", type(exc).__name__]

        async def some(part: list[str]) -> None:
            for name in part:
                await one(name)

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(some, names[i::16])
        return out


async def commands(worker: Worker, space: store.Space) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    async with trio.open_nursery() as nursery:
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                nursery.cancel_scope.cancel()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                words = line.decode().split(maxsplit=1)
                if not words:
                    continue
                answer = await command(worker, nursery, words[0], words[1:])
                # (in a thread: the test may read a large answer late; the node serves on)
                await trio.to_thread.run_sync(partial(print, json.dumps(answer), flush=True))


async def command(
    worker: Worker, nursery: trio.Nursery, verb: str, rest: list[str]
) -> dict[str, Any]:
    if verb == "setup":
        return await worker.setup()
    if verb == "seed":
        return await worker.seed(int(rest[0]))
    if verb == "where":
        return await worker.where()
    if verb == "go":
        worker.running = trio.Event()
        worker.stop = trio.Event()
        done = worker.running

        async def run() -> None:
            await worker.load(int(rest[0]))
            done.set()

        nursery.start_soon(run)
        return {"go": True}
    if verb == "stop":
        worker.stop.set()
        with trio.move_on_after(3 * worker.bound) as scope:
            await worker.running.wait()
        if scope.cancelled_caught:
            return {"stopped": False}
        flush = await worker.flush()
        errors = worker.space.statistics().errors
        return {"stopped": True, "flush": flush, "done": worker.done, "errors": errors}
    if verb == "held":
        return worker.held()
    if verb == "read":
        return await worker.read(json.loads(rest[0]))
    if verb == "forget":
        keys = json.loads(rest[0])
        worker.lost.update(keys)
        return {"forgot": len(keys)}
    if verb == "stats":
        stats = worker.space.statistics()
        return {"done": worker.done, "errors": stats.errors, "epoch": stats.epoch}
    return {"error": f"unknown command {verb!r}"}


async def main(args: argparse.Namespace) -> None:
    secret = read_secret(args.secret_file, "fault_member")
    options: dict[str, Any] = {"request_timeout": args.request_timeout}
    if args.drain_rate:
        options["drain_rate"] = args.drain_rate
    async with store.open_space(
        controller=args.controller, listen=args.listen, secret=secret, **options
    ) as space:
        worker = Worker(space, args)
        space.node.core.objects.trace = Trace(worker.log)
        print(f"member {space.name}", flush=True)
        await commands(worker, space)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--controller", required=True)
    parser.add_argument("--secret-file")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--request-timeout", type=float, default=5.0)
    parser.add_argument("--drain-rate", type=int, default=0)
    parser.add_argument("--own", type=int, default=200)
    parser.add_argument("--shared", type=int, default=40)
    parser.add_argument("--mw", type=int, default=20)
    parser.add_argument("--remote", type=int, default=20)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse())
