"""Real stores on loopback for the baseline tests: a ``python -m baselines.kv_server``
process and a ``redis-server`` (skipped, with one line, where it is not installed)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from baselines.redis_client import redis_server_path, run_redis_server

SECRET = b"baselines-test-secret-baselines-test"
ROOT = Path(__file__).resolve().parents[2]


async def start_kv_server(tmp_path: Path) -> tuple[trio.Process, str]:
    """A kv server process on a free port; its address from its first line on stdout."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    argv = [sys.executable, "-m", "baselines.kv_server", "--listen", "127.0.0.1:0"]
    process = await trio.lowlevel.open_process(
        [*argv, "--secret-file", str(secret_file)], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(30):
        while b"\n" not in seen:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"the kv server exited before listening ({process.returncode})"
            seen += chunk
    line = seen.split(b"\n")[0].decode()
    assert line.startswith("kv server listening on "), line
    return process, line.rsplit(" ", 1)[1]


@pytest.fixture
async def kv_server(tmp_path: Path) -> AsyncIterator[str]:
    process, address = await start_kv_server(tmp_path)
    try:
        yield address
    finally:
        process.terminate()
        with trio.CancelScope(shield=True), trio.fail_after(10):
            await process.wait()


@pytest.fixture
async def redis_server() -> AsyncIterator[str]:
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    async with run_redis_server() as address:
        yield address


@pytest.fixture(params=["remote-only", "redis"])
async def remote(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """``(backend, address)``: a kv server process, then a redis-server."""
    if request.param == "remote-only":
        process, address = await start_kv_server(tmp_path)
        try:
            yield "remote-only", address
        finally:
            process.terminate()
            with trio.CancelScope(shield=True), trio.fail_after(10):
                await process.wait()
        return
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    async with run_redis_server() as address:
        yield "redis", address
