"""Hostile input: whatever a client sends, it is answered, and forgotten when the client goes.

Property-based, at two levels. At the message handler (a :class:`Session` on a
real :class:`Hub` and a ``task.Clock``) hypothesis throws arbitrary JSON values,
arbitrary bytes through the decoder, deep nesting, wrong types in every field
of every event and random multi-connection conversations. At a live connection
(the real service, a real client) it throws random frames. Invariants:

- every message is answered: an ``ack`` with its number when it carried one,
  else an ``error`` event, or nothing (or the event's documented reply) when
  it succeeded; never an exception out of ``handle`` or in the server's log;
- every frame the server sends is valid JSON of the documented shape;
- once every connection has closed, the registry, the hub and the clock are
  back to their baseline: no viewers, subscriptions, audiences or timers.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar, Final

import orjson
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, race, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from zope.interface import provider

from fleettrack.auth import TokenVerifier, mint_token
from fleettrack.errors import CloseCode, ErrorCode, ProtocolError
from fleettrack.hub import Hub
from fleettrack.registry import WILDCARD
from fleettrack.session import Policy, Session
from fleettrack.telemetry import parse_point
from fleettrack.wire import Message, decode_message
from tests.conftest import RunningServer, start_server
from tests.fakes import EPOCH_MS, EPOCH_S, FakeConnection, make_clock
from tests.wsclient import WSClient

# The values a client can put anywhere.

HUGE_INTS: Final = (
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**100,
    -(10**400),
)
SCALARS: Final = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE_INTS)
    # NaN, both infinities and -0.0 included: a Message can hold what JSON cannot.
    | st.floats()
    | st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1.7e308])
    | st.text(max_size=20)
)
JSON_VALUES: Final = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)
#: What JSON itself can carry (orjson never decodes NaN, infinities or ints beyond 64 bits).
JSON_SAFE: Final = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)

EVENTS: Final = (
    "auth",
    "subscribe:vehicle",
    "unsubscribe:vehicle",
    "vehicle:telemetry",
    "request:stats",
)
VEHICLES: Final = ("truck_1", "truck_2", "van_1", "van_2")
ACKS: Final = st.none() | st.integers(0, 2**64 - 1)


def hostile(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's valid values, or anything at all in its place."""
    return valid | JSON_VALUES


# Tokens: the server's secret, a foreign one, rights to everything and to part of the fleet.

SECRET: Final = b"0123456789abcdef" * 4
VERIFIER: Final = TokenVerifier.from_secret(SECRET)
FULL_TOKEN: Final = mint_token(SECRET, "dispatch", 3600, vehicles=["*"], watch=["*"], now=EPOCH_S)
TRUCKS_TOKEN: Final = mint_token(
    SECRET, "trucks", 3600, vehicles=["truck_1"], watch=["truck_*"], now=EPOCH_S
)
TOKENS: Final = (
    FULL_TOKEN,
    TRUCKS_TOKEN,
    mint_token(SECRET, "late", 60, vehicles=["*"], watch=["*"], now=EPOCH_S - 3600),
    mint_token(b"f" * 32, "forger", 3600, vehicles=["*"], watch=["*"], now=EPOCH_S),
    FULL_TOKEN[:-4] + "AAAA",
    "",
    "a.b.c",
)

