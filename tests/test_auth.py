"""Token verification and grants: every way a token can be refused, and glob rights."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from fleettrack import auth
from fleettrack.auth import (
    OPEN,
    AuthConfigError,
    Grant,
    TokenVerifier,
    mint_token,
)
from fleettrack.errors import ErrorCode, ProtocolError

SECRET = b"0123456789abcdef" * 4
OTHER_SECRET = b"fedcba9876543210" * 4
NOW = 1_700_000_000.0
HOUR = 3600


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier.from_secret(SECRET)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "dispatch",
        "iat": int(NOW),
        "exp": int(NOW) + HOUR,
        "vehicles": ["truck_*"],
        "watch": ["fleet-a-*"],
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not ...}


def sign(payload: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built without pyjwt, which refuses to create some of these."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if key is not None:
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def refused(verifier: TokenVerifier, token: Any, now: float = NOW) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        verifier.verify(token, now)
    assert caught.value.code is ErrorCode.UNAUTHORIZED
    assert caught.value.field == "token"
    return caught.value


# --- accepted tokens ---------------------------------------------------------


def test_minted_token_round_trips(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, "dispatch", HOUR, vehicles=["truck_*"], watch=["*"], now=NOW)
    grant = verifier.verify(token, NOW + 10)
    assert grant == Grant(
        subject="dispatch", expires_at=NOW + HOUR, vehicles=("truck_*",), watch=("*",)
    )
    assert grant.watches_everything
    assert not grant.publishes_everything


def test_missing_lists_grant_nothing(verifier: TokenVerifier) -> None:
    grant = verifier.verify(sign(claims(vehicles=..., watch=...)), NOW)
    assert grant.vehicles == () and grant.watch == ()
    assert not grant.may_publish("truck_1")
    assert not grant.may_watch("truck_1")


def test_duplicate_patterns_are_collapsed(verifier: TokenVerifier) -> None:
    grant = verifier.verify(sign(claims(watch=["a", "b", "a"])), NOW)
    assert grant.watch == ("a", "b")


# --- missing, malformed, forged -------------------------------------------


@pytest.mark.parametrize("token", [None, "", 42, b"bytes"])
def test_missing_token(verifier: TokenVerifier, token: Any) -> None:
    assert "required" in refused(verifier, token).message


def test_oversized_token_is_refused_unparsed(verifier: TokenVerifier) -> None:
    assert "longer" in refused(verifier, "a" * (auth.MAX_TOKEN_LENGTH + 1)).message


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "a.b", "....", "e30.e30.e30"])
def test_malformed_token(verifier: TokenVerifier, token: str) -> None:
    refused(verifier, token)


def test_forged_signature(verifier: TokenVerifier) -> None:
    error = refused(verifier, sign(claims(), key=OTHER_SECRET))
    assert "signature" in error.message


def test_tampered_payload(verifier: TokenVerifier) -> None:
    header, _, signature = sign(claims()).split(".")
    widened = b64(json.dumps(claims(watch=["*"])).encode())
    assert "signature" in refused(verifier, f"{header}.{widened}.{signature}").message


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    for token in (
        sign(claims(), key=None, algorithm="none"),
        handmade({"alg": "none", "typ": "JWT"}, claims(), key=None),
        handmade({"alg": "None", "typ": "JWT"}, claims(), key=None),
    ):
        assert "HS256" in refused(verifier, token).message


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithm_is_refused(verifier: TokenVerifier, algorithm: str) -> None:
    assert "HS256" in refused(verifier, sign(claims(), algorithm=algorithm)).message


def test_missing_alg_header_is_refused(verifier: TokenVerifier) -> None:
    refused(verifier, handmade({"typ": "JWT"}, claims(), key=SECRET))


# --- claims -------------------------------------------------------------------


def test_expired(verifier: TokenVerifier) -> None:
    token = sign(claims())
    exp = NOW + HOUR
    assert verifier.verify(token, exp - 1).expires_at == exp
    assert "expired" in refused(verifier, token, now=exp).message
    # exp gets no leeway: the connection's close timer can trust expires_at.
    assert "expired" in refused(verifier, token, now=exp + 1).message


@pytest.mark.parametrize("claim", ["exp", "sub"])
def test_required_claims(verifier: TokenVerifier, claim: str) -> None:
    assert repr(claim) in refused(verifier, sign(claims(**{claim: ...}))).message


@pytest.mark.parametrize("sub", ["", 7, ["dispatch"], {"name": "x"}])
def test_bad_subject(verifier: TokenVerifier, sub: Any) -> None:
    assert "'sub'" in refused(verifier, sign(claims(sub=sub))).message


@pytest.mark.parametrize("exp", ["tomorrow", True, [1], 1e400])
def test_bad_exp(verifier: TokenVerifier, exp: Any) -> None:
    token = handmade({"alg": "HS256", "typ": "JWT"}, {**claims(), "exp": exp}, SECRET)
    assert "'exp'" in refused(verifier, token).message


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid(verifier: TokenVerifier, claim: str) -> None:
    # Within the clock-skew leeway: a token minted on a host slightly ahead.
    skewed = sign(claims(**{claim: int(NOW) + 30}))
    assert verifier.verify(skewed, NOW).subject == "dispatch"
    future = sign(claims(**{claim: int(NOW) + 600}))
    assert "not valid yet" in refused(verifier, future).message
    assert "must be a number" in refused(verifier, sign(claims(**{claim: "soon"}))).message


@pytest.mark.parametrize(
    "value",
    ["fleet-a-*", None, 3, [3], ["ok", None], [""], [["nested"]], {"a": 1}],
    ids=repr,
)
@pytest.mark.parametrize("claim", ["vehicles", "watch"])
def test_pattern_claims_must_be_lists_of_strings(
    verifier: TokenVerifier, claim: str, value: Any
) -> None:
    error = refused(verifier, sign(claims(**{claim: value})))
    assert repr(claim) in error.message


def test_audience_bound_token_is_refused(verifier: TokenVerifier) -> None:
    assert "audience" in refused(verifier, sign(claims(aud="elsewhere"))).message


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b64(b) + "." + b64(b)))
def test_arbitrary_input_only_ever_raises_auth_error(token: str) -> None:
    verifier = TokenVerifier.from_secret(SECRET)
    with pytest.raises(ProtocolError):
        verifier.verify(token, NOW)


@given(
    st.dictionaries(
        st.sampled_from(["sub", "exp", "nbf", "iat", "vehicles", "watch", "aud", "x"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=6,
        ),
    )
)
def test_arbitrary_signed_claims_give_a_grant_or_auth_error(payload: dict[str, Any]) -> None:
    verifier = TokenVerifier.from_secret(SECRET)
    token = handmade({"alg": "HS256", "typ": "JWT"}, payload, SECRET)
    try:
        grant = verifier.verify(token, NOW)
    except ProtocolError:
        return
    assert isinstance(grant.subject, str) and grant.subject
    assert grant.expires_at > NOW
    assert all(isinstance(p, str) for p in grant.vehicles + grant.watch)


# --- public keys ------------------------------------------------------------


def public_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_rs256(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(rsa_key))
    verifier = TokenVerifier.from_public_key_file(path, "RS256")
    grant = verifier.verify(sign(claims(), key=rsa_key, algorithm="RS256"), NOW)
    assert grant.may_watch("fleet-a-1")

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "signature" in refused(verifier, sign(claims(), stranger, "RS256")).message
    # Same key, another algorithm the token would like to pick.
    refused(verifier, sign(claims(), key=rsa_key, algorithm="RS512"))
    refused(verifier, sign(claims(), key=rsa_key, algorithm="PS256"))


def test_es256(ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier.from_public_key(public_pem(ec_key), "ES256")
    grant = verifier.verify(sign(claims(), key=ec_key, algorithm="ES256"), NOW)
    assert grant.subject == "dispatch"

    stranger = ec.generate_private_key(ec.SECP256R1())
    assert "signature" in refused(verifier, sign(claims(), stranger, "ES256")).message
    assert "ES256" in refused(verifier, sign(claims())).message
    refused(verifier, sign(claims(), key=None, algorithm="none"))


def test_public_key_cannot_be_used_as_hmac_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic key-confusion attack: HS256 signed with the public PEM."""
    pem = public_pem(rsa_key)
    verifier = TokenVerifier.from_public_key(pem, "RS256")
    forged = handmade({"alg": "HS256", "typ": "JWT"}, claims(), key=pem)
    assert "RS256" in refused(verifier, forged).message


