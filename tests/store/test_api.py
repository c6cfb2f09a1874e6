"""The public API over real nodes: embedded spaces and clusters of nodes in this process that
talk over real loopback websockets (the multi-process tests are in tests/integration)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import store
from ring.hashring import HashRing
from store import MultiWriter, SingleWriter, stale, untethered
from store.api import Space
from store.shell.node import open_node
from tests.fixtures.objects import Tally

SECRET = b"test-secret"


class Flow(SingleWriter):
    def __init__(self) -> None:
        self.packets = 0
        self.log: list[int] = []

    def on_packet(self, size: int) -> int:
        self.packets += 1
        self.log.append(size)
        return self.packets

    @stale(max_age=0.5)
    def count(self) -> int:
        return self.packets


class Hosts(MultiWriter):
    def __init__(self) -> None:
        self.seen: list[list[Any]] = []
        self.total = 0

    def add(self, who: str, n: int) -> int:
        self.seen.append([who, n])
        self.total += n
        return self.total

    @untethered
    def note(self, who: str, n: int) -> None:
        self.seen.append([who, n])
        self.total += n

    @stale(max_age=0.5)
    def peek(self) -> int:
        return self.total


class Socketish(SingleWriter):
    def __init__(self) -> None:
        self.handle: Any = object()

    def touch(self) -> None:
        pass


@asynccontextmanager
async def cluster(size: int) -> AsyncIterator[list[Space]]:
    """``size`` nodes in this process, listening on loopback, sharing one ring."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(open_node(listen="127.0.0.1:0", secret=SECRET))
            for _ in range(size)
        ]
        ring = HashRing([n.name for n in nodes])
        for node in nodes:
            node.set_ring(ring)
        yield [Space(node) for node in nodes]


def sent(space: Space) -> int:
    stats = space.statistics()
    return stats.messages_sent + space.statistics().messages_to_self


async def test_embedded_space_create_get_remove() -> None:
    async with store.open_space() as space:
        flows = space.map("flows", Flow)
        async with flows.create("a") as ref:
            assert ref.created
            assert await ref.on_packet(10) == 1
        async with flows.create("a") as ref:
            assert not ref.created
            assert await ref.on_packet(20) == 2
        async with flows.get("a") as ref:
            assert await ref.count() == 2
        with pytest.raises(store.ObjectNotFound):
            async with flows.get("b"):
                pass
        assert await flows.remove("a") is True
        assert await flows.remove("a") is False
        with pytest.raises(store.ObjectNotFound):
            async with flows.get("a"):
                pass
        async with flows.create("a") as ref:
            assert ref.created and await ref.on_packet(5) == 1  # fresh, not the old one


async def test_repeated_local_access_sends_no_message() -> None:
    async with cluster(2) as (a, b):
        flows = a.map("flows", Flow)
        async with flows.create("k") as ref:
            await ref.on_packet(1)
        before = sent(a), sent(b)
        for _ in range(100):
            async with flows.get("k") as ref:
                await ref.on_packet(1)
        assert (sent(a), sent(b)) == before
        async with flows.get("k") as ref:
            assert await ref.count() == 101


async def test_single_writer_moves_to_its_writer_with_its_state() -> None:
    async with cluster(3) as spaces:
        maps = [s.map("flows", Flow) for s in spaces]
        with trio.fail_after(10):
            for i, m in enumerate(maps * 3):
                async with m.create("flow") as ref:
                    assert await ref.on_packet(i) == i + 1
        stats = [s.statistics() for s in spaces]
        assert sum(st.objects_single for st in stats) == 1
        assert sum(st.migrations_in for st in stats) == 8
        async with maps[0].get("flow") as ref:
            assert await ref.count() == 9


async def test_readonly_reference_never_moves_and_serves_stale_within_max_age() -> None:
    async with cluster(2) as (a, b):
        fa, fb = a.map("flows", Flow), b.map("flows", Flow)
        now = [100.0]
        b.node.clock = lambda: now[0]
        async with fa.create("k") as ref:
            await ref.on_packet(1)
        async with fb.get("k", readonly=True) as ro:
            assert await ro.count() == 1
            with pytest.raises(TypeError):
                await ro.on_packet(1)
        assert a.statistics().objects_single == 1 and b.statistics().objects_single == 0
        async with fa.get("k") as ref:
            await ref.on_packet(1)
        async with fb.get("k", readonly=True) as ro:
            assert await ro.count() == 1  # cached, 0 s old
            now[0] += 0.4
            assert await ro.count() == 1  # still within max_age
            now[0] += 0.2
            assert await ro.count() == 2  # refreshed
        assert b.statistics().stale_cache_hits == 2
        assert a.statistics().objects_single == 1


