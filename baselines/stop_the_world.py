"""The stop-the-world baseline (OpenNF-style, paper §3.1): flows' state moves in bulk while
their traffic waits.

Where state lives is S6's own space underneath: a single-writer object (a flow's state) is
local to the instance that uses it, and a multi-writer one (shared state) sits on one
instance behind remote calls, which is what OpenNF's per-flow and shared state are.  What
this backend adds is *knowing each flow's objects*: :class:`StopTheWorldSpace` wraps the
space so that every microthread runs with its flow key current, and every ``create`` or
writable ``get`` of a single-writer object records ``(map, key)`` under that flow key.  A
scale event then moves exactly those objects, all at once, instead of each one on its
flow's next packet:

1. the sender (``bench.sender``, stop-the-world mode) holds back all traffic, flushes what
   it packed, changes the steering and sends each instance that loses flows a MOVE marker
   naming the flows and their new instance (``nf.datachannel``);
2. that instance, once it has processed everything before the marker, takes the moved
   flows' records (:meth:`StopTheWorldSpace.take_records`) and sends them to the new
   instance in HANDOFF datagrams (:func:`encode_records`);
3. the new instance records them as its own (:meth:`StopTheWorldSpace.adopt`), acquires
   every object at once (:meth:`StopTheWorldSpace.acquire`: one concurrent ``get`` each) and
   acknowledges; the old instance then acknowledges the MOVE;
4. the sender releases the held traffic, in order.

Nothing is lost and nothing reordered, since no frame of a moved flow is in flight anywhere
while its state moves; the price is the pause, which every frame sent meanwhile waits out
(the sink's latency shows it).  The data-channel side of steps 2-3 is ``nf.serve``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable, Iterable
from typing import TYPE_CHECKING, Any

import cbor2
import trio

from store import ObjectNotFound, StoreError
from store.core.objects import ObjectKind
from store.wire.errors import MalformedMessage
from store.wire.messages import key_from_wire

if TYPE_CHECKING:
    import store

__all__ = [
    "FlowRecords",
    "StopTheWorldSpace",
    "decode_records",
    "encode_records",
]

#: One moved flow as a hand-off carries it: the sender's flow number, the NF's flow key,
#: and the (map, key) of each single-writer object the flow created or wrote.
FlowRecords = tuple[int, Hashable, list[tuple[str, Hashable]]]


class _FlowSteps:
    """A microthread's coroutine, stepped with its flow key current.

    The scheduler steps coroutines by hand (``send``/``throw``) and interleaves them at
    every remote wait, so "the current flow" is only right if it is set around each step,
    not once per unit; this object is what the scheduler steps instead of the NF's
    coroutine, and it sets the flow for exactly the time the NF's code runs."""

    __slots__ = ("_coro", "_flow", "_space")

    def __init__(
        self,
        space: StopTheWorldSpace,
        flow: Hashable,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
    ) -> None:
        self._space = space
        self._flow = flow
        # Made here, not by the caller: the scheduler calls this only once it has room for
        # the unit, so a refused submit leaves no coroutine that was never awaited.
        self._coro = fn(*args)

    def send(self, value: Any) -> Any:
        space = self._space
        before = space.current
        space.current = self._flow
        try:
            return self._coro.send(value)
        finally:
            space.current = before

    def throw(self, exc: BaseException) -> Any:
        space = self._space
        before = space.current
        space.current = self._flow
        try:
            return self._coro.throw(exc)
        finally:
            space.current = before

    def close(self) -> None:
        self._coro.close()

    def __repr__(self) -> str:
        # The scheduler names a misbehaving microthread by this (it has no __qualname__).
        return repr(self._coro)