TIMESTAMPS: Final = st.integers(EPOCH_MS - 600_000, EPOCH_MS + 60_000) | st.sampled_from(
    [EPOCH_MS, EPOCH_MS + 5 * 60_000 + 1, 946_684_799_999, 1_700_000_000]
)
POINTS: Final = st.fixed_dictionaries(
    {
        "vehicleId": hostile(st.sampled_from(VEHICLES)),
        "timestamp": hostile(TIMESTAMPS),
        "latitude": hostile(st.floats(-90, 90) | st.integers(-90, 90)),
        "longitude": hostile(st.floats(-180, 180) | st.integers(-180, 180)),
    },
    optional={
        "speed": hostile(st.floats(0, 2000)),
        "bearing": hostile(st.floats(0, 359.9)),
        "altitude": hostile(st.floats(-500, 9000)),
        "accuracy": hostile(st.floats(0, 100)),
        "attributes": hostile(
            st.dictionaries(st.text(max_size=70), SCALARS | st.text(max_size=300), max_size=40)
        ),
        "driver": JSON_VALUES,
        "": JSON_VALUES,
        "note": st.text(max_size=2500),
    },
)
AUTH_DATA: Final = hostile(
    st.fixed_dictionaries({}, optional={"token": hostile(st.sampled_from(TOKENS))})
)
SUBSCRIPTION_DATA: Final = hostile(
    st.fixed_dictionaries(
        {},
        optional={
            "vehicleId": hostile(
                st.sampled_from([*VEHICLES, "*", "", "a" * 65, "bad id!", "**", "truck_?"])
            )
        },
    )
)
TELEMETRY_DATA: Final = hostile(POINTS | st.lists(POINTS, max_size=6))
STATS_DATA: Final = hostile(
    st.fixed_dictionaries({}, optional={"includeVehicleDetails": hostile(st.booleans())})
)
DATA_OF: Final = {
    "auth": AUTH_DATA,
    "subscribe:vehicle": SUBSCRIPTION_DATA,
    "unsubscribe:vehicle": SUBSCRIPTION_DATA,
    "vehicle:telemetry": TELEMETRY_DATA,
    "request:stats": STATS_DATA,
}
HOSTILE_MESSAGES: Final = st.one_of(
    *(st.tuples(st.just(event), data, ACKS) for event, data in DATA_OF.items()),
    # Unknown events, and events that are not strings at all.
    st.tuples(JSON_VALUES | st.sampled_from(["", "AUTH", "ack", "error"]), JSON_VALUES, ACKS),
)
VALID_POINTS: Final = st.builds(
    lambda vehicle_id, age, latitude, longitude, attributes: {
        "vehicleId": vehicle_id,
        "timestamp": EPOCH_MS - age,
        "latitude": latitude,
        "longitude": longitude,
        **attributes,
    },
    st.sampled_from(VEHICLES),
    st.integers(-60_000, 600_000),
    st.floats(-90, 90),
    st.floats(-180, 180),
    st.fixed_dictionaries({}, optional={"speed": st.floats(0, 2000), "driver": st.text()}),
)
#: Well-formed requests, so that conversations get somewhere: subscriptions, snapshots, batches.
VALID_MESSAGES: Final = st.one_of(
    st.tuples(
        st.sampled_from(["subscribe:vehicle", "unsubscribe:vehicle"]),
        st.builds(lambda vehicle_id: {"vehicleId": vehicle_id}, st.sampled_from([*VEHICLES, "*"])),
        ACKS,
    ),
    st.tuples(st.just("vehicle:telemetry"), VALID_POINTS | st.lists(VALID_POINTS), ACKS),
    st.tuples(
        st.just("request:stats"),
        st.none() | st.builds(lambda details: {"includeVehicleDetails": details}, st.booleans()),
        ACKS,
    ),
    st.tuples(st.just("auth"), st.builds(lambda t: {"token": t}, st.sampled_from(TOKENS)), ACKS),
)
MESSAGES: Final = VALID_MESSAGES | HOSTILE_MESSAGES


# The documented shape of everything the server sends.

ERROR_CODES: Final = frozenset(code.value for code in ErrorCode)
STATS_KEYS: Final = frozenset(
    {
        "connectedClients",
        "activeVehicles",
        "totalTelemetryReceived",
        "totalTelemetryRejected",
        "subscriptions",
        "batcher",
        "slowViewersDropped",
    }
)
#: Besides its ack, what a successful message of each event may cause to be sent.
SIDE_EVENTS: Final[dict[object, frozenset[str]]] = {
    "auth": frozenset({"subscription:removed"}),
    "subscribe:vehicle": frozenset({"subscription:confirmed", "vehicle:telemetry:batch"}),
    "unsubscribe:vehicle": frozenset({"subscription:removed"}),
    "vehicle:telemetry": frozenset(),
    "request:stats": frozenset(),
}
SUCCESS_KEYS: Final[dict[object, frozenset[str]]] = {
    "auth": frozenset({"success", "subject", "expiresAt"}),
    "subscribe:vehicle": frozenset({"success", "vehicleId", "subscribedAt", "alreadySubscribed"}),
    "unsubscribe:vehicle": frozenset({"success", "vehicleId", "wasSubscribed"}),
    "vehicle:telemetry": frozenset({"success", "accepted", "stale", "rejected"}),
}
FAR_FUTURE_MS: Final = 2**62


