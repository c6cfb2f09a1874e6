"""The main job (``make demo``): PRADS on a live S6 cluster, scaled out and in under traffic.

::

    python -m bench.nf_demo [--quick] [--rate R] [--flows N] [--seed S] [--out-dir DIR]

On loopback it starts a controller (``python -m store.controller --manual-admission``), two
PRADS instances (``python -m nf serve prads``, the S6 backend: each is a member of the
object space) and the traffic sender (``bench.sender``: the load balancer, steering flows by
a consistent hash over the instances), each its own process; the sink (``bench.sink``'s
counters) runs in a thread of this process, so the progress line can show what arrives.
Traffic is ``bench.traffic make`` (reproducible: ``--seed``), sent once at ``--rate``.

While it flows, the operator's requests go to the controller as ``python -m store.ctl``
sends them: a scale-out that admits a third instance (started beforehand and waiting, so
the event is the store's and not Python's start-up), and later a scale-in of one of the
first two (the instance sees the event's ring leave it out and tells the sender, which
steers its flows away and sends it END; it leaves once it has processed everything before
the END).  A flow the sender moves finds its objects on another member and pulls them over
on its next packet (a per-flow object moves to its writer), and the leaver's objects are
handed on in the event: both count as objects migrated, read from the members' figures.
The sender holds a moved flow's next frames until its old instance has processed the ones
it got (a MOVE marker, acknowledged), so that no flow's packets are processed out of order
across the two instances; the events table shows how long those flows waited.
Each event is "during" from the request until ``SETTLE`` seconds after its last step.

At the end it asks the cluster PRADS's ``assets`` query through the controller's relay
(``python -m nf query``), runs ``python -m nf prads --pcap`` on the same capture, and
compares the asset lines (the answer's ``os`` and ``services`` lines against the offline
asset log), the discovery time aside: live, the NF's clock is when the sender sent the
frame, not the capture's time.  It prints a table (frames sent, delivered, lost, reordered;
throughput and latency before, during and after each event; objects migrated; assets) and
the answer (shortened), and writes into ``--out-dir`` (``results``):

* ``nf_demo.json``: everything (phases, events with the controller's summaries, the
  sink's 100 ms intervals, the migrations over time, each process's report, the verdict);
* ``nf_demo.png``: throughput, latency and objects migrated over time, events marked;
* ``nf_demo_assets.json``: the full ``assets`` answer;
* ``nf_demo_work/``: the capture, the cluster secret and each process's stdout and stderr.

Exit status: 0; 1 when a frame was lost or the asset table differs from the offline run's
(one line says which); 2 when the demo could not run (a process failed or did not answer in
time: one line says which, its logs are in ``nf_demo_work``); 130 on Ctrl-C.  Every child
process is stopped before it exits, whatever the reason.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any, Final

import trio
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bench.sink import Sink
from store.cli.common import OneLineParser

__all__ = ["DemoConfig", "DemoError", "main", "run_demo"]

ROOT: Final = Path(__file__).resolve().parents[1]
NF: Final = "prads"
#: The sink's interval (s): the timeline's resolution.
INTERVAL: Final = 0.1
#: Seconds after an event's last step (the controller's reply, the sender's re-steering,
#: the leaver's exit) still counted as "during" it: moved flows pull their objects over
#: on their next packet, and most flows send one within this time.
SETTLE: Final = 1.0
#: Seconds between looks at the cluster's status (members, figures, migrations).
POLL: Final = 0.25
#: Seconds the sink waits for missing frames once the sender's END is in (then: lost).
DRAIN_TIMEOUT: Final = 5.0
#: Seconds a child has to stop on SIGTERM when the demo is cut short, before SIGKILL (an
#: instance would otherwise wait up to its 10 s leave timeout for a sender already gone).
KILL_GRACE: Final = 2.0
#: Hosts of the ``assets`` answer printed (the whole answer goes to a file).
SHOWN_HOSTS: Final = 8
#: The phases of the traffic, with the instances serving it in each.
INSTANCES: Final = {
    "before": "2",
    "during scale-out": "2→3",
    "between": "3",
    "during scale-in": "3→2",
    "after": "2",
}
_HIGHEST_US: Final = 60_000_000


class DemoError(Exception):
    """Why the demo could not run, in one line."""


@dataclass
class DemoConfig:
    quick: bool = False
    rate: float = 3000.0
    flows: int = 7000
    seed: int = 1
    out_dir: Path = Path("results")
    #: When the scale-out and the scale-in are asked, as fractions of the traffic's
    #: planned duration (the scale-in never before the scale-out has settled).
    out_at: float = 0.3
    in_at: float = 0.6


# -- child processes ------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Child:
    """A child process whose stdout lines (JSON events, mostly) are collected by a task,
    copied to ``NAME.out``; its stderr goes to ``NAME.err``."""

    def __init__(self, name: str, proc: trio.Process, work: Path) -> None:
        self.name = name
        self.proc = proc
        self.work = work
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.eof = False
        #: Set before the demo stops it, or lets it end: any other exit ends the demo.
        self.expected = False
        self._changed = trio.Event()

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        with (self.work / f"{self.name}.out").open("w") as copy:
            async for chunk in self.proc.stdout:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace")
                    copy.write(line + "\n")
                    self._add(line)
                copy.flush()
            if pending:
                self._add(pending.decode(errors="replace"))
        self.eof = True
        self._wake()
        status = await self.proc.wait()
        if not self.expected:
            raise DemoError(f"{self.name} exited (status {status}) unexpectedly: {self.tail()}")

    def _add(self, line: str) -> None:
        self.lines.append(line)
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            self.events.append(obj)
            if obj.get("event") == "done" and self.name == "sender":
                self.expected = True  # the sender ends by itself once it has sent all
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def tail(self) -> str:
        """The last line of its stderr, for a one-line error."""
        path = self.work / f"{self.name}.err"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return lines[-1] if lines else "(nothing on stderr)"

    async def _until(self, found: Callable[[], Any], what: str, timeout: float) -> Any:
        with trio.move_on_after(timeout):
            while True:
                value = found()
                if value is not None:
                    return value
                if self.eof:
                    status = await self.proc.wait()
                    raise DemoError(
                        f"{self.name} exited (status {status}) before {what}: {self.tail()}"
                    )
                await self._changed.wait()
        raise DemoError(f"{self.name}: no {what} within {timeout:g} s ({self.tail()})")

    async def line(self, prefix: str, timeout: float) -> str:
        def found() -> str | None:
            return next((s for s in self.lines if s.startswith(prefix)), None)

        return str(await self._until(found, f"a line {prefix!r}", timeout))

    def find(self, kind: str, **match: Any) -> dict[str, Any] | None:
        for obj in self.events:
            if obj.get("event") == kind and all(obj.get(k) == v for k, v in match.items()):
                return obj
        return None

    async def event(self, kind: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The first ``{"event": kind, ...}`` line with the fields of ``match``."""
        found: dict[str, Any] = await self._until(
            lambda: self.find(kind, **match), f"its {kind!r} line", timeout
        )
        return found

    async def event_or_exit(self, kind: str, timeout: float, **match: Any) -> dict[str, Any] | None:
        """Like :meth:`event`, but None if the process ends without that line."""
        with trio.move_on_after(timeout):
            while True:
                obj = self.find(kind, **match)
                if obj is not None or self.eof:
                    return obj
                await self._changed.wait()
        raise DemoError(f"{self.name}: no {kind!r} line within {timeout:g} s ({self.tail()})")


