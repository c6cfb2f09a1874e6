"""Object classes of the baseline tests (importable by the kv server process by name)."""

from __future__ import annotations

from store import MultiWriter, SingleWriter, stale, untethered


class Counter(SingleWriter):
    def __init__(self) -> None:
        self.n = 0
        self.seen: list[str] = []

    def inc(self, who: str) -> int:
        self.n += 1
        self.seen.append(who)
        return self.n

    @stale(max_age=0.0)
    def value(self) -> int:
        return self.n


class Tally(MultiWriter):
    def __init__(self, start: int = 0) -> None:
        self.n = start

    @untethered
    def add(self, k: int) -> None:
        self.n += k

    def take(self) -> int:
        self.n += 1
        return self.n

    def boom(self) -> None:
        raise ValueError("boom")

    @stale(max_age=5.0)
    def value(self) -> int:
        return self.n
