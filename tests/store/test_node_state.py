"""Unit tests of ``NodeState``, the key and object layers of one node, without trio or sockets.

Each test builds a few nodes on one ring (:class:`Net`), calls the API's entry points
(``acquire``, ``release_ref``, ``locate``, ``call``, ``remove``, ``fold_replicas``,
``barrier``) and moves messages by hand, one ordered pair of nodes at a time, so that it
can hold a message back and let another overtake it.  Every node's ``validate()`` runs at
the end of every test.  The tests marked "regression" failed before the fix they name (see
the commit that added them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from ring.hashring import HashRing, key_token
from ring.ownership import NodeView, Stage
from store.core.node_state import Held, NodeState, Op
from store.core.objects import ClassInfo, SingleWriter, info_of
from store.core.scheduler import Wait
from store.wire.errors import ObjectNotFound, StateNotEncodable, WrongKind
from store.wire.messages import (
    Barrier,
    Call,
    Drop,
    Fold,
    Hello,
    KeyOp,
    Message,
    Release,
    Reply,
    Transfer,
    Untethered,
)
from tests.sim.objects_cluster import MAPS, Counter, Merged, Shared

SW = info_of(Counter)
MW = info_of(Shared)
MM = info_of(Merged)


class Net:
    """Nodes on one ring, with one FIFO queue per ordered pair that the test drains."""

    def __init__(self, names: list[str], maps: dict[str, dict[str, type]] | None = None) -> None:
        self.ring = HashRing(names, vnodes=16)
        self.nodes: dict[str, NodeState] = {}
        for name in names:
            state = NodeState(name, self.ring)
            for map_name, cls in (maps or {}).get(name, MAPS).items():
                state.register_map(map_name, info_of(cls))
            self.nodes[name] = state
        self.queues: dict[tuple[str, str], deque[Message]] = {}

    def __getitem__(self, name: str) -> NodeState:
        return self.nodes[name]

    def collect(self) -> None:
        for name, state in self.nodes.items():
            for dest, msgs in state.take_outbox().items():
                self.queues.setdefault((name, dest), deque()).extend(msgs)

    def queued(self, src: str, dst: str) -> list[Message]:
        self.collect()
        return list(self.queues.get((src, dst), ()))

    def deliver(self, src: str, dst: str, count: int = 1) -> None:
        self.collect()
        for _ in range(count):
            msg = self.queues[(src, dst)].popleft()
            self.nodes[dst].handle(msg, sender=src)
            self.collect()

    def deliver_pair(self, src: str, dst: str) -> None:
        while self.queued(src, dst):
            self.deliver(src, dst)

    def deliver_all(self) -> None:
        for _ in range(10_000):
            self.collect()
            busy = sorted(pair for pair, q in self.queues.items() if q)
            if not busy:
                return
            self.deliver(*busy[0])
        raise AssertionError("the nodes never went quiet")

    def key(self, map_name: str, owner: str) -> int:
        """The first integer key whose key owner is ``owner``."""
        return next(k for k in range(1000) if self.ring.owner(key_token(map_name, k)) == owner)

    def validate(self) -> None:
        for state in self.nodes.values():
            state.validate()


@pytest.fixture
def make_net() -> Iterator[Any]:
    """Builds nets and runs every node's validate() when the test ends."""
    nets: list[Net] = []

    def make(names: list[str], maps: dict[str, dict[str, type]] | None = None) -> Net:
        net = Net(names, maps)
        nets.append(net)
        return net

    yield make
    for net in nets:
        net.collect()
        net.validate()


def result(wait: Wait[Any]) -> Any:
    assert wait.done(), wait
    return wait.result()


def acquired(wait: Wait[tuple[Held, bool]]) -> Held:
    held: Held = result(wait)[0]
    return held


def hold(net: Net, node: str, key: int) -> Held:
    """Create ``sw[key]`` at ``node`` and keep one reference open there."""
    wait = net[node].acquire("sw", key, create=True)
    net.deliver_all()
    return acquired(wait)


# -- one node ----------------------------------------------------------------------------------


