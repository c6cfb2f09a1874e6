"""A simulated cluster of node cores (``store.core.router.Router``, driven through
:class:`tests.fixtures.core.CoreNode`): the key and object layers of several nodes, with no
trio and no sockets.

Every node shares one :class:`~ring.hashring.HashRing` and registers the same three maps
(``tests.fixtures.objects``):

* ``"sw"``: :class:`Counter`, a SingleWriter with ``add(n)`` and a ``@stale`` read;
* ``"mw"``: :class:`Shared`, a MultiWriter with a blocking ``add``, an ``@untethered``
  ``bump`` and a ``get``; no ``merge``, so untethered calls travel one by one;
* ``"mm"``: :class:`Merged`, the same with a ``merge``, so untethered calls from a node that
  does not hold the object go into a local replica that is folded into the owner's object.

Messages move the way the real network moves them: everything a node sends goes, in order,
onto one FIFO queue per ordered pair ``(src, dst)``, and the test decides which pair
delivers next.  Within a pair order is kept; across pairs anything goes.

Operations are driven the way ``store.api`` drives the core, written as generators that
yield the :class:`~store.core.scheduler.Wait` they need (as a microthread awaits it): the
harness steps a generator until it yields a Wait that is not settled, and steps it again,
outside any call into the core, once that Wait settles.  Every operation is recorded with
logical invoke and response times, so the SingleWriter history can be fed to
``tests.linearizability`` and the MultiWriter calls checked for order and exactly-once.

Object identity: see ``tests.fixtures.objects`` (a ``uid`` per incarnation, a ``log`` of the
calls a MultiWriter object applied).

:meth:`ObjectCluster.check` asserts the invariants after every step; :meth:`finish` closes
every reference, flushes every node, delivers everything and checks the end state.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from ring.hashring import HashRing, key_token
from ring.ownership import NodeView, Stage
from store.core.instructions import Locate
from store.core.key_layer import KeyState
from store.core.object_layer import SLOW, Held
from store.core.objects import info_of
from store.core.scheduler import Wait
from store.wire.codes import Arrival
from store.wire.errors import ObjectNotFound, ObjectRemoved, StoreError
from store.wire.messages import Drop, Evacuate, Evacuates, HandOns, KeyOp, Message, Transfer
from tests.fixtures.core import CoreNode
from tests.fixtures.objects import MAPS, MULTI_MAPS, Counter, Merged, Shared
from tests.linearizability import NOT_FOUND, Op, assert_linearizable, singlewriter_step

__all__ = ["MAPS", "MULTI_MAPS", "Counter", "Merged", "ObjectCluster", "Shared", "Violation"]

K = tuple[str, Any]
_LIVE = (int(KeyState.LIVE), int(KeyState.MOVING))


UPDATES = ("add", "bump")

Gen = Generator[Wait[Any], Any, None]


class Violation(AssertionError):
    """An invariant of the object space broke."""


@dataclass
class Operation:
    """One operation as its caller saw it.  Times are the harness's logical clock."""

    id: int
    node: str
    map: str
    key: Any
    name: str  # create, get, apply, remove, read, add, bump, call-get, open, flush
    arg: Any
    invoke: int
    response: int | None = None
    result: Any = None
    error: StoreError | None = None
    target: str | None = None  # MultiWriter call: the node the call was meant for
    target_uid: int | None = None  # ...and the uid of the object held there at issue time
    uid: int | None = None  # SingleWriter: the incarnation the operation saw
    started: float = 0.0  # the cluster's clock (seconds) when invoked, and when answered
    ended: float = 0.0


@dataclass
class SwRef:
    """A writable SingleWriter reference held by the harness (like an open ``async with``)."""

    node: str
    key: Any
    held: Held


@dataclass
class MwRef:
    """A MultiWriter reference: local (``held``) or remote (calls go to ``owner``)."""

    node: str
    map: str
    key: Any
    owner: str
    held: Held | None


#: Debugging aid: with S6_SIM_LOG set, every message handled is recorded here (cleared per
#: cluster) and the scaling machine appends the tail to a violation's text.
MESSAGE_LOG: list[str] | None = [] if os.environ.get("S6_SIM_LOG") else None


