"""``python -m nf``: listing, help, the offline runner's output and its refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from bench.traffic import make, tcp_frame
from nf import registry
from nf.__main__ import main
from nf.capture import CaptureError, read_capture, write_pcap
from nf.nat import NAT
from nf.packet import SYN, ip_int

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, packets: list[tuple[float, bytes]]) -> Path:
    with path.open("wb") as f:
        write_pcap(f, packets)
    return path


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("cap") / "t.pcap", make(40, seed=3))


def test_registry_finds_ours_and_names_the_known_ones() -> None:
    assert {"nat", "synthetic"} <= set(registry.available())
    assert registry.load("nat") is NAT
    with pytest.raises(registry.UnknownNF, match=r"no NF named 'nope' \(installed: .*nat"):
        registry.load("nope")


def test_list_and_help_as_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nf", "list"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert any(line.startswith("nat ") for line in out.splitlines())


def test_help_documents_the_nf_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["nat", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--pcap", "--instances", "--config", "--out", "--scale-at", "--inside"):
        assert option in text


def test_unknown_nf_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope", "--pcap", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nat" in err


def test_runs_and_prints_the_table_and_a_summary(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "out.pcap"
    code = main(["nat", "--pcap", str(capture), "--inside", "10.0.0.0/16", "--out", str(out_file)])
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines and all(line.startswith(("tcp ", "udp ")) for line in lines)
    summary = captured.err.strip()
    assert summary.count("\n") == 0 and "packets/s" in summary and "translations" in summary
    before = read_capture(capture)
    after = read_capture(out_file)
    assert len(after) == len(before)  # nothing dropped here, in input order
    assert [ts for ts, _ in after] == pytest.approx([ts for ts, _ in before], abs=1e-6)
    inside = ip_int("10.0.0.0")
    for (_, a), (_, b) in zip(before, after, strict=True):
        src = int.from_bytes(a[26:30], "big")
        if src >> 16 == inside >> 16:  # outbound: source rewritten
            assert b[26:30] == bytes([203, 0, 113, 1])
        else:  # a reply seen inside: presented to the translation and back, unchanged
            assert a == b


def test_config_file_and_its_errors(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[nat]\npublic = ["198.18.0.1"]\ninside = ["10.0.0.0/16"]\n')
    assert main(["nat", "--pcap", str(capture), "--config", str(good)]) == 0
    assert "198.18.0.1" in capsys.readouterr().out
    cases = {
        "bad.toml": ("[nat\npublic=", "not valid TOML"),
        "unknown.toml": ("[nat]\nspeed = 3\n", "unknown NAT option"),
        "badip.toml": ('[nat]\npublic = ["1.2.3"]\n', "public"),
        "badports.toml": ('[nat]\nports = "0-10"\n', "ports"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert main(["nat", "--pcap", str(capture), "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    assert main(["nat", "--pcap", str(capture), "--config", str(tmp_path / "none.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_bad_captures_are_refused_in_one_line(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = capture.read_bytes()
    files = {
        "missing": (tmp_path / "missing.pcap", "no such file"),
        "text": (tmp_path / "text.pcap", "not a pcap or pcapng file"),
        "empty": (tmp_path / "empty.pcap", "not a pcap or pcapng file"),
        "cut": (tmp_path / "cut.pcap", "truncated"),
        "cut-header": (tmp_path / "cuthdr.pcap", "truncated pcap file header"),
        "linktype": (tmp_path / "wifi.pcap", "link type 105"),
    }
    files["text"][0].write_text("hello, not a capture\n")
    files["empty"][0].write_bytes(b"")
    files["cut"][0].write_bytes(data[:-7])
    files["cut-header"][0].write_bytes(data[:10])
    files["linktype"][0].write_bytes(data[:20] + (105).to_bytes(4, "little") + data[24:])
    for path, message in files.values():
        assert main(["nat", "--pcap", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    assert main(["nat", "--pcap", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err


def test_pcapng_is_read(tmp_path: Path) -> None:
    path = tmp_path / "t.pcapng"
    frames = [(1.5 + i, tcp_frame(1, 2, 1000 + i, 80, SYN)) for i in range(3)]
    with path.open("wb") as f:
        writer = dpkt.pcapng.Writer(f)
        for ts, frame in frames:
            writer.writepkt(frame, ts=ts)
    got = read_capture(path)
    assert [frame for _, frame in got] == [frame for _, frame in frames]
    assert [ts for ts, _ in got] == pytest.approx([ts for ts, _ in frames])
    broken = tmp_path / "broken.pcapng"
    broken.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CaptureError, match="pcapng"):
        read_capture(broken)


def test_bad_numbers_on_the_command_line(capture: Path) -> None:
    for argv in (["--instances", "0"], ["--scale-at", "1.5"], ["--window", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(["nat", "--pcap", str(capture), *argv])
        assert exit_.value.code == 2


async def test_plain_dicts_give_the_same_output_as_the_store() -> None:
    """bench.nf compares the same NF on dicts and on the store: it must do the same work."""
    import re

    from nf.runner import run_capture
    from nf.synthetic import Synthetic

    packets = make(60, seed=9)
    for nf_cls, config in ((NAT, {"inside": ["10.0.0.0/16"]}), (Synthetic, {})):
        store_run = await run_capture(nf_cls, dict(config), packets)
        dict_run = await run_capture(nf_cls, dict(config), packets, dicts=True)
        assert store_run.verdicts == dict_run.verdicts
        assert store_run.counts == dict_run.counts
        unported = [re.sub(r":\d+ remote", ": remote", line) for line in store_run.lines]
        assert unported == [re.sub(r":\d+ remote", ": remote", line) for line in dict_run.lines]
        assert store_run.lines


async def test_an_nf_that_raises_is_counted_and_its_packet_forwarded() -> None:
    from typing import Any, ClassVar

    from nf.base import NF, Verdict
    from nf.packet import Packet
    from nf.runner import run_capture

    class Faulty(NF):
        name: ClassVar[str] = "faulty"
        output_query: ClassVar[str] = "lines"

        async def process(self, packet: Packet) -> Verdict:
            if packet.sport % 2:
                raise ValueError("odd port")
            return Verdict.DROP

        async def query(self, name: str, **args: Any) -> Any:
            return ["ok"]

    packets = [(float(i), tcp_frame(1, 2, 1000 + i, 80, SYN)) for i in range(10)]
    result = await run_capture(Faulty, {}, packets, keep_frames=True)
    assert result.counts == {"nf-error-ValueError": 5}
    assert result.verdicts == [Verdict.DROP, Verdict.FORWARD] * 5
    assert [ts for ts, _ in result.forwarded] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert result.lines == ["ok"] and result.order == list(range(10))


def test_pcap_in_either_byte_order_and_in_nanoseconds(tmp_path: Path) -> None:
    import struct

    frame = tcp_frame(1, 2, 3, 4, SYN)
    for order, magic, frac, expected in (
        (">", 0xA1B2C3D4, 250_000, 7.25),
        ("<", 0xA1B23C4D, 500_000_000, 7.5),
        (">", 0xA1B23C4D, 1, 7.000000001),
    ):
        path = tmp_path / f"{order}{magic:x}.pcap"
        header = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
        record = struct.pack(order + "IIII", 7, frac, len(frame), len(frame))
        path.write_bytes(header + record + frame)
        [(ts, got)] = read_capture(path)
        assert got == frame and ts == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("backend", ["remote-only", "redis"])
def test_an_unreachable_store_is_one_line(
    capture: Path, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The baselines' store given with ``--store`` and not listening: one line naming it,
    exit status 1, no traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    argv = ["nat", "--pcap", str(capture), "--backend", backend, "--store", closed]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot connect" in err and closed in err, err


async def test_closing_an_in_process_cluster_does_not_wait_out_the_close_handshake() -> None:
    """All members of an in-process cluster are cancelled at once, so none answers another's
    websocket close: a cancelled connection waits for that answer only briefly, and the
    offline runner on several instances ends when its work does, not 5 s later."""
    import trio

    from nf.runner import open_cluster
    from store.shell.transport import CLOSE_TIMEOUT

    async with open_cluster(NAT, {}, 2) as cluster:
        assert len(cluster.spaces) == 2
        start = trio.current_time()
    assert trio.current_time() - start < CLOSE_TIMEOUT - 1


def test_bad_options_are_one_line_without_the_usage(
    capture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, words in [
        (["nat", "--pcap", str(capture), "--scale-at", "2"], "--scale-at"),
        (["nat", "--pcap", str(capture), "--instances", "0"], "--instances"),
        (["nat"], "--pcap"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err and "usage" not in err, err
