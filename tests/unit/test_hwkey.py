"""The hardware identity key in a file: made once and never replaced, refused when it is not the agent's
own or not a type snapd verifies, and signing as snapd 2.77.1's verifier wants (the vectors' keys)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent import hwkey
from agent.errors import ConfigError, HardwareKeyError
from agent.onboarding import Hash

SO = Path(__file__).resolve().parents[1] / "data" / "secure-onboarding"
REQUEST_ID = (SO / "request-id").read_bytes()
HASHES = {Hash.SHA256: hashes.SHA256(), Hash.SHA384: hashes.SHA384(), Hash.SHA512: hashes.SHA512(),
          Hash.SHA3_384: hashes.SHA3_384()}


def _vector_key(tmp_path: Path, key_type: str) -> Path:
    path = tmp_path / f"{key_type}.pem"
    shutil.copy(SO / f"hwid-{key_type}" / "hwid-key.pem", path)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("hash_name", list(Hash))
def test_rsa_signatures_are_the_vectors_byte_for_byte(tmp_path: Path, hash_name: Hash) -> None:
    """PKCS#1 v1.5 is deterministic: the agent's signature is the one snapd's verifier accepted."""
    key = hwkey.open_key(f"file:{_vector_key(tmp_path, 'rsa2048')}")
    expected = SO / "signatures" / "valid" / f"rsa2048-{hash_name}.b64"
    assert key.key_type == "rsa2048"
    assert key.sign(REQUEST_ID, hash_name) == base64.b64decode(expected.read_bytes())


@pytest.mark.parametrize("key_type", ["p256", "p384"])
@pytest.mark.parametrize("hash_name", list(Hash))
def test_ecdsa_signatures_are_der_and_verify(tmp_path: Path, key_type: str, hash_name: Hash) -> None:
    key = hwkey.open_key(f"file:{_vector_key(tmp_path, key_type)}")
    signature = key.sign(REQUEST_ID, hash_name)
    assert signature[0] == 0x30 and len(signature) == signature[1] + 2  # one DER SEQUENCE, nothing after it
    public = serialization.load_der_public_key(key.public_der())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, REQUEST_ID, ec.ECDSA(HASHES[hash_name]))
    with pytest.raises(InvalidSignature):
        public.verify(signature, REQUEST_ID + b"\n", ec.ECDSA(HASHES[hash_name]))


def test_public_der_is_the_vectors_spki(tmp_path: Path) -> None:
    key = hwkey.open_key(f"file:{_vector_key(tmp_path, 'p384')}")
    public = serialization.load_pem_public_key((SO / "hwid-p384" / "hwid-key.pub.pem").read_bytes())
    assert key.public_der() == public.public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key_type", hwkey.KEY_TYPES)
def test_create_makes_a_private_key_once_and_never_replaces_it(tmp_path: Path, key_type: str) -> None:
    path = tmp_path / "identity" / "hardware-key.pem"
    key, made = hwkey.create_key(f"file:{path}", key_type)
    assert made and key.key_type == key_type and key.uri == f"file:{path}"
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    before = path.read_bytes()
    again, made = hwkey.create_key(f"file:{path}", "rsa2048" if key_type != "rsa2048" else "p256")
    assert not made and again.key_type == key_type and path.read_bytes() == before
    assert not [p.name for p in path.parent.iterdir() if p.name != path.name]  # no temp file left


def test_an_unusable_key_is_never_replaced(tmp_path: Path) -> None:
    path = _vector_key(tmp_path, "p256")
    path.chmod(0o644)
    before = path.read_bytes()
    with pytest.raises(HardwareKeyError, match=r"readable by others.*chmod 0600"):
        hwkey.create_key(f"file:{path}")
    assert path.read_bytes() == before
    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"not a key\n")
    broken.chmod(0o600)
    with pytest.raises(HardwareKeyError, match="not an unencrypted PEM private key"):
        hwkey.create_key(f"file:{broken}")
    assert broken.read_bytes() == b"not a key\n"


def test_a_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = _vector_key(tmp_path, "p256")
    link = tmp_path / "link.pem"
    link.symlink_to(target)
    with pytest.raises(HardwareKeyError, match="symbolic link"):
        hwkey.open_key(f"file:{link}")
    with pytest.raises(HardwareKeyError, match="symbolic link"):
        hwkey.create_key(f"file:{link}")


def test_a_missing_key_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(HardwareKeyError, match="factory-agent hardware-identity init"):
        hwkey.open_key(f"file:{tmp_path / 'none.pem'}")


def test_ed25519_and_small_rsa_are_refused_with_the_reason(tmp_path: Path) -> None:
    """snapd 2.76+ cannot verify Ed25519 (`unsupported algorithm type`); RSA under 2048 bits is no identity."""
    ed = _vector_key(tmp_path, "ed25519")
    with pytest.raises(HardwareKeyError, match=r"an Ed25519 key as .*snapd verifies only RSA .* and ECDSA P-256"):
        hwkey.open_key(f"file:{ed}")
    small = tmp_path / "small.pem"
    small.write_bytes(rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    small.chmod(0o600)
    with pytest.raises(HardwareKeyError, match="cannot use a 1024-bit RSA key as the hardware identity key"):
        hwkey.open_key(f"file:{small}")


@pytest.mark.parametrize("uri, path", [("file:/a/b.pem", "/a/b.pem"), ("file:///a/b%20c.pem", "/a/b c.pem"),
                                       ("file://localhost/a.pem", "/a.pem")])
def test_file_uris(uri: str, path: str) -> None:
    assert hwkey.file_path(uri) == Path(path)


@pytest.mark.parametrize("uri", ["file:relative.pem", "file://host/a.pem", "file:"])
def test_bad_file_uris_are_config_errors(uri: str) -> None:
    with pytest.raises(ConfigError, match="hardware key"):
        hwkey.file_path(uri)


def test_other_schemes_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"expected file:/PATH or pkcs11:\.\.\. \(RFC 7512\)"):
        hwkey.open_key("tpm2:handle=0x81000001")
    assert hwkey.file_path("pkcs11:token=x") is None
    with pytest.raises(ConfigError, match=r"no PKCS#11 module: set \[onboarding\] pkcs11-module"):
        hwkey.open_key("pkcs11:token=x;object=y")


def test_rsa_signature_is_pkcs1_v15_not_pss(tmp_path: Path) -> None:
    key = hwkey.open_key(f"file:{_vector_key(tmp_path, 'rsa2048')}")
    public = serialization.load_der_public_key(key.public_der())
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(key.sign(REQUEST_ID, Hash.SHA256), REQUEST_ID, padding.PKCS1v15(), hashes.SHA256())
