"""Live traffic through an NF cluster of real processes, with a scale-out and a scale-in.

::

    python -m bench.live [--quick] [--nf prads] [--instances N] [--rate PPS] [--duration S]
        [--flows N] [--pcap FILE] [--backend s6|local-only|remote-only|redis]
        [--store HOST:PORT] [--steer hash|owner] [--steer-over S]
        [--scale-in-by sigterm|ctl|kill] [--keep-order on|off] [--no-scaling]
        [--out results/live.json] [--png results/live.png] [-- NF OPTIONS]

On loopback it starts a controller (``python -m store.controller``), a sink
(``bench.sink``), N instances (``python -m nf serve NAME``) and the sender
(``bench.sender``), each its own process; on the remote-only backends also their store
(``python -m baselines.kv_server`` for ``remote-only``, a throw-away ``redis-server`` for
``redis``) unless ``--store`` names a running one.  Traffic is ``bench.traffic make`` (or
``--pcap``).  Once the sender has started, it starts one more instance (a scale-out: the
controller admits it, the sender steers its share of flows to it once it is a member);
once the sender steers to it, it scales one of the first instances in (SIGTERM: the
instance tells the sender, which steers its flows away and sends it END, and the instance
then leaves, handing its state on; or ``ctl scale-in`` of it; or, with ``--scale-in-by
kill``, a crash: SIGKILL, the controller declares it dead and repairs the ring, the
sender steers its flows to the others once it is disconnected and stops waiting for its
answers once the controller has declared it dead).  At the end it asks the
cluster the NF's output query through the controller's relay (``python -m nf query``) and,
when the traffic was one pass of the capture (no looping), compares it with
``python -m nf NAME --pcap`` on the same capture, timestamps aside (live, the NF's clock is
the moment the sender sent the frame, not the capture's time).

It writes the sink's intervals, the events, each process's figures and CPU use, and a
verdict as JSON (``--out``) and a PNG timeline of throughput and latency with the events
marked (``--png``), and prints a table.  The run is invalid when the sender or the sink
had no CPU headroom (over 85% of a core) or the sender fell behind its rate; it exits
non-zero when a frame was lost or the output differs (after a kill: when a frame was lost
beyond those sent to the killed instance, whose unprocessed frames and state die with
it; the output is then not compared).

:class:`LiveCluster` keeps a controller, the store and the instances up across several
short runs of a sender and a sink at different rates (``bench.backends`` searches each
backend's highest rate that loses nothing with it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baselines import STORE_BACKENDS
from bench._common import check_capture, check_nf, split_nf_options
from nf.serve import BACKENDS
from store.cli.common import OneLineParser

__all__ = ["LiveCluster", "LiveConfig", "main", "run_live", "start_store"]

ROOT = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1


@dataclass
class LiveConfig:
    nf: str = "prads"
    instances: int = 2
    rate: float = 2000.0
    duration: float | None = None
    flows: int = 400
    pcap: str | None = None
    backend: str = "s6"
    #: The backend's store (``HOST:PORT``); None: started here for remote-only and redis.
    store: str | None = None
    steer: str = "hash"
    steer_over: float = 0.0
    scaling: bool = True
    scale_in_by: str = "sigterm"
    #: Seconds after the sender starts before the scale-out instance is started, and
    #: after the sender steers to it before the scale-in.
    out_after: float = 1.0
    in_after: float = 1.0
    garbage: bool = False
    #: The sender's ``--keep-order``: a re-steer holds the moved flows' frames until their
    #: old instance has processed what it got of them.
    keep_order: bool = True
    #: Seconds the leaver is stopped (SIGSTOP) before its SIGTERM: its socket fills, so
    #: that many of its flows' frames wait there when the sender steers them away (a wide
    #: window for a moved flow's frames to be processed out of order).  Under the
    #: controller's failure timeout.
    stall_leaver: float = 0.0
    check: bool = True
    progress: bool = False
    workdir: str | None = None
    nf_options: list[str] = field(default_factory=list)


class Proc:
    """A child process whose stdout lines are read by a thread into a queue."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        stderr_to: Path | None = None,
        program: str | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        err = open(stderr_to, "w") if stderr_to else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            [program or sys.executable, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.stderr_path = stderr_to
        self.stdout_path = stderr_to.with_suffix(".out") if stderr_to else None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        copy = open(self.stdout_path, "w") if self.stdout_path else None
        for line in self.popen.stdout:
            if copy is not None:
                copy.write(line)
                copy.flush()
            self.lines.put(line.rstrip("\n"))
        if copy is not None:
            copy.close()
        self.lines.put(None)

    def wait_line(self, predicate: Any, timeout: float) -> str:
        """The next stdout line (JSON or not) that ``predicate`` accepts, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no expected line in {timeout:g} s: {self.tail()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.popen.wait()}): {self.tail()}")
            self.seen.append(line)
            if predicate(line):
                return line

    def event(self, kind: str, timeout: float, **match: Any) -> dict[str, Any]:
        def ok(line: str) -> bool:
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            return (
                isinstance(obj, dict)
                and obj.get("event") == kind
                and all(obj.get(k) == v for k, v in match.items())
            )

        return dict(json.loads(self.wait_line(ok, timeout)))

    def events(self, kind: str) -> list[dict[str, Any]]:
        """Lines of ``kind`` seen so far, plus any still queued (after the process ended)."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        out = []
        for line in self.seen:
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("event") == kind:
                    out.append(obj)
        return out

    def tail(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_text()[-2000:]
        return ""

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds so far (Linux /proc), None once it has exited."""
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None and self.events("exit"):
            # It said it is ending: let it (a signal now could cut its last writes short,
            # an ``S6_PROFILE`` file among them).
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.popen.wait(timeout)
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _redis_pings(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_store(backend: str, work: Path, procs: list[Proc]) -> str | None:
    """Start the store a remote-only backend keeps its state in, as a process appended to
    ``procs`` (named ``store``, so its CPU is counted with the others); its ``HOST:PORT``,
    or None for the backends that have none (s6, local-only).

    ``remote-only``: ``python -m baselines.kv_server`` on a free port (it prints the port
    it bound).  ``redis``: Debian's ``redis-server`` without persistence on a free port
    (probed, then retried on another if it exits: another process may take the port in
    between), ready once it answers PING; :class:`FileNotFoundError` when it is not
    installed."""
    if backend == "remote-only":
        kv = Proc(
            "store",
            ["-m", "baselines.kv_server", "--listen", "127.0.0.1:0"],
            stderr_to=work / "store.err",
        )
        procs.append(kv)
        return kv.wait_line(lambda s: s.startswith("kv server listening on"), 30).split()[-1]
    if backend != "redis":
        return None
    from baselines.redis_client import redis_server_path

    path = redis_server_path()
    if path is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    for _attempt in range(5):
        port = _free_port()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        server = Proc("store", args, stderr_to=work / "store.err", program=path)
        deadline = time.monotonic() + 10
        while server.popen.poll() is None and time.monotonic() < deadline:
            if _redis_pings(port):
                procs.append(server)
                return f"127.0.0.1:{port}"
            time.sleep(0.02)  # not listening yet: poll until the deadline
        server.stop()
    raise RuntimeError("redis-server did not start on any of 5 free ports")


_NAT_PUBLIC = re.compile(r"-> (\S+):\d+ ")


def _comparable(nf: str, line: str) -> str:
    """What of an output line must equal the offline run's: live, the NF's clock is the
    moment the sender sent the frame, and the NAT's public ports depend on which instance
    allocated them (from its own shards of the pool), so PRADS's asset lines lose their
    last field (the time), the IDS's fast alerts their first (the time stamp), the NAT
    table's lines their public port (whether a port went to two live connections is
    checked apart, ``_ports_reused``)."""
    if nf == "prads":
        head, sep, _ = line.rpartition(",")
        return head if sep else line
    if nf == "ids":
        return line.split(" ", 1)[-1]
    if nf == "nat":
        return _NAT_PUBLIC.sub(r"-> \1:* ", line, count=1)
    return line


def _ports_reused(lines: list[str]) -> list[str]:
    """NAT table lines whose public address and port another line has too."""
    seen: dict[str, int] = {}
    for line in lines:
        found = _NAT_PUBLIC.search(line)
        if found is not None:
            public = line.split(" ", 1)[0] + " " + found.group(0)
            seen[public] = seen.get(public, 0) + 1
    return sorted(public for public, n in seen.items() if n > 1)


def _offline(cfg: LiveConfig, pcap: Path) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "nf", cfg.nf, "--pcap", str(pcap), *cfg.nf_options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        check=True,
    )
    return out.stdout.splitlines()


def _query(controller: str, nf: str, name: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "nf", "query", "--controller", controller, "--json", nf, name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"nf query {name}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def _phases(
    intervals: list[dict[str, Any]], marks: list[tuple[str, float]]
) -> list[dict[str, Any]]:
    """Throughput and latency between consecutive marks (wall-clock times)."""
    out = []
    for (label, start), (_, end) in itertools.pairwise(marks):
        rows = [i for i in intervals if start <= i["t"] < end and i["received"]]
        if not rows:
            continue
        p50 = sorted(i["latency_us"].get("p50", 0) for i in rows)
        out.append(
            {
                "phase": label,
                "seconds": round(end - start, 2),
                "pps": round(sum(i["received"] for i in rows) / (len(rows) * 0.1), 1),
                "latency_p50_us": p50[len(p50) // 2],
                "latency_p99_us": max(i["latency_us"].get("p99", 0) for i in rows),
                "latency_max_us": max(i["latency_us"].get("max", 0) for i in rows),
                "reordered": sum(i["reordered"] for i in rows),
            }
        )
    return out


@contextlib.contextmanager
def _workdir(cfg: LiveConfig) -> Iterator[Path]:
    if cfg.workdir:
        path = Path(cfg.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="s6-live-") as tmp:
            yield Path(tmp)


def run_live(cfg: LiveConfig) -> dict[str, Any]:
    """Run the whole experiment; the result as ``--out`` writes it."""
    with _workdir(cfg) as work:
        return _run(cfg, work)


def _run(cfg: LiveConfig, work: Path) -> dict[str, Any]:
    pcap = Path(cfg.pcap) if cfg.pcap else work / "traffic.pcap"
    if not cfg.pcap:
        from bench.traffic import main as traffic

        with contextlib.redirect_stdout(sys.stderr):
            traffic(["make", "--flows", str(cfg.flows), "--seed", "1", "--out", str(pcap)])
    procs: list[Proc] = []
    result: dict[str, Any] = {"config": {**cfg.__dict__, "pcap": str(pcap)}, "cores": CORES}
    try:
        controller = Proc(
            "controller",
            ["-m", "store.controller", "--listen", "127.0.0.1:0"],
            stderr_to=work / "controller.err",
        )
        procs.append(controller)
        address = controller.wait_line(lambda s: s.startswith("listening on"), 20).split()[-1]
        store = cfg.store or start_store(cfg.backend, work, procs)
        result["store"] = store
        sink_args = ["-m", "bench.sink", "--out", str(work / "sink.json"), "--drain-timeout", "5"]
        if cfg.progress:
            sink_args.append("--progress")
        sink = Proc("sink", sink_args, stderr_to=None if cfg.progress else work / "sink.err")
        procs.append(sink)
        sink_address = sink.event("ready", 20)["address"]

        def instance(i: int) -> Proc:
            proc = Proc(
                f"instance-{i}",
                [
                    "-m",
                    "nf",
                    "serve",
                    cfg.nf,
                    "--controller",
                    address,
                    "--data",
                    "127.0.0.1:0",
                    "--sink",
                    sink_address,
                    "--backend",
                    cfg.backend,
                    *(["--store", store] if store else []),
                    *cfg.nf_options,
                ],
                stderr_to=work / f"instance-{i}.err",
            )
            procs.append(proc)
            return proc

        first = [instance(i) for i in range(cfg.instances)]
        ready = [p.event("ready", 30) for p in first]
        if cfg.garbage:
            import socket

            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for r in ready:
                    host, _, port = r["data"].rpartition(":")
                    s.sendto(b"not a datagram of ours", (host, int(port)))
            for p in first:
                p.event("bad-datagram", 10)
        sender_args = [
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
            cfg.steer,
            "--steer-over",
            str(cfg.steer_over),
            "--min-instances",
            str(cfg.instances),
            "--nf",
            cfg.nf,
            "--keep-order",
            "on" if cfg.keep_order else "off",
        ]
        if cfg.duration is not None:
            sender_args += ["--duration", str(cfg.duration)]
        if cfg.nf_options:  # (the NF's flow key, for --steer owner, depends on them)
            sender_args += ["--", *cfg.nf_options]
        sender = Proc("sender", sender_args, stderr_to=work / "sender.err")
        procs.append(sender)
        started = sender.event("started", 60)
        cpu0 = {p.name: p.cpu_seconds() for p in procs}
        wall0 = time.time()
        marks: list[tuple[str, float]] = [("before", started["t"])]
        events: list[dict[str, Any]] = []
        leaver: Proc | None = None
        if cfg.scaling:
            time.sleep(cfg.out_after)  # the schedule of the experiment, not a wait for luck
            t = time.time()
            joiner = instance(cfg.instances)
            name = joiner.event("ready", 30)["name"]
            events.append({"kind": "scale-out started", "t": t, "instance": name})
            steered = sender.event("scale-out", 60, instance=name)
            events.append({"kind": "scale-out steered", "t": steered["t"], "instance": name})
            marks.append(("after scale-out", steered["t"]))
            time.sleep(cfg.in_after)
            leaver = first[0]
            gone = ready[0]["name"]
            t = time.time()
            events.append({"kind": "scale-in started", "t": t, "instance": gone})
            if cfg.scale_in_by == "ctl":
                subprocess.Popen(
                    [sys.executable, "-m", "store.ctl", "--controller", address, "scale-in", gone],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
            elif cfg.scale_in_by == "kill":
                leaver.popen.kill()  # a crash: no leave, its state and queue die with it
            elif cfg.stall_leaver:
                leaver.popen.send_signal(signal.SIGSTOP)
                time.sleep(cfg.stall_leaver)  # the experiment's schedule: a backlog builds
                leaver.popen.send_signal(signal.SIGTERM)
                leaver.popen.send_signal(signal.SIGCONT)
            else:
                leaver.popen.send_signal(signal.SIGTERM)
            steered = sender.event("scale-in", 60, instance=gone)
            events.append({"kind": "scale-in steered", "t": steered["t"], "instance": gone})
            marks.append(("after scale-in", steered["t"]))
        done = sender.event("done", 600)
        marks.append(("end", done["ended_t"]))
        cpu1 = {p.name: p.cpu_seconds() for p in procs}
        wall = time.time() - wall0
        sink_done = sink.event("done", 120)
        if leaver is not None and cfg.scale_in_by == "kill":
            # Frames sent to it that it had not answered for are lost, and only those.
            to_it = done["per_instance"].get(gone, 0)
            result["killed"] = {"instance": gone, "frames_sent_to_it": to_it}
        elif leaver is not None:
            result["leaver"] = leaver.event("exit", 60)
            leaver.popen.wait(30)
        report = json.loads((work / "sink.json").read_text())
        answer: Any = None
        lines_match: bool | None = None
        output_query = _output_query(cfg.nf)
        try:
            answer = _query(address, cfg.nf, output_query)
        except RuntimeError as exc:
            result["query_error"] = str(exc)
        serving = {}
        for p in procs:
            if p.name.startswith("instance") and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in procs:
            if p.name.startswith("instance") and not (p is leaver and "killed" in result):
                exits = p.events("exit") or [p.event("exit", 60)]
                serving[p.name] = exits[-1]
        # (the sender loops the capture only for a --duration; --flows sizes a generated one)
        one_pass = cfg.duration is None
        # A killed instance's state died with it: the output is not the offline run's.
        one_pass = one_pass and "killed" not in result
        # local-only never reconciles its instances' state: its output is not the NF's.
        correct = cfg.backend != "local-only"
        if cfg.check and one_pass and correct and isinstance(answer, list):
            offline = _offline(cfg, pcap)
            live_set = sorted(_comparable(cfg.nf, x) for x in answer)
            offline_set = sorted(_comparable(cfg.nf, x) for x in offline)
            reused = _ports_reused(answer) if cfg.nf == "nat" else []
            lines_match = live_set == offline_set and not reused
            result["output"] = {
                "query": output_query,
                "live_lines": len(answer),
                "offline_lines": len(offline),
                "only_live": sorted(set(live_set) - set(offline_set))[:20],
                "only_offline": sorted(set(offline_set) - set(live_set))[:20],
                **({"ports_reused": reused[:20]} if reused else {}),
            }
        cpu = {}
        for name, before in cpu0.items():
            after = cpu1.get(name)
            if before is not None and after is not None:
                cpu[name] = round((after - before) / wall, 3)
        total = report["total"]
        valid = bool(done["valid"] and report["valid"])
        result.update(
            {
                "controller": address,
                "started_t": started["t"],
                "sender": done,
                "sink": {k: v for k, v in report.items() if k != "intervals"},
                "intervals": report["intervals"],
                "events": events,
                "phases": _phases(report["intervals"], marks),
                "instances": serving,
                "cpu_share_of_core": cpu,
                "cores_used": round(sum(cpu.values()), 3),
                "output_matches_offline": lines_match,
                "lost": total["lost"],
                "reordered": total["reordered"],
                "valid": valid,
                "invalid_because": [
                    why
                    for why, bad in (
                        ("the sender had no CPU headroom", done["cpu"]["share_of_core"] >= 0.85),
                        (
                            "the sender fell behind its rate",
                            done["rate_achieved"] < 0.95 * cfg.rate,
                        ),
                        ("the sink had no CPU headroom", not report["cpu"]["headroom"]),
                    )
                    if bad
                ],
                "sink_done": sink_done,
            }
        )
        return result
    finally:
        for p in reversed(procs):
            p.stop()


def _machine_busy() -> float:
    """CPU seconds all processes of the machine have used (Linux /proc/stat): with our own
    processes' seconds it tells how much other work shared the cores."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_kind(name: str) -> str:
    """``instance-3`` -> ``instances``: the kinds CPU use is reported by."""
    return "instances" if name.startswith("instance") else name


class LiveCluster:
    """A controller, the backend's store and N NF instances kept up across trials, each a
    fresh sink and sender at one rate for a while, without scaling (``bench.backends``).

    The instances are started once with a sink address on a port chosen here, and every
    trial's sink listens there.  Each trial's sender starts at the capture pass after the
    last one the previous trial used, so its flows are new to the NF (the NF's work per
    packet stays that of a steady mix of new and ongoing flows, and a rate is not
    flattered by state an earlier trial made; the sender has 255 fresh passes, then
    starts over).  A trial ends when its sink does: every frame in, or ``drain`` seconds
    without an arrival, by which time the instances have nothing left to do, so the next
    trial starts on idle instances."""

    def __init__(
        self,
        nf: str,
        backend: str,
        pcap: Path,
        work: Path,
        *,
        instances: int = 2,
        store: str | None = None,
        nf_options: list[str] | None = None,
        drain: float = 1.5,
        steer: str = "hash",
    ) -> None:
        self.nf = nf
        self.backend = backend
        self.pcap = pcap
        self.work = work
        self.instances = instances
        self.store = store
        self.nf_options = nf_options or []
        self.drain = drain
        self.steer = steer
        self.procs: list[Proc] = []
        self.controller = ""
        self.sink_address = ""
        self.next_pass = 1
        self.trials = 0

    def __enter__(self) -> LiveCluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def _start(self) -> None:
        work = self.work
        controller = Proc(
            "controller",
            ["-m", "store.controller", "--listen", "127.0.0.1:0"],
            stderr_to=work / "controller.err",
        )
        self.procs.append(controller)
        self.controller = controller.wait_line(lambda s: s.startswith("listening on"), 30).split()[
            -1
        ]
        self.store = self.store or start_store(self.backend, work, self.procs)
        self.sink_address = f"127.0.0.1:{_free_port()}"
        started = []
        for i in range(self.instances):
            proc = Proc(
                f"instance-{i}",
                [
                    "-m",
                    "nf",
                    "serve",
                    self.nf,
                    "--controller",
                    self.controller,
                    "--data",
                    "127.0.0.1:0",
                    "--sink",
                    self.sink_address,
                    "--backend",
                    self.backend,
                    *(["--store", self.store] if self.store else []),
                    *self.nf_options,
                ],
                stderr_to=work / f"instance-{i}.err",
            )
            self.procs.append(proc)
            started.append(proc)
        for proc in started:
            proc.event("ready", 60)

    def _cpu(self, procs: list[Proc]) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in procs:
            seconds = p.cpu_seconds()
            if seconds is not None:
                out[p.name] = seconds
        return out

    def trial(self, rate: float, duration: float) -> dict[str, Any]:
        """Send at ``rate`` frames/s for ``duration`` s; what the sender, the sink and the
        processes' CPU use say (see the keys)."""
        self.trials += 1
        n = self.trials
        work = self.work
        sink = Proc(
            "sink",
            [
                "-m",
                "bench.sink",
                "--listen",
                self.sink_address,
                "--out",
                str(work / f"sink-{n}.json"),
                "--drain-timeout",
                str(self.drain),
            ],
            stderr_to=work / f"sink-{n}.err",
        )
        trial_procs = [sink]
        try:
            sink.event("ready", 30)
            sender = Proc(
                "sender",
                [
                    "-m",
                    "bench.sender",
                    "--controller",
                    self.controller,
                    "--sink",
                    self.sink_address,
                    "--pcap",
                    str(self.pcap),
                    "--rate",
                    str(rate),
                    "--duration",
                    str(duration),
                    "--min-instances",
                    str(self.instances),
                    "--nf",
                    self.nf,
                    "--first-pass",
                    str(self.next_pass),
                    "--steer",
                    self.steer,
                    *(["--", *self.nf_options] if self.nf_options else []),
                ],
                stderr_to=work / f"sender-{n}.err",
            )
            trial_procs.append(sender)
            procs = self.procs + trial_procs
            started = sender.event("started", 60)
            cpu0, busy0, wall0 = self._cpu(procs), _machine_busy(), time.monotonic()
            done = sender.event("done", duration + 60)
            cpu1, busy1, wall = self._cpu(procs), _machine_busy(), time.monotonic() - wall0
            sink.event("done", 60 + self.drain)
            report = json.loads((work / f"sink-{n}.json").read_text())
        finally:
            for p in trial_procs:
                p.stop()
        passes = -(-int(done["flows"]) // max(int(done["capture_flows"]), 1))
        self.next_pass += passes
        if self.next_pass > 255:
            self.next_pass = 1
        cpu: dict[str, float] = {}
        for name, before in cpu0.items():
            after = cpu1.get(name)
            if after is not None:
                kind = process_kind(name)
                cpu[kind] = round(cpu.get(kind, 0.0) + after - before, 3)
        total = report["total"]
        ours = sum(cpu.values())
        return {
            "rate": rate,
            "duration": duration,
            "started_t": started["t"],
            "sent": done["sent"],
            "rate_achieved": done["rate_achieved"],
            "received": total["received"],
            "lost": total["lost"],
            "reordered": total["reordered"],
            "duplicates": total["duplicates"],
            "sender_seconds": done["seconds"],
            # first to last arrival at the sink: longer than the sending by the backlog
            # the instances still had when the sender stopped
            "sink_seconds": total["seconds"],
            "delivered_pps": total["pps"],
            "latency_us": total["latency_us"],
            "sender_cpu_share": done["cpu"]["share_of_core"],
            "sink_cpu_share": report["cpu"]["share_of_core"],
            "sender_valid": bool(done["valid"]),
            "sink_valid": bool(report["valid"]),
            "wall_s": round(wall, 3),
            "cpu_s": cpu,
            "cpu_s_others": round(max(busy1 - busy0 - ours, 0.0), 3),
            "cores_busy": round((busy1 - busy0) / wall, 3) if wall > 0 else 0.0,
        }


def _output_query(nf: str) -> str:
    from nf import registry

    return registry.load(nf).output_query


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["intervals"]
    if not rows:
        return
    t0 = result["started_t"]
    t = [r["t"] - t0 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    ax1.plot(t, [r["pps"] for r in rows], lw=1)
    ax1.set_ylabel("frames/s delivered")
    ax2.plot(t, [r["latency_us"].get("p50", float("nan")) / 1e3 for r in rows], lw=1, label="p50")
    ax2.plot(t, [r["latency_us"].get("p99", float("nan")) / 1e3 for r in rows], lw=1, label="p99")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("seconds since the sender started")
    colors = {"scale-out": "tab:green", "scale-in": "tab:red"}
    for e in result["events"]:
        color = colors["scale-out" if e["kind"].startswith("scale-out") else "scale-in"]
        style = "--" if e["kind"].endswith("started") else "-"
        for ax in (ax1, ax2):
            ax.axvline(e["t"] - t0, color=color, ls=style, lw=0.8)
        ax1.text(e["t"] - t0, ax1.get_ylim()[1], e["kind"], rotation=90, va="top", fontsize=7)
    ax2.legend(loc="upper right")
    cfg = result["config"]
    fig.suptitle(
        f"{cfg['nf']} on {cfg['backend']}, {cfg['instances']} instances, "
        f"{cfg['rate']:g} frames/s, steer {cfg['steer']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    s, k = result["sender"], result["sink"]["total"]
    out.print(
        f"sent {s['sent']:,} frames of {s['flows']:,} flows in {s['seconds']} s "
        f"({s['rate_achieved']:,.0f}/s of {s['rate']:,.0f}); delivered {k['received']:,}, "
        f"lost {k['lost']}, reordered {k['reordered']}, dropped by the NF {k['dropped_by_nf']}"
    )
    table = Table("phase", "seconds", "frames/s", "p50 µs", "p99 µs", "max µs", "reordered")
    for p in result["phases"]:
        table.add_row(
            p["phase"],
            f"{p['seconds']}",
            f"{p['pps']:,.0f}",
            f"{p['latency_p50_us']:,.0f}",
            f"{p['latency_p99_us']:,.0f}",
            f"{p['latency_max_us']:,.0f}",
            f"{p['reordered']}",
        )
    out.print(table)
    for e in s["events"]:
        if e["kind"] == "paused":
            out.print(
                f"paused ({e['why']}): {e['pause_ms']:,.1f} ms for {e['flows_moved']:,} moved "
                f"flows, {e.get('held_frames', e.get('held_datagrams', 0)):,} "
                f"{'frames' if 'held_frames' in e else 'datagrams'} held, "
                f"{e['timed_out']} markers timed out"
                + (f", {e['old_gone']} given up (their instance died)" if e.get("old_gone") else "")
            )
    out.print(
        f"CPU (share of one core): {result['cpu_share_of_core']}; {result['cores_used']} of "
        f"{result['cores']} cores"
    )
    killed = result.get("killed")
    if killed is not None:
        out.print(
            f"killed {killed['instance']} (SIGKILL): {killed['frames_sent_to_it']:,} frames were "
            f"sent to it; {result['lost']:,} lost in all"
        )
    if result.get("output_matches_offline") is not None:
        out.print(f"output equals the offline run's: {result['output_matches_offline']}")
    if not result["valid"]:
        out.print(f"[bold red]INVALID RUN[/]: {', '.join(result['invalid_because'])}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.live", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (about 25 s)")
    parser.add_argument("--nf", default="prads")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration", type=float, help="seconds (loops the capture)")
    parser.add_argument("--flows", type=int, help="flows of the generated capture")
    parser.add_argument("--pcap")
    parser.add_argument("--backend", default="s6", choices=BACKENDS)
    parser.add_argument(
        "--store", metavar="HOST:PORT", help="the backend's store (default: started here)"
    )
    parser.add_argument("--steer", choices=("hash", "owner"), default="hash")
    parser.add_argument("--steer-over", type=float, default=0.0)
    parser.add_argument(
        "--scale-in-by",
        choices=("sigterm", "ctl", "kill"),
        default="sigterm",
        help="how the scale-in comes: a graceful leave (SIGTERM or ctl scale-in) or a "
        "crash (SIGKILL: the controller declares it dead and repairs the ring)",
    )
    parser.add_argument(
        "--keep-order", choices=("on", "off"), default="on", help="the sender's (on)"
    )
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--out", default="results/live.json")
    parser.add_argument("--png", default="results/live.png")
    parser.add_argument("--workdir", help="keep the processes' logs here")
    # What follows a lone "--" is the NF's own options, given to its instances, to the
    # offline run it is compared with and to the sender (as in bench.sender).
    own, nf_options = split_nf_options(argv)
    args = parser.parse_args(own)
    nf_cls = check_nf(parser, args.nf)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    for name in ("rate", "duration", "flows"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive")
    if args.steer_over < 0:
        parser.error("--steer-over must not be negative")
    if args.store is not None and args.backend not in STORE_BACKENDS:
        parser.error("--store is for --backend remote-only or redis")
    if args.pcap is not None:
        check_capture(parser, args.pcap, decode_links=nf_cls.decodes_links)
    quick = args.quick
    cfg = LiveConfig(
        nf=args.nf,
        instances=args.instances,
        rate=args.rate or (2000.0 if quick else 5000.0),
        duration=args.duration,
        flows=args.flows or (1000 if quick else 4000),
        pcap=args.pcap,
        backend=args.backend,
        store=args.store,
        steer=args.steer,
        steer_over=args.steer_over,
        scaling=not args.no_scaling,
        scale_in_by=args.scale_in_by,
        keep_order=args.keep_order == "on",
        out_after=1.0 if quick else 5.0,
        in_after=1.5 if quick else 5.0,
        progress=sys.stderr.isatty(),
        workdir=args.workdir,
        nf_options=nf_options,
    )
    try:
        result = run_live(cfg)
    except (RuntimeError, TimeoutError) as exc:  # a process that failed to start or stopped
        print(f"{parser.prog}: error: {str(exc).strip()}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.png))
    _table(result)
    print(f"wrote {args.out} and {args.png}")
    if result.get("output_matches_offline") is False:
        return 1
    killed = result.get("killed")
    if killed is not None:  # frames at the killed instance die with it; no others
        return 0 if result["lost"] <= killed["frames_sent_to_it"] else 1
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
