"""The SingleWriter grant chain, checked across the traces of separate processes.

Each node records (``NodeState.trace``) every grant and release of a SingleWriter object as
``("grant" | "release", map, key, version, node)``, in its own local order.  Processes share
no clock, but a key's versions order its history globally: a grant of version ``v + 1`` is
made from the release of ``v`` (``_hand_over`` and ``_evacuate`` both send ``version + 1``),
so it comes causally after it.  Sorted by version, each key's merged events must therefore
form one chain, the rule of ``tests/sim/objects_cluster.py``'s ``_check_trace``:

    grant v at X, release v at X, grant v' > v at Y, release v' at Y, ...

which says there were never two writable references to one object.  The last grant of a key
may stay unreleased (its holder at the end).  With ``gapless`` the versions must also be
1, 2, 3...: a missing step means some process's trace is missing or incomplete, which the
order alone would not show.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: One traced event: (event, map, key, version, node), as ``NodeState.trace`` holds it.
Entry = tuple[str, str, Any, int, str]

_RANK = {"grant": 0, "release": 1}


def write_trace(path: str | Path, trace: Iterable[Entry]) -> None:
    """Write ``trace`` as JSON lines (one event a line)."""
    with open(path, "w", encoding="utf-8") as out:
        for entry in trace:
            out.write(json.dumps(list(entry)) + "\n")


def read_trace(path: str | Path) -> list[Entry]:
    """The events :func:`write_trace` wrote, in their order."""
    with open(path, encoding="utf-8") as lines:
        return [tuple(json.loads(line)) for line in lines if line.strip()]


def check_grant_chain(traces: Iterable[Sequence[Entry]], *, gapless: bool = False) -> list[str]:
    """Problems with the merged grant chains of ``traces`` (one trace per process), at most
    one per key; an empty list means every key's history is one chain."""
    problems: list[str] = []
    merged: dict[tuple[str, str], list[tuple[int, int, str, str]]] = defaultdict(list)
    bad_keys: set[tuple[str, str]] = set()
    for trace in traces:
        local: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
        for event, map_name, key, version, node in trace:
            k = (map_name, json.dumps(key))
            if event not in _RANK:
                problems.append(f"{k}: unknown event {event!r} at {node}")
                bad_keys.add(k)
                continue
            merged[k].append((version, _RANK[event], node, event))
            local[k].append((version, _RANK[event]))
        # A process sees one key's events in version order (or the merge below is wrong).
        for k, steps in local.items():
            if steps != sorted(steps) and k not in bad_keys:
                problems.append(f"{k}: one node's local order disagrees with versions: {steps}")
                bad_keys.add(k)
    for k, events in sorted(merged.items()):
        if k in bad_keys:
            continue
        problem = _check_key(sorted(events), gapless)
        if problem is not None:
            problems.append(f"{k}: {problem}")
    return problems


def _check_key(events: list[tuple[int, int, str, str]], gapless: bool) -> str | None:
    holder: tuple[int, str] | None = None
    last: int | None = None
    for version, _, node, event in events:
        if event == "grant":
            if holder is not None:
                return f"grant of v{version} at {node} while v{holder[0]} at {holder[1]} holds"
            if last is not None and version <= last:
                return f"grant of v{version} at {node} after v{last}"
            expected = 1 if last is None else last + 1
            if gapless and version != expected:
                return f"grant of v{version} at {node}, expected v{expected} (a trace is missing)"
            holder, last = (version, node), version
        else:
            if holder != (version, node):
                return f"release of v{version} at {node}, chain is at {holder} (last v{last})"
            holder = None
    return None
