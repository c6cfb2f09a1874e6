"""The IDS's state in the object space (paper Table 4).

* :class:`FlowContext` (SingleWriter, one per direction-free 5-tuple): who opened the flow,
  where its TCP handshake is, whether both directions were seen, and its packet count (the
  alerts' order within the flow).  Read and written on every packet of the flow.
* :class:`TrustedHost` (SingleWriter, one per whitelisted address that sent or received
  traffic): how many packets skipped detection because of it.
* :class:`ServerAlerts` (MultiWriter, one per server address): the alerts raised against a
  server, bounded, added untethered from any instance; replicas merge, so the order in which
  instances report does not matter.
"""

from __future__ import annotations

from typing import Any

from store import MultiWriter, SingleWriter, stale, untethered

__all__ = [
    "CLOSED",
    "ESTABLISHED",
    "NEW",
    "SYN_RECEIVED",
    "SYN_SENT",
    "FlowContext",
    "ServerAlerts",
    "TrustedHost",
]

# TCP handshake tracking, as far as ``flow`` needs it.
NEW = 0
SYN_SENT = 1
SYN_RECEIVED = 2
ESTABLISHED = 3
CLOSED = 4

_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
TCP = 6

#: Suricata 7's default flow timeouts, in seconds: a packet that comes more than this many
#: whole seconds after its flow's last one starts a new flow (its IP-only rules are
#: inspected again, its session starts over).  TCP: before the handshake completes, established,
#: closed; other protocols: one direction seen, both seen.
TCP_NEW_TIMEOUT = 60.0
TCP_ESTABLISHED_TIMEOUT = 600.0
TCP_CLOSED_TIMEOUT = 60.0
NEW_TIMEOUT = 30.0
ESTABLISHED_TIMEOUT = 300.0


class FlowContext(SingleWriter):
    """Per-flow context (direction-free 5-tuple)."""

    def __init__(self) -> None:
        self.initiator_ip = 0
        self.initiator_port = 0
        self.state = NEW
        self.replied = False
        self.fins = 0  # bit 1: the initiator sent FIN, bit 2: the responder did
        self.packets = 0
        self.last = 0.0
        self.ways = 0  # bit 1: a packet from the initiator was seen, bit 2: from the responder

    def on_packet(self, proto: int, src: int, sport: int, flags: int, ts: float) -> list[Any]:
        """Account one packet; ``[to_server, established, number, closed, first_way]`` for
        detection and the idle sweep, where ``number`` counts the flow's packets from 1 and
        ``first_way`` tells the first packet of its direction (IP-only rules' packet)."""
        state = self.state
        if self.packets == 0 or (
            proto == TCP and state == CLOSED and flags & (_SYN | _ACK) == _SYN
        ):
            new = True
        else:
            new = self._timed_out(proto, ts)
        if new:
            # the first packet, a new connection on a closed 5-tuple, or the first after
            # the flow timed out
            self.initiator_ip = src
            self.initiator_port = sport
            self.state = state = NEW
            self.replied = False
            self.fins = 0
            self.ways = 0
        self.packets += 1
        self.last = ts
        forward = src == self.initiator_ip and sport == self.initiator_port
        if not forward:
            self.replied = True
        way = 1 if forward else 2
        first_way = not self.ways & way
        self.ways |= way
        if proto != TCP:
            return [forward, self.replied, self.packets, False, first_way]
        # A TCP packet is "established" by the state its session was in when it arrived
        # (as Suricata reads it): the handshake's last ACK is not, a RST or the last ACK
        # of a close on an established session still is.
        established = state == ESTABLISHED
        syn_ack = flags & (_SYN | _ACK)
        if flags & _RST:
            self.state = CLOSED
        elif state == NEW:
            if syn_ack == _SYN and forward:
                self.state = SYN_SENT
        elif state == SYN_SENT:
            if syn_ack == _SYN | _ACK and not forward:
                self.state = SYN_RECEIVED
        elif state == SYN_RECEIVED:
            if syn_ack == _ACK and forward:
                self.state = ESTABLISHED
        elif state == ESTABLISHED:
            if flags & _FIN:
                self.fins |= 1 if forward else 2
            elif self.fins == 3 and flags & _ACK:
                self.state = CLOSED
        return [forward, established, self.packets, self.state == CLOSED, first_way]

    def on_error(self, proto: int, src: int, ts: float) -> list[Any] | None:
        """Account an ICMPv4 destination unreachable quoting a packet of this flow (of
        ``proto``), which Suricata counts as a packet of the flow: to_server when it comes
        from the initiator's address (Suricata tells an ICMP packet's direction by its
        source address alone), the first of its direction or not; it moves no TCP state.
        ``on_packet``'s answer; None when the flow has no packet yet or has timed out
        (Suricata then makes no flow for the error)."""
        if self.packets == 0 or self._timed_out(proto, ts):
            return None
        state = self.state
        self.packets += 1
        self.last = ts
        forward = src == self.initiator_ip
        if not forward:
            self.replied = True
        way = 1 if forward else 2
        first_way = not self.ways & way
        self.ways |= way
        if proto == TCP:
            return [forward, state == ESTABLISHED, self.packets, state == CLOSED, first_way]
        return [forward, self.replied, self.packets, False, first_way]

    def _timed_out(self, proto: int, ts: float) -> bool:
        """Whether a packet at ``ts`` comes after this flow (of ``proto``) timed out.
        Whole seconds, as Suricata keeps a flow's deadline: it has timed out when the
        packet's second is past its last packet's second plus the timeout."""
        if proto == TCP:
            state = self.state
            if state == ESTABLISHED:
                limit = TCP_ESTABLISHED_TIMEOUT
            else:
                limit = TCP_CLOSED_TIMEOUT if state == CLOSED else TCP_NEW_TIMEOUT
        else:
            limit = ESTABLISHED_TIMEOUT if self.replied else NEW_TIMEOUT
        return int(ts) - int(self.last) > limit

    @stale(max_age=1.0)
    def last_seen(self) -> list[Any]:
        """``[last packet time, state]``: for the idle sweep, which must not move it."""
        return [self.last, self.state]


class TrustedHost(SingleWriter):
    """A whitelisted host: the packets that skipped detection because of it."""

    def __init__(self) -> None:
        self.skipped = 0

    def skip(self) -> int:
        self.skipped += 1
        return self.skipped

    @stale(max_age=1.0)
    def count(self) -> int:
        return self.skipped


class ServerAlerts(MultiWriter):
    """The alerts raised against one server: their number and the earliest ``bound`` of
    them, each ``[ts, flow key..., packet number, rule index, line]`` (which sorts them as
    the capture did, whichever instance raised them)."""

    def __init__(self) -> None:
        self.total = 0
        self.bound = 0
        self.entries: list[list[Any]] = []

    @untethered
    def add(self, entry: list[Any], bound: int) -> None:
        self.total += 1
        self.bound = max(self.bound, bound)
        entries = self.entries
        entries.append(entry)
        if len(entries) > 2 * self.bound:
            entries.sort()
            del entries[self.bound :]

    def merge(self, other: ServerAlerts) -> None:
        self.total += other.total
        self.bound = max(self.bound, other.bound)
        self.entries.extend(other.entries)
        self.entries.sort()
        del self.entries[self.bound :]

    @stale(max_age=1.0)
    def summary(self) -> list[Any]:
        """``[total, kept entries]``, the entries in order."""
        entries = sorted(self.entries)[: self.bound]
        return [self.total, entries]
