"""What NF authors use: ``Space``, ``Map``, references (paper §5.1, Table 2).

Every method of every object is awaited the same way whatever its kind and wherever it
lives, so NF code never needs to know where state is; ``Map.local`` is the one shortcut an
NF opts into, with that awaited way as its fallback.  The costs differ, and the code here
is arranged so that the common case costs least:

* **An object held here, used in place**: ``flows.local(key)`` (or ``local_create``)
  returns the object itself when nothing could overtake a plain call on it (see
  :meth:`Map.local`): one dict lookup and two checks, and its methods are plain calls, no
  reference, no coroutine.  The NF's awaited path below is its fallback.
* **A local single-writer object through a reference** (the per-flow state of a flow this
  instance serves): ``async with flows.create(key) as ref`` is one dict lookup and two
  attribute checks, and ``await ref.method(...)`` one plain call; no task, no trio call,
  no message (but a reference and an access record, and a coroutine each).
* **Anything else** becomes a stimulus to the node's core (``Node.handle``), which
  queues messages and settles the :class:`~store.core.scheduler.Wait` that the awaiting
  microthread parks on when the answer comes.

The only calls into the core that do not go through ``Node.handle`` are the object layer's
fast paths (``Node.fast``: ``take``, ``let_go``, ``held``, ``in_order``, ``located``,
``call_now``, ``create_here``...), which serve local state at once; the logic of every
case lives in the core, none here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, TypeVar, cast

from store.core.instructions import (
    Acquire,
    AskScan,
    AskSnapshot,
    Invoke,
    LetGo,
    Locate,
    RegisterMap,
    Remove,
)
from store.core.object_layer import SLOW, Held
from store.core.objects import ClassInfo, MethodKind, ObjectKind, check_key, info_of, load_state
from store.core.router import NodeStatistics
from store.core.scheduler import Wait
from store.wire.errors import MemberLeft, ObjectNotFound, ObjectRemoved, ReferenceClosed
from store.wire.messages import key_from_wire

if TYPE_CHECKING:
    from store.shell.node import Node

__all__ = ["Map", "Ref", "Space", "SpaceStatistics"]

T = TypeVar("T")

#: Keys whose states ``Map.items()`` asks a node for at once: the answer is one message.
SNAPSHOT_KEYS = 256


async def _ready(value: Any) -> Any:
    """An awaitable that returns ``value`` at once, without suspending.

    A coroutine that never awaits: making and running one costs about 55 ns here, against
    130 ns for an object whose ``__await__`` is a generator (measured with
    ``bench.object_space``).  The call that returns it has done its work already, so a
    reference method runs when called, as a remote one does, whether or not it is awaited."""
    return value


#: ``object.__new__``: the hot path builds its small slotted records without an
#: ``__init__`` frame (about 30 ns less per record, measured), as ``store.core.scheduler``
#: does for finished units.
_new = object.__new__


class Ref:
    """A reference to one object, handed out by ``Map.create`` / ``Map.get``.

    Its methods are the object's methods, each returning an awaitable.  ``created`` says
    whether ``create`` made the object.  Subclasses are generated per object class and
    access mode (see :func:`_ref_class`).
    """

    __slots__ = ("_held", "_k", "_map", "_owner", "created")

    def __init__(self, map_: Map[Any], k: tuple[str, Any], held: Held | None, owner: str) -> None:
        self._map = map_
        self._k = k
        self._held = held
        self._owner = owner
        self.created = False

    @property
    def key(self) -> Any:
        return self._k[1]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._k[0]}[{self._k[1]!r}] at {self._owner}>"


#: What a reference holds once its ``async with`` block has ended: using it then is
#: refused (the object may have moved on; a write would be lost or, worse, applied to a
#: copy).  It looks removed, so the local methods' one check covers it.
_CLOSED: Final = Held.__new__(Held)
_CLOSED.removed = True


def _closed(ref: Ref) -> NoReturn:
    raise ReferenceClosed(
        f"{ref._k[0]}[{ref._k[1]!r:.60}]: a reference is used only inside its 'async with' "
        "block; take a new one"
    )


def _local_method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Ref, *args: Any) -> Any:
        held = self._held
        assert held is not None
        if held.removed:
            if held is _CLOSED:
                _closed(self)
            raise ObjectRemoved(f"{self._k[0]}[{self._k[1]!r}] was removed")
        return _ready(fn(held.obj, *args))

    method.__name__ = name
    return method


def _call_slow(ref: Ref, name: str, args: tuple[Any, ...], untethered: bool) -> Any:
    """A call the core does at once when it can (``call_now``), else an ``Invoke``."""
    map_ = ref._map
    node = map_._node
    result = map_._call_now(ref._k, map_.info, name, args, ref._owner, node.clock())
    if result is SLOW:
        wait: Wait[Any] | None = None if untethered else Wait(ref._k)
        node.handle(Invoke(ref._k, map_.info, name, args, ref._owner, wait))
        return _ready(None) if wait is None else wait
    return _ready(result)


def _local_multi_method(name: str, fn: Callable[..., Any], info: ClassInfo) -> Callable[..., Any]:
    """A method of a multi-writer object held here: called directly, unless this node's
    earlier updates of it have not reached it yet (a replica to fold, a fence owed after
    it moved here), when the core orders it behind them."""
    untethered = info.methods[name].kind is MethodKind.UNTETHERED

    # (the checks of _local_method, inline, not shared through a helper: a call each)
    def method(self: Ref, *args: Any) -> Any:
        held = self._held
        assert held is not None
        if held.removed:
            if held is _CLOSED:
                _closed(self)
            raise ObjectRemoved(f"{self._k[0]}[{self._k[1]!r}] was removed")
        if not held.owed or self._map._in_order(self._k):
            return _ready(fn(held.obj, *args))
        return _call_slow(self, name, args, untethered)

    method.__name__ = name
    return method


def _remote_method(name: str, info: ClassInfo) -> Callable[..., Any]:
    """A method of an object held elsewhere (or of a multi-writer one held here): the
    core's fast paths do it at once when they can (a local object or replica, a fresh
    ``@stale`` entry, an untethered call queued for shipping); otherwise an ``Invoke``.
    A method of each kind calls the fast path made for its kind."""
    minfo = info.methods[name]
    untethered = minfo.kind is MethodKind.UNTETHERED

    def slow(self: Ref, args: tuple[Any, ...]) -> Any:
        return _call_slow(self, name, args, untethered)

    def method(self: Ref, *args: Any) -> Any:
        if self._held is _CLOSED:
            _closed(self)
        return slow(self, args)

    if minfo.kind is MethodKind.STALE:
        max_age = minfo.max_age

        def stale_method(self: Ref, *args: Any) -> Any:
            if self._held is _CLOSED:
                _closed(self)
            map_ = self._map
            value = map_._read_stale(self._k, name, args, max_age, map_._clock())
            return slow(self, args) if value is SLOW else _ready(value)

        stale_method.__name__ = name
        return stale_method

    if untethered and info.kind is ObjectKind.MULTI:
        if info.mergeable:
            fn = getattr(info.cls, name)

            def replica_method(self: Ref, *args: Any) -> Any:
                if self._held is _CLOSED:
                    _closed(self)
                map_ = self._map
                done = map_._update_replica(self._k, map_.info, fn, args, self._owner)
                return slow(self, args) if done is SLOW else _ready(None)

            replica_method.__name__ = name
            return replica_method

        def shipped_method(self: Ref, *args: Any) -> Any:
            if self._held is _CLOSED:
                _closed(self)
            done = self._map._ship_untethered(self._k, name, args, self._owner)
            return slow(self, args) if done is SLOW else _ready(None)

        shipped_method.__name__ = name
        return shipped_method

    method.__name__ = name
    return method


def _readonly_method(name: str, fn: Callable[..., Any], remote: Callable[..., Any]) -> Any:
    """A @stale method through a read-only reference: direct while the object is held here,
    else through the stale cache."""

    def method(self: Ref, *args: Any) -> Any:
        if self._held is _CLOSED:
            _closed(self)
        held = self._map._held(self._k)
        if held is not None:
            return _ready(fn(held.obj, *args))
        return remote(self, *args)

    method.__name__ = name
    return method


def _untethered_method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """An ``@untethered`` method through ``Map.untethered``'s reference: into this node's
    replica (folded to the object, once its place is known), or, when the object is held
    here, called on it as a local reference's call is."""

    def method(self: Ref, *args: Any) -> Any:
        if self._held is _CLOSED:
            _closed(self)
        map_ = self._map
        done = map_._update_replica(self._k, map_.info, fn, args, self._owner)
        if done is SLOW:  # held here
            self._owner = map_._me
            return _call_slow(self, name, args, True)
        return _ready(None)

    method.__name__ = name
    return method


