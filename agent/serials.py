"""Is this answer the device's serial, signed by a key we trust? The checks snapd makes, and ours.

And, in snapd mode, is this serial-request one the relay may forward?

No I/O. No clock: the serial's timestamp is checked against the signing
key's validity, never against the device clock, which may be at 1970.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from . import assertions, openpgp
from .errors import (
    AssertionFormatError,
    RelayBadRequest,
    RelayOtherDeviceKey,
    RelayWrongModel,
    RemoteFormatError,
    SerialRejectedError,
)


def check_serial(
    data: bytes,
    *,
    brand: str,
    model: str,
    key_id: str,
    trusted: Sequence[assertions.Assertion],
    model_assertion: assertions.Assertion | None = None,
) -> assertions.Assertion:
    """The one serial assertion in ``data``, once every check passed.

    A body that is not an assertion stream raises RemoteFormatError (the vault
    or something between us sent garbage: retry); a well-formed answer that
    is not this device's serial, or not trusted, raises SerialRejectedError.
    Assertions that come along with the serial are ignored: trust comes only
    from ``trusted`` (the configured account-keys), never from the vault.
    """
    try:
        stream = assertions.decode_stream(data)
    except AssertionFormatError as exc:
        raise RemoteFormatError(f"cannot read the vault's answer: {exc}") from None
    serials = [a for a in stream if a.type == "serial"]
    if not serials:  # an empty or foreign 200 (a proxy, a portal): not the vault's considered answer
        raise RemoteFormatError("the vault's answer holds no serial assertion")
    if len(serials) > 1:
        raise SerialRejectedError(f"the vault's answer holds {len(serials)} serial assertions, not one")
    serial = serials[0]
    _check_identity(serial, brand, model, key_id)
    _check_authority(serial, model_assertion)
    _check_signature(serial, trusted)
    return serial


def _check_identity(serial: assertions.Assertion, brand: str, model: str, key_id: str) -> None:
    got = (serial.header("brand-id"), serial.header("model"), serial.header("device-key-sha3-384"))
    if got != (brand, model, key_id):
        raise SerialRejectedError(
            "obtained serial assertion does not match provided device identity information "
            f"(brand {got[0]!r}, model {got[1]!r}, key {got[2]}; expected {brand!r}, {model!r}, {key_id})"
        )


def _check_authority(serial: assertions.Assertion, model_assertion: assertions.Assertion | None) -> None:
    authority, brand = serial.header("authority-id"), serial.header("brand-id")
    if authority == brand:
        return
    allowed = model_assertion.headers.get("serial-authority", []) if model_assertion else []
    if not isinstance(allowed, list) or authority not in allowed:
        raise SerialRejectedError(
            f"obtained serial assertion is signed by authority {authority!r} different from brand {brand!r}")


def _check_signature(serial: assertions.Assertion, trusted: Sequence[assertions.Assertion]) -> None:
    authority = serial.header("authority-id")
    matching = [
        ak for ak in trusted
        if ak.header("public-key-sha3-384") == serial.sign_key_id and ak.header("account-id") == authority
    ]
    if not matching:
        raise SerialRejectedError(f"serial is signed by key {serial.sign_key_id} of {authority!r}, which is not trusted")
    account_key = matching[0]
    stamp = assertions.check_timestamp(serial.headers, "timestamp")
    if not _valid_at(account_key, stamp):
        raise SerialRejectedError(f"serial timestamp {serial.header('timestamp')} is outside the signing key's validity")
    try:
        assertions.verify(serial, assertions.account_public_key(account_key))
    except AssertionFormatError as exc:
        raise SerialRejectedError(f"serial signature does not verify: {exc}") from None


def _valid_at(account_key: assertions.Assertion, when: datetime) -> bool:
    since = assertions.check_timestamp(account_key.headers, "since")
    if when < since:
        return False
    return "until" not in account_key.headers or when < assertions.check_timestamp(account_key.headers, "until")


def check_serial_request(data: bytes, *, brand: str, model: str, key_id: str) -> assertions.Assertion:
    """The serial-request heading the stream ``data`` that snapd posts, if the relay may forward it.

    It must be a serial-request self-signed by its device key (so a key is
    never bound on a forged request), for the configured ``brand`` and
    ``model``, and, once the relay serves a device key (``key_id``), by that
    key. Raises a RelayRefusedError. The rest of the stream (the model
    assertion) is the vault's to judge.
    """
    try:
        request = assertions.decode_stream(data)[0]
        if request.type != "serial-request":
            raise RelayBadRequest(f"cannot relay a {request.type!r} assertion: a serial-request must come first")
        assertions.verify(request, openpgp.decode_public_key(request.header("device-key")))
    except (AssertionFormatError, IndexError) as exc:
        cause = exc if isinstance(exc, AssertionFormatError) else "empty request"
        raise RelayBadRequest(f"cannot relay the serial-request: {cause}") from None
    except (ValueError, UnicodeError, RecursionError, OverflowError) as exc:  # the client's bytes: never a crash
        raise RelayBadRequest(f"cannot relay the serial-request: undecodable ({type(exc).__name__})") from None
    got = (request.header("brand-id"), request.header("model"))
    if got != (brand, model):
        raise RelayWrongModel(f"cannot relay a serial-request for brand {got[0]!r}, model {got[1]!r}: "
                              f"this device is {brand!r}, {model!r}")
    if key_id and request.sign_key_id != key_id:
        raise RelayOtherDeviceKey(f"cannot relay a serial-request signed by device key {request.sign_key_id}: "
                                  f"the relay serves device key {key_id} only")
    return request
