"""The NAT: the notes' cases (one translation per flow, replies mapped back, distinct ports,
exhaustion, unsolicited inbound, removal on RST, FINs and idle), and the pool on three
members allocating at once."""

from __future__ import annotations

import random
import struct
from typing import Any

import trio

import store
from bench.traffic import icmp_frame, tcp_frame, udp_frame
from nf.base import Verdict
from nf.nat import NAT
from nf.packet import ACK, FIN, RST, SYN, ip_int, parse
from nf.runner import open_cluster

P = ip_int("203.0.113.1")
CLIENT = ip_int("10.1.0.5")
SERVER = ip_int("93.184.216.34")


def word(frame: bytes | bytearray, at: int) -> int:
    value: int = struct.unpack_from("!H", frame, at)[0]
    return value


async def pool_in_use(nat: NAT) -> int:
    """Ports in use in the pool of the NAT's kind."""
    total = 0
    if nat.single_pool:
        async for _key, whole in nat.whole_pools.items():
            total += whole.count
    else:
        async for _key, shard in nat.pool.items():
            total += shard.count
    return total


async def translations(nat: NAT) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = await nat.query("translations")
    return rows


class Run:
    """A NAT on an embedded space, fed packets by hand."""

    def __init__(self, nat: NAT) -> None:
        self.nat = nat

    async def send(self, frame: bytes, ts: float = 0.0) -> tuple[Verdict, Any]:
        packet = parse(frame, ts)
        return await self.nat.process(packet), packet


def nat_config(**extra: Any) -> dict[str, Any]:
    return {"public": ["203.0.113.1"], "seed": 7, **extra}


async def test_a_new_flow_gets_two_entries_and_one_port_and_replies_map_back() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config())
        run = Run(nat)
        verdict, out = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, SYN))
        assert verdict is Verdict.FORWARD
        assert out.src == P and out.dst == SERVER and out.dport == 80
        port = out.sport
        assert 1024 <= port <= 65535
        again = parse(out.frame, 0.0)  # the frame itself was rewritten
        assert again.flow == (P, SERVER, 6, port, 80)
        rows = await translations(nat)
        assert rows == sorted(
            [
                ((CLIENT, SERVER, 6, 40000, 80), True, P, port),
                ((SERVER, P, 6, 80, port), False, CLIENT, 40000),
            ]
        )
        assert await pool_in_use(nat) == 1
        stats = await nat.query("statistics")
        assert stats["ports-in-use"] == 1 and stats["pool-shards"] == 1
        assert stats["translations"] == 1
        # A second packet of the flow: same port, no pool access.
        made = nat.counts["translations"]
        _, out2 = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, ACK, b"GET /"))
        assert out2.sport == port and nat.counts["translations"] == made
        assert await pool_in_use(nat) == 1
        # The reply: destination back to the client, source unchanged.
        verdict, back = await run.send(tcp_frame(SERVER, P, 80, port, SYN | ACK))
        assert verdict is Verdict.FORWARD
        assert (back.src, back.sport, back.dst, back.dport) == (SERVER, 80, CLIENT, 40000)
        assert await nat.query("table") == [
            f"tcp 10.1.0.5:40000 -> 203.0.113.1:{port} remote 93.184.216.34:80"
        ]


async def test_translated_checksums_are_right() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config())
        packet = parse(tcp_frame(CLIENT, SERVER, 40000, 80, SYN, seq=1, win=65535), 0.0)
        await nat.process(packet)
        frame = bytearray(packet.frame)
        ip_sum = word(frame, 24)
        frame[24:26] = b"\0\0"
        from nf.packet import checksum

        assert checksum(frame[14:34]) == ip_sum
        udp = parse(udp_frame(CLIENT, SERVER, 5353, 53, b"q", checksum=False), 0.0)
        await nat.process(udp)
        assert udp.src == P and word(udp.frame, 14 + 20 + 6) == 0  # 0 stays 0


