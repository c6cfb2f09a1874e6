"""Property checks for the ``merge`` of a MultiWriter class.

Why this exists: a MultiWriter object that defines ``merge(other)`` lets every instance
update a local replica and have the store fold those replicas into the owner's object later
(paper §4.2, "local update and merge").  The store may fold replicas in any order and any
grouping, and it folds a replica into an object that may itself already hold other
replicas' updates.  That is only correct if ``merge``

* treats a fresh ``cls()`` as "no updates" (identity, on either side),
* gives the same object whichever replica is folded first (commutative),
* gives the same object however folds are grouped (associative),
* neither loses nor double-counts an update: merging replicas equals applying all their
  updates to one object,
* updates ``self`` in place and leaves its argument alone (the store may still hold it),
  without sharing mutable parts with it.

Those are easy to get subtly wrong (``max`` where a sum was meant, a forgotten field, list
concatenation whose order depends on who merges first), and the failures only show under
scaling, so NF authors should property-test their merge.  :func:`check_merge` does that with
Hypothesis from a plain test function::

    def test_host_counters_merge() -> None:
        check_merge(HostCounters, st.one_of(calls("hit"), calls("add_bytes", st.integers(0, 9))))

Hypothesis is a development dependency: it is imported inside the functions that need it,
so ``import store`` (and this module) works without it installed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeAlias, TypeVar

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "Call",
    "MergeCheckFailed",
    "Mergeable",
    "Update",
    "calls",
    "check_merge",
    "fields_of",
]


class Mergeable(Protocol):
    """What :func:`check_merge` needs: a ``merge(other)`` that updates ``self`` in place.
    (It also needs a no-argument constructor, which it takes as the ``cls`` argument.)"""

    def merge(self, other: Any, /) -> object: ...


M = TypeVar("M", bound=Mergeable)

Update: TypeAlias = Callable[[M], object]
"""An update applied to a replica: any callable taking the object, usually a :class:`Call`."""


class MergeCheckFailed(AssertionError):
    """The class's ``merge`` breaks one of the laws; the message shows a small
    counterexample (the replicas' update sequences and the resulting fields)."""


@dataclass(frozen=True)
class Call:
    """One method call to replay on a replica: ``Call("add", (3,))`` runs ``obj.add(3)``.

    Prefer it to lambdas as an update: it prints as ``.add(3)``, so counterexamples read
    like the code that produced them.
    """

    method: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self, obj: Any) -> object:
        return getattr(obj, self.method)(*self.args, **dict(self.kwargs))

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs]
        return f".{self.method}({', '.join(parts)})"


def calls(
    method: str, *args: SearchStrategy[Any], **kwargs: SearchStrategy[Any]
) -> SearchStrategy[Call]:
    """A strategy of :class:`Call` to ``method`` with arguments drawn from the given
    strategies, e.g. ``calls("add", st.integers(0, 9))``.  Needs Hypothesis."""
    from hypothesis import strategies as st

    def build(positional: tuple[Any, ...], named: dict[str, Any]) -> Call:
        return Call(method, positional, tuple(sorted(named.items())))

    return st.builds(build, st.tuples(*args), st.fixed_dictionaries(kwargs))


