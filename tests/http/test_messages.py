"""Issue 13 item 6: every vault message says what happened and where, against real servers on 127.0.0.1."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import ssl
import time

import pytest
from cryptography import x509

from agent import registration, systemd, vault
from agent.config import VaultConfig
from agent.errors import Code, VaultClockSkew, VaultRejected, VaultTransient
from agent.registration import State
from agent.session import LogPublisher, Status
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.pki import make_pki
from tests.fakes.rawserver import http_reply
from tests.faults.harness import Env

JSON = {"Content-Type": "application/json"}


def client(url: str, ca_file: str | None = None) -> vault.Vault:
    cfg = VaultConfig(url=url, api_key="the-key", ca_file=ca_file, allow_insecure_http=True,
                      trusted_account_keys=(), connect_timeout=2.0, timeout=5.0)
    return vault.Vault(cfg)


def test_a_5xx_names_the_url_the_code_whose_side_and_when_to_call_the_operator(serve) -> None:
    body = json.dumps({"error_code": "server-error", "message": "db down"}).encode()
    server = serve(http_reply("503 Service Unavailable", body, JSON))
    with pytest.raises(VaultTransient) as info:
        client(server.url).post_serial(b"type: serial-request\n")
    assert str(info.value) == (f"POST {server.url}serial: the vault answered HTTP 503: server-error: db down; the "
                               "trouble is on the vault's side, the agent retries on its own; if it lasts past 30 "
                               "minutes, call the vault's operator")
    assert info.value.error_code == "server-error"


def test_a_refusal_names_the_url_and_the_vaults_code(serve) -> None:
    body = json.dumps({"error_code": "invalid-api-key", "message": "Invalid API key used"}).encode()
    server = serve(http_reply("400 Bad Request", body, JSON))
    with pytest.raises(VaultRejected) as info:
        client(server.url).fetch_request_id()
    assert str(info.value) == f"POST {server.url}request-id: the vault refused: invalid-api-key: Invalid API key used"
    assert info.value.error_code == "invalid-api-key"


def test_a_404_says_how_vault_url_must_end_and_the_action_is_not_circular(serve) -> None:
    server = serve(http_reply("404 Not Found", b"404 page not found\n"))
    url = server.url.removesuffix("v1/")  # the mistake: a url without /v1/
    with pytest.raises(VaultRejected) as info:
        client(url).fetch_request_id()
    message = str(info.value)
    assert message.startswith(f"POST {url}request-id: the vault answered HTTP 404; no such endpoint: ")
    assert "vault.url must be the vault's API base ending in /v1/" in message
    assert info.value.error_code == "http-404"
    action = registration.ACTIONS["http-404"]
    assert "ending in /v1/" in action and "LastErrorMessage" not in action and "factory-agent retry" in action


def _fields(pem: bytes) -> tuple[str, str, str, str, str]:
    cert = x509.load_pem_x509_certificate(pem)
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    digest = hashlib.sha256(der).hexdigest().upper()
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    before = getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before
    after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    return (cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
            ":".join(digest[i:i + 2] for i in range(0, 64, 2)), before.strftime(stamp), after.strftime(stamp))


@pytest.mark.parametrize("case", ["other-ca", "no-ca-file"])
def test_a_tls_failure_shows_the_presented_certificate(tmp_path, lab_dir, case) -> None:
    pki = make_pki(tmp_path / "pki")
    ca_file = str(make_pki(tmp_path / "other").ca_file) if case == "other-ca" else None
    lab = FaultyVault(lab_dir)
    url = lab.start(ssl_context=pki.server_context())
    try:
        with pytest.raises(VaultRejected) as info:
            client(url, ca_file).fetch_request_id()
    finally:
        lab.stop()
    subject, issuer, sha256, before, after = _fields(pki.cert_file.read_bytes())
    message = str(info.value)
    assert info.value.error_code == "tls-certificate"
    assert message.startswith(f"cannot trust the vault's TLS certificate at {url}request-id: ")
    assert (f"presented: subject {subject!r}, issuer {issuer!r}, SHA-256 {sha256}, valid {before} to {after}; "
            in message), message
    assert issuer == "CN=fault matrix test CA"
    if case == "other-ca":
        assert f"its issuer is not the CA in vault.ca-file ({ca_file}): a proxy or captive portal" in message
    else:
        assert "vault.ca-file is not set and the system store does not trust its issuer" in message
    assert lab.requests[("POST", "/v1/request-id")] == 0


def test_clock_skew_shows_device_time_against_the_window(tmp_path, lab_dir) -> None:
    day = datetime.timedelta(days=1)
    pki = make_pki(tmp_path / "pki", not_before=-30 * day, not_after=-day)
    lab = FaultyVault(lab_dir)
    url = lab.start(ssl_context=pki.server_context())
    try:
        low = time.time()
        with pytest.raises(VaultClockSkew) as info:
            client(url, str(pki.ca_file)).fetch_request_id()
        high = time.time()
    finally:
        lab.stop()
    _, _, _, before, after = _fields(pki.cert_file.read_bytes())
    message = str(info.value)
    assert message.startswith("the vault's TLS certificate is not valid at this device's time: certificate has expired")
    assert f"(POST {url}request-id: device time " in message
    assert message.endswith(f" UTC, certificate valid from {before} to {after})")
    shown = message.split("device time ")[1][:19]
    stamps = {time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) for t in (low, high)}
    assert shown in stamps, (shown, stamps)


@pytest.mark.parametrize(("code", "message_id"), [
    (Code.CONFIG, systemd.MESSAGE_ID_CONFIG), (Code.STORE, systemd.MESSAGE_ID_STORE),
    (Code.UNTRUSTED_FILE, systemd.MESSAGE_ID_UNTRUSTED_FILE), (Code.IDENTITY, systemd.MESSAGE_ID_IDENTITY),
    ("tls-certificate", systemd.MESSAGE_ID_TLS), (Code.CLOCK_SKEW, systemd.MESSAGE_ID_CLOCK),
])
def test_config_and_environment_errors_carry_a_message_id_and_the_error_field(code, message_id) -> None:
    for state in (State.BLOCKED, State.WAITING_RETRY):
        fields = systemd.journal_fields(state, code)
        assert fields == {"FACTORY_AGENT_STATE": state, "FACTORY_AGENT_ERROR": code, "MESSAGE_ID": message_id}
    ids = [*systemd.ERROR_MESSAGE_IDS.values(), systemd.MESSAGE_ID_REGISTERED, systemd.MESSAGE_ID_BLOCKED,
           systemd.MESSAGE_ID_STATE_CORRUPT]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) for i in ids)
    assert systemd.journal_fields(State.BLOCKED, "invalid-api-key")["MESSAGE_ID"] == systemd.MESSAGE_ID_BLOCKED
    assert "MESSAGE_ID" not in systemd.journal_fields(State.WAITING_RETRY, "vault-transient")


def _status(state: State, error: str = "", message: str = "", attempts: int = 0) -> Status:
    return Status(state=state, serial="S1" if state is State.REGISTERED else "", brand="b", model="m",
                  device_key_id="k", attempts=attempts, last_error=error, last_error_message=message,
                  action="retrying" if error else "", next_retry=0)


def test_retries_of_one_error_collapse_then_escalate(caplog) -> None:
    clock = [1000.0]
    publisher = LogPublisher(clock=lambda: clock[0])
    caplog.set_level(logging.INFO, logger="agent.session")
    down = ("vault-transient", "POST http://v/v1/request-id: the vault answered HTTP 503")
    for attempt in range(1, 201):  # 200 retries 5 s apart: 1,000 s
        publisher.publish(_status(State.REQUESTING, attempts=attempt))
        publisher.publish(_status(State.WAITING_RETRY, *down, attempts=attempt))
        clock[0] += 5
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines[0] == (logging.INFO, "state requesting")
    assert lines[1][1].startswith("state waiting-retry (vault-transient: POST http://v/v1/request-id")
    summaries = lines[2:]
    # 400 lines before; now summaries 60, 180 (+120), 420 (+240), 900 (+480) s after the first, then 1,000 s are over
    assert [m.split(":")[0] for _, m in summaries] == ["still failing (vault-transient)"] * 4, lines
    assert [level for level, _ in summaries] == [logging.INFO] * 3 + [logging.WARNING]  # past 600 s
    since = time.strftime("%H:%M:%S", time.localtime(1000.0))
    assert [m.split(": POST")[0] for _, m in summaries] == [
        f"still failing (vault-transient): {n} tries since {since}" for n in (13, 37, 85, 181)]
    publisher.publish(_status(State.WAITING_RETRY, "vault-unavailable", "cannot reach the vault", attempts=201))
    publisher.publish(_status(State.REGISTERED, attempts=202))
    assert [r.getMessage() for r in caplog.records[-2:]] == [
        "state waiting-retry (vault-unavailable: cannot reach the vault); action: retrying", "state registered: serial S1"]


def test_a_real_daemon_collapses_the_retries_of_a_vault_that_answers_503(tmp_path, lab_dir) -> None:
    """Five 503s in a row, then the vault is back: one line for the failure (was two per retry: ten), the
    registration at once, and nothing else in between (a "still ..." line comes only after 60 s)."""
    env = Env(tmp_path, lab_dir, soc_serial="00000000fa017001", extra="connect-timeout = 2\ntimeout = 5")
    try:
        env.vault.faults.status["request-id"] = [Forced(503, retry_after="1") for _ in range(5)]
        daemon = env.start()
        assert env.finish(timeout=60) == 0, daemon.stderr
        assert env.vault.requests[("POST", "/v1/request-id")] == 6  # five refused, one answered
        failing = [line for line in daemon.states() if line.code]
        assert [(line.state, line.code) for line in failing] == [("waiting-retry", "vault-transient")], daemon.stderr
        assert failing[0].message.startswith(f"POST {env.url}request-id: the vault answered HTTP 503; the trouble is "
                                             "on the vault's side"), failing[0].text
        assert failing[0].action == "retrying" and failing[0].next_try, failing[0].text
        assert daemon.states()[-1].state == "registered"
        assert "still " not in daemon.stderr
        retry_lines = [ln for ln in daemon.stderr.splitlines() if "503" in ln]
        assert len(retry_lines) == 1, daemon.stderr
    finally:
        env.close()
