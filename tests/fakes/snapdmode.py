"""Helpers for snapd-mode tests: the agent's config, and hooks/prepare-device run as snapd runs it.

The hook gets a PATH where ``snapctl`` is tests/fakes/snapctl (it records its
calls) and ``factory-agent`` runs this tree's CLI with the interpreter under
test. It is run with pipes on stdout and stderr, as snapd runs hooks, and the
run records when each pipe reached EOF: a child of the hook that kept one open
would hold snapd for up to 10 minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fakes.agentconf import write_agent_config
from tests.fakes.launcher import sh_exec

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "hooks" / "prepare-device"
SERIAL_HOOK = REPO / "hooks" / "prepare-serial-request"
FAKE_SNAPCTL = REPO / "tests" / "fakes" / "snapctl"
SOC_SERIAL = "00000000snapd001"
TEMPLATE = "SNAPD-{soc_serial}"


def write_snapd_config(directory: Path, url: str, lab_dir: Path, *, api_key_file: Path | None = None,
                       listen: str = "127.0.0.1:0", hardware_key: str = "", pkcs11_module: str = "") -> Path:
    """agent.toml for snapd mode: the lab vault at ``url`` and a relay on a free loopback port (with
    ``hardware_key``: secure onboarding, no api-key)."""
    path = write_agent_config(directory, url, lab_dir, template=TEMPLATE, soc_serial=SOC_SERIAL, api_key_file=api_key_file,
                              hardware_key=hardware_key, pkcs11_module=pkcs11_module)
    path.write_text(f'mode = "snapd"\n{path.read_text()}\n[relay]\nlisten = "{listen}"\n')
    return path


def tool_dir(directory: Path) -> Path:
    """A bin directory with the fake snapctl and a factory-agent command running this tree's CLI."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "snapctl").is_symlink():  # a second hook run (a restarted daemon) reuses it
        (bin_dir / "snapctl").symlink_to(FAKE_SNAPCTL)
    cli = bin_dir / "factory-agent"
    cli.write_text("#!/bin/sh\n" + sh_exec('"$@"') + "\n")
    cli.chmod(0o755)
    return bin_dir


def hook_env(directory: Path, bus_address: str, backend: str = "dbus_next", bound: int = 30, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACTORY_AGENT", "SNAP"))}
    env.update(PATH=f"{tool_dir(directory)}:/usr/bin:/bin", DBUS_SESSION_BUS_ADDRESS=bus_address,
               FACTORY_AGENT_DBUS=backend, FACTORY_AGENT_BUS="session", FACTORY_AGENT_UNIT="",
               FACTORY_AGENT_SETTINGS_TIMEOUT=str(bound), SNAPCTL_LOG=str(directory / "snapctl.log"))
    env.update(extra)
    return env


@dataclass
class HookRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # from start to exit
    eof_lag: float  # from exit to EOF on both pipes


def run_hook(env: dict[str, str], timeout: float = 60.0, hook: Path = HOOK) -> HookRun:
    started = time.monotonic()
    proc = subprocess.Popen([str(hook)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd="/")
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    eof: dict[str, float] = {}

    def drain(name: str, stream: object) -> None:
        for block in iter(lambda: stream.read1(4096), b""):  # type: ignore[attr-defined]
            chunks[name].append(block)
        eof[name] = time.monotonic()

    readers = [threading.Thread(target=drain, args=(name, stream), daemon=True)
               for name, stream in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    returncode = proc.wait(timeout=timeout)
    exited = time.monotonic()
    for reader in readers:
        reader.join(timeout=10)  # a pipe still open after this is a failure the caller sees as a huge lag
    lag = max(eof.get("out", float("inf")), eof.get("err", float("inf"))) - exited
    return HookRun(returncode, b"".join(chunks["out"]).decode(), b"".join(chunks["err"]).decode(),
                   exited - started, max(lag, 0.0))


def snapctl_calls(directory: Path) -> list[list[str]]:
    """The fake snapctl's calls, each the list of its arguments."""
    path = directory / "snapctl.log"
    if not path.exists():
        return []
    fields = path.read_bytes().decode().split("\0")[:-1]
    calls, i = [], 0
    while i < len(fields):
        count = int(fields[i])
        calls.append(fields[i + 1:i + 1 + count])
        i += 1 + count
    return calls


def set_values(call: list[str]) -> dict[str, object]:
    """``snapctl set k=v ...`` as snapctl reads it: each value is JSON when it parses as JSON."""
    assert call[0] == "set", call
    values: dict[str, object] = {}
    for argument in call[1:]:
        key, _, raw = argument.partition("=")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values
