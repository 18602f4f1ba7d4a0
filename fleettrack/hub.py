"""The hub: takes points in, and once per batch interval pushes each viewer its batch.

Transport-free: viewers are anything with ``deliver`` and ``close``, and time
comes from an injected clock (the reactor in production, ``task.Clock`` in
tests). Adapters (WebSocket today; Socket.IO, HTTP ingest, Redis later) only
translate between their wire and these calls.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Final, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fleettrack.buffer import LatestBuffer, VehicleState
from fleettrack.registry import WILDCARD, SubscriptionRegistry, VehicleFilter
from fleettrack.telemetry import TelemetryPoint

T = TypeVar("T")

#: Viewers handed their batch per reactor turn. A flush to many thousands of
#: viewers goes out over several turns, so incoming telemetry is never held up
#: for more than a few milliseconds.
DELIVERIES_PER_TURN: Final = 100


@attrs.define(eq=False)
class Batch:
    """One ``vehicle:telemetry:batch``, encoded once for every viewer it goes to."""

    data: bytes
    """The event's ``data`` object as JSON."""
    count: int
    #: The vehicles in it, so a viewer that cannot take it now can keep just their latest.
    states: list[VehicleState]
    _frames: dict[Hashable, Any] = attrs.field(factory=dict, init=False)

    def framed(self, key: Hashable, frame: Callable[[Batch], T]) -> T:
        """``frame(self)``, computed once per ``key``: adapters cache their wire frame here."""
        try:
            return self._frames[key]  # type: ignore[no-any-return]
        except KeyError:
            framed = self._frames[key] = frame(self)
            return framed


class Viewer(Hashable, Protocol):
    def deliver(self, batch: Batch) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


def _batch_of(states: list[VehicleState], batch_id: bytes, now_ms: int) -> Batch:
    """A batch of these vehicles' last flushed points (encoded once, at the flush)."""
    points = [state.flushed for state in states]
    data = b'{"batchId":"%s","timestamp":%d,"dataPoints":[%s],"count":%d}' % (
        batch_id,
        now_ms,
        b",".join(points),
        len(points),
    )
    return Batch(data, len(points), states)


