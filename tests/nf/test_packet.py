"""nf.packet: our struct parser against dpkt on random packets, the drop reasons, flow keys,
and in-place rewriting with incremental checksums (the vectors of RFC 1624's worked
examples as the NAT notes give them, and full recomputation on random packets)."""

from __future__ import annotations

import socket
import struct

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.traffic import icmp_frame, tcp_frame, udp_frame
from nf.packet import (
    ACK,
    DROP_REASONS,
    FIN,
    RST,
    SYN,
    V6,
    checksum,
    ip_int,
    ip_str,
    parse,
    parse_transport,
)

ips = st.integers(min_value=1, max_value=0xFFFFFFFE)
ports = st.integers(min_value=0, max_value=65535)
payloads = st.binary(max_size=64)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def word(frame: bytes | bytearray, at: int) -> int:
    value: int = struct.unpack_from("!H", frame, at)[0]
    return value


def full_checksums(frame: bytes | bytearray) -> tuple[int, int]:
    """The IP and L4 checksums recomputed from scratch by dpkt."""
    eth = dpkt.ethernet.Ethernet(bytes(frame))
    ip = eth.data
    ip.sum = 0
    ip.data.sum = 0
    again = dpkt.ethernet.Ethernet(bytes(eth)).data
    return again.sum, again.data.sum


def test_address_conversions() -> None:
    assert ip_int("10.0.0.1") == 0x0A000001
    assert ip_str(0xC0000201) == "192.0.2.1"
    assert ip_str(ip_int("255.255.255.255")) == "255.255.255.255"
    for bad in ("10.0.0", "10.0.0.256", "a.b.c.d", "1.2.3.4.5", ""):
        with pytest.raises(ValueError):
            ip_int(bad)


@FAST
@given(
    src=ips,
    dst=ips,
    sport=ports,
    dport=ports,
    flags=st.integers(0, 255),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    win=ports,
    options=st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x01\x01\x04\x02\x03\x03\x07"]),
    payload=payloads,
    ttl=st.integers(1, 255),
    vlan=st.one_of(st.none(), st.integers(0, 4095)),
)
def test_tcp_fields_match_dpkt(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    flags: int,
    seq: int,
    ack: int,
    win: int,
    options: bytes,
    payload: bytes,
    ttl: int,
    vlan: int | None,
) -> None:
    frame = tcp_frame(
        src, dst, sport, dport, flags, payload, seq=seq, ack=ack, win=win,
        options=options, ttl=ttl, vlan=vlan,
    )  # fmt: skip
    p = parse(frame, 1.5)
    eth = dpkt.ethernet.Ethernet(frame)
    ip = eth.data
    tcp = ip.data
    assert p.drop is None and p.ts == 1.5 and p.vlan == vlan
    assert (p.src, p.dst) == (src, dst)
    assert (p.proto, p.ttl, p.ip_len, p.ip_id, p.tos) == (6, ip.ttl, ip.len, ip.id, ip.tos)
    assert p.ihl == ip.hl * 4
    assert (p.sport, p.dport, p.seq, p.ack, p.win) == (tcp.sport, tcp.dport, tcp.seq, tcp.ack, win)
    assert p.tcp_flags == tcp.flags and p.tcp_hlen == tcp.off * 4
    assert p.tcp_options == tcp.opts
    assert p.payload == tcp.data == payload
    assert p.flow == (src, dst, 6, sport, dport)


@FAST
@given(src=ips, dst=ips, sport=ports, dport=ports, payload=payloads, padding=st.integers(0, 20))
def test_udp_fields_and_padding(
    src: int, dst: int, sport: int, dport: int, payload: bytes, padding: int
) -> None:
    frame = udp_frame(src, dst, sport, dport, payload) + b"\xee" * padding
    p = parse(frame, 0.0)
    udp = dpkt.ethernet.Ethernet(frame).data.data
    assert p.drop is None and p.proto == 17
    assert (p.sport, p.dport) == (udp.sport, udp.dport)
    assert p.payload == payload  # Ethernet padding is not payload
    assert p.pend == 14 + 20 + 8 + len(payload)


