"""Our asset log against the real prads 0.3.3's, on captures of our own.

The fixtures (``fixtures/NAME.pcap`` and what prads wrote for it) come from
``python -m tests.nf.prads.make_fixtures``; these tests do not need prads installed.  With
our signature set the lines must be the same, timestamps included, and the statistics
prads prints at its end must be ours; with Debian's full set (``/etc/prads``, where the
``prads`` package is installed) the lines must be the same too.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nf.prads import HEADER
from tests.nf.prads.driver import load, run
from tests.nf.prads.make_fixtures import (
    FOREIGN,
    LEFT_OUT,
    SCENARIOS,
    SETTINGS,
    SNAPLEN,
    signature_folder,
)

FIXTURES = Path(__file__).parent / "fixtures"
DEBIAN = Path("/etc/prads")

#: prads's statistics labels -> our statistics names.
LABELS = {
    "packets received from libpcap": "got_packets",
    "Ethernet packets received": "eth_recv",
    "VLAN packets received": "vlan_recv",
    "ARP packets received": "arp_recv",
    "IPv4 packets received": "ip4_recv",
    "IPv6 packets received": "ip6_recv",
    "Other link packets received": "otherl_recv",
    "IPinIPv4 packets received": "ip4ip_recv",
    "IPinIPv6 packets received": "ip6ip_recv",
    "GRE packets received": "gre_recv",
    "TCP packets received": "tcp_recv",
    "UDP packets received": "udp_recv",
    "ICMP packets received": "icmp_recv",
    "Other transport packets received": "othert_recv",
    "sessions tracked": "sessions",
    "assets detected": "assets",
    "TCP OS fingerprints detected": "tcp_os_assets",
    "UDP OS fingerprints detected": "udp_os_assets",
    "ICMP OS fingerprints detected": "icmp_os_assets",
    "DHCP OS fingerprints detected": "dhcp_os_assets",
    "TCP service assets detected": "tcp_services",
    "TCP client assets detected": "tcp_clients",
    "UDP service assets detected": "udp_services",
    "UDP client assets detected": "udp_clients",
}


def recorded(name: str, suffix: str) -> list[str]:
    return (FIXTURES / f"{name}.{suffix}").read_text(encoding="latin-1").splitlines()


def prads_statistics(name: str) -> dict[str, int]:
    out = {}
    for line in recorded(name, "ours.stats"):
        label, _, value = line.removeprefix("-- Total ").partition(":")
        out[LABELS[label.strip()]] = int(value)
    return out


def config(name: str, signatures: str | None = None) -> dict[str, object]:
    conf = dict(SETTINGS.get(name, ("", {}))[1])
    if signatures is not None:
        conf["signatures"] = signatures
    return conf


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_same_lines_as_prads_with_our_signatures(name: str, tmp_path: Path) -> None:
    folder = signature_folder(name, tmp_path)
    lines, _ = await run(load(FIXTURES / f"{name}.pcap"), config(name, str(folder)))
    want = recorded(name, "ours.log")
    assert lines[0] == HEADER == want[0]
    # the same lines, each as often, timestamps included (and ours oldest first)
    assert Counter(lines) == Counter(want), (
        f"ours only: {sorted(set(lines) - set(want))}\nprads only: {sorted(set(want) - set(lines))}"
    )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_same_statistics_as_prads(name: str, tmp_path: Path) -> None:
    folder = signature_folder(name, tmp_path)
    frames = load(FIXTURES / f"{name}.pcap")
    stats, _ = await run(frames, config(name, str(folder)), query="statistics")
    want = prads_statistics(name)
    assert {k: stats[k] for k in want} == want


@pytest.mark.skipif(not (DEBIAN / "tcp-syn.fp").exists(), reason="no /etc/prads here")
@pytest.mark.parametrize("name", sorted(set(SCENARIOS) - set(LEFT_OUT)))
async def test_same_lines_as_prads_with_debians_signatures(name: str) -> None:
    lines, _ = await run(load(FIXTURES / f"{name}.pcap"), config(name, str(DEBIAN)))
    want = recorded(name, "debian.log")
    assert Counter(lines) == Counter(want), (
        f"ours only: {sorted(set(lines) - set(want))}\nprads only: {sorted(set(want) - set(lines))}"
    )


async def test_fixtures_are_what_the_script_makes() -> None:
    """The committed captures are the script's (so a change to it is a new fixture)."""
    from tests.nf.prads.frames import read_pcap

    for name, make in SCENARIOS.items():
        if name in FOREIGN:
            continue
        frames = make()
        stored = read_pcap(str(FIXTURES / f"{name}.pcap"))
        cut = SNAPLEN.get(name)
        assert [f for _, f in stored] == [f[:cut] for _, f in frames], name
        assert [round(t, 6) for t, _ in stored] == [round(t, 6) for t, _ in frames], name
