"""Reading rules files: headers, variables, options, and what happens to bad rules."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nf.ids.addresses import RuleSyntaxError, parse_addresses, parse_ports
from nf.ids.options import Content, Pcre, parse_content_text
from nf.ids.rules import Rule, load_rules, parse_classifications
from nf.packet import V6, ip_int

CLASSES, _ = parse_classifications(
    "config classification: attempted-recon,Probe for information,2\n"
    "config classification: low,Something Minor,3\n"
)


def one(text: str) -> Rule:
    rs = load_rules(text, classifications=CLASSES)
    assert not rs.errors and not rs.warnings, (rs.errors, rs.warnings)
    assert len(rs.rules) == 1
    return rs.rules[0]


def test_address_lists_with_negation_and_variables() -> None:
    home = {"HOME_NET": "[10.0.0.0/8,!10.0.0.9]", "OUT": "!$HOME_NET"}
    net = parse_addresses("$HOME_NET", home)
    assert ip_int("10.1.2.3") in net
    assert ip_int("10.0.0.9") not in net
    assert ip_int("192.168.0.1") not in net
    out = parse_addresses("$OUT", home)  # the complement, 10.0.0.9 included
    assert ip_int("10.0.0.9") in out and ip_int("8.8.8.8") in out
    assert ip_int("10.1.2.3") not in out
    only_neg = parse_addresses("![1.2.3.0/24,5.5.5.5]", {})
    assert ip_int("1.2.4.1") in only_neg and ip_int("1.2.3.4") not in only_neg
    assert ip_int("5.5.5.5") not in only_neg
    assert ip_int("9.9.9.9") in parse_addresses("any", {})
    # IPv6: an IPv4 network never holds an IPv6 address (nf.packet sets bit 128 in one),
    # nor the other way; a list of negated items alone holds only their families.
    v6 = V6 | int(ipaddress.IPv6Address("fe80::1"))
    assert ip_int("9.9.9.9") not in parse_addresses("[fe80::/10]", {})
    assert v6 in parse_addresses("[fe80::/10]", {}) and v6 in parse_addresses("any", {})
    assert v6 not in parse_addresses("0.0.0.0/0", {}) and v6 not in parse_addresses(
        "!10.0.0.0/8", {}
    )
    assert v6 not in parse_addresses("!fe80::/64", {}) and ip_int("9.9.9.9") not in parse_addresses(
        "!fe80::/64", {}
    )
    assert v6 | 1 << 64 in parse_addresses("!fe80::/64", {})
    both = parse_addresses("![10.0.0.0/8,fe80::/64]", {})
    assert ip_int("9.9.9.9") in both and v6 not in both and v6 | 1 << 64 in both
    # the low 32 bits of an IPv6 address do not make it an IPv4 one
    assert V6 | ip_int("10.1.2.3") not in parse_addresses("10.0.0.0/8", {})


def test_port_lists() -> None:
    ports = parse_ports("[80,8000:8080,!8005,$P]", {"P": "[:10]"})
    assert all(p in ports for p in (80, 8000, 8080, 0, 10))
    assert all(p not in ports for p in (8005, 81, 11, 9000))
    assert 65535 in parse_ports("1024:", {}) and 1023 not in parse_ports("1024:", {})
    assert 53 not in parse_ports("!53", {}) and 54 in parse_ports("!53", {})


@pytest.mark.parametrize(
    "text",
    ["!any", "[1.2.3.4", "1.2.3.400", "$NOPE", "[]", "!"],
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_addresses(text, {})


@pytest.mark.parametrize("text", ["70000", "10:5", ":", "x", "!any"])
def test_bad_ports(text: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_ports(text, {})


def test_recursive_variable_is_an_error() -> None:
    with pytest.raises(RuleSyntaxError, match="itself"):
        parse_addresses("$A", {"A": "[$B]", "B": "$A"})


def test_identity_options_and_priority() -> None:
    rule = one(
        'alert tcp any any -> any 80 (msg:"a \\"quoted\\" \\; msg"; classtype:attempted-recon;'
        " sid:7; rev:3; gid:2;)"
    )
    assert rule.msg == 'a "quoted" ; msg'
    assert (rule.gid, rule.sid, rule.rev, rule.priority) == (2, 7, 3, 2)
    # priority always wins, before or after classtype; neither: 0
    assert one("alert tcp any any -> any 80 (priority:5; classtype:low; sid:1;)").priority == 5
    assert one("alert tcp any any -> any 80 (classtype:low; priority:1; sid:1;)").priority == 1
    assert one("alert tcp any any -> any 80 (sid:1;)").priority == 0


def test_content_text() -> None:
    assert parse_content_text("|90 90|/bin/sh") == b"\x90\x90/bin/sh"
    assert parse_content_text('a\\"b\\;c\\\\d|0d0a|') == b'a"b;c\\d\r\n'
    for bad in ("|9|", "|zz|", "a|00", 'a"b', ""):
        with pytest.raises(RuleSyntaxError):
            parse_content_text(bad)


def test_content_modifiers_bind_to_the_last_content() -> None:
    rule = one(
        'alert tcp any any -> any any (content:"A"; offset:1; depth:5; content:!"BB"; nocase;'
        ' distance:2; within:4; pcre:"/x/R"; sid:1;)'
    )
    a, b, p = rule.payload
    assert isinstance(a, Content) and isinstance(b, Content) and isinstance(p, Pcre)
    assert (a.offset, a.depth, a.nocase, a.negated) == (1, 5, False, False)
    assert (b.distance, b.within, b.nocase, b.negated, b.needle) == (2, 4, True, True, b"bb")
    assert p.relative


def test_pcre_flags() -> None:
    rule = one('alert tcp any any -> any any (pcre:!"/^a.b$/smixAERG"; sid:1;)')
    (p,) = rule.payload
    assert isinstance(p, Pcre) and p.negated and p.relative and p.anchored


def test_errors_name_their_line_and_others_still_load() -> None:
    text = "\n".join(
        [
            "# a comment",
            "var HOME_NET [10.0.0.0/8]",
            'alert tcp $HOME_NET any -> any 80 (msg:"ok"; sid:1;)',
            'alert tcp any any -> any 80 (msg:"no sid";)',  # line 4
            'alert tcp any any => any 80 (msg:"bad direction"; sid:2;)',  # line 5
            'alert tcp any any -> any 80 (msg:"depth too short"; content:"abcdef";'
            " depth:3; sid:3;)",  # line 6
            'alert tcp any any -> any 80 (msg:"mixed"; content:"a"; offset:1; distance:2;'
            " sid:4;)",  # line 7
            'alert tcp any any -> any 80 (msg:"unknown class"; classtype:nope; sid:5;)',
            'alert tcp $NOPE any -> any 80 (msg:"undefined var"; sid:6;)',  # line 9
            'alert tcp any any -> any 80 (msg:"byte_test"; byte_test:1,>,2,0; sid:7;)',
            'alert tcp any any -> any 80 (msg:"http"; content:"x"; http_uri; sid:8;)',
            'drop tcp any any -> any 80 (msg:"a drop"; sid:9;)',
            'alert tcp any any -> any 80 (msg:"dup"; sid:1;)',  # line 13
            'alert sctp any any -> any 80 (msg:"proto"; sid:10;)',  # line 14
            'alert tcp any any -> any 80 (msg:"unterminated; sid:11;)',  # line 15
            "config detection: search-method ac",
            "frobnicate all the things",  # line 17
            'alert tcp any any -> any 80 (msg:"continued"; \\',
            '  content:"x"; sid:12;)',
            'alert tcp any any -> any 80 (msg:"flow"; flow:only_stream; sid:13;)',  # line 20
            'alert tcp any any -> any 80 (msg:"pcre flag"; pcre:"/x/U"; sid:14;)',  # line 21
        ]
    )
    rs = load_rules(text, source="x.rules", classifications=CLASSES)
    assert [r.sid for r in rs.rules] == [1, 12]
    assert [r.line for r in rs.rules] == [3, 18]
    lines = sorted(int(e.split(":")[1]) for e in rs.errors)
    assert lines == [4, 5, 6, 7, 8, 9, 13, 14, 15, 17]
    assert all(e.startswith("x.rules:") for e in rs.errors)
    assert len(rs.warnings) == 4
    for sid, option in ((7, "byte_test"), (8, "http_uri"), (13, "flow"), (14, "pcre")):
        (warning,) = [w for w in rs.warnings if f"sid {sid}:" in w]
        assert f"option {option}" in warning
    assert any("'drop'" in n for n in rs.notes)
    assert any("'config' ignored" in n for n in rs.notes)


def test_bidirectional_header() -> None:
    rule = one("alert udp 10.0.0.1 1000 <> 10.0.0.2 53 (sid:1;)")
    a, b = ip_int("10.0.0.1"), ip_int("10.0.0.2")
    assert rule.header_matches(a, 1000, b, 53, True)
    assert rule.header_matches(b, 53, a, 1000, True)
    assert not rule.header_matches(b, 1000, a, 53, True)
    one_way = one("alert udp 10.0.0.1 1000 -> 10.0.0.2 53 (sid:1;)")
    assert not one_way.header_matches(b, 53, a, 1000, True)
    # ports are not looked at for protocols without them
    assert one_way.header_matches(a, 0, b, 0, False)


def test_classification_file() -> None:
    classes, errors = parse_classifications(
        "# c\nconfig classification: a,Thing A,1\nconfig classification: b,no priority\njunk\n",
        "c.config",
    )
    assert list(classes) == ["a"] and classes["a"].description == "Thing A"
    assert [e.split(":")[1] for e in errors] == ["3", "4"]


def test_bytes_of_the_file_are_kept() -> None:
    raw = (
        b'alert tcp any any -> any any (msg:"caf\xc3\xa9 \xff"; content:"caf\xc3\xa9\xff"; sid:1;)'
    )
    rule = one(raw.decode("utf-8", "surrogateescape"))
    assert rule.msg == "café \ufffd"
    assert rule.payload[0].pattern == b"caf\xc3\xa9\xff"


FRAGMENTS = [
    "alert",
    "tcp",
    "udp",
    "any",
    "!",
    "[",
    "]",
    ",",
    "$X",
    "10.0.0.0/8",
    "80",
    ":",
    "->",
    "<>",
    "(",
    ")",
    ";",
    '"',
    "\\",
    "|",
    "content:",
    "pcre:",
    "/a(/",
    "depth:",
    "-1",
    "sid:",
    "1",
    "flow:",
    "flags:",
    "dsize:",
    "<>",
    "nocase",
    "within:",
    "msg:",
    "var X",
    " ",
    "\n",
    "classtype:",
    "byte_test:",
    "offset:",
    "99999999999999999999",
    "/x/R",
    "|zz|",
    "A+",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.text(max_size=30))
def test_no_input_makes_the_loader_raise(parts: list[str], noise: str) -> None:
    text = "".join(parts) + noise
    rs = load_rules(text + "\n" + text.replace("\n", " "))
    for rule in rs.rules:
        assert rule.sid > 0


def test_deeply_nested_lists_are_an_error_not_a_crash() -> None:
    rs = load_rules("alert tcp " + "[" * 5000 + "1.2.3.4" + "]" * 5000 + " any -> any any (sid:1;)")
    assert len(rs.errors) == 1 and not rs.rules