def test_a_single_node_space_serves_everything_without_a_message(make_net: Any) -> None:
    net = make_net(["solo"])
    solo = net["solo"]

    def quiet() -> None:
        assert solo.take_outbox() == {} and not solo.urgent

    held, created = result(solo.acquire("sw", 1, create=True))
    assert created and held.refs == 1
    held.obj.add(3)
    solo.release_ref(("sw", 1), held)
    again, created = result(solo.acquire("sw", 1, create=False))
    assert again is held and not created and held.refs == 1
    solo.release_ref(("sw", 1), held)
    assert result(solo.locate("sw", 1, False)) == ("solo", False)
    assert result(solo.call(("sw", 1), SW, "read", (), "solo", 0.0)) == 3
    quiet()

    for map_name, info in (("mw", MW), ("mm", MM)):
        assert result(solo.locate(map_name, 1, True)) == ("solo", True)
        k = (map_name, 1)
        assert solo.call(k, info, "add", ("solo", 1, 2), "solo", 0.0) == 2
        assert solo.call(k, info, "bump", ("solo", 2, 5), "solo", 0.0) is None
        assert solo.call(k, info, "get", (), "solo", 0.0) == 7
        quiet()

    solo.fold_replicas()
    assert result(solo.barrier("solo")) is None
    assert result(solo.remove("sw", 1)) is True
    with pytest.raises(ObjectNotFound):
        result(solo.acquire("sw", 1, create=False))
    assert result(solo.remove("mw", 1)) is True
    assert result(solo.remove("mw", 1)) is False
    quiet()
    assert solo.statistics().errors == {}
    assert solo.stats.messages_to_self > 0


# -- the key layer: acquiring ---------------------------------------------------------------------


def test_concurrent_misses_on_one_key_at_one_node_make_one_key_op(make_net: Any) -> None:
    net = make_net(["a", "b"])
    key = net.key("sw", "b")
    hold(net, "b", key)  # held elsewhere, so a has to ask
    net["b"].release_ref(("sw", key), net["b"].objects[("sw", key)])
    waits = [net["a"].acquire("sw", key, create=False) for _ in range(3)]
    key_ops = [m for m in net.queued("a", "b") if isinstance(m, KeyOp)]
    assert len(key_ops) == 1 and key_ops[0].op == Op.ACQUIRE
    net.deliver_all()
    helds = {id(acquired(w)) for w in waits}
    assert len(helds) == 1
    assert acquired(waits[0]).refs == 3


def test_a_create_that_joins_a_get_of_a_missing_key_creates_it(make_net: Any) -> None:
    """Regression: the create used to fail with ObjectNotFound along with the get."""
    net = make_net(["a", "b"])
    key = net.key("sw", "b")
    get = net["a"].acquire("sw", key, create=False)
    create = net["a"].acquire("sw", key, create=True)
    net.deliver_all()
    with pytest.raises(ObjectNotFound):
        get.result()
    held, created = result(create)
    assert created and held.refs == 1 and net["a"].objects[("sw", key)] is held


def test_only_one_of_two_joined_creates_made_the_object(make_net: Any) -> None:
    """Regression: every wait that joined a create was told it had created the object."""
    net = make_net(["a", "b"])
    key = net.key("sw", "b")
    first = net["a"].acquire("sw", key, create=True)
    second = net["a"].acquire("sw", key, create=True)
    net.deliver_all()
    assert [result(first)[1], result(second)[1]] == [True, False]


def test_a_get_that_joins_after_the_answer_left_asks_again(make_net: Any) -> None:
    """Regression: a get joined a request whose "not found" was already on its way back,
    though the object had been created since, and failed with it."""
    net = make_net(["a", "b"])
    key = net.key("sw", "b")
    early = net["a"].acquire("sw", key, create=False)
    net.deliver("a", "b")  # answered: not found (the Reply is on its way)
    made = net["b"].acquire("sw", key, create=True)  # then b creates it...
    net["b"].release_ref(("sw", key), acquired(made))
    late = net["a"].acquire("sw", key, create=False)  # ...and only then a asks again
    assert net.queued("a", "b") == []  # it joined the request in flight
    net.deliver_all()
    with pytest.raises(ObjectNotFound):
        early.result()
    assert acquired(late).obj.uid == acquired(made).obj.uid


# -- the object layer: releasing and moving -------------------------------------------------------


