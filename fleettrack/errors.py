"""The error a client is told about: a code, a message and, where it helps, the field."""

from __future__ import annotations

from enum import IntEnum, StrEnum

import attrs


class ErrorCode(StrEnum):
    INVALID_JSON = "INVALID_JSON"
    UNKNOWN_EVENT = "UNKNOWN_EVENT"
    INVALID_VEHICLE_ID = "INVALID_VEHICLE_ID"
    INVALID_TELEMETRY = "INVALID_TELEMETRY"
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    RATE_LIMITED = "RATE_LIMITED"
    SUBSCRIPTION_LIMIT = "SUBSCRIPTION_LIMIT"


class CloseCode(IntEnum):
    """WebSocket close codes the server uses."""

    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    UNAUTHORIZED = 4001


@attrs.define(auto_exc=True, eq=False)
class ProtocolError(Exception):
    """A message the server refuses; the connection stays open."""

    code: ErrorCode
    message: str
    field: str | None = None

    def as_dict(self) -> dict[str, str]:
        error = {"code": self.code.value, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return error
