"""The WebSocket protocol end to end: the real service, a real client, loopback."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests.conftest import RunningServer, now_ms, point


def is_batch(message: dict[str, Any]) -> bool:
    return message.get("event") == "vehicle:telemetry:batch"


def vehicle_ids(batch: dict[str, Any]) -> list[str]:
    return [p["vehicleId"] for p in batch["dataPoints"]]


@pytest_twisted.ensureDeferred
async def test_subscriber_receives_the_latest_point_and_others_do_not(
    server: RunningServer,
) -> None:
    viewer = await server.client()
    bystander = await server.client()
    vehicle = await server.client()
    ack = await viewer.request("subscribe:vehicle", {"vehicleId": "truck_001"})
    assert ack["success"] is True
    assert ack["vehicleId"] == "truck_001"
    confirmed = await viewer.event("subscription:confirmed")
    assert confirmed["vehicleId"] == "truck_001"
    assert abs(confirmed["subscribedAt"] - now_ms()) < 5000
    await bystander.request("subscribe:vehicle", {"vehicleId": "van_9"})

    sent = point("truck_001", altitude=12.5, accuracy=3, driver="ann")
    ack = await vehicle.request("vehicle:telemetry", sent)
    assert ack == {"success": True, "accepted": 1, "stale": 0, "rejected": []}

    batch = await viewer.event("vehicle:telemetry:batch")
    assert batch["count"] == 1
    assert batch["batchId"]
    received = batch["dataPoints"][0]
    expected = {k: v for k, v in sent.items() if k != "driver"}
    expected["attributes"] = {"driver": "ann"}
    assert received == expected

    # The bystander's first batch is van_9's: truck_001 never reached it.
    await vehicle.request("vehicle:telemetry", point("van_9"))
    assert vehicle_ids(await bystander.event("vehicle:telemetry:batch")) == ["van_9"]


@pytest_twisted.ensureDeferred
async def test_only_the_newest_point_per_vehicle_is_delivered(server: RunningServer) -> None:
    viewer = await server.client()
    vehicle = await server.client()
    await viewer.request("subscribe:vehicle", {"vehicleId": "*"})
    base = now_ms()
    burst = [point("bus_1", timestamp=base + offset, speed=offset) for offset in (3, 1, 2, 5, 4)]
    ack = await vehicle.request("vehicle:telemetry", burst)
    # 3 accepted (3, then 5, and 1/2/4 older than what was already there are stale).
    assert ack["accepted"] + ack["stale"] == 5
    assert ack["rejected"] == []
    batch = await viewer.event("vehicle:telemetry:batch")
    assert batch["count"] == 1
    assert batch["dataPoints"][0]["timestamp"] == base + 5
    stats = await viewer.request("request:stats")
    assert stats["batcher"]["staleDropped"] == ack["stale"] == 3


@pytest_twisted.ensureDeferred
async def test_new_subscriber_gets_a_snapshot_of_the_last_known_point(
    server: RunningServer,
) -> None:
    vehicle = await server.client()
    await vehicle.request("vehicle:telemetry", [point("car_1"), point("car_2")])
    late = await server.client()
    await late.request("subscribe:vehicle", {"vehicleId": "car_2"})
    snapshot = await late.next(is_batch)
    assert vehicle_ids(snapshot["data"]) == ["car_2"]

    everything = await server.client()
    await everything.request("subscribe:vehicle", {"vehicleId": "*"})
    snapshot = await everything.next(is_batch)
    assert sorted(vehicle_ids(snapshot["data"])) == ["car_1", "car_2"]
    assert snapshot["data"]["count"] == 2


@pytest_twisted.ensureDeferred
async def test_subscribing_twice_never_duplicates_delivery(server: RunningServer) -> None:
    viewer = await server.client()
    vehicle = await server.client()
    first = await viewer.request("subscribe:vehicle", {"vehicleId": "tram_3"})
    second = await viewer.request("subscribe:vehicle", {"vehicleId": "tram_3"})
    assert (first["alreadySubscribed"], second["alreadySubscribed"]) == (False, True)
    await vehicle.request("vehicle:telemetry", point("tram_3"))
    batch = await viewer.event("vehicle:telemetry:batch")
    assert vehicle_ids(batch) == ["tram_3"]
    await vehicle.request("vehicle:telemetry", point("tram_3", timestamp=now_ms() + 1))
    await viewer.event("vehicle:telemetry:batch")
    stats = await viewer.request("request:stats")
    assert stats["subscriptions"]["totalSubscriptions"] == 1
    assert [m for m in viewer.inbox if is_batch(m)] == []


@pytest_twisted.ensureDeferred
async def test_unsubscribe_stops_delivery(server: RunningServer) -> None:
    viewer = await server.client()
    vehicle = await server.client()
    await viewer.request("subscribe:vehicle", {"vehicleId": "a"})
    await viewer.request("subscribe:vehicle", {"vehicleId": "b"})
    ack = await viewer.request("unsubscribe:vehicle", {"vehicleId": "a"})
    assert ack == {"success": True, "vehicleId": "a", "wasSubscribed": True}
    assert await viewer.event("subscription:removed") == {"vehicleId": "a"}
    again = await viewer.request("unsubscribe:vehicle", {"vehicleId": "a"})
    assert again["wasSubscribed"] is False
    await vehicle.request("vehicle:telemetry", [point("a"), point("b")])
    assert vehicle_ids(await viewer.event("vehicle:telemetry:batch")) == ["b"]


@pytest_twisted.ensureDeferred
async def test_gateway_array_applies_valid_points_and_reports_rejects(
    server: RunningServer,
) -> None:
    gateway = await server.client()
    points = [point("g_1"), point("g_2", latitude=91), {"vehicleId": "bad id!"}, point("g_3")]
    ack = await gateway.request("vehicle:telemetry", points)
    assert ack["success"] is True
    assert ack["accepted"] == 2
    assert [(r["index"], r["code"], r.get("field")) for r in ack["rejected"]] == [
        (1, "INVALID_TELEMETRY", "latitude"),
        (2, "INVALID_VEHICLE_ID", "vehicleId"),
    ]
    # Empty objects keep the frame under the 64 KiB message limit; the count is refused first.
    too_many = await gateway.request("vehicle:telemetry", [{}] * 1001)
    assert too_many["success"] is False
    assert too_many["error"]["code"] == "INVALID_REQUEST"
    stats = await gateway.request("request:stats", {"includeVehicleDetails": True})
    assert stats["totalTelemetryReceived"] == 2
    assert stats["totalTelemetryRejected"] == 2
    assert sorted(stats["vehicles"]) == ["g_1", "g_3"]


@pytest_twisted.ensureDeferred
async def test_request_stats(server: RunningServer) -> None:
    viewer = await server.client()
    vehicle = await server.client()
    await viewer.request("subscribe:vehicle", {"vehicleId": "s_1"})
    await vehicle.request("vehicle:telemetry", point("s_1"))
    await viewer.event("vehicle:telemetry:batch")
    stats = await viewer.request("request:stats", {"includeVehicleDetails": True})
    assert stats["success"] is True
    assert stats["connectedClients"] == 2
    assert stats["activeVehicles"] == 1
    assert stats["totalTelemetryReceived"] == 1
    assert stats["subscriptions"]["vehicleSubscriptions"] == {"s_1": 1}
    assert stats["batcher"]["totalPoints"] == 1
    assert stats["vehicles"]["s_1"]["subscribers"] == 1
    assert abs(stats["vehicles"]["s_1"]["lastSeen"] - now_ms()) < 5000
    plain = await viewer.request("request:stats")
    assert "vehicles" not in plain
    viewer.send("request:stats")
    assert (await viewer.event("stats"))["connectedClients"] == 2


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_an_error_and_the_connection_keeps_working(
    server: RunningServer,
) -> None:
    client = await server.client()

    client.send_raw(b"{not json")
    assert (await client.event("error"))["code"] == "INVALID_JSON"
    client.send_raw(b"[1, 2]")
    assert (await client.event("error"))["code"] == "INVALID_JSON"
    client.send_raw(b'{"event": "vehicle:telemetry"}', binary=True)
    assert (await client.event("error"))["code"] == "INVALID_JSON"
    client.send_raw(b'{"data": {}}')
    error = await client.event("error")
    assert (error["code"], error["field"]) == ("UNKNOWN_EVENT", "event")
    assert abs(error["timestamp"] - now_ms()) < 5000
    client.send("launch:missiles", {})
    assert (await client.event("error"))["code"] == "UNKNOWN_EVENT"
    client.send_raw(b'{"event": "request:stats", "ack": "one"}')
    error = await client.event("error")
    assert (error["code"], error["field"]) == ("INVALID_REQUEST", "ack")
    client.send("vehicle:telemetry", point("x", latitude="north"))
    error = await client.event("error")
    assert (error["code"], error["field"]) == ("INVALID_TELEMETRY", "latitude")

    failed = await client.request("vehicle:telemetry", point("x", timestamp=now_ms() + 3_600_000))
    assert failed["success"] is False
    assert failed["error"]["code"] == "INVALID_TELEMETRY"
    assert failed["error"]["field"] == "timestamp"
    assert failed["error"]["message"]
    failed = await client.request("subscribe:vehicle", {"vehicleId": ""})
    assert failed["error"] == {
        "code": "INVALID_VEHICLE_ID",
        "field": "vehicleId",
        "message": failed["error"]["message"],
    }
    failed = await client.request("subscribe:vehicle", "truck_001")
    assert (failed["error"]["code"], failed["error"]["field"]) == ("INVALID_REQUEST", "data")
    failed = await client.request("request:stats", {"includeVehicleDetails": "yes"})
    assert failed["error"]["code"] == "INVALID_REQUEST"

    # Still open, still serving; nothing accepted was lost.
    assert (await client.request("vehicle:telemetry", point("x")))["accepted"] == 1
    stats = await client.request("request:stats")
    assert stats["totalTelemetryReceived"] == 1
    assert stats["totalTelemetryRejected"] == 2
    assert client.close_code is None


@pytest_twisted.ensureDeferred
async def test_disconnecting_viewer_leaves_nothing_behind(server: RunningServer) -> None:
    viewer = await server.client()
    await viewer.request("subscribe:vehicle", {"vehicleId": "*"})
    await viewer.request("subscribe:vehicle", {"vehicleId": "k_1"})
    viewer.disconnect()
    await viewer.closed()
    observer = await server.client()
    stats = await observer.request("request:stats")
    assert stats["connectedClients"] == 1
    assert stats["subscriptions"] == {
        "totalVehicles": 0,
        "totalClients": 0,
        "totalSubscriptions": 0,
        "vehicleSubscriptions": {},
    }
