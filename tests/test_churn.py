"""Churn: thousands of connect/subscribe/disconnect cycles leave nothing behind.

After every cycle has ended, the registry is back to zero, the hub has no
viewers, nothing is held for a stalled viewer, no timer of a connection is
still pending, and every session and protocol object has been collected.
"""

from __future__ import annotations

import gc
import itertools
import random
import weakref
from collections.abc import Iterator
from typing import Any, Final

import orjson
import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.logger import globalLogBeginner, globalLogPublisher
from twisted.python.failure import Failure

from fleettrack.auth import TokenVerifier, mint_token
from fleettrack.hub import Hub
from fleettrack.limits import Limits
from fleettrack.registry import WILDCARD
from fleettrack.session import Policy, Session
from fleettrack.websocket import TrackingServerFactory
from tests.conftest import RunningServer, now_ms, point, start_server
from tests.fakes import EPOCH_MS, EPOCH_S, FakeConnection, make_clock
from tests.wsclient import WSClient

VEHICLES: Final = tuple(f"churn_{n}" for n in range(12))
SECRET: Final = b"0123456789abcdef" * 4
#: Seconds to wait for the server to notice a connection went; it takes milliseconds.
TIMEOUT: Final = 10.0
VERIFIER: Final = TokenVerifier.from_secret(SECRET)


def assert_registry_empty(hub: Hub) -> None:
    registry = hub.registry
    assert registry.stats() == {
        "totalVehicles": 0,
        "totalClients": 0,
        "totalSubscriptions": 0,
        "vehicleSubscriptions": {},
    }
    for name in ("_by_vehicle", "_by_viewer", "_audiences", "_audience_of", "_scopes", "_regroup"):
        assert not getattr(registry, name), f"registry.{name} = {getattr(registry, name)!r}"
    assert list(registry.audiences()) == []
    assert hub.viewers == set()
    assert hub.holding == set()
    assert hub.stats()["batcher"]["pendingBatches"] == 0


def assert_collected(refs: list[weakref.ref[Any]]) -> None:
    gc.collect()
    alive = [obj for obj in (ref() for ref in refs) if obj is not None]
    assert alive == [], f"{len(alive)} of {len(refs)} objects still alive, e.g. {alive[:3]!r}"


@pytest.fixture
def unbuffered_log() -> Iterator[None]:
    """Until a program begins logging, Twisted keeps its log events, and with them each
    event's ``log_source`` (a protocol logging "connection opened" is one). Under twistd that
    buffer is emptied at startup; in a test run it would keep every protocol alive."""
    temporary = globalLogBeginner._temporaryObserver
    if temporary is not None:
        globalLogPublisher.removeObserver(temporary)
    yield
    if temporary is not None:
        globalLogPublisher.addObserver(temporary)


# The message handler: 2000 sessions on a task.Clock.


TOKENS: Final = (
    mint_token(SECRET, "all", 7200, vehicles=["*"], watch=["*"], now=EPOCH_S),
    mint_token(SECRET, "some", 7200, vehicles=["churn_1*"], watch=["churn_1*"], now=EPOCH_S),
)


