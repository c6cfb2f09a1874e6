"""Microthreads: the node's own per-packet coroutines, stepped by hand (paper §4.3).

Why not one trio task per packet?  Measured on these machines a trio task costs about 9 µs
from ``start_soon`` to completion, while a coroutine stepped with ``coro.send(None)`` that
never suspends costs about 0.3-0.5 µs.  Most packets find their state local, so the common
case must not pay for a task, a checkpoint or an event.  A *microthread* is therefore a plain
coroutine (the NF's per-packet ``async def``) that the :class:`Scheduler` steps itself:

* :meth:`Scheduler.submit_nowait` calls ``fn(*args)`` and steps the coroutine at once.  If
  every store operation it awaits is local, it runs to completion inside that call: no task,
  no trio call, no allocation beyond the coroutine and a small :class:`Unit` record.
* If it awaits state that is remote, the store operation hands it a :class:`Wait`; the
  coroutine yields that Wait up to the scheduler, which *parks* the unit.  Later the node
  calls :meth:`Wait.resolve` (or :meth:`Wait.fail`) when the reply arrives, which moves the
  unit to the *ready* set; :meth:`Scheduler.run_ready` resumes ready units with
  ``coro.send(value)`` (or ``coro.throw(exc)``), the longest-waiting first, as the paper
  asks: "longest-waiting" is earliest arrival (a sequence number taken when the unit parks
  or queues at arrival), so a unit that has parked twice still goes before younger ones.
* Units of one flow finish in arrival order: while a flow has a parked (or ready) unit, its
  later units are queued unstarted behind it and start, one by one, when it finishes.  Other
  flows are not held up at all: that is the point of §4.3, a remote round trip costs as much
  as a few hundred local packets, which keep flowing meanwhile.  A queued unit keeps only
  its function and arguments (its coroutine is made when it starts), and when it has waited
  longer than every ready unit, :meth:`Scheduler.run_ready` steps it straight after its
  predecessor instead of pushing it through the ready heap.
* :meth:`Scheduler.run_nowait` is ``submit_nowait`` for a caller that wants the value: a
  unit that finishes inline is not even made, its value is returned.

The await protocol for store operations
---------------------------------------
A store operation is any awaitable.  Its ``__await__`` must either

1. *return the result without yielding* when the state is local (no context switch at all);
   a generator ``__await__`` that hits ``return value`` before any ``yield`` does this; or
2. create a :class:`Wait`, arrange for the node to resolve it when the reply arrives, and
   delegate to it: ``return (yield from wait.__await__())`` inside ``__await__``, or
   ``return await wait`` inside an ``async def``.

It must never yield anything else.  What awaiting an unresolved Wait does depends on who
awaits it:

(a) inside a microthread being stepped by a scheduler, ``Wait.__await__`` yields the Wait
    itself; the scheduler parks the unit and resumes it with ``send(value)`` /
    ``throw(exc)`` once the Wait is resolved or failed;
(b) inside an ordinary trio task (control plane, clients, tests), yielding a Wait to trio
    would crash the task, so ``Wait.__await__`` instead delegates to a *blocking hook*
    installed by the trio shell (``store.shell.microthreads`` installs one on import that blocks
    on a ``trio.Event`` created only then).  This keeps trio out of the pure core.

How a Wait knows which case applies: each scheduler sets its own ``_stepping`` flag while it
steps a coroutine (a plain attribute store, the cheapest marker there is), and every
scheduler registers itself at construction in a per-thread registry.  Only an *unresolved*
Wait (the slow path, which is about to wait for a network round trip anyway) consults the
registry: if a scheduler of this thread is stepping, the awaiting code is a microthread.
A scheduler therefore belongs to the thread that created it, as trio's run loop does.

A microthread that awaits anything else (``trio.sleep``, a socket, an asyncio future) yields
a foreign object to the scheduler; the scheduler throws
:class:`~store.wire.errors.NotAStoreOperation` into it, naming what it awaited, closes it, marks
the unit failed, counts it and carries on.

Re-entrancy: :meth:`Wait.resolve` never steps a coroutine; it only moves the waiting unit to
the ready set (and calls the ``on_ready`` hook so that the shell can wake its driver).  So a
resolve issued while another coroutine is being stepped (a local store operation that
answers someone else's Wait) cannot nest one coroutine's step inside another's.  For the
same reason :meth:`Scheduler.submit_nowait` and :meth:`Scheduler.run_ready` refuse to be
called from inside a microthread.

Backpressure: the units that are parked, ready or queued (``in_flight``) are bounded by
``limit`` (4096 by default).  When the bound is reached :meth:`Scheduler.submit_nowait`
raises :class:`SchedulerFull`; the shell's ``async submit`` waits for room instead.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Hashable
from dataclasses import dataclass
from functools import partial
from heapq import heappop, heappush
from typing import Any, Generic, TypeVar, TypeVarTuple, cast

from store.wire.errors import NotAStoreOperation, StoreError

__all__ = [
    "DEFAULT_LIMIT",
    "InvalidWaitState",
    "Scheduler",
    "SchedulerFull",
    "SchedulerStatistics",
    "Unit",
    "UnitNotFinished",
    "Wait",
    "get_blocking_hook",
    "set_blocking_hook",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Default bound on parked + ready + queued units.  A parked unit (coroutine frame, Unit,
#: Wait, callback) takes about 1 KB, so this is ~4 MB; and it is far more than the units
#: that one ~150 µs round trip can hold up at ~1 M packets/s per node.
DEFAULT_LIMIT = 4096

# States shared by Wait and Unit: small ints, cheap to compare.
_PENDING = 0
_DONE = 1
_FAILED = 2


class SchedulerFull(StoreError):
    """The caller's (a flow-control signal, not a bug): ``limit`` units are already parked or
    queued.  Drop the packet, or use the shell's ``async submit`` which waits for room."""


