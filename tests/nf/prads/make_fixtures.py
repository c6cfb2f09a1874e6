"""Regenerate the PRADS fixtures: small captures of our own and what the real prads wrote.

    python -m tests.nf.prads.make_fixtures            # captures, and prads's logs if found

For each scenario below it writes ``fixtures/NAME.pcap`` and, where a ``prads`` binary is
installed (Debian's ``prads`` package, 0.3.3), runs ``prads -r NAME.pcap -l LOG`` twice:

* with our signature files (``nf/prads/signatures``) in place of ``/etc/prads`` (a private
  mount namespace, ``unshare -m``, binds our folder over ``/etc/prads`` for that process
  only; prads reads its OS signature files from there, whatever its options say):
  ``fixtures/NAME.ours.log``;
* with Debian's own ``/etc/prads``, when it is there: ``fixtures/NAME.debian.log``.

The tests compare our output with these logs and never need prads installed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.nf.prads.frames import (
    EOL,
    NOP,
    ether,
    icmp,
    ipv4,
    ipv6,
    opt_mss,
    opt_sok,
    opt_ts,
    opt_ws,
    tcp,
    udp,
    write_pcap,
)

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
OUR_SIGNATURES = HERE.parents[2] / "nf" / "prads" / "signatures"
T0 = 1_500_000_000.0

Frames = list[tuple[float, bytes]]


class _Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self, step: float = 1.0) -> float:
        self.t += step
        return self.t


LINUX_SYN = opt_mss(1460) + opt_sok() + opt_ts(12345, 0) + NOP + opt_ws(7)


def syn_variants() -> Frames:
    """SYNs of many shapes: matched, de-duplicated, unknown, DF retried, quirks."""
    t = _Clock()
    dst = "10.0.9.9"
    out: Frames = []

    def syn(src: str, sport: int, **kw: object) -> None:
        out.append((t(), tcp(src, sport, dst, 80, kw.pop("flags", "S"), **kw)))  # type: ignore[arg-type]

    # Stack A, then the same signature again from the same host (no new line).
    syn("10.0.1.1", 40000, win=5840, ttl=60, opts=LINUX_SYN)
    syn(
        "10.0.1.1",
        40001,
        win=5840,
        ttl=60,
        opts=opt_mss(1460) + opt_sok() + opt_ts(99999, 0) + NOP + opt_ws(7),
    )
    # Stack B from the same host: a new line.
    syn(
        "10.0.1.1",
        40002,
        win=14600,
        ttl=64,
        opts=opt_mss(1460) + opt_sok() + opt_ts(720000, 0) + NOP + opt_ws(6),
    )
    # A zero timestamp.
    syn(
        "10.0.1.2",
        40003,
        win=5840,
        ttl=64,
        opts=opt_mss(1460) + opt_sok() + opt_ts(0, 0) + NOP + opt_ws(7),
    )
    # Window a multiple of 1024.
    syn(
        "10.0.1.3",
        40004,
        win=8192,
        ttl=128,
        ip_id=0,
        opts=opt_mss(1460) + NOP + opt_ws(8) + NOP + NOP + opt_sok(),
    )
    syn(
        "10.0.1.3",
        40005,
        win=8192,
        ttl=120,
        opts=opt_mss(1460) + NOP + opt_ws(8) + NOP + NOP + opt_sok(),
    )
    # No DF, MSS modulo.
    syn("10.0.1.4", 40006, win=16384, ttl=64, df=False, opts=opt_mss(1460))
    # DF clear against a DF signature: retried as DF set, printed with DF 1.
    syn("10.0.1.5", 40007, win=4500, ttl=64, df=False, opts=opt_mss(1460) + NOP + NOP + opt_sok())
    # A big SYN (data in it) against a size wildcard that sits in another hash bucket.
    big_opts = opt_mss(1460) + NOP + opt_ws(2) + NOP + NOP + opt_ts(5, 0) + opt_sok() + NOP + NOP
    syn("10.0.1.6", 40008, win=32768, ttl=64, opts=big_opts, payload=b"x" * 60)
    # A lone MSS: the generic signature.
    syn("10.0.1.7", 40009, win=3000, ttl=64, opts=opt_mss(1380))
    # IP options and an urgent pointer.
    syn("10.0.1.8", 40010, win=8192, ttl=255, opts=opt_mss(1460), ipopts=NOP * 4, urp=7)
    # No-detail signature with a low TTL, a small MSS.
    syn("10.0.1.9", 40011, win=4096, ttl=30, opts=opt_mss(536))
    # Unknown (TTL 100, DF clear: printed DF 1), then another unknown from it (no line).
    syn("10.0.2.1", 40012, win=1234, ttl=100, df=False, opts=opt_mss(1400))
    syn("10.0.2.1", 40013, win=4321, ttl=100, opts=opt_mss(1400) + NOP + opt_ws(3))
    # ...then one that matches a signature (a new line).
    syn("10.0.2.1", 40014, win=5840, ttl=60, opts=LINUX_SYN)
    # An unknown option kind, padding after EOL.
    syn("10.0.2.3", 40015, win=2048, ttl=64, opts=opt_mss(1460) + b"\x1e\x04\x00\x00")
    syn("10.0.2.4", 40016, win=2048, ttl=64, opts=opt_mss(1460) + EOL + EOL + EOL + EOL)
    # Broken options: an option length of 0.
    syn("10.0.2.5", 40017, win=2048, ttl=64, opts=opt_mss(1460) + b"\x1e\x00\x00\x00")
    # ECN flags and reserved bits.
    syn("10.0.2.6", 40018, flags="SEC", win=2048, ttl=64, x2=1, opts=opt_mss(1460))
    # Sequence 0 (and so sequence = acknowledgement).
    syn("10.0.2.7", 40019, win=2048, ttl=64, seq=0, opts=opt_mss(1460))
    # The window 12345, a window that is a multiple of MSS+40, a zero window.
    syn("10.0.2.8", 40020, win=12345, ttl=64, opts=opt_mss(1460))
    syn("10.0.2.9", 40021, win=4320, ttl=64, opts=opt_mss(1400) + NOP + NOP + opt_sok())
    syn("10.0.2.10", 40022, win=0, ttl=64, opts=opt_mss(1460))
    # TTL above the signature's: no match (unknown).
    syn("10.0.2.11", 40023, win=5840, ttl=70, opts=LINUX_SYN)
    # An MSS not in the link table, a timestamp worth hours of uptime.
    syn("10.0.2.12", 40024, win=5000, ttl=64, opts=opt_mss(1000) + opt_ts(9_000_000, 0))
    # No options at all.
    syn("10.0.2.13", 40025, win=512, ttl=64)
    # A SYN with a FIN (odd flags), a SYN with PSH and URG.
    syn("10.0.2.14", 40026, flags="SF", win=1024, ttl=64, opts=opt_mss(1460))
    syn("10.0.2.15", 40027, flags="SPU", win=1024, ttl=64, opts=opt_mss(1460), urp=1)
    # IP options only, no TCP options.
    syn("10.0.2.16", 40028, win=1024, ttl=64, ipopts=NOP * 8)
    return out


def _handshake(
    t: _Clock,
    cli: str,
    cport: int,
    srv: str,
    sport: int,
    *,
    syn_opts: bytes = LINUX_SYN,
    syn_win: int = 5840,
    syn_ttl: int = 64,
    sa_opts: bytes | None = None,
    sa_win: int = 5840,
    sa_ttl: int = 64,
) -> Frames:
    if sa_opts is None:
        sa_opts = opt_mss(1460) + opt_sok() + opt_ts(999, 12345) + NOP + opt_ws(7)
    return [
        (t(), tcp(cli, cport, srv, sport, "S", seq=100, win=syn_win, ttl=syn_ttl, opts=syn_opts)),
        (
            t(),
            tcp(
                srv, sport, cli, cport, "SA", seq=500, ack=101, win=sa_win, ttl=sa_ttl, opts=sa_opts
            ),
        ),
        (t(), tcp(cli, cport, srv, sport, "A", seq=101, ack=501, win=syn_win, ttl=syn_ttl)),
    ]


def _data(
    t: _Clock,
    a: str,
    ap: int,
    b: str,
    bp: int,
    payload: bytes,
    ttl: int = 64,
    seq: int = 101,
    ack: int = 501,
) -> tuple[float, bytes]:
    return (t(), tcp(a, ap, b, bp, "PA", seq=seq, ack=ack, ttl=ttl, payload=payload))


def sessions() -> Frames:
    """TCP conversations: handshakes, banners, client applications, FIN and RST."""
    t = _Clock()
    out: Frames = []
    # SSH: stack A client, server A; banners both ways; FIN both ways.
    c, s = "10.0.0.1", "10.0.0.2"
    out += _handshake(t, c, 40000, s, 22, syn_ttl=60)
    out.append(
        _data(t, s, 22, c, 40000, b"SSH-2.0-OpenSSH_5.3p1 Debian-3ubuntu7\r\n", seq=501, ack=101)
    )
    out.append(_data(t, c, 40000, s, 22, b"SSH-2.0-OpenSSH_5.1\r\n", ttl=60))
    out.append(
        _data(t, s, 22, c, 40000, b"SSH-2.0-OpenSSH_5.3p1 Debian-3ubuntu7\r\n", seq=541, ack=122)
    )
    fin_ts = NOP + NOP + opt_ts(2000, 1000)
    out.append((t(), tcp(c, 40000, s, 22, "FA", seq=122, ack=581, win=5840, ttl=60, opts=fin_ts)))
    out.append((t(), tcp(s, 22, c, 40000, "FA", seq=581, ack=123, win=1024, ttl=64)))
    out.append((t(), tcp(c, 40000, s, 22, "A", seq=123, ack=582, win=5840, ttl=60)))
    # HTTP: an unknown SYN stack, Windows-like SYN-ACK, User-Agent, Apache.
    c2 = "10.0.0.3"
    out += _handshake(
        t,
        c2,
        40001,
        s,
        80,
        syn_opts=opt_mss(1400),
        syn_win=1234,
        syn_ttl=100,
        sa_opts=opt_mss(1460) + NOP + opt_ws(8) + NOP + NOP + opt_sok(),
        sa_win=8192,
        sa_ttl=128,
    )
    out.append(
        _data(
            t,
            c2,
            40001,
            s,
            80,
            b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: Mozilla/5.0 (X11)\r\n\r\n",
            ttl=100,
        )
    )
    out.append(
        _data(
            t,
            s,
            80,
            c2,
            40001,
            b"HTTP/1.1 200 OK\r\nServer: Apache/2.2.14 (Ubuntu)\r\n\r\n",
            ttl=128,
            seq=501,
            ack=160,
        )
    )
    # Port 22: a banner no signature knows (@ssh), then a real one (replaces it), then
    # another real one (no line): three connections one after the other.
    c3, s3 = "10.0.0.4", "10.0.0.5"
    for i, banner in enumerate(
        (b"hello world banner\r\n", b"SSH-2.0-OpenSSH_7.4\r\n", b"SSH-2.0-OpenSSH_8.0\r\n")
    ):
        out += _handshake(t, c3, 41000 + i, s3, 22)
        out.append(_data(t, s3, 22, c3, 41000 + i, banner, seq=501, ack=101))
    # A 9-byte server payload (skipped); a banner in the 16th server packet.
    c4, s4 = "10.0.0.10", "10.0.0.11"
    out += _handshake(t, c4, 42000, s4, 2222)
    out.append(_data(t, s4, 2222, c4, 42000, b"123456789", seq=501, ack=101))
    for i in range(15):
        out.append(
            _data(
                t, s4, 2222, c4, 42000, b"line of nothing %02d\r\n" % i, seq=510 + 20 * i, ack=101
            )
        )
    out.append(
        _data(
            t, s4, 2222, c4, 42000, b"HTTP/1.0 200 OK\r\nServer: nginx/1.18.0\r\n", seq=900, ack=101
        )
    )
    # Mid-stream: the first packet seen is the server's; the next one in that direction
    # counts as the client's.
    out.append(_data(t, s, 8080, c, 40004, b"SSH-2.0-OpenSSH_6.4\r\n", seq=700, ack=900))
    out.append(_data(t, s, 8080, c, 40004, b"SSH-2.0-OpenSSH_6.6\r\n", seq=721, ack=900))
    # A refused connection: RST+ACK, sequence 0, IP id 0.
    out.append((t(), tcp("10.0.0.6", 40005, "10.0.0.7", 23, "S", seq=100, opts=LINUX_SYN)))
    out.append((t(), tcp("10.0.0.7", 23, "10.0.0.6", 40005, "RA", seq=0, ack=101, win=0, ip_id=0)))
    # SMTP: banner, EHLO, then a RST without ACK from the client.
    c5, s5 = "10.0.0.8", "10.0.0.9"
    out += _handshake(t, c5, 40006, s5, 25)
    out.append(
        _data(t, s5, 25, c5, 40006, b"220 mail.example.org ESMTP Postfix\r\n", seq=501, ack=101)
    )
    out.append(_data(t, c5, 40006, s5, 25, b"EHLO client.example.org\r\n"))
    out.append((t(), tcp(c5, 40006, s5, 25, "R", seq=126, ack=0, win=0)))
    # An FTP client whose payload no signature knows: @ftp.
    out += _handshake(t, c5, 40007, "10.0.0.12", 21)
    out.append(_data(t, c5, 40007, "10.0.0.12", 21, b"USER anonymous\r\n"))
    # A host that was an SSH client on port 22 becomes an SSH server on port 22: the same
    # entry (port, protocol), a different application: no line.
    out += _handshake(t, "10.0.0.13", 40008, c, 22)
    out.append(_data(t, c, 22, "10.0.0.13", 40008, b"SSH-2.0-OpenSSH_9.9\r\n", seq=501, ack=101))
    # A SYN-ACK seen first (the SYN missed): the connection turns round.
    out.append(
        (
            t(),
            tcp(
                "10.0.0.14",
                443,
                "10.0.0.15",
                40009,
                "SA",
                seq=1,
                ack=2,
                win=65535,
                opts=opt_mss(1460),
            ),
        )
    )
    out.append(
        _data(t, "10.0.0.15", 40009, "10.0.0.14", 443, b"User-Agent: curl/7.68.0\r\n", seq=2, ack=2)
    )
    out.append(
        _data(t, "10.0.0.14", 443, "10.0.0.15", 40009, b"nothing to see here\r\n", seq=2, ack=27)
    )
    # A stray ACK with timestamps (prads leaves it alone by default).
    out.append((t(), tcp(c, 40010, s, 8443, "A", seq=5, ack=6, opts=NOP + NOP + opt_ts(5, 6))))
    # ICMP and another IP protocol: assets, no lines.
    out.append((t(), icmp("10.0.0.16", "10.0.0.2")))
    out.append((t(), ether(ipv4("10.0.0.17", "10.0.0.2", 47, b"\0" * 24))))
    return out


def _dns(ident: int, flags: int, an: int) -> bytes:
    header = struct.pack("!HHHHHH", ident, flags, 1, an, 0, 0)
    question = b"\x07example\x03org\x00\x00\x01\x00\x01"
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x0e\x10\x00\x04\x5d\xb8\xd8\x22" * an
    return header + question + answer


def udp_services() -> Frames:
    """UDP: DNS both ways, @port guesses (and the turn-round prads makes), syslog."""
    t = _Clock()
    out: Frames = []
    out.append((t(), udp("10.0.3.1", 5353, "10.0.3.2", 53, _dns(0x1234, 0x0100, 0))))
    out.append((t(), udp("10.0.3.2", 53, "10.0.3.1", 5353, _dns(0x1234, 0x8180, 1), ttl=63)))
    # NTP: the first packet has no role; the reply is a server's (@ntp); the client's next
    # packet is a client's (@ntp).
    ntp = b"\x23" + b"\0" * 47
    out.append((t(), udp("10.0.3.3", 40000, "10.0.3.4", 123, ntp)))
    out.append((t(), udp("10.0.3.4", 123, "10.0.3.3", 40000, b"\x24" + b"\1" * 47)))
    out.append((t(), udp("10.0.3.3", 40000, "10.0.3.4", 123, ntp)))
    # A reply to a known port that is not the sender's: prads turns the connection round.
    out.append((t(), udp("10.0.3.5", 40001, "10.0.3.6", 40002, b"first packet, no role")))
    out.append((t(), udp("10.0.3.6", 40002, "10.0.3.5", 40001, b"second, a server's")))
    out.append((t(), udp("10.0.3.7", 514, "10.0.3.8", 40003, b"no role yet ......")))
    out.append((t(), udp("10.0.3.8", 40003, "10.0.3.7", 514, b"a reply to syslog")))
    out.append((t(), udp("10.0.3.9", 40004, "10.0.3.10", 161, b"first ........")))
    out.append((t(), udp("10.0.3.9", 40004, "10.0.3.10", 161, b"second .......")))
    # Syslog messages: matched.
    out.append((t(), udp("10.0.3.11", 514, "10.0.3.12", 514, b"<34>Oct 11 22:14:15 host su: bad")))
    # Four bytes of payload: too short.
    out.append((t(), udp("10.0.3.13", 53, "10.0.3.14", 5353, b"\x00\x01\x81\x80")))
    return out


def vlans() -> Frames:
    """802.1Q tags (the whole tag printed, priority bits too) and a stacked tag (ignored)."""
    t = _Clock()
    out: Frames = []
    out.append(
        (t(), tcp("10.0.4.1", 40000, "10.0.4.2", 80, "S", win=5840, ttl=60, opts=LINUX_SYN, vlan=5))
    )
    out.append(
        (
            t(),
            tcp(
                "10.0.4.3",
                40001,
                "10.0.4.2",
                80,
                "S",
                win=8192,
                ttl=128,
                opts=opt_mss(1460) + NOP + opt_ws(8) + NOP + NOP + opt_sok(),
                vlan=0x6064,
            ),
        )
    )
    inner = tcp("10.0.4.4", 40002, "10.0.4.2", 80, "S", win=5840, ttl=60, opts=LINUX_SYN, vlan=7)
    stacked = inner[:12] + struct.pack("!HH", 0x8100, 9) + inner[12:]
    out.append((t(), stacked))
    out.append(
        (
            t(),
            tcp(
                "10.0.4.2",
                80,
                "10.0.4.1",
                40000,
                "SA",
                seq=9,
                ack=1001,
                win=5840,
                opts=opt_mss(1460) + opt_sok() + opt_ts(1, 12345) + NOP + opt_ws(7),
                vlan=5,
            ),
        )
    )
    return out


def stray_acks() -> Frames:
    """Stray ACKs (fingerprinted only when that detection is on), FIN and RST too."""
    t = _Clock()
    out: Frames = []
    c, s = "10.0.5.1", "10.0.5.2"
    out.append((t(), tcp(c, 40000, s, 80, "A", seq=5, ack=6, opts=NOP + NOP + opt_ts(5, 6))))
    out.append((t(), tcp(s, 80, c, 40000, "A", seq=6, ack=6, opts=NOP + NOP + opt_ts(7, 5))))
    out.append((t(), tcp(c, 40000, s, 80, "PA", seq=6, ack=6, payload=b"hello there, friend")))
    out.append((t(), tcp(s, 80, c, 40000, "FA", seq=6, ack=25, win=1024)))
    out.append((t(), tcp(c, 40000, s, 80, "RA", seq=25, ack=7, win=0)))
    return out


# Pools the mixed capture draws from.
_CLIENT_STACKS = [
    (5840, LINUX_SYN),
    (14600, opt_mss(1460) + opt_sok() + opt_ts(720000, 0) + NOP + opt_ws(6)),
    (8192, opt_mss(1460) + NOP + opt_ws(8) + NOP + NOP + opt_sok()),
    (65535, opt_mss(1460) + NOP + opt_ws(1) + NOP + NOP + opt_ts(1, 0) + NOP + NOP + opt_sok()),
    (16384, opt_mss(1460)),
    (4500, opt_mss(1460) + NOP + NOP + opt_sok()),
    (5720, opt_mss(1430) + opt_sok() + opt_ts(3, 0) + NOP + opt_ws(2)),
    (29200, opt_mss(1460) + opt_sok() + opt_ts(4, 0) + NOP + opt_ws(7)),
]
_SERVER_STACKS = [
    (5840, opt_mss(1460) + opt_sok() + opt_ts(999, 12345) + NOP + opt_ws(7)),
    (8192, opt_mss(1460) + NOP + opt_ws(8) + NOP + NOP + opt_sok()),
    (65535, opt_mss(1460)),
    (28960, opt_mss(1460) + opt_sok() + opt_ts(77, 4) + NOP + opt_ws(7)),
    (5792, opt_mss(1448) + NOP + NOP + opt_sok()),
]
_BANNERS = [
    (22, b"SSH-2.0-OpenSSH_7.4\r\n", b"SSH-2.0-OpenSSH_8.1\r\n"),
    (22, b"SSH-2.0-dropbear_2019.78\r\n", b"SSH-2.0-PuTTY_Release_0.73\r\n"),
    (
        80,
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.14.2\r\n\r\n",
        b"GET / HTTP/1.1\r\nUser-Agent: Wget/1.20\r\n\r\n",
    ),
    (
        80,
        b"HTTP/1.1 404 Not Found\r\nServer: Apache/2.4.41 (Debian)\r\n",
        b"GET /x HTTP/1.0\r\nUser-Agent: curl/7.64\r\n\r\n",
    ),
    (25, b"220 mx.example.net ESMTP Postfix\r\n", b"EHLO relay.example.net\r\n"),
    (21, b"220 (vsFTPd 3.0.3)\r\n", b"USER ftp\r\n"),
    (
        443,
        b"\x16\x03\x03\x00\x31\x02\x00\x00\x2d\x03\x03 random stuff",
        b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03 hello",
    ),
    (
        8080,
        b"HTTP/1.1 200 OK\r\nServer: Apache/2.2.3\r\n",
        b"GET / HTTP/1.1\r\nUser-Agent: Mozilla/4.0 (compatible)\r\n\r\n",
    ),
    (3306, b"J\x00\x00\x00\n5.7.30\x00 some mysql greeting", b"short"),
]


def mixed(seed: int = 6, flows: int = 120) -> Frames:
    """Many conversations drawn at random (fixed seed): stacks, TTLs, DF, IP ids, banners,
    missing handshakes, endings, random option bytes, UDP."""
    import random

    rng = random.Random(seed)
    t = _Clock()
    out: Frames = []
    hosts = [f"10.1.{i // 16}.{i % 16 + 1}" for i in range(40)]
    for f in range(flows):
        c, s = rng.sample(hosts, 2)
        cport = 30000 + f
        if rng.random() < 0.2:
            sport = rng.choice((53, 123, 161, 514, 5000, 1194))
            for i in range(rng.randint(1, 3)):
                a, ap, b, bp = (c, cport, s, sport) if i % 2 == 0 else (s, sport, c, cport)
                size = rng.choice((3, 8, 20, 40))
                payload = bytes(rng.getrandbits(8) for _ in range(size))
                if rng.random() < 0.3:
                    payload = b"<%d>message" % rng.randint(0, 191)
                out.append(
                    (t(0.01), udp(a, ap, b, bp, payload, ttl=rng.choice((64, 63, 128, 255))))
                )
            continue
        port, sbanner, cbanner = rng.choice(_BANNERS)
        if rng.random() < 0.2:
            port = rng.choice((22, 80, 21, 25, 443, 9999))
        cwin, copts = rng.choice(_CLIENT_STACKS)
        swin, sopts = rng.choice(_SERVER_STACKS)
        if rng.random() < 0.1:
            copts = bytes(rng.getrandbits(8) for _ in range(rng.choice((4, 8, 12, 20))))
        cttl = rng.choice((64, 60, 57, 128, 119, 255, 250, 32, 30))
        sttl = rng.choice((64, 62, 128, 126, 255))
        cdf = rng.random() < 0.8
        sdf = rng.random() < 0.8
        cid = 0 if rng.random() < 0.2 else rng.randint(1, 65535)
        sid = 0 if rng.random() < 0.2 else rng.randint(1, 65535)
        if rng.random() < 0.85:
            out.append(
                (
                    t(0.01),
                    tcp(
                        c,
                        cport,
                        s,
                        port,
                        rng.choice(("S", "S", "S", "SEC")),
                        seq=100,
                        win=cwin,
                        ttl=cttl,
                        df=cdf,
                        ip_id=cid,
                        opts=copts,
                    ),
                )
            )
        if rng.random() < 0.9:
            out.append(
                (
                    t(0.01),
                    tcp(
                        s,
                        port,
                        c,
                        cport,
                        "SA",
                        seq=500,
                        ack=101,
                        win=swin,
                        ttl=sttl,
                        df=sdf,
                        ip_id=sid,
                        opts=sopts,
                    ),
                )
            )
        out.append(
            (t(0.01), tcp(c, cport, s, port, "A", seq=101, ack=501, win=cwin, ttl=cttl, df=cdf))
        )
        order = [("s", sbanner), ("c", cbanner)]
        rng.shuffle(order)
        for who, banner in order:
            if rng.random() < 0.15:
                continue
            if who == "s":
                out.append(
                    (
                        t(0.01),
                        tcp(
                            s,
                            port,
                            c,
                            cport,
                            "PA",
                            seq=501,
                            ack=101,
                            ttl=sttl,
                            df=sdf,
                            payload=banner,
                        ),
                    )
                )
            else:
                out.append(
                    (
                        t(0.01),
                        tcp(
                            c,
                            cport,
                            s,
                            port,
                            "PA",
                            seq=101,
                            ack=501,
                            ttl=cttl,
                            df=cdf,
                            payload=banner,
                        ),
                    )
                )
        end = rng.random()
        if end < 0.4:
            out.append(
                (
                    t(0.01),
                    tcp(
                        c,
                        cport,
                        s,
                        port,
                        "FA",
                        seq=200,
                        ack=600,
                        win=cwin,
                        ttl=cttl,
                        df=cdf,
                        opts=rng.choice((b"", NOP + NOP + opt_ts(9, 8))),
                    ),
                )
            )
            out.append(
                (
                    t(0.01),
                    tcp(s, port, c, cport, "FA", seq=600, ack=201, win=swin, ttl=sttl, df=sdf),
                )
            )
        elif end < 0.6:
            out.append(
                (
                    t(0.01),
                    tcp(
                        s,
                        port,
                        c,
                        cport,
                        rng.choice(("R", "RA")),
                        seq=rng.choice((0, 600)),
                        ack=rng.choice((0, 201)),
                        win=0,
                        ttl=sttl,
                        df=sdf,
                        ip_id=sid,
                    ),
                )
            )
    return out


def oddities(seed: int = 12, count: int = 600) -> Frames:
    """Single packets with random header values among few hosts and ports: flags, sequence
    and acknowledgement numbers, windows, options (some random bytes), IP options, TTLs,
    DF, IP ids, reserved bits, urgent pointers, payloads; some UDP."""
    import random

    rng = random.Random(seed)
    hosts = [f"10.2.0.{i}" for i in range(1, 60)]
    ports = [22, 80, 25, 21, 443, 53, 123, 40000, 40001, 40002]
    flag_sets = ["S", "S", "SA", "SA", "A", "PA", "FA", "F", "R", "RA", "SF", "SR", "SEC"]
    flag_sets += ["SAE", "FPU", "", "SU"]
    stacks = [o for _, o in _CLIENT_STACKS + _SERVER_STACKS] + [b""]
    out: Frames = []
    t = _Clock()
    for _ in range(count):
        a, b = rng.sample(hosts, 2)
        ap, bp = rng.choice(ports), rng.choice(ports)
        if rng.random() < 0.15:
            pl = rng.choice(
                [b"", b"abc", bytes(rng.getrandbits(8) for _ in range(30)), b"<13>hi there"]
            )
            frame = udp(a, ap, b, bp, pl, ttl=rng.randint(1, 255), df=rng.random() < 0.5)
            out.append((t(0.01), frame))
            continue
        if rng.random() < 0.5:
            opts = rng.choice(stacks)
        else:
            k = rng.choice(range(0, 44, 4))
            kinds = [0, 1, 2, 3, 4, 8, 30]
            opts = bytes(
                rng.choice(kinds) if rng.random() < 0.6 else rng.getrandbits(8) for _ in range(k)
            )
        pl = b""
        r = rng.random()
        if r < 0.3:
            pl = rng.choice(_BANNERS)[rng.choice([1, 2])]
        elif r < 0.4:
            pl = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
        frame = tcp(
            a,
            ap,
            b,
            bp,
            rng.choice(flag_sets),
            seq=rng.choice([0, 1, 12345, 2**32 - 1]),
            ack=rng.choice([0, 1, 12345]),
            win=rng.choice([0, 512, 1460, 2920, 5840, 8192, 12345, 16384, 65535]),
            opts=opts,
            payload=pl,
            urp=rng.choice([0, 0, 0, 1]),
            x2=rng.choice([0, 0, 0, 1, 8]),
            ttl=rng.randint(1, 255),
            df=rng.random() < 0.7,
            ip_id=rng.choice([0, 1, 4242]),
            ipopts=rng.choice([b"", b"", b"", NOP * 4, NOP * 8]),
        )
        out.append((t(0.01), frame))
    return out


def bench_traffic() -> Frames:
    """``bench.traffic``'s generator (40 flows, seed 11): realistic conversations with
    banners and clients.  Its output may change with that module; the committed capture
    is what the tests use."""
    import subprocess as sp

    from tests.nf.prads.frames import read_pcap

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.pcap"
        sp.run(
            [
                sys.executable,
                "-m",
                "bench.traffic",
                "make",
                "--flows",
                "40",
                "--seed",
                "11",
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        return read_pcap(str(out))


def ipv6_traffic() -> Frames:
    """IPv6: prads 0.3.3 analyses it as it does IPv4, with the flow label in place of the
    IP id (quirk L when set, Z when 0), DF 1, the payload length as the size, only known
    ports for UDP (its IPv6 UDP list is never loaded), no asset for another next header,
    and addresses as inet_ntop writes them."""
    t = _Clock()
    out: Frames = []
    c, s = "2001:db8::10", "2001:db8::20"
    # HTTP: a flow-labelled Linux SYN, a SYN-ACK without a label, a browser, Apache.
    out.append((t(), tcp(c, 40000, s, 80, "S", seq=100, opts=LINUX_SYN, flow=0x12345)))
    sa_opts = opt_mss(1440) + opt_sok() + opt_ts(999, 12345) + NOP + opt_ws(7)
    out.append((t(), tcp(s, 80, c, 40000, "SA", seq=500, ack=101, win=5760, opts=sa_opts)))
    out.append((t(), tcp(c, 40000, s, 80, "A", seq=101, ack=501, flow=0x12345)))
    get = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: Mozilla/5.0 (X11)\r\n\r\n"
    out.append((t(), tcp(c, 40000, s, 80, "PA", seq=101, ack=501, payload=get, flow=0x12345)))
    ok = b"HTTP/1.1 200 OK\r\nServer: Apache/2.2.3 (Debian)\r\nContent-Length: 0\r\n\r\n"
    out.append((t(), tcp(s, 80, c, 40000, "PA", seq=501, ack=160, payload=ok, ttl=57)))
    fin_ts = NOP + NOP + opt_ts(2000, 1000)
    out.append((t(), tcp(c, 40000, s, 80, "FA", seq=160, ack=570, opts=fin_ts, flow=0x12345)))
    out.append((t(), tcp(s, 80, c, 40000, "FA", seq=570, ack=161, win=1024)))
    # SSH between link-local addresses; the client resets.
    a, b = "fe80::1", "fe80::2:0:0:2"
    out.append((t(), tcp(a, 40001, b, 22, "S", seq=7, win=65535, opts=LINUX_SYN, flow=1)))
    out.append((t(), tcp(b, 22, a, 40001, "SA", seq=9, ack=8, opts=opt_mss(1220), flow=2)))
    banner = b"SSH-2.0-OpenSSH_8.4p1\r\n"
    out.append((t(), tcp(b, 22, a, 40001, "PA", seq=10, ack=8, payload=banner)))
    banner = b"SSH-2.0-PuTTY_0.78\r\n"
    out.append((t(), tcp(a, 40001, b, 22, "PA", seq=8, ack=33, payload=banner)))
    out.append((t(), tcp(a, 40001, b, 22, "RA", seq=28, ack=33, flow=1)))
    # UDP: a DNS query and its answer, syslog (both match IPv4 signatures; not here).
    d, n = "2001:db8::30", "2001:db8::53"
    out.append((t(), udp(d, 5353, n, 53, _dns(0x4321, 0x0100, 0))))
    out.append((t(), udp(n, 53, d, 5353, _dns(0x4321, 0x8180, 1), ttl=63)))
    out.append((t(), udp(d, 514, n, 514, b"<34>Oct 11 22:14:15 host su: bad")))
    # ICMPv6: an asset, no line; a hop-by-hop header first: tracked, no asset.
    out.append((t(), icmp("2001:db8::40", s)))
    out.append((t(), ether(ipv6("2001:db8::50", s, 0, b"\x3b\0" + b"\0" * 14), etype=0x86DD)))
    # An IPv4-mapped source and a tagged frame.
    out.append((t(), tcp("::ffff:10.0.9.1", 40002, s, 443, "S", opts=LINUX_SYN, ttl=61)))
    out.append((t(), tcp("2001:db8::60", 40003, s, 80, "S", opts=LINUX_SYN, vlan=6)))
    return out


def after_2038() -> Frames:
    """Packet times from 2**31 seconds on: libpcap reads a capture's seconds as signed
    32-bit, so prads's log shows them near 2**64."""
    c, s = "10.0.0.10", "10.0.0.20"
    return [
        (2.0**31, udp(c, 5353, s, 53, _dns(0x1234, 0x0100, 0))),
        (2.0**31 + 5.5, tcp(c, 40000, s, 80, "S", seq=1, opts=LINUX_SYN)),
        (2.0**32 - 1, tcp(s, 22, c, 40001, "PA", payload=b"SSH-2.0-OpenSSH_8.4p1\r\n")),
    ]


