"""A small loop that runs PRADS over frames on an embedded space of one or more members
(our own, so that the PRADS tests do not depend on the offline runner)."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import store
from nf.packet import parse
from nf.prads import PRADS
from ring.hashring import HashRing
from store.api import Space
from store.shell.node import open_node

SECRET = b"prads-test-secret-prads-test-secret"


@asynccontextmanager
async def spaces(n: int) -> AsyncIterator[list[Space]]:
    """``n`` members in this process: one embedded space, or ``n`` nodes on loopback
    sharing one ring."""
    if n == 1:
        async with store.open_space() as space:
            yield [space]
        return
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(open_node(listen="127.0.0.1:0", secret=SECRET))
            for _ in range(n)
        ]
        ring = HashRing([node.name for node in nodes])
        for node in nodes:
            node.set_ring(ring)
        yield [Space(node) for node in nodes]


def spread(key: Any, n: int, salt: int = 0) -> int:
    """Which member a flow goes to: a hash of its key (salted to change the spread)."""
    return zlib.crc32(repr((salt, key)).encode()) % n


async def run(
    frames: Sequence[tuple[float, bytes]],
    config: dict[str, Any] | None = None,
    *,
    instances: int = 1,
    salt: int = 0,
    switch_every: int | None = None,
    query: str = "log",
) -> tuple[Any, list[PRADS]]:
    """Run PRADS over ``frames`` on ``instances`` members (flows spread by a hash, whose
    salt changes every ``switch_every`` frames: flows move) and answer ``query`` on the
    first member."""
    async with spaces(instances) as members:
        nfs = [PRADS(space, dict(config or {})) for space in members]
        for i, (ts, frame) in enumerate(frames):
            packet = parse(frame, ts)
            key = nfs[0].flow_key(packet)
            s = salt if switch_every is None else salt + i // switch_every
            k = spread(key, instances, s)
            unit = await members[k].submit(key, nfs[k].process, packet)
            await unit
            for nf in nfs:
                await nf.tick(ts)
        for nf in nfs:
            await nf.close()
        for space in members:
            await space.flush()
        answer = await nfs[0].query(query)
        return answer, nfs


def load(path: Path) -> list[tuple[float, bytes]]:
    from tests.nf.prads.frames import read_pcap

    return read_pcap(str(path))