def assert_error_object(error: Any, *, with_timestamp: bool) -> None:
    assert type(error) is dict
    keys = {"code", "message"} | ({"timestamp"} if with_timestamp else set())
    assert keys <= set(error) <= keys | {"field"}, error
    assert error["code"] in ERROR_CODES
    assert type(error["message"]) is str
    assert error["message"]
    assert type(error.get("field", "")) is str
    if with_timestamp:
        assert type(error["timestamp"]) is int


def assert_delivered_point(point: Any) -> None:
    """A point as delivered is a valid point, already in its normalised form."""
    assert parse_point(point, FAR_FUTURE_MS).to_wire() == point


def assert_stats(stats: Any) -> None:
    assert type(stats) is dict
    assert STATS_KEYS <= set(stats) <= STATS_KEYS | {"success", "vehicles"}
    for key in ("connectedClients", "activeVehicles", "slowViewersDropped"):
        assert type(stats[key]) is int
        assert stats[key] >= 0
    assert set(stats["subscriptions"]) == {
        "totalVehicles",
        "totalClients",
        "totalSubscriptions",
        "vehicleSubscriptions",
    }


def assert_documented(frame: Any) -> None:
    """One server frame, decoded: an envelope the protocol documents, with its data's shape."""
    assert type(frame) is dict
    event, data = frame.get("event"), frame.get("data")
    if event == "ack":
        assert set(frame) == {"event", "ack", "data"}
        assert type(frame["ack"]) is int
        assert type(data) is dict
        assert type(data.get("success")) is bool
        if data["success"] is False:
            assert set(data) == {"success", "error"}
            assert_error_object(data["error"], with_timestamp=False)
        return
    assert set(frame) == {"event", "data"}, frame
    if event == "error":
        assert_error_object(data, with_timestamp=True)
    elif event == "subscription:confirmed":
        assert set(data) == {"vehicleId", "subscribedAt"}
        assert type(data["vehicleId"]) is str
        assert type(data["subscribedAt"]) is int
    elif event == "subscription:removed":
        assert set(data) == {"vehicleId"}
        assert type(data["vehicleId"]) is str
    elif event == "vehicle:telemetry:batch":
        assert set(data) == {"batchId", "timestamp", "dataPoints", "count"}
        assert type(data["batchId"]) is str
        assert type(data["timestamp"]) is int
        assert data["count"] == len(data["dataPoints"])
        vehicle_ids = [point["vehicleId"] for point in data["dataPoints"]]
        assert len(set(vehicle_ids)) == len(vehicle_ids), "a vehicle twice in one batch"
        for point in data["dataPoints"]:
            assert_delivered_point(point)
    elif event == "stats":
        assert_stats(data)
    else:
        raise AssertionError(f"undocumented event {event!r}")


def assert_answered(message: Message, frames: list[dict[str, Any]]) -> None:
    """What the server sent in reply to ``message`` is exactly what the protocol promises."""
    for frame in frames:
        assert_documented(frame)
    event, data, ack = message
    names = [frame["event"] for frame in frames]
    if ack is None:
        assert "ack" not in names
        if "error" in names:
            # A refused message is answered once and changes nothing.
            assert names == ["error"]
        elif event == "request:stats":
            assert names == ["stats"]
        else:
            assert set(names) <= SIDE_EVENTS[event]
        return
    assert names, "a message with an ack got no answer"
    answer = frames[-1]
    assert (answer["event"], answer["ack"]) == ("ack", ack)
    assert "ack" not in names[:-1]
    assert "error" not in names[:-1]
    reply = answer["data"]
    if not reply["success"]:
        assert names == ["ack"], "a refused message must change nothing"
        return
    assert set(names[:-1]) <= SIDE_EVENTS[event]
    if event == "request:stats":
        assert_stats(reply)
        return
    assert set(reply) == SUCCESS_KEYS[event]
    if event == "subscribe:vehicle":
        confirmed = [f["data"] for f in frames if f["event"] == "subscription:confirmed"]
        assert confirmed == [{k: reply[k] for k in ("vehicleId", "subscribedAt")}]
        assert names[0] == "subscription:confirmed"
        assert type(reply["alreadySubscribed"]) is bool
        if reply["alreadySubscribed"]:
            assert names == ["subscription:confirmed", "ack"], "no second snapshot"
    elif event == "unsubscribe:vehicle":
        removed = [f["data"] for f in frames if f["event"] == "subscription:removed"]
        assert removed == ([{"vehicleId": reply["vehicleId"]}] if reply["wasSubscribed"] else [])
    elif event == "vehicle:telemetry":
        accepted, stale, rejected = reply["accepted"], reply["stale"], reply["rejected"]
        assert type(accepted) is int
        assert type(stale) is int
        assert accepted >= 0
        assert stale >= 0
        for entry in rejected:
            assert type(entry["index"]) is int
            assert_error_object(
                {k: v for k, v in entry.items() if k != "index"}, with_timestamp=False
            )
        assert accepted + stale + len(rejected) == (len(data) if type(data) is list else 1)
    elif event == "auth":
        assert type(reply["subject"]) is str
        assert reply["expiresAt"] is None or type(reply["expiresAt"]) is int


