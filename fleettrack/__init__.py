"""fleettrack: real-time vehicle live tracking with latest-only batching."""

__version__ = "0.1.0"
