"""The project's main job, live: a cluster that scales out and in while traffic flows.

Run ``python -m bench.demo`` (``make demo``).  On this machine it starts, as real processes,
a controller (``python -m store.controller``) and two nodes (``python -m store.node``), then
joins them itself with an embedded member and plays an NF's client:

* it keeps 2,000 flows, each a ``SingleWriter`` object, and updates them at a steady
  20,000 operations a second (open loop: each operation has a scheduled arrival time and
  its latency is counted from then); a flow lives for 1 to 200 packets (100 on average),
  then it ends (its count is read back, then it is removed) and the next packet of its
  slot starts a new flow, so key records keep being created and removed on the nodes
  that own them; every 10th operation also
  bumps a shared ``MultiWriter`` tally (``@untethered``), every 100th makes a blocking
  call on a shared gauge;
* after a while it starts a third node process, which the controller admits automatically
  (a scale-out: key records move to the new node), and later it asks the controller to
  scale one node in (the node hands its key records over and exits by itself);
* every operation checks what it reads: ``on_packet`` returns the flow's packet count,
  which must be one more than the updates that succeeded before; a flow's count is read
  once more when it ends, and the shared totals at the end.

A status line shows the phase, the throughput and the latency while it runs; the summary
gives operations per second and p50/p99/max latency before, during and after each event,
the key records and objects each event moved, and the failed operations.  At the end the
client leaves the cluster gracefully, which moves every object it holds to the nodes, and
every process it started is stopped (also on Ctrl-C or an error).  It exits with status 1
if any operation failed or any of its processes failed.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bench.scaling import Flow, Gauge, Tally
from store.api import Space
from store.core.scheduler import SchedulerFull
from store.wire.control import parse_address

RATE = 20_000  # operations per second, offered
FLOWS = 2_000  # flows alive at any time
CHURN = 100  # packets a flow lives, on average
TALLIES = 4
PACKET = 64
WARMUP = 0.5  # seconds of load before the first window
PHASE = 2.0  # seconds of each steady window
TICK = 0.001  # the generator wakes once a millisecond and issues what is due
START_TIMEOUT = 20.0  # seconds a process has to print its first line
STOP_TIMEOUT = 10.0  # seconds a process has to exit once told to
ABORT_GRACE = 2.0  # the same, when the demo is interrupted or failed
ROOT = Path(__file__).resolve().parents[1]

clock = time.monotonic


class DemoError(Exception):
    """The demo could not go on (a process did not start, an event was refused...)."""


# -- the processes ---------------------------------------------------------------------


@dataclass
class Child:
    """A process this demo started."""

    label: str
    process: trio.Process
    log: Path
    first_line: str = ""
    stop_signal: int = signal.SIGTERM

    def alive(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:].strip()


class Processes:
    """Starts the controller and node processes and stops every one of them at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.secret_file = folder / "secret"
        self.secret = os.urandom(24).hex().encode()
        self.secret_file.write_bytes(self.secret)
        self.secret_file.chmod(0o600)
        self.children: list[Child] = []

    async def start(self, label: str, args: list[str], stop_signal: int) -> Child:
        """Start ``python -m ARGS``; return once it has printed its first line."""
        log = self.folder / f"{label}.log"
        with log.open("wb") as err:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", *args, "--secret-file", str(self.secret_file)],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        child = Child(label, process, log, stop_signal=stop_signal)
        self.children.append(child)
        assert process.stdout is not None
        buffer = b""
        with trio.move_on_after(START_TIMEOUT):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    break
                buffer += chunk
        if b"\n" not in buffer:
            raise DemoError(
                f"{label} did not start (no first line within {START_TIMEOUT:g} s)\n"
                f"{child.log_tail()}"
            )
        child.first_line = buffer.split(b"\n", 1)[0].decode().strip()
        return child

    async def controller(self) -> tuple[Child, str]:
        child = await self.start(
            "controller", ["store.controller", "--listen", "127.0.0.1:0"], signal.SIGINT
        )
        words = child.first_line.split()
        if words[:2] != ["listening", "on"]:
            raise DemoError(f"the controller said {child.first_line!r}")
        return child, words[2]

    async def node(self, label: str, controller: str) -> tuple[Child, str, int]:
        """A node process; its name and the epoch it was admitted at."""
        child = await self.start(label, ["store.node", "--controller", controller], signal.SIGTERM)
        words = child.first_line.split()  # node NAME admitted epoch E
        if len(words) != 5 or words[0] != "node" or words[2] != "admitted":
            raise DemoError(f"{label} said {child.first_line!r}\n{child.log_tail()}")
        return child, words[1], int(words[4])

    async def stop(self, child: Child, timeout: float = STOP_TIMEOUT) -> int:
        """Ask ``child`` to stop (its own graceful way), then kill it if it takes too long."""
        if child.alive():
            try:
                child.process.send_signal(child.stop_signal)
            except ProcessLookupError:
                pass
            with trio.move_on_after(timeout):
                await child.process.wait()
        if child.alive():
            child.process.kill()
            await child.process.wait()
        return child.process.returncode or 0

    async def stop_all(self, grace: float) -> None:
        """Stop every child still running: nodes first (they leave gracefully, handing what
        they hold to those still there), the controller last; kill what takes longer than
        ``grace`` seconds."""
        with trio.CancelScope(shield=True):
            nodes = [c for c in self.children if c.label != "controller" and c.alive()]
            async with trio.open_nursery() as nursery:
                for child in nodes:
                    nursery.start_soon(self.stop, child, grace)
            for child in self.children:
                await self.stop(child, grace)

    def kill_leftovers(self) -> None:
        """Last resort, outside trio: kill whatever still runs."""
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()


