"""Packets: Ethernet (with 802.1Q tags), IPv4, TCP, UDP and ICMP, parsed in place.

``parse(frame, ts)`` reads the headers with ``struct`` straight from the frame's bytes and
never raises: a frame it cannot read as IPv4 comes back with ``drop`` set to the reason
(the NF counts it and decides whether to pass or drop it).  Offsets into the frame (``l3``,
``l4``, ``pl``, ``pend``) let an NF look at bytes without copying them, and
:meth:`Packet.rewrite_src` / :meth:`Packet.rewrite_dst` change addresses and ports in
place, fixing the IP and TCP/UDP checksums incrementally (RFC 1624, eqn. 3).

IPv6 is read too, for the NFs that analyse it (PRADS): an IPv6 packet comes back with
``drop`` set to ``ipv6`` (so that the IPv4-only NFs count and pass it as before), and with
its fields filled as for IPv4: ``src``/``dst`` are the 128-bit addresses with bit 128 set
(:data:`V6`, so that no IPv6 address equals an IPv4 one as a key; :func:`ip_str` prints
them), ``ihl`` 40, ``ip_len`` the header plus the payload length, ``ttl`` the hop limit,
``proto`` the next header (extension headers are not walked, as prads 0.3.3 does not;
:func:`parse_transport` walks them, as Suricata does),
``ip_id`` the flow label, ``ip_off`` DF (no fragmentation field), then the TCP, UDP or
ICMPv6 header.  An IPv6 packet that cannot be read so is ``bad-ipv6``.

Reasons a frame is not parsed (``Packet.drop``): ``truncated-ethernet``, ``not-ip``,
``ipv6``, ``bad-ipv6``, ``bad-ip-header`` (version not 4, header length under 20 bytes, total length
shorter than the header), ``truncated-ip`` (the frame ends before the header or before the
total length), ``truncated-tcp``, ``truncated-udp``, ``truncated-icmp``, ``bad-tcp-header``
(data offset under 20 bytes).  An IPv4 packet of another protocol, or a fragment other than
the first, is fine: its ports are 0 and its whole L4 part is payload
(:func:`parse_fragment_data` reads that data as a header instead, as prads does).  A
datagram that a capture's snap length cut after its headers stays ``truncated-ip``
(``bad-ipv6``) but has ``cut`` set and its headers read (``Packet.cut``), for an NF that
analyses what was captured, as prads does.
"""

from __future__ import annotations

import struct

