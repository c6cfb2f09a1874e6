"""The wire schema: typed messages and their cbor encoding.

Every message that crosses a socket between two nodes is a frozen, slotted dataclass
registered here with a type tag.  A *batch* of messages travels as one cbor item (one
websocket frame): an array whose entries are ``[tag, field1, field2, ...]``.  Fields go by
position, never by name, because a batch of 64 small messages would otherwise spend more
bytes on field names than on data, and cbor encode/decode time grows with the bytes.

Why typed classes and not dicts: a message with a wrong field is caught once, here, when it
is decoded, instead of as a ``KeyError`` deep in the node.  Why validate at all: frames come
from other processes, and a node must be able to count a bad frame and keep serving, so
:func:`decode_batch` raises only :class:`~store.wire.errors.MalformedMessage` or
:class:`~store.wire.errors.UnknownMessageType`, never a raw cbor2, ``ValueError`` or ``TypeError``.
Pickle is never used: a frame can only ever produce plain data and registered classes.

Declaring messages in another module
------------------------------------
Other layers (key records, objects, the controller) declare their own messages the same
way, in their own modules, with the decorator from this one::

    from dataclasses import dataclass
    from typing import Any

    from store.wire.messages import Key, message

    @message(16)  # any unused int (or short str); 1-15 are the wire layer's
    @dataclass(frozen=True, slots=True)
    class GetRequest:
        map_name: str
        key: Key  # tuples inside come back as tuples
        epoch: int
        hops: int
        payload: Any = None  # any cbor value, not checked

The rules, all enforced when the class is registered (at import time):

* ``@message`` goes *above* ``@dataclass(frozen=True, slots=True)``: ``slots=True`` builds a
  new class, and the registry must hold the final one.
* Field annotations are wire types: ``int``, ``float``, ``str``, ``bytes``, ``bool``,
  ``None``, an ``enum.IntEnum`` (decoded back into its member), unions of them
  (``X | None``), ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``, ``dict[K, V]`` (bare
  ``list``/``tuple``/``dict`` too), ``Any`` (any cbor
  value, not checked) and :data:`Key`.  Anything else is a ``TypeError``: objects travel as
  cbor of their plain fields, never as instances of arbitrary classes.
* A tag is a non-negative ``int`` or a short ``str``; a tag used twice is a ``TypeError``,
  so a collision between two modules shows up the moment both are imported.  Small ints
  (below 24) cost one byte on the wire, so give them to the most frequent messages.
* Every field is on the wire, defaults included: the arity is fixed by the class.
* Annotations are resolved with ``typing.get_type_hints``, so under
  ``from __future__ import annotations`` the names used (``Key``, ``Any``) must be imported
  at module level, not only under ``TYPE_CHECKING``.
* A class with a ``__post_init__`` is decoded through its ``__init__``, so the check runs
  on every received message (a ``ValueError``/``TypeError`` there becomes
  ``MalformedMessage``); classes without one are filled in slot by slot, which is faster.

Decoding converts where cbor cannot preserve the Python type: arrays come back as lists,
so fields annotated ``tuple[...]`` get tuples, and :data:`Key` fields are converted
recursively (a key ``(b"\\x01", 80, ("a", 2))`` comes back equal *and* of the same shape,
so it hashes the same and finds the same dict entry).  A ``float`` field accepts an int
on the wire and gives a float.

Encoding does not check field types (mypy does, statically, and checking every field on
the hot path would cost as much as encoding it); a message built with wrong types is
refused by the receiver.  Values cbor cannot encode raise ``TypeError``/``ValueError`` at
the sender, naming the message class.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import types
import typing
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Annotated, Any, ClassVar, Final, Protocol, TypeAlias, TypeVar

import cbor2

from store.wire.codes import Arrival, Kind, MovedNote, Op, Status
from store.wire.errors import MalformedMessage, UnknownMessageType

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_BITS",
    "MAX_KEY_DEPTH",
    "MAX_TAG_LENGTH",
    "WIRE_VERSION",
    "Error",
    "Flushed",
    "Hello",
    "Key",
    "Message",
    "Proof",
    "Rebased",
    "Rebuilt",
    "Refused",
    "Report",
    "Tag",
    "Welcome",
    "array_header",
    "brief",
    "decode_batch",
    "describe_batch",
    "encode_batch",
    "encode_message",
    "frame_from_encoded",
    "message",
    "message_class",
    "registered_tags",
]

#: The version of the handshake and framing rules; peers with different versions refuse
#: each other instead of misreading each other's frames.
WIRE_VERSION: Final = 5

#: Longest string tag: tags are sent in every message, so they must stay short.
MAX_TAG_LENGTH: Final = 16

#: A message type tag: a non-negative int or a short str.
Tag: TypeAlias = int | str


class Message(Protocol):
    """What every message is statically: a dataclass instance.  Messages share no base
    class (a base would have to be a slotted dataclass too, for no gain); whether a class
    is *registered* is checked when it is encoded."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


#: Nesting depth allowed inside a :data:`Key`.  Flow keys nest one or two levels; the
#: limit stops a hostile frame from making the recursive conversion blow the stack.
MAX_KEY_DEPTH: Final = 32


