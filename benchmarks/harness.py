"""Running the daemon and the simulator as separate processes, and watching the daemon's cost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
_BIN = Path(sys.executable).parent
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _script(name: str, module: str) -> list[str]:
    """The console script next to this Python (same venv), else ``python -m module``."""
    beside = _BIN / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def sim_command() -> list[str]:
    return _script("fleettrack-sim", "fleettrack.sim")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


class Daemon:
    """``twistd -n fleettrack`` on a loopback port, in its own session (Ctrl-C stays with us)."""

    def __init__(self, batch_interval_ms: int = 1000, port: int | None = None) -> None:
        self.port = port or free_port()
        self.batch_interval_ms = batch_interval_ms
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fleettrack-{self.port}.log"
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> None:
        twistd = _BIN / "twistd"
        command = (
            [str(twistd)]
            if twistd.exists()
            else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        )
        command += [
            "--nodaemon",
            "--pidfile=",
            "fleettrack",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--batch-interval",
            str(self.batch_interval_ms),
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the daemon exited at startup; see {self.log_path}")
            try:
                serving = self.get("/stats")["server"]["pid"]
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the daemon did not answer; see {self.log_path}") from None
                time.sleep(0.1)
                continue
            if serving != self.process.pid:
                # The daemon keeps running when it cannot bind; someone else answered.
                self.stop()
                raise RuntimeError(f"port {self.port} is served by another process ({serving})")
            return

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.pid)

    def stop(self) -> int | None:
        """SIGTERM, as an operator would; returns the exit status."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            code = process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
