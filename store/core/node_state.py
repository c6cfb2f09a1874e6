"""One node of the object space as a pure state machine: key layer and object layer.

The paper (§4.1) splits the space in two layers, both spread over the instances:

* the **key layer**: the key's authority (``ring.ownership``) holds its :class:`KeyRecord`:
  kind, object owner, version and the queue of requests waiting while an object moves.
  Create, get, remove and the granting of writable references are serialized there.
* the **object layer**: the node that holds an object (:class:`Held`) serves it.  A
  single-writer object lives where it was last written; a multi-writer object lives where
  it was created and takes shipped calls.

:class:`NodeState` has no trio, no sockets and no clock.  Its inputs are messages
(:meth:`NodeState.handle`), calls from the API (``acquire``, ``call``, ``remove``...) and
``now`` where time matters.  Its outputs are

* messages, appended to :attr:`NodeState.outbox` (a list per destination node, so that the
  shell sends each list as one frame: batching falls out of the structure); a destination
  appears in :attr:`NodeState.urgent` when something in its list must not wait for the
  untethered-flush timer;
* :class:`~store.core.scheduler.Wait` objects settled when answers arrive (settling never
  runs a coroutine, so this is safe from anywhere).

Messages a node sends to itself are queued and handled before the entry point returns, so
the single-node (embedded) space runs the very same code with no socket at all.

The hot path does not come through here at all: the API reads :attr:`NodeState.objects`
directly and takes a local reference with two attribute checks (see ``store.api``).

Location cache, invalidated lazily: a node remembers where a multi-writer object (or a
read-only single-writer one) lives and sends calls straight there.  A call that reaches a
node that no longer holds the object is answered NOT_HERE, and the caller asks the key
owner again.  Eager invalidation would make every key record carry the set of nodes that
cached it, which costs memory on every record (we budget 300 bytes per object) for the
benefit of the rare object that moves; lazy invalidation costs one extra round trip to
the rare caller that finds an object gone.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ring.hashring import HashRing, key_token
from ring.ownership import (
    Arrival,
    Forward,
    Holding,
    NodeView,
    Pull,
    Request,
    Serve,
    Stage,
    counted_since,
    decide,
    drain_destination,
)
from store.core.objects import ClassInfo, MethodKind, ObjectKind, dump_state, load_state
from store.core.scheduler import Wait
from store.wire.errors import (
    ObjectNotFound,
    ObjectRemoved,
    RemoteCallError,
    StateNotEncodable,
    StoreError,
    WrongKind,
)
from store.wire.messages import (
    Barrier,
    Call,
    Drop,
    Evacuate,
    Fence,
    Fold,
    Gone,
    HandOn,
    HandOnAck,
    HandOns,
    HandOnsAck,
    KeyOp,
    Message,
    Release,
    Reply,
    Scan,
    Snapshot,
    Transfer,
    Untethered,
    key_from_wire,
)

__all__ = ["Held", "KeyRecord", "NodeState", "NodeStatistics", "Op", "Status"]

K = tuple[str, Any]  # (map name, key): the identity of one object


class Op(enum.IntEnum):
    """Key-layer operations (``KeyOp.op``)."""

    CREATE = 1  # create if absent; single-writer: and grant the writable reference
    ACQUIRE = 2  # single-writer: the writable reference of an existing object
    LOCATE = 3  # where does the object live (multi-writer, read-only)
    REMOVE = 4
    MOVED = 5  # notice from a releasing holder: the object went to extra[0]


class Status(enum.IntEnum):
    """``Reply.status``."""

    OK = 0
    NOT_FOUND = 1
    NOT_HERE = 2  # this node does not hold the object (any more): locate it again
    ERROR = 3  # value: [error class name, text]
    WRONG_KIND = 4


KIND_CODE = {ObjectKind.SINGLE: 0, ObjectKind.MULTI: 1}
KIND_OF = {0: ObjectKind.SINGLE, 1: ObjectKind.MULTI}


class KeyRecord:
    """What the key's authority knows about one key (about 100 bytes)."""

    __slots__ = ("busy", "exists", "kind", "owner", "queue", "releasing", "version")

    def __init__(self, kind: int, owner: str | None, version: int, exists: bool) -> None:
        self.kind = kind
        self.owner = owner  # the object owner, None when no object exists
        self.version = version  # bumped by every grant, move and remove
        self.exists = exists
        self.busy = False  # a release is in flight: queue requests until MOVED
        self.queue: deque[KeyOp] | None = None
        self.releasing: tuple[str, int] | None = None  # the (to, req_id) of that release

    def to_wire(self) -> list[Any]:
        return [self.kind, self.owner, self.version, self.exists, self.busy]


class Held:
    """An object this node holds, with what its local references need (about 90 bytes)."""

    __slots__ = ("info", "obj", "refs", "release", "removed", "seen", "version")

    def __init__(self, info: ClassInfo, obj: Any, version: int) -> None:
        self.info = info
        self.obj = obj
        self.version = version
        self.refs = 0  # local references in use (single-writer)
        self.release: Release | None = None  # someone else wants it: hand over at refs == 0
        self.removed = False
        self.seen: dict[str, int] | None = None  # multi-writer: last seq applied per sender

    @property
    def writable_here(self) -> bool:
        """A new local reference may be taken without asking anyone."""
        return self.release is None and not self.removed


@dataclass
class NodeStatistics:
    """Counters and gauges of one node (``Space.statistics()`` freezes a copy)."""

    key_records: int = 0
    objects_single: int = 0
    objects_multi: int = 0
    references_in_use: int = 0
    migrations_in: int = 0
    migrations_out: int = 0
    forwarded: int = 0
    location_cache_hits: int = 0
    stale_cache_hits: int = 0
    untethered_calls: int = 0
    untethered_batches: int = 0
    merges: int = 0
    remote_calls: int = 0
    messages_to_self: int = 0
    errors: dict[str, int] | None = None


class _Pending:
    """A request this node made and waits to hear about."""

    __slots__ = (
        "args",
        "asked",
        "at",
        "creators",
        "info",
        "k",
        "kind",
        "method",
        "tries",
        "waits",
    )

    def __init__(self, kind: str, k: K | None, info: ClassInfo | None) -> None:
        self.kind = kind
        self.k = k
        self.info = info
        self.waits: list[Wait[Any]] = []
        self.method = ""
        self.args: list[Any] = []
        self.tries = 0
        self.creators: list[Wait[Any]] | None = None  # acquire: the waits that asked to create
        self.asked = 0  # acquire: waits[:asked] were there when the request was sent
        self.at = 0.0  # call: the caller's clock when it was made (a stale read's age)


ClassResolver = Callable[[str], ClassInfo]

MAX_RELOCATE = 3  # a call chases a moving object at most this many times


