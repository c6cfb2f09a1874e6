"""PRADS's signature files, read as they are, and the tables prads compiles in.

A signature folder (``--signatures DIR``) may hold:

* ``tcp-syn.fp``, ``tcp-synack.fp``, ``tcp-fin.fp``, ``tcp-rst.fp``, ``tcp-stray-ack.fp``:
  p0f v2 style OS signatures, one per line, ``wss:ttl:df:size:opts:quirks:genre:details``;
* ``tcp-service.sig``, ``tcp-clients.sig``, ``udp-service.sig``: application signatures,
  ``service,v/app/version/info/,regex``;
* ``mtu.sig``: ``mtu,"name"`` lines.  prads 0.3.3 does not use this file for its output
  (its link names are compiled in, :data:`LINKS`); we check its syntax and keep it for
  the ``signatures`` query only.

A file that is missing is tolerated, as prads tolerates it: that kind of detection simply
finds nothing.  A line prads would refuse (or, for the application signatures, skip
silently) is a :class:`SignatureError` naming the file and the line.

How a line is read follows prads: leading and trailing blanks go, empty lines and lines
starting with ``#`` are skipped; the OS line's eight fields are read the way a C
``sscanf`` reads them (so a details field stops at its first ``:``); numbers are
truncated to the C field widths prads stores them in.  The application regexes are PCRE;
:func:`pcre_to_python` rewrites the few PCRE spellings Python's ``re`` reads differently.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_DIR",
    "FP_FILES",
    "KNOWN_PORTS",
    "LINKS",
    "MOD_CONST",
    "MOD_MSS",
    "MOD_MTU",
    "MOD_NONE",
    "OPT_EOL",
    "OPT_MSS",
    "OPT_NOP",
    "OPT_SACKOK",
    "OPT_TIMESTAMP",
    "OPT_WSCALE",
    "QUIRKS",
    "SIG_FILES",
    "SIG_HASHSIZE",
    "OsSignature",
    "OsTable",
    "ServiceSignature",
    "SignatureError",
    "Signatures",
    "first_byte_index",
    "known_port",
    "link_name",
    "parse_fp_line",
    "parse_mtu_line",
    "parse_service_line",
    "pcre_to_python",
    "required_prefix",
]

T = TypeVar("T")

#: Our own small signature set, used when no folder is named.
DEFAULT_DIR = Path(__file__).with_name("signatures")

#: Detection type -> OS signature file.
FP_FILES = {
    "SYN": "tcp-syn.fp",
    "SYNACK": "tcp-synack.fp",
    "FIN": "tcp-fin.fp",
    "RST": "tcp-rst.fp",
    "ACK": "tcp-stray-ack.fp",
}
#: Application signature kind -> file.
SIG_FILES = {
    "server": "tcp-service.sig",
    "client": "tcp-clients.sig",
    "udp": "udp-service.sig",
}

# TCP option kinds, as p0f numbers them.
OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACKOK = 4
OPT_TIMESTAMP = 8

# How a window size, MSS or window scale of a signature is compared.
MOD_NONE = 0  # equal
MOD_CONST = 1  # a multiple of the value (``*`` is "a multiple of 1")
MOD_MSS = 2  # Sn: n times the MSS
MOD_MTU = 3  # Tn: n times the MTU (MSS + 40)

#: Quirk letter -> bit, in the order prads prints them.
QUIRKS: dict[str, int] = {
    "K": 0x0400,  # RST with ACK
    "Q": 0x0800,  # sequence number equals acknowledgement number
    "0": 0x1000,  # sequence number 0
    "P": 0x0001,  # options past EOL
    "Z": 0x0002,  # IP id 0
    "I": 0x0004,  # IP options
    "U": 0x0008,  # urgent pointer set
    "X": 0x0010,  # reserved TCP bits set
    "A": 0x0020,  # ACK number set
    "T": 0x0040,  # timestamp echo set
    "F": 0x0080,  # unusual flags
    "D": 0x0100,  # payload
    "N": 0x2000,  # FIN with ACK
    "L": 0x4000,  # IPv6 flow label (never on IPv4)
    "!": 0x0200,  # options could not be parsed
}

#: prads's signature hash size: a signature is only looked at for packets whose
#: (size, option count, quirks, DF) hash to the same bucket.
SIG_HASHSIZE = 241
#: Sizes from this on match a ``*`` size.
PACKET_BIG = 100
#: At most this many options (prads's MAXOPT is 16).
MAXOPT = 16

#: Link types by MTU (MSS + 40), compiled into prads (and p0f before it); sorted.
LINKS: tuple[tuple[int, str], ...] = (
    (256, "radio modem"),
    (386, "ethernut"),
    (552, "SLIP line / encap ppp"),
    (576, "sometimes modem"),
    (1280, "gif tunnel"),
    (1300, "PIX, SMC, sometimes wireless"),
    (1362, "sometimes DSL (1)"),
    (1372, "cable modem"),
    (1400, "(Google/AOL)"),
    (1408, "virtualization"),
    (1415, "sometimes wireless"),
    (1420, "GPRS, T1, FreeS/WAN"),
    (1423, "sometimes cable"),
    (1440, "sometimes DSL (2)"),
    (1442, "IPIP tunnel"),
    (1450, "vtun"),
    (1452, "sometimes DSL (3)"),
    (1454, "sometimes DSL (4)"),
    (1456, "ISDN ppp"),
    (1458, "BT DSL (?)"),
    (1460, "3G WAN"),
    (1462, "sometimes DSL (5)"),
    (1470, "(Google 2)"),
    (1476, "IPSec/GRE"),
    (1480, "IPv6/IPIP"),
    (1492, "pppoe (DSL)"),
    (1496, "vLAN"),
    (1500, "ethernet/modem"),
    (1656, "Ericsson HIS"),
    (2024, "wireless/IrDA"),
    (2048, "Cyclom X.25 WAN"),
    (2250, "AiroNet wireless"),
    (3924, "loopback"),
    (4056, "token ring (1)"),
    (4096, "Sangoma X.25 WAN"),
    (4352, "FDDI"),
    (4500, "token ring (2)"),
    (9180, "FORE ATM"),
    (16384, "sometimes loopback (1)"),
    (16436, "sometimes loopback (2)"),
    (18000, "token ring x4"),
)
_LINKS = dict(LINKS)

#: Ports prads names when no signature matched: (proto, port) -> name.
KNOWN_PORTS: dict[tuple[int, int], str] = {}
for _proto, _port, _name in (
    (6, 20, "ftp-data"),
    (6, 21, "ftp"),
    (6, 22, "ssh"),
    (6, 25, "smtp"),
    (17, 53, "domain"),
    (6, 80, "www"),
    (6, 110, "pop3"),
    (6, 111, "sunrpc"),
    (17, 111, "sunrpc"),
    (6, 113, "auth"),
    (6, 115, "sftp"),
    (6, 119, "nntp"),
    (17, 123, "ntp"),
    (6, 143, "imap2"),
    (6, 161, "snmp"),
    (17, 161, "snmp"),
    (6, 162, "snmp-trap"),
    (17, 162, "snmp-trap"),
    (6, 389, "ldap"),
    (6, 443, "https"),
    (6, 445, "microsoft-ds"),
    (17, 514, "syslog"),
    (6, 554, "rtsp"),
    (17, 554, "rtsp"),
    (6, 631, "ipp"),
    (6, 990, "ftps"),
    (6, 992, "telnets"),
    (6, 993, "imaps"),
    (6, 995, "pop3s"),
    (17, 1194, "openvpn"),
    (6, 2049, "nfs"),
    (17, 2049, "nfs"),
    (6, 3306, "mysql"),
    (6, 6667, "irc"),
):
    KNOWN_PORTS[(_proto, _port)] = "@" + _name


def known_port(proto: int, port: int) -> str | None:
    """The ``@name`` prads records for an unidentified service on a known port."""
    return KNOWN_PORTS.get((proto, port))


def link_name(mss: int) -> str:
    """The link type of an MSS, as prads prints it: the MTU (MSS + 40, in 16 bits) looked
    up in :data:`LINKS`, else ``unknown-MTU``."""
    mtu = (mss + 40) & 0xFFFF
    return _LINKS.get(mtu) or f"unknown-{mtu}"


class SignatureError(ValueError):
    """A signature file prads would not load: one line naming the file and the line."""

    def __init__(self, path: str | Path, line: int, why: str) -> None:
        super().__init__(f"{path}:{line}: {why}" if line else f"{path}: {why}")
        self.path = str(path)
        self.line = line
        self.why = why


class _LineError(Exception):
    pass


# ---------------------------------------------------------------- OS signatures

_C_SPACE = " \t\n\v\f\r"


def _atoi(text: str) -> int:
    """C's ``atoi``: leading blanks, a sign, digits; 0 if there are none."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


