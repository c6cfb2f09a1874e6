"""The live data channel: frames in UDP datagrams on loopback, numbered and timestamped.

The sender packs several frames into one datagram for an NF instance; the instance sends
what it forwarded (the frames, or receipts of them) on to the sink, batched the same way.
Every frame carries the sender's flow number, its sequence number within that flow and the
moment the sender sent it, so that the sink measures loss, reordering within a flow and
end-to-end latency without the frames' contents.

A datagram is a header, then its body, all integers big-endian::

    header (26 bytes)   magic "S6" (2) | version (1) | kind (1) | sender id (4)
                        | datagram sequence number (8) | send time, ns (8) | count (2)
    DATA body           count x [ length (2) | flow (4) | flow seq (4) | frame send time, ns (8)
                                  | the frame's ``length`` bytes ]
    RECEIPT body        count x [ flow (4) | flow seq (4) | frame send time, ns (8)
                                  | length (4) | verdict (1) ]
    END body            frames sent to this receiver (8) | datagrams sent to it (8); count 0
    LEAVING body        empty; count 0
    MOVE body           move id (4) | destination IPv4 address (4) | destination port (2)
                        | count x flow (4); the marker of a re-steer
    HANDOFF body        hand-off id (4) | part (2) | parts (2) | payload (the rest); count 0
    MOVED body          id (4) | part (2); count 0
    PIECE body          flow (4) | flow seq (4) | frame send time, ns (8) | frame length (4)
                        | offset (4) | that many of the frame's bytes from ``offset``; count 0

``DATA`` goes from the sender to an instance (and from an instance to the sink when it
forwards whole frames); ``RECEIPT`` says what an instance did with frames (the verdict and
the forwarded length) instead of carrying them; ``END`` tells the receiver that everything
before it was sent (with how much, so that it can tell what was lost); ``LEAVING`` is an
instance telling the sender it is about to leave, so that the sender steers its flows
elsewhere and then sends it an ``END``.

A frame too big for one datagram (UDP carries at most 65,507 bytes, and a capture taken on
loopback or with a NIC's segmentation offloads holds frames of up to 64 KiB and a little
more) goes as consecutive ``PIECE`` datagrams, which the receiver puts back together
(:class:`Reassembler`) and then handles as a DATA datagram of that one frame.  Frames up to
:data:`MAX_FRAME` bytes are carried.

``MOVE`` goes from the sender to an instance that loses flows at a re-steer, after the
last frame it sent it under the old steering (the marker), naming the flows (the sender's
flow numbers) and their new instance (the address of its data channel).  On every backend
but stop-the-world it asks for ``MOVED`` (with the MOVE's id, part 0) once every frame of
these flows received before the marker is processed; meanwhile the sender holds back those
flows' frames, and then sends them to the new instance, so that no frame of a moved flow is
processed before an earlier one (the other flows go on as before).

The stop-the-world baseline (``baselines.stop_the_world``), whose sender pauses all traffic
while the moved flows' state moves in bulk, gives MOVE more to do and uses the last two
kinds too: once everything before the marker is processed, hand the state of the flows to
the instance whose data channel is at the destination.  ``HANDOFF`` carries that state's
description from the old instance to the new one, in ``parts`` datagrams numbered from 0
(the payload belongs to the backend: which objects of which flows, for the new instance to
acquire at once).  ``MOVED`` acknowledges either: the new instance's for one part of a
hand-off once it holds those objects, the old instance's (part 0) for a whole MOVE once
every part is acknowledged.  MOVE, HANDOFF and MOVED are repeated
until acknowledged (UDP), and receivers ignore the repeats of what they are doing (and
acknowledge again what they did).

Times are ``time.monotonic_ns()``: one clock for every process on the machine (Linux's
CLOCK_MONOTONIC), which is all a loopback channel needs.

:func:`decode` never raises anything but :class:`MalformedDatagram`, whose ``reason`` is a
short stable name to count by: a receiver counts bad datagrams and goes on.
"""

from __future__ import annotations