class NodeState:
    """The key and object layers of one node.  See the module docstring."""

    def __init__(self, name: str, ring: HashRing) -> None:
        self.name = name
        self.view = NodeView(name, Stage.NORMAL, ring)
        self.maps: dict[str, ClassInfo] = {}
        self.records: dict[K, KeyRecord] = {}
        self.handed: set[K] = set()
        self._bare: set[K] = set()  # records adopted as bare authority during this event
        self.objects: dict[K, Held] = {}
        self.locations: dict[K, str] = {}
        self.stale_cache: dict[tuple[str, Any, str, tuple[Any, ...]], tuple[float, Any]] = {}
        self.replicas: dict[K, tuple[Any, str]] = {}  # multi-writer replica, its owner node
        self.outbox: dict[str, list[Message]] = {}
        self.urgent: set[str] = set()
        self.stats = NodeStatistics(errors={})
        self._pending: dict[int, _Pending] = {}
        self._acquiring: dict[K, _Pending] = {}
        self._early_release: dict[K, Release] = {}
        self._early_drop: dict[K, int] = {}  # a Drop that overtook the object's Transfer
        #: Calls, folds and fences for an object on its way here, in arrival order.
        self._parked: dict[K, list[tuple[Call | Fold | Fence, str]]] = {}
        self._seq: dict[K, int] = {}
        #: Where this node last sent a numbered message (call, untethered call, fold) of a
        #: multi-writer object.  If that node leaves the ring it forwards what it gets for
        #: the objects it evacuated, so calls sent elsewhere next could overtake those:
        #: a :class:`Fence` goes first (see :meth:`_needs_fence`).
        self._dest: dict[K, str] = {}
        #: Keys whose fence is out, with what waits for its answer, in call order.
        self._fencing: dict[K, list[Callable[[], None]]] = {}
        #: Objects evacuated to this node while its own fence for them was out: they are
        #: installed when it returns (calls for them wait, see :meth:`_expects`).
        self._arriving: dict[K, Held] = {}
        #: Nodes that left and said goodbye (:class:`Gone`): nothing more is sent to them.
        self.departed: set[str] = set()
        #: Fences waiting for a leaver's goodbye, by leaver (see ``Fence.after``).
        self._after_gone: dict[str, list[tuple[Fence, str]]] = {}
        self._next_id = 0
        self._unacked = 0  # hand-ons of this event not yet acknowledged
        #: The last exception a message handler raised (counted in statistics().errors).
        self.last_handler_error = ""
        self.moved_to: dict[K, str] = {}  # objects this (leaving) node evacuated, and where
        self.moved_version: dict[K, int] = {}  # and the version they arrived there with
        self.objects_evacuated = 0
        #: Finds an object class by ``"module:qualname"`` for objects handed to this node by
        #: a leaving one; the shell installs an importing resolver (no import in the core).
        self.resolve_class: Callable[[str], ClassInfo] | None = None
        self.records_handed_on = 0
        self._local: deque[Message] = deque()
        self._pumping = False
        self.untethered_since_flush: set[str] = set()
        self._untethered_dests: set[str] = set()
        #: Untethered calls not yet put in the outbox, by destination, in call order.
        self._untethered: dict[str, list[list[Any]]] = {}
        #: Test hook: when a list, every grant and release of a single-writer object is
        #: appended as ("grant" | "release", map, key, version, node).
        self.trace: list[tuple[str, str, Any, int, str]] | None = None

    # -- registration --

    def register_map(self, name: str, info: ClassInfo) -> None:
        """Declare that map ``name`` holds objects of ``info.cls`` on this node."""
        old = self.maps.get(name)
        if old is not None and old.cls is not info.cls:
            raise TypeError(f"map {name!r} already holds {old.name} objects, not {info.name}")
        self.maps[name] = info

    # -- sending --

    def _send(self, to: str, msg: Message, urgent: bool = True) -> None:
        if self.departed and to in self.departed:
            self._bounce(to, msg)
            return
        if self._untethered and to in self._untethered:
            self._flush_untethered(to)  # keep this sender's order: earlier calls go first
        if to == self.name:
            self.stats.messages_to_self += 1
            self._local.append(msg)
            return
        box = self.outbox.get(to)
        if box is None:
            self.outbox[to] = [msg]
        else:
            box.append(msg)
        if urgent:
            self.urgent.add(to)

    @property
    def has_output(self) -> bool:
        """Whether :meth:`take_outbox` would return anything."""
        return bool(self.outbox or self._untethered)

    def _flush_untethered(self, to: str) -> None:
        calls = self._untethered.pop(to)
        box = self.outbox.get(to)
        if box is None:
            self.outbox[to] = [Untethered(calls)]
        else:
            box.append(Untethered(calls))
        self._untethered_dests.add(to)

    def take_outbox(self) -> dict[str, list[Message]]:
        """Everything queued for other nodes, by destination; the shell sends each list as
        one frame.  Clears the outbox."""
        for to in list(self._untethered):
            self._flush_untethered(to)
        out, self.outbox = self.outbox, {}
        self.urgent.clear()
        self.stats.untethered_batches += len(self._untethered_dests)
        self._untethered_dests.clear()
        return out

    def _pump(self) -> None:
        """Handle the messages this node sent itself (iteratively, never recursively)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._local:
                self._dispatch(self._local.popleft(), self.name)
        finally:
            self._pumping = False

    def _new_pending(self, kind: str, k: K | None, info: ClassInfo | None) -> tuple[int, _Pending]:
        self._next_id += 1
        pending = _Pending(kind, k, info)
        self._pending[self._next_id] = pending
        return self._next_id, pending

    def _count_error(self, kind: str) -> None:
        errors = self.stats.errors
        assert errors is not None
        errors[kind] = errors.get(kind, 0) + 1

    # -- the key layer: routing --

    def _key_op(self, op: Op, k: K, kind: int, req_id: int, extra: Any = None) -> None:
        """Start a key-layer request at this node, as its origin."""
        epoch = self.view.epoch
        msg = KeyOp(int(op), k[0], k[1], kind, self.name, req_id, epoch, 0, 0, extra, epoch)
        self._route(msg)

    def _holding(self, k: K) -> Holding:
        if k in self.records:
            return Holding.RECORD
        if k in self.handed:
            return Holding.HANDED_ON
        return Holding.NONE

    def _route(self, msg: KeyOp, sender: str | None = None) -> None:
        k = (msg.map, msg.key)
        arrival = Arrival(_ARRIVALS[msg.arrival])
        request = Request(key_token(*k), msg.epoch, msg.hops, arrival, msg.since)
        decision = decide(self.view, self._holding(k), request)
        own_extra = msg.extra[2] if msg.arrival == 2 else msg.extra
        if isinstance(decision, Serve):
            if decision.adopt:
                self._adopt(k, msg.extra, msg.kind)
                if sender is not None and sender != self.name:
                    self._send(sender, HandOnAck(msg.map, msg.key, msg.epoch))
            if msg.arrival == 2:
                msg = dataclasses.replace(msg, arrival=0, extra=own_extra)
            self._serve_key(msg)
            return
        if isinstance(decision, Forward):
            self.stats.forwarded += 1
            arrival_code = 0
            extra = own_extra
            if decision.handoff:
                arrival_code = 2
                rec = self.records.pop(k, None)
                extra = [*_handoff_payload(rec, msg), own_extra]
                if self.view.stage is not Stage.NORMAL:
                    self.handed.add(k)
                    self._unacked += 1
                    self.records_handed_on += 1
            since = counted_since(self.view, request)
            self._relay(msg, decision.to, decision.epoch, decision.hops, arrival_code, extra, since)
            return
        if isinstance(decision, Pull):
            self.stats.forwarded += 1
            since = counted_since(self.view, request)
            self._relay(msg, decision.source, decision.epoch, decision.hops, 1, own_extra, since)
            return
        self._count_error("rejected-request")
        self._reply(msg.origin, msg.req_id, Status.ERROR, ["Rejected", decision.reason])

    def _relay(
        self, msg: KeyOp, to: str, epoch: int, hops: int, arrival: int, extra: Any, since: int
    ) -> None:
        """Send ``msg`` on to ``to`` with the routing version ``ring.ownership`` chose."""
        self._send(
            to,
            KeyOp(
                msg.op,
                msg.map,
                msg.key,
                msg.kind,
                msg.origin,
                msg.req_id,
                epoch,
                hops,
                arrival,
                extra,
                since,
            ),
        )

    def _adopt(self, k: K, payload: Any, kind: int = 0) -> None:
        """Install the authority that came with a hand-on (keeping our own record if any),
        with the requests that were queued behind a move in progress.  A bare authority
        becomes a bare record (version 0, no object): without it this node would not know
        it is the authority, and would pull ``k`` back from the previous owner, which
        forwards to this node again, until the request is rejected after MAX_HOPS."""
        record, queued = payload[:2] if payload else (None, [])
        if k in self.records:
            return
        if record is None:
            self.records[k] = KeyRecord(kind, None, 0, False)
            self._bare.add(k)
            return
        kind, owner, version, exists, busy = record
        rec = self.records[k] = KeyRecord(kind, owner, version, exists)
        rec.busy = busy
        if not version:
            self._bare.add(k)  # a bare record handed on as it was: forgotten at NORMAL too
        if queued:
            epoch = self.view.epoch
            rec.queue = deque(
                KeyOp(op, k[0], k[1], kind_, origin, req_id, epoch, 0, 0, extra, epoch)
                for op, kind_, origin, req_id, extra in queued
            )

    # -- the key layer: serving --

    def _serve_key(self, msg: KeyOp) -> None:
        k = (msg.map, msg.key)
        rec = self.records.get(k)
        op = msg.op
        if op == Op.MOVED:
            self._moved(k, rec, msg)
            return
        if rec is not None and rec.busy:
            if rec.queue is None:
                rec.queue = deque()
            rec.queue.append(msg)
            return
        if op == Op.REMOVE:
            if rec is None or not rec.exists:
                self._reply(msg.origin, msg.req_id, Status.OK, False)
                return
            # The holder may still be using the object through local references.  Until it
            # has dropped it, nothing else is served for this key and the remover waits:
            # otherwise a create could grant a second writable object while the old one is
            # still written, and a get at the holder could succeed after remove returned.
            # The holder answers a Barrier sent behind the Drop once it has applied the Drop.
            holder = rec.owner
            assert holder is not None
            rec.exists, rec.owner, rec.busy = False, None, True
            rec.version += 1
            self._send(holder, Drop(msg.map, msg.key, rec.version))
            req_id, pending = self._new_pending("dropped", k, None)
            pending.args = [rec.kind, rec.version, msg.origin, msg.req_id]
            self._send(holder, Barrier(req_id))
            return
        if rec is None or not rec.exists:
            if op != Op.CREATE:
                self._reply(msg.origin, msg.req_id, Status.NOT_FOUND)
                return
            version = (rec.version if rec is not None else 0) + 1
            if rec is None:
                if msg.origin == self.name:
                    k = self._request_key(k, msg.req_id)
                rec = self.records[k] = KeyRecord(msg.kind, msg.origin, version, True)
            else:
                rec.kind, rec.owner, rec.version, rec.exists = msg.kind, msg.origin, version, True
            if msg.kind == 0:
                self._send(msg.origin, Transfer(msg.map, msg.key, msg.req_id, version, None, True))
            else:
                self._reply(msg.origin, msg.req_id, Status.OK, [msg.origin, version, True])
            return
        if rec.kind != msg.kind:
            self._reply(msg.origin, msg.req_id, Status.WRONG_KIND, rec.kind)
            return
        if op == Op.LOCATE or rec.kind == 1:
            self._reply(msg.origin, msg.req_id, Status.OK, [rec.owner, rec.version, False])
            return
        # A writable single-writer reference for msg.origin.
        assert rec.owner is not None
        if rec.owner == msg.origin:
            self._send(msg.origin, Transfer(msg.map, msg.key, msg.req_id, rec.version, None, False))
            return
        rec.busy = True
        rec.releasing = (msg.origin, msg.req_id)
        self._send(rec.owner, Release(msg.map, msg.key, msg.origin, msg.req_id, rec.version))

    def _moved(self, k: K, rec: KeyRecord | None, msg: KeyOp) -> None:
        new_owner, version, *removal = msg.extra
        if rec is None:
            self._count_error("moved-without-record")
            return
        if removal == ["evacuated"]:
            # A leaving node handed the object to new_owner on its own initiative.  A release
            # we had sent it is void (it ignores it): ask the new holder instead, and stay
            # busy until that hand-over's own MOVED.
            rec.owner, rec.version = new_owner, version
            if not rec.exists:
                self._send(new_owner, Drop(msg.map, msg.key, version))
                rec.owner = None
            elif rec.busy and rec.releasing is not None:
                to, req_id = rec.releasing
                self._send(new_owner, Release(msg.map, msg.key, to, req_id, version))
            return
        rec.owner, rec.version, rec.busy = new_owner, version, False
        rec.releasing = None
        if removal:  # [None, version, origin, req_id]: the holder dropped a removed object
            origin, req_id = removal
            self._reply(origin, req_id, Status.OK, True)
        elif not rec.exists:  # removed while it moved: the new holder must drop it too
            self._send(new_owner, Drop(msg.map, msg.key, version))
            rec.owner = None
        queue = rec.queue
        rec.queue = None
        while queue:
            self._serve_key(queue.popleft())
            if rec.busy and queue:  # another move started: the rest waits behind it
                if rec.queue is None:
                    rec.queue = deque()
                rec.queue.extend(queue)
                return

    def _request_key(self, k: K, req_id: int) -> K:
        """``k`` as the tuple of our own request ``req_id``, when that request is about it.

        A key record made for this node's own create, and the object that create then
        puts here, share one key tuple: 56 bytes less per object on the key owner."""
        pending = self._pending.get(req_id)
        if pending is not None and pending.k == k:
            return pending.k
        return k

    def _reply(self, origin: str, req_id: int, status: Status, value: Any = None) -> None:
        self._send(origin, Reply(req_id, int(status), value))

    # -- the object layer: messages --

    def handle(self, msg: Message, sender: str) -> None:
        """One message from node ``sender`` (decoded and authenticated by the shell)."""
        self._dispatch(msg, sender)
        self._pump()

    def handle_batch(self, msgs: list[Message], sender: str) -> None:
        for msg in msgs:
            self._dispatch(msg, sender)
        self._pump()

    def _dispatch(self, msg: Message, sender: str) -> None:
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            self._count_error(f"unexpected-{type(msg).__name__}")
            return
        try:
            handler(self, msg, sender)
        except Exception as exc:  # a bug or a bad peer must not stop the node
            self._count_error(f"handler-{type(exc).__name__}")
            self.last_handler_error = f"{type(msg).__name__} from {sender}: {exc!r}"

    def _on_key_op(self, msg: KeyOp, sender: str) -> None:
        self._route(msg, sender)

    def _on_transfer(self, msg: Transfer, sender: str) -> None:
        k = (msg.map, msg.key)
        pending = self._pending.pop(msg.req_id, None)
        if pending is not None and pending.k == k:
            k = pending.k  # the tuple the key record may share (see _request_key)
        self._acquiring.pop(k, None)
        dropped = self._early_drop.pop(k, 0)
        if pending is None or pending.info is None:
            self._count_error("transfer-without-request")
            return
        if msg.state is None and not msg.created:
            held = self.objects.get(k)
            if held is None:
                for wait in pending.waits:
                    wait.fail(StoreError(f"{k!r}: key owner says we hold it, but we do not"))
                self._unpark(k)
                return
        else:
            info = pending.info
            obj = info.cls() if msg.created else load_state(info.cls, msg.state or b"\xa0")
            held = Held(info, obj, msg.version)
            if msg.version < dropped:
                # Removed on its way here (the Drop overtook this Transfer).  The grant came
                # first, so the waits it answers get their reference, to an object already
                # removed; those that joined since may come after the removal: ask again.
                held.removed = True
                self._ask_again(pending, pending.waits[pending.asked :])
                del pending.waits[pending.asked :]
            else:
                self.objects[k] = held
                if not msg.created:
                    self.stats.migrations_in += 1
                if self.trace is not None:
                    self.trace.append(("grant", msg.map, msg.key, msg.version, self.name))
        held.refs += len(pending.waits)
        early = self._early_release.pop(k, None)
        if early is not None and early.version == held.version and not held.removed:
            held.release = early
        maker = pending.creators[0] if msg.created and pending.creators else None
        for wait in pending.waits:  # only the first create made the object
            wait.resolve((held, wait is maker))
        self._unpark(k)

    def _on_release(self, msg: Release, sender: str) -> None:
        k = (msg.map, msg.key)
        held = self.objects.get(k)
        if held is None and k in self.moved_to:
            return  # we evacuated it; the key owner asks its new holder (see _moved)
        if held is None or held.version < msg.version:
            self._early_release[k] = msg  # the object is still on its way to us
            return
        held.release = msg
        if held.refs == 0:
            self._hand_over(k, held)

    def _hand_over(self, k: K, held: Held) -> None:
        release = held.release
        assert release is not None
        try:
            state = dump_state(held.obj)
        except TypeError as exc:
            # The object cannot travel: it stays here, the asker gets the reason, and the
            # key owner hears "moved to where it already is" so its queue goes on.
            held.release = None
            self._count_error("state-not-encodable")
            self._reply(release.to, release.req_id, Status.ERROR, ["TypeError", str(exc)])
            self._key_op(Op.MOVED, k, 0, 0, [self.name, held.version])
            return
        del self.objects[k]
        version = held.version + 1
        if self.trace is not None:
            self.trace.append(("release", k[0], k[1], held.version, self.name))
        self.stats.migrations_out += 1
        self._send(release.to, Transfer(k[0], k[1], release.req_id, version, state, False))
        self._key_op(Op.MOVED, k, 0, 0, [release.to, version])

    def _on_reply(self, msg: Reply, sender: str) -> None:
        pending = self._pending.pop(msg.req_id, None)
        if pending is None:
            self._count_error("reply-without-request")
            return
        _REPLY_HANDLERS[pending.kind](self, pending, msg)

    def _on_call(self, msg: Call, sender: str) -> None:
        k = (msg.map, msg.key)
        held = self.objects.get(k)
        if held is None or held.removed:
            if self._expects(k):
                self._parked.setdefault(k, []).append((msg, sender))
                return
            moved = self.moved_to.get(k)
            if msg.req_id:
                self._reply(sender, msg.req_id, Status.NOT_HERE, moved)
            elif moved is not None:  # evacuated: pass it on, once (seq 0: no dedup there)
                version = self.moved_version.get(k, 0)
                self._send(
                    moved, Call(msg.map, msg.key, msg.method, msg.args, 0, 0, version), False
                )
            else:
                self._count_error("untethered-call-lost")
            return
        if msg.version and msg.version != held.version:
            # Forwarded by a leaver for the incarnation it evacuated, which was removed
            # since: this one was made again after the call was made.
            self._count_error("untethered-call-lost")
            return
        minfo = held.info.methods.get(msg.method)
        if minfo is None or (
            held.info.kind is ObjectKind.SINGLE and minfo.kind is not MethodKind.STALE
        ):
            if msg.req_id:
                self._reply(sender, msg.req_id, Status.ERROR, ["NotCallable", msg.method])
            return
        if msg.seq and not self._fresh(held, sender, msg.seq):
            if msg.req_id:
                self._reply(sender, msg.req_id, Status.ERROR, ["Duplicate", "call applied already"])
            return
        self._fold_local_replica(k, held)
        try:
            value = getattr(held.obj, msg.method)(*msg.args)
        except Exception as exc:
            self._count_error(f"call-{type(exc).__name__}")
            if msg.req_id:
                self._reply(sender, msg.req_id, Status.ERROR, [type(exc).__name__, str(exc)])
            return
        if msg.req_id:
            self._reply(sender, msg.req_id, Status.OK, value)

    def _fresh(self, held: Held, sender: str, seq: int) -> bool:
        seen = held.seen
        if seen is None:
            seen = held.seen = {}
        if seq <= seen.get(sender, 0):
            return False
        seen[sender] = seq
        return True

    def _on_fold(self, msg: Fold, sender: str) -> None:
        k = (msg.map, msg.key)
        held = self.objects.get(k)
        if held is None or held.removed:
            if self._expects(k):
                self._parked.setdefault(k, []).append((msg, sender))
                return
            moved = self.moved_to.get(k)
            if moved is not None:
                version = self.moved_version.get(k, 0)
                self._send(moved, Fold(msg.map, msg.key, 0, msg.state, version), False)
                return
            self._count_error("fold-lost")
            return
        if msg.version and msg.version != held.version:
            self._count_error("fold-lost")  # for an incarnation removed since (as in _on_call)
            return
        if msg.seq and not self._fresh(held, sender, msg.seq):
            return
        held.obj.merge(load_state(held.info.cls, msg.state))
        self.stats.merges += 1

    def _expects(self, k: K) -> bool:
        """Whether an object for ``k`` may be on its way here: this node asked for it (a
        single-writer acquire) or asked where it is, maybe to create it (a multi-writer
        locate).  The key owner names a node as the object's owner as soon as it grants
        or creates it there, so a call or fold can reach that node before the object:
        it waits for the answer instead of being refused (or, untethered, lost).
        O(requests in flight), and only on that rare path."""
        if k in self._acquiring or k in self._arriving:
            return True
        return any(p.kind == "locate" and p.k == k for p in self._pending.values())

    def _unpark(self, k: K) -> None:
        """The request that an object for ``k`` may come with was answered: handle the calls
        and folds that waited for it, in the order they came."""
        parked = self._parked.pop(k, None)
        for msg, sender in parked or ():
            self._dispatch(msg, sender)

    def _on_drop(self, msg: Drop, sender: str) -> None:
        k = (msg.map, msg.key)
        held = self.objects.get(k)
        arriving = self._arriving.get(k)
        if held is None and arriving is not None and arriving.version <= msg.version:
            del self._arriving[k]
            arriving.removed = True
        elif held is not None and held.version <= msg.version:
            del self.objects[k]
            held.removed = True
        elif held is None and k in self._acquiring:
            # The object is on its way here from its previous holder, and this Drop from
            # the key owner overtook it: it is dropped when it lands (see _on_transfer).
            self._early_drop[k] = max(self._early_drop.get(k, 0), msg.version)
        elif held is None and k in self.moved_to:
            self._send(self.moved_to[k], msg)  # we evacuated it: the drop follows it
        self.locations.pop(k, None)
        self.replicas.pop(k, None)

    def _on_barrier(self, msg: Barrier, sender: str) -> None:
        self._reply(sender, msg.req_id, Status.OK)

    def _on_scan(self, msg: Scan, sender: str) -> None:
        entries = [
            [key, rec.owner]
            for (name, key), rec in self.records.items()
            if name == msg.map and rec.exists
        ]
        self._reply(sender, msg.req_id, Status.OK, entries)

    def _on_snapshot(self, msg: Snapshot, sender: str) -> None:
        out = []
        for key in msg.keys:
            held = self.objects.get((msg.map, key))
            try:
                out.append([key, None if held is None or held.removed else dump_state(held.obj)])
            except TypeError as exc:  # the asker gets the reason, not silence
                self._reply(sender, msg.req_id, Status.ERROR, ["StateNotEncodable", str(exc)])
                return
        self._reply(sender, msg.req_id, Status.OK, out)

    # -- replies to our requests --

    def _reply_acquire(self, pending: _Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None
        self._acquiring.pop(k, None)
        self._early_drop.pop(k, None)  # answered without an object: nothing on its way
        exc = self._error_of(pending, msg)
        answered = pending.waits
        if msg.status == Status.NOT_FOUND:
            # "Not found" was true when the key owner served the request; the waits that
            # joined it since (gets made later, creates) ask again.
            answered = pending.waits[: pending.asked]
            self._ask_again(pending, pending.waits[pending.asked :])
        for wait in answered:
            wait.fail(exc)
        self._unpark(k)

    def _ask(self, pending: _Pending, req_id: int) -> None:
        """Send the acquire ``pending`` for the waits it has now: a create if any of them
        asked to create.  Waits that join it later are answered too (see _reply_acquire)."""
        assert pending.k is not None
        pending.asked = len(pending.waits)
        self._acquiring[pending.k] = pending
        self._key_op(Op.CREATE if pending.creators else Op.ACQUIRE, pending.k, 0, req_id)

    def _ask_again(self, pending: _Pending, waits: list[Wait[Any]]) -> None:
        if not waits:
            return
        req_id, again = self._new_pending("acquire", pending.k, pending.info)
        again.waits = list(waits)
        makers = [w for w in waits if w in (pending.creators or ())]
        again.creators = makers or None
        self._ask(again, req_id)

    def _reply_locate(self, pending: _Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None and pending.info is not None
        if msg.status != Status.OK:
            for wait in pending.waits:
                wait.fail(self._error_of(pending, msg))
            self._unpark(k)
            return
        owner, version, created = msg.value
        if created and owner == self.name:
            self.objects[k] = Held(pending.info, pending.info.cls(), version)
        self.locations[k] = owner
        for wait in pending.waits:
            wait.resolve((owner, created))
        self._unpark(k)

    def _reply_call(self, pending: _Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None and pending.info is not None
        if msg.status == Status.NOT_HERE and pending.tries < MAX_RELOCATE:
            self.locations.pop(k, None)
            pending.tries += 1
            if isinstance(msg.value, str):  # the former holder says where it went
                self.locations[k] = msg.value
                pending.kind = "call"
                self._reship(pending, msg.value)
                return
            req_id = self._next_id = self._next_id + 1
            pending.kind = "relocate"
            self._pending[req_id] = pending
            self._key_op(Op.LOCATE, k, KIND_CODE[pending.info.kind], req_id)
            return
        if msg.status != Status.OK:
            for wait in pending.waits:
                wait.fail(self._error_of(pending, msg))
            return
        info = pending.info.methods.get(pending.method)
        if info is not None and info.kind is MethodKind.STALE:
            # The value is at least as fresh as the request: its age counts from then (not
            # from when the reply came, nor from the latest call, which could be later).
            cache_key = (k[0], k[1], pending.method, tuple(pending.args))
            self.stale_cache[cache_key] = (pending.at, msg.value)
        for wait in pending.waits:
            wait.resolve(msg.value)

    def _reply_relocate(self, pending: _Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None
        if msg.status != Status.OK:
            if not pending.waits:
                self._count_error("untethered-call-lost")
            for wait in pending.waits:
                wait.fail(self._error_of(pending, msg))
            return
        owner = msg.value[0]
        self.locations[k] = owner
        pending.kind = "call"
        self._reship(pending, owner)

    def _reply_dropped(self, pending: _Pending, msg: Reply) -> None:
        """The holder applied a removal's Drop (it answered the Barrier sent behind it): tell
        the key's authority, routed like a MOVED notice so that it finds the record even if
        the record was handed on meanwhile; the authority then answers the remover."""
        assert pending.k is not None
        kind, version, origin, req_id = pending.args
        self._key_op(Op.MOVED, pending.k, kind, 0, [None, version, origin, req_id])

    def _reply_plain(self, pending: _Pending, msg: Reply) -> None:
        if msg.status != Status.OK:
            for wait in pending.waits:
                wait.fail(self._error_of(pending, msg))
            return
        for wait in pending.waits:
            wait.resolve(msg.value)

    def _error_of(self, pending: _Pending, msg: Reply) -> StoreError:
        what = f"{pending.k[0]}[{pending.k[1]!r}]" if pending.k else "request"
        if msg.status in (Status.NOT_FOUND, Status.NOT_HERE):
            return ObjectNotFound(f"{what}: no such object")
        if msg.status == Status.WRONG_KIND:
            return WrongKind(f"{what} holds a {KIND_OF[msg.value].value} object")
        kind, text = msg.value if isinstance(msg.value, list) else ("Error", str(msg.value))
        if (kind == "TypeError" and pending.kind == "acquire") or kind == "StateNotEncodable":
            return StateNotEncodable(f"{what}: {text}")
        return RemoteCallError(f"{what}: {kind}: {text}")

    # -- the API's slow paths --

    now_hint: float | None = None  # the shell's clock at the last call (stale entries are
    # stamped with their own request's time, see _reply_call)

    def acquire(self, map_name: str, key: Any, create: bool) -> Wait[tuple[Held, bool]]:
        """A writable single-writer reference, when the fast path found none: ask the key
        owner.  Concurrent misses on one key make one request.  Resolves to
        ``(held, created)`` with ``held.refs`` already counting the caller."""
        k = (map_name, key)
        info = self.maps[map_name]
        wait: Wait[tuple[Held, bool]] = Wait(k)
        pending = self._acquiring.get(k)
        if pending is not None:  # join the request in flight
            pending.waits.append(wait)
            if create:
                if pending.creators is None:
                    pending.creators = []
                pending.creators.append(wait)
            return wait
        req_id, pending = self._new_pending("acquire", k, info)
        pending.waits.append(wait)
        if create:
            pending.creators = [wait]
        self._ask(pending, req_id)
        self._pump()
        return wait

    def locate(self, map_name: str, key: Any, create: bool) -> Wait[tuple[str, bool]]:
        """Where the object lives (creating a multi-writer object here if asked and absent).
        Resolves to ``(owner, created)``."""
        k = (map_name, key)
        info = self.maps[map_name]
        wait: Wait[tuple[str, bool]] = Wait(k)
        req_id, pending = self._new_pending("locate", k, info)
        pending.waits.append(wait)
        self._key_op(Op.CREATE if create else Op.LOCATE, k, KIND_CODE[info.kind], req_id)
        self._pump()
        return wait

    def remove(self, map_name: str, key: Any) -> Wait[bool]:
        """Remove the object; resolves to whether one existed."""
        k = (map_name, key)
        info = self.maps[map_name]
        wait: Wait[bool] = Wait(k)
        req_id, pending = self._new_pending("plain", k, info)
        pending.waits.append(wait)
        self._key_op(Op.REMOVE, k, KIND_CODE[info.kind], req_id)
        self._pump()
        return wait

    def release_ref(self, k: K, held: Held) -> None:
        """A local reference was let go; hand the object over if someone waits for it."""
        held.refs -= 1
        if held.refs == 0 and held.release is not None and not held.removed:
            self._hand_over(k, held)
            self._pump()

    def call(
        self, k: K, info: ClassInfo, method: str, args: tuple[Any, ...], owner: str, now: float
    ) -> Any:
        """A method call on an object held elsewhere (or a multi-writer one held here).

        Returns the value when it is available at once (local object, fresh stale cache,
        untethered update), else a :class:`Wait` for it.
        """
        minfo = info.methods[method]
        held = self.objects.get(k)
        if held is not None and info.kind is ObjectKind.MULTI:
            if held.removed:
                raise ObjectRemoved(f"{k[0]}[{k[1]!r}] was removed")
            if self._needs_fence(k, self.name):
                return self._call_later(k, info, method, args, owner, now)
            self._fold_local_replica(k, held)
            return getattr(held.obj, method)(*args)
        self.now_hint = now
        if minfo.kind is MethodKind.STALE:
            cached = self.stale_cache.get((k[0], k[1], method, args))
            if cached is not None and now - cached[0] <= minfo.max_age:
                self.stats.stale_cache_hits += 1
                return cached[1]
        if minfo.kind is MethodKind.UNTETHERED:
            if info.mergeable:
                self.stats.untethered_calls += 1  # (untethered() counts the others)
                replica = self.replicas.get(k)
                if replica is None or replica[1] != owner:
                    replica = self.replica_for(k, info, owner)
                getattr(replica[0], method)(*args)
                return None
            return self.untethered(k, method, args, owner)
        # A blocking call (or a stale read that missed): our replica's updates go first.
        replica = self.replicas.get(k)
        fold_to = owner if replica is None else replica[1]
        if self._needs_fence(k, owner) or self._needs_fence(k, fold_to):
            return self._call_later(k, info, method, args, owner, now)
        self._send_fold(k)
        req_id, pending = self._new_pending("call", k, info)
        pending.method, pending.args, pending.at = method, list(args), now
        wait: Wait[Any] = Wait(k)
        pending.waits.append(wait)
        self.stats.remote_calls += 1
        self._ship_call(pending, owner, req_id)
        self._pump()
        return wait

    def replica_for(self, k: K, info: ClassInfo, owner: str) -> tuple[Any, str]:
        """This node's replica of ``k`` for the object held at ``owner``, made if needed.

        A replica made for another place (the object was removed and made again there) is
        folded to that old place first: its updates belong there, the new ones here."""
        replica = self.replicas.get(k)
        if replica is not None and replica[1] != owner:
            self._send_fold(k)  # (it takes the replica out, even when the fold must wait)
            replica = None
        if replica is None:
            replica = self.replicas[k] = (info.cls(), owner)
        return replica

    def untethered(self, k: K, method: str, args: tuple[Any, ...], owner: str) -> None:
        """An untethered call of a multi-writer object held by ``owner``: queued, in order,
        for the next batch to it (sent by the flush timer, or ahead of any later message to
        it).  O(1); no message object per call."""
        self.stats.untethered_calls += 1
        if self._dest.get(k) != owner and self._needs_fence(k, owner):
            self._fence(k, owner, lambda: self._untethered_now(k, method, args, owner))
            return
        self._untethered_now(k, method, args, owner)

    def _untethered_now(self, k: K, method: str, args: tuple[Any, ...], owner: str) -> None:
        if self._needs_fence(k, owner):  # (a deferred call, still behind)
            self._fence(k, owner, lambda: self._untethered_now(k, method, args, owner))
            return
        if self.departed and owner in self.departed:  # a reference older than a goodbye
            self._relocate_untethered(k, method, list(args))
            self._pump()
            return
        held = self.objects.get(k) if owner == self.name else None
        if held is not None and not held.removed:
            # Held here by now (this call waited for a fence): apply it at once, as a local
            # call would be; a message to ourselves would come after calls made later.
            self._fold_local_replica(k, held)
            try:
                getattr(held.obj, method)(*args)
            except Exception as exc:
                self._count_error(f"call-{type(exc).__name__}")
            return
        seq = self._seq[k] = self._seq.get(k, 0) + 1
        self.untethered_since_flush.add(owner)
        if owner == self.name:
            self._send(owner, Call(k[0], k[1], method, list(args), 0, seq), urgent=False)
            self._pump()
            return
        self._dest[k] = owner
        calls = self._untethered.get(owner)
        if calls is None:
            calls = self._untethered[owner] = []
        calls.append([k[0], k[1], method, args, seq])

    def _on_untethered(self, msg: Untethered, sender: str) -> None:
        for entry in msg.calls:
            try:
                map_name, key, method, args, seq = entry
                call = Call(map_name, key_from_wire(key), method, list(args), 0, seq)
            except (StoreError, TypeError, ValueError):
                self._count_error("malformed-untethered-call")
                continue
            self._on_call(call, sender)

    def _ship_call(self, pending: _Pending, owner: str, req_id: int | None = None) -> None:
        k = pending.k
        assert k is not None
        if req_id is None:
            self._next_id += 1
            req_id = self._next_id
            self._pending[req_id] = pending
        seq = self._seq[k] = self._seq.get(k, 0) + 1
        info = pending.info
        if owner != self.name and info is not None and info.kind is ObjectKind.MULTI:
            self._dest[k] = owner
        self._send(owner, Call(k[0], k[1], pending.method, pending.args, req_id, seq))

    def _reship(self, pending: _Pending, owner: str) -> None:
        """Send a blocking call again, to where its object went (after a fence if the old
        place is leaving: the calls sent before it must not be overtaken)."""
        assert pending.k is not None
        if self._needs_fence(pending.k, owner):
            self._fence(pending.k, owner, lambda: self._reship(pending, owner))
            return
        self._ship_call(pending, owner)

    def _fold_local_replica(self, k: K, held: Held) -> None:
        replica = self.replicas.get(k)
        if replica is None:
            return
        owner = replica[1]
        view = self.view
        leaving = owner not in view.ring or (
            view.next_ring is not None and owner not in view.next_ring
        )
        if owner != self.name and not leaving:
            # Made for an object held elsewhere, since removed there and made again here:
            # its updates go to the old place, not into this (newer) object after calls
            # already applied to it.  (An owner that left evacuated the object to us.)
            self._send_fold(k)
            return
        del self.replicas[k]
        self._fold_out(k, replica[0], self.name)

    def _send_fold(self, k: K) -> None:
        replica = self.replicas.pop(k, None)
        if replica is not None:
            obj, owner = replica
            self._fold_out(k, obj, self.name if owner == self.name and k in self.objects else owner)

    def _fold_out(self, k: K, replica: Any, to: str) -> None:
        """Deliver the updates of a replica taken out of :attr:`replicas` to the object at
        ``to`` (this node: merged here), after a fence when one is needed."""
        if self._needs_fence(k, to):
            self._fence(k, to, lambda: self._fold_out(k, replica, to))
            return
        if to == self.name:
            held = self.objects.get(k)
            if held is not None and not held.removed:
                held.obj.merge(replica)
                self.stats.merges += 1
                return
        try:
            state = dump_state(replica)
        except TypeError:
            # The class's merge left something cbor cannot carry in the replica: the fault
            # is the NF's, the node keeps running, and the error count says what was lost.
            self._count_error("replica-not-encodable")
            return
        seq = self._seq[k] = self._seq.get(k, 0) + 1
        self.untethered_since_flush.add(to)
        if to != self.name:
            self._untethered_dests.add(to)
            self._dest[k] = to
        self._send(to, Fold(k[0], k[1], seq, state), urgent=False)

    # -- per-caller order across a scale-in --

    def _needs_fence(self, k: K, to: str) -> bool:
        """Whether a numbered message of multi-writer ``k`` for ``to`` (this node: applied
        here) must wait for a :class:`Fence`: one is out already, or the last one went to
        another node that is leaving or has left the ring.  Such a node forwards what it
        gets for the objects it evacuated, so a message sent straight to the new place
        could overtake the ones still on their way through it (a caller's calls would then
        apply out of order).  O(1); only scale-ins ever make it true."""
        if not (self._dest or self._fencing):
            return False  # no numbered message out at all: the common case
        if k in self._fencing:
            return True
        prev = self._dest.get(k)
        if prev is None or prev == to:
            return False
        view = self.view
        return prev not in (view.ring if view.next_ring is None else view.next_ring)

    def _fence(self, k: K, to: str, then: Callable[[], None]) -> None:
        """Run ``then`` (which sends to ``to``) once every numbered message of ``k`` sent so
        far has reached the object: send a fence where they went (unless one is out), and
        queue ``then``.  If that node has gone, the fence goes to ``to`` and waits there
        for the goodbye that followed everything the leaver forwarded."""
        waiting = self._fencing.get(k)
        if waiting is None:
            prev = self._dest.pop(k)
            req_id, _ = self._new_pending("fence", k, None)
            waiting = self._fencing[k] = []
            if prev in self.departed:
                self._send(to, Fence(req_id, self.name, k[0], k[1], prev))
            else:
                self._send(prev, Fence(req_id, self.name, k[0], k[1]))
        waiting.append(then)

    def _call_later(
        self, k: K, info: ClassInfo, method: str, args: tuple[Any, ...], owner: str, now: float
    ) -> Wait[Any] | None:
        """:meth:`call`, once the fence of ``k`` is back: a Wait for its value (None for an
        untethered call: its caller does not wait)."""
        wait: Wait[Any] | None = None
        if info.methods[method].kind is not MethodKind.UNTETHERED:
            wait = Wait(k)

        def again() -> None:
            try:
                result = self.call(k, info, method, args, owner, now)
            except Exception as exc:
                if wait is None:
                    self._count_error(f"call-{type(exc).__name__}")
                else:
                    wait.fail(exc)
                return
            if wait is not None:
                if isinstance(result, Wait):
                    result.add_done_callback(_passing_to(wait))
                else:
                    wait.resolve(result)

        to = self.name if k in self.objects and info.kind is ObjectKind.MULTI else owner
        self._fence(k, to, again)
        return wait

    def _on_fence(self, msg: Fence, sender: str) -> None:
        k = (msg.map, msg.key)
        if msg.after is not None and msg.after not in self.departed:
            self._after_gone.setdefault(msg.after, []).append((msg, sender))
        elif k in self.objects or k in self._arriving:
            self._reply(msg.origin, msg.req_id, Status.OK)
        elif self._expects(k):
            self._parked.setdefault(k, []).append((msg, sender))
        elif k in self.moved_to:
            self._send(self.moved_to[k], msg)  # behind what we forwarded there
        else:
            self._reply(msg.origin, msg.req_id, Status.OK)  # whatever came was applied

    def _reply_fence(self, pending: _Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None
        held = self._arriving.pop(k, None)
        if held is not None:
            self._install(k, held)
        waiting = self._fencing.pop(k, [])
        if not self._expects(k):
            self._unpark(k)  # calls that came for the arriving object, in their order
        for then in waiting:
            then()

    def _on_gone(self, msg: Gone, sender: str) -> None:
        self._reply(sender, msg.req_id, Status.OK)  # (the last message it gets from us)
        self.departed.add(sender)
        for fence, via in self._after_gone.pop(sender, ()):
            self._on_fence(fence, via)

    def farewell(self, nodes: list[str]) -> list[Wait[Any]]:
        """This node left the ring: say goodbye to ``nodes`` (after everything it has
        queued for them).  It may stop once every Wait is resolved: each of them has
        sent it nothing since, and it has handled (forwarded) all they had sent."""
        waits = []
        for node in nodes:
            req_id, pending = self._new_pending("plain", None, None)
            wait: Wait[Any] = Wait(("gone", node))
            pending.waits.append(wait)
            self._send(node, Gone(req_id))
            waits.append(wait)
        self._pump()
        return waits

    def undeliverable(self, to: str, msgs: list[Message]) -> None:
        """The shell could not send ``msgs`` to ``to``, a node that left: a fence among them
        is answered here (nothing more can come through that node), the rest is counted."""
        for msg in msgs:
            self._bounce(to, msg)
        self._pump()

    def _bounce(self, to: str, msg: Message) -> None:
        """``msg`` cannot reach ``to``, which left: answer it here if we can (the answers
        are handled like any message to ourselves), else count it."""
        if isinstance(msg, Fence) and msg.origin == self.name:
            self._local.append(Reply(msg.req_id, int(Status.OK), None))
        elif isinstance(msg, Call) and msg.req_id:
            # A blocking call through a reference taken before the node left: find the
            # object again (the caller waits a little longer, nothing is lost).
            self._local.append(Reply(msg.req_id, int(Status.NOT_HERE), None))
        elif isinstance(msg, Call):
            self._relocate_untethered((msg.map, msg.key), msg.method, msg.args)
        elif isinstance(msg, Untethered):
            for map_name, key, method, args, _ in msg.calls:
                self._relocate_untethered((map_name, key), method, list(args))
        elif isinstance(msg, HandOnAck | HandOnsAck):
            pass  # for a hand-on that a late request made the leaver forward: it counts nothing
        else:
            self._count_error(f"sent-to-departed-node-{type(msg).__name__}")

    def _relocate_untethered(self, k: K, method: str, args: list[Any]) -> None:
        """An untethered call that could not reach a departed node: ask the key owner where
        the object is now and ship it there (as a call whose answer nobody awaits)."""
        info = self.maps.get(k[0])
        if info is None:
            self._count_error("sent-to-departed-node")
            return
        req_id, pending = self._new_pending("relocate", k, info)
        pending.method, pending.args = method, args
        self._key_op(Op.LOCATE, k, KIND_CODE[info.kind], req_id)

    def fold_replicas(self) -> None:
        """Send every replica's updates to its owner (the merge interval, and ``flush``)."""
        for k in list(self.replicas):
            self._send_fold(k)
        self._pump()

    def barrier(self, node: str) -> Wait[Any]:
        """Resolves once ``node`` has applied everything we sent it before."""
        req_id, pending = self._new_pending("plain", None, None)
        wait: Wait[Any] = Wait(("barrier", node))
        pending.waits.append(wait)
        self._send(node, Barrier(req_id))
        self._pump()
        return wait

    def scan(self, node: str, map_name: str) -> Wait[list[list[Any]]]:
        """The existing keys of ``map_name`` whose records ``node`` holds, with owners."""
        req_id, pending = self._new_pending("plain", None, None)
        wait: Wait[list[list[Any]]] = Wait(("scan", node, map_name))
        pending.waits.append(wait)
        self._send(node, Scan(req_id, map_name))
        self._pump()
        return wait

    def snapshot(self, node: str, map_name: str, keys: list[Any]) -> Wait[list[list[Any]]]:
        """The states of ``keys`` that ``node`` holds (None where it does not)."""
        req_id, pending = self._new_pending("plain", None, None)
        wait: Wait[list[list[Any]]] = Wait(("snapshot", node, map_name))
        pending.waits.append(wait)
        self._send(node, Snapshot(req_id, map_name, keys))
        self._pump()
        return wait

    # -- scaling (paper §4.4; the rules are ring.ownership's) --

    def enter_stage(self, view: NodeView) -> None:
        """Adopt the controller's new stage.  Entering NORMAL ends an event (or its abort):
        the handed-on markers and bare records of the event are forgotten, and cached
        locations on nodes outside the ring are dropped."""
        if view.stage is Stage.NORMAL:
            self.handed.clear()
            # Only bare authority: a removed key's record keeps its version, so that a later
            # incarnation is granted higher versions than any Drop still in flight.  Only the
            # records adopted bare this event are looked at (walking every record here was a
            # stall of O(records) for every packet at the end of each event).
            for k in self._bare:
                rec = self.records.get(k)
                if rec is not None and not (rec.exists or rec.version or rec.busy or rec.queue):
                    del self.records[k]
            self._bare.clear()
            members = view.ring.nodes
            for k, where in list(self.locations.items()):
                if where not in members:
                    del self.locations[k]
            for k, (replica, owner) in list(self.replicas.items()):
                if owner not in members:  # evacuated to its key owner under the new ring
                    self.replicas[k] = (replica, view.ring.owner(key_token(*k)))
            self._drain_keys = None
        if self.departed:  # a name that joins again is a new process: talk to it
            self.departed -= view.ring.nodes | (view.next_ring.nodes if view.next_ring else set())
        if view.stage is Stage.SCALING and self.view.stage is not Stage.SCALING:
            self._unacked = 0
            self._drain_keys = None
        self.view = view

    _drain_keys: list[K] | None = None

    def drain(self, limit: int) -> int:
        """Hand on up to ``limit`` key records whose next owner is another node (the
        background drain of SCALING); returns how many.  Looks at no more than ``2 * limit``
        records per call: which records move is decided a few at a time, since hashing every
        key at once (about 4 µs each: 40 ms for 10,000 records) stalled every packet at the
        start of an event.  O(records) once per event for a copy of the key list."""
        view = self.view
        if view.stage is not Stage.SCALING:
            return 0
        if self._drain_keys is None:
            self._drain_keys = list(self.records)
        keys = self._drain_keys
        assert view.next_ring is not None
        epoch = view.next_ring.epoch
        moved = 0
        if self.name not in view.next_ring:
            moved = self._evacuate(limit)
        budget = 2 * max(limit, 1)
        batches: dict[str, list[Any]] = {}
        while keys and moved < limit and budget:
            budget -= 1
            k = keys.pop()
            rec = self.records.get(k)
            if rec is None:
                continue  # already moved on a request's first touch
            dest = drain_destination(view, key_token(*k))
            if dest is None:
                continue  # its next owner is this node: it stays
            del self.records[k]
            self.handed.add(k)
            self._unacked += 1
            self.records_handed_on += 1
            batch = batches.get(dest)
            if batch is None:
                batch = batches[dest] = []
            batch.append([k[0], k[1], _handoff_payload(rec, None)])
            moved += 1
        for dest, batch in batches.items():
            self._send(dest, HandOns(epoch, batch))
        self._pump()
        return moved

    @property
    def drain_scanning(self) -> bool:
        """Whether :meth:`drain` still has records to look at in this event (as opposed to
        waiting only for acknowledgements): the shell paces its calls while it has."""
        return self._drain_keys is None or bool(self._drain_keys)

    def drained(self) -> bool:
        """Every record this node had to hand on was handed on and acknowledged (and, on a
        leaving node, every object it held)."""
        view = self.view
        leaving = view.next_ring is not None and self.name not in view.next_ring
        return (
            view.stage is Stage.SCALING
            and self._unacked == 0
            and (self._drain_keys is not None and not self._drain_keys)
            and not (leaving and self.objects)
        )

    def _evacuate(self, limit: int) -> int:
        """Scale-in: send up to ``limit`` held objects, single- and multi-writer alike, to
        their next key owner (the original S6 lost multi-writer state here).  Objects still
        in use by a local reference wait for the next call."""
        view = self.view
        assert view.next_ring is not None
        sent = 0
        for k, held in list(self.objects.items()):
            if sent >= limit:
                break
            if held.refs or held.release is not None:
                continue
            dest = view.next_ring.owner(key_token(*k))
            self._fold_local_replica(k, held)
            state = dump_state(held.obj)
            cls = held.info.cls
            version = held.version + 1
            del self.objects[k]
            self.moved_to[k] = dest
            self.moved_version[k] = version
            self._unacked += 1
            self.objects_evacuated += 1
            self.stats.migrations_out += 1
            if self.trace is not None and held.info.kind is ObjectKind.SINGLE:
                self.trace.append(("release", k[0], k[1], held.version, self.name))
            self._send(
                dest, Evacuate(k[0], k[1], f"{cls.__module__}:{cls.__qualname__}", version, state)
            )
            kind = KIND_CODE[held.info.kind]
            self._key_op(Op.MOVED, k, kind, 0, [dest, version, "evacuated"])
            sent += 1
        return sent

    def _on_evacuate(self, msg: Evacuate, sender: str) -> None:
        k = (msg.map, msg.key)
        info = self.maps.get(msg.map)
        if info is None and self.resolve_class is not None:
            try:
                info = self.resolve_class(msg.cls)
            except Exception as exc:
                self._count_error(f"evacuate-unknown-class-{type(exc).__name__}")
                info = None
        if info is None:
            self._count_error("evacuate-unknown-class")
            return  # not acknowledged: the leaving node keeps waiting (and says so)
        held = Held(info, load_state(info.cls, msg.state), msg.version)
        if info.kind is ObjectKind.MULTI and (self._dest.get(k) == sender or k in self._fencing):
            # Our own calls of it may still be on their way through the leaving node: the
            # object is used here only once they have arrived (the fence comes back).
            self._arriving[k] = held
            self._fence(k, self.name, _nothing)
        else:
            self._install(k, held)
        self.stats.migrations_in += 1
        if self.trace is not None and info.kind is ObjectKind.SINGLE:
            self.trace.append(("grant", msg.map, msg.key, msg.version, self.name))
        self._send(sender, HandOnAck(msg.map, msg.key, self.view.epoch))

    def _install(self, k: K, held: Held) -> None:
        """Hold an object evacuated to this node.  Updates this node made into a replica
        while the object was elsewhere, and calls parked for it, are applied first: a
        local reference taken from now on calls the object directly, and its calls must
        come after them."""
        self.objects[k] = held
        if k in self.replicas:
            self._fold_local_replica(k, held)
        # Calls that came for it meanwhile go first, even if this node still waits for
        # something else about k (a locate): from now on local calls apply at once.
        self._unpark(k)

    def _on_hand_on(self, msg: HandOn, sender: str) -> None:
        k = (msg.map, msg.key)
        if msg.epoch != self.view.epoch:
            self._count_error("stale-hand-on")
        self._adopt(k, msg.record)
        self._send(sender, HandOnAck(msg.map, msg.key, msg.epoch))

    def _on_hand_on_ack(self, msg: HandOnAck, sender: str) -> None:
        if self._unacked > 0 and msg.epoch == self.view.epoch:
            self._unacked -= 1

    def _on_hand_ons(self, msg: HandOns, sender: str) -> None:
        if msg.epoch != self.view.epoch:
            self._count_error("stale-hand-on")
        count = 0
        for entry in msg.records:
            try:
                map_name, key, record = entry
                k = (map_name, key_from_wire(key))
            except (StoreError, TypeError, ValueError):
                self._count_error("malformed-hand-on")
                continue
            self._adopt(k, record)
            count += 1
        self._send(sender, HandOnsAck(msg.epoch, count))

    def _on_hand_ons_ack(self, msg: HandOnsAck, sender: str) -> None:
        if msg.epoch == self.view.epoch:
            self._unacked = max(0, self._unacked - msg.count)

    # -- observability --

    def statistics(self) -> NodeStatistics:
        s = self.stats
        single = sum(1 for h in self.objects.values() if h.info.kind is ObjectKind.SINGLE)
        return NodeStatistics(
            key_records=sum(1 for r in self.records.values() if r.exists),
            objects_single=single,
            objects_multi=len(self.objects) - single,
            references_in_use=sum(h.refs for h in self.objects.values()),
            migrations_in=s.migrations_in,
            migrations_out=s.migrations_out,
            forwarded=s.forwarded,
            location_cache_hits=s.location_cache_hits,
            stale_cache_hits=s.stale_cache_hits,
            untethered_calls=s.untethered_calls,
            untethered_batches=s.untethered_batches,
            merges=s.merges,
            remote_calls=s.remote_calls,
            messages_to_self=s.messages_to_self,
            errors=dict(s.errors or {}),
        )

    def validate(self) -> None:
        """Assert the node's invariants (tests call it)."""
        for k, held in self.objects.items():
            assert held.refs >= 0, k
            assert not held.removed, k
            if held.info.kind is ObjectKind.SINGLE:
                assert held.release is None or held.release.version == held.version, k
        for k, rec in self.records.items():
            assert rec.exists == (rec.owner is not None), k
            assert rec.queue is None or rec.busy or not rec.queue, k
        for k in self._parked:
            assert self._expects(k), k  # calls wait only for an object that may come
        for k in self._early_drop:
            assert k in self._acquiring, k


