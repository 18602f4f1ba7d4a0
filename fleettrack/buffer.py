"""The latest-only buffer: per vehicle, the newest point, however chatty the vehicle.

It holds two views of the same per-vehicle state: every vehicle heard from
within the TTL (its last known point, for snapshots) and the vehicles whose
point changed since the last flush. A point older than the vehicle's newest
known point is stale and never replaces it; equal timestamps let the later
arrival win.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

from fleettrack.telemetry import TelemetryPoint


@attrs.define(eq=False)
class VehicleState:
    point: TelemetryPoint
    #: Server clock (seconds) when the vehicle was last heard from.
    seen_at: float
    _encoded: bytes | None = None
    #: The JSON of the last point flushed to viewers (empty until the first flush):
    #: what a new subscriber is sent at once.
    flushed: bytes = b""

    @property
    def encoded(self) -> bytes:
        """The point's JSON, encoded once however many viewers receive it."""
        if self._encoded is None:
            self._encoded = self.point.encode()
        return self._encoded

    def replace(self, point: TelemetryPoint, now: float) -> None:
        self.point = point
        self.seen_at = now
        self._encoded = None


class LatestBuffer:
    def __init__(self) -> None:
        # Ordered by seen_at, oldest first, so expiry stops at the first survivor.
        self._known: OrderedDict[str, VehicleState] = OrderedDict()
        self._pending: dict[str, VehicleState] = {}
        self.stale_dropped = 0
        self.updates = 0

    def offer(self, point: TelemetryPoint, now: float) -> bool:
        """Take a point; False if it is older than what the vehicle already sent."""
        vehicle_id = point.vehicle_id
        state = self._known.get(vehicle_id)
        if state is None:
            state = self._known[vehicle_id] = VehicleState(point, now)
        else:
            self._known.move_to_end(vehicle_id)
            if point.timestamp < state.point.timestamp:
                state.seen_at = now
                self.stale_dropped += 1
                return False
            state.replace(point, now)
        self._pending[vehicle_id] = state
        self.updates += 1
        return True

    def drain(self) -> dict[str, VehicleState]:
        """The vehicles that changed since the last drain, now flushed; the buffer starts empty."""
        pending, self._pending = self._pending, {}
        for state in pending.values():
            state.flushed = state.encoded
        return pending

    def latest(self, vehicle_id: str) -> VehicleState | None:
        return self._known.get(vehicle_id)

    def known(self) -> list[VehicleState]:
        return list(self._known.values())

    def flushed(self, vehicle_id: str | None = None) -> list[VehicleState]:
        """One vehicle, or every vehicle, that has been flushed at least once.

        A subscriber gets their last flushed points at once; a newer pending
        point follows in the next flush, so no point reaches a viewer twice.
        """
        if vehicle_id is None:
            return [state for state in self._known.values() if state.flushed]
        state = self._known.get(vehicle_id)
        return [] if state is None or not state.flushed else [state]

    def expire(self, silent_since: float) -> int:
        """Forget vehicles not heard from since ``silent_since``; return how many."""
        expired = 0
        while self._known:
            vehicle_id, state = next(iter(self._known.items()))
            if state.seen_at >= silent_since:
                break
            del self._known[vehicle_id]
            self._pending.pop(vehicle_id, None)
            expired += 1
        return expired

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def known_count(self) -> int:
        return len(self._known)
