"""Callers see their own errors (issue 9), in the core: each test drives a few
:class:`tests.store.core.test_layers.Node` cores by hand and shows one error reaching the
caller that caused it, instead of the sender task, the peer's log or a hang.

* a blocking call whose arguments cannot travel, or are over the frame limit, fails where
  it is made, before any message; a result that cannot travel fails at the caller as a
  ``RemoteCallError`` and the owner carries on;
* a constructor that raises fails the create that ran it, and the key is absent again
  (also when another node's request for the new object came first);
* an untethered call that cannot travel or that raises at the owner fails alone: counted,
  logged (at the owner with the caller and the class named), and the caller's next flush
  check raises; a large batch is sealed as several messages under the frame limit;
* a flush's barrier to a node that left is answered by the caller's core once what that
  node could not take was relocated and answered.
"""

from __future__ import annotations

from typing import Any

import pytest

from store.core.instructions import Invoke
from store.core.key_layer import KeyState
from store.core.objects import (
    MultiWriter,
    SingleWriter,
    UntetheredCallsFailed,
    ValueNotEncodable,
    info_of,
    untethered,
)
from store.core.outbox import FRAME_ROOM
from store.core.router import Router
from store.wire.errors import MessageTooLarge, ObjectNotFound, RemoteCallError
from store.wire.messages import (
    Barrier,
    CallFailed,
    KeyOp,
    Release,
    Untethered,
    encode_message,
)
from tests.fixtures.objects import MAPS
from tests.store.core.test_layers import Net, result


class Fragile(SingleWriter):
    """A flow whose constructor raises while ``broken`` is set."""

    broken = True

    def __init__(self) -> None:
        if Fragile.broken:
            raise ValueError("no flows today")
        self.n = 0

    def add(self, n: int) -> int:
        self.n += n
        return self.n


class Board(MultiWriter):
    """Shared state with a constructor that may raise, an untethered update that raises
    on a negative amount, and a method that returns whatever it is given."""

    broken = False
    returns: Any = None

    def __init__(self) -> None:
        if Board.broken:
            raise ValueError("no boards today")
        self.n = 0

    def add(self, n: Any) -> int:
        self.n += 1
        return self.n

    @untethered
    def bump(self, n: Any, pad: Any = None) -> None:
        if isinstance(n, int) and n < 0:
            raise ValueError(f"a negative bump ({n})")
        self.n += 1

    def give(self) -> Any:
        return Board.returns

    def total(self) -> int:
        return self.n


CLASSES: dict[str, type] = {**MAPS, "fr": Fragile, "bd": Board}
BOARD = info_of(Board)


