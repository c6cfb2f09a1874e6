"""Object kinds, method annotations and object state on the wire (paper §4.2, §5.1, Table 2).

An NF author writes ordinary classes:

* :class:`SingleWriter` for per-flow (partitionable) state: at most one writable reference
  in the whole cluster; the object moves, lazily, to the node that writes it.
* :class:`MultiWriter` for shared state: the object stays with its owner; calls travel to it.

and marks methods:

* ``@untethered``: an update whose caller does not wait; calls are batched per destination.
* ``@stale(max_age)``: a read that may be answered from a local cache no older than
  ``max_age`` seconds.
* ``merge(self, other)`` on a MultiWriter: enables a per-node replica that absorbs
  untethered calls and is folded into the owner's object by ``merge``.

Everything about a class the store needs is computed once, when the class is defined, into
a :class:`ClassInfo` (``cls.__s6_info__``), so that no per-call introspection happens on
the hot path.

Objects travel between nodes as cbor of their plain fields (``vars(obj)``), never pickled:
a class whose state cbor cannot encode fails with a ``TypeError`` naming the class and the
field, at the moment it would have to travel.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import cbor2

from store.wire.errors import MalformedMessage

__all__ = [
    "ClassInfo",
    "MethodInfo",
    "MethodKind",
    "MultiWriter",
    "ObjectKind",
    "SingleWriter",
    "dump_state",
    "info_of",
    "load_state",
    "stale",
    "untethered",
]

F = TypeVar("F", bound=Callable[..., Any])


class ObjectKind(enum.Enum):
    """Which consistency model a class follows."""

    SINGLE = "single-writer"
    MULTI = "multi-writer"


class MethodKind(enum.Enum):
    """How a call of a method travels."""

    CALL = "call"  # blocking: applied at the object, caller waits for the result
    STALE = "stale"  # a read answered from a cache no older than max_age
    UNTETHERED = "untethered"  # an update the caller does not wait for


@dataclass(frozen=True, slots=True)
class MethodInfo:
    name: str
    kind: MethodKind
    max_age: float = 0.0


@dataclass(frozen=True, slots=True)
class ClassInfo:
    """What the store knows about one object class."""

    cls: type
    kind: ObjectKind
    methods: dict[str, MethodInfo]
    mergeable: bool

    @property
    def name(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


def untethered(fn: F) -> F:
    """Mark ``fn`` as an update the caller does not wait for (paper: "untethered update").

    On a MultiWriter, a call returns ``None`` at once; calls from one node are applied at the
    owner in the order they were made, and before any later blocking call from that node.
    On a SingleWriter, whose writable reference is always local, it is an ordinary call.
    """
    fn.__s6_method__ = MethodInfo(fn.__name__, MethodKind.UNTETHERED)  # type: ignore[attr-defined]
    return fn


def stale(max_age: float) -> Callable[[F], F]:
    """Mark a read-only method whose result may be up to ``max_age`` seconds old.

    Through a read-only reference (or any reference to a MultiWriter that is not local) the
    result comes from a per-node cache refreshed from the object's owner when older than
    ``max_age``.  Through a writable local reference it is an ordinary call.
    """
    if isinstance(max_age, bool) or not isinstance(max_age, int | float) or max_age < 0:
        raise TypeError(f"@stale needs a max_age in seconds >= 0, not {max_age!r}")

    def mark(fn: F) -> F:
        fn.__s6_method__ = MethodInfo(fn.__name__, MethodKind.STALE, float(max_age))  # type: ignore[attr-defined]
        return fn

    return mark


def _collect(cls: type, kind: ObjectKind) -> ClassInfo:
    methods: dict[str, MethodInfo] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or name == "merge" or not callable(member):
            continue
        if isinstance(inspect.getattr_static(cls, name), staticmethod | classmethod):
            continue
        if inspect.iscoroutinefunction(member):
            raise TypeError(
                f"{cls.__qualname__}.{name} is async: object methods are plain functions "
                "(the store makes every call awaitable)"
            )
        methods[name] = getattr(member, "__s6_method__", MethodInfo(name, MethodKind.CALL))
    mergeable = callable(getattr(cls, "merge", None))
    if mergeable and kind is ObjectKind.SINGLE:
        raise TypeError(f"{cls.__qualname__}: merge() is for MultiWriter classes only")
    return ClassInfo(cls, kind, methods, mergeable)


class _Object:
    __s6_info__: ClassVar[ClassInfo]
    __s6_kind__: ClassVar[ObjectKind]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__s6_info__ = _collect(cls, cls.__s6_kind__)


class SingleWriter(_Object):
    """Base of per-flow objects: one writable reference at a time, moving to its writer.

    Subclasses must be constructible with no arguments (the store builds fresh objects with
    ``cls()``) and keep their state in plain, cbor-encodable instance fields.
    """

    __s6_kind__ = ObjectKind.SINGLE


class MultiWriter(_Object):
    """Base of shared objects: they stay with their owner and calls travel to them.

    Calls are applied one at a time, in arrival order; each caller's calls in its own order.
    Define ``merge(self, other)`` to get per-node replicas for untethered updates (§4.2).
    """

    __s6_kind__ = ObjectKind.MULTI


def info_of(cls: type) -> ClassInfo:
    """The :class:`ClassInfo` of an object class, or a ``TypeError`` saying what is wrong."""
    info = getattr(cls, "__s6_info__", None)
    if not isinstance(info, ClassInfo) or info.cls is not cls:
        raise TypeError(
            f"{getattr(cls, '__qualname__', cls)!r} is not a store object class: "
            "subclass store.SingleWriter or store.MultiWriter"
        )
    return info


def dump_state(obj: object) -> bytes:
    """The object's plain fields as cbor bytes (encoded once, carried opaque on the wire).

    Raises ``TypeError`` naming the class and the offending field.  O(size of the state).
    """
    state = vars(obj)
    try:
        return cbor2.dumps(state)
    except Exception:
        for field, value in state.items():
            try:
                cbor2.dumps(value)
            except Exception as exc:
                raise TypeError(
                    f"{type(obj).__qualname__}.{field} holds a {type(value).__name__}, which "
                    f"cannot travel as cbor ({exc}); keep object state in plain fields"
                ) from None
        raise


def load_state(cls: type, data: bytes) -> Any:
    """Rebuild an object of ``cls`` from :func:`dump_state` output without calling
    ``__init__`` (which would reset the fields we are about to restore).

    cbor has one array type, so a field that held a tuple comes back as a list.  State that
    is not a cbor map (a peer's fault: our own dump_state never makes it) raises
    :class:`~store.wire.errors.MalformedMessage`."""
    try:
        state = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for a truncated or bad item
        raise MalformedMessage(f"{cls.__qualname__} state is not cbor: {exc}") from None
    if type(state) is not dict:
        raise MalformedMessage(f"{cls.__qualname__} state is not a map of fields")
    obj: Any = object.__new__(cls)
    obj.__dict__.update(state)
    return obj
