"""The controller's failure detection and failure events (``Barrier`` with a
``failure_timeout``), driven with a fake clock."""

from __future__ import annotations

from ring.ownership import Stage
from store.core.barrier import Disconnect, Reply, check_transitions
from store.wire.control import Order
from tests.store.core.test_barrier import addr, formed, sends


def test_a_silent_member_is_declared_dead_and_the_ring_repaired_without_it() -> None:
    b = formed("abc", failure_timeout=2.0)
    for n in "ab":
        b.heard(n, 1.5)
    assert b.next_deadline() == 2.0  # c's, heard last at 0
    effects = b.tick(2.0)
    assert [e.to for e in effects if isinstance(e, Disconnect)] == ["c"]
    assert sends(effects) == [("a", Order.REPAIR, 2), ("b", Order.REPAIR, 2)]
    assert b.event is not None and b.event.kind == "repair"
    b.validate()
    assert not b.ack("a", Order.REPAIR, 2, 2.1)
    b.validate()
    b.ack("b", Order.REPAIR, 2, 2.2)
    b.validate()
    assert b.event is None and b.epoch == 2 and set(b.ring.nodes) == {"a", "b"}
    assert b.dead == ["c"] and "c" not in b.members
    assert check_transitions(b.log) == []
    # A new process of the dead one's name is a new member, admitted by a scale-out.
    state, _ = b.register("c", addr("c"), 3.0)
    assert state.accepted
    b.request_scale_out(None, 3.0, 7)
    assert b.event is not None and b.event.kind == "out"


def test_a_disconnected_member_gets_the_timeout_to_come_back() -> None:
    b = formed("abc", failure_timeout=2.0)
    b.member_gone("c", 1.0)
    for n in "ab":
        b.heard(n, 2.5)
    assert not sends(b.tick(2.5))  # not yet: lost at 1.0
    b.register("c", addr("c"), 2.6)  # back in time: nothing happens
    for n in "abc":
        b.heard(n, 4.0)
    assert not sends(b.tick(4.0)) and b.dead == []


def test_a_death_before_scaling_aborts_the_event_then_repairs() -> None:
    b = formed("abc", failure_timeout=2.0)
    b.register("d", addr("d"), 0.5)
    b.request_scale_out(["d"], 0.5, 9)
    for n in "abd":
        b.heard(n, 1.9)
    effects = b.tick(2.0)
    [reply] = [e for e in effects if isinstance(e, Reply)]
    assert not reply.ok and reply.code == "aborted"
    assert ("a", Order.ABORT, 2) in sends(effects)
    assert ("a", Order.REPAIR, 3) in sends(effects) and ("d", Order.REPAIR, 3) not in sends(effects)
    b.validate()
    assert check_transitions(b.log) == []


def test_a_death_while_scaling_is_taken_over_by_a_repair_that_keeps_the_joiners() -> None:
    b = formed("abc", failure_timeout=2.0)
    b.register("d", addr("d"), 0.1)
    b.request_scale_out(["d"], 0.1, 9)
    for n in "abcd":
        b.ack(n, Stage.PRE_SCALING, 2, 0.2)
    for n in "abd":
        b.heard(n, 2.0)
    effects = b.tick(2.05)
    [reply] = [e for e in effects if isinstance(e, Reply)]
    assert not reply.ok
    assert sorted(sends(effects)) == [
        ("a", Order.REPAIR, 3),
        ("b", Order.REPAIR, 3),
        ("d", Order.REPAIR, 3),
    ]
    b.validate()
    for n in "abd":
        b.ack(n, Order.REPAIR, 3, 2.1)
        b.validate()
    assert set(b.ring.nodes) == {"a", "b", "d"} and b.epoch == 3
    assert check_transitions(b.log) == []


def test_a_second_death_during_a_repair_restarts_it_without_both() -> None:
    b = formed("abcd", failure_timeout=2.0)
    for n in "abc":
        b.heard(n, 1.0)
    b.tick(2.0)  # d dies
    b.ack("a", Order.REPAIR, 2, 2.1)
    for n in "ab":
        b.heard(n, 2.9)
    effects = b.tick(3.0)  # c dies too, before it acknowledged
    assert sorted(sends(effects)) == [("a", Order.REPAIR, 3), ("b", Order.REPAIR, 3)]
    for n in "ab":
        b.ack(n, Order.REPAIR, 3, 3.1)
    b.validate()
    assert set(b.ring.nodes) == {"a", "b"} and b.epoch == 3
    assert check_transitions(b.log) == []
