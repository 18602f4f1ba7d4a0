"""A session's protection rules on a ``task.Clock``: auth and expiry timers, rates, slow viewers.

Every timer is driven by the clock, so the boundaries are exact: nothing happens
a millisecond before a deadline, and the close happens at it.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from fleettrack.auth import TokenVerifier, mint_token
from fleettrack.errors import ErrorCode
from fleettrack.hub import Hub
from fleettrack.limits import Limits
from fleettrack.registry import WILDCARD
from fleettrack.session import Policy, Session
from tests.fakes import EPOCH_MS, EPOCH_S, FakeConnection, raw_point

SECRET = b"fleettrack-unit-test-secret-0123456789"
OTHER_SECRET = b"somebody-else-entirely-0123456789abcdef"
VERIFIER = TokenVerifier.from_secret(SECRET)


def token(
    clock: Clock,
    ttl: float = 3600.0,
    *,
    sub: str = "tester",
    vehicles: tuple[str, ...] = ("*",),
    watch: tuple[str, ...] = ("*",),
    secret: bytes = SECRET,
    issued: float | None = None,
) -> str:
    now = clock.seconds() if issued is None else issued
    return mint_token(secret, sub, ttl, vehicles=vehicles, watch=watch, now=now)


def start(
    hub: Hub, *, url_token: str | None = None, authenticate: bool = True, **limits: Any
) -> tuple[Session, FakeConnection]:
    """A session under ``limits``, opened as the adapter opens it."""
    connection = FakeConnection()
    session = Session(hub, connection, Policy(VERIFIER if authenticate else None, Limits(**limits)))
    session.open(url_token)
    return session, connection


def send(session: Session, event: object, data: Any = None, ack: int | None = None) -> None:
    session.handle((event, data, ack))


def last_ack(connection: FakeConnection, ack: int) -> dict[str, Any]:
    found = [f for f in connection.frames if f["event"] == "ack" and f["ack"] == ack]
    assert len(found) == 1, connection.frames
    data: dict[str, Any] = found[0]["data"]
    return data


def error_code(connection: FakeConnection, ack: int) -> str:
    data = last_ack(connection, ack)
    assert data["success"] is False, data
    code: str = data["error"]["code"]
    return code


def authenticate(session: Session, connection: FakeConnection, jwt: str, ack: int = 900) -> None:
    send(session, "auth", {"token": jwt}, ack)
    assert last_ack(connection, ack)["success"] is True


def batches(connection: FakeConnection) -> list[dict[str, Any]]:
    return connection.of("vehicle:telemetry:batch")


def publish(hub: Hub, vehicle_id: str, timestamp: int, **fields: Any) -> None:
    """One point of ``vehicle_id``, flushed to its viewers at once."""
    publisher, _ = start(hub, authenticate=False)
    send(publisher, "vehicle:telemetry", raw_point(vehicle_id, timestamp, **fields))
    hub.flush()
    publisher.closed()


# Missing, expired and forged tokens; the auth timeout


def test_events_before_auth_are_unauthorized_then_the_auth_timeout_closes_4001(
    hub: Hub, clock: Clock
) -> None:
    session, conn = start(hub, auth_timeout=2.5)
    send(session, "subscribe:vehicle", {"vehicleId": "truck_1"}, 1)
    send(session, "vehicle:telemetry", raw_point("truck_1"), 2)
    send(session, "vehicle:telemetry", [raw_point("truck_1")], 3)
    send(session, "request:stats", None, 4)
    send(session, "unsubscribe:vehicle", {"vehicleId": "truck_1"})
    for ack in (1, 2, 3, 4):
        assert error_code(conn, ack) == "UNAUTHORIZED"
    error = conn.only("error")["data"]
    assert error["code"] == "UNAUTHORIZED"
    assert "auth" in error["message"]
    # Nothing was done on its behalf.
    assert hub.registry.subscriptions(session) == set()
    assert hub.telemetry_received == 0
    assert "stats" not in conn.event_names()

    clock.advance(2.499)
    assert conn.closed == []
    clock.advance(0.001)
    assert conn.closed == [(4001, "not authenticated in time")]


def test_the_default_auth_timeout_is_10_s(hub: Hub, clock: Clock) -> None:
    _, conn = start(hub)
    clock.advance(9.999)
    assert conn.closed == []
    clock.advance(0.001)
    assert [code for code, _ in conn.closed] == [4001]


def test_authenticating_in_time_cancels_the_auth_timeout(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    clock.advance(9)
    jwt = token(clock, 3600, sub="dispatch")
    send(session, "auth", {"token": jwt}, 1)
    assert last_ack(conn, 1) == {
        "success": True,
        "subject": "dispatch",
        "expiresAt": (EPOCH_S + 9 + 3600) * 1000,
    }
    clock.advance(100)
    assert conn.closed == []
    send(session, "subscribe:vehicle", {"vehicleId": "truck_1"}, 2)
    assert last_ack(conn, 2)["success"] is True


def test_expired_token_is_refused_and_the_auth_timer_keeps_running(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    expired = token(clock, 3600, issued=clock.seconds() - 7200)
    send(session, "auth", {"token": expired}, 1)
    assert error_code(conn, 1) == "UNAUTHORIZED"
    assert "expired" in last_ack(conn, 1)["error"]["message"]
    send(session, "subscribe:vehicle", {"vehicleId": "truck_1"}, 2)
    assert error_code(conn, 2) == "UNAUTHORIZED"
    clock.advance(10)
    assert [code for code, _ in conn.closed] == [4001]


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        ("forged", "UNAUTHORIZED", "token signature is invalid"),
        ({"token": "not-a-jwt"}, "UNAUTHORIZED", "token is malformed"),
        ({"token": ""}, "UNAUTHORIZED", "a token is required"),
        ({"token": 12345}, "UNAUTHORIZED", "a token is required"),
        ({}, "UNAUTHORIZED", "a token is required"),
        ("just-a-string", "INVALID_REQUEST", "data must be a JSON object"),
    ],
)
def test_forged_malformed_and_missing_tokens_are_refused(
    hub: Hub, clock: Clock, data: Any, code: str, message: str
) -> None:
    if data == "forged":
        data = {"token": token(clock, secret=OTHER_SECRET)}
    session, conn = start(hub)
    send(session, "auth", data, 1)
    assert error_code(conn, 1) == code
    assert last_ack(conn, 1)["error"]["message"] == message
    assert session.grant is None
    send(session, "request:stats", None, 2)
    assert error_code(conn, 2) == "UNAUTHORIZED"
    clock.advance(10)
    assert [close for close, _ in conn.closed] == [4001]


def test_forged_token_error_is_unauthorized_with_the_token_field(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    send(session, "auth", {"token": token(clock, secret=OTHER_SECRET)}, 1)
    assert last_ack(conn, 1)["error"] == {
        "code": "UNAUTHORIZED",
        "message": "token signature is invalid",
        "field": "token",
    }


# Token expiry and re-authentication


def test_a_connection_whose_token_expires_is_closed_4001(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    authenticate(session, conn, token(clock, 60))
    clock.advance(59.999)
    assert conn.closed == []
    clock.advance(0.001)
    assert conn.closed == [(4001, "token expired")]


def test_re_auth_with_a_fresh_token_extends_the_connection(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    authenticate(session, conn, token(clock, 60), ack=1)
    clock.advance(50)
    authenticate(session, conn, token(clock, 60), ack=2)
    clock.advance(20)  # 70 s after the first token: past its expiry
    assert conn.closed == []
    send(session, "subscribe:vehicle", {"vehicleId": "truck_1"}, 3)
    assert last_ack(conn, 3)["success"] is True
    clock.advance(39.999)
    assert conn.closed == []
    clock.advance(0.001)
    assert conn.closed == [(4001, "token expired")]


def test_a_failed_re_auth_keeps_the_old_grant_and_its_deadline(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    authenticate(session, conn, token(clock, 60, sub="first"))
    clock.advance(30)
    send(session, "auth", {"token": token(clock, 3600, secret=OTHER_SECRET)}, 1)
    assert error_code(conn, 1) == "UNAUTHORIZED"
    assert session.grant is not None
    assert session.grant.subject == "first"
    send(session, "subscribe:vehicle", {"vehicleId": "truck_1"}, 2)
    assert last_ack(conn, 2)["success"] is True
    clock.advance(30)
    assert conn.closed == [(4001, "token expired")]


def test_a_shorter_fresh_token_brings_the_deadline_forward(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    authenticate(session, conn, token(clock, 3600), ack=1)
    authenticate(session, conn, token(clock, 5), ack=2)
    clock.advance(5)
    assert [code for code, _ in conn.closed] == [4001]


def test_url_token_authenticates_at_open(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub, url_token=token(clock, 60, sub="gateway"))
    assert session.grant is not None
    assert session.grant.subject == "gateway"
    assert conn.frames == []
    send(session, "vehicle:telemetry", raw_point("truck_1"), 1)
    assert last_ack(conn, 1)["accepted"] == 1
    clock.advance(59.999)  # past the auth timeout: it was cancelled
    assert conn.closed == []
    clock.advance(0.001)
    assert conn.closed == [(4001, "token expired")]


@pytest.mark.parametrize("kind", ["forged", "expired", "garbage"])
def test_bad_url_token_closes_4001_at_once(hub: Hub, clock: Clock, kind: str) -> None:
    bad = {
        "forged": token(clock, secret=OTHER_SECRET),
        "expired": token(clock, 60, issued=clock.seconds() - 120),
        "garbage": "a.b.c",
    }[kind]
    session, conn = start(hub, url_token=bad)
    assert len(conn.closed) == 1
    assert conn.closed[0][0] == 4001
    assert session.grant is None
    # A closing session ignores whatever still arrives.
    send(session, "auth", {"token": token(clock)}, 1)
    assert conn.frames == []


def test_closed_cancels_every_timer(hub: Hub, clock: Clock) -> None:
    unauthenticated, _ = start(hub)
    authenticated, conn = start(hub)
    authenticate(authenticated, conn, token(clock, 60))
    authenticated.pause()
    assert len(clock.getDelayedCalls()) == 3  # auth, expiry, stall
    unauthenticated.closed()
    authenticated.closed()
    assert clock.getDelayedCalls() == []
    assert hub.viewers == set()
    assert hub.holding == set()


def test_an_open_server_needs_no_auth_and_sets_no_timer(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub, authenticate=False)
    assert clock.getDelayedCalls() == []
    send(session, "subscribe:vehicle", {"vehicleId": "truck_1"}, 1)
    assert last_ack(conn, 1)["success"] is True
    send(session, "auth", {"token": "anything"}, 2)
    assert last_ack(conn, 2) == {"success": True, "subject": "anonymous", "expiresAt": None}
    clock.advance(86400)
    assert conn.closed == []


# Rights: publishing and watching


def test_publishing_as_another_vehicle_is_forbidden_per_point(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub)
    authenticate(session, conn, token(clock, vehicles=("fleet-a-*",), watch=()))
    send(session, "vehicle:telemetry", raw_point("fleet-b-1"), 1)
    assert last_ack(conn, 1)["error"]["code"] == "FORBIDDEN"
    assert last_ack(conn, 1)["error"]["field"] == "vehicleId"
    points = [raw_point("fleet-a-1"), raw_point("fleet-b-1"), raw_point("fleet-a-2")]
    send(session, "vehicle:telemetry", points, 2)
    ack = last_ack(conn, 2)
    assert (ack["success"], ack["accepted"], ack["stale"]) == (True, 2, 0)
    assert [(r["index"], r["code"]) for r in ack["rejected"]] == [(1, "FORBIDDEN")]
    assert sorted(s.point.vehicle_id for s in hub.buffer.known()) == ["fleet-a-1", "fleet-a-2"]
    assert hub.telemetry_rejected == 2


def test_re_auth_with_a_narrower_watch_drops_what_it_no_longer_allows(
    hub: Hub, clock: Clock
) -> None:
    session, conn = start(hub)
    authenticate(session, conn, token(clock, watch=("*",)), ack=1)
    send(session, "subscribe:vehicle", {"vehicleId": "fleet-a-1"})
    send(session, "subscribe:vehicle", {"vehicleId": "fleet-b-1"})
    send(session, "subscribe:vehicle", {"vehicleId": WILDCARD})
    conn.take()
    authenticate(session, conn, token(clock, watch=("fleet-a-*",)), ack=2)
    assert conn.of("subscription:removed") == [{"vehicleId": "fleet-b-1"}]
    assert hub.registry.subscriptions(session) == {"fleet-a-1", WILDCARD}
    send(session, "subscribe:vehicle", {"vehicleId": "fleet-b-1"}, 3)
    assert error_code(conn, 3) == "FORBIDDEN"
    conn.take()
    publish(hub, "fleet-b-2", EPOCH_MS)
    publish(hub, "fleet-a-3", EPOCH_MS)
    assert [[p["vehicleId"] for p in b["dataPoints"]] for b in batches(conn)] == [["fleet-a-3"]]


# The message rate and floods


def test_rate_limited_once_the_burst_is_spent_and_served_again_after_refill(
    hub: Hub, clock: Clock
) -> None:
    session, conn = start(hub, authenticate=False, messages_per_second=2, message_burst=3)
    for ack in (1, 2, 3):
        send(session, "subscribe:vehicle", {"vehicleId": f"v{ack}"}, ack)
        assert last_ack(conn, ack)["success"] is True
    send(session, "subscribe:vehicle", {"vehicleId": "v4"}, 4)
    assert last_ack(conn, 4)["error"]["code"] == "RATE_LIMITED"
    assert "v4" not in hub.registry.subscriptions(session)
    conn.take()
    send(session, "request:stats")
    error = conn.only("error")["data"]
    assert error["code"] == ErrorCode.RATE_LIMITED
    assert "2 messages per second" in error["message"]
    assert "stats" not in conn.event_names()
    clock.advance(0.5)  # one token back at 2/s
    send(session, "subscribe:vehicle", {"vehicleId": "v4"}, 5)
    assert last_ack(conn, 5)["success"] is True
    send(session, "subscribe:vehicle", {"vehicleId": "v5"}, 6)
    assert error_code(conn, 6) == "RATE_LIMITED"
    assert conn.closed == []


def flood(session: Session, clock: Clock, seconds: float, interval: float) -> list[dict[str, Any]]:
    """Send a message every ``interval`` for ``seconds``; the frames the session answered."""
    connection = session.connection
    assert isinstance(connection, FakeConnection)
    connection.take()
    for _ in range(round(seconds / interval)):
        send(session, "request:stats", None, 1)
        clock.advance(interval)
    return connection.take()


def limited(frames: list[dict[str, Any]]) -> int:
    return sum(1 for f in frames if f["data"].get("error", {}).get("code") == "RATE_LIMITED")


def test_every_message_refused_for_10_s_closes_1008(hub: Hub, clock: Clock) -> None:
    # 0.05 tokens/s: after the first message nothing is let through for 20 s.
    session, conn = start(hub, authenticate=False, messages_per_second=0.05, message_burst=1)
    send(session, "request:stats", None, 1)  # the one token
    clock.advance(0.5)
    first_limited_at = clock.seconds()
    frames = flood(session, clock, 9.5, 0.5)
    assert limited(frames) == 19
    assert conn.closed == []
    assert clock.seconds() - first_limited_at == 9.5
    send(session, "request:stats", None, 1)  # at 9.5 s: still answered
    assert limited(conn.take()) == 1
    clock.advance(0.5)
    send(session, "request:stats", None, 1)  # at 10 s: closed instead
    assert conn.closed == [(1008, "message rate limit exceeded for too long")]
    assert conn.frames == []
    send(session, "request:stats", None, 2)
    assert conn.frames == []


def test_flooding_above_the_rate_for_10_s_closes_1008(hub: Hub, clock: Clock) -> None:
    """A real flood: ten times the rate. The bucket lets one message through every
    1/rate seconds, but the connection is over its limit all along."""
    session, conn = start(hub, authenticate=False, messages_per_second=10, message_burst=5)
    frames = flood(session, clock, 9.5, 0.01)
    assert limited(frames) > 800
    assert conn.closed == []
    flood(session, clock, 1.0, 0.01)
    assert [code for code, _ in conn.closed] == [1008]


def test_recovery_resets_the_flood_window(hub: Hub, clock: Clock) -> None:
    # 0.05 tokens/s, burst 1: one message per 20 s gets through.
    session, conn = start(hub, authenticate=False, messages_per_second=0.05, message_burst=1)
    flood(session, clock, 8, 0.5)  # limited from 0.5 s to 7.5 s
    clock.advance(20)  # quiet: the bucket refills
    frames = flood(session, clock, 8, 0.5)  # one accepted, then limited again
    assert frames[0]["data"]["success"] is True
    assert limited(frames) == 15
    # 8 + 8 s of flooding, but neither stretch has lasted 10 s yet.
    assert conn.closed == []
    flood(session, clock, 2.5, 0.5)  # the second stretch: limited for 9.5 s
    assert conn.closed == []
    flood(session, clock, 0.5, 0.5)  # 10 s
    assert [code for code, _ in conn.closed] == [1008]


# Points per second through arrays


def test_points_per_second_through_arrays(hub: Hub, clock: Clock) -> None:
    session, conn = start(hub, authenticate=False, points_per_second=10)
    base = EPOCH_MS
    send(session, "vehicle:telemetry", [raw_point(f"g{i}", base) for i in range(10)], 1)
    assert last_ack(conn, 1)["accepted"] == 10
    send(session, "vehicle:telemetry", [raw_point("g0", base + 1)], 2)
    refused = last_ack(conn, 2)
    assert refused["success"] is False
    assert refused["error"]["code"] == "RATE_LIMITED"
    assert refused["error"]["field"] == "data"
    assert "10 points per second" in refused["error"]["message"]
    assert hub.telemetry_received == 10  # refused as a whole: nothing of it was taken
    # Single points are not gateway traffic; only the message rate applies.
    send(session, "vehicle:telemetry", raw_point("g0", base + 2), 3)
    assert last_ack(conn, 3)["accepted"] == 1
    clock.advance(0.5)  # five points' worth back
    send(session, "vehicle:telemetry", [raw_point(f"g{i}", base + 3) for i in range(6)], 4)
    assert error_code(conn, 4) == "RATE_LIMITED"
    send(session, "vehicle:telemetry", [raw_point(f"g{i}", base + 3) for i in range(5)], 5)
    assert last_ack(conn, 5)["accepted"] == 5
    clock.advance(60)
    # More points than a second's worth never fit, however long the gateway waits.
    send(session, "vehicle:telemetry", [raw_point(f"g{i}", base + 4) for i in range(11)], 6)
    assert error_code(conn, 6) == "RATE_LIMITED"
    assert conn.closed == []


# Subscriptions


def test_subscription_limit(hub: Hub) -> None:
    session, conn = start(hub, authenticate=False, max_subscriptions=2)
    send(session, "subscribe:vehicle", {"vehicleId": "a"}, 1)
    send(session, "subscribe:vehicle", {"vehicleId": WILDCARD}, 2)
    send(session, "subscribe:vehicle", {"vehicleId": "b"}, 3)
    assert last_ack(conn, 3)["error"] == {
        "code": "SUBSCRIPTION_LIMIT",
        "message": "at most 2 subscriptions per connection",
        "field": "vehicleId",
    }
    assert hub.registry.subscriptions(session) == {"a", WILDCARD}
    send(session, "subscribe:vehicle", {"vehicleId": "a"}, 4)  # already held: not a new one
    assert last_ack(conn, 4)["alreadySubscribed"] is True
    send(session, "unsubscribe:vehicle", {"vehicleId": "a"}, 5)
    send(session, "subscribe:vehicle", {"vehicleId": "b"}, 6)
    assert last_ack(conn, 6)["success"] is True


# Slow viewers


def viewer(hub: Hub, *vehicle_ids: str, **limits: Any) -> tuple[Session, FakeConnection]:
    session, conn = start(hub, authenticate=False, **limits)
    for vehicle_id in vehicle_ids:
        send(session, "subscribe:vehicle", {"vehicleId": vehicle_id})
    conn.take()
    return session, conn


def test_a_paused_viewer_holds_only_the_newest_point_per_vehicle(hub: Hub) -> None:
    session, conn = viewer(hub, WILDCARD)
    _, other_conn = viewer(hub, WILDCARD)
    session.pause()
    for n in range(5):
        publish(hub, "bus_1", EPOCH_MS + n, speed=n)
    publish(hub, "bus_2", EPOCH_MS)
    assert batches(conn) == []
    assert hub.stats()["batcher"]["pendingBatches"] == 1
    # Someone else's pause holds nothing back from the others.
    assert len(batches(other_conn)) == 6

    session.resume()
    (batch,) = batches(conn)
    assert batch["count"] == 2
    newest = {p["vehicleId"]: (p["timestamp"], p.get("speed")) for p in batch["dataPoints"]}
    assert newest == {"bus_1": (EPOCH_MS + 4, 4), "bus_2": (EPOCH_MS, None)}
    assert hub.stats()["batcher"]["pendingBatches"] == 0
    # Back to normal delivery.
    publish(hub, "bus_1", EPOCH_MS + 5)
    assert [b["dataPoints"][0]["timestamp"] for b in batches(conn)[1:]] == [EPOCH_MS + 5]


def test_a_paused_viewer_of_one_vehicle_holds_only_that_vehicle(hub: Hub) -> None:
    session, conn = viewer(hub, "bus_1")
    session.pause()
    publish(hub, "bus_1", EPOCH_MS)
    publish(hub, "bus_2", EPOCH_MS)
    publish(hub, "bus_1", EPOCH_MS + 1)
    session.resume()
    assert [[p["vehicleId"] for p in b["dataPoints"]] for b in batches(conn)] == [["bus_1"]]
    assert batches(conn)[0]["dataPoints"][0]["timestamp"] == EPOCH_MS + 1


def test_resume_with_nothing_held_sends_nothing(hub: Hub) -> None:
    session, conn = viewer(hub, WILDCARD)
    session.pause()
    assert hub.stats()["batcher"]["pendingBatches"] == 0  # nothing held yet
    session.resume()
    assert conn.frames == []


def test_a_viewer_that_stays_paused_is_closed_1008_and_counted(hub: Hub, clock: Clock) -> None:
    session, conn = viewer(hub, WILDCARD, slow_viewer_timeout=30)
    session.pause()
    publish(hub, "bus_1", EPOCH_MS)
    clock.advance(20)
    session.pause()  # still paused: the stall started 20 s ago, not now
    clock.advance(9.999)
    assert conn.closed == []
    assert hub.stats()["slowViewersDropped"] == 0
    clock.advance(0.001)
    assert conn.closed == [(1008, "not reading: stalled for 30 s")]
    assert hub.slow_viewers_dropped == 1
    assert hub.stats()["slowViewersDropped"] == 1
    session.closed()
    assert hub.stats()["batcher"]["pendingBatches"] == 0


def test_resuming_stops_the_stall_timer_and_a_new_pause_starts_afresh(
    hub: Hub, clock: Clock
) -> None:
    session, conn = viewer(hub, WILDCARD, slow_viewer_timeout=5)
    session.pause()
    clock.advance(4)
    session.resume()
    clock.advance(10)
    assert conn.closed == []
    session.pause()
    clock.advance(4.999)
    assert conn.closed == []
    clock.advance(0.001)
    assert [code for code, _ in conn.closed] == [1008]
    assert hub.slow_viewers_dropped == 1


def test_a_point_held_for_a_vehicle_unsubscribed_meanwhile_is_not_sent(hub: Hub) -> None:
    session, conn = viewer(hub, "bus_1", "bus_2")
    session.pause()
    publish(hub, "bus_1", EPOCH_MS)
    publish(hub, "bus_2", EPOCH_MS)
    send(session, "unsubscribe:vehicle", {"vehicleId": "bus_1"})
    session.resume()
    assert [[p["vehicleId"] for p in b["dataPoints"]] for b in batches(conn)] == [["bus_2"]]


def test_a_point_held_before_a_narrower_re_auth_is_not_sent(hub: Hub, clock: Clock) -> None:
    """Held points are private data too: the grant at resume decides what leaves."""
    session, conn = start(hub)
    authenticate(session, conn, token(clock, watch=("*",)), ack=1)
    send(session, "subscribe:vehicle", {"vehicleId": WILDCARD})
    session.pause()
    publish(hub, "fleet-a-1", EPOCH_MS)
    publish(hub, "fleet-b-1", EPOCH_MS)
    authenticate(session, conn, token(clock, watch=("fleet-a-*",)), ack=2)
    session.resume()
    assert [[p["vehicleId"] for p in b["dataPoints"]] for b in batches(conn)] == [["fleet-a-1"]]


def test_a_subscription_snapshot_is_held_while_paused(hub: Hub) -> None:
    """A viewer that is not reading must not be sent batches, snapshots included: a
    client could otherwise subscribe to "*" again and again and grow the server's
    send buffer by a snapshot of every vehicle each time."""
    publish(hub, "bus_1", EPOCH_MS)
    publish(hub, "bus_2", EPOCH_MS)
    session, conn = viewer(hub)
    session.pause()
    send(session, "subscribe:vehicle", {"vehicleId": WILDCARD}, 1)
    assert last_ack(conn, 1)["success"] is True
    assert batches(conn) == []
    session.resume()
    (batch,) = batches(conn)
    assert sorted(p["vehicleId"] for p in batch["dataPoints"]) == ["bus_1", "bus_2"]