class SimNode(CoreNode):
    """A node's core that reports every Drop it applies, including the ones it sends itself
    (a key owner that also holds the object), which never cross a pair queue."""

    on_drop: Callable[[SimNode, Drop, Held | None], None] | None = None

    def __init__(self, name: str, ring: HashRing, trace: list[Any]) -> None:
        super().__init__(name, ring, MAPS, trace)
        takes = self.router._takes
        for kind, take in list(takes.items()):
            takes[kind] = self._watch(take)

    def _watch(self, take: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
        def watched(msg: Any, sender: str) -> None:
            if MESSAGE_LOG is not None:
                MESSAGE_LOG.append(f"{sender}->{self.name} [{self.view.stage.value}] {msg}")
            if not isinstance(msg, Drop) or self.on_drop is None:
                take(msg, sender)
                return
            before = self.objects.get((msg.map, msg.key))
            take(msg, sender)
            self.on_drop(self, msg, before)

        return watched


class ObjectCluster:
    """N node cores on one ring, pair-FIFO message queues, and the operations' records."""

    def __init__(self, names: Iterable[str], *, keys: int = 2, vnodes: int = 16) -> None:
        if MESSAGE_LOG is not None:
            MESSAGE_LOG.clear()
        self.ring = HashRing(names, vnodes=vnodes)
        self.keys = list(range(keys))
        #: One trace shared by every node, so grants and releases are in real-time order.
        self.trace: list[tuple[str, str, Any, int, str]] = []
        self.nodes: dict[str, SimNode] = {}
        for name in sorted(self.ring.nodes):
            self.add_node(name)
        self.queues: dict[tuple[str, str], deque[Message]] = {}
        self.clock = 0
        self.now = 0.0  # seconds, for @stale caches
        self.ops: list[Operation] = []
        self.sw_refs: list[SwRef] = []
        self.mw_refs: list[MwRef] = []
        #: ``Map.untethered``'s questions out, one per (node, key) at a time.
        self.unplaced: dict[tuple[str, K], Wait[Any]] = {}
        self.sw_expected: dict[int, int] = {}  # uid -> sum of the adds applied to it
        self.removes: set[K] = set()  # keys some remove was issued for
        self.drops_delivered: dict[tuple[str, K], int] = {}  # (node, k) -> highest version
        #: SingleWriter values over time, per key: (seconds, value or None once removed,
        #: the incarnation's uid).
        self.sw_timeline: dict[Any, list[tuple[float, int | None, int]]] = {}
        self._ready: deque[tuple[Operation, Gen, Wait[Any]]] = deque()
        self._settling = False
        self._traced = 0
        self._chain: dict[K, tuple[bool, int, str]] = {}  # k -> (granted?, version, node)
        #: The running scaling event (None between events), see :class:`Event`.
        self.event: Event | None = None
        self.highest_epoch = self.ring.epoch
        self.gone: set[str] = set()  # nodes that left the ring (kept alive for stragglers)
        self.farewells: dict[str, list[Wait[Any]]] = {}  # goodbyes said, and their answers
        self.exited: set[str] = set()  # nodes gone for good: messages to them are undeliverable

    def add_node(self, name: str) -> SimNode:
        """A node on the cluster's current ring, with the maps, trace and drop hook."""
        state = SimNode(name, self.ring, self.trace)
        state.on_drop = self._dropped
        self.nodes[name] = state
        return state

    @property
    def members(self) -> list[str]:
        """Nodes that may take new operations: the ring's, less a leaving node, plus joiners."""
        names = set(self.ring.nodes)
        event = self.event
        if event is not None:
            names -= set(event.removed)
            if not self.can_abort():  # a joiner takes operations once the event must finish
                names |= set(event.added)
        return sorted(names)

    # -- scaling events (the controller's barrier, ring.ownership's module docstring) --------

    def start_event(self, added: Iterable[str] = (), removed: Iterable[str] = ()) -> None:
        """Begin a scaling event: joiners start in PRE_SCALING (old ring, new ring)."""
        assert self.event is None
        self.highest_epoch += 1  # an aborted event's epoch is never reused
        next_ring = self.ring.with_nodes(added, removed, epoch=self.highest_epoch)
        participants = sorted(set(self.ring.nodes) | set(next_ring.nodes))
        self.event = Event(next_ring, sorted(added), sorted(removed), participants)
        for name in added:
            state = self.add_node(name)
            state.enter_stage(NodeView(name, Stage.PRE_SCALING, self.ring, next_ring))

    def stage(self, name: str) -> Stage:
        return self.nodes[name].view.stage

    def can_enter_pre(self, name: str) -> bool:
        """NORMAL on the old ring: a node that already reached NORMAL on the event's ring
        (others have not yet) never goes back."""
        event = self.event
        if event is None or self.stage(name) is not Stage.NORMAL:
            return False
        return self.nodes[name].view.epoch < event.next_ring.epoch

    def enter_pre(self, name: str) -> None:
        assert self.event is not None and self.can_enter_pre(name)
        self.nodes[name].enter_stage(
            NodeView(name, Stage.PRE_SCALING, self.ring, self.event.next_ring)
        )
        self.settle()

    def can_enter_scaling(self, name: str) -> bool:
        return (
            self.event is not None
            and self.stage(name) is Stage.PRE_SCALING
            and all(self.stage(n) is not Stage.NORMAL for n in self.event.participants)
        )

    def enter_scaling(self, name: str) -> None:
        assert self.event is not None and self.can_enter_scaling(name)
        self.nodes[name].enter_stage(NodeView(name, Stage.SCALING, self.ring, self.event.next_ring))
        self.settle()

    def drain(self, name: str, limit: int) -> int:
        moved = self.nodes[name].drain(limit)
        self.settle()
        return moved

    def can_enter_normal(self, name: str) -> bool:
        event = self.event
        if event is None or self.stage(name) is not Stage.SCALING:
            return False
        if not event.all_drained and all(self.nodes[n].drained() for n in event.participants):
            event.all_drained = True  # the controller latches it and releases everyone
        return event.all_drained

    def enter_normal(self, name: str) -> None:
        event = self.event
        assert event is not None and self.can_enter_normal(name)
        self.nodes[name].enter_stage(NodeView(name, Stage.NORMAL, event.next_ring))
        self.settle()
        if all(self.stage(n) is Stage.NORMAL for n in event.participants):
            self.ring = event.next_ring
            self.gone |= set(event.removed)
            self.event = None
            for node, state in self.nodes.items():  # an event's bare authority is forgotten
                bare = [
                    k
                    for k, rec in state.records.items()
                    if not (rec.exists or rec.version or rec.busy or rec.queue)
                ]
                if bare:
                    raise Violation(f"{node} keeps bare records {bare} after the event")

    def can_abort(self) -> bool:
        return self.event is not None and all(
            self.stage(n) is not Stage.SCALING for n in self.event.participants
        )

    def abort(self) -> None:
        """Every node back to NORMAL on the old ring; a joiner stays alive, outside it."""
        event = self.event
        assert event is not None and self.can_abort()
        for name in event.participants:
            state = self.nodes[name]
            if name in event.added:
                assert not state.records and not state.objects, f"joiner {name} got state"
                self.gone.add(name)
            state.enter_stage(NodeView(name, Stage.NORMAL, self.ring))
        self.event = None
        self.settle()

    def complete_event(self, rounds: int = 200) -> None:
        """Drive a running event to its end (every stage in turn, drain until drained)."""
        event = self.event
        if event is None:
            return
        for name in event.participants:
            if self.can_enter_pre(name):
                self.enter_pre(name)
        for name in event.participants:
            if self.can_enter_scaling(name):
                self.enter_scaling(name)
        for _ in range(rounds):
            for name in event.participants:
                self.drain(name, 1000)
            self.deliver_all()
            self.check()
            # (a node may be NORMAL on the new ring already: the drain was latched)
            if all(
                self.stage(n) is Stage.NORMAL or self.can_enter_normal(n)
                for n in event.participants
            ):
                break
        else:
            stuck = [n for n in event.participants if not self.nodes[n].drained()]
            raise Violation(f"the event never drained: {stuck} not drained")
        for name in event.participants:
            if self.stage(name) is not Stage.NORMAL:
                self.enter_normal(name)
                self.check()

    def check_gone(self) -> None:
        """A node that left holds no object, no live record and no reference."""
        for name in self.gone:
            state = self.nodes[name]
            if state.objects:
                raise Violation(f"{name} left the ring but holds {sorted(state.objects)}")
            live = [k for k, rec in state.records.items() if rec.exists]
            if live:
                raise Violation(f"{name} left the ring but keeps records {live}")
            if any(ref.node == name for ref in self.sw_refs):
                raise Violation(f"{name} left the ring with a reference open")

    # -- time and the network ---------------------------------------------------------------

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def authority(self, k: K) -> SimNode:
        return self.nodes[self.ring.owner(key_token(*k))]

    def record_exists(self, k: K) -> bool:
        """Whether ``k``'s one key record (held by a node or travelling in a hand-on) says
        an object exists; two live records at once is a violation."""
        live = [n for n, s in self.nodes.items() if (r := s.router.keys.record(k)) and r.exists]
        for dst, msg in self.in_flight():
            if isinstance(msg, HandOns):
                for map_name, key, record, _queued in msg.records:
                    if (map_name, key) == k and record is not None and record[3] in _LIVE:
                        live.append(f"->{dst}")
                continue
            if getattr(msg, "map", None) != k[0] or getattr(msg, "key", None) != k[1]:
                continue
            if isinstance(msg, KeyOp) and msg.arrival is Arrival.HANDOFF and msg.record:
                if msg.record[3] in _LIVE:
                    live.append(f"->{dst}")
        if len(live) > 1:
            raise Violation(f"{k}: live key records at {live} at once")
        return bool(live)

    def collect(self) -> None:
        """Move every node's outbox onto the pair queues; what is meant for a node that
        exited goes back to its sender as undeliverable (as the shell does)."""
        again = True
        while again:
            again = False
            for name, state in self.nodes.items():
                for dest, msgs in state.take_outbox().items():
                    assert dest != name, "a node queued a message to itself in its outbox"
                    if dest in self.exited:
                        state.undeliverable(dest, msgs)
                        again = True
                    else:
                        self.queues.setdefault((name, dest), deque()).extend(msgs)

    # -- a node that left says goodbye, then exits ---------------------------------------------

    def can_say_goodbye(self, name: str) -> bool:
        # (the shell's leave flushes first, and a flush waits for the answers to the
        # questions its untethered references asked: none is left out at the goodbye)
        asked = (w for (node, _), w in self.unplaced.items() if node == name)
        return (
            name in self.gone
            and name not in self.farewells
            and self.event is None
            and all(w.done() for w in asked)
        )

    def say_goodbye(self, name: str) -> None:
        """What a leaver's shell does once it has left: it says goodbye (``Farewell``)."""
        assert self.can_say_goodbye(name)
        others = sorted(set(self.ring.nodes) - {name})
        self.farewells[name] = self.nodes[name].farewell(others)
        self.settle()

    def can_exit(self, name: str) -> bool:
        waits = self.farewells.get(name)
        return name not in self.exited and waits is not None and all(w.done() for w in waits)

    def exit(self, name: str) -> None:
        """Every member answered the goodbye: nothing may be on its way to the node."""
        assert self.can_exit(name)
        late = [(src, msg) for (src, dst), q in self.queues.items() if dst == name for msg in q]
        if late:
            raise Violation(f"{name} exits after its goodbye, with messages on their way: {late}")
        self.exited.add(name)

    def busy_pairs(self) -> list[tuple[str, str]]:
        return sorted(pair for pair, q in self.queues.items() if q)

    def in_flight(self) -> Iterable[tuple[str, Message]]:
        """(destination, message) for every message not delivered yet."""
        for (_, dst), queue in self.queues.items():
            for msg in queue:
                if type(msg) is Evacuates:  # a batch: each object as its own Evacuate
                    for i, key, version, state in zip(
                        msg.of, msg.keys, msg.versions, msg.states, strict=True
                    ):
                        map_name, path, kind = msg.classes[i]
                        yield dst, Evacuate(map_name, key, path, version, state, kind)
                else:
                    yield dst, msg

    def deliver(self, pair: tuple[str, str]) -> None:
        src, dst = pair
        msg = self.queues[pair].popleft()
        self.nodes[dst].handle(msg, sender=src)
        self.settle()

    def _dropped(self, state: SimNode, msg: Drop, before: Held | None) -> None:
        """A node applied a Drop: remember it, and trace the object it let go (if any)."""
        k = (msg.map, msg.key)
        seen = self.drops_delivered.get((state.name, k), 0)
        self.drops_delivered[(state.name, k)] = max(seen, msg.version)
        if before is not None and msg.map == "sw" and k not in state.objects:
            self.trace.append(("drop", msg.map, msg.key, before.version, state.name))
            self.sw_timeline.setdefault(msg.key, []).append((self.now, None, before.obj.uid))

    def _check_read(self, op: Operation) -> None:
        """A @stale read returns a value the object had at some moment no more than
        ``max_age`` before the read began (or since)."""
        max_age = info_of(Counter).methods["read"].max_age
        timeline = self.sw_timeline.get(op.key, [])
        since = op.started - max_age
        for i, (start, value, _uid) in enumerate(timeline):
            end = timeline[i + 1][0] if i + 1 < len(timeline) else op.ended
            if value == op.result and end >= since and start <= op.ended:
                return
        raise Violation(
            f"read of sw[{op.key}] at {op.node} returned {op.result} at t={op.ended}, "
            f"which it held at no time since t={since}: {timeline}"
        )

    def deliver_all(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            pairs = self.busy_pairs()
            if not pairs:
                return
            self.deliver(pairs[0])
        raise Violation("messages kept flowing: the cluster never went quiet")

    # -- driving operations -------------------------------------------------------------------

    def _begin(self, node: str, map_name: str, key: Any, name: str, arg: Any = None) -> Operation:
        op = Operation(len(self.ops), node, map_name, key, name, arg, self.tick())
        op.started = self.now
        self.ops.append(op)
        return op

    def _done(self, op: Operation) -> None:
        op.response = self.tick()
        op.ended = self.now
        if op.name == "create" and op.result is True:
            # The object was 0 before any add: the adds of a get that joined the create's
            # request and finished first are already in the timeline, after which the
            # create's own answer comes, at the same moment.
            timeline = self.sw_timeline.setdefault(op.key, [])
            at = next((i for i, e in enumerate(timeline) if e[2] == op.uid), len(timeline))
            timeline.insert(at, (self.now, 0, op.uid))
        elif op.name == "read" and op.error is None:
            self._check_read(op)

    def _run(self, op: Operation, body: Callable[[Operation], Gen]) -> Operation:
        self._advance(op, body(op), None, None)
        if not self._settling:  # (an operation started by another one's continuation)
            self.settle()
        return op

    def _advance(self, op: Operation, gen: Gen, value: Any, exc: BaseException | None) -> None:
        while True:
            try:
                wait = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration:
                if op.response is None:
                    self._done(op)
                return
            except StoreError as err:
                op.error = err
                self._done(op)
                return
            finally:
                self.collect()
            if not wait.done():
                wait.add_done_callback(lambda w: self._ready.append((op, gen, w)))
                return
            value, exc = _outcome(wait)

    def settle(self) -> None:
        """Resume the operations whose Waits settled (never from inside a call into a core)."""
        self.collect()
        self._settling = True
        try:
            while self._ready:
                op, gen, wait = self._ready.popleft()
                value, exc = _outcome(wait)
                self._advance(op, gen, value, exc)
        finally:
            self._settling = False

    def pending_ops(self) -> list[Operation]:
        return [op for op in self.ops if op.response is None]

    # -- SingleWriter ---------------------------------------------------------------------------

    def sw_open(self, node: str, key: Any, create: bool, then_add: int | None = None) -> Operation:
        """``async with sw.create(key)`` / ``sw.get(key)``: take a writable reference.  With
        ``then_add``, a whole packet: once the reference is granted, ``add`` and leave."""
        op = self._begin(node, "sw", key, "create" if create else "get", 0 if create else None)

        def body(op: Operation) -> Gen:
            state = self.nodes[node]
            k = ("sw", key)
            held = state.take("sw", key)  # the API's local fast path
            if held is not None:
                created = False
            else:
                try:
                    held, created = yield state.acquire("sw", key, create)
                except ObjectNotFound:
                    if create:
                        raise Violation(f"create of {k} at {node} failed: not found") from None
                    op.result = NOT_FOUND
                    return
            assert held.refs > 0
            op.result = created if create else held.obj.value
            op.uid = held.obj.uid
            self.sw_refs.append(SwRef(node, key, held))
            if then_add is not None:
                self._done(op)
                self.sw_add(len(self.sw_refs) - 1, then_add)
                self._close(len(self.sw_refs) - 1)

        return self._run(op, body)

    def sw_add(self, index: int, n: int) -> Operation:
        """``await ref.add(n)`` through an open writable reference: always local."""
        ref = self.sw_refs[index]
        op = self._begin(ref.node, "sw", ref.key, "apply", n)
        held = ref.held
        op.uid = held.obj.uid
        if held.removed:  # the API raises ObjectRemoved
            op.result = NOT_FOUND
        else:
            op.result = held.obj.add(n)
            uid = held.obj.uid
            self.sw_expected[uid] = self.sw_expected.get(uid, 0) + n
            self.sw_timeline.setdefault(ref.key, []).append((self.now, op.result, uid))
        self._done(op)
        return op

    def sw_close(self, index: int) -> None:
        """Leave the ``async with``: what ``_Access.__aexit__`` does."""
        self._close(index)
        self.settle()

    def _close(self, index: int) -> None:
        ref = self.sw_refs.pop(index)
        held = ref.held
        if held.release is None or held.refs > 1:
            held.refs -= 1
        else:
            self.nodes[ref.node].release_ref(("sw", ref.key), held)
        self.collect()

    def sw_read(self, node: str, key: Any) -> Operation:
        """``sw.get(key, readonly=True)`` then the @stale ``read()``."""
        op = self._begin(node, "sw", key, "read")

        def body(op: Operation) -> Gen:
            state = self.nodes[node]
            k = ("sw", key)
            if k not in state.objects:
                owner = state.locations.get(k)
                if owner is None:
                    owner, _ = yield state.locate("sw", key, False)
            else:
                owner = node
            held = state.objects.get(k)
            if held is not None:
                op.result = held.obj.read()
                return
            info = state.maps["sw"]
            value = state.call(k, info, "read", (), owner, self.now)
            if isinstance(value, Wait):
                value = yield value
            op.result = value

        return self._run(op, body)

    # -- MultiWriter ----------------------------------------------------------------------------

    def mw_open(
        self,
        node: str,
        map_name: str,
        key: Any,
        create: bool,
        then_call: tuple[str, int] | None = None,
    ) -> Operation:
        """``async with m.create(key)`` / ``m.get(key)`` for a MultiWriter map.  With
        ``then_call`` (method, n), a whole packet: the call is made once the reference is."""
        op = self._begin(node, map_name, key, "open", create)

        def body(op: Operation) -> Gen:
            state = self.nodes[node]
            k = (map_name, key)
            owner = state.locations.get(k) if not create else None
            created = False
            if owner is None:
                owner, created = yield state.locate(map_name, key, create)
            op.result = created
            self.mw_refs.append(MwRef(node, map_name, key, owner, state.objects.get(k)))
            if then_call is not None:
                self._done(op)
                self.mw_call(len(self.mw_refs) - 1, *then_call)

        return self._run(op, body)

    def mw_call(self, index: int, method: str, n: int) -> Operation:
        """``await ref.add(...)`` / ``ref.bump(...)`` / ``ref.get()``."""
        ref = self.mw_refs[index]
        name = "call-get" if method == "get" else method
        op = self._begin(ref.node, ref.map, ref.key, name, n)
        state = self.nodes[ref.node]
        k = (ref.map, ref.key)
        where = ref.node if ref.held is not None or k in state.objects else ref.owner
        op.target = where
        there = self.nodes[where].objects.get(k)
        op.target_uid = there.obj.uid if there is not None else None
        args: tuple[Any, ...] = () if method == "get" else (ref.node, op.id, n)

        def body(op: Operation) -> Gen:
            held = ref.held
            owner = ref.owner
            if held is not None:  # a local reference: the API calls the method directly,
                if held.removed:  # unless this node's earlier updates must go first
                    raise ObjectRemoved(f"{k} was removed")
                if not held.owed or state.router.fast.in_order(k):
                    op.result = getattr(held.obj, method)(*args)
                    return
                owner = ref.node
            value = state.call(k, state.maps[ref.map], method, args, owner, self.now)
            if isinstance(value, Wait):
                value = yield value
            op.result = value

        return self._run(op, body)

    def mw_untethered(self, node: str, key: Any, n: int) -> Operation:
        """``async with m.untethered(key) as r: await r.bump(n)`` on the merged map, as
        ``Map.untethered`` makes it: never waiting.  Where the object's place is not known
        here (not held, not in the location cache, not made here at once) the key owner is
        asked without waiting (one question per key at a time) and the bump goes into this
        node's replica, folded to wherever the answer says."""
        map_name = "mm"
        op = self._begin(node, map_name, key, "bump", n)
        state = self.nodes[node]
        k = (map_name, key)
        info = state.maps[map_name]
        fast = state.router.fast
        owner = node if k in state.objects else fast.located(k)
        if owner is None and fast.create_here(k, info, ()) is not None:
            owner = node
        if owner is None:
            asked = self.unplaced.get((node, k))
            if asked is None or asked.done():  # (not urgent, as the API asks it)
                wait: Wait[Any] = Wait(k)
                state.run(Locate(k, True, wait, (), urgent=False))
                self.unplaced[(node, k)] = wait
        op.target = owner
        there = self.nodes[owner].objects.get(k) if owner is not None else None
        op.target_uid = there.obj.uid if there is not None else None
        args = (node, op.id, n)
        bump = info.cls.bump

        def body(op: Operation) -> Gen:
            if fast.update_replica(k, info, bump, args, owner) is SLOW:  # held here
                value = state.call(k, info, "bump", args, node, self.now)
                if isinstance(value, Wait):
                    yield value
            op.result = None
            return
            yield  # (a generator, like the other operations' bodies)

        return self._run(op, body)

    # -- both -------------------------------------------------------------------------------------

    def remove(self, node: str, map_name: str, key: Any) -> Operation:
        op = self._begin(node, map_name, key, "remove")
        self.removes.add((map_name, key))

        def body(op: Operation) -> Gen:
            op.result = yield self.nodes[node].remove(map_name, key)

        return self._run(op, body)

    def flush(self, node: str) -> Operation:
        """``Space.flush()``: fold replicas, then a barrier to every untethered destination."""
        op = self._begin(node, "", None, "flush")

        def body(op: Operation) -> Gen:
            state = self.nodes[node]
            dests = state.flush_targets()
            waits = [state.barrier(dest) for dest in dests]
            yield from waits

        return self._run(op, body)

    # -- invariants, after every step --------------------------------------------------------------

    def check(self) -> None:
        for state in self.nodes.values():
            state.validate()
        self._check_errors()
        self._check_trace()
        for key in self.keys:
            self._check_single_writer(("sw", key))
            for map_name in MULTI_MAPS:
                self._check_multi_writer((map_name, key))

    def _check_errors(self) -> None:
        # A call or fold that reaches a node that does not hold the object, and expects no
        # object, is dropped and counted.  With lazy location caches this is how updates made
        # through a location learned before a remove end (see the report); nothing else may
        # be counted as an error.
        allowed = set()
        if any(k[0] in MULTI_MAPS for k in self.removes):
            allowed = {"untethered-call-lost", "fold-lost"}
        for name, state in self.nodes.items():
            errors = set(state.statistics().errors or {})
            if not errors <= allowed:
                raise Violation(f"{name} counted errors {sorted(errors - allowed)}")

    def _check_trace(self) -> None:
        """Grants and releases (and drops) of each key form one chain: grant v at n, then
        release or drop of v at n, then a grant of a higher version, and so on."""
        for event, map_name, key, version, node in self.trace[self._traced :]:
            k = (map_name, key)
            last = self._chain.get(k)
            if event == "grant":
                if last is not None and last[0]:
                    raise Violation(f"{k}: grant of v{version} at {node} while {last} holds")
                if last is not None and version <= last[1]:
                    raise Violation(f"{k}: grant of v{version} after v{last[1]}")
                self._chain[k] = (True, version, node)
            else:
                if last is None or not last[0] or (last[1], last[2]) != (version, node):
                    raise Violation(f"{k}: {event} of v{version} at {node}, chain is at {last}")
                self._chain[k] = (False, version, node)
        self._traced = len(self.trace)

    def _check_single_writer(self, k: K) -> None:
        holders = [(n, s.objects[k]) for n, s in self.nodes.items() if k in s.objects]
        # Writers: nodes whose object counts a reference, and the nodes of the references
        # the harness holds open (an object handed over under an open reference is no
        # longer held there, but its reference can still write to it).
        writers = sorted({n for n, held in holders if held.refs > 0} | self._open_writers(k))
        if len(writers) > 1:
            raise Violation(f"{k}: writable references on {writers} at once")
        for n, held in holders:
            if self.drops_delivered.get((n, k), 0) > held.version:
                raise Violation(f"{k}: {n} holds v{held.version} after its Drop was delivered")
        copies = [(n, held.version) for n, held in holders]
        drops: list[tuple[str, int]] = []
        for dst, msg in self.in_flight():
            if getattr(msg, "map", None) != k[0] or getattr(msg, "key", None) != k[1]:
                continue
            if isinstance(msg, Transfer) and (msg.state is not None or msg.created):
                copies.append((dst, msg.version))
            elif isinstance(msg, Evacuate):
                copies.append((dst, msg.version))
            elif isinstance(msg, Drop):
                drops.append((dst, msg.version))
                # A node that evacuated the object forwards the Drop after it (moved_to),
                # so it lands after the copy and drops it (held.version <= drop.version).
                chased = self.nodes[dst].router.objects.moved_to.get(k)
                if chased is not None and k not in self.nodes[dst].objects:
                    drops.append((chased, msg.version + 1))
        live = [
            (n, v)
            for n, v in copies
            if self.drops_delivered.get((n, k), 0) <= v  # not doomed on arrival
            and not any(d == n and dv > v for d, dv in drops)  # not being dropped
        ]
        expected = 1 if self.record_exists(k) else 0
        if len(live) != expected:
            raise Violation(f"{k}: live copies {live} (held or in flight), expected {expected}")

    def _open_writers(self, k: K) -> set[str]:
        """The nodes where the harness holds a writable reference to ``k`` open.  Such a
        reference must be on the object its node holds (or on a removed one, which the
        API refuses to write: ObjectRemoved); anything else is a second writer."""
        nodes = set()
        for ref in self.sw_refs:
            if ("sw", ref.key) != k or ref.held.removed:
                continue
            if self.nodes[ref.node].objects.get(k) is not ref.held:
                where = [n for n, s in self.nodes.items() if k in s.objects]
                raise Violation(
                    f"{k}: a reference is open at {ref.node} on v{ref.held.version}, which "
                    f"{ref.node} no longer holds (held by {where}): two writers"
                )
            nodes.add(ref.node)
        return nodes

    def _check_multi_writer(self, k: K) -> None:
        holders = [(n, s.objects[k]) for n, s in self.nodes.items() if k in s.objects]
        evacuating = [dst for dst, msg in self.in_flight() if _about(msg, k, Evacuate)]
        if len(holders) + len(evacuating) > 1:
            raise Violation(f"{k}: held by {[n for n, _ in holders]}, evacuating to {evacuating}")
        for n, held in holders:
            if self.drops_delivered.get((n, k), 0) > held.version:
                raise Violation(f"{k}: {n} holds v{held.version} after its Drop was delivered")
            self._check_log(k, held.obj.log)

    def _check_log(self, k: K, log: list[list[Any]]) -> None:
        """No call applied twice, none from another key, each caller's calls in its order."""
        ids = [op_id for _, op_id in log]
        if len(ids) != len(set(ids)):
            raise Violation(f"{k}: a call was applied twice: {ids}")
        ops = [self.ops[i] for i in ids]
        for op in ops:
            if (op.map, op.key) != k or op.name not in UPDATES:
                raise Violation(f"{k}: applied a call made on {(op.map, op.key)}: {op}")
        for later_pos, later in enumerate(ops):
            for earlier in ops[later_pos + 1 :]:
                if earlier.node == later.node and _must_precede(earlier, later):
                    raise Violation(
                        f"{k}: {later.node}'s call #{earlier.id} applied after #{later.id}"
                    )

    # -- the end --------------------------------------------------------------------------------

    def quiesce(self) -> None:
        """Flush every node and deliver everything, again while a packet answered meanwhile
        made a new replica; then every update made so far has been applied."""
        for _ in range(100):
            for name in sorted(self.nodes):
                self.flush(name)
            self.deliver_all()
            self.check()
            if not any(s.replicas for s in self.nodes.values()):
                return
        raise Violation("replicas kept coming back")

    def finish(self) -> None:
        """Close every reference, flush every node, deliver everything, and check the end."""
        while True:  # references granted while draining are closed in turn
            while self.sw_refs:
                self.sw_close(len(self.sw_refs) - 1)
                self.check()
            self.quiesce()
            if not self.sw_refs:
                break
        unanswered = self.pending_ops()
        if unanswered:
            raise Violation(f"operations never answered: {unanswered}")
        for name, state in self.nodes.items():
            assert not state.replicas, f"{name} kept replicas after flush"
            objects = state.router.objects
            assert not objects._pending, f"{name} still waits for {objects._pending}"
            assert not objects._acquiring, name
            assert all(h.refs == 0 for h in state.objects.values()), name
        self.check_values()
        assert_linearizable(self.sw_history(incarnations=True), incarnation_step)
        assert_linearizable(self.sw_history(incarnations=False), singlewriter_step)

    def check_values(self) -> None:
        """Every update counted exactly once: SingleWriter objects hold the sum of the adds
        applied to them; MultiWriter objects applied each call the rules require, once."""
        for key in self.keys:
            k = ("sw", key)
            for state in self.nodes.values():
                held = state.objects.get(k)
                if held is not None:
                    want = self.sw_expected.get(held.obj.uid, 0)
                    assert held.obj.value == want, f"{k}: value {held.obj.value}, model {want}"
            for map_name in MULTI_MAPS:
                self._check_multi_final((map_name, key))

    def _check_multi_final(self, k: K) -> None:
        holders = [(n, s.objects[k]) for n, s in self.nodes.items() if k in s.objects]
        calls = [op for op in self.ops if (op.map, op.key) == k and op.name in UPDATES]
        if self.record_exists(k) and not holders and not self.busy_pairs():
            raise Violation(f"{k}: its record says it exists, but no node holds it")
        if not holders:
            return
        ((owner, held),) = holders
        obj = held.obj
        applied = {op_id for _, op_id in obj.log}
        assert obj.value == sum(self.ops[i].arg for i in applied), f"{k}: value and log differ"
        for op in calls:
            if op.error is not None and op.id in applied:
                raise Violation(f"{k}: #{op.id} failed ({op.error!r}) but was applied")
            if op.error is not None or op.id in applied:
                continue
            # Never removed: a single incarnation, every accepted call must be in it.  Removed:
            # calls meant for the node that held this very incarnation when they were made.
            required = k not in self.removes or (op.target == owner and op.target_uid == obj.uid)
            if required:
                raise Violation(f"{k}: call #{op.id} ({op}) was never applied to {owner}")

    def sw_history(self, *, incarnations: bool) -> list[Op]:
        """The SingleWriter operations, for the linearizability checker.

        With ``incarnations``, for :func:`incarnation_step`: creates and applies name the
        object (uid) they reached and gets return ``(uid, value)``.  Without, for the
        stock ``singlewriter_step``, which knows a key but not its incarnations: an apply
        through a reference whose object was removed (it raised ObjectRemoved, and changed
        nothing) is left out, since that model would apply it to a later incarnation."""
        out = []
        for op in self.ops:
            if op.map != "sw" or op.name not in ("create", "get", "apply", "remove"):
                continue
            arg, result = op.arg, op.result
            if op.error is not None:
                result = NOT_FOUND if isinstance(op.error, ObjectNotFound) else repr(op.error)
            if incarnations:
                if op.name in ("create", "apply"):
                    arg = (op.uid, op.arg)
                elif op.name == "get" and result is not NOT_FOUND:
                    result = (op.uid, result)
            elif op.name == "apply" and result is NOT_FOUND:
                continue
            out.append(
                Op(
                    process=f"{op.node}#{op.id}",
                    name=op.name,
                    arg=arg,
                    result=result,
                    invoke=op.invoke,
                    response=op.response,
                    key=op.key,
                )
            )
        return out


def incarnation_step(state: Any, op: Op) -> tuple[Any, Any]:
    """Sequential model of one SingleWriter key that tells incarnations apart.

    The state is ``(uid, value)`` of the current object, or NOT_FOUND.  ``create((uid, 0))``
    makes object ``uid`` if absent (True), else must have reached the current object (False);
    ``get()`` returns ``(uid, value)``; ``apply((uid, n))`` adds ``n`` if ``uid`` is the
    current object, else it changes nothing and returns NOT_FOUND (a reference kept across
    a remove raises ObjectRemoved, even once a new object exists); ``remove()`` as usual."""
    name = op.name
    if name == "get":
        return state, state
    if name == "remove":
        return NOT_FOUND, state is not NOT_FOUND
    uid, n = op.arg
    if name == "create":
        if state is NOT_FOUND:
            return (uid, n), True
        return state, False if state[0] == uid else ("reached", uid, "current", state[0])
    if name == "apply":
        if state is NOT_FOUND or state[0] != uid:
            return state, NOT_FOUND
        return (uid, state[1] + n), state[1] + n
    raise ValueError(f"incarnation_step: unknown operation {name!r}")


def _must_precede(earlier: Operation, later: Operation) -> bool:
    """Whether a node's call ``earlier`` must be applied before its call ``later``: untethered
    calls in the order made, and before any later call; a blocking call before any call made
    after it returned."""
    if earlier.invoke >= later.invoke:
        return False
    if earlier.name == "bump":
        return True
    return earlier.response is not None and earlier.response < later.invoke


@dataclass
class Event:
    """A running scaling event, as the controller sees it."""

    next_ring: HashRing
    added: list[str]
    removed: list[str]
    participants: list[str]
    all_drained: bool = False


def _about(msg: Message, k: K, kind: type) -> bool:
    return isinstance(msg, kind) and (getattr(msg, "map", None), getattr(msg, "key", None)) == k


def _outcome(wait: Wait[Any]) -> tuple[Any, BaseException | None]:
    try:
        return wait.result(), None
    except StoreError as exc:
        return None, exc
