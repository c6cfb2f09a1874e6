"""The fast-alert line (Snort's ``alert_fast`` output, as Suricata's ``fast.log`` writes it
too, less the year)::

    07/14-02:40:03.000000  [**] [1:1000001:1] T1 phf [**] [Classification: Attempted
    Information Leak] [Priority: 2] {TCP} 10.0.0.1:40000 -> 10.0.0.2:80

(one line).  Time in UTC; the classification block only when the rule has a classtype;
ports only for TCP and UDP, and not for a fragment.
"""

from __future__ import annotations

import re
import time

from nf.ids.rules import Rule
from nf.packet import ip_str

__all__ = ["PROTO_NAMES", "fast_alert", "parse_fast_alert"]

PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP"}


def _timestamp(ts: float) -> str:
    micros = round(ts * 1_000_000)
    seconds, micros = divmod(micros, 1_000_000)
    t = time.gmtime(seconds)
    return (
        f"{t.tm_mon:02d}/{t.tm_mday:02d}-{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d}"
    )


def fast_alert(
    rule: Rule,
    ts: float,
    proto: int,
    src: int,
    sport: int,
    dst: int,
    dport: int,
    fragment: bool = False,
) -> str:
    """The fast-alert line of ``rule`` firing on a packet (a ``fragment``'s line has no
    ports, as Snort writes it)."""
    parts = [f"{_timestamp(ts)}  [**] [{rule.gid}:{rule.sid}:{rule.rev}] {rule.msg} [**]"]
    if rule.classification is not None:
        parts.append(f"[Classification: {rule.classification.description}]")
    parts.append(f"[Priority: {rule.priority}]")
    name = PROTO_NAMES.get(proto)
    if name in ("TCP", "UDP") and not fragment:
        parts.append(f"{{{name}}} {ip_str(src)}:{sport} -> {ip_str(dst)}:{dport}")
    else:
        parts.append(f"{{{name or 'IP'}}} {ip_str(src)} -> {ip_str(dst)}")
    return " ".join(parts)


_LINE = re.compile(
    r"^\S+\s+\[\*\*\] \[(\d+):(\d+):(\d+)\] .*? \{(\w+)\} "
    r"([\d.]+)(?::(\d+))? -> ([\d.]+)(?::(\d+))?\s*$"
)


def parse_fast_alert(line: str) -> tuple[int, int, int, str, str, int | None, str, int | None]:
    """``(gid, sid, rev, proto, src, sport, dst, dport)`` of a fast-alert line, ours or
    Suricata's (whose ICMP lines carry type and code where ports would be: ``None`` for
    ports of anything but TCP and UDP)."""
    m = _LINE.match(line)
    if m is None:
        raise ValueError(f"not a fast-alert line: {line!r}")
    gid, sid, rev, proto, src, sport, dst, dport = m.groups()
    has_ports = proto in ("TCP", "UDP")
    return (
        int(gid),
        int(sid),
        int(rev),
        proto,
        src,
        int(sport) if has_ports and sport is not None else None,
        dst,
        int(dport) if has_ports and dport is not None else None,
    )