import enum
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_MAX_DATAGRAM",
    "FRAME_OVERHEAD",
    "HEADER",
    "MAGIC",
    "MAX_FRAME",
    "MAX_FRAME_IN_DATAGRAM",
    "RECEIPT_SIZE",
    "VERSION",
    "Datagram",
    "Frame",
    "Kind",
    "MalformedDatagram",
    "Packer",
    "Reassembler",
    "Receipt",
    "ReceiptPacker",
    "decode",
    "encode_end",
    "encode_handoff",
    "encode_leaving",
    "encode_move",
    "encode_moved",
    "frame_fits",
    "handoff_room",
    "move_room",
    "now_ns",
]

MAGIC: Final = 0x5336  # "S6"
VERSION: Final = 2

#: magic, version, kind, sender, datagram seq, send time ns, count.
HEADER: Final = struct.Struct("!HBBIQQH")
#: length, flow, flow seq, frame send time ns; then the frame.
_FRAME: Final = struct.Struct("!HIIQ")
#: flow, flow seq, frame send time ns, forwarded length, verdict.
_RECEIPT: Final = struct.Struct("!IIQIB")
#: frames sent, datagrams sent.
_END: Final = struct.Struct("!QQ")
#: move id, destination IPv4 address, destination port; then count x flow.
_MOVE: Final = struct.Struct("!I4sH")
_FLOW: Final = struct.Struct("!I")
#: hand-off id, part, parts; then the payload.
_HANDOFF: Final = struct.Struct("!IHH")
#: id, part.
_MOVED: Final = struct.Struct("!IH")
#: flow, flow seq, frame send time, frame length, offset; then the piece's bytes.
_PIECE: Final = struct.Struct("!IIQII")

FRAME_OVERHEAD: Final = _FRAME.size
RECEIPT_SIZE: Final = _RECEIPT.size
#: A datagram's largest size by default: well under loopback's 64 KiB, and small enough
#: that one datagram's worth of frames does not wait long for company at modest rates.
DEFAULT_MAX_DATAGRAM: Final = 16_384
#: The largest UDP payload over IPv4.
_UDP_MAX: Final = 65_507
#: The largest frame the channel carries (in pieces): pcap's usual snap length.
MAX_FRAME: Final = 262_144
#: The largest frame that one DATA datagram carries.
MAX_FRAME_IN_DATAGRAM: Final = _UDP_MAX - HEADER.size - _FRAME.size
#: Frame bytes per PIECE datagram.
_PIECE_BYTES: Final = _UDP_MAX - HEADER.size - _PIECE.size
#: Frames a receiver puts back together at once; beyond it the oldest is given up.
MAX_REASSEMBLING: Final = 64

now_ns = time.monotonic_ns


class Kind(enum.IntEnum):
    """What a datagram carries."""

    DATA = 1
    RECEIPT = 2
    END = 3
    LEAVING = 4
    MOVE = 5
    HANDOFF = 6
    MOVED = 7
    PIECE = 8


_KINDS: Final = frozenset(int(k) for k in Kind)


