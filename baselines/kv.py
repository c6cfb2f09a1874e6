"""Our store as a plain central store: the kv server and its client (remote-only, "kv").

Why a server of its own and not ``store.node`` processes: a store node is an S6 member,
whose key layer would locate, own and move objects; the remote-only baseline must have
none of that (StatelessNF's data store is a passive, central key-value store).  So the
server reuses what is below the object space and nothing of it: the transport
(``store.shell.transport``: authenticated websocket peers carrying batches of cbor
messages, one frame per batch, so requests and replies are pipelined for free), the
object encoding (``dump_state``/``load_state``) and the class lookup of store nodes
(``import_class``, ``"module:qualname"``).  It keeps every object of every map in one
dict and applies the requests of each connection one at a time, in order; since trio
runs one task at a time and a request never waits inside, each request is atomic with
respect to every other connection's.  A method call is run at the server on the live
object (the read-modify-write of a shared object: the NAT's port allocation, PRADS's
untethered asset updates); per-flow state is fetched and written back whole, by
compare-and-set on the version (see :mod:`baselines.remote`).

``python -m baselines.kv_server --listen HOST:PORT --secret-file F`` runs it;
:func:`open_kv_store` connects an instance to it.

The client fails every request still waiting, with one clear error, when the connection
breaks or a reply frame is over the frame limit (``FrameTooLarge``), when the server's
replies skip one of ours (a reply lost to a malformed frame: replies come in request
order), when a malformed frame arrives at all while requests wait (the transport skips
it, so its request would otherwise wait forever), and when a request has had no answer
for ``timeout`` seconds.  It never hangs on a bad server.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import trio

from baselines.remote import Entry, Versions, class_path
from store import ObjectNotFound, PeerUnavailable, RemoteCallError, UntetheredCallsFailed
from store.core.objects import ClassInfo, MethodKind, dump_state, load_state
from store.core.scheduler import Wait
from store.shell.node import import_class
from store.shell.transport import (
    DEFAULT_MAX_FRAME,
    Peer,
    PeerServer,
    connect_peer,
    serve_peers,
)
from store.wire.errors import MalformedMessage, StoreError
from store.wire.messages import Key, key_from_wire, message

__all__ = [
    "DEFAULT_TIMEOUT",
    "KvServer",
    "KvStore",
    "open_kv_store",
    "serve_kv",
]

logger = logging.getLogger("baselines.kv")

#: Seconds a request may wait for its answer before every waiting request fails.
DEFAULT_TIMEOUT: Final = 30.0
#: Objects per answer of a scan (each answer is one message, well under a frame).
SCAN_CHUNK: Final = 256


# --- the messages -------------------------------------------------------------------------
# Requests carry an id; the server answers those that want an answer, in request order.


@message("kv.get")
@dataclass(frozen=True, slots=True)
class KvGet:
    rid: int
    map: str
    key: Key


@message("kv.create")
@dataclass(frozen=True, slots=True)
class KvCreate:
    rid: int
    map: str
    key: Key
    cls: str
    version: bytes
    state: bytes


@message("kv.cas")
@dataclass(frozen=True, slots=True)
class KvCas:
    rid: int
    map: str
    key: Key
    expect: bytes
    version: bytes
    state: bytes


@message("kv.call")
@dataclass(frozen=True, slots=True)
class KvCall:
    rid: int
    map: str
    key: Key
    cls: str
    method: str
    args: Any
    reply: bool  # False: untethered, answered only if it fails


@message("kv.remove")
@dataclass(frozen=True, slots=True)
class KvRemove:
    rid: int
    map: str
    key: Key


@message("kv.scan")
@dataclass(frozen=True, slots=True)
class KvScan:
    rid: int
    map: str
    start: int
    limit: int


@message("kv.sync")
@dataclass(frozen=True, slots=True)
class KvSync:
    rid: int


@message("kv.entry")
@dataclass(frozen=True, slots=True)
class KvEntry:
    """An object's entry: the answer to a get, a create (``made``), a lost CAS."""

    rid: int
    made: bool
    version: bytes
    state: bytes


@message("kv.value")
@dataclass(frozen=True, slots=True)
class KvValue:
    """A plain answer: a call's result, a remove's bool, a CAS's True (done) or None (no
    object), a get's None (no object), a sync's None."""

    rid: int
    value: Any


@message("kv.failed")
@dataclass(frozen=True, slots=True)
class KvFailed:
    rid: int
    code: str  # "not-found", "call-failed", "bad-request"
    text: str


