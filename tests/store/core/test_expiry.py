"""A request that gets no answer fails its caller within ``request_timeout``, and a late
answer still leaves the node consistent (a granted object is installed, nothing is settled
twice).  The nodes are driven by hand: the "dead" peer is one whose messages the test never
delivers."""

from __future__ import annotations

from collections import deque

import pytest

from ring.hashring import HashRing, key_token
from store.core.scheduler import Wait
from store.wire.errors import PeerUnavailable
from store.wire.messages import Message
from tests.fixtures.core import CoreNode
from tests.fixtures.objects import MAPS, Shared

TIMEOUT = 2.0


def pair() -> tuple[HashRing, CoreNode, CoreNode]:
    ring = HashRing(["a", "b"], vnodes=16)
    a, b = CoreNode("a", ring, MAPS), CoreNode("b", ring, MAPS)
    for node in (a, b):
        node.router.objects.request_timeout = TIMEOUT
    return ring, a, b


def key_owned_by(ring: HashRing, map_name: str, owner: str) -> int:
    return next(k for k in range(1000) if ring.owner(key_token(map_name, k)) == owner)


def deliver_all(nodes: dict[str, CoreNode]) -> None:
    queues: dict[tuple[str, str], deque[Message]] = {}
    for _ in range(1000):
        for name, node in nodes.items():
            for dest, msgs in node.take_outbox().items():
                queues.setdefault((name, dest), deque()).extend(msgs)
        busy = [pair for pair, q in queues.items() if q]
        if not busy:
            return
        src, dst = busy[0]
        nodes[dst].handle(queues[(src, dst)].popleft(), src)
    raise AssertionError("never quiet")


def test_an_unanswered_acquire_fails_within_the_timeout_and_a_late_grant_is_kept() -> None:
    ring, a, b = pair()
    key = key_owned_by(ring, "sw", "b")
    wait = a.acquire("sw", key, create=True)
    held_back = a.take_outbox()  # the key owner b never hears of it (yet)
    assert held_back and not wait.done()
    a.now = TIMEOUT / 2
    a.take_outbox()  # a Flush: too early to give up
    assert not wait.done()
    a.now = TIMEOUT + 0.1
    a.take_outbox()
    assert wait.done()
    with pytest.raises(PeerUnavailable, match="no answer within"):
        wait.result()
    assert a.statistics().errors.get("request-expired") == 1
    a.validate()
    # The answer comes after all: the object b granted is held at a, and a later access
    # finds it here without asking anyone.
    for msg in held_back["b"]:
        b.handle(msg, "a")
    deliver_all({"a": a, "b": b})
    assert a.take("sw", key) is not None
    for node in (a, b):
        node.validate()


def test_an_unanswered_blocking_call_fails_and_the_node_keeps_working() -> None:
    ring, a, b = pair()
    key = key_owned_by(ring, "mw", "b")
    located: Wait[tuple[str, bool]] = b.locate("mw", key, create=True)
    deliver_all({"a": a, "b": b})
    owner, _ = located.result()
    assert owner == "b"
    info = a.maps["mw"]
    call = a.call(("mw", key), info, "add", ("a", 1, 5), "b", 0.0)
    assert isinstance(call, Wait)
    a.take_outbox()  # lost on its way: b has died
    a.now = TIMEOUT + 1
    a.take_outbox()
    with pytest.raises(PeerUnavailable):
        call.result()
    # Later calls go out as usual and are answered.
    again = a.call(("mw", key), info, "add", ("a", 2, 7), "b", a.now)
    deliver_all({"a": a, "b": b})
    assert again.result() == 7
    assert isinstance(b.objects[("mw", key)].obj, Shared)
    for node in (a, b):
        node.validate()
