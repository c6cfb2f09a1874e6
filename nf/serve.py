"""``python -m nf serve NAME``: one NF instance process on the live data channel.

::

    python -m nf serve NAME --controller HOST:PORT --data HOST:PORT --sink HOST:PORT
        [--backend s6|local-only|remote-only|redis|stop-the-world] [--store HOST:PORT]
        [--secret-file F]
        [--listen HOST:PORT] [--config FILE.toml] [--forward receipts|frames] [NF options]

The process joins the object space through the controller as an embedded member whose
figures carry the labels ``nf`` (NAME), ``data`` (the bound data address) and ``backend``,
which is how the traffic sender finds the instances and where to send them packets.  It
makes the NF on the backend's space (``s6``: the space itself; the others through
``baselines.open_backend``), then:

* receives DATA datagrams (:mod:`nf.datachannel`) on ``--data`` and runs each frame as a
  microthread of its flow, ``space.submit(nf.flow_key(packet), nf.process, packet)``, so a
  flow's packets are handled in order wherever its state is; the NF's clock is the frame's
  send time (``CLOCK_OFFSET``: the arrival time less the trip, in the sender's order);
* sends the sink a receipt of each frame (flow, sequence number, send time, forwarded
  length, verdict), batched into RECEIPT datagrams, or with ``--forward frames`` the
  forwarded frames themselves as DATA (drops still as receipts), so the sink can tell an
  NF's drop from a loss;
* runs ``nf.tick(now)`` every ``tick_interval`` seconds of that clock;
* answers the control-plane queries the controller relays (``python -m nf query``): the
  NF's own, plus ``serve`` (this process's counters);
* counts a datagram it cannot decode by reason and goes on;
* answers a MOVE marker (a re-steer with order kept: the sender holds the named flows'
  later frames back meanwhile) once every frame of those flows received before it is
  processed, without waiting for the other flows' traffic: the flows' objects follow
  them lazily, and their packets are not processed out of order across the two instances;
* on the ``stop-the-world`` backend (``baselines.stop_the_world``), moves flows' state in
  bulk when the sender asks: a MOVE marker (the flows, their new instance) is answered once
  everything before it is processed, by handing the flows' recorded objects to the new
  instance (HANDOFF), which acquires them all at once and acknowledges (MOVED); then this
  instance acknowledges the MOVE, and the sender releases the traffic it held.

Leaving.  SIGTERM (or SIGINT), or a ``ctl scale-in`` of this member, starts a graceful
leave: the instance tells every sender it has heard from (a LEAVING datagram, repeated until
answered), each sender steers this instance's flows elsewhere and then sends it an END
marker; once every sender's END is in (or ``--leave-timeout`` passed), the instance stops
receiving, finishes the units in flight, flushes its receipts, and leaves the space,
handing its objects on.  Under ``ctl scale-in`` all of that runs inside the event's first
stage (the space's ``on_scale_in`` hook, within its budget: the END wait gets the budget
less ``FINISH_MARGIN``), so that the store hands on everything this instance will ever
hold: an object acquired after the hand-over would be left behind with the process.

``S6_PROFILE=PREFIX`` in the environment runs the instance under cProfile (CPU time) and
writes its statistics to ``PREFIX.PID`` at exit (``bench.backends`` and ``bench.live`` pass
the environment on to the instances they start).

stdout is one JSON object per line: ``ready`` (name, data address, pid) first, then
``leaving``, ``end`` (per sender: frames it sent here, frames received from it),
``bad-datagram`` (the first of each reason, then at powers of two) and ``exit`` (the
counters) last.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from functools import partial
from typing import Any, Final

import trio

from baselines import STORE_BACKENDS
from nf import registry
from nf.base import NF, ConfigError, Verdict
from nf.datachannel import (
    DEFAULT_MAX_DATAGRAM,
    Datagram,
    Frame,
    Kind,
    MalformedDatagram,
    Packer,
    Reassembler,
    ReceiptPacker,
    decode,
    encode_handoff,
    encode_leaving,
    encode_moved,
    frame_fits,
    handoff_room,
    now_ns,
)
from nf.packet import Packet, parse
from store import SchedulerFull
from store.api import Space
from store.wire.errors import StoreError, first_leaf

__all__ = ["BACKENDS", "Instance", "main"]

BACKENDS: Final = ("s6", "local-only", "remote-only", "redis", "stop-the-world")
#: Seconds between sends of what is batched for the sink, when the receive loop is idle
#: (it sends after each datagram otherwise): the most a receipt of a parked unit waits.
FLUSH_EVERY: Final = 0.002
#: Seconds of a scale-in's budget (``store.shell.member.SCALE_IN_BUDGET``) kept for the
#: parked units and the last flush once the senders' END markers are in (or given up).
FINISH_MARGIN: Final = 1.0
#: Seconds between LEAVING datagrams while a sender has not answered with END.
LEAVING_EVERY: Final = 0.05
#: Frames the receive loop handles before it lets the other tasks run, when the data
#: socket is not empty sooner.
DRAIN_FRAMES: Final = 64
#: Receive buffer asked of the kernel (it caps it at twice ``net.core.rmem_max``).
RCVBUF: Final = 8 << 20
#: Parked units whose wait is kept for the ``serve`` query's percentiles.
WAITED_KEPT: Final = 100_000
#: Seconds between repeats of an unacknowledged HANDOFF part (UDP), and how long a move
#: waits for the new instance before it gives up (the flows' objects then move on their
#: next packet, as on S6).
HANDOFF_EVERY: Final = 0.05
HANDOFF_TIMEOUT: Final = 10.0

logger = logging.getLogger("nf.serve")

#: The NF's clock is the host's monotonic clock (the one the data channel's send times
#: use) shifted to Unix time by a whole number of seconds, the same in every process of the
#: host: a packet's time is the moment the sender sent it.  Arrival time would do as the
#: clock too, but a burst's frames reach two instances in two datagrams, so arrival times
#: would order frames of different instances otherwise than the sender sent them, and an
#: NF that keeps the first of several observations (PRADS's assets) would keep another one
#: than the offline run on the same traffic.
CLOCK_OFFSET: Final = float(round(time.time() - time.monotonic()))


def nf_clock() -> float:
    """Now on the NF's clock."""
    return time.monotonic() + CLOCK_OFFSET


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