@pytest.fixture
def net3(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(Fragile, "broken", True)
    monkeypatch.setattr(Board, "broken", False)
    nets: list[Net] = []

    def make(max_frame: int | None = None) -> Net:
        net = Net(["a", "b", "c"], dict.fromkeys("abc", CLASSES))
        if max_frame is not None:
            for name, node in net.nodes.items():
                node.router = Router(name, net.ring, raise_bugs=True, max_frame=max_frame)
                for map_name, cls in CLASSES.items():
                    node.register_map(map_name, info_of(cls))
        nets.append(net)
        return net

    yield make
    for net in nets:
        net.collect()
        net.validate()


def board_at(net: Net, owner: str) -> tuple[str, Any]:
    """A board created at ``owner``, whose key's authority is ``owner`` too."""
    key = net.key("bd", owner)
    assert result(net[owner].locate("bd", key, True)) == (owner, True)
    net.deliver_all()
    return ("bd", key)


def failed(wait: Any) -> BaseException:
    assert wait.done(), wait
    with pytest.raises(BaseException) as info:
        wait.result()
    return info.value


# -- blocking calls ---------------------------------------------------------------------------


def test_a_blocking_call_whose_arguments_cannot_travel_fails_where_it_is_made(net3: Any) -> None:
    net = net3()
    k = board_at(net, "b")
    deep: list[Any] = []
    inner = deep
    for _ in range(30_000):  # (cbor2 would crash the process encoding this)
        inner.append([])
        inner = inner[0]
    for bad in (object(), {1, object()}, deep, 2**5000):
        wait = net["a"].call(k, BOARD, "add", (bad,), "b", 0.0)
        error = failed(wait)
        assert isinstance(error, ValueNotEncodable) and isinstance(error, TypeError), error
        assert "argument 1 of Board.add" in str(error)
        assert "b" not in net["a"].take_outbox()  # no message was made
    wait = net["a"].call(k, BOARD, "add", (1,), "b", 0.0)
    net.deliver_all()
    assert result(wait) == 1  # the caller carries on


def test_a_blocking_call_over_the_frame_limit_fails_where_it_is_made(net3: Any) -> None:
    net = net3(max_frame=64 * 1024)
    k = board_at(net, "b")
    wait = net["a"].call(k, BOARD, "add", (b"x" * (64 * 1024 - FRAME_ROOM),), "b", 0.0)
    error = failed(wait)
    assert isinstance(error, MessageTooLarge) and "Board.add" in str(error), error
    assert "b" not in net["a"].take_outbox()
    wait = net["a"].call(k, BOARD, "add", (b"x" * 1000,), "b", 0.0)
    net.deliver_all()
    assert result(wait) == 1


def test_a_result_that_cannot_travel_fails_at_the_caller_and_the_owner_carries_on(
    net3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = net3(max_frame=64 * 1024)
    k = board_at(net, "b")
    for value, kind in ((object(), "ValueNotEncodable"), (b"x" * 60_000, "MessageTooLarge")):
        monkeypatch.setattr(Board, "returns", value)
        wait = net["a"].call(k, BOARD, "give", (), "b", 0.0)
        net.deliver_all()
        error = failed(wait)
        assert isinstance(error, RemoteCallError) and kind in str(error), error
        assert "the result of tests.store.core.test_caller_errors_core.Board.give" in str(error)
    assert net["b"].errors == {"call-not-encodable": 1, "call-too-large": 1}
    monkeypatch.setattr(Board, "returns", "fine")
    wait = net["a"].call(k, BOARD, "give", (), "b", 0.0)
    net.deliver_all()
    assert result(wait) == "fine"


# -- constructors -----------------------------------------------------------------------------


def test_a_constructor_that_raises_fails_the_create_and_the_key_is_absent_again(
    net3: Any,
) -> None:
    net = net3()
    key = net.key("fr", "b")
    creates = [net["a"].acquire("fr", key, create=True) for _ in range(2)]
    net.deliver_all()
    for wait in creates:  # every create waiting for it hears the constructor's error
        error = failed(wait)
        assert isinstance(error, ValueError) and "no flows today" in str(error)
    assert net["b"].records[("fr", key)].state is KeyState.ABSENT
    assert ("fr", key) not in net["a"].objects
    assert net["a"].errors == {"call-ValueError": 1}
    assert any("Fragile() raised ValueError" in log.text for log in net["a"].logs)
    with pytest.raises(ObjectNotFound):
        wait = net["c"].acquire("fr", key, create=False)
        net.deliver_all()
        result(wait)
    Fragile.broken = False
    wait = net["a"].acquire("fr", key, create=True)
    net.deliver_all()
    held, created = result(wait)
    assert created and held.obj.add(2) == 2
    net["a"].release_ref(("fr", key), held)


def test_a_request_that_overtakes_the_removal_of_an_unbuilt_object_is_answered(
    net3: Any,
) -> None:
    net = net3()
    key = net.key("fr", "c")
    create = net["a"].acquire("fr", key, create=True)
    net.deliver("a", "c")  # the CREATE
    net.deliver("c", "a")  # the grant: the constructor raises, a REMOVE goes to c
    assert isinstance(failed(create), ValueError)
    removal = net.queued("a", "c")
    assert [type(m) for m in removal] == [KeyOp]
    Fragile.broken = False
    get = net["b"].acquire("fr", key, create=False)
    net.deliver("b", "c")  # b's request comes first: c asks a to release the object
    assert [type(m) for m in net.queued("c", "a")] == [Release]
    net.deliver_all()
    held, created = result(get)  # built at b, as new; then removed by a's removal
    assert not created and held.removed
    assert net["c"].records[("fr", key)].state is KeyState.ABSENT
    assert not net["a"].router.objects._unbuilt


def test_a_multi_writer_constructor_that_raises_fails_the_create(net3: Any) -> None:
    net = net3()
    Board.broken = True
    key = net.key("bd", "b")
    wait = net["a"].locate("bd", key, True)
    net.deliver_all()
    error = failed(wait)
    assert isinstance(error, ValueError) and "no boards today" in str(error)
    assert net["b"].records[("bd", key)].state is KeyState.ABSENT
    Board.broken = False
    wait = net["a"].locate("bd", key, True)
    net.deliver_all()
    assert result(wait) == ("a", True)


# -- untethered calls -------------------------------------------------------------------------


def test_an_untethered_call_that_cannot_travel_fails_alone_and_the_flush_says_so(
    net3: Any,
) -> None:
    net = net3()
    k = board_at(net, "b")
    a = net["a"]
    deep: list[Any] = []
    inner = deep
    for _ in range(30_000):
        inner.append([])
        inner = inner[0]
    for arg in (1, object(), 2, deep, 3, 2**5000, 4):
        a.untethered(k, "bump", (arg,), "b")
    batches = net.queued("a", "b")
    assert [len(m.calls) for m in batches if isinstance(m, Untethered)] == [4]
    assert a.errors == {"call-not-encodable": 3}
    error = failed(a.flush_check())
    assert isinstance(error, UntetheredCallsFailed) and isinstance(error, RemoteCallError)
    assert error.count == 3 and "bd[" in str(error) and ".bump" in str(error)
    assert result(a.flush_check()) is None  # reported once
    net.deliver_all()
    assert net["b"].objects[k].obj.n == 4


def test_an_untethered_call_that_raises_at_the_owner_comes_back_to_its_caller(
    net3: Any,
) -> None:
    net = net3()
    k = board_at(net, "b")
    a = net["a"]
    for n in (1, -1, 2):
        a.untethered(k, "bump", (n,), "b")
    flushed = a.barrier("b")
    net.deliver_all()
    assert result(flushed) is None
    assert net["b"].objects[k].obj.n == 2  # the failed call failed alone
    logs = [log.text for log in net["b"].logs if log.counter == "call-ValueError"]
    assert len(logs) == 1 and "Board.bump called by a raised ValueError" in logs[0]
    assert a.errors == {"call-failed-at-owner": 1}
    error = failed(a.flush_check())
    assert isinstance(error, UntetheredCallsFailed) and "a negative bump (-1)" in str(error)
    assert result(a.flush_check()) is None


def test_an_untethered_method_applied_here_that_raises_counts_for_the_flush(net3: Any) -> None:
    net = net3()
    k = board_at(net, "a")  # held by a itself: applied at once
    a = net["a"]
    a.run(Invoke(k, BOARD, "bump", (-5,), "a", None))  # (the slow path, as after a fence)
    error = failed(a.flush_check())
    assert isinstance(error, UntetheredCallsFailed) and "Board.bump raised" in str(error)


def test_a_large_untethered_batch_is_sealed_as_several_messages_under_the_frame_limit(
    net3: Any,
) -> None:
    net = net3(max_frame=64 * 1024)
    k = board_at(net, "b")
    a = net["a"]
    calls = 20_000
    for n in range(calls):
        a.untethered(k, "bump", (n, "x" * (n % 50)), "b")
    batches = [m for m in net.queued("a", "b") if isinstance(m, Untethered)]
    assert len(batches) > 10
    budget = a.router.out.untethered_bytes
    assert budget < 64 * 1024
    sizes = [len(encode_message(m)) for m in batches]
    assert all(size <= budget for size in sizes), sizes
    seqs = [entry[4] for m in batches for entry in m.calls]
    assert seqs == list(range(1, calls + 1))
    a.untethered(k, "bump", (b"y" * 70_000,), "b")  # alone over a frame: fails alone
    a.untethered(k, "bump", ("z" * 50_000, {"a": 1}), "b")  # (looked at closely) fits
    assert [len(m.calls) for m in net.queued("a", "b")[len(batches) :]] == [1]
    assert a.errors == {"call-not-encodable": 1}
    net.deliver_all()
    assert net["b"].objects[k].obj.n == calls + 1


def test_a_call_that_cannot_be_applied_at_the_owner_is_not_callable_there(net3: Any) -> None:
    net = net3()
    k = board_at(net, "b")
    net["b"].handle(Untethered([[k[0], k[1], "nope", [], 7]]), sender="a")
    assert net["b"].errors == {"malformed-call": 1}
    [notice] = net.queued("b", "a")
    assert isinstance(notice, CallFailed) and notice.seq == 7 and "nope" in notice.error
    net.deliver_all()
    assert isinstance(failed(net["a"].flush_check()), UntetheredCallsFailed)


# -- flush: nodes that left -------------------------------------------------------------------


def test_a_barrier_to_a_node_that_left_waits_for_what_was_relocated(net3: Any) -> None:
    net = net3()
    k = board_at(net, "c")
    a = net["a"]
    a.untethered(k, "bump", (1,), "z")  # through a location on a node that left the ring
    a.untethered(k, "bump", (2,), "z")
    assert a.flush_targets() == ["z"]  # (it used to be left out: not a member)
    barrier = a.barrier("z")
    msgs = a.take_outbox().pop("z")
    assert [type(m) for m in msgs] == [Untethered, Barrier]
    a.undeliverable("z", msgs)  # nothing reaches it any more
    assert not barrier.done()  # the two calls go where the object is first
    for _ in range(1000):  # (the shell hands back what it cannot send to z, as here)
        net.collect()
        gone = net.queues.pop(("a", "z"), None)
        if gone:
            a.undeliverable("z", list(gone))
            continue
        busy = sorted(pair for pair, queue in net.queues.items() if queue)
        if not busy:
            break
        net.deliver(*busy[0])
    assert result(barrier) is None
    assert net["c"].objects[k].obj.n == 2
    assert a.errors == {}
    assert result(a.flush_check()) is None
