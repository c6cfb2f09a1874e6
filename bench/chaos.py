"""Random faults against a live NF cluster, driven through its command lines as an operator
would drive it.

::

    python -m bench.chaos [--quick] [--nf prads] [--instances 3] [--rounds 12] [--seed 1]
        [--rate 2000] [--flows 3000] [--out results/chaos.json] [-- NF OPTIONS]

It starts a controller, a sink, N instances (``python -m nf serve NAME``) and the sender
on loopback, then, for each round, waits a random 1 to 6 s and does one thing at random:

* ``kill``: SIGKILL an instance (a crash: its unprocessed frames and its state die with
  it; the controller declares it dead and repairs the ring);
* ``sigterm``: SIGTERM an instance (a graceful scale-in that hands its state on);
* ``ctl-scale-in``: ``python -m store.ctl scale-in`` of an instance;
* ``scale-out``: start one more instance;
* ``stall``: SIGSTOP an instance for 0.2 to 1.2 s, then SIGCONT (below the controller's
  failure timeout: it must come back as a member);
* ``controller``: SIGKILL the controller and start a new one on the same address after
  up to 2 s (the members and the sender reconnect; the ring is learnt back);
* ``garbage``: random datagrams to an instance's data port and random bytes to the
  controller's port (counted and refused; nothing else changes).

It keeps at least two instances and at most five.  After each round, ``store.ctl
status`` and ``python -m nf query NAME statistics`` must both answer within 40 s, and no
instance may have exited that was not made to.  At the end the sender is stopped
(SIGINT), the instances leave (SIGTERM) and the sink reports: a frame may be lost only if
it was sent to an instance that was killed (at most what the sender sent it), none may
arrive twice.  It prints one line per round and a verdict, writes them as JSON (``--out``)
and exits non-zero when a promise failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import check_nf, split_nf_options
from bench.live import ROOT, Proc, _free_port
from store.cli.common import OneLineParser

ACTIONS = ("kill", "sigterm", "ctl-scale-in", "scale-out", "stall", "controller", "garbage")
#: Seconds within which the controller's status and a relayed query must answer again.
ANSWER_WITHIN = 40.0


class Chaos:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.procs: list[Proc] = []
        self.address = f"127.0.0.1:{_free_port()}"
        self.instances: list[Proc] = []
        self.gone: set[str] = set()  # instances made to exit (by name of process)
        self.killed: list[str] = []  # node names of the instances killed
        self.nodes: dict[str, tuple[str, str]] = {}  # instance -> (node name, data address)
        self.rounds: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.controller = self.start_controller()
        self.sink = Proc(
            "sink",
            ["-m", "bench.sink", "--out", str(work / "sink.json"), "--drain-timeout", "5"],
            stderr_to=work / "sink.err",
        )
        self.procs.append(self.sink)
        self.sink_address = self.sink.event("ready", 30)["address"]

    # -- processes ---------------------------------------------------------------------

    def start_controller(self) -> Proc:
        n = sum(1 for p in self.procs if p.name.startswith("controller"))
        proc = Proc(
            f"controller-{n}",
            ["-m", "store.controller", "--listen", self.address],
            stderr_to=self.work / f"controller-{n}.err",
        )
        self.procs.append(proc)
        proc.wait_line(lambda s: s.startswith("listening on"), 30)
        return proc

    def start_instance(self) -> Proc:
        n = len(self.instances)
        proc = Proc(
            f"instance-{n}",
            ["-m", "nf", "serve", self.args.nf, "--controller", self.address,
             "--data", "127.0.0.1:0", "--sink", self.sink_address, *self.args.nf_options],
            stderr_to=self.work / f"instance-{n}.err",
        )  # fmt: skip
        self.procs.append(proc)
        self.instances.append(proc)
        ready = proc.event("ready", 60)
        self.nodes[proc.name] = (ready["name"], ready["data"])
        return proc

    def live(self) -> list[Proc]:
        return [p for p in self.instances if p.name not in self.gone and p.popen.poll() is None]

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    # -- one round ---------------------------------------------------------------------

    def act(self, action: str) -> str:
        rng = self.rng
        live = self.live()
        if action in ("kill", "sigterm", "ctl-scale-in", "stall") and len(live) <= 2:
            action = "scale-out"
        if action == "scale-out" and len(live) >= 5:
            action = "ctl-scale-in"
        victim = rng.choice(live)
        if action == "kill":
            victim.popen.send_signal(signal.SIGKILL)
            self.gone.add(victim.name)
            self.killed.append(self.nodes[victim.name][0])
            return f"{action} {victim.name}"
        if action == "sigterm":
            victim.popen.send_signal(signal.SIGTERM)
            self.gone.add(victim.name)
            return f"{action} {victim.name}"
        if action == "ctl-scale-in":
            self.gone.add(victim.name)
            node = self.nodes[victim.name][0]
            done = self.cli("store.ctl", "--controller", self.address, "scale-in", node)
            if done.returncode != 0:
                self.failures.append(f"ctl scale-in of {victim.name}: {done.stdout[-300:]}")
            return f"{action} {victim.name} (exit {done.returncode})"
        if action == "scale-out":
            return f"{action} {self.start_instance().name}"
        if action == "stall":
            pause = rng.uniform(0.2, 1.2)
            victim.popen.send_signal(signal.SIGSTOP)
            time.sleep(pause)
            victim.popen.send_signal(signal.SIGCONT)
            return f"{action} {victim.name} {pause:.1f} s"
        if action == "controller":
            self.controller.popen.send_signal(signal.SIGKILL)
            self.controller.popen.wait()
            time.sleep(rng.uniform(0.0, 2.0))
            self.controller = self.start_controller()
            return action
        # garbage
        host, port = self.nodes[victim.name][1].rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for _ in range(50):
                udp.sendto(os.urandom(rng.randint(0, 1400)), (host, int(port)))
        chost, cport = self.address.rsplit(":", 1)
        try:
            with socket.create_connection((chost, int(cport)), timeout=2) as tcp:
                tcp.sendall(os.urandom(3000))
        except OSError:
            pass
        return f"{action} to {victim.name} and the controller"

    def check(self) -> tuple[bool, float]:
        """Whether the status and a relayed query answer within :data:`ANSWER_WITHIN`."""
        start = time.monotonic()
        while True:
            status = self.cli("store.ctl", "--controller", self.address, "status")
            query = self.cli(
                "nf", "query", "--controller", self.address, self.args.nf, "statistics"
            )
            took = time.monotonic() - start
            if status.returncode == 0 and query.returncode == 0:
                return True, took
            if took > ANSWER_WITHIN:
                self.failures.append(
                    f"no answer within {ANSWER_WITHIN:g} s: status {status.stderr[-200:]!r}, "
                    f"query {query.stderr[-200:]!r}"
                )
                return False, took
            time.sleep(0.5)

    # -- the run -----------------------------------------------------------------------

    def run(self, pcap: Path) -> dict[str, Any]:
        args = self.args
        for _ in range(args.instances):
            self.start_instance()
        sender = Proc(
            "sender",
            ["-m", "bench.sender", "--controller", self.address, "--sink", self.sink_address,
             "--pcap", str(pcap), "--rate", str(args.rate), "--duration", "3600",
             "--nf", args.nf, "--min-instances", str(args.instances), "--", *args.nf_options],
            stderr_to=self.work / "sender.err",
        )  # fmt: skip
        self.procs.append(sender)
        sender.event("started", 60)
        for number in range(args.rounds):
            time.sleep(self.rng.uniform(1.0, 6.0))
            what = self.act(self.rng.choice(ACTIONS))
            answered, took = self.check()
            exited = [
                p.name
                for p in self.instances
                if p.name not in self.gone and p.popen.poll() is not None
            ]
            for name in exited:
                self.failures.append(f"{name} exited without being made to")
                self.gone.add(name)
            line = {"round": number, "did": what, "answered": answered, "answer_s": round(took, 2),
                    "unexpected_exits": exited}  # fmt: skip
            self.rounds.append(line)
            print(json.dumps(line), flush=True)
        sender.popen.send_signal(signal.SIGINT)
        done = sender.event("done", 60)
        for proc in self.live():
            proc.popen.send_signal(signal.SIGTERM)
        for proc in self.live():
            left = proc.event("exit", 60)
            if left.get("leaving") != "SIGTERM":
                self.failures.append(f"{proc.name} did not leave gracefully: {left}")
        report = self.sink.event("done", 60)
        sent_to_killed = sum(done["per_instance"].get(node, 0) for node in self.killed)
        if report["lost"] > sent_to_killed:
            self.failures.append(
                f"{report['lost']} frames lost, more than the {sent_to_killed} sent to the "
                "killed instances"
            )
        if report["duplicates"]:
            self.failures.append(f"{report['duplicates']} frames arrived twice")
        return {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "rounds": self.rounds,
            "sent": done["sent"],
            "received": report["received"],
            "lost": report["lost"],
            "sent_to_killed": sent_to_killed,
            "duplicates": report["duplicates"],
            "reordered": report["reordered"],
            "failures": self.failures,
            "ok": not self.failures,
        }

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 rounds")
    parser.add_argument("--nf", default="prads")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=2000.0, help="frames per second")
    parser.add_argument("--flows", type=int, default=3000, help="flows of the generated capture")
    parser.add_argument("--out", default=str(ROOT / "results" / "chaos.json"))
    own, nf_options = split_nf_options(argv)
    args = parser.parse_args(own)
    args.nf_options = nf_options
    if args.quick:
        args.rounds = min(args.rounds, 6)
    check_nf(parser, args.nf)
    if args.instances < 2:
        parser.error("--instances must be at least 2")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rate <= 0 or args.flows < 1:
        parser.error("--rate and --flows must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="s6-chaos-") as tmp:
        work = Path(tmp)
        pcap = work / "traffic.pcap"
        from bench.traffic import main as traffic

        with open(os.devnull, "w") as quiet:
            saved, sys.stderr = sys.stderr, quiet
            try:
                traffic(
                    [
                        "make",
                        "--flows",
                        str(args.flows),
                        "--seed",
                        str(args.seed),
                        "--out",
                        str(pcap),
                    ]
                )
            finally:
                sys.stderr = saved
        chaos = Chaos(args, work)
        try:
            result = chaos.run(pcap)
        finally:
            chaos.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    verdict = "every promise kept" if result["ok"] else "FAILED: " + "; ".join(result["failures"])
    print(
        f"{len(result['rounds'])} rounds: {result['sent']} frames sent, {result['received']} "
        f"received, {result['lost']} lost (at most {result['sent_to_killed']} allowed: sent to "
        f"killed instances), {result['duplicates']} twice, {result['reordered']} reordered; "
        f"{verdict} ({out})"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
