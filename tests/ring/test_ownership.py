"""Case tests of the ownership rules, one per rule of ``ring.ownership``'s docstring."""

from __future__ import annotations

import pytest

from ring.hashring import HashRing, key_token
from ring.ownership import (
    MAX_HOPS,
    Arrival,
    Forward,
    Holding,
    NodeView,
    Pull,
    Reject,
    Request,
    Serve,
    Stage,
    counted_since,
    decide,
    drain_destination,
)

OLD = HashRing(["a", "b"], vnodes=16, epoch=3)
NEW = OLD.with_node("c")  # epoch 4


def moved_key() -> int:
    """A token that "a" owns under OLD and "c" owns under NEW."""
    for i in range(10_000):
        token = key_token("m", i)
        if OLD.owner(token) == "a" and NEW.owner(token) == "c":
            return token
    raise AssertionError("no key moves from a to c")


T = moved_key()


def view(me: str, stage: Stage) -> NodeView:
    return NodeView(me, stage, OLD, None if stage is Stage.NORMAL else NEW)


def req(arrival: Arrival = Arrival.PLAIN, epoch: int = 3, hops: int = 0) -> Request:
    return Request(T, epoch, hops, arrival)


def test_normal_owner_serves_and_others_forward_in_one_hop() -> None:
    assert decide(view("a", Stage.NORMAL), Holding.NONE, req()) == Serve()
    assert decide(view("b", Stage.NORMAL), Holding.NONE, req()) == Forward("a", 3, 1)


def test_r1_previous_owner_serves_while_pre_scaling_and_next_owner_defers() -> None:
    assert decide(view("a", Stage.PRE_SCALING), Holding.NONE, req()) == Serve()
    # The joining next owner, pre-scaling, forwards to the previous owner...
    assert decide(view("c", Stage.PRE_SCALING), Holding.NONE, req(epoch=4)) == Forward("a", 3, 1)
    # ...and once scaling, pulls from it; a pre-scaling previous owner serves the pull itself.
    assert decide(view("c", Stage.SCALING), Holding.NONE, req(epoch=4)) == Pull("a", 3, 1)
    assert decide(view("a", Stage.PRE_SCALING), Holding.NONE, req(Arrival.PULL)) == Serve()


def test_r2_scaling_previous_owner_hands_the_key_on_once() -> None:
    first = decide(view("a", Stage.SCALING), Holding.NONE, req())
    assert first == Forward("c", 4, 1, handoff=True)
    later = decide(view("a", Stage.SCALING), Holding.HANDED_ON, req())
    assert later == Forward("c", 4, 1, handoff=False)
    held = decide(view("a", Stage.SCALING), Holding.RECORD, req(Arrival.PULL, hops=1))
    assert held == Forward("c", 4, 2, handoff=True)


def test_a_handoff_is_served_where_it_lands_whatever_the_stage() -> None:
    for stage in Stage:
        epoch = 3 if stage is Stage.NORMAL else 4
        d = decide(view("c", stage), Holding.NONE, req(Arrival.HANDOFF, epoch=epoch))
        assert d == Serve(adopt=True)


def test_a_stale_handoff_is_routed_as_plain() -> None:
    d = decide(view("c", Stage.SCALING), Holding.NONE, req(Arrival.HANDOFF, epoch=3))
    assert isinstance(d, Pull)


def test_late_pull_at_a_converged_node_hands_the_bare_authority_on() -> None:
    converged = NodeView("a", Stage.NORMAL, NEW)
    # Stamped by the previous ring: routed afresh, so the hop count restarts.
    assert decide(converged, Holding.NONE, req(Arrival.PULL, epoch=3, hops=2)) == Forward(
        "c", 4, 1, handoff=True
    )


def test_hop_bound_and_future_epochs_are_rejected_not_looped() -> None:
    assert isinstance(decide(view("b", Stage.NORMAL), Holding.NONE, req(hops=MAX_HOPS)), Reject)
    assert isinstance(decide(view("b", Stage.NORMAL), Holding.NONE, req(epoch=9)), Reject)


