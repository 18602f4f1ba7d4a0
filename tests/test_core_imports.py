"""The transport-free core installs no reactor and pulls in no Autobahn."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE_MODULES = [
    "fleettrack.errors",
    "fleettrack.telemetry",
    "fleettrack.registry",
    "fleettrack.buffer",
    "fleettrack.hub",
    "fleettrack.wire",
    "fleettrack.session",
]

_PROBE = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(
    name for name in sys.modules
    if name == "twisted.internet.reactor" or name == "autobahn" or name.startswith("autobahn.")
)))
"""


def forbidden_modules_after_importing(*modules: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_core_imports_no_reactor_and_no_autobahn() -> None:
    assert forbidden_modules_after_importing(*CORE_MODULES) == []


@pytest.mark.parametrize("module", ["fleettrack.hub", "fleettrack.session"])
def test_each_core_entry_point_alone(module: str) -> None:
    assert forbidden_modules_after_importing(module) == []


def test_the_probe_sees_a_reactor_and_autobahn() -> None:
    """Guards the probe itself: it does notice the modules it looks for."""
    loaded = forbidden_modules_after_importing("twisted.internet.reactor", "fleettrack.websocket")
    assert "twisted.internet.reactor" in loaded
    assert "autobahn.twisted.websocket" in loaded
