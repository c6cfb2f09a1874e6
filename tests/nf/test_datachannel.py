"""The live data channel's format: round trips, packing limits and malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nf.datachannel import (
    HEADER,
    MAGIC,
    MAX_FRAME,
    MAX_REASSEMBLING,
    RECEIPT_SIZE,
    VERSION,
    Frame,
    Kind,
    MalformedDatagram,
    Packer,
    Reassembler,
    ReceiptPacker,
    decode,
    encode_end,
    encode_handoff,
    encode_leaving,
    encode_move,
    encode_moved,
    frame_fits,
    handoff_room,
    move_room,
)

REASONS = {
    "short-header",
    "bad-magic",
    "bad-version",
    "unknown-kind",
    "truncated-frame",
    "bad-end",
    "trailing-bytes",
    "bad-move",
    "bad-handoff",
    "bad-moved",
    "bad-piece",
}


def test_data_round_trip_keeps_every_field_and_order() -> None:
    packer = Packer(sender=7)
    frames = [(i % 3, i, 1_000 + i, bytes([i]) * (i + 1)) for i in range(20)]
    for f in frames:
        assert packer.add(*f) is None
    assert len(packer) == 20
    data = packer.take()
    assert data is not None and packer.take() is None
    d = decode(data)
    assert (d.kind, d.sender, d.seq) == (Kind.DATA, 7, 0)
    assert [tuple(f) for f in d.frames] == frames
    assert (packer.datagrams, packer.frames) == (1, 20)
    # The next datagram is numbered after it.
    packer.add(1, 1, 1, b"x")
    assert decode(packer.take() or b"").seq == 1


def test_packer_starts_a_new_datagram_when_a_frame_does_not_fit() -> None:
    packer = Packer(sender=1, max_size=200)
    out = [d for d in (packer.add(0, i, 0, b"y" * 60) for i in range(10)) if d is not None]
    last = packer.take()
    assert last is not None
    out.append(last)
    assert all(len(d) <= 200 for d in out)
    seqs = [f.seq for d in out for f in decode(d).frames]
    assert seqs == list(range(10))
    assert [decode(d).seq for d in out] == list(range(len(out)))


def test_a_frame_bigger_than_a_datagram_travels_alone_up_to_udps_limit() -> None:
    """A capture taken on loopback or with segmentation offloads holds frames of up to
    64 KiB: one bigger than the packer's datagram size goes in a datagram of its own, in
    order with the others; only one that UDP cannot carry is refused."""
    packer = Packer(sender=1, max_size=200)
    sizes = [60, 60, 30_000, 60, 65_000, 60]
    out = [d for d in (packer.add(0, i, 0, b"y" * n) for i, n in enumerate(sizes)) if d]
    last = packer.take()
    assert last is not None
    out.append(last)
    frames = [f for d in out for f in decode(d).frames]
    assert [f.seq for f in frames] == list(range(len(sizes)))
    assert [len(f.data) for f in frames] == sizes
    assert all(len(d) <= 65_507 for d in out)
    assert [len(decode(d).frames) for d in out] == [2, 1, 1, 1, 1]
    big = b"z" * 65_500
    assert not frame_fits(big) and frame_fits(b"z" * 65_000)
    with pytest.raises(ValueError, match="does not fit"):
        packer.add(0, 0, 0, big)


def test_receipts_round_trip_and_fill_to_the_limit() -> None:
    packer = ReceiptPacker(sender=3, max_size=HEADER.size + 4 * RECEIPT_SIZE)
    outs = [packer.add(9, i, 10 * i, 60 + i, i % 2) for i in range(9)]
    full = [o for o in outs if o is not None]
    assert len(full) == 2 and len(packer) == 1
    tail = packer.take()
    assert tail is not None
    receipts = [r for d in [*full, tail] for r in decode(d).receipts]
    assert [(r.flow, r.seq, r.sent_ns, r.length, r.verdict) for r in receipts] == [
        (9, i, 10 * i, 60 + i, i % 2) for i in range(9)
    ]
    assert decode(tail).kind is Kind.RECEIPT


def test_end_and_leaving() -> None:
    end = decode(encode_end(5, 42, frames_sent=1000, datagrams_sent=41))
    assert (end.kind, end.sender, end.seq, end.frames_sent, end.datagrams_sent) == (
        Kind.END,
        5,
        42,
        1000,
        41,
    )
    leaving = decode(encode_leaving(6, 0))
    assert (leaving.kind, leaving.sender) == (Kind.LEAVING, 6)


def test_move_handoff_and_moved_round_trip() -> None:
    flows = [0, 7, 2**32 - 1, 42]
    move = decode(encode_move(3, 9, 1234, ("127.0.0.1", 40001), flows))
    assert (move.kind, move.sender, move.seq, move.move_id) == (Kind.MOVE, 3, 9, 1234)
    assert move.destination == ("127.0.0.1", 40001)
    assert move.flows == flows
    empty = decode(encode_move(3, 10, 1, ("10.1.2.3", 1), []))
    assert (empty.flows, empty.destination) == ([], ("10.1.2.3", 1))
    # A full MOVE fits the default datagram, one flow more does not fit that size.
    room = move_room()
    full = encode_move(1, 1, 1, ("127.0.0.1", 1), list(range(room)))
    assert len(full) <= 16_384 < len(full) + 4
    payload = bytes(range(256)) * 3
    handoff = decode(encode_handoff(4, 11, 77, 2, 5, payload))
    assert (handoff.kind, handoff.move_id, handoff.part, handoff.parts) == (Kind.HANDOFF, 77, 2, 5)
    assert handoff.payload == payload
    assert len(encode_handoff(4, 1, 1, 0, 1, b"x" * handoff_room())) == 16_384
    assert decode(encode_handoff(4, 1, 1, 0, 1, b"")).payload == b""
    moved = decode(encode_moved(5, 12, 77, 2))
    assert (moved.kind, moved.sender, moved.move_id, moved.part) == (Kind.MOVED, 5, 77, 2)
    assert decode(encode_moved(5, 13, 8)).part == 0
    with pytest.raises(ValueError):
        encode_handoff(1, 1, 1, 3, 3, b"")  # part numbers run from 0 to parts - 1
    with pytest.raises(ValueError):
        encode_move(1, 1, 1, ("127.0.0.1", 1), list(range(70_000)))


def test_malformed_moves_have_their_reasons() -> None:
    move = encode_move(1, 1, 5, ("127.0.0.1", 9), [1, 2, 3])
    assert _reason(move[:-1]) == "bad-move"  # a flow cut short
    assert _reason(move + b"\0\0\0\0") == "bad-move"  # more flows than the count says
    assert _reason(move[: HEADER.size + 3]) == "bad-move"  # the fixed part cut
    handoff = encode_handoff(1, 1, 5, 0, 2, b"abc")
    assert _reason(handoff[: HEADER.size + 7]) == "bad-handoff"
    bad_part = bytearray(handoff)
    struct.pack_into("!HH", bad_part, HEADER.size + 4, 2, 2)  # part 2 of 2
    assert _reason(bytes(bad_part)) == "bad-handoff"
    counted = bytearray(handoff)
    struct.pack_into("!H", counted, HEADER.size - 2, 1)  # a HANDOFF counts nothing
    assert _reason(bytes(counted)) == "bad-handoff"
    moved = encode_moved(1, 1, 5, 1)
    assert _reason(moved[:-1]) == "bad-moved"
    assert _reason(moved + b"\0") == "bad-moved"


def _reason(data: bytes) -> str:
    with pytest.raises(MalformedDatagram) as info:
        decode(data)
    return info.value.reason


def test_each_malformed_shape_has_its_reason() -> None:
    packer = Packer(sender=1)
    packer.add(1, 2, 3, b"abcdef")
    good = packer.take()
    assert good is not None
    assert _reason(b"") == "short-header"
    assert _reason(good[:10]) == "short-header"
    assert _reason(b"XX" + good[2:]) == "bad-magic"
    assert _reason(good[:2] + bytes([VERSION + 1]) + good[3:]) == "bad-version"
    assert _reason(good[:3] + bytes([99]) + good[4:]) == "unknown-kind"
    assert _reason(good[:-1]) == "truncated-frame"  # the frame's bytes are cut
    assert _reason(good[: HEADER.size + 5]) == "truncated-frame"  # its header is cut
    assert _reason(good + b"\0") == "trailing-bytes"
    end = encode_end(1, 1, 2, 3)
    assert _reason(end[:-1]) == "bad-end"
    assert _reason(end + b"\0") == "bad-end"
    assert _reason(encode_leaving(1, 1) + b"!") == "trailing-bytes"
    receipts = ReceiptPacker(sender=1)
    receipts.add(1, 1, 1, 1, 0)
    r = receipts.take()
    assert r is not None
    assert _reason(r[:-1]) == "truncated-frame"
    assert _reason(r + b"\0") == "trailing-bytes"
    # A count that claims more frames than the datagram holds.
    header = HEADER.pack(MAGIC, VERSION, Kind.DATA, 1, 0, 0, 3)
    assert _reason(header + struct.pack("!HIIQ", 1, 0, 0, 0) + b"a") == "truncated-frame"
    piece = Packer(sender=1).pieces(1, 2, 3, b"p" * 70_000)[1]
    assert _reason(piece[: HEADER.size + 24]) == "bad-piece"  # no bytes of the frame
    assert _reason(piece + b"!") == "bad-piece"  # past the frame's length
    head = HEADER.pack(MAGIC, VERSION, Kind.PIECE, 1, 0, 0, 0)
    assert _reason(head + struct.pack("!IIQII", 1, 2, 3, MAX_FRAME + 1, 0) + b"x") == "bad-piece"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_malformed_only(data: bytes) -> None:
    try:
        decode(data)
    except MalformedDatagram as exc:
        assert exc.reason in REASONS


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.tuples(
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**64 - 1),
            st.binary(max_size=100),
        ),
        min_size=1,
        max_size=20,
    ),
    cut=st.integers(0, 3000),
    flip=st.tuples(st.integers(0, 3000), st.integers(0, 255)),
)
def test_damaged_datagrams_never_raise_anything_else(
    frames: list[tuple[int, int, int, bytes]], cut: int, flip: tuple[int, int]
) -> None:
    packer = Packer(sender=2)
    for f in frames:
        assert packer.add(*f) is None
    data = packer.take()
    assert data is not None
    assert [tuple(f) for f in decode(data).frames] == frames
    damaged = bytearray(data[: cut % (len(data) + 1)])
    if damaged:
        at, value = flip
        damaged[at % len(damaged)] = value
    try:
        decode(bytes(damaged))
    except MalformedDatagram as exc:
        assert exc.reason in REASONS


def test_a_frame_too_big_for_udp_goes_in_pieces_and_is_put_back_together() -> None:
    """Pieces in any order, repeated, interleaved with another frame's: each frame comes
    back whole, once, when its last byte is in; a frame whose other pieces never come is
    given up (counted) once too many are in progress."""
    packer = Packer(sender=4)
    packer.add(9, 0, 5, b"small")
    big = bytes(range(256)) * 600  # 153,600 bytes: three pieces
    other = b"o" * 70_000
    out = packer.pieces(1, 7, 11, big)
    assert decode(out[0]).frames == [Frame(9, 0, 5, b"small")]  # the batch goes first
    pieces = [decode(d) for d in out[1:]]
    assert len(pieces) == 3 and all(p.kind == Kind.PIECE for p in pieces)
    assert all(len(d) <= 65_507 for d in out)
    assert (packer.frames, packer.datagrams) == (2, 4)
    second = [decode(d) for d in packer.pieces(1, 8, 12, other)]
    whole = Reassembler()
    got = []
    for p in [pieces[2], second[0], pieces[0], pieces[0], second[1], pieces[1], pieces[1]]:
        done = whole.add(("127.0.0.1", 1), p)
        if done is not None:
            got.append(done)
    assert got == [Frame(1, 8, 12, other), Frame(1, 7, 11, big)]
    assert whole.lost == 0
    # A frame's first piece alone, then more frames than can wait: it is given up.
    whole.add("a", pieces[0])
    for seq in range(MAX_REASSEMBLING):
        whole.add("b", decode(Packer(sender=5).pieces(2, seq, 0, other)[0]))
    assert whole.lost == 1
    assert whole.add("a", pieces[1]) is None and whole.add("a", pieces[2]) is None
    with pytest.raises(ValueError, match="over"):
        packer.pieces(1, 9, 0, b"x" * (MAX_FRAME + 1))
