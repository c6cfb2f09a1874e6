"""An operator's scale-in of an embedded member runs the application's ``on_scale_in``
hook before the member hands anything on (the paper's order for a leaver, §4.4: stop
taking work, finish it, then move the state).

Two members on loopback with a controller; ``ctl scale-in`` (the controller's
``scale_in``) removes ``a``.  What ``a`` acquires inside its hook must be handed on with
the rest, never left behind with the process; a hook that fails or overruns its budget
is logged and the event goes on.  Every wait is on an event under a deadline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

import store
from store.shell.controller import Controller, open_controller
from tests.integration.objects import Cell

KEYS = range(100, 140)

#: ``store.open_space`` with the cluster's controller and secret.
Join = Callable[..., Any]


@asynccontextmanager
async def _cluster() -> AsyncIterator[tuple[Controller, Join, store.Space]]:
    """A controller with one member ``c`` (which stays), and how to join it."""
    secret = os.urandom(16).hex().encode()
    async with open_controller(secret=secret) as ctl:
        join = partial(store.open_space, controller=ctl.address, secret=secret)
        async with join() as c:
            yield ctl, join, c


async def test_what_the_hook_acquires_is_handed_on_with_the_rest() -> None:
    with trio.fail_after(60):
        async with _cluster() as (ctl, join, c):
            cells = c.map("cells", Cell)
            for k in KEYS:  # made at c: a takes them in its hook
                async with cells.create(k) as ref:
                    await ref.set(k)
            seen: list[tuple[list[str], list[str] | None]] = []
            hooked = trio.Event()
            a_name: list[str] = []

            async def hook(budget: float) -> None:
                assert budget > 0
                a = spaces[0]
                # The event's ring already leaves this member out; nothing moved yet.
                seen.append((sorted(a.members()), a.next_members()))
                mine = a.map("cells", Cell)
                for k in KEYS:
                    async with mine.get(k) as ref:  # migrates the object to a
                        await ref.apply(1)
                hooked.set()

            spaces: list[store.Space] = []
            async with trio.open_nursery() as nursery:

                async def member_a() -> None:
                    async with join(on_scale_in=hook) as a:
                        spaces.append(a)
                        a.map("cells", Cell)
                        a_name.append(a.name)
                        await hooked.wait()
                    # (leaving the block after the hook completes the leave)

                nursery.start_soon(member_a)
                while not a_name:
                    await trio.sleep(0.01)
                await ctl.wait_until(lambda barrier: barrier.event is None)
                result = await ctl.scale_in(a_name)
            assert hooked.is_set()
            members, nxt = seen[0]
            assert a_name[0] in members and nxt is not None and a_name[0] not in nxt
            # Every object a took in its hook was handed on with its state: none stayed
            # behind with the process that has gone.
            assert result.summary["objects_moved"] >= len(KEYS)
            with trio.fail_after(10):
                for k in KEYS:
                    async with cells.get(k) as ref:
                        assert await ref.read() == k + 1


@pytest.mark.parametrize("fault", ["raises", "overruns"])
async def test_a_failing_hook_does_not_stop_the_scale_in(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:

    async def hook(budget: float) -> None:
        if fault == "raises":
            raise RuntimeError("the application's own bug")
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with _cluster() as (ctl, join, c):
            cells = c.map("cells", Cell)
            with caplog.at_level(logging.WARNING, logger="store.shell.member"):
                async with join(on_scale_in=hook, scale_in_budget=0.3) as a:
                    async with a.map("cells", Cell).create(7) as ref:
                        await ref.set(70)
                    await ctl.wait_until(lambda barrier: barrier.event is None)
                    result = await ctl.scale_in([a.name])
            assert result.summary["objects_moved"] >= 1
            async with cells.get(7) as ref:
                assert await ref.read() == 70  # handed on all the same
            wanted = "on_scale_in failed" if fault == "raises" else "took over 0.3 s"
            assert wanted in caplog.text


async def test_a_member_that_has_left_takes_no_object_in() -> None:
    """Without a hook, an application may go on using its space after an operator's
    scale-in removed its member: it gets ``MemberLeft`` rather than an object that would
    be left behind with the process (whose record, naming the gone member, would then
    wedge every later access)."""
    with trio.fail_after(60):
        async with _cluster() as (ctl, join, c):
            cells = c.map("cells", Cell)
            async with cells.create(5) as ref:
                await ref.set(50)
            async with join() as a:
                mine = a.map("cells", Cell)
                async with mine.get(5) as ref:  # a member: the object comes here
                    await ref.apply(1)
                await ctl.wait_until(lambda barrier: barrier.event is None)
                await ctl.scale_in([a.name])
                with pytest.raises(store.MemberLeft, match="has left the space"):
                    async with mine.get(5):
                        pass
                with pytest.raises(store.MemberLeft):
                    async with mine.create(6):
                        pass
            with trio.fail_after(10):
                async with cells.get(5) as ref:
                    assert await ref.read() == 51  # handed on by the scale-in
                async with cells.create(6) as ref:
                    assert ref.created  # a's refused create made nothing


async def test_a_member_that_leaves_by_itself_is_not_asked_again() -> None:
    """Leaving the block is the application's own graceful leave: its work is done, so
    the scale-in it asks for does not call its hook (which is for an operator's)."""
    called: list[float] = []

    async def hook(budget: float) -> None:
        called.append(budget)

    with trio.fail_after(60):
        async with _cluster() as (ctl, join, c):
            async with join(on_scale_in=hook) as a:
                async with a.map("cells", Cell).create(3) as ref:
                    await ref.set(30)
                await ctl.wait_until(lambda barrier: barrier.event is None)
            assert called == []
            assert len(ctl.status().members) == 1
            async with c.map("cells", Cell).get(3) as ref:
                assert await ref.read() == 30
