"""What the controller, the member nodes and the operator's ``ctl`` say to each other.

Three kinds of sessions reach the controller, all as authenticated peers of
``store.shell.transport`` (same cluster secret as the node-to-node links):

* a **member** sends :class:`Register` first and then stays connected for as long as it is
  part of the cluster; the controller answers with :class:`RingState`, later drives it with
  :class:`StageCommand`, and the member answers each command with a :class:`StageAck` once it
  has acted on it, plus one :class:`DrainedReport` per scaling event.  The controller also
  asks members for their figures (:class:`StatusRequest` -> :class:`NodeStatus`).
* an **operator** (``python -m store.ctl``) sends :class:`StatusRequest` or
  :class:`ScaleRequest`; it gets :class:`ClusterStatus`, or :class:`ScaleProgress` lines
  and a final :class:`ScaleReply`.
* a member may also send a :class:`ScaleRequest` for itself (a graceful leave).
* an operator (``python -m nf query``) may send a :class:`Query` for the application the
  members run; the controller relays it to one member and relays its
  :class:`QueryAnswer` back (the paper's controller relaying control-plane queries).

Rings travel as member lists of ``(name, address)`` pairs plus an epoch and the vnode count,
never as token arrays: every process builds the identical :class:`~ring.hashring.HashRing`
from them (the ring's tokens depend only on names and vnodes), and a node learns the
addresses of its peers from the same message that tells it who they are.

The scaling stages are those of :class:`ring.ownership.Stage`, defined there once; a stage
travels as its value (``"pre-scaling"``...), and so does an :class:`Order` (the commands that
are not stages).  :data:`Command` is either.

Tags 40-59 belong to this module.  Fields are positional on the wire (``store.wire.messages``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from ring.ownership import Stage
from store.wire.errors import StoreError
from store.wire.messages import message

__all__ = [
    "ClusterStatus",
    "Command",
    "ControllerRefused",
    "DrainedReport",
    "Figures",
    "Heartbeat",
    "MemberList",
    "NodeStatus",
    "Order",
    "Query",
    "QueryAnswer",
    "Register",
    "Resume",
    "RingState",
    "ScaleProgress",
    "ScaleReply",
    "ScaleRequest",
    "ScalingAborted",
    "StageAck",
    "StageCommand",
    "StatusRequest",
    "command_named",
    "describe_failure",
    "format_address",
    "parse_address",
]


class Order(enum.Enum):
    """The commands of :class:`StageCommand` that are not stages."""

    ABORT = "abort"  # the event was aborted: back to NORMAL on the previous ring
    LEAVE = "leave"  # a scale-in removed the node and everybody is past it: it may exit
    # A member died: ``epoch``/``members`` is the repaired ring (without it).  The node
    # fences the dead, reports what it holds to the new owners of their keys, and
    # acknowledges once the key records that died are rebuilt (see ``store.core``).
    REPAIR = "repair"


#: What a :class:`StageCommand` tells a node (and its :class:`StageAck` confirms): enter a
#: stage of ``ring.ownership``, or an :class:`Order`.
Command: TypeAlias = Stage | Order

_COMMANDS: Final[dict[str, Command]] = {c.value: c for c in (*Stage, *Order)}


def command_named(name: str) -> Command:
    """The :data:`Command` whose wire value is ``name``; ``ValueError`` for any other."""
    try:
        return _COMMANDS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a bad message
        raise ValueError(f"unknown stage command {name!r:.40}") from None


#: A ring's members on the wire: ``(name, address)`` pairs, sorted by name.
MemberList = list[tuple[str, str]]

#: Per-node figures for ``ctl status``: whatever the node chooses to tell (keys, objects,
#: parked microthreads, drain progress...), as scalar values only so any table can show them.
Figures = dict[str, int | float | str]


class ControllerRefused(StoreError):
    """The operator's (or the node's): the controller refused the request, e.g. a second
    scaling event while one runs, an unknown node, a name already in use.  The text says
    why, in words meant for the person who asked."""


class ScalingAborted(StoreError):
    """Nobody's fault in particular: the scaling event started but was aborted (a member
    did not acknowledge PRE_SCALING in time, or disconnected).  The cluster is back on its
    previous ring and the event's epoch is burnt; the request may simply be retried."""


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6 host]:port"``) as ``(host, port)``.

    Raises ``ValueError`` with a sentence naming what is wrong, so that command lines can
    print it as their one error line.
    """
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"address {text!r} has no host (use e.g. 127.0.0.1:{port_text})")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {text!r}: port {port} is outside 0-65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address` (brackets an IPv6 host)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_failure(exc: BaseException) -> str:
    """The innermost reason behind ``exc``, for one-line error messages: "Connection
    refused" says more than "HandshakeError()".

    Follows explicit causes, unsuppressed contexts and the first exception of a group; an
    ``OSError`` met on the way wins (its ``strerror`` is what a person can act on), else the
    text of the innermost exception that has one.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    text = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if not isinstance(current, BaseExceptionGroup) and str(current):
            text = str(current)
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
        elif current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return text or type(exc).__name__


