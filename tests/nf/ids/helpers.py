"""Crafting frames and captures for the IDS tests (dpkt), and running the IDS over them."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

import dpkt

MAC_A = b"\x02\x00\x00\x00\x00\x01"
MAC_B = b"\x02\x00\x00\x00\x00\x02"

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


def _ip(src: str, dst: str, proto: int, data: Any) -> dpkt.ip.IP:
    ip = dpkt.ip.IP(
        src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=64, data=data
    )
    ip.len = 20 + len(bytes(data))
    return ip


def eth(ip: dpkt.ip.IP) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(src=MAC_A, dst=MAC_B, type=0x0800, data=ip))


def tcp_frame(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: int,
    payload: bytes = b"",
    seq: int = 1000,
    ack: int = 0,
) -> bytes:
    tcp = dpkt.tcp.TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, win=65535, data=payload
    )
    return eth(_ip(src, dst, dpkt.ip.IP_PROTO_TCP, tcp))


def udp_frame(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    udp.ulen = 8 + len(payload)
    return eth(_ip(src, dst, dpkt.ip.IP_PROTO_UDP, udp))


def icmp_frame(src: str, dst: str, payload: bytes, kind: int = 8, ident: int = 7) -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=ident, seq=1, data=payload)
    icmp = dpkt.icmp.ICMP(type=kind, code=0, data=echo)
    return eth(_ip(src, dst, dpkt.ip.IP_PROTO_ICMP, icmp))


class Capture:
    """Frames with increasing timestamps (10 ms apart unless told)."""

    def __init__(self, t0: float = 1_500_000_000.0) -> None:
        self.t = t0
        self.packets: list[tuple[float, bytes]] = []

    def add(self, frame: bytes, gap: float = 0.01) -> None:
        self.t = round(self.t + gap, 6)
        self.packets.append((self.t, frame))

    def udp(self, src: str, sport: int, dst: str, dport: int, payload: bytes) -> None:
        self.add(udp_frame(src, sport, dst, dport, payload))

    def icmp(self, src: str, dst: str, payload: bytes, kind: int = 8) -> None:
        self.add(icmp_frame(src, dst, payload, kind))

    def tcp(self, *args: Any, **kwargs: Any) -> None:
        self.add(tcp_frame(*args, **kwargs))

    def session(
        self,
        client: str,
        cport: int,
        server: str,
        sport: int,
        exchanges: Iterable[tuple[str, bytes]],
        *,
        handshake: bool = True,
        close: str = "fin",
    ) -> None:
        """A TCP connection: the handshake, then each ``("c"|"s", data)`` as a PSH+ACK
        segment acknowledged by the other side, then a FIN exchange (``close="fin"``), a
        RST from the client (``"rst"``) or nothing."""
        cseq, sseq = 1000, 5000
        if handshake:
            self.tcp(client, cport, server, sport, SYN, seq=cseq)
            self.tcp(server, sport, client, cport, SYN | ACK, seq=sseq, ack=cseq + 1)
            cseq, sseq = cseq + 1, sseq + 1
            self.tcp(client, cport, server, sport, ACK, seq=cseq, ack=sseq)
        for side, data in exchanges:
            if side == "c":
                self.tcp(client, cport, server, sport, PSH | ACK, data, seq=cseq, ack=sseq)
                cseq += len(data)
                self.tcp(server, sport, client, cport, ACK, seq=sseq, ack=cseq)
            else:
                self.tcp(server, sport, client, cport, PSH | ACK, data, seq=sseq, ack=cseq)
                sseq += len(data)
                self.tcp(client, cport, server, sport, ACK, seq=cseq, ack=sseq)
        if close == "fin":
            self.tcp(client, cport, server, sport, FIN | ACK, seq=cseq, ack=sseq)
            self.tcp(server, sport, client, cport, FIN | ACK, seq=sseq, ack=cseq + 1)
            self.tcp(client, cport, server, sport, ACK, seq=cseq + 1, ack=sseq + 1)
        elif close == "rst":
            self.tcp(client, cport, server, sport, RST | ACK, seq=cseq, ack=sseq)

    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
            for ts, frame in self.packets:
                writer.writepkt(frame, ts=ts)


def alert_keys(lines: Iterable[str]) -> list[tuple[int, str, int | None, str, int | None]]:
    """(sid, src, sport, dst, dport) of each fast-alert line, sorted: what is compared."""
    from nf.ids.alert import parse_fast_alert

    keys = []
    for line in lines:
        if not line.strip():
            continue
        _gid, sid, _rev, _proto, src, sport, dst, dport = parse_fast_alert(line)
        keys.append((sid, src, sport, dst, dport))
    return sorted(keys, key=lambda k: (k[0], k[1], k[2] or 0, k[3], k[4] or 0))


async def run_ids(
    packets: list[tuple[float, bytes]], config: dict[str, Any], instances: int = 1
) -> Any:
    """The runner's result of the IDS over ``packets``."""
    from nf.ids import IDS
    from nf.runner import run_capture

    return await run_capture(IDS, config, packets, instances=instances)


