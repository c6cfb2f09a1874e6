"""Per-flow state made and ended where its key lives: a create or remove of a key this
node owns is done at once (no message, no wait), with the same outcomes as the slow path;
constructor arguments; a multi-writer create of an existing object uses the location cache.
"""

from __future__ import annotations

import pytest
import trio

import store
from ring.hashring import key_token
from store import MultiWriter, SingleWriter, stale
from tests.store.test_api import cluster, sent


class Entry(SingleWriter):
    def __init__(self, port: int = 0, note: str = "") -> None:
        self.port = port
        self.note = note
        self.hits = 0

    def hit(self) -> int:
        self.hits += 1
        return self.hits


class Pool(MultiWriter):
    def __init__(self, low: int = 1, high: int = 10) -> None:
        self.free = list(range(low, high))

    def take(self) -> int:
        return self.free.pop(0)


class Broken(SingleWriter):
    def __init__(self) -> None:
        raise ValueError("no entries today")


def owned_by(space: store.Space, map_name: str, count: int) -> list[int]:
    ring = space.node.view.ring
    return [k for k in range(1000) if ring.owner(key_token(map_name, k)) == space.name][:count]


async def test_a_create_and_remove_of_an_owned_key_send_nothing() -> None:
    async with cluster(2) as (a, b):
        entries = a.map("nat", Entry)
        b.map("nat", Entry)
        keys = owned_by(a, "nat", 20)
        before = sent(a), sent(b)
        for key in keys:
            async with entries.create(key, 4000 + key, "fwd") as ref:
                assert ref.created and await ref.hit() == 1
            async with entries.create(key) as ref:
                assert not ref.created and await ref.hit() == 2
        for key in keys:
            assert await entries.remove(key) is True
            assert await entries.remove(key) is False
        assert (sent(a), sent(b)) == before, "a message for a key this node owns"
        # The records are as the slow path leaves them: another node sees the same.
        other = b.map("nat", Entry)
        with pytest.raises(store.ObjectNotFound):
            async with other.get(keys[0]):
                pass
        async with other.create(keys[0], 7) as ref:
            assert ref.created
        async with entries.get(keys[0]) as ref:  # it moves to a, state and all
            assert await ref.hit() == 1
        assert a.statistics().errors == {} and b.statistics().errors == {}


async def test_constructor_arguments_reach_the_object_on_every_path() -> None:
    async with cluster(2) as (a, b):
        mine, theirs = owned_by(a, "nat", 1)[0], owned_by(b, "nat", 1)[0]
        entries = a.map("nat", Entry)
        b.map("nat", Entry)
        for key in (mine, theirs):  # made here at once, and through the key owner
            async with entries.create(key, 5000, "x") as ref:
                assert ref.created
        for key in (mine, theirs):
            async with entries.get(key) as ref:
                held = a.node.fast.held(("nat", key))
                assert (held.obj.port, held.obj.note) == (5000, "x")
        pools = a.map("pools", Pool)
        b.map("pools", Pool)
        for key in owned_by(a, "pools", 1) + owned_by(b, "pools", 1):
            async with pools.create(key, 100, 103) as ref:
                assert ref.created and await ref.take() == 100


async def test_a_constructor_that_raises_fails_the_create_and_leaves_the_key_absent() -> None:
    async with cluster(2) as (a, b):
        broken = a.map("broken", Broken)
        b.map("broken", Broken)
        key = owned_by(a, "broken", 1)[0]
        with pytest.raises(ValueError, match="no entries today"):
            async with broken.create(key):
                pass
        assert a.statistics().errors == {"call-ValueError": 1}
        with pytest.raises(store.ObjectNotFound):
            async with broken.get(key):
                pass


async def test_a_multi_writer_create_of_a_known_object_asks_nobody() -> None:
    async with cluster(2) as (a, b):
        pools_b = b.map("pools", Pool)
        pools_a = a.map("pools", Pool)
        key = owned_by(b, "pools", 1)[0]
        async with pools_b.create(key) as ref:
            assert ref.created
        async with pools_a.create(key) as ref:  # learns where it is
            assert not ref.created
        before = sent(a)
        for _ in range(20):
            async with pools_a.create(key) as ref:
                assert not ref.created
        assert sent(a) == before, "a create of a known object asked the key owner"


