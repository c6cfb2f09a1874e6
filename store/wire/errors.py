"""The store's error family, and how the store tells whose fault a failure is.

Everything the store raises to NF code or to operators derives from :class:`StoreError`,
so ``except store.StoreError`` catches every failure of ours and nothing of the caller's.
Each docstring says whose fault the error is.

What a process does not raise, it counts: a named error counter (``malformed-hand-on``,
``stale-ack``, ``bug-KeyError``...) per thing that went wrong.  :func:`classify` says whose
fault each counter is (a peer's, a race's, a bug of ours, or the application's), so that an
operator knows which counters to worry about and a test which ones must stay at zero.  How
each is handled where it is met:

* **a peer's fault** (a malformed or unexpected message, a failed proof): before the peer
  has authenticated, the connection is closed (with a ``Refused`` saying why); after, the
  message is refused (an ``Error`` back), counted and logged, and the connection stays up;
* **a race** (an answer that comes after its question was given up, a message for a node
  that has left): counted, logged at a low level, ignored;
* **a bug of ours** (a handler failing with an exception type no peer can cause): logged
  with its traceback and counted as ``bug-<ExceptionType>``; re-raised when
  :func:`raise_bugs` is true (``S6_RAISE_BUGS=1``, meant for test runs), so that tests
  fail loudly while a production process keeps serving its other peers.

Nothing here does I/O (reading one environment variable aside): this module belongs to the
pure ``store.wire`` package.
"""

from __future__ import annotations

import os
from typing import Final, Literal, NoReturn

__all__ = [
    "RAISE_BUGS_VARIABLE",
    "AuthenticationError",
    "Fault",
    "FrameTooLarge",
    "MalformedMessage",
    "MemberLeft",
    "MessageTooLarge",
    "NotAStoreOperation",
    "ObjectLost",
    "ObjectNotFound",
    "ObjectRemoved",
    "PeerUnavailable",
    "ProtocolError",
    "ReferenceClosed",
    "RemoteCallError",
    "StateNotEncodable",
    "StoreError",
    "UnknownMessageType",
    "WrongKind",
    "bug_counter",
    "classify",
    "first_leaf",
    "raise_bugs",
    "reraise_single",
]


class StoreError(Exception):
    """Base of every error the store raises."""


class ObjectNotFound(StoreError, KeyError):
    """The caller's: asked for a key that has no object (never created, or removed)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want a readable line.
        return str(self.args[0]) if self.args else "object not found"


class NotAStoreOperation(StoreError, RuntimeError):
    """The NF author's: code running as a microthread awaited something that is not a
    store operation (a trio sleep, a socket...).  Microthreads await store operations only."""


class ProtocolError(StoreError):
    """The peer's: it sent something that breaks the wire protocol."""


class MalformedMessage(ProtocolError):
    """The peer's: a frame that does not decode, or a message with wrong fields."""


class UnknownMessageType(ProtocolError):
    """The peer's: a message whose type tag we do not know."""


class FrameTooLarge(ProtocolError):
    """The peer's: a frame over the configured size limit."""


class AuthenticationError(ProtocolError):
    """The peer's (or the operator's): it could not prove it knows the cluster secret."""


class PeerUnavailable(StoreError):
    """Nobody's in particular: a peer could not be reached or went away."""


class MessageTooLarge(StoreError, ValueError):
    """The caller's: one message is larger than the frame limit agreed with the peer, so it
    can never be sent.  Split the payload, or raise ``max_frame`` on both sides."""


class ObjectRemoved(ObjectNotFound):
    """The caller's: a call through a reference whose object has since been removed."""


class ObjectLost(ObjectNotFound):
    """Nobody's in particular: the object died with the process that held it (its key
    record survived, so the store knows it existed).  ``create`` makes it anew, with
    ``ref.created`` true."""


class ReferenceClosed(StoreError, RuntimeError):
    """The caller's: a reference was used after its ``async with`` block ended."""


class WrongKind(StoreError, TypeError):
    """The caller's: the map's class is a SingleWriter but the key holds a MultiWriter
    object, or the other way round (two maps of one name with different classes)."""


class RemoteCallError(StoreError):
    """The NF's: a method shipped to the object's owner raised there; the text says what."""


class MemberLeft(StoreError, RuntimeError):
    """The application's: it asked its member for an object after a scale-in removed that
    member from the ring.  The member has handed its state on; an object it took in now
    would be left behind when the process goes, so nothing comes in.  An embedding
    application finishes its work before the hand-over with ``open_space``'s
    ``on_scale_in`` hook."""


class StateNotEncodable(StoreError, TypeError):
    """The NF author's: an object's state holds a value cbor cannot encode, so the object
    cannot move to the node that asked for it.  The text names the class and the field."""


# --- whose fault: the error counters ------------------------------------------------------

#: Whose fault a counted error is: ``"peer"`` (another process sent something wrong: a
#: malformed or unexpected message, a failed proof; the peer's bug, or a hostile peer),
#: ``"race"`` (nobody's: a message overtaken by events, such as an answer after its question
#: was given up or a message for a node that has left; expected in small numbers during
#: scaling), ``"bug"`` (ours: a handler failed with an exception no input should cause, or a
#: peer refused a frame we sent) or ``"app"`` (the application's: NF code that raised in a
#: shipped call, an object state cbor cannot encode, a class not importable everywhere).
Fault = Literal["peer", "race", "bug", "app"]

