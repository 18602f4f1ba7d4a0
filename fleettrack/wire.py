"""The native wire format: one JSON object per text frame, ``{"event", "data", "ack"?}``."""

from __future__ import annotations

from typing import Any

import orjson

from fleettrack.errors import ErrorCode, ProtocolError
from fleettrack.hub import Batch

#: ``(event, data, ack)`` of one client message. A plain tuple: one is built per
#: received message, and a NamedTuple costs four times as much to build.
Message = tuple[object, Any, int | None]


def decode_message(payload: bytes) -> Message:
    """Parse one frame; raises INVALID_JSON, or INVALID_REQUEST for an unusable ``ack``."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {error}") from None
    if type(message) is not dict:
        raise ProtocolError(ErrorCode.INVALID_JSON, "frame must be a JSON object")
    ack = message.get("ack")
    if ack is not None and (type(ack) is not int or ack < 0):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "ack must be a non-negative integer", "ack")
    return message.get("event"), message.get("data"), ack


def encode_event(event: str, data: Any) -> bytes:
    return orjson.dumps({"event": event, "data": data})


def encode_ack(ack: int, data: Any) -> bytes:
    return orjson.dumps({"event": "ack", "ack": ack, "data": data})


def encode_batch(batch: Batch) -> bytes:
    return b'{"event":"vehicle:telemetry:batch","data":%s}' % batch.data
