"""Random and mutated frames into PRADS.process: no exception, every frame counted.

``S6_FUZZ_FRAMES`` sets how many (default 20,000; a million for a long run),
``S6_FUZZ_SEED`` the seed (default fixed; ``random`` for a fresh one, printed)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import store
from nf.packet import parse
from nf.prads import PRADS
from tests.nf.prads.driver import load

FIXTURES = Path(__file__).parent / "fixtures"


def _seed() -> int:
    raw = os.environ.get("S6_FUZZ_SEED", "20261204")
    seed = random.randrange(2**32) if raw == "random" else int(raw)
    print(f"S6_FUZZ_SEED={seed}")
    return seed


def frames(n: int, rng: random.Random) -> list[bytes]:
    """Valid frames of the fixtures, mutated: bytes flipped (more often in the headers),
    cut short, grown, TCP option bytes replaced; and some frames of random bytes."""
    seeds = [
        f
        for name in ("sessions", "mixed", "udp", "syn")
        for _, f in load(FIXTURES / f"{name}.pcap")
    ]
    out: list[bytes] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            out.append(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120))))
            continue
        frame = bytearray(rng.choice(seeds))
        if r < 0.6:
            for _ in range(rng.randint(1, 6)):
                at = (
                    rng.randrange(min(len(frame), 80))
                    if rng.random() < 0.8
                    else rng.randrange(len(frame))
                )
                frame[at] = rng.getrandbits(8)
        elif r < 0.75:
            del frame[rng.randrange(len(frame)) :]
        elif r < 0.85:
            frame += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
        elif len(frame) > 54:
            # the TCP options (if any) replaced by random bytes of the same length
            for at in range(54, min(len(frame), 94)):
                frame[at] = rng.getrandbits(8)
        out.append(bytes(frame))
    return out


async def test_fuzzed_frames_are_counted_and_never_raise() -> None:
    n = int(os.environ.get("S6_FUZZ_FRAMES", "20000"))
    rng = random.Random(_seed())
    batch = frames(min(n, 50_000), rng)
    async with store.open_space() as space:
        nf = PRADS(space, {"ack": True})
        for i in range(n):
            frame = batch[i % len(batch)] if i < len(batch) else frames(1, rng)[0]
            packet = parse(frame, 1_500_000_000.0 + i * 0.001)
            unit = await space.submit(nf.flow_key(packet), nf.process, packet)
            await unit
            if i % 1000 == 0:
                await nf.tick(packet.ts)
        assert nf.counts["packets"] == n
        log = await nf.query("log")
        stats = await nf.query("statistics")
        assert stats["got_packets"] == n
        assert all(isinstance(line, str) for line in log)
