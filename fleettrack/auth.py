"""Who may do what: token verification and the grants it yields.

Transport-free: the WebSocket layer hands a token string and the current time
to :meth:`TokenVerifier.verify` and keeps the :class:`Grant` it gets back for
the life of the connection (or until the client re-authenticates).

Tokens are JWTs. ``sub`` names the holder and ``exp`` is required; the custom
claims ``vehicles`` and ``watch`` are lists of vehicle ids or
:func:`fnmatch.fnmatchcase` glob patterns (``"*"`` = every vehicle) the holder
may publish as and subscribe to. A missing list grants nothing.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleettrack.errors import ErrorCode, ProtocolError

Algorithm = Literal["HS256", "RS256", "ES256"]
PublicKeyAlgorithm = Literal["RS256", "ES256"]

#: HS256 secrets shorter than this are refused (RFC 7518 section 3.2).
MIN_SECRET_BYTES: Final = 32
MIN_RSA_KEY_BITS: Final = 2048
#: Longer tokens are refused before any parsing; real ones are a few hundred bytes.
MAX_TOKEN_LENGTH: Final = 8192
#: Clock skew tolerated on ``nbf``/``iat`` (a token minted on a host whose
#: clock runs ahead). ``exp`` is strict, so a connection can be closed exactly
#: at :attr:`Grant.expires_at`.
DEFAULT_LEEWAY: Final = 60.0
#: Per-grant memo of glob results; cleared when full so a client sending
#: endless distinct ids cannot grow it without bound.
MATCH_CACHE_SIZE: Final = 4096

_EVERYTHING: Final = "*"
_GLOB_CHARS: Final = frozenset("*?[")


class AuthConfigError(ValueError):
    """The server's or the CLI's key material is missing or unusable."""


def _unauthorized(message: str, field: str | None = "token") -> ProtocolError:
    return ProtocolError(ErrorCode.UNAUTHORIZED, message, field)


class _Matcher:
    """Answers "does this id match any of these patterns", quickly.

    Exact ids are a set lookup; the globs are compiled into one regex whose
    answers are memoised.
    """

    __slots__ = ("_cache", "_exact", "_regex", "everything")

    def __init__(self, patterns: Iterable[str]) -> None:
        unique = frozenset(patterns)
        self.everything = _EVERYTHING in unique
        self._exact = frozenset(p for p in unique if _GLOB_CHARS.isdisjoint(p))
        globs = sorted(unique - self._exact)
        self._regex = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None
        self._cache: dict[str, bool] = {}

    def matches(self, vehicle_id: str) -> bool:
        if self.everything or vehicle_id in self._exact:
            return True
        if self._regex is None:
            return False
        cached = self._cache.get(vehicle_id)
        if cached is not None:
            return cached
        if len(self._cache) >= MATCH_CACHE_SIZE:
            self._cache.clear()
        result = self._regex.match(vehicle_id) is not None
        self._cache[vehicle_id] = result
        return result


def _publish_matcher(grant: Grant) -> _Matcher:
    return _Matcher(grant.vehicles)


def _watch_matcher(grant: Grant) -> _Matcher:
    return _Matcher(grant.watch)


@attrs.frozen
class Grant:
    """What a verified token allows.

    ``expires_at`` is the token's ``exp`` in epoch seconds (``math.inf`` for
    :data:`OPEN`). ``vehicles`` and ``watch`` hold vehicle ids or glob
    patterns; ``"*"`` means every vehicle.
    """

    subject: str
    expires_at: float
    vehicles: tuple[str, ...] = ()
    watch: tuple[str, ...] = ()
    _may_publish: _Matcher = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(_publish_matcher, takes_self=True),
    )
    _may_watch: _Matcher = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(_watch_matcher, takes_self=True),
    )

    def may_publish(self, vehicle_id: str) -> bool:
        return self._may_publish.matches(vehicle_id)

    def may_watch(self, vehicle_id: str) -> bool:
        return self._may_watch.matches(vehicle_id)

    def check_publish(self, vehicle_id: str) -> None:
        """Raise FORBIDDEN unless the holder may publish as ``vehicle_id``."""
        if not self._may_publish.matches(vehicle_id):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"this token may not publish as vehicle {vehicle_id!r}",
                "vehicleId",
            )

    def check_watch(self, vehicle_id: str) -> None:
        """Raise FORBIDDEN unless the holder may subscribe to ``vehicle_id``."""
        if not self._may_watch.matches(vehicle_id):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"this token may not watch vehicle {vehicle_id!r}",
                "vehicleId",
            )

    @property
    def publishes_everything(self) -> bool:
        return self._may_publish.everything

    @property
    def watches_everything(self) -> bool:
        return self._may_watch.everything

    @property
    def watch_scope(self) -> frozenset[str]:
        """A hashable key: grants with equal scopes may watch the same vehicles.

        The hub can group ``"*"`` subscribers by it. Every scope containing
        ``"*"`` collapses to ``frozenset({"*"})``.
        """
        if self._may_watch.everything:
            return _WATCH_ALL
        return frozenset(self.watch)

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def seconds_left(self, now: float) -> float:
        """Until expiry, for the connection's close timer (``inf`` for OPEN)."""
        return max(0.0, self.expires_at - now)


