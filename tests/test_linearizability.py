"""Tests of the linearizability checker that the object-space tests rely on.

A checker that accepts too much hides store bugs and one that rejects too much sends people
chasing ghosts, so both directions are tested: hand-made histories for the classic traps,
Hypothesis-built linearizable histories that must pass, corrupted sequential ones that must
fail, and a brute-force oracle that agrees with the checker on small random histories.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linearizability import (
    ANY,
    NOT_FOUND,
    CheckTooExpensive,
    HistoryRecorder,
    NotLinearizable,
    Op,
    assert_linearizable,
    check_key,
    check_per_key,
    singlewriter_step,
)


def op(
    process: str,
    name: str,
    invoke: float,
    response: float | None,
    result: Any = None,
    arg: Any = None,
    key: Any = None,
) -> Op:
    """Terse constructor so that each history reads like a timeline."""
    return Op(
        process=process,
        name=name,
        arg=arg,
        result=result,
        invoke=invoke,
        response=response,
        key=key,
    )


def ok(ops: Sequence[Op]) -> bool:
    return check_key(ops).ok


# --------------------------------------------------------------------------- accepted


def test_empty_history_is_linearizable() -> None:
    assert ok([])


def test_sequential_lifecycle() -> None:
    assert ok(
        [
            op("a", "get", 0, 1, NOT_FOUND),
            op("a", "create", 2, 3, True, arg=10),
            op("a", "apply", 4, 5, 13, arg=3),
            op("b", "get", 6, 7, 13),
            op("b", "create", 8, 9, False, arg=0),
            op("b", "remove", 10, 11, True),
            op("a", "remove", 12, 13, False),
            op("a", "apply", 14, 15, NOT_FOUND, arg=1),
        ]
    )


@pytest.mark.parametrize("seen", [0, 5])
def test_read_overlapping_a_write_may_see_either_value(seen: int) -> None:
    assert ok(
        [
            op("a", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, 6, 5, arg=5),
            op("b", "get", 3, 4, seen),
        ]
    )


def test_overlapping_creates_one_wins() -> None:
    assert ok(
        [
            op("a", "create", 0, 4, False, arg=1),
            op("b", "create", 1, 3, True, arg=2),
            op("c", "get", 5, 6, 2),
        ]
    )


def test_order_can_differ_from_invocation_order() -> None:
    # b invoked later but took effect first: a's apply saw b's.
    assert ok(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, 10, 3, arg=1),
            op("b", "apply", 3, 4, 2, arg=2),
        ]
    )


def test_pending_operation_may_take_effect() -> None:
    # a's apply never returned, yet its effect is visible later.
    assert ok(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, None, arg=7),
            op("b", "get", 5, 6, 7),
        ]
    )


def test_pending_operation_may_never_take_effect() -> None:
    assert ok(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "remove", 2, None),
            op("b", "get", 5, 6, 0),
            op("b", "apply", 7, 8, 1, arg=1),
        ]
    )


def test_pending_operation_may_take_effect_late() -> None:
    # The pending remove lands between b's two gets, long after it was invoked.
    assert ok(
        [
            op("x", "create", 0, 1, True, arg=4),
            op("a", "remove", 2, None),
            op("b", "get", 5, 6, 4),
            op("b", "get", 7, 8, NOT_FOUND),
        ]
    )


def test_any_result_matches() -> None:
    assert ok(
        [
            op("x", "create", 0, 1, ANY, arg=0),
            op("x", "apply", 2, 3, ANY, arg=2),
            op("x", "get", 4, 5, 2),
        ]
    )


def test_touching_intervals_count_as_overlapping() -> None:
    # The get is invoked at the instant the apply returns; with one clock tick of
    # resolution either order is possible, so the checker must not insist on one.
    assert ok(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, 3, 1, arg=1),
            op("b", "get", 3, 4, 0),
        ]
    )


def test_keys_are_independent() -> None:
    # Interleaved in time, but each key alone is fine.
    history = [
        op("a", "create", 0, 1, True, arg=0, key="k1"),
        op("b", "create", 0.5, 1.5, True, arg=100, key="k2"),
        op("a", "apply", 2, 3, 1, arg=1, key="k1"),
        op("b", "get", 2.5, 3.5, 100, key="k2"),
        op("a", "get", 4, 5, 1, key="k1"),
    ]
    verdicts = assert_linearizable(history)
    assert set(verdicts) == {"k1", "k2"}
    assert [o.name for o in verdicts["k1"].order] == ["create", "apply", "get"]


def test_custom_model() -> None:
    """Any pure step function works: here a plain register with write/read."""

    def register(state: Any, o: Op) -> tuple[Any, Any]:
        return (o.arg, None) if o.name == "write" else (state, state)

    history = [
        op("a", "write", 0, 3, None, arg=1),
        op("b", "read", 1, 2, 1),
        op("c", "read", 4, 5, 1),
    ]
    assert check_key(history, register, 0).ok
    stale = [*history, op("c", "read", 6, 7, 0)]
    assert not check_key(stale, register, 0).ok


def test_recorder_builds_histories() -> None:
    rec = HistoryRecorder()
    h1 = rec.invoke("n1", "create", 5, key="flow", at=0.0)
    h2 = rec.invoke("n2", "get", key="flow", at=0.5)
    rec.respond(h1, True, at=1.0)
    rec.respond(h2, 5, at=1.5)
    rec.invoke("n3", "remove", key="flow", at=2.0)  # never returns
    ops = rec.ops
    assert ops[2].response is None and ops[0].result is True
    assert_linearizable(ops)
    with pytest.raises(ValueError, match="already responded"):
        rec.respond(h1, True, at=3.0)


# --------------------------------------------------------------------------- rejected


def rejected(ops: Sequence[Op]) -> str:
    verdict = check_key(ops)
    assert not verdict.ok
    assert verdict.culprit is not None
    return verdict.report


def test_stale_read_after_completed_write() -> None:
    report = rejected(
        [
            op("a", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, 3, 5, arg=5),
            op("b", "get", 4, 5, 0),
        ]
    )
    assert "#2 b get() -> 0" in report
    assert "model says it returns: 5" in report


def test_lost_update() -> None:
    rejected(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, 5, 1, arg=1),
            op("b", "apply", 3, 6, 1, arg=1),
        ]
    )


def test_lost_update_seen_by_a_later_read() -> None:
    rejected(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, 5, ANY, arg=1),
            op("b", "apply", 3, 6, ANY, arg=1),
            op("c", "get", 7, 8, 1),
        ]
    )


def test_read_after_completed_remove_sees_value() -> None:
    rejected(
        [
            op("x", "create", 0, 1, True, arg=3),
            op("a", "remove", 2, 3, True),
            op("b", "get", 4, 5, 3),
        ]
    )


@pytest.mark.parametrize("overlapping", [False, True])
def test_two_creates_both_created(overlapping: bool) -> None:
    second = 0.5 if overlapping else 2
    report = rejected(
        [
            op("a", "create", 0, 1, True, arg=0),
            op("b", "create", second, second + 1, True, arg=0),
        ]
    )
    assert "False" in report  # the model says the second one must report "not created"


def test_new_old_inversion() -> None:
    # b saw the new value and finished; c started after and saw the old one.
    rejected(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "apply", 2, 10, 1, arg=1),
            op("b", "get", 3, 4, 1),
            op("c", "get", 5, 6, 0),
        ]
    )


def test_effect_before_invocation() -> None:
    # A pending apply cannot explain a value read before it was even invoked.
    rejected(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("b", "get", 2, 3, 7),
            op("a", "apply", 4, None, arg=7),
        ]
    )


def test_bool_is_not_an_int() -> None:
    # remove() must say True, not 1: a harness bug of that kind should not hide.
    rejected(
        [
            op("x", "create", 0, 1, True, arg=0),
            op("a", "remove", 2, 3, 1),
        ]
    )


def test_report_numbers_ops_by_position_in_the_full_history() -> None:
    history = [
        op("a", "create", 0, 1, True, arg=0, key="good"),
        op("a", "create", 0, 1, True, arg=0, key="bad"),
        op("b", "get", 2, 3, 0, key="good"),
        op("b", "apply", 2, 3, 1, arg=1, key="bad"),
        op("c", "get", 4, 5, 0, key="bad"),
    ]
    verdicts = check_per_key(history)
    assert verdicts["good"].ok and not verdicts["bad"].ok
    with pytest.raises(NotLinearizable) as info:
        assert_linearizable(history)
    message = str(info.value)
    assert "1 of 2 keys" in message
    assert "key 'bad'" in message
    assert "#4 c get() -> 0" in message
    assert "#3 b apply(1) -> 1" in message  # shown in the valid order before it


def test_returned_before_invoked_is_an_input_error() -> None:
    with pytest.raises(ValueError, match="returned before it was invoked"):
        check_key([op("a", "get", 2, 1, NOT_FOUND)])


def test_unknown_operation_is_an_input_error() -> None:
    with pytest.raises(ValueError, match="unknown operation 'put'"):
        check_key([op("a", "put", 0, 1, None)])


def test_many_unanswered_reads_stay_cheap() -> None:
    # A client that died with 40 gets outstanding must not make the search try every
    # subset of them: reads that never returned are never needed.
    history = [op("x", "create", 0, 1, True, arg=0)]
    history += [op(f"dead{i}", "get", 2, None) for i in range(40)]
    history += [op("a", "apply", 3 + i, 3.5 + i, i + 1, arg=1) for i in range(200)]
    assert check_key(history, budget=50_000).ok


def test_budget_stops_a_runaway_search() -> None:
    history = [op(f"p{i}", "apply", 0, 10, ANY, arg=1) for i in range(12)]
    history.insert(0, op("x", "create", -2, -1, True, arg=0))
    history.append(op("z", "get", 11, 12, -1))  # unsatisfiable: forces a full search
    with pytest.raises(CheckTooExpensive):
        check_key(history, budget=1000)


# --------------------------------------------------------------------------- generated

NAMES = ("create", "get", "apply", "remove")


@st.composite
def sequential_runs(draw: st.DrawFn, max_ops: int = 30) -> list[tuple[str, Any, Any, Any]]:
    """A random sequential execution: (key, name, arg, result) in linearization order."""
    n = draw(st.integers(0, max_ops))
    keys = draw(st.integers(1, 3))
    states: dict[Any, Any] = {}
    run = []
    for _ in range(n):
        key = f"k{draw(st.integers(0, keys - 1))}"
        name = draw(st.sampled_from(NAMES))
        arg = draw(st.integers(-3, 3)) if name in ("create", "apply") else None
        probe = Op(process="", name=name, arg=arg, invoke=0.0)
        states[key], result = singlewriter_step(states.get(key, NOT_FOUND), probe)
        run.append((key, name, arg, result))
    return run


@st.composite
def linearizable_histories(draw: st.DrawFn) -> list[Op]:
    """Give the i-th operation of a sequential run the linearization point i, then widen
    its interval randomly around that point.  Every interval still contains its point, so
    the points' order is a witness: the history is linearizable by construction.  Some
    calls lose their response (pending) or their recorded result (ANY)."""
    run = draw(sequential_runs())
    width = draw(st.sampled_from([0.0, 0.4, 1.5, 3.0]))
    ops = []
    for i, (key, name, arg, result) in enumerate(run):
        before = draw(st.floats(0, width))
        after = draw(st.floats(0, width))
        fate = draw(st.sampled_from(["ok"] * 8 + ["pending", "any"]))
        ops.append(
            Op(
                process=f"c{i % 6}",
                name=name,
                arg=arg,
                result=ANY if fate == "any" else result,
                invoke=i - before,
                response=None if fate == "pending" else i + after,
                key=key,
            )
        )
    draw(st.randoms(use_true_random=False)).shuffle(ops)  # input order must not matter
    return ops


@settings(max_examples=300, deadline=None)
@given(linearizable_histories())
def test_widened_sequential_runs_are_accepted(history: list[Op]) -> None:
    assert_linearizable(history)


@settings(max_examples=200, deadline=None)
@given(sequential_runs(), st.data())
def test_a_corrupted_sequential_run_is_rejected(
    run: list[tuple[str, Any, Any, Any]], data: st.DataObject
) -> None:
    """With disjoint intervals there is exactly one candidate order, so changing any one
    result must be caught, and blamed on exactly that operation."""
    if not run:
        return
    victim = data.draw(st.integers(0, len(run) - 1))
    key, _, _, result = run[victim]
    wrong = data.draw(
        st.sampled_from([True, False, NOT_FOUND, -1, 0, 1, 2, 99]).filter(
            lambda r: not (type(r) is type(result) and r == result)
        )
    )
    ops = [
        Op(
            process="c",
            name=n,
            arg=a,
            result=wrong if i == victim else r,
            invoke=float(i),
            response=i + 0.5,
            key=k,
        )
        for i, (k, n, a, r) in enumerate(run)
    ]
    verdict = check_per_key(ops)[key]
    assert not verdict.ok
    assert verdict.culprit is ops[victim]


def brute_force(ops: Sequence[Op]) -> bool:
    """The definition, spelled out: some subset of the pending calls plus all completed
    ones, in some order that respects real time, replays to the observed results."""
    done = [i for i, o in enumerate(ops) if o.completed]
    pending = [i for i, o in enumerate(ops) if not o.completed]

    def same(expected: Any, observed: Any) -> bool:
        return observed is ANY or (type(expected) is type(observed) and expected == observed)

    def precedes(x: Op, y: Op) -> bool:  # x returned strictly before y was invoked
        return x.response is not None and x.response < y.invoke

    for r in range(len(pending) + 1):
        for extra in itertools.combinations(pending, r):
            for order in itertools.permutations(done + list(extra)):
                if any(
                    precedes(ops[b], ops[a]) for x, a in enumerate(order) for b in order[x + 1 :]
                ):
                    continue
                state: Any = NOT_FOUND
                for i in order:
                    state, expected = singlewriter_step(state, ops[i])
                    if ops[i].completed and not same(expected, ops[i].result):
                        break
                else:
                    return True
    return False


@st.composite
def small_random_histories(draw: st.DrawFn) -> list[Op]:
    """Arbitrary small histories on an integer time grid (so that ties happen), with
    results drawn from a small domain so that both verdicts come up often."""
    n = draw(st.integers(1, 6))
    ops = []
    for i in range(n):
        name = draw(st.sampled_from(NAMES))
        invoke = draw(st.integers(0, 8))
        response = draw(st.none() | st.integers(invoke, 10))
        arg: Any
        result: Any
        if name == "create":
            arg, result = draw(st.integers(0, 1)), draw(st.booleans())
        elif name == "remove":
            arg, result = None, draw(st.booleans())
        else:
            arg = 1 if name == "apply" else None
            result = draw(st.sampled_from([NOT_FOUND, 0, 1, 2]))
        ops.append(
            Op(process=f"p{i}", name=name, arg=arg, result=result, invoke=invoke, response=response)
        )
    return ops


@settings(max_examples=400, deadline=None)
@given(small_random_histories())
def test_agrees_with_brute_force(history: list[Op]) -> None:
    assert check_key(history).ok == brute_force(history)


def cut(history: Sequence[Op], t: float, unanswered: Op | None = None) -> list[Op]:
    """The history as it stood at time ``t``: calls not yet made are dropped, calls not yet
    returned (and ``unanswered``) lose their response."""
    out = []
    for o in history:
        if o.invoke > t:
            continue
        if o is unanswered or (o.response is not None and o.response > t):
            o = Op(process=o.process, name=o.name, arg=o.arg, invoke=o.invoke, key=o.key)
        out.append(o)
    return out


@settings(max_examples=300, deadline=None)
@given(small_random_histories())
def test_culprit_closes_the_shortest_failing_prefix(history: list[Op]) -> None:
    """The report blames the return at which the history stops being explainable: just
    before it everything is fine, with it nothing is (checked against the definition)."""
    # Distinct times, so that "the history at the culprit's return" is unambiguous.
    history = [
        Op(
            process=o.process,
            name=o.name,
            arg=o.arg,
            result=o.result,
            invoke=o.invoke + 0.01 * i,
            response=None if o.response is None else o.response + 0.01 * i + 0.005,
        )
        for i, o in enumerate(history)
    ]
    verdict = check_key(history)
    if verdict.ok:
        return
    culprit = verdict.culprit
    assert culprit is not None and culprit.response is not None
    assert not brute_force(cut(history, culprit.response))
    assert brute_force(cut(history, culprit.response, unanswered=culprit))


# --------------------------------------------------------------------------- scale


def concurrent_history(n: int, processes: int, seed: int, unanswered: int = 0) -> list[Op]:
    """``processes`` clients, each issuing one call at a time with random durations; each
    call takes effect at a random instant inside its interval.  ``unanswered`` calls never
    return; half of those take effect anyway (the reply was lost), half never do."""
    rng = random.Random(seed)
    free_at = [0.0] * processes
    calls = []
    for _ in range(n):
        p = rng.randrange(processes)
        invoke = free_at[p] + rng.random() * 0.5
        response = invoke + rng.random() * 3
        free_at[p] = response
        name = rng.choice(["get", "get", "apply", "apply", "create", "remove"])
        arg = rng.randint(1, 3) if name == "apply" else (0 if name == "create" else None)
        calls.append((rng.uniform(invoke, response), p, name, arg, invoke, response))
    calls.sort()
    lost = set(rng.sample(range(n), unanswered))
    state: Any = NOT_FOUND
    ops = []
    for j, (_, p, name, arg, invoke, response) in enumerate(calls):
        o = Op(process=f"p{p}", name=name, arg=arg, invoke=invoke, response=response)
        if j in lost:
            if rng.random() < 0.5:
                state, _ = singlewriter_step(state, o)
            ops.append(Op(process=o.process, name=name, arg=arg, invoke=invoke))
            continue
        state, result = singlewriter_step(state, o)
        ops.append(
            Op(
                process=o.process,
                name=name,
                arg=arg,
                invoke=invoke,
                response=response,
                result=result,
            )
        )
    return ops


def corrupt_a_read(history: list[Op], start: int) -> Op:
    """Make the first answered get from ``start`` on return an impossible value."""
    j = next(
        i for i in range(start, len(history)) if history[i].name == "get" and history[i].completed
    )
    o = history[j]
    history[j] = Op(process=o.process, name="get", invoke=o.invoke, response=o.response, result=-1)
    return history[j]


@pytest.mark.parametrize("unanswered", [0, 10])
def test_thousands_of_ops_with_six_processes(unanswered: int) -> None:
    history = concurrent_history(3000, 6, seed=7, unanswered=unanswered)
    assert check_key(history).ok
    # Break one read in the middle: still found, and blamed on that read.
    bad = corrupt_a_read(history, 1500)
    verdict = check_key(history)
    assert not verdict.ok
    assert verdict.culprit is bad
