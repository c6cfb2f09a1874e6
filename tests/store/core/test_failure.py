"""A failure event in the core: a node dies, the survivors repair the ring without it.

Three cores are driven by hand; the dead one's messages are never delivered again.  After
the repair every object a survivor holds is found again through its (possibly rebuilt) key
record, the dead node's objects are reported lost (``ObjectLost``) where their record
survived and absent (``ObjectNotFound``) where it died with the node, ``create`` makes a
lost object anew, and requests that were on their way to the dead node are retried.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from ring.hashring import HashRing, key_token
from ring.ownership import NodeView, Stage
from store.core.instructions import DrainStep, Repair, Undeliverable
from store.core.key_layer import KeyState
from store.core.objects import UntetheredCallsFailed
from store.core.scheduler import Wait
from store.wire.codes import Arrival, Kind, MovedNote, Op, Status
from store.wire.errors import ObjectLost, ObjectNotFound, PeerUnavailable
from store.wire.messages import Drop, KeyOp, Message, Reply, Report, Transfer
from tests.fixtures.core import CoreNode
from tests.fixtures.objects import MAPS

KEYS = 60


class Net:
    """Cores joined by FIFO links; a dead node neither sends nor receives any more."""

    def __init__(self, names: list[str]) -> None:
        self.ring = HashRing(names, vnodes=16)
        self.nodes = {n: CoreNode(n, self.ring, MAPS) for n in names}
        self.dead: set[str] = set()
        self.queues: dict[tuple[str, str], deque[Message]] = {}

    def collect(self) -> None:
        for name, node in self.nodes.items():
            for dest, msgs in node.take_outbox().items():
                if name not in self.dead:
                    self.queues.setdefault((name, dest), deque()).extend(msgs)

    def deliver_all(self, skip: set[tuple[str, str]] | None = None) -> None:
        for _ in range(100_000):
            self.collect()
            busy = [
                p
                for p, q in self.queues.items()
                if q and p[1] not in self.dead and p[0] not in self.dead and p not in (skip or ())
            ]
            if not busy:
                return
            src, dst = busy[0]
            self.nodes[dst].handle(self.queues[(src, dst)].popleft(), src)
        raise AssertionError("never quiet")

    def kill(self, name: str) -> None:
        self.dead.add(name)
        for pair in list(self.queues):
            if name in pair:
                del self.queues[pair]

    def repair(self, epoch: int) -> dict[str, Wait[Any]]:
        alive = sorted(set(self.nodes) - self.dead)
        ring = HashRing(alive, vnodes=16, epoch=epoch)
        waits: dict[str, Wait[Any]] = {}
        for name in alive:
            waits[name] = Wait(("repair", name))
            view = NodeView(name, Stage.NORMAL, ring)
            self.nodes[name].run(Repair(view, frozenset(self.dead), waits[name]))
        return waits


def created(net: Net, node: str, key: int) -> None:
    wait = net.nodes[node].acquire("sw", key, True)
    net.deliver_all()
    held, _ = wait.result()
    net.nodes[node].release_ref(("sw", key), held)


def holder_of(net: Net, key: int) -> str | None:
    for name, node in net.nodes.items():
        if name not in net.dead and ("sw", key) in node.router.objects.objects:
            return name
    return None


def test_survivors_rebuild_records_and_the_dead_nodes_objects_are_lost() -> None:
    net = Net(["a", "b", "c"])
    makers = ["a", "b", "c"]
    for key in range(KEYS):
        created(net, makers[key % 3], key)
    old_owner = {key: net.ring.owner(key_token("sw", key)) for key in range(KEYS)}
    net.kill("c")
    waits = net.repair(epoch=2)
    net.deliver_all()
    assert all(w.done() for w in waits.values()), "the rebuild never ended"
    a = net.nodes["a"]
    lost = not_found = found = 0
    for key in range(KEYS):
        wait = a.acquire("sw", key, False)
        net.deliver_all()
        if makers[key % 3] != "c":
            held, made = wait.result()  # a survivor's object is found again, not made anew
            assert not made
            a.release_ref(("sw", key), held)
            found += 1
        elif old_owner[key] == "c":
            with pytest.raises(ObjectNotFound) as info:
                wait.result()
            assert not isinstance(info.value, ObjectLost)  # its record died with it
            not_found += 1
        else:
            with pytest.raises(ObjectLost):
                wait.result()
            lost += 1
    assert found == 40 and lost and not_found, (found, lost, not_found)
    # A lost object comes back through create, as new.
    victim = next(k for k in range(KEYS) if makers[k % 3] == "c" and old_owner[k] != "c")
    wait = net.nodes["b"].acquire("sw", victim, True)
    net.deliver_all()
    held, made = wait.result()
    assert made
    for node in net.nodes.values():
        if node.name not in net.dead:
            node.router.validate()


def test_a_request_on_its_way_to_the_dead_key_owner_is_retried() -> None:
    net = Net(["a", "b", "c"])
    key = next(k for k in range(1000) if net.ring.owner(key_token("sw", k)) == "c")
    created(net, "b", key)  # held by b, its record at c
    wait = net.nodes["a"].acquire("sw", key, False)
    net.collect()  # the request is queued to c ... and c dies before it is delivered
    net.kill("c")
    waits = net.repair(epoch=2)
    net.deliver_all()
    assert all(w.done() for w in waits.values())
    held, made = wait.result()  # retried at the new key owner, which rebuilt the record
    assert not made and held.obj is not None
    assert holder_of(net, key) == "a"


def test_requests_for_unknown_keys_wait_until_every_survivor_reported() -> None:
    net = Net(["a", "b", "c"])
    ring = HashRing(["a", "b"], vnodes=16, epoch=2)
    key = next(
        k
        for k in range(1000)
        if net.ring.owner(key_token("sw", k)) == "c" and ring.owner(key_token("sw", k)) == "a"
    )
    created(net, "b", key)  # held by b, which has not reported yet when a asks
    net.kill("c")
    new_owner, other = "a", "b"
    # The new owner repairs first and gets a create for the key before the other
    # survivor (which may hold the object) has reported: the create must wait.
    waits: dict[str, Wait[Any]] = {}
    for name in [new_owner, other]:
        waits[name] = Wait(name)
    net.nodes[new_owner].run(
        Repair(NodeView(new_owner, Stage.NORMAL, ring), frozenset({"c"}), waits[new_owner])
    )
    maker = net.nodes[new_owner].acquire("sw", key, True)
    net.deliver_all()
    assert not maker.done(), "served before every survivor reported"
    rec = net.nodes[new_owner].router.keys.record(("sw", key))
    assert rec is None
    net.nodes[other].run(
        Repair(NodeView(other, Stage.NORMAL, ring), frozenset({"c"}), waits[other])
    )
    net.deliver_all()
    _held, made = maker.result()
    assert not made, "a second copy was made of an object a survivor holds"
    rec = net.nodes[new_owner].router.keys.record(("sw", key))
    assert rec is not None and rec.state is KeyState.LIVE


def test_a_remove_waiting_for_a_dead_holder_is_answered() -> None:
    net = Net(["a", "b", "c"])
    key = next(k for k in range(1000) if net.ring.owner(key_token("sw", k)) == "a")
    created(net, "c", key)
    wait = net.nodes["b"].remove("sw", key)
    net.deliver_all(skip={("a", "c")})  # the Drop to c is never delivered
    net.kill("c")
    net.repair(epoch=2)
    net.deliver_all()
    assert wait.result() is True
    again = net.nodes["b"].acquire("sw", key, False)
    net.deliver_all()
    with pytest.raises(ObjectNotFound):
        again.result()


def test_a_request_of_a_node_that_died_while_it_waited_is_not_served() -> None:
    """d's request waits in the key owner's queue behind c's; d dies.  Serving it later
    would hand the object to a dead node (lost); it is dropped instead."""
    net = Net(["a", "b", "c", "d"])
    key = next(k for k in range(1000) if net.ring.owner(key_token("sw", k)) == "a")
    wait = net.nodes["b"].acquire("sw", key, True)
    net.deliver_all()
    held, _ = wait.result()  # b holds it, its reference still open
    for_c = net.nodes["c"].acquire("sw", key, False)
    net.deliver_all()
    net.nodes["d"].acquire("sw", key, False)
    net.deliver_all()  # d's request queues at a behind c's
    net.kill("d")
    net.repair(epoch=2)
    net.deliver_all()
    net.nodes["b"].release_ref(("sw", key), held)  # now b hands it over, to c
    net.deliver_all()
    held_c, _ = for_c.result()
    net.nodes["c"].release_ref(("sw", key), held_c)
    net.deliver_all()
    assert holder_of(net, key) == "c", "the object went to a dead node"
    rec = net.nodes["a"].router.keys.record(("sw", key))
    assert rec is not None and rec.state is KeyState.LIVE and rec.owner == "c"


def test_a_request_queued_for_the_dead_owner_and_sent_again_is_served_once() -> None:
    """What was queued for the dead node comes back to its sender at the repair (the
    shell's queue); a key request among it that the repair already sent again is not sent
    a second time."""
    net = Net(["a", "b", "c"])
    key = next(k for k in range(1000) if net.ring.owner(key_token("sw", k)) == "c")
    wait = net.nodes["a"].acquire("sw", key, True)
    queued = list(net.nodes["a"].take_outbox().get("c", []))
    assert queued, "the create should be on its way to c"
    net.kill("c")
    net.repair(epoch=2)
    net.nodes["a"].run(Undeliverable("c", queued))
    net.deliver_all()
    _held, made = wait.result()
    assert made
    for name in ("a", "b"):
        errors = net.nodes[name].router.statistics().errors
        assert not {"transfer-without-request", "reply-without-request"} & errors.keys(), errors


def test_a_replicas_updates_for_a_dead_holder_make_the_flush_raise() -> None:
    """Updates merged into a replica of an object whose holder died are lost with it: the
    fold that meets the dead node is relocated, finds the object lost, and the updater's
    next flush says so (before, the fold was only counted where it bounced)."""
    net = Net(["a", "b", "c"])
    key = next(k for k in range(1000) if net.ring.owner(key_token("mm", k)) != "c")
    made = net.nodes["c"].locate("mm", key, True)
    net.deliver_all()
    owner, _ = made.result()
    assert owner == "c"
    a = net.nodes["a"]
    info = a.router.objects.maps["mm"]
    a.call(("mm", key), info, "bump", ("a", 1, 5), "c", 0.0)  # into a's replica
    assert ("mm", key) in a.replicas
    net.kill("c")
    net.repair(epoch=2)
    net.deliver_all()
    a.fold_replicas()  # the fold goes to c, which is departed: relocated
    net.deliver_all()
    check = a.flush_check()
    with pytest.raises(UntetheredCallsFailed):
        check.result()


def test_a_hand_over_in_flight_when_the_key_owner_dies_is_found_again() -> None:
    """b hands the object to c (the Transfer travels) as the key owner d dies: c reported
    nothing (it held nothing yet), but b's notice, routed afresh to the new owner, rebuilds
    the record, and the object is found where it is (not made a second time)."""
    net = Net(["a", "b", "c", "d"])
    ring = HashRing(["a", "b", "c"], vnodes=16, epoch=2)
    key = next(
        k
        for k in range(1000)
        if net.ring.owner(key_token("sw", k)) == "d" and ring.owner(key_token("sw", k)) == "a"
    )
    created(net, "b", key)
    wait = net.nodes["c"].acquire("sw", key, False)
    # c's request reaches d, d's release reaches b, b hands over: its Transfer to c and
    # its notice to d are queued, not delivered.
    net.deliver_all(skip={("b", "c"), ("b", "d")})
    assert net.nodes["b"].router.objects.objects.get(("sw", key)) is None
    held_back = list(net.queues.get(("b", "d"), []))
    net.kill("d")
    net.repair(epoch=2)
    net.nodes["b"].run(Undeliverable("d", held_back))  # the shell hands them back
    net.deliver_all()
    held, made = wait.result()
    assert not made
    net.nodes["c"].release_ref(("sw", key), held)
    assert holder_of(net, key) == "c"
    again = net.nodes["a"].acquire("sw", key, True)  # the record knows it: no second copy
    net.deliver_all()
    _held, made = again.result()
    assert not made and holder_of(net, key) == "a"


def test_a_drop_that_overtakes_a_multi_writer_create_answer_wins() -> None:
    """During an event a create may be answered by a key's previous owner and a later
    remove by its next owner: the Drop can reach the creator before the answer that makes
    the object there.  The object must not be made then (the scaling simulation's "holds v1
    after its Drop was delivered", seed 11)."""
    ring = HashRing(["a", "b"], vnodes=16)
    a = CoreNode("a", ring, MAPS)
    key = next(k for k in range(1000) if ring.owner(key_token("mw", k)) == "b")
    made = a.locate("mw", key, True)
    [req_id] = [i for i, p in a.router.objects._pending.items() if p.kind == "locate"]
    a.take_outbox()  # the create went to b
    a.handle(Drop("mw", key, 2), "b")  # the remove's Drop comes first
    a.handle(Reply(req_id, Status.OK, ["a", 1, True]), "b")  # then: made at a, version 1
    assert made.result() == ("a", True)  # the create happened ...
    assert ("mw", key) not in a.router.objects.objects  # ... and the object is gone
    a.router.validate()


def test_an_early_drop_is_forgotten_when_the_locate_it_waited_for_finds_nothing() -> None:
    """A Drop that reaches a node while its multi-writer locate is out is kept for the
    object the answer may bring (``_early_drop``); when the answer is NOT_FOUND nothing
    comes, and nothing may stay kept (the scaling simulation's ``--hypothesis-seed=258``:
    during an event the Drop came from the key's next owner, the answer from its previous
    one).  Without the ``del self._early_drop[k]`` of ``_reply_locate`` the layer's
    invariant fails."""
    ring = HashRing(["a", "b"], vnodes=16)
    key = next(k for k in range(100) if ring.owner(key_token("mw", k)) == "b")
    a = CoreNode("a", ring, MAPS)
    locating = a.locate("mw", key, True)
    (asked,) = a.take_outbox()["b"]
    a.handle(Drop("mw", key, 2), "b")
    a.validate()
    a.handle(Reply(asked.req_id, Status.NOT_FOUND, None), "b")
    with pytest.raises(ObjectNotFound):
        locating.result()
    a.validate()
    assert not a.router.objects._early_drop


def test_a_stale_notice_of_the_dead_epoch_does_not_lose_the_object_made_again() -> None:
    """``a`` hands an object to the key owner ``k`` (its Transfer and MOVED notice wait on
    the link) and asks for it again with a create, which waits behind them; ``k`` dies.
    The repair sends the create again, to the new key owner ``a``, which makes the object
    anew; then the queued notice comes back undeliverable and is routed afresh to ``a`` as
    well.  It names the dead ``k`` and a version of the dead epoch: it must read as stale,
    not turn the new object's record LOST (the crash simulation's ``--hypothesis-seed=34``:
    a held object whose record said absent).  Fixed by ``KeyLayer._first_version``: after
    a repair a record made from nothing starts above every version the dead epoch could
    reach, and a hand-over notice older than the record is ignored."""
    net = Net(["a", "b", "k"])
    after = HashRing(["a", "b"], vnodes=16, epoch=2)
    key = next(
        x
        for x in range(KEYS)
        if net.ring.owner(key_token("sw", x)) == "k" and after.owner(key_token("sw", x)) == "a"
    )
    a, k = net.nodes["a"], net.nodes["k"]
    created(net, "a", key)
    k.acquire("sw", key, False)  # k wants it: a hands it over...
    net.deliver_all(skip={("a", "k")})  # ...and its Transfer and notice wait on the link
    again = a.acquire("sw", key, True)
    net.collect()
    queued = list(net.queues.pop(("a", "k")))
    assert any(isinstance(m, Transfer) for m in queued)
    net.kill("k")
    net.repair(2)  # a's create is sent again, to a itself: made anew
    net.deliver_all()
    held, made = again.result()
    assert made and ("sw", key) in a.router.objects.objects
    a.run(Undeliverable("k", queued))  # the notice of the dead epoch, routed afresh
    net.deliver_all()
    rec = a.router.keys.record(("sw", key))
    assert rec is not None and rec.state is KeyState.LIVE and rec.owner == "a", rec
    a.release_ref(("sw", key), held)
    a.validate()


def test_a_hand_over_whose_notice_died_is_reported_by_its_receiver() -> None:
    """b hands the object to c as the key owner d dies, and b's notice to d died with d
    (written to the socket, never read).  c repairs before the Transfer lands, so neither
    reports it then.  c must report it when it lands, and the new key owner must not end
    its rebuild before: a create from a meanwhile would make a second copy.  Survivors
    send their Rebuilt markers only after a Flushed marker from every survivor, which comes
    behind everything the survivor sent before the event."""
    net = Net(["a", "b", "c", "d"])
    ring = HashRing(["a", "b", "c"], vnodes=16, epoch=2)
    key = next(
        k
        for k in range(1000)
        if net.ring.owner(key_token("sw", k)) == "d" and ring.owner(key_token("sw", k)) == "a"
    )
    created(net, "b", key)
    wait = net.nodes["c"].acquire("sw", key, False)
    net.deliver_all(skip={("b", "c"), ("b", "d")})
    assert net.nodes["b"].router.objects.objects.get(("sw", key)) is None
    net.kill("d")  # b's notice to d dies with it
    waits = net.repair(epoch=2)
    maker = net.nodes["a"].acquire("sw", key, True)
    net.deliver_all(skip={("b", "c")})  # everything but the Transfer (and what follows it)
    assert not maker.done(), "the new key owner ended its rebuild with an object in flight"
    assert not waits["a"].done()
    net.deliver_all()
    assert all(w.done() for w in waits.values())
    held, made = wait.result()
    assert not made
    net.nodes["c"].release_ref(("sw", key), held)
    net.deliver_all()
    _held, made = maker.result()
    assert not made, "a second copy was made of the object in flight"
    assert holder_of(net, key) == "a"
    for name in "abc":
        net.nodes[name].router.validate()


def test_a_paced_report_goes_out_a_few_objects_at_a_time() -> None:
    """With ``paced``, the repair reports nothing by itself: each DrainStep reports at most
    its limit (as the drain of a scaling event), the Rebuilt markers go out after the last
    one, and only then does the rebuild end; every survivor's object is then found."""
    net = Net(["a", "b", "c"])
    makers = ["a", "b", "c"]
    for key in range(KEYS):
        created(net, makers[key % 3], key)
    net.kill("c")
    ring = HashRing(["a", "b"], vnodes=16, epoch=2)
    waits = {n: Wait(n) for n in "ab"}
    for name in "ab":
        view = NodeView(name, Stage.NORMAL, ring)
        net.nodes[name].run(Repair(view, frozenset({"c"}), waits[name], True))
    net.deliver_all()
    assert not any(w.done() for w in waits.values()), "rebuilt before anything was reported"
    steps = 0
    while any(net.nodes[n].router.objects.reporting for n in "ab"):
        for name in "ab":
            net.nodes[name].run(DrainStep(3))
        net.collect()
        entries = sum(
            len(m.entries) for q in net.queues.values() for m in q if isinstance(m, Report)
        )
        assert entries <= 3 * 2, entries  # no step reports more than its limit
        net.deliver_all()
        steps += 1
    assert steps >= KEYS * 2 // 3 // 6, steps
    assert all(w.done() for w in waits.values())
    for key in range(KEYS):
        if makers[key % 3] == "c":
            continue
        wait = net.nodes["a"].acquire("sw", key, False)
        net.deliver_all()
        held, made = wait.result()
        assert not made
        net.nodes["a"].release_ref(("sw", key), held)


def test_a_rebuilt_record_is_above_the_dead_epoch_and_its_holder_knows() -> None:
    """A record rebuilt from a report takes a version above every version of the dead
    epoch, and its holder's object the same one, so that a late notice of the dead epoch
    (here a removal confirmed to the dead owner, routed afresh) reads as stale: the object
    stays, and its record still names its holder."""
    net = Net(["a", "b", "c"])
    after = HashRing(["a", "b"], vnodes=16, epoch=2)
    key = next(
        x
        for x in range(1000)
        if net.ring.owner(key_token("sw", x)) == "c" and after.owner(key_token("sw", x)) == "a"
    )
    created(net, "b", key)
    old = net.nodes["b"].router.objects.objects[("sw", key)].version
    net.kill("c")
    net.repair(epoch=2)
    net.deliver_all()
    rec = net.nodes["a"].router.keys.record(("sw", key))
    assert rec is not None and rec.state is KeyState.LIVE and rec.owner == "b"
    assert rec.version > 2 << 32 > old
    assert net.nodes["b"].router.objects.objects[("sw", key)].version == rec.version
    stale = KeyOp(
        Op.MOVED, "sw", key, Kind.SINGLE, "b", 7, 1, 0, Arrival.PLAIN, None, None, old + 1,
        MovedNote.DROPPED,
    )  # fmt: skip
    net.nodes["a"].handle(stale, "b")
    net.deliver_all()
    rec = net.nodes["a"].router.keys.record(("sw", key))
    assert rec is not None and rec.state is KeyState.LIVE and rec.owner == "b", rec
    wait = net.nodes["a"].acquire("sw", key, False)
    net.deliver_all()
    _held, made = wait.result()
    assert not made and holder_of(net, key) == "a"
    net.nodes["a"].router.validate()


def test_a_call_whose_holder_died_is_not_applied_to_an_object_made_since() -> None:
    """a's blocking call reaches the holder c and is applied there; c dies before its
    answer leaves.  The call may have been applied, to an object now lost: when a looks
    for the object again and finds one made since the repair (b made it anew), the call
    fails with ObjectLost instead of being applied a second time, to another object (the
    crash simulation's ``--hypothesis-seed=81``)."""
    net = Net(["a", "b", "c"])
    after = HashRing(["a", "b"], vnodes=16, epoch=2)
    key = next(
        x
        for x in range(1000)
        if net.ring.owner(key_token("mw", x)) == "b" and after.owner(key_token("mw", x)) == "b"
    )
    a, b, c = net.nodes["a"], net.nodes["b"], net.nodes["c"]
    made = c.locate("mw", key, True)  # a multi-writer object is made where it is asked for
    net.deliver_all()
    assert made.result() == ("c", True)
    info = a.router.objects.maps["mw"]
    call = a.call(("mw", key), info, "add", ("a", 1, 5), "c", 0.0)
    net.deliver_all(skip={("c", "a")})  # applied at c; its answer waits on the link
    assert c.router.objects.objects[("mw", key)].obj.log == [["a", 1]]
    net.kill("c")
    ring = HashRing(["a", "b"], vnodes=16, epoch=2)
    b.run(Repair(NodeView("b", Stage.NORMAL, ring), frozenset({"c"}), Wait("b")))
    again = b.locate("mw", key, True)  # the lost object made anew
    a.run(Repair(NodeView("a", Stage.NORMAL, ring), frozenset({"c"}), Wait("a")))
    net.deliver_all()
    assert again.result() == ("b", True)
    with pytest.raises(ObjectLost):
        call.result()
    assert b.router.objects.objects[("mw", key)].obj.log == []


def test_a_release_for_an_asker_that_died_keeps_the_object() -> None:
    """a creates an object (the key owner k's grant is on its way), b asks for it (k's
    release to a waits on the link behind the grant), and b dies.  a repairs and then
    gets the grant and the release: the object must stay with a, not be handed to the
    dead b and lost (the crash simulation's ``--hypothesis-seed=197``)."""
    net = Net(["a", "b", "k"])
    after = HashRing(["a", "k"], vnodes=16, epoch=2)
    key = next(
        x
        for x in range(1000)
        if net.ring.owner(key_token("sw", x)) == "k" and after.owner(key_token("sw", x)) == "k"
    )
    a, b = net.nodes["a"], net.nodes["b"]
    maker = a.acquire("sw", key, True)
    net.deliver_all(skip={("k", "a")})  # k granted it; the grant waits on the link
    b.acquire("sw", key, False)
    net.deliver_all(skip={("k", "a")})  # k asks a to release it to b, behind the grant
    assert [type(m).__name__ for m in net.queues[("k", "a")]] == ["Transfer", "Release"]
    net.kill("b")
    net.repair(epoch=2)
    net.deliver_all()
    held, made = maker.result()
    assert made
    a.release_ref(("sw", key), held)
    net.deliver_all()
    assert holder_of(net, key) == "a"
    rec = net.nodes["k"].router.keys.record(("sw", key))
    assert rec is not None and rec.state is KeyState.LIVE and rec.owner == "a", rec
    again = net.nodes["k"].acquire("sw", key, False)
    net.deliver_all()
    _held, made = again.result()
    assert not made and holder_of(net, key) == "k"


def test_a_leaver_told_it_holds_what_it_evacuated_does_not_mark_it_lost() -> None:
    """A leaving node evacuated an object and then asked for it again (a packet of its flow
    was still queued there); the key owner, not yet told of the evacuation, answers that
    the leaver holds it.  Nobody died: the leaver's caller fails, but the record must not
    be marked lost (the evacuation's notice would then have the new holder drop it)."""
    net = Net(["a", "b"])
    a, b = net.nodes["a"], net.nodes["b"]
    key = next(x for x in range(1000) if net.ring.owner(key_token("sw", x)) == "b")
    created(net, "a", key)
    assert ("sw", key) in a.router.objects.objects
    del a.router.objects.objects[("sw", key)]  # as if evacuated to b, notice not yet read
    a.router.objects.moved_to[("sw", key)] = "b"
    again = a.acquire("sw", key, False)
    net.deliver_all()
    with pytest.raises(PeerUnavailable):
        again.result()
    rec = b.router.keys.record(("sw", key))
    assert rec is not None and rec.state is KeyState.LIVE and rec.owner == "a", rec
