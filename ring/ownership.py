"""Who serves a request for key ``k`` arriving at node ``x``: the rules of S6 §4.4.

A scaling event moves the key space from ring *p* (epoch ``e``) to ring *n* (a higher epoch:
``e + 1``, or more when an aborted event burnt one).  For a key ``k`` write ``A`` for its
owner under *p* (the **previous owner**) and ``B`` for its owner under *n* (the **next
owner**).  Each node goes NORMAL(p) → PRE_SCALING → SCALING → NORMAL(n), and the controller's
barrier guarantees (paper: "nodes in the 'normal' and nodes in the 'scaling' stage do not
coexist"):

* PRE_SCALING begins on a node only while every node is NORMAL(p) or PRE_SCALING;
* SCALING begins on a node only once every node is PRE_SCALING or later;
* NORMAL(n) begins on a node only once every node is SCALING and has reported its
  old-epoch records drained (every handed-on record acknowledged by its receiver);
* an event aborts only before any node is SCALING, and every node returns to NORMAL(p);
  the aborted epoch is never reused.

Messages between two nodes arrive in the order sent; across pairs anything goes.  In
particular a request sent long ago may arrive at a node that has since moved on: the rules
below answer such late requests too, and never by a crash (the original S6 crashed when a
non-owner in NORMAL received a stray request).

The authority for a key
-----------------------
The whole scheme rests on one idea: **for every key there is exactly one authority, and
authority moves only by an explicit hand-on message**.  The authority is the only node that
may create, read, update or remove the key record, whether or not an object exists.

* In NORMAL(r) a node is the authority for the keys that ``r`` gives it.
* During an event, the previous owner ``A`` stays the authority for ``k`` until it hands
  ``k`` on to ``B``; it hands on only while it is SCALING.  The hand-on carries the key
  record, or, for a key without a record, the bare authority ("k is new: you own it").
  ``A`` keeps a *handed-on marker* so that it never hands ``k`` on twice and forwards
  later requests for ``k`` to ``B``.
* ``B`` is the authority for ``k`` once it holds the record that was handed on, or once it is
  NORMAL(n) (by then every node has drained, so no one else holds or creates ``k``).
* A node that is NORMAL(n) and receives a *pull* for a key it does not own hands the bare
  authority on: it drained everything before it got there, so it can certify that it holds
  no record of ``k``.

The version that prevents loops
-------------------------------
Every forwarded request carries the epoch of the ring that chose its next hop, a hop count
and its *arrival kind*: PLAIN (routed by a ring), PULL (sent by the next owner to the
previous owner: "give me k, or serve this yourself"), or HANDOFF (sent by the previous owner,
carrying k's authority).  The paper attaches "version number to the forwarded requests" so
that ``A`` and ``B`` do not bounce a new key between them; here the HANDOFF kind is that
version: a request that arrives as a HANDOFF is served where it lands, whatever that node's
stage, because the authority came with it.  Without it (see the mutation tests) the
pre-scaling ``B`` sends the request back to ``A``, which sends it to ``B`` again, forever.

The rules, case by case
-----------------------
Let ``x`` be the node deciding, ``holding`` what it has for ``k`` (RECORD, HANDED_ON or
NONE), and ``arrival`` how the request came.

Any stage:
  H. ``arrival`` is HANDOFF stamped with the newest epoch ``x`` knows: adopt the authority
     (keeping one's own record if it already holds one: a bare hand-on never overwrites a
     record) and **serve**.  A hand-on stamped with an older epoch is stale (a bare
     authority from a N2 answer that arrived after a later event began: every record of
     that epoch has long been drained and acknowledged), so it carries nothing and is
     routed as PLAIN by the rules below.
  X. ``hops`` has reached :data:`MAX_HOPS`: **reject** (never happens under the rules; the
     property tests prove it; a node answers instead of looping if a peer misbehaves).

NORMAL(r):
  N1. ``x`` holds a record for ``k``, or ``r`` gives ``k`` to ``x``: **serve**.
  N2. ``arrival`` is PULL (a late pull from an event's next owner): **forward** to
      ``r.owner(k)`` as a HANDOFF of the bare authority.  Only a node that has passed the
      event's barrier can receive a pull, so it holds no record of ``k`` (it drained).
  N3. otherwise **forward** PLAIN to ``r.owner(k)``: one hop, the normal case.

PRE_SCALING (previous ring p, next ring n):
  P1. ``x`` holds a record for ``k`` (handed on to it by a scaling ``A``): **serve**.
  P2. ``x`` is ``A``: **serve**.  This is the paper's R1 ("h_i(k) should be the single
      owner" while it is pre-scaling): ``A`` has not handed anything on, since it hands on
      only while SCALING, so it is still the authority, for new and existing keys alike.
  P3. otherwise **forward** PLAIN to ``A``.  This is the paper's "[B] defers claiming the
      ownership for k, but keeps forwarding requests to A".  A request that a scaling node
      sent to the pre-scaling ``B`` comes back to ``B`` as a HANDOFF if ``A`` is already
      SCALING (S3 below), so it cannot loop.

SCALING (previous ring p, next ring n):
  S1. ``x`` is ``B`` and holds the record (handed on to it): **serve**.
  S2. ``x`` is ``A`` and ``B``, i.e. the key did not move: **serve**.
  S3. ``x`` is ``A`` but not ``B``: if it has already handed ``k`` on, **forward** PLAIN to
      ``B`` (by pair order ``B`` received the hand-on first).  Otherwise **forward** to ``B``
      as a HANDOFF of the record, or of the bare authority if ``k`` has none, and mark
      ``k`` handed on: the first touch of a moved key in SCALING moves its record.  This
      resolves the paper's R2: it says that for a *new* key "h_{i+1}(k) should be the
      single owner", yet also that a pre-scaling ``B`` "would forward the request to A".
      Here ``A`` hands the new key's authority to ``B`` explicitly, so ``B`` owns it
      whatever its stage and never forwards it back; and for an *existing* key ``A``
      "keeps serving ... until B claims": it stays the only authority until the first
      request (or the background drain) hands the record on, and the hand-on is the claim.
  S4. ``x`` is ``B`` but not ``A`` and holds nothing: **pull** from ``A`` (the request rides
      with the pull).  ``A`` answers by P2 (still pre-scaling: it serves, R1), S3 (hands
      ``k`` back with the request) or N2 (already NORMAL(n): bare authority).
  S5. otherwise **forward** PLAIN to ``B``.

Routing never depends on whether the request creates a key or accesses one: the authority
decides that when it serves (a create makes the record, an access of a missing key fails
with not-found), which is why the paper's new/existing split of R2 is not needed here.

Hop bound: a request is served after at most :data:`MAX_HOPS` = 5 transfers since its count
last restarted.  A request carries ``since``, the newest epoch known to the nodes that counted
it; a node that knows a newer epoch routes it afresh and restarts the count
(:func:`counted_since`): otherwise a request that stays in flight across several events could
collect hops in each (a request stamped by one event's next ring can arrive during the
following event, whose previous ring is that same ring).  The longest path starts at a
SCALING node that sends the request to ``B`` while ``B`` is still PRE_SCALING (S5), which
sends it on to ``A`` (P3); it reaches ``A`` late, after ``A`` entered NORMAL(n), and goes:
A →(N3) B, now SCALING →(S4 pull) A →(N2 hand-on) B, serve: five transfers (the object
space's scaling simulation found it; a request first routed by a PRE_SCALING node takes one
fewer).  Once every node is NORMAL on one ring, a request is served where it arrives or
after one forward (N1/N3).

Background drain: while SCALING, a node hands on every record it holds whose next owner is
another node (:func:`drain_destination`), at a pace the shell chooses; it reports its old
records drained once every such hand-on has been acknowledged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ring.hashring import HashRing

__all__ = [
    "MAX_HOPS",
    "Arrival",
    "Decision",
    "Forward",
    "Holding",
    "NodeView",
    "Pull",
    "Reject",
    "Request",
    "Serve",
    "Stage",
    "counted_since",
    "decide",
    "drain_destination",
]

#: A request is served after at most this many transfers between nodes (see module doc).
MAX_HOPS = 5


class Stage(enum.Enum):
    """A node's stage in a scaling event (paper §4.4)."""

    NORMAL = "normal"
    PRE_SCALING = "pre-scaling"
    SCALING = "scaling"


