"""What the object layer keeps per held object and per request in flight, and the marker
its fast paths answer with.  Shared by ``object_layer`` and ``scale_in``."""

from __future__ import annotations

from typing import Any, Final, TypeAlias

from store.core.objects import ClassInfo, ObjectKind
from store.core.scheduler import Wait
from store.wire.codes import Kind
from store.wire.messages import Release

__all__ = ["KIND_CODE", "MAX_RELOCATE", "SLOW", "Deferred", "Held", "K", "Pending"]

K: TypeAlias = tuple[str, Any]  # (map name, key): the identity of one object

KIND_CODE: Final = {ObjectKind.SINGLE: Kind.SINGLE, ObjectKind.MULTI: Kind.MULTI}

MAX_RELOCATE = 3  # a call chases a moving object at most this many times


class _Slow:
    """``call_now``'s answer when the call needs ``handle(Invoke(...))``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SLOW"


SLOW: Final = _Slow()


class Held:
    """An object this node holds, with what its local references need (about 90 bytes)."""

    __slots__ = ("info", "obj", "owed", "refs", "release", "removed", "seen", "version")

    def __init__(self, info: ClassInfo, obj: Any, version: int) -> None:
        self.info = info
        self.obj = obj
        self.version = version
        self.refs = 0  # local references in use (single-writer)
        self.release: Release | None = None  # someone else wants it: hand over at refs == 0
        self.removed = False
        self.seen: dict[str, int] | None = None  # multi-writer: last seq applied per sender
        #: Multi-writer: this node may owe the object earlier updates of its own (a replica
        #: to fold, a fence out, calls sent to where it was), so a call through a local
        #: reference asks ``ObjectLayer.in_order`` first; False is the common case.
        self.owed = False


class Pending:
    """A request this node made and waits to hear about."""

    __slots__ = (
        "args",
        "asked",
        "at",
        "born",
        "creators",
        "info",
        "k",
        "keyop",
        "kind",
        "method",
        "relocated",
        "since",
        "to",
        "tries",
        "waits",
    )

    def __init__(self, kind: str, k: K | None, info: ClassInfo | None) -> None:
        self.kind = kind
        self.k = k
        self.info = info
        self.waits: list[Wait[Any]] = []
        self.method = ""
        self.args: list[Any] = []
        self.tries = 0
        self.creators: list[Wait[Any]] | None = None  # acquire: the waits that asked to create
        self.asked = 0  # acquire: waits[:asked] were there when the request was sent
        self.at = 0.0  # call: the caller's clock when it was made (a stale read's age)
        self.born = 0.0  # when it was made (it expires request_timeout later)
        #: An untethered call that could not reach a node that left, sent again where its
        #: object is now (a flush's barrier to that node waits for it, see ScaleIn.bounce).
        self.relocated = False
        #: The key request it sent (sent again when its key owner died: see repair).
        self.keyop: Any = None
        #: call: the node it was last shipped to (looked for again if that node dies).
        self.to: str | None = None
        #: call: looked for again after its node died: an object of this version or later
        #: was made since (its own object was lost), and must not take it.
        self.since = 0


#: What waits for a fence, as data: ("invoke", Invoke, now), ("untethered", k, method,
#: args, owner), ("reship", pending, owner), ("fold", k, replica, to) or ("arrived",).
Deferred: TypeAlias = tuple[Any, ...]