async def test_distinct_flows_get_distinct_ports_never_0() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config(ports="1-300", shard_size=64))
        run = Run(nat)
        seen = set()
        for i in range(250):
            host = CLIENT + i % 7
            _, out = await run.send(tcp_frame(host, SERVER, 40000 + i // 7, 80, SYN))
            assert out.src == P and out.sport != 0
            seen.add(out.sport)
        assert len(seen) == 250 and await pool_in_use(nat) == 250


async def test_exhaustion_passes_untranslated_without_entries_and_old_flows_still_work() -> None:
    for policy, expected in (("forward", Verdict.FORWARD), ("drop", Verdict.DROP)):
        async with store.open_space() as space:
            nat = NAT(space, nat_config(ports="5000-5001", exhausted=policy))
            run = Run(nat)
            outs = [
                (await run.send(tcp_frame(CLIENT, SERVER, 100 + i, 80, SYN)))[1] for i in (0, 1)
            ]
            assert {o.sport for o in outs} == {5000, 5001}
            verdict, third = await run.send(tcp_frame(CLIENT, SERVER, 102, 80, SYN))
            assert verdict is expected and third.src == CLIENT and third.sport == 102
            assert nat.counts["pool-exhausted"] == 1
            assert len(await translations(nat)) == 4  # two flows, no entries for the third
            _, old = await run.send(tcp_frame(CLIENT, SERVER, 100, 80, ACK))
            assert old.src == P and old.sport == outs[0].sport


class UsedPortsOnly(random.Random):
    """An RNG whose draws always land on port offset 0 (used after the first flow)."""

    def randrange(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        return 0


async def test_draws_on_used_ports_fall_back_to_a_scan() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config(ports="2000-2009", rng=UsedPortsOnly()))
        run = Run(nat)
        ports = [
            (await run.send(tcp_frame(CLIENT, SERVER, 100 + i, 80, SYN)))[1].sport
            for i in range(10)
        ]
        assert sorted(ports) == list(range(2000, 2010))
        _verdict, _ = await run.send(tcp_frame(CLIENT, SERVER, 200, 80, SYN))
        assert nat.counts["pool-exhausted"] == 1


async def test_unsolicited_inbound_follows_the_policy() -> None:
    for policy, expected in (("drop", Verdict.DROP), ("forward", Verdict.FORWARD)):
        async with store.open_space() as space:
            nat = NAT(space, nat_config(unsolicited=policy))
            verdict, p = await Run(nat).send(tcp_frame(SERVER, P, 80, 4444, SYN))
            assert verdict is expected and p.dst == P and p.dport == 4444
            assert nat.counts["unsolicited-inbound"] == 1
            assert await translations(nat) == [] and await pool_in_use(nat) == 0


async def test_other_protocols_and_malformed_frames_are_counted() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config())
        verdict, p = await Run(nat).send(icmp_frame(CLIENT, SERVER))
        assert verdict is Verdict.FORWARD and p.src == CLIENT
        assert nat.counts["not-translated"] == 1
        verdict, _ = await Run(nat).send(b"\x00" * 20)
        assert verdict is Verdict.DROP and nat.counts["not-ip"] == 1
        verdict, _ = await Run(nat).send(tcp_frame(CLIENT, SERVER, 1, 2, RST))
        assert verdict is Verdict.DROP and nat.counts["rst-no-mapping"] == 1
        assert await translations(nat) == []


async def test_rst_removes_both_entries_and_frees_the_port() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config(ports="3000-3000"))
        run = Run(nat)
        _, _out = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, SYN))
        await run.send(tcp_frame(SERVER, P, 80, 3000, SYN | ACK))
        verdict, rst = await run.send(tcp_frame(SERVER, P, 80, 3000, RST | ACK))
        assert verdict is Verdict.FORWARD and rst.dst == CLIENT  # translated, then removed
        assert await translations(nat) == [] and await pool_in_use(nat) == 0
        _, again = await run.send(tcp_frame(CLIENT + 1, SERVER, 40001, 80, SYN))
        assert again.sport == 3000  # the port was reusable


