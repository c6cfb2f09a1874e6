"""Peers: authenticated, batching connections between nodes, over trio-websocket.

What this layer promises the node above it:

* **Only cluster members get in.**  Before any application frame, both sides prove they
  know the cluster secret by challenge/response (:func:`proof_mac`); the secret itself
  never crosses the wire.  A wrong secret is refused with one logged line and the server
  keeps serving everybody else.
* **Batching.**  ``send``/``send_nowait`` only queue a message (already encoded, so a
  message that cannot be encoded fails at the caller).  One writer task per connection
  sends *everything queued* as one frame each time it is free.  When the link is idle a
  message leaves at once (a frame of one); under load, messages pile up while the previous
  frame is being written and the next frame carries all of them.  Each frame has a fixed
  cost (the websocket library, the event loop, the system call) far above a message's own:
  ``python -m bench.wire`` measures about 10 k msgs/s with one message per frame against
  about 180 k with batches of 64, on one loopback connection.
* **Order.**  Messages on one connection arrive in the order they were queued.
* **Bad input is contained, and told apart from our bugs.**  Before the handshake is done,
  anything malformed (garbage, a text frame, an unknown message type, a message out of
  turn) is counted and the connection closed, by a server after a
  :class:`~store.wire.messages.Refused` saying why (a client has no refusal to send):
  nothing is known of the other side yet.  After it, an undecodable frame or an unknown
  message type is counted, logged, answered with an :class:`~store.wire.messages.Error` and
  skipped, and the connection stays up: one bad frame from an authenticated peer is its bug
  to report, not a reason to drop the messages in flight.  Higher layers refuse a
  well-formed message they cannot take the same way (:meth:`Peer.refuse`).  A frame over
  ``max_frame`` closes that connection (the websocket library has already refused to
  buffer it), and is counted.  Other peers never notice any of it.  A handler of
  :func:`serve_peers` that fails with anything but the peer's or the network's errors has
  a bug: logged with its traceback and counted as ``bug-<ExceptionType>``
  (``store.wire.errors``), it ends that connection only, unless ``S6_RAISE_BUGS=1`` asks
  for the bug to surface.
* **The door holds against strangers.**  Before the proofs, a connection may send only
  frames of :data:`HANDSHAKE_MAX_FRAME` bytes (a larger one is refused by the websocket as
  it arrives, never buffered or decoded) and must finish within ``handshake_timeout``; at
  most ``max_unauthenticated`` connections per listener may be at that stage at once
  (more are closed as they are accepted, and counted).  The decoder bounds nesting and
  integer width (:func:`~store.wire.messages.decode_batch`), and no error text formats a
  peer's value unbounded.  Whatever way a connection ends (refused, timed out, closed by
  the peer, or after its handler), its socket is closed at once, so that a flood of
  connect-and-close cannot hold file descriptors.
* **Our errors only.**  trio and trio-websocket exceptions are mapped to the store's error
  family here and nowhere else: a closed or unreachable peer is
  :class:`~store.wire.errors.PeerUnavailable`, a broken protocol a
  :class:`~store.wire.errors.ProtocolError` subclass.

The same :class:`Peer` class runs over a websocket (:func:`serve_peers`,
:func:`connect_peer`) or over in-memory channels (:func:`open_memory_peer_pair`), so tests
of higher layers exercise the real batching and the real encoding without sockets.

The handshake, client first::

    client -> server   Hello(version, client name, client nonce, client max_frame)
    server -> client   Hello(version, server name, server nonce, server max_frame)
    client -> server   Proof(mac over the server's nonce, role "client")
    server -> client   Proof(mac over the client's nonce, role "server"), Welcome
                       or Refused(code, reason), then close

Each side thus checks the other: a client does not talk to a node that cannot prove the
secret either.  The role is inside the mac so that one side's proof can never be replayed
as the other's.  This authenticates; it does not encrypt.  Run on a trusted network (or
under TLS, which this layer leaves out).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final, NoReturn, Protocol, cast

import cbor2
import trio
import trio_websocket

from store.wire.control import format_address
from store.wire.errors import (
    AuthenticationError,
    FrameTooLarge,
    MalformedMessage,
    MessageTooLarge,
    PeerUnavailable,
    ProtocolError,
    StoreError,
    UnknownMessageType,
    bug_counter,
    raise_bugs,
    reraise_single,
)
from store.wire.messages import (
    WIRE_VERSION,
    Error,
    Hello,
    Message,
    Proof,
    Refused,
    Welcome,
    brief,
    decode_batch,
    describe_batch,
    encode_batch,
    encode_message,
    frame_from_encoded,
)

__all__ = [
    "BATCH_BYTES",
    "CLOSE_TIMEOUT",
    "DEFAULT_MAX_FRAME",
    "HANDSHAKE_MAX_FRAME",
    "HANDSHAKE_TIMEOUT",
    "HIGH_WATER",
    "MAX_UNAUTHENTICATED",
    "MIN_FRAME",
    "REFUSAL_CLOSE_TIMEOUT",
    "Peer",
    "PeerServer",
    "WireCounters",
    "WireStatistics",
    "connect_peer",
    "open_memory_peer_pair",
    "proof_mac",
    "serve_peers",
]

logger = logging.getLogger("store.shell.transport")

#: Largest frame a peer accepts unless told otherwise.  Big enough for a migrating object
#: with its batch; small enough that a hostile or broken peer cannot make us buffer much.
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
#: Smallest ``max_frame`` allowed: below this even the handshake would not fit.
MIN_FRAME: Final = 1024
#: The writer stops adding messages to a frame at about this many bytes (a larger single
#: message still goes alone).  Past a few hundred KiB, bigger frames gain no throughput
#: and only delay the first message of the frame at the receiver.
BATCH_BYTES: Final = 256 * 1024
#: :meth:`Peer.send` waits while more than this many encoded bytes are queued, so a bulk
#: sender (a migration) cannot grow the queue without bound.  ``send_nowait`` never waits.
HIGH_WATER: Final = 4 * 1024 * 1024
#: Seconds a server gives a new connection to open its websocket and finish the handshake
#: (and a client, to connect and finish it).  Bounds what a silent or slow connection can
#: hold.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Largest frame either side accepts before the other has proved the secret.  A Hello
#: (with a name of 255 characters) is under 1.2 KiB; without this limit a stranger could
#: send ``max_frame`` bytes (16 MiB) of tiny cbor items, which decode to over 1 GB.  Set on
#: the websocket, so a larger frame is refused (1009) as it arrives, not buffered.
HANDSHAKE_MAX_FRAME: Final = 4 * 1024
#: Connections a server lets wait at the door (accepted, not yet authenticated) at once;
#: more are closed as they are accepted.  Each one holds a socket for at most
#: :data:`HANDSHAKE_TIMEOUT`, and a handshake takes a round trip or two, so a cluster's
#: own connections never come near it.
MAX_UNAUTHENTICATED: Final = 64
#: Seconds a server waits for the close handshake of a connection it refused before the
#: proofs (the other side may not answer it at all).
REFUSAL_CLOSE_TIMEOUT: Final = 1.0
#: Seconds a closing peer spends flushing its queue and closing the websocket politely.
CLOSE_TIMEOUT: Final = 5.0
#: Seconds a connection closed by a cancelled task waits for the peer's close handshake.
CANCELLED_CLOSE_TIMEOUT: Final = 0.2
#: Characters allowed in a node name (it appears in logs and in every proof).
MAX_NAME_LENGTH: Final = 255
#: Bytes of a handshake challenge.
NONCE_BYTES: Final = 32
# Room for the cbor array header of a batch (at most 9 bytes).
_HEADER_ROOM: Final = 9
# Read size for the websocket: the library's default (4 KiB) means 64 reads per 256 KiB
# batch, each paying wsproto's per-read parsing; 64 KiB reads cut that to 4.
_RECEIVE_BUFFER: Final = 64 * 1024
# Websocket close codes that mean "closed on purpose" (normal, going away).
_CLEAN_CLOSE: Final = frozenset({1000, 1001})
# Close code for "message too big" (RFC 6455); trio-websocket uses it for max_message_size.
_TOO_BIG: Final = 1009
# Seconds between two log lines about connections refused at a full door.
_REFUSAL_LOG_INTERVAL: Final = 10.0
# Characters of a peer's own text (a Refused reason, an Error's text) we log or send.
_TEXT_LIMIT: Final = 500


# --- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireStatistics:
    """A snapshot of a transport's counters (trio style: a frozen record, cheap to take).

    Handshake frames are not counted in the message, frame and byte totals; they show up
    only in ``peers_connected``, ``auth_failures`` and ``handshake_failures``.

    ``frames_too_large`` counts connections ended by the 1009 (message too big) close code:
    normally a peer's frame over our ``max_frame``; it would also count our frame refused
    by a peer that advertised a larger limit than it enforces.  ``errors_received`` counts
    the peer's :class:`~store.wire.messages.Error` answers: frames of ours it refused.

    ``connections_refused`` counts sockets a server closed as soon as it accepted them,
    because :data:`MAX_UNAUTHENTICATED` others were already waiting at its door.

    ``errors`` holds the named counters no field covers: ``bug-<ExceptionType>`` for a
    handler of :func:`serve_peers` (or its handshake) that failed with a bug of ours.
    """

    messages_sent: int = 0
    messages_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_too_large: int = 0
    frames_malformed: int = 0
    frames_unknown_type: int = 0
    errors_received: int = 0
    auth_failures: int = 0
    handshake_failures: int = 0
    connections_refused: int = 0
    peers_connected: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class WireCounters:
    """The mutable tallies behind :class:`WireStatistics`.

    Every :class:`Peer` has its own; give several peers (and a server) one shared
    ``parent`` to read totals for a whole node: each update is applied to the peer's
    counters and to every ancestor.  O(depth) per update, and updates happen per frame,
    not per message.
    """

    __slots__ = (
        "_parent",
        "auth_failures",
        "bytes_received",
        "bytes_sent",
        "connections_refused",
        "errors",
        "errors_received",
        "frames_malformed",
        "frames_received",
        "frames_sent",
        "frames_too_large",
        "frames_unknown_type",
        "handshake_failures",
        "messages_received",
        "messages_sent",
        "peers_connected",
    )

    def __init__(self, parent: WireCounters | None = None) -> None:
        self._parent = parent
        self.messages_sent = 0
        self.messages_received = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_too_large = 0
        self.frames_malformed = 0
        self.frames_unknown_type = 0
        self.errors_received = 0
        self.auth_failures = 0
        self.handshake_failures = 0
        self.connections_refused = 0
        self.peers_connected = 0
        self.errors: dict[str, int] = {}

    def statistics(self) -> WireStatistics:
        """A frozen snapshot of the counters now."""
        return WireStatistics(
            messages_sent=self.messages_sent,
            messages_received=self.messages_received,
            frames_sent=self.frames_sent,
            frames_received=self.frames_received,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            frames_too_large=self.frames_too_large,
            frames_malformed=self.frames_malformed,
            frames_unknown_type=self.frames_unknown_type,
            errors_received=self.errors_received,
            auth_failures=self.auth_failures,
            handshake_failures=self.handshake_failures,
            connections_refused=self.connections_refused,
            peers_connected=self.peers_connected,
            errors=dict(self.errors),
        )

    def _sent(self, messages: int, size: int) -> None:
        node: WireCounters | None = self
        while node is not None:
            node.frames_sent += 1
            node.messages_sent += messages
            node.bytes_sent += size
            node = node._parent

    def _received(self, messages: int, size: int) -> None:
        node: WireCounters | None = self
        while node is not None:
            node.frames_received += 1
            node.messages_received += messages
            node.bytes_received += size
            node = node._parent

    def _bump(self, name: str, amount: int = 1) -> None:
        """Add to one named counter here and in every ancestor (rare events only)."""
        node: WireCounters | None = self
        while node is not None:
            setattr(node, name, getattr(node, name) + amount)
            node = node._parent

    def _count_error(self, name: str) -> None:
        """Add one to the error counter ``name`` of :attr:`errors`, here and in every
        ancestor (rare events only)."""
        node: WireCounters | None = self
        while node is not None:
            node.errors[name] = node.errors.get(name, 0) + 1
            node = node._parent


# --- links: one frame pipe, websocket or in-memory ----------------------------------------


class _Link(Protocol):
    """What a :class:`Peer` needs from the thing underneath: whole frames in and out.

    Implementations raise only store errors: :class:`PeerUnavailable` when the other end
    is gone, :class:`FrameTooLarge` when a frame over the limit ended the connection, and
    :class:`MalformedMessage` for a frame of the wrong kind (a text frame).
    """

    remote: str

    async def send_frame(self, frame: bytes) -> None: ...

    async def receive_frame(self) -> bytes: ...

    async def aclose(self) -> None: ...

    @property
    def closed_cleanly(self) -> bool: ...


def _describe_close(reason: trio_websocket.CloseReason | None) -> str:
    if reason is None:
        return "no close reason"
    text = f"{reason.code} {reason.name}"
    return f"{text}: {reason.reason}" if reason.reason else text


class _WebSocketLink:
    """A trio-websocket connection seen as a frame pipe; maps its exceptions to ours."""

    __slots__ = ("_ws", "remote")

    def __init__(self, ws: trio_websocket.WebSocketConnection, remote: str) -> None:
        self._ws = ws
        self.remote = remote

    @property
    def websocket(self) -> trio_websocket.WebSocketConnection:
        return self._ws

    def _closed_error(self, reason: trio_websocket.CloseReason | None) -> StoreError:
        if reason is not None and reason.code == _TOO_BIG:
            return FrameTooLarge(f"connection with {self.remote} closed: {_describe_close(reason)}")
        return PeerUnavailable(f"connection with {self.remote} closed ({_describe_close(reason)})")

    async def send_frame(self, frame: bytes) -> None:
        try:
            await self._ws.send_message(frame)
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed_error(exc.reason) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # trio-websocket maps these itself today; this keeps the promise if it stops.
            raise PeerUnavailable(f"connection with {self.remote} broke: {exc!r}") from None

    async def receive_frame(self) -> bytes:
        try:
            data = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed_error(exc.reason) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerUnavailable(f"connection with {self.remote} broke: {exc!r}") from None
        if isinstance(data, str):
            raise MalformedMessage("a text frame; the wire carries binary cbor frames only")
        return data

    async def aclose(self) -> None:
        try:
            await self._ws.aclose()
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError):
            pass  # already gone: closing is all we wanted

    @property
    def closed_cleanly(self) -> bool:
        reason = self._ws.closed
        return reason is not None and reason.code in _CLEAN_CLOSE


class _PairState:
    """Shared by the two ends of an in-memory pair: how the pair was closed."""

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code: int | None = None


class _MemoryLink:
    """One end of an in-memory pair: trio memory channels of frames.

    Mirrors the websocket's behaviour where a higher layer could tell the difference: the
    frame limit is enforced by the receiver and ends the connection for both ends with
    :class:`FrameTooLarge`; a normal close ends iteration cleanly on the other end.
    """

    __slots__ = ("_max_frame", "_receive", "_send", "_state", "remote")

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        *,
        remote: str,
        max_frame: int,
        state: _PairState,
    ) -> None:
        self._send = send
        self._receive = receive
        self._max_frame = max_frame
        self._state = state
        self.remote = remote

    def _closed_error(self) -> StoreError:
        if self._state.code == _TOO_BIG:
            return FrameTooLarge(f"in-memory connection with {self.remote} closed: frame too big")
        return PeerUnavailable(f"in-memory connection with {self.remote} closed")

    async def send_frame(self, frame: bytes) -> None:
        try:
            await self._send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._closed_error() from None

    async def receive_frame(self) -> bytes:
        try:
            frame = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_error() from None
        if len(frame) > self._max_frame:
            self._state.code = _TOO_BIG
            await self.aclose()
            raise self._closed_error()
        return frame

    async def aclose(self) -> None:
        if self._state.code is None:
            self._state.code = 1000
        await self._send.aclose()
        await self._receive.aclose()

    @property
    def closed_cleanly(self) -> bool:
        return self._state.code in _CLEAN_CLOSE


# --- the peer -----------------------------------------------------------------------------


class Peer:
    """One authenticated connection to another node.

    Get one from :func:`connect_peer`, from the handler of :func:`serve_peers`, or from
    :func:`open_memory_peer_pair`; the peer is usable inside that context and closed when
    it ends (after a bounded flush of what is still queued).

    Sending never talks to the socket directly: :meth:`send_nowait` encodes and queues,
    and the peer's writer task sends everything queued as one frame whenever it is free.
    Receiving is done by *one* task calling :meth:`receive` (or iterating the peer), which
    returns whole decoded batches.  Error messages from the other side are logged and
    counted, not returned.

    After the connection fails, every call raises :class:`PeerUnavailable` (or
    :class:`FrameTooLarge`, when that is what ended it); messages still queued are dropped,
    as they would be on any broken link.  Higher layers decide what to retry.
    """

    __slots__ = (
        "_close_timeout",
        "_closing",
        "_counters",
        "_enqueued",
        "_error",
        "_frame_limit",
        "_link",
        "_progress",
        "_queue",
        "_queued_bytes",
        "_wake",
        "_written",
        "local_name",
        "name",
    )

    def __init__(
        self,
        link: _Link,
        *,
        name: str,
        local_name: str,
        frame_limit: int,
        counters: WireCounters,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        #: The other node's name, as it proved in the handshake.
        self.name = name
        #: This node's name.
        self.local_name = local_name
        self._link = link
        self._frame_limit = frame_limit
        self._counters = counters
        self._close_timeout = close_timeout
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._enqueued = 0  # messages ever queued
        self._written = 0  # messages ever handed to the link
        self._wake = trio.Event()  # set when there is something for the writer
        self._progress = trio.Event()  # set (and replaced) after every frame written
        self._error: StoreError | None = None
        self._closing = False

    def __repr__(self) -> str:
        state = "closed" if self._error is not None else "open"
        return f"<Peer {self.local_name}->{self.name} {self._link.remote} {state}>"

    # -- state ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed or broken; nothing more can be sent."""
        return self._error is not None

    @property
    def remote(self) -> str:
        """Where the other end is (``host:port``, or ``memory:<name>``), for logs."""
        return self._link.remote

    @property
    def frame_limit(self) -> int:
        """Largest frame this peer sends: the smaller of both sides' ``max_frame``."""
        return self._frame_limit

    @property
    def queued(self) -> int:
        """Messages queued and not yet handed to the socket."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Encoded bytes queued and not yet handed to the socket."""
        return self._queued_bytes

    def statistics(self) -> WireStatistics:
        """This connection's counters (not including any parent's other children)."""
        return self._counters.statistics()

    def _unavailable(self) -> StoreError:
        error = self._error
        if isinstance(error, FrameTooLarge):
            return FrameTooLarge(f"peer {self.name}: {error}")
        return PeerUnavailable(f"peer {self.name} is unavailable: {error}")

    def _fail(self, error: StoreError) -> None:
        """Record the first failure, drop the queue, wake everybody who waits on us."""
        if self._error is not None:
            return
        self._error = error
        if isinstance(error, FrameTooLarge):
            self._counters._bump("frames_too_large")
        if self._queue:
            logger.warning(
                "peer %s: dropping %d queued messages: %s", self.name, len(self._queue), error
            )
        self._queue = []
        self._queued_bytes = 0
        self._wake.set()
        self._progress.set()

    # -- sending ----------------------------------------------------------------------

    def send_nowait(self, msg: Message) -> None:
        """Queue ``msg`` for the next frame.  Never blocks, never yields; O(size of msg).

        The message is encoded now, so ``TypeError``/``ValueError`` for an unregistered
        class or an unencodable field surfaces here, at the caller.  Raises
        :class:`~store.wire.errors.MessageTooLarge` if the message alone exceeds
        :attr:`frame_limit`, and :class:`PeerUnavailable` once the peer is closed.  The
        queue is not bounded here (the node decides what to do with :attr:`queued_bytes`);
        :meth:`send` is the variant with backpressure.
        """
        if self._error is not None:
            raise self._unavailable()
        if self._closing:
            raise PeerUnavailable(f"peer {self.name} is closing")
        data = encode_message(msg)
        if len(data) + 1 > self._frame_limit:  # + the 1-byte header of a batch of one
            raise MessageTooLarge(
                f"a {type(msg).__qualname__} of {len(data)} bytes does not fit in a frame of "
                f"at most {self._frame_limit} bytes (peer {self.name})"
            )
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._enqueued += 1
        self._wake.set()

    async def send(self, msg: Message) -> None:
        """Queue ``msg`` like :meth:`send_nowait`, then wait while the queue is over
        :data:`HIGH_WATER` bytes (until it is below half of that).  Always a trio checkpoint.

        The checkpoint lets the writer run, so a producer that awaits ``send`` for every
        message gets frames of one or two messages unless the socket pushes back; a hot
        path should queue a burst with :meth:`send_nowait` and yield once (bench/wire.py
        shows the difference).  If cancelled while waiting, the message stays queued.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_nowait(msg)
        if self._queued_bytes <= HIGH_WATER:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while self._queued_bytes > HIGH_WATER // 2:
            if self._error is not None:
                raise self._unavailable()
            await self._progress.wait()

    async def flush(self) -> None:
        """Wait until every message queued before this call has been handed to the socket
        (not: received by the peer).  Raises :class:`PeerUnavailable` if the connection
        fails first.  Always a trio checkpoint."""
        target = self._enqueued
        if self._written >= target:
            await trio.lowlevel.checkpoint()
            return
        while self._written < target:
            if self._error is not None:
                raise self._unavailable()
            await self._progress.wait()

    def _take_batch(self) -> list[bytes]:
        """Remove and return the messages for the next frame: all of them if they fit."""
        queue = self._queue
        limit = min(self._frame_limit, BATCH_BYTES) - _HEADER_ROOM
        if self._queued_bytes <= limit:
            self._queue = []
            self._queued_bytes = 0
            return queue
        total = 0
        count = 0
        for part in queue:
            size = len(part)
            if count and total + size > limit:
                break
            total += size
            count += 1
        batch = queue[:count]
        del queue[:count]
        self._queued_bytes -= total
        return batch

    async def _write_loop(self) -> None:
        """The writer task: one frame per wake-up, holding everything queued (up to
        :data:`BATCH_BYTES`).  Ends when the peer closes or the link fails."""
        link = self._link
        counters = self._counters
        try:
            while True:
                if not self._queue:
                    if self._closing or self._error is not None:
                        return
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                batch = self._take_batch()
                frame = frame_from_encoded(batch)
                await link.send_frame(frame)
                self._written += len(batch)
                counters._sent(len(batch), len(frame))
                progress = self._progress
                self._progress = trio.Event()
                progress.set()
        except StoreError as exc:
            self._fail(exc)

    # -- receiving --------------------------------------------------------------------

    async def receive(self) -> list[Message]:
        """The next batch of messages from the peer, in the order they were sent.

        Bad frames in between are counted, answered with an :class:`Error` and skipped.
        Raises :class:`PeerUnavailable` when the connection is closed (by either side) and
        nothing is left to read, :class:`FrameTooLarge` if an oversized frame ended it.
        Only one task may receive from a peer.
        """
        link = self._link
        counters = self._counters
        while True:
            try:
                frame = await link.receive_frame()
            except MalformedMessage as exc:
                counters._received(0, 0)
                self._bad_frame("malformed", "frames_malformed", exc)
                continue
            except StoreError as exc:
                self._fail(exc)
                raise
            try:
                batch = decode_batch(frame)
            except UnknownMessageType as exc:
                counters._received(0, len(frame))
                self._bad_frame("unknown-type", "frames_unknown_type", exc)
                continue
            except MalformedMessage as exc:
                counters._received(0, len(frame))
                self._bad_frame("malformed", "frames_malformed", exc)
                continue
            counters._received(len(batch), len(frame))
            if any(type(msg) is Error for msg in batch):
                batch = self._take_errors(batch)
            if batch:
                return batch

    def _bad_frame(self, code: str, counter: str, exc: ProtocolError) -> None:
        self._counters._bump(counter)
        logger.warning("peer %s sent a bad frame (%s): %s", self.name, code, exc)
        self.refuse(code, str(exc))

    def refuse(self, code: str, text: str) -> None:
        """Tell the peer that something it sent was refused: an
        :class:`~store.wire.messages.Error` (``code`` for programs, such as ``"malformed"``
        or ``"unexpected"``; ``text``, cut to 500 characters, for people), which the peer
        logs and counts as ``errors_received``.  The connection stays up.

        The transport does this itself for frames it cannot decode; higher layers call it
        for a well-formed message they will not take (of a kind they never take from this
        peer, or with fields that contradict the session), after counting and logging it.
        Does nothing once the connection is closing or closed: there is nobody to tell.
        """
        if self._error is None and not self._closing:
            self.send_nowait(Error(code, text[:500]))

    def _take_errors(self, batch: list[Message]) -> list[Message]:
        kept: list[Message] = []
        for msg in batch:
            if isinstance(msg, Error):
                self._counters._bump("errors_received")
                logger.warning(
                    "peer %s refused our frame (%.40s): %.500s", self.name, msg.code, msg.text
                )
            else:
                kept.append(msg)
        return kept

    def __aiter__(self) -> Peer:
        return self

    async def __anext__(self) -> list[Message]:
        """Batches until the connection closes; a clean close ends the iteration, a
        broken one raises."""
        try:
            return await self.receive()
        except PeerUnavailable:
            if self._link.closed_cleanly:
                raise StopAsyncIteration from None
            raise

    # -- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Flush what is queued (for at most the close timeout), then close the
        connection.  Idempotent; closes even if cancelled (without the flush)."""
        try:
            if self._error is None:
                with trio.move_on_after(self._close_timeout):
                    await self.flush()
        except PeerUnavailable:
            pass
        finally:
            await self._abort()

    async def _abort(self) -> None:
        """Close now, dropping the queue; bounded and shielded so that cleanup runs even
        in a cancelled scope.  Under cancellation (the process, or an in-process cluster,
        is going away) the close handshake is waited for only briefly: the peer's reader
        may be cancelled too (every member of an in-process cluster is at once), and would
        never answer; the connection is closed either way."""
        self._closing = True
        self._wake.set()
        bound = self._close_timeout
        if trio.current_effective_deadline() == -math.inf:  # (this task is cancelled)
            bound = min(bound, CANCELLED_CLOSE_TIMEOUT)
        with trio.CancelScope(shield=True), trio.move_on_after(bound):
            await self._link.aclose()
        self._fail(PeerUnavailable(f"connection with {self._link.remote} closed locally"))


