"""A node's side of the membership protocol: register, get admitted, follow the stages.

The node process uses it like this::

    async with join_cluster(
        "10.0.0.1:7000", name="n4", address="10.0.0.4:7100", secret=secret,
        handler=node, status_provider=node.figures,
    ) as membership:
        ...  # admitted: membership.view is this node's NodeView on the current ring
        await membership.leave()  # a graceful scale-in of this node, when it wants to go

:func:`join_cluster` connects to the controller, registers, and returns once the node is a
member of a ring (at once with automatic admission, after ``ctl scale-out`` with manual
admission).  From then on, and already while it waits (a joiner takes part in the event
that admits it), the controller drives the node through the stages of ``ring.ownership``
by calling the handler's callbacks.

The callback contract
---------------------
Each callback is ``async def on_x(self, membership: Membership) -> None``.  Before it is
called, :attr:`Membership.stage`, :attr:`~Membership.ring`, :attr:`~Membership.next_ring`
and :attr:`~Membership.addresses` already describe the new stage, so the callback's first
job is to install ``membership.view`` (a :class:`ring.ownership.NodeView`) as the view its
routing decisions use.  The controller is told the stage is reached when the callback
**returns**, so return only once the node really acts by the new view.  Callbacks run one
at a time, in the order the controller sent the commands; while one runs, the next waits
(status requests are still answered).

``on_pre_scaling``
    NodeView(PRE_SCALING, ring=previous ring, next_ring=the event's ring).  Forward, do not
    hand on (rule P3): no key moves yet.  A joining node gets this too; its ``ring`` is the
    ring it is not yet part of.
``on_scaling``
    NodeView(SCALING, same rings).  Start the background drain (``drain_destination``) and
    return at once; when every hand-on has been acknowledged, call
    ``await membership.report_drained(records_moved, objects_moved)``.  Nobody becomes
    NORMAL on the new ring until every node has reported.  (Reporting inside this callback
    is allowed: the report is sent after the acknowledgement.)
``on_normal``
    NodeView(NORMAL, ring=the new ring).  Also the first callback of a node admitted into
    the very first ring (which has no barrier), and of a node that rejoins.  Drop the
    handed-on markers of the finished event.
``on_abort``
    NodeView(NORMAL, ring=the previous ring): the event was aborted before anyone scaled,
    so nothing moved; forget the next ring.  A joiner of an aborted event is not a member of
    that ring and stays waiting for the next event.
``on_repair``
    NodeView(NORMAL, ring=the repaired ring), and :attr:`Membership.dead` the nodes it
    leaves out.  Fence the dead, report what this node holds to the keys' new owners, and
    return once this node's share of the key records is rebuilt (``store.core``'s failure
    event).
``on_leave``
    A scale-in removed this node and everybody is NORMAL on the ring without it; it holds
    nothing.  Finish parked work, flush, then return: the node may exit afterwards.

A callback that raises ends the membership, and the node's ``async with`` block, with that
exception: acknowledging a stage the node did not reach would break the barrier, and never
acknowledging it would hold every other node at the barrier.

Leaving the ``async with`` block without :meth:`Membership.leave` disconnects the node: the
controller keeps it in the ring as a lost member (its keys unreachable) until a node of the
same name and address joins again.

Whose fault is what (``store.wire.errors``).  The controller has authenticated, so a
message a member never takes from it (a ``Register``, another node's message) is the
controller's fault: answered with an ``Error``, counted as ``unexpected-<Message>`` and
logged, and the connection stays up; a malformed one never gets here (the transport refuses
it the same way).  An answer to a request given up is a race: counted
(``stale-scale-reply``) and ignored.  A message whose handling fails otherwise has met a
bug of ours (the status provider, say): logged with its traceback and counted as
``bug-<ExceptionType>``, and the membership goes on, unless ``S6_RAISE_BUGS=1`` asks for the
bug to surface.  :attr:`Membership.errors` has the counts.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

import trio

from ring.hashring import HashRing
from ring.ownership import NodeView, Stage
from store.core.barrier import Callback, MemberSide
from store.core.objects import encode_value
from store.shell.transport import Peer, connect_peer
from store.wire.control import (
    ControllerRefused,
    DrainedReport,
    Figures,
    Heartbeat,
    MemberList,
    NodeStatus,
    Query,
    QueryAnswer,
    Register,
    Resume,
    RingState,
    ScaleProgress,
    ScaleReply,
    ScaleRequest,
    ScalingAborted,
    StageAck,
    StageCommand,
    StatusRequest,
    describe_failure,
    parse_address,
)
from store.wire.errors import (
    PeerUnavailable,
    ProtocolError,
    StoreError,
    bug_counter,
    raise_bugs,
    reraise_single,
)
from store.wire.messages import Message

__all__ = [
    "CONNECT_TIMEOUT",
    "Membership",
    "MembershipHandler",
    "QueryHandler",
    "StatusProvider",
    "join_cluster",
]

logger = logging.getLogger("store.shell.membership")

#: Seconds to reach the controller and complete the handshake and registration.
CONNECT_TIMEOUT: Final = 5.0
#: Seconds between a member's heartbeats: well under the controller's failure timeout (2 s
#: by default), so that a member is declared dead only after several are missing.
HEARTBEAT_INTERVAL: Final = 0.25
#: Seconds between attempts to reach the controller again after its connection ended.
RECONNECT_INTERVAL: Final = 0.5

#: What a node tells ``ctl status`` about itself: names to scalars.
StatusProvider = Callable[[], Mapping[str, object]]
#: ``await handler(name, args)``: the value of a relayed control-plane query.
QueryHandler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class MembershipHandler(Protocol):
    """The node's callbacks (see the module docstring for what each must do)."""

    async def on_pre_scaling(self, membership: Membership) -> None: ...

    async def on_scaling(self, membership: Membership) -> None: ...

    async def on_normal(self, membership: Membership) -> None: ...

    async def on_abort(self, membership: Membership) -> None: ...

    async def on_leave(self, membership: Membership) -> None: ...

    async def on_repair(self, membership: Membership) -> None: ...


