"""A crash in the middle of an operator's scale-in: real processes on loopback (a
controller, three PRADS instances, the sink and the sender).

``ctl scale-in`` of one instance; the moment that instance says it is leaving (it has told
the sender, and the event waits in its first stage for it to finish its traffic), it is
killed (SIGKILL).  An operator relies on: ``ctl`` answers within its bound, with the
event aborted (the leaver vanished before acknowledging it); the controller then declares
the instance dead and repairs the ring; the two others serve on (nothing they were sent is
lost, nothing reordered); a query answers; both leave gracefully at the end.  Each wait is
on a process's line or exit, under a deadline."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.live import ROOT, Proc, _free_port
from bench.traffic import main as traffic
from tests.integration.live_procs import (
    leave_gracefully,
    start_controller,
    start_instances,
    start_sender,
    start_sink,
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_a_leaver_killed_during_its_scale_in_stops_nothing_else(tmp_path: Path) -> None:
    pcap = tmp_path / "traffic.pcap"
    traffic(["make", "--flows", "300", "--seed", "4", "--out", str(pcap)])
    address = f"127.0.0.1:{_free_port()}"
    procs: list[Proc] = []
    try:
        start_controller(address, tmp_path, procs, "--failure-timeout", "1.5")
        sink, sink_address = start_sink(tmp_path, procs)
        instances = start_instances(3, address, sink_address, tmp_path, procs)
        names = [inst.event("ready", 60)["name"] for inst in instances]
        sender = start_sender(address, sink_address, pcap, 8, 3, tmp_path, procs)
        leaver, survivors = instances[0], instances[1:]
        scale = subprocess.Popen(
            [sys.executable, "-m", "store.ctl", "--controller", address, "scale-in", names[0]],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        leaver.event("leaving", 60)
        leaver.popen.kill()
        out, _ = scale.communicate(timeout=60)
        assert scale.returncode != 0 and "aborted" in out, out
        # the repair: the ring without the dead instance (polled under a deadline)
        deadline = time.monotonic() + 60
        while True:
            status = _cli("store.ctl", "--controller", address, "status")
            if status.returncode == 0 and "last event: repair" in status.stdout:
                break
            assert time.monotonic() < deadline, f"never repaired: {status.stdout}"
            time.sleep(0.2)
        assert "2 members" in status.stdout, status.stdout
        query = _cli("nf", "query", "--controller", address, "prads", "statistics")
        assert query.returncode == 0, query.stderr
        done = sender.event("done", 60)
        report = sink.event("done", 60)
        leave_gracefully(survivors)
    finally:
        for p in reversed(procs):
            p.stop()
    sent_to_dead = done["per_instance"].get(names[0], 0)
    assert report["sent"] == done["sent"] > 5000, (report, done)
    assert report["received"] + report["lost"] == report["sent"], report
    assert report["lost"] <= sent_to_dead, (report, sent_to_dead)
    assert report["duplicates"] == 0 and report["reordered"] == 0, report