def stop_children(children: Sequence[Child], grace: float = KILL_GRACE) -> None:
    """SIGTERM to every child still running, SIGKILL to those still running ``grace``
    seconds later; returns once all have been reaped.  Synchronous: it runs in ``finally``
    blocks, also while a Ctrl-C or a failure unwinds the demo, so no child outlives it."""
    alive = [c for c in children if c.proc.poll() is None]
    try:
        for c in alive:
            c.proc.terminate()
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [c for c in alive if c.proc.poll() is None]
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: no more grace, kill below
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
        for c in children:
            while c.proc.poll() is None:
                time.sleep(0.01)


# -- the sink, in a thread ------------------------------------------------------------------


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, 3)


def _latency(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {}
    return {
        "p50": float(h.get_value_at_percentile(50.0)),
        "p99": float(h.get_value_at_percentile(99.0)),
        "max": float(h.get_max_value()),
    }


class PhasedSink(Sink):
    """``bench.sink``'s counters, with each 100 ms interval labelled by the demo's phase
    as it closes and its latencies added to that phase's histogram: a phase's percentiles
    are then exact, not a mix of its intervals' percentiles."""

    def __init__(self, interval: float) -> None:
        super().__init__(interval)
        self.phase = "starting"
        self.by_phase: dict[str, HdrHistogram] = {}

    def close_interval(self) -> None:
        # ``current`` is the sink's histogram of the interval being closed (the base class
        # adds it to the total and starts a new one).
        label = self.phase
        histogram = self.by_phase.get(label)
        if histogram is None:
            histogram = self.by_phase[label] = _histogram()
        histogram.add(self.current)
        super().close_interval()
        self.intervals[-1]["phase"] = label


def sink_loop(sink: Sink, sock: socket.socket, stop: threading.Event) -> float:
    """``bench.sink``'s receive loop without its signal handling (this is not the main
    thread): until every frame the sender sent has come, or ``DRAIN_TIMEOUT`` after the
    last arrival once its END is in, or ``stop``.  Returns the thread's CPU seconds."""
    from nf.datachannel import now_ns

    cpu0 = time.thread_time()
    recv = sock.recv
    while not stop.is_set():
        now = now_ns()
        sock.settimeout(max((sink.next_ns - now) / 1e9, 0.0005))
        try:
            raw = recv(65536)
        except TimeoutError:
            raw = b""
        now = now_ns()
        if raw:
            sink.take(raw, now)
        if now >= sink.next_ns:
            sink.tick(now)
        if sink.complete():
            break
        if sink.frames_sent is not None and now - sink.last_ns > DRAIN_TIMEOUT * 1e9:
            break  # the rest is lost
    sink.close_interval()
    return time.thread_time() - cpu0


# -- the cluster, as the operator sees it ----------------------------------------------------


class Watcher:
    """Polls the controller's status (``ctl status``): roles of the members, and their
    figures, of which ``migrations_in`` summed over the members is the objects migrated
    (an object counts once, where it arrived: lazily on a flow's next packet, or handed
    on by a leaver).  A member's figures are kept after it left."""

    def __init__(self, address: str, secret: bytes) -> None:
        self.address = address
        self.secret = secret
        self.status: Any = None
        self.figures: dict[str, dict[str, Any]] = {}
        self.migrated = 0
        self.by_phase: collections.Counter[str] = collections.Counter()
        self.timeline: list[dict[str, Any]] = []
        self.phase = "starting"
        self._changed = trio.Event()
        self._scope = trio.CancelScope()

    def stop(self) -> None:
        """No more polls (before the controller is stopped on purpose)."""
        self._scope.cancel()

    def roles(self) -> dict[str, str]:
        if self.status is None:
            return {}
        return {row[0]: row[2] for row in self.status.members}

    async def run(self) -> None:
        from store.wire.control import parse_address

        host, port = parse_address(self.address)
        with self._scope:
            await self._poll(host, port)

    async def _poll(self, host: str, port: int) -> None:
        from store.cli.ctl import request_status
        from store.shell.transport import connect_peer

        try:
            async with connect_peer(
                host, port, secret=self.secret, name=f"nf-demo-{os.getpid()}", close_timeout=0.2
            ) as peer:
                while True:
                    with trio.fail_after(10):
                        status = await request_status(peer)
                    self._take(status)
                    await trio.sleep(POLL)
        except Exception as exc:  # the controller went away or stopped answering
            raise DemoError(
                f"asking the controller at {self.address} for its status: {exc}"
            ) from None

    def _take(self, status: Any) -> None:
        self.status = status
        for name, figures in status.figures.items():
            if "migrations_in" in figures:
                self.figures[name] = dict(figures)
        total = sum(int(f.get("migrations_in", 0)) for f in self.figures.values())
        self.by_phase[self.phase] += total - self.migrated
        self.migrated = total
        roles = self.roles()
        self.timeline.append(
            {
                "t": round(time.time(), 3),
                "phase": self.phase,
                "members": sum(1 for r in roles.values() if r == "member"),
                "migrated": total,
                "objects": sum(
                    int(self.figures.get(n, {}).get("objects_single", 0))
                    + int(self.figures.get(n, {}).get("objects_multi", 0))
                    for n, r in roles.items()
                    if r == "member"
                ),
            }
        )
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[Watcher], Any], what: str, timeout: float) -> Any:
        with trio.move_on_after(timeout):
            while True:
                value = predicate(self)
                if value:
                    return value
                await self._changed.wait()
        raise DemoError(f"the controller did not show {what} within {timeout:g} s")

    async def scale(self, kind: str, names: list[str]) -> dict[str, Any]:
        """``ctl scale-out``/``scale-in`` of ``names``: the controller's summary (epoch,
        members, duration, key records and objects the event moved) and progress lines."""
        from store.cli.ctl import request_scale
        from store.shell.transport import connect_peer
        from store.wire.control import parse_address

        host, port = parse_address(self.address)
        progress = StringIO()
        requested = time.time()
        try:
            async with connect_peer(
                host,
                port,
                secret=self.secret,
                name=f"nf-demo-ctl-{os.getpid()}",
                close_timeout=0.2,
            ) as peer:
                with trio.fail_after(60):
                    reply = await request_scale(
                        peer,
                        kind,
                        names,
                        Console(file=progress, width=200, color_system=None),
                        trio.current_time(),
                    )
        except Exception as exc:
            raise DemoError(f"ctl scale-{kind} {', '.join(names)}: {exc}") from None
        if not reply.ok:
            raise DemoError(f"scale-{kind} of {', '.join(names)} {reply.code}: {reply.text}")
        return {
            "requested_t": round(requested, 4),
            "done_t": round(time.time(), 4),
            "summary": dict(reply.summary),
            "progress": progress.getvalue().splitlines(),
        }


