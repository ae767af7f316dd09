"""Fuzzing the agent's parsers: whatever the bytes, only the project's typed errors escape.

Targets (each a hypothesis test):

- the assertion codec: ``assertions.decode`` / ``decode_stream`` on arbitrary bytes and on
  structured mutations of snapd's vectors in tests/data (line, header, body-length, separator
  and signature edits), then signature parsing and verification of whatever still decodes;
  the OpenPGP layer on mutated packets;
- ``serials.check_serial`` on arbitrary bytes, on mutated vector streams, and on serials that
  are validly signed by a trusted key but carry fuzzed headers (the one oracle with teeth:
  a serial is accepted only if it is this device's, from a trusted key);
- the vault's answer parsing: ``vault._status_error``, ``vault._json_error``,
  ``vault.parse_retry_after``, and ``Vault.fetch_request_id`` / ``Vault.post_serial`` through an
  in-test seam (``_post`` replaced on one instance: no network, agent/ untouched); plus a
  loopback target that feeds raw HTTP answers through the real requests stack;
- ``config.load`` on TOML documents built from the schema (right and wrong types, huge numbers,
  inf/nan, paths to good, bad, missing and odd files, templates), on several files merged, on
  arbitrary bytes and on mutated valid files: only ConfigError may escape.

Every error that escapes must also be one line (it becomes the CLI's one-line stderr, a log
line, ``LastErrorMessage`` on D-Bus), and what the vault wrote is quoted at bounded length.
Oracles beyond "no untyped exception": an accepted serial is this device's, from a trusted key;
an accepted request-id can go into a signed serial-request; a loaded configuration's api-key is
one that requests and http.client will send; a configuration error never shows the api-key.

The example count per target is ``$FACTORY_AGENT_FUZZ_EXAMPLES`` (default 300, which keeps the
suite fast); ``make fuzz`` runs 100,000 per target. The defects these targets found are pinned
with ``@example`` so that the short run checks them every time.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from agent import assertions, config, openpgp, serials, vault
from agent.config import VaultConfig
from agent.errors import (
    AgentError,
    AssertionFormatError,
    ConfigError,
    RemoteFormatError,
    SerialRejectedError,
    VaultError,
    VaultRejected,
    VaultTransient,
    VaultUnavailable,
)
from tests.conftest import DATA
from tests.fakes.rawserver import read_request
from tests.unit.test_headers import NAMES, VALUES

EXAMPLES = int(os.environ.get("FACTORY_AGENT_FUZZ_EXAMPLES", "300"))
# The loopback target costs a TCP connection per example; it follows the same knob unless told.
LOOPBACK_EXAMPLES = int(os.environ.get("FACTORY_AGENT_FUZZ_LOOPBACK_EXAMPLES", str(EXAMPLES)))

settings.register_profile(
    "factory-agent-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
    print_blob=True,
)
FUZZ = settings.get_profile("factory-agent-fuzz")
LOOPBACK = settings(FUZZ, max_examples=LOOPBACK_EXAMPLES)


def outcome(call: Callable[[], Any], *allowed: type[BaseException]) -> Any:
    """What ``call()`` returns, or the allowed error it raised; any other exception fails the test."""
    try:
        return call()
    except allowed as exc:
        event(f"raised {type(exc).__name__}")
        return exc


def assert_one_line(text: str, what: str = "error") -> None:
    assert len(text.splitlines()) <= 1 and "\n" not in text and "\r" not in text, f"{what} is not one line: {text!r}"


# ---- data ---------------------------------------------------------------------------------------

VECTOR_NAMES = ("serial.assert", "serial-request-body.assert", "serial-request-minimal.assert",
                "serial-request-with-model.stream", "brand/brand.account", "brand/brand.account-key",
                "brand/brand-chain.assert", "brand/trusted.assert", "brand/model-acme-gw.assert")
VECTORS = {name: (DATA / name).read_bytes() for name in VECTOR_NAMES}
SERIAL = VECTORS["serial.assert"]
BRAND_ACCOUNT_KEY = assertions.decode(VECTORS["brand/brand.account-key"])
MODEL = assertions.decode(VECTORS["brand/model-acme-gw.assert"])
DEVICE_PUB = (DATA / "device" / "device-key.pub").read_text().strip()
DEVICE_KEY_ID = (DATA / "device" / "device-key.id").read_text().strip()
KNOWN_KEYS = {key.key_id: key for key in (openpgp.decode_public_key((DATA / "brand" / name).read_bytes())
                                          for name in ("brand-key.pub", "root-key.pub"))}
KNOWN_KEYS[DEVICE_KEY_ID] = openpgp.decode_public_key(DEVICE_PUB)

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
LATIN1 = st.text(st.characters(max_codepoint=0xFF), max_size=40)  # what http.client makes of header bytes


# ---- byte-level and line-level mutations --------------------------------------------------------

TOKENS = [b"\n", b"\n\n", b"\n\n\n", b": ", b":", b" ", b"  -", b"  - ", b"    ", b"  ", b"-", b"/", b"0", b"01",
          b"9" * 20, b"-1", b"body-length: ", b"type: ", b"serial", b"account-key", b"model", b"serial-request",
          b"sign-key-sha3-384: ", b"authority-id: ", b"format: 1", b"revision: 1", b"\r", b"\r\n", b"\x00",
          b"\xff", b"\xc3\xa9", b"\xed\xa0\x80", b"AcbB", b"=", b"+/", b"\t", b"{", b"}", b"[]", b"2026-11-27T13:52:25Z",
          b"2026-02-30T25:61:61Z", b"x" * 300]


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes], max_ops: int = 5) -> bytes:
    """One or more of ``bases`` joined as a stream, then 0..max_ops structured edits."""
    parts = draw(st.lists(st.sampled_from(bases), min_size=1, max_size=3))
    data = bytearray(parts[0])
    for part in parts[1:]:
        data += draw(st.sampled_from([b"", b"\n", b"\n\n"])) + part
    for _ in range(draw(st.integers(0, max_ops))):
        data = bytearray(draw(st.sampled_from(_OPS))(draw, bytes(data)))
    return bytes(data)


def _pos(draw: st.DrawFn, data: bytes) -> int:
    return draw(st.integers(0, len(data)))


def _flip(draw: st.DrawFn, data: bytes) -> bytes:
    if not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]


def _delete(draw: st.DrawFn, data: bytes) -> bytes:
    i = _pos(draw, data)
    return data[:i] + data[i + draw(st.integers(1, 64)):]


def _insert(draw: st.DrawFn, data: bytes) -> bytes:
    i = _pos(draw, data)
    return data[:i] + draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=16)) + data[i:]


def _duplicate(draw: st.DrawFn, data: bytes) -> bytes:
    i = _pos(draw, data)
    j = min(len(data), i + draw(st.integers(1, 400)))
    return data[:j] + data[i:j] + data[j:]


def _truncate(draw: st.DrawFn, data: bytes) -> bytes:
    return data[:_pos(draw, data)]


def _line_edit(draw: st.DrawFn, data: bytes) -> bytes:
    lines = data.split(b"\n")
    i = draw(st.integers(0, len(lines) - 1))
    kind = draw(st.sampled_from(["delete", "duplicate", "swap", "value", "name", "indent"]))
    if kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    elif kind == "swap":
        j = draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "value":
        name, sep, _ = lines[i].partition(b": ")
        value = draw(st.sampled_from(TOKENS) | TEXT.map(lambda t: t.encode("utf-8")) | st.binary(max_size=8))
        lines[i] = name + (sep or b": ") + value
    elif kind == "name":
        _, sep, rest = lines[i].partition(b":")
        name = draw(NAMES.map(str.encode) | st.sampled_from([b"", b"Type", b"a b", b"-x", b"body-length", b"type"]))
        lines[i] = name + (sep or b":") + rest
    else:
        lines[i] = b" " * draw(st.integers(0, 6)) + lines[i].lstrip(b" ")
    return b"\n".join(lines)


def _body_length(draw: st.DrawFn, data: bytes) -> bytes:
    number = draw(st.integers(-5, 5000).map(lambda n: str(n).encode()) | st.sampled_from([b"", b"01", b"9" * 30, b"x"]))
    return re.sub(rb"body-length: [^\n]*", b"body-length: " + number, data, count=1)


def _signature(draw: st.DrawFn, data: bytes) -> bytes:
    """Edit the base64 of the last signature: still base64, so the OpenPGP layer sees the damage."""
    start = data.rfind(b"\n\n")
    if start == -1 or start + 2 >= len(data):
        return data
    i = draw(st.integers(start + 2, len(data) - 1))
    return data[:i] + draw(st.sampled_from(list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))).to_bytes(
        1, "big") + data[i + 1:]


_OPS = [_flip, _delete, _insert, _duplicate, _truncate, _line_edit, _line_edit, _body_length, _signature]


@st.composite
def mutated_packet(draw: st.DrawFn, text: bytes) -> bytes:
    """A v1 block (base64 of 0x01 + packet) whose packet bytes were edited, re-encoded as base64."""
    raw = bytearray(base64.b64decode(b"".join(text.split())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        i = draw(st.integers(0, len(raw)))
        if kind == "flip" and i < len(raw):
            raw[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[i:]
        elif kind == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[i:i + draw(st.integers(1, 32))]
    return base64.b64encode(bytes(raw))


# ---- the assertion codec ------------------------------------------------------------------------


def _decode_deeper(data: bytes) -> None:
    """decode, decode_stream, and for what decodes: the signature packet, verification, account keys."""
    for decoder in (assertions.decode, assertions.decode_stream):
        result = outcome(functools.partial(decoder, data), AssertionFormatError)
        if isinstance(result, AgentError):
            assert_one_line(str(result))
            continue
        found = result if isinstance(result, list) else [result]
        event(f"{decoder.__name__}: decoded")
        for a in found:
            assert isinstance(a, assertions.Assertion)
            checked = outcome(functools.partial(_verify_if_known, a), AssertionFormatError)
            if isinstance(checked, AgentError):
                assert_one_line(str(checked))


def _verify_if_known(a: assertions.Assertion) -> None:
    a.signature_packet()
    if a.type == "account-key":
        assertions.account_public_key(a)
    if a.type == "serial-request":
        assertions.verify(a, openpgp.decode_public_key(a.header("device-key")))
    elif a.sign_key_id in KNOWN_KEYS:
        assertions.verify(a, KNOWN_KEYS[a.sign_key_id])


def test_the_vectors_decode_and_verify() -> None:
    """The mutation targets start from inputs that pass: a failure below is the mutation's doing."""
    for data in VECTORS.values():
        for a in assertions.decode_stream(data):
            _verify_if_known(a)
    serials.check_serial(SERIAL, brand="acme", model="acme-gw", key_id=DEVICE_KEY_ID, trusted=[BRAND_ACCOUNT_KEY])


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\n\n")
@example(b"type: serial\nbody-length: 99999999\n\n")
def test_decode_arbitrary_bytes(data: bytes) -> None:
    _decode_deeper(data)


