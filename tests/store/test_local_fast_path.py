"""``Map.local`` / ``Map.local_create``: an object used in place, with no reference,
only when that is safe: held here and, single-writer, no reference open and nobody waiting
for it, multi-writer, none of this node's updates owed to it (or, for ``local_create``,
made here at once as ``create``'s fast path makes it).  Each test names the rule it
checks; the last runs an NF on it through a scale-out."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import trio

import store
from bench.traffic import make
from nf.base import NF, Verdict, local_create_of
from nf.packet import Packet, parse
from nf.runner import run_capture
from store import MultiWriter, SingleWriter
from tests.store.test_api import cluster, sent
from tests.store.test_fast_create import owned_by


class Flow(SingleWriter):
    def __init__(self, start: int = 0) -> None:
        self.packets = start

    def hit(self) -> int:
        self.packets += 1
        return self.packets


class Shared(MultiWriter):
    def __init__(self) -> None:
        self.n = 0

    def add(self) -> int:
        self.n += 1
        return self.n


async def count_of(m: store.Map[Flow], key: Any) -> int:
    async with m.get(key) as ref:
        return int(await ref.hit()) - 1


async def test_an_object_held_here_is_used_in_place_and_an_absent_one_is_none() -> None:
    async with store.open_space() as space:
        flows = space.map("flows", Flow)
        assert flows.local("a") is None  # nothing of it anywhere
        made = flows.local_create("a", 10)
        assert isinstance(made, Flow) and made.packets == 10  # constructor arguments
        assert flows.local("a") is made and flows.local_create("a") is made
        made.hit()
        assert await count_of(flows, "a") == 11  # the store's own object, no copy
        stats = space.statistics()
        assert stats.objects_single == 1 and stats.references_in_use == 0
        assert await flows.remove("a") is True
        assert flows.local("a") is None  # removed: gone from here
        again = flows.local_create("a")
        assert again is not made and again is not None and again.packets == 0


async def test_none_while_a_reference_to_it_is_open() -> None:
    async with store.open_space() as space:
        flows = space.map("flows", Flow)
        async with flows.create("k") as ref:
            assert flows.local("k") is None
            assert flows.local_create("k") is None
            await ref.hit()
        assert flows.local("k") is not None
        assert space.statistics().references_in_use == 0


async def test_none_where_the_object_is_held_elsewhere_and_it_moves_on_a_get() -> None:
    async with cluster(2) as (a, b):
        fa, fb = a.map("flows", Flow), b.map("flows", Flow)
        key = owned_by(b, "flows", 1)[0]  # b owns the key: a cannot make it itself
        async with fa.create(key) as ref:
            await ref.hit()
        assert fa.local(key) is not None
        assert fb.local(key) is None and fb.local_create(key) is None
        assert b.statistics().objects_single == 0  # local_create made nothing there
        with trio.fail_after(10):
            async with fb.get(key) as ref:
                assert await ref.hit() == 2
        assert fa.local(key) is None and fb.local(key) is not None


async def test_local_create_of_a_key_owned_elsewhere_makes_nothing() -> None:
    async with cluster(2) as (a, b):
        fa, fb = a.map("flows", Flow), b.map("flows", Flow)
        key = owned_by(b, "flows", 1)[0]
        assert fa.local_create(key) is None
        with trio.fail_after(10):
            with pytest.raises(store.ObjectNotFound):
                async with fb.get(key):
                    pass
        mine = owned_by(a, "flows", 1)[0]
        before = sent(a), sent(b)
        assert fa.local_create(mine) is not None  # a owns this one: made at once
        assert (sent(a), sent(b)) == before


async def test_a_later_get_elsewhere_sees_what_was_written_in_place() -> None:
    async with cluster(2) as (a, b):
        fa, fb = a.map("flows", Flow), b.map("flows", Flow)
        key = owned_by(a, "flows", 1)[0]
        for _ in range(5):
            flow = fa.local_create(key)
            assert flow is not None
            flow.hit()
        with trio.fail_after(10):
            assert await count_of(fb, key) == 5
            async with fb.get(key, readonly=True):
                pass
        assert fa.local(key) is None


async def test_none_while_a_release_waits_for_the_reference_here_to_end() -> None:
    async with cluster(2) as (a, b):
        fa, fb = a.map("flows", Flow), b.map("flows", Flow)
        key = owned_by(a, "flows", 1)[0]
        got: list[int] = []

        async def b_wants_it() -> None:
            got.append(await count_of(fb, key))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                async with fa.create(key) as ref:
                    await ref.hit()
                    nursery.start_soon(b_wants_it)
                    held = a.node.fast.held((fa.name, key))
                    while held.release is None:  # b's request has reached a
                        await trio.sleep(0.001)
                    assert fa.local(key) is None and fa.local_create(key) is None
                    await ref.hit()
                # the reference ended: the object went to b at once
                assert fa.local(key) is None and fa.local_create(key) is None
        assert got == [2]
        assert fb.local(key) is not None


async def test_a_multi_writer_object_is_in_place_where_it_lives_unless_updates_are_owed() -> None:
    async with cluster(2) as (a, b):
        sa, sb = a.map("shared", Shared), b.map("shared", Shared)
        key = owned_by(a, "shared", 1)[0]
        made = sa.local_create(key)  # a owns the key: made here at once
        assert made is not None and sa.local(key) is made
        made.add()
        assert sb.local(key) is None and sb.local_create(key) is None  # it lives on a
        with trio.fail_after(10):
            async with sb.get(key) as ref:
                assert await ref.add() == 2  # b's call went to a's object
        assert sa.local(key) is made and made.n == 2
        # This node's own earlier updates still on their way to it (here: a replica of
        # them waiting to be folded) come first: no in-place use until they are in.
        held = a.node.fast.held(("shared", key))
        objects = a.node.core.objects
        objects.replicas[("shared", key)] = (Shared(), a.name)
        held.owed = True
        assert sa.local(key) is None and sa.local_create(key) is None
        del objects.replicas[("shared", key)]
        assert sa.local(key) is made and not held.owed  # in order again: cleared


async def test_unhashable_and_invalid_keys_are_refused_as_the_awaited_path_does() -> None:
    async with store.open_space() as space:
        flows = space.map("flows", Flow)
        with pytest.raises(store.InvalidKey):
            flows.local(["a", "list"])
        with pytest.raises(store.InvalidKey):
            flows.local_create(["a", "list"])
        with pytest.raises(store.InvalidKey):
            flows.local_create(frozenset({1}))  # hashable, but no key: checked before a record


# -- an NF on it, through a scale-out ------------------------------------------------------


class Counter(SingleWriter):
    def __init__(self) -> None:
        self.packets = 0

    def on_packet(self) -> int:
        self.packets += 1
        return self.packets


class CountingNF(NF):
    """Counts each flow's packets in its flow's object, in place when it can."""

    name: ClassVar[str] = "test-counting"
    output_query: ClassVar[str] = "counts"

    def __init__(self, space: Any, config: dict[str, Any]) -> None:
        super().__init__(space, config)
        self.flows = space.map("test.counts", Counter)
        self._here: Callable[..., Any] = local_create_of(self.flows)

    async def process(self, packet: Packet) -> Verdict:
        if packet.drop is not None:
            return Verdict.FORWARD
        key = packet.flow_key_both()
        counter = self._here(key)
        if counter is not None:
            counter.on_packet()
            self.count("in-place")
        else:
            async with self.flows.create(key) as ref:
                await ref.on_packet()
            self.count("awaited")
        return Verdict.FORWARD

    async def query(self, name: str, **args: Any) -> Any:
        if name == "statistics":
            return dict(self.counts)
        return sorted([f"{key} {c.packets}" async for key, c in self.flows.items()])


async def test_counts_written_in_place_survive_a_scale_out_mid_run() -> None:
    packets = make(150, seed=3)
    expected = collections.Counter(parse(f, ts).flow_key_both() for ts, f in packets)
    with trio.fail_after(60):
        one = await run_capture(CountingNF, {}, packets)
        scaled = await run_capture(CountingNF, {}, packets, instances=2, scale_at=0.5)
    assert one.lines == sorted(f"{key} {n}" for key, n in expected.items())
    assert scaled.lines == one.lines
    assert one.counts.get("awaited", 0) == 0  # one member: every packet in place
    # Flows moved at the scale-out (their first packet on the new member fetched the
    # object: awaited) and the rest ran in place on whichever member held them.
    assert scaled.counts["awaited"] > 0 and scaled.counts["in-place"] > len(packets) // 2
    assert sum(s.migrations_in for s in scaled.statistics) > 0
