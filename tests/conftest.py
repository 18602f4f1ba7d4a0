from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator

import attrs
import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet.task import Clock

from fleettrack.hub import Hub
from fleettrack.service import Options, TrackingService, makeService
from tests.fakes import make_clock
from tests.wsclient import WSClient


@pytest.fixture
def clock() -> Clock:
    """A task.Clock at a real epoch time (timestamps near 0 would be refused)."""
    return make_clock()


@pytest.fixture
def hub(clock: Clock) -> Hub:
    """A core hub on that clock: 1 s batches, 24 h vehicle TTL."""
    return Hub(clock, 1.0, 86400.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def now_ms() -> int:
    return int(time.time() * 1000)


def point(vehicle_id: str, **fields: object) -> dict[str, object]:
    """A valid telemetry point, timestamped now unless told otherwise."""
    raw: dict[str, object] = {
        "vehicleId": vehicle_id,
        "timestamp": now_ms(),
        "latitude": 40.7128,
        "longitude": -74.006,
        "speed": 42.5,
        "bearing": 90,
    }
    raw.update(fields)
    return raw


@attrs.define
class RunningServer:
    port: int
    service: MultiService

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def hub(self) -> Hub:
        for service in self.service:
            if isinstance(service, TrackingService):
                return service.hub
        raise AssertionError("no TrackingService in the service tree")

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def client(self) -> WSClient:
        return await WSClient.connect(self.ws_url)


def start_server(*arguments: str) -> RunningServer:
    port = free_port()
    options = Options(environ={})
    options.parseOptions(["--listen", f"tcp:{port}:interface=127.0.0.1", *arguments])
    service = makeService(options)
    service.startService()
    return RunningServer(port, service)


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[RunningServer]:
    """The real service on a free loopback port, with a short batch interval."""
    running = start_server("--batch-interval", "50", "--cors-origin", "https://dispatch.example")
    yield running
    await running.service.stopService()
