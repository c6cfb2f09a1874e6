"""Reading and writing capture files: pcap (read with ``struct``), pcapng (read with dpkt).

:func:`read_capture` reads a whole file and checks it before any packet is processed, so a
missing, truncated or foreign file is one :class:`CaptureError` with one clear line.
Only Ethernet captures are taken (the NFs parse Ethernet frames).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["CaptureError", "read_capture", "write_pcap"]

LINKTYPE_ETHERNET = 1

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


class CaptureError(ValueError):
    """A capture file that cannot be read (the message is one line naming the file)."""


def read_capture(path: str | Path) -> list[tuple[float, bytes]]:
    """Every packet of a pcap or pcapng file as ``(timestamp, frame)``, in file order."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptureError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CaptureError(f"{path}: is a directory, not a capture file") from None
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) < 4:
        raise CaptureError(f"{path}: not a pcap or pcapng file ({len(data)} bytes)")
    magic = data[:4]
    if magic in _PCAP_MAGIC:
        return _read_pcap(path, data)
    if magic == _PCAPNG_MAGIC:
        return _read_pcapng(path)
    raise CaptureError(f"{path}: not a pcap or pcapng file (it starts with {magic.hex()})")


def _read_pcap(path: Path, data: bytes) -> list[tuple[float, bytes]]:
    order, unit = _PCAP_MAGIC[data[:4]]
    if len(data) < 24:
        raise CaptureError(f"{path}: truncated pcap file header ({len(data)} of 24 bytes)")
    _vmaj, _vmin, _zone, _sig, _snap, linktype = struct.unpack_from(order + "HHiIII", data, 4)
    if linktype & 0xFFFF != LINKTYPE_ETHERNET:
        raise CaptureError(
            f"{path}: link type {linktype & 0xFFFF} is not supported (Ethernet only)"
        )
    record = struct.Struct(order + "IIII")
    out: list[tuple[float, bytes]] = []
    at = 24
    end = len(data)
    while at < end:
        if at + 16 > end:
            raise CaptureError(
                f"{path}: truncated: packet {len(out) + 1}'s record header is cut at byte {at}"
            )
        sec, frac, caplen, _wirelen = record.unpack_from(data, at)
        at += 16
        if caplen > 262144:
            raise CaptureError(
                f"{path}: corrupt: packet {len(out) + 1} claims {caplen} captured bytes"
            )
        if at + caplen > end:
            raise CaptureError(
                f"{path}: truncated: packet {len(out) + 1} has {end - at} of {caplen} bytes"
            )
        out.append((sec + frac * unit, data[at : at + caplen]))
        at += caplen
    return out


def _read_pcapng(path: Path) -> list[tuple[float, bytes]]:
    import dpkt

    out: list[tuple[float, bytes]] = []
    try:
        with path.open("rb") as f:
            reader = dpkt.pcapng.Reader(f)
            if reader.datalink() != LINKTYPE_ETHERNET:
                raise CaptureError(
                    f"{path}: link type {reader.datalink()} is not supported (Ethernet only)"
                )
            for ts, frame in reader:
                out.append((float(ts), bytes(frame)))
    except CaptureError:
        raise
    except Exception as exc:  # dpkt's errors for a broken pcapng are of several kinds
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CaptureError(f"{path}: unreadable pcapng after {len(out)} packets ({what})") from None
    return out


def write_pcap(out: BinaryIO, packets: Iterable[tuple[float, bytes | bytearray]]) -> int:
    """Write ``(timestamp, frame)`` pairs as a microsecond pcap of Ethernet frames; the
    number written."""
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, LINKTYPE_ETHERNET))
    record = struct.Struct("<IIII")
    n = 0
    for ts, frame in packets:
        sec = int(ts)
        usec = round((ts - sec) * 1e6)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        out.write(record.pack(sec, usec, len(frame), len(frame)))
        out.write(frame)
        n += 1
    return n
