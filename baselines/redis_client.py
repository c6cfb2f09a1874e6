"""A trio-native Redis client over hiredis's RESP parser, and Redis as a state store.

:class:`RedisConnection` is one TCP connection, pipelined: ``command_nowait`` packs the
command (``hiredis.pack_command``) into an outgoing buffer and returns a
:class:`~store.core.scheduler.Wait`; a writer task sends everything buffered in one
``send_all`` whenever it is free, so the commands that microthreads issue between two
writes leave together; a reader task feeds what arrives to a ``hiredis.Reader`` and
settles the waiting commands in order (Redis answers a connection's commands in order).
``await conn.command(...)`` and ``await conn.pipeline([...])`` are the same for trio
tasks (a benchmark times ``pipeline`` of GET/SET against redis-py's pipelines).

It never hangs on a bad server: a reply hiredis cannot parse, a reply over ``max_reply``
bytes, a reply to no command, the connection closing, or a command unanswered for
``timeout`` seconds each fail every waiting command with one clear error, and later
commands fail at once.

:class:`RedisStore` is the remote-only space's state store on Redis (see
:mod:`baselines.remote`).  An object is one string value, its 8-byte version then its
cbor state, under ``s6|<map>|<cbor of the key>``.  A get is ``GET``; a create is
``SET k v NX GET`` (atomic get-or-create, Redis 7); a write-back is a compare-and-set Lua
script (``EVALSHA``: replace the value if its version is still the one read, else answer
the value as it is); a remove is ``DEL``.  A method call on a shared object is an atomic
read-modify-write built on the same script: the client applies the method to the state
it read last and sets the result only if nobody wrote in between, else applies it again
to the state the script answered (optimistic concurrency: no lock held across a round
trip, nothing lost, and two instances allocating from one NAT pool shard never get one
port twice).  Why not MULTI/WATCH: WATCH belongs to a connection, and ours is shared by
every microthread of the instance, pipelined; the script keeps one connection per
instance.  The calls of one instance on one object go in order, batched: while a
read-modify-write is out, later calls on that object queue, and the next one applies all
of them to the state just written with one CAS (StatelessNF's batching; a call that
changes nothing, like a read, costs no write).
"""

from __future__ import annotations

import collections
import logging
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import cbor2
import hiredis
import trio

from baselines.remote import Entry, Versions
from store import ObjectNotFound, PeerUnavailable, RemoteCallError, UntetheredCallsFailed
from store.core.objects import ClassInfo, dump_state, load_state
from store.core.scheduler import Wait
from store.wire.errors import MalformedMessage, StoreError
from store.wire.messages import key_from_wire

__all__ = [
    "DEFAULT_MAX_REPLY",
    "DEFAULT_TIMEOUT",
    "RedisConnection",
    "RedisError",
    "RedisStore",
    "open_redis",
    "open_redis_store",
    "redis_server_path",
    "run_redis_server",
]

logger = logging.getLogger("baselines.redis")

#: Largest reply accepted, in bytes buffered without a complete reply.
DEFAULT_MAX_REPLY: Final = 64 * 1024 * 1024
#: Seconds a command may wait for its reply before every waiting command fails.
DEFAULT_TIMEOUT: Final = 30.0
#: Bytes read from the socket at a time.
READ_SIZE: Final = 64 * 1024

