"""check_serial: only this device's serial, signed by a trusted brand key, is ever accepted."""

from __future__ import annotations

import pytest

from agent import assertions, serials
from agent.errors import RemoteFormatError, SerialRejectedError
from tests.conftest import DATA

SERIAL = (DATA / "serial.assert").read_bytes()
ACCOUNT_KEY = (DATA / "brand" / "brand.account-key").read_bytes()
DEVICE_KEY_ID = (DATA / "device" / "device-key.id").read_text().strip()
TRUSTED = (assertions.decode(ACCOUNT_KEY),)


def check(data: bytes = SERIAL, **overrides):
    args = {"brand": "acme", "model": "acme-gw", "key_id": DEVICE_KEY_ID, "trusted": TRUSTED}
    args.update(overrides)
    return serials.check_serial(data, **args)


def test_the_vectors_serial_is_accepted() -> None:
    assert check().header("serial") == "ACME-0001"


def test_ancillary_assertions_are_ignored_not_trusted() -> None:
    chain = (DATA / "brand" / "brand-chain.assert").read_bytes()
    assert check(SERIAL + b"\n" + chain).header("serial") == "ACME-0001"
    with pytest.raises(SerialRejectedError, match="not trusted"):
        check(chain + b"\n" + SERIAL, trusted=())  # a vault cannot bring its own trust


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"brand": "other"}, "does not match"),
        ({"model": "other-gw"}, "does not match"),
        ({"key_id": "x" * 64}, "does not match"),
        ({"trusted": tuple(a for a in assertions.decode_stream((DATA / "brand" / "trusted.assert").read_bytes())
                           if a.type == "account-key")}, "not trusted"),
    ],
)
def test_mismatches_are_rejected(overrides, match) -> None:
    with pytest.raises(SerialRejectedError, match=match):
        check(**overrides)


def test_key_validity_must_cover_the_serial_timestamp() -> None:
    later = assertions.decode(ACCOUNT_KEY.replace(b"since: ", b"since: 2099-01-01T00:00:00Z\nx-old-since: ", 1))
    with pytest.raises(SerialRejectedError, match="validity"):
        check(trusted=(later,))
    expired = assertions.decode(ACCOUNT_KEY.replace(b"since: ", b"until: 2020-01-01T00:00:00Z\nsince: ", 1))
    with pytest.raises(SerialRejectedError, match="validity"):
        check(trusted=(expired,))


def test_a_broken_signature_is_rejected() -> None:
    sig_start = SERIAL.rindex(b"\n\n") + 2
    flipped = b"A" if SERIAL[sig_start + 40 : sig_start + 41] != b"A" else b"B"
    broken = SERIAL[: sig_start + 40] + flipped + SERIAL[sig_start + 41 :]
    with pytest.raises(SerialRejectedError, match="does not verify"):
        check(broken)


def test_two_serials_or_none() -> None:
    with pytest.raises(SerialRejectedError, match="2 serial"):
        check(SERIAL + b"\n" + SERIAL)
    with pytest.raises(RemoteFormatError, match="no serial"):
        check((DATA / "brand" / "brand.account-key").read_bytes())


@pytest.mark.parametrize("body", [b"", b"<html>captive portal</html>", SERIAL[:900], b'{"success":true}'])
def test_garbage_is_a_remote_format_error(body) -> None:
    with pytest.raises(RemoteFormatError):
        check(body)


def test_another_authority_needs_the_models_serial_authority() -> None:
    # The vector serial's authority is the brand; pretend the device's brand differs in the
    # authority check only, through a model that lists (or not) the authority.
    serial = assertions.decode(SERIAL)
    model = assertions.decode((DATA / "brand" / "model-acme-gw.assert").read_bytes())
    serials._check_authority(serial, model)  # brand == authority: fine without a list
    other = assertions.Assertion({**serial.headers, "authority-id": "generic"}, serial.body, serial.content, serial.signature)
    with pytest.raises(SerialRejectedError, match="different from brand"):
        serials._check_authority(other, model)
    allowing = assertions.Assertion({**model.headers, "serial-authority": ["generic"]},
                                    model.body, model.content, model.signature)
    serials._check_authority(other, allowing)
