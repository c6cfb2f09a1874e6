"""Joining a space through the controller: the node's answers to the membership callbacks.

``store.shell.membership`` carries the controller's commands; this module turns each into what
the node must do (``store.shell.membership``'s docstring states the contract):

* every stage change installs the new :class:`~ring.ownership.NodeView` in the core before
  the callback returns (the controller counts the stage as reached on return);
* SCALING starts the background drain of key records whose next owner is another node, at
  ``drain_rate`` records per second, and reports the drain once every hand-on has been
  acknowledged;
* NORMAL on the new ring forgets the event's markers;
* a PRE_SCALING whose next ring leaves this node out (an operator's ``ctl scale-in`` of
  it, not the leave the application asks for when its work is done: :func:`leave`) first
  runs the application's ``on_scale_in`` hook, bounded by ``scale_in_budget``
  seconds: the paper's order for a leaver (§4.4) is to stop taking work and finish what it
  has *before* its objects are handed on, since an object that reaches the node after its
  drain would be left behind with it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict

import trio

from store.core.instructions import DrainProgress, DrainStep, Instruction
from store.core.objects import UntetheredCallsFailed
from store.shell.membership import Membership
from store.shell.node import Node
from store.wire.control import ControllerRefused, ScalingAborted
from store.wire.errors import PeerUnavailable

__all__ = ["DEFAULT_DRAIN_RATE", "SCALE_IN_BUDGET", "NodeMember", "ScaleInHook", "leave"]

logger = logging.getLogger("store.shell.member")

#: Key records and objects handed on per second by the background drain (a leaving node
#: hands its records on first, then its objects).  Both travel in batches, one message per
#: receiver and step, so the receiver's cost per item is what paces packets against the
#: drain: about 16 us of its CPU per item (bench.leave), where an object cost 40 us when
#: each went alone and this rate was 20,000/s; 50,000/s keeps the receiver's share (about
#: 0.8 s of CPU a second before, about that now), and a member holding 200,000 objects and
#: 100,000 records hands them over in about 6 s.
DEFAULT_DRAIN_RATE = 50_000

#: Seconds a leaver's ``on_scale_in`` hook may take before the node acknowledges
#: PRE_SCALING all the same: below the controller's default pre-scaling timeout (5 s), so
#: that a slow application does not abort the event.
SCALE_IN_BUDGET = 4.0

#: ``async def on_scale_in(budget)``: the application stops taking work and finishes what
#: it has, within ``budget`` seconds.
ScaleInHook = Callable[[float], Awaitable[None]]


class NodeMember:
    """The membership handler of one node."""

    def __init__(
        self,
        node: Node,
        drain_rate: int = DEFAULT_DRAIN_RATE,
        on_scale_in: ScaleInHook | None = None,
        scale_in_budget: float = SCALE_IN_BUDGET,
    ) -> None:
        self.node = node
        self.drain_rate = drain_rate
        self.on_scale_in = on_scale_in
        self.scale_in_budget = scale_in_budget
        #: Set by :func:`leave`: the application has finished its work and asks to go
        #: itself, so the scale-in it asks for does not call its hook.
        self.asked_to_leave = False
        self.records_moved = 0

    async def on_pre_scaling(self, membership: Membership) -> None:
        self.node.enter_stage(membership.view)
        nxt = membership.next_ring
        name = self.node.name
        if (
            self.on_scale_in is not None
            and not self.asked_to_leave
            and nxt is not None
            and name not in nxt
            and name in membership.ring
        ):
            await self._run_scale_in_hook(self.on_scale_in)

    async def _run_scale_in_hook(self, hook: ScaleInHook) -> None:
        """The application's last work before this node's objects are handed on.  Its
        failure or its overrun is logged, never fatal: the event goes on with what the node
        holds by then (holding the barrier longer would abort it for everyone)."""
        budget = self.scale_in_budget
        with trio.move_on_after(budget) as scope:
            try:
                await hook(budget)
            except Exception:
                logger.exception("%s: the application's on_scale_in failed", self.node.name)
        if scope.cancelled_caught:
            logger.warning(
                "%s: the application's on_scale_in took over %g s; its objects are handed on now",
                self.node.name,
                budget,
            )

    async def on_scaling(self, membership: Membership) -> None:
        self.node.enter_stage(membership.view)
        assert self.node._nursery is not None
        self.node._nursery.start_soon(self._drain, membership)

    async def _drain(self, membership: Membership) -> None:
        node = self.node
        epoch = membership.epoch
        moved = 0
        before = node.core.statistics()  # this event's objects, not lifetime
        tick = 0.01
        per_tick = max(1, int(self.drain_rate * tick))
        # One step every tick, on the clock: a step's own work does not slow the pace (it
        # did: a step took a few ms, and then the loop slept a whole tick).  A loop that
        # falls behind (its steps slower than a tick, or kept waiting) catches up by at
        # most three ticks, step after step, never with one larger step.
        due = trio.current_time()
        while True:
            progress = _progress(node.handle(DrainStep(per_tick)))
            moved += progress.moved
            if progress.moved == 0 and progress.drained:
                break
            if progress.moved or progress.scanning:
                # Paced while there is work (records to hand on or to look at: deciding
                # which move costs a key hash each).
                due = max(due + tick, trio.current_time() - 3 * tick)
                await trio.sleep_until(due)
            else:  # only acknowledgements are awaited: poll
                await trio.sleep(0.001)
                due = trio.current_time()
            if membership.epoch != epoch:
                return  # the event ended (or aborted) under us
        self.records_moved += moved
        after = node.core.statistics()
        await membership.report_drained(moved, after.migrations_out - before.migrations_out)

    async def on_normal(self, membership: Membership) -> None:
        self.node.enter_stage(membership.view)

    async def on_abort(self, membership: Membership) -> None:
        self.node.enter_stage(membership.view)

    async def on_repair(self, membership: Membership) -> None:
        await self.node.repair(membership.view, membership.dead, self.drain_rate)

    async def on_leave(self, membership: Membership) -> None:
        await flush_before_leaving(self.node)

    def figures(self) -> dict[str, int | float | str]:
        """The column ``store.ctl status`` shows for this node: the core's statistics (by
        their own names), then the shell's; error counts as totals (``errors`` by kind is
        in ``Space.statistics()``)."""
        node = self.node
        core = node.core.statistics()
        micro = node.micro.statistics()
        wire = node.wire_statistics()
        figures: dict[str, int | float | str] = {
            name: value for name, value in asdict(core).items() if not isinstance(value, dict)
        }
        figures["errors"] = sum(core.errors.values()) + sum(node.errors.values())
        figures["parked"] = micro.parked
        figures["messages_sent"] = wire.messages_sent
        figures["messages_received"] = wire.messages_received
        figures["bytes_sent"] = wire.bytes_sent
        figures["bytes_received"] = wire.bytes_received
        figures["bad_frames"] = (
            wire.frames_malformed + wire.frames_unknown_type + wire.frames_too_large
        )
        figures["auth_failures"] = wire.auth_failures
        figures["records_moved"] = self.records_moved
        # Failure repairs: per map, key records rebuilt from survivors' reports, and
        # objects known lost with the node that held them (ObjectLost until made anew).
        for map_name, count in sorted(core.rebuilt.items()):
            figures[f"rebuilt:{map_name}"] = count
        for map_name, count in sorted(core.lost.items()):
            figures[f"lost:{map_name}"] = count
        return figures


async def leave(member: NodeMember, membership: Membership) -> None:
    """A graceful scale-in of this member, in the order the paper (§4.4) describes: no
    new units (the caller stopped submitting), parked microthreads finish, untethered
    batches and replicas are flushed, then the controller runs the scale-in event in which
    this node hands over its key records and objects; return once it has left.  The last
    member of a cluster cannot leave (there is nobody to hand over to): it just stops."""
    node = member.node
    member.asked_to_leave = True
    with trio.fail_after(LEAVE_TIMEOUT):
        while node.micro.statistics().in_flight:
            await trio.sleep(0.005)
        await flush_before_leaving(node)
        delay = 0.01
        while not membership.left and len(membership.ring) > 1:
            nxt = membership.next_ring
            if nxt is not None and node.name not in nxt:
                # The running event removes this node already (``ctl scale-in``): asking
                # would be refused; wait for its end (or its abort: then ask).
                await trio.sleep(0.01)
                continue
            try:
                await membership.leave()
            except (ControllerRefused, ScalingAborted) as exc:
                # Another event runs (members leaving together go one at a time), or this
                # one was aborted: stay a full member, and ask again a little later.
                logger.info("%s waits to leave: %s", node.name, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 0.5)
        if membership.left:
            await node.farewell()


async def flush_before_leaving(node: Node) -> None:
    """Apply this member's untethered updates and replicas before it hands its objects on.

    What the flush reports is no reason to stay: updates that failed earlier (lost with a
    member that died, or raised at their object) were counted where they failed, and a
    destination that does not answer is a fault of its own.  A leave that stopped there
    would strand every object this member holds (its process ends anyway, and the repair
    then declares them lost), so it is logged and the leave goes on."""
    try:
        await node.space_flush()
    except (UntetheredCallsFailed, PeerUnavailable) as exc:
        logger.warning("%s leaves although its last flush failed: %s", node.name, exc)


#: Seconds a member waits to finish its work and be scaled in before it gives up.
LEAVE_TIMEOUT = 60.0


def _progress(instructions: list[Instruction]) -> DrainProgress:
    for ins in instructions:
        if type(ins) is DrainProgress:
            return ins
    raise AssertionError("the core did not answer a DrainStep")
