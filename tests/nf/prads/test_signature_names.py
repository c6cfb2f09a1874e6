"""An application name made from the signature's precut template equals the one made a
character at a time, as prads makes it."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from nf.prads.signatures import MAX_NAME, ServiceSignature

_piece = st.one_of(
    st.text(alphabet="ab .()-", max_size=8),
    st.sampled_from(["$1", "$2", "$3", "$4", "$5", "$0", "$", "$12", "$ 1", "$-1", "$$1"]),
)


@settings(max_examples=300, deadline=None)
@given(
    app=st.lists(_piece, max_size=8).map("".join),
    version=st.lists(_piece, max_size=4).map("".join),
    info=st.one_of(st.none(), st.lists(_piece, max_size=4).map("".join)),
    groups=st.lists(st.binary(max_size=40), min_size=3, max_size=3),
)
def test_name_equals_prads_way(
    app: str, version: str, info: str | None, groups: list[bytes]
) -> None:
    regex = re.compile(rb"(.*?)\|(.*?)\|(.*)", re.S)
    sig = ServiceSignature(line=1, service="www", app=app, version=version, info=info, regex=regex)
    m = regex.search(b"|".join(g.replace(b"|", b"") for g in groups))
    assert m is not None
    assert sig.name(m) == sig.name_by_character(m)


def test_name_is_cut_at_the_limit() -> None:
    regex = re.compile(rb"(.*)", re.S)
    sig = ServiceSignature(
        line=1, service="www", app="x" * 90 + "$1", version="y$1", info="z", regex=regex
    )
    m = regex.search(b"v" * 600)
    assert m is not None
    assert len(sig.name(m)) == MAX_NAME
    assert sig.name(m) == sig.name_by_character(m)
