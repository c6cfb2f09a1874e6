"""A leaving node hands its objects over in bulk (``ScaleIn.evacuate``, issue 9).

Cores driven by hand, every message through the wire codec on its way (``encode_batch`` and
``decode_batch``, so that what is checked is what a peer would get).  The objects of one
drain step go to each next key owner as one :class:`Evacuates` (several when they would
pass the frame limit), answered by one :class:`EvacuatesAck`; the receiver installs a batch
whole or not at all, resolves each class once per batch (a class it cannot import makes
opaque objects, handed on intact), and tells each key's authority where the object went
(the leaver hands its key records on first, so that authority is usually the receiver).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from ring.hashring import HashRing, key_token
from ring.ownership import NodeView, Stage
from store.core.held import Held
from store.core.objects import SingleWriter, info_of
from store.core.scale_in import EVACUATE_BYTES
from store.core.scheduler import Wait
from store.wire.codes import Kind
from store.wire.errors import MalformedMessage
from store.wire.messages import (
    Evacuates,
    EvacuatesAck,
    HandOns,
    Message,
    decode_batch,
    encode_batch,
    encode_message,
)
from tests.fixtures.core import CoreNode
from tests.fixtures.objects import MAPS, Counter

BLOB_PATH = f"{__name__}:Blob"


class Blob(SingleWriter):
    """An object whose state is as large as we like."""

    def __init__(self) -> None:
        self.data = b""

    def fill(self, size: int) -> None:
        self.data = bytes(size)

    def size(self) -> int:
        return len(self.data)


MAPS_HERE: dict[str, type] = {**MAPS, "blob": Blob}


class Net:
    """Cores on one ring with FIFO links; every message is encoded and decoded on its way."""

    def __init__(
        self,
        names: list[str],
        *,
        maps: dict[str, dict[str, type]] | None = None,
        max_frame: int | None = None,
    ) -> None:
        self.ring = HashRing(names, vnodes=16)
        self.nodes = {
            n: CoreNode(n, self.ring, (maps or {}).get(n, MAPS_HERE), max_frame=max_frame)
            for n in names
        }
        self.queues: dict[tuple[str, str], deque[Message]] = {}
        self.sent: list[tuple[str, str, Message]] = []

    def __getitem__(self, name: str) -> CoreNode:
        return self.nodes[name]

    def collect(self) -> None:
        for name, node in self.nodes.items():
            for dest, msgs in node.take_outbox().items():
                msgs = decode_batch(encode_batch(msgs))  # what the peer gets
                self.sent.extend((name, dest, m) for m in msgs)
                self.queues.setdefault((name, dest), deque()).extend(msgs)

    def queued(self, src: str, dst: str) -> list[Message]:
        self.collect()
        return list(self.queues.get((src, dst), ()))

    def deliver(self, src: str, dst: str) -> Message:
        self.collect()
        msg = self.queues[(src, dst)].popleft()
        self.nodes[dst].handle(msg, src)
        return msg

    def deliver_pair(self, src: str, dst: str) -> None:
        while self.queued(src, dst):
            self.deliver(src, dst)

    def deliver_all(self) -> None:
        for _ in range(100_000):
            self.collect()
            busy = sorted(pair for pair, q in self.queues.items() if q)
            if not busy:
                return
            self.deliver(*busy[0])
        raise AssertionError("never quiet")

    def sent_of(self, kind: type, src: str | None = None) -> list[tuple[str, str, Any]]:
        return [s for s in self.sent if type(s[2]) is kind and src in (None, s[0])]

    def create(self, node: str, map_name: str, key: Any, *, fill: int = 0) -> None:
        """Make ``map_name[key]`` at ``node`` (set to ``key`` or filled with ``fill``
        bytes) and let the reference go; a multi-writer one stays where it was made."""
        if map_name in ("mw", "mm"):
            where: Wait[Any] = self.nodes[node].locate(map_name, key, True)
            self.deliver_all()
            assert where.result() == (node, True)
            return
        wait: Wait[tuple[Held, bool]] = self.nodes[node].acquire(map_name, key, True)
        self.deliver_all()
        held, _ = wait.result()
        if map_name == "blob":
            held.obj.fill(fill)
        else:
            held.obj.add(key)
        self.nodes[node].release_ref((map_name, key), held)

    def scale_in(self, leaver: str) -> HashRing:
        nxt = self.ring.with_nodes(removed=[leaver])
        for stage in (Stage.PRE_SCALING, Stage.SCALING):
            for name, node in self.nodes.items():
                node.enter_stage(NodeView(name, stage, self.ring, nxt))
        return nxt

    def holder(self, k: tuple[str, Any]) -> list[str]:
        return [n for n, node in self.nodes.items() if k in node.objects]

    def validate(self) -> None:
        self.collect()
        for node in self.nodes.values():
            node.validate()


def drain_until_done(net: Net, leaver: str, limit: int) -> list[int]:
    """Drain steps of ``limit`` at the leaver, everything delivered after each, until it
    reports drained; the units each step moved."""
    moved = []
    for _ in range(1000):
        step = net[leaver].drain_step(limit)
        moved.append(step.moved)
        net.deliver_all()
        if step.drained and not step.moved:
            return moved
    raise AssertionError("never drained")


def objects_of(net: Net, node: str) -> dict[tuple[str, Any], Any]:
    return dict(net[node].objects)


# -- the batch path ------------------------------------------------------------------------


def test_one_batch_per_receiver_and_step_and_one_ack_per_batch() -> None:
    net = Net(["a", "b", "c"])
    keys = list(range(60))
    for key in keys:
        net.create("a", "sw", key)
    net.create("a", "mw", 1000)
    net.validate()
    moved_here = sorted(objects_of(net, "a"))
    assert len(moved_here) == 61
    nxt = net.scale_in("a")
    records = len(net["a"].records)
    assert records
    # One step: the records first (their receivers then hold them when the objects
    # arrive), then the objects.
    step = net["a"].drain_step(records + 100)
    assert step.moved == records + 61
    net.collect()
    evacuations = [(dst, m) for _, dst, m in net.sent_of(Evacuates, "a")]
    assert {dst for dst, _ in evacuations} == {"b", "c"}
    assert len(evacuations) == 2, "one batch per receiver in one step"
    assert sum(len(m.keys) for _, m in evacuations) == 61
    assert net.sent_of(HandOns, "a")
    for dst in ("b", "c"):  # on each link, no record after the objects
        kinds = [type(m) for m in net.queued("a", dst)]
        assert HandOns not in kinds[kinds.index(Evacuates) :], kinds
    assert not net["a"].drain_step(0).drained  # acknowledgements still to come
    net.deliver_all()
    acks = net.sent_of(EvacuatesAck)
    assert len(acks) == 2 and sorted(m.count for _, _, m in acks) == sorted(
        len(m.keys) for _, m in evacuations
    )
    assert net["a"].drain_step(0).drained
    for k in moved_here:
        dest = nxt.owner(key_token(*k))
        assert net.holder(k) == [dest]
        # The key's authority (its next owner: the receiver itself) names the new holder.
        rec = net[dest].router.keys.record(k)
        assert rec is not None and rec.owner == dest and rec.version == net[dest].objects[k].version
    for key in keys:
        (where,) = net.holder(("sw", key))
        assert net[where].objects[("sw", key)].obj.value == key
    assert not net["a"].objects
    net.validate()


def test_a_leave_takes_the_pace_it_is_given_and_every_object_arrives() -> None:
    net = Net(["a", "b"])
    for key in range(50):
        net.create("a", "sw", key)
    net.scale_in("a")
    records = len(net["a"].records)
    moved = drain_until_done(net, "a", 7)
    assert sum(moved) == records + 50 and max(moved) <= 7
    # Every step that moved objects sent one batch (the leaver's other receiver is none).
    steps_with_objects = len(net.sent_of(Evacuates, "a"))
    assert steps_with_objects == len(net.sent_of(EvacuatesAck, "b"))
    assert sorted(key for _, key in net["b"].objects) == list(range(50))
    assert all(net["b"].objects[("sw", k)].obj.value == k for k in range(50))
    assert net["a"].router.statistics().objects_evacuated == 50
    assert net["b"].router.statistics().migrations_in == 50
    net.validate()


def test_a_batch_is_split_under_the_frame_limit() -> None:
    max_frame = 64 * 1024
    net = Net(["a", "b"], max_frame=max_frame)
    max_payload = net["a"].router.out.max_payload
    budget = min(EVACUATE_BYTES, max_payload)
    for key in range(20):
        net.create("a", "blob", key, fill=6000)  # about 9 of them per batch
    net.create("a", "blob", 100, fill=budget - 100)  # fits a batch only alone
    net.create("a", "blob", 101, fill=max_payload + 1)  # fits no frame: stays
    net.scale_in("a")
    for _ in range(5):
        net["a"].drain_step(1000)
        net.deliver_all()
    batches = [m for _, _, m in net.sent_of(Evacuates, "a")]
    assert len(batches) >= 4
    for msg in batches:
        assert len(encode_message(msg)) <= max_payload
        assert len(encode_batch([msg])) <= max_frame
    alone = [m for m in batches if 100 in m.keys]
    assert len(alone) == 1 and alone[0].keys == [100]
    assert sorted(key for _, key in net["b"].objects) == [*range(20), 100]
    assert net["b"].objects[("blob", 100)].obj.size() == budget - 100
    # The one over the frame limit stays, and says why (as a state cbor cannot carry).
    assert list(net["a"].objects) == [("blob", 101)]
    assert net["a"].router.statistics().errors == {"state-not-encodable": 1}  # once, not per step
    assert not net["a"].drain_step(0).drained
    (log,) = [log for log in net["a"].logs if log.counter == "state-not-encodable"]
    assert f"over the {max_payload} a frame holds" in log.text


def test_a_class_the_receiver_cannot_import_is_held_as_its_state_and_handed_on_intact() -> None:
    # b has no map "blob" and cannot import the class: it holds the objects opaquely.
    maps = {"a": MAPS_HERE, "b": dict(MAPS), "c": MAPS_HERE}
    net = Net(["a", "b", "c"], maps=maps)
    tried: list[str] = []

    def cannot_import(path: str) -> Any:
        tried.append(path)
        raise ImportError(f"no module named {path.partition(':')[0]!r}")

    net["b"].router.objects.resolve_class = cannot_import
    nxt = net.ring.with_nodes(removed=["a"])
    keys = [k for k in range(200) if nxt.owner(key_token("blob", k)) == "b"][:12]
    for key in keys:
        net.create("a", "blob", key, fill=key)
    net.scale_in("a")
    drain_until_done(net, "a", 1000)
    assert tried == [BLOB_PATH], "resolved once for the batch, not per object"
    errors = net["b"].router.statistics().errors
    assert errors == {"evacuate-unknown-class": 1}
    (log,) = [log for log in net["b"].logs if "evacuate-unknown-class" in log.text]
    assert BLOB_PATH in log.text and f"{len(keys)} objects" in log.text
    assert "ImportError" in log.text
    for key in keys:
        held = net["b"].objects[("blob", key)]
        assert type(held.obj).__qualname__ == "Blob" and held.obj is not None
    assert net["a"].drain_step(0).drained
    # c, which has the class, takes one back: it gets its state intact, as a Blob.
    for name, node in net.nodes.items():
        node.enter_stage(NodeView(name, Stage.NORMAL, nxt))
    wait = net["c"].acquire("blob", keys[3], False)
    net.deliver_all()
    held, created = wait.result()
    assert not created and type(held.obj) is Blob and held.obj.size() == keys[3]


def test_acks_are_counted_per_batch() -> None:
    net = Net(["a", "b"])
    for key in range(30):
        net.create("a", "sw", key)
    net.scale_in("a")
    records = len(net["a"].records)
    net["a"].drain_step(records)  # the records
    net.deliver_all()
    for _ in range(3):  # three batches of 10 objects, not delivered yet
        assert net["a"].drain_step(10).moved == 10
    net.collect()
    assert [len(m.keys) for m in net.queued("a", "b")] == [10, 10, 10]
    leaver = net["a"].router.objects
    assert len(leaver._batches) == 3 and not net["a"].objects
    net.deliver_pair("a", "b")  # b installs them: three acks, one per batch
    acks = net.queued("b", "a")
    assert [type(m) for m in acks] == [EvacuatesAck] * 3
    assert [m.count for m in acks] == [10, 10, 10]  # type: ignore[attr-defined]
    net.deliver("b", "a")
    assert len(leaver._batches) == 2 and not net["a"].drain_step(0).drained
    # An ack for no batch of ours, or of another event, counts nothing.
    first: EvacuatesAck = acks[0]  # type: ignore[assignment]
    net["a"].handle(EvacuatesAck(first.epoch, first.batch, 10), "b")  # twice
    net["a"].handle(EvacuatesAck(first.epoch + 1, acks[1].batch, 10), "b")  # type: ignore[attr-defined]
    assert len(leaver._batches) == 2
    net.deliver_pair("b", "a")
    assert not leaver._batches and net["a"].drain_step(0).drained
    net.validate()


def test_an_object_in_a_batch_in_flight_follows_its_requests() -> None:
    """While a batch travels, the key owner still names the leaver: a writer's request is
    answered once the receiver has the object and has told the key owner; a remove drops
    it at the receiver."""
    net = Net(["a", "b", "c"])
    nxt = net.ring.with_nodes(removed=["a"])
    to_b = [k for k in range(300) if nxt.owner(key_token("sw", k)) == "b"]
    wanted, removed = to_b[0], to_b[1]
    for key in (wanted, removed):
        net.create("a", "sw", key)
    net.scale_in("a")
    net["a"].drain_step(1000)
    net.collect()
    assert any(type(m) is Evacuates for m in net.queued("a", "b"))
    wait = net["c"].acquire("sw", wanted, False)
    gone = net["c"].remove("sw", removed)
    net.deliver_all()
    held, created = wait.result()
    assert not created and held.obj.value == wanted and held.version == 3
    assert gone.result() is True
    assert net.holder(("sw", removed)) == []
    assert net.holder(("sw", wanted)) == ["c"]
    net["c"].release_ref(("sw", wanted), held)
    net.validate()


def test_an_object_that_arrives_before_its_record_pulls_the_record() -> None:
    """The router hands records on before objects; should an object arrive first anyway
    (its record still at the leaver), the receiver's notice pulls the record from the
    leaver, as any request of a next owner that holds nothing does (rule S4)."""
    net = Net(["a", "b"])
    keys = [k for k in range(100) if net.ring.owner(key_token("sw", k)) == "a"][:5]
    for key in keys:
        net.create("a", "sw", key)
    net.scale_in("a")
    assert all(("sw", key) in net["a"].records for key in keys)
    net["a"].router.objects.evacuate(100)  # the objects alone, records not handed on yet
    net.deliver_all()
    for key in keys:
        k = ("sw", key)
        assert net.holder(k) == ["b"] and k not in net["a"].records
        rec = net["b"].router.keys.record(k)
        assert rec is not None and rec.owner == "b" and rec.version == 2
    drain_until_done(net, "a", 100)
    net.validate()


# -- a malformed batch is refused whole ------------------------------------------------------


def _batch(**change: Any) -> Evacuates:
    fields: dict[str, Any] = {
        "epoch": 1,
        "batch": 1,
        "classes": [("sw", "tests.fixtures.objects:Counter", Kind.SINGLE)],
        "of": [0, 0],
        "keys": [1, 2],
        "versions": [2, 2],
        "states": [b"\xa2cuid\x01evalue\x00", b"\xa2cuid\x02evalue\x00"],
    }
    fields.update(change)
    return Evacuates(**fields)


@pytest.mark.parametrize(
    "change",
    [
        {"of": [0, 1]},  # a class index past the table
        {"of": [0, -1]},
        {"of": [0]},  # columns of different lengths
        {"states": [b"\xa2cuid\x01evalue\x00", b"\xff\x00"]},  # a state that is not cbor
        {"states": [b"\xa2cuid\x01evalue\x00", b"\x82\x01\x02"]},  # not a map of fields
    ],
)
def test_a_malformed_batch_is_refused_whole_and_not_acknowledged(change: dict[str, Any]) -> None:
    node = CoreNode("b", HashRing(["a", "b"], vnodes=16), MAPS)
    msg = decode_batch(encode_batch([_batch(**change)]))[0]
    node.handle(msg, "a")
    assert not node.objects
    assert node.router.statistics().errors == {"malformed-Evacuates": 1}
    assert node.take_outbox() == {}


def test_a_well_formed_batch_round_trips_and_is_installed() -> None:
    node = CoreNode("b", HashRing(["a", "b"], vnodes=16), MAPS)
    msg = decode_batch(encode_batch([_batch()]))[0]
    assert msg == _batch()
    node.handle(msg, "a")
    assert sorted(node.objects) == [("sw", 1), ("sw", 2)]
    assert isinstance(node.objects[("sw", 1)].obj, Counter)
    (ack,) = node.take_outbox()["a"]
    assert ack == EvacuatesAck(1, 1, 2)


@pytest.mark.parametrize(
    "entry",
    [
        [36, 1, 1, [["sw", "m:C"]], [0], [1], [2], [b""]],  # a class without its kind
        [36, 1, 1, [["sw", "m:C", 7]], [0], [1], [2], [b""]],  # not a Kind
        [36, 1, 1, [["sw", "m:C", 0]], ["0"], [1], [2], [b""]],  # an index not an int
        [36, 1, 1, [["sw", "m:C", 0]], [0], [{"k": 1}], [2], [b""]],  # not key material
        [36, 1, 1, [["sw", "m:C", 0]], [0], [1], [2.5], [b""]],  # a version not an int
        [36, 1, 1, [["sw", "m:C", 0]], [0], [1], [2], ["state"]],  # a state not bytes
        [36, 1, 1, [["sw", "m:C", 0]], [0], [1], [2]],  # a column missing
    ],
)
def test_the_wire_refuses_a_batch_of_the_wrong_shape(entry: list[Any]) -> None:
    import cbor2

    with pytest.raises(MalformedMessage):
        decode_batch(cbor2.dumps([entry]))


def test_info_of_blob_is_a_store_class() -> None:
    assert info_of(Blob).cls is Blob
