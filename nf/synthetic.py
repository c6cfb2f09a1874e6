"""A synthetic NF for experiments (paper §7.1 and §7.3): state of a chosen shape and access
pattern, and nothing else.

Per flow (both directions: one flow), ``flow_objects`` SingleWriter objects of about
``object_size`` bytes each, accessed ``per = "packet"`` (read and written on every packet)
or ``per = "flow"`` (written on the flow's first packet, read on the others: the NAT's
pattern).  ``shared_objects`` MultiWriter counters, one touched every ``shared_every``
packets (0: never), chosen ``shared_pattern = "flow"`` (a fixed one per flow),
``"round-robin"`` (the next one each time: the worst case, every access on a different
object) or ``"random"`` (a seeded draw), and accessed ``shared_access = "blocking"`` (a call
that waits for its answer), ``"untethered"`` (an update that does not wait; the counters
merge, so each member may keep a replica) or ``"stale"`` (a cached read at most 1 s old,
the bound of the paper's Figure 9b).  A flow's objects are removed on a RST, or on the
first packet without FIN after FINs in both directions (the last ACK).

Output (``summary``): three totals, the same whatever the number of members: the flows
still live at the end, their packets, and the shared updates applied (blocking and
untethered; stale reads change nothing).
"""

from __future__ import annotations

import argparse
import random
from typing import Any, ClassVar

from nf.base import NF, ConfigError, Verdict, local_create_of, local_of
from nf.packet import FIN, RST, TCP, Packet
from store import MultiWriter, SingleWriter, stale, untethered

__all__ = ["FlowBlob", "SharedCounter", "Synthetic"]

DEFAULTS: dict[str, Any] = {
    "flow_objects": 1,
    "object_size": 64,
    "per": "packet",
    "shared_objects": 16,
    "shared_every": 1,
    "shared_pattern": "flow",
    "shared_access": "untethered",
    "seed": 1,
}
CHOICES = {
    "per": ("packet", "flow"),
    "shared_pattern": ("flow", "round-robin", "random"),
    "shared_access": ("blocking", "untethered", "stale"),
}


