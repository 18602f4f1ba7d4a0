"""A viewer that stops reading: noticed, held to latest-only, dropped with 1008, harmless to others.

The slow viewer is a WebSocket client written by hand on a raw socket with a
small receive buffer, so that it can stop reading (``pauseProducing`` on its
transport) while vehicles publish big batches every 20 ms. The server runs in
this process, so the test looks at its side directly: the session's flow
control, the bytes Twisted buffers for that connection, the hub's figures.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import attrs
import orjson
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from wsaccel.xormask import XorMaskerSimple

from fleettrack.hub import Batch, Hub
from fleettrack.session import Session
from fleettrack.websocket import TrackingServerProtocol
from tests.conftest import RunningServer, now_ms, point, start_server
from tests.wsclient import WSClient

INTERVAL_MS: Final = 20
VEHICLES: Final = tuple(f"bus_{n:03d}" for n in range(300))
#: Attributes that make each point about 400 bytes, so each batch is about 120 KB.
ATTRIBUTES: Final = {"driver": "d" * 120, "route": "r" * 120, "depot": "north"}
#: Points per telemetry message: three messages a tick keep each under the 64 KiB limit.
CHUNK: Final = 100
TIMEOUT: Final = 10.0
#: How late a normal viewer's batch may be: one interval to the flush, then delivery.
LATENESS_MS: Final = INTERVAL_MS + 500

Message = dict[str, Any]


# A WebSocket client by hand, so that it can stop reading.


class RawViewer(Protocol):
    def __init__(self, port: int) -> None:
        self.port = port
        self.opened: Deferred[RawViewer] = Deferred()
        self.close_frame: Deferred[int] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.messages: list[Message] = []
        self._buffer = bytearray()
        self._upgraded = False
        self._waiters: list[tuple[Callable[[Message], bool], Deferred[Message]]] = []

    @classmethod
    async def connect(cls, port: int) -> RawViewer:
        """Connect with a 4 KiB receive buffer, so that the kernel holds little for it."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))  # the kernel completes it; no reactor turn needed
        sock.setblocking(False)
        viewer = cls(port)
        reactor.adoptStreamConnection(
            sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: viewer)
        )
        sock.close()  # the reactor has its own descriptor now
        return await viewer.opened.addTimeout(TIMEOUT, reactor)

    @property
    def local_port(self) -> int:
        port: int = self.transport.getHost().port
        return port

    def connectionMade(self) -> None:
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.port, key)
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self._buffer[: self._buffer.find(b"\r\n")])
            assert status.startswith(b"HTTP/1.1 101"), status
            del self._buffer[: end + 4]
            self._upgraded = True
            self.opened.callback(self)
        self._frames()

    def _frames(self) -> None:
        buffer, offset = self._buffer, 0
        while len(buffer) - offset >= 2:
            first, length, header = buffer[offset], buffer[offset + 1] & 0x7F, 2
            assert buffer[offset + 1] & 0x80 == 0, "server frames are never masked"
            if length == 126:
                header = 4
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
            elif length == 127:
                header = 10
                length = int.from_bytes(buffer[offset + 2 : offset + 10], "big")
            if len(buffer) - offset < header + length:
                break
            start = offset + header
            payload = bytes(buffer[start : start + length])
            offset = start + length
            assert first & 0x80, "the server does not fragment"
            self._frame(first & 0x0F, payload)
        del buffer[:offset]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            message: Message = orjson.loads(payload)
            self.messages.append(message)
            for waiter in self._waiters:
                predicate, deferred = waiter
                if predicate(message):
                    self._waiters.remove(waiter)
                    deferred.callback(message)
                    break
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big")
            self._send(payload[:2], 0x8)  # the closing handshake's reply
            if not self.close_frame.called:
                self.close_frame.callback(code)
        elif opcode == 0x9:
            self._send(payload, 0xA)

    def _send(self, payload: bytes, opcode: int = 0x1) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = bytes([0x80 | opcode, 0x80 | length])
        else:
            header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
        self.transport.write(header + mask + XorMaskerSimple(mask).process(payload))

    def send(self, event: str, data: Any, ack: int | None = None) -> None:
        message: Message = {"event": event, "data": data}
        if ack is not None:
            message["ack"] = ack
        self._send(orjson.dumps(message))

    def next(self, predicate: Callable[[Message], bool]) -> Deferred[Message]:
        """The first message from now on that matches (earlier ones are in ``messages``)."""
        deferred: Deferred[Message] = Deferred()
        self._waiters.append((predicate, deferred))
        return deferred.addTimeout(TIMEOUT, reactor)

    def stop_reading(self) -> None:
        self.transport.pauseProducing()

    def start_reading(self) -> None:
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)

    def batches(self) -> list[Message]:
        return [m["data"] for m in self.messages if m["event"] == "vehicle:telemetry:batch"]