def churn_sessions(hub: Hub, clock: Clock, cycles: int) -> list[weakref.ref[Any]]:
    """Open ``cycles`` sessions, up to 40 at a time, each doing a bit of everything; close all.

    Returns weak references to every session and connection it made.
    """
    rng = random.Random(cycles)
    # Short timeouts, so that stalled and silent sessions are dropped while the churn goes on.
    limits = Limits(auth_timeout=2.0, slow_viewer_timeout=3.0)
    policies = (Policy(limits=limits), Policy(VERIFIER, limits))
    refs: list[weakref.ref[Any]] = []
    open_sessions: list[Session] = []

    def close(session: Session) -> None:
        open_sessions.remove(session)
        session.closed()

    for cycle in range(cycles):
        connection = FakeConnection()
        session = Session(hub, connection, policies[cycle % 2])
        session.open()
        refs += [weakref.ref(session), weakref.ref(connection)]
        open_sessions.append(session)
        if cycle % 2 and cycle % 7:  # the rest stay unauthenticated until they time out
            session.handle(("auth", {"token": rng.choice(TOKENS)}, 1))
        for vehicle_id in rng.sample([*VEHICLES, WILDCARD], rng.randint(0, 4)):
            session.handle(("subscribe:vehicle", {"vehicleId": vehicle_id}, 2))
        if rng.random() < 0.3:
            raw = {
                "vehicleId": rng.choice(VEHICLES),
                "timestamp": EPOCH_MS + int(clock.seconds() - EPOCH_S) * 1000,
                "latitude": 1.0,
                "longitude": 2.0,
            }
            session.handle(("vehicle:telemetry", raw, None))
        if rng.random() < 0.1:
            session.pause()  # its socket is full; some stay so past the slow-viewer timeout
        if rng.random() < 0.05:
            session.handle(("unsubscribe:vehicle", {"vehicleId": WILDCARD}, 3))
        # Up to 40 connections at a time; the oldest or a random one goes.
        while len(open_sessions) > 40:
            close(open_sessions[0] if rng.random() < 0.5 else rng.choice(open_sessions))
        if cycle % 10 == 0:
            clock.advance(rng.choice([0.3, 1.0, 2.5]))
            # Those the server closed (auth timeout, slow viewer) go as the adapter makes them go.
            for closing in [s for s in open_sessions if s.closing]:
                close(closing)
    while open_sessions:
        close(open_sessions[-1])
    return refs


def test_two_thousand_sessions_leave_nothing_behind() -> None:
    clock: Clock = make_clock()
    hub = Hub(clock, 1.0, 600.0)
    hub.start()
    loops = {getattr(call.func, "__self__", None) for call in clock.getDelayedCalls()}
    refs = churn_sessions(hub, clock, 2000)
    # The churn did reach every path: deliveries, held batches, both kinds of timeout.
    assert hub.batches_delivered > 0
    assert hub.slow_viewers_dropped > 0
    assert hub.stats()["connectedClients"] == 0
    assert_registry_empty(hub)
    # Only the hub's own loops are left on the clock: every session timer was cancelled.
    assert {getattr(call.func, "__self__", None) for call in clock.getDelayedCalls()} == loops
    assert_collected(refs)
    clock.advance(hub.vehicle_ttl + 61)
    assert hub.buffer.known_count == 0
    assert hub.buffer.pending_count == 0


# The real service: 600 connections, 40 at a time, while a vehicle publishes.


class Tracker:
    """Watches the server build and lose its objects, through its own seams."""

    def __init__(self, server: RunningServer) -> None:
        self.hub = server.hub
        site = next(s for s in server.service if isinstance(s, StreamServerEndpointService)).factory
        factory: TrackingServerFactory = site.resource.children[b"ws"]._websocket._factory
        self.refs: list[weakref.ref[Any]] = []
        self._channels_lost: dict[int, Deferred[None]] = {}
        self.channels = 0
        self.protocols = 0
        self.sessions = 0

        build_channel = site.buildProtocol
        build_protocol = factory.buildProtocol
        connect = self.hub.connect

        def channel_built(address: Any) -> Any:
            channel = build_channel(address)
            self.channels += 1
            lost = self.channel_lost(address.port)
            connection_lost = channel.connectionLost

            def channel_lost(reason: Failure) -> None:
                connection_lost(reason)
                lost.callback(None)

            channel.connectionLost = channel_lost
            self.refs.append(weakref.ref(channel))
            return channel

        def protocol_built(address: Any) -> Any:
            protocol = build_protocol(address)
            self.protocols += 1
            self.refs.append(weakref.ref(protocol))
            return protocol

        def connected(viewer: Any) -> None:
            connect(viewer)
            self.sessions += 1
            self.refs.append(weakref.ref(viewer))

        site.buildProtocol = channel_built
        factory.buildProtocol = protocol_built
        self.hub.connect = connected

    def channel_lost(self, port: int) -> Deferred[None]:
        """Fires when the server has lost the HTTP connection from this client port."""
        if port not in self._channels_lost:
            lost: Deferred[None] = Deferred()
            self._channels_lost[port] = lost.addTimeout(TIMEOUT, reactor)
        return self._channels_lost[port]

    def all_gone(self) -> Deferred[None]:
        """Fires once the hub has no viewer left and the stack that removed it has unwound."""
        gone = self.hub.when_empty()
        gone.addCallback(lambda _: deferLater(reactor, 0, lambda: None))
        return gone.addTimeout(TIMEOUT, reactor)