# A hub, its clock and the connections of one test.


OPEN_POLICY: Final = Policy()


def timer_owners(clock: Clock) -> set[object]:
    """What the clock's pending calls belong to (a LoopingCall reschedules a new call each time)."""
    return {getattr(call.func, "__self__", call.func) for call in clock.getDelayedCalls()}


class World:
    def __init__(self, policy: Policy = OPEN_POLICY, *, started: bool = False) -> None:
        self.clock: Clock = make_clock()
        self.hub = Hub(self.clock, 1.0, 600.0)
        self.policy = policy
        if started:
            self.hub.start()
        self.baseline_timers = timer_owners(self.clock)

    def open(self) -> tuple[Session, FakeConnection]:
        connection = FakeConnection()
        session = Session(self.hub, connection, self.policy)
        session.open()
        return session, connection

    def send(self, session: Session, message: Message) -> list[dict[str, Any]]:
        """Hand ``message`` to the session and check its answer; returns the frames sent."""
        connection = session.connection
        assert isinstance(connection, FakeConnection)
        before = len(connection.frames)
        session.handle(message)
        frames = connection.frames[before:]
        if not connection.closed:  # a flood's close is the one message left unanswered
            assert_answered(message, frames)
        return frames

    def receive(self, session: Session, payload: bytes) -> list[dict[str, Any]]:
        """A frame's payload as the WebSocket adapter hands it over: decoded, then handled."""
        connection = session.connection
        assert isinstance(connection, FakeConnection)
        before = len(connection.frames)
        try:
            message = decode_message(payload)
        except ProtocolError as error:
            assert error.code in {ErrorCode.INVALID_JSON, ErrorCode.INVALID_REQUEST}
            session.report(error)
            frames = connection.frames[before:]
            assert [frame["event"] for frame in frames] == ["error"]
            assert_documented(frames[0])
            assert frames[0]["data"]["code"] == error.code.value
            return frames
        return self.send(session, message)

    def authenticate(self, session: Session, token: str) -> None:
        frames = self.send(session, ("auth", {"token": token}, 0))
        assert frames[-1]["data"]["success"] is True

    def assert_baseline(self) -> None:
        """Nothing of any connection is left: no viewer, subscription, audience or timer."""
        hub, registry = self.hub, self.hub.registry
        assert hub.viewers == set()
        assert hub.holding == set()
        assert registry.stats() == {
            "totalVehicles": 0,
            "totalClients": 0,
            "totalSubscriptions": 0,
            "vehicleSubscriptions": {},
        }
        internals = ("_by_vehicle", "_by_viewer", "_audiences", "_audience_of", "_scopes")
        for name in (*internals, "_regroup"):
            assert not getattr(registry, name), f"registry.{name} = {getattr(registry, name)!r}"
        assert list(registry.audiences()) == []
        assert timer_owners(self.clock) == self.baseline_timers
        assert hub.stats()["connectedClients"] == 0
        assert hub.stats()["batcher"]["pendingBatches"] == 0


#: How a connection starts: server without auth, or with auth and which token, if any.
SETUPS: Final = st.sampled_from(["open", "unauthenticated", "full token", "trucks token"])


def world_for(setup: str) -> tuple[World, Session, FakeConnection]:
    world = World(OPEN_POLICY if setup == "open" else Policy(VERIFIER))
    session, connection = world.open()
    if setup == "full token":
        world.authenticate(session, FULL_TOKEN)
    elif setup == "trucks token":
        world.authenticate(session, TRUCKS_TOKEN)
    return world, session, connection


@settings(max_examples=300, deadline=None)
@given(setup=SETUPS, messages=st.lists(MESSAGES, min_size=1, max_size=10))
def test_any_message_is_answered_and_forgotten(setup: str, messages: list[Message]) -> None:
    world, session, _ = world_for(setup)
    for message in messages:
        world.send(session, message)
    session.closed()
    world.assert_baseline()


