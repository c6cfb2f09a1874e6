"""PRADS's objects: the merges obey the laws the store needs; the connection's roles."""

from __future__ import annotations

from hypothesis import strategies as st

from nf.prads.state import (
    CHECK_CLIENT_DONE,
    CLIENT,
    NOROLE,
    SERVER,
    Asset,
    Connection,
    Statistics,
    asset_lines,
    ended,
)
from store import check_merge
from store.merge_check import calls

orders = st.lists(st.integers(0, 3), min_size=7, max_size=7).map(
    lambda xs: [1_500_000_000.0 + xs[0], *xs[1:]]
)
os_entries = st.tuples(orders, st.integers(0, 2), st.integers(0, 3), st.sampled_from("ab")).map(
    lambda t: [t[0], t[1], t[2], f"fp-{t[3]}", 0]
)
apps = st.sampled_from(["@ssh", "@www", "OpenSSH 7.4", "Apache"])
service_entries = st.tuples(orders, st.integers(0, 2), st.sampled_from([0, 1, 2]), apps).map(
    lambda t: [t[0], t[1], t[2], "unknown" if t[3].startswith("@") else "x", t[3], 1]
)


def test_asset_merge_laws() -> None:
    check_merge(
        Asset,
        st.one_of(
            calls("touch", st.floats(0, 100)),
            calls("observe_os", st.sampled_from(["SYN:0", "SYN:3", "FIN:1"]), os_entries),
            calls("observe_service", st.sampled_from(["22/6", "53/17"]), service_entries),
        ),
    )


def test_statistics_merge_laws() -> None:
    names = st.lists(st.sampled_from(["got_packets", "tcp_recv", "sessions"]), max_size=4)
    check_merge(
        Statistics,
        st.one_of(
            calls("add", names),
            calls("add_counts", st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 5))),
        ),
    )


def test_the_earliest_observation_is_kept_and_printed() -> None:
    asset = Asset()
    late = [[1_500_000_010.0, 1, 2, 6, 3, 4, 0], 0, 40000, "late", 0]
    early = [[1_500_000_001.5, 9, 9, 6, 9, 9, 5], 7, 40001, "early", 4]
    asset.observe_os("SYN:4", late)
    asset.observe_os("SYN:4", early)
    asset.observe_os("SYN:4", late)
    ((order, line),) = asset_lines("10.0.0.1", asset)
    assert line == "10.0.0.1,7,40001,6,SYN,[early],4,1500000001"
    assert order == early[0]
    assert (asset.first, asset.last) == (1_500_000_001.5, 1_500_000_010.0)


def test_a_port_guess_then_a_real_name_is_two_lines() -> None:
    asset = Asset()
    guess = [[1.0, 0, 0, 6, 0, 0, 0], 0, SERVER, "unknown", "@ssh", 0]
    real = [[5.0, 0, 0, 6, 0, 0, 0], 3, CLIENT, "ssh", "OpenSSH 7.4 (Protocol 2.0)", 9]
    later = [[6.0, 0, 0, 6, 0, 0, 0], 0, SERVER, "ssh", "OpenSSH 8.0 (Protocol 2.0)", 0]
    for entry in (later, real, guess):
        asset.observe_service("22/6", entry)
    lines = sorted(asset_lines("10.0.0.5", asset))
    # the replacement keeps the guess's role and distance, takes the name's VLAN and time
    assert [text for _, text in lines] == [
        "10.0.0.5,0,22,6,SERVER,[unknown:@ssh],0,1",
        "10.0.0.5,3,22,6,SERVER,[ssh:OpenSSH 7.4 (Protocol 2.0)],0,5",
    ]
    named = Asset()
    named.observe_service("22/6", real)
    named.observe_service("22/6", guess_after := [[9.0, *guess[0][1:]], *guess[1:]])
    assert guess_after[0][0] == 9.0
    assert [t for _, t in asset_lines("h", named)] == [
        "h,3,22,6,CLIENT,[ssh:OpenSSH 7.4 (Protocol 2.0)],9,5"
    ]


def test_connection_roles_and_reverse() -> None:
    c = Connection()
    assert c.track(1, 100, 2, 22, 6, 0x02, 0, 1.0) == (NOROLE, 0, 0, True)
    assert c.track(2, 22, 1, 100, 6, 0x12, 0, 2.0) == (SERVER, 0, 1, True)
    assert c.track(1, 100, 2, 22, 6, 0x10, 0, 3.0) == (CLIENT, 0, 2, False)
    c.set_check(CHECK_CLIENT_DONE)
    c.reverse()
    assert c.check == 0
    assert c.track(1, 100, 2, 22, 6, 0x10, 0, 4.0)[0] == SERVER
    assert c.track(2, 22, 1, 100, 6, 0x11, 0, 5.0)[0] == CLIENT


def test_when_connections_end() -> None:
    assert not ended(6, 100.0, 0x11, 0x10, 200.0)  # FIN one way only
    assert ended(6, 100.0, 0x11, 0x11, 106.0) and not ended(6, 100.0, 0x11, 0x11, 105.0)
    assert ended(6, 100.0, 0x04, 0, 106.0)
    assert ended(6, 100.0, 0x10, 0x10, 401.0) and not ended(6, 100.0, 0x10, 0x10, 400.0)
    assert ended(17, 0.0, 0, 0, 61.0) and not ended(17, 0.0, 0, 0, 60.0)
    assert ended(1, 0.0, 0, 0, 61.0)
    assert ended(47, 0.0, 0, 0, 301.0) and not ended(47, 0.0, 0, 0, 299.0)
