"""The live traffic sender: a capture replayed at a rate, steered over the NF instances.

::

    python -m bench.sender --controller HOST:PORT --sink HOST:PORT --pcap FILE
        [--rate PPS] [--flows N] [--duration S] [--steer hash|owner] [--steer-over S]
        [--owner-map MAP] [--min-instances N] [--nf NAME] [--poll S] [--secret-file F]
        [--stop-the-world auto|on|off] [--keep-order on|off] [--move-timeout S]
        [-- NF OPTIONS]

* **Traffic.** The capture's frames in file order, paced to ``--rate`` frames per second
  (in small bursts, one datagram per instance per burst, a few hundred bursts a second).
  ``--flows N`` larger than the capture's flow count replays it again with fresh
  addresses (pass k XORs k into the second octet of every IPv4 address, the third-last of
  every IPv6 one, checksums fixed), until
  N flows have been started; ``--duration`` loops the same way until the time is up.  Each
  frame carries its flow's number (the NF's unit of order with ``--nf``: its ``flow_key``,
  so each direction for the NAT; else a connection), its sequence number in the flow and
  its send time (:mod:`nf.datachannel`).
* **Instances** are the members whose ``ctl status`` figures carry the labels ``nf`` and
  ``data`` (``nf.serve``), followed by polling the controller's status every ``--poll``
  seconds; an instance is steered to once its role is ``member``.
* **Steering.** ``hash`` (the paper's set-up): a consistent-hash ring
  (``ring.hashring.HashRing``, the store's own) over the instances' names and the flow's
  direction-free 5-tuple, so a join moves about 1/(N+1) of the flows, all to the new
  instance, never the ``mod N`` reshuffle.  ``owner``: the store's owner of the flow's key
  in the NF's flow map (``--nf``: the map its ``flow_map`` names, under its own
  ``flow_key``, made with the NF options given after ``--`` as its instances get them,
  e.g. the NAT's ``--inside``; ``--owner-map`` names another map; without ``--nf``,
  PRADS's connections under the direction-free 5-tuple), computed from the members the
  controller reports with the ring the store builds (same names, same vnodes, the key hashed
  by ``key_token``), so a flow's objects are created where their key records live; a flow
  whose owner runs no NF is steered by hash.
* **Scaling.** At a scale-out the flows the new ring gives the new instance move to it at
  once, or with ``--steer-over S`` each at its own moment spread over S seconds.  At a
  scale-in (the instance's role becomes ``leaving``, it disappears, or it sent a LEAVING
  datagram, which ``nf.serve`` does on SIGTERM) its flows are steered to the others at once,
  and then it gets an END marker: everything before it was sent.  At the end every instance
  and the sink get an END with the number of frames sent to them.
* **Order kept** (``--keep-order on``, the default; not with ``--steer-over``, and
  stop-the-world has its own pause): at a steering change the flows that change instance
  (both steering modes) are held back, and only they: the sender sends each instance that
  loses flows a MOVE marker naming them after the last frame it sent it, repeated until
  the instance acknowledges (MOVED) that it has processed every frame of those flows it got
  before the marker; then their held frames go, in order, to their new instance.  So no
  frame of a moved flow is processed before an earlier one of it on another instance.  A
  held frame keeps the time it was due (the sink's latency counts the hold).  A leaver's
  END waits for its markers.  After ``--move-timeout`` a marker's flows are released anyway
  (``timed_out``).  A ``paused`` line per change says how long its flows waited.
* **Stop-the-world** (``--stop-the-world``; ``auto``, the default, turns it on once an
  instance reports the label ``backend=stop-the-world``, ``on``/``off`` force it): the
  OpenNF-style baseline (``baselines.stop_the_world``).  At a steering change that moves
  flows which were sent already, the sender sends what it packed, changes the steering, and
  from then on holds back every datagram for every instance; it sends each instance that
  loses flows a MOVE marker naming them and their new instance (repeated until
  acknowledged), which that instance acknowledges once it has processed everything before
  the marker and the new instance holds the flows' objects; then a leaver gets its END,
  and the held datagrams go out, in order.  Nothing is lost or reordered; every frame sent
  meanwhile waits out the pause (a ``paused`` line says how long; ``--move-timeout``
  bounds it).  ``--steer-over`` does not apply, and a steering change that comes during a
  pause waits for its end.

stdout is one JSON object per line: ``ready``, ``started``, one per steering change
(``scale-out``/``scale-in``: the instance, the wall-clock time, the flows moved), and
``paused`` (the pause, the flows and markers, what was held: ``mode`` ``moved-flows`` when
only the moved flows waited, stop-the-world's has none), ``done`` (frames sent, rate
achieved, per instance, CPU): a sender that fell behind its rate or used most of a core
says the run is not valid.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from bench._common import check_capture, split_nf_options
from nf.base import NF, ConfigError
from nf.datachannel import (
    DEFAULT_MAX_DATAGRAM,
    MAX_FRAME,
    MAX_FRAME_IN_DATAGRAM,
    Kind,
    MalformedDatagram,
    Packer,
    decode,
    encode_end,
    encode_move,
    move_room,
)
from nf.packet import Packet, parse
from ring.hashring import DEFAULT_VNODES, HashRing, key_token
from store.cli.common import OneLineParser, address

__all__ = ["Steering", "main", "parse_status"]

#: Share of one core above which the sender may be the bottleneck (see bench.sink).
CPU_LIMIT: Final = 0.85
#: The sender counts itself behind when this many seconds' worth of frames are due at once.
BEHIND_S: Final = 0.05
#: END markers are sent this many times (UDP), a few ms apart; receivers ignore repeats.
END_REPEATS: Final = 3
#: Seconds between repeats of an unacknowledged MOVE marker (stop-the-world).
MOVE_EVERY: Final = 0.05
#: The backend label that turns stop-the-world mode on (``--stop-the-world auto``).
STOP_THE_WORLD: Final = "stop-the-world"
#: Seconds the controller has to answer a status request before it counts as lost.
STATUS_TIMEOUT: Final = 5.0


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": round(time.time(), 4), **fields}), flush=True)


def _spread(flow: int) -> float:
    """A flow's place in [0, 1) for gradual steering: a multiplicative hash of its number."""
    return ((flow * 0x9E3779B1) & 0xFFFFFFFF) / 4294967296.0


