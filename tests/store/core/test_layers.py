"""Unit tests of one node's core: the key layer and the object layer behind ``Router``.

Each test builds a few nodes on one ring (:class:`Net`), each a
:class:`tests.fixtures.core.CoreNode` driving a :class:`store.core.router.Router`, calls the
API's entry points (``acquire``, ``release_ref``, ``locate``, ``call``, ``remove``,
``fold_replicas``, ``barrier``) and moves messages by hand, one ordered pair of nodes at a
time, so that it can hold a message back and let another overtake it.  Every node's
``validate()`` runs at the end of every test, and every list of instructions
``Router.handle`` returns is checked as it comes back (:func:`check_instructions`).  The
tests marked "regression" failed before the fix they name (they were first written for
``NodeState``, the single class the two layers replaced, and keep their intent).

The last sections test what came with the split: the explicit :class:`KeyState` of key
records, the router's sorting of faults (a peer's, or a bug of ours), and the causes the
instructions carry.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from ring.hashring import HashRing, key_token
from ring.ownership import NodeView, Stage
from store.core.instructions import (
    AskSnapshot,
    Fail,
    Instruction,
    Log,
    Resolve,
    Send,
    Stimulus,
)
from store.core.key_layer import TRANSITIONS, KeyLayer, KeyRecord, KeyState
from store.core.object_layer import Held
from store.core.objects import ClassInfo, SingleWriter, info_of
from store.core.outbox import Outbox
from store.core.scheduler import Wait
from store.wire.codes import Arrival, Kind, MovedNote, Op, Status
from store.wire.errors import (
    MalformedMessage,
    ObjectNotFound,
    StateNotEncodable,
    WrongKind,
    classify,
)
from store.wire.messages import (
    Barrier,
    Call,
    Drop,
    Fold,
    HandOns,
    HandOnsAck,
    Hello,
    KeyOp,
    Message,
    Release,
    Reply,
    Snapshot,
    Transfer,
    Untethered,
    Welcome,
)
from tests.fixtures.core import CoreNode
from tests.fixtures.objects import MAPS, Counter, Merged, Shared

SW = info_of(Counter)
MW = info_of(Shared)
MM = info_of(Merged)


def check_instructions(me: str, instructions: list[Instruction]) -> None:
    """What every answer of ``Router.handle`` looks like: each instruction names its cause,
    ``(origin, req_id)`` or None; messages are grouped per destination (one ``Send`` per
    node, never empty, never to this node itself: those are handled before ``handle``
    returns); settled Waits and log lines come before the messages."""
    seen: set[str] = set()
    sending = False
    for ins in instructions:
        cause = ins.cause
        assert cause is None or (
            type(cause) is tuple
            and len(cause) == 2
            and type(cause[0]) is str
            and type(cause[1]) is int
            and cause[1] > 0
        ), ins
        if isinstance(ins, Send):
            assert ins.to != me and ins.to not in seen and ins.msgs, ins
            seen.add(ins.to)
            sending = True
        else:
            assert not sending, f"{ins} after a Send"


class Node(CoreNode):
    """A :class:`CoreNode` that checks every answer of ``Router.handle`` and keeps the last
    one, and counts the messages it sent to other nodes."""

    def __init__(self, name: str, ring: HashRing, maps: dict[str, type]) -> None:
        self.last: list[Instruction] = []
        self.sends = 0
        super().__init__(name, ring, maps)

    def run(self, stimulus: Stimulus) -> list[Instruction]:
        instructions = super().run(stimulus)
        check_instructions(self.name, instructions)
        self.last = instructions
        self.sends += sum(isinstance(ins, Send) for ins in instructions)
        return instructions

    def snapshot(self, node: str, map_name: str, keys: list[Any]) -> Wait[Any]:
        wait: Wait[Any] = Wait(("snapshot", node))
        self.run(AskSnapshot(node, map_name, keys, wait))
        return wait

    @property
    def errors(self) -> dict[str, int]:
        return self.statistics().errors


class Net:
    """Nodes on one ring, with one FIFO queue per ordered pair that the test drains."""

    def __init__(self, names: list[str], maps: dict[str, dict[str, type]] | None = None) -> None:
        self.ring = HashRing(names, vnodes=16)
        self.nodes: dict[str, Node] = {}
        for name in names:
            self.nodes[name] = Node(name, self.ring, (maps or {}).get(name, MAPS))
        self.queues: dict[tuple[str, str], deque[Message]] = {}

    def __getitem__(self, name: str) -> Node:
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


def pending_ids(node: Node) -> list[int]:
    """The request ids ``node`` waits to hear about."""
    return list(node.router.objects._pending)


# -- one node ----------------------------------------------------------------------------------


def test_a_single_node_space_serves_everything_without_a_message(make_net: Any) -> None:
    net = make_net(["solo"])
    solo = net["solo"]

    def quiet() -> None:
        assert solo.take_outbox() == {} and not solo.router.out.has_output and solo.sends == 0

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
    assert solo.errors == {}
    assert solo.statistics().messages_to_self > 0


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
    transfer, moved_op = net.queued("a", "b")  # the object, then MOVED
    assert isinstance(transfer, Transfer) and isinstance(moved_op, KeyOp)
    assert moved_op.op == Op.MOVED and moved_op.note == MovedNote.HANDED_OVER
    assert moved_op.owner == "b" and moved_op.version == transfer.version == held.version + 1
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
    while the holder still wrote the old one through a local reference.  The key owner
    sends the holder a Drop naming the remover; the holder's MOVED (DROPPED) notice, sent
    once it has dropped the object, is what answers the remover."""
    net = make_net(["a", "b", "c"])
    key = net.key("sw", "b")
    k = ("sw", key)
    old = hold(net, "a", key)  # a writes it through an open reference
    removing = net["c"].remove("sw", key)
    getting = net["c"].acquire("sw", key, create=False)
    creating = net["c"].acquire("sw", key, create=True)  # joins the get
    remove_op, get_op = net.queued("c", "b")
    assert isinstance(remove_op, KeyOp) and isinstance(get_op, KeyOp)
    assert (remove_op.op, get_op.op) == (Op.REMOVE, Op.ACQUIRE)
    net.deliver_pair("c", "b")  # the remove is served; the get waits behind it
    (drop,) = net.queued("b", "a")
    assert drop == Drop("sw", key, drop.version, "c", remove_op.req_id)  # names the remover
    assert drop.version > old.version
    assert net.queued("b", "c") == []  # nothing answered before a has dropped it
    assert k in net["a"].objects and old.refs == 1  # only a writes, still
    net.deliver("b", "a")  # a drops it (its reference is stale from now on)
    assert old.removed and k not in net["a"].objects
    (dropped,) = net.queued("a", "b")
    assert isinstance(dropped, KeyOp)
    assert (dropped.op, dropped.note) == (Op.MOVED, MovedNote.DROPPED)
    assert (dropped.origin, dropped.req_id, dropped.owner) == ("c", remove_op.req_id, None)
    assert net.queued("b", "c") == [] and not removing.done()  # not before b heard it
    net.deliver("a", "b")  # the authority hears it: the remover is answered, then the get
    net.deliver("b", "c")
    assert result(removing) is True
    assert not getting.done()
    # A get at the former holder after the remove returned finds nothing.
    assert net["a"].take("sw", key) is None
    after = net["a"].acquire("sw", key, create=False)
    net.deliver("a", "b")
    net.deliver("b", "a")
    with pytest.raises(ObjectNotFound):
        after.result()
    net.deliver_all()
    with pytest.raises(ObjectNotFound):
        getting.result()  # served after the remove: not found
    fresh, created = result(creating)
    assert created and fresh.obj.value == 0 and fresh.obj.uid != old.obj.uid
    assert fresh.version > drop.version
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
    (drop,) = net.queued("c", "b")
    assert isinstance(drop, Drop) and drop.origin == "c"
    net.deliver_pair("c", "b")  # the Drop arrives first
    assert not removing.done()  # answered once b has handled the Drop, not before
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
    assert net["a"].statistics().stale_cache_hits == 1 and net.queued("a", "b") == []
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
    a = net["a"]
    sends = a.sends
    assert a.call(k, MW, "bump", ("a", 1, 2), "b", 0.0) is None
    # Queued for the flush timer, which may take its time: nothing to send yet.
    assert a.sends == sends and not a.router.out.urgent and not a.router.out.boxes
    assert list(a.router.out.untethered) == ["b"]
    assert a.statistics().untethered_calls == 1
    added = a.call(k, MW, "add", ("a", 2, 3), "b", 0.0)
    (send,) = a.last  # the blocking call is sent at once, the untethered one first
    assert isinstance(send, Send) and send.to == "b" and send.urgent
    batch, call = send.msgs  # in one batch
    assert isinstance(batch, Untethered) and batch.calls[0][2:4] == ["bump", ("a", 1, 2)]
    assert isinstance(call, Call) and call.req_id != 0
    assert net.queued("a", "b") == [batch, call]
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
    (read_id,) = pending_ids(net["a"])
    net.deliver("a", "b")
    assert net.queued("b", "a") == [Reply(read_id, Status.NOT_HERE, None)]
    net.deliver_all()
    assert result(read) == 10 and net["a"].locations[k] == "c"


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
    assert all(s.errors == {} for s in net.nodes.values())


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
    """Messages that make no sense here, from a peer, are counted and logged (even though
    the nodes raise their own bugs), and change nothing.  (``NodeState`` counted a KeyOp
    whose ``extra`` did not unpack as ``handler-TypeError``; KeyOp's fields are typed now,
    so the malformed entry is an untethered call and a hand-on record that do not parse.)"""
    net = make_net(["a", "b"])
    a = net["a"]
    mine = net.key("sw", "a")
    odd: list[Message] = [
        Hello(1, "b", b"\0" * 32, 1 << 20),  # a handshake frame: not for the core
        Reply(999, Status.OK, None),  # answers nothing we asked
        Transfer("sw", mine, 999, 1, None, True),  # an object nobody asked for
        KeyOp(Op.MOVED, "sw", mine, Kind.SINGLE, "b", 0, 0, 0, Arrival.PLAIN, owner="b", version=3),
        Untethered([["mw", 5, "bump"]]),  # malformed: an entry of three fields
        HandOns(a.view.epoch, [["sw", mine, ["x", 1], []]]),  # malformed: a record of two
        Call("mw", 5, "bump", ["b", 1, 1], 0, 1),  # untethered, for an object not here
        Fold("mm", 5, 1, b"\xa0"),
        Release("sw", 77, "b", 1, 1),  # an early release for an object never coming
    ]
    for msg in odd:
        a.handle(msg, sender="b")
    errors = a.errors
    assert set(errors) == {
        "unexpected-Hello",
        "reply-without-request",
        "transfer-without-request",
        "moved-without-record",
        "malformed-untethered-call",
        "malformed-hand-on",
        "untethered-call-lost",
        "fold-lost",
    }
    assert all(classify(counter) != "bug" for counter in errors)
    assert ("sw", mine) not in a.objects and a.router.keys.record(("sw", mine)) is None
    assert net.queued("a", "b") == [HandOnsAck(a.view.epoch, 0)]  # none of it adopted
    net.deliver_all()
    made = hold(net, "a", mine)  # and the node serves as before
    assert made.refs == 1 and a.objects[("sw", mine)] is made


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
    rec = net["b"].records[k]
    assert not rec.busy and rec.state is KeyState.LIVE and rec.owner == "a"
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
    assert result(bye) is None and "a" in net["b"].router.out.departed
    value = net["b"].call(k, MW, "add", ("b", 1, 5), "a", 0.0)  # a stale owner: a
    net["b"].untethered(k, "bump", ("b", 2, 1), "a")
    assert not net.queued("b", "a")
    net.deliver_all()
    assert result(value) == 5 and net["b"].locations[k] == "c"
    assert net["c"].objects[k].obj.log == [["b", 1], ["b", 2]]  # the untethered one too
    assert not net["b"].errors


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
    assert net["c"].errors == {"untethered-call-lost": 1}


