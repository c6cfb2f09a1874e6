"""``python -m nf query --controller HOST:PORT NAME QUERY [KEY=VALUE ...]``: ask a running NF
cluster a control-plane question (PRADS ``assets``, IDS ``alerts``, NAT ``table``, any NF's
``statistics``).

It connects to the controller as ``python -m store.ctl`` does; the controller relays the
query to one instance running ``NAME`` (waiting, bounded, for a running scaling event to
end), which answers by iterating the NF's maps (``NF.query``), and relays the answer back.
No scaling event is started.  A list of text lines (the NF's own format) is printed as
lines, anything else as JSON (``--json`` prints JSON always).  Which instance answered, on
which epoch, goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import trio

from store.cli.common import OneLineParser, read_secret
from store.cli.ctl import CONNECT_TIMEOUT, CtlError, controller_link, request_query
from store.wire.control import QueryAnswer, parse_address

__all__ = ["main", "parse_args_list"]

#: Seconds the whole query may take (the controller waits up to 30 s for an event to end).
QUERY_TIMEOUT = 60.0


def parse_args_list(items: Sequence[str]) -> dict[str, Any]:
    """``["n=10", "host=10.0.0.1"]`` as ``{"n": 10, "host": "10.0.0.1"}`` (integers and
    floats as numbers).  Raises ``ValueError`` naming an item without ``=``."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"query argument {item!r} is not KEY=VALUE")
        value: Any = text
        for convert in (int, float):
            try:
                value = convert(text)
                break
            except ValueError:
                continue
        args[key] = value
    return args


async def _ask(args: argparse.Namespace, secret: bytes, query_args: dict[str, Any]) -> QueryAnswer:
    name = f"nf-query-{os.getpid()}"
    async with controller_link(args.controller, secret, args.timeout, name) as peer:
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                return await request_query(peer, args.nf, args.query, query_args)
        except trio.TooSlowError:
            raise CtlError(f"no answer within {QUERY_TIMEOUT:g} s") from None
    raise AssertionError("unreachable")  # (the block returns or raises)


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m nf query",
        description="Ask a running NF cluster a control-plane question, through its controller.",
    )
    parser.add_argument("--controller", required=True, metavar="HOST:PORT")
    parser.add_argument("--secret-file", metavar="F", help="file holding the cluster secret")
    parser.add_argument(
        "--timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="S",
        help=f"seconds to reach the controller (default {CONNECT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the answer as JSON always")
    parser.add_argument("nf", metavar="NAME", help="the NF the instances run (prads, ids, nat...)")
    parser.add_argument("query", metavar="QUERY", help="assets, alerts, table, statistics...")
    parser.add_argument(
        "args", nargs="*", default=[], metavar="KEY=VALUE", help="the query's arguments"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        parse_address(args.controller)
    except ValueError as exc:
        parser.error(f"--controller: {exc}")
    if not 0 < args.timeout < 3600:
        parser.error("--timeout must be between 0 and 3600 seconds")
    try:
        query_args = parse_args_list(args.args)
    except ValueError as exc:
        parser.error(str(exc))
    secret = read_secret(args.secret_file, parser.prog)
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        answer = trio.run(_ask, args, secret, query_args)
    except CtlError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    if not answer.ok:
        print(f"{parser.prog}: error: {answer.text}", file=sys.stderr)
        return 1
    print(f"# answered by {answer.member} on epoch {answer.epoch}", file=sys.stderr)
    value = answer.value
    if not args.json and isinstance(value, list) and all(isinstance(v, str) for v in value):
        for line in value:
            print(line)
    else:
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