def _refuse(name: str, why: str) -> Callable[..., Any]:
    def method(self: Ref, *args: Any) -> Any:
        raise TypeError(f"{type(self).__name__}.{name}: {why}")

    method.__name__ = name
    return method


def _ref_class(info: ClassInfo, mode: str) -> type[Ref]:
    """The reference class for ``info.cls`` in ``mode``: "local" (writable single-writer,
    or multi-writer held here), "remote" (multi-writer held elsewhere), "readonly" or
    "untethered" (``Map.untethered``: @untethered methods only)."""
    cache: dict[str, type[Ref]] = info.cls.__dict__.get("__s6_refs__") or {}
    if mode in cache:
        return cache[mode]
    namespace: dict[str, Any] = {"__slots__": ()}
    for name, minfo in info.methods.items():
        fn = getattr(info.cls, name)
        if mode == "local" and info.kind is ObjectKind.MULTI:
            namespace[name] = _local_multi_method(name, fn, info)
        elif mode == "local":
            namespace[name] = _local_method(name, fn)
        elif mode == "remote":
            namespace[name] = _remote_method(name, info)
        elif mode == "untethered":
            namespace[name] = (
                _untethered_method(name, fn)
                if minfo.kind is MethodKind.UNTETHERED
                else _refuse(name, "an untethered reference runs @untethered methods only")
            )
        elif minfo.kind is MethodKind.STALE:
            namespace[name] = _readonly_method(name, fn, _remote_method(name, info))
        else:
            namespace[name] = _refuse(
                name, "a read-only reference runs @stale methods only (use a writable get)"
            )
    cls = type(f"{info.cls.__qualname__}Ref_{mode}", (Ref,), namespace)
    cache[mode] = cls
    type.__setattr__(info.cls, "__s6_refs__", cache)
    return cls


