"""The lab vault as a lab Model Service: a model onboarded with hardware identity keys instead of an api-key.

It holds the hardware-identity assertions a factory imports (files in DIR/hardware-identities/,
read again at every request, so dropping one in imports it), each checked as snapd's decoder checks
it and signed by the lab's brand key (the issuer, whose chain is DIR/brand-chain.assert). A
``POST serial`` is answered only when its body names an imported digest, its request-id was issued
here and is unspent, and its signature verifies over the request-id with that key and hash; then the
request-id is burned and the serial signed, as the lab vault does.

The Model Service's own error codes are not public (shared/reference/secure-onboarding.md §4):
the lab's are ``unknown-hardware-identity``, ``invalid-request-id-signature``, ``invalid-body`` and
``serial-required``, HTTP 400 with the Serial Vault's JSON shape.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any

from . import assertions, hwkey
from .assertions import Assertion
from .errors import AssertionFormatError
from .labvault import LabVault, Refusal, Reply
from .onboarding import DIGEST_FIELD, HASH_FIELD, LEGACY_DIGEST_FIELD, SIGNATURE_FIELD, Hash

log = logging.getLogger(__name__)

IMPORT_DIR = "hardware-identities"
MAX_IMPORT_BYTES = 64 * 1024


class ModelServiceVault(LabVault):
    """The lab vault's device API with no api-key, checking each serial-request's hardware identity."""

    def __init__(self, directory: Path, **kwargs: Any) -> None:
        super().__init__(directory, require_api_key=False, **kwargs)
        (self.directory / IMPORT_DIR).mkdir(mode=0o700, exist_ok=True)

    @property
    def import_dir(self) -> Path:
        return self.directory / IMPORT_DIR

    def imported(self) -> dict[str, Assertion]:
        """The hardware-identity assertions in the import directory that check out, by digest."""
        found: dict[str, Assertion] = {}
        for path in sorted(self.import_dir.glob("*")):
            try:
                data = path.read_bytes()[:MAX_IMPORT_BYTES]
                for assertion in assertions.decode_stream(data):
                    self._check_imported(assertion)
                    found[assertion.header(DIGEST_FIELD)] = assertion
            except (OSError, AssertionFormatError) as exc:
                log.warning("lab model service: not importing %s: %s", path.name, exc)
        return found

    def _check_imported(self, assertion: Assertion) -> None:
        if assertion.type != "hardware-identity":
            raise AssertionFormatError(f"a {assertion.type} assertion, not a hardware-identity")
        if assertion.header("issuer-id") != self.brand:
            raise AssertionFormatError(f"issued by {assertion.header('issuer-id')!r}, not the brand {self.brand!r}")
        assertions.verify(assertion, self.brand_key.public)

    def answer_serial(self, request: Assertion) -> Reply:
        request_id = request.header("request-id")
        body = _body(request.body)
        if not self.issued(request_id):
            raise Refusal("invalid-nonce")
        digest = body.get(DIGEST_FIELD) or body.get(LEGACY_DIGEST_FIELD)
        identity = self.imported().get(str(digest))
        if identity is None:
            raise Refusal("unknown-hardware-identity", f"No hardware identity is imported for {DIGEST_FIELD} "
                                                       f"{digest}: import its hardware-identity assertion")
        problem = verify_request_id_signature(identity, request_id, body.get(SIGNATURE_FIELD),
                                              body.get(HASH_FIELD))
        if problem:
            self.spend(request_id)  # a forged or broken signature does not get another try on this request-id
            raise Refusal("invalid-request-id-signature", f"The request-id signature does not verify: {problem}")
        if not request.headers.get("serial"):
            raise Refusal("serial-required")
        return super().answer_serial(request)


def _body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get(SIGNATURE_FIELD), str):
        raise Refusal("invalid-body", f"The serial-request body must be a JSON object with {DIGEST_FIELD}, "
                                      f"{SIGNATURE_FIELD} and {HASH_FIELD}")
    return body


def verify_request_id_signature(identity: Assertion, request_id: str, signature: Any, hash_name: Any) -> str:
    """"" when ``signature`` (standard base64) verifies over ``request_id`` with the identity's key and
    ``hash_name``, as snapd's VerifyNonceSignature checks it (PKCS#1 v1.5, or ECDSA in DER); else why not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if hash_name not in set(Hash):
        return f"unsupported hash {hash_name!r}"
    try:
        raw = base64.b64decode(str(signature), validate=True)
        key = serialization.load_der_public_key(base64.b64decode(identity.header("hardware-id-key")))
    except (binascii.Error, ValueError) as exc:
        return f"cannot decode: {exc}"
    algorithm = hwkey.hash_algorithm(Hash(hash_name))
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, request_id.encode("utf-8"), padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(raw, request_id.encode("utf-8"), ec.ECDSA(algorithm))
        else:
            return f"unsupported algorithm type: {type(key).__name__.lstrip('_')}"
    except InvalidSignature:
        return "invalid signature"
    return ""