@asynccontextmanager
async def _running(peer: Peer) -> AsyncIterator[Peer]:
    """Run ``peer``'s writer for the duration of the block; flush and close at the end
    (abort instead, if the block raised)."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer._write_loop)
            try:
                yield peer
            except BaseException:
                await peer._abort()
                raise
            else:
                await peer.aclose()
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The writer runs beside the caller's block: the caller sees its own exception.
        reraise_single(group)


# --- the handshake ------------------------------------------------------------------------


def proof_mac(
    secret: bytes,
    *,
    role: str,
    challenge: bytes,
    prover: str,
    verifier: str,
    prover_nonce: bytes,
) -> bytes:
    """HMAC-SHA256 keyed with the cluster ``secret``: the answer to a challenge.

    It covers the verifier's ``challenge`` nonce (so it is fresh), both names (so it cannot
    be used for another pair), the prover's own nonce (so it belongs to this connection)
    and the ``role`` (``"client"`` or ``"server"``, so a node's answer as server can never
    pass as a client's).  The fields are cbor-encoded as one array, which keeps the
    boundaries between them unambiguous.
    """
    data = cbor2.dumps(["s6-proof", role, challenge, prover_nonce, prover, verifier])
    return hmac.new(secret, data, hashlib.sha256).digest()


async def _handshake_frame(link: _Link, counters: WireCounters) -> list[Message]:
    """One frame during the handshake, decoded; bad frames are counted and raised."""
    try:
        return decode_batch(await link.receive_frame())
    except UnknownMessageType:
        counters._bump("frames_unknown_type")
        raise
    except MalformedMessage:
        counters._bump("frames_malformed")
        raise


class _Refusal(ProtocolError):
    """Internal: a handshake rule broken by the other side, with the Refused code to send."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


async def _refuse(link: _Link, code: str, reason: str) -> None:
    """Tell the other side why, if it still listens; the caller closes."""
    try:
        await link.send_frame(encode_batch([Refused(code, reason[:_TEXT_LIMIT])]))
    except StoreError:
        pass


def _check_hello(batch: list[Message], who: str) -> Hello:
    if len(batch) != 1 or not isinstance(batch[0], Hello):
        raise _Refusal("protocol", f"{who} did not start with a Hello: {describe_batch(batch)}")
    hello = batch[0]
    if hello.version != WIRE_VERSION:
        raise _Refusal(
            "version", f"{who} speaks wire version {brief(hello.version)}, we speak {WIRE_VERSION}"
        )
    if len(hello.nonce) != NONCE_BYTES:
        raise _Refusal("protocol", f"{who} sent a {len(hello.nonce)}-byte nonce")
    if not 0 < len(hello.name) <= MAX_NAME_LENGTH:
        raise _Refusal("protocol", f"{who} sent a name of {len(hello.name)} characters")
    if hello.max_frame < MIN_FRAME:
        raise _Refusal("protocol", f"{who} accepts frames of only {brief(hello.max_frame)} bytes")
    return hello


async def _accept_handshake(
    link: _Link, *, secret: bytes, name: str, max_frame: int, counters: WireCounters
) -> Hello:
    """The server's side; returns the client's Hello once its proof checked out.

    Every refusal is sent to the client as a :class:`Refused` (if it still listens) before
    the error is raised, so that the client can say why it was turned away.
    """
    try:
        hello = _check_hello(await _handshake_frame(link, counters), f"client at {link.remote}")
        nonce = secrets.token_bytes(NONCE_BYTES)
        await link.send_frame(encode_batch([Hello(WIRE_VERSION, name, nonce, max_frame)]))
        batch = await _handshake_frame(link, counters)
        if len(batch) != 1 or not isinstance(batch[0], Proof):
            raise _Refusal(
                "protocol",
                f"client {hello.name!r} at {link.remote} sent {describe_batch(batch)}, not a Proof",
            )
    except _Refusal as exc:
        await _refuse(link, exc.code, str(exc))
        raise
    except ProtocolError as exc:  # an undecodable or oversized frame
        await _refuse(link, "protocol", str(exc))
        raise
    expected = proof_mac(
        secret,
        role="client",
        challenge=nonce,
        prover=hello.name,
        verifier=name,
        prover_nonce=hello.nonce,
    )
    if not hmac.compare_digest(batch[0].mac, expected):
        await _refuse(link, "auth", "authentication failed")
        raise AuthenticationError(
            f"refused peer {hello.name!r} from {link.remote}: wrong cluster secret "
            "(its proof does not match ours)"
        )
    mine = proof_mac(
        secret,
        role="server",
        challenge=hello.nonce,
        prover=name,
        verifier=hello.name,
        prover_nonce=nonce,
    )
    # Raised before the Welcome goes out: the client may send a large frame the moment it
    # has read it, and the websocket's own reader, which runs ahead of this code, would
    # refuse that frame under the handshake's limit.
    _allow_link_frames(link, max_frame)
    await link.send_frame(encode_batch([Proof(mine), Welcome()]))
    return hello


def _raise_refused(batch: list[Message], where: str) -> None:
    if batch and isinstance(batch[0], Refused):
        refused = batch[0]
        text = f"{where} refused us ({refused.code[:40]}): {refused.reason[:_TEXT_LIMIT]}"
        if refused.code == "auth":
            raise AuthenticationError(text)
        raise ProtocolError(text)


async def _open_handshake(
    link: _Link, *, secret: bytes, name: str, max_frame: int, counters: WireCounters
) -> Hello:
    """The client's side; returns the server's Hello once both proofs checked out."""
    where = f"server at {link.remote}"
    nonce = secrets.token_bytes(NONCE_BYTES)
    await link.send_frame(encode_batch([Hello(WIRE_VERSION, name, nonce, max_frame)]))
    batch = await _handshake_frame(link, counters)
    _raise_refused(batch, where)
    hello = _check_hello(batch, where)
    mine = proof_mac(
        secret,
        role="client",
        challenge=hello.nonce,
        prover=name,
        verifier=hello.name,
        prover_nonce=nonce,
    )
    await link.send_frame(encode_batch([Proof(mine)]))
    # The server sends its proof, its Welcome and possibly large frames right behind them;
    # the websocket's reader runs ahead of this code, so the limit goes up now (the
    # server's proof is still checked below, before anything it sends is used).
    _allow_link_frames(link, max_frame)
    batch = await _handshake_frame(link, counters)
    _raise_refused(batch, where)
    if len(batch) != 2 or not isinstance(batch[0], Proof) or not isinstance(batch[1], Welcome):
        raise ProtocolError(f"{where} answered {describe_batch(batch)}, not Proof and Welcome")
    expected = proof_mac(
        secret,
        role="server",
        challenge=nonce,
        prover=hello.name,
        verifier=name,
        prover_nonce=hello.nonce,
    )
    if not hmac.compare_digest(batch[0].mac, expected):
        raise AuthenticationError(
            f"{where} ({hello.name!r}) could not prove it knows the cluster secret"
        )
    return hello


def _check_settings(secret: bytes, name: str, max_frame: int) -> None:
    """Refuse bad local settings at once, with a message naming the setting."""
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("the cluster secret must be non-empty bytes")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"a node name is a str of 1 to {MAX_NAME_LENGTH} characters")
    if max_frame < MIN_FRAME:
        raise ValueError(f"max_frame must be at least {MIN_FRAME} bytes, not {max_frame}")


