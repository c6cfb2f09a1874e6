"""``store.open_space``: join (or form) an object space as an instance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from store.api import Space
from store.shell.controller import DEV_SECRET as _CONTROLLER_DEV_SECRET
from store.shell.member import DEFAULT_DRAIN_RATE, SCALE_IN_BUDGET, NodeMember, leave
from store.shell.membership import join_cluster
from store.shell.node import open_node

__all__ = ["DEV_SECRET", "join_space", "open_space"]

#: The secret used when none is given (the controller's too): for development only.
DEV_SECRET = _CONTROLLER_DEV_SECRET


@asynccontextmanager
async def open_space(
    controller: str | None = None,
    listen: str | None = None,
    *,
    secret: bytes = DEV_SECRET,
    members: list[str] | None = None,
    **options: Any,
) -> AsyncIterator[Space]:
    """This process as an instance of the object space, for the duration of the block.

    With no ``controller`` and no ``members`` it is a single-node space in-process: no
    socket is opened.  ``members`` (names ``"host:port"`` of the other nodes) forms a
    cluster whose membership is fixed at start; ``listen`` is where this member accepts the
    others (``"127.0.0.1:0"`` picks a port; the member's name is its bound address).
    ``controller`` joins through the membership authority (``python -m store.controller``):
    the block starts once this member is admitted.  ``options`` tune the node
    (``flush_interval``, ``merge_interval``, ``limit``, ``max_frame``, ``request_timeout``:
    seconds an operation waits for a remote answer before ``PeerUnavailable`` (30 by
    default), ``freeze_gc``: freeze the garbage collector's generations after each scaling
    event, see ``Node.enter_stage``).  With a ``controller``, also ``labels`` (a dict of
    strings this member reports in ``ctl status``, e.g. what it runs and where its data
    channel listens) and ``query`` (``async def query(name, args)``: answers the
    control-plane queries the controller relays, ``python -m nf query``).

    ``on_scale_in`` (``async def on_scale_in(budget)``, with a ``controller``) is called
    when an operator's scale-in removes this member, before it hands anything on: the
    application stops taking work and finishes what it has within ``budget`` seconds
    (``scale_in_budget``, 4 by default: below the controller's pre-scaling timeout; the
    hand-over starts then in any case), so that every object the member will ever hold is
    handed on with the rest.  Leaving the block afterwards completes the leave.
    """
    if controller is not None:
        async with join_space(controller, listen or "127.0.0.1:0", secret, options) as space:
            yield space
        return
    if members and listen is None:
        listen = "127.0.0.1:0"
    async with open_node(listen=listen, members=members, secret=secret, **options) as node:
        yield Space(node)


@asynccontextmanager
async def join_space(
    controller: str, listen: str, secret: bytes, options: dict[str, Any]
) -> AsyncIterator[Space]:
    """An embedded member: a listening node admitted through ``controller``."""
    drain_rate = options.pop("drain_rate", DEFAULT_DRAIN_RATE)
    labels = options.pop("labels", None)
    query = options.pop("query", None)
    on_scale_in = options.pop("on_scale_in", None)
    budget = options.pop("scale_in_budget", SCALE_IN_BUDGET)
    async with open_node(listen=listen, secret=secret, **options) as node:
        member = NodeMember(node, drain_rate, on_scale_in, budget)
        async with join_cluster(
            controller,
            name=node.name,
            address=node.name,
            secret=secret,
            handler=member,
            status_provider=member.figures,
            labels=labels,
            query_handler=query,
        ) as membership:
            node.enter_stage(membership.view)
            node.membership = membership
            yield Space(node)
            await leave(member, membership)