_WATCH_ALL: Final = frozenset({_EVERYTHING})

#: The grant of every connection when the server runs without authentication.
OPEN: Final = Grant(
    subject="anonymous", expires_at=math.inf, vehicles=(_EVERYTHING,), watch=(_EVERYTHING,)
)


def _is_number(value: object) -> bool:
    """A JSON number: booleans, NaN and infinities are not."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(
        isinstance(pattern, str) and pattern for pattern in value
    ):
        raise _unauthorized(f"token claim {name!r} must be a list of non-empty strings")
    return tuple(dict.fromkeys(value))


_DECODE_OPTIONS: Final[jwt.types.Options] = {
    "require": ["exp", "sub"],
    # Checked in verify(): time claims against the caller's clock, and `sub`
    # by hand because pyjwt only checks its type from 2.10 on.
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,
    "enforce_minimum_key_length": True,
}


@attrs.frozen
class TokenVerifier:
    """Checks tokens signed with one configured key and algorithm.

    Only ``algorithm`` is accepted: a token whose header names another one
    (``none``, or HS256 against a public key) is refused.
    """

    key: bytes | rsa.RSAPublicKey | ec.EllipticCurvePublicKey = attrs.field(repr=False)
    algorithm: Algorithm
    leeway: float = DEFAULT_LEEWAY

    @classmethod
    def from_secret(cls, secret: bytes, leeway: float = DEFAULT_LEEWAY) -> TokenVerifier:
        _check_secret(secret)
        return cls(secret, "HS256", leeway)

    @classmethod
    def from_secret_file(cls, path: str | Path, leeway: float = DEFAULT_LEEWAY) -> TokenVerifier:
        return cls.from_secret(load_secret(path), leeway)

    @classmethod
    def from_public_key(
        cls, pem: bytes, algorithm: PublicKeyAlgorithm, leeway: float = DEFAULT_LEEWAY
    ) -> TokenVerifier:
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as error:
            raise AuthConfigError(f"not a PEM public key: {error}") from None
        if algorithm == "RS256":
            if not isinstance(key, rsa.RSAPublicKey):
                raise AuthConfigError("RS256 needs an RSA public key")
            if key.key_size < MIN_RSA_KEY_BITS:
                raise AuthConfigError(
                    f"RSA key is {key.key_size} bits; at least {MIN_RSA_KEY_BITS} are required"
                )
            return cls(key, algorithm, leeway)
        if algorithm == "ES256":
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                key.curve, ec.SECP256R1
            ):
                raise AuthConfigError("ES256 needs an EC public key on the P-256 curve")
            return cls(key, algorithm, leeway)
        raise AuthConfigError(f"unsupported public key algorithm {algorithm!r}")

    @classmethod
    def from_public_key_file(
        cls, path: str | Path, algorithm: PublicKeyAlgorithm, leeway: float = DEFAULT_LEEWAY
    ) -> TokenVerifier:
        return cls.from_public_key(_read_key_file(path, "public key"), algorithm, leeway)

    def verify(self, token: str | None, now: float) -> Grant:
        """The grant ``token`` carries at time ``now``; raises UNAUTHORIZED otherwise."""
        if not isinstance(token, str) or not token:
            raise _unauthorized("a token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized(f"token is longer than {MAX_TOKEN_LENGTH} characters")
        try:
            claims = jwt.decode(
                token, self.key, algorithms=[self.algorithm], options=_DECODE_OPTIONS
            )
        except jwt.InvalidAlgorithmError:
            raise _unauthorized(f"token must be signed with {self.algorithm}") from None
        except jwt.InvalidSignatureError:
            raise _unauthorized("token signature is invalid") from None
        except jwt.MissingRequiredClaimError as error:
            raise _unauthorized(f"token lacks the {error.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized("token is meant for another audience") from None
        except jwt.InvalidTokenError:
            # DecodeError and the rest: not a well-formed JWT.
            raise _unauthorized("token is malformed") from None
        return self._grant(claims, now)

    def _grant(self, claims: dict[str, Any], now: float) -> Grant:
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise _unauthorized("token claim 'sub' must be a non-empty string")
        expires_at = claims["exp"]
        if not _is_number(expires_at):
            raise _unauthorized("token claim 'exp' must be a number")
        if now >= expires_at:
            raise _unauthorized("token has expired")
        for claim in ("nbf", "iat"):
            if claim not in claims:
                continue
            value = claims[claim]
            if not _is_number(value):
                raise _unauthorized(f"token claim {claim!r} must be a number")
            if value > now + self.leeway:
                raise _unauthorized("token is not valid yet")
        return Grant(
            subject=subject,
            expires_at=float(expires_at),
            vehicles=_patterns(claims, "vehicles"),
            watch=_patterns(claims, "watch"),
        )


def mint_token(
    secret: bytes,
    subject: str,
    ttl_seconds: float,
    *,
    vehicles: Iterable[str] = (),
    watch: Iterable[str] = (),
    now: float | None = None,
) -> str:
    """An HS256 token for ``subject`` valid for ``ttl_seconds`` from ``now``.

    ``vehicles`` and ``watch`` are keyword-only: swapping them would hand out
    publishing rights.
    """
    _check_secret(secret)
    if not subject:
        raise ValueError("subject must not be empty")
    if not ttl_seconds > 0:
        raise ValueError("ttl_seconds must be positive")
    vehicles = list(dict.fromkeys(vehicles))
    watch = list(dict.fromkeys(watch))
    for pattern in (*vehicles, *watch):
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"patterns must be non-empty strings, not {pattern!r}")
    issued_at = time.time() if now is None else now
    claims = {
        "sub": subject,
        "iat": int(issued_at),
        "exp": math.ceil(issued_at + ttl_seconds),
        "vehicles": vehicles,
        "watch": watch,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def load_secret(path: str | Path) -> bytes:
    """The HS256 secret stored in ``path``, without its trailing newline."""
    secret = _read_key_file(path, "secret").rstrip(b"\r\n")
    _check_secret(secret, path)
    return secret


def _check_secret(secret: bytes, path: str | Path | None = None) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        where = f" in {path}" if path is not None else ""
        raise AuthConfigError(
            f"auth secret{where} is {len(secret)} bytes; at least {MIN_SECRET_BYTES}"
            " are required (`fleettrack gen-secret` makes one)"
        )


def _read_key_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise AuthConfigError(f"cannot read {what} file {path}: {error.strerror}") from None