def _stream_remote(stream: trio.SocketStream) -> str:
    """``host:port`` of the other end of a TCP stream, for logs."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "an unknown address"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


async def _close_stream(stream: trio.abc.Stream) -> None:
    """Close the socket now: its file descriptor is released at once, whatever state the
    websocket above it is in.  Bounded and shielded, so it runs in a cancelled scope too."""
    with trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class _ReaderWatch:
    """Stands in for the nursery that trio-websocket's ``wrap_server_stream`` and
    ``wrap_client_stream`` start the websocket's reader task in.

    The reader runs in the real nursery, watched: when it ends (the other side closed the
    socket or broke the protocol before the websocket was open), :attr:`scope` is
    cancelled, so that the wait for the opening handshake ends at once.  Without this the
    library waits for its connect timeout (10 s) with the socket open: about 20,000
    connect-and-close in a few seconds ran the process out of file descriptors.  An
    exception from the reader (the library's, met on the peer's input) is kept in
    :attr:`failure` instead of failing our nursery: it ends that connection only.
    """

    __slots__ = ("_nursery", "failure", "scope")

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.scope = trio.CancelScope()
        self.failure: Exception | None = None

    def start_soon(
        self, async_fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> None:
        async def watched() -> None:
            try:
                await async_fn(*args)
            except Exception as exc:  # the library's error on the peer's input
                self.failure = exc
            finally:
                self.scope.cancel()

        self._nursery.start_soon(watched, name=name)

    def why(self) -> str:
        if self.failure is not None:
            return f"the websocket failed: {self.failure!r:.200}"
        return "the peer closed the connection before the websocket was open"


async def _accept_websocket(
    nursery: trio.Nursery, stream: trio.SocketStream
) -> tuple[trio_websocket.WebSocketConnection | None, _ReaderWatch]:
    """The server's side of the websocket opening (HTTP upgrade) on ``stream``, frames
    limited to :data:`HANDSHAKE_MAX_FRAME` until the proofs are done; ``None`` if the peer
    went away first (the watch says why)."""
    watch = _ReaderWatch(nursery)
    with watch.scope:
        try:
            request = await trio_websocket.wrap_server_stream(
                cast(trio.Nursery, watch),
                stream,
                max_message_size=HANDSHAKE_MAX_FRAME,
                receive_buffer_size=_RECEIVE_BUFFER,
            )
            return await request.accept(), watch
        except trio_websocket.ConnectionClosed:
            pass  # gone while we answered its upgrade
    return None, watch


def _allow_link_frames(link: _Link, max_frame: int) -> None:
    if isinstance(link, _WebSocketLink):
        _allow_frames(link.websocket, max_frame)


def _allow_frames(ws: trio_websocket.WebSocketConnection, max_frame: int) -> None:
    """Raise the websocket's message limit from the handshake's to ``max_frame``, once the
    other side has proved it knows the secret.

    trio-websocket fixes the limit when the connection is made and has no public way to
    change it; this sets the attribute its reader checks for every message part (so a
    frame over the limit is refused as it arrives, never buffered whole).
    """
    ws._max_message_size = max_frame


class _Door:
    """The cap on a listener's unauthenticated connections: each accepted socket holds a
    place from its accept until it has proved the secret or is closed; a socket that finds
    every place taken is closed at once and counted (``connections_refused``), logged at
    most once per :data:`_REFUSAL_LOG_INTERVAL` with how many were refused meanwhile."""

    __slots__ = ("_last_log", "_limit", "_refused_since_log", "open")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.open = 0  # unauthenticated connections now
        self._last_log = -math.inf
        self._refused_since_log = 0

    def enter(self) -> bool:
        if self.open >= self._limit:
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1

    def log_refusal(self) -> None:
        self._refused_since_log += 1
        now = trio.current_time()
        if now - self._last_log >= _REFUSAL_LOG_INTERVAL:
            logger.warning(
                "refused %d connection(s): %d unauthenticated connections are open, the limit",
                self._refused_since_log,
                self._limit,
            )
            self._last_log = now
            self._refused_since_log = 0


# --- server -------------------------------------------------------------------------------


class PeerServer:
    """What :func:`serve_peers` hands back through ``nursery.start``: where it listens and
    what it counted (totals over every connection it accepted)."""

    __slots__ = ("_counters", "_door", "_listeners")

    def __init__(
        self, listeners: list[trio.SocketListener], counters: WireCounters, door: _Door
    ) -> None:
        self._listeners = listeners
        self._counters = counters
        self._door = door

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0).  Only for a single listener:
        pass a concrete ``host``, not ``None``."""
        if len(self._listeners) != 1:
            raise RuntimeError(f"{len(self._listeners)} listeners: pass a concrete host")
        port = self._listeners[0].socket.getsockname()[1]
        assert isinstance(port, int)
        return port

    @property
    def unauthenticated(self) -> int:
        """Connections accepted that have not proved the secret yet (nor been closed)."""
        return self._door.open

    def statistics(self) -> WireStatistics:
        """Totals over all accepted connections, handshake failures included."""
        return self._counters.statistics()


