"""Callers see their own errors (issue 9), through the public API over real nodes in this
process (loopback websockets): each test is an attack of the issue's, and shows the error
reaching the caller that made it, within a bound, while every node keeps serving.

Before: an argument cbor cannot encode killed the caller's member (in the sender task), a
result that cannot be encoded killed the owner's, a message over the frame limit was
dropped while its caller waited forever, 667,000 untethered calls became one batch that
was dropped while ``flush()`` returned as if all were applied, ``create()`` hung when the
constructor raised, an untethered method raising at the owner was only counted there,
and a NaN key hung 5 s and made a new object each time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

import store
from ring.hashring import HashRing
from store import MultiWriter, SingleWriter, untethered
from store.api import Space
from store.core.objects import (
    MAX_KEY_BYTES,
    InvalidKey,
    UntetheredCallsFailed,
    ValueNotEncodable,
)
from store.shell.node import open_node
from store.wire.errors import MessageTooLarge, RemoteCallError
from store.wire.messages import MAX_KEY_DEPTH

SECRET = b"test-secret"
FRAME = 64 * 1024  # a small frame limit, so that "over the limit" is quick to reach


class Gauge(MultiWriter):
    """Shared state: a blocking call that returns what it was given (or the class's
    ``returns``), and an untethered update that raises on a negative amount."""

    returns: Any = None

    def __init__(self) -> None:
        self.n = 0
        self.calls = 0

    def echo(self, value: Any) -> Any:
        self.calls += 1
        return value

    def give(self) -> Any:
        return Gauge.returns

    @untethered
    def bump(self, n: Any, pad: Any = None) -> None:
        if isinstance(n, int) and n < 0:
            raise ValueError(f"a negative bump ({n})")
        self.n += 1

    def total(self) -> int:
        return self.n


class Picky(SingleWriter):
    """A flow whose constructor raises while ``broken`` is set."""

    broken = False

    def __init__(self) -> None:
        if Picky.broken:
            raise ValueError("no flows today")
        self.n = 0

    def add(self, n: int) -> int:
        self.n += n
        return self.n


class PickyShared(MultiWriter):
    broken = False

    def __init__(self) -> None:
        if PickyShared.broken:
            raise ValueError("no shared state today")
        self.n = 0

    def total(self) -> int:
        return self.n


@asynccontextmanager
async def cluster(size: int, **options: Any) -> AsyncIterator[list[Space]]:
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(listen="127.0.0.1:0", secret=SECRET, **options)
            )
            for _ in range(size)
        ]
        ring = HashRing([n.name for n in nodes])
        for node in nodes:
            node.set_ring(ring)
        yield [Space(node) for node in nodes]


def key_owned_by(space: Space, map_name: str) -> str:
    """A key whose authority is ``space``'s node."""
    ring = space.node.view.ring
    from ring.hashring import key_token

    return next(
        f"k{i}" for i in range(10_000) if ring.owner(key_token(map_name, f"k{i}")) == space.name
    )


async def remote_gauge(owner: Space, caller: Space) -> Any:
    """A Gauge held by ``owner``, and ``caller``'s map of them."""
    key = key_owned_by(owner, "g")
    async with owner.map("g", Gauge).create(key):
        pass
    return key, caller.map("g", Gauge)


# -- blocking calls ---------------------------------------------------------------------------


async def test_an_argument_that_cannot_travel_is_a_type_error_at_the_call() -> None:
    async with cluster(2) as (a, b):
        key, gauges = await remote_gauge(b, a)
        with trio.fail_after(10):
            async with gauges.get(key) as ref:
                for bad in (object(), [object()], {1: trio}):
                    with pytest.raises(TypeError, match=r"argument 1 of Gauge\.echo"):
                        await ref.echo(bad)
                    with pytest.raises(ValueNotEncodable):
                        await ref.echo(bad)
                assert await ref.echo([1, "two", b"3"]) == [1, "two", b"3"]  # a carries on
        assert b.statistics().errors == {}


async def test_a_call_over_the_frame_limit_is_a_clear_error_at_the_call() -> None:
    async with cluster(2, max_frame=FRAME) as (a, b):
        key, gauges = await remote_gauge(b, a)
        with trio.fail_after(10):
            async with gauges.get(key) as ref:
                with pytest.raises(MessageTooLarge, match=r"Gauge\.echo.*max_frame"):
                    await ref.echo(b"x" * FRAME)
                assert await ref.echo(b"x" * 1000) == b"x" * 1000


async def test_a_result_that_cannot_travel_is_a_remote_call_error_and_the_owner_survives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with cluster(2, max_frame=FRAME) as (a, b):
        key, gauges = await remote_gauge(b, a)
        with trio.fail_after(10):
            async with gauges.get(key) as ref:
                monkeypatch.setattr(Gauge, "returns", object())
                with pytest.raises(RemoteCallError, match=r"result of .*Gauge\.give"):
                    await ref.give()
                monkeypatch.setattr(Gauge, "returns", b"x" * FRAME)
                with pytest.raises(RemoteCallError, match="MessageTooLarge"):
                    await ref.give()
                monkeypatch.setattr(Gauge, "returns", "fine")
                assert await ref.give() == "fine"  # the owner is still there
        assert b.statistics().errors == {"call-not-encodable": 1, "call-too-large": 1}


# -- constructors -----------------------------------------------------------------------------


