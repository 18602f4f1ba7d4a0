"""Protection end to end: tokens, rights, origins, limits and slow viewers over loopback.

Every test runs the real service with small limits given as options, and talks
to it with a real WebSocket client. Timers are short options; tests wait for
the close they cause, never for a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from fleettrack.auth import mint_token
from fleettrack.cli import main as cli
from fleettrack.hub import Hub
from tests.conftest import RunningServer, now_ms, point, start_server
from tests.wsclient import WSClient

SECRET = secrets.token_hex(32).encode()
OTHER_SECRET = secrets.token_hex(32).encode()
#: Browser origins: one the server allows, one it does not.
FOREIGN = "https://evil.example"
ALLOWED = "https://dispatch.example"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth-secret"
    path.write_bytes(SECRET + b"\n")
    return path


@contextlib.asynccontextmanager
async def serving(*arguments: str) -> AsyncIterator[RunningServer]:
    running = start_server("--batch-interval", "50", *arguments)
    try:
        yield running
    finally:
        await running.service.stopService()


def protected(secret_file: Path, *arguments: str) -> contextlib.AbstractAsyncContextManager[Any]:
    return serving("--auth-secret-file", str(secret_file), *arguments)


def token(
    ttl: float = 3600.0,
    *,
    sub: str = "tester",
    vehicles: tuple[str, ...] = (),
    watch: tuple[str, ...] = (),
    secret: bytes = SECRET,
    issued: float | None = None,
) -> str:
    return mint_token(secret, sub, ttl, vehicles=vehicles, watch=watch, now=issued)


async def signed_in(running: RunningServer, jwt: str) -> WSClient:
    client = await running.client()
    ack = await client.request("auth", {"token": jwt})
    assert ack["success"] is True, ack
    return client


def next_disconnect(hub: Hub) -> Deferred[None]:
    """Fires once the server has forgotten the next connection to go."""
    gone: Deferred[None] = Deferred()
    original = hub.disconnect

    def disconnect(viewer: Any) -> None:
        del hub.disconnect
        original(viewer)
        gone.callback(None)

    hub.disconnect = disconnect  # type: ignore[method-assign]
    gone.addTimeout(10, reactor)
    return gone


def failed(ack: dict[str, Any]) -> str:
    assert ack["success"] is False, ack
    code: str = ack["error"]["code"]
    return code


def is_batch(message: dict[str, Any]) -> bool:
    return message.get("event") == "vehicle:telemetry:batch"


def vehicle_ids(batch: dict[str, Any]) -> list[str]:
    return sorted(p["vehicleId"] for p in batch["dataPoints"])


async def fetch(url: str, headers: dict[bytes, bytes]) -> tuple[int, Headers, bytes]:
    agent = Agent(reactor)
    response = await agent.request(
        b"GET", url.encode(), Headers({k: [v] for k, v in headers.items()})
    )
    return response.code, response.headers, await readBody(response)


HANDSHAKE = {
    b"Upgrade": b"websocket",
    b"Connection": b"Upgrade",
    b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version": b"13",
}


# Missing, expired and forged tokens


@pytest_twisted.ensureDeferred
async def test_missing_token_events_are_unauthorized_then_closed_4001(secret_file: Path) -> None:
    async with protected(secret_file, "--auth-timeout", "0.5") as running:
        stranger = await running.client()
        assert failed(await stranger.request("request:stats")) == "UNAUTHORIZED"
        assert failed(await stranger.request("subscribe:vehicle", {"vehicleId": "*"})) == (
            "UNAUTHORIZED"
        )
        telemetry = await stranger.request("vehicle:telemetry", point("truck_1"))
        assert failed(telemetry) == "UNAUTHORIZED"
        stranger.send("vehicle:telemetry", [point("truck_1")])
        error = await stranger.event("error")
        assert error["code"] == "UNAUTHORIZED"
        assert await stranger.closed() == 4001
        # Nothing it sent was taken.
        assert running.hub.telemetry_received == 0


@pytest_twisted.ensureDeferred
async def test_expired_token_is_refused_and_the_connection_closed_4001(secret_file: Path) -> None:
    async with protected(secret_file, "--auth-timeout", "0.5") as running:
        client = await running.client()
        expired = token(60, watch=("*",), issued=time.time() - 3600)
        ack = await client.request("auth", {"token": expired})
        assert failed(ack) == "UNAUTHORIZED"
        assert ack["error"]["message"] == "token has expired"
        assert failed(await client.request("subscribe:vehicle", {"vehicleId": "x"})) == (
            "UNAUTHORIZED"
        )
        assert await client.closed() == 4001


@pytest_twisted.ensureDeferred
async def test_forged_and_garbage_tokens_are_refused(secret_file: Path) -> None:
    async with protected(secret_file, "--auth-timeout", "0.5") as running:
        client = await running.client()
        forged = token(watch=("*",), vehicles=("*",), secret=OTHER_SECRET)
        ack = await client.request("auth", {"token": forged})
        assert ack["error"] == {
            "code": "UNAUTHORIZED",
            "message": "token signature is invalid",
            "field": "token",
        }
        # A real token whose claims were rewritten to grant everything.
        header, _, signature = token(watch=("fleet-a-*",)).split(".")
        claims = {"sub": "tester", "exp": int(time.time()) + 3600, "watch": ["*"]}
        payload = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
        tampered = await client.request("auth", {"token": f"{header}.{payload}.{signature}"})
        assert tampered["error"]["message"] == "token signature is invalid"
        assert failed(await client.request("auth", {"token": "not.a.jwt"})) == "UNAUTHORIZED"
        assert failed(await client.request("auth", {})) == "UNAUTHORIZED"
        assert await client.closed() == 4001


@pytest_twisted.ensureDeferred
async def test_a_good_token_outlives_the_auth_timeout_and_is_closed_when_it_expires(
    secret_file: Path,
) -> None:
    async with protected(secret_file, "--auth-timeout", "0.5") as running:
        good = await running.client()
        lasting = token(3600, sub="dispatch", watch=("*",))
        ack = await good.request("auth", {"token": lasting})
        assert ack["subject"] == "dispatch"
        assert abs(ack["expiresAt"] - (now_ms() + 3_600_000)) < 5000
        short = await running.client()
        # exp is in whole seconds: this one expires within the next 0.5-1.5 s.
        expiring = token(60, watch=("*",), issued=time.time() - 59.5)
        assert (await short.request("auth", {"token": expiring}))["success"] is True
        stranger = await running.client()
        assert await stranger.closed() == 4001  # the auth timeout has passed ...
        assert await short.closed() == 4001  # ... and so has the short token's expiry
        # ... and the long-lived token's connection is still serving.
        assert (await good.request("request:stats"))["success"] is True
        assert good.close_code is None


@pytest_twisted.ensureDeferred
async def test_token_in_the_url(secret_file: Path) -> None:
    async with protected(secret_file, "--auth-timeout", "0.5") as running:
        jwt = token(sub="tracker", vehicles=("truck_1",))
        tracker = await WSClient.connect(f"{running.ws_url}?token={jwt}")
        ack = await tracker.request("vehicle:telemetry", point("truck_1"))
        assert ack["accepted"] == 1
        bad = await WSClient.connect(f"{running.ws_url}?token={token(secret=OTHER_SECRET)}")
        assert await bad.closed() == 4001
        expired = token(60, issued=time.time() - 3600)
        late = await WSClient.connect(f"{running.ws_url}?token={expired}")
        assert await late.closed() == 4001
        stranger = await running.client()
        assert await stranger.closed() == 4001  # the auth timeout has passed
        assert (await tracker.request("request:stats"))["success"] is True


# Rights: publishing and watching


@pytest_twisted.ensureDeferred
async def test_publishing_as_another_vehicle_is_forbidden_for_that_point(
    secret_file: Path,
) -> None:
    async with protected(secret_file) as running:
        watcher = await signed_in(running, token(watch=("*",)))
        await watcher.request("subscribe:vehicle", {"vehicleId": "*"})
        tracker = await signed_in(running, token(sub="truck_1", vehicles=("truck_1",)))

        alone = await tracker.request("vehicle:telemetry", point("truck_2"))
        assert alone["error"]["code"] == "FORBIDDEN"
        assert alone["error"]["field"] == "vehicleId"
        tracker.send("vehicle:telemetry", point("truck_2"))
        assert (await tracker.event("error"))["code"] == "FORBIDDEN"

        mixed = [point("truck_1"), point("truck_2"), point("truck_1", speed=50)]
        ack = await tracker.request("vehicle:telemetry", mixed)
        assert ack["success"] is True
        assert ack["accepted"] + ack["stale"] == 2
        assert [(r["index"], r["code"], r["field"]) for r in ack["rejected"]] == [
            (1, "FORBIDDEN", "vehicleId")
        ]
        batch = await watcher.event("vehicle:telemetry:batch")
        assert vehicle_ids(batch) == ["truck_1"]
        stats = await watcher.request("request:stats", {"includeVehicleDetails": True})
        assert sorted(stats["vehicles"]) == ["truck_1"]
        assert stats["totalTelemetryRejected"] == 3


@pytest_twisted.ensureDeferred
async def test_subscribing_outside_watch_is_forbidden(secret_file: Path) -> None:
    async with protected(secret_file) as running:
        viewer = await signed_in(running, token(watch=("fleet-a-*", "bus_7")))
        ack = await viewer.request("subscribe:vehicle", {"vehicleId": "fleet-b-1"})
        assert ack["error"]["code"] == "FORBIDDEN"
        assert ack["error"]["field"] == "vehicleId"
        assert (await viewer.request("subscribe:vehicle", {"vehicleId": "fleet-a-1"}))["success"]
        assert (await viewer.request("subscribe:vehicle", {"vehicleId": "bus_7"}))["success"]
        assert failed(await viewer.request("subscribe:vehicle", {"vehicleId": "bus_8"})) == (
            "FORBIDDEN"
        )
        stats = await viewer.request("request:stats")
        assert stats["subscriptions"]["vehicleSubscriptions"] == {"fleet-a-1": 1, "bus_7": 1}


@pytest_twisted.ensureDeferred
async def test_wildcard_delivers_only_the_vehicles_each_token_may_watch(
    secret_file: Path,
) -> None:
    async with protected(secret_file) as running:
        publisher = await signed_in(running, token(vehicles=("*",)))
        await publisher.request("vehicle:telemetry", [point("fleet-a-0"), point("fleet-b-0")])
        restricted = await signed_in(running, token(watch=("fleet-a-*",)))
        everything = await signed_in(running, token(watch=("*",)))
        await restricted.request("subscribe:vehicle", {"vehicleId": "*"})
        await everything.request("subscribe:vehicle", {"vehicleId": "*"})
        # The snapshot at subscription is filtered too.
        assert vehicle_ids((await restricted.next(is_batch))["data"]) == ["fleet-a-0"]
        assert vehicle_ids((await everything.next(is_batch))["data"]) == [
            "fleet-a-0",
            "fleet-b-0",
        ]

        await publisher.request("vehicle:telemetry", [point("fleet-a-1"), point("fleet-b-1")])
        assert vehicle_ids(await restricted.event("vehicle:telemetry:batch")) == ["fleet-a-1"]
        assert vehicle_ids(await everything.event("vehicle:telemetry:batch")) == [
            "fleet-a-1",
            "fleet-b-1",
        ]
        # A batch of nothing it may watch never reaches the restricted viewer at all.
        await publisher.request("vehicle:telemetry", point("fleet-b-2"))
        assert vehicle_ids(await everything.event("vehicle:telemetry:batch")) == ["fleet-b-2"]
        await publisher.request("vehicle:telemetry", point("fleet-a-2"))
        assert vehicle_ids(await everything.event("vehicle:telemetry:batch")) == ["fleet-a-2"]
        assert vehicle_ids(await restricted.event("vehicle:telemetry:batch")) == ["fleet-a-2"]
        assert [m for m in restricted.inbox if is_batch(m)] == []


@pytest_twisted.ensureDeferred
async def test_operator_tokens_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_path = tmp_path / "secret"
    assert cli(["gen-secret", "--output", str(secret_path)]) == 0
    argv = ["token", "--secret-file", str(secret_path), "--sub", "dispatch", "--ttl", "12h"]
    assert cli([*argv, "--watch", "fleet-a-*"]) == 0
    dispatch_token = capsys.readouterr().out.strip()
    assert cli([*argv, "--vehicles", "fleet-a-1"]) == 0
    tracker_token = capsys.readouterr().out.strip()
    async with serving("--auth-secret-file", str(secret_path)) as running:
        dispatch = await running.client()
        ack = await dispatch.request("auth", {"token": dispatch_token})
        assert ack["subject"] == "dispatch"
        assert abs(ack["expiresAt"] - (now_ms() + 12 * 3_600_000)) < 5000
        assert (await dispatch.request("subscribe:vehicle", {"vehicleId": "fleet-a-1"}))["success"]
        assert failed(await dispatch.request("subscribe:vehicle", {"vehicleId": "fleet-b-1"})) == (
            "FORBIDDEN"
        )
        # It may watch, not publish.
        assert failed(await dispatch.request("vehicle:telemetry", point("fleet-a-1"))) == (
            "FORBIDDEN"
        )
        tracker = await WSClient.connect(f"{running.ws_url}?token={tracker_token}")
        assert (await tracker.request("vehicle:telemetry", point("fleet-a-1")))["accepted"] == 1
        assert vehicle_ids(await dispatch.event("vehicle:telemetry:batch")) == ["fleet-a-1"]
        # A token minted with another secret is worthless here.
        wrong = await running.client()
        forged = mint_token(SECRET, "dispatch", 3600, watch=["*"])
        assert failed(await wrong.request("auth", {"token": forged})) == "UNAUTHORIZED"


@pytest_twisted.ensureDeferred
async def test_open_server_logs_a_warning_and_a_protected_one_does_not(
    secret_file: Path,
) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        async with serving() as running:
            client = await running.client()
            assert (await client.request("auth", {"token": "ignored"}))["subject"] == "anonymous"
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
        assert any("authentication is off" in e["log_format"] for e in warnings), warnings
        events.clear()
        async with protected(secret_file):
            pass
        assert not any("authentication is off" in e.get("log_format", "") for e in events)
    finally:
        globalLogPublisher.removeObserver(events.append)


# Origins and the connection gate


@pytest_twisted.ensureDeferred
async def test_foreign_origin_is_refused_403_before_any_websocket_state() -> None:
    async with serving("--allowed-origin", ALLOWED) as running:
        code, headers, body = await fetch(
            running.http_url("/ws"), {**HANDSHAKE, b"Origin": FOREIGN.encode()}
        )
        assert code == 403
        assert headers.getRawHeaders(b"content-type") == [b"application/json"]
        assert orjson.loads(body)["error"]["code"] == "FORBIDDEN_ORIGIN"
        with pytest.raises(ConnectionError):
            await WSClient.connect(running.ws_url, headers={"Origin": FOREIGN})
        # A near miss is foreign too: the match is exact, port included.
        with pytest.raises(ConnectionError):
            await WSClient.connect(running.ws_url, headers={"Origin": ALLOWED + ":8443"})
        assert running.hub.viewers == set()
        browser = await WSClient.connect(running.ws_url, headers={"Origin": ALLOWED})
        tool = await running.client()  # no Origin: not a browser, not refused
        stats = await browser.request("request:stats")
        assert stats["connectedClients"] == 2
        assert (await tool.request("request:stats"))["success"] is True


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_the_one_over_with_503() -> None:
    async with serving("--max-connections", "2") as running:
        attempts = [WSClient.connect(running.ws_url) for _ in range(3)]
        results = await DeferredList(
            [Deferred.fromCoroutine(a) for a in attempts], consumeErrors=True
        )
        connected = [value for ok, value in results if ok]
        refused = [value for ok, value in results if not ok]
        assert len(connected) == 2
        assert len(refused) == 1
        assert refused[0].check(ConnectionError)

        code, headers, body = await fetch(running.http_url("/ws"), HANDSHAKE)
        assert code == 503
        assert headers.getRawHeaders(b"retry-after") == [b"5"]
        assert orjson.loads(body)["error"]["code"] == "SERVER_FULL"
        assert len(running.hub.viewers) == 2

        gone = next_disconnect(running.hub)
        connected[0].disconnect()
        await gone
        again = await running.client()
        assert (await again.request("request:stats"))["connectedClients"] == 2


# Message size


def padded(size: int) -> bytes:
    """A request:stats message of exactly ``size`` bytes."""
    frame = b'{"event":"request:stats","ack":1,"pad":"%s"}'
    return frame % (b"x" * (size - len(frame % b"")))


@pytest_twisted.ensureDeferred
async def test_a_message_over_64_kib_closes_1009_and_others_are_served(
    server: RunningServer,
) -> None:
    bystander = await server.client()
    largest = await server.client()
    largest.send_raw(padded(64 * 1024))
    assert (await largest.next(lambda m: m.get("ack") == 1))["data"]["success"] is True
    oversized = await server.client()
    oversized.send_raw(padded(64 * 1024 + 1))
    assert await oversized.closed() == 1009
    # Fragments add up: a message over the limit in small frames is refused too.
    fragmented = await server.client()
    assert fragmented.protocol is not None
    fragmented.protocol.sendMessage(padded(70_000), fragmentSize=16 * 1024)
    assert await fragmented.closed() == 1009
    assert (await bystander.request("request:stats"))["connectedClients"] == 2
    assert largest.close_code is None


@pytest_twisted.ensureDeferred
async def test_max_message_size_option() -> None:
    async with serving("--max-message-size", "2048") as running:
        client = await running.client()
        client.send_raw(padded(2049))
        assert await client.closed() == 1009


# Rates and counts


@pytest_twisted.ensureDeferred
async def test_rate_limited_once_the_burst_is_spent() -> None:
    async with serving("--rate-limit", "1", "--rate-burst", "3") as running:
        client = await running.client()
        for ack in range(1, 6):
            client.send("request:stats", None, ack)
        client.send("request:stats")
        answers = [await client.next(lambda m, a=a: m.get("ack") == a) for a in range(1, 6)]
        assert [a["data"]["success"] for a in answers] == [True, True, True, False, False]
        error = answers[3]["data"]["error"]
        assert error["code"] == "RATE_LIMITED"
        assert "1 messages per second" in error["message"]
        assert (await client.event("error"))["code"] == "RATE_LIMITED"
        # The limit is per connection.
        other = await running.client()
        assert (await other.request("request:stats"))["success"] is True
        assert client.close_code is None


@pytest_twisted.ensureDeferred
async def test_subscription_limit() -> None:
    async with serving("--max-subscriptions", "2") as running:
        viewer = await running.client()
        assert (await viewer.request("subscribe:vehicle", {"vehicleId": "a"}))["success"]
        assert (await viewer.request("subscribe:vehicle", {"vehicleId": "*"}))["success"]
        over = await viewer.request("subscribe:vehicle", {"vehicleId": "b"})
        assert over["error"]["code"] == "SUBSCRIPTION_LIMIT"
        assert over["error"]["field"] == "vehicleId"
        again = await viewer.request("subscribe:vehicle", {"vehicleId": "a"})
        assert again["alreadySubscribed"] is True
        await viewer.request("unsubscribe:vehicle", {"vehicleId": "a"})
        assert (await viewer.request("subscribe:vehicle", {"vehicleId": "b"}))["success"]


@pytest_twisted.ensureDeferred
async def test_points_per_second_through_arrays() -> None:
    async with serving("--max-points-per-second", "10") as running:
        gateway = await running.client()
        base = now_ms()
        ack = await gateway.request(
            "vehicle:telemetry", [point(f"g{i}", timestamp=base) for i in range(10)]
        )
        assert ack["accepted"] == 10
        over = await gateway.request("vehicle:telemetry", [point("g0", timestamp=base + 1)] * 5)
        assert over["error"]["code"] == "RATE_LIMITED"
        assert over["error"]["field"] == "data"
        too_big = [point(f"g{i}", timestamp=base + 2) for i in range(11)]
        assert failed(await gateway.request("vehicle:telemetry", too_big)) == "RATE_LIMITED"
        # One point at a time is not gateway traffic.
        ack = await gateway.request("vehicle:telemetry", point("g0", timestamp=base + 3))
        assert ack["accepted"] == 1
        stats = await gateway.request("request:stats")
        assert stats["totalTelemetryReceived"] == 11


# Slow viewers


@pytest_twisted.ensureDeferred
async def test_a_viewer_that_never_reads_is_held_then_dropped_while_others_keep_up() -> None:
    async with serving(
        "--slow-viewer-timeout",
        "0.5",
        "--max-points-per-second",
        "1000000",
        "--rate-limit",
        "1000",
        "--rate-burst",
        "1000",
    ) as running:
        hub = running.hub
        slow = await running.client()
        good = await running.client()
        publisher = await running.client()
        await slow.request("subscribe:vehicle", {"vehicleId": "*"})
        await good.request("subscribe:vehicle", {"vehicleId": "*"})
        assert slow.protocol is not None
        slow.protocol.transport.pauseProducing()  # stop reading from the socket

        base = now_ms()
        held_from: int | None = None
        buffered_when_held = 0
        latencies: list[float] = []
        for n in range(400):
            # About 50 KB a batch: the server's buffers fill within a few dozen.
            fat = [point(f"fat_{i}", timestamp=base + n, note="x" * 1500) for i in range(30)]
            sent = time.monotonic()
            ack = await publisher.request("vehicle:telemetry", fat)
            assert ack["accepted"] == 30
            batch = await good.event("vehicle:telemetry:batch")
            latencies.append(time.monotonic() - sent)
            assert {p["timestamp"] for p in batch["dataPoints"]} == {base + n}
            if held_from is None and hub.holding:
                held_from = n
                stats = await good.request("request:stats")
                assert stats["batcher"]["pendingBatches"] == 1
                buffered_when_held = server_buffered(hub)
            if hub.slow_viewers_dropped:
                break
        else:
            raise AssertionError(f"the slow viewer was never dropped (held from {held_from})")
        assert held_from is not None
        # Once it was held, nothing more was queued for it but the close frame.
        assert n > held_from
        assert 0 <= server_buffered(hub) - buffered_when_held <= 2 + 2 + 123
        stats = await good.request("request:stats")
        assert stats["slowViewersDropped"] == 1
        # The others kept their pace: a batch every 50 ms, not stuck behind the slow one.
        assert max(latencies) < 1.0
        slow.protocol.transport.resumeProducing()
        assert await slow.closed() == 1008
        assert good.close_code is None


def server_buffered(hub: Hub) -> int:
    """Bytes the server has queued but not yet handed to the kernel, for held viewers."""
    total = 0
    for viewer in hub.holding:
        transport = viewer.connection.transport  # type: ignore[attr-defined]
        total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return total
