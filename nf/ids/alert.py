"""The fast-alert line (Snort's ``alert_fast`` output, as Suricata's ``fast.log`` writes it
too, less the year)::

    07/14-02:40:03.000000  [**] [1:1000001:1] T1 phf [**] [Classification: Attempted
    Information Leak] [Priority: 2] {TCP} 10.0.0.1:40000 -> 10.0.0.2:80

(one line).  Time in UTC; the classification block only when the rule has a classtype;
ports only for TCP and UDP, and not for a fragment.  IPv6 addresses as ``inet_ntop`` writes
them (Snort's way; Suricata writes all eight groups in full, which
:func:`parse_fast_alert` reads too), ICMPv6 as ``{IPv6-ICMP}``.
"""

from __future__ import annotations

import ipaddress
import re
import time

from nf.ids.rules import Rule
from nf.packet import ip_str

__all__ = ["PROTO_NAMES", "fast_alert", "parse_fast_alert"]

PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "IPv6-ICMP"}


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
    r"^\S+\s+\[\*\*\] \[(\d+):(\d+):(\d+)\] .*? \{([\w:-]+)\} "
    r"([\da-fA-F.:]+) -> ([\da-fA-F.:]+)\s*$"
)


def _end(text: str, ports: bool, line: str) -> tuple[str, int | None]:
    """An address with its port (``ports``: always; else an ICMP type or code where
    Suricata writes them), or without one: the address comes back as ``ipaddress`` writes
    it (IPv6 compressed), so that Suricata's full groups and ``inet_ntop``'s form compare
    equal."""
    if not ports or ("." in text and ":" not in text):  # (an IPv4 fragment: no ports)
        try:
            return str(ipaddress.ip_address(text)), None
        except ValueError:
            pass
    addr, _, port = text.rpartition(":")
    try:
        return str(ipaddress.ip_address(addr)), int(port)
    except ValueError:
        raise ValueError(f"not a fast-alert line: {line!r}") from None


def parse_fast_alert(line: str) -> tuple[int, int, int, str, str, int | None, str, int | None]:
    """``(gid, sid, rev, proto, src, sport, dst, dport)`` of a fast-alert line, ours or
    Suricata's (whose ICMP lines carry type and code where ports would be: ``None`` for
    ports of anything but TCP and UDP, and of an IPv4 fragment's line, which has none)."""
    m = _LINE.match(line)
    if m is None:
        raise ValueError(f"not a fast-alert line: {line!r}")
    gid, sid, rev, proto, src_text, dst_text = m.groups()
    has_ports = proto in ("TCP", "UDP")
    src, sport = _end(src_text, has_ports, line)
    dst, dport = _end(dst_text, has_ports, line)
    return (
        int(gid),
        int(sid),
        int(rev),
        proto,
        src,
        sport if has_ports else None,
        dst,
        dport if has_ports else None,
    )
