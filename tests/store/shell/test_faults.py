"""Whose fault is it, in the controller and the member's side of the membership protocol.

Every peer here has passed the transport's handshake, so a wrong message is refused (an
``Error`` back, counted, logged) and the connection carries on; a race is counted and
ignored; a bug of ours is logged with its traceback and counted as ``bug-<Exception>``, and
raised when ``S6_RAISE_BUGS=1`` (the suite's default, see ``tests/conftest.py``).  The
transport's own rules (before and after the handshake) are in ``test_transport.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import cbor2
import pytest
import trio

from ring.ownership import Stage
from store.shell.controller import Controller, open_controller
from store.shell.membership import Membership, join_cluster
from store.shell.transport import DEFAULT_MAX_FRAME, Peer, connect_peer, serve_peers
from store.wire.control import (
    ClusterStatus,
    Heartbeat,
    NodeStatus,
    Register,
    RingState,
    ScaleReply,
    ScaleRequest,
    StageAck,
    StageCommand,
    StatusRequest,
    parse_address,
)
from store.wire.errors import classify
from store.wire.messages import message_class

SECRET = b"fault tests secret"
DEADLINE = 10.0
ADDRESS = "127.0.0.1:9101"


@asynccontextmanager
async def member_link(ctl: Controller, name: str = "m1") -> AsyncIterator[Peer]:
    """A hand-driven member: authenticated and registered, nothing more."""
    host, port = parse_address(ctl.address)
    async with connect_peer(host, port, secret=SECRET, name=name) as peer:
        peer.send_nowait(Register(name, ADDRESS))
        [state] = await peer.receive()
        assert isinstance(state, RingState) and state.accepted
        await ctl.wait_until(lambda b: name in b.members)
        yield peer


@asynccontextmanager
async def operator_link(ctl: Controller) -> AsyncIterator[Peer]:
    host, port = parse_address(ctl.address)
    async with connect_peer(host, port, secret=SECRET, name="ops") as peer:
        yield peer


async def status_of(peer: Peer, request_id: int) -> ClusterStatus:
    """Ask the controller for its status over ``peer``: the session still works."""
    peer.send_nowait(StatusRequest(request_id))
    while True:
        for msg in await peer.receive():
            if isinstance(msg, ClusterStatus) and msg.request_id == request_id:
                return msg


# --- the controller -----------------------------------------------------------------------


async def test_a_message_a_session_never_takes_is_refused_and_the_session_goes_on() -> None:
    with trio.fail_after(DEADLINE):
        async with open_controller(secret=SECRET, manual_admission=True) as ctl:
            async with operator_link(ctl) as ops:
                await status_of(ops, 1)  # an operator session
                ops.send_nowait(StageAck("ops", Stage.NORMAL.value, 0))  # a member's message
                ops.send_nowait(Register("ops", ADDRESS))  # too late to become a member
                await status_of(ops, 2)  # the session goes on
                assert ops.statistics().errors_received == 2  # the Errors came back
            assert ctl.errors == {"unexpected-StageAck": 1, "unexpected-Register": 1}
            assert "ops" not in ctl.barrier.members
            assert all(classify(name) == "peer" for name in ctl.errors)


async def test_an_acknowledgement_in_another_members_name_is_refused() -> None:
    with trio.fail_after(DEADLINE):
        async with open_controller(secret=SECRET, manual_admission=True) as ctl:
            async with member_link(ctl, "m1") as m1:
                m1.send_nowait(StageAck("m2", Stage.NORMAL.value, 0))
                await status_of(m1, 1)
                assert m1.statistics().errors_received == 1
                assert ctl.errors == {"malformed-StageAck": 1}
                assert not any(t.what == "ack" for t in ctl.log)  # the barrier never saw it
                assert ctl.barrier.members["m1"].connected  # still registered, still here


async def test_a_malformed_frame_from_a_member_is_refused_by_the_transport() -> None:
    ack_tag = next(tag for tag in (42, 43) if message_class(tag) is StageAck)
    with trio.fail_after(DEADLINE):
        async with open_controller(secret=SECRET, manual_admission=True) as ctl:
            async with member_link(ctl, "m1") as m1:
                # A StageAck of a command that does not exist: it cannot be decoded.
                await m1._link.send_frame(cbor2.dumps([[ack_tag, "m1", "resume", 1]]))
                await status_of(m1, 1)
                assert m1.statistics().errors_received == 1
            assert ctl.wire_statistics().frames_malformed == 1
            assert ctl.errors == {}  # the session never saw it


async def test_a_member_whose_connection_breaks_ends_its_session_not_the_controller() -> None:
    """A broken connection (here: a frame over the limit, closed with 1009) used to escape
    the session's nursery as an exception group and stop the whole controller."""
    with trio.fail_after(DEADLINE):
        async with open_controller(secret=SECRET, manual_admission=True) as ctl:
            async with member_link(ctl, "m1") as m1:
                await m1._link.send_frame(b"\x00" * (DEFAULT_MAX_FRAME + 1))
                await ctl.wait_until(lambda b: "m1" not in b.members)  # gone while waiting
            async with operator_link(ctl) as ops:
                assert (await status_of(ops, 1)).members == []
            assert ctl.wire_statistics().frames_too_large == 1
            assert ctl.errors == {}


