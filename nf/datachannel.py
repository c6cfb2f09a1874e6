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
                                  | length (2) | verdict (1) ]
    END body            frames sent to this receiver (8) | datagrams sent to it (8); count 0
    LEAVING body        empty; count 0

``DATA`` goes from the sender to an instance (and from an instance to the sink when it
forwards whole frames); ``RECEIPT`` says what an instance did with frames (the verdict and
the forwarded length) instead of carrying them; ``END`` tells the receiver that everything
before it was sent (with how much, so that it can tell what was lost); ``LEAVING`` is an
instance telling the sender it is about to leave, so that the sender steers its flows
elsewhere and then sends it an ``END``.

Times are ``time.monotonic_ns()``: one clock for every process on the machine (Linux's
CLOCK_MONOTONIC), which is all a loopback channel needs.

:func:`decode` never raises anything but :class:`MalformedDatagram`, whose ``reason`` is a
short stable name to count by: a receiver counts bad datagrams and goes on.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass, field
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_MAX_DATAGRAM",
    "FRAME_OVERHEAD",
    "HEADER",
    "MAGIC",
    "RECEIPT_SIZE",
    "VERSION",
    "Datagram",
    "Frame",
    "Kind",
    "MalformedDatagram",
    "Packer",
    "Receipt",
    "ReceiptPacker",
    "decode",
    "encode_end",
    "encode_leaving",
    "now_ns",
]

MAGIC: Final = 0x5336  # "S6"
VERSION: Final = 1

#: magic, version, kind, sender, datagram seq, send time ns, count.
HEADER: Final = struct.Struct("!HBBIQQH")
#: length, flow, flow seq, frame send time ns; then the frame.
_FRAME: Final = struct.Struct("!HIIQ")
#: flow, flow seq, frame send time ns, forwarded length, verdict.
_RECEIPT: Final = struct.Struct("!IIQHB")
#: frames sent, datagrams sent.
_END: Final = struct.Struct("!QQ")

FRAME_OVERHEAD: Final = _FRAME.size
RECEIPT_SIZE: Final = _RECEIPT.size
#: A datagram's largest size by default: well under loopback's 64 KiB, and small enough
#: that one datagram's worth of frames does not wait long for company at modest rates.
DEFAULT_MAX_DATAGRAM: Final = 16_384
#: The largest UDP payload over IPv4.
_UDP_MAX: Final = 65_507

now_ns = time.monotonic_ns


class Kind(enum.IntEnum):
    """What a datagram carries."""

    DATA = 1
    RECEIPT = 2
    END = 3
    LEAVING = 4


_KINDS: Final = frozenset(int(k) for k in Kind)


class MalformedDatagram(ValueError):
    """A datagram that is not ours or is cut or padded; ``reason`` names what is wrong:
    ``short-header``, ``bad-magic``, ``bad-version``, ``unknown-kind``, ``truncated-frame``,
    ``bad-end``, ``trailing-bytes``."""

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
    and ``datagrams_sent`` for END."""

    kind: Kind
    sender: int
    seq: int
    sent_ns: int
    frames: list[Frame] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    frames_sent: int = 0
    datagrams_sent: int = 0


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
    if count != 0 or n != at:
        raise MalformedDatagram("trailing-bytes", f"a LEAVING has no body: {n - at} bytes")
    return Datagram(Kind.LEAVING, sender, seq, sent)


def _header(kind: Kind, sender: int, seq: int, count: int, sent: int | None = None) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, sender, seq, now_ns() if sent is None else sent, count)


def encode_end(sender: int, seq: int, frames_sent: int, datagrams_sent: int) -> bytes:
    """An END datagram: everything before it was sent (``frames_sent`` frames in
    ``datagrams_sent`` datagrams, this one not counted)."""
    return _header(Kind.END, sender, seq, 0) + _END.pack(frames_sent, datagrams_sent)


def encode_leaving(sender: int, seq: int) -> bytes:
    """A LEAVING datagram: an instance asks the sender to steer its flows elsewhere."""
    return _header(Kind.LEAVING, sender, seq, 0)


class Packer:
    """Frames for one receiver, packed into DATA datagrams of at most ``max_size`` bytes.

    ``add`` returns a finished datagram when the frame did not fit in the one being filled
    (the frame then starts the next); ``take`` finishes the current one (None if empty).
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
        if HEADER.size + need > self.max_size:
            raise ValueError(f"a {len(frame)}-byte frame does not fit in {self.max_size} bytes")
        out = None
        if len(self._buf) + need > self.max_size or self._count == 0xFFFF:
            out = self.take()
        buf = self._buf
        buf += _FRAME.pack(len(frame), flow, seq, sent_ns)
        buf += frame
        self._count += 1
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
