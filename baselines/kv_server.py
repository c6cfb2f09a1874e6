"""``python -m baselines.kv_server --listen HOST:PORT [--secret-file F]``: the central store
of the remote-only baseline (see :mod:`baselines.kv`).

Prints ``kv server listening on HOST:PORT`` (the port bound, for ``:0``) on stdout once it
accepts connections, and serves until interrupted (Ctrl-C or SIGTERM: exit status 0).
Object classes must be importable here by module and name, as on store nodes.
"""

from __future__ import annotations

import signal
import sys
from functools import partial

import trio

from baselines.kv import KvServer, serve_kv
from store.cli.common import OneLineParser, read_secret
from store.wire.control import format_address, parse_address

__all__ = ["main"]


async def _run(host: str, port: int, secret: bytes) -> None:
    server = KvServer()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(
                partial(serve_kv, host, port, secret=secret, server=server)
            )
            print(f"kv server listening on {format_address(host, listening.port)}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    prog = "baselines.kv_server"
    parser = OneLineParser(prog=f"python -m {prog}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to accept")
    parser.add_argument("--secret-file", metavar="F", help="the cluster secret (shared)")
    args = parser.parse_args(argv)
    try:
        host, port = parse_address(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    secret = read_secret(args.secret_file, prog)
    try:
        trio.run(_run, host, port, secret)
    except OSError as exc:
        print(
            f"{prog}: error: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
