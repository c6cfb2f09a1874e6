"""``store.wire.control``: the scaling stage is defined once, in ``ring.ownership``."""

from __future__ import annotations

import cbor2
import pytest

from ring.ownership import Stage
from store.wire.control import Order, StageAck, StageCommand, command_named
from store.wire.errors import MalformedMessage
from store.wire.messages import decode_batch, encode_batch, message_class

MEMBERS = [("a", "127.0.0.1:7001")]


def test_every_command_goes_by_its_value_and_comes_back() -> None:
    for command in (*Stage, *Order):
        assert command_named(command.value) is command
    assert {c.value for c in Stage} == {"normal", "pre-scaling", "scaling"}  # the wire bytes
    for junk in ("", "Scaling", "drained", ["scaling"]):
        with pytest.raises(ValueError, match="unknown stage command"):
            command_named(junk)  # type: ignore[arg-type]


def test_a_stage_command_travels_as_the_stages_value() -> None:
    sent = StageCommand(Stage.SCALING.value, 1, MEMBERS, 2, MEMBERS, 4)
    [received] = decode_batch(encode_batch([sent]))
    assert received == sent
    assert isinstance(received, StageCommand) and received.kind is Stage.SCALING
    ack = StageAck("a", Order.LEAVE.value, 2)
    [back] = decode_batch(encode_batch([ack]))
    assert isinstance(back, StageAck) and back.kind is Order.LEAVE


def test_a_command_of_no_known_kind_is_malformed_on_arrival() -> None:
    for cls, fields in (
        (StageAck, ["a", "resume", 2]),
        (StageCommand, ["sideways", 1, MEMBERS, None, None, 4]),
        (StageCommand, ["scaling", 1, MEMBERS, None, None, 4]),  # scaling needs the next ring
    ):
        tag = next(t for t in (42, 43) if message_class(t) is cls)
        frame = cbor2.dumps([[tag, *fields]])
        with pytest.raises(MalformedMessage, match=cls.__name__):
            decode_batch(frame)
    with pytest.raises(ValueError):
        StageAck("a", "resume", 2)  # refused at the sender too