def test_icmp_and_other_protocols() -> None:
    p = parse(icmp_frame(ip_int("10.0.0.1"), ip_int("10.0.0.2"), 8, 0, b"ping"), 0.0)
    assert p.drop is None and p.proto == 1 and (p.icmp_type, p.icmp_code) == (8, 0)
    assert (p.sport, p.dport) == (0, 0) and p.payload == b"ping"
    gre = bytearray(tcp_frame(1, 2, 3, 4, SYN))
    gre[14 + 9] = 47
    p = parse(gre, 0.0)
    assert p.drop is None and p.proto == 47 and (p.sport, p.dport) == (0, 0)
    assert p.pl == p.l4


def test_later_fragment_has_no_ports() -> None:
    frame = bytearray(tcp_frame(1, 2, 3, 4, SYN, b"x" * 30))
    struct.pack_into("!H", frame, 14 + 6, 0x0003)  # fragment offset 24 bytes
    p = parse(frame, 0.0)
    assert p.drop is None and p.is_fragment_tail() and (p.sport, p.dport) == (0, 0)
    assert p.pl == p.l4
    p.rewrite_src(ip_int("192.0.2.9"), 1234)  # only the address changes
    assert p.src == ip_int("192.0.2.9") and word(p.frame, 14 + 20) == 3


def ip6_frame(
    src: bytes, dst: bytes, nh: int, l4: bytes, *, hops: int = 64, flow: int = 0, tc: int = 0
) -> bytes:
    header = struct.pack("!IHBB", 6 << 28 | tc << 20 | flow, len(l4), nh, hops) + src + dst
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + header + l4


addrs6 = st.binary(min_size=16, max_size=16)


@FAST
@given(
    src=addrs6,
    dst=addrs6,
    sport=ports,
    dport=ports,
    flags=st.integers(0, 255),
    hops=st.integers(0, 255),
    flow=st.integers(0, 0xFFFFF),
    tc=st.integers(0, 255),
    payload=payloads,
    kind=st.sampled_from([6, 17, 58, 59, 253]),
)
def test_ipv6_is_read_as_dpkt_reads_it(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    flags: int,
    hops: int,
    flow: int,
    tc: int,
    payload: bytes,
    kind: int,
) -> None:
    """An IPv6 packet is left to the IPv4-only NFs (``drop`` is ``ipv6``) with its fields
    read for those that analyse it: addresses with the V6 bit, hop limit, flow label,
    next header, ports and TCP fields, payload; against dpkt."""
    if kind == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 7, 9, 5 << 4, flags, 1024, 0, 3) + payload
    elif kind == 17:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    elif kind == 58:
        l4 = struct.pack("!BBH", 128, 0, 0) + payload
    else:
        l4 = payload
    frame = ip6_frame(src, dst, kind, l4, hops=hops, flow=flow, tc=tc)
    p = parse(frame, 1.0)
    ip = dpkt.ethernet.Ethernet(frame).data
    assert isinstance(ip, dpkt.ip6.IP6)
    assert p.drop == "ipv6"
    assert (
        p.src == int.from_bytes(ip.src, "big") | V6 and p.dst == int.from_bytes(ip.dst, "big") | V6
    )
    assert (p.ttl, p.ip_id, p.tos, p.proto) == (ip.hlim, ip.flow, ip.fc, ip.nxt)
    assert (p.ihl, p.ip_len, p.l4, p.pend) == (40, 40 + len(l4), 54, len(frame))
    assert ip_str(p.src) == socket.inet_ntop(socket.AF_INET6, src)
    if kind == 6:
        tcp = ip.data
        assert (p.sport, p.dport, p.tcp_flags, p.win, p.urp) == (
            tcp.sport,
            tcp.dport,
            tcp.flags,
            tcp.win,
            tcp.urp,
        )
        assert (p.seq, p.ack, p.payload) == (7, 9, payload)
    elif kind == 17:
        assert (p.sport, p.dport, p.payload) == (sport, dport, payload)
    elif kind == 58:
        assert (p.icmp_type, p.icmp_code, p.payload) == (128, 0, payload)
    else:
        assert (p.sport, p.dport, p.pl) == (0, 0, p.l4)
    # An IPv6 address never equals an IPv4 one as a key, and a flow keeps its key.
    assert p.src > 0xFFFFFFFF and p.flow_key_both() == p.flow_key_both()


