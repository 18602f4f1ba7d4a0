"""Telemetry points: the model, its validation and its wire form.

Validation runs once per received point, so it is written for speed: exact
``type()`` checks (a JSON boolean is not a number) and no intermediate objects.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeGuard

import attrs
import orjson

from fleettrack.errors import ErrorCode, ProtocolError

AttributeValue = str | int | float | bool

VEHICLE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
MAX_FUTURE_MS: Final = 5 * 60 * 1000
#: Timestamps before 2000-01-01 are almost always seconds sent as milliseconds.
MIN_TIMESTAMP_MS: Final = 946_684_800_000
MAX_SPEED_KMH: Final = 2000
MAX_ATTRIBUTES: Final = 32
MAX_ATTRIBUTE_KEY_LENGTH: Final = 64
MAX_POINT_BYTES: Final = 2048

_KNOWN_FIELDS: Final = frozenset(
    {
        "vehicleId",
        "timestamp",
        "latitude",
        "longitude",
        "speed",
        "bearing",
        "altitude",
        "accuracy",
        "attributes",
    }
)


@attrs.define(slots=True, eq=True)
class TelemetryPoint:
    """One validated GPS fix of one vehicle."""

    vehicle_id: str
    timestamp: int
    latitude: float
    longitude: float
    speed: float | None = None
    bearing: float | None = None
    altitude: float | None = None
    accuracy: float | None = None
    attributes: dict[str, AttributeValue] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object clients receive, in the protocol's field names."""
        wire: dict[str, Any] = {
            "vehicleId": self.vehicle_id,
            "timestamp": self.timestamp,
            "latitude": self.latitude,
            "longitude": self.longitude,
        }
        if self.speed is not None:
            wire["speed"] = self.speed
        if self.bearing is not None:
            wire["bearing"] = self.bearing
        if self.altitude is not None:
            wire["altitude"] = self.altitude
        if self.accuracy is not None:
            wire["accuracy"] = self.accuracy
        if self.attributes:
            wire["attributes"] = self.attributes
        return wire

    def encode(self) -> bytes:
        return orjson.dumps(self.to_wire())


def _invalid(field: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_TELEMETRY, message, field)


#: orjson encodes integers in this range; anything larger could not be delivered.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


def _is_number(value: Any) -> TypeGuard[float]:
    """A finite JSON number that can be encoded again; booleans are not numbers."""
    kind = type(value)
    if kind is float:
        return bool(value - value == 0.0)  # False for inf and nan
    return kind is int and _INT_MIN <= value <= _INT_MAX


def validate_vehicle_id(value: object, field: str = "vehicleId") -> str:
    """Return ``value`` if it is a well-formed vehicle id, else raise INVALID_VEHICLE_ID."""
    if type(value) is str and _VEHICLE_ID_MATCH(value):
        return value
    raise ProtocolError(
        ErrorCode.INVALID_VEHICLE_ID,
        "vehicleId must be 1-64 characters of A-Z a-z 0-9 _ . : -",
        field,
    )


_VEHICLE_ID_MATCH: Final = VEHICLE_ID_PATTERN.fullmatch


def _number_error(field: str, value: object, bounds: str, required: bool = False) -> ProtocolError:
    if value is None or not _is_number(value):
        return _invalid(
            field, f"{field} {'is required and ' if required else ''}must be a finite number"
        )
    return _invalid(field, f"{field} out of range: {bounds}")


def _timestamp_error(value: object, now_ms: int) -> ProtocolError:
    if type(value) is not int:
        return _invalid(
            "timestamp", "timestamp is required: integer milliseconds since the Unix epoch"
        )
    if value < MIN_TIMESTAMP_MS:
        return _invalid(
            "timestamp", "timestamp is before 2000-01-01: send milliseconds, not seconds"
        )
    return _invalid("timestamp", "timestamp is more than 5 minutes in the future")


def _attribute(key: object, value: object, key_field: str, value_field: str) -> AttributeValue:
    if type(key) is not str or not 0 < len(key) <= MAX_ATTRIBUTE_KEY_LENGTH:
        raise _invalid(
            key_field, f"attribute names must be 1-{MAX_ATTRIBUTE_KEY_LENGTH} characters"
        )
    kind = type(value)
    if kind is str or kind is bool or _is_number(value):
        return value  # type: ignore[return-value]
    raise _invalid(value_field, "attribute values must be strings, finite numbers or booleans")