def _handoff_payload(rec: KeyRecord | None, msg: KeyOp | None) -> list[Any]:
    """What travels with a hand-on: the record (or None: bare authority) and its queue."""
    if rec is None:
        return [None, []]
    queue = list(rec.queue or ())
    return [rec.to_wire(), [[q.op, q.kind, q.origin, q.req_id, q.extra] for q in queue]]


_ARRIVALS = {0: Arrival.PLAIN.value, 1: Arrival.PULL.value, 2: Arrival.HANDOFF.value}

_HANDLERS: dict[type, Callable[[NodeState, Any, str], None]] = {
    KeyOp: NodeState._on_key_op,
    Transfer: NodeState._on_transfer,
    Release: NodeState._on_release,
    Reply: NodeState._on_reply,
    Call: NodeState._on_call,
    Fold: NodeState._on_fold,
    Drop: NodeState._on_drop,
    Barrier: NodeState._on_barrier,
    Scan: NodeState._on_scan,
    Snapshot: NodeState._on_snapshot,
    HandOn: NodeState._on_hand_on,
    HandOnAck: NodeState._on_hand_on_ack,
    HandOns: NodeState._on_hand_ons,
    HandOnsAck: NodeState._on_hand_ons_ack,
    Evacuate: NodeState._on_evacuate,
    Untethered: NodeState._on_untethered,
    Fence: NodeState._on_fence,
    Gone: NodeState._on_gone,
}

_REPLY_HANDLERS: dict[str, Callable[[NodeState, _Pending, Reply], None]] = {
    "acquire": NodeState._reply_acquire,
    "locate": NodeState._reply_locate,
    "call": NodeState._reply_call,
    "relocate": NodeState._reply_relocate,
    "plain": NodeState._reply_plain,
    "dropped": NodeState._reply_dropped,
    "fence": NodeState._reply_fence,
}


def _nothing() -> None:
    """What an object waiting in ``_arriving`` runs when its fence is back (installing it
    is :meth:`NodeState._reply_fence`'s own work)."""


def _passing_to(target: Wait[Any]) -> Callable[[Wait[Any]], None]:
    """A done-callback that settles ``target`` as its Wait was settled."""

    def done(wait: Wait[Any]) -> None:
        try:
            value = wait.result()
        except BaseException as exc:
            target.fail(exc)
            return
        target.resolve(value)

    return done