async def test_a_late_status_answer_is_a_race() -> None:
    with trio.fail_after(DEADLINE):
        async with open_controller(secret=SECRET, manual_admission=True) as ctl:
            async with member_link(ctl, "m1") as m1:
                status = await ctl.collect_status(timeout=0.01)  # m1 never answers
                assert "no answer" in str(status.figures["m1"]["error"])
                [request] = await m1.receive()
                assert isinstance(request, StatusRequest)
                m1.send_nowait(NodeStatus(request.request_id, "m1", {"keys": 1}))
                await status_of(m1, 2)
                assert m1.statistics().errors_received == 0  # a race is nobody's fault
            assert ctl.errors == {"stale-node-status": 1}
            assert classify("stale-node-status") == "race"


async def test_a_bug_in_a_session_is_logged_counted_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("S6_RAISE_BUGS", raising=False)  # as in production
    caplog.set_level(logging.ERROR, logger="store.controller")
    with trio.fail_after(DEADLINE):
        async with open_controller(secret=SECRET, manual_admission=True) as ctl:

            def broken(*args: Any, **kwargs: Any) -> Any:
                raise KeyError("a bug of ours")

            monkeypatch.setattr(ctl.barrier, "request_scale_out", broken)
            async with operator_link(ctl) as ops:
                ops.send_nowait(ScaleRequest(1, "out", []))
                await status_of(ops, 2)  # the session goes on
                assert ops.statistics().errors_received == 0  # not the operator's fault
            assert ctl.errors == {"bug-KeyError": 1}
            [record] = [r for r in caplog.records if "bug taking ScaleRequest" in r.getMessage()]
            assert record.exc_info is not None and record.exc_info[0] is KeyError


async def test_a_bug_in_a_session_stops_the_controller_under_s6_raise_bugs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("S6_RAISE_BUGS", "1")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug of ours")

    with trio.fail_after(DEADLINE), pytest.raises(KeyError, match="a bug of ours"):
        async with open_controller(secret=SECRET, manual_admission=True) as ctl:
            monkeypatch.setattr(ctl.barrier, "request_scale_out", broken)
            async with operator_link(ctl) as ops:
                ops.send_nowait(ScaleRequest(1, "out", []))
                await trio.sleep_forever()  # until the controller's failure cancels us


# --- the member's side --------------------------------------------------------------------


class Quiet:
    """Membership callbacks that do nothing."""

    async def on_pre_scaling(self, m: Membership) -> None:
        pass

    async def on_scaling(self, m: Membership) -> None:
        pass

    async def on_normal(self, m: Membership) -> None:
        pass

    async def on_abort(self, m: Membership) -> None:
        pass

    async def on_leave(self, m: Membership) -> None:
        pass