class FlowBlob(SingleWriter):
    """One per-flow object: counters and a blob of the configured size."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.fins = 0
        self.blob = b""

    def write(self, size: int, blob_size: int) -> int:
        """Count a packet; the FINs seen so far."""
        if len(self.blob) != blob_size:
            self.blob = bytes(blob_size)
        self.packets += 1
        self.bytes += size
        return self.fins

    def read(self) -> int:
        """The FINs seen so far."""
        return self.fins

    def fin(self) -> int:
        self.fins += 1
        return self.fins


class SharedCounter(MultiWriter):
    """A shared counter: blocking, untethered and stale access, and a merge."""

    def __init__(self) -> None:
        self.updates = 0
        self.bytes = 0

    def add(self, size: int) -> int:
        self.updates += 1
        self.bytes += size
        return self.updates

    @untethered
    def add_later(self, size: int) -> None:
        self.updates += 1
        self.bytes += size

    @stale(max_age=1.0)
    def value(self) -> int:
        return self.updates

    def merge(self, other: SharedCounter) -> None:
        self.updates += other.updates
        self.bytes += other.bytes


class Synthetic(NF):
    """Synthetic state of a chosen shape and access pattern (for experiments)."""

    name: ClassVar[str] = "synthetic"
    bidirectional: ClassVar[bool] = True
    flow_map: ClassVar[str | None] = "synthetic.flows"
    output_query: ClassVar[str] = "summary"

    def __init__(self, space: Any, config: dict[str, Any]) -> None:
        super().__init__(space, config)
        unknown = sorted(set(config) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown synthetic option(s): {', '.join(unknown)}")
        cfg = {**DEFAULTS, **config}
        for option, allowed in CHOICES.items():
            if cfg[option] not in allowed:
                raise ConfigError(f"{option}: {cfg[option]!r} is not one of {allowed}")
        try:
            self.flow_objects = int(cfg["flow_objects"])
            self.object_size = int(cfg["object_size"])
            self.shared_objects = int(cfg["shared_objects"])
            self.shared_every = int(cfg["shared_every"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a number is expected: {exc}") from None
        if self.flow_objects < 1 or self.object_size < 0 or self.shared_objects < 0:
            raise ConfigError("flow_objects >= 1, object_size >= 0, shared_objects >= 0")
        if self.shared_every < 0:
            raise ConfigError("shared_every must not be negative")
        self.per_packet = cfg["per"] == "packet"
        self.pattern = cfg["shared_pattern"]
        self.access = cfg["shared_access"]
        self.rng = random.Random(cfg["seed"])
        self.flows = space.map("synthetic.flows", FlowBlob)
        self.shared = space.map("synthetic.shared", SharedCounter)
        self._flow_here = local_create_of(self.flows)
        self._flow_local = local_of(self.flows)
        self._shared_here = local_create_of(self.shared)
        self._packets = 0  # this instance's packets (for every-nth and round-robin)
        self._next_shared = 0

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--flow-objects", type=int, metavar="N", help="SingleWriter objects per flow (1)")
        add("--object-size", type=int, metavar="BYTES", help="bytes per flow object (64)")
        add("--per", choices=CHOICES["per"], help="flow objects written per packet or per flow")
        add("--shared-objects", type=int, metavar="N", help="MultiWriter counters (16)")
        add("--shared-every", type=int, metavar="N", help="touch one every N packets (1)")
        add("--shared-pattern", choices=CHOICES["shared_pattern"], help="which one (flow)")
        add("--shared-access", choices=CHOICES["shared_access"], help="how (untethered)")

    @classmethod
    def config_from(cls, args: argparse.Namespace, toml: dict[str, Any]) -> dict[str, Any]:
        config = dict(toml)
        for name in DEFAULTS:
            value = getattr(args, name, None)
            if value is not None:
                config[name] = value
        return config

    async def process(self, packet: Packet) -> Verdict:
        if packet.drop is not None:
            self.count(packet.drop)
            return self.malformed_verdict
        key = packet.flow_key_both()
        size = packet.pend - packet.l3
        first = False
        fins = 0
        flows = self.flows
        for i in range(self.flow_objects):
            # In place when held here (or made here at once), else through a reference.
            # A blob is new when it has counted no packet: the first access writes it.
            blob = self._flow_here((*key, i) if i else key)
            if blob is not None:
                created = blob.packets == 0
                if created:
                    first = True
                if self.per_packet or created:
                    fins = blob.write(size, self.object_size)
                else:
                    fins = blob.read()
                continue
            async with flows.create((*key, i) if i else key) as ref:
                if ref.created:
                    first = True
                if self.per_packet or ref.created:
                    fins = await ref.write(size, self.object_size)
                else:
                    fins = await ref.read()
        if first:
            self.count("flows")
        self._packets += 1
        if self.shared_objects and self.shared_every and self._packets % self.shared_every == 0:
            await self._shared(key, size)
        if packet.proto == TCP:
            flags = packet.tcp_flags
            if flags & RST or (fins >= 2 and not flags & FIN):
                await self._end(key)
            elif flags & FIN:
                blob = self._flow_local(key)
                if blob is not None:
                    blob.fin()
                else:
                    async with flows.get(key) as ref:
                        await ref.fin()
        return Verdict.FORWARD

    async def _shared(self, key: tuple[int, ...], size: int) -> None:
        if self.pattern == "flow":
            which = hash(key) % self.shared_objects
        elif self.pattern == "round-robin":
            which = self._next_shared
            self._next_shared = (which + 1) % self.shared_objects
        else:
            which = self.rng.randrange(self.shared_objects)
        self.count("shared-accesses")
        counter = self._shared_here(which)
        if counter is not None:  # held here: in place
            if self.access == "blocking":
                counter.add(size)
            elif self.access == "untethered":
                counter.add_later(size)
            else:
                counter.value()
            return
        async with self.shared.create(which) as ref:
            if self.access == "blocking":
                await ref.add(size)
            elif self.access == "untethered":
                await ref.add_later(size)
            else:
                await ref.value()

    async def _end(self, key: tuple[int, ...]) -> None:
        for i in range(self.flow_objects):
            await self.flows.remove((*key, i) if i else key)
        self.count("flows-ended")

    async def query(self, name: str, **args: Any) -> Any:
        if name == "statistics":
            return dict(self.counts)
        if name == "summary":
            await self.settle()
            packets = flows = 0
            async for key, blob in self.flows.items():
                if len(key) == 5:
                    flows += 1
                    packets += blob.packets
            updates = 0
            async for _key, counter in self.shared.items():
                updates += counter.updates
            return [
                f"live flows {flows}",
                f"packets of live flows {packets}",
                f"shared updates {updates}",
            ]
        raise KeyError(f"unknown query {name!r} (known: statistics, summary)")
