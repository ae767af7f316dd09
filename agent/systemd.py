"""systemd: sd_notify (READY, STATUS, WATCHDOG, STOPPING, EXTEND_TIMEOUT_USEC) and journald logging.

The only module that imports python-systemd (``systemd.daemon``, ``systemd.journal``), lazily,
so the agent runs where it is missing: notify() then speaks sd_notify's datagram protocol
itself, and logging goes to stderr.

Journal contract (append-only; factory scripts filter on these): every record may carry
``FACTORY_AGENT_STATE``, ``FACTORY_AGENT_ERROR`` and ``FACTORY_AGENT_SERIAL`` through
``extra=``, and the events below carry fixed ``MESSAGE_ID``s, e.g.
``journalctl -b MESSAGE_ID=010b494fc2c34550ac947dff6d46a29d``.

Nothing secret reaches a log: PEM blocks and every value registered with :func:`redact`
(the api-key) are replaced before any handler formats a record.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import re
import socket
import sys
from collections.abc import Iterable
from typing import Any, Protocol

from .errors import Code, VaultCode
from .registration import State

log = logging.getLogger(__name__)

SYSLOG_IDENTIFIER = "factory-agent"
FIELD_STATE = "FACTORY_AGENT_STATE"
FIELD_ERROR = "FACTORY_AGENT_ERROR"
FIELD_SERIAL = "FACTORY_AGENT_SERIAL"

# Fixed MESSAGE_IDs (a contract: never change one; add new ones for new events).
MESSAGE_ID_REGISTERED = "010b494fc2c34550ac947dff6d46a29d"  # the serial assertion is stored
MESSAGE_ID_BLOCKED = "39144cba6cf74227a6058710934a932a"  # registration stopped until a person acts
MESSAGE_ID_STATE_CORRUPT = "611ac0d8dee64d81896d428a42f28ab1"  # state.json moved aside and rebuilt
# Config and environment errors, one per kind: they win over MESSAGE_ID_BLOCKED on a blocked record, so that
# `journalctl MESSAGE_ID=...` finds every config error whatever state it left the daemon in.
MESSAGE_ID_CONFIG = "8c1f2a6e0b7d4d55a3e9c4f1d2b6a701"  # a configuration file or key is wrong
MESSAGE_ID_STORE = "5e3d9b0c7a14426f8f2e6b1c9d0a4e12"  # the state directory cannot be read or written
MESSAGE_ID_UNTRUSTED_FILE = "d47a0c3e9f2b4b8e91c65a7f3e0d2b94"  # a file the agent would trust is not its own
MESSAGE_ID_STATE_LOCKED = "2b9e6f1a4c0d47e3b8a5d1c7e9f30a6d"  # another process holds the state lock
MESSAGE_ID_DEVICE_KEY = "f0a3c5e7b9d14f2a86c4e0b2d8f6a197"  # the device key cannot be generated or stored
MESSAGE_ID_DEVICE_KEY_LOST = "73c1e9b5a2f04d6e9b8c3a1f5e7d0c28"  # the recorded device key is gone
MESSAGE_ID_IDENTITY = "a6e2d8f4c0b34e1a97d5b3f1e9c7a052"  # required identity fields are missing
MESSAGE_ID_TLS = "1d7b3f9e5a2c4806b4e2c0a8f6d4b391"  # the vault's TLS certificate is not trusted here
MESSAGE_ID_CLOCK = "b8f4a0e6c2d94b17a3f1e5c9b7d2a604"  # the device clock is outside the certificate's window
ERROR_MESSAGE_IDS: dict[str, str] = {
    Code.CONFIG: MESSAGE_ID_CONFIG, Code.STORE: MESSAGE_ID_STORE, Code.UNTRUSTED_FILE: MESSAGE_ID_UNTRUSTED_FILE,
    Code.STATE_LOCKED: MESSAGE_ID_STATE_LOCKED, Code.DEVICE_KEY: MESSAGE_ID_DEVICE_KEY,
    Code.DEVICE_KEY_LOST: MESSAGE_ID_DEVICE_KEY_LOST, Code.IDENTITY: MESSAGE_ID_IDENTITY,
    VaultCode.TLS_CERTIFICATE: MESSAGE_ID_TLS, Code.CLOCK_SKEW: MESSAGE_ID_CLOCK,
}

STATUS_MAX = 200  # characters of STATUS=: one line in `systemctl status`
_OURS = "_factory_agent_handler"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,64})-----.*?(?:-----END \1-----|\Z)", re.DOTALL)
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # what journald accepts from a client
_secrets: set[str] = set()


@functools.cache
def _python_systemd(name: str) -> Any:
    """``systemd.<name>`` from python-systemd, or None where it is not installed."""
    try:
        return importlib.import_module(f"systemd.{name}")
    except ImportError:
        return None


# ---- sd_notify ----------------------------------------------------------------------------


def notify(*lines: str) -> bool:
    """Send ``lines`` ("READY=1", "STATUS=...") as one message; True if sent. False outside
    systemd (no $NOTIFY_SOCKET) or when sending fails: a report never stops the daemon."""
    message = "\n".join(lines)
    daemon = _python_systemd("daemon")
    try:
        if daemon is not None:
            return bool(daemon.notify(message))
        return _send_datagram(message.encode())
    except (OSError, ValueError) as exc:
        log.debug("cannot notify systemd: %s", exc)
        return False


def _send_datagram(message: bytes) -> bool:
    """sd_notify(3)'s protocol without libsystemd: one datagram to $NOTIFY_SOCKET ("@" = abstract)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a transport we do not speak (vsock:)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)  # called on the event loop: a full queue is an error, not a stall
        sock.sendto(message, address)
    return True