def test_a_release_waits_for_the_last_local_reference(make_net: Any) -> None:
    net = make_net(["a", "b"])
    key = net.key("sw", "b")
    k = ("sw", key)
    held = hold(net, "a", key)
    held.refs += 1  # a second local reference (the API's fast path)
    wait = net["b"].acquire("sw", key, create=False)
    net.deliver_all()
    assert held.release is not None and not wait.done()  # asked to let go, but in use
    net["a"].release_ref(k, held)
    net.deliver_all()
    assert not wait.done() and k in net["a"].objects
    held.obj.add(4)  # the last reference still writes
    net["a"].release_ref(k, held)
    assert [type(m) for m in net.queued("a", "b")] == [Transfer, KeyOp]  # the object, then MOVED
    net.deliver_all()
    moved = acquired(wait)
    assert moved.obj.value == 4 and k not in net["a"].objects and k in net["b"].objects


def test_a_release_that_overtakes_the_object_is_honoured_after_the_local_waiters(
    make_net: Any,
) -> None:
    net = make_net(["a", "b", "c"])
    key = net.key("sw", "c")
    k = ("sw", key)
    held = hold(net, "a", key)
    net["a"].release_ref(k, held)
    to_b = net["b"].acquire("sw", key, create=False)
    net.deliver("b", "c")  # c asks a to let go
    net.deliver("c", "a")  # a has no reference: the object leaves for b at once
    net.deliver("a", "c")  # MOVED: the key owner now says b
    to_c = net["c"].acquire("sw", key, create=False)  # c (the key owner) asks b to let go
    assert [type(m) for m in net.queued("c", "b")] == [Release]
    assert [type(m) for m in net.queued("a", "b")] == [Transfer]
    net.deliver("c", "b")  # the Release arrives before the object it is about
    assert not to_b.done()
    net.deliver("a", "b")
    at_b = acquired(to_b)
    assert at_b.release is not None and at_b.refs == 1  # b's waiter gets it first
    assert net.queued("b", "c") == []
    at_b.obj.add(7)
    net["b"].release_ref(k, at_b)
    net.deliver_all()
    at_c = acquired(to_c)
    assert at_c.obj.value == 7 and at_c.version == at_b.version + 1


# -- remove ---------------------------------------------------------------------------------------


def test_remove_waits_until_the_holder_dropped_and_requests_queued_behind_it_come_after(
    make_net: Any,
) -> None:
    """Regression: remove was answered, and a create granted a second writable object,
    while the holder still wrote the old one through a local reference."""
    net = make_net(["a", "b", "c"])
    key = net.key("sw", "b")
    k = ("sw", key)
    old = hold(net, "a", key)  # a writes it through an open reference
    removing = net["c"].remove("sw", key)
    getting = net["c"].acquire("sw", key, create=False)
    creating = net["c"].acquire("sw", key, create=True)  # joins the get
    net.deliver_pair("c", "b")  # the remove is served; the get waits behind it
    assert [type(m) for m in net.queued("b", "a")] == [Drop, Barrier]
    assert net.queued("b", "c") == []  # nothing answered before a has let go
    assert k in net["a"].objects and old.refs == 1  # only a writes, still
    net.deliver_all()
    assert result(removing) is True and old.removed and k not in net["a"].objects
    with pytest.raises(ObjectNotFound):
        getting.result()  # served after the remove: not found
    fresh, created = result(creating)
    assert created and fresh.obj.value == 0 and fresh.obj.uid != old.obj.uid
    holders = [n for n, s in net.nodes.items() if k in s.objects]
    assert holders == ["c"]


def test_a_drop_that_overtakes_the_object_is_applied_when_it_lands(make_net: Any) -> None:
    """Regression: the Drop found nothing, and the object arriving after it lived on at b,
    a second copy once c had created the key again."""
    net = make_net(["a", "b", "c"])
    key = net.key("sw", "c")
    k = ("sw", key)
    held = hold(net, "a", key)
    held.obj.add(2)
    net["a"].release_ref(k, held)
    to_b = net["b"].acquire("sw", key, create=False)
    net.deliver("b", "c")
    net.deliver("c", "a")  # the object leaves a for b (held back on the pair a -> b)
    net.deliver("a", "c")  # MOVED
    removing = net["c"].remove("sw", key)
    assert [type(m) for m in net.queued("c", "b")] == [Drop, Barrier]
    net.deliver_pair("c", "b")  # the Drop arrives first
    net.deliver_pair("b", "c")
    assert result(removing) is True
    later = net["b"].acquire("sw", key, create=False)  # joins b's request, after the remove
    remade = acquired(net["c"].acquire("sw", key, create=True))
    net.deliver("a", "b")  # now the object lands at b
    got = acquired(to_b)
    assert got.removed and got.obj.value == 2  # granted before the remove, removed since
    assert k not in net["b"].objects
    assert not later.done()  # it came after the remove: it asks again
    net["c"].release_ref(k, remade)
    net.deliver_all()
    assert acquired(later).obj.uid == remade.obj.uid
    assert [n for n, s in net.nodes.items() if k in s.objects] == ["b"]


