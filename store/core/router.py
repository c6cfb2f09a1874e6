"""One node's core: the key layer and the object layer behind one entry point.

``Router.handle(stimulus, now) -> list[Instruction]`` is how the shell (or a simulation)
drives a node; :meth:`Router.validate` checks its invariants and :meth:`Router.statistics`
reports its figures.  Apart from these three, the only calls into the core from outside
are the object layer's fast paths, gathered in :attr:`Router.fast` (see
``store.core.object_layer``): they serve what is local at once and return nothing to do.

The router holds no state of either layer.  It hands each message to the layer that takes
its type, and messages a layer sends to this node itself (a key request from the object
layer to the key layer, the key layer's answer back) are handed over the same way before
``handle`` returns: the one pump of the node.  A message that came from a peer and cannot
be used is the peer's fault (counted ``malformed-*`` or ``unexpected-*``, logged); an
exception our own code did not expect is a bug (counted ``bug-<Exc>``, logged with its
traceback, and raised when the router was made with ``raise_bugs``, as tests do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ring.hashring import HashRing
from store.core.held import KIND_CODE, Held, K
from store.core.instructions import (
    Acquire,
    AskBarrier,
    AskScan,
    AskSnapshot,
    Deliver,
    DrainProgress,
    DrainStep,
    EnterStage,
    Farewell,
    Flush,
    FlushCheck,
    FlushTargets,
    Instruction,
    Invoke,
    LetGo,
    Locate,
    RegisterMap,
    Remove,
    Repair,
    Stimulus,
    Undeliverable,
)
from store.core.key_layer import KeyLayer
from store.core.object_layer import ObjectLayer
from store.core.objects import ClassInfo, ObjectKind
from store.core.outbox import DEFAULT_MAX_FRAME, Outbox
from store.wire.errors import StoreError
from store.wire.messages import (
    Barrier,
    Call,
    Gone,
    KeyOp,
    Message,
    Reply,
    Scan,
    Snapshot,
    Transfer,
)

__all__ = ["FastPaths", "NodeStatistics", "Router"]

#: Messages that answer a request of this node's (their ``req_id`` is ours), and messages
#: that ask something of it (their ``req_id`` is their sender's).
_ANSWERS = frozenset({Reply, Transfer})
_ASKS = frozenset({Call, Barrier, Scan, Snapshot, Gone})


class FastPaths(NamedTuple):
    """The object layer's fast paths (the only exceptions to ``handle``)."""

    take: Callable[..., Any]
    let_go: Callable[..., bool]
    held: Callable[..., Any]
    in_order: Callable[..., bool]
    located: Callable[..., str | None]
    call_now: Callable[..., Any]
    read_stale: Callable[..., Any]
    update_replica: Callable[..., Any]
    ship_untethered: Callable[..., Any]
    create_here: Callable[..., Any]
    remove_here: Callable[..., bool | None]
    absent_here: Callable[..., bool]


@dataclass(frozen=True)
class NodeStatistics:
    """Counters and gauges of one node's core (``Space.statistics()`` adds the shell's)."""

    epoch: int
    stage: str
    key_records: int
    objects_single: int
    objects_multi: int
    references_in_use: int
    migrations_in: int
    migrations_out: int
    forwarded: int
    location_cache_hits: int
    stale_cache_hits: int
    untethered_calls: int
    untethered_batches: int
    merges: int
    remote_calls: int
    messages_to_self: int
    records_handed_on: int
    objects_evacuated: int
    errors: dict[str, int] = field(default_factory=dict)
    #: Per map: key records this node rebuilt from survivors' reports after a death, and
    #: objects it knows were lost with the node that held them.
    rebuilt: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)


