"""Secure onboarding on the real daemon, on a private bus, against the lab Model Service: the technician's loop.

The device's hardware identity is not imported yet: the daemon blocks, and status shows the action with the
digest to import. The factory imports the assertion; `factory-agent retry`; registered, with no restart and
no api-key anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.labmodel import ModelServiceVault
from tests.dbus.conftest import Daemon, seed_key, state_of, status_json, wait_for
from tests.fakes import launcher
from tests.fakes.agentconf import copy_lab_keys, write_agent_config
from tests.fakes.launcher import agent_argv, agent_env


@pytest.fixture
def model_service(lab_dir: Path, tmp_path: Path) -> Iterator[ModelServiceVault]:
    vault = ModelServiceVault(copy_lab_keys(lab_dir, tmp_path / "model-service"))
    vault.start()
    yield vault
    vault.stop()


def test_not_imported_blocked_with_the_digest_then_imported_retry_registered(
        tmp_path: Path, model_service: ModelServiceVault, bus_address: str, backend: str) -> None:
    config = write_agent_config(tmp_path, model_service.url, model_service.directory, template="SO-{soc_serial}",
                                soc_serial="00000000000000so",
                                hardware_key=f"file:{tmp_path / 'identity' / 'hardware-key.pem'}")
    state = tmp_path / "state"
    seed_key(state)
    made = launcher.run(agent_argv("hardware-identity", "init", "--json", "--config", str(config)))
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    digest = record["hardware-id-key-sha3-384"]
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: state_of(bus_address) == 's "blocked"')
        blocked = status_json(bus_address, backend)
        assert blocked["last-error"] == "unknown-hardware-identity"
        assert f"hardware-id-key-sha3-384 {digest} (factory-agent hardware-identity show)" in str(blocked["action"])
        assert "run: factory-agent retry" in str(blocked["action"])
        signed = launcher.run(agent_argv("hardware-identity", "assertion", "--record", "-", "--issuer-key",
                                         str(model_service.directory / "brand-key.pem"), "--issuer-id", "acme",
                                         "--manufacturer", "ACME", "--hardware-name", "acme-gw-board",
                                         "--hardware-id", "SO-1"), input=made.stdout)
        assert signed.returncode == 0, signed.stderr
        (model_service.import_dir / "SO-1.assert").write_text(signed.stdout)  # the factory imports it
        retried = launcher.run(agent_argv("retry", "--bus", "session"),
                               env=agent_env(bus_address=bus_address, backend=backend))
        assert retried.returncode == 0, retried.stderr
        wait_for(lambda: state_of(bus_address) == 's "registered"')
        registered = status_json(bus_address, backend)
        assert (registered["serial"], registered["last-error"], registered["action"]) == ("SO-00000000000000so", "", "")
        assert daemon.poll() is None
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr and "PRIVATE KEY" not in daemon.stderr
