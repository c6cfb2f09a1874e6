"""Property test: the ownership rules keep the four invariants under every interleaving.

1. every key has exactly one node that would serve it (never two; every request is served);
2. every request is served within ``MAX_HOPS`` transfers: no loop;
3. across whole scale-outs and scale-ins no key record is lost or duplicated;
4. once every node is back in NORMAL, every request is served in one hop.
"""

from __future__ import annotations

from hypothesis.stateful import run_state_machine_as_test

from tests.sim.cluster import Cluster, Op
from tests.sim.machine import make_machine
from tests.sim.settings import simulation_settings

SETTINGS = simulation_settings(max_examples=300, stateful_step_count=60)


def test_rules_keep_every_invariant() -> None:
    run_state_machine_as_test(make_machine(), settings=SETTINGS)


def test_a_full_scale_out_and_in_moves_every_record() -> None:
    """A plain walk through one scale-out and one scale-in, every stage in turn: records move
    on first touch or in the background drain, and every update survives both events."""
    c = Cluster(["a", "b"], keys=40)
    for key in range(40):
        c.inject("a", key, Op.CREATE)
    c.deliver_all()
    for added, removed in ((["c", "d"], []), ([], ["a", "c"])):
        c.start_event(added, removed)
        for enter, allowed in (
            (c.enter_pre, c.can_enter_pre),
            (c.enter_scaling, c.can_enter_scaling),
        ):
            for node in c.participants:
                if allowed(node):
                    enter(node)
        for key in range(0, 40, 3):  # some records move on first touch...
            c.inject("b", key, Op.ACCESS)
        c.deliver_all()
        c.check()
        for node in c.participants:  # ...the rest in the background drain
            while c.drainable(node):
                c.drain_one(node)
        c.deliver_all()
        for node in c.participants:
            c.report_drained(node)
        for node in c.participants:
            c.enter_normal(node)
        c.check()
        assert c.converged()
    assert sorted(c.ring.nodes) == ["b", "d"]
    for key in range(40):
        holders = [n.name for n in c.nodes.values() if key in n.records]
        assert holders == [c.ring.owner(c.tokens[key])]
        assert c.nodes[holders[0]].records[key].value == (2 if key % 3 == 0 else 0)
    assert all(log.served_hops is not None for log in c.requests.values())