# The eight fields as prads's sscanf reads them: "%[0-9%*()ST]:%d:%d:%[0-9()*]:%[^:]:
# %[^ :]:%[^:]:%[^:]" (whatever follows the eighth field is ignored).
_FP_LINE = re.compile(
    r"([0-9%*()ST]+):[ \t\n\v\f\r]*([+-]?\d+):[ \t\n\v\f\r]*([+-]?\d+):([0-9()*]+):"
    r"([^:]+):([^ :]+):([^:]+):([^:]+)"
)


@dataclass(frozen=True, slots=True)
class OsSignature:
    """One line of an OS signature file."""

    line: int
    wsize: int
    wsize_mod: int
    ttl: int
    df: int
    size: int  # 0: "*", any size from PACKET_BIG on
    opts: tuple[int, ...]
    mss: int
    mss_mod: int
    wsc: int
    wsc_mod: int
    zero_stamp: bool  # no T option with a non-zero timestamp
    quirks: int
    os: str
    desc: str
    no_detail: bool = False
    generic: bool = False
    userland: bool = False

    @property
    def bucket(self) -> int:
        return sighash(self.size, len(self.opts), self.quirks, self.df)


def sighash(size: int, optcnt: int, quirks: int, df: int) -> int:
    """prads's signature bucket."""
    return ((size << 2) ^ (optcnt << 1) ^ df ^ quirks) % SIG_HASHSIZE