@FUZZ
@given(mutated(list(VECTORS.values())))
def test_decode_mutated_vectors(data: bytes) -> None:
    _decode_deeper(data)


@FUZZ
@given(st.sampled_from([SERIAL, VECTORS["brand/brand.account-key"]]).flatmap(
    lambda text: mutated_packet(text[text.rfind(b"\n\n") + 2:])), mutated_packet(DEVICE_PUB.encode()))
def test_openpgp_mutated_packets(signature: bytes, public: bytes) -> None:
    """The OpenPGP layer under the codec: mutated signature and public-key packets, still base64."""
    sig = outcome(lambda: openpgp.parse_signature(signature), AssertionFormatError)
    key = outcome(lambda: openpgp.decode_public_key(public), AssertionFormatError)
    for result in (sig, key):
        if isinstance(result, AgentError):
            assert_one_line(str(result))
    if not isinstance(sig, AgentError):
        content = assertions.decode(SERIAL).content
        for candidate in (KNOWN_KEYS[assertions.decode(SERIAL).sign_key_id], key):
            if not isinstance(candidate, AgentError):
                verified = outcome(functools.partial(openpgp.verify_signature, content, sig, candidate), AssertionFormatError)
                if isinstance(verified, AgentError):
                    assert_one_line(str(verified))


