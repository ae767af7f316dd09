"""hooks/prepare-device as snapd runs it: a fake snapctl on PATH, the real agent on a private bus.

The hook must set device-service.url, device-service.headers (the relay's token,
nothing else), registration.proposed-serial and registration.body from the
running agent (and never an api-key), fail within its
bound with one clear line when no agent answers, and leave nothing behind that
holds its stdout or stderr (snapd waits for both to close).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from agent import identity, relay
from agent.labvault import LabVault
from tests.conftest import REPO
from tests.dbus.conftest import BUS_NAME, Daemon, Recorder, busctl, owned, wait_for, write_config
from tests.fakes.launcher import sh_exec
from tests.fakes.snapdmode import (HOOK, SOC_SERIAL, hook_env, run_hook, set_values, snapctl_calls,
                                   write_snapd_config)

EOF_LAG = 2.0  # seconds between the hook's exit and EOF on its pipes: only a leftover child could take longer


def _expected_body() -> str:
    found = identity.build_identity([], {"soc_serial": SOC_SERIAL})
    return identity.registration_body(found, allow_weak=False).decode()


def test_hook_is_posix_sh_and_shellcheck_clean() -> None:
    assert HOOK.read_text().startswith("#!/bin/sh\n") and os.access(HOOK, os.X_OK)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck (Debian package shellcheck; make deps) is not installed")
    done = subprocess.run(["shellcheck", "-s", "sh", str(HOOK), str(REPO / "tests" / "fakes" / "snapctl")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout


def test_hook_sets_the_four_keys_from_the_running_agent(tmp_path: Path, bus_address: str, backend: str,
                                                         lab: LabVault) -> None:
    daemon = Daemon(bus_address, backend, write_snapd_config(tmp_path, lab.url, lab.directory), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        run = run_hook(hook_env(tmp_path, bus_address, backend))

        async def settings() -> dict[str, str]:
            async with Recorder(bus_address) as rec:
                reply = await rec.call("GetRegistrationSettings")
                return {k: v for k, v in reply.body[0].items()}

        served = asyncio.run(settings())
    finally:
        log = daemon.stop()
    assert run.returncode == 0, run.stderr
    assert (run.stdout, run.stderr) == ("", "")
    assert run.eof_lag < EOF_LAG
    calls = snapctl_calls(tmp_path)
    assert len(calls) == 1 and calls[0][0] == "set"
    values = set_values(calls[0])
    headers = values.pop("device-service.headers")
    assert headers == json.loads(served.pop("device-service.headers"))  # a JSON object: snapd reads a map
    assert values == served  # what D-Bus serves, each other value stored by snapctl as a string
    token = (tmp_path / "state" / relay.TOKEN_FILE).read_text().strip()
    assert headers == {relay.TOKEN_HEADER: token} and len(token) == 64  # the relay's token, and nothing else
    assert values["registration.proposed-serial"] == f"SNAPD-{SOC_SERIAL}"
    assert values["registration.body"] == _expected_body()
    url = str(values["device-service.url"])
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1/")
    recorded = "\0".join(calls[0])
    assert "api-key" not in recorded.lower() and lab.api_key not in recorded
    assert lab.api_key not in log and token not in log and "Traceback" not in log
    assert token not in run.stdout + run.stderr


def test_unreachable_agent_fails_within_the_bound_with_one_line(tmp_path: Path, bus_address: str) -> None:
    assert not owned(bus_address)
    run = run_hook(hook_env(tmp_path, bus_address, bound=2))
    assert run.returncode != 0
    assert run.seconds < 2 + 10  # the bound, plus starting Python twice on a busy machine
    assert run.stderr.count("\n") == 1 and "no registration settings from factory-agent within 2 s" in run.stderr
    assert run.eof_lag < EOF_LAG
    assert snapctl_calls(tmp_path) == []


def test_no_bus_at_all_fails_within_the_bound(tmp_path: Path) -> None:
    run = run_hook(hook_env(tmp_path, f"unix:path={tmp_path}/no-such-bus", bound=2))
    assert run.returncode != 0 and run.seconds < 2 + 10
    assert run.stderr.count("\n") == 1 and "cannot reach the session bus" in run.stderr
    assert snapctl_calls(tmp_path) == []


def test_a_standalone_agent_refuses_at_once(tmp_path: Path, bus_address: str, lab: LabVault) -> None:
    daemon = Daemon(bus_address, "dbus_next", write_config(tmp_path, lab), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        run = run_hook(hook_env(tmp_path, bus_address, bound=60))
    finally:
        daemon.stop()
    assert run.returncode == 1 and run.seconds < 30
    assert run.stderr.count("\n") == 1 and "WrongMode" in run.stderr and "standalone mode" in run.stderr
    assert snapctl_calls(tmp_path) == []


def test_the_hook_activates_the_agent_and_no_child_keeps_its_output(tmp_path: Path, lab: LabVault) -> None:
    """D-Bus activation starts the agent (as snapd's activates-on does): it outlives the hook, not on its pipes."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed")
    services, socket_path = tmp_path / "services", tmp_path / "bus"
    services.mkdir()
    starter = tmp_path / "start-agent"
    config, state, log = write_snapd_config(tmp_path, lab.url, lab.directory), tmp_path / "state", tmp_path / "agent.log"
    command = sh_exec("run", "--bus", "session", "--config", f'"{config}"', "--state-dir", f'"{state}"', f'>>"{log}" 2>&1')
    starter.write_text(f"""#!/bin/sh
export DBUS_SESSION_BUS_ADDRESS="$DBUS_STARTER_ADDRESS" FACTORY_AGENT_DBUS=dbus_next
{command}
""")
    starter.chmod(0o755)
    (services / f"{BUS_NAME}.service").write_text(f"[D-BUS Service]\nName={BUS_NAME}\nExec={starter}\n")
    (tmp_path / "bus.conf").write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket_path}</listen>
  <servicedir>{services}</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
