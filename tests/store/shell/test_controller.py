"""The controller, the node-side membership and ``ctl``, over real loopback connections.

Members are :func:`join_cluster` clients whose handlers only record their callbacks in one
shared, ordered list (trio runs one task at a time, so the list order is the order things
happened).  The barrier is checked on that list: every ``on_pre_scaling`` has returned
before any ``on_scaling`` starts, and every drain was reported before any ``on_normal`` of
the event.  Every wait is on an event under a ``trio.fail_after`` deadline: no sleeps.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from rich.console import Console

from store.cli.ctl import render_status, request_status
from store.core.barrier import check_transitions
from store.shell.controller import Controller, open_controller
from store.shell.membership import Membership, join_cluster
from store.shell.transport import connect_peer
from store.wire.control import (
    ClusterStatus,
    ControllerRefused,
    ScalingAborted,
    parse_address,
)
from store.wire.errors import PeerUnavailable

SECRET = b"controller tests secret"
DEADLINE = 10.0
ROOT = Path(__file__).resolve().parents[3]

Entry = tuple[str, str, str, int]  # (member, what, callback, epoch)


class Recorder:
    """The shared, ordered record of every member's callbacks."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._changed = trio.Event()

    def add(self, member: str, what: str, callback: str = "", epoch: int = 0) -> None:
        self.entries.append((member, what, callback, epoch))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[list[Entry]], bool]) -> None:
        while not predicate(self.entries):
            await self._changed.wait()

    def index(self, what: str, callback: str, epoch: int) -> list[int]:
        return [
            i for i, (_, w, c, e) in enumerate(self.entries) if (w, c, e) == (what, callback, epoch)
        ]

    def members_with(self, what: str, callback: str, epoch: int) -> set[str]:
        return {m for m, w, c, e in self.entries if (w, c, e) == (what, callback, epoch)}


class RecordingHandler:
    """Records each callback's start and end; ``gate`` holds ``on_pre_scaling`` of
    ``gate_epoch`` until it is set (a member that does not acknowledge in time)."""

    def __init__(self, name: str, recorder: Recorder) -> None:
        self.name = name
        self.recorder = recorder
        self.gate: trio.Event | None = None
        self.gate_epoch = 0

    def _add(self, what: str, callback: str, m: Membership) -> None:
        self.recorder.add(self.name, what, callback, m.epoch)

    async def on_pre_scaling(self, m: Membership) -> None:
        self._add("start", "pre", m)
        assert m.next_ring is not None and m.view.next_ring is m.next_ring
        if self.gate is not None and m.next_ring.epoch == self.gate_epoch:
            await self.gate.wait()
        self._add("end", "pre", m)

    async def on_scaling(self, m: Membership) -> None:
        self._add("start", "scaling", m)
        await m.report_drained(records_moved=2, objects_moved=1)  # sent after the ack
        self._add("drained", "scaling", m)

    async def on_normal(self, m: Membership) -> None:
        assert m.next_ring is None
        self._add("start", "normal", m)

    async def on_abort(self, m: Membership) -> None:
        self._add("start", "abort", m)

    async def on_leave(self, m: Membership) -> None:
        self._add("start", "leave", m)