class _Access:
    """``async with map.create(key) / map.get(key) as ref``: takes and lets go of a
    reference.  Made by ``Map.create`` / ``Map.get`` without an ``__init__`` frame; the
    local case of ``__aenter__`` and ``__aexit__`` never suspends (two coroutines are the
    cheapest awaitables there are: see :func:`_ready`)."""

    __slots__ = ("_args", "_create", "_key", "_map", "_readonly", "_ref")

    def __init__(self, map_: Map[Any], key: Any, create: bool, readonly: bool) -> None:
        self._map = map_
        self._key = key
        self._create = create
        self._readonly = readonly
        self._ref: Ref | None = None
        self._args: tuple[Any, ...] = ()

    async def __aenter__(self) -> Any:
        map_ = self._map
        k = (map_.name, self._key)
        try:
            held = None if self._readonly else map_._take(k, map_._single)
        except TypeError:  # an unhashable key: say what a key may be
            check_key(self._key)
            raise
        if held is not None:
            ref = _new(map_._local)  # Ref.__init__, inline
            ref._map = map_
            ref._k = k
            ref._held = held
            ref._owner = map_._me
            ref.created = False
            self._ref = ref
            return ref
        return await self._slow(k)

    async def _slow(self, k: tuple[str, Any]) -> Ref:
        # The key is checked here, not on the fast path: a key that finds an object held
        # here equals the key that object was made or fetched with, which came this way.
        check_key(k[1])
        map_ = self._map
        node = map_._node
        if node.departed and not self._readonly:
            _refuse_departed(node, k)
        if not self._create and node.fast.absent_here(k):  # (this node owns the key)
            raise ObjectNotFound(f"{k[0]}[{k[1]!r}]: no such object")
        if self._readonly and map_._single:
            if map_._held(k) is None:
                owner = node.fast.located(k)
                if owner is None:
                    wait: Wait[Any] = Wait(k)
                    node.handle(Locate(k, False, wait))
                    owner, _ = await wait
            else:
                owner = map_._me
            ref: Ref = map_._readonly_ref(map_, k, None, owner)
        elif map_._single:
            made = node.fast.create_here(k, map_.info, self._args) if self._create else None
            if made is not None:  # this node owns the key: made here, no message
                ref = map_._local(map_, k, made, map_._me)
                ref.created = True
                self._ref = ref
                return ref
            wait = Wait(k)
            node.handle(Acquire(k, self._create, wait, self._args))
            held, created = await wait
            ref = map_._local(map_, k, held, map_._me)
            ref.created = created
        else:
            # An existing object is found through the location cache, for a create as for
            # a get (a create asks the key owner only when the cache does not know it).
            owner = node.fast.located(k)
            created = False
            if owner is None and self._create:
                made = node.fast.create_here(k, map_.info, self._args)
                if made is not None:
                    owner, created = map_._me, True
            if owner is None:
                wait = Wait(k)
                node.handle(Locate(k, self._create, wait, self._args))
                owner, created = await wait
            held = map_._held(k)
            if held is not None:
                ref = map_._local(map_, k, held, owner)
            else:
                ref = map_._remote(map_, k, None, owner)
            ref.created = created
        self._ref = ref
        return ref

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ref = self._ref
        if ref is None:
            return
        held = ref._held
        ref._held = _CLOSED
        if held is not None and self._map._single:
            map_ = self._map
            if not map_._let_go(held):
                map_._node.handle(LetGo(ref._k, held))