# -- calls ----------------------------------------------------------------------------------------


def test_stale_reads_come_from_the_cache_within_max_age_and_are_refreshed_after(
    make_net: Any,
) -> None:
    net = make_net(["a", "b"])
    key = net.key("sw", "b")
    k = ("sw", key)
    held = hold(net, "b", key)
    held.obj.add(1)
    first = net["a"].call(k, SW, "read", (), "b", 10.0)
    net.deliver_all()
    assert result(first) == 1
    held.obj.add(5)
    assert net["a"].call(k, SW, "read", (), "b", 10.9) == 1  # max_age is 1 s: cached
    assert net["a"].stats.stale_cache_hits == 1 and net.queued("a", "b") == []
    refreshed = net["a"].call(k, SW, "read", (), "b", 11.1)
    assert isinstance(refreshed, Wait)
    net.deliver_all()
    assert result(refreshed) == 6


def test_a_stale_entry_is_as_old_as_its_request(make_net: Any) -> None:
    """Regression: an entry was stamped with the clock of the node's latest call when its
    reply landed, so a later, unrelated call made an old value look fresh."""
    net = make_net(["a", "b"])
    k0, k1 = ("sw", net.key("sw", "b")), ("sw", net.key("sw", "b") + 1)
    hold(net, "b", k0[1]).obj.add(1)
    hold(net, "b", k1[1])
    read = net["a"].call(k0, SW, "read", (), "b", 1.0)
    net.deliver("a", "b")  # b reads the value at 1.0
    other = net["a"].call(k1, SW, "read", (), "b", 1.9)  # another call, later
    net.deliver_all()
    assert result(read) == 1 and result(other) == 0
    assert isinstance(net["a"].call(k0, SW, "read", (), "b", 2.5), Wait)  # 1.5 s old


def test_untethered_calls_are_not_urgent_but_blocking_ones_are(make_net: Any) -> None:
    net = make_net(["a", "b"])
    key = net.key("mw", "a")
    k = ("mw", key)
    creating = net["b"].locate("mw", key, True)
    net.deliver_all()
    assert result(creating) == ("b", True)
    assert result(net["a"].locate("mw", key, False)) == ("b", False)
    assert net["a"].call(k, MW, "bump", ("a", 1, 2), "b", 0.0) is None
    assert net["a"].urgent == set()  # the flush timer may take its time
    assert net["a"].stats.untethered_calls == 1
    added = net["a"].call(k, MW, "add", ("a", 2, 3), "b", 0.0)
    assert net["a"].urgent == {"b"}
    batch, call = net.queued("a", "b")  # the untethered call goes first, in one batch
    assert isinstance(batch, Untethered) and batch.calls[0][2:4] == ["bump", ("a", 1, 2)]
    assert isinstance(call, Call) and call.req_id != 0
    net.deliver_all()
    assert result(added) == 5
    assert net["b"].objects[k].obj.log == [["a", 1], ["a", 2]]


def test_a_call_to_a_node_that_lost_the_object_is_located_again(make_net: Any) -> None:
    net = make_net(["a", "b", "c"])
    key = net.key("sw", "a")
    k = ("sw", key)
    held = hold(net, "b", key)
    held.obj.add(9)
    net["b"].release_ref(k, held)
    assert result(net["a"].locate("sw", key, False))[0] == "b"
    net.deliver_all()
    moved = net["c"].acquire("sw", key, create=False)  # the object moves to c
    net.deliver_all()
    acquired(moved).obj.add(1)
    read = net["a"].call(k, SW, "read", (), "b", 0.0)  # a still thinks it is at b
    net.deliver("a", "b")
    assert net.queued("b", "a") == [Reply(read_req_id(net["a"]), 2, None)]  # NOT_HERE
    net.deliver_all()
    assert result(read) == 10 and net["a"].locations[k] == "c"