def cooked() -> Frames:
    """The sessions as ``tcpdump -i any`` writes them (Linux cooked, link type 113): prads
    reads every capture as Ethernet, so it finds other-link frames and nothing else."""
    import struct

    return [
        (ts, struct.pack("!HHH8s", 0, 1, 6, f[6:12] + b"\0\0") + f[12:]) for ts, f in sessions()
    ]


def _fragments(frame: bytes, size: int) -> list[bytes]:
    """An IPv4 frame cut into fragments of ``size`` data bytes (a multiple of 8)."""
    import struct

    from tests.nf.prads.frames import _csum

    header, data = frame[14:34], frame[34:]
    out = []
    for at in range(0, len(data), size):
        part = data[at : at + size]
        more = 0x2000 if at + size < len(data) else 0
        hdr = bytearray(header)
        struct.pack_into("!HHH", hdr, 2, 20 + len(part), struct.unpack("!H", header[4:6])[0], 0)
        struct.pack_into("!H", hdr, 6, more | at // 8)
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, _csum(bytes(hdr)))
        out.append(frame[:14] + bytes(hdr) + part)
    return out


def fragments() -> Frames:
    """Fragmented datagrams: prads reads a later fragment's data as the header of its
    protocol (ports, flags), so each makes a connection of its own, and payloads that look
    like headers (a DNS port, a SYN) are read as such."""
    t = _Clock()
    out: Frames = []
    c, s = "10.0.0.1", "10.0.0.2"
    # a DNS query, then its long answer in three fragments
    out.append((t(), udp(c, 5353, s, 53, _dns(0x4242, 0x0100, 0))))
    answer = _dns(0x4242, 0x8180, 1) + bytes(range(256)) * 2
    for frag in _fragments(udp(s, 53, c, 5353, answer, ip_id=900), 256):
        out.append((t(0.01), frag))
    # a UDP datagram whose second fragment starts with bytes that read as ports 53 -> 5000
    body = bytes(248) + b"\x00\x35\x13\x88\x00\x20\x00\x00" + b"x" * 200
    for frag in _fragments(udp("10.0.0.3", 2049, s, 2049, body, ip_id=901), 256):
        out.append((t(0.01), frag))
    # a TCP session whose server sends one segment in fragments; the second one's data
    # reads as a SYN from port 80 with options
    out.extend(_handshake(t, "10.0.0.4", 40000, s, 80))
    fake_syn = bytes.fromhex("0050a0b0000000010000000060027210") + bytes(4) + opt_mss(1460)
    segment = b"HTTP/1.1 200 OK\r\nServer: Apache/2.2.3\r\n\r\n"
    segment += b"y" * (248 - len(segment) - 32) + fake_syn + b"z" * 300
    frame = tcp(s, 80, "10.0.0.4", 40000, "PA", seq=5001, ack=1001, payload=segment, ip_id=902)
    for frag in _fragments(frame, 248):
        out.append((t(0.01), frag))
    # an echo of 1,000 bytes in fragments
    ping = icmp("10.0.0.5", s)
    for frag in _fragments(ping[:34] + ping[34:] + bytes(1000), 512):
        out.append((t(0.01), frag))
    return out


