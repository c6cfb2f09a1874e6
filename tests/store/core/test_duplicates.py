"""A numbered message delivered twice is applied once (``ObjectLayer._fresh``).

Every call and fold a node sends about a multi-writer object carries ``seq``, the sender's
count of its numbered messages about that object; the holder keeps the highest ``seq`` it
applied from each sender and refuses a message whose ``seq`` is not higher.  Nothing in the
simulations ever repeats a message (a pair queue delivers each once), so over the whole
suite that check refused nothing, and a bug in it would go unseen.  Here the same message
reaches the holder twice, as a link that re-sends after a reconnect would deliver it.
"""

from __future__ import annotations

from typing import Any

from ring.hashring import HashRing, key_token
from store.core.objects import info_of
from store.core.scheduler import Wait
from store.wire.codes import Status
from store.wire.messages import Call, Fold, Message, Reply, Untethered
from tests.fixtures.core import CoreNode
from tests.fixtures.objects import MAPS, Merged, Shared

MW = info_of(Shared)
MM = info_of(Merged)


class Pair:
    """Two nodes, ``a`` (the caller) and ``b`` (the holder), messages moved by hand."""

    def __init__(self) -> None:
        self.ring = HashRing(["a", "b"], vnodes=16)
        self.a = CoreNode("a", self.ring, MAPS)
        self.b = CoreNode("b", self.ring, MAPS)
        self.nodes = {"a": self.a, "b": self.b}

    def sent(self, src: str, dst: str) -> list[Message]:
        return self.nodes[src].take_outbox().get(dst, [])

    def settle(self) -> None:
        """Deliver everything, in order, until nobody has anything to send."""
        for _ in range(100):
            busy = False
            for src, dst in (("a", "b"), ("b", "a")):
                for msg in self.sent(src, dst):
                    busy = True
                    self.nodes[dst].handle(msg, sender=src)
            if not busy:
                return
        raise AssertionError("the nodes never went quiet")

    def made_at_b(self, map_name: str) -> tuple[str, Any]:
        """A multi-writer object held by ``b`` whose key ``a`` owns (so ``a`` knows where
        it is), located by ``a``."""
        key = next(k for k in range(1000) if self.ring.owner(key_token(map_name, k)) == "a")
        creating = self.b.locate(map_name, key, True)
        self.settle()
        assert creating.result() == ("b", True)
        finding = self.a.locate(map_name, key, False)
        self.settle()
        assert finding.result() == ("b", False)
        return (map_name, key)


def test_an_untethered_batch_delivered_twice_is_applied_once() -> None:
    net = Pair()
    k = net.made_at_b("mw")
    assert net.a.call(k, MW, "bump", ("a", 1, 2), "b", 0.0) is None
    assert net.a.call(k, MW, "bump", ("a", 2, 3), "b", 0.0) is None
    (batch,) = net.sent("a", "b")
    assert isinstance(batch, Untethered) and [c[4] for c in batch.calls] == [1, 2]
    for _ in range(2):
        net.b.handle(batch, sender="a")
    held = net.b.objects[k]
    assert held.obj.log == [["a", 1], ["a", 2]] and held.obj.value == 5
    # A later call is still taken: the check refuses repeats, not newer numbers.
    net.a.call(k, MW, "bump", ("a", 3, 4), "b", 0.0)
    net.settle()
    assert held.obj.log == [["a", 1], ["a", 2], ["a", 3]] and held.obj.value == 9
    assert not net.b.statistics().errors


def test_an_untethered_call_delivered_twice_is_applied_once() -> None:
    """One untethered call as a message of its own (``req_id`` 0, ``seq`` > 0): how a node
    sends one to itself, and how one travels when it is shipped alone."""
    net = Pair()
    k = net.made_at_b("mw")
    call = Call(k[0], k[1], "bump", ["a", 1, 2], 0, 1)
    net.b.handle(call, sender="a")
    net.b.handle(call, sender="a")
    assert net.b.objects[k].obj.log == [["a", 1]]
    # The same seq from another sender is another call.
    net.b.handle(Call(k[0], k[1], "bump", ["b", 2, 1], 0, 1), sender="b")
    assert net.b.objects[k].obj.log == [["a", 1], ["b", 2]]


def test_a_blocking_call_delivered_twice_is_applied_once_and_the_repeat_refused() -> None:
    net = Pair()
    k = net.made_at_b("mw")
    adding = net.a.call(k, MW, "add", ("a", 1, 5), "b", 0.0)
    assert isinstance(adding, Wait)
    (call,) = net.sent("a", "b")
    assert isinstance(call, Call) and call.req_id and call.seq
    net.b.handle(call, sender="a")
    net.b.handle(call, sender="a")
    first, again = net.sent("b", "a")
    assert first == Reply(call.req_id, Status.OK, 5)
    assert isinstance(again, Reply) and again.status == Status.ERROR
    assert again.value[0] == "Duplicate"
    assert net.b.objects[k].obj.log == [["a", 1]] and net.b.objects[k].obj.value == 5


def test_a_fold_delivered_twice_is_merged_once() -> None:
    net = Pair()
    k = net.made_at_b("mm")
    for op in (1, 2):  # into a's replica of the object, folded at the next flush
        assert net.a.call(k, MM, "bump", ("a", op, 10), "b", 0.0) is None
    assert k in net.a.replicas
    net.a.fold_replicas()
    (fold,) = net.sent("a", "b")
    assert isinstance(fold, Fold) and fold.seq
    for _ in range(2):
        net.b.handle(fold, sender="a")
    held = net.b.objects[k]
    assert held.obj.value == 20 and held.obj.log == [["a", 1], ["a", 2]]
    assert net.b.router.objects.merges == 1