async def test_a_constructor_that_raises_is_an_error_at_the_create(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with cluster(2) as (a, b):
        flows, shared = a.map("p", Picky), a.map("ps", PickyShared)
        monkeypatch.setattr(Picky, "broken", True)
        monkeypatch.setattr(PickyShared, "broken", True)
        with trio.fail_after(10):
            for key in (key_owned_by(a, "p"), key_owned_by(b, "p")):
                with pytest.raises(ValueError, match="no flows today"):
                    async with flows.create(key):
                        pass
                with pytest.raises(store.ObjectNotFound):  # the key is absent again
                    async with flows.get(key):
                        pass
            for key in (key_owned_by(a, "ps"), key_owned_by(b, "ps")):
                with pytest.raises(ValueError, match="no shared state today"):
                    async with shared.create(key):
                        pass
            monkeypatch.setattr(Picky, "broken", False)
            async with flows.create(key_owned_by(b, "p")) as ref:
                assert ref.created and await ref.add(2) == 2
        assert a.statistics().errors == {"call-ValueError": 4}


# -- untethered calls -------------------------------------------------------------------------


async def test_an_untethered_call_that_cannot_travel_fails_alone_and_flush_raises() -> None:
    async with cluster(2) as (a, b):
        key, gauges = await remote_gauge(b, a)
        with trio.fail_after(10):
            async with gauges.get(key) as ref:
                for arg in (1, object(), 2, 2**5000, 3):
                    await ref.bump(arg)
            with pytest.raises(UntetheredCallsFailed, match=r"2 untethered calls failed"):
                await a.flush()
            await a.flush()  # said once
            async with gauges.get(key) as ref:
                assert await ref.total() == 3
        assert a.statistics().errors == {"call-not-encodable": 2}


async def test_an_untethered_method_that_raises_at_the_owner_makes_the_callers_flush_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with cluster(2) as (a, b):
        key, gauges = await remote_gauge(b, a)
        with trio.fail_after(10), caplog.at_level(logging.WARNING):
            async with gauges.get(key) as ref:
                for n in (1, -1, 2):
                    await ref.bump(n)
            with pytest.raises(UntetheredCallsFailed, match=r"a negative bump \(-1\)"):
                await a.flush()
            await a.flush()
            async with gauges.get(key) as ref:
                assert await ref.total() == 2
        owner_lines = [
            r.getMessage() for r in caplog.records if "call-ValueError" in r.getMessage()
        ]
        assert len(owner_lines) == 1
        assert f"Gauge.bump called by {a.name} raised ValueError" in owner_lines[0]
        assert owner_lines[0].startswith(b.name)


async def test_untethered_calls_made_without_yielding_are_split_under_the_frame_limit() -> None:
    async with cluster(2, max_frame=FRAME) as (a, b):
        key, gauges = await remote_gauge(b, a)
        calls = 30_000  # about 20 frames' worth at this limit
        with trio.fail_after(30):
            async with gauges.get(key) as ref:
                for n in range(calls):
                    await ref.bump(n, "padding")  # (returns at once: nothing yields)
            await a.flush()
            async with gauges.get(key) as ref:
                assert await ref.total() == calls
        assert a.statistics().errors == {}
        assert b.statistics().wire_errors["frames_too_large"] == 0


async def test_flush_raises_when_a_destination_never_answers() -> None:
    async with AsyncExitStack() as outer:
        a_node = await outer.enter_async_context(open_node(listen="127.0.0.1:0", secret=SECRET))
        a = Space(a_node)
        with trio.fail_after(20):
            async with open_node(listen="127.0.0.1:0", secret=SECRET) as b_node:
                b = Space(b_node)
                ring = HashRing([a.name, b.name])
                a_node.set_ring(ring)
                b_node.set_ring(ring)
                key, gauges = await remote_gauge(b, a)
                async with gauges.get(key) as ref:
                    await ref.echo(1)
            # b has stopped, but is still in a's ring: a's update cannot be applied
            async with gauges.get(key) as ref:
                await ref.bump(1)
            with pytest.raises(store.PeerUnavailable, match="no answer from"):
                await a.flush(timeout=3)


# -- keys -------------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    key: Any = 1
    for _ in range(depth):
        key = (key,)
    return key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (math.nan, "NaN"),
        (("flow", (1, math.nan)), "NaN"),
        (-0.0, "-0.0"),
        (nested(MAX_KEY_DEPTH + 8), "nested deeper"),
        ("x" * (17 * 1024 * 1024), "larger than"),
        ("é" * (MAX_KEY_BYTES // 2 + 10), "bytes"),
        (2**2000, "bits"),
        ([1, 2], "use a tuple"),
        (("a", {1: 2}), "not dict"),
        (object(), "not object"),
    ],
)
async def test_a_key_without_a_stable_encoding_is_refused_at_the_call(key: Any, why: str) -> None:
    async with cluster(2) as (a, b):
        flows, gauges = a.map("p", Picky), a.map("g", Gauge)
        with trio.fail_after(2):
            for access in (flows.create, flows.get, gauges.create, gauges.get):
                with pytest.raises(InvalidKey, match=why) as info:
                    async with access(key):
                        pass
                assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
            with pytest.raises(InvalidKey, match=why):
                await flows.remove(key)
        assert a.statistics().key_records + b.statistics().key_records == 0
        assert a.statistics().errors == {} and b.statistics().errors == {}


async def test_keys_within_the_bounds_travel() -> None:
    keys = [nested(MAX_KEY_DEPTH - 1), "x" * (MAX_KEY_BYTES - 64), (1.5, math.inf), 0.0, 2**1000]
    async with cluster(2) as (a, b):
        fa, fb = a.map("p", Picky), b.map("p", Picky)
        with trio.fail_after(10):
            for key in keys:
                async with fa.create(key) as ref:
                    await ref.add(1)
            for key in keys:
                async with fb.get(key) as ref:
                    assert await ref.add(1) == 2
