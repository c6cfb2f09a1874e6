"""The backends side by side, live: each one's highest rate that loses nothing, and latency.

::

    python -m bench.backends [--quick] [--nf prads,nat,ids] [--instances 2]
        [--backends s6,local-only,remote-only,redis] [--out results/backends.json]
        [--png results/backends.png] [--workdir DIR] [--steer hash|owner]
    python -m bench.backends --replot results/backends.json   # the PNG again

For each NF and each backend (``s6``; ``local-only``; ``remote-only`` on our kv server;
``redis``, remote-only on a real ``redis-server``, left out in one line when it is not
installed) it starts a cluster of real processes on loopback (``bench.live.LiveCluster``:
a controller, the backend's store, N instances of ``python -m nf serve``) and runs short
trials of a sender and a sink against it, without scaling:

* **Highest rate that loses nothing**, found by search: the rate doubles from
  ``--start-rate`` until a trial fails, then a bisection (on a log scale) narrows the gap
  between the highest rate that passed and the lowest that failed to ``--precision``; the
  rate found is run once more and must pass again (else the search steps down), so one
  lucky trial on a shared machine does not make the figure.  A trial passes when no frame
  is lost, the sender kept its rate, and the instances kept up: the sink's first-to-last
  arrival took at most 5% (+50 ms) longer than the sending, since a short run at a rate
  the instances cannot sustain loses nothing while the kernel's socket buffers (several MB
  here) fill, and only its backlog shows it.
* **Latency** p50/p99 (send to sink, µs) at one rate every backend of that NF sustains:
  ``--latency-share`` (0.5) of the lowest of their highest rates, on a fresh cluster each,
  the median over ``--latency-repeats`` trials.
* **CPU**: the CPU seconds each kind of process used during a trial (instances, store,
  controller, sender, sink, and the rest of the machine: other work on these cores), at
  each backend's highest rate and at the latency rate.

The run is **invalid**, and says so in the output and the JSON (``valid``,
``invalid_because``), when the sender or the sink used over 85% of a core in a trial that
sets a figure (the trial at a backend's highest rate, the failed trial just above it, the
latency trials): the limit found may then be theirs rather than the backend's.

It also compares our Redis client (``baselines.redis_client``, trio over hiredis's parser,
pipelined) with redis-py's pipelines on hiredis, on one ``redis-server`` in the same run:
pipelines of GET and SET, alternated, best of several rounds each (redis-py is a
dependency for this comparison alone).

The ratios the issue sets as goals are printed and written: S6's highest rate over
local-only's (>= 0.9), over remote-only's on our store (>= 5) and on Redis (>= 3); the
remote-only backends' median latency over S6's (>= 10 each); our Redis client's rate over
redis-py's (>= 0.8).  ``--quick`` (PRADS only, shorter trials, a coarser search) takes a
few minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.live import CORES, LiveCluster, Proc, start_store
from store.cli.common import OneLineParser

__all__ = ["Plan", "main", "run", "search", "sustained"]

NFS: Final = ("prads", "nat", "ids")
BACKENDS: Final = ("s6", "local-only", "remote-only", "redis")
#: Options each NF is served with: the generated traffic's clients are inside 10.0.0.0/16,
#: and the sender's later passes XOR the second octet, so the NAT's inside is all of 10/8.
NF_OPTIONS: Final = {"nat": ["--inside", "10.0.0.0/8"]}
#: Share of one core above which the sender or the sink may be the bottleneck.
CPU_LIMIT: Final = 0.85
#: A trial keeps up when its deliveries took at most this much longer than the sending.
BACKLOG_SHARE: Final = 0.05
BACKLOG_SLACK_S: Final = 0.05
GOALS: Final = {
    "s6_over_local_only": 0.9,
    "s6_over_remote_only": 5.0,
    "s6_over_redis": 3.0,
    "remote_only_p50_over_s6": 10.0,
    "redis_p50_over_s6": 10.0,
    "our_redis_client_over_redis_py": 0.8,
}


@dataclass
class Plan:
    """How long and how finely to measure."""

    nfs: tuple[str, ...] = NFS
    backends: tuple[str, ...] = BACKENDS
    instances: int = 2
    #: The sender's steering: ``hash`` (the paper's) or ``owner`` (the key's owner).
    steer: str = "hash"
    flows: int = 3000
    trial_s: float = 3.0
    start_rate: float = 1000.0
    max_rate: float = 256_000.0
    min_rate: float = 50.0
    precision: float = 0.07
    confirm: bool = True
    latency_share: float = 0.5
    latency_s: float = 4.0
    latency_repeats: int = 2
    redis_commands: int = 100_000
    redis_pipeline: int = 100
    redis_rounds: int = 3

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            nfs=("prads",),
            trial_s=2.0,
            precision=0.15,
            latency_s=2.0,
            latency_repeats=1,
            redis_commands=40_000,
            redis_rounds=2,
        )


def sustained(trial: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether a trial passed, and why not (see the module docstring)."""
    why = []
    if trial["lost"]:
        why.append(f"lost {trial['lost']}")
    if trial["rate_achieved"] < 0.95 * trial["rate"]:
        why.append(f"sender behind ({trial['rate_achieved']:,.0f}/s)")
    backlog = trial["sink_seconds"] - trial["sender_seconds"]
    if backlog > BACKLOG_SHARE * trial["sender_seconds"] + BACKLOG_SLACK_S:
        why.append(f"backlog {backlog:.2f} s")
    return not why, why