# -- the client ------------------------------------------------------------------------


@dataclass
class Window:
    """Operations per second and latency of the operations that arrived in one window."""

    name: str
    lo: float
    hi: float
    stats: dict[str, Any] = field(default_factory=dict)


class Client:
    """The NF's side: flows updated at a steady rate on this process's embedded member."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self.flows = space.map("flows", Flow)
        self.tallies = space.map("tallies", Tally)
        self.gauges = space.map("gauges", Gauge)
        self.generation = [0] * FLOWS  # the flow of slot i is ("demo", i, generation[i])
        self.lifetimes = random.Random("demo-flows")
        self.left = [self.lifetimes.randint(1, 2 * CHURN) for _ in range(FLOWS)]
        self.expected: dict[Any, int] = {}  # packets counted so far, per live flow
        self.done = array("d")  # when each operation ended
        self.latency = array("d")  # and how long after its scheduled arrival
        self.failures: list[str] = []
        self.failed = 0
        self.ops = 0
        self.bumps = 0
        self.adds = 0
        self.flows_ended = 0
        self.rate = 0.0
        self.t0 = 0.0
        self.issued = 0

    def _fail(self, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 10:
            self.failures.append(what[:300])

    def _record(self, arrival: float) -> None:
        end = clock()
        self.done.append(end)
        self.latency.append(end - arrival)

    async def setup(self) -> None:
        for i in range(TALLIES):
            async with self.tallies.create(f"tally-{i}"):
                pass
        async with self.gauges.create("gauge"):
            pass

    async def packet(self, key: Any, arrival: float) -> None:
        """One operation on a live flow (a microthread)."""
        try:
            async with self.flows.create(key) as ref:
                count = await ref.on_packet(PACKET)
            seen = self.expected.get(key, 0) + 1
            self.expected[key] = seen
            if count != seen:
                self._fail(f"flow {key}: count {count} after {seen} updates")
            self.ops += 1
            n = self.ops
            if n % 10 == 0:
                async with self.tallies.get(f"tally-{n // 10 % TALLIES}") as tally:
                    await tally.bump(1)
                self.bumps += 1
            if n % 100 == 0:
                async with self.gauges.get("gauge") as gauge:
                    await gauge.add(1)
                self.adds += 1
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        self._record(arrival)

    async def end_flow(self, key: Any, arrival: float) -> None:
        """The flow ends: its count is read back once more, then it is removed."""
        try:
            async with self.flows.get(key) as ref:
                count = await ref.count()
            want = self.expected.pop(key, 0)
            if count != want:
                self._fail(f"flow {key} ended with count {count}, expected {want}")
            if not await self.flows.remove(key):
                self._fail(f"flow {key} was gone before its removal")
            self.flows_ended += 1
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        self._record(arrival)

    async def pace(self) -> None:
        """Operations at their scheduled times, round robin over the slots, open loop."""
        self.t0 = clock()
        self.rate = RATE
        while True:
            now = clock()
            due = int((now - self.t0) * self.rate) - self.issued
            for _ in range(max(0, min(due, 1000))):
                arrival = self.t0 + self.issued / self.rate
                self.issued += 1
                slot = self.issued % FLOWS
                key = ("demo", slot, self.generation[slot])
                self.left[slot] -= 1
                if self.left[slot] < 0:  # the flow is over: the slot's next packet starts one
                    self.generation[slot] += 1
                    self.left[slot] = self.lifetimes.randint(1, 2 * CHURN - 1)
                    await self._submit(key, self.end_flow, arrival)
                else:
                    await self._submit(key, self.packet, arrival)
            await trio.sleep(0 if due > 1000 else TICK)

    async def _submit(self, key: Any, fn: Callable[..., Any], arrival: float) -> None:
        try:
            self.space.submit_nowait(key, fn, key, arrival)
        except SchedulerFull:
            await self.space.submit(key, fn, key, arrival)

    async def finish(self) -> dict[str, Any]:
        """Wait for the operations in flight, flush, and read every total back."""
        scheduler = self.space.node.micro.scheduler
        with trio.move_on_after(10):
            while scheduler.in_flight:
                await trio.sleep(0.005)
        stuck = int(scheduler.in_flight)
        for _ in range(stuck):
            self._fail("an operation never finished")
        await self.space.flush()
        wrong = 0
        for key, want in self.expected.items():
            async with self.flows.get(key) as ref:
                if await ref.count() != want:
                    wrong += 1
        for _ in range(wrong):
            self._fail("a flow's count was wrong at the end")
        tallies = 0
        for i in range(TALLIES):
            async with self.tallies.get(f"tally-{i}") as tally:
                tallies += await tally.value()
        async with self.gauges.get("gauge") as gauge:
            total = await gauge.add(0)
        if tallies != self.bumps:
            self._fail(f"tallies hold {tallies}, {self.bumps} bumps succeeded")
        if total != self.adds:
            self._fail(f"the gauge holds {total}, {self.adds} adds succeeded")
        return {"flows_checked": len(self.expected), "tallies": tallies, "gauge": total}

    def recent(self, seconds: float = 1.0) -> dict[str, float]:
        """Throughput and latency of the operations that ended in the last ``seconds``
        (for the status line: about a millisecond, so that it does not show in them)."""
        import numpy as np

        start = bisect_left(self.done, clock() - seconds)
        # A copy: a view would stop the arrays from growing while it lives.
        lat = np.array(self.latency[start:], dtype=np.float64) * 1000
        if not lat.size:
            return {"ops_per_s": 0.0}
        p50, p99 = np.percentile(lat, (50, 99))
        return {
            "ops_per_s": lat.size / seconds,
            "p50_ms": float(p50),
            "p99_ms": float(p99),
            "max_ms": float(lat.max()),
        }

    def window(self, lo: float, hi: float) -> dict[str, Any]:
        """Figures of the operations that arrived in [lo, hi)."""
        import numpy as np

        done = np.array(self.done, dtype=np.float64)
        latency = np.array(self.latency, dtype=np.float64)
        arrival = done - latency
        inside = (arrival >= lo) & (arrival < hi)
        lat = latency[inside] * 1000
        seconds = max(hi - lo, 1e-9)
        completed = int(np.count_nonzero((done >= lo) & (done < hi)))
        out: dict[str, Any] = {"seconds": hi - lo, "ops_per_s": completed / seconds}
        if lat.size:
            out.update(
                p50_ms=float(np.percentile(lat, 50)),
                p99_ms=float(np.percentile(lat, 99)),
                max_ms=float(lat.max()),
                operations=int(lat.size),
            )
        return out


# -- talking to the controller -----------------------------------------------------------


async def operator_request(
    controller: str, secret: bytes, kind: str, names: list[str], say: Callable[[str], None]
) -> Any:
    """What ``python -m store.ctl`` does, over an operator session of our own: "status"
    returns the cluster's status; "in"/"out" runs a scaling event, passes the controller's
    progress lines to ``say`` as they come, and returns its reply."""
    from store.cli.ctl import request_status
    from store.shell.transport import connect_peer
    from store.wire.control import ScaleProgress, ScaleReply, ScaleRequest

    host, port = parse_address(controller)
    async with connect_peer(host, port, secret=secret, name=f"demo-{os.getpid()}") as peer:
        if kind == "status":
            with trio.fail_after(10):
                return await request_status(peer)
        peer.send_nowait(ScaleRequest(1, kind, list(names)))
        with trio.fail_after(60):
            while True:
                for msg in await peer.receive():
                    if isinstance(msg, ScaleProgress):
                        say(f"[dim]controller:[/] {escape(msg.text)}")
                    elif isinstance(msg, ScaleReply):
                        if not msg.ok:
                            raise DemoError(f"scale-{kind} {msg.code}: {msg.text}")
                        return msg


async def event_status(
    controller: str, secret: bytes, epoch: int, say: Callable[[str], None]
) -> Any:
    """The cluster's status once the event of ``epoch`` is the last one finished."""
    with trio.fail_after(30):
        while True:
            status = await operator_request(controller, secret, "status", [], say)
            if status.last_event.get("epoch", 0) >= epoch:
                return status
            await trio.sleep(0.05)


