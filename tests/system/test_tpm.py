"""The hardware identity key in a real software TPM 2.0 (swtpm), through tpm2-pkcs11: the same PKCS#11 path
as an HSM. Made in the TPM, not extractable, signatures OpenSSL verifies; a TPM that stops answering is
one line saying so."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import launcher, swtpm
from tests.fakes.launcher import agent_argv, agent_env
from tests.system.test_pkcs11 import READ_OUT, _openssl_verifies

REQUEST_ID = "a3f1c9e27b5d4e8f90a1b2c3d4e5f60718293a4b"


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[swtpm.SoftwareTpm]:
    if reason := swtpm.missing():
        pytest.skip(reason)
    started = swtpm.SoftwareTpm(tmp_path_factory.mktemp("swtpm"))
    yield started
    started.stop()


def hwid(tpm: swtpm.SoftwareTpm, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = agent_env(**{k: v for k, v in tpm.env.items() if k.startswith("TPM2_PKCS11_")})
    extra = ["--config", str(config)] if config else []
    done = launcher.run(agent_argv("hardware-identity", *args, *extra), env=env, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _config(tmp_path: Path, tpm: swtpm.SoftwareTpm, obj: str, hash_name: str = "sha256") -> Path:
    path = tmp_path / f"{obj}-{hash_name}.toml"
    path.write_text(f'[onboarding]\nhardware-key = "{tpm.uri(obj)}"\npkcs11-module = "{tpm.module}"\n'
                    f'hash = "{hash_name}"\n')
    return path


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_init_in_the_tpm_then_sign_with_each_hash_openssl_verifies(tpm: swtpm.SoftwareTpm, tmp_path: Path,
                                                                   key_type: str) -> None:
    made = hwid(tpm, "init", "--type", key_type, "--json", config=_config(tmp_path, tpm, key_type))
    assert made.returncode == 0 and f"made a new {key_type} hardware identity key" in made.stderr, made.stderr
    record = json.loads(made.stdout)
    assert record["key-type"] == key_type
    again = hwid(tpm, "init", "--json", config=_config(tmp_path, tpm, key_type))
    assert "kept the existing" in again.stderr and json.loads(again.stdout) == record
    for hash_name in ("sha256", "sha384", "sha512", "sha3-384"):
        done = hwid(tpm, "sign-request-id", "--json", REQUEST_ID, config=_config(tmp_path, tpm, key_type, hash_name))
        assert done.returncode == 0, (hash_name, done.stderr)
        body = json.loads(done.stdout)
        assert body["signature-hash-algorithm"] == hash_name
        assert _openssl_verifies(tmp_path, record, body, REQUEST_ID), (key_type, hash_name)
        if key_type == "p256":
            assert base64.b64decode(body["request-id-signature"])[0] == 0x30  # DER, not the TPM's raw r||s


def test_the_key_made_in_the_tpm_cannot_be_read_out(tpm: swtpm.SoftwareTpm, tmp_path: Path) -> None:
    assert hwid(tpm, "init", config=_config(tmp_path, tpm, "sealed")).returncode == 0
    tried = subprocess.run([sys.executable, "-c", READ_OUT, tpm.module, tpm.label, "1234", "sealed"], env=tpm.env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert tried.returncode == 0, tried.stderr
    assert tried.stdout.splitlines() == ["[True, False]", "refused"]


def test_a_tpm_that_stops_answering_is_one_line(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    if reason := swtpm.missing():
        pytest.skip(reason)
    own = swtpm.SoftwareTpm(tmp_path_factory.mktemp("swtpm-stopped"))
    try:
        config = _config(tmp_path, own, "gone")
        assert hwid(own, "init", config=config).returncode == 0
        own.stop()
        done = hwid(own, "sign-request-id", REQUEST_ID, config=config)
    finally:
        own.stop()
    # tpm2-pkcs11 writes its own "ERROR: ..." lines to stderr (level 0 still shows errors); the agent's is the last
    ours = [line for line in done.stderr.splitlines() if line.startswith("factory-agent: ")]
    assert done.returncode == 1 and len(ours) == 1 and done.stderr.splitlines()[-1] == ours[0], done.stderr
    assert "can it reach its token or TPM?" in ours[0] and "Traceback" not in done.stderr