__all__ = [
    "ACK",
    "CWR",
    "DROP_REASONS",
    "ECE",
    "FIN",
    "ICMP",
    "PSH",
    "RST",
    "SYN",
    "TCP",
    "UDP",
    "URG",
    "V6",
    "Packet",
    "checksum",
    "ip_int",
    "ip_str",
    "parse",
    "parse_fragment_data",
    "parse_transport",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

ICMP = 1
TCP = 6
UDP = 17
ICMP6 = 58

#: Set in the address of an IPv6 packet (``Packet.src``, ``dst``): bit 128, above the
#: address itself, so that IPv6 and IPv4 addresses never meet as keys.
V6 = 1 << 128
_V6_MASK = V6 - 1

ETH_IP = 0x0800
ETH_IPV6 = 0x86DD
ETH_VLAN = (0x8100, 0x88A8, 0x9100)

#: Every value ``Packet.drop`` can take besides None, in a stable order (for counters).
DROP_REASONS = (
    "truncated-ethernet",
    "not-ip",
    "ipv6",
    "bad-ipv6",
    "bad-ip-header",
    "truncated-ip",
    "truncated-tcp",
    "truncated-udp",
    "truncated-icmp",
    "bad-tcp-header",
)

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
_ip = struct.Struct("!BBHHHBBHII").unpack_from
_tcp = struct.Struct("!HHIIBBHHH").unpack_from
_ports = struct.Struct("!HH").unpack_from
_ip6 = struct.Struct("!IHBB16s16s").unpack_from
#: EtherType, an IPv4 header without options and a TCP header without options (or a UDP
#: header and 12 bytes more), as one unpack from byte 12 of the frame.
_eth_ip_l4 = struct.Struct("!HBBHHHBBHIIHHIIBBHHH").unpack_from
_pack16 = struct.Struct("!H").pack_into
_pack32 = struct.Struct("!I").pack_into


def ip_str(addr: int) -> str:
    """``0x0A000001`` -> ``"10.0.0.1"``; an IPv6 address (with :data:`V6` set) as C's
    ``inet_ntop`` writes it, as prads prints it: the longest run of two or more zero
    groups (the first of equal ones) as ``::``, and an IPv4-compatible or IPv4-mapped
    address with its last 32 bits dotted (``::ffff:10.0.0.1``; ``::1`` is not one)."""
    if addr < V6:
        return f"{addr >> 24 & 255}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}"
    a = addr & _V6_MASK
    words = [a >> (112 - 16 * i) & 0xFFFF for i in range(8)]
    best, best_len, i = -1, 0, 0
    while i < 8:
        if words[i] == 0:
            j = i
            while j < 8 and words[j] == 0:
                j += 1
            if j - i > best_len:
                best, best_len = i, j - i
            i = j
        else:
            i += 1
    if best_len < 2:
        best = -1
    out = ""
    i = 0
    while i < 8:
        if i == best:
            out += "::" if i == 0 else ":"
            i += best_len
            continue
        if (
            i == 6
            and best == 0
            and (
                best_len == 6
                or (best_len == 7 and words[7] != 1)
                or (best_len == 5 and words[5] == 0xFFFF)
            )
        ):
            out += ip_str(a & 0xFFFFFFFF)
            break
        out += f"{words[i]:x}"
        if i < 7:
            out += ":"
        i += 1
    return out


def ip_int(text: str) -> int:
    """``"10.0.0.1"`` -> ``0x0A000001``; ``ValueError`` for anything else."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        raise ValueError(f"not an IPv4 address: {text!r}")
    a, b, c, d = (int(p) for p in parts)
    return a << 24 | b << 16 | c << 8 | d


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the one's complement of the one's
    complement sum of its 16-bit words (an odd last byte padded with zero)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Packet:
    """One frame and its parsed headers (see the module docstring for ``drop``).

    Integer fields of headers a packet does not have are 0; ``tcp_options`` is empty then.
    ``pl``..``pend`` is the L4 payload (``pend`` is the end of the IP datagram, so Ethernet
    padding is not payload)."""

    __slots__ = (
        "ack",
        "both_key",
        "cut",
        "dport",
        "drop",
        "dst",
        "frame",
        "icmp_code",
        "icmp_type",
        "ihl",
        "ip_id",
        "ip_len",
        "ip_off",
        "l3",
        "l4",
        "pend",
        "pl",
        "proto",
        "seq",
        "sport",
        "src",
        "tcp_flags",
        "tcp_hlen",
        "tcp_options",
        "tos",
        "ts",
        "ttl",
        "urp",
        "vlan",
        "win",
    )

    frame: bytearray
    ts: float
    drop: str | None
    #: The capture cut the datagram short (its total length runs past the frame: a snap
    #: length), and its IP and L4 headers were read in full from what was captured:
    #: ``drop`` stays ``truncated-ip`` (``bad-ipv6``), and ``pend`` is the frame's end.
    #: An NF that analyses what was captured, as prads does, may use such a packet.
    cut: bool
    vlan: int | None
    l3: int
    ihl: int
    tos: int
    ip_len: int
    ip_id: int
    ip_off: int
    ttl: int
    proto: int
    src: int
    dst: int
    l4: int
    sport: int
    dport: int
    tcp_flags: int
    seq: int
    ack: int
    win: int
    urp: int
    tcp_hlen: int
    tcp_options: bytes
    icmp_type: int
    icmp_code: int
    pl: int
    pend: int
    #: flow_key_both's answer once asked (the runner and the NF both ask); None before,
    #: and again after a rewrite.  Read it, never set it.
    both_key: tuple[int, int, int, int, int] | None

    def __repr__(self) -> str:
        if self.drop is not None:
            return f"<Packet {len(self.frame)} B dropped: {self.drop}>"
        return (
            f"<Packet {ip_str(self.src)}:{self.sport} -> {ip_str(self.dst)}:{self.dport}"
            f" proto {self.proto} flags {self.tcp_flags:#04x} payload {self.pend - self.pl} B>"
        )

    @property
    def payload(self) -> bytes:
        """The L4 payload (a copy)."""
        return bytes(self.frame[self.pl : self.pend])

    @property
    def flow(self) -> tuple[int, int, int, int, int]:
        """The 5-tuple ``(src, dst, proto, sport, dport)``, one per direction."""
        return (self.src, self.dst, self.proto, self.sport, self.dport)

    def flow_key_directed(self) -> tuple[int, int, int, int, int]:
        """:attr:`flow` as a method (a key function for the runner)."""
        return (self.src, self.dst, self.proto, self.sport, self.dport)

    def flow_key_both(self) -> tuple[int, int, int, int, int]:
        """The 5-tuple with the smaller (address, port) end first: the same for both
        directions of a connection."""
        key = self.both_key
        if key is not None:
            return key
        src = self.src
        dst = self.dst
        # (src, sport) <= (dst, dport), without building the two tuples
        if src < dst or (src == dst and self.sport <= self.dport):
            key = (src, dst, self.proto, self.sport, self.dport)
        else:
            key = (dst, src, self.proto, self.dport, self.sport)
        self.both_key = key
        return key

    def is_fragment_tail(self) -> bool:
        """A fragment other than the first: no L4 header."""
        return (self.ip_off & 0x1FFF) != 0

    def _rewrite(self, at: int, ip: int, port_at: int, port: int) -> bool:
        """Replace the address at ``l3 + at`` and, when the packet has ports, the port at
        ``l4 + port_at``, fixing both checksums incrementally (RFC 1624 eqn. 3:
        HC' = ~(~HC + ~m + m') summed over the changed 16-bit words).  Whether the packet
        has ports (and so the port was replaced)."""
        if self.drop is not None:
            if self.drop == "ipv6":
                return self._rewrite6(8 if at == 12 else 24, ip, port_at, port)
            raise ValueError(f"cannot rewrite a frame that did not parse ({self.drop})")
        frame = self.frame
        l3 = self.l3
        a = l3 + at
        # ~m + m' over the address's two words, as one partial sum (~m of a 16-bit word
        # is 0xFFFF - m).
        (old,) = _u32(frame, a)
        delta = 0x1FFFE - (old >> 16) - (old & 0xFFFF) + (ip >> 16) + (ip & 0xFFFF)
        _pack32(frame, a, ip)
        c = l3 + 10
        total = 0xFFFF - _u16(frame, c)[0] + delta
        total = (total & 0xFFFF) + (total >> 16)
        total = (total & 0xFFFF) + (total >> 16)
        _pack16(frame, c, ~total & 0xFFFF)
        proto = self.proto
        if (proto != TCP and proto != UDP) or self.ip_off & 0x1FFF:
            return False
        l4 = self.l4
        p = l4 + port_at
        delta += 0xFFFF - _u16(frame, p)[0] + port
        _pack16(frame, p, port)
        c = l4 + 16 if proto == TCP else l4 + 6
        (old,) = _u16(frame, c)
        if proto == UDP and old == 0:
            return True  # 0: the sender computed no UDP checksum; it stays so
        total = 0xFFFF - old + delta
        total = (total & 0xFFFF) + (total >> 16)
        total = (total & 0xFFFF) + (total >> 16)
        new = ~total & 0xFFFF
        if proto == UDP and new == 0:
            new = 0xFFFF  # a computed 0 is sent as all ones
        _pack16(frame, c, new)
        return True

    def _rewrite6(self, at: int, ip: int, port_at: int, port: int) -> bool:
        """:meth:`_rewrite` of an IPv6 packet: no header checksum; the TCP, UDP or ICMPv6
        checksum covers the addresses through its pseudo-header."""
        frame = self.frame
        a = self.l3 + at
        new = (ip & _V6_MASK).to_bytes(16, "big")
        delta = 0
        for i in range(a, a + 16, 2):
            j = i - a
            delta += 0xFFFF - ((frame[i] << 8) | frame[i + 1]) + ((new[j] << 8) | new[j + 1])
        frame[a : a + 16] = new
        proto = self.proto
        l4 = self.l4
        has_ports = proto == TCP or proto == UDP
        if has_ports:
            p = l4 + port_at
            delta += 0xFFFF - _u16(frame, p)[0] + port
            _pack16(frame, p, port)
            c = l4 + 16 if proto == TCP else l4 + 6
        elif proto == ICMP6:
            c = l4 + 2
        else:
            return False
        # (the fold _rewrite makes too, kept inline there: it is the NAT's per-packet path)
        total = 0xFFFF - _u16(frame, c)[0] + delta
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        new_sum = ~total & 0xFFFF
        if proto == UDP and new_sum == 0:
            new_sum = 0xFFFF  # a computed 0 is sent as all ones
        _pack16(frame, c, new_sum)
        return has_ports

    def rewrite_src(self, ip: int, port: int) -> None:
        """Set the source address (and port, for TCP/UDP with a header) in place."""
        has_ports = self._rewrite(12, ip, 0, port)
        self.both_key = None
        self.src = ip
        if has_ports:
            self.sport = port

    def rewrite_dst(self, ip: int, port: int) -> None:
        """Set the destination address (and port, for TCP/UDP with a header) in place."""
        has_ports = self._rewrite(16, ip, 2, port)
        self.both_key = None
        self.dst = ip
        if has_ports:
            self.dport = port


_new = object.__new__


def _empty(frame: bytearray, ts: float, drop: str | None) -> Packet:
    p: Packet = _new(Packet)
    p.both_key = None
    p.frame = frame
    p.ts = ts
    p.drop = drop
    p.cut = False
    p.vlan = None
    p.l3 = p.ihl = p.tos = p.ip_len = p.ip_id = p.ip_off = p.ttl = p.proto = 0
    p.src = p.dst = p.l4 = p.sport = p.dport = p.tcp_flags = 0
    p.seq = p.ack = p.win = p.urp = p.tcp_hlen = p.icmp_type = p.icmp_code = 0
    p.tcp_options = b""
    p.pl = p.pend = 0
    return p


def parse(frame: bytes | bytearray, ts: float) -> Packet:
    """Parse an Ethernet frame; never raises (a frame that is not usable IPv4 has
    ``drop`` set).  A ``bytes`` frame is copied into a ``bytearray``."""
    if type(frame) is not bytearray:
        frame = bytearray(frame)
    n = len(frame)
    if n >= 54:
        # The common frame (untagged IPv4 without options, the first or only fragment,
        # TCP or UDP) is read with one unpack of its EtherType, IP header and the first
        # 20 bytes after it; any other frame takes the general path below.
        (etype, vihl, tos, ip_len, ip_id, ip_off, ttl, proto, _c, src, dst,
         sport, dport, seq, ack, off, flags, win, _c2, urp) = _eth_ip_l4(frame, 12)  # fmt: skip
        pend = 14 + ip_len
        if etype == ETH_IP and vihl == 0x45 and 20 <= ip_len and pend <= n and not ip_off & 0x1FFF:
            if proto == TCP:
                thl = (off >> 4) * 4
                if thl < 20 or pend < 34 + thl:
                    return _parse_any(frame, n, ts)
                p = _new(Packet)
                p.seq = seq
                p.ack = ack
                p.tcp_flags = flags
                p.win = win
                p.urp = urp
                p.tcp_hlen = thl
                p.tcp_options = bytes(frame[54 : 34 + thl]) if thl > 20 else b""
                p.pl = 34 + thl
            elif proto == UDP and pend >= 42:
                p = _new(Packet)
                p.seq = p.ack = p.tcp_flags = p.win = p.urp = p.tcp_hlen = 0
                p.tcp_options = b""
                p.pl = 42
            else:
                return _parse_any(frame, n, ts)
            p.frame = frame
            p.ts = ts
            p.drop = None
            p.cut = False
            p.vlan = None
            p.both_key = None
            p.l3 = 14
            p.ihl = 20
            p.tos = tos
            p.ip_len = ip_len
            p.ip_id = ip_id
            p.ip_off = ip_off
            p.ttl = ttl
            p.proto = proto
            p.src = src
            p.dst = dst
            p.l4 = 34
            p.sport = sport
            p.dport = dport
            p.icmp_type = p.icmp_code = 0
            p.pend = pend
            return p
    return _parse_any(frame, n, ts)


def _parse_any(
    frame: bytearray, n: int, ts: float, walk: bool = False, fragment_data: bool = False
) -> Packet:
    """Every frame :func:`parse`'s fast path leaves: tags, IP options, fragments, other
    protocols, and every frame that is cut short or malformed."""
    if n < 14:
        return _empty(frame, ts, "truncated-ethernet")
    etype = (frame[12] << 8) | frame[13]
    l3 = 14
    vlan = None
    while etype in ETH_VLAN:
        if n < l3 + 4:
            return _empty(frame, ts, "truncated-ethernet")
        if vlan is None:
            vlan = ((frame[l3] << 8) | frame[l3 + 1]) & 0x0FFF
        etype = (frame[l3 + 2] << 8) | frame[l3 + 3]
        l3 += 4
    if etype != ETH_IP:
        if etype == ETH_IPV6:
            return _parse_ipv6(frame, n, ts, l3, vlan, walk)
        p = _empty(frame, ts, "not-ip")
        p.vlan = vlan
        p.l3 = l3
        return p
    if n < l3 + 20:
        p = _empty(frame, ts, "truncated-ip")
        p.vlan = vlan
        p.l3 = l3
        return p
    vihl, tos, ip_len, ip_id, ip_off, ttl, proto, _csum, src, dst = _ip(frame, l3)
    ihl = (vihl & 15) * 4
    p = _new(Packet)
    p.both_key = None
    p.frame = frame
    p.ts = ts
    p.vlan = vlan
    p.l3 = l3
    p.ihl = ihl
    p.tos = tos
    p.ip_len = ip_len
    p.ip_id = ip_id
    p.ip_off = ip_off
    p.ttl = ttl
    p.proto = proto
    p.src = src
    p.dst = dst
    p.sport = p.dport = p.tcp_flags = p.seq = p.ack = p.win = p.urp = p.tcp_hlen = 0
    p.icmp_type = p.icmp_code = 0
    p.tcp_options = b""
    l4 = l3 + ihl
    pend = l3 + ip_len
    p.l4 = l4
    p.pl = l4
    p.pend = pend
    p.drop = None
    p.cut = False
    if vihl >> 4 != 4 or ihl < 20 or ip_len < ihl:
        p.drop = "bad-ip-header"
        return p
    if pend > n:
        # Cut by the capture: the headers are read from what it holds (see Packet.cut).
        p.drop = "truncated-ip"
        if n < l4:
            return p
        pend = p.pend = n
        cut = True
    else:
        cut = False
    if ip_off & 0x1FFF and not fragment_data:  # a later fragment: no L4 header here
        p.cut = cut
        return p
    if proto == TCP:
        if pend < l4 + 20:
            p.drop = "truncated-tcp"
            return p
        sport, dport, seq, ack, off, flags, win, _c, urp = _tcp(frame, l4)
        thl = (off >> 4) * 4
        p.sport = sport
        p.dport = dport
        p.seq = seq
        p.ack = ack
        p.tcp_flags = flags
        p.win = win
        p.urp = urp
        p.tcp_hlen = thl
        if thl < 20:
            p.drop = "bad-tcp-header"
            return p
        if pend < l4 + thl:
            p.drop = "truncated-tcp"
            return p
        if thl > 20:
            p.tcp_options = bytes(frame[l4 + 20 : l4 + thl])
        p.pl = l4 + thl
    elif proto == UDP:
        if pend < l4 + 8:
            p.drop = "truncated-udp"
            return p
        p.sport, p.dport = _ports(frame, l4)
        p.pl = l4 + 8
    elif proto == ICMP:
        if pend < l4 + 8:
            p.drop = "truncated-icmp"
            return p
        p.icmp_type = frame[l4]
        p.icmp_code = frame[l4 + 1]
        p.pl = l4 + 8
    if cut:
        p.drop = "truncated-ip"
        p.cut = True
    return p


#: IPv6 extension headers :func:`parse_transport` walks over (hop-by-hop, routing,
#: destination options; authentication, whose length counts 4-byte words).
IPV6_EXTENSIONS = frozenset({0, 43, 60, 51})


def parse_transport(frame: bytes | bytearray, ts: float) -> Packet:
    """:func:`parse`, but an IPv6 packet's extension headers (:data:`IPV6_EXTENSIONS`) are
    walked to the transport header, as Suricata does (``parse`` takes the first next
    header as the protocol, as prads does); a fragment header ends the walk."""
    if type(frame) is not bytearray:
        frame = bytearray(frame)
    return _parse_any(frame, len(frame), ts, True)


def parse_fragment_data(frame: bytes | bytearray, ts: float) -> Packet:
    """:func:`parse`, but an IPv4 fragment other than the first has its data read as the
    header of its protocol (``ip_off`` still says what it is), as prads 0.3.3 reads every
    fragment; ``parse`` gives such a fragment no transport header."""
    if type(frame) is not bytearray:
        frame = bytearray(frame)
    return _parse_any(frame, len(frame), ts, False, True)


def _parse_ipv6(
    frame: bytearray, n: int, ts: float, l3: int, vlan: int | None, walk: bool = False
) -> Packet:
    """An IPv6 packet (see the module's docstring): ``drop`` is ``ipv6`` when its header
    and its TCP, UDP or ICMPv6 header fit its payload length and the frame, else
    ``bad-ipv6``."""
    p = _empty(frame, ts, "bad-ipv6")
    p.vlan = vlan
    p.l3 = l3
    if n < l3 + 40:
        return p
    first, plen, nh, hops, src, dst = _ip6(frame, l3)
    if first >> 28 != 6:
        return p
    pend = l3 + 40 + plen
    cut = pend > n  # cut by the capture: read what it holds (see Packet.cut)
    if cut:
        pend = n
    l4 = l3 + 40
    p.ihl = 40
    p.tos = first >> 20 & 0xFF
    p.ip_len = 40 + plen
    p.ip_id = first & 0xFFFFF  # the flow label
    p.ip_off = 0x4000  # never fragmented on the way: DF, as prads takes it
    p.ttl = hops
    p.proto = nh
    p.src = int.from_bytes(src, "big") | V6
    p.dst = int.from_bytes(dst, "big") | V6
    if walk:
        while nh in IPV6_EXTENSIONS:
            if pend < l4 + 8:
                return p
            length = (frame[l4 + 1] + 2) * 4 if nh == 51 else (frame[l4 + 1] + 1) * 8
            nh = frame[l4]
            l4 += length
        if pend < l4:
            return p
        p.proto = nh
    p.l4 = p.pl = l4
    p.pend = pend
    if nh == TCP:
        if pend < l4 + 20:
            return p
        sport, dport, seq, ack, off, flags, win, _c, urp = _tcp(frame, l4)
        thl = (off >> 4) * 4
        if thl < 20 or pend < l4 + thl:
            return p
        p.sport, p.dport, p.seq, p.ack = sport, dport, seq, ack
        p.tcp_flags, p.win, p.urp, p.tcp_hlen = flags, win, urp, thl
        if thl > 20:
            p.tcp_options = bytes(frame[l4 + 20 : l4 + thl])
        p.pl = l4 + thl
    elif nh == UDP:
        if pend < l4 + 8:
            return p
        p.sport, p.dport = _ports(frame, l4)
        p.pl = l4 + 8
    elif nh == ICMP6:
        if pend < l4 + 4:
            return p
        p.icmp_type = frame[l4]
        p.icmp_code = frame[l4 + 1]
        p.pl = l4 + 4
    if cut:
        p.cut = True  # (drop stays bad-ipv6)
    else:
        p.drop = "ipv6"
    return p
