"""The vault client against real sockets on 127.0.0.1: each answer becomes the right typed outcome."""

from __future__ import annotations

import email.utils
import json
import socket
import time

import pytest

from agent import vault
from agent.config import VaultConfig
from agent.errors import VaultRejected, VaultTransient, VaultUnavailable
from tests.fakes.rawserver import http_reply

JSON = {"Content-Type": "application/json; charset=UTF-8"}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"success": False, "error_code": code, "error_subcode": "", "message": message,
                       "StatusCode": 400}, separators=(",", ":")).encode()


def client(url: str, timeout: float = 5.0) -> vault.Vault:
    cfg = VaultConfig(url=url, api_key="the-key", ca_file=None, allow_insecure_http=True,
                      trusted_account_keys=(), connect_timeout=2.0, timeout=timeout)
    return vault.Vault(cfg)


def test_request_id_exchange_as_snapd_does_it(serve) -> None:
    server = serve(http_reply("200 OK", b'{"success":true,"message":"","request-id":"abc123"}', JSON))
    assert client(server.url).fetch_request_id() == "abc123"
    request = server.requests[0]
    assert request.startswith(b"POST /v1/request-id HTTP/1.1\r\n")
    assert b"\r\napi-key: the-key\r\n" in request and b"Content-Length: 0" in request


def test_serial_post_carries_the_assertion_type(serve) -> None:
    server = serve(http_reply("200 OK", b"type: serial\n..."))
    answer = client(server.url).post_serial(b"type: serial-request\n...")
    assert isinstance(answer, vault.Signed) and answer.body == b"type: serial\n..."
    assert b"Content-Type: application/x.ubuntu.assertion\r\n" in server.requests[0]
    assert server.requests[0].endswith(b"\r\n\r\ntype: serial-request\n...")


def test_202_is_pending_with_retry_after(serve) -> None:
    server = serve(http_reply("202 Accepted", b"", {"Retry-After": "17"}))
    answer = client(server.url).post_serial(b"x")
    assert answer == vault.Pending(17.0)


@pytest.mark.parametrize("status", ["500 Internal Server Error", "502 Bad Gateway", "503 Service Unavailable", "429 Too Many Requests"])
def test_server_trouble_is_transient(serve, status) -> None:
    server = serve(http_reply(status, b"busy", {"Retry-After": "3"}))
    with pytest.raises(VaultTransient) as info:
        client(server.url).fetch_request_id()
    assert info.value.retry_after == 3.0 and status.split()[0] in str(info.value)
    assert info.value.status == int(status.split()[0])  # a 429 is a crowd (registration.crowded)


def test_json_refusal_carries_the_vaults_code_and_message(serve) -> None:
    server = serve(http_reply("400 Bad Request", error_body("invalid-api-key", "Invalid API key used"), JSON))
    with pytest.raises(VaultRejected) as info:
        client(server.url).fetch_request_id()
    assert info.value.error_code == "invalid-api-key"
    assert str(info.value) == f"POST {server.url}request-id: the vault refused: invalid-api-key: Invalid API key used"
    assert "the-key" not in str(info.value)


def test_non_json_4xx_is_named_by_status(serve) -> None:
    server = serve(http_reply("404 Not Found", b"404 page not found\n", {"Content-Type": "text/plain"}))
    with pytest.raises(VaultRejected) as info:
        client(server.url).post_serial(b"x")
    assert info.value.error_code == "http-404"


@pytest.mark.parametrize("body", [b"<html>portal</html>", b'{"success":true}', b'{"request-id": 5}', b"[]"])
def test_a_200_without_request_id_is_transient(serve, body) -> None:
    server = serve(http_reply("200 OK", body))
    with pytest.raises(VaultTransient, match="no request-id"):
        client(server.url).fetch_request_id()


def test_oversized_answers_are_transient(serve) -> None:
    big = b"x" * (vault.MAX_RESPONSE_BYTES + 1)
    server = serve(http_reply("200 OK", big))
    with pytest.raises(VaultTransient, match="too large"):
        client(server.url).post_serial(b"x")

    def chunked(conn, request):  # no Content-Length: the cap applies while reading
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 65536
        for _ in range(20):
            conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    server = serve(chunked)
    with pytest.raises(VaultTransient, match="too large"):
        client(server.url).post_serial(b"x")


def test_a_slow_drip_is_cut_at_the_deadline(serve) -> None:
    def drip(conn, request):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            conn.sendall(b"z")
            time.sleep(0.1)

    server = serve(drip)
    started = time.monotonic()
    with pytest.raises(VaultTransient, match="within 1 s"):
        client(server.url, timeout=1.0).post_serial(b"x")
    assert time.monotonic() - started < 3


def test_a_reset_mid_body_is_transient(serve) -> None:
    def reset(conn, request):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    server = serve(reset)
    try:
        answer = client(server.url).post_serial(b"x")
    except VaultTransient:
        return
    assert isinstance(answer, vault.Signed) and answer.body == b"partial"  # urllib3 1.26 does not enforce lengths; the codec then refuses it


def test_a_read_timeout_is_transient(serve) -> None:
    server = serve(lambda conn, request: time.sleep(3))
    with pytest.raises(VaultTransient, match="did not answer in time|within"):
        client(server.url, timeout=1.0).fetch_request_id()


def test_refused_connection_is_no_network() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(VaultUnavailable, match="cannot reach the vault"):
        client(f"http://127.0.0.1:{port}/v1/").fetch_request_id()


def test_dns_failure_is_no_network() -> None:
    with pytest.raises(VaultUnavailable):
        client("http://vault.invalid/v1/").fetch_request_id()


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("120", 120.0), (" 5 ", 5.0), ("-3", None), ("soon", None)],
)
def test_parse_retry_after(value, expected) -> None:
    assert vault.parse_retry_after(value, time.time()) == expected


def test_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert vault.parse_retry_after(date, now) == 90.0
    assert vault.parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0


def test_system_trust_store_not_certifi() -> None:
    bundle = vault.system_ca_bundle()
    assert "site-packages" not in bundle and "certifi/" not in bundle and bundle.startswith(("/etc", "/usr"))


def test_a_device_onboarding_with_its_hardware_identity_sends_no_api_key(serve) -> None:
    server = serve(http_reply("200 OK", b'{"success":true,"message":"","request-id":"abc123"}', JSON))
    cfg = VaultConfig(url=server.url, api_key="", ca_file=None, allow_insecure_http=True, trusted_account_keys=(),
                      connect_timeout=2.0, timeout=5.0)
    assert vault.Vault(cfg).fetch_request_id() == "abc123"
    assert b"api-key" not in server.requests[0].lower()
