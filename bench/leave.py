"""How long a member takes to leave (a graceful scale-in) by the number of objects it holds.

Run ``python -m bench.leave [--quick] [--sizes N,N,...] [--drain-rate R]
[--out results/leave.json]``.

Issue 9's goal: a member hands over its objects in bulk, in time linear in what it holds;
here, 200,000 objects in under 10 s.  For each size ``N``, from scratch:

1. a controller runs in this process (``store.shell.controller.open_controller``, with a
   fresh secret);
2. one ``python -m store.node`` process joins: it is the member that receives the objects;
3. the leaving member joins as a process of its own (``python -m bench._leave_member``),
   so that the two sides of the hand-over have their own cores, as in a real cluster.  It
   creates ``N`` SingleWriter objects (one small int field) under keys of its own making
   (a member holds the objects it creates) and says when every create has finished;
4. it is told to leave: it ends its ``open_space`` block, a graceful scale-in in which it
   hands over its key records and evacuates its objects to the node, and reports the
   seconds from the start of the leave to the end of the block (``leave s``);
5. checks: the node's ``objects_single`` figure (the controller's status request, as
   ``python -m store.ctl status`` shows it) must be ``N``, and a reader member joining
   from this process must read back a sample of the objects with their values.

Reported per size: leave seconds, objects per second, the leaving member's CPU seconds
during its leave (beside the leave seconds, it tells a hand-over bound by the member's core
from one paced by its ``drain_rate``, which ``--drain-rate`` sets), the receiving node's
CPU seconds meanwhile (what the hand-over costs the node whose packets it competes with;
read from ``/proc``, so Linux only), the controller's own duration of the scale-in event,
and the time the creates took; in full mode, whether 200,000 objects left in under 10 s.
Every process started is killed on exit, also on error.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from bench._common import RESULTS_DIR, write_json
from store.cli.common import OneLineParser
from store.shell.member import DEFAULT_DRAIN_RATE

FULL_SIZES = (10_000, 50_000, 100_000, 200_000)
QUICK_SIZES = (5_000, 20_000, 50_000)
GOAL_OBJECTS = 200_000
GOAL_SECONDS = 10.0
#: Objects the reader member reads back per size.
SAMPLE = 200


def cpu_seconds(pid: int) -> float | None:
    """The CPU seconds (user and system) process ``pid`` has used, or None where ``/proc``
    cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class BenchError(Exception):
    """A step failed; the message says which, with the tail of the process's stderr."""


