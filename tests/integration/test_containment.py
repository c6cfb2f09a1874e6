"""Containment: the death of one process (kill -9) ends no other process.

A controller, three ``store.node`` processes and two member processes on loopback; one of
them is killed with SIGKILL, and the test checks, by asking them, that every other process
still runs and still serves: each member's own updates keep counting up, and the
controller answers ``ctl status``, showing the dead process as LOST.  Nothing here waits
for luck: every wait is for an answer, under a deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Proc
from tests.integration.test_cluster import start_cluster


class Member:
    """A member process the test talks to on stdin/stdout."""

    def __init__(
        self, procs: list[Proc], controller: str, secret_file: Path, *options: str
    ) -> None:
        self.proc = Proc(
            [
                "-m",
                "tests.integration.member",
                "--controller",
                controller,
                "--secret-file",
                str(secret_file),
                *options,
            ],
            stdin=True,
        )
        procs.append(self.proc)
        line = self.proc.first_line()
        assert line.startswith("member "), line
        self.name = line.split()[1]

    def ask(self, command: str, timeout: float = 30) -> dict[str, object]:
        popen = self.proc.popen
        assert popen.stdin is not None
        popen.stdin.write(command + "\n")
        popen.stdin.flush()
        answer: dict[str, object] = json.loads(self.proc.first_line(timeout))
        return answer

    def updates(self) -> int:
        return int(self.ask("stats")["updates"])  # type: ignore[call-overload]

    def keeps_working(self, within: float = 30.0) -> None:
        """Its own (local) updates go on: the count grows between two answers (polled
        until it does, under a deadline)."""
        first = self.updates()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.updates() > first:
                return
            time.sleep(0.02)
        raise AssertionError(f"member {self.name} stopped updating its own objects")


def status(controller: str, secret_file: Path) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "store.ctl",
            "--controller",
            controller,
            "--secret-file",
            str(secret_file),
            "--timeout",
            "10",
            "status",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def alive(procs: list[Proc], but: Proc) -> None:
    for proc in procs:
        if proc is not but:
            assert proc.popen.poll() is None, f"{proc.args} exited: {proc.stderr()}"


def kill(proc: Proc) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(10)


def kill_all(procs: list[Proc]) -> None:
    """The test is over: no graceful stop (a member's scale-in would wait for the dead)."""
    for proc in procs:
        kill(proc)


@pytest.mark.parametrize("victim", ["node", "member"])
def test_a_killed_process_ends_no_other(procs: list[Proc], secret_file: Path, victim: str) -> None:
    controller, _nodes = start_cluster(procs, secret_file, nodes=3)
    members = [Member(procs, controller, secret_file) for _ in range(2)]
    dead = procs[2] if victim == "node" else members[0].proc
    survivor = members[1]
    survivor.keeps_working()
    kill(dead)
    survivor.keeps_working()
    text = status(controller, secret_file)
    # lost until its silence reaches the failure timeout, then repaired out
    assert "LOST" in text or "declared dead" in text, text
    survivor.keeps_working()
    alive(procs, but=dead)
    kill_all(procs)


def test_a_killed_operator_client_ends_nothing(procs: list[Proc], secret_file: Path) -> None:
    controller, _nodes = start_cluster(procs, secret_file, nodes=2)
    member = Member(procs, controller, secret_file)
    # An authenticated operator connection, killed while it is connected.
    client = Proc(
        [
            "-c",
            "import sys, trio\n"
            "from store.cli.common import read_secret\n"
            "from store.shell.transport import connect_peer\n"
            "from store.wire.control import parse_address\n"
            "async def main():\n"
            "    host, port = parse_address(sys.argv[1])\n"
            "    secret = read_secret(sys.argv[2], 'client')\n"
            "    async with connect_peer(host, port, secret=secret, name='ctl-1') as peer:\n"
            "        print('connected', flush=True)\n"
            "        await trio.sleep_forever()\n"
            "trio.run(main)\n",
            controller,
            str(secret_file),
        ]
    )
    procs.append(client)
    assert client.first_line() == "connected"
    kill(client)
    status(controller, secret_file)
    member.keeps_working()
    alive(procs, but=client)
    kill_all(procs)


def test_members_keep_serving_when_the_controller_dies(
    procs: list[Proc], secret_file: Path
) -> None:
    controller, _nodes = start_cluster(procs, secret_file, nodes=2)
    member = Member(procs, controller, secret_file)
    member.keeps_working()
    kill(procs[0])
    member.keeps_working()
    alive(procs, but=procs[0])
    kill_all(procs)


def test_an_operation_on_a_dead_nodes_keys_fails_within_its_bound(
    procs: list[Proc], secret_file: Path
) -> None:
    """Creates of keys spread over the ring, after a node died: those whose key owner was
    that node fail with PeerUnavailable within the member's request timeout (2 s here);
    none hangs, and the others succeed.  The controller waits 60 s before it declares the
    node dead: with its default (2 s, the request timeout) the repair could come first,
    and every operation then succeed on the repaired ring."""
    controller, _nodes = start_cluster(procs, secret_file, 3, "--failure-timeout", "60")
    member = Member(procs, controller, secret_file, "--request-timeout", "2")
    member.keeps_working()
    kill(procs[1])
    outcome = member.ask("ops 16 16", timeout=120)
    assert outcome.get("hang", 0) == 0, outcome
    assert outcome.get("PeerUnavailable", 0) > 0, outcome
    assert outcome.get("ok", 0) > 0, outcome
    assert set(outcome) <= {"ok", "PeerUnavailable"}, outcome
    member.keeps_working()
    alive(procs, but=procs[1])
    kill_all(procs)


@pytest.mark.parametrize("delay", [0.05, 0.3, 1.0])
def test_a_node_killed_during_a_scale_out_ends_no_other(
    procs: list[Proc], secret_file: Path, delay: float
) -> None:
    """A node dies at some moment of a scale-out (a third node joining): the event may
    stay unfinished (its repair is not built yet), but no other process exits, the member
    keeps serving its own objects and the controller answers."""
    controller, _nodes = start_cluster(procs, secret_file, nodes=2)
    member = Member(procs, controller, secret_file, "--request-timeout", "2")
    member.keeps_working()
    joiner = Proc(
        ["-m", "store.node", "--controller", controller, "--secret-file", str(secret_file)]
    )
    procs.append(joiner)
    time.sleep(delay)  # the seeded moment of the fault, not a wait for an event
    kill(procs[1])
    member.keeps_working()
    status(controller, secret_file)
    alive(procs, but=procs[1])
    kill_all(procs)


@pytest.mark.parametrize("delay", [0.05, 0.5])
def test_a_node_killed_during_a_scale_in_ends_no_other(
    procs: list[Proc], secret_file: Path, delay: float
) -> None:
    """``ctl scale-in`` of one node, and another node dies meanwhile: the leaving node and
    the ctl may end (that is their job), every other process goes on serving."""
    controller, nodes = start_cluster(procs, secret_file, nodes=3)
    member = Member(procs, controller, secret_file, "--request-timeout", "2")
    member.keeps_working()
    ctl = Proc(
        [
            "-m",
            "store.ctl",
            "--controller",
            controller,
            "--secret-file",
            str(secret_file),
            "--timeout",
            "20",
            "scale-in",
            nodes[2],
        ]
    )
    procs.append(ctl)
    time.sleep(delay)  # the seeded moment of the fault, not a wait for an event
    kill(procs[1])
    member.keeps_working()
    status(controller, secret_file)
    for proc in (procs[0], procs[2], member.proc):
        assert proc.popen.poll() is None, f"{proc.args} exited: {proc.stderr()}"
    kill_all(procs)


def test_a_member_leaves_though_the_node_that_takes_its_objects_cannot_import_their_class(
    procs: list[Proc], secret_file: Path
) -> None:
    """The members' object class lives in their own ``__main__``, which a ``store.node``
    cannot import.  A member that leaves hands its objects over all the same: the node
    holds them as their state, the leave completes (the process ends by itself, status 0),
    and another member that has the class takes them back intact."""
    controller, _nodes = start_cluster(procs, secret_file, nodes=1)
    leaver, reader = (Member(procs, controller, secret_file) for _ in range(2))
    leaver.keeps_working()
    reader.keeps_working()
    popen = leaver.proc.popen
    assert popen.stdin is not None
    popen.stdin.close()  # its end: a graceful scale-in
    assert popen.wait(60) == 0, leaver.proc.stderr()
    values = reader.ask(f"read {leaver.name} 20", timeout=120)
    assert values, values
    bad = {k: v for k, v in values.items() if not (isinstance(v, int) and v >= 1)}
    assert not bad, bad
    kill_all(procs)