@settings(max_examples=150, deadline=None)
@given(setup=SETUPS, event=st.sampled_from(EVENTS), data=JSON_VALUES, ack=ACKS)
def test_any_json_value_as_any_events_data(
    setup: str, event: str, data: Any, ack: int | None
) -> None:
    world, session, _ = world_for(setup)
    world.send(session, (event, data, ack))
    session.closed()
    world.assert_baseline()


def orjson_encodable(value: Any) -> bool:
    """orjson cannot write integers beyond 64 bits; such data cannot come off the wire."""
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def envelope(event: Any, data: Any, ack: Any) -> dict[str, Any]:
    frame = {"event": event, "data": data, "ack": ack}
    return {key: value for key, value in frame.items() if value is not ...}


#: Frames as they come off the wire: bytes, JSON with NaN and 100-digit numbers, envelopes
#: with every kind of ``ack``; ``json.dumps`` writes what orjson refuses to read.
PAYLOADS: Final = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.builds(
        envelope,
        st.sampled_from(EVENTS) | JSON_VALUES,
        st.just(...) | JSON_VALUES,
        st.just(...) | st.integers(-5, 2**64 + 5) | JSON_VALUES,
    ).map(lambda frame: json.dumps(frame).encode()),
    st.builds(
        lambda event, data, ack: orjson.dumps(envelope(event, data, ack)),
        st.sampled_from(EVENTS),
        st.sampled_from(list(DATA_OF.values())).flatmap(lambda data: data).filter(orjson_encodable),
        st.just(...) | ACKS,
    ),
)


@settings(max_examples=300, deadline=None)
@given(setup=SETUPS, payloads=st.lists(PAYLOADS, min_size=1, max_size=8))
def test_any_bytes_through_the_decoder(setup: str, payloads: list[bytes]) -> None:
    world, session, _ = world_for(setup)
    for payload in payloads:
        world.receive(session, payload)
    session.closed()
    world.assert_baseline()


#: Where a deep structure can sit in a frame; ``%s`` is the structure.
NESTING_SITES: Final = {
    "event": b'{"event":%s,"ack":1}',
    "data": b'{"event":"vehicle:telemetry","data":%s,"ack":1}',
    "ack": b'{"event":"request:stats","ack":%s}',
    "vehicleId": b'{"event":"subscribe:vehicle","data":{"vehicleId":%s},"ack":1}',
    "token": b'{"event":"auth","data":{"token":%s},"ack":1}',
    "includeVehicleDetails": (
        b'{"event":"request:stats","data":{"includeVehicleDetails":%s},"ack":1}'
    ),
    "attribute": b'{"event":"vehicle:telemetry","data":{"vehicleId":"truck_1","timestamp":'
    + str(EPOCH_MS).encode()
    + b',"latitude":1,"longitude":2,"attributes":{"a":%s}},"ack":1}',
    "extra field": b'{"event":"vehicle:telemetry","data":[{"vehicleId":"truck_1","timestamp":'
    + str(EPOCH_MS).encode()
    + b',"latitude":1,"longitude":2,"extra":%s}],"ack":1}',
}


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"0" + b"}" * depth


@settings(max_examples=200, deadline=None)
@given(
    setup=SETUPS,
    site=st.sampled_from(sorted(NESTING_SITES)),
    kind=st.sampled_from(["list", "object"]),
    depth=st.integers(1, 1030),
)
def test_deep_nesting_anywhere(setup: str, site: str, kind: str, depth: int) -> None:
    world, session, _ = world_for(setup)
    frames = world.receive(session, NESTING_SITES[site] % nested(depth, kind))
    assert len(frames) >= 1
    session.closed()
    world.assert_baseline()


#: Python's default; hypothesis raises the limit while it runs a test, which hides
#: recursion in the code under test, so the deepest frames are also tried without it.
DEFAULT_RECURSION_LIMIT: Final = 1000
#: orjson refuses frames nested deeper than 1024; these straddle that and the recursion limit.
DEEP: Final = (900, 990, 1000, 1020, 1023, 1024, 1030)


@pytest.fixture
def default_recursion_limit() -> Iterator[None]:
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(DEFAULT_RECURSION_LIMIT)
    yield
    sys.setrecursionlimit(previous)


