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
from store.wire.messages import Message, Untethered

__all__ = ["ERROR_KINDS", "Outbox", "error_kind"]

#: How each error counter's name begins, and whose fault it is: a **peer**'s (a message
#: that is wrong), a **race** (a message that lost a legitimate race with another, or
#: arrived after its subject went away: expected now and then during scaling), or a
#: **bug** of ours (an exception our own code did not expect).  ``error_kind`` applies it.
ERROR_KINDS: dict[str, str] = {
    "bug-": "bug",
    "malformed-": "peer",
    "unexpected-": "peer",
    "rejected-": "race",
    "stale-": "race",
    "reply-without-request": "race",
    "transfer-without-request": "race",
    "moved-without-record": "race",
    "untethered-call-lost": "race",
    "fold-lost": "race",
    "sent-to-departed-node": "race",
    "send-failed": "race",
    "call-": "nf",  # the NF's own method raised at the holder
    "evacuate-unknown-class": "nf",  # the NF's class is not importable on this node
    "state-not-encodable": "nf",
    "replica-not-encodable": "nf",
}


def error_kind(counter: str) -> str:
    """``"peer"``, ``"race"``, ``"bug"`` or ``"nf"`` (the NF code's fault) for an error
    counter's name; ``"bug"`` for a name nobody classified."""
    for prefix, kind in ERROR_KINDS.items():
        if counter.startswith(prefix):
            return kind
    return "bug"


_LEVELS = {"bug": "ERROR", "peer": "WARNING", "nf": "WARNING", "race": "DEBUG"}


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
        kind = error_kind(counter)
        where = f" (for {self.cause[0]}#{self.cause[1]})" if self.cause else ""
        line = f"{self.me}: {counter}{where}{': ' + text if text else ''}"
        self.last_error = line
        self.effects.append(Log(_LEVELS[kind], line, counter, self.cause, exc))

    def bug(self, exc: BaseException, what: str) -> None:
        """Our own code raised ``exc`` while handling ``what``: count it as ``bug-<Exc>``
        and log it with its traceback (the shell formats it: that reads source files)."""
        self.error(f"bug-{type(exc).__name__}", f"{what}: {exc!r}", exc)

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
