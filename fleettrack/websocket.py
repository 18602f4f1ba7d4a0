"""The WebSocket adapter: Autobahn frames in and out of a :class:`~fleettrack.session.Session`."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from wsaccel.xormask import XorMaskerSimple

from fleettrack.errors import ErrorCode, ProtocolError
from fleettrack.hub import Batch, Hub
from fleettrack.session import Session
from fleettrack.wire import decode_message, encode_ack, encode_batch, encode_event

_BINARY_REFUSED = ProtocolError(
    ErrorCode.INVALID_JSON, "binary frames are not supported: send JSON text frames"
)
_OPEN = WebSocketProtocol.STATE_OPEN
#: First header byte of a complete, unfragmented, uncompressed text frame (FIN + opcode 1).
_FIN_TEXT = 0x81


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

    def dataReceived(self, data: bytes) -> None:
        """Take whole small text frames straight off the wire; leave the rest to Autobahn.

        Nearly every frame a tracking server receives is one masked text frame
        of a few hundred bytes holding one message. Autobahn's general frame
        machine spends most of the per-message CPU on such a frame (a dozen
        callbacks, a masker object, an observer Deferred per message), so this
        parses exactly that shape and hands anything else (control frames,
        fragments, partial frames, oversized or malformed headers) to Autobahn
        unchanged, with the connection state it expects.
        """
        if (
            self.state != _OPEN
            or self.current_frame is not None
            or self.inside_message
            or self.data
        ):
            super().dataReceived(data)
            return
        offset, size = 0, len(data)
        limit = min(self.maxFramePayloadSize or size, self.maxMessagePayloadSize or size)
        while size - offset >= 6 and data[offset] == _FIN_TEXT:
            length = data[offset + 1] ^ 0x80  # the MASK bit must be set: clients always mask
            if length < 126:
                start = offset + 6
            elif length == 126 and size - offset >= 8:
                length = (data[offset + 2] << 8) | data[offset + 3]
                if length < 126:
                    break  # not minimally encoded: Autobahn fails the connection
                start = offset + 8
            else:
                break  # unmasked, 64-bit length, or header not all here
            end = start + length
            if end > size or length > limit:
                break
            payload = XorMaskerSimple(data[start - 4 : start]).process(data[start:end])
            offset = end
            self.text_message(payload)
            if self.state != _OPEN:
                return
        if self.autoPingTimeoutCall is not None and offset and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()
        if offset < size:
            super().dataReceived(data[offset:])

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            if self.session is not None:
                self.session.report(_BINARY_REFUSED)
            return
        self.text_message(payload)

    def onMessageEnd(self) -> None:
        """Deliver the message without Autobahn's per-message observer Deferred."""
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = []

    def text_message(self, payload: bytes) -> None:
        session = self.session
        if session is None:
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
