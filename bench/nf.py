"""What the object space costs an NF: each NF over the same capture on one store instance
and on plain dicts, in the same run.

``python -m bench.nf [--quick] [--flows N] [--seed S] [--repeats R] [--nf NAME ...]``

1. makes a capture with ``bench.traffic`` (``--flows`` flows, seeded) and holds it in memory;
2. times parsing alone (``nf.packet.parse`` of every frame);
3. for each installed NF, runs it over the capture with the offline runner
   (``nf.runner.run_capture``, output query skipped) on an embedded single-node space and on
   ``nf.dicts.DictSpace`` (the same NF code on plain dicts), alternating, ``--repeats``
   times each, and keeps the best of each (the machine is shared: the best run is the one
   least disturbed);
4. prints a table (µs per packet on the store and on dicts, the difference, the ratio of
   throughputs, packets per second, and packets per second of CPU time on the store), NAT
   connections made and removed per second, and what one access to a flow's object costs
   through a reference, in place (``Map.local``) and on a dict; and writes
   ``results/nf.json`` and ``results/nf.png``.

The NAT runs with ``inside = 10.0.0.0/16`` (the capture's clients), so its replies are
translated too.  The store's figure includes everything the runner does per packet
(parsing, the flow hash, the microthread, the verdict); so does the dicts' figure, so their
difference is the store's.
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import sys
import time
from typing import Any

import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench._common import RESULTS_DIR, write_json
from bench.traffic import make
from nf import registry
from nf.packet import parse
from nf.runner import run_capture
from store.cli.common import OneLineParser

__all__ = ["main"]

#: The long-flows capture: flows, packets each.
LONG = (200, 100)

CONFIGS: dict[str, dict[str, Any]] = {
    "nat": {"inside": ["10.0.0.0/16"]},
}


def time_parse(packets: list[tuple[float, bytes]], repeats: int) -> float:
    """Best seconds to parse every frame."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for ts, frame in packets:
            parse(frame, ts)
        best = min(best, time.perf_counter() - started)
    return best


def one_run(nf_cls: Any, config: dict[str, Any], packets: Any, dicts: bool) -> Any:
    gc.collect()
    return trio.run(lambda: run_capture(nf_cls, dict(config), packets, output=False, dicts=dicts))


def long_flows(flows: int, per_flow: int) -> list[tuple[float, bytes]]:
    """``flows`` established TCP connections taking turns, ``per_flow`` packets each (the
    first a SYN): the cost of a packet of a flow whose state exists."""
    from bench.traffic import tcp_frame
    from nf.packet import ACK, PSH, SYN

    server = 0xC6336401
    out: list[tuple[float, bytes]] = []
    ts = 1_700_000_000.0
    for n in range(per_flow):
        for f in range(flows):
            ts += 0.0001
            client, port = 0x0A000001 + f, 30000 + f
            if n == 0:
                out.append((ts, tcp_frame(client, server, port, 80, SYN)))
            elif n % 2:
                out.append((ts, tcp_frame(client, server, port, 80, PSH | ACK, b"x" * 200)))
            else:
                frame = tcp_frame(server, client, 80, port, ACK, b"y" * 1000, outbound=False)
                out.append((ts, frame))
    return out


def measure(
    name: str,
    packets: list[tuple[float, bytes]],
    repeats: int,
    advance: Any,
    traffic: str = "mixed",
) -> dict[str, Any]:
    nf_cls = registry.load(name)
    config = CONFIGS.get(name, {})
    best = {"store": float("inf"), "dicts": float("inf")}
    cpu = {"store": float("inf"), "dicts": float("inf")}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for kind in ("store", "dicts"):
            result = one_run(nf_cls, config, packets, kind == "dicts")
            best[kind] = min(best[kind], result.seconds)
            cpu[kind] = min(cpu[kind], result.cpu_seconds)
            if kind == "store":
                counts = result.counts
            advance()
    n = len(packets)
    store_us = best["store"] / n * 1e6
    dicts_us = best["dicts"] / n * 1e6
    return {
        "nf": name,
        "traffic": traffic,
        "config": config,
        "packets": n,
        "store_us_per_packet": round(store_us, 2),
        "dicts_us_per_packet": round(dicts_us, 2),
        "store_added_us": round(store_us - dicts_us, 2),
        "throughput_ratio": round(dicts_us / store_us, 3),
        "store_packets_per_s": round(n / best["store"]),
        "dicts_packets_per_s": round(n / best["dicts"]),
        # The same from the CPU time of the runs (best of each): what one core does when
        # other processes share the machine.
        "store_cpu_us_per_packet": round(cpu["store"] / n * 1e6, 2),
        "dicts_cpu_us_per_packet": round(cpu["dicts"] / n * 1e6, 2),
        "store_cpu_packets_per_s": round(n / cpu["store"]) if cpu["store"] > 0 else None,
        "dicts_cpu_packets_per_s": round(n / cpu["dicts"]) if cpu["dicts"] > 0 else None,
        "counts": counts,
    }