# -- the run ---------------------------------------------------------------------------------


def _write_capture(path: Path, flows: int, seed: int) -> int:
    """``python -m bench.traffic make --flows N --seed S`` (its defaults otherwise), done
    here so that it can overlap the processes' start-up; returns the number of frames."""
    import dpkt

    from bench.traffic import make

    packets = make(flows, seed)
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f)
        for ts, frame in packets:
            writer.writepkt(frame, ts=ts)
    return len(packets)


def _strip_time(line: str) -> str:
    """An asset line without its last field (when it was discovered)."""
    head, sep, _ = line.rpartition(",")
    return head if sep else line


def compare_assets(answer: list[dict[str, Any]], offline: list[str]) -> dict[str, Any]:
    """The ``assets`` answer's lines (each host's ``os`` and ``services``) against the
    offline asset log (its header aside), as multisets, times aside."""
    from nf.prads.monitor import HEADER

    live = sorted(_strip_time(x) for a in answer for x in (*a["os"], *a["services"]))
    off = sorted(_strip_time(x) for x in offline if x != HEADER)
    only_live = collections.Counter(live) - collections.Counter(off)
    only_offline = collections.Counter(off) - collections.Counter(live)
    return {
        "equal": live == off,
        "live_lines": len(live),
        "offline_lines": len(off),
        "only_live_count": only_live.total(),
        "only_offline_count": only_offline.total(),
        "only_live": sorted(only_live.elements())[:20],
        "only_offline": sorted(only_offline.elements())[:20],
    }


