"""The key layer of one node (paper §4.1): where each key's authority lives and serves.

For every key there is exactly one *authority*, the node ``ring.ownership`` names (during a
scaling event, the rules there say which of the previous and the next owner it is).  The
authority holds the key's :class:`KeyRecord`: the object's kind, its owner (the node
holding it), its version, and the requests waiting while it moves.  Create, get, remove
and the granting of writable references are serialized there.

A key request (:class:`~store.wire.messages.KeyOp`) starts at the node that needs the
answer, always by way of this layer of that node (the object layer sends it to itself),
and is routed here by :func:`ring.ownership.decide`: served, forwarded, pulled from the
previous owner, or rejected.  The answer goes straight back to the origin's object layer:
a :class:`~store.wire.messages.Transfer` (a single-writer object granted), a
:class:`~store.wire.messages.Reply`, or, when the object must come from another holder, a
:class:`~store.wire.messages.Release` sent to that holder, which transfers the object and
tells the authority with a MOVED notice (itself a KeyOp, routed like any other).

During a scaling event the layer also drains: it hands the records whose next owner is
another node on to that node (:class:`~store.wire.messages.HandOns`, acknowledged), a few
at a time so that packets keep the node.

A key's life is the explicit :class:`KeyState` of its record, and :data:`TRANSITIONS`
lists the changes allowed: every change goes through :meth:`KeyLayer._become`, which
refuses any other, and :meth:`KeyLayer.validate` checks each record's fields against its
state.  Records are kept per map (``records[map][key]``): no tuple per record.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from ring.hashring import HashRing, key_token
from ring.ownership import (
    Arrival as RuleArrival,
)
from ring.ownership import (
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
from store.core.outbox import Outbox
from store.wire.codes import Arrival, Kind, MovedNote, Op, Status
from store.wire.errors import StoreError
from store.wire.messages import (
    Drop,
    HandOnAck,
    HandOns,
    HandOnsAck,
    KeyOp,
    Rebased,
    Rebuilt,
    Release,
    Reply,
    Report,
    Scan,
    Transfer,
    key_from_wire,
)

__all__ = ["TRANSITIONS", "KeyLayer", "KeyRecord", "KeyState"]

K = tuple[str, Any]  # (map name, key)


class KeyState(enum.IntEnum):
    """Where a key stands, at its authority."""

    ABSENT = 0  # no object (bare authority, or removed: the version is kept)
    LIVE = 1  # the object exists, held by ``owner``
    MOVING = 2  # a release to another node is in flight: requests queue until MOVED
    DROPPING = 3  # removed; the holder has not yet confirmed the drop: requests queue
    LOST = 4  # the object died with the node that held it: ObjectLost until made again


# A key whose record died with its node is *rebuilding* at its new owner until every
# survivor has reported what it holds (see :meth:`KeyLayer.repair`): that is not a state of
# a record (there is none yet) but of the layer, and requests for such keys wait for it.


#: The state changes allowed (a state may always stay as it is, e.g. a new owner).
TRANSITIONS: Final[dict[KeyState, frozenset[KeyState]]] = {
    KeyState.ABSENT: frozenset({KeyState.LIVE}),
    KeyState.LIVE: frozenset({KeyState.MOVING, KeyState.DROPPING, KeyState.LOST}),
    KeyState.MOVING: frozenset({KeyState.LIVE, KeyState.LOST}),
    KeyState.DROPPING: frozenset({KeyState.ABSENT}),
    # made again by a create, found again in a survivor's report, or removed
    KeyState.LOST: frozenset({KeyState.LIVE, KeyState.ABSENT}),
}

_EXISTS: Final = frozenset({KeyState.LIVE, KeyState.MOVING})
_BUSY: Final = frozenset({KeyState.MOVING, KeyState.DROPPING})

_RULE_ARRIVAL: Final = {
    Arrival.PLAIN: RuleArrival.PLAIN,
    Arrival.PULL: RuleArrival.PULL,
    Arrival.HANDOFF: RuleArrival.HANDOFF,
}


class KeyRecord:
    """What the key's authority knows about one key (about 100 bytes)."""

    __slots__ = ("kind", "owner", "queue", "releasing", "remover", "state", "version")

    def __init__(self, kind: Kind, owner: str | None, version: int, state: KeyState) -> None:
        self.kind = kind
        self.owner = owner  # the object's holder; None when no object exists
        self.version = version  # bumped by every grant, move and remove
        self.state = state
        self.queue: deque[KeyOp] | None = None  # requests waiting while MOVING/DROPPING
        #: MOVING: the (to, req_id) released to; DROPPING: (the holder told to drop, 0), so
        #: that a holder's death ends the wait.
        self.releasing: tuple[str, int] | None = None
        self.remover: tuple[str, int] | None = None  # DROPPING: who asked, to answer

    @property
    def exists(self) -> bool:
        return self.state in _EXISTS

    @property
    def busy(self) -> bool:
        return self.state in _BUSY

    def to_wire(self) -> list[Any]:
        return [int(self.kind), self.owner, self.version, int(self.state)]

    @staticmethod
    def from_wire(data: list[Any]) -> KeyRecord:
        try:
            kind, owner, version, state = data
            if type(version) is not int or not (owner is None or type(owner) is str):
                raise ValueError("bad owner or version")
            return KeyRecord(Kind(kind), owner, version, KeyState(state))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"malformed key record: {exc}") from None