class Instance:
    """The data path of one instance: datagrams in, microthreads, receipts out."""

    def __init__(
        self,
        nf: NF,
        space: Any,
        data: socket.socket,
        sink: tuple[str, int],
        *,
        forward_frames: bool = False,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
    ) -> None:
        self.nf = nf
        self.space = space
        self.data = data
        self.sink = sink
        self.forward_frames = forward_frames
        self.ident = os.getpid() & 0xFFFFFFFF
        # Receipts and forwarded frames go out on a plain non-blocking socket: a send from
        # a unit's done-callback (a parked packet finishing) cannot await.
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.out.setblocking(False)
        self.receipts = ReceiptPacker(self.ident, max_datagram)
        #: Frames that came in PIECE datagrams, being put back together.
        self.pieces = Reassembler()
        self.frames_out = Packer(self.ident, max_datagram)
        self.backlog: collections.deque[bytes] = collections.deque()
        #: Set when a receipt or a datagram waits for the flusher (see ``flusher``).
        self.unsent = trio.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.bad: collections.Counter[str] = collections.Counter()
        #: Frames received per sender address, and the END each sender sent.
        self.received: collections.Counter[tuple[str, int]] = collections.Counter()
        self.ends: dict[tuple[str, int], Datagram] = {}
        self.parked = 0
        #: How long parked units waited (ns), the first WAITED_KEPT of them.
        self.waited: list[int] = []
        self.idle = trio.Event()
        self.idle.set()
        self.leaving: str | None = None
        self.all_ended = trio.Event()
        self._leaving_seq = 0
        # Stop-the-world: the space that knows each flow's objects, the flow key of each of
        # the sender's flow numbers seen here (a MOVE names flows by number), the moves
        # (by sender and id) and hand-offs (by old instance, id and part) being done or
        # done, the acknowledgements awaited for this instance's own hand-offs.
        self.stw = space if hasattr(space, "take_records") else None
        self.flow_keys: dict[int, Hashable] | None = {} if self.stw is not None else None
        self.moves: dict[tuple[tuple[str, int], int], bool] = {}
        self.handoffs: dict[tuple[tuple[str, int], int, int], bool] = {}
        self.awaiting: dict[tuple[int, int], trio.Event] = {}
        self._handoff_id = 0
        #: The store's own figures (``Space.statistics()``) when the leave began, for the
        #: exit line: what the state management cost before the leave's traffic.
        self.store_figures: dict[str, Any] = {}
        self._seq = 0
        # Re-steers with order kept (every backend but stop-the-world): the parked units of
        # each of the sender's flow numbers (only while some are: a flow whose units all
        # finished is processed, whatever its key), the MOVE markers waiting for some of
        # their flows' units (by sender and id; None once acknowledged) and which markers
        # each such flow holds up.
        self.pending: dict[int, int] = {}
        self.markers: dict[tuple[tuple[str, int], int], set[int] | None] = {}
        self.held_up: dict[int, list[tuple[tuple[str, int], int]]] = {}
        self.tasks: trio.Nursery | None = None
        # The store's Space.submit_nowait only passes the call on to its scheduler's: a
        # frame per packet saved by calling that directly (a baseline's space is not one).
        self._submit_nowait: Callable[..., Any] = (
            space.node.micro.submit_nowait if type(space) is Space else space.submit_nowait
        )

    # -- the packet path -------------------------------------------------------------------

    async def on_data(self, dgram: Datagram, addr: tuple[str, int]) -> None:
        nf = self.nf
        process = nf.process
        flow_key = nf.flow_key
        submit = self._submit_nowait
        settle = self._settle
        offset = CLOCK_OFFSET
        keys = self.flow_keys
        pending = self.pending
        self.received[addr] += len(dgram.frames)
        for frame in dgram.frames:
            packet = parse(frame.data, frame.sent_ns / 1e9 + offset)
            key = flow_key(packet)
            if keys is not None:
                keys[frame.flow] = key
            try:
                unit = submit(key, process, packet)
            except SchedulerFull:  # the bound on parked units: wait for room (backpressure)
                unit = await self.space.submit(key, process, packet)
            if unit.done():
                settle(unit, frame, packet)
            else:
                if not self.parked:
                    self.idle = trio.Event()
                self.parked += 1
                pending[frame.flow] = pending.get(frame.flow, 0) + 1
                unit.add_done_callback(partial(self._settle_parked, frame, packet, now_ns()))
        self.counts["frames"] += len(dgram.frames)

    def _settle_parked(self, frame: Frame, packet: Packet, since: int, unit: Any) -> None:
        waited = self.waited
        if len(waited) < WAITED_KEPT:
            waited.append(now_ns() - since)
        self._settle(unit, frame, packet)
        self.unsent.set()
        self.parked -= 1
        if not self.parked:
            self.idle.set()
        flow = frame.flow
        left = self.pending[flow] - 1
        if left:
            self.pending[flow] = left
        else:
            del self.pending[flow]
            for marker in self.held_up.pop(flow, ()):
                waiting = self.markers[marker]
                assert waiting is not None
                waiting.discard(flow)
                if not waiting:
                    self._marker_done(marker)

    def _settle(self, unit: Any, frame: Frame, packet: Packet) -> None:
        if unit.failed():
            # A bug of the NF (process must not raise): counted, the frame forwarded as is.
            self.counts[f"nf-error-{type(unit.exception()).__name__}"] += 1
            verdict = Verdict.FORWARD
        else:
            verdict = unit.result()
        if self.forward_frames and verdict == Verdict.FORWARD and frame_fits(packet.frame):
            out = self.frames_out.add(frame.flow, frame.seq, frame.sent_ns, packet.frame)
        else:
            out = self.receipts.add(
                frame.flow, frame.seq, frame.sent_ns, len(packet.frame), int(verdict)
            )
        if out is not None:
            self._send(out)

    def _send(self, data: bytes) -> None:
        if self.backlog:
            self.backlog.append(data)
            return
        try:
            self.out.sendto(data, self.sink)
        except BlockingIOError:  # the socket's buffer is full: keep order, retry soon
            self.backlog.append(data)
            self.unsent.set()
        except OSError as exc:  # nobody listens at the sink (yet): counted, not fatal
            self.counts[f"sink-{type(exc).__name__}"] += 1

    def flush(self) -> None:
        """Send what is batched for the sink, and retry what the socket refused before."""
        while self.backlog:
            try:
                self.out.sendto(self.backlog[0], self.sink)
            except BlockingIOError:
                self.unsent.set()  # still full: the flusher tries again
                return
            except OSError as exc:
                self.counts[f"sink-{type(exc).__name__}"] += 1
            self.backlog.popleft()
        for packer in (self.receipts, self.frames_out):
            out = packer.take()
            if out is not None:
                self._send(out)

    # -- the loops -------------------------------------------------------------------------

    async def receive(self) -> None:
        """Datagrams in, until cancelled.

        The socket is read without yielding for as long as it holds datagrams, up to
        :data:`DRAIN_FRAMES` frames, and the sink's batch is sent once after them: the
        messages the frames' microthreads make for other members then leave in one
        frame per member rather than one per datagram (a frame between members costs far
        more than a message in it), and the receipts in fewer datagrams.  The bound keeps
        the other tasks (the replies that resume parked units, the node's sender) from
        waiting long behind a full socket."""
        data = self.data
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        async with trio.open_nursery() as tasks:
            self.tasks = tasks
            while True:
                budget = DRAIN_FRAMES
                while budget > 0:
                    try:
                        raw, addr = data.recvfrom(65536)
                    except BlockingIOError:
                        break
                    except OSError as exc:  # an ICMP error of an earlier send: not fatal
                        self.counts[f"receive-{type(exc).__name__}"] += 1
                        continue
                    budget -= await self.on_datagram(raw, addr)
                self.flush()
                if budget > 0:  # the socket is empty
                    await wait_readable(data)
                else:
                    await checkpoint()

    async def on_datagram(self, raw: bytes, addr: tuple[str, int]) -> int:
        """One datagram of the data channel; the frames it carried (at least 1)."""
        try:
            dgram = decode(raw)
        except MalformedDatagram as exc:
            self._bad(exc.reason, addr)
            return 1
        kind = dgram.kind
        if kind == Kind.DATA:
            await self.on_data(dgram, addr)
            return max(len(dgram.frames), 1)
        if kind == Kind.PIECE:  # of a frame too big for one datagram
            whole = self.pieces.add(addr, dgram)
            if whole is not None:
                await self.on_data(replace(dgram, kind=Kind.DATA, frames=[whole]), addr)
            return 1
        if kind == Kind.END:
            self._end(dgram, addr)
        elif self.stw is not None and kind in (Kind.MOVE, Kind.HANDOFF, Kind.MOVED):
            self._stop_the_world(dgram, addr)
        elif kind == Kind.MOVE:
            self._marker(dgram, addr)
        else:  # RECEIPT and LEAVING are not for an instance, nor moves on others
            self._bad(f"unexpected-{kind.name.lower()}", addr)
        return 1

    # -- re-steers with order kept ------------------------------------------------------

    def _marker(self, dgram: Datagram, sender: tuple[str, int]) -> None:
        """A MOVE marker (no hand-off: the flows' objects follow them lazily): acknowledge
        once every frame of its flows received before it is processed.  Those frames were
        all submitted before the marker was read (one receive loop, in order), and a flow's
        units run in order, so it is done when none of the flows has a parked unit left;
        the sender sends this instance no frame of them meanwhile.  Other flows' traffic
        is not waited for: under load the instance is never idle."""
        marker = (sender, dgram.move_id)
        if marker in self.markers:
            if self.markers[marker] is None:  # done, but our acknowledgement was lost
                self._send_to(encode_moved(self.ident, self._next_seq(), dgram.move_id), sender)
            return  # (a repeat of a marker still waited on: acknowledged when done)
        pending = self.pending
        waiting = {flow for flow in dgram.flows if flow in pending}
        self.counts["markers"] += 1
        if not waiting:
            self._marker_done(marker)
            return
        self.markers[marker] = waiting
        for flow in waiting:
            self.held_up.setdefault(flow, []).append(marker)

    def _marker_done(self, marker: tuple[tuple[str, int], int]) -> None:
        # The flows' receipts go to the sink before the acknowledgement lets the sender
        # send the flows' next frames elsewhere, so the sink sees them in order too.
        self.flush()
        self.markers[marker] = None
        sender, move_id = marker
        self._send_to(encode_moved(self.ident, self._next_seq(), move_id), sender)

    # -- stop-the-world moves ------------------------------------------------------------

    def _stop_the_world(self, dgram: Datagram, addr: tuple[str, int]) -> None:
        assert self.tasks is not None
        if dgram.kind == Kind.MOVED:
            done = self.awaiting.get((dgram.move_id, dgram.part))
            if done is not None:
                done.set()
            return
        if dgram.kind == Kind.MOVE:
            move = (addr, dgram.move_id)
            state = self.moves.get(move)
            if state is None:
                self.moves[move] = False
                self.tasks.start_soon(self._move, dgram, addr)
            elif state:  # done, but our acknowledgement was lost: say it again
                self._send_to(encode_moved(self.ident, self._next_seq(), dgram.move_id), addr)
            return  # (a repeat of a move under way: it is acknowledged when done)
        part = (addr, dgram.move_id, dgram.part)
        state = self.handoffs.get(part)
        if state is None:
            self.handoffs[part] = False
            self.tasks.start_soon(self._adopt, dgram, addr)
        elif state:
            msg = encode_moved(self.ident, self._next_seq(), dgram.move_id, dgram.part)
            self._send_to(msg, addr)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send_to(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.out.sendto(data, addr)
        except OSError as exc:  # a full buffer or a gone peer: the peer repeats, we answer
            self.counts[f"move-{type(exc).__name__}"] += 1

    def _send_from_data(self, data: bytes, addr: tuple[str, int], what: str) -> None:
        """A datagram whose answer must come back to the data channel; repeated by the
        caller until answered, so a full buffer only counts."""
        try:
            self.data.sendto(data, addr)
        except OSError as exc:
            self.counts[f"{what}-{type(exc).__name__}"] += 1

    async def _move(self, dgram: Datagram, sender: tuple[str, int]) -> None:
        """A MOVE marker: once everything received before it is processed, hand the
        flows' objects to their new instance, then acknowledge."""
        stw = self.stw
        keys = self.flow_keys
        assert stw is not None and keys is not None
        # The datagrams before the marker were all submitted before it was read (one
        # receive loop, in order), and the sender holds everything after it back: once no
        # unit is parked, every frame before the marker is processed.
        while self.parked:
            await self.idle.wait()
        flows = [(n, keys.pop(n)) for n in dgram.flows if n in keys]
        entries = stw.take_records(flows)
        self.counts["flows-moved-out"] += len(entries)
        if entries:
            await self._hand_off(entries, dgram.destination)
        self.moves[(sender, dgram.move_id)] = True
        self._send_to(encode_moved(self.ident, self._next_seq(), dgram.move_id), sender)

    async def _hand_off(self, entries: list[Any], dest: tuple[str, int]) -> None:
        from baselines.stop_the_world import encode_records

        payloads = encode_records(entries, handoff_room(DEFAULT_MAX_DATAGRAM))
        self._handoff_id += 1
        hid = self._handoff_id
        parts = len(payloads)
        waits = {p: trio.Event() for p in range(parts)}
        for p, event in waits.items():
            self.awaiting[(hid, p)] = event
        with trio.move_on_after(HANDOFF_TIMEOUT) as waiting:
            while not all(e.is_set() for e in waits.values()):
                for p, payload in enumerate(payloads):
                    if not waits[p].is_set():
                        msg = encode_handoff(self.ident, self._next_seq(), hid, p, parts, payload)
                        # From the data socket: the new instance answers where it came from.
                        self._send_from_data(msg, dest, "move")
                with trio.move_on_after(HANDOFF_EVERY):
                    for event in waits.values():
                        await event.wait()
        for p in waits:
            del self.awaiting[(hid, p)]
        if waiting.cancelled_caught:
            self.counts["handoff-timeout"] += 1
            _emit("handoff-timeout", destination=f"{dest[0]}:{dest[1]}", parts=parts)

    async def _adopt(self, dgram: Datagram, old: tuple[str, int]) -> None:
        """A HANDOFF part: record its flows as ours, acquire their objects, acknowledge."""
        from baselines.stop_the_world import decode_records

        stw = self.stw
        keys = self.flow_keys
        assert stw is not None and keys is not None
        try:
            entries = decode_records(dgram.payload)
        except ValueError:
            self._bad("bad-handoff-payload", old)
            del self.handoffs[(old, dgram.move_id, dgram.part)]
            return
        for number, key, _objects in entries:
            keys[number] = key
        await stw.acquire(stw.adopt(entries))
        self.counts["flows-moved-in"] += len(entries)
        self.handoffs[(old, dgram.move_id, dgram.part)] = True
        self._send_to(encode_moved(self.ident, self._next_seq(), dgram.move_id, dgram.part), old)

    def _bad(self, reason: str, addr: tuple[str, int]) -> None:
        self.bad[reason] += 1
        n = self.bad[reason]
        if n & (n - 1) == 0:  # the first, then at powers of two: seen, never a flood
            _emit("bad-datagram", reason=reason, count=n, source=f"{addr[0]}:{addr[1]}")

    def _end(self, dgram: Datagram, addr: tuple[str, int]) -> None:
        if addr in self.ends:
            return  # a repeated END (the sender repeats it in case one is lost)
        self.ends[addr] = dgram
        _emit(
            "end",
            source=f"{addr[0]}:{addr[1]}",
            frames_sent=dgram.frames_sent,
            frames_received=self.received[addr],
        )
        if self.leaving is not None and all(a in self.ends for a in self.received):
            self.all_ended.set()

    async def flusher(self) -> None:
        """Send what the receive loop will not: receipts of parked units (settled in the
        node's tasks) and datagrams the socket refused.  It sleeps until there are some,
        so an idle instance, or one whose units all finish inline, is not woken for
        nothing a few hundred times a second."""
        while True:
            await self.unsent.wait()
            await trio.sleep(FLUSH_EVERY)
            self.unsent = trio.Event()  # (first: what comes during the flush sets the next)
            self.flush()

    async def ticker(self) -> None:
        """``nf.tick`` on the arrival clock."""
        interval = self.nf.tick_interval
        while True:
            await trio.sleep(interval)
            await self.nf.tick(nf_clock())

    async def leave(self, why: str, timeout: float) -> None:
        """Tell the senders, wait for their END markers (bounded), finish the work."""
        if self.leaving is not None:
            return
        self.leaving = why
        _emit("leaving", why=why, senders=len(self.received))
        with trio.move_on_after(timeout) as waiting:
            while self.received and not all(a in self.ends for a in self.received):
                self._leaving_seq += 1
                msg = encode_leaving(self.ident, self._leaving_seq)
                for addr in list(self.received):
                    if addr not in self.ends:
                        self._send_from_data(msg, addr, "leaving")
                with trio.move_on_after(LEAVING_EVERY):
                    await self.all_ended.wait()
        if waiting.cancelled_caught:
            missing = [f"{a[0]}:{a[1]}" for a in self.received if a not in self.ends]
            _emit("leave-timeout", waiting_for=missing)

    async def finish(self) -> None:
        """Let the parked units finish and send everything batched."""
        await self.idle.wait()
        self.flush()

    def report(self) -> dict[str, Any]:
        return {
            "frames": self.counts["frames"],
            "counts": dict(self.counts),
            "bad_datagrams": dict(self.bad),
            "parked": self.parked,
            "parked_units": len(self.waited),
            "parked_ms": _percentiles(self.waited),
            "receipts_sent": self.receipts.receipts,
            "pieces_lost": self.pieces.lost,
            "frames_forwarded": self.frames_out.frames,
            "datagrams_to_sink": self.receipts.datagrams + self.frames_out.datagrams,
            "nf": dict(self.nf.counts),
            **(
                {"objects_acquired": self.stw.acquired, "acquire_failed": self.stw.acquire_failed}
                if self.stw is not None
                else {}
            ),
            "leaving": self.leaving,
            "cpu_s": round(time.process_time(), 3),
            **({"store": self.store_figures} if self.store_figures else {}),
        }

    def snapshot_store(self) -> None:
        """Keep the store's figures of now (backends without ``statistics``: nothing)."""
        figures = getattr(self.space, "statistics", None)
        if figures is None:
            return
        stats = asdict(figures())
        self.store_figures = {
            name: value for name, value in stats.items() if isinstance(value, int) and value
        }


def _percentiles(values_ns: list[int]) -> dict[str, float]:
    if not values_ns:
        return {}
    ordered = sorted(values_ns)
    last = len(ordered) - 1
    return {
        name: round(ordered[min(int(q * len(ordered)), last)] / 1e6, 3)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
    }


@asynccontextmanager
async def open_nf_space(
    backend: str, space: Any, store: str | None, secret: bytes
) -> AsyncIterator[Any]:
    """The space the NF's state lives in: the member's own for ``s6``, else the baseline's
    (``baselines.open_backend``; remote-only and redis need ``--store``)."""
    if backend == "s6":
        yield space
        return
    from baselines import open_backend

    try:
        opened = open_backend(backend, space, store_address=store, secret=secret)
        state_space = await opened.__aenter__()
    except ValueError as exc:  # an unknown backend, or no --store for a remote one
        raise ConfigError(str(exc)) from None
    try:
        yield state_space
    except BaseException as exc:
        if not await opened.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await opened.__aexit__(None, None, None)


async def _serve(args: argparse.Namespace, nf_cls: type[NF], config: dict[str, Any]) -> int:
    from store import open_space
    from store.cli.common import read_secret
    from store.wire.control import parse_address

    secret = read_secret(args.secret_file, "python -m nf serve")
    # A plain non-blocking socket: the receive loop reads it until it is empty and waits
    # for it only then (Instance.receive).
    data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data.setblocking(False)
    try:
        data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    except OSError:
        pass
    host, port = parse_address(args.data)
    try:
        data.bind((host, port))
    except OSError as exc:
        data.close()
        raise ConfigError(f"--data {args.data}: cannot receive there: {exc.strerror}") from None
    bound = data.getsockname()
    data_address = f"{bound[0]}:{bound[1]}"
    sink = parse_address(args.sink)
    holder: list[Instance] = []

    async def query(name: str, qargs: dict[str, Any]) -> Any:
        if not holder:
            raise RuntimeError("the instance is not running yet")
        if name == "serve":
            return holder[0].report()
        return await holder[0].nf.query(name, **qargs)

    labels = {"nf": nf_cls.name, "data": data_address, "backend": args.backend}
    start_leave = trio.Event()
    drained = trio.Event()
    why: list[str] = []
    leave_within: list[float] = []

    async def on_scale_in(budget: float) -> None:
        # An operator's scale-in of this member: the senders are told and their frames
        # processed before the store hands on what this member holds, so that no object
        # reaches it after its drain (and none of its packets meets an object it gave up).
        why.append("scale-in")
        leave_within.append(max(0.5, budget - FINISH_MARGIN))
        start_leave.set()
        await drained.wait()

    async with trio.open_nursery() as outer:

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for signum in received:
                    why.append(signal.Signals(signum).name)
                    start_leave.set()

        outer.start_soon(signals)
        async with open_space(
            controller=args.controller,
            listen=args.listen,
            secret=secret,
            labels=labels,
            query=query,
            on_scale_in=on_scale_in,
            # This process is the instance alone, as a store node's is (store.cli.node):
            # the long-lived state made before each NORMAL stage leaves the collector's
            # generations, so that its full collections do not scan it again and again.
            freeze_gc=True,
        ) as space:
            async with open_nf_space(args.backend, space, args.store, secret) as state_space:
                nf = nf_cls(state_space, config)
                inst = Instance(
                    nf,
                    state_space,
                    data,
                    sink,
                    forward_frames=args.forward == "frames",
                    max_datagram=args.max_datagram,
                )
                holder.append(inst)
                _emit("ready", name=space.name, data=data_address, pid=os.getpid())
                async with trio.open_nursery() as inner:
                    inner.start_soon(inst.receive)
                    inner.start_soon(inst.flusher)
                    inner.start_soon(inst.ticker)
                    await start_leave.wait()
                    inst.snapshot_store()
                    # Packets keep coming in (and are processed) until every sender's END.
                    timeout = min([args.leave_timeout, *leave_within])
                    await inst.leave(why[0] if why else "asked", timeout)
                    inner.cancel_scope.cancel()
                await inst.finish()
                await nf.close()
                await inst.finish()
                drained.set()
            # Leaving the block is the graceful scale-in (store.space.join_space): parked
            # work done, untethered updates flushed, objects handed on.
        _emit("exit", **inst.report())
        outer.cancel_scope.cancel()
    return 0


def _parser(nf_cls: type[NF]) -> argparse.ArgumentParser:
    from store.cli.common import OneLineParser, address

    parser = OneLineParser(
        prog=f"python -m nf serve {nf_cls.name}",
        description=f"Run one {nf_cls.name} instance on the live data channel (see nf/serve.py).",
    )
    group = parser.add_argument_group("serving")
    group.add_argument("--controller", required=True, type=address, metavar="HOST:PORT")
    group.add_argument(
        "--data", required=True, type=address, metavar="HOST:PORT", help="UDP: packets in"
    )
    group.add_argument(
        "--sink", required=True, type=address, metavar="HOST:PORT", help="UDP: receipts out"
    )
    group.add_argument("--backend", choices=BACKENDS, default="s6", help="where state lives")
    group.add_argument(
        "--store", type=address, metavar="HOST:PORT", help="the backend's store (redis...)"
    )
    group.add_argument("--secret-file", metavar="F", help="file holding the cluster secret")
    group.add_argument(
        "--listen",
        type=address,
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where this member accepts the others (127.0.0.1:0)",
    )
    group.add_argument("--config", metavar="FILE.toml", help=f"the [{nf_cls.name}] table")
    group.add_argument(
        "--forward",
        choices=("receipts", "frames"),
        default="receipts",
        help="send the sink receipts (default) or the forwarded frames themselves",
    )
    group.add_argument(
        "--max-datagram",
        type=int,
        default=DEFAULT_MAX_DATAGRAM,
        metavar="BYTES",
        help=f"largest datagram to the sink ({DEFAULT_MAX_DATAGRAM})",
    )
    group.add_argument(
        "--leave-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the senders' END markers when leaving (10; under ctl"
        " scale-in at most 3, the scale-in's budget less the time kept to finish)",
    )
    group.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
    nf_cls.add_arguments(parser.add_argument_group(f"{nf_cls.name} options"))  # type: ignore[arg-type]
    return parser


def _profiled(path: str, args: argparse.Namespace, nf_cls: type[NF], config: dict[str, Any]) -> int:
    """The instance under cProfile, its statistics written to ``path`` at exit
    (``S6_PROFILE=PREFIX``: one file per process, PREFIX.PID; read them with ``pstats``).
    The timer is the process's CPU time: wall time would count the waits for datagrams
    and the moments the kernel gave the core to another process of the benchmark."""
    import cProfile

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        return trio.run(_serve, args, nf_cls, config)
    finally:
        profiler.disable()
        # (a second SIGTERM, a harness stopping what it started, must not cut the file short)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        profiler.dump_stats(path)


def main(argv: list[str]) -> int:
    """``python -m nf serve NAME ...``; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m nf serve NAME --controller HOST:PORT --data HOST:PORT ")
        print("                              --sink HOST:PORT [options]  (NAME --help: all)")
        return 0 if argv else 2
    try:
        nf_cls = registry.load(argv[0])
    except registry.UnknownNF as exc:
        print(f"nf serve: {exc}", file=sys.stderr)
        return 2
    parser = _parser(nf_cls)
    args = parser.parse_args(argv[1:])
    if args.max_datagram < 64 or args.max_datagram > 65507:
        parser.error("--max-datagram must be between 64 and 65507")
    if not 0 < args.leave_timeout < math.inf:
        parser.error("--leave-timeout must be a positive number of seconds")
    remote = args.backend in STORE_BACKENDS
    if remote and args.store is None:
        parser.error(f"--backend {args.backend} needs --store HOST:PORT (its store)")
    if not remote and args.store is not None:
        parser.error("--store is for --backend remote-only or redis")
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    from nf.runner import checked_config

    try:
        config = checked_config(nf_cls, args)
        profile_to = os.environ.get("S6_PROFILE")
        if profile_to:
            return _profiled(f"{profile_to}.{os.getpid()}", args, nf_cls, config)
        return trio.run(_serve, args, nf_cls, config)
    except BaseException as exc:  # one clear line for what we expect, a traceback otherwise
        leaf = first_leaf(exc)  # (the exception itself, or the first inside trio's groups)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        if isinstance(leaf, ConfigError):
            print(f"{parser.prog}: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, StoreError | OSError | TimeoutError):
            print(f"{parser.prog}: error: {leaf or type(leaf).__name__}", file=sys.stderr)
            return 1
        raise