def _parse_wsize(w: str) -> tuple[int, int]:
    c = w[0]
    if c == "*":
        return 1, MOD_CONST
    if c in "sStT":
        if len(w) < 2 or not w[1].isdigit():
            raise _LineError(f"bad {c.upper()}nn value in the window size")
        return _atoi(w[1:]) & 0xFFFF, MOD_MSS if c in "sS" else MOD_MTU
    if c == "%":
        n = _atoi(w[1:]) & 0xFFFF
        if not n:
            raise _LineError("null modulo for the window size")
        return n, MOD_CONST
    return _atoi(w) & 0xFFFF, MOD_NONE


def _isalpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _parse_value(p: str, i: int, what: str) -> tuple[int, int]:
    """``W``/``M`` option values: ``*``, ``%n`` or a number."""
    nxt = p[i + 1] if i + 1 < len(p) else ""
    if nxt == "*":
        return 1, MOD_CONST
    if nxt == "%":
        n = _atoi(p[i + 2 :]) & 0xFFFF
        if not n:
            raise _LineError(f"null modulo for {what}")
        return n, MOD_CONST
    if not nxt.isdigit() or not nxt.isascii():
        raise _LineError(f"incorrect {p[i].upper()} value")
    return _atoi(p[i + 1 :]) & 0xFFFF, MOD_NONE