@message("kv.entries")
@dataclass(frozen=True, slots=True)
class KvEntries:
    rid: int
    entries: list[Any]  # [key, state] pairs
    more: bool


# --- the server ---------------------------------------------------------------------------


class _Stored:
    """One object at the server: its version, and its state as bytes or as the live
    object (kept live while calls come, dumped only when someone reads it)."""

    __slots__ = ("cls", "obj", "state", "version")

    def __init__(self, cls: str, version: bytes, state: bytes | None, obj: Any = None) -> None:
        self.cls = cls
        self.version = version
        self.state = state
        self.obj = obj

    def bytes(self) -> bytes:
        if self.state is None:
            self.state = dump_state(self.obj)
        return self.state


class KvServer:
    """The store's state and its request handler (one per server process)."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[Any, _Stored]] = {}
        self.classes: dict[str, ClassInfo] = {}
        self.versions = Versions()
        self.requests = 0

    def _info(self, path: str) -> ClassInfo:
        info = self.classes.get(path)
        if info is None:
            info = self.classes[path] = import_class(path)
        return info

    def apply(self, msg: Any) -> Any:
        """The answer to one request (None: no answer).  Never raises for a request."""
        self.requests += 1
        kind = type(msg)
        try:
            if kind is KvCall:
                return self._call(msg)
            if kind is KvGet:
                stored = self.maps.get(msg.map, {}).get(msg.key)
                if stored is None:
                    return KvValue(msg.rid, None)
                return KvEntry(msg.rid, False, stored.version, stored.bytes())
            if kind is KvCas:
                stored = self.maps.get(msg.map, {}).get(msg.key)
                if stored is None:
                    return KvValue(msg.rid, None)
                if stored.version != msg.expect:
                    return KvEntry(msg.rid, False, stored.version, stored.bytes())
                stored.version, stored.state, stored.obj = msg.version, msg.state, None
                return KvValue(msg.rid, True)
            if kind is KvCreate:
                objects = self.maps.setdefault(msg.map, {})
                stored = objects.get(msg.key)
                if stored is not None:
                    return KvEntry(msg.rid, False, stored.version, stored.bytes())
                objects[msg.key] = _Stored(msg.cls, msg.version, msg.state)
                return KvEntry(msg.rid, True, b"", b"")  # the client has what it sent
            if kind is KvRemove:
                return KvValue(msg.rid, self.maps.get(msg.map, {}).pop(msg.key, None) is not None)
            if kind is KvScan:
                objects = self.maps.get(msg.map, {})
                limit = max(1, min(msg.limit, SCAN_CHUNK))
                chunk = list(itertools.islice(objects.items(), msg.start, msg.start + limit))
                entries = [[key, stored.bytes()] for key, stored in chunk]
                return KvEntries(msg.rid, entries, msg.start + len(chunk) < len(objects))
            if kind is KvSync:
                return KvValue(msg.rid, None)
        except Exception as exc:  # a bad state or class name from a client: its error
            return KvFailed(getattr(msg, "rid", 0), "bad-request", f"{exc!r:.300}")
        return KvFailed(
            getattr(msg, "rid", 0), "bad-request", f"not a request: {type(msg).__name__}"
        )

    def _call(self, msg: KvCall) -> Any:
        stored = self.maps.get(msg.map, {}).get(msg.key)
        if stored is None:
            return KvFailed(msg.rid, "not-found", f"{msg.map}[{msg.key!r:.60}] does not exist")
        info = self._info(stored.cls)
        minfo = info.methods.get(msg.method)
        if minfo is None or not isinstance(msg.args, list):
            return KvFailed(msg.rid, "bad-request", f"{info.name} has no method {msg.method!r:.60}")
        obj = stored.obj
        if obj is None:
            obj = stored.obj = load_state(info.cls, stored.bytes())
        try:
            result = getattr(obj, msg.method)(*msg.args)
        except Exception as exc:
            return KvFailed(msg.rid, "call-failed", f"{info.name}.{msg.method}: {exc!r:.300}")
        finally:
            if minfo.kind is not MethodKind.STALE:  # it may have changed the object
                stored.state = None
                stored.version = self.versions.next()
        return KvValue(msg.rid, result) if msg.reply else None

    async def handle(self, peer: Peer) -> None:
        """One client connection: its requests in order, answers batched by the peer."""
        apply = self.apply
        send = peer.send_nowait
        async for batch in peer:
            for msg in batch:
                answer = apply(msg)
                if answer is not None:
                    try:
                        send(answer)
                    except StoreError as exc:  # an answer over the frame limit
                        send(KvFailed(answer.rid, "bad-request", f"{exc}"))


async def serve_kv(
    host: str,
    port: int,
    *,
    secret: bytes,
    server: KvServer | None = None,
    task_status: trio.TaskStatus[PeerServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the kv store on ``host:port`` until cancelled (``nursery.start`` gives the
    :class:`PeerServer`, whose ``port`` is the one bound)."""
    state = server if server is not None else KvServer()
    await serve_peers(
        state.handle, host, port, secret=secret, name=f"{host}:{port}", task_status=task_status
    )


