"""Stopping the sender by hand (Ctrl-C or SIGTERM), as an operator ends a run early: real
processes on loopback (a controller, two PRADS instances, the sink and the sender).

The first signal ends the sending as its duration would: the sender tells the instances
and the sink that the traffic is over, prints its report and exits 0; the sink then ends
on its own with every frame the sender counted accounted for.  (The sender used to die
with a traceback, no report and no end marker, and the sink waited on.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from bench.live import Proc, _free_port
from bench.traffic import main as traffic
from tests.integration.live_procs import (
    leave_gracefully,
    start_controller,
    start_instances,
    start_sender,
    start_sink,
)


def test_ctrl_c_ends_the_senders_run_with_its_report_and_end_markers(tmp_path: Path) -> None:
    # (SIGTERM takes the same path: one signal receiver for both)
    signum = signal.SIGINT
    pcap = tmp_path / "traffic.pcap"
    traffic(["make", "--flows", "200", "--seed", "5", "--out", str(pcap)])
    address = f"127.0.0.1:{_free_port()}"
    procs: list[Proc] = []
    try:
        start_controller(address, tmp_path, procs)
        sink, sink_address = start_sink(tmp_path, procs)
        instances = start_instances(2, address, sink_address, tmp_path, procs)
        for inst in instances:
            inst.event("ready", 60)
        sender = start_sender(address, sink_address, pcap, 600, 2, tmp_path, procs)
        time.sleep(1.0)  # (only how much traffic flows before the signal)
        sender.popen.send_signal(signum)
        done = sender.event("done", 30)
        assert sender.popen.wait(30) == 0, sender.tail()
        report = sink.event("done", 30)
        leave_gracefully(instances)
    finally:
        for p in reversed(procs):
            p.stop()
    assert done["stopped_by"] == signum.name, done
    assert done["seconds"] < 60, done
    assert done["sent"] > 0, done
    assert report["sent"] == done["sent"], (report, done)
    assert report["received"] == done["sent"] and report["lost"] == 0, report
    assert report["duplicates"] == 0 and report["reordered"] == 0, report