@dataclass
class Instance:
    name: str
    data: tuple[str, int]
    packer: Packer
    ended: bool = False
    #: A leaver whose END waits for its MOVE markers' acknowledgements (order kept).
    end_due: bool = False


@dataclass
class Pause:
    """One steering change's re-steer with order kept: its markers, what it held."""

    why: str
    t0: float
    wall0: float
    flows: int
    markers: int = 0
    open: int = 0
    timed_out: int = 0
    #: Markers given up on because the controller declared their instance dead.
    old_gone: int = 0
    held_frames: int = 0
    longest_marker_ms: float = 0.0


@dataclass
class Marker:
    """A MOVE marker to an instance that lost flows, repeated until acknowledged."""

    msg: bytes
    old: str
    addr: tuple[str, int]
    flows: list[int]
    pause: Pause


@dataclass
class Steering:
    """Which instance each flow goes to.  ``hash``: a ring over the instances' names;
    ``owner``: the store's ring over its members, the flow's key's owner when that member
    runs an instance, else the hash choice."""

    mode: str = "hash"
    vnodes: int = DEFAULT_VNODES
    owner_map: str = "prads.connections"
    over: float = 0.0
    names: frozenset[str] = frozenset()
    ring: HashRing = field(default_factory=lambda: HashRing())
    store_ring: HashRing = field(default_factory=lambda: HashRing())
    #: A gradual move: the ring before, when it began.  Flows switch at their own moment.
    old_ring: HashRing | None = None
    old_store_ring: HashRing | None = None
    since: float = 0.0
    cache: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, tuple[int, int]] = field(default_factory=dict)

    def token(self, flow: int, key: Hashable) -> tuple[int, int]:
        tok = self.tokens.get(flow)
        if tok is None:
            owner = key_token(self.owner_map, key) if self.mode == "owner" else 0
            tok = self.tokens[flow] = (key_token("steer", key), owner)
        return tok

    def _choose(self, ring: HashRing, store_ring: HashRing, tok: tuple[int, int]) -> str:
        if self.mode == "owner" and len(store_ring):
            owner = store_ring.owner(tok[1])
            if owner in self.names:
                return owner
        return ring.owner(tok[0])

    def target(self, flow: int, key: Hashable, now: float) -> str:
        name = self.cache.get(flow)
        if name is not None:
            return name
        tok = self.token(flow, key)
        name = self._choose(self.ring, self.store_ring, tok)
        old = self.old_ring
        if old is not None:
            if now >= self.since + self.over:
                self.old_ring = self.old_store_ring = None
            elif now < self.since + self.over * _spread(flow):
                before = self._choose(old, self.old_store_ring or self.store_ring, tok)
                if before in self.names:
                    return before  # not its moment yet: not cached
        self.cache[flow] = name
        return name

    def target_of(self, flow: int, now: float) -> str:
        """:meth:`target` for a flow seen before (its key's tokens are known)."""
        return self.target(flow, flow, now)

    def choices(self) -> dict[int, str]:
        """Where each flow seen so far goes under the current steering (no gradual move)."""
        if not self.names:
            return {}
        ring, store_ring = self.ring, self.store_ring
        return {flow: self._choose(ring, store_ring, tok) for flow, tok in self.tokens.items()}

    def change(self, names: frozenset[str], store_members: frozenset[str], now: float) -> int:
        """Steer over ``names`` from now on; returns the known flows that change instance
        (moving at once, or gradually when ``over`` and instances were added)."""
        ring = HashRing(names, vnodes=self.vnodes) if names else HashRing()
        store_ring = (
            HashRing(store_members, vnodes=self.vnodes)
            if self.mode == "owner" and store_members
            else self.store_ring
        )
        old_names = self.names
        moved = 0
        if names:
            saved = (self.names, self.ring, self.store_ring)
            self.names, self.ring, self.store_ring = names, ring, store_ring
            for flow, before in self.cache.items():
                if (
                    before not in names
                    or self._choose(ring, store_ring, self.tokens[flow]) != before
                ):
                    moved += 1
            self.names, self.ring, self.store_ring = saved
        gradual = self.over > 0 and bool(names - old_names) and bool(old_names)
        if gradual:
            self.old_ring = self.ring  # flows not yet at their moment: as before
            self.old_store_ring = self.store_ring
            self.since = now
        else:
            self.old_ring = self.old_store_ring = None
        self.names, self.ring, self.store_ring = names, ring, store_ring
        self.cache.clear()
        return moved


