"""The controller process: the membership authority of a cluster, over ``store.shell.transport``.

Run it with ``python -m store.controller --listen HOST:PORT``; its first line on stdout is
``listening on HOST:PORT`` with the port actually bound (useful with port 0).  Nodes join it
with :func:`store.shell.membership.join_cluster`; operators use ``python -m store.ctl``.  Tests and
benchmarks run it in-process with :func:`open_controller`.

All decisions are made by the pure :class:`~store.core.barrier.Barrier`; this module is the
shell around it, as trio shells are around every pure core of the store (the core decides
and never waits; the shell waits, does the I/O and reads the clock): it accepts
authenticated peers, turns what they send into stimuli, carries out the effects, and reads
the clock.  One timer task sleeps until :meth:`Barrier.next_deadline` (pre-scaling
timeouts, admission windows) and is woken whenever a stimulus may have moved that deadline,
so nothing polls.

Sessions are told apart by their first message: :class:`Register` opens a member session,
anything else is an operator session (``ctl``).  A member's session lasts as long as its
connection; when it ends the barrier hears :meth:`Barrier.member_gone`.

Whose fault is what (``store.wire.errors``).  Every session's peer has authenticated
already, so a message the controller will not take is refused and the session goes on: one
of a kind that session never takes (a second Register, a member's message from ``ctl``) is
answered with an ``Error``, counted as ``unexpected-<Message>`` and logged; one whose fields
contradict the session (an acknowledgement in another member's name) likewise, as
``malformed-<Message>``.  A late answer (figures for a status round that is over, an
acknowledgement of an event that ended) is a race: counted as ``stale-*`` and ignored.  A
message whose handling fails otherwise has met a bug of ours: logged with its traceback and
counted as ``bug-<ExceptionType>``, and the session goes on, unless ``S6_RAISE_BUGS=1``
asks for the bug to surface.  :attr:`Controller.errors` has the counts.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, NoReturn

import trio

from ring.hashring import DEFAULT_VNODES
from ring.ownership import Stage
from store.core.barrier import (
    DEFAULT_ADMISSION_WINDOW,
    DEFAULT_FAILURE_TIMEOUT,
    DEFAULT_LEAVE_TIMEOUT,
    DEFAULT_PRE_SCALING_TIMEOUT,
    Barrier,
    Disconnect,
    Effect,
    Log,
    Progress,
    Reply,
    Send,
    Transition,
)
from store.shell.transport import Peer, PeerServer, WireStatistics, serve_peers
from store.wire.control import (
    ClusterStatus,
    ControllerRefused,
    DrainedReport,
    Figures,
    Heartbeat,
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
    StatusRequest,
    describe_failure,
    format_address,
    parse_address,
)
from store.wire.errors import (
    PeerUnavailable,
    ProtocolError,
    bug_counter,
    raise_bugs,
    reraise_single,
)
from store.wire.messages import Message

__all__ = [
    "CONTROLLER_NAME",
    "DEV_SECRET",
    "Controller",
    "ScaleResult",
    "open_controller",
    "read_secret",
]

logger = logging.getLogger("store.controller")

#: The name the controller proves in the transport handshake.
CONTROLLER_NAME: Final = "controller"

#: The secret used when no ``--secret-file`` is given: for a development machine only, and
#: announced with a warning, because anyone who reads this file can join such a cluster.
DEV_SECRET: Final = b"s6 development secret: not for production"

#: How long :meth:`Controller.collect_status` waits for the members' figures.
STATUS_TIMEOUT: Final = 1.0
#: How long a relayed query waits for a scaling event to end, and for each member's answer.
QUERY_WAIT: Final = 30.0
QUERY_TIMEOUT: Final = 10.0
#: Seconds a query waits for the ring's members to be connected (after a restart of the
#: controller they reconnect within a second or two), before it asks those that are.
RESUME_WAIT: Final = 3.0


def read_secret(path: str | None) -> tuple[bytes, bool]:
    """The cluster secret from ``path`` (trailing newline removed), or :data:`DEV_SECRET`
    when ``path`` is ``None``; the flag says whether the development secret was used.

    Raises ``ValueError`` with a one-line reason for an unreadable or empty file.
    """
    if path is None:
        return DEV_SECRET, True
    try:
        secret = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read the secret file {path}: {describe_failure(exc)}") from None
    if not secret:
        raise ValueError(f"the secret file {path} is empty")
    return secret, False


@dataclass(frozen=True, slots=True)
class ScaleResult:
    """A finished scaling event, as :meth:`Controller.scale_out`/``scale_in`` report it:
    the final text, the summary (epoch, duration, records and objects moved) and the
    progress lines in order."""

    text: str
    summary: Figures
    progress: tuple[str, ...]


@dataclass
class _Waiter:
    """An in-process request waiting for its reply."""

    done: trio.Event = field(default_factory=trio.Event)
    reply: Reply | None = None
    progress: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Remote:
    """A request that came over a connection: where its answers go, under which id."""

    peer: Peer
    request_id: int


@dataclass
class _StatusRound:
    """One collection of member figures."""

    expected: set[str]
    figures: dict[str, Figures] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)


class Controller:
    """A running controller.  Get one from :func:`open_controller`.

    Everything here runs in the trio thread that opened it; the barrier is only ever touched
    from there, so there are no locks.
    """

    def __init__(self, barrier: Barrier, address: str, server: PeerServer | None = None) -> None:
        #: The pure state machine (read it freely; never call its stimuli from outside).
        self.barrier = barrier
        #: ``HOST:PORT`` the controller listens on, with the port actually bound.
        self.address = address
        self._server = server
        self._sessions: dict[str, Peer] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._requests: dict[int, _Waiter | _Remote] = {}
        self._rounds: dict[int, _StatusRound] = {}
        self._queries: dict[int, tuple[trio.Event, list[QueryAnswer]]] = {}
        self._ids = itertools.count(1)
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._errors: dict[str, int] = {}

    # -- the public API --------------------------------------------------------------------

    @property
    def errors(self) -> dict[str, int]:
        """Error counters by name (``store.wire.errors.classify`` says whose fault each is):
        the sessions' (``unexpected-*``, ``malformed-*``, ``stale-node-status``, ``bug-*``)
        and the barrier's (``stale-ack``, ``stale-drained``).  A new dict each time."""
        return {**self.barrier.errors, **self._errors}

    @property
    def log(self) -> list[Transition]:
        """Every decision so far (see :func:`store.core.barrier.check_transitions`)."""
        return self.barrier.log

    def wire_statistics(self) -> WireStatistics:
        """The transport's counters over every connection the controller accepted (bad
        frames, failed handshakes, bugs in a session...)."""
        if self._server is None:
            return WireStatistics()
        return self._server.statistics()

    def status(self) -> ClusterStatus:
        """The controller's view of the cluster, without asking the members for figures."""
        return self.barrier.cluster_status(0, trio.current_time())

    async def collect_status(self, timeout: float = STATUS_TIMEOUT) -> ClusterStatus:
        """:meth:`status` plus each connected member's figures (``{"error": ...}`` for a
        member that does not answer within ``timeout`` seconds)."""
        figures = await self._gather_figures(timeout)
        return self.barrier.cluster_status(0, trio.current_time(), figures)

    async def scale_out(self, names: Sequence[str] | None = None) -> ScaleResult:
        """Admit ``names`` (every waiting node when ``None``) and wait until every node is
        NORMAL on the new epoch.  Raises :class:`ControllerRefused` if the request is
        refused (another event runs, unknown node...) and :class:`ScalingAborted` if the
        event aborts."""
        return await self._request(
            lambda rid: self.barrier.request_scale_out(names, trio.current_time(), rid)
        )

    async def scale_in(self, names: Sequence[str]) -> ScaleResult:
        """Remove ``names``: they drain, every node goes NORMAL on the new epoch, and they
        are told to leave; returns once they have left.  Raises like :meth:`scale_out`."""
        if isinstance(names, str):
            raise TypeError("scale_in takes a list of node names, not a single str")
        return await self._request(
            lambda rid: self.barrier.request_scale_in(list(names), trio.current_time(), rid)
        )

    async def wait_until(self, predicate: Callable[[Barrier], bool]) -> None:
        """Wait until ``predicate(barrier)`` holds (checked after every stimulus).  Tests use
        it to wait for registrations without sleeping; put it under a deadline."""
        while not predicate(self.barrier):
            await self._changed.wait()

    # -- requests --------------------------------------------------------------------------

    async def _request(self, start: Callable[[int], list[Effect]]) -> ScaleResult:
        request_id = next(self._ids)
        waiter = _Waiter()
        self._requests[request_id] = waiter
        try:
            self._stimulus(start(request_id))
            await waiter.done.wait()
        finally:
            self._requests.pop(request_id, None)
        reply = waiter.reply
        assert reply is not None
        if reply.code == "refused":
            raise ControllerRefused(reply.text)
        if not reply.ok:
            raise ScalingAborted(reply.text)
        return ScaleResult(reply.text, dict(reply.summary), tuple(waiter.progress))

    # -- effects ---------------------------------------------------------------------------

    def _stimulus(self, effects: list[Effect]) -> None:
        """Carry out a stimulus's effects and let the timer and waiters re-check."""
        self._apply(effects)
        self._wake.set()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self._send(self._sessions.get(effect.to), effect.message)
            elif isinstance(effect, Progress):
                target = self._requests.get(effect.request_id)
                if isinstance(target, _Waiter):
                    target.progress.append(effect.text)
                elif isinstance(target, _Remote):
                    self._send(target.peer, ScaleProgress(target.request_id, effect.text))
            elif isinstance(effect, Reply):
                target = self._requests.pop(effect.request_id, None)
                if isinstance(target, _Waiter):
                    target.reply = effect
                    target.done.set()
                elif isinstance(target, _Remote):
                    self._send(
                        target.peer,
                        ScaleReply(
                            target.request_id, effect.ok, effect.code, effect.text, effect.summary
                        ),
                    )
            elif isinstance(effect, Log):
                logger.log(logging.getLevelName(effect.level), "%s", effect.text)
            elif isinstance(effect, Disconnect):
                scope = self._scopes.pop(effect.to, None)
                if scope is not None:
                    scope.cancel()  # its session ends; it may come back as a new process

    @staticmethod
    def _send(peer: Peer | None, message: Message) -> None:
        # A member that went away is reported to the barrier by its session's end; what was
        # meant for it is dropped here, as on any broken link.
        if peer is None or peer.closed:
            return
        try:
            peer.send_nowait(message)
        except PeerUnavailable:
            pass

    # -- tasks -----------------------------------------------------------------------------

    async def _timer(self) -> NoReturn:
        """Tick the barrier at its deadlines.  Woken after every stimulus, because a
        stimulus may have started an event (a new pre-scaling deadline) or a window."""
        while True:
            self._wake = trio.Event()
            deadline = self.barrier.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wake.wait()
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                self._stimulus(self.barrier.tick(now))

    async def _serve(self, peer: Peer) -> None:
        """One connection: a member (first message Register) or an operator."""
        try:
            first = await peer.receive()
        except PeerUnavailable:
            return
        try:
            if isinstance(first[0], Register | Resume):
                await self._member_session(peer, first[0], first[1:])
            else:
                await self._operator_session(peer, first)
        finally:
            for request_id, target in list(self._requests.items()):
                if isinstance(target, _Remote) and target.peer is peer:
                    del self._requests[request_id]  # the event goes on; nobody listens

    async def _member_session(
        self, peer: Peer, register: Register | Resume, rest: list[Message]
    ) -> None:
        name = register.name
        if name != peer.name:
            peer.send_nowait(
                RingState(
                    False,
                    f"registered as {name!r} but authenticated as {peer.name!r}",
                    self.barrier.epoch,
                    [],
                    "",
                    None,
                    None,
                    self.barrier.vnodes,
                )
            )
            return
        now = trio.current_time()
        if isinstance(register, Resume):
            state, effects = self.barrier.resume(register, now)
        else:
            state, effects = self.barrier.register(name, register.address, now)
        peer.send_nowait(state)  # before any stage command the effects may hold
        if not state.accepted:
            logger.warning("refused registration of %s: %s", name, state.text)
            return
        self._sessions[name] = peer
        scope = self._scopes[name] = trio.CancelScope()
        try:
            with scope:
                self._stimulus(effects)
                await self._session(peer, rest, partial(self._member_message, name))
        except (PeerUnavailable, ProtocolError) as exc:
            logger.info("connection with %s ended: %s", name, exc)
        finally:
            if self._scopes.get(name) is scope:
                del self._scopes[name]
            if self._sessions.get(name) is peer:
                del self._sessions[name]
                self._stimulus(self.barrier.member_gone(name, trio.current_time()))
        if scope.cancelled_caught:
            with trio.move_on_after(1.0):
                await peer.aclose()

    async def _operator_session(self, peer: Peer, first: list[Message]) -> None:
        try:
            await self._session(peer, first, self._operator_message)
        except (PeerUnavailable, ProtocolError) as exc:
            logger.debug("operator %s went away: %s", peer.name, exc)

    async def _session(
        self,
        peer: Peer,
        first: list[Message],
        take: Callable[[trio.Nursery, Peer, Message], None],
    ) -> None:
        """Hand ``first``, then every message ``peer`` sends, to ``take`` until the
        connection ends; what ``take`` starts (status answers) runs in the session's nursery.

        The end of the connection comes out as itself (:class:`PeerUnavailable`,
        :class:`ProtocolError`), not inside the nursery's exception group: a member whose
        connection breaks must end its session, not the controller.
        """
        try:
            async with trio.open_nursery() as nursery:
                for msg in first:
                    self._take(take, nursery, peer, msg)
                async for batch in peer:
                    for msg in batch:
                        self._take(take, nursery, peer, msg)
        except BaseExceptionGroup as group:
            reraise_single(group)

    def _take(
        self,
        take: Callable[[trio.Nursery, Peer, Message], None],
        nursery: trio.Nursery,
        peer: Peer,
        msg: Message,
    ) -> None:
        """``take(nursery, peer, msg)``; a failure there is a bug of ours (the peer's faults
        are refused by ``take`` itself), logged, counted, and re-raised only in tests."""
        try:
            take(nursery, peer, msg)
        except (PeerUnavailable, ProtocolError):
            raise  # the connection's end (not raised by today's handlers), not a bug
        except Exception as exc:
            self._count(bug_counter(exc))
            logger.exception("bug taking %s from %s", type(msg).__name__, peer.name)
            if raise_bugs():
                raise

    def _member_message(self, name: str, nursery: trio.Nursery, peer: Peer, msg: Message) -> None:
        if isinstance(msg, StageAck | DrainedReport | NodeStatus) and msg.name != name:
            self._refuse(
                peer, "malformed", msg, f"{type(msg).__name__} in the name of {msg.name!r}"
            )
            return
        now = trio.current_time()
        self.barrier.heard(name, now)
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, StageAck):
            self._stimulus(self.barrier.ack(name, msg.kind, msg.epoch, now))
        elif isinstance(msg, DrainedReport):
            self._stimulus(
                self.barrier.report_drained(
                    name, msg.epoch, msg.records_moved, msg.objects_moved, now
                )
            )
        elif isinstance(msg, NodeStatus):
            status_round = self._rounds.get(msg.request_id)
            if status_round is None:
                self._count("stale-node-status")
                logger.debug("%s's figures came after their status round ended", name)
                return
            status_round.figures[name] = dict(msg.figures)
            status_round.expected.discard(name)
            if not status_round.expected:
                status_round.done.set()
        elif isinstance(msg, QueryAnswer):
            waiting = self._queries.get(msg.request_id)
            if waiting is None or msg.member != name:
                self._count("stale-query-answer")
                return
            waiting[1].append(msg)
            waiting[0].set()
        else:
            self._operator_message(nursery, peer, msg)

    def _operator_message(self, nursery: trio.Nursery, peer: Peer, msg: Message) -> None:
        if isinstance(msg, StatusRequest):
            nursery.start_soon(self._answer_status, peer, msg.request_id, msg.brief is True)
        elif isinstance(msg, Query):
            nursery.start_soon(self._relay_query, peer, msg)
        elif isinstance(msg, ScaleRequest):
            request_id = next(self._ids)
            self._requests[request_id] = _Remote(peer, msg.request_id)
            now = trio.current_time()
            logger.info("%s asks to scale %s %s", peer.name, msg.kind, msg.names or "(waiting)")
            if msg.kind == "out":
                effects = self.barrier.request_scale_out(msg.names, now, request_id)
            else:
                effects = self.barrier.request_scale_in(msg.names, now, request_id)
            self._stimulus(effects)
        else:
            self._refuse(
                peer,
                "unexpected",
                msg,
                f"the controller takes no {type(msg).__name__} in this session",
            )

    def _refuse(self, peer: Peer, code: str, msg: Message, text: str) -> None:
        """The peer's fault: count ``<code>-<Message>``, log it, answer with an Error."""
        self._count(f"{code}-{type(msg).__name__}")
        logger.warning("refused %s from %s: %s", type(msg).__name__, peer.name, text)
        peer.refuse(code, text)

    def _count(self, counter: str) -> None:
        self._errors[counter] = self._errors.get(counter, 0) + 1

    async def _answer_status(self, peer: Peer, request_id: int, brief: bool) -> None:
        figures = await self._gather_figures(STATUS_TIMEOUT, brief)
        self._send(peer, self.barrier.cluster_status(request_id, trio.current_time(), figures))

    async def _relay_query(self, peer: Peer, query: Query) -> None:
        """Relay an operator's query to one member, as the paper's controller relays
        control-plane queries: once the cluster is NORMAL (waiting at most ``QUERY_WAIT``
        seconds for a running event to end), to each connected member of the ring in turn
        until one that runs ``query.target`` answers; the answer goes back as it came."""
        barrier = self.barrier

        def answer(ok: bool, value: Any, text: str, member: str = "", epoch: int = 0) -> None:
            epoch = epoch or barrier.ring.epoch
            self._send(peer, QueryAnswer(query.request_id, member, epoch, ok, False, value, text))

        with trio.move_on_after(QUERY_WAIT):
            await self.wait_until(lambda b: b.cluster_stage() is Stage.NORMAL)
        if barrier.cluster_stage() is not Stage.NORMAL:
            answer(False, None, f"the cluster stayed in a scaling event for {QUERY_WAIT:g} s")
            return
        # A controller that has just started (again) learns the ring back from the members
        # as they reconnect: wait a little for them rather than answer that nobody is there.
        with trio.move_on_after(RESUME_WAIT):
            await self.wait_until(
                lambda b: len(b.ring) > 0 and all(n in self._sessions for n in b.ring.nodes)
            )
        asked = 0
        for name in sorted(barrier.ring.nodes):
            session = self._sessions.get(name)
            if session is None:
                continue
            request_id = next(self._ids)
            arrived = trio.Event()
            slot: list[QueryAnswer] = []
            self._queries[request_id] = (arrived, slot)
            try:
                self._send(session, Query(request_id, query.target, query.name, query.args))
                with trio.move_on_after(QUERY_TIMEOUT):
                    await arrived.wait()
            finally:
                del self._queries[request_id]
            asked += 1
            if not slot:
                logger.warning("%s did not answer a query within %g s", name, QUERY_TIMEOUT)
                continue
            got = slot[0]
            if got.declined:
                continue
            answer(got.ok, got.value, got.text, got.member, got.epoch)
            return
        what = query.target or "queries"
        answer(False, None, f"no member answers {what} (asked {asked} of {len(barrier.ring)})")

    async def _gather_figures(self, timeout: float, brief: bool = False) -> dict[str, Figures]:
        round_id = next(self._ids)
        status_round = _StatusRound(set(self._sessions))
        self._rounds[round_id] = status_round
        try:
            for name in sorted(status_round.expected):
                self._send(self._sessions.get(name), StatusRequest(round_id, brief))
            if status_round.expected:
                with trio.move_on_after(timeout):
                    await status_round.done.wait()
            for name in status_round.expected:
                status_round.figures[name] = {"error": f"no answer within {timeout:g} s"}
            return status_round.figures
        finally:
            del self._rounds[round_id]


