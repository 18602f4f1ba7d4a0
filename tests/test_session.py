"""A client's conversation with the hub: every event, every error shape, acks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.task import Clock

from fleettrack.errors import ErrorCode, ProtocolError
from fleettrack.hub import Batch, Hub
from fleettrack.registry import WILDCARD
from fleettrack.session import MAX_POINTS_PER_MESSAGE, Session
from fleettrack.wire import decode_message, encode_ack, encode_batch, encode_event
from tests.fakes import EPOCH_MS, FakeConnection, raw_point


def open_session(hub: Hub) -> tuple[Session, FakeConnection]:
    connection = FakeConnection()
    session = Session(hub, connection)
    hub.connect(session)
    return session, connection


@pytest.fixture
def session(hub: Hub) -> Session:
    return open_session(hub)[0]


@pytest.fixture
def conn(session: Session) -> FakeConnection:
    connection = session.connection
    assert isinstance(connection, FakeConnection)
    return connection


def send(session: Session, event: object, data: Any = None, ack: int | None = None) -> None:
    session.handle((event, data, ack))


def send_frame(session: Session, frame: dict[str, Any]) -> None:
    """Through the real decoder, as the WebSocket adapter does."""
    session.handle(decode_message(orjson.dumps(frame)))


def assert_error_event(
    frame: dict[str, Any], code: ErrorCode, field: str | None, now_ms: int = EPOCH_MS
) -> None:
    assert frame["event"] == "error"
    assert set(frame) == {"event", "data"}
    data = frame["data"]
    expected_keys = {"code", "message", "timestamp"} | ({"field"} if field else set())
    assert set(data) == expected_keys
    assert data["code"] == code.value
    assert data.get("field") == field
    assert isinstance(data["message"], str)
    assert data["message"]
    assert data["timestamp"] == now_ms


def assert_failed_ack(frame: dict[str, Any], ack: int, code: ErrorCode, field: str | None) -> None:
    assert frame == {
        "event": "ack",
        "ack": ack,
        "data": {
            "success": False,
            "error": {"code": code.value, "message": frame["data"]["error"]["message"]}
            | ({"field": field} if field else {}),
        },
    }
    assert frame["data"]["error"]["message"]


# subscribe:vehicle


def test_subscribe_without_ack_confirms(session: Session, conn: FakeConnection) -> None:
    send(session, "subscribe:vehicle", {"vehicleId": "truck_001"})
    assert conn.frames == [
        {
            "event": "subscription:confirmed",
            "data": {"vehicleId": "truck_001", "subscribedAt": EPOCH_MS},
        }
    ]


def test_subscribe_with_ack(session: Session, conn: FakeConnection, clock: Clock) -> None:
    clock.advance(1.5)
    send(session, "subscribe:vehicle", {"vehicleId": "truck_001"}, ack=7)
    assert conn.frames == [
        {
            "event": "subscription:confirmed",
            "data": {"vehicleId": "truck_001", "subscribedAt": EPOCH_MS + 1500},
        },
        {
            "event": "ack",
            "ack": 7,
            "data": {
                "success": True,
                "vehicleId": "truck_001",
                "subscribedAt": EPOCH_MS + 1500,
                "alreadySubscribed": False,
            },
        },
    ]


def test_subscribe_sends_the_last_known_point_at_once(hub: Hub) -> None:
    vehicle, _ = open_session(hub)
    send(vehicle, "vehicle:telemetry", raw_point("truck_001", EPOCH_MS - 10, speed=5))
    hub.flush()
    viewer, conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": "truck_001"}, ack=1)
    assert conn.event_names() == ["subscription:confirmed", "vehicle:telemetry:batch", "ack"]
    batch = conn.of("vehicle:telemetry:batch")[0]
    assert batch["count"] == 1
    assert batch["dataPoints"] == [raw_point("truck_001", EPOCH_MS - 10, speed=5)]
    # The snapshot is not repeated by the next flush: nothing new arrived.
    conn.take()
    hub.flush()
    assert conn.frames == []


def test_subscribe_to_unknown_vehicle_sends_no_snapshot(
    session: Session, conn: FakeConnection
) -> None:
    send(session, "subscribe:vehicle", {"vehicleId": "nobody"})
    assert conn.event_names() == ["subscription:confirmed"]


def test_subscribe_to_wildcard_sends_every_known_vehicle(hub: Hub) -> None:
    vehicle, _ = open_session(hub)
    send(
        vehicle,
        "vehicle:telemetry",
        [raw_point("a", latitude=1), raw_point("b", latitude=2), raw_point("c", latitude=3)],
    )
    hub.flush()
    viewer, conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": WILDCARD})
    assert conn.frames[0] == {
        "event": "subscription:confirmed",
        "data": {"vehicleId": WILDCARD, "subscribedAt": EPOCH_MS},
    }
    [batch] = conn.of("vehicle:telemetry:batch")
    assert batch["count"] == 3
    assert {p["vehicleId"]: p["latitude"] for p in batch["dataPoints"]} == {
        "a": 1,
        "b": 2,
        "c": 3,
    }


def test_subscribe_twice_is_harmless(hub: Hub) -> None:
    vehicle, _ = open_session(hub)
    send(vehicle, "vehicle:telemetry", raw_point("a"))
    viewer, conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": "a"})
    conn.take()
    send(viewer, "subscribe:vehicle", {"vehicleId": "a"}, ack=2)
    assert conn.event_names() == ["subscription:confirmed", "ack"]
    assert conn.only("ack")["data"]["alreadySubscribed"] is True
    conn.take()
    send(vehicle, "vehicle:telemetry", raw_point("a", EPOCH_MS + 1))
    hub.flush()
    [batch] = conn.of("vehicle:telemetry:batch")
    assert batch["count"] == 1
    assert conn.event_names() == ["vehicle:telemetry:batch"]


@pytest.mark.parametrize(
    ("data", "code", "field"),
    [
        ({"vehicleId": "bad id"}, ErrorCode.INVALID_VEHICLE_ID, "vehicleId"),
        ({"vehicleId": ""}, ErrorCode.INVALID_VEHICLE_ID, "vehicleId"),
        ({"vehicleId": "x" * 65}, ErrorCode.INVALID_VEHICLE_ID, "vehicleId"),
        ({"vehicleId": 12}, ErrorCode.INVALID_VEHICLE_ID, "vehicleId"),
        ({"vehicleId": ["*"]}, ErrorCode.INVALID_VEHICLE_ID, "vehicleId"),
        ({}, ErrorCode.INVALID_VEHICLE_ID, "vehicleId"),
        (None, ErrorCode.INVALID_REQUEST, "data"),
        ("truck_001", ErrorCode.INVALID_REQUEST, "data"),
        (["truck_001"], ErrorCode.INVALID_REQUEST, "data"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("event", ["subscribe:vehicle", "unsubscribe:vehicle"])
def test_bad_subscription_requests(
    session: Session, event: str, data: Any, code: ErrorCode, field: str
) -> None:
    conn = session.connection
    assert isinstance(conn, FakeConnection)
    send(session, event, data)
    [frame] = conn.take()
    assert_error_event(frame, code, field)
    send(session, event, data, ack=3)
    [frame] = conn.take()
    assert_failed_ack(frame, 3, code, field)
    assert session.hub.stats()["subscriptions"]["totalSubscriptions"] == 0


# unsubscribe:vehicle


def test_unsubscribe_a_subscription(hub: Hub) -> None:
    viewer, conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": "a"})
    conn.take()
    send(viewer, "unsubscribe:vehicle", {"vehicleId": "a"}, ack=4)
    assert conn.frames == [
        {"event": "subscription:removed", "data": {"vehicleId": "a"}},
        {
            "event": "ack",
            "ack": 4,
            "data": {"success": True, "vehicleId": "a", "wasSubscribed": True},
        },
    ]
    conn.take()
    vehicle, _ = open_session(hub)
    send(vehicle, "vehicle:telemetry", raw_point("a"))
    hub.flush()
    assert conn.frames == []
    assert hub.stats()["subscriptions"]["totalSubscriptions"] == 0


def test_unsubscribe_without_ack(session: Session, conn: FakeConnection) -> None:
    send(session, "subscribe:vehicle", {"vehicleId": "a"})
    conn.take()
    send(session, "unsubscribe:vehicle", {"vehicleId": "a"})
    assert conn.frames == [{"event": "subscription:removed", "data": {"vehicleId": "a"}}]


def test_unsubscribe_when_not_subscribed(session: Session, conn: FakeConnection) -> None:
    send(session, "unsubscribe:vehicle", {"vehicleId": "a"}, ack=5)
    assert conn.frames == [
        {
            "event": "ack",
            "ack": 5,
            "data": {"success": True, "vehicleId": "a", "wasSubscribed": False},
        }
    ]
    conn.take()
    send(session, "unsubscribe:vehicle", {"vehicleId": "a"})
    assert conn.frames == []


def test_unsubscribe_wildcard(hub: Hub) -> None:
    viewer, conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": WILDCARD})
    send(viewer, "unsubscribe:vehicle", {"vehicleId": WILDCARD}, ack=1)
    assert conn.of("subscription:removed") == [{"vehicleId": WILDCARD}]
    assert conn.only("ack")["data"]["wasSubscribed"] is True
    conn.take()
    vehicle, _ = open_session(hub)
    send(vehicle, "vehicle:telemetry", raw_point("a"))
    hub.flush()
    assert conn.frames == []


# vehicle:telemetry


def test_single_point_with_ack(hub: Hub) -> None:
    viewer, viewer_conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": "truck_001"})
    viewer_conn.take()
    vehicle, conn = open_session(hub)
    raw = raw_point("truck_001", speed=50, bearing=180, attributes={"driver": "Al"})
    send(vehicle, "vehicle:telemetry", raw, ack=9)
    assert conn.frames == [
        {
            "event": "ack",
            "ack": 9,
            "data": {"success": True, "accepted": 1, "stale": 0, "rejected": []},
        }
    ]
    assert viewer_conn.frames == []  # batches only on flush
    hub.flush()
    [batch] = viewer_conn.of("vehicle:telemetry:batch")
    assert batch["dataPoints"] == [raw]
    assert batch["count"] == 1
    assert conn.of("vehicle:telemetry:batch") == []  # the sender subscribed to nothing


def test_single_point_without_ack_is_silent(session: Session, conn: FakeConnection) -> None:
    send(session, "vehicle:telemetry", raw_point())
    assert conn.frames == []
    assert session.hub.stats()["totalTelemetryReceived"] == 1


def test_single_stale_point(session: Session, conn: FakeConnection) -> None:
    send(session, "vehicle:telemetry", raw_point("a", EPOCH_MS))
    session.hub.flush()
    send(session, "vehicle:telemetry", raw_point("a", EPOCH_MS - 1), ack=1)
    assert conn.only("ack")["data"] == {
        "success": True,
        "accepted": 0,
        "stale": 1,
        "rejected": [],
    }
    assert session.hub.stats()["batcher"]["staleDropped"] == 1


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        (raw_point("bad id"), ErrorCode.INVALID_VEHICLE_ID, "vehicleId"),
        (raw_point(latitude=91), ErrorCode.INVALID_TELEMETRY, "latitude"),
        (raw_point(timestamp=EPOCH_MS + 301_000), ErrorCode.INVALID_TELEMETRY, "timestamp"),
        (raw_point(bearing=360), ErrorCode.INVALID_TELEMETRY, "bearing"),
        (raw_point(attributes={"a": {}}), ErrorCode.INVALID_TELEMETRY, "attributes.a"),
        ("not a point", ErrorCode.INVALID_TELEMETRY, "data"),
        (None, ErrorCode.INVALID_TELEMETRY, "data"),
    ],
    ids=repr,
)
def test_single_invalid_point_fails_the_message(
    session: Session, conn: FakeConnection, raw: Any, code: ErrorCode, field: str
) -> None:
    send(session, "vehicle:telemetry", raw)
    [frame] = conn.take()
    assert_error_event(frame, code, field)
    send(session, "vehicle:telemetry", raw, ack=11)
    [frame] = conn.take()
    assert_failed_ack(frame, 11, code, field)
    stats = session.hub.stats()
    assert stats["totalTelemetryRejected"] == 2
    assert stats["totalTelemetryReceived"] == 0
    assert stats["activeVehicles"] == 0


def test_timestamp_limit_follows_the_hub_clock(
    session: Session, conn: FakeConnection, clock: Clock
) -> None:
    raw = raw_point(timestamp=EPOCH_MS + 600_000)
    send(session, "vehicle:telemetry", raw, ack=1)
    assert conn.take()[0]["data"]["success"] is False
    clock.advance(300)
    send(session, "vehicle:telemetry", raw, ack=2)
    assert conn.take()[0]["data"]["success"] is True


def test_array_with_partial_rejects(hub: Hub) -> None:
    viewer, viewer_conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": WILDCARD})
    viewer_conn.take()
    gateway, conn = open_session(hub)
    points = [
        raw_point("a", latitude=1),
        raw_point("b", latitude=95),
        "junk",
        raw_point("c", latitude=3),
        raw_point("bad/id"),
        raw_point("a", EPOCH_MS - 5, latitude=9),  # older than a's first: stale
        raw_point("d", timestamp=1.5),
    ]
    send(gateway, "vehicle:telemetry", points, ack=12)
    [ack] = conn.take()
    assert ack["event"] == "ack"
    assert ack["ack"] == 12
    data = ack["data"]
    assert data["success"] is True
    assert data["accepted"] == 2
    assert data["stale"] == 1
    rejected = data["rejected"]
    assert [(r["index"], r["code"], r["field"]) for r in rejected] == [
        (1, "INVALID_TELEMETRY", "latitude"),
        (2, "INVALID_TELEMETRY", "data"),
        (4, "INVALID_VEHICLE_ID", "vehicleId"),
        (6, "INVALID_TELEMETRY", "timestamp"),
    ]
    assert all(set(r) == {"index", "code", "field", "message"} and r["message"] for r in rejected)
    stats = hub.stats()
    assert stats["totalTelemetryReceived"] == 3
    assert stats["totalTelemetryRejected"] == 4
    hub.flush()
    [batch] = viewer_conn.of("vehicle:telemetry:batch")
    assert {p["vehicleId"]: p["latitude"] for p in batch["dataPoints"]} == {"a": 1, "c": 3}
    assert batch["count"] == 2


def test_array_without_ack_reports_nothing(session: Session, conn: FakeConnection) -> None:
    send(session, "vehicle:telemetry", [raw_point("a"), raw_point("b", latitude=-91)])
    assert conn.frames == []
    assert session.hub.stats()["totalTelemetryRejected"] == 1
    assert session.hub.stats()["activeVehicles"] == 1


def test_array_keeps_the_latest_point_per_vehicle(hub: Hub) -> None:
    viewer, viewer_conn = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": "a"})
    viewer_conn.take()
    gateway, _ = open_session(hub)
    send(
        gateway,
        "vehicle:telemetry",
        [raw_point("a", EPOCH_MS + offset, latitude=offset) for offset in (3, 1, 5, 2)],
    )
    hub.flush()
    [batch] = viewer_conn.of("vehicle:telemetry:batch")
    assert batch["dataPoints"] == [raw_point("a", EPOCH_MS + 5, latitude=5)]


def test_empty_array(session: Session, conn: FakeConnection) -> None:
    send(session, "vehicle:telemetry", [], ack=1)
    assert conn.only("ack")["data"] == {
        "success": True,
        "accepted": 0,
        "stale": 0,
        "rejected": [],
    }


def test_array_of_the_maximum_size_is_accepted(session: Session, conn: FakeConnection) -> None:
    points = [raw_point(f"v{i}") for i in range(MAX_POINTS_PER_MESSAGE)]
    send(session, "vehicle:telemetry", points, ack=1)
    assert conn.only("ack")["data"]["accepted"] == 1000
    assert session.hub.stats()["activeVehicles"] == 1000


def test_array_of_more_than_1000_points_is_refused_whole(
    session: Session, conn: FakeConnection
) -> None:
    assert MAX_POINTS_PER_MESSAGE == 1000
    points = [raw_point(f"v{i}") for i in range(1001)]
    send(session, "vehicle:telemetry", points, ack=1)
    [frame] = conn.take()
    assert_failed_ack(frame, 1, ErrorCode.INVALID_REQUEST, "data")
    send(session, "vehicle:telemetry", points)
    [frame] = conn.take()
    assert_error_event(frame, ErrorCode.INVALID_REQUEST, "data")
    stats = session.hub.stats()
    assert stats["totalTelemetryReceived"] == 0
    assert stats["activeVehicles"] == 0


# request:stats


def test_stats_with_ack(hub: Hub) -> None:
    viewer, _ = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": "a"})
    session, conn = open_session(hub)
    send(session, "vehicle:telemetry", [raw_point("a"), raw_point("b", latitude=100)])
    send(session, "request:stats", {"includeVehicleDetails": False}, ack=21)
    frame = conn.only("ack")
    assert frame["ack"] == 21
    data = frame["data"]
    assert data["success"] is True
    assert data["connectedClients"] == 2
    assert data["activeVehicles"] == 1
    assert data["totalTelemetryReceived"] == 1
    assert data["totalTelemetryRejected"] == 1
    assert data["subscriptions"] == {
        "totalVehicles": 1,
        "totalClients": 1,
        "totalSubscriptions": 1,
        "vehicleSubscriptions": {"a": 1},
    }
    assert set(data["batcher"]) >= {
        "totalBatches",
        "totalPoints",
        "totalVehicleUpdates",
        "pendingBatches",
        "bufferedVehicles",
        "staleDropped",
    }
    assert data["batcher"]["bufferedVehicles"] == 1
    assert "vehicles" not in data


@pytest.mark.parametrize("data", [None, {}, {"includeVehicleDetails": False}], ids=repr)
def test_stats_without_details(session: Session, conn: FakeConnection, data: Any) -> None:
    send(session, "request:stats", data, ack=1)
    reply = conn.only("ack")["data"]
    assert reply["success"] is True
    assert "vehicles" not in reply
    assert reply["connectedClients"] == 1


def test_stats_with_vehicle_details(hub: Hub, clock: Clock) -> None:
    viewer, _ = open_session(hub)
    send(viewer, "subscribe:vehicle", {"vehicleId": "a"})
    session, conn = open_session(hub)
    clock.advance(2)
    send(session, "vehicle:telemetry", raw_point("a", EPOCH_MS + 1000))
    send(session, "request:stats", {"includeVehicleDetails": True}, ack=22)
    data = conn.only("ack")["data"]
    assert data["vehicles"] == {
        "a": {"subscribers": 1, "lastSeen": EPOCH_MS + 2000, "lastTimestamp": EPOCH_MS + 1000}
    }


def test_stats_without_ack_is_answered_with_a_stats_event(
    session: Session, conn: FakeConnection
) -> None:
    send(session, "request:stats", {"includeVehicleDetails": True})
    [frame] = conn.frames
    assert frame["event"] == "stats"
    assert frame["data"]["connectedClients"] == 1
    assert frame["data"]["vehicles"] == {}
    assert "success" not in frame["data"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"includeVehicleDetails": "yes"}, "includeVehicleDetails"),
        ({"includeVehicleDetails": 1}, "includeVehicleDetails"),
        ({"includeVehicleDetails": None}, "includeVehicleDetails"),
        ([], "data"),
        ("details", "data"),
        (True, "data"),
    ],
    ids=repr,
)
def test_bad_stats_request(session: Session, conn: FakeConnection, data: Any, field: str) -> None:
    send(session, "request:stats", data, ack=30)
    [frame] = conn.take()
    assert_failed_ack(frame, 30, ErrorCode.INVALID_REQUEST, field)
    send(session, "request:stats", data)
    [frame] = conn.take()
    assert_error_event(frame, ErrorCode.INVALID_REQUEST, field)


# Unknown events, error shapes, and the connection staying open


@pytest.mark.parametrize(
    "event",
    [None, "", "subscribe", "Subscribe:Vehicle", "vehicle:telemetry:batch", "ack", 42, ["x"]],
    ids=repr,
)
def test_unknown_event(session: Session, conn: FakeConnection, event: object) -> None:
    send(session, event, {"vehicleId": "a"})
    [frame] = conn.take()
    assert_error_event(frame, ErrorCode.UNKNOWN_EVENT, "event")
    send(session, event, {"vehicleId": "a"}, ack=0)
    [frame] = conn.take()
    assert_failed_ack(frame, 0, ErrorCode.UNKNOWN_EVENT, "event")


def test_missing_event_through_the_decoder(session: Session, conn: FakeConnection) -> None:
    send_frame(session, {"data": {"vehicleId": "a"}, "ack": 8})
    [frame] = conn.take()
    assert_failed_ack(frame, 8, ErrorCode.UNKNOWN_EVENT, "event")


def test_error_event_timestamp_follows_the_clock(
    session: Session, conn: FakeConnection, clock: Clock
) -> None:
    clock.advance(42.5)
    send(session, "nope")
    assert_error_event(conn.frames[0], ErrorCode.UNKNOWN_EVENT, "event", EPOCH_MS + 42_500)


def test_report_shapes(session: Session, conn: FakeConnection) -> None:
    session.report(ProtocolError(ErrorCode.INVALID_JSON, "frame is not valid JSON"))
    assert conn.take() == [
        {
            "event": "error",
            "data": {
                "code": "INVALID_JSON",
                "message": "frame is not valid JSON",
                "timestamp": EPOCH_MS,
            },
        }
    ]
    session.report(ProtocolError(ErrorCode.INVALID_REQUEST, "bad", "ack"), 5)
    assert conn.take() == [
        {
            "event": "ack",
            "ack": 5,
            "data": {
                "success": False,
                "error": {"code": "INVALID_REQUEST", "message": "bad", "field": "ack"},
            },
        }
    ]


def test_bad_messages_never_close_the_connection(hub: Hub) -> None:
    session, conn = open_session(hub)
    for event, data in [
        ("nope", None),
        ("subscribe:vehicle", "x"),
        ("vehicle:telemetry", {"vehicleId": "a"}),
        ("vehicle:telemetry", [None] * 1001),
        ("request:stats", 5),
    ]:
        send(session, event, data)
    assert conn.closed == []
    assert len(conn.of("error")) == 5
    conn.take()
    send(session, "subscribe:vehicle", {"vehicleId": "a"}, ack=1)
    assert conn.only("ack")["data"]["success"] is True


def test_full_conversation_through_the_decoder(hub: Hub) -> None:
    viewer, viewer_conn = open_session(hub)
    send_frame(viewer, {"event": "subscribe:vehicle", "data": {"vehicleId": "truck_001"}, "ack": 1})
    vehicle, vehicle_conn = open_session(hub)
    send_frame(vehicle, {"event": "vehicle:telemetry", "data": raw_point(), "ack": 2})
    assert vehicle_conn.only("ack")["data"]["accepted"] == 1
    hub.flush()
    assert viewer_conn.event_names() == [
        "subscription:confirmed",
        "ack",
        "vehicle:telemetry:batch",
    ]
    assert viewer_conn.of("vehicle:telemetry:batch")[0]["dataPoints"] == [raw_point()]


# The hub's side of a session


def test_session_is_the_hubs_viewer(hub: Hub) -> None:
    session, conn = open_session(hub)
    batch = Batch(b'{"batchId":"b","timestamp":1,"dataPoints":[],"count":0}', 0, [])
    session.deliver(batch)
    assert conn.frames == [
        {
            "event": "vehicle:telemetry:batch",
            "data": {"batchId": "b", "timestamp": 1, "dataPoints": [], "count": 0},
        }
    ]
    session.close(1001, "going away")
    assert conn.closed == [(1001, "going away")]


def test_close_all_reaches_sessions(hub: Hub) -> None:
    sessions = [open_session(hub) for _ in range(3)]
    fired: list[object] = []
    hub.close_all(1001, "bye").addCallback(fired.append)
    assert all(conn.closed == [(1001, "bye")] for _, conn in sessions)
    for session, _ in sessions:
        hub.disconnect(session)
    assert fired == [None]


# The wire


@pytest.mark.parametrize("payload", [b"", b"{", b"not json", b"\xff\xfe", b"{'a': 1}"], ids=repr)
def test_decode_rejects_invalid_json(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(payload)
    assert caught.value.code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize("payload", [b"[]", b"[1]", b"1", b'"event"', b"null", b"true"])
def test_decode_rejects_non_objects(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(payload)
    assert caught.value.code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize("ack", [-1, 1.5, "1", True, [1], {"n": 1}], ids=repr)
def test_decode_rejects_unusable_acks(ack: Any) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(orjson.dumps({"event": "request:stats", "ack": ack}))
    assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_REQUEST, "ack")


def test_decode_message() -> None:
    message = decode_message(b'{"event":"subscribe:vehicle","data":{"vehicleId":"a"},"ack":0}')
    assert message == ("subscribe:vehicle", {"vehicleId": "a"}, 0)
    assert decode_message(b'{"event":"x","ack":null}') == ("x", None, None)
    assert decode_message(b"{}") == (None, None, None)


def test_encoders() -> None:
    assert orjson.loads(encode_event("error", {"code": "X"})) == {
        "event": "error",
        "data": {"code": "X"},
    }
    assert orjson.loads(encode_ack(3, {"success": True})) == {
        "event": "ack",
        "ack": 3,
        "data": {"success": True},
    }
    batch = Batch(b'{"count":0}', 0, [])
    assert orjson.loads(encode_batch(batch)) == {
        "event": "vehicle:telemetry:batch",
        "data": {"count": 0},
    }
