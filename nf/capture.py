"""Reading and writing capture files: pcap (read with ``struct``), pcapng (read with dpkt).

:func:`read_capture` reads a whole file and checks it before any packet is processed, so a
missing, truncated or foreign file is one :class:`CaptureError` with one clear line.
The NFs parse Ethernet frames: captures of another link type that carries IP (Linux
"cooked" captures, as ``tcpdump -i any`` writes them, v1 and v2; raw IP; BSD loopback) are
given an Ethernet header with the packet's EtherType (addresses zero), as Suricata reads
them; any other link type is refused.  (prads 0.3.3 reads every capture as Ethernet, so
on such a capture its log is not ours to match.)
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["CaptureError", "read_capture", "write_pcap"]

LINKTYPE_ETHERNET = 1
LINKTYPE_NULL = 0  # BSD loopback: the address family, in the writer's byte order
LINKTYPE_RAW = 101  # an IP packet, v4 or v6
LINKTYPE_LOOP = 108  # OpenBSD loopback: the address family, big-endian
LINKTYPE_LINUX_SLL = 113  # Linux cooked v1: 16 bytes, the EtherType at 14
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276  # Linux cooked v2: 20 bytes, the EtherType first

_NO_MACS = bytes(12)
_ETH_IP = b"\x08\x00"
_ETH_IPV6 = b"\x86\xdd"
#: BSD address families of IPv6 (their values differ between systems).
_AF_INET6 = (10, 24, 28, 30)


def _raw_ip(packet: bytes) -> bytes:
    kind = _ETH_IPV6 if packet and packet[0] >> 4 == 6 else _ETH_IP
    return _NO_MACS + kind + packet


def _bsd_loopback(order: str) -> Callable[[bytes], bytes]:
    def convert(packet: bytes) -> bytes:
        if len(packet) < 4:
            return _NO_MACS + b"\0\0" + packet  # (not IP: the NFs count it)
        (family,) = struct.unpack_from(order + "I", packet)
        kind = _ETH_IPV6 if family in _AF_INET6 else _ETH_IP if family == 2 else b"\0\0"
        return _NO_MACS + kind + packet[4:]

    return convert


def _converter(linktype: int, path: Path, order: str = "<") -> Callable[[bytes], bytes] | None:
    """How a packet of ``linktype`` becomes an Ethernet frame (None: it is one); ``order``
    is the capture's byte order (BSD loopback writes its family in the writer's)."""
    if linktype == LINKTYPE_ETHERNET:
        return None
    if linktype == LINKTYPE_LINUX_SLL:
        return lambda p: _NO_MACS + p[14:16] + p[16:]
    if linktype == LINKTYPE_LINUX_SLL2:
        return lambda p: _NO_MACS + p[0:2] + p[20:]
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return _raw_ip
    if linktype == LINKTYPE_NULL:
        return _bsd_loopback(order)
    if linktype == LINKTYPE_LOOP:
        return _bsd_loopback(">")
    raise CaptureError(
        f"{path}: link type {linktype} is not supported (Ethernet, Linux cooked, raw IP"
        " and loopback are)"
    )


_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


class CaptureError(ValueError):
    """A capture file that cannot be read (the message is one line naming the file)."""


def read_capture(path: str | Path, *, decode_links: bool = True) -> list[tuple[float, bytes]]:
    """Every packet of a pcap or pcapng file as ``(timestamp, frame)``, in file order.

    ``decode_links``: a packet of another link type becomes the Ethernet frame of what it
    holds (the default); False: every packet is given as captured, whatever the link
    type, to be read as Ethernet (as prads 0.3.3 reads any capture)."""
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
        return _read_pcap(path, data, decode_links)
    if magic == _PCAPNG_MAGIC:
        return _read_pcapng(path, decode_links)
    raise CaptureError(f"{path}: not a pcap or pcapng file (it starts with {magic.hex()})")


def _read_pcap(path: Path, data: bytes, decode_links: bool) -> list[tuple[float, bytes]]:
    order, unit = _PCAP_MAGIC[data[:4]]
    if len(data) < 24:
        raise CaptureError(f"{path}: truncated pcap file header ({len(data)} of 24 bytes)")
    _vmaj, _vmin, _zone, _sig, _snap, linktype = struct.unpack_from(order + "HHiIII", data, 4)
    convert = _converter(linktype & 0xFFFF, path, order) if decode_links else None
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
        packet = data[at : at + caplen]
        out.append((sec + frac * unit, packet if convert is None else convert(packet)))
        at += caplen
    return out


def _read_pcapng(path: Path, decode_links: bool) -> list[tuple[float, bytes]]:
    import dpkt

    out: list[tuple[float, bytes]] = []
    try:
        with path.open("rb") as f:
            reader = dpkt.pcapng.Reader(f)
            convert = _converter(reader.datalink(), path) if decode_links else None
            for ts, frame in reader:
                packet = bytes(frame)
                out.append((float(ts), packet if convert is None else convert(packet)))
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
