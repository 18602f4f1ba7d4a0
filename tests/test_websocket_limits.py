"""WebSocket-level limits seen from a raw TCP client: compression, pings, the status page."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.conftest import start_server
from tests.wsclient import TIMEOUT

HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


class RawClient(protocol.Protocol):
    """Sends a request, keeps every byte the server sends, and never answers anything."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.response_head: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.response_head.called:
            self.response_head.callback(self.received.split(b"\r\n\r\n")[0])

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


async def raw(port: int, request: bytes) -> RawClient:
    client = RawClient(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


def opcodes(stream: bytes) -> list[int]:
    """Opcodes of the unmasked server frames after the handshake response."""
    frames = stream.split(b"\r\n\r\n", 1)[1]
    found = []
    while frames:
        length, offset = frames[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(frames[2:4], "big"), 4
        found.append(frames[0] & 0x0F)
        frames = frames[offset + length :]
    return found


@pytest_twisted.ensureDeferred
async def test_compression_is_refused() -> None:
    running = start_server()
    try:
        extra = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        client = await raw(running.port, HANDSHAKE.format(extra=extra).encode())
        client.response_head.addTimeout(TIMEOUT, reactor)
        head = (await client.response_head).lower()
        assert head.startswith(b"http/1.1 101")
        assert b"sec-websocket-extensions" not in head
        client.transport.loseConnection()
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_answer_pings_is_dropped() -> None:
    running = start_server("--ping-interval", "0.2", "--ping-timeout", "0.2")
    try:
        client = await raw(running.port, HANDSHAKE.format(extra="").encode())
        client.lost.addTimeout(TIMEOUT, reactor)
        await client.lost
        assert client.received.startswith(b"HTTP/1.1 101")
        assert 0x9 in opcodes(client.received)  # it was pinged
        assert len(running.hub.viewers) == 0
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_no_status_page_for_plain_http() -> None:
    running = start_server()
    try:
        client = await raw(running.port, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        client.lost.addTimeout(TIMEOUT, reactor)
        await client.lost
        assert client.received.startswith(b"HTTP/1.1 426")
        assert b"Autobahn" not in client.received
    finally:
        await running.service.stopService()
