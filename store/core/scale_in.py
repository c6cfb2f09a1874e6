"""The object layer's part in a scale-in (paper §4.4): per-caller order, goodbyes, evacuation.

A node leaving the ring hands every object it holds to the object's next key owner
(:meth:`ScaleIn.evacuate`), in bulk: one :class:`Evacuates` batch per receiver and drain
step, installed whole by the receiver, which tells the key owner and answers once per batch
(:meth:`ScaleIn._on_evacuates`); then the leaver keeps forwarding what still reaches it for
them.  Three rules keep that boundary exact:

* **Fences keep a caller's calls in order.**  A node remembers where it last sent numbered
  messages (calls, untethered calls, folds) of a multi-writer object.  When its next one
  would go elsewhere while that place is leaving or has left, a :class:`Fence` goes there
  first; the leaver passes it on behind what it forwarded, the holder answers, and only
  then do the waiting calls go out (kept as data, :data:`~store.core.held.Deferred`).
* **A leaver says goodbye** (:class:`Gone`) before it stops: a member answers after
  everything it sent the leaver and sends it nothing afterwards; a fence that can no longer
  go through the leaver waits at the new place for that goodbye.
* **Forwarded calls carry the incarnation's version**, so that the holder of a newer
  incarnation (removed and made again meanwhile) drops them.

:class:`ScaleIn` is part of :class:`~store.core.object_layer.ObjectLayer` (a base class, so
that each module stays small enough to read alone); it owns the state listed in its
``__init__`` and uses the layer's request and call machinery declared below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from ring.hashring import key_token
from ring.ownership import NodeView, Stage
from store.core.held import KIND_CODE, Deferred, Held, K, Pending
from store.core.objects import ClassInfo, ObjectKind, dump_state, load_state, opaque_info
from store.core.outbox import Outbox
from store.wire.codes import Arrival, Kind, MovedNote, Op, Status
from store.wire.errors import MalformedMessage
from store.wire.messages import (
    Barrier,
    Call,
    Drop,
    Evacuate,
    EvacuateAck,
    Evacuates,
    EvacuatesAck,
    Fence,
    Fold,
    Gone,
    KeyOp,
    Message,
    Reply,
    Untethered,
)

if TYPE_CHECKING:
    from store.core.instructions import Invoke

__all__ = ["EVACUATE_BYTES", "ScaleIn"]

#: Largest :class:`Evacuates` batch, in bytes of states and keys: a drain step's objects
#: for one receiver go as several batches past it (or past the frame limit, if smaller),
#: so that frames stay moderate (the transport packs up to 256 KiB in one) and no receiver
#: spends long on one message.  An object larger than that alone goes in a batch of its own.
EVACUATE_BYTES: Final = 256 * 1024

#: Bytes an entry (or a class) of a batch may take beyond its state, key and names: the
#: array and string headers, the class index and the version.
_ENTRY_ROOM: Final = 32


def _key_bound(key: Any) -> int:
    """An upper bound of a key's encoded size (keys were checked where they were made:
    ``store.core.objects.check_key``); O(1) for flat keys."""
    kind = type(key)
    if kind is str:
        return 9 + 4 * len(key)
    if kind is bytes:
        return 9 + len(key)
    if kind is tuple:
        return 9 + sum(_key_bound(part) for part in key)
    return 9 + 129  # an int of up to 1024 bits, a float, a bool or None


class _Batch:
    """The objects of one drain step for one receiver, being put together (the columns
    of an :class:`Evacuates`)."""

    __slots__ = ("classes", "index", "keys", "of", "states", "used", "versions")

    def __init__(self) -> None:
        self.classes: list[tuple[str, str, Kind]] = []
        self.index: dict[tuple[str, type], int] = {}  # (map, class) -> index in classes
        self.of: list[int] = []
        self.keys: list[Any] = []
        self.versions: list[int] = []
        self.states: list[bytes] = []
        self.used = 0  # bytes, an upper bound of the encoded batch


class ScaleIn:
    """Fences, goodbyes and evacuation, for :class:`~store.core.object_layer.ObjectLayer`."""

    if TYPE_CHECKING:  # what the object layer provides
        name: str
        view: NodeView
        out: Outbox
        maps: dict[str, ClassInfo]
        objects: dict[K, Held]
        locations: dict[K, str]
        replicas: dict[K, tuple[Any, str | None]]
        _parked: dict[K, list[tuple[Call | Fold | Fence, str]]]
        migrations_in: int
        migrations_out: int
        resolve_class: Any
        _flush_awaited: set[str] | None
        _report_todo: list[K] | None
        trace: list[tuple[str, str, Any, int, str]] | None

        def _new_pending(
            self, kind: str, k: K | None, info: ClassInfo | None
        ) -> tuple[int, Pending]: ...
        def _reply(self, origin: str, req_id: int, status: Status, value: Any = None) -> None: ...
        def _key_op(
            self,
            op: Op,
            k: K,
            kind: Kind,
            req_id: int,
            *,
            owner: str | None = None,
            version: int = 0,
            note: MovedNote = MovedNote.HANDED_OVER,
            origin: str | None = None,
        ) -> None: ...
        def _expects(self, k: K) -> bool: ...
        def _unpark(self, k: K) -> None: ...
        def _fold_local_replica(self, k: K, held: Held) -> None: ...
        def _owes(self, k: K) -> bool: ...
        def _mark_owed(self, k: K) -> None: ...
        def _fold_out(self, k: K, replica: Any, to: str) -> None: ...
        def _reship(self, pending: Pending, owner: str) -> None: ...
        def _untethered_now(self, k: K, method: str, args: tuple[Any, ...], owner: str) -> None: ...
        def _confirm_drop(self, msg: Drop) -> None: ...
        def _report_arrival(self, k: K, held: Held) -> None: ...
        def report_step(self, limit: int) -> int: ...
        def invoke(self, stim: Invoke, now: float) -> None: ...

    def __init__(self) -> None:
        #: Where this node last sent a numbered message (call, untethered call, fold) of a
        #: multi-writer object (see :meth:`_needs_fence`).
        self._dest: dict[K, str] = {}
        #: Keys whose fence is out, with what waits for its answer, in call order.
        self._fencing: dict[K, list[Deferred]] = {}
        #: Objects evacuated to this node while its own fence for them was out: they are
        #: installed when it returns (calls for them wait, see ``_expects``).
        self._arriving: dict[K, Held] = {}
        #: Fences waiting for a leaver's goodbye, by leaver (see ``Fence.after``).
        self._after_gone: dict[str, list[tuple[Fence, str]]] = {}
        self.moved_to: dict[K, str] = {}  # objects this (leaving) node evacuated, and where
        self.moved_version: dict[K, int] = {}  # and the version they arrived there with
        #: Evacuation batches of this event not yet acknowledged: number -> objects in it.
        self._batches: dict[int, int] = {}
        self._next_batch = 0
        #: A leaving node's keys still to hand over in this event, and those in use.
        self._evac_todo: list[K] = []
        self._evac_busy: list[K] = []
        #: Objects of this event whose state cannot travel (counted once, tried each round).
        self._evac_refused: set[K] = set()
        self.objects_evacuated = 0
        #: Untethered calls relocated because their node had left, not yet answered, and
        #: this node's own barriers to such nodes, answered once none is left (see bounce).
        self._relocating = 0
        self._barriers_after: list[int] = []

    # -- per-caller order across a scale-in --

    def _needs_fence(self, k: K, to: str) -> bool:
        """Whether a numbered message of multi-writer ``k`` for ``to`` (this node: applied
        here) must wait for a :class:`Fence`: one is out already, or the last one went to
        another node that is leaving or has left the ring.  O(1); only scale-ins ever make
        it true."""
        if not (self._dest or self._fencing):
            return False  # no numbered message out at all: the common case
        if k in self._fencing:
            return True
        prev = self._dest.get(k)
        if prev is None or prev == to:
            return False
        view = self.view
        return prev not in (view.ring if view.next_ring is None else view.next_ring)

    def _fence(self, k: K, to: str, then: Deferred) -> None:
        """Do ``then`` (which sends to ``to``) once every numbered message of ``k`` sent so
        far has reached the object: send a fence where they went (unless one is out), and
        queue ``then``.  If that node has gone, the fence goes to ``to`` and waits there
        for the goodbye that followed everything the leaver forwarded."""
        waiting = self._fencing.get(k)
        if waiting is None:
            prev = self._dest.pop(k)
            req_id, _ = self._new_pending("fence", k, None)
            waiting = self._fencing[k] = []
            self._mark_owed(k)
            if prev in self.out.departed:
                self.out.send(to, Fence(req_id, self.name, k[0], k[1], prev))
            else:
                self.out.send(prev, Fence(req_id, self.name, k[0], k[1]))
        waiting.append(then)

    def _run_deferred(self, then: Deferred) -> None:
        what = then[0]
        if what == "invoke":
            self.invoke(then[1], then[2])
        elif what == "untethered":
            self._untethered_now(then[1], then[2], then[3], then[4])
        elif what == "reship":
            self._reship(then[1], then[2])
        elif what == "fold":
            self._fold_out(then[1], then[2], then[3])
        # "arrived": installing the object is _reply_fence's own work

    def _on_fence(self, msg: Fence, sender: str) -> None:
        k = (msg.map, msg.key)
        if msg.after is not None and msg.after not in self.out.departed:
            self._after_gone.setdefault(msg.after, []).append((msg, sender))
        elif k in self.objects or k in self._arriving:
            self._reply(msg.origin, msg.req_id, Status.OK)
        elif self._expects(k):
            self._parked.setdefault(k, []).append((msg, sender))
        elif k in self.moved_to:
            self.out.send(self.moved_to[k], msg)  # behind what we forwarded there
        else:
            self._reply(msg.origin, msg.req_id, Status.OK)  # whatever came was applied

    def _reply_fence(self, pending: Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None
        held = self._arriving.pop(k, None)
        if held is not None:
            self._install(k, held)
        waiting = self._fencing.pop(k, [])
        if not self._expects(k):
            self._unpark(k)  # calls that came for the arriving object, in their order
        for then in waiting:
            self._run_deferred(then)

    def _on_gone(self, msg: Gone, sender: str) -> None:
        self._reply(sender, msg.req_id, Status.OK)  # (the last message it gets from us)
        self.out.departed.add(sender)
        for fence, via in self._after_gone.pop(sender, ()):
            self._on_fence(fence, via)

    def bounce(self, to: str, msg: Message) -> None:
        """``msg`` cannot reach ``to``, which left: answer it here if we can (the answers
        are handled like any message to ourselves), else count it."""
        if isinstance(msg, Fence) and msg.origin == self.name:
            self.out.send(self.name, Reply(msg.req_id, Status.OK, None))
        elif isinstance(msg, Barrier):
            # A flush waits for that node: what it took before it left, it handed on
            # before its goodbye; what it could not take was relocated (below), and the
            # barrier is answered once each of those calls was.
            if self._relocating:
                self._barriers_after.append(msg.req_id)
            else:
                self.out.send(self.name, Reply(msg.req_id, Status.OK, None))
        elif isinstance(msg, Call) and msg.req_id:
            # A blocking call through a reference taken before the node left: find the
            # object again (the caller waits a little longer, nothing is lost).
            self.out.send(self.name, Reply(msg.req_id, Status.NOT_HERE, None))
        elif isinstance(msg, Call):
            self._relocate_untethered((msg.map, msg.key), msg.method, msg.args)
        elif isinstance(msg, Untethered):
            for map_name, key, method, args, _ in msg.calls:
                self._relocate_untethered((map_name, key), method, list(args))
        elif isinstance(msg, Fold):
            self._relocate_fold(to, msg)
        elif isinstance(msg, Drop) and msg.origin is not None:
            self._confirm_drop(msg)  # nothing left there to drop: the remover may go on
        elif type(msg).__name__ in ("HandOnAck", "HandOnsAck", "EvacuateAck", "EvacuatesAck"):
            pass  # for a hand-on that a late request made the leaver forward: it counts nothing
        else:
            self.out.error(f"sent-to-departed-node-{type(msg).__name__}", to)

    def _relocate_fold(self, to: str, msg: Fold) -> None:
        """A replica's fold that could not reach a departed node (the object's holder
        left, or died): ask the key owner where the object is now and fold it there (the
        merged updates are not lost; if the object died with its holder, this node's next
        flush says so).  A flush's barrier waits for it, as for a relocated call."""
        k = (msg.map, msg.key)
        info = self.maps.get(k[0])
        if info is None:
            self.out.error("sent-to-departed-node-Fold", f"{to}: {k!r:.80}: unknown map")
            return
        try:
            replica = load_state(info.cls, msg.state)
        except MalformedMessage as exc:  # (our own encoding: a bug if it fails)
            self.out.error("fold-lost", f"{k!r:.80}: {exc}")
            return
        req_id, pending = self._new_pending("refold", k, info)
        pending.args = [replica]
        pending.relocated = True
        self._relocating += 1
        self._key_op(Op.LOCATE, k, KIND_CODE[info.kind], req_id)

    def _relocate_untethered(self, k: K, method: str, args: list[Any]) -> None:
        """An untethered call that could not reach a departed node: ask the key owner where
        the object is now and ship it there (as a call whose answer nobody awaits)."""
        info = self.maps.get(k[0])
        if info is None:
            self.out.error("sent-to-departed-node", f"{k!r:.80}: unknown map")
            return
        req_id, pending = self._new_pending("relocate", k, info)
        pending.method, pending.args = method, args
        pending.relocated = True
        self._relocating += 1
        self._key_op(Op.LOCATE, k, KIND_CODE[info.kind], req_id)

    def _relocated(self, pending: Pending) -> None:
        """A relocated untethered call was answered (applied, failed or lost): the
        barriers that waited for the last of them are answered."""
        if not pending.relocated:
            return
        pending.relocated = False
        self._relocating -= 1
        if self._relocating == 0 and self._barriers_after:
            for req_id in self._barriers_after:
                self.out.send(self.name, Reply(req_id, Status.OK, None))
            self._barriers_after = []

    # -- scaling --

    def enter_stage(self, view: NodeView) -> None:
        """Adopt the controller's new stage: entering NORMAL drops cached locations on
        nodes outside the ring and retargets replicas of objects evacuated from them."""
        if view.stage is Stage.NORMAL:
            members = view.ring.nodes
            for k, where in list(self.locations.items()):
                if where not in members:
                    del self.locations[k]
            for k, (replica, owner) in list(self.replicas.items()):
                if owner is not None and owner not in members:  # evacuated to its key owner
                    self.replicas[k] = (replica, view.ring.owner(key_token(*k)))
        departed = self.out.departed
        if departed:  # a name that joins again is a new process: talk to it
            departed -= view.ring.nodes | (view.next_ring.nodes if view.next_ring else set())
        if view.stage is Stage.SCALING and self.view.stage is not Stage.SCALING:
            self._batches.clear()
        if view.stage is not self.view.stage:
            self._evac_todo, self._evac_busy = [], []
            self._evac_refused = set()
        self.view = view

    @property
    def leaving(self) -> bool:
        view = self.view
        return view.next_ring is not None and self.name not in view.next_ring

    def evacuated(self) -> bool:
        """A leaving node has handed every object over, and each was acknowledged."""
        return not self.leaving or (not self.objects and not self._batches)

    def evacuate(self, limit: int) -> int:
        """Scale-in: send up to ``limit`` held objects, single- and multi-writer alike, to
        their next key owner (the original S6 lost multi-writer state here), in one
        :class:`Evacuates` batch per receiver (several if one would pass
        :data:`EVACUATE_BYTES` or the frame limit).  Objects still in use by a local
        reference wait for the next call; an object whose state cannot travel (not cbor,
        or over the frame limit alone) stays here, counted.  The receiver tells the key
        owner where each object went (the router hands key records on before objects, so
        that it usually holds them by then)."""
        view = self.view
        if self._report_todo is not None:  # a failure repair's report: the same pace
            return self.report_step(limit)
        if view.stage is not Stage.SCALING or not self.leaving:
            return 0
        assert view.next_ring is not None
        next_ring = view.next_ring
        # The keys to hand over, listed once per event (a copy of every key on each step
        # made a leave quadratic in the objects held); objects in use wait in `busy` for
        # another round, and objects that arrived since are picked up when both are empty.
        todo = self._evac_todo
        if not todo:
            todo = self._evac_todo = self._evac_busy or list(self.objects)
            self._evac_busy = []
        objects, busy, replicas = self.objects, self._evac_busy, self.replicas
        moved_to, moved_version = self.moved_to, self.moved_version
        max_payload = self.out.max_payload
        budget_bytes = min(EVACUATE_BYTES, max_payload)
        trace = self.trace
        batches: dict[str, _Batch] = {}
        sent = 0
        budget = 2 * max(limit, 1)
        while todo and sent < limit and budget:
            budget -= 1
            k = todo.pop()
            held = objects.get(k)
            if held is None:
                continue  # moved away or dropped meanwhile
            if held.refs or held.release is not None:
                busy.append(k)
                continue
            if k in replicas:
                self._fold_local_replica(k, held)
            try:
                state = dump_state(held.obj)
                if len(state) > max_payload:
                    raise TypeError(
                        f"{held.info.cls.__qualname__} state is {len(state)} bytes, over the "
                        f"{max_payload} a frame holds"
                    )
            except TypeError as exc:
                if k not in self._evac_refused:
                    self._evac_refused.add(k)
                    self.out.error("state-not-encodable", f"cannot evacuate {k!r:.80}: {exc}")
                busy.append(k)
                continue
            map_name, key = k
            dest = next_ring.owner(key_token(map_name, key))
            version = held.version + 1
            del objects[k]
            moved_to[k] = dest
            moved_version[k] = version
            info = held.info
            if trace is not None and info.kind is ObjectKind.SINGLE:
                trace.append(("release", map_name, key, held.version, self.name))
            size = len(state) + _key_bound(key) + _ENTRY_ROOM
            batch = batches.get(dest)
            if batch is None:
                batch = batches[dest] = _Batch()
            elif batch.used + size > budget_bytes:
                self._send_batch(dest, batch)  # full: this object starts the next one
                batch = batches[dest] = _Batch()
            index = batch.index.get((map_name, info.cls))
            if index is None:
                index = batch.index[(map_name, info.cls)] = len(batch.classes)
                path = f"{info.cls.__module__}:{info.cls.__qualname__}"
                batch.classes.append((map_name, path, KIND_CODE[info.kind]))
                batch.used += len(path) + 4 * len(map_name) + _ENTRY_ROOM
            batch.of.append(index)
            batch.keys.append(key)
            batch.versions.append(version)
            batch.states.append(state)
            batch.used += size
            sent += 1
        for dest, batch in batches.items():
            self._send_batch(dest, batch)
        self.objects_evacuated += sent
        self.migrations_out += sent
        return sent

    def _send_batch(self, dest: str, batch: _Batch) -> None:
        self._next_batch += 1
        self._batches[self._next_batch] = len(batch.keys)
        msg = Evacuates(
            self.view.epoch,
            self._next_batch,
            batch.classes,
            batch.of,
            batch.keys,
            batch.versions,
            batch.states,
        )
        self.out.send(dest, msg)

    def _class_for(self, map_name: str, path: str, kind: Kind, count: int) -> ClassInfo:
        """The class of ``count`` objects of ``map_name`` evacuated to this node: the map's
        own, the one the shell imports, or else an opaque stand-in (logged once)."""
        info = self.maps.get(map_name)
        why = "no class resolver"
        if info is None and self.resolve_class is not None:
            try:
                info = self.resolve_class(path)
            except Exception as exc:
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
        if info is None:
            # Held as its plain state, never refused: a leave must not wedge on a class
            # this node lacks.  A call on it here fails and says why; a member that has
            # the class gets it intact when it asks for it.
            what = "1 object" if count == 1 else f"{count} objects"
            self.out.error(
                "evacuate-unknown-class",
                f"{path} ({why}): {what} of map {map_name!r:.80} held as their state; "
                "calls on them fail here",
            )
            info = opaque_info(path, ObjectKind.MULTI if kind is Kind.MULTI else ObjectKind.SINGLE)
        return info

    def _on_evacuate(self, msg: Evacuate, sender: str) -> None:
        """One object evacuated alone, its key owner told by the sender (a leaver sent
        these before batches; :meth:`evacuate` no longer does)."""
        info = self._class_for(msg.map, msg.cls, msg.kind, 1)
        k = (msg.map, msg.key)
        self._arrived(k, Held(info, load_state(info.cls, msg.state), msg.version), sender)
        self.out.send(sender, EvacuateAck(msg.map, msg.key, self.view.epoch))

    def _on_evacuates(self, msg: Evacuates, sender: str) -> None:
        """Install a batch of evacuated objects in one go: the columns are checked and
        every state loaded first, so that a malformed batch is refused whole (counted by
        the router; no acknowledgement) and never half installed.  Each object's key owner
        is told where it is now (see below)."""
        classes, of, keys = msg.classes, msg.of, msg.keys
        count = len(keys)
        if not len(of) == len(msg.versions) == len(msg.states) == count:
            raise MalformedMessage("columns of different lengths")
        counts = [0] * len(classes)
        try:
            for index in of:
                if index < 0:
                    raise IndexError
                counts[index] += 1
        except IndexError:
            raise MalformedMessage(f"a class index out of the {len(classes)} listed") from None
        infos = [
            self._class_for(map_name, path, kind, n) if n else None
            for (map_name, path, kind), n in zip(classes, counts, strict=True)
        ]
        cls_of: list[Any] = [None if info is None else info.cls for info in infos]
        objs = [
            load_state(cls_of[index], state) for index, state in zip(of, msg.states, strict=True)
        ]
        # Installed, and each key owner told: a message to our own key layer, which
        # usually holds the record by now (the leaver hands its records on before its
        # objects), so no notice crosses the wire.
        me, epoch = self.name, self.view.epoch
        send = self.out.send
        for index, key, version, obj in zip(of, keys, msg.versions, objs, strict=True):
            info = infos[index]
            assert info is not None
            map_name = classes[index][0]
            k = (map_name, key)
            held = Held(info, obj, version)
            self._arrived(k, held, sender)
            kind = KIND_CODE[info.kind]
            notice = KeyOp(
                Op.MOVED, map_name, key, kind, me, 0, epoch, 0, Arrival.PLAIN, epoch, me, version,
                MovedNote.EVACUATED,
            )  # fmt: skip
            send(me, notice)
        self.out.send(sender, EvacuatesAck(msg.epoch, msg.batch, count))

    def _arrived(self, k: K, held: Held, sender: str) -> None:
        """An evacuated object reached this node, its next key owner: hold it."""
        kind = held.info.kind
        if kind is ObjectKind.MULTI and (self._dest.get(k) == sender or k in self._fencing):
            # Our own calls of it may still be on their way through the leaving node: the
            # object is used here only once they have arrived (the fence comes back).
            self._arriving[k] = held
            self._fence(k, self.name, ("arrived",))
        else:
            self._install(k, held)
        if self._flush_awaited is not None:
            self._report_arrival(k, held)
        self.migrations_in += 1
        if self.trace is not None and kind is ObjectKind.SINGLE:
            self.trace.append(("grant", k[0], k[1], held.version, self.name))

    def _on_evacuate_ack(self, msg: EvacuateAck, sender: str) -> None:
        pass  # a single evacuation's (this node sends batches only): nothing to count

    def _on_evacuates_ack(self, msg: EvacuatesAck, sender: str) -> None:
        if msg.epoch == self.view.epoch:
            self._batches.pop(msg.batch, None)

    def _install(self, k: K, held: Held) -> None:
        """Hold an object evacuated to this node.  Updates this node made into a replica
        while the object was elsewhere, and calls parked for it, are applied first: a
        local reference taken from now on calls the object directly, and its calls must
        come after them."""
        self.objects[k] = held
        if k in self.replicas:
            self._fold_local_replica(k, held)
        held.owed = self._owes(k)
        self._unpark(k)
