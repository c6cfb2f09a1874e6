"""The IDS as a network function: its state in the space, its queries, its options, and
the same alerts whatever the number of instances."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import store
from nf.base import ConfigError
from nf.ids import IDS
from nf.ids.nf import DEFAULT_RULES, load_config_rules
from nf.packet import parse
from nf.runner import run
from tests.nf.ids.helpers import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    Capture,
    mixed_traffic,
    run_ids,
    tcp_frame,
    udp_frame,
)

FIXTURES = Path(__file__).parent / "fixtures"
RULES = (
    'alert tcp any any -> any 80 (msg:"hit"; flow:established,to_server; content:"bad"; sid:1;)\n'
)


def test_the_demo_rules_load_cleanly() -> None:
    rs = load_config_rules({})
    assert len(rs.rules) == 10 and not rs.errors and not rs.warnings
    assert DEFAULT_RULES.exists()


async def test_whitelisted_hosts_skip_detection_and_are_counted() -> None:
    c = Capture()
    for client in ("10.0.0.1", "10.7.0.1", "10.0.0.1"):
        c.session(client, 40000 + len(c.packets), "10.0.0.2", 80, [("c", b"bad")])
    c.session("10.0.0.3", 41000, "10.7.0.9", 80, [("c", b"bad")])  # trusted server
    config = {"rules_text": RULES, "whitelist": ["10.7.0.0/16"]}
    async with store.open_space() as space:
        ids = IDS(space, config)
        for ts, frame in c.packets:
            await ids.process(parse(frame, ts))
        await space.flush()
        alerts = await ids.query("alerts")
        trusted = sorted(await ids.query("trusted"))
        stats = await ids.query("statistics")
    assert len(alerts) == 2 and all("10.0.0.1:" in a for a in alerts)
    assert trusted == ["10.7.0.1 8", "10.7.0.9 8"]  # 8 packets per session
    assert stats["whitelisted"] == 16 and stats["packets"] == 32


async def test_flow_contexts_time_out_and_closed_ones_sooner() -> None:
    c = Capture()
    c.session("10.0.0.1", 40000, "10.0.0.2", 80, [("c", b"x")])  # closed by FINs
    c.tcp("10.0.0.1", 40001, "10.0.0.2", 80, SYN)  # left open
    async with store.open_space() as space:
        ids = IDS(space, {"rules_text": RULES, "flow_timeout": 120})
        for ts, frame in c.packets:
            await ids.process(parse(frame, ts))
        t = c.t
        await ids.tick(t + 55)
        assert ids.counts.get("flows-expired", 0) == 0
        await ids.tick(t + 61)  # the closed one: after 60 s (Suricata's closed timeout)
        assert ids.counts["flows-expired"] == 1
        await ids.tick(t + 119)
        assert ids.counts["flows-expired"] == 1
        await ids.tick(t + 121)
        assert ids.counts["flows-expired"] == 2
        assert (await ids.query("statistics"))["flows-tracked"] == 0


async def test_a_flow_times_out_as_suricatas_do_and_starts_over() -> None:
    """A packet 30 s after the last of a one-way flow, 300 s after the last of a two-way
    one, 600 s after the last of an established TCP session starts a new flow (as
    Suricata 7's default timeouts): its IP-only rule alerts again."""
    rules = 'alert ip any any -> any any (msg:"any"; sid:1;)'
    a, b = "10.0.0.1", "10.0.0.2"
    # one way: the same flow after 29.9 s, a new one after 30.1 s
    packets = [(t, udp_frame(a, 1000, b, 53, b"q")) for t in (1.0, 30.9, 61.0)]
    # both ways: the same flow after 299.9 s, a new one after 300.1 s
    for i, t in enumerate((100.0, 101.0, 400.9, 701.0)):
        ends = (a, 2000, b, 53) if i % 2 == 0 else (b, 53, a, 2000)
        packets.append((t, udp_frame(*ends, b"x")))
    c = Capture(t0=1000.0)
    c.session(a, 40000, b, 80, [("c", b"x")], close="none")
    c.add(tcp_frame(a, 40000, b, 80, ACK), gap=599.0)  # established: the same flow
    c.add(tcp_frame(a, 40000, b, 80, ACK), gap=601.0)  # 601 s on: a new one
    result = await run_ids(packets + c.packets, {"rules_text": rules})
    got = [line.split("} ")[1] for line in result.lines]
    assert got.count(f"{a}:1000 -> {b}:53") == 2, got
    assert got.count(f"{a}:2000 -> {b}:53") == 1, got
    assert got.count(f"{b}:53 -> {a}:2000") == 2, got  # at 101.0 and (a new flow) 701.0
    assert got.count(f"{a}:40000 -> {b}:80") == 2, got
    assert got.count(f"{b}:80 -> {a}:40000") == 1, got


async def test_a_new_connection_on_a_closed_five_tuple_starts_over() -> None:
    a, b = "10.0.0.1", "10.0.0.2"
    c = Capture()
    c.session(a, 40000, b, 80, [("c", b"bad")], close="rst")
    c.tcp(a, 40000, b, 80, PSH | ACK, b"bad", seq=2000, ack=1)  # after the RST: not established
    c.session(a, 40000, b, 80, [("c", b"bad")])  # a new handshake: established again
    result = await run_ids(c.packets, {"rules_text": RULES})
    assert len(result.lines) == 2


async def test_udp_is_established_once_both_ways_are_seen() -> None:
    rules = 'alert udp any any <> any any (msg:"u"; flow:established; content:"x"; sid:1;)'
    packets = [
        (1.0, udp_frame("10.0.0.1", 1000, "10.0.0.2", 53, b"x1")),
        (2.0, udp_frame("10.0.0.2", 53, "10.0.0.1", 1000, b"x2")),
        (3.0, udp_frame("10.0.0.1", 1000, "10.0.0.2", 53, b"x3")),
    ]
    result = await run_ids(packets, {"rules_text": rules})
    assert [line.split()[0][-9:] for line in result.lines] == ["02.000000", "03.000000"]


async def test_alerts_per_server_are_bounded_and_counted() -> None:
    rules = 'alert tcp any any -> any any (msg:"syn"; flags:S; sid:1;)'
    packets = [
        (float(i), tcp_frame("10.0.0.1", 1000 + i, "10.0.0.2", 80, SYN)) for i in range(1, 8)
    ]
    async with store.open_space() as space:
        ids = IDS(space, {"rules_text": rules, "alerts_per_server": 3})
        for ts, frame in packets:
            await ids.process(parse(frame, ts))
        await space.flush()
        alerts = await ids.query("alerts")
        servers = await ids.query("servers")
    assert len(alerts) == 3 and alerts[0].startswith("01/01-00:00:01.000000")  # the earliest
    assert servers == ["10.0.0.2 7"]


async def test_queries() -> None:
    async with store.open_space() as space:
        ids = IDS(space, {})
        stats = await ids.query("statistics")
        assert stats["rules"] == 10
        with pytest.raises(KeyError, match="alerts"):
            await ids.query("nonsense")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="no such rules file"):
        IDS.config_from(argparse.Namespace(rules="/nonexistent.rules"), {})
    with pytest.raises(ConfigError, match="whitelist"):
        IDS.config_from(argparse.Namespace(whitelist=["10.0.0.300"]), {})
    with pytest.raises(ConfigError, match="vars"):
        load_config_rules({"vars": ["x"]})


