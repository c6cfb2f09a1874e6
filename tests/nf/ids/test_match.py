"""Option semantics on single packets: Snort 2.9's reading of each option (the cases on
UDP are also in the Suricata fixture, where the two agree)."""

from __future__ import annotations

import pytest

from nf.ids.engine import Detector, PacketView
from nf.ids.rules import load_rules

FLAG_PACKETS = {
    "S": 0x02,
    "SA": 0x12,
    "A": 0x10,
    "PA": 0x18,
    "FA": 0x11,
    "R": 0x04,
    "SF": 0x03,
    "SEC": 0xC2,
    "none": 0x00,
    "SU": 0x22,
}


def fires(
    options: str,
    payload: bytes = b"",
    *,
    proto: str = "tcp",
    flags: int = 0x18,
    to_server: bool | None = True,
    established: bool = True,
) -> bool:
    rs = load_rules(f"alert {proto} any any -> any any ({options} sid:1;)")
    assert not rs.errors and not rs.warnings, (rs.errors, rs.warnings)
    number = {"tcp": 6, "udp": 17, "icmp": 1, "ip": 6}[proto]
    view = PacketView(number, 1, 2, 3, 4, flags, payload, to_server, established)
    with_prefilter = bool(Detector(rs.rules).detect(view))
    without = bool(Detector(rs.rules, prefilter=False).detect(view))
    assert with_prefilter == without
    return with_prefilter


def test_offset_depth() -> None:
    rule = 'content:"/cgi-bin/phf"; offset:4; depth:20;'
    assert fires(rule, b"GET /cgi-bin/phf?Qalias=x")
    assert not fires(rule, b"x" * 20 + b"/cgi-bin/phf?")
    assert fires('content:"PASS"; offset:2; depth:10;', b"XXXXXPASS secret")
    assert not fires('content:"PASS"; offset:2; depth:10;', b"XXXXXXXXXPASS secret")
    # the whole pattern must fit in the window; depth past the end uses what is there
    assert not fires('content:"abc"; depth:4;', b"xxabc")
    assert fires('content:"abc"; depth:40;', b"xxabc")
    assert not fires('content:"abc"; offset:3;', b"xxabc")
    # an offset beyond the payload fails, negated or not (Snort 2.9)
    assert not fires('content:!"abc"; offset:10;', b"xxabc")
    assert fires('content:!"abc"; offset:5;', b"xxabc")  # at the end: empty window


def test_nocase_and_hex() -> None:
    assert fires('content:"USER root"; nocase;', b"user ROOT")
    assert not fires('content:"USER root";', b"user ROOT")
    assert fires('content:"|90 90 90 90|/bin/sh";', b"\x90\x90\x90\x90/bin/sh")
    assert not fires('content:"|90 90 90 90|/bin/sh";', b"\x90\x90\x90/bin/sh")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"ABCxDEF", True),
        (b"ABCxxxxxxxxxxxABCxDEF", True),  # the second ABC: backtracking
        (b"ABCxxxxxxxxxxxDEF", False),
        (b"DEFxABC", False),
        (b"ABCDEF", False),
        (b"ABCxxDEF", False),
    ],
)
def test_distance_within_backtracking(payload: bytes, expected: bool) -> None:
    assert fires('content:"ABC"; content:"DEF"; distance:1; within:3;', payload) is expected


def test_relative_window_rules() -> None:
    # within past the end: the rest is used if the pattern fits
    assert fires('content:"ab"; content:"cd"; within:50;', b"abcd")
    # distance beyond the end fails, even negated
    assert not fires('content:"ab"; content:!"cd"; distance:5;', b"abcd")
    assert fires('content:"ab"; content:!"cd"; distance:2;', b"abcd")  # empty window
    # negative distance reaches back from the cursor
    assert fires('content:"tail"; content:"head"; distance:-13; within:8;', b"head.....tail")
    assert not fires('content:"tail"; content:"head"; distance:-4;', b"head.....tail")
    # a relative content first in the rule is relative to the payload's start
    assert fires('content:"xy"; distance:2; within:2;', b"abxy")
    assert not fires('content:"xy"; distance:3;', b"abxy")


def test_chains_and_negations_backtrack() -> None:
    chain = 'content:"a1"; content:"b2"; within:4; content:"c3"; distance:0; within:4;'
    assert fires(chain, b"a1xb2c3")
    assert fires(chain, b"a1xxxxxb2 c3 a1b2xc3")
    assert not fires(chain, b"a1xxxxb2xxxxxxc3")
    negated = 'content:"key="; content:!"admin"; distance:0; within:5;'
    assert fires(negated, b"key=admin key=guest")
    assert not fires(negated, b"key=admin")
    # a negated content between two others passes the cursor through, and the first is
    # still tried at its later occurrences
    middle = 'content:"A"; content:!"Z"; content:"B"; distance:0; within:1;'
    assert fires(middle, b"AxAB")
    assert not fires(middle, b"AxAxB")