class Hub:
    log = Logger()

    def __init__(
        self, clock: IReactorTime, batch_interval: float = 1.0, vehicle_ttl: float = 86400.0
    ) -> None:
        self.clock = clock
        self.batch_interval = batch_interval
        self.vehicle_ttl = vehicle_ttl
        self.registry: SubscriptionRegistry[Viewer] = SubscriptionRegistry()
        self.buffer = LatestBuffer()
        self.viewers: set[Viewer] = set()
        self.telemetry_received = 0
        self.telemetry_rejected = 0
        self.total_batches = 0
        self.total_points = 0
        self.batches_delivered = 0
        self.slow_viewers_dropped = 0
        #: Viewers that could not take their batches and hold newer points for later.
        self.holding: set[Viewer] = set()
        #: Batches built but not yet handed to their viewer, oldest first.
        self._outbox: deque[tuple[Viewer, Batch]] = deque()
        self._sending: IDelayedCall | None = None
        self._batch_ids = itertools.count(1)
        self._all_gone: list[Deferred[None]] = []
        self.started_at = clock.seconds()
        self._flush_loop = LoopingCall(self.flush)
        self._flush_loop.clock = clock
        self._expiry_loop = LoopingCall(self.expire)
        self._expiry_loop.clock = clock

    # Lifecycle

    def start(self) -> None:
        self.started_at = self.clock.seconds()
        self._flush_loop.start(self.batch_interval, now=False)
        self._expiry_loop.start(min(self.vehicle_ttl, 60.0), now=False)

    def stop(self) -> None:
        """Stop the loops and flush what is buffered, so nothing accepted is lost."""
        for loop in (self._flush_loop, self._expiry_loop):
            if loop.running:
                loop.stop()
        self.flush()
        if self._sending is not None:
            self._sending.cancel()
        self._send(len(self._outbox))

    def uptime(self) -> float:
        return round(self.clock.seconds() - self.started_at, 3)

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # Viewers

    def connect(self, viewer: Viewer) -> None:
        self.viewers.add(viewer)

    def disconnect(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        self.holding.discard(viewer)
        self.registry.remove_viewer(viewer)
        if not self.viewers:
            waiting, self._all_gone = self._all_gone, []
            for gone in waiting:
                gone.callback(None)

    def when_empty(self) -> Deferred[None]:
        """Fires once no viewer is connected (at once if none is)."""
        if not self.viewers:
            return succeed(None)
        gone: Deferred[None] = Deferred()
        self._all_gone.append(gone)
        return gone

    def close_all(self, code: int, reason: str) -> Deferred[None]:
        """Ask every viewer to close; fires once all of them have disconnected."""
        gone = self.when_empty()
        for viewer in list(self.viewers):
            viewer.close(code, reason)
        return gone

    def subscribe(self, viewer: Viewer, vehicle_id: str) -> bool:
        return self.registry.subscribe(viewer, vehicle_id)

    def unsubscribe(self, viewer: Viewer, vehicle_id: str) -> bool:
        return self.registry.unsubscribe(viewer, vehicle_id)

    def snapshot(self, vehicle_id: str, may_watch: VehicleFilter | None = None) -> Batch | None:
        """The last flushed point of a vehicle (of all it may watch, for the wildcard)."""
        if vehicle_id == WILDCARD:
            states = self.buffer.flushed()
            if may_watch is not None:
                states = [s for s in states if may_watch(s.point.vehicle_id)]
        else:
            states = self.buffer.flushed(vehicle_id)
        return self.batch_of(states)

    def batch_of(self, states: list[VehicleState]) -> Batch | None:
        """A batch of these vehicles' last flushed points, for one viewer; None if empty."""
        if not states:
            return None
        now_ms = self.now_ms()
        return _batch_of(states, self._next_batch_id(now_ms), now_ms)

    # Telemetry

    def ingest(self, point: TelemetryPoint, now: float | None = None) -> bool:
        """Take a validated point; False if it is stale and will not be delivered."""
        self.telemetry_received += 1
        return self.buffer.offer(point, self.clock.seconds() if now is None else now)

    def record_rejected(self, count: int = 1) -> None:
        self.telemetry_rejected += count

    def flush(self) -> None:
        changed = self.buffer.drain()
        if not changed:
            return
        now_ms = self.now_ms()
        batch_id = self._next_batch_id(now_ms)
        self.total_batches += 1
        self.total_points += len(changed)
        everything = list(changed.values())
        outbox = self._outbox
        for audience in self.registry.audiences():
            if audience.wildcard:
                may_watch = audience.may_watch
                states = (
                    everything
                    if may_watch is None
                    else [s for v, s in changed.items() if may_watch(v)]
                )
            elif len(audience.vehicles) < len(changed):
                states = [changed[v] for v in audience.vehicles if v in changed]
            else:
                states = [s for v, s in changed.items() if v in audience.vehicles]
            if not states:
                continue
            batch = _batch_of(states, batch_id, now_ms)
            outbox.extend((viewer, batch) for viewer in audience.members)
        self.log.debug(
            "flushed {points} points, {deliveries} batches to send",
            points=len(changed),
            deliveries=len(outbox),
        )
        self._send(DELIVERIES_PER_TURN)

    def _send(self, count: int) -> None:
        """Hand up to ``count`` queued batches to their viewers; the rest next turn."""
        self._sending = None
        outbox, viewers = self._outbox, self.viewers
        for _ in range(min(count, len(outbox))):
            viewer, batch = outbox.popleft()
            if viewer in viewers:  # It may have gone since the flush.
                viewer.deliver(batch)
                self.batches_delivered += 1
        if outbox:
            self._sending = self.clock.callLater(0, self._send, DELIVERIES_PER_TURN)

    def expire(self) -> None:
        expired = self.buffer.expire(self.clock.seconds() - self.vehicle_ttl)
        if expired:
            self.log.info(
                "forgot {count} vehicles silent for {ttl} s", count=expired, ttl=self.vehicle_ttl
            )

    def _next_batch_id(self, now_ms: int) -> bytes:
        return b"batch_%d_%d" % (now_ms, next(self._batch_ids))

    # Figures

    def stats(self, include_vehicle_details: bool = False) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "connectedClients": len(self.viewers),
            "activeVehicles": self.buffer.known_count,
            "totalTelemetryReceived": self.telemetry_received,
            "totalTelemetryRejected": self.telemetry_rejected,
            "subscriptions": self.registry.stats(),
            "batcher": {
                "totalBatches": self.total_batches,
                "totalPoints": self.total_points,
                "totalVehicleUpdates": self.buffer.updates,
                "batchesDelivered": self.batches_delivered,
                "pendingBatches": len(self._outbox) + len(self.holding),
                "bufferedVehicles": self.buffer.pending_count,
                "staleDropped": self.buffer.stale_dropped,
            },
            "slowViewersDropped": self.slow_viewers_dropped,
        }
        if include_vehicle_details:
            stats["vehicles"] = {
                state.point.vehicle_id: {
                    "subscribers": len(self.registry.subscribers(state.point.vehicle_id)),
                    "lastSeen": int(state.seen_at * 1000),
                    "lastTimestamp": state.point.timestamp,
                }
                for state in self.buffer.known()
            }
        return stats
