"""The membership authority as a pure state machine: who is in the ring, and the barrier.

The controller of S6 (paper §4.4, §6) decides which nodes form the ring and walks every
scaling event through the stages of ``ring.ownership``.  This module holds all of its
decisions; ``store.shell.controller`` only moves messages and reads the clock.  Every
stimulus is a method that takes ``now`` (seconds, any monotonic origin) and returns a list
of effects: :class:`Send` (a message to a member), :class:`Progress` and :class:`Reply` (to
whoever asked for a scaling event) and :class:`Log` (a line for the operator).  Nothing
here blocks, and tests drive it with a fake clock.

The rules it keeps (those of ``ring/ownership.py``, seen from the controller)
---------------------------------------------------------------------------------
An event moves the cluster from ring *p* (epoch ``e``) to ring *n* (epoch ``h + 1``, where
``h`` is the highest epoch ever used).  Its *participants* are the members of *p* plus the
nodes being added; nodes being removed take part to the end, because they must drain.

1. Every participant is told PRE_SCALING.  Only when **every** participant has acknowledged
   it is anyone told SCALING, so no node is SCALING while another is NORMAL on *p*.
2. SCALING nodes drain and each reports its old-epoch records drained.  Only when **every**
   participant has reported is anyone told NORMAL on *n*.
3. The event is over when every participant has acknowledged NORMAL(n).  Only then may the
   next event begin, so PRE_SCALING never starts while some node is still SCALING.  Removed
   nodes are then told to leave; joiners are members.
4. An event aborts only while nobody has been told SCALING: when a participant has not
   acknowledged PRE_SCALING within ``pre_scaling_timeout`` seconds, or disconnects first.
   Everyone is told to return to NORMAL on *p*, joiners go back to waiting, and the epoch is
   burnt: the next event uses a higher one, so a late message of the aborted event can never
   be mistaken for one of the next.  The reason is kept for ``ctl status``.

Choices, and why
----------------
* **One event at a time; a second request is refused**, with a reason naming the running
  event.  Queueing would hide from the operator that the request waits behind an event that
  may yet abort, and would make "scale-out returned" mean different things.  Registrations
  are the exception: they are not requests but arrivals, and they simply wait.
* **Admission.**  By default (automatic admission) waiting nodes are admitted as soon as no
  event runs, ``admission_window`` seconds after the earliest of them registered, so nodes
  that start together join in one event.  With ``manual_admission`` they wait for
  :meth:`Barrier.request_scale_out`.  Joiners of an aborted event wait for an explicit
  scale-out (or a later automatic admission triggered by a new arrival), so one faulty node
  cannot make the controller abort in a loop.
* **The first ring needs no barrier.**  The ring starts empty at epoch 0.  The first
  admission is an event of kind ``form``: its nodes are told NORMAL on epoch 1 straight away.
  With no previous members nobody holds a record and nobody is NORMAL on an older ring, so
  the conflicts the barrier prevents cannot arise; and ``ring.ownership`` never has to route
  by an empty previous ring (which has no owner for any key).  A scale-in that would empty
  the ring is refused, so this case arises only once.
* **Losing a member is not crash recovery.**  A participant lost before anyone is SCALING
  aborts the event.  Later on, the event cannot be rolled back (records are moving), so it
  waits; a member that is lost with no event running stays in the ring.  Either way new
  events are refused until the member registers again under the same name and address; it is
  then sent the command of the stage it should be in (a *rejoin*).  Dropping a lost node
  needs its records replicated elsewhere first (crash safety), which is not done here.

Every decision is appended to :attr:`Barrier.log` as a :class:`Transition`;
:func:`check_transitions` replays a log and lists every breach of the rules above, and
:meth:`Barrier.validate` checks the invariants of the current state.  The node's side of the
protocol (which callbacks a command calls) is :class:`MemberSide`, here too, so that the
property tests drive the very logic that ``store.shell.membership`` runs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ring.hashring import DEFAULT_VNODES, HashRing
from ring.ownership import Stage
from store.wire.control import (
    ClusterStatus,
    Command,
    Figures,
    MemberList,
    Order,
    Resume,
    RingState,
    StageCommand,
    parse_address,
)
from store.wire.messages import Message

__all__ = [
    "DEFAULT_ADMISSION_WINDOW",
    "DEFAULT_FAILURE_TIMEOUT",
    "DEFAULT_LEAVE_TIMEOUT",
    "DEFAULT_PRE_SCALING_TIMEOUT",
    "Barrier",
    "Callback",
    "Disconnect",
    "Effect",
    "Log",
    "Member",
    "MemberSide",
    "Progress",
    "Reply",
    "Role",
    "ScaleEvent",
    "Send",
    "Transition",
    "check_transitions",
]

#: Seconds a participant has to acknowledge PRE_SCALING before the event aborts.
DEFAULT_PRE_SCALING_TIMEOUT: Final = 5.0
#: Seconds automatic admission waits after the first registration, so that nodes started
#: together are admitted by one event instead of one event each.
DEFAULT_ADMISSION_WINDOW: Final = 0.1
#: Seconds a removed node has to acknowledge ``leave`` before its request is answered anyway.
DEFAULT_LEAVE_TIMEOUT: Final = 30.0
#: Seconds a restarted controller collects the members' reports before it decides where the
#: cluster stands (members reconnect every half second or so).
DEFAULT_RESUME_WINDOW: Final = 1.0
#: Seconds of silence (no heartbeat, no message; or disconnected and not back) after which
#: a member is declared dead and a failure event repairs the ring without it.
DEFAULT_FAILURE_TIMEOUT: Final = 2.0


# --- effects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to the member ``to`` (dropped by the shell if it is not connected:
    its loss is reported to the barrier separately)."""

    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class Disconnect:
    """End the session of member ``to``: it was declared dead.  If the process was only
    stalled, it learns so by the end of its session and must come back as a new one."""

    to: str
    reason: str


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress line for the requester of the running event."""

    request_id: int
    text: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The final answer to request ``request_id``; ``code`` is done, refused or aborted."""

    request_id: int
    ok: bool
    code: str
    text: str
    summary: Figures = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the controller's log; ``level`` is a ``logging`` level name."""

    text: str
    level: str = "INFO"


Effect = Send | Progress | Reply | Log | Disconnect


# --- state --------------------------------------------------------------------------------


class Role(enum.Enum):
    """Where a registered node stands."""

    WAITING = "waiting"  # registered, not admitted
    JOINING = "joining"  # being added by the running event
    MEMBER = "member"  # in the current ring (removed nodes stay members until the end)
    LEAVING = "leaving"  # removed by a finished event, told to leave, not yet gone


@dataclass
class Member:
    """One registered node.  ``stage``/``epoch`` are the last ones it acknowledged (what
    the controller knows for certain; the node may be one command further)."""

    name: str
    address: str
    role: Role
    registered_at: float
    connected: bool = True
    stage: Stage = Stage.NORMAL
    epoch: int = 0
    held: bool = False  # its admission aborted: automatic admission skips it
    leave_deadline: float | None = None
    heard_at: float = 0.0  # the last time anything came from it (heartbeats included)
    lost_at: float | None = None  # when its connection ended, while it has not come back


