"""``twistd fleettrack``: options, and the service tree they build."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from autobahn.twisted.resource import WebSocketResource
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import twisted
from fleettrack import __version__
from fleettrack.errors import CloseCode
from fleettrack.hub import Hub
from fleettrack.options import Options
from fleettrack.session import Policy
from fleettrack.web import build_site
from fleettrack.websocket import TrackingServerFactory

#: Seconds that closing WebSockets may take at shutdown before the process goes anyway.
SHUTDOWN_GRACE: Final = 3.0


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

    def __init__(self, hub: Hub, reactor: IReactorTime, listen: list[str], policy: Policy) -> None:
        super().__init__()
        self.hub = hub
        self._reactor = reactor
        self._listen = listen
        self._policy = policy

    def startService(self) -> None:
        super().startService()
        self.hub.start()
        self.log.info(
            "fleettrack {version} started: listening on {endpoints}, batch interval {interval} ms",
            version=__version__,
            endpoints=", ".join(self._listen),
            interval=int(self.hub.batch_interval * 1000),
        )
        if self._policy.verifier is None:
            self.log.warn(
                "authentication is off: anyone who can connect may publish and watch every"
                " vehicle (see --auth-secret-file)"
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.hub.stop()
        self.log.info(
            "fleettrack stopping: closing {count} connections", count=len(self.hub.viewers)
        )
        closed = self.hub.close_all(CloseCode.GOING_AWAY, "server shutting down")
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
    hub = Hub(reactor, options["batch-interval"] / 1000, options["vehicle-ttl"])
    top = MultiService()
    CleanExitOnSignals(reactor).setServiceParent(top)
    # Added first so that it stops last: the listeners stop accepting before the final flush.
    tracking = TrackingService(hub, reactor, options["listen"], options["policy"])
    tracking.setServiceParent(top)
    policy = options["policy"]
    factory = TrackingServerFactory(
        hub,
        reactor,
        policy=policy,
        max_message_bytes=options["max-message-size"],
        ping_interval=options["ping-interval"],
        ping_timeout=options["ping-timeout"],
    )
    max_connections = options["max-connections"]
    site = build_site(
        WebSocketResource(factory),
        _documents(tracking, options["environment"]),
        cors_origins=options["cors-origin"],
        allowed_origins=options["allowed-origin"],
        has_room=lambda: len(hub.viewers) < max_connections,
    )
    for description in options["listen"]:
        # strports: a port that cannot be bound stops startup instead of being logged.
        strports.service(_with_backlog(description), site, reactor=reactor).setServiceParent(top)
    return top


#: Pending connections the kernel queues per listening port (Twisted's default is 50,
#: which refuses a storm of reconnecting clients after a restart).
LISTEN_BACKLOG: Final = 4096


def _with_backlog(description: str) -> str:
    kind = description.split(":", 1)[0]
    if kind in {"tcp", "tcp6", "ssl", "unix"} and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description
