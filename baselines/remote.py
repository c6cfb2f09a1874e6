"""The remote-only baseline (StatelessNF): the instance holds no state between packets.

Every access goes to a remote store; objects never move to the instance.  What a packet
does to one object is batched as StatelessNF does it:

* **Per-flow objects** (``SingleWriter``): ``async with m.create(key) / m.get(key)``
  fetches the object's state once (one round trip; a create is a get-or-create, atomic at
  the store), the methods then run on that copy in this process, and at the end of the
  block the state, if it changed, is written back with a compare-and-set on the version
  read.  The write-back is not waited for (it travels pipelined behind the other
  requests, and ``flush()`` waits for all of them), so a packet costs one round trip per
  object it touches.  If another instance wrote the object in between (the CAS fails: two
  instances serving one connection's two directions), the calls made through the
  reference are replayed on the newer state and written again, so no update is lost; a
  later access of this instance to that key waits for the replay.
* **Shared objects** (``MultiWriter``): entering the block checks (or creates) the object
  and fetches its state; a blocking method is an atomic read-modify-write at the store
  (one round trip: the NAT's port allocation), an ``@untethered`` one is sent and not
  waited for, and a ``@stale`` one is answered from the state fetched at entry while it is
  younger than its ``max_age`` (else it too goes to the store).  How the store makes a
  method call atomic is the store's business (:class:`StateStore`): our kv server runs the
  method itself; Redis gets a compare-and-set script and the client runs the method.
* Packets run as microthreads of their flow on the store's own scheduler
  (``store.shell.microthreads``), as on S6: a unit parks while its request is out and the
  flow's later packets queue behind it, other flows go on, so the comparison with S6
  differs in where state lives and nothing else.

A reply from the store resolves a :class:`~store.core.scheduler.Wait`; a microthread
awaiting it parks on it, a trio task (the runner's ``tick``, a control-plane query)
blocks on it through the shell's hook.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar

import trio

from store import ObjectNotFound, ObjectRemoved, ReferenceClosed, UntetheredCallsFailed
from store.core.objects import ClassInfo, MethodKind, ObjectKind, dump_state, info_of, load_state
from store.core.scheduler import Unit, Wait
from store.shell.microthreads import Microthreads, open_microthreads

__all__ = [
    "Entry",
    "RemoteMap",
    "RemoteSpace",
    "RemoteStatistics",
    "StateStore",
    "Versions",
    "class_path",
    "open_remote_space",
]

T = TypeVar("T")

#: An object as the store keeps it: ``(version, state)``, both bytes.  The version is
#: 8 bytes, new at every write (see :class:`Versions`); the state is ``dump_state``'s cbor.
Entry = tuple[bytes, bytes]

#: Times a write-back that lost its compare-and-set is replayed before it is counted as
#: failed (each retry means another instance wrote the same object in between).
MAX_REPLAYS: Final = 64


def class_path(info: ClassInfo) -> str:
    """``"module:qualname"``: how a store that runs methods finds the class."""
    return f"{info.cls.__module__}:{info.cls.__qualname__}"


class Versions:
    """New object versions: 4 random bytes of this client, then a 4-byte counter.

    A compare-and-set matches the version it read; a version is never reused by another
    writer, nor by this one within 2**32 writes, so an object removed and made again
    never matches a stale version (the ABA case)."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(4)
        self._count = itertools.count(1)

    def next(self) -> bytes:
        return self._prefix + (next(self._count) & 0xFFFFFFFF).to_bytes(4, "big")


class StateStore(Protocol):
    """What a remote store offers the remote-only space (our kv server, Redis).

    Each request returns a :class:`Wait` settled when the store answers; requests of one
    client are applied in the order they were made.  Keys are the NF's keys, ``map_name``
    says which map."""

    kind: str

    def fetch(self, map_name: str, key: Any) -> Wait[Entry | None]:
        """The object's entry, or None if there is none."""
        ...

    def create(
        self, map_name: str, key: Any, info: ClassInfo, version: bytes, state: bytes
    ) -> Wait[tuple[bool, Entry]]:
        """Store ``(version, state)`` unless the key exists: ``(made?, entry now)``."""
        ...

    def cas(
        self, map_name: str, key: Any, expect: bytes, version: bytes, state: bytes
    ) -> Wait[Entry | bool | None]:
        """Replace the entry if its version is ``expect``: True; None if there is no entry;
        else the entry as it is (the caller lost the race)."""
        ...

    def call(
        self,
        map_name: str,
        key: Any,
        info: ClassInfo,
        method: str,
        args: tuple[Any, ...],
        hint: Entry | None,
    ) -> Wait[Any]:
        """Apply ``method(*args)`` to the object atomically at the store; its result.
        ``hint``: the entry this client read last, which a store may use as its guess."""
        ...

    def call_nowait(
        self, map_name: str, key: Any, info: ClassInfo, method: str, args: tuple[Any, ...]
    ) -> None:
        """Like :meth:`call`, not waited for; a failure is raised by the next
        :meth:`sync` (as ``UntetheredCallsFailed``)."""
        ...

    def remove(self, map_name: str, key: Any) -> Wait[bool]:
        """Remove the object; whether there was one."""
        ...

    async def scan(self, map_name: str) -> list[tuple[Any, bytes]]:
        """Every ``(key, state)`` of the map (the control plane)."""
        ...

    async def sync(self) -> None:
        """Return once every request made before has been applied at the store."""
        ...

    def counters(self) -> dict[str, int]:
        """Requests, round trips and such, for ``statistics()``."""
        ...