class Cluster:
    """Members joined to one controller, each in its own task of ``nursery``.

    Members leave their ``join_cluster`` block normally (on :meth:`stop`, or once a scale-in
    removed them) rather than by cancellation: a transport peer closed by cancellation
    waits out its close timeout, because trio-websocket's reader is cancelled with it.
    """

    def __init__(self, nursery: trio.Nursery, address: str) -> None:
        self.nursery = nursery
        self.address = address
        self.recorder = Recorder()
        self.handlers: dict[str, RecordingHandler] = {}
        self.memberships: dict[str, Membership] = {}
        self.stopping = trio.Event()
        #: Set by default; a test that calls ``leave()`` itself holds the member's exit.
        self.exits: dict[str, trio.Event] = {}

    def stop(self) -> None:
        self.stopping.set()

    def join(self, name: str) -> RecordingHandler:
        handler = RecordingHandler(name, self.recorder)
        self.handlers[name] = handler
        self.exits[name] = trio.Event()
        self.exits[name].set()
        self.nursery.start_soon(self._member, name, handler)
        return handler

    async def _member(self, name: str, handler: RecordingHandler) -> None:
        port = 9000 + int(name[1:])
        async with join_cluster(
            self.address,
            name=name,
            address=f"127.0.0.1:{port}",
            secret=SECRET,
            handler=handler,
            status_provider=lambda: {"keys": port, "parked": 0, "ok": True},
        ) as membership:
            self.memberships[name] = membership
            self.recorder.add(name, "admitted", "", membership.epoch)
            async with trio.open_nursery() as waits:

                async def stopped() -> None:
                    await self.stopping.wait()
                    waits.cancel_scope.cancel()

                async def removed() -> None:
                    await membership.wait_left()
                    await self.exits[name].wait()
                    waits.cancel_scope.cancel()

                waits.start_soon(stopped)
                waits.start_soon(removed)

    async def admitted(self, *names: str) -> None:
        await self.recorder.wait_for(
            lambda entries: set(names) <= {m for m, w, _, _ in entries if w == "admitted"}
        )


async def waiting(ctl: Controller, *names: str) -> None:
    await ctl.wait_until(lambda b: set(names) <= set(b.waiting()))


def assert_barrier_order(recorder: Recorder, epoch: int, participants: set[str]) -> None:
    """The order of ``ring/ownership.py``, as the members lived it."""
    pre_start = recorder.index("start", "pre", epoch)
    pre_end = recorder.index("end", "pre", epoch)
    scaling = recorder.index("start", "scaling", epoch)
    drained = recorder.index("drained", "scaling", epoch)
    normal = recorder.index("start", "normal", epoch)
    assert recorder.members_with("end", "pre", epoch) == participants
    assert recorder.members_with("start", "scaling", epoch) == participants
    assert recorder.members_with("start", "normal", epoch) == participants
    assert max(pre_start) < min(scaling), "a member scaled before all were pre-scaling"
    assert max(pre_end) < min(scaling), "a member scaled before all acknowledged pre-scaling"
    assert max(drained) < min(normal), "a member went normal before all had drained"


# --- in-process controller ----------------------------------------------------------------


async def test_admission_forms_one_ring_that_every_member_agrees_on() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_controller(secret=SECRET, admission_window=0.2, vnodes=16) as ctl,
            trio.open_nursery() as nursery,
        ):
            cluster = Cluster(nursery, ctl.address)
            for name in ("n1", "n2", "n3"):
                cluster.join(name)
            await cluster.admitted("n1", "n2", "n3")
            # Members are in once they run on_normal; the event ends on their acks.
            await ctl.wait_until(lambda b: b.event is None and len(b.ring) == 3)
            ring = ctl.barrier.ring
            assert set(ring.nodes) == {"n1", "n2", "n3"} and ring.vnodes == 16
            for m in cluster.memberships.values():
                assert m.epoch == ring.epoch and m.ring.nodes == ring.nodes
                assert m.ring.vnodes == 16 and m.view.stage.value == "normal"
                assert m.addresses == {f"n{i}": f"127.0.0.1:{9000 + i}" for i in (1, 2, 3)}
            status = await ctl.collect_status()
            assert status.figures["n2"]["keys"] == 9002 and status.figures["n2"]["ok"] == "True"
            assert status.figures["n1"]["stage"] == "normal"
            assert [row[2] for row in status.members] == ["member"] * 3
            # A brief status (what a polling load balancer asks): no member's figures.
            host, port = parse_address(ctl.address)
            async with connect_peer(host, port, secret=SECRET, name="test-lb") as peer:
                brief = await request_status(peer, brief=True)
            assert brief.figures["n2"] == {"stage": "normal", "epoch": ring.epoch}
            assert [row[0] for row in brief.members] == [row[0] for row in status.members]
            # A second node with a taken name is refused, with the reason.
            with pytest.raises(ControllerRefused, match="already used by a connected node"):
                async with join_cluster(
                    ctl.address,
                    name="n1",
                    address="127.0.0.1:1",
                    secret=SECRET,
                    handler=RecordingHandler("n1", Recorder()),
                ):
                    pass  # pragma: no cover
            assert check_transitions(ctl.log) == []
            cluster.stop()


