# ruff: noqa: E501  (observed log lines are long)
"""PRADS as an NF: options, configuration, queries, home networks, and cases observed
with the real prads and Debian's signature files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import store
from nf.base import NF, ConfigError
from nf.packet import parse
from nf.prads import HEADER, PRADS, STATISTICS
from tests.nf.prads.driver import run
from tests.nf.prads.frames import NOP, opt_mss, opt_sok, opt_ts, opt_ws, tcp

DEBIAN = Path("/etc/prads")
T = 1_500_000_000.0
LINUX_SYN = opt_mss(1460) + opt_sok() + opt_ts(12345, 0) + NOP + opt_ws(7)


def test_it_is_an_nf_found_by_its_entry_point() -> None:
    from nf.registry import load

    assert load("prads") is PRADS
    assert issubclass(PRADS, NF)
    assert (PRADS.name, PRADS.bidirectional, PRADS.output_query) == ("prads", True, "log")


def test_options_and_configuration(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    PRADS.add_arguments(parser)
    args = parser.parse_args(
        ["--signatures", str(tmp_path), "--home-nets", "10.0.0.0/8, 192.168.1.0/24"]
    )
    config = PRADS.config_from(args, {"prads": {"ack": True}})
    assert config == {
        "ack": True,
        "signatures": str(tmp_path),
        "home_nets": ["10.0.0.0/8", "192.168.1.0/24"],
    }
    none = parser.parse_args([])
    assert PRADS.config_from(none, {}) == {}
    with pytest.raises(ConfigError, match="must be true or false"):
        PRADS.config_from(none, {"syn": "yes"})
    with pytest.raises(ConfigError, match="unknown setting"):
        PRADS.config_from(none, {"sny": True})
    with pytest.raises(ConfigError, match="not a folder"):
        PRADS.config_from(parser.parse_args(["--signatures", str(tmp_path / "x")]), {})
    (tmp_path / "tcp-syn.fp").write_text("garbage\n")
    with pytest.raises(ConfigError, match=r"tcp-syn.fp:1: syntax error"):
        PRADS.config_from(args, {})


async def test_a_bad_folder_or_network_is_a_config_error(tmp_path: Path) -> None:
    async with store.open_space() as space:
        with pytest.raises(ConfigError, match="signatures"):
            PRADS(space, {"signatures": str(tmp_path / "nowhere")})
        with pytest.raises(ConfigError, match="home_nets"):
            PRADS(space, {"home_nets": ["10.0.0.300/8"]})


async def test_queries() -> None:
    frames = [
        (T + 1, tcp("10.0.0.1", 40000, "10.0.0.2", 22, "S", win=5840, ttl=60, opts=LINUX_SYN)),
        (T + 2, tcp("2001:db8::1", 40000, "2001:db8::2", 22, "S", opts=LINUX_SYN, flow=7)),
    ]
    log, nfs = await run(frames)
    assert log[0] == HEADER and len(log) == 3
    assert nfs[0].counts["packets"] == 2
    # the NF is gone with its space; a fresh one answers the rest of the queries
    async with store.open_space() as space:
        nf = PRADS(space, {})
        for ts, frame in frames:
            packet = parse(frame, ts)
            await (await space.submit(nf.flow_key(packet), nf.process, packet))
        stats = await nf.query("statistics")
        assert list(stats)[: len(STATISTICS)] == list(STATISTICS)
        assert stats["tcp_os_assets"] == 2 and stats["sessions"] == 2 and stats["assets"] == 2
        assert stats["ip4_recv"] == 1 and stats["ip6_recv"] == 1
        v4, v6 = await nf.query("assets")
        assert v4["ip"] == "10.0.0.1" and v4["first"] == T + 1 and len(v4["os"]) == 1
        assert v4["services"] == [] and v6["ip"] == "2001:db8::1"
        sigs = await nf.query("signatures")
        assert sigs["tcp-syn.fp"] > 0
        assert await nf.query("seen", ip="10.0.0.1") == (T + 1, T + 1)
        assert await nf.query("seen", ip="2001:db8::1") == (T + 2, T + 2)
        assert await nf.query("seen", ip="10.9.9.9") is None
        assert await nf.query("seen", ip="::a00:1") is None  # not 10.0.0.1
        with pytest.raises(ValueError, match="not an IP address"):
            await nf.query("seen", ip="nope")
        with pytest.raises(KeyError, match="log, assets"):
            await nf.query("nope")


async def test_only_home_networks_are_reported() -> None:
    frames = [
        (T + 1, tcp("10.0.0.1", 40000, "192.168.0.2", 22, "S", win=5840, ttl=60, opts=LINUX_SYN)),
        (
            T + 2,
            tcp(
                "192.168.0.2",
                22,
                "10.0.0.1",
                40000,
                "SA",
                seq=5,
                ack=1001,
                win=5840,
                opts=LINUX_SYN,
            ),
        ),
    ]
    log, _ = await run(frames, {"home_nets": ["192.168.0.0/16"]})
    assert [line.split(",")[0] for line in log[1:]] == ["192.168.0.2"]
    stats, _ = await run(frames, {"home_nets": ["192.168.0.0/16"]}, query="statistics")
    assert stats["sessions"] == 1 and stats["assets"] == 1


async def test_detections_can_be_turned_off() -> None:
    frames = [
        (T + 1, tcp("10.0.0.1", 40000, "10.0.0.2", 22, "S", win=5840, ttl=60, opts=LINUX_SYN))
    ]
    log, _ = await run(frames, {"syn": False})
    assert log == [HEADER]


# Cases observed with prads 0.3.3 and Debian's signature files.
needs_debian = pytest.mark.skipif(not (DEBIAN / "tcp-syn.fp").exists(), reason="no /etc/prads here")


@needs_debian
async def test_observed_cases_with_debians_signatures() -> None:
    c, s = "10.0.0.1", "10.0.0.2"
    frames = [
        (T + 1, tcp(c, 40000, s, 22, "S", win=5840, ttl=60, opts=LINUX_SYN)),
        (
            T + 2,
            tcp(
                s,
                22,
                c,
                40000,
                "SA",
                seq=500,
                ack=1001,
                win=5792,
                opts=opt_mss(1460) + opt_sok() + opt_ts(999, 12345) + NOP + opt_ws(7),
            ),
        ),
        (T + 3, tcp(c, 40000, s, 22, "A", seq=1001, ack=501, ttl=60)),
        (
            T + 4,
            tcp(
                s,
                22,
                c,
                40000,
                "PA",
                seq=501,
                ack=1001,
                payload=b"SSH-2.0-OpenSSH_5.3p1 Debian-3ubuntu7\r\n",
            ),
        ),
        (
            T + 5,
            tcp(
                c, 40000, s, 22, "PA", seq=1001, ack=541, ttl=60, payload=b"SSH-2.0-OpenSSH_5.1\r\n"
            ),
        ),
        (
            T + 6,
            tcp(
                c,
                40001,
                "10.0.0.9",
                80,
                "S",
                win=5840,
                ttl=60,
                opts=opt_mss(1460) + opt_sok() + opt_ts(777, 0) + NOP + opt_ws(7),
            ),
        ),
        (
            T + 7,
            tcp("10.0.0.3", 40002, s, 80, "S", win=1234, ttl=100, df=False, opts=opt_mss(1400)),
        ),
        (T + 8, tcp("10.0.0.5", 40005, "10.0.0.6", 23, "S", opts=LINUX_SYN)),
        (T + 9, tcp("10.0.0.6", 23, "10.0.0.5", 40005, "RA", seq=0, ack=1001, win=0, ip_id=0)),
    ]
    log, _ = await run(frames, {"signatures": str(DEBIAN)})
    assert set(log[1:]) == {
        "10.0.0.1,0,40000,6,SYN,[S4:60:1:60:M1460,S,T,N,W7:.:Linux:2.6 (newer, 7):link:ethernet/modem:uptime:0hrs],4,1500000001",
        "10.0.0.2,0,22,6,SYNACK,[5792:64:1:60:M1460,S,T,N,W7:AT:unknown:unknown:link:ethernet/modem:uptime:0hrs],0,1500000002",
        "10.0.0.2,0,22,6,SERVER,[ssh:OpenSSH 5.3p1 (Protocol 2.0)],0,1500000004",
        "10.0.0.1,0,22,6,CLIENT,[ssh:OpenSSH 5.1 (Protocol 2.0)],4,1500000005",
        "10.0.0.3,0,40002,6,SYN,[1234:100:1:44:M1400:.:unknown:unknown:link:sometimes DSL (2)],28,1500000007",
        "10.0.0.5,0,40005,6,SYN,[S4:64:1:60:M1460,S,T,N,W7:.:Linux:2.6 (newer, 7):link:ethernet/modem:uptime:0hrs],0,1500000008",
        "10.0.0.6,0,23,6,RST,[0:64:1:40:.:K0ZA:Linux:recent 2.4/2.6 (refused)],0,1500000009",
    }


def _conversation(t: float, i: int) -> list[tuple[float, bytes]]:
    c, s = f"10.7.0.{i % 50 + 1}", "10.7.1.1"
    port = 41000 + i
    return [
        (t, tcp(c, port, s, 22, "S", seq=100, opts=LINUX_SYN)),
        (t + 1, tcp(s, 22, c, port, "SA", seq=500, ack=101, opts=LINUX_SYN)),
        (t + 2, tcp(s, 22, c, port, "PA", seq=501, ack=101, payload=b"SSH-2.0-OpenSSH_7.4\r\n")),
        (t + 3, tcp(c, port, s, 22, "FA", seq=101, ack=522)),
        (t + 4, tcp(s, 22, c, port, "FA", seq=522, ack=102)),
    ]


async def test_connections_end_on_packet_time_on_the_instance_that_served_them() -> None:
    # 40 conversations 20 s apart (800 s of packet time, so 13 sweeps), then the first
    # 5-tuple again: a new connection, whose first packet has no role.
    frames = [f for i in range(40) for f in _conversation(T + 20 * i, i)]
    again = _conversation(T + 900, 0)
    frames += [again[2]]  # server data on the old 5-tuple: no role, no line
    one, nfs = await run(frames, query="statistics")
    ended = sum(nf.counts.get("sessions-ended", 0) for nf in nfs)
    assert ended == 40  # all ended (FIN both ways, idle past 5 s) by the sweep at T+900
    assert one["sessions"] == 41
    spread, nfs = await run(frames, instances=2, switch_every=3, query="statistics")
    assert sum(nf.counts.get("sessions-ended", 0) for nf in nfs) == 40
    assert spread == one
    log1, _ = await run(frames)
    log2, _ = await run(frames, instances=2, switch_every=3)
    assert sorted(log1) == sorted(log2)
    assert sum(",SERVER," in line for line in log1) == 1


async def test_the_sweep_moves_no_object() -> None:
    from tests.nf.prads.driver import spaces

    frames = _conversation(T, 1)
    async with spaces(2) as (a, b):
        nfa, nfb = PRADS(a, {}), PRADS(b, {})
        for i, (ts, frame) in enumerate(frames):
            space, nf = (a, nfa) if i == 0 else (b, nfb)  # the flow moves from a to b
            packet = parse(frame, ts)
            await (await space.submit(nf.flow_key(packet), nf.process, packet))
        for nf in (nfa, nfb):
            await nf.tick(T)  # the first tick sets the sweep's clock
        moved = [s.statistics().migrations_in for s in (a, b)]
        assert moved == [0, 1]
        for nf in (nfa, nfb):
            await nf.tick(T + 100)
        assert [s.statistics().migrations_in for s in (a, b)] == moved
        assert nfa.counts.get("sessions-ended", 0) + nfb.counts.get("sessions-ended", 0) == 1
        assert nfa.timers == {} and nfb.timers == {}


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nf.__main__ import main

    pcap = str(Path(__file__).parent / "fixtures" / "udp.pcap")
    assert main(["prads", "--pcap", pcap]) == 0
    out, err = capsys.readouterr()
    want = (Path(__file__).parent / "fixtures" / "udp.ours.log").read_text().splitlines()
    assert sorted(out.splitlines()) == sorted(want)
    assert "prads: 13 packets" in err
    (tmp_path / "tcp-service.sig").write_text("ok,v/a//,x\nbroken line\n")
    assert main(["prads", "--pcap", pcap, "--signatures", str(tmp_path)]) != 0
    _, err = capsys.readouterr()
    assert f"{tmp_path / 'tcp-service.sig'}:2: want service" in err
    assert len(err.strip().splitlines()) == 1
