"""Frames for the PRADS tests, built byte by byte (so that odd header values are easy).

``tcp(...)``, ``udp(...)`` and ``icmp(...)`` return Ethernet frames; ``opt_*`` build TCP
options.  Checksums are computed (prads does not look at them, our parser neither).
"""

from __future__ import annotations

import struct

from nf.packet import ip_int

SRC_MAC = b"\x02\x00\x00\x00\x00\x01"
DST_MAC = b"\x02\x00\x00\x00\x00\x02"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def opt_mss(mss: int) -> bytes:
    return struct.pack("!BBH", 2, 4, mss)


def opt_ws(shift: int) -> bytes:
    return struct.pack("!BBB", 3, 3, shift)


def opt_sok() -> bytes:
    return b"\x04\x02"


def opt_ts(val: int, ecr: int = 0) -> bytes:
    return struct.pack("!BBII", 8, 10, val, ecr)


NOP = b"\x01"
EOL = b"\x00"


def ether(l3: bytes, *, vlan: int | None = None, etype: int = 0x0800) -> bytes:
    if vlan is None:
        return DST_MAC + SRC_MAC + struct.pack("!H", etype) + l3
    return DST_MAC + SRC_MAC + struct.pack("!HHH", 0x8100, vlan, etype) + l3


def ipv4(
    src: str,
    dst: str,
    proto: int,
    l4: bytes,
    *,
    ttl: int = 64,
    df: bool = True,
    ip_id: int = 1,
    tos: int = 0,
    ipopts: bytes = b"",
) -> bytes:
    ihl = 5 + len(ipopts) // 4
    total = ihl * 4 + len(l4)
    hdr = struct.pack(
        "!BBHHHBBHII",
        0x40 | ihl,
        tos,
        total,
        ip_id,
        0x4000 if df else 0,
        ttl,
        proto,
        0,
        ip_int(src),
        ip_int(dst),
    )
    hdr += ipopts
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + l4


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return struct.pack("!IIBBH", ip_int(src), ip_int(dst), 0, proto, length)


def tcp(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: str,
    *,
    seq: int = 1000,
    ack: int = 0,
    win: int = 5840,
    opts: bytes = b"",
    payload: bytes = b"",
    urp: int = 0,
    x2: int = 0,
    ttl: int = 64,
    df: bool = True,
    ip_id: int = 1,
    ipopts: bytes = b"",
    vlan: int | None = None,
) -> bytes:
    """A TCP segment; ``flags`` as letters: F S R P A U E C."""
    bits = 0
    for letter, bit in zip("FSRPAUEC", (1, 2, 4, 8, 16, 32, 64, 128), strict=True):
        if letter in flags:
            bits |= bit
    if len(opts) % 4:
        opts += EOL * (4 - len(opts) % 4)
    off = 5 + len(opts) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (off << 4) | x2, bits, win, 0, urp)
    seg = hdr + opts + payload
    check = _csum(_pseudo(src, dst, 6, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", check) + seg[18:]
    return ether(ipv4(src, dst, 6, seg, ttl=ttl, df=df, ip_id=ip_id, ipopts=ipopts), vlan=vlan)


def udp(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    payload: bytes,
    *,
    ttl: int = 64,
    df: bool = False,
    ip_id: int = 7,
    vlan: int | None = None,
) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    check = _csum(_pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
    seg = seg[:6] + struct.pack("!H", check) + seg[8:]
    return ether(ipv4(src, dst, 17, seg, ttl=ttl, df=df, ip_id=ip_id), vlan=vlan)


def icmp(src: str, dst: str, *, ttl: int = 64) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping-data"
    body = body[:2] + struct.pack("!H", _csum(body)) + body[4:]
    return ether(ipv4(src, dst, 1, body, ttl=ttl))


def write_pcap(path: str, frames: list[tuple[float, bytes]]) -> None:
    import dpkt

    with open(path, "wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for ts, frame in frames:
            writer.writepkt(frame, ts=ts)


def read_pcap(path: str) -> list[tuple[float, bytes]]:
    import dpkt

    with open(path, "rb") as fh:
        return [(float(ts), bytes(buf)) for ts, buf in dpkt.pcap.Reader(fh)]
