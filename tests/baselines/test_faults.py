"""A bad store is a clear error, never a hang: malformed, oversized, missing replies and
a closed connection fail every waiting request with one error saying what happened, and
later requests fail at once.  The bad servers here are the tests' own (a real socket,
our transport for the kv protocol, raw RESP for Redis); the clients are the real ones."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from baselines.kv import KvEntry, KvValue, open_kv_store
from baselines.redis_client import RedisError, open_redis
from store import PeerUnavailable
from store.core.objects import info_of
from store.shell.transport import Peer, serve_peers
from store.wire.errors import MalformedMessage
from tests.baselines.conftest import SECRET, start_kv_server
from tests.baselines.objects import Tally


@asynccontextmanager
async def kv_answering(
    answer: Callable[[Any], Any], *, ignore_limit: bool = False
) -> AsyncIterator[str]:
    """A server on our transport that answers every request with ``answer(request)``
    (None: never answers); ``ignore_limit``: it sends frames over the limit the client
    advertised (our transport would refuse to: this server is broken on purpose)."""

    async def handler(peer: Peer) -> None:
        if ignore_limit:
            peer._frame_limit = 16 * 1024 * 1024
        async for batch in peer:
            for msg in batch:
                reply = answer(msg)
                if reply is not None:
                    peer.send_nowait(reply)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_peers, handler, "127.0.0.1", 0, secret=SECRET, name="bad kv")
        )
        yield f"127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


async def fetch_fails(address: str, **options: Any) -> BaseException:
    async with open_kv_store(address, secret=SECRET, **options) as kv:
        with trio.fail_after(10), pytest.raises(Exception) as caught:
            await kv.fetch("m", "k")
        with pytest.raises(type(caught.value)):  # broken for good: at once
            await kv.fetch("m", "k2")
    return caught.value


async def test_kv_an_oversized_reply_is_a_clear_error() -> None:
    def huge(msg: Any) -> KvValue:
        return KvValue(msg.rid, b"x" * 300_000)

    async with kv_answering(huge, ignore_limit=True) as address:
        error = await fetch_fails(address, max_frame=64 * 1024)
    assert isinstance(error, PeerUnavailable) and str(error).startswith("kv server: ")
    assert "MESSAGE_TOO_BIG" in str(error)


async def test_kv_a_malformed_reply_is_a_clear_error() -> None:
    # wrong field types: the frame does not decode, the transport skips it
    async with kv_answering(lambda msg: KvEntry(msg.rid, "yes", 5, 6)) as address:  # type: ignore[arg-type]
        error = await fetch_fails(address)
    assert isinstance(error, MalformedMessage) and "malformed frame" in str(error)


async def test_kv_a_reply_of_the_wrong_kind_is_a_clear_error() -> None:
    async with kv_answering(lambda msg: KvValue(msg.rid, "not an entry")) as address:
        async with open_kv_store(address, secret=SECRET) as kv:
            with trio.fail_after(10), pytest.raises(MalformedMessage, match="where an entry"):
                await kv.fetch("m", "k")


async def test_kv_a_silent_server_is_a_clear_error_after_the_timeout() -> None:
    async with kv_answering(lambda msg: None) as address:
        error = await fetch_fails(address, timeout=0.3)
    assert isinstance(error, PeerUnavailable) and "not answered in 0.3 s" in str(error)


async def test_kv_a_server_that_goes_away_is_a_clear_error(tmp_path: Path) -> None:
    process, address = await start_kv_server(tmp_path)
    try:
        async with open_kv_store(address, secret=SECRET) as kv:
            created, _ = await kv.create("m", "k", info_of(Tally), b"12345678", b"\xa0")
            assert created and await kv.fetch("m", "k") == (b"12345678", b"\xa0")
            process.kill()
            await process.wait()
            with trio.fail_after(10), pytest.raises(PeerUnavailable, match="kv server"):
                while True:  # (until the close reaches us: the first fetch may race it)
                    await kv.fetch("m", "k")
    finally:
        if process.returncode is None:
            process.kill()


@asynccontextmanager
async def redis_answering(
    answer: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[str]:
    """A TCP server that runs ``answer(stream)`` once the first command has arrived."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await answer(stream)
        await trio.sleep_forever()  # keep the connection open: the client must not hang

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def redis_fails(address: str, **options: Any) -> BaseException:
    async with open_redis(address, **options) as conn:
        with trio.fail_after(10), pytest.raises(Exception) as caught:
            await conn.command(b"GET", b"k")
        with pytest.raises(type(caught.value)):
            await conn.command(b"GET", b"k")
    return caught.value


async def test_redis_a_reply_that_is_not_resp_is_a_clear_error() -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.send_all(b"?what is this\r\n")

    async with redis_answering(garbage) as address:
        error = await redis_fails(address)
    assert isinstance(error, MalformedMessage) and "not RESP" in str(error)


async def test_redis_an_oversized_reply_is_refused() -> None:
    async def huge(stream: trio.SocketStream) -> None:
        await stream.send_all(b"$100000000\r\n")
        for _ in range(40):  # 2.5 MiB of the 100 MB announced
            await stream.send_all(b"x" * 65536)

    async with redis_answering(huge) as address:
        error = await redis_fails(address, max_reply=1024 * 1024)
    assert isinstance(error, MalformedMessage) and "over 1048576 bytes" in str(error)


async def test_redis_a_closed_connection_and_silence_are_clear_errors() -> None:
    async def close(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with redis_answering(close) as address:
        error = await redis_fails(address)
    assert isinstance(error, PeerUnavailable) and "closed the connection" in str(error)

    async def nothing(stream: trio.SocketStream) -> None:
        return None

    async with redis_answering(nothing) as address:
        error = await redis_fails(address, timeout=0.3)
    assert isinstance(error, PeerUnavailable) and "no reply in 0.3 s" in str(error)


async def test_redis_client_pipelines_and_reports_error_replies(redis_server: str) -> None:
    """What a benchmark times: pipelined GET/SET round trips; and an error reply fails
    its own command only."""
    async with open_redis(redis_server) as conn:
        commands: list[tuple[bytes | int, ...]] = []
        for i in range(500):
            commands += [(b"SET", b"k%d" % i, i), (b"GET", b"k%d" % i)]
        replies = await conn.pipeline(commands)
        assert replies[0::2] == [b"OK"] * 500
        assert replies[1::2] == [b"%d" % i for i in range(500)]
        assert conn.writes < len(commands)  # they left together
        with pytest.raises(RedisError, match="unknown command"):
            await conn.command(b"NOSUCHCOMMAND")
        assert await conn.command(b"GET", b"k7") == b"7"
