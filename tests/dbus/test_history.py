"""The step history: `factory-agent status --long` (GetHistory() on D-Bus, state.json's with no daemon) after a
registration with one retry, read by the real CLI from the real daemon on a private bus."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.dbus.conftest import BUS_NAME, PATH, Daemon, busctl, seed_key, wait_for, write_config
from tests.fakes import launcher
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.launcher import agent_argv, agent_env

STEPS_WITH_ONE_RETRY = ["started", "identity", "request-id", "serial-request", "error", "request-id", "serial-request",
                        "registered"]


def _status(address: str, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    return launcher.run(agent_argv("status", "--bus", "session", *args), env=agent_env(bus_address=address, backend=backend),
                        timeout=60)


def _registered(address: str) -> bool:
    done = busctl(address, "get-property", BUS_NAME, PATH, BUS_NAME, "State")
    return done.returncode == 0 and done.stdout.strip() == 's "registered"'


def test_the_history_of_a_registration_with_one_retry_lists_its_steps_in_order_with_times(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    config, state = write_config(tmp_path, lab), tmp_path / "state"
    seed_key(state)  # the key is there: its step is not in this run's history
    lab.faults.status["serial"] = [Forced(503, retry_after="1")]
    started = time.time()
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: _registered(bus_address), 60)
        as_json = _status(bus_address, backend, "--long", "--json")
        text = _status(bus_address, backend, "--long")
    finally:
        daemon.stop()
    assert as_json.returncode == 0 and text.returncode == 0, (as_json.stderr, text.stderr)
    history = json.loads(as_json.stdout)["history"]
    steps = [e["step"] for e in history]
    if steps[1:3] == ["request-id", "identity"]:  # gathered beside the request-id: either may come first
        history[1:3] = history[2:0:-1]
        steps = [e["step"] for e in history]
    assert steps == STEPS_WITH_ONE_RETRY, history
    times = [e["at"] / 1e6 for e in history[2:]]
    assert times == sorted(times) and history[0]["at"] <= min(history[1]["at"], history[2]["at"])
    assert started - 1 < history[0]["at"] / 1e6 and times[-1] < time.time() + 1
    error = history[4]
    assert error["detail"].startswith("vault-transient: ") and "503" in error["detail"]
    assert history[3]["detail"].startswith("attempt 1, to ") and history[6]["detail"].startswith("attempt 2, to ")
    assert history[-1]["detail"].startswith("serial DBUS-")
    assert history[1]["detail"].startswith("soc_serial in ")  # the field gathered, and how long it took
    assert json.loads(as_json.stdout)["attempts"] == 2  # serial-requests posted

    lines = text.stdout.splitlines()
    at = lines.index("History:")
    table = lines[at + 2:]
    assert lines[at + 1].split() == ["Time", "Step", "Detail"]
    assert sorted(line.split()[2] for line in table) == sorted(STEPS_WITH_ONE_RETRY), table
    first = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(history[0]["at"] / 1e6))
    assert table[0].strip().startswith(first)

    # No daemon: the same history, from state.json, with a "started" for the next daemon not yet there.
    absent = launcher.run(agent_argv("status", "--bus", "session", "--long", "--json", "--state-dir", str(state),
                                     "--config", str(config)),
                          env=agent_env(bus_address=bus_address, backend=backend), timeout=60)
    assert absent.returncode == 69, absent.stderr
    recorded = json.loads(absent.stdout)["recorded"]["history"]
    assert sorted(map(str, recorded)) == sorted(map(str, history))  # the same steps as GetHistory() gave
    plain = launcher.run(agent_argv("status", "--bus", "session", "--long", "--state-dir", str(state), "--config",
                                    str(config)), env=agent_env(bus_address=bus_address, backend=backend), timeout=60)
    assert plain.returncode == 69 and "History:" in plain.stdout and "registered" in plain.stdout.split("History:")[1]


def test_a_restart_and_repeated_failures_are_history_too(tmp_path: Path, lab: FaultyVault, bus_address: str,
                                                         backend: str) -> None:
    """A vault that keeps refusing the api-key blocks; a restart ends the block (a retry step) and is a second
    started; identical consecutive steps are collapsed into one with their count."""
    config, state = write_config(tmp_path, lab), tmp_path / "state"
    seed_key(state)
    lab.faults.error_code["request-id"] = ["invalid-api-key"] * 2
    for _ in range(2):
        daemon = Daemon(bus_address, backend, config, state)
        try:
            wait_for(lambda: _status(bus_address, backend).returncode == 1, 60)
        finally:
            daemon.stop()
    data = json.loads((state / "state.json").read_text())
    history = data["history"]
    steps = [e["step"] for e in history]
    assert steps.count("identity") == 1, history  # gathered beside the request-id: before or after the block
    history = [e for e in history if e["step"] != "identity"]  # the second start finds the same identity
    assert [e["step"] for e in history] == ["started", "blocked", "started", "retry", "blocked"], data["history"]
    assert "the vault refused: invalid-api-key" in history[1]["detail"] and data["attempts"] == 0
    assert "ends the block by invalid-api-key" in history[3]["detail"]