@dataclass
class Run:
    """The state of one run, shared by its tasks and the progress line."""

    cfg: DemoConfig
    console: Console
    work: Path
    started: float = field(default_factory=time.monotonic)
    children: list[Child] = field(default_factory=list)
    sink: PhasedSink | None = None
    watcher: Watcher | None = None
    frames: int = 0
    phase: str = "starting"
    phase_marks: list[tuple[str, float]] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.started:6.1f} s[/]  {text}")

    def enter(self, phase: str, at: float | None = None) -> None:
        """From now on, what arrives and what migrates counts for ``phase``, which began
        at wall-clock time ``at`` (now if None)."""
        self.phase = phase
        self.phase_marks.append((phase, time.time() if at is None else at))
        if self.sink is not None:
            self.sink.phase = phase
        if self.watcher is not None:
            self.watcher.phase = phase

    def progress(self) -> RenderableType:
        """Two short lines (they fit 100 columns): where the run is, and how it goes in
        the last 100 ms interval."""
        elapsed = time.monotonic() - self.started
        sink, watcher = self.sink, self.watcher
        members = 0
        if watcher is not None:
            members = sum(1 for r in watcher.roles().values() if r == "member")
        head = Text(f"{elapsed:6.1f} s  ")
        head.append(self.phase, style="bold cyan")
        head.append(f"  ·  {members} instances")
        rows: list[RenderableType] = [head]
        if sink is not None and sink.intervals and self.frames:
            last = sink.intervals[-1]
            lat = last["latency_us"]
            head.append(
                f"  ·  {sink.unique:,} of {self.frames:,} frames delivered "
                f"({sink.unique / self.frames:.0%})"
            )
            migrated = watcher.migrated if watcher is not None else 0
            rows.append(
                Text(
                    f"  {last['pps']:,.0f} frames/s · p50 "
                    f"{lat.get('p50', 0) / 1e3:.1f} ms · p99 {lat.get('p99', 0) / 1e3:.1f} ms"
                    f" · missing {sink.holes} · reordered {sink.reordered}"
                    f" · objects migrated {migrated:,}"
                )
            )
        return Group(*rows)


async def _spawn(run: Run, nursery: trio.Nursery, name: str, args: list[str]) -> Child:
    with (run.work / f"{name}.err").open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            env=_env(),
        )
    child = Child(name, proc, run.work)
    run.children.append(child)
    nursery.start_soon(child.pump)
    return child


async def _command(args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
            env=_env(),
        )