def read_req_id(state: NodeState) -> int:
    (req_id,) = state._pending
    return req_id


def test_a_read_that_overtakes_the_object_waits_for_it(make_net: Any) -> None:
    """Regression: the new holder answered NOT_HERE until its object arrived; a caller that
    kept finding it early failed with ObjectNotFound."""
    net = make_net(["a", "b", "c"])
    key = net.key("sw", "c")
    k = ("sw", key)
    held = hold(net, "a", key)
    held.obj.add(3)
    net["a"].release_ref(k, held)
    net["b"].acquire("sw", key, create=False)
    net.deliver("b", "c")
    net.deliver("c", "a")  # the object leaves for b, held back on the pair a -> b
    net.deliver("a", "c")
    assert result(net["c"].locate("sw", key, False))[0] == "b"
    read = net["c"].call(k, SW, "read", (), "b", 0.0)
    for _ in range(5):  # whatever c and b say to each other, b waits for the object
        net.deliver_pair("c", "b")
        net.deliver_pair("b", "c")
    assert not read.done()
    net.deliver_all()
    assert result(read) == 3


@pytest.mark.parametrize("map_name", ["mw", "mm"])
def test_calls_that_reach_the_creator_before_its_object_wait_for_it(
    make_net: Any, map_name: str
) -> None:
    """Regression: the creator answered NOT_HERE (a blocking call) or dropped the update
    (an untethered call or a replica's fold) when it came before the key owner's reply."""
    net = make_net(["a", "b", "c"])
    info = info_of(MAPS[map_name])
    key = net.key(map_name, "c")
    k = (map_name, key)
    creating = net["a"].locate(map_name, key, True)
    net.deliver("a", "c")  # c made the record: owner a (the Reply is held back)
    locating = net["b"].locate(map_name, key, False)
    net.deliver("b", "c")
    net.deliver("c", "b")
    assert result(locating) == ("a", False)
    assert net["b"].call(k, info, "bump", ("b", 1, 1), "a", 0.0) is None
    net["b"].fold_replicas()
    added = net["b"].call(k, info, "add", ("b", 2, 10), "a", 0.0)
    net.deliver_pair("b", "a")  # all of it before a knows it created the object
    assert not added.done() and net.queued("a", "b") == []
    net.deliver_all()
    assert result(creating) == ("a", True)
    assert result(added) == 11
    assert net["a"].objects[k].obj.log == [["b", 1], ["b", 2]]
    assert all(s.statistics().errors == {} for s in net.nodes.values())


def test_replica_updates_follow_the_object_when_it_is_made_again_elsewhere(
    make_net: Any,
) -> None:
    """Regression: a node's replica kept the owner it was made for, so after the object was
    removed and created again elsewhere, updates made through a fresh reference were folded
    into the node that no longer held anything, and lost."""
    net = make_net(["a", "b", "c"])
    key = net.key("mm", "b")
    k = ("mm", key)
    creating = net["a"].locate("mm", key, True)
    net.deliver_all()
    assert result(creating) == ("a", True)
    net["c"].call(k, MM, "bump", ("c", 1, 1), "a", 0.0)  # c's replica, for a's object
    removing = net["b"].remove("mm", key)
    net.deliver_all()
    assert result(removing) is True
    assert result(net["b"].locate("mm", key, True)) == ("b", True)
    net["c"].call(k, MM, "bump", ("c", 2, 5), "b", 0.0)  # through a fresh reference
    net["c"].fold_replicas()
    net.deliver_all()
    assert net["b"].objects[k].obj.log == [["c", 2]]
    assert net["b"].objects[k].obj.value == 5


# -- errors ---------------------------------------------------------------------------------------


def test_wrong_kind_when_a_map_s_kind_does_not_match(make_net: Any) -> None:
    net = make_net(["a", "b"], {"a": {"m": Counter}, "b": {"m": Shared}})
    single, multi = net.key("m", "a"), net.key("m", "b")
    result(net["a"].acquire("m", single, create=True))
    result(net["b"].locate("m", multi, True))
    net.deliver_all()
    for wait in (
        net["b"].locate("m", single, False),
        net["b"].locate("m", single, True),
        net["a"].acquire("m", multi, create=False),
        net["a"].acquire("m", multi, create=True),
    ):
        net.deliver_all()
        with pytest.raises(WrongKind):
            wait.result()


