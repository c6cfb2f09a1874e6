"""Property test of the key and object layers (``NodeState``) on a simulated cluster.

Hypothesis opens and closes SingleWriter references, adds through them, reads read-only
through stale caches, makes blocking, untethered and replica-merged MultiWriter calls,
removes and re-creates objects, flushes, lets time pass, and, above all, picks which pair
of nodes delivers its next message, so that transfers, releases, drops, replies and calls
overtake one another in every way the network allows.  After every step
``ObjectCluster.check`` asserts:

* every node's ``validate()``;
* no SingleWriter object lost or duplicated: an existing object is held by exactly one node
  or travels in exactly one Transfer; a removed one is held nowhere once its Drop arrived;
* never two writable SingleWriter references at once, and the grant trace of each key is one
  chain: grant, release (or drop), grant of a higher version...;
* MultiWriter objects held once, each call applied at most once, and each caller's calls
  applied in the caller's order;
* no error counted by a node except calls lost to a location cached before a remove.

At the end (teardown) every reference is closed, every node flushed (replicas folded,
barriers to every untethered destination) and every message delivered; then every
operation must have been answered, every object must hold exactly the updates the model
says, and the SingleWriter history must be linearizable per key.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from store.wire.errors import ObjectNotFound, ObjectRemoved
from tests.linearizability import NOT_FOUND
from tests.sim.objects_cluster import MULTI_MAPS, ObjectCluster
from tests.sim.settings import simulation_settings

KEYS = 2

SETTINGS = simulation_settings(max_examples=150, stateful_step_count=50)

keys = st.integers(0, KEYS - 1)


class ObjectSpaceMachine(RuleBasedStateMachine):
    cluster: ObjectCluster
    slow: tuple[str, str] | None

    @initialize(data=st.data(), count=st.sampled_from([3, 4, 2]))  # races need a third node
    def start(self, data: st.DataObject, count: int) -> None:
        names = [f"n{i}" for i in range(count)]
        self.cluster = ObjectCluster(names, keys=KEYS)
        # One pair may be slow: delivered only when nothing else is waiting, so that its
        # messages are overtaken by everything sent meanwhile on the other pairs.
        pairs = [(a, b) for a in names for b in names if a != b]
        self.slow = data.draw(st.none() | st.sampled_from(pairs), label="slow pair")

    def node(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.cluster.nodes)), label="node")

    def index(self, data: st.DataObject, items: Sequence[object]) -> int:
        return data.draw(st.integers(0, len(items) - 1), label="index")

    # -- SingleWriter ---------------------------------------------------------------------

    @precondition(lambda self: len(self.cluster.sw_refs) < 6)
    @rule(data=st.data(), key=keys, create=st.booleans())
    def sw_open(self, data: st.DataObject, key: int, create: bool) -> None:
        self.cluster.sw_open(self.node(data), key, create)

    @rule(data=st.data(), key=keys, create=st.booleans(), n=st.integers(1, 9))
    def sw_packet(self, data: st.DataObject, key: int, create: bool, n: int) -> None:
        """``async with sw.create(key) as c: await c.add(n)``: the common case, and what
        makes objects move from node to node."""
        self.cluster.sw_open(self.node(data), key, create, then_add=n)

    @precondition(lambda self: bool(self.cluster.sw_refs))
    @rule(data=st.data(), n=st.integers(1, 9))
    def sw_add(self, data: st.DataObject, n: int) -> None:
        self.cluster.sw_add(self.index(data, self.cluster.sw_refs), n)

    @precondition(lambda self: bool(self.cluster.sw_refs))
    @rule(data=st.data())
    def sw_close(self, data: st.DataObject) -> None:
        self.cluster.sw_close(self.index(data, self.cluster.sw_refs))

    @rule(data=st.data(), key=keys)
    def sw_read(self, data: st.DataObject, key: int) -> None:
        op = self.cluster.sw_read(self.node(data), key)
        assert op.error is None or isinstance(op.error, ObjectNotFound), op

    # -- MultiWriter ----------------------------------------------------------------------

    @rule(
        data=st.data(),
        map_name=st.sampled_from(MULTI_MAPS),
        key=keys,
        create=st.booleans(),
        method=st.sampled_from(["add", "bump", "bump", "get"]),
        n=st.integers(1, 9),
    )
    def mw_packet(
        self, data: st.DataObject, map_name: str, key: int, create: bool, method: str, n: int
    ) -> None:
        """``async with m.get(key) as r: await r.bump(n)`` and the like, in one step."""
        self.cluster.mw_open(self.node(data), map_name, key, create, then_call=(method, n))

    @precondition(lambda self: bool(self.cluster.mw_refs))
    @rule(
        data=st.data(), method=st.sampled_from(["add", "bump", "bump", "get"]), n=st.integers(1, 9)
    )
    def mw_call(self, data: st.DataObject, method: str, n: int) -> None:
        op = self.cluster.mw_call(self.index(data, self.cluster.mw_refs), method, n)
        assert op.error is None or isinstance(op.error, ObjectNotFound), op

    @rule(data=st.data(), key=keys, n=st.integers(1, 9))
    def mw_untethered(self, data: st.DataObject, key: int, n: int) -> None:
        """``async with m.untethered(key) as r: await r.bump(n)``: never waits."""
        op = self.cluster.mw_untethered(self.node(data), key, n)
        assert op.response is not None, op
        assert op.error is None or isinstance(op.error, ObjectRemoved), op

    # -- both -------------------------------------------------------------------------------

    @rule(data=st.data(), map_name=st.sampled_from(["sw", *MULTI_MAPS]), key=keys)
    def remove(self, data: st.DataObject, map_name: str, key: int) -> None:
        self.cluster.remove(self.node(data), map_name, key)

    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        self.cluster.flush(self.node(data))

    @rule(dt=st.sampled_from([0.25, 0.5, 2.0]))
    def advance_clock(self, dt: float) -> None:
        self.cluster.now += dt

    @precondition(lambda self: bool(self.cluster.busy_pairs()))
    @rule(data=st.data(), count=st.integers(1, 6))
    def deliver(self, data: st.DataObject, count: int) -> None:
        for _ in range(count):
            pairs = self.cluster.busy_pairs()
            if not pairs:
                return
            if len(pairs) > 1 and self.slow in pairs:
                pairs.remove(self.slow)
            self.cluster.deliver(pairs[data.draw(st.integers(0, len(pairs) - 1), label="pair")])

    @precondition(lambda self: bool(self.cluster.busy_pairs()))
    @rule(data=st.data())
    def hold_back(self, data: st.DataObject) -> None:
        """Make a pair with messages waiting the slow one (or none), from now on."""
        pairs = self.cluster.busy_pairs()
        self.slow = data.draw(st.none() | st.sampled_from(pairs), label="slow pair")

    @rule(data=st.data())
    def quiesce(self, data: st.DataObject) -> None:
        """Flush everyone and deliver everything (open references stay open): every update
        made so far must now be counted exactly once."""
        self.cluster.quiesce()
        self.cluster.check_values()

    @invariant()
    def invariants_hold(self) -> None:
        if hasattr(self, "cluster"):
            self.cluster.check()

    def teardown(self) -> None:
        if hasattr(self, "cluster"):
            self.cluster.finish()


def test_object_space_keeps_its_invariants() -> None:
    run_state_machine_as_test(ObjectSpaceMachine, settings=SETTINGS)


def test_a_plain_walk_through_every_operation() -> None:
    """One hand-written run: an object moving through every node, shared objects called
    from every node, a remove, and the end checks."""
    c = ObjectCluster(["a", "b", "c"], keys=2)
    for name in ("a", "b", "c"):  # the counter moves a -> b -> c, one add at each
        c.sw_open(name, 0, create=True, then_add=1)
        c.deliver_all()
        c.check()
    read = c.sw_read("a", 0)
    c.deliver_all()
    assert read.result == 3
    for name in ("a", "b", "c"):
        for map_name in MULTI_MAPS:
            c.mw_open(name, map_name, 1, create=True)
    c.deliver_all()
    for i in range(len(c.mw_refs)):
        for method in ("add", "bump", "bump"):
            c.mw_call(i, method, 1)
    c.quiesce()
    c.check_values()
    for map_name in MULTI_MAPS:
        (held,) = [s.objects[(map_name, 1)] for s in c.nodes.values() if (map_name, 1) in s.objects]
        assert held.obj.value == 9 and len(held.obj.log) == 9
    removing = c.remove("b", "sw", 0)
    c.deliver_all()
    assert removing.result is True
    getting = c.sw_open("c", 0, create=False)
    c.deliver_all()
    assert getting.result is NOT_FOUND
    c.finish()
    chain = [(event, node) for event, _, key, _, node in c.trace if key == 0]
    assert chain == [
        ("grant", "a"),
        ("release", "a"),
        ("grant", "b"),
        ("release", "b"),
        ("grant", "c"),
        ("drop", "c"),
    ]


def test_a_get_that_joined_a_create_sees_the_object_from_its_first_value() -> None:
    """Two packets' gets of a key and then a create of it, at one node before any answer:
    they share one request, and the get whose add finishes before the create's own answer
    still saw the object made with 0 (fresh seed 8401 of this machine: the simulation wrote
    the creation after that add, and a later @stale read of the add's value looked older
    than its max_age)."""
    c = ObjectCluster(["n0", "n1", "n2"])
    c.sw_open("n0", 0, False, then_add=1)
    c.sw_open("n0", 0, False, then_add=1)
    c.sw_open("n0", 0, True)
    c.quiesce()
    c.now += 1.25
    op = c.sw_read("n0", 0)  # (checked against the timeline when it ends)
    c.quiesce()
    assert op.error is None and op.result >= 1, op
    c.finish()