@asynccontextmanager
async def open_controller(
    listen: str = "127.0.0.1:0",
    *,
    secret: bytes,
    manual_admission: bool = False,
    pre_scaling_timeout: float = DEFAULT_PRE_SCALING_TIMEOUT,
    admission_window: float = DEFAULT_ADMISSION_WINDOW,
    leave_timeout: float = DEFAULT_LEAVE_TIMEOUT,
    vnodes: int = DEFAULT_VNODES,
    failure_timeout: float | None = DEFAULT_FAILURE_TIMEOUT,
) -> AsyncIterator[Controller]:
    """Run a controller listening on ``listen`` for the duration of the block.

    ``async with open_controller(secret=...) as ctl:`` then ``ctl.address`` is where nodes
    and ``ctl`` connect.  ``vnodes`` is the ring's virtual node count, sent to every member
    so that all build identical rings.  ``failure_timeout``: seconds of silence after which
    a member is declared dead and the ring repaired without it (None: never).  Raises
    ``ValueError`` for a bad ``listen`` and
    ``OSError`` when the address cannot be bound.
    """
    host, port = parse_address(listen)
    barrier = Barrier(
        vnodes=vnodes,
        manual_admission=manual_admission,
        pre_scaling_timeout=pre_scaling_timeout,
        admission_window=admission_window,
        leave_timeout=leave_timeout,
        failure_timeout=failure_timeout,
    )
    controller: Controller | None = None

    async def serve(peer: Peer) -> None:
        assert controller is not None
        await controller._serve(peer)

    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_peers, serve, host, port, secret=secret, name=CONTROLLER_NAME)
            )
            controller = Controller(barrier, format_address(host, server.port), server)
            nursery.start_soon(controller._timer)
            logger.info("listening on %s", controller.address)
            try:
                yield controller
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The server and the timer run beside the caller's block (and a bind error comes
        # wrapped twice): the caller sees the one exception that matters.
        reraise_single(group)