# ---- serials.check_serial -------------------------------------------------------------------------

SERIAL_ERRORS = (RemoteFormatError, SerialRejectedError)  # the function's documented contract


def _check(data: bytes, *, trusted: list[assertions.Assertion], model_assertion: assertions.Assertion | None = None,
           key_id: str = DEVICE_KEY_ID) -> assertions.Assertion | AgentError:
    result = outcome(lambda: serials.check_serial(data, brand="acme", model="acme-gw", key_id=key_id, trusted=trusted,
                                                  model_assertion=model_assertion), *SERIAL_ERRORS)
    if isinstance(result, AgentError):
        assert_one_line(str(result))
        return result
    # accepted: then it is this device's serial, from a trusted key, and it verifies
    assert isinstance(result, assertions.Assertion) and result.type == "serial"
    assert (result.header("brand-id"), result.header("model"), result.header("device-key-sha3-384")) == (
        "acme", "acme-gw", key_id)
    signer = [ak for ak in trusted if ak.header("public-key-sha3-384") == result.sign_key_id
              and ak.header("account-id") == result.header("authority-id")]
    assert signer, "accepted a serial from a key that is not trusted"
    assertions.verify(result, assertions.account_public_key(signer[0]))
    allowed = model_assertion.headers.get("serial-authority", []) if model_assertion else []
    assert result.header("authority-id") == "acme" or result.header("authority-id") in allowed
    event("check_serial: accepted")
    return result


@FUZZ
@given(st.binary(max_size=4096))
def test_check_serial_arbitrary_bytes(data: bytes) -> None:
    _check(data, trusted=[BRAND_ACCOUNT_KEY])


@FUZZ
@given(mutated([SERIAL, SERIAL, VECTORS["brand/brand.account-key"], VECTORS["brand/model-acme-gw.assert"],
                VECTORS["serial-request-body.assert"]]), st.booleans())
def test_check_serial_mutated_answers(data: bytes, with_model: bool) -> None:
    _check(data, trusted=[BRAND_ACCOUNT_KEY], model_assertion=MODEL if with_model else None)


@pytest.fixture(scope="module")
def fuzz_signer(small_key: Any) -> tuple[Any, assertions.Assertion]:
    """A throw-away 2048-bit brand key (fast to sign with) and its account-key, trusted for "acme"."""
    headers = {"type": "account-key", "authority-id": "acme", "account-id": "acme", "name": "fuzz",
               "since": "2016-01-01T00:00:00Z", "until": "2036-01-01T00:00:00Z",
               "public-key-sha3-384": small_key.key_id}
    ak = assertions.sign(headers, small_key.public.encoded.encode(), small_key.public, small_key.sign, 1_700_000_000)
    return small_key, ak


TIMESTAMPS = st.sampled_from(["2026-11-27T13:52:25Z", "2015-12-31T23:59:59Z", "2036-01-01T00:00:00Z",
                              "2035-12-31T23:59:59+23:59", "2020-02-29T12:00:00.123456789z", "2021-02-29T00:00:00Z",
                              "yesterday", "", "2026-11-27T13:52:25"])


