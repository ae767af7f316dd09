"""agent.systemd's pure parts: STATUS= text, watchdog and journal-stream detection, redaction.

The sockets themselves (sd_notify datagrams, journald's native protocol) are tested with
real processes in tests/system/test_systemd.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from agent import systemd

PEM_KEY = ("-----BEGIN PRIVATE KEY-----\nMIIJQgIBADANBgkqhkiG9w0BAQEFAASCCSwwggkoAgEAAoICAQC7\n"
           "-----END PRIVATE KEY-----\n")


@pytest.fixture(autouse=True)
def _fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemd, "_secrets", set())
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("state", "serial", "error", "action", "expected"), [
    ("registered", "ACME-0001", "", "", "registered: serial ACME-0001"),
    ("blocked", "", "invalid-api-key", "check the api-key in /etc/factory-agent/api-key",
     "blocked: invalid-api-key: check the api-key in /etc/factory-agent/api-key"),
    ("blocked", "", "identity", "", "blocked: identity"),
    ("requesting", "", "", "", "requesting"),
    ("waiting-retry", "", "vault-unavailable", "", "waiting-retry (last error: vault-unavailable)"),
    ("starting", "", "", "", "starting"),
])
def test_status_line(state: str, serial: str, error: str, action: str, expected: str) -> None:
    assert systemd.status_line(state, serial, error, action) == expected


def test_status_line_is_one_short_line_that_cannot_inject_assignments() -> None:
    line = systemd.status_line("blocked", "", "http-400", "call the line lead\nREADY=1\r\x00" + "x" * 500)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert len(line) == systemd.STATUS_MAX and line.endswith("...")
    assert line.startswith("blocked: http-400: call the line lead READY=1 x")


def test_status_line_never_shows_a_secret() -> None:
    systemd.redact(["hunter2-api-key"])
    assert systemd.status_line("blocked", "", "invalid-api-key", "key hunter2-api-key refused") == \
        "blocked: invalid-api-key: key *** refused"


def test_status_publisher_sends_only_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(systemd, "notify_status", sent.append)
    publisher = systemd.StatusPublisher()
    for state, error in [("starting", ""), ("requesting", ""), ("requesting", ""), ("waiting-retry", "vault-transient")]:
        publisher.publish(SimpleNamespace(state=state, serial="", last_error=error, action=""))  # type: ignore[arg-type]
    assert sent == ["starting", "requesting", "waiting-retry (last error: vault-transient)"]


def test_journal_fields() -> None:
    assert systemd.journal_fields("registered", "", "ACME-1") == {
        "FACTORY_AGENT_STATE": "registered", "FACTORY_AGENT_SERIAL": "ACME-1",
        "MESSAGE_ID": systemd.MESSAGE_ID_REGISTERED}
    assert systemd.journal_fields("blocked", "invalid-api-key") == {
        "FACTORY_AGENT_STATE": "blocked", "FACTORY_AGENT_ERROR": "invalid-api-key",
        "MESSAGE_ID": systemd.MESSAGE_ID_BLOCKED}
    assert systemd.journal_fields("requesting") == {"FACTORY_AGENT_STATE": "requesting"}


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("60000000", None, 30.0),
    ("200000", None, 0.1),
    ("60000000", "self", 30.0),
    ("60000000", "other", None),
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    ("", None, None),
    ("60000000", "", None),
    ("60000000", "12x", None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))
    assert systemd.watchdog_interval() == expected


def test_watchdog_loop_returns_at_once_without_a_watchdog() -> None:
    asyncio.run(asyncio.wait_for(systemd.watchdog_loop(), 5))  # would time out if it pinged


def test_notify_outside_systemd_sends_nothing() -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.notify_ready("starting") is False
    assert systemd.notify_status("requesting") is False
    assert systemd.notify_stopping() is False
    assert systemd.notify_extend_timeout(90) is False


def _stderr_id() -> str:
    st = os.fstat(2)
    return f"{st.st_dev}:{st.st_ino}"


@pytest.mark.parametrize(("value", "expected"), [
    (None, False),
    ("stderr", True),
    ("1:2", False),
    ("", False),
    ("garbage", False),
    ("1:2:3", False),
    ("x:y", False),
])
def test_under_journal(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is not None:
        monkeypatch.setenv("JOURNAL_STREAM", _stderr_id() if value == "stderr" else value)
    assert systemd.under_journal() is expected


def test_message_ids_are_fixed_distinct_128_bit_ids() -> None:
    ids = [systemd.MESSAGE_ID_REGISTERED, systemd.MESSAGE_ID_BLOCKED, systemd.MESSAGE_ID_STATE_CORRUPT]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == 3
    # A contract: scripts run `journalctl MESSAGE_ID=...`. Never change these values.
    assert systemd.MESSAGE_ID_REGISTERED == "010b494fc2c34550ac947dff6d46a29d"
    assert systemd.MESSAGE_ID_BLOCKED == "39144cba6cf74227a6058710934a932a"
    assert systemd.MESSAGE_ID_STATE_CORRUPT == "611ac0d8dee64d81896d428a42f28ab1"


def test_redact_text() -> None:
    systemd.redact(["  k3y-value\n", "", "   "])  # stripped; blanks would redact everything
    assert systemd.redact_text("api-key k3y-value sent") == "api-key *** sent"
    assert systemd.redact_text(f"loaded {PEM_KEY}done") == "loaded [PRIVATE KEY redacted]\ndone"
    truncated = "x -----BEGIN RSA PRIVATE KEY-----\nMIIEow"
    assert systemd.redact_text(truncated) == "x [RSA PRIVATE KEY redacted]"
    assert systemd.redact_text("nothing to hide") == "nothing to hide"


def test_longer_secret_wins_over_its_prefix() -> None:
    systemd.redact(["abcd", "abcdefgh"])
    assert systemd.redact_text("key=abcdefgh") == "key=***"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("agent.test", logging.INFO, __file__, 1, msg, args or None, None)
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def test_filter_merges_arguments_and_redacts_fields() -> None:
    systemd.redact(["s3cret"])
    record = _record("vault refused %s with %r", "s3cret", {"api-key": "s3cret"},
                     FACTORY_AGENT_ERROR="bad s3cret", lower="s3cret")
    assert systemd.RedactingFilter().filter(record)
    assert record.getMessage() == "vault refused *** with {'api-key': '***'}"
    assert record.args is None
    assert record.FACTORY_AGENT_ERROR == "bad ***"
    assert record.lower == "s3cret"  # not a journal field: never sent (see _send_to_journal)


def test_filter_renders_and_redacts_tracebacks() -> None:
    systemd.redact(["s3cret"])
    try:
        raise ValueError("cannot use s3cret")
    except ValueError as exc:
        record = _record("failed")
        record.exc_info = (type(exc), exc, exc.__traceback__)
    systemd.RedactingFilter().filter(record)
    assert record.exc_info is None
    assert record.exc_text is not None and "ValueError: cannot use ***" in record.exc_text
    assert "s3cret" not in logging.Formatter().format(record)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_off_journal_writes_plain_redacted_lines(root_logger: logging.Logger,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    systemd.setup_logging(logging.DEBUG)
    systemd.setup_logging(logging.INFO)  # replaces its own handler, does not add a second
    ours = [h for h in root_logger.handlers if getattr(h, systemd._OURS, False)]
    assert len(ours) == 1 and root_logger.level == logging.INFO
    systemd.redact(["topsecret"])
    logging.getLogger("agent.daemon").info("state %s with %s", "blocked", "topsecret",
                                           extra={systemd.FIELD_STATE: "blocked"})
    logging.getLogger("agent.daemon").debug("not shown")
    assert stream.getvalue() == "factory-agent: state blocked with ***\n"