def parse_status(status: Any, nf_name: str | None) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """From a ``ClusterStatus``: ``{name: (role, data address)}`` of the NF instances (the
    members labelled ``nf`` and ``data``, of ``nf_name`` if given), and the names of the
    ring's members (role member or leaving: the store's ring until the event ends)."""
    instances: dict[str, tuple[str, str]] = {}
    ring: set[str] = set()
    for name, _address, role, _stage, _epoch, connected in status.members:
        if role in ("member", "leaving"):
            ring.add(name)
        figures = status.figures.get(name, {})
        nf, data = figures.get("nf"), figures.get("data")
        if not nf or not data or (nf_name and nf != nf_name):
            continue
        instances[name] = (role if connected else "lost", str(data))
    return instances, ring


def steering_of(
    nf_cls: type[NF], nf_options: list[str], owner_map: str | None
) -> tuple[str, Callable[[Packet], Hashable]]:
    """The map and key function of ``--steer owner`` for an NF: its ``flow_map`` (or
    ``owner_map``) and its own ``flow_key``, from an instance of it made with its options
    as the instances get them."""
    map_name = owner_map or nf_cls.flow_map
    if map_name is None:
        raise ConfigError(f"{nf_cls.name} keeps no per-flow map: give --owner-map MAP")
    return map_name, flow_key_of(nf_cls, nf_options)