def _serial_alternatives(key: Any) -> dict[str, st.SearchStrategy[Any]]:
    """For each header of a good serial, what else it may say."""
    return {
        "type": st.sampled_from(["model", "serial-request", "account-key", "sirial", ""]),
        "authority-id": st.sampled_from(["other", "ACME", "", "acme-other"]) | TEXT,
        "brand-id": st.sampled_from(["other", "a" * 32, "a", "a/b", "ACME"]) | TEXT,
        "model": st.sampled_from(["other", "Acme-GW", "-x", "acme-gw-2"]) | TEXT,
        "serial": st.sampled_from(["ACME/1", "", "ACME-0002", "x" * 300]) | TEXT,
        "device-key": st.sampled_from([key.public.encoded, "", "AcbB", DEVICE_PUB[:-4]]),
        "device-key-sha3-384": st.sampled_from([key.key_id, "x" * 64, "", DEVICE_KEY_ID[:-1]]),
        "timestamp": TIMESTAMPS | TEXT,
        "revision": st.sampled_from(["0", "1", "01", "-1", "9" * 19]),
        "format": st.sampled_from(["0", "1", "99", "x"]),
        "sign-key-sha3-384": st.sampled_from([BRAND_ACCOUNT_KEY.header("public-key-sha3-384"), "x" * 64, DEVICE_KEY_ID]),
        "body-length": st.sampled_from(["0", "1", "x", "-1", "00"]),
    }


