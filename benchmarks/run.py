"""``make bench``: the daemon's server-side cost under named workloads.

For each workload: start ``twistd fleettrack`` on a free loopback port, drive it
with ``fleettrack-sim`` in a separate process (so the client's CPU is not the
server's), and sample the daemon's CPU time (utime + stime from /proc/PID/stat)
and RSS exactly when the simulator's measurement window opens and closes (it
marks both on stderr). Prints a table and, last, one line of JSON.

    .venv/bin/python -m benchmarks.run                      # every workload
    .venv/bin/python -m benchmarks.run --workload fanout --seconds 20
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs

if __package__ in (None, ""):  # Run as a file: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Daemon, sim_command
from fleettrack.sim import MARK_END, MARK_START


@attrs.frozen
class Workload:
    name: str
    description: str
    #: The figure this workload exists to measure (a key of its result).
    primary: str
    vehicles: int = 0
    hz: float = 1.0
    gateways: int = 0
    viewers: int = 0
    subs: str = "*"
    idle: int = 0

    def sim_arguments(self) -> list[str]:
        arguments = ["--vehicles", str(self.vehicles), "--hz", f"{self.hz:g}"]
        arguments += ["--gateways", str(self.gateways), "--idle", str(self.idle)]
        arguments += ["--viewers", str(self.viewers), "--subs", self.subs]
        return arguments

    @property
    def connections(self) -> int:
        return (self.gateways or self.vehicles) + self.viewers + self.idle

    def expected_delivered_per_second(self, batch_interval_ms: int) -> float:
        """Points the viewers should get per second if nothing is lost (latest-only)."""
        watched = self.vehicles if self.subs in ("all", "*") else min(int(self.subs), self.vehicles)
        return self.viewers * watched * min(self.hz, 1000 / batch_interval_ms)


WORKLOADS = {
    workload.name: workload
    for workload in [
        Workload(
            "ingest",
            "1000 vehicles x 8 Hz, 20 viewers x 50",
            "usPerMessage",
            vehicles=1000,
            hz=8,
            viewers=20,
            subs="50",
        ),
        Workload(
            "fanout",
            "200 vehicles x 1 Hz, 1000 viewers x all",
            "usPerDeliveredPoint",
            vehicles=200,
            hz=1,
            viewers=1000,
            subs="all",
        ),
        Workload(
            "gateway",
            "2000 vehicles x 2 Hz through 4 gateways, 10 viewers x 100",
            "usPerPointIn",
            vehicles=2000,
            hz=2,
            gateways=4,
            viewers=10,
            subs="100",
        ),
        Workload("idle", "2000 idle connections", "kbPerConnection", idle=2000),
    ]
}


def _round(value: float | None, digits: int = 2) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def run_workload(
    workload: Workload, seconds: float, warmup: float, batch_interval_ms: int, echo: bool
) -> dict[str, Any]:
    """One workload against a fresh daemon; the figures as a dict."""
    daemon = Daemon(batch_interval_ms)
    daemon.start()
    samples: dict[str, tuple[float, float, int]] = {}
    try:
        base_rss = daemon.rss_bytes()
        command = [*sim_command(), "--url", daemon.url, *workload.sim_arguments()]
        command += ["--seconds", f"{seconds:g}", "--warmup", f"{warmup:g}", "--seed", "1"]
        sim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # However the simulator fares, it does not get to hang the benchmark.
        watchdog = threading.Timer(seconds + warmup + 180, sim.kill)
        watchdog.start()
        try:
            assert sim.stderr is not None and sim.stdout is not None
            for line in sim.stderr:
                if line.startswith((MARK_START, MARK_END)):
                    mark = "start" if line.startswith(MARK_START) else "end"
                    samples[mark] = (time.monotonic(), daemon.cpu_seconds(), daemon.rss_bytes())
                if echo:
                    sys.stderr.write(f"{workload.name:>8} {line}")
            output = sim.stdout.read()
            code = sim.wait()
        finally:
            watchdog.cancel()
        stats = daemon.get("/stats")["tracking"]
    finally:
        exit_code = daemon.stop()
    if code != 0 or "start" not in samples or "end" not in samples:
        raise RuntimeError(f"{workload.name}: the simulator failed (exit status {code})")
    summary = json.loads(output)
    (t0, cpu0, _), (t1, cpu1, rss1) = samples["start"], samples["end"]
    cpu = cpu1 - cpu0
    window = t1 - t0
    sent, points, delivered = summary["sent"], summary["sentPoints"], summary["delivered"]
    expected = workload.expected_delivered_per_second(batch_interval_ms)
    opened = summary["connections"]["opened"] or 1
    result = {
        "description": workload.description,
        "seconds": round(window, 2),
        "connections": summary["connections"]["opened"],
        "sentPerSec": summary["sentPerSec"],
        "sentPointsPerSec": summary["sentPointsPerSec"],
        "deliveredPerSec": summary["deliveredPerSec"],
        "deliveredRatio": _round(summary["deliveredPerSec"] / expected, 3) if expected else None,
        "serverCpuSec": round(cpu, 2),
        "serverCpuPercent": round(100 * cpu / window, 1),
        "usPerMessage": _round(1e6 * cpu / sent) if sent else None,
        "usPerPointIn": _round(1e6 * cpu / points) if points else None,
        "usPerDeliveredPoint": _round(1e6 * cpu / delivered, 3) if delivered else None,
        "latencyMs": summary["latencyMs"],
        "rssBaseMb": round(base_rss / 2**20, 1),
        "rssMb": round(rss1 / 2**20, 1),
        "kbPerConnection": round((rss1 - base_rss) / 1024 / opened, 2),
        "clientCpuPercent": summary.get("clientCpuPercent"),
        "errors": summary["errors"]["total"],
        "serverStats": {
            "totalTelemetryReceived": stats["totalTelemetryReceived"],
            "totalTelemetryRejected": stats["totalTelemetryRejected"],
            "staleDropped": stats["batcher"]["staleDropped"],
        },
        "daemonExitCode": exit_code,
    }
    result["primary"] = {"metric": workload.primary, "value": result[workload.primary]}
    return result


def loopback_floor(messages: int = 50_000, size: int = 150) -> dict[str, float]:
    """What the kernel alone costs per small message on loopback (CPU per write and per read)."""
    listener = socket.create_server(("127.0.0.1", 0))
    writer = socket.create_connection(listener.getsockname())
    reader, _ = listener.accept()
    listener.close()
    writer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * size
    cpu: dict[str, float] = {}

    def write() -> None:
        started = time.thread_time()
        for _ in range(messages):
            writer.sendall(payload)
        cpu["write"] = time.thread_time() - started

    def read() -> None:
        started, remaining, reads = time.thread_time(), messages * size, 0
        while remaining:
            remaining -= len(reader.recv(min(remaining, size)))
            reads += 1
        cpu["read"] = time.thread_time() - started
        cpu["reads"] = reads

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    reader.close()
    return {
        "messageBytes": size,
        "usPerWrite": round(1e6 * cpu["write"] / messages, 2),
        "usPerRead": round(1e6 * cpu["read"] / cpu["reads"], 2),
    }


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: dict[str, dict[str, Any]]) -> str:
    header = [
        "workload",
        "conns",
        "msg/s in",
        "pts/s in",
        "pts/s out",
        "out/expected",
        "server CPU %",
        "us/msg",
        "us/pt in",
        "us/pt out",
        "p50 ms",
        "p99 ms",
        "KB/conn",
        "client CPU %",
        "errors",
    ]
    rows = [header]
    for name, result in results.items():
        latency = result["latencyMs"]
        rows.append(
            [
                name,
                _cell(result["connections"]),
                _cell(result["sentPerSec"], 0),
                _cell(result["sentPointsPerSec"], 0),
                _cell(result["deliveredPerSec"], 0),
                _cell(result["deliveredRatio"], 3),
                _cell(result["serverCpuPercent"]),
                _cell(result["usPerMessage"]),
                _cell(result["usPerPointIn"]),
                _cell(result["usPerDeliveredPoint"], 3),
                _cell(latency["p50"]),
                _cell(latency["p99"]),
                _cell(result["kbPerConnection"]),
                _cell(result["clientCpuPercent"]),
                _cell(result["errors"]),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks.run",
        description="Server-side cost of fleettrack under named workloads.",
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=[*WORKLOADS, "floor", "all"],
        help="run this workload (repeatable; default: all of them, and the loopback floor)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before measuring (2)")
    parser.add_argument("--batch-interval", type=int, default=1000, help="daemon's, in ms (1000)")
    parser.add_argument("--json", type=Path, help="also write the JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="do not echo the simulator's status")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = args.workload or ["all"]
    names = [*WORKLOADS, "floor"] if "all" in chosen else list(dict.fromkeys(chosen))
    results: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {
        "batchIntervalMs": args.batch_interval,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "workloads": results,
    }
    failed = False
    for name in names:
        if name == "floor":
            report["loopbackFloor"] = loopback_floor()
            continue
        workload = WORKLOADS[name]
        sys.stderr.write(f"== {name}: {workload.description}\n")
        try:
            results[name] = run_workload(
                workload, args.seconds, args.warmup, args.batch_interval, not args.quiet
            )
        except RuntimeError as error:
            sys.stderr.write(f"{error}\n")
            failed = True
    if results:
        sys.stdout.write(table(results) + "\n")
    if "loopbackFloor" in report:
        floor = report["loopbackFloor"]
        sys.stdout.write(
            f"loopback floor ({floor['messageBytes']}-byte messages): "
            f"{floor['usPerWrite']} us per write, {floor['usPerRead']} us per read\n"
        )
    encoded = json.dumps(report)
    sys.stdout.write(encoded + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
