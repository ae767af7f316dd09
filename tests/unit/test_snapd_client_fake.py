"""tests/fakes/snapd_client.py keeps to snapd's handlers_serial.go where the relay's tests lean on it."""

from __future__ import annotations

import json

import pytest

from agent import keys
from tests.fakes import snapd_client
from tests.fakes.snapd_client import Answer, Attempt, Retry, SnapdClient
from tests.unit.test_snapd_mode import MODEL

SETTINGS = {"device-service.url": "http://127.0.0.1:1/v1/", "registration.proposed-serial": "S1",
            "registration.body": "b: 1\n"}
JSON = "application/json"


def _client(answers: list[Answer], key: keys.DeviceKey | None = None) -> SnapdClient:
    client = SnapdClient(SETTINGS, key, MODEL, poll_delay=0, retry_delay=0, max_rounds=3)  # type: ignore[arg-type]
    queue = list(answers)
    client._post = lambda endpoint, body, headers: queue.pop(0)  # type: ignore[method-assign]
    return client


def test_an_undecodable_request_id_body_is_retried() -> None:
    for body in (b"<html>captive portal</html>", b"[1, 2]", b'{"request-id": 5}'):
        with pytest.raises(Retry):
            _client([Answer(200, JSON, body)]).request_id(Attempt())


def test_an_empty_request_id_is_a_hard_error() -> None:
    for body in (b'{"request-id": ""}', b"{}"):
        with pytest.raises(ValueError, match="empty request-id"):
            _client([Answer(200, JSON, body)]).request_id(Attempt())


def test_an_undecodable_serial_stream_is_retried_not_raised(small_key: keys.DeviceKey) -> None:
    rid = Answer(200, JSON, json.dumps({"request-id": "r"}).encode())
    garbage = Answer(200, "application/x.ubuntu.assertion", b"<html>not an assertion</html>")
    attempt = _client([rid, garbage] * 3, small_key).register()
    assert attempt.serial is None and attempt.error == "gave up after too many rounds"
    assert [endpoint for endpoint, _ in attempt.answers] == ["request-id", "serial"] * 3


@pytest.mark.parametrize("body, expected", [
    ({"message": "Invalid API key used"}, "Invalid API key used"),
    ({"message": 42}, "unexpected status 400"),  # Go cannot decode a number into a string field
    ({"message": ["a"]}, "unexpected status 400"),
    ({"message": 42, "error_list": [{"message": "from the list"}]}, "unexpected status 400"),  # the whole decode fails
    ({"error_list": [{"message": "from the list"}]}, "from the list"),
    ({"error_list": "nope"}, "unexpected status 400"),
])
def test_snapds_error_text(body: dict[str, object], expected: str) -> None:
    assert SnapdClient.message(Answer(400, JSON, json.dumps(body).encode())) == expected
    assert SnapdClient.message(Answer(400, JSON + "; charset=UTF-8", json.dumps(body).encode())) == "unexpected status 400"


def test_the_fake_names_snapds_version() -> None:
    assert snapd_client.USER_AGENT.startswith("snapd/")
