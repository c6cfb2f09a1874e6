"""The abort path under live object traffic, over real loopback connections.

Two embedded members update SingleWriter and MultiWriter objects continuously.  A third
registrant joins whose membership handler never acknowledges PRE_SCALING, so its admission
event aborts at the controller's pre-scaling timeout.  What the issue asks of that path:

* the abort is visible with its reason (the controller's state and ``ctl status``), and the
  event's epoch is burnt;
* the cluster keeps serving on the old epoch: no operation fails, before, during or after
  the aborted event;
* a later scale-out (a fresh, well-behaved member) succeeds, on a fresh epoch;
* after a flush every object equals the model of the updates issued (nothing lost or
  doubled by the aborted event), and the SingleWriter grant chain of every member is one
  chain per object.

Progress is awaited as a number of completed operations, and stages as controller or member
state, each under a deadline: nothing here passes because a sleep was long enough.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections import Counter
from pathlib import Path

import trio

import store
from ring.ownership import Stage
from store.core.barrier import check_transitions
from store.shell.controller import Controller, open_controller
from store.shell.membership import Membership, join_cluster
from tests.integration.grant_chain import Entry, check_grant_chain
from tests.integration.objects import Cell, Hits, Tally

ROOT = Path(__file__).resolve().parents[2]
SW, MW = 200, 20
PRE_SCALING_TIMEOUT = 1.5
TASKS_PER_MEMBER = 4


class Load:
    """Updates from several tasks: what was issued (the model), what failed, and a way to
    wait until some number of further operations have completed."""

    def __init__(self) -> None:
        self.issued: Counter[str] = Counter()
        self.failures: list[str] = []
        self.done = 0
        self.stop = trio.Event()
        self.running = 0
        #: Set once ``stop`` is set and every task has returned (its last update answered).
        self.stopped = trio.Event()
        self._waiters: list[tuple[int, trio.Event]] = []

    def _completed(self) -> None:
        self.done += 1
        for waiter in [w for w in self._waiters if self.done >= w[0]]:
            waiter[1].set()
            self._waiters.remove(waiter)

    async def progress(self, n: int) -> None:
        """Return once ``n`` more operations have completed (put it under a deadline)."""
        event = trio.Event()
        self._waiters.append((self.done + n, event))
        await event.wait()

    async def run(self, space: store.Space, seed: int) -> None:
        rng = random.Random(seed)
        self.running += 1
        try:
            await self._updates(space, rng)
        finally:
            self.running -= 1
            if not self.running and self.stop.is_set():
                self.stopped.set()

    async def _updates(self, space: store.Space, rng: random.Random) -> None:
        cells, tallies, hits = (
            space.map("cells", Cell),
            space.map("tallies", Tally),
            space.map("hits", Hits),
        )
        while not self.stop.is_set():
            choice = rng.random()
            try:
                with trio.fail_after(10):
                    if choice < 0.6:
                        key = rng.randrange(SW)
                        async with cells.get(key) as ref:
                            await ref.apply(1)
                        self.issued[f"cells/{key}"] += 1
                    elif choice < 0.8:
                        key = rng.randrange(MW)
                        async with tallies.get(key) as ref:
                            await ref.read()  # a blocking call
                            await ref.add(space.name, 1)  # untethered, shipped
                        self.issued[f"tallies/{key}"] += 1
                    else:
                        key = rng.randrange(MW)
                        async with hits.get(key) as ref:
                            await ref.hit(2)  # untethered into the merged replica
                        self.issued[f"hits/{key}"] += 2
            except Exception as exc:  # every failure is reported, none hidden
                self.failures.append(f"{space.name} {choice:.2f}: {type(exc).__name__}: {exc}")
            self._completed()
            await trio.sleep(0)  # other members in this process get their turn


class NeverAcknowledges:
    """A registrant whose ``on_pre_scaling`` never returns: the member that does not
    acknowledge PRE_SCALING (nothing else of it matters: it is never admitted)."""

    def __init__(self) -> None:
        self.pre_scaling = trio.Event()

    async def on_pre_scaling(self, membership: Membership) -> None:
        self.pre_scaling.set()
        await trio.sleep_forever()

    async def on_scaling(self, membership: Membership) -> None:
        raise AssertionError("an aborted event never reaches SCALING")

    async def on_normal(self, membership: Membership) -> None:
        raise AssertionError("the stuck registrant is never admitted")

    async def on_abort(self, membership: Membership) -> None:
        pass  # never runs: its callbacks queue behind the stuck one

    async def on_leave(self, membership: Membership) -> None:
        pass


def closed_port() -> int:
    """A loopback port nobody listens on: the stuck registrant's address.  No member ever
    connects to it, because during PRE_SCALING nothing is sent to a joiner (rule P3)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ctl_status(address: str, secret_file: Path) -> str:
    """What ``python -m store.ctl status`` prints, run as an operator would."""
    command = ["-m", "store.ctl", "--controller", address, "--secret-file", str(secret_file)]
    result = await trio.run_process(
        [sys.executable, *command, "status"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr.decode()
    return " ".join(result.stdout.decode().split())  # rich wraps long lines


async def wait_for_stage(space: store.Space, stage: Stage, epoch: int) -> None:
    """Wait until ``space``'s node acts by ``stage`` of ``epoch`` (under a deadline)."""
    while (space.node.view.stage, space.node.view.epoch) != (stage, epoch):
        await trio.sleep(0.005)


async def test_an_aborted_event_under_load_keeps_serving_and_a_later_scale_out_succeeds(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(os.urandom(16).hex().encode())
    secret = secret_file.read_bytes()
    load = Load()
    traces: list[list[Entry]] = [[], [], []]
    with trio.fail_after(60):
        async with open_controller(secret=secret, pre_scaling_timeout=PRE_SCALING_TIMEOUT) as ctl:
            async with (
                store.open_space(controller=ctl.address, secret=secret) as a,
                store.open_space(controller=ctl.address, secret=secret) as b,
            ):
                a.node.core.objects.trace, b.node.core.objects.trace = traces[0], traces[1]
                while len(a.node.members()) < 2 or len(b.node.members()) < 2:
                    await trio.sleep(0.005)
                for i in range(SW):
                    async with a.map("cells", Cell).create(i):
                        pass
                for i in range(MW):
                    async with a.map("tallies", Tally).create(i):
                        pass
                    async with b.map("hits", Hits).create(i):
                        pass
                async with trio.open_nursery() as traffic:
                    for i in range(TASKS_PER_MEMBER):
                        traffic.start_soon(load.run, a, i)
                        traffic.start_soon(load.run, b, 100 + i)
                    await load.progress(300)
                    burnt = await abort_an_event(ctl, secret, secret_file, load, a, b)

                    # A later scale-out: a fresh, well-behaved member, on a fresh epoch.
                    async with store.open_space(controller=ctl.address, secret=secret) as c:
                        c.node.core.objects.trace = traces[2]
                        # c is NORMAL; the controller finishes once every ack is in.
                        await ctl.wait_until(lambda barrier: barrier.event is None)
                        assert ctl.barrier.epoch == burnt + 1, ctl.barrier.last_abort
                        assert ctl.barrier.ring.nodes == {a.name, b.name, c.name}
                        for space in (a, b):
                            await wait_for_stage(space, Stage.NORMAL, burnt + 1)
                        for i in range(TASKS_PER_MEMBER):
                            traffic.start_soon(load.run, c, 200 + i)
                        await load.progress(300)
                        load.stop.set()
                        await load.stopped.wait()
                        for space in (a, b, c):
                            await space.flush()
                        seen = await values(a)
            assert check_transitions(ctl.log) == []

    assert load.failures == [], load.failures[:5]
    expected = {f"cells/{i}": load.issued[f"cells/{i}"] for i in range(SW)}
    expected |= {
        f"{m}/{i}": load.issued[f"{m}/{i}"] for m in ("tallies", "hits") for i in range(MW)
    }
    wrong = {k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v}
    assert not wrong, f"{len(wrong)} objects differ from the model, e.g. {list(wrong.items())[:5]}"
    # The members leaving at the end evacuated their objects: that is in the chain too.
    assert check_grant_chain(traces, gapless=True) == []
    grants = sum(event == "grant" for trace in traces for event, *_ in trace)
    assert grants > SW, "no SingleWriter object ever moved: the chain means little"


async def abort_an_event(
    ctl: Controller,
    secret: bytes,
    secret_file: Path,
    load: Load,
    *members: store.Space,
) -> int:
    """Register the stuck node, see its admission event abort while the load runs, and
    check that the cluster serves on the old epoch; returns the burnt epoch."""
    old_epoch = ctl.barrier.epoch
    stuck = NeverAcknowledges()
    async with trio.open_nursery() as registrant:

        async def register() -> None:
            async with join_cluster(
                ctl.address,
                name="stuck",
                address=f"127.0.0.1:{closed_port()}",
                secret=secret,
                handler=stuck,
            ):
                raise AssertionError("the stuck registrant was admitted")

        registrant.start_soon(register)
        await stuck.pre_scaling.wait()
        event = ctl.barrier.event
        assert event is not None and event.added == {"stuck"}
        burnt = event.epoch
        before = load.done
        await ctl.wait_until(lambda barrier: barrier.event is None)
        assert load.done > before, "no operation completed while the event ran"
        reason = f"stuck did not acknowledge pre-scaling within {PRE_SCALING_TIMEOUT:g} s"
        assert reason in ctl.barrier.last_abort
        assert f"epoch {burnt} is burnt" in ctl.barrier.last_abort
        assert burnt in ctl.barrier.burnt and ctl.barrier.epoch == old_epoch
        assert "stuck" not in ctl.barrier.ring.nodes
        for space in members:  # back to NORMAL on the old ring
            await wait_for_stage(space, Stage.NORMAL, old_epoch)
        status = await ctl_status(ctl.address, secret_file)
        assert f"last abort: scale-out to epoch {burnt} aborted: {reason}" in status, status
        assert f"epoch {old_epoch} (highest used {burnt})" in status, status
        await load.progress(300)  # serving on the old epoch
        registrant.cancel_scope.cancel()
    return burnt


async def values(space: store.Space) -> dict[str, int]:
    """Every object's value, read through ``space``."""
    seen: dict[str, int] = {}
    cells, tallies, hits = (
        space.map("cells", Cell),
        space.map("tallies", Tally),
        space.map("hits", Hits),
    )
    for key in range(SW):
        async with cells.get(key) as ref:
            seen[f"cells/{key}"] = await ref.read()
    for key in range(MW):
        async with tallies.get(key) as t:
            seen[f"tallies/{key}"] = await t.read()
        async with hits.get(key) as h:
            seen[f"hits/{key}"] = await h.value()
    return seen
