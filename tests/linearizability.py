"""A per-key linearizability checker for the object-space tests.

The object space promises linearizability per key (paper §8.1: "ordering amongst writes to a
single object").  Linearizability is *local* (Herlihy & Wing): a history is linearizable iff
the sub-history of every object is.  So we never search the whole history at once; we split it
by key and check each key alone, which keeps every search small.

How one key is checked
----------------------
A history is a set of operations, each with the time it was invoked, the time it returned
(or none, if it never returned) and the result it returned.  It is linearizable iff there is
a total order of the operations that (a) respects real time: if A returned before B was
invoked, A comes first, and (b) is a legal run of the sequential specification: replaying the
operations in that order through ``step`` yields exactly the observed results.  Operations
that never returned may take effect at any point after their invocation, or not at all.

The search is the classic Wing & Gong backtracking, with the improvements Lowe and later Horn
(porcupine) made popular:

* the call and return events sit in a time-ordered doubly linked list.  Only an operation
  whose call comes before the first remaining return event may go next: that single scan is
  the whole real-time pruning.  Linearizing an operation unlinks its two events in O(1) and
  backtracking links them back (dancing links);
* every configuration reached is remembered as (set of linearized operations, model state);
  arriving at one already seen means its whole subtree was already explored, so we skip it.
  With a handful of concurrent processes this bounds the work to roughly (number of
  operations) x 2^(concurrency) x (distinct states), instead of factorial;
* the search succeeds as soon as every *completed* operation is linearized: pending ones can
  always be left out.

Our additions, all for calls that never returned (without them each such call doubles the
configurations a failing search must visit): a configuration is also skipped when it used a
superset of the pending calls used by one already seen with the same completed set and
state; a pending call is never tried where it would not change the state; and identical
pending calls are only ever used earliest first.

Cost: a history that passes is checked in roughly linear time (3000 operations from 6
processes: tens of milliseconds).  A failing one needs a few exhaustive searches up to the
failure point (well under a second for the same size).  Calls that never returned are what
makes failing searches expensive, since each may take effect in any later state: a few per
key cost little, a few dozen can cost seconds, hundreds may exhaust the ``budget`` (then
:class:`CheckTooExpensive`, which is not a verdict).

When a key fails, we look for the shortest failing prefix of its event sequence
(linearizable histories are prefix-closed, so failure is monotone in the prefix length; the
failed search already tells how far it got, so a short gallop and bisection from there find
it) and report the operation whose return closes that prefix, the results the model would
have allowed it, the operations overlapping it and a valid order of everything before it.
That tells a reader *where* the history went wrong instead of dumping thousands of operations.

Clocks: all times must come from one clock (the test harness's, e.g. ``trio.current_time()``
read by the client around each call); times from different machines' monotonic clocks do not
compare.  Equal times count as overlapping, which can only make the checker more lenient.

Feeding it
----------
Record operations with :class:`HistoryRecorder` (``invoke`` before the call, ``respond``
after it, nothing for a call that never returned), or build :class:`Op` values yourself, then
call :func:`assert_linearizable` (raises with a report) or :func:`check_per_key` /
:func:`check_key` (return verdicts).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ANY",
    "NOT_FOUND",
    "CheckTooExpensive",
    "HistoryRecorder",
    "NotLinearizable",
    "Op",
    "Step",
    "Verdict",
    "assert_linearizable",
    "check_key",
    "check_per_key",
    "singlewriter_step",
]


class _Marker(enum.Enum):
    """Singleton markers: enum members survive copy/pickle as themselves and hash cheaply."""

    NOT_FOUND = "NOT_FOUND"
    ANY = "ANY"

    def __repr__(self) -> str:
        return self.value


NOT_FOUND: Final = _Marker.NOT_FOUND
"""What ``get`` returns for an absent object, and the model state of an absent object."""

ANY: Final = _Marker.ANY
"""An observed result that matches anything: use it when the call returned but its result
was not recorded (the operation still took effect before it returned, unlike a pending one)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One operation as a client saw it.

    ``response`` is None when the call never returned (timed out, the client died): such an
    operation may have taken effect at any time after ``invoke``, or never, and its
    ``result`` is ignored.  ``key`` is only used to split a multi-key history.
    """

    process: Hashable
    name: str
    arg: Any = None
    result: Any = None
    invoke: float
    response: float | None = None
    key: Hashable = None

    @property
    def completed(self) -> bool:
        """Whether the call returned (so its result must be explained)."""
        return self.response is not None

    def describe(self) -> str:
        """One readable line: ``p2 get() -> 3  [1.250000 .. 1.400000]``."""
        arg = "" if self.arg is None else repr(self.arg)
        if self.response is None:
            return f"{self.process} {self.name}({arg}) -> (no response)  [{self.invoke:.6f} .. ]"
        return (
            f"{self.process} {self.name}({arg}) -> {self.result!r}  "
            f"[{self.invoke:.6f} .. {self.response:.6f}]"
        )


Step = Callable[[Any, Op], tuple[Any, Any]]
"""A sequential specification: ``step(state, op) -> (new_state, expected_result)``.

