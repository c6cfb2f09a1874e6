"""The consistent-hash ring that spreads the key layer over the nodes.

S6 (Woo et al., NSDI'18, §4.1) builds its object space on a DHT: every key has one *key
owner* chosen by hashing.  The original S6 code used ``hash mod N``, which moves almost
every key when one node joins; a ring with virtual nodes moves about ``1/(N+1)`` of them,
and only to the node that joined.

A :class:`HashRing` is immutable.  Joins and leaves return a new ring whose ``epoch`` is
one higher, so that "which ring decided this?" is always a single integer that travels on
the wire (the scaling protocol of ``ring.ownership`` compares rings, and messages carry
their epoch).

Tokens are the unsigned 128-bit MurmurHash3 (mmh3) of bytes that are the same in every
process: for virtual nodes the UTF-8 of ``"<node>#<i>"``, for keys the canonical cbor
encoding of ``(map_name, key)``.  Python's ``hash()`` is never used: it is salted per
process, so two nodes would disagree about owners.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import cbor2
import mmh3

__all__ = [
    "DEFAULT_VNODES",
    "TOKEN_SPACE",
    "EmptyRingError",
    "HashRing",
    "key_token",
    "node_token",
]

#: Virtual nodes per member.  Chosen from ``python -m bench.ring_balance`` (see README):
#: over 100,000 keys, rings of 2 to 16 nodes and 5 sets of node names each, the busiest
#: node carried at worst 1.19x the mean share with 256, 1.12x with 512 and 1.07x with
#: 1024; the keys moved by a join were at worst 0.83x, 1.12x and 1.07x the ideal
#: ``1/(n+1)``.  1024 is the smallest count that meets our goal (max/mean <= 1.10, moved
#: within 10% of ideal); it costs ~9 ms to build a 16-node ring and ~60 B per token
#: (~1 MB for 16 nodes), twice 512, and one more bisect step per lookup.
DEFAULT_VNODES = 1024

#: Tokens are unsigned 128-bit integers: ``0 <= token < TOKEN_SPACE``.
TOKEN_SPACE = 1 << 128


class EmptyRingError(LookupError):
    """Raised by :meth:`HashRing.owner` on a ring with no nodes.

    The caller's fault: a ring must have at least one member before it can own keys.
    """


def _names(nodes: Iterable[str], what: str) -> frozenset[str]:
    """``nodes`` as a set of valid names.

    A bare ``str`` is refused: it is iterable, so ``HashRing("node-a")`` or
    ``with_nodes(added="node-d")`` would otherwise silently make one member per character.
    """
    if isinstance(nodes, str | bytes):
        raise TypeError(f"{what} must be an iterable of node names, not a single {nodes!r}")
    members = frozenset(nodes)
    for node in members:
        if not isinstance(node, str) or not node:
            raise TypeError(f"node names are non-empty str, not {node!r}")
    return members


def _require_int(name: str, value: object) -> None:
    """Refuse a non-int ``vnodes`` or ``epoch`` with an error that names the argument.

    ``bool`` is refused too: ``vnodes=True`` is a mistake, not a request for one vnode.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")


def node_token(node: str, index: int) -> int:
    """The token of virtual node ``index`` of ``node``.  O(len(node))."""
    return int(mmh3.hash128(f"{node}#{index}".encode(), signed=False))