#: Compare-and-set on the version (the value's first 8 bytes): 1 done, 0 no such key,
#: else the value as it is.
CAS_SCRIPT: Final = b"""
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, 8) ~= ARGV[1] then return v end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


class RedisError(RemoteCallError):
    """An error reply of the Redis server (``-ERR ...``), for the command that got it."""


class RedisConnection:
    """One pipelined connection to a Redis server (see the module docstring)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_reply: int = DEFAULT_MAX_REPLY,
        timeout: float = DEFAULT_TIMEOUT,
        where: str = "redis",
    ) -> None:
        self._stream = stream
        self._max_reply = max_reply
        self._timeout = timeout
        self._where = where
        self._out: list[bytes] = []
        self._wake = trio.Event()
        self._pending: collections.deque[tuple[Wait[Any], float]] = collections.deque()
        self._broken: StoreError | None = None
        self.commands = 0
        self.writes = 0

    def command_nowait(self, *args: bytes | str | int | float) -> Wait[Any]:
        """Queue one command; the Wait is settled with its reply (bytes, int, list, None)
        or failed with :class:`RedisError` (an error reply) or the connection's error."""
        wait: Wait[Any] = Wait(args[0])
        if self._broken is not None:
            wait.fail(self._broken)
            return wait
        self._out.append(hiredis.pack_command(args))  # type: ignore[arg-type]  # (its stub: a 1-tuple)
        self._pending.append((wait, trio.current_time()))
        self.commands += 1
        self._wake.set()
        return wait

    async def command(self, *args: bytes | str | int | float) -> Any:
        return await self.command_nowait(*args)

    async def pipeline(self, commands: Sequence[Sequence[bytes | str | int | float]]) -> list[Any]:
        """Send ``commands`` at once and return their replies, in order (an error reply
        raises :class:`RedisError` after all have been answered)."""
        waits = [self.command_nowait(*c) for c in commands]
        replies = []
        failure: BaseException | None = None
        for wait in waits:
            try:
                replies.append(await wait)
            except RedisError as exc:
                failure = failure or exc
                replies.append(exc)
        if failure is not None:
            raise failure
        return replies

    def _break(self, error: StoreError) -> None:
        if self._broken is None:
            self._broken = error
            logger.warning("%s: %s", self._where, error)
        pending, self._pending = self._pending, collections.deque()
        for wait, _ in pending:
            wait.fail(error)
        self._wake.set()

    async def _write(self) -> None:
        stream = self._stream
        while self._broken is None:
            if not self._out:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            data = b"".join(self._out)
            self._out.clear()
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._break(PeerUnavailable(f"{self._where}: cannot send: {exc!r}"))
                return
            self.writes += 1

    async def _read(self) -> None:
        reader = hiredis.Reader()
        stream = self._stream
        pending = self._pending
        where = self._where
        while self._broken is None:
            try:
                data = await stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._break(PeerUnavailable(f"{where}: connection lost: {exc!r}"))
                return
            if not data:
                self._break(PeerUnavailable(f"{where}: the server closed the connection"))
                return
            reader.feed(bytes(data))
            while True:
                try:
                    reply = reader.gets()
                except hiredis.ProtocolError as exc:
                    self._break(MalformedMessage(f"{where}: a reply that is not RESP: {exc}"))
                    return
                if reply is False:
                    break
                if not pending:
                    self._break(MalformedMessage(f"{where}: a reply to no command"))
                    return
                wait, _ = pending.popleft()
                if isinstance(reply, hiredis.ReplyError):
                    wait.fail(RedisError(f"{where}: {reply}"))
                else:
                    wait.resolve(reply)
            if reader.len() > self._max_reply:
                self._break(
                    MalformedMessage(f"{where}: a reply over {self._max_reply} bytes, refused")
                )
                return

    async def _watch(self) -> None:
        tick = min(0.25, self._timeout / 4)
        while self._broken is None:
            await trio.sleep(tick)
            if self._pending and trio.current_time() - self._pending[0][1] > self._timeout:
                self._break(
                    PeerUnavailable(
                        f"{self._where}: no reply in {self._timeout:g} s "
                        f"({len(self._pending)} commands waiting)"
                    )
                )