def _headroom_problems(trial: dict[str, Any], what: str) -> list[str]:
    out = []
    if trial["sender_cpu_share"] >= CPU_LIMIT:
        out.append(f"the sender used {trial['sender_cpu_share']:.0%} of a core ({what})")
    if trial["sink_cpu_share"] >= CPU_LIMIT:
        out.append(f"the sink used {trial['sink_cpu_share']:.0%} of a core ({what})")
    return out


Log = Callable[[str], None]


def search(open_cluster: Callable[[], LiveCluster], plan: Plan, log: Log) -> dict[str, Any]:
    """The highest rate the backend sustains (see the module docstring).

    A failed trial leaves the instances' state as overload left it (flows whose last
    packets were lost never end: a NAT's entries and ports stay taken, parked work may
    still be waiting), and that slowed every later trial on the same cluster by an order
    of magnitude in a first run: so the trial after a failure runs on a fresh cluster."""
    trials: list[dict[str, Any]] = []
    clusters = [open_cluster().__enter__()]

    def attempt(rate: float) -> bool:
        trial = clusters[-1].trial(round(rate), plan.trial_s)
        ok, why = sustained(trial)
        if not ok:
            clusters[-1].close()
            clusters.append(open_cluster().__enter__())
        trial["passed"], trial["why"] = ok, why
        trials.append(trial)
        log(
            f"  {rate:>9,.0f}/s  {'pass' if ok else 'FAIL ' + ', '.join(why)}"
            f"  (p50 {trial['latency_us'].get('p50', 0):,.0f} µs, sender "
            f"{trial['sender_cpu_share']:.0%}, sink {trial['sink_cpu_share']:.0%}, "
            f"{trial['cores_busy']:.2f} of {CORES} cores busy)"
        )
        return ok

    try:
        return _search(attempt, trials, plan)
    finally:
        clusters[-1].close()