@st.composite
def signed_serials(draw: st.DrawFn, key: Any) -> bytes:
    """This device's good serial, signed by ``key``, with 0..3 headers changed or dropped, maybe extra
    headers, a body, another signer; and maybe other assertions around it. The signature is good
    for whatever the content became (unless the wrong signer was drawn)."""
    alternatives = _serial_alternatives(key)
    headers: dict[str, assertions.HeaderValue] = {
        "type": "serial", "authority-id": "acme", "brand-id": "acme", "model": "acme-gw", "serial": "ACME-0001",
        "device-key": DEVICE_PUB, "device-key-sha3-384": DEVICE_KEY_ID, "timestamp": "2026-11-27T13:52:25Z",
    }
    body = draw(st.sampled_from([b"", b"", b'hardware:\n  soc-serial: "1"\n']) | st.binary(max_size=64))
    if body:
        headers["body-length"] = str(len(body))
    headers["sign-key-sha3-384"] = key.key_id
    for name in draw(st.lists(st.sampled_from(sorted(alternatives)), max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            headers.pop(name, None)  # a missing header
        else:
            headers[name] = draw(alternatives[name])
    if draw(st.integers(0, 3)) == 0:
        headers.update(draw(st.dictionaries(NAMES, VALUES, max_size=2)))  # extra ones, maybe overriding
    lines = [line for name, value in headers.items() for line in assertions.format_header(name, value)]
    content = "\n".join(lines).encode("utf-8") + (b"\n\n" + body if body else b"")
    signer = key.sign if draw(st.integers(0, 9)) else (lambda message: key.sign(message + b"x"))  # a wrong signature
    signature = openpgp.make_signature(content, draw(st.integers(0, 2**32 - 1)), signer)
    serial = content + b"\n\n" + signature + b"\n"
    before = draw(st.lists(st.sampled_from([VECTORS["brand/brand.account-key"], VECTORS["brand/model-acme-gw.assert"]]),
                           max_size=2))
    after = draw(st.lists(st.sampled_from([serial, SERIAL]), max_size=1))
    return b"\n".join([*before, serial, *after])


@FUZZ
@given(st.data(), st.booleans())
def test_check_serial_signed_but_fuzzed(fuzz_signer: tuple[Any, assertions.Assertion], data: st.DataObject,
                                        with_model: bool) -> None:
    """A well-signed answer with fuzzed content is accepted only when it is this device's serial."""
    key, account_key = fuzz_signer
    stream = data.draw(signed_serials(key))
    _check(stream, trusted=[BRAND_ACCOUNT_KEY, account_key], model_assertion=MODEL if with_model else None)


# ---- the vault's answers ------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                           max_leaves=12)
CODES = st.sampled_from(["invalid-api-key", "invalid-nonce", "invalid-model", "generate-nonce", "", " ", "a\nb"]) | TEXT
VAULT_ERRORS = st.fixed_dictionaries(
    {"error_code": CODES | JSON_VALUES, "message": st.sampled_from(["Invalid API key used", ""]) | TEXT | JSON_VALUES},
    optional={"success": st.booleans(), "error_subcode": TEXT, "StatusCode": st.integers()})
REQUEST_IDS = st.fixed_dictionaries({"request-id": st.sampled_from(["abc123", ""]) | JSON_VALUES},
                                    optional={"success": st.booleans(), "message": TEXT})


def _json_bytes(value: Any, encoding: str, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode(encoding, "surrogatepass")


JSON_DOCS = st.builds(_json_bytes, JSON_VALUES | VAULT_ERRORS | REQUEST_IDS,
                      st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32"]), st.booleans())
_CLOSERS = {b"[": b"]", b'{"a":': b"}", b'{"error_code":': b"}"}
NESTED = st.builds(lambda opener, depth, close: opener * depth + (_CLOSERS[opener] * depth if close else b""),
                   st.sampled_from(sorted(_CLOSERS)), st.integers(1, 200_000) | st.sampled_from([900, 1100, 100_000]),
                   st.booleans())  # deep nesting: structured, since random bytes never get there
BODIES = st.binary(max_size=512) | JSON_DOCS | NESTED | JSON_DOCS.flatmap(lambda doc: mutated([doc], max_ops=3))
LOOPBACK_BODIES = st.binary(max_size=512) | JSON_DOCS | JSON_DOCS.flatmap(lambda doc: mutated([doc], max_ops=3))
CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=UTF-8", " Application/JSON ;x",
                                 "text/plain; charset=utf-8", "application/x.ubuntu.assertion", ""]) | LATIN1
HTTP_DATES = st.builds(
    lambda day, d, month, year, hh, mm, ss, zone: f"{day}, {d:02d} {month} {year} {hh:02d}:{mm:02d}:{ss:02d} {zone}".strip(),
    st.sampled_from(["Mon", "Wed", "Sun", "Xyz", ""]), st.integers(0, 99),
    st.sampled_from(["Jan", "Feb", "Oct", "Dec", "Foo"]), st.integers(-1, 100_000),
    st.integers(0, 99), st.integers(0, 99), st.integers(0, 99),
    st.sampled_from(["GMT", "UTC", "+0000", "-0000", "+2359", "-2400", "+9999", "EST", "Z", ""]))
RETRY_AFTERS = (st.sampled_from(["0", "1", "120", "-1", "1.5", " 7 ", "\xb2", "\xb9", "\xb3", "\u0661\u0662", "9" * 400,
                                 "Wed, 21 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 2015 07:28:00", ""])
                | HTTP_DATES | LATIN1 | TEXT)
CONTENT_LENGTHS = st.sampled_from(["0", "12", "-1", "\xb2", "1048577", "99999999999999999999", "x", " 5"])
STATUSES = st.sampled_from([200, 201, 202, 204, 301, 400, 401, 403, 404, 408, 425, 429, 500, 502, 503]) | st.integers(0, 999)


@st.composite
def answer_headers(draw: st.DrawFn) -> CaseInsensitiveDict[str]:
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Content-Type"] = draw(CONTENT_TYPES)
    if draw(st.booleans()):
        headers["Retry-After"] = draw(RETRY_AFTERS)
    if draw(st.integers(0, 3)) == 0:
        headers["Content-Length"] = draw(CONTENT_LENGTHS)
    headers.update(draw(st.dictionaries(LATIN1, LATIN1, max_size=2)))
    return CaseInsensitiveDict(headers)


# The longest error a vault answer can produce: our words around the vault's code and message, each capped.
MAX_VAULT_ERROR = 2 * vault.MAX_QUOTED + 100


def _check_vault_error(exc: BaseException) -> None:
    """A typed refusal or transient error, with a sane hint, whose texts are one line and bounded."""
    assert isinstance(exc, (VaultRejected, VaultTransient))
    assert exc.retry_after is None or (exc.retry_after >= 0 and not math.isnan(exc.retry_after))
    if isinstance(exc, VaultRejected):
        assert isinstance(exc.error_code, str) and exc.error_code
    code = getattr(exc, "error_code", "")
    assert isinstance(code, str)
    assert_one_line(str(exc), "the vault error message")
    assert_one_line(code, "the vault error_code (LastError)")
    assert len(str(exc)) <= MAX_VAULT_ERROR and len(code) <= vault.MAX_QUOTED, exc


@FUZZ
@given(st.one_of(st.none(), RETRY_AFTERS), st.floats(0, 4e9))
@example("\xb2", 0.0)  # '²'.isdigit() is True, float('²') raises ValueError
def test_parse_retry_after(value: str | None, now: float) -> None:
    seconds = vault.parse_retry_after(value, now)
    assert seconds is None or (isinstance(seconds, float) and seconds >= 0 and not math.isnan(seconds))


@FUZZ
@given(STATUSES.filter(lambda s: s not in (200, 201, 202)), answer_headers(), BODIES)
@example(400, CaseInsensitiveDict({"Content-Type": "application/json"}), b"[" * 5_000)  # RecursionError
@example(400, CaseInsensitiveDict({"Retry-After": "\xb2"}), b"")
@example(400, CaseInsensitiveDict({"Content-Type": "application/json"}),
         json.dumps({"error_code": "x" * 5000, "message": "y" * 100_000}).encode())  # quoted at length
def test_status_error_is_always_a_typed_error(status: int, headers: CaseInsensitiveDict[str], body: bytes) -> None:
    code, message = vault._json_error(headers, body)
    assert isinstance(code, str) and isinstance(message, str)
    _check_vault_error(vault._status_error(status, headers, body))


@FUZZ
@given(st.integers(400, 599), st.just(CaseInsensitiveDict({"Content-Type": "application/json"})),
       st.builds(lambda doc: json.dumps(doc).encode(), VAULT_ERRORS) | BODIES)
@example(400, CaseInsensitiveDict({"Content-Type": "application/json"}),
         b'{"error_code": "invalid-model", "message": "no model\\n\\u001b[31mcall 555-0100\\u001b[0m"}')
@example(500, CaseInsensitiveDict({"Content-Type": "application/json"}), b'{"error_code": "server-error\\nx", "message": ""}')
def test_vault_error_answers_are_one_line(status: int, headers: CaseInsensitiveDict[str], body: bytes) -> None:
    """The vault's error_code and message (4xx refusals, and 5xx since they are quoted too) reach stderr,
    the journal and LastError/LastErrorMessage: one line each, whatever the vault wrote (JSON-shaped
    refusals mostly, where the previous target mostly draws bytes)."""
    _check_vault_error(vault._status_error(status, headers, body))


@pytest.fixture(scope="module")
def client() -> Iterator[vault.Vault]:
    cfg = VaultConfig(url="https://vault.invalid/v1/", api_key="fuzz-api-key", ca_file=None, allow_insecure_http=False,
                      trusted_account_keys=(), connect_timeout=1.0, timeout=1.0)
    v = vault.Vault(cfg)
    yield v
    v.close()


def _answering(client: vault.Vault, status: int, headers: CaseInsensitiveDict[str], body: bytes) -> None:
    """The seam: this instance's one HTTP exchange returns what the fuzzer made (agent/ is untouched)."""
    client._post = lambda path, data, extra: (status, headers, body)  # type: ignore[method-assign]


REQUEST_ID_ANSWERS = st.builds(lambda rid: json.dumps({"request-id": rid}).encode(),
                               st.sampled_from(["abc123", "a" * 40, "a\nb", "a b", " a", "é", "a:b", "-", "a" * 2000])
                               | TEXT)


@FUZZ
@given(STATUSES | st.just(200), answer_headers(), BODIES | REQUEST_ID_ANSWERS)
@example(200, CaseInsensitiveDict({}), b"[" * 5_000)  # RecursionError from json.loads
def test_fetch_request_id_answers(client: vault.Vault, small_key: Any, status: int, headers: CaseInsensitiveDict[str],
                                  body: bytes) -> None:
    """A request-id we accept is one we can put into a serial-request that decodes back to it."""
    _answering(client, status, headers, body)
    result = outcome(client.fetch_request_id, VaultRejected, VaultTransient)
    if isinstance(result, BaseException):
        _check_vault_error(result)
        return
    assert isinstance(result, str) and result
    event("request-id: accepted")
    request = assertions.build_serial_request(brand="acme", model="acme-gw", request_id=result, device_key=small_key.public,
                                              signer=small_key.sign, created=1_700_000_000, serial="ACME-1")
    assert assertions.decode(request.encode()).header("request-id") == result


@FUZZ
@given(STATUSES, answer_headers(), BODIES)
@example(202, CaseInsensitiveDict({"Retry-After": "\xb2"}), b"")
def test_post_serial_answers(client: vault.Vault, status: int, headers: CaseInsensitiveDict[str], body: bytes) -> None:
    _answering(client, status, headers, body)
    result = outcome(lambda: client.post_serial(b"type: serial-request\n"), VaultRejected, VaultTransient)
    if isinstance(result, BaseException):
        _check_vault_error(result)
    elif isinstance(result, vault.Pending):
        assert result.retry_after is None or result.retry_after >= 0
    else:
        assert isinstance(result, vault.Signed) and result.body == body and status in (200, 201)


# -- the same through a real socket: raw HTTP answers, the whole requests/urllib3/http.client stack

class _Holder:
    reply = b""


@pytest.fixture(scope="module")
def raw_vault() -> Iterator[tuple[_Holder, vault.Vault]]:
    """A loopback server that answers every connection with ``holder.reply``, however many there are."""
    holder = _Holder()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the module is done
            with conn:
                try:
                    read_request(conn)
                    conn.sendall(holder.reply)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    cfg = VaultConfig(url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1/", api_key="fuzz-api-key", ca_file=None,
                      allow_insecure_http=True, trusted_account_keys=(), connect_timeout=2.0, timeout=3.0)
    client = vault.Vault(cfg)
    yield holder, client
    client.close()
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone would not)
    listener.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


HEADER_LINES = st.lists(st.tuples(st.sampled_from(["Content-Type", "Retry-After", "Content-Length", "Transfer-Encoding",
                                                   "Content-Encoding", "Location", "X-Other"]) | LATIN1,
                                  st.sampled_from(["application/json", "chunked", "gzip", "deflate", "1", "\xb2"])
                                  | CONTENT_LENGTHS | RETRY_AFTERS | LATIN1), max_size=5)


@st.composite
def raw_answers(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))
    status_line = draw(st.sampled_from(["HTTP/1.1 200 OK", "HTTP/1.1 202 Accepted", "HTTP/1.1 400 Bad Request",
                                        "HTTP/1.1 503 Service Unavailable", "HTTP/1.0 429 x", "HTTP/1.1 999",
                                        "HTTP/1.1 20 OK", "HTTP/2 200", "ICY 200 OK", ""]) | LATIN1)
    lines = [status_line] + [f"{k}: {v}" for k, v in draw(HEADER_LINES)]
    body = draw(LOOPBACK_BODIES)
    if draw(st.booleans()):
        lines.append(f"Content-Length: {len(body) + draw(st.integers(-3, 3))}")
    return b"".join(_wire(line) + b"\r\n" for line in lines) + b"\r\n" + body