class KeyLayer:
    """The key records this node is the authority for, and the routing of key requests.
    See the module docstring; the router hands it the messages it owns."""

    def __init__(self, name: str, ring: HashRing, out: Outbox) -> None:
        self.name = name
        self.view = NodeView(name, Stage.NORMAL, ring)
        self.out = out
        self.records: dict[str, dict[Any, KeyRecord]] = {}
        #: Keys whose authority this node handed on during the current event.
        self.handed: set[K] = set()
        self._bare: set[K] = set()  # records adopted as bare authority during this event
        self._unacked = 0  # hand-ons of this event not yet acknowledged
        self._drain_keys: list[K] | None = None
        self.forwarded = 0
        self.records_handed_on = 0
        # -- failure events (see repair) --
        #: Survivors whose reports of the current failure event have not all come yet.
        self._rebuild_waiting: set[str] = set()
        self._rebuild_epoch = 0
        #: Requests for keys this node has no record for (or a lost one), waiting for the
        #: rebuild to end: one of them may be an object a survivor is about to report.
        self._rebuild_parked: deque[KeyOp] = deque()
        #: Messages of an epoch this node does not know yet (a survivor that learnt of a
        #: failure before us), handled once we know it.
        self._future: list[tuple[Any, str]] = []
        #: Keys whose records this rebuild made from a report, by the version reported.
        self._reported: dict[K, int] = {}
        #: Per map: records rebuilt from reports, and objects found lost (their holder died).
        self.rebuilt: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        #: Nodes declared dead (until a new process of the same name joins the ring).
        self.dead: set[str] = set()

    # -- records --

    def record(self, k: K) -> KeyRecord | None:
        by_key = self.records.get(k[0])
        return None if by_key is None else by_key.get(k[1])

    def _put(self, k: K, rec: KeyRecord) -> None:
        by_key = self.records.get(k[0])
        if by_key is None:
            by_key = self.records[k[0]] = {}
        by_key[k[1]] = rec

    def _pop(self, k: K) -> KeyRecord | None:
        by_key = self.records.get(k[0])
        return None if by_key is None else by_key.pop(k[1], None)

    def _become(self, rec: KeyRecord, state: KeyState) -> None:
        """Move ``rec`` to ``state``, if :data:`TRANSITIONS` allows it."""
        if state is not rec.state and state not in TRANSITIONS[rec.state]:
            raise AssertionError(f"key record: {rec.state.name} -> {state.name} is not allowed")
        rec.state = state

    def items(self) -> list[tuple[K, KeyRecord]]:
        """Every record, as ``((map, key), record)`` (for tests and the drain)."""
        return [
            ((m, key), rec) for m, by_key in self.records.items() for key, rec in by_key.items()
        ]

    # -- messages --

    def handlers(self) -> dict[type, Callable[[Any, str], None]]:
        """The messages this layer takes, each with its handler ``(msg, sender)``."""
        return {
            KeyOp: self.route,
            Report: self._on_report,
            Rebuilt: self._on_rebuilt,
            HandOns: self._on_hand_ons,
            HandOnsAck: self._on_ack,
            HandOnAck: self._on_ack,
            Scan: self._on_scan,
        }

    def route(self, msg: KeyOp, sender: str) -> None:
        """Serve, forward or pull ``msg`` as ``ring.ownership`` decides (the only place a
        key request's route is chosen)."""
        if msg.epoch > self.view.epoch:  # a survivor repaired before us: wait until we have
            self._future.append((msg, sender))
            return
        k = (msg.map, msg.key)
        by_key = self.records.get(msg.map)
        if by_key is not None and msg.key in by_key:
            holding = Holding.RECORD
        else:
            holding = Holding.HANDED_ON if k in self.handed else Holding.NONE
        request = Request(key_token(*k), msg.epoch, msg.hops, _RULE_ARRIVAL[msg.arrival], msg.since)
        decision = decide(self.view, holding, request)
        if isinstance(decision, Serve):
            if decision.adopt:
                try:
                    self._adopt(k, msg.record, msg.queued, msg.kind)
                except (StoreError, TypeError, ValueError) as exc:
                    self.out.error("malformed-key-op", f"from {sender}: {exc}")
                    return
                if sender != self.name:
                    self.out.send(sender, HandOnAck(msg.map, msg.key, msg.epoch))
            if msg.arrival is Arrival.HANDOFF:
                msg = _relay(msg, msg.epoch, msg.hops, Arrival.PLAIN, msg.since, None, None)
            self._serve(msg)
            return
        if isinstance(decision, Forward):
            self.forwarded += 1
            record: list[Any] | None = None
            queued: list[list[Any]] | None = None
            arrival = Arrival.PLAIN
            if decision.handoff:
                arrival = Arrival.HANDOFF
                rec = self._pop(k)
                record, queued = _handoff_payload(rec)
                if self.view.stage is not Stage.NORMAL:
                    self.handed.add(k)
                    self._unacked += 1
                    self.records_handed_on += 1
            since = counted_since(self.view, request)
            relayed = _relay(msg, decision.epoch, decision.hops, arrival, since, record, queued)
            self.out.send(decision.to, relayed)
            return
        if isinstance(decision, Pull):
            self.forwarded += 1
            since = counted_since(self.view, request)
            relayed = _relay(msg, decision.epoch, decision.hops, Arrival.PULL, since, None, None)
            self.out.send(decision.source, relayed)
            return
        self.out.error("rejected-request", f"{msg.op.name} {k!r:.80}: {decision.reason}")
        self._reply(msg.origin, msg.req_id, Status.ERROR, ["Rejected", decision.reason])

    def _adopt(
        self, k: K, record: list[Any] | None, queued: list[list[Any]] | None, kind: Kind
    ) -> None:
        """Install the authority that came with a hand-on (keeping our own record if any),
        with the requests that were queued behind a move in progress.  A bare authority
        becomes a bare record (version 0, no object): without it this node would not know
        it is the authority, and would pull ``k`` back from the previous owner, which
        forwards to this node again, until the request is rejected after MAX_HOPS."""
        if self.record(k) is not None:
            return
        bare = record is None or not KeyRecord.from_wire(record).version
        if bare and self.view.stage is Stage.NORMAL:
            # Adopted after this node entered NORMAL (a late pull's answer): the ring alone
            # says it is the authority now, and nothing would forget a bare record kept
            # here until the end of the next event.
            return
        if record is None:
            self._put(k, KeyRecord(kind, None, 0, KeyState.ABSENT))
            self._bare.add(k)
            return
        rec = KeyRecord.from_wire(record)
        self._put(k, rec)
        if not rec.version:
            self._bare.add(k)  # a bare record handed on as it was: forgotten at NORMAL too
        if queued:
            epoch = self.view.epoch
            rec.queue = deque(
                KeyOp(Op(op), k[0], k[1], Kind(kind_), origin, req_id, epoch, 0, Arrival.PLAIN)
                for op, kind_, origin, req_id in queued
            )

    # -- serving --

    def _serve(self, msg: KeyOp) -> None:
        k = (msg.map, msg.key)
        by_key = self.records.get(msg.map)
        rec = None if by_key is None else by_key.get(msg.key)
        op = msg.op
        if self.dead and op is not Op.MOVED and msg.origin in self.dead:
            # Asked by a node declared dead (it waited in a queue here, or was relayed):
            # nobody would take the answer, and serving it would name a dead holder.
            self.out.error("from-dead-node", f"{op.name} of {msg.origin}")
            return
        if self._rebuild_waiting and (rec is None or rec.state is KeyState.LOST):
            self._rebuild_parked.append(msg)  # a survivor may yet report its object
            return
        if op is Op.MOVED:
            self._moved(k, rec, msg)
            return
        if rec is not None and rec.busy:
            if rec.queue is None:
                rec.queue = deque()
            rec.queue.append(msg)
            return
        if op is Op.REMOVE:
            if rec is not None and rec.state is KeyState.LOST:
                self._become(rec, KeyState.ABSENT)  # it existed; now it is gone for good
                rec.version += 1
                self._reply(msg.origin, msg.req_id, Status.OK, True)
                return
            if rec is None or not rec.exists:
                self._reply(msg.origin, msg.req_id, Status.OK, False)
                return
            # The holder may still be using the object through local references.  Until it
            # has dropped it, nothing else is served for this key and the remover waits:
            # otherwise a create could grant a second writable object while the old one is
            # still written, and a get at the holder could succeed after remove returned.
            # The holder confirms with a MOVED notice (DROPPED) that answers the remover.
            holder = rec.owner
            assert holder is not None
            self._become(rec, KeyState.DROPPING)
            rec.owner = None
            rec.releasing = (holder, 0)
            rec.remover = (msg.origin, msg.req_id)
            rec.version += 1
            self.out.send(holder, Drop(msg.map, msg.key, rec.version, msg.origin, msg.req_id))
            return
        if rec is None or not rec.exists:
            if op is not Op.CREATE:
                lost = rec is not None and rec.state is KeyState.LOST
                self._reply(msg.origin, msg.req_id, Status.LOST if lost else Status.NOT_FOUND)
                return
            if rec is None:
                rec = KeyRecord(msg.kind, msg.origin, self._first_version(), KeyState.LIVE)
                self._put(k, rec)
            else:
                self._become(rec, KeyState.LIVE)
                version = max(rec.version + 1, self._first_version())
                rec.kind, rec.owner, rec.version = msg.kind, msg.origin, version
            if msg.kind is Kind.SINGLE:
                transfer = Transfer(msg.map, msg.key, msg.req_id, rec.version, None, True)
                self.out.send(msg.origin, transfer)
            else:
                self._reply(msg.origin, msg.req_id, Status.OK, [msg.origin, rec.version, True])
            return
        if rec.kind != msg.kind:
            self._reply(msg.origin, msg.req_id, Status.WRONG_KIND, int(rec.kind))
            return
        if op is Op.LOCATE or rec.kind is Kind.MULTI:
            self._reply(msg.origin, msg.req_id, Status.OK, [rec.owner, rec.version, False])
            return
        # A writable single-writer reference for msg.origin.
        assert rec.owner is not None
        if rec.owner == msg.origin:
            transfer = Transfer(msg.map, msg.key, msg.req_id, rec.version, None, False)
            self.out.send(msg.origin, transfer)
            return
        self._become(rec, KeyState.MOVING)
        rec.releasing = (msg.origin, msg.req_id)
        self.out.send(rec.owner, Release(msg.map, msg.key, msg.origin, msg.req_id, rec.version))

    def _moved(self, k: K, rec: KeyRecord | None, msg: KeyOp) -> None:
        if msg.note is MovedNote.LOST:
            # The holder this record names never got the object (its hand-over died with
            # the giver): it is lost, as if its holder had died.  A stale notice (the record
            # moved on since) changes nothing.
            if rec is not None and rec.state is KeyState.LIVE and rec.owner == msg.owner:
                if rec.version == msg.version:
                    self._become(rec, KeyState.LOST)
                    rec.owner = None
                    self.lost[k[0]] = self.lost.get(k[0], 0) + 1
            return
        if rec is None:
            if self.dead and msg.note is not MovedNote.DROPPED and msg.owner is not None:
                # After a failure repair, a hand-over that was in flight when the key's old
                # owner died: its holder reported nothing (it held nothing then), and the
                # giver's notice, routed afresh, is what says where the object is now.
                if msg.owner in self.dead:
                    return  # handed to a node that died: lost, as if never made
                self._put(k, KeyRecord(msg.kind, msg.owner, msg.version, KeyState.LIVE))
                self.rebuilt[k[0]] = self.rebuilt.get(k[0], 0) + 1
                return
            self.out.error("moved-without-record", f"{k!r:.80}")
            return
        if msg.owner is None and msg.note is not MovedNote.DROPPED:
            self.out.error("malformed-moved", f"{k!r:.80}: a move to nowhere")
            return
        if msg.note is MovedNote.EVACUATED:
            # A leaving node handed the object to msg.owner on its own initiative.  A release
            # we had sent it is void (it ignores it): ask the new holder instead, and stay
            # MOVING until that hand-over's own MOVED.
            new_owner = msg.owner
            assert new_owner is not None
            released_at = rec.version
            rec.version = msg.version
            if not rec.exists:
                self.out.send(new_owner, Drop(msg.map, msg.key, msg.version))
                return
            rec.owner = new_owner
            if rec.state is KeyState.DROPPING:
                rec.releasing = (new_owner, 0)
            if rec.state is KeyState.MOVING and rec.releasing is not None:
                if msg.version > released_at + 1:
                    # Evacuated by the release's own target, which had the object already
                    # (a leaver adds one to the version it held, a hand-over one more): the
                    # hand-over happened, its notice is still on its way (and stale now).
                    rec.releasing = None
                    self._become(rec, KeyState.LIVE)
                    self._serve_queue(rec)
                    return
                to, req_id = rec.releasing
                self.out.send(new_owner, Release(msg.map, msg.key, to, req_id, msg.version))
            return
        if msg.version < rec.version:
            if msg.note is MovedNote.HANDED_OVER:
                return  # a hand-over's notice overtaken by a later move of the same object
            if msg.note is MovedNote.DROPPED and rec.state is not KeyState.DROPPING:
                # The dead epoch's removal, confirmed to a record rebuilt since from a
                # later copy (see _on_report): the remover sent its request again at the
                # repair, and that one answers it.
                return
        rec.releasing = None
        rec.remover = None
        rec.version = msg.version
        if msg.note is MovedNote.DROPPED:
            # The holder dropped a removed object: the remover (origin, req_id) may go on.
            if rec.state is KeyState.DROPPING:
                self._become(rec, KeyState.ABSENT)
            self._reply(msg.origin, msg.req_id, Status.OK, True)
        elif rec.exists and msg.owner in self.dead:  # handed to a node that died meanwhile
            self._become(rec, KeyState.LOST)
            rec.owner = None
            self.lost[k[0]] = self.lost.get(k[0], 0) + 1
        elif rec.exists:
            self._become(rec, KeyState.LIVE)
            rec.owner = msg.owner
        else:  # removed while it moved: the new holder must drop it too
            if msg.owner is not None:
                self.out.send(msg.owner, Drop(msg.map, msg.key, msg.version))
            rec.owner = None
            if rec.state is KeyState.DROPPING:
                self._become(rec, KeyState.ABSENT)
        self._serve_queue(rec)

    def _serve_queue(self, rec: KeyRecord) -> None:
        """Serve the requests that waited while ``rec`` was busy, until one makes it busy
        again."""
        queue = rec.queue
        rec.queue = None
        while queue:
            self._serve(queue.popleft())
            if rec.busy and queue:  # another move started: the rest waits behind it
                if rec.queue is None:
                    rec.queue = deque()
                rec.queue.extend(queue)
                return

    def _reply(self, origin: str, req_id: int, status: Status, value: Any = None) -> None:
        self.out.send(origin, Reply(req_id, status, value))

    # -- the fast paths of a key this node owns (see Router.create_here / remove_here) --

    def _first_version(self) -> int:
        """The least version of an object made here.  1, until this node has repaired a
        failure: a record that died with its key owner may be made again here, and the
        messages of the dead epoch about the old object (a hand-over's notice, a drop)
        must read as older than anything of the new one, so from then on a new object
        (of a new record, or of a lost or removed one) starts above every version the
        epochs before could have reached: a caller can tell an object made since a
        repair from the one it called before (see ``ObjectLayer.repair``)."""
        if not self.dead:
            return 1
        return (self.view.epoch << 32) + 1

    def claimable(self, k: K) -> bool:
        """Whether a create of ``k`` may be served here at once, without a message: this
        node is the key's owner in a quiet NORMAL stage and no object exists for it.  The
        caller (the router) checks its object layer too, then calls :meth:`claim`."""
        view = self.view
        if view.stage is not Stage.NORMAL or self._rebuild_waiting:
            return False
        by_key = self.records.get(k[0])
        rec = None if by_key is None else by_key.get(k[1])
        if rec is not None and (rec.state is not KeyState.ABSENT or rec.queue):
            return False
        ring = view.ring
        if len(ring) == 1:  # (an embedded space: no hash to compute)
            return self.name in ring.nodes
        return ring.owner(key_token(*k)) == self.name

    def claim(self, k: K, kind: Kind) -> int:
        """Serve a create of ``k`` by this node for itself (:meth:`claimable` said so): the
        record names it as the holder; returns the new object's version."""
        rec = self.record(k)
        if rec is None:
            version = self._first_version()
            self._put(k, KeyRecord(kind, self.name, version, KeyState.LIVE))
            return version
        self._become(rec, KeyState.LIVE)
        rec.kind, rec.owner, rec.version = (
            kind,
            self.name,
            max(rec.version + 1, self._first_version()),
        )
        return rec.version

    def drop_here(self, k: K, held_here: bool) -> bool | None:
        """Serve a remove of ``k`` by this node at once if it is the key's owner in a quiet
        NORMAL stage and either no object exists (False) or this node holds it and may drop
        it now (``held_here``; True: the record is now absent, and the caller drops the
        object).  None: the slow path must do it."""
        view = self.view
        if view.stage is not Stage.NORMAL or self._rebuild_waiting:
            return None
        by_key = self.records.get(k[0])
        rec = None if by_key is None else by_key.get(k[1])
        if rec is not None and (rec.busy or rec.queue):
            return None
        ring = view.ring
        if len(ring) == 1:
            if self.name not in ring.nodes:
                return None
        elif ring.owner(key_token(*k)) != self.name:
            return None
        if rec is None or rec.state is KeyState.ABSENT:
            return False
        if rec.state is KeyState.LIVE and (rec.owner != self.name or not held_here):
            return None
        if rec.state is KeyState.LIVE:  # (no Drop to wait for: the holder is this node)
            self._become(rec, KeyState.DROPPING)
        self._become(rec, KeyState.ABSENT)
        rec.owner = None
        rec.version += 1
        return True

    # -- failure events: the records of a dead node are rebuilt from what survivors hold --

    def repair(self, view: NodeView, dead: frozenset[str], survivors: frozenset[str]) -> None:
        """A failure event: this node is NORMAL on ``view.ring``, which leaves ``dead`` out.

        Key records are soft state.  Those that died with their node are rebuilt by the
        keys' new owners from the survivors' :class:`Report` messages, and until every
        survivor has sent its :class:`Rebuilt` marker, a request for a key this node has
        no record for waits (an object for it may yet be reported).  Records this node
        keeps whose object was held by a dead node become LOST; a remove waiting for a
        dead holder's confirmation is answered.  Records this node holds but no longer
        owns (an event interrupted by the failure) are dropped, their waiting requests
        routed afresh: their objects' holders report them to the owner.  O(records)."""
        self._rebuild_epoch = view.epoch
        self._rebuild_waiting = set(survivors)
        self._reported.clear()
        self.dead |= dead
        self.enter_stage(view)
        ring = view.ring
        for k, rec in self.items():
            if ring.owner(key_token(*k)) != self.name:
                self._pop(k)
                for msg in rec.queue or ():
                    self.route(_relay(msg, view.epoch, 0, Arrival.PLAIN, None, None, None), "")
                continue
            busy_with = None if rec.releasing is None else rec.releasing[0]
            if rec.exists and (rec.owner in dead or busy_with in dead):
                if rec.state is KeyState.MOVING and busy_with not in dead:
                    to, req_id = rec.releasing or ("", 0)
                    self._reply(to, req_id, Status.LOST)  # the release never reaches it
                self._become(rec, KeyState.LOST)
                rec.owner = rec.releasing = None
                rec.version += 1
                self.lost[k[0]] = self.lost.get(k[0], 0) + 1
                self._serve_queue(rec)
            elif rec.state is KeyState.DROPPING and busy_with in dead:
                self._become(rec, KeyState.ABSENT)
                remover, rec.releasing, rec.remover = rec.remover, None, None
                if remover is not None:
                    self._reply(remover[0], remover[1], Status.OK, True)
                self._serve_queue(rec)
        self._replay_future()

    @property
    def rebuilding(self) -> bool:
        """Whether reports of the current failure event are still awaited."""
        return bool(self._rebuild_waiting)

    def _replay_future(self) -> None:
        future, self._future = self._future, []
        for msg, sender in future:
            self._takes_again(msg, sender)

    def _takes_again(self, msg: Any, sender: str) -> None:
        if type(msg) is KeyOp:
            self.route(msg, sender)
        elif type(msg) is Report:
            self._on_report(msg, sender)
        else:
            self._on_rebuilt(msg, sender)

    def _on_report(self, msg: Report, sender: str) -> None:
        if msg.epoch > self.view.epoch:
            self._future.append((msg, sender))
            return
        if msg.epoch != self._rebuild_epoch or sender in self.dead:
            return  # an older event's (the newer one's reports say it all again), or fenced
        ring = self.view.ring
        rebases: dict[str, list[list[Any]]] = {}
        for entry in msg.entries:
            try:
                map_name, key, kind_code, version = entry
                kind = Kind(kind_code)
            except (TypeError, ValueError):
                raise StoreError("a report entry is [map, key, kind, version]") from None
            if type(map_name) is not str or type(version) is not int:
                raise StoreError("a report entry is [map, key, kind, version]")
            k = (map_name, key_from_wire(key))
            if ring.owner(key_token(*k)) != self.name:
                self.out.error("report-not-owner", f"from {sender}: {k!r:.80}")
                continue
            rec = self.record(k)
            # A record made from a report takes a version above every one the dead epoch
            # could have used (versions only grow by small steps within an epoch, and a
            # record made from nothing after a repair starts at epoch << 32), and its
            # holder is told (Rebased): a late message of the dead epoch about this key,
            # a notice routed afresh or a drop, then reads as older than the record.
            # (Multi-writer objects keep their version: callers address updates to the
            # version they located, and an update to another version is refused.)
            rebased = version
            if kind is Kind.SINGLE:
                rebased = max(version, rec.version if rec is not None else 0) + (msg.epoch << 32)
            if rec is None:
                self._put(k, KeyRecord(kind, sender, rebased, KeyState.LIVE))
                self.rebuilt[map_name] = self.rebuilt.get(map_name, 0) + 1
            elif rec.state is KeyState.LOST:
                self._become(rec, KeyState.LIVE)
                rec.kind, rec.owner, rec.version = kind, sender, rebased
                self.lost[map_name] -= 1
                self.rebuilt[map_name] = self.rebuilt.get(map_name, 0) + 1
            elif rec.state is KeyState.ABSENT and rec.version:
                # removed (its Drop went to a node that died meanwhile): drop this copy too
                self.out.send(sender, Drop(map_name, k[1], max(version, rec.version)))
                continue
            elif k in self._reported and rec.state is KeyState.LIVE and rec.owner != sender:
                # Two survivors hold a copy (one was removed, or moved on, by the dead
                # owner, and the word of it died with it): the higher version is the later.
                first = self._reported[k]
                if version <= first:
                    self.out.send(sender, Drop(map_name, k[1], version))
                    continue
                assert rec.owner is not None
                self.out.send(rec.owner, Drop(map_name, k[1], rec.version))
                rec.kind, rec.owner, rec.version = kind, sender, rebased
            else:
                continue  # the record lived through the failure: it knows better
            self._reported[k] = version
            if rebased == version:
                continue
            rebase = rebases.get(sender)
            if rebase is None:
                rebase = rebases[sender] = []
            rebase.append([map_name, key, version, rebased])
        for holder, entries in rebases.items():
            self.out.send(holder, Rebased(msg.epoch, entries))

    def _on_rebuilt(self, msg: Rebuilt, sender: str) -> None:
        if msg.epoch > self.view.epoch:
            self._future.append((msg, sender))
            return
        if msg.epoch != self._rebuild_epoch or not self._rebuild_waiting:
            return
        self._rebuild_waiting.discard(sender)
        if self._rebuild_waiting:
            return
        self._reported.clear()
        parked, self._rebuild_parked = self._rebuild_parked, deque()
        for msg_ in parked:
            self._serve(msg_)

    def _on_scan(self, msg: Scan, sender: str) -> None:
        by_key = self.records.get(msg.map) or {}
        entries = [[key, rec.owner] for key, rec in by_key.items() if rec.exists]
        self.out.send(sender, Reply(msg.req_id, Status.OK, entries))

    # -- scaling (paper §4.4; the rules are ring.ownership's) --

    def enter_stage(self, view: NodeView) -> None:
        """Adopt the controller's new stage.  Entering NORMAL ends an event (or its abort):
        the handed-on markers and bare records of the event are forgotten."""
        if view.stage is Stage.NORMAL:
            self.handed.clear()
            # Only bare authority: a removed key's record keeps its version, so that a later
            # incarnation is granted higher versions than any Drop still in flight.  Only the
            # records adopted bare this event are looked at (walking every record here was a
            # stall of O(records) for every packet at the end of each event).
            for k in self._bare:
                rec = self.record(k)
                if rec is not None and rec.state is KeyState.ABSENT and not rec.version:
                    if not rec.queue:
                        self._pop(k)
            self._bare.clear()
            self._drain_keys = None
        if self.dead:
            self.dead -= view.ring.nodes
        if self._future and view.epoch > self.view.epoch:
            self.view = view
            self._replay_future()
        if view.stage is Stage.SCALING and self.view.stage is not Stage.SCALING:
            self._unacked = 0
            self._drain_keys = None
        self.view = view

    def drain(self, limit: int) -> int:
        """Hand on up to ``limit`` key records whose next owner is another node (the
        background drain of SCALING); returns how many.  Looks at no more than ``2 * limit``
        records per call: deciding which records move costs a key hash each, so it is done a
        few at a time, between packets, never for every record at once.  O(records) once per
        event for a copy of the key list."""
        view = self.view
        if view.stage is not Stage.SCALING or limit <= 0:
            return 0
        if self._drain_keys is None:
            self._drain_keys = [k for k, _ in self.items()]
        keys = self._drain_keys
        assert view.next_ring is not None
        epoch = view.next_ring.epoch
        moved = 0
        budget = 2 * limit
        batches: dict[str, list[Any]] = {}
        while keys and moved < limit and budget:
            budget -= 1
            k = keys.pop()
            if self.record(k) is None:
                continue  # already moved on a request's first touch
            dest = drain_destination(view, key_token(*k))
            if dest is None:
                continue  # its next owner is this node: it stays
            rec = self._pop(k)
            self.handed.add(k)
            self._unacked += 1
            self.records_handed_on += 1
            batch = batches.get(dest)
            if batch is None:
                batch = batches[dest] = []
            batch.append([k[0], k[1], *_handoff_payload(rec)])
            moved += 1
        for dest, batch in batches.items():
            self.out.send(dest, HandOns(epoch, batch))
        return moved

    @property
    def drain_scanning(self) -> bool:
        """Whether :meth:`drain` still has records to look at in this event."""
        return self._drain_keys is None or bool(self._drain_keys)

    def drained(self) -> bool:
        """Every record this node had to hand on was handed on and acknowledged."""
        return (
            self.view.stage is Stage.SCALING
            and self._unacked == 0
            and self._drain_keys is not None
            and not self._drain_keys
        )

    def _on_hand_ons(self, msg: HandOns, sender: str) -> None:
        if msg.epoch != self.view.epoch:
            self.out.error("stale-hand-on", f"epoch {msg.epoch}, ours {self.view.epoch}")
        count = 0
        for entry in msg.records:
            try:
                map_name, key, record, queued = entry
                if type(map_name) is not str:
                    raise StoreError("map name is not a str")
                k = (map_name, key_from_wire(key))
                self._adopt(k, record, queued, Kind.SINGLE)
            except (StoreError, TypeError, ValueError) as exc:
                self.out.error("malformed-hand-on", f"from {sender}: {exc}")
                continue
            count += 1
        self.out.send(sender, HandOnsAck(msg.epoch, count))

    def _on_ack(self, msg: HandOnsAck | HandOnAck, sender: str) -> None:
        if msg.epoch == self.view.epoch:
            count = msg.count if type(msg) is HandOnsAck else 1
            self._unacked = max(0, self._unacked - count)

    # -- observability --

    def live_records(self) -> int:
        return sum(rec.exists for by_key in self.records.values() for rec in by_key.values())

    def validate(self) -> None:
        """Assert each record's fields agree with its state (tests call it)."""
        for k, rec in self.items():
            assert (rec.owner is not None) == rec.exists, (k, rec.state, rec.owner)
            assert rec.queue is None or rec.busy or not rec.queue, (k, rec.state)
            assert rec.releasing is None or rec.busy, (k, rec.state)
            assert rec.remover is None or rec.state is KeyState.DROPPING, (k, rec.state)
            assert rec.state is not KeyState.ABSENT or rec.owner is None, k


def _relay(
    msg: KeyOp,
    epoch: int,
    hops: int,
    arrival: Arrival,
    since: int | None,
    record: list[Any] | None,
    queued: list[list[Any]] | None,
) -> KeyOp:
    """``msg`` with the routing version ``ring.ownership`` chose (built field by field:
    ``dataclasses.replace`` introspects the class on every call)."""
    return KeyOp(
        msg.op,
        msg.map,
        msg.key,
        msg.kind,
        msg.origin,
        msg.req_id,
        epoch,
        hops,
        arrival,
        since,
        msg.owner,
        msg.version,
        msg.note,
        record,
        queued,
    )


def _handoff_payload(rec: KeyRecord | None) -> tuple[list[Any] | None, list[list[Any]]]:
    """What travels with a hand-on: the record (or None: bare authority) and its queue."""
    if rec is None:
        return None, []
    queue = [[int(q.op), int(q.kind), q.origin, q.req_id] for q in rec.queue or ()]
    return rec.to_wire(), queue