async def test_fins_both_ways_then_grace_then_gone() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config(fin_grace=2.0))
        run = Run(nat)
        _, out = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, SYN), 10.0)
        port = out.sport
        await run.send(tcp_frame(SERVER, P, 80, port, SYN | ACK), 10.1)
        await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, FIN | ACK), 11.0)
        await nat.tick(20.0)  # one FIN: still open
        assert len(await translations(nat)) == 2
        await run.send(tcp_frame(SERVER, P, 80, port, FIN | ACK), 21.0)
        await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, ACK), 21.1)
        await nat.tick(22.0)  # within the grace
        assert len(await translations(nat)) == 2
        await nat.tick(23.5)
        assert await translations(nat) == [] and await pool_in_use(nat) == 0
        assert nat.counts["closed-fin"] == 1


async def test_a_syn_reopens_a_closing_connection_in_both_entries() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config(fin_grace=2.0))
        run = Run(nat)
        _, out = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, SYN), 10.0)
        port = out.sport
        await run.send(tcp_frame(SERVER, P, 80, port, SYN | ACK), 10.1)
        await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, FIN | ACK), 11.0)
        await run.send(tcp_frame(SERVER, P, 80, port, FIN | ACK), 11.1)
        _, again = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, SYN), 12.0)
        assert again.sport == port and nat.counts["reopened"] == 1
        await nat.tick(20.0)  # past the grace: nothing closes, the connection lives on
        assert len(await translations(nat)) == 2
        _, back = await run.send(tcp_frame(SERVER, P, 80, port, SYN | ACK), 20.1)
        assert back.dst == CLIENT


async def test_idle_timeout_needs_both_directions_idle() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config(tcp_idle=10.0, udp_idle=5.0))
        run = Run(nat)
        _, out = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, SYN), 0.0)
        port = out.sport
        await run.send(udp_frame(CLIENT, SERVER, 5353, 53, b"q"), 0.0)
        for t in range(1, 16, 2):  # the server keeps talking; the client is silent
            await run.send(tcp_frame(SERVER, P, 80, port, ACK, b"data"), float(t))
            await nat.tick(float(t))
        rows = await translations(nat)
        assert len(rows) == 2 and all(r[0][2] == 6 for r in rows)  # UDP gone, TCP alive
        await nat.tick(30.0)
        assert await translations(nat) == [] and await pool_in_use(nat) == 0
        assert nat.counts["expired"] == 2


async def test_inside_capture_replies_are_presented_addressed_to_the_translation() -> None:
    async with store.open_space() as space:
        nat = NAT(space, nat_config(inside="10.0.0.0/8"))
        run = Run(nat)
        _, out = await run.send(tcp_frame(CLIENT, SERVER, 40000, 80, SYN))
        assert out.src == P
        reply = tcp_frame(SERVER, CLIENT, 80, 40000, SYN | ACK, outbound=False)
        assert nat.flow_key(parse(reply, 0.0)) == (CLIENT, SERVER, 6, 40000, 80)
        verdict, back = await run.send(reply)
        assert verdict is Verdict.FORWARD and bytes(back.frame) == reply  # there and back
        transit = tcp_frame(SERVER, SERVER + 1, 1, 2, SYN)
        verdict, _ = await run.send(transit)
        assert verdict is Verdict.FORWARD and nat.counts["transit"] == 1
        stray = tcp_frame(SERVER, CLIENT, 80, 41000, ACK)
        verdict, _ = await run.send(stray)
        assert verdict is Verdict.DROP and nat.counts["unsolicited-inbound"] == 1


