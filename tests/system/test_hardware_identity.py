"""`factory-agent hardware-identity` as the factory runs it, as real processes: init, show, sign-request-id
and assertion, checked against snapd 2.77.1's vectors and, for the signatures, by OpenSSL (an
implementation that did not sign them)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import assertions
from tests.fakes import launcher
from tests.fakes.launcher import agent_argv

DATA = Path(__file__).resolve().parents[1] / "data"
SO = DATA / "secure-onboarding"


def hwid(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = launcher.run(agent_argv("hardware-identity", *args), timeout=60, input=stdin)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _vector_key(tmp_path: Path, key_type: str) -> str:
    path = tmp_path / "identity" / "hardware-key.pem"
    path.parent.mkdir(mode=0o700)
    shutil.copy(SO / f"hwid-{key_type}" / "hwid-key.pem", path)
    path.chmod(0o600)
    return f"file:{path}"


def test_init_makes_the_key_once_then_show_prints_the_same_record(tmp_path: Path) -> None:
    uri = f"file:{tmp_path / 'identity' / 'hardware-key.pem'}"
    first = hwid("init", "--key", uri, "--json")
    assert first.returncode == 0 and "made a new p256 hardware identity key" in first.stderr
    record = json.loads(first.stdout)
    assert record["key-type"] == "p256" and record["location"] == uri
    again = hwid("init", "--key", uri, "--type", "rsa2048", "--json")
    assert again.returncode == 0 and "kept the existing p256" in again.stderr
    assert json.loads(again.stdout) == record == json.loads(hwid("show", "--key", uri, "--json").stdout)
    text = hwid("show", "--key", uri).stdout
    assert f"hardware-id-key-sha3-384: {record['hardware-id-key-sha3-384']}\n" in text
    assert "PRIVATE" not in first.stdout + text


def test_sign_request_id_prints_the_body_snapd_accepted(tmp_path: Path) -> None:
    uri = _vector_key(tmp_path, "rsa2048")
    done = hwid("sign-request-id", "--key", uri, "--json", "REQ-ID-SO-0002")
    assert done.returncode == 0, done.stderr
    assert done.stdout.encode() == (SO / "serial-request/body.json").read_bytes() + b"\n"
    sent = hwid("sign-request-id", "--key", uri, "--json", (SO / "snapd-flow/snapd-sent-request-id").read_text())
    assert sent.stdout.encode() == (SO / "snapd-flow/snapd-sent-body.json").read_bytes() + b"\n"


@pytest.mark.parametrize("key_type, hash_name", [("rsa2048", "sha256"), ("rsa2048", "sha512"), ("p256", "sha256"),
                                                 ("p384", "sha384"), ("p384", "sha3-384")])
def test_openssl_verifies_the_agents_signature(tmp_path: Path, key_type: str, hash_name: str) -> None:
    uri = _vector_key(tmp_path, key_type)
    config = tmp_path / "agent.toml"
    config.write_text(f'[onboarding]\nhash = "{hash_name}"\n')
    request_id = "REQ-ID-SO-0001"
    done = hwid("sign-request-id", "--config", str(config), "--key", uri, "--json", request_id)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["signature-hash-algorithm"] == hash_name
    (tmp_path / "sig").write_bytes(base64.b64decode(body["request-id-signature"]))
    (tmp_path / "nonce").write_text(request_id)
    digest = {"sha256": "-sha256", "sha384": "-sha384", "sha512": "-sha512", "sha3-384": "-sha3-384"}[hash_name]
    public = SO / f"hwid-{key_type}" / "hwid-key.pub.pem"
    verified = subprocess.run(["openssl", "dgst", digest, "-verify", str(public), "-signature", str(tmp_path / "sig"),
                               str(tmp_path / "nonce")], capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and verified.stdout.strip() == "Verified OK", verified.stdout + verified.stderr
    (tmp_path / "nonce").write_text(request_id + "\n")  # what a hook that forgot to strip snapctl's newline signs
    refused = subprocess.run(["openssl", "dgst", digest, "-verify", str(public), "-signature", str(tmp_path / "sig"),
                              str(tmp_path / "nonce")], capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "Verification failure" in refused.stdout + refused.stderr


def test_a_request_id_with_snapctls_newline_is_refused(tmp_path: Path) -> None:
    done = hwid("sign-request-id", "--key", _vector_key(tmp_path, "p256"), "REQ-ID-SO-0001\n")
    assert done.returncode == 78 and "strip it" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("key_type", ["rsa2048", "p256", "p384"])
def test_assertion_reproduces_the_vectors_bytes_from_the_devices_record(tmp_path: Path, key_type: str) -> None:
    """The factory host's step: the device's `show --json`, piped in, signed by the issuer at the vector's time."""
    record = hwid("show", "--key", _vector_key(tmp_path, key_type), "--json").stdout
    expected = (SO / f"hwid-{key_type}" / "hardware-identity.assert").read_bytes()
    headers = assertions.decode(expected).headers
    done = hwid("assertion", "--issuer-key", str(DATA / "brand/brand-key.pem"), "--issuer-id", "acme",
                "--manufacturer", str(headers["manufacturer"]), "--hardware-name", str(headers["hardware-name"]),
                "--hardware-id", str(headers["hardware-id"]), "--timestamp", str(headers["timestamp"]),
                "--record", "-", "--key", "file:/nonexistent/never-read.pem", stdin=record)
    assert done.returncode == 0, done.stderr
    assert done.stdout.encode() == expected


def test_assertion_refuses_what_snapd_would(tmp_path: Path) -> None:
    done = hwid("assertion", "--issuer-key", str(DATA / "brand/brand-key.pem"), "--issuer-id", "acme",
                "--manufacturer", "ACME", "--hardware-name", "not a name", "--hardware-id", "HW-1",
                "--hardware-id-key", (SO / "hwid-p256/hardware-id-key").read_text())
    assert done.returncode == 1 and "invalid hardware-name" in done.stderr and done.stdout == ""


def test_errors_are_one_line_with_the_exit_status(tmp_path: Path) -> None:
    missing = hwid("show", "--key", f"file:{tmp_path / 'none.pem'}")
    assert missing.returncode == 1 and "factory-agent hardware-identity init" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1
    scheme = hwid("show", "--key", "tpm2:handle=0x81000001")
    assert scheme.returncode == 78 and "expected file:/PATH or pkcs11:" in scheme.stderr
    module = hwid("show", "--key", "pkcs11:token=t;object=o")
    assert module.returncode == 78 and "set [onboarding] pkcs11-module" in module.stderr
    config = tmp_path / "agent.toml"
    config.write_text('[onboarding]\nhash = "md5"\n')
    weak = hwid("show", "--config", str(config))
    assert weak.returncode == 78 and str(config) in weak.stderr and "'onboarding.hash'" in weak.stderr
    usage = hwid("frobnicate")
    assert usage.returncode == 2
