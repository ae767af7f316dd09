"""A private dbus-daemon per test session, the lab vault, and the real daemon as a child process (the launcher's)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.labvault import LabVault
from tests.fakes import launcher
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.launcher import Agent, agent_argv, agent_env, run_args

BUS_NAME = "io.factoryagent.Agent1"
PATH = "/io/factoryagent/Agent1"


@pytest.fixture(scope="session")
def bus_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private session-type bus: nothing from the host's buses leaks in."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon (Debian package dbus-daemon) is not installed")
    socket_dir = tmp_path_factory.mktemp("bus")
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1", f"--address=unix:dir={socket_dir}"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    yield address
    proc.terminate()
    proc.wait(timeout=5)


@pytest.fixture(params=["dbus_next", "dbus_fast"])
def backend(request: pytest.FixtureRequest) -> str:
    """The daemon's D-Bus library: every D-Bus test runs on both."""
    pytest.importorskip(request.param)
    return str(request.param)


def write_config(tmp: Path, lab: LabVault, api_key_file: Path | None = None) -> Path:
    return write_agent_config(tmp, lab.url, lab.directory, template="DBUS-{soc_serial}", soc_serial="0000000000dbus01",
                              api_key_file=api_key_file)


class Daemon(Agent):
    """`factory-agent run --bus session` on the private bus (tests/fakes/launcher.py's Agent)."""

    def __init__(self, address: str, backend: str, config: Path, state: Path, *extra: str,
                 wrapper: Sequence[str] = ()) -> None:
        super().__init__(*run_args(config, state, *extra, bus="session"), wrapper=wrapper,
                         env=agent_env(bus_address=address, backend=backend), stdin=None, stdout=None)

    def stop(self, timeout: float = 15.0, signum: int = signal.SIGTERM, check: bool = True) -> str:
        return super().stop(timeout, signum, check)


def busctl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["busctl", f"--address={address}", *args], capture_output=True, text=True, timeout=10, check=False)


def get_property(address: str, name: str) -> str:
    done = busctl(address, "get-property", BUS_NAME, PATH, BUS_NAME, name)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def status_json(address: str, backend: str) -> dict[str, Any]:
    """`factory-agent status --json` on the private bus (the daemon there: 0, 1 or 2)."""
    done = launcher.run(agent_argv("status", "--json", "--bus", "session"),
                        env=agent_env(bus_address=address, backend=backend))
    assert done.returncode in (0, 1, 2), done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def state_of(address: str) -> str:
    """The State property as busctl prints it (e.g. 's "blocked"'); "" while the daemon is not on the bus yet."""
    done = busctl(address, "get-property", BUS_NAME, PATH, BUS_NAME, "State")
    return done.stdout.strip() if done.returncode == 0 else ""


def wait_for(predicate: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def owned(address: str) -> bool:
    """Whether the agent's name has an owner on the bus: asked of dbus-daemon itself (`busctl status NAME`
    also reads the owner's cgroup, and fails on every call where no cgroup tree is mounted)."""
    done = busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                  "NameHasOwner", "s", BUS_NAME)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "b true"


class Recorder:
    """An independent client (dbus-next) that records every PropertiesChanged of the agent, in order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.signals: list[dict[str, Any]] = []

    async def __aenter__(self) -> Recorder:
        from dbus_next import Message
        from dbus_next.aio import MessageBus

        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.add_message_handler(self._on_message)
        rule = f"type='signal',path='{PATH}',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"
        await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                    interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        return self

    def _on_message(self, message: Any) -> None:
        if message.member == "PropertiesChanged" and message.path == PATH and message.body[0] == BUS_NAME:
            self.signals.append({k: v.value for k, v in message.body[1].items()})

    async def call(self, member: str, signature: str = "", body: list[Any] | None = None,
                   interface: str = BUS_NAME) -> Any:
        from dbus_next import Message

        return await self.bus.call(Message(destination=BUS_NAME, path=PATH, interface=interface, member=member,
                                           signature=signature, body=body or []))

    async def get_all(self) -> dict[str, Any]:
        reply = await self.call("GetAll", "s", [BUS_NAME], interface="org.freedesktop.DBus.Properties")
        return {k: v.value for k, v in reply.body[0].items()}

    async def until(self, predicate: Any, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; signals: {self.signals}"
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        self.bus.disconnect()
