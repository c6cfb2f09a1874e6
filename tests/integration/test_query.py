"""Control-plane queries relayed by the controller (``python -m nf query``): they reach a
member running the named NF, answer from its state, start no scaling event, and a failing
query is one error line while every process keeps serving."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import store
from store.shell.controller import open_controller


class Tally(store.MultiWriter):
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> int:
        self.n += k
        return self.n


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "nf.query", *args]
    return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)


async def test_a_query_reaches_the_instance_running_its_nf_without_an_event(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(os.urandom(16).hex().encode())
    secret = secret_file.read_bytes()
    asked: list[tuple[str, dict[str, Any]]] = []

    def handler_for(label: str, space: list[store.Space]) -> Any:
        async def query(name: str, args: dict[str, Any]) -> Any:
            asked.append((label, args))
            if name == "boom":
                raise KeyError("no query 'boom' (known: lines, tally)")
            if name == "lines":
                return [f"{label} line {i}" for i in range(int(args.get("n", 2)))]
            async with space[0].map("tallies", Tally).get("t") as ref:
                return {"nf": label, "tally": await ref.add(0)}

        return query

    with trio.fail_after(60):
        async with open_controller(secret=secret) as ctl:
            spaces: dict[str, list[store.Space]] = {"prads": [], "ids": []}
            async with (
                store.open_space(
                    ctl.address,
                    secret=secret,
                    labels={"nf": "prads", "data": "127.0.0.1:1"},
                    query=handler_for("prads", spaces["prads"]),
                ) as a,
                store.open_space(
                    ctl.address,
                    secret=secret,
                    labels={"nf": "ids"},
                    query=handler_for("ids", spaces["ids"]),
                ) as b,
            ):
                spaces["prads"].append(a)
                spaces["ids"].append(b)
                async with a.map("tallies", Tally).create("t") as ref:
                    await ref.add(5)
                await ctl.wait_until(lambda bar: len(bar.ring) == 2)
                epoch = ctl.status().epoch
                common = ["--controller", ctl.address, "--secret-file", str(secret_file)]

                done = await run_cli(*common, "prads", "tally")
                assert done.returncode == 0, done.stderr
                assert b'"tally": 5' in done.stdout and b'"nf": "prads"' in done.stdout
                assert b"answered by" in done.stderr

                done = await run_cli(*common, "ids", "lines", "n=3")
                assert done.returncode == 0, done.stderr
                assert done.stdout.decode().splitlines() == [f"ids line {i}" for i in range(3)]
                assert ("ids", {"n": 3}) in asked

                done = await run_cli(*common, "prads", "boom")
                assert done.returncode == 1
                err = done.stderr.decode().strip().splitlines()
                assert len(err) == 1 and "KeyError" in err[0] and "boom" in err[0], err

                done = await run_cli(*common, "nat", "table")
                assert done.returncode == 1 and b"no member answers nat" in done.stderr

                done = await run_cli(*common, "prads", "lines", "novalue")
                assert done.returncode == 2 and b"KEY=VALUE" in done.stderr

                # Everyone kept serving, and no query started a scaling event.
                status = await ctl.collect_status()
                assert status.epoch == epoch and status.stage == "normal"
                assert status.figures[a.name]["nf"] == "prads"
                assert status.figures[b.name]["nf"] == "ids"
                assert a.owner_of("tallies", "t") in (a.name, b.name)
                assert a.members() == sorted([a.name, b.name]) == b.members()


async def test_a_leaving_member_hears_every_goodbye_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A member that left says goodbye to the others and waits for each answer before it
    stops (what it forwarded must have arrived).  The others no longer dial a node outside
    the ring, so they answer on its own link; before, the answer was dropped and every
    leave waited out the farewell timeout with a warning."""
    secret = os.urandom(16).hex().encode()
    with trio.fail_after(60):
        async with open_controller(secret=secret) as ctl:
            async with store.open_space(ctl.address, secret=secret) as a:
                async with store.open_space(ctl.address, secret=secret):
                    # (nothing sent from a to b: a has no link of its own to b)
                    await ctl.wait_until(lambda bar: len(bar.ring) == 2)
                assert len(ctl.barrier.ring) == 1
                errors = a.statistics().errors
                assert not any(name.startswith("sent-to-departed") for name in errors), errors
                assert "no goodbye answer" not in caplog.text