async def test_three_members_allocating_at_once_never_share_a_port_and_clean_up() -> None:
    """Three NAT instances, each with its own flows, open and close connections at
    once from a pool too small for one shard each: no port is ever held by two live
    connections, and the pool's count matches the live connections at the end.  Then a
    connection served by two members (replies on another one) closes by FINs from both at
    once, and every member's timers clear what is left."""
    config = nat_config(ports="1024-1323", shard_size=40)  # 300 ports, 8 shards
    with trio.fail_after(90):
        async with open_cluster(NAT, config, 3) as cluster:

            async def churn(nats: list[NAT], net: int, public: int) -> None:
                live: dict[int, tuple[int, int]] = {}  # port -> (member, flow)
                errors: list[str] = []

                async def member(i: int) -> None:
                    space, nat = cluster.spaces[i], nats[i]
                    rng = random.Random(i)
                    mine: list[tuple[int, int]] = []
                    for n in range(160):
                        host = ip_int(f"10.{net + i}.0.1") + n % 5
                        packet = parse(tcp_frame(host, SERVER, 20000 + n, 80, SYN), float(n))
                        unit = await space.submit(nat.flow_key(packet), nat.process, packet)
                        await space.node.micro.wait_result(unit)
                        port = packet.sport
                        if packet.src != public:
                            errors.append(f"member {i} flow {n} untranslated")
                            continue
                        if port in live:
                            errors.append(f"port {port} given to {live[port]} and {(i, n)}")
                        live[port] = (i, n)
                        mine.append((port, n))
                        if rng.random() < 0.4:  # close one of this member's connections
                            port, m = mine.pop(rng.randrange(len(mine)))
                            del live[port]
                            host = ip_int(f"10.{net + i}.0.1") + m % 5
                            frame = tcp_frame(host, SERVER, 20000 + m, 80, RST)
                            rst = parse(frame, float(n))
                            unit = await space.submit(nat.flow_key(rst), nat.process, rst)
                            await space.node.micro.wait_result(unit)
                        await trio.sleep(0)

                async with trio.open_nursery() as nursery:
                    for i in range(3):
                        nursery.start_soon(member, i)
                assert errors == []
                for space in cluster.spaces:
                    await space.flush()
                assert await pool_in_use(nats[0]) == len(live)
                rows = await translations(nats[1])
                lo, hi = ip_int(f"10.{net}.0.0"), ip_int(f"10.{net + 3}.0.0")
                forward_ports = sorted(r[3] for r in rows if r[1] and lo <= r[0][0] < hi)
                assert forward_ports == sorted(live)
                if nats is cluster.nfs:
                    claimed = sum(nat.counts.get("shards-claimed", 0) for nat in nats)
                    assert claimed == 8  # every shard was made once, by one member

            await churn(cluster.nfs, 0, P)
            # The same with the paper's pool: one SingleWriter object that moves to every
            # member that allocates or frees (another public address, other clients, the
            # same spaces and entry map).
            other = ip_int("203.0.113.2")
            single_config = {**config, "pool": "single", "public": ["203.0.113.2"]}
            single = [NAT(space, single_config) for space in cluster.spaces]
            await churn(single, 20, other)

            # A connection whose replies are served by another member (its reverse entry
            # moves there), closed by FINs sent by both members at once.
            async def on(i: int, frame: bytes, ts: float) -> Any:
                packet = parse(frame, ts)
                nat = cluster.nfs[i]
                unit = await cluster.spaces[i].submit(nat.flow_key(packet), nat.process, packet)
                return packet, unit

            client = ip_int("10.9.0.1")
            syn, unit = await on(0, tcp_frame(client, SERVER, 50000, 80, SYN), 200.0)
            await cluster.spaces[0].node.micro.wait_result(unit)
            port = syn.sport
            reply, unit = await on(1, tcp_frame(SERVER, P, 80, port, SYN | ACK), 200.1)
            await cluster.spaces[1].node.micro.wait_result(unit)
            assert (reply.dst, reply.dport) == (client, 50000)
            assert cluster.spaces[1].statistics().migrations_in >= 1  # the entry moved
            fin_out, u0 = await on(0, tcp_frame(client, SERVER, 50000, 80, FIN | ACK), 201.0)
            fin_in, u1 = await on(1, tcp_frame(SERVER, P, 80, port, FIN | ACK), 201.0)
            await cluster.spaces[0].node.micro.wait_result(u0)
            await cluster.spaces[1].node.micro.wait_result(u1)
            assert fin_out.src == P and fin_in.dst == client
            for nat in cluster.nfs:
                await nat.tick(201.0 + 240.0 + 1)  # after the grace
            rows = await translations(cluster.nfs[2])
            keys = {(client, SERVER, 6, 50000, 80), (SERVER, P, 6, 80, port)}
            assert not [r for r in rows if r[0] in keys]
            assert sum(nat.counts.get("closed-fin", 0) for nat in cluster.nfs) == 1
            # Every member sweeps its own entries: after the idle timeout nothing is left.
            for nat in [*cluster.nfs, *single]:
                await nat.tick(1e6)
            for space in cluster.spaces:
                await space.flush()
            assert await translations(cluster.nfs[0]) == []
            assert await pool_in_use(cluster.nfs[1]) == 0
            assert await pool_in_use(single[2]) == 0


