"""snapd mode end to end: a client that behaves as snapd does drives the agent's relay against the lab vault.

The agent is the real daemon (`run --bus session`, mode = "snapd") on the private
bus; the settings come from the hook, through the fake snapctl, as snapd would
read them; the vault is the lab vault on 127.0.0.1. What snapd would see is
checked on the client's side, what the technician sees on D-Bus.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent import assertions, keys, registration, relay, store
from tests.dbus.conftest import Daemon, Recorder, owned, wait_for
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.launcher import as_user
from tests.fakes.snapd_client import USER_AGENT, Attempt, SnapdClient
from tests.fakes.snapdmode import SOC_SERIAL, hook_env, run_hook, set_values, snapctl_calls, write_snapd_config


class SnapdMode:
    """The agent in snapd mode, and the settings its hook gave snapd."""

    def __init__(self, tmp: Path, bus_address: str, backend: str, lab: FaultyVault, api_key_file: Path | None = None,
                 listen: str = "127.0.0.1:0") -> None:
        self.tmp, self.bus_address, self.lab = tmp, bus_address, lab
        self.state, self.backend = tmp / "state", backend
        self.config = write_snapd_config(tmp, lab.url, lab.directory, api_key_file=api_key_file, listen=listen)
        self.start()
        self.model = assertions.decode((lab.directory / "model.assert").read_bytes())

    def start(self) -> None:
        """The daemon, then the hook as snapd runs it at each attempt (the relay's port is new each start)."""
        self.daemon = Daemon(self.bus_address, self.backend, self.config, self.state)
        wait_for(lambda: owned(self.bus_address))
        hook = run_hook(hook_env(self.tmp, self.bus_address, self.backend))
        assert hook.returncode == 0, hook.stderr
        self.settings: dict[str, Any] = {k: v if isinstance(v, dict) else str(v)
                                         for k, v in set_values(snapctl_calls(self.tmp)[-1]).items()}

    def restart(self) -> str:
        log = self.stop()
        wait_for(lambda: not owned(self.bus_address))
        self.start()
        return log

    @property
    def token(self) -> str:
        """The relay's token, as the hook put it in snapd's device-service.headers."""
        return str(self.settings["device-service.headers"][relay.TOKEN_HEADER])

    @property
    def netloc(self) -> str:
        return str(urlsplit(self.settings["device-service.url"]).netloc)

    def client(self, key: keys.DeviceKey) -> SnapdClient:
        return SnapdClient(self.settings, key, self.model)

    def register(self, key: keys.DeviceKey) -> tuple[Any, dict[str, Any]]:
        """One snapd registration through the relay, and the properties once State is registered."""
        attempt = self.client(key).register()
        return attempt, self.props(until=lambda p: p.get("State") == "registered")

    def props(self, until: Any = None) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            async with Recorder(self.bus_address) as rec:
                if until is not None:
                    box: dict[str, Any] = {}

                    async def check() -> bool:
                        box.update(await rec.get_all())
                        return bool(until(box))

                    deadline = asyncio.get_running_loop().time() + 20
                    while not await check():
                        assert asyncio.get_running_loop().time() < deadline, box
                        await asyncio.sleep(0.05)
                return await rec.get_all()

        return asyncio.run(read())

    def stop(self) -> str:
        log = self.daemon.stop()
        assert "Traceback" not in log and self.lab.api_key not in log
        return log


def _serial_posts(lab: FaultyVault) -> int:
    return lab.requests[("POST", "/v1/serial")]


def test_a_snapd_registration_through_the_relay(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault,
                                                device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attempt, props = mode.register(device_key)
    finally:
        mode.stop()
    assert attempt.error == "" and attempt.serial is not None
    assert [(endpoint, a.status) for endpoint, a in attempt.answers] == [("request-id", 200), ("serial", 200)]
    assert attempt.serial.header("serial") == f"SNAPD-{SOC_SERIAL}"  # the hook's proposed serial
    assert attempt.serial.body.decode() == mode.settings["registration.body"]  # the identity, in the serial
    assert props["State"] == "registered" and props["Serial"] == f"SNAPD-{SOC_SERIAL}"
    assert props["DeviceKeyId"] == device_key.key_id  # snapd's key, which the agent never held
    assert props["LastError"] == "" and props["Action"] == ""
    assert (mode.state / store.SERIAL_FILE).read_bytes() == attempt.serial.encode()  # recorded durably
    assert not (mode.state / store.DEVICE_KEY_FILE).exists()  # no key generated in snapd mode
    recorded = json.loads((mode.state / store.STATE_FILE).read_text())
    assert (recorded["phase"], recorded["key-id"]) == ("registered", device_key.key_id)
    (request,) = [a for a in lab.signed]
    assert request.header("device-key-sha3-384") == device_key.key_id


def test_a_registered_agent_answers_snapds_new_serial_request_from_disk(tmp_path: Path, bus_address: str, backend: str,
                                                                        lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        first = mode.client(device_key).register()
        mode.props(until=lambda p: p.get("State") == "registered")
        mode.restart()
        lab.faults.status["serial"] = [Forced(400)] * 3  # a vault that refuses a second request for this device
        posts = _serial_posts(lab)
        again = mode.client(device_key).register()  # snapd lost its serial (or never stored it): a new attempt
        props = mode.props()
        posts_after = _serial_posts(lab)
    finally:
        mode.stop()
    assert first.serial is not None and again.error == "" and again.serial is not None
    assert again.serial.encode() == first.serial.encode()  # the very serial the agent holds
    (_, answer) = again.answers[-1]
    assert (answer.status, answer.content_type) == (200, "application/x.ubuntu.assertion")
    assert posts_after == posts  # the vault saw no new /serial call
    assert props["State"] == "registered" and props["LastError"] == ""


def test_snapds_capabilities_and_user_agent_reach_the_vault_but_no_client_api_key(
        tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        client = mode.client(device_key)
        client.extra_headers = {"Api-Key": "a-key-from-the-client", "X-Other": "not for the vault"}
        attempt = client.register()
    finally:
        mode.stop()
    assert attempt.error == "" and attempt.serial is not None
    seen = dict(lab.seen_headers)
    assert seen["/v1/request-id"]["user-agent"] == USER_AGENT and seen["/v1/serial"]["user-agent"] == USER_AGENT
    assert seen["/v1/serial"]["snap-device-capabilities"] == "serial-stream"
    assert seen["/v1/serial"]["content-type"] == "application/x.ubuntu.assertion"
    for headers in seen.values():
        assert headers["api-key"] == "valid" and "x-other" not in headers  # the agent's key, never the client's


def test_a_vault_refusal_reaches_snapd_as_json_and_shows_on_dbus(tmp_path: Path, bus_address: str, backend: str,
                                                                 lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    wrong = tmp_path / "wrong-api-key"
    wrong.write_text("not-the-vaults-key\n")
    wrong.chmod(0o600)  # an api-key file others can read is refused (issue 11)
    mode = SnapdMode(tmp_path, bus_address, backend, lab, api_key_file=wrong)
    try:
        attempt = mode.client(device_key).register()
        props = mode.props(until=lambda p: p.get("LastError") == "invalid-api-key")
    finally:
        mode.stop()
    (endpoint, answer), = attempt.answers
    assert (endpoint, answer.status, answer.content_type) == ("request-id", 400, "application/json")
    assert json.loads(answer.body)["message"] == "Invalid API key used"  # the vault's own words
    assert attempt.error == "cannot retrieve request-id for making a request for a serial: Invalid API key used"
    assert props["State"] == "blocked"
    assert props["Action"] == registration.ACTIONS["invalid-api-key"]
    assert "Invalid API key used" in props["LastErrorMessage"]


def test_the_relay_refuses_another_brand_and_a_second_device_key(tmp_path: Path, bus_address: str, backend: str,
                                                                 lab: FaultyVault, device_key: keys.DeviceKey,
                                                                 small_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        other_brand = mode.client(device_key).register(brand="other-brand")
        after_brand = mode.props(until=lambda p: p.get("LastError") == "relay-wrong-model")
        posts = _serial_posts(lab)
        registered = mode.client(device_key).register()
        second_key = mode.client(small_key).register()
        url = mode.settings["device-service.url"]
        junk = _raw_exchange(url, f"POST /v1/serial HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
                                  f"{relay.TOKEN_HEADER}: {mode.token}\r\n"
                                  "Content-Type: application/x.ubuntu.assertion\r\n"
                                  "Content-Length: 4\r\n\r\njunk".encode(), half_close=False)
        after_key = mode.props()
        posts_after = _serial_posts(lab)
    finally:
        log = mode.stop()
    _assert_refused(other_brand, "relay-wrong-model", "brand 'other-brand'")
    assert posts == 0  # it never reached the vault
    assert after_brand["State"] == "blocked" and after_brand["Action"] == registration.ACTIONS["relay-wrong-model"]
    assert registered.error == "" and registered.serial is not None  # snapd's next attempt unblocks and registers
    _assert_refused(second_key, "relay-other-device-key", small_key.key_id)
    assert posts_after == posts + 1  # the registration only
    assert junk.startswith(b"HTTP/1.1 400 ") and b'"relay-bad-request"' in junk
    # After registration a refused caller is not the device's error: nothing recorded, one log line each.
    assert after_key["State"] == "registered" and after_key["DeviceKeyId"] == device_key.key_id
    assert after_key["LastError"] == "" and after_key["LastErrorMessage"] == "" and after_key["Action"] == ""
    assert log.count("relay refused a request after registration") == 2


def _assert_refused(attempt: Attempt, code: str, detail: str) -> None:
    endpoint, answer = attempt.answers[-1]
    assert (endpoint, answer.status, answer.content_type) == ("serial", 400, "application/json")
    body = json.loads(answer.body)
    assert body["error_code"] == code and detail in body["message"]
    assert attempt.error == f"cannot deliver device serial request: {body['message']}"


def test_202_and_5xx_pass_through_so_snapd_polls_and_retries(tmp_path: Path, bus_address: str, backend: str,
                                                             lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    lab.faults.status["serial"] = [Forced(503)]
    lab.faults.accepted_times = 1
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attempt, props = mode.register(device_key)
    finally:
        mode.stop()
    statuses = [(endpoint, a.status, a.content_type) for endpoint, a in attempt.answers]
    assert statuses == [("request-id", 200, "application/json; charset=UTF-8"),
                        ("serial", 503, "application/json"),  # the vault's text/plain 503, made JSON for snapd
                        ("request-id", 200, "application/json; charset=UTF-8"),
                        ("serial", 202, None), ("serial", 200, "application/x.ubuntu.assertion")]
    assert attempt.serial is not None and props["Serial"] == attempt.serial.header("serial")
    assert props["LastError"] == ""


@pytest.mark.parametrize("endpoint", ["request-id", "serial"])
@pytest.mark.parametrize("status", [500, 429])
def test_a_vault_500_or_429_keeps_snapd_retrying_within_its_attempt(tmp_path: Path, bus_address: str, backend: str,
                                                                    lab: FaultyVault, device_key: keys.DeviceKey,
                                                                    endpoint: str, status: int) -> None:
    """snapd ends its attempt on anything but >500 and then waits its change backoff (5 min doubling to 24 h):
    the relay answers 503 with the vault's JSON, and the next try is snapd's 60 s retry, in the same attempt."""
    lab.faults.status[endpoint] = [Forced(status, retry_after="1")]
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attempt, props = mode.register(device_key)
    finally:
        mode.stop()
    statuses = [(e, a.status) for e, a in attempt.answers]
    before = [("request-id", 200)] if endpoint == "serial" else []
    assert statuses == [*before, (endpoint, 503), ("request-id", 200), ("serial", 200)], attempt
    assert json.loads(attempt.answers[len(before)][1].body)["error_code"] == "vault-transient"
    assert attempt.error == "" and attempt.serial is not None and props["State"] == "registered"


def test_a_serial_the_agent_cannot_trust_is_not_handed_to_snapd(tmp_path: Path, bus_address: str, backend: str,
                                                                lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    lab.faults.untrusted_key = True
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attempt = mode.client(device_key).register()
        props = mode.props(until=lambda p: p.get("LastError") == "serial-rejected")
    finally:
        mode.stop()
    endpoint, answer = attempt.answers[-1]
    assert (endpoint, answer.status, answer.content_type) == ("serial", 400, "application/json")
    assert "not trusted" in json.loads(answer.body)["message"] and attempt.serial is None
    assert props["State"] == "blocked" and props["Action"] == registration.ACTIONS["serial-rejected"]
    assert not (mode.state / store.SERIAL_FILE).exists()


def _raw_exchange(url: str, data: bytes, half_close: bool = True) -> bytes:
    """Send ``data`` to the relay as any local process could, and read whatever comes back.

    ``half_close``: shut our sending side after the request. The relay answers only a live, established
    socket once it has read the request (snapd never half-closes), so only a malformed request, refused
    before that, may be sent so.
    """
    import socket

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


MALFORMED = [
    b"POST /v1/serial HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",  # int() of it raises ValueError
    b"\x00\xff GARBAGE \xfe\r\n\r\n",
    b"POST /v1/serial HTTP/1.1\r\nthis header has no colon\r\n\r\n",
    b"POST /v1/serial HTTP/1.1\r\nContent-Length: 100\r\n\r\ntruncated",
    "POST /v1/s\u00e9rial HTTP/1.1\r\nX-\u00e9: \u2603\r\nContent-Length: \u0663\r\n\r\n".encode("utf-8"),
    b"POST /v1/serial HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\njunk!",  # conflicting
    b"POST /v1/serial HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4, 5\r\n\r\njunk!",
]


def test_malformed_requests_neither_crash_the_daemon_nor_stop_it_serving(tmp_path: Path, bus_address: str, backend: str,
                                                                         lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        answers = [_raw_exchange(mode.settings["device-service.url"], data) for data in MALFORMED]
        alive = mode.daemon.proc.poll() is None
        attempt, props = mode.register(device_key)
    finally:
        log = mode.stop()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"413"), answer
        assert b"Content-Type: application/json\r\n" in head and json.loads(body)["error_code"] == "relay-bad-request"
    assert alive and attempt.error == "" and props["State"] == "registered"
    assert "internal error" not in log and log.count("refused a malformed request") == len(MALFORMED)


NOBODY = 65534
CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((host, port), timeout=10) as sock:
    sock.sendall(f"POST /v1/request-id HTTP/1.1\\r\\nHost: {host}:{port}\\r\\nContent-Length: 0\\r\\n\\r\\n".encode())
    sys.stdout.buffer.write(b"".join(iter(lambda: sock.recv(65536), b"")))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody (and the relay takes root only)")
def test_a_client_that_is_not_root_is_refused(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault,
                                              device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        where = urlsplit(mode.settings["device-service.url"])
        nobody = subprocess.run(_nobody(CLIENT, str(where.hostname), str(where.port)), env=as_user(NOBODY).env(),
                                capture_output=True, timeout=30, cwd="/")
        ids_after_nobody = lab.requests[("POST", "/v1/request-id")]
        attempt = mode.client(device_key).register()  # root, as snapd
    finally:
        log = mode.stop()
    head, _, body = nobody.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 "), nobody
    assert b"Content-Type: application/json\r\n" in head and json.loads(body)["error_code"] == "relay-forbidden"
    assert ids_after_nobody == 0  # nothing reached the vault
    assert attempt.error == "" and attempt.serial is not None
    assert "refused a process of uid 65534" in log


# --- a local adversary (issue 11) --------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as nobody (setpriv)")


def _nobody(script: str, *args: str) -> list[str]:
    """``script`` run as uid/gid 65534 with no groups, as a local user's process would: by this interpreter's real
    path (a venv's python may sit in a directory nobody cannot enter), through the launcher."""
    return as_user(NOBODY).python_argv("-c", script, *args)


def _request(mode: SnapdMode, endpoint: str, body: bytes = b"", token: str | None = None) -> bytes:
    """The bytes of one POST to the relay as snapd sends it, with ``token`` (the real one unless told)."""
    lines = [f"POST /v1/{endpoint} HTTP/1.1", f"Host: {mode.netloc}", f"User-Agent: {USER_AGENT}",
             f"Content-Length: {len(body)}"]
    if endpoint == "serial":
        lines.append("Content-Type: application/x.ubuntu.assertion")
    if token != "":
        lines.append(f"{relay.TOKEN_HEADER}: {mode.token if token is None else token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _error_code(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json\r\n" in head, answer
    return int(head.split(b" ")[1]), json.loads(body)["error_code"]


# Connect, send, close at once: the kernel turns the socket into a FIN_WAIT/TIME_WAIT mini-socket listed with
# uid 0 and inode 0, which a check of /proc/net/tcp rows took for root (attack 1 of issue 11).
HANG_UP = """
import socket, sys
host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payloads = sys.stdin.buffer.read().split(b"\\0NEXT\\0")
for _ in range(rounds):
    for data in payloads:
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(data)
        sock.close()
"""


@needs_root
def test_a_local_user_that_sends_and_hangs_up_at_once_binds_nothing_and_reaches_no_vault(
        tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault, device_key: keys.DeviceKey,
        small_key: keys.DeviceKey) -> None:
    """Even with the token (say it leaked): a non-root sender is refused, whether it is still connected or gone."""
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attacker = mode.client(small_key)
        payloads = [_request(mode, "request-id"), _request(mode, "serial", attacker.serial_request("attacker-id"))]
        done = subprocess.run(_nobody(HANG_UP, mode.netloc.split(":")[0], mode.netloc.split(":")[1], "200"),
                              input=b"\0NEXT\0".join(payloads), capture_output=True, timeout=120, cwd="/")
        assert done.returncode == 0, done.stderr
        forwarded = (lab.requests[("POST", "/v1/request-id")], _serial_posts(lab))
        before = mode.props()
        attempt, after = mode.register(device_key)  # root, as snapd, with the token
    finally:
        log = mode.stop()
    assert forwarded == (0, 0)  # nothing of the attacker's reached the vault
    assert before["DeviceKeyId"] == "" and before["LastError"] == ""  # no key bound, nothing recorded
    assert attempt.error == "" and attempt.serial is not None
    assert after["DeviceKeyId"] == device_key.key_id and [r.header("device-key-sha3-384") for r in lab.signed] == \
        [device_key.key_id]
    assert "refused" in log and mode.token not in log


@needs_root
def test_a_root_process_without_the_token_is_refused_and_nothing_is_bound_or_forwarded(
        tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault, device_key: keys.DeviceKey,
        small_key: keys.DeviceKey) -> None:
    """Another root daemon (on Ubuntu Core, another snap's) reaches loopback too: the token is what it lacks."""
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        url, stream = mode.settings["device-service.url"], mode.client(small_key).serial_request("root-id")
        answers = [_raw_exchange(url, data, half_close=False) for data in (
            _request(mode, "request-id", token=""), _request(mode, "request-id", token="0" * 64),
            _request(mode, "serial", stream, token=""), _request(mode, "serial", stream, token=mode.token[:-1]))]
        forwarded = (lab.requests[("POST", "/v1/request-id")], _serial_posts(lab))
        before = mode.props()
        attempt, after = mode.register(device_key)
    finally:
        log = mode.stop()
    assert [_error_code(answer) for answer in answers] == [(403, "relay-forbidden")] * 4
    assert forwarded == (0, 0) and before["DeviceKeyId"] == "" and before["LastError"] == ""
    assert attempt.error == "" and after["DeviceKeyId"] == device_key.key_id
    assert "without the relay's token" in log and mode.token not in log
    token_file = mode.state / relay.TOKEN_FILE
    assert token_file.read_text().strip() == mode.token and token_file.stat().st_mode & 0o777 == 0o600


def test_a_key_is_bound_only_on_a_request_id_the_relay_handed_out(tmp_path: Path, bus_address: str, backend: str,
                                                                  lab: FaultyVault, device_key: keys.DeviceKey,
                                                                  small_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        url, client = mode.settings["device-service.url"], mode.client(small_key)
        made_up = _raw_exchange(url, _request(mode, "serial", client.serial_request("made-up-id")), half_close=False)
        forwarded, before = _serial_posts(lab), mode.props()
        attempt, after = mode.register(device_key)
    finally:
        log = mode.stop()
    assert _error_code(made_up) == (503, "relay-unknown-request-id")  # snapd would start again with a fresh id
    assert forwarded == 0 and before["DeviceKeyId"] == "" and before["LastError"] == ""
    assert attempt.error == "" and after["DeviceKeyId"] == device_key.key_id
    assert "was not handed out by this relay" in log


# Hold many connections to the relay and open a new one as soon as the relay closes one (attack 3).
HOLD = """
import select, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
made = closed = 0
def connect():
    global made
    sock = socket.create_connection((host, port), timeout=10)
    sock.setblocking(False)
    made += 1
    return sock
socks = [connect() for _ in range(count)]
told = False
while not select.select([sys.stdin], [], [], 0)[0]:
    if not told and closed >= count:  # every first connection refused and replaced: the flood is steady
        print("holding", flush=True)
        told = True
    for i, sock in enumerate(socks):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            sock.close()
            socks[i] = connect()
            closed += 1
    select.select([], [], [], 0.005)
print(made, closed, flush=True)
"""
HELD = 64  # eight times the relay's slots


@needs_root
def test_non_root_peers_holding_connections_do_not_starve_snapd(tmp_path: Path, bus_address: str, backend: str,
                                                                lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    host, port = mode.netloc.split(":")
    holder = subprocess.Popen(_nobody(HOLD, host, port, str(HELD)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd="/")
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        attempts = [mode.client(device_key).register() for _ in range(3)]  # then twice more, registered
        props = mode.props()
        out, err = holder.communicate(b"", timeout=30)  # EOF on its stdin: it stops
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        log = mode.stop()
    assert holder.returncode == 0, err
    made, closed = map(int, out.split())
    assert made >= 2 * HELD and closed >= HELD  # it held its connections, and the relay closed each one it refused
    for attempt in attempts:
        assert attempt.error == "" and attempt.serial is not None
        assert [a.status for _, a in attempt.answers] == [200, 200]  # never a 503 relay-busy
    assert props["State"] == "registered" and props["DeviceKeyId"] == device_key.key_id
    # The journal is not flooded: one line per uid and minute, with a count.
    assert 1 <= log.count("refused a process of uid 65534") <= 3, log


# Peers that reset or hang up at every step: before sending, mid-head, mid-body.
RESET = """
import socket, struct, sys
host, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
parts = [b"", b"POST /v1/request-id HTTP/1.1\\r\\nHost: x\\r\\n", b"POST /v1/serial HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 99\\r\\n\\r\\nab"]
for i in range(rounds):
    sock = socket.create_connection((host, port), timeout=10)
    if i % 2:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
    if parts[i % 3]:
        sock.sendall(parts[i % 3])
    sock.close()
"""


@needs_root
def test_peers_that_reset_or_hang_up_leave_no_traceback_and_the_relay_serves_on(
        tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    host, port = mode.netloc.split(":")
    try:
        for command in (_nobody(RESET, host, port, "120"), [sys.executable, "-c", RESET, host, port, "120"]):
            done = subprocess.run(command, capture_output=True, timeout=120, cwd="/")
            assert done.returncode == 0, done.stderr
        alive = mode.daemon.proc.poll() is None
        attempt, props = mode.register(device_key)
    finally:
        log = mode.stop()  # asserts no "Traceback" too
    assert alive and attempt.error == "" and props["State"] == "registered"
    for trace in ("Task exception was never retrieved", "ENOTCONN", "Errno 107", "internal error"):
        assert trace not in log


def test_a_serial_swapped_on_disk_is_reported_and_never_served(tmp_path: Path, bus_address: str, backend: str,
                                                               lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        first, _ = mode.register(device_key)
        assert first.serial is not None
        path = mode.state / store.SERIAL_FILE
        swapped = path.read_bytes().replace(f"serial: {first.serial.header('serial')}".encode(), b"serial: SWAPPED-1")
        assert swapped != path.read_bytes()
        tmp = path.with_name("swap.tmp")
        tmp.write_bytes(swapped)
        tmp.chmod(path.stat().st_mode & 0o777)
        os.replace(tmp, path)  # as an intruder would, while the daemon runs
        again = mode.client(device_key).register()  # snapd asks again: the relay answers from the registration
        served = asyncio.run(_serial_assertion(mode.bus_address))
    finally:
        log = mode.stop()
    assert again.error == "" and again.serial is not None
    assert again.serial.encode() == first.serial.encode() and served == first.serial.encode().decode()
    assert b"SWAPPED-1" not in again.answers[-1][1].body
    assert "changed on disk" in log


async def _serial_assertion(address: str) -> str:
    async with Recorder(address) as rec:
        reply = await rec.call("GetSerialAssertion")
        return str(reply.body[0])


def _listening(netloc: str) -> bool:
    import socket

    host, port = netloc.split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_snapds_settings_from_before_a_daemon_restart_still_work(tmp_path: Path, bus_address: str, backend: str,
                                                                 lab: FaultyVault, device_key: keys.DeviceKey) -> None:
    """snapd keeps the token the hook set for the whole attempt (a resumed request-serial task does not run the
    hook again): the token is kept in the state directory, not made anew at each start."""
    mode = SnapdMode(tmp_path, bus_address, backend, lab, listen=f"127.0.0.1:{_free_port()}")
    try:
        before = dict(mode.settings)
        logs = mode.stop()
        wait_for(lambda: not owned(bus_address))
        mode.daemon = Daemon(bus_address, backend, mode.config, mode.state)  # no hook this time
        wait_for(lambda: owned(bus_address))
        wait_for(lambda: _listening(mode.netloc))
        attempt = SnapdClient(before, device_key, mode.model).register()
    finally:
        logs += mode.stop()
    assert attempt.error == "" and attempt.serial is not None
    assert mode.token not in logs
