"""Secure device onboarding's pure rules against what snapd 2.77.1's own code produced and decided
(tests/data/secure-onboarding/, copied from shared/vectors/secure-onboarding/; its README says how).

The key text and its digest, the DER form of a raw ECDSA signature, Go's json.Marshal, the
registration body, and the hardware-identity assertion through the codec: decoded, verified,
refused where snapd refuses, and signed again to the vectors' exact bytes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from agent import assertions, keys, onboarding
from agent.errors import AssertionFormatError
from agent.onboarding import Hash

DATA = Path(__file__).resolve().parents[1] / "data"
SO = DATA / "secure-onboarding"
KEY_TYPES = ("rsa2048", "p256", "p384", "ed25519")


def _spki_der(key_type: str) -> bytes:
    public = serialization.load_pem_public_key((SO / f"hwid-{key_type}" / "hwid-key.pub.pem").read_bytes())
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_key_text_and_digest_are_snapds(key_type: str) -> None:
    directory = SO / f"hwid-{key_type}"
    text = onboarding.hardware_id_key(_spki_der(key_type))
    assert text == (directory / "hardware-id-key").read_text()  # one line, no newline
    assert onboarding.key_digest(text) == (directory / "hardware-id-key-sha3-384").read_text()
    recorded = json.loads((directory / "hwid.json").read_text())
    assert onboarding.key_digest(text) != recorded["der-sha3-384-not-used-by-snapd"]
    record = onboarding.Record.of(_spki_der(key_type), key_type, "file:/k.pem").to_json()
    assert {k: record[k] for k in ("hardware-id-key", "hardware-id-key-sha3-384")} == {
        k: recorded[k] for k in ("hardware-id-key", "hardware-id-key-sha3-384")}


def test_a_raw_r_s_signature_made_der_is_the_one_snapd_accepts() -> None:
    """The vectors' raw r||s (what a TPM returns) is refused by snapd; its DER form verifies."""
    raw = base64.b64decode((SO / "signatures/invalid/p256-raw-r-s-sha256.b64").read_bytes())
    public = serialization.load_pem_public_key((SO / "hwid-p256/hwid-key.pub.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(onboarding.der_ecdsa(raw), (SO / "request-id").read_bytes(), ec.ECDSA(hashes.SHA256()))


@given(st.integers(1, 2**384 - 1), st.integers(1, 2**384 - 1), st.sampled_from([32, 48, 66]))
def test_der_ecdsa_encodes_any_r_and_s(r: int, s: int, size: int) -> None:
    r, s = r % (1 << (8 * size)) or 1, s % (1 << (8 * size)) or 1
    der = onboarding.der_ecdsa(r.to_bytes(size, "big") + s.to_bytes(size, "big"))
    assert decode_dss_signature(der) == (r, s)


@pytest.mark.parametrize("raw", [b"", b"\x01\x02\x03"])
def test_der_ecdsa_refuses_what_is_not_r_and_s(raw: bytes) -> None:
    with pytest.raises(ValueError, match="equal halves"):
        onboarding.der_ecdsa(raw)


def test_go_marshal_is_what_snapd_put_on_the_wire() -> None:
    """The html-chars case: the hook set keys out of order with <, >, & and é; snapd posted Go's json.Marshal."""
    hook_value = json.loads((SO / "snapd-flow/html-chars.body").read_bytes())
    stream = (SO / "snapd-flow/html-chars/serial-request-post-1.stream").read_bytes()
    head, _, rest = stream.partition(b"\n\n")  # the harness's device key is 1024-bit: the codec would refuse it
    posted = rest[:int(assertions.parse_headers(head)["body-length"])]  # type: ignore[arg-type]
    assert onboarding.go_marshal(hook_value) == posted
    assert b"\\u003c" in posted and "é".encode() in posted


def test_registration_body_is_byte_for_byte_the_vectors() -> None:
    digest = (SO / "hwid-rsa2048/hardware-id-key-sha3-384").read_text()
    signature = (SO / "serial-request/request-id-signature.b64").read_text().strip()
    body = onboarding.registration_body(digest, signature, Hash.SHA256)
    assert body == (SO / "serial-request/body.json").read_bytes()
    assert body == assertions.decode((SO / "serial-request/serial-request.assert").read_bytes()).body
    sent = json.loads((SO / "snapd-flow/snapd-sent-body.json").read_bytes())
    assert onboarding.registration_body(sent["hardware-id-key-sha3-384"], sent["request-id-signature"],
                                        Hash.SHA256) == (SO / "snapd-flow/snapd-sent-body.json").read_bytes()


def test_registration_body_without_the_legacy_spelling() -> None:
    body = json.loads(onboarding.registration_body("D", "S", Hash.SHA3_384, legacy_field=False))
    assert body == {"hardware-id-key-sha3-384": "D", "request-id-signature": "S", "signature-hash-algorithm": "sha3-384"}


@pytest.mark.parametrize("encoding, expected", [("base64", "+/8="), ("base64url", "-_8="), ("hex", "fbff")])
def test_signature_encodings(encoding: str, expected: str) -> None:
    assert onboarding.encode_signature(b"\xfb\xff", onboarding.SignatureEncoding(encoding)) == expected


# --- the hardware-identity assertion through the codec -----------------------------


def _issuer_key() -> keys.DeviceKey:
    return keys.load_key((DATA / "brand/brand-key.pem").read_bytes())


def _issuer_public() -> object:
    (account_key,) = [a for a in assertions.decode_stream((SO / "issuer/issuer-chain.assert").read_bytes())
                      if a.type == "account-key"]
    return assertions.account_public_key(account_key)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_the_vectors_assertions_decode_verify_and_sign_again_to_the_same_bytes(key_type: str) -> None:
    data = (SO / f"hwid-{key_type}" / "hardware-identity.assert").read_bytes()
    decoded = assertions.decode(data)
    assertions.verify(decoded, _issuer_public())  # type: ignore[arg-type]
    assert decoded.encode() == data
    headers = json.loads((SO / f"hwid-{key_type}" / "hardware-identity.json").read_text())
    made = onboarding.hardware_identity_headers(
        headers["issuer-id"], headers["manufacturer"], headers["hardware-name"], headers["hardware-id"],
        headers["hardware-id-key"], headers["timestamp"])
    created = int(assertions.check_timestamp(made, "timestamp").timestamp())
    issuer = _issuer_key()
    assert assertions.sign(made, b"", issuer.public, issuer.sign, created).encode() == data


def test_a_wrapped_key_is_valid_with_its_own_digest() -> None:
    wrapped = assertions.decode((SO / "digest/wrapped-key-hardware-identity.assert").read_bytes())
    text = wrapped.header("hardware-id-key")
    assert "\n" in text and onboarding.key_digest(text) == wrapped.header("hardware-id-key-sha3-384")
    assert wrapped.header("hardware-id-key-sha3-384") != (SO / "hwid-rsa2048/hardware-id-key-sha3-384").read_text()


@pytest.mark.parametrize("change, message", [
    ({"hardware-id-key-sha3-384": "vRVRBHN2wJbXqrvO_1PGgoc70_IsKrAEFZYzb9Ui13pQ5hHIKxvLx-Z9Unn3s9YD"},
     "hardware id key does not match provided hash"),  # the DER digest, which snapd refuses (digest/der-digest.err)
    ({"authority-id": "other"}, "issuer id must match authority id"),
    ({"hardware-name": "acme gw"}, "invalid hardware-name"),
    ({"issuer-id": "A", "authority-id": "A"}, "invalid issuer-id"),
    ({"manufacturer": ""}, "'manufacturer' header"),
    ({"hardware-id": ""}, "'hardware-id' header"),
])
def test_the_codec_refuses_what_snapd_refuses(change: dict[str, str], message: str) -> None:
    text = (SO / "hwid-p256/hardware-id-key").read_text()
    headers = onboarding.hardware_identity_headers("acme", "ACME Devices Ltd", "acme-gw-board", "HW-1", text,
                                                   "2026-12-01T21:52:15Z")
    issuer = _issuer_key()
    with pytest.raises(AssertionFormatError, match=message):
        assertions.sign({**headers, **change}, b"", issuer.public, issuer.sign, 1796161935)