It must be pure, must look only at ``op.name`` and ``op.arg`` (the checker treats calls that
agree on those as interchangeable; put a caller's identity in ``arg`` if the model needs it),
and its states must be hashable and comparable with ``==`` (they are memoized)."""


def singlewriter_step(state: Any, op: Op) -> tuple[Any, Any]:
    """Sequential model of one SingleWriter key holding a counter.

    The state is the counter's value, or :data:`NOT_FOUND` when the object is absent (so the
    state is exactly what ``get`` would return).  Operations:

    * ``create(initial)``: creates the object with counter ``initial`` if absent; returns
      whether it created (an existing object is left untouched);
    * ``get()``: returns the counter, or ``NOT_FOUND``;
    * ``apply(delta)``: adds ``delta`` and returns the new counter, or ``NOT_FOUND`` if
      absent (returning the new value lets a history reveal a lost update even without gets;
      record ``ANY`` if your harness does not see it);
    * ``remove()``: deletes the object; returns whether there was one.
    """
    name = op.name
    if name == "get":
        return state, state
    if name == "apply":
        if state is NOT_FOUND:
            return state, NOT_FOUND
        new = state + op.arg
        return new, new
    if name == "create":
        if state is NOT_FOUND:
            return op.arg, True
        return state, False
    if name == "remove":
        return NOT_FOUND, state is not NOT_FOUND
    raise ValueError(f"singlewriter_step: unknown operation {name!r} in {op.describe()}")


class NotLinearizable(AssertionError):
    """A history the model cannot explain.  The message is the readable report."""


class CheckTooExpensive(RuntimeError):
    """The search exceeded its step budget: the history is too concurrent to check (this is
    the checker's limit, not a verdict on the system under test)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome for one key.

    On success ``order`` is one valid linearization (operations that never returned and
    were not needed are left out).  On failure ``culprit`` is the operation whose return
    makes the shortest prefix fail and ``report`` explains it.
    """

    key: Hashable
    ok: bool
    order: tuple[Op, ...] = ()
    culprit: Op | None = None
    report: str = ""


def _matches(expected: Any, observed: Any) -> bool:
    """Result equality that does not let ``True == 1`` pass for a counter of 1."""
    if observed is ANY:
        return True
    if isinstance(expected, bool) or isinstance(observed, bool):
        return type(expected) is type(observed) and expected == observed
    return bool(expected == observed)


_CALL: Final = 0
_RETURN: Final = 1


@dataclass(slots=True)
class _Outcome:
    """What one search of a prefix found."""

    ok: bool
    order: list[tuple[int, Any]]  # (op index, state after it) in linearization order
    allowed: list[tuple[Any, Any]]  # (state, expected result) wherever `watched` was tried
    deepest: int  # prefix length (in events) that some explored configuration fully explains


class _KeyHistory:
    """The operations of one key and their events sorted by time (calls before returns on
    ties, so touching intervals count as overlapping)."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = ops
        events: list[tuple[float, int, int]] = []
        for i, op in enumerate(ops):
            if op.response is not None and op.response < op.invoke:
                raise ValueError(f"operation returned before it was invoked: {op.describe()}")
            events.append((op.invoke, _CALL, i))
            if op.response is not None:
                events.append((op.response, _RETURN, i))
        events.sort()
        self.events = events

    def search(self, k: int, step: Step, init: Any, budget: int | None) -> _Outcome:
        """Depth-first search for a linearization of the first ``k`` events.

        Operations that return within the prefix have both events in a doubly linked list
        (node n is event n-1; node 0 is the head, node k+1 the tail).  The candidates at
        any point are the calls before the first remaining return.

        Operations still pending at the end of the prefix stay out of that list: they
        never block anyone, so all that matters is whether they were invoked before that
        first return.  They are grouped into classes of interchangeable calls (same
        name and argument): only the earliest unused member of a class is ever
        tried, which makes a pile of identical unanswered calls cost one candidate instead
        of one per call and one configuration per subset.  A pending call is also never
        tried where it would leave the state unchanged: leaving it out does as well.

        Two by-products serve the failure report.  ``deepest``: the longest prefix that
        some configuration explained (all its returns linearized), which is known to be
        linearizable.  ``allowed``: if the prefix ends with a return, every (state,
        expected result) in which that operation was tried; when the search fails, it has
        tried every state it could take effect in.
        """
        ops = self.ops
        events = self.events[:k]
        tail = k + 1
        ret_node = {i: node for node, (_, kind, i) in enumerate(events, 1) if kind == _RETURN}
        op_of = [-1] * (k + 2)
        is_ret = [False] * (k + 2)
        is_ret[tail] = True  # the tail bounds the scan like a return would
        linked = [0]
        classes: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        for node, (_, kind, i) in enumerate(events, 1):
            op_of[node] = i
            if i in ret_node:
                linked.append(node)
                is_ret[node] = kind == _RETURN
            else:
                classes.setdefault(_interchangeable(ops[i], i), []).append((node, i))
        linked.append(tail)
        nxt = [0] * (k + 2)
        prv = [0] * (k + 2)
        for a, b in itertools.pairwise(linked):
            nxt[a], prv[b] = b, a
        members = list(classes.values())  # each in event order
        used = [0] * len(members)  # how many of each class are linearized (the earliest)

        deepest = 0

        def candidates() -> list[int]:
            """Linked call nodes (> 0) in order of invocation, then pending classes
            (-1 - class).  Trying calls in the order they were made finds the usual,
            nearly sequential, linearization with little backtracking; trying pending
            calls last explores the configurations that spend fewer of them first, so the
            memo can discard the ones that spend more (measured: about half the work)."""
            nonlocal deepest
            ready = []
            node = nxt[0]
            while not is_ret[node]:
                ready.append(node)
                node = nxt[node]
            deepest = max(deepest, node - 1)  # every event before `node` is explained
            waiting = [
                (group[used[c]][0], -1 - c)
                for c, group in enumerate(members)
                if used[c] < len(group) and group[used[c]][0] < node
            ]
            if not waiting:
                return ready
            waiting.sort()
            return ready + [cand for _, cand in waiting]

        remaining = len(ret_node)  # returned within the prefix, not yet linearized
        if remaining == 0:
            return _Outcome(True, [], [], k)
        watched = events[-1][2] if events[-1][1] == _RETURN else -1
        # Memo: (completed ops linearized, state) -> the sets of pending ops used on the
        # way there, kept minimal.  A configuration that used a superset of pending ops of
        # one already seen can do nothing the earlier one could not (the earlier one may
        # use the same pending calls later, or never), so it is skipped.
        seen: dict[tuple[int, Any], list[int]] = {}
        # One frame per linearized op: (candidates, next index, candidate, op, state before)
        stack: list[tuple[list[int], int, int, int, Any]] = []
        allowed: list[tuple[Any, Any]] = []
        done = 0  # bit i: completed op i is linearized
        spent = 0  # bit i: pending op i is linearized
        state = init
        cands = candidates()
        at = 0
        steps = 0
        while True:
            steps += 1
            if budget is not None and steps > budget:
                raise CheckTooExpensive(
                    f"gave up after {budget} search steps on {len(ops)} operations of one "
                    "key (too many overlapping or unanswered calls); raise `budget` or "
                    "check a shorter history"
                )
            if at == len(cands):
                # Every candidate here fails: undo the last choice and try its next sibling.
                if not stack:
                    return _Outcome(False, [], allowed, deepest)
                cands, at, cand, i, state = stack.pop()
                if cand > 0:
                    done &= ~(1 << i)
                    r = ret_node[i]
                    nxt[prv[r]] = prv[nxt[r]] = r
                    nxt[prv[cand]] = prv[nxt[cand]] = cand
                    remaining += 1
                else:
                    spent &= ~(1 << i)
                    used[-1 - cand] -= 1
                continue
            cand = cands[at]
            at += 1
            i = op_of[cand] if cand > 0 else members[-1 - cand][used[-1 - cand]][1]
            new_state, expected = step(state, ops[i])
            if cand > 0:
                if i == watched and (state, expected) not in allowed:
                    allowed.append((state, expected))
                if not _matches(expected, ops[i].result):
                    continue
            elif new_state == state:
                continue
            new_done, new_spent = (done | 1 << i, spent) if cand > 0 else (done, spent | 1 << i)
            earlier = seen.setdefault((new_done, new_state), [])
            if any(old & ~new_spent == 0 for old in earlier):
                continue
            earlier[:] = [old for old in earlier if new_spent & ~old] + [new_spent]
            stack.append((cands, at, cand, i, state))
            done, spent = new_done, new_spent
            state = new_state
            if cand > 0:
                # Unlink the call, then its return; backtracking relinks in reverse order.
                r = ret_node[i]
                nxt[prv[cand]], prv[nxt[cand]] = nxt[cand], prv[cand]
                nxt[prv[r]], prv[nxt[r]] = nxt[r], prv[r]
                remaining -= 1
                if remaining == 0:
                    order = [
                        (frame[3], after)
                        for frame, after in zip(stack, _afters(stack, state), strict=True)
                    ]
                    return _Outcome(True, order, allowed, k)
            else:
                used[-1 - cand] += 1
            cands = candidates()
            at = 0


def _afters(stack: list[tuple[list[int], int, int, int, Any]], final: Any) -> list[Any]:
    """The state after each step of a search path: each frame holds the state *before*
    its op, so the state after op j is the one before op j+1, and the last is ``final``."""
    return [frame[4] for frame in stack[1:]] + [final]


def _interchangeable(op: Op, i: int) -> tuple[Any, ...]:
    """Pending calls with the same class key have the same effect from every state, since a
    :data:`Step` only looks at the name and the argument.  Unhashable arguments get a class
    of their own."""
    try:
        hash(op.arg)
    except TypeError:
        return ("unique", i)
    return ("same", op.name, type(op.arg), op.arg)  # the type keeps apply(True) != apply(1)


_SHOW_BEFORE: Final = 12
_SHOW_ALLOWED: Final = 8


def check_key(
    ops: Sequence[Op],
    step: Step = singlewriter_step,
    init: Any = NOT_FOUND,
    *,
    key: Hashable = None,
    labels: Sequence[int] | None = None,
    budget: int | None = 10_000_000,
) -> Verdict:
    """Check the history of ONE key against the model ``step`` starting from ``init``.

    ``labels`` are the numbers printed as ``#n`` in reports (by default the position in
    ``ops``; :func:`check_per_key` passes the position in the caller's full history).
    ``budget`` caps the search steps so a pathological history fails loudly instead of
    hanging a test run; None removes the cap.
    """
    hist = _KeyHistory(ops)
    n = len(hist.events)
    full = hist.search(n, step, init, budget)
    if full.ok:
        return Verdict(key, True, tuple(ops[i] for i, _ in full.order))

    # Shortest failing prefix.  Failure is monotone in the prefix length, and the failed
    # search already proved the prefix of `deepest` events linearizable; the culprit is
    # almost always the very next return.  So gallop forward from there, then bisect.
    lo, hi, failed = full.deepest, n, full
    k, stride = lo + 1, 1
    while k < hi:
        probe = hist.search(k, step, init, budget)
        if not probe.ok:
            hi, failed = k, probe
            break
        lo, k, stride = k, k + stride, stride * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probe = hist.search(mid, step, init, budget)
        if probe.ok:
            lo = mid
        else:
            hi, failed = mid, probe
    _, kind, culprit = hist.events[hi - 1]
    assert kind == _RETURN, "a prefix can only start failing at a return event"
    before = hist.search(hi - 1, step, init, budget)
    report = _report(key, ops, labels, hist, hi, culprit, before.order, failed.allowed)
    return Verdict(key, False, culprit=ops[culprit], report=report)


def _report(
    key: Hashable,
    ops: Sequence[Op],
    labels: Sequence[int] | None,
    hist: _KeyHistory,
    prefix: int,
    culprit: int,
    order: list[tuple[int, Any]],
    allowed: list[tuple[Any, Any]],
) -> str:
    """Render the failure so that a reader sees the one operation that cannot be explained
    and just enough context to see why."""
    # Inside the failing prefix, operations that return later are still running: their
    # results played no part, so say so instead of printing a result that was not checked.
    returned = {i for _, kind, i in hist.events[: prefix - 1] if kind == _RETURN}

    def line(i: int) -> str:
        label = labels[i] if labels is not None else i
        text = f"#{label} {ops[i].describe()}"
        if i != culprit and ops[i].completed and i not in returned:
            text += "  (returns later; result not used here)"
        return text

    bad = ops[culprit]
    assert bad.response is not None
    processes = {op.process for op in ops}
    out = [
        f"key {key!r}: history is not linearizable "
        f"({len(ops)} operations from {len(processes)} processes).",
        f"It first breaks when this operation returns (shortest failing prefix: "
        f"{prefix} of {len(hist.events)} events):",
        f"  {line(culprit)}",
    ]
    if allowed:
        shown = ", ".join(f"{exp!r} (object state {st!r})" for st, exp in allowed[:_SHOW_ALLOWED])
        more = " ..." if len(allowed) > _SHOW_ALLOWED else ""
        out.append(f"Wherever it could take effect, the model says it returns: {shown}{more}")
    else:
        out.append("No valid order of the other operations leaves room for it at all.")
    overlapping = [
        i
        for i, op in enumerate(ops)
        if i != culprit
        and op.invoke <= bad.response
        and (op.response is None or op.response >= bad.invoke)
    ]
    if overlapping:
        out.append("Operations overlapping it in time (they may take effect in either order):")
        out.extend(f"  {line(i)}" for i in overlapping)
    if order:
        tail = order[-_SHOW_BEFORE:]
        skipped = len(order) - len(tail)
        out.append(
            "A valid order of everything up to just before that return"
            + (f" (last {len(tail)} of {len(order)} steps)" if skipped else "")
            + ", with the object state after each step:"
        )
        out.extend(
            f"  {line(i) if i != culprit else line(i) + '  (its result ignored)'}   => {st!r}"
            for i, st in tail
        )
    else:
        out.append("Nothing had to take effect before it.")
    return "\n".join(out)


def check_per_key(
    ops: Iterable[Op],
    step: Step = singlewriter_step,
    init: Any = NOT_FOUND,
    *,
    budget: int | None = 10_000_000,
) -> dict[Hashable, Verdict]:
    """Split a multi-key history by ``Op.key`` and check each key on its own.

    Per-key linearizability is what the object space promises, and by locality it makes
    the whole history linearizable.  Reports number operations by their position in ``ops``.
    """
    groups: dict[Hashable, tuple[list[Op], list[int]]] = {}
    for pos, op in enumerate(ops):
        group = groups.setdefault(op.key, ([], []))
        group[0].append(op)
        group[1].append(pos)
    return {
        key: check_key(key_ops, step, init, key=key, labels=positions, budget=budget)
        for key, (key_ops, positions) in groups.items()
    }


def assert_linearizable(
    ops: Iterable[Op],
    step: Step = singlewriter_step,
    init: Any = NOT_FOUND,
    *,
    budget: int | None = 10_000_000,
) -> dict[Hashable, Verdict]:
    """Check every key of ``ops``; raise :class:`NotLinearizable` listing each failing key's
    report, otherwise return the verdicts (each with a witness order)."""
    verdicts = check_per_key(ops, step, init, budget=budget)
    failed = [v for v in verdicts.values() if not v.ok]
    if failed:
        raise NotLinearizable(
            f"{len(failed)} of {len(verdicts)} keys are not linearizable\n\n"
            + "\n\n".join(v.report for v in failed)
        )
    return verdicts


class HistoryRecorder:
    """Collects operations as a test harness issues them.

    Call :meth:`invoke` just before the operation starts and :meth:`respond` just after it
    returns, passing the harness clock's time (``trio.current_time()`` in simulated runs;
    the recorder reads no clock itself).  An operation never responded to stays pending.
    """

    def __init__(self) -> None:
        self._ops: list[Op] = []

    def invoke(
        self, process: Hashable, name: str, arg: Any = None, *, key: Hashable = None, at: float
    ) -> int:
        """Record a call; returns the handle to pass to :meth:`respond`."""
        self._ops.append(Op(process=process, name=name, arg=arg, invoke=at, key=key))
        return len(self._ops) - 1

    def respond(self, handle: int, result: Any, *, at: float) -> None:
        """Record that the call ``handle`` returned ``result`` at time ``at``."""
        op = self._ops[handle]
        if op.response is not None:
            raise ValueError(f"operation #{handle} already responded: {op.describe()}")
        self._ops[handle] = Op(
            process=op.process,
            name=op.name,
            arg=op.arg,
            result=result,
            invoke=op.invoke,
            response=at,
            key=op.key,
        )

    @property
    def ops(self) -> list[Op]:
        """The history so far, in invocation order (a copy)."""
        return list(self._ops)
