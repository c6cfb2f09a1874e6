"""CPU cost of moving SingleWriter objects between two nodes, without sockets or an event loop.

Run ``python -m bench.migration_cost [--quick] [--out results/migration_cost.json]``.

Why this exists: ``bench.scaling`` shows that when a load balancer moves half of 10,000 flows
to another member at once, the p99 latency during the event is set by the burst of about
5,000 migrations asked for within one packet gap.  This script measures what one migration
costs the two nodes' cores (``store.core.router.Router``: both layers) and the wire codec
(each batch of messages encoded and decoded as a frame, as the shell does), all in one
process with no trio and no socket, so that the figure is the floor a faster transport
could not go under.  Side by side, in the same run: a local access (a reference taken at
the node that holds the object, the packet path) for the ratio.

Each round creates ``N`` flow objects at node A, then node B takes a writable reference to
every one of them at once (B is each key's owner, as after a scale-out), the messages are
pumped between the two until every request is answered, and the time is divided by ``N``.
Reported: best and median of the rounds, for ``core`` (messages handed over as objects)
and ``core+codec`` (every batch through ``encode_batch``/``decode_batch``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, flow_keys, write_json
from ring.hashring import HashRing, key_token
from store.cli.common import OneLineParser
from store.core.instructions import (
    Acquire,
    Deliver,
    Flush,
    RegisterMap,
    Send,
    carry_out,
)
from store.core.objects import SingleWriter, info_of
from store.core.router import Router
from store.core.scheduler import Wait
from store.wire.messages import Message, decode_batch, encode_batch


class Flow(SingleWriter):
    """A small per-flow object, as the scaling bench's."""

    def __init__(self) -> None:
        self.packets = 0
        self.octets = 0

    def on_packet(self, size: int) -> None:
        self.packets += 1
        self.octets += size


class Driven:
    """A node's core with what a shell keeps: the messages it was told to send."""

    def __init__(self, name: str, ring: HashRing) -> None:
        self.core = Router(name, ring)
        self.outbox: dict[str, list[Message]] = {}
        self.run(RegisterMap("flows", info_of(Flow)))

    def run(self, stimulus: Any) -> None:
        carry_out(self.core.handle(stimulus, 0.0), self._keep)

    def _keep(self, send: Send) -> None:
        self.outbox.setdefault(send.to, []).extend(send.msgs)

    def acquire(self, key: Any, create: bool) -> Wait[Any]:
        wait: Wait[Any] = Wait(key)
        self.run(Acquire(("flows", key), create, wait))
        return wait

    def take_outbox(self) -> dict[str, list[Message]]:
        self.run(Flush())
        out, self.outbox = self.outbox, {}
        return out


def make_pair() -> tuple[Driven, Driven, HashRing]:
    ring = HashRing(["a", "b"])
    return Driven("a", ring), Driven("b", ring), ring


def pump(nodes: dict[str, Driven], codec: bool) -> None:
    """Deliver every queued batch, each as one frame when ``codec``, until all is quiet."""
    while True:
        moved = False
        for name, node in nodes.items():
            for dest, msgs in node.take_outbox().items():
                batch: list[Message] = list(decode_batch(encode_batch(msgs))) if codec else msgs
                nodes[dest].run(Deliver(name, batch))
                moved = True
        if not moved:
            return


def one_round(count: int, codec: bool, seed: int) -> tuple[float, float]:
    """Seconds per migration and per local access for ``count`` objects."""
    a, b, ring = make_pair()
    nodes = {"a": a, "b": b}
    keys = [k for k in flow_keys(count * 3, seed) if ring.owner(key_token("flows", k)) == "b"]
    keys = keys[:count]
    for key in keys:
        a.acquire(key, True)
    pump(nodes, codec)
    take_a, let_go_a = a.core.fast.take, a.core.fast.let_go
    for key in keys:  # the creating units are done: nobody holds a reference
        held = take_a(("flows", key), True)
        held.refs = 0
    start = time.perf_counter()
    waits = [b.acquire(key, False) for key in keys]
    pump(nodes, codec)
    migrate = (time.perf_counter() - start) / len(keys)
    assert all(w.done() for w in waits), "a migration was never answered"
    take, let_go = b.core.fast.take, b.core.fast.let_go
    start = time.perf_counter()
    for key in keys:  # what the API's fast path does for a local packet
        held = take(("flows", key), True)
        held.obj.on_packet(64)
        let_go(held)
    local = (time.perf_counter() - start) / len(keys)
    del let_go_a
    return migrate, local


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller rounds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "migration_cost.json")
    args = parser.parse_args(argv)
    count, rounds = (2_000, 3) if args.quick else (5_000, 7)
    result: dict[str, Any] = {"objects_per_round": count, "rounds": rounds}
    for label, codec in (("core", False), ("core+codec", True)):
        runs = [one_round(count, codec, seed) for seed in range(rounds)]
        per = sorted(m for m, _ in runs)
        local = sorted(lo for _, lo in runs)
        result[label] = {
            "migration_us_best": round(per[0] * 1e6, 2),
            "migration_us_median": round(statistics.median(per) * 1e6, 2),
            "local_access_us_best": round(local[0] * 1e6, 3),
            "ratio_best": round(per[0] / local[0], 1),
        }
        print(
            f"{label:>11}: {per[0] * 1e6:6.1f} µs per migration (median "
            f"{statistics.median(per) * 1e6:.1f}), {per[0] / local[0]:.0f}x a local access "
            f"({local[0] * 1e6:.2f} µs); 5,000 at once: {per[0] * 5000 * 1e3:.0f} ms of CPU"
        )
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["core", "core+codec"]
    values = [result[label]["migration_us_best"] for label in labels]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, values, color=["#4c72b0", "#dd8452"])
    ax.set_ylabel("µs of CPU per migration (best)")
    ax.set_title("SingleWriter migration, both nodes, no sockets")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
