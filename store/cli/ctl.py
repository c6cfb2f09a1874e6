"""The operator's command line: look at the cluster, scale it out or in.

::

    python -m store.ctl --controller HOST:PORT [--secret-file F] status
    python -m store.ctl --controller HOST:PORT scale-out [NODE ...]   # none: every waiting node
    python -m store.ctl --controller HOST:PORT scale-in NODE ...

``status`` prints the epoch, the cluster's stage, the running event and the last abort, then
one table row per node with the figures each node reported.  ``scale-out``/``scale-in``
print the controller's progress lines as they come (the barrier's steps, each node's drain)
and end with a summary: the new epoch, the duration and the records and objects moved.

It talks to the controller as an authenticated peer, with the cluster secret (the
development secret when no ``--secret-file`` is given, as for the controller).  Errors (an
unreachable controller, a wrong secret, an unknown node, a refused or aborted event) are
one line on stderr and a non-zero exit status: 1 for a failed request, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
from rich.console import Console
from rich.table import Table

from store.cli.common import OneLineParser
from store.shell.controller import read_secret
from store.shell.transport import Peer, connect_peer
from store.wire.control import (
    ClusterStatus,
    Query,
    QueryAnswer,
    ScaleProgress,
    ScaleReply,
    ScaleRequest,
    StatusRequest,
    describe_failure,
    parse_address,
)
from store.wire.errors import AuthenticationError, PeerUnavailable, ProtocolError
from store.wire.messages import Message

__all__ = [
    "CtlError",
    "controller_link",
    "main",
    "render_status",
    "request_query",
    "request_scale",
    "request_status",
]

#: Seconds to reach the controller.
CONNECT_TIMEOUT: Final = 5.0


class CtlError(Exception):
    """A failure to report as one line; ``status`` is the exit status."""

    def __init__(self, text: str, status: int = 1) -> None:
        super().__init__(text)
        self.status = status


async def _next_messages(peer: Peer) -> list[Message]:
    try:
        return await peer.receive()
    except PeerUnavailable as exc:
        raise CtlError(f"the controller closed the connection: {describe_failure(exc)}") from None


async def request_status(peer: Peer, *, brief: bool = False) -> ClusterStatus:
    """Ask the controller connected as ``peer`` for the cluster's status (``brief``: each
    member's stage, epoch and labels, not its figures)."""
    peer.send_nowait(StatusRequest(1, brief))
    while True:
        for msg in await _next_messages(peer):
            if isinstance(msg, ClusterStatus) and msg.request_id == 1:
                return msg


async def request_query(peer: Peer, target: str, name: str, args: dict[str, Any]) -> QueryAnswer:
    """Ask the controller connected as ``peer`` to relay a control-plane query to a member
    running ``target`` (the NF's name; "" for any), and return the member's answer."""
    peer.send_nowait(Query(1, target, name, args))
    while True:
        for msg in await _next_messages(peer):
            if isinstance(msg, QueryAnswer) and msg.request_id == 1:
                return msg


async def request_scale(
    peer: Peer, kind: str, names: Sequence[str], out: Console, started: float
) -> ScaleReply:
    """Send a scale request and print its progress lines until the reply comes."""
    peer.send_nowait(ScaleRequest(1, kind, list(names)))
    while True:
        for msg in await _next_messages(peer):
            if isinstance(msg, ScaleProgress) and msg.request_id == 1:
                out.print(f"[{trio.current_time() - started:7.3f} s] {msg.text}", highlight=False)
            elif isinstance(msg, ScaleReply) and msg.request_id == 1:
                return msg


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def render_status(status: ClusterStatus, out: Console) -> None:
    """Print ``status`` for people: a header, then a table of nodes and their figures."""
    out.print(
        f"epoch {status.epoch} (highest used {status.highest_epoch}), stage {status.stage}, "
        f"{sum(1 for row in status.members if row[2] == 'member')} members",
        highlight=False,
    )
    if status.event:
        out.print(f"running: {status.event.get('text', '')}", highlight=False)
    if status.last_event:
        e = status.last_event
        out.print(
            f"last event: {e.get('kind')} to epoch {e.get('epoch')} in {e.get('duration_s')} s, "
            f"{e.get('records_moved')} records and {e.get('objects_moved')} objects moved",
            highlight=False,
        )
        if e.get("dead"):
            out.print(
                f"declared dead: {e.get('dead')} (the ring was repaired without)", highlight=False
            )
    if status.last_abort:
        out.print(f"last abort: {status.last_abort}", highlight=False)
    keys: list[str] = []
    for figures in status.figures.values():
        keys.extend(k for k in figures if k not in keys and k not in ("stage", "epoch"))
    if not status.members:
        out.print("no nodes registered", highlight=False)
        return
    # One column per node and one row per figure: a cluster has a few nodes but a node has
    # many figures, and a row per node would not fit a terminal.
    table = Table(title=None, show_lines=False)
    table.add_column("", overflow="fold")
    for name, *_ in status.members:
        table.add_column(name, overflow="fold", justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("address", [row[1] for row in status.members]),
        ("role", [row[2] for row in status.members]),
        ("stage", [row[3] for row in status.members]),
        ("epoch", [str(row[4]) for row in status.members]),
        ("connected", ["yes" if row[5] else "LOST" for row in status.members]),
    ]
    for key in keys:
        rows.append(
            (key, [_cell(status.figures.get(row[0], {}).get(key, "")) for row in status.members])
        )
    for label, cells in rows:
        table.add_row(label, *cells)
    out.print(table)