def _search(
    attempt: Callable[[float], bool], trials: list[dict[str, Any]], plan: Plan
) -> dict[str, Any]:
    best: float | None = None
    fail: float | None = None
    rate = plan.start_rate
    while rate <= plan.max_rate:  # grow until a failure
        if attempt(rate):
            best, rate = rate, rate * 2
        else:
            fail = rate
            break
    if best is None:  # even the start failed: halve down
        rate = plan.start_rate / 2
        while rate >= plan.min_rate:
            if attempt(rate):
                best = rate
                break
            fail, rate = rate, rate / 2
    for _round in range(3):
        if best is None:
            break
        while fail is not None and fail / best > 1 + plan.precision:
            mid = (best * fail) ** 0.5
            if attempt(mid):
                best = mid
            else:
                fail = mid
        if not plan.confirm or attempt(best):
            break
        # Not repeatable: the rate above it is a failure now; search below it again.
        fail, best = best, best / (1 + plan.precision) ** 2
        while best >= plan.min_rate and not attempt(best):
            fail, best = best, best / 2
        if best < plan.min_rate:
            best = None
    at_best = [t for t in trials if best is not None and t["rate"] == round(best) and t["passed"]]
    above = [t for t in trials if not t["passed"] and (best is None or t["rate"] > best)]
    bound = min(above, key=lambda t: t["rate"]) if above else None
    problems = []
    if at_best:
        problems += _headroom_problems(at_best[-1], f"at {at_best[-1]['rate']:,}/s")
    if bound is not None:
        problems += _headroom_problems(bound, f"at {bound['rate']:,}/s, the failure above")
    if best is None:
        problems.append(f"nothing passed down to {plan.min_rate:g}/s")
    return {
        "max_rate": None if best is None else round(best),
        "failed_at": None if bound is None else bound["rate"],
        "failed_because": None if bound is None else bound["why"],
        "capped": fail is None and best is not None,
        "at_max": at_best[-1] if at_best else None,
        "trials": trials,
        "problems": problems,
    }


def latency(cluster: LiveCluster, rate: float, plan: Plan, log: Log) -> dict[str, Any]:
    """p50/p99 at ``rate``: the median over the repeats."""
    trials = []
    for _ in range(plan.latency_repeats):
        trial = cluster.trial(round(rate), plan.latency_s)
        ok, why = sustained(trial)
        trial["passed"], trial["why"] = ok, why
        trials.append(trial)
        lat = trial["latency_us"]
        log(
            f"  {rate:>9,.0f}/s  p50 {lat.get('p50', 0):,.0f} µs  p99 {lat.get('p99', 0):,.0f}"
            f" µs  {'' if ok else 'FAIL ' + ', '.join(why)}"
        )
    problems = []
    for t in trials:
        problems += _headroom_problems(t, f"latency at {t['rate']:,}/s")
    return {
        "rate": round(rate),
        "p50_us": statistics.median(t["latency_us"].get("p50", 0.0) for t in trials),
        "p99_us": statistics.median(t["latency_us"].get("p99", 0.0) for t in trials),
        "all_passed": all(t["passed"] for t in trials),
        "trials": trials,
        "problems": problems,
    }


# --- the Redis clients ---------------------------------------------------------------------


def _workload(n: int) -> list[tuple[bytes, ...]]:
    value = b"v" * 64
    out: list[tuple[bytes, ...]] = []
    for i in range(n):
        key = b"bench:%d" % (i % 1000)
        out.append((b"SET", key, value) if i % 2 == 0 else (b"GET", key))
    return out


async def _ours(address: str, commands: list[tuple[bytes, ...]], size: int) -> float:
    from baselines.redis_client import open_redis

    batches = [commands[i : i + size] for i in range(0, len(commands), size)]
    async with open_redis(address) as conn:
        await conn.pipeline(batches[0])  # connected and warm, as redis-py's below
        t = time.perf_counter()
        for batch in batches:
            await conn.pipeline(batch)
        return len(commands) / (time.perf_counter() - t)


def _redis_py(client: Any, commands: list[tuple[bytes, ...]], size: int) -> float:
    batches = [commands[i : i + size] for i in range(0, len(commands), size)]
    client.ping()
    t = time.perf_counter()
    for batch in batches:
        pipe = client.pipeline(transaction=False)
        for cmd in batch:
            pipe.execute_command(*cmd)
        pipe.execute()
    return len(commands) / (time.perf_counter() - t)


