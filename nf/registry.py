"""Finding NFs by name: the ``s6.nf`` entry-point group.

Our NFs are declared there in ``pyproject.toml``; another installed package adds its own
the same way (``[project.entry-points."s6.nf"] mine = "pkg.module:MyNF"``) without touching
this one.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from nf.base import NF

__all__ = ["GROUP", "UnknownNF", "available", "load"]

GROUP = "s6.nf"


class UnknownNF(LookupError):
    """No NF of that name is installed (or its entry point does not load)."""


def _points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available() -> list[str]:
    """The names of the installed NFs, sorted."""
    return sorted(_points())


def load(name: str) -> type[NF]:
    """The NF class installed as ``name``; :class:`UnknownNF` naming the known ones."""
    points = _points()
    point = points.get(name)
    if point is None:
        known = ", ".join(sorted(points)) or "none"
        raise UnknownNF(f"no NF named {name!r} (installed: {known})")
    try:
        cls = point.load()
    except Exception as exc:  # an entry point whose module is missing or broken
        raise UnknownNF(f"NF {name!r} ({point.value}) does not load: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, NF)):
        raise UnknownNF(f"NF {name!r} ({point.value}) is not a subclass of nf.base.NF")
    return cls
