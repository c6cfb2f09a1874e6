"""``bench.sender --steer owner``: each NF's flow is steered to the store's owner of the
key its own state is kept under (``NF.flow_map``, ``NF.flow_key``), so that the flow's
objects are made where their key records live: checked against the keys the NFs really
create, on a store of one member per instance."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import store
from bench.sender import steering_of
from bench.traffic import tcp_frame
from nf import registry
from nf.base import ConfigError
from nf.packet import ACK, SYN, Packet, ip_int, parse
from ring.hashring import HashRing, key_token

INSIDE, SERVER = (
    ip_int("10.0.3.4"),
    ip_int("8.8.4.4"),
)  # (below the inside address: the two key orders differ)


def _pair() -> tuple[Packet, Packet]:
    """A connection's first packet out and its reply, as the sender replays them."""
    out = parse(tcp_frame(INSIDE, SERVER, 40000, 80, SYN), 1.0)
    back = parse(tcp_frame(SERVER, INSIDE, 80, 40000, SYN | ACK, outbound=False), 1.1)
    return out, back


@pytest.mark.parametrize("name", ["prads", "ids", "nat"])
def test_both_directions_of_a_connection_go_to_the_owner_of_its_state(name: str) -> None:
    options = ["--inside", "10.0.0.0/8"] if name == "nat" else []
    map_name, key_of = steering_of(registry.load(name), options, None)
    assert map_name == registry.load(name).flow_map
    out, back = _pair()
    assert key_of(out) == key_of(back)
    ring = HashRing(["a:1", "b:2", "c:3"])
    assert ring.owner(key_token(map_name, key_of(out))) == ring.owner(
        key_token(map_name, key_of(back))
    )


@pytest.mark.parametrize("name", ["prads", "ids", "nat"])
def test_the_key_steered_by_is_the_key_the_nf_creates(name: str) -> None:
    """Run the NF on the connection and read the keys of its flow map back."""
    options = ["--inside", "10.0.0.0/8"] if name == "nat" else []
    cls = registry.load(name)
    map_name, key_of = steering_of(cls, options, None)
    out = _pair()[0]

    async def run() -> list[Any]:
        async with store.open_space() as space:
            nf = cls(space, _config(cls, options))
            for packet in _pair():
                unit = space.submit_nowait(nf.flow_key(packet), nf.process, packet)
                assert unit.done() and unit.result() is not None
            return [k[1] for k in space.node.core.objects.objects if k[0] == map_name]

    keys = trio.run(run)
    # (the NAT also makes its connection's reverse entry, under the translated address)
    assert key_of(out) in keys and len(keys) == (2 if name == "nat" else 1)


def _config(cls: Any, options: list[str]) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    return dict(cls.config_from(parser.parse_args(options), {}))


def test_an_nf_without_a_flow_map_needs_one_named() -> None:
    cls = registry.load("prads")

    class NoMap(cls):  # type: ignore[misc,valid-type]
        flow_map = None

    with pytest.raises(ConfigError, match="--owner-map"):
        steering_of(NoMap, [], None)
    assert steering_of(NoMap, [], "prads.connections")[0] == "prads.connections"
