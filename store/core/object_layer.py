"""The object layer of one node (paper §4.1): the objects it holds, and calls to them.

A single-writer object lives where it was last written: a node that wants it asks the key's
authority (a KeyOp to its own key layer, routed from there), which grants it
(:class:`Transfer`) or has its holder release it.  A multi-writer object lives where it was
created and takes calls shipped to it: blocking ones (answered with a :class:`Reply`),
``@untethered`` ones (batched, unanswered) and folds of per-node replicas.

Location cache, invalidated lazily: a node remembers where a multi-writer object (or a
read-only single-writer one) lives and sends calls straight there.  A call that reaches a
node that no longer holds the object is answered NOT_HERE, and the caller asks the key
owner again.  Eager invalidation would make every key record carry the set of nodes that
cached it; lazy invalidation costs one extra round trip to the rare caller that finds an
object gone.

Its part in a scale-in (fences that keep each caller's calls in order, goodbyes, the
evacuation of a leaving node's objects) is in ``store.core.scale_in``; what it keeps per
object and per request is in ``store.core.held``.

**The fast paths** are the only calls into this layer that do not go through
``Router.handle``, and they return no instructions: :meth:`ObjectLayer.take`,
:meth:`ObjectLayer.let_go`, :meth:`ObjectLayer.held` and :meth:`ObjectLayer.call_now`
(section "fast paths" below).  Each does its work at once when the state it needs is here
(a local hit taking a reference, a call into a local object or replica, a fresh ``@stale``
cache entry, an untethered call queued for shipping) and otherwise says so, and the API
falls back to ``handle``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ring.hashring import HashRing, key_token
from ring.ownership import NodeView, Stage
from store.core.held import KIND_CODE, MAX_RELOCATE, SLOW, Held, K, Pending
from store.core.instructions import (
    Acquire,
    AskBarrier,
    AskScan,
    AskSnapshot,
    Farewell,
    Flush,
    FlushCheck,
    Invoke,
    LetGo,
    Locate,
    Remove,
    Undeliverable,
)
from store.core.objects import (
    ClassInfo,
    MethodKind,
    ObjectKind,
    UntetheredCallsFailed,
    ValueNotEncodable,
    dump_state,
    encode_args,
    encode_value,
    load_state,
)
from store.core.outbox import Outbox
from store.core.scale_in import ScaleIn
from store.core.scheduler import Wait
from store.wire.codes import Arrival, Kind, MovedNote, Op, Status
from store.wire.errors import (
    MessageTooLarge,
    ObjectLost,
    ObjectNotFound,
    ObjectRemoved,
    PeerUnavailable,
    RemoteCallError,
    StateNotEncodable,
    StoreError,
    WrongKind,
)
from store.wire.messages import (
    Barrier,
    Call,
    CallFailed,
    Drop,
    Evacuate,
    EvacuateAck,
    Evacuates,
    EvacuatesAck,
    Fence,
    Flushed,
    Fold,
    Gone,
    KeyOp,
    Message,
    Rebased,
    Rebuilt,
    Release,
    Reply,
    Report,
    Scan,
    Snapshot,
    Transfer,
    Untethered,
    key_from_wire,
)

__all__ = ["SLOW", "Held", "ObjectLayer"]

#: Entries per failure report: a report of a large node goes out in many frames, each well
#: under the frame limit even with keys near their size bound.
REPORT_BATCH = 512


class ObjectLayer(ScaleIn):
    """The objects one node holds and the calls it makes.  See the module docstring; its
    part in a scale-in (fences, goodbyes, evacuation) is :class:`ScaleIn`'s."""

    def __init__(self, name: str, ring: HashRing, out: Outbox) -> None:
        ScaleIn.__init__(self)
        self.name = name
        self.view = NodeView(name, Stage.NORMAL, ring)
        self.out = out
        self.maps: dict[str, ClassInfo] = {}
        self.objects: dict[K, Held] = {}
        self.locations: dict[K, str] = {}
        self.stale_cache: dict[tuple[K, str, tuple[Any, ...]], tuple[float, Any]] = {}
        #: Multi-writer replicas, each with the node holding its object; ``None`` while
        #: that is not known yet (an untethered reference's create, whose ``Locate`` is
        #: on its way: the answer names it, see ``_reply_locate``).
        self.replicas: dict[K, tuple[Any, str | None]] = {}
        self._pending: dict[int, Pending] = {}
        self._acquiring: dict[K, Pending] = {}
        self._early_release: dict[K, Release] = {}
        self._early_drop: dict[K, int] = {}  # a Drop that overtook the object's Transfer
        #: Single-writer keys the key owner says we hold but we do not, each with its
        #: request, the version granted and the barriers still out (see _await_unheld).
        self._unheld: dict[K, list[Any]] = {}
        #: Single-writer objects granted here as new whose constructor raised, by the
        #: version granted: their removal is on its way to the key owner (see _unbuilt).
        self._unbuilt: dict[K, int] = {}
        #: Calls, folds and fences for an object on its way here, in arrival order.
        self._parked: dict[K, list[tuple[Call | Fold | Fence, str]]] = {}
        self._seq: dict[K, int] = {}
        self._next_id = 0
        #: The clock of the stimulus being handled (the router sets it).
        self.now = 0.0
        #: Seconds a request may wait for its answer (None: for ever; see expire()).
        self.request_timeout: float | None = None
        #: Requests that expired, until a late answer comes (see expire()).
        self._expired: dict[int, Pending] = {}
        self._resent: set[int] = set()
        # -- the report of a failure event (see repair) --
        #: Its epoch (0: none yet).
        self._report_epoch = 0
        #: Keys held at the repair not yet reported (None: the scan is over).
        self._report_todo: list[K] | None = None
        #: Survivors whose Flushed marker has not come yet (None: the report is over, and
        #: this node's Rebuilt markers are sent); objects that arrive meanwhile are reported.
        self._flush_awaited: set[str] | None = None
        #: Flushed markers of an epoch this node has not learnt yet, by epoch.
        self._early_flushed: dict[int, set[str]] = {}
        self.untethered_since_flush: set[str] = set()
        #: Finds an object class by ``"module:qualname"`` for objects handed to this node by
        #: a leaving one; the shell installs an importing resolver (no import in the core).
        self.resolve_class: Any = None
        #: Test hook: when a list, every grant and release of a single-writer object is
        #: appended as (event, map, key, version, node).
        self.trace: list[tuple[str, str, Any, int, str]] | None = None
        # counters
        self.migrations_in = 0
        self.migrations_out = 0
        self.location_cache_hits = 0
        self.stale_cache_hits = 0
        self.untethered_calls = 0
        self.merges = 0
        self.remote_calls = 0

    # == fast paths: called directly by the API, never through handle =====================

    def take(self, k: K, single: bool) -> Held | None:
        """A local reference to ``k``, if one can be taken at once: the object is held
        here and nobody waits for it (single-writer: the reference is counted)."""
        held = self.objects.get(k)
        if held is not None and held.release is None:
            if single:
                held.refs += 1
            return held
        return None

    @staticmethod
    def let_go(held: Held) -> bool:
        """A local single-writer reference is let go; False when the object must now be
        handed over (``handle(LetGo(...))`` does it)."""
        if held.release is None or held.refs > 1:
            held.refs -= 1
            return True
        return False

    def held(self, k: K) -> Held | None:
        """The object if this node holds it (a read-only reference reads it in place)."""
        return self.objects.get(k)

    def in_order(self, k: K) -> bool:
        """Whether a call through a local reference to multi-writer ``k`` (held here, with
        ``Held.owed`` set) may run at once: no replica of this node's updates waits to be
        folded into it, and no fence is owed for numbered messages sent before it came
        here.  Otherwise such a call would overtake this node's earlier calls
        (``call_now`` orders it).  Clears ``owed`` once nothing of ``k`` is left."""
        if self.replicas and k in self.replicas:
            return False
        if (self._dest or self._fencing) and self._needs_fence(k, self.name):
            return False
        if k not in self._dest:
            held = self.objects.get(k)
            if held is not None:
                held.owed = False
        return True

    def _owes(self, k: K) -> bool:
        """Whether this node may owe ``k`` earlier updates (see ``Held.owed``)."""
        return k in self.replicas or k in self._fencing or k in self._dest

    def _mark_owed(self, k: K) -> None:
        held = self.objects.get(k)
        if held is not None:
            held.owed = True

    def located(self, k: K) -> str | None:
        """The cached location of ``k``, if any (counted as a hit)."""
        where = self.locations.get(k)
        if where is not None:
            self.location_cache_hits += 1
        return where

    def call_now(
        self, k: K, info: ClassInfo, method: str, args: tuple[Any, ...], owner: str, now: float
    ) -> Any:
        """A method call through a reference to an object held elsewhere (or a multi-writer
        one held here), done at once when it can be: the value, or :data:`SLOW` when it
        needs ``handle(Invoke(...))`` (a message, or a fence to wait for)."""
        minfo = info.methods[method]
        held = self.objects.get(k)
        if held is not None and info.kind is ObjectKind.MULTI:
            if held.removed:
                raise ObjectRemoved(f"{k[0]}[{k[1]!r}] was removed")
            if (self._dest or self._fencing) and self._needs_fence(k, self.name):
                return SLOW
            if self.replicas and k in self.replicas:
                self._fold_local_replica(k, held)
            return getattr(held.obj, method)(*args)
        kind = minfo.kind
        if kind is MethodKind.STALE:
            cached = self.stale_cache.get((k, method, args))
            if cached is not None and now - cached[0] <= minfo.max_age:
                self.stale_cache_hits += 1
                return cached[1]
            return SLOW
        if kind is MethodKind.UNTETHERED:
            if info.mergeable:
                replica = self.replicas.get(k)
                if replica is None or replica[1] != owner:
                    replica = self._replica_for(k, info, owner)
                self.untethered_calls += 1
                getattr(replica[0], method)(*args)
                return None
            if self._fencing and k in self._fencing:
                return SLOW
            prev = self._dest.get(k)
            if prev is not None and prev != owner and self._needs_fence(k, owner):
                return SLOW
            if owner == self.name or (self.out.departed and owner in self.out.departed):
                return SLOW
            self.untethered_calls += 1
            seq = self._seq[k] = self._seq.get(k, 0) + 1
            self.untethered_since_flush.add(owner)
            self._dest[k] = owner
            self._mark_owed(k)
            calls = self.out.untethered.get(owner)
            if calls is None:
                calls = self.out.untethered[owner] = []
            calls.append([k[0], k[1], method, args, seq])
            return None
        return SLOW

    # The three below are call_now's common cases, each alone, for a reference method that
    # knows its kind: they skip call_now's look-ups and branches, on the paths of the
    # @stale cache, the replicas and the untethered batches that the goals are about.

    def read_stale(
        self, k: K, method: str, args: tuple[Any, ...], max_age: float, now: float
    ) -> Any:
        """A ``@stale`` read of an object held elsewhere, from the cache if fresh enough;
        :data:`SLOW` otherwise (``call_now``, then ``Invoke``)."""
        cached = self.stale_cache.get((k, method, args))
        if cached is not None and now - cached[0] <= max_age and k not in self.objects:
            self.stale_cache_hits += 1
            return cached[1]
        return SLOW

    def update_replica(
        self, k: K, info: ClassInfo, fn: Any, args: tuple[Any, ...], owner: str | None
    ) -> Any:
        """An ``@untethered`` update (``fn``, the class's function) of a mergeable object
        held elsewhere, applied to this node's replica; :data:`SLOW` when it is held here.
        ``owner`` None: where it is held is not known yet (an untethered reference made
        before the key owner answered): the replica there is, whatever it is for, or a
        new one that waits for the answer to be folded."""
        if k in self.objects:
            return SLOW
        replica = self.replicas.get(k)
        if replica is None or (replica[1] != owner and owner is not None):
            replica = self._replica_for(k, info, owner)
        self.untethered_calls += 1
        fn(replica[0], *args)
        return None

    def ship_untethered(self, k: K, method: str, args: tuple[Any, ...], owner: str) -> Any:
        """An ``@untethered`` call of a multi-writer object held by another node, queued for
        the next batch to it; :data:`SLOW` when it needs more (held here, a fence, a
        departed owner)."""
        if k in self.objects or owner == self.name or (self._fencing and k in self._fencing):
            return SLOW
        prev = self._dest.get(k)
        if prev is not None and prev != owner and self._needs_fence(k, owner):
            return SLOW
        out = self.out
        if out.departed and owner in out.departed:
            return SLOW
        self.untethered_calls += 1
        seq = self._seq[k] = self._seq.get(k, 0) + 1
        self.untethered_since_flush.add(owner)
        self._dest[k] = owner
        self._mark_owed(k)
        calls = out.untethered.get(owner)
        if calls is None:
            calls = out.untethered[owner] = []
        calls.append([k[0], k[1], method, args, seq])
        return None

    # == stimuli from the API and the shell ================================================

    def register_map(self, name: str, info: ClassInfo) -> None:
        old = self.maps.get(name)
        if old is not None and old.cls is not info.cls:
            raise TypeError(f"map {name!r} already holds {old.name} objects, not {info.name}")
        self.maps[name] = info

    def acquire(self, stim: Acquire) -> None:
        """A writable single-writer reference, when the fast path found none: ask the key
        owner.  Concurrent misses on one key make one request."""
        k = stim.k
        info = self.maps[k[0]]
        wait = stim.wait
        pending = self._acquiring.get(k)
        if pending is not None:  # join the request in flight
            pending.waits.append(wait)
            if stim.create:
                if pending.creators is None:
                    pending.creators = []
                    pending.args = list(stim.args)  # the first creator's make it
                pending.creators.append(wait)
            return
        req_id, pending = self._new_pending("acquire", k, info)
        pending.waits.append(wait)
        if stim.create:
            pending.creators = [wait]
            pending.args = list(stim.args)
        self._ask(pending, req_id)

    def locate(self, stim: Locate) -> None:
        k = stim.k
        info = self.maps[k[0]]
        req_id, pending = self._new_pending("locate", k, info)
        pending.waits.append(stim.wait)
        pending.args = list(stim.args)
        op = Op.CREATE if stim.create else Op.LOCATE
        self._key_op(op, k, KIND_CODE[info.kind], req_id, urgent=stim.urgent)

    def remove(self, stim: Remove) -> None:
        k = stim.k
        info = self.maps[k[0]]
        req_id, pending = self._new_pending("plain", k, info)
        pending.waits.append(stim.wait)
        self._key_op(Op.REMOVE, k, KIND_CODE[info.kind], req_id)

    def let_go_slow(self, stim: LetGo) -> None:
        held: Held = stim.held
        held.refs -= 1
        if held.refs == 0 and held.release is not None and not held.removed:
            self._hand_over(stim.k, held)

    def invoke(self, stim: Invoke, now: float) -> None:
        """A call ``call_now`` could not do at once: ship it, or wait for a fence."""
        k, info, method, args, owner, wait = (
            stim.k,
            stim.info,
            stim.method,
            stim.args,
            stim.owner,
            stim.wait,
        )
        try:
            result = self.call_now(k, info, method, args, owner, now)
        except Exception as exc:
            if wait is None:  # an untethered call, applied here: it fails alone
                self.out.failed_update(
                    f"call-{type(exc).__name__}",
                    f"{info.name}.{method} raised {type(exc).__name__}: {str(exc)[:200]}",
                )
            else:
                self.out.fail(wait, exc)
            return
        if result is not SLOW:
            if wait is not None:
                self.out.resolve(wait, result)
            return
        minfo = info.methods[method]
        held = self.objects.get(k)
        if held is not None and info.kind is ObjectKind.MULTI:  # held here, behind a fence
            if self.replicas and k in self.replicas:
                self._fold_local_replica(k, held)  # (queued ahead of it: made before it)
            self._fence(k, self.name, ("invoke", stim, now))
            return
        if minfo.kind is MethodKind.UNTETHERED:
            self.untethered_calls += 1
            self._untethered_now(k, method, args, owner)
            return
        assert wait is not None
        error = self._unsendable(info, method, args)
        if error is not None:  # told where the call is made, before any message
            self.out.fail(wait, error)
            return
        # A blocking call (or a stale read that missed): our replica's updates go first.
        replica = self.replicas.get(k)
        fold_to = owner if replica is None or replica[1] is None else replica[1]
        if self._needs_fence(k, owner) or self._needs_fence(k, fold_to):
            self._send_fold(k, owner)  # (queued ahead of the call, or sent, when it must wait)
            self._fence(k, owner, ("invoke", stim, now))
            return
        self._send_fold(k, owner)
        req_id, pending = self._new_pending("call", k, info)
        pending.method, pending.args, pending.at = method, list(args), now
        pending.waits.append(wait)
        self.remote_calls += 1
        self._ship_call(pending, owner, req_id)

    def _unsendable(self, info: ClassInfo, method: str, args: tuple[Any, ...]) -> Any:
        """Why a blocking call's arguments cannot go in a message (the error to raise at
        its caller), or None.  One encoding of the arguments; a call that takes the
        remote path pays it beside a round trip."""
        what = f"{info.cls.__qualname__}.{method}"
        try:
            size = len(encode_args(args, what))
        except ValueNotEncodable as exc:
            return exc
        if size > self.out.max_payload:
            return MessageTooLarge(
                f"the arguments of {what} are {size} bytes encoded; a call carries at most "
                f"{self.out.max_payload} (the frame limit, max_frame, less room for the rest)"
            )
        return None

    def flush(self, stim: Flush) -> list[str] | None:
        """Fold replicas if asked; the untethered destinations since the last such ask,
        members or not: a node that left is waited for too (its barrier is answered, or
        bounced and answered here once what it could not take was relocated)."""
        if stim.replicas:
            for k in list(self.replicas):
                self._send_fold(k)
        if not stim.targets:
            return None
        dests = sorted(self.untethered_since_flush - {self.name})
        self.untethered_since_flush.clear()
        return dests

    def expire(self) -> None:
        """Fail the waits of requests unanswered for ``request_timeout`` seconds with
        :class:`PeerUnavailable`: a node on their path died or stalls, and a caller gets an
        error within a bound, never a hang.  A fence is taken as answered (what waited for
        it goes on).  An expired request is kept apart for a while, so that a late answer
        still installs what it brings (an object granted to this node, say) without
        settling anything twice.  Requests are met in the order they were made: the walk
        stops at the first young one."""
        timeout = self.request_timeout
        if timeout is None:
            return
        limit = self.now - timeout
        if self._expired:  # forgotten after ten timeouts: no answer comes that late
            forget = self.now - 10 * timeout
            gone = []
            for req_id, pending in self._expired.items():  # in the order they expired
                if pending.born >= forget:
                    break
                gone.append(req_id)
            for req_id in gone:
                del self._expired[req_id]
        if not self._pending:
            return
        old = []
        for req_id, pending in self._pending.items():
            if pending.born > limit:
                break
            old.append(req_id)
        for req_id in old:
            pending = self._pending.pop(req_id)
            what = f"{pending.k[0]}[{pending.k[1]!r:.60}]" if pending.k else pending.kind
            self.out.error("request-expired", f"{pending.kind} #{req_id} of {what}")
            if pending.kind == "fence":
                self._reply_fence(pending, Reply(req_id, Status.OK, None))
                continue
            if pending.kind == "unheld":  # (taken as answered: the sweep ends in bounds)
                self._reply_unheld(pending, Reply(req_id, Status.OK, None))
                continue
            k = pending.k
            if k is not None and self._acquiring.get(k) is pending:
                del self._acquiring[k]
                self._early_drop.pop(k, None)
            elif k is not None and pending.kind == "locate" and k in self._early_drop:
                if not self._expects(k):
                    del self._early_drop[k]
            error = PeerUnavailable(
                f"{what}: no answer within {timeout:g} s (a node on its way is down or stalls)"
            )
            for wait in pending.waits:
                self.out.fail(wait, error)
            pending.waits = []
            pending.creators = None
            self._expired[req_id] = pending
            if k is not None and k in self._parked and not self._expects(k):
                self._unpark(k)

    def flush_check(self, stim: FlushCheck) -> None:
        """The end of a flush: the untethered failures since the last one, if any."""
        count, failures = self.out.take_failures()
        if count:
            self.out.fail(stim.wait, UntetheredCallsFailed(count, failures))
        else:
            self.out.resolve(stim.wait, None)

    def ask_barrier(self, stim: AskBarrier) -> None:
        req_id, pending = self._new_pending("plain", None, None)
        pending.waits.append(stim.wait)
        self.out.send(stim.node, Barrier(req_id))

    def ask_scan(self, stim: AskScan) -> None:
        req_id, pending = self._new_pending("plain", None, None)
        pending.waits.append(stim.wait)
        self.out.send(stim.node, Scan(req_id, stim.map))

    def ask_snapshot(self, stim: AskSnapshot) -> None:
        req_id, pending = self._new_pending("plain", None, None)
        pending.waits.append(stim.wait)
        self.out.send(stim.node, Snapshot(req_id, stim.map, stim.keys))

    def farewell(self, stim: Farewell) -> None:
        """This node left the ring: say goodbye (after everything queued for each node).
        It may stop once every wait is resolved: each of them has sent it nothing since."""
        for node, wait in zip(stim.nodes, stim.waits, strict=True):
            req_id, pending = self._new_pending("plain", None, None)
            pending.waits.append(wait)
            self.out.send(node, Gone(req_id))

    def undeliverable(self, stim: Undeliverable) -> None:
        for msg in stim.msgs:
            if type(msg) is KeyOp:
                if msg.origin == self.name and msg.req_id in self._resent:
                    continue  # the repair sent it again already
                self._key_op_again(msg)  # routed afresh, by a ring without that node
            else:
                self.bounce(stim.to, msg)

    def repair(self, view: NodeView, dead: frozenset[str], paced: bool = False) -> None:
        """A failure event (see ``KeyLayer.repair``): ``dead`` are departed from now on
        (what is sent to them is answered here, as for a node that left: fences and
        barriers answered, calls relocated); key requests whose key owner died are sent
        again, and calls shipped to a dead holder look for their object again (its key
        owner answers LOST).

        Every object held here is reported to its key owner on the repaired ring, in bulk:
        all at once, or (``paced``) a few at a time by :meth:`report_step`, as the drain of
        a scaling event is, so that a node holding many objects keeps serving packets
        meanwhile.  Objects that were on their way here (a hand-over or an evacuation of
        the dead epoch) are reported as they land, until a :class:`Flushed` marker has come
        from every survivor; then this node's :class:`Rebuilt` markers go out.  O(keys) for
        the list of keys to report; O(objects) in all, over the steps."""
        old = self.view
        self._resent = set()  # key requests sent again (not to be sent twice)
        self.out.departed |= dead
        for lost_k, (_, holder) in list(self.replicas.items()):
            if holder in dead:  # what was merged into it died with the object
                del self.replicas[lost_k]
                self.out.failed_update("fold-lost", f"{lost_k!r:.80}: its holder {holder} died")
        self.enter_stage(view)
        self._early_release = {k: r for k, r in self._early_release.items() if r.to not in dead}
        for held in self.objects.values():
            if held.release is not None and held.release.to in dead:
                held.release = None  # the asker died: the object stays here
        ring, epoch = view.ring, view.epoch
        # What this node sent before now is ahead of these on every link: once a survivor
        # has every survivor's marker, nothing handed to it before the event is in flight.
        self._report_epoch = epoch
        self._flush_awaited = set(ring.nodes) - self._early_flushed.pop(epoch, set())
        self._early_flushed = {e: s for e, s in self._early_flushed.items() if e > epoch}
        for node in sorted(ring.nodes):
            self.out.send(node, Flushed(epoch))
        self._report_todo = list(self.objects)
        if not paced:
            self.report_step(len(self._report_todo))
        for req_id, pending in list(self._pending.items()):
            k = pending.k
            if k is None:
                continue
            token = key_token(*k)
            owners = {old.ring.owner(token)}
            if old.next_ring is not None:
                owners.add(old.next_ring.owner(token))
            if pending.keyop is not None and owners & dead:
                self._key_op_again(pending.keyop)
                self._resent.add(req_id)
            elif pending.kind == "call" and (pending.to in dead or self.locations.get(k) in dead):
                # It may have been applied there before the death: it may go on to its
                # object if that was elsewhere all along, never to one made since.
                pending.since = (epoch << 32) + 1
                self.locations.pop(k, None)
                self.out.send(self.name, Reply(req_id, Status.NOT_HERE, None))
        for k, where in list(self.locations.items()):
            if where in dead:
                del self.locations[k]

    def report_step(self, limit: int) -> int:
        """Report up to ``limit`` more of the objects held at the repair (those still held
        here) to their key owners; returns how many keys it looked at (0: nothing left)."""
        todo = self._report_todo
        if todo is None:
            return 0
        ring, epoch = self.view.ring, self._report_epoch
        batches: dict[str, list[list[Any]]] = {}
        looked = 0
        objects = self.objects
        while todo and looked < limit:
            looked += 1
            held_k = todo.pop()
            held = objects.get(held_k)
            if held is None or held.removed:
                continue  # moved on or removed since: who has it now says so
            owner = ring.owner(key_token(*held_k))
            entry = [held_k[0], held_k[1], int(KIND_CODE[held.info.kind]), held.version]
            batch = batches.get(owner)
            if batch is None:
                batch = batches[owner] = []
            batch.append(entry)
        for owner, entries in batches.items():
            for at in range(0, len(entries), REPORT_BATCH):
                self.out.send(owner, Report(epoch, entries[at : at + REPORT_BATCH]))
        if not todo:
            self._report_todo = None
            self._end_report()
        return looked

    @property
    def reporting(self) -> bool:
        """Whether a repair's report scan still has keys to look at."""
        return self._report_todo is not None

    def _report_arrival(self, k: K, held: Held) -> None:
        """An object landed here while this node still reports (see :meth:`repair`): its
        key owner may be rebuilding the record, and nobody else will report it."""
        owner = self.view.ring.owner(key_token(*k))
        entry = [k[0], k[1], int(KIND_CODE[held.info.kind]), held.version]
        self.out.send(owner, Report(self._report_epoch, [entry]))

    def _on_flushed(self, msg: Flushed, sender: str) -> None:
        if msg.epoch > self._report_epoch:  # a survivor learnt of the event before us
            early = self._early_flushed
            early.setdefault(msg.epoch, set()).add(sender)
            if len(early) > 8:  # (bounded: a peer cannot make it grow without end)
                del early[min(early)]
            return
        awaited = self._flush_awaited
        if msg.epoch != self._report_epoch or awaited is None:
            return
        awaited.discard(sender)
        self._end_report()

    def _end_report(self) -> None:
        """Once the scan is over and every survivor's marker has come, tell every key owner
        that this node has reported all it holds."""
        if self._report_todo is not None or self._flush_awaited:
            return
        if self._flush_awaited is None:
            return
        self._flush_awaited = None
        for node in sorted(self.view.ring.nodes):
            self.out.send(node, Rebuilt(self._report_epoch))

    def _on_rebased(self, msg: Rebased, sender: str) -> None:
        if msg.epoch != self._report_epoch or msg.epoch != self.view.epoch:
            return  # an older repair's: the newer one rebuilds again
        for entry in msg.entries:
            try:
                map_name, key, reported, version = entry
            except (TypeError, ValueError):
                raise StoreError("a rebased entry is [map, key, reported, version]") from None
            if type(map_name) is not str or type(reported) is not int or type(version) is not int:
                raise StoreError("a rebased entry is [map, key, reported, version]")
            held = self.objects.get((map_name, key_from_wire(key)))
            if held is not None and held.version == reported:
                held.version = version

    # -- fast create and remove, for keys this node owns (see Router) --

    def makeable(self, k: K) -> bool:
        """Nothing of ``k`` is here or on its way: no object, no request, nothing parked."""
        return not (
            k in self.objects
            or k in self._acquiring
            or k in self._parked
            or k in self._early_drop
            or k in self._unbuilt
            or k in self._arriving
        )

    def install_new(self, k: K, info: ClassInfo, obj: Any, version: int) -> Held:
        """A new object made here for a key this node owns (a single-writer one with the
        caller's reference counted)."""
        held = Held(info, obj, version)
        self.objects[k] = held
        if info.kind is ObjectKind.SINGLE:
            held.refs = 1
            if self.trace is not None:
                self.trace.append(("grant", k[0], k[1], version, self.name))
        else:
            held.owed = self._owes(k)
        return held

    def droppable(self, k: K) -> bool | None:
        """Whether the object of ``k`` held here may be dropped now (nobody here uses or
        wants it); None when none is held here and nothing of it is on its way."""
        held = self.objects.get(k)
        if held is None:
            return None if self.makeable(k) else False
        return held.refs == 0 and held.release is None and k not in self._parked

    def drop_now(self, k: K) -> None:
        held = self.objects.pop(k, None)
        if held is not None:
            held.removed = True
        self.locations.pop(k, None)
        self.replicas.pop(k, None)

    def _key_op_again(self, msg: KeyOp) -> None:
        """Send ``msg`` again, routed afresh by the current ring (its key owner died)."""
        epoch = self.view.epoch
        again = KeyOp(
            msg.op,
            msg.map,
            msg.key,
            msg.kind,
            msg.origin,
            msg.req_id,
            epoch,
            0,
            Arrival.PLAIN,
            epoch,
            msg.owner,
            msg.version,
            msg.note,
        )
        self.out.send(self.name, again)

    # == messages ==========================================================================

    def handlers(self) -> dict[type, Callable[[Any, str], None]]:
        """The messages this layer takes, each with its handler ``(msg, sender)``."""
        return {kind: getattr(self, name) for kind, name in _HANDLERS.items()}

    def receive(self, msg: Message, sender: str) -> None:
        getattr(self, _HANDLERS[type(msg)])(msg, sender)

    def _new_pending(self, kind: str, k: K | None, info: ClassInfo | None) -> tuple[int, Pending]:
        self._next_id += 1
        pending = Pending(kind, k, info)
        pending.born = self.now
        self._pending[self._next_id] = pending
        self.out.cause = (self.name, self._next_id)
        return self._next_id, pending

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
        urgent: bool = True,
    ) -> None:
        """A key request from this node, to its own key layer, which routes it (not
        ``urgent``: neither is its way on, see ``Outbox.calm``)."""
        epoch = self.view.epoch
        msg = KeyOp(
            op,
            k[0],
            k[1],
            kind,
            origin or self.name,
            req_id,
            epoch,
            0,
            Arrival.PLAIN,
            epoch,
            owner,
            version,
            note,
        )
        # (a request of ours: with another ``origin``, ``req_id`` is that node's)
        pending = self._pending.get(req_id) if req_id and origin is None else None
        if pending is not None:
            pending.keyop = msg
        self.out.send(self.name, msg, urgent)

    def _reply(self, origin: str, req_id: int, status: Status, value: Any = None) -> None:
        self.out.send(origin, Reply(req_id, status, value))

    def _on_transfer(self, msg: Transfer, sender: str) -> None:
        k = (msg.map, msg.key)
        pending = self._pending.pop(msg.req_id, None)
        if pending is None and self._expired:
            pending = self._expired.pop(msg.req_id, None)  # late: install, settle nothing
        if pending is None and self._unheld and (msg.state is not None or msg.created):
            unheld = self._unheld.pop(k, None)
            if unheld is not None:  # the object we were told we hold, come at last
                pending = unheld[0]
        if pending is not None:
            self.out.cause = (self.name, msg.req_id)  # (not the cause of an earlier message)
            if pending.k == k:
                k = pending.k  # the caller's own tuple
        self._acquiring.pop(k, None)
        dropped = self._early_drop.pop(k, 0)
        if pending is None or pending.info is None:
            self.out.error("transfer-without-request", f"from {sender}: {k!r:.80}")
            return
        if msg.state is None and not msg.created:
            held = self.objects.get(k)
            if held is None:
                self._await_unheld(k, pending, msg.version)
                return
        else:
            info = pending.info
            if msg.created:
                try:
                    obj = info.cls(*pending.args)
                except Exception as exc:  # the NF's constructor: the create hears it
                    self._unbuilt_single(k, pending, msg.version, dropped, exc)
                    return
            else:
                obj = load_state(info.cls, msg.state or b"\xa0")
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
                    self.migrations_in += 1
                if self._flush_awaited is not None:
                    self._report_arrival(k, held)
                if self.trace is not None:
                    self.trace.append(("grant", msg.map, msg.key, msg.version, self.name))
        held.refs += len(pending.waits)
        early = self._early_release.pop(k, None)
        if early is not None and early.version == held.version and not held.removed:
            held.release = early
        maker = pending.creators[0] if msg.created and pending.creators else None
        for wait in pending.waits:  # only the first create made the object
            self.out.resolve(wait, (held, wait is maker))
        self._unpark(k)

    def _await_unheld(self, k: K, pending: Pending, version: int) -> None:
        """The key owner says this node holds ``k`` (``version``), and it does not: the
        object is on its way here (a hand-over whose notice reached the key owner first,
        seen after a repair sent our request again), or it died with the node handing it
        over.  Links are FIFO, so a barrier to every other node answers only after what
        each sent us before it: once all are answered the object is here, or it is lost
        (the waits raise ObjectLost and the key owner marks the record LOST, so that a
        create makes it anew).  A Transfer that comes meanwhile answers the waits."""
        unheld = self._unheld.get(k)
        if unheld is not None:  # a sweep is out already: wait with it
            unheld[0].waits.extend(pending.waits)
            return
        view = self.view
        others = set(view.ring.nodes) | (set(view.next_ring.nodes) if view.next_ring else set())
        others.discard(self.name)
        unheld = self._unheld[k] = [pending, version, len(others)]
        for node in sorted(others):
            req_id, _ = self._new_pending("unheld", k, None)
            self.out.send(node, Barrier(req_id))
        if not others:
            self._settle_unheld(k)

    def _reply_unheld(self, pending: Pending, msg: Reply) -> None:
        k = pending.k
        unheld = self._unheld.get(k) if k is not None else None
        if unheld is None:  # the object came meanwhile
            return
        unheld[2] -= 1
        if unheld[2] <= 0:
            assert k is not None
            self._settle_unheld(k)

    def _settle_unheld(self, k: K) -> None:
        pending, version, _ = self._unheld.pop(k)
        held = self.objects.get(k)
        if held is not None:  # (installed by a late answer to an older request)
            held.refs += len(pending.waits)
            for wait in pending.waits:
                self.out.resolve(wait, (held, False))
        elif k in self.moved_to:
            # This (leaving) node evacuated it, and the key owner had not heard yet: the
            # object is alive where it went, so its record must not be marked lost (the
            # evacuation's notice would then drop it there).  The callers here fail.
            error: StoreError = PeerUnavailable(
                f"{k[0]}[{k[1]!r:.60}] was evacuated by this leaving node to "
                f"{self.moved_to[k]} while it asked for it"
            )
            for wait in pending.waits:
                self.out.fail(wait, error)
        else:
            error = ObjectLost(
                f"{k[0]}[{k[1]!r:.60}] was lost: it was being handed to this node by a "
                "node that died"
            )
            for wait in pending.waits:
                self.out.fail(wait, error)
            self._key_op(
                Op.MOVED, k, Kind.SINGLE, 0, owner=self.name, version=version, note=MovedNote.LOST
            )
        self._unpark(k)

    def _constructor_failed(self, k: K, pending: Pending, exc: Exception) -> None:
        """``cls()`` raised making the object ``k`` that the key owner just created for
        us: every create (and get) waiting for it raises the constructor's exception,
        and the key owner is asked to remove the record it made, so that the key is
        absent again and nothing waits for an object that was never built."""
        info = pending.info
        assert info is not None
        self.out.error(
            f"call-{type(exc).__name__}",
            f"{info.name}() raised {type(exc).__name__}: {str(exc)[:200]} "
            f"(creating {k[0]}[{k[1]!r:.60}])",
        )
        for wait in pending.waits:
            self.out.fail(wait, exc)
        req_id, _ = self._new_pending("plain", k, info)
        self._key_op(Op.REMOVE, k, KIND_CODE[info.kind], req_id)

    def _unbuilt_single(
        self, k: K, pending: Pending, version: int, dropped: int, exc: Exception
    ) -> None:
        """A single-writer object granted here as new (``version``) could not be built.
        Until the removal reaches the key owner, another node's request may come first
        and make it send us a Release: the object, never built, then goes to that node
        as new (see :meth:`_on_release`) and is removed there."""
        if version < dropped:  # removed already (its Drop overtook the grant)
            info = pending.info
            assert info is not None
            self.out.error(f"call-{type(exc).__name__}", f"{info.name}() raised: {exc!s:.200}")
            for wait in pending.waits:
                self.out.fail(wait, exc)
        else:
            self._unbuilt[k] = version
            self._constructor_failed(k, pending, exc)
        self._unpark(k)

    def _on_release(self, msg: Release, sender: str) -> None:
        k = (msg.map, msg.key)
        held = self.objects.get(k)
        if self.out.departed and msg.to in self.out.departed:
            # The asker died before the object could go to it (a release sent before the
            # repair): the object stays here, and the key owner hears "moved to where it
            # already is", as for an object that cannot travel (see _hand_over).
            if held is not None:
                self._key_op(Op.MOVED, k, Kind.SINGLE, 0, owner=self.name, version=held.version)
            return
        if held is None and k in self.moved_to:
            return  # we evacuated it; the key owner asks its new holder (see MOVED)
        if held is None and self._unbuilt.get(k) == msg.version:
            del self._unbuilt[k]  # never built here: the asker builds it (new), and our
            version = msg.version + 1  # removal, queued behind this move, follows it
            self.out.send(msg.to, Transfer(k[0], k[1], msg.req_id, version, None, True))
            self._key_op(Op.MOVED, k, Kind.SINGLE, 0, owner=msg.to, version=version)
            return
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
            if len(state) > self.out.max_payload:
                raise TypeError(
                    f"{held.info.cls.__qualname__} state is {len(state)} bytes, over the "
                    f"{self.out.max_payload} a frame holds"
                )
        except TypeError as exc:
            # The object cannot travel: it stays here, the asker gets the reason, and the
            # key owner hears "moved to where it already is" so its queue goes on.
            held.release = None
            self.out.error("state-not-encodable", str(exc))
            self._reply(release.to, release.req_id, Status.ERROR, ["TypeError", str(exc)])
            self._key_op(Op.MOVED, k, Kind.SINGLE, 0, owner=self.name, version=held.version)
            return
        del self.objects[k]
        version = held.version + 1
        if self.trace is not None:
            self.trace.append(("release", k[0], k[1], held.version, self.name))
        self.migrations_out += 1
        self.out.send(release.to, Transfer(k[0], k[1], release.req_id, version, state, False))
        self._key_op(Op.MOVED, k, Kind.SINGLE, 0, owner=release.to, version=version)

    def _on_reply(self, msg: Reply, sender: str) -> None:
        pending = self._pending.pop(msg.req_id, None)
        if pending is None and self._expired:
            pending = self._expired.pop(msg.req_id, None)  # late: its waits failed already
        if pending is None:
            self.out.error("reply-without-request", f"from {sender}: #{msg.req_id}")
            return
        self.out.cause = (self.name, msg.req_id)
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
                forwarded = Call(msg.map, msg.key, msg.method, msg.args, 0, 0, version)
                self.out.send(moved, forwarded, urgent=False)
            else:
                self.out.error("untethered-call-lost", f"from {sender}: {k!r:.80}")
            return
        if msg.version and msg.version != held.version:
            # Forwarded by a leaver for the incarnation it evacuated, which was removed
            # since: this one was made again after the call was made.
            self.out.error("untethered-call-lost", f"from {sender}: {k!r:.80} (old version)")
            return
        minfo = held.info.methods.get(msg.method)
        if minfo is None and getattr(held.info.cls, "__s6_opaque__", False):
            # Held as its state only: this node cannot import the class (see scale_in).
            text = f"{held.info.name} cannot be imported on {self.name}: no method runs here"
            if msg.req_id:
                self._reply(sender, msg.req_id, Status.ERROR, ["ClassNotImportable", text])
            else:
                self._call_failed(sender, msg, "evacuate-unknown-class", text, text)
            return
        if minfo is None or (
            held.info.kind is ObjectKind.SINGLE and minfo.kind is not MethodKind.STALE
        ):
            if msg.req_id:
                self._reply(sender, msg.req_id, Status.ERROR, ["NotCallable", msg.method])
            else:
                text = f"{held.info.name} has no untethered method {msg.method!r:.40}"
                self._call_failed(sender, msg, "malformed-call", f"from {sender}: {text}", text)
            return
        if msg.seq and not self._fresh(held, sender, msg.seq):
            if msg.req_id:
                self._reply(sender, msg.req_id, Status.ERROR, ["Duplicate", "call applied already"])
            return
        self._fold_local_replica(k, held)
        try:
            value = getattr(held.obj, msg.method)(*msg.args)
        except Exception as exc:  # the NF's method raised: its caller hears why
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            counter = f"call-{type(exc).__name__}"
            text = f"{held.info.name}.{msg.method} called by {sender} raised {error}"
            if msg.req_id:
                self.out.error(counter, text)
                self._reply(sender, msg.req_id, Status.ERROR, [type(exc).__name__, str(exc)])
            else:
                self._call_failed(sender, msg, counter, text, error)
            return
        if msg.req_id:
            if sender != self.name:  # (to this node itself, the value is not encoded)
                refused = self._unreturnable(held, msg, sender, value)
                if refused is not None:
                    self._reply(sender, msg.req_id, Status.ERROR, refused)
                    return
            self._reply(sender, msg.req_id, Status.OK, value)

    def _unreturnable(self, held: Held, msg: Call, sender: str, value: Any) -> list[str] | None:
        """Why the result of a call cannot travel back to its caller (``[kind, text]`` for
        the error reply, which the caller raises as a ``RemoteCallError``), or None.  The
        owner only counts and logs it: the NF's fault, not a reason to stop."""
        what = f"the result of {held.info.name}.{msg.method} (a {type(value).__name__})"
        try:
            size = len(encode_value(value, what))
        except ValueNotEncodable as exc:
            self.out.error("call-not-encodable", f"for {sender}: {exc}")
            return ["ValueNotEncodable", str(exc)]
        if size > self.out.max_payload:
            text = f"{what} is {size} bytes, over the {self.out.max_payload} a reply carries"
            self.out.error("call-too-large", f"for {sender}: {text}")
            return ["MessageTooLarge", text]
        return None

    def _call_failed(
        self, sender: str, msg: Call | Fold, counter: str, text: str, error: str
    ) -> None:
        """An untethered call (or a fold) from ``sender`` could not be applied here:
        count and log it, and tell the sender, whose next flush raises.  (A call that a
        leaving node forwarded, seq 0, has lost its caller's name: only counted.)"""
        if sender == self.name:
            self.out.failed_update(counter, text)
            return
        self.out.error(counter, text)
        if msg.seq:
            method = msg.method if isinstance(msg, Call) else ""
            self.out.send(sender, CallFailed(msg.map, msg.key, method, msg.seq, error))

    def _on_call_failed(self, msg: CallFailed, sender: str) -> None:
        what = f"{msg.map}[{msg.key!r:.60}].{msg.method or 'merge'}"
        self.out.failed_update("call-failed-at-owner", f"{what} at {sender}: {msg.error:.300}")

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
                self.out.send(moved, Fold(msg.map, msg.key, 0, msg.state, version), False)
                return
            self.out.error("fold-lost", f"from {sender}: {k!r:.80}")
            return
        if msg.version and msg.version != held.version:
            self.out.error("fold-lost", f"from {sender}: {k!r:.80} (old version)")
            return
        if msg.seq and not self._fresh(held, sender, msg.seq):
            return
        replica = load_state(held.info.cls, msg.state)
        try:
            held.obj.merge(replica)
        except Exception as exc:  # the NF's merge raised: the folder hears why
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            text = f"{held.info.name}.merge of a replica from {sender} raised {error}"
            self._call_failed(sender, msg, f"call-{type(exc).__name__}", text, error)
            return
        self.merges += 1

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
            self.receive(msg, sender)

    def _on_drop(self, msg: Drop, sender: str) -> None:
        k = (msg.map, msg.key)
        held = self.objects.get(k)
        arriving = self._arriving.get(k)
        if held is None and arriving is not None and arriving.version <= msg.version:
            del self._arriving[k]
            arriving.removed = True
            if k in self._parked and not self._expects(k):
                self._unpark(k)  # what waited for it meets a removed object
        elif held is not None and held.version <= msg.version:
            del self.objects[k]
            held.removed = True
        elif held is None and (k in self._acquiring or self._expects(k)):
            # The object is on its way here from its previous holder (or, multi-writer, the
            # answer that makes it here is), and this Drop from the key owner overtook it
            # (during an event, the Drop may come from the next owner and the answer from
            # the previous one): it is dropped when it lands (see _on_transfer and
            # _reply_locate).
            self._early_drop[k] = max(self._early_drop.get(k, 0), msg.version)
        elif held is None and k in self.moved_to:
            # We evacuated it: the drop follows it (the remover is answered from here).
            self.out.send(self.moved_to[k], Drop(msg.map, msg.key, msg.version))
        if self._unbuilt and self._unbuilt.get(k, msg.version) < msg.version:
            del self._unbuilt[k]  # the removal asked for when its constructor raised
        self.locations.pop(k, None)
        self.replicas.pop(k, None)
        if msg.origin is not None:
            self._confirm_drop(msg)

    def _confirm_drop(self, msg: Drop) -> None:
        """The key owner waits for this node to have dropped a removed object: tell the
        authority, routed like any key request (the record may have been handed on
        meanwhile); it then answers the remover (``msg.origin``)."""
        assert msg.origin is not None
        info = self.maps.get(msg.map)
        kind = KIND_CODE[info.kind] if info is not None else Kind.SINGLE
        self._key_op(
            Op.MOVED,
            (msg.map, msg.key),
            kind,
            msg.req_id,
            version=msg.version,
            note=MovedNote.DROPPED,
            origin=msg.origin,
        )

    def _on_barrier(self, msg: Barrier, sender: str) -> None:
        self._reply(sender, msg.req_id, Status.OK)

    def _on_snapshot(self, msg: Snapshot, sender: str) -> None:
        out = []
        size = 0
        for key in msg.keys:
            held = self.objects.get((msg.map, key))
            try:
                state = None if held is None or held.removed else dump_state(held.obj)
            except TypeError as exc:  # the asker gets the reason, not silence
                self._reply(sender, msg.req_id, Status.ERROR, ["StateNotEncodable", str(exc)])
                return
            size += 0 if state is None else len(state)
            if size > self.out.max_payload:  # (the asker asks for a few keys at a time)
                text = f"the states asked for are over the {self.out.max_payload} bytes allowed"
                self._reply(sender, msg.req_id, Status.ERROR, ["MessageTooLarge", text])
                return
            out.append([key, state])
        self._reply(sender, msg.req_id, Status.OK, out)

    # -- replies to our requests --

    def _reply_acquire(self, pending: Pending, msg: Reply) -> None:
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
            self.out.fail(wait, exc)
        self._unpark(k)

    def _ask(self, pending: Pending, req_id: int) -> None:
        """Send the acquire ``pending`` for the waits it has now: a create if any of them
        asked to create.  Waits that join it later are answered too (see _reply_acquire)."""
        assert pending.k is not None
        pending.asked = len(pending.waits)
        self._acquiring[pending.k] = pending
        op = Op.CREATE if pending.creators else Op.ACQUIRE
        self._key_op(op, pending.k, Kind.SINGLE, req_id)

    def _ask_again(self, pending: Pending, waits: list[Wait[Any]]) -> None:
        if not waits:
            return
        req_id, again = self._new_pending("acquire", pending.k, pending.info)
        again.waits = list(waits)
        makers = [w for w in waits if w in (pending.creators or ())]
        again.creators = makers or None
        again.args = pending.args if makers else []
        self._ask(again, req_id)

    def _reply_locate(self, pending: Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None and pending.info is not None
        if msg.status != Status.OK:
            for wait in pending.waits:
                self.out.fail(wait, self._error_of(pending, msg))
            if k in self._early_drop and not self._expects(k):
                del self._early_drop[k]  # nothing comes that it could drop
            if not self._expects(k):  # (another question, a create, may still answer)
                self._drop_unplaced(k, msg.status.name)
            self._unpark(k)
            return
        owner, version, created = msg.value
        replica = self.replicas.get(k)
        if replica is not None and replica[1] is None:
            self.replicas[k] = (replica[0], owner)  # its place is known: the next fold goes
        dropped = self._early_drop.pop(k, 0)
        if created and owner == self.name and version <= dropped:
            # Made here and removed before the answer came: the create happened (its
            # callers hear so), and the object is already gone.
            for wait in pending.waits:
                self.out.resolve(wait, (owner, created))
            self._unpark(k)
            return
        if created and owner == self.name:
            try:
                obj = pending.info.cls(*pending.args)
            except Exception as exc:  # the NF's constructor: the create hears it
                self._constructor_failed(k, pending, exc)
                self._unpark(k)
                return
            held = self.objects[k] = Held(pending.info, obj, version)
            held.owed = self._owes(k)
        self.locations[k] = owner
        for wait in pending.waits:
            self.out.resolve(wait, (owner, created))
        self._unpark(k)

    def _reply_call(self, pending: Pending, msg: Reply) -> None:
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
        if pending.relocated:  # an untethered call, sent again: nobody waits for it
            self._relocated(pending)
            if msg.status == Status.ERROR:
                error = self._error_of(pending, msg)
                self.out.failed_update("call-failed-at-owner", f"{error}"[:300])
            elif msg.status != Status.OK:
                self.out.error("untethered-call-lost", f"{k!r:.80}: {msg.status.name}")
            return
        if msg.status != Status.OK:
            for wait in pending.waits:
                self.out.fail(wait, self._error_of(pending, msg))
            return
        info = pending.info.methods.get(pending.method)
        if info is not None and info.kind is MethodKind.STALE:
            # The value is at least as fresh as the request: its age counts from then (not
            # from when the reply came, nor from the latest call, which could be later).
            cache_key = (k, pending.method, tuple(pending.args))
            self.stale_cache[cache_key] = (pending.at, msg.value)
        for wait in pending.waits:
            self.out.resolve(wait, msg.value)

    def _reply_relocate(self, pending: Pending, msg: Reply) -> None:
        k = pending.k
        assert k is not None
        if msg.status != Status.OK:
            if not pending.waits and msg.status == Status.LOST:  # its caller's flush raises
                self.out.failed_update("untethered-call-lost", f"{k!r:.80}: object lost")
            elif not pending.waits:
                self.out.error("untethered-call-lost", f"{k!r:.80}: {msg.status.name}")
            self._relocated(pending)
            for wait in pending.waits:
                self.out.fail(wait, self._error_of(pending, msg))
            return
        owner, version = msg.value[0], msg.value[1]
        self.locations[k] = owner
        if pending.since and type(version) is int and version >= pending.since:
            self._relocated(pending)
            error = ObjectLost(
                f"{k[0]}[{k[1]!r:.60}] was lost with the node the call went to (it may have "
                "been applied there); the object there now was made since"
            )
            for wait in pending.waits:
                self.out.fail(wait, error)
            return
        pending.kind = "call"
        self._reship(pending, owner)

    def _reply_refold(self, pending: Pending, msg: Reply) -> None:
        """Where the object of a fold that met a departed node is now (see
        ``ScaleIn._relocate_fold``): fold the replica there."""
        k = pending.k
        assert k is not None
        self._relocated(pending)
        if msg.status != Status.OK:
            self.out.failed_update("fold-lost", f"{k!r:.80}: {msg.status.name}")
            return
        self._fold_out(k, pending.args[0], msg.value[0])

    def _reply_plain(self, pending: Pending, msg: Reply) -> None:
        if msg.status != Status.OK:
            for wait in pending.waits:
                self.out.fail(wait, self._error_of(pending, msg))
            return
        for wait in pending.waits:
            self.out.resolve(wait, msg.value)

    def _error_of(self, pending: Pending, msg: Reply) -> StoreError:
        what = f"{pending.k[0]}[{pending.k[1]!r}]" if pending.k else "request"
        if msg.status in (Status.NOT_FOUND, Status.NOT_HERE):
            return ObjectNotFound(f"{what}: no such object")
        if msg.status == Status.LOST:
            return ObjectLost(f"{what}: lost with the node that held it (create makes it anew)")
        if msg.status == Status.WRONG_KIND:
            kind = ObjectKind.MULTI if msg.value == Kind.MULTI else ObjectKind.SINGLE
            return WrongKind(f"{what} holds a {kind.value} object")
        kind_, text = msg.value if isinstance(msg.value, list) else ("Error", str(msg.value))
        if (kind_ == "TypeError" and pending.kind == "acquire") or kind_ == "StateNotEncodable":
            return StateNotEncodable(f"{what}: {text}")
        return RemoteCallError(f"{what}: {kind_}: {text}")

    # -- shipping calls --

    def _replica_for(self, k: K, info: ClassInfo, owner: str | None) -> tuple[Any, str | None]:
        """This node's replica of ``k`` for the object held at ``owner``, made if needed.

        A replica made for another place (the object was removed and made again there) is
        folded to that old place first: its updates belong there, the new ones here."""
        replica = self.replicas.get(k)
        if replica is not None and replica[1] is None and owner is not None:
            # Made before its place was known (Map.untethered): the place is known now.
            replica = self.replicas[k] = (replica[0], owner)
        elif replica is not None and replica[1] != owner:
            self._send_fold(k)  # (it takes the replica out, even when the fold must wait)
            replica = None
        if replica is None:
            replica = self.replicas[k] = (info.cls(), owner)
            self._mark_owed(k)
        return replica

    def _untethered_now(self, k: K, method: str, args: tuple[Any, ...], owner: str) -> None:
        if self._needs_fence(k, owner):  # (a deferred call, still behind)
            self._fence(k, owner, ("untethered", k, method, args, owner))
            return
        if self.out.departed and owner in self.out.departed:  # a reference older than a goodbye
            self._relocate_untethered(k, method, list(args))
            return
        held = self.objects.get(k) if owner == self.name else None
        if held is not None and not held.removed:
            # Held here by now (this call waited for a fence): apply it at once, as a local
            # call would be; a message to ourselves would come after calls made later.
            self._fold_local_replica(k, held)
            try:
                getattr(held.obj, method)(*args)
            except Exception as exc:
                self.out.failed_update(
                    f"call-{type(exc).__name__}",
                    f"{held.info.name}.{method} raised {type(exc).__name__}: {str(exc)[:200]}",
                )
            return
        seq = self._seq[k] = self._seq.get(k, 0) + 1
        self.untethered_since_flush.add(owner)
        if owner == self.name:
            self.out.send(owner, Call(k[0], k[1], method, list(args), 0, seq), urgent=False)
            return
        self._dest[k] = owner
        self._mark_owed(k)
        calls = self.out.untethered.get(owner)
        if calls is None:
            calls = self.out.untethered[owner] = []
        calls.append([k[0], k[1], method, args, seq])

    def _on_untethered(self, msg: Untethered, sender: str) -> None:
        for entry in msg.calls:
            try:
                map_name, key, method, args, seq = entry
                if type(map_name) is not str or type(method) is not str or type(seq) is not int:
                    raise TypeError("map, method or seq of the wrong type")
                call = Call(map_name, key_from_wire(key), method, list(args), 0, seq)
            except (StoreError, TypeError, ValueError) as exc:
                self.out.error("malformed-untethered-call", f"from {sender}: {exc}")
                continue
            self._on_call(call, sender)

    def _ship_call(self, pending: Pending, owner: str, req_id: int | None = None) -> None:
        k = pending.k
        assert k is not None
        if req_id is None:
            self._next_id += 1
            req_id = self._next_id
            self._pending[req_id] = pending
        seq = self._seq[k] = self._seq.get(k, 0) + 1
        info = pending.info
        pending.to = owner
        if owner != self.name and info is not None and info.kind is ObjectKind.MULTI:
            self._dest[k] = owner
            self._mark_owed(k)
        self.out.send(owner, Call(k[0], k[1], pending.method, pending.args, req_id, seq))

    def _reship(self, pending: Pending, owner: str) -> None:
        """Send a blocking call again, to where its object went (after a fence if the old
        place is leaving: the calls sent before it must not be overtaken)."""
        assert pending.k is not None
        if self._needs_fence(pending.k, owner):
            self._fence(pending.k, owner, ("reship", pending, owner))
            return
        self._ship_call(pending, owner)

    def _fold_local_replica(self, k: K, held: Held) -> None:
        replica = self.replicas.get(k)
        if replica is None:
            return
        owner = replica[1]
        view = self.view
        leaving = owner not in (view.ring if view.next_ring is None else view.next_ring)
        if owner != self.name and not leaving:
            # Made for an object held elsewhere, since removed there and made again here:
            # its updates go to the old place, not into this (newer) object after calls
            # already applied to it.  (An owner that left evacuated the object to us.)
            self._send_fold(k)
            return
        del self.replicas[k]
        self._fold_out(k, replica[0], self.name)

    def _send_fold(self, k: K, unplaced_to: str | None = None) -> None:
        """Fold this node's replica of ``k`` to its object.  One whose place is not known
        yet (``Map.untethered``) goes to ``unplaced_to`` (where a blocking call about to
        follow it goes: this node's updates stay in order) or to the cached location, or
        waits for its ``Locate``'s answer."""
        replica = self.replicas.pop(k, None)
        if replica is not None:
            obj, owner = replica
            if owner is None:
                owner = unplaced_to or self.locations.get(k)
                if owner is None:
                    self.replicas[k] = replica  # kept while its Locate is on its way
                    if not self._expects(k):  # (it expired unanswered)
                        self._drop_unplaced(k, "no answer")
                    return
            self._fold_out(k, obj, self.name if owner == self.name and k in self.objects else owner)

    def _drop_unplaced(self, k: K, why: str) -> None:
        """A replica whose object's place was to come from a ``Locate`` that failed: its
        updates have nowhere to go, and this node's next flush says so."""
        replica = self.replicas.get(k)
        if replica is not None and replica[1] is None:
            del self.replicas[k]
            self.out.failed_update("fold-lost", f"{k!r:.80}: its place is unknown ({why})")

    def _fold_out(self, k: K, replica: Any, to: str) -> None:
        """Deliver the updates of a replica taken out of :attr:`replicas` to the object at
        ``to`` (this node: merged here), after a fence when one is needed."""
        if self._needs_fence(k, to):
            self._fence(k, to, ("fold", k, replica, to))
            return
        if to == self.name:
            held = self.objects.get(k)
            if held is not None and not held.removed:
                try:
                    held.obj.merge(replica)
                except Exception as exc:  # the NF's merge raised: this node's flush says so
                    self.out.failed_update(
                        f"call-{type(exc).__name__}",
                        f"{held.info.name}.merge raised {type(exc).__name__}: {str(exc)[:200]}",
                    )
                    return
                self.merges += 1
                return
        try:
            state = dump_state(replica)
        except TypeError as exc:
            # The class's merge left something cbor cannot carry in the replica: the fault
            # is the NF's, the node keeps running, and its next flush says what was lost.
            self.out.failed_update("replica-not-encodable", str(exc))
            return
        if len(state) > self.out.max_payload:
            self.out.failed_update(
                "replica-not-encodable",
                f"a replica of {k[0]}[{k[1]!r:.60}] is {len(state)} bytes, over the "
                f"{self.out.max_payload} a frame holds",
            )
            return
        seq = self._seq[k] = self._seq.get(k, 0) + 1
        self.untethered_since_flush.add(to)
        if to != self.name:
            self.out.untethered_dests.add(to)
            self._dest[k] = to
            self._mark_owed(k)
        self.out.send(to, Fold(k[0], k[1], seq, state), urgent=False)

    # -- observability --

    def validate(self) -> None:
        """Assert the layer's invariants (tests call it)."""
        for k, held in self.objects.items():
            assert held.refs >= 0, k
            assert not held.removed, k
            if held.info.kind is ObjectKind.SINGLE:
                assert held.release is None or held.release.version == held.version, k
        for k in self._parked:
            assert self._expects(k), k  # calls wait only for an object that may come
        for k in self._early_drop:
            assert k in self._acquiring or self._expects(k), k
        for k in self._arriving:
            assert k in self._fencing, k  # an arriving object waits for its fence
        for k in self._unbuilt:
            assert k not in self.objects, k
        assert self._relocating >= 0 and (self._relocating or not self._barriers_after)


_HANDLERS: dict[type, str] = {
    Transfer: "_on_transfer",
    Release: "_on_release",
    Reply: "_on_reply",
    Call: "_on_call",
    Fold: "_on_fold",
    Drop: "_on_drop",
    Barrier: "_on_barrier",
    Snapshot: "_on_snapshot",
    Evacuate: "_on_evacuate",
    EvacuateAck: "_on_evacuate_ack",
    Evacuates: "_on_evacuates",
    EvacuatesAck: "_on_evacuates_ack",
    Untethered: "_on_untethered",
    CallFailed: "_on_call_failed",
    Fence: "_on_fence",
    Gone: "_on_gone",
    Flushed: "_on_flushed",
    Rebased: "_on_rebased",
}

_REPLY_HANDLERS: dict[str, Any] = {
    "acquire": ObjectLayer._reply_acquire,
    "locate": ObjectLayer._reply_locate,
    "call": ObjectLayer._reply_call,
    "relocate": ObjectLayer._reply_relocate,
    "plain": ObjectLayer._reply_plain,
    "fence": ObjectLayer._reply_fence,
    "refold": ObjectLayer._reply_refold,
    "unheld": ObjectLayer._reply_unheld,
}