# -- the demo ------------------------------------------------------------------------------


@dataclass
class Demo:
    console: Console
    phase: str = "starting"
    started: float = field(default_factory=clock)
    windows: list[Window] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    client: Client | None = None
    procs: Processes | None = None
    problems: list[str] = field(default_factory=list)
    stages: list[tuple[float, str, int]] = field(default_factory=list)  # this member's

    async def watch_stages(self, space: Space) -> None:
        """Note every stage this member goes through, and when."""
        last = ("", -1)
        while True:
            view = space.node.view
            now = (view.stage.value, view.epoch)
            if now != last:
                self.stages.append((clock(), *now))
                last = now
            await trio.sleep(0.001)

    def left_normal(self, since: float) -> float | None:
        """When this member first left NORMAL after ``since``."""
        return next((t for t, stage, _ in self.stages if t >= since and stage != "normal"), None)

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{clock() - self.started:6.2f} s[/]  {text}", highlight=False)

    def status_line(self) -> Text:
        line = Text(f"{clock() - self.started:6.2f} s  ", style="dim")
        line.append(f"{self.phase:<22}", style="bold cyan")
        client = self.client
        if client is not None and client.done:
            r = client.recent()
            line.append(f"  {r['ops_per_s']:>8,.0f} ops/s")
            if "p50_ms" in r:
                line.append(
                    f"   latency p50 {r['p50_ms']:6.2f}  p99 {r['p99_ms']:6.2f}  "
                    f"max {r['max_ms']:7.2f} ms"
                )
            view = client.space.node.view
            line.append(f"   epoch {view.epoch} {view.stage.value}", style="dim")
            style = "bold red" if client.failed else "green"
            line.append(f"   failed {client.failed}", style=style)
        return line


