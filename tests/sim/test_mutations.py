"""Each invariant of the ownership property test can fail: broken rules are caught.

Every test swaps one broken rule into the simulated cluster, turns on only the invariant that
the breakage should violate, and asserts that Hypothesis finds a counterexample.  If a future
change made an invariant check vacuous, its mutation test would start failing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from ring.ownership import (
    Arrival,
    Decision,
    Forward,
    Holding,
    NodeView,
    Pull,
    Request,
    Serve,
    Stage,
    decide,
)
from store.core.object_layer import ObjectLayer
from store.wire.messages import Release
from tests.sim.cluster import (
    DecideFn,
    DoubleOwnership,
    HopBoundExceeded,
    NotOneHop,
    RecordLostOrDuplicated,
    Violation,
)
from tests.sim.machine import make_machine
from tests.sim.objects_cluster import Violation as ObjectViolation
from tests.sim.test_object_space_sim import ObjectSpaceMachine

SEARCH = settings(
    max_examples=1000,
    stateful_step_count=60,
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    phases=[Phase.generate],  # finding one counterexample is the point; shrinking is not
    suppress_health_check=list(HealthCheck),
)

#: Late messages across whole events take a run of several steps to set up (a pull held,
#: its answer held, a later event): the search goes on longer, from a fresh seed each time
#: (about one example in 200 finds each of them, so 5,000 miss with odds of e^-25; a fixed
#: seed would make the test pass or fail by the luck of one sequence).
SEARCH_LATE = settings(SEARCH, max_examples=5000, derandomize=False)

#: The object-space simulation, searching for one counterexample as SEARCH does.
SEARCH_OBJECTS = settings(SEARCH, max_examples=300, stateful_step_count=50)


def drop_r1(view: NodeView, holding: Holding, request: Request) -> Decision:
    """The next owner claims keys while still pre-scaling, beside the previous owner."""
    if view.stage is Stage.PRE_SCALING:
        assert view.next_ring is not None
        if view.next_ring.owner(request.token) == view.me:
            return Serve()
    return decide(view, holding, request)


def forward_without_version(view: NodeView, holding: Holding, request: Request) -> Decision:
    """The scaling previous owner forwards a new key to the next owner as a plain request:
    no hand-on, no marker (the paper's loop between A and a pre-scaling B)."""
    d = decide(view, holding, request)
    if isinstance(d, Forward) and d.handoff and holding is Holding.NONE:
        return dataclasses.replace(d, handoff=False)
    return d


def serve_without_pulling(view: NodeView, holding: Holding, request: Request) -> Decision:
    """The next owner serves at once instead of pulling the record from the previous owner."""
    d = decide(view, holding, request)
    return Serve() if isinstance(d, Pull) else d


def relay_through_directory(view: NodeView, holding: Holding, request: Request) -> Decision:
    """In NORMAL, lookups are relayed through one well-known node instead of going straight
    to the owner: always correct, never one hop."""
    d = decide(view, holding, request)
    if view.stage is Stage.NORMAL and isinstance(d, Forward) and not d.handoff:
        directory = min(view.ring.nodes)
        if view.me != directory and d.to != directory:
            return dataclasses.replace(d, to=directory)
    return d


def adopt_a_stale_hand_on(view: NodeView, holding: Holding, request: Request) -> Decision:
    """Rule H without its epoch check: a hand-on stamped by an older ring (a late pull's
    answer that arrives after a later event began) is adopted and served where it lands."""
    if request.arrival is Arrival.HANDOFF:
        return Serve(adopt=True)
    return decide(view, holding, request)


def late_pull_forgets_its_hand_on(view: NodeView, holding: Holding, request: Request) -> Decision:
    """Rule N2 without the hand-on: a pull that reaches a node already NORMAL on the new ring
    is forwarded to the owner as a plain request, so the next owner, still SCALING and
    holding nothing, pulls again."""
    d = decide(view, holding, request)
    if view.stage is Stage.NORMAL and request.arrival is Arrival.PULL and isinstance(d, Forward):
        return dataclasses.replace(d, handoff=False)
    return d


@pytest.mark.parametrize(
    ("broken", "invariant", "violation"),
    [
        (drop_r1, 1, DoubleOwnership),
        (forward_without_version, 2, HopBoundExceeded),
        (serve_without_pulling, 3, RecordLostOrDuplicated),
        (relay_through_directory, 4, NotOneHop),
        (adopt_a_stale_hand_on, 3, RecordLostOrDuplicated),
        (late_pull_forgets_its_hand_on, 2, HopBoundExceeded),
    ],
    ids=[
        "inv1-drop-R1",
        "inv2-forward-without-version",
        "inv3-serve-without-pull",
        "inv4-relay",
        "inv3-stale-hand-on-adopted",
        "inv2-late-pull-forgets-its-hand-on",
    ],
)
def test_broken_rule_is_caught(
    broken: DecideFn, invariant: int, violation: type[Violation]
) -> None:
    machine = make_machine(broken, checks=frozenset({invariant}))
    late = broken in (adopt_a_stale_hand_on, late_pull_forgets_its_hand_on)
    with pytest.raises(violation):
        run_state_machine_as_test(machine, settings=SEARCH_LATE if late else SEARCH)


# -- the object space: broken cores are caught by the simulations' checks -------------------


def hand_over_under_an_open_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder asked for its single-writer object hands it over at once, though a local
    reference to it is still open (it should wait for the last one to close)."""
    original = ObjectLayer._on_release

    def broken(self: ObjectLayer, msg: Release, sender: str) -> None:
        original(self, msg, sender)
        k = (msg.map, msg.key)
        held = self.objects.get(k)
        if held is not None and held.release is msg and held.refs > 0:
            self._hand_over(k, held)

    monkeypatch.setattr(ObjectLayer, "_on_release", broken)


@pytest.mark.parametrize(
    ("breaks", "message"),
    [(hand_over_under_an_open_reference, "two writers")],
    ids=["hand-over-under-an-open-reference"],
)
def test_a_broken_object_space_is_caught(
    monkeypatch: pytest.MonkeyPatch, breaks: Callable[[pytest.MonkeyPatch], None], message: str
) -> None:
    breaks(monkeypatch)
    with pytest.raises(ObjectViolation, match=message):
        run_state_machine_as_test(ObjectSpaceMachine, settings=SEARCH_OBJECTS)
