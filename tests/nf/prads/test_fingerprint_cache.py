"""The fingerprint cache gives what observing, matching and describing the packet anew
gives, on random TCP frames (odd headers, random and cut options, payloads, padding),
looked up many times over so that packets sharing a key hit entries others made."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nf.packet import TCP, parse
from nf.prads.fingerprint import FingerprintCache, describe, match, observe
from nf.prads.signatures import Signatures

from .frames import EOL, NOP, opt_mss, opt_sok, opt_ts, opt_ws

KINDS = ("SYN", "SYNACK", "ACK", "FIN", "RST")
DEBIAN = Path("/etc/prads")


def _tables(folder: str | None) -> dict[str, object]:
    return dict(Signatures.load(folder).os)


TABLES = [_tables(None)]
if (DEBIAN / "tcp-syn.fp").exists():
    TABLES.append(_tables(str(DEBIAN)))

_option = st.one_of(
    st.sampled_from([NOP, EOL, opt_sok(), opt_mss(1460), opt_mss(1380), opt_ws(7), opt_ws(0)]),
    st.builds(opt_ts, st.sampled_from([0, 1, 123456789]), st.sampled_from([0, 5])),
    st.binary(min_size=1, max_size=6),  # anything, cut or overlong options included
)

_frame = st.builds(
    lambda *a: _build(*a),
    st.lists(_option, max_size=6).map(b"".join),
    st.integers(0, 10),  # TCP data offset - 5, whatever the options' length
    st.sampled_from([0, 1, 2]),  # IP option words
    st.integers(0, 0xFF),  # TCP flags
    st.sampled_from([0, 1, 7]),  # seq
    st.sampled_from([0, 1, 7]),  # ack
    st.sampled_from([0, 5840, 14600, 65535, 12345, 5792]),  # window
    st.sampled_from([0, 1]),  # urgent pointer
    st.sampled_from([0, 3]),  # reserved bits
    st.sampled_from([32, 60, 64, 128, 255]),  # TTL
    st.booleans(),  # DF
    st.sampled_from([0, 1]),  # IP id
    st.binary(max_size=12),  # payload
    st.binary(max_size=10),  # padding after the datagram
    st.integers(-8, 8),  # IP total length off by
)


def _build(
    opts: bytes,
    off: int,
    ipwords: int,
    flags: int,
    seq: int,
    ack: int,
    win: int,
    urp: int,
    x2: int,
    ttl: int,
    df: bool,
    ip_id: int,
    payload: bytes,
    padding: bytes,
    skew: int,
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 1000, 80, seq, ack, ((5 + off) << 4) | x2, flags, win, 0, urp)
    seg = tcp + opts + payload
    ipopts = NOP * (4 * ipwords)
    ihl = 5 + ipwords
    total = max(0, min(0xFFFF, ihl * 4 + len(seg) + skew))
    ip = struct.pack(
        "!BBHHHBBHII", 0x40 | ihl, 0, total, ip_id, 0x4000 if df else 0, ttl, TCP, 0, 1, 2
    )
    return b"\x02" * 12 + b"\x08\x00" + ip + ipopts + seg + padding


def _reference(table: object, frame: bytes, kind: str) -> tuple[int, str] | None:
    packet = parse(frame, 0.0)
    fp = observe(packet, kind)
    if fp is None:
        return None
    sig = match(table, fp)  # type: ignore[arg-type]
    return (sig.line if sig is not None else 0), describe(fp, sig)


@pytest.mark.parametrize("tables", TABLES, ids=["ours", "debian"][: len(TABLES)])
@settings(max_examples=300, deadline=None)
@given(frames=st.lists(_frame, min_size=1, max_size=12), repeat=st.integers(1, 3))
def test_cache_equals_full_evaluation(
    tables: dict[str, object], frames: list[bytes], repeat: int
) -> None:
    cache = FingerprintCache(tables)  # type: ignore[arg-type]
    for _ in range(repeat):
        for frame in frames:
            packet = parse(frame, 0.0)
            if packet.drop is not None or packet.proto != TCP or packet.ip_off & 0x1FFF:
                continue
            for kind in KINDS:
                assert cache.lookup(packet, kind) == _reference(tables.get(kind), frame, kind)


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import nf.prads.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "CACHE_SIZE", 3)
    cache = FingerprintCache(TABLES[0])  # type: ignore[arg-type]
    for win in range(10):
        frame = _build(opt_mss(1460), 1, 0, 2, 0, 0, win, 0, 0, 64, True, 1, b"", b"", 0)
        packet = parse(frame, 0.0)
        assert cache.lookup(packet, "SYN") == _reference(TABLES[0]["SYN"], frame, "SYN")
        assert len(cache._entries) <= 3
