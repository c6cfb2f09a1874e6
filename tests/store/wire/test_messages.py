"""The wire schema: exact round trips, and every kind of bad frame refused with our errors."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.wire.errors import MalformedMessage, UnknownMessageType
from store.wire.messages import (
    MAX_DEPTH,
    MAX_INT_BITS,
    WIRE_VERSION,
    Error,
    Hello,
    Key,
    Proof,
    Refused,
    Welcome,
    array_header,
    brief,
    decode_batch,
    describe_batch,
    encode_batch,
    encode_message,
    frame_from_encoded,
    message,
    message_class,
    registered_tags,
)

# Test messages use string tags, so they can never collide with the int tags that the
# store's own modules register (all modules are imported together in one test run).


@message("test:keyed")
@dataclass(frozen=True, slots=True)
class Keyed:
    map_name: str
    key: Key
    epoch: int
    value: Any


@message("test:typed")
@dataclass(frozen=True, slots=True)
class Typed:
    flag: bool
    ratio: float
    blob: bytes
    maybe: int | None
    items: list[int]
    pair: tuple[str, int]
    many: tuple[bytes, ...]
    table: dict[str, int]
    either: int | str
    keys: list[Key]


@message("test:empty")
@dataclass(frozen=True, slots=True)
class Empty:
    pass


@message("test:checked")
@dataclass(frozen=True, slots=True)
class Checked:
    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


def same(a: Any, b: Any) -> bool:
    """Equal *and* of the same types all the way down (1 == True == 1.0 in Python, but a
    key that comes back as another type hashes or encodes differently)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # tells -0.0 from 0.0
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return bool(a == b)


# --- strategies ---------------------------------------------------------------------------

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits: cbor bignums
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
keys = st.recursive(leaves, lambda inner: st.tuples(inner, inner) | st.tuples(inner), max_leaves=8)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
keyed = st.builds(Keyed, st.text(max_size=10), keys, st.integers(0, 2**63), values)


# --- round trips --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(keyed, max_size=20))
def test_batches_round_trip_exactly(msgs: list[Keyed]) -> None:
    out = decode_batch(encode_batch(msgs))
    assert same(out, msgs)


@settings(max_examples=100, deadline=None)
@given(keys)
def test_keys_come_back_as_tuples_of_the_same_types(key: Any) -> None:
    [out] = decode_batch(encode_batch([Keyed("m", key, 0, None)]))
    assert isinstance(out, Keyed)
    assert same(out.key, key)
    assert hash(out.key) == hash(key)


def test_a_flow_key_survives() -> None:
    key = (b"\x01", 80, ("a", 2))
    [out] = decode_batch(encode_batch([Keyed("conns", key, 1, [1, 2])]))
    assert isinstance(out, Keyed)
    assert out.key == key and type(out.key[2]) is tuple
    assert {key: 1}[out.key] == 1
    assert out.value == [1, 2]  # an Any field is left as cbor gives it


@settings(max_examples=100, deadline=None)
@given(st.lists(keyed, max_size=10))
def test_encoding_one_by_one_gives_the_same_frame(msgs: list[Keyed]) -> None:
    assert frame_from_encoded([encode_message(m) for m in msgs]) == encode_batch(msgs)


