"""The daemon as users run it: twistd, its options, signals, TLS and the built wheel."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python import usage

from fleettrack.service import Options, _with_backlog
from tests.conftest import free_port, point, start_server
from tests.wsclient import TIMEOUT, WSClient

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


def twistd(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion; its output is stdout and stderr together."""
    return subprocess.run(
        [TWISTD, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )


def test_twistd_lists_the_plugin() -> None:
    listing = twistd("--help")
    assert listing.returncode == 0
    assert "fleettrack" in listing.stdout


def reactor_after(setup: str) -> str:
    """The reactor class a fresh process ends up with after ``setup``."""
    script = (
        f"{setup}\n"
        "from fleettrack.reactor import install_unless_chosen\n"
        "install_unless_chosen()\n"
        "from twisted.internet import reactor\n"
        "reactor.callWhenRunning(reactor.callLater, 0.01, reactor.stop)\n"
        "reactor.run()\n"
        "print(type(reactor).__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.strip()


def test_the_tracking_reactor_is_the_default_and_runs() -> None:
    assert reactor_after("") == "TrackingReactor"


def test_a_reactor_chosen_before_is_kept() -> None:
    setup = "from twisted.internet import pollreactor; pollreactor.install()"
    assert reactor_after(setup) == "PollReactor"


@pytest.mark.parametrize(
    ("arguments", "environ", "complaint"),
    [
        (["--batch-interval", "soon"], {}, "--batch-interval must be a number"),
        (["--batch-interval", "0"], {}, "--batch-interval must be between 10 and 60000"),
        (["--vehicle-ttl", "-5"], {}, "--vehicle-ttl must be between"),
        (["--listen", "carrier-pigeon:1"], {}, "--listen 'carrier-pigeon:1'"),
        (["--cors-origin", "dispatch.example"], {}, "--cors-origin must be *"),
        ([], {"FLEETTRACK_BATCH_INTERVAL_MS": "fast"}, "FLEETTRACK_BATCH_INTERVAL_MS must be"),
    ],
)
def test_invalid_configuration_stops_startup(
    arguments: list[str], environ: dict[str, str], complaint: str
) -> None:
    options = Options(environ=environ)
    with pytest.raises(usage.UsageError) as refused:
        options.parseOptions(arguments)
    assert complaint in str(refused.value)


def test_invalid_configuration_exits_non_zero_before_binding() -> None:
    port = free_port()
    result = twistd(
        "-n", "--pidfile=", "fleettrack", "--listen", f"tcp:{port}", "--batch-interval", "x"
    )
    assert result.returncode != 0
    assert "--batch-interval must be a number, not 'x'" in result.stdout


def test_a_port_in_use_stops_startup() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = twistd(
            "-n", "--pidfile=", "fleettrack", "--listen", f"tcp:{port}:interface=127.0.0.1"
        )
    assert result.returncode != 0
    assert "Address already in use" in result.stdout


def test_environment_fills_in_what_the_command_line_does_not_say() -> None:
    options = Options(
        environ={
            "FLEETTRACK_BATCH_INTERVAL_MS": "250",
            "FLEETTRACK_VEHICLE_TTL": "60",
            "FLEETTRACK_LISTEN": "tcp:4000 tcp:4001:interface=127.0.0.1",
            "FLEETTRACK_CORS_ORIGIN": "https://a.example https://b.example:8443",
            "FLEETTRACK_ENVIRONMENT": "staging",
        }
    )
    options.parseOptions(["--batch-interval", "500"])
    assert options["batch-interval"] == 500
    assert options["vehicle-ttl"] == 60
    assert options["listen"] == ["tcp:4000", "tcp:4001:interface=127.0.0.1"]
    assert options["cors-origin"] == ["https://a.example", "https://b.example:8443"]
    assert options["environment"] == "staging"
    defaults = Options(environ={})
    defaults.parseOptions([])
    assert (defaults["listen"], defaults["batch-interval"]) == (["tcp:3001"], 1000)


class DaemonProcess(protocol.ProcessProtocol):
    """twistd in a child process; fires ``started`` on its startup log line."""

    def __init__(self) -> None:
        self.output = b""
        self.started: Deferred[None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.started.called and b"fleettrack 0" in self.output and b"started" in self.output:
            self.started.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.ended.callback(getattr(reason, "value").exitCode)  # noqa: B009


@pytest_twisted.ensureDeferred
async def test_sigterm_delivers_the_final_batch_and_exits_cleanly() -> None:
    port = free_port()
    daemon = DaemonProcess()
    # A batch interval far longer than the test: only the shutdown flush can deliver.
    arguments = ["-n", "--pidfile=", "fleettrack", "--listen", f"tcp:{port}:interface=127.0.0.1"]
    arguments += ["--batch-interval", "60000"]
    transport = reactor.spawnProcess(daemon, TWISTD, [TWISTD, *arguments], env=dict(os.environ))
    daemon.started.addTimeout(TIMEOUT * 3, reactor)
    await daemon.started
    url = f"ws://127.0.0.1:{port}/ws"
    viewer = await WSClient.connect(url)
    vehicle = await WSClient.connect(url)
    await viewer.request("subscribe:vehicle", {"vehicleId": "last_1"})
    ack = await vehicle.request("vehicle:telemetry", point("last_1"))
    assert ack["accepted"] == 1

    started = reactor.seconds()
    transport.signalProcess("TERM")
    batch = await viewer.event("vehicle:telemetry:batch")
    assert [p["vehicleId"] for p in batch["dataPoints"]] == ["last_1"]
    assert await viewer.closed() == 1001
    daemon.ended.addTimeout(5, reactor)
    assert await daemon.ended == 0
    assert reactor.seconds() - started < 5
    log = daemon.output.decode()
    assert "reactor class: fleettrack.reactor.TrackingReactor" in log
    assert "connection opened" in log
    assert "connection closed" in log
    assert "fleettrack stopped" in log


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.ensureDeferred
async def test_tls_endpoint_serves_websocket(tmp_path: Path) -> None:
    key_path, cert_path = make_certificate(tmp_path)
    port = free_port()
    running = start_server(
        "--listen",
        f"ssl:{port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
    )
    try:
        trust = Certificate.loadPEM(cert_path.read_bytes())
        tls = optionsForClientTLS("localhost", trustRoot=trust)
        viewer = await WSClient.connect(f"wss://localhost:{port}/ws", tls)
        vehicle = await WSClient.connect(f"wss://localhost:{port}/ws", tls)
        await viewer.request("subscribe:vehicle", {"vehicleId": "secure_1"})
        await vehicle.request("vehicle:telemetry", point("secure_1"))
        batch = await viewer.event("vehicle:telemetry:batch")
        assert batch["dataPoints"][0]["vehicleId"] == "secure_1"
        assert viewer.protocol is not None
        assert viewer.protocol.transport.getPeerCertificate() is not None
    finally:
        await running.service.stopService()


def test_wheel_ships_the_plugin_and_no_twisted_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("fleettrack-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/fleettrack_plugin.py" in names
    assert "fleettrack/hub.py" in names
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]
    assert not [n for n in names if n.startswith("tests/")]


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:3001", "tcp:3001:backlog=4096"),
        ("tcp:3001:interface=127.0.0.1", "tcp:3001:interface=127.0.0.1:backlog=4096"),
        ("tcp:3001:backlog=10", "tcp:3001:backlog=10"),
        ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem:backlog=4096"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listening_sockets_get_a_deep_backlog(description: str, expected: str) -> None:
    # Twisted's default of 50 refuses a storm of clients reconnecting after a restart.
    assert _with_backlog(description) == expected
