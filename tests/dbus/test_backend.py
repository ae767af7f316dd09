"""Which D-Bus library the daemon uses: dbus-fast where it is installed (Debian 12 and 13 ship both),
dbus-next otherwise or when FACTORY_AGENT_DBUS asks for it; a name that is not installed is refused
by name. Each case is a fresh interpreter (the choice is made once, at import)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = ("from agent.dbus_service import backend\n"
         "print(*(module.__name__ for module in backend()))\n")


def chosen(wanted: str = "", strict: bool = True) -> subprocess.CompletedProcess[str]:
    """The probe's run, FACTORY_AGENT_DBUS=wanted; strict: importing the library may not warn of a deprecation
    (dbus-next's import does, on Python 3.13)."""
    env = {"PATH": "/usr/bin:/bin", **({"FACTORY_AGENT_DBUS": wanted} if wanted else {})}
    return subprocess.run([sys.executable, *(["-W", "error::DeprecationWarning"] if strict else []), "-c", PROBE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_dbus_fast_is_preferred_where_both_are_installed() -> None:
    if importlib.util.find_spec("dbus_fast") is None:
        pytest.skip("dbus-fast is not installed in this leg")
    done = chosen()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dbus_fast", "dbus_fast.service", "dbus_fast.aio"]


def test_dbus_next_on_request() -> None:
    if importlib.util.find_spec("dbus_next") is None:
        pytest.skip("dbus-next is not installed in this leg")
    done = chosen("dbus_next", strict=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dbus_next", "dbus_next.service", "dbus_next.aio"]


def test_a_library_that_is_not_installed_is_named() -> None:
    done = chosen("dbus_nonexistent")
    assert done.returncode != 0
    assert "cannot use D-Bus: none of dbus_nonexistent is installed" in done.stderr
