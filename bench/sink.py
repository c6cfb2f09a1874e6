"""The live sink: what comes out of the NF instances, measured per 100 ms interval.

::

    python -m bench.sink --listen HOST:PORT --out FILE.json [--interval S] [--progress]
                         [--drain-timeout S]

It receives the instances' RECEIPT datagrams (or their forwarded frames as DATA, see
``nf.serve --forward``) and the sender's END marker (how many frames it sent), and reports,
per interval and in total: frames received and their bytes, throughput, frames the NF
dropped (a verdict, not a loss), per-flow reordering (a frame arriving after a later one of
its flow), duplicates, holes (frames missing inside a flow so far: lost, or still on their
way) and latency percentiles from send to arrival here, recorded in an HdrHistogram (µs,
three significant digits).  It ends when the sender's END has come and every frame sent
has arrived, or ``--drain-timeout`` seconds after the last arrival once END is in (the rest
is lost), or on SIGTERM/SIGINT; it writes the JSON report then.  ``lost`` is frames sent
minus distinct frames received.

The first stdout line is ``{"event": "ready", "address": "HOST:PORT"}``.  The sink's own
CPU use is in the report (``cpu``): a sink that used most of a core may have dropped or
delayed frames itself, and the report says it is then not a valid measurement.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Final

from hdrh.histogram import HdrHistogram

from nf.datachannel import Kind, MalformedDatagram, decode, now_ns
from store.cli.common import OneLineParser, address

__all__ = ["CPU_LIMIT", "Sink", "main"]

#: Share of one core above which the sink (or the sender) may itself be the bottleneck.
CPU_LIMIT: Final = 0.85
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
_HIGHEST_US: Final = 60_000_000


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, 3)


def _latency(h: HdrHistogram, total_us: int) -> dict[str, float]:
    """Percentiles, max and mean; the mean from the sum of what was recorded, since
    ``HdrHistogram.get_mean_value`` walks every bucket in Python (about 20 ms here, ten
    times a second: a quarter of a core spent by the sink on nothing else)."""
    count = h.get_total_count()
    if count == 0:
        return {}
    out = {f"p{p:g}": float(h.get_value_at_percentile(p)) for p in PERCENTILES}
    out["max"] = float(h.get_max_value())
    out["mean"] = round(total_us / count, 1)
    return out


class Sink:
    """The counters; :meth:`take` is called per datagram, :meth:`close_interval` per
    interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.started_wall = time.time()
        self.started_ns = now_ns()
        self.next_ns = self.started_ns + int(interval * 1e9)
        # Per flow: the next sequence number not yet seen in order, the highest seen,
        # and the ones seen beyond the next (out of order).
        self.next_seq: dict[int, int] = {}
        self.max_seq: dict[int, int] = {}
        self.ahead: dict[int, set[int]] = {}
        self.unique = 0
        self.duplicates = 0
        self.reordered = 0
        self.holes = 0
        self.dropped = 0
        self.bytes = 0
        self.bad: dict[str, int] = {}
        self.by_sender: dict[int, int] = {}
        self.frames_sent: int | None = None
        self.total = _histogram()
        self.current = _histogram()
        #: Sums of the latencies recorded (µs), for the means.
        self.total_us = 0
        self.current_us = 0
        self.intervals: list[dict[str, Any]] = []
        self._i = {"received": 0, "bytes": 0, "dropped": 0, "reordered": 0, "duplicates": 0}
        self.first_ns: int | None = None
        self.last_ns = self.started_ns
        self.cpu_start = time.process_time()

    def take(self, raw: bytes, now: int) -> None:
        try:
            d = decode(raw)
        except MalformedDatagram as exc:
            self.bad[exc.reason] = self.bad.get(exc.reason, 0) + 1
            return
        if d.kind == Kind.END:
            # The sender's: how many frames it sent in all.
            self.frames_sent = d.frames_sent
            return
        if d.kind == Kind.RECEIPT:
            entries = [(r.flow, r.seq, r.sent_ns, r.length, r.verdict) for r in d.receipts]
        elif d.kind == Kind.DATA:
            entries = [(f.flow, f.seq, f.sent_ns, len(f.data), 0) for f in d.frames]
        else:
            key = "unexpected-" + d.kind.name.lower()
            self.bad[key] = self.bad.get(key, 0) + 1
            return
        if self.first_ns is None:
            self.first_ns = now
            self.cpu_start = time.process_time()
        self.last_ns = now
        self.by_sender[d.sender] = self.by_sender.get(d.sender, 0) + len(entries)
        next_seq, max_seq, ahead = self.next_seq, self.max_seq, self.ahead
        record = self.current.record_value
        i = self._i
        received = nbytes = dropped = reordered = dups = lat_sum = 0
        for flow, seq, sent, length, verdict in entries:
            lat = (now - sent) // 1000
            lat = lat if 0 < lat < _HIGHEST_US else (1 if lat <= 0 else _HIGHEST_US - 1)
            record(lat)
            lat_sum += lat
            n = next_seq.get(flow, 0)
            m = max_seq.get(flow, -1)
            if seq < m:
                reordered += 1
            else:
                if seq > m + 1:
                    self.holes += seq - m - 1
                max_seq[flow] = seq
            if seq == n:
                n += 1
                extra = ahead.get(flow)
                if extra:
                    while n in extra:
                        extra.discard(n)
                        n += 1
                next_seq[flow] = n
            elif seq > n:
                extra = ahead.setdefault(flow, set())
                if seq in extra:
                    dups += 1
                    continue
                extra.add(seq)
            else:
                dups += 1
                continue
            if seq < m:
                self.holes -= 1  # a late frame filled a hole
            received += 1
            nbytes += length
            if verdict:
                dropped += 1
        self.current_us += lat_sum
        self.unique += received
        self.duplicates += dups
        self.reordered += reordered
        self.bytes += nbytes
        self.dropped += dropped
        i["received"] += received
        i["bytes"] += nbytes
        i["dropped"] += dropped
        i["reordered"] += reordered
        i["duplicates"] += dups

    def tick(self, now: int) -> None:
        while now >= self.next_ns:
            self.close_interval()

    def close_interval(self) -> None:
        start = self.next_ns - int(self.interval * 1e9)
        i = self._i
        self.intervals.append(
            {
                "t": round(self.started_wall + (start - self.started_ns) / 1e9, 4),
                "t_s": round((start - self.started_ns) / 1e9, 3),
                **i,
                "pps": round(i["received"] / self.interval, 1),
                "mbit_s": round(i["bytes"] * 8 / self.interval / 1e6, 3),
                "holes": self.holes,
                "latency_us": _latency(self.current, self.current_us),
            }
        )
        self.total.add(self.current)
        self.total_us += self.current_us
        self.current = _histogram()
        self.current_us = 0
        self._i = dict.fromkeys(i, 0)
        self.next_ns += int(self.interval * 1e9)

    def complete(self) -> bool:
        return self.frames_sent is not None and self.unique >= self.frames_sent

    def report(self) -> dict[str, Any]:
        self.total.add(self.current)
        self.total_us += self.current_us
        self.current_us = 0
        end = self.last_ns
        wall = max((end - (self.first_ns or end)) / 1e9, 1e-9)
        cpu = time.process_time() - self.cpu_start
        share = cpu / wall if self.first_ns is not None else 0.0
        sent = self.frames_sent
        return {
            "interval_s": self.interval,
            "intervals": self.intervals,
            "total": {
                "sent": sent,
                "received": self.unique,
                "lost": None if sent is None else max(sent - self.unique, 0),
                "dropped_by_nf": self.dropped,
                "duplicates": self.duplicates,
                "reordered": self.reordered,
                "holes": self.holes,
                "flows": len(self.next_seq),
                "bytes": self.bytes,
                "seconds": round(wall, 3),
                "pps": round(self.unique / wall, 1),
                "latency_us": _latency(self.total, self.total_us),
                "by_instance": {str(k): v for k, v in sorted(self.by_sender.items())},
                "bad_datagrams": self.bad,
            },
            "cpu": {
                "seconds": round(cpu, 3),
                "share_of_core": round(share, 3),
                "headroom": share < CPU_LIMIT,
            },
            "valid": share < CPU_LIMIT,
        }

    def progress(self) -> str:
        last = self.intervals[-1] if self.intervals else {}
        lat = last.get("latency_us", {})
        sent = "?" if self.frames_sent is None else f"{self.frames_sent:,}"
        return (
            f"{(now_ns() - self.started_ns) / 1e9:6.1f} s  received {self.unique:,} of {sent}"
            f"  {last.get('pps', 0):>9,.0f}/s  holes {self.holes}  reordered {self.reordered}"
            f"  p50 {lat.get('p50', 0):,.0f} us  p99 {lat.get('p99', 0):,.0f} us"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    except OSError:
        pass
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen at {args.listen}: {exc.strerror or exc}") from None
    bound = sock.getsockname()
    print(json.dumps({"event": "ready", "address": f"{bound[0]}:{bound[1]}"}), flush=True)
    stop = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sink = Sink(args.interval)
    live = None
    if args.progress:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
        live.start()
    recv = sock.recv
    try:
        while not stop:
            now = now_ns()
            wait = max((sink.next_ns - now) / 1e9, 0.0005)
            sock.settimeout(wait)
            try:
                raw = recv(65536)
            except TimeoutError:
                raw = b""
            except InterruptedError:
                continue
            now = now_ns()
            if raw:
                sink.take(raw, now)
            if now >= sink.next_ns:
                sink.tick(now)
                if live is not None:
                    live.update(sink.progress())
            if sink.complete():
                break
            if sink.frames_sent is not None and now - sink.last_ns > args.drain_timeout * 1e9:
                break  # the rest is lost
        sink.close_interval()
    finally:
        if live is not None:
            live.update(sink.progress())
            live.stop()
    report = sink.report()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.sink", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", type=address, metavar="HOST:PORT")
    parser.add_argument("--out", metavar="FILE.json", help="write the report here")
    parser.add_argument("--interval", type=float, default=0.1, metavar="S")
    parser.add_argument("--drain-timeout", type=float, default=5.0, metavar="S")
    parser.add_argument("--progress", action="store_true", help="a live line on stderr (rich)")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if args.drain_timeout <= 0:
        parser.error("--drain-timeout must be positive")
    if args.out:  # (checked now: the report is written only at the end)
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--out {args.out}: {exc.strerror or exc}")
    try:
        report = run(args)
    except OSError as exc:  # the address is taken or not this host's
        print(f"python -m bench.sink: error: {exc}", file=sys.stderr)
        return 2
    t = report["total"]
    print(
        json.dumps(
            {
                "event": "done",
                **{k: t[k] for k in ("sent", "received", "lost", "reordered", "duplicates")},
                "latency_us": t["latency_us"],
                "cpu": report["cpu"],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
