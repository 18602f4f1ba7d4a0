"""The operator command: minting tokens and generating secrets, run in-process."""

from __future__ import annotations

import argparse
import stat
import time
from pathlib import Path

import pytest

from fleettrack.auth import TokenVerifier
from fleettrack.cli import SECRET_FILE_ENV, main, parse_duration

SECRET = b"0123456789abcdef" * 4


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    return path


def test_token_round_trip(secret_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    status = main(
        [
            "token",
            "--secret-file",
            str(secret_file),
            "--sub",
            "dispatch",
            "--watch",
            "fleet-a-*",
            "--watch",
            "bus-1",
            "--vehicles",
            "truck_*",
            "--ttl",
            "12h",
        ]
    )
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    token = out.strip()
    assert out == token + "\n"

    grant = TokenVerifier.from_secret_file(secret_file).verify(token, time.time())
    assert grant.subject == "dispatch"
    assert grant.watch == ("fleet-a-*", "bus-1")
    assert grant.vehicles == ("truck_*",)
    assert before + 12 * 3600 <= grant.expires_at <= time.time() + 12 * 3600 + 1
    assert grant.may_watch("fleet-a-7") and not grant.may_watch("fleet-b-1")
    assert grant.may_publish("truck_9") and not grant.may_publish("fleet-a-7")


def test_secret_file_from_environment(
    secret_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_FILE_ENV, str(secret_file))
    assert main(["token", "--sub", "viewer", "--watch", "*", "--ttl", "30s"]) == 0
    grant = TokenVerifier.from_secret(SECRET).verify(capsys.readouterr().out.strip(), time.time())
    assert grant.watches_everything and grant.vehicles == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("3600", 3600), (" 5m ", 300)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "0", "0s", "-5", "1.5h", "12x", "h", "12 h", "1h30m", "\u0661\u0662h"]
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        parse_duration(text)


def run_failing(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err


@pytest.mark.parametrize("ttl", ["12x", "0", "-1h", "soon"])
def test_bad_ttl(secret_file: Path, capsys: pytest.CaptureFixture[str], ttl: str) -> None:
    argv = ["token", "--secret-file", str(secret_file), "--sub", "d", "--watch", "*"]
    err = run_failing([*argv, f"--ttl={ttl}"], capsys)
    assert "invalid duration" in err


def test_missing_required_options(secret_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_failing(["token", "--secret-file", str(secret_file), "--watch", "*"], capsys)
    assert "--sub" in err and "--ttl" in err


def test_missing_secret_file_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    err = run_failing(["token", "--sub", "d", "--watch", "*", "--ttl", "1h"], capsys)
    assert "--secret-file is required" in err


def test_unreadable_secret_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["token", "--secret-file", str(tmp_path / "absent"), "--sub", "d", "--watch", "*"]
    err = run_failing([*argv, "--ttl", "1h"], capsys)
    assert "cannot read secret file" in err


def test_short_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "secret"
    path.write_text("too-short\n")
    argv = ["token", "--secret-file", str(path), "--sub", "d", "--watch", "*", "--ttl", "1h"]
    assert "at least 32" in run_failing(argv, capsys)


def test_token_without_rights(secret_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_failing(
        ["token", "--secret-file", str(secret_file), "--sub", "d", "--ttl", "1h"], capsys
    )
    assert "--watch or --vehicles" in err


def test_blank_subject(secret_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["token", "--secret-file", str(secret_file), "--sub", " ", "--watch", "*"]
    assert "--sub" in run_failing([*argv, "--ttl", "1h"], capsys)


@pytest.mark.parametrize("pattern", ["fleet-a-*,fleet-b-*", "fleet a", ""])
def test_pattern_that_can_never_match(
    secret_file: Path, capsys: pytest.CaptureFixture[str], pattern: str
) -> None:
    argv = ["token", "--secret-file", str(secret_file), "--sub", "d", "--ttl", "1h"]
    err = run_failing([*argv, "--vehicles", pattern], capsys)
    assert "can never match a vehicle id" in err


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert "usage" in run_failing([], capsys)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--help"]) == 0
    assert "--ttl" in capsys.readouterr().out


def test_gen_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gen-secret"]) == 0
    first = capsys.readouterr().out
    assert main(["gen-secret"]) == 0
    second = capsys.readouterr().out
    for out in (first, second):
        secret = out.removesuffix("\n")
        assert len(secret) == 64 and int(secret, 16) >= 0
    assert first != second


def test_gen_secret_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "secret"
    assert main(["gen-secret", "--output", str(path)]) == 0
    assert capsys.readouterr().out == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    TokenVerifier.from_secret_file(path)  # usable as is

    before = path.read_bytes()
    assert "cannot create" in run_failing(["gen-secret", "--output", str(path)], capsys)
    assert path.read_bytes() == before
