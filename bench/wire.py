"""What batching buys on the wire: codec cost per message, and messages/s over a websocket.

Run ``python -m bench.wire [--quick] [--out results/wire.json]``.

Three questions, each answered for one message per frame and for batches:

* **codec**: microseconds per message to encode and decode (``store.wire.messages``, with its
  validation) next to bare ``cbor2.dumps``/``loads`` of the same positional array (the
  cost of cbor itself, without our checks).  Batching amortises the per-call and per-frame
  overheads; validation and dataclass construction are per message and stay.
* **throughput**: messages/s from one :class:`~store.shell.transport.Peer` to another over one
  loopback websocket, counted when the *receiver* has decoded them all.  Both ends run in
  this one process and share one core, so the figure is the cost of sending *plus*
  receiving (as it is for a node that both sends and serves).  The sending patterns:

  - one message per frame: ``send_nowait`` then ``await flush()`` for every message;
  - batches of 64: 64 ``send_nowait`` calls, then ``await flush()``;
  - ``await send()`` per message: a producer that yields after every message, so the
    writer wakes after every one or two; batches only grow when the socket itself pushes
    back, which a loopback socket rarely does;
  - bursts: ``send_nowait`` with a checkpoint every 64 messages, without waiting for the
    writer (how the node queues replies while it works through a batch of packets);
  - everything queued at once: the writer's largest frames (up to ``BATCH_BYTES``).
* **latency**: round-trip time of one message through an echoing peer on an idle link,
  which shows that batching does not delay a lone message.

The message is a typical key-layer request: map name, a 5-tuple flow key, epoch, hop
count and a 32-byte payload (about 70 bytes encoded).
"""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import trio
from rich.console import Console
from rich.table import Table

from bench._common import RESULTS_DIR, flow_keys, write_json
from store.cli.common import OneLineParser
from store.shell.transport import Peer, PeerServer, connect_peer, serve_peers
from store.wire.messages import Key, decode_batch, encode_batch, encode_message, message
from store.wire.messages import frame_from_encoded as join_frame

SECRET = b"bench secret"
BATCH = 64

# The sending patterns compared (see run_mode).
ONE = "one per frame (flush each)"
BATCHES = f"batches of {BATCH} (flush each)"
SEND_EACH = "await send() per message"
BURSTS = f"send_nowait, yield every {BATCH}"
ALL = "send_nowait all, no yield"


@message("bench:request")
@dataclass(frozen=True, slots=True)
class Request:
    """Shaped like a key-layer request: what most wire traffic will be."""

    map_name: str
    key: Key
    epoch: int
    hops: int
    payload: bytes


@message("bench:ping")
@dataclass(frozen=True, slots=True)
class Ping:
    """Echoed back by the bench server, for round-trip times."""

    seq: int


def sample_messages(count: int) -> list[Request]:
    payload = bytes(range(32))
    return [Request("conns", key, 3, 0, payload) for key in flow_keys(count, seed=7)]


# --- codec ------------------------------------------------------------------------------


def per_message_us(fn: Callable[[], object], messages_per_call: int, seconds: float) -> float:
    """Best of 5 timed runs, in microseconds per message (the minimum is the least noisy
    estimate on a shared machine: noise only ever adds time)."""
    calls = 1
    while True:  # calibrate: enough calls for about seconds/5 per run
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start > seconds / 10:
            break
        calls *= 2
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / calls / messages_per_call * 1e6


def bench_codec(seconds: float) -> list[dict[str, Any]]:
    msgs = sample_messages(BATCH)
    one = msgs[0]
    raw_one = ["bench:request", one.map_name, one.key, one.epoch, one.hops, one.payload]
    raw_batch = [["bench:request", m.map_name, m.key, m.epoch, m.hops, m.payload] for m in msgs]
    frame_one = encode_batch([one])
    frame_batch = encode_batch(msgs)
    gc.collect()
    rows = []

    def row(name: str, per_frame: int, size: int, fn: Callable[[], object]) -> None:
        rows.append(
            {
                "what": name,
                "messages_per_frame": per_frame,
                "bytes_per_message": round(size / per_frame, 1),
                "us_per_message": round(per_message_us(fn, per_frame, seconds), 3),
            }
        )

    row(
        "cbor2 dumps+loads (bare)",
        1,
        len(cbor2.dumps(raw_one)),
        lambda: cbor2.loads(cbor2.dumps(raw_one)),
    )
    row(
        "cbor2 dumps+loads (bare)",
        BATCH,
        len(cbor2.dumps(raw_batch)),
        lambda: cbor2.loads(cbor2.dumps(raw_batch)),
    )
    row("encode_batch", 1, len(frame_one), lambda: encode_batch([one]))
    row("encode_batch", BATCH, len(frame_batch), lambda: encode_batch(msgs))
    row(
        "encode_message + join (Peer's path)",
        BATCH,
        len(frame_batch),
        lambda: join_frame([encode_message(m) for m in msgs]),
    )
    row("decode_batch (validating)", 1, len(frame_one), lambda: decode_batch(frame_one))
    row("decode_batch (validating)", BATCH, len(frame_batch), lambda: decode_batch(frame_batch))
    row("encode + decode", 1, len(frame_one), lambda: decode_batch(encode_batch([one])))
    row("encode + decode", BATCH, len(frame_batch), lambda: decode_batch(encode_batch(msgs)))
    return rows


