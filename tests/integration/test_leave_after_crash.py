"""A member whose merged updates died with another member still leaves gracefully, and
still answers: a crash elsewhere is reported, never a reason to strand this member's
objects.

Three members on loopback with a controller that declares a silent member dead after
1 s.  Member ``a`` holds a mergeable counter; member ``b`` updates it through a replica
(untethered calls folded later); ``a`` dies without a goodbye before the fold reaches
it, so the repair drops ``b``'s replica (counted as ``fold-lost``, and reported by
``b``'s next flush as ``UntetheredCallsFailed``).  ``b`` then leaves: the leave must go
on (its own objects handed to ``c``), not stop at that report.  Every wait is on an
event or a status under a deadline.
"""

from __future__ import annotations

import os
from functools import partial

import trio

import store
from store.shell.controller import open_controller
from tests.integration.objects import Cell, Hits

KEY, MINE = 11, 12


async def _until(check: object, within: float) -> None:
    assert callable(check)
    with trio.fail_after(within):
        while not check():
            await trio.sleep(0.02)


async def test_a_member_whose_replica_died_with_its_holder_still_leaves() -> None:
    secret = os.urandom(16).hex().encode()
    with trio.fail_after(60):
        async with open_controller(secret=secret, failure_timeout=1.0) as ctl:
            join = partial(store.open_space, controller=ctl.address, secret=secret)
            async with join() as c, trio.open_nursery() as nursery:
                c.map("hits", Hits)
                c.map("cells", Cell)
                made, crash, crashed = trio.Event(), trio.CancelScope(), trio.Event()
                names: list[str] = []

                async def member_a() -> None:
                    with crash:  # cancelled: the member vanishes, no leave, no goodbye
                        async with join() as a:
                            names.append(a.name)
                            async with a.map("hits", Hits).create(KEY):
                                pass  # made here: a holds it
                            made.set()
                            await trio.sleep_forever()
                    crashed.set()

                nursery.start_soon(member_a)
                await made.wait()
                b_left = False
                async with join() as b:
                    hits, cells = b.map("hits", Hits), b.map("cells", Cell)
                    # b's own object, which its leave must hand on.
                    async with cells.create(MINE) as ref:
                        await ref.set(7)
                    async with hits.get(KEY) as ref:  # the counter a holds
                        assert ref._owner == names[0]
                        crash.cancel()
                        await crashed.wait()
                        await ref.hit(1)  # into b's replica, to be folded at a
                    await _until(lambda: "fold-lost" in b.statistics().errors, 30)
                    # (no flush here: the leave is the first to meet the report)
                b_left = True
                assert b_left
                async with c.map("cells", Cell).get(MINE) as ref:
                    assert await ref.read() == 7  # handed on by b's leave, not lost
                nursery.cancel_scope.cancel()


async def test_an_nf_query_answers_after_its_updates_died_with_their_holder() -> None:
    """PRADS on member ``b`` touches a host's asset held by ``a`` (untethered, into a
    replica); ``a`` dies before the fold.  The ``statistics`` query on ``b`` (which
    flushes first, to count every update of ``b``) must answer with what the space holds,
    the lost update counted in the instance's counters, not fail with the store's report."""
    from nf.prads.monitor import PRADS
    from nf.prads.state import Asset

    secret = os.urandom(16).hex().encode()
    host = 0x0A000001
    with trio.fail_after(60):
        async with open_controller(secret=secret, failure_timeout=1.0) as ctl:
            join = partial(store.open_space, controller=ctl.address, secret=secret)
            async with join() as c, join() as b, trio.open_nursery() as nursery:
                c.map("prads.assets", Asset)
                prads = PRADS(b, {})
                made, crash, crashed = trio.Event(), trio.CancelScope(), trio.Event()

                async def member_a() -> None:
                    with crash:
                        async with join() as a:
                            PRADS(a, {})  # (its maps: a member holds what it registered)
                            async with a.map("prads.assets", Asset).create(host) as ref:
                                await ref.touch(1.0)
                            made.set()
                            await trio.sleep_forever()
                    crashed.set()

                nursery.start_soon(member_a)
                await made.wait()
                async with prads.assets.get(host) as ref:
                    crash.cancel()
                    await crashed.wait()
                    await ref.touch(2.0)  # into b's replica, to be folded at a
                await _until(lambda: "fold-lost" in b.statistics().errors, 30)
                answer = await prads.query("statistics")
                assert isinstance(answer, dict) and "assets" in answer
                assert prads.counts.get("untethered-failed", 0) >= 1
                nursery.cancel_scope.cancel()
