"""The Hypothesis state machine that drives ``tests.sim.cluster.Cluster``.

Hypothesis chooses requests (for existing and new keys, at any node), which pair queue
delivers next (so record pulls and hand-ons arrive late), scale-out and scale-in events of
one or several nodes, the order in which nodes change stage within what the barrier allows,
background drain steps, and aborts.  ``make_machine`` builds the machine around a rule
function, so the mutation tests can run the same machine around a broken rule.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ring.ownership import decide
from tests.sim.cluster import ALL_CHECKS, Cluster, DecideFn, Op, SimNode

MAX_NODES = 8
KEYS = 6


def make_machine(
    decide_fn: DecideFn = decide, checks: frozenset[int] = ALL_CHECKS
) -> type[RuleBasedStateMachine]:
    class OwnershipMachine(RuleBasedStateMachine):
        cluster: Cluster
        fresh: int

        @initialize(count=st.integers(2, 5))
        def start(self, count: int) -> None:
            self.cluster = Cluster(
                [f"n{i}" for i in range(count)], keys=KEYS, decide_fn=decide_fn, checks=checks
            )
            self.fresh = count

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

        @precondition(lambda self: bool(self.cluster.busy_pairs()))
        @rule(data=st.data(), count=st.integers(1, 6))
        def deliver(self, data: st.DataObject, count: int) -> None:
            for _ in range(count):
                pairs = self.cluster.busy_pairs()
                if not pairs:
                    return
                self.cluster.deliver(pairs[data.draw(st.integers(0, len(pairs) - 1))])

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
