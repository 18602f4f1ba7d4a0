"""The reactor ``twistd fleettrack`` runs on unless ``--reactor`` names another.

It is Twisted's epoll reactor minus one thing: Twisted wraps every I/O event
in ``log.callWithLogger``, which sets up a legacy-log "system" context (a
thread-local lookup and a dict copy, about 2 us). A tracking server handles
one small message per event, so that wrapper alone was a tenth of its CPU
per received point. fleettrack logs through ``twisted.logger`` with named
fields and never reads that context; ``_doReadOrWrite`` already catches and
logs whatever an event handler raises, so nothing else changes.
"""

from __future__ import annotations

import errno
import select
import sys

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor


class TrackingReactor(EPollReactor):
    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                handle(selectable, fd, event)

    doIteration = doPoll


def install_unless_chosen() -> None:
    """Install the TrackingReactor if no reactor is installed yet and epoll exists."""
    if "twisted.internet.reactor" not in sys.modules and hasattr(select, "epoll"):
        installReactor(TrackingReactor())