async def test_scale_out_and_in_follow_the_barrier_on_every_member() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_controller(secret=SECRET, manual_admission=True, vnodes=16) as ctl,
            trio.open_nursery() as nursery,
        ):
            cluster = Cluster(nursery, ctl.address)
            for name in ("n1", "n2", "n3"):
                cluster.join(name)
            await waiting(ctl, "n1", "n2", "n3")
            assert not cluster.memberships  # manual admission: nobody is in yet
            first = await ctl.scale_out()
            assert first.summary["epoch"] == 1 and first.summary["kind"] == "form"
            await cluster.admitted("n1", "n2", "n3")
            # The first ring has no barrier: on_normal only.
            assert recorder_callbacks(cluster.recorder, 1) == {"normal"}

            cluster.join("n4")
            await waiting(ctl, "n4")
            result = await ctl.scale_out(["n4"])
            await cluster.admitted("n4")
            everyone = {"n1", "n2", "n3", "n4"}
            assert_barrier_order(cluster.recorder, 2, everyone)
            assert result.summary["epoch"] == 2 and result.summary["added"] == "n4"
            assert result.summary["records_moved"] == 8 and result.summary["objects_moved"] == 4
            assert any("acknowledged pre-scaling" in line for line in result.progress)
            for m in cluster.memberships.values():
                assert m.epoch == 2 and set(m.ring.nodes) == everyone

            result = await ctl.scale_in(["n2"])
            assert result.summary["removed"] == "n2" and result.summary["epoch"] == 3
            assert_barrier_order(cluster.recorder, 3, everyone)
            assert cluster.memberships["n2"].left
            assert ("n2", "start", "leave", 3) in cluster.recorder.entries
            assert ctl.barrier.role_of("n2") is None

            # A member can leave by itself (graceful scale-in of an embedded space).
            cluster.exits["n3"] = trio.Event()  # n3 exits after leave() returns
            summary = await cluster.memberships["n3"].leave()
            cluster.exits["n3"].set()
            assert summary["removed"] == "n3" and summary["epoch"] == 4
            assert set(ctl.barrier.ring.nodes) == {"n1", "n4"}
            assert cluster.memberships["n1"].ring.nodes == {"n1", "n4"}
            assert check_transitions(ctl.log) == []
            ctl.barrier.validate()
            cluster.stop()


def recorder_callbacks(recorder: Recorder, epoch: int) -> set[str]:
    return {c for _, w, c, e in recorder.entries if e == epoch and w == "start"}


async def test_a_member_stuck_in_pre_scaling_aborts_the_event_and_a_retry_succeeds() -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_controller(
                secret=SECRET, manual_admission=True, pre_scaling_timeout=1.0, vnodes=16
            ) as ctl,
            trio.open_nursery() as nursery,
        ):
            cluster = Cluster(nursery, ctl.address)
            for name in ("n1", "n2", "n3"):
                cluster.join(name)
            await waiting(ctl, "n1", "n2", "n3")
            await ctl.scale_out()
            await cluster.admitted("n1", "n2", "n3")
            stuck = cluster.handlers["n1"]
            stuck.gate, stuck.gate_epoch = trio.Event(), 2
            cluster.join("n4")
            await waiting(ctl, "n4")

            outcome: list[BaseException] = []

            async def first_attempt() -> None:
                try:
                    await ctl.scale_out(["n4"])
                except ScalingAborted as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as attempt:
                attempt.start_soon(first_attempt)
                await ctl.wait_until(lambda b: b.event is not None)
                # A second request while one runs is refused, naming the running event.
                with pytest.raises(ControllerRefused, match="already running: scale-out"):
                    await ctl.scale_in(["n2"])
                # n1 is stuck in its callback, yet still answers status requests.
                status = await ctl.collect_status()
                assert status.stage == "pre-scaling" and "n1" in status.event["waiting_for"]
                assert status.figures["n1"]["stage"] == "pre-scaling"
            [aborted] = outcome
            assert "n1 did not acknowledge pre-scaling within 1 s" in str(aborted)
            assert "epoch 2 is burnt" in str(aborted)
            assert ctl.status().last_abort == str(aborted)
            assert ctl.barrier.epoch == 1 and "n4" not in cluster.memberships

            stuck.gate.set()  # n1 finally returns; its late ack is ignored, then it aborts
            await cluster.recorder.wait_for(
                lambda _: (
                    cluster.recorder.members_with("start", "abort", 1) == {"n1", "n2", "n3", "n4"}
                )
            )
            result = await ctl.scale_out(["n4"])
            assert result.summary["epoch"] == 3  # a fresh epoch: 2 stays burnt
            await cluster.admitted("n4")
            assert_barrier_order(cluster.recorder, 3, {"n1", "n2", "n3", "n4"})
            assert all(m.epoch == 3 for m in cluster.memberships.values())
            assert any(t.what == "stale" and t.member == "n1" for t in ctl.log)
            assert check_transitions(ctl.log) == []
            cluster.stop()


