"""Random and mutated frames through each of our NFs (the NAT and the synthetic NF) on the
offline runner: no exception out of ``process``, every frame given a verdict, and every frame
that did not parse counted under its reason.  50,000 frames per NF here;
``S6_NF_FUZZ=1000000`` for a long run."""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

import pytest

from bench.traffic import icmp_frame, make, tcp_frame, udp_frame
from nf.base import NF, Verdict
from nf.nat import NAT
from nf.packet import ACK, FIN, RST, SYN, ip_int, parse
from nf.runner import run_capture
from nf.synthetic import Synthetic

FRAMES = int(os.environ.get("S6_NF_FUZZ", "50000"))


def seeds() -> list[bytes]:
    a, b, p = ip_int("10.0.0.7"), ip_int("198.51.100.9"), ip_int("203.0.113.1")
    out = [frame for _, frame in make(30, seed=11)]
    out += [
        tcp_frame(a, b, 40000, 80, SYN, options=b"\x02\x04\x05\xb4"),
        tcp_frame(b, p, 80, 1024, SYN | ACK),
        tcp_frame(b, p, 80, 1025, RST),
        tcp_frame(a, b, 40000, 80, FIN | ACK, b"bye", vlan=7),
        udp_frame(a, b, 5353, 53, b"q" * 30),
        udp_frame(b, p, 53, 1024, b"a", checksum=False),
        icmp_frame(a, b),
    ]
    return out


def frames(n: int, rng: random.Random) -> list[tuple[float, bytes]]:
    corpus = seeds()
    out: list[tuple[float, bytes]] = []
    ts = 1000.0
    for _ in range(n):
        ts += rng.random() * 0.05
        kind = rng.random()
        if kind < 0.15:  # random bytes, sometimes with an IPv4 EtherType
            data = bytearray(rng.randbytes(rng.randrange(0, 80)))
            if len(data) >= 15 and rng.random() < 0.7:
                data[12:15] = b"\x08\x00\x45"
            out.append((ts, bytes(data)))
            continue
        data = bytearray(rng.choice(corpus))
        if kind < 0.55:  # flip some bytes in the headers
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(min(len(data), 60))
                data[at] = rng.randrange(256)
        elif kind < 0.75:  # cut
            data = data[: rng.randrange(len(data) + 1)]
        elif kind < 0.85:  # grow
            data += rng.randbytes(rng.randrange(1, 40))
        out.append((ts, bytes(data)))  # else: as it is (real flows)
    return out


@pytest.mark.parametrize(
    ("nf_cls", "config"),
    [
        (NAT, {"ports": "1024-4095", "tcp_idle": 30.0, "udp_idle": 10.0, "fin_grace": 2.0}),
        (NAT, {"inside": ["10.0.0.0/8"], "tcp_idle": 30.0, "fin_grace": 2.0}),
        (Synthetic, {"flow_objects": 2, "shared_access": "blocking"}),
    ],
    ids=["nat", "nat-inside", "synthetic"],
)
async def test_random_and_mutated_frames(nf_cls: type[NF], config: dict[str, Any]) -> None:
    rng = random.Random(f"{nf_cls.name}-{sorted(config)}")
    packets = frames(FRAMES, rng)
    result = await run_capture(nf_cls, config, packets, output=False)
    assert len(result.verdicts) == len(packets)
    assert not [k for k in result.counts if k.startswith("nf-error")], result.counts
    expected = Counter(p.drop for p in (parse(f, ts) for ts, f in packets) if p.drop)
    assert expected  # the fuzzing did make malformed frames
    for reason, n in expected.items():
        assert result.counts.get(reason) == n, reason
    if nf_cls is NAT:
        dropped = sum(1 for v in result.verdicts if v is Verdict.DROP)
        assert dropped >= sum(expected.values())
