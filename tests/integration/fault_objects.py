"""Object classes of the fault-injection suite (``test_fault_injection.py``).

They live in a module of their own, not in the member's ``__main__``, so that a
``store.node`` handed one of them (a leaving member's objects are evacuated to the keys'
next owners) can import the class and serve calls on it.  Every update adds to one
counter, so an object's state is a number the test's model predicts.
"""

from __future__ import annotations

from store import MultiWriter, SingleWriter, untethered
from tests.integration.objects import Hits  # the mergeable counter, shared with the others

__all__ = ["Cell", "Hits", "Tally"]


class Cell(SingleWriter):
    """A single-writer counter: ``apply`` returns the new value, so the values one object
    returned to all its writers, in every process, are 1, 2, 3... exactly once each."""

    def __init__(self) -> None:
        self.value = 0

    def apply(self, delta: int) -> int:
        self.value += delta
        return self.value


class Tally(MultiWriter):
    """A multi-writer counter: ``add`` is a blocking call (it returns the new total), and
    ``push`` an untethered one, shipped to the holder."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> int:
        self.total += n
        return self.total

    @untethered
    def push(self, n: int) -> None:
        self.total += n

    def read(self) -> int:
        return self.total
