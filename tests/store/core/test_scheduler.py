"""Microthreads: the pure scheduler (store.core.scheduler) and its trio glue.

The core tests are plain synchronous functions on purpose: they show that a unit whose state
is local, and the whole park/resolve/resume cycle, need no trio at all.  The trio tests
cover what the shell adds: Waits awaited by ordinary tasks, backpressure and the driver.
Every scheduler is checked with ``_check()`` after the interesting steps.
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Generator
from typing import Any, Generic, TypeVar, cast

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.core.scheduler import (
    InvalidWaitState,
    Scheduler,
    SchedulerFull,
    Unit,
    UnitNotFinished,
    Wait,
    set_blocking_hook,
)
from store.shell.microthreads import Microthreads, open_microthreads
from store.wire.errors import NotAStoreOperation

T = TypeVar("T")


class Op(Generic[T]):
    """A stand-in for a store operation that follows the await protocol: local ones return
    from ``__await__`` without yielding, remote ones delegate to a Wait."""

    def __init__(self, value: T | None = None, wait: Wait[T] | None = None) -> None:
        self.value = value
        self.wait = wait

    def __await__(self) -> Generator[Any, Any, T]:
        if self.wait is None:
            return cast(T, self.value)
        return (yield from self.wait.__await__())


@types.coroutine
def bare_yield() -> Generator[None, None, None]:
    """What an asyncio-style ``await asyncio.sleep(0)`` yields: a bare None."""
    yield


# ---------------------------------------------------------------------------------------
# The pure core, no trio


def test_local_unit_completes_inline_without_parking() -> None:
    s = Scheduler()
    seen: list[int] = []

    async def nf(x: int) -> int:
        a = await Op(10)
        b = await Op(20)
        seen.append(x)
        return a + b + x

    previous = set_blocking_hook(None)  # any attempt to block would now raise
    try:
        unit = s.submit_nowait("f", nf, 1)
    finally:
        set_blocking_hook(previous)
    assert unit.done() and not unit.failed()
    assert unit.result() == 31 and seen == [1]
    assert unit.state == "done" and unit.exception() is None
    # An inline unit is built without __init__: every accessor must still work on it.
    assert unit.waiting_for is None and "done" in repr(unit)
    seen_done: list[Unit[int]] = []
    unit.add_done_callback(seen_done.append)
    unit.remove_done_callback(seen_done.append)
    assert seen_done == [unit]
    stats = s.statistics()
    assert (stats.units_run, stats.completed_inline, stats.completed) == (1, 1, 1)
    assert (stats.parked, stats.ready, stats.queued, stats.in_flight) == (0, 0, 0, 0)
    s._check()


def test_parks_on_wait_and_resumes_only_from_run_ready() -> None:
    s = Scheduler()
    wait: Wait[str] = Wait("k")

    async def nf() -> str:
        value = await Op(wait=wait)
        return value + "!"

    unit = s.submit_nowait("f", nf)
    assert not unit.done() and unit.state == "parked" and unit.waiting_for is wait
    with pytest.raises(UnitNotFinished):
        unit.result()
    assert s.statistics().parked == 1
    s._check()

    wait.resolve("v")  # only marks it ready: nothing is stepped inside resolve
    assert unit.state == "ready" and not unit.done()
    stats = s.statistics()
    assert (stats.parked, stats.ready) == (0, 1)
    s._check()

    assert s.run_ready() == 1
    assert unit.result() == "v!"
    stats = s.statistics()
    assert (stats.completed, stats.completed_inline, stats.in_flight) == (1, 0, 0)
    assert stats.max_parked == 1
    s._check()


def test_failed_wait_is_raised_at_the_await() -> None:
    s = Scheduler()
    wait: Wait[int] = Wait("k")

    async def nf() -> str:
        try:
            await wait
        except KeyError as exc:
            return f"caught {exc}"
        return "not reached"

    unit = s.submit_nowait("f", nf)
    wait.fail(KeyError("gone"))
    s.run_ready()
    assert unit.result() == "caught 'gone'"


def test_flow_order_while_other_flows_complete_inline() -> None:
    """§4.3: a flow waiting for remote state holds up only itself."""
    s = Scheduler()
    log: list[tuple[str, int]] = []
    wait: Wait[int] = Wait("remote state of A")

    async def nf(flow: str, i: int, remote: bool) -> int:
        log.append((flow, i))  # the first line: shows whether the unit has started
        if remote:
            await Op(wait=wait)
        else:
            await Op(0)
        log.append((flow, -i))
        return i

    a1 = s.submit_nowait("A", nf, "A", 1, True)
    a2 = s.submit_nowait("A", nf, "A", 2, False)  # would complete inline, but must queue
    a3 = s.submit_nowait("A", nf, "A", 3, False)
    b = [s.submit_nowait("B", nf, "B", i, False) for i in range(1, 4)]
    assert all(u.done() for u in b), "flow B must not wait for flow A"
    assert a2.state == a3.state == "queued"
    assert ("A", 2) not in log and ("A", 3) not in log, "queued units must not start"
    stats = s.statistics()
    assert (stats.parked, stats.queued, stats.completed_inline) == (1, 2, 3)
    s._check()

    wait.resolve(0)
    assert s.run_ready() == 3  # a1 resumes, then a2 and a3 start in order
    a_log = [entry for entry in log if entry[0] == "A"]
    assert a_log == [("A", 1), ("A", -1), ("A", 2), ("A", -2), ("A", 3), ("A", -3)]
    assert [u.result() for u in (a1, a2, a3)] == [1, 2, 3]
    s._check()
    # With the flow idle again, its next unit runs inline.
    assert s.submit_nowait("A", nf, "A", 4, False).done()


def test_longest_waiting_ready_unit_runs_first() -> None:
    s = Scheduler()
    order: list[str] = []
    waits = {name: Wait[None](name) for name in "xyz"}

    async def nf(name: str) -> None:
        await waits[name]
        order.append(name)

    for name in "xyz":  # parked in the order x, y, z
        s.submit_nowait(name, nf, name)
    for name in "zyx":  # resolved in the opposite order
        waits[name].resolve(None)
    s.run_ready()
    assert order == ["x", "y", "z"]


def test_a_successor_runs_at_once_only_when_it_waited_longest() -> None:
    """A finished unit's queued successor is stepped next only when no ready unit
    arrived before it; otherwise the longer-waiting ones go first, as through the heap."""
    s = Scheduler()
    order: list[str] = []
    waits = {name: Wait[None](name) for name in ("x1", "y1")}

    async def nf(name: str) -> None:
        order.append(name + " starts")
        if name in waits:
            await waits[name]
        order.append(name)

    s.submit_nowait("X", nf, "x1")  # parks, arrival 1
    s.submit_nowait("Y", nf, "y1")  # parks, arrival 2
    s.submit_nowait("X", nf, "x2")  # queued behind x1, arrival 3
    s.submit_nowait("X", nf, "x3")  # arrival 4
    waits["y1"].resolve(None)
    waits["x1"].resolve(None)
    assert s.run_ready() == 4
    assert [o for o in order if "starts" not in o] == ["x1", "y1", "x2", "x3"]
    s._check()

    # Its successor waited longest: stepped straight after it; with max_units reached it
    # is left ready instead.
    order.clear()
    w: Wait[None] = Wait("w")
    waits["x4"] = w
    s.submit_nowait("X", nf, "x4")
    s.submit_nowait("X", nf, "x5")
    w.resolve(None)
    assert s.run_ready(max_units=1) == 1
    assert order == ["x4 starts", "x4"]
    assert s.has_ready() and s.statistics().ready == 1
    s._check()
    assert s.run_ready() == 1
    assert order[-2:] == ["x5 starts", "x5"]
    s._check()


def test_a_queued_unit_makes_its_coroutine_when_it_starts() -> None:
    s = Scheduler()
    made: list[int] = []
    wait: Wait[None] = Wait("w")

    async def body(i: int) -> int:
        if i == 1:
            await wait
        return i

    def nf(i: int) -> Any:
        made.append(i)
        return body(i)

    def broken(i: int) -> Any:
        raise ValueError(i)

    first = s.submit_nowait("f", nf, 1)
    second = s.submit_nowait("f", nf, 2)
    third = s.submit_nowait("f", broken, 3)
    assert made == [1] and second.state == "queued"
    wait.resolve(None)
    s.run_ready()
    assert made == [1, 2]
    assert (first.result(), second.result()) == (1, 2)
    assert isinstance(third.exception(), ValueError)
    s._check()


def test_run_nowait_gives_an_inline_units_value() -> None:
    s = Scheduler()
    wait: Wait[int] = Wait("w")

    async def nf(i: int, remote: bool) -> int:
        if remote:
            return await wait
        if i < 0:
            raise ValueError(i)
        return i

    assert s.run_nowait("a", nf, 7, False) == 7
    parked = s.run_nowait("b", nf, 1, True)
    queued = s.run_nowait("b", nf, 2, False)
    failed = s.run_nowait("c", nf, -1, False)
    assert isinstance(parked, Unit) and parked.state == "parked"
    assert isinstance(queued, Unit) and queued.state == "queued"
    assert isinstance(failed, Unit) and isinstance(failed.exception(), ValueError)
    wait.resolve(5)
    s.run_ready()
    assert (parked.result(), queued.result()) == (5, 2)
    stats = s.statistics()
    assert (stats.units_run, stats.completed_inline, stats.completed, stats.failed) == (
        4,
        1,
        3,
        1,
    )
    s._check()


def test_resolve_inside_a_microthread_does_not_nest_steps() -> None:
    s = Scheduler()
    log: list[str] = []
    wait: Wait[str] = Wait("k")

    async def waiter() -> None:
        log.append("waiter parks")
        log.append("waiter got " + await wait)

    async def resolver() -> None:
        log.append("resolver starts")
        wait.resolve("v")  # e.g. a local store operation answering someone else's Wait
        log.append("resolver ends")

    s.submit_nowait("f1", waiter)
    r = s.submit_nowait("f2", resolver)
    assert r.done()
    assert log == ["waiter parks", "resolver starts", "resolver ends"]
    s.run_ready()
    assert log[-1] == "waiter got v"


def test_a_unit_parks_several_times_and_units_share_a_wait() -> None:
    s = Scheduler()
    w1: Wait[int] = Wait(1)
    w2: Wait[int] = Wait(2)

    async def nf() -> int:
        return await w1 + await w2

    u = s.submit_nowait("f", nf)
    v = s.submit_nowait("g", nf)
    w1.resolve(1)
    s.run_ready()
    assert u.state == v.state == "parked" and u.waiting_for is w2
    w2.resolve(2)
    s.run_ready()
    assert u.result() == v.result() == 3
    s._check()


def test_bound_refuses_before_creating_the_coroutine() -> None:
    s = Scheduler(limit=2)
    calls = 0
    waits: list[Wait[None]] = []

    async def nf() -> None:
        nonlocal calls
        calls += 1
        w: Wait[None] = Wait(calls)
        waits.append(w)
        await w

    s.submit_nowait("a", nf)  # parked
    s.submit_nowait("a", nf)  # queued behind it: queued units count too
    assert s.in_flight == 2 == s.limit
    with pytest.raises(SchedulerFull):
        s.submit_nowait("b", nf)
    assert calls == 1, "a refused unit must not even be created"
    waits[0].resolve(None)
    s.run_ready()  # the first finishes, the queued one starts and parks
    assert s.in_flight == 1
    s.submit_nowait("b", nf)
    stats = s.statistics()
    assert (stats.in_flight, stats.max_in_flight, stats.units_run) == (2, 2, 3)
    s._check()


def test_exceptions_are_captured_counted_and_reported() -> None:
    failures: list[Unit[Any]] = []
    s = Scheduler(on_failure=failures.append)
    wait: Wait[None] = Wait("k")

    async def boom_inline() -> None:
        raise ValueError("inline")

    async def boom_later() -> None:
        await wait
        raise LookupError("later")

    u1 = s.submit_nowait("f", boom_inline)
    u2 = s.submit_nowait("g", boom_later)
    wait.resolve(None)
    s.run_ready()
    assert u1.failed() and isinstance(u1.exception(), ValueError)
    with pytest.raises(LookupError):
        u2.result()
    assert failures == [u1, u2]
    stats = s.statistics()
    assert (stats.failed, stats.completed, stats.units_run) == (2, 0, 2)
    assert s.submit_nowait("f", _ok).result() == "ok"  # and the scheduler keeps going
    s._check()


async def _ok() -> str:
    return "ok"


def test_not_a_store_operation_bare_yield() -> None:
    s = Scheduler()
    cleaned = []

    async def nf() -> None:
        try:
            await bare_yield()
        finally:
            cleaned.append(True)

    unit = s.submit_nowait("flow-7", nf)
    assert unit.failed()
    exc = unit.exception()
    assert isinstance(exc, NotAStoreOperation)
    assert "None" in str(exc) and "flow-7" in str(exc) and "nf" in str(exc)
    assert cleaned == [True], "the NF's finally blocks must run"
    stats = s.statistics()
    assert (stats.not_a_store_op, stats.failed, stats.in_flight) == (1, 1, 0)
    s._check()


def test_a_microthread_that_swallows_the_error_is_closed_anyway() -> None:
    s = Scheduler()

    async def stubborn() -> None:
        while True:
            try:
                await bare_yield()
            except NotAStoreOperation:
                pass

    unit = s.submit_nowait("f", stubborn)
    assert isinstance(unit.exception(), NotAStoreOperation)
    s._check()


def test_misuse_is_reported_clearly() -> None:
    s = Scheduler()

    def not_async() -> int:
        return 1

    with pytest.raises(TypeError, match="async function"):
        s.submit_nowait("f", not_async)  # type: ignore[arg-type]

    async def nested() -> None:
        s.submit_nowait("g", _ok)

    async def drives() -> None:
        s.run_ready()

    assert isinstance(s.submit_nowait("f", nested).exception(), RuntimeError)
    assert isinstance(s.submit_nowait("f", drives).exception(), RuntimeError)

    wait: Wait[int] = Wait("k")
    wait.resolve(1)
    with pytest.raises(InvalidWaitState):
        wait.resolve(2)
    with pytest.raises(ValueError):
        Scheduler(limit=0)
    s._check()


def test_base_exception_in_a_resumed_unit_keeps_the_books_straight() -> None:
    class Stop(BaseException):
        pass

    s = Scheduler()
    wait: Wait[None] = Wait("k")

    async def nf() -> None:
        await wait
        raise Stop

    unit = s.submit_nowait("f", nf)
    later = s.submit_nowait("f", _ok)
    wait.resolve(None)
    with pytest.raises(Stop):
        s.run_ready()
    assert unit.failed() and later.state == "ready"
    s._check()
    s.run_ready()
    assert later.result() == "ok"


def test_unit_awaited_by_another_microthread() -> None:
    s = Scheduler()
    wait: Wait[int] = Wait("k")

    async def producer() -> int:
        return await wait * 2

    first = s.submit_nowait("p", producer)

    async def consumer() -> int:
        return await first + 1

    second = s.submit_nowait("c", consumer)
    assert second.state == "parked"
    wait.resolve(20)
    s.run_ready()
    assert second.result() == 41


# ---------------------------------------------------------------------------------------
# Property: random interleavings


class _Planned(Exception):
    pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_interleavings_keep_flow_order_and_the_bound(data: st.DataObject) -> None:
    limit = data.draw(st.integers(1, 6), label="limit")
    s = Scheduler(limit)
    open_waits: list[Wait[Any]] = []
    log: list[tuple[int, int]] = []
    submitted: dict[int, list[int]] = defaultdict(list)
    units: dict[tuple[int, int], Unit[int]] = {}

    async def nf(flow: int, idx: int, plan: list[str]) -> int:
        for step, kind in enumerate(plan):
            if kind == "local":
                assert await Op(step) == step
            elif kind == "remote":
                wait: Wait[Any] = Wait((flow, idx, step))
                open_waits.append(wait)
                try:
                    assert await Op(wait=wait) == (flow, idx, step)
                except _Planned:
                    pass
        log.append((flow, idx))
        if "raise" in plan:
            raise _Planned
        return idx

    def check() -> None:
        s._check()
        stats = s.statistics()
        assert stats.parked + stats.ready + stats.queued == stats.in_flight <= limit

    plan_step = st.sampled_from(["local", "remote", "remote", "raise"])
    ops = st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 3), st.lists(plan_step, max_size=3)),
        st.tuples(st.just("settle"), st.integers(0, 10**6), st.booleans()),
        st.tuples(st.just("run"), st.integers(0, 3)),
    )
    counter = 0

    def settle(index: int, ok: bool) -> None:
        wait = open_waits.pop(index % len(open_waits))
        if ok:
            wait.resolve(wait.what)
        else:
            wait.fail(_Planned(wait.what))

    try:
        for op in data.draw(st.lists(ops, max_size=50), label="ops"):
            if op[0] == "submit":
                _, flow, plan = cast(tuple[str, int, list[str]], op)
                before = s.in_flight
                counter += 1
                try:
                    unit = s.submit_nowait(flow, nf, flow, counter, plan)
                except SchedulerFull:
                    assert before >= limit
                else:
                    assert before < limit
                    submitted[flow].append(counter)
                    units[(flow, counter)] = unit
            elif op[0] == "settle" and open_waits:
                settle(op[1], cast(tuple[str, int, bool], op)[2])
            elif op[0] == "run":
                s.run_ready(max_units=op[1] or None)
            check()

        # Drain: settle what is left in a random order until nothing is parked or ready.
        while open_waits or s.has_ready():
            if open_waits:
                settle(data.draw(st.integers(0, len(open_waits) - 1)), data.draw(st.booleans()))
            if not open_waits or data.draw(st.booleans()):
                s.run_ready()
            check()

        assert s.in_flight == 0
        assert len(log) == len(set(log)) == len(units), "every unit finishes exactly once"
        for flow, idxs in submitted.items():
            assert [i for f, i in log if f == flow] == idxs, f"flow {flow} out of order"
        for (_flow, idx), unit in units.items():
            if unit.failed():
                assert isinstance(unit.exception(), _Planned)
            else:
                assert unit.result() == idx
        stats = s.statistics()
        assert stats.units_run == len(units) == stats.completed + stats.failed
        assert stats.max_in_flight <= limit
    finally:
        # An example that Hypothesis aborts midway (data exhausted) leaves queued units
        # unstarted: close them so that they are not reported as never awaited.
        for unit in units.values():
            if not unit.done() and unit._coro is not None:
                unit._coro.close()


# ---------------------------------------------------------------------------------------
# The trio shell


async def test_trio_task_blocks_on_a_wait_until_resolved() -> None:
    wait: Wait[int] = Wait("k")
    got: list[int] = []

    async def client() -> None:
        got.append(await wait)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            wait.resolve(7)
    assert got == [7]
    assert await wait == 7  # settled: returns at once


async def test_trio_task_sees_a_failed_wait_and_cancellation_leaves_no_waiter() -> None:
    failing: Wait[int] = Wait("k")

    async def client() -> None:
        with pytest.raises(KeyError):
            await failing

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()
            failing.fail(KeyError("k"))

    abandoned: Wait[int] = Wait("k2")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_await, abandoned)
            await trio.testing.wait_all_tasks_blocked()
            assert abandoned._callbacks, "the blocked task registered a waiter"
            nursery.cancel_scope.cancel()
    assert not abandoned._callbacks, "a cancelled waiter must not stay registered"
    abandoned.resolve(1)


async def _await(wait: Wait[Any]) -> None:
    await wait


async def test_trio_task_awaits_a_unit_result() -> None:
    async with open_microthreads() as mt:
        wait: Wait[int] = Wait("k")

        async def nf() -> int:
            return await Op(wait=wait) + 1

        unit = mt.submit_nowait("f", nf)
        quick = mt.submit_nowait("g", _ok)
        assert await mt.wait_result(quick) == "ok"

        async def resolve_later() -> None:
            await trio.testing.wait_all_tasks_blocked()
            wait.resolve(41)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(resolve_later)
                assert await mt.wait_result(unit) == 42
        assert await unit == 42


async def test_submit_waits_for_room_fifo() -> None:
    waits: dict[str, Wait[None]] = {}
    admitted: list[str] = []

    async def nf(name: str) -> str:
        waits[name] = Wait(name)
        await waits[name]
        return name

    async with open_microthreads(limit=2) as mt:
        mt.submit_nowait("a", nf, "a")
        mt.submit_nowait("b", nf, "b")
        with pytest.raises(SchedulerFull):
            mt.submit_nowait("c", nf, "c")

        async def producer(name: str, started: trio.Event) -> None:
            started.set()
            await mt.submit(name, nf, name)
            admitted.append(name)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for name in ("c", "d"):
                    started = trio.Event()
                    nursery.start_soon(producer, name, started)
                    await started.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert admitted == [], "both producers must be held back"
                assert mt.statistics().in_flight == 2

                waits["a"].resolve(None)  # the driver runs it, room for exactly one
                while not admitted:
                    await trio.testing.wait_all_tasks_blocked()
                await trio.testing.wait_all_tasks_blocked()
                assert admitted == ["c"], "waiting producers get room in arrival order"

                waits["b"].resolve(None)
            assert admitted == ["c", "d"]
        stats = mt.statistics()
        assert (stats.in_flight, stats.max_in_flight, stats.completed) == (2, 2, 2)
        mt.scheduler._check()


async def test_trio_sleep_in_a_microthread_is_not_a_store_operation() -> None:
    mt = Microthreads()

    async def naps() -> None:
        await trio.sleep(0)

    async def naps_long() -> None:
        await trio.sleep(10)  # enters a cancel scope on the stepping task, then yields

    async def naps_after_parking(wait: Wait[None]) -> None:
        await wait
        await trio.Event().wait()

    u1 = mt.submit_nowait("f", naps)
    u2 = mt.submit_nowait("g", naps_long)
    wait: Wait[None] = Wait("k")
    u3 = mt.submit_nowait("h", naps_after_parking, wait)
    wait.resolve(None)
    mt.run_ready()
    for unit in (u1, u2, u3):
        exc = unit.exception()
        assert isinstance(exc, NotAStoreOperation), exc
    assert "CancelShieldedCheckpoint" in str(u1.exception())
    assert "WaitTaskRescheduled" in str(u2.exception())
    assert mt.statistics().not_a_store_op == 3
    mt.scheduler._check()
    with trio.fail_after(5):  # and this trio task is still healthy afterwards
        await trio.sleep(0)
        await trio.sleep(0.001)