def key_token(map_name: str, key: Any) -> int:
    """The ring token of ``key`` in map ``map_name``.  O(size of the key's encoding).

    Computed from the canonical cbor encoding of ``(map_name, key)``, so the same key gives
    the same token in every process and on every machine.  Keys are bytes, str, int, bool,
    None and tuples of them (anything hashable that cbor encodes canonically).  Keys that
    Python calls equal but that differ in type (``1``, ``1.0``, ``True``) get different
    tokens, so use one key type per map.

    Raises :class:`TypeError`, naming the key's type, when the key is unhashable (a set,
    list or dict: the key owner files records under the key, and a key that can change
    after it was hashed would be filed under a stale token) or cbor cannot encode it.
    """
    try:
        hash(key)
    except TypeError:
        raise TypeError(
            f"key of type {type(key).__name__} cannot be used as an S6 key: it is unhashable "
            "(use a tuple for a list, a frozenset for a set)"
        ) from None
    try:
        data = cbor2.dumps((map_name, key), canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise TypeError(
            f"key of type {type(key).__name__} cannot be used as an S6 key: "
            f"it has no canonical cbor encoding ({exc})"
        ) from None
    return int(mmh3.hash128(data, signed=False))


class HashRing:
    """An immutable consistent-hash ring of named nodes with virtual nodes.

    ``HashRing(nodes, vnodes=DEFAULT_VNODES, epoch=0)`` places ``vnodes`` tokens per node on
    a circle of 2**128 points; a token belongs to the first node token at or clockwise after
    it (wrapping around).  Building costs O(N·V·log(N·V)) for N nodes and V virtual nodes;
    :meth:`owner` costs O(log(N·V)).

    Two rings with the same nodes and ``vnodes`` assign every token identically, whatever
    their epochs and whatever process built them.
    """

    __slots__ = ("_epoch", "_nodes", "_owners", "_tokens", "_vnodes")

    def __init__(self, nodes: Iterable[str] = (), *, vnodes: int = DEFAULT_VNODES, epoch: int = 0):
        _require_int("vnodes", vnodes)
        _require_int("epoch", epoch)
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, not {vnodes}")
        if epoch < 0:
            raise ValueError(f"epoch must not be negative, not {epoch}")
        members = _names(nodes, "nodes")
        points = sorted(
            # Ties between two nodes' tokens (astronomically rare at 128 bits) are broken by
            # name, so every process still builds the identical ring.
            (node_token(node, i), node)
            for node in members
            for i in range(vnodes)
        )
        self._tokens: list[int] = [token for token, _ in points]
        self._owners: list[str] = [node for _, node in points]
        self._nodes = members
        self._vnodes = vnodes
        self._epoch = epoch

    # -- queries ---------------------------------------------------------------------------

    @property
    def nodes(self) -> frozenset[str]:
        """The member names.  O(1)."""
        return self._nodes

    @property
    def epoch(self) -> int:
        """The ring's version: one higher after every scaling event.  O(1)."""
        return self._epoch

    @property
    def vnodes(self) -> int:
        """Virtual nodes per member.  O(1)."""
        return self._vnodes

    def __len__(self) -> int:
        """Number of members.  O(1)."""
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        """Whether ``node`` is a member.  O(1)."""
        return node in self._nodes

    def __repr__(self) -> str:
        return f"HashRing({sorted(self._nodes)!r}, vnodes={self._vnodes}, epoch={self._epoch})"

    def owner(self, token: int) -> str:
        """The node owning ``token``: the first virtual node at or after it, wrapping.

        O(log(N·V)).  Raises :class:`EmptyRingError` on a ring without nodes.
        """
        tokens = self._tokens
        if not tokens:
            raise EmptyRingError("the ring has no nodes, so no node owns any key")
        # bisect_right(t) - 1 is the last vnode token <= t; we want the first token >= t,
        # i.e. bisect_left.  Write it directly for the hot path.
        i = bisect_right(tokens, token - 1)
        return self._owners[i] if i < len(tokens) else self._owners[0]

    def owner_of(self, map_name: str, key: Any) -> str:
        """Shorthand for ``owner(key_token(map_name, key))``."""
        return self.owner(key_token(map_name, key))

    # -- new rings -------------------------------------------------------------------------

    def with_nodes(
        self, added: Iterable[str] = (), removed: Iterable[str] = (), *, epoch: int | None = None
    ) -> HashRing:
        """A new ring with ``added`` joined and ``removed`` gone, at ``epoch`` (default
        ``self.epoch + 1``: one scaling event is one epoch, however many nodes it moves).

        An explicit ``epoch`` must be higher than this one; the controller passes it when an
        aborted event has burnt an epoch.  Adding a member or removing a stranger is a
        ``ValueError``.  O(N·V·log(N·V)).
        """
        add = _names(added, "added")
        rem = _names(removed, "removed")
        if add & self._nodes:
            raise ValueError(f"already members: {sorted(add & self._nodes)}")
        if rem - self._nodes:
            raise ValueError(f"not members: {sorted(rem - self._nodes)}")
        if add & rem:
            raise ValueError(f"both added and removed: {sorted(add & rem)}")
        if epoch is not None:
            _require_int("epoch", epoch)
        new_epoch = self._epoch + 1 if epoch is None else epoch
        if new_epoch <= self._epoch:
            raise ValueError(f"a new ring needs an epoch above {self._epoch}, not {new_epoch}")
        return HashRing((self._nodes - rem) | add, vnodes=self._vnodes, epoch=new_epoch)

    def with_node(self, node: str) -> HashRing:
        """``with_nodes(added=[node])``."""
        return self.with_nodes(added=(node,))

    def without_node(self, node: str) -> HashRing:
        """``with_nodes(removed=[node])``."""
        return self.with_nodes(removed=(node,))

    # -- checks ----------------------------------------------------------------------------

    def _check(self) -> None:
        """Assert the ring's invariants (tests call this).  O(N·V·log(N·V))."""
        tokens, owners = self._tokens, self._owners
        assert len(tokens) == len(owners) == len(self._nodes) * self._vnodes
        assert all(a <= b for a, b in pairwise(tokens)), "tokens unsorted"
        assert all(0 <= t < TOKEN_SPACE for t in tokens)
        assert set(owners) == set(self._nodes)
        expected = sorted((node_token(n, i), n) for n in self._nodes for i in range(self._vnodes))
        assert list(zip(tokens, owners, strict=True)) == expected, "tokens are not the nodes' own"
