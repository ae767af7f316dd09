"""Secure onboarding on the real daemon, on a private bus, against the lab Model Service: the technician's loop.

The device's hardware identity is not imported yet: the daemon blocks, and status shows the action with the
digest to import. The factory imports the assertion; `factory-agent retry`; registered, with no restart and
no api-key anywhere.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.labmodel import ModelServiceVault
from tests.dbus.conftest import Daemon, seed_key, state_of, wait_for
from tests.fakes import launcher
from tests.fakes.launcher import agent_argv, agent_env


@pytest.fixture
def model_service(lab_dir: Path, tmp_path: Path) -> Iterator[ModelServiceVault]:
    directory = tmp_path / "model-service"
    directory.mkdir(mode=0o700)
    for name in ("root-key.pem", "brand-key.pem"):
        shutil.copy2(lab_dir / name, directory / name)
    vault = ModelServiceVault(directory)
    vault.start()
    yield vault
    vault.stop()


def _config(tmp: Path, vault: ModelServiceVault) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
model-assertion = "{vault.directory / 'model.assert'}"
[vault]
url = "{vault.url}"
allow-insecure-http = true
trusted-account-keys = ["{vault.directory / 'brand.account-key'}"]
[serial]
template = "SO-{{soc_serial}}"
[identity]
wait-seconds = 0
[identity.static]
soc_serial = "00000000000000so"
[onboarding]
method = "hardware-identity"
hardware-key = "file:{tmp / 'identity' / 'hardware-key.pem'}"
""")
    return path


def _status(address: str, backend: str) -> dict[str, object]:
    done = launcher.run(agent_argv("status", "--json", "--bus", "session"),
                        env=agent_env(bus_address=address, backend=backend))
    assert done.returncode in (0, 1, 2), done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_not_imported_blocked_with_the_digest_then_imported_retry_registered(
        tmp_path: Path, model_service: ModelServiceVault, bus_address: str, backend: str) -> None:
    config, state = _config(tmp_path, model_service), tmp_path / "state"
    seed_key(state)
    made = launcher.run(agent_argv("hardware-identity", "init", "--json", "--config", str(config)))
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    digest = record["hardware-id-key-sha3-384"]
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: state_of(bus_address) == 's "blocked"')
        blocked = _status(bus_address, backend)
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
        registered = _status(bus_address, backend)
        assert (registered["serial"], registered["last-error"], registered["action"]) == ("SO-00000000000000so", "", "")
        assert daemon.poll() is None
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr and "PRIVATE KEY" not in daemon.stderr
