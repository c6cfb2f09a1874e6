"""The offline runner: one NF over a capture file, on an embedded space of N members.

``python -m nf NAME --pcap FILE [--instances N] [--config FILE.toml] [--out FILE.pcap]
[--scale-at FRACTION] [NF options]``.  What it does:

* reads the whole capture first (pcap or pcapng; a bad file is one line and exit 2);
* opens an object space in this process: with one member and no scaling an embedded
  single-node space (no socket); otherwise an in-process controller on 127.0.0.1 and N
  members joined through it, each with its own NF instance (the NF's maps live in the
  space, so the instances share state as separate processes would);
* gives each packet to the member its flow hashes to (``hash(flow_key) % members``), as
  a microthread of its flow: ``space.submit(flow_key, nf.process, packet)``, so one flow's
  packets keep their order;
* uses packet time as the clock: every ``tick_interval`` seconds of capture time, it lets
  the units in flight finish and calls ``nf.tick(ts)`` on every instance;
* with ``--scale-at F``, once a fraction F of the packets has been given out, lets the
  units in flight finish, starts one more member and scales out to it (objects then move
  lazily as the paper says), and spreads the flows over the larger set from then on;
* at the end, lets everything finish, flushes each member, prints the NF's output query
  (one line each) to stdout and one summary line to stderr: packets, packets per second,
  verdicts and counts by reason (summed over the instances); ``--out`` writes the
  forwarded frames (as rewritten) in input order.

The units in flight are bounded by a window (``--window``): the runner waits for the
oldest before giving out more, which keeps memory bounded and ``--out`` in order; while
units are parked it lets the members' messages in every few packets.  A flow's packets
keep their order; across flows a parked unit finishes later (``RunResult.order``).
``--dicts`` runs the NF on plain dicts instead (:mod:`nf.dicts`), for comparison;
``--backend local-only|remote-only|redis [--store HOST:PORT]`` on a baseline of
:mod:`baselines` (fixed instances; without ``--store`` the store is started here).
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from baselines import STORE_BACKENDS
from nf.base import NF, ConfigError, Verdict
from nf.capture import CaptureError, read_capture, write_pcap
from nf.packet import Packet, parse
from store import SchedulerFull
from store.cli.common import OneLineParser
from store.core.scheduler import Unit
from store.wire.errors import StoreError, first_leaf

__all__ = [
    "Cluster",
    "RunResult",
    "checked_config",
    "load_config",
    "open_cluster",
    "run",
    "run_capture",
]

#: Units in flight across all members before the runner waits for the oldest.
DEFAULT_WINDOW = 1024
#: While units are parked, the runner lets other tasks run every this many packets.
CHECKPOINT_EVERY = 16


@dataclass
class RunResult:
    """What a run produced: the output lines, the verdicts in input order, the counts."""

    lines: list[str]
    verdicts: list[Verdict]
    counts: dict[str, int]
    packets: int
    seconds: float
    members: int
    forwarded: list[tuple[float, bytearray]] = field(default_factory=list)
    #: ``space.statistics()`` of each member at the end.
    statistics: list[Any] = field(default_factory=list)
    #: Packet indexes in the order their units finished.  Flows keep their order; across
    #: flows a parked unit finishes after later packets of other flows, as it would live.
    order: list[int] = field(default_factory=list)
    #: CPU time of this process over the same span as ``seconds`` (on a shared machine,
    #: what the run cost its one core, without the time other processes held it).
    cpu_seconds: float = 0.0

    @property
    def packets_per_second(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else math.inf

    def summary(self) -> str:
        by_verdict = collections.Counter(v.name.lower() for v in self.verdicts)
        parts = [
            f"{self.packets} packets in {self.seconds:.3f} s",
            f"{self.packets_per_second:,.0f} packets/s",
            f"{self.members} member{'s' if self.members != 1 else ''}",
            f"forward {by_verdict.get('forward', 0)}",
            f"drop {by_verdict.get('drop', 0)}",
        ]
        parts += [f"{k} {v}" for k, v in sorted(self.counts.items()) if k != "packets"]
        return ", ".join(parts)


def checked_config(nf_cls: type[NF], args: argparse.Namespace) -> dict[str, Any]:
    """The NF's configuration, from ``--config`` and its options, checked by the NF itself
    on plain dicts before any space starts: a bad option is one line (``ConfigError``),
    and no member joins a cluster only to die of it."""
    from nf.dicts import DictSpace

    config = nf_cls.config_from(args, load_config(args.config, nf_cls.name))
    nf_cls(DictSpace(), config)  # type: ignore[arg-type]
    return config


def load_config(path: str | None, nf_name: str) -> dict[str, Any]:
    """The NF's table of a TOML file (``[nat]`` for the NAT), or the whole file if it has no
    such table; ``ConfigError`` for a missing or malformed file."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    table = data.get(nf_name)
    if isinstance(table, dict):
        return table
    return data