async def serve_peers(
    handler: Callable[[Peer], Awaitable[None]],
    host: str | None,
    port: int,
    *,
    secret: bytes,
    name: str,
    max_frame: int = DEFAULT_MAX_FRAME,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    close_timeout: float = CLOSE_TIMEOUT,
    max_unauthenticated: int = MAX_UNAUTHENTICATED,
    counters: WireCounters | None = None,
    task_status: trio.TaskStatus[PeerServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept peers on ``host``:``port`` until cancelled; run ``handler(peer)`` for each
    one that proves it knows ``secret``.

    Start it with ``server = await nursery.start(partial(serve_peers, handler, host, 0,
    secret=..., name=...))`` to learn ``server.port``.  When ``handler`` returns, what it
    queued is flushed and the connection closed.  If the handler lets a
    :class:`PeerUnavailable` or :class:`ProtocolError` escape (the network's or the peer's
    doing), that one connection is logged as one line and closed.  Any other exception is a
    bug of ours: it is logged with its traceback, counted as ``bug-<ExceptionType>`` in
    :attr:`WireStatistics.errors`, and that connection is closed while the server goes on
    serving the others; with ``S6_RAISE_BUGS=1`` (:func:`store.wire.errors.raise_bugs`) it
    propagates instead and stops the server, so that tests fail loudly.

    The door, before the handler is ever called: a connection has ``handshake_timeout``
    seconds to open the websocket and prove the secret, in frames of at most
    :data:`HANDSHAKE_MAX_FRAME` bytes; at most ``max_unauthenticated`` connections may be
    at that stage at once (more are closed as they are accepted, and counted as
    ``connections_refused``).  A failed handshake (wrong secret, garbage, a frame over the
    limit, timeout, the peer gone) is counted, logged as one line, and closed.  Whatever
    way a connection ends, its socket is closed at once.

    ``max_frame`` is the largest frame accepted after the handshake (and advertised to
    clients, so that they never send a larger one); ``counters`` lets a node total several
    transports.
    """
    _check_settings(secret, name, max_frame)
    if max_unauthenticated < 1:
        raise ValueError(f"max_unauthenticated must be at least 1, not {max_unauthenticated}")
    totals = counters if counters is not None else WireCounters()
    door = _Door(max_unauthenticated)

    async def on_stream(stream: trio.SocketStream) -> None:
        if not door.enter():
            totals._bump("connections_refused")
            door.log_refusal()
            await _close_stream(stream)
            return
        inside = [True]  # still holding a place at the door
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await _serve_connection(
                        stream,
                        nursery,
                        handler,
                        door=door,
                        inside=inside,
                        secret=secret,
                        name=name,
                        max_frame=max_frame,
                        handshake_timeout=handshake_timeout,
                        close_timeout=close_timeout,
                        totals=totals,
                    )
                finally:
                    nursery.cancel_scope.cancel()  # the websocket's reader
        finally:
            if inside[0]:
                door.leave()
            await _close_stream(stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and host is not None and len(listeners) == 1 and name == f"{host}:0":
        # Named after the address asked for: tell peers the one bound (a node is known by
        # its address, and "127.0.0.1:0" in a handshake or a log line names nobody).
        name = format_address(host, listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_stream, listeners)
        task_status.started(PeerServer(listeners, totals, door))
        await trio.sleep_forever()
    raise AssertionError("unreachable: serve_peers runs until cancelled")  # pragma: no cover


async def _serve_connection(
    stream: trio.SocketStream,
    nursery: trio.Nursery,
    handler: Callable[[Peer], Awaitable[None]],
    *,
    door: _Door,
    inside: list[bool],
    secret: bytes,
    name: str,
    max_frame: int,
    handshake_timeout: float,
    close_timeout: float,
    totals: WireCounters,
) -> None:
    """One accepted socket: the door (websocket opening and proofs, under one deadline),
    then the handler.  The caller closes the socket afterwards."""
    remote = _stream_remote(stream)
    link: _WebSocketLink | None = None
    hello: Hello | None = None
    failure: StoreError | None = None
    watch: _ReaderWatch | None = None
    with trio.move_on_after(handshake_timeout) as deadline:
        try:
            ws, watch = await _accept_websocket(nursery, stream)
            if ws is not None:
                link = _WebSocketLink(ws, remote)
                hello = await _accept_handshake(
                    link, secret=secret, name=name, max_frame=max_frame, counters=totals
                )
        except (ProtocolError, PeerUnavailable) as exc:
            failure = exc
        except Exception as exc:
            # Nothing a peer sends may end up here: a bug of ours, met on its input.
            totals._count_error(bug_counter(exc))
            logger.exception("bug in the handshake with %s; its connection is closed", remote)
            if raise_bugs():
                raise
            return
    if hello is None or link is None:
        if isinstance(failure, AuthenticationError):
            totals._bump("auth_failures")
            logger.warning("%s", failure)
        elif isinstance(failure, ProtocolError):
            totals._bump("handshake_failures")
            if isinstance(failure, FrameTooLarge):
                totals._bump("frames_too_large")
            logger.warning("refused connection from %s: %s", remote, failure)
        else:
            totals._bump("handshake_failures")
            if failure is not None:
                why = f"failed: {failure}"
            elif deadline.cancelled_caught:
                why = f"timed out after {handshake_timeout} s"
            else:
                why = f"failed: {watch.why() if watch is not None else 'no websocket'}"
            logger.info("handshake with %s %s", remote, why)
        if link is not None:
            await _close_quietly(link, min(close_timeout, REFUSAL_CLOSE_TIMEOUT))
        return
    door.leave()
    inside[0] = False
    _allow_frames(link.websocket, max_frame)
    totals._bump("peers_connected")
    logger.debug("peer %r connected from %s", hello.name, remote)
    peer = Peer(
        link,
        name=hello.name,
        local_name=name,
        frame_limit=min(max_frame, hello.max_frame),
        counters=WireCounters(totals),
        close_timeout=close_timeout,
    )
    try:
        async with _running(peer):
            await handler(peer)
    except (PeerUnavailable, ProtocolError) as exc:
        logger.info("connection with peer %r (%s) ended: %s", hello.name, remote, exc)
    except Exception as exc:
        peer._counters._count_error(bug_counter(exc))
        logger.exception(
            "bug in the handler of peer %r (%s); its connection is closed", hello.name, remote
        )
        if raise_bugs():
            raise


async def _close_quietly(link: _Link, timeout: float) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        await link.aclose()


# --- client -------------------------------------------------------------------------------


@asynccontextmanager
async def connect_peer(
    host: str,
    port: int,
    *,
    secret: bytes,
    name: str,
    max_frame: int = DEFAULT_MAX_FRAME,
    timeout: float = HANDSHAKE_TIMEOUT,
    close_timeout: float = CLOSE_TIMEOUT,
    counters: WireCounters | None = None,
) -> AsyncIterator[Peer]:
    """Connect to the node at ``host``:``port``, authenticate both ways, and yield the
    :class:`Peer`: ``async with connect_peer(...) as peer:``.

    Raises :class:`PeerUnavailable` if the node cannot be reached or the connection and
    handshake take longer than ``timeout`` seconds, :class:`AuthenticationError` if either
    side fails to prove the secret (logged too), and :class:`ProtocolError` if the other
    side speaks another protocol.  Until the server has proved the secret it may send only
    frames of :data:`HANDSHAKE_MAX_FRAME` bytes, as a server allows us.  On exit, what is
    queued is flushed and the connection closed; the socket is closed at once whenever the
    connection ends.
    """
    _check_settings(secret, name, max_frame)
    where = f"{host}:{port}"
    own = WireCounters(counters)
    stream: trio.SocketStream | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(timeout):
                    try:
                        stream = await trio.open_tcp_stream(host, port)
                    except OSError as exc:
                        raise PeerUnavailable(f"cannot connect to {where}: {exc!r}") from None
                    watch = _ReaderWatch(nursery)
                    ws: trio_websocket.WebSocketConnection | None = None
                    with watch.scope:
                        ws = await trio_websocket.wrap_client_stream(
                            cast(trio.Nursery, watch),
                            stream,
                            host,
                            "/",
                            max_message_size=HANDSHAKE_MAX_FRAME,
                            receive_buffer_size=_RECEIVE_BUFFER,
                        )
                    if ws is None:
                        raise PeerUnavailable(f"cannot connect to {where}: {watch.why()}")
                    link = _WebSocketLink(ws, where)
                    hello = await _open_handshake(
                        link, secret=secret, name=name, max_frame=max_frame, counters=own
                    )
            except trio.TooSlowError:
                if stream is None:
                    raise PeerUnavailable(
                        f"cannot connect to {where}: no answer in {timeout} s"
                    ) from None
                own._bump("handshake_failures")
                raise PeerUnavailable(
                    f"handshake with {where} timed out after {timeout} s"
                ) from None
            except AuthenticationError as exc:
                own._bump("auth_failures")
                logger.warning("%s", exc)
                raise
            except ProtocolError:
                own._bump("handshake_failures")
                raise
            except PeerUnavailable:
                if stream is not None:  # reached, but the handshake did not finish
                    own._bump("handshake_failures")
                raise
            _allow_frames(ws, max_frame)
            own._bump("peers_connected")
            peer = Peer(
                link,
                name=hello.name,
                local_name=name,
                frame_limit=min(max_frame, hello.max_frame),
                counters=own,
                close_timeout=close_timeout,
            )
            try:
                async with _running(peer):
                    yield peer
            finally:
                nursery.cancel_scope.cancel()  # the websocket's reader
    except BaseExceptionGroup as group:
        # The websocket's reader runs beside the caller's block: the caller sees its own
        # exception.
        reraise_single(group)
    finally:
        if stream is not None:
            await _close_stream(stream)


# --- in memory ----------------------------------------------------------------------------


@asynccontextmanager
async def open_memory_peer_pair(
    name_a: str = "a",
    name_b: str = "b",
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    buffer: int | float = 16,
    close_timeout: float = CLOSE_TIMEOUT,
    counters_a: WireCounters | None = None,
    counters_b: WireCounters | None = None,
) -> AsyncIterator[tuple[Peer, Peer]]:
    """Two connected peers without sockets: ``async with open_memory_peer_pair() as (a, b)``.

    ``a`` is node ``name_a``'s view (its :attr:`Peer.name` is ``name_b``) and ``b`` the
    other way round.  Same class, same batching, same encoding and decoding, same frame
    limit as over a websocket, so higher layers can be tested with it and trusted over the
    network.  ``buffer`` frames may be in flight each way (``math.inf`` for unbounded).
    No handshake: both ends are in this process already.
    """
    if max_frame < MIN_FRAME:
        raise ValueError(f"max_frame must be at least {MIN_FRAME} bytes, not {max_frame}")
    if buffer != math.inf and (not isinstance(buffer, int) or buffer < 0):
        raise ValueError(f"buffer must be a non-negative int or math.inf, not {buffer!r}")
    a_send, b_receive = trio.open_memory_channel[bytes](buffer)
    b_send, a_receive = trio.open_memory_channel[bytes](buffer)
    state = _PairState()
    link_a = _MemoryLink(
        a_send, a_receive, remote=f"memory:{name_b}", max_frame=max_frame, state=state
    )
    link_b = _MemoryLink(
        b_send, b_receive, remote=f"memory:{name_a}", max_frame=max_frame, state=state
    )
    own_a = WireCounters(counters_a)
    own_b = WireCounters(counters_b)
    own_a._bump("peers_connected")
    own_b._bump("peers_connected")
    a = Peer(
        link_a,
        name=name_b,
        local_name=name_a,
        frame_limit=max_frame,
        counters=own_a,
        close_timeout=close_timeout,
    )
    b = Peer(
        link_b,
        name=name_a,
        local_name=name_b,
        frame_limit=max_frame,
        counters=own_b,
        close_timeout=close_timeout,
    )
    async with _running(a), _running(b):
        yield a, b