async def _ready(value: Any) -> Any:
    return value


# --- references -----------------------------------------------------------------------


class _Ref:
    """A reference of the remote-only space: the object's state as fetched at entry."""

    __slots__ = ("_entry", "_fetched", "_k", "_log", "_map", "_obj", "_state", "created")

    def __init__(self, map_: RemoteMap[Any], k: tuple[str, Any], entry: Entry) -> None:
        self._map = map_
        self._k = k
        self._entry: Entry | None = entry
        self._obj: Any = None
        self._fetched = trio.current_time()
        # 0 open, 1 closed, 2 removed (by a remove of this instance inside the block)
        self._state = 0
        self._log: list[tuple[str, tuple[Any, ...]]] = []
        self.created = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._k[0]}[{self._k[1]!r:.60}]>"

    def _check(self) -> None:
        if self._state == 1:
            raise ReferenceClosed(
                f"{self._k[0]}[{self._k[1]!r:.60}]: a reference is used only inside its "
                "'async with' block; take a new one"
            )
        if self._state == 2:
            raise ObjectRemoved(f"{self._k[0]}[{self._k[1]!r:.60}] was removed")

    def _copy(self) -> Any:
        obj = self._obj
        if obj is None:
            assert self._entry is not None
            obj = self._obj = load_state(self._map.cls, self._entry[1])
        return obj


def _single_method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A per-flow object's method: runs on the copy; logged in case of a replay."""

    def method(self: _Ref, *args: Any) -> Any:
        if self._state:
            self._check()
        self._log.append((name, args))
        return _ready(fn(self._copy(), *args))

    method.__name__ = name
    return method


def _multi_method(name: str, info: ClassInfo) -> Callable[..., Any]:
    """A shared object's method: at the store (atomically), not waited for if untethered,
    from the copy fetched at entry if ``@stale`` and young enough."""
    minfo = info.methods[name]
    kind = minfo.kind
    max_age = minfo.max_age
    fn = getattr(info.cls, name)

    def method(self: _Ref, *args: Any) -> Any:
        if self._state:
            self._check()
        map_ = self._map
        store = map_._space._store
        if kind is MethodKind.STALE and self._entry is not None and max_age > 0:
            if trio.current_time() - self._fetched <= max_age:
                return _ready(fn(self._copy(), *args))
        if kind is MethodKind.UNTETHERED:
            store.call_nowait(map_.name, self._k[1], info, name, args)
            self._entry = None  # our own update makes the copy old
            return _ready(None)
        hint = self._entry
        self._entry = None
        return store.call(map_.name, self._k[1], info, name, args, hint)

    method.__name__ = name
    return method


def _readonly_method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: _Ref, *args: Any) -> Any:
        if self._state:
            self._check()
        return _ready(fn(self._copy(), *args))

    method.__name__ = name
    return method


def _refuse(name: str) -> Callable[..., Any]:
    def method(self: _Ref, *args: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__}.{name}: a read-only reference runs @stale methods only "
            "(use a writable get)"
        )

    method.__name__ = name
    return method


_REF_CLASSES: dict[tuple[type, str], type[_Ref]] = {}


def _ref_class(info: ClassInfo, mode: str) -> type[_Ref]:
    made = _REF_CLASSES.get((info.cls, mode))
    if made is not None:
        return made
    namespace: dict[str, Any] = {"__slots__": ()}
    for name, minfo in info.methods.items():
        fn = getattr(info.cls, name)
        if mode == "readonly":
            stale = minfo.kind is MethodKind.STALE
            namespace[name] = _readonly_method(name, fn) if stale else _refuse(name)
        elif info.kind is ObjectKind.SINGLE:
            namespace[name] = _single_method(name, fn)
        else:
            namespace[name] = _multi_method(name, info)
    made = type(f"{info.cls.__qualname__}RemoteRef_{mode}", (_Ref,), namespace)
    _REF_CLASSES[(info.cls, mode)] = made
    return made