def connections(count: int) -> list[tuple[float, bytes]]:
    """``count`` short TCP connections, one after another, as a capture taken inside:
    SYN, SYN-ACK, ACK, RST (each a new NAT translation, made and removed)."""
    from bench.traffic import tcp_frame
    from nf.packet import ACK, RST, SYN

    server = 0xC6336401  # 198.51.100.1
    out: list[tuple[float, bytes]] = []
    ts = 1_700_000_000.0
    for i in range(count):
        client, port = 0x0A000001 + i % 1000, 20000 + i // 1000
        for src, dst, sport, dport, flags in (
            (client, server, port, 80, SYN),
            (server, client, 80, port, SYN | ACK),
            (client, server, port, 80, ACK),
            (client, server, port, 80, RST),
        ):
            ts += 0.0001
            out.append((ts, tcp_frame(src, dst, sport, dport, flags, outbound=src == client)))
    return out


def new_flows(count: int, repeats: int, advance: Any) -> dict[str, Any]:
    """New NAT connections per second on dicts, and on 1 and 2 members of one process with
    the sharded pool (ours) and with one SingleWriter pool (the paper's)."""
    nf_cls = registry.load("nat")
    packets = connections(count)
    base = {"inside": ["10.0.0.0/8"]}
    single = {**base, "pool": "single"}
    best: dict[str, float] = {}
    for _ in range(repeats):
        for label, instances, dicts, config in (
            ("dicts", 1, True, base),
            ("1 member", 1, False, base),
            ("2 members", 2, False, base),
            ("1 member, single pool", 1, False, single),
            ("2 members, single pool", 2, False, single),
        ):
            gc.collect()
            run = functools.partial(
                run_capture, nf_cls, dict(config), packets, instances=instances,
                output=False, dicts=dicts,
            )  # fmt: skip
            result = trio.run(run)
            best[label] = min(best.get(label, float("inf")), result.seconds)
            advance()
    return {
        "connections": count,
        "packets_per_connection": 4,
        "connections_per_s": {k: round(count / v) for k, v in best.items()},
        "us_per_connection": {k: round(v / count * 1e6, 1) for k, v in best.items()},
    }


class _Flow:
    """The per-flow object of :func:`access_costs` (made a SingleWriter there)."""

    def __init__(self) -> None:
        self.n = 0

    def hit(self, k: int) -> int:
        self.n += k
        return self.n


async def _access_costs(count: int, repeats: int) -> dict[str, float]:
    import store

    flow_cls = type("Flow", (_Flow, store.SingleWriter), {"__module__": __name__})
    out: dict[str, float] = {}
    async with store.open_space() as space:
        flows: Any = space.map("bench.flows", flow_cls)
        async with flows.create(1) as ref:
            await ref.hit(1)
        local, table = flows.local, {1: flow_cls()}

        async def through_reference() -> None:
            for _ in range(count):
                async with flows.get(1) as ref:
                    await ref.hit(1)

        async def in_place() -> None:
            for _ in range(count):
                obj = local(1)
                assert obj is not None
                obj.hit(1)

        async def plain_dict() -> None:
            for _ in range(count):
                table[1].hit(1)

        for label, fn in (
            ("reference", through_reference),
            ("in_place", in_place),
            ("dict", plain_dict),
        ):
            best = float("inf")
            for _ in range(repeats):
                started = time.process_time()
                await fn()
                best = min(best, time.process_time() - started)
            out[label] = round(best / count * 1e9)
    return out


def access_costs(count: int = 200_000, repeats: int = 5) -> dict[str, float]:
    """CPU ns for one access to a single-writer object held here with one method call:
    through a reference (``async with flows.get(k) as ref: await ref.hit(1)``), in place
    (``flows.local(k).hit(1)``), and on a plain dict; best of ``repeats``."""
    return trio.run(_access_costs, count, repeats)


