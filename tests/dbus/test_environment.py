"""Environment errors a technician can fix keep the real daemon up and `blocked` on D-Bus with the cause, not in a
restart loop: a read-only state directory (at start, or turned read-only under a running daemon) and an api-key
file that cannot be read at start. Each is then fixed the way a technician would and `factory-agent retry`
registers, in the same daemon.

The read-only cases run the daemon in a private mount namespace (unshare -m) whose state directory is a bind
mount of itself; the test flips it read-only or writable inside that namespace with nsenter, so nothing outside
the test sees a mount. They need root and util-linux.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.dbus.conftest import BUS_NAME, PATH, Daemon, busctl, seed_key, wait_for, write_config
from tests.environment import need_private_mounts
from tests.fakes import launcher
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import agent_argv, agent_env

SERIAL = "DBUS-0000000000dbus01"
WRONG = "wrong-api-key-0123456789"
# The state directory bound on itself (writable), in the daemon's own mount namespace: then the agent.
BIND = 'mount --bind "$1" "$1" && { [ "$2" = rw ] || mount -o remount,bind,ro "$1"; } && shift 2 && exec "$@"'


def in_namespace(state: Path, mode: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", BIND, "sh", str(state), mode]


def remount(daemon: Daemon, state: Path, mode: str) -> None:
    """What the technician's fix (or the fault) does to the mount the daemon sees."""
    done = subprocess.run(["nsenter", "-t", str(daemon.pid), "-m", "-r", "mount", "-o", f"remount,bind,{mode}", str(state)],
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr


def status(address: str, backend: str) -> dict[str, object]:
    done = launcher.run(agent_argv("status", "--json", "--bus", "session"),
                        env=agent_env(bus_address=address, backend=backend))
    assert done.returncode in (0, 1, 2), done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def retry(address: str, backend: str) -> None:
    done = launcher.run(agent_argv("retry", "--bus", "session"), env=agent_env(bus_address=address, backend=backend))
    assert done.returncode == 0 and "fresh attempt" in done.stdout, (done.stdout, done.stderr)


def state_is(address: str, value: str) -> bool:
    done = busctl(address, "get-property", BUS_NAME, PATH, BUS_NAME, "State")
    return done.returncode == 0 and done.stdout.strip() == f's "{value}"'


def api_key_file(tmp: Path, key: str) -> Path:
    path = tmp / "api-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def assert_blocked_on(found: dict[str, object], code: str, *parts: str) -> None:
    assert (found["state"], found["last-error"]) == ("blocked", code), found
    for part in parts:
        assert part in str(found["last-error-message"]), (part, found)
    assert "then run: factory-agent retry" in str(found["action"]), found


def test_a_read_only_state_dir_at_start_keeps_the_daemon_up_blocked_until_fixed_and_retried(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    need_private_mounts()
    config, state = write_config(tmp_path, lab), tmp_path / "state"
    seed_key(state)
    before = sorted(p.name for p in state.iterdir())
    daemon = Daemon(bus_address, backend, config, state, wrapper=in_namespace(state, "ro"))
    try:
        wait_for(lambda: state_is(bus_address, "blocked"))
        assert_blocked_on(status(bus_address, backend), "store", str(state), "Read-only file system")
        assert daemon.poll() is None and sorted(p.name for p in state.iterdir()) == before
        assert lab.requests[("POST", "/v1/request-id")] == 0  # nothing is asked of the vault while held
        remount(daemon, state, "rw")  # the technician fixes the mount
        retry(bus_address, backend)
        wait_for(lambda: state_is(bus_address, "registered"))
        assert status(bus_address, backend)["serial"] == SERIAL and daemon.poll() is None
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr
    blocked = [line for line in daemon.stderr.splitlines() if "state blocked (store:" in line]
    assert len(blocked) == 1 and "Read-only file system" in blocked[0], daemon.stderr


def settled(path: Path, quiet: float = 1.0) -> bytes:
    """The file once it has not changed for ``quiet`` seconds: a blocked daemon's last write may follow the
    first one that shows it blocked (seen once, in the Debian 13 leg of a make test)."""
    deadline, last = time.monotonic() + 30, path.read_bytes()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = path.read_bytes()
        if now == last:
            return now
        last = now
    raise AssertionError(f"{path} kept changing for 30 s")


def test_a_state_dir_turned_read_only_under_the_daemon_blocks_it_and_state_json_stays_as_it_was(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    need_private_mounts()
    key_file = api_key_file(tmp_path, WRONG)
    config, state = write_config(tmp_path, lab, api_key_file=key_file), tmp_path / "state"
    seed_key(state)
    daemon = Daemon(bus_address, backend, config, state, wrapper=in_namespace(state, "rw"))
    try:
        wait_for(lambda: state_is(bus_address, "blocked") and (state / "state.json").exists())
        wait_for(lambda: json.loads((state / "state.json").read_text())["blocked-by"] == "invalid-api-key")
        recorded = settled(state / "state.json")
        remount(daemon, state, "ro")
        api_key_file(tmp_path, lab.api_key)  # one fix made, the next write fails
        retry(bus_address, backend)
        wait_for(lambda: status(bus_address, backend)["last-error"] == "store")
        assert_blocked_on(status(bus_address, backend), "store", "state.json", "Read-only file system")
        assert (state / "state.json").read_bytes() == recorded and daemon.poll() is None
        assert lab.requests[("POST", "/v1/serial")] == 0  # an attempt that cannot be recorded is not made
        remount(daemon, state, "rw")
        retry(bus_address, backend)
        wait_for(lambda: state_is(bus_address, "registered"))
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr and lab.api_key not in daemon.stderr
    steps = [e["step"] for e in json.loads((state / "state.json").read_text())["history"]]
    assert steps[-1] == "registered" and "retry" in steps, steps


def test_an_api_key_file_missing_at_start_keeps_the_daemon_up_blocked_until_it_is_there_and_retried(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    """Not yet copied onto the board (or not readable): blocked on it with the file named, not exit 78 and dead."""
    key_file = tmp_path / "api-key"
    config, state = write_config(tmp_path, lab, api_key_file=key_file), tmp_path / "state"
    seed_key(state)
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: state_is(bus_address, "blocked"))
        found = status(bus_address, backend)
        assert_blocked_on(found, "config", "'vault.api-key-file' cannot be read", str(key_file), "No such file")
        assert "fix the file and key it names" in str(found["action"])
        assert daemon.poll() is None and lab.requests[("POST", "/v1/request-id")] == 0
        recorded = json.loads((state / "state.json").read_text())
        assert recorded["blocked-by"] == "config" and recorded["history"][-1]["step"] == "blocked"
        api_key_file(tmp_path, lab.api_key)  # the technician copies the key
        retry(bus_address, backend)
        wait_for(lambda: state_is(bus_address, "registered"))
        assert status(bus_address, backend)["serial"] == SERIAL and daemon.poll() is None
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr and lab.api_key not in daemon.stderr