class _KeyMarker:
    """Marks a field as a key: converted recursively from cbor arrays back to tuples."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "KEY"


_KEY: Final = _KeyMarker()

#: Annotation for fields that carry an S6 key (a map key, a flow key).  A key is built
#: from ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes`` and tuples of them:
#: hashable, so it can index a dict, and canonically encodable, so the ring can hash it.
#: Statically it is ``Any``.
Key: TypeAlias = Annotated[Any, _KEY]


class _Mismatch(Exception):
    """Internal: a field value does not fit its annotation.  Turned into MalformedMessage
    by the caller, which knows the class and field name for the error text."""


_Convert = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    """What the codec knows about one registered class."""

    tag: Tag
    cls: type[Any]
    names: tuple[str, ...]
    # (field index, exact type, converter) for the fields that need checking: either the
    # value's type must be exactly `exact` (int, str, bytes, bool: checked inline, no call)
    # or `convert` maps it.  `Any` fields are absent.
    checks: tuple[tuple[int, type[Any] | None, _Convert | None], ...]
    values: Callable[[Any], tuple[Any, ...]]
    # The slot setters used to build a decoded instance without running the frozen
    # __init__ (which pays an object.__setattr__ call per field, about 40% more); None when
    # the class has a __post_init__, whose checks must run, so the real __init__ is used.
    setters: tuple[Callable[[Any, Any], None], ...] | None


_BY_TAG: dict[Tag, _Schema] = {}
_BY_CLASS: dict[type[Any], _Schema] = {}

_C = TypeVar("_C", bound=type[Any])


def message(tag: Tag) -> Callable[[_C], _C]:
    """Register a frozen, slotted dataclass as a wire message with type tag ``tag``.

    Use it above ``@dataclass(frozen=True, slots=True)``.  Raises ``TypeError`` at import
    time for a duplicate tag, a bad tag, a class that is not a frozen slotted dataclass, or
    a field whose annotation is not a wire type (see the module docstring), so schema
    mistakes never reach a running node.
    """
    if isinstance(tag, bool) or not isinstance(tag, int | str):
        raise TypeError(f"message tag must be an int or a str, not {tag!r}")
    if isinstance(tag, int) and tag < 0:
        raise TypeError(f"message tag must be non-negative, not {tag}")
    if isinstance(tag, str) and not 0 < len(tag) <= MAX_TAG_LENGTH:
        raise TypeError(f"message tag {tag!r} must have 1 to {MAX_TAG_LENGTH} characters")

    def register(cls: _C) -> _C:
        _check_dataclass(cls)
        if tag in _BY_TAG:
            other = _BY_TAG[tag].cls
            raise TypeError(
                f"message tag {tag!r} of {cls.__qualname__} is already used by "
                f"{other.__module__}.{other.__qualname__}"
            )
        if cls in _BY_CLASS:
            raise TypeError(f"{cls.__qualname__} is already registered")
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception as exc:  # NameError for an unresolvable forward reference, ...
            raise TypeError(f"cannot resolve the annotations of {cls.__qualname__}: {exc}") from exc
        fields = dataclasses.fields(cls)
        names = tuple(f.name for f in fields)
        checks: list[tuple[int, type[Any] | None, _Convert | None]] = []
        for i, f in enumerate(fields):
            convert = _converter(hints[f.name], where=f"{cls.__qualname__}.{f.name}")
            exact = _EXACT_TYPES.get(convert)
            if exact is not None:
                checks.append((i, exact, None))
            elif convert is not None:
                checks.append((i, None, convert))
        setters = None
        if not hasattr(cls, "__post_init__"):
            setters = tuple(getattr(cls, name).__set__ for name in names)
        schema = _Schema(tag, cls, names, tuple(checks), _values_getter(names), setters)
        _BY_TAG[tag] = schema
        _BY_CLASS[cls] = schema
        return cls

    return register


def _check_dataclass(cls: type[Any]) -> None:
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        raise TypeError(f"@message needs a dataclass, got {cls!r}")
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    if not params.frozen:
        raise TypeError(f"{cls.__qualname__}: messages must be frozen (dataclass(frozen=True))")
    if "__slots__" not in cls.__dict__:
        raise TypeError(
            f"{cls.__qualname__}: messages must be slotted (dataclass(slots=True)), and "
            "@message must be applied above @dataclass"
        )


def _values_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A fast ``msg -> (field values...)``; attrgetter is C code, but returns a bare value
    (not a 1-tuple) for one name, hence the cases."""
    if not names:
        return lambda _msg: ()
    if len(names) == 1:
        get_one = attrgetter(names[0])
        return lambda msg: (get_one(msg),)
    return attrgetter(*names)


# --- field converters ---------------------------------------------------------------------
# Each converter takes the decoded cbor value and returns the Python value for the field,
# or raises _Mismatch.  They are built once per class at registration time, so decoding
# pays one call per field and no annotation inspection.


def _describe(value: Any) -> str:
    return type(value).__name__


#: Characters of a peer's string (or bytes) that :func:`brief` shows.
_BRIEF_CHARS: Final = 40