def _parse_opts(
    p: str,
) -> tuple[tuple[int, ...], bool, tuple[int, int], tuple[int, int]]:
    opts: list[int] = []
    zero_stamp = True
    mss = (0, MOD_NONE)
    wsc = (0, MOD_NONE)
    i = 1 if p.startswith(".") else 0
    n = len(p)
    while i < n:
        c = p[i].lower()
        nxt = p[i + 1] if i + 1 < n else ""
        if c == "n":
            opts.append(OPT_NOP)
        elif c == "e":
            opts.append(OPT_EOL)
        elif c == "s":
            opts.append(OPT_SACKOK)
        elif c == "t":
            opts.append(OPT_TIMESTAMP)
            if nxt != "0":
                zero_stamp = False
                if nxt.isdigit():
                    raise _LineError("bogus timestamp specification")
        elif c == "w":
            opts.append(OPT_WSCALE)
            wsc = _parse_value(p, i, "the window scale")
        elif c == "m":
            opts.append(OPT_MSS)
            mss = _parse_value(p, i, "the MSS")
        elif c == "?":
            if not nxt.isdigit():
                raise _LineError("bogus ?nn value")
            opts.append(_atoi(p[i + 1 :]) & 0xFF)
        else:
            raise _LineError(f"unknown TCP option {p[i]!r}")
        if len(opts) >= MAXOPT:
            raise _LineError("too many TCP options")
        i += 1
        while i < n and not _isalpha(p[i]) and p[i] != "?":
            i += 1
    return tuple(opts), zero_stamp, mss, wsc


def _parse_quirks(q: str) -> int:
    bits = 0
    for c in q:
        u = c.upper()
        if u == "E":
            raise _LineError("quirk 'E' is obsolete (append E to the options)")
        if u == ".":
            continue
        bit = QUIRKS.get(u)
        if bit is None:
            raise _LineError(f"bad quirk {c!r}")
        bits |= bit
    return bits


def parse_fp_line(text: str, line: int) -> OsSignature | None:
    """One line of an OS signature file: a signature, or None for a blank line or a
    comment.  Raises ``ValueError`` saying what is wrong."""
    p = text.strip(_C_SPACE)
    if not p or p.startswith("#"):
        return None
    m = _FP_LINE.match(p)
    if m is None:
        raise _LineError("syntax error (want wss:ttl:df:size:opts:quirks:genre:details)")
    w, t, d, sb, obuf, quirks, genre, desc = m.groups()
    size = 0 if sb.startswith("*") else _atoi(sb) & 0xFFFF
    no_detail = generic = userland = False
    while genre and genre[0] in "-*@":
        if genre[0] == "-":
            userland = True
        elif genre[0] == "*":
            no_detail = True
        else:
            generic = True
        genre = genre[1:]
    if not genre:
        raise _LineError("empty OS genre")
    wsize, wsize_mod = _parse_wsize(w)
    opts, zero_stamp, (mss, mss_mod), (wsc, wsc_mod) = _parse_opts(obuf)
    return OsSignature(
        line=line,
        wsize=wsize,
        wsize_mod=wsize_mod,
        ttl=int(t) & 0xFF,
        df=int(d) & 0xFF,
        size=size,
        opts=opts,
        mss=mss,
        mss_mod=mss_mod,
        wsc=wsc,
        wsc_mod=wsc_mod,
        zero_stamp=zero_stamp,
        quirks=_parse_quirks(quirks),
        os=genre,
        desc=desc,
        no_detail=no_detail,
        generic=generic,
        userland=userland,
    )


@dataclass(slots=True)
class OsTable:
    """The signatures of one OS signature file, by prads's hash bucket, in file order."""

    name: str = ""
    signatures: list[OsSignature] = field(default_factory=list)
    buckets: dict[int, list[OsSignature]] = field(default_factory=dict)

    def add(self, sig: OsSignature) -> None:
        self.signatures.append(sig)
        self.buckets.setdefault(sig.bucket, []).append(sig)

    def __len__(self) -> int:
        return len(self.signatures)


