"""The one place where both layers of a node put what they produce.

The key layer and the object layer share nothing else: each writes its messages, settled
Waits, log lines and error counts here, and :meth:`Outbox.take` turns them into the
instructions that ``Router.handle`` returns.

* Messages are kept in one list per destination, so that the shell sends each list as one
  frame: batching falls out of the structure.  A message to this node itself goes to
  :attr:`local` instead, and the router hands it to the layer it is for before ``handle``
  returns (so an embedded one-node space runs the same code with no socket at all).
* Untethered calls are queued per destination by the object layer's fast path, as bare
  entries (no message object per call), and sealed into one ``Untethered`` message when
  the flush timer asks or when any other message goes to that destination: a caller's
  untethered updates therefore reach a node before anything this node sends it later.
* A message to a node that said goodbye is never sent; it is kept in :attr:`bounced` for
  the object layer, which answers what it can itself.
* Every message fits in a frame (the shell's ``max_frame``): sealing checks the untethered
  calls it seals (a call whose arguments cannot travel fails alone, counted, and is
  remembered for the caller's next flush, :meth:`Outbox.failed_update`) and splits them
  into messages of at most :data:`UNTETHERED_BYTES`; the object layer checks every other
  message whose size the caller chooses (a call's arguments, its result) where it is made.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import cbor2

from store.core.instructions import Cause, Fail, Instruction, Log, Resolve, Send
from store.core.objects import args_travel
from store.core.scheduler import Wait
from store.wire.errors import bug_counter, classify
from store.wire.messages import Message, Untethered

__all__ = ["DEFAULT_MAX_FRAME", "FRAME_ROOM", "UNTETHERED_BYTES", "Outbox"]

#: The frame limit when the shell names none: the transport's own default.
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024

#: Bytes of a frame kept for what surrounds one message's payload (the batch's array
#: header, the message's tag and small fields, a key of at most ``MAX_KEY_BYTES``).
FRAME_ROOM: Final = 8 * 1024

#: Largest ``Untethered`` message: a bigger batch is sealed as several, so that frames stay
#: moderate (the transport packs up to 256 KiB in one) and no receiver spends long on one.
UNTETHERED_BYTES: Final = 256 * 1024

#: How many failed untethered calls a flush's error describes (it counts them all).
FAILURES_KEPT: Final = 5

# Upper bounds of encoded sizes: an untethered message's own fields and headers; a call's
# array headers, seq and the headers of its map and method names (whose characters take at
# most 4 bytes each); and any int below _WIDE (in magnitude), float, bool or None.
_MESSAGE_ROOM: Final = 32
_ENTRY_ROOM: Final = 40
_WIDE: Final = 1 << 64
_NO_KEY: Final = object()


def _key_bound(key: Any) -> int:
    """An upper bound of a key's encoded size (a key checked by ``check_key``)."""
    kind = type(key)
    if kind is bytes:
        return 9 + len(key)
    if kind is str:
        return 9 + (len(key) if key.isascii() else 4 * len(key))
    if isinstance(key, tuple):
        return 9 + sum(_key_bound(part) for part in key)
    if isinstance(key, int) and not -_WIDE <= key < _WIDE:
        return 9 + key.bit_length() // 8
    return 9 + (4 * len(key) if isinstance(key, str | bytes) else 0)


def _calls_bound(entry: list[Any]) -> int | None:
    """An upper bound of one call's encoded size when its arguments are plain scalars,
    else None (they must be looked at closely)."""
    size = _ENTRY_ROOM + _key_bound(entry[1]) + 4 * (len(entry[0]) + len(entry[2]))
    for arg in entry[3]:
        kind = type(arg)
        if kind is int and -_WIDE <= arg < _WIDE:
            size += 9
        elif kind is bytes or (kind is str and arg.isascii()):
            size += 9 + len(arg)
        elif kind is float or kind is bool or arg is None:
            size += 9
        else:
            return None
    return size


def _pack(calls: list[list[Any]], sizes: list[int], budget: int) -> list[list[list[Any]]]:
    """``calls`` in consecutive parts whose sizes add up to at most ``budget`` each; a call
    larger than that alone (it fits a frame: see ``Outbox._size``)."""
    parts: list[list[list[Any]]] = []
    part: list[list[Any]] = []
    used = 0
    for entry, size in zip(calls, sizes, strict=True):
        if part and used + size > budget:
            parts.append(part)
            part, used = [], 0
        part.append(entry)
        used += size
    if part:
        parts.append(part)
    return parts


#: The log level of an error counted under each kind of fault (``store.wire.errors.classify``).
_LEVELS = {"bug": "ERROR", "peer": "WARNING", "app": "WARNING", "race": "DEBUG"}


