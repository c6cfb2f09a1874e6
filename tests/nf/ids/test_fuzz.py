"""Random and mutated frames through the IDS: no exception, every frame counted.

50,000 frames by default; ``S6_NF_FUZZ=1000000`` (as for the other NFs' fuzz tests) for a
million; ``S6_RANDOM=1`` for a fresh seed (printed on failure)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

from nf.base import Verdict
from nf.capture import read_capture
from nf.packet import DROP_REASONS
from tests.nf.ids.helpers import eth_raw, run_ids

FIXTURES = Path(__file__).parent / "fixtures"
FRAMES = int(os.environ.get("S6_NF_FUZZ", os.environ.get("S6_FUZZ_FRAMES", "50000")))
SEED = random.randrange(1 << 30) if os.environ.get("S6_RANDOM") else 20261204

#: Payload pieces the rules look for, so that mutated frames reach deep into matching.
PIECES = [
    b"attack",
    b"/cgi-bin/phf",
    b"ABC",
    b"DEF",
    b"CMD",
    b" exec=",
    b"HELO",
    b"USER",
    b"\x90\x90\x90\x90/bin/sh",
    b"GET /",
    b"key=",
    b"admin",
    b"200 OK",
    b"ping",
]


def _ip_frame(rng: random.Random) -> bytes:
    """A well-formed Ethernet + IPv4 header with a random protocol, flags and payload."""
    proto = rng.choice([6, 6, 17, 17, 1, 47, rng.randrange(256)])
    body = bytearray()
    if proto == 6:
        body += struct.pack(
            "!HHIIBBHHH",
            rng.randrange(65536),
            rng.choice([80, 81, 82, 83, 8080, 21]),
            rng.randrange(1 << 32),
            rng.randrange(1 << 32),
            rng.choice([5, 6, 15, 3]) << 4,
            rng.randrange(256),
            1024,
            0,
            0,
        )
        body += bytes(rng.randrange(256) for _ in range(max(0, (body[12] >> 4) * 4 - 20)))
    elif proto == 17:
        body += struct.pack("!HHHH", rng.randrange(65536), rng.randrange(9000, 9040), 0, 0)
    elif proto == 1:
        body += bytes([rng.randrange(20), 0, 0, 0, 0, 1, 0, 1])
    for _ in range(rng.randrange(4)):
        body += rng.choice(PIECES) if rng.random() < 0.7 else rng.randbytes(rng.randrange(9))
    frag = rng.choice([0, 0, 0, 0x2000, 0x0010, rng.randrange(65536)])
    src = rng.choice([0x0A000001, 0x0A000002, 0x0A000009, 0xC0A80107, rng.randrange(1 << 32)])
    dst = rng.choice([0x0A000001, 0x0A000002, 0x0A090909, rng.randrange(1 << 32)])
    return eth_raw(proto, src, dst, bytes(body), frag)


def frames(count: int, seed: int) -> list[tuple[float, bytes]]:
    rng = random.Random(seed)
    base = [frame for _ts, frame in read_capture(str(FIXTURES / "cases.pcap"))]
    out: list[tuple[float, bytes]] = []
    t = 1_500_000_000.0
    for _ in range(count):
        kind = rng.random()
        if kind < 0.35:  # a real frame, mutated
            frame = bytearray(rng.choice(base))
            for _ in range(rng.randrange(1, 6)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            if rng.random() < 0.3:
                del frame[rng.randrange(len(frame)) :]
            if rng.random() < 0.2:
                frame += rng.randbytes(rng.randrange(40))
            data = bytes(frame)
        elif kind < 0.85:
            data = _ip_frame(rng)
            if rng.random() < 0.2:  # cut short
                data = data[: rng.randrange(len(data) + 1)]
        elif kind < 0.95:  # random bytes
            data = rng.randbytes(rng.randrange(80))
        else:  # other ethertypes and VLAN tags
            tag = rng.choice([b"\x86\xdd", b"\x81\x00\x00\x05\x08\x00", b"\x08\x06", b"\x81\x00"])
            data = b"\x02" * 12 + tag + rng.randbytes(rng.randrange(60))
        t += rng.choice([0.0, 0.001, 0.5, 3.0])
        out.append((t, data))
    return out


async def test_fuzzed_frames_are_all_counted() -> None:
    packets = frames(FRAMES, SEED)
    config = {"rules": str(FIXTURES / "cases.rules"), "whitelist": ["10.9.9.0/24"]}
    result = await run_ids(packets, config)
    counts = result.counts
    assert not [k for k in counts if k.startswith("nf-error")], (SEED, counts)
    assert counts["packets"] == FRAMES, SEED
    assert len(result.verdicts) == FRAMES
    assert set(result.verdicts) == {Verdict.FORWARD}
    accounted = sum(counts.get(r, 0) for r in DROP_REASONS) + sum(
        counts.get(k, 0) for k in ("inspected", "whitelisted", "fragment-not-inspected")
    )
    assert accounted == FRAMES, (SEED, counts)
    assert counts.get("alerts", 0) > 0 and counts.get("inspected", 0) > FRAMES // 3