def _attributes(raw: dict[str, Any]) -> dict[str, AttributeValue] | None:
    """The point's attributes, with unknown top-level scalars moved in.

    Clients of the original service send extra fields: their scalar values are
    kept as attributes (an explicit attribute of the same name wins); object and
    array values, which an attribute cannot hold, are dropped.
    """
    given = raw.get("attributes")
    if given is None:
        attributes: dict[str, AttributeValue] = {}
    elif type(given) is dict:
        attributes = {
            key: _attribute(key, value, "attributes", f"attributes.{key}")
            for key, value in given.items()
        }
    else:
        raise _invalid("attributes", "attributes must be an object")
    for key, value in raw.items():
        if key in _KNOWN_FIELDS or key in attributes or value is None:
            continue
        if type(value) is not dict and type(value) is not list:
            attributes[key] = _attribute(key, value, key, key)
    if len(attributes) > MAX_ATTRIBUTES:
        raise _invalid("attributes", f"at most {MAX_ATTRIBUTES} attributes are allowed")
    return attributes or None


def parse_point(raw: object, now_ms: int) -> TelemetryPoint:
    """Validate one telemetry object as received and build its point.

    Raises :class:`ProtocolError` naming the first offending field. Runs once
    per received point, so the common case is checked inline: a bounded range
    check on an int or float also refuses nan and infinities (every
    comparison with nan is false), so only unbounded fields need
    :func:`_is_number`.
    """
    if type(raw) is not dict:
        raise ProtocolError(ErrorCode.INVALID_TELEMETRY, "telemetry must be a JSON object", "data")
    get = raw.get
    vehicle_id = get("vehicleId")
    if type(vehicle_id) is not str or not _VEHICLE_ID_MATCH(vehicle_id):
        vehicle_id = validate_vehicle_id(vehicle_id)  # raises, with the message
    timestamp = get("timestamp")
    if type(timestamp) is not int or not MIN_TIMESTAMP_MS <= timestamp <= now_ms + MAX_FUTURE_MS:
        raise _timestamp_error(timestamp, now_ms)
    latitude: Any = get("latitude")
    kind = type(latitude)
    if not ((kind is float or kind is int) and -90 <= latitude <= 90):
        raise _number_error("latitude", latitude, "-90 <= latitude <= 90", required=True)
    longitude: Any = get("longitude")
    kind = type(longitude)
    if not ((kind is float or kind is int) and -180 <= longitude <= 180):
        raise _number_error("longitude", longitude, "-180 <= longitude <= 180", required=True)
    speed = get("speed")
    kind = type(speed)
    if speed is not None and not ((kind is float or kind is int) and 0 <= speed <= MAX_SPEED_KMH):
        raise _number_error("speed", speed, f"0 <= speed <= {MAX_SPEED_KMH}")
    bearing = get("bearing")
    kind = type(bearing)
    if bearing is not None and not ((kind is float or kind is int) and 0 <= bearing < 360):
        raise _number_error("bearing", bearing, "0 <= bearing < 360")
    altitude = get("altitude")
    if altitude is not None and not _is_number(altitude):
        raise _number_error("altitude", altitude, "finite")
    accuracy = get("accuracy")
    if accuracy is not None and not (_is_number(accuracy) and accuracy >= 0):
        raise _number_error("accuracy", accuracy, "accuracy >= 0")
    if "attributes" not in raw and raw.keys() <= _KNOWN_FIELDS:
        return TelemetryPoint(
            vehicle_id, timestamp, latitude, longitude, speed, bearing, altitude, accuracy
        )
    point = TelemetryPoint(
        vehicle_id,
        timestamp,
        latitude,
        longitude,
        speed,
        bearing,
        altitude,
        accuracy,
        _attributes(raw),
    )
    if point.attributes is not None and len(point.encode()) > MAX_POINT_BYTES:
        raise _invalid("attributes", f"a point must serialise to at most {MAX_POINT_BYTES} bytes")
    return point
