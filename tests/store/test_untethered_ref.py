"""``Map.untethered``: untethered updates of a mergeable multi-writer object that never
wait for its place.  The packet that reports to a shared object it has not met yet
finishes at once; its updates reach the object by the next flush, wherever it lives."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import store
from store import MultiWriter, SingleWriter, untethered
from tests.store.test_api import cluster, sent
from tests.store.test_fast_create import owned_by


class Tally(MultiWriter):
    def __init__(self, start: int = 0) -> None:
        self.n = start

    @untethered
    def add(self, n: int) -> None:
        self.n += n

    def value(self) -> int:
        return self.n

    def merge(self, other: Tally) -> None:
        self.n += other.n


class Plain(MultiWriter):
    """No merge: untethered calls are shipped, and ``untethered`` is ``create``."""

    def __init__(self) -> None:
        self.n = 0

    @untethered
    def add(self, n: int) -> None:
        self.n += n

    def value(self) -> int:
        return self.n


class Single(SingleWriter):
    def __init__(self) -> None:
        self.n = 0


async def _add(m: store.Map[Tally], key: Any, n: int) -> None:
    async with m.untethered(key) as ref:
        await ref.add(n)


async def _value(m: store.Map[Any], key: Any) -> int:
    async with m.get(key) as ref:
        return int(await ref.value())


async def test_a_first_update_of_an_object_whose_place_is_unknown_does_not_wait() -> None:
    async with cluster(2) as (a, b):
        ta, tb = a.map("tally", Tally), b.map("tally", Tally)
        key = owned_by(b, "tally", 1)[0]  # its key record is on b: a must ask b
        unit = a.submit_nowait("flow", _add, ta, key, 3)
        assert unit.done()  # finished inline: no round trip waited for
        unit.result()
        again = a.submit_nowait("flow", _add, ta, key, 4)  # before the answer came too
        assert again.done()
        with trio.fail_after(10):
            await a.flush()
            assert await _value(tb, key) == 7
            assert await _value(ta, key) == 7


async def test_updates_reach_an_object_made_elsewhere_before() -> None:
    async with cluster(2) as (a, b):
        ta, tb = a.map("tally", Tally), b.map("tally", Tally)
        key = owned_by(a, "tally", 1)[0]
        with trio.fail_after(10):
            async with tb.create(key, 10) as ref:  # made on b, its record on a
                assert ref.created
            for n in (1, 2, 3):
                unit = a.submit_nowait(("f", n), _add, ta, key, n)
                assert unit.done()
            await a.flush()
            assert await _value(tb, key) == 16


async def test_one_question_per_key_while_its_answer_is_on_its_way() -> None:
    async with cluster(2) as (a, b):
        ta = a.map("tally", Tally)
        b.map("tally", Tally)
        key = owned_by(b, "tally", 1)[0]
        before = sent(a)
        with trio.fail_after(10):
            for n in range(20):
                await _add(ta, key, n)  # (from a trio task: the same path, never waiting)
            asked = sent(a) - before
            assert asked == 1, asked  # one Locate for the twenty updates
            await a.flush()
            assert await _value(ta, key) == sum(range(20))


async def test_only_untethered_methods_and_created_is_not_told() -> None:
    async with cluster(2) as (a, b):
        ta = a.map("tally", Tally)
        b.map("tally", Tally)
        key = owned_by(b, "tally", 1)[0]
        with trio.fail_after(10):
            async with ta.untethered(key) as ref:
                assert ref.created is False
                with pytest.raises(TypeError, match="untethered methods only"):
                    await ref.value()
                await ref.add(1)
            with pytest.raises(store.ReferenceClosed):
                await ref.add(1)
            await a.flush()
            assert await _value(ta, key) == 1


async def test_a_class_without_merge_gets_a_plain_create() -> None:
    async with cluster(2) as (a, b):
        pa = a.map("plain", Plain)
        b.map("plain", Plain)
        key = owned_by(b, "plain", 1)[0]
        with trio.fail_after(10):
            async with pa.untethered(key) as ref:
                assert ref.created  # create's reference: it waited for the key owner
                assert await ref.value() == 0
                await ref.add(2)
            await a.flush()
            assert await _value(pa, key) == 2


async def test_an_update_that_cannot_be_placed_is_reported_by_the_flush() -> None:
    async with cluster(2) as (a, b):
        ta = a.map("kinds", Tally)
        sb = b.map("kinds", Single)  # the same name holds single-writer objects on b
        key = owned_by(b, "kinds", 1)[0]
        with trio.fail_after(10):
            async with sb.create(key):
                pass
            unit = a.submit_nowait("flow", _add, ta, key, 1)
            assert unit.done()
            with pytest.raises(store.UntetheredCallsFailed):
                await a.flush()
            await a.flush()  # reported once; the node goes on
            assert not a.node.core.objects.replicas


async def test_another_question_answered_first_does_not_drop_the_waiting_updates() -> None:
    """A get of the key, asked just before (its 'no such object' comes first), is not
    the answer the replica waits for: the create asked after it is."""
    async with cluster(2) as (a, b):
        ta = a.map("tally", Tally)
        b.map("tally", Tally)
        key = owned_by(b, "tally", 1)[0]
        missing = trio.Event()

        async def get() -> None:
            with pytest.raises(store.ObjectNotFound):
                async with ta.get(key):
                    pass
            missing.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get)
                objects = a.node.core.objects
                while not objects._expects(("tally", key)):  # until the get has asked
                    await trio.lowlevel.checkpoint()
                assert not missing.is_set()
                await _add(ta, key, 5)  # before the answer to it came
            assert missing.is_set()
            await a.flush()
            assert await _value(ta, key) == 5


def test_a_question_nobody_awaits_goes_with_the_next_timed_flush() -> None:
    """The core's side: an untethered reference's Locate is not urgent, nor is the key
    request it routes to the key owner (no frame of its own); a create's is."""
    from ring.hashring import HashRing, key_token
    from store.core.instructions import Locate, Send
    from store.core.scheduler import Wait
    from tests.fixtures.core import CoreNode

    ring = HashRing(["a", "b"], vnodes=16)
    a = CoreNode("a", ring, {"tally": Tally})
    key, other = [k for k in range(1000) if ring.owner(key_token("tally", k)) == "b"][:2]
    lazy = a.run(Locate(("tally", key), True, Wait(key), (), urgent=False))
    assert not [i for i in lazy if isinstance(i, Send)]  # kept for the timed flush
    assert a.take_outbox()["b"]  # which sends it
    awaited = a.run(Locate(("tally", other), True, Wait(other), ()))
    sends = [i for i in awaited if isinstance(i, Send)]
    assert sends and all(s.urgent for s in sends)
