"""Peers over real loopback websockets and in memory: handshake, containment, batching, order.

Every wait is on an event or a message under a ``trio.fail_after`` deadline: nothing here
passes because a sleep happened to be long enough.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from store.shell.transport import (
    HIGH_WATER,
    Peer,
    PeerServer,
    WireCounters,
    connect_peer,
    open_memory_peer_pair,
    proof_mac,
    serve_peers,
)
from store.wire.errors import (
    AuthenticationError,
    FrameTooLarge,
    MessageTooLarge,
    PeerUnavailable,
    ProtocolError,
)
from store.wire.messages import (
    WIRE_VERSION,
    Error,
    Hello,
    Message,
    Proof,
    Refused,
    Welcome,
    decode_batch,
    encode_batch,
    message,
)

SECRET = b"cluster secret for tests"
DEADLINE = 5.0  # seconds; every test finishes far sooner or fails loudly


@message("test:seq")
@dataclass(frozen=True, slots=True)
class Seq:
    n: int
    body: bytes = b""


async def echo(peer: Peer) -> None:
    """Server handler: send back every message, in order."""
    async for batch in peer:
        for msg in batch:
            peer.send_nowait(msg)


@asynccontextmanager
async def server(
    handler: Callable[[Peer], Awaitable[None]] = echo, **kwargs: Any
) -> AsyncIterator[PeerServer]:
    kwargs.setdefault("secret", SECRET)
    kwargs.setdefault("name", "server")
    kwargs.setdefault("close_timeout", 1.0)
    async with trio.open_nursery() as nursery:
        srv = await nursery.start(partial(serve_peers, handler, "127.0.0.1", 0, **kwargs))
        yield srv
        nursery.cancel_scope.cancel()


def client(port: int, **kwargs: Any) -> Any:
    kwargs.setdefault("secret", SECRET)
    kwargs.setdefault("name", "client")
    kwargs.setdefault("close_timeout", 1.0)
    return connect_peer("127.0.0.1", port, **kwargs)


async def receive_n(peer: Peer, count: int) -> list[Message]:
    got: list[Message] = []
    while len(got) < count:
        got.extend(await peer.receive())
    return got


async def round_trip(peer: Peer, n: int) -> None:
    peer.send_nowait(Seq(n))
    assert await receive_n(peer, 1) == [Seq(n)]


@asynccontextmanager
async def raw_client(
    port: int, *, max_frame: int = 1 << 24, secret: bytes = SECRET, handshake: bool = True
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A websocket that speaks the handshake by hand, so tests can then misbehave."""
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, "/", use_ssl=False, max_message_size=max_frame
    ) as ws:
        if handshake:
            nonce = secrets.token_bytes(32)
            await ws.send_message(encode_batch([Hello(WIRE_VERSION, "raw", nonce, max_frame)]))
            [hello] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
            assert isinstance(hello, Hello)
            mac = proof_mac(
                secret,
                role="client",
                challenge=hello.nonce,
                prover="raw",
                verifier=hello.name,
                prover_nonce=nonce,
            )
            await ws.send_message(encode_batch([Proof(mac)]))
            answer = decode_batch(await ws.get_message())  # type: ignore[arg-type]
            assert isinstance(answer[-1], Welcome)
        yield ws


# --- handshake ----------------------------------------------------------------------------


async def test_handshake_then_echo() -> None:
    seen: list[str] = []

    async def handler(peer: Peer) -> None:
        seen.append(peer.name)
        await echo(peer)

    with trio.fail_after(DEADLINE):
        async with server(handler) as srv, client(srv.port) as peer:
            assert peer.name == "server" and peer.local_name == "client"
            await round_trip(peer, 1)
            assert seen == ["client"]
            assert peer.statistics().peers_connected == 1
        assert srv.statistics().peers_connected == 1


async def test_wrong_secret_is_refused_logged_once_and_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="store.shell.transport")
    with trio.fail_after(DEADLINE):
        async with server() as srv:
            with pytest.raises(AuthenticationError, match="refused"):
                async with client(srv.port, secret=b"not the secret", name="intruder"):
                    raise AssertionError("must not get a peer")
            refusals = [r for r in caplog.records if "wrong cluster secret" in r.getMessage()]
            assert len(refusals) == 1
            assert "intruder" in refusals[0].getMessage()
            assert SECRET.decode() not in caplog.text
            assert srv.statistics().auth_failures == 1
            async with client(srv.port) as peer:
                await round_trip(peer, 2)
            assert srv.statistics().peers_connected == 1