class Cluster:
    """The members of a run's space in this process, each with its own NF instance
    (``spaces[i]`` runs ``nfs[i]``).  Made by :func:`open_cluster`."""

    secret = b"s6-nf-offline-runner"

    def __init__(self, nf_cls: type[NF], config: dict[str, Any]) -> None:
        self.nf_cls = nf_cls
        self.config = config
        self.spaces: list[Any] = []
        self.nfs: list[NF] = []
        self.controller: Any = None
        self.nursery: trio.Nursery | None = None

    def add(self, space: Any) -> None:
        self.spaces.append(space)
        self.nfs.append(self.nf_cls(space, self.config))

    async def _member(self, started: Callable[[Any], None]) -> None:
        from store import open_space

        assert self.controller is not None
        async with open_space(
            controller=self.controller.address, secret=self.secret, listen="127.0.0.1:0"
        ) as space:
            started(space)
            await trio.sleep_forever()

    async def join(self, count: int) -> None:
        """Start ``count`` more members and admit them (one scaling event); their NF
        instances are added in the order of their names."""
        if self.nursery is None or self.controller is None:
            raise RuntimeError("an embedded single-node space cannot grow")
        joined: list[Any] = []
        all_in = trio.Event()

        def started(space: Any) -> None:
            joined.append(space)
            if len(joined) == count:
                all_in.set()

        for _ in range(count):
            self.nursery.start_soon(self._member, started)
        ctl = self.controller
        await ctl.wait_until(lambda b: len(b.waiting()) >= count)
        await ctl.scale_out()
        await all_in.wait()
        for space in sorted(joined, key=lambda s: s.name):
            self.add(space)


@asynccontextmanager
async def open_cluster(
    nf_cls: type[NF],
    config: dict[str, Any],
    instances: int = 1,
    *,
    growable: bool = False,
    dicts: bool = False,
    backend: str = "s6",
    store_address: str | None = None,
    secret: bytes | None = None,
) -> AsyncIterator[Cluster]:
    """``instances`` members running ``nf_cls``: an embedded single-node space (no socket)
    when there is one and it need not grow, else an in-process controller on 127.0.0.1
    and members joined through it.  Stopping the members is quiet (their goodbyes are
    expected).  ``dicts``: one instance on plain dicts instead (:mod:`nf.dicts`).
    ``backend``: a baseline of :mod:`baselines` instead of the store (see
    :func:`_open_baseline`); ``secret``: the one the members and the store share."""
    from store import open_space

    cluster = Cluster(nf_cls, config)
    if secret is not None:
        cluster.secret = secret
    if backend != "s6":
        if growable:
            raise ValueError(f"the {backend} baseline runs a fixed set of instances")
        async with _open_baseline(cluster, instances, backend, store_address):
            yield cluster
        return
    if dicts:
        if instances != 1 or growable:
            raise ValueError("plain dicts are one instance that cannot grow")
        from nf.dicts import DictSpace

        cluster.add(DictSpace())
        yield cluster
        return
    quiet = logging.getLogger("store")
    level = quiet.level
    try:
        async with AsyncExitStack() as stack:
            if instances == 1 and not growable:
                cluster.add(await stack.enter_async_context(open_space()))
                yield cluster
                return
            from store.shell.controller import open_controller

            cluster.controller = await stack.enter_async_context(
                open_controller("127.0.0.1:0", secret=cluster.secret, manual_admission=True)
            )
            cluster.nursery = await stack.enter_async_context(trio.open_nursery())
            try:
                await cluster.join(instances)
                yield cluster
            finally:
                quiet.setLevel(logging.CRITICAL)
                cluster.nursery.cancel_scope.cancel()
    finally:
        quiet.setLevel(level)