async def _signals() -> None:
    """SIGTERM or SIGHUP ends the demo as Ctrl-C does (trio turns SIGINT into
    KeyboardInterrupt itself): the children are stopped on the way out."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as received:
        async for signum in received:
            raise KeyboardInterrupt(signal.Signals(signum).name)


async def run_demo(cfg: DemoConfig, console: Console) -> dict[str, Any]:
    """Run the whole demo; the result as ``nf_demo.json`` holds it."""
    # Absolute: the children run in the project's folder, wherever this was started.
    work = (cfg.out_dir / "nf_demo_work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    # A failed run must not leave an earlier run's results looking like its own.
    for old in [*work.glob("*.out"), *work.glob("*.err")]:
        old.unlink()
    for name in ("nf_demo.json", "nf_demo.png", "nf_demo_assets.json"):
        (cfg.out_dir / name).unlink(missing_ok=True)
    run = Run(cfg, console, work)
    # Transient: the line is replaced by the tables at the end.
    live = Live(get_renderable=run.progress, console=console, refresh_per_second=4, transient=True)
    try:
        with live:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_signals)
                result = await _run(run, nursery)
                nursery.cancel_scope.cancel()
        return result
    finally:
        stop_children(run.children)


async def _run(run: Run, nursery: trio.Nursery) -> dict[str, Any]:
    cfg, work = run.cfg, run.work
    wall0 = time.time()
    secret_file = work / "secret"
    secret_file.write_text(secrets.token_hex(32) + "\n")
    secret_file.chmod(0o600)
    secret = secret_file.read_bytes().rstrip(b"\r\n")
    pcap = work / "traffic.pcap"

    capture_made = trio.Event()

    async def make_capture() -> None:
        run.frames = await trio.to_thread.run_sync(
            _write_capture, pcap, cfg.flows, cfg.seed, abandon_on_cancel=True
        )
        capture_made.set()

    nursery.start_soon(make_capture)
    run.say(f"making the traffic: {cfg.flows:,} flows (bench.traffic make, seed {cfg.seed})")

    # The controller admits nobody by itself: every membership change is an operator's
    # request, as in production, and the third instance can be started before the traffic.
    controller = await _spawn(
        run,
        nursery,
        "controller",
        [
            "-m",
            "store.controller",
            "--listen",
            "127.0.0.1:0",
            "--manual-admission",
            "--secret-file",
            str(secret_file),
        ],
    )
    address = (await controller.line("listening on", 30)).split()[-1]
    watcher = run.watcher = Watcher(address, secret)
    nursery.start_soon(watcher.run)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    except OSError:
        pass
    sock.bind(("127.0.0.1", 0))
    sink_address = "{}:{}".format(*sock.getsockname())

    async def instance(i: int) -> Child:
        return await _spawn(
            run,
            nursery,
            f"instance-{i}",
            [
                "-m",
                "nf",
                "serve",
                NF,
                "--controller",
                address,
                "--data",
                "127.0.0.1:0",
                "--sink",
                sink_address,
                "--backend",
                "s6",
                "--secret-file",
                str(secret_file),
            ],
        )

    def waiting(w: Watcher) -> list[str]:
        return sorted(n for n, r in w.roles().items() if r == "waiting")

    first = [await instance(0), await instance(1)]
    names = await watcher.wait_for(lambda w: len(waiting(w)) >= 2 and waiting(w), "2 waiting", 60)
    admitted = await watcher.scale("out", names)
    ready = {c.name: await c.event("ready", 30) for c in first}
    run.say(
        f"controller at {address}; instances {', '.join(r['name'] for r in ready.values())} "
        f"admitted (epoch {admitted['summary'].get('epoch')})"
    )
    await instance(2)
    # A status from before the admission may still show the first two waiting.
    joiner_name = (
        await watcher.wait_for(
            lambda w: [n for n in waiting(w) if n not in names], "the third instance", 60
        )
    )[0]
    run.say(f"instance {joiner_name} started, waiting for the operator's scale-out")
    await capture_made.wait()
    seconds = run.frames / cfg.rate
    run.say(f"traffic: {run.frames:,} frames of {cfg.flows:,} flows at {cfg.rate:,.0f}/s")

    sink = run.sink = PhasedSink(INTERVAL)
    stop_sink = threading.Event()
    sink_result: dict[str, float] = {}

    sink_done = trio.Event()

    async def sink_task() -> None:
        try:
            sink_result["cpu_s"] = await trio.to_thread.run_sync(
                sink_loop, sink, sock, stop_sink, abandon_on_cancel=True
            )
        finally:
            stop_sink.set()  # an abandoned thread sees it within an interval, and ends
        sink_done.set()

    nursery.start_soon(sink_task)
    # The first frames count for the first phase even if they arrive before the sender's
    # "started" line does here (the phase's own time starts with the sender's).
    sink.phase = "before"
    sender = await _spawn(
        run,
        nursery,
        "sender",
        [
            "-m",
            "bench.sender",
            "--controller",
            address,
            "--sink",
            sink_address,
            "--pcap",
            str(pcap),
            "--rate",
            str(cfg.rate),
            "--steer",
            "hash",
            "--min-instances",
            "2",
            "--nf",
            NF,
            "--secret-file",
            str(secret_file),
        ],
    )
    started = await sender.event("started", 60)
    t0 = started["t"]
    run.enter("before", at=t0)
    run.say(f"the sender started: {seconds:.1f} s of traffic planned")
    events: list[dict[str, Any]] = []

    # The scale-out: the operator admits the waiting third instance.
    await trio.sleep_until(trio.current_time() + max(t0 + cfg.out_at * seconds - time.time(), 0))
    run.enter("during scale-out")
    run.say(f"[bold green]scale-out[/]: ctl scale-out {joiner_name}")
    out = {
        "kind": "scale-out",
        "instance": joiner_name,
        **await watcher.scale("out", [joiner_name]),
    }
    run.say(_summary_text(out["summary"]))
    steered = await sender.event_or_exit("scale-out", 60, instance=joiner_name)
    if steered is not None:
        out["steered_t"], out["flows_moved"] = steered["t"], steered["flows_moved"]
        run.say(f"the sender steers {steered['flows_moved']:,} flows to {joiner_name}")
    await _settle(max(out["done_t"], out.get("steered_t", 0.0)))
    out["phase"] = [run.phase_marks[-1][1], time.time()]
    events.append(out)
    run.enter("between")

    # The scale-in: the operator removes one of the first two instances.
    gone, leaver = ready["instance-0"]["name"], first[0]
    leaver.expected = True
    at = max(t0 + cfg.in_at * seconds, time.time() + 0.5)
    await trio.sleep_until(trio.current_time() + max(at - time.time(), 0))
    run.enter("during scale-in")
    run.say(f"[bold red]scale-in[/]: ctl scale-in {gone}")
    into = {"kind": "scale-in", "instance": gone, **await watcher.scale("in", [gone])}
    run.say(_summary_text(into["summary"]))
    steered = await sender.event_or_exit("scale-in", 60, instance=gone)
    if steered is not None:
        into["steered_t"], into["flows_moved"] = steered["t"], steered["flows_moved"]
        run.say(f"the sender steered {steered['flows_moved']:,} flows away from {gone}")
    left = await leaver.event("exit", 60)
    into["leaver_exit_t"] = time.time()
    into["leaver"] = left
    run.say(f"{gone} left, after processing the {left['frames']:,} frames sent to it")
    await _settle(max(into["done_t"], into.get("steered_t", 0.0), into["leaver_exit_t"]))
    into["phase"] = [run.phase_marks[-1][1], time.time()]
    events.append(into)
    run.enter("after")

    done = await sender.event("done", 3 * seconds + 60)
    run.enter("draining")
    _attach_pauses(events, done["events"])
    inside = all(e["phase"][1] <= done["ended_t"] for e in events)
    with trio.move_on_after(DRAIN_TIMEOUT + 30):
        await sink_done.wait()
    if not sink_done.is_set():
        raise DemoError("the sink did not finish")
    report = sink.report()
    sock.close()
    total = report["total"]
    run.say(
        f"the sender is done: {done['sent']:,} frames in {done['seconds']} s; "
        f"delivered {total['received']:,}, lost {total['lost']}"
    )

    # The asset table through the controller's relay, and the offline run on the capture.
    query: dict[str, Any] = {}
    offline: dict[str, Any] = {}

    async def ask() -> None:
        out = await _command(
            [
                "-m",
                "nf",
                "query",
                "--controller",
                address,
                "--secret-file",
                str(secret_file),
                "--json",
                NF,
                "assets",
            ],
            120,
        )
        if out.returncode != 0:
            raise DemoError(f"nf query assets failed: {out.stderr.decode().strip()}")
        query["answer"] = json.loads(out.stdout)
        query["answered_by"] = out.stderr.decode().strip()

    async def offline_run() -> None:
        out = await _command(["-m", "nf", NF, "--pcap", str(pcap)], 300)
        if out.returncode != 0:
            raise DemoError(f"nf {NF} --pcap failed: {out.stderr.decode().strip()}")
        offline["lines"] = out.stdout.decode().splitlines()
        offline["summary"] = out.stderr.decode().strip()

    run.say("asking the cluster for its assets (python -m nf query prads assets)")
    async with trio.open_nursery() as both:
        both.start_soon(ask)
        both.start_soon(offline_run)
    answer = query["answer"]
    comparison = compare_assets(answer, offline["lines"])

    # The remaining instances leave (SIGTERM), then the controller stops.  What moves
    # from here on is the cluster shutting down, not the demo's scaling.
    run.enter("shutdown")
    for c in run.children:
        c.expected = True
    instances: dict[str, Any] = {leaver.name: left}
    for c in run.children:
        if c.name.startswith("instance") and c.proc.poll() is None:
            c.proc.terminate()
    for c in run.children:
        if c.name.startswith("instance") and c is not leaver:
            try:
                instances[c.name] = await c.event_or_exit("exit", 30)
            except DemoError as exc:  # the results stand; it is killed on the way out
                instances[c.name] = {"error": str(exc)}
    watcher.stop()
    controller.proc.terminate()
    with trio.move_on_after(10):
        await controller.proc.wait()

    phases = _phases(sink, watcher, run.phase_marks)
    lost = total["lost"] if total["lost"] is not None else done["sent"] - total["received"]
    problems = []
    if lost:
        problems.append(f"{lost:,} of {done['sent']:,} frames were lost")
    if not comparison["equal"]:
        problems.append(
            "the asset table differs from python -m nf prads --pcap on the same traffic: "
            f"{comparison['only_live_count']:,} lines only in the cluster's answer, "
            f"{comparison['only_offline_count']:,} only offline"
        )
    return {
        "config": {**asdict(cfg), "out_dir": str(cfg.out_dir), "nf": NF, "backend": "s6"},
        "controller": address,
        "capture": {"path": str(pcap), "flows": cfg.flows, "frames": run.frames},
        "started_t": t0,
        "seconds": {
            "setup": round(t0 - wall0, 2),
            "traffic": done["seconds"],
            "total": round(time.time() - wall0, 2),
        },
        "sent": done["sent"],
        "delivered": total["received"],
        "lost": lost,
        "reordered": total["reordered"],
        "duplicates": total["duplicates"],
        "dropped_by_nf": total["dropped_by_nf"],
        "latency_us": total["latency_us"],
        "phases": phases,
        "events": events,
        "events_inside_traffic": inside,
        "objects_migrated": sum(p["objects_migrated"] for p in phases),
        "migrations": watcher.timeline,
        "assets": {
            "hosts": len(answer),
            "os_lines": sum(len(a["os"]) for a in answer),
            "service_lines": sum(len(a["services"]) for a in answer),
            "answered_by": query["answered_by"],
            "file": str(cfg.out_dir / "nf_demo_assets.json"),
        },
        "assets_answer": answer,
        "offline": {"summary": offline["summary"], "lines": len(offline["lines"])},
        "assets_match_offline": comparison["equal"],
        "comparison": comparison,
        "sender": done,
        "sink": {k: v for k, v in report.items() if k != "intervals"},
        "sink_thread_cpu_s": round(sink_result.get("cpu_s", math.nan), 3),
        "intervals": report["intervals"],
        "instances": instances,
        "pids": {c.name: c.proc.pid for c in run.children},
        "ok": not problems,
        "problems": problems,
    }


def _attach_pauses(events: list[dict[str, Any]], sender_events: list[dict[str, Any]]) -> None:
    """Each event's re-steer pause (the sender's ``paused`` line nearest its re-steer): how
    long the moved flows' frames were held while their old instance finished theirs."""
    pauses = [e for e in sender_events if e["kind"] == "paused"]
    for e in events:
        at = e.get("steered_t")
        if at is None or not pauses:
            continue
        e["pause"] = min(pauses, key=lambda p: abs(p["t_start"] - at))


