"""Tests of ``store.merge_check``: lawful merges pass, and each classic way to get a merge
wrong is caught with a message that names the broken law.

The classes here are tiny stand-ins for MultiWriter objects: the helper only relies on a
no-argument constructor and a ``merge(other)`` method, so it works before (and without)
``store.MultiWriter``.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import strategies as st

from store.merge_check import Call, MergeCheckFailed, calls, check_merge, fields_of

# --------------------------------------------------------------------------- lawful


class Counter:
    """The paper's prime use case: per-instance counters folded by addition."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0

    def on_packet(self, size: int) -> None:
        self.packets += 1
        self.bytes += size

    def merge(self, other: Counter) -> None:
        self.packets += other.packets
        self.bytes += other.bytes


COUNTER_UPDATES = calls("on_packet", st.integers(0, 1500))


class Services:
    """A HostAsset-like set of services, kept as a sorted list so it travels as cbor."""

    def __init__(self) -> None:
        self.services: list[str] = []

    def add_service(self, name: str) -> None:
        if name not in self.services:
            self.services = sorted([*self.services, name])

    def merge(self, other: Services) -> None:
        self.services = sorted(set(self.services) | set(other.services))


SERVICE_UPDATES = calls("add_service", st.sampled_from(["http", "ssh", "dns", "smtp"]))


class SlotCounter:
    """Same as Counter, with __slots__: fields must still be compared."""

    __slots__ = ("hits",)

    def __init__(self) -> None:
        self.hits = 0

    def hit(self) -> None:
        self.hits += 1

    def merge(self, other: SlotCounter) -> None:
        self.hits += other.hits


def test_counter_passes() -> None:
    check_merge(Counter, COUNTER_UPDATES)


def test_sorted_set_passes() -> None:
    check_merge(Services, SERVICE_UPDATES)


def test_slots_class_passes() -> None:
    check_merge(SlotCounter, calls("hit"), max_examples=50)


def test_plain_callables_work_as_updates() -> None:
    def add_jumbo(c: Counter) -> None:
        c.on_packet(9000)

    check_merge(Counter, st.sampled_from([add_jumbo, Call("on_packet", (64,))]), max_examples=50)


def test_seed_is_accepted() -> None:
    check_merge(Counter, COUNTER_UPDATES, max_examples=20, seed=1234)


class Assign:
    """A register whose updates overwrite and whose merge keeps the larger value: the
    algebraic laws hold, but replaying updates in order gives the last one, not the max."""

    def __init__(self) -> None:
        self.value: int | None = None

    def set(self, value: int) -> None:
        self.value = value

    def merge(self, other: Assign) -> None:
        if other.value is not None and (self.value is None or other.value > self.value):
            self.value = other.value


def test_replay_law_can_be_switched_off() -> None:
    updates = calls("set", st.integers(0, 5))
    with pytest.raises(MergeCheckFailed, match="loses or double-counts"):
        check_merge(Assign, updates)
    check_merge(Assign, updates, replay=False)


class FloatTotal:
    def __init__(self) -> None:
        self.total = 0.0

    def add(self, x: float) -> None:
        self.total += x

    def merge(self, other: FloatTotal) -> None:
        self.total += other.total


def test_custom_equal_tolerates_float_rounding() -> None:
    updates = calls("add", st.sampled_from([0.1, 0.2, 0.3, 0.7]))
    with pytest.raises(MergeCheckFailed):  # float addition is not exactly associative
        check_merge(FloatTotal, updates, max_examples=500)

    def close(a: FloatTotal, b: FloatTotal) -> bool:
        return abs(a.total - b.total) < 1e-9

    check_merge(FloatTotal, updates, equal=close)


# --------------------------------------------------------------------------- broken


def caught(cls: Any, updates: Any, *laws: str, replay: bool = True) -> str:
    """Run the helper on a broken class: it must fail, naming one of ``laws``.  (A bug
    often breaks several laws; which one the shrunk counterexample shows is Hypothesis's
    choice, so tests that pin one law use a bug that breaks only that law.)"""
    with pytest.raises(MergeCheckFailed) as info:
        check_merge(cls, updates, replay=replay)
    message = str(info.value)
    assert any(law in message for law in laws), message
    return message


class MaxCounter(Counter):
    """Takes the max where it should add: replicas' packets are lost."""

    def merge(self, other: Counter) -> None:
        self.packets = max(self.packets, other.packets)
        self.bytes = max(self.bytes, other.bytes)