@asynccontextmanager
async def open_redis(
    address: str, *, max_reply: int = DEFAULT_MAX_REPLY, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[RedisConnection]:
    """A :class:`RedisConnection` to ``HOST:PORT`` for the duration of the block."""
    from store.wire.control import parse_address

    host, port = parse_address(address)
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise PeerUnavailable(f"cannot connect to redis at {address}: {exc!r}") from None
    async with stream:
        conn = RedisConnection(
            stream, max_reply=max_reply, timeout=timeout, where=f"redis at {address}"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._write)
            nursery.start_soon(conn._read)
            nursery.start_soon(conn._watch)
            try:
                yield conn
            finally:
                nursery.cancel_scope.cancel()


# --- Redis as the remote-only space's store ----------------------------------------------


class _Ops:
    """The calls of this instance on one shared object, waiting for their turn."""

    __slots__ = ("info", "key", "queue", "rk")

    def __init__(self, rk: bytes, key: Any, info: ClassInfo) -> None:
        self.rk = rk
        self.key = key
        self.info = info
        self.queue: list[tuple[str, tuple[Any, ...], Wait[Any] | None]] = []


def _split(value: bytes) -> Entry:
    if len(value) < 8:
        raise MalformedMessage(f"a stored object of {len(value)} bytes has no version")
    return value[:8], value[8:]


class RedisStore:
    """The remote-only space's :class:`~baselines.remote.StateStore` on Redis."""

    kind = "redis"

    def __init__(self, conn: RedisConnection, cas_sha: bytes) -> None:
        self._conn = conn
        self._cas = cas_sha
        self._prefixes: dict[str, bytes] = {}
        self._versions = Versions()
        self._busy: dict[bytes, _Ops] = {}
        self._idle: list[Wait[None]] = []
        self._untethered_failed = 0
        self._untethered_failures: list[str] = []
        self._rmw = 0
        self._rmw_conflicts = 0

    def _rk(self, map_name: str, key: Any) -> bytes:
        prefix = self._prefixes.get(map_name)
        if prefix is None:
            prefix = self._prefixes[map_name] = b"s6|" + map_name.encode() + b"|"
        return prefix + cbor2.dumps(key)

    # -- plain requests -------------------------------------------------------------------

    def fetch(self, map_name: str, key: Any) -> Wait[Entry | None]:
        out: Wait[Entry | None] = Wait(key)
        got = self._conn.command_nowait(b"GET", self._rk(map_name, key))

        def done(got: Wait[Any]) -> None:
            try:
                value = got.result()
                out.resolve(None if value is None else _split(value))
            except StoreError as exc:
                out.fail(exc)

        got.add_done_callback(done)
        return out

    def create(
        self, map_name: str, key: Any, info: ClassInfo, version: bytes, state: bytes
    ) -> Wait[tuple[bool, Entry]]:
        out: Wait[tuple[bool, Entry]] = Wait(key)
        rk = self._rk(map_name, key)
        got = self._conn.command_nowait(b"SET", rk, version + state, b"NX", b"GET")

        def done(got: Wait[Any]) -> None:
            try:
                value = got.result()
                out.resolve((True, (version, state)) if value is None else (False, _split(value)))
            except StoreError as exc:
                out.fail(exc)

        got.add_done_callback(done)
        return out

    def _cas_nowait(self, rk: bytes, expect: bytes, value: bytes) -> Wait[Any]:
        return self._conn.command_nowait(b"EVALSHA", self._cas, 1, rk, expect, value)

    def cas(
        self, map_name: str, key: Any, expect: bytes, version: bytes, state: bytes
    ) -> Wait[Entry | bool | None]:
        out: Wait[Entry | bool | None] = Wait(key)
        got = self._cas_nowait(self._rk(map_name, key), expect, version + state)

        def done(got: Wait[Any]) -> None:
            try:
                value = got.result()
                out.resolve(True if value == 1 else None if value == 0 else _split(value))
            except StoreError as exc:
                out.fail(exc)

        got.add_done_callback(done)
        return out

    def remove(self, map_name: str, key: Any) -> Wait[bool]:
        out: Wait[bool] = Wait(key)
        got = self._conn.command_nowait(b"DEL", self._rk(map_name, key))

        def done(got: Wait[Any]) -> None:
            try:
                out.resolve(bool(got.result()))
            except StoreError as exc:
                out.fail(exc)

        got.add_done_callback(done)
        return out

    async def scan(self, map_name: str) -> list[tuple[Any, bytes]]:
        prefix = self._rk(map_name, None)[:-1]  # (cbor of None is one byte)
        pattern = b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in prefix)
        conn = self._conn
        keys: list[bytes] = []
        cursor = b"0"
        while True:
            cursor, found = await conn.command(
                b"SCAN", cursor, b"MATCH", pattern + b"*", b"COUNT", 1000
            )
            keys.extend(found)
            if cursor == b"0":
                break
        out: list[tuple[Any, bytes]] = []
        for i in range(0, len(keys), 512):
            chunk = keys[i : i + 512]
            values = await conn.command(b"MGET", *chunk)
            for rk, value in zip(chunk, values, strict=True):
                if value is not None:  # removed since the scan saw it
                    key = key_from_wire(cbor2.loads(rk[len(prefix) :]))
                    out.append((key, _split(value)[1]))
        return out

    async def sync(self) -> None:
        while self._busy:
            wait: Wait[None] = Wait("idle")
            self._idle.append(wait)
            await wait
        await self._conn.command(b"PING")
        if self._untethered_failed:
            count, failures = self._untethered_failed, self._untethered_failures
            self._untethered_failed, self._untethered_failures = 0, []
            raise UntetheredCallsFailed(count, failures)

    def counters(self) -> dict[str, int]:
        return {
            "commands": self._conn.commands,
            "writes": self._conn.writes,
            "read_modify_writes": self._rmw,
            "rmw_conflicts": self._rmw_conflicts,
        }

    # -- method calls: read-modify-write by compare-and-set -------------------------------

    def call(
        self,
        map_name: str,
        key: Any,
        info: ClassInfo,
        method: str,
        args: tuple[Any, ...],
        hint: Entry | None,
    ) -> Wait[Any]:
        wait: Wait[Any] = Wait((map_name, key, method))
        self._queue(map_name, key, info, method, args, wait, hint)
        return wait

    def call_nowait(
        self, map_name: str, key: Any, info: ClassInfo, method: str, args: tuple[Any, ...]
    ) -> None:
        self._queue(map_name, key, info, method, args, None, None)

    def _queue(
        self,
        map_name: str,
        key: Any,
        info: ClassInfo,
        method: str,
        args: tuple[Any, ...],
        wait: Wait[Any] | None,
        hint: Entry | None,
    ) -> None:
        rk = self._rk(map_name, key)
        ops = self._busy.get(rk)
        if ops is not None:  # a read-modify-write of this object is out: wait behind it
            ops.queue.append((method, args, wait))
            return
        ops = self._busy[rk] = _Ops(rk, (map_name, key), info)
        ops.queue.append((method, args, wait))
        if hint is not None:
            self._apply(ops, hint)
            return
        got = self._conn.command_nowait(b"GET", rk)
        got.add_done_callback(lambda got: self._fetched(ops, got))

    def _fetched(self, ops: _Ops, got: Wait[Any]) -> None:
        try:
            value = got.result()
            if value is None:
                raise ObjectNotFound(f"{ops.key[0]}[{ops.key[1]!r:.60}] does not exist")
            entry = _split(value)
        except StoreError as exc:
            self._finish(ops, ops.queue, exc)
            return
        self._apply(ops, entry)

    def _apply(self, ops: _Ops, entry: Entry) -> None:
        """Apply every queued call to ``entry``'s state; CAS the result unless unchanged."""
        batch, ops.queue = ops.queue, []
        results: list[tuple[bool, Any]] = []
        try:
            obj = load_state(ops.info.cls, entry[1])
        except StoreError as exc:
            self._finish(ops, batch, exc)
            return
        for method, args, _ in batch:
            try:
                results.append((True, getattr(obj, method)(*args)))
            except Exception as exc:
                results.append((False, exc))
        state = dump_state(obj)
        if state == entry[1]:
            self._settle(ops, batch, results, entry)
            return
        self._rmw += 1
        version = self._versions.next()
        got = self._cas_nowait(ops.rk, entry[0], version + state)
        got.add_done_callback(lambda got: self._cased(ops, batch, results, (version, state), got))

    def _cased(
        self,
        ops: _Ops,
        batch: list[tuple[str, tuple[Any, ...], Wait[Any] | None]],
        results: list[tuple[bool, Any]],
        written: Entry,
        got: Wait[Any],
    ) -> None:
        try:
            value = got.result()
            if value == 0:
                raise ObjectNotFound(f"{ops.key[0]}[{ops.key[1]!r:.60}] does not exist")
            current = None if value == 1 else _split(value)
        except StoreError as exc:
            self._finish(ops, batch, exc)
            return
        if current is not None:  # another instance wrote it first: apply again to its state
            self._rmw_conflicts += 1
            ops.queue[:0] = batch
            self._apply(ops, current)
            return
        self._settle(ops, batch, results, written)

    def _settle(
        self,
        ops: _Ops,
        batch: list[tuple[str, tuple[Any, ...], Wait[Any] | None]],
        results: list[tuple[bool, Any]],
        entry: Entry,
    ) -> None:
        for (method, _, wait), (ok, value) in zip(batch, results, strict=True):
            if ok:
                if wait is not None:
                    wait.resolve(value)
            else:
                error = RemoteCallError(f"{ops.info.name}.{method}: {value!r:.300}")
                if wait is not None:
                    wait.fail(error)
                else:
                    self._record_untethered(str(error))
        if ops.queue:  # calls that came meanwhile: on the state just written, one CAS
            self._apply(ops, entry)
        else:
            self._done(ops)

    def _finish(
        self,
        ops: _Ops,
        batch: list[tuple[str, tuple[Any, ...], Wait[Any] | None]],
        error: StoreError,
    ) -> None:
        """Fail ``batch`` and whatever queued behind it (they would meet the same)."""
        for method, _, wait in batch + ops.queue:
            if wait is not None:
                wait.fail(error)
            else:
                self._record_untethered(f"{ops.info.name}.{method}: {error}")
        ops.queue = []
        self._done(ops)

    def _done(self, ops: _Ops) -> None:
        del self._busy[ops.rk]
        if not self._busy and self._idle:
            idle, self._idle = self._idle, []
            for wait in idle:
                wait.resolve(None)

    def _record_untethered(self, text: str) -> None:
        self._untethered_failed += 1
        if len(self._untethered_failures) < 5:
            self._untethered_failures.append(text)


