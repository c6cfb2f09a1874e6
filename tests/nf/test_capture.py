"""Captures of other link types than Ethernet that carry IP (Linux cooked v1 and v2, as
``tcpdump -i any`` writes them; raw IP; BSD loopback) are read as the same packets behind
an Ethernet header, so the IDS (and the NAT) give what they give on the Ethernet capture;
PRADS reads every capture's bytes as Ethernet, as prads 0.3.3 does (the real prads's log
of a cooked capture is in ``prads/fixtures/cooked.*``)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from nf.__main__ import main
from nf.capture import read_capture
from nf.prads import HEADER

HERE = Path(__file__).parent
CAPTURES = [
    HERE / "prads" / "fixtures" / "sessions.pcap",
    HERE / "prads" / "fixtures" / "ipv6.pcap",
]


def _sll(frame: bytes) -> bytes:  # packet type 0 (to us), ARPHRD_ETHER, a 6-byte address
    return struct.pack("!HHH8s", 0, 1, 6, frame[6:12] + b"\0\0") + frame[12:14] + frame[14:]


def _sll2(frame: bytes) -> bytes:
    return frame[12:14] + struct.pack("!HIHBB8s", 0, 2, 1, 0, 6, frame[6:12] + b"\0\0") + frame[14:]


def _raw(frame: bytes) -> bytes:
    return frame[14:]


def _null(frame: bytes) -> bytes:  # the family in the file's (little-endian) order
    family = 30 if frame[12:14] == b"\x86\xdd" else 2
    return struct.pack("<I", family) + frame[14:]


def _loop(frame: bytes) -> bytes:
    family = 24 if frame[12:14] == b"\x86\xdd" else 2
    return struct.pack(">I", family) + frame[14:]


LINKS: dict[str, tuple[int, Callable[[bytes], bytes]]] = {
    "linux-sll": (113, _sll),
    "linux-sll2": (276, _sll2),
    "raw": (101, _raw),
    "null": (0, _null),
    "loop": (108, _loop),
}


def _rewrite(
    packets: list[tuple[float, bytes]], out: Path, linktype: int, convert: Callable[[bytes], bytes]
) -> None:
    with out.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype))
        for ts, frame in packets:
            data = convert(frame)
            sec = int(ts)
            f.write(struct.pack("<IIII", sec, round((ts - sec) * 1e6), len(data), len(data)))
            f.write(data)


@pytest.mark.parametrize("link", sorted(LINKS))
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_other_link_types_read_as_ethernet(
    link: str, capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    linktype, convert = LINKS[link]
    # (these link types carry no VLAN tag: tagged frames are left out of both)
    ethernet = [(ts, f) for ts, f in read_capture(capture) if f[12:14] != b"\x81\x00"]
    capture = tmp_path / "ethernet.pcap"
    _rewrite(ethernet, capture, 1, lambda frame: frame)
    other = tmp_path / f"{link}.pcap"
    _rewrite(ethernet, other, linktype, convert)
    read = read_capture(other)
    assert [ts for ts, _ in read] == [ts for ts, _ in ethernet]
    # the same EtherType and packet behind a header with zero addresses
    assert all(got[:12] == bytes(12) for _, got in read)
    assert [got[12:] for _, got in read] == [frame[12:] for _, frame in ethernet]
    for nf in ("nat", "ids"):
        assert main([nf, "--pcap", str(capture)]) == 0
        want = capsys.readouterr().out
        assert main([nf, "--pcap", str(other)]) == 0
        assert capsys.readouterr().out == want
    # PRADS: the captured bytes as Ethernet frames (here none is IP: no asset)
    assert read_capture(other, decode_links=False) == [
        (ts, convert(frame)) for ts, frame in ethernet
    ]
    as_ethernet = tmp_path / "as-ethernet.pcap"
    _rewrite(ethernet, as_ethernet, 1, convert)
    assert main(["prads", "--pcap", str(as_ethernet)]) == 0
    want = capsys.readouterr().out
    assert main(["prads", "--pcap", str(other)]) == 0
    assert capsys.readouterr().out == want == HEADER + "\n"


def test_prads_on_a_cooked_capture_logs_what_the_real_prads_logs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fixture = HERE / "prads" / "fixtures" / "cooked"
    assert main(["prads", "--pcap", str(fixture.with_suffix(".pcap"))]) == 0
    want = fixture.with_suffix(".ours.log").read_text(encoding="latin-1")
    assert capsys.readouterr().out == want
