"""The WebSocket adapter: Autobahn frames in and out of a :class:`~fleettrack.session.Session`."""

from __future__ import annotations

import socket
from typing import Any, Final, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime, ISystemHandle
from twisted.logger import Logger
from wsaccel.xormask import XorMaskerSimple

from fleettrack.errors import ErrorCode, ProtocolError
from fleettrack.hub import Batch, Hub
from fleettrack.session import Policy, Session
from fleettrack.wire import decode_message, encode_ack, encode_batch, encode_event

_BINARY_REFUSED = ProtocolError(
    ErrorCode.INVALID_JSON, "binary frames are not supported: send JSON text frames"
)
_OPEN = WebSocketProtocol.STATE_OPEN
#: First header byte of a complete, unfragmented, uncompressed text frame (FIN + opcode 1).
_FIN_TEXT = 0x81
#: Kernel send buffer per connection (Linux doubles it). Autotuning lets a
#: viewer that stops reading absorb megabytes before Twisted's own 64 KiB
#: buffer fills and pauses us; this bounds that to about half a MiB, a few
#: large batches, while still holding a whole batch of a few thousand points.
SEND_BUFFER_BYTES: Final = 256 * 1024


class TrackingServerProtocol(WebSocketServerProtocol):
    """One client connection; it owns the client's :class:`Session`."""

    factory: TrackingServerFactory
    session: Session | None = None
    _url_token: str | None = None
    #: A plain TCP connection's socket and transport, written to directly (see sendData).
    _direct: tuple[socket.socket, FileDescriptor] | None = None
    _log = Logger()

    def onConnect(self, request: Any) -> None:
        tokens = request.params.get("token")
        if tokens:
            self._url_token = tokens[0]

    def onOpen(self) -> None:
        if ISystemHandle.providedBy(self.transport):
            handle = self.transport.getHandle()
            if isinstance(handle, socket.socket):  # not under TLS: that is an OpenSSL object
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
                self._direct = (handle, cast(FileDescriptor, self.transport))
        # The HTTP channel that carried the handshake was the transport's producer.
        self.unregisterProducer()
        self.registerProducer(self, True)
        self.session = Session(self.factory.hub, self, self.factory.policy)
        self._log.info(
            "connection opened from {peer} ({count} connected)",
            peer=self.peer,
            count=len(self.factory.hub.viewers) + 1,
        )
        token, self._url_token = self._url_token, None
        self.session.open(token)

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
        limit = self.factory.max_message_bytes
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
        session.closed()
        self._log.info(
            "connection closed from {peer} (code {code}, {count} connected)",
            peer=self.peer,
            code=code,
            count=len(self.factory.hub.viewers),
        )

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Every outgoing frame passes here: write it at once when nothing is queued.

        Autobahn's own sendData formats debug-log arguments for every frame
        even with debug off, and Twisted's transport.write registers the
        socket for writability and writes a reactor turn later (two epoll_ctl
        calls and a wakeup per frame). A flush sends one frame to each of
        thousands of viewers, so on a plain TCP socket with an empty buffer
        the frame goes straight to the kernel. Whatever the kernel does not
        take goes through the transport, which keeps the order and pauses us
        when the viewer stops reading.
        """
        direct = self._direct
        if direct is None or sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)
            return
        sock, transport = direct
        if (
            transport.connected
            and not transport.disconnecting
            and not transport.dataBuffer
            and not transport._tempDataBuffer
        ):
            try:
                sent = sock.send(data)
            except OSError:  # full (EAGAIN), or broken: the transport finds out itself
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    # The transport's producer: it pauses us when the viewer stops reading.

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.pause()

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.resume()

    def stopProducing(self) -> None:
        """The connection is going away; onClose cleans up."""

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

    def __init__(
        self,
        hub: Hub,
        reactor: IReactorTime,
        *,
        policy: Policy | None = None,
        max_message_bytes: int = 64 * 1024,
        ping_interval: float = 25.0,
        ping_timeout: float = 10.0,
    ) -> None:
        super().__init__(reactor=reactor)
        self.hub = hub
        self.policy = policy or Policy()
        self.max_message_bytes = max_message_bytes
        self.setProtocolOptions(
            # Text frames are checked as JSON, which validates UTF-8 itself.
            utf8validateIncoming=False,
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
            # Pings make half-open connections (a phone that lost coverage) go away.
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            # Say why (1002, 1009...) instead of just dropping the TCP connection.
            failByDrop=False,
            webStatus=False,
            # permessage-deflate costs CPU and memory per connection and is a
            # decompression-bomb surface; batches are small. Refuse it.
            perMessageCompressionAccept=lambda offers: None,
        )

    def prepare_batch(self, batch: Batch) -> Any:
        """Frame a batch once; every viewer of the same batch gets these bytes."""
        return self.prepareMessage(encode_batch(batch))