class _UntetheredAccess(_Access):
    """``async with map.untethered(key) as ref`` (see :meth:`Map.untethered`): never waits."""

    __slots__ = ()

    async def __aenter__(self) -> Any:
        map_ = self._map
        k = (map_.name, self._key)
        try:
            here = map_._held(k)
        except TypeError:
            check_key(self._key)
            raise
        owner: str | None = map_._me
        if here is None:
            check_key(self._key)  # (it may go into a record, as on create's slow path)
            node = map_._node
            if node.departed:
                _refuse_departed(node, k)
            owner = node.fast.located(k)
            if owner is None:
                if node.fast.create_here(k, map_.info, self._args) is not None:
                    owner = map_._me
                else:
                    _place(node, k, map_.info, self._args)
        ref = _new(cast("type[Ref]", map_._untethered_ref))  # (made for every MULTI map)
        ref._map = map_
        ref._k = k
        ref._held = None
        # None while the place is being asked: only the untethered methods read it, and
        # update_replica takes None for "not known yet".
        ref._owner = cast(str, owner)
        ref.created = False
        self._ref = ref
        return ref


def _refuse_departed(node: Node, k: tuple[str, Any]) -> None:
    raise MemberLeft(
        f"{k[0]}[{k[1]!r}]: {node.name} has left the space (a scale-in removed it and it"
        " handed its state on): finish the work before the hand-over (open_space's"
        " on_scale_in hook)"
    )


def _place(node: Node, k: tuple[str, Any], info: ClassInfo, args: tuple[Any, ...]) -> None:
    """Ask the key owner where ``k`` is, making it (``cls(*args)``, here) if absent, and
    do not wait: the answer names the place of this node's replica (``_reply_locate``);
    ``Node.space_flush`` waits for such answers before it folds.  One question per key
    at a time."""
    deferred = node.deferred
    wait = deferred.get(k)
    if wait is not None and not wait.done():
        return
    wait = deferred[k] = Wait(k)

    def answered(done: Wait[Any]) -> None:
        if deferred.get(k) is done:
            del deferred[k]

    wait.add_done_callback(answered)
    node.handle(Locate(k, True, wait, args, urgent=False))