def flow_key_of(nf_cls: type[NF], nf_options: list[str]) -> Callable[[Packet], Hashable]:
    """The NF's own ``flow_key``, from an instance of it made with its options as the
    instances get them (on a dicts space: only its key function is used)."""
    from baselines.local_only import LocalOnlySpace

    parser = argparse.ArgumentParser(prog=f"NF options of {nf_cls.name}", add_help=False)
    nf_cls.add_arguments(parser)
    config = nf_cls.config_from(parser.parse_args(nf_options), {})
    dicts: Any = LocalOnlySpace("sender")  # (the Space protocol, on dicts)
    return nf_cls(dicts, config).flow_key


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Sender:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.ident = os.getpid() & 0xFFFFFFFF
        self.sink = _address(args.sink)
        owner_map, self.steer_key = args.owner_steering
        self.steering = Steering(
            mode=args.steer, vnodes=args.vnodes, owner_map=owner_map, over=args.steer_over
        )
        self.instances: dict[str, Instance] = {}
        self.active: set[str] = set()
        self.gone: set[str] = set()  # instances steered away from for good
        self.declared_dead: set[str] = set()  # by the controller (its repairs' last events)
        self.store_members: frozenset[str] = frozenset()
        self.ready = trio.Event()
        self.sent = 0
        self.end_seq = 0
        self.behind = 0
        self.done = False
        #: Cancelled by :meth:`stop` (a signal): the sending ends early but as it ends
        #: at its time, with the end markers sent and the report made.
        self.sending = trio.CancelScope()
        self.last_burst = 0.0  # (monotonic) when the last frames were sent
        self.stopped_by: str | None = None
        self.events: list[dict[str, Any]] = []
        # Stop-the-world: on or not (``auto`` decides from the instances' labels), the
        # datagrams held back during a pause (None: not paused), the MOVE markers not yet
        # acknowledged, and the nursery the pauses run in.
        self.stw = args.stop_the_world == "on"
        self.held: list[tuple[bytes, tuple[str, int]]] | None = None
        self.released = trio.Event()
        self.unacked: dict[int, tuple[bytes, tuple[str, int]]] = {}
        self.acked = trio.Event()
        self.unacked_gone = 0  # markers of a pause whose instance was declared dead
        self.move_seq = 0
        self.nursery: trio.Nursery | None = None
        if self.stw:
            self.steering.over = 0.0
        # Order kept at a re-steer (any backend but stop-the-world, which pauses all): the
        # moved flows whose frames are held back (by flow number), the markers not yet
        # acknowledged (by id), how many of them each old instance owes, and the re-steers
        # under way (the last frames wait for them).  A held flow's frames are (flow seq,
        # send time ns, frame), in order.
        self.keep_order = args.keep_order == "on" and args.steer_over == 0
        self.holding: dict[int, list[tuple[int, int, bytes]]] = {}
        self.markers: dict[int, Marker] = {}
        self.owed: Counter[str] = Counter()
        self.reroutes = 0
        self.rerouted = trio.Event()
        #: Seconds with no instance to send to, and held frames that had none to go to.
        self.no_instance_s = 0.0
        self.unsendable = 0
        #: The capture's frames over the data channel's MAX_FRAME: left out.
        self.too_big = 0

    # -- membership ------------------------------------------------------------------------

    def apply(self, found: dict[str, tuple[str, str]], ring: set[str]) -> None:
        self.store_members = frozenset(ring)
        for name, (_role, data) in found.items():
            if name not in self.instances:
                self.instances[name] = Instance(
                    name, _address(data), Packer(self.ident, self.args.max_datagram)
                )
        added = {
            n for n, (role, _) in found.items() if role == "member" and n not in self.active
        } - self.gone
        removed = {n for n in self.active if n not in found or found[n][0] != "member"}
        if added or removed:
            self._steer(self.active - removed | added, added, removed, "membership")
        dead = self.declared_dead
        for name in [n for n in self.owed if n in dead]:
            self._old_gone(name)
        if self.unacked:  # a stop-the-world pause: the same for its markers
            gone = {inst.data for name, inst in self.instances.items() if name in dead}
            for move_id, (_msg, addr) in list(self.unacked.items()):
                if addr in gone:
                    del self.unacked[move_id]
                    self.unacked_gone += 1
                    self.acked.set()

    def _old_gone(self, name: str) -> None:
        """An instance that owes MOVED answers was declared dead by the controller (a
        repair left it out).  No answer will come, and nothing of its flows is left to
        overtake (what it had not processed died with it), so their held frames go now
        instead of after ``--move-timeout``.  An instance only disconnected from the
        controller, or out of the ring after a scale-in (``ctl scale-in`` ends the event
        while the instance still processes what it was sent), is not given up on: it may
        still be processing, and will answer."""
        now = time.monotonic()
        for move_id, marker in list(self.markers.items()):
            if marker.old == name:
                del self.markers[move_id]
                marker.pause.old_gone += 1
                self._release(marker, now)

    def leaving(self, addr: tuple[str, int]) -> None:
        for inst in self.instances.values():
            if inst.data == addr:
                if inst.name in self.active:
                    self._steer(self.active - {inst.name}, set(), {inst.name}, "leaving")
                elif inst.name in self.gone and inst.ended:
                    self._end(inst)  # it asks again: the END may have been lost
                return

    def _steer(self, names: set[str], added: set[str], removed: set[str], why: str) -> None:
        if self.held is not None:
            # Stop-the-world: a pause's moves are under way, and the datagrams it holds were
            # steered by the change before this one.  This change waits for the release
            # (the next poll sees it again; a leaver repeats its LEAVING).
            return
        now = time.monotonic()
        ordered = self.stw or self.keep_order
        # (no instance left: the flows have nowhere to move; the send loop waits for one)
        before = self.steering.choices() if ordered and names else {}
        if before:
            # The last frames under the old steering go out before any MOVE marker.
            for inst in self.instances.values():
                self._flush(inst)
        moved = self.steering.change(frozenset(names), self.store_members, now)
        self.active = set(names)
        self.gone |= removed
        moves: dict[tuple[str, str], list[int]] = {}
        if before:
            after = self.steering.choices()
            holding = self.holding
            for flow, old in before.items():
                new = after[flow]
                # A flow held already waits for the marker to the instance that has its
                # frames; it goes where the steering says when that one is acknowledged.
                if new != old and flow not in holding:
                    moves.setdefault((old, new), []).append(flow)
        assert self.nursery is not None
        if moves and self.stw:
            self.held = []
            self.released = trio.Event()
            self.nursery.start_soon(self._stop_the_world, moves, sorted(removed), why)
        elif moves:
            self._reroute(moves, why, now)
        for name in sorted(added):
            event = {"kind": "scale-out", "instance": name, "flows_moved": moved, "why": why}
            self.events.append({**event, "t": time.time()})
            _emit("scale-out", **{k: v for k, v in event.items() if k != "kind"})
        for name in sorted(removed):
            inst = self.instances[name]
            self._flush(inst)
            event = {"kind": "scale-in", "instance": name, "flows_moved": moved, "why": why}
            self.events.append({**event, "t": time.time()})
            _emit("scale-in", **{k: v for k, v in event.items() if k != "kind"})
            if self.owed[name]:
                inst.end_due = True  # once its markers are acknowledged (order kept)
            elif self.held is None:
                self._end(inst)  # (stop-the-world: once its flows' state has moved)
        if not self.active and self.ready.is_set():
            self.ready = trio.Event()  # nobody to send to: the send loop waits for this
            _emit("no-instance", why=why)
        elif len(self.active) >= self.args.min_instances:
            self.ready.set()

    def _end(self, inst: Instance) -> None:
        inst.ended = True
        self.end_seq += 1
        msg = encode_end(self.ident, self.end_seq, inst.packer.frames, inst.packer.datagrams)
        for _ in range(END_REPEATS):
            self._send(msg, inst.data)

    async def _stop_the_world(
        self, moves: dict[tuple[str, str], list[int]], removed: list[str], why: str
    ) -> None:
        """One pause: MOVE markers out (repeated until acknowledged, at most
        ``--move-timeout`` seconds), ENDs to the leavers, then the held datagrams."""
        t0, wall0 = time.monotonic(), time.time()
        room = move_room(self.args.max_datagram)
        for (old, new), flows in sorted(moves.items()):
            dest = self.instances[new].data
            for i in range(0, len(flows), room):
                self.move_seq += 1
                msg = encode_move(
                    self.ident, self.move_seq, self.move_seq, dest, flows[i : i + room]
                )
                self.unacked[self.move_seq] = (msg, self.instances[old].data)
        sent = len(self.unacked)
        with trio.move_on_after(self.args.move_timeout) as waiting:
            while self.unacked:
                self.acked = trio.Event()
                for msg, addr in list(self.unacked.values()):
                    self._send(msg, addr)
                with trio.move_on_after(MOVE_EVERY):
                    await self.acked.wait()
        timed_out = len(self.unacked) if waiting.cancelled_caught else 0
        old_gone, self.unacked_gone = self.unacked_gone, 0
        self.unacked.clear()
        for name in removed:
            self._end(self.instances[name])
        held, self.held = self.held or [], None
        for data, addr in held:
            self._send(data, addr)
        self.released.set()
        event = {
            "kind": "paused",
            "why": why,
            "flows_moved": sum(len(f) for f in moves.values()),
            "moves": sent,
            "timed_out": timed_out,
            "old_gone": old_gone,
            "held_datagrams": len(held),
            "pause_ms": round((time.monotonic() - t0) * 1000, 3),
            "t_start": round(wall0, 4),
        }
        self.events.append({**event, "t": time.time()})
        _emit("paused", **{k: v for k, v in event.items() if k != "kind"})

    def moved(self, move_id: int) -> None:
        """A MOVED from an instance: that MOVE is done."""
        if self.unacked.pop(move_id, None) is not None:
            self.acked.set()
        marker = self.markers.pop(move_id, None)
        if marker is not None:
            self._release(marker, time.monotonic())

    # -- re-steering with order kept -------------------------------------------------------

    def _reroute(self, moves: dict[tuple[str, str], list[int]], why: str, now: float) -> None:
        """Hold back the moved flows' frames (the others go on as before) and send each
        instance that loses flows a MOVE marker naming them, after the last frame it got
        under the old steering; a flow's held frames go to its new instance once its old
        one acknowledges that every frame of the flow sent before the marker is processed
        (a flow's units run in order there), so no frame of a moved flow is processed
        before an earlier one of it."""
        pause = Pause(why, now, time.time(), sum(len(f) for f in moves.values()))
        room = move_room(self.args.max_datagram)
        for (old, new), flows in sorted(moves.items()):
            inst, dest = self.instances[old], self.instances[new].data
            for flow in flows:
                self.holding[flow] = []
            for i in range(0, len(flows), room):
                part = flows[i : i + room]
                self.move_seq += 1
                msg = encode_move(self.ident, self.move_seq, self.move_seq, dest, part)
                self.markers[self.move_seq] = Marker(msg, old, inst.data, part, pause)
                self.owed[old] += 1
                pause.markers += 1
                pause.open += 1
                self._send(msg, inst.data)
        self.reroutes += 1
        self.rerouted = trio.Event()
        assert self.nursery is not None
        self.nursery.start_soon(self._repeat_markers, pause)

    async def _repeat_markers(self, pause: Pause) -> None:
        """Repeat a re-steer's unacknowledged markers (UDP) until ``--move-timeout``; then
        release their flows anyway, counted (``timed_out``): a lost instance must not hold
        its flows for ever."""
        with trio.move_on_after(self.args.move_timeout):
            while pause.open:
                await trio.sleep(MOVE_EVERY)
                for marker in list(self.markers.values()):
                    if marker.pause is pause:
                        self._send(marker.msg, marker.addr)
        for move_id, marker in list(self.markers.items()):
            if marker.pause is pause:
                del self.markers[move_id]
                pause.timed_out += 1
                self._release(marker, time.monotonic())

    def _release(self, marker: Marker, now: float) -> None:
        """A marker is acknowledged (or given up on): its flows' held frames go out, in
        order, to where the steering sends each flow now; the pause ends with its last
        marker."""
        pause = marker.pause
        pause.longest_marker_ms = max(pause.longest_marker_ms, (now - pause.t0) * 1000)
        steering, instances, holding = self.steering, self.instances, self.holding
        touched: set[str] = set()
        for flow in marker.flows:
            held = holding.pop(flow, None)
            if not held:
                continue
            pause.held_frames += len(held)
            if not steering.names:  # every instance has gone: lost (the sink counts them)
                self.unsendable += len(held)
                continue
            name = steering.target_of(flow, now)
            inst = instances[name]
            for seq, sent_ns, frame in held:
                # The frame keeps the time it was due: the sink's latency counts the hold.
                if len(frame) > MAX_FRAME_IN_DATAGRAM:
                    self._send_pieces(inst, flow, seq, sent_ns, frame)
                    continue
                out = inst.packer.add(flow, seq, sent_ns, frame)
                if out is not None:
                    self._send_data(out, inst.data)
            touched.add(name)
        for name in touched:
            self._flush(instances[name])
        old = self.instances[marker.old]
        self.owed[marker.old] -= 1
        if not self.owed[marker.old]:
            del self.owed[marker.old]
            if old.end_due:
                old.end_due = False
                self._end(old)
        pause.open -= 1
        if pause.open:
            return
        event = {
            "kind": "paused",
            "mode": "moved-flows",
            "why": pause.why,
            "flows_moved": pause.flows,
            "moves": pause.markers,
            "timed_out": pause.timed_out,
            "old_gone": pause.old_gone,
            "held_frames": pause.held_frames,
            "pause_ms": round((now - pause.t0) * 1000, 3),
            "t_start": round(pause.wall0, 4),
        }
        self.events.append({**event, "t": time.time()})
        _emit("paused", **{k: v for k, v in event.items() if k != "kind"})
        self.reroutes -= 1
        if not self.reroutes:
            self.rerouted.set()

    async def follow(self) -> None:
        """Poll the controller's status and follow the instances.  A controller that dies,
        stalls or restarts is waited for (one ``controller-lost`` line, then
        ``controller-back``): the instances serve on without it, so the traffic goes on,
        steered as it was.  A wrong secret ends the sender."""
        from store.cli.ctl import CtlError, request_status
        from store.shell.transport import connect_peer
        from store.wire.errors import AuthenticationError, PeerUnavailable, StoreError

        host, port = _address(self.args.controller)
        lost: str | None = None
        while not self.done:
            try:
                async with connect_peer(
                    host,
                    port,
                    secret=self.args.secret,
                    name=f"sender-{os.getpid()}",
                    timeout=5.0,
                    close_timeout=0.2,
                ) as peer:
                    while not self.done:
                        # Brief: the labels say which members run an NF and where; the
                        # figures would cost every member a pass over all it holds, five
                        # times a second.
                        with trio.fail_after(STATUS_TIMEOUT):
                            status = await request_status(peer, brief=True)
                        if status.epoch == 0 and not status.members:
                            # A controller that knows no ring: a fresh one, or one restarted
                            # and still learning the ring back from the members (which
                            # come back all at once).  Its empty membership says nothing.
                            await trio.sleep(self.args.poll)
                            continue
                        if lost is not None:
                            _emit("controller-back", after=lost)
                            lost = None
                        last = status.last_event
                        if last.get("kind") == "repair" and last.get("dead"):
                            self.declared_dead.update(
                                n.strip() for n in str(last["dead"]).split(",") if n.strip()
                            )
                        if not self.stw and self.args.stop_the_world == "auto":
                            labels = status.figures.values()
                            if any(f.get("backend") == STOP_THE_WORLD for f in labels):
                                self.stw = True
                                self.steering.over = 0.0  # flows move at once, in the pause
                        self.apply(*parse_status(status, self.args.nf))
                        await trio.sleep(self.args.poll)
            except AuthenticationError:
                raise
            except (CtlError, PeerUnavailable, StoreError, OSError, trio.TooSlowError) as exc:
                if lost is None:
                    lost = f"{type(exc).__name__}: {exc}"[:300]
                    _emit("controller-lost", error=lost)
                await trio.sleep(self.args.poll)

    async def listen(self) -> None:
        """LEAVING datagrams from instances."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            while True:
                try:
                    raw, addr = self.sock.recvfrom(65536)
                except BlockingIOError:
                    break
                try:
                    d = decode(raw)
                except MalformedDatagram:
                    continue
                if d.kind == Kind.LEAVING:
                    self.leaving(addr)
                elif d.kind == Kind.MOVED:
                    self.moved(d.move_id)

    # -- the data path ---------------------------------------------------------------------

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        while True:
            try:
                self.sock.sendto(data, addr)
                return
            except BlockingIOError:
                time.sleep(0.0002)  # loopback: the buffer empties within microseconds
            except ConnectionRefusedError:
                return  # an ICMP error of an earlier datagram to a gone port: not this one

    def _send_data(self, data: bytes, addr: tuple[str, int]) -> None:
        """A DATA datagram to an instance: sent, or held back during a pause."""
        held = self.held
        if held is None:
            self._send(data, addr)
        else:
            held.append((data, addr))

    def _send_pieces(self, inst: Instance, flow: int, seq: int, sent_ns: int, frame: bytes) -> None:
        """A frame too big for one datagram: in PIECE datagrams, after what was batched."""
        for out in inst.packer.pieces(flow, seq, sent_ns, frame):
            self._send_data(out, inst.data)

    def _flush(self, inst: Instance) -> None:
        out = inst.packer.take()
        if out is not None:
            self._send_data(out, inst.data)

    def frames(self) -> Any:
        """(flow number, key to steer by, frame) in sending order, pass after pass.  A flow
        is the NF's own unit of order (its ``flow_key``, with ``--nf``: a connection for
        PRADS and the IDS, each direction for the NAT; else a connection), the one whose
        packets it promises to handle in order, and what the sink measures reordering in;
        ``--flows`` counts connections.  The key is direction-free (both directions of a
        connection go to one instance), or with ``--steer owner`` the NF's own flow key
        (the key of its objects in ``flow_map``)."""
        packets = self.args.packets
        base: dict[Hashable, int] = {}
        units: dict[Hashable, int] = {}
        first: list[tuple[int, int, Hashable, bytes]] = []
        steer_key, order_key = self.steer_key, self.args.order_key
        for ts, frame in packets:
            if len(frame) > MAX_FRAME:
                self.too_big += 1
                continue
            p = parse(frame, ts)
            conn = base.setdefault(p.flow_key_both(), len(base))
            flow = units.setdefault(order_key(p), len(units))
            first.append((conn, flow, steer_key(p), frame))
        n_flows, n_units = len(base), len(units)
        if self.too_big:
            print(
                f"python -m bench.sender: warning: {self.too_big} frames of {self.args.pcap} "
                f"are over {MAX_FRAME} bytes: left out",
                file=sys.stderr,
            )
        if not first:
            return
        want = self.args.flows or n_flows
        timed = self.args.duration is not None
        passes = math.ceil(want / n_flows) if not timed else 256
        self.capture_flows = n_flows
        # --first-pass: a sender run after another one on the same instances starts on
        # addresses the earlier one did not use, so its flows are new to the NF.
        first_pass = self.args.first_pass
        for k in range(first_pass, first_pass + passes):
            last = first_pass + passes - 1
            limit = n_flows if timed or k < last else want - (k - first_pass) * n_flows
            if k == 0:
                for conn, flow, key, frame in first:
                    if conn < limit:
                        yield flow, key, frame
                continue
            if k > 255:
                return
            mask = k << 16
            for conn, flow, _key, frame in first:
                if conn >= limit:
                    continue
                p = parse(frame, 0.0)
                if p.drop is None or p.drop == "ipv6":
                    p.rewrite_src(p.src ^ mask, p.sport)
                    p.rewrite_dst(p.dst ^ mask, p.dport)
                yield k * n_units + flow, steer_key(p), bytes(p.frame)

    async def send(self) -> dict[str, Any]:
        args = self.args
        rate = args.rate
        # The generator reads and parses the whole capture before its first frame: done
        # here, before the clock starts, or the first burst is late and the sender counts
        # itself behind its rate.
        frames = self.frames()
        head = next(frames, None)
        source = itertools.chain([] if head is None else [head], frames)
        seqs: dict[int, int] = {}
        instances = self.instances
        cpu0 = time.process_time()
        origin = time.monotonic()
        with self.sending:  # (stopped by a signal even while it waits for instances)
            with trio.fail_after(args.wait):
                await self.ready.wait()
            _emit("started", instances=sorted(self.active))
            cpu0 = time.process_time()
            origin = time.monotonic()
            await self._pace(source, seqs, origin)
        # From the first frame: ``start`` moved on when the sender fell behind, so that the
        # rate achieved is not made to look higher by it.
        seconds = time.monotonic() - origin
        ended = time.time()
        cpu = time.process_time() - cpu0
        self.done = True
        while self.held is not None:  # a pause under way: its traffic goes out first
            await self.released.wait()
        while self.reroutes:  # re-steers under way: their held frames go out first
            await self.rerouted.wait()
        for inst in instances.values():
            self._flush(inst)
            if not inst.ended and inst.packer.frames:
                self._end(inst)
        self.end_seq += 1
        end_msg = encode_end(self.ident, self.end_seq, self.sent, 0)
        for _ in range(END_REPEATS):
            self._send(end_msg, self.sink)
        share = cpu / seconds if seconds > 0 else 0.0
        # The rate is over the time it could send, up to its last burst and one period
        # after it (a short capture sent once ends well before the next period would).
        span = min(seconds, self.last_burst - origin + 1 / rate) if self.sent else seconds
        sending = span - self.no_instance_s
        achieved = self.sent / sending if sending > 0 else 0.0
        # (a short run is judged by its lag: the timer's slack of a millisecond or so is a
        # large share of a capture sent in a few milliseconds)
        lag = sending - self.sent / rate
        keeps_up = (
            achieved >= 0.95 * rate or lag < 0.005 or self.sent == 0 or self.stopped_by is not None
        )
        return {
            "sent": self.sent,
            "ended_t": round(ended, 4),
            "flows": len(seqs),
            "capture_flows": self.capture_flows,
            "seconds": round(seconds, 3),
            "rate": rate,
            "rate_achieved": round(achieved, 1),
            "behind": self.behind,
            "no_instance_s": round(self.no_instance_s, 3),
            "unsendable": self.unsendable,
            "too_big": self.too_big,
            "per_instance": {n: i.packer.frames for n, i in sorted(instances.items())},
            "cpu": {"seconds": round(cpu, 3), "share_of_core": round(share, 3)},
            "steer": args.steer,
            "steer_over_s": args.steer_over,
            "events": self.events,
            "stopped_by": self.stopped_by,
            "valid": share < CPU_LIMIT and keeps_up,
        }

    def stop(self, why: str) -> None:
        """End the sending now (SIGINT or SIGTERM), as its duration would: what is held
        goes out, the instances and the sink get their END, and the report is made."""
        self.stopped_by = why
        self.sending.cancel()

    async def _pace(self, source: Iterator[Any], seqs: dict[int, int], start: float) -> None:
        """Send the frames of ``source`` at the rate, from ``start``, until the duration
        is over or the capture is (one pass)."""
        args = self.args
        rate = args.rate
        steering = self.steering
        instances = self.instances
        holding = self.holding
        now_ns = time.monotonic_ns
        end = start + args.duration if args.duration is not None else math.inf
        burst_cap = max(1, int(rate * BEHIND_S))
        exhausted = False
        while not exhausted:
            now = time.monotonic()
            if now >= end:
                break
            if not self.active:
                # Every instance has left: send nothing until one joins (or the time is
                # up), and do not count the frames of that time as due.
                with trio.move_on_at(end):
                    await self.ready.wait()
                start += time.monotonic() - now
                self.no_instance_s += time.monotonic() - now
                continue
            due = int((now - start) * rate) - self.sent
            if due <= 0:
                await trio.sleep(max((self.sent + 1) / rate - (now - start), 0.0005))
                continue
            if due > burst_cap:
                # Fallen behind: the frames due are sent as fast as possible, but the pace
                # is not made up later in a burst (which would measure the burst).
                self.behind += 1
                start += (due - burst_cap) / rate
                due = burst_cap
            touched: set[str] = set()
            for _ in range(due):
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                flow, key, frame = item
                seq = seqs.get(flow, 0)
                seqs[flow] = seq + 1
                self.sent += 1
                if holding:
                    held = holding.get(flow)
                    if held is not None:  # moved, its old instance not done with it yet
                        held.append((seq, now_ns(), frame))
                        continue
                name = steering.target(flow, key, now)
                inst = instances[name]
                touched.add(name)
                if len(frame) > MAX_FRAME_IN_DATAGRAM:
                    self._send_pieces(inst, flow, seq, now_ns(), frame)
                    continue
                out = inst.packer.add(flow, seq, now_ns(), frame)
                if out is not None:
                    self._send_data(out, inst.data)
            for name in touched:
                self._flush(instances[name])
            self.last_burst = now
            await trio.lowlevel.checkpoint()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    sender = Sender(args)
    host, port = sender.sock.getsockname()
    _emit("ready", address=f"{host}:{port}")
    async with trio.open_nursery() as nursery:
        sender.nursery = nursery
        nursery.start_soon(sender.follow)
        nursery.start_soon(sender.listen)

        async def stop_on_signal() -> None:
            # The first signal ends the sending as its duration would (the instances
            # and the sink get their END, the report is printed); a second one stops at
            # once.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if sender.stopped_by is None:
                        sender.stop(signal.Signals(signum).name)
                    else:
                        nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        result = await sender.send()
        nursery.cancel_scope.cancel()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The sender's options, checked, with what they imply (the NF's keys)."""
    parser = OneLineParser(prog="python -m bench.sender", description=__doc__)
    parser.add_argument("--controller", required=True, type=address, metavar="HOST:PORT")
    parser.add_argument("--sink", required=True, type=address, metavar="HOST:PORT")
    parser.add_argument("--pcap", required=True, metavar="FILE")
    parser.add_argument("--rate", type=float, default=5000.0, help="frames per second")
    parser.add_argument("--flows", type=int, help="flows to start (more: loops, fresh addresses)")
    parser.add_argument("--duration", type=float, help="seconds to send (loops the capture)")
    parser.add_argument("--steer", choices=("hash", "owner"), default="hash")
    parser.add_argument("--steer-over", type=float, default=0.0, metavar="S")
    parser.add_argument(
        "--owner-map",
        metavar="MAP",
        help="with --steer owner: the map whose key owner a flow goes to (the NF's flow "
        "map; prads.connections without --nf)",
    )
    parser.add_argument("--vnodes", type=int, default=DEFAULT_VNODES, help=argparse.SUPPRESS)
    parser.add_argument("--nf", help="only instances running this NF")
    parser.add_argument("--min-instances", type=int, default=1, metavar="N")
    parser.add_argument("--poll", type=float, default=0.2, metavar="S", help="status poll (0.2)")
    parser.add_argument("--wait", type=float, default=30.0, metavar="S", help="for instances")
    parser.add_argument("--max-datagram", type=int, default=DEFAULT_MAX_DATAGRAM)
    parser.add_argument("--secret-file", metavar="F")
    parser.add_argument(
        "--stop-the-world",
        choices=("auto", "on", "off"),
        default="auto",
        help="hold all traffic while moved flows' state moves (auto: when the instances "
        "run the stop-the-world backend)",
    )
    parser.add_argument(
        "--keep-order",
        choices=("on", "off"),
        default="on",
        help="at a re-steer, hold the moved flows' frames until their old instance has "
        "processed what it got of them (on; not with --steer-over, nor stop-the-world, "
        "which pauses all traffic)",
    )
    parser.add_argument(
        "--move-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="longest wait for a MOVE marker's acknowledgement (10)",
    )
    parser.add_argument(
        "--first-pass",
        type=int,
        default=0,
        metavar="K",
        help="start at pass K of the capture (fresh addresses: 1..255)",
    )
    # What follows a lone "--" is the NF's own options (as its instances get them): with
    # --steer owner the flow key depends on them (the NAT's inside networks).
    own, nf_options = split_nf_options(argv)
    args = parser.parse_args(own)
    args.nf_options = nf_options
    args.owner_steering = (args.owner_map or "prads.connections", Packet.flow_key_both)
    args.order_key = Packet.flow_key_both
    args.decode_links = True
    if args.nf is not None:
        from nf import registry

        try:
            nf_cls = registry.load(args.nf)
            # the frames the NF's offline run reads from the same capture
            args.decode_links = nf_cls.decodes_links
            if args.steer == "owner":  # (one instance of the NF gives both keys)
                args.owner_steering = steering_of(nf_cls, nf_options, args.owner_map)
                args.order_key = args.owner_steering[1]
            else:
                args.order_key = flow_key_of(nf_cls, nf_options)
        except (registry.UnknownNF, ConfigError) as exc:
            parser.error(str(exc))
    if not 0 <= args.first_pass <= 255:
        parser.error("--first-pass must be between 0 and 255")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.flows is not None and args.flows < 1:
        parser.error("--flows must be at least 1")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    for name in ("poll", "wait", "move_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.steer_over < 0:
        parser.error("--steer-over must not be negative")
    if args.min_instances < 1:
        parser.error("--min-instances must be at least 1")
    if args.max_datagram < 64 or args.max_datagram > 65507:
        parser.error("--max-datagram must be between 64 and 65507")
    # The capture is read here, once: a file that is missing or not a capture is one line
    # and exit status 2, before any socket is opened.
    args.packets = check_capture(parser, args.pcap, decode_links=args.decode_links)
    return args


def main(argv: list[str] | None = None) -> int:
    from store.cli.common import read_secret

    args = parse_args(argv)
    args.secret = read_secret(args.secret_file, "python -m bench.sender")
    try:
        result = trio.run(_main, args)
    except trio.TooSlowError:
        print(f"python -m bench.sender: no instances within {args.wait:g} s", file=sys.stderr)
        return 1
    _emit("done", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
