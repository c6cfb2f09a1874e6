"""The local-only baseline: every instance keeps all its state in its own memory.

Each map is a dict in this process, shared objects included, and nothing is ever
reconciled with the other instances: no key layer, no messages, no moving, no
microthread parking.  This is the speed ceiling of the paper's §7.2 (what an NF costs
with its state in plain Python objects), **not a correct NF** as soon as the flows of one
host, or the two directions of one connection, reach two instances: each instance then
sees only its own share (PRADS logs an asset once per instance that saw it, the IDS
counts alerts per instance, two NAT instances hand out the same port, a reply reaching
the other instance finds no mapping).  On one instance it is exact.

A reference wraps the object so that its methods return a coroutine that never suspends,
as the store's local references do; ``submit`` runs the unit inline to completion.  This
is also ``nf.dicts.DictSpace`` (``python -m nf NAME --dicts``, ``bench.nf``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

from store import ObjectNotFound, ObjectRemoved, ReferenceClosed

__all__ = ["LocalMap", "LocalOnlySpace", "LocalStatistics"]

T = TypeVar("T")


async def _ready(value: Any) -> Any:
    # The cheapest awaitable there is (see store.api._ready): the call has run already.
    return value


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: _Ref, *args: Any) -> Any:
        obj = self._obj
        if obj is None:
            self._refuse()
        return _ready(fn(obj, *args))

    method.__name__ = name
    return method


class _Ref:
    __slots__ = ("_key", "_obj", "_removed", "created")

    def __init__(self, obj: Any, key: Any, created: bool) -> None:
        self._obj = obj
        self._key = key
        self._removed = False
        self.created = created

    def _refuse(self) -> None:
        # Same errors as the store's references, so that NF code sees one behaviour.
        if self._removed:
            raise ObjectRemoved(f"[{self._key!r:.60}] was removed")
        raise ReferenceClosed(
            f"[{self._key!r:.60}]: a reference is used only inside its 'async with' block"
        )


_REFS: dict[type, type[_Ref]] = {}


def _ref_class(cls: type) -> type[_Ref]:
    made = _REFS.get(cls)
    if made is None:
        namespace: dict[str, Any] = {"__slots__": ()}
        for name in dir(cls):
            if name.startswith("_") or name == "merge":
                continue
            member = getattr(cls, name)
            if callable(member):
                namespace[name] = _wrap(name, member)
        made = _REFS[cls] = type(f"{cls.__name__}LocalRef", (_Ref,), namespace)
    return made


class _Access:
    __slots__ = ("_args", "_create", "_key", "_map", "_ref")

    def __init__(self, map_: LocalMap[Any], key: Any, create: bool, args: tuple[Any, ...]) -> None:
        self._map = map_
        self._key = key
        self._create = create
        self._args = args
        self._ref: _Ref | None = None

    async def __aenter__(self) -> Any:
        map_ = self._map
        obj = map_._objects.get(self._key)
        created = False
        if obj is None:
            if not self._create:
                raise ObjectNotFound(f"{map_.name}[{self._key!r}] does not exist")
            obj = map_._objects[self._key] = map_.cls(*self._args)
            created = True
        ref = self._ref = map_._ref(obj, self._key, created)
        map_._open[id(ref)] = ref
        return ref

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ref = self._ref
        if ref is not None:
            ref._obj = None
            del self._map._open[id(ref)]


class LocalMap(Generic[T]):
    """A map of objects of one class, in a dict of this instance."""

    def __init__(self, name: str, cls: type[T]) -> None:
        self.name = name
        self.cls = cls
        self._objects: dict[Any, T] = {}
        self._ref = _ref_class(cls)
        # References inside their block, so that a remove makes them raise ObjectRemoved
        # as the store's do (few at a time: one or two per unit running).
        self._open: dict[int, _Ref] = {}

    def create(self, key: Any, *args: Any) -> _Access:
        return _Access(self, key, True, args)

    def get(self, key: Any, *, readonly: bool = False) -> _Access:
        return _Access(self, key, False, ())

    def local(self, key: Any) -> T | None:
        """The object itself (``store.Map.local``): here every object is local."""
        return self._objects.get(key)

    def local_create(self, key: Any, *args: Any) -> T | None:
        """The object itself, made if absent (``store.Map.local_create``)."""
        obj = self._objects.get(key)
        if obj is None:
            obj = self._objects[key] = self.cls(*args)
        return obj

    async def remove(self, key: Any) -> bool:
        obj = self._objects.pop(key, None)
        if obj is None:
            return False
        for ref in self._open.values():
            if ref._obj is obj:
                ref._obj = None
                ref._removed = True
        return True

    async def items(self) -> AsyncIterator[tuple[Any, T]]:
        for key, obj in list(self._objects.items()):
            yield key, obj


class _Done:
    """A finished microthread: what ``submit`` returns here."""

    __slots__ = ("_exc", "_value", "flow")

    def __init__(self, flow: Any, value: Any, exc: BaseException | None) -> None:
        self.flow = flow
        self._value = value
        self._exc = exc

    def done(self) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return self._exc

    def failed(self) -> bool:
        return self._exc is not None

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._value

    def __await__(self) -> Any:
        # ``await unit`` gives the result (or raises), as the store's units do.
        return self._awaited().__await__()

    async def _awaited(self) -> Any:
        return self.result()


@dataclass
class LocalStatistics:
    """What ``statistics()`` gives for a local-only instance: its name, units run and
    failed, and the store's migration figures (always 0 here, so callers summing them
    over any backend need no special case)."""

    node: str = "dicts"
    backend: str = "local-only"
    units_run: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    migrations_in: int = 0
    migrations_out: int = 0


class LocalOnlySpace:
    """One instance's ``store.Space`` on plain dicts (see the module docstring)."""

    def __init__(self, name: str = "dicts") -> None:
        self.name = name
        self._maps: dict[str, LocalMap[Any]] = {}
        self._stats = LocalStatistics(node=name)

    def map(self, name: str, cls: type[T]) -> LocalMap[T]:
        existing = self._maps.get(name)
        if existing is None:
            existing = self._maps[name] = LocalMap(name, cls)
        elif existing.cls is not cls:
            raise TypeError(
                f"map {name!r} holds {existing.cls.__qualname__}, not {cls.__qualname__}"
            )
        return existing

    def submit_nowait(self, flow: Any, fn: Callable[..., Any], *args: Any) -> _Done:
        self._stats.units_run += 1
        coro = fn(*args)
        try:
            coro.send(None)
        except StopIteration as stop:
            return _Done(flow, stop.value, None)
        except Exception as exc:
            errors = self._stats.errors
            name = f"unit-{type(exc).__name__}"
            errors[name] = errors.get(name, 0) + 1
            return _Done(flow, None, exc)
        coro.close()
        raise RuntimeError("a unit on local state suspended: it awaited something not local")

    async def submit(self, flow: Any, fn: Callable[..., Any], *args: Any) -> _Done:
        return self.submit_nowait(flow, fn, *args)

    async def flush(self, timeout: float | None = None) -> None:
        return None

    def statistics(self) -> LocalStatistics:
        return LocalStatistics(**{**vars(self._stats), "errors": dict(self._stats.errors)})