class UnitNotFinished(StoreError, RuntimeError):
    """The caller's: asked for the result of a unit (or a Wait) that has not finished yet."""


class InvalidWaitState(StoreError, RuntimeError):
    """The node's: resolved or failed a Wait twice.  Each reply must answer one Wait once."""


# ---------------------------------------------------------------------------------------
# Who is stepping: the per-thread registry of schedulers and the trio shell's hook.

BlockingHook = Callable[["Wait[Any]"], Awaitable[None]]

_blocking_hook: BlockingHook | None = None


class _ThreadSchedulers:
    """Weak references to the schedulers created in each thread, by thread.

    A plain list of ``weakref.ref`` rather than a ``WeakSet``: iterating a WeakSet takes
    an iteration guard, a list of one or two refs is cheap, and this is paid on every
    park.  Only the thread a list is for ever changes it, and only in :meth:`add`, which
    drops the refs of dead schedulers there.  The refs have no callback on purpose: a
    weakref callback runs wherever the collector happens to run, inside any allocation of
    any thread, and one that removes its ref from a list that is being copied (a copy
    allocates, so it can run the collector) leaves the copy holding a freed ref, which
    crashes the interpreter."""

    def __init__(self) -> None:
        self.by_thread: dict[int, list[weakref.ref[Scheduler]]] = {}

    def add(self, scheduler: Scheduler) -> None:
        refs = self.by_thread.setdefault(threading.get_ident(), [])
        alive = [ref for ref in refs if ref() is not None]
        alive.append(weakref.ref(scheduler))
        self.by_thread[threading.get_ident()] = alive


_registry = _ThreadSchedulers()


def _in_microthread() -> bool:
    """True when the code running now is a coroutine stepped by one of this thread's
    schedulers.  Only called on the slow path (an unresolved Wait), so it may iterate."""
    refs = _registry.by_thread.get(threading.get_ident())
    if not refs:
        return False
    for ref in refs:  # (no copy: nothing else changes this thread's list meanwhile)
        scheduler = ref()
        if scheduler is not None and scheduler._stepping:
            return True
    return False