class Child:
    """A process started by the bench, its stdout read line by line."""

    def __init__(self, label: str, process: trio.Process, stderr: Path) -> None:
        self.label = label
        self.process = process
        self.stderr = stderr
        self._buffer = b""

    @classmethod
    async def start(cls, label: str, args: list[str], folder: Path) -> Child:
        stderr = folder / f"{label}.stderr"
        with stderr.open("wb") as err:
            process = await trio.lowlevel.open_process(
                [sys.executable, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        return cls(label, process, stderr)

    async def line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        with trio.move_on_after(timeout):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(1 << 16)
                if not chunk:
                    raise BenchError(f"{self.label} ended before answering{self.tail()}")
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            return line.decode()
        raise BenchError(f"{self.label} did not answer within {timeout:g} s{self.tail()}")

    async def say(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")

    def tail(self) -> str:
        try:
            text = self.stderr.read_text(errors="replace")[-2000:]
        except OSError:
            return ""
        return f"\n--- stderr of {self.label} ---\n{text}" if text.strip() else ""

    async def kill(self) -> None:
        """Kill the process if it still runs, and reap it."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()


async def one_size(
    count: int, folder: Path, phase: Callable[[str], None], drain_rate: int | None = None
) -> dict[str, Any]:
    """Start a controller, a node and a member holding ``count`` objects; time its leave."""
    from bench._leave_member import Counter, key_of
    from store import open_space
    from store.shell.controller import open_controller

    secret = os.urandom(16).hex().encode()
    secret_file = folder / "secret"
    secret_file.write_bytes(secret)
    children: list[Child] = []
    row: dict[str, Any] = {"objects": count}
    async with open_controller("127.0.0.1:0", secret=secret) as controller:
        try:
            address = controller.address
            phase("a node joins")
            node = await Child.start(
                f"node-{count}",
                ["-m", "store.node", "--controller", address, "--secret-file", str(secret_file)],
                folder,
            )
            children.append(node)
            first = await node.line(30)
            if not first.startswith("node "):
                raise BenchError(f"the node said {first!r}{node.tail()}")
            node_name = first.split()[1]

            phase(f"the member joins and creates {count:,} objects")
            member = await Child.start(
                f"member-{count}",
                [
                    "-m",
                    "bench._leave_member",
                    "--controller",
                    address,
                    "--objects",
                    str(count),
                    "--secret-file",
                    str(secret_file),
                    *(["--drain-rate", str(drain_rate)] if drain_rate else []),
                ],
                folder,
            )
            children.append(member)
            ready = json.loads(await member.line(60 + count / 1000))
            if ready.get("created") != count:
                raise BenchError(
                    f"the member created {ready.get('created')} of {count} objects: "
                    f"{ready.get('failures')}{member.tail()}"
                )
            row["create_s"] = round(ready["create_s"], 3)

            phase(f"the member leaves with {count:,} objects")
            node_cpu = cpu_seconds(node.process.pid)
            started = time.perf_counter()
            await member.say("leave")
            left = json.loads(await member.line(120 + count / 1000))
            row["wall_s"] = round(time.perf_counter() - started, 3)
            node_cpu_after = cpu_seconds(node.process.pid)
            row["node_cpu_s"] = (
                None
                if node_cpu is None or node_cpu_after is None
                else round(node_cpu_after - node_cpu, 3)
            )
            row["leave_s"] = round(left["leave_s"], 3)
            row["objects_per_s"] = round(count / left["leave_s"])
            row["leave_cpu_s"] = round(left["leave_cpu_s"], 3)
            row["member_after"] = {k: v for k, v in left.items() if k not in ("left", "leave_s")}
            with trio.move_on_after(30):
                await member.process.wait()
            row["member_exit"] = member.process.returncode

            phase("checking the node's objects")
            status = await controller.collect_status(timeout=5.0)
            event = dict(status.last_event or {})
            row["event"] = {
                k: event.get(k) for k in ("kind", "epoch", "duration_s", "objects_moved")
            }
            figures = status.figures.get(node_name, {})
            row["node_objects_single"] = figures.get("objects_single")
            row["node_errors"] = figures.get("errors")

            phase(f"a reader reads back {SAMPLE} objects")
            step = max(1, count // SAMPLE)
            sample = list(range(0, count, step))[:SAMPLE]
            wrong = 0
            async with open_space(controller=address, secret=secret) as reader:
                counters = reader.map("counters", Counter)
                for i in sample:
                    async with counters.get(key_of(ready["name"], i)) as ref:
                        if await ref.value() != i:
                            wrong += 1
                # The node is the last member once the reader has gone: when it is killed
                # the controller reports it as lost, expected here.
                logging.getLogger("store.controller").setLevel(logging.ERROR)
            row["sample_read"] = len(sample)
            row["sample_wrong"] = wrong
            row["ok"] = (
                row["node_objects_single"] == count
                and wrong == 0
                and row["member_exit"] == 0
                and not row["node_errors"]
            )
            await node.kill()
        finally:
            for child in children:
                await child.kill()
    # (after the controller has closed: it notices the node's end a moment after the kill)
    logging.getLogger("store.controller").setLevel(logging.NOTSET)
    return row


async def run_all(
    sizes: Sequence[int], progress: Any, drain_rate: int | None = None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        async with trio.open_nursery() as nursery:
            # SIGTERM and SIGHUP end the run as an error does: every process started is
            # killed on the way out (SIGINT is trio's KeyboardInterrupt, which does the same).
            nursery.start_soon(stop_on_signal)
            await _run_all(sizes, progress, rows, drain_rate)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        bench_errors = group.subgroup(BenchError)
        if bench_errors is None:
            raise
        first = bench_errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group
    return rows


async def stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            raise BenchError(f"stopped by signal {signal.Signals(signum).name}")


async def _run_all(
    sizes: Sequence[int], progress: Any, rows: list[dict[str, Any]], drain_rate: int | None
) -> None:
    overall = progress.add_task("sizes", total=len(sizes))
    step = progress.add_task("", total=None)
    with tempfile.TemporaryDirectory(prefix="s6-leave-") as tmp:
        for count in sizes:
            progress.update(overall, description=f"{count:,} objects")

            def phase(text: str) -> None:
                progress.update(step, description=text)

            rows.append(await one_size(count, Path(tmp), phase, drain_rate))
            progress.advance(overall)


def judge(rows: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    goal: dict[str, Any] = {
        "text": f"{GOAL_OBJECTS:,} objects leave in under {GOAL_SECONDS:g} s",
        "checked": False,
    }
    at_goal = [r for r in rows if r["objects"] == GOAL_OBJECTS]
    if at_goal and not quick:
        goal.update(checked=True, seconds=at_goal[0]["leave_s"])
        goal["met"] = at_goal[0]["leave_s"] < GOAL_SECONDS
    small = min(rows, key=lambda r: r["objects"])
    per = small["leave_s"] / small["objects"]
    goal["linear_from_smallest_s"] = {str(r["objects"]): round(per * r["objects"], 3) for r in rows}
    goal["ratio_to_linear"] = {
        str(r["objects"]): round(r["leave_s"] / (per * r["objects"]), 2) for r in rows
    }
    return goal


def print_table(console: Any, rows: list[dict[str, Any]], goal: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="a member leaves: seconds by the objects it holds")
    names = (
        "objects",
        "leave s",
        "objects/s",
        "vs linear",
        "cpu s",
        "node cpu s",
        "event s",
        "create s",
        "check",
    )
    for name in names:
        table.add_column(name, justify="right")
    for r in rows:
        check = (
            "ok"
            if r["ok"]
            else (f"FAILED: node holds {r['node_objects_single']}, {r['sample_wrong']} wrong")
        )
        table.add_row(
            f"{r['objects']:,}",
            f"{r['leave_s']:.2f}",
            f"{r['objects_per_s']:,}",
            f"{goal['ratio_to_linear'][str(r['objects'])]:.2f}x",
            f"{r['leave_cpu_s']:.2f}",
            "-" if r.get("node_cpu_s") is None else f"{r['node_cpu_s']:.2f}",
            f"{r['event'].get('duration_s') or 0:.2f}",
            f"{r['create_s']:.2f}",
            check,
        )
    console.print(table)
    console.print(
        "leave s: the member's leave, from the start of the leave to the end of its "
        "open_space block; vs linear: against the smallest size scaled up; cpu s: the "
        "leaving member's CPU seconds during its leave; node cpu s: the receiving node's "
        "meanwhile; event s: the controller's duration "
        "of the scale-in event; check: the node holds every object "
        f"and a reader reads back {SAMPLE} of them",
        highlight=False,
    )
    if goal["checked"]:
        mark = "[green]met[/]" if goal["met"] else "[red]missed[/]"
        console.print(f"goal, {goal['text']}: {mark} ({goal['seconds']:.2f} s)")
    else:
        console.print(f"goal, {goal['text']}: not checked (full mode only)")


def plot(rows: list[dict[str, Any]], goal: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["objects"] for r in rows]
    ys = [r["leave_s"] for r in rows]
    small = min(rows, key=lambda r: r["objects"])
    per = small["leave_s"] / small["objects"]
    top = max(max(xs), GOAL_OBJECTS)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o-", color="#4c72b0", label="measured")
    ax.plot([0, top], [0, per * top], "--", color="#999999", label="linear from smallest")
    ax.plot([GOAL_OBJECTS], [GOAL_SECONDS], "*", color="#c44e52", markersize=12, label="goal")
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(f"{y:.2f} s", (x, y), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel("objects the leaving member holds")
    ax.set_ylabel("seconds to leave")
    ax.set_title("graceful scale-in of one member")
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, max(max(ys), GOAL_SECONDS, per * top) * 1.1)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "leave.json")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=None,
        metavar="N,N,...",
        help="objects held by the leaving member, one run each (default: by --quick)",
    )
    parser.add_argument(
        "--drain-rate",
        type=int,
        default=None,
        metavar="R",
        help="the leaving member's drain_rate, key records and objects handed on per second "
        "(records first; default: the store's, store.shell.member.DEFAULT_DRAIN_RATE)",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or list(QUICK_SIZES if args.quick else FULL_SIZES)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        try:
            rows = trio.run(run_all, sizes, progress, args.drain_rate)
        except BenchError as exc:
            console.print(f"[red]leave bench failed:[/] {exc}")
            return 1
    elapsed = time.perf_counter() - started
    goal = judge(rows, args.quick)
    print_table(console, rows, goal)
    config = {
        "quick": args.quick,
        "sizes": sizes,
        "objects": "SingleWriter, one int field, created and held by the leaving member",
        "processes": "controller in the bench; one store.node; the leaving member",
        "drain_rate": args.drain_rate or f"store default ({DEFAULT_DRAIN_RATE})",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    write_json(args.out, {"bench": "leave", "config": config, "goal": goal, "rows": rows})
    png = args.out.with_suffix(".png")
    plot(rows, goal, png)
    console.print(f"wrote {args.out} and {png} in {elapsed:.0f} s")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
