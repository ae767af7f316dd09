"""The vault fault matrix: the REAL daemon (``python -m agent run --bus none``) against a vault
that misbehaves in one way per test, on 127.0.0.1 only.

The lab vault with fault knobs (tests/fakes/faultyvault.py: agent/labvault.py, its ``Faults``
knobs and injected clock) expresses what a real Serial Vault can say; ``FaultProxy`` (tests/faults/harness.py), a raw socket server in
front of it, expresses what no well-behaved server does (stalls, drips, resets, garbage) and
then forwards, so every retried fault ends in a real registration. TLS certificates are made
here with ``cryptography``. Each device starts with a pre-seeded key (no RSA-4096 keygen).

Expected outcomes follow the retry policy table of README.md and serial-vault-api.md:

| misbehaviour                                   | LastError                  | state (while / after)                | recovery |
| ---------------------------------------------- | -------------------------- | ------------------------------------ | -------- |
| connection refused (nothing listens)           | vault-unavailable          | waiting-retry, attempts not counted  | registers when the vault comes up (~5 s) |
| DNS failure (``vault.invalid``, RFC 6761)      | vault-unavailable          | waiting-retry, attempts not counted  | registers once the name resolves (~5 s) |
| connect timeout (SYN dropped: backlog full)    | vault-transient            | waiting-retry within connect-timeout | registers when the vault answers |
| read timeout (no answer at all)                | vault-transient            | waiting-retry within timeout         | registers |
| connection reset mid-body (real serial)        | vault-transient            | waiting-retry, nothing stored        | registers |
| slow drip of the body past the deadline        | vault-transient            | waiting-retry by the deadline        | registers |
| slow drip of the status line/headers           | vault-transient            | waiting-retry by the deadline        | registers |
| connection closed without an answer            | vault-transient            | waiting-retry                        | registers |
| an answer that is not HTTP                     | vault-transient            | waiting-retry                        | registers |
| HTTP 500 / 502                                 | vault-transient            | waiting-retry                        | registers |
| 503 + Retry-After: seconds / HTTP date         | vault-transient            | waiting-retry until that time        | registers no earlier |
| 429 + Retry-After                              | vault-transient            | waiting-retry past it (crowd window) | registers |
| 202 three times, then 200                      | (none)                     | polling, same serial-request re-posted | registers |
| truncated serial assertion                     | vault-transient            | waiting-retry, nothing stored        | registers |
| oversized body (Content-Length / chunked)      | vault-transient            | waiting-retry, nothing stored        | registers |
| non-assertion 200 (HTML portal, other type)    | vault-transient            | waiting-retry, nothing stored        | registers |
| 200 request-id answer without a request-id     | vault-transient            | waiting-retry                        | registers |
| serial with a wrong/missing Content-Type       | (none)                     | registered (snapd ignores it too)    | - |
| JSON refusal sent as text/plain                | http-400                   | blocked, default action              | Retry() |
| JSON refusal with an unknown error_code        | that code                  | blocked, default action              | Retry() |
| 404 (wrong vault.url path), 302 redirect       | http-404, http-302         | blocked, default action              | Retry() |
| invalid-api-key (a wrong key, for real)        | invalid-api-key            | blocked: check vault.api-key-file    | Retry() |
| generate-nonce (request-id)                    | generate-nonce             | waiting-retry                        | registers |
| empty-data, invalid-assertion, invalid-type,   | that code                  | blocked, default action              | Retry() |
|   invalid-second-type, invalid-substore        |                            |                                      |          |
| mismatched-model                               | mismatched-model           | blocked: check model-assertion       | Retry() |
| invalid-nonce once                             | invalid-nonce              | a fresh request-id at once           | registers |
| invalid-nonce four times                       | invalid-nonce              | 3 at once, then waiting-retry        | registers |
| expired request-id (vault clock +601 s)        | invalid-nonce              | a fresh request-id at once           | registers |
| invalid-model (another model, for real)        | invalid-model              | blocked: check brand and model       | Retry() |
| create-assertion                               | create-assertion           | blocked: check serial.template       | Retry() |
| signing-assertion                              | signing-assertion          | blocked: ask the vault's operator    | Retry() |
| logging-assertion                              | logging-assertion          | waiting-retry                        | registers |
| server-error (HTTP 500, JSON)                  | server-error               | waiting-retry                        | registers |
| serial for another device key / brand / model  | serial-rejected            | blocked, never stored                | Retry() |
| serial signed by an untrusted key              | serial-rejected            | blocked, never stored                | Retry() |
| serial with a broken signature                 | serial-rejected            | blocked, never stored                | Retry() |
| TLS certificate not yet valid / expired        | clock-skew                 | waiting-clock (30 s schedule)        | registers after a restart with a good certificate |
| TLS certificate for another host / unknown CA  | tls-certificate            | blocked: check vault.url and ca-file | Retry() |
| every exchange with a wrong answer             | (counted in Attempts)      | -                                    | - |

"Retry()" means blocked until the D-Bus Retry() or a restart: ``run --once`` exits 1 with the
error and the action on stderr. "Nothing stored" means no serial.assertion, no temp file and an
empty serial in state.json while (or after) the wrong answer is handled.

How each case is checked: the daemon's stderr lines ``factory-agent: state S (CODE: MESSAGE);
action: ACTION`` (the first matching one, or the last), state.json (phase, last-error,
blocked-by, attempts, failures, clock-tries) read at that moment, the exit status, the stored
serial verified against the brand's account-key, and the lab vault's record of what was asked.

Nothing here sends a packet off 127.0.0.1: the DNS case runs the daemon in a private mount
namespace whose nsswitch.conf resolves host names from a hosts file of the test's only (a plain
lookup of a .invalid name would still ask the configured resolver); appending the name to that
file is how "DNS works again" is played. Cases with no timing upper bound run
side by side (the ``batch`` fixture, each against a lab vault of its own) to keep the file
well under 90 s per leg; the others run one at a time.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import assertions, keys, serials
from agent.labvault import ASSERTION_TYPE, JSON_TYPE, MESSAGES, go_json, rfc3339
from agent.registration import CROWD_BASE
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.pki import make_pki
from tests.faults.harness import (
    BlackholePort,
    Call,
    Connection,
    Daemon,
    Env,
    FaultProxy,
    hosts_file_only,
    reset,
    run_batch,
    split_response,
    spy,
)

SOC_SERIAL = "00000000fa017001"
SERIAL = f"ACME-{SOC_SERIAL}"
FAST = "connect-timeout = 2\ntimeout = 5"  # [vault] lines of every config: loopback answers in milliseconds
DEFAULT_ACTION = "the vault refused the request (see LastErrorMessage): fix the cause, then run: factory-agent retry"
RETRYING = "retrying"
SERIAL_REJECTED_ACTION = "check vault.trusted-account-keys and the vault's brand and model, then run: factory-agent retry"
ACTION = {
    "invalid-api-key": "check vault.api-key-file, then run: factory-agent retry",
    "mismatched-model": "check model-assertion, then run: factory-agent retry",
    "invalid-model": "check brand and model, and the model's signing key in the vault, then run: factory-agent retry",
    "create-assertion": "check serial.template, then run: factory-agent retry",
    "signing-assertion": "ask the vault's operator, then run: factory-agent retry",
}


# --- checks ---------------------------------------------------------------------------


def trusted(lab_dir: Path) -> list[assertions.Assertion]:
    return assertions.decode_stream((lab_dir / "brand.account-key").read_bytes())


def assert_clean(daemon: Daemon, lab_dir: Path) -> None:
    """No traceback, and the api-key never in the output."""
    text = daemon.stderr
    assert "Traceback" not in text, text
    assert (lab_dir / "api-key").read_text().strip() not in text


def assert_registered(daemon: Daemon, rc: int | None, state_dir: Path, lab_dir: Path, device_key: keys.DeviceKey) -> None:
    """Exit 0, the stored serial is this device's and verifies, the state says registered and clean."""
    assert rc == 0, daemon.stderr
    serial = serials.check_serial((state_dir / "serial.assertion").read_bytes(), brand="acme", model="acme-gw",
                                  key_id=device_key.key_id, trusted=trusted(lab_dir))
    assert serial.header("serial") == SERIAL
    final = daemon.states()[-1]
    assert (final.state, final.serial) == ("registered", SERIAL), daemon.stderr
    recorded = daemon.state_json()
    assert (recorded["phase"], recorded["serial"], recorded["blocked-by"]) == ("registered", SERIAL, "")
    assert recorded["last-error"] == "" and recorded["failures"] == 0
    assert_clean(daemon, lab_dir)