def is_batch(message: Message) -> bool:
    return message.get("event") == "vehicle:telemetry:batch"


def is_ack(number: int) -> Callable[[Message], bool]:
    return lambda message: message.get("event") == "ack" and message.get("ack") == number


# The server's side of the slow viewer, watched through its own seams.


def buffered(transport: Any) -> int:
    """Bytes Twisted holds for a TCP connection, not yet taken by the kernel."""
    size: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return size


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@attrs.define
class Watch:
    """Flow control, deliveries, writes and the close of one server-side session."""

    hub: Hub
    session: Session
    protocol: TrackingServerProtocol
    #: ("pause" | "resume", monotonic time), in order.
    flow: list[tuple[str, float]] = attrs.Factory(list)
    #: Batches the hub delivered while the session was holding.
    held_deliveries: int = 0
    #: Batches written to the connection: (batch id, count, monotonic time).
    sent: list[tuple[str, int, float]] = attrs.Factory(list)
    closes: list[tuple[int, float]] = attrs.Factory(list)
    most_buffered: int = 0
    holding: Deferred[None] = attrs.Factory(Deferred)
    closing: Deferred[int] = attrs.Factory(Deferred)
    disconnected: Deferred[None] = attrs.Factory(Deferred)
    _handled_waiters: dict[int, Deferred[None]] = attrs.Factory(dict)
    _held_waiters: list[tuple[int, Deferred[None]]] = attrs.Factory(list)

    @classmethod
    def of(cls, server: RunningServer, viewer: RawViewer) -> Watch:
        hub = server.hub
        (protocol,) = [
            s.connection
            for s in hub.viewers
            if isinstance(s, Session)
            and isinstance(s.connection, TrackingServerProtocol)
            and s.connection.transport.getPeer().port == viewer.local_port
        ]
        session = protocol.session
        assert session is not None
        watch = cls(hub, session, protocol)
        watch._install()
        return watch

    def _install(self) -> None:
        session, protocol, hub = self.session, self.protocol, self.hub
        pause, resume, deliver = session.pause, session.resume, session.deliver
        close, handle = session.close, session.handle
        send_batch, write = protocol.send_batch, protocol.transport.write
        disconnect = hub.disconnect

        def paused() -> None:
            self.flow.append(("pause", time.monotonic()))
            pause()

        def resumed() -> None:
            self.flow.append(("resume", time.monotonic()))
            resume()

        def delivered(batch: Batch) -> None:
            holds = session._held is not None  # else it is written, which may pause it
            deliver(batch)
            if holds:
                self.held_deliveries += 1
                if not self.holding.called:
                    self.holding.callback(None)
                for waiter in list(self._held_waiters):
                    if self.held_deliveries >= waiter[0]:
                        self._held_waiters.remove(waiter)
                        waiter[1].callback(None)

        def closed(code: int, reason: str) -> None:
            self.closes.append((code, time.monotonic()))
            close(code, reason)
            if not self.closing.called:
                self.closing.callback(code)

        def handled(message: Any) -> None:
            handle(message)
            waiter = self._handled_waiters.pop(message[2], None)  # (event, data, ack)
            if waiter is not None:
                waiter.callback(None)

        def batch_sent(batch: Batch) -> None:
            self.sent.append((orjson.loads(batch.data)["batchId"], batch.count, time.monotonic()))
            send_batch(batch)

        def written(data: bytes) -> None:
            write(data)
            self.most_buffered = max(self.most_buffered, buffered(protocol.transport))

        def disconnected(viewer: Any) -> None:
            disconnect(viewer)
            if viewer is session:
                self.disconnected.callback(None)

        session.pause, session.resume, session.deliver = paused, resumed, delivered
        session.close, session.handle = closed, handled
        protocol.send_batch = batch_sent
        protocol.transport.write = written
        hub.disconnect = disconnected

    def stalled_since(self) -> float:
        """When the pause began that no resume has ended (Twisted repeats pauseProducing)."""
        resumes = [i for i, (kind, _) in enumerate(self.flow) if kind == "resume"]
        since = resumes[-1] + 1 if resumes else 0
        assert since < len(self.flow), "not paused"
        return self.flow[since][1]

    def handled(self, ack: int) -> Deferred[None]:
        """Fires once the session has handled the message carrying this ack."""
        waiter: Deferred[None] = Deferred()
        self._handled_waiters[ack] = waiter
        return waiter.addTimeout(TIMEOUT, reactor)

    def held(self, deliveries: int) -> Deferred[None]:
        """Fires once the hub has delivered this many batches to the session while it held."""
        waiter: Deferred[None] = Deferred()
        if self.held_deliveries >= deliveries:
            waiter.callback(None)
        else:
            self._held_waiters.append((deliveries, waiter))
        return waiter.addTimeout(TIMEOUT, reactor)