# --- member <-> controller ----------------------------------------------------------------


@message(40)
@dataclass(frozen=True, slots=True)
class Register:
    """A node asks to join: its name (the one it proved in the handshake) and the address
    where its peers can reach it."""

    name: str
    address: str


@message(41)
@dataclass(frozen=True, slots=True)
class RingState:
    """The controller's answer to :class:`Register`: accepted or not (``text`` says why, or
    what happens next: waiting for admission, joining now, rejoined), and the cluster as it
    stands: the current ring, the cluster's stage (a :class:`~ring.ownership.Stage` value;
    empty in a refusal), and the running event's ring if any."""

    accepted: bool
    text: str
    epoch: int
    members: MemberList
    stage: str
    next_epoch: int | None
    next_members: MemberList | None
    vnodes: int


@message(42)
@dataclass(frozen=True, slots=True)
class StageCommand:
    """Move to a stage.  ``epoch``/``members`` is the ring the node is NORMAL on when the
    command is done with (``normal``, ``abort``, ``leave``) or the previous ring while
    scaling (``pre-scaling``, ``scaling``); ``next_epoch``/``next_members`` is the event's
    ring for ``pre-scaling``/``scaling`` and the burnt epoch (members ``None``) for
    ``abort``.  ``command`` is a :data:`Command`'s value; :attr:`kind` is the command."""

    command: str
    epoch: int
    members: MemberList
    next_epoch: int | None
    next_members: MemberList | None
    vnodes: int

    def __post_init__(self) -> None:
        kind = command_named(self.command)
        if kind in (Stage.PRE_SCALING, Stage.SCALING) and (
            self.next_epoch is None or self.next_members is None
        ):
            raise ValueError(f"a {self.command} command needs the next ring")

    @property
    def kind(self) -> Command:
        """The command itself (checked when the message was made or received)."""
        return _COMMANDS[self.command]

    @property
    def event_epoch(self) -> int:
        """The epoch this command belongs to, as acknowledged in :class:`StageAck`: the
        event's epoch while scaling or aborting, the ring's epoch otherwise."""
        return self.next_epoch if self.next_epoch is not None else self.epoch


@message(43)
@dataclass(frozen=True, slots=True)
class StageAck:
    """The node has acted on the command (its callback returned).  ``command`` is the
    command's value, as in :class:`StageCommand`; :attr:`kind` is the command."""

    name: str
    command: str
    epoch: int

    def __post_init__(self) -> None:
        command_named(self.command)  # a StageAck of no command is malformed

    @property
    def kind(self) -> Command:
        """The command acknowledged (checked when the message was made or received)."""
        return _COMMANDS[self.command]


@message(44)
@dataclass(frozen=True, slots=True)
class DrainedReport:
    """A SCALING node has handed on every old-epoch record it must give away and every
    hand-on was acknowledged; the counts are for the operator's summary."""

    name: str
    epoch: int
    records_moved: int
    objects_moved: int


# --- status -------------------------------------------------------------------------------