# ---------------------------------------------------------- application signatures

# PCRE escapes Python's re knows with the same meaning (a letter after a backslash that is
# not one of these is, to PCRE, the letter itself; Python refuses it).
_PY_ESCAPES = set("abfnrtvxdDsSwWbBAZ0123456789")
_POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": r" \t\n\r\f\v",
    "blank": r" \t",
    "punct": r"!-/:-@\[-`{-~",
    "xdigit": "0-9A-Fa-f",
    "word": r"\w",
    "print": r" -~",
    "graph": r"!-~",
    "cntrl": r"\x00-\x1f\x7f",
}


def pcre_to_python(pattern: str) -> str:
    """Rewrite a PCRE pattern for Python's ``re`` where they read the same text
    differently: POSIX classes (``[[:alpha:]]``), ``\\Q...\\E``, PCRE's ``\\Z`` and
    ``\\z``, ``\\e`` and ``\\x{hh}``, and escaped letters PCRE takes literally (``\\y``
    is ``y``).  ``\\s`` means the same in both (PCRE takes the vertical tab too since
    8.34; Debian's prads 0.3.3 runs on 8.39)."""
    out: list[str] = []
    i = 0
    n = len(pattern)
    in_class = False
    class_start = 0
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e == "e":
                out.append(r"\x1b")
            elif e == "x" and pattern.startswith("{", i + 2) and "}" in pattern[i + 3 :]:
                end = pattern.index("}", i + 3)
                code = int(pattern[i + 3 : end] or "0", 16)
                out.append(f"\\x{code:02x}" if code < 256 else re.escape(chr(code)))
                i = end + 1
                continue
            elif e == "z":
                out.append(r"\Z")
            elif e == "Z":
                out.append(r"(?=\n?\Z)")
            elif e == "Q":
                end = pattern.find("\\E", i + 2)
                lit = pattern[i + 2 : n if end < 0 else end]
                out.append(re.escape(lit))
                i = n if end < 0 else end + 2
                continue
            elif e.isascii() and e.isalpha() and e not in _PY_ESCAPES:
                out.append(re.escape(e))
            elif in_class and e in "bAZ":
                out.append("\\x08" if e == "b" else e)
            else:
                out.append(c + e)
            i += 2
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                if end > 0:
                    name = pattern[i + 2 : end]
                    neg = name.startswith("^")
                    body = _POSIX_CLASSES.get(name.lstrip("^"))
                    if body is not None and not neg:
                        out.append(body)
                        i = end + 2
                        continue
                out.append("\\[")
            elif c == "]" and i > class_start:
                in_class = False
                out.append(c)
            elif c == "[":
                out.append("\\[")
            else:
                out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            class_start = i  # a ']' first in a class is a literal
            if i < n and pattern[i] == "]":
                out.append("\\]")
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


#: prads's limits on the parts of an application name, before substitution.
MAX_APP = 100
MAX_VER = 25
MAX_MISC = 100
#: and on the name after substitution.
MAX_NAME = 511