class _RecordingMap:
    """A map of the space whose single-writer ``create`` and writable ``get`` record the
    key under the current flow; everything else is the map's own."""

    __slots__ = ("_inner", "_records", "_space")

    def __init__(self, space: StopTheWorldSpace, inner: store.Map[Any]) -> None:
        self._space = space
        self._inner = inner
        # Multi-writer (shared) objects are not any one flow's: they stay where they are.
        self._records = inner.info.kind is ObjectKind.SINGLE

    def create(self, key: Any, *args: Any) -> Any:
        if self._records:
            self._space.note(self._inner.name, key)
        return self._inner.create(key, *args)

    def get(self, key: Any, *, readonly: bool = False) -> Any:
        if self._records and not readonly:  # a read-only reference moves nothing
            self._space.note(self._inner.name, key)
        return self._inner.get(key, readonly=readonly)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class StopTheWorldSpace:
    """An S6 space that knows each flow's single-writer objects (see the module docstring).

    ``current`` is the flow whose microthread is running (None outside one: a tick or a
    query records nothing)."""

    def __init__(self, space: store.Space) -> None:
        self._space = space
        self._maps: dict[str, _RecordingMap] = {}
        self.current: Hashable | None = None
        #: flow key -> the (map, key) of the single-writer objects it created or wrote.
        self.records: dict[Hashable, set[tuple[str, Hashable]]] = {}
        self.acquired = 0
        self.acquire_failed = 0

    @property
    def name(self) -> str:
        return self._space.name

    @property
    def space(self) -> store.Space:
        """The S6 space underneath."""
        return self._space

    def map(self, name: str, cls: type[Any]) -> Any:
        made = self._maps.get(name)
        if made is None:
            made = self._maps[name] = _RecordingMap(self, self._space.map(name, cls))
        elif made._inner.cls is not cls:
            self._space.map(name, cls)  # raises the space's own TypeError
        return made

    def note(self, map_name: str, key: Hashable) -> None:
        flow = self.current
        if flow is None:
            return
        objects = self.records.get(flow)
        if objects is None:
            objects = self.records[flow] = set()
        objects.add((map_name, key))

    def submit_nowait(self, flow: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return self._space.submit_nowait(flow, _FlowSteps, self, flow, fn, args)

    async def submit(self, flow: Any, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._space.submit(flow, _FlowSteps, self, flow, fn, args)

    async def flush(self, timeout: float | None = None) -> None:
        await self._space.flush(timeout)

    def statistics(self) -> Any:
        return self._space.statistics()

    # -- moving flows ----------------------------------------------------------------------

    def take_records(self, flows: Iterable[tuple[int, Hashable]]) -> list[FlowRecords]:
        """The records of ``flows`` ((sender's flow number, flow key) pairs), forgotten here:
        from now on they are the new instance's to know."""
        out: list[FlowRecords] = []
        for number, key in flows:
            objects = self.records.pop(key, None)
            if objects:
                out.append((number, key, sorted(objects, key=repr)))
        return out

    def adopt(self, entries: Iterable[FlowRecords]) -> list[tuple[str, Hashable]]:
        """Record moved flows' objects as this instance's; the objects, to acquire."""
        wanted: list[tuple[str, Hashable]] = []
        for _number, key, objects in entries:
            mine = self.records.get(key)
            if mine is None:
                mine = self.records[key] = set()
            mine.update(objects)
            wanted.extend(objects)
        return wanted

    async def acquire(self, objects: Iterable[tuple[str, Hashable]]) -> int:
        """Bring every object here at once (a writable ``get`` each, all concurrent); how
        many came.  One that is gone (the flow ended and its state was removed) or whose
        map this instance has not opened is skipped: there is nothing to move."""
        got = 0

        async def one(map_name: str, key: Hashable) -> None:
            nonlocal got
            made = self._maps.get(map_name)
            if made is None:
                return
            try:
                async with made._inner.get(key):
                    got += 1
            except ObjectNotFound:
                pass
            except StoreError:
                # A failed move is not fatal: the flow's next packet fetches the object
                # as S6 always does; counted so that a run can tell.
                self.acquire_failed += 1

        async with trio.open_nursery() as nursery:
            for map_name, key in objects:
                nursery.start_soon(one, map_name, key)
        self.acquired += got
        return got


def encode_records(entries: list[FlowRecords], room: int) -> list[bytes]:
    """Hand-off payloads of at most ``room`` bytes each, whole flows per payload (a flow
    whose records alone exceed ``room`` gets a payload of its own, and raises ValueError
    only if it cannot fit a datagram at all: the caller's encode does that)."""
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 1
    for number, key, objects in entries:
        item = cbor2.dumps([number, key, [[m, k] for m, k in objects]])
        if batch and size + len(item) > room:
            out.append(_join(batch))
            batch, size = [], 1
        batch.append(item)
        size += len(item)
    if batch:
        out.append(_join(batch))
    return out


def _join(items: list[bytes]) -> bytes:
    # A cbor array of indefinite length, so the items encoded one by one need no re-encoding.
    return b"\x9f" + b"".join(items) + b"\xff"


def decode_records(payload: bytes) -> list[FlowRecords]:
    """The flows of one hand-off payload; ValueError when it is not one."""
    try:
        raw = cbor2.loads(payload)
        out: list[FlowRecords] = []
        for number, key, objects in raw:
            if not isinstance(number, int):
                raise ValueError(f"flow number {number!r}")
            out.append(
                (
                    number,
                    key_from_wire(key),
                    [(str(m), key_from_wire(k)) for m, k in objects],
                )
            )
        return out
    except (cbor2.CBORDecodeError, MalformedMessage, TypeError, ValueError) as exc:
        raise ValueError(f"not a hand-off payload: {exc}") from None