def stored(state_dir: Path, seconds: float = 10.0) -> tuple[list[str], str, str]:
    """What the state directory holds: file names, and state.json's serial and phase.

    Taken from a live daemon, a listing can fall inside one of its atomic state.json writes (identity, key and
    attempts are recorded beside the exchange) and show that write's temp file: such a listing is taken again, so
    the snapshot is of files at rest. Any other temp file (a serial being written) is reported as it is."""
    deadline = time.monotonic() + seconds
    while True:
        names = sorted(p.name for p in state_dir.iterdir())
        recorded = json.loads((state_dir / "state.json").read_text())
        if not any(n.startswith(".state.json.") for n in names) or time.monotonic() > deadline:
            return names, recorded["serial"], recorded["phase"]
        time.sleep(0.01)


def key_recorded(daemon: Daemon, seconds: float = 60.0) -> dict[str, object]:
    """state.json once it records the device key and the failure after it: generated beside the failing exchanges,
    the key is recorded (one write) when it is ready, whatever the vault does, then the next failure (one more);
    identical repeats after that are not written while the vault stays down."""
    deadline = time.monotonic() + seconds
    def settled(recorded: dict) -> bool:  # the key, then the error again after it: repeats are not written
        steps = [e["step"] for e in recorded.get("history", [])]  # type: ignore[attr-defined]
        return bool(recorded.get("key-id")) and "identity" in steps and steps[-1] == "error"

    while not settled(recorded := daemon.state_json()):
        assert time.monotonic() < deadline, "the device key was never recorded"
        time.sleep(0.05)
    return recorded


def assert_nothing_stored(state_dir: Path, snapshot: tuple[list[str], str, str] | None = None) -> None:
    """No serial anywhere in the state directory: not the file, not a temp file, not in state.json."""
    names, serial, phase = snapshot or stored(state_dir)
    assert names == ["device-key.pem", "state.json"] and serial == "" and phase != "registered"


def assert_blocked(daemon: Daemon, rc: int | None, state_dir: Path, lab_dir: Path, code: str, action: str,
                   message: str = "") -> None:
    """Exit 1, blocked by ``code`` with ``action`` for the technician, nothing stored."""
    assert rc == 1, daemon.stderr
    final = daemon.states()[-1]
    assert (final.state, final.code) == ("blocked", code), daemon.stderr
    assert action in final.action, final.text
    assert message in final.message, final.text
    recorded = daemon.state_json()
    assert (recorded["blocked-by"], recorded["last-error"]) == (code, code)
    assert message in str(recorded["last-error-message"])
    assert_nothing_stored(state_dir)
    assert_clean(daemon, lab_dir)


def refusal(code: str, message: str, status: int = 400) -> bytes:
    """The real vault's JSON error body (service/response/errors.go), stray StatusCode included."""
    return go_json({"success": False, "error_code": code, "error_subcode": "", "message": message, "StatusCode": status})


