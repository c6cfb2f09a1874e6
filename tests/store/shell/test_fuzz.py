"""A fuzzer of the wire against a live node and a live controller, before and after
authentication; and the attacks on the door of issue 9 as regression tests.

The fuzzer sends random frames (random bytes, random cbor values) and mutated ones (valid
frames of every registered message type, with bytes flipped, inserted, deleted, spliced,
or replaced by hostile cbor: a 4,400-digit bignum, deep nesting, an absurd length, a
refused tag).  Before authentication each connection carries one or two of them and must
end as one counted refusal (``handshake_failures`` or ``auth_failures``); after it, on a
link that proved the secret, every frame must be counted as received and the link must
stay up.  Nothing may crash (the suite runs with ``S6_RAISE_BUGS=1``: a bug of ours raises),
the process's memory must stay bounded, and afterwards the node still serves a real call
from another node and the controller a real status request.

``S6_FUZZ_FRAMES`` sets the number of frames (20,000 by default, about 10 % of them
before authentication; a million for a long run), ``S6_FUZZ_SEED`` the seed (fixed by
default, so that a red run can be repeated).
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import random
import resource
import types
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
import trio

from ring.hashring import HashRing
from store import SingleWriter
from store.api import Space
from store.shell.controller import Controller, open_controller
from store.shell.node import Node, open_node
from store.shell.transport import (
    HANDSHAKE_MAX_FRAME,
    MAX_UNAUTHENTICATED,
    WireStatistics,
    connect_peer,
    proof_mac,
)
from store.wire.control import ClusterStatus, StatusRequest, parse_address
from store.wire.errors import PeerUnavailable, classify
from store.wire.messages import (
    WIRE_VERSION,
    Error,
    Hello,
    Proof,
    Welcome,
    decode_batch,
    encode_batch,
    encode_message,
    frame_from_encoded,
    registered_tags,
)
from tests.store.shell.test_transport import EMPTY_ARRAYS_HEADER, RawWebSocket, open_fds

SECRET = b"fuzz secret"
FRAMES = int(os.environ.get("S6_FUZZ_FRAMES", "20000"))
SEED = int(os.environ.get("S6_FUZZ_SEED", "9"))
PRE_AUTH_SHARE = 0.1  # of the frames, sent before authentication
CONCURRENT = 8  # pre-authentication connections at once (under the door's limit)
WINDOW = 32  # frames in flight on an authenticated link
MAX_FUZZ_FRAME = 64 * 1024
RSS_GROWTH = 200 * 1024 * 1024  # bytes the process may grow by while fuzzed
DEADLINE = 60.0


class Checked(SingleWriter):
    """The object of the real calls made after the fuzzing."""

    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n


# --- what the fuzzer sends ----------------------------------------------------------------


_STRINGS = ["", "m", "fuzz", "fuzzer", "127.0.0.1:1", "x" * 30, "normal", "é"]


def _sample(hint: Any, rng: random.Random, depth: int = 0) -> Any:
    """A value of the wire type ``hint``: right in type, random in meaning."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return rng.choice([None, 1, "x", b"y", [1, "a"], {"k": 1}, 2.5, True])
    if origin is typing.Annotated:  # a Key
        return rng.choice([("k", 1), "flow", 7, (b"\x01", 80, ("a", 2)), ()])
    if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        return rng.choice(list(hint))
    if hint is bool:
        return rng.random() < 0.5
    if hint is int:
        return rng.choice([0, 1, 2, 7, 255, 2**31, 2**63 - 1, -1])
    if hint is float:
        return rng.choice([0.0, 1.5, -1.0])
    if hint is str:
        return rng.choice(_STRINGS)
    if hint is bytes:
        return rng.randbytes(rng.choice([0, 1, 32]))
    if hint is None or hint is type(None):
        return None
    if origin is typing.Union or origin is types.UnionType:
        return _sample(rng.choice(args), rng, depth)
    count = 0 if depth > 2 else rng.randint(0, 2)
    if hint is list or origin is list:
        return [_sample(args[0] if args else Any, rng, depth + 1) for _ in range(count)]
    if hint is tuple or origin is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_sample(item, rng, depth + 1) for _ in range(count))
        return tuple(_sample(a, rng, depth + 1) for a in args if a != ())
    if hint is dict or origin is dict:
        key, value = args if args else (str, Any)
        return {_sample(key, rng, depth + 1): _sample(value, rng, depth + 1) for _ in range(count)}
    raise TypeError(f"no sample for {hint!r}")