class HalfHandshake(Protocol):
    """Sends part of an upgrade request, then goes."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


async def half_handshake(server: RunningServer, tracker: Tracker) -> None:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    client = await connectProtocol(endpoint, HalfHandshake())
    lost_by_server = tracker.channel_lost(client.transport.getHost().port)
    client.transport.loseConnection()
    await client.lost
    await lost_by_server


async def cycle(server: RunningServer, tracker: Tracker, number: int, rng: random.Random) -> None:
    kind = number % 6
    if kind == 5:
        await half_handshake(server, tracker)
        return
    client = await server.client()
    assert client.protocol is not None
    targets = rng.sample([*VEHICLES, WILDCARD], rng.randint(1, 4))
    if kind == 4:
        # Gone before its requests are answered: the server handles them, then the loss.
        for target in targets:
            client.send("subscribe:vehicle", {"vehicleId": target}, 1)
        client.protocol.transport.abortConnection()
        await client.closed()
        return
    for target in targets:
        ack = await client.request("subscribe:vehicle", {"vehicleId": target})
        assert ack["success"] is True
    if number % 3 == 0:
        await client.request("vehicle:telemetry", point(rng.choice(VEHICLES)))
    if kind == 0:
        client.protocol.sendClose(1000)  # the clean way
    elif kind == 1:
        client.disconnect()  # TCP FIN, no closing handshake
    elif kind == 2:
        client.protocol.transport.abortConnection()  # RST
    else:
        client.protocol.transport.pauseProducing()  # stops reading, then goes
        client.protocol.transport.loseConnection()
    await client.closed()


@pytest.mark.usefixtures("unbuffered_log")
@pytest_twisted.ensureDeferred
async def test_hundreds_of_websocket_connections_leave_nothing_behind() -> None:
    server = start_server("--batch-interval", "20", "--rate-limit", "1000", "--rate-burst", "1000")
    try:
        tracker = Tracker(server)
        publisher = await server.client()
        timestamps = itertools.count(now_ms())

        def publish(client: WSClient) -> None:
            stamp = next(timestamps)
            points = [point(v, timestamp=stamp) for v in VEHICLES]
            client.send_raw(orjson.dumps({"event": "vehicle:telemetry", "data": points}))

        publishing = LoopingCall(publish, publisher)
        publishing.start(0.02)
        rng = random.Random(300)
        cycles, concurrency = 600, 40

        async def worker(numbers: range) -> None:
            for number in numbers:
                await cycle(server, tracker, number, rng)

        await gatherResults(
            [
                Deferred.fromCoroutine(worker(range(w, cycles, concurrency)))
                for w in range(concurrency)
            ]
        )
        publishing.stop()
        stats = await publisher.request("request:stats")
        assert stats["batcher"]["batchesDelivered"] > 0
        assert [m for m in publisher.inbox if m.get("event") == "error"] == []
        publisher.disconnect()
        await publisher.closed()
        await tracker.all_gone()

        hub = tracker.hub
        assert_registry_empty(hub)
        websocket_cycles = cycles - cycles // 6
        assert tracker.protocols == tracker.sessions == websocket_cycles + 1
        assert tracker.channels == cycles + 1
        del publisher, publishing
        assert_collected(tracker.refs)
    finally:
        await server.service.stopService()
