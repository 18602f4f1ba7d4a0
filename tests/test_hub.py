"""The hub's flush, snapshots, expiry, shutdown and figures, on a ``task.Clock``."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from twisted.internet.task import Clock

from fleettrack.hub import DELIVERIES_PER_TURN, Batch, Hub
from fleettrack.registry import WILDCARD
from tests.fakes import EPOCH_MS, EPOCH_S, FakeViewer, decode_batch, make_point


def viewer(hub: Hub, name: str, *vehicles: str) -> FakeViewer:
    fake = FakeViewer(name, hub, leave_on_close=True)
    hub.connect(fake)
    for vehicle in vehicles:
        hub.subscribe(fake, vehicle)
    return fake


def send(hub: Hub, vehicle_id: str, offset_ms: int = 0, **fields: Any) -> bool:
    return hub.ingest(make_point(vehicle_id, EPOCH_MS + offset_ms, **fields))


def ids(batch: dict[str, Any]) -> list[str]:
    return sorted(point["vehicleId"] for point in batch["dataPoints"])


def by_vehicle(batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    points = {point["vehicleId"]: point for point in batch["dataPoints"]}
    assert len(points) == len(batch["dataPoints"]), "each vehicle at most once per batch"
    return points


# Flush


def test_only_subscribers_get_a_batch(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    bob = viewer(hub, "bob", "b")
    idle = viewer(hub, "idle")
    send(hub, "a", latitude=1.5)
    hub.flush()
    assert len(alice.batches) == 1
    assert alice.points() == [
        {"vehicleId": "a", "timestamp": EPOCH_MS, "latitude": 1.5, "longitude": -74.006}
    ]
    assert bob.batches == []
    assert idle.batches == []


def test_batch_holds_each_subscribed_point_once_with_its_count(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a", "b", "c")
    for offset in range(3):
        send(hub, "a", offset, latitude=offset)
        send(hub, "b", offset, latitude=10 + offset)
    send(hub, "z", 0)
    hub.flush()
    [batch] = alice.batches
    assert batch["count"] == 2
    assert by_vehicle(batch) == {
        "a": {"vehicleId": "a", "timestamp": EPOCH_MS + 2, "latitude": 2, "longitude": -74.006},
        "b": {"vehicleId": "b", "timestamp": EPOCH_MS + 2, "latitude": 12, "longitude": -74.006},
    }


def test_batch_envelope(hub: Hub, clock: Clock) -> None:
    alice = viewer(hub, "alice", "a")
    clock.advance(0.25)
    send(hub, "a")
    hub.flush()
    [batch] = alice.batches
    assert set(batch) == {"batchId", "timestamp", "dataPoints", "count"}
    assert batch["timestamp"] == EPOCH_MS + 250
    assert isinstance(batch["batchId"], str)
    assert batch["batchId"].startswith(f"batch_{EPOCH_MS + 250}_")


def test_batch_ids_are_unique(hub: Hub, clock: Clock) -> None:
    alice = viewer(hub, "alice", "a")
    for offset in range(5):
        send(hub, "a", offset)
        hub.flush()
    assert len({batch["batchId"] for batch in alice.batches}) == 5


def test_nothing_is_sent_to_viewers_with_nothing_new(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    bob = viewer(hub, "bob", "b")
    send(hub, "a")
    send(hub, "b")
    hub.flush()
    assert (len(alice.batches), len(bob.batches)) == (1, 1)
    send(hub, "a", 1)
    hub.flush()
    assert (len(alice.batches), len(bob.batches)) == (2, 1)
    hub.flush()  # nothing new at all
    assert (len(alice.batches), len(bob.batches)) == (2, 1)


def test_a_stale_point_is_not_delivered(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    assert send(hub, "a", 100)
    hub.flush()
    assert send(hub, "a", 50) is False
    hub.flush()
    assert len(alice.batches) == 1
    assert hub.stats()["batcher"]["staleDropped"] == 1


def test_wildcard_viewer_gets_every_vehicle(hub: Hub) -> None:
    everything = viewer(hub, "everything", WILDCARD)
    some = viewer(hub, "some", "b")
    for vehicle in ("a", "b", "c"):
        send(hub, vehicle)
    hub.flush()
    [batch] = everything.batches
    assert ids(batch) == ["a", "b", "c"]
    assert batch["count"] == 3
    assert ids(some.batches[0]) == ["b"]


def test_viewer_subscribed_to_wildcard_and_a_vehicle_gets_each_point_once(hub: Hub) -> None:
    both = viewer(hub, "both", "a", WILDCARD)
    send(hub, "a")
    send(hub, "b")
    hub.flush()
    [batch] = both.batches
    assert ids(batch) == ["a", "b"]


def test_viewers_with_the_same_subscriptions_get_the_same_batch(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a", "b")
    bob = viewer(hub, "bob", "b", "a")
    send(hub, "a")
    send(hub, "b")
    hub.flush()
    assert alice.batches == bob.batches
    assert ids(alice.batches[0]) == ["a", "b"]


def test_subscribing_twice_never_duplicates_delivery(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    assert hub.subscribe(alice, "a") is False
    send(hub, "a")
    hub.flush()
    assert len(alice.batches) == 1
    assert alice.batches[0]["count"] == 1


def test_subscription_changes_take_effect_at_the_next_flush(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    send(hub, "a")
    send(hub, "b")
    hub.subscribe(alice, "b")  # after the points arrived, before the flush
    hub.flush()
    assert ids(alice.batches[-1]) == ["a", "b"]
    assert hub.unsubscribe(alice, "a") is True
    assert hub.unsubscribe(alice, "a") is False
    send(hub, "a", 1)
    send(hub, "b", 1)
    hub.flush()
    assert ids(alice.batches[-1]) == ["b"]
    hub.unsubscribe(alice, "b")
    send(hub, "b", 2)
    hub.flush()
    assert len(alice.batches) == 2


def test_disconnected_viewer_gets_nothing_and_leaves_no_subscriptions(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a", WILDCARD)
    bob = viewer(hub, "bob", "a")
    hub.disconnect(alice)
    send(hub, "a")
    hub.flush()
    assert alice.batches == []
    assert len(bob.batches) == 1
    assert hub.stats()["subscriptions"]["vehicleSubscriptions"] == {"a": 1}
    assert hub.stats()["connectedClients"] == 1


def test_flush_matches_subscriptions_for_many_viewers(hub: Hub) -> None:
    rng = random.Random(1234)
    vehicles = [f"v{i}" for i in range(150)]
    viewers: dict[FakeViewer, set[str]] = {}
    for index in range(60):
        wanted = set(rng.sample(vehicles, rng.choice([1, 3, 10, 40])))
        if index % 20 == 0:
            wanted = {WILDCARD}
        if index % 7 == 0:
            wanted = set(next(iter(viewers.values()), {"v0"}))  # share a set
        viewers[viewer(hub, f"viewer{index}", *sorted(wanted))] = wanted
    for round_number in range(3):
        moved = set(rng.sample(vehicles, 30))
        for vehicle in moved:
            send(hub, vehicle, round_number * 10, latitude=round_number)
            send(hub, vehicle, round_number * 10 - 1, latitude=-1)  # out of order: dropped
        before = {fake: len(fake.batches) for fake in viewers}
        hub.flush()
        for fake, wanted in viewers.items():
            expected = moved if WILDCARD in wanted else moved & wanted
            if not expected:
                assert len(fake.batches) == before[fake], fake
                continue
            assert len(fake.batches) == before[fake] + 1, fake
            batch = fake.batches[-1]
            assert sorted(by_vehicle(batch)) == sorted(expected)
            assert batch["count"] == len(expected)
            assert {p["latitude"] for p in batch["dataPoints"]} == {round_number}


# The flush loop


def test_start_flushes_every_batch_interval(clock: Clock) -> None:
    hub = Hub(clock, 0.5, 86400.0)
    alice = viewer(hub, "alice", "a")
    hub.start()
    send(hub, "a", 0)
    clock.advance(0.49)
    assert alice.batches == []
    clock.advance(0.01)
    assert len(alice.batches) == 1
    assert alice.batches[0]["timestamp"] == EPOCH_MS + 500
    clock.advance(0.5)  # nothing new
    assert len(alice.batches) == 1
    send(hub, "a", 1)
    send(hub, "a", 2)
    clock.advance(0.5)
    assert len(alice.batches) == 2
    assert alice.batches[1]["dataPoints"][0]["timestamp"] == EPOCH_MS + 2
    hub.stop()


def test_stop_flushes_what_is_buffered_and_stops_the_loops(clock: Clock, hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    hub.start()
    send(hub, "a", 7)
    clock.advance(0.3)
    hub.stop()
    assert len(alice.batches) == 1
    assert alice.points()[0]["timestamp"] == EPOCH_MS + 7
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert len(alice.batches) == 1


def test_stop_without_start_still_flushes(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    send(hub, "a")
    hub.stop()
    assert len(alice.batches) == 1


# Snapshots


def test_snapshot_of_a_vehicle_is_its_last_flushed_point(hub: Hub, clock: Clock) -> None:
    assert hub.snapshot("a") is None
    send(hub, "a", 1, latitude=1)
    hub.flush()
    send(hub, "a", 2, latitude=2)
    send(hub, "b", 0)
    snapshot = hub.snapshot("a")
    assert snapshot is not None
    data = decode_batch(snapshot)
    assert data["count"] == 1
    assert data["timestamp"] == EPOCH_MS
    # The pending point (timestamp 2) comes with the next flush, not twice.
    assert data["dataPoints"] == [
        {"vehicleId": "a", "timestamp": EPOCH_MS + 1, "latitude": 1, "longitude": -74.006}
    ]
    assert hub.snapshot("b") is None
    assert hub.snapshot("unknown") is None


def test_a_point_pending_at_subscription_reaches_the_new_viewer_once(hub: Hub) -> None:
    send(hub, "a", 1)
    alice = FakeViewer("alice")
    hub.connect(alice)
    hub.subscribe(alice, "a")
    assert hub.snapshot("a") is None
    hub.flush()
    hub.flush()
    assert [[p["timestamp"] for p in b["dataPoints"]] for b in alice.batches] == [[EPOCH_MS + 1]]


def test_snapshot_of_the_wildcard_holds_every_known_vehicle(hub: Hub) -> None:
    assert hub.snapshot(WILDCARD) is None
    for latitude, vehicle in enumerate(("a", "b", "c")):
        send(hub, vehicle, latitude=latitude)
    hub.flush()
    snapshot = hub.snapshot(WILDCARD)
    assert snapshot is not None
    data = decode_batch(snapshot)
    assert data["count"] == 3
    assert {p["vehicleId"]: p["latitude"] for p in data["dataPoints"]} == {
        "a": 0,
        "b": 1,
        "c": 2,
    }


def test_snapshot_does_not_drain_the_buffer(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    send(hub, "a", 1)
    hub.flush()
    send(hub, "a", 2)
    assert hub.snapshot("a") is not None
    hub.flush()
    assert len(alice.batches) == 2


def test_snapshot_batch_ids_differ_from_flush_batch_ids(hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    send(hub, "a")
    hub.flush()
    snapshot = hub.snapshot("a")
    assert snapshot is not None
    assert decode_batch(snapshot)["batchId"] != alice.batches[0]["batchId"]


# Expiry


def test_vehicles_silent_for_the_ttl_are_forgotten(clock: Clock) -> None:
    hub = Hub(clock, 1.0, 120.0)
    hub.start()
    send(hub, "quiet")
    send(hub, "chatty")
    assert hub.stats()["activeVehicles"] == 2
    for second in range(1, 200):
        clock.advance(1)
        send(hub, "chatty", second * 1000)
        if second == 100:
            assert hub.stats()["activeVehicles"] == 2
            assert hub.snapshot("quiet") is not None
    assert hub.stats()["activeVehicles"] == 1
    assert hub.snapshot("quiet") is None
    snapshot = hub.snapshot(WILDCARD)
    assert snapshot is not None
    assert ids(decode_batch(snapshot)) == ["chatty"]
    assert "quiet" not in hub.stats(include_vehicle_details=True)["vehicles"]
    hub.stop()


def test_short_ttl_expires_within_one_ttl_after_silence(clock: Clock) -> None:
    hub = Hub(clock, 1.0, 5.0)
    hub.start()
    send(hub, "a")
    clock.advance(4.9)
    assert hub.stats()["activeVehicles"] == 1
    clock.advance(5.2)  # silent for 10.1 s: at least one expiry pass after the TTL
    assert hub.stats()["activeVehicles"] == 0
    hub.stop()


def test_expire_forgets_only_silent_vehicles(clock: Clock, hub: Hub) -> None:
    hub.vehicle_ttl = 60.0
    send(hub, "old")
    clock.advance(30)
    send(hub, "new")
    clock.advance(31)
    hub.expire()
    assert [s.point.vehicle_id for s in hub.buffer.known()] == ["new"]


def test_expired_vehicle_can_come_back(clock: Clock, hub: Hub) -> None:
    hub.vehicle_ttl = 10.0
    alice = viewer(hub, "alice", "a")
    send(hub, "a", 5000)
    hub.flush()
    clock.advance(11)
    hub.expire()
    assert send(hub, "a", 0)  # older than the forgotten point: a fresh start
    hub.flush()
    assert alice.points()[-1]["timestamp"] == EPOCH_MS


# Viewers and shutdown


def test_close_all_with_no_viewers_fires_at_once(hub: Hub) -> None:
    fired: list[object] = []
    hub.close_all(1001, "going away").addCallback(fired.append)
    assert fired == [None]


def test_close_all_fires_when_every_viewer_has_disconnected(hub: Hub) -> None:
    alice = FakeViewer("alice")
    bob = FakeViewer("bob")
    hub.connect(alice)
    hub.connect(bob)
    fired: list[object] = []
    hub.close_all(1001, "server shutting down").addCallback(fired.append)
    assert alice.closed == [(1001, "server shutting down")]
    assert bob.closed == [(1001, "server shutting down")]
    assert fired == []
    hub.disconnect(alice)
    assert fired == []
    hub.disconnect(bob)
    assert fired == [None]
    assert hub.stats()["connectedClients"] == 0


def test_close_all_with_viewers_that_leave_at_once(hub: Hub) -> None:
    viewers = [viewer(hub, f"v{i}", "a") for i in range(3)]
    fired: list[object] = []
    hub.close_all(1001, "bye").addCallback(fired.append)
    assert fired == [None]
    assert all(fake.closed == [(1001, "bye")] for fake in viewers)
    assert hub.viewers == set()
    assert hub.stats()["subscriptions"]["totalClients"] == 0


def test_shutdown_delivers_the_final_batch_before_closing(clock: Clock, hub: Hub) -> None:
    alice = viewer(hub, "alice", "a")
    hub.start()
    send(hub, "a")
    clock.advance(0.5)
    hub.stop()
    fired: list[object] = []
    hub.close_all(1001, "bye").addCallback(fired.append)
    assert len(alice.batches) == 1
    assert alice.closed == [(1001, "bye")]
    assert fired == [None]


def test_a_viewer_leaving_during_delivery_does_not_break_the_flush(clock: Clock, hub: Hub) -> None:
    """A viewer may drop out while being delivered to (a failed write, say).

    The flush must still reach every other viewer, and the flush loop must keep running.
    """

    class LeavesOnDelivery(FakeViewer):
        def deliver(self, batch: Batch) -> None:
            super().deliver(batch)
            hub.disconnect(self)

    quitters = [LeavesOnDelivery(f"quitter{i}") for i in range(3)]
    for fake in quitters:
        hub.connect(fake)
        hub.subscribe(fake, "a")
    stays = viewer(hub, "stays", "a")
    hub.start()
    send(hub, "a", 1)
    clock.advance(1)
    assert [len(fake.batches) for fake in quitters] == [1, 1, 1]
    assert len(stays.batches) == 1
    send(hub, "a", 2)
    clock.advance(1)
    assert len(stays.batches) == 2
    hub.stop()


# Figures


def test_stats_figures(clock: Clock, hub: Hub) -> None:
    hub.start()
    alice = viewer(hub, "alice", "a", "b")
    viewer(hub, "bob", "a")
    viewer(hub, "carol", WILDCARD)
    viewer(hub, "dave")
    send(hub, "a", 10)
    send(hub, "a", 20)
    send(hub, "b", 0)
    send(hub, "a", 5)  # stale within the interval
    hub.record_rejected()
    hub.record_rejected(2)
    assert hub.stats()["batcher"]["bufferedVehicles"] == 2
    clock.advance(1)
    send(hub, "c", 0)
    send(hub, "c", -1)  # stale
    stats = hub.stats()
    assert stats == {
        "connectedClients": 4,
        "activeVehicles": 3,
        "totalTelemetryReceived": 6,
        "totalTelemetryRejected": 3,
        "subscriptions": {
            "totalVehicles": 3,
            "totalClients": 3,
            "totalSubscriptions": 4,
            "vehicleSubscriptions": {"a": 2, "b": 1, WILDCARD: 1},
        },
        "batcher": {
            "totalBatches": 1,
            "totalPoints": 2,
            "totalVehicleUpdates": 4,
            "batchesDelivered": 3,  # alice, bob, carol; dave has nothing
            "pendingBatches": 0,
            "bufferedVehicles": 1,
            "staleDropped": 2,
        },
        "slowViewersDropped": 0,
    }
    assert ids(alice.batches[0]) == ["a", "b"]
    orjson.dumps(stats)  # JSON-serialisable
    hub.stop()


def test_stats_with_vehicle_details(clock: Clock, hub: Hub) -> None:
    viewer(hub, "alice", "a")
    viewer(hub, "bob", "a", "b")
    send(hub, "a", 100)
    clock.advance(2.5)
    send(hub, "b", 200)
    send(hub, "c", 300)
    stats = hub.stats(include_vehicle_details=True)
    vehicles = stats["vehicles"]
    assert vehicles["a"] == {
        "subscribers": 2,
        "lastSeen": EPOCH_MS,
        "lastTimestamp": EPOCH_MS + 100,
    }
    assert vehicles["b"] == {
        "subscribers": 1,
        "lastSeen": EPOCH_MS + 2500,
        "lastTimestamp": EPOCH_MS + 200,
    }
    assert vehicles["c"]["subscribers"] == 0
    assert set(vehicles) == {"a", "b", "c"}
    assert "vehicles" not in hub.stats()


def test_uptime_and_now(clock: Clock) -> None:
    hub = Hub(clock, 1.0, 86400.0)
    assert hub.now_ms() == EPOCH_MS
    clock.advance(3)
    hub.start()
    clock.advance(12.3456)
    assert hub.uptime() == 12.346
    assert hub.now_ms() == EPOCH_MS + 15345
    hub.stop()
    assert clock.seconds() == pytest.approx(EPOCH_S + 15.3456)


def test_batch_framed_caches_one_frame_per_key() -> None:
    batch = Batch(b'{"count":0}', 0, [])
    calls: list[Batch] = []

    def frame(b: Batch) -> bytes:
        calls.append(b)
        return b"framed:" + b.data

    assert batch.framed("ws", frame) == b'framed:{"count":0}'
    assert batch.framed("ws", frame) == b'framed:{"count":0}'
    assert batch.framed("other", frame) == b'framed:{"count":0}'
    assert calls == [batch, batch]


def test_a_flush_to_many_viewers_goes_out_over_several_turns(hub: Hub, clock: Clock) -> None:
    viewers = [viewer(hub, f"v{i}", "a") for i in range(DELIVERIES_PER_TURN * 2 + 50)]
    send(hub, "a")
    hub.flush()
    assert sum(len(v.batches) for v in viewers) == DELIVERIES_PER_TURN
    assert hub.stats()["batcher"]["pendingBatches"] == DELIVERIES_PER_TURN + 50
    # The rest is scheduled for the next reactor turns (Clock runs them all in one advance).
    clock.advance(0)
    assert [len(v.batches) for v in viewers] == [1] * len(viewers)
    assert hub.stats()["batcher"]["pendingBatches"] == 0


def test_stop_hands_out_every_queued_batch_at_once(hub: Hub) -> None:
    viewers = [viewer(hub, f"v{i}", "a") for i in range(DELIVERIES_PER_TURN + 1)]
    send(hub, "a")
    hub.start()
    hub.stop()
    assert [len(v.batches) for v in viewers] == [1] * len(viewers)


def test_a_viewer_gone_before_its_turn_is_skipped(hub: Hub, clock: Clock) -> None:
    viewers = [viewer(hub, f"v{i}", "a") for i in range(DELIVERIES_PER_TURN + 1)]
    send(hub, "a")
    hub.flush()
    undelivered = next(v for v in viewers if not v.batches)
    hub.disconnect(undelivered)
    clock.advance(0)
    assert not undelivered.batches
    assert hub.batches_delivered == DELIVERIES_PER_TURN