SCENARIOS: dict[str, Callable[[], Frames]] = {
    "syn": syn_variants,
    "sessions": sessions,
    "udp": udp_services,
    "vlan": vlans,
    "ack": stray_acks,
    "mixed": mixed,
    "home": sessions,
    "odd": oddities,
    "partial": sessions,
    "traffic": bench_traffic,
    "ipv6": ipv6_traffic,
    "ipv6home": ipv6_traffic,
    "snap": mixed,
    "ipv6snap": ipv6_traffic,
    "y2038": after_2038,
    "cooked": cooked,
    "fragments": fragments,
}

#: Scenarios written as a capture of another link type than Ethernet.
LINKTYPE: dict[str, int] = {"cooked": 113}

#: Scenarios written as a capture with a snap length writes them (the frames cut to so
#: many bytes, each record keeping its frame's length): prads analyses what was captured.
SNAPLEN: dict[str, int] = {"snap": 96, "ipv6snap": 100}

#: Scenarios run with some of our signature files left out (prads tolerates a missing
#: file: that detection finds nothing).
LEFT_OUT: dict[str, tuple[str, ...]] = {
    "partial": ("tcp-synack.fp", "tcp-service.sig", "udp-service.sig", "mtu.sig"),
}


def signature_folder(name: str, into: Path) -> Path:
    """Our signature folder for scenario ``name``: ours, or a copy in ``into`` without the
    files the scenario leaves out."""
    if name not in LEFT_OUT:
        return OUR_SIGNATURES
    folder = into / f"signatures-{name}"
    shutil.copytree(OUR_SIGNATURES, folder, dirs_exist_ok=True)
    for file in LEFT_OUT[name]:
        (folder / file).unlink()
    return folder