def set_blocking_hook(hook: BlockingHook | None) -> BlockingHook | None:
    """Install how an ordinary (non-microthread) task blocks on an unresolved Wait.

    ``hook(wait)`` returns an awaitable that completes once ``wait`` is resolved or failed
    (it need not return the value: the Wait reads its own outcome afterwards).  The trio
    shell, :mod:`store.shell.microthreads`, installs one on import.  Returns the previous hook."""
    global _blocking_hook
    previous = _blocking_hook
    _blocking_hook = hook
    return previous


def get_blocking_hook() -> BlockingHook | None:
    """The hook installed by :func:`set_blocking_hook`, or None."""
    return _blocking_hook


# ---------------------------------------------------------------------------------------
# Wait


class Wait(Generic[T]):
    """A value that will arrive later: what a store operation awaits when state is remote.

    The store operation creates it (``what`` says what it waits for, e.g. a key, and shows
    in reprs and error messages), registers it with whatever will receive the reply, and
    awaits it (see the module docstring for the protocol).  The node calls :meth:`resolve`
    or :meth:`fail` exactly once.  Several awaiters may share one Wait.

    Awaiting a Wait that is already resolved returns at once, without yielding.
    """

    __slots__ = ("_callbacks", "_state", "_value", "what")

    def __init__(self, what: object = None) -> None:
        self.what = what
        self._state = _PENDING
        self._value: Any = None
        self._callbacks: list[Callable[[Wait[T]], None]] | None = None

    def __repr__(self) -> str:
        state = ("pending", "resolved", "failed")[self._state]
        return f"<Wait for {self.what!r}: {state}>"

    def done(self) -> bool:
        """True once :meth:`resolve` or :meth:`fail` has been called."""
        return self._state != _PENDING

    def result(self) -> T:
        """The value, or raise the failure; :class:`UnitNotFinished` if still pending."""
        if self._state == _DONE:
            return cast(T, self._value)
        if self._state == _FAILED:
            raise self._value
        raise UnitNotFinished(f"{self!r} has no result yet")

    def resolve(self, value: T) -> None:
        """Deliver the value: waiting microthreads become ready (they run at the node's next
        :meth:`Scheduler.run_ready`, never inside this call), waiting trio tasks wake."""
        self._settle(_DONE, value)

    def fail(self, exc: BaseException) -> None:
        """Deliver a failure: it is raised (thrown) in every awaiter at its ``await``."""
        self._settle(_FAILED, exc)

    def _settle(self, state: int, value: object) -> None:
        if self._state != _PENDING:
            raise InvalidWaitState(f"{self!r} was settled already")
        self._state = state
        self._value = value
        callbacks = self._callbacks
        if callbacks is not None:
            self._callbacks = None
            for callback in callbacks:
                callback(self)

    def add_done_callback(self, callback: Callable[[Wait[T]], None]) -> None:
        """Call ``callback(self)`` when the Wait is settled (at once if it is already).

        Callbacks run synchronously inside :meth:`resolve` / :meth:`fail`; they must be
        quick and must not raise (the scheduler's and the shell's are)."""
        if self._state != _PENDING:
            callback(self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def remove_done_callback(self, callback: Callable[[Wait[T]], None]) -> None:
        """Forget ``callback`` (e.g. a trio waiter that was cancelled); no-op if absent."""
        if self._callbacks is not None:
            try:
                self._callbacks.remove(callback)
            except ValueError:
                pass

    def __await__(self) -> Generator[Any, Any, T]:
        state = self._state
        if state == _DONE:
            return cast(T, self._value)
        if state == _FAILED:
            raise self._value
        if _in_microthread():
            # Case (a): hand ourselves to the scheduler, which parks the unit and resumes it
            # with send(value) or throw(exc) once we are settled.
            value = yield self
            return cast(T, value)
        # Case (b): an ordinary task; block it the event loop's way.
        hook = _blocking_hook
        if hook is None:
            raise RuntimeError(
                f"{self!r} awaited outside a microthread, but no blocking hook is installed "
                "(import store.shell.microthreads to block trio tasks on Waits)"
            )
        yield from hook(self).__await__()
        return self.result()


_new_object = object.__new__

#: What a queued unit "waits for": its turn in its flow.  Never settled.
_NOT_STARTED: Wait[Any] = Wait("its turn in its flow")


# ---------------------------------------------------------------------------------------
# Unit


class Unit(Generic[T]):
    """One microthread: a submitted coroutine and, once it finishes, its outcome.

    Kept lean on purpose: a unit that completes inline is one small slotted record, created
    once, already finished, by ``object.__new__`` plus three attribute stores (no
    ``__init__`` frame: that saves ~0.1 µs per packet, measured).  Such a unit has only
    ``flow``, ``_state`` and ``_value`` set; the other slots are read only while a unit is
    pending, so every reader checks ``_state`` first.

    States: queued (waiting behind its flow), ready, running, parked (on
    :attr:`waiting_for`), done, failed.

    Retrieve the outcome with :meth:`result` (raises the NF's exception if it failed), or
    await the unit: ``await unit`` works in a trio task (it blocks through the shell's hook)
    and in another microthread (it parks on a Wait created only then).  Do not await a unit
    of the same flow that arrived later: it cannot start before you finish.
    """

    __slots__ = ("_callbacks", "_coro", "_seq", "_start", "_state", "_value", "_wait", "flow")

    def __init__(
        self,
        flow: Hashable,
        coro: Coroutine[Any, Any, T] | None,
        state: int,
        value: object,
    ) -> None:
        self.flow = flow
        self._coro = coro
        self._state = state
        self._value: Any = value
        self._seq = 0
        self._wait: Wait[Any] | None = None
        self._callbacks: list[Callable[[Unit[T]], None]] | None = None
        #: A queued unit's function and arguments: its coroutine is made when it starts
        #: (a coroutine frame is most of a unit's memory, and a queued one only waits).
        self._start: tuple[Callable[..., Coroutine[Any, Any, T]], tuple[Any, ...]] | None = None

    def __repr__(self) -> str:
        return f"<Unit flow={self.flow!r} {self.state}>"

    @property
    def state(self) -> str:
        """One of "queued", "ready", "running", "parked", "done", "failed" (for humans)."""
        if self._state == _DONE:
            return "done"
        if self._state == _FAILED:
            return "failed"
        wait = self._wait
        if wait is _NOT_STARTED:
            return "queued"
        if wait is not None:
            return "parked" if wait._state == _PENDING else "ready"
        coro = self._coro
        return "running" if getattr(coro, "cr_running", False) else "ready"

    @property
    def waiting_for(self) -> Wait[Any] | None:
        """The Wait this unit is parked on, if any (for debugging and scale-in reports)."""
        if self._state != _PENDING or self._wait is _NOT_STARTED:
            return None
        return self._wait

    def done(self) -> bool:
        """True once the unit has finished, successfully or not."""
        return self._state != _PENDING

    def failed(self) -> bool:
        """True if the NF code raised (or awaited something that is not a store op)."""
        return self._state == _FAILED

    def exception(self) -> BaseException | None:
        """The captured exception of a failed unit, None if it succeeded.

        Raises :class:`UnitNotFinished` if the unit has not finished."""
        if self._state == _PENDING:
            raise UnitNotFinished(f"{self!r} has not finished")
        return cast(BaseException, self._value) if self._state == _FAILED else None

    def result(self) -> T:
        """The NF function's return value; re-raises its exception if it failed.

        Raises :class:`UnitNotFinished` if the unit has not finished."""
        if self._state == _DONE:
            return cast(T, self._value)
        if self._state == _FAILED:
            raise self._value
        raise UnitNotFinished(f"{self!r} has not finished")

    def add_done_callback(self, callback: Callable[[Unit[T]], None]) -> None:
        """Call ``callback(self)`` when the unit finishes (at once if it has).  Callbacks run
        inside the scheduler's step; they must be quick and must not raise."""
        if self._state != _PENDING:
            callback(self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def remove_done_callback(self, callback: Callable[[Unit[T]], None]) -> None:
        """Forget ``callback``; no-op if absent."""
        if self._state == _PENDING and self._callbacks is not None:
            try:
                self._callbacks.remove(callback)
            except ValueError:
                pass

    def __await__(self) -> Generator[Any, Any, T]:
        if self._state != _PENDING:
            return self.result()
        # Slow path only: bridge to a Wait, which knows how to block either kind of awaiter.
        wait: Wait[None] = Wait(self)
        self.add_done_callback(lambda _unit: wait.resolve(None))
        yield from wait.__await__()
        return self.result()


# ---------------------------------------------------------------------------------------
# Scheduler


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """A snapshot of a :class:`Scheduler` (see :meth:`Scheduler.statistics`).

    ``units_run`` counts accepted units (refused ones are not counted);
    ``completed_inline`` those that finished successfully inside ``submit_nowait`` without
    ever parking; ``completed`` all successful ones; ``failed`` those whose NF code raised,
    ``not_a_store_op`` among them those that awaited a foreign object.  ``parked``,
    ``ready`` and ``queued`` are counts now; ``in_flight`` is their sum, the quantity that
    ``limit`` bounds; ``max_parked`` is the high-water mark of parked + ready and
    ``max_in_flight`` that of ``in_flight``.
    """

    units_run: int
    completed_inline: int
    completed: int
    failed: int
    not_a_store_op: int
    parked: int
    ready: int
    queued: int
    in_flight: int
    max_parked: int
    max_in_flight: int
    limit: int


class Scheduler:
    """Steps microthreads inline, parks them on Waits, keeps each flow's units in order.

    Hooks (all optional, all called synchronously, all must be quick and not raise):

    * ``on_ready()``: the ready set went from empty to non-empty; someone should call
      :meth:`run_ready` soon (the trio shell wakes its driver task).
    * ``on_room()``: ``in_flight`` dropped below ``limit`` after being at it; blocked
      submitters may retry.
    * ``on_failure(unit)``: a unit's NF code failed (its exception is ``unit.exception()``);
      for logging.  Failures are captured on the unit and counted either way.

    Complexity: submit is O(1); resuming a unit is O(log R) for R ready units.
    """

    __slots__ = (
        "__weakref__",
        "_failed",
        "_failed_inline",
        "_flows",
        "_inline_done",
        "_limit",
        "_max_in_flight",
        "_max_parked",
        "_not_store_op",
        "_on_failure",
        "_on_ready",
        "_on_room",
        "_parked",
        "_pending",
        "_queued",
        "_ready",
        "_seq",
        "_slow_done",
        "_stepping",
        "_went_slow",
    )

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        *,
        on_ready: Callable[[], None] | None = None,
        on_room: Callable[[], None] | None = None,
        on_failure: Callable[[Unit[Any]], None] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._limit = limit
        self._on_ready = on_ready
        self._on_room = on_room
        self._on_failure = on_failure
        #: True while this scheduler is inside coro.send / coro.throw (the marker).
        self._stepping = False
        #: flow -> units of that flow queued (unstarted) behind its active unit, or None
        #: while there are none (a deque costs ~600 bytes; most parked flows never need
        #: one).  A flow is a key here exactly while it has an active (parked or ready) unit.
        self._flows: dict[Hashable, deque[Unit[Any]] | None] = {}
        #: Ready units as (seq, unit): lowest seq = arrived earliest = waited longest.
        self._ready: list[tuple[int, Unit[Any]]] = []
        self._seq = 0
        self._pending = 0  # parked + ready + queued
        self._parked = 0
        self._queued = 0
        self._max_parked = 0
        self._max_in_flight = 0
        # Counters.  Each unit bumps exactly one of the first three once, when its fate is
        # known, so the inline path pays for a single increment.
        self._inline_done = 0
        self._failed_inline = 0
        self._went_slow = 0
        self._slow_done = 0
        self._failed = 0
        self._not_store_op = 0
        _registry.add(self)

    # -- the hot path -----------------------------------------------------------------

    def submit_nowait(
        self,
        flow: Hashable,
        fn: Callable[[*Ts], Coroutine[Any, Any, T]],
        *args: *Ts,
    ) -> Unit[T]:
        """Run ``fn(*args)`` as a microthread of ``flow``; never blocks.

        If the flow has nothing parked or queued, the coroutine is stepped right here: when
        all its awaits are local it finishes before this returns (``unit.done()`` is True).
        Otherwise it is queued behind the flow's earlier units.  Raises
        :class:`SchedulerFull` (before calling ``fn``) when ``limit`` units are in flight.
        Exceptions of the NF code are captured on the returned unit, never raised here.
        Must not be called from inside a microthread.
        """
        if self._pending >= self._limit:
            raise SchedulerFull(
                f"{self._pending} microthreads parked or queued (limit {self._limit})"
            )
        # (an empty table is tested first: most of the time no flow waits, and the test
        # then skips hashing the flow)
        if (self._flows and flow in self._flows) or self._stepping:
            return self._enqueue(flow, fn, args)
        coro = fn(*args)
        self._stepping = True
        try:
            # Called as coro.send(...), not through a saved bound method: CPython then
            # skips allocating the bound method.
            yielded = coro.send(None)
        except StopIteration as stop:
            self._stepping = False
            self._inline_done += 1
            unit: Unit[T] = _new_object(Unit)  # see Unit: a finished unit skips __init__
            unit.flow = flow
            unit._state = _DONE
            unit._value = stop.value
            return unit
        except Exception as exc:
            self._stepping = False
            if not hasattr(coro, "send"):
                raise TypeError(f"{fn!r} must be an async function; it returned {coro!r}") from None
            return self._finish_inline_failure(flow, exc)
        except BaseException:
            self._stepping = False  # KeyboardInterrupt and the like: not ours to keep
            raise
        self._stepping = False
        return self._went_slow_with(flow, coro, yielded)

    def run_nowait(
        self,
        flow: Hashable,
        fn: Callable[[*Ts], Coroutine[Any, Any, T]],
        *args: *Ts,
    ) -> T | Unit[T]:
        """:meth:`submit_nowait` for a caller that wants a value: a unit that finishes
        inline, successfully, is not made, and its value is returned itself; otherwise
        (queued, parked, or failed inline) the :class:`Unit`, as ``submit_nowait`` gives
        it.  So ``fn`` must not return a Unit (the caller tells the two apart by type);
        the NF runner's per-packet call, where most packets finish inline."""
        if self._pending >= self._limit:
            raise SchedulerFull(
                f"{self._pending} microthreads parked or queued (limit {self._limit})"
            )
        if (self._flows and flow in self._flows) or self._stepping:
            return self._enqueue(flow, fn, args)
        coro = fn(*args)
        self._stepping = True
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            self._stepping = False
            self._inline_done += 1
            value: T = stop.value  # (not typing.cast: a call per packet)
            return value
        except Exception as exc:
            self._stepping = False
            if not hasattr(coro, "send"):
                raise TypeError(f"{fn!r} must be an async function; it returned {coro!r}") from None
            return self._finish_inline_failure(flow, exc)
        except BaseException:
            self._stepping = False
            raise
        self._stepping = False
        return self._went_slow_with(flow, coro, yielded)

    # -- the slow paths ---------------------------------------------------------------

    def _went_slow_with(
        self, flow: Hashable, coro: Coroutine[Any, Any, T], yielded: object
    ) -> Unit[T]:
        """A unit's first step, inline, suspended (``yielded``): make it a unit and park
        it (or reject what it awaited)."""
        unit = Unit(flow, coro, _PENDING, None)
        self._went_slow += 1
        self._pending += 1
        self._seq += 1
        unit._seq = self._seq
        self._flows[flow] = None
        self._suspend(unit, yielded)
        return unit

    def _enqueue(
        self,
        flow: Hashable,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
    ) -> Unit[T]:
        if self._stepping:
            raise RuntimeError(
                "submit_nowait called from inside a microthread: microthreads do not start "
                "microthreads (it would step one coroutine inside another's step)"
            )
        unit: Unit[T] = Unit(flow, None, _PENDING, None)
        unit._start = (fn, args)
        self._went_slow += 1
        self._seq += 1
        unit._seq = self._seq
        unit._wait = _NOT_STARTED
        queue = self._flows[flow]
        if queue is None:
            queue = self._flows[flow] = deque()
        queue.append(unit)
        self._queued += 1
        self._pending += 1
        if self._pending > self._max_in_flight:
            self._max_in_flight = self._pending
        return unit

    def _finish_inline_failure(self, flow: Hashable, exc: BaseException) -> Unit[Any]:
        unit: Unit[Any] = Unit(flow, None, _FAILED, exc)
        self._failed_inline += 1
        self._failed += 1
        if self._on_failure is not None:
            self._on_failure(unit)
        return unit

    def _suspend(self, unit: Unit[Any], yielded: object) -> None:
        """The unit's coroutine yielded ``yielded`` (it is counted in ``_pending`` and its
        flow is registered): park it on a Wait, or reject a foreign object."""
        if isinstance(yielded, Wait):
            unit._wait = yielded
            if yielded._state != _PENDING:
                # Settled already (a raw ``yield wait`` of a resolved Wait): just run it.
                self._push_ready(unit)
            else:
                self._parked += 1
                yielded.add_done_callback(partial(self._wake, unit))
            parked = self._parked + len(self._ready)
            if parked > self._max_parked:
                self._max_parked = parked
            if self._pending > self._max_in_flight:
                self._max_in_flight = self._pending
            return
        self._reject(unit, yielded)

    def _reject(self, unit: Unit[Any], yielded: object) -> None:
        """NF code awaited something that is not a store operation: throw the error in (so
        its ``finally`` blocks run), close the coroutine, fail the unit, keep going."""
        coro = unit._coro
        assert coro is not None
        name = getattr(coro, "__qualname__", repr(coro))
        error = NotAStoreOperation(
            f"microthread {name} of flow {unit.flow!r} awaited {yielded!r}, which is not a "
            "store operation; per-packet code may await only store operations (no "
            "trio.sleep, sockets, events or locks: those belong in ordinary trio tasks)"
        )
        self._not_store_op += 1
        self._stepping = True
        try:
            coro.throw(error)
        except Exception:
            pass  # normally ``error`` itself, propagated out of the NF code
        except BaseException:
            self._stepping = False
            self._finish(unit, _FAILED, error)
            raise
        # If it swallowed the error and yielded again, close() finishes it off.
        try:
            coro.close()
        except Exception:
            pass  # it yielded even while being closed: drop it, the unit fails anyway
        finally:
            self._stepping = False
        self._finish(unit, _FAILED, error)

    def _wake(self, unit: Unit[Any], _wait: Wait[Any]) -> None:
        """Done-callback of the Wait a unit is parked on: make the unit ready; never step."""
        self._parked -= 1
        self._push_ready(unit)

    def _push_ready(self, unit: Unit[Any]) -> None:
        was_empty = not self._ready
        heappush(self._ready, (unit._seq, unit))
        if was_empty and self._on_ready is not None:
            self._on_ready()

    def _finish(
        self, unit: Unit[Any], state: int, value: object, step_next: bool = False
    ) -> Unit[Any] | None:
        """A unit that had left the inline path finished: record the outcome, start its
        flow's next unit (make it ready), notify.  With ``step_next`` (run_ready, which
        steps it next), a successor that has waited longer than every ready unit is
        returned instead of going through the ready heap: popped next anyway."""
        unit._state = state
        unit._value = value
        unit._coro = None
        unit._wait = None
        if state == _DONE:
            self._slow_done += 1
        else:
            self._failed += 1
        queue = self._flows[unit.flow]
        successor = None
        if queue:
            successor = queue.popleft()
            successor._wait = None
            self._queued -= 1
            ready = self._ready
            if not step_next or (ready and ready[0][0] < successor._seq):
                self._push_ready(successor)
                successor = None
        else:
            del self._flows[unit.flow]
        self._pending -= 1
        callbacks = unit._callbacks
        if callbacks is not None:
            unit._callbacks = None
            for callback in callbacks:
                callback(unit)
        if state == _FAILED and self._on_failure is not None:
            self._on_failure(unit)
        if self._pending == self._limit - 1 and self._on_room is not None:
            self._on_room()
        return successor

    def run_ready(self, max_units: int | None = None) -> int:
        """Step ready units, the longest-waiting first, until none is ready (or
        ``max_units`` have been stepped).  Returns how many were stepped.

        The node calls this after handling each batch of incoming messages (whose replies
        resolved Waits).  Units that a step makes ready (a flow's next unit, Waits resolved
        by local store operations) run in the same call.  Must not be called from inside a
        microthread."""
        if self._stepping:
            raise RuntimeError("run_ready called from inside a microthread")
        ready = self._ready
        stepped = 0
        #: A finished unit's successor to step next, when it is the longest-waiting.
        following: Unit[Any] | None = None
        while True:
            if following is not None:
                unit = following
                following = None
                if max_units is not None and stepped >= max_units:
                    self._push_ready(unit)
                    break
            elif ready and (max_units is None or stepped < max_units):
                _seq, unit = heappop(ready)
            else:
                break
            stepped += 1
            coro = unit._coro
            wait = unit._wait
            unit._wait = None
            self._stepping = True
            try:
                if wait is None:  # the first step of a unit that was queued
                    if coro is None:
                        start = unit._start
                        assert start is not None
                        unit._start = None
                        coro = unit._coro = start[0](*start[1])
                    yielded = coro.send(None)
                elif wait._state == _FAILED:
                    assert coro is not None
                    yielded = coro.throw(wait._value)
                else:
                    assert coro is not None
                    yielded = coro.send(wait._value)
            except StopIteration as stop:
                self._stepping = False
                following = self._finish(unit, _DONE, stop.value, True)
                continue
            except Exception as exc:
                self._stepping = False
                following = self._finish(unit, _FAILED, exc, True)
                continue
            except BaseException as exc:
                self._stepping = False  # keep the books straight, then let it through
                self._finish(unit, _FAILED, exc)
                raise
            self._stepping = False
            self._suspend(unit, yielded)
        return stepped

    # -- introspection ----------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The bound on parked + ready + queued units."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Units accepted and not finished (parked, ready or queued): what ``limit`` bounds."""
        return self._pending

    def has_ready(self) -> bool:
        """True if :meth:`run_ready` has something to do."""
        return bool(self._ready)

    def statistics(self) -> SchedulerStatistics:
        """A frozen snapshot of the counters (O(1))."""
        ready = len(self._ready)
        return SchedulerStatistics(
            units_run=self._inline_done + self._failed_inline + self._went_slow,
            completed_inline=self._inline_done,
            completed=self._inline_done + self._slow_done,
            failed=self._failed,
            not_a_store_op=self._not_store_op,
            parked=self._parked,
            ready=ready,
            queued=self._queued,
            in_flight=self._pending,
            max_parked=self._max_parked,
            max_in_flight=self._max_in_flight,
            limit=self._limit,
        )

    def _check(self) -> None:
        """Assert the invariants (tests call this after every step).  O(flows + ready)."""
        assert not self._stepping, "checked while stepping"
        assert 0 <= self._pending <= self._limit, (self._pending, self._limit)
        ready = len(self._ready)
        assert self._pending == self._parked + ready + self._queued, (
            self._pending,
            self._parked,
            ready,
            self._queued,
        )
        # Every registered flow has exactly one active unit, parked or ready.
        assert len(self._flows) == self._parked + ready, (len(self._flows), self._parked, ready)
        assert sum(len(q) for q in self._flows.values() if q) == self._queued
        for _seq, unit in self._ready:
            assert unit._state == _PENDING and unit.flow in self._flows
        for queue in self._flows.values():
            if queue is None:
                continue
            seqs = [u._seq for u in queue]
            assert seqs == sorted(seqs), "a flow's queue is out of arrival order"
