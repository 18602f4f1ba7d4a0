"""The WebSocket adapter: Autobahn frames in and out of a :class:`~fleettrack.session.Session`."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fleettrack.errors import ErrorCode, ProtocolError
from fleettrack.hub import Batch, Hub
from fleettrack.session import Session
from fleettrack.wire import decode_message, encode_ack, encode_batch, encode_event

_BINARY_REFUSED = ProtocolError(
    ErrorCode.INVALID_JSON, "binary frames are not supported: send JSON text frames"
)


class TrackingServerProtocol(WebSocketServerProtocol):
    """One client connection; it owns the client's :class:`Session`."""

    factory: TrackingServerFactory
    session: Session | None = None
    _log = Logger()

    def onOpen(self) -> None:
        self.session = Session(self.factory.hub, self)
        self.factory.hub.connect(self.session)
        self._log.info(
            "connection opened from {peer} ({count} connected)",
            peer=self.peer,
            count=len(self.factory.hub.viewers),
        )

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        if isBinary:
            session.report(_BINARY_REFUSED)
            return
        try:
            message = decode_message(payload)
        except ProtocolError as error:
            session.report(error)
            return
        session.handle(message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        self.factory.hub.disconnect(session)
        self._log.info(
            "connection closed from {peer} (code {code}, {count} connected)",
            peer=self.peer,
            code=code,
            count=len(self.factory.hub.viewers),
        )

    # Connection, as the session sees it.

    def send_event(self, event: str, data: Any) -> None:
        self.sendMessage(encode_event(event, data))

    def send_ack(self, ack: int, data: Any) -> None:
        self.sendMessage(encode_ack(ack, data))

    def send_batch(self, batch: Batch) -> None:
        self.sendPreparedMessage(batch.framed(self.factory, self.factory.prepare_batch))

    def close(self, code: int, reason: str) -> None:
        # sendClose() refuses protocol-level codes such as 1001 and 1008; the frame itself is fine.
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)


class TrackingServerFactory(WebSocketServerFactory):
    protocol = TrackingServerProtocol  # type: ignore[assignment]

    def __init__(self, hub: Hub, reactor: IReactorTime) -> None:
        super().__init__(reactor=reactor)
        self.hub = hub
        self.setProtocolOptions(
            # Answer text frames only after JSON parsing, which validates UTF-8 itself.
            utf8validateIncoming=False,
            closeHandshakeTimeout=2,
        )

    def prepare_batch(self, batch: Batch) -> Any:
        """Frame a batch once; every viewer of the same batch gets these bytes."""
        return self.prepareMessage(encode_batch(batch))