class _HeldInScaling:
    """A member whose drain waits for ``release``: its scale-out stays in SCALING."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.scaling = trio.Event()

    async def on_pre_scaling(self, membership: Any) -> None:
        pass

    async def on_scaling(self, membership: Any) -> None:
        self.scaling.set()
        await self.release.wait()
        await membership.report_drained()

    async def on_normal(self, membership: Any) -> None:
        pass

    async def on_abort(self, membership: Any) -> None:
        pass

    async def on_leave(self, membership: Any) -> None:
        pass

    async def on_repair(self, membership: Any) -> None:
        pass


async def test_a_query_during_a_scaling_event_waits_for_normal() -> None:
    """The controller relays a query once the cluster is NORMAL: asked while a scale-out is
    in SCALING, it is answered when the event ends, on the event's new epoch."""
    from store.cli.ctl import controller_link, request_query
    from store.shell.membership import join_cluster

    secret = os.urandom(16).hex().encode()

    async def query(name: str, args: dict[str, Any]) -> Any:
        return ["an answer"]

    with trio.fail_after(60):
        async with open_controller(secret=secret) as ctl:
            async with store.open_space(
                ctl.address, secret=secret, labels={"nf": "prads"}, query=query
            ):
                held = _HeldInScaling()
                async with trio.open_nursery() as nursery:

                    async def joiner() -> None:
                        async with join_cluster(
                            ctl.address,
                            name="127.0.0.1:9",
                            address="127.0.0.1:9",
                            secret=secret,
                            handler=held,
                        ):
                            pass

                    nursery.start_soon(joiner)
                    await held.scaling.wait()  # the scale-out is in SCALING now
                    answers: list[Any] = []
                    answered = trio.Event()

                    async def ask() -> None:
                        async with controller_link(ctl.address, secret, 5.0, "test") as peer:
                            answers.append(await request_query(peer, "prads", "x", {}))
                        answered.set()

                    nursery.start_soon(ask)
                    with trio.move_on_after(1.0):
                        await answered.wait()
                    assert not answers, "answered while the event was still running"
                    held.release.set()
                    await answered.wait()
                    (answer,) = answers
                    assert answer.ok and answer.value == ["an answer"]
                    # answered on the scale-out's epoch, the joiner in the ring: after NORMAL
                    assert answer.epoch == ctl.barrier.ring.epoch and len(ctl.barrier.ring) == 2
                    nursery.cancel_scope.cancel()


async def test_a_query_right_after_a_controller_restart_waits_for_the_members(
    tmp_path: Path,
) -> None:
    """A restarted controller knows no member until they reconnect (every half second):
    a query that comes meanwhile waits for them, rather than answering that nobody runs
    the NF."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(os.urandom(16).hex().encode())
    secret = secret_file.read_bytes()

    async def query(name: str, args: dict[str, Any]) -> Any:
        return {"asked": name}

    with trio.fail_after(60):
        first = trio.CancelScope()
        listening: list[str] = []
        async with trio.open_nursery() as nursery:

            async def controller(scope: trio.CancelScope, address: str) -> None:
                with scope:
                    async with open_controller(listen=address, secret=secret) as ctl:
                        listening.append(ctl.address)
                        await trio.sleep_forever()

            nursery.start_soon(controller, first, "127.0.0.1:0")
            while not listening:
                await trio.sleep(0.01)
            address = listening[0]
            async with store.open_space(
                address, secret=secret, labels={"nf": "prads"}, query=query
            ):
                first.cancel()  # the controller goes away...
                second = trio.CancelScope()
                nursery.start_soon(controller, second, address)  # ...and comes back
                while len(listening) < 2:
                    await trio.sleep(0.01)
                common = ["--controller", address, "--secret-file", str(secret_file)]
                done = await run_cli(*common, "prads", "stats")
                assert done.returncode == 0, done.stderr
                assert b'"asked": "stats"' in done.stdout
                second.cancel()
