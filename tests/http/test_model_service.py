"""Secure onboarding end to end in standalone mode: the real agent (`run --once`) with a hardware identity key,
against the real `lab-vault --hardware-identity` (a lab Model Service) on 127.0.0.1. No api-key anywhere."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from agent import assertions
from tests.fakes import launcher, swtpm
from tests.fakes.agentconf import copy_lab_keys, seed_key, write_agent_config
from tests.fakes.launcher import agent_argv, run_args
from tests.fakes.softhsm import SoftHsm
from tests.http.test_labvault_cli import LabVaultCommand

Start = Callable[..., LabVaultCommand]


@pytest.fixture
def start(lab_dir: Path, tmp_path: Path) -> Iterator[Start]:
    directory = copy_lab_keys(lab_dir, tmp_path / "vault")
    started: list[LabVaultCommand] = []

    def _start(*args: str) -> LabVaultCommand:
        started.append(LabVaultCommand(directory, "--hardware-identity", *args))
        return started[-1]

    yield _start
    for command in started:
        command.child.stop(check=False)


class Device:
    """A board: its hardware identity key (made with `hardware-identity init`), its config, its state."""

    def __init__(self, tmp: Path, vault: LabVaultCommand, key_type: str = "p256", key_uri: str = "", module: str = "",
                 env: dict[str, str] | None = None) -> None:
        self.tmp, self.vault, self.env = tmp, vault, env
        self.key_uri = key_uri or f"file:{tmp / 'identity' / 'hardware-key.pem'}"
        self.config = write_agent_config(tmp, vault.url, vault.directory, template="HW-{soc_serial}",
                                         soc_serial="00000000000000h1", hardware_key=self.key_uri,
                                         pkcs11_module=module)
        self.state = tmp / "state"
        seed_key(self.state)
        made = self.hwid("init", "--type", key_type, "--json")
        assert made.returncode == 0, made.stderr
        self.record = json.loads(made.stdout)

    def hwid(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return launcher.run(agent_argv("hardware-identity", *args, "--config", str(self.config)), input=stdin,
                            env=self.env, timeout=60)

    def import_identity(self) -> Path:
        """The factory host's step: the assertion, signed by the brand (the issuer), dropped into the vault."""
        signed = self.hwid("assertion", "--record", "-", "--issuer-key", str(self.vault.directory / "brand-key.pem"),
                           "--issuer-id", "acme", "--manufacturer", "ACME Devices Ltd", "--hardware-name",
                           "acme-gw-board", "--hardware-id", "HW-0001", stdin=json.dumps(self.record))
        assert signed.returncode == 0, signed.stderr
        path = self.vault.directory / "hardware-identities" / "HW-0001.assert"
        path.write_text(signed.stdout)
        return path

    def run_once(self) -> subprocess.CompletedProcess[str]:
        done = launcher.run(agent_argv(*run_args(self.config, self.state, once=True), "--timeout", "60"),
                            env=self.env, timeout=90)
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def recorded(self) -> dict[str, object]:
        return json.loads((self.state / "state.json").read_text())


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_registers_with_no_api_key(start: Start, tmp_path: Path, key_type: str) -> None:
    vault = start()
    device = Device(tmp_path, vault, key_type)
    device.import_identity()
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    serial = assertions.decode((device.state / "serial.assertion").read_bytes())
    assert serial.header("serial") == "HW-00000000000000h1"
    assert "api-key" not in device.config.read_text()
    assert "invalid-api-key" not in vault.stop()


def test_a_key_in_softhsm2_registers(start: Start, tmp_path: Path, softhsm: SoftHsm) -> None:
    vault = start()
    token = softhsm.token()
    device = Device(tmp_path, vault, "p256", key_uri=token.uri(), module=token.module)
    assert device.record["location"] == token.uri()
    device.import_identity()
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    assert device.recorded()["phase"] == "registered"