@asynccontextmanager
async def fake_controller(script: Any) -> AsyncIterator[str]:
    """A controller run by hand: admits the member at once (epoch 1), then runs
    ``script(peer)``; yields its address."""

    async def handler(peer: Peer) -> None:
        [register] = await peer.receive()
        assert isinstance(register, Register)
        members = [(register.name, register.address)]
        peer.send_nowait(RingState(True, "admitted", 0, [], "normal", None, None, 4))
        peer.send_nowait(StageCommand(Stage.NORMAL.value, 1, members, None, None, 4))
        while True:  # (heartbeats come too)
            acks = [m for m in await peer.receive() if not isinstance(m, Heartbeat)]
            if acks:
                break
        [ack] = acks
        assert isinstance(ack, StageAck) and ack.kind is Stage.NORMAL
        await script(peer)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_peers, handler, "127.0.0.1", 0, secret=SECRET, name="controller")
        )
        yield f"127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


async def answers(peer: Peer, request_id: int) -> dict[str, Any]:
    """Ask the member for its figures: the connection still carries messages."""
    peer.send_nowait(StatusRequest(request_id))
    while True:
        for msg in await peer.receive():
            if getattr(msg, "request_id", None) == request_id:
                return dict(msg.figures)  # type: ignore[attr-defined]


async def test_a_member_refuses_what_it_never_takes_from_the_controller() -> None:
    done = trio.Event()
    seen: dict[str, Any] = {}

    async def script(peer: Peer) -> None:
        peer.send_nowait(Register("n1", ADDRESS))  # a controller never sends that
        peer.send_nowait(ScaleReply(99, True, "done", "for nobody", {}))  # a race
        seen.update(await answers(peer, 1))
        seen["errors_received"] = peer.statistics().errors_received
        done.set()
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with (
            fake_controller(script) as address,
            join_cluster(address, name="n1", address=ADDRESS, secret=SECRET, handler=Quiet()) as m,
        ):
            await done.wait()
            assert seen["stage"] == "normal" and seen["errors_received"] == 1
            assert m.errors == {"unexpected-Register": 1, "stale-scale-reply": 1}
            assert m.connected
            assert [classify(c) for c in sorted(m.errors)] == ["race", "peer"]


async def test_a_failing_status_provider_is_a_bug_yet_the_status_is_answered(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("S6_RAISE_BUGS", raising=False)  # as in production
    caplog.set_level(logging.ERROR, logger="store.shell.membership")
    done = trio.Event()
    seen: list[dict[str, Any]] = []

    async def script(peer: Peer) -> None:
        seen.append(await answers(peer, 1))
        seen.append(await answers(peer, 2))  # and the member goes on
        done.set()
        await trio.sleep_forever()

    def provider() -> dict[str, object]:
        return {"ratio": 1 / 0}

    with trio.fail_after(DEADLINE):
        async with (
            fake_controller(script) as address,
            join_cluster(
                address,
                name="n1",
                address=ADDRESS,
                secret=SECRET,
                handler=Quiet(),
                status_provider=provider,
            ) as m,
        ):
            await done.wait()
            assert all("ZeroDivisionError" in str(figures["error"]) for figures in seen)
            assert m.errors == {"bug-ZeroDivisionError": 2}
            records = [r for r in caplog.records if "bug taking StatusRequest" in r.getMessage()]
            assert len(records) == 2 and records[0].exc_info is not None


async def test_a_failing_status_provider_surfaces_under_s6_raise_bugs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("S6_RAISE_BUGS", "1")

    async def script(peer: Peer) -> None:
        await answers(peer, 1)

    def provider() -> dict[str, object]:
        return {"ratio": 1 / 0}

    with trio.fail_after(DEADLINE):
        async with fake_controller(script) as address:
            with pytest.raises(ZeroDivisionError):
                async with join_cluster(
                    address,
                    name="n1",
                    address=ADDRESS,
                    secret=SECRET,
                    handler=Quiet(),
                    status_provider=provider,
                ):
                    await trio.sleep_forever()  # until the bug ends the membership
