"""``python -m store.node``: run one node of the object space.

It listens for the other nodes, registers with the controller, and serves key records and
objects until it is stopped (SIGINT/SIGTERM) or scaled in by ``store.ctl scale-in``.  The
first line on stdout is ``node HOST:PORT admitted epoch E``, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from typing import Any

import trio

from store.cli.common import OneLineParser, address, fail, read_secret
from store.wire.errors import StoreError, first_leaf

PROG = "store.node"


def parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--controller", required=True, type=address, help="controller HOST:PORT")
    p.add_argument(
        "--listen", default="127.0.0.1:0", type=address, help="HOST:PORT (port 0 picks one)"
    )
    p.add_argument("--secret-file", help="file holding the cluster secret")
    p.add_argument("--drain-rate", type=int, default=None, help="key records moved per second")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
    # A test aid, not an operator option: record every SingleWriter grant and release of
    # this node (the object layer's trace) and write them to FILE as JSON lines at exit,
    # so that an integration test can check the grant chain across processes.
    p.add_argument("--trace-grants", metavar="FILE", help=argparse.SUPPRESS)
    return p


async def serve(
    controller: str,
    listen: str,
    secret: bytes,
    drain_rate: int | None,
    trace_file: str | None = None,
) -> None:
    from store.space import join_space

    # A node process is the store's alone: keeping the collector's full scans off the
    # objects and records that arrive with each event is safe here (see Node.enter_stage).
    options: dict[str, Any] = {"freeze_gc": True}
    if drain_rate is not None:
        options["drain_rate"] = drain_rate
    trace: list[tuple[str, str, Any, int, str]] = []
    if trace_file is not None:
        options["trace"] = trace  # (test aid, see --trace-grants)
    try:
        async with join_space(controller, listen, secret, options) as space:
            epoch = space.statistics().epoch
            print(f"node {space.name} admitted epoch {epoch}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                membership = space.node.membership
                async with trio.open_nursery() as nursery:

                    async def until_left() -> None:
                        await membership.wait_left()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(until_left)
                    async for _ in signals:
                        # A signal asks for a graceful scale-in: hand everything over, then exit.
                        print(f"node {space.name} leaving", flush=True)
                        nursery.cancel_scope.cancel()
                        break
    finally:
        if trace_file is not None:  # after a scale-in's evacuation: its releases are in it
            with open(trace_file, "w", encoding="utf-8") as out:
                out.writelines(json.dumps(entry) + "\n" for entry in trace)


def main() -> int:
    args = parser().parse_args()
    logging.basicConfig(level=args.log_level, format=f"{PROG}: %(levelname)s %(message)s")
    secret = read_secret(args.secret_file, PROG)
    if args.drain_rate is not None and args.drain_rate <= 0:
        fail(PROG, "--drain-rate must be a positive number of records per second", 2)
    try:
        trio.run(serve, args.controller, args.listen, secret, args.drain_rate, args.trace_grants)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # one clear line for what we expect, a traceback otherwise
        # first_leaf, not reraise_single: this only decides what to print (one line, or the
        # whole traceback), and when several things failed at once the first stands for all.
        leaf = first_leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return 0
        if isinstance(leaf, StoreError | OSError | ValueError | TimeoutError):
            fail(PROG, str(leaf) or type(leaf).__name__)
        raise
    return 0