def notify_ready(status_text: str) -> bool:
    """READY=1: the state is loaded and the bus name owned (Type=notify start-up is over)."""
    return notify("READY=1", "STATUS=" + _one_line(status_text))


def notify_status(text: str) -> bool:
    return notify("STATUS=" + _one_line(text))


def notify_stopping() -> bool:
    return notify("STOPPING=1")


def notify_extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start-up (or stop) timeout fires."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC (sd_watchdog_enabled(3));
    None when the watchdog is off, or is meant for another process ($WATCHDOG_PID)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def watchdog_loop() -> None:
    """Ping WATCHDOG=1 forever (a TaskGroup task); returns at once without a watchdog. On the
    event loop on purpose: a blocked loop stops the pings, and systemd restarts the daemon."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def status_line(state: str, serial: str, last_error: str, action: str) -> str:
    """STATUS= text: "registered: serial X", "blocked: invalid-api-key: check ...", "requesting"."""
    if state == State.REGISTERED:
        text = f"registered: serial {serial}" if serial else "registered"
    elif state == State.BLOCKED:
        text = ": ".join(part for part in (state, last_error, action) if part)
    elif last_error:
        text = f"{state} (last error: {last_error})"
    else:
        text = state
    return _one_line(text)


class _Status(Protocol):
    @property
    def state(self) -> str: ...
    @property
    def serial(self) -> str: ...
    @property
    def last_error(self) -> str: ...
    @property
    def action(self) -> str: ...


class StatusPublisher:
    """A daemon Publisher: mirrors the status to STATUS=, sending only when the line changes."""

    def __init__(self) -> None:
        self.last = ""

    def publish(self, status: _Status) -> None:
        line = status_line(status.state, status.serial, status.last_error, status.action)
        if line != self.last:
            self.last = line
            notify_status(line)


def _one_line(text: str) -> str:
    """One short line: a newline in STATUS= would start another assignment (READY=1...)."""
    text = " ".join(_CONTROL.sub(" ", redact_text(text)).split())
    return text if len(text) <= STATUS_MAX else text[: STATUS_MAX - 3] + "..."


# ---- journald and stderr logging ----------------------------------------------------------


def journal_fields(state: str, last_error: str = "", serial: str = "") -> dict[str, str]:
    """``extra=`` for a state-change record: the fields, and the MESSAGE_ID of a config or environment error
    (ERROR_MESSAGE_IDS), else of registered/blocked."""
    fields = {FIELD_STATE: state, FIELD_ERROR: last_error, FIELD_SERIAL: serial}
    ids: dict[str, str] = {State.REGISTERED: MESSAGE_ID_REGISTERED, State.BLOCKED: MESSAGE_ID_BLOCKED}
    message_id = ERROR_MESSAGE_IDS.get(last_error) if state != State.REGISTERED else None
    message_id = message_id or ids.get(state)
    return {k: v for k, v in fields.items() if v} | ({"MESSAGE_ID": message_id} if message_id else {})


def under_journal() -> bool:
    """Whether stderr is journald's stream: $JOURNAL_STREAM ("dev:ino") names fd 2 (systemd.exec(5))."""
    try:
        dev, ino = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(2)
    except (KeyError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def redact(values: Iterable[str]) -> None:
    """Register secrets (the api-key) that no log line or STATUS= may carry; they show as "***"."""
    _secrets.update(stripped for value in values if (stripped := value.strip()))


def redact_text(text: str) -> str:
    """``text`` without PEM blocks (keys, whatever their kind) and without registered secrets."""
    text = _PEM.sub(lambda m: f"[{m.group(1)} redacted]", text)
    for secret in sorted(_secrets, key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record in place before formatting: the message merged
    with its arguments (python-systemd would send raw ones as CODE_ARGS), the traceback as
    text, and every string journal field of ``extra``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None  # else the journal handler sends its repr as EXCEPTION_INFO
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        for name, value in list(vars(record).items()):
            if isinstance(value, str) and _FIELD_NAME.fullmatch(name):
                setattr(record, name, redact_text(value))
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Root logging: the journal (native protocol, structured fields) when stderr is journald's
    stream and python-systemd is installed, else "factory-agent: <message>" lines on stderr.
    Calling it again replaces the handler it installed before."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    handler = _journal_handler() if under_journal() else None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("factory-agent: %(message)s"))
    handler.addFilter(RedactingFilter())
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(level)


def _journal_handler() -> logging.Handler | None:
    journal = _python_systemd("journal")
    if journal is None:
        return None
    handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                                                      sender_function=_send_to_journal)
    return handler


def _send_to_journal(message: str, /, **fields: Any) -> None:
    """JournalHandler's sender: only real journal fields (it passes every LogRecord attribute,
    ``msg``, ``args``, ``levelname``...), no empty ones, and stderr if journald is unreachable."""
    clean = {name: value for name, value in fields.items()
             if _FIELD_NAME.fullmatch(name) and value is not None and value != ""}
    try:
        _python_systemd("journal").send(redact_text(message), **clean)
    except OSError:
        print(f"{SYSLOG_IDENTIFIER}: {redact_text(message)}", file=sys.stderr, flush=True)