class Holding(enum.Enum):
    """What a node has for one key."""

    NONE = "none"  # nothing: no record and no marker
    RECORD = "record"  # a key record (possibly one without an object: bare authority)
    HANDED_ON = "handed-on"  # it was the previous owner and handed the key on this event


class Arrival(enum.Enum):
    """How a request reached the deciding node: the forwarded request's version."""

    PLAIN = "plain"  # from a client or routed by some node's ring
    PULL = "pull"  # from the key's next owner to its previous owner
    HANDOFF = "handoff"  # from the previous owner, carrying the key's authority


@dataclass(frozen=True, slots=True)
class NodeView:
    """What a node knows that the rules need: its name, stage and rings.

    ``ring`` is the current ring in NORMAL and the previous ring during an event; ``next_ring``
    is the event's ring in PRE_SCALING and SCALING and ``None`` in NORMAL.
    """

    me: str
    stage: Stage
    ring: HashRing
    next_ring: HashRing | None = None

    def __post_init__(self) -> None:
        if (self.stage is Stage.NORMAL) != (self.next_ring is None):
            raise ValueError(f"{self.stage.value} needs next_ring only while scaling")
        if self.next_ring is not None and self.next_ring.epoch <= self.ring.epoch:
            raise ValueError("the next ring must have a higher epoch than the current one")

    @property
    def epoch(self) -> int:
        """The newest epoch this node knows of."""
        return self.ring.epoch if self.next_ring is None else self.next_ring.epoch


