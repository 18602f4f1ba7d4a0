"""``twistd fleettrack`` options: one table, each with an environment fallback.

The command line wins over the environment, which wins over the default. Every
value is checked here, so a bad one stops startup with a usage error before
anything binds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from fleettrack.auth import AuthConfigError, TokenVerifier
from fleettrack.limits import Limits
from fleettrack.reactor import install_unless_chosen
from fleettrack.session import Policy

#: (where the value came from, its text) -> the value.
Convert = Callable[[str, str], Any]

_ORIGIN = re.compile(r"https?://[^/\s:]+(:\d{1,5})?")


def _text(source: str, text: str) -> str:
    return text


def _number(low: float, high: float, integer: bool = False) -> Convert:
    kind = "an integer" if integer else "a number"

    def convert(source: str, text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise usage.UsageError(f"{source} must be {kind}, not {text!r}") from None
        if not low <= value <= high:
            raise usage.UsageError(f"{source} must be between {low:g} and {high:g}, not {text}")
        return value

    return convert


def _choice(*choices: str) -> Convert:
    def convert(source: str, text: str) -> str:
        if text not in choices:
            raise usage.UsageError(f"{source} must be one of {', '.join(choices)}, not {text!r}")
        return text

    return convert


def _origin(wildcard: bool) -> Convert:
    expected = "* or scheme://host[:port]" if wildcard else "scheme://host[:port]"

    def convert(source: str, text: str) -> str:
        if not (_ORIGIN.fullmatch(text) or (wildcard and text == "*")):
            raise usage.UsageError(f"{source} must be {expected}, not {text!r}")
        return text

    return convert


def _endpoint(source: str, text: str) -> str:
    install_unless_chosen()  # before anything imports the default reactor
    from twisted.internet import reactor

    try:
        serverFromString(reactor, text)
    except Exception as error:  # Twisted raises many kinds for a bad description.
        raise usage.UsageError(f"{source} {text!r}: {error}") from None
    return text


@attrs.frozen
class Setting:
    name: str
    default: str
    help: str
    convert: Convert = _text
    repeatable: bool = False
    variable: str = attrs.field()

    @variable.default
    def _variable(self) -> str:
        return "FLEETTRACK_" + self.name.upper().replace("-", "_")


_DEFAULT = Limits()
_SECONDS = _number(0.1, 86400)

SETTINGS: Final = (
    Setting("listen", "tcp:3001", "Twisted endpoint to serve on", _endpoint, repeatable=True),
    Setting(
        "batch-interval",
        "1000",
        "How often viewers get their batch, ms",
        _number(10, 60000),
        variable="FLEETTRACK_BATCH_INTERVAL_MS",
    ),
    Setting("vehicle-ttl", "86400", "Seconds a silent vehicle is kept", _number(1, 365 * 86400)),
    Setting("environment", "production", "Deployment name shown in /stats"),
    Setting("cors-origin", "", "Origin allowed to read /health, /stats", _origin(True), True),
    Setting("allowed-origin", "", "Origin allowed to open a WebSocket", _origin(False), True),
    Setting("auth-secret-file", "", "File holding the HS256 token secret"),
    Setting("auth-public-key-file", "", "PEM public key for RS256/ES256 tokens"),
    Setting(
        "auth-algorithm", "RS256", "Algorithm of --auth-public-key-file", _choice("RS256", "ES256")
    ),
    Setting("max-connections", "10000", "Open WebSockets at most", _number(1, 10**6, True)),
    Setting("max-message-size", "65536", "Bytes per WebSocket message", _number(1024, 2**24, True)),
    Setting(
        "rate-limit",
        f"{_DEFAULT.messages_per_second:g}",
        "Messages/s per connection",
        _number(1, 10**6),
    ),
    Setting(
        "rate-burst",
        f"{_DEFAULT.message_burst:g}",
        "Message burst per connection",
        _number(1, 10**6),
    ),
    Setting(
        "max-subscriptions",
        str(_DEFAULT.max_subscriptions),
        "Subscriptions per connection",
        _number(1, 10**6, True),
    ),
    Setting(
        "max-points-per-second",
        f"{_DEFAULT.points_per_second:g}",
        "Points/s per connection in arrays",
        _number(1, 10**7),
    ),
    Setting("auth-timeout", f"{_DEFAULT.auth_timeout:g}", "Seconds to authenticate", _SECONDS),
    Setting(
        "slow-viewer-timeout",
        f"{_DEFAULT.slow_viewer_timeout:g}",
        "Seconds a viewer may not read",
        _SECONDS,
    ),
    Setting("ping-interval", "25", "Seconds between WebSocket pings", _SECONDS),
    Setting("ping-timeout", "10", "Seconds to answer a ping", _SECONDS),
)


def _help(setting: Setting) -> str:
    default = f", default {setting.default}" if setting.default else ""
    repeat = "; repeatable, space-separated in the variable" if setting.repeatable else ""
    return f"{setting.help} [{setting.variable}{default}{repeat}]"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Real-time vehicle tracking. Every option can also be set through the environment "
        "variable named beside it; the command line wins."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        [s.name, None, None, _help(s)] for s in SETTINGS if not s.repeatable
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        for setting in SETTINGS:
            if setting.repeatable:
                self[setting.name] = []

    def postOptions(self) -> None:
        for setting in SETTINGS:
            self[setting.name] = self._value(setting)
        self["policy"] = Policy(self._verifier(), self._limits())

    def _value(self, setting: Setting) -> Any:
        given = self[setting.name]
        source, text = f"--{setting.name}", given
        if not given:
            text = self._environ.get(setting.variable, "")
            source = setting.variable if text else f"--{setting.name}"
            text = text or setting.default
        if not setting.repeatable:
            return setting.convert(source, text) if text else None
        items = given if given else text.split()
        return [setting.convert(source, item) for item in items]

    def _verifier(self) -> TokenVerifier | None:
        secret_file, key_file = self["auth-secret-file"], self["auth-public-key-file"]
        if secret_file and key_file:
            raise usage.UsageError("give --auth-secret-file or --auth-public-key-file, not both")
        try:
            if secret_file:
                return TokenVerifier.from_secret_file(secret_file)
            if key_file:
                return TokenVerifier.from_public_key_file(key_file, self["auth-algorithm"])
        except AuthConfigError as error:
            raise usage.UsageError(str(error)) from None
        return None

    def _limits(self) -> Limits:
        return Limits(
            messages_per_second=self["rate-limit"],
            message_burst=self["rate-burst"],
            max_subscriptions=self["max-subscriptions"],
            points_per_second=self["max-points-per-second"],
            auth_timeout=self["auth-timeout"],
            slow_viewer_timeout=self["slow-viewer-timeout"],
        )


def _appender(setting: Setting) -> Callable[[Options, str], None]:
    def append(options: Options, value: str) -> None:
        options[setting.name].append(value)

    append.__doc__ = _help(setting)
    return append


# usage.Options finds repeatable options as opt_<name> methods.
for _setting in SETTINGS:
    if _setting.repeatable:
        setattr(Options, "opt_" + _setting.name.replace("-", "_"), _appender(_setting))