async def _settle(since: float) -> None:
    await trio.sleep(max(since + SETTLE - time.time(), 0.0))


def _summary_text(s: dict[str, Any]) -> str:
    return (
        f"  controller: epoch {s.get('epoch')}, {s.get('members')} members, "
        f"{s.get('records_moved', 0):,} key records and {s.get('objects_moved', 0):,} objects "
        f"moved in {s.get('duration_s')} s"
    )


def _phases(sink: PhasedSink, watcher: Watcher, marks: list[tuple[str, float]]) -> list[Any]:
    out = []
    for (label, start), (_, end) in itertools.pairwise(marks):
        if label in ("draining", "shutdown"):
            continue  # after the traffic
        # Its intervals, but not those that ended before it began (the sink's idle ones
        # before the traffic).
        rows = [i for i in sink.intervals if i.get("phase") == label and i["t"] + INTERVAL > start]
        received = sum(i["received"] for i in rows)
        out.append(
            {
                "phase": label,
                "start_t": round(start, 3),
                "seconds": round(end - start, 2),
                "delivered": received,
                "pps": round(received / (len(rows) * INTERVAL), 1) if rows else 0.0,
                "latency_us": _latency(sink.by_phase.get(label, _histogram())),
                "reordered": sum(i["reordered"] for i in rows),
                "objects_migrated": watcher.by_phase.get(label, 0),
            }
        )
    return out