@pytest.mark.usefixtures("default_recursion_limit")
@pytest.mark.parametrize("site", sorted(NESTING_SITES))
@pytest.mark.parametrize("kind", ["list", "object"])
def test_deep_nesting_at_the_default_recursion_limit(site: str, kind: str) -> None:
    world, session, connection = world_for("open")
    for depth in DEEP:
        frames = world.receive(session, NESTING_SITES[site] % nested(depth, kind))
        assert len(frames) >= 1
    assert connection.closed == []
    session.closed()
    world.assert_baseline()


# Random conversations of many connections, with flushes, stalls and timers.


class Conversations(RuleBasedStateMachine):
    """Connections come and go and say anything; the registry always matches what they were told.

    A paused connection (its socket full) is sent no batch at all, not even a
    subscription's snapshot; when it resumes it gets one batch, of vehicles it
    still watches.

    The model is built only from what each client received: a
    ``subscription:confirmed`` adds a vehicle, a ``subscription:removed`` takes
    it away. A connection the server closes (auth timeout, expired token, slow
    viewer) goes away as the WebSocket adapter would make it go.
    """

    policy: ClassVar[Policy] = OPEN_POLICY
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.world = World(self.policy, started=True)
        self.told: dict[Session, set[str]] = {}
        self.paused: set[Session] = set()
        self.gone: set[Session] = set()
        self.seen: dict[Session, int] = {}

    # What each client was sent since the last look.

    def _new_frames(self, session: Session) -> list[dict[str, Any]]:
        connection = session.connection
        assert isinstance(connection, FakeConnection)
        start = self.seen.get(session, 0)
        self.seen[session] = len(connection.frames)
        frames = connection.frames[start:]
        told = self.told[session]
        for frame in frames:
            assert_documented(frame)
            if frame["event"] == "subscription:confirmed":
                told.add(frame["data"]["vehicleId"])
            elif frame["event"] == "subscription:removed":
                told.discard(frame["data"]["vehicleId"])
            elif frame["event"] == "vehicle:telemetry:batch":
                # Snapshots, flushes and held points alike: only what it watches, may watch.
                grant = session.grant
                for point in frame["data"]["dataPoints"]:
                    vehicle_id = point["vehicleId"]
                    assert grant is not None
                    assert vehicle_id in told or (
                        WILDCARD in told and grant.may_watch(vehicle_id)
                    ), f"{vehicle_id} sent to a viewer of {sorted(told)} ({grant.subject})"
        return frames

    def _settle(self) -> None:
        """Look at every client's new frames; let the connections the server closed go."""
        for session in list(self.told):
            frames = self._new_frames(session)
            if session in self.paused:
                batches = [f for f in frames if f["event"] == "vehicle:telemetry:batch"]
                assert batches == [], "a paused viewer was sent a batch"
            connection = session.connection
            assert isinstance(connection, FakeConnection)
            if connection.closed:
                assert {code for code, _ in connection.closed} <= {
                    CloseCode.UNAUTHORIZED,
                    CloseCode.POLICY_VIOLATION,
                }
                self._forget(session)

    def _forget(self, session: Session) -> None:
        session.closed()
        self.told.pop(session, None)
        self.paused.discard(session)
        self.gone.add(session)

    @rule(target=sessions, token=st.sampled_from([None, FULL_TOKEN, TRUCKS_TOKEN]))
    def connect(self, token: str | None) -> Session:
        session, _ = self.world.open()
        self.told[session] = set()
        if token is not None:
            self.world.authenticate(session, token)
            self._settle()
        return session

    @rule(session=sessions, token=st.sampled_from(TOKENS[:3]))
    def authenticate(self, session: Session, token: str) -> None:
        if session in self.told:
            self.world.send(session, ("auth", {"token": token}, 7))
            self._settle()

    @rule(session=sessions, message=MESSAGES)
    def send(self, session: Session, message: Message) -> None:
        if session in self.told:
            self.world.send(session, message)
            self._settle()

    @rule(
        session=sessions,
        vehicle_id=st.sampled_from([*VEHICLES, "*"]),
        event=st.sampled_from(["subscribe:vehicle", "unsubscribe:vehicle"]),
    )
    def subscription(self, session: Session, vehicle_id: str, event: str) -> None:
        if session in self.told:
            self.world.send(session, (event, {"vehicleId": vehicle_id}, 3))
            self._settle()

    @rule(
        session=sessions,
        vehicles=st.lists(st.sampled_from(VEHICLES), min_size=1, max_size=4),
        flush=st.booleans(),
    )
    def publish(self, session: Session, vehicles: list[str], flush: bool) -> None:
        if session in self.told:
            now = self.world.hub.now_ms()
            points = [
                {"vehicleId": v, "timestamp": now, "latitude": 1.5, "longitude": 2.5}
                for v in vehicles
            ]
            self.world.send(session, ("vehicle:telemetry", points, 9))
            self._settle()
            if flush:
                self.world.clock.advance(self.world.hub.batch_interval)
                self._settle()

    @rule(session=sessions)
    def pause(self, session: Session) -> None:
        if session in self.told:
            session.pause()
            self.paused.add(session)

    @rule(session=sessions)
    def resume(self, session: Session) -> None:
        if session in self.paused:
            self._settle()
            self.paused.discard(session)
            session.resume()
            frames = self._new_frames(session)
            assert [f["event"] for f in frames] in ([], ["vehicle:telemetry:batch"])
            self._settle()

    @rule(seconds=st.sampled_from([0.01, 0.5, 1.0, 3.0, 11.0, 31.0]))
    def wait(self, seconds: float) -> None:
        self.world.clock.advance(seconds)
        self._settle()

    @rule(session=consumes(sessions))
    def disconnect(self, session: Session) -> None:
        if session in self.told:
            self._new_frames(session)
            self._forget(session)

    @invariant()
    def registry_matches_what_clients_were_told(self) -> None:
        registry = self.world.hub.registry
        for session, told in self.told.items():
            assert set(registry.subscriptions(session)) == told
        assert set(self.world.hub.viewers) == set(self.told)
        assert self.world.hub.holding <= self.paused
        for session in self.gone:
            assert not registry.subscriptions(session)

    def teardown(self) -> None:
        for session in list(self.told):
            self._forget(session)
        self.world.assert_baseline()
        # The buffer forgets every vehicle once the TTL has passed.
        self.world.clock.advance(self.world.hub.vehicle_ttl + 61)
        assert self.world.hub.buffer.known_count == 0
        assert self.world.hub.buffer.pending_count == 0


