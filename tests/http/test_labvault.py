"""The lab vault over real HTTP(S) on 127.0.0.1: its files, the device API as the real vault answers it, its hooks,
and the fault knobs tests/fakes/faultyvault.py adds through them."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import trustme

from agent import __version__, assertions, keys, openpgp
from agent.assertions import Assertion
from agent.errors import AssertionFormatError, BadSignatureError, ConfigError
from agent.labserve import parse_listen
from agent.labvault import LabVault
from tests.conftest import REPO
from tests.fakes.faultyvault import FaultyVault, Forced

API_KEY = "lab-test-api-key"
START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
CREATED = 1_799_999_000  # the device's signature time: fixed, so signatures are reproducible
SELF_SIGNATURE = ("could not validate serial-request self-signature "
                  "(failed signature verification: openpgp: invalid signature: hash tag doesn't match)")


class Clock:
    """The vault's injected clock."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def vault_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory per session: its RSA-4096 root and brand keys are generated once, then reused."""
    directory = tmp_path_factory.mktemp("labvault") / "vault"
    LabVault(directory, api_key=API_KEY)
    return directory


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def vault(vault_dir: Path, clock: Clock) -> Iterator[LabVault]:
    """A fresh product vault (fresh nonces and records) on the session's keys, serving."""
    with LabVault(vault_dir, api_key=API_KEY, now=clock) as lab:
        yield lab


@pytest.fixture
def faulty(vault_dir: Path, clock: Clock) -> Iterator[FaultyVault]:
    """The same, with the tests' fault knobs and records (tests/fakes/faultyvault.py), no knob set."""
    with FaultyVault(vault_dir, api_key=API_KEY, now=clock) as lab:
        yield lab


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


# --- helpers ---------------------------------------------------------------


def get_request_id(vault: LabVault) -> str:
    response = requests.post(vault.url + "request-id", headers={"api-key": API_KEY}, timeout=10)
    assert response.status_code == 200, response.content
    return str(response.json()["request-id"])


def make_request(key: keys.DeviceKey, request_id: str, serial: str = "ACME-0001", body: bytes = b"",
                 brand: str = "acme", model: str = "acme-gw") -> bytes:
    return assertions.build_serial_request(brand=brand, model=model, request_id=request_id, device_key=key.public,
                                           signer=key.sign, created=CREATED, serial=serial, body=body).encode()


def model_assertion(vault: LabVault) -> Assertion:
    return assertions.decode((vault.directory / "model.assert").read_bytes())


def stream(*parts: bytes | Assertion) -> bytes:
    return assertions.encode_stream(assertions.decode(p) if isinstance(p, bytes) else p for p in parts)


def post_serial(vault: LabVault, data: bytes, api_key: str | None = API_KEY) -> requests.Response:
    headers = {"Content-Type": "application/x.ubuntu.assertion"}
    if api_key is not None:
        headers["api-key"] = api_key
    return requests.post(vault.url + "serial", data=data, headers=headers, timeout=10)


def register(vault: LabVault, key: keys.DeviceKey, serial: str = "ACME-0001", body: bytes = b"") -> Assertion:
    data = stream(make_request(key, get_request_id(vault), serial, body), model_assertion(vault))
    response = post_serial(vault, data)
    assert response.status_code == 200, response.content
    return assertions.decode(response.content)


def brand_public(vault: LabVault) -> openpgp.PublicKey:
    return assertions.account_public_key(assertions.decode((vault.directory / "brand.account-key").read_bytes()))


def assert_error(response: requests.Response, code: str, message: str) -> None:
    """The real vault's error: 400, its Content-Type, and these exact bytes (Go's json.Encoder)."""
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
    expected = ('{"success":false,"error_code":"%s","error_subcode":"","message":%s,"StatusCode":400}\n'
                % (code, json.dumps(message)))
    assert response.content == expected.encode()


# --- files -----------------------------------------------------------------


