"""``store.wire.errors``: whose fault each error counter is, and the exception-group helpers."""

from __future__ import annotations

import pytest
import trio

from store.wire.errors import (
    PeerUnavailable,
    bug_counter,
    classify,
    first_leaf,
    raise_bugs,
    reraise_single,
)

# Every error counter the store counted when the classification was written: the core's
# (object space), the transport's statistics fields, and the shells' (controller, membership).
TODAY = {
    "rejected-request": "peer",
    "moved-without-record": "race",
    "unexpected-KeyOp": "peer",
    "transfer-without-request": "race",
    "state-not-encodable": "app",
    "reply-without-request": "race",
    "untethered-call-lost": "race",
    "call-ZeroDivisionError": "app",
    "fold-lost": "race",
    "malformed-untethered-call": "peer",
    "replica-not-encodable": "app",
    "sent-to-departed-node": "race",
    "sent-to-departed-node-Call": "race",
    "evacuate-unknown-class": "app",
    "evacuate-unknown-class-AttributeError": "app",
    "stale-hand-on": "race",
    "malformed-hand-on": "peer",
    "send-failed": "race",
    "frames_malformed": "peer",
    "frames_unknown_type": "peer",
    "frames_too_large": "peer",
    "auth_failures": "peer",
    "handshake_failures": "peer",
    "errors_received": "bug",
    "bug-KeyError": "bug",
    "malformed-StageAck": "peer",
    "unexpected-RingState": "peer",
    "stale-ack": "race",
    "stale-drained": "race",
    "stale-node-status": "race",
    "stale-scale-reply": "race",
}


@pytest.mark.parametrize(("counter", "fault"), sorted(TODAY.items()))
def test_every_counter_of_today_has_its_class(counter: str, fault: str) -> None:
    assert classify(counter) == fault


@pytest.mark.parametrize("counter", ["", "bug-", "stale-", "-lost", "frobnicated", "bug"])
def test_a_counter_without_a_rule_is_refused(counter: str) -> None:
    with pytest.raises(ValueError, match="has no class"):
        classify(counter)


def test_a_bug_is_counted_by_the_type_of_what_failed() -> None:
    assert bug_counter(KeyError("k")) == "bug-KeyError"
    group = ExceptionGroup("tasks", [ExceptionGroup("inner", [ValueError()]), KeyError()])
    assert bug_counter(group) == "bug-ValueError"
    assert classify(bug_counter(group)) == "bug"


def test_raise_bugs_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S6_RAISE_BUGS", "1")
    assert raise_bugs()
    monkeypatch.setenv("S6_RAISE_BUGS", "0")
    assert not raise_bugs()
    monkeypatch.delenv("S6_RAISE_BUGS")
    assert not raise_bugs()


def _raised(group: BaseExceptionGroup[BaseException]) -> BaseException:
    try:
        try:
            raise group
        except BaseExceptionGroup as caught:
            reraise_single(caught)
    except BaseException as exc:  # what came out is the point
        return exc
    raise AssertionError("reraise_single returned")


def test_reraise_single_unwraps_groups_of_one_at_any_depth() -> None:
    inner = KeyError("mine")
    assert _raised(ExceptionGroup("a", [inner])) is inner
    assert _raised(ExceptionGroup("a", [ExceptionGroup("b", [inner])])) is inner


def test_reraise_single_keeps_the_exceptions_own_context() -> None:
    try:
        raise OSError("the cause")
    except OSError:
        try:
            raise KeyError("mine")
        except KeyError as exc:
            inner = exc
    context = inner.__context__
    assert isinstance(context, OSError)
    assert _raised(ExceptionGroup("a", [inner])).__context__ is context
    lone = ValueError("no context")
    assert _raised(ExceptionGroup("a", [lone])).__context__ is None


def test_reraise_single_raises_a_group_of_several_as_it_stands() -> None:
    two = ExceptionGroup("b", [KeyError(), ValueError()])
    assert _raised(two) is two
    assert _raised(ExceptionGroup("a", [two])) is two  # the wrapper of one is still unwrapped


async def test_reraise_single_behind_a_trio_nursery() -> None:
    with pytest.raises(PeerUnavailable, match="gone"):
        try:
            async with trio.open_nursery():
                raise PeerUnavailable("gone")
        except BaseExceptionGroup as group:
            reraise_single(group)


def test_first_leaf_takes_the_first_of_several() -> None:
    first = KeyError("first")
    group = ExceptionGroup("a", [ExceptionGroup("b", [first, ValueError()]), OSError()])
    assert first_leaf(group) is first
    assert first_leaf(first) is first


def test_every_counter_the_core_counts_has_a_class() -> None:
    """Each ``out.error("<name>"...)`` in the core names a counter ``classify`` knows (an
    f-string name is checked with a sample detail in place of its fields)."""
    import ast
    from pathlib import Path

    core = Path(__file__).resolve().parents[3] / "store" / "core"
    names: list[str] = []
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "error"
                and node.args
            ):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.append(arg.value)
            elif isinstance(arg, ast.JoinedStr):
                names.append(
                    "".join(
                        v.value if isinstance(v, ast.Constant) else "Detail" for v in arg.values
                    )
                )
    assert len(names) > 10, names
    for name in names:
        classify(name)  # raises ValueError for a name with no class
