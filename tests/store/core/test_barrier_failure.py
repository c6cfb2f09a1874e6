"""The controller's failure detection and failure events (``Barrier`` with a
``failure_timeout``), driven with a fake clock."""

from __future__ import annotations

from ring.ownership import Stage
from store.core.barrier import Barrier, Disconnect, Reply, check_transitions
from store.wire.control import Order, Resume
from tests.store.core.test_barrier import VNODES, addr, formed, sends


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


# --- a restarted controller learns the ring back ----------------------------------------------


def ring_of(names: str) -> list[tuple[str, str]]:
    return [(n, addr(n)) for n in sorted(names)]


def test_a_restarted_controller_learns_the_ring_from_the_members() -> None:
    b = Barrier(vnodes=VNODES, failure_timeout=2.0)
    for n, at in (("a", 10.0), ("b", 10.2)):
        state, _ = b.resume(Resume(n, addr(n), "normal", 4, ring_of("abc"), None, None), at)
        assert state.accepted
    assert b.request_scale_out(None, 10.3, 1)[-1].ok is False  # type: ignore[union-attr]
    b.heard("a", 10.9)
    b.heard("b", 10.9)
    b.tick(11.0)  # the window is over
    assert b.epoch == 4 and set(b.ring.nodes) == {"a", "b", "c"} and b.highest_epoch == 5
    assert b.lost() == ["c"]
    b.validate()
    for n in "ab":
        b.heard(n, 12.9)
    effects = b.tick(13.0)  # c never came back: declared dead, repaired out
    assert sorted(sends(effects)) == [("a", Order.REPAIR, 6), ("b", Order.REPAIR, 6)]
    for n in "ab":
        b.ack(n, Order.REPAIR, 6, 13.1)
    assert set(b.ring.nodes) == {"a", "b"}
    assert check_transitions(b.log) == []


def test_a_restarted_controller_finishes_the_scaling_event_it_finds() -> None:
    b = Barrier(vnodes=VNODES)
    for n in "abcd":
        report = Resume(n, addr(n), "scaling", 1, ring_of("abc"), 2, ring_of("abcd"))
        b.resume(report, 5.0)
    effects = b.tick(6.0)
    assert sorted(sends(effects)) == [(n, Stage.SCALING, 2) for n in "abcd"]
    b.validate()
    for n in "abcd":
        b.ack(n, Stage.SCALING, 2, 6.1)
        effects = b.report_drained(n, 2, 0, 0, 6.1)
    assert sorted(sends(effects)) == [(n, Stage.NORMAL, 2) for n in "abcd"]
    for n in "abcd":
        b.ack(n, Stage.NORMAL, 2, 6.2)
    b.validate()
    assert b.event is None and set(b.ring.nodes) == set("abcd") and b.epoch == 2
    assert check_transitions(b.log) == []


def test_a_restarted_controller_aborts_an_event_still_in_pre_scaling() -> None:
    b = Barrier(vnodes=VNODES)
    for n in "abc":
        report = Resume(n, addr(n), "pre-scaling", 1, ring_of("abc"), 2, ring_of("ab"))
        b.resume(report, 5.0)
    effects = b.tick(6.0)
    assert sorted(sends(effects)) == [(n, Order.ABORT, 2) for n in "abc"]
    b.validate()
    assert b.event is None and b.epoch == 1 and 2 in b.burnt


def test_a_member_declared_dead_cannot_resume() -> None:
    b = formed("abc", failure_timeout=2.0)
    for n in "ab":
        b.heard(n, 1.5)
    b.tick(2.0)
    state, _ = b.resume(Resume("c", addr("c"), "normal", 1, ring_of("abc"), None, None), 2.5)
    assert not state.accepted and "dead" in state.text