class MalformedDatagram(ValueError):
    """A datagram that is not ours or is cut or padded; ``reason`` names what is wrong:
    ``short-header``, ``bad-magic``, ``bad-version``, ``unknown-kind``, ``truncated-frame``,
    ``bad-end``, ``trailing-bytes``, ``bad-move``, ``bad-handoff``, ``bad-moved``,
    ``bad-piece``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Frame(NamedTuple):
    """One frame of a DATA datagram."""

    flow: int
    seq: int
    sent_ns: int
    data: bytes


class Receipt(NamedTuple):
    """What an instance did with one frame: its numbers, the forwarded length and the
    verdict (``nf.base.Verdict`` as an int: 0 forwarded, 1 dropped)."""

    flow: int
    seq: int
    sent_ns: int
    length: int
    verdict: int


@dataclass(frozen=True, slots=True)
class Datagram:
    """A decoded datagram.  ``frames`` for DATA, ``receipts`` for RECEIPT; ``frames_sent``
    and ``datagrams_sent`` for END; ``move_id``, ``destination`` and ``flows`` for MOVE;
    ``move_id``, ``part``, ``parts`` and ``payload`` for HANDOFF; ``move_id`` and ``part``
    for MOVED; for PIECE, ``frames`` holds the piece (its bytes as the frame's data),
    ``length`` the whole frame's length and ``offset`` where the piece starts in it."""

    kind: Kind
    sender: int
    seq: int
    sent_ns: int
    frames: list[Frame] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    frames_sent: int = 0
    datagrams_sent: int = 0
    move_id: int = 0
    destination: tuple[str, int] = ("", 0)
    flows: list[int] = field(default_factory=list)
    part: int = 0
    parts: int = 0
    payload: bytes = b""
    length: int = 0
    offset: int = 0


def decode(data: bytes | bytearray | memoryview) -> Datagram:
    """Decode one datagram; :class:`MalformedDatagram` for anything that is not exactly
    one well-formed datagram of ours."""
    n = len(data)
    if n < HEADER.size:
        raise MalformedDatagram("short-header", f"{n} bytes, a header is {HEADER.size}")
    magic, version, kind, sender, seq, sent, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedDatagram("bad-magic", f"{magic:#06x}")
    if version != VERSION:
        raise MalformedDatagram("bad-version", f"version {version}, we speak {VERSION}")
    if kind not in _KINDS:
        raise MalformedDatagram("unknown-kind", f"kind {kind}")
    at = HEADER.size
    if kind == Kind.DATA:
        frames: list[Frame] = []
        unpack = _FRAME.unpack_from
        size = _FRAME.size
        for i in range(count):
            if at + size > n:
                raise MalformedDatagram("truncated-frame", f"frame {i} of {count}: header cut")
            length, flow, fseq, fsent = unpack(data, at)
            at += size
            end = at + length
            if end > n:
                raise MalformedDatagram(
                    "truncated-frame", f"frame {i} of {count}: {n - at} of {length} bytes"
                )
            frames.append(Frame(flow, fseq, fsent, bytes(data[at:end])))
            at = end
        if at != n:
            raise MalformedDatagram("trailing-bytes", f"{n - at} bytes after {count} frames")
        return Datagram(Kind.DATA, sender, seq, sent, frames=frames)
    if kind == Kind.RECEIPT:
        need = at + count * _RECEIPT.size
        if need > n:
            raise MalformedDatagram("truncated-frame", f"{count} receipts need {need} bytes, {n}")
        if need != n:
            raise MalformedDatagram("trailing-bytes", f"{n - need} bytes after {count} receipts")
        receipts = [Receipt(*r) for r in _RECEIPT.iter_unpack(memoryview(data)[at:need])]
        return Datagram(Kind.RECEIPT, sender, seq, sent, receipts=receipts)
    if kind == Kind.END:
        if count != 0 or n != at + _END.size:
            raise MalformedDatagram("bad-end", f"count {count}, {n - at} body bytes")
        frames_sent, datagrams_sent = _END.unpack_from(data, at)
        return Datagram(
            Kind.END, sender, seq, sent, frames_sent=frames_sent, datagrams_sent=datagrams_sent
        )
    if kind == Kind.LEAVING:
        if count != 0 or n != at:
            raise MalformedDatagram("trailing-bytes", f"a LEAVING has no body: {n - at} bytes")
        return Datagram(Kind.LEAVING, sender, seq, sent)
    if kind == Kind.PIECE:
        return _decode_piece(sender, seq, sent, count, data, at)
    return _decode_move(Kind(kind), sender, seq, sent, count, data, at)


def _decode_piece(
    sender: int, seq: int, sent: int, count: int, data: bytes | bytearray | memoryview, at: int
) -> Datagram:
    n = len(data)
    if count != 0 or n <= at + _PIECE.size:
        raise MalformedDatagram("bad-piece", f"count {count}, {n - at} body bytes")
    flow, fseq, fsent, length, offset = _PIECE.unpack_from(data, at)
    at += _PIECE.size
    if length > MAX_FRAME or offset + (n - at) > length:
        raise MalformedDatagram("bad-piece", f"{n - at} bytes at {offset} of {length}")
    piece = Frame(flow, fseq, fsent, bytes(data[at:n]))
    return Datagram(Kind.PIECE, sender, seq, sent, frames=[piece], length=length, offset=offset)


def _decode_move(
    kind: Kind,
    sender: int,
    seq: int,
    sent: int,
    count: int,
    data: bytes | bytearray | memoryview,
    at: int,
) -> Datagram:
    """The stop-the-world kinds: MOVE, HANDOFF, MOVED."""
    n = len(data)
    if kind == Kind.MOVE:
        if n != at + _MOVE.size + count * _FLOW.size:
            raise MalformedDatagram("bad-move", f"count {count}, {n - at} body bytes")
        move_id, host, port = _MOVE.unpack_from(data, at)
        at += _MOVE.size
        flows = [f for (f,) in _FLOW.iter_unpack(memoryview(data)[at:n])]
        dest = (".".join(str(b) for b in host), port)
        return Datagram(kind, sender, seq, sent, move_id=move_id, destination=dest, flows=flows)
    if kind == Kind.HANDOFF:
        if count != 0 or n < at + _HANDOFF.size:
            raise MalformedDatagram("bad-handoff", f"count {count}, {n - at} body bytes")
        move_id, part, parts = _HANDOFF.unpack_from(data, at)
        if part >= parts:
            raise MalformedDatagram("bad-handoff", f"part {part} of {parts}")
        payload = bytes(data[at + _HANDOFF.size : n])
        return Datagram(
            kind, sender, seq, sent, move_id=move_id, part=part, parts=parts, payload=payload
        )
    if count != 0 or n != at + _MOVED.size:
        raise MalformedDatagram("bad-moved", f"count {count}, {n - at} body bytes")
    move_id, part = _MOVED.unpack_from(data, at)
    return Datagram(kind, sender, seq, sent, move_id=move_id, part=part)


def _header(kind: Kind, sender: int, seq: int, count: int, sent: int | None = None) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, sender, seq, now_ns() if sent is None else sent, count)


