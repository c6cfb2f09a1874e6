"""PRADS's state as objects of the space (paper Figures 3 and 4, Table 4).

* :class:`Connection`, one per flow (SingleWriter, keyed by the direction-free 5-tuple):
  which end spoke first (the client), per-direction flags, packets and bytes, and the
  ``check`` bits saying which payload checks are done for the connection.  Only the
  instance serving the flow writes it, so it moves with the flow.
* :class:`Asset`, one per host (MultiWriter, keyed by the IPv4 address as an int): what
  was detected about the host, written by every instance that sees it with untethered
  updates into a per-instance replica, folded by :meth:`Asset.merge`.
* :class:`Statistics`, one for everyone (MultiWriter): packet counters, untethered, merged.

**Why the asset log is made at query time.**  prads writes a log line the moment a
detection makes a new entry (or replaces a service).  Here detections arrive at an
asset's owner from several instances in no fixed order, and a replica's updates are folded
later, so an update method cannot know whether it is the first.  Instead each asset entry
keeps its *earliest observation*, ordered by packet time, then flow key, then the packet's
number in its connection, together with everything prads would print for it; keeping the
earliest of two is commutative, associative and idempotent, so the merge of replicas gives
the same entries whatever the order, and the control-plane task (query ``log``) prints
them.  For a service entry the earliest observation and the earliest one with a real
application name are both kept: prads replaces an ``@port`` guess by the first real name
and logs that again.
"""

from __future__ import annotations

from typing import Any

from store import MultiWriter, SingleWriter, stale, untethered

__all__ = [
    "CHECK_CLIENT_DONE",
    "CHECK_CLIENT_UNKNOWN",
    "CHECK_SERVER_DONE",
    "CHECK_SERVER_UNKNOWN",
    "CLIENT",
    "NOROLE",
    "SERVER",
    "Asset",
    "Connection",
    "Statistics",
    "asset_lines",
    "ended",
]

# Roles of a packet in its connection (prads's pi->sc).
NOROLE = 0  # the first packet of a connection: neither yet
CLIENT = 1  # sent by the end that spoke first
SERVER = 2  # sent by the other end

# Connection.check bits (prads's cxt->check).
CHECK_SERVER_DONE = 0x04  # a server application was found: stop looking
CHECK_CLIENT_DONE = 0x08  # a client application was found
CHECK_SERVER_UNKNOWN = 0x10  # the @port guess was recorded for the server
CHECK_CLIENT_UNKNOWN = 0x20  # the @port guess was recorded for the client


class Connection(SingleWriter):
    """One tracked connection (prads's ``connection``)."""

    def __init__(self) -> None:
        self.proto = 0
        self.c_ip = 0  # the end that sent the first packet (swapped by reverse())
        self.c_port = 0
        self.s_ip = 0
        self.s_port = 0
        self.start = 0.0
        self.last = 0.0
        self.flags = [0, 0]  # OR of TCP flags: [client, server]
        self.pkts = [0, 0]
        self.bytes = [0, 0]
        self.check = 0
        self.n = 0  # packets seen: numbers this connection's observations
        self.touched = 0  # 1: the client's asset was touched, 2: the server's

    def track(
        self,
        src: int,
        sport: int,
        dst: int,
        dport: int,
        proto: int,
        flags: int,
        nbytes: int,
        ts: float,
    ) -> tuple[int, int, int, bool]:
        """Account one packet: (role, check bits, packet number, first touch of this
        end's asset).  (PRADS.process does the same inline for a packet after the first
        when the connection is here: a change here belongs there too.)"""
        n = self.n
        self.n = n + 1
        self.last = ts
        if n == 0:
            self.proto = proto
            self.c_ip = src
            self.c_port = sport
            self.s_ip = dst
            self.s_port = dport
            self.start = ts
            side = 0
            role = NOROLE
        elif src == self.c_ip and sport == self.c_port:
            side = 0
            role = CLIENT
        else:
            side = 1
            role = SERVER
        self.flags[side] |= flags
        self.pkts[side] += 1
        self.bytes[side] += nbytes
        bit = 1 << side
        first = not self.touched & bit
        self.touched |= bit
        return role, self.check, n, first

    def set_check(self, bits: int) -> int:
        """Mark payload checks done; the bits now set."""
        self.check |= bits
        return self.check

    def reverse(self) -> None:
        """The end that spoke first was the server after all (a SYN-ACK or a reply was
        the first packet seen): swap the ends and start the checks again."""
        self.c_ip, self.s_ip = self.s_ip, self.c_ip
        self.c_port, self.s_port = self.s_port, self.c_port
        self.flags.reverse()
        self.pkts.reverse()
        self.bytes.reverse()
        self.touched = ((self.touched & 1) << 1) | ((self.touched >> 1) & 1)
        self.check = 0

    @stale(max_age=0.0)
    def idle(self) -> tuple[int, float, int, int]:
        """(protocol, last packet time, client flags, server flags): what :func:`ended`
        needs.  A stale read (never older than the call, max_age 0) so that a sweep can
        ask it through a read-only reference, which never moves the object."""
        return self.proto, self.last, self.flags[0], self.flags[1]


def ended(proto: int, last: float, c_flags: int, s_flags: int, now: float) -> bool:
    """Whether prads's session sweep would end a connection at ``now``: TCP after FIN
    both ways or a RST and 5 s idle, or 300 s idle; UDP and ICMP after 60 s idle;
    anything else after 300 s."""
    idle = now - last
    if proto == 6:
        if c_flags & 0x01 and s_flags & 0x01 and idle > 5:
            return True
        if (c_flags | s_flags) & 0x04 and idle > 5:
            return True
        return idle > 300
    if proto in (17, 1):
        return idle > 60
    return idle > 300


