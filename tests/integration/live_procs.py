"""Starting the processes of a live NF cluster for the integration tests that drive one
by hand (a sink, PRADS instances), as an operator would from a shell."""

from __future__ import annotations

import signal
from pathlib import Path

from bench.live import Proc


def start_controller(
    address: str, work: Path, procs: list[Proc], *options: str, name: str = "controller"
) -> Proc:
    """A controller listening on ``address`` (with ``options``), once it says so."""
    proc = Proc(
        name,
        ["-m", "store.controller", "--listen", address, *options],
        stderr_to=work / f"{name}.err",
    )
    procs.append(proc)
    proc.wait_line(lambda s: s.startswith("listening on"), 30)
    return proc


def start_sink(work: Path, procs: list[Proc]) -> tuple[Proc, str]:
    """A sink (3 s of silence ends it once the traffic is over), and its address."""
    sink = Proc(
        "sink",
        ["-m", "bench.sink", "--out", str(work / "sink.json"), "--drain-timeout", "3"],
        stderr_to=work / "sink.err",
    )
    procs.append(sink)
    return sink, sink.event("ready", 30)["address"]


def start_instances(
    n: int, controller: str, sink: str, work: Path, procs: list[Proc]
) -> list[Proc]:
    """``n`` PRADS instances joining through ``controller``, started together (each one's
    ``ready`` line is the caller's to wait for)."""
    instances = []
    for i in range(n):
        inst = Proc(
            f"instance-{i}",
            [
                "-m", "nf", "serve", "prads", "--controller", controller, "--data",
                "127.0.0.1:0", "--sink", sink,
            ],
            stderr_to=work / f"instance-{i}.err",
        )  # fmt: skip
        procs.append(inst)
        instances.append(inst)
    return instances


def start_sender(
    controller: str, sink: str, pcap: Path, seconds: float, instances: int, work: Path,
    procs: list[Proc],
) -> Proc:  # fmt: skip
    """The sender: ``pcap`` at 1,500 frames/s for ``seconds``, once ``instances`` PRADS
    instances are members; started (its ``started`` line is in)."""
    sender = Proc(
        "sender",
        [
            "-m", "bench.sender", "--controller", controller, "--sink", sink,
            "--pcap", str(pcap), "--rate", "1500", "--duration", str(seconds), "--nf",
            "prads", "--min-instances", str(instances),
        ],
        stderr_to=work / "sender.err",
    )  # fmt: skip
    procs.append(sender)
    sender.event("started", 60)
    return sender


def leave_gracefully(instances: list[Proc]) -> None:
    """SIGTERM to each instance, then each must exit as a graceful scale-in."""
    for inst in instances:
        inst.popen.send_signal(signal.SIGTERM)
    for inst in instances:
        assert inst.event("exit", 60)["leaving"] == "SIGTERM"
