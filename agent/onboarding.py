"""Secure device onboarding, the pure part: the hardware identity key's public record, the request-id
signature's text, the registration body and the hardware-identity assertion's headers.

Each rule is what snapd 2.77.1's own code settles (shared/reference/secure-onboarding.md §8, and
the vectors in tests/data/secure-onboarding/): the key is one line of standard base64 of its DER
SubjectPublicKeyInfo, its digest is SHA3-384 over that *text* (not over the DER), ECDSA signatures
are DER ``SEQUENCE {r, s}``, and the body is Go's ``json.Marshal`` of the fields. No I/O here: the
key itself lives behind agent/hwkey.py, which only ever signs.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Method(StrEnum):
    """How the device proves itself to the vault: the model's shared api-key, or its own hardware identity key."""

    API_KEY = "api-key"
    HARDWARE_IDENTITY = "hardware-identity"


class Hash(StrEnum):
    """``signature-hash-algorithm`` values the agent signs with. snapd's verifier takes any hash its binary
    links in, MD5 and SHA-1 included (the vectors' hash matrices): the agent offers only strong ones."""

    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"
    SHA3_384 = "sha3-384"


class SignatureEncoding(StrEnum):
    """How ``request-id-signature`` is written: snapd has no encoding (its verifier takes bytes), the Model
    Service's is not public; the vectors use standard padded base64."""

    BASE64 = "base64"
    BASE64URL = "base64url"  # URL-safe alphabet, padded
    HEX = "hex"


# Outside the state directory: losing or wiping that must never lose the device's identity.
DEFAULT_HARDWARE_KEY = "file:/var/lib/factory-agent-identity/hardware-key.pem"
DIGEST_FIELD = "hardware-id-key-sha3-384"
LEGACY_DIGEST_FIELD = "hardware-id-key-sha384"  # the spelling snapd 2.74-2.77 requires (PR #17526 renames it)
SIGNATURE_FIELD = "request-id-signature"
HASH_FIELD = "signature-hash-algorithm"


def hardware_id_key(spki_der: bytes) -> str:
    """The ``hardware-id-key`` text: one line of standard base64 of the DER SubjectPublicKeyInfo."""
    return base64.b64encode(spki_der).decode("ascii")


def key_digest(key_text: str) -> str:
    """``hardware-id-key-sha3-384``: base64url without padding of SHA3-384 over the key's exact text.

    snapd hashes the header's text, so a key wrapped over several lines has another digest, and a
    digest over the DER bytes is refused ("hardware id key does not match provided hash").
    """
    digest = hashlib.sha3_384(key_text.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def spki_digest(spki_der: bytes) -> str:
    """The ``hardware-id-key-sha3-384`` of a DER SubjectPublicKeyInfo: the digest of its one-line text."""
    return key_digest(hardware_id_key(spki_der))


def der_ecdsa(raw: bytes) -> bytes:
    """An ECDSA signature as DER ``SEQUENCE {INTEGER r, INTEGER s}`` from the raw ``r || s`` a PKCS#11 token or
    a TPM returns (snapd refuses the raw form: "asn1: structure error")."""
    if not raw or len(raw) % 2:
        raise ValueError(f"a raw ECDSA signature is r || s of equal halves, not {len(raw)} bytes")
    half = len(raw) // 2
    body = _der_integer(raw[:half]) + _der_integer(raw[half:])
    return b"\x30" + _der_length(len(body)) + body


def _der_integer(big_endian: bytes) -> bytes:
    value = big_endian.lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:
        value = b"\x00" + value  # positive: a set top bit would read as negative
    return b"\x02" + _der_length(len(value)) + value


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


# DER DigestInfo prefixes (RFC 8017 §9.2, and NIST's SHA3 OIDs): what PKCS#1 v1.5 signs before the digest.
# A token's plain CKM_RSA_PKCS mechanism gets DigestInfo || digest, so every hash works on every token.
_DIGEST_INFO = {
    Hash.SHA256: bytes.fromhex("3031300d060960864801650304020105000420"),
    Hash.SHA384: bytes.fromhex("3041300d060960864801650304020205000430"),
    Hash.SHA512: bytes.fromhex("3051300d060960864801650304020305000440"),
    Hash.SHA3_384: bytes.fromhex("3041300d060960864801650304020905000430"),
}


def digest(message: bytes, hash_name: Hash) -> bytes:
    """``message`` hashed once with ``hash_name``: what ECDSA signs, and what PKCS#1 v1.5 wraps."""
    return hashlib.new(hash_name.replace("-", "_"), message).digest()


def digest_info(message: bytes, hash_name: Hash) -> bytes:
    """The PKCS#1 v1.5 DigestInfo of ``message``: a raw RSA (CKM_RSA_PKCS) signature over it is the standard one."""
    return _DIGEST_INFO[hash_name] + digest(message, hash_name)


def encode_signature(signature: bytes, encoding: SignatureEncoding = SignatureEncoding.BASE64) -> str:
    if encoding is SignatureEncoding.HEX:
        return signature.hex()
    if encoding is SignatureEncoding.BASE64URL:
        return base64.urlsafe_b64encode(signature).decode("ascii")
    return base64.b64encode(signature).decode("ascii")


def go_marshal(value: Any) -> bytes:
    """What Go's json.Marshal writes: compact, map keys sorted, ``<>&`` and U+2028/U+2029 escaped,
    other non-ASCII as raw UTF-8, no trailing newline (the form snapd sends a hook's body in)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    for char in "&<>\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text.encode("utf-8")


def registration_body(digest: str, signature: str, hash_name: Hash, legacy_field: bool = True) -> bytes:
    """The serial-request body of a secure-onboarding registration, exactly as snapd 2.77.1 sends what the
    prepare-serial-request hook set: both digest spellings unless ``legacy_field`` is off."""
    fields = {DIGEST_FIELD: digest, SIGNATURE_FIELD: signature, HASH_FIELD: str(hash_name)}
    if legacy_field:
        fields[LEGACY_DIGEST_FIELD] = digest
    return go_marshal(fields)


@dataclass(frozen=True, slots=True)
class Record:
    """What the factory exports per device for its hardware-identity assertion: never anything secret."""

    key: str  # hardware-id-key
    digest: str  # hardware-id-key-sha3-384
    key_type: str  # rsa2048, p256, p384
    location: str  # the key's URI

    @classmethod
    def of(cls, spki_der: bytes, key_type: str, location: str) -> Record:
        key = hardware_id_key(spki_der)
        return cls(key, key_digest(key), key_type, location)

    def to_json(self) -> dict[str, str]:
        return {"hardware-id-key": self.key, DIGEST_FIELD: self.digest, "key-type": self.key_type,
                "location": self.location}


def hardware_identity_headers(issuer_id: str, manufacturer: str, hardware_name: str, hardware_id: str,
                              key_text: str, timestamp: str) -> dict[str, str]:
    """A hardware-identity assertion's headers, signed for itself by the issuer; the codec
    (assertions.build_content) orders and checks them as snapd's assembleHardwareIdentity does."""
    return {"type": "hardware-identity", "authority-id": issuer_id, "issuer-id": issuer_id,
            DIGEST_FIELD: key_digest(key_text), "hardware-id": hardware_id, "hardware-id-key": key_text,
            "hardware-name": hardware_name, "manufacturer": manufacturer, "timestamp": timestamp}
