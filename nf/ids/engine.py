"""Matching one packet against the loaded rules, with a fast-pattern prefilter.

Rules are grouped as Snort groups them: by the transport protocol they can apply to (an
``ip`` rule joins every group) and by the ports a packet carries, so that a packet meets
only the rules whose port lists admit it.  Each rule with a positive content contributes
one fast pattern: the content marked ``fast_pattern``, else its longest positive content.
One Aho-Corasick automaton per group (pyahocorasick) finds, in one case-insensitive pass
over the payload, which fast patterns occur anywhere in it; only those rules, and the rules
without a positive content, are then evaluated in full.  A group of a few patterns (at most
``SMALL_GROUP``) looks for each with ``bytes.find`` instead, which is faster there than an
automaton's pass.  A rule whose fast pattern occurs nowhere in the payload cannot match
(each positive content must lie inside the payload, exactly or ignoring case), so the
alerts are those of evaluating every rule: ``Detector(prefilter=False)`` does that, and a
property test compares the two.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import ahocorasick

from nf.ids.addresses import PortSet
from nf.ids.options import match_payload
from nf.ids.rules import Rule

__all__ = ["Detector", "PacketView"]

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
#: The rule group of a packet's protocol; ``icmp`` rules meet ICMPv6 too, as Suricata's do.
_GROUPS = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMP6: "icmp"}


@dataclass(slots=True)
class PacketView:
    """What detection reads of a packet.

    ``to_server``: True when the packet comes from the flow's initiator, False when from
    its responder, None without a session.  ``established``: the flow's state as ``flow``
    reads it.  ``first_way``: the first packet of its direction in its flow, the one
    packet on which IP-only rules (``Rule.ip_only``) are inspected."""

    proto: int
    src: int
    dst: int
    sport: int
    dport: int
    tcp_flags: int
    payload: bytes
    to_server: bool | None = None
    established: bool = False
    icmp_type: int = 0
    icmp_code: int = 0
    first_way: bool = True


#: Groups with at most this many distinct fast patterns search each with ``bytes.find``.
SMALL_GROUP = 8

#: Port pairs whose group is remembered before the cache starts over.
_PORT_CACHE = 65536


class _Group:
    """Rules that can apply to one kind of packet, with their prefilter."""

    __slots__ = ("always", "automaton", "bare", "patterns", "rules")

    def __init__(self, rules: list[Rule], small: int) -> None:
        self.rules = rules
        self.always: list[Rule] = []
        by_pattern: dict[bytes, list[Rule]] = {}
        for rule in rules:
            fp = rule.fast_pattern
            if fp is None:
                self.always.append(rule)
            else:
                by_pattern.setdefault(fp.pattern.lower(), []).append(rule)
        #: The rules that can match a packet without payload: those without content or
        #: pcre (any other never matches an empty payload).
        self.bare = [rule for rule in self.always if not rule.payload]
        #: (lowered pattern, its rules) when the group is small, else None
        self.patterns: list[tuple[bytes, list[Rule]]] | None = None
        self.automaton: ahocorasick.Automaton | None = None
        if len(by_pattern) <= small:
            self.patterns = list(by_pattern.items())
        else:
            automaton = ahocorasick.Automaton()
            for key, members in by_pattern.items():
                automaton.add_word(key.decode("latin-1"), members)
            automaton.make_automaton()
            self.automaton = automaton

    def candidates(self, lower: bytes) -> list[Rule]:
        """The rules worth evaluating in full on a payload (``lower``: lowered), in file
        order."""
        if not lower:
            return self.bare
        chosen: list[Rule] = []
        if self.patterns is not None:
            for pattern, members in self.patterns:
                if pattern in lower:
                    chosen += members
        else:
            assert self.automaton is not None
            seen: set[int] = set()
            for _end, members in self.automaton.iter(lower.decode("latin-1")):
                key = id(members)
                if key not in seen:
                    seen.add(key)
                    chosen += members
        if not chosen:
            return self.always
        chosen += self.always
        chosen.sort(key=_index)
        return chosen


class Detector:
    """The loaded rules, ready to check packets.

    ``prefilter=False`` evaluates every rule of the packet's protocol in full (the
    prefilter's reference); ``small`` is :data:`SMALL_GROUP` (0: always an automaton)."""

    def __init__(
        self, rules: list[Rule], *, prefilter: bool = True, small: int = SMALL_GROUP
    ) -> None:
        self.rules = rules
        self.prefilter = prefilter
        self.small = small
        self._protocols: dict[str, list[Rule]] = {
            name: [r for r in rules if r.proto == name or r.proto == "ip"]
            for name in ("tcp", "udp", "icmp", "ip")
        }
        # Port grouping: bit i of a mask stands for rule i of the protocol's list.
        self._masks: dict[str, tuple[int, int, int, int]] = {}
        for name, members in self._protocols.items():
            every = (1 << len(members)) - 1
            portless = bidir = 0
            for i, rule in enumerate(members):
                if name not in ("tcp", "udp") or rule.proto == "ip":
                    portless |= 1 << i
                if rule.bidirectional:
                    bidir |= 1 << i
            self._masks[name] = (every, portless, bidir, 0)
        # Port masks by interval: every port list is made of ranges, so between two
        # consecutive range ends every list admits all ports or none; the masks of each
        # stretch of ports are worked out once.  (name, source?) -> (starts, masks).
        self._port_masks: dict[tuple[str, bool], tuple[list[int], list[int]]] = {}
        for name in ("tcp", "udp"):
            members = self._protocols[name]
            for source in (True, False):
                ends: set[int] = set()
                for rule in members:
                    _range_ends(rule.sport if source else rule.dport, ends)
                starts = sorted(ends)
                masks = []
                for i in range(len(starts) + 1):
                    port = starts[i - 1] if i else (starts[0] - 1 if starts else 0)
                    mask = self._masks[name][1]
                    for j, rule in enumerate(members):
                        if port in (rule.sport if source else rule.dport):
                            mask |= 1 << j
                    masks.append(mask)
                self._port_masks[name, source] = (starts, masks)
        self._groups: dict[tuple[str, int], _Group] = {}
        #: (proto, sport, dport) packed in an int -> its group: the packets of one flow
        #: find theirs in one lookup.
        self._recent: dict[int, _Group] = {}

    def _port_mask(self, name: str, port: int, source: bool) -> int:
        """Bit i set: rule i of ``name`` admits ``port`` as its source (or destination)
        port, or has no ports."""
        starts, masks = self._port_masks[name, source]
        return masks[bisect_right(starts, port)]

    def group(self, proto: int, sport: int, dport: int) -> _Group:
        """The rules a packet of ``proto`` between these ports can meet (their port lists
        admit it one way or, for ``<>``, the other), with their prefilter."""
        packed = proto << 32 | sport << 16 | dport
        group = self._recent.get(packed)
        if group is None:
            group = self._group(proto, sport, dport)
            if len(self._recent) >= _PORT_CACHE:
                self._recent.clear()
            self._recent[packed] = group
        return group

    def _group(self, proto: int, sport: int, dport: int) -> _Group:
        name = _GROUPS.get(proto, "ip")
        if name in ("tcp", "udp"):
            pm = self._port_mask
            bidir = self._masks[name][2]
            mask = pm(name, sport, True) & pm(name, dport, False)
            if bidir:
                mask |= bidir & pm(name, dport, True) & pm(name, sport, False)
        else:
            mask = self._masks[name][0]
        key = (name, mask)
        group = self._groups.get(key)
        if group is None:
            members = self._protocols[name]
            chosen = [r for i, r in enumerate(members) if mask >> i & 1]
            group = self._groups[key] = _Group(chosen, self.small)
        return group

    def bare(self, proto: int, sport: int, dport: int) -> bool:
        """Whether no rule can match a packet of ``proto`` between these ports that has no
        payload: then it need not be looked at (a cheap test, its group's one lookup)."""
        return self.prefilter and not self.group(proto, sport, dport).bare

    def candidates(self, packet: PacketView, lower: bytes) -> list[Rule]:
        """The rules worth evaluating in full on ``packet``, in file order."""
        if not self.prefilter:
            return self._protocols[_GROUPS.get(packet.proto, "ip")]
        return self.group(packet.proto, packet.sport, packet.dport).candidates(lower)

    def detect(self, packet: PacketView) -> list[Rule]:
        """The rules that match ``packet``, in file order.  A rule with content or pcre
        never matches a packet without payload (as Suricata, even when they are all
        negated)."""
        payload = packet.payload
        lower = payload.lower()
        ports = packet.proto in (TCP, UDP)
        # the port groups admit only rules whose ports fit: then a rule for any address
        # needs no header check
        grouped = self.prefilter
        matched: list[Rule] = []
        first_way = packet.first_way
        for rule in self.candidates(packet, lower):
            if rule.ip_only and not first_way:
                continue
            if not (grouped and rule.any_address) and not rule.header_matches(
                packet.src, packet.sport, packet.dst, packet.dport, ports and rule.proto != "ip"
            ):
                continue
            if not _checks(rule, packet):
                continue
            if rule.payload and (not payload or not match_payload(rule.plan, payload, lower)):
                continue
            matched.append(rule)
        return matched


def _range_ends(ports: PortSet, out: set[int]) -> None:
    """Add where each range of ``ports`` (nested lists included) starts and where the
    ports after it start."""
    for item in (*ports.positive, *ports.negative):
        if isinstance(item, PortSet):
            _range_ends(item, out)
        else:
            out.add(item[0])
            out.add(item[1] + 1)


def _index(rule: Rule) -> int:
    return rule.index


def _checks(rule: Rule, packet: PacketView) -> bool:
    """The options that do not read the payload's bytes: flow, flags, dsize, itype, icode."""
    flow = rule.flow
    if flow is not None:
        if flow.to is not None and packet.to_server is not None:
            if packet.to_server != (flow.to == "server"):
                return False
        if flow.state == "established" and not packet.established:
            return False
        if flow.state == "not_established" and packet.established:
            return False
    flags = rule.flags
    if flags is not None and (packet.proto != TCP or not flags.check(packet.tcp_flags)):
        return False
    for dsize in rule.dsize:
        if not dsize.check(len(packet.payload)):
            return False
    if rule.icmp:
        if packet.proto != ICMP and packet.proto != ICMP6:
            return False
        for field in rule.icmp:
            if not field.check(packet.icmp_type, packet.icmp_code):
                return False
    return True
