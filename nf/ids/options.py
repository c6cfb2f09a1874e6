"""Rule options that decide a match, and how one packet is checked against them.

Payload options (``content`` and ``pcre``) are searched in order with a cursor: the end of
the last successful positive match, 0 at first.  A relative option (``distance``/``within``,
pcre ``R``) is placed from the cursor.  When a later relative option fails, the earlier
match is tried again at its next occurrence, as Snort 2.9 does, so a rule matches exactly
when some choice of occurrences satisfies all its options.  The search is memoised on
(option, cursor), and an option whose successors do not depend on the cursor is tried at
its first occurrence only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nf.ids.addresses import RuleSyntaxError

__all__ = [
    "Content",
    "Dsize",
    "Flags",
    "Flow",
    "PayloadOption",
    "Pcre",
    "Plan",
    "UnsupportedOption",
    "make_plan",
    "match_payload",
    "parse_content_text",
    "parse_pcre",
]


class UnsupportedOption(Exception):
    """An option (or a form of one) outside the subset: the rule is skipped with a warning."""

    def __init__(self, option: str, detail: str = "") -> None:
        super().__init__(option if not detail else f"{option} ({detail})")
        self.option = option


@dataclass(slots=True)
class Content:
    """``content:[!]"..."`` with its modifiers."""

    pattern: bytes
    negated: bool = False
    nocase: bool = False
    offset: int | None = None
    depth: int | None = None
    distance: int | None = None
    within: int | None = None
    fast_pattern: bool = False
    #: the pattern as searched (lowered when nocase)
    needle: bytes = b""

    @property
    def relative(self) -> bool:
        return self.distance is not None or self.within is not None

    def finish(self) -> None:
        """Check the modifiers against each other; compute the needle."""
        n = len(self.pattern)
        if (self.offset is not None or self.depth is not None) and self.relative:
            raise RuleSyntaxError("offset/depth cannot be combined with distance/within")
        if self.depth is not None and self.depth < n:
            raise RuleSyntaxError(f"depth {self.depth} is shorter than the pattern ({n} bytes)")
        if self.within is not None and self.within < n:
            raise RuleSyntaxError(f"within {self.within} is shorter than the pattern ({n} bytes)")
        self.needle = self.pattern.lower() if self.nocase else self.pattern


@dataclass(slots=True)
class Pcre:
    """``pcre:[!]"/re/flags"``."""

    source: str
    regex: re.Pattern[bytes]
    negated: bool = False
    relative: bool = False
    anchored: bool = False


PayloadOption = Content | Pcre


@dataclass(frozen=True, slots=True)
class Flags:
    """``flags:[+*!]bits[,mask]``; ``mode`` is one of ``=``, ``+``, ``*``, ``!``."""

    mode: str
    bits: int
    mask: int

    def check(self, tcp_flags: int) -> bool:
        value = tcp_flags & ~self.mask & 0xFF
        if self.mode == "=":
            return value == self.bits
        if self.mode == "+":
            return value & self.bits == self.bits
        if self.mode == "*":
            return value & self.bits != 0
        return value & self.bits == 0


@dataclass(frozen=True, slots=True)
class Dsize:
    """``dsize:n``, ``>n``, ``<n`` or ``a<>b`` (inclusive, as Snort 2.9 reads it)."""

    lo: int
    hi: int

    def check(self, size: int) -> bool:
        return self.lo <= size <= self.hi


@dataclass(frozen=True, slots=True)
class IcmpField:
    """``itype`` or ``icode`` (``code``): ``n``, ``>n``, ``<n`` or ``a<>b`` (``a`` and ``b``
    left out, as Snort and Suricata read it); held as an inclusive range.  Only ICMP and
    ICMPv6 packets have one."""

    code: bool
    lo: int
    hi: int

    def check(self, icmp_type: int, icmp_code: int) -> bool:
        return self.lo <= (icmp_code if self.code else icmp_type) <= self.hi


@dataclass(frozen=True, slots=True)
class Flow:
    """``flow:...``: direction (``None``, ``"server"`` = to_server, ``"client"`` = to_client)
    and state (``None``, ``"established"``, ``"not_established"``)."""

    to: str | None = None
    state: str | None = None


# --- content text --------------------------------------------------------------------


def parse_content_text(text: str) -> bytes:
    """The bytes of a content string's inside: text with ``\\"``, ``\\;``, ``\\\\`` and
    ``\\:`` escapes and ``|hex|`` runs (spaces inside the bars ignored)."""
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                raise RuleSyntaxError("content ends with a backslash")
            nxt = text[i + 1]
            if nxt not in '";\\:|':
                raise RuleSyntaxError(f"bad escape \\{nxt} in content")
            out += nxt.encode("latin-1")
            i += 2
        elif ch == "|":
            end = text.find("|", i + 1)
            if end < 0:
                raise RuleSyntaxError("unterminated |hex| in content")
            digits = "".join(text[i + 1 : end].split())
            if len(digits) % 2 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise RuleSyntaxError(f"bad hex bytes |{text[i + 1 : end]}| in content")
            out += bytes.fromhex(digits)
            i = end + 1
        elif ch == '"':
            raise RuleSyntaxError('unescaped " inside content')
        else:
            code = ord(ch)
            if code < 128:
                out.append(code)
            else:  # the file's own bytes (read as UTF-8, undecodable bytes escaped)
                out += ch.encode("utf-8", "surrogateescape")
            i += 1
    if not out:
        raise RuleSyntaxError("empty content")
    return bytes(out)


# --- pcre ----------------------------------------------------------------------------

_PCRE_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE}


def _translate_pcre(body: str, dollar_end_only: bool, ungreedy: bool) -> str:
    """A PCRE pattern in Python ``re`` syntax: ``(?<name>`` named groups, ``\\z`` and
    ``\\Z``, ``$`` under the ``E`` flag, and quantifier greediness under ``G``.  Constructs
    Python cannot express raise :class:`UnsupportedOption`."""
    out: list[str] = []
    i = 0
    n = len(body)
    in_class = False
    while i < n:
        ch = body[i]
        if ch == "\\":
            if i + 1 >= n:
                raise RuleSyntaxError("pcre ends with a backslash")
            nxt = body[i + 1]
            if nxt in "QEKRhHvVXCgkNpP" and not in_class:
                raise UnsupportedOption("pcre", f"\\{nxt} is not supported")
            if nxt == "x" and i + 2 < n and body[i + 2] == "{":
                end = body.find("}", i)
                if end < 0:
                    raise RuleSyntaxError("bad \\x{...} in pcre")
                value = int(body[i + 3 : end] or "0", 16)
                if value > 255:
                    raise UnsupportedOption("pcre", "code points above 255")
                out.append(f"\\x{value:02x}")
                i = end + 1
                continue
            if nxt == "z" and not in_class:
                out.append(r"\Z")
            elif nxt == "Z" and not in_class:
                out.append(r"(?=\n?\Z)")
            else:
                out.append(body[i : i + 2])
            i += 2
            continue
        if in_class:
            if ch == "]" and not (out and out[-1] in ("[", "[^")):
                in_class = False
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = True
            if body.startswith("[^", i):
                out.append("[^")
                i += 2
            else:
                out.append("[")
                i += 1
            if i < n and body[i] == "]":  # a leading ']' is a literal
                out.append("\\]")
                i += 1
            continue
        if ch == "(" and body.startswith("(?<", i) and i + 3 < n and body[i + 3] not in "=!":
            out.append("(?P<")
            i += 3
            continue
        if ch == "$" and dollar_end_only:
            out.append(r"\Z")
            i += 1
            continue
        if ungreedy and ch in "*+?}":
            if ch == "?" and out and out[-1] == "(":
                out.append(ch)  # a group's "(?"
                i += 1
                continue
            out.append(ch)
            i += 1
            if i < n and body[i] == "?":
                i += 1  # lazy becomes greedy
            elif i < n and body[i] == "+":
                out.append("+")  # possessive stays possessive
                i += 1
            else:
                out.append("?")
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_pcre(value: str) -> Pcre:
    """``[!]"/re/flags"`` of a pcre option."""
    text = value.strip()
    negated = text.startswith("!")
    if negated:
        text = text[1:].strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise RuleSyntaxError("pcre must be a quoted string")
    inner = text[1:-1]
    if inner.startswith("m") and len(inner) > 1 and not inner[1].isalnum():
        delim = inner[1]
        inner = inner[2:]
    elif inner.startswith("/"):
        delim = "/"
        inner = inner[1:]
    else:
        raise RuleSyntaxError("pcre must look like /regex/flags")
    end = inner.rfind(delim)
    if end < 0:
        raise RuleSyntaxError("pcre has no closing delimiter")
    body, flag_text = inner[:end], inner[end + 1 :]
    flags = 0
    relative = anchored = dollar_end = ungreedy = False
    for f in flag_text:
        if f in _PCRE_FLAGS:
            flags |= _PCRE_FLAGS[f]
        elif f == "R":
            relative = True
        elif f == "A":
            anchored = True
        elif f == "E":
            dollar_end = True
        elif f == "G":
            ungreedy = True
        elif f == "O":
            pass  # lifts Snort's own match limits; Python's re has none
        else:
            raise UnsupportedOption("pcre", f"flag {f!r}")
    pattern = _translate_pcre(body, dollar_end and not flags & re.MULTILINE, ungreedy)
    try:
        regex = re.compile(pattern.encode("utf-8", "surrogateescape"), flags)
    except re.error as exc:
        raise UnsupportedOption("pcre", f"not compilable here: {exc}") from None
    return Pcre(
        source=value.strip(),
        regex=regex,
        negated=negated,
        relative=relative,
        anchored=anchored,
    )


# --- evaluation ----------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """The payload options of one rule, with for each whether its successors depend on
    the cursor (then every occurrence may have to be tried)."""

    options: tuple[PayloadOption, ...]
    retry: tuple[bool, ...] = field(default=())
    any_nocase: bool = False


def make_plan(options: list[PayloadOption]) -> Plan:
    # An option's later occurrences matter when a following option reads the cursor it
    # leaves: a relative one reached before the next option that moves the cursor (a
    # negated option leaves the cursor where it was).
    retry = []
    for i in range(len(options)):
        needed = False
        for later in options[i + 1 :]:
            if later.relative:
                needed = True
                break
            if not later.negated:
                break
        retry.append(needed)
    return Plan(
        tuple(options),
        tuple(retry),
        any(isinstance(o, Content) and o.nocase for o in options),
    )


def _content_window(c: Content, cursor: int, size: int) -> tuple[int, int] | None:
    if c.relative:
        start = cursor + (c.distance or 0)
        if start < 0 or start > size:
            return None
        end = size if c.within is None else min(start + c.within, size)
    else:
        start = c.offset or 0
        if start < 0 or start > size:
            return None
        end = size if c.depth is None else min(start + c.depth, size)
    return start, end


def match_payload(plan: Plan, buf: bytes, lower: bytes | None = None) -> bool:
    """Whether the payload options of ``plan`` all hold on ``buf`` (``lower`` is
    ``buf.lower()`` when the caller has it)."""
    options = plan.options
    if not options:
        return True
    if lower is None and plan.any_nocase:
        lower = buf.lower()
    size = len(buf)
    count = len(options)
    memo: dict[tuple[int, int], bool] = {}
    later: dict[tuple[int, int, int], bool] = {}

    def step(i: int, cursor: int) -> bool:
        if i == count:
            return True
        key = (i, cursor)
        known = memo.get(key)
        if known is not None:
            return known
        result = _step(i, cursor)
        memo[key] = result
        return result

    def _step(i: int, cursor: int) -> bool:
        opt = options[i]
        if type(opt) is Content:
            window = _content_window(opt, cursor, size)
            if window is None:
                return False
            start, end = window
            hay = lower if opt.nocase else buf
            assert hay is not None
            needle = opt.needle
            at = hay.find(needle, start, end)
            if opt.negated:
                return at < 0 and step(i + 1, cursor)
            if not plan.retry[i]:
                return at >= 0 and step(i + 1, at + len(needle))
            # Every occurrence from ``at`` on, each at most once per (option, window end):
            # a chain of occurrences leads to the same answer from any of its links.
            n = len(needle)
            chain: list[tuple[int, int, int]] = []
            found = False
            while at >= 0:
                link = (i, at, end)
                known = later.get(link)
                if known is not None:
                    found = known
                    break
                chain.append(link)
                if step(i + 1, at + n):
                    found = True
                    break
                at = hay.find(needle, at + 1, end)
            for link in chain:
                later[link] = found
            return found
        assert type(opt) is Pcre
        base = cursor if opt.relative else 0
        subject = memoryview(buf)[base:] if base else buf
        regex = opt.regex
        m = regex.match(subject) if opt.anchored else regex.search(subject)
        if opt.negated:
            return m is None and step(i + 1, cursor)
        if not plan.retry[i] or opt.anchored:
            return m is not None and step(i + 1, base + m.end())
        chain = []
        found = False
        pos = 0
        while m is not None:
            link = (i, base, pos)  # the search from ``pos`` of the subject at ``base``
            known = later.get(link)
            if known is not None:
                found = known
                break
            chain.append(link)
            if step(i + 1, base + m.end()):
                found = True
                break
            pos = m.end() if m.end() > m.start() else m.end() + 1
            if pos > len(subject):
                break
            m = regex.search(subject, pos)
        for link in chain:
            later[link] = found
        return found

    return step(0, 0)
