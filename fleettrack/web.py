"""HTTP resources: ``/health``, ``/stats`` and JSON errors, beside ``/ws`` in one Site."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.web import http
from twisted.web.resource import EncodingResourceWrapper, IResource, Resource
from twisted.web.server import GzipEncoderFactory, Request, Site

JSONBody = Callable[[], dict[str, Any]]

SECURITY_HEADERS: Final = {
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Content-Security-Policy": b"default-src 'none'; frame-ancestors 'none'",
    b"Cache-Control": b"no-store",
}
_READ_METHODS: Final = (b"GET", b"HEAD")
_ALLOW: Final = b"GET, HEAD, OPTIONS"


class CorsPolicy:
    """Which browser origins may read the JSON endpoints (``*``: any)."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(origin.encode() for origin in origins)

    def apply(self, request: Request) -> None:
        origin = request.getHeader(b"origin")
        if origin is None or not self.origins:
            return
        request.setHeader(b"Vary", b"Origin")
        if origin in self.origins or b"*" in self.origins:
            request.setHeader(b"Access-Control-Allow-Origin", origin)


def write_json(request: Request, code: int, body: Any, cors: CorsPolicy) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    cors.apply(request)
    return orjson.dumps(body)


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class JSONResource(Resource):
    """A read-only JSON document; anything below it is a 404, other methods a 405."""

    isLeaf = True

    def __init__(self, body: JSONBody, cors: CorsPolicy) -> None:
        super().__init__()
        self._body = body
        self._cors = cors

    def render(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            return write_json(
                request, 404, _error_body("NOT_FOUND", "no such resource"), self._cors
            )
        if request.method == b"OPTIONS":
            request.setHeader(b"Access-Control-Allow-Methods", _ALLOW)
            request.setHeader(b"Access-Control-Max-Age", b"600")
            request.setHeader(b"Allow", _ALLOW)
            write_json(request, 204, None, self._cors)
            return b""
        if request.method not in _READ_METHODS:
            request.setHeader(b"Allow", _ALLOW)
            message = f"{request.method.decode('latin-1')} is not allowed here; use GET"
            return write_json(request, 405, _error_body("METHOD_NOT_ALLOWED", message), self._cors)
        return write_json(request, 200, self._body(), self._cors)


class NotFoundResource(Resource):
    isLeaf = True

    def __init__(self, cors: CorsPolicy) -> None:
        super().__init__()
        self._cors = cors

    def render(self, request: Request) -> bytes:
        return write_json(request, 404, _error_body("NOT_FOUND", "no such resource"), self._cors)


class WebSocketGate(Resource):
    """Refuses a handshake before any WebSocket state exists: a foreign origin, a full server."""

    isLeaf = True

    def __init__(
        self,
        websocket: WebSocketResource,
        allowed_origins: Iterable[str],
        has_room: Callable[[], bool],
        cors: CorsPolicy,
    ) -> None:
        super().__init__()
        self._websocket = websocket
        self._origins = frozenset(origin.encode() for origin in allowed_origins)
        self._has_room = has_room
        self._cors = cors

    def render(self, request: Request) -> bytes | int:
        origin = request.getHeader(b"origin")
        # Browsers always send Origin; other clients may not, and are not refused for it.
        if self._origins and origin is not None and origin not in self._origins:
            body = _error_body("FORBIDDEN_ORIGIN", "this origin may not open a WebSocket here")
            return write_json(request, 403, body, self._cors)
        if not self._has_room():
            request.setHeader(b"Retry-After", b"5")
            body = _error_body("SERVER_FULL", "too many connections; try again later")
            return write_json(request, 503, body, self._cors)
        rendered: bytes | int = self._websocket.render(request)
        return rendered


class RootResource(Resource):
    def __init__(self, cors: CorsPolicy) -> None:
        super().__init__()
        self._not_found = NotFoundResource(cors)

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self._not_found


def _gzipped(resource: Resource) -> IResource:
    wrapped: IResource = EncodingResourceWrapper(resource, [GzipEncoderFactory()])
    return wrapped


def build_site(
    websocket: WebSocketResource,
    documents: dict[bytes, JSONBody],
    *,
    cors_origins: Iterable[str],
    allowed_origins: Iterable[str],
    has_room: Callable[[], bool],
) -> Site:
    """One Site: the WebSocket endpoint at ``/ws`` and a JSON document per ``documents`` entry."""
    cors = CorsPolicy(cors_origins)
    root = RootResource(cors)
    root.putChild(b"ws", WebSocketGate(websocket, allowed_origins, has_room, cors))
    for name, body in documents.items():
        root.putChild(name, _gzipped(JSONResource(body, cors)))
    site = QuietSite(root)
    site.displayTracebacks = False
    return site


class QuietSite(Site):
    """No access log: a monitor polling /health or /stats would fill the log at info level.

    WebSocket connections are logged when they open and close (see websocket.py).
    """

    def log(self, request: http.Request) -> None:
        pass
