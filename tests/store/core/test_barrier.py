"""The controller's pure state machine: the barrier rules, aborts, admission, lost members.

The Hypothesis state machine at the end drives a :class:`Barrier` with simulated nodes that
run the real node-side logic (:class:`MemberSide`).  Every message between a node and the
controller waits in a per-direction queue, so Hypothesis chooses which one arrives next,
when callbacks "return", when drains finish, when connections drop and how much time passes.
After every step the controller's invariants hold, its log replays without a breach, and the
simulated nodes' *actual* stages never put NORMAL on the old epoch next to SCALING; at the end,
with faults stopped, everything converges and every request got exactly one answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ring.ownership import Stage
from store.core.barrier import (
    Barrier,
    Callback,
    Effect,
    MemberSide,
    Progress,
    Reply,
    Role,
    Send,
    Transition,
    check_transitions,
)
from store.wire.control import Command, Order, StageCommand, command_named
from tests.sim.settings import simulation_settings

VNODES = 4  # small rings: the barrier does not care about balance, and tests stay fast


def addr(name: str) -> str:
    return f"127.0.0.1:{7000 + sum(map(ord, name))}"


def sends(effects: list[Effect]) -> list[tuple[str, Command, int]]:
    """``(to, command, event epoch)`` of every stage command sent."""
    return [
        (e.to, e.message.kind, e.message.event_epoch)
        for e in effects
        if isinstance(e, Send) and isinstance(e.message, StageCommand)
    ]


def replies(effects: list[Effect]) -> list[Reply]:
    return [e for e in effects if isinstance(e, Reply)]


def formed(names: str = "abc", **options: float | bool) -> Barrier:
    """A barrier whose first ring (epoch 1) holds ``names``, admitted by hand."""
    b = Barrier(vnodes=VNODES, manual_admission=True, **options)  # type: ignore[arg-type]
    for n in names:
        b.register(n, addr(n), 0.0)
    b.request_scale_out(None, 0.0, 1)
    for n in names:
        b.ack(n, Stage.NORMAL, 1, 0.0)
    b.validate()
    assert b.epoch == 1 and b.event is None
    return b


def run_event(
    b: Barrier, names: list[str], now: float, drained: tuple[int, int] = (0, 0)
) -> list[Effect]:
    """Every participant acks pre-scaling, reports drained and acks normal; returns effects."""
    event = b.event
    assert event is not None
    out: list[Effect] = []
    for n in names:
        out += b.ack(n, Stage.PRE_SCALING, event.epoch, now)
        b.validate()
    for n in names:
        out += b.ack(n, Stage.SCALING, event.epoch, now)
        out += b.report_drained(n, event.epoch, *drained, now)
        b.validate()
    for n in names:
        out += b.ack(n, Stage.NORMAL, event.epoch, now)
        b.validate()
    return out


# --- examples -----------------------------------------------------------------------------


def test_first_ring_forms_at_epoch_1_without_a_barrier() -> None:
    b = Barrier(vnodes=VNODES, manual_admission=True)
    for n in "abc":
        state, effects = b.register(n, addr(n), 0.0)
        assert state.accepted and state.epoch == 0 and state.members == []
        assert not sends(effects)  # manual admission: they wait
    assert b.waiting() == ["a", "b", "c"]
    effects = b.request_scale_out(None, 1.0, 5)
    assert sends(effects) == [
        ("a", Stage.NORMAL, 1),
        ("b", Stage.NORMAL, 1),
        ("c", Stage.NORMAL, 1),
    ]
    assert b.event is not None and b.event.kind == "form"
    for n in "ab":
        assert not replies(b.ack(n, Stage.NORMAL, 1, 1.5))
    [reply] = replies(b.ack("c", Stage.NORMAL, 1, 2.0))
    assert reply.ok and reply.code == "done" and reply.summary["epoch"] == 1
    assert reply.summary["duration_s"] == 1.0
    assert b.epoch == 1 and set(b.ring.nodes) == {"a", "b", "c"}
    assert b.ring.vnodes == VNODES
    assert check_transitions(b.log) == []
    b.validate()


def test_scale_out_walks_the_barrier_in_order() -> None:
    b = formed()
    b.register("d", addr("d"), 1.0)
    effects = b.request_scale_out(["d"], 1.0, 7)
    assert sends(effects) == [(n, Stage.PRE_SCALING, 2) for n in "abcd"]
    # Three of four acks: nobody is told SCALING yet.
    for n in "abc":
        assert not sends(b.ack(n, Stage.PRE_SCALING, 2, 1.1))
    assert b.event is not None and b.event.phase is Stage.PRE_SCALING
    effects = b.ack("d", Stage.PRE_SCALING, 2, 1.2)
    assert sends(effects) == [(n, Stage.SCALING, 2) for n in "abcd"]
    for n in "abc":
        b.ack(n, Stage.SCALING, 2, 1.3)
        assert not sends(b.report_drained(n, 2, 10, 1, 1.3))
    # d's report arrives before its SCALING ack: a report implies it is scaling.
    effects = b.report_drained("d", 2, 0, 0, 1.4)
    assert sends(effects) == [(n, Stage.NORMAL, 2) for n in "abcd"]
    progress = [e.text for e in effects if isinstance(e, Progress)]
    assert any("d drained" in t for t in progress)
    b.ack("d", Stage.SCALING, 2, 1.4)  # late, harmless
    for n in "abc":
        assert not replies(b.ack(n, Stage.NORMAL, 2, 1.5))
    [reply] = replies(b.ack("d", Stage.NORMAL, 2, 1.6))
    assert reply.ok and reply.summary["records_moved"] == 30 and reply.summary["objects_moved"] == 3
    assert b.epoch == 2 and set(b.ring.nodes) == set("abcd")
    assert check_transitions(b.log) == []


def test_scale_in_tells_removed_nodes_to_leave_and_replies_once_they_left() -> None:
    b = formed("abcd")
    effects = b.request_scale_in(["c"], 1.0, 3)
    assert sends(effects) == [(n, Stage.PRE_SCALING, 2) for n in "abcd"]
    out = run_event(b, list("abcd"), 2.0, drained=(5, 2))
    assert ("c", Order.LEAVE, 2) in sends(out)
    assert not replies(out)  # waits for c to leave
    assert b.role_of("c") is Role.LEAVING and set(b.ring.nodes) == set("abd")
    [reply] = replies(b.ack("c", Order.LEAVE, 2, 2.5))
    assert reply.ok and reply.summary["removed"] == "c" and reply.summary["records_moved"] == 20
    assert b.role_of("c") is None
    assert check_transitions(b.log) == []


def test_a_leaver_that_never_answers_is_let_go_after_the_leave_timeout() -> None:
    b = formed("abc", leave_timeout=3.0)
    b.request_scale_in(["b"], 1.0, 3)
    run_event(b, list("abc"), 2.0)
    assert b.next_deadline() == 5.0
    assert not replies(b.tick(4.9))
    [reply] = replies(b.tick(5.0))
    assert reply.ok and b.role_of("b") is None


def test_refusals_say_why() -> None:
    b = formed()
    [r] = replies(b.request_scale_in(["zz"], 1.0, 1))
    assert r.code == "refused" and "unknown node 'zz'" in r.text and "a, b, c" in r.text
    [r] = replies(b.request_scale_in(["a", "b", "c"], 1.0, 2))
    assert "ring would be empty" in r.text
    [r] = replies(b.request_scale_out(None, 1.0, 3))
    assert r.text == "no node is waiting for admission"
    [r] = replies(b.request_scale_out(["a"], 1.0, 4))
    assert r.text == "a is already a member"
    b.register("d", addr("d"), 1.0)
    b.request_scale_out(["d"], 1.0, 5)
    for request in (b.request_scale_out(None, 1.1, 6), b.request_scale_in(["a"], 1.1, 7)):
        [r] = replies(request)
        assert not r.ok and r.code == "refused"
        assert r.text.startswith("a scaling event is already running: scale-out to epoch 2")
        assert "pre-scaling, waiting for a, b, c, d" in r.text
    assert b.event is not None and b.event.request_id == 5  # untouched
    b.validate()


def test_registration_refusals() -> None:
    b = formed()
    state, _ = b.register("a", "127.0.0.1:1", 1.0)
    assert not state.accepted and "already used by a connected node" in state.text
    state, _ = b.register("x", "no-port", 1.0)
    assert not state.accepted and "HOST:PORT" in state.text
    b.member_gone("a", 2.0)
    state, _ = b.register("a", "127.0.0.1:1", 3.0)
    assert not state.accepted and "same address" in state.text
    assert b.role_of("x") is None


def test_pre_scaling_timeout_aborts_burns_the_epoch_and_a_later_event_succeeds() -> None:
    b = formed(pre_scaling_timeout=5.0)
    b.register("d", addr("d"), 10.0)
    b.request_scale_out(["d"], 10.0, 9)
    for n in "acd":
        b.ack(n, Stage.PRE_SCALING, 2, 10.5)
    assert b.next_deadline() == 15.0
    assert not b.tick(14.9)
    effects = b.tick(15.0)
    b.validate()
    assert sends(effects) == [(n, Order.ABORT, 2) for n in "abcd"]
    [reply] = replies(effects)
    assert reply.code == "aborted" and "b did not acknowledge pre-scaling within 5 s" in reply.text
    assert "epoch 2 is burnt" in reply.text
    assert b.last_abort == reply.text and 2 in b.burnt
    assert b.event is None and b.epoch == 1 and b.role_of("d") is Role.WAITING
    abort = next(e.message for e in effects if isinstance(e, Send))
    assert isinstance(abort, StageCommand) and abort.epoch == 1 and abort.next_epoch == 2
    # The stuck node's pre-scaling ack arrives late: ignored, logged as stale.
    assert not sends(b.ack("b", Stage.PRE_SCALING, 2, 16.0))
    assert b.log[-1].what == "stale" and b.log[-1].stage is Stage.PRE_SCALING
    assert not sends(b.report_drained("b", 2, 0, 0, 16.0))  # and so is a report for it
    assert b.errors == {"stale-ack": 1, "stale-drained": 1}  # races, counted
    for n in "abcd":
        b.ack(n, Order.ABORT, 2, 16.0)
    b.validate()
    # d is held: automatic admission would skip it; an explicit request admits it.
    effects = b.request_scale_out(["d"], 20.0, 10)
    assert sends(effects) == [(n, Stage.PRE_SCALING, 3) for n in "abcd"]
    [reply] = replies(run_event(b, list("abcd"), 21.0))
    assert reply.ok and reply.summary["epoch"] == 3
    assert b.epoch == 3 and b.highest_epoch == 3
    assert check_transitions(b.log) == []


def test_losing_a_participant_during_pre_scaling_aborts_at_once() -> None:
    b = formed()
    b.register("d", addr("d"), 1.0)
    b.request_scale_out(["d"], 1.0, 4)
    b.ack("a", Stage.PRE_SCALING, 2, 1.1)
    effects = b.member_gone("d", 1.2)
    [reply] = replies(effects)
    assert reply.code == "aborted" and "d disconnected" in reply.text
    assert b.role_of("d") is None  # a lost joiner is forgotten
    assert b.event is None
    b.validate()


def test_a_member_lost_while_scaling_stalls_the_event_until_it_rejoins() -> None:
    b = formed()
    b.register("d", addr("d"), 1.0)
    b.request_scale_out(["d"], 1.0, 4)
    for n in "abcd":
        b.ack(n, Stage.PRE_SCALING, 2, 1.1)
    effects = b.member_gone("b", 2.0)
    assert not replies(effects) and b.event is not None  # no abort after SCALING
    assert b.lost() == ["b"]
    for n in "acd":
        b.report_drained(n, 2, 0, 0, 2.1)
    assert b.tick(100.0) == []  # no timeout can roll SCALING back
    b.validate()
    state, effects = b.register("b", addr("b"), 101.0)
    assert state.accepted and state.text == "rejoined as a member" and state.next_epoch == 2
    assert sends(effects) == [("b", Stage.SCALING, 2)]
    effects = b.report_drained("b", 2, 1, 1, 101.5)
    assert sends(effects) == [(n, Stage.NORMAL, 2) for n in "abcd"]
    for n in "abcd":
        b.ack(n, Stage.NORMAL, 2, 102.0)
    assert b.epoch == 2 and not b.lost()
    assert check_transitions(b.log) == []


def test_a_lost_member_blocks_new_events_until_it_rejoins() -> None:
    b = formed()
    b.member_gone("c", 1.0)
    b.register("d", addr("d"), 1.0)
    [r] = replies(b.request_scale_out(["d"], 1.0, 1))
    assert "c disconnected and must rejoin first" in r.text
    state, effects = b.register("c", addr("c"), 2.0)
    assert state.accepted and sends(effects) == [("c", Stage.NORMAL, 1)]
    b.ack("c", Stage.NORMAL, 1, 2.0)
    assert sends(b.request_scale_out(["d"], 3.0, 2))
    assert check_transitions(b.log) == []


def test_automatic_admission_batches_close_registrations_into_one_event() -> None:
    b = Barrier(vnodes=VNODES, admission_window=0.5)
    _, e1 = b.register("a", addr("a"), 0.0)
    _, e2 = b.register("b", addr("b"), 0.2)
    assert not sends(e1 + e2) and b.next_deadline() == 0.5
    effects = b.tick(0.5)
    assert sends(effects) == [("a", Stage.NORMAL, 1), ("b", Stage.NORMAL, 1)]
    _, e3 = b.register("c", addr("c"), 0.6)  # arrives during the event: waits for it
    assert not sends(e3) and b.next_deadline() is None
    b.ack("a", Stage.NORMAL, 1, 0.7)
    assert not sends(b.ack("b", Stage.NORMAL, 1, 0.7))  # the event ends inside c's window
    assert b.next_deadline() == pytest.approx(1.1)
    effects = b.tick(1.1)
    assert sends(effects) == [(n, Stage.PRE_SCALING, 2) for n in "abc"]
    assert not replies(effects)  # nobody asked: no reply
    b.validate()


def test_zero_window_admits_on_registration() -> None:
    b = Barrier(vnodes=VNODES, admission_window=0.0)
    _, effects = b.register("a", addr("a"), 0.0)
    assert sends(effects) == [("a", Stage.NORMAL, 1)]


def test_cluster_status_describes_event_and_abort() -> None:
    b = formed(pre_scaling_timeout=1.0)
    b.register("d", addr("d"), 1.0)
    b.request_scale_out(["d"], 1.0, 1)
    b.ack("a", Stage.PRE_SCALING, 2, 1.2)
    status = b.cluster_status(9, 1.5, {"a": {"keys": 3}})
    assert status.stage == "pre-scaling" and status.event["waiting_for"] == ["b", "c", "d"]
    assert status.event["elapsed_s"] == 0.5 and status.figures == {"a": {"keys": 3}}
    assert ("a", addr("a"), "member", "pre-scaling", 2, True) in status.members
    assert ("d", addr("d"), "joining", "normal", 0, True) in status.members
    b.tick(2.0)
    status = b.cluster_status(10, 2.0)
    assert status.event == {} and "aborted" in status.last_abort and status.highest_epoch == 2


def test_check_transitions_finds_breaches() -> None:
    bad = [
        Transition(0.0, "event", epoch=2, members=("a", "b"), text="out"),
        Transition(0.1, "command", "a", Stage.PRE_SCALING, 2),
        Transition(0.1, "command", "b", Stage.PRE_SCALING, 2),
        Transition(0.2, "ack", "a", Stage.PRE_SCALING, 2),
        Transition(0.3, "command", "a", Stage.SCALING, 2),  # b has not acked
        Transition(0.4, "command", "a", Stage.NORMAL, 2),  # nobody drained
        Transition(0.5, "command", "b", Order.ABORT, 2),  # after scaling
        Transition(0.6, "abort", epoch=2),
        Transition(0.7, "event", epoch=2, members=("a",), text="out"),  # burnt epoch reused
        Transition(0.8, "command", "a", None, 2),  # a command must say which
    ]
    problems = check_transitions(bad)
    assert any("scaling before pre-scaling acks of ['b']" in p for p in problems)
    assert any("normal before drained" in p for p in problems)
    assert sum("abort after scaling" in p for p in problems) == 2
    assert any("epoch 2 is not above 2" in p for p in problems)
    assert any("a command without its stage" in p for p in problems)


def cmd(command: Command, epoch: int, next_epoch: int | None = None) -> StageCommand:
    members = [("a", addr("a"))]
    nxt = members if command in (Stage.PRE_SCALING, Stage.SCALING) else None
    return StageCommand(command.value, epoch, members, next_epoch, nxt, VNODES)


def test_member_side_plans_callbacks_and_tolerates_repeats_and_gaps() -> None:
    side = MemberSide(epoch=1)
    assert side.plan(cmd(Stage.PRE_SCALING, 1, 2)) == [Callback.PRE_SCALING]
    assert side.plan(cmd(Stage.PRE_SCALING, 1, 2)) == []  # repeated: just ack again
    assert side.plan(cmd(Stage.SCALING, 1, 2)) == [Callback.SCALING]
    assert side.plan(cmd(Stage.SCALING, 1, 2)) == []
    assert side.plan(cmd(Stage.NORMAL, 2)) == [Callback.NORMAL]
    assert side.plan(cmd(Stage.NORMAL, 2)) == []
    # A rejoined node that missed pre-scaling gets both callbacks, in order.
    assert side.plan(cmd(Stage.SCALING, 2, 3)) == [Callback.PRE_SCALING, Callback.SCALING]
    side = MemberSide(epoch=1)
    side.plan(cmd(Stage.PRE_SCALING, 1, 2))
    assert side.plan(cmd(Order.ABORT, 1, 2)) == [Callback.ABORT]
    assert side.plan(cmd(Order.ABORT, 1, 2)) == []  # stale abort
    assert (side.stage, side.epoch) == (Stage.NORMAL, 1)
    # A NORMAL command for the old ring while pre-scaling is an abort in disguise (resync).
    side.plan(cmd(Stage.PRE_SCALING, 1, 3))
    assert side.plan(cmd(Stage.NORMAL, 1)) == [Callback.ABORT]
    assert side.plan(cmd(Order.LEAVE, 1)) == [Callback.LEAVE]
    assert side.plan(cmd(Order.LEAVE, 1)) == []


def test_constructor_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="pre_scaling_timeout"):
        Barrier(pre_scaling_timeout=0)
    with pytest.raises(ValueError, match="admission_window"):
        Barrier(admission_window=-1)


# --- the state machine --------------------------------------------------------------------


@dataclass
class SimNode:
    """A node as the controller sees it through its connection, running MemberSide."""

    name: str
    side: MemberSide = field(default_factory=MemberSide)
    connected: bool = True
    inbox: deque[StageCommand] = field(default_factory=deque)  # controller -> node
    outbox: deque[tuple[str, str, int]] = field(default_factory=deque)  # node -> controller
    busy: StageCommand | None = None  # the command whose callbacks are running
    reported: set[int] = field(default_factory=set)  # epochs reported drained
    acked_scaling: set[int] = field(default_factory=set)

    def can_report(self) -> bool:
        """Its drain is done once it acknowledged SCALING (``store.shell.membership`` sends a
        report only after that ack) and it has not reported this epoch yet."""
        return (
            self.connected
            and self.side.stage is Stage.SCALING
            and self.side.next_epoch in self.acked_scaling
            and self.side.next_epoch not in self.reported
        )

    def actions(self) -> list[str]:
        """What this node could do next."""
        out = []
        if self.inbox and self.busy is None:
            out.append("receive")
        if self.busy is not None:
            out.append("return")
        if self.can_report():
            out.append("report")
        if self.outbox:
            out.append("send")
        return out


class BarrierMachine(RuleBasedStateMachine):
    barrier: Barrier
    nodes: dict[str, SimNode]
    now: float
    next_request: int
    answered: dict[int, int]
    event_members: dict[int, frozenset[str]]
    fresh: int

    @initialize(manual=st.booleans(), window=st.sampled_from([0.0, 0.3]), size=st.integers(0, 4))
    def start(self, manual: bool, window: float, size: int) -> None:
        """A controller, and (unless ``size`` is 0) a first ring of ``size`` nodes."""
        self.barrier = Barrier(
            vnodes=VNODES,
            manual_admission=manual,
            pre_scaling_timeout=2.0,
            admission_window=window,
            leave_timeout=4.0,
        )
        self.nodes = {}
        self.now = 0.0
        self.next_request = 1
        self.answered = {}
        self.event_members = {}
        self.fresh = 0
        for _ in range(size):
            self.register_new()
        if size and manual:
            self.apply(self.barrier.request_scale_out(None, self.now, self.request_id()))
        self.now += 0.3
        self.apply(self.barrier.tick(self.now))
        self.settle()

    # -- plumbing --------------------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                node = self.nodes.get(effect.to)
                assert isinstance(effect.message, StageCommand)
                if node is not None and node.connected:
                    node.inbox.append(effect.message)
            elif isinstance(effect, Reply):
                self.answered[effect.request_id] = self.answered.get(effect.request_id, 0) + 1
            elif isinstance(effect, Progress):
                assert effect.request_id < self.next_request

    def request_id(self) -> int:
        self.next_request += 1
        return self.next_request - 1

    def act(self, node: SimNode, action: str) -> None:
        """One step of one node, or of the controller receiving from it."""
        if action == "receive":
            command = node.inbox.popleft()
            node.side.plan(command)  # its callbacks start; the ack waits for them to return
            node.busy = command
        elif action == "return":
            command = node.busy
            assert command is not None
            node.busy = None
            if node.connected:
                node.outbox.append((command.command, command.event_epoch, -1))
                if command.kind is Stage.SCALING:
                    node.acked_scaling.add(command.event_epoch)
                    if command.event_epoch in node.reported:
                        # A repeated SCALING (after a rejoin): the report may have been lost
                        # with the old connection, so it goes again, as store.shell.membership does.
                        node.outbox.append(("drained", command.event_epoch, 1))
        elif action == "report":
            epoch = node.side.next_epoch
            assert epoch is not None
            node.reported.add(epoch)
            node.outbox.append(("drained", epoch, 1))
        else:
            what, epoch, moved = node.outbox.popleft()
            if what == "drained":
                self.apply(self.barrier.report_drained(node.name, epoch, moved, 0, self.now))
            else:
                # StageAck carries the command's value; the shell hands the barrier its kind.
                self.apply(self.barrier.ack(node.name, command_named(what), epoch, self.now))

    def settle(self) -> None:
        """Run every node until nothing is left to do (no faults, no time passing)."""
        for _ in range(10_000):
            pending = [(n, a) for n in self.nodes.values() for a in n.actions()]
            if not pending:
                return
            self.act(*pending[0])
        raise AssertionError("the cluster did not settle")

    # -- rules -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.nodes) < 7)
    @rule()
    def register_new(self) -> None:
        name = f"n{self.fresh}"
        self.fresh += 1
        self.nodes[name] = node = SimNode(name)
        state, effects = self.barrier.register(name, addr(name), self.now)
        assert state.accepted
        node.side = MemberSide(state.epoch)
        self.apply(effects)

    @rule(data=st.data(), all_waiting=st.booleans(), stranger=st.integers(0, 5))
    def scale_out(self, data: st.DataObject, all_waiting: bool, stranger: int) -> None:
        waiting = self.barrier.waiting()
        names: list[str] | None = None
        if not all_waiting and waiting:
            names = data.draw(st.lists(st.sampled_from(waiting), min_size=1, unique=True))
        if stranger == 0:
            names = [*(names or []), "nobody"]
        self.apply(self.barrier.request_scale_out(names, self.now, self.request_id()))

    @precondition(lambda self: bool(self.barrier.ring.nodes))
    @rule(data=st.data())
    def scale_in(self, data: st.DataObject) -> None:
        members = sorted(self.barrier.ring.nodes)
        names = data.draw(st.lists(st.sampled_from(members), min_size=1, unique=True))
        self.apply(self.barrier.request_scale_in(names, self.now, self.request_id()))

    @rule(data=st.data(), count=st.integers(1, 12))
    def run_nodes(self, data: st.DataObject, count: int) -> None:
        """``count`` steps, each by a node (or the controller) that Hypothesis picks: this
        is where commands, callbacks, drains and answers interleave."""
        for _ in range(count):
            pending = [(n, a) for n in self.nodes.values() for a in n.actions()]
            if not pending:
                return
            self.act(*pending[data.draw(st.integers(0, len(pending) - 1))])

    @rule(data=st.data(), chance=st.integers(0, 3))
    def connection_lost(self, data: st.DataObject, chance: int) -> None:
        connected = sorted(n for n, s in self.nodes.items() if s.connected)
        if chance or not connected:
            return
        node = self.nodes[connected[data.draw(st.integers(0, len(connected) - 1))]]
        node.connected = False
        node.inbox.clear()
        node.outbox.clear()
        self.apply(self.barrier.member_gone(node.name, self.now))
        if self.barrier.role_of(node.name) is None:
            del self.nodes[node.name]

    @rule(data=st.data())
    def rejoin(self, data: st.DataObject) -> None:
        lost = sorted(n for n, s in self.nodes.items() if not s.connected)
        if not lost:
            return
        node = self.nodes[lost[data.draw(st.integers(0, len(lost) - 1))]]
        node.connected = True
        state, effects = self.barrier.register(node.name, addr(node.name), self.now)
        assert state.accepted
        self.apply(effects)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.5, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.barrier.tick(self.now))

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def controller_state_is_valid(self) -> None:
        self.barrier.validate()

    @invariant()
    def log_keeps_the_rules(self) -> None:
        problems = check_transitions(self.barrier.log)
        assert problems == [], problems

    @invariant()
    def no_request_answered_twice(self) -> None:
        assert all(count == 1 for count in self.answered.values()), self.answered

    @invariant()
    def normal_on_the_old_epoch_never_coexists_with_scaling(self) -> None:
        """The paper's barrier, on the nodes' actual stages (not the controller's view)."""
        for t in self.barrier.log:
            if t.what == "event":
                self.event_members[t.epoch] = frozenset(t.members)
        for x in self.nodes.values():
            if x.side.stage is not Stage.SCALING:
                continue
            e = x.side.next_epoch
            assert e is not None
            for name in self.event_members.get(e, frozenset()):
                y = self.nodes.get(name)
                if y is None:
                    continue
                assert not (y.side.stage is Stage.NORMAL and y.side.epoch < e), (
                    f"{x.name} scaling to {e} while {name} is normal on {y.side.epoch}"
                )
                assert not (y.side.stage is Stage.PRE_SCALING and y.side.next_epoch != e), (
                    f"{x.name} scaling to {e} while {name} is pre-scaling to {y.side.next_epoch}"
                )

    def teardown(self) -> None:
        """Stop the faults and let everything run: the cluster must converge, and every
        request must have been answered exactly once."""
        if not hasattr(self, "barrier"):
            return
        for node in self.nodes.values():
            if not node.connected and self.barrier.role_of(node.name) is not None:
                node.connected = True
                state, effects = self.barrier.register(node.name, addr(node.name), self.now)
                assert state.accepted, state.text
                self.apply(effects)
        for _ in range(100):
            self.settle()
            if self.barrier.event is None and self.barrier.next_deadline() is None:
                break
            self.now += 1.0
            self.apply(self.barrier.tick(self.now))
        self.barrier.validate()
        assert check_transitions(self.barrier.log) == []
        assert self.barrier.event is None, self.barrier.event
        for name in self.barrier.ring.nodes:
            side = self.nodes[name].side
            assert (side.stage, side.epoch) == (Stage.NORMAL, self.barrier.epoch), name
        assert set(self.answered) == set(range(1, self.next_request)), "unanswered request"
        assert all(count == 1 for count in self.answered.values())


TestBarrierMachine = BarrierMachine.TestCase
TestBarrierMachine.settings = simulation_settings(
    max_examples=200,
    stateful_step_count=50,
    suppress_health_check=[HealthCheck.too_slow],
)