def test_drain_moves_only_records_whose_next_owner_is_another_node() -> None:
    assert drain_destination(view("a", Stage.SCALING), T) == "c"
    assert drain_destination(view("c", Stage.SCALING), T) is None
    assert drain_destination(view("a", Stage.PRE_SCALING), T) is None


def test_view_rejects_inconsistent_stages() -> None:
    with pytest.raises(ValueError):
        NodeView("a", Stage.NORMAL, OLD, NEW)
    with pytest.raises(ValueError):
        NodeView("a", Stage.SCALING, OLD, None)
    with pytest.raises(ValueError):
        NodeView("a", Stage.SCALING, NEW, OLD)


def test_counted_since_is_the_newest_epoch_any_counting_node_knew() -> None:
    """``since`` never goes back (a request counted by a node of a newer event keeps that
    epoch) and moves up to the forwarding node's newest epoch: with ``since`` alone a
    request would keep restarting its count at every node of the next event, and its hops
    would never be bounded there."""
    scaling = view("a", Stage.SCALING)  # knows epoch 4 (NEW)
    normal_old = view("b", Stage.NORMAL)  # knows epoch 3 (OLD) only
    # Counted under epoch 3, forwarded by a node that knows 4: the count is now of epoch 4.
    assert counted_since(scaling, Request(T, 3, 2, since=3)) == 4
    assert counted_since(scaling, Request(T, 3, 2)) == 4  # no since: the routing stamp
    # Counted by a node that knew epoch 5 already: a node that knows less does not lower it.
    assert counted_since(normal_old, Request(T, 3, 1, since=5)) == 5
    assert counted_since(normal_old, Request(T, 3, 1, since=3)) == 3
    # What it is for: the next node of epoch 4 keeps counting (hops 2 -> 3) instead of
    # restarting at 1, since the request was already counted by a node that knew epoch 4.
    since = counted_since(scaling, Request(T, 3, 2, since=3))
    assert decide(view("c", Stage.SCALING), Holding.NONE, Request(T, 3, 2, since=since)) == Pull(
        "a", 3, 3
    )


def test_the_longest_path_is_served_within_the_hop_bound() -> None:
    """A SCALING node sends a request to ``c`` (the key's next owner) while ``c`` is still
    PRE_SCALING, which sends it on to ``a`` (P3); it reaches ``a`` after ``a`` entered
    NORMAL on the new ring (N3), goes back to ``c``, now SCALING, which pulls (S4), and
    ``a`` hands the bare authority on (N2): five transfers, served (the object space's
    scaling simulation found it with ``--hypothesis-seed=353`` when the bound was 4)."""

    def step(view_: NodeView, request: Request) -> Request:
        decision = decide(view_, Holding.NONE, request)
        assert isinstance(decision, Forward | Pull), decision
        to_epoch, hops = decision.epoch, decision.hops
        arrival = Arrival.PULL if isinstance(decision, Pull) else Arrival.PLAIN
        if isinstance(decision, Forward) and decision.handoff:
            arrival = Arrival.HANDOFF
        return Request(T, to_epoch, hops, arrival, counted_since(view_, request))

    normal_new = NodeView("a", Stage.NORMAL, NEW)
    r = step(view("b", Stage.SCALING), req(epoch=3))  # S5: b -> c
    r = step(view("c", Stage.PRE_SCALING), r)  # P3: c -> a
    r = step(normal_new, r)  # N3: a -> c
    r = step(view("c", Stage.SCALING), r)  # S4: c pulls from a
    r = step(normal_new, r)  # N2: a hands the bare authority on to c
    assert r.arrival is Arrival.HANDOFF and r.hops == MAX_HOPS == 5
    assert decide(view("c", Stage.SCALING), Holding.NONE, r) == Serve(adopt=True)