def test_max_instead_of_add_is_caught() -> None:
    message = caught(MaxCounter, COUNTER_UPDATES, "loses or double-counts updates")
    # The report reads like code: replicas as method calls, states as fields.
    assert "a = MaxCounter() then " in message
    assert ".on_packet(" in message
    assert "'packets'" in message


class ForgetfulCounter(Counter):
    """Forgets a field."""

    def merge(self, other: Counter) -> None:
        self.packets += other.packets


def test_forgotten_field_is_caught() -> None:
    caught(ForgetfulCounter, COUNTER_UPDATES, "does not treat a fresh object", "loses")


class AppendLog:
    """Concatenates event lists: nothing is lost, but the result depends on who merges
    into whom (and list concatenation is associative, so only commutativity breaks)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def record(self, event: str) -> None:
        self.events.append(event)

    def merge(self, other: AppendLog) -> None:
        self.events = self.events + other.events


def test_order_dependent_append_is_caught() -> None:
    message = caught(AppendLog, calls("record", st.sampled_from("xyz")), "is not commutative")
    assert "a.merge(b) -> {'events':" in message


class DoubleCounter(Counter):
    """Counts the other replica twice."""

    def merge(self, other: Counter) -> None:
        self.packets += 2 * other.packets
        self.bytes += other.bytes


def test_double_counting_is_caught() -> None:
    caught(DoubleCounter, COUNTER_UPDATES, "does not treat", "not associative", "double-counts")


class Gap:
    """|x - y| has an identity and commutes, but does not associate."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def merge(self, other: Gap) -> None:
        self.n = abs(self.n - other.n)


def test_non_associative_merge_is_caught() -> None:
    caught(Gap, calls("add", st.integers(0, 3)), "is not associative", replay=False)


class DrainingCounter(Counter):
    """Zeroes the replica it folded in: the store may still need it (to resend, say)."""

    def merge(self, other: Counter) -> None:
        super().merge(other)
        other.packets = other.bytes = 0


def test_changing_the_argument_is_caught() -> None:
    caught(DrainingCounter, COUNTER_UPDATES, "changed its argument")


class AliasingServices(Services):
    """Adopts the other's list when empty: later updates to the replica leak in."""

    def merge(self, other: Services) -> None:
        if not self.services:
            self.services = other.services
        else:
            for s in other.services:
                self.add_service(s)

    def add_service(self, name: str) -> None:  # mutates in place, so aliasing shows
        if name not in self.services:
            self.services.append(name)
            self.services.sort()


def test_sharing_mutable_state_is_caught() -> None:
    caught(AliasingServices, SERVICE_UPDATES, "sharing mutable state")


class FunctionalCounter(Counter):
    """Returns a new merged object and leaves self alone: the store would drop it."""

    def merge(self, other: Counter) -> Counter:  # type: ignore[override]
        out = FunctionalCounter()
        out.packets = self.packets + other.packets
        out.bytes = self.bytes + other.bytes
        return out


def test_returning_a_new_object_is_caught() -> None:
    caught(FunctionalCounter, COUNTER_UPDATES, "instead of updating self in place")


class Stamped(Counter):
    """Fresh instances differ (a per-instance id): default equality cannot work."""

    _next = 0

    def __init__(self) -> None:
        super().__init__()
        Stamped._next += 1
        self.instance = Stamped._next


def test_unequal_fresh_instances_are_reported() -> None:
    with pytest.raises(MergeCheckFailed, match="two fresh Stamped"):
        check_merge(Stamped, COUNTER_UPDATES)

    def same_counts(a: Stamped, b: Stamped) -> bool:
        return (a.packets, a.bytes) == (b.packets, b.bytes)

    check_merge(Stamped, COUNTER_UPDATES, equal=same_counts, max_examples=50)


# --------------------------------------------------------------------------- plumbing


def test_fields_of_reads_dict_and_slots() -> None:
    class Both(SlotCounter):
        def __init__(self) -> None:
            super().__init__()
            self.extra = "x"

    assert fields_of(Both()) == {"hits": 0, "extra": "x"}
    assert fields_of(SlotCounter()) == {"hits": 0}


def test_call_repr_reads_like_code() -> None:
    assert repr(Call("add", (3,), (("tag", "x"),))) == ".add(3, tag='x')"


def test_importing_the_helper_does_not_import_hypothesis() -> None:
    code = "import sys, store, store.merge_check; assert 'hypothesis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