@asynccontextmanager
async def _open_baseline(
    cluster: Cluster, instances: int, backend: str, store_address: str | None
) -> AsyncIterator[None]:
    """``instances`` NF instances on the baseline ``backend``, named ``i0``, ``i1``...,
    each on its own embedded S6 space.  Without ``store_address`` the store is started
    here: an in-process kv server (``remote-only``) or a ``redis-server`` (``redis``)."""
    from baselines import BACKENDS, open_backend
    from store import open_space

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    async with AsyncExitStack() as stack:
        if store_address is None and backend == "remote-only":
            from baselines.kv import serve_kv

            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            server = await nursery.start(partial(serve_kv, "127.0.0.1", 0, secret=cluster.secret))
            store_address = f"127.0.0.1:{server.port}"
        elif store_address is None and backend == "redis":
            from baselines.redis_client import run_redis_server

            store_address = await stack.enter_async_context(run_redis_server())
        for i in range(instances):
            s6 = await stack.enter_async_context(open_space())
            nf_space = await stack.enter_async_context(
                open_backend(
                    backend,
                    s6,
                    store_address=store_address,
                    secret=cluster.secret,
                    instance_name=f"i{i}",
                )
            )
            cluster.add(nf_space)
        yield


async def run_capture(
    nf_cls: type[NF],
    config: dict[str, Any],
    packets: list[tuple[float, bytes]],
    *,
    instances: int = 1,
    scale_at: float | None = None,
    window: int = DEFAULT_WINDOW,
    keep_frames: bool = False,
    output: bool = True,
    dicts: bool = False,
    backend: str = "s6",
    store_address: str | None = None,
    secret: bytes | None = None,
) -> RunResult:
    """Run ``nf_cls`` over ``packets`` (``(ts, frame)`` pairs); see the module docstring.
    ``dicts``: on plain dicts instead of the store (one instance; for comparison).
    ``backend``, ``store_address``, ``secret``: on a baseline instead (:func:`open_cluster`)."""
    if instances < 1:
        raise ValueError(f"instances must be at least 1, not {instances}")
    if scale_at is not None and not 0.0 <= scale_at <= 1.0:
        raise ValueError(f"scale_at must be between 0 and 1, not {scale_at}")
    growable = scale_at is not None
    async with open_cluster(
        nf_cls,
        config,
        instances,
        growable=growable,
        dicts=dicts,
        backend=backend,
        store_address=store_address,
        secret=secret,
    ) as cluster:
        return await _drive(cluster, packets, scale_at, window, keep_frames, output)
    raise AssertionError("unreachable")  # pragma: no cover (mypy: the stack may swallow)


def _submit_nowait(space: Any) -> tuple[Callable[..., Any], bool]:
    """The member's per-packet submit, and whether it gives a unit that finished inline
    as its value itself: its scheduler's ``run_nowait`` when it has one (no unit is made
    for a packet that finishes inline, and the store's ``Space.submit_nowait`` would only
    pass the call on), else the space's ``submit_nowait`` (plain dicts, the baselines)."""
    micro = getattr(getattr(space, "node", None), "micro", None)
    run: Callable[..., Any] | None = getattr(micro, "run_nowait", None)
    if run is not None:
        return run, True
    return space.submit_nowait, False