# -- output ----------------------------------------------------------------------------------


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1e3:,.1f}"


def render(result: dict[str, Any], console: Console) -> None:
    """The tables and the (shortened) ``assets`` answer."""
    totals = Table(title="traffic", title_justify="left")
    for column in ("frames sent", "delivered", "lost", "reordered", "duplicates", "flows"):
        totals.add_column(column, justify="right")
    totals.add_row(
        f"{result['sent']:,}",
        f"{result['delivered']:,}",
        f"{result['lost']:,}",
        f"{result['reordered']:,}",
        f"{result['duplicates']:,}",
        f"{result['capture']['flows']:,}",
    )
    console.print(totals)

    phases = Table(title="before, during and after each event", title_justify="left")
    phases.add_column("phase", no_wrap=True)
    phases.add_column("NFs", justify="right")
    for column in ("s", "frames/s", "p50 ms", "p99 ms", "max ms", "reordered"):
        phases.add_column(column, justify="right")
    phases.add_column("objects migrated", justify="right")
    for p in result["phases"]:
        lat = p["latency_us"]
        phases.add_row(
            p["phase"],
            INSTANCES.get(p["phase"], ""),
            f"{p['seconds']:.1f}",
            f"{p['pps']:,.0f}",
            _ms(lat.get("p50")),
            _ms(lat.get("p99")),
            _ms(lat.get("max")),
            f"{p['reordered']:,}",
            f"{p['objects_migrated']:,}",
        )
    lat = result["latency_us"]
    phases.add_row(
        "whole run",
        "",
        f"{result['seconds']['traffic']:.1f}",
        f"{result['sent'] / max(result['seconds']['traffic'], 1e-9):,.0f}",
        _ms(lat.get("p50")),
        _ms(lat.get("p99")),
        _ms(lat.get("max")),
        f"{result['reordered']:,}",
        f"{result['objects_migrated']:,}",
        style="bold",
    )
    console.print(phases)

    events = Table(
        title="scaling events (the controller's summaries)",
        title_justify="left",
        caption="moved by the event itself: key records, and a leaver's objects; the flows' "
        "objects follow them lazily (objects migrated, above).  Pause: how long the moved "
        "flows' frames were held until their old instance had processed what it got of them "
        "(the other flows were not held)",
        caption_justify="left",
    )
    events.add_column("event", no_wrap=True)
    for column in ("epoch", "members", "took s", "key records moved", "objects moved"):
        events.add_column(column, justify="right")
    events.add_column("flows moved", justify="right")
    events.add_column("their pause ms", justify="right")
    for e in result["events"]:
        s = e["summary"]
        pause = e.get("pause")
        events.add_row(
            f"{e['kind']} {e['instance']}",
            f"{s.get('epoch')}",
            f"{s.get('members')}",
            f"{s.get('duration_s')}",
            f"{s.get('records_moved', 0):,}",
            f"{s.get('objects_moved', 0):,}",
            f"{e.get('flows_moved', '-')}",
            "-" if pause is None else f"{pause['pause_ms']:,.1f}",
        )
    console.print(events)
    if not result["events_inside_traffic"]:
        console.print("[yellow]note: an event ended after the traffic did[/]")
    if not result["sender"]["valid"]:
        console.print(
            f"[yellow]note: the sender fell behind its rate or used most of a core "
            f"({result['sender']['rate_achieved']:,.0f}/s of {result['sender']['rate']:,.0f})[/]"
        )

    a = result["assets"]
    console.print(
        f"[bold]assets found[/]: {a['hosts']:,} hosts, {a['os_lines']:,} OS and "
        f"{a['service_lines']:,} service lines ({escape(a['answered_by'].lstrip('# '))})"
    )
    _render_assets(result["assets_answer"], console, a["file"])
    c = result["comparison"]
    same = "[green]equal[/]" if c["equal"] else "[bold red]DIFFERENT[/]"
    console.print(
        f"against python -m nf prads --pcap on the same capture ({c['offline_lines']:,} "
        f"lines), times aside: {same}"
    )
    s = result["seconds"]
    console.print(
        f"took {s['total']} s: {s['setup']} s to start, {s['traffic']} s of traffic; "
        f"wrote {result['config']['out_dir']}/nf_demo.json, nf_demo.png and nf_demo_assets.json"
    )


_LINE = re.compile(r"^[^,]*,[^,]*,([^,]*),([^,]*),([^,]*),\[(.*)\],[^,]*,[^,]*$")
_PROTO = {"6": "tcp", "17": "udp", "1": "icmp"}


def _short(line: str, os_line: bool) -> str:
    """An asset line (``ip,vlan,port,proto,kind,[text],distance,time``) for people: an OS
    line as ``SYN: Linux 2.6`` (its fingerprint's last two fields), a service line as
    ``CLIENT 80/tcp http: curl/7.88.1``."""
    m = _LINE.match(line)
    if m is None:
        return line
    port, proto, kind, text = m.groups()
    if os_line:
        # A fingerprint's six signature fields, then the OS and its details, then (SYN)
        # ``link:...:uptime:...``.
        fields = text.split(":")
        return f"{kind}: {' '.join(fields[6:8])}" if len(fields) >= 8 else f"{kind}: {text}"
    service, _, app = text.partition(":")
    app = app if len(app) <= 40 else app[:37] + "..."
    return f"{kind} {port}/{_PROTO.get(proto, proto)} {service}: {app}"


