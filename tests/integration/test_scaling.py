"""Scaling under live load with real processes: a controller, three members updating 10,000
objects of both kinds continuously, a scale-out 3 -> 4 and a scale-in 4 -> 2 while they run.

After the members flush, every object's state must equal a model of every update issued
(untethered ones and merged replicas included: nothing lost, nothing counted twice), no
request may have failed, and the controller's log must show epochs and stages moving only
in the order the barrier allows.  Every process records its SingleWriter grants and
releases, and merged they must form one chain per object (``grant_chain``): never two
writable references to one SingleWriter, across migrations and evacuations alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

import store
from store.core.barrier import check_transitions
from store.shell.controller import open_controller
from tests.integration.grant_chain import Entry, check_grant_chain, read_trace
from tests.integration.objects import Cell, Hits, Tally

ROOT = Path(__file__).resolve().parents[2]
SW, MW, WORKERS = 9_800, 100, 3


class Child:
    """A child process with line-based stdin/stdout."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, nursery: trio.Nursery, *args: str) -> Child:
        process = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                check=False,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                task_status=task_status,
            )
        )
        return cls(process)

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"{self.process.args!r} exited ({self.process.returncode})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    async def say(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")


async def values(space: store.Space) -> AsyncIterator[tuple[str, Any]]:
    async for key, cell in space.map("cells", Cell).items():
        yield f"cells/{key}", cell.value
    tallies, hits = space.map("tallies", Tally), space.map("hits", Hits)
    for key in range(MW):
        async with tallies.get(key) as ref:
            yield f"tallies/{key}", await ref.read()
        async with hits.get(key) as ref:
            yield f"hits/{key}", await ref.value()


async def test_scale_out_and_in_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(os.urandom(16).hex().encode())
    secret = secret_file.read_bytes()
    reports: list[dict[str, Any]] = []
    checker_trace: list[Entry] = []
    with trio.fail_after(240):
        async with open_controller(secret=secret) as ctl, trio.open_nursery() as nursery:
            common = ["--controller", ctl.address, "--secret-file", str(secret_file)]
            workers = [
                await Child.start(
                    nursery,
                    "-m",
                    "tests.integration.scale_worker",
                    *common,
                    "--id",
                    str(i),
                    "--workers",
                    str(WORKERS),
                    "--members",
                    str(WORKERS),
                    "--sw",
                    str(SW),
                    "--mw",
                    str(MW),
                    "--trace",
                    str(tmp_path / f"trace-{i}.jsonl"),
                )
                for i in range(WORKERS)
            ]
            names = [(await w.line()).split()[1] for w in workers]
            for w in workers:
                await w.say("go")
            await trio.sleep(1.0)  # load before the events (timing is not what is checked)

            # Scale-out 3 -> 4: a node process joins and is admitted automatically.
            node = await Child.start(
                nursery,
                "-m",
                "store.node",
                *common,
                "--trace-grants",
                str(tmp_path / "trace-node.jsonl"),
            )
            node_name = (await node.line()).split()[1]
            await trio.sleep(1.0)

            # Scale-in 4 -> 2: a worker leaves its space (a graceful scale-in of itself,
            # objects and all), then the operator scales the node in.
            leaving = workers.pop()
            await leaving.say("stop")
            reports.append(json.loads(await leaving.line()))
            await leaving.say("leave")
            assert await leaving.line() == "left"
            result = await ctl.scale_in([node_name])
            assert result.summary.get("members") == 2, result.text
            assert await node.process.wait() == 0  # it has left; its trace is written
            await trio.sleep(0.5)

            for w in workers:
                await w.say("stop")
            reports.extend([json.loads(await w.line()) for w in workers])

            # Check every object from a fresh member (its admission is one more event).
            async with store.open_space(controller=ctl.address, secret=secret) as checker:
                checker.node.core.objects.trace = checker_trace  # it receives objects by reading
                seen = {key: value async for key, value in values(checker)}
                for w in workers:
                    await w.say("leave")
                for w in workers:
                    assert await w.line() == "left"
            nursery.cancel_scope.cancel()

    traces = [read_trace(path) for path in sorted(tmp_path.glob("trace-*.jsonl"))]
    assert len(traces) == WORKERS + 1
    traces.append(checker_trace)
    assert check_grant_chain(traces, gapless=True) == []
    grants = Counter((m, key) for t in traces for e, m, key, _, _ in t if e == "grant")
    assert set(grants) == {("cells", i) for i in range(SW)}  # each created, hence traced
    moved = sum(grants.values()) - SW
    assert moved > 1000, f"only {moved} SingleWriter migrations: the chain means little"

    failures = [f for r in reports for f in r["failures"]]
    assert failures == [], failures[:5]
    issued: Counter[str] = Counter()
    for report in reports:
        issued.update(report["issued"])
    expected = {f"cells/{i}": issued[f"cells/{i}"] for i in range(SW)}
    expected |= {
        f"{kind}/{i}": issued[f"{kind}/{i}"] for kind in ("tallies", "hits") for i in range(MW)
    }
    wrong = {k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v}
    assert not wrong, f"{len(wrong)} objects differ from the model, e.g. {list(wrong.items())[:5]}"
    assert sum(issued.values()) > 1000, "too little load to mean anything"
    assert check_transitions(ctl.log) == []
    assert names[-1] in {t.member for t in ctl.log if t.what == "left"}
