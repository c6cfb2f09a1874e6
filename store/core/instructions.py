"""What goes into the node's two state machines, and what comes out.

The shell (``store.shell.node``, or a simulation) drives one node's core through a single
entry point, ``Router.handle(stimulus, now) -> list[Instruction]``:

* a **stimulus** is a batch of messages from a peer (:class:`Deliver`), or something this
  node's own API or shell asks for (:class:`Acquire`, :class:`Invoke`, :class:`Flush`,
  :class:`EnterStage`, ...).  Stimuli that expect an answer carry the
  :class:`~store.core.scheduler.Wait` the caller awaits;
* an **instruction** is what the shell must do with the outside world: send messages
  (:class:`Send`), settle a caller's Wait (:class:`Resolve`, :class:`Fail`), write a log
  line (:class:`Log`), or take note of a result (:class:`DrainProgress`,
  :class:`FlushTargets`).

Every instruction carries the **cause** of the work that produced it: ``(origin, req_id)``
of the request being served, the node and request id the wire already has.  Log lines and
error counters name it too, so one request can be followed across nodes.

Nothing here does I/O; these are plain records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from ring.ownership import NodeView
from store.core.objects import ClassInfo
from store.core.scheduler import Wait
from store.wire.messages import Message

__all__ = [
    "Acquire",
    "AskBarrier",
    "AskScan",
    "AskSnapshot",
    "Cause",
    "Deliver",
    "DrainProgress",
    "DrainStep",
    "EnterStage",
    "Fail",
    "Farewell",
    "Flush",
    "FlushCheck",
    "FlushTargets",
    "Instruction",
    "Invoke",
    "LetGo",
    "Locate",
    "Log",
    "RegisterMap",
    "Remove",
    "Repair",
    "Resolve",
    "Send",
    "Stimulus",
    "Undeliverable",
    "carry_out",
]

#: ``(origin node, request id)``: the request some work is done for (``None``: none).
Cause: TypeAlias = tuple[str, int] | None

K: TypeAlias = tuple[str, Any]  # (map name, key): one object's identity


# --- stimuli --------------------------------------------------------------------------------


@dataclass(slots=True)
class Deliver:
    """A batch of messages from node ``sender``, decoded and authenticated by the shell."""

    sender: str
    msgs: list[Message]


@dataclass(slots=True)
class RegisterMap:
    """Map ``name`` holds objects of ``info.cls`` on this node (``TypeError`` if it holds
    another class already)."""

    name: str
    info: ClassInfo


@dataclass(slots=True)
class Acquire:
    """A writable single-writer reference (the fast path found none).  ``wait`` resolves
    to ``(held, created)`` with ``held.refs`` already counting the caller.  ``args``: the
    constructor's arguments, if it creates."""

    k: K
    create: bool
    wait: Wait[Any]
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class Locate:
    """Where the object lives (created here if ``create`` and it is a missing multi-writer
    object).  ``wait`` resolves to ``(owner, created)``.  ``args``: the constructor's
    arguments, if it creates.  ``urgent`` False: nobody awaits ``wait`` (``Map.untethered``),
    so the question goes with the next timed flush rather than at once."""

    k: K
    create: bool
    wait: Wait[Any]
    args: tuple[Any, ...] = ()
    urgent: bool = True


@dataclass(slots=True)
class Remove:
    """Remove the object; ``wait`` resolves to whether one existed."""

    k: K
    wait: Wait[Any]


@dataclass(slots=True)
class LetGo:
    """The last local reference to ``k``'s held object was let go while another node waits
    for it (``ObjectLayer.let_go`` said so): hand it over."""

    k: K
    held: Any


@dataclass(slots=True)
class Invoke:
    """A method call that ``ObjectLayer.call_now`` could not answer at once: ship it (or
    wait for a fence first).  ``wait`` (None for an untethered call) gets the value."""

    k: K
    info: ClassInfo
    method: str
    args: tuple[Any, ...]
    owner: str
    wait: Wait[Any] | None


@dataclass(slots=True)
class Flush:
    """Seal every queued untethered batch (the flush timer).  With ``replicas``, also fold
    every replica into its owner (the merge interval); with ``targets``, answer with
    :class:`FlushTargets`: the nodes sent untethered updates since the last such Flush."""

    replicas: bool = False
    targets: bool = False


@dataclass(slots=True)
class FlushCheck:
    """The end of a flush, once every barrier was answered: ``wait`` resolves to None, or
    fails with :class:`~store.core.objects.UntetheredCallsFailed` if any untethered call
    (or fold) of this node failed since the last FlushCheck."""

    wait: Wait[Any]