async def test_an_unreachable_controller_raises_peer_unavailable_in_time() -> None:
    port = free_port()
    with trio.fail_after(DEADLINE):
        with pytest.raises(
            PeerUnavailable, match=f"cannot reach the controller at 127.0.0.1:{port}"
        ):
            async with join_cluster(
                f"127.0.0.1:{port}",
                name="n1",
                address="127.0.0.1:9001",
                secret=SECRET,
                handler=RecordingHandler("n1", Recorder()),
                connect_timeout=2.0,
            ):
                pass  # pragma: no cover


async def test_a_controller_that_never_answers_times_out_too() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with trio.fail_after(DEADLINE):
            with pytest.raises(PeerUnavailable, match=r"within 0.5 s: .* never answered"):
                async with join_cluster(
                    f"127.0.0.1:{port}",
                    name="n1",
                    address="127.0.0.1:9001",
                    secret=SECRET,
                    handler=RecordingHandler("n1", Recorder()),
                    connect_timeout=0.5,
                ):
                    pass  # pragma: no cover


# --- real processes -----------------------------------------------------------------------


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def remote_status(address: str) -> list[tuple[str, str, str, str, int, bool]]:
    """The member rows of a controller's status, asked over a real connection."""
    host, port = parse_address(address)
    async with connect_peer(host, port, secret=SECRET, name="test-ctl") as peer:
        return (await request_status(peer)).members


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, *args], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
    )


