"""One client's conversation with the hub, independent of the transport carrying it.

An adapter decodes frames into :class:`~fleettrack.wire.Message` objects,
hands them to :meth:`Session.handle`, and implements :class:`Connection` to
carry the answers back. Every bad message is answered (an ``ack`` with
``success: false`` when the client asked for one, an ``error`` event
otherwise) and never ends the conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from fleettrack.errors import ErrorCode, ProtocolError
from fleettrack.hub import Batch, Hub
from fleettrack.registry import WILDCARD
from fleettrack.telemetry import parse_point, validate_vehicle_id
from fleettrack.wire import Message

#: Gateways relay many vehicles in one message; this bounds one message's work.
MAX_POINTS_PER_MESSAGE: Final = 1000


class Connection(Protocol):
    def send_event(self, event: str, data: Any) -> None: ...

    def send_ack(self, ack: int, data: Any) -> None: ...

    def send_batch(self, batch: Batch) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


Handler = Callable[["Session", Any], dict[str, Any]]


def _request_object(data: Any) -> dict[str, Any]:
    if type(data) is not dict:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "data must be a JSON object", "data")
    return data


def _subscription_target(data: Any) -> str:
    vehicle_id = _request_object(data).get("vehicleId")
    return WILDCARD if vehicle_id == WILDCARD else validate_vehicle_id(vehicle_id)


class Session:
    def __init__(self, hub: Hub, connection: Connection) -> None:
        self.hub = hub
        self.connection = connection

    # The hub's side: a Session is the hub's Viewer.

    def deliver(self, batch: Batch) -> None:
        self.connection.send_batch(batch)

    def close(self, code: int, reason: str) -> None:
        self.connection.close(code, reason)

    # The client's side.

    def handle(self, message: Message) -> None:
        event, data, ack = message
        handler = _HANDLERS.get(event) if type(event) is str else None
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_EVENT, f"unknown event {event!r}", "event")
            result = handler(self, data)
        except ProtocolError as error:
            self.report(error, ack)
            return
        if ack is not None:
            self.connection.send_ack(ack, {**result, "success": True})
        elif event in _REPLY_WITHOUT_ACK:
            self.connection.send_event(_REPLY_WITHOUT_ACK[event], result)

    def report(self, error: ProtocolError, ack: int | None = None) -> None:
        """Tell the client about a message it got wrong."""
        if ack is None:
            data: dict[str, Any] = error.as_dict()
            data["timestamp"] = self.hub.now_ms()
            self.connection.send_event("error", data)
        else:
            self.connection.send_ack(ack, {"success": False, "error": error.as_dict()})

    def _subscribe(self, data: Any) -> dict[str, Any]:
        vehicle_id = _subscription_target(data)
        added = self.hub.subscribe(self, vehicle_id)
        subscribed_at = self.hub.now_ms()
        confirmation = {"vehicleId": vehicle_id, "subscribedAt": subscribed_at}
        self.connection.send_event("subscription:confirmed", confirmation)
        if added:
            snapshot = self.hub.snapshot(vehicle_id)
            if snapshot is not None:
                self.connection.send_batch(snapshot)
        return {**confirmation, "alreadySubscribed": not added}

    def _unsubscribe(self, data: Any) -> dict[str, Any]:
        vehicle_id = _subscription_target(data)
        was_subscribed = self.hub.unsubscribe(self, vehicle_id)
        if was_subscribed:
            self.connection.send_event("subscription:removed", {"vehicleId": vehicle_id})
        return {"vehicleId": vehicle_id, "wasSubscribed": was_subscribed}

    def _telemetry(self, data: Any) -> dict[str, Any]:
        now_ms = self.hub.now_ms()
        if type(data) is not list:
            try:
                point = parse_point(data, now_ms)
            except ProtocolError:
                self.hub.record_rejected()
                raise
            return _ONE_ACCEPTED if self.hub.ingest(point) else _ONE_STALE
        if len(data) > MAX_POINTS_PER_MESSAGE:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"at most {MAX_POINTS_PER_MESSAGE} points per message",
                "data",
            )
        accepted = stale = 0
        rejected: list[dict[str, Any]] = []
        for index, raw in enumerate(data):
            try:
                point = parse_point(raw, now_ms)
            except ProtocolError as error:
                rejected.append({"index": index, **error.as_dict()})
                continue
            if self.hub.ingest(point):
                accepted += 1
            else:
                stale += 1
        if rejected:
            self.hub.record_rejected(len(rejected))
        return {"accepted": accepted, "stale": stale, "rejected": rejected}

    def _stats(self, data: Any) -> dict[str, Any]:
        details = (
            False if data is None else _request_object(data).get("includeVehicleDetails", False)
        )
        if type(details) is not bool:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                "includeVehicleDetails must be a boolean",
                "includeVehicleDetails",
            )
        return self.hub.stats(include_vehicle_details=details)


_HANDLERS: Final[dict[str, Handler]] = {
    "subscribe:vehicle": Session._subscribe,
    "unsubscribe:vehicle": Session._unsubscribe,
    "vehicle:telemetry": Session._telemetry,
    "request:stats": Session._stats,
}

# Shared, never mutated: the answer to nearly every message, which is one fresh point.
_ONE_ACCEPTED: Final[dict[str, Any]] = {"accepted": 1, "stale": 0, "rejected": []}
_ONE_STALE: Final[dict[str, Any]] = {"accepted": 0, "stale": 1, "rejected": []}

#: Requests whose whole point is the answer get it as an event when they carry no ack.
_REPLY_WITHOUT_ACK: Final[dict[object, str]] = {"request:stats": "stats"}