@dataclass(slots=True)
class AskBarrier:
    """``wait`` resolves once ``node`` has applied everything this node sent it before."""

    node: str
    wait: Wait[Any]


@dataclass(slots=True)
class AskScan:
    """The existing keys of ``map`` whose records ``node`` holds, with their owners."""

    node: str
    map: str
    wait: Wait[Any]


@dataclass(slots=True)
class AskSnapshot:
    """The states of ``keys`` of ``map`` that ``node`` holds (None where it does not)."""

    node: str
    map: str
    keys: list[Any]
    wait: Wait[Any]


@dataclass(slots=True)
class Farewell:
    """This node left the ring: say goodbye to each of ``nodes``; ``waits[i]`` resolves
    when ``nodes[i]`` answered (it has sent this node nothing since)."""

    nodes: list[str]
    waits: list[Wait[Any]]


@dataclass(slots=True)
class Undeliverable:
    """The shell could not send ``msgs`` to ``to``, a node that left."""

    to: str
    msgs: list[Message]


@dataclass(slots=True)
class EnterStage:
    """The controller's new stage for this node (``store.shell.membership``)."""

    view: NodeView


@dataclass(slots=True)
class Repair:
    """A failure event: ``view`` is NORMAL on the repaired ring, which leaves ``dead`` out.
    ``wait`` resolves once this node's share of the key records is rebuilt (every
    survivor has reported what it holds).  ``paced``: the objects held here are reported
    a few at a time, by :class:`DrainStep` (as the drain of a scaling event is), instead of
    all at once."""

    view: NodeView
    dead: frozenset[str]
    wait: Wait[Any]
    paced: bool = False


@dataclass(slots=True)
class DrainStep:
    """Hand on up to ``limit`` key records (and, when leaving, objects) during SCALING;
    answered with :class:`DrainProgress`."""

    limit: int


Stimulus: TypeAlias = (
    Deliver
    | RegisterMap
    | Acquire
    | Locate
    | Remove
    | LetGo
    | Invoke
    | Flush
    | FlushCheck
    | AskBarrier
    | AskScan
    | AskSnapshot
    | Farewell
    | Undeliverable
    | EnterStage
    | Repair
    | DrainStep
)


# --- instructions ---------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """Send ``msgs`` to node ``to``, in order (one frame).  ``urgent`` False: it may wait
    for the untethered-flush timer."""

    to: str
    msgs: list[Message]
    urgent: bool
    cause: Cause


@dataclass(slots=True)
class Resolve:
    """Settle ``wait`` with ``value``."""

    wait: Wait[Any]
    value: Any
    cause: Cause


@dataclass(slots=True)
class Fail:
    """Settle ``wait`` with the failure ``error``."""

    wait: Wait[Any]
    error: BaseException
    cause: Cause


@dataclass(slots=True)
class Log:
    """Write one log line.  ``level`` is a ``logging`` level name; ``counter`` the error
    counter it was counted under, if any."""

    level: str
    text: str
    counter: str | None
    cause: Cause
    error: BaseException | None = None  # a bug's exception: logged with its traceback


@dataclass(slots=True)
class DrainProgress:
    """The answer to a :class:`DrainStep`: records and objects handed on by this step,
    whether records are still to be looked at (pace the next step), and whether the
    node's part of the event is done (every hand-on acknowledged)."""

    moved: int
    scanning: bool
    drained: bool
    cause: Cause = None


@dataclass(slots=True)
class FlushTargets:
    """The answer to ``Flush(targets=True)``: ask each of ``nodes`` for a barrier."""

    nodes: list[str]
    cause: Cause = None


Instruction: TypeAlias = Send | Resolve | Fail | Log | DrainProgress | FlushTargets


def carry_out(
    instructions: list[Instruction],
    send: Callable[[Send], None],
    log: Callable[[Log], None] | None = None,
) -> None:
    """What every driver of a core does with its answer: settle the Waits it names (this
    only moves waiting microthreads to ready, it runs none), and hand each :class:`Send`
    and :class:`Log` to the driver's own ``send`` and ``log``.  The results
    (:class:`DrainProgress`, :class:`FlushTargets`) are left to the caller."""
    for ins in instructions:
        if isinstance(ins, Send):
            send(ins)
        elif isinstance(ins, Resolve):
            ins.wait.resolve(ins.value)
        elif isinstance(ins, Fail):
            ins.wait.fail(ins.error)
        elif isinstance(ins, Log) and log is not None:
            log(ins)