def plot(rows: list[dict[str, Any]], parse_us: float, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("mixed", "long") if any(r["traffic"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        mine = [r for r in rows if r["traffic"] == kind]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["dicts_us_per_packet"] for r in mine], 0.4, label="dicts")
        ax.bar([x + 0.2 for x in xs], [r["store_us_per_packet"] for r in mine], 0.4, label="store")
        ax.axhline(parse_us, color="grey", linestyle=":", label=f"parsing ({parse_us:.1f} µs)")
        for x, r in zip(xs, mine, strict=True):
            ax.text(
                x + 0.2, r["store_us_per_packet"], f"{r['throughput_ratio']:.2f}", ha="center",
                va="bottom", fontsize=8,
            )  # fmt: skip
        ax.set_xticks(list(xs), [r["nf"] for r in mine])
        ax.set_ylabel("µs per packet (best run)")
        ax.set_title(f"{kind} traffic (label: store/dicts throughput)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("One instance: the object space against the same NF on plain dicts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.nf", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small capture, one repeat")
    parser.add_argument("--flows", type=int, help="flows in the capture (3000; --quick 400)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="runs of each kind (3; --quick 1)")
    parser.add_argument("--nf", action="append", metavar="NAME", help="only these NFs")
    parser.add_argument(
        "--connections",
        type=int,
        help="NAT connections opened and closed for the new-flows figure (5000; --quick 1000;"
        " 0: skip)",
    )
    args = parser.parse_args(argv)
    flows = args.flows or (400 if args.quick else 3000)
    repeats = args.repeats or (1 if args.quick else 3)
    names = args.nf or registry.available()
    console = Console(stderr=True)
    unknown = [n for n in names if n not in registry.available()]
    if unknown:
        console.print(f"unknown NF(s): {', '.join(unknown)}; installed: {registry.available()}")
        return 2
    load_before = [round(x, 2) for x in os.getloadavg()]
    packets = make(flows, args.seed)
    steady = long_flows(*LONG)
    parse_s = time_parse(packets, repeats)
    parse_us = parse_s / len(packets) * 1e6
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        conns = args.connections if args.connections is not None else (1000 if args.quick else 5000)
        total = len(names) * repeats * 4 + (5 * repeats if conns and "nat" in names else 0)
        task = progress.add_task("runs", total=total)
        for name in names:
            progress.update(task, description=f"{name}")
            try:
                rows.append(measure(name, packets, repeats, lambda: progress.advance(task)))
                progress.update(task, description=f"{name}: long flows")
                rows.append(measure(name, steady, repeats, lambda: progress.advance(task), "long"))
            except Exception as exc:  # one NF that fails does not hide the others
                failures[name] = f"{type(exc).__name__}: {exc}"
                progress.advance(task, repeats * 4)
        churn: dict[str, Any] | None = None
        if conns and "nat" in names:
            progress.update(task, description="nat: new connections")
            churn = new_flows(conns, repeats, lambda: progress.advance(task))
        progress.update(task, description="one access: reference, in place, dict")
        access = access_costs(20_000 if args.quick else 200_000, repeats + 2)
    table = Table(
        title=f"mixed: {len(packets):,} packets ({flows:,} flows, seed {args.seed}); "
        f"long flows: {len(steady):,} packets ({LONG[0]} flows of {LONG[1]})"
    )
    columns = ["NF", "traffic", "store µs/pkt", "dicts µs/pkt", "store adds µs", "ratio"]
    for column in [*columns, "store pps", "dicts pps", "store pps (CPU)"]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["nf"],
            r["traffic"],
            f"{r['store_us_per_packet']:.2f}",
            f"{r['dicts_us_per_packet']:.2f}",
            f"{r['store_added_us']:+.2f}",
            f"{r['throughput_ratio']:.2f}",
            f"{r['store_packets_per_s']:,}",
            f"{r['dicts_packets_per_s']:,}",
            f"{r['store_cpu_packets_per_s'] or 0:,}",
        )
    Console().print(table)
    console.print(f"parsing alone: {parse_us:.2f} µs per packet")
    console.print(f"load average before and after: {load_before[0]} / {os.getloadavg()[0]:.2f}")
    if churn is not None:
        rates = ", ".join(
            f"{k} {v:,}/s ({churn['us_per_connection'][k]} µs)"
            for k, v in churn["connections_per_s"].items()
        )
        console.print(f"NAT connections made and removed (SYN, SYN-ACK, ACK, RST): {rates}")
    console.print(
        "one access to a single-writer object held here, one method call (CPU ns): "
        f"through a reference {access['reference']:,.0f}, in place (Map.local) "
        f"{access['in_place']:,.0f}, plain dict {access['dict']:,.0f}"
    )
    for name, why in failures.items():
        console.print(f"[red]{name} failed: {why}")
    data = {
        "benchmark": "nf",
        "command": "python -m bench.nf " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "flows": flows,
        "seed": args.seed,
        "repeats": repeats,
        "packets": len(packets),
        "parse_us_per_packet": round(parse_us, 2),
        "long_flows": {"flows": LONG[0], "packets_each": LONG[1], "packets": len(steady)},
        "rows": rows,
        "nat_connections": churn,
        "access_ns": access,
        "failures": failures,
    }
    write_json(RESULTS_DIR / "nf.json", data)
    if rows:
        plot(rows, parse_us, RESULTS_DIR / "nf.png")
    console.print(f"wrote {RESULTS_DIR / 'nf.json'} and {RESULTS_DIR / 'nf.png'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
