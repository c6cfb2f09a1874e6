"""A controller, three nodes and three embedded instances, each a real process on loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio

from store.shell.transport import connect_peer
from tests.integration.conftest import Proc
from tests.linearizability import NOT_FOUND, HistoryRecorder, assert_linearizable

WORKERS = 3


def start_cluster(
    procs: list[Proc], secret_file: Path, nodes: int = 3, *controller_args: str
) -> tuple[str, list[str]]:
    controller = Proc(
        [
            "-m",
            "store.controller",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            str(secret_file),
            *controller_args,
        ]
    )
    procs.append(controller)
    address = controller.first_line().split()[-1]
    names = []
    for _ in range(nodes):
        node = Proc(
            ["-m", "store.node", "--controller", address, "--secret-file", str(secret_file)]
        )
        procs.append(node)
        line = node.first_line()
        assert re.match(r"node \S+ admitted epoch \d+", line), line
        names.append(line.split()[1])
    return address, names


def test_instances_share_objects_linearizably(procs: list[Proc], secret_file: Path) -> None:
    controller, _nodes = start_cluster(procs, secret_file)
    workers = [
        Proc(
            [
                "-m",
                "tests.integration.worker",
                "--controller",
                controller,
                "--secret-file",
                str(secret_file),
                "--seed",
                str(seed),
                "--ops",
                "250",
                "--keys",
                "4",
                "--instances",
                str(3 + WORKERS),
                "--workers",
                str(WORKERS),
            ]
        )
        for seed in range(WORKERS)
    ]
    procs.extend(workers)
    results = []
    for worker in workers:
        code, out, err = worker.finish(timeout=120)
        assert code == 0, err
        results.append(json.loads(out))
    recorder = HistoryRecorder()
    for result in results:
        for op in result["history"]:
            handle = recorder.invoke(
                op["process"], op["name"], op["arg"], key=op["key"], at=op["invoke"]
            )
            value = NOT_FOUND if op["result"] == "NOT_FOUND" else op["result"]
            recorder.respond(handle, value, at=op["response"])
    verdicts = assert_linearizable(recorder.ops)
    assert len(verdicts) == 4
    total_adds = sum(r["adds"] for r in results)
    assert all(r["tally_total"] == total_adds for r in results), "untethered updates lost"
    assert all(r["local_messages"] == 0 for r in results), "local access sent messages"
    migrations = sum(r["statistics"]["migrations_in"] for r in results)
    assert migrations > 10, "the workload should move objects between instances"


def test_wrong_secret_and_garbage_frames_do_not_disturb_the_node(
    procs: list[Proc], secret_file: Path, tmp_path: Path
) -> None:
    controller, nodes = start_cluster(procs, secret_file, nodes=1)
    host, port = nodes[0].rsplit(":", 1)
    secret = secret_file.read_bytes()

    async def poke() -> None:
        with trio.fail_after(10):
            try:
                async with connect_peer(host, int(port), secret=b"wrong", name="intruder"):
                    raise AssertionError("a wrong secret was accepted")
            except Exception as exc:
                assert "auth" in str(exc).lower() or "refused" in str(exc).lower(), exc
            async with connect_peer(host, int(port), secret=secret, name="tester:1") as peer:
                await peer._link.send_frame(b"\xff\x00 not cbor")
                await peer._link.send_frame(b"\x81\x82\x19\x27\x0f\x00")  # unknown type 9999

    trio.run(poke)
    worker = Proc(
        [
            "-m",
            "tests.integration.worker",
            "--controller",
            controller,
            "--secret-file",
            str(secret_file),
            "--ops",
            "50",
            "--instances",
            "2",
            "--workers",
            "1",
        ]
    )
    procs.append(worker)
    code, out, err = worker.finish(timeout=60)
    assert code == 0, err
    status = Proc(
        [
            "-m",
            "store.ctl",
            "--controller",
            controller,
            "--secret-file",
            str(secret_file),
            "status",
        ],
        env={"COLUMNS": "1000"},
    )
    code, out, err = status.finish(timeout=30)
    assert code == 0, err
    assert nodes[0] in out
    node = procs[1]
    node.kill()
    log = node.stderr()
    assert "wrong cluster secret" in log, "the refused peer was not logged"
    assert "bad frame" in log, "the garbage frame was not logged"
