"""A member process for the containment tests: it joins, keeps working, and reports.

``python -m tests.integration.member --controller ADDR [--secret-file F]``

Prints ``member NAME`` once admitted, then keeps updating SingleWriter objects that this
member created (held here: each update is local) every few milliseconds.  On ``stats`` on
stdin it prints one JSON line with how many updates it made and the node's error counts;
on ``ops N KEYS`` it runs N creates-and-updates over KEYS keys anywhere in the ring, each
bounded by a deadline, and prints a JSON line counting the successes and the failures by
exception type (a dead key owner must give failures, never a hang); on ``read PREFIX N`` it
takes the keys ``PREFIX/0`` .. ``PREFIX/N-1`` (another member's) and prints their values.
It never leaves on its own: the test kills it, or closes stdin to end it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import trio

import store
from store.cli.common import read_secret


class Cell(store.SingleWriter):
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> int:
        self.n += k
        return self.n


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--controller", required=True)
    parser.add_argument("--secret-file")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    args = parser.parse_args()
    secret = read_secret(args.secret_file, "member")
    async with store.open_space(
        controller=args.controller, secret=secret, request_timeout=args.request_timeout
    ) as space:
        cells = space.map("cells", Cell)
        print(f"member {space.name}", flush=True)
        updates = 0
        mine: list[Any] = []

        async def work() -> None:
            nonlocal updates
            # Keys this member made itself: they stay here, every update is local.
            for i in range(20):
                key = f"{space.name}/{i}"
                try:  # (its key owner may be a node the test kills)
                    with trio.move_on_after(5):
                        async with cells.create(key) as ref:
                            await ref.add(1)
                            mine.append(key)
                except store.StoreError:
                    continue
            while True:
                for key in mine:
                    async with cells.get(key) as ref:
                        await ref.add(1)
                        updates += 1
                await trio.sleep(0.005)

        async def commands() -> None:
            stdin = trio.lowlevel.FdStream(0)
            buffer = b""
            while True:
                chunk = await stdin.receive_some()
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    words = line.decode().split()
                    if words[:1] == ["stats"]:
                        errors = space.statistics().errors
                        print(json.dumps({"updates": updates, "errors": errors}), flush=True)
                    elif words[:1] == ["ops"]:
                        outcome = await ops(cells, int(words[1]), int(words[2]))
                        print(json.dumps(outcome), flush=True)
                    elif words[:1] == ["read"]:
                        values = await read(cells, words[1], int(words[2]))
                        print(json.dumps(values), flush=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            nursery.start_soon(commands)


async def read(cells: Any, prefix: str, count: int) -> dict[str, Any]:
    """The values of another member's keys ``PREFIX/0`` .. ``PREFIX/N-1`` (taking each
    here), or the name of the exception a get raised."""
    values: dict[str, Any] = {}
    for i in range(count):
        key = f"{prefix}/{i}"
        try:
            with trio.fail_after(10):
                async with cells.get(key) as ref:
                    values[key] = await ref.add(0)
        except Exception as exc:
            values[key] = type(exc).__name__
    return values


async def ops(cells: Any, count: int, keys: int) -> dict[str, Any]:
    results: Counter[str] = Counter()
    for i in range(count):
        try:
            with trio.fail_after(10):
                async with cells.create(f"shared/{i % keys}") as ref:
                    await ref.add(1)
            results["ok"] += 1
        except trio.TooSlowError:
            results["hang"] += 1
        except Exception as exc:
            results[type(exc).__name__] += 1
    return dict(results)


if __name__ == "__main__":
    trio.run(main)