@dataclass
class ScaleEvent:
    """The running scaling event."""

    kind: str  # "form", "out" or "in"
    epoch: int
    previous: HashRing
    next_ring: HashRing
    added: frozenset[str]
    removed: frozenset[str]
    participants: frozenset[str]
    # The stage the participants were last told to enter; the event waits for their answers:
    # PRE_SCALING acks, then drained reports (SCALING), then NORMAL acks on the new ring.
    phase: Stage
    started_at: float
    request_id: int | None
    pre_acked: set[str] = field(default_factory=set)
    scaling_acked: set[str] = field(default_factory=set)
    drained: dict[str, tuple[int, int]] = field(default_factory=dict)
    normal_acked: set[str] = field(default_factory=set)
    dead: frozenset[str] = frozenset()  # a repair: the members it leaves out

    def describe(self) -> str:
        """One line for refusals and status: what it does and what it waits for."""
        what = []
        if self.added:
            what.append("adding " + ", ".join(sorted(self.added)))
        if self.removed:
            what.append("removing " + ", ".join(sorted(self.removed)))
        return (
            f"{_KIND_NAMES[self.kind]} to epoch {self.epoch} ({'; '.join(what)}), "
            f"{self.phase.value}, waiting for {', '.join(self.waiting_for()) or 'nobody'}"
        )

    def waiting_for(self) -> list[str]:
        """Participants whose answer the current phase still needs."""
        if self.phase is Stage.PRE_SCALING:
            done: Iterable[str] = self.pre_acked
        elif self.phase is Stage.SCALING:
            done = self.drained
        else:
            done = self.normal_acked
        return sorted(self.participants - set(done))


_KIND_NAMES: Final = {
    "form": "initial admission",
    "out": "scale-out",
    "in": "scale-in",
    "repair": "failure repair",
}


@dataclass(frozen=True, slots=True)
class Transition:
    """One entry of the controller's log.

    ``what`` is one of: register, rejoin, gone, refused, event (an event starts; ``members``
    lists its participants, ``text`` its kind: form, out or in), command, ack, drained, stale
    (an answer that was ignored), abort (``epoch`` is the burnt one), finish, left.
    ``stage`` is the command sent or acknowledged where that applies (SCALING for a drained
    report), ``epoch`` the event's epoch (or the ring's, outside events).
    """

    at: float
    what: str
    member: str = ""
    stage: Command | None = None
    epoch: int = 0
    members: tuple[str, ...] = ()
    text: str = ""


@dataclass
class _PendingReply:
    """A finished scale-in whose reply waits until its removed nodes have left."""

    request_id: int
    text: str
    summary: Figures
    waiting: set[str]


def _member_list(ring: HashRing, addresses: dict[str, str]) -> MemberList:
    return [(name, addresses[name]) for name in sorted(ring.nodes)]


# --- the controller -----------------------------------------------------------------------


