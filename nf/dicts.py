"""A stand-in for ``store.Space`` on plain dicts: the same NF code, no store.

For measuring what the object space costs an NF (``python -m bench.nf``): a
:class:`DictSpace` offers what NFs use of a space (``map``, ``create`` / ``get`` as
``async with``, awaited methods, ``remove``, ``items``, ``submit``, ``flush``) with each
map a dict in this process.  A reference is the object wrapped so that its methods return
an awaitable, made the cheapest way we know (a coroutine that never suspends), as the
store's local references do; everything else the store does (locating keys, owning,
moving, microthread scheduling) is absent.  One member only, nothing shared with anyone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from store import ObjectNotFound

__all__ = ["DictMap", "DictSpace"]

T = TypeVar("T")


async def _ready(value: Any) -> Any:
    return value


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: _Ref, *args: Any) -> Any:
        return _ready(fn(self._obj, *args))

    method.__name__ = name
    return method


class _Ref:
    __slots__ = ("_obj", "created")

    def __init__(self, obj: Any, created: bool) -> None:
        self._obj = obj
        self.created = created


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
        made = _REFS[cls] = type(f"{cls.__name__}DictRef", (_Ref,), namespace)
    return made


class _Access:
    __slots__ = ("_create", "_key", "_map")

    def __init__(self, map_: DictMap[Any], key: Any, create: bool) -> None:
        self._map = map_
        self._key = key
        self._create = create

    async def __aenter__(self) -> Any:
        map_ = self._map
        obj = map_._objects.get(self._key)
        if obj is not None:
            return map_._ref(obj, False)
        if not self._create:
            raise ObjectNotFound(f"{map_.name}[{self._key!r}] does not exist")
        obj = map_._objects[self._key] = map_.cls()
        return map_._ref(obj, True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class DictMap(Generic[T]):
    """A map of objects of one class, in a dict."""

    def __init__(self, name: str, cls: type[T]) -> None:
        self.name = name
        self.cls = cls
        self._objects: dict[Any, T] = {}
        self._ref = _ref_class(cls)

    def create(self, key: Any) -> _Access:
        return _Access(self, key, True)

    def get(self, key: Any, *, readonly: bool = False) -> _Access:
        return _Access(self, key, False)

    async def remove(self, key: Any) -> bool:
        return self._objects.pop(key, None) is not None

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


@dataclass
class DictStatistics:
    node: str = "dicts"
    migrations_in: int = 0
    migrations_out: int = 0


class DictSpace:
    """One member's worth of ``store.Space`` on plain dicts (see the module docstring)."""

    name = "dicts"

    def __init__(self) -> None:
        self._maps: dict[str, DictMap[Any]] = {}

    def map(self, name: str, cls: type[T]) -> DictMap[T]:
        existing = self._maps.get(name)
        if existing is None:
            existing = self._maps[name] = DictMap(name, cls)
        return existing

    def submit_nowait(self, flow: Any, fn: Callable[..., Any], *args: Any) -> _Done:
        coro = fn(*args)
        try:
            coro.send(None)
        except StopIteration as stop:
            return _Done(flow, stop.value, None)
        except Exception as exc:
            return _Done(flow, None, exc)
        coro.close()
        raise RuntimeError("a unit on plain dicts suspended: it awaited something not local")

    async def submit(self, flow: Any, fn: Callable[..., Any], *args: Any) -> _Done:
        return self.submit_nowait(flow, fn, *args)

    async def flush(self, timeout: float | None = None) -> None:
        return None

    def statistics(self) -> DictStatistics:
        return DictStatistics()