def _wire(text: str) -> bytes:
    """Header bytes: latin-1 where it can say them (so http.client gives back the same text), else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


@LOOPBACK
@given(raw_answers(), st.booleans())
@example(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}", False)  # '²'.isdigit(): int('²') raises in _read_capped
@example(b"0\x1e0\r\n\r\n", False)  # the garbled status line is quoted in the error: "\x1e" splits it in two lines
def test_raw_http_answers_over_loopback(raw_vault: tuple[_Holder, vault.Vault], answer: bytes, serial: bool) -> None:
    holder, client = raw_vault
    holder.reply = answer
    call = (lambda: client.post_serial(b"type: serial-request\n")) if serial else client.fetch_request_id
    result = outcome(call, VaultError)
    assert not isinstance(result, VaultUnavailable), result  # the server is always there: this would test nothing
    if isinstance(result, VaultError):
        assert_one_line(str(result))
        assert len(str(result)) <= MAX_VAULT_ERROR + 200, result  # + the URL


# ---- config.load ------------------------------------------------------------------------------

# The api-key, recognisably: no configuration error may show it, however it is written or misplaced.
SECRET = "SECRET-API-KEY-f0e1d2c3"
BAD_KEY_FILES = {"api-key-ctl": SECRET + "\x01\n", "api-key-euro": SECRET + "\u20ac\n", "api-key-crlf": SECRET + "\r\nx\n",
                 "api-key-tab": SECRET + "\tx\n", "api-key-del": SECRET + "\x7f\n"}
PATH_NAMES = ["api-key", *BAD_KEY_FILES, "brand.account-key", "trusted.assert", "model.assert", "serial.assert", "empty",
              "garbage", "not-utf8", "dir", "missing", "", "../fuzz/api-key", "/nonexistent/x", "a\x00b", "nl\nname"]
PATHS = st.sampled_from(PATH_NAMES) | TEXT
NUMBERS = (st.integers() | st.floats() | st.sampled_from([0, -1, 10**19, 10**400, -(10**400), 1e308, math.inf, -math.inf,
                                                          math.nan]))
TEMPLATES = (st.sampled_from(["{soc_serial}", "ACME-{soc_serial|mmc_cid|mac}", "{", "}", "{0}", "{a.b}", "{a[b]}",
                              "{a[0]}", "{a!r}", "{a!x}", "{a:>{b}}", "{a:{b:{c}}}", "{a:d}", ""])
             | st.text(st.sampled_from("{}[]!:.|ab0_ "), max_size=12) | TEXT)
DATETIMES = st.datetimes(timezones=st.none() | st.just(UTC)) | st.dates() | st.times()
TOML_SCALARS = TEXT | NUMBERS | st.booleans() | DATETIMES
TOML_VALUES = st.recursive(TOML_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)


def _maybe(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a right-typed value, sometimes anything TOML can say."""
    return st.one_of(right, right, right, TOML_VALUES)


