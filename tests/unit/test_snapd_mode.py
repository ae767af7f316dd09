"""snapd mode's pure parts: config keys, what the relay forwards, how it answers, the settings lines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from random import Random

import pytest

from agent import assertions, config, keys, registration, relay, serials, settings
from agent.errors import (
    ConfigError,
    RelayBadRequest,
    RelayOtherDeviceKey,
    RelayRefusedError,
    RelayWrongModel,
    VaultRejected,
    VaultTransient,
)
from agent.registration import Phase, Progress
from tests.conftest import DATA
from tests.unit.test_config import base

MODEL = assertions.decode((DATA / "brand" / "model-acme-gw.assert").read_bytes())


# --- config ------------------------------------------------------------------


def test_standalone_is_the_default_and_the_relay_listens_on_loopback(tmp_path: Path) -> None:
    cfg = config.load([base(tmp_path)])
    assert cfg.mode == "standalone"
    assert (cfg.relay.host, cfg.relay.port) == ("127.0.0.1", 8622)


@pytest.mark.parametrize("listen, host, port", [("127.0.0.1:0", "127.0.0.1", 0), ("127.0.0.2:9000", "127.0.0.2", 9000),
                                                ("[::1]:8622", "::1", 8622)])
def test_snapd_mode_and_a_loopback_listen_address(tmp_path: Path, listen: str, host: str, port: int) -> None:
    path = tmp_path / "10-snapd.toml"
    path.write_text(f'mode = "snapd"\n[relay]\nlisten = "{listen}"\n')
    cfg = config.load([base(tmp_path), path])
    assert cfg.mode == "snapd" and (cfg.relay.host, cfg.relay.port) == (host, port)


@pytest.mark.parametrize("text, key", [
    ('mode = "ubuntu-core"\n', "'mode'"),
    ('[relay]\nlisten = "0.0.0.0:8622"\n', "'relay.listen'"),  # never beyond the device: it adds the api-key
    ('[relay]\nlisten = "192.168.1.5:8622"\n', "'relay.listen'"),
    ('[relay]\nlisten = "localhost:8622"\n', "'relay.listen'"),  # a name could resolve anywhere
    ('[relay]\nlisten = "127.0.0.1"\n', "'relay.listen'"),
    ('[relay]\nlisten = "127.0.0.1:70000"\n', "'relay.listen'"),
    ('[relay]\nlisten = "127.0.0.1:\u00b2"\n', "'relay.listen'"),
    ('[relay]\nport = 8622\n', "'relay.port'"),
])
def test_bad_mode_or_relay_address_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "10-snapd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load([base(tmp_path), path])
    assert str(path) in str(caught.value) and key in str(caught.value)


# --- what the relay forwards ---------------------------------------------------


def _request(key: keys.DeviceKey, brand: str = "acme", model: str = "acme-gw", serial: str = "A1") -> bytes:
    request = assertions.build_serial_request(brand=brand, model=model, request_id="REQ", device_key=key.public,
                                              signer=key.sign, created=1700000000, serial=serial, body=b"hardware: {}\n")
    return assertions.encode_stream([request, MODEL])


def _refusal(data: bytes, key_id: str = "") -> str:
    with pytest.raises(RelayRefusedError) as caught:
        serials.check_serial_request(data, brand="acme", model="acme-gw", key_id=key_id)
    return caught.value.code


def test_a_valid_request_passes_and_names_its_key(device_key: keys.DeviceKey) -> None:
    request = serials.check_serial_request(_request(device_key), brand="acme", model="acme-gw", key_id="")
    assert request.sign_key_id == device_key.key_id
    again = serials.check_serial_request(_request(device_key), brand="acme", model="acme-gw", key_id=device_key.key_id)
    assert again.header("serial") == "A1"


def test_another_brand_or_model_is_refused(device_key: keys.DeviceKey) -> None:
    assert _refusal(_request(device_key, brand="other")) == "relay-wrong-model"
    assert _refusal(_request(device_key, model="other-gw")) == "relay-wrong-model"


@pytest.mark.parametrize("error", [UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), RecursionError("deep"),
                                   ValueError("x"), OverflowError("big")])
def test_any_decoding_failure_of_the_clients_bytes_is_a_bad_request(monkeypatch: pytest.MonkeyPatch,
                                                                    error: Exception) -> None:
    def broken(data: bytes) -> list[assertions.Assertion]:
        raise error

    monkeypatch.setattr(assertions, "decode_stream", broken)
    assert _refusal(b"anything") == "relay-bad-request"  # never an exception the relay would treat as a bug


def test_a_second_device_key_is_refused(device_key: keys.DeviceKey, small_key: keys.DeviceKey) -> None:
    assert _refusal(_request(small_key), key_id=device_key.key_id) == "relay-other-device-key"


def test_garbage_a_forged_signature_or_another_type_is_a_bad_request(device_key: keys.DeviceKey) -> None:
    assert _refusal(b"") == "relay-bad-request"
    assert _refusal(b"not an assertion") == "relay-bad-request"
    assert _refusal(MODEL.encode()) == "relay-bad-request"  # a model first, no serial-request
    genuine = _request(device_key)
    forged = genuine.replace(b"serial: A1", b"serial: A2", 1)  # the signature no longer covers it
    assert _refusal(forged) == "relay-bad-request"


def test_refusals_block_except_a_bad_request() -> None:
    assert registration.needs_person(RelayWrongModel("x"))
    assert registration.needs_person(RelayOtherDeviceKey("x"))
    assert not registration.needs_person(RelayBadRequest("x"))
    assert relay.error_response(RelayBadRequest("x")).status == 400  # not 503: no retry helps
    blocked = registration.apply(Progress(), RelayOtherDeviceKey("x"), Random(1))
    assert blocked.progress.blocked_by == "relay-other-device-key"
    assert blocked.progress.action == registration.ACTIONS["relay-other-device-key"]


def test_binding_the_device_key_and_adopting_a_serial_after_a_crash() -> None:
    bound = registration.apply(Progress(), registration.KeyReady("KEY"), Random(1)).progress
    assert (bound.phase, bound.key_id) == (Phase.KEY_READY, "KEY")
    adopted = registration.reconcile_snapd(bound, "SERIAL-1")
    assert (adopted.phase, adopted.serial) == (Phase.REGISTERED, "SERIAL-1")
    assert registration.reconcile_snapd(bound, None) == bound
    assert registration.reconcile_snapd(adopted, None) == adopted


# --- how the relay answers -------------------------------------------------------


def test_errors_reach_snapd_as_application_json_exactly() -> None:
    refused = relay.error_response(VaultRejected("the vault refused: invalid-api-key: Invalid API key used", "invalid-api-key"))
    assert (refused.status, refused.content_type) == (400, "application/json")
    assert json.loads(refused.body)["message"] == "the vault refused: invalid-api-key: Invalid API key used"
    transient = relay.error_response(VaultTransient("cannot talk to the vault"))
    assert transient.status == 503 and transient.content_type == "application/json"  # above 500: snapd retries


def test_the_vaults_json_refusal_keeps_its_bytes_and_gets_the_exact_type() -> None:
    body = (b'{"success":false,"error_code":"invalid-api-key","error_subcode":"","message":"Invalid API key used",'
            b'"StatusCode":400}\n')
    response = relay.passed_on(400, "application/json; charset=UTF-8", body, VaultRejected("x", "invalid-api-key"))
    assert (response.status, response.content_type, response.body) == (400, "application/json", body)
    plain = relay.passed_on(503, "text/plain", b"503 Service Unavailable\n", VaultTransient("the vault answered HTTP 503"))
    assert (plain.status, plain.content_type) == (503, "application/json")
    assert json.loads(plain.body)["message"] == "the vault answered HTTP 503"
    signed = relay.passed_on(200, "application/x.ubuntu.assertion", b"type: serial...")
    assert (signed.status, signed.content_type, signed.body) == (200, "application/x.ubuntu.assertion", b"type: serial...")


def test_response_bytes_close_the_connection() -> None:
    raw = relay.encode_response(relay.json_error(404, "relay-not-found", "no"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 404 Not Found"
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head


def _parse(raw: bytes) -> relay.Request:
    async def go() -> relay.Request:
        reader = asyncio.StreamReader(limit=relay.MAX_HEAD)
        reader.feed_data(raw)
        reader.feed_eof()
        return await relay.read_request(reader)

    return asyncio.run(go())


def test_request_parsing_as_snapds_go_client_sends() -> None:
    request = _parse(b"POST /v1/request-id HTTP/1.1\r\nHost: 127.0.0.1:8622\r\nUser-Agent: snapd/2.57.6\r\n"
                     b"Content-Length: 0\r\nAccept-Encoding: gzip\r\n\r\n")
    assert (request.method, request.path, request.body) == ("POST", "/v1/request-id", b"")
    posted = _parse(b"POST /v1/serial?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
    assert (posted.path, posted.body) == ("/v1/serial", b"hello")


# Host: h in each request that must reach a specific refusal: h11 refuses an HTTP/1.1 request without
# Host first (400), as RFC 9112 requires; snapd's Go client always sends one.
@pytest.mark.parametrize("raw, status", [
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST /v1/serial HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    # int() would raise: h11 0.14 calls it (ValueError: 413), h11 0.16 refuses over 20 digits first (400)
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", (400, 413)),
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nContent-Length: 000000001\r\n\r\nx", 413),  # over 8 digits
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400),
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nContent-Length: 4, 5\r\n\r\nabcde", 400),  # conflicting, one line
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nHost: evil\r\nContent-Length: 0\r\n\r\n", 400),  # twice
    (b"POST /v1/serial HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"POST /v1/serial HTTP/1.1\r\nContent-Length: \xd9\xa3\r\n\r\n", 400),  # not ASCII digits
    (b"POST /v1/serial HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"POST /v1/serial HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),  # the body ends early
    (b"POST /v1/serial HTTP/1.1\r\nHost: 127.0.0.1", 400),  # the head ends early
    (b"POST /v1/serial HTTP/1.1\r\n" + b"X: " + b"y" * (relay.MAX_HEAD + 10) + b"\r\n\r\n", 431),
])
def test_requests_the_relay_does_not_take(raw: bytes, status: int | tuple[int, ...]) -> None:
    with pytest.raises(relay._BadRequest) as caught:
        _parse(raw)
    assert caught.value.status in (status if isinstance(status, tuple) else (status,))


# --- the hook's lines ---------------------------------------------------------------


def test_settings_lines_are_snapctl_arguments_with_json_string_values() -> None:
    headers = {"Factory-Agent-Relay-Token": "ab" * 32}
    values = {"device-service.url": "http://127.0.0.1:8622/v1/", "registration.proposed-serial": "0012345",
              "registration.body": 'hardware:\n  soc-serial: "0012345"\n', "device-service.headers": json.dumps(headers)}
    lines = settings.format_lines(settings.check_settings(values)).splitlines()
    assert [line.partition("=")[0] for line in lines] == list(settings.KEYS)
    parsed = {k: json.loads(v) for k, _, v in (line.partition("=") for line in lines)}
    assert parsed == {**values, "device-service.headers": headers}  # the headers: a JSON object, snapd's map
    assert lines[2] == 'registration.proposed-serial="0012345"'  # a JSON string: snapctl keeps it a string


@pytest.mark.parametrize("headers", ["", "[]", '"a string"', '{"a": 1}', "{not json"])
def test_settings_whose_headers_are_not_an_object_of_strings_are_refused(headers: str) -> None:
    values = {"device-service.url": "u", "registration.proposed-serial": "s", "registration.body": "b",
              "device-service.headers": headers}
    with pytest.raises(settings._Refused, match=r"device-service\.headers"):
        settings.check_settings(values)


def test_settings_missing_a_key_are_refused() -> None:
    with pytest.raises(settings._Refused, match=r"lack device-service\.headers$"):
        settings.check_settings({"device-service.url": "u", "registration.proposed-serial": "s",
                                 "registration.body": "b"})
    with pytest.raises(settings._Refused, match=r"lack device-service\.url, registration\.proposed-serial"):
        settings.check_settings({"device-service.headers": "{}"})


def test_settings_without_a_body_are_secure_onboardings() -> None:
    """No registration.body: the prepare-serial-request hook sets it; the lines then hold the other three."""
    checked = settings.check_settings({"device-service.url": "u", "device-service.headers": '{"T": "t"}',
                                       "registration.proposed-serial": "s"})
    assert "registration.body" not in checked
    assert settings.format_lines(checked).splitlines() == ['device-service.url="u"', 'device-service.headers={"T":"t"}',
                                                           'registration.proposed-serial="s"']


def test_the_settings_command_reuses_the_status_clients_bus_code() -> None:
    """One way to connect and call on the bus (status.py's), so a fix there reaches the hook's command too."""
    import inspect

    from agent import status

    source = inspect.getsource(settings)
    assert "MessageBus" not in source and "lib.Message(" not in source
    assert set(status.NO_OWNER) <= set(settings._NOT_YET)
