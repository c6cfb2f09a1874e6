"""The trio side of microthreads: blocking hooks, backpressure and a driver task.

The scheduling itself is pure and lives in :mod:`store.core.scheduler` (read its docstring
for the await protocol).  This module adds the three things that need trio, and only on the
slow paths, so that a packet whose state is local never touches trio:

* **Waits awaited by ordinary trio tasks.**  On import it installs a blocking hook in the
  core: a trio task (control plane, client, test) that awaits an unresolved
  :class:`~store.core.scheduler.Wait` parks on a ``trio.Event`` created for that await
  only, and wakes when the node resolves the Wait.  Cancellation removes the waiter.
* **Backpressure.**  :meth:`Microthreads.submit` waits (FIFO among waiters) until the
  scheduler has room instead of raising :class:`~store.core.scheduler.SchedulerFull`.
* **A driver.**  Resolving a Wait only marks its unit ready.  Something must then call
  ``run_ready()``: the node does it after each batch of incoming messages, and
  :meth:`Microthreads.serve` (started by :func:`open_microthreads`) does it whenever the
  ready set becomes non-empty, for code that has no such loop (tests, embedded spaces).

Usage::

    async with open_microthreads(limit=4096) as mt:
        unit = mt.submit_nowait(flow, nf.on_packet, frame)   # hot path, never blocks
        unit = await mt.submit(flow, nf.on_packet, frame)    # waits for room when full
        value = await mt.wait_result(unit)                   # or: await unit
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, TypeVarTuple

import trio

from store.core.scheduler import (
    DEFAULT_LIMIT,
    Scheduler,
    SchedulerFull,
    SchedulerStatistics,
    Unit,
    Wait,
    set_blocking_hook,
)

__all__ = [
    "Microthreads",
    "block_on_wait",
    "install_trio_blocking_hook",
    "open_microthreads",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def block_on_wait(wait: Wait[Any]) -> None:
    """Block the current trio task until ``wait`` is settled (the core's blocking hook).

    The Event exists only while a trio task actually waits, so Waits that microthreads
    await, or that are resolved before anyone blocks, never allocate one."""
    if wait.done():
        return
    event = trio.Event()

    def wake(_wait: Wait[Any]) -> None:
        event.set()

    wait.add_done_callback(wake)
    try:
        await event.wait()
    finally:
        wait.remove_done_callback(wake)  # if cancelled: do not keep a dead waiter


def install_trio_blocking_hook() -> None:
    """Make trio tasks block properly on unresolved Waits.  Done on import; idempotent."""
    set_blocking_hook(block_on_wait)


install_trio_blocking_hook()


class Microthreads:
    """Owns a :class:`~store.core.scheduler.Scheduler` and connects it to trio.

    ``submit_nowait``, ``run_nowait`` and ``run_ready`` are the scheduler's own (no trio on
    the hot path); ``submit``, ``wait_result`` and ``serve`` are the trio-facing additions.
    """

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        *,
        on_failure: Callable[[Unit[Any]], None] | None = None,
    ) -> None:
        self.scheduler = Scheduler(
            limit, on_ready=self._ready_hook, on_room=self._room_hook, on_failure=on_failure
        )
        #: Bound method kept as an attribute: the node's hot path calls it per packet.
        self.submit_nowait = self.scheduler.submit_nowait
        self.run_nowait = self.scheduler.run_nowait
        self.run_ready = self.scheduler.run_ready
        self._ready_event: trio.Event | None = None
        self._room_event: trio.Event | None = None
        self._room_lock: trio.Lock | None = None
        self._room_waiters = 0

    # -- hooks the core calls (synchronously, inside resolve / a step) ------------------

    def _ready_hook(self) -> None:
        if self._ready_event is not None:
            self._ready_event.set()

    def _room_hook(self) -> None:
        if self._room_event is not None:
            self._room_event.set()
            self._room_event = None

    # -- trio-facing API --------------------------------------------------------------

    async def submit(
        self,
        flow: Hashable,
        fn: Callable[[*Ts], Coroutine[Any, Any, T]],
        *args: *Ts,
    ) -> Unit[T]:
        """Like ``submit_nowait``, but waits for room instead of raising ``SchedulerFull``.

        This is the backpressure: a producer that awaits ``submit`` slows down to the rate
        at which parked units finish.  Waiting submitters get room in the order they came.
        When there is room this does not checkpoint: a per-packet checkpoint costs ~4 µs,
        ten times the unit itself; the producer's own I/O provides the checkpoints."""
        scheduler = self.scheduler
        if self._room_waiters == 0:
            try:
                return scheduler.submit_nowait(flow, fn, *args)
            except SchedulerFull:
                pass
        if self._room_lock is None:
            self._room_lock = trio.Lock()
        self._room_waiters += 1
        try:
            async with self._room_lock:
                while scheduler.in_flight >= scheduler.limit:
                    if self._room_event is None:
                        self._room_event = trio.Event()
                    await self._room_event.wait()
                return scheduler.submit_nowait(flow, fn, *args)
        finally:
            self._room_waiters -= 1

    async def wait_result(self, unit: Unit[T]) -> T:
        """The unit's result once it has finished (re-raises its exception).

        Returns at once, without a trio call, if it has finished; otherwise blocks on a
        trio Event created for this wait only.  Somebody must keep calling ``run_ready``
        (the node, or :meth:`serve`) for a parked unit to finish."""
        if not unit.done():
            event = trio.Event()

            def wake(_unit: Unit[T]) -> None:
                event.set()

            unit.add_done_callback(wake)
            try:
                await event.wait()
            finally:
                unit.remove_done_callback(wake)
        return unit.result()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run ready units whenever there are some, forever (a driver task).

        Wakes on the core's ``on_ready`` hook (one trio Event per idle period, not per
        unit), runs everything ready, and checkpoints between rounds so that I/O tasks
        get their turn."""
        scheduler = self.scheduler
        task_status.started()
        while True:
            if not scheduler.has_ready():
                self._ready_event = trio.Event()
                try:
                    await self._ready_event.wait()
                finally:
                    self._ready_event = None
            scheduler.run_ready()
            await trio.lowlevel.checkpoint()

    def statistics(self) -> SchedulerStatistics:
        """The scheduler's counters (see :class:`SchedulerStatistics`)."""
        return self.scheduler.statistics()


@asynccontextmanager
async def open_microthreads(
    limit: int = DEFAULT_LIMIT,
    *,
    on_failure: Callable[[Unit[Any]], None] | None = None,
) -> AsyncIterator[Microthreads]:
    """A :class:`Microthreads` with its :meth:`~Microthreads.serve` driver running; the
    driver is cancelled on exit (units still parked then stay parked: finish them first)."""
    microthreads = Microthreads(limit, on_failure=on_failure)
    async with trio.open_nursery() as nursery:
        await nursery.start(microthreads.serve)
        try:
            yield microthreads
        finally:
            nursery.cancel_scope.cancel()