def test_a_key_in_a_software_tpm_registers(start: Start, tmp_path: Path,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    if reason := swtpm.missing():
        pytest.skip(reason)
    tpm = swtpm.SoftwareTpm(tmp_path_factory.mktemp("swtpm"))
    try:
        vault = start()
        env = launcher.agent_env(**{k: v for k, v in tpm.env.items() if k.startswith("TPM2_PKCS11_")})
        device = Device(tmp_path, vault, "rsa2048", key_uri=tpm.uri(), module=tpm.module, env=env)
        assert device.record["key-type"] == "rsa2048"
        device.import_identity()
        done = device.run_once()
    finally:
        tpm.stop()
    assert done.returncode == 0, done.stderr
    assert device.recorded()["phase"] == "registered"


def test_a_missing_key_blocks_until_it_is_made(start: Start, tmp_path: Path) -> None:
    vault = start()
    device = Device(tmp_path, vault)
    device.import_identity()
    key = tmp_path / "identity" / "hardware-key.pem"
    key.rename(tmp_path / "aside.pem")  # the key's storage not mounted yet, say
    blocked = device.run_once()
    assert blocked.returncode == 1 and "hardware-key" in blocked.stderr, blocked.stderr
    assert "factory-agent hardware-identity init" in blocked.stderr
    assert device.recorded()["blocked-by"] == "hardware-key"
    (tmp_path / "aside.pem").rename(key)  # mounted again
    assert device.run_once().returncode == 0


def test_an_identity_not_imported_blocks_with_the_digest_then_the_import_and_a_run_register(start: Start,
                                                                                           tmp_path: Path) -> None:
    vault = start()
    device = Device(tmp_path, vault)
    digest = device.record["hardware-id-key-sha3-384"]
    blocked = device.run_once()
    assert blocked.returncode == 1, blocked.stderr
    assert "unknown-hardware-identity" in blocked.stderr and digest in blocked.stderr, blocked.stderr
    assert device.recorded()["blocked-by"] == "unknown-hardware-identity"
    device.import_identity()  # the factory imports it; the technician runs the agent again
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    assert device.recorded()["phase"] == "registered"


def test_a_replayed_request_is_refused(start: Start, tmp_path: Path) -> None:
    """A serial-request captured on the wire, posted again: its request-id is spent."""
    vault = start()
    device = Device(tmp_path, vault)
    device.import_identity()
    request_id = requests.post(vault.url + "request-id", timeout=10).json()["request-id"]
    body = device.hwid("sign-request-id", request_id, "--json").stdout.strip()
    stream = _serial_request(device, request_id, body)
    first = requests.post(vault.url + "serial", data=stream, headers=HEADERS, timeout=30)
    again = requests.post(vault.url + "serial", data=stream, headers=HEADERS, timeout=30)
    assert first.status_code == 200 and first.content.startswith(b"type: serial\n")
    assert again.status_code == 400 and again.json()["error_code"] == "invalid-nonce"


def test_a_202_then_the_serial(start: Start, tmp_path: Path) -> None:
    vault = start("--fail", "202", "--endpoint", "serial", "--times", "1", "--retry-after", "1")
    device = Device(tmp_path, vault)
    device.import_identity()
    done = device.run_once()
    assert done.returncode == 0, done.stderr
    assert "answered 202 to POST /v1/serial (1 of 1)" in vault.stop()
    assert device.recorded()["phase"] == "registered"


def test_a_signature_by_another_key_is_refused_and_its_request_id_spent(start: Start, tmp_path: Path) -> None:
    """A body naming the imported digest, its request-id signed by another key (a cloned record)."""
    vault = start()
    device = Device(tmp_path, vault)
    device.import_identity()
    other = f"file:{tmp_path / 'other' / 'key.pem'}"
    assert device.hwid("init", "--key", other).returncode == 0
    request_id = requests.post(vault.url + "request-id", timeout=10).json()["request-id"]
    forged = json.loads(device.hwid("sign-request-id", request_id, "--json", "--key", other).stdout)
    digest = device.record["hardware-id-key-sha3-384"]
    forged.update({"hardware-id-key-sha3-384": digest, "hardware-id-key-sha384": digest})
    stream = _serial_request(device, request_id, json.dumps(forged, separators=(",", ":"), sort_keys=True))
    refused = requests.post(vault.url + "serial", data=stream, headers=HEADERS, timeout=30)
    assert refused.status_code == 400 and refused.json()["error_code"] == "invalid-request-id-signature"
    honest = _serial_request(device, request_id, device.hwid("sign-request-id", request_id, "--json").stdout.strip())
    spent = requests.post(vault.url + "serial", data=honest, headers=HEADERS, timeout=30)
    assert spent.status_code == 400 and spent.json()["error_code"] == "invalid-nonce"


def test_the_agent_blocks_on_a_refused_signature_with_the_action(start: Start, tmp_path: Path) -> None:
    vault = start("--refuse", "invalid-request-id-signature", "--endpoint", "serial", "--times", "1")
    device = Device(tmp_path, vault)
    device.import_identity()
    blocked = device.run_once()
    assert blocked.returncode == 1 and "invalid-request-id-signature" in blocked.stderr, blocked.stderr
    assert "[onboarding] hash" in blocked.stderr  # the action
    assert device.run_once().returncode == 0  # the next run: a fresh request-id, registered


HEADERS = {"Content-Type": "application/x.ubuntu.assertion"}


def _serial_request(device: Device, request_id: str, body: str) -> bytes:
    """A serial-request signed by the device key with ``body``, as `factory-agent serial-request` prints it."""
    (device.tmp / "body.json").write_text(body)
    made = launcher.run(agent_argv("serial-request", "--state-dir", str(device.state), "--brand", "acme", "--model",
                                   "acme-gw", "--request-id", request_id, "--serial", "HW-MANUAL", "--body-file",
                                   str(device.tmp / "body.json")), timeout=60)
    assert made.returncode == 0, made.stderr
    return made.stdout.encode()


def test_check_shows_the_hardware_identity_key_and_its_digest(start: Start, tmp_path: Path) -> None:
    vault = start()
    device = Device(tmp_path, vault)

    def checks() -> dict[str, dict[str, str]]:
        done = launcher.run(agent_argv("check", "--json", "--config", str(device.config), "--state-dir",
                                       str(device.state)), timeout=60)
        return {c["id"]: c for c in json.loads(done.stdout)["checks"]}

    found = checks()
    assert found["hardware-key"]["status"] == "ok"
    assert device.record["hardware-id-key-sha3-384"] in found["hardware-key"]["detail"]
    assert found["secrets"]["status"] == "ok" and "no api-key (hardware identity)" in found["secrets"]["detail"]
    assert found["vault-api-key"]["status"] == "ok" and "no api-key sent" in found["vault-api-key"]["detail"]
    (tmp_path / "identity" / "hardware-key.pem").unlink()
    gone = checks()["hardware-key"]
    assert gone["status"] == "error" and "hardware-identity init" in gone["detail"] + gone["hint"]