def fields_of(obj: object) -> dict[str, Any]:
    """An object's plain fields: its ``__dict__`` plus any ``__slots__`` that are set.
    This is what objects travel as, so it is what "equal" means by default."""
    fields = dict(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                fields[name] = getattr(obj, name)
    return fields


def _same_fields(a: object, b: object) -> bool:
    return type(a) is type(b) and fields_of(a) == fields_of(b)


def _show_fields(obj: object) -> str:
    fields = fields_of(obj)
    return repr(fields) if fields else repr(obj)


def check_merge(
    cls: Callable[[], M],
    updates: SearchStrategy[Update[M]],
    *,
    equal: Callable[[M, M], bool] = _same_fields,
    show: Callable[[M], str] = _show_fields,
    replay: bool = True,
    max_updates: int = 8,
    max_examples: int = 200,
    seed: int | None = None,
) -> None:
    """Property-test ``cls().merge`` with Hypothesis; raise :class:`MergeCheckFailed` with
    a readable counterexample if a law breaks.

    Hypothesis draws three replicas, each a fresh ``cls()`` with up to ``max_updates``
    updates from ``updates`` applied (an update is any callable taking the object, usually
    a :class:`Call` from :func:`calls`), and checks the laws in the module docstring.
    Every merge works on deep copies, so the replicas themselves are never disturbed.

    ``equal`` decides whether two objects hold the same state (default: same type and same
    fields, see :func:`fields_of`); pass your own to ignore caches or to compare floats with
    a tolerance.  ``show`` renders an object in reports.  ``replay=False`` skips the
    "merging equals applying every update to one object" law, for classes whose updates do
    not commute (say, a plain overwrite), where only the algebraic laws can hold.

    Call it from a plain test function, not from inside another ``@given`` test (Hypothesis
    does not nest).  Needs Hypothesis, imported here so that importing ``store`` does not.
    """
    from hypothesis import Phase, given, settings
    from hypothesis import seed as fix_seed
    from hypothesis import strategies as st

    first, second = cls(), cls()
    if not equal(first, second):
        raise MergeCheckFailed(
            f"two fresh {_name(cls)}() instances are not equal under `equal` "
            f"({show(first)} vs {show(second)}); pass an `equal` that ignores what differs"
        )
    replicas = st.lists(updates, max_size=max_updates)

    # database=None: every call of check_merge shares this inner function, so stored
    # examples from one class would be replayed against another.  The report carries the
    # whole counterexample instead; pass `seed` to replay a run exactly.  No explain phase:
    # it reruns the failure under a tracer (slow) and our report already says what matters.
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(replicas, replicas, replicas)
    def run(a: list[Update[M]], b: list[Update[M]], c: list[Update[M]]) -> None:
        _Laws(cls, equal, show, replay).check(a, b, c)

    if seed is not None:
        run = fix_seed(seed)(run)
    run()


def _name(cls: Callable[[], object]) -> str:
    return getattr(cls, "__qualname__", repr(cls))


class _Laws(Generic[M]):
    """The checks for one drawn example; each failure names the law and shows the
    replicas, so the message alone is enough to reproduce it."""

    def __init__(
        self,
        cls: Callable[[], M],
        equal: Callable[[M, M], bool],
        show: Callable[[M], str],
        replay: bool,
    ) -> None:
        self.cls = cls
        self.equal = equal
        self.show = show
        self.replay = replay
        self.names: dict[str, Sequence[Update[M]]] = {}

    def build(self, updates: Sequence[Update[M]]) -> M:
        obj = self.cls()
        for update in updates:
            update(obj)
        return obj

    def fail(self, law: str, *results: tuple[str, M]) -> NoReturn:
        """Raise with the law, every replica's updates and state, and the results."""
        raise MergeCheckFailed(self._message(law, [(k, self.show(v)) for k, v in results]))

    def _message(self, law: str, results: Sequence[tuple[str, str]]) -> str:
        name = _name(self.cls)
        lines = [f"{name}.merge {law}"]
        for replica, ups in self.names.items():
            steps = ", ".join(map(repr, ups)) if ups else "nothing"
            lines.append(f"  {replica} = {name}() then {steps}")
            lines.append(f"      -> {self.show(self.build(ups))}")
        lines.extend(f"  {label} -> {text}" for label, text in results)
        return "\n".join(lines)

    def merged(self, x: M, y: M, label: str) -> M:
        """``x.merge(y)`` on copies, also checking that merge works in place, leaves its
        argument unchanged and shares nothing mutable with it."""
        left, right, before = copy.deepcopy(x), copy.deepcopy(y), copy.deepcopy(y)
        returned = left.merge(right)
        if returned is not None and returned is not left:
            raise MergeCheckFailed(
                self._message(
                    f"returned a value instead of updating self in place ({label}); the "
                    "store keeps self and drops the return value",
                    [(f"{label} returned", repr(returned))],
                )
            )
        if not self.equal(right, before):
            self.fail(
                f"changed its argument ({label}); the store may still hold it",
                ("argument before", before),
                ("argument after", right),
            )
        snapshot = copy.deepcopy(left)
        for update in self.names.get("c", ()):  # keep using the replica after the merge
            update(right)
        if not self.equal(left, snapshot):
            self.fail(
                f"left self sharing mutable state with its argument ({label}): updating the "
                "argument afterwards (with c's updates) changed the merged object",
                (f"{label} right after merge", snapshot),
                (f"{label} after updating the argument", left),
            )
        return left

    def check(
        self,
        a_ups: Sequence[Update[M]],
        b_ups: Sequence[Update[M]],
        c_ups: Sequence[Update[M]],
    ) -> None:
        """Check every law on replicas built from the three update sequences."""
        self.names = {"a": a_ups, "b": b_ups, "c": c_ups}
        a, b, c = self.build(a_ups), self.build(b_ups), self.build(c_ups)
        fresh = self.cls()
        equal = self.equal

        for label, got in (
            ("a.merge(fresh)", self.merged(a, fresh, "a.merge(fresh)")),
            ("fresh.merge(a)", self.merged(fresh, a, "fresh.merge(a)")),
        ):
            if not equal(got, a):
                self.fail("does not treat a fresh object as 'no updates'", (label, got))
        ab = self.merged(a, b, "a.merge(b)")
        ba = self.merged(b, a, "b.merge(a)")
        if not equal(ab, ba):
            self.fail("is not commutative", ("a.merge(b)", ab), ("b.merge(a)", ba))
        ab_c = self.merged(ab, c, "(a.merge(b)).merge(c)")
        a_bc = self.merged(a, self.merged(b, c, "b.merge(c)"), "a.merge(b.merge(c))")
        if not equal(ab_c, a_bc):
            self.fail(
                "is not associative", ("(a.merge(b)).merge(c)", ab_c), ("a.merge(b.merge(c))", a_bc)
            )
        if self.replay:
            for label, got, ups in (
                ("a.merge(b)", ab, [*a_ups, *b_ups]),
                ("(a.merge(b)).merge(c)", ab_c, [*a_ups, *b_ups, *c_ups]),
            ):
                want = self.build(ups)
                if not equal(got, want):
                    self.fail(
                        "loses or double-counts updates: merging replicas differs from "
                        "applying all their updates to one object",
                        (label, got),
                        ("all updates on one object", want),
                    )
