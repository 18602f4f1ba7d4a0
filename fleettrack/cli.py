"""``fleettrack``: operator commands that need no running server.

``fleettrack token`` mints an HS256 token from the server's secret file;
``fleettrack gen-secret`` makes a new secret.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from collections.abc import Sequence
from typing import Final

from fleettrack.auth import AuthConfigError, load_secret, mint_token

SECRET_FILE_ENV: Final = "FLEETTRACK_AUTH_SECRET_FILE"
SECRET_BYTES: Final = 32

_DURATION: Final = re.compile(r"([0-9]+)([smhd]?)")
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: What a pattern may contain: vehicle id characters (see telemetry) and glob syntax.
_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:\-*?\[\]!]+")


def parse_duration(text: str) -> int:
    """Seconds in ``30s``, ``15m``, ``12h``, ``7d`` or a plain ``3600``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a whole number with s, m, h or d (e.g. 12h)"
        )
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be positive")
    return seconds


def _pattern(text: str) -> str:
    """A vehicle id or glob; catches typos like ``'a-*,b-*'`` that could never match."""
    if _PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} can never match a vehicle id (letters, digits, _ . : - and the"
            " globs * ? [...]); repeat the option for several patterns"
        )
    return text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleettrack", description="fleettrack operator commands.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    token = commands.add_parser(
        "token",
        help="mint an access token",
        description="Mint an HS256 token signed with the server's secret and print it.",
    )
    token.add_argument(
        "--secret-file",
        default=os.environ.get(SECRET_FILE_ENV),
        help=f"file holding the server's HS256 secret (default: ${SECRET_FILE_ENV})",
    )
    token.add_argument("--sub", required=True, help="who the token is for")
    token.add_argument(
        "--watch",
        action="append",
        default=[],
        type=_pattern,
        metavar="PATTERN",
        help="vehicle id or glob the holder may subscribe to ('*' = all); repeatable",
    )
    token.add_argument(
        "--vehicles",
        action="append",
        default=[],
        type=_pattern,
        metavar="PATTERN",
        help="vehicle id or glob the holder may publish as; repeatable",
    )
    token.add_argument(
        "--ttl",
        required=True,
        type=parse_duration,
        help="lifetime: 30s, 15m, 12h, 7d or plain seconds",
    )

    gen_secret = commands.add_parser(
        "gen-secret",
        help="print a new random secret",
        description=f"Print a random {SECRET_BYTES * 2}-hex-character secret for"
        " --auth-secret-file.",
    )
    gen_secret.add_argument(
        "--output",
        metavar="PATH",
        help="write it to a new file readable only by you instead of printing it",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse has already written usage or help; hand back its status.
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "token":
        return _token(args)
    return _gen_secret(args)


def _fail(message: str) -> int:
    sys.stderr.write(f"fleettrack: error: {message}\n")
    return 2


def _token(args: argparse.Namespace) -> int:
    if not args.secret_file:
        return _fail(f"--secret-file is required (or set {SECRET_FILE_ENV})")
    if not args.sub.strip():
        return _fail("--sub must not be empty")
    if not args.watch and not args.vehicles:
        return _fail("a token needs at least one --watch or --vehicles pattern")
    try:
        secret = load_secret(args.secret_file)
    except AuthConfigError as error:
        return _fail(str(error))
    token = mint_token(secret, args.sub, args.ttl, vehicles=args.vehicles, watch=args.watch)
    sys.stdout.write(token + "\n")
    return 0


def _gen_secret(args: argparse.Namespace) -> int:
    secret = secrets.token_hex(SECRET_BYTES) + "\n"
    if args.output is None:
        sys.stdout.write(secret)
        return 0
    try:
        # O_EXCL: never overwrite the secret a running server uses.
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        return _fail(f"cannot create {args.output}: {error.strerror}")
    with os.fdopen(fd, "w") as file:
        file.write(secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