def test_pcre() -> None:
    assert fires('content:"CMD"; pcre:"/^\\s+exec=/R";', b"CMD  exec=")
    assert not fires('content:"CMD"; pcre:"/^\\s+exec=/R";', b"CMD x exec=")
    assert fires('content:"CMD"; pcre:"/^\\s+exec=/R";', b"CMD x CMD\texec=")
    assert fires('pcre:"/^GET \\//m";', b"line1\nGET /x")
    assert not fires('pcre:"/^GET \\//";', b"line1\nGET /x")
    assert fires('pcre:"/a.b/s";', b"a\nb")
    assert not fires('pcre:"/a.b/";', b"a\nb")
    assert fires('pcre:"/select.+from/i";', b"SELECT x FROM y")
    assert fires('pcre:"/a b/x";', b"ab")
    assert fires('pcre:"/mark/A";', b"mark here")
    assert not fires('pcre:"/mark/A";', b" mark here")
    assert fires('pcre:!"/mark/";', b"nothing")
    assert not fires('pcre:!"/mark/";', b"a mark")
    # E: $ only at the very end; without it, before a final newline too
    assert fires('pcre:"/end$/";', b"the end\n")
    assert not fires('pcre:"/end$/E";', b"the end\n")
    assert fires('pcre:"/end$/E";', b"the end")
    # G: quantifiers lazy by default (and ? makes them greedy)
    assert fires('pcre:"/a.*b/G"; content:"c"; within:1;', b"axbcxb")
    assert fires('pcre:"/a.*b/"; content:"c"; within:1;', b"axbcxbc")
    # a pcre whose later occurrence is needed by a relative content
    assert fires('pcre:"/k[0-9]/"; content:"zz"; within:2;', b"k1 k2zz")
    assert not fires('pcre:"/k[0-9]/"; content:"zz"; within:2;', b"k1 zz")
    # named groups in PCRE syntax
    assert fires('pcre:"/(?<word>ab)c/";', b"xabc")


def test_pcre_relative_anchor_is_the_cursor() -> None:
    assert fires('content:"X"; pcre:"/^Y/R";', b"aXYb")
    assert not fires('content:"X"; pcre:"/^Y/R";', b"aXaYb")
    assert fires('content:"X"; pcre:"/Y/R";', b"aXaYb")
    assert not fires('content:"X"; pcre:"/Y/R";', b"aYaXb")


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("S", "S"),
        ("S+", "S SA SF SEC SU"),
        ("*SF", "S SA FA SF SEC SU"),
        ("!A", "S R SF SEC none SU"),
        ("0", "none"),
        ("S,CE", "S SEC"),
        ("+AP", "PA"),
    ],
)
def test_flags(rule: str, expected: str) -> None:
    got = [name for name, bits in FLAG_PACKETS.items() if fires(f"flags:{rule};", flags=bits)]
    assert got == expected.split()


def test_flags_only_on_tcp() -> None:
    assert not fires("flags:0;", proto="udp", flags=0)


def test_dsize() -> None:
    assert fires("dsize:>256;", b"x" * 300)
    assert not fires("dsize:>256;", b"x" * 256)
    assert fires("dsize:<4;", b"abc") and not fires("dsize:<4;", b"abcd")
    assert fires("dsize:10;", b"x" * 10) and not fires("dsize:10;", b"x" * 11)
    # Snort 2.9 reads a<>b inclusive (Suricata and Snort 3: exclusive)
    assert fires("dsize:299<>300;", b"x" * 299)
    assert fires("dsize:299<>300;", b"x" * 300)
    assert not fires("dsize:299<>300;", b"x" * 301)


def test_flow() -> None:
    rule = "flow:to_server,established;"
    assert fires(rule, to_server=True, established=True)
    assert not fires(rule, to_server=True, established=False)
    assert not fires(rule, to_server=False, established=True)
    assert fires(rule, to_server=None, established=True)  # no session: direction passes
    assert fires("flow:from_server;", to_server=False)
    assert not fires("flow:to_client;", to_server=True)
    assert fires("flow:not_established;", established=False)
    assert not fires("flow:not_established;", established=True)
    assert fires("flow:stateless;", established=False)


def test_ip_rules_apply_to_every_protocol() -> None:
    for proto in (6, 17, 1, 47):
        rs = load_rules('alert ip any any -> any any (content:"z"; sid:1;)')
        view = PacketView(proto, 1, 2, 3, 4, 0, b"xz")
        assert Detector(rs.rules).detect(view)


def test_alerts_in_file_order() -> None:
    rs = load_rules(
        'alert tcp any any -> any any (content:"bbbb"; sid:3;)\n'
        'alert tcp any any -> any any (content:"a"; sid:1;)\n'
        "alert tcp any any -> any any (dsize:>0; sid:2;)\n"
    )
    view = PacketView(6, 1, 2, 3, 4, 0x18, b"a bbbb")
    assert [r.sid for r in Detector(rs.rules).detect(view)] == [3, 1, 2]


def test_backtracking_visits_each_occurrence_once_per_window() -> None:
    import time

    rule = 'content:"a"; content:"b"; distance:0; content:"c"; distance:0; within:1;'
    started = time.perf_counter()
    assert not fires(rule, b"ab" * 724)  # 724 a's, each followed by up to 724 b's
    assert time.perf_counter() - started < 0.5  # quadratic took 70 ms here, now 2 ms