def sample_messages(rng: random.Random) -> list[Any]:
    """One message of every registered type (the transport's, the object space's, the
    controller's, the tests'), with fields of the right types."""
    out = []
    for cls in registered_tags().values():
        hints = typing.get_type_hints(cls, include_extras=True)
        for _ in range(50):  # a __post_init__ may refuse some values: try others
            values = [_sample(hints[f], rng) for f in cls.__dataclass_fields__]
            try:
                msg = cls(*values)
                encode_message(msg)
            except (TypeError, ValueError):
                continue
            out.append(msg)
            break
    return out


def _random_cbor(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.randint(-(2**70), 2**70)
    if kind == 1:
        return rng.randint(0, 40)
    if kind == 2:
        return rng.choice(_STRINGS)
    if kind == 3:
        return rng.randbytes(rng.randint(0, 8))
    if kind == 4:
        return rng.choice([None, True, False, 1.5, float("nan"), float("inf")])
    if kind == 5:
        return rng.choice(list(registered_tags()))
    if kind == 6:
        return [_random_cbor(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    if kind == 7:
        return {
            rng.choice(_STRINGS): _random_cbor(rng, depth + 1) for _ in range(rng.randint(0, 3))
        }
    return [rng.choice(list(registered_tags())), *(_random_cbor(rng, depth + 1) for _ in range(3))]


# Hostile cbor to splice in: a 4,400-digit bignum, nesting far too deep, an array and a
# string of absurd declared length, indefinite-length starts and breaks, refused tags.
_HOSTILE = [
    cbor2.dumps(10**4400),
    cbor2.dumps(-(10**4400)),
    b"\x81" * 200 + b"\x00",
    b"\x9b\x00\x00\x00\xff\xff\xff\xff\xff",
    b"\x7b\x00\x00\x00\xff\xff\xff\xff\xff",
    b"\x9f\x9f\x9f",
    b"\xff",
    bytes.fromhex("d81c8201d81d00"),
    bytes.fromhex("d82363612862"),
    b"\xc2\x59\x10\x00" + b"\x01" * 4096,
    b"\xc4\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\xc5\x82\x1a\x00\x98\x96\x80\x01",
    b"\xd9\xd9\xf7",
    b"\xf8\x20",
]


def mutate(frame: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(8)
        at = rng.randint(0, len(data))
        if choice == 0 and data:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice == 1:  # insert random bytes
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 2 and data:  # delete a slice
            del data[at : at + rng.randint(1, 8)]
        elif choice == 3:  # truncate
            del data[at:]
        elif choice == 4 and data:  # duplicate a slice
            start = rng.randrange(len(data))
            data[at:at] = data[start : start + rng.randint(1, 16)]
        elif choice == 5:  # splice with another frame
            other = rng.choice(corpus)
            data[at:] = other[rng.randint(0, len(other)) :]
        elif choice == 6:  # hostile cbor
            data[at:at] = rng.choice(_HOSTILE)
        elif data:  # the tag of the first message: another registered one
            data[2 if len(data) > 2 else 0] = rng.randrange(64)
    return bytes(data[:MAX_FUZZ_FRAME])


@dataclass
class Fuzzer:
    rng: random.Random
    corpus: list[bytes] = field(default_factory=list)

    @classmethod
    def make(cls, seed: int) -> Fuzzer:
        rng = random.Random(seed)
        messages = sample_messages(rng)
        corpus = [encode_batch([m]) for m in messages]
        for _ in range(200):  # batches of several messages too
            batch = rng.sample(messages, rng.randint(2, 6))
            corpus.append(frame_from_encoded([encode_message(m) for m in batch]))
        return cls(rng, corpus)

    def frame(self) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.1:
            return rng.randbytes(rng.randint(0, 200))
        if kind < 0.25:
            return cbor2.dumps([_random_cbor(rng) for _ in range(rng.randint(0, 4))])
        if kind < 0.3:
            return rng.choice(self.corpus)  # valid as it is
        return mutate(rng.choice(self.corpus), rng, self.corpus)

    def hello(self) -> bytes:
        rng = self.rng
        hello = Hello(WIRE_VERSION, "fuzzer", rng.randbytes(32), 1 << 20)
        frame = encode_batch([hello])
        return frame if rng.random() < 0.5 else mutate(frame, rng, self.corpus)


# --- driving the targets ------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    statistics: Callable[[], WireStatistics]


async def pre_auth_connection(target: Target, fuzzer: Fuzzer) -> int:
    """One connection from a stranger: an upgrade (or not) and one or two fuzzed frames,
    then it hangs up its side and reads until the server closes.  Returns the frames sent."""
    rng = fuzzer.rng
    ws = await RawWebSocket.connect(target.port, upgrade=False)
    sent = 0
    try:
        kind = rng.random()
        if kind < 0.03:
            pass  # connect and close
        elif kind < 0.06:
            await ws.stream.send_all(rng.randbytes(rng.randint(1, 300)))  # not even HTTP
        else:
            await ws.upgrade()
            if kind < 0.1:
                await ws.stream.send_all(rng.randbytes(rng.randint(1, 64)))  # not a frame
            else:
                first = fuzzer.hello() if rng.random() < 0.4 else fuzzer.frame()
                if rng.random() < 0.05:
                    first = first * (HANDSHAKE_MAX_FRAME // max(1, len(first)) + 1)  # too big
                await ws.send_frame(first, opcode=0x1 if rng.random() < 0.02 else 0x2)
                sent += 1
                if rng.random() < 0.5:
                    await ws.send_frame(fuzzer.frame())  # where the Proof would be
                    sent += 1
        await ws.stream.send_eof()
        while await ws.receive_frame() is not None:
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the server reset a connection it refused: fine
    finally:
        await ws.aclose()
    return sent


async def authenticate(port: int, name: str = "fuzzer") -> RawWebSocket:
    ws = await RawWebSocket.connect(port)
    nonce = os.urandom(32)
    await ws.send_frame(encode_batch([Hello(WIRE_VERSION, name, nonce, 1 << 20)]))
    frame = await ws.receive_frame()
    assert frame is not None
    [hello] = decode_batch(frame[1])
    assert isinstance(hello, Hello)
    mac = proof_mac(
        SECRET,
        role="client",
        challenge=hello.nonce,
        prover=name,
        verifier=hello.name,
        prover_nonce=nonce,
    )
    await ws.send_frame(encode_batch([Proof(mac)]))
    frame = await ws.receive_frame()
    assert frame is not None
    assert isinstance(decode_batch(frame[1])[-1], Welcome)
    return ws


def bad_frames(stats: WireStatistics) -> int:
    return stats.frames_malformed + stats.frames_unknown_type


@dataclass
class Tally:
    pre_auth_connections: int = 0
    pre_auth_frames: int = 0
    post_auth_frames: int = 0
    errors_back: int = 0


async def fuzz_before_authentication(target: Target, fuzzer: Fuzzer, frames: int) -> Tally:
    tally = Tally()
    limit = trio.CapacityLimiter(CONCURRENT)

    async def one() -> None:
        async with limit:
            sent = await pre_auth_connection(target, fuzzer)
            tally.pre_auth_frames += sent
            tally.pre_auth_connections += 1

    while tally.pre_auth_frames < frames:
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENT * 4):
                nursery.start_soon(one)
    return tally


async def fuzz_after_authentication(target: Target, fuzzer: Fuzzer, frames: int) -> Tally:
    """Fuzzed frames on one authenticated link, at most WINDOW of them not yet counted by
    the server; the server's answers (Errors, whatever else) are read all along."""
    tally = Tally()
    ws = await authenticate(target.port)
    if target.name == "controller":
        # The first message after the handshake decides the session: a Register (or
        # Resume) under another name than the one authenticated is refused and the
        # session ends, on purpose.  The fuzzer's first batch is one now and then (its
        # random source is shared with the concurrent connections before), so the link
        # first becomes an operator's, as ``ctl``'s does; a Register in an operator's
        # session is refused and the link stays.
        counted = target.statistics().frames_received
        await ws.send_frame(encode_batch([StatusRequest(1)]))
        tally.post_auth_frames += 1
        while target.statistics().frames_received == counted:
            await trio.sleep(0.001)
    base = target.statistics().frames_received
    base_bad = bad_frames(target.statistics())
    closed = trio.Event()
    # What the server said last (its last Errors, its close frame): why, should it close.
    said: collections.deque[str] = collections.deque(maxlen=4)

    async def read() -> None:
        while (frame := await ws.receive_frame()) is not None:
            opcode, payload = frame
            if opcode == 0x2:
                errors = [m for m in decode_batch(payload) if isinstance(m, Error)]
                tally.errors_back += len(errors)
                said.extend(f"{e.code}: {e.text[:200]}" for e in errors[-2:])
            elif opcode == 0x8:
                said.append(f"close {payload[:2].hex()} {payload[2:200]!r}")
        closed.set()

    def why() -> str:
        return f"{target.name} closed an authenticated link; it said last: {list(said)}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for i in range(frames):
            while i - (target.statistics().frames_received - base) >= WINDOW:
                assert not closed.is_set(), why()
                await trio.sleep(0.0005)
            frame = fuzzer.frame()
            if fuzzer.rng.random() < 0.01:  # a text frame (valid UTF-8, or the websocket
                # library itself would close the link: not ours to count)
                await ws.send_frame(frame.decode("latin-1").encode(), opcode=0x1)
            else:
                await ws.send_frame(frame)
            tally.post_auth_frames += 1
        while target.statistics().frames_received - base < frames:
            assert not closed.is_set(), why()
            await trio.sleep(0.001)
        while tally.errors_back < bad_frames(target.statistics()) - base_bad:
            await trio.sleep(0.001)  # the last Errors are on their way
        assert not closed.is_set()
        await ws.aclose()
        nursery.cancel_scope.cancel()
    return tally


@dataclass
class Targets:
    """Spaces on the fuzzed node and on the other node of its ring."""

    fuzzed: Space
    other: Space
    checks: int = 0


@asynccontextmanager
async def live_targets() -> AsyncIterator[tuple[Node, Targets, Controller]]:
    """A node (fuzzed), a second node in its ring (to check real calls afterwards), and a
    controller (fuzzed)."""
    async with AsyncExitStack() as stack:
        fuzzed = await stack.enter_async_context(open_node(listen="127.0.0.1:0", secret=SECRET))
        other = await stack.enter_async_context(open_node(listen="127.0.0.1:0", secret=SECRET))
        ring = HashRing([fuzzed.name, other.name])
        fuzzed.set_ring(ring)
        other.set_ring(ring)
        ctl = await stack.enter_async_context(open_controller(secret=SECRET, manual_admission=True))
        yield fuzzed, Targets(Space(fuzzed), Space(other)), ctl


def node_target(node: Node) -> Target:
    return Target("node", parse_address(node.name)[1], node.wire_statistics)


def controller_target(ctl: Controller) -> Target:
    return Target("controller", parse_address(ctl.address)[1], ctl.wire_statistics)


async def still_serves(node: Node, spaces: Targets, ctl: Controller) -> None:
    """Real work through the fuzzed processes: objects made on the other node move to the
    fuzzed one and back (the key authority of about half of them is the fuzzed node), and
    a status request to the controller."""
    await calls(spaces)
    host, port = parse_address(ctl.address)
    async with connect_peer(host, port, secret=SECRET, name="ops") as ops:
        ops.send_nowait(StatusRequest(7))
        while True:
            batch = await ops.receive()
            if any(isinstance(m, ClusterStatus) and m.request_id == 7 for m in batch):
                break


async def calls(spaces: Targets) -> None:
    spaces.checks += 1
    there = spaces.other.map(f"checked-{spaces.checks}", Checked)
    here = spaces.fuzzed.map(f"checked-{spaces.checks}", Checked)
    for i in range(10):
        async with there.create(f"k{i}") as ref:
            assert await ref.bump() == 1
        async with here.get(f"k{i}") as ref:  # moves to the fuzzed node
            assert await ref.bump() == 2
        async with there.get(f"k{i}") as ref:  # and back
            assert await ref.bump() == 3


def rss() -> int:
    """Bytes of this process resident in memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@asynccontextmanager
async def memory_watch() -> AsyncIterator[list[int]]:
    """Samples the resident size every 20 ms while the block runs: [baseline, highest]."""
    seen = [rss(), rss()]

    async def sample() -> None:
        while True:
            seen[1] = max(seen[1], rss())
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        yield seen
        seen[1] = max(seen[1], rss())
        nursery.cancel_scope.cancel()


def bugs(counters: dict[str, int]) -> dict[str, int]:
    """The counters of bugs of ours (or of no known class: as suspicious)."""

    def suspicious(name: str) -> bool:
        try:
            return classify(name) == "bug"
        except ValueError:
            return True

    return {name: n for name, n in counters.items() if suspicious(name)}


# --- the fuzzer ---------------------------------------------------------------------------


async def test_the_wire_survives_random_and_mutated_frames_before_and_after_authentication(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One WARNING line per refused frame is the rule (tested in test_transport.py); here
    # they would only fill pytest's capture (a million lines on a long run).
    caplog.set_level(logging.CRITICAL, logger="store")
    fuzzer = Fuzzer.make(SEED)
    pre_auth = int(FRAMES * PRE_AUTH_SHARE) // 2
    post_auth = (FRAMES - 2 * pre_auth) // 2
    with trio.fail_after(DEADLINE + FRAMES / 1000):
        async with live_targets() as (node, spaces, ctl), memory_watch() as memory:
            await still_serves(node, spaces, ctl)
            fds_before = open_fds()
            for target in (node_target(node), controller_target(ctl)):
                start = target.statistics()
                before = await fuzz_before_authentication(target, fuzzer, pre_auth)
                while True:  # the server counts each refusal as the connection ends
                    middle = target.statistics()
                    refused = middle.handshake_failures - start.handshake_failures
                    refused += middle.auth_failures - start.auth_failures
                    if refused >= before.pre_auth_connections:
                        break
                    await trio.sleep(0.01)
                assert refused == before.pre_auth_connections, target.name
                assert middle.peers_connected == start.peers_connected, target.name
                assert middle.connections_refused == start.connections_refused, target.name

                after = await fuzz_after_authentication(target, fuzzer, post_auth)
                end = target.statistics()
                assert end.frames_received - middle.frames_received == after.post_auth_frames
                bad = bad_frames(end) - bad_frames(middle)
                assert after.errors_back >= bad > after.post_auth_frames // 2, target.name
                assert end.errors == {}, target.name  # no bug of the transport's
            assert bugs(node.core.statistics().errors) == {}
            assert bugs(node.errors) == {}
            assert bugs(ctl.errors) == {}
            await still_serves(node, spaces, ctl)
            await trio.sleep(0.1)  # the last links' sockets close
            assert open_fds() <= fds_before + 4
    assert memory[1] - memory[0] < RSS_GROWTH, f"grew by {memory[1] - memory[0]} bytes"


# --- the attacks of issue 9, on a live node and controller --------------------------------


async def test_a_huge_integer_before_authentication_kills_neither_node_nor_controller() -> None:
    frame = cbor2.dumps([[1, 10**4400, "n", b"n" * 32, 4096]])
    assert len(frame) < 2100
    with trio.fail_after(DEADLINE):
        async with live_targets() as (node, spaces, ctl):
            for target in (node_target(node), controller_target(ctl)):
                ws = await RawWebSocket.connect(target.port)
                await ws.send_frame(frame)
                await ws.messages_until_closed()
                await ws.aclose()
                while target.statistics().handshake_failures < 1:
                    await trio.sleep(0.01)
                assert target.statistics().frames_malformed == 1
            await still_serves(node, spaces, ctl)


async def test_four_16_mb_frames_before_authentication_stall_nobody() -> None:
    """Four strangers sending 16 MB of empty cbor arrays each used to take a node to
    1.2 GB each and block its loop for 7 s: every member stalled for half a minute.  Now
    each is refused after a few KiB; meanwhile the nodes go on serving calls."""
    chunk = b"\x80" * 65536
    total = 16 * 1024 * 1024
    with trio.fail_after(DEADLINE):
        async with live_targets() as (node, spaces, ctl), memory_watch() as memory:
            await still_serves(node, spaces, ctl)
            codes: list[int | None] = []

            async def flood(port: int) -> None:
                ws = await RawWebSocket.connect(port)
                await ws.stream.send_all(ws.header(total) + EMPTY_ARRAYS_HEADER)
                async with trio.open_nursery() as nursery:

                    async def read() -> None:
                        codes.append((await ws.messages_until_closed(answer_close=False))[1])

                    nursery.start_soon(read)
                    try:
                        for _ in range(total // len(chunk)):
                            await ws.stream.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                await ws.aclose()

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for port in [node_target(node).port] * 3 + [controller_target(ctl).port]:
                    nursery.start_soon(flood, port)
                checked = spaces.other.map("during-flood", Checked)
                for i in range(10):  # served while the floods arrive
                    async with checked.create(f"f{i}") as ref:
                        assert await ref.bump() == 1
            assert trio.current_time() - started < 5.0
            assert codes == [1009] * 4
            assert node.wire_statistics().frames_too_large == 3
            assert ctl.wire_statistics().frames_too_large == 1
            await still_serves(node, spaces, ctl)
    # The four floods' chunks are one shared 64 KiB buffer: what grows is the servers'.
    assert memory[1] - memory[0] < 50 * 1024 * 1024, f"grew by {memory[1] - memory[0]} bytes"


async def test_a_connect_and_close_flood_holds_no_file_descriptors() -> None:
    """About 20,000 connect-and-close in a few seconds used to exhaust the descriptors
    (each closed socket held 10 s).  2,000 here, 50 at a time, on both listeners."""
    count = 1000
    with trio.fail_after(DEADLINE):
        async with live_targets() as (node, spaces, ctl):
            await still_serves(node, spaces, ctl)
            before = open_fds()
            targets = (node_target(node), controller_target(ctl))
            started = trio.current_time()

            async def hang_up(port: int) -> None:
                ws = await RawWebSocket.connect(port, upgrade=False)
                await ws.aclose()

            for target in targets:
                for _ in range(0, count, 50):
                    async with trio.open_nursery() as nursery:
                        for _ in range(50):
                            nursery.start_soon(hang_up, target.port)
            for target in targets:
                while target.statistics().handshake_failures < count:
                    await trio.sleep(0.01)
            assert trio.current_time() - started < 10.0  # not held until a deadline
            assert open_fds() <= before + 2
            await still_serves(node, spaces, ctl)


async def test_strangers_at_the_door_are_capped_and_members_still_get_through() -> None:
    with trio.fail_after(DEADLINE):
        async with live_targets() as (node, spaces, ctl):
            await still_serves(node, spaces, ctl)  # the links between the nodes are up
            target = controller_target(ctl)
            host, port = parse_address(ctl.address)
            async with connect_peer(host, port, secret=SECRET, name="ops") as ops:
                silent = [
                    await RawWebSocket.connect(target.port, upgrade=False)
                    for _ in range(MAX_UNAUTHENTICATED)
                ]
                door = ctl._server
                assert door is not None
                while door.unauthenticated < MAX_UNAUTHENTICATED:  # all at the door
                    await trio.sleep(0.01)
                extra = await RawWebSocket.connect(target.port, upgrade=False)
                assert await extra.receive_frame() is None  # closed at once
                await extra.aclose()
                assert target.statistics().connections_refused == 1
                with pytest.raises(PeerUnavailable):
                    async with connect_peer(host, port, secret=SECRET, name="late", timeout=2):
                        pass
                assert target.statistics().connections_refused == 2
                ops.send_nowait(StatusRequest(1))  # a session past the door goes on
                await ops.receive()
                await calls(spaces)  # and another listener has its own door
                for ws in silent:
                    await ws.aclose()
                while target.statistics().handshake_failures < MAX_UNAUTHENTICATED:
                    await trio.sleep(0.01)
            await still_serves(node, spaces, ctl)  # the door opens again when they go