class _Access:
    """``async with m.create(key, *args) / m.get(key[, readonly=True]) as ref``."""

    __slots__ = ("_args", "_create", "_key", "_map", "_readonly", "_ref")

    def __init__(
        self, map_: RemoteMap[Any], key: Any, create: bool, readonly: bool, args: tuple[Any, ...]
    ) -> None:
        self._map = map_
        self._key = key
        self._create = create
        self._readonly = readonly
        self._args = args
        self._ref: _Ref | None = None

    async def __aenter__(self) -> Any:
        map_ = self._map
        space = map_._space
        store = space._store
        key = self._key
        k = (map_.name, key)
        while True:
            conflicts = space._conflicts
            created = False
            if self._create and not self._readonly:
                state = dump_state(map_.cls(*self._args))
                created, entry = await store.create(
                    map_.name, key, map_.info, space._versions.next(), state
                )
            else:
                found = await store.fetch(map_.name, key)
                if found is None:
                    raise ObjectNotFound(f"{map_.name}[{key!r}] does not exist")
                entry = found
            if conflicts == space._conflicts or not map_._single:
                break
            # A write-back of ours lost a race while this read was out: the state read may
            # lack our calls.  Wait for their replay, then read again (rare).
            await space._replayed(k)
        mode = "readonly" if self._readonly else "writable"
        ref = (map_._readonly_ref if self._readonly else map_._writable_ref)(map_, k, entry)
        ref.created = created
        self._ref = ref
        if mode == "writable" and map_._single:
            space._open.setdefault(k, []).append(ref)
        return ref

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ref = self._ref
        if ref is None:
            return
        removed = ref._state == 2
        ref._state = 1
        map_ = self._map
        if self._readonly or not map_._single:
            return
        space = map_._space
        k = ref._k
        refs = space._open[k]
        refs.remove(ref)
        if not refs:
            del space._open[k]
        if removed or ref._obj is None:
            return  # removed, or no method ran: nothing can have changed
        entry = ref._entry
        assert entry is not None
        state = dump_state(ref._obj)
        if state != entry[1]:
            space._write_back(map_, k, entry[0], state, ref._log)


class RemoteMap(Generic[T]):
    """A map of the remote-only space: every object at the store."""

    def __init__(self, space: RemoteSpace, name: str, cls: type[T]) -> None:
        info = info_of(cls)
        self.name = name
        self.cls = cls
        self.info = info
        self._space = space
        self._single = info.kind is ObjectKind.SINGLE
        self._writable_ref = _ref_class(info, "writable")
        self._readonly_ref = _ref_class(info, "readonly")

    def __repr__(self) -> str:
        return f"<RemoteMap {self.name!r} of {self.info.name} on {self._space._store.kind}>"

    def create(self, key: Any, *args: Any) -> _Access:
        return _Access(self, key, True, False, args)

    def get(self, key: Any, *, readonly: bool = False) -> _Access:
        return _Access(self, key, False, readonly, ())

    async def remove(self, key: Any) -> bool:
        space = self._space
        for ref in space._open.get((self.name, key), ()):
            ref._state = 2  # references of this instance raise ObjectRemoved, as on S6
        removed: bool = await space._store.remove(self.name, key)
        return removed

    async def items(self) -> AsyncIterator[tuple[Any, T]]:
        """Each object once, as a copy (the control plane: one scan of the store)."""
        for key, state in await self._space._store.scan(self.name):
            yield key, load_state(self.cls, state)


@dataclass(frozen=True)
class RemoteStatistics:
    """``statistics()`` of a remote-only instance.  ``migrations_in``/``_out`` are always
    0 (objects never move here), so code summing them over any backend works."""

    node: str
    backend: str
    units_run: int
    microthreads_parked: int
    write_backs: int
    write_conflicts: int
    errors: dict[str, int] = field(default_factory=dict)
    store: dict[str, int] = field(default_factory=dict)
    migrations_in: int = 0
    migrations_out: int = 0


