"""twistd plugin: ``twistd fleettrack``. Lazy, so listing plugins imports nothing of fleettrack."""

from twisted.application.service import ServiceMaker

fleettrack = ServiceMaker(
    "fleettrack",
    "fleettrack.service",
    "Real-time vehicle tracking: latest-only telemetry batches over WebSocket",
    "fleettrack",
)
