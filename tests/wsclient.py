"""A real WebSocket client for end-to-end tests, on Autobahn and the running reactor."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import orjson
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred

TIMEOUT = 10.0

Message = dict[str, Any]


class ClientProtocol(WebSocketClientProtocol):
    factory: ClientFactory

    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client._received(orjson.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed(code)


class ClientFactory(WebSocketClientFactory):
    protocol = ClientProtocol

    def __init__(self, client: WSClient, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.client = client


class WSClient:
    """Keeps every message it receives; tests take them out by predicate."""

    def __init__(self) -> None:
        self.protocol: ClientProtocol | None = None
        self.inbox: list[Message] = []
        self.close_code: int | None = None
        self._waiters: list[tuple[Callable[[Message], bool], Deferred[Message]]] = []
        self._open_waiter: Deferred[WSClient] = Deferred()
        self._close_waiter: Deferred[int | None] = Deferred()
        self._acks = itertools.count(1)

    @classmethod
    async def connect(
        cls, url: str, context_factory: Any = None, headers: dict[str, str] | None = None
    ) -> WSClient:
        client = cls()
        factory = ClientFactory(client, url, headers=headers or {})
        connection = connectWS(factory, context_factory)
        client._open_waiter.addTimeout(
            TIMEOUT, reactor, onTimeoutCancel=lambda *_: connection.disconnect()
        )
        return await client._open_waiter

    def _opened(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol
        self._open_waiter.callback(self)

    def _received(self, message: Message) -> None:
        for waiter in self._waiters:
            predicate, deferred = waiter
            if predicate(message):
                self._waiters.remove(waiter)
                deferred.callback(message)
                return
        self.inbox.append(message)

    def _closed(self, code: int | None) -> None:
        self.close_code = code
        if not self._open_waiter.called:
            self._open_waiter.errback(ConnectionError(f"handshake failed (close code {code})"))
        self._close_waiter.callback(code)

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(payload, isBinary=binary)

    def send(self, event: str, data: Any = None, ack: int | None = None) -> None:
        message: Message = {"event": event, "data": data}
        if ack is not None:
            message["ack"] = ack
        self.send_raw(orjson.dumps(message))

    async def next(self, predicate: Callable[[Message], bool] = lambda m: True) -> Message:
        """The oldest received message matching ``predicate``, waiting for one if needed."""
        for message in self.inbox:
            if predicate(message):
                self.inbox.remove(message)
                return message
        deferred: Deferred[Message] = Deferred()
        self._waiters.append((predicate, deferred))
        deferred.addTimeout(TIMEOUT, reactor)
        return await deferred

    async def event(self, name: str) -> Any:
        """The data of the next ``name`` event."""
        message = await self.next(lambda m: m.get("event") == name)
        return message.get("data")

    async def request(self, event: str, data: Any = None) -> Any:
        """Send with an ack id and return the ack's data."""
        ack = next(self._acks)
        self.send(event, data, ack)
        message = await self.next(lambda m: m.get("event") == "ack" and m.get("ack") == ack)
        return message["data"]

    async def closed(self) -> int | None:
        self._close_waiter.addTimeout(TIMEOUT, reactor)
        return await self._close_waiter

    def disconnect(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()
