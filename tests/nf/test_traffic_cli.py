"""The traffic tools' command lines (``bench.traffic``, ``bench.sender``, ``bench.sink``,
``bench.live``, ``bench.chaos``): bad input gets one clear line and exit status 2 before
any process or socket is started, never a traceback; and a capture with frames bigger than
a datagram is sent whole."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import dpkt
import pytest

from bench import backends, chaos, live, nf_demo, sender, sink, traffic
from bench.traffic import tcp_frame
from nf.datachannel import MAX_FRAME, Kind, Packer, Reassembler, decode, frame_fits

CLIENT, SERVER = 0x0A000001, 0xC6336401


def one_line_error(
    capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], object], argv: list[str]
) -> str:
    """Run ``main(argv)``; it must exit (or return) 2 with exactly one line on stderr
    (warnings aside). That line."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "warning" not in line]
    assert status == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "small.pcap"
    traffic.main(["make", "--flows", "5", "--out", str(path)])
    return path


def test_traffic_refuses_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = str(tmp_path / "x.pcap")
    for argv, words in [
        (["make", "--flows", "0", "--out", out], "--flows"),
        (["make", "--flows", "3", "--out", out, "--inside", "nowhere"], "--inside"),
        (["make", "--flows", "3", "--out", out, "--udp-share", "2"], "--udp-share"),
        (["make", "--flows", "3", "--out", out, "--servers", "0"], "--servers"),
        (["make", "--flows", "3", "--out", str(tmp_path / "no" / "such" / "x.pcap")], "--out"),
    ]:
        assert words in one_line_error(capsys, traffic.main, argv)
    assert not (tmp_path / "x.pcap").exists()


def test_the_sender_refuses_bad_arguments_and_captures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, capture: Path
) -> None:
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"this is no capture")
    base = ["--controller", "127.0.0.1:9", "--sink", "127.0.0.1:9"]
    pcap = ["--pcap", str(capture)]
    cases = [
        (["--controller", "nowhere", "--sink", "127.0.0.1:9", *pcap], "HOST:PORT"),
        (["--controller", "127.0.0.1:9", "--sink", "127.0.0.1:70000", *pcap], "port"),
        ([*base, "--pcap", str(tmp_path / "missing.pcap")], "no such file"),
        ([*base, "--pcap", str(garbage)], "not a pcap"),
        ([*base, "--pcap", str(capture), "--flows", "0"], "--flows"),
        ([*base, "--pcap", str(capture), "--duration", "-1"], "--duration"),
        ([*base, "--pcap", str(capture), "--max-datagram", "10"], "--max-datagram"),
        ([*base, "--pcap", str(capture), "--nf", "nosuch"], "nosuch"),
    ]  # fmt: skip
    for argv, words in cases:
        assert words in one_line_error(capsys, sender.main, argv)


def test_the_sink_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert "HOST:PORT" in one_line_error(capsys, sink.main, ["--listen", "nowhere"])
    assert "--interval" in one_line_error(capsys, sink.main, ["--interval", "0"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        assert "cannot listen" in one_line_error(capsys, sink.main, ["--listen", taken])


def test_live_chaos_and_the_demo_refuse_bad_arguments_before_starting_anything(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv, words in [
        (["--nf", "nosuch"], "nosuch"),
        (["--instances", "0"], "--instances"),
        (["--rate", "0"], "--rate"),
        (["--backend", "nosuch"], "--backend"),
        (["--pcap", str(tmp_path / "missing.pcap")], "no such file"),
    ]:
        assert words in one_line_error(capsys, live.main, argv)
    for argv, words in [(["--nf", "nosuch"], "nosuch"), (["--rate", "-1"], "--rate")]:
        assert words in one_line_error(capsys, chaos.main, argv)
    missing = str(tmp_path / "missing.json")
    assert "--replot" in one_line_error(capsys, backends.main, ["--replot", missing])
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert "--out-dir" in one_line_error(capsys, nf_demo.main, ["--out-dir", str(blocked / "x")])


def test_frames_bigger_than_a_datagram_are_sent_whole(tmp_path: Path) -> None:
    """A loopback capture holds frames of up to 65,549 bytes: one bigger than the sender's
    datagram size goes alone, one bigger than UDP carries goes in pieces that put it back
    together, in order with the others; one over the channel's ``MAX_FRAME`` is left out
    and counted, not a crash of the sender."""
    path = tmp_path / "jumbo.pcapng"  # (a pcap file's packets stop at 256 KiB; pcapng's not)
    frames = [
        tcp_frame(CLIENT, SERVER, 40000, 80, 0x02),
        tcp_frame(CLIENT, SERVER, 40000, 80, 0x18, b"a" * 30_000),
        tcp_frame(CLIENT, SERVER, 40000, 80, 0x18, b"b" * 65_495),  # 65,549 bytes
        tcp_frame(CLIENT, SERVER, 40000, 80, 0x10) + b"\0" * MAX_FRAME,  # too big
        tcp_frame(CLIENT, SERVER, 40000, 80, 0x11),
    ]
    with path.open("wb") as f:
        writer = dpkt.pcapng.Writer(f, snaplen=2 * MAX_FRAME)
        for i, frame in enumerate(frames):
            writer.writepkt(frame, ts=1.7e9 + i / 1000)
    args = sender.parse_args(
        ["--controller", "127.0.0.1:9", "--sink", "127.0.0.1:9", "--pcap", str(path)]
    )
    s = sender.Sender(args)
    try:
        order = [frame for _, _, frame in s.frames()]
    finally:
        s.sock.close()
    assert order == [frames[0], frames[1], frames[2], frames[4]]
    assert s.too_big == 1
    packer, whole = Packer(1), Reassembler()
    got = []
    for i, frame in enumerate(order):
        if frame_fits(frame):
            out = [packer.add(0, i, 0, frame)]
        else:
            out = packer.pieces(0, i, 0, frame)
        for d in [*out, packer.take()]:
            if d is None:
                continue
            dgram = decode(d)
            assert len(d) <= 65_507
            if dgram.kind == Kind.PIECE:
                done = whole.add("sender", dgram)
                got.extend([] if done is None else [done.data])
            else:
                got.extend(f.data for f in dgram.frames)
    assert got == order


def test_a_capture_is_checked_as_its_nf_reads_it(tmp_path: Path) -> None:
    """PRADS reads any capture as Ethernet (as prads does), the other NFs refuse a link
    type they cannot decode: ``bench.live`` checks a capture up front the NF's way."""
    import argparse

    from bench._common import check_capture

    path = tmp_path / "wifi.pcap"
    with path.open("wb") as f:
        dpkt.pcap.Writer(f, linktype=105).writepkt(b"\x08\x02" + b"\0" * 40, ts=1.0)
    parser = argparse.ArgumentParser()
    check_capture(parser, str(path), decode_links=False)
    with pytest.raises(SystemExit):
        check_capture(parser, str(path), decode_links=True)
