"""The first-byte index of the application signatures never leaves out a signature that
matches: the first match through the index (``_first``) is the first match trying every
regex in file order, on subjects made from the regexes themselves, from their literal
prefixes, banners and random bytes, with our signatures and (where installed) Debian's
full set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nf.prads.monitor import _first
from nf.prads.signatures import (
    ServiceSignature,
    Signatures,
    first_byte_index,
    required_prefix,
)

DEBIAN = Path("/etc/prads")
FOLDERS: list[str | None] = [None]
if (DEBIAN / "tcp-service.sig").exists():
    FOLDERS.append(str(DEBIAN))
SETS = [Signatures.load(folder) for folder in FOLDERS]
IDS = ["ours", "debian"][: len(SETS)]

BANNERS = [
    b"SSH-2.0-OpenSSH_5.3p1 Debian-3ubuntu7\r\n",
    b"HTTP/1.1 200 OK\r\nServer: Apache/2.2.3 (CentOS)\r\n\r\n",
    b"HTTP/1.0 404 Not Found\r\nServer: nginx/1.18.0\r\n",
    b"GET / HTTP/1.1\r\nUser-Agent: Mozilla/5.0\r\n\r\n",
    b"220 mail.example.com ESMTP Postfix\r\n",
    b"220 (vsFTPd 3.0.3)\r\n",
    b"EHLO client.example.com\r\n",
    b"<34>Oct 11 22:14:15 host su: failed\n",
]


def _full(sigs: list[ServiceSignature], data: bytes) -> tuple[str, str] | None:
    for sig in sigs:
        m = sig.regex.search(data)
        if m is not None:
            return sig.service, sig.name(m)
    return None


def _pieces(sigs: list[ServiceSignature]) -> st.SearchStrategy[bytes]:
    prefixes = sorted({s.must_start for s in sigs})
    return st.one_of(
        st.sampled_from(BANNERS),
        st.sampled_from(prefixes),
        st.sampled_from(prefixes).map(lambda b: b[: len(b) // 2]),  # cut short
        st.binary(max_size=12),
    )


@pytest.mark.parametrize("signatures", SETS, ids=IDS)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_index_keeps_the_first_match(signatures: Signatures, data: st.DataObject) -> None:
    for sigs in (signatures.server, signatures.client, signatures.udp):
        if not sigs:
            continue
        index = first_byte_index(sigs)
        sig = data.draw(st.sampled_from(sigs))
        try:
            matching = data.draw(st.from_regex(sig.regex))
        except Exception:  # a pattern hypothesis cannot generate from
            matching = b""
        subject = data.draw(
            st.lists(st.one_of(_pieces(sigs), st.just(matching)), max_size=6).map(b"".join)
        )
        for one in (subject, matching, matching[:1], b""):
            assert _first(index, one) == _full(sigs, one)
        for one in sigs:  # no subject a regex matches lacks its prefix
            for text in (subject, matching):
                if one.regex.search(text) is not None:
                    assert text.startswith(one.must_start)


@pytest.mark.parametrize(
    ("pattern", "flags", "prefix"),
    [
        (rb"^HTTP/1\.[01] \d\d\d", 0, b"HTTP/1."),
        (rb"Server: Apache\/([\S]+)", 0, b""),
        (rb"\A220 x", 0, b"220 x"),
        (rb"^220 x", re.MULTILINE, b""),  # ^ at any line start
        (rb"(?i)^abc", 0, b""),
        (rb"^ab|cd", 0, b""),
        (rb"^ab*c", 0, b"a"),
        (rb"^(a)bcd", 0, b""),
        (rb"^..\x81\x80", 0, b""),
        (rb"^x[y]z", 0, b"xyz"),
        (rb"^a?b", 0, b""),
    ],
)
def test_required_prefix(pattern: bytes, flags: int, prefix: bytes) -> None:
    assert required_prefix(re.compile(pattern, flags)) == prefix