async def test_client_refuses_a_server_that_cannot_prove_the_secret() -> None:
    async def impostor(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        [hello] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
        assert isinstance(hello, Hello)
        await ws.send_message(encode_batch([Hello(WIRE_VERSION, "impostor", b"i" * 32, 1 << 20)]))
        await ws.get_message()  # the client's (valid) proof: accepted without checking
        await ws.send_message(encode_batch([Proof(b"\x00" * 32), Welcome()]))
        await ws.get_message()  # wait for the client to hang up

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(
                partial(trio_websocket.serve_websocket, impostor, "127.0.0.1", 0, None)
            )
            counters = WireCounters()
            with pytest.raises(AuthenticationError, match="could not prove"):
                async with client(ws_server.port, counters=counters):
                    raise AssertionError("must not get a peer")
            assert counters.statistics().auth_failures == 1
            nursery.cancel_scope.cancel()


async def test_other_wire_version_is_refused() -> None:
    with trio.fail_after(DEADLINE):
        async with server() as srv:
            async with raw_client(srv.port, handshake=False) as ws:
                hello = Hello(WIRE_VERSION + 1, "future", b"f" * 32, 1 << 20)
                await ws.send_message(encode_batch([hello]))
                [refused] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
                assert isinstance(refused, Refused) and refused.code == "version"
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await ws.get_message()
            assert srv.statistics().handshake_failures == 1


async def test_garbage_instead_of_hello_is_refused() -> None:
    with trio.fail_after(DEADLINE):
        async with server() as srv:
            async with raw_client(srv.port, handshake=False) as ws:
                await ws.send_message(b"\x00garbage")
                [refused] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
                assert isinstance(refused, Refused) and refused.code == "protocol"
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await ws.get_message()
            stats = srv.statistics()
            assert (stats.handshake_failures, stats.frames_malformed) == (1, 1)
            async with client(srv.port) as peer:
                await round_trip(peer, 4)


@pytest.mark.parametrize(
    ("after_hello", "frame", "counter"),
    [
        (False, "a text frame", "frames_malformed"),
        (False, b"\x81\x82\x19\x27\x0f\x00", "frames_unknown_type"),  # [[9999, 0]]
        (False, encode_batch([Seq(1)]), None),  # well-formed, but not a Hello
        (True, b"\xff\x00 not cbor", "frames_malformed"),  # garbage instead of the Proof
        (True, encode_batch([Seq(1)]), None),  # a message instead of the Proof
    ],
    ids=["text-frame", "unknown-type", "not-a-hello", "garbage-for-proof", "not-a-proof"],
)
async def test_malformed_input_before_authentication_is_refused_and_closes(
    after_hello: bool, frame: bytes | str, counter: str | None
) -> None:
    """Before the proofs nothing is known of the other side: whatever it sends wrong gets
    a Refused and the connection is closed (no Error, no second chance)."""
    with trio.fail_after(DEADLINE):
        async with server() as srv:
            async with raw_client(srv.port, handshake=False) as ws:
                if after_hello:
                    await ws.send_message(encode_batch([Hello(WIRE_VERSION, "x", b"n" * 32, 4096)]))
                    [hello] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
                    assert isinstance(hello, Hello)
                await ws.send_message(frame)
                [refused] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
                assert isinstance(refused, Refused) and refused.code == "protocol"
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await ws.get_message()
            stats = srv.statistics()
            assert stats.handshake_failures == 1 and stats.peers_connected == 0
            if counter is not None:
                assert getattr(stats, counter) == 1
            async with client(srv.port) as peer:  # the server goes on serving the others
                await round_trip(peer, 1)


async def test_a_client_closes_on_a_server_that_sends_garbage_instead_of_its_hello() -> None:
    async def garbage(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # the client's Hello
        await ws.send_message(b"\xff\x00 not cbor")
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()  # the client hung up

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(
                partial(trio_websocket.serve_websocket, garbage, "127.0.0.1", 0, None)
            )
            counters = WireCounters()
            with pytest.raises(ProtocolError, match="not valid cbor"):
                async with client(ws_server.port, counters=counters):
                    raise AssertionError("must not get a peer")
            stats = counters.statistics()
            assert (stats.handshake_failures, stats.frames_malformed) == (1, 1)
            nursery.cancel_scope.cancel()


async def test_silent_connection_times_out_without_blocking_others() -> None:
    with trio.fail_after(DEADLINE):
        async with server(handshake_timeout=0.3) as srv:
            async with raw_client(srv.port, handshake=False) as ws:
                async with client(srv.port) as peer:  # served while the silent one waits
                    await round_trip(peer, 3)
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await ws.get_message()  # the server gave up on us
            assert srv.statistics().handshake_failures == 1


async def test_unreachable_node_is_peer_unavailable() -> None:
    async with server() as srv:
        port = srv.port
    with trio.fail_after(DEADLINE), pytest.raises(PeerUnavailable, match="cannot connect"):
        async with client(port):
            pass


async def test_bad_local_settings_raise_at_once() -> None:
    for kwargs in ({"secret": b""}, {"name": ""}, {"max_frame": 10}):
        with pytest.raises(ValueError):
            async with client(1, **kwargs):
                pass


# --- bad frames ---------------------------------------------------------------------------


async def test_garbage_is_counted_and_answered_while_another_peer_keeps_working() -> None:
    with trio.fail_after(DEADLINE):
        async with server() as srv, client(srv.port) as good, raw_client(srv.port) as ws:
            await round_trip(good, 1)
            cases = [
                (b"\xff\x00 not cbor", "malformed"),
                (encode_batch([Hello(1, "x", b"", 0)])[:-2], "malformed"),
                (b"\x81\x82\x19\x27\x0f\x00", "unknown-type"),  # [[9999, 0]]
                ("a text frame", "malformed"),
            ]
            for data, code in cases:
                await ws.send_message(data)
                [answer] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
                assert isinstance(answer, Error) and answer.code == code
                await round_trip(good, 2)  # the other peer does not notice
            await ws.send_message(encode_batch([Seq(7)]))  # the raw connection still works
            assert decode_batch(await ws.get_message()) == [Seq(7)]  # type: ignore[arg-type]
            stats = srv.statistics()
            assert stats.frames_malformed == 3
            assert stats.frames_unknown_type == 1


async def test_after_authentication_a_bad_frame_gets_an_error_and_the_link_carries_on() -> None:
    """The rule of the other side of the handshake, on one connection: each bad frame is
    answered with an Error and counted by kind, and good messages keep flowing both ways
    around it."""
    with trio.fail_after(DEADLINE):
        async with server() as srv, raw_client(srv.port) as ws:
            bad_frames = [
                b"\xff\x00",  # not cbor
                b"\x81\x82\x19\x27\x0f\x00",  # [[9999, 0]]: an unknown message type
                b"\x81\x81\x05",  # [[5]]: an Error without its fields
            ]
            codes = []
            for n, bad in enumerate(bad_frames):
                await ws.send_message(encode_batch([Seq(n)]))
                assert decode_batch(await ws.get_message()) == [Seq(n)]  # type: ignore[arg-type]
                await ws.send_message(bad)
                [answer] = decode_batch(await ws.get_message())  # type: ignore[arg-type]
                assert isinstance(answer, Error)
                codes.append(answer.code)
            assert codes == ["malformed", "unknown-type", "malformed"]
            await ws.send_message(encode_batch([Seq(9)]))
            assert decode_batch(await ws.get_message()) == [Seq(9)]  # type: ignore[arg-type]
            stats = srv.statistics()
            assert (stats.frames_malformed, stats.frames_unknown_type) == (2, 1)
            assert stats.messages_received == 4 and stats.handshake_failures == 0


async def test_a_higher_layer_refuses_a_message_and_the_link_stays_up() -> None:
    async def picky(peer: Peer) -> None:
        async for batch in peer:
            for msg in batch:
                if isinstance(msg, Seq) and msg.n < 0:
                    peer.refuse("unexpected", f"no negative numbers, not {msg.n}")
                else:
                    peer.send_nowait(msg)

    with trio.fail_after(DEADLINE):
        async with server(picky) as srv, client(srv.port) as peer:
            peer.send_nowait(Seq(-1))
            await round_trip(peer, 1)  # the Error was counted, not returned
            assert peer.statistics().errors_received == 1
            assert srv.statistics().errors == {}


async def test_oversized_frame_closes_only_that_connection() -> None:
    too_large = trio.Event()

    async def handler(peer: Peer) -> None:
        try:
            await echo(peer)
        except FrameTooLarge:
            too_large.set()
            raise

    with trio.fail_after(DEADLINE):
        async with server(handler, max_frame=64 * 1024) as srv, client(srv.port) as good:
            assert good.frame_limit == 64 * 1024  # learnt from the server's Hello
            async with raw_client(srv.port) as ws:
                await ws.send_message(encode_batch([Seq(1, b"x" * 100_000)]))
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None and closed.value.reason.code == 1009
            await too_large.wait()
            assert srv.statistics().frames_too_large == 1
            await round_trip(good, 5)


async def test_a_message_larger_than_the_agreed_limit_fails_at_the_sender() -> None:
    with trio.fail_after(DEADLINE):
        async with server(max_frame=64 * 1024) as srv, client(srv.port) as peer:
            with pytest.raises(MessageTooLarge):
                peer.send_nowait(Seq(1, b"x" * 66_000))
            big = Seq(2, b"y" * 60_000)  # fits alone, so it travels as its own frame
            for _ in range(3):
                peer.send_nowait(big)
            assert await receive_n(peer, 3) == [big] * 3
            assert peer.statistics().frames_sent == 3


async def test_error_messages_from_the_peer_are_counted_not_returned() -> None:
    async def complain(peer: Peer) -> None:
        peer.send_nowait(Error("malformed", "your frame was bad"))
        peer.send_nowait(Seq(1))
        await peer.receive()

    with trio.fail_after(DEADLINE):
        async with server(complain) as srv, client(srv.port) as peer:
            assert await peer.receive() == [Seq(1)]
            assert peer.statistics().errors_received == 1


# --- batching and order -------------------------------------------------------------------


async def test_queued_messages_coalesce_into_few_frames() -> None:
    with trio.fail_after(DEADLINE):
        async with server() as srv, client(srv.port) as peer:
            for i in range(1000):  # no checkpoint in between: the writer cannot run
                peer.send_nowait(Seq(i))
            got = await receive_n(peer, 1000)
            assert got == [Seq(i) for i in range(1000)]
            stats = peer.statistics()
            assert stats.messages_sent == 1000
            assert stats.frames_sent <= 5
            assert srv.statistics().frames_received == stats.frames_sent


async def test_an_idle_link_sends_at_once() -> None:
    with trio.fail_after(DEADLINE):
        async with server() as srv, client(srv.port) as peer:
            for i in range(3):
                await round_trip(peer, i)
            assert peer.statistics().frames_sent == 3  # one frame per lone message


async def test_order_is_kept_with_concurrent_senders_and_checkpoints() -> None:
    count = 3000
    with trio.fail_after(DEADLINE):
        async with server() as srv, client(srv.port) as peer:

            async def sender(parity: int) -> None:
                for i in range(parity, count, 2):
                    await peer.send(Seq(i))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender, 0)
                nursery.start_soon(sender, 1)
                got = await receive_n(peer, count)
            evens = [m.n for m in got if isinstance(m, Seq) and m.n % 2 == 0]
            odds = [m.n for m in got if isinstance(m, Seq) and m.n % 2 == 1]
            assert evens == list(range(0, count, 2))
            assert odds == list(range(1, count, 2))
            assert peer.statistics().frames_sent < count


async def test_handler_output_is_flushed_when_it_returns() -> None:
    async def burst(peer: Peer) -> None:
        for i in range(500):
            peer.send_nowait(Seq(i))

    with trio.fail_after(DEADLINE):
        async with server(burst) as srv, client(srv.port) as peer:
            got = [m async for batch in peer for m in batch]  # ends at the clean close
            assert got == [Seq(i) for i in range(500)]
            with pytest.raises(PeerUnavailable):
                await peer.receive()
            with pytest.raises(PeerUnavailable):
                peer.send_nowait(Seq(0))
            assert peer.closed


async def test_the_callers_exception_comes_out_unwrapped() -> None:
    with trio.fail_after(DEADLINE):
        async with server() as srv:
            with pytest.raises(KeyError):
                async with client(srv.port):
                    raise KeyError("mine")
            with pytest.raises(KeyError):
                async with open_memory_peer_pair():
                    raise KeyError("mine")


async def test_handler_protocol_errors_are_contained() -> None:
    async def fussy(peer: Peer) -> None:
        await peer.receive()
        raise ProtocolError("this peer annoys me")

    with trio.fail_after(DEADLINE):
        async with server(fussy) as srv:
            async with client(srv.port) as peer:
                peer.send_nowait(Seq(1))
                with pytest.raises(PeerUnavailable):
                    await peer.receive()  # closed by the server
            async with client(srv.port) as again:  # and the server still serves
                again.send_nowait(Seq(2))
                await again.flush()


async def test_a_handler_bug_is_logged_counted_and_ends_only_its_connection(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("S6_RAISE_BUGS", raising=False)  # as in production

    async def buggy(peer: Peer) -> None:
        async for batch in peer:
            for msg in batch:
                if isinstance(msg, Seq) and msg.n == 13:
                    raise KeyError("a bug of ours")
                peer.send_nowait(msg)

    caplog.set_level(logging.ERROR, logger="store.shell.transport")
    with trio.fail_after(DEADLINE):
        async with server(buggy) as srv:
            async with client(srv.port) as peer:
                await round_trip(peer, 1)
                peer.send_nowait(Seq(13))
                with pytest.raises(PeerUnavailable):
                    await peer.receive()  # closed by the server
            async with client(srv.port) as again:  # the server still serves the others
                await round_trip(again, 2)
            assert srv.statistics().errors == {"bug-KeyError": 1}
            [record] = [r for r in caplog.records if "bug in the handler" in r.getMessage()]
            assert record.exc_info is not None and record.exc_info[0] is KeyError


async def test_a_handler_bug_stops_the_server_under_s6_raise_bugs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("S6_RAISE_BUGS", "1")

    async def buggy(peer: Peer) -> None:
        await peer.receive()
        raise KeyError("a bug of ours")

    with trio.fail_after(DEADLINE), pytest.RaisesGroup(KeyError, flatten_subgroups=True):
        async with server(buggy) as srv, client(srv.port) as peer:
            peer.send_nowait(Seq(1))
            await trio.sleep_forever()  # until the server's failure cancels us


async def test_node_counters_total_several_connections() -> None:
    totals = WireCounters()
    with trio.fail_after(DEADLINE):
        async with server() as srv:
            async with (
                client(srv.port, counters=totals) as a,
                client(srv.port, counters=totals) as b,
            ):
                await round_trip(a, 1)
                await round_trip(b, 2)
                await round_trip(b, 3)
                assert a.statistics().messages_sent == 1
            assert totals.statistics().messages_sent == 3
            assert totals.statistics().peers_connected == 2


# --- in memory ----------------------------------------------------------------------------


async def test_memory_pair_has_the_same_interface() -> None:
    with trio.fail_after(DEADLINE):
        async with open_memory_peer_pair("n1", "n2") as (a, b):
            assert (a.local_name, a.name, b.local_name, b.name) == ("n1", "n2", "n2", "n1")
            for i in range(100):
                a.send_nowait(Seq(i))
            await a.flush()
            assert a.statistics().frames_sent == 1
            assert await receive_n(b, 100) == [Seq(i) for i in range(100)]
            b.send_nowait(Seq(-1))
            assert await a.receive() == [Seq(-1)]
            await b.aclose()
            assert [m async for batch in a for m in batch] == []  # clean close ends iteration
            with pytest.raises(PeerUnavailable):
                a.send_nowait(Seq(0))


async def test_memory_pair_enforces_the_frame_limit_at_the_receiver() -> None:
    with trio.fail_after(DEADLINE):
        async with open_memory_peer_pair(max_frame=2048) as (a, b):
            for _ in range(4):  # each fits alone; together the batch is too big for b
                a.send_nowait(Seq(0, b"z" * 1500))
            await a.flush()
            # The sender respects its limit, so force one oversized frame through its link.
            await a._link.send_frame(encode_batch([Seq(0, b"z" * 4000)]))
            got = 0
            with pytest.raises(FrameTooLarge):
                while True:
                    got += len(await b.receive())
            assert got == 4
            assert b.statistics().frames_too_large == 1


async def test_send_waits_while_the_queue_is_over_the_high_water_mark() -> None:
    chunk = b"q" * (1 << 20)
    count = 2 * HIGH_WATER // len(chunk)
    sent = 0
    with trio.fail_after(DEADLINE):
        async with open_memory_peer_pair(buffer=0) as (a, b):

            async def sender() -> None:
                nonlocal sent
                for i in range(count):
                    await a.send(Seq(i, chunk))
                    sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.testing.wait_all_tasks_blocked()
                assert 0 < sent < count  # blocked: nobody reads b
                assert a.queued_bytes > HIGH_WATER // 2
                got = await receive_n(b, count)
            assert [m.n for m in got if isinstance(m, Seq)] == list(range(count))
            assert sent == count
