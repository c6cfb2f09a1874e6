"""The Hypothesis state machine that drives ``tests.sim.cluster.Cluster``.

Hypothesis chooses requests (for existing and new keys, at any node), which pair queue
delivers next (so record pulls and hand-ons arrive late), scale-out and scale-in events of
one or several nodes, the order in which nodes change stage within what the barrier allows,
background drain steps, and aborts.  It may also hold a pair back: nothing it carries is
delivered until it is let through, however many stage changes and events happen meanwhile
(``rush`` takes an event to its end in one step), so that a pull reaches its previous owner
after that node entered NORMAL, and the hand-on that answers it reaches the next owner after
a later event began: the two late messages the rules H and N2 of ``ring.ownership`` are
about.  ``make_machine`` builds the machine around a rule function, so the mutation tests
can run the same machine around a broken rule.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ring.ownership import Pull, Request, Stage, decide
from tests.sim.cluster import ALL_CHECKS, Cluster, DecideFn, Op, SimNode

MAX_NODES = 8
KEYS = 6


def make_machine(
    decide_fn: DecideFn = decide, checks: frozenset[int] = ALL_CHECKS
) -> type[RuleBasedStateMachine]:
    class OwnershipMachine(RuleBasedStateMachine):
        cluster: Cluster
        fresh: int
        held: set[tuple[str, str]]  # pairs held back: not delivered until let through

        @initialize(count=st.integers(2, 5))
        def start(self, count: int) -> None:
            self.cluster = Cluster(
                [f"n{i}" for i in range(count)], keys=KEYS, decide_fn=decide_fn, checks=checks
            )
            self.fresh = count
            self.held = set()

        def flowing(self) -> list[tuple[str, str]]:
            return [pair for pair in self.cluster.busy_pairs() if pair not in self.held]

        def pick(self, data: st.DataObject, nodes: list[SimNode]) -> SimNode:
            return nodes[data.draw(st.integers(0, len(nodes) - 1))]

        @rule(data=st.data(), key=st.integers(0, KEYS - 1), op=st.sampled_from(Op))
        def request(self, data: st.DataObject, key: int, op: Op) -> None:
            node = self.pick(data, self.cluster.participants)
            self.cluster.inject(node.name, key, op)

        @rule(data=st.data())
        def populate(self, data: st.DataObject) -> None:
            """Create every key from one node, so that many records exist to move."""
            node = self.pick(data, self.cluster.participants)
            for key in range(KEYS):
                self.cluster.inject(node.name, key, Op.CREATE)

        @precondition(lambda self: bool(self.flowing()))
        @rule(data=st.data(), count=st.integers(1, 6))
        def deliver(self, data: st.DataObject, count: int) -> None:
            for _ in range(count):
                pairs = self.flowing()
                if not pairs:
                    return
                self.cluster.deliver(pairs[data.draw(st.integers(0, len(pairs) - 1))])

        def pullers(self) -> list[tuple[str, int]]:
            """(node, key) where a request would make the node pull the key's record from
            its previous owner (a SCALING next owner that holds nothing of it)."""
            c = self.cluster
            out = []
            for node in c.participants:
                if node.stage is not Stage.SCALING:
                    continue
                view = node.view()
                for key, token in c.tokens.items():
                    request = Request(token, view.epoch, since=view.epoch)
                    if isinstance(c.decide(view, node.holding(key), request), Pull):
                        out.append((node.name, key))
            return out

        @precondition(lambda self: bool(self.pullers()))
        @rule(data=st.data(), op=st.sampled_from(Op))
        def late_pull(self, data: st.DataObject, op: Op) -> None:
            """A request that makes its node pull the record, and the pull held back: it
            will reach the previous owner late (after it entered NORMAL, say)."""
            pullers = self.pullers()
            name, key = pullers[data.draw(st.integers(0, len(pullers) - 1))]
            self.send_late(name, lambda: self.cluster.inject(name, key, op))

        def send_late(self, name: str, act: Callable[[], None]) -> None:
            """``act``, and hold back every pair from ``name`` that it gave a message."""
            queues = self.cluster.queues
            before = {pair: len(q) for pair, q in queues.items() if pair[0] == name}
            act()
            for pair, queue in queues.items():
                if pair[0] == name and len(queue) > before.get(pair, 0):
                    self.held.add(pair)

        @precondition(lambda self: bool(self.flowing()))
        @rule(data=st.data())
        def hold_back(self, data: st.DataObject) -> None:
            """What a pair carries now (and whatever it gets later) waits until let through."""
            pairs = self.flowing()
            self.held.add(pairs[data.draw(st.integers(0, len(pairs) - 1))])

        @precondition(lambda self: bool(self.held))
        @rule(data=st.data(), answers_late=st.booleans())
        def let_through(self, data: st.DataObject, answers_late: bool) -> None:
            """A held pair delivers everything it carries, at once, in order.  With
            ``answers_late``, what the receiver sends in answer is held back in turn (a late
            pull's hand-on arrives late too)."""
            pairs = sorted(self.held)
            src, dst = pairs[data.draw(st.integers(0, len(pairs) - 1))]
            self.held.discard((src, dst))

            def deliver() -> None:
                for _ in range(len(self.cluster.queues.get((src, dst), ()))):
                    self.cluster.deliver((src, dst))

            if answers_late:
                self.send_late(dst, deliver)
            else:
                deliver()

        @precondition(lambda self: self.cluster.converged())
        @rule(data=st.data(), joins=st.integers(0, 2), leaves=st.integers(0, 2))
        def scale(self, data: st.DataObject, joins: int, leaves: int) -> None:
            members = sorted(self.cluster.ring.nodes)
            leaves = min(leaves, len(members) - 1)
            joins = min(joins, MAX_NODES - len(members))
            if joins + leaves == 0:
                joins = 1 if len(members) < MAX_NODES else 0
                leaves = 1 - joins
            removed = data.draw(st.permutations(members))[:leaves]
            added = [f"n{self.fresh + i}" for i in range(joins)]
            self.fresh += joins
            self.cluster.start_event(added, removed)

        @precondition(
            lambda self: any(self.cluster.can_enter_pre(n) for n in self.cluster.participants)
        )
        @rule(data=st.data())
        def pre_scaling(self, data: st.DataObject) -> None:
            c = self.cluster
            c.enter_pre(self.pick(data, [n for n in c.participants if c.can_enter_pre(n)]))

        @precondition(
            lambda self: any(self.cluster.can_enter_scaling(n) for n in self.cluster.participants)
        )
        @rule(data=st.data())
        def scaling(self, data: st.DataObject) -> None:
            c = self.cluster
            c.enter_scaling(self.pick(data, [n for n in c.participants if c.can_enter_scaling(n)]))

        @precondition(
            lambda self: any(self.cluster.drainable(n) for n in self.cluster.participants)
        )
        @rule(data=st.data())
        def drain(self, data: st.DataObject) -> None:
            c = self.cluster
            c.drain_one(self.pick(data, [n for n in c.participants if c.drainable(n)]))

        @precondition(
            lambda self: any(self.cluster.can_report_drained(n) for n in self.cluster.participants)
        )
        @rule(data=st.data())
        def drained(self, data: st.DataObject) -> None:
            c = self.cluster
            c.report_drained(
                self.pick(data, [n for n in c.participants if c.can_report_drained(n)])
            )

        @precondition(
            lambda self: any(self.cluster.can_enter_normal(n) for n in self.cluster.participants)
        )
        @rule(data=st.data())
        def normal(self, data: st.DataObject) -> None:
            c = self.cluster
            c.enter_normal(self.pick(data, [n for n in c.participants if c.can_enter_normal(n)]))

        @precondition(lambda self: self.cluster.next_ring is not None)
        @rule(until=st.sampled_from(["scaling", "drained", "normal"]))
        def rush(self, until: str) -> None:
            """Take the running event as far as it goes without a held pair, up to every
            node SCALING, or also drained (the controller's latch set, nobody NORMAL yet:
            the single steps above pick who goes first), or NORMAL: every stage change the
            barrier allows, every drain step, every message of the other pairs.  (The
            single steps are each picked as rarely as a request; this one lets a run go
            through several whole events.)"""
            c = self.cluster
            progress = True
            while progress and c.next_ring is not None:
                progress = False
                for node in c.participants:
                    if c.can_enter_pre(node):
                        c.enter_pre(node)
                        progress = True
                for node in c.participants:
                    if c.can_enter_scaling(node):
                        c.enter_scaling(node)
                        progress = True
                if until == "scaling":
                    continue
                for node in c.participants:
                    while c.drainable(node):
                        c.drain_one(node)
                        progress = True
                while self.flowing():
                    c.deliver(self.flowing()[0])
                    progress = True
                for node in c.participants:
                    if c.can_report_drained(node):
                        c.report_drained(node)
                        progress = True
                if until == "drained":
                    continue
                for node in c.participants:
                    if c.can_enter_normal(node):
                        c.enter_normal(node)
                        progress = True

        @precondition(lambda self: self.cluster.can_abort())
        @rule()
        def abort(self) -> None:
            self.cluster.abort()

        @invariant()
        def invariants_hold(self) -> None:
            if hasattr(self, "cluster"):
                self.cluster.check()

        def teardown(self) -> None:
            if hasattr(self, "cluster"):
                self.cluster.finish()

    return OwnershipMachine
