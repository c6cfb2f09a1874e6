"""Real processes on loopback: a controller, nodes and embedded instances.

Each process is started with ``python -m ...`` and reports its address on the first line
of stdout; the helpers read that line under a deadline, so no test sleeps for luck.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, stdin: bool = False
    ) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )

    def first_line(self, timeout: float = 20) -> str:
        """The first stdout line (a readiness report), or fail with the process's stderr."""
        import selectors

        assert self.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.kill()
            raise AssertionError(f"{self.args} said nothing in {timeout} s: {self.stderr()}")
        line = self.popen.stdout.readline()
        if not line:
            raise AssertionError(f"{self.args} exited: {self.stderr()}")
        return line.strip()

    def stderr(self) -> str:
        if self.popen.poll() is None:
            return "(still running)"
        assert self.popen.stderr is not None
        return self.popen.stderr.read()

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.popen.communicate(timeout=timeout)
        return self.popen.returncode, out, err

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.kill()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(os.urandom(24).hex().encode())
    return path
