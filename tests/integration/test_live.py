"""Live traffic through real processes on loopback: a controller, two PRADS instances on the
S6 backend, the sender and the sink (``bench.live``), with a scale-out to three instances
and a scale-in back to two while traffic flows.

Every wait is on a process's output line under a deadline (``bench.live.Proc``); the
scaling schedule's pauses only place the events inside the traffic, and the test checks
that they did land inside it rather than trusting them to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.live import LiveConfig, run_live


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work: Path = tmp_path_factory.mktemp("live")
    return run_live(
        LiveConfig(
            nf="prads",
            instances=2,
            rate=1500.0,
            flows=700,
            out_after=0.5,
            in_after=1.0,
            garbage=True,
            workdir=str(work),
        )
    )


def test_every_frame_arrives_once(live: dict[str, Any]) -> None:
    sender, total = live["sender"], live["sink"]["total"]
    assert sender["sent"] > 5000
    assert total["sent"] == sender["sent"]
    assert total["received"] == sender["sent"]
    assert total["lost"] == 0
    assert total["duplicates"] == 0
    # A flow steered to another instance at an event has its next frames held by the
    # sender until the old instance processed the ones it got (test_live_order.py widens
    # that window on purpose): nothing is out of order.
    assert total["reordered"] == 0
    assert total["holes"] == 0


def test_scaling_happened_during_traffic_and_moved_flows(live: dict[str, Any]) -> None:
    kinds = [e["kind"] for e in live["events"]]
    assert kinds == [
        "scale-out started",
        "scale-out steered",
        "scale-in started",
        "scale-in steered",
    ]
    start = live["started_t"]
    for e in live["events"]:
        assert start < e["t"] < live["sender"]["ended_t"], e
    out = [e for e in live["sender"]["events"] if e["kind"] == "scale-out"]
    into = [e for e in live["sender"]["events"] if e["kind"] == "scale-in"]
    assert out[-1]["flows_moved"] > 0 and into[-1]["flows_moved"] > 0
    # Three instances got traffic; the leaver saw the sender's END for what it was sent
    # (every frame sent to it arrived before it left) and left by its SIGTERM.
    per_instance = live["sender"]["per_instance"]
    assert len(per_instance) == 3 and all(n > 0 for n in per_instance.values())
    leaver = live["leaver"]
    assert leaver["leaving"] == "SIGTERM"
    assert leaver["frames"] == per_instance[live["events"][2]["instance"]]
    assert leaver["parked"] == 0


def test_prads_assets_equal_the_offline_run(live: dict[str, Any]) -> None:
    assert "query_error" not in live
    assert live["output_matches_offline"] is True, live["output"]
    assert live["output"]["live_lines"] > 100


def test_a_garbage_datagram_is_counted_and_the_instance_serves_on(live: dict[str, Any]) -> None:
    first_two = [live["instances"][f"instance-{i}"] for i in range(2)]
    for report in first_two:
        assert report["bad_datagrams"] == {"short-header": 1}
        assert report["frames"] > 0
    assert live["instances"]["instance-2"]["bad_datagrams"] == {}


def test_the_run_reports_cpu_and_validity(live: dict[str, Any]) -> None:
    cpu = live["cpu_share_of_core"]
    assert {"sender", "sink", "instance-0", "instance-1"} <= set(cpu)
    assert isinstance(live["valid"], bool)
    if not live["valid"]:
        assert live["invalid_because"]
    assert live["phases"] and all(p["pps"] > 0 for p in live["phases"])


@pytest.mark.parametrize("nf", ["prads", "nat"])
def test_a_ctl_scale_in_during_traffic_loses_nothing(nf: str, tmp_path: Path) -> None:
    """``ctl scale-in`` of an instance: the event's first stage waits while the instance
    tells the sender, which steers its flows away and sends it END, and the instance
    finishes its frames; then its objects are handed on.  Nothing is lost or reordered,
    and the NF's output (PRADS's log, the NAT's table) equals the offline run's: no
    packet of the leaver met an object it had handed on, and no object reached it after
    its hand-over."""
    result = run_live(
        LiveConfig(
            nf=nf,
            instances=2,
            rate=1500.0,
            flows=600,
            out_after=0.5,
            in_after=1.0,
            scale_in_by="ctl",
            workdir=str(tmp_path),
        )
    )
    total = result["sink"]["total"]
    assert total["received"] == result["sender"]["sent"] > 4000
    assert total["lost"] == 0 and total["duplicates"] == 0
    assert total["reordered"] == 0
    assert "query_error" not in result
    assert result["output_matches_offline"], result["output"]
    assert result["leaver"]["leaving"] == "scale-in"
    assert [e["kind"] for e in result["events"]][-1] == "scale-in steered"


def test_outputs_are_compared_as_each_nf_writes_them() -> None:
    """What of a live output line must equal the offline run's: PRADS's asset line
    without its time, the IDS's alert without its time stamp, the NAT's table line
    without its public port, which depends on the instance that allocated it (two
    connections on one public port is a fault of its own)."""
    from bench.live import _comparable, _ports_reused

    assert _comparable("prads", "10.0.0.1,0,80,6,SERVER,[http:x],0,1700000000") == (
        _comparable("prads", "10.0.0.1,0,80,6,SERVER,[http:x],0,1800000000")
    )
    alert = "[**] [1:9:1] m [**] [Priority: 0] {TCP} 1.2.3.4:1 -> 5.6.7.8:80"
    assert _comparable("ids", "07/14-02:40:00.010000  " + alert) == _comparable(
        "ids", "12/05-04:23:20.602799  " + alert
    )
    assert _comparable("ids", "07/14-02:40:00.010000  " + alert) != _comparable(
        "ids", "07/14-02:40:00.010000  " + alert.replace(":80", ":81")
    )
    one = "tcp 10.0.0.1:5000 -> 203.0.113.1:18358 remote 198.51.100.2:25"
    other = "tcp 10.0.0.1:5000 -> 203.0.113.1:58801 remote 198.51.100.2:25"
    assert _comparable("nat", one) == _comparable("nat", other)
    assert _comparable("nat", one) != _comparable("nat", one.replace("5000", "5001"))
    reused = one.replace("10.0.0.1:5000", "10.0.0.2:6000")
    assert _ports_reused([one, other]) == []
    assert _ports_reused([one, reused, other]) == ["tcp -> 203.0.113.1:18358 "]


@pytest.mark.parametrize("nf", ["prads", "ids"])
def test_a_users_ipv6_capture_goes_through_the_cluster_as_offline(nf: str, tmp_path: Path) -> None:
    """A capture the user gives (here the PRADS tests' IPv6 one) is sent once, and the
    cluster's output through the relay equals the offline run's on it."""
    here = Path(__file__).parents[1] / "nf"
    options = ["--rules", str(here / "ids" / "fixtures" / "ipv6.rules")] if nf == "ids" else []
    result = run_live(
        LiveConfig(
            nf=nf,
            instances=2,
            rate=200.0,
            pcap=str(here / "prads" / "fixtures" / "ipv6.pcap"),
            scaling=False,
            nf_options=options,
            workdir=str(tmp_path),
        )
    )
    total = result["sink"]["total"]
    assert total["received"] == result["sender"]["sent"] > 10 and total["lost"] == 0
    assert result["output_matches_offline"] is True, result.get("output")
    assert result["output"]["live_lines"] >= 7


def test_a_loopback_capture_with_64_kib_frames_goes_through_the_cluster_whole(
    tmp_path: Path,
) -> None:
    """A capture taken on Linux's loopback holds frames of up to 65,549 bytes, more than a
    UDP datagram carries: the sender sends such a frame in pieces, the instance puts it
    back together, and the IDS finds a pattern in its last bytes as the offline run does
    (frames between a datagram's size and UDP's limit travel alone, whole, too)."""
    import dpkt

    from bench.traffic import tcp_frame

    client, server = 0x7F000001, 0x7F000002
    payloads = [b"a" * 30_000 + b"MIDDLE", b"b" * 65_487 + b"TAILMARK", b"GET / HTTP/1.1\r\n\r\n"]
    frames = [
        tcp_frame(client, server, 40000, 80, 0x02, seq=1),
        tcp_frame(server, client, 80, 40000, 0x12, seq=1, ack=2),
        tcp_frame(client, server, 40000, 80, 0x10, seq=2, ack=2),
    ]
    seq = 2
    for payload in payloads:
        frames.append(tcp_frame(client, server, 40000, 80, 0x18, payload, seq=seq, ack=2))
        seq += len(payload)
    assert max(len(f) for f in frames) == 65_549  # the largest an IPv4 packet makes
    pcap = tmp_path / "loopback.pcap"
    with pcap.open("wb") as f:
        writer = dpkt.pcap.Writer(f, snaplen=262_144)
        for i, frame in enumerate(frames):
            writer.writepkt(frame, ts=1_700_000_000 + i / 100)
    rules = tmp_path / "big.rules"
    rules.write_text(
        'alert tcp any any -> any 80 (msg:"tail of a 64 KiB frame"; content:"TAILMARK"; '
        "sid:1;)\n"
        'alert tcp any any -> any 80 (msg:"in a 30 KB frame"; content:"MIDDLE"; sid:2;)\n'
    )
    result = run_live(
        LiveConfig(
            nf="ids",
            instances=2,
            rate=100.0,
            pcap=str(pcap),
            scaling=False,
            nf_options=["--rules", str(rules)],
            workdir=str(tmp_path / "work"),
        )
    )
    total = result["sink"]["total"]
    assert total["received"] == result["sender"]["sent"] == len(frames) and total["lost"] == 0
    assert result["output_matches_offline"] is True, result.get("output")
    assert result["output"]["live_lines"] == 2
