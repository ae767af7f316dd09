"""state.json records the mode: a state directory from one mode is refused by the other, in one line, exit 78."""

from __future__ import annotations

import json
from pathlib import Path

from agent import keys, store
from agent.labvault import LabVault
from tests.dbus.conftest import Daemon, write_config
from tests.dbus.test_relay import SnapdMode
from tests.fakes.agentconf import seed_key
from tests.fakes.snapdmode import write_snapd_config

EX_CONFIG = 78


def _refused(daemon: Daemon) -> str:
    daemon.proc.wait(timeout=30)
    stderr = daemon.stop()
    assert daemon.proc.returncode == EX_CONFIG, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr


def test_snapd_mode_refuses_a_standalone_state_directory(tmp_path: Path, bus_address: str, lab: LabVault,
                                                         device_key: keys.DeviceKey) -> None:
    state = tmp_path / "state"
    seed_key(state)
    recorded = json.dumps({"schema": 1, "phase": "key-ready", "key-id": device_key.key_id}) + "\n"  # no "mode": older
    (state / store.STATE_FILE).write_text(recorded)
    line = _refused(Daemon(bus_address, "dbus_next", write_snapd_config(tmp_path, lab.url, lab.directory), state))
    assert f"cannot start in snapd mode: state directory {state} holds a standalone-mode registration" in line
    assert 'mode = "standalone"' in line and "move that directory's files aside" in line
    assert (state / store.STATE_FILE).read_text() == recorded  # untouched


def test_standalone_mode_refuses_a_snapd_state_directory(tmp_path: Path, bus_address: str, lab: LabVault,
                                                         device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, "dbus_next", lab)
    try:
        assert mode.client(device_key).register().serial is not None
        mode.props(until=lambda p: p.get("State") == "registered")
    finally:
        mode.stop()
    recorded = (mode.state / store.STATE_FILE).read_text()
    assert json.loads(recorded)["mode"] == "snapd"
    (tmp_path / "standalone").mkdir()
    line = _refused(Daemon(bus_address, "dbus_next", write_config(tmp_path / "standalone", lab), mode.state))
    assert f"cannot start in standalone mode: state directory {mode.state} holds a snapd-mode registration" in line
    assert 'mode = "snapd"' in line
    assert (mode.state / store.STATE_FILE).read_text() == recorded
    assert not (mode.state / store.DEVICE_KEY_FILE).exists()  # no key generated for the wrong mode
