"""The simulator: plausible, valid, reproducible routes, and a real run against the daemon."""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent, readBody

from fleettrack.service import Options, makeService
from fleettrack.sim import (
    GATEWAY_MAX_BYTES,
    GATEWAY_MAX_POINTS,
    MARK_END,
    MARK_START,
    SimConfig,
    Simulation,
    SimulationError,
    Summary,
    _gateway_frames,
    _percentile,
    parse_config,
    run,
)
from fleettrack.sim_routes import (
    Area,
    DrivingProfile,
    VehicleModel,
    bearing_difference,
    destination,
    distance_m,
    initial_bearing,
)
from fleettrack.telemetry import parse_point

NOW_MS = 1_767_225_600_000  # 2026-01-01
NEW_YORK = Area(40.7128, -74.006, 5000)
#: Positions are rounded to 1e-6 degrees on the wire: about 0.1 m.
ROUNDING_M = 0.5


def drive(model: VehicleModel, dt: float, steps: int) -> Iterator[dict[str, Any]]:
    """The points a vehicle reports every ``dt`` seconds."""
    for index in range(steps):
        model.step(dt)
        yield model.point(NOW_MS + int(index * dt * 1000))


# Geodesy


@pytest.mark.parametrize("lat,lon", [(40.7, -74.0), (-33.9, 18.4), (69.6, 18.9), (0.0, 179.99)])
@pytest.mark.parametrize("bearing", [0.0, 45.0, 90.0, 181.0, 359.5])
def test_destination_agrees_with_distance_and_bearing(
    lat: float, lon: float, bearing: float
) -> None:
    end = destination(lat, lon, bearing, 1234.5)
    assert distance_m(lat, lon, *end) == pytest.approx(1234.5, abs=1e-6)
    assert abs(bearing_difference(initial_bearing(lat, lon, *end), bearing)) < 1e-6
    assert -180 <= end[1] < 180


def test_bearing_difference_is_the_short_way_round() -> None:
    assert bearing_difference(350, 10) == pytest.approx(20)
    assert bearing_difference(10, 350) == pytest.approx(-20)
    assert bearing_difference(0, 180) == pytest.approx(180)


# The route model


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_point_passes_the_servers_validation(seed: int) -> None:
    for index in range(20):
        model = VehicleModel.seeded(f"veh-{index}", NEW_YORK, seed)
        for raw in drive(model, 0.5, 400):
            point = parse_point(raw, NOW_MS)
            assert point.to_wire() == raw
            assert point.speed is not None and point.bearing is not None
            assert 0 <= point.bearing < 360


@pytest.mark.parametrize("dt", [0.125, 1.0])
@pytest.mark.parametrize("seed", [11, 12])
def test_routes_are_continuous_and_physically_consistent(dt: float, seed: int) -> None:
    profile = DrivingProfile()
    moved = stopped = 0
    for index in range(10):
        model = VehicleModel.seeded(f"veh-{index}", NEW_YORK, seed, profile)
        previous = model.point(NOW_MS)
        for point in drive(model, dt, int(900 / dt)):
            step = distance_m(
                previous["latitude"], previous["longitude"], point["latitude"], point["longitude"]
            )
            fastest = max(previous["speed"], point["speed"]) / 3.6
            # Never further than the speed it reports allows.
            assert step <= fastest * dt + ROUNDING_M
            # Speed within limits, changing at most as fast as the vehicle can.
            assert 0 <= point["speed"] <= profile.max_speed_kmh
            change = (point["speed"] - previous["speed"]) / 3.6
            assert -profile.decel * dt - 0.05 <= change <= profile.accel * dt + 0.05
            # The heading turns smoothly.
            turn = bearing_difference(previous["bearing"], point["bearing"])
            assert abs(turn) <= profile.max_turn_rate * dt + 0.1
            if step > 1:
                # ...and the vehicle moves the way it is heading: along the chord of its turn,
                # give or take what rounding the position does to a short chord.
                slack = math.degrees(2 * ROUNDING_M / 3 / step) + 0.2
                travelled = initial_bearing(
                    previous["latitude"],
                    previous["longitude"],
                    point["latitude"],
                    point["longitude"],
                )
                assert abs(bearing_difference(previous["bearing"] + turn / 2, travelled)) < slack
                moved += 1
            if point["speed"] == 0:
                stopped += 1
            distance = NEW_YORK.distance_from_center(point["latitude"], point["longitude"])
            assert distance <= NEW_YORK.radius_m + 50
            previous = point
    assert moved > 0
    assert stopped > 0, "in a quarter of an hour some vehicle stops somewhere"