def test_cut_or_wrong_ipv6_is_bad_ipv6() -> None:
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 5 << 4, SYN, 9, 0, 0)
    good = ip6_frame(bytes(16), bytes(15) + b"\x01", 6, tcp)
    assert parse(good, 0.0).drop == "ipv6"
    for frame in (
        good[:50],  # cut inside the IPv6 header
        good[:-1],  # the payload length runs past the frame
        good[:14] + b"\x40" + good[15:],  # version 4
        ip6_frame(bytes(16), bytes(16), 6, tcp[:12]),  # a TCP header cut short
        ip6_frame(bytes(16), bytes(16), 17, b"\0" * 4),  # a UDP header cut short
    ):
        p = parse(frame, 0.0)
        assert p.drop == "bad-ipv6", frame


def test_parse_transport_walks_ipv6_extension_headers() -> None:
    """``parse`` takes an IPv6 packet's first next header as its protocol (as prads);
    ``parse_transport`` walks hop-by-hop, routing, destination options and AH headers to
    the transport header (as Suricata), and reads it as ``parse`` reads a plain one."""
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 3, 4, 5 << 4, SYN, 9, 0, 0)
    src, dst = bytes(15) + b"\x01", bytes(15) + b"\x02"
    plain = parse(ip6_frame(src, dst, 6, tcp), 0.0)
    chain = bytes([60, 0]) + bytes(6)  # hop-by-hop (8 bytes), next: destination options
    chain += bytes([43, 1]) + bytes(14)  # destination options (16 bytes), next: routing
    chain += bytes([51, 0]) + bytes(6)  # routing (8 bytes), next: AH
    chain += bytes([6, 1]) + bytes(10)  # AH (12 bytes: (1 + 2) * 4), next: TCP
    frame = ip6_frame(src, dst, 0, chain + tcp)
    assert parse(frame, 0.0).proto == 0
    p = parse_transport(frame, 0.0)
    assert (p.drop, p.proto, p.sport, p.dport, p.tcp_flags) == ("ipv6", 6, 1234, 80, SYN)
    assert p.l4 == 14 + 40 + len(chain) and p.pl == p.l4 + 20
    assert p.flow_key_both() == plain.flow_key_both()
    # a chain running past the packet is bad-ipv6; a fragment header ends the walk
    assert parse_transport(ip6_frame(src, dst, 0, bytes([6, 9]) + bytes(6)), 0.0).drop == "bad-ipv6"
    frag = parse_transport(ip6_frame(src, dst, 44, bytes([6, 0, 0, 1]) + bytes(4) + tcp), 0.0)
    assert frag.proto == 44


