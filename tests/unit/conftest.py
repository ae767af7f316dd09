"""unit/ is pure: nothing leaves the process (no child processes, no non-loopback sockets)."""

from __future__ import annotations

import socket
import subprocess

import pytest


@pytest.fixture(autouse=True)
def _no_outside_world(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests must not start processes; move the test to tests/system")

    real_connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"unit tests must not reach {host}")
        real_connect(self, address)

    monkeypatch.setattr(subprocess.Popen, "__init__", no_subprocess)
    monkeypatch.setattr(socket.socket, "connect", loopback_only)
