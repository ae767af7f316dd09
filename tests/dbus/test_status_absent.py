"""`factory-agent status` with no daemon on the bus is never silent: why, what state.json records, what to run.

On a private bus with no daemon (and no systemd running this machine, as in CI): a registered state, a
blocked one, a configuration that stops the daemon, a state file the agent would not trust, and the kill
switch (in a private mount namespace, so the host's /etc is never touched). Exit 69 each time, and
`--json` is one document.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from agent import store
from agent.registration import Phase, Progress
from tests.environment import need_private_mounts
from tests.fakes import launcher
from tests.fakes.agentconf import write_agent_config
from tests.fakes.launcher import agent_argv, agent_env


def _status(address: str, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    return launcher.run(agent_argv("status", "--bus", "session", *args), env=agent_env(bus_address=address, backend=backend))


def _state_dir(tmp: Path, progress: Progress) -> Path:
    st = store.Store(tmp / "state")
    st.dir.mkdir(mode=0o700)
    st.save_progress(progress)
    return st.dir


def _good_config(tmp: Path, lab_dir: Path) -> Path:
    return write_agent_config(tmp, "http://127.0.0.1:9/v1/", lab_dir, template="A-{soc_serial}", soc_serial="01")


def test_no_daemon_with_a_registered_state(tmp_path: Path, lab_dir: Path, bus_address: str, backend: str) -> None:
    state = _state_dir(tmp_path, Progress(phase=Phase.REGISTERED, key_id="KEY", serial="A-01"))
    config = _good_config(tmp_path, lab_dir)
    done = _status(bus_address, backend, "--json", "--state-dir", str(state), "--config", str(config))
    assert done.returncode == 69, done.stderr
    document = json.loads(done.stdout)
    assert (document["daemon"], document["recorded"]["phase"], document["recorded"]["serial"]) == (
        "absent", "registered", "A-01")
    assert "registered already" in document["reason"] and document["next"]
    human = _status(bus_address, backend, "--state-dir", str(state), "--config", str(config))
    assert human.returncode == 69
    assert "Daemon: not running" in human.stdout and "Recorded: registered with serial A-01" in human.stdout
    assert "Next: " in human.stdout and "Traceback" not in human.stderr


def test_no_daemon_with_a_blocked_state_says_what_blocked_it(tmp_path: Path, lab_dir: Path, bus_address: str,
                                                             backend: str) -> None:
    blocked = Progress(phase=Phase.KEY_READY, key_id="KEY", blocked_by="invalid-api-key",
                       last_error="invalid-api-key", last_error_message="the vault refused the api-key")
    state = _state_dir(tmp_path, blocked)
    config = _good_config(tmp_path, lab_dir)
    done = _status(bus_address, backend, "--state-dir", str(state), "--config", str(config))
    assert done.returncode == 69
    assert "Recorded: blocked by invalid-api-key: the vault refused the api-key (a start tries again)" in done.stdout
    assert "start it: factory-agent run" in done.stdout


def test_no_daemon_because_the_configuration_does_not_load(tmp_path: Path, lab_dir: Path, bus_address: str,
                                                           backend: str) -> None:
    state = _state_dir(tmp_path, Progress())
    config = _good_config(tmp_path, lab_dir)
    config.write_text(config.read_text().replace("[serial]", "[serial]\ntemplat = 1"))
    done = _status(bus_address, backend, "--json", "--state-dir", str(state), "--config", str(config))
    assert done.returncode == 69
    document = json.loads(done.stdout)
    assert "the configuration does not load" in document["reason"]
    assert "serial.templat" in document["reason"] and str(config) in document["reason"]
    assert "fix the file and key it names" in document["next"]


def test_a_state_file_the_agent_would_not_trust_is_reported_not_read(tmp_path: Path, lab_dir: Path,
                                                                     bus_address: str, backend: str) -> None:
    state = _state_dir(tmp_path, Progress(phase=Phase.REGISTERED, serial="A-01"))
    (state / store.STATE_FILE).chmod(0o666)  # writable by anyone: not the agent's to trust
    done = _status(bus_address, backend, "--json", "--state-dir", str(state), "--config",
                   str(_good_config(tmp_path, lab_dir)))
    assert done.returncode == 69
    recorded = json.loads(done.stdout)["recorded"]
    assert set(recorded) == {"unreadable"} and "state.json" in recorded["unreadable"]


def test_the_kill_switch_is_named(tmp_path: Path, lab_dir: Path, bus_address: str, backend: str) -> None:
    need_private_mounts()
    state = _state_dir(tmp_path, Progress())
    config = _good_config(tmp_path, lab_dir)
    status = " ".join(shlex.quote(word) for word in agent_argv("status", "--json", "--bus", "session", "--state-dir", str(state),
                                 "--config", str(config)))
    # an empty /etc in the namespace, holding only the kill switch: the host's /etc is never written
    script = f"mount -t tmpfs tmpfs /etc && mkdir /etc/factory-agent && touch /etc/factory-agent/disabled && exec {status}"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60, check=False, env=agent_env(bus_address=bus_address, backend=backend))
    assert done.returncode == 69, done.stderr
    document = json.loads(done.stdout)
    assert document["kill-switch"].startswith("/etc/factory-agent/disabled exists")
    assert "turned off" in document["reason"] and "remove the kill switch" in document["next"]
    assert not Path("/etc/factory-agent/disabled").exists()  # only in the namespace