def test_files_and_trust_chain(vault: LabVault) -> None:
    d = vault.directory
    assert d.stat().st_mode & 0o777 == 0o700
    for name, mode in [("root-key.pem", 0o600), ("brand-key.pem", 0o600), ("api-key", 0o600), ("trusted.assert", 0o644),
                       ("brand-chain.assert", 0o644), ("brand.account-key", 0o644), ("model.assert", 0o644)]:
        assert (d / name).stat().st_mode & 0o777 == mode, name
    root_account, root_key_assertion = assertions.decode_stream((d / "trusted.assert").read_bytes())
    root = assertions.account_public_key(root_key_assertion)
    assert root_account.headers["account-id"] == root_key_assertion.headers["account-id"] == "lab-root"
    for assertion in (root_account, root_key_assertion):
        assertions.verify(assertion, root)
    brand_account, brand_key_assertion = assertions.decode_stream((d / "brand-chain.assert").read_bytes())
    assert brand_key_assertion.encode() == (d / "brand.account-key").read_bytes()
    for assertion in (brand_account, brand_key_assertion):
        assert assertion.header("authority-id") == "lab-root"
        assertions.verify(assertion, root)
    assert brand_key_assertion.headers["account-id"] == "acme" and brand_key_assertion.headers["name"] == "lab"
    assert brand_key_assertion.headers["since"] == "2016-01-01T00:00:00Z"
    brand = assertions.account_public_key(brand_key_assertion)
    assert brand == vault.brand_key.public and brand.bits == 4096 and root.bits == 4096
    model = model_assertion(vault)
    assertions.verify(model, brand)
    assert {k: model.headers[k] for k in ("authority-id", "series", "brand-id", "model", "architecture", "timestamp")} == {
        "authority-id": "acme", "series": "16", "brand-id": "acme", "model": "acme-gw", "architecture": "amd64",
        "timestamp": "2027-01-15T08:00:00Z"}


def test_keys_are_reused_and_api_key_kept(vault_dir: Path, tmp_path: Path) -> None:
    pem_time = (vault_dir / "brand-key.pem").stat().st_mtime_ns
    again = LabVault(vault_dir, api_key=API_KEY)
    assert (vault_dir / "brand-key.pem").stat().st_mtime_ns == pem_time
    assert again.brand_key.key_id == keys.load_key((vault_dir / "brand-key.pem").read_bytes()).key_id
    fresh = tmp_path / "copy"
    fresh.mkdir()
    for name in ("root-key.pem", "brand-key.pem"):
        shutil.copy(vault_dir / name, fresh / name)
    first = LabVault(fresh)
    assert re.fullmatch(r"[0-9a-f]{32}", first.api_key)
    assert LabVault(fresh).api_key == first.api_key == (fresh / "api-key").read_text().strip()
    assert LabVault(fresh, api_key="given").api_key == "given" == (fresh / "api-key").read_text().strip()
    with pytest.raises(ConfigError):
        LabVault(fresh, model="Not-A-Model")


# --- the device API --------------------------------------------------------


