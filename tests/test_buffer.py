"""The latest-only buffer: newest by timestamp, ties to the later arrival, stale points, expiry."""

from __future__ import annotations

import orjson

from fleettrack.buffer import LatestBuffer
from tests.fakes import EPOCH_MS, make_point

T0 = EPOCH_MS
NOW = 1000.0


def drained(buffer: LatestBuffer) -> dict[str, tuple[int, float]]:
    """vehicle -> (timestamp, latitude) of what a flush would deliver."""
    return {
        vehicle_id: (state.point.timestamp, state.point.latitude)
        for vehicle_id, state in buffer.drain().items()
    }


def test_empty_buffer() -> None:
    buffer = LatestBuffer()
    assert buffer.drain() == {}
    assert buffer.latest("truck_001") is None
    assert buffer.known() == []
    assert (buffer.pending_count, buffer.known_count, buffer.stale_dropped, buffer.updates) == (
        0,
        0,
        0,
        0,
    )
    assert buffer.expire(NOW) == 0


def test_first_point_is_pending_and_known() -> None:
    buffer = LatestBuffer()
    point = make_point("a", T0)
    assert buffer.offer(point, NOW) is True
    assert buffer.pending_count == 1
    assert buffer.known_count == 1
    state = buffer.latest("a")
    assert state is not None
    assert state.point is point
    assert state.seen_at == NOW
    assert [s.point for s in buffer.known()] == [point]


def test_keeps_only_the_newest_point_per_vehicle() -> None:
    buffer = LatestBuffer()
    for offset in range(5):
        assert buffer.offer(make_point("a", T0 + offset, latitude=offset), NOW + offset)
    assert buffer.pending_count == 1
    assert buffer.updates == 5
    assert drained(buffer) == {"a": (T0 + 4, 4)}


def test_out_of_order_point_does_not_replace_a_newer_one() -> None:
    buffer = LatestBuffer()
    assert buffer.offer(make_point("a", T0 + 200, latitude=2), NOW)
    assert buffer.offer(make_point("a", T0 + 100, latitude=1), NOW + 1) is False
    assert buffer.offer(make_point("a", T0 + 300, latitude=3), NOW + 2)
    assert buffer.offer(make_point("a", T0 + 250, latitude=25), NOW + 3) is False
    assert drained(buffer) == {"a": (T0 + 300, 3)}
    state = buffer.latest("a")
    assert state is not None
    assert state.point.timestamp == T0 + 300


def test_equal_timestamps_later_arrival_wins() -> None:
    buffer = LatestBuffer()
    assert buffer.offer(make_point("a", T0, latitude=1), NOW)
    assert buffer.offer(make_point("a", T0, latitude=2), NOW)
    assert drained(buffer) == {"a": (T0, 2)}
    # Also after a flush: an equal timestamp is not stale.
    assert buffer.offer(make_point("a", T0, latitude=3), NOW)
    assert drained(buffer) == {"a": (T0, 3)}
    assert buffer.stale_dropped == 0


def test_point_older_than_the_delivered_one_is_stale_and_not_delivered() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0 + 500, latitude=5), NOW)
    assert drained(buffer) == {"a": (T0 + 500, 5)}
    assert buffer.offer(make_point("a", T0 + 499, latitude=4), NOW + 1) is False
    assert buffer.offer(make_point("a", T0, latitude=0), NOW + 2) is False
    assert buffer.stale_dropped == 2
    assert buffer.pending_count == 0
    assert drained(buffer) == {}
    state = buffer.latest("a")
    assert state is not None
    assert (state.point.timestamp, state.point.latitude) == (T0 + 500, 5)
    # A newer point after the stale ones is delivered normally.
    assert buffer.offer(make_point("a", T0 + 501, latitude=6), NOW + 3)
    assert drained(buffer) == {"a": (T0 + 501, 6)}
    assert buffer.stale_dropped == 2


def test_stale_points_do_not_count_as_updates() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0 + 10), NOW)
    buffer.drain()
    buffer.offer(make_point("a", T0), NOW)
    assert buffer.updates == 1


def test_drain_empties_the_pending_set_but_keeps_known_points() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0), NOW)
    buffer.offer(make_point("b", T0), NOW)
    assert set(buffer.drain()) == {"a", "b"}
    assert buffer.drain() == {}
    assert buffer.pending_count == 0
    assert buffer.known_count == 2
    assert {state.point.vehicle_id for state in buffer.known()} == {"a", "b"}


def test_drain_holds_only_vehicles_that_changed() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0), NOW)
    buffer.offer(make_point("b", T0), NOW)
    buffer.drain()
    buffer.offer(make_point("b", T0 + 1, latitude=9), NOW + 1)
    assert drained(buffer) == {"b": (T0 + 1, 9)}


def test_vehicles_are_independent() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0 + 100, latitude=1), NOW)
    # Older than a's point, but b has never been heard from: not stale.
    assert buffer.offer(make_point("b", T0, latitude=2), NOW)
    assert drained(buffer) == {"a": (T0 + 100, 1), "b": (T0, 2)}
    assert buffer.stale_dropped == 0


def test_encoded_is_the_points_json_and_follows_replacement() -> None:
    buffer = LatestBuffer()
    first = make_point("a", T0, speed=10)
    buffer.offer(first, NOW)
    state = buffer.latest("a")
    assert state is not None
    assert state.encoded == first.encode()
    assert state.encoded is state.encoded  # encoded once
    second = make_point("a", T0 + 1, speed=20)
    buffer.offer(second, NOW + 1)
    assert buffer.latest("a") is state
    assert orjson.loads(state.encoded)["speed"] == 20


def test_expire_forgets_only_silent_vehicles() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("old", T0), 100.0)
    buffer.offer(make_point("mid", T0), 200.0)
    buffer.offer(make_point("new", T0), 300.0)
    assert buffer.expire(150.0) == 1
    assert buffer.latest("old") is None
    assert {s.point.vehicle_id for s in buffer.known()} == {"mid", "new"}
    # Heard from exactly at the cut-off: kept.
    assert buffer.expire(200.0) == 0
    assert buffer.expire(300.5) == 2
    assert buffer.known_count == 0


def test_a_vehicle_heard_again_is_not_expired() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0), 100.0)
    buffer.offer(make_point("b", T0), 110.0)
    buffer.offer(make_point("a", T0 + 1), 120.0)  # a talks again, after b
    assert buffer.expire(115.0) == 1
    assert buffer.latest("b") is None
    assert buffer.latest("a") is not None


def test_expire_drops_pending_points_of_forgotten_vehicles() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0), 100.0)
    buffer.offer(make_point("b", T0), 200.0)
    assert buffer.expire(150.0) == 1
    assert set(buffer.drain()) == {"b"}


def test_forgotten_vehicle_starts_afresh() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0 + 1000), 100.0)
    buffer.drain()
    buffer.expire(200.0)
    # Older than the forgotten point, but nothing is known any more.
    assert buffer.offer(make_point("a", T0, latitude=7), 300.0)
    assert drained(buffer) == {"a": (T0, 7)}
    assert buffer.stale_dropped == 0


def test_stale_point_still_counts_as_hearing_from_the_vehicle() -> None:
    buffer = LatestBuffer()
    buffer.offer(make_point("a", T0 + 10), 100.0)
    buffer.offer(make_point("b", T0), 150.0)
    buffer.offer(make_point("a", T0), 200.0)  # stale, but the vehicle is alive
    assert buffer.expire(175.0) == 1
    assert buffer.latest("b") is None
    state = buffer.latest("a")
    assert state is not None
    assert state.point.timestamp == T0 + 10
    assert state.seen_at == 200.0
