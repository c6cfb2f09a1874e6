"""The node's and an NF instance's command lines: bad input gets one clear line and a
non-zero exit, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "store.node", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        ([], 2, "--controller"),
        (["--controller", "nowhere"], 2, "HOST:PORT"),
        (["--controller", "127.0.0.1:1", "--listen", "x:y"], 2, "HOST:PORT"),
        (["--controller", "127.0.0.1:1", "--drain-rate", "0"], 2, "drain-rate"),
        (["--controller", "127.0.0.1:1", "--secret-file", "/nonexistent/s"], 1, "secret"),
    ],
)
def test_bad_arguments_get_one_line(args: list[str], status: int, words: str) -> None:
    result = run(*args)
    assert result.returncode == status
    lines = [line for line in result.stderr.splitlines() if "warning" not in line]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_controller_gets_one_line() -> None:
    result = run("--controller", f"127.0.0.1:{closed_port()}")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and "controller" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_gets_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("--controller", "127.0.0.1:1", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and "listen" in lines[0], result.stderr


def serve(*args: str, nf: str = "prads") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nf", "serve", nf, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_nf_instance_without_its_controller_gets_one_line() -> None:
    result = serve(
        "--controller", f"127.0.0.1:{closed_port()}", "--data", "127.0.0.1:0", "--sink",
        "127.0.0.1:9",
    )  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and "controller" in lines[0], result.stderr


def test_an_nf_instance_whose_data_port_is_taken_gets_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = serve(
            "--controller", "127.0.0.1:1", "--data", f"127.0.0.1:{port}", "--sink",
            "127.0.0.1:9",
        )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and "--data" in lines[0], result.stderr


def test_an_nf_instance_with_a_bad_nf_option_gets_one_line_before_joining() -> None:
    """The NF checks its options before the process joins the space: the line names the
    option, not the (unreachable) controller, and no member joins only to die."""
    result = serve(
        "--controller", f"127.0.0.1:{closed_port()}", "--data", "127.0.0.1:0", "--sink",
        "127.0.0.1:9", "--inside", "not-a-network", nf="nat",
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and "'not-a-network' is not an IPv4 network" in lines[0], lines


@pytest.mark.parametrize(
    ("backend_args", "words"),
    [
        (["--backend", "redis"], "needs --store"),
        (["--backend", "remote-only"], "needs --store"),
        (["--backend", "s6", "--store", "127.0.0.1:5"], "--store is for"),
    ],
)
def test_an_nf_instance_with_a_store_that_does_not_fit_its_backend_gets_one_line(
    backend_args: list[str], words: str
) -> None:
    result = serve(
        "--controller", f"127.0.0.1:{closed_port()}", "--data", "127.0.0.1:0", "--sink",
        "127.0.0.1:9", *backend_args,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "warning" not in line.lower()]
    assert len(lines) == 1 and words in lines[0], lines