# --- the client ---------------------------------------------------------------------------


def _entry(reply: Any) -> Entry | None:
    if type(reply) is KvEntry:
        return (reply.version, reply.state)
    if type(reply) is KvValue and reply.value is None:
        return None
    raise MalformedMessage(f"kv server: a {type(reply).__name__} where an entry was due")


def _value(reply: Any) -> Any:
    if type(reply) is KvValue:
        return reply.value
    raise MalformedMessage(f"kv server: a {type(reply).__name__} where a value was due")


def _cas(reply: Any) -> Entry | bool | None:
    if type(reply) is KvEntry:
        return (reply.version, reply.state)
    if type(reply) is KvValue and reply.value in (True, None):
        return True if reply.value else None
    raise MalformedMessage(f"kv server: a {type(reply).__name__} where a CAS answer was due")


def _failure(reply: KvFailed) -> StoreError:
    if reply.code == "not-found":
        return ObjectNotFound(reply.text)
    return RemoteCallError(f"kv server: {reply.code}: {reply.text}")


class KvStore:
    """The remote-only space's :class:`~baselines.remote.StateStore` on our kv server."""

    kind = "kv"

    def __init__(self, peer: Peer, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._peer = peer
        self._timeout = timeout
        self._ids = itertools.count(1)
        #: rid -> (Wait, how to read the reply, when sent); dicts keep insertion order.
        self._pending: dict[int, tuple[Wait[Any], Callable[[Any], Any], float]] = {}
        self._broken: StoreError | None = None
        self._untethered_failed = 0
        self._untethered_failures: list[str] = []
        self._requests = 0
        self._bad_seen = 0

    # -- requests -----------------------------------------------------------------------

    def _send(self, msg: Any, read: Callable[[Any], Any] | None) -> Wait[Any]:
        wait: Wait[Any] = Wait(msg.rid)
        if self._broken is not None:
            wait.fail(self._broken)
            return wait
        try:
            self._peer.send_nowait(msg)
        except StoreError as exc:
            wait.fail(exc)
            return wait
        self._requests += 1
        if read is not None:
            self._pending[msg.rid] = (wait, read, trio.current_time())
        else:
            wait.resolve(None)
        return wait

    def fetch(self, map_name: str, key: Any) -> Wait[Entry | None]:
        return self._send(KvGet(next(self._ids), map_name, key), _entry)

    def create(
        self, map_name: str, key: Any, info: ClassInfo, version: bytes, state: bytes
    ) -> Wait[tuple[bool, Entry]]:
        def read(reply: Any) -> tuple[bool, Entry]:
            if type(reply) is not KvEntry:
                raise MalformedMessage(f"kv server: a {type(reply).__name__} for a create")
            if reply.made:
                return True, (version, state)
            return False, (reply.version, reply.state)

        msg = KvCreate(next(self._ids), map_name, key, class_path(info), version, state)
        return self._send(msg, read)

    def cas(
        self, map_name: str, key: Any, expect: bytes, version: bytes, state: bytes
    ) -> Wait[Entry | bool | None]:
        return self._send(KvCas(next(self._ids), map_name, key, expect, version, state), _cas)

    def call(
        self,
        map_name: str,
        key: Any,
        info: ClassInfo,
        method: str,
        args: tuple[Any, ...],
        hint: Entry | None,
    ) -> Wait[Any]:
        msg = KvCall(next(self._ids), map_name, key, class_path(info), method, list(args), True)
        return self._send(msg, _value)

    def call_nowait(
        self, map_name: str, key: Any, info: ClassInfo, method: str, args: tuple[Any, ...]
    ) -> None:
        msg = KvCall(next(self._ids), map_name, key, class_path(info), method, list(args), False)
        try:
            self._send(msg, None).result()
        except StoreError as exc:  # could not even be sent: the next sync says so
            self._record_untethered(f"{info.name}.{method}: {exc}")

    def remove(self, map_name: str, key: Any) -> Wait[bool]:
        return self._send(KvRemove(next(self._ids), map_name, key), _value)

    async def scan(self, map_name: str) -> list[tuple[Any, bytes]]:
        out: list[tuple[Any, bytes]] = []
        start = 0
        while True:

            def read(reply: Any) -> KvEntries:
                if type(reply) is not KvEntries:
                    raise MalformedMessage(f"kv server: a {type(reply).__name__} for a scan")
                return reply

            answer: KvEntries = await self._send(
                KvScan(next(self._ids), map_name, start, SCAN_CHUNK), read
            )
            for key, state in answer.entries:
                out.append((key_from_wire(key), bytes(state)))
            start += len(answer.entries)
            if not answer.more or not answer.entries:
                return out

    async def sync(self) -> None:
        await self._send(KvSync(next(self._ids)), _value)
        if self._untethered_failed:
            count, failures = self._untethered_failed, self._untethered_failures
            self._untethered_failed, self._untethered_failures = 0, []
            raise UntetheredCallsFailed(count, failures)

    def counters(self) -> dict[str, int]:
        wire = self._peer.statistics()
        return {
            "requests": self._requests,
            "frames_sent": wire.frames_sent,
            "messages_received": wire.messages_received,
        }

    # -- answers ------------------------------------------------------------------------

    def _record_untethered(self, text: str) -> None:
        self._untethered_failed += 1
        if len(self._untethered_failures) < 5:
            self._untethered_failures.append(text)

    def _answer(self, reply: Any) -> None:
        rid = getattr(reply, "rid", None)
        pending = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if pending is None:
            if type(reply) is KvFailed:  # an untethered call that failed at the server
                self._record_untethered(f"{reply.code}: {reply.text}")
                return
            self._break(MalformedMessage(f"kv server answered a request never made ({rid!r:.20})"))
            return
        # Answers come in request order: any request older than this one lost its answer.
        while self._pending:
            oldest = next(iter(self._pending))
            if oldest > rid:
                break
            lost, _, _ = self._pending.pop(oldest)
            lost.fail(MalformedMessage(f"kv server: the answer to request {oldest} was lost"))
        wait, read, _ = pending
        if type(reply) is KvFailed:
            wait.fail(_failure(reply))
            return
        try:
            value = read(reply)
        except StoreError as exc:
            wait.fail(exc)
            return
        wait.resolve(value)

    def _break(self, error: StoreError) -> None:
        """Fail every waiting request with ``error``; later requests fail at once."""
        if self._broken is None:
            self._broken = error
            logger.warning("%s", error)
        pending, self._pending = self._pending, {}
        for wait, _, _ in pending.values():
            wait.fail(error)

    async def _read(self) -> None:
        try:
            async for batch in self._peer:
                for reply in batch:
                    self._answer(reply)
            self._break(PeerUnavailable("the kv server closed the connection"))
        except StoreError as exc:  # (FrameTooLarge, a broken connection...)
            self._break(PeerUnavailable(f"kv server: {exc}"))

    async def _watch(self) -> None:
        """Malformed frames and overdue answers: fail the waiting requests, never hang."""
        tick = min(0.05, self._timeout / 4)
        while self._broken is None:
            await trio.sleep(tick)
            bad = self._peer.statistics().frames_malformed
            if bad > self._bad_seen:
                self._bad_seen = bad
                if self._pending:
                    self._break(
                        MalformedMessage(
                            "the kv server sent a malformed frame: the answers it held are lost"
                        )
                    )
            if self._pending:
                _, _, sent = next(iter(self._pending.values()))
                if trio.current_time() - sent > self._timeout:
                    self._break(
                        PeerUnavailable(
                            f"the kv server has not answered in {self._timeout:g} s "
                            f"({len(self._pending)} requests waiting)"
                        )
                    )


@asynccontextmanager
async def open_kv_store(
    address: str,
    *,
    secret: bytes,
    name: str = "remote-only",
    timeout: float = DEFAULT_TIMEOUT,
    max_frame: int | None = None,
) -> AsyncIterator[KvStore]:
    """A connection to the kv server at ``address`` (``HOST:PORT``) as a state store."""
    from store.wire.control import parse_address

    host, port = parse_address(address)
    frame = DEFAULT_MAX_FRAME if max_frame is None else max_frame
    async with connect_peer(host, port, secret=secret, name=name, max_frame=frame) as peer:
        store = KvStore(peer, timeout)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._read)
            nursery.start_soon(store._watch)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
