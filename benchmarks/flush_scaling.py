"""How the cost of one flush grows with vehicles, viewers and subscriptions.

In-process, on the real Hub with a task.Clock; viewers are stubs that take
their batch and do nothing, so the figures are the hub's own work per flush:
selecting each audience's points, encoding each point once and building one
batch per distinct subscription set. Run: ``.venv/bin/python -m benchmarks.flush_scaling``.
"""

from __future__ import annotations

import random
import time

from twisted.internet.task import Clock

from fleettrack.hub import Batch, Hub
from fleettrack.telemetry import TelemetryPoint

EPOCH = 1_764_780_000.0


class StubViewer:
    def deliver(self, batch: Batch) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


def flush_ms(vehicles: int, viewers: int, subs: int | str, distinct_sets: int) -> float:
    """Milliseconds for one flush in which every vehicle moved (median of 5)."""
    clock = Clock()
    clock.advance(EPOCH)
    hub = Hub(clock, 1.0, 86400.0)
    chooser = random.Random(7)
    sets = [
        ["*"] if subs == "all" else chooser.sample(range(vehicles), int(subs))
        for _ in range(distinct_sets)
    ]
    for index in range(viewers):
        viewer = StubViewer()
        hub.connect(viewer)
        for vehicle in sets[index % distinct_sets]:
            hub.subscribe(viewer, vehicle if vehicle == "*" else f"v{vehicle}")
    timings = []
    for round_ in range(5):
        for number in range(vehicles):
            hub.ingest(
                TelemetryPoint(f"v{number}", int(EPOCH * 1000) + round_, 40.1, -74.0, 50.0, 90.0)
            )
        started = time.perf_counter()
        hub.flush()
        hub._send(len(hub._outbox))  # everything, as if every turn ran at once
        timings.append(time.perf_counter() - started)
    return sorted(timings)[2] * 1000


def main() -> None:
    cases = [
        # vehicles, viewers, subscriptions each, distinct subscription sets
        *((v, 1000, "all", 1) for v in (100, 1000, 10000)),
        *((1000, n, "all", 1) for n in (100, 1000, 10000)),
        *((1000, 1000, k, 1) for k in (10, 100, 1000)),
        *((1000, 1000, 50, d) for d in (1, 10, 100)),
    ]
    print(f"{'vehicles':>8} {'viewers':>8} {'subs':>6} {'sets':>5} {'flush ms':>9}")
    for vehicles, viewers, subs, sets in cases:
        ms = flush_ms(vehicles, viewers, subs, sets)
        print(f"{vehicles:>8} {viewers:>8} {subs!s:>6} {sets:>5} {ms:>9.2f}")


if __name__ == "__main__":
    main()
