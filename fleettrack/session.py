"""One client's conversation with the hub, independent of the transport carrying it.

An adapter decodes frames into :class:`~fleettrack.wire.Message` objects,
hands them to :meth:`Session.handle`, and implements :class:`Connection` to
carry the answers back. Every bad message is answered (an ``ack`` with
``success: false`` when the client asked for one, an ``error`` event
otherwise) and never ends the conversation; only the policy's limits do
(an unauthenticated or expired token, a flood, a viewer that stopped reading).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall

from fleettrack.auth import OPEN, Grant, TokenVerifier
from fleettrack.buffer import VehicleState
from fleettrack.errors import CloseCode, ErrorCode, ProtocolError
from fleettrack.hub import Batch, Hub
from fleettrack.limits import Limits, TokenBucket
from fleettrack.registry import WILDCARD
from fleettrack.telemetry import TelemetryPoint, parse_point, validate_vehicle_id
from fleettrack.wire import Message

#: Gateways relay many vehicles in one message; this bounds one message's work.
MAX_POINTS_PER_MESSAGE: Final = 1000
#: Seconds without a refused message that end a flood.
FLOOD_QUIET: Final = 1.0


class Connection(Protocol):
    def send_event(self, event: str, data: Any) -> None: ...

    def send_ack(self, ack: int, data: Any) -> None: ...

    def send_batch(self, batch: Batch) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


@attrs.frozen
class Policy:
    """How the server treats every connection: who it is, and what it may cost."""

    #: None: no authentication, every connection holds the OPEN grant.
    verifier: TokenVerifier | None = None
    limits: Limits = attrs.field(factory=Limits)


#: (session, the message's data, the server clock in seconds) -> the ack's data.
Handler = Callable[["Session", Any, float], dict[str, Any]]


_JSON_TYPES: Final = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}


def _unknown(event: object) -> str:
    # Never repr() client data: it may be huge, or nested deep enough to overflow the stack.
    if type(event) is str:
        return f"unknown event {event[:64]!r}"
    return f"event must be a string, not {_JSON_TYPES.get(type(event), 'a number')}"


def _request_object(data: Any) -> dict[str, Any]:
    if type(data) is not dict:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "data must be a JSON object", "data")
    return data


def _subscription_target(data: Any) -> str:
    vehicle_id = _request_object(data).get("vehicleId")
    return WILDCARD if vehicle_id == WILDCARD else validate_vehicle_id(vehicle_id)


class Session:
    def __init__(self, hub: Hub, connection: Connection, policy: Policy = Policy()) -> None:
        self.hub = hub
        self.connection = connection
        self.policy = policy
        limits = policy.limits
        now = hub.clock.seconds()
        self.grant: Grant | None = OPEN if policy.verifier is None else None
        self.closing = False
        self._messages = TokenBucket(limits.messages_per_second, limits.message_burst, now)
        self._points = TokenBucket(limits.points_per_second, limits.points_per_second, now)
        self._flooding_since: float | None = None
        self._last_limited = 0.0
        #: While the connection cannot take data: per vehicle, what it still needs.
        self._held: dict[str, VehicleState] | None = None
        self._timers: dict[str, IDelayedCall] = {}

    # Lifecycle, driven by the adapter.

    def open(self, token: str | None = None) -> None:
        """The connection is up; ``token`` is one given in the URL, if any."""
        self.hub.connect(self)
        if self.grant is None:
            timeout = self.policy.limits.auth_timeout
            self._start_timer("auth", timeout, self._unauthorized, "not authenticated in time")
            if token is not None:
                try:
                    self._authenticate(token, self.hub.clock.seconds())
                except ProtocolError as error:
                    self.close(CloseCode.UNAUTHORIZED, error.message)

    def closed(self) -> None:
        """The connection is gone: forget everything about it."""
        self._stop_timers()
        self.hub.disconnect(self)

    # The hub's side: a Session is the hub's Viewer.

    def deliver(self, batch: Batch) -> None:
        held = self._held
        if held is None:
            self.connection.send_batch(batch)
            return
        for state in batch.states:
            held[state.point.vehicle_id] = state
        self.hub.holding.add(self)

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._stop_timers()
        self.connection.close(code, reason)

    # Flow control, from the transport.

    def pause(self) -> None:
        """The connection's buffers are full: hold the newest point per vehicle instead."""
        if self._held is None:
            self._held = {}
            timeout = self.policy.limits.slow_viewer_timeout
            self._start_timer("stall", timeout, self._too_slow)

    def resume(self) -> None:
        """The connection takes data again: send what was held, as one batch."""
        held, self._held = self._held, None
        self._stop_timer("stall")
        self.hub.holding.discard(self)
        if not held:
            return
        # Only what the viewer still watches: it may have unsubscribed or
        # re-authenticated with fewer rights while it was not reading.
        subscriptions = self.hub.registry.subscriptions(self)
        grant = self.grant or OPEN
        everything = WILDCARD in subscriptions
        batch = self.hub.batch_of(
            [
                state
                for vehicle_id, state in held.items()
                if vehicle_id in subscriptions or (everything and grant.may_watch(vehicle_id))
            ]
        )
        if batch is not None:
            self.connection.send_batch(batch)

    # The client's side.

    def handle(self, message: Message) -> None:
        if self.closing:
            return
        event, data, ack = message
        now = self.hub.clock.seconds()
        if not self._messages.take(now):
            self._rate_limited(now, ack)
            return
        handler = _HANDLERS.get(event) if type(event) is str else None
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_EVENT, _unknown(event), "event")
            if self.grant is None and handler is not Session._auth:
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED, "authenticate first: send an auth event with a token"
                )
            result = handler(self, data, now)
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

    def _auth(self, data: Any, now: float) -> dict[str, Any]:
        grant = self._authenticate(_request_object(data).get("token"), now)
        expires_at = None if grant.expires_at == OPEN.expires_at else int(grant.expires_at * 1000)
        return {"subject": grant.subject, "expiresAt": expires_at}

    def _authenticate(self, token: object, now: float) -> Grant:
        verifier = self.policy.verifier
        if verifier is None:
            return OPEN
        grant = verifier.verify(token if isinstance(token, str) else None, now)
        self._stop_timer("auth")
        self._start_timer("expiry", grant.seconds_left(now), self._unauthorized, "token expired")
        if self.grant is None or self.grant.watch_scope != grant.watch_scope:
            self._apply_watch(grant)
        self.grant = grant
        return grant

    def _apply_watch(self, grant: Grant) -> None:
        """Keep only the subscriptions the new grant allows; filter its wildcard."""
        for vehicle_id in list(self.hub.registry.subscriptions(self)):
            if vehicle_id != WILDCARD and not grant.may_watch(vehicle_id):
                self.hub.unsubscribe(self, vehicle_id)
                self.connection.send_event("subscription:removed", {"vehicleId": vehicle_id})
        scope = None if grant.watches_everything else (grant.watch_scope, grant.may_watch)
        self.hub.registry.restrict(self, scope)

    def _subscribe(self, data: Any, now: float) -> dict[str, Any]:
        vehicle_id = _subscription_target(data)
        grant = self.grant or OPEN
        if vehicle_id != WILDCARD:
            grant.check_watch(vehicle_id)
        subscriptions = self.hub.registry.subscriptions(self)
        limit = self.policy.limits.max_subscriptions
        if vehicle_id not in subscriptions and len(subscriptions) >= limit:
            raise ProtocolError(
                ErrorCode.SUBSCRIPTION_LIMIT,
                f"at most {limit} subscriptions per connection",
                "vehicleId",
            )
        added = self.hub.subscribe(self, vehicle_id)
        subscribed_at = self.hub.now_ms()
        confirmation = {"vehicleId": vehicle_id, "subscribedAt": subscribed_at}
        self.connection.send_event("subscription:confirmed", confirmation)
        if added:
            may_watch = None if grant.watches_everything else grant.may_watch
            snapshot = self.hub.snapshot(vehicle_id, may_watch)
            if snapshot is not None:
                self.deliver(snapshot)
        return {**confirmation, "alreadySubscribed": not added}

    def _unsubscribe(self, data: Any, now: float) -> dict[str, Any]:
        vehicle_id = _subscription_target(data)
        was_subscribed = self.hub.unsubscribe(self, vehicle_id)
        if was_subscribed:
            self.connection.send_event("subscription:removed", {"vehicleId": vehicle_id})
        return {"vehicleId": vehicle_id, "wasSubscribed": was_subscribed}

    def _point(self, raw: Any, now_ms: int) -> TelemetryPoint:
        point = parse_point(raw, now_ms)
        grant = self.grant
        if grant is not None and not grant.publishes_everything:
            grant.check_publish(point.vehicle_id)
        return point

    def _telemetry(self, data: Any, now: float) -> dict[str, Any]:
        now_ms = int(now * 1000)
        if type(data) is not list:
            try:
                point = self._point(data, now_ms)
            except ProtocolError:
                self.hub.record_rejected()
                raise
            return _ONE_ACCEPTED if self.hub.ingest(point, now) else _ONE_STALE
        if len(data) > MAX_POINTS_PER_MESSAGE:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"at most {MAX_POINTS_PER_MESSAGE} points per message",
                "data",
            )
        if not self._points.take(now, len(data)):
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"over {self.policy.limits.points_per_second:g} points per second",
                "data",
            )
        accepted = stale = 0
        rejected: list[dict[str, Any]] = []
        for index, raw in enumerate(data):
            try:
                point = self._point(raw, now_ms)
            except ProtocolError as error:
                rejected.append({"index": index, **error.as_dict()})
                continue
            if self.hub.ingest(point, now):
                accepted += 1
            else:
                stale += 1
        if rejected:
            self.hub.record_rejected(len(rejected))
        return {"accepted": accepted, "stale": stale, "rejected": rejected}

    def _stats(self, data: Any, now: float) -> dict[str, Any]:
        details = (
            False if data is None else _request_object(data).get("includeVehicleDetails", False)
        )
        if type(details) is not bool:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                "includeVehicleDetails must be a boolean",
                "includeVehicleDetails",
            )
        stats = self.hub.stats(include_vehicle_details=details)
        grant = self.grant or OPEN
        if not grant.watches_everything:
            # Vehicle ids are private: a restricted token sees only its own.
            counts = stats["subscriptions"]["vehicleSubscriptions"]
            stats["subscriptions"]["vehicleSubscriptions"] = {
                v: n for v, n in counts.items() if grant.may_watch(v)
            }
            if details:
                stats["vehicles"] = {
                    v: d for v, d in stats["vehicles"].items() if grant.may_watch(v)
                }
        return stats

    def _rate_limited(self, now: float, ack: int | None) -> None:
        limits = self.policy.limits
        # A flood lets one message through whenever a token comes back, so it
        # only counts as over when a whole second passes with nothing refused.
        if self._flooding_since is None or now - self._last_limited >= FLOOD_QUIET:
            self._flooding_since = now
        self._last_limited = now
        if now - self._flooding_since >= limits.flood_close_after:
            self.close(CloseCode.POLICY_VIOLATION, "message rate limit exceeded for too long")
            return
        message = (
            f"over {limits.messages_per_second:g} messages per second"
            f" (burst {limits.message_burst:g}): slow down"
        )
        self.report(ProtocolError(ErrorCode.RATE_LIMITED, message), ack)

    def _unauthorized(self, reason: str) -> None:
        self.close(CloseCode.UNAUTHORIZED, reason)

    def _too_slow(self) -> None:
        self.hub.slow_viewers_dropped += 1
        timeout = self.policy.limits.slow_viewer_timeout
        self.close(CloseCode.POLICY_VIOLATION, f"not reading: stalled for {timeout:g} s")

    def _start_timer(
        self, name: str, delay: float, expire: Callable[..., None], *args: str
    ) -> None:
        """Call ``expire(*args)`` after ``delay`` seconds unless the timer is stopped first."""
        self._stop_timer(name)
        if delay != float("inf"):
            self._timers[name] = self.hub.clock.callLater(delay, expire, *args)

    def _stop_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _stop_timers(self) -> None:
        for name in list(self._timers):
            self._stop_timer(name)


_HANDLERS: Final[dict[str, Handler]] = {
    "auth": Session._auth,
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