@pytest.mark.parametrize("count", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_array_header_matches_cbor(count: int) -> None:
    assert cbor2.dumps([None] * count).startswith(array_header(count))
    assert len(cbor2.dumps([None] * count)) == len(array_header(count)) + count


def test_typed_fields_convert_and_round_trip() -> None:
    msg = Typed(
        flag=True,
        ratio=0.5,
        blob=b"\x00",
        maybe=None,
        items=[1, 2],
        pair=("x", 3),
        many=(b"a", b"b"),
        table={"a": 1},
        either="s",
        keys=[(1, (2, 3)), "k"],
    )
    [out] = decode_batch(encode_batch([msg]))
    assert same(out, msg)


def test_float_field_accepts_an_int_on_the_wire() -> None:
    frame = cbor2.dumps([["test:typed", False, 3, b"", 1, [], ["a", 1], [], {}, 2, []]])
    [out] = decode_batch(frame)
    assert isinstance(out, Typed) and out.ratio == 3.0 and type(out.ratio) is float


def test_wire_layer_messages_round_trip() -> None:
    msgs = [
        Hello(WIRE_VERSION, "node-1", b"n" * 32, 1 << 20),
        Proof(b"m" * 32),
        Welcome(),
        Refused("auth", "authentication failed"),
        Error("malformed", "bad frame"),
        Empty(),
    ]
    assert decode_batch(encode_batch(msgs)) == msgs


def test_post_init_runs_on_decode() -> None:
    assert decode_batch(encode_batch([Checked(3)])) == [Checked(3)]
    with pytest.raises(MalformedMessage, match="negative"):
        decode_batch(cbor2.dumps([["test:checked", -1]]))


def test_registry_lookup() -> None:
    assert message_class(1) is Hello
    assert registered_tags()["test:keyed"] is Keyed


def test_encoding_unregistered_or_unencodable_fails_at_the_sender() -> None:
    @dataclass(frozen=True, slots=True)
    class Stray:
        x: int

    with pytest.raises(TypeError, match="not a registered message"):
        encode_batch([Stray(1)])
    with pytest.raises(TypeError, match="Keyed cannot be encoded"):
        encode_message(Keyed("m", 1, 0, object()))


# --- registration -------------------------------------------------------------------------


def test_registration_rules() -> None:
    with pytest.raises(TypeError, match="already used"):

        @message("test:keyed")
        @dataclass(frozen=True, slots=True)
        class Again:
            x: int

    with pytest.raises(TypeError, match="frozen"):

        @message("test:unfrozen")
        @dataclass(slots=True)
        class Unfrozen:
            x: int

    with pytest.raises(TypeError, match="slotted"):

        @message("test:noslots")
        @dataclass(frozen=True)
        class NoSlots:
            x: int

    with pytest.raises(TypeError, match="not a wire type"):

        @message("test:badtype")
        @dataclass(frozen=True, slots=True)
        class BadType:
            x: set[int]

    with pytest.raises(TypeError, match="dataclass"):
        message("test:plain")(int)
    for bad in (True, -1, "", "x" * 17, 1.5):
        with pytest.raises(TypeError):
            message(bad)  # type: ignore[arg-type]


# --- malformed frames ---------------------------------------------------------------------


def frame(*entries: Any) -> bytes:
    return cbor2.dumps(list(entries))


MALFORMED = {
    "not cbor": b"\xff\x00",
    "empty": b"",
    "truncated": encode_batch([Keyed("m", (1, 2), 0, None)])[:-3],
    "trailing bytes": encode_batch([Welcome()]) + b"\x00",
    "top level is a map": cbor2.dumps({"a": 1}),
    "top level is an int": cbor2.dumps(7),
    "entry is not an array": frame(5),
    "empty entry": frame([]),
    "tag is a float": frame([1.0, "x"]),
    "tag is an array": frame([[1], "x"]),
    "tag is a bool": frame([True, 1, "n", b"n" * 32, 2048]),
    "too few fields": frame([1, WIRE_VERSION, "n", b"n" * 32]),
    "too many fields": frame([3, "extra"]),
    "str for int": frame([1, "1", "n", b"n" * 32, 2048]),
    "bool for int": frame([1, True, "n", b"n" * 32, 2048]),
    "str for bytes": frame([2, "mac"]),
    "int for bool": frame(["test:typed", 1, 0.5, b"", None, [], ["a", 1], [], {}, 1, []]),
    "wrong tuple arity": frame(["test:typed", True, 0.5, b"", None, [], ["a"], [], {}, 1, []]),
    "wrong list items": frame(["test:typed", True, 0.5, b"", None, ["x"], ["a", 1], [], {}, 1, []]),
    "wrong dict values": frame(
        ["test:typed", True, 0.5, b"", None, [], ["a", 1], [], {"a": "b"}, 1, []]
    ),
    "wrong union": frame(["test:typed", True, 0.5, b"", None, [], ["a", 1], [], {}, 1.5, []]),
    "dict inside a key": frame(["test:keyed", "m", [1, {"a": 1}], 0, None]),
    "key too deep": frame(
        [
            "test:keyed",
            "m",
            [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            0,
            None,
        ]
    ),
    "cyclic shared reference": b"\x81" + bytes.fromhex("d81c8201d81d00"),
    "regular expression tag": b"\x81\x83\x00" + bytes.fromhex("d82363612862"),
    "nesting too deep": b"\x81" * 500 + b"\x00",
    "invalid utf-8": b"\x81\x83\x04\x61\xff\x60",
    "absurd declared length": b"\x9b\x00\x00\x00\xff\xff\xff\xff\xff",
    "a text frame": "[]",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_raise_malformed_message(case: str) -> None:
    with pytest.raises(MalformedMessage):
        decode_batch(MALFORMED[case])  # type: ignore[arg-type]


@pytest.mark.parametrize("tag", [9999, "no-such-tag"])
def test_unknown_tags_raise_unknown_message_type(tag: Any) -> None:
    with pytest.raises(UnknownMessageType, match="unknown message tag"):
        decode_batch(frame([3], [tag, 1, 2]))


def test_a_frame_is_refused_as_a_whole() -> None:
    good = encode_message(Welcome())
    bad = cbor2.dumps([2, "not bytes"])
    with pytest.raises(MalformedMessage, match="batch entry 1"):
        decode_batch(frame_from_encoded([good, bad, good]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        out = decode_batch(data)
    except (MalformedMessage, UnknownMessageType):
        return
    assert isinstance(out, list)


@settings(max_examples=200, deadline=None)
@given(st.lists(keyed, min_size=1, max_size=4), st.data())
def test_corrupted_frames_never_escape_as_other_errors(msgs: list[Keyed], data: Any) -> None:
    raw = bytearray(encode_batch(msgs))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decode_batch(bytes(raw))
    except (MalformedMessage, UnknownMessageType):
        pass


def test_nan_and_infinities_round_trip() -> None:
    [out] = decode_batch(encode_batch([Keyed("m", (math.inf, -math.inf), 0, math.nan)]))
    assert isinstance(out, Keyed)
    assert out.key == (math.inf, -math.inf) and math.isnan(out.value)


# --- bounds: depth, integer width, and error texts that never format a value unbounded ----


def test_integers_up_to_the_width_limit_round_trip() -> None:
    widest = 2**MAX_INT_BITS - 1
    for value in (2**64, -(2**64) - 1, widest, -widest - 1):
        [out] = decode_batch(encode_batch([Keyed("m", value, 0, value)]))
        assert isinstance(out, Keyed) and out.key == value and out.value == value


@pytest.mark.parametrize("sign", [1, -1])
def test_an_integer_wider_than_the_limit_is_refused(sign: int) -> None:
    """The attack of issue 9: 2 KB of frame made an int of 4,400 digits, and the error
    text built from it raised ValueError (int-to-str over 4,300 digits) instead of
    refusing the frame."""
    huge = sign * 10**4400
    frame_ = cbor2.dumps([[1, huge, "n", b"n" * 32, 4096]])  # a Hello's version
    assert len(frame_) < 2100
    with pytest.raises(MalformedMessage, match=f"at most {MAX_INT_BITS}"):
        decode_batch(frame_)
    with pytest.raises(MalformedMessage):
        decode_batch(cbor2.dumps([["test:keyed", "m", 1, 0, [huge]]]))  # deep in an Any field
    just_over = sign * 2 ** (MAX_INT_BITS + 7)
    with pytest.raises(MalformedMessage):
        decode_batch(cbor2.dumps([["test:keyed", "m", just_over, 0, None]]))


def test_a_wide_integer_in_a_float_field_is_malformed_not_an_overflow() -> None:
    bad = frame(["test:typed", True, 2**MAX_INT_BITS - 1, b"", None, [], ["a", 1], [], {}, 1, []])
    with pytest.raises(MalformedMessage, match="expected float"):
        decode_batch(bad)


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    # MAX_DEPTH levels below the batch's own array are decoded (then refused: not
    # messages); one more is refused by the cbor decoder itself.
    with pytest.raises(MalformedMessage, match="tag must be"):
        decode_batch(b"\x81" * MAX_DEPTH + b"\x80")
    with pytest.raises(MalformedMessage, match="not valid cbor"):
        decode_batch(b"\x81" * (MAX_DEPTH + 1) + b"\x80")


@pytest.mark.parametrize(
    "bad",
    [
        frame(list(range(100_000))),  # an entry that is a long array... of ints: no tag
        frame(["x" * 100_000]),  # an unknown tag of 100,000 characters
        frame(["test:keyed", "m", 1, 0, None, 2**MAX_INT_BITS - 1]),  # arity, wide int
        frame([1, 2**MAX_INT_BITS - 1, "n", b"n" * 32, 4096, 1]),
        frame([16, *([[0] * 50_000] * 15)]),  # a KeyOp whose every field is a long list
        cbor2.dumps([{"a" * 100_000: 1}]),
    ],
    ids=["long-entry", "long-tag", "extra-field", "hello-arity", "keyop-lists", "map-entry"],
)
def test_error_texts_are_bounded_whatever_the_frame_holds(bad: bytes) -> None:
    with pytest.raises((MalformedMessage, UnknownMessageType)) as refused:
        decode_batch(bad)
    assert len(str(refused.value)) < 400


def test_brief_describes_any_value_in_a_few_characters() -> None:
    for value in (
        10**4400,
        -(10**4400),
        "x" * 10**6,
        b"y" * 10**6,
        [0] * 10**6,
        (1,) * 1000,
        {i: i for i in range(1000)},
        object(),
        math.nan,
        None,
        True,
    ):
        assert len(brief(value)) <= 80
    assert brief(7) == "7" and brief("ab") == "'ab'" and brief(2**100) == "an int of 101 bits"
    assert describe_batch([Welcome()] * 10) == (
        "[Welcome, Welcome, Welcome, Welcome, ... (10 messages)]"
    )