def test_public_key_must_fit_the_algorithm(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(AuthConfigError, match="RSA"):
        TokenVerifier.from_public_key(public_pem(ec_key), "RS256")
    with pytest.raises(AuthConfigError, match="P-256"):
        TokenVerifier.from_public_key(public_pem(rsa_key), "ES256")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(AuthConfigError, match="P-256"):
        TokenVerifier.from_public_key(public_pem(p384), "ES256")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(AuthConfigError, match="2048"):
        TokenVerifier.from_public_key(public_pem(weak), "RS256")
    with pytest.raises(AuthConfigError, match="unsupported"):
        TokenVerifier.from_public_key(public_pem(rsa_key), "HS256")  # type: ignore[arg-type]


def test_private_key_or_garbage_is_not_a_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for pem in (private_pem, b"not a key"):
        with pytest.raises(AuthConfigError, match="not a PEM public key"):
            TokenVerifier.from_public_key(pem, "RS256")


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read public key file"):
        TokenVerifier.from_public_key_file(tmp_path / "absent.pem", "ES256")


# --- secrets ------------------------------------------------------------------


def test_secret_file_strips_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    verifier = TokenVerifier.from_secret_file(path)
    assert verifier.key == SECRET
    assert verifier.verify(sign(claims()), NOW).subject == "dispatch"
    path.write_bytes(SECRET + b"\r\n")
    assert TokenVerifier.from_secret_file(str(path)).key == SECRET


def test_short_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(AuthConfigError, match=r"31 bytes; at least 32"):
        TokenVerifier.from_secret_file(path)
    with pytest.raises(AuthConfigError, match="at least 32"):
        TokenVerifier.from_secret(b"short")
    with pytest.raises(AuthConfigError, match="at least 32"):
        mint_token(b"short", "dispatch", HOUR, watch=["*"], now=NOW)


def test_missing_secret_file(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read secret file"):
        TokenVerifier.from_secret_file(tmp_path / "absent")


def test_verifier_repr_hides_the_key() -> None:
    assert SECRET.decode() not in repr(TokenVerifier.from_secret(SECRET))


# --- minting ------------------------------------------------------------------


def test_mint_token_claims() -> None:
    token = mint_token(SECRET, "dispatch", 90, vehicles=("v1",), watch=("a*", "a*"), now=NOW)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert payload == {
        "sub": "dispatch",
        "iat": int(NOW),
        "exp": int(NOW) + 90,
        "vehicles": ["v1"],
        "watch": ["a*"],
    }
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_mint_token_defaults_to_the_wall_clock(verifier: TokenVerifier) -> None:
    import time

    token = mint_token(SECRET, "dispatch", 60, watch=["*"])
    assert verifier.verify(token, time.time()).watches_everything


@pytest.mark.parametrize(
    ("subject", "ttl", "patterns", "message"),
    [
        ("", 60, ["*"], "subject"),
        ("dispatch", 0, ["*"], "ttl"),
        ("dispatch", -5, ["*"], "ttl"),
        ("dispatch", 60, [""], "non-empty"),
        ("dispatch", 60, [3], "non-empty"),
    ],
)
def test_mint_token_refuses_bad_input(
    subject: str, ttl: float, patterns: list[Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mint_token(SECRET, subject, ttl, watch=patterns, now=NOW)


# --- grants -------------------------------------------------------------------


def grant(vehicles: tuple[str, ...] = (), watch: tuple[str, ...] = ()) -> Grant:
    return Grant(subject="t", expires_at=NOW + HOUR, vehicles=vehicles, watch=watch)


@pytest.mark.parametrize(
    ("pattern", "vehicle_id", "expected"),
    [
        ("fleet-a-*", "fleet-a-7", True),
        ("fleet-a-*", "fleet-a-", True),
        ("fleet-a-*", "fleet-b-1", False),
        ("fleet-a-*", "xfleet-a-7", False),
        ("fleet-a-*", "FLEET-A-7", False),  # case-sensitive, like fnmatchcase
        ("truck_?", "truck_1", True),
        ("truck_?", "truck_12", False),
        ("bus-[0-4]", "bus-3", True),
        ("bus-[0-4]", "bus-7", False),
        ("bus-[!0-4]", "bus-7", True),
        ("truck.1", "truck.1", True),
        ("truck.1", "truckX1", False),  # '.' is literal, not a regex dot
        ("a:b", "a:b", True),
        ("van-12", "van-12", True),
        ("van-12", "van-123", False),
        ("*", "anything", True),
    ],
)
def test_glob_semantics(pattern: str, vehicle_id: str, expected: bool) -> None:
    g = grant(vehicles=(pattern,), watch=(pattern,))
    assert g.may_publish(vehicle_id) is expected
    assert g.may_watch(vehicle_id) is expected
    # Asked twice: the memoised answer is the same.
    assert g.may_watch(vehicle_id) is expected


def test_publish_and_watch_rights_are_separate() -> None:
    g = grant(vehicles=("truck_7",), watch=("fleet-a-*", "truck_*"))
    assert g.may_publish("truck_7")
    assert not g.may_publish("truck_8")
    assert not g.may_publish("fleet-a-1")
    assert g.may_watch("truck_8")
    assert g.may_watch("fleet-a-1")
    assert not g.may_watch("fleet-b-1")
    assert not g.watches_everything


def test_several_patterns_combine() -> None:
    g = grant(watch=("bus-1", "fleet-a-*", "van-?"))
    assert [g.may_watch(v) for v in ("bus-1", "bus-2", "fleet-a-9", "van-1", "van-10")] == [
        True,
        False,
        True,
        True,
        False,
    ]


def test_match_cache_is_bounded() -> None:
    g = grant(watch=("fleet-a-*",))
    for n in range(auth.MATCH_CACHE_SIZE * 2 + 5):
        assert g.may_watch(f"fleet-a-{n}")
        assert not g.may_watch(f"fleet-b-{n}")
    assert len(g._may_watch._cache) <= auth.MATCH_CACHE_SIZE


def test_check_raises_forbidden() -> None:
    g = grant(vehicles=("truck_1",), watch=("fleet-a-*",))
    g.check_publish("truck_1")
    g.check_watch("fleet-a-1")
    with pytest.raises(ProtocolError) as caught:
        g.check_publish("truck_2")
    assert caught.value.code is ErrorCode.FORBIDDEN
    assert caught.value.as_dict() == {
        "code": "FORBIDDEN",
        "message": "this token may not publish as vehicle 'truck_2'",
        "field": "vehicleId",
    }
    with pytest.raises(ProtocolError, match="may not watch"):
        g.check_watch("fleet-b-1")


def test_open_grant_allows_everything() -> None:
    assert OPEN.may_publish("any-vehicle")
    assert OPEN.may_watch("any-vehicle")
    assert OPEN.watches_everything and OPEN.publishes_everything
    assert not OPEN.is_expired(1e12)
    assert OPEN.seconds_left(NOW) == math.inf
    assert OPEN.watch_scope == frozenset({"*"})


def test_watch_scope_groups_equal_rights() -> None:
    a = grant(watch=("fleet-a-*", "bus-1"))
    b = Grant(subject="other", expires_at=NOW, vehicles=("x",), watch=("bus-1", "fleet-a-*"))
    c = grant(watch=("fleet-b-*",))
    assert a.watch_scope == b.watch_scope
    assert hash(a.watch_scope) == hash(b.watch_scope)
    assert a.watch_scope != c.watch_scope
    # Anything next to "*" adds nothing.
    assert grant(watch=("*", "fleet-a-*")).watch_scope == OPEN.watch_scope
    assert len({a.watch_scope, b.watch_scope, c.watch_scope}) == 2


def test_grants_are_frozen_hashable_values() -> None:
    a, b = grant(watch=("x",)), grant(watch=("x",))
    a.may_watch("x")  # a warm cache does not change equality
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.subject = "mallory"  # type: ignore[misc]


def test_expiry_helpers() -> None:
    g = grant()
    assert not g.is_expired(NOW)
    assert g.is_expired(NOW + HOUR)
    assert g.seconds_left(NOW) == HOUR
    assert g.seconds_left(NOW + 2 * HOUR) == 0


# --- mapping onto the protocol's errors -----------------------------------


def test_auth_error_shape() -> None:
    error = ProtocolError(ErrorCode.UNAUTHORIZED, "token has expired", "token")
    assert error.as_dict() == {
        "code": "UNAUTHORIZED",
        "message": "token has expired",
        "field": "token",
    }
    assert ProtocolError(ErrorCode.FORBIDDEN, "no").as_dict() == {
        "code": "FORBIDDEN",
        "message": "no",
    }
