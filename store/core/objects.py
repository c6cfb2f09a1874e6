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

What else crosses the wire is checked where the caller can be told (:func:`check_key` for
keys, :func:`encode_value` for a call's arguments and results): a value that cannot
travel is refused before any message is made, never by the sender task or the peer.
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

import cbor2

from store.wire.errors import MalformedMessage, RemoteCallError, StoreError
from store.wire.messages import MAX_INT_BITS, MAX_KEY_DEPTH

__all__ = [
    "FLAT",
    "MAX_INT_BITS",
    "MAX_KEY_BYTES",
    "MAX_VALUE_DEPTH",
    "ClassInfo",
    "InvalidKey",
    "MethodInfo",
    "MethodKind",
    "MultiWriter",
    "ObjectKind",
    "SingleWriter",
    "UntetheredCallsFailed",
    "ValueNotEncodable",
    "args_travel",
    "check_key",
    "dump_state",
    "encode_args",
    "encode_value",
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


_OPAQUE: dict[tuple[str, ObjectKind], ClassInfo] = {}


def opaque_info(path: str, kind: ObjectKind) -> ClassInfo:
    """A stand-in for the object class ``"module:qualname"`` that this process cannot
    import, so that a node can still hold such an object (handed to it by a leaving
    member) as its plain state, and hand it on intact: it has no methods (a call on it
    fails and says so), and it goes on under the original name, so that a member that has
    the class loads it with its own.  Cached per name and kind."""
    info = _OPAQUE.get((path, kind))
    if info is None:
        module, _, qualname = path.partition(":")
        base: type = SingleWriter if kind is ObjectKind.SINGLE else MultiWriter
        cls = type(
            qualname.rpartition(".")[2] or "Opaque",
            (base,),
            {"__module__": module, "__qualname__": qualname, "__s6_opaque__": True},
        )
        info = _OPAQUE[(path, kind)] = info_of(cls)
    return info


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


# --- what may cross the wire: keys, and a call's arguments and results --------------------

#: Largest key, in cbor bytes.  A key travels in nearly every key-layer message and is
#: hashed for the ring on every access that leaves the node; a flow key is tens of bytes.
MAX_KEY_BYTES: Final = 4096

#: Deepest nesting of one argument (or result) of a call: the frame's own levels (the batch,
#: the message, an untethered batch's entry, the argument list) come on top, and the whole
#: must stay within the decoder's ``store.wire.messages.MAX_DEPTH`` (64).  It also keeps
#: cbor2's encoder, which recurses in C without a guard, far from the stack's end (it
#: crashes the process at some 20,000 levels).
MAX_VALUE_DEPTH: Final = 48


class InvalidKey(StoreError, TypeError, ValueError):
    """The caller's: a key that is not a value with one stable encoding: not built from
    ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` and tuples, a NaN (which
    equals nothing, not even itself) or ``-0.0`` (equal to ``0.0`` but encoded apart, so
    the two would find one object here and two key owners), nested deeper than
    ``MAX_KEY_DEPTH`` or larger than :data:`MAX_KEY_BYTES` encoded.  Refused at the call,
    before any message.  A ``TypeError`` (the wrong material) and a ``ValueError`` (a wrong
    value) both, so either ``except`` catches it."""


class ValueNotEncodable(StoreError, TypeError):
    """The caller's: an argument of a call holds a value cbor cannot carry (or one nested
    deeper than :data:`MAX_VALUE_DEPTH`, or holding itself).  A blocking call raises it
    where it is made; an untethered call fails alone and the next ``flush()`` says so."""


class UntetheredCallsFailed(RemoteCallError):
    """The NF's: untethered calls made before this flush failed (an argument that could
    not travel, or the method raised at the object's owner, where it is logged with the
    caller and the class).  Each failed alone: the calls around it were applied.
    ``count`` says how many, ``failures`` describes the first few."""

    def __init__(self, count: int, failures: list[str]) -> None:
        more = "" if count <= len(failures) else f"; and {count - len(failures)} more"
        super().__init__(
            f"{count} untethered call{'s' if count != 1 else ''} failed since the last "
            f"flush: {'; '.join(failures)}{more}"
        )
        self.count = count
        self.failures = failures


def check_key(key: Any) -> None:
    """Raise :class:`InvalidKey`, saying why, unless ``key`` may name an object.

    O(size of the key), and at most :data:`MAX_KEY_BYTES` steps however large it is: the
    walk stops as soon as the key is known to be too large, before anything encodes it."""
    used = MAX_KEY_BYTES - _key_part(key, 0, MAX_KEY_BYTES)
    # ``used`` is a lower bound of the encoding, and no part encodes to more than 12 times
    # what it counts there (a one-character str: 5 bytes at most, counted 2): small keys,
    # flow keys among them, need no encoding to be known under the limit.
    if 12 * used <= MAX_KEY_BYTES:
        return
    try:
        size = len(cbor2.dumps(key))
    except Exception as exc:  # (the walk above lets through only what cbor2 encodes)
        raise InvalidKey(f"key {key!r:.80} cannot be encoded: {exc}") from None
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"a key of {size} bytes (encoded) is over the {MAX_KEY_BYTES} allowed")


def _key_part(part: Any, depth: int, room: int) -> int:
    """Check one part of a key at tuple ``depth``; the bytes left of the key's budget (a
    lower bound of the encoding: str length in characters, one byte per item)."""
    kind = type(part)
    if kind is str or kind is bytes:
        room -= len(part) + 1
    elif kind is int or kind is bool or isinstance(part, int):  # (an IntEnum: an int)
        if part.bit_length() > MAX_INT_BITS:
            raise InvalidKey(
                f"a key holds an int of {part.bit_length()} bits (at most {MAX_INT_BITS} travel)"
            )
        room -= 1 + part.bit_length() // 8
    elif part is None:
        room -= 1
    elif kind is tuple or isinstance(part, tuple):  # a named tuple is a tuple on the wire
        if depth >= MAX_KEY_DEPTH:
            raise InvalidKey(f"a key nested deeper than {MAX_KEY_DEPTH} levels of tuples")
        room -= 1
        for item in part:
            room = _key_part(item, depth + 1, room)
    elif isinstance(part, float):
        if math.isnan(part):
            raise InvalidKey(
                "NaN cannot be (part of) a key: it equals nothing, not even itself, so every "
                "access would miss"
            )
        if part == 0.0 and math.copysign(1.0, part) < 0:
            raise InvalidKey(
                "-0.0 cannot be (part of) a key: it equals 0.0 but is encoded apart; use 0.0"
            )
        room -= 3
    elif isinstance(part, str | bytes):  # (a StrEnum: a str on the wire)
        room -= len(part) + 1
    else:
        raise InvalidKey(
            f"a key is built from None, bool, int, float, str, bytes and tuples of them, "
            f"not {kind.__name__}" + (" (use a tuple)" if isinstance(part, list) else "")
        )
    if room < 0:
        raise InvalidKey(f"a key larger than {MAX_KEY_BYTES} bytes (encoded)")
    return room


#: Types that need no look inside to travel (an int only up to :data:`MAX_INT_BITS`).
FLAT: Final = frozenset({type(None), bool, int, float, str, bytes})


def _why_not(value: Any, room: int) -> str | None:
    """Why ``value`` cannot travel although cbor2 may encode it (containers nested more
    than ``room`` levels, which includes a container holding itself, or an int too
    wide), or None.  A scalar costs a type check."""
    kind = type(value)
    if kind is int or (kind is not bool and isinstance(value, int)):
        if value.bit_length() > MAX_INT_BITS:
            return f"holds an int of {value.bit_length()} bits (at most {MAX_INT_BITS} travel)"
        return None
    if kind in FLAT:
        return None
    if isinstance(value, dict):
        items: Any = [x for pair in value.items() for x in pair]
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        return None  # cbor2 says whether it encodes it
    if room == 0:
        return "is nested too deep (or holds itself)"
    for item in items:
        if type(item) is not int and type(item) in FLAT:
            continue
        why = _why_not(item, room - 1)
        if why is not None:
            return why
    return None


def args_travel(args: tuple[Any, ...] | list[Any]) -> str | None:
    """Why the arguments of one call cannot travel (see :func:`encode_value`), or None."""
    for arg in args:
        kind = type(arg)
        if kind is int:
            if arg.bit_length() > MAX_INT_BITS:
                return _why_not(arg, 0)
        elif kind not in FLAT:
            why = _why_not(arg, MAX_VALUE_DEPTH)
            if why is not None:
                return why
    return None


def encode_value(value: Any, what: str) -> bytes:
    """``value`` as cbor, or :class:`ValueNotEncodable` saying that ``what`` cannot travel
    and why.  O(size of the value); never hands cbor2 a value nested deeper than
    :data:`MAX_VALUE_DEPTH`."""
    why = _why_not(value, MAX_VALUE_DEPTH)
    if why is None:
        try:
            return cbor2.dumps(value)
        except Exception as exc:
            why = f"is not plain data ({exc})"
    raise ValueNotEncodable(
        f"{what} {why}, so it cannot travel to another node; pass plain data (None, bool, "
        f"int, float, str, bytes, and lists, tuples and dicts of them nested at most "
        f"{MAX_VALUE_DEPTH} deep)"
    )


def encode_args(args: tuple[Any, ...] | list[Any], what: str) -> bytes:
    """The arguments of a call to ``what`` (``"Class.method"``) as one cbor array, or
    :class:`ValueNotEncodable` naming the first argument that cannot travel."""
    try:
        return encode_value(args, f"the arguments of {what}")
    except ValueNotEncodable:
        for i, arg in enumerate(args):
            encode_value(arg, f"argument {i + 1} of {what} (a {type(arg).__name__})")
        raise