def encode_end(sender: int, seq: int, frames_sent: int, datagrams_sent: int) -> bytes:
    """An END datagram: everything before it was sent (``frames_sent`` frames in
    ``datagrams_sent`` datagrams, this one not counted)."""
    return _header(Kind.END, sender, seq, 0) + _END.pack(frames_sent, datagrams_sent)


def encode_leaving(sender: int, seq: int) -> bytes:
    """A LEAVING datagram: an instance asks the sender to steer its flows elsewhere."""
    return _header(Kind.LEAVING, sender, seq, 0)


def move_room(max_size: int = DEFAULT_MAX_DATAGRAM) -> int:
    """How many flows one MOVE datagram of at most ``max_size`` bytes names."""
    return min((max_size - HEADER.size - _MOVE.size) // _FLOW.size, 0xFFFF)


def encode_move(
    sender: int, seq: int, move_id: int, destination: tuple[str, int], flows: list[int]
) -> bytes:
    """A MOVE datagram: hand the state of ``flows`` to the instance whose data channel is at
    ``destination`` (an IPv4 address and port) once everything before this is processed.
    ``ValueError`` for more flows than a datagram may name (:func:`move_room` per 16 KiB)."""
    if len(flows) > 0xFFFF or HEADER.size + _MOVE.size + 4 * len(flows) > _UDP_MAX:
        raise ValueError(f"{len(flows)} flows do not fit in one MOVE")
    host, port = destination
    body = _MOVE.pack(move_id, socket.inet_aton(host), port)
    return (
        _header(Kind.MOVE, sender, seq, len(flows)) + body + struct.pack(f"!{len(flows)}I", *flows)
    )


def handoff_room(max_size: int = DEFAULT_MAX_DATAGRAM) -> int:
    """The largest HANDOFF payload in a datagram of at most ``max_size`` bytes."""
    return max_size - HEADER.size - _HANDOFF.size


def encode_handoff(
    sender: int, seq: int, move_id: int, part: int, parts: int, payload: bytes
) -> bytes:
    """A HANDOFF datagram: part ``part`` (from 0) of ``parts`` of hand-off ``move_id``."""
    if not 0 <= part < parts <= 0xFFFF:
        raise ValueError(f"part {part} of {parts}")
    if HEADER.size + _HANDOFF.size + len(payload) > _UDP_MAX:
        raise ValueError(f"a {len(payload)}-byte payload does not fit in a datagram")
    return _header(Kind.HANDOFF, sender, seq, 0) + _HANDOFF.pack(move_id, part, parts) + payload


def encode_moved(sender: int, seq: int, move_id: int, part: int = 0) -> bytes:
    """A MOVED datagram: ``move_id`` (part ``part``) is done."""
    return _header(Kind.MOVED, sender, seq, 0) + _MOVED.pack(move_id, part)


def frame_fits(frame: bytes | bytearray) -> bool:
    """Whether one DATA datagram can carry ``frame`` (alone, at worst); a bigger one goes
    in pieces (:meth:`Packer.pieces`)."""
    return len(frame) <= MAX_FRAME_IN_DATAGRAM


class Packer:
    """Frames for one receiver, packed into DATA datagrams of at most ``max_size`` bytes.

    ``add`` returns a finished datagram when the frame did not fit in the one being filled
    (the frame then starts the next); ``take`` finishes the current one (None if empty).
    A frame too big for ``max_size`` on its own travels alone, in a datagram of up to UDP's
    limit; one that no datagram can carry (see :func:`frame_fits`) goes through
    :meth:`pieces` instead (``add`` raises ``ValueError`` for it).
    The datagram's send time is stamped when it is finished, just before it is sent.
    ``datagrams`` and ``frames`` count what was finished, for the END marker."""

    __slots__ = ("_buf", "_count", "datagrams", "frames", "max_size", "sender")

    def __init__(self, sender: int, max_size: int = DEFAULT_MAX_DATAGRAM) -> None:
        if not HEADER.size + _FRAME.size < max_size <= _UDP_MAX:
            raise ValueError(f"max_size must be in ({HEADER.size + _FRAME.size}, {_UDP_MAX}]")
        self.sender = sender
        self.max_size = max_size
        self._buf = bytearray(HEADER.size)
        self._count = 0
        self.datagrams = 0
        self.frames = 0

    def __len__(self) -> int:
        """Frames in the datagram being filled."""
        return self._count

    def add(self, flow: int, seq: int, sent_ns: int, frame: bytes | bytearray) -> bytes | None:
        """Add one frame; a finished datagram when this one had to start a new one."""
        need = _FRAME.size + len(frame)
        if HEADER.size + need > _UDP_MAX:
            raise ValueError(f"a {len(frame)}-byte frame does not fit in a UDP datagram")
        out = None
        if len(self._buf) + need > self.max_size or self._count == 0xFFFF:
            # (a frame alone bigger than max_size fills its own datagram: the next add
            # finds it full)
            out = self.take()
        buf = self._buf
        buf += _FRAME.pack(len(frame), flow, seq, sent_ns)
        buf += frame
        self._count += 1
        return out

    def pieces(self, flow: int, seq: int, sent_ns: int, frame: bytes | bytearray) -> list[bytes]:
        """A frame too big for one datagram (up to :data:`MAX_FRAME` bytes), after the
        datagram being filled: the datagrams to send, in order.  It counts as one frame."""
        if len(frame) > MAX_FRAME:
            raise ValueError(f"a {len(frame)}-byte frame is over {MAX_FRAME} bytes")
        first = self.take()
        out = [] if first is None else [first]
        view = memoryview(frame)
        for offset in range(0, len(frame), _PIECE_BYTES):
            chunk = view[offset : offset + _PIECE_BYTES]
            out.append(
                _header(Kind.PIECE, self.sender, self.datagrams, 0)
                + _PIECE.pack(flow, seq, sent_ns, len(frame), offset)
                + chunk
            )
            self.datagrams += 1
        self.frames += 1
        return out

    def take(self) -> bytes | None:
        """The datagram being filled, finished and numbered; None when it is empty."""
        if not self._count:
            return None
        buf = self._buf
        HEADER.pack_into(
            buf, 0, MAGIC, VERSION, Kind.DATA, self.sender, self.datagrams, now_ns(), self._count
        )
        self.datagrams += 1
        self.frames += self._count
        out = bytes(buf)
        self._buf = bytearray(HEADER.size)
        self._count = 0
        return out


class Reassembler:
    """Frames sent in PIECE datagrams, put back together.  ``add`` takes a piece and gives
    the whole frame once its last byte is in.  A piece repeated is ignored; at most
    :data:`MAX_REASSEMBLING` frames are in progress, and beyond that the oldest is given up
    (its other pieces were lost: ``lost`` counts it)."""

    __slots__ = ("_done", "_frames", "lost")

    def __init__(self) -> None:
        #: (source, flow, seq) -> (the frame's bytes, the pieces' offsets, bytes in)
        self._frames: dict[tuple[object, int, int], tuple[bytearray, set[int], list[int]]] = {}
        #: The frames put together last (a late repeat of one of their pieces is ignored).
        self._done: dict[tuple[object, int, int], None] = {}
        self.lost = 0

    def add(self, source: object, piece: Datagram) -> Frame | None:
        part = piece.frames[0]
        key = (source, part.flow, part.seq)
        entry = self._frames.get(key)
        if entry is None:
            if key in self._done:
                return None
            if len(self._frames) >= MAX_REASSEMBLING:
                del self._frames[next(iter(self._frames))]
                self.lost += 1
            entry = self._frames[key] = (bytearray(piece.length), set(), [0])
        buf, offsets, got = entry
        if len(buf) != piece.length or piece.offset in offsets:
            return None  # a repeat, or a piece of another frame under the same numbers
        offsets.add(piece.offset)
        buf[piece.offset : piece.offset + len(part.data)] = part.data
        got[0] += len(part.data)
        if got[0] < len(buf):
            return None
        del self._frames[key]
        done = self._done
        if len(done) >= MAX_REASSEMBLING:
            del done[next(iter(done))]
        done[key] = None
        return Frame(part.flow, part.seq, part.sent_ns, bytes(buf))


class ReceiptPacker:
    """Receipts for the sink, packed into RECEIPT datagrams of at most ``max_size`` bytes;
    the same ``add``/``take`` protocol as :class:`Packer`."""

    __slots__ = ("_buf", "_count", "_limit", "datagrams", "receipts", "sender")

    def __init__(self, sender: int, max_size: int = DEFAULT_MAX_DATAGRAM) -> None:
        if not HEADER.size + _RECEIPT.size <= max_size <= _UDP_MAX:
            raise ValueError(f"max_size must be in [{HEADER.size + _RECEIPT.size}, {_UDP_MAX}]")
        self.sender = sender
        self._limit = min((max_size - HEADER.size) // _RECEIPT.size, 0xFFFF)
        self._buf = bytearray(HEADER.size)
        self._count = 0
        self.datagrams = 0
        self.receipts = 0

    def __len__(self) -> int:
        return self._count

    def add(self, flow: int, seq: int, sent_ns: int, length: int, verdict: int) -> bytes | None:
        """Add one receipt; a finished datagram when the one being filled became full."""
        self._buf += _RECEIPT.pack(flow, seq, sent_ns, length, verdict)
        self._count += 1
        if self._count >= self._limit:
            return self.take()
        return None

    def take(self) -> bytes | None:
        """The datagram being filled, finished and numbered; None when it is empty."""
        if not self._count:
            return None
        buf = self._buf
        HEADER.pack_into(
            buf, 0, MAGIC, VERSION, Kind.RECEIPT, self.sender, self.datagrams, now_ns(), self._count
        )
        self.datagrams += 1
        self.receipts += self._count
        out = bytes(buf)
        self._buf = bytearray(HEADER.size)
        self._count = 0
        return out
