"""The hardware identity key in a real PKCS#11 token (SoftHSM2 through PyKCS11): made in the token, never
extractable, signing what snapd 2.77.1 accepts (RSA byte for byte the vectors', ECDSA verified by
OpenSSL), and every way a token fails said in one line with what to do."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import hwkey
from agent.errors import ConfigError
from agent.onboarding import Hash
from tests.fakes import launcher
from tests.fakes.launcher import agent_argv
from tests.fakes.softhsm import SoftHsm, Token

SO = Path(__file__).resolve().parents[1] / "data" / "secure-onboarding"
REQUEST_ID = "REQ-ID-SO-0001"
OPENSSL_DIGEST = {"sha256": "-sha256", "sha384": "-sha384", "sha512": "-sha512", "sha3-384": "-sha3-384"}


def hwid(*args: str) -> subprocess.CompletedProcess[str]:
    done = launcher.run(agent_argv("hardware-identity", *args), timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _config(tmp_path: Path, token: Token, hash_name: str = "sha256") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[onboarding]\nhardware-key = "{token.uri()}"\npkcs11-module = "{token.module}"\n'
                    f'hash = "{hash_name}"\n')
    return path


def _openssl_verifies(tmp_path: Path, record: dict[str, str], body: dict[str, str], request_id: str) -> bool:
    public = tmp_path / "public.pem"
    public.write_text("-----BEGIN PUBLIC KEY-----\n" + record["hardware-id-key"] + "\n-----END PUBLIC KEY-----\n")
    (tmp_path / "sig").write_bytes(base64.b64decode(body["request-id-signature"]))
    (tmp_path / "nonce").write_text(request_id)
    done = subprocess.run(["openssl", "dgst", OPENSSL_DIGEST[body["signature-hash-algorithm"]], "-verify",
                           str(public), "-signature", str(tmp_path / "sig"), str(tmp_path / "nonce")],
                          capture_output=True, text=True, check=False)
    return done.returncode == 0 and done.stdout.strip() == "Verified OK"


@pytest.mark.parametrize("key_type, hash_name", [("p256", "sha256"), ("p384", "sha3-384"), ("rsa2048", "sha512")])
def test_init_show_and_sign_in_the_token_openssl_verifies(softhsm: SoftHsm, tmp_path: Path, key_type: str,
                                                          hash_name: str) -> None:
    token = softhsm.token()
    config = _config(tmp_path, token, hash_name)
    made = hwid("init", "--config", str(config), "--type", key_type, "--json")
    assert made.returncode == 0 and f"made a new {key_type} hardware identity key at pkcs11:" in made.stderr
    record = json.loads(made.stdout)
    assert record["key-type"] == key_type and record["location"] == token.uri()
    kept = hwid("init", "--config", str(config), "--type", "rsa2048" if key_type != "rsa2048" else "p256", "--json")
    assert kept.returncode == 0 and "kept the existing" in kept.stderr and json.loads(kept.stdout) == record
    assert json.loads(hwid("show", "--config", str(config), "--json").stdout) == record
    signed = hwid("sign-request-id", "--config", str(config), "--json", REQUEST_ID)
    assert signed.returncode == 0, signed.stderr
    body = json.loads(signed.stdout)
    assert body["hardware-id-key-sha3-384"] == body["hardware-id-key-sha384"] == record["hardware-id-key-sha3-384"]
    assert _openssl_verifies(tmp_path, record, body, REQUEST_ID)
    assert not _openssl_verifies(tmp_path, record, body, REQUEST_ID + "\n")


@pytest.mark.parametrize("hash_name", list(Hash))
def test_rsa_signatures_from_the_token_are_the_vectors_byte_for_byte(softhsm: SoftHsm, tmp_path: Path,
                                                                      hash_name: Hash) -> None:
    """The vectors' RSA-2048 key imported into the token: CKM_RSA_PKCS over our DigestInfo is snapd's signature."""
    token = softhsm.token()
    softhsm.import_key(token, SO / "hwid-rsa2048" / "hwid-key.pem", "hardware-identity")
    config = _config(tmp_path, token, hash_name)
    record = json.loads(hwid("show", "--config", str(config), "--json").stdout)
    assert record["hardware-id-key"] == (SO / "hwid-rsa2048" / "hardware-id-key").read_text()
    body = json.loads(hwid("sign-request-id", "--config", str(config), "--json",
                           (SO / "request-id").read_text()).stdout)
    expected = (SO / "signatures" / "valid" / f"rsa2048-{hash_name}.b64").read_text().strip()
    assert body["request-id-signature"] == expected and body["signature-hash-algorithm"] == hash_name


READ_OUT = """
import sys, PyKCS11
lib = PyKCS11.PyKCS11Lib(); lib.load(sys.argv[1])
(slot,) = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == sys.argv[2]]
session = lib.openSession(slot); session.login(sys.argv[3])
(key,) = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, sys.argv[4])])
print(session.getAttributeValue(key, [PyKCS11.CKA_SENSITIVE, PyKCS11.CKA_EXTRACTABLE]))
# PyKCS11 gives None for an attribute the token refuses (CKR_ATTRIBUTE_SENSITIVE)
(value,) = session.getAttributeValue(key, [PyKCS11.CKA_VALUE], allAsBinary=True)
print("refused" if value is None else f"READ OUT {len(value)} bytes")
"""


def test_the_private_key_made_in_the_token_cannot_be_read_out(softhsm: SoftHsm, tmp_path: Path) -> None:
    token = softhsm.token()
    assert hwid("init", "--config", str(_config(tmp_path, token))).returncode == 0
    tried = softhsm.python(READ_OUT, token.module, token.label, "1234", "hardware-identity")
    assert tried.returncode == 0, tried.stderr
    assert tried.stdout.splitlines() == ["[True, False]", "refused"]
    listed = softhsm.list_objects(token)  # OpenSC's pkcs11-tool says the same
    assert "Private Key Object; EC" in listed and "never extractable" in listed and "sensitive" in listed


def test_a_wrong_pin_a_missing_token_or_key_each_say_what_to_do(softhsm: SoftHsm, tmp_path: Path) -> None:
    token = softhsm.token()
    config = str(_config(tmp_path, token))
    assert hwid("init", "--config", config).returncode == 0
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("9999\n")
    wrong.chmod(0o600)
    done = hwid("show", "--key", token.uri().replace(str(token.pin_file), str(wrong)), "--config", config)
    assert done.returncode == 1 and "refused the PIN in pin-source" in done.stderr and "9999" not in done.stderr
    absent = hwid("show", "--key", token.uri().replace(token.label, "no-such-token"), "--config", config)
    assert absent.returncode == 1 and "no PKCS#11 token 'no-such-token' present" in absent.stderr
    assert repr(token.label) in absent.stderr  # the tokens it did find
    nokey = hwid("show", "--key", token.uri("not-made"), "--config", config)
    assert nokey.returncode == 1 and "factory-agent hardware-identity init" in nokey.stderr
    token.pin_file.chmod(0o644)
    shared = hwid("show", "--config", config)
    assert shared.returncode == 1 and "cannot read the token's PIN" in shared.stderr
    assert "readable by others" in shared.stderr
    for failed in (done, absent, nokey, shared):
        assert len(failed.stderr.splitlines()) == 1, failed.stderr


def test_a_module_others_may_change_is_not_loaded(softhsm: SoftHsm, tmp_path: Path) -> None:
    """A library loaded into a root process runs its code as root: the agent loads only root's, unwritable ones."""
    token = softhsm.token()
    planted = tmp_path / "libplanted.so"
    shutil.copy(token.module, planted)
    planted.chmod(0o666)
    done = hwid("show", "--key", token.uri(module_path=str(planted)))
    assert done.returncode == 1 and "cannot load PKCS#11 module" in done.stderr and "writable by others" in done.stderr


def test_a_key_with_no_module_configured_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[onboarding\] pkcs11-module"):
        hwkey.open_key("pkcs11:token=t;object=o")
