"""The main job, ``python -m bench.nf_demo --quick``, end to end as ``make demo`` runs it:
real processes (controller, three PRADS instances, the sender), real traffic, a scale-out and
a scale-in during it.  Also: cut short by Ctrl-C, or by a child that dies, it leaves no
process behind and says why in one line.

Every wait is on the demo's exit or on one of its output lines, under a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: What the demo starts, as they appear in a child's command line.
CHILD_MODULES = ("store.controller", "bench.sender", "nf")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


def _demo(out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "bench.nf_demo", "--quick", "--out-dir", str(out_dir)]


def _strip_time(line: str) -> str:
    return line.rpartition(",")[0]


def _cmdline(pid: int) -> list[str] | None:
    """The command line of a live process, None when there is none (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0") if raw else None


def _ours(pid: int) -> bool:
    """Whether ``pid`` is (still) one of the processes the demo starts."""
    cmd = _cmdline(pid)
    return cmd is not None and "-m" in cmd and cmd[cmd.index("-m") + 1] in CHILD_MODULES


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return out


class Running:
    """The demo as a process whose stdout lines are read by a thread."""

    def __init__(self, out_dir: Path) -> None:
        self.popen = subprocess.Popen(
            _demo(out_dir),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                self.popen.kill()
                raise AssertionError(f"no {text!r} in {timeout} s: {self.seen}") from None
            if line is None:
                raise AssertionError(f"the demo ended before {text!r}: {self.seen}")
            self.seen.append(line)
            if text in line:
                return

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise
        assert self.popen.stderr is not None
        return status, self.popen.stderr.read()


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    started = time.monotonic()
    run = subprocess.run(
        _demo(tmp_path), cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=180
    )
    took = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "against python -m nf prads --pcap" in run.stdout and "equal" in run.stdout
    result: dict[str, Any] = json.loads((tmp_path / "nf_demo.json").read_text())

    # Every frame arrived, once, and in its flow's order: at each re-steer the sender held
    # the moved flows' frames until their old instance had processed the ones it got.
    assert result["sent"] == result["delivered"] > 10_000
    assert result["lost"] == 0 and result["duplicates"] == 0
    assert result["ok"] and result["problems"] == []
    assert result["reordered"] == 0

    # A scale-out to three and a scale-in to two, both while the traffic flowed.
    out, into = result["events"]
    assert (out["kind"], out["summary"]["members"]) == ("scale-out", 3)
    assert (into["kind"], into["summary"]["members"]) == ("scale-in", 2)
    assert out["flows_moved"] > 0 and into["flows_moved"] > 0
    for e in (out, into):  # each re-steer's pause, only for its moved flows, answered
        assert e["pause"]["mode"] == "moved-flows" and e["pause"]["timed_out"] == 0, e
        assert e["pause"]["flows_moved"] > 0, e
    assert result["events_inside_traffic"] is True
    assert result["started_t"] < out["requested_t"] < into["phase"][1] < result["sender"]["ended_t"]
    assert into["leaver"]["frames"] > 0 and into["leaver"]["parked"] == 0
    phases = [p["phase"] for p in result["phases"]]
    assert phases == [
        "before",
        "during scale-out",
        "between",
        "during scale-in",
        "after",
    ]
    assert all(p["delivered"] > 0 and p["latency_us"]["p99"] > 0 for p in result["phases"])
    # The leaver's objects went somewhere: counted by the members and by the controller.
    assert result["objects_migrated"] >= into["summary"]["objects_moved"] > 0

    # The assets answer (through the controller's relay) is the offline run's asset log.
    answer = json.loads((tmp_path / "nf_demo_assets.json").read_text())
    assert answer == result["assets_answer"] and len(answer) == result["assets"]["hosts"] > 100
    pcap = tmp_path / "nf_demo_work" / "traffic.pcap"
    offline = subprocess.run(
        [sys.executable, "-m", "nf", "prads", "--pcap", str(pcap)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert offline[0].startswith("asset,vlan,port")
    live = sorted(_strip_time(x) for a in answer for x in (*a["os"], *a["services"]))
    assert live == sorted(_strip_time(x) for x in offline[1:])
    assert result["assets_match_offline"] is True

    assert (tmp_path / "nf_demo.png").stat().st_size > 10_000
    # Nothing it started is left running.
    assert set(result["pids"]) == {"controller", "sender"} | {f"instance-{i}" for i in range(3)}
    assert not [pid for pid in result["pids"].values() if _ours(pid)]
    assert took < 60, f"the quick demo took {took:.1f} s"


def test_ctrl_c_stops_every_process_it_started(tmp_path: Path) -> None:
    demo = Running(tmp_path)
    demo.wait_for("the sender started", 60)
    children = [pid for pid in _children(demo.popen.pid) if _ours(pid)]
    assert len(children) == 5, [_cmdline(pid) for pid in children]  # controller, 3 NFs, sender
    demo.popen.send_signal(signal.SIGINT)
    status, stderr = demo.finish(30)
    assert status == 130, stderr
    assert stderr.strip().splitlines()[-1].endswith("every process it started is stopped")
    assert not [pid for pid in children if _ours(pid)]
    assert not (tmp_path / "nf_demo.json").exists()


def test_a_child_that_dies_ends_the_demo_with_one_line(tmp_path: Path) -> None:
    demo = Running(tmp_path)
    demo.wait_for("the sender started", 60)
    children = [pid for pid in _children(demo.popen.pid) if _ours(pid)]
    sender = next(pid for pid in children if "bench.sender" in (_cmdline(pid) or []))
    os.kill(sender, signal.SIGKILL)
    status, stderr = demo.finish(60)
    assert status == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("python -m bench.nf_demo: error: sender exited (status -9)"), stderr
    assert not [pid for pid in children if _ours(pid)]


def test_the_comparison_sets_times_aside_and_nothing_else() -> None:
    from bench.nf_demo import compare_assets

    header = "asset,vlan,port,proto,service,[service-info],distance,discovered"
    answer = [
        {
            "ip": "10.0.0.1",
            "os": ["10.0.0.1,0,5000,6,SYN,[S4:64:1:60:M*:.:Linux:2.6],0,1796417075"],
            "services": ["10.0.0.1,0,80,6,CLIENT,[http:curl/8.0],0,1796417076"],
        }
    ]
    offline = [
        header,
        "10.0.0.1,0,80,6,CLIENT,[http:curl/8.0],0,1700000001",
        "10.0.0.1,0,5000,6,SYN,[S4:64:1:60:M*:.:Linux:2.6],0,1700000000",
    ]
    assert compare_assets(answer, offline)["equal"] is True
    other = [*offline[:1], "10.0.0.1,0,80,6,CLIENT,[http:curl/8.1],0,1700000001", offline[2]]
    differs = compare_assets(answer, other)
    assert differs["equal"] is False
    assert (differs["only_live_count"], differs["only_offline_count"]) == (1, 1)
    # A line the cluster reports twice is a difference too (multisets, not sets).
    twice = [{**answer[0], "services": answer[0]["services"] * 2}]
    assert compare_assets(twice, offline)["only_live_count"] == 1