""")
    with open(tmp_path / "dbus.log", "wb") as bus_log:
        bus = subprocess.Popen(["dbus-daemon", f"--config-file={tmp_path / 'bus.conf'}", "--nofork"],
                               stdin=subprocess.DEVNULL, stdout=bus_log, stderr=bus_log)
    address = f"unix:path={socket_path}"
    try:
        wait_for(lambda: socket_path.exists(), 10)
        assert not owned(address)
        run = run_hook(hook_env(tmp_path, address, bound=60))
        assert run.returncode == 0, run.stderr + (tmp_path / "agent.log").read_text()
        assert run.eof_lag < EOF_LAG
        assert set(set_values(snapctl_calls(tmp_path)[0])) == {
            "device-service.url", "device-service.headers", "registration.proposed-serial", "registration.body"}
        assert owned(address)  # the agent runs on, as a service of the bus, not of the hook
        _stop_activated_agent(address)
    finally:
        bus.terminate()
        bus.wait(timeout=10)
    assert "Traceback" not in (tmp_path / "agent.log").read_text()


def _stop_activated_agent(address: str) -> None:
    """SIGTERM the agent the bus started for us, by the PID the bus reports for its name."""
    done = busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                  "GetConnectionUnixProcessID", "s", BUS_NAME)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[1])
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not owned(address), 15)


@pytest.mark.parametrize("bound, reason", [
    ("08", "without leading zeros"), ("09", "without leading zeros"), ("010", "without leading zeros"),
    ("0", "without leading zeros"), ("-1", "without leading zeros"), ("5s", "without leading zeros"),
    ("541", "at most 540"), ("99999999999999999999", "at most 540"),
])
def test_a_bad_or_too_long_bound_is_one_clear_line(tmp_path: Path, bound: str, reason: str) -> None:
    run = run_hook(hook_env(tmp_path, f"unix:path={tmp_path}/no-such-bus", bound=2,
                            FACTORY_AGENT_SETTINGS_TIMEOUT=bound))
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("prepare-device: FACTORY_AGENT_SETTINGS_TIMEOUT")
    assert reason in run.stderr and "Illegal number" not in run.stderr and not snapctl_calls(tmp_path)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="timeout(1) (coreutils) backs up the bound")
def test_a_hanging_command_is_stopped_within_the_bound_and_leaves_no_child(tmp_path: Path) -> None:
    hang = tmp_path / "hanging-factory-agent"
    hang.write_text("#!/bin/sh\ntrap '' TERM\nsleep 1000 &\nwait\nwait\n")  # ignores --timeout and SIGTERM
    hang.chmod(0o755)
    run = run_hook(hook_env(tmp_path, f"unix:path={tmp_path}/no-such-bus", bound=1, FACTORY_AGENT_CLI=str(hang)))
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "did not finish within 1 s" in run.stderr
    assert run.seconds < 1 + 15 + 5 + 10  # the bound, timeout(1)'s grace and its kill delay, a busy machine
    assert run.eof_lag < EOF_LAG  # the killed command's children do not hold the hook's output
