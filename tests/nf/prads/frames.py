"""Frames for the PRADS tests, built byte by byte (so that odd header values are easy).

``tcp(...)``, ``udp(...)`` and ``icmp(...)`` return Ethernet frames (IPv6 ones when the
addresses are IPv6: ``ttl`` is then the hop limit and ``flow`` the flow label); ``opt_*``
build TCP options.  Checksums are computed (prads does not look at them, our parser
neither).
"""

from __future__ import annotations

import socket
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


def ipv6(src: str, dst: str, nh: int, l4: bytes, *, hops: int = 64, flow: int = 0) -> bytes:
    first = 6 << 28 | flow
    return (
        struct.pack("!IHBB", first, len(l4), nh, hops)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + l4
    )


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    if ":" in src:
        return (
            socket.inet_pton(socket.AF_INET6, src)
            + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!IxxxB", length, proto)
        )
    return struct.pack("!IIBBH", ip_int(src), ip_int(dst), 0, proto, length)


def _ip(
    src: str, dst: str, proto: int, seg: bytes, vlan: int | None, flow: int, **v4: object
) -> bytes:
    """The IP packet of ``seg`` in its Ethernet frame: IPv6 when ``src`` is."""
    if ":" in src:
        hops = v4["ttl"]
        assert isinstance(hops, int)
        return ether(ipv6(src, dst, proto, seg, hops=hops, flow=flow), vlan=vlan, etype=0x86DD)
    return ether(ipv4(src, dst, proto, seg, **v4), vlan=vlan)  # type: ignore[arg-type]


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
    flow: int = 0,
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
    return _ip(src, dst, 6, seg, vlan, flow, ttl=ttl, df=df, ip_id=ip_id, ipopts=ipopts)


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
    flow: int = 0,
) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    check = _csum(_pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
    seg = seg[:6] + struct.pack("!H", check) + seg[8:]
    return _ip(src, dst, 17, seg, vlan, flow, ttl=ttl, df=df, ip_id=ip_id)


def icmp(src: str, dst: str, *, ttl: int = 64) -> bytes:
    """An echo request (ICMPv6's when the addresses are IPv6)."""
    v6 = ":" in src
    body = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 1, 1) + b"ping-data"
    pseudo = _pseudo(src, dst, 58, len(body)) if v6 else b""
    body = body[:2] + struct.pack("!H", _csum(pseudo + body)) + body[4:]
    return _ip(src, dst, 58 if v6 else 1, body, None, 0, ttl=ttl)


def write_pcap(
    path: str, frames: list[tuple[float, bytes]], snaplen: int | None = None, linktype: int = 1
) -> None:
    """``frames`` as a pcap file of ``linktype``; with ``snaplen``, as a capture with that
    snap length writes them (each record holds at most ``snaplen`` bytes and the frame's
    own length)."""
    import dpkt

    with open(path, "wb") as fh:
        if snaplen is None:
            writer = dpkt.pcap.Writer(fh, linktype=linktype)
            for ts, frame in frames:
                writer.writepkt(frame, ts=ts)
            return
        # (dpkt's writer records every frame whole: the cut records are packed here)
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype))
        for ts, frame in frames:
            sec = int(ts)
            usec = round((ts - sec) * 1e6)
            kept = frame[:snaplen]
            fh.write(struct.pack("<IIII", sec, usec, len(kept), len(frame)) + kept)


def read_pcap(path: str) -> list[tuple[float, bytes]]:
    import dpkt

    with open(path, "rb") as fh:
        return [(float(ts), bytes(buf)) for ts, buf in dpkt.pcap.Reader(fh)]
