"""Byte-for-byte compatibility with snapd, proven on the vectors snapd's own code produced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent import assertions, openpgp
from agent.errors import AssertionFormatError, BadSignatureError
from tests.conftest import DATA

# Vectors the codec must refuse, with snapd's reason or ours: snapd's devicestate test harness signs with
# 1024-bit device keys (its testKeyLength), below the 2048 bits the agent accepts. (digest/der-digest.assert is
# empty: snapd refused to sign a DER digest, digest/der-digest.err; test_onboarding.py refuses one too.)
EMPTY = {DATA / "secure-onboarding/digest/der-digest.assert"}
REFUSED = {
    **{p: "unacceptable RSA public key (1024 bits" for p in DATA.glob("secure-onboarding/snapd-flow/**/*")
       if p.suffix in (".assert", ".stream")},
    **{p: "unacceptable RSA public key (1024 bits" for p in DATA.glob("secure-onboarding/serial-request/harness-check/*")
       if p.suffix in (".assert", ".stream")},
}
ASSERTION_FILES = sorted(p for p in DATA.rglob("*") if p.suffix in (".assert", ".stream", ".account", ".account-key")
                         and p not in REFUSED.keys() | EMPTY)


@pytest.mark.parametrize("path", sorted(REFUSED), ids=lambda p: str(p.relative_to(DATA)))
def test_the_vectors_the_codec_refuses_are_refused_for_their_reason(path: Path) -> None:
    with pytest.raises(AssertionFormatError, match=re.escape(REFUSED[path])):
        assertions.decode_stream(path.read_bytes())


def test_every_vector_file_is_covered() -> None:
    names = {p.name for p in ASSERTION_FILES}
    assert {"serial.assert", "serial-request-body.assert", "serial-request-minimal.assert",
            "serial-request-with-model.stream", "brand-chain.assert", "trusted.assert",
            "brand.account", "brand.account-key", "model-acme-gw.assert"} <= names


@pytest.mark.parametrize("path", ASSERTION_FILES, ids=lambda p: str(p.relative_to(DATA)))
def test_decode_then_encode_is_identical(path: Path) -> None:
    data = path.read_bytes()
    stream = assertions.decode_stream(data)
    assert stream
    assert assertions.encode_stream(stream) == data
    if len(stream) == 1:
        assert assertions.decode(data).encode() == data


@pytest.mark.parametrize("path", ASSERTION_FILES, ids=lambda p: str(p.relative_to(DATA)))
def test_rebuilt_content_matches_snapd_header_order(path: Path) -> None:
    """Re-encoding the decoded headers reproduces snapd's signed bytes: order, grammar, body-length."""
    for a in assertions.decode_stream(path.read_bytes()):
        assert assertions.build_content(a.headers, a.body) == a.content


def test_device_key_id_and_encoding(device_key) -> None:
    assert device_key.key_id == (DATA / "device" / "device-key.id").read_text().strip()
    assert device_key.public.encoded == (DATA / "device" / "device-key.pub").read_text().strip()
    assert device_key.public.encoded.startswith("AcbBTQRWhcGAARAA")


def test_brand_key_id_matches_brand_json(brand_key) -> None:
    ids = json.loads((DATA / "brand" / "brand.json").read_text())
    assert brand_key.key_id == ids["brand-key-id"]
    assert brand_key.public.encoded == (DATA / "brand" / "brand-key.pub").read_text().strip()
    assert openpgp.decode_public_key((DATA / "brand" / "root-key.pub").read_bytes()).key_id == ids["root-key-id"]


def test_private_key_file_name_is_the_key_id(device_key) -> None:
    assert [p.name for p in (DATA / "device" / "private-keys-v1").iterdir()] == [device_key.key_id]