def test_version_and_health(vault: LabVault) -> None:
    for path, body in [("version", {"version": __version__, "revision": "lab"}), ("health", {"database": "healthy"})]:
        response = requests.get(vault.url + path, timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
        assert response.content == json.dumps(body, separators=(",", ":")).encode() + b"\n"


def test_request_id(vault: LabVault) -> None:
    response = requests.post(vault.url + "request-id", headers={"API-KEY": API_KEY}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json; charset=UTF-8"
    nonce = response.json()["request-id"]
    assert re.fullmatch(r"[0-9a-f]{40}", nonce)
    assert response.content == b'{"success":true,"message":"","request-id":"%s"}\n' % nonce.encode()
    assert get_request_id(vault) != nonce


@pytest.mark.parametrize("headers", [{}, {"api-key": ""}, {"api-key": "wrong"}])
def test_request_id_invalid_api_key(vault: LabVault, headers: dict[str, str]) -> None:
    response = requests.post(vault.url + "request-id", headers=headers, timeout=10)
    assert_error(response, "invalid-api-key", "Invalid API key used")


def test_serial_with_header_serial(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    data = stream(make_request(device_key, get_request_id(faulty)), model_assertion(faulty))
    response = post_serial(faulty, data)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x.ubuntu.assertion"
    assert response.content.endswith(b"\n") and not response.content.endswith(b"\n\n")
    serial = assertions.decode(response.content)
    assert serial.headers == {
        "type": "serial", "authority-id": "acme", "revision": "1", "brand-id": "acme", "model": "acme-gw",
        "serial": "ACME-0001", "device-key": device_key.public.encoded, "device-key-sha3-384": device_key.key_id,
        "timestamp": "2027-01-15T08:00:00Z", "sign-key-sha3-384": faulty.brand_key.key_id}
    assert serial.body == b""
    assertions.verify(serial, brand_public(faulty))
    assert faulty.signed == [serial]
    assert faulty.requests[("POST", "/v1/serial")] == 1 and faulty.requests[("POST", "/v1/request-id")] == 1


@pytest.mark.parametrize("line, expected", [("serial: BODY-0001", "BODY-0001"), ('serial: "BODY 2"', "BODY 2"),
                                            ("serial: 'B3' # label", "B3"), ("serial: B4 # label", "B4")])
def test_serial_from_yaml_body(vault: LabVault, device_key: keys.DeviceKey, line: str, expected: str) -> None:
    body = f"hardware:\n  serial: nested\n{line}\nmac: 00:11:22:33:44:55\n".encode()
    serial = register(vault, device_key, serial="", body=body)
    assert serial.header("serial") == expected
    assert serial.body == body and serial.header("body-length") == str(len(body))
    assertions.verify(serial, brand_public(vault))


def test_duplicates_bump_the_serials_revision(vault: LabVault, device_key: keys.DeviceKey, small_key: keys.DeviceKey,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.labvault")
    revisions = [register(vault, key, serial).revision for key, serial in
                 [(device_key, "ACME-0001"), (small_key, "ACME-0001"), (device_key, "ACME-0001"), (device_key, "ACME-0100")]]
    assert revisions == [1, 2, 3, 1]
    assert sum("duplicate-assertion" in r.getMessage() for r in caplog.records) == 3
    assert API_KEY not in caplog.text


# --- /serial errors, in the order of the real vault's checks ---------------


@pytest.mark.parametrize("api_key", [None, "", "wrong"])
def test_serial_invalid_api_key_keeps_the_nonce(vault: LabVault, device_key: keys.DeviceKey, api_key: str | None) -> None:
    data = make_request(device_key, get_request_id(vault))
    assert_error(post_serial(vault, data, api_key=api_key), "invalid-api-key", "Invalid API key used")
    assert post_serial(vault, data).status_code == 200


def test_empty_data(vault: LabVault) -> None:
    assert_error(post_serial(vault, b""), "empty-data", "No data supplied for signing")


@pytest.mark.parametrize("mangle", [
    lambda request, model: b"garbage",
    lambda request, model: request.replace(b"request-id: ", b"request-idx: "),
    lambda request, model: request.rstrip(b"\n") + b"\n" + model,  # no empty line between the assertions
    lambda request, model: b"x" * (4 * 1024 * 1024 + 1),
])
def test_invalid_assertion_carries_the_decoder_message(vault: LabVault, device_key: keys.DeviceKey,
                                                       mangle: Callable[[bytes, bytes], bytes]) -> None:
    request, model = make_request(device_key, get_request_id(vault)), model_assertion(vault).encode()
    data = mangle(request, model)
    if len(data) > 4 * 1024 * 1024:
        message = f"request body exceeds {4 * 1024 * 1024} bytes"
    else:
        with pytest.raises(AssertionFormatError) as failure:
            assertions.decode_stream(data)
        message = str(failure.value)
    assert_error(post_serial(vault, data), "invalid-assertion", message)
    assert post_serial(vault, stream(request, model)).status_code == 200  # the request-id survived


def test_invalid_type_and_second_type(vault: LabVault, device_key: keys.DeviceKey) -> None:
    request, model = make_request(device_key, get_request_id(vault)), model_assertion(vault)
    chain = assertions.decode_stream((vault.directory / "brand-chain.assert").read_bytes())
    assert_error(post_serial(vault, stream(model)), "invalid-type", "The assertion type must be 'serial'")
    second = "The 2nd assertion type must be 'model'"
    assert_error(post_serial(vault, stream(request, chain[0])), "invalid-second-type", second)
    assert_error(post_serial(vault, stream(request, model, model)), "invalid-second-type", second)
    unexpected = "unexpected assertion in the request stream"
    old_serial = register(vault, device_key, serial="OLD-1")
    assert_error(post_serial(vault, stream(request, model, old_serial)), "invalid-assertion", unexpected)
    assert_error(post_serial(vault, stream(request, model, old_serial, model)), "invalid-assertion", unexpected)
    assert post_serial(vault, stream(request, model)).status_code == 200


def test_bad_self_signature_keeps_the_nonce(vault: LabVault, device_key: keys.DeviceKey) -> None:
    request = make_request(device_key, get_request_id(vault))
    response = post_serial(vault, request.replace(b"serial: ACME-0001", b"serial: ACME-0002"))
    rsa_failure = SELF_SIGNATURE.replace("hash tag doesn't match", "RSA verification failed")  # 1 in 65536
    assert_error(response, "invalid-assertion", SELF_SIGNATURE if SELF_SIGNATURE.encode() in response.content else rsa_failure)
    assert post_serial(vault, request).status_code == 200


def test_mismatched_model_and_unchecked_model_signature(vault: LabVault, device_key: keys.DeviceKey,
                                                         small_key: keys.DeviceKey) -> None:
    request = make_request(device_key, get_request_id(vault))

    def model(name: str) -> Assertion:  # signed by a key nobody trusts: the vault does not check it
        headers = dict(model_assertion(vault).headers, model=name)
        return assertions.sign(headers, b"", small_key.public, small_key.sign, CREATED)

    assert_error(post_serial(vault, stream(request, model("acme-other"))), "mismatched-model",
                 "Model and serial-request assertion do not match")
    assert post_serial(vault, stream(request, model("acme-gw"))).status_code == 200


def test_invalid_nonce(vault: LabVault, device_key: keys.DeviceKey, clock: Clock) -> None:
    message = "Nonce is invalid or expired"
    used = get_request_id(vault)
    assert post_serial(vault, make_request(device_key, used)).status_code == 200
    assert_error(post_serial(vault, make_request(device_key, used)), "invalid-nonce", message)
    assert_error(post_serial(vault, make_request(device_key, "0" * 40)), "invalid-nonce", message)
    on_time, late = get_request_id(vault), get_request_id(vault)
    clock.now += 600
    assert post_serial(vault, make_request(device_key, on_time)).status_code == 200
    clock.now += 1
    assert_error(post_serial(vault, make_request(device_key, late)), "invalid-nonce", message)


@pytest.mark.parametrize("brand, model", [("other", "acme-gw"), ("acme", "acme-other")])
def test_invalid_model_burns_the_nonce(vault: LabVault, device_key: keys.DeviceKey, brand: str, model: str) -> None:
    request_id = get_request_id(vault)
    data = make_request(device_key, request_id, brand=brand, model=model)
    assert_error(post_serial(vault, data), "invalid-model", "Cannot find a matching model or sub-store model")
    assert_error(post_serial(vault, make_request(device_key, request_id)), "invalid-nonce", "Nonce is invalid or expired")


@pytest.mark.parametrize("body", [b"", b"mac: 00:11:22:33:44:55\nserial:\n  nested: x\n"])
def test_no_serial_number_burns_the_nonce(vault: LabVault, device_key: keys.DeviceKey, body: bytes) -> None:
    request_id = get_request_id(vault)
    data = make_request(device_key, request_id, serial="", body=body)
    assert_error(post_serial(vault, data), "create-assertion", "Error converting the serial-request to a serial assertion")
    assert_error(post_serial(vault, make_request(device_key, request_id)), "invalid-nonce", "Nonce is invalid or expired")


def test_remodel_has_no_substore(vault: LabVault, device_key: keys.DeviceKey) -> None:
    headers = {"type": "serial-request", "brand-id": "acme", "model": "acme-gw", "request-id": get_request_id(vault),
               "device-key": device_key.public.encoded, "original-brand-id": "acme", "original-model": "acme-gw",
               "original-serial": "OLD-1"}
    request = assertions.sign(headers, b"", device_key.public, device_key.sign, CREATED)
    old = register(vault, device_key, serial="OLD-1")
    response = post_serial(vault, stream(request, model_assertion(vault), old))
    assert_error(response, "invalid-substore", "Cannot find sub-store mapping for the model")


def test_wrong_method_and_unknown_path(faulty: FaultyVault) -> None:
    for method, path in [("GET", "serial"), ("GET", "request-id"), ("PUT", "serial"), ("POST", "version"),
                         ("POST", "health"), ("DELETE", "request-id")]:
        response = requests.request(method, faulty.url + path, timeout=10)
        assert (response.status_code, response.content) == (405, b""), (method, path)
    for method, url in [("GET", faulty.url + "nope"), ("POST", faulty.url + "serial/x"), ("GET", faulty.url[: -len("v1/")])]:
        response = requests.request(method, url, timeout=10)
        assert (response.status_code, response.content) == (404, b"404 page not found\n"), url
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert faulty.requests[("GET", "/v1/nope")] == 1


def test_malformed_content_length_and_internal_errors(vault: LabVault, monkeypatch: pytest.MonkeyPatch) -> None:
    host, port = vault.url.split("/")[2].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /v1/serial HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert raw.makefile("rb").readline().startswith(b"HTTP/1.0 400 ")

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(vault, "respond", broken)
    response = requests.get(vault.url + "version", timeout=10)
    assert response.status_code == 500 and response.json()["error_code"] == "server-error"


def test_the_product_vault_has_no_fault_knobs_or_records(vault: LabVault) -> None:
    """Test-only misbehaviour lives in tests/fakes/: the shipped vault carries none of it."""
    for name in ("faults", "requests", "signed", "seen_headers"):
        assert not hasattr(vault, name), name


def test_headers_are_logged_at_debug_level_without_the_api_key(vault: LabVault, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.labvault")
    response = requests.post(vault.url + "request-id", headers={"api-key": API_KEY, "User-Agent": "probe/1"}, timeout=10)
    assert response.status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lab vault: POST /v1/request-id")]
    assert "User-Agent: probe/1" in line and "api-key: (hidden)" in line
    assert API_KEY not in caplog.text


# --- fault knobs (tests/fakes/faultyvault.py) ------------------------------


def test_forced_statuses_then_normal(faulty: FaultyVault) -> None:
    json_body = b'{"message":"slow down"}'
    faulty.faults.status["request-id"] = [503, Forced(429, retry_after="7", body=json_body, content_type="application/json"),
                                          Forced(503, retry_after="Wed, 21 Oct 2026 07:28:00 GMT")]
    answers = [requests.post(faulty.url + "request-id", headers={"api-key": API_KEY}, timeout=10) for _ in range(4)]
    assert [r.status_code for r in answers] == [503, 429, 503, 200]
    assert answers[0].content == b"503 Service Unavailable\n" and "Retry-After" not in answers[0].headers
    assert answers[1].content == json_body and answers[1].headers["Content-Type"] == "application/json"
    assert [r.headers.get("Retry-After") for r in answers[1:3]] == ["7", "Wed, 21 Oct 2026 07:28:00 GMT"]


def test_forced_error_codes(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    faulty.faults.error_code = {"request-id": ["invalid-api-key"], "serial": ["invalid-nonce"]}
    response = requests.post(faulty.url + "request-id", headers={"api-key": API_KEY}, timeout=10)
    assert_error(response, "invalid-api-key", "Invalid API key used")
    data = make_request(device_key, get_request_id(faulty))
    assert_error(post_serial(faulty, data), "invalid-nonce", "Nonce is invalid or expired")
    assert post_serial(faulty, data).status_code == 200  # the forced error left the request-id alone


def test_accepted_then_signed(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    faulty.faults.accepted_times = 2
    data = make_request(device_key, get_request_id(faulty))
    answers = [post_serial(faulty, data) for _ in range(3)]
    assert [(r.status_code, r.content) for r in answers[:2]] == [(202, b""), (202, b"")]
    assert answers[2].status_code == 200 and faulty.faults.accepted_times == 0


def test_delay(faulty: FaultyVault) -> None:
    faulty.faults.delay = 0.3
    started = time.monotonic()
    assert requests.get(faulty.url + "health", timeout=10).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_truncate_and_oversize(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    faulty.faults.truncate = True
    response = post_serial(faulty, make_request(device_key, get_request_id(faulty)))
    full = faulty.signed[-1].encode()
    assert response.status_code == 200 and response.content == full[: len(full) // 2]
    assert response.headers["Content-Length"] == str(len(response.content))
    with pytest.raises(AssertionFormatError):
        assertions.decode_stream(response.content)
    faulty.faults.truncate, faulty.faults.oversize = False, 5 * 1024 * 1024
    response = post_serial(faulty, make_request(device_key, get_request_id(faulty)))
    assert len(response.content) == len(faulty.signed[-1].encode()) + 5 * 1024 * 1024
    assert response.content.startswith(faulty.signed[-1].encode())


def test_other_device_key(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    faulty.faults.other_device_key = True
    serial = register(faulty, device_key)
    assert serial.header("device-key-sha3-384") != device_key.key_id
    assert serial.header("device-key") != device_key.public.encoded
    assertions.verify(serial, brand_public(faulty))


def test_bad_signature(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    faulty.faults.bad_signature = True
    serial = register(faulty, device_key)  # still decodes
    with pytest.raises(BadSignatureError):
        assertions.verify(serial, brand_public(faulty))


def test_wrong_brand(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    faulty.faults.wrong_brand = "other"
    serial = register(faulty, device_key)
    assert (serial.header("brand-id"), serial.header("authority-id")) == ("other", "other")
    assertions.verify(serial, brand_public(faulty))


def test_untrusted_key(faulty: FaultyVault, device_key: keys.DeviceKey) -> None:
    faulty.faults.untrusted_key = True
    serial = register(faulty, device_key)
    chain = assertions.decode_stream((faulty.directory / "brand-chain.assert").read_bytes())
    trusted = assertions.decode_stream((faulty.directory / "trusted.assert").read_bytes())
    assert serial.header("authority-id") == "acme"
    assert serial.sign_key_id not in {a.headers.get("public-key-sha3-384") for a in chain + trusted}


@pytest.mark.parametrize("content_type", ["application/json", ""])
def test_content_type(faulty: FaultyVault, device_key: keys.DeviceKey, content_type: str) -> None:
    faulty.faults.content_type = content_type
    response = post_serial(faulty, make_request(device_key, get_request_id(faulty)))
    assert response.status_code == 200 and response.headers.get("Content-Type") == (content_type or None)


# --- serving ---------------------------------------------------------------


def test_https_with_and_without_the_ca(vault_dir: Path, ca: trustme.CA, tmp_path: Path, device_key: keys.DeviceKey) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    lab = LabVault(vault_dir, api_key=API_KEY)
    url = lab.start(ssl_context=context)
    try:
        assert url.startswith("https://127.0.0.1:") and url == lab.url
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url + "version", timeout=10)
        response = requests.post(url + "request-id", headers={"api-key": API_KEY}, verify=str(bundle), timeout=10)
        data = make_request(device_key, response.json()["request-id"])
        response = requests.post(url + "serial", data=data, headers={"api-key": API_KEY}, verify=str(bundle), timeout=10)
        assert response.status_code == 200
    finally:
        lab.stop()


def test_stop_closes_the_socket(vault_dir: Path) -> None:
    lab = LabVault(vault_dir, api_key=API_KEY)
    url = lab.start()
    assert requests.get(url + "version", timeout=10).status_code == 200
    lab.stop()
    assert lab.url == ""
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url + "version", timeout=10)
    lab.stop()  # idempotent


@pytest.mark.parametrize("listen, expected", [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0)),
                                              ("localhost:1", ("localhost", 1))])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8080", "127.0.0.1:", ":80", "127.0.0.1:99999", "127.0.0.1:http", ""])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        parse_listen(listen)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_until_signal(vault_dir: Path, signum: int) -> None:
    code = ("import sys; from agent.labserve import Options, serve; "
            "sys.exit(serve(Options(sys.argv[1], api_key=sys.argv[2])))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(vault_dir), API_KEY], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"lab vault listening on (http://127\.0\.0\.1:\d+/v1/) \(brand acme, model acme-gw\); "
                             r"trust (\S+)/brand\.account-key; api-key in (\S+)/api-key\n", line)
        assert match, line
        assert match[2] == match[3] == str(vault_dir)
        assert (vault_dir / "url").read_text() == match[1] + "\n"
        assert requests.get(match[1] + "version", timeout=10).status_code == 200
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert API_KEY not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