class _Finished:
    """A unit that finished inline, for the in-flight line (when run_nowait gave its
    value while earlier packets were still in flight)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return None

    def result(self) -> Any:
        return self.value


def _flow_key(nf: NF) -> Callable[[Packet], Hashable]:
    """``nf.flow_key``, or the packet's own key function when the NF keeps the default
    (the same key, one call instead of two per packet)."""
    if type(nf).flow_key is NF.flow_key:
        return Packet.flow_key_both if nf.bidirectional else Packet.flow_key_directed
    return nf.flow_key


async def _drive(
    cluster: Cluster,
    packets: list[tuple[float, bytes]],
    scale_at: float | None,
    window: int,
    keep_frames: bool,
    output: bool,
) -> RunResult:
    nf_cls = cluster.nf_cls
    verdicts: list[Verdict] = []
    forwarded: list[tuple[float, bytearray]] = []
    inflight: collections.deque[tuple[Any, Any, Any]] = collections.deque()
    interval = nf_cls.tick_interval
    scale_index = None if scale_at is None else int(len(packets) * scale_at)
    failures: collections.Counter[str] = collections.Counter()

    order: list[int] = []
    finished = order.append

    def settle(unit: Any, packet: Any) -> None:
        exc = unit.exception()
        if exc is not None:
            # A bug of the NF (it must not raise): counted, and the packet forwarded as is.
            failures[f"nf-error-{type(exc).__name__}"] += 1
            verdict = Verdict.FORWARD
        else:
            verdict = unit.result()
        verdicts.append(verdict)
        if keep_frames and verdict == Verdict.FORWARD:
            forwarded.append((packet.ts, packet.frame))

    async def retire_one() -> None:
        unit, packet, _space = inflight.popleft()
        if not unit.done():
            try:
                await unit
            except Exception:
                pass  # looked at in settle
        settle(unit, packet)

    async def drain() -> None:
        while inflight:
            await retire_one()

    started = time.perf_counter()
    cpu_started = time.process_time()
    spaces: list[Any] = []
    nfs: list[NF] = []
    submits: list[Any] = []
    processes: list[Any] = []
    n = 0
    values = False  # the submits give an inline unit's verdict itself (run_nowait)

    def members() -> None:
        nonlocal spaces, nfs, submits, processes, n, values
        spaces, nfs = cluster.spaces, cluster.nfs
        chosen = [_submit_nowait(space) for space in spaces]
        submits = [submit for submit, _ in chosen]
        values = all(gives for _, gives in chosen)
        processes = [nf.process for nf in nfs]
        n = len(spaces)

    members()
    flow_key = _flow_key(nfs[0])
    append = verdicts.append
    next_tick = packets[0][0] + interval if packets else 0.0
    forward = Verdict.FORWARD
    unit_type = Unit
    for index, (ts, frame) in enumerate(packets):
        if ts >= next_tick or index == scale_index:
            if index == scale_index:
                await drain()
                await cluster.join(1)
                members()
            if ts >= next_tick:
                await drain()
                for nf in nfs:
                    await nf.tick(ts)
                next_tick = ts + interval
        packet = parse(frame, ts)
        key = flow_key(packet)
        i = hash(key) % n if n > 1 else 0
        try:
            unit = submits[i](key, processes[i], packet)
        except SchedulerFull:  # the member's bound on parked units: wait for room
            unit = await spaces[i].submit(key, processes[i], packet)
        if values and type(unit) is not unit_type:  # run_nowait: finished inline
            finished(index)
            if not inflight:
                append(unit)
                if keep_frames and unit == forward:
                    forwarded.append((ts, packet.frame))
                continue
            unit = _Finished(unit)
        elif unit.done():
            finished(index)
            if not inflight:  # the common case: finished inline, nothing waiting before it
                try:
                    verdict = unit.result()
                except Exception:  # the NF raised: settle counts it
                    settle(unit, packet)
                    continue
                append(verdict)
                if keep_frames and verdict == forward:
                    forwarded.append((ts, packet.frame))
                continue
        else:
            unit.add_done_callback(lambda _unit, index=index: finished(index))
        inflight.append((unit, packet, spaces[i]))
        while inflight and (inflight[0][0].done() or len(inflight) > window):
            await retire_one()
        if inflight and index % CHECKPOINT_EVERY == 0:
            # Units are parked: let the members' messages in, so they finish soon rather
            # than when the window is full (which reorders flows more than a network would).
            await trio.lowlevel.checkpoint()
    await drain()
    for nf in nfs:
        await nf.close()
    for space in spaces:
        await space.flush()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    counts: collections.Counter[str] = collections.Counter()
    for nf in nfs:
        counts.update(nf.counts)
    counts.update(failures)
    lines: list[str] = []
    if output:
        lines = list(await nfs[0].query(nf_cls.output_query))
    statistics = [space.statistics() for space in spaces]
    return RunResult(
        lines=lines,
        verdicts=verdicts,
        counts=dict(counts),
        packets=len(packets),
        seconds=seconds,
        members=len(spaces),
        forwarded=forwarded,
        statistics=statistics,
        order=order,
        cpu_seconds=cpu_seconds,
    )


def run(nf_cls: type[NF], argv: list[str], prog: str) -> int:
    """``python -m nf NAME ...``: parse the options, run, print; the exit status."""
    module = sys.modules.get(nf_cls.__module__)
    details = (module.__doc__ or "") if module is not None else ""
    parser = OneLineParser(
        prog=prog,
        description=(nf_cls.__doc__ or "").strip().split("\n\n")[0],
        epilog=details.replace("``", "").strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("running over a capture")
    group.add_argument("--pcap", required=True, metavar="FILE", help="pcap or pcapng file")
    group.add_argument(
        "--instances", type=int, default=1, metavar="N", help="members of the space (1)"
    )
    group.add_argument(
        "--config", metavar="FILE.toml", help=f"TOML: the [{nf_cls.name}] table or the file"
    )
    group.add_argument("--out", metavar="FILE.pcap", help="write the forwarded frames here")
    group.add_argument(
        "--scale-at",
        type=float,
        metavar="FRACTION",
        help="scale out by one member after this fraction of the packets",
    )
    group.add_argument(
        "--dicts",
        action="store_true",
        help="run on plain dicts instead of the object space (one instance; to compare)",
    )
    group.add_argument(
        "--backend",
        default="s6",
        choices=("s6", "local-only", "remote-only", "redis"),
        help="where the NF's state lives: the store (s6, the default) or a baseline",
    )
    group.add_argument(
        "--store",
        metavar="HOST:PORT",
        help="remote-only: the kv server; redis: the Redis server (default: start one here)",
    )
    group.add_argument("--secret-file", metavar="F", help="the kv server's secret (with --store)")
    group.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="UNITS",
        help=f"units in flight before waiting for the oldest ({DEFAULT_WINDOW})",
    )
    options = parser.add_argument_group(f"{nf_cls.name} options")
    nf_cls.add_arguments(options)  # type: ignore[arg-type]
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error(f"--instances must be at least 1, not {args.instances}")
    if args.scale_at is not None and not 0.0 <= args.scale_at <= 1.0:
        parser.error(f"--scale-at must be between 0 and 1, not {args.scale_at}")
    if args.window < 1:
        parser.error(f"--window must be at least 1, not {args.window}")
    if args.dicts and (args.instances != 1 or args.scale_at is not None):
        parser.error("--dicts runs one instance: no --instances or --scale-at with it")
    if args.backend != "s6" and (args.dicts or args.scale_at is not None):
        parser.error(f"--backend {args.backend} runs fixed instances: no --dicts or --scale-at")
    if args.store is not None and args.backend not in STORE_BACKENDS:
        parser.error("--store is for --backend remote-only or redis")
    name = prog.split()[-1]
    secret = None
    if args.secret_file is not None:
        from store.cli.common import read_secret

        secret = read_secret(args.secret_file, name)
    try:
        config = checked_config(nf_cls, args)
        packets = read_capture(args.pcap, decode_links=nf_cls.decodes_links)
    except (ConfigError, CaptureError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file an NF option names, not turned into a ConfigError
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{name}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        result = trio.run(
            lambda: run_capture(
                nf_cls,
                config,
                packets,
                instances=args.instances,
                scale_at=args.scale_at,
                window=args.window,
                keep_frames=args.out is not None,
                dicts=args.dicts,
                backend=args.backend,
                store_address=args.store,
                secret=secret,
            )
        )
    except BaseException as exc:  # one clear line for what we expect, a traceback otherwise
        leaf = first_leaf(exc)  # (the exception itself, or the first inside trio's groups)
        if isinstance(leaf, ConfigError):  # raised by the NF's constructor
            print(f"{name}: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, StoreError):  # the backend's store: unreachable, or gone
            print(f"{name}: error: {leaf}", file=sys.stderr)
            return 1
        raise
    out = sys.stdout
    for line in result.lines:
        out.write(line + "\n")
    out.flush()
    if args.out is not None:
        try:
            with Path(args.out).open("wb") as f:
                write_pcap(f, result.forwarded)
        except OSError as exc:
            print(f"{name}: {args.out}: cannot write ({exc.strerror or exc})", file=sys.stderr)
            return 2
    print(f"{name}: {result.summary()}", file=sys.stderr)
    return 0