def _fault(counter: str) -> str:
    try:
        return classify(counter)
    except ValueError:  # a counter nobody classified: ours to fix (a unit test checks)
        return "bug"


class Outbox:
    """Messages, settled Waits, log lines and error counts of one node, until taken."""

    __slots__ = (
        "_lazy_local",
        "bounced",
        "boxes",
        "calm",
        "cause",
        "departed",
        "effects",
        "errors",
        "failed",
        "failed_count",
        "last_error",
        "local",
        "max_payload",
        "me",
        "messages_to_self",
        "untethered",
        "untethered_batches",
        "untethered_bytes",
        "untethered_dests",
        "urgent",
    )

    def __init__(self, me: str, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.me = me
        #: The largest payload (a call's arguments, its result, an object's state) one
        #: message may carry: a frame, less :data:`FRAME_ROOM` (half of a tiny frame).
        self.max_payload = max(max_frame - FRAME_ROOM, max_frame // 2)
        self.untethered_bytes = min(UNTETHERED_BYTES, self.max_payload)
        #: Untethered calls (and folds) of this node that failed since the last flush
        #: asked (:meth:`take_failures`): how many, and the first few described.
        self.failed_count = 0
        self.failed: list[str] = []
        self.boxes: dict[str, list[Message]] = {}
        self.urgent = False
        #: Untethered calls not yet sealed into a message, by destination, in call order:
        #: each ``[map, key, method, args, seq]``.
        self.untethered: dict[str, list[list[Any]]] = {}
        self.untethered_dests: set[str] = set()
        self.local: deque[Message] = deque()
        #: Messages to ourselves sent as not urgent (by identity): while one is handled
        #: (``calm``), what it sends on is not urgent either (nobody waits for any of it).
        self._lazy_local: set[int] = set()
        self.calm = False
        self.effects: list[Instruction] = []
        #: Nodes that left and said goodbye: nothing more is sent to them.
        self.departed: set[str] = set()
        self.bounced: list[tuple[str, Message]] = []
        #: The request the work in progress is for (stamped on what it produces).
        self.cause: Cause = None
        self.errors: dict[str, int] = {}
        self.last_error = ""
        self.messages_to_self = 0
        self.untethered_batches = 0

    # -- messages --

    def send(self, to: str, msg: Message, urgent: bool = True) -> None:
        """Queue ``msg`` for node ``to`` (this node: handled before ``handle`` returns)."""
        if to == self.me:
            self.messages_to_self += 1
            self.local.append(msg)
            if not urgent:
                self._lazy_local.add(id(msg))
            return
        if self.departed and to in self.departed:
            self.bounced.append((to, msg))
            return
        if self.untethered and to in self.untethered:
            self.seal(to)  # keep this sender's order: its earlier calls go first
        box = self.boxes.get(to)
        if box is None:
            self.boxes[to] = [msg]
        else:
            box.append(msg)
        if urgent and not self.calm:
            self.urgent = True

    def lazy(self, msg: Message) -> bool:
        """Whether ``msg``, just taken from :attr:`local`, was sent as not urgent."""
        lazy = self._lazy_local
        if lazy and id(msg) in lazy:
            lazy.discard(id(msg))
            return True
        return False

    def seal(self, to: str) -> None:
        """Turn the untethered calls queued for ``to`` into messages, in its box: one,
        unless they may be more than :attr:`untethered_bytes` encoded.  A call whose
        arguments cannot travel is left out, and counted (see :meth:`failed_update`)."""
        calls = self.untethered.pop(to)
        parts = self._checked(calls)
        if not parts:
            return
        box = self.boxes.get(to)
        if box is None:
            box = self.boxes[to] = []
        for part in parts:
            box.append(Untethered(part))
        self.untethered_dests.add(to)

    def _checked(self, calls: list[list[Any]]) -> list[list[list[Any]]]:
        """``calls`` less those that cannot travel, in parts that each fit a message.

        Nothing is encoded here in the common case (the transport encodes the message
        once, and an encoding costs some 750 ns a call): a call whose arguments are plain
        scalars gets an upper bound of its size from a type check per argument, and only
        the rest (containers, wide ints, non-ASCII text) is looked at closely."""
        budget = self.untethered_bytes - _MESSAGE_ROOM
        sizes: list[int] = []
        total = 0
        last_key: Any = _NO_KEY
        key_size = 0
        for entry in calls:  # inline: this loop runs once per untethered call
            key = entry[1]
            if key is not last_key:  # (the calls of one batch are mostly to one object)
                last_key = key
                key_size = _key_bound(key)
            size = _ENTRY_ROOM + key_size + 4 * (len(entry[0]) + len(entry[2]))
            for arg in entry[3]:
                kind = type(arg)
                if kind is int:
                    if -_WIDE <= arg < _WIDE:
                        size += 9
                        continue
                elif kind is bytes or (kind is str and arg.isascii()):
                    size += 9 + len(arg)
                    continue
                elif kind is float or kind is bool or arg is None:
                    size += 9
                    continue
                return self._checked_closely(calls, budget)
            if size > self.max_payload:  # (it may fit: let the close look decide)
                return self._checked_closely(calls, budget)
            total += size
            sizes.append(size)
        if total <= budget:
            return [calls]
        return _pack(calls, sizes, budget)

    def _checked_closely(self, calls: list[list[Any]], budget: int) -> list[list[list[Any]]]:
        """:meth:`_checked` for a batch with a call whose arguments are not plain scalars."""
        sizes: list[int] = []
        kept: list[list[Any]] = []
        for entry in calls:
            size = self._size(entry)
            if size is not None:
                kept.append(entry)
                sizes.append(size)
        return _pack(kept, sizes, budget)

    def _size(self, entry: list[Any]) -> int | None:
        """An upper bound of one untethered call's encoded size (``[map, key, method,
        args, seq]``), or None if it cannot travel: then it failed, counted, logged, and
        kept for the caller's next flush."""
        map_name, key, method, args, _seq = entry
        bound = _calls_bound(entry)
        if bound is not None and bound <= self.max_payload:
            return bound
        why = args_travel(args)  # (what cbor2 must not be given: too deep, too wide)
        if why is None:
            try:
                size = len(cbor2.dumps(entry))
            except Exception as exc:
                why = f"is not plain data ({exc})"
            else:
                if size <= self.max_payload:
                    return size
                why = f"is {size} bytes encoded, over the {self.max_payload} a frame holds"
        what = f"{map_name}[{key!r:.60}].{method}"
        self.failed_update("call-not-encodable", f"an argument of {what} {why}")
        return None

    def seal_all(self) -> None:
        for to in list(self.untethered):
            self.seal(to)

    # -- effects --

    def resolve(self, wait: Wait[Any], value: Any) -> None:
        self.effects.append(Resolve(wait, value, self.cause))

    def fail(self, wait: Wait[Any], error: BaseException) -> None:
        self.effects.append(Fail(wait, error, self.cause))

    def failed_update(self, counter: str, text: str) -> None:
        """An untethered call (or a replica's fold) of this node failed: count it under
        ``counter``, log it, and keep it for the next flush (:meth:`take_failures`)."""
        self.error(counter, text)
        self.failed_count += 1
        if len(self.failed) < FAILURES_KEPT:
            self.failed.append(text)

    def take_failures(self) -> tuple[int, list[str]]:
        """The untethered failures since the last time this was asked, and forget them."""
        taken = self.failed_count, self.failed
        self.failed_count, self.failed = 0, []
        return taken

    def error(self, counter: str, text: str = "", exc: BaseException | None = None) -> None:
        """Count one error under ``counter`` and log it at the level its kind deserves."""
        self.errors[counter] = self.errors.get(counter, 0) + 1
        kind = _fault(counter)
        where = f" (for {self.cause[0]}#{self.cause[1]})" if self.cause else ""
        line = f"{self.me}: {counter}{where}{': ' + text if text else ''}"
        self.last_error = line
        self.effects.append(Log(_LEVELS[kind], line, counter, self.cause, exc))

    def bug(self, exc: BaseException, what: str) -> None:
        """Our own code raised ``exc`` while handling ``what``: count it as ``bug-<Exc>``
        and log it with its traceback (the shell formats it: that reads source files)."""
        self.error(bug_counter(exc), f"{what}: {type(exc).__name__}", exc)

    # -- taking --

    def take(self, everything: bool) -> list[Instruction]:
        """The instructions produced so far: effects first, then one :class:`Send` per
        destination.  Messages are taken when one of them is urgent or ``everything``
        (the flush timer); otherwise they wait, with the untethered calls, for later."""
        if everything:
            self.seal_all()  # (first: what fails to seal is logged in this answer)
        out = self.effects
        self.effects = []
        if self.boxes and (self.urgent or everything):
            cause = self.cause
            urgent = self.urgent
            for to, msgs in self.boxes.items():
                out.append(Send(to, msgs, urgent, cause))
            self.boxes = {}
            self.urgent = False
            self.untethered_batches += len(self.untethered_dests)
            self.untethered_dests.clear()
        return out

    @property
    def has_output(self) -> bool:
        """Whether a ``take(everything=True)`` would send anything."""
        return bool(self.boxes or self.untethered)