class AuthenticatedConversations(Conversations):
    policy = Policy(VERIFIER)


CONVERSATION_SETTINGS: Final = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestOpenConversations = Conversations.TestCase
TestOpenConversations.settings = CONVERSATION_SETTINGS
TestAuthenticatedConversations = AuthenticatedConversations.TestCase
TestAuthenticatedConversations.settings = CONVERSATION_SETTINGS


# A live connection: the real service, a real client, random frames.

#: Stands for an ack number unique in the test, so that its answer can be found.
UNIQUE_ACK: Final = "unique ack"
#: The live client's own acks: far above any ack a hostile frame carries.
CLIENT_ACKS_FROM: Final = 2**64 - 10**6


class HostileClient(WSClient):
    """A WSClient that can tell the test when its connection is gone."""

    def __init__(self) -> None:
        super().__init__()
        self._acks = itertools.count(CLIENT_ACKS_FROM)
        self.gone = False
        self._gone_waiters: list[Deferred[int | None]] = []

    def _closed(self, code: int | None) -> None:
        self.gone = True
        super()._closed(code)
        waiters, self._gone_waiters = self._gone_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(code)

    def lost(self) -> Deferred[int | None]:
        if self.gone:
            return succeed(self.close_code)
        waiter: Deferred[int | None] = Deferred()
        self._gone_waiters.append(waiter)
        return waiter


