"""`factory-agent status`: exit codes, --json, and --wait following the real daemon on a private bus."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.dbus.conftest import Daemon, get_property, owned, seed_key, wait_for, write_config
from tests.fakes import launcher
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.launcher import agent_argv, agent_env


def status(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return launcher.run(agent_argv("status", "--bus", "session", *args), env=agent_env(bus_address=address),
                        timeout=timeout)


def test_no_daemon_is_69(bus_address: str) -> None:
    done = status(bus_address)
    assert done.returncode == 69 and "cannot reach the daemon" in done.stderr and "Traceback" not in done.stderr
    done = launcher.run(agent_argv("status", "--bus", "session"),
                        env=agent_env(bus_address="unix:path=/nonexistent"), timeout=30)
    assert done.returncode == 69 and "Traceback" not in done.stderr


def test_registered_is_0_and_json_is_stable(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
    try:
        done = status(bus_address, "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "registered" in done.stdout.splitlines()[-1]  # plain lines in a pipe, one per change
        done = status(bus_address, "--json")
        data = json.loads(done.stdout)
        assert done.returncode == 0 and data["schema"] == 1 and data["state"] == "registered"
        assert set(data) == {"schema", "state", "serial", "brand", "model", "device-key-id", "attempts", "last-error",
                             "last-error-message", "action", "next-retry", "identity", "version", "state-since",
                             "started-at", "last-attempt-at", "registered-at", "waiting-for", "deadline"}
        assert (data["waiting-for"], data["deadline"]) == ([], 0)  # nothing waited for once registered
        assert 0 < data["started-at"] <= data["last-attempt-at"] <= data["registered-at"] <= data["state-since"]
        assert data["serial"] == "DBUS-0000000000dbus01" and data["identity"] == {"soc_serial": "0000000000dbus01"}
        human = status(bus_address)
        assert human.returncode == 0 and "State: registered" in human.stdout and "Serial: DBUS-0000000000dbus01" in human.stdout
    finally:
        daemon.stop()


def test_blocked_is_1_with_the_action(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.error_code["request-id"] = ["invalid-api-key"]
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
    try:
        done = status(bus_address, "--wait")
        assert done.returncode == 1
        assert "blocked" in done.stdout and "invalid-api-key: Invalid API key used" in done.stdout
        assert "action: the vault does not accept this api-key" in done.stdout
        human = status(bus_address)
        assert human.returncode == 1 and "Action: the vault does not accept this api-key" in human.stdout
    finally:
        daemon.stop()


def test_in_progress_is_2_and_a_wait_that_times_out_is_3(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.status["request-id"] = [Forced(503, retry_after="120")]
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
    try:
        wait_for(lambda: owned(bus_address) and get_property(bus_address, "State") == 's "waiting-retry"')
        done = status(bus_address, "--json")
        data = json.loads(done.stdout)
        assert done.returncode == 2 and data["state"] == "waiting-retry" and data["next-retry"] > time.time() * 1e6
        started = time.monotonic()
        done = status(bus_address, "--wait", "--timeout", "1")
        assert done.returncode == 3 and 1 <= time.monotonic() - started < 10
        assert "waiting-retry" in done.stdout
    finally:
        daemon.stop()


def test_identifying_shows_the_fields_it_waits_for_and_its_deadline(tmp_path: Path, bus_address: str, backend: str,
                                                                     lab: FaultyVault) -> None:
    """A required field no source gives: identifying names it and when the wait ends; then blocked on it."""
    state, config = tmp_path / "state", write_config(tmp_path, lab)
    config.write_text(config.read_text().replace("wait-seconds = 0", 'wait-seconds = 6\nrequired = ["mmc_cid"]'))
    seed_key(state)
    started = time.time()
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: owned(bus_address) and get_property(bus_address, "WaitingFor") == 'as 1 "mmc_cid"')
        data = json.loads(status(bus_address, "--json").stdout)
        assert (data["state"], data["waiting-for"]) == ("identifying", ["mmc_cid"]), data
        assert started + 6 <= data["deadline"] / 1e6 <= time.time() + 6  # identity.wait-seconds from its start
        until = time.strftime("%H:%M:%S", time.localtime(data["deadline"] / 1e6))
        text = status(bus_address).stdout
        assert f"Waiting for: mmc_cid until {until} (" in text and "s left) (identity.required)" in text, text
        done = status(bus_address, "--wait", "--timeout", "30")
        assert done.returncode == 1, done.stdout + done.stderr
        data = json.loads(status(bus_address, "--json").stdout)
        assert (data["state"], data["last-error"], data["waiting-for"], data["deadline"]) == (
            "blocked", "identity", [], 0), data
        assert "mmc_cid" in data["last-error-message"]
    finally:
        daemon.stop()
