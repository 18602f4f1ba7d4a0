"""Plausible vehicle movement for the simulator: pure model code, no reactor, no I/O.

A :class:`VehicleModel` drives a street-grid-like route inside an :class:`Area`:
it heads for a waypoint a block or so away, turns at waypoints (left, right or
straight on, towards the centre when near the edge), slows for corners,
sometimes stops for a while, and cruises at a speed chosen per leg. Its state
is always physically consistent: each :meth:`VehicleModel.step` moves the
vehicle by its mean speed times ``dt`` along the mean of its old and new
heading (on a sphere), the heading turns at a bounded rate that shrinks with
speed, and the speed changes at bounded acceleration.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable
from typing import Any, Final

import attrs

#: Mean Earth radius (IUGG), metres.
EARTH_RADIUS_M: Final = 6_371_008.8
KMH: Final = 1 / 3.6
"""One km/h in m/s."""
#: ``step`` integrates in pieces no longer than this, so a late tick stays smooth.
MAX_STEP_S: Final = 1.0


def normalize_bearing(degrees: float) -> float:
    """``degrees`` folded into ``0 <= b < 360``."""
    folded = degrees % 360.0
    return 0.0 if folded >= 360.0 else folded


def bearing_difference(start: float, end: float) -> float:
    """Signed turn from heading ``start`` to ``end``, in ``(-180, 180]`` degrees."""
    diff = (end - start) % 360.0
    return diff - 360.0 if diff > 180.0 else diff


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle (haversine) distance in metres."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def initial_bearing(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, ``0 <= b < 360``."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dlambda = math.radians(lon2 - lon1)
    y = math.sin(dlambda) * math.cos(phi2)
    x = math.cos(phi1) * math.sin(phi2) - math.sin(phi1) * math.cos(phi2) * math.cos(dlambda)
    return normalize_bearing(math.degrees(math.atan2(y, x)))


def destination(lat: float, lon: float, bearing: float, distance: float) -> tuple[float, float]:
    """The point ``distance`` metres from ``(lat, lon)`` along the initial ``bearing``."""
    delta = distance / EARTH_RADIUS_M
    theta = math.radians(bearing)
    phi1, lambda1 = math.radians(lat), math.radians(lon)
    sin_phi2 = math.sin(phi1) * math.cos(delta) + math.cos(phi1) * math.sin(delta) * math.cos(theta)
    phi2 = math.asin(max(-1.0, min(1.0, sin_phi2)))
    lambda2 = lambda1 + math.atan2(
        math.sin(theta) * math.sin(delta) * math.cos(phi1),
        math.cos(delta) - math.sin(phi1) * sin_phi2,
    )
    lon2 = (math.degrees(lambda2) + 540.0) % 360.0 - 180.0
    return math.degrees(phi2), lon2


@attrs.frozen
class Area:
    """Where vehicles drive: a disc around a centre, with streets on a grid."""

    center_lat: float = attrs.field(
        validator=[attrs.validators.ge(-85.0), attrs.validators.le(85.0)]
    )
    center_lon: float = attrs.field(
        validator=[attrs.validators.ge(-180.0), attrs.validators.le(180.0)]
    )
    radius_m: float = attrs.field(validator=attrs.validators.gt(0.0))
    #: Heading of the street grid (degrees); streets run along it and across it.
    grid_bearing: float = 0.0

    def distance_from_center(self, lat: float, lon: float) -> float:
        return distance_m(self.center_lat, self.center_lon, lat, lon)

    def random_point(self, rng: random.Random, within: float = 1.0) -> tuple[float, float]:
        """A point uniformly distributed over the disc shrunk to ``within`` of the radius."""
        reach = self.radius_m * within * math.sqrt(rng.random())
        return destination(self.center_lat, self.center_lon, rng.uniform(0, 360), reach)


@attrs.frozen
class DrivingProfile:
    """The limits a vehicle drives within (SI units unless named otherwise)."""

    min_cruise_kmh: float = 20.0
    max_cruise_kmh: float = 80.0
    accel: float = 2.0
    """m/s², speeding up."""
    decel: float = 3.0
    """m/s², braking."""
    lateral_accel: float = 3.0
    """m/s² in a turn: the faster the vehicle, the slower it can turn."""
    max_turn_rate: float = 30.0
    """Degrees per second, at walking pace."""
    min_turn_radius: float = 5.0
    """m: no turning on the spot."""
    corner_kmh: float = 20.0
    """Speed for a turn of 60 degrees or more at a waypoint."""
    block_m: tuple[float, float] = (150.0, 800.0)
    stop_probability: float = 0.15
    """Chance of stopping (delivery, lights) at a waypoint."""
    dwell_s: tuple[float, float] = (2.0, 30.0)
    arrive_m: float = 15.0

    @property
    def max_speed_kmh(self) -> float:
        """No vehicle ever reports more than this."""
        return self.max_cruise_kmh

    def turn_rate(self, speed: float) -> float:
        """Degrees per second the vehicle can turn at ``speed`` m/s."""
        if speed <= 0.0:
            return 0.0
        return min(self.max_turn_rate, math.degrees(self.lateral_accel / speed))


DEFAULT_PROFILE: Final = DrivingProfile()


@attrs.define
class _Leg:
    lat: float
    lon: float
    heading: float
    """Street heading of the leg that ends at this waypoint."""
    stop: bool


class VehicleModel:
    """One simulated vehicle: call :meth:`step` as time passes, :meth:`point` to report."""

    def __init__(
        self,
        vehicle_id: str,
        area: Area,
        rng: random.Random,
        profile: DrivingProfile = DEFAULT_PROFILE,
    ) -> None:
        self.vehicle_id = vehicle_id
        self.area = area
        self.profile = profile
        self._rng = rng
        self.latitude, self.longitude = area.random_point(rng, within=0.9)
        street = normalize_bearing(area.grid_bearing + 90.0 * rng.randrange(4))
        self.bearing = street
        self._cruise = rng.uniform(profile.min_cruise_kmh, profile.max_cruise_kmh) * KMH
        self.speed = rng.uniform(0.0, self._cruise)
        """m/s"""
        self._dwell = 0.0
        self._legs = [self._next_leg(self.latitude, self.longitude, street)]
        self._legs.append(self._next_leg(self._legs[0].lat, self._legs[0].lon, street))
        self._leg_time_left = self._leg_allowance()
        self.odometer = 0.0
        """Metres driven, for tests and curiosity."""

    @classmethod
    def seeded(
        cls,
        vehicle_id: str,
        area: Area,
        seed: Hashable,
        profile: DrivingProfile = DEFAULT_PROFILE,
    ) -> VehicleModel:
        """A vehicle whose whole route follows from ``seed`` and its id (stable across runs)."""
        return cls(vehicle_id, area, random.Random(f"{seed}/{vehicle_id}"), profile)

    @property
    def speed_kmh(self) -> float:
        return self.speed / KMH

    @property
    def target(self) -> tuple[float, float]:
        """The waypoint the vehicle is heading for."""
        return self._legs[0].lat, self._legs[0].lon

    def _next_leg(self, lat: float, lon: float, heading: float) -> _Leg:
        """The waypoint after ``(lat, lon)``: a block ahead, left or right, inside the area."""
        rng, area = self._rng, self.area
        shortest, longest = self.profile.block_m
        longest = min(longest, area.radius_m / 2)
        length = rng.uniform(min(shortest, longest / 2), longest)
        turns = [0.0, 0.0, -90.0, 90.0]
        rng.shuffle(turns)
        turns.append(180.0)  # A U-turn, only if every other way leaves the area.
        candidates = []
        for turn in turns:
            street = normalize_bearing(heading + turn + rng.uniform(-8.0, 8.0))
            end = destination(lat, lon, street, length)
            candidates.append((area.distance_from_center(*end), end, street))
        inside = [c for c in candidates if c[0] <= area.radius_m]
        _, (end_lat, end_lon), street = inside[0] if inside else min(candidates)
        return _Leg(end_lat, end_lon, street, rng.random() < self.profile.stop_probability)

    def _advance_leg(self) -> None:
        arrived = self._legs.pop(0)
        if arrived.stop:
            self._dwell = self._rng.uniform(*self.profile.dwell_s)
            self._cruise = (
                self._rng.uniform(self.profile.min_cruise_kmh, self.profile.max_cruise_kmh) * KMH
            )
        last = self._legs[-1]
        self._legs.append(self._next_leg(last.lat, last.lon, last.heading))
        self._leg_time_left = self._leg_allowance()

    def _leg_allowance(self) -> float:
        """Seconds after which a vehicle that has not reached its waypoint gives up on it."""
        leg = self._legs[0]
        length = distance_m(self.latitude, self.longitude, leg.lat, leg.lon)
        return 3 * length / (self.profile.min_cruise_kmh * KMH) + 60.0

    def _target_speed(self, to_target: float, heading_error: float) -> float:
        profile = self.profile
        target = self._cruise
        error = abs(heading_error)
        if error > 15.0:
            # Slow down to turn towards the target rather than circling it.
            target = max(profile.corner_kmh * KMH * 0.6, target * (1.0 - (error - 15.0) / 90.0))
        leg, following = self._legs[0], self._legs[1]
        if leg.stop:
            corner = 0.0
        elif abs(bearing_difference(leg.heading, following.heading)) >= 60.0:
            corner = profile.corner_kmh * KMH
        else:
            corner = target
        # Brake comfortably (half the maximum) so as to reach the waypoint at corner speed.
        approach = math.sqrt(corner * corner + profile.decel * max(0.0, to_target - 2.0))
        return max(0.0, min(target, approach))

    def step(self, dt: float) -> None:
        """Let ``dt`` seconds pass."""
        if dt < 0:
            raise ValueError("time only goes forward")
        while dt > 0:
            piece = min(dt, MAX_STEP_S)
            self._step(piece)
            dt -= piece

    def _step(self, dt: float) -> None:
        profile = self.profile
        if self._dwell > 0.0:
            # Stopping at a waypoint: brake to a halt straight ahead, then wait.
            v0 = self.speed
            self.speed = max(0.0, v0 - profile.decel * dt)
            self._move(self.bearing, (v0 + self.speed) / 2 * dt)
            if self.speed == 0.0:
                self._dwell -= dt
            return
        self._leg_time_left -= dt
        leg = self._legs[0]
        to_target = distance_m(self.latitude, self.longitude, leg.lat, leg.lon)
        if to_target <= max(profile.arrive_m, self.speed * dt) or self._leg_time_left < 0:
            self._advance_leg()
            if self._dwell > 0.0:
                self._step(dt)
                return
            leg = self._legs[0]
            to_target = distance_m(self.latitude, self.longitude, leg.lat, leg.lon)
        wanted = initial_bearing(self.latitude, self.longitude, leg.lat, leg.lon)
        error = bearing_difference(self.bearing, wanted)

        v0 = self.speed
        goal = self._target_speed(to_target, error)
        v1 = v0 + max(-profile.decel * dt, min(profile.accel * dt, goal - v0))
        v1 = max(0.0, min(profile.max_speed_kmh * KMH, v1))
        travelled = (v0 + v1) / 2 * dt
        # A vehicle turns only while it moves, and no tighter than its turning radius.
        limit = min(
            profile.turn_rate((v0 + v1) / 2) * dt,
            math.degrees(travelled / profile.min_turn_radius),
        )
        turn = max(-limit, min(limit, error))
        # Along the mean heading: the chord of the arc the vehicle drives.
        self._move(self.bearing + turn / 2, travelled)
        self.bearing = normalize_bearing(self.bearing + turn)
        self.speed = v1

    def _move(self, heading: float, distance: float) -> None:
        if distance > 0.0:
            self.latitude, self.longitude = destination(
                self.latitude, self.longitude, heading, distance
            )
            self.odometer += distance

    def point(self, now_ms: int) -> dict[str, Any]:
        """The telemetry object this vehicle sends at ``now_ms``, as the protocol has it."""
        return {
            "vehicleId": self.vehicle_id,
            "timestamp": now_ms,
            "latitude": round(self.latitude, 6),
            "longitude": round(self.longitude, 6),
            "speed": round(self.speed_kmh, 1),
            "bearing": normalize_bearing(round(self.bearing, 1)),
        }