def test_a_datagram_cut_by_the_captures_snap_length_keeps_its_headers() -> None:
    """A capture's snap length cuts a datagram after its headers: it stays a drop for the
    NFs that need it whole (``truncated-ip``, ``bad-ipv6``), with ``cut`` set and the
    headers read from what was captured (prads analyses such packets); a cut inside the
    L4 header is no such packet."""
    payload = b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"
    whole = tcp_frame(ip_int("10.0.0.1"), ip_int("10.0.0.2"), 80, 40000, SYN, payload=payload)
    assert parse(whole, 0.0).cut is False
    for keep in (54, 60, len(whole) - 1):
        p = parse(whole[:keep], 0.0)
        got = (p.drop, p.cut, p.sport, p.dport, p.tcp_flags)
        assert got == ("truncated-ip", True, 80, 40000, SYN)
        assert p.ip_len == len(whole) - 14 and p.pl == 54 and p.pend == keep
    inside = parse(whole[:50], 0.0)
    assert inside.drop == "truncated-tcp" and inside.cut is False
    udp = udp_frame(ip_int("10.0.0.1"), ip_int("10.0.0.2"), 53, 5353, payload=b"x" * 40)
    p = parse(udp[:50], 0.0)
    got6 = (p.drop, p.cut, p.sport, p.dport, p.pl, p.pend)
    assert got6 == ("truncated-ip", True, 53, 5353, 42, 50)
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 5 << 4, SYN, 9, 0, 0)
    v6 = ip6_frame(bytes(16), bytes(15) + b"\x01", 6, tcp + b"payload")
    p = parse(v6[:-3], 0.0)
    assert (p.drop, p.cut, p.sport, p.dport, p.pend) == ("bad-ipv6", True, 1, 2, len(v6) - 3)
    p = parse(v6[: 14 + 40 + 10], 0.0)
    assert p.drop == "bad-ipv6" and p.cut is False


@FAST
@given(words=st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x1234]), min_size=8, max_size=8))
def test_ipv6_addresses_are_printed_as_inet_ntop_prints_them(words: list[int]) -> None:
    raw = b"".join(w.to_bytes(2, "big") for w in words)
    assert ip_str(int.from_bytes(raw, "big") | V6) == socket.inet_ntop(socket.AF_INET6, raw)


def test_drop_reasons() -> None:
    syn = tcp_frame(ip_int("10.0.0.1"), ip_int("10.0.0.2"), 1000, 80, SYN)
    cases: dict[str, bytes] = {
        "truncated-ethernet": syn[:13],
        "not-ip": syn[:12] + b"\x08\x06" + syn[14:],
        "ipv6": ip6_frame(b"\x20" + bytes(15), bytes(15) + b"\x01", 6, syn[34:54]),
        "bad-ipv6": syn[:12] + b"\x86\xdd" + syn[14:],  # an IPv4 header under IPv6's type
        "bad-ip-header": syn[:14] + b"\x65" + syn[15:],  # version 6
        "truncated-ip": syn[:30],
        "truncated-tcp": syn[:14] + bytes([0x45, 0]) + struct.pack("!H", 30) + syn[18:44],
        "truncated-udp": udp_frame(1, 2, 3, 4)[: 14 + 20 + 4],
        "truncated-icmp": icmp_frame(1, 2)[: 14 + 20 + 4],
        "bad-tcp-header": syn[: 14 + 32] + b"\x40" + syn[14 + 33 :],  # data offset 16
    }
    # Cut frames keep their IP total length, which then runs past the frame.
    for reason, frame in cases.items():
        p = parse(frame, 0.0)
        assert p.drop in (reason, "truncated-ip"), (reason, p.drop)
    # The L4 cuts, with the IP total length made to match what is there:
    for reason, frame in (
        ("truncated-udp", udp_frame(1, 2, 3, 4)),
        ("truncated-icmp", icmp_frame(1, 2)),
    ):
        cut = bytearray(frame[: 14 + 20 + 4])
        struct.pack_into("!H", cut, 16, 24)
        assert parse(cut, 0.0).drop == reason
    assert parse(cases["truncated-tcp"], 0.0).drop == "truncated-tcp"
    assert parse(cases["bad-tcp-header"], 0.0).drop == "bad-tcp-header"
    assert parse(b"", 0.0).drop == "truncated-ethernet"
    ihl4 = bytearray(syn)
    ihl4[14] = 0x44
    assert parse(ihl4, 0.0).drop == "bad-ip-header"
    short_len = bytearray(syn)
    struct.pack_into("!H", short_len, 16, 10)
    assert parse(short_len, 0.0).drop == "bad-ip-header"
    assert set(DROP_REASONS) >= {parse(f, 0).drop for f in cases.values()}


def test_vlan_tag_is_skipped() -> None:
    p = parse(tcp_frame(1, 2, 3, 4, SYN, vlan=42), 0.0)
    assert p.drop is None and p.vlan == 42 and p.l3 == 18 and (p.sport, p.dport) == (3, 4)