@dataclass(frozen=True, slots=True)
class ServiceSignature:
    """One line of an application signature file."""

    line: int
    service: str
    app: str
    version: str
    info: str | None
    regex: re.Pattern[bytes]
    #: The template cut into literal text (str) and group numbers (int), once: the name
    #: of each match is made from these (see :meth:`name`).
    parts: tuple[str | int, ...] = field(init=False, repr=False, compare=False)
    #: Bytes every subject the regex matches starts with (b"" when it names none).
    must_start: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        template = self.template
        parts: list[str | int] = []
        text: list[str] = []
        i = 0
        n = len(template)
        while i < n:
            c = template[i]
            if c == "$":
                if text:
                    parts.append("".join(text))
                    text = []
                i += 1
                parts.append(_atoi(template[i:]))
            else:
                text.append(c)
            i += 1
        if text:
            parts.append("".join(text))
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "must_start", required_prefix(self.regex))

    @property
    def template(self) -> str:
        name = self.app[:MAX_APP]
        if self.version:
            name += " " + self.version[:MAX_VER]
        if self.info:
            name += " (" + self.info[:MAX_MISC] + ")"
        return name

    def name(self, match: re.Match[bytes]) -> str:
        """The application name for a match: the template with ``$n`` replaced by group
        n (prads reads n as a number but skips one character after the ``$``), at most
        ``MAX_NAME`` characters."""
        out: list[str] = []
        size = 0
        for part in self.parts:
            if size >= MAX_NAME:
                break
            text = part if isinstance(part, str) else _group(match, part)
            take = text[: MAX_NAME - size]
            out.append(take)
            size += len(take)
        return "".join(out)

    def name_by_character(self, match: re.Match[bytes]) -> str:
        """:meth:`name` as prads writes it, a character at a time (the reference its
        tests compare :meth:`name` with)."""
        template = self.template
        out: list[str] = []
        size = 0
        i = 0
        n = len(template)
        while i < n and size < MAX_NAME:
            c = template[i]
            if c == "$":
                i += 1
                group = _atoi(template[i:])
                text = _group(match, group)
                take = text[: MAX_NAME - size]
                out.append(take)
                size += len(take)
                i += 1
            else:
                out.append(c)
                size += 1
                i += 1
        return "".join(out)


try:  # the regex parser of the standard library; without it no subject is skipped
    _PARSER: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover (Python < 3.11 names it sre_parse)
    _PARSER = None


def required_prefix(regex: re.Pattern[bytes]) -> bytes:
    """Bytes that every subject ``regex.search`` matches starts with: the literal bytes
    right after a leading ``^`` (without MULTILINE) or ``\\A``; b"" when there are none,
    or when the pattern ignores case.  Only top-level items count (nothing under a group,
    a repeat or an alternation), and each of them is part of every match."""
    if _PARSER is None or regex.flags & re.IGNORECASE:
        return b""
    try:
        items = list(_PARSER.parse(regex.pattern, regex.flags))
    except Exception:  # the pattern compiled, so this should not happen; skip nothing
        return b""
    if not items or items[0][0] is not _PARSER.AT:
        return b""
    where = items[0][1]
    if not (
        where is _PARSER.AT_BEGINNING_STRING
        or (where is _PARSER.AT_BEGINNING and not regex.flags & re.MULTILINE)
    ):
        return b""
    prefix = bytearray()
    literal = _PARSER.LITERAL
    for op, value in items[1:]:
        if op is not literal:
            break
        prefix.append(value)
    return bytes(prefix)


def first_byte_index(
    sigs: Sequence[ServiceSignature],
) -> tuple[tuple[ServiceSignature, ...], ...]:
    """For each value of a subject's first byte, the signatures (in their order) whose
    regex can match a subject starting with it: those whose :attr:`must_start` is empty
    or starts with that byte; entry 256 is for the empty subject."""
    index = [
        tuple(sig for sig in sigs if not sig.must_start or sig.must_start[0] == byte)
        for byte in range(256)
    ]
    index.append(tuple(sig for sig in sigs if not sig.must_start))
    return tuple(index)


def _group(match: re.Match[bytes], group: int) -> str:
    # prads hands pcre 5 slots of captures: groups past 4 come back empty, as do groups
    # that did not take part; a NUL ends the text (it is a C string).
    if group < 0 or group > 4 or group > (match.re.groups or 0):
        return ""
    raw = match.group(group)
    if raw is None:
        return ""
    return raw.split(b"\0", 1)[0].decode("latin-1")