async def test_controller_and_ctl_as_real_processes(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")  # a trailing newline is not part of the secret
    log = (tmp_path / "controller.log").open("wb")
    with trio.fail_after(3 * DEADLINE):
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "store.controller",
                "--listen",
                "127.0.0.1:0",
                "--manual-admission",
                "--secret-file",
                str(secret_file),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            assert process.stdout is not None
            first = b""
            while not first.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the controller exited before printing its address"
                first += chunk
            assert first.startswith(b"listening on 127.0.0.1:")
            address = first.decode().split()[-1]
            ctl = ("-m", "store.ctl", "--controller", address, "--secret-file", str(secret_file))

            async with trio.open_nursery() as nursery:
                cluster = Cluster(nursery, address)
                for name in ("n1", "n2", "n3"):
                    cluster.join(name)
                # Wait until all three have registered, asking as ctl does (in-process).
                while len(await remote_status(address)) < 3:
                    await trio.sleep(0.02)  # a retry interval, not a guess at timing

                status = await run(*ctl, "status")
                assert status.returncode == 0, status.stderr
                assert b"epoch 0" in status.stdout and status.stdout.count(b"waiting") == 3, (
                    status.stdout.decode()
                )

                out = await run(*ctl, "scale-out")
                assert out.returncode == 0, out.stderr
                assert b"forming the first ring at epoch 1" in out.stdout
                assert b"done: epoch 1, 3 members" in out.stdout
                await cluster.admitted("n1", "n2", "n3")

                status = await run(*ctl, "status")
                text = status.stdout.decode()
                assert status.returncode == 0, status.stderr
                assert "epoch 1 (highest used 1), stage normal, 3 members" in text
                # One column per node, one row per figure.
                lines = text.splitlines()
                header = next(line for line in lines if " n1 " in line)
                assert " n2 " in header and " n3 " in header
                row = {
                    label: next(
                        line
                        for line in lines
                        if line.split("│")[1:2] and line.split("│")[1].strip() == label
                    )
                    for label in ("role", "stage", "address")
                }
                assert row["role"].count("member") == 3
                assert row["stage"].count("normal") == 3
                assert all(str(9000 + i) in row["address"] for i in (1, 2, 3))
                assert "keys" in text and "parked" in text

                out = await run(*ctl, "scale-in", "n3")
                assert out.returncode == 0, out.stderr
                assert b"n3 drained: 2 records, 1 objects moved" in out.stdout
                assert b"done: epoch 2, 2 members, 6 records and 3 objects moved" in out.stdout
                assert cluster.memberships["n3"].left

                refused = await run(*ctl, "scale-in", "zz")
                assert refused.returncode == 1
                assert refused.stderr.decode().splitlines() == [
                    "python -m store.ctl: error: scale-in refused: unknown node 'zz' "
                    "(members: n1, n2)"
                ]
                wrong = tmp_path / "wrong"
                wrong.write_bytes(b"not the secret")
                denied = await run(
                    "-m",
                    "store.ctl",
                    "--controller",
                    address,
                    "--secret-file",
                    str(wrong),
                    "status",
                )
                assert denied.returncode == 1 and len(denied.stderr.splitlines()) == 1
                assert b"does not share our cluster secret" in denied.stderr
                cluster.stop()
        finally:
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            log.close()


async def test_bad_command_lines_exit_non_zero_with_one_line() -> None:
    nowhere = free_port()
    silent = socket.socket()  # accepts connections (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    quiet = f"127.0.0.1:{silent.getsockname()[1]}"
    cases: list[tuple[tuple[str, ...], str]] = [
        (("-m", "store.controller"), "--listen"),
        (("-m", "store.controller", "--listen", "nonsense"), "is not HOST:PORT"),
        (("-m", "store.controller", "--listen", "127.0.0.1:99999"), "outside 0-65535"),
        (
            ("-m", "store.controller", "--listen", "127.0.0.1:0", "--pre-scaling-timeout", "-1"),
            "positive number",
        ),
        (
            ("-m", "store.controller", "--listen", "127.0.0.1:0", "--secret-file", "/nonexistent"),
            "cannot read the secret file",
        ),
        (("-m", "store.ctl", "--controller", f"127.0.0.1:{nowhere}", "status"), "cannot reach"),
        (("-m", "store.ctl", "--controller", quiet, "--timeout", "0.5", "status"), "no answer"),
        (("-m", "store.ctl", "--controller", "localhost", "status"), "is not HOST:PORT"),
        (("-m", "store.ctl", "--controller", "127.0.0.1:1", "dance"), "invalid choice"),
        (("-m", "store.ctl", "--controller", "127.0.0.1:1", "scale-in"), "NODE"),
    ]
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    async def one(i: int, args: tuple[str, ...]) -> None:
        results[i] = await run(*args)

    try:
        with trio.fail_after(3 * DEADLINE):
            async with trio.open_nursery() as nursery:
                for i, (args, _) in enumerate(cases):
                    nursery.start_soon(one, i, args)
    finally:
        silent.close()
    for i, (args, expected) in enumerate(cases):
        result = results[i]
        lines = result.stderr.decode().splitlines()
        assert result.returncode != 0, args
        assert len(lines) == 1, (args, lines)
        assert "Traceback" not in lines[0] and expected in lines[0], (args, lines)


async def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with trio.fail_after(DEADLINE):
            result = await run(
                "-m",
                "store.controller",
                "--listen",
                f"127.0.0.1:{port}",
                "--secret-file",
                str(secret_file),
            )
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    assert lines == [
        f"python -m store.controller: error: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ], lines


def test_ctl_renders_an_empty_cluster() -> None:
    console = Console(record=True, width=120)
    render_status(ClusterStatus(1, 0, 0, "normal", [], {}, "", {}, {}), console)
    assert "no nodes registered" in console.export_text()
