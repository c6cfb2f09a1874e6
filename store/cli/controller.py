"""``python -m store.controller``: run the membership authority of a cluster.

It admits nodes, runs the scaling barrier (``store.core.barrier``) and answers
``store.ctl``.  The first line on stdout is ``listening on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

import trio

from ring.hashring import DEFAULT_VNODES
from store.cli.common import OneLineParser
from store.core.barrier import DEFAULT_FAILURE_TIMEOUT, DEFAULT_PRE_SCALING_TIMEOUT
from store.shell.controller import open_controller, read_secret
from store.wire.control import describe_failure, parse_address

logger = logging.getLogger("store.controller")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m store.controller",
        description="Run the membership authority of an S6 cluster (admission and the "
        "scaling barrier).  Prints 'listening on HOST:PORT' as its first line.",
    )
    parser.add_argument(
        "--listen", required=True, metavar="HOST:PORT", help="where to accept nodes and ctl"
    )
    parser.add_argument(
        "--manual-admission",
        action="store_true",
        help="registered nodes wait for 'ctl scale-out' instead of joining at once",
    )
    parser.add_argument(
        "--secret-file",
        metavar="F",
        help="file holding the cluster secret (default: a development secret, with a warning)",
    )
    parser.add_argument(
        "--pre-scaling-timeout",
        type=_positive,
        default=DEFAULT_PRE_SCALING_TIMEOUT,
        metavar="S",
        help="seconds every node has to acknowledge pre-scaling before the event aborts "
        f"(default {DEFAULT_PRE_SCALING_TIMEOUT:g})",
    )
    parser.add_argument(
        "--failure-timeout",
        type=_positive,
        default=DEFAULT_FAILURE_TIMEOUT,
        metavar="S",
        help="seconds a member may stay silent (no heartbeat) or disconnected before it is "
        "declared dead and the ring repaired without it "
        f"(default {DEFAULT_FAILURE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--vnodes", type=int, default=DEFAULT_VNODES, help=argparse.SUPPRESS
    )  # for experiments: every node must use the ring the controller sends
    return parser


async def _run(args: argparse.Namespace, secret: bytes) -> None:
    async with open_controller(
        args.listen,
        secret=secret,
        manual_admission=args.manual_admission,
        pre_scaling_timeout=args.pre_scaling_timeout,
        failure_timeout=args.failure_timeout,
        vnodes=args.vnodes,
    ) as controller:
        print(f"listening on {controller.address}", flush=True)
        await trio.sleep_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        parse_address(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    if args.vnodes < 1:
        parser.error("--vnodes must be at least 1")
    try:
        secret, default = read_secret(args.secret_file)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s controller: %(message)s", stream=sys.stderr
    )
    if default:
        logger.warning(
            "no --secret-file given: using the development secret; anyone can join this cluster"
        )
    try:
        trio.run(_run, args, secret)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(
            f"{parser.prog}: error: cannot listen on {args.listen}: {describe_failure(exc)}",
            file=sys.stderr,
        )
        return 1
    return 0