def test_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = tmp_path / "my.rules"
    rules.write_text(
        "var HOME_NET 10.0.0.0/8\n"
        'alert udp any any -> $HOME_NET 9002 (msg:"T2"; content:"USER root"; nocase; sid:5;)\n'
        'alert udp any any -> any any (msg:"broken"; content:"x"; depth:0; sid:6;)\n'
        'alert udp any any -> any any (msg:"isdataat"; isdataat:1; sid:7;)\n'
    )
    status = run(IDS, ["--pcap", str(FIXTURES / "cases.pcap"), "--rules", str(rules)], "nf ids")
    out, err = capsys.readouterr()
    assert status == 0
    assert out.splitlines() == [
        "07/14-02:40:00.030000  [**] [1:5:0] T2 [**] [Priority: 0] {UDP} "
        "10.0.0.1:40002 -> 10.0.0.2:9002"
    ]
    assert f"{rules}:3:" in err and "sid 7: option isdataat" in err
    assert "170 packets" in err
    status = run(IDS, ["--pcap", str(FIXTURES / "cases.pcap"), "--rules", "/nope"], "nf ids")
    out, err = capsys.readouterr()
    assert status == 2 and err.strip() == "ids: /nope: no such rules file" and not out


async def test_the_same_alerts_on_one_instance_three_and_a_scale_out() -> None:
    packets = mixed_traffic(250, seed=7)
    config = {"whitelist": ["10.0.1.5"]}  # one of the five servers is trusted
    one = await run_ids(packets, config)
    assert len(one.lines) > 100 and one.counts["whitelisted"] > 100
    three = await run_ids(packets, config, instances=3)
    assert three.lines == one.lines
    from nf.ids import IDS as cls
    from nf.runner import run_capture

    scaled = await run_capture(cls, config, packets, instances=2, scale_at=0.5)
    assert scaled.lines == one.lines
    for result in (three, scaled):
        for count in ("alerts", "whitelisted", "inspected", "packets"):
            assert result.counts[count] == one.counts[count], count
    assert one.counts["alerts"] == len(one.lines)