def brief(value: Any) -> str:
    """A short, bounded description of a value that came from a peer, for error texts
    and logs: O(1) in the value's size, never more than about 80 characters.

    ``repr`` is not safe there: a 16 MB list takes 16 MB to print before ``:.60`` cuts it,
    and an int of over 4,300 digits makes ``repr`` (and ``str``, and an f-string) raise
    ``ValueError`` (Python's guard against quadratic int-to-str conversion), which turned
    a peer's garbage into our crash.  Short ints, floats and the first characters of a
    string or bytes are shown; anything else by its type and size.
    """
    kind = type(value)
    if value is None or kind is bool or kind is float:
        return repr(value)
    if kind is int:
        return repr(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
    if kind is str or kind is bytes:
        if len(value) <= _BRIEF_CHARS:
            return repr(value)
        return f"{value[:_BRIEF_CHARS]!r}... ({len(value)} {'chars' if kind is str else 'bytes'})"
    if kind is list or kind is tuple:
        return f"a {kind.__name__} of {len(value)} items"
    if kind is dict:
        return f"a map of {len(value)} entries"
    return f"a {kind.__name__}"


def describe_batch(batch: list[Any]) -> str:
    """A bounded description of a decoded batch: its first message types and its length,
    never the fields' values (see :func:`brief`)."""
    names = ", ".join(type(msg).__qualname__ for msg in batch[:4])
    more = f", ... ({len(batch)} messages)" if len(batch) > 4 else ""
    return f"[{names}{more}]"


def _exact(kind: type[Any]) -> _Convert:
    # `type(v) is kind`, not isinstance: True must not pass as an int, nor an int as a bool.
    def convert(value: Any) -> Any:
        if type(value) is kind:
            return value
        raise _Mismatch(f"expected {kind.__name__}, got {_describe(value)}")

    return convert


def _to_float(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        try:
            return float(value)
        except OverflowError:  # a bignum beyond float's range
            raise _Mismatch(f"expected float, got {brief(value)}") from None
    raise _Mismatch(f"expected float, got {_describe(value)}")


def _to_none(value: Any) -> Any:
    if value is None:
        return None
    raise _Mismatch(f"expected None, got {_describe(value)}")


_KEY_LEAVES: Final = frozenset({type(None), bool, int, float, str, bytes})


def _to_key(value: Any) -> Any:
    """Lists back to tuples, recursively, and nothing but key material accepted.

    Leaves are checked inline rather than by recursing, because most keys are flat or one
    level deep and a Python call per leaf would double the cost of decoding a flow key.
    """
    kind = type(value)
    if kind in _KEY_LEAVES:
        return value
    if kind is list or kind is tuple:
        return _key_items(value, 1)
    raise _Mismatch(_NOT_KEY_MATERIAL + _describe(value))


_NOT_KEY_MATERIAL: Final = "keys are built from None, bool, int, float, str, bytes and tuples, not "


def _key_items(items: Any, depth: int) -> tuple[Any, ...]:
    if depth > MAX_KEY_DEPTH:
        raise _Mismatch(f"key nested deeper than {MAX_KEY_DEPTH} levels")
    out = []
    for item in items:
        kind = type(item)
        if kind in _KEY_LEAVES:
            out.append(item)
        elif kind is list or kind is tuple:
            out.append(_key_items(item, depth + 1))
        else:
            raise _Mismatch(_NOT_KEY_MATERIAL + _describe(item))
    return tuple(out)


def _union(options: tuple[_Convert | None, ...], text: str) -> _Convert:
    def convert(value: Any) -> Any:
        for option in options:
            if option is None:
                return value
            try:
                return option(value)
            except _Mismatch:
                continue
        raise _Mismatch(f"expected {text}, got {_describe(value)}")

    return convert


def _optional(inner: _Convert) -> _Convert:
    # The most common union, `X | None`, without the try/except loop.
    def convert(value: Any) -> Any:
        return None if value is None else inner(value)

    return convert


def _list_of(item: _Convert | None) -> _Convert:
    def convert(value: Any) -> Any:
        if type(value) is not list:
            raise _Mismatch(f"expected a list, got {_describe(value)}")
        if item is None:
            return value
        return [item(v) for v in value]

    return convert


def _tuple_of(item: _Convert | None) -> _Convert:
    def convert(value: Any) -> Any:
        if type(value) is not list and type(value) is not tuple:
            raise _Mismatch(f"expected an array, got {_describe(value)}")
        if item is None:
            return tuple(value)
        return tuple([item(v) for v in value])

    return convert


def _fixed_tuple(items: tuple[_Convert | None, ...]) -> _Convert:
    def convert(value: Any) -> Any:
        if type(value) is not list and type(value) is not tuple:
            raise _Mismatch(f"expected an array, got {_describe(value)}")
        if len(value) != len(items):
            raise _Mismatch(f"expected {len(items)} items, got {len(value)}")
        return tuple([v if c is None else c(v) for c, v in zip(items, value, strict=True)])

    return convert


def _dict_of(key: _Convert | None, val: _Convert | None) -> _Convert:
    def convert(value: Any) -> Any:
        if type(value) is not dict:
            raise _Mismatch(f"expected a map, got {_describe(value)}")
        if key is None and val is None:
            return value
        return {
            (k if key is None else key(k)): (v if val is None else val(v)) for k, v in value.items()
        }

    return convert


_SCALARS: Final[dict[Any, _Convert]] = {
    int: (_exact_int := _exact(int)),
    str: (_exact_str := _exact(str)),
    bytes: (_exact_bytes := _exact(bytes)),
    bool: (_exact_bool := _exact(bool)),
    float: _to_float,
    None: _to_none,
    type(None): _to_none,
}


# Top-level fields of these kinds are checked inline by the decoder (see _Schema.checks).
_EXACT_TYPES: Final[dict[_Convert | None, type[Any]]] = {
    _exact_int: int,
    _exact_str: str,
    _exact_bytes: bytes,
    _exact_bool: bool,
}


def _to_enum(cls: type[enum.IntEnum]) -> _Convert:
    # A dict lookup, not cls(value), which goes through the enum machinery every time.
    members = {int(m): m for m in cls}

    def convert(value: Any) -> Any:
        member = members.get(value) if type(value) is int else None
        if member is None:
            raise _Mismatch(f"expected a {cls.__name__} code, got {brief(value)}")
        return member

    return convert


def _converter(annotation: Any, *, where: str) -> _Convert | None:
    """Build the converter for one annotation; ``TypeError`` for non-wire types."""
    if annotation is Any:
        return None
    if isinstance(annotation, type) and issubclass(annotation, enum.IntEnum):
        return _to_enum(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        if _KEY in annotation.__metadata__:
            return _to_key
        return _converter(args[0], where=where)
    if origin is typing.Union or origin is types.UnionType:
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1 and len(args) == 2:
            inner = _converter(non_none[0], where=where)
            return None if inner is None else _optional(inner)
        options = tuple(_converter(a, where=where) for a in args)
        return _union(options, " | ".join(getattr(a, "__name__", str(a)) for a in args))
    if annotation is list or origin is list:
        return _list_of(_converter(args[0], where=where) if args else None)
    if annotation is tuple or origin is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return _tuple_of(_converter(args[0], where=where) if args else None)
        if args == ((),):  # tuple[()]
            return _fixed_tuple(())
        return _fixed_tuple(tuple(_converter(a, where=where) for a in args))
    if annotation is dict or origin is dict:
        if not args:
            return _dict_of(None, None)
        return _dict_of(_converter(args[0], where=where), _converter(args[1], where=where))
    raise TypeError(
        f"{where}: {annotation!r} is not a wire type (use int, float, str, bytes, bool, None, "
        "an IntEnum, list, tuple, dict, Any or Key)"
    )


# --- encoding -----------------------------------------------------------------------------


def _schema_of(msg: object) -> _Schema:
    schema = _BY_CLASS.get(type(msg))
    if schema is None:
        raise TypeError(f"{type(msg).__qualname__} is not a registered message (use @message)")
    return schema


def _dumps(obj: Any, what: str) -> bytes:
    try:
        return cbor2.dumps(obj)
    except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:
        # The sender's bug (a field holding something cbor cannot carry): say which message.
        # cbor2 raises a bare CBOREncodeError for a type it does not know: a TypeError to us.
        value_problem = isinstance(exc, ValueError | cbor2.CBOREncodeValueError | RecursionError)
        kind = ValueError if value_problem else TypeError
        raise kind(f"{what} cannot be encoded as cbor: {exc}") from exc


def encode_message(msg: Message) -> bytes:
    """The cbor encoding of one message as a batch entry (not a whole frame).

    Used with :func:`frame_from_encoded` by senders that want to know each message's size
    before building a frame (the transport does, to keep frames under the peer's limit).
    """
    schema = _schema_of(msg)
    return _dumps([schema.tag, *schema.values(msg)], type(msg).__qualname__)


def array_header(count: int) -> bytes:
    """The cbor header of a definite-length array of ``count`` items."""
    if count < 24:
        return bytes((0x80 | count,))
    if count < 0x100:
        return bytes((0x98, count))
    if count < 0x10000:
        return b"\x99" + count.to_bytes(2, "big")
    if count < 0x100000000:
        return b"\x9a" + count.to_bytes(4, "big")
    return b"\x9b" + count.to_bytes(8, "big")


def frame_from_encoded(parts: list[bytes]) -> bytes:
    """One frame from messages encoded with :func:`encode_message`.

    The result is byte-for-byte what :func:`encode_batch` gives for the same messages:
    a cbor array is its header followed by its items, so no re-encoding is needed.
    """
    return array_header(len(parts)) + b"".join(parts)


def encode_batch(msgs: Iterable[Message]) -> bytes:
    """One frame holding ``msgs`` in order: a single cbor array of ``[tag, *fields]``.

    A little faster than encoding each message on its own (one call into cbor2 instead of
    one per message).  ``TypeError`` for an unregistered class or a field cbor cannot
    encode.
    """
    entries = []
    for msg in msgs:
        schema = _schema_of(msg)
        entries.append([schema.tag, *schema.values(msg)])
    return _dumps(entries, "batch")


# --- decoding -----------------------------------------------------------------------------


#: Widest integer a frame may carry.  cbor's plain integers stop at 64 bits; wider ones
#: travel as bignums (tags 2 and 3, a byte string of any length), which cbor2 would turn
#: into a Python int of any size: 2 KB of frame make an int of 5,000 digits, and the first
#: error message or log line that formats it raises ``ValueError`` (Python refuses to
#: convert an int of over 4,300 digits to text).  1024 bits (309 digits) is far above any
#: integer the store sends and far below that limit.
MAX_INT_BITS: Final = 1024
_MAX_INT_BYTES: Final = MAX_INT_BITS // 8


def _refuse_tag(_value: Any, _immutable: bool = False) -> Any:
    raise cbor2.CBORDecodeError("semantic tag not allowed on the wire")


def _bignum(value: Any, _immutable: bool = False) -> int:
    if type(value) is not bytes:
        raise cbor2.CBORDecodeError("a bignum is a byte string")
    if len(value) > _MAX_INT_BYTES:
        raise cbor2.CBORDecodeError(
            f"an integer of {len(value) * 8} bits; at most {MAX_INT_BITS} are allowed"
        )
    return int.from_bytes(value, "big")


def _negative_bignum(value: Any, immutable: bool = False) -> int:
    return -1 - _bignum(value, immutable)


# Semantic tags decoded our way.  Bignums (2, 3) are bounded by MAX_INT_BITS (decimal
# fractions, big floats and rationals are built from them, so they are bounded too).
# Tags cbor2 would otherwise honour but that have no business on our wire are refused:
# 28/29 build shared (even cyclic) structures, 35 compiles a regular expression, 36 parses
# a MIME message.  Nothing we send uses them; a frame that does is refused.
_SEMANTIC: Final = {
    2: _bignum,
    3: _negative_bignum,
    28: _refuse_tag,
    29: _refuse_tag,
    35: _refuse_tag,
    36: _refuse_tag,
}

#: Deepest container nesting a frame may have (batch array, entry, then field values).
MAX_DEPTH: Final = 64

# Characters of a cbor2 error's text kept in ours (they may quote the peer's data).
_ERROR_TEXT: Final = 200


def _loads(frame: bytes) -> Any:
    if type(frame) is not bytes:
        if isinstance(frame, bytearray | memoryview):
            frame = bytes(frame)
        else:
            raise MalformedMessage(f"a frame is bytes, not {_describe(frame)}")
    stream = io.BytesIO(frame)
    try:
        decoded = cbor2.CBORDecoder(
            stream, semantic_decoders=_SEMANTIC, max_depth=MAX_DEPTH
        ).decode()
    except Exception as exc:  # cbor2 errors, MemoryError for absurd lengths, ...
        raise MalformedMessage(f"frame is not valid cbor: {_error_text(exc)}") from None
    if stream.tell() != len(frame):
        # cbor2 stops after one item; bytes after it mean the frame is not what we sent.
        raise MalformedMessage(f"{len(frame) - stream.tell()} bytes after the cbor item")
    return decoded


def _error_text(exc: BaseException) -> str:
    """The text of an exception met while decoding, bounded (it may quote the peer's
    data, and ``str`` itself may fail: a ``__post_init__`` that formats a huge value)."""
    try:
        text = str(exc)
    except Exception:
        return type(exc).__name__
    if len(text) > _ERROR_TEXT:
        return text[:_ERROR_TEXT] + "..."
    return text


def _decode_entry(entry: Any, index: int) -> Message:
    if type(entry) is not list or not entry:
        raise MalformedMessage(
            f"batch entry {index}: expected [tag, fields...], got {brief(entry)}"
        )
    tag = entry[0]
    kind = type(tag)
    if kind is not int and kind is not str:
        # Checked before the lookup: a list is unhashable, and True would find tag 1.
        raise MalformedMessage(f"batch entry {index}: tag must be int or str, not {kind.__name__}")
    schema = _BY_TAG.get(tag)
    if schema is None:
        raise UnknownMessageType(f"batch entry {index}: unknown message tag {brief(tag)}")
    names = schema.names
    if len(entry) != len(names) + 1:
        raise MalformedMessage(
            f"batch entry {index}: {schema.cls.__qualname__} has {len(names)} fields, "
            f"got {len(entry) - 1}"
        )
    values = entry[1:]
    for i, exact, convert in schema.checks:
        if exact is not None:
            if type(values[i]) is not exact:
                raise MalformedMessage(
                    f"batch entry {index}: {schema.cls.__qualname__}.{names[i]}: expected "
                    f"{exact.__name__}, got {_describe(values[i])}"
                )
            continue
        try:
            values[i] = convert(values[i])  # type: ignore[misc]
        except _Mismatch as exc:
            raise MalformedMessage(
                f"batch entry {index}: {schema.cls.__qualname__}.{names[i]}: {_error_text(exc)}"
            ) from None
    setters = schema.setters
    if setters is not None:
        msg = _new_instance(schema.cls)
        for set_field, value in zip(setters, values, strict=True):
            set_field(msg, value)
        return msg  # type: ignore[no-any-return]
    try:
        return schema.cls(*values)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        # A __post_init__ that rejects the values: still the sender's fault.
        raise MalformedMessage(
            f"batch entry {index}: {schema.cls.__qualname__}: {_error_text(exc)}"
        ) from None


_new_instance: Final = object.__new__


def decode_batch(frame: bytes) -> list[Message]:
    """The messages of one frame, in order.

    Raises :class:`~store.wire.errors.MalformedMessage` if the frame is not one cbor array of
    well-formed entries (wrong arity, wrong field types, trailing bytes, refused tags), and
    :class:`~store.wire.errors.UnknownMessageType` for an entry with an unregistered tag.  A
    frame is accepted or refused as a whole: no partial batch is returned.

    Bounds, for frames from strangers as much as from peers: nesting at most
    :data:`MAX_DEPTH` levels, integers at most :data:`MAX_INT_BITS` wide, no length
    declared beyond the frame's end (nothing is allocated for it); the frame's own size is
    the caller's limit (the transport's ``max_frame``, and a few KiB before the
    handshake).  The texts of the errors describe the peer's values with :func:`brief`,
    never with ``repr``: bounded whatever the frame holds.
    """
    decoded = _loads(frame)
    if type(decoded) is not list:
        raise MalformedMessage(f"a frame is an array of messages, not {_describe(decoded)}")
    return [_decode_entry(entry, i) for i, entry in enumerate(decoded)]


def message_class(tag: Tag) -> type[Any]:
    """The class registered under ``tag``; ``KeyError`` if none is."""
    return _BY_TAG[tag].cls


def registered_tags() -> dict[Tag, type[Any]]:
    """A copy of the registry (tag -> class), for diagnostics and tests."""
    return {tag: schema.cls for tag, schema in _BY_TAG.items()}


# --- the wire layer's own messages (tags 1-15 are reserved for it) ------------------------


@message(1)
@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """First frame each side sends: who it is and a fresh challenge for the other side.

    ``nonce`` is 32 random bytes; the other side must answer with a :class:`Proof` over it,
    so a recorded handshake cannot be replayed.  ``max_frame`` is the largest frame this
    side accepts, so the other never sends a batch it would have to reject.
    """

    version: int
    name: str
    nonce: bytes
    max_frame: int


@message(2)
@dataclasses.dataclass(frozen=True, slots=True)
class Proof:
    """HMAC-SHA256, keyed with the cluster secret, over the other side's nonce and both
    names (see ``store.shell.transport.proof_mac``): shows the secret without sending it."""

    mac: bytes


@message(3)
@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """The server accepted the client's proof; application frames may follow."""


@message(4)
@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """The server refused the handshake; it closes the connection next.

    ``code`` says why for programs: ``"auth"`` (the proof was wrong), ``"version"`` (another
    :data:`WIRE_VERSION`), ``"protocol"`` (anything else malformed); ``reason`` is for people.
    """

    code: str
    reason: str


@message(5)
@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    """Sent back for a frame that could not be used, so the sender's logs show its bug.

    ``code`` is machine-readable (``"malformed"``, ``"unknown-type"``), ``text`` is for
    people.  The connection stays open: one bad frame from an authenticated peer is a bug
    to report, not a reason to drop the other messages in flight.
    """

    code: str
    text: str


# --- the object space: key layer and object layer (tags 16-39) -----------------------------
#
# Node names are the members' names in the ring.  ``req_id`` numbers a request at the node
# that made it (its ``origin``); every answer goes straight back to the origin.


@message(16)
@dataclasses.dataclass(frozen=True, slots=True)
class KeyOp:
    """A request about one key, routed to the key's authority by ``ring.ownership``.

    ``kind`` is the object kind the caller's map expects; ``epoch``, ``hops``, ``arrival``
    and ``since`` are the forwarded request's version (``ring.ownership.Request``).
    The answer goes to ``origin``'s request ``req_id``.

    A MOVED notice (``op``) says where the object is now: ``owner`` (None when dropped),
    ``version``, and ``note`` saying why; for ``MovedNote.DROPPED``, ``origin`` and
    ``req_id`` are the remover's, answered once the authority has the notice.

    A request arriving as ``Arrival.HANDOFF`` carries the key's authority with it: the
    authority's ``record`` (``[kind, owner, version, state]``, or None for a key
    with no record: bare authority) and the requests ``queued`` behind a move in progress,
    each ``[op, kind, origin, req_id]``.
    """

    op: Op
    map: str
    key: Key
    kind: Kind
    origin: str
    req_id: int
    epoch: int
    hops: int
    arrival: Arrival
    since: int | None = None  # ring.ownership.Request.since
    owner: str | None = None  # MOVED: the object's new holder
    version: int = 0  # MOVED: the version it has there
    note: MovedNote = MovedNote.HANDED_OVER  # MOVED: why
    record: list[Any] | None = None  # HANDOFF: the authority's record
    queued: list[list[Any]] | None = None  # HANDOFF: requests queued behind a move


@message(17)
@dataclasses.dataclass(frozen=True, slots=True)
class Transfer:
    """A single-writer object granted to the node that asked for it (``req_id`` there).

    ``state`` is the object's cbor state, or ``None`` for a fresh object (``created``) or for
    "you hold it already".  ``version`` is the grant's place in the object's chain of
    writers: one more than the previous holder's.
    """

    map: str
    key: Key
    req_id: int
    version: int
    state: bytes | None
    created: bool


@message(18)
@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a request: ``value`` is the result (a location, a call's return
    value, an error's ``[class name, text]``...)."""

    req_id: int
    status: Status
    value: Any = None


@message(19)
@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """Key owner to holder: let the single-writer object go to ``to`` (answering ``to``'s
    request ``req_id``) as soon as no local reference uses it.  ``version`` is the holder's
    grant, so a release that overtakes the object's arrival waits for it."""

    map: str
    key: Key
    to: str
    req_id: int
    version: int


@message(20)
@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """A method call shipped to the object's holder.  ``req_id`` 0 means untethered (no
    answer).  ``seq`` numbers the sender's calls and folds on this object, so that a call
    that is retried or forwarded is applied once."""

    map: str
    key: Key
    method: str
    args: list[Any]
    req_id: int
    seq: int
    #: Set on a call a leaving node forwards: the version of the incarnation it evacuated.
    #: A holder of another incarnation (removed and made again meanwhile) drops it.
    version: int = 0


@message(21)
@dataclasses.dataclass(frozen=True, slots=True)
class Fold:
    """A multi-writer replica's accumulated updates, to be merged into the owner's object."""

    map: str
    key: Key
    seq: int
    state: bytes
    version: int = 0  # as Call.version


@message(22)
@dataclasses.dataclass(frozen=True, slots=True)
class Drop:
    """Key owner to holder: the object was removed (record version ``version``).

    ``origin``/``req_id`` name the remover when the key owner waits for the holder to have
    dropped it: the holder then sends the authority a MOVED notice (``MovedNote.DROPPED``)
    that answers the remover.  A node that passes it on (it evacuated the object) sends
    that notice itself and passes the drop on with ``origin`` None."""

    map: str
    key: Key
    version: int
    origin: str | None = None
    req_id: int = 0


@message(23)
@dataclasses.dataclass(frozen=True, slots=True)
class Barrier:
    """Answered with a :class:`Reply` once every message sent before it has been applied:
    what ``Space.flush()`` waits on (one ordered connection per pair of nodes)."""

    req_id: int


@message(24)
@dataclasses.dataclass(frozen=True, slots=True)
class Scan:
    """List the existing keys of map ``map`` whose records this node holds, with their
    object owners (the control-plane ``items()`` view)."""

    req_id: int
    map: str


@message(25)
@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Read the state of the listed objects of ``map`` that this node holds; the reply
    lists ``[key, state or None]`` (None: not held here any more)."""

    req_id: int
    map: str
    keys: list[Key]


def key_from_wire(value: Any) -> Any:
    """A key that travelled inside an ``Any`` field, with its tuples restored (cbor has one
    array type).  Raises :class:`~store.wire.errors.MalformedMessage` for non-key material."""
    try:
        return _to_key(value)
    except _Mismatch as exc:
        raise MalformedMessage(str(exc)) from None


@message(26)
@dataclasses.dataclass(frozen=True, slots=True)
class EvacuateAck:
    """The receiver of an :class:`Evacuate` holds the object now: the leaving node counts
    its evacuation one object nearer done."""

    map: str
    key: Key
    epoch: int


@message(27)
@dataclasses.dataclass(frozen=True, slots=True)
class HandOnAck:
    """The receiver of a request that arrived as a HANDOFF installed the authority of
    ``map[key]`` that came with it: the sender counts its drain one step nearer done (a
    node reports drained only when all are acknowledged)."""

    map: str
    key: Key
    epoch: int


@message(28)
@dataclasses.dataclass(frozen=True, slots=True)
class Evacuate:
    """A leaving node hands an object it holds to the object's next key owner (scale-in).

    ``cls`` is ``"module:qualname"`` of the object class, so that a node that never
    registered the map (a bare ``store.node``) can still hold it; ``version`` continues the
    object's chain of holders.  Acknowledged with :class:`EvacuateAck`."""

    map: str
    key: Key
    cls: str
    version: int
    state: bytes
    #: The object's kind, so that a node that cannot import ``cls`` can still hold it (as
    #: its plain state, see ``store.core.objects.opaque_info``) and hand it on intact.
    kind: Kind = Kind.SINGLE


@message(29)
@dataclasses.dataclass(frozen=True, slots=True)
class Untethered:
    """A batch of untethered calls from one sender, in the order they were made: each entry
    is ``[map, key, method, args, seq]``.  Sent as one message so that an untethered call
    costs its caller a list append, not a message object (paper §4.2)."""

    calls: list[Any]


@message(30)
@dataclasses.dataclass(frozen=True, slots=True)
class Fence:
    """``origin`` is about to send its calls of ``map[key]`` somewhere else than its earlier
    ones went, and that place is leaving (or left) the ring, which forwards what it gets for
    an object it evacuated.  A node that forwards the object passes the fence on behind what
    it forwarded (per-pair FIFO); the node that holds it, or knows nothing of it, answers
    ``origin`` with a :class:`Reply`.  After the answer every earlier call of ``origin`` has
    reached the object, so its later ones cannot overtake them."""

    req_id: int
    origin: str
    map: str
    key: Key
    #: A node that left: answer only once its :class:`Gone` has arrived here (everything
    #: it forwarded here came before it).  Set when the fence cannot go through that node
    #: any more and goes straight to the object's new place instead.
    after: str | None = None


@message(31)
@dataclasses.dataclass(frozen=True, slots=True)
class Gone:
    """A node that left the ring says goodbye, after everything it forwarded: the receiver
    answers with a :class:`Reply` and sends it nothing more (so the leaver may exit once
    every member has answered: what each sent before its answer has been handled)."""

    req_id: int


@message(32)
@dataclasses.dataclass(frozen=True, slots=True)
class HandOns:
    """Background drain, batched: the key records handed on to one next owner in one
    drain step of scaling event ``epoch``, each ``[map, key, record, queued]`` (as a
    HANDOFF :class:`KeyOp` carries them).  One message and one acknowledgement per batch,
    not per record: the receiver of a drain is usually busy with packets too."""

    epoch: int
    records: list[Any]


@message(33)
@dataclasses.dataclass(frozen=True, slots=True)
class HandOnsAck:
    """The receiver installed ``count`` records of a :class:`HandOns` of event ``epoch``."""

    epoch: int
    count: int


@message(34)
@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """Failure event ``epoch``: objects the sender holds whose key records belong to the
    receiver on the repaired ring, each ``[map, key, kind, version]``.  Key records are
    soft state: the receiver rebuilds those that died with their node from these."""

    epoch: int
    entries: list[Any]


@message(35)
@dataclasses.dataclass(frozen=True, slots=True)
class Rebuilt:
    """Failure event ``epoch``: the sender has sent every :class:`Report` it had for the
    receiver (they come before this on the same link).  A new owner serves keys it has no
    record for only once every survivor has said so."""

    epoch: int


@message(38)
@dataclasses.dataclass(frozen=True, slots=True)
class Flushed:
    """Failure event ``epoch``: everything the sender sent the receiver before it learnt
    of the event is ahead of this on the link (links are FIFO).  An object handed to the
    receiver before the event (a hand-over, an evacuation) has arrived once this has: the
    receiver reports such late arrivals to their key owners, and sends its own
    :class:`Rebuilt` markers only after a ``Flushed`` from every survivor, so that no
    object is in flight, unreported, when a key owner ends its rebuild."""

    epoch: int


@message(55)
@dataclasses.dataclass(frozen=True, slots=True)
class Rebased:
    """Failure event ``epoch``: key records rebuilt from the receiver's :class:`Report`
    entries, each ``[map, key, reported, version]``: the record's version is now
    ``version``, above every version the dead epoch could have used, and the receiver's
    object (if it still has ``reported``) takes it too, so that a late message of the dead
    epoch can never be read as newer than what the rebuilt record says."""

    epoch: int
    entries: list[Any]


@message(39)
@dataclasses.dataclass(frozen=True, slots=True)
class CallFailed:
    """An untethered call (``seq``, 0 for a fold) that the receiver sent for ``map[key]``
    failed where it was to be applied: the method raised, or the object's class has no
    such method.  ``error`` says why (``"ExceptionType: text"``).  The receiver counts it,
    and its next ``flush()`` raises: an untethered call fails alone, but not silently."""

    map: str
    key: Key
    method: str
    seq: int
    error: str


@message(36)
@dataclasses.dataclass(frozen=True, slots=True)
class Evacuates:
    """A leaving node hands objects it holds to their next key owner, in bulk: the objects
    of one drain step for one receiver (scale-in; :class:`Evacuate` is one object).

    ``classes`` lists each ``[map, "module:qualname", kind]`` once (the class is resolved,
    or found missing, once per batch, not per object).  The objects go in columns (one
    entry per object in each, no array per object to build or decode): ``of`` its index in
    ``classes``, then its ``keys``, ``versions`` and ``states``, as :class:`Evacuate`
    carries them.  The receiver installs the whole batch or, if any of it is malformed,
    none, and answers with one :class:`EvacuatesAck` naming ``batch`` (the sender's number
    for it).  The sender keeps each batch under its frame limit (``Outbox.max_payload``)."""

    epoch: int
    batch: int
    classes: list[tuple[str, str, Kind]]
    of: list[int]
    keys: list[Key]
    versions: list[int]
    states: list[bytes]


@message(37)
@dataclasses.dataclass(frozen=True, slots=True)
class EvacuatesAck:
    """The receiver of :class:`Evacuates` ``batch`` (of event ``epoch``) holds its
    ``count`` objects now: the leaving node counts its evacuation one batch nearer done."""

    epoch: int
    batch: int
    count: int
