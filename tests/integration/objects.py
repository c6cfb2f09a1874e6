"""Object classes of the integration workers, in a module every node can import (a node
that receives an object from a leaving member finds its class by module and name)."""

from __future__ import annotations

from store import MultiWriter, SingleWriter, stale, untethered


class Cell(SingleWriter):
    def __init__(self) -> None:
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value

    def apply(self, delta: int) -> int:
        self.value += delta
        return self.value

    def read(self) -> int:
        return self.value

    @stale(max_age=0.2)
    def peek(self) -> int:
        return self.value


class Tally(MultiWriter):
    def __init__(self) -> None:
        self.total = 0
        self.by: dict[str, list[int]] = {}

    @untethered
    def add(self, who: str, n: int) -> None:
        self.total += n
        self.by.setdefault(who, []).append(n)

    def read(self) -> int:
        return self.total


class Hits(MultiWriter):
    """A shared counter with local replicas folded by merge (paper §4.2)."""

    def __init__(self) -> None:
        self.n = 0

    @untethered
    def hit(self, k: int) -> None:
        self.n += k

    def value(self) -> int:
        return self.n

    def merge(self, other: Hits) -> None:
        self.n += other.n
