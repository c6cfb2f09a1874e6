"""Reading prads's signature files: what loads, what is refused (naming file and line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nf.prads.signatures import (
    DEFAULT_DIR,
    FP_FILES,
    MOD_CONST,
    MOD_MSS,
    MOD_MTU,
    MOD_NONE,
    QUIRKS,
    SIG_FILES,
    SignatureError,
    Signatures,
    known_port,
    link_name,
    parse_fp_line,
    parse_service_line,
    pcre_to_python,
)

DEBIAN = Path("/etc/prads")


def test_our_set_loads_every_file() -> None:
    sigs = Signatures.load()
    assert sigs.folder == str(DEFAULT_DIR)
    assert sigs.missing == []
    counts = sigs.summary()
    assert all(counts[name] > 0 for name in (*FP_FILES.values(), *SIG_FILES.values()))


@pytest.mark.skipif(not (DEBIAN / "tcp-syn.fp").exists(), reason="no /etc/prads here")
def test_debians_full_set_loads_every_line() -> None:
    sigs = Signatures.load(DEBIAN)
    for kind, name in FP_FILES.items():
        lines = (DEBIAN / name).read_text(encoding="latin-1").splitlines()
        wanted = [x for x in lines if x.strip() and not x.strip().startswith("#")]
        assert len(sigs.os[kind]) == len(wanted), name
    for kind, name in SIG_FILES.items():
        lines = (DEBIAN / name).read_text(encoding="latin-1").split("\n")
        wanted = [x for x in lines if x and not x.startswith("#")]
        assert len(getattr(sigs, kind)) == len(wanted), name


def test_missing_files_are_tolerated(tmp_path: Path) -> None:
    (tmp_path / "tcp-syn.fp").write_text("S4:64:1:60:M*,S,T,N,W7:.:Linux:test\n")
    sigs = Signatures.load(tmp_path)
    assert len(sigs.os["SYN"]) == 1
    assert len(sigs.os["SYNACK"]) == 0 and sigs.server == []
    assert "tcp-synack.fp" in sigs.missing and "mtu.sig" in sigs.missing


def test_a_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="not a folder"):
        Signatures.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("file", "text", "why"),
    [
        ("tcp-syn.fp", "S4:64:1:60:M*,S,T,N,W7:.:Linux", "syntax error"),
        ("tcp-syn.fp", "S4:64:1:60:M*,S,T,N,W7:.::x", "syntax error"),
        ("tcp-syn.fp", "Sx:64:1:60:M*:.:Linux:x", "syntax error"),
        ("tcp-syn.fp", "S:64:1:60:M*:.:Linux:x", "bad SNN|bad Snn"),
        ("tcp-syn.fp", "%0:64:1:60:M*:.:Linux:x", "null modulo"),
        ("tcp-syn.fp", "1:64:1:60:Mx:.:Linux:x", "incorrect M"),
        ("tcp-syn.fp", "1:64:1:60:W%0:.:Linux:x", "null modulo"),
        ("tcp-syn.fp", "1:64:1:60:T5:.:Linux:x", "timestamp"),
        ("tcp-syn.fp", "1:64:1:60:Y:.:Linux:x", "unknown TCP option"),
        ("tcp-syn.fp", "1:64:1:60:" + "N," * 16 + "N:.:Linux:x", "too many"),
        ("tcp-syn.fp", "1:64:1:60:N:E:Linux:x", "obsolete"),
        ("tcp-syn.fp", "1:64:1:60:N:J:Linux:x", "bad quirk"),
        ("tcp-syn.fp", "1:64:1:60:N:.:-*@:x", "empty OS genre"),
        ("tcp-service.sig", "ssh,v/OpenSSH", "want service"),
        ("tcp-service.sig", "ssh,v/OpenSSH,SSH", "title"),
        ("tcp-clients.sig", "ssh,v/a/b/c/,SSH-(", "does not compile"),
        ("mtu.sig", "1500 ethernet", "mtu"),
    ],
)
def test_a_bad_line_names_its_file_and_line(tmp_path: Path, file: str, text: str, why: str) -> None:
    (tmp_path / file).write_text(f"# a comment\n\n{text}\n")
    with pytest.raises(SignatureError) as info:
        Signatures.load(tmp_path)
    assert info.value.path == str(tmp_path / file)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{tmp_path / file}:3: ")
    assert re.search(why, str(info.value), re.IGNORECASE)


def test_an_os_line_as_prads_reads_it() -> None:
    sig = parse_fp_line("  S4:64:1:60:M*,S,T,N,W7:.:Linux:2.6 (newer, 7): ignored  ", 9)
    assert sig is not None
    assert (sig.line, sig.wsize, sig.wsize_mod, sig.ttl, sig.df, sig.size) == (
        9,
        4,
        MOD_MSS,
        64,
        1,
        60,
    )
    assert sig.opts == (2, 4, 8, 1, 3)
    assert (sig.mss, sig.mss_mod, sig.wsc, sig.wsc_mod) == (1, MOD_CONST, 7, MOD_NONE)
    assert not sig.zero_stamp and sig.quirks == 0
    assert (sig.os, sig.desc) == ("Linux", "2.6 (newer, 7)")
    assert parse_fp_line("# comment", 1) is None and parse_fp_line("   ", 2) is None
    t0 = parse_fp_line("T4:128:0:*:M%512,N,W%2,N,N,T0:ZAT:*@-Windows:XP", 1)
    assert t0 is not None
    assert (t0.wsize_mod, t0.size, t0.mss, t0.mss_mod, t0.wsc, t0.wsc_mod) == (
        MOD_MTU,
        0,
        512,
        MOD_CONST,
        2,
        MOD_CONST,
    )
    assert t0.zero_stamp and t0.no_detail and t0.generic and t0.userland
    assert t0.os == "Windows"
    assert t0.quirks == QUIRKS["Z"] | QUIRKS["A"] | QUIRKS["T"]
    star = parse_fp_line("*:64:1:44:M*:.:@Generic:x", 1)
    assert star is not None and (star.wsize, star.wsize_mod) == (1, MOD_CONST)


def test_a_service_line_and_its_application_name() -> None:
    sig = parse_service_line(r"ssh,v/OpenSSH/$2/Protocol $1/,SSH-([.\d]+)-OpenSSH[_-](\S+)", 3)
    assert sig is not None and (sig.service, sig.line) == ("ssh", 3)
    m = sig.regex.search(b"SSH-2.0-OpenSSH_5.3p1 Debian-3ubuntu7\r\n")
    assert m is not None and sig.name(m) == "OpenSSH 5.3p1 (Protocol 2.0)"
    # commas in the regex are put back; an empty version or info part leaves no trace
    csv = parse_service_line(r"x,v/App///,a,b(\d)", 1)
    assert csv is not None and csv.regex.pattern == rb"a,b(\d)"
    m = csv.regex.search(b"xa,b7")
    assert m is not None and csv.name(m) == "App"
    # a group that did not take part, $0 (the whole match), a $ before a letter
    odd = parse_service_line(r"x,v/$2-$0/$ab/,(q)(z)?", 1)
    assert odd is not None
    m = odd.regex.search(b"..q..")
    assert m is not None and odd.name(m) == "-q qb"
    assert parse_service_line("", 1) is None and parse_service_line("#x,y,z", 1) is None


def test_pcre_spellings_python_reads_differently() -> None:
    assert re.fullmatch(pcre_to_python("[[:alpha:]]+[[:digit:]]"), "abC7")
    assert re.search(pcre_to_python(r"\Qa.b\E"), "a.b") and not re.search(
        pcre_to_python(r"\Qa.b\E"), "axb"
    )
    assert re.fullmatch(pcre_to_python(r"\y\%"), "y%")
    assert re.fullmatch(pcre_to_python(r"[]a]+"), "]a]")
    assert re.search(pcre_to_python(r"end\Z"), "end\n")
    assert not re.search(pcre_to_python(r"end\z"), "end\n")
    assert re.fullmatch(pcre_to_python(r"\e\x{41}\x{7e}"), "\x1bA~")


def test_links_and_known_ports() -> None:
    assert link_name(1460) == "ethernet/modem"
    assert link_name(1400) == "sometimes DSL (2)"
    assert link_name(536) == "sometimes modem"
    assert link_name(1000) == "unknown-1040"
    assert link_name(65535) == "unknown-39"  # 16-bit wrap, as in prads
    assert known_port(6, 22) == "@ssh" and known_port(17, 53) == "@domain"
    assert known_port(17, 22) is None and known_port(6, 53) is None