#: Scenarios whose capture comes from another module and may change with it.
FOREIGN = {"traffic"}

#: Scenarios run with prads settings beyond its defaults: name -> (prads.conf lines, our
#: configuration).
SETTINGS: dict[str, tuple[str, dict[str, object]]] = {
    "ack": ("os_ack_fingerprint=1\n", {"ack": True}),
    "home": (
        "home_nets=10.0.0.0/30,10.0.0.8/29\n",
        {"home_nets": ["10.0.0.0/30", "10.0.0.8/29"]},
    ),
    "ipv6home": (
        "home_nets=10.0.0.0/8,2001:db8::/120\n",
        {"home_nets": ["10.0.0.0/8", "2001:db8::/120"]},
    ),
}


def run_prads(
    pcap: Path, signatures: Path | None, conf: str = ""
) -> tuple[list[str], list[str]] | None:
    """The asset log the real prads writes for ``pcap`` and the statistics it prints at
    the end, with ``signatures`` bound over /etc/prads (None: the installed set), or None
    if prads is not installed."""
    binary = shutil.which("prads")
    if binary is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)  # prads drops its privileges before it writes the log
        log = Path(tmp) / "assets.log"
        cap = Path(tmp) / "in.pcap"
        shutil.copy(pcap, cap)
        os.chmod(cap, 0o644)
        cmd = f"{binary} -r {cap} -l {log}"
        if conf:
            (Path(tmp) / "prads.conf").write_text(conf)
            cmd += f" -c {Path(tmp) / 'prads.conf'}"
        if signatures is not None:
            folder = Path(tmp) / "sigs"
            shutil.copytree(signatures, folder)
            cmd = f"mount --bind {folder} /etc/prads && {cmd}"
            argv = ["unshare", "-m", "sh", "-c", cmd]
        else:
            argv = ["sh", "-c", cmd]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or not log.exists():
            raise RuntimeError(f"prads failed on {pcap}: {done.stdout}\n{done.stderr}")
        stats = [line for line in done.stdout.splitlines() if line.startswith("-- Total")]
        return log.read_text(encoding="latin-1").splitlines(), stats


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")


def main() -> int:
    FIXTURES.mkdir(exist_ok=True)
    for name, make in SCENARIOS.items():
        pcap = FIXTURES / f"{name}.pcap"
        write_pcap(str(pcap), make(), SNAPLEN.get(name), LINKTYPE.get(name, 1))
        conf = SETTINGS.get(name, ("", {}))[0]
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_prads(pcap, signature_folder(name, Path(tmp)), conf)
        if ours is None:
            print(f"{pcap}: written; prads is not installed, logs not regenerated")
            continue
        _write(FIXTURES / f"{name}.ours.log", ours[0])
        _write(FIXTURES / f"{name}.ours.stats", ours[1])
        if Path("/etc/prads/tcp-syn.fp").exists() and name not in LEFT_OUT:
            debian = run_prads(pcap, None, conf)
            assert debian is not None
            _write(FIXTURES / f"{name}.debian.log", debian[0])
        print(f"{pcap}: {len(ours[0]) - 1} lines with our signatures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