# keep the flag names importable for readers of the tests above
_ = (FIN, RST)


async def test_fragments() -> None:
    """The first fragment is inspected and its alert has no ports (as Snort writes it);
    later fragments are not inspected."""
    from tests.nf.ids.helpers import eth_raw

    rules = 'alert udp any any -> any any (msg:"f"; content:"frag"; sid:1;)'
    body = bytes.fromhex("1f90 0050 0020 0000") + b"frag data"
    first = eth_raw(17, 0x0A000001, 0x0A000002, body, 0x2000)
    later = eth_raw(17, 0x0A000001, 0x0A000002, b"frag frag", 0x0003)
    result = await run_ids([(1.0, first), (2.0, later)], {"rules_text": rules})
    assert [x.split("{UDP} ")[1] for x in result.lines] == ["10.0.0.1 -> 10.0.0.2"]
    assert result.counts["fragment-not-inspected"] == 1
    # and the line reads back (no ports: None, as for ICMP)
    from nf.ids.alert import parse_fast_alert

    assert parse_fast_alert(result.lines[0])[3:] == ("UDP", "10.0.0.1", None, "10.0.0.2", None)
    # Suricata's line for a protocol it has no name for reads too
    line = (
        "11/24/2014-17:19:33.663606  [**] [1:1:0] ip [**] [Classification: (null)] "
        "[Priority: 3] {PROTO:240} 204.9.54.80:0 -> 204.9.51.132:0"
    )
    assert parse_fast_alert(line)[3:] == ("PROTO:240", "204.9.54.80", None, "204.9.51.132", None)


def test_classification_files(tmp_path: Path) -> None:
    rules = tmp_path / "site.rules"
    rules.write_text('alert udp any any -> any any (msg:"m"; classtype:odd; sid:1;)\n')
    # no classification.config anywhere that knows "odd": the rule is an error
    assert load_config_rules({"rules": str(rules)}).errors
    (tmp_path / "classification.config").write_text("config classification: odd,Beside,4\n")
    (beside,) = load_config_rules({"rules": str(rules)}).rules
    assert beside.classification is not None and beside.classification.description == "Beside"
    assert beside.priority == 4
    named = tmp_path / "other.config"
    named.write_text("config classification: odd,Named,1\n")
    args = argparse.Namespace(rules=str(rules), classification=str(named))
    (chosen,) = IDS.config_from(args, {})["ruleset"].rules
    assert chosen.classification is not None and chosen.classification.description == "Named"


async def test_ipv6_servers_and_trusted_hosts_are_listed() -> None:
    """The control plane names IPv6 hosts as ``inet_ntop`` does (their keys carry the V6
    bit); a whitelist takes IPv6 networks."""
    from tests.nf.prads.frames import tcp

    rules = 'alert tcp any any -> any any (msg:"syn"; flags:S; sid:1;)'
    packets = [
        (1.0, tcp("2001:db8::1", 1000, "2001:db8::2", 80, "S")),
        (2.0, tcp("2001:db8::1", 1001, "fe80::9", 80, "S")),
        (3.0, tcp("10.0.0.1", 1002, "10.0.0.2", 80, "S")),
    ]
    async with store.open_space() as space:
        ids = IDS(space, {"rules_text": rules, "whitelist": ["fe80::/10"]})
        for ts, frame in packets:
            await ids.process(parse(frame, ts))
        await space.flush()
        servers = sorted(await ids.query("servers"))
        trusted = await ids.query("trusted")
    assert servers == ["10.0.0.2 1", "2001:db8::2 1"]
    assert trusted == ["fe80::9 1"]