# Whole counter names: the error counters of the object space's core, and the fields of the
# transport's ``WireStatistics`` that count failures.
_NAMES: Final[dict[str, Fault]] = {
    # a request over the hop limit: never happens under the ownership rules, so a peer
    # that does not follow them sent it
    "rejected-request": "peer",
    "moved-without-record": "race",  # the record moved on or was removed meanwhile
    "report-not-owner": "race",  # a failure report that met a newer ring than its own
    "from-dead-node": "race",  # a message of a node declared dead, arriving late: fenced
    "transfer-without-request": "race",  # an object arriving after its request was dropped
    "reply-without-request": "race",  # an answer after its request was given up
    # a request of ours had no answer within request_timeout: a node on its way is down
    "request-expired": "peer",
    "send-failed": "race",  # the link to a peer broke: what it held is gone
    "sent-to-departed-node": "race",  # a message for a node that has left
    "state-not-encodable": "app",
    "replica-not-encodable": "app",
    "evacuate-unknown-class": "app",  # a leaver holds an object whose class it cannot import
    "frames_malformed": "peer",
    "frames_unknown_type": "peer",
    "frames_too_large": "peer",
    "auth_failures": "peer",
    "handshake_failures": "peer",  # garbage, a timeout or a vanished peer before the proofs
    "connections_refused": "peer",  # more strangers at a listener's door than it lets wait
    "errors_received": "bug",  # a peer refused a frame of ours: we sent something wrong
}

# Families of counters named ``<family>-<detail>`` (the detail is usually a message or an
# exception type), checked after the whole names.
_FAMILIES: Final[tuple[tuple[str, Fault], ...]] = (
    ("bug-", "bug"),
    ("malformed-", "peer"),
    ("unknown-", "peer"),
    ("unexpected-", "peer"),  # a message of a kind the receiver never takes from that peer
    ("auth-", "peer"),
    ("stale-", "race"),  # an answer or report for an event or request that is over
    ("sent-to-departed-node-", "race"),
    ("call-", "app"),  # a shipped method raised: call-<ExceptionType>
    ("unit-", "app"),  # a microthread's NF code raised: unit-<ExceptionType>
    ("evacuate-unknown-class-", "app"),
)
# Counters named ``<detail>-lost``: an update that had nowhere to go (its object was removed
# or made again meanwhile).
_LOST: Final = "-lost"


def classify(counter: str) -> Fault:
    """Whose fault the error counter named ``counter`` counts (see :data:`Fault`).

    ``ValueError`` for a name no rule covers: a new counter must be given a class here, so
    that no error is counted without anyone saying whose it is.  Pure; O(rules).
    """
    fault = _NAMES.get(counter)
    if fault is not None:
        return fault
    for family, fault in _FAMILIES:
        if counter.startswith(family) and len(counter) > len(family):
            return fault
    if counter.endswith(_LOST) and len(counter) > len(_LOST):
        return "race"
    raise ValueError(f"error counter {counter!r} has no class: add it to store.wire.errors")


def bug_counter(exc: BaseException) -> str:
    """The counter of a bug of ours: ``bug-<ExceptionType>`` of ``exc`` (of its first leaf,
    when it is an exception group, since the group's type says nothing)."""
    return f"bug-{type(first_leaf(exc)).__name__}"


#: The environment variable that makes :func:`raise_bugs` true when it is ``1``.
RAISE_BUGS_VARIABLE: Final = "S6_RAISE_BUGS"


def raise_bugs() -> bool:
    """Whether a bug of ours, once logged and counted, is re-raised: ``S6_RAISE_BUGS=1``.

    A test run sets it, so that a bug fails the test instead of becoming a counter; a
    production process leaves it unset and keeps serving its other peers.  Read at each
    call (bugs are rare), so that setting it in a test takes effect at once.
    """
    return os.environ.get(RAISE_BUGS_VARIABLE) == "1"


# --- exception groups ---------------------------------------------------------------------


def reraise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one exception inside ``group``, as itself; call it in ``except``.

    Our context managers run helper tasks (a writer, a reader, a timer) in a nursery beside
    the caller's code, so trio wraps the one exception that matters in a group, twice for a
    nursery inside a nursery; the caller should see the exception itself, as if there were
    no tasks.  Groups of exactly one exception are unwrapped at any depth; a group of
    several (two real failures at once) is raised as it stands, hiding neither.  The
    exception keeps its own ``__context__``: raising it here would otherwise make the group
    its context, and every traceback would show the same failure twice.
    """
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    context = inner.__context__
    try:
        raise inner
    finally:
        inner.__context__ = context
        del inner, context


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside ``exc``, through nested groups (``exc`` if it is none).

    Unlike :func:`reraise_single`, this picks the first of several: it is for *describing*
    a failure (one line for a command line, a counter's name), where one representative is
    needed even when several things failed at once; nothing is raised or hidden by it.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