@asynccontextmanager
async def open_redis_store(
    address: str, *, max_reply: int = DEFAULT_MAX_REPLY, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[RedisStore]:
    """Redis at ``address`` as a state store (one pipelined connection; the CAS script
    loaded once)."""
    async with open_redis(address, max_reply=max_reply, timeout=timeout) as conn:
        sha = await conn.command(b"SCRIPT", b"LOAD", CAS_SCRIPT)
        yield RedisStore(conn, sha)


# --- a server for tests and benchmarks ----------------------------------------------------


def redis_server_path() -> str | None:
    """Where ``redis-server`` is, or None (then tests and benchmarks say so and skip)."""
    return shutil.which("redis-server")


@asynccontextmanager
async def run_redis_server(*, ready_timeout: float = 10.0) -> AsyncIterator[str]:
    """A throw-away ``redis-server`` on a free loopback port, without persistence; yields
    its ``HOST:PORT`` once it answers PING, and stops it at the end of the block."""
    import socket
    import subprocess

    path = redis_server_path()
    if path is None:
        raise FileNotFoundError(
            "redis-server is not installed (Debian: apt-get install redis-server)"
        )
    for _attempt in range(5):
        with socket.socket() as probe:  # a free port (another process may take it: retried)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        argv = [
            path,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        address = f"127.0.0.1:{port}"
        try:
            ready = False
            with trio.move_on_after(ready_timeout):
                while process.poll() is None:
                    try:
                        async with open_redis(address, timeout=ready_timeout) as conn:
                            ready = await conn.command(b"PING") == b"PONG"
                            break
                    except PeerUnavailable:
                        await trio.sleep(0.02)  # not listening yet: poll until the deadline
            if not ready:
                if process.poll() is not None:
                    continue  # it exited (the port was taken meanwhile): another port
                raise RuntimeError(
                    f"redis-server on port {port} did not answer in {ready_timeout:g} s"
                )
            yield address
            return
        finally:
            if process.returncode is None:
                process.terminate()
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
    raise RuntimeError("redis-server did not start on any of 5 free ports")