def parse_service_line(text: str, line: int) -> ServiceSignature | None:
    """One line of an application signature file (``text`` without its newline): a
    signature, or None for an empty line or a comment.  Raises ``ValueError``."""
    if not text or text.startswith("#"):
        return None
    parts = text.split(",")
    if len(parts) < 3:
        raise _LineError("want service,v/app/version/info/,regex")
    title = parts[1].split("/")
    if len(title) < 3:
        raise _LineError("the title is not v/app/version/info/")
    source = ",".join(parts[2:])
    try:
        regex = re.compile(pcre_to_python(source).encode("latin-1"))
    except (re.error, UnicodeEncodeError, OverflowError, ValueError) as exc:
        raise _LineError(f"the regex does not compile: {exc}") from None
    return ServiceSignature(
        line=line,
        service=parts[0],
        app=title[1],
        version=title[2],
        info=title[3] if len(title) > 3 else None,
        regex=regex,
    )


_MTU_LINE = re.compile(r'(\d+)\s*,\s*"([^"]*)"\s*$')


def parse_mtu_line(text: str, line: int) -> tuple[int, str] | None:
    """One line of ``mtu.sig``: ``(mtu, name)`` or None for a blank line or comment."""
    p = text.strip(_C_SPACE)
    if not p or p.startswith("#"):
        return None
    m = _MTU_LINE.match(p)
    if m is None:
        raise _LineError('want mtu,"name"')
    return int(m.group(1)), m.group(2)


# ------------------------------------------------------------------- the folder


@dataclass(slots=True)
class Signatures:
    """Everything read from one signature folder."""

    folder: str = ""
    os: dict[str, OsTable] = field(default_factory=dict)  # detection type -> table
    server: list[ServiceSignature] = field(default_factory=list)
    client: list[ServiceSignature] = field(default_factory=list)
    udp: list[ServiceSignature] = field(default_factory=list)
    mtu: list[tuple[int, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, folder: str | Path | None = None) -> Signatures:
        """Read the folder (our own set if None).  Missing files are noted in
        ``missing``; a folder that does not exist, or a bad line, raises
        :class:`SignatureError` (a ``ValueError``)."""
        base = Path(DEFAULT_DIR if folder is None else folder)
        if not base.is_dir():
            raise SignatureError(base, 0, "not a folder of signature files")
        sigs = cls(folder=str(base))
        for kind, name in FP_FILES.items():
            table = OsTable(name)
            for no, text in _lines(base / name, sigs.missing):
                sig = _at(base / name, no, parse_fp_line, text)
                if sig is not None:
                    table.add(sig)
            sigs.os[kind] = table
        for kind, name in SIG_FILES.items():
            found: list[ServiceSignature] = getattr(sigs, kind)
            for no, text in _lines(base / name, sigs.missing):
                ssig = _at(base / name, no, parse_service_line, text)
                if ssig is not None:
                    found.append(ssig)
        for no, text in _lines(base / "mtu.sig", sigs.missing):
            entry = _at(base / "mtu.sig", no, parse_mtu_line, text)
            if entry is not None:
                sigs.mtu.append(entry)
        return sigs

    def summary(self) -> dict[str, int]:
        """How many signatures of each kind were loaded."""
        out = {FP_FILES[k]: len(t) for k, t in self.os.items()}
        out.update({SIG_FILES[k]: len(getattr(self, k)) for k in SIG_FILES})
        out["mtu.sig"] = len(self.mtu)
        return out


def _lines(path: Path, missing: list[str]) -> Sequence[tuple[int, str]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        missing.append(path.name)
        return ()
    except OSError as exc:
        raise SignatureError(path, 0, f"cannot be read: {exc.strerror or exc}") from None
    text = data.decode("latin-1")
    return list(enumerate(text.split("\n"), start=1))


def _at(path: Path, line: int, parse: Callable[[str, int], T | None], text: str) -> T | None:
    try:
        return parse(text, line)
    except _LineError as exc:
        raise SignatureError(path, line, str(exc)) from None