@message(45)
@dataclass(frozen=True, slots=True)
class StatusRequest:
    """From ``ctl`` to the controller (the whole cluster), or from the controller to a
    member (its own figures).  ``brief``: the stage, the epoch and the member's labels
    only, without the figures that cost a pass over everything the member holds (what a
    load balancer that polls the membership needs)."""

    request_id: int
    brief: bool = False


@message(46)
@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A member's figures, answering the controller's :class:`StatusRequest`."""

    request_id: int
    name: str
    figures: Figures


@message(47)
@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """The controller's answer to ``ctl``'s :class:`StatusRequest`.

    ``members`` rows are ``(name, address, role, stage, epoch, connected)`` with role one of
    waiting/joining/member/leaving and stage/epoch the last ones the node acknowledged (the
    stage as a :class:`~ring.ownership.Stage` value, as is ``stage``, the cluster's);
    ``event`` describes the running event (empty when none); ``last_abort`` is the reason of
    the latest abort (empty when none); ``figures`` maps node name to what it reported.
    """

    request_id: int
    epoch: int
    highest_epoch: int
    stage: str
    members: list[tuple[str, str, str, str, int, bool]]
    event: dict[str, Any]
    last_abort: str
    last_event: dict[str, Any]
    figures: dict[str, Figures]


# --- scaling requests ---------------------------------------------------------------------


@message(48)
@dataclass(frozen=True, slots=True)
class ScaleRequest:
    """Scale out (admit ``names``, or every waiting node when empty) or in (remove
    ``names``)."""

    request_id: int
    kind: str
    names: list[str]

    def __post_init__(self) -> None:
        if self.kind not in ("out", "in"):
            raise ValueError(f"scale kind is 'out' or 'in', not {self.kind!r}")


@message(49)
@dataclass(frozen=True, slots=True)
class ScaleProgress:
    """One line of progress of the event a :class:`ScaleRequest` started."""

    request_id: int
    text: str


@message(50)
@dataclass(frozen=True, slots=True)
class ScaleReply:
    """The end of a request: ``code`` is ``"done"``, ``"refused"`` (nothing started) or
    ``"aborted"`` (started, then rolled back); ``summary`` has the epoch, duration and what
    the nodes reported moving."""

    request_id: int
    ok: bool
    code: str
    text: str
    summary: Figures


@message(51)
@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A member is alive: sent every ``interval`` seconds on its controller connection.
    The controller declares a member dead that it has not heard from (anything counts)
    for its failure timeout."""

    name: str
    interval: float


@message(52)
@dataclass(frozen=True, slots=True)
class Resume:
    """A member whose controller connection ended connects again: its name and address,
    and where it stands, as a :class:`StageCommand` would say it (``stage`` a
    :class:`~ring.ownership.Stage` value; ``epoch``/``members`` the ring it is NORMAL on,
    or the previous ring while scaling; ``next_*`` the event's ring).  A controller that
    restarted learns the ring, the epoch and the stage back from these; one that knows the
    member takes it as a rejoin."""

    name: str
    address: str
    stage: str
    epoch: int
    members: MemberList
    next_epoch: int | None
    next_members: MemberList | None


# --- control-plane queries relayed to a member ----------------------------------------------


@message(53)
@dataclass(frozen=True, slots=True)
class Query:
    """A control-plane question for the application the members run (an NF's ``assets``,
    ``alerts``, ``table``, ``statistics``).  From an operator to the controller, which sends
    it on to one member (with its own ``request_id``).  ``target`` names the application
    (a member whose labels carry another ``nf`` declines); ``args`` are its arguments."""

    request_id: int
    target: str
    name: str
    args: dict[str, Any]


@message(54)
@dataclass(frozen=True, slots=True)
class QueryAnswer:
    """A member's answer to a :class:`Query` (relayed by the controller to the operator):
    ``ok`` with ``value``, or not with ``text`` saying why; ``declined`` when the member
    runs no such application (the controller then asks another).  ``member`` is who
    answered, ``epoch`` the ring it answered on."""

    request_id: int
    member: str
    epoch: int
    ok: bool
    declined: bool
    value: Any
    text: str