def _copy(entry: list[Any] | None) -> list[Any] | None:
    """An entry that shares no list with ``entry`` (its order is the only list in it)."""
    return None if entry is None else [list(entry[0]), *entry[1:]]


def _earlier(a: list[Any] | None, b: list[Any] | None) -> list[Any] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


class Asset(MultiWriter):
    """One host (prads's ``asset``): its OS and service entries.

    ``os`` maps ``"TYPE:line"`` (the detection type and the matched signature's line, 0
    when none matched) to ``[order, vlan, port, text, distance]``; ``services`` maps
    ``"port/proto"`` to ``[earliest, earliest real]``, each ``[order, vlan, role,
    service, app, distance]`` or None.  ``order`` is ``[ts, *flow key, packet number]``."""

    def __init__(self) -> None:
        self.first = -1.0  # -1: not seen yet
        self.last = -1.0
        self.os: dict[str, list[Any]] = {}
        self.services: dict[str, list[Any]] = {}

    @untethered
    def touch(self, ts: float) -> None:
        """The host sent a packet."""
        if self.first < 0 or ts < self.first:
            self.first = ts
        if ts > self.last:
            self.last = ts

    @untethered
    def observe_os(self, key: str, entry: list[Any]) -> None:
        """An OS fingerprint; the earliest of an entry is kept."""
        ts = entry[0][0]
        self.touch(ts)
        old = self.os.get(key)
        if old is None or entry < old:
            self.os[key] = entry

    @untethered
    def observe_service(self, key: str, entry: list[Any]) -> None:
        """A service or client application; the earliest observation of the entry and
        the earliest with a real name (not ``@port``) are kept."""
        self.touch(entry[0][0])
        real = None if entry[4].startswith("@") else entry
        old = self.services.get(key)
        if old is None:
            self.services[key] = [entry, real]
        else:
            first = _earlier(old[0], entry)
            self.services[key] = [first, _earlier(old[1], real)]

    @stale(max_age=1.0)
    def seen(self) -> tuple[float, float]:
        """(first, last) packet time the host was seen (the paper's stale reads)."""
        return self.first, self.last

    def merge(self, other: Asset) -> None:
        if other.first >= 0 and (self.first < 0 or other.first < self.first):
            self.first = other.first
        if other.last > self.last:
            self.last = other.last
        for key, entry in other.os.items():
            old = self.os.get(key)
            if old is None or entry < old:
                self.os[key] = _copy(entry)  # type: ignore[assignment]
        for key, pair in other.services.items():
            old = self.services.get(key)
            if old is None:
                self.services[key] = [_copy(pair[0]), _copy(pair[1])]
            else:
                first = _earlier(old[0], pair[0])
                real = _earlier(old[1], pair[1])
                self.services[key] = [
                    first if first is old[0] else _copy(first),
                    real if real is old[1] else _copy(real),
                ]


def _discovered(ts: float) -> int:
    """A packet time as prads's log writes it: libpcap reads a capture's seconds as a
    signed 32-bit number, and prads prints them unsigned in 64 bits, so a time from
    2038 on (2**31 seconds and over) comes out near 2**64."""
    seconds = int(ts)
    if 1 << 31 <= seconds < 1 << 32:
        return seconds - (1 << 32) + (1 << 64)
    return seconds


def asset_lines(ip: str, asset: Asset) -> list[tuple[list[Any], str]]:
    """The asset log lines of one host, each with its order: what prads would have
    written for the observations this asset holds."""
    out: list[tuple[list[Any], str]] = []
    for key, (order, vlan, port, text, dist) in asset.os.items():
        kind = key.partition(":")[0]
        out.append((order, f"{ip},{vlan},{port},6,{kind},[{text}],{dist},{_discovered(order[0])}"))
    for key, (first, real) in asset.services.items():
        port, _, proto = key.partition("/")
        order, vlan, role, service, app, dist = first
        label = "SERVER" if role == SERVER else "CLIENT"
        out.append(
            (
                order,
                f"{ip},{vlan},{port},{proto},{label},[{service}:{app}],{dist},"
                f"{_discovered(order[0])}",
            )
        )
        if app.startswith("@") and real is not None:
            # prads replaces the guess by the first real name: same role and distance as
            # the entry it replaces, the VLAN and time of the packet that named it.
            r_order, r_vlan, _r_role, r_service, r_app, _ = real
            out.append(
                (
                    r_order,
                    f"{ip},{r_vlan},{port},{proto},{label},[{r_service}:{r_app}],{dist},"
                    f"{_discovered(r_order[0])}",
                )
            )
    return out


class Statistics(MultiWriter):
    """Packet counters of every instance (prads's ``pr_s``), by name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @untethered
    def add(self, names: tuple[str, ...] | list[str]) -> None:
        """Count one of each name."""
        counts = self.counts
        for name in names:
            counts[name] = counts.get(name, 0) + 1

    @untethered
    def add_counts(self, counts: dict[str, int]) -> None:
        mine = self.counts
        for name, n in counts.items():
            mine[name] = mine.get(name, 0) + n

    @stale(max_age=1.0)
    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def merge(self, other: Statistics) -> None:
        mine = self.counts
        for name, n in other.counts.items():
            mine[name] = mine.get(name, 0) + n