def compare_redis_clients(plan: Plan, work: Path, log: Log) -> dict[str, Any]:
    """Our client against redis-py (pipelined, hiredis) on one redis-server, rounds
    alternated so both see the same load; commands per second, best round of each."""
    import redis
    import trio

    procs: list[Proc] = []
    try:
        address = start_store("redis", work, procs)
        assert address is not None
        host, _, port = address.rpartition(":")
        client = redis.Redis(host=host, port=int(port))
        commands = _workload(plan.redis_commands)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(plan.redis_rounds):
            ours.append(trio.run(_ours, address, commands, plan.redis_pipeline))
            theirs.append(_redis_py(client, commands, plan.redis_pipeline))
            log(f"  ours {ours[-1]:,.0f}/s  redis-py {theirs[-1]:,.0f}/s")
        client.close()
        cpu = {p.name: p.cpu_seconds() for p in procs}
    finally:
        for p in procs:
            p.stop()
    hiredis_used = bool(getattr(getattr(redis, "utils", None), "HIREDIS_AVAILABLE", False))
    return {
        "commands": plan.redis_commands,
        "pipeline": plan.redis_pipeline,
        "ours_per_s": round(max(ours)),
        "redis_py_per_s": round(max(theirs)),
        "ratio": round(max(ours) / max(theirs), 3),
        "rounds": {"ours": [round(x) for x in ours], "redis_py": [round(x) for x in theirs]},
        "redis_py_version": getattr(redis, "__version__", "?"),
        "redis_py_uses_hiredis": hiredis_used,
        "server_cpu_s": cpu.get("store"),
    }


# --- the whole run -------------------------------------------------------------------------


def _cpu_row(trial: dict[str, Any] | None) -> dict[str, float]:
    """CPU seconds per second of the trial, per process kind (cores' worth)."""
    if not trial or not trial.get("wall_s"):
        return {}
    wall = trial["wall_s"]
    row = {k: round(v / wall, 3) for k, v in trial["cpu_s"].items()}
    row["others"] = round(trial["cpu_s_others"] / wall, 3)
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _summary(nf: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def rate(b: str) -> float | None:
        r = rows.get(b, {}).get("search", {})
        return r.get("max_rate") if r else None

    def p50(b: str) -> float | None:
        lat = rows.get(b, {}).get("latency")
        return lat["p50_us"] if lat else None

    ratios = {
        "s6_over_local_only": _ratio(rate("s6"), rate("local-only")),
        "s6_over_remote_only": _ratio(rate("s6"), rate("remote-only")),
        "s6_over_redis": _ratio(rate("s6"), rate("redis")),
        "remote_only_p50_over_s6": _ratio(p50("remote-only"), p50("s6")),
        "redis_p50_over_s6": _ratio(p50("redis"), p50("s6")),
    }
    return {
        "nf": nf,
        "ratios": ratios,
        "goals_met": {k: (v >= GOALS[k] if v is not None else None) for k, v in ratios.items()},
    }


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="s6-backends-") as tmp:
            yield Path(tmp)


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run(plan: Plan, work: Path, log: Log, step: Callable[[str], None]) -> dict[str, Any]:
    """Everything; the result as ``--out`` writes it.  ``log`` gets a line per trial,
    ``step`` the name of each stage as it starts."""
    from baselines.redis_client import redis_server_path
    from bench.traffic import main as traffic

    backends = list(plan.backends)
    notes: list[str] = []
    if "redis" in backends and redis_server_path() is None:
        backends.remove("redis")
        notes.append("redis-server is not installed: the redis backend is left out")
        log(notes[-1])
    pcap = work / "traffic.pcap"
    with contextlib.redirect_stdout(sys.stderr):
        traffic(["make", "--flows", str(plan.flows), "--seed", "1", "--out", str(pcap)])
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "cores": CORES,
        "loadavg_before": _loadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": notes,
        "nfs": {},
    }
    for nf in plan.nfs:
        rows: dict[str, dict[str, Any]] = {}
        for backend in backends:
            step(f"{nf} on {backend}: highest rate")
            log(f"{nf} on {backend}: highest rate that loses nothing")
            sub = work / f"{nf}-{backend}-search"
            sub.mkdir(exist_ok=True)

            def make_cluster(nf: str = nf, backend: str = backend, sub: Path = sub) -> LiveCluster:
                where = sub / f"cluster-{len(list(sub.glob('cluster-*'))) + 1}"
                where.mkdir()
                return LiveCluster(
                    nf,
                    backend,
                    pcap,
                    where,
                    instances=plan.instances,
                    nf_options=NF_OPTIONS.get(nf, []),
                    steer=plan.steer,
                )

            found = search(make_cluster, plan, log)
            rows[backend] = {"search": found, "cpu_at_max": _cpu_row(found["at_max"])}
        rates = [r["search"]["max_rate"] for r in rows.values() if r["search"]["max_rate"]]
        common = plan.latency_share * min(rates) if rates else None
        for backend in backends:
            if common is None:
                break
            step(f"{nf} on {backend}: latency at {common:,.0f}/s")
            log(f"{nf} on {backend}: latency at {common:,.0f}/s")
            sub = work / f"{nf}-{backend}-latency"
            sub.mkdir(exist_ok=True)
            with LiveCluster(
                nf,
                backend,
                pcap,
                sub,
                instances=plan.instances,
                nf_options=NF_OPTIONS.get(nf, []),
                steer=plan.steer,
            ) as cluster:
                lat = latency(cluster, common, plan, log)
            rows[backend]["latency"] = lat
            rows[backend]["cpu_at_latency_rate"] = _cpu_row(lat["trials"][-1])
        result["nfs"][nf] = {
            "latency_rate": None if common is None else round(common),
            "backends": rows,
            "summary": _summary(nf, rows),
        }
    step("Redis clients")
    log("our Redis client against redis-py, pipelined, on one redis-server")
    if "redis" in backends:
        result["redis_clients"] = compare_redis_clients(plan, work, log)
    elif "redis" in plan.backends:
        result["redis_clients"] = {"skipped": "redis-server not installed"}
    else:
        result["redis_clients"] = {"skipped": "the redis backend is not in this run"}
    if "skipped" in result["redis_clients"]:
        log(result["redis_clients"]["skipped"])
    problems = []
    for nf, entry in result["nfs"].items():
        for backend, row in entry["backends"].items():
            for p in row["search"]["problems"] + row.get("latency", {}).get("problems", []):
                problems.append(f"{nf} on {backend}: {p}")
    result["valid"] = not problems
    result["invalid_because"] = problems
    result["loadavg_after"] = _loadavg()
    return result