@asynccontextmanager
async def controller_link(
    controller: str, secret: bytes, timeout: float, name: str
) -> AsyncIterator[Peer]:
    """An operator's link to the controller at ``controller`` (``HOST:PORT``), for the
    duration of the block; every way it can fail becomes a :class:`CtlError` saying so in
    one line (a wrong secret, nobody there, a controller that misbehaves or does not answer
    in time, also inside the block).  ``timeout`` bounds the connection: a controller that
    accepts and never answers (the transport's own timeout does not cover it); it is lifted
    once connected, since an event may take as long as its nodes need to drain."""
    host, port = parse_address(controller)
    try:
        with trio.move_on_after(timeout) as connecting:
            async with connect_peer(host, port, secret=secret, name=name, timeout=timeout) as peer:
                connecting.deadline = math.inf
                yield peer
                return
        raise CtlError(f"cannot reach the controller at {controller}: no answer in time")
    except AuthenticationError:
        raise CtlError(
            f"the controller at {controller} does not share our cluster secret "
            "(check --secret-file)"
        ) from None
    except PeerUnavailable as exc:
        raise CtlError(
            f"cannot reach the controller at {controller}: {describe_failure(exc)}"
        ) from None
    except ProtocolError as exc:
        raise CtlError(f"the controller at {controller} misbehaved: {exc}") from None
    except trio.TooSlowError:
        raise CtlError(f"the controller at {controller} did not answer in time") from None


async def _run(args: argparse.Namespace, secret: bytes, out: Console) -> int:
    async with controller_link(args.controller, secret, args.timeout, f"ctl-{os.getpid()}") as peer:
        started = trio.current_time()
        if args.command == "status":
            with trio.fail_after(args.timeout + 2.0):
                render_status(await request_status(peer), out)
            return 0
        kind = "out" if args.command == "scale-out" else "in"
        reply = await request_scale(peer, kind, args.nodes, out, started)
        if not reply.ok:
            raise CtlError(f"scale-{kind} {reply.code}: {reply.text}")
        s = reply.summary
        out.print(
            f"done: epoch {s.get('epoch')}, {s.get('members')} members, "
            f"{s.get('records_moved')} records and {s.get('objects_moved')} objects moved "
            f"in {s.get('duration_s')} s",
            highlight=False,
        )
        return 0
    raise AssertionError("unreachable")  # (the block returns or raises)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 3600 seconds")
    return value


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m store.ctl", description="Operate an S6 cluster through its controller."
    )
    parser.add_argument("--controller", required=True, metavar="HOST:PORT")
    parser.add_argument("--secret-file", metavar="F", help="file holding the cluster secret")
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=CONNECT_TIMEOUT,
        metavar="S",
        help=f"seconds to reach the controller (default {CONNECT_TIMEOUT:g})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="members, epoch, stage and per-node figures")
    out = commands.add_parser("scale-out", help="admit waiting nodes (all when none named)")
    out.add_argument("nodes", nargs="*", default=[], metavar="NODE")
    into = commands.add_parser("scale-in", help="remove nodes from the ring")
    into.add_argument("nodes", nargs="+", metavar="NODE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        parse_address(args.controller)
    except ValueError as exc:
        parser.error(f"--controller: {exc}")
    try:
        secret, _ = read_secret(args.secret_file)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    # The transport logs refused handshakes for servers' sake; here the error line says it.
    logging.getLogger().addHandler(logging.NullHandler())
    # On a terminal rich fits the table to the width (folding long cells); into a pipe or a
    # file nothing is folded or cut short, since scripts grep for addresses and figures.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 10_000)
    try:
        return trio.run(_run, args, secret, out)
    except CtlError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