async def test_untethered_calls_are_batched_ordered_and_counted_once_after_flush() -> None:
    async with cluster(3) as spaces:
        maps = [s.map("hosts", Hosts) for s in spaces]
        async with maps[0].create("h") as ref:
            assert ref.created
        with trio.fail_after(10):
            for i, (space, m) in enumerate(zip(spaces, maps, strict=True)):
                async with m.get("h") as ref:
                    for n in range(50):
                        await ref.note(space.name, n)
                    # A blocking call from this node comes after its untethered ones.
                    total = await ref.add(space.name, 1000)
                    assert total >= 1000 + sum(range(50)) * (i + 1) - 1
            for space in spaces:
                await space.flush()
            async with maps[1].get("h") as ref:
                assert await ref.add("check", 0) == 3 * (sum(range(50)) + 1000)
        held = spaces[0].node.fast.held(("hosts", "h")).obj
        for space in spaces:
            mine = [n for who, n in held.seen if who == space.name]
            assert mine == [*range(50), 1000]
        assert sum(s.statistics().untethered_batches for s in spaces) < 2 * 50


async def test_merged_replicas_count_every_update_once() -> None:
    async with cluster(2) as (a, b):
        ca, cb = a.map("c", Tally), b.map("c", Tally)
        async with ca.create("x") as ref:
            await ref.bump(1)
        with trio.fail_after(10):
            for m in (ca, cb):
                async with m.get("x") as ref:
                    for _ in range(300):
                        await ref.bump(2)
            await a.flush()
            await b.flush()
            async with cb.get("x") as ref:
                assert await ref.value() == 1 + 2 * 600
        assert a.statistics().merges + b.statistics().merges >= 1


async def test_calls_through_a_reference_to_a_removed_object_fail_clearly() -> None:
    async with store.open_space() as space:
        flows = space.map("flows", Flow)
        async with flows.create("k") as ref:
            assert await flows.remove("k")
            with pytest.raises(store.ObjectRemoved):
                await ref.on_packet(1)


async def test_keys_round_trip_exactly_across_nodes() -> None:
    keys = [b"\x00\xff", "text", 7, -3, (b"\x01\x02\x03\x04", 80, ("a", 2)), ("x", (1, (2, 3)))]
    async with cluster(2) as (a, b):
        fa, fb = a.map("flows", Flow), b.map("flows", Flow)
        for key in keys:
            async with fa.create(key):
                pass
        for key in keys:
            async with fb.get(key) as ref:
                assert ref.key == key
        listed = [key async for key, _ in fa.items()]
        assert sorted(map(repr, listed)) == sorted(map(repr, keys))
        assert all(
            type(x) is type(y)
            for x, y in zip(sorted(listed, key=repr), sorted(keys, key=repr), strict=True)
        )


async def test_items_yields_each_key_once_with_snapshots() -> None:
    async with cluster(3) as spaces:
        maps = [s.map("flows", Flow) for s in spaces]
        for i in range(30):
            async with maps[i % 3].create(i) as ref:
                await ref.on_packet(i)
        seen = {key: snap.packets async for key, snap in maps[0].items()}
        assert seen == dict.fromkeys(range(30), 1)
        before = [s.statistics().migrations_in for s in spaces]
        async for _key, snap in maps[1].items():
            snap.packets = 999  # a copy: changes nothing
        assert [s.statistics().migrations_in for s in spaces] == before
        async with maps[0].get(3) as ref:
            assert await ref.count() == 1


async def test_state_that_cannot_travel_names_class_and_field() -> None:
    async with cluster(2) as (a, b):
        sa, sb = a.map("s", Socketish), b.map("s", Socketish)
        async with sa.create("k"):
            pass
        with trio.fail_after(5):
            with pytest.raises(TypeError, match=r"Socketish\.handle"):
                async with sb.get("k"):
                    pass
            async with sa.get("k") as ref:  # it stayed where it was, still usable
                await ref.touch()
        assert a.statistics().objects_single == 1


async def test_microthread_waiting_on_remote_state_does_not_stall_other_flows() -> None:
    async with cluster(2) as (a, b):
        fa, fb = a.map("flows", Flow), b.map("flows", Flow)
        async with fa.create("remote") as ref:
            await ref.on_packet(1)
        async with fb.create("local") as ref:
            await ref.on_packet(1)

        async def packet(key: str, size: int) -> int:
            async with fb.create(key) as ref:
                return await ref.on_packet(size)

        slow = b.submit_nowait("remote", packet, "remote", 1)
        later_same_flow = b.submit_nowait("remote", packet, "remote", 2)
        fast = [b.submit_nowait("local", packet, "local", i) for i in range(10)]
        assert not slow.done() and not later_same_flow.done()
        assert all(u.done() for u in fast), "local flow units must finish inline"
        with trio.fail_after(5):
            assert await slow == 2
            assert await later_same_flow == 3
        async with fb.get("remote") as ref:
            assert await ref.count() == 3


async def test_wrong_kind_is_a_typed_error() -> None:
    async with store.open_space() as space:
        async with space.map("m", Flow).create("k"):
            pass
        other = space.map("m2", Hosts)
        with pytest.raises(TypeError):
            space.map("m", Hosts)
        async with other.create("k") as ref:
            assert ref.created
