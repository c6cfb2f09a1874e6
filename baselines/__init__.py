"""The systems S6 is compared with (paper §3, §7), as backends of the same Space API.

An NF instance always joins the S6 cluster (membership, steering, control-plane queries);
the backend decides where the NF's state lives.  The NF code is the same on all of them:

* ``s6``: the object space itself (the instance's own joined space);
* ``local-only`` (:mod:`baselines.local_only`): all state in the instance's own memory,
  never reconciled: the speed ceiling, not a correct NF across instances;
* ``remote-only`` (:mod:`baselines.remote`, :mod:`baselines.kv`): StatelessNF, every
  access at a central store, our kv server (``python -m baselines.kv_server``);
* ``redis`` (:mod:`baselines.redis_client`): the same on a real Redis server;
* ``stop-the-world`` (:mod:`baselines.stop_the_world`): OpenNF-style, S6's space with each
  flow's objects recorded, moved in bulk at a scale event while the sender holds all
  traffic back.

``async with open_backend(name, space, store_address=...) as nf_space:`` gives what the
NF is built on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import store

__all__ = ["BACKENDS", "STORE_BACKENDS", "SpaceLike", "open_backend"]

#: The backends ``open_backend`` knows, in the order figures list them.
BACKENDS = ("s6", "local-only", "remote-only", "redis", "stop-the-world")
#: The backends whose state lives in a store of their own (``--store HOST:PORT``).
STORE_BACKENDS = ("remote-only", "redis")


class SpaceLike(Protocol):
    """What an NF uses of a space, on every backend."""

    @property
    def name(self) -> str: ...

    def map(self, name: str, cls: type[Any]) -> Any: ...

    def submit_nowait(self, flow: Any, fn: Callable[..., Any], *args: Any) -> Any: ...

    async def submit(self, flow: Any, fn: Callable[..., Any], *args: Any) -> Any: ...

    async def flush(self, timeout: float | None = None) -> None: ...

    def statistics(self) -> Any: ...


@asynccontextmanager
async def open_backend(
    name: str,
    space: store.Space,
    *,
    store_address: str | None = None,
    secret: bytes | None = None,
    timeout: float | None = None,
    instance_name: str | None = None,
) -> AsyncIterator[SpaceLike]:
    """The space an NF instance runs on with backend ``name`` (one of :data:`BACKENDS`).

    ``space`` is the instance's joined S6 space: ``s6`` yields it; the others name their
    space after it.  ``store_address`` (``HOST:PORT``) is the kv server (``remote-only``,
    authenticated with ``secret``, the development secret by default) or the Redis
    server (``redis``).  ``timeout``: seconds
    a remote request may wait for its answer before it fails.  ``instance_name`` names
    the backend's space instead of ``space.name`` (several instances sharing one
    embedded S6 space in a test or the offline runner).  A remote-only space
    flushes what it wrote when the block ends without error."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "s6":
        yield space
        return
    me = space.name if instance_name is None else instance_name
    if name == "local-only":
        from baselines.local_only import LocalOnlySpace

        yield LocalOnlySpace(me)
        return
    if name == "stop-the-world":
        from baselines.stop_the_world import StopTheWorldSpace

        # State stays in the instance's own S6 space (``instance_name`` does not apply:
        # the records are this process's, whatever the space is called).
        yield StopTheWorldSpace(space)
        return
    if store_address is None:
        raise ValueError(f"backend {name} needs the store's address (HOST:PORT)")
    from baselines.remote import open_remote_space

    wait = 30.0 if timeout is None else timeout
    if name == "remote-only":
        from baselines.kv import open_kv_store
        from store.space import DEV_SECRET

        async with (
            open_kv_store(
                store_address,
                secret=DEV_SECRET if secret is None else secret,
                name=f"remote-only {me}",
                timeout=wait,
            ) as kv,
            open_remote_space(me, kv) as remote,
        ):
            yield remote
        return
    from baselines.redis_client import open_redis_store

    async with (
        open_redis_store(store_address, timeout=wait) as redis,
        open_remote_space(me, redis) as remote,
    ):
        yield remote