def _render_assets(answer: list[dict[str, Any]], console: Console, path: str) -> None:
    table = Table("host", "OS", "services", title_justify="left", show_lines=False)
    for a in answer[:SHOWN_HOSTS]:
        services = [_short(s, False) for s in a["services"]]
        if len(services) > 3:
            services = [*services[:3], f"... {len(services) - 3} more"]
        table.add_row(
            a["ip"],
            escape("\n".join(_short(s, True) for s in a["os"]) or "-"),
            escape("\n".join(services) or "-"),
        )
    console.print(table)
    if len(answer) > SHOWN_HOSTS:
        console.print(f"... and {len(answer) - SHOWN_HOSTS:,} more hosts: all of them in {path}")


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput, latency and objects migrated over time, the events shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result["started_t"]
    end = result["sender"]["ended_t"] - t0 + 0.5
    # The traffic only: the drain after it and the cluster's shutdown are not the demo's.
    rows = [r for r in result["intervals"] if t0 - INTERVAL <= r["t"] <= t0 + end]
    t = [r["t"] - t0 for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, sharex=True, figsize=(10, 7), gridspec_kw={"height_ratios": [3, 3, 2]}
    )
    ax1.plot(t, [r["pps"] for r in rows], lw=1, color="tab:blue")
    ax1.axhline(result["config"]["rate"], color="grey", ls=":", lw=0.8, label="sender's rate")
    ax1.set_ylabel("frames/s delivered")
    ax1.legend(loc="lower left", fontsize=8)
    nan = float("nan")
    for q, color in (("p50", "tab:blue"), ("p99", "tab:orange"), ("max", "tab:red")):
        ms = [r["latency_us"].get(q, nan) / 1e3 for r in rows]
        ax2.plot(t, ms, lw=1, color=color, label=q)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms), per 100 ms")
    ax2.legend(loc="upper left", fontsize=8)
    m = [r for r in result["migrations"] if r["phase"] not in ("starting", "shutdown")]
    ax3.step([r["t"] - t0 for r in m], [r["migrated"] for r in m], where="post", color="tab:green")
    ax3.set_ylabel("objects migrated")
    ax3.set_xlabel("seconds since the sender started")
    colors = {"scale-out": "tab:green", "scale-in": "tab:red"}
    for e in result["events"]:
        lo, hi = (x - t0 for x in e["phase"])
        for ax in (ax1, ax2, ax3):
            ax.axvspan(lo, hi, color=colors[e["kind"]], alpha=0.12, lw=0)
            ax.axvline(e["requested_t"] - t0, color=colors[e["kind"]], lw=0.8)
        ax1.text(
            e["requested_t"] - t0,
            ax1.get_ylim()[1],
            f" {e['kind']}",
            va="top",
            fontsize=8,
            color=colors[e["kind"]],
        )
    ax1.set_xlim(min(t, default=0.0), end)
    cfg = result["config"]
    fig.suptitle(
        f"PRADS on S6: 2 instances, scaled out to 3 and in to 2; {cfg['rate']:,.0f} frames/s, "
        f"{result['sent']:,} frames, {result['lost']} lost, {result['reordered']} reordered"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m bench.nf_demo",
        description="PRADS on a live S6 cluster, scaled out and in while traffic flows.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (the tests')")
    parser.add_argument("--rate", type=float, help="frames per second (3000; quick 2000)")
    parser.add_argument("--flows", type=int, help="flows of the traffic (7000; quick 1000)")
    parser.add_argument("--seed", type=int, default=1, help="of the traffic (1)")
    parser.add_argument("--out-dir", default="results", metavar="DIR", help="(results)")
    args = parser.parse_args(argv)
    cfg = DemoConfig(
        quick=args.quick,
        rate=args.rate if args.rate is not None else (2000.0 if args.quick else 3000.0),
        flows=args.flows if args.flows is not None else (1000 if args.quick else 7000),
        seed=args.seed,
        out_dir=Path(args.out_dir),
    )
    if cfg.rate <= 0 or cfg.flows <= 0:
        parser.error("--rate and --flows must be positive")
    try:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out-dir {args.out_dir}: {exc.strerror or exc}")
    console = Console()
    prog = parser.prog
    try:
        result = trio.run(run_demo, cfg, console)
    except BaseException as exc:
        # Trio's nurseries wrap what their tasks raise in exception groups: the cause is a
        # leaf of the group.
        leaves = _leaves(exc)
        interrupt = next((e for e in leaves if isinstance(e, KeyboardInterrupt)), None)
        if interrupt is not None:
            why = str(interrupt) or "Ctrl-C"
            print(
                f"{prog}: interrupted ({why}); every process it started is stopped", file=sys.stderr
            )
            return 130
        failure = next((e for e in leaves if isinstance(e, DemoError)), None)
        if failure is not None:
            logs = cfg.out_dir / "nf_demo_work"
            print(f"{prog}: error: {failure} (the processes' logs: {logs})", file=sys.stderr)
            return 2
        raise
    out = cfg.out_dir
    (out / "nf_demo_assets.json").write_text(json.dumps(result["assets_answer"], indent=1) + "\n")
    (out / "nf_demo.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "nf_demo.png")
    render(result, console)
    if result["problems"]:
        print(f"{prog}: FAILED: {'; '.join(result['problems'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