@dataclass(frozen=True, slots=True)
class Request:
    """The routing-relevant part of a request about one key."""

    token: int
    epoch: int = 0  # the epoch of the ring that chose the node it was sent to
    hops: int = 0  # transfers so far (since the count last restarted)
    arrival: Arrival = Arrival.PLAIN
    #: The newest epoch known where the hop count last restarted (see :func:`counted_since`).
    #: None: restart only for a request stamped by a ring older than the receiver's.
    since: int | None = None


@dataclass(frozen=True, slots=True)
class Serve:
    """Serve here.  ``adopt``: first install the authority that came with the request."""

    adopt: bool = False


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to ``to``.  ``handoff``: the key's authority (record or bare) goes
    with it and this node marks the key handed on."""

    to: str
    epoch: int
    hops: int
    handoff: bool = False


@dataclass(frozen=True, slots=True)
class Pull:
    """Send the request to ``source``, the previous owner, asking for the key's authority."""

    source: str
    epoch: int
    hops: int


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the request with an error instead of routing it (a misbehaving peer)."""

    reason: str


Decision = Serve | Forward | Pull | Reject


def decide(view: NodeView, holding: Holding, request: Request) -> Decision:
    """What ``view.me`` does with ``request`` given ``holding`` for its key.

    Pure and O(log(N·V)) (at most two ring lookups).  The rules are in the module docstring,
    labelled as in the code.
    """
    if request.arrival is Arrival.HANDOFF and request.epoch == view.epoch:  # H
        return Serve(adopt=True)
    # A request counted under an older newest-epoch than ours has been overtaken by a
    # scaling event: we route it afresh, so its hop count starts again (this keeps the bound
    # per event even for a request that stays in flight across several).
    if request.since is None:
        hops = 1 if request.epoch < view.ring.epoch else request.hops + 1
    else:
        hops = 1 if request.since < view.epoch else request.hops + 1
    if hops > MAX_HOPS:  # X
        return Reject(f"request went {request.hops} hops without being served")
    if request.epoch > view.epoch:
        return Reject(f"request routed by epoch {request.epoch}, newer than {view.epoch}")
    me, ring, token = view.me, view.ring, request.token

    if view.stage is Stage.NORMAL:
        owner = ring.owner(token)
        if holding is Holding.RECORD or owner == me:  # N1
            return Serve()
        # N2 / N3
        return Forward(owner, ring.epoch, hops, handoff=request.arrival is Arrival.PULL)

    assert view.next_ring is not None
    prev = ring.owner(token) if me in ring else None
    if view.stage is Stage.PRE_SCALING:
        if holding is Holding.RECORD or prev == me:  # P1, P2
            return Serve()
        return Forward(ring.owner(token), ring.epoch, hops)  # P3

    nxt = view.next_ring.owner(token)
    if nxt == me:
        if holding is Holding.RECORD or prev == me:  # S1, S2
            return Serve()
        return Pull(ring.owner(token), ring.epoch, hops)  # S4
    if holding is Holding.RECORD or (prev == me and holding is Holding.NONE):  # S3
        return Forward(nxt, view.next_ring.epoch, hops, handoff=True)
    return Forward(nxt, view.next_ring.epoch, hops)  # S3 (handed on already), S5


def counted_since(view: NodeView, request: Request) -> int:
    """The ``since`` a request forwarded by ``view.me`` carries: the newest epoch known to any
    node that counted its hops since the count last restarted.

    Why not restart on the routing stamp (``epoch``) alone: a request stamped with an
    event's next ring by a SCALING node (rules S3/S5) may arrive after the next event has
    begun, whose previous ring is that very ring, so the stamp is not older and the hops of
    both events add up (Hypothesis found 5).  ``since`` moves only when a node that knows a
    newer event handles the request, and it restarts the count there: within one such
    window the bound of one event holds, and there are finitely many windows."""
    since = request.epoch if request.since is None else request.since
    return max(since, view.epoch)


def drain_destination(view: NodeView, token: int) -> str | None:
    """Where a record this node holds must go in the background drain, or ``None`` to keep.

    Only a SCALING node drains; it hands on every record whose next owner is another node.
    O(log(N·V)).
    """
    if view.stage is not Stage.SCALING:
        return None
    assert view.next_ring is not None
    nxt = view.next_ring.owner(token)
    return None if nxt == view.me else nxt
