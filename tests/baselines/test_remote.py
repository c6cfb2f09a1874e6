"""The remote-only space's semantics on both stores (a kv server process, a redis-server):
the Space API as NFs use it, atomic read-modify-writes of shared objects across
instances (the NAT pool), and per-flow write-backs that lose no update when two
instances write one object."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import store
from baselines import BACKENDS, SpaceLike, open_backend
from nf.nat import PortShard
from tests.baselines.conftest import SECRET
from tests.baselines.objects import Counter, Tally


@asynccontextmanager
async def instances(backend: str, address: str, n: int) -> AsyncIterator[list[SpaceLike]]:
    """``n`` remote-only instances, each with its own connection to the store."""
    async with AsyncExitStack() as stack:
        s6 = await stack.enter_async_context(store.open_space())
        spaces = []
        for i in range(n):
            spaces.append(
                await stack.enter_async_context(
                    open_backend(
                        backend, s6, store_address=address, secret=SECRET, instance_name=f"i{i}"
                    )
                )
            )
        yield spaces


async def test_open_backend_names_its_backends() -> None:
    assert BACKENDS == ("s6", "local-only", "remote-only", "redis", "stop-the-world")
    async with store.open_space() as s6:
        async with open_backend("s6", s6) as same:
            assert same is s6
        async with open_backend("local-only", s6) as local:
            assert local.name == s6.name and local.statistics().backend == "local-only"
        with pytest.raises(
            ValueError,
            match=(
                r"^unknown backend .nope.: choose one of "
                r"s6, local-only, remote-only, redis, stop-the-world$"
            ),
        ):
            async with open_backend("nope", s6):
                pass
        with pytest.raises(ValueError, match="needs the store's address"):
            async with open_backend("redis", s6):
                pass


async def test_the_space_api_as_nfs_use_it(remote: tuple[str, str]) -> None:
    async with instances(*remote, 1) as (space,):
        tallies = space.map("t.tallies", Tally)
        counters = space.map("t.counters", Counter)
        assert space.map("t.tallies", Tally) is tallies
        async with tallies.create("a", 5) as ref:  # constructor arguments
            assert ref.created
            assert await ref.take() == 6  # a blocking call, at the store
            await ref.add(10)  # untethered: not waited for
            assert await ref.take() == 17  # after our untethered update
        async with tallies.create("a", 99) as ref:
            assert not ref.created
        with pytest.raises(store.ObjectNotFound):
            async with tallies.get("nobody"):
                pass
        async with tallies.get("a", readonly=True) as ref:
            assert await ref.value() == 17  # @stale: from the state fetched at entry
            with pytest.raises(TypeError, match="read-only reference"):
                await ref.take()
        async with tallies.get("a") as ref:
            with pytest.raises(store.RemoteCallError, match="boom"):
                await ref.boom()
        async with counters.create(("flow", 1)) as ref:
            assert await ref.inc("x") == 1
            assert await ref.inc("x") == 2
        with pytest.raises(store.ReferenceClosed):
            await ref.inc("x")
        async with counters.get(("flow", 1)) as ref:
            assert await ref.value() == 2  # written back at the end of the block before
            assert await counters.remove(("flow", 1))
            with pytest.raises(store.ObjectRemoved):
                await ref.inc("x")
        assert not await counters.remove(("flow", 1))
        for i in range(300):  # more than one scan answer
            async with counters.create(("many", i)) as ref:
                await ref.inc(str(i))
        await space.flush()
        seen = {key: obj.n async for key, obj in counters.items()}
        assert seen == {("many", i): 1 for i in range(300)}  # keys come back as tuples
        assert [(k, t.n) async for k, t in tallies.items()] == [("a", 17)]
        stats = space.statistics()
        assert stats.node == "i0" and stats.migrations_in == 0 and stats.write_backs == 301


async def test_a_failed_untethered_call_is_told_by_the_next_flush(
    remote: tuple[str, str],
) -> None:
    async with instances(*remote, 1) as (space,):
        tallies = space.map("t.tallies", Tally)
        async with tallies.create("a") as ref:
            await ref.add("not a number")  # raises at the store
            await ref.add(1)
        with pytest.raises(store.UntetheredCallsFailed, match="1 untethered call failed"):
            await space.flush()
        await space.flush()  # told once
        async with tallies.get("a") as ref:
            assert await ref.take() == 2  # the other call was applied


async def test_two_instances_allocating_from_one_pool_never_share_a_port(
    remote: tuple[str, str],
) -> None:
    """The NAT's pool shard: every allocation an atomic read-modify-write at the store.
    Both instances read the shard before either allocates, and all their allocations are
    out at once, with the same draws: on Redis the second compare-and-set must lose and
    be applied again; on our store the server runs them one at a time."""
    lo, hi = 1024, 1024 + 63
    draws = [3, 3, 7, 7, 11]
    async with instances(*remote, 2) as (a, b):
        pools = [space.map("nat.pool", PortShard) for space in (a, b)]
        async with pools[0].create((1, 0)) as ra, pools[1].create((1, 0)) as rb:
            assert ra.created != rb.created
            waits: list[Any] = []
            for _ in range(48):
                waits.append(ra.allocate(lo, hi, draws))
                waits.append(rb.allocate(lo, hi, draws))
            with trio.fail_after(20):
                ports = [await wait for wait in waits]
        given = [p for p in ports if p]
        assert sorted(given) == list(range(lo, hi + 1))  # each port once, then full
        assert ports.count(0) == 96 - 64
        async with pools[1].get((1, 0)) as ref:
            assert await ref.in_use() == 64
        if remote[0] == "redis":
            conflicts = sum(s.statistics().store["rmw_conflicts"] for s in (a, b))
            assert conflicts >= 1


async def test_per_flow_write_backs_lose_no_update_when_two_instances_write(
    remote: tuple[str, str],
) -> None:
    """Two instances hold one per-flow object at once (a connection's two directions on
    two instances): the write-back that comes second loses its compare-and-set and is
    replayed on the state that won.  (Write-backs are not waited for: which of the two
    comes first is up to the network, so each round flushes both before reading.)"""
    async with instances(*remote, 2) as (a, b):
        ca, cb = a.map("t.counters", Counter), b.map("t.counters", Counter)
        for round_ in range(20):
            async with ca.create("shared") as ra, cb.create("shared") as rb:
                await ra.inc("a")
                await rb.inc("b")
            await a.flush()
            await b.flush()
            async with ca.get("shared") as ref:
                assert await ref.value() == 2 * (round_ + 1)
        async with cb.get("shared", readonly=True) as ref:
            assert await ref.value() == 40
        assert a.statistics().write_conflicts + b.statistics().write_conflicts == 20


async def test_microthreads_of_one_flow_keep_their_order(remote: tuple[str, str]) -> None:
    """Packets as microthreads: they park on the store's answers, one flow's units
    finish in the order submitted, and the units of many flows overlap."""
    async with instances(*remote, 1) as (space,):
        counters = space.map("t.counters", Counter)
        order: list[tuple[int, int]] = []

        async def unit(flow: int, i: int) -> int:
            async with counters.create(flow) as ref:
                n: int = await ref.inc(str(i))
            order.append((flow, i))
            return n

        units = [space.submit_nowait(f, unit, f, i) for i in range(10) for f in range(20)]
        with trio.fail_after(20):
            results = [await u for u in units]
        assert results == [i + 1 for i in range(10) for _ in range(20)]
        for f in range(20):
            assert [i for flow, i in order if flow == f] == list(range(10))
        assert space.statistics().units_run == 200