def test_unknown_and_odd_messages_are_counted_not_raised(make_net: Any) -> None:
    net = make_net(["a", "b"])
    a = net["a"]
    mine = net.key("sw", "a")
    odd: list[Message] = [
        Hello(1, "b", b"\0" * 32, 1 << 20),  # a handshake frame: not for the core
        Reply(999, 0, None),  # answers nothing we asked
        Transfer("sw", mine, 999, 1, None, True),  # an object nobody asked for
        KeyOp(int(Op.MOVED), "sw", mine, 0, "b", 0, 0, 0, 0, ["b", 3]),  # no record
        KeyOp(int(Op.MOVED), "sw", mine, 0, "b", 0, 0, 0, 0, None),  # malformed
        Call("mw", 5, "bump", ["b", 1, 1], 0, 1),  # untethered, for an object not here
        Fold("mm", 5, 1, b"\xa0"),
        Release("sw", 77, "b", 1, 1),  # an early release for an object never coming
    ]
    for msg in odd:
        a.handle(msg, sender="b")
    errors = a.statistics().errors
    assert errors is not None
    assert set(errors) == {
        "unexpected-Hello",
        "reply-without-request",
        "transfer-without-request",
        "moved-without-record",
        "handler-TypeError",
        "untethered-call-lost",
        "fold-lost",
    }
    assert ("sw", mine) not in a.objects


class Unmovable(SingleWriter):
    def __init__(self) -> None:
        self.count = 0
        self.lock = object()  # cbor cannot encode this

    def bump(self) -> None:
        self.count += 1


@pytest.mark.parametrize("in_use", [False, True])
def test_state_that_cbor_cannot_encode_fails_with_a_type_error_when_it_must_travel(
    make_net: Any, in_use: bool
) -> None:
    net = make_net(["a", "b"], {"a": {"u": Unmovable}, "b": {"u": Unmovable}})
    key = net.key("u", "b")
    k = ("u", key)
    creating = net["a"].acquire("u", key, create=True)
    net.deliver_all()
    held = acquired(creating)
    held.obj.bump()  # local objects never travel: no error so far
    if not in_use:
        net["a"].release_ref(k, held)
    wanted = net["b"].acquire("u", key, create=False)
    net.deliver_all()
    if in_use:
        net["a"].release_ref(k, held)
        net.deliver_all()
    with pytest.raises(StateNotEncodable) as caught:
        wanted.result()
    assert isinstance(caught.value, TypeError)
    assert "Unmovable.lock" in str(caught.value)
    assert net["a"].objects[k] is held and held.release is None  # it stays where it was
    assert not net["b"].records[k].busy
    again = net["a"].acquire("u", key, create=False)  # the key owner serves a as before
    net.deliver_all()
    assert acquired(again) is held


def test_a_snapshot_of_state_that_cbor_cannot_encode_fails_instead_of_never_answering(
    make_net: Any,
) -> None:
    """Regression: the holder's handler raised, so ``Map.items()`` waited forever."""
    net = make_net(["a", "b"], {"a": {"u": Unmovable}, "b": {"u": Unmovable}})
    key = net.key("u", "b")
    creating = net["a"].acquire("u", key, create=True)
    net.deliver_all()
    net["a"].release_ref(("u", key), acquired(creating))
    snap = net["b"].snapshot("a", "u", [key])
    net.deliver_all()
    with pytest.raises(StateNotEncodable, match=r"Unmovable\.lock"):
        snap.result()


def test_info_of_the_test_classes() -> None:
    assert isinstance(SW, ClassInfo) and MM.mergeable and not MW.mergeable


# -- the scale-in boundary: fences and goodbyes -------------------------------------------------


def scale_in(net: Net, leaver: str) -> HashRing:
    """Every node of ``net`` in SCALING towards the ring without ``leaver``."""
    nxt = net.ring.with_nodes(removed=[leaver])
    for name, state in net.nodes.items():
        state.enter_stage(NodeView(name, Stage.PRE_SCALING, net.ring, nxt))
    for name, state in net.nodes.items():
        state.enter_stage(NodeView(name, Stage.SCALING, net.ring, nxt))
    return nxt


