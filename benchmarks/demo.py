"""``make demo``: the daemon and the simulator together, so a newcomer sees vehicles move.

Starts ``twistd fleettrack`` on port 3001 (loopback) and ``fleettrack-sim`` with
50 vehicles and 2 viewers; the status line shows a few vehicles as a viewer
sees them. Meanwhile ``curl localhost:3001/stats`` shows the daemon's side.
Ctrl-C stops the simulator (which prints its summary), then the daemon.

    .venv/bin/python -m benchmarks.demo [--port 3001] [--vehicles 50] [--seconds 0]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # Run as a file: python benchmarks/demo.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Daemon, port_is_free, sim_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=3001, help="daemon port (3001)")
    parser.add_argument("--vehicles", type=int, default=50, help="simulated vehicles (50)")
    parser.add_argument("--viewers", type=int, default=2, help="viewers watching '*' (2)")
    parser.add_argument("--hz", type=float, default=1.0, help="reports per vehicle per second (1)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this; 0: Ctrl-C")
    args = parser.parse_args(argv)
    if not port_is_free(args.port):
        sys.stderr.write(
            f"port {args.port} is taken (is `make serve` running?): stop it or pass --port\n"
        )
        return 1
    daemon = Daemon(batch_interval_ms=1000, port=args.port)
    try:
        daemon.start()
    except RuntimeError as error:
        sys.stderr.write(f"{error}\n")
        return 1
    sys.stderr.write(
        f"fleettrack is running on http://127.0.0.1:{args.port} (log: {daemon.log_path}).\n"
        f"In another terminal:  curl -s localhost:{args.port}/stats | python3 -m json.tool\n"
        "Ctrl-C to stop.\n\n"
    )
    command = [*sim_command(), "--url", daemon.url, "--vehicles", str(args.vehicles)]
    command += ["--hz", f"{args.hz:g}", "--viewers", str(args.viewers), "--subs", "*"]
    command += ["--seconds", f"{args.seconds:g}", "--show", "3", "--radius-km", "3"]
    simulator = subprocess.Popen(command)

    def terminate(signum: int, frame: object) -> None:
        simulator.terminate()  # The simulator stops cleanly on SIGTERM as on Ctrl-C.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        code = simulator.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the simulator too: it closes its connections and prints its summary.
        try:
            code = simulator.wait(timeout=15)
        except subprocess.TimeoutExpired:
            simulator.kill()
            code = simulator.wait()
    finally:
        daemon.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