def test_exact_state_moves_along_the_mean_heading_by_the_mean_speed() -> None:
    model = VehicleModel.seeded("exact", NEW_YORK, 5)
    for _ in range(2000):
        lat, lon, bearing, speed = model.latitude, model.longitude, model.bearing, model.speed
        model.step(0.25)
        travelled = distance_m(lat, lon, model.latitude, model.longitude)
        assert travelled == pytest.approx((speed + model.speed) / 2 * 0.25, abs=1e-6)
        if travelled > 0.5:
            turn = bearing_difference(bearing, model.bearing)
            chord = initial_bearing(lat, lon, model.latitude, model.longitude)
            assert abs(bearing_difference(bearing + turn / 2, chord)) < 1e-4


def test_a_long_tick_is_integrated_in_short_steps() -> None:
    model = VehicleModel.seeded("late", NEW_YORK, 6)
    model.step(30.0)
    assert model.odometer <= 30.0 * model.profile.max_speed_kmh / 3.6
    with pytest.raises(ValueError):
        model.step(-1.0)


def test_traffic_is_plausible_over_an_hour() -> None:
    speeds: list[float] = []
    headings: set[int] = set()
    for index in range(5):
        model = VehicleModel.seeded(f"veh-{index}", NEW_YORK, 7)
        for point in drive(model, 1.0, 3600):
            speeds.append(point["speed"])
            headings.add(int(point["bearing"] // 45))
    mean = sum(speeds) / len(speeds)
    assert 10 < mean < 70
    assert len(headings) == 8, "vehicles turn every which way"


@pytest.mark.parametrize("radius_m", [300.0, 2000.0, 30000.0])
def test_vehicles_stay_in_their_area(radius_m: float) -> None:
    area = Area(-33.9249, 18.4241, radius_m)
    for index in range(10):
        model = VehicleModel.seeded(f"cpt-{index}", area, 8)
        for point in drive(model, 1.0, 1800):
            distance = area.distance_from_center(point["latitude"], point["longitude"])
            assert distance <= radius_m + 50


def test_routes_are_deterministic_with_a_seed() -> None:
    def route(seed: int, vehicle_id: str = "veh-1") -> list[dict[str, Any]]:
        return list(drive(VehicleModel.seeded(vehicle_id, NEW_YORK, seed), 0.5, 300))

    assert route(42) == route(42)
    assert route(42) != route(43)
    assert route(42) != route(42, "veh-2")


# Configuration and helpers


def test_configuration_from_the_command_line() -> None:
    config, quiet = parse_config(
        [
            "--url",
            "ws://127.0.0.1:9/ws",
            "--vehicles",
            "30",
            "--hz",
            "4",
            "--viewers",
            "3",
            "--subs",
            "all",
            "--center=-33.9,18.4",
            "--radius-km",
            "2",
            "--seed",
            "9",
            "--seconds",
            "0",
            "--quiet",
        ]
    )
    assert quiet
    assert (config.vehicles, config.hz, config.viewers, config.subs) == (30, 4.0, 3, "all")
    assert config.center == (-33.9, 18.4)
    assert (config.radius_km, config.seed, config.seconds) == (2.0, 9, 0.0)
    assert parse_config(["--subs", "7"])[0].subs == 7
    assert parse_config(["--subs", "*"])[0].subs == "*"


@pytest.mark.parametrize(
    "arguments",
    [["--subs", "some"], ["--hz", "0"], ["--center", "91,0"], ["--url", "http://x/ws"]],
)
def test_bad_options_are_usage_errors(arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_config(arguments)
    assert exit_.value.code == 2


def test_viewer_targets() -> None:
    ids = SimConfig(vehicles=10).vehicle_ids()
    assert ids[0] == "sim-0" and ids[9] == "sim-9"
    assert SimConfig(vehicles=1000).vehicle_ids()[7] == "sim-007"
    assert SimConfig(subs="*").targets(3, ids) == ["*"]
    assert SimConfig(subs="all").targets(3, ids) == ids
    some = SimConfig(subs=4).targets(3, ids)
    assert len(set(some)) == 4 and set(some) <= set(ids)
    assert SimConfig(subs=4).targets(4, ids) != some
    assert sorted(SimConfig(subs=50).targets(0, ids)) == sorted(ids)


def test_gateway_frames_respect_the_message_limits() -> None:
    model = VehicleModel.seeded("g", NEW_YORK, 1)
    encoded = [
        orjson.dumps({**model.point(NOW_MS), "vehicleId": f"gw-{index}"}) for index in range(2500)
    ]
    frames = list(_gateway_frames(encoded, iter(range(1, 100))))
    relayed = []
    for ack, count, frame in frames:
        assert len(frame) <= GATEWAY_MAX_BYTES
        message = orjson.loads(frame)
        assert message["event"] == "vehicle:telemetry" and message["ack"] == ack
        assert len(message["data"]) == count <= GATEWAY_MAX_POINTS
        relayed.extend(point["vehicleId"] for point in message["data"])
    assert relayed == [f"gw-{index}" for index in range(2500)]


def test_percentiles_are_nearest_rank() -> None:
    from collections import Counter

    histogram = Counter(range(1, 101))
    assert _percentile(histogram, 100, 0.5) == 50
    assert _percentile(histogram, 100, 0.99) == 99
    assert _percentile(histogram, 100, 1.0) == 100
    assert _percentile(Counter(), 0, 0.5) is None


# Against the real daemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest_twisted.async_yield_fixture
async def daemon() -> AsyncIterator[int]:
    port = free_port()
    options = Options(environ={})
    options.parseOptions(["--listen", f"tcp:{port}:interface=127.0.0.1", "--batch-interval", "100"])
    service = makeService(options)
    service.startService()
    yield port
    await service.stopService()


async def server_stats(port: int) -> dict[str, Any]:
    response = await Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/stats" % port)
    stats: dict[str, Any] = orjson.loads(await readBody(response))
    return stats["tracking"]


def check_clean_run(summary: Summary) -> None:
    assert summary.errors == {}, summary.errors
    assert summary.sent_points > 0
    assert summary.delivered > 0, "viewers received points"
    report = summary.as_dict()
    assert report["latencyMs"]["p50"] is not None
    assert report["errors"] == {"total": 0}
    orjson.dumps(report)


@pytest_twisted.ensureDeferred
async def test_simulated_vehicles_reach_subscribed_viewers(daemon: int) -> None:
    lines: list[str] = []
    config = SimConfig(
        url=f"ws://127.0.0.1:{daemon}/ws",
        vehicles=8,
        hz=10,
        viewers=3,
        subs=3,
        seconds=1.0,
        seed=1,
        ack=True,
    )
    summary = await run(config, status=lines.append)
    check_clean_run(summary)
    assert summary.connections["vehicles"] == 8 and summary.connections["viewers"] == 3
    assert summary.acks["accepted"] > 0 and "rejected" not in summary.acks
    assert any(line.startswith(MARK_START) for line in lines)
    assert any(line.startswith(MARK_END) for line in lines)
    stats = await server_stats(daemon)
    assert stats["activeVehicles"] == 8
    assert stats["totalTelemetryReceived"] >= summary.sent_points
    assert stats["connectedClients"] == 0, "the simulator closed every connection"


@pytest_twisted.ensureDeferred
async def test_gateways_relay_arrays_to_wildcard_viewers(daemon: int) -> None:
    config = SimConfig(
        url=f"ws://127.0.0.1:{daemon}/ws",
        vehicles=40,
        hz=5,
        gateways=2,
        viewers=2,
        subs="*",
        idle=3,
        seconds=1.0,
        seed=2,
        prefix="gw-",
    )
    summary = await run(config)
    check_clean_run(summary)
    assert summary.connections == {
        "opened": 7,
        "vehicles": 0,
        "gateways": 2,
        "viewers": 2,
        "idle": 3,
        "failed": 0,
    }
    assert summary.window.sent < summary.sent_points, "arrays carry several points"
    assert summary.acks["accepted"] > 0 and "rejected" not in summary.acks
    stats = await server_stats(daemon)
    assert stats["activeVehicles"] == 40
    assert stats["totalTelemetryReceived"] >= summary.sent_points


@pytest_twisted.ensureDeferred
async def test_a_run_without_a_time_limit_ends_when_stopped(daemon: int) -> None:
    simulation = Simulation(
        SimConfig(url=f"ws://127.0.0.1:{daemon}/ws", vehicles=2, hz=10, viewers=1, seconds=0)
    )
    reactor.callLater(0.5, simulation.stop)
    summary = await simulation.run()
    assert summary.errors == {}
    assert 0 < summary.seconds < 5
    await simulation.finish()


@pytest_twisted.ensureDeferred
async def test_the_command_line_stops_by_itself_and_prints_a_summary(daemon: int) -> None:
    started = time.monotonic()
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [
            "-m",
            "fleettrack.sim",
            "--url",
            f"ws://127.0.0.1:{daemon}/ws",
            "--vehicles",
            "5",
            "--hz",
            "5",
            "--viewers",
            "1",
            "--seconds",
            "1",
            "--seed",
            "3",
        ],
        env=dict(os.environ),
        reactor=reactor,
    )
    assert code == 0, err.decode()
    summary = orjson.loads(out)
    assert summary["seed"] == 3
    assert summary["sentPoints"] > 0 and summary["delivered"] > 0
    assert summary["errors"] == {"total": 0}
    assert MARK_START in err.decode() and MARK_END in err.decode()
    assert time.monotonic() - started < 30


@pytest_twisted.ensureDeferred
async def test_nothing_to_connect_to_is_an_error() -> None:
    config = SimConfig(url=f"ws://127.0.0.1:{free_port()}/ws", vehicles=1, seconds=1)
    simulation = Simulation(config)
    with pytest.raises(SimulationError):
        await simulation.run()
    assert simulation.errors["connect"] == 1


@pytest_twisted.async_yield_fixture
async def guarded_daemon(tmp_path: Path) -> AsyncIterator[tuple[int, bytes]]:
    """The daemon requiring HS256 tokens; yields its port and secret."""
    secret = b"s" * 48
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    port = free_port()
    options = Options(environ={})
    options.parseOptions(
        [
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--batch-interval",
            "100",
            "--auth-secret-file",
            str(secret_file),
        ]
    )
    service = makeService(options)
    service.startService()
    yield port, secret
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_token_authenticates_every_connection(guarded_daemon: tuple[int, bytes]) -> None:
    port, secret = guarded_daemon
    claims = {"sub": "sim", "exp": int(time.time()) + 600, "watch": ["*"], "vehicles": ["sim-*"]}
    config = SimConfig(
        url=f"ws://127.0.0.1:{port}/ws",
        vehicles=4,
        hz=10,
        viewers=2,
        subs=2,
        seconds=1.0,
        token=jwt.encode(claims, secret, algorithm="HS256"),
    )
    check_clean_run(await run(config))


@pytest_twisted.ensureDeferred
async def test_refusals_are_counted_not_fatal(guarded_daemon: tuple[int, bytes]) -> None:
    port, _ = guarded_daemon
    config = SimConfig(url=f"ws://127.0.0.1:{port}/ws", vehicles=2, hz=5, viewers=1, seconds=0.5)
    summary = await run(config)
    assert summary.delivered == 0
    assert summary.errors.get("subscribe:UNAUTHORIZED") == 1
    assert any(kind.startswith("server:UNAUTHORIZED") for kind in summary.errors)