async def wait_for_stage(space: Space, epoch: int, timeout: float = 30.0) -> float:
    """Until this member is NORMAL on ``epoch`` or later; when it got there."""
    with trio.fail_after(timeout):
        while True:
            view = space.node.view
            if view.stage.value == "normal" and view.epoch >= epoch:
                return clock()
            await trio.sleep(0.002)


async def run_demo(demo: Demo, procs: Processes, live: Live) -> None:
    from store.space import open_space

    say = demo.say
    controller_child, controller = await procs.controller()
    say(f"controller process {controller_child.process.pid} listening on {controller}")
    async with trio.open_nursery() as starting:
        for label in ("node 1", "node 2"):
            starting.start_soon(start_node, demo, procs, label, controller)
    async with open_space(controller=controller, secret=procs.secret) as space:
        say(
            f"this process joined as member {space.name} "
            f"(epoch {space.node.view.epoch}); creating the shared objects"
        )
        client = Client(space)
        await client.setup()
        demo.client = client
        async with trio.open_nursery() as nursery:

            async def refresh() -> None:
                while True:
                    live.update(demo.status_line(), refresh=True)
                    await trio.sleep(0.2)

            nursery.start_soon(refresh)
            nursery.start_soon(demo.watch_stages, space)
            nursery.start_soon(client.pace)
            say(f"traffic: {RATE:,} ops/s over {FLOWS:,} flows of {CHURN} packets on average")
            demo.phase = "warming up"
            await trio.sleep(WARMUP)
            await steady(demo, "before scale-out", PHASE)

            demo.phase = "scale-out"
            lo = clock()
            _, _, epoch = await start_node(demo, procs, "node 3", controller)
            hi = await wait_for_stage(space, epoch)
            status = await event_status(controller, procs.secret, epoch, demo.say)
            begun = demo.left_normal(lo) or lo
            demo.windows.append(Window("node 3 starting", lo, begun))
            demo.windows.append(Window("during scale-out", begun, hi))
            demo.events.append(event_row("scale-out: node 3 joins", status.last_event, lo, hi))
            say(
                f"scale-out done: every member NORMAL on epoch {epoch}, "
                f"{summary_text(status.last_event)}"
            )
            await steady(demo, "after scale-out", PHASE)

            demo.phase = "scale-in"
            leaving = node_names(procs)["node 1"]
            say(f"asking the controller to scale in node 1 ({leaving})")
            lo = clock()
            reply = await operator_request(controller, procs.secret, "in", [leaving], demo.say)
            hi = clock()
            demo.windows.append(Window("during scale-in", lo, hi))
            demo.events.append(event_row("scale-in: node 1 leaves", reply.summary, lo, hi))
            node1 = next(c for c in procs.children if c.label == "node 1")
            with trio.move_on_after(STOP_TIMEOUT):
                await node1.process.wait()
            code = node1.process.returncode
            say(f"scale-in done: {summary_text(reply.summary)}; node 1 exited with status {code}")
            if code != 0:
                demo.problems.append(f"node 1 exited with status {code} after its scale-in")
            await steady(demo, "after scale-in", PHASE)

            demo.phase = "checking"
            client.rate = 0.0
            nursery.cancel_scope.cancel()
        check = await client.finish()
        for w in demo.windows:
            w.stats = client.window(w.lo, w.hi)
        say(
            f"read back {check['flows_checked']:,} live flows, tallies {check['tallies']:,}, "
            f"gauge {check['gauge']:,}; {client.flows_ended:,} flows ended on the way"
        )
        demo.phase = "client leaves"
        live.update(demo.status_line(), refresh=True)
        lo = clock()
        epoch = space.node.view.epoch + 1
    hi = clock()
    status = await event_status(controller, procs.secret, epoch, demo.say)
    demo.events.append(event_row("this client's member leaves", status.last_event, lo, hi))
    say(f"the client's member left: {summary_text(status.last_event)}")