# --- over a websocket -------------------------------------------------------------------


class Sink:
    """The receiving end's tally; the sender waits on ``done``."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done = trio.Event()


async def bench_server_handler(sink: Sink, peer: Peer) -> None:
    async for batch in peer:
        if isinstance(batch[0], Ping):
            for msg in batch:
                peer.send_nowait(msg)
            continue
        sink.count += len(batch)
        if sink.count >= sink.target:
            sink.done.set()


async def run_mode(peer: Peer, sink: Sink, mode: str, count: int) -> dict[str, Any]:
    msgs = sample_messages(1000)
    sink.reset(count)
    before = peer.statistics()
    start = time.perf_counter()
    if mode == ONE:
        for i in range(count):
            peer.send_nowait(msgs[i % 1000])
            await peer.flush()
    elif mode == BATCHES:
        for i in range(0, count, BATCH):
            for j in range(i, min(i + BATCH, count)):
                peer.send_nowait(msgs[j % 1000])
            await peer.flush()
    elif mode == SEND_EACH:
        for i in range(count):
            await peer.send(msgs[i % 1000])
    elif mode == BURSTS:
        for i in range(count):
            peer.send_nowait(msgs[i % 1000])
            if i % BATCH == BATCH - 1:
                await trio.lowlevel.checkpoint()
    else:
        for i in range(count):
            peer.send_nowait(msgs[i % 1000])
    await sink.done.wait()
    elapsed = time.perf_counter() - start
    after = peer.statistics()
    frames = after.frames_sent - before.frames_sent
    sent_bytes = after.bytes_sent - before.bytes_sent
    return {
        "mode": mode,
        "messages": count,
        "frames": frames,
        "messages_per_frame": round(count / frames, 1),
        "seconds": round(elapsed, 4),
        "messages_per_s": round(count / elapsed),
        "MB_per_s": round(sent_bytes / elapsed / 1e6, 2),
        "us_per_message": round(elapsed / count * 1e6, 2),
    }


async def round_trips(peer: Peer, samples: int) -> dict[str, Any]:
    times = []
    for seq in range(samples):
        start = time.perf_counter()
        peer.send_nowait(Ping(seq))
        got = await peer.receive()
        times.append(time.perf_counter() - start)
        assert got == [Ping(seq)], got
    times.sort()
    return {
        "samples": samples,
        "p50_us": round(statistics.median(times) * 1e6, 1),
        "p99_us": round(times[int(0.99 * (len(times) - 1))] * 1e6, 1),
    }


async def bench_websocket(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    small, large = (2_000, 20_000) if quick else (20_000, 200_000)
    counts = {ONE: small, BATCHES: large, SEND_EACH: small * 2, BURSTS: large, ALL: large}
    sink = Sink()
    rows = []
    async with trio.open_nursery() as nursery:
        server: PeerServer = await nursery.start(
            partial(
                serve_peers,
                partial(bench_server_handler, sink),
                "127.0.0.1",
                0,
                secret=SECRET,
                name="bench-server",
            )
        )
        async with connect_peer("127.0.0.1", server.port, secret=SECRET, name="bench") as peer:
            await run_mode(peer, sink, BATCHES, 2_000)  # warm up
            for mode, count in counts.items():
                gc.collect()
                rows.append(await run_mode(peer, sink, mode, count))
            rtt = await round_trips(peer, 300 if quick else 2_000)
        bad = server.statistics()
        assert bad.frames_malformed == bad.frames_unknown_type == 0, bad
        nursery.cancel_scope.cancel()
    return rows, rtt


# --- report -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "wire.json")
    args = parser.parse_args(argv)
    console = Console()

    codec = bench_codec(0.3 if args.quick else 1.5)
    table = Table(title="codec cost per message (best of 5)")
    for col in ("what", "msgs/frame", "bytes/msg", "µs/msg"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in codec:
        table.add_row(
            r["what"],
            str(r["messages_per_frame"]),
            f"{r['bytes_per_message']:.1f}",
            f"{r['us_per_message']:.2f}",
        )
    console.print(table)

    wire, rtt = trio.run(bench_websocket, args.quick)
    table = Table(title="one loopback websocket, sender and receiver in one process")
    for col in ("mode", "messages", "frames", "msgs/frame", "msgs/s", "MB/s", "µs/msg"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in wire:
        table.add_row(
            r["mode"],
            f"{r['messages']:,}",
            f"{r['frames']:,}",
            f"{r['messages_per_frame']:.1f}",
            f"{r['messages_per_s']:,}",
            f"{r['MB_per_s']:.2f}",
            f"{r['us_per_message']:.2f}",
        )
    console.print(table)
    console.print(
        f"idle round trip of one message: p50 {rtt['p50_us']:.0f} µs, "
        f"p99 {rtt['p99_us']:.0f} µs ({rtt['samples']} samples)"
    )

    write_json(
        args.out,
        {
            "benchmark": "wire",
            "quick": args.quick,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cbor2": getattr(cbor2, "__version__", "unknown"),
            "codec": codec,
            "websocket": wire,
            "round_trip": rtt,
        },
    )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
