"""Secure onboarding in snapd mode, end to end: the agent in snapd mode with a hardware identity key, the lab
Model Service (in process, its 202 rehearsal knob), the real hooks with a fake snapctl, and a client that registers
as snapd 2.74+ does: request-id, the prepare-serial-request hook, the signed serial-request, and snapd 2.74-2.77's
defect (any re-run of the task after the hook fails the attempt) modelled. A 202 from the service must not reach
it: the relay polls the service itself and answers snapd's one POST with the serial."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import assertions, keys
from agent.labmodel import ModelServiceVault
from agent.labserve import Rehearsal, RehearsalVault
from tests.dbus.conftest import Daemon, owned, state_of, status_json, wait_for
from tests.fakes import launcher, swtpm
from tests.fakes.agentconf import copy_lab_keys
from tests.fakes.launcher import agent_argv
from tests.fakes.snapd_client import DEFECT, SnapdClient
from tests.fakes.snapdmode import SERIAL_HOOK, hook_env, run_hook, set_values, snapctl_calls, write_snapd_config


class RehearsedModelService(RehearsalVault, ModelServiceVault):
    """The lab Model Service with a rehearsal (lab-vault --hardware-identity --fail 202 ... composes the same)."""


@pytest.fixture
def service(lab_dir: Path, tmp_path: Path) -> Iterator[RehearsedModelService]:
    vault = RehearsedModelService(copy_lab_keys(lab_dir, tmp_path / "model-service"),
                                  Rehearsal(fail=202, times=2, retry_after=1, endpoints=("serial",)))
    vault.start()
    yield vault
    vault.stop()


def _agent(tmp: Path, vault: ModelServiceVault, key_uri: str = "", module: str = "") -> Path:
    """snapd mode, secure onboarding, its key made and its hardware-identity imported into the service."""
    path = write_snapd_config(tmp, vault.url, vault.directory, pkcs11_module=module,
                              hardware_key=key_uri or f"file:{tmp / 'identity' / 'hardware-key.pem'}")
    made = launcher.run(agent_argv("hardware-identity", "init", "--json", "--config", str(path)))
    assert made.returncode == 0, made.stderr
    signed = launcher.run(agent_argv("hardware-identity", "assertion", "--record", "-", "--issuer-key",
                                     str(vault.directory / "brand-key.pem"), "--issuer-id", "acme", "--manufacturer",
                                     "ACME", "--hardware-name", "acme-gw-board", "--hardware-id", "HW-SNAPD"),
                          input=made.stdout)
    assert signed.returncode == 0, signed.stderr
    (vault.import_dir / "HW-SNAPD.assert").write_text(signed.stdout)
    return path


@pytest.fixture(params=["file", "softhsm2", "swtpm"])
def key_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """(key URI, module): "" for a file key the test makes; a SoftHSM2 token; a software TPM through tpm2-pkcs11."""
    if request.param == "file":
        yield "", ""
    elif request.param == "softhsm2":
        token = request.getfixturevalue("softhsm").token()
        yield token.uri(), token.module
    else:
        if reason := swtpm.missing():
            pytest.skip(reason)
        tpm = swtpm.SoftwareTpm(tmp_path_factory.mktemp("swtpm"))
        for name, value in tpm.env.items():
            if name.startswith("TPM2_PKCS11_"):
                monkeypatch.setenv(name, value)  # the daemon and the commands inherit them
        yield tpm.uri(), tpm.module
        tpm.stop()


def test_snapd_registers_in_one_attempt_though_the_service_answers_202(
        tmp_path: Path, bus_address: str, backend: str, service: RehearsedModelService, small_key: keys.DeviceKey,
        key_store: tuple[str, str]) -> None:
    daemon = Daemon(bus_address, backend, _agent(tmp_path, service, *key_store), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        device = run_hook(hook_env(tmp_path, bus_address, backend))
        assert device.returncode == 0, device.stderr
        settings: dict[str, Any] = {k: v if isinstance(v, dict) else str(v)
                                    for k, v in set_values(snapctl_calls(tmp_path)[0]).items()}

        def prepare_serial_request(request_id: str) -> str:
            ran = run_hook(hook_env(tmp_path, bus_address, backend, SNAPCTL_REQUEST_ID=request_id), hook=SERIAL_HOOK)
            assert ran.returncode == 0, ran.stderr
            key, _, raw = snapctl_calls(tmp_path)[-1][1].partition("=")
            assert key == "registration.body"
            return raw

        model = assertions.decode((service.directory / "model.assert").read_bytes())
        attempt = SnapdClient(settings, small_key, model, hook=prepare_serial_request).register()
        assert attempt.error == "" and attempt.serial is not None, attempt.error
        assert [(endpoint, a.status) for endpoint, a in attempt.answers] == [("request-id", 200), ("serial", 200)]
        assert attempt.serial.header("device-key-sha3-384") == small_key.key_id
        wait_for(lambda: state_of(bus_address) == 's "registered"')
    finally:
        log = daemon.stop()
    assert "Traceback" not in log


def test_the_client_fails_as_snapd_does_when_a_202_reaches_it(small_key: keys.DeviceKey, lab_dir: Path) -> None:
    """The defect, modelled: the same client against the service directly (no relay) fails its attempt."""
    directory = copy_lab_keys(lab_dir, lab_dir.parent / "direct-202")
    vault = RehearsedModelService(directory, Rehearsal(fail=202, times=1, endpoints=("serial",)))
    vault.start()
    try:
        model = assertions.decode((directory / "model.assert").read_bytes())
        client = SnapdClient({"device-service.url": vault.url, "registration.proposed-serial": "S-1"}, small_key,
                             model, hook=lambda request_id: '{"request-id-signature":"x","hardware-id-key-sha384":"y"}')
        attempt = client.register()
    finally:
        vault.stop()
    assert attempt.error == DEFECT and [a.status for _, a in attempt.answers] == [200, 202]


def test_a_snapd_older_than_2_74_is_refused_with_what_to_do(
        tmp_path: Path, bus_address: str, backend: str, service: RehearsedModelService, small_key: keys.DeviceKey) -> None:
    """snapd 2.73 never runs the hook: its serial-request would carry no signed body. The relay says so at the
    request-id, blocked with the action, instead of letting the service refuse an unsigned request."""
    daemon = Daemon(bus_address, backend, _agent(tmp_path, service), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        assert run_hook(hook_env(tmp_path, bus_address, backend)).returncode == 0
        settings: dict[str, Any] = {k: v if isinstance(v, dict) else str(v)
                                    for k, v in set_values(snapctl_calls(tmp_path)[0]).items()}
        model = assertions.decode((service.directory / "model.assert").read_bytes())
        client = SnapdClient(settings, small_key, model)
        client.user_agent = "snapd/2.73.2 (series 16) ubuntu-core/24 (amd64) linux/6.8.0-test"
        attempt = client.register()
        wait_for(lambda: state_of(bus_address) == 's "blocked"')
        status = status_json(bus_address, backend)
    finally:
        daemon.stop()
    assert "snapd 2.73 runs no prepare-serial-request hook" in attempt.error, attempt.error
    assert [endpoint for endpoint, _ in attempt.answers] == ["request-id"]  # nothing reached the service
    assert status["last-error"] == "relay-snapd-too-old" and "snapd 2.74 or later" in str(status["action"])
