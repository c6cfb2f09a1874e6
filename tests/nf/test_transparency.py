"""Transparency (the paper's promise) for our NFs: the same capture on one member, on three
members with the flows spread across them, and on two members scaled out to three halfway
through gives the same result.  For the NAT, "the same" is: the same verdicts, the same
connections translated and still live, and translations that keep the invariants (each
connection keeps one public port, no port is held by two live connections, checksums
right, every reply mapped back exactly); the port numbers themselves may differ.  The runs
go side by side (the members of each run are stopped together at its end)."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Any

import dpkt
import trio

from bench.traffic import make
from nf.nat import NAT
from nf.packet import ip_int, parse
from nf.runner import RunResult, run_capture
from nf.synthetic import Synthetic

P = ip_int("203.0.113.1")
INSIDE = ip_int("10.0.0.0")
PACKETS = make(120, seed=5)


async def three_ways(nf_cls: Any, config: dict[str, Any]) -> list[RunResult]:
    results: list[RunResult | None] = [None, None, None]

    async def one(i: int, instances: int, scale_at: float | None) -> None:
        results[i] = await run_capture(
            nf_cls, config, PACKETS, instances=instances, scale_at=scale_at, keep_frames=True
        )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0, 1, None)
            nursery.start_soon(one, 1, 3, None)
            nursery.start_soon(one, 2, 2, 0.5)
    done = [r for r in results if r is not None]
    assert len(done) == 3
    assert [r.members for r in done] == [1, 3, 3]
    return done


def check_nat_invariants(result: RunResult) -> None:
    """The NAT's invariants over the packets in the order the NAT handled them (a flow's
    packets keep their order, but a packet parked on a remote answer finishes after later
    packets of other flows, as it would live)."""
    assert len(result.forwarded) == len(PACKETS)  # nothing dropped in this traffic
    assert sorted(result.order) == list(range(len(PACKETS)))
    port_of: dict[tuple[int, ...], int] = {}
    spans: dict[tuple[int, ...], list[int]] = {}
    for i, index in enumerate(result.order):
        before, after = PACKETS[index][1], result.forwarded[index][1]
        a, b = parse(before, 0.0), parse(after, 0.0)
        if a.src >> 16 != INSIDE >> 16:  # a reply seen inside: mapped back exactly
            assert bytes(after) == before
            continue
        assert (b.src, b.dst, b.dport, b.proto) == (P, a.dst, a.dport, a.proto)
        conn = a.flow
        assert port_of.setdefault(conn, b.sport) == b.sport  # one port per connection
        spans.setdefault(conn, [i, i])[1] = i
        ip = dpkt.ethernet.Ethernet(bytes(after)).data  # checksums as if computed afresh
        sums = (ip.sum, ip.data.sum)
        ip.sum = ip.data.sum = 0
        again = dpkt.ip.IP(bytes(ip))
        assert sums == (again.sum, again.data.sum) or (a.proto == 6 and sums[1] in (0, 0xFFFF))
    users: dict[int, list[list[int]]] = defaultdict(list)
    for conn, port in port_of.items():
        users[port].append(spans[conn])
    for port, intervals in users.items():  # connections sharing a port never overlap
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert end < start, f"port {port} held by two live connections"


def without_ports(lines: list[str]) -> list[str]:
    return sorted(re.sub(r"203\.0\.113\.1:\d+", "203.0.113.1:*", line) for line in lines)


def moved(result: RunResult) -> int:
    return sum(s.migrations_in for s in result.statistics)


async def test_nat_and_synthetic_are_transparent_to_members_and_scaling() -> None:
    synthetic_config = {
        "flow_objects": 2,
        "shared_access": "untethered",
        "shared_pattern": "round-robin",
    }
    runs: dict[str, list[RunResult]] = {}

    async def both(name: str, nf_cls: Any, config: dict[str, Any]) -> None:
        runs[name] = await three_ways(nf_cls, config)

    short = {"inside": ["10.0.0.0/16"], "tcp_idle": 2.0, "udp_idle": 0.5, "fin_grace": 0.3}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(both, "nat", NAT, {"inside": ["10.0.0.0/16"]})
        nursery.start_soon(both, "nat-short", NAT, short)
        nursery.start_soon(both, "synthetic", Synthetic, synthetic_config)

    one, three, scaled = runs["nat"]
    for result in (one, three, scaled):
        check_nat_invariants(result)
    assert moved(one) == 0 and moved(scaled) > 0  # the scale-out moved flows' state
    assert one.verdicts == three.verdicts == scaled.verdicts
    assert without_ports(one.lines) == without_ports(three.lines) == without_ports(scaled.lines)
    assert len(one.lines) > 50
    assert "inside-reply-mismatch" not in one.counts | three.counts | scaled.counts
    for name in ("translations", "closed-rst", "unsolicited-inbound", "pool-exhausted"):
        assert one.counts.get(name) == three.counts.get(name) == scaled.counts.get(name), name

    # Short timeouts: entries expire and close on every member's own timers, before and
    # after the scale-out, at the same points of the capture.
    one, three, scaled = runs["nat-short"]
    for result in (one, three, scaled):
        check_nat_invariants(result)
    assert one.counts.get("closed-fin", 0) > 10 and one.counts.get("expired", 0) > 10
    for name in ("translations", "closed-rst", "closed-fin", "expired"):
        assert one.counts.get(name) == three.counts.get(name) == scaled.counts.get(name), name
    assert without_ports(one.lines) == without_ports(three.lines) == without_ports(scaled.lines)

    one, three, scaled = runs["synthetic"]
    assert moved(scaled) > 0
    assert one.lines == three.lines == scaled.lines
    assert one.lines[-1] == f"shared updates {len(PACKETS)}"
    assert one.counts.get("flows-ended") == three.counts.get("flows-ended")
    assert one.counts.get("flows-ended") == scaled.counts.get("flows-ended")
