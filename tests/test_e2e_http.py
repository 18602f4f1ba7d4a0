"""/health, /stats and the HTTP edges of the one Site, over loopback."""

from __future__ import annotations

import gzip
import os
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.conftest import RunningServer, now_ms, point


async def fetch(
    url: str, method: bytes = b"GET", headers: dict[bytes, bytes] | None = None
) -> tuple[int, Headers, bytes]:
    agent = Agent(reactor)
    response = await agent.request(
        method, url.encode(), Headers({k: [v] for k, v in (headers or {}).items()})
    )
    body = await readBody(response)
    return response.code, response.headers, body


def header(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return None if values is None else values[0]


def assert_hardened_json(headers: Headers) -> None:
    assert header(headers, b"content-type") == b"application/json"
    assert header(headers, b"x-content-type-options") == b"nosniff"
    assert header(headers, b"x-frame-options") == b"DENY"
    assert header(headers, b"referrer-policy") == b"no-referrer"
    assert b"default-src 'none'" in (header(headers, b"content-security-policy") or b"")


@pytest_twisted.ensureDeferred
async def test_health(server: RunningServer) -> None:
    code, headers, body = await fetch(server.http_url("/health"))
    assert code == 200
    assert_hardened_json(headers)
    health = orjson.loads(body)
    assert health["status"] == "ok"
    assert health["uptime"] >= 0
    assert abs(health["timestamp"] - now_ms()) < 5000


@pytest_twisted.ensureDeferred
async def test_stats_reports_server_and_tracking_figures(server: RunningServer) -> None:
    viewer = await server.client()
    vehicle = await server.client()
    await viewer.request("subscribe:vehicle", {"vehicleId": "h_1"})
    await vehicle.request("vehicle:telemetry", [point("h_1"), point("h_2"), {"vehicleId": "?"}])
    await viewer.event("vehicle:telemetry:batch")

    code, headers, body = await fetch(server.http_url("/stats"))
    assert code == 200
    assert_hardened_json(headers)
    stats = orjson.loads(body)
    assert stats["server"]["pid"] == os.getpid()
    assert stats["server"]["memory"]["rssBytes"] > 1_000_000
    assert stats["server"]["environment"] == "production"
    assert stats["server"]["pythonVersion"].startswith("3.")
    assert stats["server"]["twistedVersion"]
    tracking: dict[str, Any] = stats["tracking"]
    assert tracking["connectedClients"] == 2
    assert tracking["activeVehicles"] == 2
    assert tracking["totalTelemetryReceived"] == 2
    assert tracking["totalTelemetryRejected"] == 1
    assert tracking["subscriptions"] == {
        "totalVehicles": 1,
        "totalClients": 1,
        "totalSubscriptions": 1,
        "vehicleSubscriptions": {"h_1": 1},
    }
    batcher = tracking["batcher"]
    assert batcher["totalBatches"] >= 1
    assert batcher["totalPoints"] == 2
    assert batcher["totalVehicleUpdates"] == 2
    assert batcher["bufferedVehicles"] == 0
    assert batcher["staleDropped"] == 0
    assert batcher["pendingBatches"] == 0


@pytest.mark.parametrize("path", ["/nope", "/", "/health/extra", "/stats/x/y"])
@pytest_twisted.ensureDeferred
async def test_unknown_path_is_a_json_404(server: RunningServer, path: str) -> None:
    code, headers, body = await fetch(server.http_url(path))
    assert code == 404
    assert_hardened_json(headers)
    assert orjson.loads(body)["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE"])
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_a_json_405(server: RunningServer, method: bytes) -> None:
    code, headers, body = await fetch(server.http_url("/stats"), method)
    assert code == 405
    assert_hardened_json(headers)
    assert b"GET" in (header(headers, b"allow") or b"")
    assert orjson.loads(body)["error"]["code"] == "METHOD_NOT_ALLOWED"


@pytest_twisted.ensureDeferred
async def test_head_has_headers_and_no_body(server: RunningServer) -> None:
    code, headers, body = await fetch(server.http_url("/health"), b"HEAD")
    assert code == 200
    assert header(headers, b"content-type") == b"application/json"
    assert body == b""


@pytest_twisted.ensureDeferred
async def test_gzip_when_the_client_accepts_it(server: RunningServer) -> None:
    code, headers, body = await fetch(
        server.http_url("/stats"), headers={b"accept-encoding": b"gzip"}
    )
    assert code == 200
    assert header(headers, b"content-encoding") == b"gzip"
    assert "tracking" in orjson.loads(gzip.decompress(body))
    code, headers, body = await fetch(server.http_url("/stats"))
    assert header(headers, b"content-encoding") is None
    assert "tracking" in orjson.loads(body)


@pytest_twisted.ensureDeferred
async def test_cors_only_for_allowed_origins(server: RunningServer) -> None:
    allowed = {b"origin": b"https://dispatch.example"}
    code, headers, _ = await fetch(server.http_url("/stats"), headers=allowed)
    assert code == 200
    assert header(headers, b"access-control-allow-origin") == b"https://dispatch.example"
    assert b"Origin" in (header(headers, b"vary") or b"")

    code, headers, _ = await fetch(
        server.http_url("/stats"), headers={b"origin": b"https://evil.example"}
    )
    assert code == 200
    assert header(headers, b"access-control-allow-origin") is None

    code, headers, body = await fetch(server.http_url("/health"), b"OPTIONS", allowed)
    assert code == 204
    assert body == b""
    assert header(headers, b"access-control-allow-origin") == b"https://dispatch.example"
    assert b"GET" in (header(headers, b"access-control-allow-methods") or b"")