class RemoteSpace:
    """One instance's space with all of its state at a remote store (see the module
    docstring).  Made by :func:`open_remote_space`."""

    def __init__(self, name: str, store: StateStore, micro: Microthreads) -> None:
        self.name = name
        self._store = store
        self._micro = micro
        self._maps: dict[str, RemoteMap[Any]] = {}
        self._versions = Versions()
        #: Writable single-writer references inside their block, by (map, key).
        self._open: dict[tuple[str, Any], list[_Ref]] = {}
        #: Write-backs (and their replays) not yet acknowledged.
        self._writes: set[Wait[Any]] = set()
        #: Keys whose write-back is being replayed, and the Wait settled when it is done.
        self._replaying: dict[tuple[str, Any], Wait[None]] = {}
        self._conflicts = 0
        self._write_backs = 0
        self._failures: list[str] = []
        self._failed = 0
        self._errors: dict[str, int] = {}
        self.submit_nowait = micro.submit_nowait

    def map(self, name: str, cls: type[T]) -> RemoteMap[T]:
        existing = self._maps.get(name)
        if existing is not None:
            if existing.cls is not cls:
                raise TypeError(f"map {name!r} holds {existing.info.name}, not {cls.__qualname__}")
            return existing
        made: RemoteMap[T] = RemoteMap(self, name, cls)
        self._maps[name] = made
        return made

    async def submit(self, flow: Hashable, fn: Callable[..., Any], *args: Any) -> Unit[Any]:
        return await self._micro.submit(flow, fn, *args)

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every write-back and untethered call made before has been applied
        at the store; ``UntetheredCallsFailed`` if some failed since the last flush."""
        with trio.fail_after(timeout if timeout is not None else 60.0):
            while self._writes:
                wait = next(iter(self._writes))
                try:
                    await wait
                except Exception:
                    pass  # counted by its callback
            await self._store.sync()
        if self._failed:
            count, failures = self._failed, self._failures
            self._failed, self._failures = 0, []
            raise UntetheredCallsFailed(count, failures)

    def statistics(self) -> RemoteStatistics:
        micro = self._micro.statistics()
        return RemoteStatistics(
            node=self.name,
            backend=f"remote-only/{self._store.kind}",
            units_run=micro.units_run,
            microthreads_parked=micro.parked,
            write_backs=self._write_backs,
            write_conflicts=self._conflicts,
            errors=dict(self._errors),
            store=self._store.counters(),
        )

    # -- write-backs ---------------------------------------------------------------------

    def _fail_write(self, what: str) -> None:
        self._failed += 1
        if len(self._failures) < 5:
            self._failures.append(what)

    def _write_back(
        self,
        map_: RemoteMap[Any],
        k: tuple[str, Any],
        expect: bytes,
        state: bytes,
        log: list[tuple[str, tuple[Any, ...]]],
    ) -> None:
        """Compare-and-set the new state; on a lost race, replay ``log`` on the state that
        won and try again (bounded).  Not waited for; ``flush`` waits for it."""
        self._write_backs += 1
        writes = self._writes
        tries = [0]

        def attempt(expect: bytes, state: bytes) -> None:
            wait = self._store.cas(map_.name, k[1], expect, self._versions.next(), state)
            writes.add(wait)
            wait.add_done_callback(answered)

        def answered(wait: Wait[Entry | bool | None]) -> None:
            writes.discard(wait)
            try:
                outcome = wait.result()
            except Exception as exc:
                self._fail_write(f"write-back of {k[0]}[{k[1]!r:.60}]: {exc}")
                self._settle_replay(k)
                return
            if outcome is True or outcome is None:  # written, or removed meanwhile
                self._settle_replay(k)
                return
            assert isinstance(outcome, tuple)
            if tries[0] == 0:
                self._conflicts += 1
                if k not in self._replaying:
                    self._replaying[k] = Wait(("replay", k))
            tries[0] += 1
            if tries[0] > MAX_REPLAYS:
                self._fail_write(f"write-back of {k[0]}[{k[1]!r:.60}]: {MAX_REPLAYS} lost races")
                self._settle_replay(k)
                return
            try:
                obj = load_state(map_.cls, outcome[1])
                for name, args in log:
                    getattr(obj, name)(*args)
                again = dump_state(obj)
            except Exception as exc:
                self._fail_write(f"replay on {k[0]}[{k[1]!r:.60}]: {exc!r}")
                self._settle_replay(k)
                return
            attempt(outcome[0], again)

        attempt(expect, state)

    def _settle_replay(self, k: tuple[str, Any]) -> None:
        wait = self._replaying.pop(k, None)
        if wait is not None:
            wait.resolve(None)

    async def _replayed(self, k: tuple[str, Any]) -> None:
        wait = self._replaying.get(k)
        if wait is not None:
            await wait


@asynccontextmanager
async def open_remote_space(name: str, store: StateStore) -> AsyncIterator[RemoteSpace]:
    """A remote-only space named ``name`` over ``store``, with its microthread driver,
    for the duration of the block.  Everything written is flushed on a clean exit."""

    def failed(unit: Unit[Any]) -> None:
        exc = unit.exception()
        name_ = f"unit-{type(exc).__name__}"
        space._errors[name_] = space._errors.get(name_, 0) + 1

    async with open_microthreads(on_failure=failed) as micro:
        space = RemoteSpace(name, store, micro)
        yield space
        await space.flush()