class Map(Generic[T]):
    """A named map of objects of one class in the space (the paper's ``S6Map``)."""

    def __init__(self, node: Node, name: str, cls: type[T]) -> None:
        info = info_of(cls)
        node.handle(RegisterMap(name, info))
        self.name = name
        self.cls = cls
        self.info = info
        self._node = node
        # The core's fast paths, bound once (see the module docstring).
        self._take = node.fast.take
        self._let_go = node.fast.let_go
        self._held = node.fast.held
        self._in_order = node.fast.in_order
        self._create_here = node.fast.create_here
        self._call_now = node.fast.call_now
        self._read_stale = node.fast.read_stale
        self._update_replica = node.fast.update_replica
        self._ship_untethered = node.fast.ship_untethered
        self._me = node.name
        self._clock = node.clock
        self._single = info.kind is ObjectKind.SINGLE
        self._local = _ref_class(info, "local")
        self._remote = _ref_class(info, "remote")
        self._readonly_ref = _ref_class(info, "readonly")
        self._untethered_ref = (
            _ref_class(info, "untethered") if info.kind is ObjectKind.MULTI else None
        )

    def __repr__(self) -> str:
        return f"<Map {self.name!r} of {self.info.name}>"

    def create(self, key: Any, *args: Any) -> _Access:
        """``async with m.create(key, *args) as ref``: the object under ``key``, created
        (as ``cls(*args)``, on the node that asked) if absent; ``ref.created`` tells which.
        Where this node is the key's owner and nothing of it exists, the object and its
        record are made at once, without a message or a wait."""
        access = _new(_Access)  # _Access.__init__, inline: this is the per-packet path
        access._map = self
        access._key = key
        access._create = True
        access._readonly = False
        access._ref = None
        access._args = args
        return access

    def untethered(self, key: Any, *args: Any) -> _Access:
        """``async with m.untethered(key, *args) as ref``: a reference for ``@untethered``
        updates of a multi-writer object that has ``merge``, made if absent (as
        ``cls(*args)``, where ``create`` would make it), which never waits: where the
        object's place is not known yet (not held here, not in the location cache), the
        key owner is asked without waiting for the answer, and the updates go into this
        node's replica meanwhile, folded to the object once the answer names its place
        (``flush`` waits for it).  The paper's untethered updates, from the first one:
        a packet that only reports to a shared object does not wait a round trip for
        it.  Only @untethered methods may be called (others raise ``TypeError``), and
        ``ref.created`` is False (whether this made the object is not known here).  For
        a class without ``merge``, and for single-writer objects, it is :meth:`create`.
        An update whose object could not be placed (the key holds another kind of
        object, or the key owner did not answer) is reported by the next ``flush`` as
        ``UntetheredCallsFailed``, as any untethered update that failed."""
        access = self.create(key, *args)
        if self._untethered_ref is not None and self.info.mergeable:
            access.__class__ = _UntetheredAccess  # (create's fields; its own __aenter__)
        return access

    def local(self, key: Any) -> T | None:
        """The object under ``key`` itself, synchronously, when using it in place is
        safe; None otherwise: take the awaited path (``async with m.get(key)``).

        Safe means: this node holds it and, for a single-writer object, no reference to
        it is open here and no other node waits for it (a ``Release`` waiting for the
        references here to end); for a multi-writer one, none of this node's earlier
        updates of it is still on its way to it (a replica to fold, a fence owed: see
        ``Held.owed``), the test a local reference's call makes.  None when it is held
        elsewhere or nowhere, in use, owed to another node, or on its way.

        The object is used with plain calls (no ``await``), and only until the caller
        next awaits or makes another store operation: the node hands objects over, takes
        removals and applies other members' calls only between a microthread's steps,
        so nothing can move, drop or overtake it before then, and nothing is counted or
        let go.  Kept longer, it may be a copy that has moved on."""
        k = (self.name, key)
        try:
            held = self._held(k)
        except TypeError:  # an unhashable key: say what a key may be
            check_key(key)
            raise
        if held is None:
            return None
        if self._single:
            if held.refs == 0 and held.release is None:
                return held.obj  # type: ignore[no-any-return]
            return None
        if not held.owed or self._in_order(k):
            return held.obj  # type: ignore[no-any-return]
        return None

    def local_create(self, key: Any, *args: Any) -> T | None:
        """:meth:`local`, and where no object exists, the new one (``cls(*args)``) when
        this node can make it at once, as ``create`` does for a key this node owns with
        nothing of it anywhere; None otherwise: take ``async with m.create(key, *args)``.
        Whether it was made here is the object's own business to tell (its state)."""
        k = (self.name, key)
        try:
            held = self._held(k)
        except TypeError:
            check_key(key)
            raise
        if held is None:
            check_key(key)  # (the key goes into a record: checked as the slow path does)
            held = self._create_here(k, self.info, args)
            if held is None:
                return None
            if self._single:
                # create_here counted the caller's reference; there is none: let it go at
                # once (a new object has no Release waiting: this only uncounts it).
                if not self._let_go(held):  # pragma: no cover (owed to nobody yet)
                    self._node.handle(LetGo(k, held))
                    return None
                return held.obj  # type: ignore[no-any-return]
        elif self._single:
            if held.refs == 0 and held.release is None:
                return held.obj  # type: ignore[no-any-return]
            return None
        if not held.owed or self._in_order(k):
            return held.obj  # type: ignore[no-any-return]
        return None

    def get(self, key: Any, *, readonly: bool = False) -> _Access:
        """``async with m.get(key) as ref``: the existing object, or ``ObjectNotFound``.

        ``readonly=True`` never moves the object: only ``@stale`` methods run, from a local
        cache no older than their ``max_age``."""
        access = _new(_Access)
        access._map = self
        access._key = key
        access._create = False
        access._readonly = readonly
        access._ref = None
        access._args = ()
        return access

    async def remove(self, key: Any) -> bool:
        """Remove the object under ``key``; whether one existed.  Later accesses fail with
        ``ObjectNotFound`` until a create; references still held raise ``ObjectRemoved``.
        A ``@stale`` read on another member may still answer from its cache for at most
        that method's ``max_age`` after the remove returned (the cache is not told: that
        would cost a message to every member per remove), never longer."""
        check_key(key)
        k = (self.name, key)
        done = self._node.fast.remove_here(k)
        if done is not None:  # this node owns the key (and holds the object, if any)
            return done
        wait: Wait[bool] = Wait(k)
        self._node.handle(Remove(k, wait))
        return await wait

    async def items(self) -> AsyncIterator[tuple[Any, T]]:
        """Each existing key once, with a read-only snapshot of its object (a copy: changing
        it changes nothing).  Moves nothing; for the control plane, not the packet path."""
        node = self._node
        seen: set[Any] = set()
        for member in sorted(node.members()):
            wait: Wait[list[list[Any]]] = Wait(("scan", member, self.name))
            node.handle(AskScan(member, self.name, wait))
            entries = await wait
            by_owner: dict[str, list[Any]] = {}
            for raw, owner in entries:
                key = key_from_wire(raw)
                if key not in seen:
                    by_owner.setdefault(owner, []).append(key)
            for owner, keys in by_owner.items():
                for key, data in await self._snapshots(owner, keys):
                    if key in seen:
                        continue
                    seen.add(key)
                    yield key, load_state(self.cls, data)

    async def _snapshots(self, owner: str, keys: list[Any]) -> list[tuple[Any, bytes]]:
        node = self._node
        out: list[tuple[Any, bytes]] = []
        pending = {owner: keys}
        for _attempt in range(4):
            retry: dict[str, list[Any]] = {}
            for where, wanted in pending.items():
                answers: list[list[Any]] = []
                for i in range(0, len(wanted), SNAPSHOT_KEYS):  # each answer fits a frame
                    wait: Wait[list[list[Any]]] = Wait(("snapshot", where, self.name))
                    chunk = wanted[i : i + SNAPSHOT_KEYS]
                    node.handle(AskSnapshot(where, self.name, chunk, wait))
                    answers.extend(await wait)
                for raw, data in answers:
                    key = key_from_wire(raw)
                    if data is not None:
                        out.append((key, data))
                        continue
                    try:  # it moved (or went): ask its key owner where it is now
                        lwait: Wait[Any] = Wait((self.name, key))
                        node.handle(Locate((self.name, key), False, lwait))
                        now_at, _ = await lwait
                    except ObjectNotFound:
                        continue
                    retry.setdefault(now_at, []).append(key)
            if not retry:
                break
            pending = retry
        return out


