"""The trio shell of a node: sockets, timers and the microthread driver around the core.

Everything that decides anything lives in :mod:`store.core`; this module only moves bytes
and time.  It feeds the core stimuli through ``Router.handle`` and carries out the
instructions that come back (:meth:`Node.handle`): messages to send, Waits to settle, log
lines.

* one **listener** accepts authenticated connections from other nodes; a reader task per
  connection hands each decoded batch to the core (``Deliver``) and then resumes the
  microthreads that the batch made ready, inline, without another task switch;
* one **sender** task waits for a kick (something urgent was queued) or for the
  untethered-flush timer (at most ``flush_interval``, 10 ms by default), asks the core for
  everything it holds (``Flush``) and queues each destination's messages on its
  connection, where the transport's writer sends everything queued as one frame; it also
  has multi-writer replicas folded every ``merge_interval``;
* outgoing connections are opened lazily, one per destination, and used only to send, so
  every pair of nodes has one ordered channel per direction, as ``ring.ownership`` assumes.

A node with no listener and a one-node ring (the embedded default of ``store.open_space``)
never opens a socket: every message it sends goes to itself, inside the core.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ring.hashring import HashRing
from ring.ownership import NodeView, Stage
from store.core.instructions import (
    AskBarrier,
    Deliver,
    DrainProgress,
    DrainStep,
    EnterStage,
    Farewell,
    Flush,
    FlushCheck,
    FlushTargets,
    Instruction,
    Log,
    Repair,
    Send,
    Stimulus,
    Undeliverable,
    carry_out,
)
from store.core.objects import ClassInfo, info_of
from store.core.router import Router
from store.core.scheduler import Wait
from store.shell.microthreads import Microthreads
from store.shell.transport import Peer, WireCounters, WireStatistics, connect_peer, serve_peers
from store.wire.control import parse_address
from store.wire.errors import (
    PeerUnavailable,
    StoreError,
    first_leaf,
    raise_bugs,
    reraise_single,
)
from store.wire.messages import Message

__all__ = ["DEFAULT_FLUSH_INTERVAL", "DEFAULT_MERGE_INTERVAL", "Node", "open_node"]

logger = logging.getLogger("store.shell.node")

DEFAULT_FLUSH_INTERVAL = 0.010

#: Seconds a request (a reference, a blocking call, a remove...) may wait for its answer
#: before its caller gets ``PeerUnavailable``: the bound on a wait for a node that died.
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MERGE_INTERVAL = 0.050
#: Seconds between two freezes of the collector's generations (``freeze_gc``).
FREEZE_EVERY = 1.0

#: Seconds the sender waits to open a link before it gives up on that batch for now: one
#: unreachable node must not stall every other destination.
CONNECT_TIMEOUT = 5.0

#: Seconds before messages for a node whose link could not be opened are tried again.
#: They stay queued (in order) until the link comes back, or until the node is declared
#: dead, when they go back to the core (answered there or routed afresh).
RETRY_INTERVAL = 0.5

#: Messages kept for one unreachable node at most; beyond, the oldest are dropped and
#: counted (their callers have long had ``PeerUnavailable`` from the request timeout).
MAX_RETAINED = 1_000_000

#: Seconds a failure repair waits without progress (no message received from any peer)
#: for every survivor's reports before it acknowledges anyway (a survivor that never
#: reports is declared dead in turn).  A rebuild that keeps receiving reports goes on.
REPAIR_STALL = 10.0

#: Seconds a flush waits for a node's barrier answer before asking again.
BARRIER_RETRY = 2.0

#: Seconds ``Space.flush()`` waits, by default, for its barriers before it raises.
FLUSH_TIMEOUT = 30.0

#: Seconds a node that is stopping normally gives its links to send what its core still
#: has queued (see :meth:`Node.send_remaining`).  The close handshake comes on top.
EXIT_FLUSH_TIMEOUT = 1.0

#: Seconds a node that left waits for the members to answer its goodbye before it stops.
FAREWELL_TIMEOUT = 5.0

#: How long a node waits for the websocket close handshake when it shuts a link down.  By
#: then it has handed everything over, so a peer that does not answer quickly is not
#: worth the transport's default 5 s on every exit.
LINK_CLOSE_TIMEOUT = 0.25


def import_class(path: str) -> ClassInfo:
    """The object class named ``"module:qualname"`` (for objects a leaving node hands us).

    Only classes of the store's object kinds are accepted, and only from peers that proved
    the cluster secret.  Object classes must therefore be importable by every node, as
    NF code is in every instance of the original S6."""
    module_name, _, qualname = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return info_of(target)


def _log(line: Log) -> None:
    error = line.error
    exc_info = None if error is None else (type(error), error, error.__traceback__)
    logger.log(logging.getLevelName(line.level), "%s", line.text, exc_info=exc_info)


class Node:
    """A running node: its core state, its microthreads and its connections."""

    def __init__(
        self,
        name: str,
        ring: HashRing,
        *,
        secret: bytes,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        merge_interval: float = DEFAULT_MERGE_INTERVAL,
        limit: int = 4096,
        max_frame: int = 16 * 1024 * 1024,
        counters: WireCounters | None = None,
        freeze_gc: bool = False,
        trace: list[Any] | None = None,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.name = name
        self.core = Router(
            name,
            ring,
            raise_bugs=raise_bugs(),
            resolve_class=import_class,
            trace=trace,
            max_frame=max_frame,
            request_timeout=request_timeout,
        )
        #: The object layer's fast paths (``store.api`` calls them directly).
        self.fast = self.core.fast
        self.view = NodeView(name, Stage.NORMAL, ring)
        #: Freeze the cyclic garbage collector's view of the heap after each scaling event
        #: (see :meth:`enter_stage`).
        self.freeze_gc = freeze_gc
        #: Messages the core gave us to send, by destination, until the sender takes them.
        self._queued: dict[str, list[Message]] = {}
        #: Errors of the shell itself (a link that could not be opened...), by kind.
        self.errors: dict[str, int] = {}
        #: Keys whose place ``Map.untethered`` asked for without waiting, each with the
        #: answer to come (``space_flush`` waits for them before it folds).
        self.deferred: dict[Any, Wait[Any]] = {}
        self.micro = Microthreads(limit, on_failure=self._unit_failed)
        self.secret = secret
        self.flush_interval = flush_interval
        self.merge_interval = merge_interval
        self.max_frame = max_frame
        self.counters = counters if counters is not None else WireCounters()
        self._kick = trio.Event()
        self._peers: dict[str, Peer] = {}
        #: Links other nodes opened to this one, by their name: the way back to a node
        #: that left the ring (its goodbye's answer), which this node does not dial.
        self._inbound: dict[str, Peer] = {}
        #: Nodes declared dead by a failure repair: nothing is sent to them or taken from
        #: them any more (a new process of the same name that joins the ring is let in).
        self.dead: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._connecting: dict[str, trio.Event] = {}
        self._sending = False  # the sender holds messages taken from the core, not yet queued
        self._nursery: trio.Nursery | None = None
        self._next_merge = 0.0
        self._next_freeze = 0.0
        # The run's clock object, read directly: trio.current_time() costs three frames.
        self.clock = trio.lowlevel.current_clock().current_time
        #: The node's standing with the controller, when it joined through one.
        self.membership: Any = None

    @property
    def departed(self) -> bool:
        """Whether a scale-in has removed this node and it has handed its state on (its
        membership's ``on_leave`` has run): the space then takes no object in
        (``store.api`` raises ``MemberLeft``)."""
        membership = self.membership
        return membership is not None and bool(membership.left)

    def _unit_failed(self, unit: Any) -> None:
        """A microthread's NF code raised: counted (``unit-<Exception>``) and logged here,
        where it ran, whether or not anybody awaits the unit (the first ten of each kind
        with their traceback, then every thousandth, so a failing NF cannot flood the log).
        """
        exc = unit.exception()
        counter = f"unit-{type(exc).__name__}"
        count = self.errors[counter] = self.errors.get(counter, 0) + 1
        if count <= 10 or count % 1000 == 0:
            logger.warning(
                "%s: a microthread of flow %.80r raised %s: %.200s (%d so far)",
                self.name,
                unit.flow,
                type(exc).__name__,
                exc,
                count,
                exc_info=(type(exc), exc, exc.__traceback__) if count <= 10 else None,
            )

    def handle(self, stimulus: Stimulus) -> list[Instruction]:
        """Hand ``stimulus`` to the core and carry out what it answers; returns the
        instructions (a caller may look for the ones addressed to it)."""
        instructions = self.core.handle(stimulus, self.clock())
        if instructions:
            self.execute(instructions)
        return instructions

    def execute(self, instructions: list[Instruction]) -> None:
        """Do what the core asks: queue messages (waking the sender for urgent ones), settle
        Waits, write log lines.  Results (drain progress, flush targets) are the caller's."""
        carry_out(instructions, self._queue, _log)

    def _queue(self, send: Send) -> None:
        queued = self._queued.get(send.to)
        if queued is None:
            self._queued[send.to] = send.msgs
        else:
            queued.extend(send.msgs)
        if send.urgent:
            self._kick.set()

    def members(self) -> frozenset[str]:
        """The nodes of the current ring (and of the next one while scaling)."""
        view = self.view
        nodes = view.ring.nodes
        return nodes if view.next_ring is None else nodes | view.next_ring.nodes

    def set_ring(self, ring: HashRing) -> None:
        """Adopt ``ring`` as the current ring in NORMAL (membership fixed at start)."""
        self.enter_stage(NodeView(self.name, Stage.NORMAL, ring))

    def enter_stage(self, view: NodeView) -> None:
        """Install the controller's new stage in the core (see ``store.shell.membership``).

        With ``freeze_gc``, entering NORMAL also calls :func:`gc.freeze`: the key records
        and objects that arrived during the event (thousands of them) are long-lived, and
        left in the collector's generations they make its next full collection scan them
        all, a pause of 10 to 20 ms for every packet (measured in ``bench.scaling`` with
        10,000 flows).  Freezing costs O(1) and objects are still freed by reference
        counting; the young generations are collected just before (cheap), so only a
        reference cycle already old by then is never collected.
        Off by default, since it changes the whole process's collector."""
        self.view = view
        self.handle(EnterStage(view))
        if self.freeze_gc and view.stage is Stage.NORMAL:
            self._freeze()
        self._kick.set()

    def _freeze(self) -> None:
        """With ``freeze_gc``: what is alive now leaves the collector's generations (see
        :meth:`enter_stage`), in NORMAL only.  Done at each NORMAL and every
        :data:`FREEZE_EVERY` seconds, because new flows keep adding long-lived objects
        (key records, objects, the NF's own) and the collector's full pass, which scans
        every one of them, comes each time their number has grown by a quarter: pauses of
        about 80 ms in a live instance with some 15,000 flows, which made its p99 latency.
        That pass found no cyclic garbage there (a store's records hold no cycles), so
        what freezing keeps from the collector is what it would not have freed anyway."""
        if self.view.stage is not Stage.NORMAL:
            return
        gc.collect(1)  # the young cyclic garbage first (cheap): frozen, it would stay
        gc.freeze()

    async def space_flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Send every untethered batch and replica fold; return once all are applied.

        Every node sent updates since the last flush is waited for, a member or not (the
        core answers for a node that left, once what it could not take was sent on);
        ``PeerUnavailable`` names those that did not answer within ``timeout`` seconds.
        Then ``UntetheredCallsFailed`` if an update of this node failed since the last
        flush (the core keeps them: a failure at the owner comes back before its barrier
        answer)."""
        deadline = trio.current_time() + timeout
        if self.deferred:
            # Replicas whose object's place is still being asked: their fold goes where
            # the answer says.  (A failed answer is counted as a lost fold, raised below.)
            with trio.move_on_at(deadline):
                for wait in list(self.deferred.values()):
                    with contextlib.suppress(StoreError):
                        await wait
        dests: list[str] = []
        for ins in self.handle(Flush(replicas=True, targets=True)):
            if type(ins) is FlushTargets:
                dests = ins.nodes
        waits = {dest: self._barrier(dest) for dest in dests}
        self._kick.set()
        silent: list[str] = []
        for dest, wait in waits.items():
            # A barrier only asks for an answer, so asking again is harmless: if a link
            # broke under the first one (the transport drops what it had queued, and says
            # so in the log), a fresh link carries the second.
            while True:
                left = deadline - trio.current_time()
                with trio.move_on_after(max(0.0, min(BARRIER_RETRY, left))):
                    await wait
                    break
                if left <= BARRIER_RETRY:
                    silent.append(dest)
                    break
                logger.warning(
                    "%s: no answer to a flush barrier from %s; asking again", self.name, dest
                )
                wait = self._barrier(dest)
                self._kick.set()
        if silent:
            raise PeerUnavailable(
                f"flush: no answer from {', '.join(silent)} within {timeout:g} s; the "
                "updates sent there may not have been applied"
            )
        check: Wait[Any] = Wait(("flush", self.name))
        self.handle(FlushCheck(check))
        await check

    def _barrier(self, dest: str) -> Wait[Any]:
        wait: Wait[Any] = Wait(("barrier", dest))
        self.handle(AskBarrier(dest, wait))
        return wait

    async def send_remaining(self) -> None:
        """Hand the links what the core still has queued, and wait until they have written
        it; at most ``EXIT_FLUSH_TIMEOUT``.  Called when the node stops normally.

        A node that left keeps forwarding calls for the objects it evacuated until it
        stops, and a forwarded untethered call is not urgent: it waits for the sender's
        next tick.  Cancelling the sender before that tick drops the call silently, and
        with it an update its caller was told had been made (the scaling test saw a tally
        one short).  Bounded, so that a link that does not drain cannot hold the exit: what
        is still unsent then is lost, as on a broken link."""
        with trio.move_on_after(EXIT_FLUSH_TIMEOUT):
            self.handle(Flush())
            while self._queued or self._sending:
                self._kick.set()
                await trio.sleep(0.001)
            for peer in list(self._peers.values()):
                try:
                    await peer.flush()
                except StoreError:
                    pass  # that link broke: what it held is gone, as the transport logged

    async def farewell(self) -> None:
        """This node has left the ring: say goodbye to every member and wait (at most
        ``FAREWELL_TIMEOUT``) for each to answer.  A member answers after handling
        everything it sent here, and sends nothing here after it, so once all have
        answered, what this node forwarded for the objects it evacuated is all there is:
        stopping then loses nothing (``send_remaining`` sends it)."""
        view = self.view
        ring = view.ring if view.next_ring is None else view.next_ring
        others = sorted(ring.nodes - {self.name})
        waits: list[Wait[Any]] = [Wait(("gone", node)) for node in others]
        self.handle(Farewell(others, waits))
        self._kick.set()
        with trio.move_on_after(FAREWELL_TIMEOUT) as scope:
            for wait in waits:
                await wait
        if scope.cancelled_caught:
            missing = [n for n, w in zip(others, waits, strict=True) if not w.done()]
            logger.warning("%s: no goodbye answer from %s; stopping anyway", self.name, missing)

    # -- tasks -------------------------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            with trio.move_on_after(self.flush_interval):
                await self._kick.wait()
            self._kick = trio.Event()
            now = trio.current_time()
            fold = now >= self._next_merge
            if self.freeze_gc and now >= self._next_freeze:
                self._next_freeze = now + FREEZE_EVERY
                self._freeze()
            if fold:
                self._next_merge = now + self.merge_interval
            self.handle(Flush(replicas=fold))
            if not self._queued:
                continue
            members = self.members()
            self._sending = True
            try:
                queued, self._queued = self._queued, {}
                for dest, msgs in queued.items():
                    if self._retry_at and self._retry_at.get(dest, 0.0) > now:
                        self._retain(dest, msgs)
                        continue
                    if dest in self.dead or (dest not in members and dest not in self._peers):
                        back = None if dest in self.dead else self._inbound.get(dest)
                        if back is not None:
                            # A node that left and is still linked to us (it waits for the
                            # answer to its goodbye): answer on its own link.
                            try:
                                for msg in msgs:
                                    back.send_nowait(msg)
                                continue
                            except StoreError:
                                pass
                        # A node that left the cluster, and we are not even connected: it
                        # could not answer, and dialing a process on its way out can hang (it
                        # accepts, never answers).  The core answers what it can itself
                        # (fences, blocking calls go elsewhere) and counts the rest.  (After
                        # a node's goodbye the core itself sends it nothing.)
                        self.handle(Undeliverable(dest, msgs))
                        continue
                    try:
                        peer = self._peers.get(dest)
                        if peer is None:
                            with trio.fail_after(CONNECT_TIMEOUT):
                                peer = await self._connect(dest)
                        for msg in msgs:
                            peer.send_nowait(msg)
                    except (StoreError, trio.TooSlowError) as exc:
                        logger.warning(
                            "%s: cannot reach %s (%s); %d messages kept to send again",
                            self.name,
                            dest,
                            exc,
                            len(msgs),
                        )
                        self.errors["send-failed"] = self.errors.get("send-failed", 0) + 1
                        self._retry_at[dest] = trio.current_time() + RETRY_INTERVAL
                        self._retain(dest, msgs)
                    else:
                        self._retry_at.pop(dest, None)
            finally:
                self._sending = False
            self.micro.run_ready()

    def _retain(self, dest: str, msgs: list[Message]) -> None:
        """Keep ``msgs`` for ``dest`` ahead of what was queued for it since."""
        newer = self._queued.get(dest)
        kept = msgs if newer is None else msgs + newer
        if len(kept) > MAX_RETAINED:
            dropped = len(kept) - MAX_RETAINED
            self.errors["send-failed"] = self.errors.get("send-failed", 0) + dropped
            logger.warning("%s: dropped the %d oldest messages for %s", self.name, dropped, dest)
            kept = kept[dropped:]
        self._queued[dest] = kept

    async def repair(
        self, view: NodeView, dead: frozenset[str], report_rate: int | None = None
    ) -> None:
        """A failure event (see ``store.core``): fence ``dead``, hand what was queued for
        them back to the core, report what this node holds (all at once, or paced at
        ``report_rate`` objects a second, as the drain of a scaling event is, so that
        packets keep their turn on this core), and return once this node's share of the
        key records is rebuilt, or nothing has come from any peer for ``REPAIR_STALL``
        seconds (a stall, not a fixed bound: a large rebuild goes on)."""
        self.dead |= dead
        self.dead -= view.ring.nodes  # a new process of a dead one's name
        self.view = view
        wait: Wait[Any] = Wait(("repair", self.name))
        self.handle(Repair(view, dead, wait, report_rate is not None))
        if report_rate is not None and self._nursery is not None:
            self._nursery.start_soon(self._report, view.epoch, report_rate)
        for name in dead:
            self._retry_at.pop(name, None)
            msgs = self._queued.pop(name, None)
            if msgs:
                self.handle(Undeliverable(name, msgs))
            peer = self._peers.pop(name, None)
            if peer is not None and self._nursery is not None:
                self._nursery.start_soon(peer.aclose)
        self._kick.set()
        heard = self.counters.statistics().messages_received
        while True:
            with trio.move_on_after(REPAIR_STALL):
                await wait
                return
            now_heard = self.counters.statistics().messages_received
            if now_heard == heard:
                break
            heard = now_heard
        logger.warning(
            "%s: the repair to epoch %d is not complete: nothing came for %g s",
            self.name,
            view.epoch,
            REPAIR_STALL,
        )

    async def _report(self, epoch: int, rate: int) -> None:
        """A failure repair's report, paced: a step each tick on the clock, until the core
        has looked at every object it held (or a newer repair took over)."""
        tick = 0.01
        per_tick = max(1, int(rate * tick))
        due = trio.current_time()
        while self.view.epoch == epoch:
            done = True
            for ins in self.handle(DrainStep(per_tick)):
                if type(ins) is DrainProgress:
                    done = ins.moved == 0
            if done:
                return
            due = max(due + tick, trio.current_time() - 3 * tick)
            await trio.sleep_until(due)

    async def _connect(self, dest: str) -> Peer:
        event = self._connecting.get(dest)
        if event is not None:
            await event.wait()
            peer = self._peers.get(dest)
            if peer is None:
                raise PeerUnavailable(f"could not connect to {dest}")
            return peer
        event = self._connecting[dest] = trio.Event()
        try:
            assert self._nursery is not None
            peer = await self._nursery.start(self._hold_connection, dest)
            return peer  # type: ignore[no-any-return]
        finally:
            del self._connecting[dest]
            event.set()

    async def _hold_connection(
        self, dest: str, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        host, port = parse_address(dest)
        started = False
        try:
            async with connect_peer(
                host,
                port,
                secret=self.secret,
                name=self.name,
                max_frame=self.max_frame,
                counters=WireCounters(self.counters),
                close_timeout=LINK_CLOSE_TIMEOUT,
            ) as peer:
                self._peers[dest] = peer
                task_status.started(peer)
                started = True
                try:
                    # Nothing comes back on our own link, except from a member to which
                    # this node has said goodbye (see _sender): handled as any message.
                    core, micro, execute, clock = self.core, self.micro, self.execute, self.clock
                    async for batch in peer:
                        if dest in self.dead:
                            continue
                        execute(core.handle(Deliver(dest, batch), clock()))
                        micro.run_ready()
                finally:
                    self._peers.pop(dest, None)
        except (StoreError, OSError, trio.BrokenResourceError, BaseExceptionGroup) as exc:
            # The peer died or the link broke: that must not end this node (the task runs
            # in the node's nursery).  Before the link was up, the caller (the sender) is
            # told; after, the next message to that node opens a new link.
            leaf = first_leaf(exc)
            if not isinstance(leaf, StoreError | OSError | trio.BrokenResourceError):
                raise
            if not started:
                raise PeerUnavailable(f"could not connect to {dest}: {leaf}") from None
            self.errors["link-lost"] = self.errors.get("link-lost", 0) + 1
            logger.warning("%s: the link to %s broke: %s", self.name, dest, leaf)

    async def _on_peer(self, peer: Peer) -> None:
        core, micro, execute, clock = self.core, self.micro, self.execute, self.clock
        name = peer.name
        dead = self.dead
        self._inbound[name] = peer
        try:
            async for batch in peer:
                if dead and name in dead:  # fenced: it was declared dead
                    self.errors["from-dead-node"] = self.errors.get("from-dead-node", 0) + 1
                    return
                execute(core.handle(Deliver(name, batch), clock()))
                micro.run_ready()
        finally:
            if self._inbound.get(name) is peer:
                del self._inbound[name]

    # -- observability ---------------------------------------------------------------------------

    def wire_statistics(self) -> WireStatistics:
        return self.counters.statistics()


@asynccontextmanager
async def open_node(
    *,
    name: str | None = None,
    listen: str | None = None,
    members: list[str] | None = None,
    secret: bytes,
    **options: Any,
) -> AsyncIterator[Node]:
    """Run a node for the duration of the block.

    ``listen``: ``"host:port"`` to accept other nodes (port 0 picks one); the node's name is
    then its bound address.  Without it the node is reachable by nobody and must be alone
    in its ring (the embedded default).  ``members``: the other nodes' names, for a cluster
    whose membership is fixed at start; ``None`` for this node alone (a controller sets
    the ring later through :meth:`Node.set_ring`).
    """
    try:
        async with trio.open_nursery() as nursery:
            server = None
            counters = WireCounters()
            if listen is not None:
                host, port = parse_address(listen)
                holder: list[Node] = []
                built = trio.Event()

                async def handler(peer: Peer) -> None:
                    await built.wait()  # a peer may arrive before the node is built
                    await holder[0]._on_peer(peer)

                try:
                    server = await nursery.start(
                        lambda task_status: serve_peers(
                            handler,
                            host,
                            port,
                            secret=secret,
                            name=name or listen,
                            counters=counters,
                            close_timeout=LINK_CLOSE_TIMEOUT,
                            task_status=task_status,
                        )
                    )
                except (OSError, BaseExceptionGroup) as exc:
                    leaf = first_leaf(exc)
                    if not isinstance(leaf, OSError):
                        raise
                    why = leaf.strerror or str(leaf)
                    raise PeerUnavailable(f"cannot listen on {listen}: {why}") from None
                name = f"{host}:{server.port}"
            name = name or "local"
            ring = HashRing([name, *(members or [])])
            node = Node(name, ring, secret=secret, counters=counters, **options)
            node._nursery = nursery
            if listen is not None:
                holder.append(node)
                built.set()
            await nursery.start(node.micro.serve)
            nursery.start_soon(node._sender)
            try:
                yield node
                await node.send_remaining()
                if raise_bugs():  # (tests): the core's invariants hold at the end
                    node.core.validate()
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The node's background tasks ended cleanly when the block ended; an error from the
        # caller's own block should reach the caller as itself, not wrapped in a group.
        reraise_single(group)