async def start_node(
    demo: Demo, procs: Processes, label: str, controller: str
) -> tuple[Child, str, int]:
    child, name, epoch = await procs.node(label, controller)
    demo.say(f"{label}: process {child.process.pid}, member {name}, admitted at epoch {epoch}")
    return child, name, epoch


def node_names(procs: Processes) -> dict[str, str]:
    return {c.label: c.first_line.split()[1] for c in procs.children if c.label != "controller"}


async def steady(demo: Demo, name: str, seconds: float) -> None:
    demo.phase = name
    lo = clock()
    await trio.sleep(seconds)
    demo.windows.append(Window(name, lo, clock()))


def event_row(name: str, summary: dict[str, Any], lo: float, hi: float) -> dict[str, Any]:
    return {"name": name, "summary": dict(summary), "seconds": hi - lo}


def summary_text(summary: dict[str, Any]) -> str:
    return (
        f"epoch {summary.get('epoch')}, {summary.get('members')} members, "
        f"{summary.get('records_moved', 0):,} key records and "
        f"{summary.get('objects_moved', 0):,} objects moved, "
        f"event {summary.get('duration_s')} s"
    )


def print_summary(demo: Demo) -> None:
    console = demo.console
    client = demo.client
    table = Table(title="Traffic through the events (latency from scheduled arrival)")
    for column in ("window", "s", "ops/s", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "window" else "right")
    order = [
        "before scale-out",
        "node 3 starting",
        "during scale-out",
        "after scale-out",
        "during scale-in",
        "after scale-in",
    ]
    by_name = {w.name: w for w in demo.windows}
    for name in order:
        w = by_name.get(name)
        if w is None:
            continue
        s = w.stats

        def cell(key: str, stats: dict[str, Any] = s) -> str:
            value = stats.get(key)
            return "-" if value is None or math.isnan(value) else f"{value:.2f}"

        table.add_row(
            name,
            f"{s['seconds']:.2f}",
            f"{s['ops_per_s']:,.0f}",
            cell("p50_ms"),
            cell("p99_ms"),
            cell("max_ms"),
        )
    table.caption = (
        "'during' a scale-out runs from this member leaving NORMAL until it is NORMAL on the "
        "new epoch (before it, the new node process starts up and registers); a scale-in, "
        "from the request until the controller's reply"
    )
    console.print(table)

    events = Table(title="The events (the controller's summaries)")
    for column in ("event", "epoch", "members", "key records moved", "objects moved", "took s"):
        events.add_column(column, justify="left" if column == "event" else "right")
    for e in demo.events:
        s = e["summary"]
        events.add_row(
            e["name"],
            str(s.get("epoch", "")),
            str(s.get("members", "")),
            f"{s.get('records_moved', 0):,}",
            f"{s.get('objects_moved', 0):,}",
            f"{s.get('duration_s', 0)} ({e['seconds']:.2f})",
        )
    events.caption = (
        "members: the nodes and this client's member; took: from the event's start to every "
        "member NORMAL (in brackets, as seen here: node start-up, or the wait for the "
        "controller's reply, included).  The nodes hold key records; objects stay with the "
        "member that writes them, so they move when this member leaves"
    )
    console.print(events)

    if client is not None:
        style = "bold green" if client.failed == 0 else "bold red"
        console.print(
            f"[{style}]failed operations: {client.failed}[/] of {client.issued:,} "
            f"({client.ops:,} updates, {client.flows_ended:,} flows ended, "
            f"{client.bumps:,} tally bumps, {client.adds:,} gauge adds)"
        )
        for failure in client.failures:
            console.print(f"  [red]{failure}[/]", highlight=False)
    if demo.procs is not None:
        children = demo.procs.children
        codes = ", ".join(f"{c.label} {c.process.returncode}" for c in children)
        console.print(f"processes started: {len(children)}, all stopped (exit statuses: {codes})")
    for problem in demo.problems:
        console.print(f"[bold red]problem:[/] {problem}", highlight=False)


