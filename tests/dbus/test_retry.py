"""The technician's loop on the real daemon and the real CLI: fail -> read -> fix -> retry -> registered.

A wrong api-key blocks; fixing the file and running `factory-agent retry` registers with no restart
(Retry() reads the configuration and its secrets again); a restart makes a fresh attempt too, and so
does `run --once`; a configuration broken before the retry blocks with that configuration error,
naming the key and file, and a second retry after fixing it registers. The previous error is gone
from D-Bus as soon as the fresh attempt starts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.dbus.conftest import Daemon, seed_key, state_of, status_json, wait_for, write_config
from tests.fakes import launcher
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import agent_argv, agent_env, run_args

WRONG = "wrong-api-key-0123456789"
SERIAL = "DBUS-0000000000dbus01"


def _api_key_file(tmp: Path, key: str) -> Path:
    path = tmp / "api-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def _retry(address: str, backend: str) -> subprocess.CompletedProcess[str]:
    return launcher.run(agent_argv("retry", "--bus", "session"), env=agent_env(bus_address=address, backend=backend))


def test_wrong_api_key_fixed_then_factory_agent_retry_registers_without_a_restart(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    key_file = _api_key_file(tmp_path, WRONG)
    config, state = write_config(tmp_path, lab, api_key_file=key_file), tmp_path / "state"
    seed_key(state)
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: state_of(bus_address) == 's "blocked"')
        blocked = status_json(bus_address, backend)
        assert blocked["last-error"] == "invalid-api-key"
        assert "run: factory-agent retry" in str(blocked["action"])
        _api_key_file(tmp_path, lab.api_key)  # the technician fixes the file
        done = _retry(bus_address, backend)
        assert done.returncode == 0 and "fresh attempt" in done.stdout, done.stderr
        wait_for(lambda: state_of(bus_address) == 's "registered"')
        registered = status_json(bus_address, backend)
        assert (registered["serial"], registered["last-error"], registered["action"]) == (SERIAL, "", "")
        assert daemon.poll() is None  # the same daemon, no restart
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr and WRONG not in daemon.stderr and lab.api_key not in daemon.stderr


def test_a_configuration_broken_before_the_retry_blocks_with_its_error_and_a_second_retry_registers(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    key_file = _api_key_file(tmp_path, WRONG)
    config, state = write_config(tmp_path, lab, api_key_file=key_file), tmp_path / "state"
    seed_key(state)
    good = config.read_text()
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: state_of(bus_address) == 's "blocked"')
        _api_key_file(tmp_path, lab.api_key)
        config.write_text(good.replace("[serial]", "[serial]\ntemplat = 1"))  # a typo while fixing things
        assert _retry(bus_address, backend).returncode == 0
        wait_for(lambda: status_json(bus_address, backend)["last-error"] == "config")
        broken = status_json(bus_address, backend)
        assert broken["state"] == "blocked" and "serial.templat" in str(broken["last-error-message"])
        assert str(config) in str(broken["last-error-message"])
        assert "fix the file and key it names" in str(broken["action"])
        assert daemon.poll() is None  # blocked, not crashed
        config.write_text(good)
        assert _retry(bus_address, backend).returncode == 0
        wait_for(lambda: state_of(bus_address) == 's "registered"')
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr


def test_a_restart_and_run_once_make_a_fresh_attempt_after_the_fix(tmp_path: Path, lab: FaultyVault) -> None:
    key_file = _api_key_file(tmp_path, WRONG)
    config, state = write_config(tmp_path, lab, api_key_file=key_file), tmp_path / "state"
    seed_key(state)
    first = launcher.run(agent_argv(*run_args(config, state, once=True)))
    assert first.returncode == 1 and "invalid-api-key" in first.stderr
    recorded = json.loads((state / "state.json").read_text())
    assert recorded["blocked-by"] == "invalid-api-key"
    again = launcher.run(agent_argv(*run_args(config, state, once=True)))  # not fixed: tried again, blocked again
    assert again.returncode == 1 and "trying again" in again.stderr and lab.requests[("POST", "/v1/request-id")] == 2
    _api_key_file(tmp_path, lab.api_key)
    fixed = launcher.run(agent_argv(*run_args(config, state, once=True)))
    assert fixed.returncode == 0, fixed.stderr
    recorded = json.loads((state / "state.json").read_text())
    assert (recorded["phase"], recorded["serial"], recorded["blocked-by"], recorded["last-error"]) == (
        "registered", SERIAL, "", "")


def test_retry_with_no_daemon_says_so_and_exits_69(tmp_path: Path, bus_address: str, backend: str) -> None:
    done = _retry(bus_address, backend)
    assert done.returncode == 69
    assert "no factory-agent daemon" in done.stderr and "Traceback" not in done.stderr
