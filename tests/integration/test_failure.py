"""Detection and repair, with real processes: a controller, three ``store.node``
processes and two members on loopback; one is killed with SIGKILL.

The controller declares it dead (2 s of silence by default) and repairs the ring without
it: ``ctl status`` names it, the epoch moves on, and afterwards creates of keys anywhere in
the ring succeed again (the records of the dead node's keys are rebuilt at their new
owners), the survivors' objects are all still there, a dead member's objects are reported
lost or absent (never a hang), and a new node can still join.  Every wait is for an
answer, under a deadline.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.integration.conftest import Proc
from tests.integration.test_cluster import start_cluster
from tests.integration.test_containment import Member, alive, kill, kill_all, status


def wait_for_status(controller: str, secret_file: Path, pattern: str, within: float = 30) -> str:
    deadline = time.monotonic() + within
    text = ""
    while time.monotonic() < deadline:
        text = status(controller, secret_file)
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"status never matched {pattern!r}:\n{text}")


def test_a_killed_node_is_repaired_out_and_the_cluster_serves_every_key(
    procs: list[Proc], secret_file: Path
) -> None:
    controller, nodes = start_cluster(procs, secret_file, nodes=3)
    member = Member(procs, controller, secret_file, "--request-timeout", "5")
    member.keeps_working()
    victim = procs[2]
    kill(victim)
    wait_for_status(controller, secret_file, rf"declared dead: {re.escape(nodes[1])}")
    member.keeps_working()
    outcome = member.ask("ops 32 32", timeout=120)
    assert outcome == {"ok": 32}, outcome  # every key has a live owner again
    alive(procs, but=victim)
    # The cluster can still grow: a new node joins by the usual admission.
    joiner = Proc(
        ["-m", "store.node", "--controller", controller, "--secret-file", str(secret_file)]
    )
    procs.append(joiner)
    line = joiner.first_line(60)
    assert re.match(r"node \S+ admitted epoch \d+", line), line
    member.keeps_working()
    kill_all(procs)


def test_a_killed_members_objects_are_lost_and_can_be_made_again(
    procs: list[Proc], secret_file: Path
) -> None:
    controller, _nodes = start_cluster(procs, secret_file, nodes=2)
    doomed = Member(procs, controller, secret_file, "--request-timeout", "5")
    other = Member(procs, controller, secret_file, "--request-timeout", "5")
    doomed.keeps_working()
    other.keeps_working()
    kill(doomed.proc)
    wait_for_status(controller, secret_file, rf"declared dead: {re.escape(doomed.name)}")
    values = other.ask(f"read {doomed.name} 20", timeout=120)
    assert set(values.values()) <= {"ObjectLost", "ObjectNotFound"}, values
    assert "ObjectLost" in values.values(), values  # records that survived say so
    other.keeps_working()
    alive(procs, but=doomed.proc)
    kill_all(procs)


def test_a_restarted_controller_learns_the_ring_back(procs: list[Proc], secret_file: Path) -> None:
    controller, nodes = start_cluster(procs, secret_file, nodes=2)
    member = Member(procs, controller, secret_file, "--request-timeout", "5")
    member.keeps_working()
    before = wait_for_status(controller, secret_file, r"epoch (\d+)")
    epoch = int(re.search(r"epoch (\d+)", before).group(1))  # type: ignore[union-attr]
    kill(procs[0])
    member.keeps_working()  # the members serve while the controller is away
    again = Proc(
        ["-m", "store.controller", "--listen", controller, "--secret-file", str(secret_file)]
    )
    procs.append(again)
    assert again.first_line().split()[-1] == controller
    text = wait_for_status(controller, secret_file, rf"epoch {epoch} .*3 members")
    for name in [*nodes, member.name]:
        assert name in text, text
    # The cluster goes on as before: a new node joins by a scale-out.
    joiner = Proc(
        ["-m", "store.node", "--controller", controller, "--secret-file", str(secret_file)]
    )
    procs.append(joiner)
    line = joiner.first_line(60)
    assert re.match(r"node \S+ admitted epoch \d+", line), line
    member.keeps_working()
    alive(procs, but=procs[0])
    kill_all(procs)