@pytest.mark.parametrize("name", ["serial-request-body.assert", "serial-request-minimal.assert"])
def test_resigning_reproduces_snapd_bytes(name: str, device_key) -> None:
    original = (DATA / name).read_bytes()
    decoded = assertions.decode(original)
    created = decoded.signature_packet().created
    headers = {k: v for k, v in decoded.headers.items() if k not in ("body-length", "sign-key-sha3-384")}
    resigned = assertions.sign(headers, decoded.body, device_key.public, device_key.sign, created)
    assert resigned.encode() == original


def test_build_serial_request_reproduces_snapd_bytes(device_key) -> None:
    original = (DATA / "serial-request-body.assert").read_bytes()
    created = assertions.decode(original).signature_packet().created
    built = assertions.build_serial_request(
        brand="acme", model="acme-gw", request_id="REQ-ID-0002", device_key=device_key.public,
        signer=device_key.sign, created=created, serial="ACME-0001", body=(DATA / "body.yaml").read_bytes(),
    )
    assert built.encode() == original


def test_serial_request_stream_with_model_as_snapd_posts_it(device_key) -> None:
    data = (DATA / "serial-request-with-model.stream").read_bytes()
    request, model = assertions.decode_stream(data)
    assert (request.type, model.type) == ("serial-request", "model")
    assert request.header("request-id") == "REQ-ID-0003"
    assertions.verify(request, device_key.public)
    assert b"\n\ntype: model\n" in data  # one empty line between the two


def _brand_public_key() -> openpgp.PublicKey:
    return assertions.account_public_key(assertions.decode((DATA / "brand" / "brand.account-key").read_bytes()))


def test_serial_verifies_with_brand_account_key(device_key) -> None:
    serial = assertions.decode((DATA / "serial.assert").read_bytes())
    assertions.verify(serial, _brand_public_key())
    assert serial.header("device-key-sha3-384") == device_key.key_id


def test_brand_chain_verifies_to_the_root() -> None:
    root_account, root_key = assertions.decode_stream((DATA / "brand" / "trusted.assert").read_bytes())
    root = assertions.account_public_key(root_key)
    for a in assertions.decode_stream((DATA / "brand" / "brand-chain.assert").read_bytes()):
        assertions.verify(a, root)
    assertions.verify(root_account, root)
    assertions.verify(assertions.decode((DATA / "brand" / "model-acme-gw.assert").read_bytes()), _brand_public_key())


def test_verify_rejects_another_key(device_key) -> None:
    serial = assertions.decode((DATA / "serial.assert").read_bytes())
    with pytest.raises(BadSignatureError, match="signed by key"):
        assertions.verify(serial, device_key.public)


SERIAL = (DATA / "serial.assert").read_bytes()


@pytest.mark.parametrize("xor", [0x01, 0x20, 0x80])
def test_any_changed_byte_of_serial_fails(xor: int) -> None:
    """Flip bits at hundreds of positions: each copy fails to decode or fails to verify."""
    key = _brand_public_key()
    positions = range(0, len(SERIAL) - 1, 7)  # every region: headers, device-key, body, signature
    assert len(positions) > 250
    regions = {"headers": 0, "body": 0, "signature": 0}
    body_start = SERIAL.index(b"hardware:")
    sig_start = SERIAL.rindex(b"\n\n") + 2
    for pos in positions:
        mutated = bytearray(SERIAL)
        mutated[pos] ^= xor
        with pytest.raises(AssertionFormatError):
            assertions.verify(assertions.decode(bytes(mutated)), key)
        regions["headers" if pos < body_start else "body" if pos < sig_start else "signature"] += 1
    assert min(regions.values()) >= 5, regions


def test_final_newline_is_optional_on_input_but_extra_blank_line_is_not() -> None:
    assert assertions.decode(SERIAL[:-1]).encode() == SERIAL[:-1]
    assertions.decode_stream(SERIAL + b"\n")  # snapd's stream decoder tolerates one extra newline
    with pytest.raises(AssertionFormatError):
        assertions.decode_stream(SERIAL + b"\n\n")  # ... but not two
    with pytest.raises(AssertionFormatError):
        assertions.decode(SERIAL + b"\n")  # single decode: the signature would be empty
