"""Scaling under load: a scale-out from one member to two and a scale-in back to one, while
client traffic keeps flowing (the paper's §7.1, Figs. 6 and 7).

Run ``python -m bench.scaling [--quick] [--load F] [--limit N] [--steer-over S] [--freeze-gc]
[--out results/scaling.json]``.

The set-up follows the paper's synthetic NF.  A controller runs in this process; each of the
two members, A and B, is a process of its own (``--member``, driven by JSON lines on its
stdin and stdout) holding an embedded member of the space and generating its own traffic,
as an NF instance handles the packets a flow-hash load balancer sends it.  So the members
never share a CPU thread with each other or with the controller.

1. A joins alone, creates 10,000 ``SingleWriter`` flow objects and five shared
   ``MultiWriter`` ones (four mergeable tallies, one gauge), then measures how many
   operations a second it sustains in a closed loop (all state local).
2. Traffic starts at ``--load`` (default half) of that rate, open loop: each flow is due
   ``rate / 10,000`` times a second at fixed arrival times, and the generator wakes once a
   millisecond to issue what is due.  One operation is a ``create`` + ``on_packet`` of the
   flow's object; every 10th also bumps a tally (``@untethered``), every 100th makes a
   blocking call on the gauge.  Latency runs from the operation's scheduled arrival to its
   end (the paper's end-to-end packet latency): it includes the generator's tick and any
   queueing, not only the store's work.  ``--limit`` raises the number of microthreads a
   member keeps in flight before the generator has to wait (the store's default: 4096).
   ``--steer-over S`` makes the load balancer move the flows that change member one by one
   over S seconds instead of all at once (default 0, the paper's set-up): with all at once,
   about 5,000 migrations are asked for within one packet gap of a flow (about 50 ms).
   ``--freeze-gc`` has the members freeze the garbage collector's generations after each
   event (``open_space(freeze_gc=True)``; see ``store.shell.node.Node.enter_stage``).
3. **Scale-out**: B (started and imported beforehand) joins through the controller, which
   admits it automatically.  Once B is admitted, the load balancer sends B the flows whose
   key hashes to B on the two-member ring; B's first packet of each such flow pulls the
   flow's object from A (about half of them).
4. **Scale-in**: the load balancer sends every flow to A again and, at the same moment, B
   leaves gracefully (finishes its operations, flushes, asks the controller to scale it in,
   hands over its key records and evacuates the objects it still holds); A's packets for
   flows still on B pull them.
5. Both members stop, A reads every object back, and each count is checked against the
   operations that succeeded (each flow's packets, the tallies' and the gauge's totals).

Windows: *before* the scale-out (after a warm-up); *during* each event, from its start
(for the scale-in, from the steering change just before it) until every member is NORMAL
on the new epoch (the controller's log) and the last object has moved (to the 25 ms of the
members' sampling); *after* it.  Objects moved are counted by the members.  The scale-out's
share of objects moved counts distinct objects (the flows B handled by the end of the
time between the events: every object starts on A, so each one B handled came from A), shown
beside the share of flows steered to B; the migrations into B, which count an object each
time it arrives, are shown beside them.  The CPU that
other processes on the machine used meanwhile is shown beside the figures, since it is
taken from the members.

Goals: no failed operation; during each event p99 under 10 ms and max under 50 ms; key
space converged (event start to every member NORMAL) in under 2 s; at least 40% of the
SingleWriter objects (distinct objects) moved by the scale-out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import trio

from bench._common import RESULTS_DIR, flow_keys, write_json
from ring.hashring import DEFAULT_VNODES, HashRing
from store import MultiWriter, SingleWriter, stale, untethered
from store.api import Space
from store.cli.common import OneLineParser
from store.core.scheduler import SchedulerFull

FLOWS = 10_000
TALLIES = 4
PACKET = 64
BUCKET = 0.1  # seconds per point of the time series
SAMPLE = 0.025  # seconds between two samples of a member's counters
SECRET_ENV = "S6_BENCH_SECRET"
FREEZE_GC_ENV = "S6_BENCH_FREEZE_GC"  # set by --freeze-gc for the member processes
GOAL_P99_MS = 10.0
GOAL_MAX_MS = 50.0
GOAL_CONVERGE_S = 2.0
GOAL_MOVED_SHARE = 0.40
#: The offered load, as a fraction of the rate one member sustains (measured first).
LOAD = 0.5
#: CPUs taken by other processes above which the run is flagged as disturbed.
BUSY_MACHINE = 0.25
#: Seconds of each stage; "quick" keeps every step and shortens the waits.
SIZES = {
    "full": {"capacity": 2.0, "warmup": 1.0, "before": 2.0, "between": 3.0, "after": 2.0},
    "quick": {"capacity": 1.0, "warmup": 0.5, "before": 1.0, "between": 1.5, "after": 1.0},
}
#: Most operations the generator issues before it lets the node's own tasks run.
MAX_BATCH = 1000
#: The generator's tick: it wakes at most once a millisecond and issues what is due, as an
#: NF polls its NIC for a burst of packets (waking per packet would cost more than the
#: packet).
TICK = 0.001

clock = time.monotonic  # CLOCK_MONOTONIC on Linux: one time base for every process here


# -- the objects (imported by every member under this module's name) ----------------------


class Flow(SingleWriter):
    """Per-flow state, as an NF keeps it."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0

    def on_packet(self, size: int) -> int:
        self.packets += 1
        self.bytes += size
        return self.packets

    @stale(max_age=0.0)
    def count(self) -> int:
        return self.packets


class Tally(MultiWriter):
    """A shared counter updated without waiting; replicas merge into it."""

    def __init__(self) -> None:
        self.total = 0

    @untethered
    def bump(self, n: int) -> None:
        self.total += n

    def value(self) -> int:
        return self.total

    def merge(self, other: Tally) -> None:
        self.total += other.total


