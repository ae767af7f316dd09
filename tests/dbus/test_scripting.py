"""`factory-agent status` as a test station's script uses it: stdout that parses, a closed pipe that is not a
crash, NDJSON with --follow, and 69 with a clear line when there is no daemon or no D-Bus library."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from tests.dbus.conftest import BUS_NAME, PATH, Daemon, busctl, seed_key, wait_for, write_config
from tests.fakes import launcher
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import Agent, agent_argv, agent_env


def _registered(address: str) -> bool:
    done = busctl(address, "get-property", BUS_NAME, PATH, BUS_NAME, "State")
    return done.returncode == 0 and done.stdout.strip() == 's "registered"'


def _status(address: str, backend: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return launcher.run(agent_argv("status", "--bus", "session", *args), env=agent_env(bus_address=address, backend=backend),
                        timeout=timeout)


def test_a_reader_that_closes_the_pipe_early_is_not_an_error(tmp_path: Path, lab: FaultyVault, bus_address: str,
                                                              backend: str) -> None:
    config, state = write_config(tmp_path, lab), tmp_path / "state"
    seed_key(state)
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: _registered(bus_address))
        status = " ".join(shlex.quote(word) for word in agent_argv("status", "--bus", "session"))
        script = f'for i in $(seq 50); do {status} 2>>"$ERR" | head -c1 >/dev/null; echo "${{PIPESTATUS[0]}}"; done'
        err = tmp_path / "stderr"
        done = subprocess.run(["bash", "-c", script], env=agent_env(bus_address=bus_address, backend=backend, ERR=str(err)),
                              capture_output=True, text=True, timeout=300, check=False)
        codes = done.stdout.split()
        assert len(codes) == 50 and set(codes) == {"0"}, (codes, err.read_text())
        assert err.read_text() == ""  # no "internal error", no "Exception ignored ... BrokenPipeError"
    finally:
        daemon.stop()


def test_wait_json_prints_only_the_document_and_follow_json_one_object_per_change(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    config, state = write_config(tmp_path, lab), tmp_path / "state"
    seed_key(state)
    env = agent_env(bus_address=bus_address, backend=backend)
    follower = Agent(argv=agent_argv("status", "--bus", "session", "--follow", "--json", "--timeout", "60"), env=env,
                     stdout=subprocess.PIPE)
    waiter = Agent(argv=agent_argv("status", "--bus", "session", "--wait", "--json", "--timeout", "60"), env=env,
                   stdout=subprocess.PIPE)
    try:
        wait_for(lambda: any("waiting for the daemon" in line for _, line in waiter.lines))  # told, on stderr
        daemon = Daemon(bus_address, backend, config, state)
        try:
            assert waiter.wait_exit(60) == 0
            assert waiter.proc.stdout is not None
            document = json.loads(waiter.proc.stdout.read())  # stdout is the one document, nothing before it
            assert (document["state"], document["serial"]) == ("registered", "DBUS-0000000000dbus01")
            wait_for(lambda: _registered(bus_address))
        finally:
            daemon.stop()
        assert follower.wait_exit(60) == 0  # the daemon left: the state it last had
        assert follower.proc.stdout is not None
        states = [json.loads(line)["state"] for line in follower.proc.stdout.read().splitlines()]
        assert states[-1] == "registered" and "requesting" in states, states
    finally:
        for agent in (follower, waiter):
            if agent.poll() is None:
                agent.stop(check=False)


def test_no_daemon_and_no_dbus_library_exit_69_with_a_line_that_says_so(bus_address: str, backend: str) -> None:
    gone = _status(bus_address, backend, "--wait", "--timeout", "1")
    assert gone.returncode == 69 and "waiting for the daemon" in gone.stderr
    assert gone.stdout.startswith("Daemon: not running\nWhy: ")  # then why, as far as the machine shows
    nolib = launcher.run(agent_argv("status", "--bus", "session"),
                         env=agent_env(bus_address=bus_address, backend="no_such_dbus_library"))
    assert nolib.returncode == 69, nolib.stderr
    assert "cannot use D-Bus: none of no_such_dbus_library is installed" in nolib.stderr
    assert "Traceback" not in nolib.stderr