# --- fixtures for the tests that run one at a time (timing, network, TLS) ------------------


@pytest.fixture
def calls(lab: FaultyVault) -> list[Call]:
    return spy(lab)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    seed_key(directory)
    return directory


@pytest.fixture
def spawn() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, state_dir: Path, once: bool = True, wrapper: tuple[str, ...] = ()) -> Daemon:
        daemon = Daemon(config, state_dir, once=once, wrapper=wrapper)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def proxy(lab: FaultyVault) -> Iterator[FaultProxy]:
    host, port = lab.url.split("//")[1].split("/")[0].rsplit(":", 1)
    server = FaultProxy((host, int(port)))
    yield server
    server.close()


def config_for(tmp: Path, url: str, lab_dir: Path, extra: str = FAST) -> Path:
    return write_agent_config(tmp, url, lab_dir, template="ACME-{soc_serial}", soc_serial=SOC_SERIAL, vault_extra=extra)


# --- the batch: scenarios that need no timing upper bound run side by side ------------------
#
# Each is one test below; the module fixture starts the daemons of every selected scenario at
# once (6 at a time), each against a lab vault of its own, and each test waits for its own. The
# tests with a timing upper bound (sections 1 and 2) come first in this file, so they run
# before the batch loads the machine.

SCENARIOS: dict[str, Callable[[Env], None]] = {}


def scenario(name: str) -> Callable[[Callable[[Env], None]], Callable[[Env], None]]:
    def register(fn: Callable[[Env], None]) -> Callable[[Env], None]:
        assert name not in SCENARIOS
        SCENARIOS[name] = fn
        return fn

    return register


@pytest.fixture(scope="module")
def batch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          lab_dir: Path) -> Iterator[dict[str, Future[Env]]]:
    wanted = list(dict.fromkeys(
        item.callspec.params["case"] for item in request.session.items
        if getattr(item, "module", None) is request.module and "batch" in getattr(item, "fixturenames", ())
        and hasattr(item, "callspec")))
    envs: list[Env] = []
    dirs = {name: tmp_path_factory.mktemp(name[:24]) for name in wanted}

    def runner(name: str) -> Callable[[], Env]:
        def run() -> Env:
            env = Env(dirs[name], lab_dir, soc_serial=SOC_SERIAL, extra=FAST)
            envs.append(env)
            SCENARIOS[name](env)
            return env

        return run

    pool, futures = run_batch({name: runner(name) for name in wanted})
    yield futures
    pool.shutdown(wait=True)
    for env in envs:
        env.close()


def finished(batch: dict[str, Future[Env]], case: str) -> Env:
    env = batch[case].result(timeout=20 + CROWD_BASE)
    assert env.daemon is not None
    return env


# --- 1. the network: nothing there, no name, no SYN-ACK --------------------------------


def test_refused_connection_retries_uncounted_then_registers(tmp_path, lab_dir, state, spawn, device_key) -> None:
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = placeholder.getsockname()[1]
    daemon = spawn(config_for(tmp_path, f"http://127.0.0.1:{port}/v1/", lab_dir), state)
    line = daemon.wait_state("waiting-retry", "vault-unavailable")
    assert "cannot reach the vault" in line.message and "Connection refused" in line.message
    assert line.action == "cannot reach the vault: check the network and vault.url; retrying"
    recorded = key_recorded(daemon)
    assert (recorded["attempts"], recorded["failures"], recorded["blocked-by"]) == (0, 0, "")
    assert_nothing_stored(state)
    placeholder.close()
    vault = FaultyVault(lab_dir)
    vault.start(port=port)
    try:
        rc = daemon.wait_exit(12)  # the next try comes ~5 s later
    finally:
        vault.stop()
    assert_registered(daemon, rc, state, lab_dir, device_key)
    assert daemon.state_json()["attempts"] == 1  # Attempts counts serial-requests posted: the refused tries posted none


def test_dns_failure_is_unavailable_and_retried_uncounted_then_registers(tmp_path, lab, state, spawn,
                                                                       device_key) -> None:
    names = tmp_path / "nss"
    wrapper = hosts_file_only(names)
    if wrapper is None:
        pytest.skip("needs root and unshare(1): a lookup must not leave 127.0.0.1, even for a .invalid name")
    port = lab.url.split(":")[2].split("/")[0]
    url = f"http://vault.invalid:{port}/v1/"
    daemon = spawn(config_for(tmp_path, url, lab.directory), state, wrapper=wrapper)
    line = daemon.wait_state("waiting-retry", "vault-unavailable")
    assert line.message == f"cannot reach the vault at {url}request-id: Name or service not known"
    assert line.action == "cannot reach the vault: check the network and vault.url; retrying"
    recorded = key_recorded(daemon)
    assert (recorded["attempts"], recorded["failures"], recorded["blocked-by"]) == (0, 0, "")
    assert_nothing_stored(state)
    with (names / "hosts").open("a") as hosts:  # the name resolves now (to the lab vault)
        hosts.write("127.0.0.1 vault.invalid\n")
    rc = daemon.wait_exit(12)  # the next try comes ~5 s later
    assert_registered(daemon, rc, state, lab.directory, device_key)
    assert daemon.state_json()["attempts"] == 1  # one serial-request posted