def test_flow_key_both_is_direction_free() -> None:
    a, b = ip_int("10.0.0.1"), ip_int("10.0.0.2")
    there = parse(tcp_frame(a, b, 40000, 80, SYN), 0.0)
    back = parse(tcp_frame(b, a, 80, 40000, SYN | ACK), 0.0)
    assert there.flow != back.flow
    assert there.flow_key_both() == back.flow_key_both()
    same_ip = parse(tcp_frame(a, a, 5, 6, 0), 0.0).flow_key_both()
    assert same_ip == parse(tcp_frame(a, a, 6, 5, 0), 0.0).flow_key_both()


# --- rewriting ----------------------------------------------------------------------------


def test_rfc1624_vector_from_the_notes() -> None:
    # An IP header (172.16.10.99 -> 172.16.10.12, checksum b1e6) whose source becomes
    # 192.0.2.1: the header checksum becomes a658.
    header = bytes.fromhex("4500003c1c4640004006b1e6ac100a63ac100a0c")
    assert checksum(header) == 0  # a valid header sums to zero
    tcp = struct.pack("!HHIIBBHHH", 1000, 80, 1, 0, 0x50, SYN, 1024, 0, 0) + b"\0" * 20
    p = parse(b"\0" * 12 + b"\x08\x00" + header + tcp, 0.0)
    assert p.drop is None
    p.rewrite_src(ip_int("192.0.2.1"), 1000)
    assert word(p.frame, 24) == 0xA658
    assert checksum(p.frame[14:34]) == 0


def test_syn_vector_and_its_translation() -> None:
    syn = tcp_frame(ip_int("10.1.0.5"), ip_int("93.184.216.34"), 40000, 80, SYN, seq=1, win=65535)
    p = parse(syn, 0.0)
    assert (word(p.frame, 24), word(p.frame, 14 + 20 + 16)) == (0xFAEE, 0xD370)
    p.rewrite_src(ip_int("203.0.113.1"), 1024)
    assert (word(p.frame, 24), word(p.frame, 14 + 20 + 16)) == (0xC8F2, 0x39B5)
    assert (p.src, p.sport) == (ip_int("203.0.113.1"), 1024)
    assert parse(p.frame, 0.0).flow == p.flow


@FAST
@given(
    src=ips, dst=ips, sport=ports, dport=ports, new_ip=ips, new_port=ports, payload=payloads,
    flags=st.sampled_from([SYN, SYN | ACK, ACK, FIN | ACK, RST]), which=st.booleans(),
)  # fmt: skip
def test_tcp_rewrite_equals_full_recomputation(
    src: int, dst: int, sport: int, dport: int, new_ip: int, new_port: int, payload: bytes,
    flags: int, which: bool,
) -> None:  # fmt: skip
    p = parse(tcp_frame(src, dst, sport, dport, flags, payload), 0.0)
    if which:
        p.rewrite_src(new_ip, new_port)
    else:
        p.rewrite_dst(new_ip, new_port)
    ip_sum, tcp_sum = full_checksums(p.frame)
    assert word(p.frame, 24) == ip_sum
    # 0x0000 and 0xFFFF are the same one's complement value: either is right for TCP.
    got = word(p.frame, 14 + 20 + 16)
    assert got == tcp_sum or {got, tcp_sum} == {0, 0xFFFF}
    again = parse(p.frame, 0.0)
    assert again.flow == p.flow and again.payload == payload


@FAST
@given(src=ips, dst=ips, sport=ports, dport=ports, new_ip=ips, new_port=ports, payload=payloads)
def test_udp_rewrite_equals_full_recomputation(
    src: int, dst: int, sport: int, dport: int, new_ip: int, new_port: int, payload: bytes
) -> None:
    p = parse(udp_frame(src, dst, sport, dport, payload), 0.0)
    p.rewrite_src(new_ip, new_port)
    ip_sum, udp_sum = full_checksums(p.frame)
    assert word(p.frame, 24) == ip_sum
    got = word(p.frame, 14 + 20 + 6)
    assert got != 0  # 0 means "no checksum": a computed 0 is sent as 0xFFFF
    assert got == (udp_sum or 0xFFFF)


