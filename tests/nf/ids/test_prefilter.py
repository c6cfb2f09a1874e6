"""Properties of matching on random rules and payloads:

* the Aho-Corasick prefilter changes nothing: the alerts with it equal those of evaluating
  every rule in full;
* the matcher (memoised, trying later occurrences only where a relative option needs
  them) equals a plain reference that tries every occurrence of every option.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nf.ids.engine import Detector, PacketView
from nf.ids.options import Content, Pcre, match_payload
from nf.ids.rules import Rule, load_rules

ALPHABET = "abAB x"
PCRES = ["/a.b/", "/^a/", "/b+a/i", "/x\\s?A/", "/[ab]{2}/", "/^b/", "/a$/", "/(ab|ba)x/"]


@st.composite
def contents(draw: st.DrawFn) -> str:
    pattern = draw(st.text("abAB", min_size=1, max_size=3))
    parts = [f'content:{"!" if draw(st.booleans()) and draw(st.booleans()) else ""}"{pattern}";']
    if draw(st.booleans()):
        parts.append("nocase;")
    if draw(st.booleans()):  # absolute
        if draw(st.booleans()):
            parts.append(f"offset:{draw(st.integers(0, 6))};")
        if draw(st.booleans()):
            parts.append(f"depth:{len(pattern) + draw(st.integers(0, 6))};")
    else:
        if draw(st.booleans()):
            parts.append(f"distance:{draw(st.integers(-3, 5))};")
        if draw(st.booleans()):
            parts.append(f"within:{len(pattern) + draw(st.integers(0, 6))};")
    if draw(st.booleans()) and draw(st.booleans()):
        parts.append("fast_pattern;")
    return " ".join(parts)


@st.composite
def pcres(draw: st.DrawFn) -> str:
    body = draw(st.sampled_from(PCRES))
    flags = "".join(f for f in "RAi" if draw(st.booleans()) and draw(st.booleans()))
    bang = "!" if draw(st.integers(0, 4)) == 0 else ""
    return f'pcre:{bang}"{body}{flags}";'


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    options = draw(st.lists(st.one_of(contents(), contents(), pcres()), min_size=0, max_size=4))
    if draw(st.integers(0, 3)) == 0:
        options.append(f"dsize:>{draw(st.integers(0, 10))};")
    return " ".join(options)


PORTS = ["any", "80", "!80", "[80,81]", "1:100", "5000:", "![1:90,5000]"]


@st.composite
def headers(draw: st.DrawFn) -> str:
    sport, dport = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
    proto = draw(st.sampled_from(["tcp", "tcp", "udp", "ip"]))
    arrow = draw(st.sampled_from(["->", "->", "<>"]))
    return f"{proto} any {sport} {arrow} any {dport}"


def ruleset(texts: list[str], heads: list[str] | None = None) -> list[Rule]:
    heads = heads or ["tcp any any -> any any"] * len(texts)
    lines = [
        f"alert {h} ({t} sid:{i + 1};)" for i, (h, t) in enumerate(zip(heads, texts, strict=True))
    ]
    return load_rules("\n".join(lines)).rules  # rules that do not load are just left out


def reference(options: tuple[Content | Pcre, ...], buf: bytes) -> bool:
    """Every occurrence of every option tried, no shortcut (Snort's continuation, read as
    "some choice of occurrences satisfies all the options")."""
    size = len(buf)

    def go(i: int, cursor: int) -> bool:
        if i == len(options):
            return True
        opt = options[i]
        if isinstance(opt, Content):
            if opt.relative:
                start = cursor + (opt.distance or 0)
                end = size if opt.within is None else min(size, start + opt.within)
            else:
                start = opt.offset or 0
                end = size if opt.depth is None else min(size, start + opt.depth)
            if start < 0 or start > size:
                return False
            hay = buf.lower() if opt.nocase else buf
            n = len(opt.needle)
            found = [p for p in range(start, end - n + 1) if hay[p : p + n] == opt.needle]
            if opt.negated:
                return not found and go(i + 1, cursor)
            return any(go(i + 1, p + n) for p in found)
        base = cursor if opt.relative else 0
        subject = buf[base:]
        matches: list[re.Match[bytes]] = []
        if opt.anchored:
            m = opt.regex.match(subject)
            matches = [m] if m else []
        else:
            pos = 0
            while pos <= len(subject):
                m = opt.regex.search(subject, pos)
                if m is None:
                    break
                matches.append(m)
                pos = m.end() if m.end() > m.start() else m.end() + 1
        if opt.negated:
            return not matches and go(i + 1, cursor)
        return any(go(i + 1, base + m.end()) for m in matches)

    return go(0, 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(headers(), rule_texts()), min_size=1, max_size=12),
    st.lists(
        st.tuples(
            st.sampled_from([6, 17]),
            st.sampled_from([80, 81, 90, 5000]),
            st.sampled_from([80, 81, 90, 5000]),
            st.text(ALPHABET, max_size=24),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_prefilter_changes_no_alert(
    rules_drawn: list[tuple[str, str]], packets: list[tuple[int, int, int, str]]
) -> None:
    rules = ruleset([t for _h, t in rules_drawn], [h for h, _t in rules_drawn])
    full = Detector(rules, prefilter=False)
    finds, automaton = Detector(rules), Detector(rules, small=0)
    for proto, sport, dport, text in packets:
        view = PacketView(proto, 1, 2, sport, dport, 0x18, text.encode())
        expected = [r.sid for r in full.detect(view)]
        assert [r.sid for r in finds.detect(view)] == expected
        assert [r.sid for r in automaton.detect(view)] == expected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_texts(), st.lists(st.text(ALPHABET, max_size=24), min_size=1, max_size=4))
def test_matcher_equals_the_reference(text: str, payloads: list[str]) -> None:
    rules = ruleset([text])
    if not rules:
        return
    (rule,) = rules
    for payload in payloads:
        buf = payload.encode()
        assert match_payload(rule.plan, buf) == reference(rule.payload, buf), (text, buf)
