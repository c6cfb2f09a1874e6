"""bench.traffic: reproducible, well-formed, and holding what the NFs look for; bench.nf
runs end to end on a tiny capture."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest

from bench import nf as bench_nf
from bench import traffic
from nf.capture import read_capture
from nf.packet import FIN, RST, SYN, TCP, UDP, checksum, parse


def test_the_same_arguments_make_the_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    assert traffic.main(["make", "--flows", "60", "--seed", "4", "--out", str(a)]) == 0
    assert traffic.main(["make", "--flows", "60", "--seed", "4", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    other = traffic.make(60, seed=5)
    assert [f for _, f in other] != [f for _, f in read_capture(a)]


def test_it_holds_handshakes_banners_requests_teardowns_and_udp() -> None:
    packets = traffic.make(300, seed=1)
    assert [ts for ts, _ in packets] == sorted(ts for ts, _ in packets)
    parsed = [parse(frame, ts) for ts, frame in packets]
    assert all(p.drop is None for p in parsed)
    kinds: Counter[str] = Counter()
    flows: Counter[tuple[int, ...]] = Counter()
    for p in parsed:
        flows[p.flow_key_both()] += 1
        if p.proto == UDP:
            kinds["udp"] += 1
        elif p.proto == TCP:
            if p.tcp_flags & SYN:
                kinds["syn"] += 1
            if p.tcp_flags & FIN:
                kinds["fin"] += 1
            if p.tcp_flags & RST:
                kinds["rst"] += 1
            payload = p.payload
            for marker in (b"User-Agent: ", b"Server: ", b"SSH-2.0-", b"220 "):
                if marker in payload:
                    kinds[marker.decode()] += 1
    for kind in ("udp", "syn", "fin", "rst", "User-Agent: ", "Server: ", "SSH-2.0-", "220 "):
        assert kinds[kind] > 0, kind
    sizes = sorted(flows.values())
    assert sizes[-1] > 10 * sizes[len(sizes) // 2]  # heavy-tailed: a few long flows


def test_bench_nf_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_nf, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_nf, "LONG", (10, 5))
    # (--connections 0: the two-member part takes seconds to stop; bench.nf --quick runs it)
    argv = ["--quick", "--flows", "20", "--nf", "nat", "--nf", "synthetic", "--connections", "0"]
    assert bench_nf.main(argv) == 0
    data = json.loads((tmp_path / "nf.json").read_text())
    assert {(r["nf"], r["traffic"]) for r in data["rows"]} == {
        ("nat", "mixed"), ("nat", "long"), ("synthetic", "mixed"), ("synthetic", "long"),
    }  # fmt: skip
    assert data["nat_connections"] is None
    assert (tmp_path / "nf.png").stat().st_size > 1000


def test_the_senders_later_passes_give_ipv6_flows_fresh_addresses_too(tmp_path: Path) -> None:
    """``bench.sender`` replays a capture again with fresh addresses for more flows: the
    IPv6 flows of pass k are new flows (their addresses changed, their checksums right),
    as the IPv4 ones are."""
    from bench.sender import Sender, parse_args

    capture = Path(__file__).parent / "prads" / "fixtures" / "ipv6.pcap"
    n = len(read_capture(capture))
    flows = len({parse(f, 0).flow_key_both() for _, f in read_capture(capture)})
    args = parse_args(
        [
            "--controller", "127.0.0.1:9", "--sink", "127.0.0.1:9", "--pcap", str(capture),
            "--flows", str(2 * flows), "--nf", "prads",
        ]
    )  # fmt: skip
    sender = Sender(args)
    try:
        frames = [frame for _, _, frame in sender.frames()]
    finally:
        sender.sock.close()
    assert len(frames) == 2 * n
    first = {parse(f, 0).flow_key_both() for f in frames[:n]}
    second = {parse(f, 0).flow_key_both() for f in frames[n:]}
    assert len(first) == len(second) == flows and not first & second
    for frame in frames[n:]:
        p = parse(frame, 0)
        if p.drop == "ipv6" and p.proto in (6, 17, 58):
            plen = p.ip_len - 40
            pseudo = bytes(frame[p.l3 + 8 : p.l3 + 40]) + struct.pack("!IxxxB", plen, p.proto)
            assert checksum(pseudo + bytes(frame[p.l4 : p.l4 + plen])) == 0