async def main_async(demo: Demo, folder: Path) -> None:
    procs = Processes(folder)
    demo.procs = procs
    finished = False
    try:
        # Refreshed by a task of ours, not rich's thread: nothing runs beside the client.
        with Live(
            demo.status_line(), console=demo.console, auto_refresh=False, transient=True
        ) as live:
            await run_demo(demo, procs, live)
        finished = True
    finally:
        # After a clean run the nodes leave one by one and exit; after an error or Ctrl-C
        # this member may have vanished without leaving, and the nodes cannot leave
        # gracefully (the controller waits for it to come back): they get a short grace.
        demo.phase = "stopping the processes"
        await procs.stop_all(STOP_TIMEOUT if finished else ABORT_GRACE)
        for child in procs.children:
            code = child.process.returncode
            # A node told to stop leaves gracefully and exits 0; the controller exits 0
            # on SIGINT.  Anything else is worth a look at its log.
            if finished and code not in (0, None):
                demo.problems.append(
                    f"{child.label} exited with status {code}; its log:\n{child.log_tail()}"
                )


def main() -> int:
    # On a terminal rich fits the output to its width; into a pipe or a file, 120 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    demo = Demo(console)
    console.print(
        "[bold]S6 for Python: a controller and two node processes, this process as the "
        "client, a scale-out to three nodes and a scale-in back to two, under load[/]"
    )
    with tempfile.TemporaryDirectory(prefix="s6-demo-") as tmp:
        try:
            trio.run(main_async, demo, Path(tmp))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: every process it started is stopped[/]")
            return 130
        except DemoError as exc:
            console.print(f"[bold red]demo failed:[/] {exc}", highlight=False)
            return 1
        finally:
            if demo.procs is not None:
                demo.procs.kill_leftovers()
    print_summary(demo)
    client = demo.client
    if client is None or client.failed or demo.problems:
        return 1
    return 0


if __name__ == "__main__":
    # Run under the module's importable name, like the node processes will import it.
    from bench import demo as module

    sys.exit(module.main())
