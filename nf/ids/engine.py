"""Matching one packet against the loaded rules, with a fast-pattern prefilter.

Rules are grouped by the transport protocol they can apply to (an ``ip`` rule joins every
group).  Each rule with a positive content contributes one fast pattern: the content marked
``fast_pattern``, else its longest positive content.  One Aho-Corasick automaton per group
(pyahocorasick) finds, in one case-insensitive pass over the payload, which fast patterns
occur anywhere in it; only those rules, and the rules without a positive content, are then
evaluated in full.  A rule whose fast pattern occurs nowhere in the payload cannot match
(each positive content must lie inside the payload, exactly or ignoring case), so the
alerts are those of evaluating every rule: ``Detector(prefilter=False)`` does that, and a
property test compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import ahocorasick

from nf.ids.options import match_payload
from nf.ids.rules import Rule

__all__ = ["Detector", "PacketView"]

TCP, UDP, ICMP = 6, 17, 1
_GROUPS = {TCP: "tcp", UDP: "udp", ICMP: "icmp"}


@dataclass(slots=True)
class PacketView:
    """What detection reads of a packet.

    ``to_server``: True when the packet comes from the flow's initiator, False when from
    its responder, None without a session.  ``established``: the flow's state as ``flow``
    reads it."""

    proto: int
    src: int
    dst: int
    sport: int
    dport: int
    tcp_flags: int
    payload: bytes
    to_server: bool | None = None
    established: bool = False


class _Group:
    __slots__ = ("always", "automaton", "rules")

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.always: list[Rule] = []
        patterns: dict[str, list[int]] = {}
        for rule in rules:
            fp = rule.fast_pattern
            if fp is None:
                self.always.append(rule)
            else:
                key = fp.pattern.lower().decode("latin-1")
                patterns.setdefault(key, []).append(rule.index)
        self.automaton: ahocorasick.Automaton | None = None
        if patterns:
            automaton = ahocorasick.Automaton()
            for key, indices in patterns.items():
                automaton.add_word(key, tuple(indices))
            automaton.make_automaton()
            self.automaton = automaton


class Detector:
    """The loaded rules, ready to check packets."""

    def __init__(self, rules: list[Rule], *, prefilter: bool = True) -> None:
        self.rules = rules
        self.prefilter = prefilter
        self._by_index = {rule.index: rule for rule in rules}
        self._groups: dict[str, _Group] = {}
        for name in ("tcp", "udp", "icmp", "ip"):
            members = [r for r in rules if r.proto == name or r.proto == "ip"]
            self._groups[name] = _Group(members)

    def candidates(self, packet: PacketView, lower: bytes) -> list[Rule]:
        """The rules worth evaluating in full on ``packet``, in file order."""
        group = self._groups[_GROUPS.get(packet.proto, "ip")]
        if not self.prefilter:
            return group.rules
        automaton = group.automaton
        if automaton is None or not lower:
            return group.always
        hits: set[int] = set()
        for _end, indices in automaton.iter(lower.decode("latin-1")):
            hits.update(indices)
        if not hits:
            return group.always
        by_index = self._by_index
        chosen = [by_index[i] for i in hits]
        chosen.extend(group.always)
        chosen.sort(key=_index)
        return chosen

    def detect(self, packet: PacketView) -> list[Rule]:
        """The rules that match ``packet``, in file order.  A rule with content or pcre
        never matches a packet without payload (as Suricata, even when they are all
        negated)."""
        payload = packet.payload
        lower = payload.lower()
        ports = packet.proto in (TCP, UDP)
        matched: list[Rule] = []
        for rule in self.candidates(packet, lower):
            if not rule.header_matches(
                packet.src, packet.sport, packet.dst, packet.dport, ports and rule.proto != "ip"
            ):
                continue
            if not _checks(rule, packet):
                continue
            if rule.payload and (not payload or not match_payload(rule.plan, payload, lower)):
                continue
            matched.append(rule)
        return matched


def _index(rule: Rule) -> int:
    return rule.index


def _checks(rule: Rule, packet: PacketView) -> bool:
    """The options that do not read the payload's bytes: flow, flags, dsize."""
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
    return True
