"""``fleettrack-sim``: drives a fleettrack server with simulated vehicles and viewers.

Vehicles follow :class:`~fleettrack.sim_routes.VehicleModel` routes and report
at ``hz`` over real WebSocket connections, one per vehicle or through a few
gateway connections that relay arrays. Viewers subscribe and time every point
they receive: latency is arrival time minus the point's own timestamp.

Use :func:`run` (or :class:`Simulation`) inside a running reactor; it returns a
Deferred that fires with a :class:`Summary`. :func:`main` is the command line,
which prints a status line to stderr every second and the summary as JSON to
stdout. Two marker lines on stderr (:data:`MARK_START`, :data:`MARK_END`)
bracket the measurement window, for benchmarks that sample the server then.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from functools import partial
from typing import Any, Final, TextIO, cast
from urllib.parse import urlsplit

import attrs
import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import (
    Deferred,
    ensureDeferred,
    gatherResults,
)
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall, react
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from fleettrack.sim_routes import Area, VehicleModel

MARK_START: Final = "fleettrack-sim: measuring"
MARK_END: Final = "fleettrack-sim: measured"

DEFAULT_URL: Final = "ws://127.0.0.1:3001/ws"
DEFAULT_CENTER: Final = (40.7128, -74.0060)
#: A gateway message stays well under a 64 KiB frame limit and the 1000-point cap.
GATEWAY_MAX_BYTES: Final = 60_000
GATEWAY_MAX_POINTS: Final = 1000
#: Subscriptions sent at once, then this many per second (servers rate-limit messages).
SUBSCRIBE_BURST: Final = 150
SUBSCRIBE_PER_SECOND: Final = 50
CONNECT_TIMEOUT: Final = 10.0
SUBSCRIBE_TIMEOUT: Final = 30.0
CLOSE_TIMEOUT: Final = 5.0
WARNINGS_PER_KIND: Final = 3
#: Vehicles send in evenly spread slots no shorter than this (gateways: longer).
SLOT_SECONDS: Final = 0.01
GATEWAY_SLOT_SECONDS: Final = 0.1
_PREFIX = re.compile(r"[A-Za-z0-9_.:\-]{0,40}")


class SimulationError(Exception):
    """The simulation could not run at all (for instance, nothing could connect)."""


def _parse_subs(value: object) -> int | str:
    if value in ("all", "*"):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"subs must be a non-negative integer, 'all' or '*', not {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen
class SimConfig:
    """What to simulate. ``seconds=0`` runs until :meth:`Simulation.stop`."""

    url: str = DEFAULT_URL
    vehicles: int = attrs.field(default=10, validator=_non_negative)
    hz: float = attrs.field(default=1.0)
    #: 0: one connection per vehicle; otherwise that many connections relaying arrays.
    gateways: int = attrs.field(default=0, validator=_non_negative)
    viewers: int = attrs.field(default=0, validator=_non_negative)
    #: Per viewer: that many vehicles, ``"all"`` (every vehicle by id) or ``"*"`` (wildcard).
    subs: int | str = attrs.field(default="*", converter=_parse_subs)
    seconds: float = attrs.field(default=10.0, validator=_non_negative)
    warmup: float = attrs.field(default=0.0, validator=_non_negative)
    center: tuple[float, float] = DEFAULT_CENTER
    radius_km: float = attrs.field(default=5.0)
    seed: int | None = None
    #: Extra connections that only connect and stay silent.
    idle: int = attrs.field(default=0, validator=_non_negative)
    #: Ask for an ack on every vehicle message (gateway messages always ask).
    ack: bool = False
    #: Sent as ``{"event": "auth"}`` first on every connection, when the server wants one.
    token: str | None = None
    prefix: str = "sim-"
    #: Connection attempts in flight at once.
    concurrency: int = attrs.field(default=50)
    #: Seconds to keep retrying until the server accepts connections.
    wait: float = attrs.field(default=0.0, validator=_non_negative)
    #: Status lines also show the latest point of this many vehicles as viewer 0 sees them.
    show: int = attrs.field(default=0, validator=_non_negative)

    @hz.validator
    def _check_hz(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not 0 < value <= 100:
            raise ValueError(f"hz must be in (0, 100], not {value!r}")

    @radius_km.validator
    def _check_radius(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not 0 < value <= 1000:
            raise ValueError(f"radius_km must be in (0, 1000], not {value!r}")

    @concurrency.validator
    def _check_concurrency(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            raise ValueError("concurrency must be at least 1")

    def __attrs_post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"url must be ws://host[:port]/path or wss://..., not {self.url!r}")
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError("prefix must be at most 40 characters of A-Z a-z 0-9 _ . : -")
        Area(self.center[0], self.center[1], self.radius_km * 1000)

    def vehicle_ids(self) -> list[str]:
        width = len(str(max(self.vehicles - 1, 0)))
        return [f"{self.prefix}{index:0{width}d}" for index in range(self.vehicles)]

    def targets(self, viewer: int, vehicle_ids: Sequence[str]) -> list[str]:
        """What viewer number ``viewer`` subscribes to."""
        if self.subs == "*":
            return ["*"]
        if self.subs == "all":
            return list(vehicle_ids)
        count = min(int(self.subs), len(vehicle_ids))
        start = viewer * 7919
        return [vehicle_ids[(start + k) % len(vehicle_ids)] for k in range(count)]


def _percentile(histogram: Counter[int], total: int, quantile: float) -> int | None:
    """Nearest-rank percentile of a histogram of integer samples."""
    if total == 0:
        return None
    rank = max(1, math.ceil(quantile * total))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


@attrs.define
class Tally:
    """Counts over some stretch of time; latencies as a histogram in whole milliseconds."""

    sent: int = 0
    sent_points: int = 0
    delivered: int = 0
    batches: int = 0
    latency: Counter[int] = attrs.field(factory=Counter)

    def latency_ms(self) -> dict[str, float | None]:
        total = self.latency.total()
        if total == 0:
            return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
        mean = sum(value * count for value, count in self.latency.items()) / total
        return {
            "p50": _percentile(self.latency, total, 0.50),
            "p90": _percentile(self.latency, total, 0.90),
            "p99": _percentile(self.latency, total, 0.99),
            "max": max(self.latency),
            "mean": round(mean, 1),
        }


@attrs.frozen
class Summary:
    """The outcome of a run; rates are over the measurement window."""

    config: SimConfig
    seed: int
    seconds: float
    connections: dict[str, int]
    window: Tally
    acks: dict[str, int]
    errors: dict[str, int]
    #: CPU seconds this process spent during the window: near ``seconds``, it was saturated.
    client_cpu: float = 0.0

    @property
    def delivered(self) -> int:
        return self.window.delivered

    @property
    def sent_points(self) -> int:
        return self.window.sent_points

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        config, window = self.config, self.window
        elapsed = self.seconds or math.nan

        def rate(count: int) -> float | None:
            per_second = count / elapsed
            return None if math.isnan(per_second) else round(per_second, 1)

        return {
            "url": config.url,
            "seed": self.seed,
            "vehicles": config.vehicles,
            "hz": config.hz,
            "gateways": config.gateways,
            "viewers": config.viewers,
            "subs": config.subs,
            "idle": config.idle,
            "seconds": round(self.seconds, 3),
            "connections": self.connections,
            "targetPointsPerSec": round(config.vehicles * config.hz, 1),
            "sent": window.sent,
            "sentPoints": window.sent_points,
            "sentPerSec": rate(window.sent),
            "sentPointsPerSec": rate(window.sent_points),
            "delivered": window.delivered,
            "deliveredPerSec": rate(window.delivered),
            "batches": window.batches,
            "batchesPerSec": rate(window.batches),
            "latencyMs": window.latency_ms(),
            "acks": self.acks,
            "errors": {"total": self.error_count, **self.errors},
            "clientCpuPercent": None
            if math.isnan(elapsed)
            else round(100 * self.client_cpu / elapsed, 1),
        }


class SimConnection(WebSocketClientProtocol):
    """One WebSocket connection of the simulator; what it is for is up to ``handler``."""

    factory: SimFactory

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[SimConnection] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.handler: Callable[[dict[str, Any]], None] = _ignore
        self.alive = False
        self.closing = False
        self.close_code: int | None = None

    def onOpen(self) -> None:
        self.alive = True
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            message = None
        if type(message) is dict:
            self.handler(message)
        else:
            self.factory.simulation.count_error("invalidFrame")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        was_alive, self.alive = self.alive, False
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(
                ConnectionError(f"WebSocket handshake failed: {reason or 'connection lost'}")
            )
        elif was_alive and not self.closing:
            self.factory.simulation.connection_lost(self, code, reason)
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, payload: bytes) -> bool:
        """Send one text frame if the connection is open; False if it is not."""
        if not self.alive:
            return False
        self.sendMessage(payload)  # type: ignore[no-untyped-call]
        return True

    def close(self) -> None:
        self.closing = True
        if self.alive:
            self.alive = False
            self.sendClose(1000)
        elif self.transport is not None and not self.closed.called:
            self.dropConnection(abort=True)


class SimFactory(WebSocketClientFactory):
    protocol = SimConnection  # type: ignore[assignment]

    def __init__(self, simulation: Simulation, url: str, reactor: Any) -> None:
        super().__init__(url, reactor=reactor)  # type: ignore[no-untyped-call]
        self.simulation = simulation
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            # orjson validates UTF-8 while parsing every message anyway.
            utf8validateIncoming=False,
            openHandshakeTimeout=CONNECT_TIMEOUT,
            closeHandshakeTimeout=2,
        )


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _ignore(message: dict[str, Any]) -> None:
    """Handler for connections that expect nothing."""


def _endpoint(reactor: Any, url: str) -> IStreamClientEndpoint:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    endpoint: IStreamClientEndpoint
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
            reactor, host, port, timeout=CONNECT_TIMEOUT
        )
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


def _gateway_frames(encoded: list[bytes], acks: Iterator[int]) -> Iterator[tuple[int, int, bytes]]:
    """Split encoded points into telemetry arrays: ``(ack, points, frame)``."""
    start = 0
    while start < len(encoded):
        end, size = start, 0
        while (
            end < len(encoded)
            and end - start < GATEWAY_MAX_POINTS
            and (end == start or size + len(encoded[end]) + 1 <= GATEWAY_MAX_BYTES - 64)
        ):
            size += len(encoded[end]) + 1
            end += 1
        ack = next(acks)
        frame = b'{"event":"vehicle:telemetry","ack":%d,"data":[%b]}' % (
            ack,
            b",".join(encoded[start:end]),
        )
        yield ack, end - start, frame
        start = end


@attrs.define(eq=False)
class _Vehicle:
    model: VehicleModel
    last_step: float
    link: SimConnection | None = None
    gateway: int = 0


@attrs.define(eq=False)
class _Viewer:
    index: int
    targets: list[str]
    #: Vehicle ids this viewer may receive; None when it may receive any.
    expected: frozenset[str] | None
    ready: Deferred[None] = attrs.field(factory=Deferred)
    link: SimConnection | None = None
    answered: int = 0
    confirmed: int = 0


class Simulation:
    """One run: connect, drive, measure, disconnect. Single use."""

    log = Logger()

    def __init__(
        self,
        config: SimConfig,
        reactor: Any = None,
        status: Callable[[str], None] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.seed = random.SystemRandom().randrange(2**32) if config.seed is None else config.seed
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._status = status
        self._factory = SimFactory(self, config.url, reactor)
        self._links: list[SimConnection] = []
        self._vehicles: list[_Vehicle] = []
        self._gateways: list[SimConnection] = []
        self._viewers: list[_Viewer] = []
        self._idle: list[SimConnection] = []
        self._acks = itertools.count(1)
        self._pending_acks: dict[int, int] = {}
        self.interval = Tally()
        self.window = Tally()
        self.measuring = False
        self.errors: Counter[str] = Counter()
        self._warned: Counter[str] = Counter()
        self.ack_counts: Counter[str] = Counter()
        self._phase = "starting"
        self._started = 0.0
        self._window_started = 0.0
        self._window_cpu = 0.0
        self._interval_started = 0.0
        self._window_seconds = 0.0
        self._stopping = False
        self._done = False
        self._stop_callbacks: list[Callable[[], None]] = []
        self._finished: list[Deferred[None]] = []
        self._shown: dict[str, dict[str, Any]] = {}
        self._sender: LoopingCall | None = None
        self._slots: list[list[_Vehicle]] = []
        self._next_slot = 0

    # Control

    def run(self) -> Deferred[Summary]:
        """Run the whole simulation; fires with the summary once every connection is closed."""
        return ensureDeferred(self._run())

    def stop(self) -> None:
        """End the measurement window now (or skip it), then disconnect and finish."""
        if self._stopping:
            return
        self._stopping = True
        callbacks, self._stop_callbacks = self._stop_callbacks, []
        for callback in callbacks:
            callback()
        for viewer in self._viewers:
            if not viewer.ready.called:
                viewer.ready.callback(None)

    def finish(self) -> Deferred[None]:
        """:meth:`stop`, and a Deferred that fires when the run has finished."""
        finished: Deferred[None] = Deferred()
        if self._done:
            finished.callback(None)
        else:
            self._finished.append(finished)
        self.stop()
        return finished

    def count_error(self, kind: str, count: int = 1) -> None:
        self.errors[kind] += count

    def connection_lost(self, link: SimConnection, code: int | None, reason: str | None) -> None:
        """A connection the server (or the network) closed while the run needed it."""
        self.errors["closedByServer"] += 1
        self._warn(
            "closedByServer",
            "connection closed unexpectedly (code {code}: {reason})",
            code=code,
            reason=reason,
        )

    def _warn(self, kind: str, format: str, **fields: object) -> None:
        """Log the first few warnings of a kind; the rest only count (see the summary)."""
        self._warned[kind] += 1
        if self._warned[kind] <= WARNINGS_PER_KIND:
            self.log.warn(format, **fields)
        if self._warned[kind] == WARNINGS_PER_KIND:
            self.log.warn("further {kind} warnings are only counted", kind=kind)

    # The run

    async def _run(self) -> Summary:
        config = self.config
        self._started = self._interval_started = self._clock.seconds()
        status = LoopingCall(self._report)
        status.clock = self._clock
        status.start(1.0, now=False)
        try:
            if config.wait:
                self._phase = "waiting"
                await self._await_server(config.wait)
            await self._connect_everything()
            if not self._links:
                raise SimulationError(f"could not open any connection to {config.url}")
            self._start_sending()
            self._phase = "warmup"
            await self._sleep(config.warmup)
            self._begin_window()
            await self._sleep(config.seconds if config.seconds > 0 else math.inf)
            self._end_window()
        finally:
            if self._sender is not None and self._sender.running:
                self._sender.stop()
            self._phase = "closing"
            await self._close_everything()
            if status.running:
                status.stop()
            self._done = True
            finished, self._finished = self._finished, []
            for waiter in finished:
                waiter.callback(None)
        return Summary(
            config=config,
            seed=self.seed,
            seconds=self._window_seconds,
            connections={
                "opened": len(self._links),
                "vehicles": sum(1 for vehicle in self._vehicles if vehicle.link is not None),
                "gateways": len(self._gateways),
                "viewers": sum(1 for viewer in self._viewers if viewer.link is not None),
                "idle": len(self._idle),
                "failed": self.errors["connect"],
            },
            window=self.window,
            acks=dict(self.ack_counts),
            errors=dict(self.errors),
            client_cpu=self._window_cpu,
        )

    def _sleep(self, seconds: float) -> Deferred[None]:
        """Wait ``seconds`` (may be infinite), or less if :meth:`stop` is called."""
        wake: Deferred[None] = Deferred()
        if self._stopping or seconds <= 0:
            wake.callback(None)
            return wake
        call: IDelayedCall | None = None
        if math.isfinite(seconds):
            call = self._clock.callLater(seconds, wake.callback, None)

        def stopped() -> None:
            if call is not None and call.active():
                call.cancel()
            if not wake.called:
                wake.callback(None)

        self._stop_callbacks.append(stopped)
        return wake

    async def _await_server(self, seconds: float) -> None:
        """Retry a plain TCP connection until the server listens, for up to ``seconds``."""
        deadline = self._clock.seconds() + seconds
        endpoint = _endpoint(self._reactor, self.config.url)
        while True:
            try:
                probe = cast(Protocol, await endpoint.connect(Factory.forProtocol(Protocol)))
            except Exception:
                if self._clock.seconds() >= deadline or self._stopping:
                    raise
                await self._sleep(0.2)
                continue
            if probe.transport is not None:
                probe.transport.loseConnection()
            return

    async def _open(self, handler: Callable[[dict[str, Any]], None]) -> SimConnection | None:
        """One new connection, open and authenticated; None (counted) if that failed."""
        if self._stopping:
            return None
        endpoint = _endpoint(self._reactor, self.config.url)
        link: SimConnection | None = None
        try:
            link = cast(SimConnection, await endpoint.connect(self._factory))
            link.opened.addTimeout(CONNECT_TIMEOUT * 2, self._clock)
            await link.opened
            if self.config.token is not None:
                await self._authenticate(link)
        except Exception as error:
            if link is not None:
                link.close()
            self.errors["connect"] += 1
            self._warn(
                "connect", "could not connect to {url}: {error}", url=self.config.url, error=error
            )
            return None
        link.handler = handler
        self._links.append(link)
        return link

    async def _authenticate(self, link: SimConnection) -> None:
        answered: Deferred[dict[str, Any]] = Deferred()

        def on_ack(message: dict[str, Any]) -> None:
            if message.get("event") == "ack" and message.get("ack") == 0 and not answered.called:
                answered.callback(message.get("data") or {})

        link.handler = on_ack
        link.send(orjson.dumps({"event": "auth", "data": {"token": self.config.token}, "ack": 0}))
        answered.addTimeout(CONNECT_TIMEOUT, self._clock)
        reply = await answered
        if reply.get("success") is not True:
            self.errors["auth"] += 1
            raise ConnectionError(f"authentication refused: {reply.get('error')}")

    async def _connect_everything(self) -> None:
        config = self.config
        area = Area(config.center[0], config.center[1], config.radius_km * 1000)
        now = self._clock.seconds()
        ids = config.vehicle_ids()
        self._vehicles = [
            _Vehicle(VehicleModel.seeded(vehicle_id, area, self.seed), now, None, index)
            for index, vehicle_id in enumerate(ids)
        ]
        if config.gateways:
            for index, vehicle in enumerate(self._vehicles):
                vehicle.gateway = index % config.gateways
        for index in range(config.viewers):
            targets = config.targets(index, ids)
            expected = None if config.subs in ("*", "all") else frozenset(targets)
            self._viewers.append(_Viewer(index, targets, expected))

        tasks: list[Callable[[], Coroutine[Any, Any, None]]] = []
        tasks += [partial(self._open_viewer, viewer) for viewer in self._viewers]
        if config.gateways:
            tasks += [self._open_gateway] * config.gateways
        else:
            tasks += [partial(self._open_vehicle, vehicle) for vehicle in self._vehicles]
        tasks += [self._open_idle] * config.idle
        pending = iter(tasks)

        async def worker() -> None:
            # A few workers share the queue: at most ``concurrency`` attempts in flight.
            for task in pending:
                if self._stopping:
                    return
                await task()

        self._phase = "connecting"
        await gatherResults([ensureDeferred(worker()) for _ in range(config.concurrency)])

        self._phase = "subscribing"
        subscribed = [
            ensureDeferred(self._subscribe(viewer))
            for viewer in self._viewers
            if viewer.link is not None
        ]
        await gatherResults(subscribed)

    async def _open_viewer(self, viewer: _Viewer) -> None:
        viewer.link = await self._open(lambda message: self._on_viewer_message(viewer, message))

    async def _open_vehicle(self, vehicle: _Vehicle) -> None:
        vehicle.link = await self._open(self._on_vehicle_message)

    async def _open_gateway(self) -> None:
        link = await self._open(self._on_vehicle_message)
        if link is not None:
            self._gateways.append(link)

    async def _open_idle(self) -> None:
        link = await self._open(_ignore)
        if link is not None:
            self._idle.append(link)

    async def _subscribe(self, viewer: _Viewer) -> None:
        link = viewer.link
        assert link is not None
        if not viewer.targets:
            return
        for sent, target in enumerate(viewer.targets):
            if sent >= SUBSCRIBE_BURST and (sent - SUBSCRIBE_BURST) % SUBSCRIBE_PER_SECOND == 0:
                await self._sleep(1.0)
            subscribe = {"event": "subscribe:vehicle", "data": {"vehicleId": target}, "ack": sent}
            link.send(orjson.dumps(subscribe))
        viewer.ready.addTimeout(SUBSCRIBE_TIMEOUT, self._clock)
        try:
            await viewer.ready
        except DeferredTimeout:
            self.errors["subscribeTimeout"] += 1
            self._warn(
                "subscribeTimeout",
                "viewer {index}: {answered} of {count} subscriptions answered",
                index=viewer.index,
                answered=viewer.answered,
                count=len(viewer.targets),
            )

    # Sending

    def _start_sending(self) -> None:
        if self._gateways:
            vehicles = self._vehicles
        else:
            vehicles = [vehicle for vehicle in self._vehicles if vehicle.link is not None]
        if not vehicles:
            return
        period = 1.0 / self.config.hz
        shortest = GATEWAY_SLOT_SECONDS if self.config.gateways else SLOT_SECONDS
        slots = max(1, min(len(vehicles), int(period / shortest)))
        self._slots = [vehicles[index::slots] for index in range(slots)]
        now = self._clock.seconds()
        for vehicle in vehicles:
            vehicle.last_step = now
        self._sender = LoopingCall.withCount(self._send_slots)
        self._sender.clock = self._clock
        self._sender.start(period / slots, now=True)

    def _send_slots(self, count: int) -> None:
        # After a stall, catch up at most one whole period rather than bursting.
        for _ in range(min(count, len(self._slots))):
            slot = self._slots[self._next_slot]
            self._next_slot = (self._next_slot + 1) % len(self._slots)
            if self._gateways:
                self._send_through_gateways(slot)
            else:
                self._send_directly(slot)

    def _send_directly(self, slot: list[_Vehicle]) -> None:
        now = self._clock.seconds()
        now_ms = int(now * 1000)
        ack = self.config.ack
        sent = 0
        for vehicle in slot:
            link = vehicle.link
            if link is None or not link.alive:
                continue
            model = vehicle.model
            model.step(now - vehicle.last_step)
            vehicle.last_step = now
            message: dict[str, Any] = {"event": "vehicle:telemetry", "data": model.point(now_ms)}
            if ack:
                message["ack"] = number = next(self._acks)
                self._pending_acks[number] = 1
            link.send(orjson.dumps(message))
            sent += 1
        self._count_sent(sent, sent)

    def _send_through_gateways(self, slot: list[_Vehicle]) -> None:
        now = self._clock.seconds()
        now_ms = int(now * 1000)
        relayed: list[list[bytes]] = [[] for _ in self._gateways]
        for vehicle in slot:
            model = vehicle.model
            model.step(now - vehicle.last_step)
            vehicle.last_step = now
            relayed[vehicle.gateway % len(relayed)].append(orjson.dumps(model.point(now_ms)))
        for link, encoded in zip(self._gateways, relayed, strict=True):
            if not encoded or not link.alive:
                continue
            for ack, points, frame in _gateway_frames(encoded, self._acks):
                self._pending_acks[ack] = points
                link.send(frame)
                self._count_sent(1, points)

    def _count_sent(self, messages: int, points: int) -> None:
        self.interval.sent += messages
        self.interval.sent_points += points
        if self.measuring:
            self.window.sent += messages
            self.window.sent_points += points

    # Receiving

    def _on_vehicle_message(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        data = message.get("data")
        if event == "ack" and type(data) is dict:
            ack = message.get("ack")
            points = self._pending_acks.pop(ack, 1) if type(ack) is int else 1
            if data.get("success") is True:
                for key in ("accepted", "stale"):
                    if type(data.get(key)) is int:
                        self.ack_counts[key] += data[key]
                rejected = data.get("rejected") or []
                if rejected:
                    self.ack_counts["rejected"] += len(rejected)
                    for item in rejected:
                        self.errors[f"rejected:{item.get('code')}:{item.get('field')}"] += 1
            else:
                self.ack_counts["rejected"] += points
                error = data.get("error") or {}
                self.errors[f"server:{error.get('code')}:{error.get('field')}"] += 1
        elif event == "error" and type(data) is dict:
            self.errors[f"server:{data.get('code')}:{data.get('field')}"] += 1

    def _on_viewer_message(self, viewer: _Viewer, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "vehicle:telemetry:batch":
            self._on_batch(viewer, message.get("data"))
        elif event == "ack":
            # Subscriptions are the only messages viewers send, each with an ack.
            data = message.get("data")
            if type(data) is dict and data.get("success") is True:
                viewer.confirmed += 1
            else:
                error = data.get("error") if type(data) is dict else None
                code = error.get("code") if type(error) is dict else None
                self.errors[f"subscribe:{code}"] += 1
            viewer.answered += 1
            if viewer.answered >= len(viewer.targets) and not viewer.ready.called:
                viewer.ready.callback(None)
        elif event == "error":
            data = message.get("data")
            code = data.get("code") if type(data) is dict else None
            self.errors[f"server:{code}"] += 1

    def _on_batch(self, viewer: _Viewer, data: Any) -> None:
        now_ms = int(self._clock.seconds() * 1000)
        try:
            points = data["dataPoints"]
            latencies = [now_ms - point["timestamp"] for point in points]
            if data["count"] != len(points):
                self.errors["batchCountMismatch"] += 1
        except (KeyError, TypeError):
            self.errors["invalidBatch"] += 1
            return
        if viewer.expected is not None:
            strays = sum(1 for point in points if point.get("vehicleId") not in viewer.expected)
            if strays:
                self.errors["unsubscribedPoints"] += strays
        if viewer.index == 0 and self.config.show:
            self._remember(points)
        tally = self.interval
        tally.batches += 1
        tally.delivered += len(latencies)
        tally.latency.update(latencies)
        if self.measuring:
            tally = self.window
            tally.batches += 1
            tally.delivered += len(latencies)
            tally.latency.update(latencies)

    def _remember(self, points: list[dict[str, Any]]) -> None:
        for point in points:
            vehicle_id = point.get("vehicleId")
            if vehicle_id in self._shown or len(self._shown) < self.config.show:
                self._shown[str(vehicle_id)] = point

    # The measurement window

    def _begin_window(self) -> None:
        self.window = Tally()
        self.measuring = True
        self._window_started = self._clock.seconds()
        self._window_cpu = -_cpu_seconds()
        self._phase = "measuring"
        seconds = f"{self.config.seconds:g} s" if self.config.seconds else "until stopped"
        self._say(f"{MARK_START} ({seconds})")

    def _end_window(self) -> None:
        self.measuring = False
        self._window_seconds = self._clock.seconds() - self._window_started
        self._window_cpu += _cpu_seconds()
        self._say(f"{MARK_END} ({self._window_seconds:.1f} s)")

    async def _close_everything(self) -> None:
        links = list(self._links)
        for link in links:
            link.close()
        closing = gatherResults([link.closed for link in links])
        closing.addTimeout(CLOSE_TIMEOUT, self._clock)
        try:
            await closing
        except DeferredTimeout:
            lingering = [link for link in links if not link.closed.called]
            self.log.warn("{count} connections did not close in time", count=len(lingering))
            for link in lingering:
                link.dropConnection(abort=True)

    # Status

    def _say(self, line: str) -> None:
        if self._status is not None:
            self._status(line)

    def _report(self) -> None:
        now = self._clock.seconds()
        elapsed = max(now - self._interval_started, 1e-9)
        tally, self.interval = self.interval, Tally()
        self._interval_started = now
        if self._status is None:
            return
        latency = tally.latency_ms()
        p50 = "-" if latency["p50"] is None else f"{latency['p50']:g}"
        p99 = "-" if latency["p99"] is None else f"{latency['p99']:g}"
        wanted = self.config.viewers + self.config.idle
        wanted += self.config.gateways or self.config.vehicles
        line = (
            f"[{now - self._started:6.1f}s {self._phase:>11}] "
            f"conns {sum(1 for link in self._links if link.alive)}/{wanted}  "
            f"sent {tally.sent / elapsed:7.0f} msg/s {tally.sent_points / elapsed:7.0f} pts/s  "
            f"delivered {tally.delivered / elapsed:8.0f} pts/s  "
            f"latency p50 {p50} p99 {p99} ms  errors {sum(self.errors.values())}"
        )
        self._say(line)
        for point in self._shown.values():
            self._say(
                f"    {point.get('vehicleId')}: {point.get('latitude'):.5f},"
                f"{point.get('longitude'):.5f}  {point.get('speed', 0):5.1f} km/h  "
                f"heading {point.get('bearing', 0):5.1f}"
            )


def run(
    config: SimConfig,
    reactor: Any = None,
    status: Callable[[str], None] | None = None,
) -> Deferred[Summary]:
    """Run a simulation in the running reactor; fires with its :class:`Summary`."""
    return Simulation(config, reactor, status).run()


# The command line


class StatusWriter:
    """Writes status lines to a stream: in place on a terminal, one per line otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, line: str) -> None:
        if self.tty and line.startswith("["):
            self.stream.write(f"\r{line}\x1b[K")
        elif self.tty:
            self.stream.write(f"\r\x1b[K{line}\n")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()


