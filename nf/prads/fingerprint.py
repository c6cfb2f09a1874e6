"""TCP OS fingerprints: read from a packet's headers, matched, and printed as prads does.

:func:`observe` reads what p0f v2 (and so prads) looks at in a TCP packet: window size,
TTL, DF, IP total length, the TCP options in order (with MSS, window scale and the
timestamp's value), and the quirks (odd header values).  :func:`match` finds the first
signature that fits, in file order within prads's hash bucket, retrying as DF set when
nothing matched (a DF-clear packet that ends up unmatched then prints DF 1, as in prads).
:func:`render` prints the fingerprint back in signature syntax, from the packet (not from
the signature that matched), the way prads's asset log shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from nf.packet import ACK, CWR, ECE, PSH, RST, SYN, V6, Packet
from nf.prads.signatures import (
    MAXOPT,
    MOD_CONST,
    MOD_MSS,
    MOD_MTU,
    MOD_NONE,
    OPT_EOL,
    OPT_MSS,
    OPT_NOP,
    OPT_SACKOK,
    OPT_TIMESTAMP,
    OPT_WSCALE,
    PACKET_BIG,
    QUIRKS,
    OsSignature,
    OsTable,
    link_name,
    sighash,
)

__all__ = [
    "Fingerprint",
    "FingerprintCache",
    "distance",
    "match",
    "normalize_ttl",
    "observe",
    "render",
]

Q = QUIRKS
_QUIRK_ORDER = tuple(QUIRKS.items())
#: prads's bound on how far below a signature's TTL a packet's may be.
MAXDIST = 512


@dataclass(slots=True)
class Fingerprint:
    """What one TCP packet shows of its sender's stack (prads's ``fp_entry``)."""

    wsize: int
    ttl: int
    df: int
    size: int  # IP total length; 0 for a stray ACK (prads's "open mode")
    opts: tuple[int, ...]
    mss: int
    wsc: int
    quirks: int
    tstamp: int  # the timestamp option's value (0 without one)


def normalize_ttl(ttl: int) -> int:
    """The initial TTL a sender most likely used: 32, 64, 128 or 255."""
    if ttl > 128:
        return 255
    if ttl > 64:
        return 128
    if ttl > 32:
        return 64
    return 32


def distance(ttl: int) -> int:
    """Hops from the sender, as prads reckons them."""
    return normalize_ttl(ttl) - ttl


def observe(packet: Packet, kind: str) -> Fingerprint | None:
    """The fingerprint of a TCP packet for detection ``kind`` (SYN, SYNACK, FIN, RST or
    ACK), or None if its IP header does not fit the frame."""
    frame = packet.frame
    l3 = packet.l3
    end = len(frame)
    # The datagram ends at its total length or at the frame's end, whichever is first.
    dgram_end = min(end, l3 + packet.ip_len)
    if l3 + 20 > dgram_end or packet.ihl < 20:
        return None
    quirks = 0
    v6 = packet.src >= V6
    if v6:
        # prads on IPv6: the flow label stands in for the IP id (L when set, Z when 0),
        # no IP options, DF always 1 (the packet's ip_off says so), and the size is the
        # payload length, not the total.
        quirks |= Q["L"] if packet.ip_id else Q["Z"]
    elif packet.ihl > 20:
        quirks |= Q["I"]
    if not v6 and packet.ip_id == 0:
        quirks |= Q["Z"]
    flags = packet.tcp_flags
    if kind == "RST" and flags & ACK:
        quirks |= Q["K"]
    if kind == "FIN" and flags & ACK:
        quirks |= Q["N"]
    if packet.seq == packet.ack:
        quirks |= Q["Q"]
    if packet.seq == 0:
        quirks |= Q["0"]
    allowed = SYN | ACK | RST | ECE | CWR | (PSH if kind == "ACK" else 0)
    if flags & ~allowed & 0xFF:
        quirks |= Q["F"]
    if packet.ack:
        quirks |= Q["A"]
    if packet.urp:
        quirks |= Q["U"]
    l4 = packet.l4
    if frame[l4 + 12] & 0x0F:
        quirks |= Q["X"]
    olen = packet.tcp_hlen - 20
    if l4 + 20 + olen < dgram_end and kind != "ACK":
        quirks |= Q["D"]
    opts, mss, wsc, tstamp, oquirks = _options(frame, l4 + 20, olen, end)
    return Fingerprint(
        wsize=packet.win,
        ttl=packet.ttl,
        df=1 if packet.ip_off & 0x4000 else 0,
        size=0 if kind == "ACK" else packet.ip_len - (40 if v6 else 0),
        opts=opts,
        mss=mss,
        wsc=wsc,
        quirks=quirks | oquirks,
        tstamp=tstamp,
    )


def _options(
    frame: bytearray, at: int, ilen: int, end: int
) -> tuple[tuple[int, ...], int, int, int, int]:
    """Walk the TCP options as p0f does (bounds checked against the frame's end, not the
    header's): (kinds, mss, wscale, timestamp value, quirks)."""
    opts: list[int] = []
    mss = wsc = tstamp = quirks = 0
    p = at
    while ilen > 0:
        ilen -= 1
        if p >= end:  # the header claims options the frame does not have
            quirks |= Q["!"]
            break
        kind = frame[p]
        p += 1
        if kind == OPT_EOL:
            opts.append(OPT_EOL)
            if ilen:
                quirks |= Q["P"]
        elif kind == OPT_NOP:
            opts.append(OPT_NOP)
        elif kind == OPT_SACKOK:
            opts.append(OPT_SACKOK)
            ilen -= 1
            p += 1
        elif kind == OPT_MSS:
            if p + 3 > end:
                quirks |= Q["!"]
                break
            opts.append(OPT_MSS)
            mss = (frame[p + 1] << 8) | frame[p + 2]
            ilen -= 3
            p += 3
        elif kind == OPT_WSCALE:
            if p + 2 > end:
                quirks |= Q["!"]
                break
            opts.append(OPT_WSCALE)
            wsc = frame[p + 1]
            ilen -= 2
            p += 2
        elif kind == OPT_TIMESTAMP:
            if p + 9 > end:
                quirks |= Q["!"]
                break
            opts.append(OPT_TIMESTAMP)
            if frame[p + 5 : p + 9] != b"\0\0\0\0":
                quirks |= Q["T"]
            tstamp = int.from_bytes(frame[p + 1 : p + 5], "big")
            ilen -= 9
            p += 9
        else:
            if p + 1 > end:
                quirks |= Q["!"]
                break
            skip = frame[p] - 1
            if skip > 32 or skip < 0:
                quirks |= Q["!"]
                break
            opts.append(kind)
            ilen -= skip
            p += skip
        if len(opts) >= MAXOPT - 1:
            quirks |= Q["!"]
            break
        if ilen > 0 and p >= end:
            quirks |= Q["!"]
            break
    return tuple(opts), mss, wsc, tstamp, quirks


def _fits(sig: OsSignature, fp: Fingerprint, tstamp: int) -> bool:
    if fp.size:
        if sig.size:
            if sig.size != fp.size:
                return False
        elif fp.size < PACKET_BIG:
            return False
    if len(sig.opts) != len(fp.opts):
        return False
    if sig.zero_stamp != (not tstamp):
        return False
    if sig.df != fp.df or sig.quirks != fp.quirks:
        return False
    if sig.mss_mod == MOD_NONE:
        if fp.mss != sig.mss:
            return False
    elif fp.mss % sig.mss:
        return False
    if sig.wsc_mod == MOD_NONE:
        if fp.wsc != sig.wsc:
            return False
    elif fp.wsc % sig.wsc:
        return False
    w = fp.wsize
    mod = sig.wsize_mod
    if mod == MOD_NONE:
        if w != sig.wsize:
            return False
    elif mod == MOD_CONST:
        if w % sig.wsize:
            return False
    elif mod == MOD_MSS:
        if fp.mss and not w % fp.mss:
            if w // fp.mss != sig.wsize:
                return False
        elif not w % 1460:
            if w // 1460 != sig.wsize:
                return False
        else:
            return False
    elif mod == MOD_MTU:
        if fp.mss and not w % (fp.mss + 40):
            if w // (fp.mss + 40) != sig.wsize:
                return False
        elif not w % 1500:
            if w // 1500 != sig.wsize:
                return False
        else:
            return False
    if sig.opts != fp.opts:
        return False
    if sig.ttl < fp.ttl:
        return False
    return sig.no_detail or sig.ttl - fp.ttl <= MAXDIST


def match(table: OsTable | None, fp: Fingerprint) -> OsSignature | None:
    """The signature that fits ``fp`` (first in file order within its hash bucket), or
    None.  A DF-clear fingerprint that fits nothing is tried again with DF set, and keeps
    DF set whatever the outcome (``fp.df`` is changed), as prads does."""
    if table is None:
        return None
    while True:
        bucket = table.buckets.get(sighash(fp.size, len(fp.opts), fp.quirks, fp.df))
        if bucket:
            for sig in bucket:
                if _fits(sig, fp, fp.tstamp):
                    return sig
        if fp.df:
            return None
        fp.df = 1


def _opts_text(fp: Fingerprint) -> str:
    parts: list[str] = []
    for kind in fp.opts:
        if kind == OPT_NOP:
            parts.append("N")
        elif kind == OPT_WSCALE:
            parts.append(f"W{fp.wsc}")
        elif kind == OPT_MSS:
            parts.append(f"M{fp.mss}")
        elif kind == OPT_TIMESTAMP:
            parts.append("T" if fp.tstamp else "T0")
        elif kind == OPT_SACKOK:
            parts.append("S")
        elif kind == OPT_EOL:
            parts.append("E")
        else:
            parts.append(f"?{kind}")
    text = ",".join(parts)
    # prads adds a "." to an option list shorter than two characters (so a lone "N"
    # prints as "N.").
    return text + "." if len(text) < 2 else text


def _quirks_text(quirks: int) -> str:
    if not quirks:
        return "."
    return "".join(letter for letter, bit in _QUIRK_ORDER if quirks & bit)


def render(fp: Fingerprint) -> str:
    """The fingerprint in signature syntax, as prads's asset log prints it."""
    w = fp.wsize
    mss = fp.mss
    if mss and w and not w % mss:
        win = f"S{w // mss}"
    elif w and not w % 1460:
        win = f"S{w // 1460}"
    elif mss and w and not w % (mss + 40):
        win = f"T{w // (mss + 40)}"
    elif w and not w % 1500:
        win = f"T{w // 1500}"
    elif w == 12345:
        win = "*(12345)"
    else:
        win = str(w)
    size = str(fp.size) if fp.size < PACKET_BIG else f"*({fp.size})"
    return f"{win}:{fp.ttl}:{fp.df}:{size}:{_opts_text(fp)}:{_quirks_text(fp.quirks)}"


def describe(fp: Fingerprint, sig: OsSignature | None) -> str:
    """What goes between the brackets of an OS line: fingerprint, OS, details, then the
    link (when an MSS was seen) and the uptime (when a timestamp was seen)."""
    text = render(fp)
    if sig is None:
        text += ":unknown:unknown"
    else:
        text += f":{sig.os}:{sig.desc}"
    if fp.mss:
        text += f":link:{link_name(fp.mss)}"
    if fp.tstamp:
        text += f":uptime:{fp.tstamp // 360000}hrs"
    return text


#: Entries a :class:`FingerprintCache` keeps before it starts again (real traffic with
#: TCP timestamps makes most keys unique; the cache must not grow without bound).
CACHE_SIZE = 4096
#: Frames whose bytes after the fixed TCP header run longer than this (options, payload
#: and padding) are not cached: the key would be mostly payload, and unique.
CACHE_TAIL = 80


class FingerprintCache:
    """:func:`observe`, :func:`match` and :func:`describe` of a packet, remembered.

    What they give is a function of the kind, a few header fields and the bytes from the
    TCP options to the frame's end (every read of :func:`_options` is bounded by the
    frame's end, and every other position :func:`observe` reads is fixed relative to the
    IP header), so those make the key: ``ihl``, ``ip_len`` and the tail's length fix the
    frame's end relative to the headers, and of ``seq``, ``ack``, ``urp`` and ``ip_id``
    only what the quirks test is kept.  A hit skips the option walk, the bucket search
    and the printing, which packets of the same stack repeat exactly."""

    __slots__ = ("_entries", "_tables")

    def __init__(self, tables: dict[str, OsTable | None]) -> None:
        self._tables = tables
        self._entries: dict[tuple[Any, ...], tuple[int, str] | None] = {}

    def lookup(self, packet: Packet, kind: str) -> tuple[int, str] | None:
        """``(line, text)`` for a packet of detection ``kind``: the matched signature's
        line (0 when none matched) and :func:`describe`'s text, or None where
        :func:`observe` gives None."""
        frame = packet.frame
        at = packet.l4 + 20
        end = len(frame)
        if at > end or end - at > CACHE_TAIL:
            return _evaluate(self._tables.get(kind), packet, kind)
        seq = packet.seq
        ack = packet.ack
        key = (
            kind,
            packet.ihl,
            packet.ip_len,
            packet.ip_id == 0,
            packet.tcp_flags,
            seq == ack,
            seq == 0,
            ack == 0,
            packet.urp == 0,
            frame[at - 8] & 0x0F,
            packet.win,
            packet.ttl,
            packet.ip_off & 0x4000,
            packet.tcp_hlen,
            bytes(frame[at:end]),
        )
        entries = self._entries
        found = entries.get(key, _MISSING)
        if found is _MISSING:
            found = _evaluate(self._tables.get(kind), packet, kind)
            if len(entries) >= CACHE_SIZE:
                entries.clear()
            entries[key] = found
        return cast("tuple[int, str] | None", found)


_MISSING: Any = object()


def _evaluate(table: OsTable | None, packet: Packet, kind: str) -> tuple[int, str] | None:
    fp = observe(packet, kind)
    if fp is None:
        return None
    sig = match(table, fp)
    return (sig.line if sig is not None else 0), describe(fp, sig)