# --- output -------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _verdict(met: bool | None) -> str:
    return "-" if met is None else "met" if met else "not met"


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(width=max(Console().width, 140))
    for nf, entry in result["nfs"].items():
        table = Table(
            "backend",
            "highest rate/s",
            "failed at",
            f"p50 µs @ {_fmt(entry['latency_rate'])}/s",
            "p99 µs",
            "CPU at it, cores: NF / store / sender / sink / other work",
            title=f"{nf} on {result['plan']['instances']} instances",
        )
        for backend, row in entry["backends"].items():
            s, lat, cpu = row["search"], row.get("latency") or {}, row["cpu_at_max"]
            table.add_row(
                backend,
                _fmt(s["max_rate"]) + (" (cap)" if s["capped"] else ""),
                _fmt(s["failed_at"])
                + (f" ({', '.join(s['failed_because'])})" if s["failed_because"] else ""),
                _fmt(lat.get("p50_us")),
                _fmt(lat.get("p99_us")),
                " / ".join(
                    _fmt(cpu.get(k), ".2f")
                    for k in ("instances", "store", "sender", "sink", "others")
                ),
            )
        out.print(table)
        ratios, met = entry["summary"]["ratios"], entry["summary"]["goals_met"]
        out.print(
            "  "
            + "; ".join(
                f"{k} {_fmt(v, '.2f')} (goal >= {GOALS[k]:g}: {_verdict(met[k])})"
                for k, v in ratios.items()
            )
        )
    rc = result["redis_clients"]
    if "skipped" in rc:
        out.print(f"Redis clients: {rc['skipped']}")
    else:
        out.print(
            f"Redis clients, pipelines of {rc['pipeline']}: ours {rc['ours_per_s']:,}/s, "
            f"redis-py {rc['redis_py_version']} (hiredis {rc['redis_py_uses_hiredis']}) "
            f"{rc['redis_py_per_s']:,}/s: ratio {rc['ratio']:.2f} (goal >= 0.8)"
        )
    out.print(
        f"load average before {result['loadavg_before']}, after {result['loadavg_after']} "
        f"({result['cores']} cores)"
    )
    if not result["valid"]:
        out.print(f"[bold red]INVALID RUN[/]: {'; '.join(result['invalid_because'])}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfs = list(result["nfs"])
    if not nfs:
        return
    backends = list(next(iter(result["nfs"].values()))["backends"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(backends), 1)
    for j, backend in enumerate(backends):
        xs = [i + j * width for i in range(len(nfs))]
        rows = [result["nfs"][nf]["backends"].get(backend, {}) for nf in nfs]
        rates = [r.get("search", {}).get("max_rate") or 0 for r in rows]
        ax1.bar(xs, rates, width, label=backend)
        p50 = [(r.get("latency") or {}).get("p50_us") or 0 for r in rows]
        p99 = [(r.get("latency") or {}).get("p99_us") or 0 for r in rows]
        ax2.bar(xs, p99, width, color=f"C{j}", alpha=0.35)
        ax2.bar(xs, p50, width, color=f"C{j}", label=f"{backend} p50 (pale: p99)")
    for ax in (ax1, ax2):
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(nfs))], nfs)
    ax1.set_ylabel("highest rate without loss (frames/s)")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("latency at a rate all sustain (µs)")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    title = (
        f"{result['plan']['instances']} instances, steer {result['plan'].get('steer', 'hash')}, "
        f"{result['cores']} cores shared by all"
    )
    if not result["valid"]:
        title += " (INVALID: sender or sink without CPU headroom)"
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.backends", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="PRADS only, short trials")
    parser.add_argument("--nf", help=f"comma-separated ({','.join(NFS)})")
    parser.add_argument("--backends", help=f"comma-separated ({','.join(BACKENDS)})")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--steer", choices=("hash", "owner"), default="hash")
    parser.add_argument("--trial-s", type=float, help="seconds per search trial")
    parser.add_argument("--start-rate", type=float)
    parser.add_argument("--precision", type=float, help="of the search (0.07; quick 0.15)")
    parser.add_argument("--latency-share", type=float, help="of the slowest's highest rate")
    parser.add_argument("--latency-repeats", type=int)
    parser.add_argument("--out", default="results/backends.json")
    parser.add_argument("--png", default="results/backends.png")
    parser.add_argument("--workdir", help="keep the processes' logs here")
    parser.add_argument("--replot", metavar="JSON", help="only draw --png from this result")
    args = parser.parse_args(argv)
    if args.replot:
        try:
            saved = json.loads(Path(args.replot).read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--replot {args.replot}: {getattr(exc, 'strerror', None) or exc}")
        plot(saved, Path(args.png))
        print(f"wrote {args.png}")
        return 0
    plan = Plan.quick() if args.quick else Plan()
    if args.nf:
        plan.nfs = tuple(x for x in args.nf.split(",") if x)
        unknown = set(plan.nfs) - set(NFS)
        if unknown:
            parser.error(f"unknown NF {', '.join(sorted(unknown))}: choose from {', '.join(NFS)}")
    if args.backends:
        plan.backends = tuple(x for x in args.backends.split(",") if x)
        unknown = set(plan.backends) - set(BACKENDS)
        if unknown:
            parser.error(f"unknown backend {', '.join(sorted(unknown))}")
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    plan.instances = args.instances
    plan.steer = args.steer
    for name in ("trial_s", "start_rate", "precision", "latency_share", "latency_repeats"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                parser.error(f"--{name.replace('_', '-')} must be positive")
            setattr(plan, name, value)

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from baselines.redis_client import redis_server_path

    console = Console(stderr=True)
    runs = len([b for b in plan.backends if b != "redis" or redis_server_path()])
    stages = len(plan.nfs) * runs * 2 + 1
    with (
        _workdir(args.workdir) as work,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task("starting", total=stages)
        first = [True]

        def step(name: str) -> None:
            if not first[0]:
                progress.advance(task)
            first[0] = False
            progress.update(task, description=name)

        result = run(plan, work, progress.console.print, step)
        progress.advance(task)
    result["command"] = "python -m bench.backends " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.png))
    print_report(result)
    print(f"wrote {args.out} and {args.png}")
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
