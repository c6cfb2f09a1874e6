"""Reproducible test traffic for the NFs, written as a pcap with dpkt.

``python -m bench.traffic make --flows N --seed S --out FILE.pcap [--udp-share F]
[--inside NET] [--servers K]`` writes N flows, the same bytes for the same arguments:

* TCP connections (most of them) with a real handshake (the SYN carrying MSS, SACK,
  timestamps and window scale options as Linux sends them), then what the service says:
  HTTP (a GET with a ``User-Agent`` and a ``Host``, an answer with a ``Server`` header),
  SSH (both banners), SMTP and FTP banners, or plain data; a heavy-tailed number of data
  packets (Pareto sizes: most flows short, a few long); a teardown by FINs both ways and a
  last ACK, or now and then by a RST;
* some UDP: DNS queries and answers, and a few one-way datagrams;
* clients in the inside network (10.0.0.0/16 by default), servers outside; flows start
  at exponential intervals and their packets are interleaved in time order.

``bench.traffic`` also has the frame builders the tests use (:func:`tcp_frame`,
:func:`udp_frame`, :func:`icmp_frame`).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dpkt

from store.cli.common import OneLineParser

__all__ = ["Flow", "icmp_frame", "make", "tcp_frame", "udp_frame"]

CLIENT_MAC = b"\x02\x00\x00\x00\x00\x01"
ROUTER_MAC = b"\x02\x00\x00\x00\x00\xfe"
LINUX_SYN_OPTIONS = (
    b"\x02\x04\x05\xb4"  # MSS 1460
    b"\x04\x02"  # SACK permitted
    b"\x08\x0a\x00\x00\x30\x39\x00\x00\x00\x00"  # timestamps
    b"\x01"  # NOP
    b"\x03\x03\x07"  # window scale 7
)


def _addr(ip: int) -> bytes:
    return struct.pack("!I", ip)


def _eth(ip: dpkt.ip.IP, outbound: bool, vlan: int | None = None) -> bytes:
    src, dst = (CLIENT_MAC, ROUTER_MAC) if outbound else (ROUTER_MAC, CLIENT_MAC)
    if vlan is None:
        return bytes(dpkt.ethernet.Ethernet(src=src, dst=dst, type=0x0800, data=ip))
    tag = struct.pack("!HH", vlan & 0x0FFF, 0x0800)
    return dst + src + b"\x81\x00" + tag + bytes(ip)


def tcp_frame(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    flags: int,
    payload: bytes = b"",
    *,
    seq: int = 1,
    ack: int = 0,
    win: int = 65535,
    options: bytes = b"",
    ttl: int = 64,
    ip_id: int = 1,
    df: bool = True,
    outbound: bool = True,
    vlan: int | None = None,
) -> bytes:
    """An Ethernet/IPv4/TCP frame with correct checksums."""
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    tcp = dpkt.tcp.TCP(
        sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=win, opts=options
    )
    tcp.off = (20 + len(options)) // 4
    tcp.data = payload
    ip = dpkt.ip.IP(src=_addr(src), dst=_addr(dst), id=ip_id, ttl=ttl, df=int(df), p=6)
    ip.data = tcp
    ip.len = 20 + len(bytes(tcp))
    return _eth(ip, outbound, vlan)


def udp_frame(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    ttl: int = 64,
    ip_id: int = 1,
    checksum: bool = True,
    outbound: bool = True,
) -> bytes:
    """An Ethernet/IPv4/UDP frame (``checksum=False``: a UDP checksum of 0, none)."""
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    udp.ulen = 8 + len(payload)
    ip = dpkt.ip.IP(src=_addr(src), dst=_addr(dst), id=ip_id, ttl=ttl, p=17)
    ip.data = udp
    ip.len = 20 + udp.ulen
    frame = bytearray(_eth(ip, outbound))
    if not checksum:
        frame[14 + 20 + 6 : 14 + 20 + 8] = b"\0\0"
    return bytes(frame)


def icmp_frame(src: int, dst: int, kind: int = 8, code: int = 0, payload: bytes = b"") -> bytes:
    """An Ethernet/IPv4/ICMP frame (echo request by default)."""
    echo = dpkt.icmp.ICMP.Echo(id=1, seq=1, data=payload)
    icmp = dpkt.icmp.ICMP(type=kind, code=code, data=echo)
    ip = dpkt.ip.IP(src=_addr(src), dst=_addr(dst), ttl=64, p=1, data=icmp)
    ip.len = 20 + len(bytes(icmp))
    return _eth(ip, True)


# --- the generator ------------------------------------------------------------------------

HTTP_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:109.0) Gecko/20100101 Firefox/115.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "curl/7.88.1",
    "Wget/1.21.3",
]
HTTP_SERVERS = ["Apache/2.2.14 (Ubuntu)", "nginx/1.18.0", "Microsoft-IIS/7.5", "lighttpd/1.4.59"]
SSH_SERVERS = ["SSH-2.0-OpenSSH_5.3p1 Debian-3ubuntu7", "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3"]
SSH_CLIENTS = ["SSH-2.0-OpenSSH_5.1", "SSH-2.0-PuTTY_Release_0.78"]
SMTP_BANNERS = ["220 mail.example.com ESMTP Postfix (Debian/GNU)"]
FTP_BANNERS = ["220 (vsFTPd 3.0.3)", "220 ProFTPD 1.3.5 Server (Debian)"]


@dataclass
class Flow:
    """One generated flow: its packets as (ts, frame)."""

    packets: list[tuple[float, bytes]]


class _Conn:
    """Builds the packets of one TCP connection with consistent sequence numbers."""

    def __init__(self, rng: random.Random, cli: int, srv: int, cport: int, sport: int) -> None:
        self.rng = rng
        self.cli, self.srv, self.cport, self.sport = cli, srv, cport, sport
        self.cseq = rng.getrandbits(32)
        self.sseq = rng.getrandbits(32)
        self.cid = rng.getrandbits(16)
        self.sid = rng.getrandbits(16)
        self.out: list[bytes] = []

    def c(self, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        self.cid = (self.cid + 1) & 0xFFFF
        ack = self.sseq if flags & dpkt.tcp.TH_ACK else 0
        self.out.append(
            tcp_frame(
                self.cli,
                self.srv,
                self.cport,
                self.sport,
                flags,
                payload,
                seq=self.cseq,
                ack=ack,
                win=64240 if flags & dpkt.tcp.TH_SYN else 502,
                options=options,
                ip_id=self.cid,
                outbound=True,
            )
        )
        self.cseq = (self.cseq + len(payload) + (1 if flags & 3 else 0)) & 0xFFFFFFFF

    def s(self, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        self.sid = (self.sid + 1) & 0xFFFF
        self.out.append(
            tcp_frame(
                self.srv,
                self.cli,
                self.sport,
                self.cport,
                flags,
                payload,
                seq=self.sseq,
                ack=self.cseq,
                win=65160 if flags & dpkt.tcp.TH_SYN else 509,
                options=options,
                ttl=52,
                ip_id=self.sid,
                outbound=False,
            )
        )
        self.sseq = (self.sseq + len(payload) + (1 if flags & 3 else 0)) & 0xFFFFFFFF


def _pareto(rng: random.Random, alpha: float, scale: float, cap: int) -> int:
    return min(cap, int(scale * rng.paretovariate(alpha)))


def _tcp_flow(rng: random.Random, cli: int, srv: int, service: str) -> list[bytes]:
    S, A, P, F, R = (dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_FIN,
                     dpkt.tcp.TH_RST)  # fmt: skip
    port = {"http": 80, "ssh": 22, "smtp": 25, "ftp": 21, "data": 8443}[service]
    conn = _Conn(rng, cli, srv, rng.randrange(32768, 61000), port)
    conn.c(S, options=LINUX_SYN_OPTIONS)
    conn.s(S | A, options=b"\x02\x04\x05\xb4\x04\x02\x01\x01\x01\x03\x03\x07")
    conn.c(A)
    if service == "http":
        agent = rng.choice(HTTP_AGENTS)
        conn.c(
            P | A,
            f"GET /index{rng.randrange(100)}.html HTTP/1.1\r\nHost: www.example.com\r\n"
            f"User-Agent: {agent}\r\nAccept: */*\r\n\r\n".encode(),
        )
        server = rng.choice(HTTP_SERVERS)
        conn.s(
            P | A,
            f"HTTP/1.1 200 OK\r\nServer: {server}\r\nContent-Type: text/html\r\n"
            f"Content-Length: 10000\r\n\r\n".encode(),
        )
    elif service == "ssh":
        conn.s(P | A, (rng.choice(SSH_SERVERS) + "\r\n").encode())
        conn.c(P | A, (rng.choice(SSH_CLIENTS) + "\r\n").encode())
    elif service in ("smtp", "ftp"):
        banners = SMTP_BANNERS if service == "smtp" else FTP_BANNERS
        conn.s(P | A, (rng.choice(banners) + "\r\n").encode())
        conn.c(P | A, b"QUIT\r\n" if service == "ftp" else b"EHLO client.example.com\r\n")
    data = _pareto(rng, 1.2, 2.0, 400)
    for _ in range(data):
        if rng.random() < 0.7:
            conn.s(A, rng.randbytes(rng.choice((1448, 1448, 512, 100))))
            if rng.random() < 0.5:
                conn.c(A)
        else:
            conn.c(P | A, rng.randbytes(rng.randrange(20, 600)))
    if rng.random() < 0.08:
        conn.c(R | A)
    else:
        conn.c(F | A)
        conn.s(F | A)
        conn.c(A)
    return conn.out


def _udp_flow(rng: random.Random, cli: int, srv: int) -> list[bytes]:
    cport = rng.randrange(32768, 61000)
    if rng.random() < 0.8:
        name = f"host{rng.randrange(1000)}.example.com"
        qid = rng.getrandbits(16)
        question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
        query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + b"\0\x01\0\x01"
        answer = (
            struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
            + question
            + b"\0\x01\0\x01"
            + b"\xc0\x0c\0\x01\0\x01\0\0\x0e\x10\0\x04"
            + rng.randbytes(4)
        )
        return [
            udp_frame(cli, srv, cport, 53, query, outbound=True),
            udp_frame(srv, cli, 53, cport, answer, ttl=52, outbound=False),
        ]
    return [
        udp_frame(cli, srv, cport, 5000 + rng.randrange(10), rng.randbytes(rng.randrange(20, 200)))
        for _ in range(rng.randrange(1, 5))
    ]


def make(
    flows: int,
    seed: int,
    *,
    udp_share: float = 0.15,
    inside: str = "10.0.0.0/16",
    servers: int = 50,
    rate: float = 500.0,
    start: float = 1_700_000_000.0,
) -> list[tuple[float, bytes]]:
    """``flows`` flows as ``(ts, frame)`` in time order; the same for the same arguments.
    ``rate``: new flows per second of capture time."""
    rng = random.Random(seed)
    net_text, _, bits = inside.partition("/")
    net = struct.unpack("!I", bytes(int(x) for x in net_text.split(".")))[0]
    hosts = (1 << (32 - int(bits or 24))) - 2
    server_ips = [0xC6336400 + i + 1 for i in range(min(servers, 250))]  # 198.51.100.x
    services = ["http"] * 5 + ["ssh"] * 2 + ["smtp", "ftp"] + ["data"] * 2
    heap: list[tuple[float, int, int, list[bytes], float]] = []
    t = start
    for i in range(flows):
        t += rng.expovariate(rate)
        cli = net + 1 + rng.randrange(min(hosts, 4000))
        srv = rng.choice(server_ips)
        if rng.random() < udp_share:
            frames = _udp_flow(rng, cli, srv)
        else:
            frames = _tcp_flow(rng, cli, srv, rng.choice(services))
        gap = rng.choice((0.0005, 0.002, 0.01, 0.05))
        heapq.heappush(heap, (t, i, 0, frames, gap))
    out: list[tuple[float, bytes]] = []
    while heap:
        ts, i, k, frames, gap = heapq.heappop(heap)
        out.append((round(ts, 6), frames[k]))
        if k + 1 < len(frames):
            heapq.heappush(heap, (ts + gap * (0.5 + rng.random()), i, k + 1, frames, gap))
    return out


def iter_pcap(path: str | Path) -> Iterator[tuple[float, bytes]]:
    with Path(path).open("rb") as f:
        yield from dpkt.pcap.Reader(f)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.traffic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write a capture")
    mk.add_argument("--flows", type=int, required=True)
    mk.add_argument("--seed", type=int, default=1)
    mk.add_argument("--out", required=True, metavar="FILE.pcap")
    mk.add_argument("--udp-share", type=float, default=0.15)
    mk.add_argument("--inside", default="10.0.0.0/16", help="clients' network")
    mk.add_argument("--servers", type=int, default=50)
    mk.add_argument("--rate", type=float, default=500.0, help="new flows per second")
    args = parser.parse_args(argv)
    if args.flows < 1:
        parser.error("--flows must be at least 1")
    if not 0.0 <= args.udp_share <= 1.0:
        parser.error("--udp-share must be between 0 and 1")
    if not 1 <= args.servers <= 250:
        parser.error("--servers must be between 1 and 250")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    try:
        # (without a prefix length, make takes a /24)
        text = args.inside if "/" in args.inside else f"{args.inside}/24"
        inside = ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        parser.error(f"--inside: {exc}")
    if inside.num_addresses < 4:
        parser.error("--inside must hold at least 4 addresses (a /30 or wider)")
    packets = make(
        args.flows,
        args.seed,
        udp_share=args.udp_share,
        inside=args.inside,
        servers=args.servers,
        rate=args.rate,
    )
    try:
        with open(args.out, "wb") as f:
            writer = dpkt.pcap.Writer(f)
            for ts, frame in packets:
                writer.writepkt(frame, ts=ts)
    except OSError as exc:
        parser.error(f"--out {args.out}: {exc.strerror or exc}")
    print(f"{args.out}: {args.flows} flows, {len(packets)} packets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
