"""The traffic goes on without the controller, and stops cleanly without instances: real
processes on loopback (a controller, two PRADS instances, the sink and the sender).

The controller is killed (SIGKILL) under traffic and started again on its address; then
both instances are scaled in by SIGTERM while the sender still has time to send.  An
operator relies on: the instances serve on while the controller is away and the sender
keeps steering as it did (one ``controller-lost`` line, then ``controller-back`` once the
new controller knows the ring again, its empty first answers ignored); when every instance
has left, the sender waits for one (``no-instance``) instead of failing; every frame it
sent arrives, once.  Each wait is on a process's line, under a deadline."""

from __future__ import annotations

import signal
from pathlib import Path

from bench.live import Proc, _free_port
from bench.traffic import main as traffic
from tests.integration.live_procs import start_controller, start_instances, start_sender, start_sink


def test_traffic_outlives_a_controller_restart_and_waits_when_no_instance_is_left(
    tmp_path: Path,
) -> None:
    pcap = tmp_path / "traffic.pcap"
    traffic(["make", "--flows", "300", "--seed", "3", "--out", str(pcap)])
    address = f"127.0.0.1:{_free_port()}"

    def controller(n: int) -> Proc:
        return start_controller(address, tmp_path, procs, name=f"controller-{n}")

    procs: list[Proc] = []
    try:
        first = controller(1)
        sink, sink_address = start_sink(tmp_path, procs)
        instances = start_instances(2, address, sink_address, tmp_path, procs)
        for inst in instances:
            inst.event("ready", 60)
        sender = start_sender(address, sink_address, pcap, 14, 2, tmp_path, procs)
        first.popen.kill()
        sender.event("controller-lost", 30)
        controller(2)
        sender.event("controller-back", 60)
        for inst in instances:
            inst.popen.send_signal(signal.SIGTERM)
        sender.event("no-instance", 60)
        for inst in instances:
            assert inst.event("exit", 60)["leaving"] == "SIGTERM"
        done = sender.event("done", 60)
        report = sink.event("done", 60)
        assert sender.popen.wait(30) == 0
    finally:
        for p in reversed(procs):
            p.stop()
    assert done["no_instance_s"] > 0 and done["unsendable"] == 0, done
    total = report  # (the sink's done line: its totals)
    assert total["sent"] == done["sent"] > 1000, (total, done)
    assert total["received"] == done["sent"] and total["lost"] == 0, total
    assert total["duplicates"] == 0 and total["reordered"] == 0, total