class Space:
    """This process's membership of the object space (returned by ``store.open_space``)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._maps: dict[str, Map[Any]] = {}

    @property
    def name(self) -> str:
        """This member's name in the ring."""
        return self._node.name

    @property
    def node(self) -> Node:
        return self._node

    def map(self, name: str, cls: type[T]) -> Map[T]:
        """The map ``name`` of ``cls`` objects (the same object for the same arguments)."""
        existing = self._maps.get(name)
        if existing is not None:
            if existing.cls is not cls:
                raise TypeError(f"map {name!r} holds {existing.info.name}, not {cls.__qualname__}")
            return existing
        made: Map[T] = Map(self._node, name, cls)
        self._maps[name] = made
        return made

    def members(self) -> list[str]:
        """The members of the ring this member is NORMAL on (the previous ring during a
        scaling event, whose ring is :meth:`next_members`), sorted."""
        return sorted(self._node.view.ring.nodes)

    def next_members(self) -> list[str] | None:
        """The running scaling event's ring, sorted; None between events."""
        ring = self._node.view.next_ring
        return None if ring is None else sorted(ring.nodes)

    def owner_of(self, map_name: str, key: Any) -> str:
        """The member that owns the key record of ``map_name[key]`` (on the event's ring
        during a scaling event): where a load balancer that wants a flow's objects created
        next to their records sends the flow.  Hashes the key as the store does."""
        check_key(key)
        view = self._node.view
        ring = view.ring if view.next_ring is None else view.next_ring
        return ring.owner_of(map_name, key)

    def submit_nowait(self, flow: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (an ``async def``) as a microthread of flow ``flow``, now:
        inline to completion when its state is local; parked otherwise.  Raises
        ``SchedulerFull`` when the parked bound is reached.  Returns the unit (awaitable)."""
        return self._node.micro.submit_nowait(flow, fn, *args)

    async def submit(self, flow: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """Like :meth:`submit_nowait`, but waits for room when the parked bound is reached:
        the backpressure.  Returns once the unit is accepted; ``await`` the unit for its
        result.  Units of one flow finish in the order submitted."""
        return await self._node.micro.submit(flow, fn, *args)

    async def flush(self, timeout: float | None = None) -> None:
        """Send every untethered batch and fold every replica, and return once each
        destination has applied them: every update made before counts exactly once.

        Raises :class:`~store.core.objects.UntetheredCallsFailed` (a ``RemoteCallError``)
        if an untethered call or fold of this member failed since the last flush (the
        others were applied), and ``PeerUnavailable`` if a destination, member or not,
        has not answered within ``timeout`` seconds (``store.shell.node.FLUSH_TIMEOUT``
        by default)."""
        if timeout is None:
            await self._node.space_flush()
        else:
            await self._node.space_flush(timeout)

    def statistics(self) -> SpaceStatistics:
        """A frozen record of this member's figures (see :class:`SpaceStatistics`)."""
        node = self._node
        core = node.core.statistics()
        micro = node.micro.statistics()
        wire = node.wire_statistics()
        figures = asdict(core)
        figures["errors"] = {**core.errors, **node.errors}
        return SpaceStatistics(
            **figures,
            node=node.name,
            microthreads_parked=micro.parked,
            microthreads_run=micro.units_run,
            messages_sent=wire.messages_sent,
            messages_received=wire.messages_received,
            bytes_sent=wire.bytes_sent,
            bytes_received=wire.bytes_received,
            frames_sent=wire.frames_sent,
            wire_errors={
                "frames_too_large": wire.frames_too_large,
                "frames_malformed": wire.frames_malformed,
                "frames_unknown_type": wire.frames_unknown_type,
                "auth_failures": wire.auth_failures,
            },
        )


@dataclass(frozen=True, kw_only=True)
class SpaceStatistics(NodeStatistics):
    """Per-member figures: what ``space.statistics()`` and ``store.ctl status`` show: the
    core's (:class:`~store.core.router.NodeStatistics`) and the shell's below."""

    node: str
    microthreads_parked: int
    microthreads_run: int
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    wire_errors: dict[str, int]