VAULT_TABLE = {
    "url": _maybe(st.sampled_from(["https://vault.example/v1", "http://127.0.0.1:1/v1/", "ftp://x", "", "https://"])
                  | TEXT),
    "api-key-file": _maybe(PATHS),
    "api-key": _maybe(st.sampled_from(["k", "", " ", "a\nb", "a\x00b", SECRET, f" {SECRET} ", f"{SECRET} x"])
                      | st.sampled_from(["\n", "\r", "\x00", "\x01", "\x1b", "\x7f", "\t", "\x85", "\xe9", "\u20ac",
                                         "\u2028", "\ud7ff"]).map(lambda bad: SECRET + bad + "x")
                      | st.sampled_from([[SECRET], {"key": SECRET}, [[SECRET]]]) | TEXT),
    "ca-file": _maybe(PATHS),
    "allow-insecure-http": _maybe(st.booleans()),
    "trusted-account-keys": _maybe(st.lists(PATHS, max_size=3)),
    "connect-timeout": _maybe(NUMBERS),
    "timeout": _maybe(NUMBERS),
}
IDENTITY_TABLE = {
    "sources": _maybe(st.lists(st.sampled_from([*config.IDENTITY_SOURCES, "usb"]) | TEXT, max_size=4)),
    "required": _maybe(st.lists(TEXT, max_size=3)),
    "wait-seconds": _maybe(NUMBERS),
    "allow-weak": _maybe(st.booleans()),
    "static": _maybe(st.dictionaries(TEXT, TEXT, max_size=3)),
}
DOCUMENTS = st.fixed_dictionaries({}, optional={
    "brand": _maybe(st.sampled_from(["acme", "other", ""]) | TEXT),
    "model": _maybe(st.sampled_from(["acme-gw", "Acme", "", "-x"]) | TEXT),
    "model-assertion": _maybe(PATHS),
    "vault": _maybe(st.fixed_dictionaries({}, optional=VAULT_TABLE)),
    "serial": _maybe(st.fixed_dictionaries({}, optional={"template": _maybe(TEMPLATES)})),
    "identity": _maybe(st.fixed_dictionaries({}, optional=IDENTITY_TABLE)),
}) | st.dictionaries(TEXT, TOML_VALUES, max_size=4)
VALID = {"brand": "acme", "model": "acme-gw", "vault": {"url": "https://vault.example/v1", "api-key-file": "api-key",
                                                        "trusted-account-keys": ["brand.account-key"]}}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# A tiny TOML writer (tomllib only reads): basic strings with escapes, inline arrays and tables,
# and [sections] for the top-level tables.

def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(doc: dict[str, Any]) -> str:
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, table in ((k, v) for k, v in doc.items() if isinstance(v, dict)):
        lines.append(f"[{_toml_key(key)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files config paths may name: good ones, bad ones, a directory; nothing else is written here."""
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "api-key").write_text(SECRET + "\n")
    (directory / "api-key").chmod(0o600)  # as the agent requires of a file holding the api-key
    for name, text in BAD_KEY_FILES.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o600)
    for name in ("brand.account-key", "trusted.assert", "model.assert", "serial.assert"):
        source = {"brand.account-key": "brand/brand.account-key", "trusted.assert": "brand/trusted.assert",
                  "model.assert": "brand/model-acme-gw.assert", "serial.assert": "serial.assert"}[name]
        (directory / name).write_bytes(VECTORS[source])
    (directory / "empty").write_bytes(b"")
    (directory / "garbage").write_bytes(b"type: model\n\x00\xff\n\n")
    (directory / "not-utf8").write_bytes(b"\xff\xfe key\n")
    (directory / "dir").mkdir()
    return directory