class Gauge(MultiWriter):
    """A shared value whose update answers (a blocking call wherever it lives)."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> int:
        self.total += n
        return self.total


# -- a member process ----------------------------------------------------------------------


class JsonLines:
    """JSON objects, one a line, over a pair of byte streams."""

    def __init__(self, send: Any, receive: Any) -> None:
        self._send = send
        self._receive = receive
        self._buffer = b""

    async def send(self, message: dict[str, Any]) -> None:
        await self._send.send_all(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = await self._receive.receive_some(1 << 20)
            if not chunk:
                raise EOFError("the other side closed its end")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message


class Recorder:
    """Per-operation figures of one process: scheduled arrival, end-to-end latency and
    service time (from submission), in seconds, plus the failures with their arrival."""

    def __init__(self) -> None:
        self.arrival = array("d")
        self.latency = array("d")
        self.service = array("d")
        self.failed = 0
        self.failures: list[tuple[float, str]] = []

    def fail(self, arrival: float, exc: BaseException) -> None:
        self.failed += 1
        if len(self.failures) < 50:
            self.failures.append((arrival, f"{type(exc).__name__}: {exc}"[:300]))

    def clear(self) -> None:
        for values in (self.arrival, self.latency, self.service):
            del values[:]

    def save(self, folder: Path, label: str) -> dict[str, str]:
        paths = {}
        for name in ("arrival", "latency", "service"):
            path = folder / f"{label}-{name}.f64"
            with path.open("wb") as out:
                getattr(self, name).tofile(out)
            paths[name] = str(path)
        return paths


class Member:
    """What a member process does: its share of the traffic, on its embedded member."""

    def __init__(self, space: Space, keys: list[Any], plans: dict[str, list[str]]) -> None:
        self.space = space
        self.node = space.node
        self.flows = space.map("flows", Flow)
        self.tallies = space.map("tallies", Tally)
        self.gauges = space.map("gauges", Gauge)
        self.keys = keys
        self.counts = array("q", bytes(8 * len(keys)))  # successful on_packet per flow
        self.ops = 0
        self.bumps = 0
        self.adds = 0
        self.rec = Recorder()
        # The load balancer's plans: which flows come here on which ring of members.
        self.plans: dict[str, list[int]] = {}
        for plan, members in plans.items():
            ring = HashRing(members, vnodes=DEFAULT_VNODES)
            me = space.name
            self.plans[plan] = [i for i, k in enumerate(keys) if ring.owner_of("flows", k) == me]
        self.rate = 0.0
        self.mine: list[int] = []
        #: Gradual steering: flow -> (moment it changes member, whether it comes here).
        self.switch: dict[int, tuple[float, bool]] = {}
        self.target: list[int] = []  # the flows of the last plan steered to
        self.cursor = 0
        self.t0 = 0.0
        self.issued = 0
        self.changed = trio.Event()
        self.series: list[list[float]] = []

    async def unit(self, idx: int, arrival: float) -> None:
        """One operation (a microthread): the flow's packet, and now and then shared state."""
        start = clock()
        try:
            async with self.flows.create(self.keys[idx]) as ref:
                await ref.on_packet(PACKET)
            self.counts[idx] += 1
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
            self.rec.fail(arrival, exc)
        end = clock()
        rec = self.rec
        rec.arrival.append(arrival)
        rec.latency.append(end - arrival)
        rec.service.append(end - start)

    async def submit(self, idx: int, arrival: float) -> None:
        try:
            self.space.submit_nowait(idx, self.unit, idx, arrival)
        except SchedulerFull:
            await self.space.submit(idx, self.unit, idx, arrival)  # wait for room

    async def setup(self) -> None:
        for key in self.keys:
            async with self.flows.create(key):
                pass
        for i in range(TALLIES):
            async with self.tallies.create(f"tally-{i}"):
                pass
        async with self.gauges.create("gauge"):
            pass

    async def capacity(self, seconds: float) -> float:
        """Operations per second in a closed loop over every flow (all of them local)."""
        count = len(self.keys)
        done = 0
        start = clock()
        end = start + seconds
        while clock() < end:
            now = clock()
            for _ in range(500):
                idx = done % count
                done += 1
                await self.submit(idx, now)
            await trio.sleep(0)
        await self.idle()
        took = clock() - start
        self.rec.clear()
        return done / took

    def steer(self, rate: float, plan: str, over: float = 0.0, start: float = 0.0) -> float:
        """From now on, this member's share of ``rate`` (its flows under ``plan``).

        With ``over`` > 0 the load balancer moves the flows that change member one by one
        over that many seconds, each at a moment both members derive from its index (so
        that a flow is never sent to both, nor to neither): this member walks the old and
        the new flows together, each at its own per-flow rate, and skips a flow's turn
        while the flow is elsewhere."""
        new = self.plans[plan]
        self.switch = {}
        old, self.target = self.target, new
        if over > 0:
            old, now_set = set(old), set(new)
            start = start or clock()  # (one monotonic clock for every process here)
            for idx in old ^ now_set:
                at = start + over * ((idx * 2654435761) % 2**32) / 2**32
                self.switch[idx] = (at, idx in now_set)
            new = sorted(old | now_set)
        self.mine = new
        self.rate = rate * len(self.mine) / len(self.keys)
        self.cursor = 0
        self.t0 = clock()
        self.issued = 0
        changed, self.changed = self.changed, trio.Event()
        changed.set()
        return self.t0

    async def pace(self) -> None:
        """The traffic: operations at their scheduled arrival times, open loop."""
        while True:
            if self.rate <= 0 or not self.mine:
                await self.changed.wait()
                continue
            rate = self.rate
            now = clock()
            due = int((now - self.t0) * rate) - self.issued
            if due <= 0:
                await trio.sleep(max(TICK, self.t0 + (self.issued + 1) / rate - now))
                continue
            mine = self.mine
            for _ in range(min(due, MAX_BATCH)):
                arrival = self.t0 + self.issued / rate
                self.issued += 1
                idx = mine[self.cursor]
                self.cursor = (self.cursor + 1) % len(mine)
                switch = self.switch.get(idx) if self.switch else None
                if switch is not None and (arrival >= switch[0]) != switch[1]:
                    continue  # the flow is at the other member at this moment
                await self.submit(idx, arrival)
                if self.rate != rate:
                    break  # steered while waiting for room
            # Behind by more than a burst: catch up at once; else wait for the next tick.
            await trio.sleep(0 if due > MAX_BATCH else TICK)

    async def sample(self) -> None:
        """Every 25 ms: the node's movement counters and CPU time, for the time series."""
        # The layers' counters, read in place: statistics() sums over every object held,
        # too much to do every 25 ms beside the load.
        objects, keys = self.node.core.objects, self.node.core.keys
        while True:
            micro = self.node.micro.scheduler
            self.series.append(
                [
                    clock(),
                    objects.migrations_in,
                    objects.migrations_out,
                    keys.forwarded,
                    micro.in_flight,
                    len(self.rec.arrival),
                    time.process_time(),
                ]
            )
            await trio.sleep(SAMPLE)

    def flows_handled(self) -> int:
        """Distinct flows this member handled a packet of (so held the object of, at least
        once)."""
        return sum(1 for count in self.counts if count)

    async def idle(self, timeout: float = 10.0) -> int:
        """Wait until no operation is in flight; how many still are at the timeout."""
        with trio.move_on_after(timeout):
            while self.node.micro.scheduler.in_flight:
                await trio.sleep(0.005)
        return int(self.node.micro.scheduler.in_flight)

    async def stop(self) -> dict[str, Any]:
        self.rate = 0.0
        self.mine = []
        stuck = await self.idle()
        await self.space.flush()
        return {"stuck": stuck, "ops": self.ops}

    async def verify(self) -> dict[str, Any]:
        """Every flow's count and the shared totals, read back."""
        counts = []
        for key in self.keys:
            async with self.flows.get(key) as ref:
                counts.append(await ref.count())
        tallies = 0
        for i in range(TALLIES):
            async with self.tallies.get(f"tally-{i}") as tally:
                tallies += await tally.value()
        async with self.gauges.get("gauge") as gauge:
            total = await gauge.add(0)
        return {"counts": counts, "tallies": tallies, "gauge": total}

    def report(self, folder: Path, label: str) -> dict[str, Any]:
        stats = self.space.statistics()
        return {
            "files": self.rec.save(folder, label),
            "counts": list(self.counts),
            "ops": self.ops,
            "bumps": self.bumps,
            "adds": self.adds,
            "failed": self.rec.failed,
            "failures": self.rec.failures,
            "series": self.series,
            "errors": stats.errors,
            "objects_single": stats.objects_single,
            "migrations_in": stats.migrations_in,
            "migrations_out": stats.migrations_out,
            "forwarded": stats.forwarded,
            "max_in_flight": self.node.micro.statistics().max_in_flight,
            "objects_evacuated": stats.objects_evacuated,
            "records_handed_on": stats.records_handed_on,
        }