# -- the key layer's states ----------------------------------------------------------------------


def test_a_key_record_goes_through_its_states_by_create_move_and_remove(
    make_net: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ABSENT (no record) -> LIVE (created at a) -> MOVING (b asked for it; c released it
    from a) -> LIVE (MOVED: at b) -> DROPPING (removed; b has not confirmed) -> ABSENT
    (dropped; the record keeps its version) -> LIVE (created again, a higher version)."""
    net = make_net(["a", "b", "c"])
    key = net.key("sw", "c")
    k = ("sw", key)
    keys = net["c"].router.keys
    changes: list[tuple[KeyState, KeyState]] = []
    become = KeyLayer._become

    def watched(layer: KeyLayer, rec: KeyRecord, state: KeyState) -> None:
        if layer is keys and state is not rec.state:
            changes.append((rec.state, state))
        become(layer, rec, state)

    monkeypatch.setattr(KeyLayer, "_become", watched)

    def record() -> KeyRecord:
        rec: KeyRecord | None = keys.record(k)
        assert rec is not None
        return rec

    def fields(rec: KeyRecord) -> tuple[Any, ...]:
        return rec.state, rec.owner, rec.version

    assert keys.record(k) is None
    made = hold(net, "a", key)
    rec = record()
    assert fields(rec) == (KeyState.LIVE, "a", 1)
    net["a"].release_ref(k, made)
    wanted = net["b"].acquire("sw", key, create=False)
    net.deliver("b", "c")  # c asks a to let go
    assert fields(rec) == (KeyState.MOVING, "a", 1) and rec.busy and rec.exists
    assert rec.releasing == ("b", pending_ids(net["b"])[0])
    net.deliver("c", "a")  # a lets go: Transfer to b, MOVED to c
    assert fields(rec) == (KeyState.MOVING, "a", 1)
    net.deliver("a", "c")
    assert fields(rec) == (KeyState.LIVE, "b", 2) and rec.releasing is None
    net.deliver_all()
    at_b = acquired(wanted)
    net["b"].release_ref(k, at_b)
    removing = net["a"].remove("sw", key)
    net.deliver("a", "c")
    assert fields(rec) == (KeyState.DROPPING, None, 3) and rec.busy and not rec.exists
    net.deliver("c", "b")  # b drops it and confirms
    assert fields(rec) == (KeyState.DROPPING, None, 3)
    net.deliver("b", "c")
    assert fields(rec) == (KeyState.ABSENT, None, 3)  # the version is kept
    assert not rec.busy and not rec.exists and record() is rec
    net.deliver_all()
    assert result(removing) is True
    again = hold(net, "a", key)
    assert fields(rec) == (KeyState.LIVE, "a", 4) and again.version == 4
    assert changes == [
        (KeyState.LIVE, KeyState.MOVING),
        (KeyState.MOVING, KeyState.LIVE),
        (KeyState.LIVE, KeyState.DROPPING),
        (KeyState.DROPPING, KeyState.ABSENT),
        (KeyState.ABSENT, KeyState.LIVE),
    ]
    assert all(new in TRANSITIONS[old] for old, new in changes)


def test_become_refuses_a_transition_the_table_does_not_list() -> None:
    layer = KeyLayer("a", HashRing(["a"]), Outbox("a"))
    assert set(TRANSITIONS) == set(KeyState)
    refused = set()
    for old in KeyState:
        for new in KeyState:
            owner = "a" if old in (KeyState.LIVE, KeyState.MOVING) else None
            rec = KeyRecord(Kind.SINGLE, owner, 1, old)
            if new is old or new in TRANSITIONS[old]:
                layer._become(rec, new)
                assert rec.state is new
                continue
            with pytest.raises(AssertionError, match=f"{old.name} -> {new.name}"):
                layer._become(rec, new)
            assert rec.state is old
            refused.add((old, new))
    # An object never vanishes without its holder's confirmation, and nothing is granted
    # while a drop is unconfirmed.
    assert (KeyState.LIVE, KeyState.ABSENT) in refused
    assert (KeyState.DROPPING, KeyState.LIVE) in refused
    assert (KeyState.DROPPING, KeyState.MOVING) in refused


# -- the router: whose fault --------------------------------------------------------------------


def logs(node: Node) -> list[Log]:
    return [ins for ins in node.last if isinstance(ins, Log)]


def test_a_message_no_layer_takes_is_counted_unexpected_and_the_node_keeps_working(
    make_net: Any,
) -> None:
    net = make_net(["a", "b"])
    a = net["a"]
    a.handle_batch([Hello(1, "b", b"\0" * 32, 1 << 20), Welcome(), Barrier(7)], sender="b")
    assert a.errors == {"unexpected-Hello": 1, "unexpected-Welcome": 1}
    assert [(log.level, log.counter) for log in logs(a)] == [
        ("WARNING", "unexpected-Hello"),
        ("WARNING", "unexpected-Welcome"),
    ]
    assert net.queued("a", "b") == [Reply(7, Status.OK, None)]  # the rest of the batch
    net.deliver_all()
    key = net.key("sw", "b")
    held = hold(net, "a", key)
    assert net["a"].objects[("sw", key)] is held


def test_a_store_error_raised_on_a_peer_s_data_is_counted_malformed(make_net: Any) -> None:
    """A handler that finds a peer's message makes no sense raises a StoreError: the
    router counts ``malformed-<Type>`` (the peer's fault), never raises it, and goes on with
    the batch.  A hand-on entry whose record has the wrong shape is refused by the key layer
    itself (``malformed-hand-on``), and the rest of the hand-on is adopted."""
    net = make_net(["a", "b"])
    a = net["a"]
    fold = a.router._takes[Fold]

    def refuse(msg: Fold, sender: str) -> None:
        if msg.seq == 666:
            raise MalformedMessage("this state makes no sense")
        fold(msg, sender)

    a.router._takes[Fold] = refuse
    a.handle_batch([Fold("mm", 1, 666, b"\xa0"), Barrier(3)], sender="b")
    assert a.errors == {"malformed-Fold": 1}
    assert [(log.level, log.counter) for log in logs(a)] == [("WARNING", "malformed-Fold")]
    assert net.queued("a", "b") == [Reply(3, Status.OK, None)]
    net.deliver_all()

    ours, theirs = net.key("sw", "a"), net.key("sw", "b")
    epoch = a.view.epoch
    a.handle(HandOns(epoch, [["sw", theirs, [0, "b"], []], ["sw", ours, [0, "b", 5, 1], []]]), "b")
    assert a.errors == {"malformed-Fold": 1, "malformed-hand-on": 1}
    assert a.router.keys.record(("sw", theirs)) is None
    adopted = a.router.keys.record(("sw", ours))
    assert adopted is not None and (adopted.state, adopted.owner) == (KeyState.LIVE, "b")
    assert net.queued("a", "b") == [HandOnsAck(epoch, 1)]


def test_a_bug_in_a_handler_raises_under_raise_bugs_and_is_counted_otherwise(
    make_net: Any,
) -> None:
    net = make_net(["a", "b"])
    a = net["a"]
    barrier = a.router._takes[Barrier]

    def buggy(msg: Barrier, sender: str) -> None:
        if msg.req_id >= 100:
            raise RuntimeError("oops")
        barrier(msg, sender)

    a.router._takes[Barrier] = buggy  # a bug of ours in the object layer's handler
    assert a.router.raise_bugs
    with pytest.raises(RuntimeError, match="oops"):
        a.handle(Barrier(100), sender="b")
    assert a.errors == {"bug-RuntimeError": 1}  # counted before it was raised

    a.router.raise_bugs = False
    a.handle_batch([Barrier(101), Barrier(1)], sender="b")
    assert a.errors == {"bug-RuntimeError": 2}
    bugs = [log for log in logs(a) if log.counter == "bug-RuntimeError"]
    assert len(bugs) == 2  # the raised one's log line too, on the next answer
    assert all(log.level == "ERROR" and isinstance(log.error, RuntimeError) for log in bugs)
    assert classify("bug-RuntimeError") == "bug"
    assert net.queued("a", "b") == [Reply(1, Status.OK, None)]  # the rest of the batch
    net.deliver_all()
    key = net.key("sw", "b")
    held = hold(net, "a", key)  # and the node keeps working
    assert net["a"].objects[("sw", key)] is held


# -- instructions: causes and batches -------------------------------------------------------------


def test_instructions_name_the_request_they_serve(make_net: Any) -> None:
    """What a node does to start a request of its own carries ``(node, req_id)`` of that
    request, the id the wire carries, and so does the settling of its Wait when the answer
    comes: never another request's, even when both answers come in one batch.  (Regression:
    a Transfer's Resolve carried the cause of the Reply handled before it.)"""
    net = make_net(["a", "c"])
    a = net["a"]
    snapshot = a.snapshot("c", "sw", [])
    (send,) = a.last
    assert isinstance(send, Send) and send.to == "c"
    (ask,) = send.msgs
    assert isinstance(ask, Snapshot) and send.cause == ("a", ask.req_id)
    net.deliver_all()
    assert result(snapshot) == []

    k = ("sw", net.key("sw", "c"))
    mk = ("mw", net.key("mw", "c"))
    locating = a.locate(*mk, create=False)
    (send,) = a.last
    assert isinstance(send, Send) and send.to == "c"
    (op,) = send.msgs
    assert isinstance(op, KeyOp) and op.op == Op.LOCATE and send.cause == ("a", op.req_id)
    locate_id = op.req_id
    acquiring = a.acquire(*k, create=True)
    (send,) = a.last
    assert isinstance(send, Send) and send.to == "c"
    (op,) = send.msgs
    assert isinstance(op, KeyOp) and op.op == Op.CREATE and send.cause == ("a", op.req_id)
    acquire_id = op.req_id
    assert acquire_id != locate_id

    net.deliver("a", "c", 2)
    answers = net.queued("c", "a")
    assert [type(m) for m in answers] == [Reply, Transfer]
    net.queues[("c", "a")].clear()
    a.handle_batch(answers, sender="c")  # both answers in one batch
    causes = {id(ins.wait): ins.cause for ins in a.last if isinstance(ins, Resolve | Fail)}
    assert causes.keys() == {id(locating), id(acquiring)}
    assert causes[id(locating)] == ("a", locate_id)
    assert causes[id(acquiring)] == ("a", acquire_id)
    with pytest.raises(ObjectNotFound):
        locating.result()
    assert result(acquiring)[1] is True


def test_messages_are_sent_in_one_batch_per_destination(make_net: Any) -> None:
    """One ``handle`` that sends several messages to a node sends them as one ``Send``
    (one frame), in order; each destination gets one."""
    net = make_net(["a", "b", "c"])
    c = net["c"]
    keys = [k for k in range(1000) if net.ring.owner(key_token("sw", k)) == "c"][:3]
    for key in keys[:2]:
        net["a"].release_ref(("sw", key), hold(net, "a", key))
    for key in keys:
        net["b"].acquire("sw", key, create=False)
    asks = net.queued("b", "c")
    assert all(isinstance(m, KeyOp) and m.op == Op.ACQUIRE for m in asks) and len(asks) == 3
    unknown = asks[2]
    assert isinstance(unknown, KeyOp)
    net.queues[("b", "c")].clear()
    c.handle_batch(asks, sender="b")
    sends = {ins.to: ins.msgs for ins in c.last if isinstance(ins, Send)}
    assert set(sends) == {"a", "b"}
    releases = sends["a"]
    assert all(isinstance(m, Release) and m.to == "b" for m in releases)
    assert [m.key for m in releases if isinstance(m, Release)] == keys[:2]  # in order
    assert sends["b"] == [Reply(unknown.req_id, Status.NOT_FOUND, None)]
    net.deliver_all()
