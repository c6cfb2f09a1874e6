"""A simulated cluster of pure nodes that obey ``ring.ownership``: no trio, no sockets.

Each node keeps key records, handed-on markers and a count of unacknowledged hand-ons;
messages between two nodes travel on one FIFO queue per ordered pair, and the test decides
which queue delivers next, so every interleaving the real network allows can happen here.
The controller's barrier is modelled by preconditions on stage changes.

The four invariants of the foundation issue are checked here; each violation raises its own
exception class so that the mutation tests can show that each one is able to fail.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ring.hashring import HashRing, key_token
from ring.ownership import (
    MAX_HOPS,
    Arrival,
    Decision,
    Forward,
    Holding,
    NodeView,
    Pull,
    Reject,
    Request,
    Serve,
    Stage,
    counted_since,
    decide,
    drain_destination,
)

DecideFn = Callable[[NodeView, Holding, Request], Decision]


class Violation(AssertionError):
    """An invariant broke."""


class DoubleOwnership(Violation):
    """Invariant 1: two nodes would serve one key (or, at the end, a request never served)."""


class HopBoundExceeded(Violation):
    """Invariant 2: a request was not served within MAX_HOPS transfers (a loop)."""


class RecordLostOrDuplicated(Violation):
    """Invariant 3: a key record vanished or exists twice."""


class NotOneHop(Violation):
    """Invariant 4: after convergence, a request needed more than one forward."""


ALL_CHECKS = frozenset({1, 2, 3, 4})


class Op(enum.Enum):
    CREATE = "create"
    ACCESS = "access"
    REMOVE = "remove"


@dataclass
class Record:
    """A key record.  ``exists`` is False for a bare authority (no object)."""

    exists: bool
    value: int = 0


@dataclass
class Msg:
    """One message on a pair queue: a request (``op`` set) or an acknowledgement."""

    key: int
    epoch: int
    hops: int = 0
    arrival: Arrival = Arrival.PLAIN
    op: Op | None = None
    request_id: int = -1
    payload: Record | None = None  # the authority carried by a HANDOFF
    needs_ack: bool = False  # the sender counts this hand-on until it is acknowledged
    ack: bool = False
    since: int | None = None  # ring.ownership.Request.since


@dataclass
class SimNode:
    name: str
    stage: Stage
    ring: HashRing
    next_ring: HashRing | None = None
    records: dict[int, Record] = field(default_factory=dict)
    handed: set[int] = field(default_factory=set)
    unacked: int = 0
    drained: bool = False

    def view(self) -> NodeView:
        return NodeView(self.name, self.stage, self.ring, self.next_ring)

    def holding(self, key: int) -> Holding:
        if key in self.records:
            return Holding.RECORD
        if key in self.handed:
            return Holding.HANDED_ON
        return Holding.NONE


@dataclass
class RequestLog:
    request_id: int
    key: int
    op: Op
    converged_at_injection: bool
    events_at_injection: int
    served_hops: int | None = None


class Cluster:
    """The simulated cluster.  ``decide`` may be swapped for a broken rule (mutation tests);
    ``checks`` selects which invariants raise."""

    def __init__(
        self,
        nodes: Iterable[str],
        *,
        keys: int = 8,
        vnodes: int = 8,
        decide_fn: DecideFn = decide,
        checks: frozenset[int] = ALL_CHECKS,
    ) -> None:
        ring = HashRing(nodes, vnodes=vnodes, epoch=0)
        self.decide = decide_fn
        self.checks = checks
        self.nodes: dict[str, SimNode] = {n: SimNode(n, Stage.NORMAL, ring) for n in ring.nodes}
        self.ring = ring  # the cluster's current (converged) ring
        self.next_ring: HashRing | None = None  # the event's ring, while one runs
        self.highest_epoch = 0
        self.events = 0  # scaling events started so far
        self.all_drained = False
        self.tokens = {k: key_token("sim", k) for k in range(keys)}
        self.queues: dict[tuple[str, str], deque[Msg]] = {}
        self.requests: dict[int, RequestLog] = {}
        self.exists = dict.fromkeys(self.tokens, False)  # the model
        self.values = dict.fromkeys(self.tokens, 0)
        self.stage_log: list[tuple[str, Stage, int]] = []

    # -- helpers -----------------------------------------------------------------------------

    def fail(self, invariant: int, exc: type[Violation], text: str) -> None:
        if invariant in self.checks:
            raise exc(text)

    @property
    def participants(self) -> list[SimNode]:
        """Nodes taking part in the current ring or the running event."""
        names = set(self.ring.nodes) | (set(self.next_ring.nodes) if self.next_ring else set())
        return [self.nodes[n] for n in sorted(names)]

    def converged(self) -> bool:
        return self.next_ring is None and all(
            n.stage is Stage.NORMAL and n.ring is self.ring for n in self.participants
        )

    def send(self, src: str, dst: str, msg: Msg) -> None:
        self.queues.setdefault((src, dst), deque()).append(msg)

    def busy_pairs(self) -> list[tuple[str, str]]:
        return sorted(pair for pair, q in self.queues.items() if q)

    # -- requests ------------------------------------------------------------------------------

    def inject(self, at: str, key: int, op: Op) -> None:
        rid = len(self.requests)
        self.requests[rid] = RequestLog(rid, key, op, self.converged(), self.events)
        node = self.nodes[at]
        msg = Msg(key, node.view().epoch, 0, Arrival.PLAIN, op, rid, since=node.view().epoch)
        self.handle(node, msg, sender=None)

    def deliver(self, pair: tuple[str, str]) -> None:
        msg = self.queues[pair].popleft()
        src, dst = pair
        self.handle(self.nodes[dst], msg, sender=src)

    def deliver_all(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            pairs = self.busy_pairs()
            if not pairs:
                return
            self.deliver(pairs[0])
        raise HopBoundExceeded("messages kept flowing: the cluster never went quiet")

    def handle(self, node: SimNode, msg: Msg, sender: str | None) -> None:
        if msg.ack:
            node.unacked -= 1
            assert node.unacked >= 0
            return
        token = self.tokens[msg.key]
        if msg.op is None:  # a background-drain hand-on, no request riding on it
            self.adopt(node, msg, sender)
            return
        request = Request(token, msg.epoch, msg.hops, msg.arrival, msg.since)
        decision = self.decide(node.view(), node.holding(msg.key), request)
        since = counted_since(node.view(), request)
        if isinstance(decision, Serve):
            if decision.adopt:
                self.adopt(node, msg, sender)
            self.serve(node, msg)
        elif isinstance(decision, Forward):
            out = Msg(msg.key, decision.epoch, decision.hops, Arrival.PLAIN, msg.op, msg.request_id)
            out.since = since
            if decision.handoff:
                out.arrival = Arrival.HANDOFF
                out.payload = node.records.pop(msg.key, None) or Record(exists=False)
                if node.stage is not Stage.NORMAL:
                    node.handed.add(msg.key)
                    node.unacked += 1
                    out.needs_ack = True
            self.send(node.name, decision.to, out)
        elif isinstance(decision, Pull):
            out = Msg(msg.key, decision.epoch, decision.hops, Arrival.PULL, msg.op, msg.request_id)
            out.since = since
            self.send(node.name, decision.source, out)
        else:
            assert isinstance(decision, Reject)
            self.fail(2, HopBoundExceeded, f"request {msg.request_id}: {decision.reason}")
            self.requests[msg.request_id].served_hops = -1  # answered with an error

    def adopt(self, node: SimNode, msg: Msg, sender: str | None) -> None:
        payload = msg.payload
        assert payload is not None
        mine = node.records.get(msg.key)
        if mine is None:
            node.records[msg.key] = payload
        elif payload.exists:
            self.fail(3, RecordLostOrDuplicated, f"{node.name} got a second record of {msg.key}")
        if msg.needs_ack and sender is not None:
            self.send(node.name, sender, Msg(msg.key, msg.epoch, ack=True))

    def serve(self, node: SimNode, msg: Msg) -> None:
        key, log = msg.key, self.requests[msg.request_id]
        if log.served_hops is not None:
            raise DoubleOwnership(f"request {msg.request_id} served twice")
        log.served_hops = msg.hops
        record = node.records.get(key)
        here = record is not None and record.exists
        if here != self.exists[key]:
            self.fail(
                3,
                RecordLostOrDuplicated,
                f"{node.name} served {msg.op} on key {key} seeing exists={here}, "
                f"but the key {'exists elsewhere' if self.exists[key] else 'was removed'}",
            )
        quiet = log.converged_at_injection and log.events_at_injection == self.events
        if quiet and msg.hops > 1:
            self.fail(4, NotOneHop, f"request {msg.request_id} took {msg.hops} hops converged")
        if msg.op is Op.CREATE and not here:
            node.records[key] = Record(exists=True)
            self.exists[key], self.values[key] = True, 0
        elif msg.op is Op.ACCESS and here:
            assert record is not None
            record.value += 1
            self.values[key] += 1
        elif msg.op is Op.REMOVE and here:
            node.records[key] = Record(exists=False)
            self.exists[key] = False

    # -- the controller and the scaling stages ---------------------------------------------------

    def start_event(self, added: Iterable[str], removed: Iterable[str]) -> None:
        assert self.converged()
        self.events += 1
        self.all_drained = False
        self.highest_epoch += 1
        self.next_ring = self.ring.with_nodes(added, removed, epoch=self.highest_epoch)
        for name in added:
            self.nodes[name] = SimNode(name, Stage.PRE_SCALING, self.ring, self.next_ring)
            self.stage_log.append((name, Stage.PRE_SCALING, self.highest_epoch))

    def can_enter_pre(self, node: SimNode) -> bool:
        return (
            self.next_ring is not None
            and node.stage is Stage.NORMAL
            and node.ring.epoch < self.next_ring.epoch
            and node in self.participants
        )

    def enter_pre(self, node: SimNode) -> None:
        assert self.can_enter_pre(node)
        node.stage, node.next_ring = Stage.PRE_SCALING, self.next_ring
        self.stage_log.append((node.name, node.stage, self.highest_epoch))

    def can_enter_scaling(self, node: SimNode) -> bool:
        return node.stage is Stage.PRE_SCALING and all(
            n.stage is not Stage.NORMAL for n in self.participants
        )

    def enter_scaling(self, node: SimNode) -> None:
        assert self.can_enter_scaling(node)
        node.stage = Stage.SCALING
        self.stage_log.append((node.name, node.stage, self.highest_epoch))

    def drainable(self, node: SimNode) -> list[int]:
        view = node.view()
        return sorted(k for k in node.records if drain_destination(view, self.tokens[k]))

    def drain_one(self, node: SimNode) -> None:
        key = self.drainable(node)[0]
        to = drain_destination(node.view(), self.tokens[key])
        assert to is not None and node.next_ring is not None
        record = node.records.pop(key)
        node.handed.add(key)
        node.unacked += 1
        self.send(node.name, to, Msg(key, node.next_ring.epoch, payload=record, needs_ack=True))

    def can_report_drained(self, node: SimNode) -> bool:
        return (
            node.stage is Stage.SCALING
            and not node.drained
            and not self.drainable(node)
            and node.unacked == 0
        )

    def report_drained(self, node: SimNode) -> None:
        assert self.can_report_drained(node)
        node.drained = True

    def can_enter_normal(self, node: SimNode) -> bool:
        if all(n.drained for n in self.participants):
            self.all_drained = True  # the controller latches it and releases everyone
        return node.stage is Stage.SCALING and self.all_drained

    def enter_normal(self, node: SimNode) -> None:
        assert self.can_enter_normal(node) and node.next_ring is not None
        ring = node.next_ring
        for key, record in list(node.records.items()):
            if not record.exists:
                del node.records[key]  # bare authority is implied by the ring now
            elif ring.owner(self.tokens[key]) != node.name:
                self.fail(3, RecordLostOrDuplicated, f"{node.name} kept a record not its own")
        node.stage, node.ring, node.next_ring = Stage.NORMAL, ring, None
        node.handed.clear()
        node.drained = False
        self.stage_log.append((node.name, node.stage, ring.epoch))
        if all(n.stage is Stage.NORMAL for n in self.participants):
            self.ring, self.next_ring = ring, None

    def can_abort(self) -> bool:
        return self.next_ring is not None and all(
            n.stage is not Stage.SCALING for n in self.participants
        )

    def abort(self) -> None:
        assert self.can_abort() and self.next_ring is not None
        for node in self.participants:
            if node.name not in self.ring:
                assert not node.records and not node.handed, "a joiner got state before SCALING"
                del self.nodes[node.name]
            else:
                node.stage, node.next_ring = Stage.NORMAL, None
                self.stage_log.append((node.name, node.stage, self.ring.epoch))
        self.next_ring = None  # the epoch stays burnt: highest_epoch is not lowered

    # -- invariants --------------------------------------------------------------------------------

    def check(self) -> None:
        """Invariants 1 and 3 after every step (2 and 4 are checked as requests are served)."""
        in_flight: dict[int, int] = {}
        for queue in self.queues.values():
            for msg in queue:
                if msg.payload is not None and msg.payload.exists:
                    in_flight[msg.key] = in_flight.get(msg.key, 0) + 1
        for key, token in self.tokens.items():
            servers = [
                n.name
                for n in self.nodes.values()
                if isinstance(
                    self.decide(n.view(), n.holding(key), Request(token, n.view().epoch)), Serve
                )
            ]
            if len(servers) > 1:
                self.fail(1, DoubleOwnership, f"key {key} would be served by {servers}")
            copies = in_flight.get(key, 0) + sum(
                1 for n in self.nodes.values() if (r := n.records.get(key)) and r.exists
            )
            if copies != int(self.exists[key]):
                self.fail(
                    3,
                    RecordLostOrDuplicated,
                    f"key {key}: {copies} records, model says exists={self.exists[key]}",
                )
        if self.next_ring is not None and any(n.stage is Stage.SCALING for n in self.participants):
            old = [
                n.name
                for n in self.participants
                if n.stage is Stage.NORMAL and n.ring.epoch < self.next_ring.epoch
            ]
            assert not old, f"NORMAL on the old epoch ({old}) coexists with SCALING"

    def finish(self) -> None:
        """Deliver every message, then check that every request was answered."""
        self.deliver_all()
        for log in self.requests.values():
            if log.served_hops is None:
                self.fail(1, DoubleOwnership, f"request {log.request_id} was never served")
            elif log.served_hops > MAX_HOPS:
                self.fail(2, HopBoundExceeded, f"request {log.request_id}: {log.served_hops} hops")
