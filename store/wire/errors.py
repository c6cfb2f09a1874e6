"""The store's error family.  Each docstring says whose fault the error is.

Everything the store raises to NF code or to operators derives from :class:`StoreError`,
so ``except store.StoreError`` catches every failure of ours and nothing of the caller's.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "FrameTooLarge",
    "MalformedMessage",
    "MessageTooLarge",
    "NotAStoreOperation",
    "ObjectNotFound",
    "ObjectRemoved",
    "PeerUnavailable",
    "ProtocolError",
    "RemoteCallError",
    "StateNotEncodable",
    "StoreError",
    "UnknownMessageType",
    "WrongKind",
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


class WrongKind(StoreError, TypeError):
    """The caller's: the map's class is a SingleWriter but the key holds a MultiWriter
    object, or the other way round (two maps of one name with different classes)."""


class RemoteCallError(StoreError):
    """The NF's: a method shipped to the object's owner raised there; the text says what."""


class StateNotEncodable(StoreError, TypeError):
    """The NF author's: an object's state holds a value cbor cannot encode, so the object
    cannot move to the node that asked for it.  The text names the class and the field."""