class Membership:
    """This node's standing in the cluster, kept current by the controller's commands.

    Created by :func:`join_cluster`; read its attributes from the callbacks and from the
    node.  The rings are rebuilt only when their members or epoch change.
    """

    def __init__(
        self,
        peer: Peer,
        *,
        name: str,
        address: str,
        handler: MembershipHandler,
        status_provider: StatusProvider | None,
        state: RingState,
        controller: str | None = None,
        secret: bytes = b"",
    ) -> None:
        #: This node's name and the address its peers reach it at.
        self.name = name
        self.address = address
        self._peer = peer
        #: Where to connect again when the controller connection ends (None: never).
        self._controller = controller
        self._secret = secret
        self._handler = handler
        self._status_provider = status_provider
        self._vnodes = state.vnodes
        self._side = MemberSide(state.epoch)
        self._rings: dict[tuple[int, tuple[tuple[str, str], ...]], HashRing] = {}
        #: The stage this node is in (as of the callback running or last run).
        self.stage = Stage.NORMAL
        #: The current ring in NORMAL, the previous one while scaling.
        self.ring = self._ring(state.epoch, state.members)
        #: The event's ring while PRE_SCALING or SCALING, else ``None``.
        self.next_ring: HashRing | None = None
        #: ``name -> address`` of every node of :attr:`ring` and :attr:`next_ring`.
        self.addresses: dict[str, str] = dict(state.members)
        self._commands_in, self._commands = trio.open_memory_channel[StageCommand](math.inf)
        self._admitted = trio.Event()
        self._left = trio.Event()
        self._disconnected = trio.Event()
        #: Set when the reader ends for good (left, refused, or no controller to go back to).
        self._ended = trio.Event()
        self._scaling_acked: int | None = None
        self._drained: DrainedReport | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[trio.Event, list[ScaleReply]]] = {}
        #: The nodes the last failure repair left out (see ``on_repair``).
        self.dead: frozenset[str] = frozenset()
        #: Seconds between heartbeats to the controller.
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        #: Answers relayed control-plane queries (``Query``): ``await handler(name, args)``
        #: gives the value; None: this member declines every query.  Labels it reports in
        #: its figures, e.g. ``{"nf": "prads"}``: a query for another target is declined.
        self.query_handler: QueryHandler | None = None
        self.labels: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None
        #: Error counters by name (``unexpected-*``, ``stale-scale-reply``, ``bug-*``;
        #: ``store.wire.errors.classify`` says whose fault each is).
        self.errors: dict[str, int] = {}

    # -- what the node reads ---------------------------------------------------------------

    @property
    def view(self) -> NodeView:
        """This node's :class:`~ring.ownership.NodeView`: what ``decide`` needs."""
        return NodeView(self.name, self.stage, self.ring, self.next_ring)

    @property
    def epoch(self) -> int:
        """The newest epoch this node knows of (the event's while scaling)."""
        return self.view.epoch

    @property
    def admitted(self) -> bool:
        """Whether this node has been a member of a ring (it stays true after leaving)."""
        return self._admitted.is_set()

    @property
    def left(self) -> bool:
        """Whether a scale-in removed this node and ``on_leave`` has run."""
        return self._left.is_set()

    @property
    def connected(self) -> bool:
        """Whether the connection to the controller is still up."""
        return not self._disconnected.is_set()

    async def wait_left(self) -> None:
        """Wait until ``on_leave`` has run (the controller removed this node)."""
        await self._left.wait()

    # -- what the node does ----------------------------------------------------------------

    async def report_drained(self, records_moved: int = 0, objects_moved: int = 0) -> None:
        """Tell the controller that this node's drain of the running event is complete:
        every record it had to hand on was handed on and acknowledged.  Call it once per
        event, while SCALING (``RuntimeError`` otherwise: a bug in the node)."""
        if self.stage is not Stage.SCALING or self.next_ring is None:
            raise RuntimeError(f"report_drained while {self.stage.value}: only SCALING drains")
        self._drained = DrainedReport(self.name, self.next_ring.epoch, records_moved, objects_moved)
        if self._scaling_acked == self.next_ring.epoch:
            self._send_drained()
        await trio.lowlevel.checkpoint()

    async def leave(self) -> Figures:
        """Ask the controller to scale this node in, and wait until it has left (the
        ``on_leave`` callback has run).  Returns the event's summary.  Raises
        :class:`ControllerRefused` (e.g. an event is running, or this is the last member)
        or :class:`ScalingAborted`; the node is still a member then and may retry."""
        reply = await self._ask(ScaleRequest(0, "in", [self.name]))
        if reply.code == "refused":
            raise ControllerRefused(reply.text)
        if not reply.ok:
            raise ScalingAborted(reply.text)
        await self._left.wait()
        return dict(reply.summary)

    # -- internals -------------------------------------------------------------------------

    def _ring(self, epoch: int, members: MemberList) -> HashRing:
        key = (epoch, tuple(members))
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) > 4:
                self._rings.clear()
            ring = HashRing((n for n, _ in members), vnodes=self._vnodes, epoch=epoch)
            self._rings[key] = ring
        return ring

    def _send(self, message: Message) -> None:
        try:
            self._peer.send_nowait(message)
        except PeerUnavailable:
            logger.info("controller gone: %s not sent", type(message).__name__)

    def _send_drained(self) -> None:
        if self._drained is not None:
            self._send(self._drained)

    async def _ask(self, request: ScaleRequest) -> ScaleReply:
        request_id = next(self._ids)
        done = trio.Event()
        slot: list[ScaleReply] = []
        self._replies[request_id] = (done, slot)
        try:
            self._send(ScaleRequest(request_id, request.kind, request.names))
            await _first_of(done, self._disconnected)
        finally:
            del self._replies[request_id]
        if not slot:
            raise PeerUnavailable("the controller went away before answering")
        return slot[0]

    def _enter(self, step: Callback, command: StageCommand) -> None:
        """Set the attributes the callback ``step`` will read."""
        if step is Callback.REPAIR:
            known = set(self.ring.nodes) | (self.next_ring.nodes if self.next_ring else set())
            self.dead = frozenset(known - {name for name, _ in command.members})
        self.ring = self._ring(command.epoch, command.members)
        self.addresses = dict(command.members)
        if step in (Callback.PRE_SCALING, Callback.SCALING):
            assert command.next_epoch is not None and command.next_members is not None
            self.next_ring = self._ring(command.next_epoch, command.next_members)
            self.addresses.update(command.next_members)
            self.stage = Stage.PRE_SCALING if step is Callback.PRE_SCALING else Stage.SCALING
        else:
            self.next_ring = None
            self.stage = Stage.NORMAL

    async def _work(self) -> None:
        """Run the commands one by one: callbacks first, then the acknowledgement."""
        async for command in self._commands:
            for step in self._side.plan(command):
                self._enter(step, command)
                if step is Callback.SCALING:
                    self._drained = None
                await getattr(self._handler, step.value)(self)
                if step is Callback.LEAVE:
                    self._left.set()
            self._send(StageAck(self.name, command.command, command.event_epoch))
            if command.kind is Stage.SCALING:
                self._scaling_acked = command.event_epoch
                if self._drained is not None and self._drained.epoch == command.event_epoch:
                    self._send_drained()
            if self.stage is Stage.NORMAL and self.name in self.ring:
                self._admitted.set()

    async def _heartbeat(self) -> None:
        """Tell the controller this node is alive, so that a silence means it is not."""
        while True:
            if not self._disconnected.is_set():
                self._send(Heartbeat(self.name, self.heartbeat_interval))
            await trio.sleep(self.heartbeat_interval)

    async def _read(self) -> None:
        """Take the controller's messages; answer status requests right away, even while
        a callback is running.  When the connection ends, connect again (every
        ``RECONNECT_INTERVAL``): a member, or a joiner in its own event, sends
        :class:`Resume` (the node keeps serving meanwhile, and a controller that restarted
        learns the ring back from the members); a node still waiting for admission
        registers again.  A controller that refuses (this node was declared dead) ends the
        membership with :class:`ControllerRefused`: the process may come back only as a
        new one."""
        try:
            await self._read_from(self._peer)
            while self._controller is not None and not self.left:
                await trio.sleep(RECONNECT_INTERVAL)
                host, port = parse_address(self._controller)
                waiting = not self.admitted and self.next_ring is None
                hello = Register(self.name, self.address) if waiting else self._resume_report()
                try:
                    async with connect_peer(
                        host, port, secret=self._secret, name=self.name, timeout=CONNECT_TIMEOUT
                    ) as peer:
                        with trio.fail_after(CONNECT_TIMEOUT):
                            peer.send_nowait(hello)
                            batch = await peer.receive()
                        state = batch[0]
                        if not isinstance(state, RingState):
                            raise ProtocolError(f"answered {type(state).__name__}, not RingState")
                        if not state.accepted:
                            if self._side.left:
                                # Told to leave before the controller went away: the ring
                                # it resumes no longer has this node; the leave goes on.
                                logger.info("%s: leaving, not resumed: %s", self.name, state.text)
                                return
                            raise ControllerRefused(
                                f"the controller refused {self.name}: {state.text}"
                            )
                        logger.info(
                            "%s: connected to the controller again: %s", self.name, state.text
                        )
                        self._peer = peer
                        self._disconnected = trio.Event()
                        for msg in batch[1:]:
                            self._take(msg)
                        await self._read_from(peer)
                except (PeerUnavailable, ProtocolError, trio.TooSlowError) as exc:
                    logger.debug("%s: the controller is still away: %s", self.name, exc)
        finally:
            self._disconnected.set()
            self._ended.set()
            self._commands_in.close()

    async def _read_from(self, peer: Peer) -> None:
        try:
            async for batch in peer:
                for msg in batch:
                    self._take(msg)
        except (PeerUnavailable, ProtocolError) as exc:
            logger.warning("%s: lost the controller: %s", self.name, exc)
        self._disconnected.set()

    def _resume_report(self) -> Resume:
        addresses = self.addresses
        next_ring = self.next_ring
        return Resume(
            self.name,
            self.address,
            self.stage.value,
            self.ring.epoch,
            [(n, addresses[n]) for n in sorted(self.ring.nodes)],
            None if next_ring is None else next_ring.epoch,
            None if next_ring is None else [(n, addresses[n]) for n in sorted(next_ring.nodes)],
        )

    def _take(self, msg: Message) -> None:
        """Handle one message from the controller; a failure is a bug of ours (the
        controller's faults are refused by :meth:`_dispatch`), logged with its traceback,
        counted, and re-raised only when ``S6_RAISE_BUGS=1``."""
        try:
            self._dispatch(msg)
        except Exception as exc:
            self._count(bug_counter(exc))
            logger.exception("%s: bug taking %s from the controller", self.name, type(msg).__name__)
            if raise_bugs():
                raise

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, StageCommand):
            self._commands_in.send_nowait(msg)
        elif isinstance(msg, StatusRequest):
            figures, failure = self._figures(msg.brief is True)
            self._send(NodeStatus(msg.request_id, self.name, figures))
            if failure is not None:
                raise failure  # answered all the same; reported as the bug it is by _take
        elif isinstance(msg, ScaleReply):
            waiting = self._replies.get(msg.request_id)
            if waiting is None:
                self._count("stale-scale-reply")
                logger.debug("%s: the answer to a request given up: %s", self.name, msg.text)
                return
            waiting[1].append(msg)
            waiting[0].set()
        elif isinstance(msg, ScaleProgress):
            logger.info("%s", msg.text)
        elif isinstance(msg, Query):
            if self._nursery is None:  # (not running yet: nothing can answer)
                self._answer(msg, False, True, None, "not running")
            else:
                self._nursery.start_soon(self._answer_query, msg)
        else:
            kind = type(msg).__name__
            self._count(f"unexpected-{kind}")
            logger.warning("%s: refused %s from the controller", self.name, kind)
            self._peer.refuse("unexpected", f"a member takes no {kind} from the controller")

    def _count(self, counter: str) -> None:
        self.errors[counter] = self.errors.get(counter, 0) + 1

    def _answer(self, msg: Query, ok: bool, declined: bool, value: Any, text: str) -> None:
        self._send(QueryAnswer(msg.request_id, self.name, self.epoch, ok, declined, value, text))

    async def _answer_query(self, msg: Query) -> None:
        """Answer a relayed query with the handler's value, or say why not: declined when
        this member serves no such target, an error line when the handler raised (its
        fault is the application's: the member keeps serving) or its value cannot travel."""
        handler = self.query_handler
        target = self.labels.get("nf", "")
        if handler is None or (msg.target and msg.target != target):
            self._answer(msg, False, True, None, f"{self.name} runs {target or 'no application'}")
            return
        try:
            value = await handler(msg.name, dict(msg.args))
        except Exception as exc:
            self._answer(msg, False, False, None, f"{type(exc).__name__}: {exc}"[:500])
            return
        try:
            encode_value(value, f"the answer to {msg.name!r}")
        except StoreError as exc:
            self._answer(msg, False, False, None, str(exc)[:500])
            return
        self._answer(msg, True, False, value, "")

    def _figures(self, brief: bool = False) -> tuple[Figures, Exception | None]:
        """This node's figures for ``ctl status``, and the status provider's exception if
        it failed (a bug of the node: the figures then say so, and the caller reports it).
        ``brief``: the stage, the epoch and the labels only."""
        figures: Figures = {"stage": self.stage.value, "epoch": self.epoch}
        if self._status_provider is not None and not brief:
            try:
                provided = self._status_provider()
            except Exception as exc:
                figures["error"] = f"status provider failed: {exc!r}"[:200]
                return figures, exc
            for key, value in provided.items():
                # Only exact int/float/str travel (a bool is not an int on the wire).
                ok = type(value) in (int, float, str)
                figures[str(key)] = value if ok else str(value)  # type: ignore[assignment]
        figures.update(self.labels)
        return figures, None


