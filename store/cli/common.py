"""What the command-line entry points share: one-line errors and the secret file."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from store.shell.controller import read_secret as controller_read_secret
from store.wire.control import parse_address


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def address(text: str) -> str:
    """argparse type for ``HOST:PORT``."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (expected HOST:PORT)") from None
    return text


def read_secret(path: str | None, prog: str) -> bytes:
    """The cluster secret from ``path``, read as the controller reads it, or the development
    secret (with a warning line)."""
    try:
        secret, development = controller_read_secret(path)
    except ValueError as exc:
        fail(prog, str(exc))
    if development:
        print(f"{prog}: warning: no --secret-file, using the development secret", file=sys.stderr)
    return secret


def fail(prog: str, message: str, status: int = 1) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(status)