def eth_raw(proto: int, src: int, dst: int, body: bytes, frag: int = 0) -> bytes:
    """Ethernet + an IPv4 header (no options, checksum 0) around ``body`` as given."""
    import struct

    header = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(body), 1, frag, 64, proto, 0, src, dst)
    return MAC_B + MAC_A + b"\x08\x00" + header + body


def mixed_traffic(flows: int, seed: int) -> list[tuple[float, bytes]]:
    """``flows`` interleaved connections (TCP sessions with requests and replies, some
    closed by RST, UDP and ICMP exchanges) whose payloads sometimes hit the demo rules;
    several flows per server, so alerts from many flows meet on one server's record."""
    import random

    rng = random.Random(seed)
    requests = [
        b"GET /index.html HTTP/1.1\r\n",
        b"GET /admin/login HTTP/1.1\r\n",
        b"GET /../../etc/passwd HTTP/1.0\r\n",
        b"GET /run?cmd=id HTTP/1.1\r\n",
        b"USER root\r\n",
        b"USER alice\r\n",
        b"\x90\x90\x90\x90\x90 /bin/sh",
        b"hello",
        b"GET / HTTP/1.1\r\nUser-Agent: curl/8.1.2\r\n\r\n",
    ]
    replies = [
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 500 Internal\r\n",
        b"login: ",
        b"220 ok",
        b"HTTP/1.1 200 OK\r\nServer: Apache/2.2.22\r\n\r\n",
    ]
    servers = [f"10.0.1.{i}" for i in range(1, 6)]
    streams: list[list[bytes]] = []
    for i in range(flows):
        client = f"192.168.{i % 7}.{1 + i % 200}"
        server = rng.choice(servers)
        cport = 20000 + i
        kind = rng.random()
        c = Capture()
        if kind < 0.7:
            sport = rng.choice([80, 8080, 21, 23, 8000, 22])
            exchanges = []
            if sport == 22:
                banner = rng.choice([b"SSH-2.0-OpenSSH_5.9\r\n", b"SSH-2.0-OpenSSH_9.6\r\n"])
                exchanges.append(("s", banner))
            for _ in range(rng.randrange(1, 4)):
                exchanges.append(("c", rng.choice(requests)))
                if rng.random() < 0.6:
                    exchanges.append(("s", rng.choice(replies)))
            c.session(client, cport, server, sport, exchanges, close=rng.choice(["fin", "rst"]))
            if rng.random() < 0.1:  # a SYN with FIN set, the demo's scan rule
                c.tcp(client, cport + 50000 - 20000, server, 80, SYN | FIN)
        elif kind < 0.9:
            size = rng.choice([40, 600])
            c.udp(client, cport, server, 53, b"q" * size)
            c.udp(server, 53, client, cport, b"a" * 60)
        else:
            c.icmp(client, server, b"p" * rng.choice([56, 1000]))
        streams.append([frame for _ts, frame in c.packets])
    # interleave the flows, keeping each one's order
    out: list[tuple[float, bytes]] = []
    t = 1_600_000_000.0
    live = [s for s in streams if s]
    positions = [0] * len(live)
    while live:
        j = rng.randrange(min(len(live), 12))
        stream = live[j]
        out.append((t, stream[positions[j]]))
        t = round(t + 0.002, 6)
        positions[j] += 1
        if positions[j] == len(stream):
            live.pop(j)
            positions.pop(j)
    return out
