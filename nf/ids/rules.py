"""Reading Snort 2.9 rules files (the subset the IDS evaluates) and ``classification.config``.

A rules file holds ``var``/``ipvar``/``portvar`` definitions, rules and comments; a line
ending in ``\\`` continues on the next.  Each rule is read on its own: a malformed one is one
error naming its line, a rule using an option outside the subset is one warning naming its
sid and that option, a rule whose action is not ``alert`` is skipped (one note per action);
every other rule loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from nf.ids.addresses import (
    AddressSet,
    PortSet,
    RuleSyntaxError,
    negates,
    parse_addresses,
    parse_ports,
)
from nf.ids.options import (
    Content,
    Dsize,
    Flags,
    Flow,
    IcmpField,
    PayloadOption,
    Plan,
    UnsupportedOption,
    make_plan,
    parse_content_text,
    parse_pcre,
)

__all__ = [
    "Classification",
    "Rule",
    "RuleSet",
    "RuleSyntaxError",
    "load_rules",
    "parse_classifications",
]

PROTOCOLS = ("tcp", "udp", "icmp", "ip")
ACTIONS = ("alert", "log", "pass", "drop", "reject", "sdrop", "activate", "dynamic")
#: snort.conf directives that may sit in a rules file and mean nothing to this IDS.
IGNORED_DIRECTIVES = (
    "config",
    "include",
    "preprocessor",
    "output",
    "dynamicpreprocessor",
    "dynamicengine",
    "dynamicdetection",
    "event_filter",
    "threshold",
    "suppress",
    "rate_filter",
    "ruletype",
)
#: Options that describe a rule without deciding whether it matches.
INFORMATIONAL = ("reference", "metadata")
_FLAG_BITS = {
    "F": 0x01,
    "S": 0x02,
    "R": 0x04,
    "P": 0x08,
    "A": 0x10,
    "U": 0x20,
    "E": 0x40,
    "C": 0x80,
    "2": 0x40,
    "1": 0x80,
}
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Classification:
    name: str
    description: str
    priority: int


@dataclass(slots=True)
class Rule:
    """One loaded rule.  ``index`` is its place among the loaded rules (file order)."""

    index: int
    line: int
    proto: str
    src: AddressSet
    sport: PortSet
    dst: AddressSet
    dport: PortSet
    bidirectional: bool
    sid: int
    gid: int = 1
    rev: int = 0
    msg: str = ""
    classification: Classification | None = None
    priority: int = 0
    flow: Flow | None = None
    flags: Flags | None = None
    dsize: tuple[Dsize, ...] = ()
    icmp: tuple[IcmpField, ...] = ()
    payload: tuple[PayloadOption, ...] = ()
    plan: Plan = field(default_factory=lambda: make_plan([]))
    fast_pattern: Content | None = None
    text: str = ""
    #: both address lists admit every address
    any_address: bool = False
    #: Suricata's "IP-only" rule (and, with ports, its "like IP-only" one): the header
    #: alone, no option that reads the packet or the flow, no negated address.  Suricata
    #: inspects such rules once per flow and direction, on the direction's first packet,
    #: and so do we.
    ip_only: bool = False

    def __post_init__(self) -> None:
        self.any_address = self.src.everything and self.dst.everything
        self.ip_only = (
            self.flow is None
            and self.flags is None
            and not self.dsize
            and not self.icmp
            and not self.payload
            and not negates(self.src)
            and not negates(self.dst)
        )

    def header_matches(self, src: int, sport: int, dst: int, dport: int, ports: bool) -> bool:
        """Whether the header admits a packet ``src:sport -> dst:dport`` (ports only when
        ``ports``: TCP and UDP)."""
        if self._one_way(src, sport, dst, dport, ports):
            return True
        return self.bidirectional and self._one_way(dst, dport, src, sport, ports)

    def _one_way(self, src: int, sport: int, dst: int, dport: int, ports: bool) -> bool:
        if src not in self.src or dst not in self.dst:
            return False
        return not ports or (sport in self.sport and dport in self.dport)


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- classification.config -------------------------------------------------------------


def parse_classifications(
    text: str, source: str = "classification.config"
) -> tuple[dict[str, Classification], list[str]]:
    """``config classification: name,description,priority`` lines; the errors, by line."""
    found: dict[str, Classification] = {}
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, rest = line.partition(":")
        if not sep or head.split() != ["config", "classification"]:
            errors.append(f"{source}:{number}: not a 'config classification:' line")
            continue
        parts = [p.strip() for p in rest.split(",")]
        if len(parts) != 3 or not parts[0] or not parts[2].isdigit():
            errors.append(f"{source}:{number}: expected name,description,priority")
            continue
        found[parts[0]] = Classification(parts[0], parts[1], int(parts[2]))
    return found, errors


# --- the rules file --------------------------------------------------------------------


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each logical line, continuations joined."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not pending:
            start = number
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, " ".join(p.strip() for p in pending)
        pending = []
    if pending:
        yield start, " ".join(p.strip() for p in pending)


def _split_header(text: str) -> list[str]:
    """Whitespace-separated header fields, a bracketed list kept whole."""
    fields: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch.isspace() and depth <= 0:
            if current:
                fields.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        fields.append("".join(current))
    return fields


def _split_options(text: str) -> list[tuple[str, str]]:
    """(name, value) of each ``name[:value];`` option; quotes and ``\\`` escapes respected."""
    options: list[tuple[str, str]] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            options.append(_option("".join(current)))
            current = []
        else:
            current.append(ch)
        i += 1
    if quoted:
        raise RuleSyntaxError("unterminated quoted string")
    if "".join(current).strip():
        raise RuleSyntaxError("the last option is not ended by ';'")
    return options


def _option(text: str) -> tuple[str, str]:
    name, _, value = text.partition(":")
    name = name.strip().lower()
    if not name:
        raise RuleSyntaxError("empty option (two ';' in a row?)")
    return name, value.strip()


def _integer(name: str, value: str, low: int | None = None) -> int:
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise RuleSyntaxError(f"{name} needs a number, not {value!r}") from None
    if low is not None and number < low:
        raise RuleSyntaxError(f"{name} must be at least {low}")
    return number


def _quoted(name: str, value: str) -> str:
    value = value.strip()
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        raise RuleSyntaxError(f"{name} must be a quoted string")
    return re.sub(r"\\(.)", r"\1", value[1:-1])


def _parse_flags(value: str) -> Flags:
    text, _, mask_text = value.partition(",")
    text = text.strip()
    mode = "="
    if text and text[0] in "+*!":
        mode, text = text[0], text[1:]
    elif text and text[-1] in "+*!":
        mode, text = text[-1], text[:-1]
    if not text:
        raise RuleSyntaxError("flags needs flag letters")
    bits = 0
    for ch in text:
        if ch == "0":
            continue
        if ch not in _FLAG_BITS:
            raise RuleSyntaxError(f"unknown TCP flag {ch!r}")
        bits |= _FLAG_BITS[ch]
    mask = 0
    for ch in mask_text.strip():
        if ch not in _FLAG_BITS:
            raise RuleSyntaxError(f"unknown TCP flag {ch!r} in the mask")
        mask |= _FLAG_BITS[ch]
    return Flags(mode, bits, mask)


def _parse_icmp(name: str, value: str) -> IcmpField:
    text = value.replace(" ", "")
    try:
        if "<>" in text:
            lo_text, hi_text = text.split("<>")
            lo, hi = int(lo_text) + 1, int(hi_text) - 1
        elif text.startswith(">"):
            lo, hi = int(text[1:]) + 1, 255
        elif text.startswith("<"):
            lo, hi = 0, int(text[1:]) - 1
        else:
            lo = hi = int(text)
    except ValueError:
        raise RuleSyntaxError(f"bad {name} {value!r}") from None
    if not 0 <= lo <= hi <= 255:
        raise RuleSyntaxError(f"{name} {value!r} holds no value from 0 to 255")
    return IcmpField(name == "icode", lo, hi)


def _parse_dsize(value: str) -> Dsize:
    text = value.replace(" ", "")
    try:
        if "<>" in text:
            lo_text, hi_text = text.split("<>")
            lo, hi = int(lo_text), int(hi_text)
            if lo > hi:
                raise RuleSyntaxError("dsize range is backwards")
            return Dsize(lo, hi)
        if text.startswith(">"):
            return Dsize(int(text[1:]) + 1, 1 << 30)
        if text.startswith("<"):
            return Dsize(-1, int(text[1:]) - 1)
        return Dsize(int(text), int(text))
    except ValueError:
        raise RuleSyntaxError(f"bad dsize {value!r}") from None


def _parse_flow(value: str) -> Flow:
    to: str | None = None
    state: str | None = None
    for word in (w.strip().lower() for w in value.split(",")):
        if word in ("to_server", "from_client"):
            new_to = "server"
        elif word in ("to_client", "from_server"):
            new_to = "client"
        elif word in ("established", "not_established", "stateless"):
            if state is not None:
                raise RuleSyntaxError(f"flow has two states ({state}, {word})")
            state = word
            continue
        elif word in ("no_stream", "only_stream", "no_frag", "only_frag"):
            raise UnsupportedOption("flow", word)
        else:
            raise RuleSyntaxError(f"unknown flow keyword {word!r}")
        if to is not None and to != new_to:
            raise RuleSyntaxError("flow names both directions")
        to = new_to
    if state == "stateless":
        state = None
    return Flow(to, state)


@dataclass
class _Draft:
    sid: int | None = None
    gid: int = 1
    rev: int = 0
    msg: str = ""
    classtype: str | None = None
    priority: int | None = None
    flow: Flow | None = None
    flags: Flags | None = None
    dsize: list[Dsize] = field(default_factory=list)
    icmp: list[IcmpField] = field(default_factory=list)
    payload: list[PayloadOption] = field(default_factory=list)
    unsupported: str | None = None


def _apply(draft: _Draft, name: str, value: str, seen: set[str]) -> None:
    last_content = next((o for o in reversed(draft.payload) if isinstance(o, Content)), None)
    if name in ("msg", "sid", "rev", "gid", "classtype", "priority", "flow", "flags"):
        if name in seen:
            raise RuleSyntaxError(f"{name} given twice")
        seen.add(name)
    if name == "msg":
        # printable whatever the file's bytes (undecodable ones become U+FFFD)
        msg = _quoted(name, value).encode("utf-8", "surrogateescape")
        draft.msg = msg.decode("utf-8", "replace")
    elif name == "sid":
        draft.sid = _integer(name, value, 1)
    elif name == "rev":
        draft.rev = _integer(name, value, 0)
    elif name == "gid":
        draft.gid = _integer(name, value, 1)
    elif name == "priority":
        draft.priority = _integer(name, value, 0)
    elif name == "classtype":
        if not value:
            raise RuleSyntaxError("classtype needs a name")
        draft.classtype = value
    elif name in INFORMATIONAL:
        pass
    elif name == "content":
        text = value.strip()
        negated = text.startswith("!")
        if negated:
            text = text[1:].strip()
        if len(text) < 2 or text[0] != '"' or text[-1] != '"':
            raise RuleSyntaxError("content must be a quoted string")
        draft.payload.append(Content(parse_content_text(text[1:-1]), negated=negated))
    elif name in ("nocase", "offset", "depth", "distance", "within", "fast_pattern"):
        if last_content is None:
            raise RuleSyntaxError(f"{name} without a content before it")
        if name == "nocase":
            last_content.nocase = True
        elif name == "fast_pattern":
            last_content.fast_pattern = True
        else:
            if getattr(last_content, name) is not None:
                raise RuleSyntaxError(f"{name} given twice for one content")
            low = 1 if name in ("depth", "within") else None
            setattr(last_content, name, _integer(name, value, low))
    elif name == "pcre":
        draft.payload.append(parse_pcre(value))
    elif name == "flow":
        draft.flow = _parse_flow(value)
    elif name == "flags":
        draft.flags = _parse_flags(value)
    elif name == "dsize":
        draft.dsize.append(_parse_dsize(value))
    elif name in ("itype", "icode"):
        draft.icmp.append(_parse_icmp(name, value))
    else:
        raise UnsupportedOption(name)


def _fast_pattern(payload: list[PayloadOption]) -> Content | None:
    positive = [o for o in payload if isinstance(o, Content) and not o.negated]
    if not positive:
        return None
    for c in positive:
        if c.fast_pattern:
            return c
    return max(positive, key=lambda c: len(c.pattern.lstrip(b"\x00")))


def _parse_rule(
    line: int,
    text: str,
    variables: Mapping[str, str],
    classes: Mapping[str, Classification],
) -> tuple[_Draft, Rule | None]:
    """The rule on ``text`` (without its action): a draft (its sid, an unsupported option)
    and the rule, or ``RuleSyntaxError``."""
    open_at = text.find("(")
    if open_at < 0 or not text.rstrip().endswith(")"):
        raise RuleSyntaxError("options must be in parentheses after the header")
    header = _split_header(text[:open_at])
    if len(header) != 6:
        raise RuleSyntaxError(
            "header must be: proto source source-port direction destination destination-port"
        )
    proto, src_text, sport_text, direction, dst_text, dport_text = header
    proto = proto.lower()
    if proto not in PROTOCOLS:
        raise RuleSyntaxError(f"unknown protocol {proto!r} (tcp, udp, icmp or ip)")
    if direction not in ("->", "<>"):
        raise RuleSyntaxError(f"direction must be -> or <>, not {direction!r}")
    src = parse_addresses(src_text, variables)
    dst = parse_addresses(dst_text, variables)
    sport = parse_ports(sport_text, variables)
    dport = parse_ports(dport_text, variables)
    draft = _Draft()
    seen: set[str] = set()
    for name, value in _split_options(text[open_at + 1 : text.rstrip().rfind(")")]):
        try:
            _apply(draft, name, value, seen)
        except UnsupportedOption as exc:
            if draft.unsupported is None:
                draft.unsupported = str(exc)
    for opt in draft.payload:
        if isinstance(opt, Content):
            opt.finish()
    if draft.sid is None:
        raise RuleSyntaxError("no sid")
    if draft.unsupported is not None:
        return draft, None
    classification = None
    if draft.classtype is not None:
        classification = classes.get(draft.classtype)
        if classification is None:
            raise RuleSyntaxError(f"unknown classtype {draft.classtype!r}")
    priority = draft.priority
    if priority is None:
        priority = classification.priority if classification is not None else 0
    rule = Rule(
        index=0,
        line=line,
        proto=proto,
        src=src,
        sport=sport,
        dst=dst,
        dport=dport,
        bidirectional=direction == "<>",
        sid=draft.sid,
        gid=draft.gid,
        rev=draft.rev,
        msg=draft.msg,
        classification=classification,
        priority=priority,
        flow=draft.flow,
        flags=draft.flags,
        dsize=tuple(draft.dsize),
        icmp=tuple(draft.icmp),
        payload=tuple(draft.payload),
        plan=make_plan(draft.payload),
        fast_pattern=_fast_pattern(draft.payload),
    )
    return draft, rule


def load_rules(
    text: str,
    *,
    source: str = "rules",
    classifications: Mapping[str, Classification] | None = None,
    variables: Mapping[str, str] | None = None,
) -> RuleSet:
    """Every rule of ``text`` that loads, with the errors, warnings and notes of the others.

    ``variables`` are defined before the file's own (which override them)."""
    result = RuleSet(variables=dict(variables or {}))
    classes = classifications or {}
    skipped: dict[str, int] = {}
    ids: dict[tuple[int, int], int] = {}
    for line, logical in _logical_lines(text):
        words = logical.split(None, 1)
        if not words:
            continue
        keyword = words[0]
        rest = words[1] if len(words) > 1 else ""
        where = f"{source}:{line}"
        if keyword in ("var", "ipvar", "portvar"):
            parts = rest.split(None, 1)
            if len(parts) != 2 or not _VAR_NAME.match(parts[0]):
                result.errors.append(f"{where}: expected '{keyword} NAME VALUE'")
                continue
            name, value = parts[0], parts[1].strip()
            try:  # check that it reads, with the variables defined so far
                if keyword == "portvar":
                    parse_ports(value, {**result.variables, name: "any"})
                else:
                    parse_addresses(value, {**result.variables, name: "any"})
            except RuleSyntaxError as exc:
                result.errors.append(f"{where}: {keyword} {name}: {exc}")
                continue
            except RecursionError:
                result.errors.append(f"{where}: {keyword} {name}: nested too deep")
                continue
            result.variables[name] = value
            continue
        if keyword in IGNORED_DIRECTIVES:
            result.notes.append(f"{where}: '{keyword}' ignored (not a rule)")
            continue
        if keyword not in ACTIONS:
            result.errors.append(f"{where}: unknown action or directive {keyword!r}")
            continue
        if keyword != "alert":
            skipped[keyword] = skipped.get(keyword, 0) + 1
            continue
        try:
            draft, rule = _parse_rule(line, rest, result.variables, classes)
        except RuleSyntaxError as exc:
            result.errors.append(f"{where}: {exc}")
            continue
        except RecursionError:
            result.errors.append(f"{where}: lists or variables nested too deep")
            continue
        if rule is None:
            result.warnings.append(
                f"{where}: sid {draft.sid}: option {draft.unsupported} is not supported; "
                "rule skipped"
            )
            continue
        ident = (rule.gid, rule.sid)
        if ident in ids:
            result.errors.append(
                f"{where}: gid {rule.gid} sid {rule.sid} already defined on line "
                f"{ids[ident]}; this one skipped"
            )
            continue
        ids[ident] = line
        rule.index = len(result.rules)
        rule.text = logical
        result.rules.append(rule)
    for action, count in sorted(skipped.items()):
        result.notes.append(
            f"{source}: {count} '{action}' rule{'s' if count != 1 else ''} skipped "
            "(only 'alert' rules are evaluated)"
        )
    return result