def _center(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAT,LON, not {text!r}") from None
    if not (-85 <= lat <= 85 and -180 <= lon <= 180):
        raise argparse.ArgumentTypeError(f"{text!r} is not a latitude (-85..85) and longitude")
    return lat, lon


def _subs(text: str) -> int | str:
    try:
        return _parse_subs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleettrack-sim",
        description=(
            "Simulate vehicles and viewers against a fleettrack server. A status line goes to "
            "stderr every second; a JSON summary goes to stdout at the end."
        ),
    )
    add = parser.add_argument
    add("--url", default=DEFAULT_URL, help=f"server WebSocket URL (default {DEFAULT_URL})")
    add("--vehicles", type=int, default=10, help="simulated vehicles (default 10)")
    add("--hz", type=float, default=1.0, help="reports per vehicle per second (default 1)")
    add(
        "--gateways",
        type=int,
        default=0,
        help="relay all vehicles through this many connections sending arrays "
        "(default 0: one connection per vehicle)",
    )
    add("--viewers", type=int, default=0, help="viewer connections (default 0)")
    add(
        "--subs",
        type=_subs,
        default="*",
        help="per viewer: N vehicles, 'all' (each vehicle by id) or '*' (wildcard; default)",
    )
    add(
        "--seconds",
        type=float,
        default=10.0,
        help="length of the measurement window; 0 runs until Ctrl-C (default 10)",
    )
    add("--warmup", type=float, default=0.0, help="seconds of load before measuring (default 0)")
    add(
        "--center",
        type=_center,
        default=DEFAULT_CENTER,
        metavar="LAT,LON",
        help="centre of the area (default 40.7128,-74.0060; negative: --center=-33.9,18.4)",
    )
    add("--radius-km", type=float, default=5.0, help="radius of the area (default 5)")
    add("--seed", type=int, default=None, help="random seed for reproducible routes")
    add("--idle", type=int, default=0, help="extra connections that stay silent (default 0)")
    add("--ack", action="store_true", help="ask for an ack on every vehicle message")
    add("--token", default=None, help="JWT sent as an auth event on every connection")
    add("--token-file", default=None, help="read the token from this file")
    add("--prefix", default="sim-", help="vehicle id prefix (default sim-)")
    add("--concurrency", type=int, default=50, help="connection attempts at once (default 50)")
    add("--wait", type=float, default=0.0, help="seconds to wait for the server to listen")
    add("--show", type=int, default=0, help="print the latest point of N vehicles each second")
    add("--quiet", action="store_true", help="no status lines")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> tuple[SimConfig, bool]:
    """The configuration from the command line, and whether to be quiet."""
    parser = build_parser()
    args = parser.parse_args(argv)
    token = args.token
    if args.token_file is not None:
        with open(args.token_file) as token_file:
            token = token_file.read().strip()
    try:
        config = SimConfig(
            url=args.url,
            vehicles=args.vehicles,
            hz=args.hz,
            gateways=args.gateways,
            viewers=args.viewers,
            subs=args.subs,
            seconds=args.seconds,
            warmup=args.warmup,
            center=args.center,
            radius_km=args.radius_km,
            seed=args.seed,
            idle=args.idle,
            ack=args.ack,
            token=token,
            prefix=args.prefix,
            concurrency=args.concurrency,
            wait=args.wait,
            show=args.show,
        )
    except ValueError as error:
        parser.error(str(error))
    return config, args.quiet


async def _main(reactor: Any, config: SimConfig, quiet: bool) -> None:
    warnings = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
    )
    globalLogBeginner.beginLoggingTo([warnings], redirectStandardIO=False)
    status = None if quiet else StatusWriter(sys.stderr)
    simulation = Simulation(config, reactor, status)
    # Ctrl-C ends the run cleanly: the window closes, connections close, the summary prints.
    reactor.addSystemEventTrigger("before", "shutdown", simulation.finish)
    try:
        summary = await simulation.run()
    except SimulationError as error:
        sys.stderr.write(f"fleettrack-sim: {error}\n")
        raise SystemExit(1) from None
    sys.stdout.write(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``fleettrack-sim`` console script."""
    config, quiet = parse_config(argv)
    react(_main, (config, quiet))


if __name__ == "__main__":
    main()