# Vehicles publishing big batches, and a normal viewer timing its batches.


class Publisher:
    """300 vehicles, every one of them moving every interval."""

    def __init__(self, client: WSClient) -> None:
        self.client = client
        self.last_timestamp = 0
        self._timestamps = itertools.count(now_ms())
        self._loop = LoopingCall(self.publish)

    def publish(self) -> None:
        # Strictly increasing, never ahead of the clock by more than a few ms.
        self.last_timestamp = max(next(self._timestamps), now_ms())
        self._timestamps = itertools.count(self.last_timestamp + 1)
        points = [point(v, timestamp=self.last_timestamp, **ATTRIBUTES) for v in VEHICLES]
        for start in range(0, len(points), CHUNK):
            self.client.send("vehicle:telemetry", points[start : start + CHUNK])

    def start(self) -> None:
        self._loop.start(INTERVAL_MS / 1000)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


class TimedViewer:
    """A normal WSClient that notes when each of its batches arrived, and keeps no batch
    (so that the test's own memory does not hide the server's)."""

    def __init__(self, client: WSClient) -> None:
        self.client = client
        #: (arrival in ms since the epoch, newest point timestamp, point count).
        self.arrivals: list[tuple[float, int, int]] = []
        #: Per vehicle, the newest timestamp received.
        self.newest: dict[str, int] = {}
        self._waiters: list[tuple[int, Deferred[None]]] = []
        received = client._received

        def timed(message: Message) -> None:
            if not is_batch(message):
                received(message)
                return
            arrived = time.time() * 1000
            data = message["data"]
            for p in data["dataPoints"]:
                self.newest[p["vehicleId"]] = p["timestamp"]
            newest = max(p["timestamp"] for p in data["dataPoints"])
            self.arrivals.append((arrived, newest, data["count"]))
            for waiter in list(self._waiters):
                if self._has_all(waiter[0]):
                    self._waiters.remove(waiter)
                    waiter[1].callback(None)

        client._received = timed

    def between(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [a for a in self.arrivals if start <= a[0] <= end]

    def _has_all(self, timestamp: int) -> bool:
        return all(self.newest.get(v, 0) >= timestamp for v in VEHICLES)

    def has_all(self, timestamp: int) -> Deferred[None]:
        """Fires once every vehicle's point of this timestamp (or newer) has arrived."""
        waiter: Deferred[None] = Deferred()
        if self._has_all(timestamp):
            waiter.callback(None)
        else:
            self._waiters.append((timestamp, waiter))
        return waiter.addTimeout(TIMEOUT, reactor)


@attrs.define
class Scene:
    server: RunningServer
    hub: Hub
    publisher: Publisher
    normal: TimedViewer
    slow: RawViewer
    watch: Watch


async def set_scene(*options: str) -> Scene:
    server = start_server(
        "--batch-interval",
        str(INTERVAL_MS),
        # One publisher sends 150 messages and 15 000 points a second here.
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
        "--max-points-per-second",
        "10000000",
        *options,
    )
    normal = TimedViewer(await server.client())
    await normal.client.request("subscribe:vehicle", {"vehicleId": "*"})
    slow = await RawViewer.connect(server.port)
    slow.send("subscribe:vehicle", {"vehicleId": "*"}, 1)
    await slow.next(is_ack(1))
    watch = Watch.of(server, slow)
    publisher = Publisher(await server.client())
    return Scene(server, server.hub, publisher, normal, slow, watch)


@pytest_twisted.async_yield_fixture
async def scene() -> AsyncIterator[Scene]:
    """Both viewers subscribed to everything; 2 s for the slow one to read again."""
    staged = await set_scene("--slow-viewer-timeout", "2")
    yield staged
    staged.publisher.stop()
    await staged.server.service.stopService()


@pytest_twisted.async_yield_fixture
async def patient_scene() -> AsyncIterator[Scene]:
    staged = await set_scene("--slow-viewer-timeout", "30")
    yield staged
    staged.publisher.stop()
    await staged.server.service.stopService()


def batch_bytes() -> int:
    points = [point(v, **ATTRIBUTES) for v in VEHICLES]
    return len(orjson.dumps({"event": "vehicle:telemetry:batch", "data": {"dataPoints": points}}))


async def fetch_stats(server: RunningServer) -> Any:
    response = await Agent(reactor).request(b"GET", server.http_url("/stats").encode())
    return orjson.loads(await readBody(response))


def assert_on_time(normal: TimedViewer, start: float, end: float) -> None:
    """The normal viewer's batches kept coming every interval, each fresh."""
    arrivals = normal.between(start, end)
    expected = (end - start) / INTERVAL_MS
    assert len(arrivals) >= expected / 4, f"{len(arrivals)} batches in {end - start:.0f} ms"
    late = [(round(at - newest), count) for at, newest, count in arrivals]
    assert all(lateness <= LATENESS_MS for lateness, _ in late), late
    times = [start] + [at for at, _, _ in arrivals] + [end]
    gaps = [round(b - a) for a, b in itertools.pairwise(times)]
    assert max(gaps) <= LATENESS_MS, gaps


@pytest_twisted.ensureDeferred
async def test_a_viewer_that_never_reads_is_held_then_dropped(scene: Scene) -> None:
    hub, watch, slow, normal = scene.hub, scene.watch, scene.slow, scene.normal
    size = batch_bytes()
    rss_before = rss_bytes()
    slow.stop_reading()
    flushes_before = hub.total_batches
    started = time.time() * 1000
    scene.publisher.start()

    # (a) The server notices within a few batches: it holds instead of writing.
    await watch.holding.addTimeout(TIMEOUT, reactor)
    holding_since = time.time() * 1000
    noticed_after = hub.total_batches - flushes_before
    assert noticed_after <= 12, f"held only after {noticed_after} batches"
    assert watch.session in hub.holding
    assert hub.stats()["batcher"]["pendingBatches"] >= 1
    sent_before_holding = len(watch.sent)

    # (d) It stays stalled for --slow-viewer-timeout, and is closed with 1008.
    code = await watch.closing.addTimeout(TIMEOUT, reactor)
    dropped_at = time.time() * 1000
    assert code == 1008
    stalled_for = watch.closes[0][1] - watch.stalled_since()
    assert 1.9 <= stalled_for <= 3.0, stalled_for
    assert hub.slow_viewers_dropped == 1

    # Nothing was written for it while it held; it kept at most a point per vehicle.
    assert len(watch.sent) == sent_before_holding
    assert watch.held_deliveries >= 10
    assert watch.session._held is not None
    assert len(watch.session._held) <= len(VEHICLES)
    # (b) Flat memory: Twisted's buffer for it never exceeded its 64 KiB pause threshold
    # plus the batches that were being written when it filled.
    bound = watch.protocol.transport.bufferSize + 2 * size
    assert watch.most_buffered <= bound, (watch.most_buffered, bound)
    grew = rss_bytes() - rss_before
    assert grew < 8 * 2**20, f"RSS grew {grew / 2**20:.1f} MiB while it was stalled"

    # (c) Meanwhile the normal viewer got every batch on time.
    assert_on_time(normal, started, dropped_at)
    assert normal.between(holding_since, dropped_at), "nothing while the slow viewer held"

    # It reads again and finds the close frame behind what was already in flight.
    scene.publisher.stop()
    slow.start_reading()
    assert await slow.close_frame.addTimeout(TIMEOUT, reactor) == 1008
    await watch.disconnected.addTimeout(TIMEOUT, reactor)
    await slow.lost.addTimeout(TIMEOUT, reactor)
    assert watch.session not in hub.viewers
    assert hub.holding == set()
    stats = await fetch_stats(scene.server)
    assert stats["tracking"]["slowViewersDropped"] == 1
    assert stats["tracking"]["batcher"]["pendingBatches"] == 0
    assert stats["tracking"]["connectedClients"] == 2  # the normal viewer and the publisher
    assert normal.client.close_code is None


@pytest_twisted.ensureDeferred
async def test_a_viewer_that_reads_again_gets_the_latest_points_not_a_backlog(
    patient_scene: Scene,
) -> None:
    scene = patient_scene
    hub, watch, slow, normal = scene.hub, scene.watch, scene.slow, scene.normal
    slow.stop_reading()
    started = time.time() * 1000
    scene.publisher.start()
    await watch.holding.addTimeout(TIMEOUT, reactor)
    sent_before_holding = len(watch.sent)
    # Twenty batches go by while it holds.
    await watch.held(20)
    scene.publisher.stop()
    last = scene.publisher.last_timestamp
    # The last tick's points have all been flushed: the normal viewer has every one of them.
    await normal.has_all(last)
    assert_on_time(normal, started, time.time() * 1000)
    assert len(watch.sent) == sent_before_holding, "a batch was written while it held"
    flushes_held = watch.held_deliveries

    in_flight = {batch_id for batch_id, _, _ in watch.sent}
    catch_up = slow.next(lambda m: is_batch(m) and m["data"]["batchId"] not in in_flight)
    slow.start_reading()
    resumed = (await catch_up)["data"]

    # Exactly one batch more than what was in flight: the newest point of every vehicle.
    assert [kind for kind, _ in watch.flow][-1] == "resume"
    assert len(watch.sent) == sent_before_holding + 1
    assert resumed["batchId"] == watch.sent[-1][0]
    assert resumed["count"] == len(VEHICLES)
    assert sorted(p["vehicleId"] for p in resumed["dataPoints"]) == sorted(VEHICLES)
    assert {p["timestamp"] for p in resumed["dataPoints"]} == {last}
    received = [batch["batchId"] for batch in slow.batches()]
    assert received == [batch_id for batch_id, _, _ in watch.sent]
    assert len(received) < flushes_held, "it was sent a backlog, not the latest points"

    # Not dropped: the stall timer was stopped, nothing is held any more.
    assert hub.slow_viewers_dropped == 0
    assert watch.closes == []
    assert watch.session in hub.viewers
    assert watch.session._held is None
    assert "stall" not in watch.session._timers
    assert hub.stats()["batcher"]["pendingBatches"] == 0
    slow.send("request:stats", None, 2)
    stats = (await slow.next(is_ack(2)))["data"]
    assert stats["slowViewersDropped"] == 0


@pytest_twisted.ensureDeferred
async def test_a_stalled_viewer_gets_no_snapshot_written_either(patient_scene: Scene) -> None:
    """Subscribing again and again while not reading must not queue a snapshot each time."""
    scene = patient_scene
    watch, slow = scene.watch, scene.slow
    size = batch_bytes()
    scene.publisher.publish()
    await slow.next(lambda m: is_batch(m) and m["data"]["count"] == len(VEHICLES))
    slow.stop_reading()
    rounds = 60
    for _ in range(rounds):
        slow.send("unsubscribe:vehicle", {"vehicleId": "*"})
        slow.send("subscribe:vehicle", {"vehicleId": "*"})
    answered = watch.handled(99)
    slow.send("request:stats", None, 99)
    await answered
    bound = watch.protocol.transport.bufferSize + 2 * size
    assert watch.most_buffered <= bound, (
        f"{watch.most_buffered / 2**20:.1f} MiB buffered for a viewer that reads nothing"
    )
