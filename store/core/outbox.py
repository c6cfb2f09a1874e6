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
"""

from __future__ import annotations

from collections import deque
from typing import Any

from store.core.instructions import Cause, Fail, Instruction, Log, Resolve, Send
from store.core.scheduler import Wait
from store.wire.errors import bug_counter, classify
from store.wire.messages import Message, Untethered

__all__ = ["Outbox"]

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
        "bounced",
        "boxes",
        "cause",
        "departed",
        "effects",
        "errors",
        "last_error",
        "local",
        "me",
        "messages_to_self",
        "untethered",
        "untethered_batches",
        "untethered_dests",
        "urgent",
    )

    def __init__(self, me: str) -> None:
        self.me = me
        self.boxes: dict[str, list[Message]] = {}
        self.urgent = False
        #: Untethered calls not yet sealed into a message, by destination, in call order:
        #: each ``[map, key, method, args, seq]``.
        self.untethered: dict[str, list[list[Any]]] = {}
        self.untethered_dests: set[str] = set()
        self.local: deque[Message] = deque()
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
        if urgent:
            self.urgent = True

    def seal(self, to: str) -> None:
        """Turn the untethered calls queued for ``to`` into one message, in its box."""
        calls = self.untethered.pop(to)
        box = self.boxes.get(to)
        if box is None:
            self.boxes[to] = [Untethered(calls)]
        else:
            box.append(Untethered(calls))
        self.untethered_dests.add(to)

    def seal_all(self) -> None:
        for to in list(self.untethered):
            self.seal(to)

    # -- effects --

    def resolve(self, wait: Wait[Any], value: Any) -> None:
        self.effects.append(Resolve(wait, value, self.cause))

    def fail(self, wait: Wait[Any], error: BaseException) -> None:
        self.effects.append(Fail(wait, error, self.cause))

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
        out = self.effects
        self.effects = []
        if everything:
            self.seal_all()
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