def test_udp_checksum_zero_stays_zero_and_computed_zero_is_ffff() -> None:
    p = parse(udp_frame(1, 2, 3, 4, b"data", checksum=False), 0.0)
    p.rewrite_dst(ip_int("10.9.9.9"), 999)
    assert word(p.frame, 14 + 20 + 6) == 0
    # Choose the new source port so that the updated checksum comes out 0: it is then
    # written as 0xFFFF (0 would mean "no checksum").
    base = parse(udp_frame(ip_int("10.0.0.1"), ip_int("10.0.0.2"), 1000, 2000, b"ab"), 0.0)
    check = word(base.frame, 14 + 20 + 6)
    total = (~check & 0xFFFF) + (~1000 & 0xFFFF)
    total = (total & 0xFFFF) + (total >> 16)
    port = 0xFFFF - total
    base.rewrite_src(ip_int("10.0.0.1"), port)
    assert base.sport == port and word(base.frame, 14 + 20 + 6) == 0xFFFF
    _, full = full_checksums(base.frame)
    assert full in (0, 0xFFFF)  # dpkt agrees the sum is zero


def test_rewriting_a_dropped_packet_is_refused() -> None:
    with pytest.raises(ValueError, match="did not parse"):
        parse(b"\0" * 10, 0.0).rewrite_src(1, 2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_parse_never_raises(data: bytes) -> None:
    p = parse(data, 0.0)
    assert p.drop is None or p.drop in DROP_REASONS
    if p.drop is None:
        assert p.l3 <= p.l4 <= p.pl <= p.pend <= len(p.frame)


def _l4_sum_ok(frame: bytes) -> bool:
    """The IPv6 TCP/UDP/ICMPv6 checksum of ``frame`` verifies (pseudo-header included)."""
    plen, nh = struct.unpack_from("!HB", frame, 18)
    pseudo = frame[22:54] + struct.pack("!IxxxB", plen, nh)
    return checksum(pseudo + frame[54 : 54 + plen]) == 0


@FAST
@given(
    src=addrs6,
    dst=addrs6,
    new_src=addrs6,
    new_dst=addrs6,
    sport=ports,
    dport=ports,
    nsport=ports,
    ndport=ports,
    payload=payloads,
    kind=st.sampled_from([6, 17, 58]),
)
def test_ipv6_rewrite_keeps_the_checksum_right(
    src: bytes,
    dst: bytes,
    new_src: bytes,
    new_dst: bytes,
    sport: int,
    dport: int,
    nsport: int,
    ndport: int,
    payload: bytes,
    kind: int,
) -> None:
    if kind == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 7, 9, 5 << 4, SYN, 1024, 0, 0) + payload
        at = 16
    elif kind == 17:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        at = 6
    else:
        l4 = struct.pack("!BBH", 128, 0, 0) + payload
        at = 2
    pseudo = src + dst + struct.pack("!IxxxB", len(l4), kind)
    value = checksum(pseudo + l4) or (0xFFFF if kind == 17 else 0)
    l4 = l4[:at] + struct.pack("!H", value) + l4[at + 2 :]
    frame = ip6_frame(src, dst, kind, l4)
    assert _l4_sum_ok(frame)
    p = parse(frame, 0.0)
    p.rewrite_src(int.from_bytes(new_src, "big") | V6, nsport)
    p.rewrite_dst(int.from_bytes(new_dst, "big") | V6, ndport)
    again = parse(p.frame, 0.0)
    assert again.drop == "ipv6" and _l4_sum_ok(bytes(p.frame))
    assert again.src == int.from_bytes(new_src, "big") | V6 == p.src
    assert again.dst == int.from_bytes(new_dst, "big") | V6 == p.dst
    if kind != 58:
        assert (again.sport, again.dport) == (nsport, ndport)