def test_connect_timeout_is_transient_then_registers(tmp_path, lab_dir, state, spawn, device_key) -> None:
    hole = BlackholePort()
    try:
        daemon = spawn(config_for(tmp_path, f"http://127.0.0.1:{hole.port}/v1/", lab_dir,
                                  extra="connect-timeout = 1\ntimeout = 3"), state)
        line = daemon.wait_state("waiting-retry", "vault-transient")
        assert f"cannot talk to the vault at http://127.0.0.1:{hole.port}/v1/request-id" in line.message
        assert line.action == RETRYING
        recorded = daemon.state_json()
        assert (recorded["attempts"], recorded["failures"]) == (0, 1)  # counted as a failure, no serial-request posted
        assert line.at - daemon.started < 1 + 4  # the connect timeout, plus the daemon's start-up
    finally:
        hole.close()
    vault = FaultyVault(lab_dir)
    vault.start(port=hole.port)
    try:
        rc = daemon.wait_exit(12)
    finally:
        vault.stop()
    assert_registered(daemon, rc, state, lab_dir, device_key)


# --- 2. a misbehaving server: the raw proxy in front of the lab vault ---------------------


def stall(conn, request, forward) -> None:
    time.sleep(4)  # say nothing for longer than vault.timeout


def reset_mid_body(conn, request, forward) -> None:
    head, body = split_response(forward(request))  # a real serial, signed by the lab vault
    assert body.startswith(b"type: serial\n")
    conn.sendall(head + b"\r\n\r\n" + body[: len(body) // 2])
    time.sleep(0.1)
    reset(conn)


def drip_body(conn, request, forward) -> None:
    head, body = split_response(forward(request))
    conn.sendall(head + b"\r\n\r\n")
    for i in range(len(body)):
        conn.sendall(body[i:i + 1])
        time.sleep(0.1)  # a 2 KiB serial would take minutes


def drip_head(conn, request, forward) -> None:
    answer = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
    for i in range(len(answer)):  # each byte well within the read timeout, the whole far past the deadline
        conn.sendall(answer[i:i + 1])
        time.sleep(0.12)


def hang_up(conn, request, forward) -> None:
    pass  # closed without a byte


def not_http(conn, request, forward) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")


def chunked_flood(conn, request, forward) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x.ubuntu.assertion\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"type: serial\n" + b"y" * 65536
    for _ in range(40):  # 2.6 MB, no Content-Length to refuse it up front
        conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    conn.sendall(b"0\r\n\r\n")


@dataclass(frozen=True)
class RawCase:
    handler: Callable[..., None]
    endpoint: str
    messages: tuple[str, ...]  # LastErrorMessage holds one of these
    deadline: float | None = None  # the failure must be reported within this long after the connection
    is_200: bool = False  # the bad answer was a 200: nothing may be stored meanwhile


TIMEOUT = 1.5
WITHIN = f"did not arrive within {TIMEOUT:g} s"
RAW_CASES = {
    "read-timeout": RawCase(stall, "request-id", ("did not answer in time", WITHIN), deadline=TIMEOUT + 2),
    "reset-mid-body": RawCase(reset_mid_body, "serial", ("",), is_200=True),
    "slow-drip-body": RawCase(drip_body, "serial", (WITHIN,), deadline=TIMEOUT + 2, is_200=True),
    "slow-drip-head": RawCase(drip_head, "request-id", (WITHIN,), deadline=TIMEOUT + 2),
    "closed-without-answer": RawCase(hang_up, "request-id", ("Remote end closed connection without response",)),
    "not-http": RawCase(not_http, "serial", ("SSH-2.0-OpenSSH_9.2p1",)),  # what came instead of a status line
    "oversized-chunked": RawCase(chunked_flood, "serial", ("too large",), is_200=True),
}


def wait_connection(proxy: FaultProxy, handler: str, timeout: float = 8.0) -> Connection:
    deadline = time.monotonic() + timeout
    while True:
        found = [c for c in list(proxy.connections) if c.handler == handler]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no connection reached {handler} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.parametrize("name", RAW_CASES)
def test_a_misbehaving_server_is_transient_then_registers(tmp_path, lab_dir, state, spawn, proxy, device_key,
                                                          name) -> None:
    case = RAW_CASES[name]
    proxy.script[case.endpoint] = [case.handler]
    daemon = spawn(config_for(tmp_path, proxy.url, lab_dir, extra=f"connect-timeout = 1\ntimeout = {TIMEOUT}"), state)
    faulty = wait_connection(proxy, case.handler.__name__)
    # a deadline is a promise: wait a second past it, not for as long as the server cares to drip
    line = daemon.wait_state("waiting-retry", "vault-transient", timeout=(case.deadline or 10) + 1)
    if case.deadline is not None:
        assert line.at - faulty.at < case.deadline, f"reported {line.at - faulty.at:.1f} s after the connection"
    assert any(m in line.message for m in case.messages), line.text
    assert "unexpected keyword argument" not in line.message  # the cause, not a library's compatibility shim
    assert line.action == RETRYING
    recorded = daemon.state_json()
    assert recorded["failures"] == 1 and recorded["blocked-by"] == ""
    if case.is_200:
        assert_nothing_stored(state)
    rc = daemon.wait_exit(12)
    assert_registered(daemon, rc, state, lab_dir, device_key)


def redirect(conn, request, forward) -> None:
    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://portal.invalid/login\r\nContent-Length: 0\r\n\r\n")


def test_a_redirect_is_not_followed_and_blocks(tmp_path, lab_dir, state, spawn, proxy) -> None:
    proxy.script["request-id"] = [redirect]
    daemon = spawn(config_for(tmp_path, proxy.url, lab_dir), state)
    assert_blocked(daemon, daemon.wait_exit(), state, lab_dir, "http-302", DEFAULT_ACTION, "the vault answered HTTP 302")
    assert [c.endpoint for c in proxy.connections] == ["request-id"]  # not to portal.invalid, not again


# --- 3. HTTP statuses and the vault's transient refusals (batch) ----------------------------


@dataclass(frozen=True)
class TroubleCase:
    endpoint: str
    fault: Callable[[], Forced | str]  # made when the scenario starts; a str goes to the error_code queue
    code: str  # the expected LastError
    message: str
    min_wait: float = 0.0  # the retry comes no earlier than this after the fault
    max_wait: float = 2.0  # and no later than this (plus the machine's slack): BACKOFF_BASE, or the Retry-After


SERVER_ERROR = refusal("server-error", "internal server error", status=500)
TROUBLE = {
    "500": TroubleCase("request-id", lambda: Forced(500, retry_after="1"), "vault-transient",
                       "the vault answered HTTP 500", 0.95),
    "502": TroubleCase("serial", lambda: Forced(502, retry_after="1"), "vault-transient",
                       "the vault answered HTTP 502", 0.95),
    "503-retry-after-seconds": TroubleCase("request-id", lambda: Forced(503, retry_after="3"), "vault-transient",
                                           "the vault answered HTTP 503", 2.95, 3.0),  # backoff alone: 1-2 s
    "429": TroubleCase("request-id", lambda: Forced(429, retry_after="1"), "vault-transient",
                       "the vault answered HTTP 429", CROWD_BASE / 2 - 0.05, CROWD_BASE),  # a crowd: past its Retry-After
    "generate-nonce": TroubleCase("request-id", lambda: "generate-nonce", "generate-nonce",
                                  f"the vault refused: generate-nonce: {MESSAGES['generate-nonce']}"),
    "logging-assertion": TroubleCase("serial", lambda: Forced(400, body=refusal("logging-assertion", "pq: connection reset"),
                                                              content_type=JSON_TYPE),
                                     "logging-assertion", "the vault refused: logging-assertion: pq: connection reset"),
    "server-error-500": TroubleCase("serial", lambda: Forced(500, body=SERVER_ERROR, content_type=JSON_TYPE),
                                    "server-error", "HTTP 500"),
}


def _trouble(name: str, case: TroubleCase) -> None:
    @scenario(name)
    def run(env: Env) -> None:
        fault = case.fault()
        if isinstance(fault, str):
            env.vault.faults.error_code[case.endpoint] = [fault]
        else:
            env.vault.faults.status[case.endpoint] = [fault]
        env.start()
        env.finish(timeout=10.0 + case.max_wait)


for _name, _case in TROUBLE.items():
    _trouble(_name, _case)


@scenario("503-retry-after-http-date")
def _503_http_date(env: Env) -> None:
    when = int(time.time()) + 4
    env.notes["when"] = float(when)
    env.vault.faults.status["request-id"] = [Forced(503, retry_after=email.utils.formatdate(when, usegmt=True))]
    env.start()
    env.finish()


@pytest.mark.parametrize("case", TROUBLE)
def test_vault_trouble_is_retried_then_registers(batch, device_key, case) -> None:
    env, expected = finished(batch, case), TROUBLE[case]
    assert env.daemon is not None
    failed = [line for line in env.daemon.states() if line.state == "waiting-retry"]
    assert [(line.code, line.action) for line in failed] == [(expected.code, RETRYING)], env.daemon.stderr
    assert expected.message in failed[0].message, failed[0].text
    assert_registered(env.daemon, env.rc, env.state, env.lab_dir, device_key)
    first = next(i for i, c in enumerate(env.calls) if c.endpoint == expected.endpoint and c.status != 200)
    assert expected.min_wait <= env.calls[first + 1].at - env.calls[first].at <= expected.max_wait + 1.5
    # Attempts counts serial-requests posted, the failed one too (a failed serial costs a fresh request-id)
    assert env.daemon.state_json()["attempts"] == (1 if expected.endpoint == "request-id" else 2)


@pytest.mark.parametrize("case", ["503-retry-after-http-date"])
def test_503_retry_after_http_date_is_honoured(batch, device_key, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    line = next(line for line in env.daemon.states() if line.state == "waiting-retry")
    assert (line.code, line.action) == ("vault-transient", RETRYING) and "HTTP 503" in line.message
    assert_registered(env.daemon, env.rc, env.state, env.lab_dir, device_key)
    retried = [c for c in env.calls if c.endpoint == "request-id"][1]
    when = env.notes["when"]
    assert isinstance(when, float) and retried.at >= when - 0.05, "retried before the Retry-After date"


# --- 4. 202, request-ids (batch; the expired request-id one at a time, on a vault with its own clock) ---


@scenario("202-three-times")
def _accepted(env: Env) -> None:
    # 3 s between the polls: the snapshot below, taken when "polling" is logged, must come before the next poll's
    # attempt is recorded (a state.json write), even on a loaded machine
    env.vault.faults.status["serial"] = [Forced(202, retry_after="3")] * 3
    daemon = env.start()
    daemon.wait_state("polling")
    env.notes["state"] = daemon.state_json()
    env.notes["stored"] = stored(env.state)
    env.finish()


@pytest.mark.parametrize("case", ["202-three-times"])
def test_202_three_times_then_200_reposts_the_same_request(batch, device_key, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    polling = env.notes["state"]
    assert polling["phase"] == "polling" and polling["serial-request"].startswith("type: serial-request\n")  # type: ignore[index]
    assert_nothing_stored(env.state, env.notes["stored"])  # type: ignore[arg-type]
    assert_registered(env.daemon, env.rc, env.state, env.lab_dir, device_key)
    assert [c.status for c in env.calls if c.endpoint == "serial"] == [202, 202, 202, 200]
    assert len({c.body for c in env.calls if c.endpoint == "serial"}) == 1  # the identical request, re-posted (as snapd)
    assert [c.endpoint for c in env.calls].count("request-id") == 1
    serial_posts = [c.at for c in env.calls if c.endpoint == "serial"]
    assert all(b - a >= 2.95 for a, b in zip(serial_posts, serial_posts[1:]))  # Retry-After: 3 honoured
    assert all(line.code == "" for line in env.daemon.states())


NONCE_TIMES = {"invalid-nonce-once": 1, "invalid-nonce-four-times": 4}


def _nonce(name: str) -> None:
    @scenario(name)
    def run(env: Env) -> None:
        env.vault.faults.error_code["serial"] = ["invalid-nonce"] * NONCE_TIMES[name]
        env.start()
        env.finish()


for _name in NONCE_TIMES:
    _nonce(_name)


@pytest.mark.parametrize("case", NONCE_TIMES)
def test_invalid_nonce_gets_a_fresh_request_id_at_once_then_backs_off(batch, device_key, case) -> None:
    """A fresh request-id at once (no waiting-retry state in between) three times, then the backoff."""
    env = finished(batch, case)
    assert env.daemon is not None
    lines = [(line.state, line.code) for line in env.daemon.states() if line.code]
    message = f"POST {env.url}serial: the vault refused: invalid-nonce: {MESSAGES['invalid-nonce']}"
    assert all(line.message == message for line in env.daemon.states() if line.code)
    assert_registered(env.daemon, env.rc, env.state, env.lab_dir, device_key)
    times = NONCE_TIMES[case]
    assert [c.endpoint for c in env.calls] == ["request-id", "serial"] * (times + 1)
    # the first report of the error only: its repeats, the backoff's waiting-retry among them, are collapsed
    # (session.LogPublisher: a "still ..." line after 60 s)
    assert lines == [("requesting", "invalid-nonce")]
    if times != 1:
        ids = [c.at for c in env.calls if c.endpoint == "request-id"]
        assert ids[4] - ids[3] >= 0.95  # the fourth in a row waits (BACKOFF_FLOOR at least)


def test_an_expired_request_id_is_replaced(tmp_path, lab_dir, state, spawn, device_key) -> None:
    """The vault's clock moves 601 s between the request-id and the serial: the nonce has expired."""
    offset = [0.0]
    vault = FaultyVault(lab_dir, now=lambda: time.time() + offset[0])
    seen: list[tuple[str, int]] = []
    original = vault.respond

    def respond(method, path, api_key, body):
        reply = original(method, path, api_key, body)
        seen.append((path.rpartition("/")[2], reply.status))
        if path.endswith("/request-id") and len(seen) == 1:
            offset[0] += 601.0  # the first request-id is now past the vault's 600 s
        return reply

    vault.respond = respond  # type: ignore[method-assign]
    vault.start()
    try:
        daemon = spawn(config_for(tmp_path, vault.url, lab_dir), state)
        rc = daemon.wait_exit()
    finally:
        vault.stop()
    line = next(line for line in daemon.states() if line.code)
    assert (line.state, line.code) == ("requesting", "invalid-nonce") and MESSAGES["invalid-nonce"] in line.message
    assert_registered(daemon, rc, state, lab_dir, device_key)
    assert seen == [("request-id", 200), ("serial", 400), ("request-id", 200), ("serial", 200)]


# --- 5. answers that are not a serial (batch) ---------------------------------------------

GARBLED = {
    "truncated": ("serial", "cannot read the vault's answer"),
    "oversized": ("serial", "too large"),
    "html-portal": ("serial", "cannot read the vault's answer"),
    "model-not-serial": ("serial", "holds no serial assertion"),
    "request-id-missing": ("request-id", "no request-id"),
}


def _garbled(name: str) -> None:
    @scenario(name)
    def run(env: Env) -> None:
        faults = env.vault.faults
        if name == "truncated":
            faults.truncate = True  # stays in force until cleared below
        elif name == "oversized":
            faults.oversize = 2 * 1024 * 1024
        elif name == "html-portal":
            faults.status["serial"] = [Forced(200, body=b"<html><body>Please log in</body></html>\n",
                                              content_type="text/html")]
        elif name == "model-not-serial":
            faults.status["serial"] = [Forced(200, body=(env.lab_dir / "model.assert").read_bytes(),
                                              content_type=ASSERTION_TYPE)]
        else:
            faults.status["request-id"] = [Forced(200, body=b'{"success":true,"message":""}\n', content_type=JSON_TYPE)]
        daemon = env.start()
        env.notes["line"] = daemon.wait_state("waiting-retry", "vault-transient")
        env.notes["stored"] = stored(env.state)  # while it waits to retry
        faults.truncate, faults.oversize = False, 0
        env.finish()


for _name in GARBLED:
    _garbled(_name)


@pytest.mark.parametrize("case", GARBLED)
def test_a_garbled_answer_is_transient_and_never_stored(batch, device_key, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    endpoint, message = GARBLED[case]
    line = env.notes["line"]
    assert message in line.message and line.action == RETRYING, line.text  # type: ignore[attr-defined]
    assert_nothing_stored(env.state, env.notes["stored"])  # type: ignore[arg-type]
    assert_registered(env.daemon, env.rc, env.state, env.lab_dir, device_key)
    assert [c.endpoint for c in env.calls].count(endpoint) == 2


CONTENT_TYPES = {"content-type-html": "text/html; charset=utf-8", "content-type-none": ""}


def _content_type(name: str) -> None:
    @scenario(name)
    def run(env: Env) -> None:
        env.vault.faults.content_type = CONTENT_TYPES[name]  # "" sends none; snapd does not look at it either
        env.start()
        env.finish()


for _name in CONTENT_TYPES:
    _content_type(_name)


@pytest.mark.parametrize("case", CONTENT_TYPES)
def test_a_serial_with_a_wrong_content_type_is_still_checked_and_stored(batch, device_key, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    assert_registered(env.daemon, env.rc, env.state, env.lab_dir, device_key)
    assert all(line.code == "" for line in env.daemon.states())


# --- 6. refusals that need a person (batch) -------------------------------------------------

REFUSAL_CODES = ["empty-data", "invalid-assertion", "invalid-type", "invalid-second-type", "mismatched-model",
                 "invalid-substore", "create-assertion", "signing-assertion"]


def _refused(code: str) -> None:
    @scenario(code)
    def run(env: Env) -> None:
        env.vault.faults.error_code["serial"] = [code]  # the real body: 400, JSON, the real message
        env.start()
        env.finish()


for _code in REFUSAL_CODES:
    _refused(_code)


@pytest.mark.parametrize("case", REFUSAL_CODES)
def test_a_vault_refusal_blocks_with_its_code_and_action(batch, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    assert_blocked(env.daemon, env.rc, env.state, env.lab_dir, case, ACTION.get(case, DEFAULT_ACTION),
                   f"the vault refused: {case}: {MESSAGES[case]}")
    assert env.daemon.state_json()["attempts"] == 1  # the one serial-request posted
    assert [c.endpoint for c in env.calls] == ["request-id", "serial"]  # blocked: not asked again


@scenario("invalid-api-key")
def _invalid_api_key(env: Env) -> None:
    env.api_key_file = env.tmp / "wrong-api-key"
    env.api_key_file.write_text("0123456789abcdef-not-the-key\n")
    env.api_key_file.chmod(0o600)  # a wrong key, not one others may read (refused before any exchange)
    env.start()
    env.finish()


@scenario("invalid-model")
def _invalid_model(env: Env) -> None:
    """A model the vault has no row for: its model assertion is even brand-signed, the vault still says no."""
    signer, now = env.vault.brand_key, time.time()
    other = assertions.sign({"type": "model", "authority-id": "acme", "series": "16", "brand-id": "acme",
                             "model": "acme-other", "architecture": "amd64", "gadget": "pc", "kernel": "pc-kernel",
                             "timestamp": rfc3339(now)}, b"", signer.public, signer.sign, int(now))
    env.model_assertion = env.tmp / "other.model"
    env.model_assertion.write_bytes(other.encode())
    env.start()
    env.finish()


@pytest.mark.parametrize("case", ["invalid-api-key", "invalid-model"])
def test_a_real_refusal_blocks_with_its_code_and_action(batch, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    assert_blocked(env.daemon, env.rc, env.state, env.lab_dir, case, ACTION[case],
                   f"the vault refused: {case}: {MESSAGES[case]}")
    assert "not-the-key" not in env.daemon.stderr
    assert [c.endpoint for c in env.calls] == (["request-id"] if case == "invalid-api-key" else ["request-id", "serial"])


OTHER_REFUSALS = {
    "unknown-error-code": ("quota-exceeded", "the vault refused: quota-exceeded: Daily quota exceeded"),
    "json-as-text-plain": ("http-400", "the vault answered HTTP 400"),
    "404-wrong-path": ("http-404", "request-id: the vault answered HTTP 404; no such endpoint: vault.url must be the "
                       "vault's API base ending in /v1/ (e.g. https://vault.example.com:8443/v1/)"),
}
HTTP_404_ACTION = ("the vault has no such endpoint: vault.url must be the vault's API base ending in /v1/ "
                   "(e.g. https://vault.example.com:8443/v1/); fix it, then run: factory-agent retry")


def _other_refusal(name: str) -> None:
    @scenario(name)
    def run(env: Env) -> None:
        if name == "unknown-error-code":
            env.vault.faults.status["serial"] = [Forced(400, body=refusal("quota-exceeded", "Daily quota exceeded"),
                                                        content_type=JSON_TYPE)]
        elif name == "json-as-text-plain":  # not application/json: the body is not read (as snapd)
            env.vault.faults.status["serial"] = [Forced(400, body=refusal("invalid-model", MESSAGES["invalid-model"]),
                                                        content_type="text/plain; charset=utf-8")]
        else:
            env.url = env.url.replace("/v1/", "/v2/")  # the lab vault's real 404 page
        env.start()
        env.finish()


for _name in OTHER_REFUSALS:
    _other_refusal(_name)


@pytest.mark.parametrize("case", OTHER_REFUSALS)
def test_other_refusals_block_with_the_default_action(batch, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    code, message = OTHER_REFUSALS[case]
    action = HTTP_404_ACTION if case == "404-wrong-path" else DEFAULT_ACTION
    endpoint = "request-id" if case == "404-wrong-path" else "serial"
    assert_blocked(env.daemon, env.rc, env.state, env.lab_dir, code, action, f"POST {env.url}{endpoint}: ")
    assert message in env.daemon.states()[-1].message


# --- 7. a signed answer that is not this device's, or not trusted (batch) ----------------------

WRONG_SERIALS = {
    "other-device-key": "does not match provided device identity",
    "other-brand": "does not match provided device identity",
    "other-model": "does not match provided device identity",
    "untrusted-key": "which is not trusted",
    "broken-signature": "signature does not verify",
}


def _serial_for_another_model(vault: FaultyVault, device_key: keys.DeviceKey) -> bytes:
    signer, now = vault.brand_key, time.time()
    serial = assertions.sign({"type": "serial", "authority-id": "acme", "revision": "1", "brand-id": "acme",
                              "model": "acme-other", "serial": SERIAL, "device-key": device_key.public.encoded,
                              "device-key-sha3-384": device_key.key_id, "timestamp": rfc3339(now)},
                             b"", signer.public, signer.sign, int(now))
    return serial.encode()


def _wrong_serial(name: str) -> None:
    @scenario(name)
    def run(env: Env) -> None:
        faults = env.vault.faults
        if name == "other-device-key":
            faults.other_device_key = True
        elif name == "other-brand":
            faults.wrong_brand = "other-brand"
        elif name == "other-model":
            device_key = keys.load_key((env.state / "device-key.pem").read_bytes())
            faults.status["serial"] = [Forced(200, body=_serial_for_another_model(env.vault, device_key),
                                              content_type=ASSERTION_TYPE)]
        elif name == "untrusted-key":
            faults.untrusted_key = True
        else:
            faults.bad_signature = True
        env.start()
        env.finish()


for _name in WRONG_SERIALS:
    _wrong_serial(_name)


@pytest.mark.parametrize("case", WRONG_SERIALS)
def test_a_wrong_serial_blocks_and_is_never_stored(batch, case) -> None:
    env = finished(batch, case)
    assert env.daemon is not None
    assert_blocked(env.daemon, env.rc, env.state, env.lab_dir, "serial-rejected", SERIAL_REJECTED_ACTION,
                   WRONG_SERIALS[case])
    assert "rejected the vault's serial" in env.daemon.stderr


# --- 8. TLS (one at a time) ------------------------------------------------------------------


@pytest.mark.parametrize("validity", ["not-yet-valid", "expired"])
def test_a_certificate_outside_the_device_clock_waits_for_the_clock(tmp_path, lab_dir, state, spawn, device_key,
                                                                     validity) -> None:
    day = datetime.timedelta(days=1)
    window = (day, 30 * day) if validity == "not-yet-valid" else (-30 * day, -day)
    pki = make_pki(tmp_path / "pki", not_before=window[0], not_after=window[1])
    vault = FaultyVault(lab_dir)
    url = vault.start(ssl_context=pki.server_context())
    try:
        daemon = spawn(config_for(tmp_path, url, lab_dir, extra=f'{FAST}\nca-file = "{pki.ca_file}"'), state,
                       once=False)
        line = daemon.wait_state("waiting-clock", "clock-skew")
        expected = "certificate is not yet valid" if validity == "not-yet-valid" else "certificate has expired"
        assert line.message.startswith(f"the vault's TLS certificate is not valid at this device's time: {expected} "
                                       f"(POST {url}request-id: device time "), line.text
        assert line.message.endswith(" UTC)") and " UTC, certificate valid from " in line.message, line.text
        assert line.action == ("the device clock is wrong for the vault's TLS certificate: set the time (NTP or RTC); "
                               "retrying")
        recorded = daemon.state_json()
        assert (recorded["clock-tries"], recorded["attempts"], recorded["blocked-by"]) == (1, 0, "")
        assert_nothing_stored(state)
        assert vault.requests[("POST", "/v1/request-id")] == 0  # nothing got past the handshake
        assert daemon.terminate() == 0  # waiting 30 s for the clock; stopped cleanly meanwhile
        assert_clean(daemon, lab_dir)
    finally:
        vault.stop()
    good = make_pki(tmp_path / "good")  # the clock is right again (here: the certificate is)
    vault = FaultyVault(lab_dir)
    url = vault.start(ssl_context=good.server_context())
    try:
        again = spawn(config_for(tmp_path, url, lab_dir, extra=f'{FAST}\nca-file = "{good.ca_file}"'), state)
        assert_registered(again, again.wait_exit(), state, lab_dir, device_key)
        assert again.state_json()["clock-tries"] == 0
    finally:
        vault.stop()


@pytest.mark.parametrize("case", ["another-host", "unknown-ca"])
def test_an_untrusted_certificate_blocks(tmp_path, lab_dir, state, spawn, case) -> None:
    if case == "another-host":
        pki = make_pki(tmp_path / "pki", ip=None, dns="vault.example.com")
        ca_file = pki.ca_file
    else:
        pki, ca_file = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other-ca").ca_file
    vault = FaultyVault(lab_dir)
    url = vault.start(ssl_context=pki.server_context())
    try:
        daemon = spawn(config_for(tmp_path, url, lab_dir, extra=f'{FAST}\nca-file = "{ca_file}"'), state)
        rc = daemon.wait_exit()
    finally:
        vault.stop()
    assert_blocked(daemon, rc, state, lab_dir, "tls-certificate", "check vault.url and vault.ca-file, then run: factory-agent retry",
                   f"{url}request-id: ")
    message = daemon.states()[-1].message
    if case == "another-host":  # urllib3 1.26 checks the name itself; urllib3 2 lets OpenSSL do it
        assert ("doesn't match 'vault.example.com'" in message
                or "mismatch, certificate is not valid for '127.0.0.1'" in message), message
    else:
        assert "unable to get local issuer certificate" in message, message
    assert vault.requests[("POST", "/v1/request-id")] == 0


# --- 9. Attempts: every exchange with the vault counts, whatever it answered (batch) -----------

COUNTED = {"counted-truncated": "waiting-retry", "counted-broken-signature": "blocked"}


def _counted(name: str) -> None:
    @scenario(name)
    def run(env: Env) -> None:
        if name == "counted-truncated":
            env.vault.faults.truncate = True
        else:
            env.vault.faults.bad_signature = True
        daemon = env.start(once=False)
        daemon.wait_state(COUNTED[name])
        env.notes["state"] = daemon.state_json()
        env.rc = daemon.terminate()


for _name in COUNTED:
    _counted(_name)


@pytest.mark.parametrize("case", COUNTED)
def test_an_exchange_with_a_wrong_answer_is_counted_in_attempts(batch, case) -> None:
    """Progress.attempts is "serial-requests posted": a 200 whose body is garbled or not trusted answered
    one, as much as a 503 does."""
    env = finished(batch, case)
    assert env.rc == 0
    assert [c.endpoint for c in env.calls] == ["request-id", "serial"]
    recorded = env.notes["state"]
    assert recorded["attempts"] == 1, recorded  # type: ignore[index]
