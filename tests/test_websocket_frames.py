"""The WebSocket adapter's own frame reading, against Autobahn's, byte by byte.

The adapter parses whole small text frames itself and hands everything else
to Autobahn; whatever way the bytes are split into reads, the messages that
reach the session must be the same, in order, and control frames must still
work.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from autobahn.websocket.protocol import WebSocketProtocol
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from wsaccel.xormask import XorMaskerSimple

from fleettrack.hub import Hub
from fleettrack.websocket import TrackingServerFactory, TrackingServerProtocol
from tests.fakes import EPOCH_MS, make_clock, raw_point

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
TEXT, BINARY, CONTINUATION, PING = 0x1, 0x2, 0x0, 0x9


def frame(payload: bytes, opcode: int = TEXT, fin: bool = True, masked: bool = True) -> bytes:
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = bytes([first, mask_bit | length])
    elif length < 65536:
        header = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + XorMaskerSimple(mask).process(payload)


class Transport(StringTransport):
    def unregisterProducer(self) -> None:
        """Autobahn unregisters on close whether or not it registered."""
        self.producer = None


def opened() -> tuple[Hub, TrackingServerProtocol, StringTransport]:
    hub = Hub(make_clock(), 1.0, 86400.0)
    factory = TrackingServerFactory(hub, hub.clock)
    protocol = factory.buildProtocol(None)
    transport = Transport()
    protocol.makeConnection(transport)
    protocol.dataReceived(HANDSHAKE)
    assert protocol.state == WebSocketProtocol.STATE_OPEN
    transport.clear()
    return hub, protocol, transport


def server_frames(transport: StringTransport) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of every unmasked frame the server wrote."""
    data, frames = transport.value(), []
    while data:
        opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(data[2:10], "big"), 10
        frames.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


def acks(transport: StringTransport) -> list[Any]:
    return [
        orjson.loads(payload)["ack"]
        for opcode, payload in server_frames(transport)
        if opcode == TEXT and orjson.loads(payload)["event"] == "ack"
    ]


def telemetry(ack: int, note_length: int = 0) -> bytes:
    point = raw_point(f"v{ack}", timestamp=EPOCH_MS + ack)
    if note_length:
        point["attributes"] = {"note": "n" * note_length}
    return orjson.dumps({"event": "vehicle:telemetry", "data": point, "ack": ack})


def conversation() -> tuple[bytes, list[int]]:
    """Frames of every shape the adapter meets, and the acks they must produce."""
    stream = [
        frame(telemetry(1)),
        frame(telemetry(2, note_length=300)),  # 16-bit length
        frame(b"are you there", PING),
        frame(telemetry(3)),
    ]
    fragmented = telemetry(4)
    stream += [frame(fragmented[:10], TEXT, fin=False), frame(fragmented[10:], CONTINUATION)]
    stream += [frame(telemetry(5)), frame(telemetry(6))]
    return b"".join(stream), [1, 2, 3, 4, 5, 6]


def test_every_frame_shape_in_one_read() -> None:
    hub, protocol, transport = opened()
    stream, expected = conversation()
    protocol.dataReceived(stream)
    assert acks(transport) == expected
    assert hub.telemetry_received == len(expected)
    assert (0xA, b"are you there") in server_frames(transport)  # the pong


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_of_the_stream_gives_the_same_messages(data: st.DataObject) -> None:
    hub, protocol, transport = opened()
    stream, expected = conversation()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12)))
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        protocol.dataReceived(stream[start:end])
    assert acks(transport) == expected
    assert hub.telemetry_received == len(expected)


def test_binary_frame_gets_an_error_and_the_connection_stays_open() -> None:
    _, protocol, transport = opened()
    protocol.dataReceived(frame(b"\x00\x01", BINARY) + frame(telemetry(1)))
    events = [orjson.loads(p)["event"] for o, p in server_frames(transport) if o == TEXT]
    assert events == ["error", "ack"]
    assert protocol.state == WebSocketProtocol.STATE_OPEN


def test_unmasked_client_frame_is_a_protocol_error() -> None:
    hub, protocol, transport = opened()
    protocol.dataReceived(frame(telemetry(1), masked=False))
    assert hub.telemetry_received == 0
    assert protocol.state != WebSocketProtocol.STATE_OPEN
    close_frames = [p for o, p in server_frames(transport) if o == 0x8]
    assert int.from_bytes(close_frames[0][:2], "big") == 1002


def test_frame_with_reserved_bits_is_a_protocol_error() -> None:
    hub, protocol, _ = opened()
    bad = bytearray(frame(telemetry(1)))
    bad[0] |= 0x40
    protocol.dataReceived(bytes(bad))
    assert hub.telemetry_received == 0
    assert protocol.state != WebSocketProtocol.STATE_OPEN