@provider(ILogObserver)
class ErrorLog:
    """Every log event that reports a failure or an error."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        if (
            event.get("log_failure") is not None
            or event.get("isError")
            or level in (LogLevel.error, LogLevel.critical)
        ):
            self.events.append(event)

    def texts(self) -> list[str]:
        return [str(event.get("log_text") or event.get("log_format")) for event in self.events]


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    log = ErrorLog()
    globalLogPublisher.addObserver(log)
    yield log
    globalLogPublisher.removeObserver(log)


class LiveServer:
    """The service, with an event for "every connection has gone"."""

    def __init__(self, running: RunningServer) -> None:
        self.running = running
        self.hub = running.hub

    def all_gone(self) -> Deferred[None]:
        """Fires once the hub has no viewer left and the stack that removed it has unwound."""
        gone = self.hub.when_empty()
        gone.addCallback(lambda _: deferLater(reactor, 0, lambda: None))
        return gone.addTimeout(10, reactor)


@pytest_twisted.async_yield_fixture(scope="module")
async def live() -> AsyncIterator[LiveServer]:
    running = start_server(
        "--batch-interval",
        "50",
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
        "--max-points-per-second",
        "1000000",
    )
    yield LiveServer(running)
    await running.service.stopService()


LIVE_FRAMES: Final = st.one_of(
    st.tuples(st.binary(max_size=300), st.booleans()),  # garbage, text or binary frames
    st.tuples(JSON_VALUES.map(lambda value: json.dumps(value).encode()), st.just(False)),
    st.tuples(
        st.builds(
            envelope,
            st.sampled_from(EVENTS) | JSON_SAFE,
            st.sampled_from(list(DATA_OF.values()))
            .flatmap(lambda data: data)
            .filter(orjson_encodable),
            st.just(...)
            | st.just(UNIQUE_ACK)
            | JSON_SAFE.filter(lambda ack: not (type(ack) is int and ack >= 2**63)),
        ),
        st.just(False),
    ),
    st.tuples(
        st.builds(
            lambda site, kind, depth: NESTING_SITES[site] % nested(depth, kind),
            st.sampled_from(sorted(NESTING_SITES)),
            st.sampled_from(["list", "object"]),
            st.integers(1, 1030),
        ),
        st.just(False),
    ),
).flatmap(lambda frame: st.tuples(st.just(frame), st.sampled_from([0, 0, 0, 1, 7, 64])))


def payload_of(part: Any, acks: Iterator[int]) -> bytes:
    if isinstance(part, bytes):
        return part
    frame = dict(part)
    if frame.get("ack") == UNIQUE_ACK:
        frame["ack"] = next(acks)
    return orjson.dumps(frame)


def expected_answers(payload: bytes, binary: bool) -> tuple[int, int, int | None]:
    """(fewest error events, most error events, ack) this frame must be answered with."""
    if binary:
        return 1, 1, None
    try:
        _, _, ack = decode_message(payload)
    except ProtocolError:
        return 1, 1, None
    if ack is not None:
        return 0, 0, ack
    return 0, 1, None


async def exchange(live: LiveServer, batches: list[list[tuple[tuple[Any, bool], int]]]) -> None:
    client = await HostileClient.connect(live.running.ws_url)
    assert client.protocol is not None
    acks = itertools.count(10**9)
    for batch in batches:
        client.inbox.clear()
        fewest = most = 0
        expected_acks: list[int] = []
        for (part, binary), fragment in batch:
            payload = payload_of(part, acks)
            low, high, ack = expected_answers(payload, binary)
            fewest, most = fewest + low, most + high
            if ack is not None:
                expected_acks.append(ack)
            client.protocol.sendMessage(payload, isBinary=binary, fragmentSize=fragment or None)
        answer = Deferred.fromCoroutine(client.request("request:stats"))
        lost = client.lost()
        winner, result = await race([answer, lost])
        assert winner == 0, f"the server closed the connection (code {result})"
        assert result["success"] is True
        assert_stats(result)
        for message in client.inbox:
            assert_documented(message)
        acked = [m["ack"] for m in client.inbox if m["event"] == "ack"]
        assert sorted(acked) == sorted(expected_acks)
        errors = [m for m in client.inbox if m["event"] == "error"]
        assert fewest <= len(errors) <= most
    client.disconnect()
    await client.closed()
    await live.all_gone()
    assert live.hub.registry.stats()["totalSubscriptions"] == 0
    assert live.hub.registry.stats()["totalClients"] == 0
    assert live.hub.viewers == set()
    assert live.hub.holding == set()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=st.lists(st.lists(LIVE_FRAMES, min_size=1, max_size=8), min_size=1, max_size=3))
@pytest_twisted.ensureDeferred
async def test_a_live_connection_survives_hostile_frames(
    live: LiveServer, error_log: ErrorLog, batches: list[list[Any]]
) -> None:
    error_log.events.clear()
    await exchange(live, batches)
    assert error_log.texts() == []


@pytest.mark.usefixtures("default_recursion_limit")
@pytest_twisted.ensureDeferred
async def test_a_live_connection_answers_deeply_nested_frames(
    live: LiveServer, error_log: ErrorLog
) -> None:
    error_log.events.clear()
    batch = [
        ((NESTING_SITES[site] % nested(depth, kind), False), 0)
        for site in sorted(NESTING_SITES)
        for kind in ("list", "object")
        for depth in DEEP
    ]
    await exchange(live, [batch])
    assert error_log.texts() == []