class Counter(MultiWriter):
    def __init__(self) -> None:
        self.n = 0

    def add(self) -> int:
        self.n += 1
        return self.n

    @stale(max_age=0.3)
    def read(self) -> int:
        return self.n


async def test_a_reference_used_after_its_block_is_refused() -> None:
    async with cluster(2) as (a, b):
        entries = a.map("nat", Entry)
        b.map("nat", Entry)
        counters = a.map("counters", Counter)
        b.map("counters", Counter)
        for key in (owned_by(a, "nat", 1)[0], owned_by(b, "nat", 1)[0]):
            async with entries.create(key) as ref:
                await ref.hit()
            with pytest.raises(store.ReferenceClosed):
                await ref.hit()
        for key in (owned_by(a, "counters", 1)[0], owned_by(b, "counters", 1)[0]):
            async with counters.create(key) as cref:
                await cref.add()
            with pytest.raises(store.ReferenceClosed):
                await cref.add()
            with pytest.raises(store.ReferenceClosed):
                await cref.read()


async def test_a_stale_read_outlives_a_remove_by_at_most_max_age() -> None:
    """What ``Map.remove`` promises of ``@stale`` reads on other members: a cached value may
    still be answered for at most ``max_age`` after the remove, never later."""
    async with cluster(2) as (a, b):
        key = owned_by(b, "counters", 1)[0]
        on_b = b.map("counters", Counter)
        on_a = a.map("counters", Counter)
        async with on_b.create(key) as ref:
            await ref.add()
        async with on_a.get(key, readonly=True) as ref:
            assert await ref.read() == 1  # cached at a now
        assert await on_b.remove(key) is True
        async with on_a.get(key, readonly=True) as ref:
            assert await ref.read() == 1  # within max_age: the cached answer
        await trio.sleep(0.35)
        with pytest.raises(store.ObjectNotFound):
            async with on_a.get(key, readonly=True) as ref:
                await ref.read()


async def test_a_microthread_that_raises_is_counted_and_logged_where_it_ran(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def bad(n: int) -> None:
        raise KeyError(f"flow {n} broke")

    async with store.open_space() as space:
        for n in range(3):
            space.submit_nowait(("flow", n), bad, n)  # nobody awaits these units
        assert space.statistics().errors == {"unit-KeyError": 3}
    assert sum("flow 1 broke" in r.getMessage() for r in caplog.records) == 1


async def test_a_get_of_an_absent_owned_key_raises_at_once_and_sends_nothing() -> None:
    async with cluster(2) as (a, b):
        entries, pools = a.map("nat", Entry), a.map("pools", Pool)
        b.map("nat", Entry)
        b.map("pools", Pool)
        keys = owned_by(a, "nat", 10)
        pool_keys = owned_by(a, "pools", 5)
        before = sent(a), sent(b)
        for key in keys:
            with pytest.raises(store.ObjectNotFound):
                async with entries.get(key):
                    pass
            with pytest.raises(store.ObjectNotFound):
                async with entries.get(key, readonly=True):
                    pass
        for key in pool_keys:
            with pytest.raises(store.ObjectNotFound):
                async with pools.get(key):
                    pass
        # Made and removed: absent again, and still known here.
        async with entries.create(keys[0]):
            pass
        assert await entries.remove(keys[0]) is True
        with pytest.raises(store.ObjectNotFound):
            async with entries.get(keys[0]):
                pass
        assert (sent(a), sent(b)) == before, "a message for a key this node owns"
        # A key owned by b: b says so (the slow path), and an object made there is found.
        theirs = owned_by(b, "nat", 1)[0]
        with pytest.raises(store.ObjectNotFound):
            async with entries.get(theirs):
                pass
        async with b.map("nat", Entry).create(theirs, 7):
            pass
        async with entries.get(theirs) as ref:
            assert await ref.hit() == 1