class Barrier:
    """The controller's state machine.  See the module docstring for the rules.

    Every public method that takes ``now`` is a stimulus and returns the effects to carry
    out, in order.  Costs: each stimulus is O(members) except those that start an event,
    which build the next ring (O(N·V·log(N·V)), about 10 ms for 16 nodes at 1024 vnodes).
    """

    def __init__(
        self,
        *,
        vnodes: int = DEFAULT_VNODES,
        manual_admission: bool = False,
        pre_scaling_timeout: float = DEFAULT_PRE_SCALING_TIMEOUT,
        admission_window: float = DEFAULT_ADMISSION_WINDOW,
        leave_timeout: float = DEFAULT_LEAVE_TIMEOUT,
        failure_timeout: float | None = None,
    ) -> None:
        if pre_scaling_timeout <= 0:
            raise ValueError(f"pre_scaling_timeout must be positive, not {pre_scaling_timeout}")
        if admission_window < 0:
            raise ValueError(f"admission_window must not be negative, not {admission_window}")
        self.vnodes = vnodes
        self.manual_admission = manual_admission
        self.pre_scaling_timeout = pre_scaling_timeout
        self.admission_window = admission_window
        self.leave_timeout = leave_timeout
        if failure_timeout is not None and failure_timeout <= 0:
            raise ValueError(f"failure_timeout must be positive, not {failure_timeout}")
        #: None: nobody is ever declared dead (the pure machine's default; the controller
        #: process uses DEFAULT_FAILURE_TIMEOUT).
        self.failure_timeout = failure_timeout
        #: Nodes declared dead, in order (for ``ctl status``; a new process of the same
        #: name may register again and is then a new member).
        self.dead: list[str] = []
        self._dead_addresses: dict[str, str] = {}
        #: A controller that restarted learns the ring back from the members that resume
        #: (see :meth:`resume`): their reports, until ``_learning_until``.
        self._learning: dict[str, Resume] = {}
        self._learning_until: float | None = None
        self.resume_window = DEFAULT_RESUME_WINDOW
        self.ring = HashRing((), vnodes=vnodes, epoch=0)
        self.highest_epoch = 0
        self.burnt: set[int] = set()
        self.members: dict[str, Member] = {}
        self.event: ScaleEvent | None = None
        self.last_abort = ""
        self.last_event: Figures = {}
        self.log: list[Transition] = []
        #: Answers ignored because they belong to no running event (a race: late, repeated,
        #: or from a node that moved on), by counter name: ``stale-ack``, ``stale-drained``.
        self.errors: dict[str, int] = {}
        self._pending_replies: list[_PendingReply] = []

    # -- queries ---------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The current ring's epoch (0 before the first admission)."""
        return self.ring.epoch

    @property
    def addresses(self) -> dict[str, str]:
        """Every registered node's address (and the dead's, which a ring may still name
        until their repair ends)."""
        return {**self._dead_addresses, **{name: m.address for name, m in self.members.items()}}

    def role_of(self, name: str) -> Role | None:
        """``name``'s role, or ``None`` if it is not registered."""
        member = self.members.get(name)
        return None if member is None else member.role

    def waiting(self) -> list[str]:
        """Registered nodes waiting for admission, by name."""
        return sorted(n for n, m in self.members.items() if m.role is Role.WAITING)

    def lost(self) -> list[str]:
        """Members (and joiners) whose connection is gone and who have not rejoined."""
        return sorted(n for n, m in self.members.items() if not m.connected)

    def cluster_stage(self) -> Stage:
        """NORMAL between events, else the running event's phase."""
        return Stage.NORMAL if self.event is None else self.event.phase

    def next_deadline(self) -> float | None:
        """The earliest ``now`` at which :meth:`tick` has something to do, or ``None``."""
        deadlines: list[float] = []
        event = self.event
        if event is not None and event.phase is Stage.PRE_SCALING:
            deadlines.append(event.started_at + self.pre_scaling_timeout)
        deadlines.extend(
            m.leave_deadline for m in self.members.values() if m.leave_deadline is not None
        )
        due = self._admission_due()
        if due is not None:
            deadlines.append(due)
        if self._learning_until is not None:
            deadlines.append(self._learning_until)
        timeout = self.failure_timeout
        if timeout is not None:
            for m in self.members.values():
                if m.role is not Role.WAITING:
                    since = m.heard_at if m.lost_at is None else m.lost_at
                    deadlines.append(since + timeout)
        return min(deadlines, default=None)

    def ring_state(self, accepted: bool, text: str) -> RingState:
        """The cluster as a :class:`RingState` (the answer to a registration)."""
        addresses = self.addresses
        event = self.event
        return RingState(
            accepted,
            text,
            self.ring.epoch,
            _member_list(self.ring, addresses),
            self.cluster_stage().value,
            None if event is None else event.epoch,
            None if event is None else _member_list(event.next_ring, addresses),
            self.vnodes,
        )

    def cluster_status(
        self, request_id: int, now: float, figures: dict[str, Figures] | None = None
    ) -> ClusterStatus:
        """What ``ctl status`` shows, with the members' ``figures`` gathered by the shell."""
        rows = [
            (m.name, m.address, m.role.value, m.stage.value, m.epoch, m.connected)
            for m in sorted(self.members.values(), key=lambda m: m.name)
        ]
        event_info: dict[str, Any] = {}
        event = self.event
        if event is not None:
            event_info = {
                "kind": event.kind,
                "epoch": event.epoch,
                "phase": event.phase.value,
                "added": sorted(event.added),
                "removed": sorted(event.removed),
                "waiting_for": event.waiting_for(),
                "elapsed_s": round(now - event.started_at, 3),
                "text": event.describe(),
            }
        return ClusterStatus(
            request_id,
            self.ring.epoch,
            self.highest_epoch,
            self.cluster_stage().value,
            rows,
            event_info,
            self.last_abort,
            dict(self.last_event),
            dict(figures or {}),
        )

    # -- stimuli: membership ---------------------------------------------------------------

    def register(self, name: str, address: str, now: float) -> tuple[RingState, list[Effect]]:
        """A node asks to join (or to come back after its connection was lost).

        Returns the answer for the registering connection (send it before the effects: they
        may include the first stage command for this node) and the effects.
        """
        effects: list[Effect] = []
        try:
            parse_address(address)
        except ValueError as exc:
            return self._refuse_registration(name, str(exc), now), effects
        existing = self.members.get(name)
        if existing is not None and existing.connected:
            return self._refuse_registration(
                name,
                f"the name {name!r} is already used by a connected node at {existing.address}",
                now,
            ), effects
        if existing is not None:
            if existing.address != address:
                return self._refuse_registration(
                    name,
                    f"{name} was at {existing.address}; a node of that name must come back "
                    f"at the same address, not {address}",
                    now,
                ), effects
            existing.connected = True
            existing.heard_at, existing.lost_at = now, None
            self._record(now, "rejoin", name)
            effects.append(Log(f"{name} rejoined as a {existing.role.value}"))
            effects.extend(self._resync(existing, now))
            return self.ring_state(True, f"rejoined as a {existing.role.value}"), effects
        if name in self.dead:  # a new process of a dead one's name: a new member
            self.dead.remove(name)
        self.members[name] = Member(name, address, Role.WAITING, now, heard_at=now)
        self._record(now, "register", name, text=address)
        effects.append(Log(f"{name} registered from {address}; waiting for admission"))
        how = "manual admission: waiting for scale-out" if self.manual_admission else "admitting"
        state = self.ring_state(True, f"registered; {how}")
        effects.extend(self._due(now))
        return state, effects

    def member_gone(self, name: str, now: float) -> list[Effect]:
        """``name``'s connection to the controller ended."""
        member = self.members.get(name)
        if member is None or not member.connected:
            return []
        self._record(now, "gone", name)
        effects: list[Effect] = []
        if member.role is Role.WAITING:
            del self.members[name]
            effects.append(Log(f"{name} went away before admission"))
        elif member.role is Role.LEAVING:
            effects.extend(self._left(name, now, "disconnected"))
        else:
            member.connected = False
            member.lost_at = now
            event = self.event
            if event is not None and name in event.participants:
                if event.phase is Stage.PRE_SCALING:
                    effects.extend(
                        self._abort(f"{name} disconnected before acknowledging pre-scaling", now)
                    )
                else:
                    effects.append(
                        Log(
                            f"{name} disconnected during {event.phase.value} of epoch "
                            f"{event.epoch}; the event cannot be rolled back and waits for "
                            f"{name} to rejoin",
                            "WARNING",
                        )
                    )
            else:
                effects.append(
                    Log(
                        f"{name} disconnected; it stays in the ring (its keys are unreachable) "
                        "and no event can start until it rejoins",
                        "WARNING",
                    )
                )
        effects.extend(self._due(now))
        return effects

    def heard(self, name: str, now: float) -> None:
        """Something (a heartbeat, any message) came from ``name``: it is alive.  O(1) and
        no effects, so that the shell can call it for every message."""
        member = self.members.get(name)
        if member is not None and member.connected:
            member.heard_at = now

    def resume(self, report: Resume, now: float) -> tuple[RingState, list[Effect]]:
        """A member connects again after losing its controller connection, saying where it
        stands.  A controller that knows it takes it as a rejoin (:meth:`register`).  A
        controller that knows no ring yet (it restarted) learns the cluster back: it
        collects the reports for :attr:`resume_window` seconds, then decides (see
        :meth:`_learnt`).  A member declared dead is refused: it may come back only as a
        new process."""
        name = report.name
        if name in self.dead:
            text = f"{name} was declared dead; it may join again only as a new process"
            return self._refuse_registration(name, text, now), []
        if name in self.members or (self.ring.epoch and self._learning_until is None):
            if name not in self.members:
                if self._scaled_in(report):
                    return self._tell_to_leave(name, report.address, now)
                text = f"{name} is not a member of epoch {self.ring.epoch}"
                return self._refuse_registration(name, text, now), []
            return self.register(name, report.address, now)
        try:
            parse_address(report.address)
            Stage(report.stage)
        except ValueError as exc:
            return self._refuse_registration(name, str(exc), now), []
        if report.epoch <= 0:
            return self.register(name, report.address, now)
        if self._learning_until is None:
            self._learning_until = now + self.resume_window
        self._learning[name] = report
        self._record(now, "resume", name, text=f"{report.stage} {report.epoch}")
        effects: list[Effect] = [
            Log(f"{name} resumed ({report.stage} on epoch {report.epoch}): learning the ring")
        ]
        return self.ring_state(True, "resumed; the controller is learning the ring back"), effects

    def _learnt(self, now: float) -> list[Effect]:
        """The end of the resume window: where the cluster stands, from the reports.

        The newest ring reported is the ring.  A member that is scaling says an event was
        running: if some member is SCALING (or already NORMAL on the event's ring), every
        participant had acknowledged pre-scaling, so the event goes on from SCALING (those
        NORMAL on its ring count as drained); if all are only PRE_SCALING, it aborts and
        its epoch is burnt.  Members of the ring that did not resume are lost, and are
        declared dead after the failure timeout like any silent member; reporters that are
        not in the ring are sent away."""
        reports, self._learning, self._learning_until = self._learning, {}, None
        effects: list[Effect] = []
        if not reports:
            return effects
        scaling = [r for r in reports.values() if r.next_epoch is not None]
        newest = max(reports.values(), key=lambda r: r.epoch)
        event_report = max(scaling, key=lambda r: r.next_epoch or 0) if scaling else None
        if event_report is not None and (event_report.next_epoch or 0) <= newest.epoch:
            event_report = None  # an older event's: the ring moved on since
        base = newest if event_report is None else event_report
        addresses = dict(base.members)
        if event_report is not None and event_report.next_members is not None:
            addresses.update(event_report.next_members)
        highest = max(
            [r.epoch for r in reports.values()] + [r.next_epoch or 0 for r in reports.values()]
        )
        # (between events, one more: an aborted event's epoch we never saw is burnt too)
        self.highest_epoch = max(self.highest_epoch, highest + (event_report is None))
        self.ring = HashRing([n for n, _ in base.members], vnodes=self.vnodes, epoch=base.epoch)
        for name, address in addresses.items():
            report = reports.get(name)
            member = Member(name, address, Role.MEMBER, now, heard_at=now)
            if report is None:
                member.connected, member.lost_at = False, now
            self.members[name] = member
        for name, report in reports.items():
            if name in addresses:
                continue
            if self._scaled_in(report):
                effects.extend(self._tell_to_leave(name, report.address, now)[1])
            else:
                effects.append(Disconnect(name, f"not a member of epoch {self.ring.epoch}"))
        self._record(now, "learnt", epoch=self.ring.epoch, members=tuple(sorted(self.ring.nodes)))
        effects.append(
            Log(f"learnt the ring back: epoch {self.ring.epoch}, {len(self.ring)} members")
        )
        if event_report is None:
            return effects
        assert event_report.next_epoch is not None and event_report.next_members is not None
        next_ring = HashRing(
            [n for n, _ in event_report.next_members],
            vnodes=self.vnodes,
            epoch=event_report.next_epoch,
        )
        added = frozenset(next_ring.nodes - self.ring.nodes)
        removed = frozenset(self.ring.nodes - next_ring.nodes)
        for name in added:
            self.members[name].role = Role.JOINING
        kind = "out" if added else "in"
        on_next = {
            n for n, r in reports.items() if r.next_epoch is None and r.epoch == next_ring.epoch
        }
        any_scaling = on_next or any(r.stage == Stage.SCALING.value for r in scaling)
        participants = frozenset(self.ring.nodes | added)
        event = ScaleEvent(
            kind,
            next_ring.epoch,
            self.ring,
            next_ring,
            added,
            removed,
            participants,
            Stage.SCALING if any_scaling else Stage.PRE_SCALING,
            now,
            None,
        )
        self.event = event
        self._record(
            now, "event", epoch=event.epoch, members=tuple(sorted(participants)), text=kind
        )
        if not any_scaling:
            for name in reports:
                self.members[name].stage, self.members[name].epoch = Stage.PRE_SCALING, event.epoch
            event.pre_acked.update(reports.keys() & participants)
            return effects + self._abort("the controller restarted during pre-scaling", now)
        event.pre_acked.update(participants)
        for name in sorted(participants):
            member = self.members[name]
            member.stage, member.epoch = Stage.SCALING, event.epoch
            # (someone is scaling, so everyone had acknowledged pre-scaling)
            self._record(now, "ack", name, Stage.PRE_SCALING, event.epoch, text="inferred")
        for name in sorted(on_next & participants):
            event.drained[name] = (0, 0)
            self._record(now, "drained", name, Stage.SCALING, event.epoch, text="inferred")
        effects.extend(self._progress(f"resuming {event.describe()}"))
        for name in sorted(reports.keys() & participants - on_next):
            effects.append(Send(name, self._command(name, Stage.SCALING)))
            self._record(now, "command", name, Stage.SCALING, event.epoch)
        if participants <= event.drained.keys():
            effects.extend(self._enter_normal(now))
        return effects

    def _scaled_in(self, report: Resume) -> bool:
        """Whether ``report`` is from a node a finished scale-in removed, whose LEAVE was lost
        with the controller: NORMAL on a ring without itself, no newer than ours."""
        return (
            report.stage == Stage.NORMAL.value
            and report.next_epoch is None
            and report.name not in {n for n, _ in report.members}
            and 0 < report.epoch <= self.ring.epoch
        )

    def _tell_to_leave(self, name: str, address: str, now: float) -> tuple[RingState, list[Effect]]:
        member = Member(name, address, Role.LEAVING, now, heard_at=now)
        member.leave_deadline = now + self.leave_timeout
        self.members[name] = member
        self._record(now, "resume", name, text="scaled in: told to leave")
        self._record(now, "command", name, Order.LEAVE, self.ring.epoch)
        effects: list[Effect] = [
            Log(f"{name} resumed after its scale-in: told to leave"),
            Send(name, self._leave_command()),
        ]
        return self.ring_state(True, "resumed; scaled in: leave"), effects

    def _declare_dead(self, names: list[str], now: float) -> list[Effect]:
        """``names`` stopped answering: a failure event repairs the ring without them.

        Before anyone was told SCALING, the running event aborts as it would for a
        disconnection, and the repair follows on the previous ring.  Later, the event
        cannot be rolled back: it is replaced by the repair, whose ring keeps everyone
        alive of both rings (the joiners join; the nodes being removed stay members and
        may be removed again by a new scale-in).  A repair interrupted by another death is
        replaced the same way.  The dead are forgotten; a process of the same name may
        register again as a new member."""
        effects: list[Effect] = []
        dead = set(names)
        for name in sorted(dead):
            member = self.members[name]
            why = "disconnected" if member.lost_at is not None else "silent"
            effects.append(
                Log(f"{name} declared dead: {why} for {self.failure_timeout} s", "WARNING")
            )
            self._record(now, "dead", name, text=why)
            effects.append(Disconnect(name, f"declared dead ({why})"))
            self.dead.append(name)
        event = self.event
        if event is not None and event.phase is Stage.PRE_SCALING and event.kind != "repair":
            effects.extend(self._abort(f"{', '.join(sorted(dead))} died", now))
            event = None
        keep: set[str] = set(self.ring.nodes)
        joiners: set[str] = set()
        if event is not None:
            keep |= event.next_ring.nodes
            joiners = set(event.added)
            text = (
                f"{_KIND_NAMES[event.kind]} to epoch {event.epoch} interrupted: "
                f"{', '.join(sorted(dead))} died; a failure repair takes over"
            )
            if event.request_id is not None:
                effects.append(Reply(event.request_id, False, "aborted", text))
            self.last_abort = text
            self.event = None
        for name in dead:
            member = self.members.pop(name)
            self._dead_addresses[name] = member.address
            if member.role is Role.LEAVING:
                effects.extend(self._left_pending(name, "died"))
        for name in list(self.members):
            member = self.members[name]
            if member.role is Role.JOINING and name not in joiners:
                member.role = Role.WAITING
        keep &= self.members.keys()  # the dead of an earlier repair this one replaces too
        joiners &= self.members.keys()
        for name in joiners:
            self.members[name].role = Role.JOINING
        leavers = {n for n, m in self.members.items() if m.role is Role.LEAVING}
        keep -= leavers
        if not keep:
            self.ring = HashRing((), vnodes=self.vnodes, epoch=self.ring.epoch)
            effects.append(Log("every member of the ring is dead: the cluster is empty", "ERROR"))
            return effects
        effects.extend(self._start_repair(frozenset(keep), frozenset(joiners), dead, now))
        return effects

    def _left_pending(self, name: str, how: str) -> list[Effect]:
        effects: list[Effect] = []
        for pending in list(self._pending_replies):
            if name in pending.waiting:
                pending.waiting.discard(name)
                if not pending.waiting:
                    self._pending_replies.remove(pending)
                    effects.append(
                        Reply(pending.request_id, True, "done", pending.text, pending.summary)
                    )
        return effects

    def _start_repair(
        self, keep: frozenset[str], joiners: frozenset[str], dead: set[str], now: float
    ) -> list[Effect]:
        epoch = self.highest_epoch + 1
        self.highest_epoch = epoch
        next_ring = HashRing(keep, vnodes=self.vnodes, epoch=epoch)
        event = ScaleEvent(
            "repair",
            epoch,
            self.ring,
            next_ring,
            joiners,
            frozenset(),
            keep,
            Stage.NORMAL,
            now,
            None,
            dead=frozenset(dead),
        )
        self.event = event
        self._record(now, "event", epoch=epoch, members=tuple(sorted(keep)), text="repair")
        effects: list[Effect] = [
            Log(
                f"failure repair to epoch {epoch}: {', '.join(sorted(dead))} left out; "
                f"{len(keep)} members rebuild the key records"
            )
        ]
        command = self._repair_command()
        for name in sorted(keep):
            effects.append(Send(name, command))
            self._record(now, "command", name, Order.REPAIR, epoch)
        return effects

    def _repair_command(self) -> StageCommand:
        event = self.event
        assert event is not None and event.kind == "repair"
        ring = event.next_ring
        return StageCommand(
            Order.REPAIR.value,
            ring.epoch,
            _member_list(ring, self.addresses),
            None,
            None,
            self.vnodes,
        )

    # -- stimuli: requests -----------------------------------------------------------------

    def request_scale_out(
        self, names: Sequence[str] | None, now: float, request_id: int | None = None
    ) -> list[Effect]:
        """Admit ``names`` (every waiting node when ``None`` or empty)."""
        refusal = self._busy()
        if refusal is None:
            waiting = self.waiting()
            if names:
                for name in names:
                    role = self.role_of(name)
                    if role is None:
                        listing = ", ".join(waiting) or "none"
                        refusal = f"unknown node {name!r} (waiting for admission: {listing})"
                    elif role is not Role.WAITING:
                        refusal = f"{name} is already a {role.value}"
                    if refusal is not None:
                        break
                chosen = sorted(set(names))
            else:
                chosen = waiting
                if not chosen:
                    refusal = "no node is waiting for admission"
        if refusal is not None:
            return self._refuse_request(refusal, now, request_id)
        return self._start_event(frozenset(chosen), frozenset(), now, request_id)

    def request_scale_in(
        self, names: Sequence[str], now: float, request_id: int | None = None
    ) -> list[Effect]:
        """Remove ``names`` from the ring; they drain, then are told to leave."""
        refusal = self._busy()
        if refusal is None:
            if not names:
                refusal = "scale-in needs the names of the nodes to remove"
            for name in names:
                role = self.role_of(name)
                if role is None:
                    members = ", ".join(sorted(self.ring.nodes)) or "none"
                    refusal = f"unknown node {name!r} (members: {members})"
                elif role is not Role.MEMBER:
                    refusal = f"{name} is not a member of the ring (it is {role.value})"
                if refusal is not None:
                    break
            if refusal is None and set(names) >= self.ring.nodes:
                refusal = "cannot remove every member: the ring would be empty"
        if refusal is not None:
            return self._refuse_request(refusal, now, request_id)
        return self._start_event(frozenset(), frozenset(names), now, request_id)

    # -- stimuli: answers from members -----------------------------------------------------

    def ack(self, name: str, command: Command, epoch: int, now: float) -> list[Effect]:
        """``name`` has acted on ``command`` of ``epoch`` (its callback returned)."""
        member = self.members.get(name)
        if member is None:
            return [self._stale(name, command, epoch, now, "not registered")]
        if command is Order.LEAVE:
            if member.role is not Role.LEAVING:
                return [self._stale(name, command, epoch, now, "not leaving")]
            return self._left(name, now, "left")
        if command is Order.ABORT:
            self._record(now, "ack", name, Order.ABORT, epoch)
            member.stage, member.epoch = Stage.NORMAL, self._abort_ring_epoch(member)
            return []
        event = self.event
        if command is Order.REPAIR:
            if event is None or event.kind != "repair" or epoch != event.epoch:
                return [self._stale(name, command, epoch, now, "no such repair running")]
            if name in event.participants and name not in event.normal_acked:
                self._record(now, "ack", name, command, epoch)
                event.normal_acked.add(name)
                member.stage, member.epoch = Stage.NORMAL, epoch
                if event.participants <= event.normal_acked:
                    return self._finish(now)
            return []
        if event is None or epoch != event.epoch or name not in event.participants:
            if command is Stage.NORMAL and event is None and epoch == self.ring.epoch:
                # A rejoined member acknowledging the resync of a quiet cluster.
                self._record(now, "ack", name, Stage.NORMAL, epoch)
                member.stage, member.epoch = Stage.NORMAL, epoch
                return []
            return [self._stale(name, command, epoch, now, "no such event running")]
        effects: list[Effect] = []
        if command is Stage.PRE_SCALING and event.phase is Stage.PRE_SCALING:
            if name not in event.pre_acked:
                self._record(now, "ack", name, command, epoch)
                event.pre_acked.add(name)
                member.stage, member.epoch = Stage.PRE_SCALING, epoch
                if event.participants <= event.pre_acked:
                    effects.extend(self._enter_scaling(now))
            return effects
        if command is Stage.SCALING and event.phase in (Stage.SCALING, Stage.NORMAL):
            if name not in event.scaling_acked:
                self._record(now, "ack", name, command, epoch)
                event.scaling_acked.add(name)
                if member.stage is Stage.PRE_SCALING:
                    member.stage = Stage.SCALING
            return effects
        if command is Stage.NORMAL and event.phase is Stage.NORMAL:
            if name not in event.normal_acked:
                self._record(now, "ack", name, command, epoch)
                event.normal_acked.add(name)
                member.stage, member.epoch = Stage.NORMAL, epoch
                if event.participants <= event.normal_acked:
                    effects.extend(self._finish(now))
            return effects
        return [self._stale(name, command, epoch, now, f"event is in {event.phase.value}")]

    def report_drained(
        self, name: str, epoch: int, records_moved: int, objects_moved: int, now: float
    ) -> list[Effect]:
        """``name`` has handed on (and had acknowledged) every record of the old epoch that
        it must give away.  A report implies the node is SCALING, whatever the order in
        which its ack and report arrive."""
        event = self.event
        member = self.members.get(name)
        if (
            member is None
            or event is None
            or event.epoch != epoch
            or name not in event.participants
            or event.phase is not Stage.SCALING
        ):
            return [
                self._stale(name, Stage.SCALING, epoch, now, "no event is scaling", report=True)
            ]
        if name in event.drained:
            return []
        event.drained[name] = (records_moved, objects_moved)
        member.stage, member.epoch = Stage.SCALING, epoch
        self._record(
            now, "drained", name, Stage.SCALING, epoch, text=f"{records_moved}/{objects_moved}"
        )
        effects: list[Effect] = []
        done, total = len(event.drained), len(event.participants)
        effects.extend(
            self._progress(
                f"{name} drained: {records_moved} records, {objects_moved} objects moved "
                f"({done}/{total})"
            )
        )
        if event.participants <= event.drained.keys():
            effects.extend(self._enter_normal(now))
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Time has passed: pre-scaling timeouts, leave timeouts, automatic admission."""
        return self._due(now)

    # -- the event -------------------------------------------------------------------------

    def _busy(self) -> str | None:
        """Why no event can start now, or ``None``."""
        if self._learning_until is not None:
            return "the controller restarted and is learning the ring back from the members"
        if self.event is not None:
            return f"a scaling event is already running: {self.event.describe()}"
        lost = self.lost()
        if lost:
            return (
                f"{', '.join(lost)} disconnected and must rejoin first (a lost member "
                "cannot take part in the barrier)"
            )
        return None

    def _start_event(
        self,
        added: frozenset[str],
        removed: frozenset[str],
        now: float,
        request_id: int | None,
    ) -> list[Effect]:
        assert self.event is None
        previous = self.ring
        epoch = self.highest_epoch + 1
        self.highest_epoch = epoch
        next_ring = previous.with_nodes(added, removed, epoch=epoch)
        form = not previous.nodes
        kind = "form" if form else ("out" if added else "in")
        participants = frozenset(previous.nodes) | added
        event = ScaleEvent(
            kind,
            epoch,
            previous,
            next_ring,
            added,
            removed,
            participants,
            Stage.NORMAL if form else Stage.PRE_SCALING,
            now,
            request_id,
        )
        self.event = event
        for name in added:
            member = self.members[name]
            member.role = Role.JOINING
            member.held = False
        self._record(now, "event", epoch=epoch, members=tuple(sorted(participants)), text=kind)
        effects: list[Effect] = [Log(f"event started: {event.describe()}")]
        if form:
            effects.extend(
                self._progress(
                    f"forming the first ring at epoch {epoch} with {', '.join(sorted(added))} "
                    "(no barrier: nobody holds state yet)"
                )
            )
        else:
            effects.extend(
                self._progress(
                    f"{_KIND_NAMES[kind]} to epoch {epoch}: pre-scaling {len(participants)} nodes"
                )
            )
        effects.extend(self._command_all(event.phase, now))
        return effects

    def _enter_scaling(self, now: float) -> list[Effect]:
        event = self.event
        assert event is not None and event.participants <= event.pre_acked
        event.phase = Stage.SCALING
        effects = self._progress(
            f"all {len(event.participants)} nodes acknowledged pre-scaling; scaling"
        )
        effects.extend(self._command_all(Stage.SCALING, now))
        return effects

    def _enter_normal(self, now: float) -> list[Effect]:
        event = self.event
        assert event is not None and event.participants <= event.drained.keys()
        event.phase = Stage.NORMAL
        effects = self._progress(f"all nodes drained; normal on epoch {event.epoch}")
        effects.extend(self._command_all(Stage.NORMAL, now))
        return effects

    def _command(self, name: str, stage: Stage) -> StageCommand:
        """The command that puts ``name`` in ``stage`` of the running event (or, between
        events, NORMAL on the current ring)."""
        addresses = self.addresses
        event = self.event
        if event is None or stage is Stage.NORMAL:
            ring = self.ring if event is None else event.next_ring
            return StageCommand(
                stage.value, ring.epoch, _member_list(ring, addresses), None, None, self.vnodes
            )
        return StageCommand(
            stage.value,
            event.previous.epoch,
            _member_list(event.previous, addresses),
            event.epoch,
            _member_list(event.next_ring, addresses),
            self.vnodes,
        )

    def _command_all(self, stage: Stage, now: float) -> list[Effect]:
        event = self.event
        assert event is not None
        effects: list[Effect] = []
        for name in sorted(event.participants):
            effects.append(Send(name, self._command(name, stage)))
            self._record(now, "command", name, stage, event.epoch)
        return effects

    def _resync(self, member: Member, now: float) -> list[Effect]:
        """The command a rejoining member needs to be where the cluster is."""
        event = self.event
        name = member.name
        if event is None or name not in event.participants:
            if member.role is Role.MEMBER:
                self._record(now, "command", name, Stage.NORMAL, self.ring.epoch)
                return [Send(name, self._command(name, Stage.NORMAL))]
            return []
        if event.kind == "repair":
            self._record(now, "command", name, Order.REPAIR, event.epoch)
            return [Send(name, self._repair_command())]
        # The stage the others were told (NORMAL throughout the forming of the first ring).
        stage = event.phase
        self._record(now, "command", name, stage, event.epoch)
        return [Send(name, self._command(name, stage))]

    def _finish(self, now: float) -> list[Effect]:
        event = self.event
        assert event is not None and event.participants <= event.normal_acked
        self.ring = event.next_ring
        self.event = None
        records = sum(r for r, _ in event.drained.values())
        objects = sum(o for _, o in event.drained.values())
        duration = now - event.started_at
        summary: Figures = {
            "kind": event.kind,
            "epoch": event.epoch,
            "members": len(self.ring),
            "added": ", ".join(sorted(event.added)),
            "removed": ", ".join(sorted(event.removed)),
            "duration_s": round(duration, 3),
            "records_moved": records,
            "objects_moved": objects,
        }
        if event.kind == "repair":
            summary["dead"] = ", ".join(sorted(event.dead))
        self.last_event = summary
        self._record(now, "finish", epoch=event.epoch, members=tuple(sorted(self.ring.nodes)))
        effects: list[Effect] = [
            Log(
                f"epoch {event.epoch} reached: {len(self.ring)} members, {records} records and "
                f"{objects} objects moved in {duration:.3f} s"
            )
        ]
        for name in event.added:
            self.members[name].role = Role.MEMBER
        text = f"{_KIND_NAMES[event.kind]} done: every node is normal on epoch {event.epoch}"
        if event.request_id is not None:
            effects.append(Progress(event.request_id, text))
        leaving = set(event.removed)
        for name in sorted(leaving):
            member = self.members[name]
            member.role = Role.LEAVING
            member.leave_deadline = now + self.leave_timeout
            effects.append(Send(name, self._leave_command()))
            self._record(now, "command", name, Order.LEAVE, event.epoch)
        if event.request_id is not None:
            if leaving:
                self._pending_replies.append(
                    _PendingReply(event.request_id, text, summary, leaving)
                )
            else:
                effects.append(Reply(event.request_id, True, "done", text, summary))
        effects.extend(self._due(now))
        return effects

    def _leave_command(self) -> StageCommand:
        return StageCommand(
            Order.LEAVE.value,
            self.ring.epoch,
            _member_list(self.ring, self.addresses),
            None,
            None,
            self.vnodes,
        )

    def _left(self, name: str, now: float, how: str) -> list[Effect]:
        del self.members[name]
        self._record(now, "left", name, text=how)
        effects: list[Effect] = [Log(f"{name} {how} after leaving the ring")]
        for pending in list(self._pending_replies):
            if name in pending.waiting:
                pending.waiting.discard(name)
                effects.append(Progress(pending.request_id, f"{name} {how}"))
                if not pending.waiting:
                    self._pending_replies.remove(pending)
                    effects.append(
                        Reply(pending.request_id, True, "done", pending.text, pending.summary)
                    )
        return effects

    def _abort(self, reason: str, now: float) -> list[Effect]:
        event = self.event
        assert event is not None and event.phase is Stage.PRE_SCALING
        assert not event.scaling_acked and not event.drained
        text = (
            f"{_KIND_NAMES[event.kind]} to epoch {event.epoch} aborted: {reason}; "
            f"epoch {event.epoch} is burnt and the cluster stays on epoch {event.previous.epoch}"
        )
        self.last_abort = text
        addresses = self.addresses
        effects: list[Effect] = [Log(text, "WARNING")]
        command = StageCommand(
            Order.ABORT.value,
            event.previous.epoch,
            _member_list(event.previous, addresses),
            event.epoch,
            None,
            self.vnodes,
        )
        for name in sorted(event.participants):
            effects.append(Send(name, command))
            self._record(now, "command", name, Order.ABORT, event.epoch)
        self.burnt.add(event.epoch)
        self.event = None
        self._record(now, "abort", epoch=event.epoch, text=reason)
        for name in event.added:
            member = self.members[name]
            member.role = Role.WAITING
            member.held = True
            if not member.connected:
                del self.members[name]
        if event.request_id is not None:
            effects.append(Reply(event.request_id, False, "aborted", text))
        return effects

    def _abort_ring_epoch(self, member: Member) -> int:
        return self.ring.epoch if member.role is Role.MEMBER else member.epoch

    # -- time ------------------------------------------------------------------------------

    def _admission_due(self) -> float | None:
        if self.manual_admission or self.event is not None or self.lost() or self._learning:
            return None
        times = [
            m.registered_at
            for m in self.members.values()
            if m.role is Role.WAITING and not m.held and m.connected
        ]
        return min(times) + self.admission_window if times else None

    def _due(self, now: float) -> list[Effect]:
        """Everything whose time has come: run after every stimulus."""
        effects: list[Effect] = []
        if self._learning_until is not None:
            if now < self._learning_until:
                return effects
            effects.extend(self._learnt(now))
        event = self.event
        if (
            event is not None
            and event.phase is Stage.PRE_SCALING
            and now >= event.started_at + self.pre_scaling_timeout
        ):
            late = ", ".join(event.waiting_for())
            effects.extend(
                self._abort(
                    f"{late} did not acknowledge pre-scaling within {self.pre_scaling_timeout:g} s",
                    now,
                )
            )
        for member in list(self.members.values()):
            if member.leave_deadline is not None and now >= member.leave_deadline:
                effects.extend(self._left(member.name, now, "timed out"))
        silent = []
        timeout = self.failure_timeout
        for member in self.members.values():
            if timeout is None or member.role is Role.WAITING:
                continue
            since = member.heard_at if member.lost_at is None else member.lost_at
            if now >= since + timeout:
                silent.append(member.name)
        if silent:
            effects.extend(self._declare_dead(silent, now))
        due = self._admission_due()
        if due is not None and now >= due:
            names = frozenset(
                n
                for n, m in self.members.items()
                if m.role is Role.WAITING and not m.held and m.connected
            )
            effects.extend(self._start_event(names, frozenset(), now, None))
        return effects

    # -- helpers ---------------------------------------------------------------------------

    def _progress(self, text: str) -> list[Effect]:
        event = self.event
        effects: list[Effect] = [Log(text)]
        if event is not None and event.request_id is not None:
            effects.append(Progress(event.request_id, text))
        return effects

    def _refuse_request(self, text: str, now: float, request_id: int | None) -> list[Effect]:
        self._record(now, "refused", text=text)
        effects: list[Effect] = [Log(f"request refused: {text}")]
        if request_id is not None:
            effects.append(Reply(request_id, False, "refused", text))
        return effects

    def _refuse_registration(self, name: str, text: str, now: float) -> RingState:
        self._record(now, "refused", name, text=text)
        return self.ring_state(False, text)

    def _stale(
        self, name: str, command: Command, epoch: int, now: float, why: str, *, report: bool = False
    ) -> Effect:
        """An acknowledgement of ``command`` (or, with ``report``, a drained report) that
        belongs to no running event: a race, so it is recorded, counted and logged low."""
        what = "drained report" if report else f"{command.value} ack"
        counter = "stale-drained" if report else "stale-ack"
        self.errors[counter] = self.errors.get(counter, 0) + 1
        self._record(now, "stale", name, command, epoch, text=f"{what}: {why}")
        return Log(f"ignored {what} of epoch {epoch} from {name}: {why}", "DEBUG")

    def _record(
        self,
        at: float,
        what: str,
        member: str = "",
        stage: Command | None = None,
        epoch: int = 0,
        *,
        members: tuple[str, ...] = (),
        text: str = "",
    ) -> None:
        self.log.append(Transition(at, what, member, stage, epoch, members, text))

    # -- invariants ------------------------------------------------------------------------

    def validate(self) -> None:
        """Assert the invariants of the current state (tests call it after every step)."""
        ring = self.ring
        assert ring.epoch <= self.highest_epoch
        assert ring.epoch not in self.burnt
        assert all(e <= self.highest_epoch for e in self.burnt)
        members = {n for n, m in self.members.items() if m.role is Role.MEMBER}
        event = self.event
        if event is not None and event.kind == "repair":  # the dead are forgotten already
            assert members <= set(ring.nodes), f"ring {sorted(ring.nodes)} < members {members}"
        else:
            assert members == set(ring.nodes), f"ring {sorted(ring.nodes)} != members {members}"
        joining = {n for n, m in self.members.items() if m.role is Role.JOINING}
        if event is None:
            assert not joining, f"joiners {joining} without an event"
            for m in self.members.values():
                # Between events nobody is known to be SCALING: every event ended with all
                # NORMAL acks, or aborted before anyone was told SCALING.
                assert m.stage is not Stage.SCALING, f"{m.name} is scaling between events"
            return
        assert event.epoch == self.highest_epoch and event.epoch > ring.epoch
        assert event.previous is ring
        if event.kind == "repair":
            assert event.participants == event.next_ring.nodes
            assert joining == set(event.added) and event.phase is Stage.NORMAL
            return
        assert joining == set(event.added)
        assert event.removed <= ring.nodes and not event.added & ring.nodes
        assert event.participants == ring.nodes | event.added
        assert event.next_ring.nodes == (ring.nodes - event.removed) | event.added
        assert event.next_ring.epoch == event.epoch
        assert event.pre_acked <= event.participants
        assert event.drained.keys() <= event.participants
        assert event.normal_acked <= event.participants
        if event.kind == "form":
            assert not ring.nodes and event.phase is Stage.NORMAL
            return
        if event.phase is Stage.PRE_SCALING:
            # Nobody has been told SCALING, so the event may still abort.
            assert not event.scaling_acked and not event.drained and not event.normal_acked
        else:
            # The barrier: SCALING was commanded only after every PRE_SCALING ack, so no
            # participant can still be NORMAL on the old epoch.
            assert event.participants <= event.pre_acked
            for name in event.participants:
                m = self.members[name]
                assert m.epoch == event.epoch, (
                    f"{name} is known {m.stage.value} on epoch {m.epoch} while epoch "
                    f"{event.epoch} is {event.phase.value}"
                )
        if event.phase is Stage.NORMAL:
            assert event.participants <= event.drained.keys()
        else:
            assert not event.normal_acked


# --- checking a log -----------------------------------------------------------------------


def check_transitions(log: Iterable[Transition]) -> list[str]:
    """Every breach of the barrier rules in ``log`` (empty when it kept them all).

    Checked: events do not overlap and their epochs only grow (a burnt epoch never comes
    back); SCALING is commanded only after every participant acknowledged PRE_SCALING;
    NORMAL on the new epoch only after every participant reported drained (except for the
    first ring, which has no barrier); an abort only before any SCALING command; an event
    finishes only after every participant acknowledged NORMAL; each member's commands of one
    event go forward only (pre-scaling, scaling, normal; or pre-scaling, abort).
    """
    problems: list[str] = []
    order: dict[Command, int] = {
        Stage.PRE_SCALING: 0,
        Stage.SCALING: 1,
        Stage.NORMAL: 2,
        Order.ABORT: 2,
        Order.REPAIR: 2,
    }
    died = False  # a member was declared dead since the last event began
    highest = 0
    ring_epoch = 0
    epoch: int | None = None
    kind = ""
    participants: set[str] = set()
    pre_acked: set[str] = set()
    drained: set[str] = set()
    normal_acked: set[str] = set()
    scaling_sent = False
    last_command: dict[str, Command] = {}
    for i, t in enumerate(log):
        stage = t.stage
        where = f"entry {i} ({t.what} {t.member} {'' if stage is None else stage.value} {t.epoch})"
        if t.what == "dead":
            died = True
        elif t.what == "event":
            # A failure repair replaces a running event (which cannot be rolled back once
            # SCALING): the one overlap allowed, and only after a death.
            if epoch is not None and not (t.text == "repair" and died):
                problems.append(f"{where}: event starts while epoch {epoch} is running")
            died = False
            if t.epoch <= highest:
                problems.append(f"{where}: epoch {t.epoch} is not above {highest}")
            highest = max(highest, t.epoch)
            epoch, kind = t.epoch, t.text
            participants = set(t.members)
            pre_acked, drained, normal_acked = set(), set(), set()
            scaling_sent = False
            last_command = {}
        elif t.what == "command":
            if stage is None:
                problems.append(f"{where}: a command without its stage")
                continue
            if stage is Order.LEAVE:
                continue
            if epoch is None or t.epoch != epoch:
                if not (stage is Stage.NORMAL and t.epoch == ring_epoch):
                    problems.append(f"{where}: command outside its event")
                continue
            if t.member not in participants:
                problems.append(f"{where}: {t.member} is not a participant")
            before = last_command.get(t.member)
            if before is not None and order[stage] < order[before]:
                problems.append(f"{where}: {t.member} went back from {before.value}")
            last_command[t.member] = stage
            if stage is Stage.SCALING:
                if not participants <= pre_acked:
                    missing = sorted(participants - pre_acked)
                    problems.append(f"{where}: scaling before pre-scaling acks of {missing}")
                scaling_sent = True
            elif stage is Stage.NORMAL and kind != "form" and not participants <= drained:
                problems.append(f"{where}: normal before drained reports of {participants}")
            elif stage is Order.ABORT and scaling_sent:
                problems.append(f"{where}: abort after scaling was commanded")
        elif t.what == "ack" and epoch is not None and t.epoch == epoch:
            if stage is Stage.PRE_SCALING:
                pre_acked.add(t.member)
            elif stage in (Stage.NORMAL, Order.REPAIR):
                normal_acked.add(t.member)
        elif t.what == "drained" and epoch is not None and t.epoch == epoch:
            drained.add(t.member)
        elif t.what == "abort":
            if epoch is None or t.epoch != epoch:
                problems.append(f"{where}: abort of an event that is not running")
            elif scaling_sent:
                problems.append(f"{where}: abort after scaling was commanded")
            epoch = None
        elif t.what == "finish":
            if epoch is None or t.epoch != epoch:
                problems.append(f"{where}: finish of an event that is not running")
            elif not participants <= normal_acked:
                problems.append(f"{where}: finished before normal acks of {participants}")
            ring_epoch = t.epoch
            epoch = None
    return problems


# --- the node's side ----------------------------------------------------------------------


class Callback(enum.Enum):
    """The handler callbacks of ``store.shell.membership``, in the order a node may need them."""

    PRE_SCALING = "on_pre_scaling"
    SCALING = "on_scaling"
    NORMAL = "on_normal"
    ABORT = "on_abort"
    LEAVE = "on_leave"
    REPAIR = "on_repair"


class MemberSide:
    """Which callbacks a node runs for each command, and the stage it is in after them.

    Commands arrive in order on one connection, but a node that rejoined after losing its
    connection may get the command of a later stage than the one it is in (it missed the
    commands in between), or one it has already acted on.  :meth:`plan` copes with both:
    a repeated command runs no callback (and is simply acknowledged again), a SCALING
    command to a NORMAL node runs ``on_pre_scaling`` first, a NORMAL command for another
    ring to a node that is scaling is an abort.  O(1).
    """

    def __init__(self, epoch: int = 0) -> None:
        self.stage = Stage.NORMAL
        self.epoch = epoch  # the ring the node is NORMAL on, or the previous ring
        self.next_epoch: int | None = None  # the event's epoch while scaling
        self.left = False

    def plan(self, command: StageCommand) -> list[Callback]:
        """The callbacks to run for ``command``, in order; updates the stage as if they ran."""
        kind = command.kind
        if kind is Stage.PRE_SCALING:
            in_event = self.stage in (Stage.PRE_SCALING, Stage.SCALING)
            if in_event and self.next_epoch == command.next_epoch:
                return []
            self._scaling(Stage.PRE_SCALING, command)
            return [Callback.PRE_SCALING]
        if kind is Stage.SCALING:
            if self.stage is Stage.SCALING and self.next_epoch == command.next_epoch:
                return []
            steps = []
            if not (self.stage is Stage.PRE_SCALING and self.next_epoch == command.next_epoch):
                steps.append(Callback.PRE_SCALING)
            self._scaling(Stage.SCALING, command)
            return [*steps, Callback.SCALING]
        if kind is Stage.NORMAL:
            if self.stage is Stage.NORMAL and self.epoch == command.epoch:
                return []
            aborted = self.stage is not Stage.NORMAL and self.next_epoch != command.epoch
            self._normal(command.epoch)
            return [Callback.ABORT if aborted else Callback.NORMAL]
        if kind is Order.ABORT:
            if self.stage is Stage.NORMAL or self.next_epoch != command.next_epoch:
                return []
            self._normal(command.epoch)
            return [Callback.ABORT]
        if kind is Order.REPAIR:
            if self.stage is Stage.NORMAL and self.epoch == command.epoch:
                return []
            self._normal(command.epoch)
            return [Callback.REPAIR]
        if self.left:
            return []
        self.left = True
        return [Callback.LEAVE]

    def _scaling(self, stage: Stage, command: StageCommand) -> None:
        self.stage, self.epoch, self.next_epoch = stage, command.epoch, command.next_epoch

    def _normal(self, epoch: int) -> None:
        self.stage, self.epoch, self.next_epoch = Stage.NORMAL, epoch, None