async def member_main(args: argparse.Namespace) -> None:
    """A member process: join on ``join``, then serve commands until ``leave``/``quit``."""
    from store.space import open_space

    secret = os.environ[SECRET_ENV].encode()
    chan = JsonLines(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0)))
    options: dict[str, Any] = {} if args.limit is None else {"limit": args.limit}
    if os.environ.get(FREEZE_GC_ENV):
        options["freeze_gc"] = True
    try:
        first = await chan.receive()
        assert first["cmd"] == "join", first
        keys = flow_keys(first["flows"], seed=0)
        folder = Path(first["folder"])
        # The sampler outlives the membership, so that the leave itself is on record.
        async with trio.open_nursery() as outer:
            async with open_space(
                controller=args.member, listen=args.listen, secret=secret, **options
            ) as space:
                member = Member(space, keys, first["plans"])
                outer.start_soon(member.sample)
                await chan.send({"name": space.name, "epoch": space.node.view.epoch, "at": clock()})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(member.pace)
                    last = await serve_commands(member, chan)
                    stop = await member.stop()
                    nursery.cancel_scope.cancel()
                leaving = clock()
            left = clock()
            await trio.sleep(BUCKET)  # one more sample after the leave
            outer.cancel_scope.cancel()
        report = member.report(folder, args.label)
        report.update(stop, command=last, leaving=leaving, left=left)
        await chan.send(report)
    except Exception as exc:
        await chan.send({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        raise


async def serve_commands(member: Member, chan: JsonLines) -> str:
    """Answer the orchestrator's commands; return the one that ends the membership."""
    while True:
        msg = await chan.receive()
        cmd = msg["cmd"]
        if cmd in ("leave", "quit"):
            return str(cmd)
        if cmd == "setup":
            await member.setup()
            reply: dict[str, Any] = {"ok": True}
        elif cmd == "capacity":
            reply = {"ops_per_s": await member.capacity(msg["seconds"])}
        elif cmd == "steer":
            at = member.steer(msg["rate"], msg["plan"], msg.get("over", 0.0), msg.get("start", 0.0))
            reply = {"at": at, "flows": len(member.mine), "rate": member.rate}
        elif cmd == "handled":
            reply = {"flows": member.flows_handled()}
        elif cmd == "stop":
            reply = await member.stop()
        elif cmd == "verify":
            reply = await member.verify()
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        await chan.send(reply)


# -- the orchestrator ----------------------------------------------------------------------


class BenchError(Exception):
    """The run could not be completed (a member failed or did not answer)."""


@dataclass
class MemberProcess:
    label: str
    name: str
    process: trio.Process
    chan: JsonLines
    stderr: Path

    async def ask(self, cmd: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        await self.chan.send({"cmd": cmd, **fields})
        return await self.answer(timeout)

    async def answer(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            with trio.fail_after(timeout):
                reply = await self.chan.receive()
        except (EOFError, trio.TooSlowError) as exc:
            raise BenchError(f"member {self.label} did not answer: {exc!r}{self.tail()}") from None
        if "error" in reply:
            raise BenchError(f"member {self.label}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def tail(self) -> str:
        try:
            text = self.stderr.read_text(errors="replace")[-2000:]
        except OSError:
            return ""
        return f"\n--- stderr of member {self.label} ---\n{text}" if text.strip() else ""


def free_port() -> int:
    """A port nobody listens on now (a member is told to listen there, so that its name,
    and so the load balancer's plan, is known before it joins)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_member(
    label: str, listen: str, controller: str, secret: str, folder: Path, limit: int | None
) -> MemberProcess:
    stderr = folder / f"{label}.stderr"
    command = [sys.executable, "-m", "bench.scaling", "--member", controller]
    command += ["--listen", listen, "--label", label]
    if limit is not None:
        command += ["--limit", str(limit)]
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=dict(os.environ, **{SECRET_ENV: secret}),
        )
    return MemberProcess(label, listen, process, JsonLines(process.stdin, process.stdout), stderr)


async def both(*calls: Callable[[], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run the calls concurrently; their answers in order."""
    out: list[dict[str, Any]] = [{} for _ in calls]

    async def one(i: int, call: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        out[i] = await call()

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    return out


@dataclass
class Run:
    """What the orchestrator saw, in monotonic seconds."""

    size: dict[str, float]
    capacity: float = 0.0
    rate: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    flows_b: int = 0  # flows the load balancer steered to B at the scale-out
    flows_moved_b: int = 0  # distinct flows B handled (so objects it took) before the scale-in
    machine: list[list[float]] = field(default_factory=list)


def machine_cpu() -> list[float] | None:
    """``[now, CPU-seconds busy on all CPUs, this process's CPU-seconds]``, or ``None``
    where ``/proc/stat`` does not exist."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return [clock(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()]


async def sample_machine(run: Run) -> None:
    """Every 100 ms, the machine's CPU use: these machines are shared, and what other
    processes take from the two members shows in their latency."""
    while True:
        row = machine_cpu()
        if row is None:
            return
        run.machine.append(row)
        await trio.sleep(BUCKET)


async def orchestrate(
    size: dict[str, float],
    load: float,
    phase: Callable[[str, float], None],
    limit: int | None = None,
) -> Run:
    async with trio.open_nursery() as nursery:
        run = Run(size)
        nursery.start_soon(sample_machine, run)
        await _orchestrate(run, load, phase, limit)
        nursery.cancel_scope.cancel()
    return run


async def _orchestrate(
    run: Run, load: float, phase: Callable[[str, float], None], limit: int | None
) -> None:
    from store.shell.controller import open_controller

    size = run.size
    secret = os.urandom(16).hex()
    names = {label: f"127.0.0.1:{free_port()}" for label in "AB"}
    plans = {"one": [names["A"]], "two": [names["A"], names["B"]]}
    with tempfile.TemporaryDirectory(prefix="s6-scaling-") as tmp:
        folder = Path(tmp)
        async with open_controller("127.0.0.1:0", secret=secret.encode()) as controller:
            # trio's clock is perf_counter plus an offset; perf_counter is monotonic here.
            offset = trio.current_time() - clock()
            members = [
                await start_member(label, names[label], controller.address, secret, folder, limit)
                for label in "AB"
            ]
            a, b = members
            try:
                join = {"cmd": "join", "flows": FLOWS, "folder": tmp, "plans": plans}
                phase("A joins and creates the objects", 0)
                await a.chan.send(join)
                await a.answer()
                await a.ask("setup")
                phase("measuring A's capacity", size["capacity"])
                run.capacity = (await a.ask("capacity", seconds=size["capacity"]))["ops_per_s"]
                run.rate = run.capacity * load
                phase("before the scale-out", size["warmup"] + size["before"])
                run.marks["load"] = (await a.ask("steer", rate=run.rate, plan="one"))["at"]
                await trio.sleep(size["warmup"] + size["before"])

                phase("scale-out: B joins", 0)
                run.marks["join"] = clock()
                await b.chan.send(join)
                run.marks["admitted"] = (await b.answer())["at"]
                over = size.get("steer_over", 0.0)
                begin = clock()
                steered = await both(
                    lambda: a.ask("steer", rate=run.rate, plan="two", over=over, start=begin),
                    lambda: b.ask("steer", rate=run.rate, plan="two", over=over, start=begin),
                )
                run.marks["steer_out"] = min(s["at"] for s in steered)
                run.flows_b = steered[1]["flows"]
                run.events["out"] = await finished_event(controller, "out", offset)
                phase("between the events", size["between"])
                await trio.sleep(size["between"])
                run.flows_moved_b = (await b.ask("handled"))["flows"]

                phase("scale-in: B leaves", 0)
                run.marks["steer_in"] = begin = clock()
                steer_in = {"cmd": "steer", "rate": run.rate, "plan": "one", "over": over}
                await a.chan.send({**steer_in, "start": begin})
                if over > 0:  # B serves its flows until the balancer has moved them all
                    await b.ask("steer", rate=run.rate, plan="one", over=over, start=begin)
                    await a.answer()
                    await trio.sleep(over)
                    await b.chan.send({"cmd": "leave"})
                else:
                    await b.chan.send({"cmd": "leave"})
                    await a.answer()
                run.reports["B"] = await b.answer()
                run.events["in"] = await finished_event(controller, "in", offset)
                phase("after the scale-in", size["after"])
                await trio.sleep(size["after"])

                phase("checking every count", 0)
                run.marks["stop"] = clock()
                await a.ask("stop")
                run.verify = await a.ask("verify")
                # A is the last member: it stops without a scale-in, which the controller
                # reports as a lost member; expected here, so not worth a warning.
                logging.getLogger("store.controller").setLevel(logging.ERROR)
                await a.chan.send({"cmd": "quit"})
                run.reports["A"] = await a.answer()
                for member in members:
                    with trio.move_on_after(10):
                        await member.process.wait()
            finally:
                for member in members:
                    if member.process.returncode is None:
                        member.process.kill()
                        with trio.CancelScope(shield=True):
                            await member.process.wait()
        run.reports = {k: load_samples(v) for k, v in run.reports.items()}


async def finished_event(controller: Any, kind: str, offset: float) -> dict[str, Any]:
    """The latest scaling event of ``kind`` once it has finished: its summary and the
    times (monotonic) it started and every member was NORMAL on its epoch."""
    with trio.fail_after(30):
        while True:
            log = controller.log
            started = [t for t in log if t.what == "event" and t.text == kind]
            if started:
                epoch = started[-1].epoch
                done = [t for t in log if t.what == "finish" and t.epoch == epoch]
                if done:
                    break
            await trio.sleep(0.01)
    summary = dict(controller.status().last_event)
    if summary.get("epoch") != epoch:
        summary = {"epoch": epoch}
    acks = [t for t in log if t.what == "ack" and t.epoch == epoch]
    drained = [t for t in log if t.what == "drained" and t.epoch == epoch]
    return {
        "summary": summary,
        "start": started[-1].at - offset,
        "converged": done[0].at - offset,
        "steps": [
            {
                "what": t.what,
                "member": t.member,
                "stage": None if t.stage is None else t.stage.value,
                "at": t.at - offset,
            }
            for t in (*acks, *drained)
        ],
    }


def load_samples(report: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    for name, path in report.pop("files").items():
        report[name] = np.fromfile(path, dtype=np.float64)
    return report


# -- analysis ------------------------------------------------------------------------------


def moves_end(run: Run, start: float, end: float) -> float:
    """The end of the last sampling period within (start, end] in which a member took in
    an object (start if none did)."""
    last = start
    for report in run.reports.values():
        rows = report["series"]
        for before, after in pairwise(rows):
            if after[0] <= start or after[0] > end:
                continue
            if after[1] > before[1]:
                last = max(last, after[0])
    return last


def counted(rows: list[list[float]], column: int, lo: float, hi: float) -> float:
    """How much the counter in ``column`` of a sampled series grew between ``lo`` and
    ``hi`` (linear between samples, flat outside them)."""
    import numpy as np

    if len(rows) < 2:
        return 0.0
    t = [row[0] for row in rows]
    v = [row[column] for row in rows]
    return float(np.interp(hi, t, v) - np.interp(lo, t, v))


def objects_moved(run: Run, lo: float, hi: float) -> float:
    """Objects that went from one member to the other in [lo, hi).

    Counted where it is exact: while both members run, by what each took in; once B
    leaves, by what B gave away.  A's own counters are not used then: an object B
    evacuates to A while A's request for it waits is handed on once more inside A,
    which counts one more in *and* out there."""
    a, b = run.reports["A"]["series"], run.reports["B"]["series"]
    split = min(run.marks["steer_in"], run.events["in"]["start"])
    before = counted(a, 1, lo, min(hi, split)) + counted(b, 1, lo, min(hi, split))
    after = counted(b, 2, max(lo, split), hi) + counted(b, 1, max(lo, split), hi)
    return max(0.0, before) + max(0.0, after)


def window_stats(run: Run, lo: float, hi: float) -> dict[str, Any]:
    """Throughput, latency, failures and movement for the operations of [lo, hi)."""
    import numpy as np

    arrival = np.concatenate([r["arrival"] for r in run.reports.values()])
    latency = np.concatenate([r["latency"] for r in run.reports.values()])
    done = arrival + latency
    inside = (arrival >= lo) & (arrival < hi)
    lat = latency[inside] * 1000
    completed = int(np.count_nonzero((done >= lo) & (done < hi)))
    failed = sum(1 for r in run.reports.values() for t, _ in r["failures"] if lo <= t < hi)
    moved = objects_moved(run, lo, hi)
    forwarded = sum(counted(r["series"], 3, lo, hi) for r in run.reports.values())
    members_cpu = sum(counted(r["series"], 6, lo, hi) for r in run.reports.values())
    seconds = hi - lo
    out: dict[str, Any] = {
        "from_s": round(lo - run.marks["load"], 3),
        "to_s": round(hi - run.marks["load"], 3),
        "seconds": round(seconds, 3),
        "operations": int(lat.size),
        "ops_per_s": round(completed / seconds) if seconds > 0 else 0,
        "failed": failed,
        "objects_moved_in": round(moved),
        "forwarded": round(forwarded),
        "members_cpus": round(members_cpu / seconds, 2) if seconds > 0 else 0,
    }
    if run.machine and seconds > 0:
        busy = counted(run.machine, 1, lo, hi) - counted(run.machine, 2, lo, hi)
        out["other_cpus"] = round(max(0.0, busy - members_cpu) / seconds, 2)
    if lat.size:
        out.update(
            p50_ms=round(float(np.percentile(lat, 50)), 3),
            p99_ms=round(float(np.percentile(lat, 99)), 3),
            max_ms=round(float(lat.max()), 3),
        )
    return out


def series(run: Run) -> dict[str, list[Any]]:
    """Per 100 ms since the load started: throughput, latency percentiles, objects moved."""
    import numpy as np

    t0 = run.marks["load"]
    arrival = np.concatenate([r["arrival"] for r in run.reports.values()])
    latency = np.concatenate([r["latency"] for r in run.reports.values()])
    end = run.marks["stop"]
    edges = np.arange(t0, end + BUCKET / 2, BUCKET)
    completions, _ = np.histogram(arrival + latency, bins=edges)
    which = np.digitize(arrival, edges) - 1
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(edges)))
    p50: list[float | None] = []
    p99: list[float | None] = []
    worst: list[float | None] = []
    for i in range(len(edges) - 1):
        lat = latency[order[bounds[i] : bounds[i + 1]]] * 1000
        empty = not lat.size
        p50.append(None if empty else round(float(np.percentile(lat, 50)), 3))
        p99.append(None if empty else round(float(np.percentile(lat, 99)), 3))
        worst.append(None if empty else round(float(lat.max()), 3))
    moved, other = [], []
    for lo, hi in pairwise(edges):
        moved.append(round(objects_moved(run, lo, hi)))
        if run.machine:
            mine = sum(counted(r["series"], 6, lo, hi) for r in run.reports.values())
            busy = counted(run.machine, 1, lo, hi) - counted(run.machine, 2, lo, hi)
            other.append(round(max(0.0, busy - mine) / BUCKET, 2))
    return {
        "t_s": [round(float(x - t0), 2) for x in edges[:-1]],
        "ops_per_s": [int(c / BUCKET) for c in completions],
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": worst,
        "objects_moved": moved,
        "other_cpus": other,
    }


def analyse(run: Run) -> dict[str, Any]:
    """The windows, the events' figures and the read-back check."""
    marks, size = run.marks, run.size
    out, into = run.events["out"], run.events["in"]
    in_start = min(marks["steer_in"], into["start"])
    out_settled = min(
        in_start, max(out["converged"], moves_end(run, out["start"], marks["steer_in"]))
    )
    in_settled = min(marks["stop"], max(into["converged"], moves_end(run, in_start, marks["stop"])))
    windows = {
        "before scale-out": (marks["load"] + size["warmup"], out["start"]),
        "during scale-out": (out["start"], out_settled),
        "after scale-out": (out_settled, in_start),
        "during scale-in": (in_start, in_settled),
        "after scale-in": (in_settled, marks["stop"]),
    }
    stats = {name: window_stats(run, lo, hi) for name, (lo, hi) in windows.items()}
    t0 = marks["load"]
    events = {}
    for kind, event, settled in (("out", out, out_settled), ("in", into, in_settled)):
        summary = event["summary"]
        events[kind] = {
            "epoch": summary.get("epoch"),
            "start_s": round(event["start"] - t0, 3),
            "converged_s": round(event["converged"] - t0, 3),
            "time_to_converge_s": round(event["converged"] - event["start"], 3),
            "controller_duration_s": summary.get("duration_s"),
            "objects_settled_s": round(settled - t0, 3),
            "key_records_moved": summary.get("records_moved"),
            # The controller sums the members' drain reports; each member reports every
            # object it ever gave away, so this counts earlier moves again.
            "controller_objects_moved": summary.get("objects_moved"),
        }
    a, b = run.reports["A"], run.reports["B"]
    into_b = round(counted(b["series"], 1, out["start"], in_start))
    events["out"].update(
        steered_at_s=round(marks["steer_out"] - t0, 3),
        flows_steered_to_new_member=run.flows_b,
        share_of_flows_steered=round(run.flows_b / FLOWS, 3),
        # Distinct objects: every object starts on A, so each flow B handled was one.
        objects_moved_to_new_member=run.flows_moved_b,
        share_of_objects_moved=round(run.flows_moved_b / FLOWS, 3),
        # Migrations: an object that moves to B, back to A and to B again counts twice.
        migrations_to_new_member=into_b,
        objects_moved_back=round(counted(a["series"], 1, out["start"], in_start)),
    )
    into_a = round(counted(b["series"], 2, in_start, marks["stop"]))
    events["in"].update(
        steered_at_s=round(marks["steer_in"] - t0, 3),
        objects_moved_to_remaining_member=into_a,
        objects_evacuated_by_leaver=b["objects_evacuated"],
        objects_pulled=into_a - b["objects_evacuated"],
        objects_moved_to_leaver=round(counted(b["series"], 1, in_start, marks["stop"])),
        # A's own count: higher when evacuated objects were also handed on inside A.
        objects_taken_in_by_remaining_member=round(
            counted(a["series"], 1, in_start, marks["stop"])
        ),
        objects_left_on_leaver=b["objects_single"],
    )
    return {"windows": stats, "events": events, "check": check_counts(run)}


def recovery(result: dict[str, Any], points: dict[str, list[Any]]) -> None:
    """For each event: seconds from its start until the first 100 ms period, once the
    objects have settled, whose p99 is under the goal again (queued work drained)."""
    into = result["events"]["in"]
    in_start = min(into["start_s"], into["steered_at_s"])
    for event, lo in (
        (result["events"]["out"], result["events"]["out"]["start_s"]),
        (into, in_start),
    ):
        back = None
        for t, p99 in zip(points["t_s"], points["p99_ms"], strict=True):
            if t + BUCKET > event["objects_settled_s"] and p99 is not None and p99 < GOAL_P99_MS:
                back = t
                break
        event["p99_back_under_goal_after_s"] = None if back is None else round(back - lo, 2)


def check_counts(run: Run) -> dict[str, Any]:
    """Each object's count read back against the operations that succeeded."""
    a, b, seen = run.reports["A"], run.reports["B"], run.verify
    expected = [x + y for x, y in zip(a["counts"], b["counts"], strict=True)]
    wrong = sum(1 for x, y in zip(expected, seen["counts"], strict=True) if x != y)
    return {
        "flows_checked": len(expected),
        "flows_wrong": wrong,
        "packets": sum(expected),
        "tallies_expected": a["bumps"] + b["bumps"],
        "tallies_seen": seen["tallies"],
        "gauge_expected": a["adds"] + b["adds"],
        "gauge_seen": seen["gauge"],
        "failed_operations": a["failed"] + b["failed"],
        "stuck_operations": a["stuck"] + b["stuck"],
        "store_errors": {**a["errors"], **b["errors"]},
        "failures": [text for r in (a, b) for _, text in r["failures"]][:10],
        "objects_on_A_at_end": a["objects_single"],
        "max_in_flight": {"A": a["max_in_flight"], "B": b["max_in_flight"]},
    }


def judge(result: dict[str, Any]) -> dict[str, Any]:
    w, ev, check = result["windows"], result["events"], result["check"]
    failed = (
        check["failed_operations"]
        + check["stuck_operations"]
        + check["flows_wrong"]
        + (check["tallies_expected"] != check["tallies_seen"])
        + (check["gauge_expected"] != check["gauge_seen"])
    )
    goals: dict[str, tuple[float, float, bool]] = {
        "failed operations and wrong counts": (failed, 0, failed == 0),
        "share of distinct SingleWriter objects moved (scale-out)": (
            ev["out"]["share_of_objects_moved"],
            GOAL_MOVED_SHARE,
            ev["out"]["share_of_objects_moved"] >= GOAL_MOVED_SHARE,
        ),
    }
    for kind in ("out", "in"):
        during = w[f"during scale-{kind}"]
        p99, worst = during.get("p99_ms", math.nan), during.get("max_ms", math.nan)
        conv = ev[kind]["time_to_converge_s"]
        goals[f"p99 during scale-{kind} (ms)"] = (p99, GOAL_P99_MS, p99 < GOAL_P99_MS)
        goals[f"max during scale-{kind} (ms)"] = (worst, GOAL_MAX_MS, worst < GOAL_MAX_MS)
        goals[f"scale-{kind} converged (s)"] = (conv, GOAL_CONVERGE_S, conv < GOAL_CONVERGE_S)
    return {name: {"value": v, "limit": lim, "met": ok} for name, (v, lim, ok) in goals.items()}


# -- output --------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]missed[/]"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def _ms(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    return "" if value is None else f"{value:.2f}"


def print_tables(console: Any, run: Run, result: dict[str, Any], goals: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(
        title=f"Scale-out 1 -> 2 and scale-in 2 -> 1 under {run.rate:,.0f} ops/s "
        f"(A alone sustained {run.capacity:,.0f} ops/s), {FLOWS:,} flows"
    )
    columns = ("window", "from s", "s", "ops/s", "p50 ms", "p99 ms", "max ms", "failed")
    for column in (*columns, "forwarded", "objects moved", "other CPUs"):
        table.add_column(column, justify="left" if column == "window" else "right")
    for name, row in result["windows"].items():
        table.add_row(
            name,
            f"{row['from_s']:.2f}",
            f"{row['seconds']:.2f}",
            f"{row['ops_per_s']:,}",
            _ms(row, "p50_ms"),
            _ms(row, "p99_ms"),
            _ms(row, "max_ms"),
            str(row["failed"]),
            f"{row['forwarded']:,}",
            f"{row['objects_moved_in']:,}",
            f"{row['other_cpus']:.2f}" if "other_cpus" in row else "",
        )
    table.caption = (
        "latency from each operation's scheduled arrival to its end; 'during' lasts from the "
        "event's start (for the scale-in: the steering change) until every member is NORMAL "
        "and the last object has moved; other CPUs: what other processes on this machine "
        "used meanwhile"
    )
    console.print(table)

    events = Table(title="The events")
    columns = ("event", "start s", "converged in s", "p99 < 10 ms after s")
    for column in (*columns, "key records moved", "objects moved"):
        events.add_column(column, justify="left" if column == "event" else "right")
    out, into = result["events"]["out"], result["events"]["in"]
    events.add_row(
        f"scale-out to epoch {out['epoch']}",
        f"{out['start_s']:.2f}",
        f"{out['time_to_converge_s']:.3f}",
        _seconds(out["p99_back_under_goal_after_s"]),
        f"{out['key_records_moved']:,}",
        f"{out['objects_moved_to_new_member']:,} distinct to B "
        f"({out['share_of_objects_moved']:.0%}; flows steered {out['share_of_flows_steered']:.0%})"
        f", {out['migrations_to_new_member']:,} migrations into B, "
        f"{out['objects_moved_back']:,} back to A",
    )
    events.add_row(
        f"scale-in to epoch {into['epoch']}",
        f"{into['start_s']:.2f}",
        f"{into['time_to_converge_s']:.3f}",
        _seconds(into["p99_back_under_goal_after_s"]),
        f"{into['key_records_moved']:,}",
        f"{into['objects_moved_to_remaining_member']:,} to A "
        f"({into['objects_evacuated_by_leaver']:,} evacuated by B), "
        f"{into['objects_moved_to_leaver']:,} to B",
    )
    events.caption = (
        "converged: the event's start to every member NORMAL (controller's log); p99 < 10 ms "
        "after: from the event's start to the first 100 ms, once the objects have settled, "
        "whose p99 is under 10 ms; objects moved: counted by the members until the next event "
        "(distinct objects: the flows B handled; migrations count an object each time it moves)"
    )
    console.print(events)

    check = result["check"]
    judged = Table(title="Goals")
    for column in ("goal", "value", "limit", "verdict"):
        judged.add_column(column, justify="left" if column == "goal" else "right")
    for name, verdict in goals.items():
        value = verdict["value"]
        judged.add_row(
            name,
            f"{value:.3f}" if isinstance(value, float) else str(value),
            str(verdict["limit"]),
            mark(verdict["met"]),
        )
    judged.caption = (
        f"{check['flows_checked']:,} flows read back, {check['flows_wrong']} wrong; tallies "
        f"{check['tallies_seen']:,}/{check['tallies_expected']:,}, gauge "
        f"{check['gauge_seen']:,}/{check['gauge_expected']:,}"
    )
    console.print(judged)


def markdown(run: Run, result: dict[str, Any], goals: dict[str, Any], command: str) -> str:
    """The README block: the command, the windows, the events, the verdicts."""
    out, into = result["events"]["out"], result["events"]["in"]
    lines = [
        "```",
        command,
        "```",
        "",
        f"{FLOWS:,} SingleWriter flows and {TALLIES + 1} shared MultiWriter objects on two "
        f"member processes; open-loop load of {run.rate:,.0f} ops/s, "
        f"{run.rate / run.capacity:.0%} of the {run.capacity:,.0f} ops/s that one member "
        "sustained in the same run.",
        "",
        "| window | ops/s | p50 | p99 | max | failed | forwarded | objects moved | other CPUs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["windows"].items():
        lat = [f"{row[k]:.2f} ms" if k in row else "-" for k in ("p50_ms", "p99_ms", "max_ms")]
        lines.append(
            f"| {name} ({row['seconds']:.2f} s) | {row['ops_per_s']:,} | {' | '.join(lat)} | "
            f"{row['failed']} | {row['forwarded']:,} | {row['objects_moved_in']:,} | "
            f"{row.get('other_cpus', '-')} |"
        )
    lines += [
        "",
        f"Scale-out: converged in {out['time_to_converge_s']:.3f} s "
        f"({out['key_records_moved']:,} key records moved); then B pulled "
        f"{out['objects_moved_to_new_member']:,} distinct objects "
        f"({out['share_of_objects_moved']:.0%} of the objects, with "
        f"{out['share_of_flows_steered']:.0%} of the flows steered to B; "
        f"{out['migrations_to_new_member']:,} migrations into B); the p99 per 100 ms was back "
        f"under {GOAL_P99_MS:g} ms {_seconds(out['p99_back_under_goal_after_s'])} s after "
        f"the event's start. Scale-in: converged in {into['time_to_converge_s']:.3f} s "
        f"({into['key_records_moved']:,} key records); "
        f"{into['objects_moved_to_remaining_member']:,} objects went back to A, "
        f"{into['objects_evacuated_by_leaver']:,} of them evacuated by B; p99 back under "
        f"{GOAL_P99_MS:g} ms {_seconds(into['p99_back_under_goal_after_s'])} s after the "
        "steering change.",
        "",
        "Goals: "
        + "; ".join(f"{name}: {'met' if v['met'] else 'MISSED'}" for name, v in goals.items())
        + ".",
    ]
    return "\n".join(lines)


def plot(run: Run, result: dict[str, Any], points: dict[str, Any], path: Path) -> None:
    """Throughput, latency and objects moved per 100 ms, the events shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(name: str) -> list[float]:
        return [math.nan if x is None else x for x in points[name]]

    fig, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(11, 8.5), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.2]}
    )
    t = points["t_s"]
    top.step(t, [x / 1000 for x in points["ops_per_s"]], where="post", label="completed")
    top.axhline(run.rate / 1000, color="grey", ls=":", label="offered")
    top.set(
        ylabel="kops/s (per 100 ms)",
        title=f"Scale-out 1 -> 2 and scale-in 2 -> 1 under {run.rate / 1000:,.0f} kops/s, "
        f"{FLOWS:,} flows",
    )
    for name, style in (("p50_ms", "-"), ("p99_ms", "-"), ("max_ms", ":")):
        middle.step(t, values(name), where="post", ls=style, label=name.replace("_ms", ""))
    middle.axhline(GOAL_P99_MS, color="C1", ls="--", lw=0.8, label="p99 goal")
    middle.axhline(GOAL_MAX_MS, color="C2", ls="--", lw=0.8, label="max goal")
    middle.set(yscale="log", ylabel="latency, ms (by arrival)")
    bottom.bar(t, points["objects_moved"], width=BUCKET, align="edge", color="C4")
    bottom.set(ylabel="objects moved", xlabel="seconds since the load started")
    if points["other_cpus"]:
        cpus = bottom.twinx()
        cpus.step(t, points["other_cpus"], where="post", color="grey", lw=0.8)
        cpus.set(ylabel="other processes, CPUs", ylim=(0, os.cpu_count() or 2))
    for kind, color in (("out", "C2"), ("in", "C3")):
        e = result["events"][kind]
        for ax in (top, middle, bottom):
            ax.axvspan(e["start_s"], e["converged_s"], color=color, alpha=0.25)
            ax.axvspan(e["converged_s"], e["objects_settled_s"], color=color, alpha=0.08)
            ax.axvline(e["steered_at_s"], color=color, ls="--", lw=0.8)
        top.text(e["start_s"], 0.03, f" scale-{kind}", transform=top.get_xaxis_transform())
    for ax in (top, middle):
        ax.legend(loc="upper right", fontsize="small", ncols=3)
        ax.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter waits between steps")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scaling.json")
    parser.add_argument(
        "--load",
        type=float,
        default=LOAD,
        metavar="F",
        help=f"offered load as a fraction of the measured capacity (default {LOAD})",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="microthreads in flight per member before the generator waits (store default)",
    )
    parser.add_argument(
        "--steer-over",
        type=float,
        default=0.0,
        metavar="S",
        help="the load balancer moves flows between members gradually over S seconds "
        "(default 0: all at once, the paper's set-up)",
    )
    parser.add_argument(
        "--freeze-gc",
        action="store_true",
        help="members freeze the garbage collector's generations after each event "
        "(open_space(freeze_gc=True))",
    )
    parser.add_argument("--member", metavar="CONTROLLER", help=argparse.SUPPRESS)
    parser.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="member", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.member:
        trio.run(member_main, args)
        return 0

    from rich.console import Console
    from rich.progress import Progress

    size = dict(SIZES["quick" if args.quick else "full"], steer_over=args.steer_over)
    if args.freeze_gc:
        os.environ[FREEZE_GC_ENV] = "1"  # inherited by the member processes
    # On a terminal rich fits the tables to its width; into a pipe or a file, 120 columns.
    console = Console(width=None if sys.stdout.isatty() else 120)
    started = clock()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("starting", total=1)

        def phase(text: str, seconds: float) -> None:
            progress.update(task, description=text, total=seconds or 1, completed=0)

        async def ticking() -> Run:
            async with trio.open_nursery() as nursery:

                async def tick() -> None:
                    while True:
                        await trio.sleep(0.1)
                        progress.advance(task, 0.1)

                nursery.start_soon(tick)
                result = await orchestrate(size, args.load, phase, args.limit)
                nursery.cancel_scope.cancel()
            return result

        try:
            run = trio.run(ticking)
        except BenchError as exc:
            console.print(f"[red]scaling bench failed:[/] {exc}")
            return 1
    elapsed = clock() - started
    result = analyse(run)
    goals = judge(result)
    points = series(run)
    recovery(result, points)
    print_tables(console, run, result, goals)
    others = [w["other_cpus"] for w in result["windows"].values() if "other_cpus" in w]
    if others and max(others) > BUSY_MACHINE:
        console.print(
            f"[yellow]warning:[/] other processes on this machine used up to {max(others):.2f} "
            f"of its {os.cpu_count()} CPUs during the run; the members had that much less"
        )
    config = {
        "quick": args.quick,
        "flows": FLOWS,
        "shared_objects": {"tallies (untethered, merged)": TALLIES, "gauge (blocking)": 1},
        "op_mix": "create+on_packet per op; tally bump every 10th; gauge add every 100th",
        "members": "two processes (A, B), each an embedded member generating its own load",
        "controller": "in the orchestrator process",
        "stage_seconds": size,
        "capacity_ops_per_s": round(run.capacity),
        "offered_ops_per_s": round(run.rate),
        "load_fraction": args.load,
        "microthread_limit": args.limit or "store default",
        "steer_over_s": args.steer_over,
        "freeze_gc": args.freeze_gc,
        "latency": "scheduled arrival to end of the operation (open loop, 1 ms generator tick)",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    service = {
        label: {
            "p50_ms": round(float(_pct(r["service"], 50)) * 1000, 4),
            "p99_ms": round(float(_pct(r["service"], 99)) * 1000, 4),
        }
        for label, r in run.reports.items()
    }
    write_json(
        args.out,
        {
            "bench": "scaling",
            "config": config,
            "goals": goals,
            "events": result["events"],
            "windows": result["windows"],
            "check": result["check"],
            "service_time_whole_run": service,
            "controller_steps": {k: v["steps"] for k, v in run.events.items()},
            "series": points,
            "members": {
                label: member_figures(r, run.marks["load"]) for label, r in run.reports.items()
            },
        },
    )
    png = args.out.with_suffix(".png")
    plot(run, result, points, png)
    console.print(f"wrote {args.out} and {png} in {elapsed:.0f} s")
    command = "python -m bench.scaling" + "".join(
        f" {arg}" for arg in (argv if argv is not None else sys.argv[1:])
    )
    print(markdown(run, result, goals, command))  # plain: rich would wrap the table
    return 0 if goals["failed operations and wrong counts"]["met"] else 1


def member_figures(report: dict[str, Any], t0: float) -> dict[str, Any]:
    """What one member reported, without its per-operation arrays and per-flow counts."""
    skip = {"arrival", "latency", "service", "counts", "series"}
    out = {k: v for k, v in report.items() if k not in skip}
    for name in ("leaving", "left"):
        if name in out:
            out[name] = round(out[name] - t0, 3)
    columns = ("t_s", "migrations_in", "migrations_out", "forwarded", "in_flight", "done", "cpu_s")
    out["series"] = {
        column: [round(row[i] - (t0 if i == 0 else 0), 3) for row in report["series"]]
        for i, column in enumerate(columns)
    }
    return out


def _pct(values: Any, q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else math.nan


if __name__ == "__main__":
    # Run under the module's importable name: objects travel between members as
    # "module:qualname", which must name the same class in every process.
    from bench import scaling

    sys.exit(scaling.main())