class Router:
    """A node's two layers and the outbox they share.  See the module docstring."""

    def __init__(
        self,
        name: str,
        ring: HashRing,
        *,
        raise_bugs: bool = False,
        resolve_class: Callable[[str], ClassInfo] | None = None,
        trace: list[tuple[str, str, Any, int, str]] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        request_timeout: float | None = None,
    ) -> None:
        """``max_frame``: the largest frame the shell's links carry; no message the core
        makes is larger (calls and results over it are refused where they are made).
        ``request_timeout``: seconds a request of this node may wait for its answer before
        its caller gets ``PeerUnavailable`` (checked at each ``Flush``; None: no limit)."""
        self.name = name
        self.out = Outbox(name, max_frame)
        self.keys = KeyLayer(name, ring, self.out)
        self.objects = ObjectLayer(name, ring, self.out)
        self.objects.resolve_class = resolve_class
        self.objects.trace = trace
        self.objects.request_timeout = request_timeout
        self.raise_bugs = raise_bugs
        #: Resolved once the failure event being handled has rebuilt this node's records.
        self._repair_wait: Any = None
        objects, keys = self.objects, self.keys
        self.fast = FastPaths(
            objects.take,
            objects.let_go,
            # (the dict's own get: the layer's `held` says the same with one frame more,
            # on every in-place access; the dict is never replaced)
            objects.objects.get,
            objects.in_order,
            objects.located,
            objects.call_now,
            objects.read_stale,
            objects.update_replica,
            objects.ship_untethered,
            self.create_here,
            self.remove_here,
            self.absent_here,
        )
        #: Which layer's handler takes each message type (the layers say which they take).
        self._takes: dict[type, Callable[[Any, str], None]] = {
            **objects.handlers(),
            **keys.handlers(),
        }

    # -- the entry point --

    def handle(self, stimulus: Stimulus, now: float) -> list[Instruction]:
        """Do what ``stimulus`` asks; return what the shell must do about it."""
        out = self.out
        out.cause = None
        objects = self.objects
        objects.now = now
        kind = type(stimulus)
        if kind is Deliver:
            for msg in stimulus.msgs:  # type: ignore[union-attr]
                self._deliver(msg, stimulus.sender)  # type: ignore[union-attr]
        elif kind is Acquire:
            objects.acquire(stimulus)  # type: ignore[arg-type]
        elif kind is Invoke:
            objects.invoke(stimulus, now)  # type: ignore[arg-type]
        elif kind is LetGo:
            objects.let_go_slow(stimulus)  # type: ignore[arg-type]
        elif kind is Locate:
            objects.locate(stimulus)  # type: ignore[arg-type]
        elif kind is Remove:
            objects.remove(stimulus)  # type: ignore[arg-type]
        elif kind is Flush:
            objects.expire()
            targets = objects.flush(stimulus)  # type: ignore[arg-type]
            if targets is not None:
                out.effects.append(FlushTargets(targets))
        elif kind is AskBarrier:
            objects.ask_barrier(stimulus)  # type: ignore[arg-type]
        elif kind is FlushCheck:
            objects.flush_check(stimulus)  # type: ignore[arg-type]
        elif kind is AskScan:
            objects.ask_scan(stimulus)  # type: ignore[arg-type]
        elif kind is AskSnapshot:
            objects.ask_snapshot(stimulus)  # type: ignore[arg-type]
        elif kind is Farewell:
            objects.farewell(stimulus)  # type: ignore[arg-type]
        elif kind is Undeliverable:
            objects.undeliverable(stimulus)  # type: ignore[arg-type]
        elif kind is EnterStage:
            self.keys.enter_stage(stimulus.view)  # type: ignore[union-attr]
            objects.enter_stage(stimulus.view)  # type: ignore[union-attr]
        elif kind is Repair:
            self.keys.repair(stimulus.view, stimulus.dead, stimulus.view.ring.nodes)  # type: ignore[union-attr]
            objects.repair(stimulus.view, stimulus.dead, stimulus.paced)  # type: ignore[union-attr]
            self._repair_wait = stimulus.wait  # type: ignore[union-attr]
        elif kind is DrainStep:
            self._drain(stimulus.limit)  # type: ignore[union-attr]
        elif kind is RegisterMap:
            objects.register_map(stimulus.name, stimulus.info)  # type: ignore[union-attr]
        else:
            raise TypeError(f"not a stimulus: {stimulus!r:.80}")
        self._pump()
        if self._repair_wait is not None and not self.keys.rebuilding:
            out.resolve(self._repair_wait, None)
            self._repair_wait = None
        return out.take(kind is Flush)

    def _deliver(self, msg: Message, sender: str) -> None:
        # The request this message is about: a key request's origin and id, an answer's id
        # here, a call's (or barrier's...) id at its sender; a handler may narrow it.
        # (req_id 0: a notice or an untethered call, which nobody answers)
        kind = type(msg)
        if kind is KeyOp:
            self.out.cause = (msg.origin, msg.req_id) if msg.req_id else None  # type: ignore[attr-defined]
        elif kind in _ANSWERS:
            self.out.cause = (self.name, msg.req_id)  # type: ignore[attr-defined]
        elif kind in _ASKS:
            self.out.cause = (sender, msg.req_id) if msg.req_id else None  # type: ignore[attr-defined]
        else:
            self.out.cause = None
        self._dispatch(msg, sender)

    def _dispatch(self, msg: Message, sender: str) -> None:
        kind = type(msg)
        takes = self._takes.get(kind)
        if takes is None:
            self.out.error(f"unexpected-{type(msg).__name__}", f"from {sender}")
            return
        try:
            takes(msg, sender)
        except StoreError as exc:  # raised on a peer's data that does not make sense
            self.out.error(f"malformed-{type(msg).__name__}", f"from {sender}: {exc}")
        except Exception as exc:
            self.out.bug(exc, f"{type(msg).__name__} from {sender}")
            if self.raise_bugs:
                raise

    def _pump(self) -> None:
        """Hand this node's messages to itself to the layer each is for, and what could not
        reach a departed node to the object layer; iteratively, never recursively."""
        out = self.out
        local, bounced = out.local, out.bounced
        while local or bounced:
            while local:
                # (a message to ourselves continues the work in progress: same cause)
                msg = local.popleft()
                if out.lazy(msg):  # nobody waits for it: nor for what it sends on
                    out.calm = True
                    try:
                        self._dispatch(msg, self.name)
                    finally:
                        out.calm = False
                else:
                    self._dispatch(msg, self.name)
            while bounced:
                to, msg = bounced.pop(0)
                try:
                    self.objects.bounce(to, msg)
                except Exception as exc:
                    self.out.bug(exc, f"bounced {type(msg).__name__} to {to}")
                    if self.raise_bugs:
                        raise

    def _drain(self, limit: int) -> None:
        # Objects and records share one pace: the receiver pays for each one it takes, on
        # the same core as its packets.  Records go first: the receiver of an evacuated
        # object then holds its record already and applies the EVACUATED notice itself.
        moved = self.keys.drain(limit)
        moved += self.objects.evacuate(limit - moved)
        self._pump()
        done = self.keys.drained() and self.objects.evacuated()
        self.out.effects.append(DrainProgress(moved, self.keys.drain_scanning, done))

    # -- fast create and remove (keys this node owns) --

    def create_here(self, k: K, info: ClassInfo, args: tuple[Any, ...]) -> Held | None:
        """Create ``k``'s object at once if this node is the key's owner and nothing of it
        exists or is on its way: the record and the object are made here, no message, no
        wait (per-flow state of the flows a node's own keys hash to is made this way).
        None: the slow path must do it.  The constructor's exception reaches the caller,
        and nothing is recorded then.  A single-writer object comes with the caller's
        reference counted."""
        if not self.keys.claimable(k) or not self.objects.makeable(k):
            return None
        try:
            obj = info.cls(*args)
        except Exception as exc:  # the NF's constructor: counted and logged, as ever
            self.out.error(
                f"call-{type(exc).__name__}",
                f"{info.name}() raised {type(exc).__name__}: {str(exc)[:200]} "
                f"(creating {k[0]}[{k[1]!r:.60}])",
            )
            raise
        version = self.keys.claim(k, KIND_CODE[info.kind])
        return self.objects.install_new(k, info, obj, version)

    def absent_here(self, k: K) -> bool:
        """Whether ``k`` certainly has no object, known here without a message: this node
        is the key's owner in a quiet NORMAL stage, its record (if any) says absent, and
        nothing of ``k`` is here or on its way.  A get then raises ``ObjectNotFound`` at
        once; False: ask the slow path (it may still find nothing)."""
        return self.keys.claimable(k) and self.objects.makeable(k)

    def remove_here(self, k: K) -> bool | None:
        """Remove ``k``'s object at once if this node is the key's owner and holds it (True)
        or no object exists (False); None: the slow path must do it."""
        droppable = self.objects.droppable(k)
        if droppable is False:
            return None
        removed = self.keys.drop_here(k, bool(droppable))
        if removed:
            self.objects.drop_now(k)
        return removed

    # -- observability --

    def statistics(self) -> NodeStatistics:
        objects, keys, out = self.objects, self.keys, self.out
        held = objects.objects.values()
        single = sum(1 for h in held if h.info.kind is ObjectKind.SINGLE)
        return NodeStatistics(
            epoch=keys.view.epoch,
            stage=keys.view.stage.value,
            key_records=keys.live_records(),
            objects_single=single,
            objects_multi=len(objects.objects) - single,
            references_in_use=sum(h.refs for h in held),
            migrations_in=objects.migrations_in,
            migrations_out=objects.migrations_out,
            forwarded=keys.forwarded,
            location_cache_hits=objects.location_cache_hits,
            stale_cache_hits=objects.stale_cache_hits,
            untethered_calls=objects.untethered_calls,
            untethered_batches=out.untethered_batches,
            merges=objects.merges,
            remote_calls=objects.remote_calls,
            messages_to_self=out.messages_to_self,
            records_handed_on=keys.records_handed_on,
            objects_evacuated=objects.objects_evacuated,
            errors=dict(out.errors),
            rebuilt=dict(keys.rebuilt),
            lost={m: n for m, n in keys.lost.items() if n},
        )

    def validate(self) -> None:
        """Assert both layers' invariants, and that nothing is left half-handled."""
        assert not self.out.local and not self.out.bounced
        self.keys.validate()
        self.objects.validate()
