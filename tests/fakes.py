"""Fakes and helpers for the transport-free core: a clock, points, viewers, connections.

Everything a fake is sent goes through the real wire encoders and back through
``orjson.loads``, so tests assert on what a client would actually decode.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.task import Clock

from fleettrack.hub import Batch, Hub
from fleettrack.telemetry import TelemetryPoint, parse_point
from fleettrack.wire import encode_ack, encode_batch, encode_event

#: 2023-11-14T22:13:20Z: a realistic "now", so timestamps pass the year-2000 and future checks.
EPOCH_S = 1_700_000_000
EPOCH_MS = EPOCH_S * 1000


def make_clock(at: float = EPOCH_S) -> Clock:
    clock = Clock()
    clock.advance(at)
    return clock


def make_hub(
    clock: Clock | None = None, batch_interval: float = 1.0, vehicle_ttl: float = 86400.0
) -> Hub:
    return Hub(make_clock() if clock is None else clock, batch_interval, vehicle_ttl)


def raw_point(
    vehicle_id: str = "truck_001", timestamp: int = EPOCH_MS, **fields: Any
) -> dict[str, Any]:
    """A valid telemetry object as a client sends it."""
    raw: dict[str, Any] = {
        "vehicleId": vehicle_id,
        "timestamp": timestamp,
        "latitude": 40.7128,
        "longitude": -74.006,
    }
    raw.update(fields)
    return raw


def make_point(
    vehicle_id: str = "truck_001", timestamp: int = EPOCH_MS, **fields: Any
) -> TelemetryPoint:
    return parse_point(raw_point(vehicle_id, timestamp, **fields), EPOCH_MS)


def decode_batch(batch: Batch) -> dict[str, Any]:
    """The ``data`` of a ``vehicle:telemetry:batch`` event, as the client decodes it."""
    frame = orjson.loads(encode_batch(batch))
    assert frame["event"] == "vehicle:telemetry:batch"
    assert set(frame) == {"event", "data"}
    data: dict[str, Any] = frame["data"]
    assert data == orjson.loads(batch.data)
    assert data["count"] == batch.count == len(data["dataPoints"])
    return data


class FakeViewer:
    """A hub viewer that records the batches it was delivered and the closes it was asked for."""

    def __init__(self, name: str, hub: Hub | None = None, *, leave_on_close: bool = False) -> None:
        self.name = name
        self.hub = hub
        self.leave_on_close = leave_on_close
        self.batches: list[dict[str, Any]] = []
        self.closed: list[tuple[int, str]] = []

    def __repr__(self) -> str:
        return f"FakeViewer({self.name!r})"

    def deliver(self, batch: Batch) -> None:
        self.batches.append(decode_batch(batch))

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))
        if self.leave_on_close and self.hub is not None:
            self.hub.disconnect(self)

    def points(self) -> list[dict[str, Any]]:
        """Every data point received, in order, across all batches."""
        return [point for batch in self.batches for point in batch["dataPoints"]]


class FakeConnection:
    """A session's connection: records every frame, decoded, in the order it was sent."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: list[tuple[int, str]] = []

    def send_event(self, event: str, data: Any) -> None:
        self.frames.append(orjson.loads(encode_event(event, data)))

    def send_ack(self, ack: int, data: Any) -> None:
        self.frames.append(orjson.loads(encode_ack(ack, data)))

    def send_batch(self, batch: Batch) -> None:
        self.frames.append({"event": "vehicle:telemetry:batch", "data": decode_batch(batch)})

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def event_names(self) -> list[str]:
        return [frame["event"] for frame in self.frames]

    def of(self, event: str) -> list[dict[str, Any]]:
        """The ``data`` of every frame of one event, in order."""
        return [frame["data"] for frame in self.frames if frame["event"] == event]

    def only(self, event: str) -> dict[str, Any]:
        """The single frame of ``event``; fails if there is not exactly one."""
        found = [frame for frame in self.frames if frame["event"] == event]
        assert len(found) == 1, f"expected one {event!r} frame, got {self.frames!r}"
        return found[0]

    def take(self) -> list[dict[str, Any]]:
        frames, self.frames = self.frames, []
        return frames
