"""The small integer codes of the object space's messages, as ``IntEnum``s.

An ``IntEnum`` is an ``int``: it goes on the wire as the same one-byte cbor integer, and a
field annotated with one of these classes is decoded back into the member (an unknown
value makes the message malformed).  ``Arrival``'s values are those of
``ring.ownership.Arrival``'s order: PLAIN, PULL, HANDOFF.
"""

from __future__ import annotations

import enum

__all__ = ["Arrival", "Kind", "MovedNote", "Op", "Status"]


class Op(enum.IntEnum):
    """What a :class:`~store.wire.messages.KeyOp` asks of the key's authority."""

    CREATE = 1  # create if absent; single-writer: and grant the writable reference
    ACQUIRE = 2  # single-writer: the writable reference of an existing object
    LOCATE = 3  # where does the object live (multi-writer, read-only)
    REMOVE = 4
    MOVED = 5  # notice to the authority: the object is now at ``KeyOp.owner``


class Kind(enum.IntEnum):
    """The object kind a map holds (``store.core.objects.ObjectKind`` on the wire)."""

    SINGLE = 0
    MULTI = 1


class Arrival(enum.IntEnum):
    """How a key request reached the node deciding about it (``ring.ownership.Arrival``)."""

    PLAIN = 0  # from its origin, or routed by some node's ring
    PULL = 1  # from the key's next owner to its previous owner
    HANDOFF = 2  # from the previous owner, carrying the key's authority (record and queue)


class MovedNote(enum.IntEnum):
    """What a MOVED notice reports."""

    HANDED_OVER = 0  # the holder released the object to ``owner`` on the authority's request
    EVACUATED = 1  # a leaving holder sent it to ``owner`` on its own initiative
    DROPPED = 2  # the holder dropped a removed object; ``origin``/``req_id`` is the remover
    LOST = 3  # ``owner``, named the holder, found the object never came: its giver died


class Status(enum.IntEnum):
    """``Reply.status``."""

    OK = 0
    NOT_FOUND = 1
    NOT_HERE = 2  # this node does not hold the object (any more): locate it again
    ERROR = 3  # value: [error class name, text]
    WRONG_KIND = 4
    LOST = 5  # the object died with the node that held it (its record survived)