async def _register(peer: Peer, name: str, address: str) -> tuple[RingState, list[Message]]:
    """Register; the controller's RingState, and what came with it in the same frame (the
    first stage command, when admission is immediate)."""
    peer.send_nowait(Register(name, address))
    batch = await peer.receive()
    state = batch[0]
    if not isinstance(state, RingState):
        raise ProtocolError(f"the controller answered {type(state).__name__}, not RingState")
    if not state.accepted:
        raise ControllerRefused(f"the controller refused {name}: {state.text}")
    return state, batch[1:]


@asynccontextmanager
async def join_cluster(
    controller: str,
    *,
    name: str,
    address: str,
    secret: bytes,
    handler: MembershipHandler,
    status_provider: StatusProvider | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    admission_timeout: float | None = None,
    labels: Mapping[str, str] | None = None,
    query_handler: QueryHandler | None = None,
) -> AsyncIterator[Membership]:
    """Join the cluster whose controller listens at ``controller`` (``HOST:PORT``).

    Returns once this node is a member of a ring (``on_normal`` has run), yielding its
    :class:`Membership`; the callbacks of ``handler`` may run before that (a joiner takes
    part in its own admission event).  ``address`` is where the other nodes reach this
    one.  ``status_provider`` (optional) returns the figures ``ctl status`` shows;
    ``labels`` are added to them (what the member runs, e.g. ``{"nf": "prads", "data":
    "127.0.0.1:9001"}``: a traffic sender finds the NF instances by them);
    ``query_handler`` answers the control-plane queries the controller relays.

    Raises :class:`PeerUnavailable` if the controller cannot be reached within
    ``connect_timeout`` seconds (once registered, a node whose controller goes away before
    admitting it registers again with it when it is back), :class:`ControllerRefused`
    if it refuses the registration (name in use, bad address), ``TimeoutError`` if
    ``admission_timeout`` is given and passes first, and ``ValueError`` for a malformed
    ``controller`` address.
    """
    host, port = parse_address(controller)
    parse_address(address)
    unreachable = f"cannot reach the controller at {controller} within {connect_timeout:g} s"
    registered = False
    # connect_peer's own timeout does not cover a listener that accepts the connection and
    # never answers, so this scope carries the deadline, and it is lifted once registered.
    # It spans the whole block: a scope around the connection alone would be exited before
    # connect_peer's nursery, which trio forbids.
    with trio.CancelScope(deadline=trio.current_time() + connect_timeout) as connecting:
        try:
            async with connect_peer(
                host, port, secret=secret, name=name, timeout=connect_timeout
            ) as peer:
                state, rest = await _register(peer, name, address)
                registered = True
                connecting.deadline = math.inf
                membership = Membership(
                    peer,
                    name=name,
                    address=address,
                    handler=handler,
                    status_provider=status_provider,
                    state=state,
                    controller=controller,
                    secret=secret,
                )
                membership.labels = dict(labels or {})
                membership.query_handler = query_handler
                for msg in rest:
                    membership._take(msg)
                async with _running(membership, controller, admission_timeout):
                    yield membership
        except PeerUnavailable as exc:
            if registered:
                raise
            raise PeerUnavailable(f"{unreachable}: {describe_failure(exc)}") from None
    if connecting.cancelled_caught:
        raise PeerUnavailable(f"{unreachable}: it accepted the connection but never answered")


@asynccontextmanager
async def _running(
    membership: Membership, controller: str, admission_timeout: float | None
) -> AsyncIterator[None]:
    """The membership's reader and worker tasks, for the duration of the block; enters
    once the node is admitted."""
    try:
        async with trio.open_nursery() as nursery:
            membership._nursery = nursery
            nursery.start_soon(membership._read)
            nursery.start_soon(membership._work)
            nursery.start_soon(membership._heartbeat)
            await _wait_admitted(membership, controller, admission_timeout)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader and the worker run beside the caller's block: the caller sees the
        # one exception that matters, not the nursery's group around it.
        reraise_single(group)


async def _first_of(*events: trio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def until(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(until, event)


async def _wait_admitted(membership: Membership, controller: str, timeout: float | None) -> None:
    """Until the node is a member, the membership ends, or ``timeout`` passes.  A dropped
    controller connection is not an end: the node registers again, with the controller
    restarted on its address."""
    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
        await _first_of(membership._admitted, membership._ended)
    if membership.admitted:
        return
    if scope.cancelled_caught:
        raise TimeoutError(f"{membership.name} was not admitted within {timeout:g} s")
    raise PeerUnavailable(
        f"{membership.name} stopped following the controller at {controller} before it was admitted"
    )