async def test_a_full_pool_is_not_asked_shard_by_shard_for_every_new_flow() -> None:
    """Two instances, a pool of four shards all claimed and filled by the first: a burst of
    new flows at the second asks the others' shards for a free port once, then, for a
    second of the NF's clock, only its own (each ask of a shard elsewhere is a round trip;
    asking every shard for every new flow made a full NAT many times slower)."""
    config = nat_config(ports="5000-5007", shard_size=2)  # 8 ports, 4 shards
    with trio.fail_after(60):
        async with open_cluster(NAT, config, 2) as cluster:
            (space_a, space_b), (nat_a, nat_b) = cluster.spaces, cluster.nfs

            async def flow(space: Any, nat: NAT, host: int, sport: int, ts: float) -> Any:
                packet = parse(tcp_frame(host, SERVER, sport, 80, SYN), ts)
                unit = await space.submit(nat.flow_key(packet), nat.process, packet)
                await space.node.micro.wait_result(unit)
                return packet

            for n in range(8):  # a takes every port, claiming every shard
                got = await flow(space_a, nat_a, CLIENT, 30000 + n, float(n))
                assert got.src == P
            before = space_b.statistics().remote_calls
            for n in range(20):  # b's new flows, within a second
                got = await flow(space_b, nat_b, CLIENT + 1, 40000 + n, 10.0 + n / 100)
                assert got.src == CLIENT + 1  # untranslated: the pool is full
            asked = space_b.statistics().remote_calls - before
            assert nat_b.counts["pool-exhausted"] == 20
            assert asked <= 8, f"{asked} calls to other shards for 20 new flows"


async def _reverse_keys_after(config: dict[str, Any], flows: int) -> tuple[str, list[Any], Any]:
    """``flows`` new connections through the first of two members: its name, the reverse
    entries' keys, and the space (to ask owners and holdings)."""
    async with open_cluster(NAT, config, 2) as cluster:
        space, nat = cluster.spaces[0], cluster.nfs[0]
        reverse = []
        for n in range(flows):
            packet = parse(tcp_frame(CLIENT, SERVER + n, 40000 + n, 80, SYN), float(n))
            unit = await space.submit(nat.flow_key(packet), nat.process, packet)
            await space.node.micro.wait_result(unit)
            assert packet.src == P
            reverse.append((SERVER + n, P, 6, 80, packet.sport))
        held = {k[1] for k in space.node.core.objects.objects if k[0] == "nat.entries"}
        rows = [(key, space.owner_of("nat.entries", key), key in held) for key in reverse]
        return space.name, rows, space.owner_of("nat.pool", nat.claimed[0])


async def test_a_new_connection_gets_a_port_whose_reverse_entry_is_keyed_here() -> None:
    """On a ring of two, the port a connection gets makes its reverse entry's key one the
    allocating instance owns, so it makes that entry itself without a round trip (the
    port decides the key; any free port would do for the connection), and its first shard
    is one whose key it owns.  Without ``reply_here``, about half would be the other's."""
    with trio.fail_after(60):
        me, rows, claimed_owner = await _reverse_keys_after(nat_config(), 40)
        assert all(owner == me and held for _key, owner, held in rows), rows
        assert claimed_owner == me
        me, rows, _ = await _reverse_keys_after(nat_config(reply_here=False), 40)
        assert any(owner != me for _key, owner, _held in rows)
