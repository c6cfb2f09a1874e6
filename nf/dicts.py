"""A stand-in for ``store.Space`` on plain dicts: the same NF code, no store.

For measuring what the object space costs an NF (``python -m bench.nf``).  This is the
local-only baseline of :mod:`baselines.local_only` under its historical names: each map a
dict in this process, references whose methods return coroutines that never suspend,
nothing of the store (locating keys, owning, moving, microthread scheduling).  One
member only, nothing shared with anyone.
"""

from __future__ import annotations

from baselines.local_only import LocalMap as DictMap
from baselines.local_only import LocalOnlySpace as DictSpace
from baselines.local_only import LocalStatistics as DictStatistics

__all__ = ["DictMap", "DictSpace", "DictStatistics"]
