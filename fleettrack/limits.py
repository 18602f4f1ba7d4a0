"""What one connection may cost the server, and the token bucket that enforces rates."""

from __future__ import annotations

import attrs


@attrs.frozen
class Limits:
    """Per-connection limits; every one is a daemon option (see README)."""

    messages_per_second: float = 50.0
    message_burst: float = 200.0
    #: A connection still over its message rate after this many seconds is closed (1008).
    flood_close_after: float = 10.0
    max_subscriptions: int = 1000
    #: Points per second through telemetry arrays (gateways), on top of the message rate.
    points_per_second: float = 10_000.0
    #: Seconds a connection may take to authenticate when authentication is on.
    auth_timeout: float = 10.0
    #: Seconds a viewer may stay unable to take data before it is dropped (1008).
    slow_viewer_timeout: float = 30.0


@attrs.define
class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    rate: float
    burst: float
    stamp: float
    tokens: float = attrs.field()

    @tokens.default
    def _full(self) -> float:
        return self.burst

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` tokens if there are that many; False (and spend none) if not."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < amount:
            self.tokens = tokens
            return False
        self.tokens = tokens - amount
        return True