def _load(directory: Path, texts: list[bytes]) -> config.Config | AgentError:
    files = []
    for i, text in enumerate(texts):
        path = directory / f"agent-{i}.toml"
        path.write_bytes(text)
        path.chmod(0o600)  # an inline api-key is taken only from a file others cannot read
        files.append(path)
    result = outcome(lambda: config.load(files), ConfigError)
    if isinstance(result, AgentError):
        # `run` prints it as its one stderr line; it must never show the api-key, wherever it was written
        assert_one_line(str(result), "the configuration error")
        assert SECRET not in str(result) and SECRET[:14] not in str(result), str(result)
        return result
    event("config: loaded")
    assert isinstance(result, config.Config) and result.brand and result.vault.url.endswith("/")
    assert result.vault.trusted_account_keys
    key = result.vault.api_key
    assert key and key == key.strip(), repr(key)
    requests.utils.check_header_validity(("api-key", key))  # what requests refuses, quoting the value
    key.encode("latin-1")  # what http.client cannot send at all
    assert key.isprintable() and key.isascii(), repr(key)  # what a Go server refuses (control characters)
    return result


STRUCTURED_CONFIGS = st.lists(st.tuples(st.booleans(), DOCUMENTS).map(
    lambda pair: toml_document(_merged(VALID, pair[1]) if pair[0] else pair[1]).encode("utf-8")), min_size=1, max_size=3)
VALID_TEXT = toml_document(VALID).encode()
RAW_CONFIGS = st.lists(st.binary(max_size=400) | mutated([VALID_TEXT, b'[serial]\ntemplate = "A-{mac}"\n'], max_ops=4),
                       min_size=1, max_size=2)

DEFECT_CONFIGS = [
    [VALID_TEXT + b"[serial]\ntemplate = \"{a[b]}\"\n"],  # TypeError from str.format_map
    [VALID_TEXT.replace(b"[vault]\n", b"[vault]\ntimeout = 1" + b"0" * 400 + b"\n")],  # OverflowError: int -> float
    [VALID_TEXT.replace(b'"api-key"', b'"a\\u0000b"')],  # ValueError: embedded null byte
    [VALID_TEXT.replace(b"[vault]", b'model-assertion = "a\\u0000b"\n[vault]')],
    [VALID_TEXT.replace(b'["brand.account-key"]', b'["a\\u0000b"]')],
    [b'brand = "\xff"\n'],  # UnicodeDecodeError: tomllib reads bytes and decodes them itself
    [b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n"],  # RecursionError in tomllib
]


@FUZZ
@given(STRUCTURED_CONFIGS)
@example([VALID_TEXT.replace(b'"api-key"', b'"nl\\nname"')])  # a path with a newline, quoted in the error
@example([VALID_TEXT.replace(b'api-key-file = "api-key"', b'api-key = ["' + SECRET.encode() + b'"]')])  # quoted the key
@example([VALID_TEXT.replace(b'api-key-file = "api-key"', b'api-key = "' + SECRET.encode() + b'\\u20ac"')])  # not latin-1
@example([VALID_TEXT.replace(b'api-key-file = "api-key"', b'api-key = " ' + SECRET.encode() + b'"')])  # requests quotes it
@example([VALID_TEXT.replace(b'"api-key"', b'"api-key-ctl"')])  # a control character, read from the file
@example([VALID_TEXT.replace(b"[vault]\n", b"[vault]\ntimeout = inf\n")])  # threading.Timer: OverflowError
@example(DEFECT_CONFIGS[0])
@example(DEFECT_CONFIGS[1])
@example(DEFECT_CONFIGS[2])
@example(DEFECT_CONFIGS[3])
@example(DEFECT_CONFIGS[4])
def test_config_documents(config_dir: Path, texts: list[bytes]) -> None:
    _load(config_dir, texts)


@FUZZ
@given(RAW_CONFIGS)
@example(DEFECT_CONFIGS[5])
@example(DEFECT_CONFIGS[6])
def test_config_bytes(config_dir: Path, texts: list[bytes]) -> None:
    _load(config_dir, texts)


@settings(FUZZ, max_examples=min(EXAMPLES, 300))
@given(DOCUMENTS)
def test_the_toml_writer_says_what_it_means(doc: dict[str, Any]) -> None:
    """The generator's own check: tomllib reads back what toml_document wrote (NaN aside)."""
    import tomllib

    def comparable(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, dict):
            return {k: comparable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [comparable(v) for v in value]
        if isinstance(value, datetime) and value.tzinfo is not None:
            return value.astimezone(UTC)
        return value

    assert comparable(tomllib.loads(toml_document(doc))) == comparable(doc)


def test_the_defect_pins_are_what_they_say() -> None:
    """The @example configurations differ from the valid one where they mean to (a rename would make them moot)."""
    assert b"template" in DEFECT_CONFIGS[0][0] and b"timeout = 1000" in DEFECT_CONFIGS[1][0]
    assert all(b"a\\u0000b" in entry[0] for entry in DEFECT_CONFIGS[2:5])
    assert b'api-key-file = "api-key"' in VALID_TEXT and b"[vault]\n" in VALID_TEXT
