"""``twistd fleettrack``: options, and the service tree they build."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, ClassVar, Final

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

import twisted
from fleettrack import __version__
from fleettrack.hub import Hub
from fleettrack.web import build_site
from fleettrack.websocket import TrackingServerFactory

#: Seconds that closing WebSockets may take at shutdown before the process goes anyway.
SHUTDOWN_GRACE: Final = 3.0
GOING_AWAY: Final = 1001

_ORIGIN = re.compile(r"\*|https?://[^/\s:]+(:\d{1,5})?")


def _number(source: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"{source} must be a number, not {text!r}") from None
    if not low <= value <= high:
        raise usage.UsageError(f"{source} must be between {low:g} and {high:g}, not {text}")
    return value


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Real-time vehicle tracking. Every option can also be set through the environment "
        "variable named beside it; the command line wins."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        [
            "batch-interval",
            None,
            None,
            "Batch interval in ms, 10-60000 [FLEETTRACK_BATCH_INTERVAL_MS]",
        ],
        [
            "vehicle-ttl",
            None,
            None,
            "Seconds a silent vehicle's point is kept [FLEETTRACK_VEHICLE_TTL]",
        ],
        ["environment", None, None, "Deployment name shown in /stats [FLEETTRACK_ENVIRONMENT]"],
    ]
    #: Option -> (environment variable, default).
    ENVIRONMENT: Final[Mapping[str, tuple[str, str]]] = {
        "batch-interval": ("FLEETTRACK_BATCH_INTERVAL_MS", "1000"),
        "vehicle-ttl": ("FLEETTRACK_VEHICLE_TTL", "86400"),
        "environment": ("FLEETTRACK_ENVIRONMENT", "production"),
        "listen": ("FLEETTRACK_LISTEN", "tcp:3001"),
        "cors-origin": ("FLEETTRACK_CORS_ORIGIN", ""),
    }

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        #: Where each value came from, for error messages: the option or the variable.
        self._sources: dict[str, str] = {}
        self["listen"] = []
        self["cors-origin"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to serve on, repeatable [FLEETTRACK_LISTEN, space-separated]"""
        self["listen"].append(endpoint)

    def opt_cors_origin(self, origin: str) -> None:
        """Origin allowed to read /health and /stats, repeatable [FLEETTRACK_CORS_ORIGIN]"""
        self["cors-origin"].append(origin)

    def _fill_in(self, name: str) -> None:
        """Take an option not given on the command line from the environment or the default."""
        self._sources[name] = f"--{name}"
        if self[name]:
            return
        variable, default = self.ENVIRONMENT[name]
        value = self._environ.get(variable)
        if value:
            self._sources[name] = variable
        else:
            value = default
        self[name] = value.split() if isinstance(self[name], list) else value

    def postOptions(self) -> None:
        for name in self.ENVIRONMENT:
            self._fill_in(name)
        source = self._sources
        self["batch-interval"] = (
            _number(source["batch-interval"], self["batch-interval"], 10, 60000) / 1000
        )
        self["vehicle-ttl"] = _number(source["vehicle-ttl"], self["vehicle-ttl"], 1, 365 * 86400)
        for origin in self["cors-origin"]:
            if not _ORIGIN.fullmatch(origin):
                raise usage.UsageError(
                    f"{source['cors-origin']} must be * or scheme://host[:port], not {origin!r}"
                )
        from twisted.internet import reactor

        for description in self["listen"]:
            try:
                serverFromString(reactor, description)
            except Exception as error:  # Twisted raises many kinds for a bad description.
                raise usage.UsageError(f"{source['listen']} {description!r}: {error}") from None


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TrackingService(Service):
    """Runs the hub's loops; at shutdown delivers the last batch and closes every client."""

    log = Logger()

    def __init__(self, hub: Hub, reactor: IReactorTime, listen: list[str]) -> None:
        super().__init__()
        self.hub = hub
        self._reactor = reactor
        self._listen = listen

    def startService(self) -> None:
        super().startService()
        self.hub.start()
        self.log.info(
            "fleettrack {version} started: listening on {endpoints}, batch interval {interval} ms",
            version=__version__,
            endpoints=", ".join(self._listen),
            interval=int(self.hub.batch_interval * 1000),
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.hub.stop()
        self.log.info(
            "fleettrack stopping: closing {count} connections", count=len(self.hub.viewers)
        )
        closed = self.hub.close_all(GOING_AWAY, "server shutting down")
        closed.addTimeout(SHUTDOWN_GRACE, self._reactor)

        def gave_up(failure: Failure) -> None:
            self.log.warn("{count} connections did not close in time", count=len(self.hub.viewers))

        closed.addErrback(gave_up)
        closed.addCallback(lambda _: self.log.info("fleettrack stopped"))
        return closed


class CleanExitOnSignals(Service):
    """SIGTERM and SIGINT stop the reactor gracefully, and the process then exits 0.

    twistd's own handlers re-raise the signal once the reactor has stopped, so a
    clean shutdown would still end as "killed by SIGTERM"; service managers and
    orchestrators read that as a crash.
    """

    log = Logger()
    SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        # The reactor installs its own handlers as it starts running; replace them after that.
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if self.running:
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._received)

    def stopService(self) -> None:
        super().stopService()
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _received(self, number: int, frame: FrameType | None) -> None:
        self.log.info("received {signal}, shutting down", signal=signal.Signals(number).name)
        self._reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        with contextlib.suppress(ReactorNotRunning):  # A second signal while already stopping.
            self._reactor.stop()


def _documents(
    tracking: TrackingService, environment: str
) -> dict[bytes, Callable[[], dict[str, Any]]]:
    def health() -> dict[str, Any]:
        return {"status": "ok", "uptime": tracking.hub.uptime(), "timestamp": tracking.hub.now_ms()}

    def stats() -> dict[str, Any]:
        return {
            "server": {
                "uptime": tracking.hub.uptime(),
                "environment": environment,
                "version": __version__,
                "pythonVersion": platform.python_version(),
                "twistedVersion": twisted.__version__,
                "pid": os.getpid(),
                "memory": {"rssBytes": _rss_bytes()},
            },
            "tracking": tracking.hub.stats(),
        }

    return {b"health": health, b"stats": stats}


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    hub = Hub(reactor, options["batch-interval"], options["vehicle-ttl"])
    top = MultiService()
    CleanExitOnSignals(reactor).setServiceParent(top)
    # Added first so that it stops last: the listeners stop accepting before the final flush.
    tracking = TrackingService(hub, reactor, options["listen"])
    tracking.setServiceParent(top)
    site = build_site(
        WebSocketResource(TrackingServerFactory(hub, reactor)),
        _documents(tracking, options["environment"]),
        options["cors-origin"],
    )
    for description in options["listen"]:
        StreamServerEndpointService(serverFromString(reactor, description), site).setServiceParent(
            top
        )
    return top
