"""Telemetry validation: each bad field gives its code and field; valid points round-trip."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from fleettrack.errors import ErrorCode, ProtocolError
from fleettrack.telemetry import (
    MAX_FUTURE_MS,
    MAX_POINT_BYTES,
    MIN_TIMESTAMP_MS,
    TelemetryPoint,
    parse_point,
    validate_vehicle_id,
)
from tests.fakes import EPOCH_MS, raw_point

NOW = EPOCH_MS
MISSING = object()


def with_field(field: str, value: Any) -> dict[str, Any]:
    raw = raw_point(timestamp=NOW)
    if value is MISSING:
        raw.pop(field, None)
    else:
        raw[field] = value
    return raw


def rejected(raw: object, now_ms: int = NOW) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_point(raw, now_ms)
    error = caught.value
    assert error.message, "every error carries a human-readable message"
    return error


def assert_invalid(raw: object, field: str, code: ErrorCode = ErrorCode.INVALID_TELEMETRY) -> None:
    error = rejected(raw)
    assert (error.code, error.field) == (code, field)
    assert error.as_dict() == {"code": code.value, "message": error.message, "field": field}


# Valid points


def test_minimal_point_parses_and_encodes_only_required_fields() -> None:
    point = parse_point(raw_point("truck_001", NOW), NOW)
    assert point == TelemetryPoint("truck_001", NOW, 40.7128, -74.006)
    assert orjson.loads(point.encode()) == {
        "vehicleId": "truck_001",
        "timestamp": NOW,
        "latitude": 40.7128,
        "longitude": -74.006,
    }


def test_full_point_round_trips_through_encode() -> None:
    raw = raw_point(
        "bus-12.a:B_9",
        NOW - 1234,
        latitude=-33.8688,
        longitude=151.2093,
        speed=88.25,
        bearing=359.5,
        altitude=-12.5,
        accuracy=3.2,
        attributes={"driver": "Ana", "doorsOpen": False, "fuel": 41, "temp": -3.5, "route": "42"},
    )
    point = parse_point(raw, NOW)
    assert point.vehicle_id == "bus-12.a:B_9"
    assert point.attributes == {
        "driver": "Ana",
        "doorsOpen": False,
        "fuel": 41,
        "temp": -3.5,
        "route": "42",
    }
    assert orjson.loads(point.encode()) == raw
    assert point.to_wire() == raw


def test_integers_stay_integers_and_zero_values_are_kept() -> None:
    raw = raw_point(latitude=0, longitude=0, speed=0, bearing=0, altitude=0, accuracy=0)
    point = parse_point(raw, NOW)
    decoded = orjson.loads(point.encode())
    assert decoded == raw
    assert all(type(decoded[key]) is int for key in ("latitude", "speed", "bearing", "altitude"))


def test_null_optional_fields_are_absent() -> None:
    raw = raw_point(speed=None, bearing=None, altitude=None, accuracy=None, attributes=None)
    point = parse_point(raw, NOW)
    assert (point.speed, point.bearing, point.altitude, point.accuracy) == (None,) * 4
    assert point.attributes is None
    assert set(orjson.loads(point.encode())) == {"vehicleId", "timestamp", "latitude", "longitude"}


def test_empty_attributes_are_not_sent() -> None:
    point = parse_point(raw_point(attributes={}), NOW)
    assert point.attributes is None
    assert "attributes" not in orjson.loads(point.encode())


def test_parse_point_does_not_modify_its_input() -> None:
    raw = raw_point(attributes={"a": 1}, driver="Bo")
    snapshot = orjson.loads(orjson.dumps(raw))
    parse_point(raw, NOW)
    assert raw == snapshot


# vehicleId


@pytest.mark.parametrize(
    "vehicle_id",
    [
        MISSING,
        None,
        "",
        "x" * 65,
        "truck 001",
        "truck/001",
        "truck#1",
        "camión",
        "truck\n",
        "\ntruck",
        "*",
        "٣",  # a non-ASCII digit
        123,
        12.5,
        True,
        ["truck_001"],
        {"id": "truck_001"},
    ],
    ids=repr,
)
def test_bad_vehicle_id(vehicle_id: Any) -> None:
    assert_invalid(with_field("vehicleId", vehicle_id), "vehicleId", ErrorCode.INVALID_VEHICLE_ID)


@pytest.mark.parametrize("vehicle_id", ["a", "x" * 64, "AZaz09_.:-", "truck_001", "0", "-", ":"])
def test_good_vehicle_id(vehicle_id: str) -> None:
    assert parse_point(with_field("vehicleId", vehicle_id), NOW).vehicle_id == vehicle_id
    assert validate_vehicle_id(vehicle_id) == vehicle_id


def test_validate_vehicle_id_names_the_field_it_is_given() -> None:
    with pytest.raises(ProtocolError) as caught:
        validate_vehicle_id("bad id", field="data.vehicleId")
    assert caught.value.code is ErrorCode.INVALID_VEHICLE_ID
    assert caught.value.field == "data.vehicleId"


def test_vehicle_id_is_checked_before_other_fields() -> None:
    raw = raw_point("bad id", latitude=500)
    assert_invalid(raw, "vehicleId", ErrorCode.INVALID_VEHICLE_ID)


# timestamp


@pytest.mark.parametrize(
    "timestamp",
    [
        MISSING,
        None,
        float(NOW),
        NOW + 0.5,
        True,
        False,
        str(NOW),
        [NOW],
        NOW + MAX_FUTURE_MS + 1,
        NOW + 3_600_000,
        MIN_TIMESTAMP_MS - 1,
        NOW // 1000,  # seconds sent as milliseconds
        0,
        -1,
    ],
    ids=repr,
)
def test_bad_timestamp(timestamp: Any) -> None:
    assert_invalid(with_field("timestamp", timestamp), "timestamp")


@pytest.mark.parametrize(
    "timestamp", [NOW, NOW + MAX_FUTURE_MS, NOW - 86_400_000, MIN_TIMESTAMP_MS], ids=repr
)
def test_good_timestamp(timestamp: int) -> None:
    assert parse_point(with_field("timestamp", timestamp), NOW).timestamp == timestamp


def test_future_limit_is_five_minutes_relative_to_now() -> None:
    raw = with_field("timestamp", NOW + 10 * 60_000)
    assert_invalid(raw, "timestamp")
    assert parse_point(raw, NOW + 5 * 60_000).timestamp == NOW + 10 * 60_000


def test_year_2000_boundary() -> None:
    # 2000-01-01T00:00:00Z in ms.
    assert MIN_TIMESTAMP_MS == 946_684_800_000


# latitude / longitude


NOT_NUMBERS = [MISSING, None, True, False, "40.7", [40.7], {"v": 1}, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize("field", ["latitude", "longitude"])
def test_coordinate_must_be_a_finite_number(field: str, value: Any) -> None:
    assert_invalid(with_field(field, value), field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("latitude", 90.000001),
        ("latitude", -90.000001),
        ("latitude", 91),
        ("latitude", -180),
        ("longitude", 180.000001),
        ("longitude", -180.000001),
        ("longitude", 360),
    ],
)
def test_coordinate_out_of_range(field: str, value: float) -> None:
    assert_invalid(with_field(field, value), field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("latitude", 90),
        ("latitude", -90),
        ("latitude", 90.0),
        ("latitude", 0),
        ("longitude", 180),
        ("longitude", -180),
        ("longitude", -179.999),
    ],
)
def test_coordinate_boundaries_accepted(field: str, value: float) -> None:
    point = parse_point(with_field(field, value), NOW)
    assert getattr(point, field) == value


# Optional numbers


OPTIONAL_NOT_NUMBERS = [True, False, "10", [1], {"v": 1}, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", OPTIONAL_NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize("field", ["speed", "bearing", "altitude", "accuracy"])
def test_optional_numbers_must_be_finite_numbers(field: str, value: Any) -> None:
    assert_invalid(with_field(field, value), field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("speed", -0.001),
        ("speed", -1),
        ("speed", 2000.001),
        ("speed", 2001),
        ("bearing", -0.001),
        ("bearing", 360),
        ("bearing", 360.0),
        ("bearing", 720),
        ("accuracy", -0.001),
        ("accuracy", -5),
    ],
)
def test_optional_number_out_of_range(field: str, value: float) -> None:
    assert_invalid(with_field(field, value), field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("speed", 0),
        ("speed", 2000),
        ("speed", 1999.99),
        ("bearing", 0),
        ("bearing", 359.999),
        ("accuracy", 0),
        ("accuracy", 1e6),
        ("altitude", -10_994),
        ("altitude", 8848.86),
        ("altitude", 1e300),
        ("altitude", -1e300),
    ],
)
def test_optional_number_accepted(field: str, value: float) -> None:
    point = parse_point(with_field(field, value), NOW)
    assert getattr(point, field) == value
    assert orjson.loads(point.encode())[field] == value


def test_every_accepted_point_can_be_encoded() -> None:
    """A point that passes validation must serialise; otherwise it poisons every flush.

    orjson cannot encode integers beyond 64 bits. JSON from orjson never yields
    them, but parse_point is the validation boundary for every adapter.
    """
    for field in ("altitude", "accuracy"):
        raw = with_field(field, 2**70)
        try:
            point = parse_point(raw, NOW)
        except ProtocolError as error:
            assert (error.code, error.field) == (ErrorCode.INVALID_TELEMETRY, field)
        else:
            point.encode()


def test_an_unencodable_attribute_is_a_protocol_error() -> None:
    raw = raw_point(attributes={"odometer": 2**70})
    error = rejected(raw)
    assert error.code is ErrorCode.INVALID_TELEMETRY
    assert error.field is not None
    assert error.field.startswith("attributes")


# attributes


@pytest.mark.parametrize("value", ["fuel=40", 3, True, ["a", 1], [{"a": 1}]], ids=repr)
def test_attributes_must_be_an_object(value: Any) -> None:
    assert_invalid(with_field("attributes", value), "attributes")


@pytest.mark.parametrize("value", [{"x": 1}, [1, 2], None, math.nan, math.inf, -math.inf], ids=repr)
def test_attribute_values_must_be_scalars(value: Any) -> None:
    raw = raw_point(attributes={"good": "yes", "cargo": value})
    assert_invalid(raw, "attributes.cargo")


def test_nested_attribute_object_names_its_key() -> None:
    raw = raw_point(attributes={"engine": {"rpm": 3000}})
    assert_invalid(raw, "attributes.engine")


@pytest.mark.parametrize("key", ["", "k" * 65])
def test_attribute_names_are_1_to_64_characters(key: str) -> None:
    assert_invalid(raw_point(attributes={key: 1}), "attributes")
    assert parse_point(raw_point(attributes={"k" * 64: 1}), NOW).attributes == {"k" * 64: 1}


def test_at_most_32_attributes() -> None:
    thirty_two = {f"a{i}": i for i in range(32)}
    assert parse_point(raw_point(attributes=thirty_two), NOW).attributes == thirty_two
    assert_invalid(raw_point(attributes=thirty_two | {"a32": 32}), "attributes")


def test_unknown_top_level_scalars_move_into_attributes() -> None:
    raw = raw_point(
        driver="Bo",
        engineOn=True,
        fuelLevel=55.5,
        odometer=120_000,
        attributes={"route": "7"},
    )
    point = parse_point(raw, NOW)
    assert point.attributes == {
        "route": "7",
        "driver": "Bo",
        "engineOn": True,
        "fuelLevel": 55.5,
        "odometer": 120_000,
    }
    wire = orjson.loads(point.encode())
    assert "driver" not in wire
    assert wire["attributes"]["driver"] == "Bo"


def test_unknown_top_level_fields_without_attributes_create_them() -> None:
    point = parse_point(raw_point(status="idle"), NOW)
    assert point.attributes == {"status": "idle"}


def test_unknown_top_level_null_is_dropped() -> None:
    point = parse_point(raw_point(status=None), NOW)
    assert point.attributes is None


def test_unknown_top_level_fields_count_towards_the_attribute_limit() -> None:
    attributes = {f"a{i}": i for i in range(31)}
    assert parse_point(raw_point(attributes=attributes, extra=1), NOW).attributes is not None
    assert_invalid(raw_point(attributes=attributes, extra=1, more=2), "attributes")


def test_unknown_top_level_non_finite_number_is_rejected() -> None:
    assert_invalid(raw_point(heat=math.nan), "heat")


def test_unknown_top_level_objects_and_arrays_are_dropped() -> None:
    point = parse_point(raw_point(meta={"source": "obd"}, stops=[1, 2], note="ok"), NOW)
    assert point.attributes == {"note": "ok"}


def test_explicit_attribute_wins_over_a_top_level_field_of_the_same_name() -> None:
    point = parse_point(raw_point(driver="top", attributes={"driver": "inner"}), NOW)
    assert point.attributes == {"driver": "inner"}


def test_point_larger_than_2_kib_is_rejected() -> None:
    base = len(parse_point(raw_point(attributes={"note": ""}), NOW).encode())
    fits = raw_point(attributes={"note": "n" * (MAX_POINT_BYTES - base)})
    point = parse_point(fits, NOW)
    assert len(point.encode()) == MAX_POINT_BYTES
    too_big = raw_point(attributes={"note": "n" * (MAX_POINT_BYTES - base + 1)})
    assert_invalid(too_big, "attributes")


def test_size_limit_counts_encoded_bytes_not_characters() -> None:
    # 700 three-byte characters: 700 characters, 2100 bytes.
    assert_invalid(raw_point(attributes={"note": "€" * 700}), "attributes")


def test_size_limit_counts_moved_top_level_fields() -> None:
    assert_invalid(raw_point(note="n" * MAX_POINT_BYTES), "attributes")


# Not an object


@pytest.mark.parametrize("raw", [None, [], "point", 42, True, [raw_point()]], ids=repr)
def test_telemetry_must_be_an_object(raw: Any) -> None:
    assert_invalid(raw, "data")


def test_first_offending_field_is_reported_in_field_order() -> None:
    raw = raw_point(latitude=100, longitude=200, speed=-1)
    assert_invalid(raw, "latitude")
    raw = raw_point(timestamp=True, latitude=100)
    assert_invalid(raw, "timestamp")
