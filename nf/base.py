"""The network-function interface every NF in ``nf/`` (and anyone else's) implements.

An NF is a class with a ``name``.  One instance of it runs on each member of the object
space; all of its state that must survive a flow moving to another member lives in the
space's maps (``space.map(name, cls)``), never in module globals.  Per-instance attributes
are for caches that can be rebuilt, counters of this instance, and timer lists of the flows
this instance served.

The packet path is ``await nf.process(packet)`` run as a microthread of the packet's flow
(``space.submit(nf.flow_key(packet), nf.process, packet)``), so one flow's packets are
handled in order.  It returns a :class:`Verdict`; a rewritten packet is ``FORWARD`` with
``packet.frame`` changed in place.  ``process`` never raises on a malformed packet: it
counts it by reason (``Packet.drop``) and passes or drops it as the NF declares
(:attr:`NF.malformed_verdict`).

The control plane asks ``await nf.query(name, **args)``: every NF answers "statistics" and
its :attr:`NF.output_query`, whose result is a list of text lines (the asset log, the
alerts, the NAT table) that the offline runner prints.  ``await nf.tick(now)`` runs the
NF's timeouts; its clock is packet time (offline: capture time; live: arrival time), and
each instance sweeps only its own timer lists (never ``Map.items()``, which copies the
whole cluster's state).
"""

from __future__ import annotations

import abc
import argparse
import enum
import logging
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from nf.packet import Packet
from store import UntetheredCallsFailed

logger = logging.getLogger("nf")

if TYPE_CHECKING:
    from store import Space

__all__ = ["NF", "ConfigError", "Verdict", "local_create_of", "local_of", "untethered_of"]


def _not_here(key: Any, *args: Any) -> None:
    return None


def local_of(map_: Any) -> Callable[[Any], Any]:
    """``map_.local`` (``store.Map.local``: the object itself, when using it in place is
    safe, else None) if the map's class has it; otherwise a function that
    always answers None, so that the NF takes its awaited path.  A backend whose maps
    must see every access (remote-only's state is at its store, stop-the-world records
    each flow's keys) has none, and its NFs behave as before."""
    if hasattr(type(map_), "local"):
        return map_.local  # type: ignore[no-any-return]
    return _not_here


def untethered_of(map_: Any) -> Callable[..., Any]:
    """``map_.untethered`` (``store.Map.untethered``: a reference for untethered updates
    that never waits for the object's place) if the map's class has it, else
    ``map_.create``: the same calls, awaited as the backend awaits them."""
    if hasattr(type(map_), "untethered"):
        return map_.untethered  # type: ignore[no-any-return]
    return map_.create  # type: ignore[no-any-return]


def local_create_of(map_: Any) -> Callable[..., Any]:
    """``map_.local_create`` (``store.Map.local_create``) as :func:`local_of` gives
    ``local``."""
    if hasattr(type(map_), "local_create"):
        return map_.local_create  # type: ignore[no-any-return]
    return _not_here


class Verdict(enum.IntEnum):
    """What happens to a packet: forwarded (perhaps rewritten in place) or dropped."""

    FORWARD = 0
    DROP = 1


class ConfigError(ValueError):
    """A configuration the NF cannot run with (one line saying what and where)."""


class NF(abc.ABC):
    """The base of every network function.

    Subclasses set ``name``, ``bidirectional`` and ``output_query``, declare their maps in
    ``__init__`` and implement ``process`` and ``query``; ``tick``, ``add_arguments`` and
    ``config_from`` have defaults that do nothing special."""

    #: The name the NF is installed under (its ``s6.nf`` entry point).
    name: ClassVar[str]
    #: True: both directions of a connection are one flow (``packet.flow_key_both()``);
    #: False: each direction is its own flow (``packet.flow``).
    bidirectional: ClassVar[bool] = True
    #: The query whose answer (a list of text lines) the offline runner prints.
    output_query: ClassVar[str] = "statistics"
    #: What ``process`` returns for a frame that did not parse (``packet.drop`` set).
    malformed_verdict: ClassVar[Verdict] = Verdict.FORWARD
    #: How often (seconds of the NF's clock) ``tick`` wants to run.
    tick_interval: ClassVar[float] = 1.0
    #: Whether a capture of another link type (Linux cooked, raw IP, BSD loopback) is read
    #: as the Ethernet frames of what it holds (True), or as captured, its bytes read as
    #: Ethernet (False: what the program an NF follows does, as prads does).
    decodes_links: ClassVar[bool] = True
    #: The map holding each flow's own state under its flow key (``flow_key``), or None.
    #: A load balancer that steers a flow to the store's owner of that key there (the
    #: sender's ``--steer owner``) has the flow's objects made where their key records
    #: live, so that creating and removing them is local to the instance.
    flow_map: ClassVar[str | None] = None

    def __init__(self, space: Space, config: dict[str, Any]) -> None:
        self.space = space
        self.config = config
        #: Counts of this instance by reason ("packets", each ``Packet.drop`` reason, and
        #: whatever the NF counts); the runner adds them up over the instances.
        self.counts: dict[str, int] = {}

    def count(self, reason: str, n: int = 1) -> None:
        """Add ``n`` to this instance's counter ``reason``."""
        counts = self.counts
        counts[reason] = counts.get(reason, 0) + n

    async def settle(self) -> None:
        """Apply this instance's untethered updates before a query reads shared state
        (``space.flush()``).  Updates that failed since the last flush, lost with a
        member that died or refused by their object, do not fail the query: the answer
        is what the space holds; they are counted (``untethered-failed`` in ``counts``,
        which a live instance reports in its ``serve`` query) and logged."""
        try:
            await self.space.flush()
        except UntetheredCallsFailed as exc:
            self.count("untethered-failed", exc.count)
            logger.warning("%s: %s", self.name, exc)

    def flow_key(self, packet: Packet) -> Hashable:
        """The flow a packet belongs to: the unit of ordering and of spreading."""
        return packet.flow_key_both() if self.bidirectional else packet.flow

    @abc.abstractmethod
    async def process(self, packet: Packet) -> Verdict:
        """Handle one packet; never raises on a malformed one."""

    @abc.abstractmethod
    async def query(self, name: str, **args: Any) -> Any:
        """Answer a control-plane question: at least "statistics" and ``output_query``.
        An unknown name raises ``KeyError`` naming the known ones."""

    async def tick(self, now: float) -> None:  # noqa: B027 (a hook: doing nothing is fine)
        """Run timeouts due at ``now`` (the NF's clock) for this instance's own flows."""

    async def close(self) -> None:  # noqa: B027
        """Called once at the end of a run, before the final output query."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this NF's command-line options (``python -m nf NAME --help``)."""
        return None

    @classmethod
    def config_from(cls, args: argparse.Namespace, toml: dict[str, Any]) -> dict[str, Any]:
        """The NF's configuration from its command-line options and the ``--config`` file
        (already parsed; the NF's own table, or the whole file).  Options given on the
        command line win.  Raises :class:`ConfigError` for a bad value."""
        return dict(toml)
