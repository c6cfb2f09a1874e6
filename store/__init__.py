"""S6 for Python: an elastic distributed shared object space for network functions.

What NF authors import::

    import store
    from store import SingleWriter, MultiWriter, stale, untethered

    async with store.open_space() as space:            # embedded single-node space
        flows = space.map("flows", Flow)
        async with flows.create(key) as ref:
            await ref.on_packet(64)

The object kinds and annotations are imported eagerly (they are pure); the trio-based parts
(``open_space``, ``Space``...) load on first use, so that importing ``store.core`` for the
pure state machines never drags trio in (an architecture test checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from store.core.objects import (
    InvalidKey,
    MultiWriter,
    SingleWriter,
    UntetheredCallsFailed,
    ValueNotEncodable,
    stale,
    untethered,
)
from store.wire.errors import (
    MemberLeft,
    MessageTooLarge,
    ObjectLost,
    ObjectNotFound,
    ObjectRemoved,
    PeerUnavailable,
    ReferenceClosed,
    RemoteCallError,
    StateNotEncodable,
    StoreError,
    WrongKind,
)

if TYPE_CHECKING:
    from store.api import Map, Ref, Space, SpaceStatistics
    from store.core.scheduler import SchedulerFull
    from store.merge_check import check_merge
    from store.space import open_space

__all__ = [
    "InvalidKey",
    "Map",
    "MemberLeft",
    "MessageTooLarge",
    "MultiWriter",
    "ObjectLost",
    "ObjectNotFound",
    "ObjectRemoved",
    "PeerUnavailable",
    "Ref",
    "ReferenceClosed",
    "RemoteCallError",
    "SchedulerFull",
    "SingleWriter",
    "Space",
    "SpaceStatistics",
    "StateNotEncodable",
    "StoreError",
    "UntetheredCallsFailed",
    "ValueNotEncodable",
    "WrongKind",
    "check_merge",
    "open_space",
    "stale",
    "untethered",
]

_LAZY = {
    "open_space": "store.space",
    "Space": "store.api",
    "SpaceStatistics": "store.api",
    "Map": "store.api",
    "Ref": "store.api",
    "SchedulerFull": "store.core.scheduler",
    "check_merge": "store.merge_check",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'store' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