def shared_at_leaver(net: Net) -> tuple[str, int]:
    """A MultiWriter object made at a, whose key goes to c when a leaves."""
    nxt = net.ring.with_nodes(removed=["a"])
    key = next(
        n
        for n in range(1000)
        if net.ring.owner(key_token("mw", n)) == "a" and nxt.owner(key_token("mw", n)) == "c"
    )
    assert result(net["a"].locate("mw", key, True)) == ("a", True)
    net.deliver_all()
    return ("mw", key)


def test_calls_sent_to_a_leaver_are_not_overtaken_by_later_ones_sent_straight_on(
    make_net: Any,
) -> None:
    """Regression: b's untethered calls on their way to the leaving a are forwarded by a to
    the object's new holder; b's next call, made once b knows the new place, must not
    arrive before them (b's calls apply in b's order).  A fence goes through a first."""
    net = make_net(["a", "b", "c"])
    k = shared_at_leaver(net)
    net["b"].untethered(k, "bump", ("b", 1, 1), "a")
    net["b"].untethered(k, "bump", ("b", 2, 1), "a")
    net.collect()  # b's calls are on their way to a
    scale_in(net, "a")
    net["a"].drain(100)  # a evacuates the object to its next key owner, c
    net.deliver_pair("a", "c")
    net.deliver_pair("c", "a")
    assert k in net["c"].objects
    net["b"].untethered(k, "bump", ("b", 3, 1), "c")  # b learnt the new place
    assert not net.queued("b", "c"), "the third call went ahead of the first two"
    assert [type(m).__name__ for m in net.queued("b", "a")] == ["Untethered", "Fence"]
    net.deliver_all()
    assert net["c"].objects[k].obj.log == [["b", 1], ["b", 2], ["b", 3]]


def test_a_goodbye_is_answered_and_nothing_is_sent_to_the_leaver_after_it(
    make_net: Any,
) -> None:
    """Regression: the answer to a goodbye was itself dropped as a message to a departed
    node, so a leaver always waited out its timeout.  After answering, a node sends the
    leaver nothing; calls through a stale reference (blocking or untethered) find the object
    again."""
    net = make_net(["a", "b", "c"])
    key = net.key("mw", "c")
    k = ("mw", key)
    assert result(net["c"].locate("mw", key, True)) == ("c", True)
    net.deliver_all()
    (bye,) = net["a"].farewell(["b"])
    net.deliver("a", "b")
    assert [type(m) for m in net.queued("b", "a")] == [Reply]
    net.deliver_all()
    assert result(bye) is None and "a" in net["b"].departed
    value = net["b"].call(k, MW, "add", ("b", 1, 5), "a", 0.0)  # a stale owner: a
    net["b"].untethered(k, "bump", ("b", 2, 1), "a")
    assert not net.queued("b", "a")
    net.deliver_all()
    assert result(value) == 5 and net["b"].locations[k] == "c"
    assert net["c"].objects[k].obj.log == [["b", 1], ["b", 2]]  # the untethered one too
    assert not net["b"].stats.errors


def test_a_call_forwarded_for_a_removed_incarnation_is_not_applied_to_a_new_one(
    make_net: Any,
) -> None:
    """Regression: a call that reached the leaver after it evacuated the object was passed
    on and applied to whatever the new place held by then, even an object made again
    after a remove (so after the caller's later calls on it).  Forwarded calls carry the
    evacuated incarnation's version now."""
    net = make_net(["a", "b", "c"])
    k = shared_at_leaver(net)
    key = k[1]
    net["b"].untethered(k, "bump", ("b", 1, 1), "a")
    held_back = net.queued("b", "a")  # b's call stays on its way to a for now
    net.queues[("b", "a")].clear()
    scale_in(net, "a")
    net["a"].drain(100)  # the object goes to c
    net.deliver_all()
    assert k in net["c"].objects
    removed = net["c"].remove("mw", key)
    net.deliver_all()
    assert result(removed) is True
    assert result(net["c"].locate("mw", key, True)) == ("c", True)
    net.deliver_all()
    assert net["c"].call(k, MW, "add", ("c", 2, 5), "c", 0.0) == 5  # the new incarnation
    for msg in held_back:
        net["a"].handle(msg, sender="b")
    net.deliver_all()
    assert net["c"].objects[k].obj.log == [["c", 2]]
    assert net["c"].stats.errors == {"untethered-call-lost": 1}
