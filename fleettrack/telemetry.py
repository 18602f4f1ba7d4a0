"""Telemetry points: the model, its validation and its wire form.

Validation runs once per received point, so it is written for speed: exact
``type()`` checks (a JSON boolean is not a number) and no intermediate objects.
"""

from __future__ import annotations

import math
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


def _is_number(value: object) -> TypeGuard[float]:
    kind = type(value)
    if kind is int:
        return True
    return kind is float and math.isfinite(value)  # type: ignore[arg-type]


def validate_vehicle_id(value: object, field: str = "vehicleId") -> str:
    """Return ``value`` if it is a well-formed vehicle id, else raise INVALID_VEHICLE_ID."""
    if type(value) is str and VEHICLE_ID_PATTERN.fullmatch(value):
        return value
    raise ProtocolError(
        ErrorCode.INVALID_VEHICLE_ID,
        "vehicleId must be 1-64 characters of A-Z a-z 0-9 _ . : -",
        field,
    )


def _coordinate(raw: dict[str, Any], field: str, limit: int) -> float:
    value = raw.get(field)
    if not _is_number(value):
        raise _invalid(field, f"{field} is required and must be a finite number")
    if not -limit <= value <= limit:
        raise _invalid(field, f"{field} must be between -{limit} and {limit}")
    return value


def _optional_number(
    raw: dict[str, Any],
    field: str,
    low: float | None,
    high: float | None,
    *,
    high_open: bool = False,
) -> float | None:
    value = raw.get(field)
    if value is None:
        return None
    if not _is_number(value):
        raise _invalid(field, f"{field} must be a finite number")
    if (low is not None and value < low) or (
        high is not None and (value >= high if high_open else value > high)
    ):
        bounds = (
            f"{low} <= {field} {'<' if high_open else '<='} {high}"
            if high is not None
            else (f"{field} >= {low}")
        )
        raise _invalid(field, f"{field} out of range: {bounds}")
    return value


def _attribute(key: object, value: object) -> AttributeValue:
    if type(key) is not str or not 0 < len(key) <= MAX_ATTRIBUTE_KEY_LENGTH:
        raise _invalid(
            "attributes", f"attribute names must be 1-{MAX_ATTRIBUTE_KEY_LENGTH} characters"
        )
    kind = type(value)
    if kind is str or kind is bool or kind is int or (kind is float and math.isfinite(value)):  # type: ignore[arg-type]
        return value  # type: ignore[return-value]
    raise _invalid(
        f"attributes.{key}", "attribute values must be strings, finite numbers or booleans"
    )


def _attributes(raw: dict[str, Any]) -> dict[str, AttributeValue] | None:
    given = raw.get("attributes")
    if given is None:
        attributes: dict[str, AttributeValue] = {}
    elif type(given) is dict:
        attributes = {key: _attribute(key, value) for key, value in given.items()}
    else:
        raise _invalid("attributes", "attributes must be an object")
    if len(raw) > len(_KNOWN_FIELDS & raw.keys()):
        # Clients of the original service send extra fields: keep the scalars as attributes.
        for key, value in raw.items():
            if key not in _KNOWN_FIELDS and value is not None:
                attributes[key] = _attribute(key, value)
    if len(attributes) > MAX_ATTRIBUTES:
        raise _invalid("attributes", f"at most {MAX_ATTRIBUTES} attributes are allowed")
    return attributes or None


def parse_point(raw: object, now_ms: int) -> TelemetryPoint:
    """Validate one telemetry object as received and build its point.

    Raises :class:`ProtocolError` naming the first offending field.
    """
    if type(raw) is not dict:
        raise ProtocolError(ErrorCode.INVALID_TELEMETRY, "telemetry must be a JSON object", "data")
    vehicle_id = validate_vehicle_id(raw.get("vehicleId"))
    timestamp = raw.get("timestamp")
    if type(timestamp) is not int:
        raise _invalid(
            "timestamp", "timestamp is required: integer milliseconds since the Unix epoch"
        )
    if timestamp < MIN_TIMESTAMP_MS:
        raise _invalid(
            "timestamp", "timestamp is before 2000-01-01: send milliseconds, not seconds"
        )
    if timestamp > now_ms + MAX_FUTURE_MS:
        raise _invalid("timestamp", "timestamp is more than 5 minutes in the future")
    point = TelemetryPoint(
        vehicle_id,
        timestamp,
        _coordinate(raw, "latitude", 90),
        _coordinate(raw, "longitude", 180),
        _optional_number(raw, "speed", 0, MAX_SPEED_KMH),
        _optional_number(raw, "bearing", 0, 360, high_open=True),
        _optional_number(raw, "altitude", None, None),
        _optional_number(raw, "accuracy", 0, None),
        _attributes(raw),
    )
    if point.attributes is not None and len(point.encode()) > MAX_POINT_BYTES:
        raise _invalid("attributes", f"a point must serialise to at most {MAX_POINT_BYTES} bytes")
    return point
